"""A console server to fuzz: a throwaway database made and seeded, an Administrator's API token, daphne.

Used by tests/test_api_fuzz.py (schemathesis through its Python API, on SQLite and on PostgreSQL) and by
``make fuzz`` (the schemathesis command line, longer), as::

    python -m tests.api_fuzz_support [--database sqlite|postgresql] -- COMMAND...

which makes a throwaway database (the fuzzer deletes pools): a temporary SQLite file, or ``<name>_apifuzz`` on
the PostgreSQL server of ``DATABASE_URL`` (dropped afterwards); makes its tables, seeds it, serves it, and runs
COMMAND with ``EAC_FUZZ_URL``, ``EAC_FUZZ_TOKEN`` and ``EAC_FUZZ_CONFIG`` (a schemathesis.toml: the token and
the seeded ids to draw from) set, and this module as schemathesis' hooks (``SCHEMATHESIS_HOOKS``). The
server's log is kept in artifacts/fuzz/.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import schemathesis

from tests.browser_support import Server
from tests.support import ROOT, free_port

USERNAME = "fuzz-admin"
ARTIFACTS = ROOT / "artifacts" / "fuzz"
# Where a pool's URL in a generated body is sent: a loopback port nothing listens on.
NOWHERE = f"127.0.0.1:{free_port()}"


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    """A pool's URL in a body points at NOWHERE: the connection test is refused at once, as it is for an unknown
    host, and the fuzzer never has the console connect to the hosts it makes up."""
    if isinstance(case.body, dict) and isinstance(case.body.get("url"), str):
        try:
            parts = urlsplit(case.body["url"])
            if parts.hostname:
                case.body["url"] = urlunsplit(parts._replace(netloc=NOWHERE))
        except ValueError:  # not a URL (a bad port, brackets): the console says so itself
            pass


def refused_by_daphne(case, response) -> bool:
    """A multipart body that does not parse never reaches the console: Twisted's HTTP server, under daphne,
    answers it with a bare 400 (no body, no Content-Type) and hangs up. A refusal, but not one the schema can
    describe beside the console's own 400s (JSON)."""
    return (response.status_code == 400 and not response.content
            and not any(name.lower() == "content-type" for name in response.headers)
            and (case.media_type or "").startswith("multipart/"))


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but those of daphne's bare 400 (``refused_by_daphne``)."""
    return not refused_by_daphne(case, response)


DATABASES = ("sqlite", "postgresql")

# Values the seeding made, mixed into what schemathesis generates where a parameter names them: an id drawn
# from [1, 2**63 - 1] names nothing, so an operation would only ever answer 404 (or 400, for a filter or a body
# that needs an existing object) and never reach what it does. {parameter: (dictionary, probability)}
SEEDED_PARAMETERS = {
    "path.id": ("ids", 0.5),
    "query.pool": ("pools", 0.8),
    "query.host": ("hosts", 0.8),
    "query.vm": ("vms", 0.8),
    "body.vm": ("vms", 0.8),
    "query.heartbeat_sr": ("shared_srs", 0.5),
    "body.settings.heartbeat_sr": ("shared_srs", 0.5),
    "query.failures_to_tolerate": ("failures_to_tolerate", 0.8),
    "body.settings.failures_to_tolerate": ("failures_to_tolerate", 0.8),
    "body.failures_to_tolerate": ("failures_to_tolerate", 0.8),
}


def fuzz_config(seeded: dict) -> dict:
    """schemathesis' configuration (as in schemathesis.toml) for a database ``migrate_and_seed`` filled."""
    ids = seeded["ids"]
    dictionaries = {
        "ids": sorted({pk for pks in ids.values() for pk in pks}),
        "pools": ids["pool"], "doomed_pools": ids["doomed_pool"], "hosts": ids["host"], "vms": ids["vm"],
        "shared_srs": [seeded["shared_sr"]],
        "failures_to_tolerate": [0, 1, 2],  # the seeded pool has 3 hosts
    }
    return {
        "headers": {"Authorization": f"Token {seeded['token']}"},
        "dictionaries": {name: {"values": values} for name, values in dictionaries.items()},
        "parameters": {name: {"dictionary": dictionary, "probability": probability}
                       for name, (dictionary, probability) in SEEDED_PARAMETERS.items()},
        # Deleting a pool deletes all it holds: the one a DELETE names is the pool seeded for it, so the others
        # (which most filters and bodies name) stay for the rest of the run. The coverage phase would take the
        # schema's bounds instead (id 1 first), so the DELETE is left to the other phases.
        "operations": [{"include-method": "DELETE", "include-path": "/api/v1/pools/{id}/",
                        "parameters": {"path.id": {"dictionary": "doomed_pools", "probability": 1.0}},
                        "phases": {"coverage": {"enabled": False}}}],
    }


