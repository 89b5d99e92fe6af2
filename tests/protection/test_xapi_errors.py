"""XAPI errors told in words, with the objects named as the inventory knows them."""
import pytest

from inventory.selectors import xapi_error_describe as describe_exception
from inventory.selectors import xapi_error_sentence as explain
from inventory.xapi import XapiError, XapiUnreachable
from tests.inventory.factories import make_network, make_pool, make_sr

pytestmark = pytest.mark.django_db


def test_agility_errors_name_the_sr_and_the_network():
    pool = make_pool()
    sr = make_sr(pool, name_label="Local storage xcp-1", shared=False)
    net = make_network(pool, name_label="Backup LAN")
    assert "“Local storage xcp-1”" in explain("HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", [sr.ref], pool)
    assert "“Backup LAN”" in explain("HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED", [net.ref], pool)
    assert "does not know" in explain("HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", ["OpaqueRef:gone"], pool)


def test_a_start_refused_for_the_failover_plan_is_explained():
    code, sentence = describe_exception(XapiError("HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"))
    assert code == "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"
    assert "break the failover plan" in sentence and "host failures to tolerate" in sentence


def test_unknown_codes_still_say_what_xapi_said_and_transient_ones_are_retried():
    assert explain("SOMETHING_NEW", ["a", "b"]) == "XAPI refused the operation (SOMETHING_NEW: a, b)."
    assert XapiError("OTHER_OPERATION_IN_PROGRESS", ["VM", "x"]).transient
    assert XapiUnreachable("UNREACHABLE", [], message="down").transient
    assert not XapiError("HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", ["x"]).transient
