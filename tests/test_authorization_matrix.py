"""Who may use each route of the console: every URL and every WebSocket, asked by every kind of user.

The routes are not listed by hand. They come from the URLconf (``get_resolver()`` walked down to each
pattern; a page is asked with GET and POST, a DRF view with each method it allows) and from
``console.routing.websocket_urlpatterns``. What the answers should be comes from one table, ``ROUTES``:
for each route and method, its rule (in ``eac.permissions``' words) and the status a user the rule allows
gets. A route or a method missing from the table fails, and so does an entry the URLconf no longer has:
a new URL cannot ship before someone decides who may use it. The Django admin's own routes share one rule
(staff only, which no console role gives); its login and logout pages are listed on their own.

A user the rule refuses gets, on a page, the login page (anonymous) or a 403; on the API a 401
(anonymous: the token scheme asks for credentials) or a 403; in the admin, its login page; on a socket,
a refused handshake. Each role's request runs in a savepoint rolled back after it, so every role (and
every route) meets the same objects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import pytest
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from channels.testing import WebsocketCommunicator
from django.apps import apps
from django.conf import settings
from django.contrib import admin
from django.contrib.admin.utils import quote
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.test import Client, RequestFactory
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from django.utils import timezone
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)
from rest_framework.authtoken.models import Token
from rest_framework.views import APIView

from alerts.models import Alert, Delivery, Recipient
from console.asgi import application
from console.routing import websocket_urlpatterns
from eac.audit import audit_record
from eac.permissions import ADMINISTRATORS, OPERATORS
from protection.models import FailoverEvent, Protection, WorkflowRun, WorkflowStep
from tests.channels_support import ORIGIN, run, session_cookie
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
from tests.roles import role_user

# -- who asks --------------------------------------------------------------------------------------------

ANONYMOUS, NO_ROLE, VIEWER, OPERATOR, ADMINISTRATOR, SUPERUSER = (
    "anonymous", "no role", "viewer", "operator", "administrator", "superuser",
)
ROLES = (ANONYMOUS, NO_ROLE, VIEWER, OPERATOR, ADMINISTRATOR, SUPERUSER)


@dataclass(frozen=True)
class Rule:
    name: str
    allowed: frozenset[str]

    def __repr__(self) -> str:
        return self.name


PUBLIC = Rule("public", frozenset(ROLES))
SIGNED_IN = Rule("signed in", frozenset(ROLES) - {ANONYMOUS})
INVENTORY_READ = Rule("inventory read", frozenset({VIEWER, OPERATOR, ADMINISTRATOR, SUPERUSER}))
PROTECTION_READ = Rule("protection read", frozenset({OPERATOR, ADMINISTRATOR, SUPERUSER}))  # alerts, audit too
ACKNOWLEDGE = Rule("alert acknowledge", frozenset({OPERATOR, ADMINISTRATOR, SUPERUSER}))
ADMIN_WRITE = Rule("admin write", frozenset({ADMINISTRATOR, SUPERUSER}))
DJANGO_ADMIN = Rule("django admin", frozenset({SUPERUSER}))  # staff; the console's groups are not staff
NOT_ALLOWED = Rule("method not allowed", frozenset())  # a page's method the table leaves out (below)
ANY = None  # an allowed status the table does not pin (the admin's): anything but a refusal or a 5xx


@dataclass(frozen=True)
class Route:
    methods: dict[str, tuple[Rule, int | tuple[int, ...] | None]]
    params: dict[str, str]  # URL parameter -> a format string over the objects of ``world``
    query: str = ""


def on(*, query: str = "", **spec) -> Route:
    """``on(GET=(RULE, status), uuid="{vm.uuid}", query="vm={vm.uuid}")``: methods in capitals, then the URL's
    parameters, filled from the objects ``world`` makes."""
    methods = {key: value for key, value in spec.items() if key.isupper()}
    params = {key: value for key, value in spec.items() if not key.isupper()}
    return Route(methods, params, query)


# -- the table ---------------------------------------------------------------------------------------------

READ_API = {"GET": (INVENTORY_READ, 200), "OPTIONS": (INVENTORY_READ, 200)}
PROTECTION_API = {"GET": (PROTECTION_READ, 200), "OPTIONS": (PROTECTION_READ, 200)}

ROUTES: dict[str, Route] = {
    # sign in and out
    "login/": on(GET=(PUBLIC, 200), POST=(PUBLIC, 200)),
    "logout/": on(POST=(PUBLIC, 302)),
    # the console's pages
    "": on(GET=(SIGNED_IN, 200)),  # a user with no role sees "No access to any pool"
    "vms/": on(GET=(INVENTORY_READ, 200)),
    "vms/<uuid>/": on(GET=(INVENTORY_READ, 200), uuid="{vm.uuid}"),
    "vms/<uuid>/power/": on(POST=(ADMIN_WRITE, 400), uuid="{vm.uuid}"),  # no action given: 400
    "hosts/<uuid>/": on(GET=(INVENTORY_READ, 200), uuid="{host.uuid}"),
    "pools/<pk>/": on(GET=(INVENTORY_READ, 200), pk="{pool.pk}"),
    "tree/<key>/": on(GET=(INVENTORY_READ, 200), key="host-{host.uuid}"),
    # protection's pages
    "protection/": on(GET=(PROTECTION_READ, 200)),
    "protection/protect/": on(GET=(PROTECTION_READ, 200), POST=(ADMIN_WRITE, 404),  # POST names no VM: 404
                              query="vm={vm.uuid}"),
    "protection/runs/": on(GET=(PROTECTION_READ, 200)),
    "protection/runs/<pk>/": on(GET=(PROTECTION_READ, 302), pk="{run.pk}"),
    "protection/<pk>/unprotect/": on(POST=(ADMIN_WRITE, 302), pk="{protection.pk}"),
    # Level 2 actions of the VM page: refused in a message (the world's protection is Level 1), then back.
    "protection/<pk>/level2/<action>/": on(POST=(ADMIN_WRITE, 302), pk="{protection.pk}", action="validate"),
    "protection/pools/<pk>/plan/": on(GET=(PROTECTION_READ, 200), POST=(ADMIN_WRITE, 400), pk="{pool.pk}"),
    "protection/failover-events/": on(GET=(PROTECTION_READ, 200)),
    "protection/audit/": on(GET=(PROTECTION_READ, 200)),
    # alerts' pages
    "alerts/": on(GET=(PROTECTION_READ, 200)),
    "alerts/<pk>/acknowledge/": on(POST=(ACKNOWLEDGE, 302), pk="{alert.pk}"),
    "alerts/recipients/": on(GET=(PROTECTION_READ, 200), POST=(ADMIN_WRITE, 400)),
    # the REST API, its schema and its docs
    "api/v1/": on(GET=(INVENTORY_READ, 200), OPTIONS=(INVENTORY_READ, 200)),
    "api/schema/": on(GET=(INVENTORY_READ, 200), OPTIONS=(INVENTORY_READ, 200)),
    "api/docs/": on(GET=(INVENTORY_READ, 200)),  # an HTML page: GET only
    "api/v1/pools/": on(**READ_API, POST=(ADMIN_WRITE, 400)),
    "api/v1/pools/<pk>/": on(**READ_API, PUT=(ADMIN_WRITE, 400), PATCH=(ADMIN_WRITE, 200),
                             DELETE=(ADMIN_WRITE, 202), pk="{pool.pk}"),
    "api/v1/hosts/": on(**READ_API),
    "api/v1/hosts/<pk>/": on(**READ_API, pk="{host.pk}"),
    "api/v1/vms/": on(**READ_API),
    "api/v1/vms/<pk>/": on(**READ_API, pk="{vm.pk}"),
    "api/v1/vms/<pk>/power/": on(POST=(ADMIN_WRITE, 400), OPTIONS=(INVENTORY_READ, 200), pk="{vm.pk}"),
    "api/v1/srs/": on(**READ_API),
    "api/v1/srs/<pk>/": on(**READ_API, pk="{sr.pk}"),
    "api/v1/networks/": on(**READ_API),
    "api/v1/networks/<pk>/": on(**READ_API, pk="{network.pk}"),
    "api/v1/pools/<pk>/failover-plan/": on(**PROTECTION_API, PUT=(ADMIN_WRITE, 400), pk="{pool.pk}"),
    "api/v1/protections/": on(**PROTECTION_API, POST=(ADMIN_WRITE, 400)),
    "api/v1/protections/preflight/": on(**PROTECTION_API, query="vm={vm.pk}&level=1"),
    "api/v1/protections/<pk>/": on(**PROTECTION_API, DELETE=(ADMIN_WRITE, 202), pk="{protection.pk}"),
    # Level 2 actions: the world's protection is Level 1, so an Administrator gets the 400 sentence.
    **{f"api/v1/protections/<pk>/{verb}/": on(POST=(ADMIN_WRITE, 400), OPTIONS=(PROTECTION_READ, 200),
                                              pk="{protection.pk}") for verb in ("validate", "swap", "repair")},
    "api/v1/workflow-runs/": on(**PROTECTION_API),
    "api/v1/workflow-runs/<pk>/": on(**PROTECTION_API, pk="{run.pk}"),
    "api/v1/failover-events/": on(**PROTECTION_API),
    "api/v1/failover-events/<pk>/": on(**PROTECTION_API, pk="{failover_event.pk}"),
    "api/v1/audit-log/": on(**PROTECTION_API),
    "api/v1/audit-log/<pk>/": on(**PROTECTION_API, pk="{audit_entry.pk}"),
    "api/v1/alerts/": on(**PROTECTION_API),
    "api/v1/alerts/<pk>/": on(**PROTECTION_API, pk="{alert.pk}"),
    "api/v1/alerts/<pk>/acknowledge/": on(POST=(ACKNOWLEDGE, 200), OPTIONS=(ACKNOWLEDGE, 200), pk="{alert.pk}"),
    "api/v1/alerts/test/": on(POST=(ADMIN_WRITE, 202), OPTIONS=(PROTECTION_READ, 200)),
    "api/v1/alert-recipients/": on(**PROTECTION_API, POST=(ADMIN_WRITE, 400)),
    "api/v1/alert-recipients/<pk>/": on(**PROTECTION_API, PUT=(ADMIN_WRITE, 400), PATCH=(ADMIN_WRITE, 200),
                                        DELETE=(ADMIN_WRITE, 204), pk="{recipient.pk}"),
    # the Django admin's doors (its other routes: DJANGO_ADMIN, below)
    "admin/login/": on(GET=(PUBLIC, (200, 302)), POST=(PUBLIC, 200)),  # a signed-in superuser is sent on
    "admin/logout/": on(POST=(PUBLIC, (200, 302))),  # non-staff are sent to the admin's index
    # No ModelAdmin of the console has autocomplete fields: a query naming none is refused, even to staff.
    "admin/autocomplete/": on(GET=(DJANGO_ADMIN, 403)),
}
WEBSOCKETS: dict[str, Rule] = {
    "ws/live/": INVENTORY_READ,
    "ws/protection/": PROTECTION_READ,
}
FORMAT = "json"  # DRF's format suffix routes (pools.json) follow the rule of the route they suffix


# -- the routes the URLconf has ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    route: str  # readable: "api/v1/pools/<pk>/", "vms/<uuid>/"
    raw: str  # as the resolver joins it (ResolverMatch.route): resolving the URL built must give it back
    kind: str  # page, api or admin
    methods: tuple[str, ...]


def _readable(pattern) -> str:
    text = str(pattern)
    text = re.sub(r"<drf_format_suffix[\w]*:format>", ".<format>", text)
    text = re.sub(r"<(?:\w+:)?(\w+)>", r"<\1>", text)  # <str:uuid> -> <uuid>
    text = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"<\1>", text)  # (?P<pk>[^/.]+) -> <pk>
    return text.removeprefix("^").removesuffix("$").removesuffix("/?").replace("\\.", ".")


def _methods(kind: str, callback) -> tuple[str, ...]:
    if kind != "api":
        return ("GET", "POST")
    if getattr(callback, "actions", None):  # a DRF viewset route: the methods it maps, and OPTIONS
        return (*(method.upper() for method in callback.actions), "OPTIONS")
    view = callback.cls
    names = getattr(callback, "initkwargs", {}).get("http_method_names", view.http_method_names)
    return tuple(m.upper() for m in names if m != "head" and hasattr(view, m))


def _walk(resolver, prefix: str = "", raw: str = ""):
    for pattern in resolver.url_patterns:
        here = prefix + _readable(pattern.pattern)
        joined = URLResolver._join_route(raw, str(pattern.pattern))
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern, here, joined)
        elif isinstance(pattern, URLPattern):
            view = getattr(pattern.callback, "cls", None)
            kind = "admin" if here.startswith("admin/") else "api" if view and issubclass(view, APIView) else "page"
            yield Found(here, joined, kind, _methods(kind, pattern.callback))


FOUND = list(_walk(get_resolver()))


def _base(route: str) -> str:
    """The route a format-suffix route suffixes: api/v1/pools.<format> -> api/v1/pools/."""
    return re.sub(r"/?\.<format>$", "/", route)


def rule_of(found: Found) -> Route | None:
    route = ROUTES.get(_base(found.route))
    if route is None and found.kind == "admin":
        route = on(GET=(DJANGO_ADMIN, ANY), POST=(DJANGO_ADMIN, ANY))
    return route


def admin_status(found: Found, method: str, superuser) -> int | None:
    """What the admin answers staff on a model's route: 403 where its ModelAdmin forbids the action (the
    mirrored inventory and the audit log are read-only, Axes' logs are written by Axes), else not pinned."""
    parts = found.route.split("/")  # admin/<app>/<model>/[<object_id>/]<action>/
    try:
        model = apps.get_model(parts[1], parts[2])
    except (IndexError, LookupError, ValueError):
        return ANY
    model_admin = admin.site._registry.get(model)
    if model_admin is None:
        return ANY
    request = RequestFactory().generic(method, "/")
    request.user = superuser
    row = model._default_manager.order_by("pk").first()
    action = parts[-2]
    refused = (
        (action == "add" and not model_admin.has_add_permission(request))
        or (action == "delete" and not model_admin.has_delete_permission(request, row))
        or (action == "change" and method == "POST" and not model_admin.has_change_permission(request, row))
    )
    return 403 if refused else ANY


