"""The ``[vm] on_promote`` command: what a host does with its VM once its AM took a disk over.

Run after a takeover (the peer lost, the witness's grant), never after a planned swap nor when a restarted agent
takes its role back: on a Xen host it unpauses the secondary VM (``xe vm-unpause``), on the test bed
``python -m xapisim.live.hook`` does the same through XAPI. The command is bounded in time (killed after
``on_promote_timeout_s``), its exit status and output are logged and put in the change feed; whatever it does,
the agent goes on (the disk is served either way).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("am.hooks")
OUTPUT_LIMIT = 4000  # characters of the command's output kept for the log and the feed


@dataclass(frozen=True)
class HookResult:
    status: int | None  # the exit status; None when it could not start or was killed
    output: str
    why: str  # "exited", "timed out", "cannot start: ..."

    @property
    def ok(self) -> bool:
        return self.status == 0


def hook_env(base: Mapping[str, str], resource: str, vm: str) -> dict[str, str]:
    """The command's environment: the agent's, with the resource and its VM."""
    return {**base, "EAC_AM_RESOURCE": resource, "EAC_AM_VM": vm}


def summary(result: HookResult) -> str:
    """One line for the log: how it ended and the end of its output."""
    tail = " | ".join(line for line in result.output.strip().splitlines()[-5:] if line)
    return f"{result.why} (status {result.status}){': ' + tail if tail else ''}"


async def run_hook(argv: list[str], env: Mapping[str, str], timeout: float) -> HookResult:
    """Run ``argv`` to its end or for ``timeout`` seconds (then killed, with whatever it started in its group)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=dict(env), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return HookResult(None, "", f"cannot start: {exc.strerror or exc}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 2.0)
        return HookResult(None, "", f"timed out after {timeout:g} s: killed")
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        raise
    text = out.decode(errors="replace")[-OUTPUT_LIMIT:]
    return HookResult(proc.returncode, text, "exited")
