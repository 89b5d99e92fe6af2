"""Level 2 component health: what both AMs of a protection say, turned into components with a state each.

``protection_read`` asks the two AMs (``GET /v1/status`` and ``GET /v1/resources/{name}`` of each disk) and
the inventory (the hosts' PIF carrier on the VM's networks, hosts' liveness, where the secondary VM runs); it
writes nothing. ``components_of`` is a pure function of that reading: one component per disk replica per
host, per NIC per host, per availability link, the peer, the witness per host, each AM, and the secondary VM.
Each component is a dict (the shape ``Protection.components`` stores, see ``protection/models.py``):

    {"id": "disk:xvda@<host uuid>", "kind": "Disk replica", "name": "xvda", "host": "<uuid>",
     "host_name": "…", "state": "ok" | "degraded" | "failed" | "unknown", "detail": "<what is wrong>",
     "repair": "<what to do>", "progress": 0.42 (syncing disks only)}

An AM that does not answer is itself a component ("AM on host X unreachable", unknown), and what only it
could tell is unknown too: never an exception out of here. ``services.protection_health_record`` writes
the result (statuses, alerts, failover) in one transaction.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from django.conf import settings

from inventory.models import PIF, VIF, VM, Host

from .am_client import AMClient, AMError, Checkpoint, MalformedAnswer, checkpoint_of
from .choices import CheckpointState, ComponentState, Level
from .models import ProtectedDisk, Protection

log = logging.getLogger(__name__)

OK, DEGRADED, FAILED, UNKNOWN = (ComponentState.OK.value, ComponentState.DEGRADED.value,
                                 ComponentState.FAILED.value, ComponentState.UNKNOWN.value)


@dataclass
class AMView:
    """What one host's AM said (or why it said nothing)."""

    host: Host | None
    url: str
    status: dict | None = None
    resources: dict[str, dict | None] = field(default_factory=dict)  # resource -> GET answer, None: 404
    error: str = ""  # the AM did not answer: why, in words

    @property
    def host_name(self) -> str:
        return self.host.name_label if self.host else self.url


@dataclass
class Reading:
    """One look at a Level 2 protection: its two AMs, its disks, and the inventory facts that matter."""

    protection: Protection
    disks: list[ProtectedDisk]
    primary: AMView
    secondary: AMView
    nics: list[dict]  # {"id", "device", "network", "host", "host_name", "carrier": bool | None, "live"}
    secondary_vm_running: bool = False
    # The secondary VM as the inventory has it: None when the protection names none (not made yet);
    # {"exists": False} when XAPI has it no longer; else its "name", "power_state", "host" (pk or None).
    secondary_vm: dict | None = None
    vm_power_state: str = ""  # the protected VM's own record (not its copy's), as the inventory has it
    vm_host: int | None = None  # ... and the pk of the host it is resident on

    @property
    def ams(self) -> tuple[AMView, AMView]:
        return self.primary, self.secondary


def _read_am(host: Host | None, url: str, resources: list[str]) -> AMView:
    view = AMView(host=host, url=url)
    if not url:
        view.error = f"host {view.host_name} has no Availability Manager address (eac_am_url)"
        return view
    timeout = getattr(settings, "EAC_AM_HEALTH_TIMEOUT", 3.0)
    try:
        with AMClient(url, timeout=timeout) as am:
            view.status = am.status()
            for name in resources:
                view.resources[name] = am.resource_or_none(name)
    except AMError as exc:
        view.error = exc.sentence
    return view


@dataclass
class _Targets:
    disks: list[ProtectedDisk]
    hosts: tuple[Host | None, Host | None]  # primary, secondary
    urls: tuple[str, str]

    @property
    def names(self) -> list[str]:
        return [d.resource for d in self.disks]


