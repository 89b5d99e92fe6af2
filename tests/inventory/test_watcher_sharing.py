"""Several ``manage.py watch_pools`` processes share the pools: each pool watched by exactly one of them, a dead
one's pools taken over within seconds, a newcomer given its share.

First the arithmetic of the shares (``watch_lock.shares``, pure, checked against its definition on random
cases), then the hand-over inside one Supervisor (a pool's lock is let go of only once its watcher thread has
ended), then real processes: five simulated pools (xapisim, each its own server), two, then three watcher
processes on the test database, one of them killed with SIGKILL. Who watches a pool is read where the processes
themselves read it: PostgreSQL's locks (``pg_locks``) and ``Pool.watcher``.
"""
from __future__ import annotations

import logging
import random
import threading
import time
import uuid

import pytest
from django.core.management import call_command
from django.db import connections

from inventory import watcher as watcher_module
from inventory.models import VM, Pool
from inventory.services import pool_create
from inventory.watch_lock import NAMESPACE, PREFIX, shares
from inventory.watcher import PoolWatcher, Supervisor
from tests.api_fuzz_support import forget_queue
from tests.inventory.sharing_support import (
    Watchers,
    duplicate_vm_rows,
    ident,
    loads,
    lock_holders,
    vm_call,
    watched_by,
    watched_once,
)
from tests.restart_support import mirror_matches
from tests.support import start_sim, subprocess_env, wait_for

# The processes reread the pools and each other every POLL seconds. A dead watcher's pools must be taken over
# within POLL plus TAKEOVER seconds (the survivor's full sync of a small pool included); PATIENCE bounds
# everything else, generously, for a loaded machine.
POLL = 1.0
TAKEOVER = 10.0
PATIENCE = 30
POOLS = 5

pytestmark = pytest.mark.timeout(180)


# -- the shares, pure ---------------------------------------------------------------------------------------


def _random_case(rng: random.Random) -> tuple[list[int], list[str], dict[int, str]]:
    pools = rng.sample(range(1, 500), rng.randint(0, 40))
    members = [f"host-{rng.randint(0, 3)}:{rng.randint(2, 99999)}" for _ in range(rng.randint(1, 7))]
    others = ["solo:7", "backend 42"]  # a --pool process, a session that is no watcher
    holders = {pk: rng.choice(members + others) for pk in pools if rng.random() < 0.6}
    return pools, members, holders


def test_shares_give_every_free_or_member_held_pool_to_one_member_within_its_quota():
    rng = random.Random(1)
    for _ in range(2000):
        pools, members, holders = _random_case(rng)
        got = shares(pools, members, holders)
        # Every pool held by a non-member is left out; every other pool goes to exactly one member.
        shared = {pk for pk in pools if pk not in holders or holders[pk] in members}
        assert set(got) == shared
        assert set(got.values()) <= set(members)
        # Balanced: each member has its quota, the floor or the ceiling of the mean.
        base, extra = divmod(len(shared), len(set(members)))
        counts = sorted(sum(1 for m in got.values() if m == member) for member in set(members))
        assert counts == [base] * (len(set(members)) - extra) + [base + 1] * extra
        # Sticky: a member keeps what it holds, up to its quota.
        for member in set(members):
            held = [pk for pk in shared if holders.get(pk) == member]
            quota = sum(1 for m in got.values() if m == member)
            assert sum(1 for pk in held if got[pk] == member) == min(len(held), quota)
        # The same in every process: the order it lists the members in does not matter.
        assert shares(pools, rng.sample(members, len(members)), holders) == got


