"""The planned role swap of a Level 2 VM end to end with the console, on the live bed (the fixtures of
test_level2_faults.py: its watcher, worker and beat, ``vpn-gw`` protected through the REST API, a ``Writer`` holding
one TCP connection to it): ``POST …/swap/`` runs the swap workflow (the copy halted, each disk handed over, the VM
moved live, the copy paused on the host the VM left, each AM told its VM, the protection's hosts exchanged), and
the client's connection never notices more than a short pause. Then the swap back.

Conditions are waited on with deadlines; the client-visible gap of each swap (the longest time between two
acknowledgements) is printed (``-s``), not asserted (benchmarks/bench_level2_swap.py measures it). Root only.
"""
from __future__ import annotations

import time

from alerts.choices import AlertState, Condition
from inventory.models import VM
from protection.am_client import AMClient
from protection.choices import ProtectionStatus
from protection.models import ProtectedDisk
from tests.protection import test_level2_faults as faults
from tests.protection.test_level2_faults import VM_NAME, _all_acked_readable, _logs, _new_alerts, _states, _until
from tests.protection.test_level2_faults import pytestmark as pytestmark  # root, ip and nft
from tests.support import wait_for, wait_run

# The fault tests' fixtures: one bed and console stack for the module, the VM protected for each test.
stack, api, protected = faults.stack, faults.api, faults.protected

SWAP_STEPS = ["check_swap", "halt_copy", "swap_disks", "migrate_vm", "set_resource_vms", "exchange_hosts",
              "start_copy", "verify"]


def largest_gap(acked_at: list[float], after: float) -> float:
    """The longest time between two acknowledgements after ``after`` (monotonic), the first one included."""
    times = [after, *(t for t in acked_at if t > after)]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def _swap(stack, api, pk: int) -> object:
    response = api.post(f"/api/v1/protections/{pk}/swap/")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["queued"] and body["run"], body
    again = api.post(f"/api/v1/protections/{pk}/swap/")  # one at a time
    assert again.status_code == 409 and "protecting" in again.content.decode(), again.content
    run = wait_run(body["run"], timeout=120)
    steps = list(run.steps.order_by("position"))
    assert run.state == "succeeded", "\n".join(
        f"{s.name}: {s.state} {s.error_code} {s.message}" for s in steps) + _logs(stack)
    assert [s.name for s in steps] == SWAP_STEPS and all(s.progress == 1.0 for s in steps)
    return run


def test_a_planned_swap_moves_the_running_vm_with_its_client_connection_and_back(stack, protected, api):
    live, vm, pk, writer = stack["live"], protected["vm"], protected["protection"].pk, protected["writer"]
    xapi = live.api
    vm_ref = xapi.VM.get_by_uuid(vm.uuid)
    copy_uuid = protected["protection"].secondary_vm_uuid
    copy_ref = xapi.VM.get_by_uuid(copy_uuid)
    pid = live.guest(VM_NAME)["pid"]
    connections = writer.connections
    resources = list(ProtectedDisk.objects.filter(protection_id=pk).values_list("resource", flat=True))
    gaps = []
    for there, back in ((protected["secondary"], protected["primary"]), (protected["primary"], protected["secondary"])):
        count, asked = writer.count(), time.monotonic()
        _swap(stack, api, pk)
        took = time.monotonic() - asked
        # XAPI: the VM on the other host, its copy paused on the one it left.
        assert xapi.VM.get_resident_on(vm_ref) == xapi.host.get_by_uuid(there.uuid)
        assert xapi.VM.get_power_state(vm_ref) == "Running"
        assert xapi.VM.get_power_state(copy_ref) == "Paused"
        assert xapi.VM.get_resident_on(copy_ref) == xapi.host.get_by_uuid(back.uuid)
        # The machines: the same guest process, now on the other host; no guest of the copy runs.
        guest = live.guest(VM_NAME)
        assert guest["host"] == there.name_label and guest["pid"] == pid, guest
        assert live.running_guest(VM_NAME + " (eAC secondary)") is None
        # The AMs: the new primary serves each disk for the VM, the former one holds the replica for the copy.
        with AMClient(there.am_url) as new, AMClient(back.am_url) as old:
            for name in resources:
                assert (new.resource(name)["role"], new.resource(name)["vm"]) == ("Primary", vm.uuid)
                assert (old.resource(name)["role"], old.resource(name)["vm"]) == ("Secondary", copy_uuid)
        # The console: the hosts exchanged, every component ok again, the VM shown on its new host.
        done = _until(pk, lambda p, b=back: p.status == ProtectionStatus.PROTECTED and p.secondary_host_id == b.pk
                      and p.components and set(_states(p).values()) == {"ok"}
                      and any(c["host"] == b.uuid for c in p.components if c["id"] == "secondary-vm"), 60,
                      "protected again with the hosts exchanged")
        assert done.swapped == (there == protected["secondary"]) and done.failed_over_to_id is None
        assert set(ProtectedDisk.objects.filter(protection_id=pk).values_list("primary_host", "secondary_host")) == {
            (there.pk, back.pk)}
        wait_for(lambda t=there: VM.objects.filter(pk=vm.pk, resident_on=t).exists(), timeout=20,
                 message="the watcher to show the VM on its new host")
        wait_for(lambda c=count: writer.count() >= c + 20, timeout=20, message="records after the swap")
        gap = largest_gap(writer.acked_at, asked)
        gaps.append(gap)
        print(f"\nplanned swap to {there.name_label}: run {took:.2f} s, longest client-visible gap {gap:.3f} s, "
              f"{writer.count()} records, {writer.connections} connection(s)")
        if there == protected["secondary"]:  # swapped: unprotect would leave the VM without its latest writes
            refused = api.delete(f"/api/v1/protections/{pk}/")
            assert refused.status_code == 409 and "swap it back first" in refused.content.decode()
    # The client saw a pause, never an error or a reset, and every acknowledged record is there.
    assert writer.errors == [] and writer.connections == connections
    assert _all_acked_readable(live, live.ip(VM_NAME), writer) == {}
    # Nothing was lost on the way: no component alerted, no failover.
    assert not _new_alerts(protected, condition=Condition.REDUNDANCY_LOST).exists(), list(
        _new_alerts(protected, condition=Condition.REDUNDANCY_LOST).values_list("object_key", "message"))
    assert not _new_alerts(protected, condition=Condition.FAILOVER_DONE).exists()
    assert not _new_alerts(protected, state=AlertState.OPEN).exists()
    print(f"planned swaps: longest client-visible gaps {', '.join(f'{g:.3f}' for g in gaps)} s")
