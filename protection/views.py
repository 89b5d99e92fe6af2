"""Protection pages: the wizard, run progress, the pool's failover plan, failover events, the audit log.

Views parse the request, call a selector or a service, and render; the console's layout around
the page comes from its context processor. Administrators change things; Operators see the same
pages without the buttons, and a POST from them is refused with a 403 page.
"""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from eac.audit import audit_list
from eac.errors import Conflict, client_ip, validation_sentence
from eac.permissions import user_can_change_protection, viewer_required
from inventory.models import VM, Pool

from . import preflight, selectors, services
from .choices import (
    AVAILABLE_LEVELS,
    EPOCH_MS_DEFAULT,
    EPOCH_MS_MAX,
    EPOCH_MS_MIN,
    LEVEL_COMPARISON,
    ORDER_MAX,
    START_DELAY_MAX,
    UNAVAILABLE_REASON,
    Level,
    RestartPriority,
    RunKind,
    uses_ams,
)
from .filtersets import AuditEntryFilterSet, FailoverEventFilterSet
from .forms import ProtectForm
from .models import Protection, WorkflowRun
from .workflows import steps_for

MAX_WIZARD_VMS = 50


def _context(request: HttpRequest, title: str, **extra) -> dict:
    return {"title": title, "can_change": user_can_change_protection(request.user), **extra}


@viewer_required
@require_http_methods(["GET", "POST"])
def wizard(request: HttpRequest) -> HttpResponse:
    """Protect one VM or several (?vm=<uuid>&vm=…): level, preflight, settings, confirm."""
    if request.method == "POST" and not user_can_change_protection(request.user):
        # Before anything else: an Operator's POST is refused as such, whatever it holds.
        raise PermissionDenied("Only members of the Administrators group can protect VMs.")
    data = request.POST if request.method == "POST" else request.GET
    uuids = [u for u in data.getlist("vm") if u][:MAX_WIZARD_VMS]
    vms = list(VM.objects.ordinary().filter(uuid__in=uuids).select_related("pool", "resident_on")
               .order_by("name_label"))
    if not vms:
        raise Http404("Choose the VMs to protect first (from the tree, the table or a VM's page).")
    form = ProtectForm(data)
    form.is_valid()  # a field that does not parse is left out of the preflight, and refused on POST
    level = form.level_or_default()
    settings = form.protect_settings()
    errors: list[str] = []
    if request.method == "POST" and not form.is_valid():
        errors = form.error_sentences()
    elif request.method == "POST":
        started = []
        for vm in vms:
            try:
                run = services.protection_start(vm=vm, level=level, settings=settings, requested_by=request.user,
                                                via="ui", remote_addr=client_ip(request))
            except Conflict as exc:
                errors.append(f"{vm.name_label}: {exc.sentence()}")
            except ValidationError as exc:
                errors.append(f"{vm.name_label}: {validation_sentence(exc)}")
            else:
                started.append(run.pk)
        if started:
            if errors:
                messages.warning(request, " ".join(errors))
            return redirect(reverse("protection:runs") + "?ids=" + ",".join(map(str, started)))
    pools = {vm.pool_id: vm.pool for vm in vms}
    preflights = [(vm, preflight.protection_preflight(vm=vm, level=level, settings=settings)) for vm in vms]
    heartbeat = {}
    for pool in pools.values():
        heartbeat[pool.pk] = list(preflight.heartbeat_sr_candidates(pool))
    levels = [
        {"value": lv.value, "label": lv.label, "available": lv in AVAILABLE_LEVELS,
         "reason": UNAVAILABLE_REASON.get(lv, "")}
        for lv in Level
    ]
    context = _context(
        request, "Protect " + (vms[0].name_label if len(vms) == 1 else f"{len(vms)} VMs"), current="vms",
        vms=vms, level=level, levels=levels, comparison=LEVEL_COMPARISON, preflights=preflights,
        settings=settings, errors=errors, pools=list(pools.values()), heartbeat=heartbeat,
        priorities=RestartPriority.choices, order_max=ORDER_MAX, start_delay_max=START_DELAY_MAX,
        can_proceed=all(p["can_proceed"] for _, p in preflights),
        needs_heartbeat=any(not p.ha_enabled for p in pools.values()),
        step_labels=[step.label for step in steps_for(RunKind.PROTECT, level)],
        level2=uses_ams(level), level3=level == Level.SYSTEM_FT, secondary_hosts=_secondary_choices(vms),
        secondary_memory_mib=(settings.get("secondary_memory") or 0) // 2**20 or "",
        epoch_ms=settings.get("epoch_ms") or EPOCH_MS_DEFAULT, epoch_min=EPOCH_MS_MIN, epoch_max=EPOCH_MS_MAX,
    )
    # The wizard's own form refreshes the preflight alone; a boosted link or form (the table's
    # selection, "Protect…") navigates to the whole page.
    refresh = request.htmx and not request.htmx.boosted and request.method == "GET"
    template = "protection/fragments/preflight.html" if refresh else "protection/wizard.html"
    return render(request, template, context, status=400 if errors else 200)


