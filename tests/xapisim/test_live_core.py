"""The live bed's pure parts, without root: what the reconciler decides, the guest's log and its protocol."""

from __future__ import annotations

import pytest

from xapisim.live.guest_core import (
    SECTOR,
    Add,
    BadRequest,
    Count,
    Get,
    LogScanner,
    Ping,
    Put,
    ScanState,
    encode_record,
    parse_request,
    record_size,
)
from xapisim.live.reconcile import (
    BootHost,
    CrashHost,
    GuestState,
    HostState,
    Migration,
    PauseGuest,
    ReserveGuest,
    SetDisk,
    SetLink,
    SetNic,
    StartGuest,
    StopGuest,
    World,
    after,
    plan,
)

UP = HostState()
DOWN = HostState(up=False)


def converge(want: World, have: World) -> World:
    for action in plan(want, have):
        have = after(have, action)
    return have


# -- reconcile --------------------------------------------------------------------------------------------------


def test_a_new_bed_boots_every_powered_host_then_starts_its_guests():
    guests = {"vm1": GuestState("h1", 5), "vm2": GuestState("h2", 6)}
    want = World({"h1": UP, "h2": UP, "h3": DOWN}, guests)
    actions = plan(want, World())
    assert actions == [
        BootHost("h1", False),
        BootHost("h2", False),
        StartGuest("vm1", "h1", 5),
        StartGuest("vm2", "h2", 6),
    ]
    assert converge(want, World()) == World({"h1": UP, "h2": UP}, want.guests)


def test_a_vm_started_paused_gets_a_reserved_guest_that_goes_on_when_it_is_unpaused():
    started_paused = World({"h1": UP}, {"vm1": GuestState("h1", 5, paused=True)})
    assert plan(started_paused, World({"h1": UP})) == [ReserveGuest("vm1", "h1", 5)]
    reserved = converge(started_paused, World({"h1": UP}))
    assert plan(started_paused, reserved) == []
    unpaused = World({"h1": UP}, {"vm1": GuestState("h1", 5)})
    assert plan(unpaused, reserved) == [StartGuest("vm1", "h1", 5)]  # not a PauseGuest: it never ran
    assert plan(unpaused, converge(unpaused, reserved)) == []


def test_a_reserved_guest_is_stopped_not_moved_when_its_vm_goes_elsewhere():
    reserved = converge(World({"h1": UP, "h2": UP}, {"vm1": GuestState("h1", 5, paused=True)}), World())
    want = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h2", 6)},
                 {"vm1": Migration(source="h1", old_domid=5, target="h2", domid=6)})
    assert plan(want, reserved) == [StopGuest("vm1", hard=False), StartGuest("vm1", "h2", 6)]


def test_a_host_crash_comes_first_then_its_guests_are_removed():
    # CrashHost kills the host's processes and its guests' in one sweep (nothing of the host notices the others'
    # death and acts on it, as nothing would on a real host); StopGuest then removes what is left of each guest.
    have = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h1", 5), "vm2": GuestState("h2", 6)})
    want = World({"h1": DOWN, "h2": UP}, {"vm2": GuestState("h2", 6)})
    assert plan(want, have) == [CrashHost("h1"), StopGuest("vm1", hard=True)]


def test_a_halted_vm_stops_its_guest_cleanly_and_a_reboot_restarts_it():
    have = World({"h1": UP}, {"vm1": GuestState("h1", 5)})
    assert plan(World({"h1": UP}, {}), have) == [StopGuest("vm1", hard=False)]
    rebooted = World({"h1": UP}, {"vm1": GuestState("h1", 7)})
    assert plan(rebooted, have) == [StopGuest("vm1", hard=False), StartGuest("vm1", "h1", 7)]


def test_a_migrated_vm_moves_its_guest():
    have = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h1", 5)})
    want = World({"h1": UP, "h2": UP}, {"vm1": GuestState("h2", 8)})
    assert plan(want, have) == [StopGuest("vm1", hard=False), StartGuest("vm1", "h2", 8)]


def test_pause_and_unpause_only_signal_the_guest():
    have = World({"h1": UP}, {"vm1": GuestState("h1", 5)})
    paused = World({"h1": UP}, {"vm1": GuestState("h1", 5, paused=True)})
    assert plan(paused, have) == [PauseGuest("vm1", True)]
    assert plan(have, converge(paused, have)) == [PauseGuest("vm1", False)]


