"""Writes of the inventory: registering pools, the watcher's connection state, and VM power actions.

Inventory rows themselves are written by the watcher only, through ``inventory.sync``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import URLValidator
from django.db import transaction

from eac.audit import AuditAction, audit_record
from eac.errors import Conflict
from eac.permissions import user_can_change_protection
from eac.realtime import emit, emit_many, inventory_change, pools_change

from .choices import ConnectionState, PowerState
from .models import VM, Pool
from .selectors import xapi_error_describe
from .xapi import XapiAuthError, XapiError, XapiUnreachable, connect, pool_client, safe_url

log = logging.getLogger(__name__)

# A connection test should answer quickly; a user is waiting for the form.
PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class PoolProbe:
    """What a successful connection test found: the pool and where its master is."""

    url: str
    username: str
    verify_tls: bool
    master_url: str
    uuid: str
    ref: str
    name_label: str


def _validate_url(url: str) -> str:
    url = (url or "").strip()
    if not url:
        raise ValidationError({"url": "Give the URL of the pool master, e.g. https://xcp-master.example.org."})
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise ValidationError({"url": f"{safe_url(url)} is not a valid http:// or https:// URL."}) from None
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValidationError({"url": "Put the user name and password in their own fields, not in the URL."})
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValidationError({"url": "Give the host's address only (scheme, host and port), without a path."})
    return url.rstrip("/")


def pool_probe(*, url: str, username: str, password: str, verify_tls: bool = True,
               timeout: float = PROBE_TIMEOUT) -> PoolProbe:
    """Log in to the pool (following HOST_IS_SLAVE), read its identity, log out.

    Raises ValidationError with a sentence saying what went wrong: nothing
    answers, the certificate, the credentials, or what XAPI refused.
    """
    url = _validate_url(url)
    if not username:
        raise ValidationError({"username": "Give the user name to log in to the pool with."})
    if not password:
        raise ValidationError({"password": "Give the password of that user."})
    try:
        with connect(url, username, password, verify_tls=verify_tls, timeout=timeout) as client:
            pool_ref = client.call("pool.get_all")[0]
            record = client.call("pool.get_record", pool_ref)
            master_url = client.url
    except XapiAuthError as exc:
        raise ValidationError({"password": f"Could not log in to {safe_url(url)}: {exc.describe()}"}) from None
    except XapiUnreachable as exc:
        raise ValidationError({"url": f"Could not connect: {exc.describe()}"}) from None
    except XapiError as exc:
        raise ValidationError({"url": f"Could not connect to {safe_url(url)}: {exc.describe()}"}) from None
    except IndexError:
        raise ValidationError({"url": f"{safe_url(url)} answered, but has no pool."}) from None
    return PoolProbe(url=url, username=username, verify_tls=verify_tls, master_url=master_url,
                     uuid=str(record.get("uuid", "")), ref=pool_ref, name_label=str(record.get("name_label", "")))


def _check_unique(*, name: str | None, uuid: str | None, exclude_pk: int | None) -> None:
    others = Pool.objects.exclude(pk=exclude_pk) if exclude_pk else Pool.objects.all()
    if name is not None and others.filter(name=name).exists():
        raise ValidationError({"name": f"A pool named {name!r} exists already."})
    if uuid:
        twin = others.filter(uuid=uuid).first()
        if twin is not None:
            raise ValidationError({"url": f"This pool is already registered, as {twin.name!r}."})


def _announce(uuid: str, op: str, *, listing: bool = True) -> None:
    """Tell the pages showing the pool (its group); with ``listing`` (registered, changed, removed), every open
    page too, first: a page whose user may see a pool it does not show yet joins its group and resyncs."""
    if uuid:
        listed = [pools_change(pool=uuid, op=op)] if listing else []
        emit_many([*listed, inventory_change(pool=uuid, cls="pool", uuid=uuid, op=op)])


def pool_create(*, name: str, url: str, username: str, password: str, verify_tls: bool = True,
                probe: PoolProbe | None = None) -> Pool:
    """Register a pool after testing the connection (ValidationError if it fails); the watcher picks it up.

    ``probe``: a connection test just done for exactly these url/username/verify_tls (the admin form's)."""
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "Give the pool a name."})
    if len(name) > Pool._meta.get_field("name").max_length:
        raise ValidationError({"name": "The name is too long (200 characters at most)."})
    url = _validate_url(url)
    _check_unique(name=name, uuid=None, exclude_pk=None)
    if probe is None or (probe.url, probe.username, probe.verify_tls) != (url, username, verify_tls):
        probe = pool_probe(url=url, username=username, password=password, verify_tls=verify_tls)
    with transaction.atomic():
        _check_unique(name=name, uuid=probe.uuid, exclude_pk=None)
        pool = Pool.objects.create(
            name=name, url=url, username=username, password=password, verify_tls=verify_tls,
            uuid=probe.uuid, ref=probe.ref, name_label=probe.name_label, master_url=probe.master_url,
        )
        _announce(pool.uuid, "add")
    log.info("pool %s added (uuid %s, master %s)", pool.name, pool.uuid, safe_url(pool.master_url))
    return pool


