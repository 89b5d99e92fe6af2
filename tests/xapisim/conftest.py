"""In-process simulators for the xapisim tests (fast: no subprocess, no operation delay)."""

from __future__ import annotations

import contextlib

import pytest
import XenAPI

from xapisim.server import Simulator


def make_sim(**kwargs: object) -> Simulator:
    options: dict[str, object] = {
        "port": 0,
        "op_delay": 0.0,
        "ha_timeout": 0.5,
        "vm_restart_delay": 0.1,
        "boot_delay": 0.1,
    }
    options.update(kwargs)
    return Simulator(**options).start()  # type: ignore[arg-type]


@pytest.fixture
def sim():
    """The demo pool, in this process, with instant operations."""
    s = make_sim()
    yield s
    s.stop()


def login(url: str) -> XenAPI.Session:
    session = XenAPI.Session(url)
    session.xenapi.login_with_password("root", "demo", "2.21", "xapisim-tests")
    return session


@pytest.fixture
def api(sim):
    """A logged-in ``session.xenapi`` of the unmodified XenAPI package."""
    session = login(sim.url)
    yield session.xenapi
    # The test may have crashed the master: then there is nothing to log out of.
    with contextlib.suppress(OSError, XenAPI.Failure):
        session.xenapi.session.logout()