def checks() -> list[tuple[Found, str]]:
    return [(found, method) for found in FOUND for method in found.methods]


def matrix_size() -> int:
    return (len(checks()) + len(websocket_urlpatterns)) * len(ROLES)


# -- who and what is there -----------------------------------------------------------------------------------


def users(django_user_model) -> dict:
    return {
        ANONYMOUS: None,
        NO_ROLE: role_user("nora-nobody"),
        VIEWER: role_user("vic-viewer", viewer=True),
        OPERATOR: role_user("olga-operator", group=OPERATORS),  # the group alone: it holds view_pool
        ADMINISTRATOR: role_user("adam-admin", group=ADMINISTRATORS),
        SUPERUSER: django_user_model.objects.create_superuser("sue-super", password="pw-sue-1"),
    }


def world(superuser) -> SimpleNamespace:
    """One of everything a URL can name, and a row for every model the admin shows."""
    pool = make_pool(name="Matrix pool")
    host = make_host(pool, is_master=True)
    other = make_host(pool)
    sr = make_sr(pool, shared=True)
    network = make_network(pool)
    for h in (host, other):
        make_pbd(h, sr)
        make_pif(h, network, management=True)
    vm = make_vm(pool, host=host, name_label="matrix-vm")
    make_disk(vm, sr)
    make_nic(vm, network)
    protection = Protection.objects.create(vm=vm, pool=pool, status="protected", created_by=superuser)
    run = WorkflowRun.objects.create(kind="protect", state="succeeded", pool=pool, vm=vm, vm_name=vm.name_label,
                                     protection=protection, created_by=superuser, progress=1.0,
                                     finished_at=timezone.now())
    WorkflowStep.objects.create(run=run, position=0, name="check", label="Check", state="done", progress=1.0)
    now = timezone.now()
    failover_event = FailoverEvent.objects.create(
        pool=pool, vm=vm, vm_uuid=vm.uuid, vm_name=vm.name_label, state="restarted", from_host=other,
        to_host=host, detected_at=now - timedelta(seconds=30), restarted_at=now, downtime_seconds=30.0,
    )  # fmt: skip
    alert = Alert.objects.create(condition="host_lost", object_key=f"host:{other.uuid}", pool=pool,
                                 pool_name=pool.name, host_name=other.name_label, message="Host lost")
    recipient = Recipient.objects.create(email="ops@example.org", name="Ops")
    Delivery.objects.create(alert=alert, recipient=recipient, email=recipient.email, kind="raised")
    audit_entry = audit_record(user=superuser, action="protect", via="api", pool=pool, vm=vm, object_repr=vm.name_label)
    Token.objects.create(user=superuser)
    interval = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    CrontabSchedule.objects.create()
    SolarSchedule.objects.create(event="sunrise", latitude=0, longitude=0)
    ClockedSchedule.objects.create(clocked_time=now)
    PeriodicTask.objects.create(name="matrix", task="alerts.tasks.delivery_sweep", interval=interval)
    seen = {"username": "mallory", "ip_address": "192.0.2.1", "user_agent": "matrix", "http_accept": "*/*",
            "path_info": "/login/"}  # fmt: skip
    AccessAttempt.objects.create(**seen, get_data="", post_data="", failures_since_start=1)
    AccessLog.objects.create(**seen)
    AccessFailureLog.objects.create(**seen)
    return SimpleNamespace(pool=pool, host=host, vm=vm, sr=sr, network=network, protection=protection, run=run,
                           failover_event=failover_event, alert=alert, recipient=recipient, audit_entry=audit_entry)


