"""VM.pool_migrate of a running live guest moves it (xapisim/live/migrate.py): the same process on the other host,
its vif on that host's bridge, its disk endpoint that host's, a gratuitous ARP, and a client's TCP connection
that never notices more than a short pause. The reconciler's side is pure and tested without root; the rest on
one live bed for the module (root). Conditions are waited on with deadlines; the client-visible gap of each move
is printed (``-s``), not asserted.
"""

from __future__ import annotations

import os

import pytest
import XenAPI

from tests.support import wait_for
from tests.xapisim.level2_support import Writer
from tests.xapisim.test_live import alive, bridge_ports, running_bed
from xapisim.live.guest import garp_frame
from xapisim.live.reconcile import (
    CrashHost,
    GuestState,
    HostState,
    MigrateGuest,
    Migration,
    PauseGuest,
    StartGuest,
    StopGuest,
    World,
    after,
    plan,
)
from xapisim.vmstate import vm_overhead

UP = HostState()
DOWN = HostState(up=False)
MiB = 1 << 20

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the live bed needs root")


# -- the reconciler (pure) ---------------------------------------------------------------------------------------


def test_a_recorded_migration_moves_the_guest_instead_of_restarting_it():
    have = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h1", 5)})
    want = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h2", 9)}, {"vm1": Migration("h1", 5, "h2", 9)})
    assert plan(want, have) == [MigrateGuest("vm1", "h2", 9)]
    assert after(have, MigrateGuest("vm1", "h2", 9)).guests == {"vm1": GuestState("h2", 9)}
    # Negative control: the same records without the migration are a restart elsewhere.
    assert plan(World(want.hosts, want.guests), have) == [StopGuest("vm1", hard=False), StartGuest("vm1", "h2", 9)]


def test_a_migration_that_does_not_match_the_running_guest_is_a_restart():
    have = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h1", 5)})
    stale = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h2", 9)}, {"vm1": Migration("h1", 4, "h2", 9)})
    assert plan(stale, have) == [StopGuest("vm1", hard=False), StartGuest("vm1", "h2", 9)]


def test_a_paused_guest_migrates_paused_and_a_source_host_that_died_kills_it():
    have = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h1", 5, paused=True)})
    want = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h2", 9, paused=True)},
                 {"vm1": Migration("h1", 5, "h2", 9)})
    assert plan(want, have) == [MigrateGuest("vm1", "h2", 9)]
    unpaused = World(want.hosts, {"vm1": GuestState("h2", 9)}, want.migrations)
    assert plan(unpaused, have) == [MigrateGuest("vm1", "h2", 9), PauseGuest("vm1", False)]
    dead = World({"h1": DOWN, "h2": UP}, want.guests, want.migrations)
    assert plan(dead, have)[:2] == [CrashHost("h1"), StopGuest("vm1", hard=True)]


def test_the_gratuitous_arp_is_a_broadcast_request_for_the_guests_own_address():
    frame = garp_frame(bytes.fromhex("020000aabbcc"), "10.20.1.2")
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex("020000aabbcc") and frame[12:14] == b"\x08\x06"
    arp = frame[14:]
    assert arp[6:8] == b"\x00\x01"  # a request
    assert arp[14:18] == arp[24:28] == bytes([10, 20, 1, 2])  # sender and target: its own address


# -- on the live bed ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the live bed needs root")
    with running_bed(tmp_path_factory.mktemp("migrate")) as live:
        yield live




def largest_gap(writer: Writer, after: float) -> float:
    times = [t for t in writer.acked_at if t >= after]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