def pool_update(*, pool: Pool, name: str | None = None, url: str | None = None, username: str | None = None,
                password: str | None = None, verify_tls: bool | None = None,
                probe: PoolProbe | None = None) -> Pool:
    """Change a pool's name or connection; ``None`` (and an empty password) keeps the current value.

    A changed URL, user, password or TLS setting is tested before it is saved
    and must lead to the same pool (same uuid).  The watcher reconnects with it.
    """
    current = Pool.objects.get(pk=pool.pk)
    new_name = current.name if name is None else name.strip()
    if not new_name:
        raise ValidationError({"name": "Give the pool a name."})
    if len(new_name) > Pool._meta.get_field("name").max_length:
        raise ValidationError({"name": "The name is too long (200 characters at most)."})
    new_url = current.url if url is None else _validate_url(url)
    new_username = current.username if username is None else username
    new_password = password or current.password
    new_verify = current.verify_tls if verify_tls is None else verify_tls
    _check_unique(name=new_name, uuid=None, exclude_pk=current.pk)

    connection_changed = (new_url, new_username, new_password, new_verify) != (
        current.url, current.username, current.password, current.verify_tls)
    if connection_changed:
        # Tested outside the transaction: a slow pool must not hold a row lock.
        if probe is None or (probe.url, probe.username, probe.verify_tls) != (new_url, new_username, new_verify):
            probe = pool_probe(url=new_url, username=new_username, password=new_password, verify_tls=new_verify)
        if current.uuid and probe.uuid != current.uuid:
            raise ValidationError({"url": f"{safe_url(new_url)} leads to another pool "
                                          f"({probe.name_label or probe.uuid}); add it as a new pool instead."})

    with transaction.atomic():
        current = Pool.objects.select_for_update().get(pk=pool.pk)
        _check_unique(name=new_name, uuid=probe.uuid if probe else None, exclude_pk=current.pk)
        if connection_changed and probe is not None:
            current.uuid, current.ref, current.name_label = probe.uuid, probe.ref, probe.name_label
            current.master_url = probe.master_url
            current.last_error = ""
        current.name, current.url, current.username = new_name, new_url, new_username
        current.password, current.verify_tls = new_password, new_verify
        current.save()
        _announce(current.uuid, "mod")
    # The caller's instance reflects what was saved.
    for f in Pool._meta.concrete_fields:
        setattr(pool, f.attname, getattr(current, f.attname))
    log.info("pool %s updated%s", current.name, " (connection changed)" if connection_changed else "")
    return pool


def pool_delete(*, pool: Pool) -> None:
    """Forget a pool and everything mirrored from it; its watcher thread stops."""
    uuid, name = pool.uuid, pool.name
    with transaction.atomic():
        pool.delete()
        _announce(uuid, "del")
    log.info("pool %s deleted", name)


