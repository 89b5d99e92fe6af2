"""Who may be primary: the witness's leases, promotion after the peer is lost, demotion and the planned swap.

A primary believes in its lease until (time it *sent* the request) + 0.9 × lease: the witness counts from when it
received it, so the primary always stops first. Promotion by takeover needs the peer lost, the replica UpToDate
and a grant; the witness grants only a node it still counts as current (see am/witness_core.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from am import sync, wire
from am.resource import Resource
from am.states import IO, Conn, Disk, Role
from am.store import new_gen
from am.witness_client import WitnessError

if TYPE_CHECKING:
    from am.checkpoint import Checkpointer

log = logging.getLogger("am.roles")
TICK = 0.1
LEASE_TRUST = 0.9
RENEW_LEFT_S = 0.3


class RoleError(Exception):
    """A role change refused, with the sentence the API returns (409)."""


def _new_generation(res: Resource, why: str) -> None:
    res.meta.history = [res.meta.gen, *res.meta.history][:16]
    res.meta.bitmap_base = res.meta.gen
    res.meta.gen = new_gen()
    log.info("%s: new generation %s (%s)", res.name, res.meta.gen, why)


def become_primary(res: Resource, answer, sent_at: float, why: str, *, new_gen_: bool) -> None:
    res.meta.epoch = answer.epoch
    res.lease_until = sent_at + answer.lease_s * LEASE_TRUST
    res.peer_outdated = res.agent.cfg.peer not in answer.current
    if new_gen_:
        _new_generation(res, why)
    res.meta.unclean = True
    res.proxy = False
    res.role.set(Role.PRIMARY, why)
    res.attached = False  # a new stream: the peer must answer our Attach before our first op
    res.save()
    res.set_io(IO.RUNNING, why)
    res.announce()
    res.agent.event("promoted", res.name, {"epoch": res.meta.epoch, "why": why})


async def lease_loop(res: Resource) -> None:
    """Renew a primary's lease; promote a secondary whose primary is lost; resume a primary after a restart."""
    witness = res.agent.witness
    resume = res.meta.role == Role.PRIMARY
    while True:
        wait = TICK
        try:
            if res.role == Role.PRIMARY:
                resume = False
                res.wake_stale()
                await _renew(res)
            elif resume or _should_take_over(res):
                sent = time.monotonic()
                answer = await witness.acquire(res.name, res.wanted_lease_s)
                if answer.ok and res.role == Role.SECONDARY and (resume or _should_take_over(res)):
                    if resume:
                        become_primary(res, answer, sent, "resumed after a restart: the witness still grants it",
                                        new_gen_=False)
                    else:
                        become_primary(res, answer, sent, "the primary is lost: the witness granted a takeover",
                                        new_gen_=True)
                        res.crashed = False
                        res.save()
                        res.agent.on_promote(res)
                elif resume and not answer.ok:
                    log.info("%s: not resuming as primary: %s", res.name, answer.reason)
                    res.meta.unclean = res.crashed
                    res.save()
                elif not answer.ok and 0 < answer.retry_s < TICK:
                    # the dead primary's lease ends sooner than the next tick: ask again just after it (every
                    # millisecond of a takeover is a millisecond of the VM's outage)
                    wait = answer.retry_s + 0.002
                resume = False
        except WitnessError as exc:
            log.debug("%s: witness: %s", res.name, exc)
            if resume and res.lease_until == 0.0:
                pass  # keep trying to resume until the witness answers
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: role loop", res.name)
        # wake at the lease's end if it comes first, so a primary cut off stops being announced Running at once
        left = res.lease_until - time.monotonic() if res.role == Role.PRIMARY else wait
        await asyncio.sleep(min(TICK, max(left, 0.0)) if left > 0 else TICK)


def _should_take_over(res: Resource) -> bool:
    return (res.role == Role.SECONDARY and not res.agent.links.connected and res.peer_was_primary
            and res.disk == Disk.UP_TO_DATE and not res.split_brain and not res.agent.swapping)


