"""The wire protocol as xapi speaks it: XML-RPC, JSON-RPC, sessions, names and errors."""

from __future__ import annotations

import re
import xmlrpc.client

import pytest
import XenAPI

from tests.support import wait_for, xapi_login
from tests.xapisim.rpc import jsonrpc, post, xmlrpc_raw
from xapisim.datamodel import CLASSES

ALL_CLASSES = [
    "pool",
    "host",
    "host_metrics",
    "VM",
    "VM_metrics",
    "VBD",
    "VDI",
    "SR",
    "PBD",
    "VIF",
    "network",
    "PIF",
    "PIF_metrics",
    "task",
    "message",
]


def _session(sim) -> str:
    return xapi_login(sim.url)._session


def test_get_all_records_for_every_class_through_the_xenapi_package(api):
    api.VM.clone(api.VM.get_by_name_label("dev-sandbox")[0], "for-a-task")  # makes a message
    api.task.create("a task", "made by a test")
    for cls in ALL_CLASSES:
        records = getattr(api, cls).get_all_records()
        assert records, f"{cls} has no objects"
        keys = {frozenset(r) for r in records.values()}
        assert keys == {frozenset(CLASSES[cls].fields)}, f"{cls} records do not all have every field"
        ref, record = next(iter(records.items()))
        assert ref.startswith("OpaqueRef:")
        assert getattr(api, cls).get_record(ref) == record
        assert getattr(api, cls).get_by_uuid(record["uuid"]) == ref


def test_demo_pool_has_the_objects_a_console_expects(api):
    hosts = api.host.get_all_records()
    assert sorted(h["name_label"] for h in hosts.values()) == [f"xcp-host-{i}" for i in range(1, 5)]
    pool = next(iter(api.pool.get_all_records().values()))
    assert pool["name_label"] == "Demo pool"
    assert hosts[pool["master"]]["name_label"] == "xcp-host-1"
    srs = {sr["name_label"]: sr for sr in api.SR.get_all_records().values()}
    assert srs["iSCSI shared storage"]["shared"] is True
    assert srs["iSCSI shared storage"]["type"] == "lvmoiscsi"
    assert srs["Local storage xcp-host-2"]["shared"] is False
    vms = api.VM.get_all_records()
    guests = [v for v in vms.values() if not v["is_a_template"] and not v["is_control_domain"]]
    assert 20 <= len(guests) <= 30
    assert {v["power_state"] for v in guests} == {"Running", "Halted", "Suspended", "Paused"}
    assert sum(v["is_control_domain"] for v in vms.values()) == 4
    assert any(v["is_a_snapshot"] for v in vms.values())
    assert sum(v["is_a_template"] and not v["is_a_snapshot"] for v in vms.values()) >= 2
    for host_ref, host in hosts.items():
        dom0 = vms[host["control_domain"]]
        assert dom0["is_control_domain"] and dom0["resident_on"] == host_ref
    networks = {n["name_label"] for n in api.network.get_all_records().values()}
    assert networks == {"Pool-wide network associated with eth0", "Storage network eth1"}


def test_xml_answers_are_compact_with_bare_strings_and_ints(sim):
    session = _session(sim)
    status, content_type, body = xmlrpc_raw(sim.url, "host.get_all_records", session)
    assert status == 200
    assert content_type == "text/xml"
    assert not re.search(r">\s+<", body), "whitespace between tags breaks Xen Orchestra's parser"
    assert "<member><name>Status</name><value>Success</value></member>" in body
    assert re.search(r"<name>memory_overhead</name><value>\d+</value>", body), "ints must be bare values"
    assert "<name>enabled</name><value><boolean>1</boolean></value>" in body
    assert re.search(r"<dateTime\.iso8601>\d{8}T\d\d:\d\d:\d\dZ</dateTime\.iso8601>", body)
    assert "<i4>" not in body and "<int>" not in body and "<string>" not in body
    value = xmlrpc.client.loads(body)[0][0]["Value"]
    host = next(iter(value.values()))
    assert isinstance(host["memory_overhead"], str), "64-bit ints reach Python clients as strings"


