"""Level 3 checkpoint health: what the AMs' ``checkpoint`` (GET /v1/resources/{name}, docs/level3.md) means for the
console's components, alerts and mail.

``components_of`` is a pure function of a reading and ``protection_health_record`` writes what a reading says, so the
readings here are built by hand, the way test_level2_nic_health.py builds them (and test_level2_health.py hands
``protection_verify_record`` what an AM answered): no AM runs here. What a real AM answers is
test_level3_am_client.py's. The records are real (Postgres), and the mail goes through a real Celery worker to a
loopback SMTP server.
"""
from __future__ import annotations

import logging

import pytest
from django.urls import reverse

from alerts.choices import AlertState, Condition
from alerts.keys import component_key
from alerts.models import Alert, Delivery, Recipient
from inventory.models import Host
from protection import services
from protection.am_client import MalformedAnswer, checkpoint_body, checkpoint_of
from protection.choices import Level, ProtectionStatus
from protection.follow import followed
from protection.health import AMView, Reading, components_of
from protection.models import ProtectedDisk, Protection
from tests.inventory.factories import GiB, make_disk, make_host, make_pool, make_sr, make_vm

HOSTA, HOSTB = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"
RESOURCE = "vdi-cccccccc-0000-4000-8000-000000000003"
MISSING = object()


def _status() -> dict:
    links = {link: {"state": "Up", "rtt_ms": 0.2} for link in ("a", "b")}
    return {"peer": {"state": "connected", "links": links}, "witness": {"reachable": True}, "network": None}


def cp(state: str, **figures) -> dict:
    """A checkpoint as docs/level3.md's contract has the AM report it."""
    return {"epoch_ms": 50, "state": state, "why": "", "last_committed": 1200, "last_commit_age_ms": 12.5,
            "size_bytes": 300_000, "capture_ms": 2.5, "commit_ms": 8.0, "output_hold_ms": 31.0, "held_packets": 3,
            **figures}


def res(role: str, checkpoint=MISSING) -> dict:
    answer = {"name": RESOURCE, "role": role, "disk": "UpToDate", "connection": "Connected", "vm": "x"}
    if checkpoint is not MISSING:
        answer["checkpoint"] = checkpoint
    return answer


def reading(primary_cp=MISSING, secondary_cp=MISSING, *, level: int = Level.SYSTEM_FT, protection=None,
            disk=None, hosts=None, primary_error: str = "") -> Reading:
    a, b = hosts or (Host(uuid=HOSTA, name_label="hosta", live=True), Host(uuid=HOSTB, name_label="hostb", live=True))
    disk = disk or ProtectedDisk(resource=RESOURCE, userdevice="0")
    protection = protection or Protection(level=level)
    return Reading(
        protection=protection, disks=[disk], nics=[],
        primary=AMView(host=a, url="http://a", status=None if primary_error else _status(), error=primary_error,
                       resources={} if primary_error else {disk.resource: res("Primary", primary_cp)}),
        secondary=AMView(host=b, url="http://b", status=_status(),
                         resources={disk.resource: res("Secondary", secondary_cp)}),
        vm_power_state="Running", vm_host=getattr(a, "pk", None))


def checkpoints(r: Reading) -> dict[str, dict]:
    return {c["id"].split("@")[1]: c for c in components_of(r) if c["kind"] == "Checkpointing"}


# -- what a reading means (no database) -------------------------------------------------------------------


