"""The NIC component of a Level 2 VM when its host's NIC has no carrier: what its AM's network pairing says
(``GET /v1/status`` ``network``, am/README.md) decides the sentence. ``components_of`` is a pure function of a
reading, so the readings here are built by hand (unsaved records, no AM, no database).
"""
from __future__ import annotations

from inventory.models import Host
from protection.health import AMView, Reading, components_of
from protection.models import Protection

HOSTA, HOSTB = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"


def _status(network: dict | None) -> dict:
    links = {link: {"state": "Up", "rtt_ms": 0.2} for link in ("a", "b")}
    return {"peer": {"state": "connected", "links": links}, "witness": {"reachable": True}, "network": network}


def _network(mode: str, paired: str | None, carrier: bool, peer_carrier: bool) -> dict:
    return {"bridge": "xenbr0", "nic": "eth0", "pairing": {"a": "pa", "b": "pb"}, "carrier": carrier,
            "peer_carrier": peer_carrier, "mode": mode, "paired": paired, "since": 0.0, "error": ""}


def _nics(reading_a: dict | None, reading_b: dict | None, *, carrier_a: bool, error_a: str = "") -> dict[str, dict]:
    a, b = Host(uuid=HOSTA, name_label="hosta", live=True), Host(uuid=HOSTB, name_label="hostb", live=True)
    nics = [{"id": f"nic:0@{h.uuid}", "device": "0", "network": "Pool-wide network", "host": h.uuid,
             "host_name": h.name_label, "pif": "eth0", "carrier": carrier, "live": True}
            for h, carrier in ((a, carrier_a), (b, True))]
    reading = Reading(protection=Protection(), disks=[], nics=nics,
                      primary=AMView(host=a, url="http://a", status=None if error_a else _status(reading_a),
                                     error=error_a),
                      secondary=AMView(host=b, url="http://b", status=_status(reading_b)))
    return {c["id"]: c for c in components_of(reading) if c["kind"] == "NIC"}


def test_a_nic_without_carrier_whose_am_borrows_the_peers_nic_says_through_which_link():
    nics = _nics(_network("borrowing", "b", False, True), _network("lending", "b", True, False), carrier_a=False)
    failed, lender = nics[f"nic:0@{HOSTA}"], nics[f"nic:0@{HOSTB}"]
    assert failed["state"] == "degraded"
    assert "no carrier" in failed["detail"] and "hostb's NIC over availability link B" in failed["detail"]
    assert "redundancy lost" in failed["detail"] and "eth0" in failed["repair"]
    assert lender["state"] == "ok" and "also carries hosta's traffic over link B" in lender["detail"]


def test_a_nic_without_carrier_and_no_pairing_says_the_vm_has_no_path_there():
    for network in (None, _network("alone", None, False, False)):
        nic = _nics(network, _network("alone", None, True, False), carrier_a=False)[f"nic:0@{HOSTA}"]
        assert nic["state"] == "degraded" and "reports no pairing" in nic["detail"]
        assert "peer host" not in nic["detail"]


def test_a_silent_am_tells_nothing_about_the_pairing():
    nic = _nics(None, _network("lending", "a", True, False), carrier_a=False,
                error_a="connection refused")[f"nic:0@{HOSTA}"]
    assert nic["state"] == "degraded" and "reports no pairing" in nic["detail"]


def test_nics_with_carrier_are_ok_and_say_nothing_of_a_pairing_that_is_not_there():
    nics = _nics(_network("alone", None, True, True), _network("alone", None, True, True), carrier_a=True)
    assert {c["state"] for c in nics.values()} == {"ok"}
    assert all(c["detail"] == "eth0: carrier up" for c in nics.values())
