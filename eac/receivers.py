"""A change to what a user may see, told to that user's open sockets at once.

Pages and the API read the user's rights on every request; a WebSocket reads them when it opens. Without
this, a user removed from a group, stripped of ``inventory.view_pool`` or deactivated would keep receiving
live updates (and an ex-Administrator could still protect through ``/ws/protection/``) until the page
closed. The rights live in django.contrib.auth's tables, written by the admin and by any code, so their
signals are the one place to hear of it. Each receiver only names the users concerned: ``access.change``
goes to their group (``eac.realtime.user_group``) after commit, and the consumers check again.
"""
from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.db.models import Q
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete

from .realtime import access_change, emit_many

# The m2m_changed actions that take a right away. A clear is announced before it happens, while the rows that
# say who is concerned still exist (the message still leaves only after commit). Adding a group or a
# permission takes nothing away: the pages show the new rights when next loaded, and creating users with
# their rights sends nothing.
CHANGING = ("post_remove", "pre_clear")


def _tell(user_ids: Iterable[int]) -> None:
    emit_many(access_change(user=pk) for pk in sorted(set(user_ids)))


def _members(group_ids: Iterable[int]) -> list[int]:
    through = get_user_model().groups.through
    return list(through.objects.filter(group_id__in=list(group_ids)).values_list("user_id", flat=True))


def on_user_relation_changed(sender, instance, action, reverse, pk_set, **kwargs) -> None:
    """``user.groups`` or ``user.user_permissions`` lost rows, from the user's side or the other one."""
    if action not in CHANGING:
        return
    if not reverse:  # user.groups.remove(group): the instance is the user
        _tell([instance.pk])
    elif action == "pre_clear":  # group.user_set.clear(): everyone still related
        related = {f"{instance._meta.model_name}_id": instance.pk}
        _tell(sender.objects.filter(**related).values_list("user_id", flat=True))
    else:  # group.user_set.remove(user): pk_set holds the users
        _tell(pk_set or ())


def on_group_permissions_changed(sender, instance, action, reverse, pk_set, **kwargs) -> None:
    """``group.permissions`` lost rows: every member of the groups concerned."""
    if action not in CHANGING:
        return
    if not reverse:
        groups = [instance.pk]
    elif action == "pre_clear":
        groups = sender.objects.filter(permission_id=instance.pk).values_list("group_id", flat=True)
    else:
        groups = pk_set or ()
    _tell(_members(groups))


def on_user_saved(sender, instance, created, update_fields=None, **kwargs) -> None:
    """An account changed (active, superuser, password…); a login only stamps last_login: not a change."""
    if created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return
    _tell([instance.pk])


def on_user_deleted(sender, instance, **kwargs) -> None:
    _tell([instance.pk])


def on_group_deleted(sender, instance, **kwargs) -> None:
    _tell(_members([instance.pk]))


def on_permission_deleted(sender, instance, **kwargs) -> None:
    user_model = get_user_model()
    holders = user_model._default_manager.filter(Q(user_permissions=instance) | Q(groups__permissions=instance))
    _tell(holders.values_list("pk", flat=True))


def connect() -> None:
    """Called once, by ``EacConfig.ready``."""
    user_model = get_user_model()
    for through in (user_model.groups.through, user_model.user_permissions.through):
        m2m_changed.connect(on_user_relation_changed, sender=through, dispatch_uid=f"eac-access-{through.__name__}")
    m2m_changed.connect(on_group_permissions_changed, sender=Group.permissions.through,
                        dispatch_uid="eac-access-group-permissions")
    post_save.connect(on_user_saved, sender=user_model, dispatch_uid="eac-access-user-saved")
    post_delete.connect(on_user_deleted, sender=user_model, dispatch_uid="eac-access-user-deleted")
    pre_delete.connect(on_group_deleted, sender=Group, dispatch_uid="eac-access-group-deleted")
    pre_delete.connect(on_permission_deleted, sender=Permission, dispatch_uid="eac-access-permission-deleted")
