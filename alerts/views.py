"""Alerts pages: open and cleared alerts (acknowledge), recipients and their conditions, test mail."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from eac.errors import client_ip, validation_sentence
from eac.permissions import user_can_acknowledge, user_is_administrator, viewer_required

from . import selectors, services
from .choices import SUBSCRIBABLE, AlertState
from .filtersets import AlertFilterSet
from .forms import RecipientActionForm
from .models import Alert, Recipient


@viewer_required
@require_GET
def alert_list(request: HttpRequest) -> HttpResponse:
    data = request.GET.copy()
    data.setdefault("state", AlertState.OPEN)
    filterset = AlertFilterSet(data, queryset=selectors.alert_list())
    page = Paginator(filterset.qs, 50).get_page(request.GET.get("page"))
    return render(request, "alerts/alert_list.html", dict(
        title="Alerts", page=page, state=data.get("state"), can_ack=user_can_acknowledge(request.user),
        open_count=selectors.alert_open_count(),
    ))


@login_required
@require_POST
def acknowledge(request: HttpRequest, pk: int) -> HttpResponse:
    alert = get_object_or_404(Alert, pk=pk)
    services.alert_acknowledge(alert=alert, user=request.user, via="ui", remote_addr=client_ip(request))
    return redirect(request.POST.get("next") or "alerts:alert_list")


@viewer_required
@require_http_methods(["GET", "POST"])
def recipients(request: HttpRequest) -> HttpResponse:
    """Who gets which alert mails; Administrators add, change and remove them, and send a test alert."""
    status = 200
    if request.method == "POST":
        if not user_is_administrator(request.user):
            raise PermissionDenied("Only Administrators can change who gets alerts.")
        form = RecipientActionForm(request.POST)
        if not form.is_valid():
            messages.error(request, form.error_sentence())
            status = 400
        else:
            try:
                _recipients_act(request, form.cleaned_data)
                return redirect("alerts:recipients")
            except ValidationError as exc:
                messages.error(request, validation_sentence(exc))
                status = 400
    return render(request, "alerts/recipients.html", dict(
        title="Alert recipients", recipients=selectors.recipient_list(),
        conditions=[(c.value, c.label) for c in SUBSCRIBABLE], can_admin=user_is_administrator(request.user),
    ), status=status)


def _recipients_act(request: HttpRequest, data: dict) -> None:
    """Carry out one action of the recipients page (the form has parsed it); a message says what was done."""
    action, user, ip = data["action"], request.user, client_ip(request)
    if action == "add":
        services.recipient_create(email=data["email"], name=data["name"], conditions=data["conditions"], user=user,
                                  via="ui", remote_addr=ip)
        messages.success(request, "Recipient added.")
    elif action == "update":
        recipient = get_object_or_404(Recipient, pk=data["pk"])
        services.recipient_update(recipient=recipient, conditions=data["conditions"], enabled=data["enabled"],
                                  user=user, via="ui", remote_addr=ip)
        messages.success(request, f"{recipient.email} updated.")
    elif action == "delete":
        recipient = get_object_or_404(Recipient, pk=data["pk"])
        services.recipient_delete(recipient=recipient, user=user, via="ui", remote_addr=ip)
        messages.success(request, "Recipient removed.")
    else:
        alert = services.alert_send_test(user=user, email=data["email"] or None, via="ui", remote_addr=ip)
        sent_to = ", ".join(alert.deliveries.values_list("email", flat=True))
        messages.success(request, f"Test alert queued for {sent_to}.")