def test_a_finished_async_void_call_keeps_an_empty_string_value_as_its_result(sim):
    # xapi's task.result is the XML-RPC <value> of the answer whatever the wire (taskHelper.ml:
    # Xmlrpc.to_string), and a void method answers Rpc.String "" (gen_server.ml).
    session = _session(sim)
    vm = jsonrpc(sim.url, "VM.get_by_name_label", [session, "web-01"])["result"][0]
    for method in ("Async.VM.clean_shutdown", "Async.VM.start"):
        params = (session, vm) if method.endswith("shutdown") else (session, vm, *["<boolean>0</boolean>"] * 2)
        _, _, body = xmlrpc_raw(sim.url, method, *params)
        task = xmlrpc.client.loads(body)[0][0]["Value"]
        wait_for(lambda task=task: jsonrpc(sim.url, "task.get_status", [session, task])["result"] != "pending")
        assert jsonrpc(sim.url, "task.get_status", [session, task])["result"] == "success", method
        status, _, body = xmlrpc_raw(sim.url, "task.get_result", session, task)
        assert status == 200
        assert "<member><name>Value</name><value>&lt;value&gt;&lt;/value&gt;</value></member>" in body, method
        assert jsonrpc(sim.url, "task.get_result", [session, task])["result"] == "<value></value>", method
    # The void call's own answer, by contrast, is the empty string itself on both wires.
    _, _, body = xmlrpc_raw(sim.url, "VM.hard_shutdown", session, vm)
    assert "<member><name>Value</name><value></value></member>" in body
    assert jsonrpc(sim.url, "VM.start", [session, vm, False, False])["result"] == ""


def test_login_takes_two_to_four_arguments_and_rejects_a_wrong_password(sim):
    for args in (("root", "demo"), ("root", "demo", "1.0"), ("root", "demo", "1.0", "tests")):
        answer = jsonrpc(sim.url, "session.login_with_password", list(args))
        assert answer["result"].startswith("OpaqueRef:")
    for args in (("root",), ("root", "demo", "1.0", "tests", "extra")):
        answer = jsonrpc(sim.url, "session.login_with_password", list(args))
        assert answer["error"]["message"] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
        assert answer["error"]["data"] == ["session.login_with_password", "4", str(len(args))]
    with pytest.raises(XenAPI.Failure) as failure:
        XenAPI.Session(sim.url).xenapi.login_with_password("root", "wrong")
    assert failure.value.details == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]


def test_errors_carry_xapi_codes_and_parameters(sim):
    session = _session(sim)
    vm = jsonrpc(sim.url, "VM.get_all", [session])["result"][0]
    cases = [
        ("VM.get_record", ["OpaqueRef:nope", vm], ["SESSION_INVALID", "OpaqueRef:nope"]),
        ("VM.get_record", [session, "OpaqueRef:NULL"], ["HANDLE_INVALID", "VM", "OpaqueRef:NULL"]),
        ("host.get_record", [session, vm], ["HANDLE_INVALID", "host", vm]),
        ("VM.no_such_call", [session], ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_call"]),
        ("VM.get_record", [session], ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "2", "1"]),
        ("VM.get_by_uuid", [session, "not-a-uuid"], ["UUID_INVALID", "VM", "not-a-uuid"]),
    ]
    for method, params, expected in cases:
        v1 = jsonrpc(sim.url, method, params, version="1.0")
        assert v1["result"] is None and v1["error"] == expected, method
        v2 = jsonrpc(sim.url, method, params)
        assert v2["error"] == {"code": 1, "message": expected[0], "data": expected[1:]}, method
        status, _, body = xmlrpc_raw(sim.url, method, *params)
        assert status == 200
        assert xmlrpc.client.loads(body)[0][0] == {"Status": "Failure", "ErrorDescription": expected}


def test_a_session_from_xmlrpc_works_over_jsonrpc_and_back(sim):
    session = _session(sim)
    answer = jsonrpc(sim.url, "pool.get_all", [session])
    assert answer == {"jsonrpc": "2.0", "result": [answer["result"][0]], "id": 7}
    json_session = jsonrpc(sim.url, "session.login_with_password", ["root", "demo"], version="1.0")["result"]
    _, _, body = xmlrpc_raw(sim.url, "pool.get_all", json_session)
    assert xmlrpc.client.loads(body)[0][0]["Status"] == "Success"
    jsonrpc(sim.url, "session.logout", [json_session])
    _, _, body = xmlrpc_raw(sim.url, "pool.get_all", json_session)
    assert xmlrpc.client.loads(body)[0][0]["ErrorDescription"] == ["SESSION_INVALID", json_session]


def test_jsonrpc_writes_ints_as_numbers_and_booleans_as_booleans(sim):
    session = _session(sim)
    hosts = jsonrpc(sim.url, "host.get_all_records", [session])["result"]
    host = next(iter(hosts.values()))
    assert isinstance(host["memory_overhead"], int)
    assert host["enabled"] is True
    assert re.fullmatch(r"\d{8}T\d\d:\d\d:\d\dZ", host["last_software_update"])
    v1 = jsonrpc(sim.url, "host.get_all", [session], version="1.0", rid="xyz")
    assert v1 == {"result": list(hosts), "error": None, "id": "xyz"}


