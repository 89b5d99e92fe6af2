"""The witness over HTTP: ``python -m am.witness --listen HOST:PORT --token-file PATH --state PATH``.

A thin aiohttp shell around ``WitnessCore``: it parses requests (the Structs below are the wire format),
reads the clock, calls the core and saves the state before it answers. Every decision is the core's.

Threading contract: one event loop, and no ``await`` between the core's decision and the state being on
disk. Saving synchronously blocks the loop for one fsync, which is the point: no other request can be
answered from a state the disk does not hold yet. Every grant but a renewal is saved; renewals are not (see
``am.witness_core``), so the every-200-ms traffic costs no fsync.

Every request carries ``rseq``, its sender's request number (``am.witness_client`` makes it); the witness refuses
one that a later request of the same node for the same resource has overtaken. The field is required: a client
that does not send it cannot be kept in order, and gets a 400.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from am.store import write_atomically
from am.witness_core import Answer, CorruptState, WitnessCore

log = logging.getLogger("am.witness")

T = TypeVar("T")

MAX_BODY = 16 * 1024

# Names travel in URLs (DELETE /v1/resources/{name}) and in logs: no slashes, spaces or control characters.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Epoch = Annotated[int, msgspec.Meta(ge=1, le=2**53)]
Rseq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]  # nanoseconds since 1970 at the client's start, and up
# A lease shorter than the witness's own (a Level 3 VM's, whose takeover must come sooner); a longer one is cut.
LeaseMs = Annotated[int, msgspec.Meta(ge=100, le=600_000)]


# Unknown fields are refused: a misspelt "handover_to" silently ignored would turn a planned swap into a takeover.
class AcquireRequest(msgspec.Struct, forbid_unknown_fields=True):
    resource: Name
    node: Name
    rseq: Rseq
    lease_ms: LeaseMs | None = None


class RenewRequest(msgspec.Struct, forbid_unknown_fields=True):
    resource: Name
    node: Name
    epoch: Epoch
    rseq: Rseq
    lease_ms: LeaseMs | None = None


class ReleaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    resource: Name
    node: Name
    epoch: Epoch
    rseq: Rseq
    handover_to: Name | None = None


class PeerRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``outdate`` and ``current``: the holder says something about its peer's replica."""

    resource: Name
    node: Name
    epoch: Epoch
    peer: Name
    rseq: Rseq


class ForgetQuery(msgspec.Struct, forbid_unknown_fields=True):
    resource: Name
    node: Name
    rseq: Rseq


class StartupError(Exception):
    """A file or address the witness needs cannot be used; the message names it and the cause (exit status 2)."""


# -- persistence ----------------------------------------------------------------------------------------------


def load_state(path: Path, lease_s: float, started_at: float) -> WitnessCore:
    """The core from ``path`` (a fresh one if there is no file yet); StartupError if it cannot be trusted."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return WitnessCore(lease_s=lease_s, started_at=started_at)
    except OSError as exc:
        raise StartupError(f"cannot read state file {path}: {exc.strerror}") from None
    try:
        return WitnessCore.restore(msgspec.json.decode(raw), lease_s=lease_s, started_at=started_at)
    except (msgspec.DecodeError, CorruptState) as exc:
        raise StartupError(f"state file {path} is corrupt ({exc}); restore it from a backup, or move it away "
                             f"to start with no resources") from None


def save_state(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, msgspec.json.encode(data))


# -- the HTTP shell -------------------------------------------------------------------------------------------


class Witness:
    """The core, its state file and its clock."""

    def __init__(self, core: WitnessCore, state_path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self.state_path = state_path
        self.clock = clock

    def apply(self, op: str, call: Callable[[WitnessCore, float], Answer], subject: str) -> Answer:
        """Run one operation and save the state if it changed, before the answer leaves."""
        before = self.core.revision
        answer = call(self.core, self.clock())
        if self.core.revision != before:
            try:
                save_state(self.state_path, self.core.snapshot())
            except OSError as exc:
                # The core already holds a state the disk does not: answering from it later could grant what a
                # restart would not know about. Stop; the next process starts from the file, which is the truth.
                log.critical("cannot save state to %s (%s); exiting so that the file stays the truth",
                             self.state_path, exc)
                logging.shutdown()
                os._exit(3)
            log.info("%s %s: %s (epoch %d, holder %s, current %s)", op, subject,
                     "granted" if answer.ok else "refused", answer.epoch, answer.holder, ",".join(answer.current))
        else:
            # A stale request was stuck in the network past its client's timeout: worth an operator's notice.
            level = logging.INFO if answer.reason.startswith("stale request") else logging.DEBUG
            log.log(level, "%s %s: %s %s", op, subject, "granted" if answer.ok else "refused", answer.reason)
        return answer


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


class BadRequest(Exception):
    """A request the witness cannot read; the message is the 400's sentence."""


