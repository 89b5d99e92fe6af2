"""VIF, VBD and VDI create / destroy, with xapi's checks and error codes (ocaml/xapi/xapi_{vif,vbd,vdi}*.ml).

Simplified where the simulator has nothing to act on: a device made for a running VM is not plugged (xapi does
not plug it either; ``VIF.plug`` / ``VBD.plug`` are not simulated), a VDI is "made" by the SR's accounting (and on
the live bed by an image, ``Engine.storage_hook``), and storage never fills.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .datamodel import CLASSES, NULL_REF
from .errors import XapiError, handle_invalid
from .storage import destroy_vdi, new_vdi
from .vmstate import update_vm

if TYPE_CHECKING:
    from .api import Registry
    from .engine import Ctx

MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
DEVICE = re.compile(r"[0-9]+")
VBD_MODES = ("RO", "RW")
VBD_TYPES = ("CD", "Disk", "Floppy")
VDI_TYPES = ("system", "user", "ephemeral", "suspend", "crashdump", "ha_statefile", "metadata", "redo_log", "rrd",
             "pvs_cache", "cbt_metadata")


def _field(args: dict[str, Any], cls: str, name: str, kind: str, *, required: bool = True) -> Any:
    """One field of a constructor's record argument: xapi names a missing one, and a wrong type."""
    if name not in args:
        if required:
            raise XapiError("FIELD_TYPE_ERROR", name)
        return CLASSES[cls].defaults()[name]
    value = args[name]
    if kind == "string":
        if isinstance(value, (dict, list, bool)):
            raise XapiError("FIELD_TYPE_ERROR", name)
        return str(value)
    if kind == "int":
        if isinstance(value, bool):
            raise XapiError("FIELD_TYPE_ERROR", name)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise XapiError("FIELD_TYPE_ERROR", name) from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise XapiError("FIELD_TYPE_ERROR", name)
    if kind == "map":
        if not isinstance(value, dict):
            raise XapiError("FIELD_TYPE_ERROR", name)
        return {str(k): str(v) for k, v in value.items()}
    raise ValueError(kind)


def _ref(ctx: Ctx, args: dict[str, Any], cls: str, name: str, *, optional: bool = False) -> str:
    ref = str(args.get(name, "") or "")
    if optional and ref in ("", NULL_REF):
        return NULL_REF
    if name not in args and not optional:
        raise XapiError("FIELD_TYPE_ERROR", name)
    if not ctx.store.exists(cls, ref):
        raise handle_invalid(cls, ref)
    return ref


# -- VIF ---------------------------------------------------------------------------


def vif_create(ctx: Ctx, args: dict[str, Any]) -> str:
    s = ctx.store
    with ctx.engine.lock:
        device = _field(args, "VIF", "device", "string")
        network = _ref(ctx, args, "network", "network")
        vm = _ref(ctx, args, "VM", "VM")
        mac = _field(args, "VIF", "MAC", "string")
        mtu = _field(args, "VIF", "MTU", "int")
        other_config = _field(args, "VIF", "other_config", "map")
        qos_type = _field(args, "VIF", "qos_algorithm_type", "string")
        qos_params = _field(args, "VIF", "qos_algorithm_params", "map")
        locking_mode = _field(args, "VIF", "locking_mode", "string", required=False)
        if not DEVICE.fullmatch(device):
            raise XapiError("INVALID_DEVICE", device)
        if not MAC.fullmatch(mac):
            raise XapiError("MAC_INVALID", mac)
        if any(int(s.tables["VIF"][v]["device"]) == int(device) for v in s.tables["VM"][vm]["VIFs"]):
            raise XapiError("DEVICE_ALREADY_EXISTS", device)
        ref = s.create(
            "VIF",
            {
                "device": device,
                "network": network,
                "VM": vm,
                "MAC": mac.lower(),
                "MTU": mtu,
                "other_config": other_config,
                "qos_algorithm_type": qos_type,
                "qos_algorithm_params": qos_params,
                "locking_mode": locking_mode,
                "currently_attached": False,
            },
        )
        s.set_add(network, "VIFs", ref)
        s.set_add(vm, "VIFs", ref)
        update_vm(ctx.engine, vm, {})
        return ref


