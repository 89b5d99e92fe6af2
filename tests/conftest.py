import pytest

from tests.support import start_xapisim


@pytest.fixture
def xapisim():
    """A demo-preset xapisim in its own process, stopped after the test."""
    sim = start_xapisim()
    yield sim
    sim.stop()
