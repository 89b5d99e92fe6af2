"""REST VM list (100 rows) at 10,000 VMs: p95 budget 100 ms.

Builds a throwaway Postgres database (``test_eac_bench``, dropped at the end),
fills it with bulk_create (10,000 VMs with 2 disks and 2 NICs each, plus the
hosts' dom0s and some templates the list must leave out), then times requests
through the whole Django stack (django.test.Client: middleware, token
authentication, filters, pagination, serialization) and prints p50/p95/max.

Run: .venv/bin/python benchmarks/bench_api.py [--vms 10000] [--requests 300]
     (DATABASE_URL / REDIS_URL as for the tests; the defaults are the machine's services)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from common import DATABASE_SERVER, argument_parser, django_setup, print_overall, verdict

django_setup(DATABASE_URL=f"{DATABASE_SERVER}/eac_bench")

from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.models import Group  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from eac.permissions import OPERATORS  # noqa: E402
from inventory.choices import ConnectionState, PowerState  # noqa: E402
from inventory.models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network, Pool  # noqa: E402

BUDGET_MS = 100.0
GiB = 1024**3
BATCH = 2000
POWER = [PowerState.RUNNING] * 7 + [PowerState.HALTED] * 2 + [PowerState.SUSPENDED]


def populate(vm_count: int, host_count: int) -> Pool:
    """One pool of ``host_count`` hosts and ``vm_count`` VMs (2 disks, 2 NICs each), bulk-inserted."""
    pool = Pool.objects.create(
        name="bench",
        url="https://bench.example.org",
        username="root",
        password="bench",
        uuid="pool-bench",
        ref="OpaqueRef:pool-bench",
        connection_state=ConnectionState.CONNECTED,
    )
    hosts = Host.objects.bulk_create(
        Host(
            pool=pool,
            uuid=f"host-{i}",
            ref=f"OpaqueRef:host-{i}",
            name_label=f"host-{i:04}",
            address=f"10.0.{i // 250}.{i % 250 + 1}",
            live=True,
            is_master=i == 0,
            memory_total=512 * GiB,
        )
        for i in range(host_count)
    )
    shared = SR.objects.create(pool=pool, uuid="sr-shared", ref="OpaqueRef:sr-shared", name_label="shared", shared=True)
    local = SR.objects.bulk_create(
        SR(pool=pool, uuid=f"sr-local-{h.pk}", ref=f"OpaqueRef:sr-local-{h.pk}", name_label=f"local {h.name_label}")
        for h in hosts
    )
    PBD.objects.bulk_create(
        PBD(
            pool=pool,
            host=h,
            sr=sr,
            uuid=f"pbd-{h.pk}-{sr.pk}",
            ref=f"OpaqueRef:pbd-{h.pk}-{sr.pk}",
            currently_attached=True,
        )
        for h, own in zip(hosts, local, strict=True)
        for sr in (shared, own)
    )
    networks = Network.objects.bulk_create(
        Network(pool=pool, uuid=f"net-{i}", ref=f"OpaqueRef:net-{i}", name_label=f"network {i}") for i in range(2)
    )
    PIF.objects.bulk_create(
        PIF(
            pool=pool,
            host=h,
            network=n,
            uuid=f"pif-{h.pk}-{n.pk}",
            ref=f"OpaqueRef:pif-{h.pk}-{n.pk}",
            device=f"eth{i}",
            carrier=True,
            currently_attached=True,
        )
        for h in hosts
        for i, n in enumerate(networks)
    )
    # Hidden from the default list, but in the table the query must skip.
    extra = [
        VM(
            pool=pool,
            uuid=f"dom0-{h.pk}",
            ref=f"OpaqueRef:dom0-{h.pk}",
            name_label=f"Control domain {h.name_label}",
            is_control_domain=True,
            power_state=PowerState.RUNNING,
            resident_on=h,
        )
        for h in hosts
    ] + [
        VM(pool=pool, uuid=f"tpl-{i}", ref=f"OpaqueRef:tpl-{i}", name_label=f"template {i}", is_a_template=True)
        for i in range(50)
    ]
    VM.objects.bulk_create(extra, batch_size=BATCH)
    for start in range(0, vm_count, BATCH):
        vms = VM.objects.bulk_create(
            VM(
                pool=pool,
                uuid=f"vm-{i}",
                ref=f"OpaqueRef:vm-{i}",
                name_label=f"vm-{i:05}",
                power_state=POWER[i % len(POWER)],
                memory_static_max=4 * GiB,
                vcpus_max=2,
                resident_on=hosts[i % host_count] if POWER[i % len(POWER)] == PowerState.RUNNING else None,
            )
            for i in range(start, min(start + BATCH, vm_count))
        )
        vdis = VDI.objects.bulk_create(
            VDI(
                pool=pool,
                uuid=f"vdi-{vm.uuid}-{d}",
                ref=f"OpaqueRef:vdi-{vm.uuid}-{d}",
                name_label=f"{vm.name_label} disk {d}",
                virtual_size=(20 + 80 * d) * GiB,
                sr=shared if d == 0 else local[n % host_count],
            )
            for n, vm in enumerate(vms)
            for d in range(2)
        )
        VBD.objects.bulk_create(
            VBD(
                pool=pool,
                vm=vm,
                vdi=vdis[2 * n + d],
                uuid=f"vbd-{vm.uuid}-{d}",
                ref=f"OpaqueRef:vbd-{vm.uuid}-{d}",
                userdevice=str(d),
                device=f"xvd{'ab'[d]}",
                type="Disk",
                mode="RW",
            )
            for n, vm in enumerate(vms)
            for d in range(2)
        )
        VIF.objects.bulk_create(
            VIF(
                pool=pool,
                vm=vm,
                network=networks[d],
                uuid=f"vif-{vm.uuid}-{d}",
                ref=f"OpaqueRef:vif-{vm.uuid}-{d}",
                device=str(d),
                mac=f"02:00:{n >> 8 & 255:02x}:{n & 255:02x}:{start // BATCH:02x}:{d:02x}",
            )
            for n, vm in enumerate(vms)
            for d in range(2)
        )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # fresh statistics, as autovacuum would have by now in production
    return pool


def measure(client: Client, url: str, requests: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        client.get(url)
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}: {response.content[:300]!r}")
    return times


def p95(times: list[float]) -> float:
    """Interpolated (statistics.quantiles), not common.pct's nearest rank: comparable with earlier runs."""
    return statistics.quantiles(times, n=100, method="inclusive")[94]


