"""Each fault of the AM's data path, with a workload that records every acknowledged write."""
from __future__ import annotations

import asyncio
import json
import os
import re
import time

from tests.am.checker import Ledger, read_all, workload
from tests.am.cluster import HOSTS, connect_primary

BLOCKS = 512
SIZE = 8 << 20


def other(host: str) -> str:
    return HOSTS[1 - HOSTS.index(host)]


class Run:
    """A workload in the client loop, against whichever host is primary, until ``finish``."""

    def __init__(self, cluster, name: str, seed: int = 0) -> None:
        self.cluster, self.name = cluster, name
        self.ledger = Ledger(blocks=BLOCKS)
        self.stop = asyncio.Event()
        self.future = cluster.loop.submit(self._run(seed))

    async def _run(self, seed: int) -> None:
        await workload(self.ledger, lambda: connect_primary(self.cluster, self.name), self.stop, seed=seed)

    def acked_since(self, count: int, more: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ledger.acked < count + more:
            assert time.monotonic() < deadline, f"writes stalled at {self.ledger.acked} (wanted {count + more})"
            time.sleep(0.02)

    def finish(self) -> list[str]:
        """Stop writing, read every block from the primary, and return the checker's violations."""
        self.cluster.loop.loop.call_soon_threadsafe(self.stop.set)
        self.future.result(30)

        async def read() -> dict:
            client = await connect_primary(self.cluster, self.name)
            try:
                return await read_all(client, BLOCKS)
            finally:
                await client.close()

        return self.ledger.violations(self.cluster.loop.run(read()))


def test_primary_crash_promotes_the_secondary_with_every_acknowledged_write(healthy):
    c = healthy
    c.create_pair("crash-p", SIZE)
    run = Run(c, "crash-p")
    run.acked_since(0, 300)
    c.crash("hosta")
    c.wait("hostb", "crash-p", lambda s: s["role"] == "Primary" and s["io"] == "Running", 10, "promotion")
    acked = run.ledger.acked
    run.acked_since(acked, 300)
    assert run.finish() == []
    c.start("hosta")
    assert c.wait_in_sync("crash-p") == "hostb"
    assert c.image_digest("hosta", "crash-p") == c.image_digest("hostb", "crash-p")


def test_secondary_crash_leaves_the_primary_writing_then_resyncs_only_dirty_regions(healthy):
    c = healthy
    c.create_pair("crash-s", SIZE)
    run = Run(c, "crash-s")
    run.acked_since(0, 200)
    c.crash("hostb")
    s = c.wait("hosta", "crash-s", lambda s: s["connection"] == "StandAlone" and s["dirty_regions"] > 0, 10,
               "degraded writes")
    assert s["role"] == "Primary" and s["peer_outdated"]
    run.acked_since(run.ledger.acked, 300)
    assert run.finish() == []
    dirty = c.status("hosta", "crash-s")["dirty_regions"]
    c.start("hostb")
    c.wait_in_sync("crash-s")
    s = c.status("hosta", "crash-s")
    assert s["resync"]["total"] == dirty < SIZE // s["region_bytes"]
    assert not s["peer_outdated"]
    assert c.image_digest("hosta", "crash-s") == c.image_digest("hostb", "crash-s")


def test_one_link_cut_moves_replication_to_the_other_without_a_lost_write(healthy):
    c = healthy
    c.create_pair("link1", SIZE)
    run = Run(c, "link1")
    run.acked_since(0, 200)
    c.bed.cut_link("a")
    c.wait("hosta", "link1", lambda s: True)
    deadline = time.monotonic() + 5
    while c.call("hosta", "GET", "/v1/status")[1]["peer"]["state"] != "redundancy-lost":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.acked_since(run.ledger.acked, 300)
    s = c.status("hosta", "link1")
    assert s["connection"] == "Connected" and s["dirty_regions"] == 0, s
    c.bed.restore_link("a")
    c.bed.cut_link("b")  # and back again, with writes in flight
    run.acked_since(run.ledger.acked, 300)
    assert c.status("hosta", "link1")["dirty_regions"] == 0
    assert run.finish() == []
    c.bed.heal()
    c.wait_in_sync("link1")
    assert c.image_digest("hosta", "link1") == c.image_digest("hostb", "link1")


def test_both_links_cut_the_witness_keeps_the_primary_and_refuses_the_secondary(healthy):
    c = healthy
    c.create_pair("cut2", SIZE)
    run = Run(c, "cut2")
    run.acked_since(0, 200)
    c.bed.cut_link("a")
    c.bed.cut_link("b")
    c.wait("hosta", "cut2", lambda s: s["peer_outdated"] and s["dirty_regions"] > 0, 10, "degraded writes")
    run.acked_since(run.ledger.acked, 300)
    s = c.status("hostb", "cut2")
    assert s["role"] == "Secondary", s
    c.bed.heal()
    c.wait_in_sync("cut2")
    assert run.finish() == []
    assert c.status("hostb", "cut2")["role"] == "Secondary"
    assert c.image_digest("hosta", "cut2") == c.image_digest("hostb", "cut2")


def test_witness_cut_changes_nothing_while_the_peer_is_connected(healthy):
    c = healthy
    c.create_pair("wcut", SIZE)
    run = Run(c, "wcut")
    run.acked_since(0, 100)
    for host in HOSTS:
        c.bed.cut_witness(host)
    time.sleep(1.5)  # several lease periods: the lease lapses, mirrored writes go on
    run.acked_since(run.ledger.acked, 300)
    assert [c.status(h, "wcut")["role"] for h in HOSTS] == ["Primary", "Secondary"]
    c.bed.heal()
    assert run.finish() == []


def test_primary_cut_from_peer_and_witness_suspends_and_the_secondary_takes_over(healthy):
    c = healthy
    c.create_pair("iso", SIZE)
    run = Run(c, "iso")
    run.acked_since(0, 200)
    c.bed.cut_witness("hosta")
    c.bed.cut_link("a")
    c.bed.cut_link("b")
    c.wait("hostb", "iso", lambda s: s["role"] == "Primary", 10, "takeover by the secondary")
    s = c.wait("hosta", "iso", lambda s: s["io"] != "Running", 5, "the isolated primary to stop")
    assert s["io"] == "Suspended" or s["role"] == "Secondary", s
    c.bed.heal()
    assert c.wait_in_sync("iso") == "hostb"
    assert run.finish() == []
    assert c.image_digest("hosta", "iso") == c.image_digest("hostb", "iso")


def test_failed_local_disk_is_served_from_the_peer_then_repaired_and_resynced(healthy):
    c = healthy
    c.create_pair("dfail", SIZE)
    run = Run(c, "dfail")
    run.acked_since(0, 200)
    failed_before = run.ledger.failed
    assert c.call("hosta", "POST", "/v1/resources/dfail/fault", {"disk": "fail"})[0] == 200
    c.wait("hosta", "dfail", lambda s: s["disk"] == "Failed", 5, "the disk failure to be noticed")
    run.acked_since(run.ledger.acked, 300)
    assert run.ledger.failed == failed_before  # no error reached the client
    code, body = c.call("hosta", "POST", "/v1/resources/dfail/disk-repaired")
    assert code == 202, body
    c.wait_in_sync("dfail")
    assert run.finish() == []
    assert c.image_digest("hosta", "dfail") == c.image_digest("hostb", "dfail")
    # the peer's zero regions were zeroed here, not copied: the workload writes the first BLOCKS blocks only
    resynced = re.search(r"dfail: repaired disk resynced: (\d+) regions \((\d+) copied", c.logs())
    assert resynced and 0 < int(resynced[2]) < int(resynced[1]), resynced


def test_planned_swap_moves_the_role_and_keeps_the_clients_without_an_error(healthy):
    c = healthy
    c.create_pair("swap", SIZE)
    run = Run(c, "swap")
    run.acked_since(0, 200)
    connections = run.ledger.reconnects
    code, body = c.call("hosta", "POST", "/v1/resources/swap/swap")
    assert code == 200, body
    assert c.status("hostb", "swap")["role"] == "Primary"
    run.acked_since(run.ledger.acked, 300)  # still through hosta, forwarded to the new primary
    assert run.ledger.failed == 0 and run.ledger.reconnects == connections
    code, body = c.call("hostb", "POST", "/v1/resources/swap/swap")  # and back, with the same clients
    assert code == 200, body
    run.acked_since(run.ledger.acked, 300)
    assert run.ledger.failed == 0 and run.ledger.reconnects == connections
    assert run.finish() == []
    assert c.wait_in_sync("swap") == "hosta"
    assert c.image_digest("hosta", "swap") == c.image_digest("hostb", "swap")


def test_verify_reports_replicas_that_differ(healthy):
    c = healthy
    c.create_pair("verify", SIZE)
    code, body = c.call("hosta", "POST", "/v1/resources/verify/verify")
    assert code == 200 and body["ok"] and body["mismatches"] == [], body
    assert all(v is not None for v in body["links_rtt_ms"].values())
    with open(c.workdir / "hostb" / "verify.img", "r+b") as f:  # bit rot on the secondary
        f.seek(3 << 20)
        f.write(b"\xff" * 512)
    code, body = c.call("hosta", "POST", "/v1/resources/verify/verify")
    assert code == 200 and not body["ok"] and body["mismatches"] == [3 << 20], body


def test_restarting_the_peer_in_the_middle_of_a_resync_finishes_it_later(healthy):
    c = healthy
    c.create_pair("midsync", SIZE)
    run = Run(c, "midsync")
    run.acked_since(0, 100)
    c.crash("hostb")

    async def fill() -> None:  # every region dirty: 8 MiB to copy, half a second at the bed's 16 MiB/s
        client = await c.connect("hosta", "midsync")
        await asyncio.gather(*(client.write(at, os.urandom(65536)) for at in range(0, SIZE, 65536)))
        await client.close()

    # no more writes from the workload: a region copied stays clean, and the count below says so
    assert run.finish() == []
    c.loop.run(fill())
    c.start("hostb")
    c.wait("hosta", "midsync", lambda s: s["connection"] == "SyncSource" and s["resync"]["done"] > 0, 10,
           "the resync to be under way")
    c.crash("hostb")
    s = c.wait("hosta", "midsync", lambda s: s["connection"] == "StandAlone", 5, "the peer lost again")
    assert 0 < s["dirty_regions"] < 128, s  # what was copied is not copied again
    c.start("hostb")
    c.wait_in_sync("midsync")
    assert c.image_digest("hosta", "midsync") == c.image_digest("hostb", "midsync")


def test_split_brain_after_the_witness_lost_its_state_is_detected_and_never_merged(healthy):
    c = healthy
    c.create_pair("split", SIZE)
    run = Run(c, "split")
    run.acked_since(0, 100)
    c.bed.cut_link("a")
    c.bed.cut_link("b")
    c.wait("hosta", "split", lambda s: s["peer_outdated"] and s["dirty_regions"] > 0, 10, "degraded writes on A")
    assert run.finish() == []
    # the witness's disk is lost: it comes back knowing nothing, and hosta dies
    c.bed.kill_namespace_processes("witness")
    (c.workdir / "witness.json").unlink()
    c.crash("hosta")
    c.start_witness()
    c.wait("hostb", "split", lambda s: s["role"] == "Primary", 10, "hostb granted by the amnesic witness")

    async def write_on_b():
        client = await c.connect("hostb", "split")
        await client.write(0, b"B" * 4096)
        await client.close()

    c.loop.run(write_on_b())
    c.start("hosta")
    c.bed.heal()
    for host in HOSTS:
        c.wait(host, "split", lambda s: s["split_brain"] and s["connection"] == "SplitBrain", 10,
               "the split brain to be seen")
    assert c.status("hosta", "split")["role"] == "Secondary"
    digests = {h: c.image_digest(h, "split") for h in HOSTS}
    assert digests["hosta"] != digests["hostb"]  # nothing was copied either way
    code, body = c.call("hosta", "POST", "/v1/resources/split/discard-my-data", {"confirm": "split"})
    assert code == 202, body
    assert c.wait_in_sync("split") == "hostb"
    assert c.image_digest("hosta", "split") == c.image_digest("hostb", "split")


def test_real_nbd_clients_write_through_the_mirror(healthy):
    c = healthy
    c.create_pair("clients", 32 << 20)
    addr, port = c.nbd("hosta")
    uri = f"nbd://{addr}:{port}/clients"
    bed = c.bed

    def run(*argv: str) -> str:
        out = bed.run("client", list(argv), timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    info = json.loads(run("nbdinfo", "--json", uri))
    export = info["exports"][0]
    assert export["export-size"] == 32 << 20 and export["can_flush"] and export["can_fua"]
    run("qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 1M", "-c", "write -f -P 0xcd 1M 1M",
        "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1M 1M", "-c", "flush")
    source = c.workdir / "source.raw"
    source.write_bytes(os.urandom(4 << 20))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri)
    run("fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
        "--offset=8M", "--size=8M", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
        "--output-format=terse")
    c.wait_in_sync("clients")
    replica = (c.workdir / "hostb" / "clients.img").read_bytes()
    assert replica[:4 << 20] == source.read_bytes()
    assert c.image_digest("hosta", "clients") == c.image_digest("hostb", "clients")
