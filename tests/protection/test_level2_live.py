"""Level 2 protect and unprotect on the live test bed (``python -m xapisim --preset demo --live``): XAPI and the
hosts' real AMs, the workflow run by the engine in this process. Root only (namespaces, veths, nftables).

What is checked is what docs/level2.md promises the hosts: the disks routed through the primary's AM while the
VM is paused, the secondary VM a copy with the primary's MACs, paused on the secondary host, both AMs holding the
resource, the replica UpToDate; and unprotect leaving none of it.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from protection import engine, services
from protection.am_client import AMClient, pair_problems
from protection.models import ProtectedDisk, Protection, WorkflowRun
from protection.workflows import RESOURCE_KEY, SECONDARY_SUFFIX
from tests.support import XapisimCommand, dump_logs, register_pool, wait_for, wait_run, xapi_login

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") or Path("/usr/sbin/ip").exists())
    or not (shutil.which("nft") or Path("/usr/sbin/nft").exists()),
    reason="the live bed needs root, ip and nft (network namespaces, veths, nftables)",
)
GiB = 2**30
VM_NAME = "web-01"  # a live guest, running on xcp-host-1, whose AM peer is xcp-host-2


@pytest.fixture
def bed(tmp_path, transactional_db, settings):
    bind = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.1"
    cmd = XapisimCommand("--preset", "demo", "--live", "--port", "0", "--bind", bind, "--op-delay", "0",
                         "--ha-timeout", "1", "--live-dir", str(tmp_path / "bed"), log=tmp_path / "xapisim.log")
    cmd.start()
    live = cmd.control("GET", "/sim/live")
    settings.EAC_AM_TOKEN_FILE = live["hosts"][0]["am"]["token_file"]
    settings.EAC_AM_POLL_INTERVAL = 0.2
    settings.EAC_AM_SYNC_TIMEOUT = 240.0
    settings.EAC_WORKFLOW_RETRY_DELAY = 0.2
    yield cmd
    cmd.stop()


def run_to_end(run) -> str:
    outcome = engine.workflow_run_execute(run_id=run.pk, worker="test")
    run.refresh_from_db()
    return outcome


def guest_disk(bed) -> dict | None:
    guest = next((g for g in bed.control("GET", "/sim/live")["guests"] if g["vm"] == VM_NAME), None)
    return guest and guest["disk"]


def steps_text(run) -> str:
    return "\n".join(f"{s.name}: {s.state} {s.error_code} {s.message}" for s in run.steps.order_by("position"))


def test_level2_protect_then_unprotect_through_the_api_and_a_worker_on_the_live_bed(
    bed, admin_api, console_env, start_proc
):
    session = xapi_login(bed.url)
    api = session.xenapi
    # The VM may run with 1 GiB (its dynamic minimum): the secondary reserves 1.5 GiB of its 2.
    vm_ref = api.VM.get_by_name_label(VM_NAME)[0]
    api.VM.set_memory_dynamic_range(vm_ref, str(GiB), api.VM.get_memory_dynamic_max(vm_ref))
    pool = register_pool(bed)
    vm = pool.vms.get(name_label=VM_NAME)
    primary = vm.resident_on
    if not primary.am_url:
        pytest.skip("the live bed does not write eac_am_url in its hosts' other_config yet (docs/level2.md)")
    secondary = pool.hosts.get(uuid=primary.am_peer)
    primary_macs = sorted(api.VIF.get_MAC(v) for v in api.VM.get_VIFs(vm_ref))
    worker = start_proc("worker", {**console_env, "EAC_AM_TOKEN_FILE": settings.EAC_AM_TOKEN_FILE,
                                   "EAC_AM_POLL_INTERVAL": "0.2", "EAC_AM_SYNC_TIMEOUT": "240"})

    response = admin_api.post("/api/v1/protections/", {"vm": vm.uuid, "level": 2,
                                                       "settings": {"secondary_memory": 3 * GiB // 2}}, format="json")
    assert response.status_code == 202, response.content
    run = wait_run(response.json()["id"], timeout=300)
    assert run.state == "succeeded", f"{steps_text(run)}\n{dump_logs(worker)}"
    assert all(s.state == "done" and s.progress == 1.0 for s in run.steps.all())

    protection = Protection.objects.get(vm=vm)
    assert protection.status == "protected" and protection.secondary_host == secondary
    (disk,) = ProtectedDisk.objects.filter(protection=protection)
    assert disk.resource.startswith("vdi-") and disk.routed and disk.primary_resource and disk.secondary_resource
    assert disk.sync_state == "UpToDate" and disk.sync_progress == 1.0
    vdi_ref = api.VDI.get_by_uuid(disk.primary_vdi_uuid)
    assert api.VDI.get_other_config(vdi_ref)[RESOURCE_KEY] == disk.resource
    assert api.VM.get_power_state(vm_ref) == "Running"
    copy = api.VM.get_by_uuid(protection.secondary_vm_uuid)
    assert api.VM.get_name_label(copy) == VM_NAME + SECONDARY_SUFFIX
    assert api.VM.get_power_state(copy) == "Paused"
    assert int(api.VM.get_memory_dynamic_max(copy)) == 3 * GiB // 2
    assert api.VM.get_resident_on(copy) == api.host.get_by_uuid(secondary.uuid)
    assert sorted(api.VIF.get_MAC(v) for v in api.VM.get_VIFs(copy)) == primary_macs
    replica = api.VDI.get_by_uuid(disk.replica_vdi_uuid)
    assert api.VDI.get_other_config(replica)[RESOURCE_KEY] == disk.resource
    clients = {"primary": AMClient(primary.am_url), "secondary": AMClient(secondary.am_url)}
    assert clients["primary"].resource(disk.resource)["role"] == "Primary"
    assert clients["secondary"].resource(disk.resource)["disk"] == "UpToDate"

    # Every step looks before it acts: the whole run again (a worker that died after each) changes nothing.
    run.steps.update(state="pending", progress=0.0)
    WorkflowRun.objects.filter(pk=run.pk).update(state="pending")
    assert run_to_end(run) == "succeeded", steps_text(run)
    assert len(api.VM.get_by_name_label(VM_NAME + SECONDARY_SUFFIX)) == 1
    assert Protection.objects.get(vm=vm).secondary_vm_uuid == protection.secondary_vm_uuid
    assert api.VM.get_power_state(copy) == "Paused" and api.VM.get_power_state(vm_ref) == "Running"
    assert not api.VM.get_snapshots(vm_ref)  # the snapshot the copy was made from is gone

    # The guest's disk is now the primary AM's export of the resource (the bed follows the routing).
    am_nbd = urlsplit(primary.am_url).hostname + ":10809"
    wait_for(lambda: guest_disk(bed) == {"address": am_nbd, "export": disk.resource},
             timeout=10, message=f"the guest's disk served by the primary's AM (it is {guest_disk(bed)})")
    shown = admin_api.get(f"/api/v1/protections/{protection.pk}/").json()
    assert shown["disks"][0]["sync_state"] == "UpToDate" and shown["secondary_vm_uuid"] == protection.secondary_vm_uuid

    response = admin_api.delete(f"/api/v1/protections/{protection.pk}/")
    assert response.status_code == 202, response.content
    stop = wait_run(response.json()["id"], timeout=120)
    assert stop.state == "succeeded", f"{steps_text(stop)}\n{dump_logs(worker)}"
    assert not Protection.objects.filter(vm=vm).exists()
    assert RESOURCE_KEY not in api.VDI.get_other_config(vdi_ref)
    assert all(c.resource_or_none(disk.resource) is None for c in clients.values())
    assert not api.VM.get_by_name_label(VM_NAME + SECONDARY_SUFFIX)
    assert not [v for v in api.VDI.get_all() if api.VDI.get_uuid(v) == disk.replica_vdi_uuid]
    wait_for(lambda: api.VM.get_power_state(vm_ref) == "Running", message="the VM running after unprotect")
    wait_for(lambda: guest_disk(bed)["export"] != disk.resource, timeout=10,
             message="the guest's disk back on its host's disk server")
    session.xenapi.session.logout()


def test_a_failed_level2_protect_leaves_what_unprotect_cleans(bed, admin_user):
    """The secondary host's memory is taken (after the preflight): the protection does everything up to the
    secondary VM's start, aborts there and says so; unprotect then removes the routing, the replicas and the
    secondary VM it had made."""
    pool = register_pool(bed)
    vm = pool.vms.get(name_label=VM_NAME)
    primary = vm.resident_on
    if not primary.am_url:
        pytest.skip("the live bed does not write eac_am_url in its hosts' other_config yet (docs/level2.md)")
    secondary = pool.hosts.get(uuid=primary.am_peer)
    session = xapi_login(bed.url)
    api = session.xenapi
    vm_ref = api.VM.get_by_uuid(vm.uuid)
    host_ref = api.host.get_by_uuid(secondary.uuid)
    hog = api.VM.clone(api.VM.get_by_name_label("dev-sandbox")[0], "memory-hog")
    size = str(int(api.host.compute_free_memory(host_ref)) - 512 * 2**20)
    api.VM.set_memory_limits(hog, size, size, size, size)
    api.VM.start_on(hog, host_ref, False, False)

    run = services.protection_start(vm=vm, level=2, settings={}, requested_by=admin_user, preflight=False)
    assert run_to_end(run) == "failed", steps_text(run)
    failed = run.steps.get(name="start_secondary")
    assert failed.error_code == "SECONDARY_NOT_RESERVED", steps_text(run)
    assert secondary.name_label in failed.message and "aborted" in failed.message, failed.message
    assert [s.state for s in run.steps.order_by("position")][-2:] == ["failed", "pending"]
    protection = Protection.objects.get(vm=vm)
    assert protection.status == "failed" and "could not be reserved" in protection.status_reason
    assert api.VM.get_by_name_label(VM_NAME + SECONDARY_SUFFIX)  # what the protection made is still there
    assert api.VM.get_power_state(vm_ref) == "Running"

    stop = services.protection_stop(protection=protection, requested_by=admin_user)
    assert run_to_end(stop) == "succeeded", steps_text(stop)
    for vbd in api.VM.get_VBDs(vm_ref):
        if api.VBD.get_type(vbd) == "Disk":
            assert RESOURCE_KEY not in api.VDI.get_other_config(api.VBD.get_VDI(vbd))
    assert not api.VM.get_by_name_label(VM_NAME + SECONDARY_SUFFIX)
    assert api.VM.get_power_state(vm_ref) == "Running"
    session.xenapi.session.logout()


def test_the_first_step_refuses_a_pair_with_a_link_down_and_touches_nothing(bed, admin_user):
    pool = register_pool(bed)
    vm = pool.vms.get(name_label=VM_NAME)
    primary = vm.resident_on
    if not primary.am_url:
        pytest.skip("the live bed does not write eac_am_url in its hosts' other_config yet (docs/level2.md)")
    bed.control("POST", f"/sim/hosts/{primary.name_label}/links/a", {"up": False})
    am = AMClient(primary.am_url)
    wait_for(lambda: pair_problems(am.status()), timeout=10, message="the AM to see its link A down")
    run = services.protection_start(vm=vm, level=2, settings={}, requested_by=admin_user)
    assert run_to_end(run) == "failed"
    step = run.steps.get(name="check_ams")
    assert step.error_code == "AM_PAIR_NOT_READY" and "availability link A is Down" in step.message, step.message
    assert primary.name_label in step.message
    assert set(run.steps.exclude(name="check_ams").values_list("state", flat=True)) == {"pending"}
    assert not ProtectedDisk.objects.exists()
    session = xapi_login(bed.url)
    for vbd in session.xenapi.VM.get_VBDs(session.xenapi.VM.get_by_uuid(vm.uuid)):
        if session.xenapi.VBD.get_type(vbd) == "Disk":
            assert RESOURCE_KEY not in session.xenapi.VDI.get_other_config(session.xenapi.VBD.get_VDI(vbd))
    session.xenapi.session.logout()
    stop = services.protection_stop(protection=Protection.objects.get(vm=vm), requested_by=admin_user)
    assert run_to_end(stop) == "succeeded", steps_text(stop)
