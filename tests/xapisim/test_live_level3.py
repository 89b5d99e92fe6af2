"""Level 3 by hand on the live bed: a VM protected as for Level 2 with its AM resources checkpointed, a client
holding one TCP connection to its guest, and crashes of the host it runs on, again and again, at random moments.
The guest continues from its last committed checkpoint on the other host: the connection is never reset, and every
answer the client received agrees with the guest's state after each failover. Root only; no console: the XenAPI
package against xapisim and the AMs' HTTP API.

One bed for the module (the sequence builds on itself); conditions are waited on with deadlines. The gaps the
client saw are printed (``-s``), not asserted: benchmarks/bench_level3.py measures them.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.support import wait_for
from tests.xapisim.level2_support import protect_by_hand
from tests.xapisim.level3_support import Ledger, checkpoint, crash_and_return, start_paused
from tests.xapisim.test_live import pytestmark as pytestmark  # root, ip and nft, as the live bed's tests
from tests.xapisim.test_live import running_bed

CRASHES = 20
EPOCH_MS = 50


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with running_bed(tmp_path_factory.mktemp("level3")) as live:
        yield live


@pytest.fixture(scope="module")
def protected(bed):
    live, api = bed, bed.api
    vm = live.vm("web-01")
    host1 = api.host.get_by_name_label("xcp-host-1")[0]
    api.VM.set_ha_restart_priority(vm, "")  # the AMs restore it, not XAPI's HA
    if api.VM.get_resident_on(vm) != host1:
        api.VM.pool_migrate(vm, host1, {})
    wait_for(lambda: (g := live.guest("web-01")) and g["host"] == "xcp-host-1", timeout=15,
             message="web-01's guest on host 1")
    return protect_by_hand(live, "web-01", "xcp-host-1", epoch_ms=EPOCH_MS)


def test_a_level3_primary_checkpoints_every_epoch_and_its_peer_keeps_the_last(bed, protected):
    p = protected
    name, primary, secondary = p["resource"], p["ams"]["xcp-host-1"], p["ams"][p["secondary"]]
    wait_for(lambda: checkpoint(primary, name).get("state") == "Checkpointing", timeout=20,
             message="the primary to checkpoint")
    first = checkpoint(primary, name)["last_committed"]
    time.sleep(0.5)  # ten epochs
    now = checkpoint(primary, name)
    assert now["last_committed"] >= first + 5, now
    assert now["epoch_ms"] == EPOCH_MS and now["size_bytes"] > 0 and now["capture_ms"] > 0
    standby = checkpoint(secondary, name)
    assert standby["state"] == "Standby" and standby["last_committed"] >= first, standby
    # A client's answers wait for their epoch's checkpoint: they come, and agree with the ledger.
    ledger = Ledger(bed, bed.ip("web-01")).start()
    wait_for(lambda: ledger.answered() >= 100, timeout=20, message="answers through the output buffer")
    run = ledger.stop()
    assert run.wrong == [] and run.resets == 0 and not run.ended, run
    assert checkpoint(primary, name)["output_hold_ms"] > 0


def committed(am, name: str) -> int:
    return checkpoint(am, name).get("last_committed") or 0


def ride_through(live, p: dict, fault, heal, *, while_faulty=None, what: str) -> None:
    """A client on web-01 throughout: ``fault()``, answers go on (and ``while_faulty()`` holds), ``heal()``, answers
    go on; never a reset, a lost or a contradicted answer."""
    ledger = Ledger(live, live.ip("web-01")).start()
    try:
        wait_for(lambda: ledger.answered() >= 50, timeout=20, message=f"{what}: answers before")
        fault()
        before = ledger.answered()
        wait_for(lambda: ledger.answered() >= before + 100 or ledger.run.ended, timeout=30,
                 message=f"{what}: answers during the fault")
        if while_faulty is not None:
            while_faulty()
        heal()
        before = ledger.answered()
        wait_for(lambda: ledger.answered() >= before + 100 or ledger.run.ended, timeout=30,
                 message=f"{what}: answers after it")
    finally:
        run = ledger.stop()
    assert run.resets == 0 and not run.ended, f"{what}: {run.ended}"
    assert run.wrong == [], run.wrong[:5]


def checkpointing_on(am, name: str) -> None:
    """The primary commits checkpoints again and again (not one left from before)."""
    first = committed(am, name)
    wait_for(lambda: checkpoint(am, name).get("state") == "Checkpointing" and committed(am, name) >= first + 5,
             timeout=30, message="checkpoints committed")


def test_checkpoints_go_on_over_the_other_link_when_one_is_cut(bed, protected):
    live, p = bed, protected
    primary, name = p["ams"]["xcp-host-1"], p["resource"]

    def cut():
        live.cmd.control("POST", "/sim/hosts/xcp-host-1/links/a", {"up": False})

    ride_through(live, p, cut, lambda: live.cmd.control("POST", "/sim/hosts/xcp-host-1/links/a", {"up": True}),
                 while_faulty=lambda: checkpointing_on(primary, name), what="link A cut")
    checkpointing_on(primary, name)


def test_checkpoints_go_on_through_a_nic_failure_of_the_primary(bed, protected):
    live, p = bed, protected
    primary, name = p["ams"]["xcp-host-1"], p["resource"]

    def borrowing():
        wait_for(lambda: primary.call("GET", "/v1/status")[1]["network"]["mode"] == "borrowing", timeout=10,
                 message="the primary borrowing its peer's NIC")
        checkpointing_on(primary, name)

    ride_through(live, p, lambda: live.cmd.control("POST", "/sim/hosts/xcp-host-1/nic", {"up": False}),
                 lambda: live.cmd.control("POST", "/sim/hosts/xcp-host-1/nic", {"up": True}),
                 while_faulty=borrowing, what="NIC failure")
    checkpointing_on(primary, name)


def test_checkpoints_go_on_through_a_disk_failure_of_the_primary_and_its_repair(bed, protected):
    live, p = bed, protected
    primary, name = p["ams"]["xcp-host-1"], p["resource"]

    def failed():
        wait_for(lambda: (primary.resource(name) or {}).get("disk") == "Failed", timeout=10,
                 message="the primary's disk Failed")
        checkpointing_on(primary, name)

    def repair():
        live.cmd.control("POST", "/sim/hosts/xcp-host-1/disk", {"failed": False})
        assert primary.call("POST", f"/v1/resources/{name}/disk-repaired")[0] == 202

    ride_through(live, p, lambda: live.cmd.control("POST", "/sim/hosts/xcp-host-1/disk", {"failed": True}),
                 repair, while_faulty=failed, what="disk failure")
    wait_for(lambda: (primary.resource(name) or {}).get("disk") == "UpToDate", timeout=60,
             message="the repaired disk resynced")
    checkpointing_on(primary, name)


def test_a_stalled_secondary_disk_stalls_checkpoints_and_holds_the_output_until_it_answers(bed, protected):
    """The secondary's flushes hang (its links answer): no checkpoint is acknowledged, so nothing the guest sent
    since goes out; the primary says Stalled. Once the disk answers, the held output goes out in order."""
    live, p = bed, protected
    name, primary, secondary = p["resource"], p["ams"]["xcp-host-1"], p["ams"][p["secondary"]]
    checkpointing_on(primary, name)
    ledger = Ledger(live, live.ip("web-01")).start()
    try:
        wait_for(lambda: ledger.answered() >= 50, timeout=20, message="answers before the stall")
        assert secondary.call("POST", f"/v1/resources/{name}/fault", {"disk": "stall"})[0] == 200
        stalled_at = time.monotonic()
        wait_for(lambda: checkpoint(primary, name).get("state") == "Stalled", timeout=10,
                 message="the primary's checkpointing Stalled")
        silent_from = ledger.answered()
        status = checkpoint(primary, name)
        assert status["held_packets"] > 0 and status["last_commit_age_ms"] >= 1000, status
        assert ledger.answered() == silent_from  # still nothing released
        assert secondary.call("POST", f"/v1/resources/{name}/fault", {"disk": "resume"})[0] == 200
        checkpointing_on(primary, name)
        wait_for(lambda: ledger.answered() >= silent_from + 100 or ledger.run.ended, timeout=30,
                 message="answers after the disk answered again")
        gap = ledger.gap_after(stalled_at)
    finally:
        run = ledger.stop()
    assert run.resets == 0 and not run.ended, run.ended
    assert run.wrong == [], run.wrong[:5]
    assert gap >= 1.0  # the stall was seen by the client as silence, never as a wrong answer


def test_a_paused_vm_is_not_checkpointed_and_is_again_once_unpaused(bed, protected):
    # Its checkpoint source does not answer (NoGuest): the peer is told the stream ended and forgets its checkpoint
    # (a takeover now would start the VM from its disk); unpaused, a new stream starts. The client only waits.
    live, p = bed, protected
    primary, secondary, name = p["ams"]["xcp-host-1"], p["ams"][p["secondary"]], p["resource"]

    def no_guest():
        wait_for(lambda: checkpoint(primary, name).get("state") == "NoGuest", timeout=10,
                 message="the primary's checkpoint source silent")
        wait_for(lambda: checkpoint(secondary, name).get("last_committed") == 0, timeout=10,
                 message="the peer's checkpoint forgotten")

    ledger = Ledger(live, live.ip("web-01")).start()
    try:
        wait_for(lambda: ledger.answered() >= 50, timeout=20, message="answers before the pause")
        live.api.VM.pause(p["vm"])
        no_guest()
        live.api.VM.unpause(p["vm"])
        before = ledger.answered()
        wait_for(lambda: ledger.answered() >= before + 100 or ledger.run.ended, timeout=30,
                 message="answers after the pause")
    finally:
        run = ledger.stop()
    assert run.resets == 0 and not run.ended and run.wrong == [], run.ended or run.wrong[:5]
    checkpointing_on(primary, name)
    assert checkpoint(secondary, name).get("last_committed") > 0


def test_a_crash_of_the_secondary_leaves_the_primary_unprotected_then_protected_again(bed, protected):
    live, p = bed, protected
    primary, name, secondary = p["ams"]["xcp-host-1"], p["resource"], p["secondary"]

    def unprotected():
        wait_for(lambda: checkpoint(primary, name).get("state") == "Unprotected", timeout=10,
                 message="the primary unprotected")

    def back():
        live.cmd.control("POST", f"/sim/hosts/{secondary}/power-on")
        wait_for(lambda: (r := p["ams"][secondary].resource(name) or {}).get("disk") == "UpToDate"
                 and r.get("role") == "Secondary", timeout=60, message="the secondary resynced")
        api = live.api
        wait_for(lambda: api.VM.get_power_state(p["copy"]) == "Halted", timeout=20, message="the copy halted")
        start_paused(api, p["copy"], p["hosts"][secondary])

    ride_through(live, p, lambda: live.cmd.control("POST", f"/sim/hosts/{secondary}/crash"), back,
                 while_faulty=unprotected, what="secondary crash")
    checkpointing_on(primary, name)


def test_the_vm_continues_through_crashes_of_its_host_with_its_connection_and_answers(bed, protected):
    live, p = bed, protected
    running_on, rng = "xcp-host-1", random.Random(1)
    ledger = Ledger(live, live.ip("web-01")).start()
    gaps = []
    try:
        for crash in range(1, CRASHES + 1):
            other = next(h for h in p["hosts"] if h != running_on)
            gaps.append(crash_and_return(live, ledger, p, running_on, other, crash, rng, EPOCH_MS))
            running_on = other
    finally:
        run = ledger.stop()
    print(f"\nlevel 3: {CRASHES} crashes, {run.answers} answers, gaps (s): " + " ".join(f"{g:.2f}" for g in gaps))
    assert run.resets == 0 and not run.ended, run.ended
    assert run.wrong == [], run.wrong[:5]
    # Every record the client saw stored is on the disk of the VM that runs now.
    conn = live.connect("web-01")
    try:
        missing = {seq: rec for seq, rec in run.acked.items() if conn.ask(f"GET {seq}") != f"VAL {seq} {rec}"}
    finally:
        conn.close()
    assert missing == {}, f"{len(missing)} acknowledged records lost of {len(run.acked)}"
