"""The AM's end-to-end fixtures: one namespace test bed with a witness and two agents per module."""
from __future__ import annotations

import os

import pytest

from tests.am.cluster import HOSTS, ClientLoop, Cluster
from tests.am.netbed import NetBed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the AM test bed needs root (network namespaces)")
    workdir = tmp_path_factory.mktemp("am")
    with NetBed() as bed:
        loop = ClientLoop(bed)
        c = Cluster(bed, workdir, loop)
        c.start_witness()
        for host in HOSTS:
            c.start(host)
        try:
            yield c
        finally:
            c.close()
            loop.close()


@pytest.fixture
def healthy(cluster):
    """The cluster as a test found it: links and witness restored, both agents running, after the test."""
    yield cluster
    cluster.bed.heal()
    for host in HOSTS:
        if not cluster.bed.pids(host):
            cluster.start(host)
    remove_all(cluster)


def remove_all(cluster) -> None:
    """Each test starts from no resources: demote every primary, then delete every replica."""
    for host in HOSTS:
        code, listed = cluster.call(host, "GET", "/v1/resources")
        for res in listed if code == 200 else []:
            if res["role"] == "Primary":
                cluster.call(host, "POST", f"/v1/resources/{res['name']}/demote")
            cluster.call(host, "DELETE", f"/v1/resources/{res['name']}")