def _targets(protection: Protection) -> _Targets:
    disks = list(ProtectedDisk.objects.filter(protection=protection).select_related("primary_host", "secondary_host"))
    first = disks[0] if disks else None
    primary_host = (first.primary_host if first else None) or protection.observed_host
    secondary_host = protection.secondary_host or (first.secondary_host if first else None)
    primary_url = (first.primary_am_url if first else "") or (primary_host.am_url if primary_host else "")
    secondary_url = (first.secondary_am_url if first else "") or (secondary_host.am_url if secondary_host else "")
    return _Targets(disks, (primary_host, secondary_host), (primary_url, secondary_url))


def am_urls(protection: Protection) -> tuple[str, str]:
    """The management URLs of the protection's primary and secondary AMs ("" where a host has none)."""
    return _targets(protection).urls


def am_reads(protections: list[Protection]) -> dict[str, AMView]:
    """Every AM of these protections read once (its status and the resources of all of them), side by side: a
    poll of many protections waits for a silent AM once, not once per protection that uses it."""
    wanted: dict[str, tuple[Host | None, set[str]]] = {}
    for protection in protections:
        targets = _targets(protection)
        for host, url in zip(targets.hosts, targets.urls, strict=True):
            if url:
                wanted.setdefault(url, (host, set()))[1].update(targets.names)
    if not wanted:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(wanted)), thread_name_prefix="am-read") as pool:
        futures = {url: pool.submit(_read_am, host, url, sorted(names)) for url, (host, names) in wanted.items()}
    return {url: future.result() for url, future in futures.items()}


def protection_read(protection: Protection, ams: dict[str, AMView] | None = None) -> Reading:
    """Ask both AMs of ``protection`` (or take what ``am_reads`` found) and the inventory; raises nothing (an
    AM's silence is in the reading)."""
    targets = _targets(protection)
    disks, names = targets.disks, targets.names
    primary_host, secondary_host = targets.hosts

    def view(host: Host | None, url: str) -> AMView:
        read = (ams or {}).get(url) if url else None
        if read is None:
            return _read_am(host, url, names)
        return AMView(host=host, url=url, status=read.status, error=read.error,
                      resources={n: read.resources.get(n) for n in names})

    views = (view(primary_host, targets.urls[0]), view(secondary_host, targets.urls[1]))
    nics = []
    vifs = list(VIF.objects.filter(vm=protection.vm).select_related("network").order_by("device"))
    for host in (primary_host, secondary_host):
        if host is None:
            continue
        host = Host.objects.filter(pk=host.pk).first() or host  # fresh liveness
        pifs = {p.network_id: p for p in PIF.objects.filter(host=host, network_id__in=[v.network_id for v in vifs])}
        for vif in vifs:
            pif = pifs.get(vif.network_id)
            nics.append({"id": f"nic:{vif.device}@{host.uuid}", "device": vif.device,
                         "network": vif.network.name_label if vif.network else "", "host": host.uuid,
                         "host_name": host.name_label, "pif": pif.device if pif else "",
                         "carrier": pif.carrier if pif else None, "live": host.live})
    running = False
    copy = None
    if protection.secondary_vm_uuid:
        row = (VM.objects.filter(uuid=protection.secondary_vm_uuid, pool=protection.pool)
               .values("name_label", "power_state", "resident_on_id").first())
        copy = {"exists": False} if row is None else {"exists": True, "name": row["name_label"],
                                                      "power_state": row["power_state"],
                                                      "host": row["resident_on_id"]}
        running = bool(row and secondary_host is not None and row["power_state"] == "Running"
                       and row["resident_on_id"] == secondary_host.pk)
    own = VM.objects.filter(pk=protection.vm_id).values_list("power_state", "resident_on_id").first() or ("", None)
    return Reading(protection=protection, disks=disks, primary=views[0], secondary=views[1], nics=nics,
                   secondary_vm_running=running, secondary_vm=copy, vm_power_state=own[0], vm_host=own[1])


# -- what the reading means: components ------------------------------------------------------------


def _component(cid: str, kind: str, name: str, view_or_host, state: str, detail: str = "", repair: str = "",
               **extra) -> dict:
    if isinstance(view_or_host, AMView):
        host, host_name = (view_or_host.host.uuid if view_or_host.host else ""), view_or_host.host_name
    else:
        host, host_name = view_or_host or ("", "")
    return {"id": cid, "kind": kind, "name": name, "host": host, "host_name": host_name, "state": state,
            "detail": detail, "repair": repair, **extra}


