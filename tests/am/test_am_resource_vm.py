"""A resource's ``vm`` follows a planned swap of the whole VM: ``PATCH /v1/resources/{name}`` changes it, it is
kept across an agent's restart, and a later takeover's on_promote is told the VM that is paused on that side now
(not the one the resource was created with)."""
from __future__ import annotations

import uuid

from tests.am.cluster import HOSTS
from tests.am.test_am_level2 import make_vm_pair, wait_for


def test_after_a_swap_each_sides_vm_is_changed_kept_and_told_to_the_next_takeover(healthy):
    c = healthy
    name, vm_a, vm_b = "vdi-vm-follows", str(uuid.uuid4()), str(uuid.uuid4())
    make_vm_pair(c, name, vm_a, vm_b)
    before = {h: len(c.promoted(h)) for h in HOSTS}
    code, body = c.call("hosta", "POST", f"/v1/resources/{name}/swap")
    assert code == 200, body
    assert c.wait_in_sync(name) == "hostb"
    # The console moved the VM to hostb and started its copy paused on hosta: each side's VM exchanged.
    for host, vm in (("hostb", vm_a), ("hosta", vm_b)):
        code, body = c.call(host, "PATCH", f"/v1/resources/{name}", {"vm": vm})
        assert code == 200 and body["vm"] == vm, body
    code, body = c.call("hosta", "PATCH", f"/v1/resources/{name}", {"vm": vm_b})  # again: nothing changes
    assert code == 200 and body["vm"] == vm_b
    code, events = c.call("hosta", "GET", "/v1/events?after=0")
    assert [(e["old"], e["vm"]) for e in events if e["kind"] == "resource" and e.get("action") == "vm"] == [
        (vm_a, vm_b)]

    c.crash("hosta")  # kept in the metadata across a restart
    c.start("hosta")
    assert c.wait_in_sync(name) == "hostb"
    assert c.status("hosta", name)["vm"] == vm_b and c.status("hostb", name)["vm"] == vm_a
    assert {h: len(c.promoted(h)) for h in HOSTS} == before

    c.crash("hostb")  # the primary dies: hosta takes over and unpauses the copy that is there now
    c.wait("hosta", name, lambda s: s["role"] == "Primary" and s["io"] == "Running", 10, "the takeover")
    ran = wait_for(lambda: c.promoted("hosta")[before["hosta"]:], 10, "on_promote on hosta")
    assert ran == [{"EAC_AM_RESOURCE": name, "EAC_AM_VM": vm_b}]


def test_a_bad_patch_is_refused_with_a_sentence_and_changes_nothing(healthy):
    c = healthy
    name, vm_a, vm_b = "vdi-vm-patch", str(uuid.uuid4()), str(uuid.uuid4())
    make_vm_pair(c, name, vm_a, vm_b)
    cases = [
        ({"vm": "../../etc"}, 400),
        ({"vm": vm_b.upper()}, 400),
        ({"vm": 7}, 400),
        ({"vm": vm_b, "role": "primary"}, 400),  # nothing else may be patched
        ({}, 400),
    ]
    for body, status in cases:
        code, answer = c.call("hosta", "PATCH", f"/v1/resources/{name}", body)
        assert code == status and answer["error"], (body, code, answer)
    code, answer = c.call("hosta", "PATCH", "/v1/resources/vdi-nothing", {"vm": vm_b})
    assert code == 404 and answer["error"]
    assert c.status("hosta", name)["vm"] == vm_a
    code, answer = c.call("hosta", "PATCH", f"/v1/resources/{name}", {"vm": None})  # null: no VM any more
    assert code == 200 and answer["vm"] is None
