"""How each XAPI class the inventory mirrors maps to a model: declarative specs built from model metadata.

A ``Spec`` pairs a class with its model and a value function that turns a XAPI record into the
model's columns; ``_prepare_specs`` fills in, from each model's fields, which columns to update, where
strings are cut, which columns Django dates and which hold JSON.  ``RECORD_FIELDS`` names the fields
the value functions read, so that only those are decoded from XAPI's answers.  ``inventory.sync``
writes the rows.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import models

from .models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network

if TYPE_CHECKING:
    from .sync import PoolMirror


# Event class (lower case, as event.from names them) -> XAPI class name (for <Class>.get_all_records).
XAPI_CLASSES: dict[str, str] = {
    "pool": "pool",
    "host": "host",
    "host_metrics": "host_metrics",
    "sr": "SR",
    "pbd": "PBD",
    "network": "network",
    "pif": "PIF",
    "pif_metrics": "PIF_metrics",
    "vm": "VM",
    "vdi": "VDI",
    "vbd": "VBD",
    "vif": "VIF",
}
EVENT_CLASSES: list[str] = list(XAPI_CLASSES)
# The fields of each class the mirror reads: only these are decoded from XAPI's answers (a VM record has
# over a hundred).  Keep in step with the value functions below (a test checks it).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "pool": ("uuid", "name_label", "master", "ha_enabled", "ha_host_failures_to_tolerate", "ha_plan_exists_for",
             "ha_overcommitted", "ha_allow_overcommit", "ha_configuration"),
    "host": ("uuid", "name_label", "name_description", "address", "hostname", "enabled", "cpu_info", "metrics",
             "other_config"),
    "host_metrics": ("uuid", "live", "memory_total", "memory_free", "last_updated"),
    "sr": ("uuid", "name_label", "name_description", "type", "content_type", "shared", "physical_size",
           "physical_utilisation"),
    "pbd": ("uuid", "host", "SR", "currently_attached"),
    "network": ("uuid", "name_label", "name_description", "bridge", "MTU"),
    "pif": ("uuid", "host", "network", "device", "MAC", "IP", "management", "currently_attached", "metrics"),
    "pif_metrics": ("uuid", "carrier"),
    "vm": ("uuid", "name_label", "name_description", "power_state", "resident_on", "affinity", "memory_static_max",
           "memory_dynamic_min", "memory_dynamic_max", "memory_overhead", "VCPUs_max", "is_a_template",
           "is_control_domain", "is_a_snapshot", "ha_restart_priority", "order", "start_delay", "current_operations",
           "metrics"),
    "vdi": ("uuid", "name_label", "name_description", "SR", "virtual_size", "physical_utilisation", "type",
            "sharable", "read_only"),
    "vbd": ("uuid", "VM", "VDI", "device", "userdevice", "type", "mode", "bootable", "currently_attached"),
    "vif": ("uuid", "VM", "network", "device", "MAC", "currently_attached"),
}


# -- value conversion --------------------------------------------------------------------------
# XML-RPC carries XAPI's 64-bit ints as strings, JSON-RPC as numbers: accept both.


def to_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("true", "1")


def to_datetime(value: Any) -> dt.datetime | None:
    """An XAPI dateTime (``YYYYMMDDTHH:MM:SSZ``, as XML-RPC's DateTime or JSON-RPC's string), or None."""
    text = str(value or "").strip()
    for fmt in ("%Y%m%dT%H:%M:%SZ", "%Y%m%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            stamp = dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
        return stamp if stamp.year > 1970 else None  # xapi's "never" is the epoch
    return None


def to_str(value: Any) -> str:
    return "" if value is None else str(value)


def to_map(value: Any) -> dict:
    return dict(value) if isinstance(value, dict) else {}


@dataclass
class Spec:
    """How one XAPI class maps to a model: ``values(mirror, ref, record)`` gives every stored column
    but pool/uuid/ref (foreign keys already resolved to pks), always in the same order."""

    cls: str
    model: type[models.Model]
    values: Callable[[PoolMirror, str, dict], dict[str, Any]]
    update_fields: list[str] = field(default_factory=list)
    truncate: dict[str, int] = field(default_factory=dict)
    auto_now: list[str] = field(default_factory=list)  # columns Django sets to now() on save
    defaults: dict[str, Any] = field(default_factory=dict)  # every other column, with its default
    json_columns: set[str] = field(default_factory=set)
    # Columns that move all the time whatever else happens (a host's free memory, its last heartbeat): a row whose
    # change is in these alone is written and shown, but is no change of state for protection to judge (on a busy
    # pool every VM started or stopped changes its host's free memory; judging the whole pool each time cost the
    # watcher a dozen queries a batch).
    telemetry: frozenset[str] = frozenset()

    def telemetry_only(self, values: dict[str, Any], old: tuple) -> bool:
        """Do ``values`` differ from the row's ``old`` values in telemetry columns only?"""
        return all(a == b or column in self.telemetry for (column, a), b in zip(values.items(), old, strict=True))


def _host_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    live, total, free, heard = m.host_metrics.get(r.get("metrics", ""), (False, 0, 0, None))
    other_config = to_map(r.get("other_config"))
    return {
        "name_label": to_str(r.get("name_label")),
        "name_description": to_str(r.get("name_description")),
        "address": to_str(r.get("address")),
        "hostname": to_str(r.get("hostname")),
        "enabled": to_bool(r.get("enabled")),
        "live": live,
        "last_heard_at": heard,
        "is_master": ref == m.master_ref,
        "memory_total": total,
        "memory_free": free,
        "cpu_count": to_int(to_map(r.get("cpu_info")).get("cpu_count")),
        "metrics_ref": to_str(r.get("metrics")),
        # Written by whoever installs the AM (docs/level2.md); only these two keys are kept.
        "am_url": to_str(other_config.get("eac_am_url")),
        "am_peer": to_str(other_config.get("eac_am_peer")),
    }