def test_checkpointing_acknowledged_is_ok_on_both_hosts_with_its_figures_in_words_and_kept_exact():
    got = checkpoints(reading(cp("Checkpointing"), cp("Standby")))
    primary, secondary = got[HOSTA], got[HOSTB]
    assert primary["state"] == "ok" and secondary["state"] == "ok"
    assert primary["detail"] == ("Checkpointing every 50 ms: each checkpoint under 1 MiB, captured in under 5 ms, "
                                 "acknowledged in under 20 ms; output held under 100 ms.")
    assert secondary["detail"] == "Receiving the checkpoints (every 50 ms)."
    assert primary["checkpoint"] == {"epoch_ms": 50, "state": "Checkpointing", "last_committed": 1200,
                                     "last_commit_age_ms": 12.5, "size_bytes": 300_000, "capture_ms": 2.5,
                                     "commit_ms": 8.0, "output_hold_ms": 31.0, "held_packets": 3}
    # The words are coarse: the next epoch's figures give the same sentence (nothing to push).
    again = checkpoints(reading(cp("Checkpointing", last_committed=1290, size_bytes=310_000, capture_ms=2.7),
                                cp("Standby")))[HOSTA]
    assert again["detail"] == primary["detail"] and again["checkpoint"] != primary["checkpoint"]


@pytest.mark.parametrize("state, expected, words", [
    ("Stalled", "failed", "no checkpoint acknowledged by its peer"),
    ("Unprotected", "degraded", "has no peer: the VM runs on with its output not held"),
    ("NoGuest", "failed", "cannot reach the guest's checkpoint control"),
    ("Standby", "degraded", "(Primary) is Standby, not Checkpointing"),
])
def test_each_primary_checkpoint_state_gives_its_component_state_and_what_to_repair(state, expected, words):
    primary = checkpoints(reading(cp(state, why="The AM's own sentence."), cp("Standby")))[HOSTA]
    assert primary["state"] == expected and words in primary["detail"], primary
    assert "The AM's own sentence." in primary["detail"] and primary["repair"]


def test_a_secondary_that_does_not_receive_checkpoints_is_degraded():
    secondary = checkpoints(reading(cp("Checkpointing"), cp("Unprotected")))[HOSTB]
    assert secondary["state"] == "degraded" and "has no peer" in secondary["detail"]


@pytest.mark.parametrize("answer", [MISSING, None])
def test_a_level3_resource_without_checkpoint_says_the_vm_is_not_checkpointed(answer):
    got = checkpoints(reading(answer, answer))
    for c in got.values():
        assert c["state"] == "failed" and "without checkpointing (a Level 2 resource)" in c["detail"]
        assert "protect it again at Level 3" in c["repair"]


@pytest.mark.parametrize("bad", [
    "Checkpointing", 50, [1, 2], {"epoch_ms": 50}, cp("Sleeping"), cp(None), cp("Checkpointing", epoch_ms="50"),
    cp("Checkpointing", epoch_ms=True), cp("Checkpointing", epoch_ms=0), cp("Checkpointing", last_committed=-1),
    cp("Checkpointing", last_committed=1.5), cp("Checkpointing", size_bytes="big"),
    cp("Checkpointing", capture_ms=float("nan")), cp("Checkpointing", commit_ms=float("inf")),
    cp("Checkpointing", output_hold_ms=-3.0), cp("Checkpointing", held_packets=False),
    cp("Checkpointing", why=["no"]), cp("x" * 10_000),
])
def test_a_malformed_checkpoint_is_unknown_with_a_sentence_and_logged_never_an_exception(bad, caplog):
    with caplog.at_level(logging.WARNING, logger="protection.health"):
        primary = checkpoints(reading(bad, cp("Standby")))[HOSTA]
    assert primary["state"] == "unknown", primary
    assert primary["detail"].startswith("The AM on hosta says something the console cannot read: The answer about "
                                        f"{RESOURCE} cannot be read: its checkpoint")
    assert len(primary["detail"]) < 400  # a long answer is not copied whole
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    with pytest.raises(MalformedAnswer):
        checkpoint_of(res("Primary", bad))


def test_figures_the_am_leaves_out_or_null_are_tolerated():
    sparse = {"epoch_ms": 20, "state": "Checkpointing", "last_committed": None}
    got = checkpoint_of(res("Primary", sparse))
    assert got.epoch_ms == 20 and got.last_committed is None and got.size_bytes is None and got.why == ""
    primary = checkpoints(reading(sparse, cp("Standby")))[HOSTA]
    assert primary["state"] == "ok" and "of unknown size" in primary["detail"] and "captured in unknown" in \
        primary["detail"]
    assert checkpoint_of(None) is None and checkpoint_of("not a dict") is None


