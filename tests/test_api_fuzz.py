"""Bad input never gets a 500: schemathesis against a live console, on SQLite and on PostgreSQL.

Each database gets its own daphne serving ``console.asgi:application``, on a throwaway database (SQLite: a
temporary file; PostgreSQL: ``<name>_apifuzz`` beside the suite's, dropped afterwards) whose tables are made
by ``migrate --run-syncdb`` from the models, seeded with a pool, its hosts, VMs, storage and networks, a
protection, a run, a failover event, an alert and a recipient, and a superuser whose token signs every
request, so that writes (pools deleted, protections started, alerts acknowledged) are exercised too. Every
operation of /api/schema/ gets a bounded number of generated requests, valid and invalid, from a fixed seed;
each answer must not be a 500 and must be what the schema documents (status code, content type, body,
headers). Then the inputs that were 500s once are sent again. ``make fuzz`` runs the CLI, longer.

(This is schemathesis' call-and-validate loop under Hypothesis, not its pytest plugin: the plugin's
``from_fixture`` sets ``Function._nodeid``, which pytest 9.2 no longer has.)
"""
from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.config import SchemathesisConfig

# Importing it registers its hooks too: pools' URLs in bodies go nowhere, daphne's bare 400s are no failure.
from tests.api_fuzz_support import (
    DATABASES,
    FuzzServer,
    forget_queue,
    fuzz_config,
    migrate_and_seed,
    server_env,
    throwaway_database,
)

SEED = 20261201
EXAMPLES = 4  # per operation, valid and invalid (each takes ~50-150 ms: server and generation)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
# Inputs that were 500s (found by schemathesis): ids too large for the database, or not numbers at all.
ONCE_500 = [
    ("GET", "/api/v1/alerts/?pool=-2.1e202", 400),
    ("GET", "/api/v1/alerts/?pool=99999999999999999999", 400),
    ("GET", "/api/v1/audit-log/?vm=-3.57613827810238e%2B56&pool=1.5", 400),
    ("GET", "/api/v1/failover-events/?pool=1.175494351e-38&vm=-1.7976931348623157e%2B308", 400),
    ("GET", "/api/v1/protections/?vm=9223372036854775808", 400),
    ("GET", "/api/v1/workflow-runs/?vm=1.96e%2B40&pool=NaN", 400),
    ("GET", "/api/v1/vms/?pool=99999999999999999999&host=-1", 400),
    ("DELETE", "/api/v1/protections/null,null/", 404),
    ("GET", "/api/v1/vms/99999999999999999999/", 404),
    ("POST", "/api/v1/alerts/-1/acknowledge/", 404),
    ("GET", "/api/v1/pools/99999999999999999999/failover-plan/", 404),
]

pytestmark = pytest.mark.timeout(240)


@dataclass
class Target:
    database: str
    server: FuzzServer
    seeded: dict  # the token and the ids migrate_and_seed made
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.seeded['token']}"}


@pytest.fixture(scope="module")
def targets(request, tmp_path_factory):
    """A seeded server per database, both made at once, with the same token: {database: Target}."""
    started = time.monotonic()
    workdir = tmp_path_factory.mktemp("api-fuzz")
    with ExitStack() as stack, ThreadPoolExecutor(len(DATABASES)) as pool:
        token = secrets.token_hex(20)  # the same on both: one configuration serves both
        envs = {db: server_env(stack.enter_context(throwaway_database(db, workdir / db)), EAC_FUZZ_TOKEN=token)
                for db in DATABASES}
        seeded = dict(zip(DATABASES, pool.map(lambda db: migrate_and_seed(envs[db]), DATABASES), strict=True))
        servers = {db: FuzzServer(envs[db], log=workdir / db / "daphne.log") for db in DATABASES}
        for server in servers.values():
            stack.callback(server.stop)
        list(pool.map(FuzzServer.start, servers.values()))
        for env in envs.values():
            stack.callback(forget_queue, env)
        _report(request, f"schemathesis: {len(DATABASES)} databases made and seeded, servers up in "
                         f"{time.monotonic() - started:.1f} s")
        yield {db: Target(db, servers[db], seeded[db], servers[db].proc.log) for db in DATABASES}


def _report(request, line: str) -> None:
    """The figures, on the terminal even when output is captured."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


def test_api_answers_generated_requests_as_documented_never_with_a_500(request, targets):
    """Each generated request goes to both servers: the same input, on SQLite and on PostgreSQL."""
    started = time.monotonic()
    first = targets[DATABASES[0]]
    config = SchemathesisConfig.from_dict({"seed": SEED, **fuzz_config(first.seeded)})
    schema = schemathesis.openapi.from_url(f"{first.server.url}/api/schema/", config=config,
                                           headers=first.headers, timeout=20)
    operations = [result.ok() for result in schema.get_all_operations()]
    sessions = {db: requests.Session() for db in DATABASES}
    examples = 0
    seconds = dict.fromkeys(DATABASES, 0.0)  # spent in requests and checks, per database
    failures: dict[str, str] = {}

    def call(case) -> None:
        nonlocal examples
        examples += 1
        for db, target in targets.items():
            sent = time.monotonic()
            try:
                case.call_and_validate(base_url=target.server.url, session=sessions[db], headers=target.headers,
                                       checks=CHECKS, timeout=20)
            except (Exception, BaseExceptionGroup) as exc:
                raise AssertionError(f"on {db}: {exc}") from exc
            finally:
                seconds[db] += time.monotonic() - sent

    for operation in operations:
        cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                          operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        fuzz = seed(SEED)(settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
        )(given(case=cases)(call)))
        try:
            fuzz()
        except AssertionError as exc:  # a failure of one operation: the others still run
            failures[operation.label] = str(exc)[:3000]
    for db in DATABASES:
        _report(request, f"schemathesis on {db}: {len(operations)} operations, {examples} examples, "
                         f"{seconds[db]:.1f} s")
    _report(request, f"schemathesis: {time.monotonic() - started:.1f} s in all, generating the examples included")
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items()) + (
        "\n\nthe servers' logs: " + ", ".join(str(target.log) for target in targets.values())
    )

    for db, target in targets.items():
        for method, path, expected in ONCE_500:
            response = sessions[db].request(method, target.server.url + path, headers=target.headers, timeout=20)
            assert (db, method, path, response.status_code) == (db, method, path, expected)
            assert response.headers["Content-Type"] == "application/json"
            assert response.json(), "a 4xx says why"
        assert "Internal Server Error" not in target.log.read_text(errors="replace"), target.log
