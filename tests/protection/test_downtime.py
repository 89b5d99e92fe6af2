"""A failover's downtime is counted from when the host died (XAPI's host_metrics.last_updated), not from
when the console noticed, end to end from the simulator's crash to the failover event."""
from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from inventory.watcher import sync_once
from protection.models import FailoverEvent, Protection
from protection.observe import protection_observe_changes
from tests.inventory.factories import make_host, make_pool, make_vm
from tests.support import register_pool, start_sim, wait_for, xapi_login

pytestmark = pytest.mark.django_db


def lost_and_restarted(*, last_heard_at):
    pool = make_pool(ha_enabled=True, ha_host_failures_to_tolerate=1, ha_plan_exists_for=1)
    a, b = make_host(pool, name_label="host-a"), make_host(pool, name_label="host-b")
    vm = make_vm(pool, host=a, name_label="erp", ha_restart_priority="restart")
    Protection.objects.create(vm=vm, pool=pool, status="protected", observed_host=a, observed_power_state="Running")
    a.live, a.last_heard_at = False, last_heard_at
    a.save()
    vm.resident_on = b  # HA restarted it before the console looked
    vm.save()
    protection_observe_changes(pool=pool, changed={"host": {a.uuid}, "vm": {vm.uuid}})
    return FailoverEvent.objects.get(vm_uuid=vm.uuid)


def test_downtime_runs_from_when_xapi_last_heard_from_the_host():
    died = timezone.now() - dt.timedelta(seconds=40)
    event = lost_and_restarted(last_heard_at=died)
    assert event.state == "restarted" and event.detected_at == died
    assert 39 <= event.downtime_seconds < 60


def test_without_xapis_last_word_the_loss_is_dated_when_the_console_saw_it():
    event = lost_and_restarted(last_heard_at=None)  # negative control: nothing to date the death by
    assert event.downtime_seconds < 5


@pytest.mark.django_db(transaction=True)
def test_a_crashed_hosts_metrics_keep_the_moment_it_stopped_and_the_watcher_mirrors_it():
    """xapisim declares the host dead after its failure-detection timeout; like xapi, last_updated stays
    at the last time the host was heard from, and the watcher mirrors that into Host.last_heard_at."""
    sim = start_sim(op_delay=0.0, ha_timeout=2.5, boot_delay=0.1)
    try:
        pool = register_pool(sim)
        session = xapi_login(sim.url)
        api = session.xenapi
        master = api.pool.get_master(api.pool.get_all()[0])
        victim = next(h for h in api.host.get_all() if h != master)
        name = api.host.get_name_label(victim)
        crashed_at = timezone.now().replace(microsecond=0)
        sim.control("POST", f"/sim/hosts/{name}/crash", {})
        metrics = api.host.get_metrics(victim)
        wait_for(lambda: not api.host_metrics.get_live(metrics), timeout=20, message="the host declared dead")
        declared_at = timezone.now()
        sync_once(pool)
        host = pool.hosts.get(name_label=name)
        assert not host.live and host.last_heard_at is not None
        assert crashed_at - dt.timedelta(seconds=1) <= host.last_heard_at <= crashed_at + dt.timedelta(seconds=1)
        assert (declared_at - host.last_heard_at).total_seconds() >= 2  # not the moment it was declared dead
        session.xenapi.session.logout()
    finally:
        sim.stop()
