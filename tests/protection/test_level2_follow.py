"""The console follows the AMs' change feeds (``manage.py follow_ams``, protection/follow.py): a change on either
AM of a Level 2 protection becomes a read of that protection within a second, whatever the beat's interval and
whatever XAPI says (a cut availability link is nothing to XAPI). The follower under test runs in the test's
process, against the live bed's real AMs, with the protection the console made (the stack runs its own beside it:
end to end, inventory changes of the pool also make reads, so only the follower's own calls can tell)."""
from __future__ import annotations

import queue
import threading
import time

import pytest
from django.test import override_settings

from protection.follow import Follower
from tests.protection.test_level2_faults import HEALTH, api, protected, stack  # noqa: F401 - fixtures
from tests.xapisim.test_live import pytestmark as pytestmark  # root, ip and nft, as the live bed's tests

READ_WITHIN_S = 3.0  # AM link timeout (0.5 s) + the follower's debounce, with room for a loaded machine
QUIET_S = 1.0


@pytest.fixture(scope="module")
def console_settings() -> dict[str, str]:
    """The beat's poll an hour apart: it cannot be what reads the AMs here."""
    return {**HEALTH, "EAC_AM_HEALTH_INTERVAL": "3600"}


def _settle(reads: queue.Queue, quiet: float = 0.3) -> None:
    """Take the reads of a burst until none has come for ``quiet`` seconds (both AMs tell of one change, each
    after its own link timeout)."""
    while True:
        try:
            reads.get(timeout=quiet)
        except queue.Empty:
            return


def test_a_change_on_either_am_becomes_a_read_of_the_protection_within_a_second(
        stack, protected):  # noqa: F811 - the fixtures imported above
    cmd, primary, secondary = stack["cmd"], protected["primary"], protected["secondary"]
    pk = protected["protection"].pk
    reads: queue.Queue[int] = queue.Queue()
    with override_settings(EAC_AM_TOKEN_FILE=stack["live"].bed["hosts"][0]["am"]["token_file"]):
        follower = Follower(reads.put, refresh=0.5, debounce=0.05, wait=5.0)
        thread = threading.Thread(target=follower.run, name="follower-under-test", daemon=True)
        thread.start()
        try:
            assert reads.get(timeout=10) == pk  # the first contact with each AM: a read
            assert set(follower.feeds) == {primary.am_url, secondary.am_url}
            _settle(reads)  # the feeds' first answers; then nothing: a quiet AM makes no read
            with pytest.raises(queue.Empty):
                reads.get(timeout=QUIET_S)

            for host, up in ((primary, False), (primary, True), (secondary, False), (secondary, True)):
                at = time.monotonic()
                cmd.control("POST", f"/sim/hosts/{host.name_label}/links/b", {"up": up})
                assert reads.get(timeout=READ_WITHIN_S) == pk, f"link B {'back' if up else 'cut'} at {host}"
                print(f"\nlink B {'back' if up else 'cut'} at {host.name_label}: a read enqueued after "
                      f"{time.monotonic() - at:.2f} s")
                _settle(reads)
        finally:
            follower.stop.set()
            thread.join(10)
            for host in (primary, secondary):
                cmd.control("POST", f"/sim/hosts/{host.name_label}/links/b", {"up": True})
    assert not thread.is_alive() and all(not f.is_alive() or f.stop.is_set() for f in follower.feeds.values())
