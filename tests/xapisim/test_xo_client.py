"""Xen Orchestra's own client (npm `xen-api`) against xapisim, over both transports."""
import json
import subprocess
from pathlib import Path

import pytest

XO = Path(__file__).resolve().parent.parent / "xo"



@pytest.fixture(autouse=True)
def _xo_client_installed():
    assert (XO / "node_modules" / "xen-api").exists(), "run scripts/test-prereqs (npm ci in tests/xo) first"


@pytest.mark.parametrize("transport", ["xml-rpc", "json-rpc"])
def test_xen_orchestra_client_loads_every_object_and_follows_events(xapisim, transport):
    result = subprocess.run(
        ["node", "xo_client_check.mjs", xapisim.url, "root", xapisim.password, transport],
        cwd=XO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    state = xapisim.state()
    assert report["counts"]["host"] == len(state["hosts"])
    assert report["counts"]["VM"] == len(state["vms"])
    for cls in ("pool", "SR", "VDI", "VBD", "VIF", "network", "PIF", "PBD", "host_metrics"):
        assert report["counts"].get(cls, 0) > 0, cls
    assert report["renamed"] is True
