"""What the console concludes from the inventory the watcher keeps: failovers, plan, reachability."""
from __future__ import annotations

import pytest

from alerts.choices import Condition
from alerts.models import Alert, Delivery, Recipient
from protection.models import FailoverEvent, Protection
from protection.observe import protection_observe_changes
from tests.inventory.factories import make_host, make_pool, make_vm

pytestmark = pytest.mark.django_db


@pytest.fixture
def protected():
    pool = make_pool(ha_enabled=True, ha_host_failures_to_tolerate=1, ha_plan_exists_for=1)
    a, b = make_host(pool, name_label="host-a"), make_host(pool, name_label="host-b")
    vm = make_vm(pool, host=a, name_label="erp", ha_restart_priority="restart")
    protection = Protection.objects.create(vm=vm, pool=pool, status="protected", observed_host=a,
                                           observed_power_state="Running")
    Recipient.objects.create(email="ops@example.org")
    return pool, a, b, vm, protection


def mails(condition: str, kind: str) -> int:
    return Delivery.objects.filter(alert__condition=condition, kind=kind).count()


def test_vm_not_restarted_in_time_raises_restart_failed_and_clears_when_it_runs_again(protected, settings):
    pool, a, b, vm, protection = protected
    a.live = False
    a.save()
    vm.power_state, vm.resident_on = "Halted", None
    vm.save()
    protection_observe_changes(pool=pool, changed={"host": {a.uuid}, "vm": {vm.uuid}})
    event = FailoverEvent.objects.get(vm_uuid=vm.uuid)
    assert event.state == "down" and event.from_host == a
    assert Protection.objects.get(pk=protection.pk).status == "failing_over"
    assert mails("host_lost", "raised") == 1

    settings.EAC_RESTART_GRACE = 0
    protection_observe_changes(pool=pool, changed={"vm": {vm.uuid}})
    protection_observe_changes(pool=pool, changed={"vm": {vm.uuid}})
    assert FailoverEvent.objects.get(pk=event.pk).state == "failed"
    assert Protection.objects.get(pk=protection.pk).status == "failed"
    assert mails("vm_restart_failed", "raised") == 1

    vm.power_state, vm.resident_on = "Running", b
    vm.save()
    protection_observe_changes(pool=pool, changed={"vm": {vm.uuid}})
    assert Protection.objects.get(pk=protection.pk).status == "protected"
    assert FailoverEvent.objects.get(pk=event.pk).to_host == b
    assert mails("vm_restart_failed", "cleared") == 1


def test_plan_overcommitted_degrades_protections_and_clears_when_the_plan_holds_again(protected):
    pool, a, b, vm, protection = protected
    pool.ha_plan_exists_for, pool.ha_overcommitted = 0, True
    pool.save()
    protection_observe_changes(pool=pool, changed={"pool": {pool.uuid}})
    protection_observe_changes(pool=pool, changed={"pool": {pool.uuid}})
    alert = Alert.objects.get(condition="plan_overcommitted", state="open")
    assert pool.name in alert.message and alert.new_state == "tolerates 0"
    assert Protection.objects.get(pk=protection.pk).status == "degraded"
    assert mails("plan_overcommitted", "raised") == 1
    pool.ha_plan_exists_for, pool.ha_overcommitted = 1, False
    pool.save()
    protection_observe_changes(pool=pool, changed={"pool": {pool.uuid}})
    assert Protection.objects.get(pk=protection.pk).status == "protected"
    assert mails("plan_overcommitted", "cleared") == 1


def test_pool_unreachable_is_raised_once_and_cleared_once_and_hosts_are_not_judged_meanwhile(protected):
    pool, a, b, vm, protection = protected
    pool.connection_state, pool.last_error = "unreachable", "Nothing answers (connection refused)."
    pool.save()
    a.live = False  # stale: the console cannot know
    a.save()
    for _ in range(2):
        protection_observe_changes(pool=pool)
    assert mails("pool_unreachable", "raised") == 1
    assert "connection refused" in Alert.objects.get(condition="pool_unreachable").message
    assert not Alert.objects.filter(condition="host_lost").exists()
    pool.connection_state = "connected"
    pool.save()
    a.live = True
    a.save()
    protection_observe_changes(pool=pool)
    assert mails("pool_unreachable", "cleared") == 1


def test_a_migration_between_live_hosts_is_not_a_failover(protected):
    pool, a, b, vm, protection = protected
    vm.resident_on = b
    vm.save()
    protection_observe_changes(pool=pool, changed={"vm": {vm.uuid}})
    assert not FailoverEvent.objects.exists()
    assert Protection.objects.get(pk=protection.pk).observed_host == b
    assert not Alert.objects.exists()


def test_a_batch_of_unprotected_vms_in_a_pool_without_ha_costs_one_read(django_assert_num_queries):
    """A busy pool's VM events come many a second: without HA and with none of them protected there is nothing to
    judge, and the watcher's batch is not held up by the alerts of the pool (judged when the pool itself changes)."""
    pool = make_pool(ha_enabled=False)
    host = make_host(pool, name_label="host-a")
    vms = [make_vm(pool, host=host, name_label=f"vm-{i}") for i in range(3)]
    # whether any of them is protected, with no transaction; it was 12 (then 4: the pool, the protections among the
    # VMs, locked, in a transaction), two of them taking a row lock each to clear alerts that were not open
    with django_assert_num_queries(1):
        protection_observe_changes(pool=pool, changed={"vm": {vm.uuid for vm in vms}})
    # a protected one among them is judged as before
    Protection.objects.create(vm=vms[0], pool=pool, status="protected", observed_host=host,
                              observed_power_state="Running")
    vms[0].power_state, vms[0].resident_on = "Halted", None
    vms[0].save()
    protection_observe_changes(pool=pool, changed={"vm": {vms[0].uuid}})
    assert Protection.objects.get(vm=vms[0]).status != "protected"


def test_a_batch_of_unprotected_vms_in_a_pool_with_ha_judges_its_failover_plan():
    """VMs starting and stopping move the failover plan: where HA is on, a batch of VM events judges it even when none
    of the VMs is protected."""
    pool = make_pool(ha_enabled=True, ha_host_failures_to_tolerate=1, ha_plan_exists_for=0)
    host = make_host(pool, name_label="host-a")
    vm = make_vm(pool, host=host, name_label="vm-0")
    protection_observe_changes(pool=pool, changed={"vm": {vm.uuid}})
    assert Alert.objects.filter(condition=Condition.PLAN_OVERCOMMITTED, state="open").count() == 1