def test_faults_act_on_a_running_host_and_a_booting_host_gets_its_disk_state_at_boot():
    have = World({"h1": UP, "h2": DOWN})
    want = World({
        "h1": HostState(nic_up=False, links_cut=frozenset({"b"}), disk_failed=True),
        "h2": HostState(disk_failed=True),
    })
    assert plan(want, have) == [
        BootHost("h2", True), SetNic("h1", False), SetLink("h1", "b", False), SetDisk("h1", True)
    ]
    assert plan(want, converge(want, have)) == []
    healed = World({"h1": UP, "h2": UP})
    assert plan(healed, converge(want, have)) == [
        SetNic("h1", True), SetLink("h1", "b", True), SetDisk("h1", False), SetDisk("h2", False)
    ]


def test_a_guest_is_never_started_on_a_host_without_power():
    want = World({"h1": DOWN}, {"vm1": GuestState("h1", 5)})
    assert plan(want, World({"h1": DOWN})) == []


def test_converged_worlds_need_nothing():
    want = World({"h1": UP, "h2": HostState(nic_up=False)}, {"vm1": GuestState("h1", 3, paused=True)})
    assert plan(want, converge(want, World())) == []


# -- the guest's log --------------------------------------------------------------------------------------------


def scan(disk: bytes) -> LogScanner:
    scanner = LogScanner(len(disk))
    while (want := scanner.want()) is not None:
        offset, length = want
        scanner.feed(disk[offset : offset + length])
    return scanner


def write_log(payloads: list[bytes], size: int = 64 * 1024) -> bytearray:
    disk = bytearray(size)
    at = 0
    for seq, payload in enumerate(payloads, 1):
        record = encode_record(seq, payload)
        disk[at : at + len(record)] = record
        at += len(record)
    return disk


def test_a_log_reads_back_every_record_and_where_the_next_goes():
    payloads = [b"first", b"", b"x" * 700, "é".encode()]
    scanner = scan(bytes(write_log(payloads)))
    assert scanner.state is ScanState.END
    assert [r.payload for r in scanner.records] == payloads
    assert [r.seq for r in scanner.records] == [1, 2, 3, 4]
    assert scanner.end == sum(record_size(len(p)) for p in payloads)
    assert all(r.offset % SECTOR == 0 for r in scanner.records)


def test_a_fresh_disk_is_an_empty_log():
    scanner = scan(bytes(8192))
    assert scanner.records == [] and scanner.end == 0


def test_a_torn_record_ends_the_log_before_it():
    disk = write_log([b"kept", b"y" * 600])
    second = record_size(4)
    disk[second + 520] ^= 0xFF  # the second record's second sector: its payload no longer matches its crc
    scanner = scan(bytes(disk))
    assert [r.payload for r in scanner.records] == [b"kept"]
    assert scanner.end == second


def test_an_older_log_behind_the_end_is_not_read_as_new_records():
    disk = write_log([b"a", b"b", b"c"])
    newer = encode_record(1, b"z")  # a log started again over the old one: the old record 2 follows record 1
    disk[: len(newer)] = newer
    assert [r.payload for r in scan(bytes(disk)).records] == [b"z", b"b", b"c"]
    disk[record_size(1) : record_size(1) + SECTOR] = encode_record(5, b"old")[:SECTOR]
    assert [r.payload for r in scan(bytes(disk)).records] == [b"z"], "a record out of sequence ends the log"


def test_a_record_never_runs_past_the_disk():
    disk = write_log([b"a"], size=2 * SECTOR)
    scanner = scan(bytes(disk))
    assert [r.payload for r in scanner.records] == [b"a"]


# -- the protocol -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (b"PUT hello world", Put(b"hello world")),
        (b"PUT ", Put(b"")),
        (b"GET 12", Get(12)),
        (b"COUNT", Count()),
        (b"PING", Ping()),
        (b"ADD 17", Add(17)),
    ],
)
def test_requests_parse(line, parsed):
    assert parse_request(line) == parsed


@pytest.mark.parametrize("line", [b"GET x", b"GET", b"COUNT 3", b"DELETE 1", b"", b"ADD -1", b"ADD",
                                  b"ADD 1" + b"0" * 12])
def test_bad_requests_are_answered_not_fatal(line):
    assert isinstance(parse_request(line), BadRequest)


