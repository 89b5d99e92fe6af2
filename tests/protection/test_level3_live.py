"""Level 3 end to end with the console, on the live bed: ``vpn-gw`` (1 vCPU, one disk, a live guest on
xcp-host-4, whose AM peer is xcp-host-3) protected at Level 3 through the REST API by the real worker, its health
read by the beat and the AM follower, a client holding one TCP connection to it (tests/xapisim/level3_support's
Ledger); then the crash of its host: the VM continues on the secondary from its last checkpoint, the connection is
never reset, no answer is lost or contradicted, and the console records the failover.

The bed and the console's processes are test_level2_faults' (one stack for the module). Root only.
"""
from __future__ import annotations

import time

import pytest

from alerts.choices import AlertState, Condition
from alerts.keys import component_key
from alerts.models import Alert
from inventory.models import VM
from protection.am_client import AMClient
from protection.choices import ProtectionStatus
from protection.models import ProtectedDisk, Protection
from tests.protection import test_level2_faults as faults
from tests.protection.test_level2_faults import VM_NAME, _logs, _mails, _new_alerts, _states, _until
from tests.protection.test_level2_faults import pytestmark as pytestmark  # root, ip and nft
from tests.support import wait_for, wait_run
from tests.xapisim.level3_support import Ledger

stack, api = faults.stack, faults.api
EPOCH_MS = 40


@pytest.fixture
def protected(stack, api):
    """VM_NAME protected at Level 3 through the API, every component ok; unprotected at the end unless it failed
    over (then its crashed host is powered on again)."""
    pool = stack["pool"]
    vm = VM.objects.get(pool=pool, name_label=VM_NAME)
    primary = vm.resident_on
    secondary = pool.hosts.get(uuid=primary.am_peer)
    response = api.post("/api/v1/protections/", {"vm": vm.uuid, "level": 3, "settings": {"epoch_ms": EPOCH_MS}},
                        format="json")
    assert response.status_code == 202, response.content
    run = wait_run(response.json()["id"], timeout=240)
    assert run.state == "succeeded", "\n".join(
        f"{s.name}: {s.state} {s.error_code} {s.message}" for s in run.steps.order_by("position")) + _logs(stack)
    protection = Protection.objects.get(vm=vm)
    assert protection.level == 3 and protection.epoch_ms == EPOCH_MS
    protection = _until(protection.pk, lambda p: p.status == ProtectionStatus.PROTECTED and p.components
                        and set(_states(p).values()) == {"ok"}, 60, "the beat's poll: every component ok")
    alerts_before = set(Alert.objects.values_list("pk", flat=True))
    yield {"vm": vm, "primary": primary, "secondary": secondary, "protection": protection,
           "alerts_before": alerts_before}
    current = Protection.objects.filter(vm=vm).first()
    if current is not None and current.failed_over_to_id is None:
        stop = api.delete(f"/api/v1/protections/{current.pk}/")
        assert stop.status_code == 202, stop.content
        assert wait_run(stop.json()["id"], timeout=120).state == "succeeded"


def _get_components(pk: int) -> list[dict]:
    return Protection.objects.get(pk=pk).components


def test_a_level3_protection_checkpoints_and_the_console_shows_its_figures(stack, protected, api):
    live, pk = stack["live"], protected["protection"].pk
    checkpointing = [c for c in _get_components(pk) if c["kind"] == "Checkpointing"]
    assert len(checkpointing) == 2 and {c["state"] for c in checkpointing} == {"ok"}, checkpointing
    body = api.get(f"/api/v1/protections/{pk}/")
    assert body.status_code == 200 and body.json()["level"] == 3
    ledger = Ledger(live, live.ip(VM_NAME)).start()
    wait_for(lambda: ledger.answered() >= 100, timeout=20, message="answers through the output buffer")
    run = ledger.stop()
    assert run.resets == 0 and not run.ended and run.wrong == [], run


def test_a_stalled_secondary_disk_raises_checkpointing_stalled_once_and_clears_it_once(stack, protected):
    """The secondary AM's disk stops answering flushes (its links still answer): the primary's checkpoints go
    unacknowledged, the console shows the Checkpointing component failed and mails "checkpointing stalled"; once
    the disk answers, the alert clears, and the client lost nothing."""
    live, vm, pk = stack["live"], protected["vm"], protected["protection"].pk
    secondary = protected["secondary"]
    resource = ProtectedDisk.objects.filter(protection_id=pk).values_list("resource", flat=True).first()
    ledger = Ledger(live, live.ip(VM_NAME)).start()
    try:
        wait_for(lambda: ledger.answered() >= 50, timeout=20, message="answers before the stall")
        with AMClient(secondary.am_url) as am:
            am.resource_action(resource, "fault", {"disk": "stall"})
            try:
                alert = wait_for(lambda: _new_alerts(protected, condition=Condition.CHECKPOINT_STALLED).first(),
                                 timeout=20, message="the checkpointing stalled alert")
                assert alert.state == AlertState.OPEN and alert.object_key == component_key(vm, "checkpoint")
                wait_for(lambda: _mails(stack, alert, "raised"), timeout=20, message="the stall mailed")
                assert "failed" in [c["state"] for c in _get_components(pk) if c["kind"] == "Checkpointing"]
            finally:
                am.resource_action(resource, "fault", {"disk": "resume"})
        _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED and set(_states(p).values()) == {"ok"}, 60,
               "every component ok again")
        wait_for(lambda: Alert.objects.get(pk=alert.pk).state == AlertState.CLEARED, timeout=20,
                 message="the alert cleared")
        wait_for(lambda: _mails(stack, alert, "cleared"), timeout=20, message="the clearance mailed")
        before = ledger.answered()
        wait_for(lambda: ledger.answered() >= before + 50 or ledger.run.ended, timeout=20,
                 message="answers after the stall")
    finally:
        run = ledger.stop()
    stalled = _new_alerts(protected, condition=Condition.CHECKPOINT_STALLED)
    assert stalled.count() == 1 and len(_mails(stack, alert, "raised")) == 1  # raised once, cleared once
    assert len(_mails(stack, alert, "cleared")) == 1
    assert run.resets == 0 and not run.ended and run.wrong == [], run