NO_RSEQ = ("The request carries no rseq, its sender's request number, which this witness requires of every "
           "request to refuse those overtaken by a later one; the client is older than the witness.")


def not_fitting(type_: type[Any], exc: msgspec.ValidationError, where: str = "") -> BadRequest:
    if "missing required field `rseq`" in str(exc):
        return BadRequest(NO_RSEQ)
    return BadRequest(f"The request does not fit {type_.__name__}{where}: {exc}.")


def decode(body: bytes, type_: type[T]) -> T:
    """``body`` as the Struct ``type_``; BadRequest with a sentence naming the bad field otherwise."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise not_fitting(type_, exc) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None


def bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def make_app(witness: Witness, token: str) -> web.Application:
    """The routes; every one but /v1/health needs ``Authorization: Bearer <token>``."""
    expected = token.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path != "/v1/health":
            given = bearer_token(request)
            # compare_digest: the time taken does not tell how much of a guess was right.
            if given is None or not hmac.compare_digest(given.encode(), expected):
                response = error(401, "A valid bearer token is required.")
                response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750
                return response
        try:
            return await handler(request)
        except BadRequest as exc:
            return error(400, str(exc))
        except web.HTTPException as exc:  # 404, 405, 413: the same JSON shape as every other error
            if exc.status < 400:
                raise
            return error(exc.status, exc.reason + ".")

    async def health(request: web.Request) -> web.Response:
        return json_response({"ok": True})

    def post(op: str, type_: type[Any], call: Callable[[Any, WitnessCore, float], Answer]
             ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            req = decode(await request.read(), type_)
            answer = witness.apply(op, lambda core, now: call(req, core, now),
                                   f"{req.resource} by {req.node} (request {req.rseq})")
            return json_response(answer)

        return handler

    async def forget(request: web.Request) -> web.Response:
        query = {name: value for name, value in (("resource", request.match_info["name"]),
                                                 ("node", request.query.get("node")),
                                                 ("rseq", request.query.get("rseq"))) if value is not None}
        try:
            req = msgspec.convert(query, type=ForgetQuery, strict=False)  # strict=False: rseq is text in a query
        except msgspec.ValidationError as exc:
            raise not_fitting(ForgetQuery, exc, " (the node and rseq go in ?node=&rseq=)") from None
        answer = witness.apply("forget", lambda core, now: core.forget(req.resource, req.node, now, rseq=req.rseq),
                               f"{req.resource} by {req.node} (request {req.rseq})")
        return json_response(answer)

    async def resources(request: web.Request) -> web.Response:
        return json_response({"resources": witness.core.describe(witness.clock())})

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/acquire", post(
        "acquire", AcquireRequest,
        lambda r, core, now: core.acquire(r.resource, r.node, now, rseq=r.rseq, lease_s=_seconds(r.lease_ms))))
    app.router.add_post("/v1/renew", post(
        "renew", RenewRequest,
        lambda r, core, now: core.renew(r.resource, r.node, r.epoch, now, rseq=r.rseq, lease_s=_seconds(r.lease_ms))))
    app.router.add_post("/v1/release", post(
        "release", ReleaseRequest,
        lambda r, core, now: core.release(r.resource, r.node, r.epoch, now, handover_to=r.handover_to, rseq=r.rseq)))
    app.router.add_post("/v1/outdate", post(
        "outdate", PeerRequest,
        lambda r, core, now: core.outdate(r.resource, r.node, r.epoch, r.peer, now, rseq=r.rseq)))
    app.router.add_post("/v1/current", post(
        "current", PeerRequest,
        lambda r, core, now: core.mark_current(r.resource, r.node, r.epoch, r.peer, now, rseq=r.rseq)))
    app.router.add_delete("/v1/resources/{name}", forget)
    app.router.add_get("/v1/resources", resources)
    return app


# -- the command ----------------------------------------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) for argparse."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read token file {path}: {exc}") from None
    if not token:
        raise StartupError(f"token file {path} is empty")
    return token


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None)  # the renewals every 200 ms would drown the decisions
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = runner.addresses[0]  # the real port when 0 was asked for
    print(f"witness listening on {host}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m am.witness", description="The Availability Manager's witness.")
    parser.add_argument("--listen", required=True, type=parse_listen, metavar="HOST:PORT")
    parser.add_argument("--token-file", required=True, type=Path, metavar="PATH")
    parser.add_argument("--state", required=True, type=Path, metavar="PATH")
    parser.add_argument("--lease-ms", type=int, default=800, metavar="MS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.lease_ms <= 0:
        parser.error("--lease-ms must be positive")
    try:
        token = read_token(args.token_file)
        core = load_state(args.state, lease_s=args.lease_ms / 1000, started_at=time.monotonic())
    except StartupError as exc:
        print(f"witness: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    witness = Witness(core, args.state)
    host, port = args.listen
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(make_app(witness, token), host, port))
    except StartupError as exc:
        print(f"witness: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
