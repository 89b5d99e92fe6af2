"""The agent: its resources, the peer links, the NBD server, the witness and the change feed, on one event loop."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import time
from pathlib import Path

import aiohttp

from am import hooks, roles, sync, wire
from am.checkpoint import QUEUE_BASE, CheckpointConfig, Checkpointer, GuestSocketSource, stage_restore
from am.config import Config
from am.nbd import NBDServer
from am.network import NetworkPairing
from am.peer import PeerLinks
from am.resource import Resource
from am.states import Conn, Disk, Role
from am.store import Bitmap, Image, Meta, load_meta, new_gen, save_meta
from am.witness_client import WitnessClient, WitnessError

log = logging.getLogger("am.agent")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def sr_image(sr_root: Path | None, sr: str | None, vdi: str | None) -> Path:
    """Where a VDI's image is: ``<sr_root>/<sr>/<vdi>.img``. Only uuids are taken (no path of the caller's
    reaches the file system), and only for an SR this host has. Raises RequestError."""
    if sr_root is None:
        raise RequestError(400, "this agent has no [disks] sr_root: give an image path instead of sr and vdi")
    if sr is None or vdi is None:
        raise RequestError(400, "sr and vdi go together")
    for what, value in (("sr", sr), ("vdi", vdi)):
        if not isinstance(value, str) or not UUID.fullmatch(value):
            raise RequestError(400, f"{what} must be a uuid (lowercase, 8-4-4-4-12 hexadecimal digits)")
    directory = sr_root / sr
    if not directory.is_dir():
        raise RequestError(404, f"no storage repository {sr} on this host")
    return directory / f"{vdi}.img"


class RequestError(Exception):
    """Bad input to the management API: ``status`` and a sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.resources: dict[str, Resource] = {}
        self.session = 0
        self.timeout = cfg.timers.link_timeout_ms / 1000
        self.lease_s = 0.8
        self.swapping = False
        self.links = PeerLinks(cfg, self.on_message, self.on_link_change, self.state_changed)
        # NIC failover through the pairing (am/network.py), with a [network] section only
        self.network = (NetworkPairing(self, cfg.network, cfg.timers.heartbeat_ms / 1000)
                        if cfg.network is not None else None)
        self.nbd = NBDServer(self.resources.get, self._exports)
        self.witness = WitnessClient(cfg.witness_url, cfg.witness_token, cfg.node,
                                     cfg.timers.witness_timeout_ms / 1000)
        self.witness_seen: float | None = None
        self.events: collections.deque[dict] = collections.deque(maxlen=4000)
        self.event_seq = 0
        self._event_added = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._role_tasks: dict[str, asyncio.Task] = {}
        self._controls: dict[str, asyncio.Future] = {}
        self._rid = 0
        self._queues = 0  # output buffers made (each resource's NFQUEUE number)
        self._was_connected = False
        self.started = time.time()

    # -- life cycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.cfg.data_dir.glob("*.meta.json")):
            self._open(load_meta(path))
        await self.links.start()
        await self.nbd.start(self.cfg.nbd.host, self.cfg.nbd.port)
        self.spawn(self._watch_witness())
        if self.network is not None:
            self.spawn(self.network.run())
        if self.cfg.timers.verify_interval_s:
            self.spawn(self._verify_schedule())

    async def stop(self) -> None:
        for res in self.resources.values():
            if res.checkpointer is not None:
                await res.checkpointer.stop()  # its iptables rules go; what it held is dropped
        for task in [*self._tasks, *self._role_tasks.values()]:
            task.cancel()
        await self.nbd.close()
        await self.links.stop()
        await self.witness.close()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def _exports(self) -> list[str]:
        return sorted(name for name, res in self.resources.items() if res.available() is None)

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def outdate_peer(self, res: Resource) -> None:
        await roles.outdate_peer(res)

    # -- the change feed --------------------------------------------------------------------------------
    def event(self, kind: str, resource: str | None, data: dict) -> None:
        self.event_seq += 1
        self.events.append({"seq": self.event_seq, "time": time.time(), "node": self.cfg.node, "kind": kind,
                            "resource": resource, **data})
        self._event_added.set()
        self._event_added = asyncio.Event()

    def state_changed(self, owner: str, old, new, why: str) -> None:
        if owner.startswith("link "):  # a link of the agent, not of a resource
            resource, what = None, owner
            if self.network is not None:
                self.network.wake()  # a pairing over a link that went down moves to the other
        else:
            resource, _, what = owner.rpartition(" ")
        self.event("state", resource, {"component": what, "old": str(old), "new": str(new), "why": why})

    async def events_after(self, after: int, timeout: float) -> list[dict]:
        if self.event_seq <= after and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_added.wait(), timeout)
        return [e for e in self.events if e["seq"] > after]

    # -- the peer ---------------------------------------------------------------------------------------
    def on_link_change(self, why: str) -> None:
        if self.links.active is None:
            self._was_connected = False
            self.event("peer", None, {"state": "lost", "why": why})
            for res in self.resources.values():
                res.peer_gone()
        elif not self._was_connected:
            self._was_connected = True
            self.session += 1
            self.event("peer", None, {"state": "connected", "why": why})
            for res in self.resources.values():
                res.attached = False
                res.announce()
        else:
            for res in self.resources.values():
                res.resend(why)

    def on_message(self, link: str, msg: wire.Message) -> None:
        if isinstance(msg, wire.NicState):
            if self.network is not None:
                self.network.on_state(msg)
            return
        res = self.resources.get(getattr(msg, "resource", ""))
        if res is None:
            return  # the peer has a resource we do not (yet): its primary runs degraded until we create ours
        if isinstance(msg, wire.Rep):
            res.on_rep(link, msg)
        elif isinstance(msg, wire.RepAck):
            res.on_ack(msg)
        elif isinstance(msg, wire.Attach):
            sync.on_attach(res, link, msg)
        elif isinstance(msg, wire.Remote):
            res.on_remote(link, msg)
        elif isinstance(msg, wire.RemoteReply):
            res.on_remote_reply(msg)
        elif isinstance(msg, wire.Control):
            self.spawn(roles.on_control(res, link, msg))

    def expect_control(self, resource: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._controls[resource] = fut
        return fut

    def control_reply(self, msg: wire.Control) -> None:
        fut = self._controls.pop(msg.resource, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _watch_witness(self) -> None:
        url = self.cfg.witness_url + "/v1/health"
        timeout = aiohttp.ClientTimeout(total=self.cfg.timers.witness_timeout_ms / 1000)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        ok = resp.status == 200
                except (TimeoutError, aiohttp.ClientError, OSError):
                    ok = False
                was = self.witness_reachable()
                if ok:
                    self.witness_seen = time.monotonic()
                if was != self.witness_reachable():
                    self.event("witness", None, {"state": "reachable" if ok else "unreachable"})
                await asyncio.sleep(0.25)

    def witness_reachable(self) -> bool:
        return self.witness_seen is not None and time.monotonic() - self.witness_seen < 1.0

    async def _verify_schedule(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.timers.verify_interval_s)
            for res in list(self.resources.values()):
                if res.role == Role.PRIMARY and res.conn == Conn.CONNECTED and res.peer_replicating():
                    try:
                        await sync.verify(res)
                    except RuntimeError as exc:
                        log.warning("%s: scheduled verify stopped: %s", res.name, exc)

    # -- resources --------------------------------------------------------------------------------------
    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.cfg.data_dir / f"{name}.meta.json", self.cfg.data_dir / f"{name}.bitmap"

    def _open(self, meta: Meta) -> Resource:
        meta_path, bitmap_path = self._paths(meta.name)
        image = Image(Path(meta.image), meta.size, create=False)
        bitmap = Bitmap(bitmap_path, meta.size, self.cfg.disk.bitmap_region_kib * 1024)
        res = Resource(self, meta, meta_path, image, bitmap)
        self.resources[meta.name] = res
        if meta.checkpoint_epoch_ms:
            self._queues += 1
            cfg = CheckpointConfig(meta.checkpoint_epoch_ms, list(meta.checkpoint_macs))
            res.checkpointer = Checkpointer(res, cfg, self.checkpoint_source, QUEUE_BASE + self._queues)
            res.checkpointer.start()
        self._role_tasks[meta.name] = asyncio.create_task(roles.lease_loop(res))
        return res

    def checkpoint_source(self, vm: str) -> GuestSocketSource:
        """The checkpoint source of ``vm``: its Unix socket in ``[checkpoint] control_dir``."""
        if self.cfg.control_dir is None or not vm:
            return GuestSocketSource(Path("/nonexistent/eac-am: no [checkpoint] control_dir or no vm"))
        return GuestSocketSource(self.cfg.control_dir / f"{vm}.ctl")

    def restore_path(self, name: str) -> Path:
        """Where a takeover leaves the last checkpoint of ``name`` for the toolstack to restore the VM from."""
        return self.cfg.data_dir / f"{name}.ckpt"

    async def create(self, *, name: str, role: str, size: int | None, image: str | None,
                     peer: str | None, sr: str | None = None, vdi: str | None = None,
                     vm: str | None = None, checkpoint: CheckpointConfig | None = None) -> Resource:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RequestError(400, "name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                    "or digit")
        if name in self.resources:
            raise RequestError(409, f"resource {name} exists already")
        if role not in ("primary", "secondary"):
            raise RequestError(400, "role must be 'primary' or 'secondary'")
        if peer is not None and peer != self.cfg.peer:
            raise RequestError(400, f"this agent's peer is {self.cfg.peer}, not {peer}")
        if vm is not None and (not isinstance(vm, str) or not UUID.fullmatch(vm)):
            raise RequestError(400, "vm must be a uuid (lowercase, 8-4-4-4-12 hexadecimal digits)")
        if checkpoint is not None:
            if (problem := checkpoint.check()) is not None:
                raise RequestError(400, problem)
            if not vm:
                raise RequestError(400, "a checkpointed resource needs its vm (the VM whose state is checkpointed)")
        if (sr is not None or vdi is not None) and image is not None:
            raise RequestError(400, "give either image or sr and vdi, not both")
        if sr is not None or vdi is not None:
            path = sr_image(self.cfg.sr_root, sr, vdi)
        else:
            path = Path(image) if image else self.cfg.data_dir / f"{name}.img"
        if not path.is_absolute():
            raise RequestError(400, "image must be an absolute path")
        exists = path.exists()
        if exists and not path.is_file():
            raise RequestError(400, f"image {path} is not a regular file")
        if size is None:
            if not exists:
                raise RequestError(400, "size is required for a new image")
            size = path.stat().st_size
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 512 or size > 1 << 44:
            raise RequestError(400, "size must be a positive multiple of 512 bytes, at most 16 TiB")
        if exists and path.stat().st_size < size:
            raise RequestError(400, f"image {path} holds {path.stat().st_size} bytes, less than size {size}")
        try:
            Image(path, size, create=True).close()
        except OSError as exc:
            raise RequestError(400, f"cannot create image {path}: {exc.strerror}") from None
        if role == "primary":
            try:
                for _ in range(3):  # a refusal with a short retry_s (a witness just restarted) is waited out
                    sent = time.monotonic()
                    answer = await self.witness.acquire(
                        name, self.cfg.checkpoint_lease_s if checkpoint else None)
                    if answer.ok or not 0 < answer.retry_s <= 2.0:
                        break
                    await asyncio.sleep(answer.retry_s)
            except WitnessError as exc:
                raise RequestError(503, f"the witness did not answer: {exc}") from None
            if not answer.ok:
                raise RequestError(409, f"the witness refused the primary role: {answer.reason}")
        meta = Meta(name=name, size=size, image=str(path), role=str(Role.SECONDARY),
                    disk=str(Disk.UP_TO_DATE if role == "primary" else Disk.INCONSISTENT),
                    gen=new_gen() if role == "primary" else "", sr=sr or "", vdi=vdi or "", vm=vm or "",
                    checkpoint_epoch_ms=checkpoint.epoch_ms if checkpoint else 0,
                    checkpoint_macs=list(checkpoint.macs) if checkpoint else [])
        if role == "primary":
            meta.role, meta.epoch, meta.unclean = str(Role.PRIMARY), answer.epoch, False
        save_meta(self._paths(name)[0], meta)
        res = self._open(meta)
        self.event("resource", name, {"action": "created", "role": role})
        if role == "primary":
            roles.become_primary(res, answer, sent, "created as primary", new_gen_=False)
        elif self.links.connected:
            res.attached = False
            res.announce()
        return res

    def on_promote(self, res: Resource) -> None:
        """A takeover made ``res`` primary here: run ``[vm] on_promote`` for its VM, in the background. A
        checkpointed resource first leaves its last checkpoint where the toolstack restores the VM from."""
        checkpoint = res.restore_point()
        if checkpoint is not None:
            try:
                stage_restore(self.restore_path(res.name), checkpoint)
                self.event("checkpoint", res.name, {"action": "restore", "epoch": res.standby_epoch,
                                                    "size": len(checkpoint)})
            except OSError as exc:
                log.error("%s: cannot write the checkpoint to restore from: %s", res.name, exc)
        if not self.cfg.on_promote:
            return
        if not res.meta.vm:
            log.info("%s: no VM recorded for this resource: on_promote not run", res.name)
            return
        self.spawn(self._on_promote(res.name, res.meta.vm))

    async def _on_promote(self, name: str, vm: str) -> None:
        started = time.monotonic()
        log.info("%s: running on_promote for VM %s: %s", name, vm, " ".join(self.cfg.on_promote))
        try:
            result = await hooks.run_hook(self.cfg.on_promote, hooks.hook_env(os.environ, name, vm),
                                          self.cfg.on_promote_timeout_s)
        except Exception as exc:  # never let the hook take the agent down
            log.exception("%s: on_promote failed to run", name)
            result = hooks.HookResult(None, "", f"failed: {exc}")
        took = time.monotonic() - started
        line = hooks.summary(result)
        if result.ok:
            log.info("%s: on_promote for VM %s done in %.2f s: %s", name, vm, took, line)
        else:
            log.error("%s: on_promote for VM %s failed after %.2f s: %s", name, vm, took, line)
        self.event("on-promote", name, {"vm": vm, "status": result.status, "ok": result.ok, "why": result.why,
                                        "seconds": round(took, 3)})

    async def delete(self, name: str) -> None:
        res = self.get(name)
        if res.role == Role.PRIMARY:
            raise RequestError(409, f"{name} is primary here: demote it (or swap) before deleting it")
        self._role_tasks.pop(name).cancel()
        if res.checkpointer is not None:
            await res.checkpointer.stop()
        self.restore_path(name).unlink(missing_ok=True)
        self.nbd.drop_clients(name)
        del self.resources[name]
        res.image.close()
        res.bitmap.close()
        for path in self._paths(name):
            path.unlink(missing_ok=True)
        self.event("resource", name, {"action": "deleted"})

    def get(self, name: str) -> Resource:
        res = self.resources.get(name)
        if res is None:
            raise RequestError(404, f"no resource named {name!r} on {self.cfg.node}")
        return res

    def status(self) -> dict:
        return {
            "node": self.cfg.node,
            "uptime_s": round(time.time() - self.started, 1),
            "peer": {
                "name": self.cfg.peer,
                "state": ("connected" if len(self.links.up()) == 2 else "redundancy-lost" if self.links.connected
                          else "lost"),
                "active_link": self.links.active,
                "links": {link: {"state": str(self.links.state[link]), "rtt_ms": self.links.rtt_ms[link]}
                          for link in ("a", "b")},
            },
            "witness": {"url": self.cfg.witness_url, "reachable": self.witness_reachable()},
            "resources": sorted(self.resources),
            "network": self.network.status() if self.network is not None else None,
        }