def _sr_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "name_label": to_str(r.get("name_label")),
        "name_description": to_str(r.get("name_description")),
        "type": to_str(r.get("type")),
        "content_type": to_str(r.get("content_type")),
        "shared": to_bool(r.get("shared")),
        "physical_size": to_int(r.get("physical_size")),
        "physical_utilisation": to_int(r.get("physical_utilisation")),
    }


def _pbd_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "host_id": m.resolve("host", r.get("host"), "pbd", ref, "host_id"),
        "sr_id": m.resolve("sr", r.get("SR"), "pbd", ref, "sr_id"),
        "currently_attached": to_bool(r.get("currently_attached")),
    }


def _network_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "name_label": to_str(r.get("name_label")),
        "name_description": to_str(r.get("name_description")),
        "bridge": to_str(r.get("bridge")),
        "mtu": to_int(r.get("MTU") or 1500),
    }


def _pif_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "host_id": m.resolve("host", r.get("host"), "pif", ref, "host_id"),
        "network_id": m.resolve("network", r.get("network"), "pif", ref, "network_id"),
        "device": to_str(r.get("device")),
        "mac": to_str(r.get("MAC")),
        "ip": to_str(r.get("IP")),
        "management": to_bool(r.get("management")),
        "currently_attached": to_bool(r.get("currently_attached")),
        "carrier": m.pif_metrics.get(r.get("metrics", ""), False),
        "metrics_ref": to_str(r.get("metrics")),
    }


def _vm_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "name_label": to_str(r.get("name_label")),
        "name_description": to_str(r.get("name_description")),
        "power_state": to_str(r.get("power_state")) or "Halted",
        "resident_on_id": m.resolve("host", r.get("resident_on"), "vm", ref, "resident_on_id"),
        "affinity_id": m.resolve("host", r.get("affinity"), "vm", ref, "affinity_id"),
        "memory_static_max": to_int(r.get("memory_static_max")),
        "memory_dynamic_min": to_int(r.get("memory_dynamic_min")),
        "memory_dynamic_max": to_int(r.get("memory_dynamic_max")),
        "memory_overhead": to_int(r.get("memory_overhead")),
        "vcpus_max": to_int(r.get("VCPUs_max")),
        "is_a_template": to_bool(r.get("is_a_template")),
        "is_control_domain": to_bool(r.get("is_control_domain")),
        "is_a_snapshot": to_bool(r.get("is_a_snapshot")),
        "ha_restart_priority": to_str(r.get("ha_restart_priority")),
        "order": to_int(r.get("order")),
        "start_delay": to_int(r.get("start_delay")),
        "current_operations": to_map(r.get("current_operations")),
        "metrics_ref": to_str(r.get("metrics")),
    }


def _vdi_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "name_label": to_str(r.get("name_label")),
        "name_description": to_str(r.get("name_description")),
        "sr_id": m.resolve("sr", r.get("SR"), "vdi", ref, "sr_id"),
        "virtual_size": to_int(r.get("virtual_size")),
        "physical_utilisation": to_int(r.get("physical_utilisation")),
        "type": to_str(r.get("type")),
        "sharable": to_bool(r.get("sharable")),
        "read_only": to_bool(r.get("read_only")),
    }


def _vbd_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "vm_id": m.resolve("vm", r.get("VM"), "vbd", ref, "vm_id"),
        "vdi_id": m.resolve("vdi", r.get("VDI"), "vbd", ref, "vdi_id"),
        "device": to_str(r.get("device")),
        "userdevice": to_str(r.get("userdevice")),
        "type": to_str(r.get("type")),
        "mode": to_str(r.get("mode")),
        "bootable": to_bool(r.get("bootable")),
        "currently_attached": to_bool(r.get("currently_attached")),
    }


def _vif_values(m: PoolMirror, ref: str, r: dict) -> dict[str, Any]:
    return {
        "vm_id": m.resolve("vm", r.get("VM"), "vif", ref, "vm_id"),
        "network_id": m.resolve("network", r.get("network"), "vif", ref, "network_id"),
        "device": to_str(r.get("device")),
        "mac": to_str(r.get("MAC")),
        "currently_attached": to_bool(r.get("currently_attached")),
    }


# Parents before children: a child's foreign keys resolve against rows written just before.
SPECS: list[Spec] = [
    Spec("host", Host, _host_values, telemetry=frozenset({"memory_free", "last_heard_at"})),
    Spec("sr", SR, _sr_values),
    Spec("network", Network, _network_values),
    Spec("vm", VM, _vm_values),
    Spec("vdi", VDI, _vdi_values),
    Spec("pbd", PBD, _pbd_values),
    Spec("pif", PIF, _pif_values),
    Spec("vbd", VBD, _vbd_values),
    Spec("vif", VIF, _vif_values),
]
SPEC_BY_CLASS = {spec.cls: spec for spec in SPECS}


def _prepare_specs() -> None:
    for spec in SPECS:
        fields = [f for f in spec.model._meta.concrete_fields if not f.primary_key]
        spec.update_fields = [f.name for f in fields if f.name not in ("pool", "uuid")]
        spec.truncate = {
            f.attname: f.max_length for f in fields if isinstance(f, models.CharField) and f.max_length
        }
        spec.auto_now = [f.attname for f in fields if getattr(f, "auto_now", False)]
        spec.defaults = {f.attname: f.get_default() for f in fields
                         if f.attname not in ("pool_id", "uuid", "ref") and f.attname not in spec.auto_now}
        spec.json_columns = {f.attname for f in fields if isinstance(f, models.JSONField)}


_prepare_specs()