def _admin_params(found: Found, objects: SimpleNamespace) -> dict[str, str]:
    params = {"app_label": "inventory", "url": "no-such-page/", "content_type_id": "", "object_id": "", "id": ""}
    if found.route.startswith("admin/r/"):  # the admin's "view on site" shortcut
        params.update(content_type_id=str(ContentType.objects.get_for_model(objects.pool).pk),
                      object_id=str(objects.pool.pk))
    elif "<object_id>" in found.route or "<id>" in found.route:  # <id>: a user's password page
        app_label, model_name = found.route.split("/")[1:3]
        row = apps.get_model(app_label, model_name)._default_manager.order_by("pk").first()
        assert row is not None, f"world() makes no {app_label}.{model_name}: {found.route} would not be tried"
        params["object_id"] = params["id"] = quote(str(row.pk))
    return params


def url_of(found: Found, route: Route, objects: SimpleNamespace) -> str:
    params = {name: value.format_map(vars(objects)) for name, value in route.params.items()}
    if found.kind == "admin":
        params.update(_admin_params(found, objects))
    params["format"] = FORMAT

    def fill(match: re.Match) -> str:
        return params[match.group(1)]

    path = "/" + re.sub(r"<(\w+)>", fill, found.route)
    assert resolve(path).route == found.raw, f"{path} does not reach {found.raw}"
    query = route.query.format_map(vars(objects))
    return f"{path}?{query}" if query else path