async def _renew(res: Resource) -> None:
    res.refresh_io()
    # Renewed with 0.6 lease left, and never less than RENEW_LEFT_S: a short lease renews every tick, so that a
    # slow answer rarely lets it run out.
    if res.lease_until - time.monotonic() > max(res.lease_s * 0.6, RENEW_LEFT_S):
        return
    sent = time.monotonic()
    epoch = res.meta.epoch
    answer = await res.agent.witness.renew(res.name, epoch, res.wanted_lease_s)
    if res.role != Role.PRIMARY or res.meta.epoch != epoch:
        return  # demoted meanwhile: this answer says nothing about the time after
    if answer.ok:
        res.lease_until = sent + answer.lease_s * LEASE_TRUST
        if res.io == IO.SUSPENDED and not res.draining:
            res.set_io(IO.RUNNING, "lease renewed")
    else:
        log.error("%s: the witness refused the renewal: %s", res.name, answer.reason)
        res.demote_now(f"lease lost: {answer.reason}")


async def outdate_peer(res: Resource) -> None:
    """Single flight: every write waiting to complete alone waits on the same call."""
    if res._outdating is None or res._outdating.done():
        res._outdating = asyncio.create_task(_outdate(res))
    await asyncio.shield(res._outdating)


async def _outdate(res: Resource) -> None:
    try:
        answer = await res.agent.witness.outdate(res.name, res.meta.epoch, res.agent.cfg.peer)
    except WitnessError as exc:
        log.warning("%s: cannot outdate the peer: %s", res.name, exc)
        await asyncio.sleep(TICK / 2)
        return
    if not answer.ok:
        log.warning("%s: the witness refused to outdate the peer: %s", res.name, answer.reason)
        await asyncio.sleep(TICK / 2)
        return
    _new_generation(res, "writing without the peer")
    res.save()
    res.peer_outdated = True
    res.agent.event("degraded", res.name, {"why": "writes acknowledged without the peer"})


async def promote(res: Resource) -> dict:
    if res.role == Role.PRIMARY:
        return res.status()
    if res.disk != Disk.UP_TO_DATE:
        raise RoleError(f"{res.name} cannot be promoted here: its replica is {res.disk}")
    if res.split_brain:
        raise RoleError(f"{res.name} is in split brain: resolve it first")
    if res.peer_replicating_primary():
        raise RoleError(f"the peer is primary of {res.name}: use a swap to move the role")
    sent = time.monotonic()
    try:
        answer = await res.agent.witness.acquire(res.name, res.wanted_lease_s)
    except WitnessError as exc:
        raise RoleError(f"the witness did not answer: {exc}") from None
    if not answer.ok:
        raise RoleError(f"the witness refused: {answer.reason}")
    become_primary(res, answer, sent, "promoted by the operator", new_gen_=not res.agent.links.connected)
    return res.status()


async def _drain(res: Resource, why: str, timeout: float = 5.0) -> None:
    """Hold new requests and wait for those in flight; ``_resume`` undoes it when the change is abandoned."""
    res.draining = True
    res.set_io(IO.SUSPENDED, why)
    deadline = time.monotonic() + timeout
    while any(p.op in (wire.Op.WRITE, wire.Op.ZERO, wire.Op.FLUSH) for p in res.pending.values()):
        if time.monotonic() > deadline:
            _resume(res, "drain timed out")
            raise RoleError(f"{res.name}: writes still in flight after {timeout:.0f} s; nothing changed")
        await asyncio.sleep(0.01)
    if res.disk != Disk.FAILED:
        await res.image.sync()


def _resume(res: Resource, why: str) -> None:
    res.draining = False
    if res.role == Role.PRIMARY:
        res.set_io(IO.RUNNING, why)


async def _release(res: Resource, handover_to: str | None) -> object:
    """Repeat the release until the witness answers: a release that timed out may still arrive later, and must
    not find a lease this node renewed meanwhile (am/witness_client.py)."""
    deadline = time.monotonic() + 3.0
    while True:
        try:
            return await res.agent.witness.release(res.name, res.meta.epoch, handover_to=handover_to)
        except WitnessError as exc:
            if time.monotonic() > deadline:
                # given up for good: we stop being primary, the lease lapses on its own
                _secondary(res, f"the witness did not answer the release: {exc}")
                raise RoleError(f"the witness did not answer; {res.agent.cfg.node} gave up the primary role of "
                                f"{res.name} and its lease lapses: promote a side once the witness is back") from None
            await asyncio.sleep(TICK)