def _sync_fraction(res: dict) -> float:
    resync = res.get("resync") or {}
    total = resync.get("total") or 0
    return round(min(1.0, (resync.get("done") or 0) / total), 3) if total else 0.0


def _disk_component(disk: ProtectedDisk, view: AMView, other: AMView) -> dict:
    cid = f"disk:{disk.userdevice or disk.resource}@{view.host.uuid if view.host else view.url}"
    name = disk.userdevice or disk.resource
    where = view.host_name
    if view.error:
        return _component(cid, "Disk replica", name, view, UNKNOWN,
                          f"The state of disk {name}'s replica on {where} is unknown: its AM does not answer.",
                          f"Make the AM on {where} reachable again.")
    res = view.resources.get(disk.resource)
    if res is None:
        return _component(cid, "Disk replica", name, view, FAILED,
                          f"The AM on {where} has no replica of disk {name} ({disk.resource}).",
                          "Unprotect the VM, then protect it again to recreate the replica.")
    role, state, conn = res.get("role", "?"), res.get("disk", "?"), res.get("connection", "?")
    if res.get("split_brain") or res.get("needs_operator"):
        return _component(cid, "Disk replica", name, view, FAILED,
                          f"Disk {name} on {where} ({role}) needs an operator: both replicas took writes "
                          "(split brain).",
                          "Choose the replica to keep; make the other a copy with discard-my-data on its AM.",
                          role=role)
    if state == "UpToDate":
        if conn == "StandAlone":
            return _component(cid, "Disk replica", name, view, DEGRADED,
                              f"Disk {name} on {where} ({role}) is UpToDate but not mirrored: its peer is not "
                              "connected.", f"Bring back the peer of {where} and both availability links.",
                              role=role)
        return _component(cid, "Disk replica", name, view, OK, f"UpToDate ({role}, {conn})", role=role)
    if state == "Failed":
        return _component(cid, "Disk replica", name, view, FAILED,
                          f"Disk {name} failed on {where} ({role}): its I/O is served from the replica on "
                          f"{other.host_name}.", f"Replace the disk on {where}, then use Repair to resync it.",
                          role=role)
    if conn in ("SyncSource", "SyncTarget") or state == "Inconsistent":
        fraction = max(_sync_fraction(res), _sync_fraction(other.resources.get(disk.resource) or {}))
        return _component(cid, "Disk replica", name, view, DEGRADED,
                          f"Disk {name} on {where} is being synced from its peer: {fraction:.0%} done.",
                          "Nothing to do: redundancy returns when the resync ends.", role=role, progress=fraction)
    if state == "Outdated":
        return _component(cid, "Disk replica", name, view, DEGRADED,
                          f"Disk {name} on {where} is outdated: the peer took writes it does not have.",
                          f"Reconnect {where} with its peer: the AMs resync the changed regions.", role=role)
    return _component(cid, "Disk replica", name, view, DEGRADED, f"Disk {name} on {where} is {state} ({conn}).",
                      "Check the AMs' logs.", role=role)


def _rtt_words(rtt: float) -> str:
    """A link's round trip in words coarse enough not to change at every reading (the exact figure is the
    component's ``rtt_ms``, which is not a change worth pushing to the pages)."""
    for bound in (1, 5, 20, 100):
        if rtt < bound:
            return f"under {bound} ms"
    return f"{rtt:.0f} ms"