def test_a_newcomer_takes_only_its_share_and_a_dead_members_pools_alone_move():
    pools = list(range(1, 101))
    members = ["a:1", "b:2", "c:3"]
    settled = shares(pools, members, {})
    assert shares(pools, members, settled) == settled  # a settled state stays as it is

    joined = shares(pools, [*members, "d:4"], settled)
    moved = {pk for pk in pools if joined[pk] != settled[pk]}
    assert {joined[pk] for pk in moved} == {"d:4"} and len(moved) == 25

    survivors = [m for m in members if m != "b:2"]
    alive = {pk: m for pk, m in settled.items() if m != "b:2"}  # the dead one's locks went with its session
    after = shares(pools, survivors, alive)
    assert {pk for pk in pools if after[pk] != settled[pk]} == {pk for pk, m in settled.items() if m == "b:2"}
    # Negative control: without the holders (no stickiness), the same survivors would move other pools too.
    assert any(shares(pools, survivors, {})[pk] != m for pk, m in alive.items())


def test_pools_held_by_a_pool_limited_watcher_are_left_out_of_the_shares():
    holders = {1: "solo:9", 2: "a:1"}
    got = shares([1, 2, 3, 4], ["a:1", "b:2"], holders)
    assert 1 not in got and sorted(got) == [2, 3, 4] and got[2] == "a:1"


# -- one Supervisor handing a pool over ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_pool_handed_over_keeps_its_lock_until_its_watcher_thread_has_ended(monkeypatch, caplog):
    """A watcher thread that does not end when told keeps its pool's lock (and Pool.watcher): let go of only once
    the thread has ended, so that the process taking the pool over never writes beside it."""
    ended = threading.Event()

    class Stubborn(PoolWatcher):
        def run(self) -> None:  # deaf to stop() until the test says so
            ended.wait(30)

    monkeypatch.setattr(watcher_module, "PoolWatcher", Stubborn)
    pools = [Pool.objects.create(name=f"p{i}", url=f"http://127.0.0.1:{9 + i}", username="root", password="x")
             for i in range(2)]  # fmt: skip
    supervisor = Supervisor(poll_interval=60, join_timeout=0.2)
    other = connections.create_connection("default")  # a second watcher process, as the database sees it
    try:
        supervisor.reconcile()
        me = supervisor.ident
        assert watched_by([p.pk for p in pools]) == {p.pk: me for p in pools}  # alone: both pools here

        with other.cursor() as cursor:
            cursor.execute("SELECT set_config('application_name', %s, false)", [f"{PREFIX}elsewhere:1"])
        with caplog.at_level(logging.INFO, logger="inventory.watcher"):
            supervisor.reconcile()
        (given,) = supervisor.stopping  # one of the two assigned to the newcomer, its thread told to stop
        kept = next(p.pk for p in pools if p.pk != given)
        assert f"assigned to {PREFIX}elsewhere:1" in caplog.text and "keeping the pool's lock" in caplog.text
        # The thread still runs: its pool is still locked and recorded here, at this reconcile and the next.
        assert watched_by([given, kept]) == {given: me, kept: me}
        supervisor.reconcile()
        assert watched_by([given, kept]) == {given: me, kept: me}

        ended.set()
        wait_for(lambda: not supervisor.stopping[given].is_alive(), message="the stubborn thread to end")
        supervisor.reconcile()
        assert given not in lock_holders() and Pool.objects.get(pk=given).watcher == ""
        assert watched_by([kept]) == {kept: me}
    finally:
        ended.set()
        supervisor.shutdown()
        other.close()
    assert not lock_holders() and set(Pool.objects.values_list("watcher", flat=True)) == {""}


@pytest.mark.django_db(transaction=True)
def test_a_pool_limited_watcher_takes_its_pools_when_free_and_gives_none_away(monkeypatch, caplog):
    monkeypatch.setattr(watcher_module, "PoolWatcher", _Idle)
    pools = [Pool.objects.create(name=f"p{i}", url=f"http://127.0.0.1:{9 + i}", username="root", password="x")
             for i in range(2)]  # fmt: skip
    busy, free = (p.pk for p in pools)
    other = connections.create_connection("default")  # a sharing watcher with nothing but the first pool
    supervisor = Supervisor(names=["p0", "p1"], poll_interval=60)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT set_config('application_name', %s, false)", [f"{PREFIX}elsewhere:1"])
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [NAMESPACE, busy])
        with caplog.at_level(logging.INFO, logger="inventory.watcher"):
            supervisor.reconcile()
            supervisor.reconcile()  # the sharing watcher holds one pool and this one one: nothing moves
        assert supervisor.locks.name.endswith(" --pool")
        assert watched_by([free]) == {free: supervisor.ident} and lock_holders()[busy] == ["elsewhere:1"]
        assert f"pool p0: another watcher holds it ({PREFIX}elsewhere:1)" in caplog.text
        assert "assigned to" not in caplog.text

        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock_all()")
        supervisor.reconcile()
        assert watched_by([busy, free]) == {busy: supervisor.ident, free: supervisor.ident}
    finally:
        supervisor.shutdown()
        other.close()


