"""The audit log: one line per change a person (or the console itself) made, with where it came from."""
from __future__ import annotations

from django.db.models import QuerySet

from .choices import AuditAction
from .models import AuditEntry

__all__ = ["AuditAction", "AuditEntry", "audit_list", "audit_record"]


def audit_record(
    *,
    user,
    action: str,
    via: str = "system",
    remote_addr: str | None = None,
    pool=None,
    vm=None,
    object_repr: str = "",
    detail: dict | None = None,
) -> AuditEntry:
    """Write one line of the audit log: who, what, when, from where (inside the caller's transaction)."""
    real_user = user if getattr(user, "is_authenticated", False) else None
    return AuditEntry.objects.create(
        user=real_user,
        username=real_user.get_username() if real_user else "",
        action=action,
        via=via,
        remote_addr=remote_addr or None,
        pool=pool,
        vm=vm,
        object_repr=(object_repr or str(vm or pool or ""))[:255],
        detail=detail or {},
    )


def audit_list() -> QuerySet[AuditEntry]:
    return AuditEntry.objects.select_related("pool", "vm", "user")