# -- the answers ---------------------------------------------------------------------------------------------


def expected(found: Found, rule: Rule, status, role: str) -> str:
    """What ``role`` should get, in words that ``answer`` also produces."""
    if rule is NOT_ALLOWED:
        return "405, or the page's refusal first"
    if role in rule.allowed:
        return "allowed" if status is ANY else " or ".join(map(str, status if isinstance(status, tuple) else [status]))
    if found.kind == "admin":
        return "the admin's login page"
    if found.kind == "api":
        return "401" if role == ANONYMOUS else "403"
    return "the login page" if role == ANONYMOUS else "403"


def matches(response, found: Found, rule: Rule, status, role: str) -> bool:
    code, location = response.status_code, response.get("Location", "")
    if code >= 500:
        return False
    if rule is NOT_ALLOWED:
        # 405, unless the page refuses the user before it looks at the method: a 403, a login page (the
        # console's or the admin's), or the admin's index (where its logout sends whoever is not staff).
        login = location.startswith(("/login/?next=", "/admin/login/?next=")) or location == "/admin/"
        return code in (403, 405) or (code == 302 and login)
    if role in rule.allowed:
        if status is ANY:
            return code not in (401, 403) and "login/?next=" not in location
        return code in (status if isinstance(status, tuple) else (status,))
    if found.kind == "admin":
        return code == 302 and location.startswith("/admin/login/?next=")
    if found.kind == "api":
        return code == (401 if role == ANONYMOUS else 403)
    return code == 302 and location.startswith("/login/?next=") if role == ANONYMOUS else code == 403


