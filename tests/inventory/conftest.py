import pytest

from tests.inventory.factories import (
    GiB,
    make_disk,
    make_host,
    make_network,
    make_nic,
    make_pbd,
    make_pif,
    make_pool,
    make_sr,
    make_vm,
)


@pytest.fixture
def demo():
    """A small pool: two hosts, shared and local storage, a network; three VMs."""
    pool = make_pool(name="Demo pool", name_label="Demo pool")
    h1 = make_host(pool, name_label="xcp-host-1", is_master=True)
    h2 = make_host(pool, name_label="xcp-host-2")
    shared = make_sr(pool, name_label="iSCSI shared storage", shared=True)
    local = make_sr(pool, name_label="Local storage", shared=False, type="ext")
    for host in (h1, h2):
        make_pbd(host, shared)
    net = make_network(pool, name_label="Pool-wide network")
    pif1 = make_pif(h1, net, device="eth0")
    make_pif(h2, net, device="eth0")
    web = make_vm(pool, host=h1, name_label="web-01", memory_static_max=8 * GiB, vcpus_max=4)
    make_disk(web, shared, userdevice="0", name_label="web-01 root", virtual_size=40 * GiB)
    make_nic(web, net)
    db = make_vm(pool, host=h2, name_label="db-01")
    make_disk(db, local, userdevice="0", name_label="db-01 data")
    stopped = make_vm(pool, name_label="build-01")
    return {"pool": pool, "h1": h1, "h2": h2, "web": web, "db": db, "stopped": stopped, "pif1": pif1,
            "shared": shared, "local": local}  # fmt: skip
