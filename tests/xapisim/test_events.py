"""event.from and event.inject as xapi does them."""

from __future__ import annotations

import re
import threading
import time

import pytest
import XenAPI

TOKEN = re.compile(r"\d{20},\d{20}")


def test_an_empty_token_gives_an_add_for_every_object(api):
    answer = api.event_from(["*"], "", 0.0)
    assert TOKEN.fullmatch(answer["token"])
    events = answer["events"]
    assert {e["operation"] for e in events} == {"add"}
    per_class: dict[str, int] = {}
    for e in events:
        per_class[e["class"]] = per_class.get(e["class"], 0) + 1
    counts = {cls: int(n) for cls, n in answer["valid_ref_counts"].items()}
    for cls, n in per_class.items():
        assert counts[cls] == n, cls
    assert per_class["vm"] == len(api.VM.get_all())
    assert {"pool", "host", "host_metrics", "vm", "vm_metrics", "vbd", "vdi", "sr", "pbd", "vif", "network"} <= set(
        per_class
    ), "class names are lowercase"
    vm_event = next(e for e in events if e["class"] == "vm")
    assert vm_event["snapshot"] == api.VM.get_record(vm_event["ref"])


def test_changes_since_a_token_come_as_one_event_per_object_with_its_latest_snapshot(api):
    token = api.event_from(["vm"], "", 0.0)["token"]
    vm = api.VM.get_by_name_label("web-02")[0]
    for name in ("web-02a", "web-02b", "web-02c"):
        api.VM.set_name_label(vm, name)
    api.host.set_name_description(api.host.get_all()[0], "not subscribed")
    answer = api.event_from(["vm"], token, 5.0)
    assert [(e["class"], e["operation"], e["ref"]) for e in answer["events"]] == [("vm", "mod", vm)]
    assert answer["events"][0]["snapshot"]["name_label"] == "web-02c"
    assert answer["token"] > token


def test_objects_created_and_destroyed_since_the_token_give_add_del_or_nothing(api):
    template = api.VM.get_by_name_label("dev-sandbox")[0]
    doomed = api.VM.clone(template, "doomed")
    token = api.event_from(["vm"], "", 0.0)["token"]
    fleeting = api.VM.clone(template, "fleeting")
    api.VM.destroy(fleeting)
    kept = api.VM.clone(template, "kept")
    api.VM.set_name_description(kept, "modified after creation")
    api.VM.destroy(doomed)
    events = api.event_from(["vm"], token, 5.0)["events"]
    seen = {e["ref"]: e for e in events}
    assert fleeting not in seen, "created and destroyed since the token: no event"
    assert seen[kept]["operation"] == "add"
    assert seen[kept]["snapshot"]["name_description"] == "modified after creation"
    assert seen[doomed]["operation"] == "del"
    assert not seen[doomed].get("snapshot")


def test_event_from_blocks_until_a_matching_change(api, sim):
    token = api.event_from(["vm"], "", 0.0)["token"]
    vm = api.VM.get_by_name_label("mail")[0]
    host = api.host.get_all()[0]

    def change_later() -> None:
        time.sleep(0.4)
        with sim.engine.lock:  # an unsubscribed change first: must not wake the caller with nothing
            sim.engine.store.update(host, {"name_description": "noise"})
        time.sleep(0.2)
        with sim.engine.lock:
            sim.engine.store.update(vm, {"name_description": "changed while you waited"})

    threading.Thread(target=change_later).start()
    answers = []
    start = time.monotonic()
    # Given a minute, the call returns when the change wakes it: long before, whatever the machine's load.
    caller = threading.Thread(target=lambda: answers.append(api.event_from(["vm"], token, 60.0)), daemon=True)
    caller.start()
    caller.join(30)
    assert answers, "event.from was not woken by the change"
    assert time.monotonic() - start > 0.5  # and not by the unsubscribed one before it
    assert [e["ref"] for e in answers[0]["events"]] == [vm]


def test_event_from_returns_no_events_and_a_new_token_at_the_timeout(api):
    token = api.event_from(["vm"], "", 0.0)["token"]
    start = time.monotonic()
    answer = api.event_from(["vm"], token, 0.3)
    assert time.monotonic() - start >= 0.3
    assert answer["events"] == []
    assert TOKEN.fullmatch(answer["token"])


def test_event_inject_makes_a_mod_event_and_returns_a_token_before_it(api):
    pool = api.pool.get_all()[0]
    token = api.event.inject("pool", pool)
    assert TOKEN.fullmatch(token)
    events = api.event_from(["pool"], token, 1.0)["events"]
    assert [(e["operation"], e["ref"]) for e in events] == [("mod", pool)]
    with pytest.raises(XenAPI.Failure) as failure:
        api.event.inject("pool", "OpaqueRef:NULL")
    assert failure.value.details == ["HANDLE_INVALID", "pool", "OpaqueRef:NULL"]


def test_event_subscription_to_one_object(api):
    token = api.event_from(["*"], "", 0.0)["token"]
    a, b = api.VM.get_by_name_label("web-01")[0], api.VM.get_by_name_label("web-03")[0]
    api.VM.set_name_description(a, "a")
    api.VM.set_name_description(b, "b")
    events = api.event_from([f"vm/{b}"], token, 1.0)["events"]
    assert [e["ref"] for e in events] == [b]


def test_a_malformed_token_and_the_old_event_api_are_refused(api):
    with pytest.raises(XenAPI.Failure) as failure:
        api.event_from(["vm"], "garbage", 0.0)
    assert failure.value.details == ["EVENT_FROM_TOKEN_PARSE_FAILURE", "garbage"]
    with pytest.raises(XenAPI.Failure) as failure:
        api.event.register(["*"])
    assert failure.value.details == ["MESSAGE_METHOD_UNKNOWN", "event.register"]
