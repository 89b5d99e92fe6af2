"""Level 2 component health against real Availability Managers: a witness and two peered agents on loopback
(``python -m am``, the pair of test_level2_am_client.py), the console's records of a protection of theirs in
Postgres, a real Celery worker and beat for the periodic poll and the actions, and mail through aiosmtpd.

An availability link is cut the way tests/am's bed cuts one, by silence: an nftables table of this test's own
drops the link's TCP segments on loopback (root only); deleting the table repairs it.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import tomllib

import pytest
from django.urls import reverse

from alerts.choices import AlertState, Condition
from alerts.keys import component_key
from alerts.models import Alert
from inventory.models import VM
from protection import health, services
from protection.choices import Health, Level, ProtectionStatus
from protection.models import ProtectedDisk, Protection
from protection.selectors import vm_health_marks, vm_protection_states
from tests.inventory.factories import (
    GiB,
    make_disk,
    make_host,
    make_network,
    make_nic,
    make_pif,
    make_pool,
    make_sr,
    make_vm,
)
from tests.protection.test_level2_am_client import Pair, healthy
from tests.support import wait_for

SIZE = 1 * 2**20


@pytest.fixture
def ams(tmp_path):
    pair = Pair(tmp_path).start()
    yield pair
    pair.stop()


def _records(ams: Pair) -> dict:
    """The console's side: a pool with hosts hosta and hostb (their AMs on loopback), a VM on hosta with one
    disk and one NIC, protected at Level 2 with hostb as its secondary; and the disk's resources on both AMs,
    in sync."""
    pool = make_pool()
    a = make_host(pool, name_label="hosta", memory_free=16 * GiB)
    b = make_host(pool, name_label="hostb", memory_free=16 * GiB)
    for host, peer in ((a, b), (b, a)):
        host.am_url, host.am_peer = ams.urls[host.name_label], peer.uuid
        host.save()
    local = make_sr(pool, shared=False, name_label="Local storage of hosta")
    net = make_network(pool, name_label="Pool-wide network")
    pif_a = make_pif(a, net, device="eth0", carrier=True)
    make_pif(b, net, device="eth0", carrier=True)
    vm = make_vm(pool, host=a, name_label="db-01", memory_static_max=GiB)
    vbd = make_disk(vm, local, userdevice="0", virtual_size=SIZE)
    make_nic(vm, net, device="0")
    protection = Protection.objects.create(vm=vm, pool=pool, level=Level.COMPONENT_FT,
                                           status=ProtectionStatus.PROTECTED, secondary_host=b,
                                           secondary_memory=GiB)
    resource = f"vdi-{vbd.vdi.uuid}"
    ProtectedDisk.objects.create(protection=protection, resource=resource, userdevice="0",
                                 primary_vdi_uuid=vbd.vdi.uuid, primary_host=a, secondary_host=b,
                                 primary_am_url=ams.urls["hosta"], secondary_am_url=ams.urls["hostb"], size=SIZE,
                                 primary_resource=True, secondary_resource=True)
    first, second = ams.client("hosta"), ams.client("hostb")
    wait_for(lambda: healthy(first) and healthy(second), timeout=30, message="the pair connected, witness reachable")
    first.resource_create(name=resource, role="primary", size=SIZE)
    second.resource_create(name=resource, role="secondary", size=SIZE)
    wait_for(lambda: second.resource(resource)["disk"] == "UpToDate", timeout=30, message="the replica in sync")
    return {"pool": pool, "a": a, "b": b, "vm": vm, "protection": protection, "resource": resource,
            "pif_a": pif_a}


def _link_ports(ams: Pair, link: str) -> list[str]:
    """The TCP ports of availability link ``link`` on both agents (their configs)."""
    return [tomllib.loads((ams.tmp / f"{node}.toml").read_text())["links"][link].rsplit(":", 1)[1]
            for node in ("hosta", "hostb")]


def _poll(protection: Protection) -> Protection:
    services.protection_health_record(reading=health.protection_read(protection))
    return Protection.objects.get(pk=protection.pk)


def _states(protection: Protection) -> dict[str, str]:
    return {c["id"]: c["state"] for c in protection.components}


def _component(protection: Protection, cid: str) -> dict:
    return next(c for c in protection.components if c["id"] == cid)


@pytest.fixture
def bed(ams, settings, db):
    settings.EAC_AM_TOKEN_FILE, settings.EAC_AM_TOKEN = "", ams.token
    return _records(ams)


def test_a_healthy_pair_gives_every_component_ok_and_the_protection_protected(bed, admin_client, admin_api):
    a, b = bed["a"], bed["b"]
    protection = _poll(bed["protection"])
    states = _states(protection)
    assert states == {
        f"am@{a.uuid}": "ok", f"am@{b.uuid}": "ok", "peer": "ok", "link:a": "ok", "link:b": "ok",
        f"witness@{a.uuid}": "ok", f"witness@{b.uuid}": "ok", f"disk:0@{a.uuid}": "ok", f"disk:0@{b.uuid}": "ok",
        f"nic:0@{a.uuid}": "ok", f"nic:0@{b.uuid}": "ok",
    }
    assert protection.status == ProtectionStatus.PROTECTED and protection.status_reason == ""
    assert all(c["since"] and c["host_name"] in ("hosta", "hostb", "hosta and hostb") for c in protection.components)
    assert not Alert.objects.exists()
    assert vm_protection_states([bed["vm"]])[bed["vm"].pk].health == Health.GOOD

    body = admin_api.get(f"/api/v1/protections/{protection.pk}/").json()
    assert {c["id"] for c in body["components"]} == set(states)
    assert body["components_checked_at"] and body["failed_over_to"] is None

    page = admin_client.get(reverse("console:vm_detail", args=[bed["vm"].uuid])).content.decode()
    assert "level2-components" in page and "Availability link: Link A" in page and "Disk replica: 0" in page
    assert "Never validated" in page and "act-validate" in page


def test_a_cut_link_is_degraded_alerted_once_and_cleared_once_when_repaired(ams, bed, console_env, start_proc,
                                                                             smtp_server, tmp_path):
    """Beat and worker do the polling; link A's TCP is dropped on loopback by a table of this test's own."""
    from alerts.models import Recipient

    Recipient.objects.create(email="ops@example.org")
    env = {**console_env, "EAC_AM_TOKEN": ams.token, "EAC_AM_HEALTH_INTERVAL": "0.5",
           "EAC_AM_HEALTH_TIMEOUT": "2"}
    start_proc("worker", env)
    start_proc("beat", env)
    protection, vm, a = bed["protection"], bed["vm"], bed["a"]
    wait_for(lambda: Protection.objects.get(pk=protection.pk).components, timeout=30,
             message="the beat's first poll of the AMs")
    assert Protection.objects.get(pk=protection.pk).status == ProtectionStatus.PROTECTED

    table = f"eachealth{secrets.token_hex(3)}"
    ports = ", ".join(_link_ports(ams, "a"))
    nft = ["nft", "-f", "-"]
    rules = (f"table inet {table} {{\n chain input {{\n type filter hook input priority -5; policy accept;\n"
             f" tcp dport {{ {ports} }} drop\n tcp sport {{ {ports} }} drop\n }}\n}}\n")
    if os.geteuid() != 0:
        pytest.skip("cutting a link needs root (nftables)")
    subprocess.run(nft, input=rules, text=True, check=True)
    try:
        cut = wait_for(lambda: (p := Protection.objects.get(pk=protection.pk)) and
                       _states(p).get("link:a") == "degraded" and p, timeout=40, message="link A seen down")
        assert cut.status == ProtectionStatus.DEGRADED and "link A" in cut.status_reason
        assert _states(cut)["link:b"] == "ok" and _states(cut)["peer"] == "degraded"
        assert "cable" in _component(cut, "link:a")["repair"]
        # The tree: the VM's badge and its host's mark say degraded.
        assert vm_protection_states([vm])[vm.pk].health == Health.DEGRADED
        assert vm_health_marks([bed["pool"].pk])[(bed["pool"].pk, a.pk)] == Health.DEGRADED
        raised = smtp_server.wait(condition=Condition.REDUNDANCY_LOST, kind="raised", count=2, timeout=30)
        subjects = " ".join(str(m["Subject"]) + m.get_body().get_content() for m in raised)
        assert "db-01" in subjects and "hosta" in subjects
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)

    back = wait_for(lambda: (p := Protection.objects.get(pk=protection.pk)) and
                    p.status == ProtectionStatus.PROTECTED and p, timeout=60, message="link A back, protected")
    assert set(_states(back).values()) == {"ok"}
    key = component_key(vm, "link:a")
    link_alerts = Alert.objects.filter(condition=Condition.REDUNDANCY_LOST, object_key=key)
    assert link_alerts.count() == 1 and link_alerts.get().state == AlertState.CLEARED  # raised once, cleared once
    smtp_server.wait(condition=Condition.REDUNDANCY_LOST, kind="cleared", count=2, timeout=30)
    for kind in ("raised", "cleared"):
        mails = [m for m in smtp_server.matching(condition=Condition.REDUNDANCY_LOST, kind=kind)
                 if m["X-eAC-Alert"] == str(link_alerts.get().pk)]
        assert len(mails) == 1, (kind, len(mails))
    assert vm_protection_states([vm])[vm.pk].health == Health.GOOD
    assert not vm_health_marks([bed["pool"].pk])


def test_an_unreachable_am_is_an_unknown_component_and_not_a_crash(ams, bed):
    ams.procs["hostb"].stop()
    b = bed["b"]
    protection = wait_for(lambda: (p := _poll(bed["protection"])) and _states(p).get("peer") == "failed" and p,
                          timeout=30, message="hosta to see its peer lost")
    states = _states(protection)
    assert states[f"am@{b.uuid}"] == "unknown" and states[f"disk:0@{b.uuid}"] == "unknown"
    assert states[f"witness@{b.uuid}"] == "unknown"
    assert "AM on host hostb unreachable" in _component(protection, f"am@{b.uuid}")["detail"]
    assert protection.status == ProtectionStatus.DEGRADED
    am_alert = Alert.objects.get(condition=Condition.REDUNDANCY_LOST,
                                 object_key=component_key(bed["vm"], f"am@{b.uuid}"))
    assert am_alert.state == AlertState.OPEN and "hostb" in am_alert.message
    # Polling again folds into the same alerts: raised once.
    _poll(protection)
    assert Alert.objects.filter(condition=Condition.REDUNDANCY_LOST, state=AlertState.OPEN).count() == \
        Alert.objects.filter(condition=Condition.REDUNDANCY_LOST).count()
    # Not even an address: still a component state.
    ProtectedDisk.objects.update(secondary_am_url="http://127.0.0.1:9/")
    assert _states(_poll(protection))[f"am@{b.uuid}"] == "unknown"


def test_a_nic_without_carrier_is_degraded_with_what_to_repair(bed):
    bed["pif_a"].carrier = False
    bed["pif_a"].save()
    protection = _poll(bed["protection"])
    nic = _component(protection, f"nic:0@{bed['a'].uuid}")
    assert nic["state"] == "degraded" and "no carrier" in nic["detail"] and "eth0" in nic["repair"]
    assert protection.status == ProtectionStatus.DEGRADED


def test_validate_on_demand_runs_verify_and_shows_the_result_on_the_vm_page(ams, bed, console_env, start_proc,
                                                                           admin_api, admin_client):
    start_proc("worker", {**console_env, "EAC_AM_TOKEN": ams.token})
    protection = _poll(bed["protection"])
    response = admin_api.post(f"/api/v1/protections/{protection.pk}/validate/")
    assert response.status_code == 202, response.content
    assert response.json()["action"] == "validate" and response.json()["queued"] is True
    done = wait_for(lambda: (p := Protection.objects.get(pk=protection.pk)).last_verify and p, timeout=30,
                    message="the validation's result")
    assert done.last_verify["ok"] is True and done.last_verify["mismatches"] == 0
    assert done.last_verify["disks"][bed["resource"]]["chunks"] >= 1
    page = admin_client.get(reverse("console:vm_detail", args=[bed["vm"].uuid])).content.decode()
    assert "Identical" in page and "replicas are identical" in page
    assert not Alert.objects.filter(condition=Condition.VALIDATION_MISMATCH).exists()

    # A mismatch (as the AM reports it) raises the validation alert, once; a clean one clears it.
    services.protection_verify_record(protection=done, results={bed["resource"]: {"ok": False, "mismatches": [0]}})
    services.protection_verify_record(protection=done, results={bed["resource"]: {"ok": False, "mismatches": [0]}})
    mismatch = Alert.objects.get(condition=Condition.VALIDATION_MISMATCH)
    assert mismatch.state == AlertState.OPEN and "db-01" in mismatch.message and "hosta" in mismatch.message
    services.protection_verify_record(protection=done, results={bed["resource"]: {"ok": True, "mismatches": []}})
    assert Alert.objects.get(condition=Condition.VALIDATION_MISMATCH).state == AlertState.CLEARED


@pytest.mark.django_db
def test_level2_actions_refuse_bad_input_with_sentences(ams, bed, admin_api, operator_api):
    protection = _poll(bed["protection"])
    url = f"/api/v1/protections/{protection.pk}"
    bad_disk = admin_api.post(f"{url}/repair/", {"disk": "xvdz"}, format="json")
    assert bad_disk.status_code == 400 and "no protected disk 'xvdz'" in bad_disk.content.decode()
    nothing = admin_api.post(f"{url}/repair/", {}, format="json")
    assert nothing.status_code == 409 and "nothing to repair" in nothing.content.decode()
    assert admin_api.post(f"{url}/repair/", {"disk": "x" * 200}, format="json").status_code == 400
    assert operator_api.post(f"{url}/validate/").status_code == 403
    assert admin_api.post("/api/v1/protections/999999/swap/").status_code == 404

    ams.procs["hostb"].stop()
    wait_for(lambda: _states(_poll(protection)).get("peer") != "ok", timeout=30, message="the peer lost")
    refused = admin_api.post(f"{url}/swap/")
    assert refused.status_code == 409 and "planned swap needs both AMs connected" in refused.content.decode()

    level1 = Protection.objects.create(vm=make_vm(bed["pool"], host=bed["a"]), pool=bed["pool"],
                                       level=Level.BASIC_RESTART, status=ProtectionStatus.PROTECTED)
    wrong = admin_api.post(f"/api/v1/protections/{level1.pk}/validate/")
    assert wrong.status_code == 400 and "only a Level 2 protection" in wrong.content.decode()
    schema = admin_api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    for action in ("validate", "swap", "repair"):
        assert f"/api/v1/protections/{{id}}/{action}/" in schema["paths"]


def test_a_takeover_after_the_primary_host_is_lost_is_a_failover_done(ams, bed, admin_client):
    a, b, vm = bed["a"], bed["b"], bed["vm"]
    _poll(bed["protection"])
    ams.procs["hosta"].stop()  # the primary's host dies: its AM with it
    a.live = False
    a.save()
    second = ams.client("hostb")
    wait_for(lambda: second.resource(bed["resource"])["role"] == "Primary", timeout=30,
             message="hostb's AM to take over with the witness's grant")
    protection = _poll(bed["protection"])
    assert protection.failed_over_to_id == b.pk and protection.failed_over_at is not None
    assert "runs on hostb" in protection.status_reason
    done = Alert.objects.get(condition=Condition.FAILOVER_DONE, object_key=component_key(vm, "failover"))
    assert done.state == AlertState.OPEN and "hosta" in done.message and "hostb" in done.message
    _poll(protection)
    assert Alert.objects.filter(condition=Condition.FAILOVER_DONE).count() == 1  # raised once
    assert protection.status != ProtectionStatus.FAILING_OVER
    page = admin_client.get(reverse("console:vm_detail", args=[vm.uuid])).content.decode()
    assert "prot-runs-on" in page and "Failed over to hostb" in page


def test_no_takeover_within_the_bound_after_the_primary_host_is_lost_is_a_failover_failed(ams, bed, settings):
    """The witness is gone, so the secondary's AM may not take over: after EAC_L2_FAILOVER_GRACE the console
    says the failover failed, once."""
    settings.EAC_L2_FAILOVER_GRACE = 1.0
    a, vm = bed["a"], bed["vm"]
    _poll(bed["protection"])
    ams.procs["witness"].stop()
    ams.procs["hosta"].stop()
    a.live = False
    a.last_heard_at = None
    a.save()
    waiting = _poll(bed["protection"])
    assert waiting.status == ProtectionStatus.FAILING_OVER and "waiting for the AM on hostb" in waiting.status_reason
    failed = wait_for(lambda: (p := _poll(bed["protection"])).status == ProtectionStatus.FAILED and p, timeout=20,
                      message="the failover given up")
    assert "was not started on hostb" in failed.status_reason
    _poll(failed)
    alert = Alert.objects.get(condition=Condition.FAILOVER_FAILED, object_key=component_key(vm, "failover"))
    assert alert.state == AlertState.OPEN and "hosta" in alert.message and "hostb" in alert.message
    assert not Alert.objects.filter(condition=Condition.FAILOVER_DONE).exists()
    assert second_role(ams, bed) != "Primary"


def second_role(ams: Pair, bed: dict) -> str:
    return ams.client("hostb").resource(bed["resource"])["role"]


def test_the_vm_page_buttons_queue_the_action_or_say_why_not(bed, admin_client):
    protection = _poll(bed["protection"])
    url = reverse("protection:level2_action", args=[protection.pk, "repair"])
    response = admin_client.post(url, {"disk": "0"}, follow=True)
    assert response.redirect_chain[-1][0].endswith(reverse("console:vm_detail", args=[bed["vm"].uuid]))
    assert "nothing to repair" in response.content.decode()
    response = admin_client.post(reverse("protection:level2_action", args=[protection.pk, "explode"]), follow=True)
    assert "Must be one of: validate, swap, repair." in response.content.decode()


def test_a_crashed_guest_is_due_a_restart_from_its_copy_then_a_failover_with_a_standby_to_start(ams, bed):
    """The VM halted on its live primary host with its copy paused on the secondary, both AMs connected and the
    replica UpToDate: due a restart from the copy (crash_restart_due; the worker asks XAPI whether it crashed).
    Once the copy runs, a failover 'after the VM crashed'; the VM's own record, halted, is a degraded standby
    until it is paused on the former primary; running there again with the copy stopped is a failback."""
    a, b, vm, protection = bed["a"], bed["b"], bed["vm"], bed["protection"]
    copy = make_vm(bed["pool"], host=b, name_label="db-01 (eAC secondary)", power_state="Paused")
    protection.secondary_vm_uuid = copy.uuid
    protection.save()
    assert not health.crash_restart_due(health.protection_read(protection))  # the VM runs
    VM.objects.filter(pk=vm.pk).update(power_state="Halted", resident_on=None)
    assert health.crash_restart_due(health.protection_read(protection))
    VM.objects.filter(pk=copy.pk).update(power_state="Halted", resident_on=None)
    assert not health.crash_restart_due(health.protection_read(protection))  # no copy held ready
    VM.objects.filter(pk=copy.pk).update(power_state="Paused", resident_on=b)

    first = ams.client("hosta")
    first.resource_action(bed["resource"], "swap")  # what protection.failover does, then VM.unpause
    wait_for(lambda: second_role(ams, bed) == "Primary", timeout=10, message="the swap")
    VM.objects.filter(pk=copy.pk).update(power_state="Running")
    moved = _poll(protection)
    assert moved.failed_over_to_id == b.pk and moved.status == ProtectionStatus.DEGRADED, moved.status_reason
    done = Alert.objects.get(condition=Condition.FAILOVER_DONE, object_key=component_key(vm, "failover"))
    assert "after the VM crashed on hosta" in done.message
    standby = _component(moved, "standby-vm")
    assert standby["state"] == "degraded" and "paused=true" in standby["repair"] and "on=hosta" in standby["repair"]
    assert not health.crash_restart_due(health.protection_read(moved))  # failed over already

    VM.objects.filter(pk=vm.pk).update(power_state="Paused", resident_on=a)  # the operator's repair
    ready = _poll(moved)
    assert _component(ready, "standby-vm")["state"] == "ok" and ready.status == ProtectionStatus.PROTECTED, [
        (c["id"], c["state"], c["detail"]) for c in ready.components if c["state"] != "ok"]

    VM.objects.filter(pk=copy.pk).update(power_state="Halted", resident_on=None)  # hostb's copy stops ...
    VM.objects.filter(pk=vm.pk).update(power_state="Running")  # ... and the standby took over on hosta
    back = _poll(ready)
    assert back.failed_over_to_id is None and "standby-vm" not in _states(back)
    assert Alert.objects.filter(condition=Condition.FAILOVER_DONE, message__contains="runs on hosta again").exists()


def test_the_beats_poll_reads_each_am_once_for_every_protection_it_serves(ams, bed):
    """Two protections on one pair of AMs: ``am_reads`` asks each AM once (its status and both protections'
    resources), and a reading made from it gives the components a reading of its own gives."""
    a, b = bed["a"], bed["b"]
    vm2 = make_vm(bed["pool"], host=a, name_label="db-02", memory_static_max=GiB)
    vbd = make_disk(vm2, make_sr(bed["pool"], shared=False), userdevice="0", virtual_size=SIZE)
    second = Protection.objects.create(vm=vm2, pool=bed["pool"], level=Level.COMPONENT_FT,
                                       status=ProtectionStatus.PROTECTED, secondary_host=b, secondary_memory=GiB)
    resource = f"vdi-{vbd.vdi.uuid}"
    ProtectedDisk.objects.create(protection=second, resource=resource, userdevice="0", primary_vdi_uuid=vbd.vdi.uuid,
                                 primary_host=a, secondary_host=b, primary_am_url=ams.urls["hosta"],
                                 secondary_am_url=ams.urls["hostb"], size=SIZE, primary_resource=True,
                                 secondary_resource=True)
    ams.client("hosta").resource_create(name=resource, role="primary", size=SIZE)
    ams.client("hostb").resource_create(name=resource, role="secondary", size=SIZE)
    wait_for(lambda: ams.client("hostb").resource(resource)["disk"] == "UpToDate", timeout=30,
             message="the second replica in sync")
    reads = health.am_reads([bed["protection"], second])
    assert set(reads) == {ams.urls["hosta"], ams.urls["hostb"]}
    assert all(set(v.resources) == {bed["resource"], resource} and not v.error for v in reads.values())
    for protection in (bed["protection"], second):
        shared = health.components_of(health.protection_read(protection, reads))
        own = health.components_of(health.protection_read(protection))
        assert [(c["id"], c["state"]) for c in shared] == [(c["id"], c["state"]) for c in own]