def ask(client: Client, method: str, url: str, kind: str):
    if kind == "api" and method not in ("GET", "OPTIONS"):
        return client.generic(method, url, "{}", content_type="application/json")
    if method == "POST":
        return client.post(url, {})
    return client.generic(method, url)


def _id(check: tuple[Found, str]) -> str:
    found, method = check
    return f"{method} /{found.route}"


# -- the tests -------------------------------------------------------------------------------------------------


def test_every_route_and_method_has_a_rule_and_every_rule_a_route():
    missing = [f"{method} /{found.route} ({found.kind})" for found, method in checks()
               if (route := rule_of(found)) is None
               or (method not in route.methods and found.kind == "api")]  # fmt: skip
    listed = {(_base(found.route), method) for found, method in checks()}
    stale = [f"{method} /{path}" for path, route in ROUTES.items() for method in route.methods
             if (path, method) not in listed]  # fmt: skip
    sockets = {str(pattern.pattern) for pattern in websocket_urlpatterns}
    assert not missing, f"routes with no rule in ROUTES: {missing}"
    assert not stale, f"rules for routes the URLconf does not have: {stale}"
    assert sockets == set(WEBSOCKETS), f"WEBSOCKETS {sorted(WEBSOCKETS)} != websocket routes {sorted(sockets)}"
    print(f"\nauthorization matrix: {len(FOUND)} URL patterns, {len(checks())} route-methods and "
          f"{len(sockets)} sockets × {len(ROLES)} roles = {matrix_size()} answers checked")


