import pytest

from tests.inventory.factories import GiB, make_disk, make_host, make_pbd, make_pool, make_sr, make_vm


@pytest.fixture
def pool_setup():
    """Three hosts, a shared SR on all of them, a local SR on the first; HA off."""
    pool = make_pool()
    hosts = [make_host(pool, memory_free=16 * GiB) for _ in range(3)]
    shared = make_sr(pool, shared=True, name_label="iSCSI shared")
    local = make_sr(pool, shared=False, name_label="Local storage of host 1")
    for host in hosts:
        make_pbd(host, shared)
    make_pbd(hosts[0], local)
    agile = make_vm(pool, host=hosts[1], name_label="web-1", memory_static_max=4 * GiB)
    make_disk(agile, shared)
    pinned = make_vm(pool, host=hosts[0], name_label="db-local")
    make_disk(pinned, local)
    return {"pool": pool, "hosts": hosts, "shared": shared, "local": local, "agile": agile, "pinned": pinned}


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def operator_client(client, operator_user):
    client.force_login(operator_user)
    return client


@pytest.fixture(scope="module")
def console_settings() -> dict[str, str]:
    """The environment of the Level 2 console stack's processes for its health reads (the ``stack`` fixture of
    test_level2_faults.py, which other modules import); a module may override this fixture."""
    from tests.protection.test_level2_faults import HEALTH

    return HEALTH
