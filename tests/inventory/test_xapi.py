"""The XAPI client wrapper, with the real XenAPI package against a live xapisim over HTTP."""
import threading
import time
import xmlrpc.client

import pytest

from inventory.xapi import XapiAuthError, XapiError, XapiUnreachable, connect, pool_client, url_with_host
from tests.support import free_port


def test_client_calls_with_the_session_and_returns_xapi_values(xapisim):
    with connect(xapisim.url, "root", "demo") as client:
        assert client.url == xapisim.url
        pool_ref = client.call("pool.get_all")[0]
        assert client.call("pool.get_name_label", pool_ref) == "Demo pool"
        vms = client.call("VM.get_all_records")
        assert {vm["uuid"] for vm in xapisim.state()["vms"]} <= {r["uuid"] for r in vms.values()}


def test_xapi_failure_becomes_xapi_error_with_code_params_and_a_sentence(xapisim):
    with connect(xapisim.url, "root", "demo") as client, pytest.raises(XapiError) as err:
        client.call("VM.get_record", "OpaqueRef:nope")
    assert err.value.code == "HANDLE_INVALID"
    assert err.value.params == ["VM", "OpaqueRef:nope"]
    assert err.value.describe() == "The VM object OpaqueRef:nope no longer exists in the pool."


def test_wrong_password_raises_auth_error_that_never_contains_the_password(xapisim):
    with pytest.raises(XapiAuthError) as err:
        connect(xapisim.url, "root", "s3cret-wrong")
    assert err.value.describe() == "The pool refused the user name or password."
    assert "s3cret-wrong" not in repr(err.value) + str(err.value.params)


def test_connect_follows_host_is_slave_to_the_master_keeping_scheme_and_port(xapisim):
    with connect(xapisim.host_url("127.0.0.2"), "root", "demo") as client:
        assert client.url == xapisim.url
        assert client.call("pool.get_all")


def test_connect_tries_fallback_urls_when_the_first_is_unreachable(xapisim):
    dead = f"http://127.0.0.1:{free_port()}"
    with connect(dead, "root", "demo", fallback_urls=[xapisim.host_url("127.0.0.3")]) as client:
        assert client.url == xapisim.url


def test_unreachable_says_what_went_wrong():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(XapiUnreachable) as err:
        connect(url, "root", "demo")
    assert err.value.describe() == f"Nothing answers at {url} (connection refused)."

    with pytest.raises(XapiUnreachable) as err:
        connect(url, "root", "demo", fallback_urls=[f"http://127.0.0.1:{free_port()}"])
    assert err.value.describe().startswith("None of the pool's 2 addresses answered.")


def test_a_slow_master_times_out_as_unreachable(xapisim):
    xapisim.control("POST", "/sim/hosts/xcp-host-1/slow", {"delay_ms": 3000})
    with pytest.raises(XapiUnreachable) as err:  # not the answer 3 s later
        connect(xapisim.url, "root", "demo", timeout=0.5)
    assert "did not answer within 0.5 s" in err.value.describe()


def test_a_web_server_that_is_not_xapi_is_reported_as_such(xapisim):
    with pytest.raises(XapiUnreachable) as err:
        connect(xapisim.url + "/sim/state", "root", "demo")
    assert "XenServer / XCP-ng" in err.value.describe()


def test_an_expired_session_is_renewed_and_counted(xapisim):
    with connect(xapisim.url, "root", "demo") as client:
        old = client.session_ref
        # Another client ends our session, as a pool restart or an administrator would.
        xmlrpc.client.ServerProxy(xapisim.url).session.logout(old)
        assert client.call("pool.get_all")  # XenAPI logs in again
        assert client.session_ref != old and client.renewals == 1
        assert client.bulk("host.get_all_records")  # and so does the JSON-RPC path
        assert client.renewals == 1


def test_event_from_reports_an_expired_session_instead_of_renewing_it(xapisim):
    with connect(xapisim.url, "root", "demo") as client:
        token = client.event_from(["vm"], "", 0.0)["token"]
        xmlrpc.client.ServerProxy(xapisim.url).session.logout(client.session_ref)
        with pytest.raises(XapiError) as err:
            client.event_from(["vm"], token, 0.1)
        assert err.value.code == "SESSION_INVALID"


def test_bulk_reads_give_the_same_records_as_xml_rpc(xapisim):
    with connect(xapisim.url, "root", "demo") as client:
        over_json = client.bulk("VM.get_all_records")
        over_xml = client.call("VM.get_all_records")
    assert over_json.keys() == over_xml.keys()
    ref = next(iter(over_xml))
    assert over_json[ref]["uuid"] == over_xml[ref]["uuid"]
    # XML-RPC carries 64-bit ints as strings, JSON-RPC as numbers.
    assert str(over_json[ref]["memory_static_max"]) == over_xml[ref]["memory_static_max"]


def test_event_from_returns_changes_and_abort_breaks_a_blocked_call(xapisim):
    with connect(xapisim.url, "root", "demo") as client, connect(xapisim.url, "root", "demo") as other:
        token = client.event_from(["vm"], "", 0.0)["token"]
        vm = other.call("VM.get_by_name_label", xapisim.state()["vms"][0]["name"])[0]
        other.call("VM.set_name_label", vm, "renamed by the test")
        answer = client.event_from(["vm"], token, 5.0)
        assert any(e["ref"] == vm and e["snapshot"]["name_label"] == "renamed by the test" for e in answer["events"])

        errors = []

        def blocked():
            try:
                client.event_from(["vm"], answer["token"], 30.0)
            except XapiError as exc:
                errors.append(exc)

        thread = threading.Thread(target=blocked, daemon=True)
        thread.start()
        time.sleep(0.3)
        client.abort()
        thread.join(15)  # the call itself would block for 30 s
        assert not thread.is_alive()
        assert isinstance(errors[0], XapiUnreachable)


@pytest.mark.django_db(transaction=True)
def test_pool_client_tries_the_known_hosts_and_records_the_master(xapisim):
    from inventory.models import Host, Pool
    from inventory.services import pool_create

    pool = pool_create(name="demo", url=xapisim.url, username="root", password="demo")
    # The configured URL and the last known master are dead; only the hosts' addresses lead there.
    dead = f"http://127.0.0.1:{free_port()}"
    Pool.objects.filter(pk=pool.pk).update(url=dead, master_url=dead)
    pool.refresh_from_db()
    Host.objects.create(pool=pool, uuid="h2", ref="OpaqueRef:h2", address="127.0.0.2")
    with pytest.raises(XapiUnreachable):
        pool_client(pool)  # the host's address, on the dead URL's port, leads nowhere either

    Pool.objects.filter(pk=pool.pk).update(url=url_with_host(xapisim.url, "127.0.0.9"), master_url=dead)
    pool.refresh_from_db()
    with pool_client(pool) as client:
        assert client.url == xapisim.url
    pool.refresh_from_db()
    assert pool.master_url == xapisim.url


def test_url_with_host_keeps_scheme_and_port():
    assert url_with_host("https://10.0.0.1:8443", "10.0.0.7") == "https://10.0.0.7:8443"
    assert url_with_host("https://master.example.org", "10.0.0.7") == "https://10.0.0.7"
    assert url_with_host("http://10.0.0.1:80", "fd00::7") == "http://[fd00::7]:80"
