"""The console's pages: overview, Virtual Machine Status table, VM, host and pool pages, tree children.

Every page needs a signed-in user who may see the inventory (``eac.permissions``). Views parse
the request, call a selector and render: the fragments they include are the ones the live
consumer pushes; the layout around them comes from ``context_processors.layout``.
"""
from __future__ import annotations

from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from eac.errors import Conflict, client_ip, validation_sentence
from eac.filters import MAX_ID
from eac.permissions import pools_visible_to, user_can_change_protection, user_can_view_inventory
from inventory import services
from inventory.choices import PowerState
from protection.choices import SummaryGroup

from . import details, table
from . import nodes as sel
from . import tree as ui


def console_page(view):
    """Signed-in users only (others go to the login page); users who may see no pool get a 403 page."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not user_can_view_inventory(request.user):
            return render(request, "console/home.html", {"title": "No access", "current": "home"}, status=403)
        return view(request, *args, **kwargs)

    return login_required(never_cache(require_GET(wrapper)))


@login_required
@never_cache
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "console/home.html", {"title": "Overview", "current": "home"})


@console_page
def vm_list(request: HttpRequest) -> HttpResponse:
    user = request.user
    query = table.vm_table_query(user=user, params=request.GET)
    ignored, sort, per_page = query.ignored, query.sort, query.per_page
    values = {
        name: request.GET.get(name, "").strip()
        for name in table.FILTER_FIELDS
        if name not in ignored and request.GET.get(name, "").strip()
    }
    page = Paginator(query.rows, per_page).get_page(request.GET.get("page"))
    # What the table shows, with the page the paginator settled on: the live consumer re-runs it (eac.js).
    shown = request.GET.copy()
    shown["page"] = str(page.number)

    columns = []
    for key, label in table.TABLE_COLUMNS:
        query_string = request.GET.copy()
        query_string.pop("page", None)
        state = "ascending" if sort == key else "descending" if sort == f"-{key}" else ""
        query_string["sort"] = f"-{key}" if state == "ascending" else key
        columns.append({"key": key, "label": label, "sorted": state, "href": "?" + query_string.urlencode()})

    pools = list(query.pools.order_by("name").only("pk", "name", "name_label"))
    # The host filter lists the hosts of the pool filtered on (every pool's, grouped by pool, without one).
    hosts = query.hosts.order_by("pool__name", "name_label").only("pk", "name_label", "pool__name")
    if "pool" in values:
        hosts = hosts.filter(pool_id=values["pool"])
    host_groups: dict[str, list[tuple[str, str]]] = {}
    for h in hosts:
        host_groups.setdefault(h.pool.name, []).append((str(h.pk), h.name_label or str(h.pk)))
    context = dict(
        title="Virtual machines",
        current="vms",
        can_change=user_can_change_protection(user),  # selection boxes and the rows' actions
        page=page,
        rows=[sel.vm_node(vm) for vm in page.object_list],
        columns=columns,
        sort=sort,
        per_page=per_page,
        default_per_page=table.DEFAULT_PER_PAGE,
        table_query=shown.urlencode(),
        values=values,
        filtered=bool(values),
        ignored=ignored,
        power_choices=PowerState.choices,
        status_choices=SummaryGroup.choices,
        pool_choices=[(str(p.pk), ui_pool_label(p.name, p.name_label)) for p in pools],
        several_pools=len(pools) > 1,
        # [(pool name, [(host id, host name)])]: one group per pool (an <optgroup> when there are several).
        host_groups=list(host_groups.items()),
    )
    return render(request, "console/vm_list.html", context)


def ui_pool_label(name: str, xapi_name: str) -> str:
    """A pool's name in plain text (a select's option): the given name, XAPI's beside it when it differs."""
    shown = sel.xapi_name_shown(name, xapi_name)
    return f"{name} (XAPI: {shown})" if shown else name


@console_page
def vm_detail(request: HttpRequest, uuid: str) -> HttpResponse:
    detail = details.vm_detail(user=request.user, uuid=uuid)
    if detail is None:
        raise Http404("No such VM")
    return render(request, "console/vm_page.html", {"title": detail.node.name, "current": "vms", "d": detail})


@login_required
@require_POST
def vm_power(request: HttpRequest, uuid: str) -> HttpResponse:
    """Start or cleanly shut down a VM (Administrators): enqueued for a worker, then back to the VM's page,
    where the watcher shows the new power state or the events list says why XAPI refused."""
    if not user_can_change_protection(request.user):
        raise PermissionDenied("Only members of the Administrators group can start or shut down VMs.")
    detail = details.vm_detail(user=request.user, uuid=uuid)
    if detail is None:
        raise Http404("No such VM")
    try:
        services.vm_power_request(vm=detail.vm, action=request.POST.get("action", ""), requested_by=request.user,
                                  via="ui", remote_addr=client_ip(request))
    except ValidationError as exc:
        return HttpResponseBadRequest(validation_sentence(exc), content_type="text/plain; charset=utf-8")
    except Conflict as exc:
        messages.error(request, exc.message)
    return redirect("console:vm_detail", uuid=uuid)


@console_page
def host_detail(request: HttpRequest, uuid: str) -> HttpResponse:
    detail = details.host_detail(user=request.user, uuid=uuid)
    if detail is None:
        raise Http404("No such host")
    return render(request, "console/host_page.html", {"title": detail.label.name, "current": "host", "d": detail})


@console_page
def pool_detail(request: HttpRequest, pk: int) -> HttpResponse:
    detail = details.pool_detail(user=request.user, pk=pk)
    if detail is None:
        raise Http404("No such pool")
    return render(request, "console/pool_page.html",
                  {"title": detail.overview.pool.name, "current": "pool", "d": detail})


@console_page
def tree_children(request: HttpRequest, key: str) -> HttpResponse:
    """One page of a tree node's VMs (``<li>`` items), fetched when the node is opened."""
    if not ui.KEY_RE.match(key):
        raise Http404("No such tree node")
    try:
        offset = int(request.GET.get("offset", "0"))
    except ValueError:
        return HttpResponseBadRequest("offset must be a whole number")
    if offset < 0:
        return HttpResponseBadRequest("offset must not be negative")
    if offset > MAX_ID:  # the database's OFFSET is a 64-bit integer: a larger one was a 500
        return HttpResponseBadRequest(f"offset must be at most {MAX_ID}")
    children = sel.tree_children(pools=pools_visible_to(request.user), key=key, offset=offset)
    if children is None:
        raise Http404("No such tree node")
    return render(
        request,
        "console/fragments/tree_children.html",
        {"children": children, "in_summary": key.startswith("pvs-")},
    )