def vif_destroy(ctx: Ctx, vif: str) -> None:
    s = ctx.store
    with ctx.engine.lock:
        rec = s.rec("VIF", vif)
        vm = rec["VM"]
        running = s.exists("VM", vm) and s.tables["VM"][vm]["power_state"] in ("Running", "Paused")
        if running and rec["currently_attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "VIF currently attached to a running VM")
        if s.exists("network", rec["network"]):
            s.set_remove(rec["network"], "VIFs", vif)
        if s.exists("VM", vm):
            s.set_remove(vm, "VIFs", vif)
        s.destroy(vif)


# -- VBD ---------------------------------------------------------------------------


def vbd_create(ctx: Ctx, args: dict[str, Any]) -> str:
    s = ctx.store
    with ctx.engine.lock:
        vm = _ref(ctx, args, "VM", "VM")
        empty = _field(args, "VBD", "empty", "bool")
        vdi = _ref(ctx, args, "VDI", "VDI", optional=empty)
        userdevice = _field(args, "VBD", "userdevice", "string")
        bootable = _field(args, "VBD", "bootable", "bool")
        mode = _field(args, "VBD", "mode", "string")
        vtype = _field(args, "VBD", "type", "string")
        unpluggable = _field(args, "VBD", "unpluggable", "bool")
        other_config = _field(args, "VBD", "other_config", "map")
        qos_type = _field(args, "VBD", "qos_algorithm_type", "string")
        qos_params = _field(args, "VBD", "qos_algorithm_params", "map")
        if mode not in VBD_MODES:
            raise XapiError("FIELD_TYPE_ERROR", "mode")
        if vtype not in VBD_TYPES:
            raise XapiError("FIELD_TYPE_ERROR", "type")
        if vdi != NULL_REF:
            vdi_type = s.tables["VDI"][vdi]["type"]
            if vdi_type not in ("system", "user", "ephemeral", "suspend", "crashdump", "metadata"):
                raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, vdi_type)
        if vtype == "CD" and mode != "RO":
            raise XapiError("VBD_CDS_MUST_BE_READONLY")
        if vtype != "CD" and empty:
            raise XapiError("VBD_NOT_REMOVABLE_MEDIA", "in constructor")
        if vdi != NULL_REF and mode == "RW" and s.tables["VDI"][vdi]["read_only"]:
            raise XapiError("VDI_READONLY", vdi)
        current = s.tables["VM"][vm]["current_operations"]
        if current:
            task, op = next(iter(current.items()))
            raise XapiError("OTHER_OPERATION_IN_PROGRESS", "VM", vm, op, task)
        used = {s.tables["VBD"][b]["userdevice"] for b in s.tables["VM"][vm]["VBDs"]}
        if userdevice == "autodetect":
            userdevice = next(str(n) for n in range(256) if str(n) not in used)
        elif not DEVICE.fullmatch(userdevice):
            raise XapiError("INVALID_DEVICE", userdevice)
        elif userdevice in used:
            raise XapiError("DEVICE_ALREADY_EXISTS", userdevice)
        ref = s.create(
            "VBD",
            {
                "VM": vm,
                "VDI": vdi,
                "userdevice": userdevice,
                "device": "",
                "bootable": bootable,
                "mode": mode,
                "type": vtype,
                "unpluggable": unpluggable,
                "empty": empty,
                "other_config": other_config,
                "qos_algorithm_type": qos_type,
                "qos_algorithm_params": qos_params,
                "currently_attached": False,
            },
        )
        if vdi != NULL_REF:
            s.set_add(vdi, "VBDs", ref)
        s.set_add(vm, "VBDs", ref)
        update_vm(ctx.engine, vm, {})
        return ref


def vbd_destroy(ctx: Ctx, vbd: str) -> None:
    s = ctx.store
    with ctx.engine.lock:
        rec = s.rec("VBD", vbd)
        if rec["currently_attached"]:
            vm_uuid = s.tables["VM"][rec["VM"]]["uuid"] if s.exists("VM", rec["VM"]) else ""
            raise XapiError("OPERATION_NOT_ALLOWED", f"VBD '{rec['uuid']}' still attached to '{vm_uuid}'")
        _forget_vbd(ctx, vbd)