def test_a_silent_am_leaves_its_checkpointing_unknown_and_a_level2_reading_has_none():
    got = checkpoints(reading(MISSING, cp("Standby"), primary_error="connection refused"))
    assert got[HOSTA]["state"] == "unknown" and "does not answer" in got[HOSTA]["detail"]
    assert checkpoints(reading(cp("Stalled"), cp("Standby"), level=Level.COMPONENT_FT)) == {}


def test_the_checkpoint_object_sent_is_what_the_am_takes():
    assert checkpoint_body(epoch_ms=50, macs=["02:AB:cd:00:00:01", "02-ab-cd-00-00-02"]) == {
        "epoch_ms": 50, "macs": ["02:ab:cd:00:00:01", "02:ab:cd:00:00:02"]}
    for epoch, macs, words in ((19, ["02:ab:cd:00:00:01"], "from 20 to 500"), (501, ["02:ab:cd:00:00:01"], "500"),
                               (True, ["02:ab:cd:00:00:01"], "milliseconds"), (50, [], "0 network interface"),
                               (50, ["02:ab:cd:00:00:01"] * 9, "1 to 8"), (50, ["02:ab:cd:00:01"], "not of the form")):
        with pytest.raises(ValueError, match=words):
            checkpoint_body(epoch_ms=epoch, macs=macs)


# -- what a reading does: records, alerts, pages (Postgres) ---------------------------------------------------


@pytest.fixture
def level3(db):
    return level3_records()


def level3_records() -> dict:
    """A Level 3 protection of db-01 on hosta, its secondary hostb, one disk; no AM (the readings are by hand)."""
    pool = make_pool()
    a = make_host(pool, name_label="hosta", memory_free=16 * GiB, am_url="http://127.0.0.1:9/")
    b = make_host(pool, name_label="hostb", memory_free=16 * GiB, am_url="http://127.0.0.1:10/")
    vm = make_vm(pool, host=a, name_label="db-01", vcpus_max=1, memory_static_max=GiB)
    vbd = make_disk(vm, make_sr(pool, shared=False), userdevice="0")
    protection = Protection.objects.create(vm=vm, pool=pool, level=Level.SYSTEM_FT, status=ProtectionStatus.PROTECTED,
                                           secondary_host=b, secondary_memory=GiB, epoch_ms=50)
    disk = ProtectedDisk.objects.create(protection=protection, resource=f"vdi-{vbd.vdi.uuid}", userdevice="0",
                                        primary_vdi_uuid=vbd.vdi.uuid, primary_host=a, secondary_host=b,
                                        primary_am_url=a.am_url, secondary_am_url=b.am_url, primary_resource=True,
                                        secondary_resource=True)
    return {"pool": pool, "a": a, "b": b, "vm": vm, "protection": protection, "disk": disk}


def record(setup: dict, primary_cp, secondary_cp=None) -> Protection:
    protection = Protection.objects.select_related("vm", "pool").get(pk=setup["protection"].pk)
    services.protection_health_record(reading=reading(
        primary_cp, cp("Standby") if secondary_cp is None else secondary_cp, protection=protection,
        disk=setup["disk"], hosts=(setup["a"], setup["b"])))
    return Protection.objects.get(pk=protection.pk)


def stall_alerts():
    return Alert.objects.filter(condition=Condition.CHECKPOINT_STALLED)