def components_of(reading: Reading) -> list[dict]:
    """The components of a Level 2 protection from one reading, each with a state and what to repair."""
    out: list[dict] = []
    primary, secondary = reading.ams
    pair = f"{primary.host_name} and {secondary.host_name}"
    for view in reading.ams:
        cid = f"am@{view.host.uuid if view.host else view.url}"
        if view.error:
            out.append(_component(cid, "AM", view.host_name, view, UNKNOWN,
                                  f"AM on host {view.host_name} unreachable: {view.error}",
                                  f"Check that the AM agent runs on {view.host_name} and that the console reaches "
                                  "its management address."))
        else:
            out.append(_component(cid, "AM", view.host_name, view, OK, "Answers the console."))
    answering = [v for v in reading.ams if not v.error and v.status]

    # The peer: the worst of what the answering AMs say.
    rank = {"connected": 0, "redundancy-lost": 1, "lost": 2}
    if answering:
        worst = max(answering, key=lambda v: rank.get((v.status.get("peer") or {}).get("state"), 2))
        peer_state = (worst.status.get("peer") or {}).get("state", "unknown")
        if peer_state == "connected":
            out.append(_component("peer", "Peer", pair, ("", pair), OK, "Connected on both availability links."))
        elif peer_state == "redundancy-lost":
            out.append(_component("peer", "Peer", pair, ("", pair), DEGRADED,
                                  f"{worst.host_name} reaches its peer on one availability link only.",
                                  "Repair the availability link that is down (below)."))
        else:
            out.append(_component("peer", "Peer", pair, ("", pair), FAILED,
                                  f"The AM on {worst.host_name} has lost its peer: the disks are not mirrored.",
                                  f"Bring back the other host of the pair and its AM ({pair})."))
    else:
        out.append(_component("peer", "Peer", pair, ("", pair), UNKNOWN, "Neither AM answers.",
                              f"Make the AMs on {pair} reachable again."))

    for link in ("a", "b"):
        cid, name = f"link:{link}", f"Link {link.upper()}"
        if not answering:
            out.append(_component(cid, "Availability link", name, ("", pair), UNKNOWN, "Neither AM answers."))
            continue
        down = [v.host_name for v in answering
                if str((((v.status.get("peer") or {}).get("links") or {}).get(link) or {}).get("state", "")).lower()
                != "up"]
        if down:
            out.append(_component(cid, "Availability link", name, ("", pair), DEGRADED,
                                  f"Availability link {link.upper()} between {pair} is down (seen by "
                                  f"{', '.join(down)}).",
                                  f"Check link {link.upper()}'s cable, NICs and switch ports between {pair}."))
        else:
            rtts = [((v.status["peer"].get("links") or {}).get(link) or {}).get("rtt_ms") for v in answering]
            rtt = max((r for r in rtts if r is not None), default=None)
            out.append(_component(cid, "Availability link", name, ("", pair), OK,
                                  "Up" + (f", round trip {_rtt_words(rtt)}" if rtt is not None else ""),
                                  rtt_ms=round(rtt, 3) if rtt is not None else None))

    for view in reading.ams:
        cid = f"witness@{view.host.uuid if view.host else view.url}"
        if view.error or not view.status:
            out.append(_component(cid, "Witness", view.host_name, view, UNKNOWN,
                                  f"Whether {view.host_name} reaches the witness is unknown: its AM does not answer."))
        elif (view.status.get("witness") or {}).get("reachable"):
            out.append(_component(cid, "Witness", view.host_name, view, OK, "Reachable."))
        else:
            out.append(_component(cid, "Witness", view.host_name, view, DEGRADED,
                                  f"The witness is not reachable from {view.host_name}: a failover could not be "
                                  "granted.", f"Check the network between {view.host_name} and the witness, and "
                                              "that the witness runs."))

    for disk in reading.disks:
        out.append(_disk_component(disk, primary, secondary))
        out.append(_disk_component(disk, secondary, primary))

    if reading.secondary_vm is not None:
        out.append(_secondary_vm_component(reading))
    if reading.protection.failed_over_to_id is not None:
        out.append(_standby_component(reading))

    for nic in reading.nics:
        out.append(_nic_component(nic, reading))
    if reading.protection.level == Level.SYSTEM_FT and reading.disks:
        for view in reading.ams:
            out.append(_checkpoint_component(reading, view))
    return out


# -- Level 3: checkpointing (docs/level3.md) ------------------------------------------------------------