def toml(config: dict) -> str:
    """``fuzz_config`` as TOML: tables (or arrays of tables) of inline tables, lists, strings and numbers, which
    TOML spells as JSON does."""
    lines = []
    for name, table in config.items():
        tables, header = (table, f"[[{name}]]") if isinstance(table, list) else ([table], f"[{name}]")
        for values in tables:
            lines.append(header)
            lines += [f"{json.dumps(key)} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@contextmanager
def throwaway_database(kind: str, workdir: Path) -> Iterator[str]:
    """The URL of a database of its own: a SQLite file in ``workdir``, or ``<name>_apifuzz`` on the PostgreSQL
    server of ``DATABASE_URL`` (made afresh, dropped afterwards, whoever is still connected)."""
    if kind == "sqlite":
        workdir.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{workdir / 'fuzz.sqlite3'}"
        return
    import environ
    import psycopg
    from psycopg import sql

    db = environ.Env.db_url_config(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"))
    name = f"{db['NAME']}_apifuzz"
    server = {"host": db["HOST"] or "127.0.0.1", "port": db["PORT"] or 5432, "user": db["USER"] or "postgres",
              "password": db["PASSWORD"] or None}

    def admin(statement: str) -> None:
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as connection:
            connection.execute(sql.SQL(statement).format(sql.Identifier(name)))

    admin("DROP DATABASE IF EXISTS {} WITH (FORCE)")
    admin("CREATE DATABASE {}")
    try:
        password = f":{server['password']}" if server["password"] else ""
        yield f"postgres://{server['user']}{password}@{server['host']}:{server['port']}/{name}"
    finally:
        admin("DROP DATABASE IF EXISTS {} WITH (FORCE)")


def server_env(database_url: str, **extra: str) -> dict[str, str]:
    """A console process on ``database_url``; its tasks go to a queue of its own that no worker reads, its
    realtime events to channel groups of its own."""
    env = dict(os.environ)
    run = uuid.uuid4().hex[:12]
    env.update(
        DJANGO_SETTINGS_MODULE="eac.test_settings",
        DATABASE_URL=database_url,
        CELERY_TASK_DEFAULT_QUEUE=f"eacfuzz-{run}",
        EAC_CHANNEL_PREFIX=f"eacfuzz{run}",
        PYTHONUNBUFFERED="1",
        DJANGO_ALLOW_ASYNC_UNSAFE="",
        LOG_LEVEL="ERROR",
    )
    env.update(extra)
    return env


def forget_queue(env: dict[str, str]) -> None:
    """Drop the tasks the server enqueued (to its own queue, which no worker reads) from Redis."""
    import redis

    queue = env["CELERY_TASK_DEFAULT_QUEUE"]
    client = redis.Redis.from_url(env.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        client.delete(queue, f"_kombu.binding.{queue}")
    finally:
        client.close()


def migrate_and_seed(env: dict[str, str]) -> dict:
    """Make the tables of the (empty) database of ``env`` and fill them, in a subprocess (it need not be this
    process's database); return the Administrator's token and the ids of what was made, by kind."""
    out = subprocess.run([sys.executable, "-m", "tests.api_fuzz_support", "--seed"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"seeding failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _seed_here() -> dict:
    """Runs in the seeding subprocess, after making the tables: a superuser with a token, two pools with
    hosts, storage, networks, VMs (one template, one control domain) with disks and NICs, a protection with
    its run, a failover event, an alert, a recipient and an audit entry, so that ids in paths and filters can
    be real."""
    import django

    django.setup()
    from datetime import timedelta

    from django.apps import apps
    from django.conf import settings
    from django.core.management import call_command

    # The tables straight from the models (migrate --run-syncdb, the migrations switched off): ~3 s of CPU
    # instead of ~8 for the hundred-odd migrations, twice a run, on a machine the whole suite shares. The
    # suite's own database is built by the migrations; their one data migration (the groups) is redone below.
    settings.MIGRATION_MODULES = {app.label: None for app in apps.get_app_configs()}
    call_command("migrate", interactive=False, verbosity=0, run_syncdb=True)

    from django.contrib.auth.models import Group, Permission, User
    from django.utils import timezone
    from rest_framework.authtoken.models import Token

    from alerts.models import Alert, Recipient
    from eac.audit import audit_record
    from eac.permissions import ADMINISTRATORS, OPERATORS
    from inventory.choices import ConnectionState, PowerState
    from inventory.models import VM, Host
    from protection.models import FailoverEvent, Protection, WorkflowRun, WorkflowStep
    from tests.inventory.factories import (
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

    view_pool = Permission.objects.get(codename="view_pool", content_type__app_label="inventory")
    for group in (ADMINISTRATORS, OPERATORS):
        Group.objects.get_or_create(name=group)[0].permissions.add(view_pool)
    user = User.objects.create_superuser(USERNAME, password="pw-" + USERNAME)
    # EAC_FUZZ_TOKEN: the same key on every database a run fuzzes, so one schemathesis configuration serves all.
    token = Token.objects.create(user=user, key=os.environ.get("EAC_FUZZ_TOKEN") or Token.generate_key())
    tag = uuid.uuid4().hex[:6]
    pool = make_pool(name=f"fuzz-{tag}", ha_enabled=True, ha_host_failures_to_tolerate=1)
    hosts = [make_host(pool, is_master=i == 0) for i in range(3)]
    sr = make_sr(pool)
    network = make_network(pool)
    for host in hosts:
        make_pbd(host, sr)
        make_pif(host, network, management=True)
    vms = [make_vm(pool, host=hosts[i % 3]) for i in range(5)]
    vms.append(make_vm(pool, power_state=PowerState.HALTED))
    make_vm(pool, is_a_template=True)
    make_vm(pool, host=hosts[0], is_control_domain=True)
    for vm in vms:
        make_disk(vm, sr)
        make_nic(vm, network)
    other = make_pool(name=f"fuzz-{tag}-down", connection_state=ConnectionState.UNREACHABLE)
    make_vm(other, host=make_host(other))
    doomed = make_pool(name=f"fuzz-{tag}-doomed")  # for DELETE /api/v1/pools/{id}/ (fuzz_config)
    make_disk(make_vm(doomed, host=make_host(doomed)), make_sr(doomed))

    protection = Protection.objects.create(vm=vms[0], pool=pool, status="protected", created_by=user)
    run = WorkflowRun.objects.create(kind="protect", state="succeeded", pool=pool, vm=vms[0],
                                     vm_name=vms[0].name_label, protection=protection, created_by=user,
                                     progress=1.0, finished_at=timezone.now())
    WorkflowStep.objects.create(run=run, position=0, name="check", label="Check", state="done", progress=1.0)
    now = timezone.now()
    event = FailoverEvent.objects.create(pool=pool, vm=vms[0], vm_uuid=vms[0].uuid, vm_name=vms[0].name_label,
                                         state="restarted", from_host=hosts[1], to_host=hosts[2],
                                         detected_at=now - timedelta(seconds=40), restarted_at=now,
                                         downtime_seconds=40.0)
    alert = Alert.objects.create(condition="host_lost", object_key=f"host:{hosts[1].uuid}", pool=pool,
                                 pool_name=pool.name, host_name=hosts[1].name_label, message="Host lost")
    recipient = Recipient.objects.create(email="ops@example.org", name="Ops")
    entry = audit_record(user=user, action="protect", via="api", pool=pool, vm=vms[0], object_repr=str(vms[0]))
    kept = {"pool__in": [pool, other]}
    return {"token": token.key, "shared_sr": sr.uuid, "ids": {
        "pool": [pool.pk, other.pk], "doomed_pool": [doomed.pk],
        "host": list(Host.objects.filter(**kept).values_list("pk", flat=True)),
        "vm": list(VM.objects.filter(**kept).values_list("pk", flat=True)), "sr": [sr.pk], "network": [network.pk],
        "protection": [protection.pk], "run": [run.pk], "failover_event": [event.pk], "alert": [alert.pk],
        "recipient": [recipient.pk], "audit_entry": [entry.pk],
    }}


class FuzzServer(Server):
    """``daphne console.asgi:application`` on a free port, on the database of ``env``."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__(None, env, log=log)

    def stop(self) -> None:
        self.proc.kill()  # a throwaway server: no need to wait for daphne's graceful shutdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=DATABASES, default="sqlite", help="default: sqlite")
    parser.add_argument("--seed", action="store_true", help=argparse.SUPPRESS)  # the seeding subprocess
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="run with EAC_FUZZ_URL, EAC_FUZZ_TOKEN and EAC_FUZZ_CONFIG (a schemathesis.toml) set")
    args = parser.parse_args()
    if args.seed:
        print(json.dumps(_seed_here()))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run against the server")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server and drop the database on a kill
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / f"daphne-{args.database}.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="eac-fuzz-") as tmp, throwaway_database(args.database, Path(tmp)) as url:
        env = server_env(url)
        seeded = migrate_and_seed(env)
        config = Path(tmp) / "schemathesis.toml"
        config.write_text(toml(fuzz_config(seeded)))
        server = FuzzServer(env, log=log).start()
        try:
            done = subprocess.run(command, env=dict(os.environ, EAC_FUZZ_URL=server.url, EAC_FUZZ_TOKEN=seeded["token"],
                                                    EAC_FUZZ_CONFIG=str(config),
                                                    SCHEMATHESIS_HOOKS="tests.api_fuzz_support"))
        finally:
            server.stop()
            forget_queue(env)
    errors = log.read_text(errors="replace").count("Internal Server Error")
    print(f"The server answered {errors} request(s) with a 500; its log: {log}" if errors else f"Server log: {log}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
