"""The AM's side of the witness: one async call per operation, each answered within ``timeout_s`` or not at all.

The AM calls this every 200 ms, and a late answer is worth nothing to it: the timeouts are short and nothing
is retried here (the AM's next tick is the retry).

Requests are kept in order for the caller. Each one carries ``rseq``, a number this client makes (callers do
not pass it): strictly increasing over the client's life and across restarts of the AM, as it starts from the
wall clock in nanoseconds (``max(previous + 1, time.time_ns())``). The witness acts on a node's requests for a
resource only in that order: one that a later request has overtaken, because it was stuck in the network past
its timeout, is refused as stale and changes nothing. So a late ``mark_current`` cannot undo the ``outdate``
sent after it, nor a late ``release`` the acquire or renewal sent after it, and the caller need not wait for
any answer before its next request. For the same reason the client sends one request per resource at a time
(the others wait their turn, within their own ``timeout_s``): requests sent side by side could reach the
witness in either order, and the one overtaken would be refused although its caller still waits for it. If the
wall clock was set back across a restart, the first requests are refused as stale; the answer gives the
witness's number (``rseq_floor``) and the client numbers on from there.

Two rules for the caller, which the witness cannot enforce (``tests/am/test_witness_core.py`` shows what breaks
without them):

* Read the clock *before* awaiting ``acquire``/``renew`` and believe in the lease until that time +
  ``answer.lease_s``: the witness counts its lease from when it received the request, which is later.
* Stop writing before ``release``, and ignore the answers of renewals sent before it: a renewal that the witness
  handled before the release says nothing about the time after it.

And one that is no longer needed: acquiring again does not have to wait until a ``release`` is answered; a
release stuck in the network is refused as stale once a later request of the node has been acted on.
"""
from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from am.witness_core import Answer


class WitnessError(Exception):
    """The witness gave no usable answer. Catch this one: to the AM, every kind of it means "no witness"."""


class WitnessUnreachable(WitnessError):
    """No answer in time: connection refused or reset, timeout, a 5xx, or a reply that is not the witness's."""


class WitnessRejected(WitnessError):
    """The witness refused to read the request (401: wrong token, 400: malformed): a configuration error or a
    bug, not an outage; the message is the witness's sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"witness answered {status}: {message}")
        self.status = status


def _lease_ms(lease_s: float | None) -> dict[str, int]:
    return {} if lease_s is None else {"lease_ms": round(lease_s * 1000)}


class _Error(msgspec.Struct):
    error: str


class WitnessClient:
    """The witness at ``url`` (``http://host:port``), as ``node``. Use ``async with``, or ``await close()``."""

    def __init__(self, url: str, token: str, node: str, timeout_s: float = 0.3) -> None:
        self.url = url.rstrip("/")
        self.node = node
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._rseq = 0
        self._turns: dict[str, asyncio.Lock] = {}  # per resource: one request at a time, in rseq order

    async def __aenter__(self) -> WitnessClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the operations ---------------------------------------------------------------------------------------

    async def acquire(self, resource: str, lease_s: float | None = None) -> Answer:
        """``lease_s``: a lease shorter than the witness's own (the answer says which one it granted)."""
        return await self._call(resource, "POST", "/v1/acquire", {"resource": resource, "node": self.node,
                                                                   **_lease_ms(lease_s)})

    async def renew(self, resource: str, epoch: int, lease_s: float | None = None) -> Answer:
        return await self._call(resource, "POST", "/v1/renew", {"resource": resource, "node": self.node,
                                                                 "epoch": epoch, **_lease_ms(lease_s)})

    async def release(self, resource: str, epoch: int, handover_to: str | None = None) -> Answer:
        return await self._call(resource, "POST", "/v1/release", {"resource": resource, "node": self.node,
                                                                   "epoch": epoch, "handover_to": handover_to})

    async def outdate(self, resource: str, epoch: int, peer: str) -> Answer:
        """Before acknowledging the first write ``peer`` does not have: only an ``ok`` answer allows it."""
        return await self._call(resource, "POST", "/v1/outdate", {"resource": resource, "node": self.node,
                                                                   "epoch": epoch, "peer": peer})

    async def mark_current(self, resource: str, epoch: int, peer: str) -> Answer:
        return await self._call(resource, "POST", "/v1/current", {"resource": resource, "node": self.node,
                                                                   "epoch": epoch, "peer": peer})

    async def forget(self, resource: str) -> Answer:
        return await self._call(resource, "DELETE", f"/v1/resources/{resource}", None)

    # -- the wire ---------------------------------------------------------------------------------------------

    def _next_rseq(self) -> int:
        """Higher than any number this client gave, and than any an earlier process of the AM gave (while the
        wall clock is not set back across the restart: see ``rseq_floor``)."""
        self._rseq = max(self._rseq + 1, time.time_ns())
        return self._rseq

    async def _call(self, resource: str, method: str, path: str, body: dict[str, Any] | None) -> Answer:
        if self._session is None:  # created here: a session belongs to the loop it was made in
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        turn = self._turns.setdefault(resource, asyncio.Lock())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        try:
            async with asyncio.timeout_at(deadline), turn:  # waiting for the turn counts in the timeout
                if deadline - loop.time() < min(0.05, self._timeout_s / 4):
                    # its turn came too late for an answer in time: not sent (a request the caller no longer
                    # waits for would only move the witness's numbering on)
                    raise TimeoutError("no time left after waiting for the turn")
                # Numbered once it is this request's turn, so that it is never sent before a lower number.
                rseq = self._next_rseq()
                if body is None:
                    data, params = None, {"node": self.node, "rseq": str(rseq)}
                else:
                    data, params = msgspec.json.encode({**body, "rseq": rseq}), None
                async with self._session.request(method, self.url + path, data=data, params=params,
                                                 headers={"Content-Type": "application/json"}) as resp:
                    payload = await resp.read()
                    status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise WitnessUnreachable(f"witness at {self.url} did not answer: {exc!r}") from exc
        if status >= 500:
            raise WitnessUnreachable(f"witness at {self.url} answered {status}")
        if status != 200:
            try:
                message = msgspec.json.decode(payload, type=_Error).error
            except msgspec.DecodeError:
                raise WitnessUnreachable(f"{self.url} answered {status} with no witness error") from None
            raise WitnessRejected(status, message)
        try:
            answer = msgspec.json.decode(payload, type=Answer)
        except msgspec.DecodeError:
            raise WitnessUnreachable(f"{self.url} answered 200 with no witness answer") from None
        # A stale refusal of a request this client still waited for: none of its later requests was sent yet,
        # so the higher number the witness acted on is from an earlier process whose clock ran ahead of ours.
        self._rseq = max(self._rseq, answer.rseq_floor)
        return answer