def _figure_words(value: float | None, unit: str, bounds: tuple[float, ...]) -> str:
    """A figure in words coarse enough not to change at every reading (as ``_rtt_words``): the exact figures are
    the component's ``checkpoint``, which is not a change worth pushing to the pages."""
    if value is None:
        return "unknown"
    for bound in bounds:
        if value < bound:
            return f"under {bound:g} {unit}"
    return f"over {bounds[-1]:g} {unit}"


def _size_words(size: int | None) -> str:
    if size is None:
        return "of unknown size"
    for bound, label in ((64 * 2**10, "64 KiB"), (2**20, "1 MiB"), (16 * 2**20, "16 MiB")):
        if size < bound:
            return f"under {label}"
    return "over 16 MiB"


def checkpoint_read(reading: Reading, view: AMView) -> tuple[Checkpoint | None, str]:
    """The checkpoint that ``view``'s AM reports for the protection (its first disk's resource: the AM
    checkpoints the VM once for all its disks), or why it cannot be read: (None, sentence). (None, "") when the
    resource has no checkpoint (a Level 2 resource, or an AM without Level 3)."""
    res = view.resources.get(reading.disks[0].resource) if reading.disks else None
    try:
        return checkpoint_of(res), ""
    except MalformedAnswer as exc:
        log.warning("AM at %s: %s", view.url, exc.sentence)
        return None, exc.sentence


def _checkpoint_component(reading: Reading, view: AMView) -> dict:
    """Checkpointing as one host's AM sees it: the AM that serves the disks as primary checkpoints the VM
    (Checkpointing), its peer receives the checkpoints (Standby). Its ``checkpoint`` holds the exact figures."""
    cid = f"checkpoint@{view.host.uuid if view.host else view.url}"
    where, kind = view.host_name, "Checkpointing"
    if view.error:
        return _component(cid, kind, where, view, UNKNOWN,
                          f"The checkpointing on {where} is unknown: its AM does not answer.")
    disk = reading.disks[0]
    res = view.resources.get(disk.resource)
    if res is None:
        return _component(cid, kind, where, view, UNKNOWN,
                          f"The AM on {where} has no resource {disk.resource} to checkpoint with.")
    cp, unreadable = checkpoint_read(reading, view)
    if unreadable:
        return _component(cid, kind, where, view, UNKNOWN, f"The AM on {where} says something the console cannot "
                                                           f"read: {unreadable}", "Check the AM's version and log.")
    if cp is None:
        return _component(cid, kind, where, view, FAILED,
                          f"The AM on {where} serves disk {disk.userdevice or disk.resource} without checkpointing "
                          "(a Level 2 resource): the VM is not checkpointed.",
                          f"Update the AM on {where} to one with checkpointing, then unprotect the VM and protect it "
                          "again at Level 3.")
    primary = res.get("role") == "Primary"
    figures = cp.figures()
    why = f" {cp.why}" if cp.why else ""
    epoch = f"every {cp.epoch_ms} ms"
    if cp.state == CheckpointState.CHECKPOINTING and primary:
        return _component(
            cid, kind, where, view, OK,
            f"Checkpointing {epoch}: each checkpoint {_size_words(cp.size_bytes)}, captured in "
            f"{_figure_words(cp.capture_ms, 'ms', (1, 5, 20, 100))}, acknowledged in "
            f"{_figure_words(cp.commit_ms, 'ms', (5, 20, 100, 500))}; output held "
            f"{_figure_words(cp.output_hold_ms, 'ms', (20, 100, 500))}.", checkpoint=figures)
    if cp.state == CheckpointState.STANDBY and not primary:
        return _component(cid, kind, where, view, OK, f"Receiving the checkpoints ({epoch}).", checkpoint=figures)
    if cp.state == CheckpointState.STALLED:
        return _component(cid, kind, where, view, FAILED,
                          f"Checkpointing stalled on {where}: no checkpoint acknowledged by its peer for more than "
                          f"max(10 epochs, 1 s) while the peer is connected; the VM's network output is held.{why}",
                          f"Check the availability links between {reading.primary.host_name} and "
                          f"{reading.secondary.host_name} and the AM on the peer (its log).", checkpoint=figures)
    if cp.state == CheckpointState.UNPROTECTED:
        return _component(cid, kind, where, view, DEGRADED,
                          f"Checkpointing on {where} has no peer: the VM runs on with its output not held, and a "
                          f"failure of {where} would lose what it did since its last committed checkpoint.{why}",
                          f"Bring back the peer of {where} and both availability links.", checkpoint=figures)
    if cp.state == CheckpointState.NO_GUEST:
        return _component(cid, kind, where, view, FAILED,
                          f"The AM on {where} cannot reach the guest's checkpoint control: no checkpoint is taken."
                          f"{why}", f"Check that the VM runs on {where} and that its checkpoint control answers.",
                          checkpoint=figures)
    expected = CheckpointState.CHECKPOINTING if primary else CheckpointState.STANDBY
    return _component(cid, kind, where, view, DEGRADED,
                      f"The AM on {where} ({res.get('role', '?')}) is {CheckpointState(cp.state).label}, not "
                      f"{expected.label}.{why}", "Check the AMs' logs.", checkpoint=figures)