@pytest.mark.django_db
class TestEveryRoute:
    """The users and objects are made once for the class, in a transaction rolled back at its end; each
    test and each request runs in a savepoint of its own, rolled back too."""

    @pytest.fixture(scope="class")
    def setting(self, django_db_setup, django_db_blocker):
        with django_db_blocker.unblock(), transaction.atomic():
            people = users(get_user_model())
            objects = world(people[SUPERUSER])
            sessions = {}
            for role, user in people.items():
                if user is not None:
                    client = Client()
                    client.force_login(user)
                    sessions[role] = client.cookies[settings.SESSION_COOKIE_NAME].value
            yield SimpleNamespace(people=people, objects=objects, sessions=sessions)
            transaction.set_rollback(True)

    @pytest.mark.parametrize("check", checks(), ids=_id)
    def test_http_answer_follows_the_rule_for_every_role(self, check, setting):
        found, method = check
        route = rule_of(found)
        assert route is not None, f"/{found.route} has no rule in ROUTES"
        rule, status = route.methods.get(method, (NOT_ALLOWED, None))
        assert found.kind != "api" or rule is not NOT_ALLOWED, f"{method} /{found.route} has no rule in ROUTES"
        if rule is DJANGO_ADMIN and status is ANY:
            status = admin_status(found, method, setting.people[SUPERUSER])
        url = url_of(found, route, setting.objects)
        wrong = []
        for role in ROLES:
            client = Client(raise_request_exception=False)
            if role in setting.sessions:
                client.cookies[settings.SESSION_COOKIE_NAME] = setting.sessions[role]
            with transaction.atomic():
                response = ask(client, method, url, found.kind)
                transaction.set_rollback(True)  # the next role meets the same rows
            if not matches(response, found, rule, status, role):
                error = f" ({response.exc_info[1]!r})" if getattr(response, "exc_info", None) else ""
                wrong.append(f"{role}: expected {expected(found, rule, status, role)}, "
                             f"got {response.status_code} {response.get('Location', '')}{error}")
        assert not wrong, f"{method} {url} [{rule!r}]:\n  " + "\n  ".join(wrong)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", sorted(WEBSOCKETS))
def test_socket_answer_follows_the_rule_for_every_role(path, django_user_model):
    people = users(django_user_model)
    world(people[SUPERUSER])
    cookies = {role: session_cookie(user) for role, user in people.items() if user is not None}

    async def knock(role: str) -> bool:
        headers = [ORIGIN] + ([cookies[role]] if role in cookies else [])
        communicator = WebsocketCommunicator(application, f"/{path}", headers=headers)
        connected, _ = await communicator.connect(timeout=10)
        if connected:
            await communicator.disconnect(timeout=10)
        else:  # as tests/protection/test_consumers.py does: a refused consumer is stopped, not awaited
            await communicator.wait(timeout=1)
        return connected

    async def everyone() -> dict[str, bool]:
        return {role: await knock(role) for role in ROLES}

    rule = WEBSOCKETS[path]
    answers = run(everyone)
    wrong = {role: "accepted" if connected else "refused" for role, connected in answers.items()
             if connected != (role in rule.allowed)}  # fmt: skip
    assert not wrong, f"/{path} [{rule!r}]: {wrong}"


@pytest.mark.django_db
def test_home_page_tells_a_user_without_a_role_they_have_no_access(django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_user("nora-nobody", password="pw-nora-1"))
    response = client.get("/")
    assert response.status_code == 200 and "No access to any pool" in response.content.decode()
