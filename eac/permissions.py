"""Who may see and do what: one rule for pages, the REST API and WebSockets.

Three things a user can be allowed, each decided here and nowhere else:

- **see the inventory** (pools, hosts, VMs): superusers, and anyone holding ``inventory.view_pool``
  directly or through a group (both console groups hold it, see protection's 0002 migration);
- **see protection and alerts** (the wizard, runs, plans, alerts, the audit log): Administrators and
  Operators, the two Django groups of the console;
- **change protection** (protect, unprotect, power actions, recipients, pools): Administrators only
  (a superuser counts as one); Operators may still acknowledge alerts.

There is no per-pool permission yet: a user sees every pool or none.
"""
from __future__ import annotations

from functools import wraps

from channels.auth import get_user
from channels.db import database_sync_to_async
from django.apps import apps
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.views.decorators.cache import never_cache
from rest_framework.permissions import SAFE_METHODS, BasePermission

ADMINISTRATORS = "Administrators"
OPERATORS = "Operators"
VIEW_PERMISSION = "inventory.view_pool"


def _active(user) -> bool:
    return bool(user is not None and getattr(user, "is_authenticated", False) and user.is_active)


def _groups(user) -> set[str]:
    cache = getattr(user, "_eac_groups", None)
    if cache is None:
        cache = set(user.groups.values_list("name", flat=True))
        user._eac_groups = cache
    return cache


def user_can_view_inventory(user) -> bool:
    if not _active(user):
        return False
    if user.is_superuser:
        return True
    cached = getattr(user, "_eac_views_inventory", None)
    if cached is None:
        # One query (the user's own permissions or their groups'), where has_perm costs two.
        permission = apps.get_model("auth", "Permission")
        app_label, codename = VIEW_PERMISSION.split(".")
        cached = permission.objects.filter(
            Q(user=user) | Q(group__user=user), codename=codename, content_type__app_label=app_label
        ).exists()
        user._eac_views_inventory = cached
    return cached


def user_is_administrator(user) -> bool:
    return _active(user) and bool(user.is_superuser or ADMINISTRATORS in _groups(user))


def user_is_operator(user) -> bool:
    return _active(user) and OPERATORS in _groups(user)


def user_can_view(user) -> bool:
    """May see protection, alerts and the audit log."""
    return user_is_administrator(user) or user_is_operator(user)


def user_can_change_protection(user) -> bool:
    return user_is_administrator(user)


def user_can_acknowledge(user) -> bool:
    return user_can_view(user)


def pools_visible_to(user) -> QuerySet:
    """The pools ``user`` may see (every pool, or none): views, the API and the consumer all use it."""
    pool = apps.get_model("inventory", "Pool")  # by name: the kernel imports no app
    return pool.objects.all() if user_can_view_inventory(user) else pool.objects.none()


async def socket_user_now(scope: dict):
    """The user of a WebSocket as the database has them now (the scope's user was read at connect, with
    the rights cached on it): through the session when the scope has one, so a changed password, an inactive
    or deleted account all give AnonymousUser, as they would on the next page; else by primary key."""
    if "session" in scope:
        return await get_user(scope)
    return await database_sync_to_async(_user_reloaded)(scope.get("user"))


def _user_reloaded(user):
    pk = getattr(user, "pk", None)
    found = get_user_model()._default_manager.filter(pk=pk, is_active=True).first() if pk is not None else None
    return found or AnonymousUser()


# -- pages ------------------------------------------------------------------------------------------


def page_requires(rule, message: str):
    """A page view for signed-in users (others go to the login page) that ``rule(user)`` allows
    (others get a 403 page saying ``message``)."""

    def decorate(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not rule(request.user):
                raise PermissionDenied(message)
            return view(request, *args, **kwargs)

        return login_required(never_cache(wrapper))

    return decorate


viewer_required = page_requires(user_can_view, "Only Administrators and Operators can see protection.")


# -- the REST API -----------------------------------------------------------------------------------


class CanViewInventory(BasePermission):
    """The API's default (the root, the schema and its docs): nothing for a user who may see nothing."""

    message = "Only users who may see the inventory can use the API."

    def has_permission(self, request, view) -> bool:
        return user_can_view_inventory(request.user)


class CanViewInventoryOrAdministrator(BasePermission):
    """Inventory reads for whoever may see the inventory; writes (pools) for Administrators."""

    message = "Only members of the Administrators group can add, change or remove pools."

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return user_can_view_inventory(request.user)
        return user_is_administrator(request.user)


class IsAdministratorOrReadOnly(BasePermission):
    """Reads for Administrators and Operators; writes for Administrators only."""

    message = "Only members of the Administrators group can change protection."

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return user_can_view(request.user)
        return user_can_change_protection(request.user)


class CanView(BasePermission):
    message = "Only Administrators and Operators can see protection and alerts."

    def has_permission(self, request, view) -> bool:
        return user_can_view(request.user)


class CanAcknowledge(BasePermission):
    message = "Only Administrators and Operators can acknowledge alerts."

    def has_permission(self, request, view) -> bool:
        return user_can_acknowledge(request.user)