def pool_connection_state_set(*, pool: Pool, state: str, error: str = "") -> bool:
    """Record how the watcher's connection to ``pool`` is doing; announce a change.  Returns whether it changed.

    ``error`` is a sentence for the administrator (XapiError.describe()), never a secret."""
    if state not in ConnectionState.values:
        raise ValueError(f"unknown connection state {state!r}")
    if pool.connection_state == state and pool.last_error == error:
        return False
    with transaction.atomic():
        updated = Pool.objects.filter(pk=pool.pk).update(connection_state=state, last_error=error)
        pool.connection_state, pool.last_error = state, error
        if updated:
            _announce(pool.uuid, "mod", listing=False)  # the pages showing it re-render its labels
    return bool(updated)


# -- power actions on a VM ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerAction:
    method: str  # the XAPI call
    args: tuple  # after the VM's ref
    from_state: str  # the power state the action applies to
    audit: str  # AuditAction of the request


# VM.start(vm, start_paused, force): force=False, so XAPI keeps its checks (the failover plan among them).
POWER_ACTIONS: dict[str, PowerAction] = {
    "start": PowerAction("VM.start", (False, False), PowerState.HALTED, AuditAction.VM_START),
    "shutdown": PowerAction("VM.clean_shutdown", (), PowerState.RUNNING, AuditAction.VM_SHUTDOWN),
}


def vm_power_request(*, vm: VM, action: str, requested_by, via: str = "ui",
                     remote_addr: str | None = None) -> None:
    """Ask a worker to start or cleanly shut down ``vm`` (the web never calls XAPI in a request).

    Administrators only. The request is refused at once when the VM is not in the state the action
    applies to (as the console last saw it); XAPI may still refuse it, and the worker records why.
    """
    if not user_can_change_protection(requested_by):
        raise PermissionDenied("Only members of the Administrators group can start or shut down VMs.")
    spec = POWER_ACTIONS.get(action)
    if spec is None:
        raise ValidationError({"action": f"Unknown action {action[:40]!r}: use one of {', '.join(POWER_ACTIONS)}."})
    if vm.power_state != spec.from_state:
        raise Conflict(f"{vm.name_label} is {vm.power_state.lower()}: it can be "
                       f"{'started' if action == 'start' else 'shut down'} only when {spec.from_state.lower()}.")
    from .tasks import vm_power as vm_power_task

    with transaction.atomic():
        audit_record(user=requested_by, action=spec.audit, via=via, remote_addr=remote_addr, pool=vm.pool, vm=vm)
        _announce_vm(vm)  # the page's events list shows the request
        vm_power_task.delay_on_commit(vm_id=vm.pk, action=action, requested_by_id=requested_by.pk)


def vm_power(*, vm_id: int, action: str, requested_by_id: int | None) -> str:
    """Run a power action on XAPI (in a worker). A refusal is written to the audit log as a sentence
    and the VM's page re-rendered, so the Administrator reads why; success shows through the watcher."""
    from django.contrib.auth import get_user_model

    vm = VM.objects.select_related("pool").filter(pk=vm_id).first()
    if vm is None:
        return "gone"
    spec = POWER_ACTIONS[action]
    try:
        with pool_client(vm.pool) as client:
            client.call(spec.method, vm.ref, *spec.args)
    except XapiError as exc:
        code, sentence = xapi_error_describe(exc, vm.pool)
        log.info("vm power: %s of %s refused: %s", action, vm.name_label, code)
        user = get_user_model().objects.filter(pk=requested_by_id).first() if requested_by_id else None
        with transaction.atomic():
            audit_record(user=user, action=AuditAction.VM_POWER_REFUSED, via="system", pool=vm.pool, vm=vm,
                         detail={"action": action, "code": code, "message": sentence})
            _announce_vm(vm)
        return code
    return "ok"


def _announce_vm(vm: VM) -> None:
    emit(inventory_change(pool=vm.pool.uuid, cls="vm", uuid=vm.uuid))