@root_only
def test_a_migrated_guest_keeps_its_process_and_its_clients_connection(bed):
    live, api = bed, bed.api
    vm = live.vm("web-01")
    host1, host2 = (api.host.get_by_name_label(f"xcp-host-{i}")[0] for i in (1, 2))
    if api.VM.get_resident_on(vm) != host1:
        api.VM.pool_migrate(vm, host1, {})
    guest = wait_for(lambda: (g := live.guest("web-01")) and g["host"] == "xcp-host-1" and g, timeout=15,
                     message="web-01's guest on host 1")
    pid = guest["pid"]
    writer = Writer(live, guest["ip"], read_timeout=5.0)
    writer.start()
    try:
        wait_for(lambda: writer.count() >= 20, timeout=15, message="records before the migration")
        for name, ref in (("xcp-host-2", host2), ("xcp-host-1", host1)):
            count, started = writer.count(), writer.acked_at[-1]
            api.VM.pool_migrate(vm, ref, {})
            # XAPI's call returns once the guest runs there: no waiting for the bed.
            moved = live.guest("web-01")
            assert moved["host"] == name and moved["pid"] == pid and alive(pid)
            assert api.VM.get_resident_on(vm) == ref
            domid = api.VM.get_domid(vm)
            assert f"vif{domid}.0" in bridge_ports(live, name)
            assert moved["disk"]["address"].split(":")[0] == next(
                h["address"] for h in live.live()["hosts"] if h["name"] == name)
            wait_for(lambda c=count: writer.count() >= c + 20, timeout=15, message=f"records after the move to {name}")
            print(f"\nmigration to {name}: longest gap between acknowledgements {largest_gap(writer, started):.3f} s")
        count = writer.count()
        api.VM.pool_migrate(vm, host1, {})  # to the host it runs on: a new domain, the same guest
        same = live.guest("web-01")
        assert same["host"] == "xcp-host-1" and same["pid"] == pid
        assert f"vif{api.VM.get_domid(vm)}.0" in bridge_ports(live, "xcp-host-1")
        wait_for(lambda: writer.count() >= count + 20, timeout=15, message="records after the move in place")
    finally:
        writer.stop()
    assert writer.errors == [] and writer.connections == 1  # one TCP connection all along: never reset
    conn = live.connect("web-01")
    try:
        for seq, record in writer.acked.items():
            assert conn.ask(f"GET {seq}") == f"VAL {seq} {record}"
    finally:
        conn.close()


@root_only
def test_a_migration_to_a_host_without_room_or_not_live_is_refused_and_the_guest_stays(bed):
    live, api = bed, bed.api
    vm = live.vm("web-01")
    guest = wait_for(lambda: live.guest("web-01"), timeout=15, message="web-01's guest")
    where = api.VM.get_resident_on(vm)
    others = [h for h in api.host.get_all() if h != where and api.host.get_name_label(h) != "xcp-host-1"]
    full, dead = others[0], others[-1]

    # No room: a halted VM without a guest made big enough to leave less than web-01 needs, started there.
    record = api.VM.get_record(vm)
    need = int(record["memory_static_max"]) + int(record["memory_overhead"])
    def can_boot_there(v: str) -> bool:
        try:
            api.VM.assert_can_boot_here(v, full)
        except XenAPI.Failure:
            return False
        return True

    filler = next(v for v in api.VM.get_all() if not api.VM.get_is_a_template(v)
                  and not api.VM.get_is_control_domain(v) and api.VM.get_power_state(v) == "Halted"
                  and "xapisim_live_guest" not in api.VM.get_other_config(v) and can_boot_there(v))
    limits = [api.VM.get_memory_static_min(filler), api.VM.get_memory_static_max(filler),
              api.VM.get_memory_dynamic_min(filler), api.VM.get_memory_dynamic_max(filler)]
    free = int(api.host.compute_free_memory(full))
    size = free - need // 2
    size -= vm_overhead(size, int(api.VM.get_VCPUs_max(filler)))
    size = size // MiB * MiB
    api.VM.set_memory_limits(filler, str(size), str(size), str(size), str(size))
    api.VM.start_on(filler, full, False, False)
    try:
        with pytest.raises(XenAPI.Failure) as refused:
            api.VM.pool_migrate(vm, full, {})
        assert refused.value.details[0] == "HOST_NOT_ENOUGH_FREE_MEMORY"
    finally:
        api.VM.hard_shutdown(filler)
        api.VM.set_memory_limits(filler, *limits)
    after_refusal = live.guest("web-01")
    assert (after_refusal["host"], after_refusal["pid"]) == (guest["host"], guest["pid"])
    assert api.VM.get_resident_on(vm) == where

    # Not live: a crashed host.
    dead_name = api.host.get_name_label(dead)
    live.cmd.control("POST", f"/sim/hosts/{dead_name}/crash")
    try:
        with pytest.raises(XenAPI.Failure) as refused:
            api.VM.pool_migrate(vm, dead, {})
        assert refused.value.details[0] in ("HOST_OFFLINE", "HOST_NOT_LIVE")
    finally:
        live.cmd.control("POST", f"/sim/hosts/{dead_name}/power-on")
    after_refusal = live.guest("web-01")
    assert (after_refusal["host"], after_refusal["pid"]) == (guest["host"], guest["pid"]) and alive(guest["pid"])
    assert api.VM.get_resident_on(vm) == where
