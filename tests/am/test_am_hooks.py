"""The AM's Level 2 pure parts: where a VDI's image is, the on_promote command's run and its configuration."""
from __future__ import annotations

import asyncio
import sys
import time

import pytest

from am import config, hooks
from am.agent import RequestError, sr_image
from tests.am.test_am_input import BASE

SR = "0b6cf8ec-5d55-4a43-9a0e-2c1d5d1b9c11"
VDI = "7f1c8d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f"


def test_a_vdi_image_is_under_its_sr_directory(tmp_path):
    (tmp_path / SR).mkdir()
    assert sr_image(tmp_path, SR, VDI) == tmp_path / SR / f"{VDI}.img"


@pytest.mark.parametrize("sr, vdi", [
    pytest.param("../etc", VDI, id="sr-traversal"),
    pytest.param(SR, "../../x", id="vdi-traversal"),
    pytest.param(SR, f"{VDI}/x", id="vdi-slash"),
    pytest.param(SR.upper(), VDI, id="sr-uppercase"),
    pytest.param(SR, VDI + "\n", id="vdi-newline"),
    pytest.param(SR, "", id="vdi-empty"),
    pytest.param(SR, 7, id="vdi-not-a-string"),
    pytest.param(SR, None, id="vdi-missing"),
    pytest.param(None, VDI, id="sr-missing"),
])
def test_only_uuids_name_a_vdi_image(tmp_path, sr, vdi):
    (tmp_path / SR).mkdir()
    with pytest.raises(RequestError) as err:
        sr_image(tmp_path, sr, vdi)
    assert err.value.status == 400


def test_an_sr_this_host_does_not_have_is_404(tmp_path):
    with pytest.raises(RequestError) as err:
        sr_image(tmp_path, SR, VDI)
    assert err.value.status == 404 and SR in str(err.value)


def test_without_sr_root_sr_and_vdi_are_refused(tmp_path):
    with pytest.raises(RequestError) as err:
        sr_image(None, SR, VDI)
    assert err.value.status == 400 and "sr_root" in str(err.value)


def test_the_hook_gets_the_resource_and_the_vm_in_its_environment():
    env = hooks.hook_env({"PATH": "/bin"}, "vdi-x", "vm-y")
    assert env == {"PATH": "/bin", "EAC_AM_RESOURCE": "vdi-x", "EAC_AM_VM": "vm-y"}


def test_a_hook_that_exits_gives_its_status_and_output():
    argv = [sys.executable, "-c", "import os, sys; print('unpaused', os.environ['EAC_AM_VM']); sys.exit(3)"]
    result = asyncio.run(hooks.run_hook(argv, hooks.hook_env({}, "r", "vm-1"), 10))
    assert result.status == 3 and not result.ok and "unpaused vm-1" in result.output
    assert "status 3" in hooks.summary(result) and "unpaused vm-1" in hooks.summary(result)


def test_a_hook_that_hangs_is_killed_after_its_timeout_with_what_it_started():
    argv = ["/bin/sh", "-c", "sleep 60 & sleep 60"]
    started = time.monotonic()
    result = asyncio.run(hooks.run_hook(argv, {}, 0.5))
    assert time.monotonic() - started < 5
    assert result.status is None and not result.ok and "timed out" in result.why


def test_a_hook_that_cannot_start_is_a_failure_not_an_exception(tmp_path):
    result = asyncio.run(hooks.run_hook([str(tmp_path / "missing")], {}, 5))
    assert result.status is None and result.why.startswith("cannot start")


def test_sr_root_and_on_promote_are_read_from_the_configuration(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(BASE + '[disks]\nsr_root = "srs"\n[vm]\non_promote = ["xe", "vm-unpause"]\n')
    cfg = config.load(path)
    assert cfg.sr_root == (tmp_path / "srs").resolve()
    assert cfg.on_promote == ["xe", "vm-unpause"] and cfg.on_promote_timeout_s == 10.0


def test_without_them_there_is_no_sr_root_and_no_hook(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(BASE)
    cfg = config.load(path)
    assert cfg.sr_root is None and cfg.on_promote == []


@pytest.mark.parametrize("extra, words", [
    ('[vm]\non_promote = "xe vm-unpause"\n', "on_promote"),
    ('[vm]\non_promote = ["xe", ""]\n', "on_promote"),
    ('[vm]\non_promote_timeout_s = 0\n', "on_promote_timeout_s"),
    ('[disks]\nsr_root = 3\n', "sr_root"),
    ('[disks]\nroot = "x"\n', "root"),
])
def test_bad_level2_settings_are_refused_with_a_sentence(tmp_path, extra, words):
    path = tmp_path / "am.toml"
    path.write_text(BASE + extra)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert words in str(err.value)

