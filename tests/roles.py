"""The console's roles as some tests make them: a user holding ``inventory.view_pool`` themselves, or a member
of a console group and nothing else (so that what the group grants, and what removing them takes away, shows)."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission


def view_pool() -> Permission:
    return Permission.objects.get(codename="view_pool", content_type__app_label="inventory")


def role_group(name: str) -> Group:
    """A console group as protection's migration makes it (a transactional test's flush may have removed it)."""
    group, _ = Group.objects.get_or_create(name=name)
    group.permissions.add(view_pool())
    return group


def role_user(username: str, *, group: str | None = None, viewer: bool = False):
    """A user with the password ``pw-<username>``, in ``group`` only, or holding view_pool only (``viewer``)."""
    user = get_user_model().objects.create_user(username, password=f"pw-{username}")
    if group:
        user.groups.add(role_group(group))
    if viewer:
        user.user_permissions.add(view_pool())
    return user
