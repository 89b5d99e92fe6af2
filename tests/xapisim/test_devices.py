"""VIF, VBD and VDI create / destroy as xapi defines them, and the secondary VM Level 2 makes with them."""

from __future__ import annotations

import pytest
import XenAPI

GiB = 1 << 30


def _vm(api, name: str) -> str:
    return api.VM.get_by_name_label(name)[0]


def _failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as failure:
        call(*args)
    return failure.value.details


def _sr(api, name: str) -> str:
    return api.SR.get_by_name_label(name)[0]


def _network(api) -> str:
    return api.network.get_by_name_label("Pool-wide network associated with eth0")[0]


def _vif(vm: str, network: str, device: str = "0", mac: str = "02:00:00:aa:bb:cc") -> dict:
    return {"device": device, "network": network, "VM": vm, "MAC": mac, "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def _vdi(sr: str, size: int = GiB, **extra) -> dict:
    return {"name_label": "data", "name_description": "", "SR": sr, "virtual_size": str(size), "type": "user",
            "sharable": False, "read_only": False, "other_config": {}, **extra}


def _vbd(vm: str, vdi: str, userdevice: str = "7", **extra) -> dict:
    return {"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": False, "mode": "RW", "type": "Disk",
            "unpluggable": True, "empty": False, "other_config": {}, "qos_algorithm_type": "",
            "qos_algorithm_params": {}, **extra}


def test_a_vif_replaced_with_a_chosen_mac(api):
    vm, network = _vm(api, "dev-sandbox"), _network(api)
    for vif in api.VM.get_VIFs(vm):
        api.VIF.destroy(vif)
    assert api.VM.get_VIFs(vm) == []
    vif = api.VIF.create(_vif(vm, network, mac="02:AA:00:00:00:01"))
    record = api.VIF.get_record(vif)
    assert (record["MAC"], record["device"], record["VM"], record["currently_attached"]) == (
        "02:aa:00:00:00:01", "0", vm, False)
    assert api.VM.get_VIFs(vm) == [vif] and vif in api.network.get_VIFs(network)
    assert _failure(api.VIF.create, _vif(vm, network)) == ["DEVICE_ALREADY_EXISTS", "0"]
    assert _failure(api.VIF.create, _vif(vm, network, "1", mac="02:00:00")) == ["MAC_INVALID", "02:00:00"]
    assert _failure(api.VIF.create, _vif(vm, network, "eth1")) == ["INVALID_DEVICE", "eth1"]
    assert _failure(api.VIF.create, _vif("OpaqueRef:nope", network, "1"))[0] == "HANDLE_INVALID"
    api.VIF.destroy(vif)
    assert vif not in api.VIF.get_all() and vif not in api.network.get_VIFs(network)


def test_a_vif_plugged_in_a_running_vm_cannot_be_destroyed(api):
    vif = api.VM.get_VIFs(_vm(api, "web-01"))[0]
    assert _failure(api.VIF.destroy, vif) == ["OPERATION_NOT_ALLOWED", "VIF currently attached to a running VM"]


def test_a_vdi_made_on_an_sr_counts_there_and_goes_with_its_vbds(api):
    sr, vm = _sr(api, "Local storage xcp-host-2"), _vm(api, "dev-sandbox")
    allocated = int(api.SR.get_virtual_allocation(sr))
    vdi = api.VDI.create(_vdi(sr))
    assert api.VDI.get_SR(vdi) == sr and vdi in api.SR.get_VDIs(sr)
    assert int(api.VDI.get_virtual_size(vdi)) == GiB
    assert int(api.SR.get_virtual_allocation(sr)) == allocated + GiB
    vbd = api.VBD.create(_vbd(vm, vdi))
    assert api.VBD.get_VDI(vbd) == vdi and vbd in api.VM.get_VBDs(vm) and api.VDI.get_VBDs(vdi) == [vbd]
    assert _failure(api.VBD.create, _vbd(vm, vdi))[0] == "DEVICE_ALREADY_EXISTS"
    api.VDI.destroy(vdi)
    assert vdi not in api.VDI.get_all() and vbd not in api.VBD.get_all() and vbd not in api.VM.get_VBDs(vm)
    assert int(api.SR.get_virtual_allocation(sr)) == allocated


def test_vdi_and_vbd_refusals_carry_xapis_codes(api):
    sr, vm = _sr(api, "Local storage xcp-host-2"), _vm(api, "dev-sandbox")
    assert _failure(api.VDI.create, _vdi(sr, type="cbt_metadata")) == ["VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata"]
    assert _failure(api.VDI.create, {"SR": sr})[0] == "FIELD_TYPE_ERROR"
    vdi = api.VDI.create(_vdi(sr))
    assert _failure(api.VBD.create, _vbd(vm, vdi, type="CD")) == ["VBD_CDS_MUST_BE_READONLY"]
    assert _failure(api.VBD.create, _vbd(vm, "OpaqueRef:NULL", empty=True)) == [
        "VBD_NOT_REMOVABLE_MEDIA", "in constructor"]
    assert _failure(api.VBD.create, _vbd(vm, vdi, userdevice="xvdb")) == ["INVALID_DEVICE", "xvdb"]
    vbd = api.VBD.create(_vbd(vm, vdi, userdevice="autodetect"))
    assert api.VBD.get_userdevice(vbd).isdigit()
    api.VBD.destroy(vbd)
    assert api.VDI.get_VBDs(vdi) == [] and vbd not in api.VBD.get_all()
    running_disk = next(b for b in api.VM.get_VBDs(_vm(api, "web-01")) if not api.VBD.get_empty(b))
    assert _failure(api.VBD.destroy, running_disk)[0] == "OPERATION_NOT_ALLOWED"
    assert _failure(api.VDI.destroy, api.VBD.get_VDI(running_disk))[:1] == ["VDI_IN_USE"]


def test_a_running_vm_is_copied_through_a_snapshot_to_a_local_sr(api):
    """docs/level2.md's secondary VM: xapi copies only a halted VM or a snapshot."""
    vm, local = _vm(api, "web-01"), _sr(api, "Local storage xcp-host-2")
    assert _failure(api.VM.copy, vm, "web-01 copy", local)[0] == "VM_BAD_POWER_STATE"
    snap = api.VM.snapshot(vm, "web-01 (eAC seed)")
    copy = api.VM.copy(snap, "web-01 (eAC secondary)", local)
    record = api.VM.get_record(copy)
    assert not record["is_a_snapshot"] and record["is_a_template"]
    api.VM.set_is_a_template(copy, False)
    disks = [api.VBD.get_VDI(b) for b in api.VM.get_VBDs(copy) if not api.VBD.get_empty(b)]
    assert disks and all(api.VDI.get_SR(d) == local for d in disks)
    sizes = sorted(int(api.VDI.get_virtual_size(api.VBD.get_VDI(b))) for b in api.VM.get_VBDs(vm)
                   if not api.VBD.get_empty(b))
    assert sorted(int(api.VDI.get_virtual_size(d)) for d in disks) == sizes
    assert record["other_config"] == api.VM.get_other_config(vm)
    seed_disks = [api.VBD.get_VDI(b) for b in api.VM.get_VBDs(snap) if not api.VBD.get_empty(b)]
    api.VM.destroy(snap)
    for vdi in seed_disks:
        api.VDI.destroy(vdi)
    assert not set(seed_disks) & set(api.VDI.get_all())
    host2 = api.host.get_by_name_label("xcp-host-2")[0]
    api.VM.start_on(copy, host2, True, False)
    assert api.VM.get_power_state(copy) == "Paused" and api.VM.get_resident_on(copy) == host2