def _secondary_choices(vms: list[VM]) -> list[dict]:
    """The hosts the wizard offers as the secondary: those with an AM, across the VMs chosen, the suggested
    (an AM peer) first. Whatever the level the page opens at: choosing Level 2 refreshes only the preflight."""
    seen: dict[str, dict] = {}
    for vm in vms:
        for host in preflight.level2_secondary_candidates(vm):
            if host["uuid"] in seen and host["suggested"]:
                seen[host["uuid"]]["suggested"] = True
            seen.setdefault(host["uuid"], dict(host))
    return sorted(seen.values(), key=lambda h: (not h["suggested"], h["name_label"]))


@viewer_required
@require_GET
def runs(request: HttpRequest) -> HttpResponse:
    """Runs in progress or done, with their steps; ?ids=1,2 follows those runs live."""
    ids = [int(i) for i in request.GET.get("ids", "").split(",") if i.strip().isdigit()][:MAX_WIZARD_VMS]
    qs = selectors.run_list()
    if ids:
        runs_ = list(qs.filter(pk__in=ids).order_by("pk"))
        if not runs_:
            raise Http404("No such workflow run.")
        page = None
    else:
        page = Paginator(qs, 25).get_page(request.GET.get("page"))
        runs_ = list(page.object_list)
    return render(request, "protection/runs.html", _context(
        request, "Workflow runs", runs=runs_, page=page, follow=",".join(str(r.pk) for r in runs_) if ids else "",
    ))


@viewer_required
@require_GET
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return redirect(reverse("protection:runs") + f"?ids={get_object_or_404(WorkflowRun, pk=pk).pk}")


@login_required
@require_POST
def unprotect(request: HttpRequest, pk: int) -> HttpResponse:
    if not user_can_change_protection(request.user):
        raise PermissionDenied("Only members of the Administrators group can unprotect VMs.")
    protection = get_object_or_404(Protection, pk=pk)
    try:
        run = services.protection_stop(protection=protection, requested_by=request.user, via="ui",
                                       remote_addr=client_ip(request))
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("console:vm_detail", uuid=protection.vm.uuid)
    return redirect(reverse("protection:runs") + f"?ids={run.pk}")


@login_required
@require_POST
def level2_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    """The VM page's Validate / Swap / Repair buttons: checked and queued by the service, shown by the page."""
    if not user_can_change_protection(request.user):
        raise PermissionDenied("Only members of the Administrators group can act on a protection.")
    protection = get_object_or_404(Protection, pk=pk)
    try:
        answer = services.protection_level2_request(
            protection=protection, action=action, disk=request.POST.get("disk", ""), requested_by=request.user,
            via="ui", remote_addr=client_ip(request))
    except Conflict as exc:
        messages.error(request, exc.message)
    except ValidationError as exc:
        messages.error(request, validation_sentence(exc))
    else:
        messages.success(request, answer["message"])
        if answer.get("run"):  # a swap is a workflow: its steps' progress is on the runs page
            return redirect(reverse("protection:runs") + f"?ids={answer['run']}")
    return redirect("console:vm_detail", uuid=protection.vm.uuid)


@viewer_required
@require_GET
def protections(request: HttpRequest) -> HttpResponse:
    qs = selectors.protection_list().order_by("vm__name_label")
    return render(request, "protection/protections.html", _context(
        request, "Protected VMs", protections=qs[:500],
    ))


@viewer_required
@require_http_methods(["GET", "POST"])
def pool_plan(request: HttpRequest, pk: int) -> HttpResponse:
    """The pool's failover plan; Administrators set the host failures to tolerate here."""
    pool = get_object_or_404(Pool, pk=pk)
    error = ""
    reasons: list[str] = []
    status = 200
    if request.method == "POST":
        if not user_can_change_protection(request.user):
            raise PermissionDenied("Only members of the Administrators group can change the failover plan.")
        try:
            run = services.pool_failures_to_tolerate_set(
                pool=pool, failures_to_tolerate=request.POST.get("failures_to_tolerate"), requested_by=request.user,
                via="ui", remote_addr=client_ip(request))
        except Conflict as exc:
            error, reasons, status = exc.message, exc.reasons, 409
        except ValidationError as exc:
            error = validation_sentence(exc)
            status = 400
        else:
            return redirect(reverse("protection:runs") + f"?ids={run.pk}")
    plan = selectors.pool_failover_plan(pool)
    events = FailoverEventFilterSet({"pool": pool.pk}, queryset=selectors.failover_event_list()).qs[:20]
    return render(request, "protection/pool_plan.html", _context(
        request, f"Failover plan of {pool.name}", pool=pool, plan=plan, error=error, reasons=reasons,
        events=events, host_choices=range(0, max(plan["total_hosts"], 1)),
    ), status=status)


@viewer_required
@require_GET
def failover_events(request: HttpRequest) -> HttpResponse:
    filterset = FailoverEventFilterSet(request.GET, queryset=selectors.failover_event_list())
    page = Paginator(filterset.qs, 50).get_page(request.GET.get("page"))
    return render(request, "protection/failover_events.html", _context(
        request, "Failover events", page=page, filterset=filterset,
    ))


@viewer_required
@require_GET
def audit_log(request: HttpRequest) -> HttpResponse:
    filterset = AuditEntryFilterSet(request.GET, queryset=audit_list())
    page = Paginator(filterset.qs, 50).get_page(request.GET.get("page"))
    return render(request, "protection/audit.html", _context(request, "Audit log", page=page, filterset=filterset))
