"""In-process simulators for the xapisim tests (fast: no subprocess, no operation delay)."""

from __future__ import annotations

import contextlib

import pytest
import XenAPI

from tests.support import start_sim, xapi_login

INSTANT = {"op_delay": 0.0, "ha_timeout": 0.5, "vm_restart_delay": 0.1, "boot_delay": 0.1}


@pytest.fixture
def make_sim():
    """``make_sim(**options)``: a simulator with instant timings unless ``options`` (``Simulator``'s) say
    otherwise; each is stopped after the test."""
    started = []

    def make(**options):
        sim = start_sim(**{**INSTANT, **options})
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim):
    """The demo pool, in this process, with instant operations."""
    return make_sim()


@pytest.fixture
def api(sim):
    """A logged-in ``session.xenapi`` of the unmodified XenAPI package."""
    session = xapi_login(sim.url)
    yield session.xenapi
    # The test may have crashed the master: then there is nothing to log out of.
    with contextlib.suppress(OSError, XenAPI.Failure):
        session.xenapi.session.logout()