def test_a_stall_raises_its_own_alert_once_and_clears_it_once_when_checkpointing_goes_on(level3):
    Recipient.objects.create(email="ops@example.org")
    vm, a = level3["vm"], level3["a"]
    healthy = record(level3, cp("Checkpointing"))
    assert healthy.status == ProtectionStatus.PROTECTED and not Alert.objects.exists()

    stalled = record(level3, cp("Stalled", why="No acknowledgement for 1.2 s.", last_commit_age_ms=1200.0))
    record(level3, cp("Stalled", last_commit_age_ms=1700.0))
    alert = stall_alerts().get()
    assert alert.state == AlertState.OPEN and alert.occurrences == 2 and alert.object_key == component_key(vm,
                                                                                                           "checkpoint")
    assert alert.message.startswith("Level 3 checkpointing of db-01 stalled (pool ")
    assert "hosts hosta and hostb" in alert.message and "epoch 1200, 1.2 s ago" in alert.message
    assert "The AM says: No acknowledgement for 1.2 s." in alert.message and alert.host_name == "hosta"
    assert alert.details["checkpoint"]["state"] == "Stalled"
    # Its own alert, not a loss of redundancy as well (one mail for one event).
    assert not Alert.objects.filter(condition=Condition.REDUNDANCY_LOST).exists()
    assert stalled.status == ProtectionStatus.DEGRADED and "Checkpointing stalled on hosta" in stalled.status_reason
    assert Delivery.objects.filter(alert=alert, kind="raised", email="ops@example.org").count() == 1

    back = record(level3, cp("Checkpointing"))
    alert.refresh_from_db()
    assert alert.state == AlertState.CLEARED and stall_alerts().count() == 1
    assert "goes on again" in alert.clear_message
    assert Delivery.objects.filter(alert=alert, kind="cleared").count() == 1
    assert back.status == ProtectionStatus.PROTECTED
    record(level3, cp("Checkpointing"))
    assert stall_alerts().count() == 1 and Delivery.objects.filter(alert=alert).count() == 2  # cleared once
    assert a.uuid in {c["host"] for c in back.components if c["kind"] == "Checkpointing"}


def test_only_checkpointing_again_clears_a_stall_and_other_states_neither_raise_nor_clear_it(level3):
    record(level3, cp("Stalled"))
    record(level3, cp("Unprotected"))  # the peer lost meanwhile: a loss of redundancy, the stall not over
    assert stall_alerts().get().state == AlertState.OPEN
    lost = Alert.objects.get(condition=Condition.REDUNDANCY_LOST,
                             object_key=component_key(level3["vm"], f"checkpoint@{level3['a'].uuid}"))
    assert lost.state == AlertState.OPEN and lost.message.startswith("Level 3 redundancy of db-01 lost")
    record(level3, cp("NoGuest"))
    assert stall_alerts().get().state == AlertState.OPEN
    record(level3, MISSING)  # an AM that no longer says: nothing either way
    assert stall_alerts().get().state == AlertState.OPEN
    record(level3, cp("Checkpointing"))
    assert stall_alerts().get().state == AlertState.CLEARED
    assert not Alert.objects.filter(state=AlertState.OPEN).exists()
    assert Alert.objects.filter(condition=Condition.REDUNDANCY_LOST).count() == 1  # raised once, cleared once


def test_a_level2_protection_has_no_checkpoint_component_nor_stall_alert(level3):
    Protection.objects.filter(pk=level3["protection"].pk).update(level=Level.COMPONENT_FT, epoch_ms=None)
    level2 = record(level3, cp("Stalled"), cp("Stalled"))
    assert not [c for c in level2.components if c["kind"] == "Checkpointing"]
    assert level2.status == ProtectionStatus.PROTECTED and not Alert.objects.exists()


