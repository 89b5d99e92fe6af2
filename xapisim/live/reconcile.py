"""What the live bed must do to make the machines match the simulated pool (pure: no processes, no namespaces).

The pool's records and the simulator's hardware state say what *should* run (``want``): which hosts are powered
on, whose NIC, availability links and disk are broken, and which live guests run where, paused or not. The bed
remembers what it made true (``have``). ``plan(want, have)`` lists the actions that take ``have`` to ``want``, in
an order that is safe for the machines:

1. hosts that lost power: every process of the host and of its guests killed in one sweep (a crash: nothing of the
   host outlives the rest and acts on what it sees);
2. guests that must stop (their VM halted, rebooted or restarted elsewhere, or their host lost power: then hard),
   and guests live-migrated (``VM.pool_migrate``: the same process, its NIC moved to the target host);
3. hosts powered on (AM and disk server started);
4. NIC, link and disk faults;
5. guests that must start, then pause / unpause. A VM started paused gets a *reserved* guest: its process is
   started but waits, its NIC off the bridge, touching neither disk nor network until the VM is unpaused; then
   it goes on from there (the paused secondary VM of Levels 2 and 3: its takeover skips the process's start).

``after(have, action)`` is the world once an action is done, so the shell can record progress action by action.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

LINKS = ("a", "b")


@dataclass(frozen=True)
class HostState:
    up: bool = True  # powered on: its AM and disk server run
    nic_up: bool = True  # the NIC (eth0) passes traffic
    links_cut: frozenset[str] = frozenset()  # availability links cut at this host
    disk_failed: bool = False


@dataclass(frozen=True)
class GuestState:
    host: str
    domid: int = 0  # a new domain (a reboot, a migration) is a new guest process
    paused: bool = False
    reserved: bool = False  # (have only) started paused: its process waits to go on, it has not run yet


@dataclass(frozen=True)
class Migration:
    """A live migration XAPI recorded: the guest that ran as domain ``old_domid`` on ``source`` is the VM's domain
    ``domid`` on ``target`` now (a migration makes a new domain; on the bed the guest process stays)."""

    source: str
    old_domid: int
    target: str
    domid: int


@dataclass(frozen=True)
class World:
    hosts: Mapping[str, HostState] = field(default_factory=dict)
    guests: Mapping[str, GuestState] = field(default_factory=dict)  # VM ref -> where its guest runs
    migrations: Mapping[str, Migration] = field(default_factory=dict)  # (want only) VM ref -> its live migration


# -- actions -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopGuest:
    vm: str
    hard: bool  # SIGKILL at once (its host died), not a clean stop


@dataclass(frozen=True)
class CrashHost:
    host: str


@dataclass(frozen=True)
class BootHost:
    host: str
    disk_failed: bool


@dataclass(frozen=True)
class SetNic:
    host: str
    up: bool


@dataclass(frozen=True)
class SetLink:
    host: str
    link: str
    up: bool


@dataclass(frozen=True)
class SetDisk:
    host: str
    failed: bool


@dataclass(frozen=True)
class StartGuest:
    vm: str
    host: str
    domid: int = 0


@dataclass(frozen=True)
class ReserveGuest:
    """Start the guest of a VM started paused, waiting: ``StartGuest`` lets it go on."""

    vm: str
    host: str
    domid: int = 0


@dataclass(frozen=True)
class PauseGuest:
    vm: str
    paused: bool


@dataclass(frozen=True)
class MigrateGuest:
    vm: str
    host: str  # the target host
    domid: int


Action = (StopGuest | CrashHost | BootHost | SetNic | SetLink | SetDisk | StartGuest | ReserveGuest | PauseGuest
          | MigrateGuest)


def migrated(want: World, vm: str, now: GuestState, target: GuestState) -> bool:
    """The guest running as ``now`` became ``target`` by a live migration (not a restart elsewhere)."""
    m = want.migrations.get(vm)
    return m is not None and (m.source, m.old_domid) == (now.host, now.domid) and (m.target, m.domid) == (
        target.host, target.domid)


def plan(want: World, have: World) -> list[Action]:
    down = {h for h, s in want.hosts.items() if not s.up}
    actions: list[Action] = [CrashHost(host) for host, target in want.hosts.items()
                             if have.hosts.get(host, HostState(up=False)).up and not target.up]
    kept: dict[str, GuestState] = {}
    for vm, now in have.guests.items():
        target = want.guests.get(vm)
        if target is not None and (target.host, target.domid) != (now.host, now.domid) and migrated(
                want, vm, now, target) and now.host not in down and not now.reserved:
            actions.append(MigrateGuest(vm, target.host, target.domid))
            kept[vm] = replace(now, host=target.host, domid=target.domid)
        elif target is None or (target.host, target.domid) != (now.host, now.domid):
            actions.append(StopGuest(vm, hard=now.host in down))
        else:
            kept[vm] = now

    for host, target in want.hosts.items():
        now = have.hosts.get(host, HostState(up=False))
        if target.up and not now.up:
            actions.append(BootHost(host, target.disk_failed))

    for host, target in want.hosts.items():
        now = have.hosts.get(host, HostState(up=False))
        if target.nic_up != now.nic_up:
            actions.append(SetNic(host, target.nic_up))
        for link in LINKS:
            if (link in target.links_cut) != (link in now.links_cut):
                actions.append(SetLink(host, link, link not in target.links_cut))
        # A booting host starts with the wanted disk state; a running one is told.
        if target.up and now.up and target.disk_failed != now.disk_failed:
            actions.append(SetDisk(host, target.disk_failed))

    for vm, target in want.guests.items():
        if not want.hosts.get(target.host, HostState(up=False)).up:
            continue  # never start a guest on a host without power (want should not ask for it)
        now_guest = kept.get(vm)
        if now_guest is None:
            # A VM started paused runs nothing yet (its memory is reserved in XAPI): its guest is reserved, and
            # starts, from its disk or its checkpoint, when it is unpaused. A running guest that is paused keeps its
            # process, stopped.
            actions.append((ReserveGuest if target.paused else StartGuest)(vm, target.host, target.domid))
        elif now_guest.reserved:
            if not target.paused:
                actions.append(StartGuest(vm, target.host, target.domid))
        elif now_guest.paused != target.paused:
            actions.append(PauseGuest(vm, target.paused))
    return actions


def after(have: World, action: Action) -> World:
    """The world once ``action`` is done."""
    hosts, guests = dict(have.hosts), dict(have.guests)
    if isinstance(action, StopGuest):
        guests.pop(action.vm, None)
    elif isinstance(action, CrashHost):
        hosts[action.host] = replace(hosts.get(action.host, HostState()), up=False)
    elif isinstance(action, BootHost):
        hosts[action.host] = replace(hosts.get(action.host, HostState()), up=True, disk_failed=action.disk_failed)
    elif isinstance(action, SetNic):
        hosts[action.host] = replace(hosts.get(action.host, HostState(up=False)), nic_up=action.up)
    elif isinstance(action, SetLink):
        now = hosts.get(action.host, HostState(up=False))
        cut = now.links_cut - {action.link} if action.up else now.links_cut | {action.link}
        hosts[action.host] = replace(now, links_cut=frozenset(cut))
    elif isinstance(action, SetDisk):
        hosts[action.host] = replace(hosts.get(action.host, HostState()), disk_failed=action.failed)
    elif isinstance(action, StartGuest):
        guests[action.vm] = GuestState(action.host, action.domid)
    elif isinstance(action, ReserveGuest):
        guests[action.vm] = GuestState(action.host, action.domid, paused=True, reserved=True)
    elif isinstance(action, PauseGuest):
        guests[action.vm] = replace(guests[action.vm], paused=action.paused)
    elif isinstance(action, MigrateGuest):
        guests[action.vm] = replace(guests[action.vm], host=action.host, domid=action.domid)
    return World(hosts, guests)