class _Idle(PoolWatcher):
    """A watcher thread that writes nothing and ends when told."""

    def run(self) -> None:
        self._stopping.wait(30)


# -- real processes --------------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, sims, pools, watchers: Watchers) -> None:
        self.sims = sims
        self.pools = pools
        self.ids = [pool.pk for pool in pools]
        self.watchers = watchers

    def sim_of(self, pool_id: int):
        return self.sims[self.ids.index(pool_id)]

    def mirrors_match(self) -> bool:
        return all(mirror_matches(sim, pk) for sim, pk in zip(self.sims, self.ids, strict=True))


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker, tmp_path_factory):
    """Five small simulated pools, registered; watcher processes are started by the tests (and all stopped at the
    end of the module, when the database is emptied as after any test that commits)."""
    sims = [start_sim("generated", hosts=2, vms=4, seed=i + 1) for i in range(POOLS)]
    env = subprocess_env(LOG_LEVEL="INFO", EAC_EVENT_TIMEOUT="5",
                         CELERY_TASK_DEFAULT_QUEUE=f"eactest-sharing-{uuid.uuid4().hex[:12]}")  # fmt: skip
    watchers = Watchers(env, tmp_path_factory.mktemp("sharing"), poll=POLL)
    try:
        with django_db_blocker.unblock():
            pools = [pool_create(name=f"pool-{i}", url=sim.url, username=sim.user, password=sim.password,
                                 verify_tls=False) for i, sim in enumerate(sims)]  # fmt: skip
        yield Cluster(sims, pools, watchers)
    finally:
        watchers.stop_all()
        for sim in sims:
            sim.stop()
        forget_queue(env)
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)


@pytest.fixture
def live(cluster, django_db_blocker):
    """The cluster, with the test free to read the database (the module's rows stay from one test to the next)."""
    with django_db_blocker.unblock():
        yield cluster


def test_two_watchers_share_the_pools_each_watched_once_with_every_row_once(live):
    a, b = live.watchers.start(2)
    # They may start a second apart, the first taking everything: the shares settle at three and two.
    owners = wait_for(lambda: (o := watched_once(live.ids, [a, b])) and sorted(loads(o, [a, b])) == [2, 3] and o,
                      timeout=PATIENCE, message=f"three pools and two\n{live.watchers.logs()}")  # fmt: skip
    wait_for(live.mirrors_match, timeout=PATIENCE, interval=0.5,
             message=f"every pool's rows, once each\n{live.watchers.logs()}")  # fmt: skip
    assert not duplicate_vm_rows(live.ids)
    assert all(len(holders) == 1 for holders in lock_holders().values())
    assert Pool.objects.filter(pk__in=live.ids, watched_since__isnull=False, connection_state="connected").count() \
        == POOLS
    assert watched_by(live.ids) == owners