def test_a_planned_swap_moves_the_level3_vm_live_and_its_checkpointing_follows_it_and_back(stack, protected, api):
    """Level 2's swap workflow: each AM ends its checkpoint stream before handing its disk over, the VM moves live,
    and the new primary checkpoints it (once its resource names the VM); the client sees a pause, never a reset or a
    wrong answer. Then the swap back (unprotect is refused while swapped)."""
    from tests.protection.test_level2_swap import _swap

    live, pk = stack["live"], protected["protection"].pk
    resource = ProtectedDisk.objects.filter(protection_id=pk).values_list("resource", flat=True).first()
    ledger = Ledger(live, live.ip(VM_NAME)).start()
    gaps = []
    try:
        for there, back in ((protected["secondary"], protected["primary"]),
                            (protected["primary"], protected["secondary"])):
            wait_for(lambda: ledger.answered() >= 50 or ledger.run.ended, timeout=20, message="answers first")
            asked = time.monotonic()
            _swap(stack, api, pk)
            with AMClient(there.am_url) as new, AMClient(back.am_url) as old:
                assert new.resource(resource)["role"] == "Primary"
                first = (new.resource(resource)["checkpoint"] or {}).get("last_committed") or 0
                wait_for(lambda first=first: (cp := new.resource(resource)["checkpoint"] or {}).get("state")
                         == "Checkpointing" and cp["last_committed"] >= first + 5, timeout=30,
                         message=f"checkpoints committed on {there.name_label}")
                wait_for(lambda: (old.resource(resource)["checkpoint"] or {}).get("state") == "Standby",
                         timeout=10, message=f"{back.name_label} standing by")
            before = ledger.answered()
            wait_for(lambda before=before: ledger.answered() >= before + 50 or ledger.run.ended, timeout=20,
                     message="answers after the swap")
            gaps.append(ledger.gap_after(asked))
            _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED and set(_states(p).values()) == {"ok"}, 60,
                   "every component ok after the swap")
    finally:
        run = ledger.stop()
    print(f"\nlevel 3 planned swaps: the client's longest pause {', '.join(f'{g:.2f}' for g in gaps)} s; "
          f"{run.answers} answers")
    assert run.resets == 0 and not run.ended, run.ended
    assert run.wrong == [], run.wrong[:5]


def test_a_crash_of_the_primary_host_leaves_the_vm_running_on_with_its_client_connection(stack, protected):
    cmd, live = stack["cmd"], stack["live"]
    primary, secondary, vm = protected["primary"], protected["secondary"], protected["vm"]
    pk = protected["protection"].pk
    ledger = Ledger(live, live.ip(VM_NAME)).start()
    try:
        wait_for(lambda: ledger.answered() >= 50, timeout=20, message="answers before the crash")
        crashed_at = time.monotonic()
        cmd.control("POST", f"/sim/hosts/{primary.name_label}/crash")
        at_crash = ledger.answered()
        wait_for(lambda: ledger.answered() >= at_crash + 100 or ledger.run.ended, timeout=30,
                 message="answers after the crash")
        gap = ledger.gap_after(crashed_at)
        done = _until(pk, lambda p: p.failed_over_to_id == secondary.pk, 60, "the failover recorded")
        assert done.status != ProtectionStatus.FAILED, done.status_reason
        wait_for(lambda: _new_alerts(protected, condition=Condition.FAILOVER_DONE,
                                     object_key=component_key(vm, "failover")).exists(),
                 timeout=10, message="the failover's alert")
        before = ledger.answered()
        wait_for(lambda: ledger.answered() >= before + 50 or ledger.run.ended, timeout=20,
                 message="answers after the failover was recorded")
    finally:
        run = ledger.stop()
        cmd.control("POST", f"/sim/hosts/{primary.name_label}/power-on")
    print(f"\nlevel 3 through the console: crash of {primary.name_label} -> answers again after {gap:.2f} s; "
          f"{run.answers} answers, {len(run.acked)} records stored")
    assert run.resets == 0 and not run.ended, run.ended
    assert run.wrong == [], run.wrong[:5]
    assert not _new_alerts(protected, condition=Condition.FAILOVER_FAILED).exists()