def main() -> int:
    parser = argument_parser(__doc__, hosts=100, vms=10_000)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per URL")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards (reused by --keepdb)")
    parser.add_argument("--keepdb", action="store_true", help="reuse a kept database instead of rebuilding it")
    args = parser.parse_args()

    setup_test_environment()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False, keepdb=args.keepdb)
    try:
        started = time.perf_counter()
        pool = Pool.objects.filter(name="bench").first() if args.keepdb else None
        pool = pool or populate(args.vms, args.hosts)
        listed = VM.objects.filter(pool=pool, is_a_template=False, is_control_domain=False, is_a_snapshot=False)
        print(
            f"database {connection.settings_dict['NAME']}: {listed.count():,} VMs listed "
            f"({VM.objects.count():,} rows with dom0s and templates), {VBD.objects.count():,} disks, "
            f"{VIF.objects.count():,} NICs, {Host.objects.count():,} hosts; "
            f"ready in {time.perf_counter() - started:.1f} s"
        )
        user = get_user_model().objects.create_user("bench-" + str(os.getpid()))
        user.groups.add(Group.objects.get(name=OPERATORS))  # a read-only role, as most API clients
        token = Token.objects.create(user=user)
        client = Client(HTTP_AUTHORIZATION=f"Token {token.key}")
        vm = listed.order_by("pk").last()
        host = Host.objects.filter(pool=pool).first()
        last_page = (listed.count() + 99) // 100
        scenarios = [
            ("VM list, first page (100 rows)", "/api/v1/vms/", True),
            (f"VM list, last page ({last_page})", f"/api/v1/vms/?page={last_page}", True),
            ("VM list, pool + power_state filter", f"/api/v1/vms/?pool={pool.pk}&power_state=running&page=20", True),
            ("VM list, name contains", "/api/v1/vms/?name=vm-0", True),
            ("VM list, by host", f"/api/v1/vms/?host={host.pk}", False),
            ("VM detail (2 disks, 2 NICs)", f"/api/v1/vms/{vm.pk}/", False),
            ("host list, first page", "/api/v1/hosts/", False),
            ("pool list (with counts)", "/api/v1/pools/", False),
        ]
        print(f"\n{args.requests} requests each after 20 warm-up, token auth, django.test.Client, wall clock")
        print(f"budget: REST VM list page (100 rows) p95 <= {BUDGET_MS:.0f} ms\n")
        ok = True
        for label, url, budgeted in scenarios:
            times = measure(client, url, args.requests)
            mark = ""
            if budgeted:
                within = p95(times) <= BUDGET_MS
                ok &= within
                mark = verdict(within)
            print(
                f"  {label:<38} p50 {statistics.median(times):6.1f} ms   p95 {p95(times):6.1f} ms   "
                f"max {max(times):6.1f} ms   {mark}"
            )
        print_overall(ok)
        return 0 if ok else 1
    finally:
        if args.keep:
            connection.close()
        else:
            connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    sys.exit(main())