def test_a_third_watcher_takes_its_share_and_every_pool_stays_watched_once(live):
    a, b = live.watchers.live
    busiest = max((a, b), key=lambda p: loads(watched_by(live.ids), [p])[0])  # holds three: one too many
    (c,) = live.watchers.start(1)
    owners = wait_for(lambda: (o := watched_once(live.ids, [a, b, c])) and sorted(loads(o, [a, b, c])) == [1, 2, 2]
                      and o, timeout=PATIENCE, message=f"two, two and one\n{live.watchers.logs()}")  # fmt: skip
    assert loads(owners, [c]) == [1]
    given = next(pk for pk, owner in owners.items() if owner == ident(c))
    name = Pool.objects.get(pk=given).name
    # Handed over, said so by the one that let go: to the newcomer, its thread ended first.
    assert f"pool {name}: assigned to {PREFIX}{ident(c)}" in busiest.output()
    assert busiest.output().index(f"pool {name}: let go of it") > busiest.output().index(f"pool {name}: assigned")
    wait_for(live.mirrors_match, timeout=PATIENCE, interval=0.5,
             message=f"every pool's rows, once each\n{live.watchers.logs()}")  # fmt: skip
    assert not duplicate_vm_rows(live.ids)


def test_a_killed_watchers_pools_are_taken_over_within_seconds_and_no_change_is_missed(live):
    procs = live.watchers.live
    owners = watched_once(live.ids, procs)
    assert owners is not None
    victim = max(procs, key=lambda p: loads(owners, [p])[0])
    survivors = [p for p in procs if p is not victim]
    orphans = [pk for pk, owner in owners.items() if owner == ident(victim)]

    # The survivors held still, so that nobody can take the orphans yet; the victim killed outright.
    live.watchers.pause(*survivors)
    try:
        victim.kill()
        wait_for(lambda: not any(pk in lock_holders() for pk in orphans), timeout=PATIENCE,
                 message="the dead watcher's session and locks gone")  # fmt: skip
        # A change in an orphaned pool while nobody watches it.
        sim = live.sim_of(orphans[0])
        running = next(vm for vm in sim.state()["vms"] if vm["power_state"] == "Running"
                       and not vm["is_control_domain"])  # fmt: skip
        vm_call(sim, "hard_shutdown", running["uuid"])
        assert next(vm for vm in sim.state()["vms"] if vm["uuid"] == running["uuid"])["power_state"] == "Halted"
        # Negative control: nobody holds the orphans, Pool.watcher still names the dead one, the change is not in.
        assert watched_by(orphans) == dict.fromkeys(orphans)
        assert set(Pool.objects.filter(pk__in=orphans).values_list("watcher", flat=True)) == {ident(victim)}
        assert VM.objects.get(pool_id=orphans[0], uuid=running["uuid"]).power_state == "Running"
    finally:
        live.watchers.resume(*survivors)
    resumed = time.monotonic()

    owners = wait_for(lambda: watched_once(live.ids, survivors), timeout=POLL + TAKEOVER,
                      message=f"the orphans taken over\n{live.watchers.logs()}")  # fmt: skip
    taken_after = time.monotonic() - resumed
    assert sorted(loads(owners, survivors)) == [2, 3]
    logs = "".join(p.output() for p in survivors)
    for pk in orphans:
        assert f"pool {Pool.objects.get(pk=pk).name}: its watcher {PREFIX}{ident(victim)} died; taking over" in logs
    # The change made while nobody watched arrives with the takeover's full sync; so does every other row.
    wait_for(lambda: VM.objects.get(pool_id=orphans[0], uuid=running["uuid"]).power_state == "Halted",
             timeout=PATIENCE, message=f"the change mirrored\n{live.watchers.logs()}")  # fmt: skip
    wait_for(live.mirrors_match, timeout=PATIENCE, interval=0.5,
             message=f"every pool's rows, once each\n{live.watchers.logs()}")  # fmt: skip
    assert not duplicate_vm_rows(live.ids)
    # And the events after it, on the survivor now watching the pool.
    vm_call(sim, "start", running["uuid"], False, False)
    wait_for(lambda: VM.objects.get(pool_id=orphans[0], uuid=running["uuid"]).power_state == "Running",
             timeout=PATIENCE, message=f"the next change mirrored\n{live.watchers.logs()}")  # fmt: skip
    print(f"orphans taken over {taken_after:.1f} s after the survivors ran again (poll {POLL} s)")
