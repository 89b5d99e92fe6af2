"""Level 2's side of the AM end to end: resources on SR images, a primary that starts alone, and on_promote."""
from __future__ import annotations

import hashlib
import time
import uuid

from tests.am.cluster import HOSTS
from tests.am.test_am_faults import Run

SIZE = 8 << 20


def sr_dir(c, host: str, sr: str):
    path = c.workdir / host / "srs" / sr
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_primary_on_a_vdi_serves_alone_then_a_later_secondary_gets_a_full_resync(healthy):
    c = healthy
    name, sr_a, sr_b = "vdi-alone", str(uuid.uuid4()), str(uuid.uuid4())
    vdi_a, vdi_b, vm_a, vm_b = (str(uuid.uuid4()) for _ in range(4))
    image_a = sr_dir(c, "hosta", sr_a) / f"{vdi_a}.img"
    with image_a.open("wb") as f:  # the VM's data, beyond the blocks the workload writes
        f.truncate(SIZE)
        f.seek(SIZE // 2)
        f.write(b"existing data of the VM")
    code, body = c.call("hosta", "POST", "/v1/resources",
                        {"name": name, "role": "primary", "sr": sr_a, "vdi": vdi_a, "vm": vm_a})
    assert code == 201, body
    assert (body["sr"], body["vdi"], body["vm"], body["size"]) == (sr_a, vdi_a, vm_a, SIZE)
    assert body["image"] == str(image_a)
    assert c.status("hosta", name)["vm"] == vm_a  # GET shows it too

    run = Run(c, name)
    run.acked_since(0, 200)  # acknowledged with no replica on the peer: it is the only current one
    assert c.status("hostb", name) is None
    assert c.status("hosta", name)["io"] == "Running"

    image_b = sr_dir(c, "hostb", sr_b) / f"{vdi_b}.img"
    with image_b.open("wb") as f:  # whatever the replica VDI held is overwritten
        f.write(b"\xff" * SIZE)
    code, body = c.call("hostb", "POST", "/v1/resources",
                        {"name": name, "role": "secondary", "sr": sr_b, "vdi": vdi_b, "vm": vm_b})
    assert code == 201, body
    c.wait("hostb", name, lambda s: s["disk"] == "UpToDate", 30, "the secondary's full resync")
    acked = run.ledger.acked
    run.acked_since(acked, 100)  # and now mirrored
    assert run.finish() == []
    c.wait_in_sync(name)
    assert digest(image_a) == digest(image_b)
    assert image_b.read_bytes()[SIZE // 2:SIZE // 2 + 23] == b"existing data of the VM"
    assert c.promoted("hosta") == [] and c.promoted("hostb") == []


def test_sr_and_vdi_are_checked_before_anything_is_made(healthy):
    c = healthy
    sr = str(uuid.uuid4())
    sr_dir(c, "hosta", sr)
    cases = [
        ({"sr": "../../etc", "vdi": str(uuid.uuid4())}, 400),
        ({"sr": sr, "vdi": "../x"}, 400),
        ({"sr": sr}, 400),
        ({"sr": sr, "vdi": str(uuid.uuid4()), "image": "/tmp/x.img"}, 400),
        ({"sr": str(uuid.uuid4()), "vdi": str(uuid.uuid4()), "size": SIZE}, 404),
        ({"sr": sr, "vdi": str(uuid.uuid4()), "vm": "web-01", "size": SIZE}, 400),
        ({"sr": sr, "vdi": str(uuid.uuid4())}, 400),  # a new image needs a size
    ]
    for fields, status in cases:
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": "bad-sr", "role": "secondary", **fields})
        assert code == status and "error" in body, (fields, code, body)
    assert c.status("hosta", "bad-sr") is None
    assert [p.name for p in (c.workdir / "hosta" / "srs" / sr).iterdir()] == []


def make_vm_pair(c, name: str, vm_a: str, vm_b: str) -> None:
    """Resource ``name`` on an SR's VDI of each host, primary on hosta (serving ``vm_a``) and secondary on hostb
    (``vm_b``), in sync."""
    for host, vm in (("hosta", vm_a), ("hostb", vm_b)):
        sr, vdi = str(uuid.uuid4()), str(uuid.uuid4())
        sr_dir(c, host, sr)
        role = "primary" if host == "hosta" else "secondary"
        code, body = c.call(host, "POST", "/v1/resources",
                            {"name": name, "role": role, "sr": sr, "vdi": vdi, "vm": vm, "size": SIZE})
        assert code == 201, body
    c.wait_in_sync(name)


def test_a_takeover_runs_on_promote_once_and_a_swap_does_not(healthy):
    c = healthy
    name, vm_a, vm_b = "vdi-hook", str(uuid.uuid4()), str(uuid.uuid4())
    make_vm_pair(c, name, vm_a, vm_b)
    before = {h: len(c.promoted(h)) for h in HOSTS}
    code, body = c.call("hosta", "POST", f"/v1/resources/{name}/swap")
    assert code == 200, body
    assert c.wait_in_sync(name) == "hostb"
    code, body = c.call("hostb", "POST", f"/v1/resources/{name}/swap")
    assert code == 200, body
    assert c.wait_in_sync(name) == "hosta"
    c.crash("hostb")  # the secondary dies: nothing to take over
    c.start("hostb")
    assert c.wait_in_sync(name) == "hosta"
    assert {h: len(c.promoted(h)) for h in HOSTS} == before, "a swap or a restart ran on_promote"

    c.crash("hosta")
    c.wait("hostb", name, lambda s: s["role"] == "Primary" and s["io"] == "Running", 10, "the takeover")
    ran = wait_for(lambda: c.promoted("hostb")[before["hostb"]:], 10, "on_promote on hostb")
    assert ran == [{"EAC_AM_RESOURCE": name, "EAC_AM_VM": vm_b}]
    wait_for(lambda: f"{name}: on_promote for VM {vm_b} done" in (c.workdir / "hostb.log").read_text(), 10,
             "the hook's outcome in the log")
    log = (c.workdir / "hostb.log").read_text()
    assert f"hook ran for {vm_b}" in log  # its output is logged
    code, events = c.call("hostb", "GET", "/v1/events?after=0")
    assert [e["ok"] for e in events if e["kind"] == "on-promote" and e["resource"] == name] == [True]


def test_a_hook_that_hangs_is_killed_and_the_new_primary_serves_anyway(healthy):
    c = healthy
    name, vm_b = "vdi-hang", "deadbeef-0000-4000-8000-" + uuid.uuid4().hex[:12]
    for host, vm in (("hosta", str(uuid.uuid4())), ("hostb", vm_b)):
        sr, vdi = str(uuid.uuid4()), str(uuid.uuid4())
        sr_dir(c, host, sr)
        role = "primary" if host == "hosta" else "secondary"
        code, body = c.call(host, "POST", "/v1/resources",
                            {"name": name, "role": role, "sr": sr, "vdi": vdi, "vm": vm, "size": SIZE})
        assert code == 201, body
    c.wait_in_sync(name)
    run = Run(c, name)
    run.acked_since(0, 100)
    c.crash("hosta")
    c.wait("hostb", name, lambda s: s["role"] == "Primary" and s["io"] == "Running", 10, "the takeover")
    acked = run.ledger.acked
    run.acked_since(acked, 100)  # served while the hook hangs
    wait_for(lambda: f"{name}: on_promote for VM {vm_b} failed" in (c.workdir / "hostb.log").read_text(), 15,
             "the hook to be killed")
    assert "timed out after 5 s: killed" in (c.workdir / "hostb.log").read_text()
    assert run.finish() == []
    code, status = c.call("hostb", "GET", "/v1/status")
    assert code == 200, status