def test_class_underscore_method_names_are_accepted(api, sim):
    session = _session(sim)
    assert jsonrpc(sim.url, "VM_get_all", [session])["result"] == api.VM.get_all()
    metrics = api.VM_metrics.get_all()[0]
    assert jsonrpc(sim.url, "VM_metrics_get_record", [session, metrics])["result"]["uuid"]
    assert "token" in api.event_from(["pool"], "", 0.0)  # how the Python client calls event.from


def test_xmlrpc_is_answered_on_any_path(sim):
    session = _session(sim)
    for path in ("/", "/RPC2", "/xmlrpc", "/anything/else"):
        status, content_type, body = xmlrpc_raw(sim.url, "pool.get_all", session, path=path)
        assert (status, content_type) == (200, "text/xml")
        assert xmlrpc.client.loads(body)[0][0]["Status"] == "Success", path


def test_unparsable_requests_get_xapis_http_500_and_the_server_keeps_serving(sim):
    status, content_type, body = post(sim.url, b"<methodCall><methodName>x</methodName>", "text/xml")
    assert status == 500
    assert content_type == "text/html"
    assert b"HTTP 500 internal server error" in body
    status, _, _ = post(sim.url + "/jsonrpc", b'{"jsonrpc": "2.0", "method": ', "application/json")
    assert status == 500
    status, _, _ = post(sim.url + "/jsonrpc", b'{"jsonrpc": "2.0", "method": "pool.get_all"}', "application/json")
    assert status == 500, "a call without an id is malformed for xapi"
    assert jsonrpc(sim.url, "session.login_with_password", ["root", "demo"])["result"]


def test_bad_parameter_types_get_a_failure_not_a_crash(sim):
    session = _session(sim)
    vm = jsonrpc(sim.url, "VM.get_by_name_label", [session, "dev-sandbox"])["result"][0]
    answer = jsonrpc(sim.url, "VM.set_memory_limits", [session, vm, "lots", 1, 1, 1])
    assert answer["error"]["message"] == "FIELD_TYPE_ERROR"
    answer = jsonrpc(sim.url, "VM.set_name_label", [session, vm, {"not": "a string"}])
    assert answer["error"]["message"] == "FIELD_TYPE_ERROR"


def test_system_list_methods_answers_a_bare_array(sim):
    _, _, body = xmlrpc_raw(sim.url, "system.listMethods")
    methods = xmlrpc.client.loads(body)[0][0]
    assert isinstance(methods, list)
    assert {"VM.start", "Async.VM.start", "event.from", "pool.enable_ha"} <= set(methods)


def test_int_parameters_are_accepted_as_ints_or_strings(api, sim):
    session = _session(sim)
    vm = api.VM.get_by_name_label("dev-sandbox")[0]
    gib = 1 << 30
    assert jsonrpc(sim.url, "VM.set_memory_limits", [session, vm, gib, 2 * gib, 2 * gib, 2 * gib])["result"] == ""
    api.VM.set_memory_limits(vm, str(gib), str(3 * gib), str(3 * gib), str(3 * gib))
    assert api.VM.get_memory_static_max(vm) == str(3 * gib)
    assert api.VM.get_memory_dynamic_max(vm) == str(3 * gib)


def test_setters_and_map_methods_change_records(api):
    vm = api.VM.get_by_name_label("web-01")[0]
    api.VM.set_name_label(vm, "frontend-01")
    assert api.VM.get_name_label(vm) == "frontend-01"
    assert api.VM.get_by_name_label("frontend-01") == [vm]
    api.VM.add_to_other_config(vm, "eac-level", "gold")
    assert api.VM.get_other_config(vm)["eac-level"] == "gold"
    with pytest.raises(XenAPI.Failure) as failure:
        api.VM.add_to_other_config(vm, "eac-level", "silver")
    assert failure.value.details == ["MAP_DUPLICATE_KEY", "VM", "other_config", vm, "eac-level"]
    api.VM.remove_from_other_config(vm, "eac-level")
    assert "eac-level" not in api.VM.get_other_config(vm)
    api.VM.add_tags(vm, "production")
    assert api.VM.get_tags(vm) == ["production"]
    with pytest.raises(XenAPI.Failure) as failure:
        api.VM.set_power_state(vm, "Halted")
    assert failure.value.details[0] == "MESSAGE_METHOD_UNKNOWN", "read-only fields have no setter"