async def demote(res: Resource) -> dict:
    if res.role != Role.PRIMARY:
        return res.status()
    await _drain(res, "demoting")
    await _release(res, None)
    _secondary(res, "demoted by the operator")
    return res.status()


def _secondary(res: Resource, why: str, *, keep_clients: bool = False) -> None:
    res.draining = False
    res.lease_until = 0.0
    res.proxy = keep_clients
    res.role.set(Role.SECONDARY, why)
    res.set_io(IO.UNAVAILABLE, why)
    res.meta.unclean = False
    res.save()
    if not keep_clients:
        res.agent.nbd.drop_clients(res.name)
    res.announce()


async def swap(res: Resource) -> dict:
    """Planned role swap: drain, flush both, hand the lease to the peer, let it take the role. A checkpointed
    resource (Level 3) first ends its checkpoint stream: the VM moves live, as at Level 2, and the new primary
    checkpoints it again once its resource names the VM (``PATCH … vm``) and the guest answers there."""
    if res.role != Role.PRIMARY:
        raise RoleError(f"{res.agent.cfg.node} is not the primary of {res.name}")
    if not res.peer_replicating() or res.conn != Conn.CONNECTED or res.peer.disk != Disk.UP_TO_DATE:
        raise RoleError(f"{res.name} can swap only with both replicas connected and UpToDate "
                        f"(connection {res.conn}, peer disk {res.peer.disk if res.peer else 'unknown'})")
    checkpointer = res.checkpointer
    if checkpointer is not None:
        checkpointer.swapping = True
    try:
        return await _swap(res, checkpointer)
    finally:
        if checkpointer is not None:
            checkpointer.swapping = False


async def _swap(res: Resource, checkpointer: Checkpointer | None) -> dict:
    await _drain(res, "swap: draining")
    if checkpointer is not None:
        checkpointer.end_stream()
    flush = res.queue_op(wire.Op.FLUSH, 0, 0, b"")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(flush.done.wait(), res.agent.timeout * 4)
    if not flush.acked:
        _resume(res, "swap aborted")
        raise RoleError("the peer did not flush: swap aborted")
    if checkpointer is not None:
        checkpointer.release_for_swap()
    epoch = res.meta.epoch
    answer = await _release(res, res.agent.cfg.peer)
    if not answer.ok:
        _resume(res, "swap aborted")
        raise RoleError(f"the witness refused the hand-over: {answer.reason}")
    # the clients stay: what they send is forwarded to the new primary (Resource.forward)
    _secondary(res, "swap: role handed to the peer", keep_clients=True)
    waiter = res.agent.expect_control(res.name)
    res.agent.links.send(wire.Control(res.name, "swap-offer", epoch))
    try:
        reply = await asyncio.wait_for(waiter, 3.0)
    except TimeoutError:
        reply = wire.Control(res.name, "swap-failed", reason="the peer did not answer")
    if reply.action != "swap-done":
        log.error("%s: swap failed (%s): taking the role back", res.name, reply.reason)
        res.proxy = False
        await promote(res)
        raise RoleError(f"the peer could not take the role ({reply.reason}); {res.agent.cfg.node} is primary again")
    return res.status()


async def on_control(res: Resource, link: str, msg: wire.Control) -> None:
    if msg.action != "swap-offer":
        res.agent.control_reply(msg)
        return
    reason = ""
    if res.disk != Disk.UP_TO_DATE:
        reason = f"replica is {res.disk}"
    else:
        try:
            sent = time.monotonic()
            answer = await res.agent.witness.acquire(res.name, res.wanted_lease_s)
            if answer.ok:
                become_primary(res, answer, sent, "swap: role taken from the peer", new_gen_=False)
                sync.decide_sync(res)
            else:
                reason = answer.reason
        except WitnessError as exc:
            reason = f"witness unreachable: {exc}"
    action = "swap-failed" if reason else "swap-done"
    res.agent.links.send_on(link, wire.Control(res.name, action, res.meta.epoch, reason))