def primary_checkpoint(reading: Reading) -> tuple[AMView, Checkpoint] | None:
    """The AM that serves the VM's disks as primary now (the secondary's after a failover) and the checkpoint it
    reports; None when no AM answers as the primary with a readable checkpoint."""
    if not reading.disks:
        return None
    view = _primary_of(reading, reading.disks[0].resource)
    if view is None:
        return None
    cp, _ = checkpoint_read(reading, view)
    return (view, cp) if cp is not None else None


def _nic_component(nic: dict, reading: Reading) -> dict:
    """The VM's NIC on one host: the carrier of the host's PIF (the inventory), and what the host's AM does about
    it (its status's ``network``: borrowing the peer's NIC over an availability link, or lending its own)."""
    where = (nic["host"], nic["host_name"])
    name = f"{nic['device']} ({nic['network'] or 'no network'})"
    view = next((v for v in reading.ams if v.host is not None and v.host.uuid == nic["host"]), None)
    other = next((v for v in reading.ams if v is not view), None)
    pairing = ((view.status or {}).get("network") or {}) if view is not None and not view.error else {}
    link = str(pairing.get("paired") or "").upper()
    if not nic["live"]:
        return _component(nic["id"], "NIC", name, where, UNKNOWN,
                          f"Host {nic['host_name']} is not live: its NIC on {nic['network']} is unknown.")
    if nic["carrier"] is None:
        return _component(nic["id"], "NIC", name, where, FAILED,
                          f"Host {nic['host_name']} has no NIC on network {nic['network']}: the VM's "
                          f"interface {nic['device']} cannot reach it there.",
                          f"Give {nic['host_name']} a PIF on {nic['network']}.")
    if nic["carrier"]:
        lending = f"; it also carries {other.host_name}'s traffic over link {link}" if (
            pairing.get("mode") == "lending" and link and other is not None) else ""
        return _component(nic["id"], "NIC", name, where, OK, f"{nic['pif']}: carrier up{lending}")
    lost = f"NIC {nic['pif']} of host {nic['host_name']} on network {nic['network']} has no carrier"
    repair = f"Check the cable and switch port of {nic['pif']} on {nic['host_name']}."
    if pairing.get("mode") == "borrowing" and link and other is not None:
        return _component(nic["id"], "NIC", name, where, DEGRADED,
                          f"{lost}: the VM's traffic goes through the peer host {other.host_name}'s NIC over "
                          f"availability link {link} (redundancy lost: a second NIC failure would cut it off).",
                          repair)
    return _component(nic["id"], "NIC", name, where, DEGRADED,
                      f"{lost}, and its AM reports no pairing with the peer's NIC: the VM's {nic['device']} has no "
                      f"path to {nic['network']} through {nic['host_name']}.", repair)


