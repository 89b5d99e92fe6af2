"""The management API the console uses: HTTP + JSON with a bearer token, a change feed, Prometheus metrics.

Every answer is JSON (metrics excepted); a wrong or missing token gets 401 and nothing else; bad input a 4xx
with a sentence. The routes are documented in am/README.md.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging

import msgspec
from aiohttp import web

from am import roles, sync
from am.agent import UUID, Agent, RequestError
from am.checkpoint import CheckpointConfig
from am.states import Conn, Role

log = logging.getLogger("am.api")
AGENT = web.AppKey("agent", Agent)


class CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    role: str
    size: int | None = None
    image: str | None = None
    peer: str | None = None
    sr: str | None = None  # with vdi, instead of image: <disks.sr_root>/<sr>/<vdi>.img
    vdi: str | None = None
    vm: str | None = None  # the VM on this replica's side (told to [vm] on_promote)
    checkpoint: CheckpointConfig | None = None  # Level 3 (am/checkpoint.py); both sides get the same


class PatchBody(msgspec.Struct, forbid_unknown_fields=True):
    vm: str | None  # the VM on this replica's side now (null: none)


class FaultBody(msgspec.Struct, forbid_unknown_fields=True):
    disk: str


class DiscardBody(msgspec.Struct, forbid_unknown_fields=True):
    confirm: str  # the resource's name again: discarding a replica's writes is not undone


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def guard(request: web.Request, handler):
    agent = request.app[AGENT]
    # aiohttp keeps undecodable header bytes as surrogates: surrogateescape gives the bytes back to compare
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, f"Bearer {agent.cfg.token}".encode()):
        return _error(401, "a valid bearer token is required")
    try:
        return await handler(request)
    except RequestError as exc:
        return _error(exc.status, str(exc))
    except (roles.RoleError, sync.Refused) as exc:
        return _error(409, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except Exception:
        log.exception("management API: %s %s failed", request.method, request.path)
        return _error(500, "internal error: see the agent's log")


async def _body(request: web.Request, kind: type):
    raw = await request.read()
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise RequestError(400, f"invalid request: {exc}") from None
    except msgspec.DecodeError:
        raise RequestError(400, "the body is not valid JSON") from None


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT].status())


async def resources(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    return web.json_response([res.status() for res in agent.resources.values()])


async def create(request: web.Request) -> web.Response:
    body = await _body(request, CreateBody)
    res = await request.app[AGENT].create(name=body.name, role=body.role, size=body.size, image=body.image,
                                          peer=body.peer, sr=body.sr, vdi=body.vdi, vm=body.vm,
                                          checkpoint=body.checkpoint)
    return web.json_response(res.status(), status=201)


async def detail(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT].get(request.match_info["name"]).status())


async def patch(request: web.Request) -> web.Response:
    """Change what may change of a resource after its creation: its ``vm`` (a planned swap of the whole VM)."""
    res = request.app[AGENT].get(request.match_info["name"])
    body = await _body(request, PatchBody)
    if body.vm is not None and not UUID.fullmatch(body.vm):
        raise RequestError(400, "vm must be a uuid (lowercase, 8-4-4-4-12 hexadecimal digits) or null")
    res.set_vm(body.vm or "")
    return web.json_response(res.status())


async def delete(request: web.Request) -> web.Response:
    await request.app[AGENT].delete(request.match_info["name"])
    return web.Response(status=204)


async def action(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    res = agent.get(request.match_info["name"])
    verb = request.match_info["action"]
    if verb == "promote":
        return web.json_response(await roles.promote(res))
    if verb == "demote":
        return web.json_response(await roles.demote(res))
    if verb == "swap":
        return web.json_response(await roles.swap(res))
    if verb == "verify":
        if res.role != Role.PRIMARY or res.conn != Conn.CONNECTED or not res.peer_replicating():
            raise RequestError(409, f"verify runs on the primary with both replicas connected and in sync "
                                    f"({res.name} here: {res.role}, {res.conn})")
        try:
            return web.json_response(await sync.verify(res))
        except RuntimeError as exc:
            raise RequestError(409, str(exc)) from None
    if verb == "resync":
        if res.role != Role.PRIMARY or res.conn != Conn.CONNECTED or not res.peer_replicating():
            raise RequestError(409, "a full resync is started on the primary with the peer connected")
        res.conn.set(Conn.SYNC_SOURCE, "full resync asked by the operator")
        res.sync_task(sync.push(res, sync.decide.SyncKind.FULL))
        return web.json_response(res.status(), status=202)
    if verb == "disk-repaired":
        sync.disk_repaired(res)
        return web.json_response(res.status(), status=202)
    if verb == "discard-my-data":
        body = await _body(request, DiscardBody)
        if body.confirm != res.name:
            raise RequestError(400, "confirm must repeat the resource's name")
        sync.discard_my_data(res)
        return web.json_response(res.status(), status=202)
    if verb == "fault":
        if not agent.cfg.fault_injection:
            raise RequestError(404, "fault injection is off in this agent's configuration")
        body = await _body(request, FaultBody)
        if body.disk == "fail":
            res.image.injected_failure = True
            return web.json_response({"injected": "disk failure"})
        if body.disk == "stall":  # flushes hang until "resume": a secondary's stalled disk stalls checkpoints
            res.image.unstalled.clear()
            return web.json_response({"injected": "disk stall"})
        if body.disk == "resume":
            res.image.unstalled.set()
            return web.json_response({"injected": "nothing: the disk answers again"})
        raise RequestError(400, "disk must be 'fail', 'stall' or 'resume'")
    raise RequestError(404, f"no action {verb!r}")


async def events(request: web.Request) -> web.Response:
    try:
        after = int(request.query.get("after", "0"))
        wait = min(float(request.query.get("timeout", "0")), 30.0)
    except ValueError:
        raise RequestError(400, "after must be an integer and timeout a number of seconds") from None
    return web.json_response(await request.app[AGENT].events_after(after, max(wait, 0.0)))


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every change as it happens, ``id`` = its sequence number (Last-Event-ID resumes)."""
    agent = request.app[AGENT]
    try:
        after = int(request.headers.get("Last-Event-ID", request.query.get("after", "0")))
    except ValueError:
        raise RequestError(400, "Last-Event-ID must be an integer") from None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        while True:
            batch = await agent.events_after(after, 15.0)
            if not batch:
                await resp.write(b": keep-alive\n\n")
            for event in batch:
                after = event["seq"]
                await resp.write(f"id: {after}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp


async def metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    lines = [
        "# HELP eac_am_link_up Availability link up (1) or down (0).",
        "# TYPE eac_am_link_up gauge",
    ]
    for link in ("a", "b"):
        lines.append(f'eac_am_link_up{{link="{link}"}} {int(agent.links.state[link] == "Up")}')
    lines += ["# HELP eac_am_link_rtt_seconds Round-trip time of the heartbeats.",
              "# TYPE eac_am_link_rtt_seconds gauge"]
    for link, rtt in agent.links.rtt_ms.items():
        if rtt is not None:
            lines.append(f'eac_am_link_rtt_seconds{{link="{link}"}} {rtt / 1000:.6f}')
    lines.append(f"eac_am_witness_reachable {int(agent.witness_reachable())}")
    gauges = {
        "eac_am_primary": ("Primary here (1) or secondary (0).", lambda s: int(s["role"] == "Primary")),
        "eac_am_uptodate": ("The local replica is UpToDate.", lambda s: int(s["disk"] == "UpToDate")),
        "eac_am_in_flight": ("Replicated ops not yet acknowledged by the peer.", lambda s: s["in_flight"]),
        "eac_am_replication_lag_seconds": ("Age of the oldest unacknowledged op.",
                                           lambda s: s["replication_lag_ms"] / 1000),
        "eac_am_dirty_regions": ("Regions the peer is missing.", lambda s: s["dirty_regions"]),
        "eac_am_resync_done_regions": ("Regions copied by the current resync.", lambda s: s["resync"]["done"]),
        "eac_am_resync_total_regions": ("Regions the current resync copies.", lambda s: s["resync"]["total"]),
        "eac_am_split_brain": ("Both replicas took writes.", lambda s: int(s["split_brain"])),
        "eac_am_nbd_clients": ("NBD connections to the export.", lambda s: s["clients"]),
    }
    statuses = [res.status() for res in agent.resources.values()]
    for name, (help_, get) in gauges.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{resource="{s["name"]}"}} {get(s)}' for s in statuses]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def make_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[AGENT] = agent
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/resources", resources)
    app.router.add_post("/v1/resources", create)
    app.router.add_get("/v1/resources/{name}", detail)
    app.router.add_patch("/v1/resources/{name}", patch)
    app.router.add_delete("/v1/resources/{name}", delete)
    app.router.add_post("/v1/resources/{name}/{action}", action)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/events/stream", stream)
    app.router.add_get("/metrics", metrics)
    return app
