"""The command line, the address scheme, reproducible pools and a pool of a thousand hosts."""

from __future__ import annotations

import http.client
import json
import socket

import XenAPI

from tests.support import XapisimCommand, xapi_login
from xapisim.presets import host_address
from xapisim.server import Simulator


def test_cli_serves_the_demo_pool_and_exits_cleanly_on_sigterm(tmp_path):
    sim = XapisimCommand("--port", "0", "--seed", "3", "--password", "demo", log=tmp_path / "xapisim.log").start()
    try:
        assert sim.url == f"http://127.0.0.1:{sim.port}"
        session = XenAPI.Session(sim.url)
        session.xenapi.login_with_password("root", "demo")
        assert len(session.xenapi.host.get_all()) == 4
        state = sim.state()
        assert [h["address"] for h in state["hosts"]] == ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
        slave = XenAPI.Session(sim.host_url("127.0.0.3"))
        try:
            slave.xenapi.login_with_password("root", "demo")
            raise AssertionError("a slave must refuse the login")
        except XenAPI.Failure as e:
            assert e.details == ["HOST_IS_SLAVE", "127.0.0.1"]
    finally:
        assert sim.stop() == 0


def test_addresses_skip_the_network_and_broadcast_octets():
    assert [host_address("127.0.0.1", i) for i in (0, 1, 253)] == ["127.0.0.1", "127.0.0.2", "127.0.0.254"]
    assert host_address("127.0.0.1", 254) == "127.0.1.1"
    assert host_address("127.0.0.1", 999) == "127.0.3.238"
    assert host_address("127.0.0.5", 0) == "127.0.0.5"


def _identity(sim: Simulator) -> dict[str, list[tuple[str, str]]]:
    return {
        cls: sorted((ref, rec["uuid"]) for ref, rec in table.items()) for cls, table in sim.engine.store.tables.items()
    }


def test_the_same_seed_builds_the_same_pool_and_another_seed_another():
    first, second, other = Simulator(seed=5), Simulator(seed=5), Simulator(seed=6)
    for sim in (first, second, other):
        sim.build()
    assert _identity(first) == _identity(second)
    assert _identity(first)["VM"] != _identity(other)["VM"]
    names = [r["name_label"] for r in first.engine.store.tables["VM"].values()]
    assert names == [r["name_label"] for r in other.engine.store.tables["VM"].values()], "same pool, new ids"


def test_a_generated_pool_has_the_requested_size():
    sim = Simulator(hosts=20, vms=300, seed=2)
    sim.build()
    tables = sim.engine.store.tables
    assert len(tables["host"]) == 20
    guests = [v for v in tables["VM"].values() if not v["is_control_domain"] and not v["is_a_template"]]
    assert len(guests) == 300
    for host_ref, host in tables["host"].items():
        free = tables["host_metrics"][host["metrics"]]["memory_free"]
        assert free >= 0, "placement never overcommits a host"
        for vm in host["resident_VMs"]:
            assert tables["VM"][vm]["resident_on"] == host_ref
    assert {v["power_state"] for v in guests} == {"Running", "Halted", "Suspended", "Paused"}


def test_a_thousand_hosts_and_ten_thousand_vms_are_listed_in_one_answer():
    """The build and list times are benchmarks/bench_xapisim.py's figures."""
    sim = Simulator(hosts=1000, vms=10_000, port=0, listen_hosts=1, op_delay=0.0)
    sim.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=60)
        login = {"jsonrpc": "2.0", "method": "session.login_with_password", "params": ["root", "demo"], "id": 1}
        conn.request("POST", "/jsonrpc", json.dumps(login), {"Content-Type": "application/json"})
        session = json.loads(conn.getresponse().read())["result"]
        call = (
            '<?xml version="1.0"?><methodCall><methodName>VM.get_all_records</methodName>'
            f"<params><param><value>{session}</value></param></params></methodCall>"
        )
        conn.request("POST", "/", call, {"Content-Type": "text/xml"})
        body = conn.getresponse().read()
        assert body.count(b"<name>is_control_domain</name>") == 10_000 + 1000 + 1
    finally:
        sim.stop()


def test_advertise_serves_host_zero_alone_on_every_interface_under_the_given_name(make_sim):
    sim = make_sim(advertise="xapisim.example")
    try:
        session = xapi_login(f"http://127.0.0.1:{sim.port}")
        hosts = session.xenapi.host.get_all_records().values()
        master = session.xenapi.pool.get_master(session.xenapi.pool.get_all()[0])
        assert session.xenapi.host.get_address(master) == "xapisim.example"
        assert sorted(h["address"] for h in hosts)[0] == "127.0.0.2"  # the others keep theirs
        # A wildcard listener: the same port answers on an address other than 127.0.0.1.
        with socket.create_connection(("127.0.0.3", sim.port), timeout=2):
            pass
    finally:
        sim.stop()