def _secondary_vm_component(reading: Reading) -> dict:
    """The secondary VM: paused on the secondary host (its memory reserved, docs/level2.md), or running there
    after a takeover. Anything else (a crash of its host halts it) leaves a failover nothing to unpause."""
    copy, view = reading.secondary_vm, reading.secondary
    host, where = view.host, view.host_name
    cid, uuid = "secondary-vm", reading.protection.secondary_vm_uuid
    name = copy.get("name") or uuid
    if not copy.get("exists"):
        return _component(cid, "Secondary VM", uuid, view, FAILED,
                          f"The secondary VM ({uuid}) no longer exists: a failover would have no VM to start.",
                          "Unprotect the VM, then protect it again to make a new secondary VM.")
    if host is not None and not host.live:
        return _component(cid, "Secondary VM", name, view, UNKNOWN,
                          f"Host {where} is not live: its secondary VM is unknown.")
    on_host = host is not None and copy["host"] == host.pk
    if on_host and copy["power_state"] == "Paused":
        return _component(cid, "Secondary VM", name, view, OK, f"Paused on {where}: its memory is reserved.")
    if on_host and copy["power_state"] == "Running":
        return _component(cid, "Secondary VM", name, view, OK, f"Runs on {where}.")
    state = str(copy["power_state"]).lower() + ("" if on_host or copy["host"] is None else " on another host")
    return _component(cid, "Secondary VM", name, view, DEGRADED,
                      f"The secondary VM is {state}, not paused on {where}: its memory is not reserved there and "
                      "a failover would not start it.",
                      f"Start it paused on {where} (xe vm-start uuid={uuid} on={where} paused=true).")


def _standby_component(reading: Reading) -> dict:
    """After a failover the VM runs from its copy; what stands ready to take over from it is the VM's own
    record on the former primary host, paused there (its AM, now the secondary, unpauses it on a takeover)."""
    view, other = reading.primary, reading.secondary
    protection = reading.protection
    name, uuid, where = protection.vm.name_label, protection.vm.uuid, view.host_name
    on_host = view.host is not None and reading.vm_host == view.host.pk
    if view.host is not None and not view.host.live:
        return _component("standby-vm", "Standby VM", name, view, UNKNOWN,
                          f"Host {where} is not live: nothing stands ready to take over from {other.host_name}.",
                          f"Power {where} on; then start {name} paused there.")
    if on_host and reading.vm_power_state == "Paused":
        return _component("standby-vm", "Standby VM", name, view, OK,
                          f"Paused on {where}: ready to take over if {other.host_name} fails.")
    return _component("standby-vm", "Standby VM", name, view, DEGRADED,
                      f"{name} is {reading.vm_power_state.lower() or 'unknown'} on {where}: nothing stands ready to "
                      f"take over if {other.host_name} fails.",
                      f"Start it paused on {where} (xe vm-start uuid={uuid} on={where} paused=true).")


def took_over(reading: Reading) -> bool:
    """The secondary's AM serves a disk as primary (a takeover) or the secondary VM runs, while the primary's
    host is dead or its AM lost, or while the VM itself is halted (its guest crashed and was restarted from
    the copy, ``crash_restart_due``): the VM now runs on the secondary host. A planned swap, with both AMs
    answering and the VM running, is not a failover."""
    primary, secondary = reading.ams
    primary_lost = (primary.host is not None and not primary.host.live) or bool(primary.error)
    if not primary_lost:
        return reading.vm_power_state == "Halted" and reading.secondary_vm_running
    promoted = any((secondary.resources.get(d.resource) or {}).get("role") == "Primary" for d in reading.disks)
    return promoted or reading.secondary_vm_running


