"""The AMs' on_promote hook of the live bed (``python -m xapisim.live.hook``) against a simulator, without root:
it unpauses the VM it is told of, is content with a running one, and fails with one line otherwise."""

from __future__ import annotations

import json

from xapisim.live import hook


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
