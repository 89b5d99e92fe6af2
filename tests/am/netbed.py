"""A test bed of network namespaces for the Availability Manager's end-to-end tests (plain Python, root only).

Topology (every name carries the bed's prefix, ``am`` + 4 hex digits unless given, so two runs on one machine
never collide; the interfaces are created straight inside their namespaces and never appear in the root one)::

    namespace    interface            address
    hosta        <p>-lan   (LAN)      10.X.0.1/24
                 <p>-a     (link A)   10.X.1.1/24   veth pair hosta <-> hostb
                 <p>-b     (link B)   10.X.2.1/24   veth pair hosta <-> hostb
    hostb        <p>-lan / <p>-a / <p>-b  10.X.0.2 / 10.X.1.2 / 10.X.2.2
    witness      <p>-lan              10.X.0.9/24
    client       <p>-lan              10.X.0.20/24
    lan          <p>-br, a bridge (the switch) with the ports <p>-hosta, <p>-hostb, <p>-witness, <p>-client

``X`` is derived from the prefix (or given). Loopback is up everywhere. Namespace names are ``<p>-<name>``; the
methods take the short names (``"hosta"``, ``"lan"``...).

    with NetBed() as bed:
        bed.addr("hostb", "a")                       # '10.X.1.2'
        proc = bed.spawn("hosta", [...], log_path=p)  # runs inside hosta, killed at close
        bed.cut_link("a"); bed.restore_link("a")      # a silent cut: the carriers stay up
        bed.cut_witness("hosta"); bed.heal()
        bed.kill_namespace_processes("hostb")        # a host crash
        with bed.in_ns("client"):                     # this thread's sockets are the client's
            socket.create_connection((bed.addr("hosta", "lan"), 443))

Cuts are nftables tables of the ``netdev`` family bound to the device (ingress and egress hooks), so nothing is
reported to the sender (no EPERM, no ICMP, no carrier loss): a cut is only detected by silence. The namespace
primitives (spawn, crash, nft, in_ns, teardown) are ``xapisim.live.netns.Namespaces``, shared with the live bed.
"""
from __future__ import annotations

import time
import zlib

from xapisim.live.netns import NETNS_DIR, Namespaces, NetnsError, cut_table, drop_table, free_prefix, netns_names

HOSTS = ("hosta", "hostb", "witness", "client")
NAMESPACES = (*HOSTS, "lan")
NETS = ("lan", "a", "b")
LAN_OCTET = {"hosta": 1, "hostb": 2, "witness": 9, "client": 20}
LINK_SUBNET = {"a": 1, "b": 2}  # the third octet of the availability links
LINK_OCTET = {"hosta": 1, "hostb": 2}

NetBedError = NetnsError
__all__ = ["NAMESPACES", "NETNS_DIR", "NetBed", "NetBedError", "netns_names"]


