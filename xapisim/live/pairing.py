"""The live bed's network pairing: the interfaces the AMs pair their bridges with, and a NIC fault they can see.

Each host of an AM pair has, per availability link, a VXLAN interface to its peer that rides that link: ``pa`` over
``alink`` and ``pb`` over ``blink`` (local address: the host's link address; remote: the peer's), up, in no bridge.
The AM (``am/network.py``, its config's ``[network]`` section) puts one into ``xenbr0`` when a NIC fails. A VXLAN
adds 50 bytes: the links carry 1550-byte frames so that the pairing carries the guests' 1500 bytes. A cut link
(an nft table on ``alink``/``blink``) cuts the pairing that rides it too.

Each pair has its own VNIs (one per link: the kernel refuses two VXLANs of one VNI and port in a namespace).

A NIC fault (``SetNic``) drops the carrier of the host's ``eth0`` (its switch-side end is set down) as a failed
NIC or a pulled cable would, besides the nft table that silences it; the repair removes the table first, then
gives the carrier back, so that the carrier never returns before traffic passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .netns import cut_table, drop_table
from .reconcile import LINKS

if TYPE_CHECKING:
    from .bed import LiveBed

BRIDGE, NIC = "xenbr0", "eth0"
PAIRING = {"a": "pa", "b": "pb"}
VXLAN_PORT = 4789
LINK_MTU = 1550  # the guests' 1500 bytes plus VXLAN's 50
# The ifindex of each host's eth0, never that of its switch-side end. The kernel applies a veth's carrier change
# at once only when the veth's ifindex differs from its peer's (linkwatch's "urgent" events); otherwise it may wait
# up to a second (measured: the switch's port stayed disabled 0.56 s after the host's eth0 had its carrier back,
# and frames the host sent meanwhile were lost). A real NIC and its switch port come up together.
NIC_IFINDEX = 4000


def vni(bed: LiveBed, host: str, link: str) -> int:
    pair = (bed.host_index(host) - 1) // 2 + 1
    return 10 * pair + 1 + LINKS.index(link)


def host_lines(bed: LiveBed, host: str) -> list[str]:
    """``ip -batch`` lines for a host's namespace, after its links have their addresses."""
    lines = [f"link set {link}link mtu {LINK_MTU}" for link in LINKS]
    peer = bed.peers.get(host)
    if peer is None:
        return lines
    for link in LINKS:
        dev = PAIRING[link]
        lines += [
            f"link add {dev} mtu 1500 type vxlan id {vni(bed, host, link)} local {bed.link_addr(host, link)} "
            f"remote {bed.link_addr(peer, link)} dstport {VXLAN_PORT} dev {link}link",
            f"link set {dev} up",
        ]
    return lines


def switch_lines(hosts: list[str]) -> list[str]:
    """``ip -batch`` lines for a link network's namespace (``la``, ``lb``): its ports carry the larger frames."""
    return [f"link set {h} mtu {LINK_MTU}" for h in hosts]


def am_section() -> str:
    """The AM config's ``[network]`` section (am/README.md)."""
    pairing = ", ".join(f'{link} = "{dev}"' for link, dev in PAIRING.items())
    return f'[network]\nbridge = "{BRIDGE}"\nnic = "{NIC}"\npairing = {{ {pairing} }}\n'


def set_nic(bed: LiveBed, host: str, up: bool) -> None:
    h = bed.host_ns[host]
    if up:
        bed.ns.nft([h], drop_table("xapisim_nic"))
        bed.ns.ip_batch("lan", [f"link set {h} up"])
    else:
        bed.ns.ip_batch("lan", [f"link set {h} down"])
        bed.ns.nft([h], cut_table("xapisim_nic", NIC))