def crash_restart_due(reading: Reading) -> bool:
    """The protected VM is halted on a live primary host and could be restarted from its copy: the copy paused
    on the live secondary host, both AMs answering and connected, every disk's replica there UpToDate. Whether
    the halt was a crash (not its owner's shutdown) is XAPI's to say (``VM_CRASHED``): the caller asks."""
    protection = reading.protection
    primary, secondary = reading.ams
    copy = reading.secondary_vm or {}
    if (reading.vm_power_state != "Halted" or protection.failed_over_to_id is not None or not reading.disks
            or primary.error or secondary.error or primary.host is None or secondary.host is None
            or not primary.host.live or not secondary.host.live):
        return False
    if not (copy.get("exists") and copy.get("power_state") == "Paused" and copy.get("host") == secondary.host.pk):
        return False
    for disk in reading.disks:
        here, there = primary.resources.get(disk.resource) or {}, secondary.resources.get(disk.resource) or {}
        if here.get("role") != "Primary" or there.get("disk") != "UpToDate" or there.get("connection") != "Connected":
            return False
    return True


def reservation_due(reading: Reading) -> tuple[str, Host] | None:
    """The VM that should be paused to hold its memory ready for a takeover, and where, when it is halted and
    its host is back: the copy on the secondary host (halted with its host's crash), or after a failover the
    VM's own record on the former primary (the standby). None when nothing is to be started (or the AM of that
    host is silent: a takeover could not use it anyway)."""
    protection = reading.protection
    primary, secondary = reading.ams
    copy = reading.secondary_vm or {}
    if protection.failed_over_to_id is None:
        host, view, uuid = secondary.host, secondary, protection.secondary_vm_uuid
        halted = copy.get("exists") and copy.get("power_state") == "Halted"
    else:
        host, view, uuid = primary.host, primary, protection.vm.uuid
        halted = reading.vm_power_state == "Halted" and reading.secondary_vm_running
    if not halted or not uuid or host is None or not host.live or view.error:
        return None
    return uuid, host


def primary_host_dead(reading: Reading) -> bool:
    host = reading.primary.host
    return host is not None and not host.live


# -- acting on the AMs (a worker's work: tasks.level2_action) ------------------------------------------


def _primary_of(reading: Reading, resource: str) -> AMView | None:
    """The AM that serves ``resource`` as primary now (the secondary's after a failover or a swap)."""
    for view in reading.ams:
        if (view.resources.get(resource) or {}).get("role") == "Primary" and not view.error:
            return view
    return None


def protection_verify(reading: Reading) -> dict[str, dict]:
    """POST …/verify on the primary AM of each disk: {resource: the AM's answer, or {"error": sentence}}."""
    results: dict[str, dict] = {}
    for disk in reading.disks:
        view = _primary_of(reading, disk.resource)
        if view is None:
            results[disk.resource] = {"error": f"No AM answers as the primary of disk {disk.userdevice}."}
            continue
        try:
            with AMClient(view.url) as am:
                answer = am.resource_action(disk.resource, "verify") or {}
        except AMError as exc:
            results[disk.resource] = {"error": exc.sentence}
            continue
        results[disk.resource] = {"ok": bool(answer.get("ok")), "mismatches": list(answer.get("mismatches") or []),
                                  "chunks": answer.get("chunks"), "seconds": answer.get("seconds"),
                                  "host": view.host_name}
    return results


def protection_act(reading: Reading, action: str, resource: str = "") -> list[str]:
    """A repaired disk's resync (``disk-repaired`` on the AM whose replica is Failed), or a hand-over of each
    disk's role alone (``swap`` on its primary AM; the planned swap of the whole VM, which the console's swap
    action asks for, is the ``RunKind.SWAP`` workflow): what was done or refused, one sentence per disk."""
    said = []
    for disk in reading.disks:
        if resource and disk.resource != resource:
            continue
        if action == "swap":
            view = _primary_of(reading, disk.resource)
        else:
            view = next((v for v in reading.ams if (v.resources.get(disk.resource) or {}).get("disk") == "Failed"),
                        None)
        if view is None:
            said.append(f"Disk {disk.userdevice}: nothing to {action}.")
            continue
        try:
            with AMClient(view.url) as am:
                am.resource_action(disk.resource, "swap" if action == "swap" else "disk-repaired")
            said.append(f"Disk {disk.userdevice}: {action} asked of the AM on {view.host_name}.")
        except AMError as exc:
            said.append(f"Disk {disk.userdevice}: {exc.sentence}")
    return said