def _forget_vbd(ctx: Ctx, vbd: str) -> None:
    s = ctx.store
    rec = s.tables["VBD"][vbd]
    if s.exists("VDI", rec["VDI"]):
        s.set_remove(rec["VDI"], "VBDs", vbd)
    if s.exists("VM", rec["VM"]):
        s.set_remove(rec["VM"], "VBDs", vbd)
    s.destroy(vbd)


# -- VDI ---------------------------------------------------------------------------


def _pbd_plugged(ctx: Ctx, sr: str) -> bool:
    s = ctx.store
    return any(s.tables["PBD"][p]["currently_attached"] for p in s.tables["SR"][sr]["PBDs"])


def vdi_create(ctx: Ctx, args: dict[str, Any]) -> str:
    s = ctx.store
    with ctx.engine.lock:
        sr = _ref(ctx, args, "SR", "SR")
        name = _field(args, "VDI", "name_label", "string")
        description = _field(args, "VDI", "name_description", "string")
        size = _field(args, "VDI", "virtual_size", "int")
        vtype = _field(args, "VDI", "type", "string")
        sharable = _field(args, "VDI", "sharable", "bool")
        read_only = _field(args, "VDI", "read_only", "bool")
        other_config = _field(args, "VDI", "other_config", "map")
        xenstore_data = _field(args, "VDI", "xenstore_data", "map", required=False)
        sm_config = _field(args, "VDI", "sm_config", "map", required=False)
        tags = args.get("tags", [])
        if vtype not in VDI_TYPES:
            raise XapiError("FIELD_TYPE_ERROR", "type")
        if vtype == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", "", vtype)
        if not isinstance(tags, list):
            raise XapiError("FIELD_TYPE_ERROR", "tags")
        if size < 0:
            raise XapiError("INVALID_VALUE", "virtual_size", size)
        if not _pbd_plugged(ctx, sr):
            raise XapiError("SR_NO_PBDS", sr)
        if s.tables["SR"][sr]["content_type"] == "iso":
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
        return new_vdi(
            ctx.engine, sr, name, size, vtype=vtype, name_description=description, sharable=sharable,
            read_only=read_only, other_config=other_config, xenstore_data=xenstore_data, sm_config=sm_config,
            tags=[str(t) for t in tags],
        )


def vdi_destroy(ctx: Ctx, vdi: str) -> None:
    s = ctx.store
    with ctx.engine.lock:
        rec = s.rec("VDI", vdi)
        if not _pbd_plugged(ctx, rec["SR"]):
            raise XapiError("SR_NO_PBDS", rec["SR"])
        if not rec["managed"]:
            raise XapiError("VDI_NOT_MANAGED", vdi)
        vbds = list(rec["VBDs"])
        if any(s.tables["VBD"][b]["currently_attached"] for b in vbds if s.exists("VBD", b)):
            raise XapiError("VDI_IN_USE", vdi, "destroy")
        destroy_vdi(ctx.engine, vdi)
        for vbd in vbds:  # as xapi: the VBDs go now, not at the next garbage collection
            if s.exists("VBD", vbd):
                _forget_vbd(ctx, vbd)
        for vm, vm_rec in s.tables["VM"].items():
            if vm_rec["suspend_VDI"] == vdi:
                update_vm(ctx.engine, vm, {"suspend_VDI": NULL_REF})


def register(reg: Registry) -> None:
    reg.add("VIF.create", [("args", "map")], vif_create)
    reg.add("VIF.destroy", [("self", "ref:VIF")], vif_destroy)
    reg.add("VBD.create", [("args", "map")], vbd_create)
    reg.add("VBD.destroy", [("self", "ref:VBD")], vbd_destroy)
    reg.add("VDI.create", [("args", "map")], vdi_create)
    reg.add("VDI.destroy", [("self", "ref:VDI")], vdi_destroy)