class NetBed(Namespaces):
    """The namespaces, veths and bridge of one test bed; a context manager (``close`` also runs at exit).

    ``prefix``: at most 7 characters (interface names stay within 15); ``octet``: the X of 10.X.0.0/24.
    """

    def __init__(self, prefix: str | None = None, octet: int | None = None) -> None:
        super().__init__(prefix if prefix is not None else free_prefix("am"))
        self.octet = octet if octet is not None else 20 + zlib.crc32(self.prefix.encode()) % 200
        if not 0 <= self.octet <= 255:
            raise ValueError(f"octet {octet} out of range")
        self.cuts: set[tuple[str, str]] = set()  # ("link", "a"), ("witness", "hosta")
        self.setup_seconds: float | None = None
        self.teardown_seconds: float | None = None

    # -- names and addresses ------------------------------------------------------------------------

    def netns(self, ns: str) -> str:
        """The full name of namespace ``ns`` (one of NAMESPACES), as ``ip netns`` knows it."""
        if ns not in NAMESPACES:
            raise ValueError(f"unknown namespace {ns!r} (one of {', '.join(NAMESPACES)})")
        return super().netns(ns)

    def ifname(self, host: str, net: str) -> str:
        """The interface of ``host`` on ``net`` ("lan", "a" or "b"), inside that host's namespace."""
        self.addr(host, net)  # validates the pair
        return f"{self.prefix}-{net}"

    def addr(self, host: str, net: str) -> str:
        """The IPv4 address of ``host`` on ``net``: addr("hosta", "lan"), addr("hostb", "a"), addr("hosta", "b")."""
        if net == "lan":
            if host not in LAN_OCTET:
                raise ValueError(f"{host!r} is not on the lan (one of {', '.join(LAN_OCTET)})")
            return f"10.{self.octet}.0.{LAN_OCTET[host]}"
        if net in LINK_SUBNET:
            if host not in LINK_OCTET:
                raise ValueError(f"{host!r} is not on link {net} (hosta and hostb are)")
            return f"10.{self.octet}.{LINK_SUBNET[net]}.{LINK_OCTET[host]}"
        raise ValueError(f"unknown network {net!r} (one of {', '.join(NETS)})")

    def cidr(self, net: str) -> str:
        return f"10.{self.octet}.{0 if net == 'lan' else LINK_SUBNET[net]}.0/24"

    # -- creation -----------------------------------------------------------------------------------

    def __enter__(self) -> NetBed:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> NetBed:
        """Create the namespaces and links: one ``ip -batch`` in the root namespace, then one per namespace."""
        if self._created:
            return self
        started = time.monotonic()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - started
        return self

    def _create(self) -> None:
        p, n = self.prefix, self.netns
        root = [f"link add {p}-br netns {n('lan')} type bridge stp_state 0 forward_delay 0"]
        for host in HOSTS:
            root.append(f"link add {p}-lan netns {n(host)} type veth peer name {p}-{host} netns {n('lan')}")
        for link in LINK_SUBNET:
            root.append(f"link add {p}-{link} netns {n('hosta')} type veth peer name {p}-{link} netns {n('hostb')}")
        self.add_namespaces(NAMESPACES, root)

        per_ns: dict[str, list[str]] = {}
        for host in HOSTS:
            lines = ["link set lo up", f"addr add {self.addr(host, 'lan')}/24 dev {p}-lan", f"link set {p}-lan up"]
            if host in LINK_OCTET:
                for link in LINK_SUBNET:
                    lines += [f"addr add {self.addr(host, link)}/24 dev {p}-{link}", f"link set {p}-{link} up"]
            per_ns[host] = lines
        lan = ["link set lo up", f"link set {p}-br up"]
        for host in HOSTS:
            lan += [f"link set {p}-{host} master {p}-br", f"link set {p}-{host} up"]
        per_ns["lan"] = lan
        # The namespaces are independent by now: configure them in parallel.
        self.ip_batches(per_ns)

    # -- cuts ---------------------------------------------------------------------------------------

    def _check_link(self, link: str) -> None:
        if link not in LINK_SUBNET:
            raise ValueError(f"unknown link {link!r} (one of {', '.join(LINK_SUBNET)})")

    def cut_link(self, link: str) -> None:
        """Pull the cable of availability link ``link`` ("a" or "b") silently: in hosta and hostb everything
        entering or leaving that interface is dropped, while both carriers stay up."""
        self._check_link(link)
        self.nft(("hosta", "hostb"), cut_table(f"netbed_link_{link}", self.ifname("hosta", link)))
        self.cuts.add(("link", link))

    def restore_link(self, link: str) -> None:
        self._check_link(link)
        self.nft(("hosta", "hostb"), drop_table(f"netbed_link_{link}"))
        self.cuts.discard(("link", link))

    def _check_witness_host(self, host: str) -> None:
        if host not in ("hosta", "hostb", "client"):
            raise ValueError(f"cut_witness takes hosta, hostb or client, not {host!r}")

    def cut_witness(self, host: str) -> None:
        """Silently drop the traffic (IPv4 and ARP) between ``host`` and the witness, in ``host``'s namespace; the
        rest of the lan still works for it."""
        self._check_witness_host(host)
        dev, witness = self.ifname(host, "lan"), self.addr("witness", "lan")
        script = drop_table("netbed_witness") + (
            "table netdev netbed_witness {\n"
            f"  chain ingress {{ type filter hook ingress device \"{dev}\" priority 0; policy accept;\n"
            f"    ip saddr {witness} drop\n"
            f"    arp saddr ip {witness} drop\n"
            "  }\n"
            f"  chain egress {{ type filter hook egress device \"{dev}\" priority 0; policy accept;\n"
            f"    ip daddr {witness} drop\n"
            f"    arp daddr ip {witness} drop\n"
            "  }\n"
            "}\n"
        )
        self.nft((host,), script)
        self.cuts.add(("witness", host))

    def restore_witness(self, host: str) -> None:
        self._check_witness_host(host)
        self.nft((host,), drop_table("netbed_witness"))
        self.cuts.discard(("witness", host))

    def heal(self) -> None:
        """Undo every cut in place."""
        for kind, what in sorted(self.cuts):
            if kind == "link":
                self.restore_link(what)
            else:
                self.restore_witness(what)

    # -- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every spawned process and every process left in the namespaces, then delete the namespaces (which
        deletes the veths and the bridge). Idempotent; also registered with atexit."""
        started = time.monotonic()
        try:
            super().close()
        finally:
            if self.teardown_seconds is None and self._closed:
                self.teardown_seconds = time.monotonic() - started
