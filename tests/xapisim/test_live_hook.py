"""The AMs' on_promote hook of the live bed (``python -m xapisim.live.hook``) against a simulator, without root:
it unpauses the VM it is told of, is content with a running one, and fails with one line otherwise."""

from __future__ import annotations

import json

import pytest

from tests.xapisim.rpc import control
from xapisim.faults import SimError
from xapisim.live import hook
from xapisim.live.faults import local_unpause


def _credentials(tmp_path, url: str, password: str = "demo"):
    path = tmp_path / "hook.json"
    path.write_text(json.dumps({"url": url, "user": "root", "password": password}))
    return str(path)


def test_the_hook_unpauses_its_vm_and_a_running_one_is_not_an_error(sim, api, tmp_path, monkeypatch, capsys):
    vm = api.VM.get_by_name_label("web-01")[0]
    api.VM.pause(vm)
    monkeypatch.setenv("EAC_AM_VM", api.VM.get_uuid(vm))
    monkeypatch.setenv("EAC_AM_RESOURCE", "vdi-x")
    creds = _credentials(tmp_path, sim.url)
    assert hook.main(["--credentials", creds]) == 0
    assert api.VM.get_power_state(vm) == "Running"
    assert "unpaused" in capsys.readouterr().out
    assert hook.main(["--credentials", creds]) == 0  # a second disk of the same VM
    assert "already running" in capsys.readouterr().out


def test_the_hook_gives_up_after_its_timeout_with_one_line(sim, api, tmp_path, monkeypatch, capsys):
    vm = api.VM.get_by_name_label("dev-sandbox")[0]  # halted: nothing to unpause
    monkeypatch.setenv("EAC_AM_VM", api.VM.get_uuid(vm))
    assert hook.main(["--credentials", _credentials(tmp_path, sim.url), "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not unpaused" in err[0] and "Halted" in err[0]
    bad = _credentials(tmp_path, sim.url, password="wrong")
    assert hook.main(["--credentials", bad, "--timeout", "0.2"]) == 1
    assert "SESSION_AUTHENTICATION_FAILED" in capsys.readouterr().err


def test_the_hook_needs_its_vm_and_readable_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("EAC_AM_VM", raising=False)
    assert hook.main(["--credentials", str(tmp_path / "none.json")]) == 1
    assert "EAC_AM_VM" in capsys.readouterr().err
    monkeypatch.setenv("EAC_AM_VM", "x")
    assert hook.main(["--credentials", str(tmp_path / "none.json")]) == 1
    assert "credentials" in capsys.readouterr().err


def test_the_hooks_host_toolstack_unpauses_without_a_master_and_refuses_what_is_not_its_domain(sim, api):
    """``/sim/hosts/<h>/domains/<vm>/unpause`` of the live bed (``faults.local_unpause``): the host's own
    toolstack needs no pool master, and acts only on a paused domain of that host."""
    engine, store = sim.engine, sim.engine.store
    vm = api.VM.get_by_name_label("web-02")[0]
    host = api.VM.get_resident_on(vm)
    other = next(h for h in api.host.get_all() if h != host)
    api.VM.pause(vm)
    with pytest.raises(SimError) as refused:
        local_unpause(engine, other, vm)
    assert refused.value.status == 409 and "no domain on" in refused.value.message
    master = api.pool.get_master(api.pool.get_all()[0])
    assert master != host
    assert control(sim.url, "POST", f"/sim/hosts/{api.host.get_name_label(master)}/crash")[0] == 200
    assert local_unpause(engine, host, vm)["done"] == "unpaused"  # no master: XAPI answers nothing now
    assert store.tables["VM"][vm]["power_state"] == "Running"
    assert local_unpause(engine, host, vm)["done"] == "already running"
    halted = next(r for r, rec in store.tables["VM"].items() if rec["name_label"] == "dev-sandbox")
    with pytest.raises(SimError):
        local_unpause(engine, host, halted)


def test_the_hook_with_its_host_falls_back_to_xapi_where_the_host_route_is_missing(sim, api, tmp_path, monkeypatch,
                                                                                      capsys):
    vm = api.VM.get_by_name_label("web-01")[0]
    api.VM.pause(vm)
    monkeypatch.setenv("EAC_AM_VM", api.VM.get_uuid(vm))
    host = api.host.get_uuid(api.VM.get_resident_on(vm))
    # this simulator is not live: no /sim/hosts/<h>/domains route, so XAPI's VM.unpause does it
    assert hook.main(["--credentials", _credentials(tmp_path, sim.url), "--host", host]) == 0
    assert api.VM.get_power_state(vm) == "Running"
    out = capsys.readouterr().out
    assert "unpaused" in out and "toolstack" not in out