def test_a_malformed_checkpoint_from_an_am_is_a_handled_failure_on_the_page_and_the_api(level3, admin_client,
                                                                                       admin_api, caplog):
    with caplog.at_level(logging.WARNING, logger="protection.health"):
        got = record(level3, cp("Checkpointing", size_bytes=[1, 2, 3]), {"epoch_ms": "soon"})
    states = {c["id"]: c["state"] for c in got.components}
    assert states[f"checkpoint@{level3['a'].uuid}"] == "unknown" == states[f"checkpoint@{level3['b'].uuid}"]
    assert "cannot be read" in caplog.text and not Alert.objects.exists()
    page = admin_client.get(reverse("console:vm_detail", args=[level3["vm"].uuid]))
    assert page.status_code == 200 and "cannot read" in page.content.decode()
    body = admin_api.get(f"/api/v1/protections/{got.pk}/")
    assert body.status_code == 200 and body.json()["level"] == 3


def test_the_vm_page_and_the_api_show_the_checkpoint_figures(level3, admin_client, admin_api):
    got = record(level3, cp("Checkpointing"))
    page = admin_client.get(reverse("console:vm_detail", args=[level3["vm"].uuid])).content.decode()
    assert "level3-components" in page and 'class="prot-epoch">50 ms' in page
    for words in ("Checkpointing: hosta", "Epoch length</dt><dd>50 ms", "Last committed epoch</dt><dd>1,200 (12 ms",
                  "Checkpoint size</dt><dd>293.0\xa0KB", "Capture (pause to resume)</dt><dd>2.5 ms",
                  "Commit (capture to acknowledged)</dt><dd>8.0 ms", "Output hold (mean)</dt><dd>31.0 ms",
                  "Packets held now</dt><dd>3", "Receiving the checkpoints"):
        assert words in page, words
    body = admin_api.get(f"/api/v1/protections/{got.pk}/").json()
    assert body["epoch_ms"] == 50
    shown = {c["id"]: c for c in body["components"]}
    assert shown[f"checkpoint@{level3['a'].uuid}"]["checkpoint"]["last_committed"] == 1200
    assert "checkpoint" not in shown["peer"]


def test_a_new_figure_alone_is_not_pushed_a_new_state_is(level3):
    record(level3, cp("Checkpointing"))
    protection = Protection.objects.select_related("vm", "pool").get(pk=level3["protection"].pk)

    def changed(primary_cp) -> bool:
        return services.protection_health_record(reading=reading(
            primary_cp, cp("Standby"), protection=protection, disk=level3["disk"], hosts=(level3["a"], level3["b"])))

    assert changed(cp("Checkpointing", last_committed=5000, last_commit_age_ms=3.0, held_packets=9)) is False
    assert changed(cp("Checkpointing", size_bytes=40 * 2**20)) is True  # over 16 MiB now: new words
    assert changed(cp("Stalled")) is True


def test_the_follower_follows_the_ams_of_a_level3_protection(level3):
    assert followed() == {level3["a"].am_url: {level3["protection"].pk}, level3["b"].am_url: {level3["protection"].pk}}


def test_the_stall_is_mailed_raised_then_cleared_by_the_worker(level3, console_env, start_proc, smtp_server):
    start_proc("worker", console_env)
    Recipient.objects.create(email="ops@example.org")
    record(level3, cp("Stalled", why="No acknowledgement for 1.0 s."))
    raised = smtp_server.wait(condition=Condition.CHECKPOINT_STALLED, kind="raised", timeout=30)
    assert len(raised) == 1
    mail = raised[0]
    assert "Level 3 checkpointing stalled" in str(mail["Subject"]) and mail["To"] == "ops@example.org"
    body = mail.get_body().get_content()
    assert "db-01" in body and "hosta" in body and "Checkpointing -> Stalled" in body and "(critical)" in body
    record(level3, cp("Checkpointing"))
    cleared = smtp_server.wait(condition=Condition.CHECKPOINT_STALLED, kind="cleared", timeout=30)
    assert len(cleared) == 1 and "goes on again" in cleared[0].get_body().get_content()
    assert len(smtp_server.matching(condition=Condition.CHECKPOINT_STALLED)) == 2


def test_a_recipient_made_now_gets_the_stall_alert(db):
    assert Condition.CHECKPOINT_STALLED in Recipient.objects.create(email="new@example.org").conditions
