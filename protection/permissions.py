"""Who may do what: Administrators change protection, Operators watch and acknowledge.

Both are plain Django groups (created by a migration) so they are managed in
the admin like any other; a superuser counts as an Administrator.
"""
from django.contrib.auth.models import AnonymousUser
from rest_framework.permissions import SAFE_METHODS, BasePermission

ADMINISTRATORS = "Administrators"
OPERATORS = "Operators"


def _groups(user) -> set[str]:
    cache = getattr(user, "_eac_groups", None)
    if cache is None:
        cache = set(user.groups.values_list("name", flat=True))
        user._eac_groups = cache
    return cache


def user_is_administrator(user) -> bool:
    if user is None or isinstance(user, AnonymousUser) or not user.is_authenticated or not user.is_active:
        return False
    return user.is_superuser or ADMINISTRATORS in _groups(user)


def user_is_operator(user) -> bool:
    if user is None or isinstance(user, AnonymousUser) or not user.is_authenticated or not user.is_active:
        return False
    return OPERATORS in _groups(user)


def user_can_view(user) -> bool:
    return user_is_administrator(user) or user_is_operator(user)


def user_can_change_protection(user) -> bool:
    return user_is_administrator(user)


def user_can_acknowledge(user) -> bool:
    return user_is_administrator(user) or user_is_operator(user)


class IsAdministratorOrReadOnly(BasePermission):
    """Read for Administrators and Operators; writes for Administrators only."""

    message = "Only members of the Administrators group can change protection."

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return user_can_view(request.user)
        return user_can_change_protection(request.user)


class CanAcknowledge(BasePermission):
    message = "Only Administrators and Operators can acknowledge alerts."

    def has_permission(self, request, view) -> bool:
        return user_can_acknowledge(request.user)
