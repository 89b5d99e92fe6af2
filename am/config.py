"""The agent's TOML configuration, checked as a whole at start: a bad file stops the agent with one sentence."""
from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec


class ConfigError(Exception):
    pass


class Address(msgspec.Struct):
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(f"{what} must be HOST:PORT, not {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Management(msgspec.Struct, forbid_unknown_fields=True):
    listen: str
    token: str = ""
    token_file: str = ""


class NBD(msgspec.Struct, forbid_unknown_fields=True):
    listen: str


class Links(msgspec.Struct, forbid_unknown_fields=True):
    a: str
    b: str


class Peer(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    a: str
    b: str


class Witness(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    token: str = ""
    token_file: str = ""


class Timers(msgspec.Struct, forbid_unknown_fields=True):
    heartbeat_ms: int = 100
    link_timeout_ms: int = 500
    witness_timeout_ms: int = 300
    verify_interval_s: int = 0  # 0: active validation only on demand (the console schedules it)


class Disk(msgspec.Struct, forbid_unknown_fields=True):
    bitmap_region_kib: int = 64
    resync_rate_mib: int = 200  # MiB/s
    resync_window: int = 16  # regions in flight during a resync


class Disks(msgspec.Struct, forbid_unknown_fields=True):
    sr_root: str = ""  # the storage repositories' images: <sr_root>/<SR uuid>/<VDI uuid>.img


class VM(msgspec.Struct, forbid_unknown_fields=True):
    on_promote: list[str] = []  # argv run after a takeover, with EAC_AM_RESOURCE and EAC_AM_VM in its environment
    on_promote_timeout_s: float = 10.0  # a command still running then is killed


class CheckpointSection(msgspec.Struct, forbid_unknown_fields=True):
    control_dir: str = ""  # Level 3: the VMs' checkpoint sources, one Unix socket each: <control_dir>/<VM uuid>.ctl
    # The witness lease a checkpointed resource asks for: shorter than the 0.8 s of the others, so that the lease
    # of a dead primary lapses within the links' timeout and the takeover waits for nothing else.
    lease_ms: int = 400


class Pairing(msgspec.Struct, forbid_unknown_fields=True):
    a: str = ""
    b: str = ""


class Network(msgspec.Struct, forbid_unknown_fields=True):
    bridge: str  # the VMs' bridge (xenbr0)
    nic: str  # its NIC (eth0)
    pairing: Pairing  # per availability link, the interface that joins the peer's bridge over that link


class NetworkConfig(msgspec.Struct):
    bridge: str
    nic: str
    pairing: dict[str, str]  # link ("a" | "b") -> interface


class Testbed(msgspec.Struct, forbid_unknown_fields=True):
    fault_injection: bool = False  # lets the management API fail a local disk (tests and demos only)


class File(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    data_dir: str
    management: Management
    nbd: NBD
    links: Links
    peer: Peer
    witness: Witness
    timers: Timers = msgspec.field(default_factory=Timers)
    disk: Disk = msgspec.field(default_factory=Disk)
    disks: Disks = msgspec.field(default_factory=Disks)
    vm: VM = msgspec.field(default_factory=VM)
    checkpoint: CheckpointSection = msgspec.field(default_factory=CheckpointSection)
    network: Network | None = None
    testbed: Testbed = msgspec.field(default_factory=Testbed)


class Config(msgspec.Struct):
    node: str
    data_dir: Path
    management: Address
    token: str
    nbd: Address
    link_addresses: dict[str, Address]
    peer: str
    peer_addresses: dict[str, Address]
    witness_url: str
    witness_token: str
    timers: Timers
    disk: Disk
    fault_injection: bool
    sr_root: Path | None = None
    on_promote: list[str] = []
    on_promote_timeout_s: float = 10.0
    network: NetworkConfig | None = None  # None: no NIC failover through the pairing
    control_dir: Path | None = None  # Level 3's checkpoint sources (None: this host checkpoints no VM)
    checkpoint_lease_s: float = 0.4


def _interface(name: str, what: str) -> str:
    # What the kernel accepts as an interface name (dev_valid_name): 1-15 bytes, no "/", ":" or white space.
    if not name:
        raise ConfigError(f"{what} must name a network interface")
    if len(name.encode()) > 15 or name in (".", "..") or any(c in name for c in "/: \t\n") or not name.isprintable():
        raise ConfigError(f"{what} {name!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")
    return name


def _network(net: Network | None) -> NetworkConfig | None:
    if net is None:
        return None
    bridge = _interface(net.bridge, "network.bridge")
    nic = _interface(net.nic, "network.nic")
    pairing = {link: _interface(dev, f"network.pairing.{link}")
               for link, dev in (("a", net.pairing.a), ("b", net.pairing.b)) if dev}
    if not pairing:
        raise ConfigError("network.pairing must name the pairing interface of link a, of link b, or of both")
    names = [bridge, nic, *pairing.values()]
    if len(set(names)) != len(names):
        raise ConfigError("network.bridge, network.nic and the pairing interfaces must be different interfaces")
    return NetworkConfig(bridge=bridge, nic=nic, pairing=pairing)


def _secret(value: str, path: str, what: str, base: Path) -> str:
    if value and path:
        raise ConfigError(f"give {what} either inline or as a file, not both")
    if path:
        try:
            value = (base / path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{what} file {path} is not UTF-8 text") from None
    if len(value) < 16:
        raise ConfigError(f"{what} must be at least 16 characters")
    return value


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        f = msgspec.convert(raw, File)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if f.node == f.peer.name:
        raise ConfigError("the peer must be another host than this node")
    if not 20 <= f.timers.heartbeat_ms * 2 <= f.timers.link_timeout_ms:
        raise ConfigError("timers.link_timeout_ms must be at least twice timers.heartbeat_ms (and heartbeats ≥ 10 ms)")
    if f.disk.bitmap_region_kib < 4 or f.disk.bitmap_region_kib & (f.disk.bitmap_region_kib - 1):
        raise ConfigError("disk.bitmap_region_kib must be a power of two of at least 4")
    if f.vm.on_promote and not all(f.vm.on_promote):
        raise ConfigError("vm.on_promote must be a list of non-empty strings (the command and its arguments)")
    if not 0 < f.vm.on_promote_timeout_s <= 300:
        raise ConfigError("vm.on_promote_timeout_s must be between 0 and 300 seconds")
    if not 200 <= f.checkpoint.lease_ms <= 800:
        raise ConfigError("checkpoint.lease_ms must be between 200 and 800 (the lease of a checkpointed resource)")
    base = path.parent
    return Config(
        node=f.node,
        data_dir=(base / f.data_dir).resolve(),
        management=Address.parse(f.management.listen, "management.listen"),
        token=_secret(f.management.token, f.management.token_file, "management token", base),
        nbd=Address.parse(f.nbd.listen, "nbd.listen"),
        link_addresses={"a": Address.parse(f.links.a, "links.a"), "b": Address.parse(f.links.b, "links.b")},
        peer=f.peer.name,
        peer_addresses={"a": Address.parse(f.peer.a, "peer.a"), "b": Address.parse(f.peer.b, "peer.b")},
        witness_url=f.witness.url.rstrip("/"),
        witness_token=_secret(f.witness.token, f.witness.token_file, "witness token", base),
        timers=f.timers,
        disk=f.disk,
        fault_injection=f.testbed.fault_injection,
        sr_root=(base / f.disks.sr_root).resolve() if f.disks.sr_root else None,
        on_promote=list(f.vm.on_promote),
        on_promote_timeout_s=f.vm.on_promote_timeout_s,
        network=_network(f.network),
        control_dir=(base / f.checkpoint.control_dir).resolve() if f.checkpoint.control_dir else None,
        checkpoint_lease_s=f.checkpoint.lease_ms / 1000,
    )
