"""The console's pages: overview, Virtual Machine Status table, VM, host and pool pages, tree children.

Every page needs a signed-in user; what it shows comes from ``ui_selectors`` through
``pools_visible_to``. Views parse the request, call a selector and render: the fragments
they include are the ones the live consumer pushes.
"""
from __future__ import annotations

from functools import wraps

import django_filters
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from protection.permissions import user_can_change_protection
from protection.services import Conflict

from . import services
from . import tree as ui
from . import ui_selectors as sel
from .choices import PowerState
from .filtersets import VMFilterSet
from .models import Host


def console_page(view):
    """Signed-in users only (others go to the login page); users who may see no pool get a 403 page."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not sel.user_can_view_inventory(request.user):
            context = ui.console_context(request, title="No access", current="home")
            return render(request, "inventory/home.html", context, status=403)
        return view(request, *args, **kwargs)

    return login_required(never_cache(require_GET(wrapper)))


@login_required
@never_cache
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    context = ui.console_context(request, title="Overview", current="home")
    if context["tree"] is not None:
        context["summary"] = [node.label for node in context["tree"].summary.nodes]
    return render(request, "inventory/home.html", context)


class VMTableFilterSet(VMFilterSet):
    """The REST API's VM filters, plus the protection status the table shows (an annotation)."""

    status = django_filters.ChoiceFilter(field_name="prot_status", choices=sel.ProtectionStatus.choices)

    class Meta(VMFilterSet.Meta):
        fields = [*VMFilterSet.Meta.fields, "status"]


TABLE_COLUMNS = [
    ("status", "Status"),
    ("name", "Name"),
    ("type", "Type"),
    ("power", "Power"),
    ("hosts", "Hosts"),
    ("pool", "Pool"),
    ("level", "Level"),
    ("health", "Health"),
]
DEFAULT_PER_PAGE = 50
FILTER_FIELDS = ("name", "power_state", "host", "status", "pool")


@console_page
def vm_list(request: HttpRequest) -> HttpResponse:
    user = request.user
    visible_hosts = Host.objects.filter(pool__in=sel.pools_visible_to(user)).select_related("pool")
    filterset = VMTableFilterSet(request.GET, queryset=sel.vm_table_queryset(user=user), request=request)
    filterset.filters["host"].queryset = visible_hosts
    filterset.form.is_valid()  # invalid filters are left out of the query; the page says which
    ignored = sorted(filterset.form.errors)
    values = {
        name: request.GET.get(name, "").strip()
        for name in FILTER_FIELDS
        if name not in ignored and request.GET.get(name, "").strip()
    }
    sort, ordering = sel.vm_table_ordering(request.GET.get("sort"))
    try:
        per_page = int(request.GET.get("per_page", DEFAULT_PER_PAGE))
    except ValueError:
        per_page = DEFAULT_PER_PAGE
    if per_page not in sel.TABLE_PAGE_SIZES:
        per_page = DEFAULT_PER_PAGE
    page = Paginator(filterset.qs.order_by(*ordering), per_page).get_page(request.GET.get("page"))

    columns = []
    for key, label in TABLE_COLUMNS:
        query = request.GET.copy()
        query.pop("page", None)
        state = "ascending" if sort == key else "descending" if sort == f"-{key}" else ""
        query["sort"] = f"-{key}" if state == "ascending" else key
        columns.append({"key": key, "label": label, "sorted": state, "href": "?" + query.urlencode()})

    hosts = list(visible_hosts.order_by("pool__name", "name_label"))
    several_pools = len({h.pool_id for h in hosts}) > 1
    context = ui.console_context(request, title="Virtual machines", current="vms")
    context.update(
        can_change=context["can_change_protection"],  # selection boxes and the rows' actions
        page=page,
        rows=[sel.vm_node(vm) for vm in page.object_list],
        columns=columns,
        sort=sort,
        per_page=per_page,
        default_per_page=DEFAULT_PER_PAGE,
        values=values,
        filtered=bool(values),
        ignored=ignored,
        power_choices=PowerState.choices,
        status_choices=sel.ProtectionStatus.choices,
        host_choices=[
            (str(h.pk), f"{h.pool.name} / {h.name_label}" if several_pools else h.name_label) for h in hosts
        ],
    )
    return render(request, "inventory/vm_list.html", context)


@console_page
def vm_detail(request: HttpRequest, uuid: str) -> HttpResponse:
    detail = sel.vm_detail(user=request.user, uuid=uuid)
    if detail is None:
        raise Http404("No such VM")
    context = ui.console_context(request, title=detail.node.name, current="vms")
    context["d"] = detail
    return render(request, "inventory/vm_page.html", context)


@login_required
@require_POST
def vm_power(request: HttpRequest, uuid: str) -> HttpResponse:
    """Start or cleanly shut down a VM (Administrators): enqueued for a worker, then back to the VM's page,
    where the watcher shows the new power state or the events list says why XAPI refused."""
    if not user_can_change_protection(request.user):
        raise PermissionDenied("Only members of the Administrators group can start or shut down VMs.")
    detail = sel.vm_detail(user=request.user, uuid=uuid)
    if detail is None:
        raise Http404("No such VM")
    try:
        services.vm_power_request(vm=detail.vm, action=request.POST.get("action", ""), requested_by=request.user,
                                  via="ui", remote_addr=request.META.get("REMOTE_ADDR") or None)
    except ValidationError as exc:
        return HttpResponseBadRequest(" ".join(exc.messages), content_type="text/plain; charset=utf-8")
    except Conflict as exc:
        messages.error(request, exc.message)
    return redirect("inventory:vm_detail", uuid=uuid)


@console_page
def host_detail(request: HttpRequest, uuid: str) -> HttpResponse:
    detail = sel.host_detail(user=request.user, uuid=uuid)
    if detail is None:
        raise Http404("No such host")
    context = ui.console_context(request, title=detail.label.name, current="host")
    context["d"] = detail
    return render(request, "inventory/host_page.html", context)


@console_page
def pool_detail(request: HttpRequest, pk: int) -> HttpResponse:
    detail = sel.pool_detail(user=request.user, pk=pk)
    if detail is None:
        raise Http404("No such pool")
    context = ui.console_context(request, title=detail.overview.pool.name, current="pool")
    context["d"] = detail
    return render(request, "inventory/pool_page.html", context)


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
    children = sel.tree_children(user=request.user, key=key, offset=offset)
    if children is None:
        raise Http404("No such tree node")
    return render(
        request,
        "inventory/fragments/tree_children.html",
        {"children": children, "in_summary": key.startswith("pvs-")},
    )
