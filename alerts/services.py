"""Writes of alerts: raise and clear (once each), acknowledge, recipients, and mail delivery.

Mail follows the outbox pattern: the ``Delivery`` rows are written in the
transaction that raises or clears the alert, a Celery task sends each one
after commit, and ``delivery_sweep`` re-enqueues whatever is still pending,
so a mail is never lost to a dead worker or a lost task message.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import EmailMessage
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.template.loader import render_to_string
from django.utils import timezone

from eac.audit import AuditAction, audit_record
from eac.permissions import user_can_acknowledge, user_is_administrator
from eac.realtime import alerts_change, emit
from inventory.models import Pool

from .choices import SEVERITY, SUBSCRIBABLE, AlertState, Condition, DeliveryKind, DeliveryState
from .models import Alert, Delivery, Recipient

log = logging.getLogger(__name__)



# -- raise and clear ------------------------------------------------------------------------------


def alert_raise(
    *,
    condition: str,
    object_key: str,
    message: str,
    pool: Pool | None = None,
    host_name: str = "",
    vm_name: str = "",
    old_state: str = "",
    new_state: str = "",
    downtime_seconds: float | None = None,
    details: dict | None = None,
) -> tuple[Alert, bool]:
    """Raise ``condition`` on ``object_key`` once: while an alert for them is open, a new raise only
    folds into it (occurrences + 1, no mail). Returns (alert, raised_now)."""
    with transaction.atomic():
        existing = (
            Alert.objects.select_for_update()
            .filter(condition=condition, object_key=object_key, state=AlertState.OPEN)
            .first()
        )
        if existing is not None:
            Alert.objects.filter(pk=existing.pk).update(occurrences=F("occurrences") + 1, last_seen_at=timezone.now())
            existing.refresh_from_db()
            return existing, False
        try:
            with transaction.atomic():
                alert = Alert.objects.create(
                    condition=condition, object_key=object_key, pool=pool,
                    pool_name=pool.name if pool else "", host_name=host_name, vm_name=vm_name,
                    old_state=old_state, new_state=new_state, message=message, downtime_seconds=downtime_seconds,
                    details=details or {},
                )
        except IntegrityError:
            # Raised by another process meanwhile: fold into theirs.
            existing = Alert.objects.get(condition=condition, object_key=object_key, state=AlertState.OPEN)
            Alert.objects.filter(pk=existing.pk).update(occurrences=F("occurrences") + 1, last_seen_at=timezone.now())
            return existing, False
        _deliveries_create(alert, DeliveryKind.RAISED)
        emit(alerts_change(alert=alert.pk))
    log.info("alert raised: %s %s", condition, object_key)
    return alert, True


def alert_clear(
    *,
    condition: str,
    object_key: str,
    message: str = "",
    new_state: str = "",
    downtime_seconds: float | None = None,
) -> Alert | None:
    """Clear the open alert for ``condition`` on ``object_key``, once; None if none was open."""
    with transaction.atomic():
        alert = (
            Alert.objects.select_for_update()
            .filter(condition=condition, object_key=object_key, state=AlertState.OPEN)
            .first()
        )
        if alert is None:
            return None
        alert.state = AlertState.CLEARED
        alert.cleared_at = timezone.now()
        alert.clear_message = message
        if new_state:
            alert.old_state, alert.new_state = alert.new_state, new_state
        if downtime_seconds is not None:
            alert.downtime_seconds = downtime_seconds
        alert.save()
        _deliveries_create(alert, DeliveryKind.CLEARED)
        emit(alerts_change(alert=alert.pk))
    log.info("alert cleared: %s %s", condition, object_key)
    return alert


def alert_acknowledge(*, alert: Alert, user, via: str = "api", remote_addr: str | None = None) -> Alert:
    if not user_can_acknowledge(user):
        raise PermissionDenied("Only Administrators and Operators can acknowledge alerts.")
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=alert.pk)
        if alert.acknowledged_at is None:
            alert.acknowledged_at = timezone.now()
            alert.acknowledged_by = user
            alert.save(update_fields=["acknowledged_at", "acknowledged_by"])
            audit_record(user=user, action=AuditAction.ALERT_ACKNOWLEDGED, via=via, remote_addr=remote_addr,
                         pool=alert.pool, object_repr=str(alert)[:255], detail={"alert": alert.pk})
            emit(alerts_change(alert=alert.pk))
    return alert


def alert_send_test(*, user, email: str | None = None, via: str = "api", remote_addr: str | None = None) -> Alert:
    """A test alert mailed to ``email`` (or to every enabled recipient): proves the mail path end to end."""
    if email:
        try:
            validate_email(email)
        except ValidationError:
            raise ValidationError({"email": "Enter a valid email address."}) from None
        targets = [email]
    else:
        targets = list(Recipient.objects.filter(enabled=True).values_list("email", flat=True))
        if not targets:
            raise ValidationError({"email": "No recipient is configured: add one or give an address."})
    now = timezone.now()
    with transaction.atomic():
        alert = Alert.objects.create(
            condition=Condition.TEST, object_key=f"test:{now.timestamp()}", state=AlertState.CLEARED,
            cleared_at=now, message=f"Test alert sent by {user.get_username()} from the eAC console.",
            old_state="-", new_state="-",
        )
        for address in targets:
            recipient = Recipient.objects.filter(email=address).first()
            delivery = Delivery.objects.create(alert=alert, recipient=recipient, email=address, kind=DeliveryKind.TEST)
            _enqueue(delivery)
        audit_record(user=user, action=AuditAction.TEST_ALERT, via=via, remote_addr=remote_addr,
                     object_repr=", ".join(targets)[:255], detail={"alert": alert.pk, "to": targets})
    return alert


def _deliveries_create(alert: Alert, kind: str) -> None:
    for recipient in Recipient.objects.filter(enabled=True):
        if alert.condition not in (recipient.conditions or []):
            continue
        delivery, created = Delivery.objects.get_or_create(
            alert=alert, email=recipient.email, kind=kind, defaults={"recipient": recipient}
        )
        if created:
            _enqueue(delivery)


def _enqueue(delivery: Delivery) -> None:
    from .tasks import delivery_send as delivery_send_task

    pk = delivery.pk

    # Not delay_on_commit: with the broker down, its error would escape the commit of the alert (already
    # written) into the caller, and skip the hooks after it (the other mails, the pages' updates). The row
    # stays pending instead, and delivery_sweep sends it once the broker is back.
    def enqueue() -> None:
        try:
            delivery_send_task.delay(pk)
        except Exception as exc:
            log.warning("alert mail %s to %s: not queued (%s: %s); the delivery sweep will send it", pk,
                        delivery.email, type(exc).__name__, exc)

    transaction.on_commit(enqueue)


# -- recipients -----------------------------------------------------------------------------------


def _clean_conditions(conditions) -> list[str]:
    allowed = {c.value for c in SUBSCRIBABLE}
    if conditions is None:
        return sorted(allowed)
    if not isinstance(conditions, list | tuple | set):
        raise ValidationError({"conditions": "Must be a list of condition codes."})
    unknown = sorted(set(map(str, conditions)) - allowed)
    if unknown:
        raise ValidationError({"conditions": f"Unknown condition(s): {', '.join(unknown)}. "
                                             f"Known: {', '.join(sorted(allowed))}."})
    return sorted(set(map(str, conditions)))


def recipient_create(*, email: str, name: str = "", conditions=None, enabled: bool = True, user=None,
                     via: str = "api", remote_addr: str | None = None) -> Recipient:
    return _recipient_save(Recipient(), email=email, name=name, conditions=conditions, enabled=enabled, user=user,
                           via=via, remote_addr=remote_addr)


def recipient_update(*, recipient: Recipient, user=None, via: str = "api", remote_addr: str | None = None,
                     **fields) -> Recipient:
    return _recipient_save(recipient, user=user, via=via, remote_addr=remote_addr, **{
        "email": fields.get("email", recipient.email), "name": fields.get("name", recipient.name),
        "conditions": fields.get("conditions", recipient.conditions),
        "enabled": fields.get("enabled", recipient.enabled),
    })


def _recipient_save(recipient: Recipient, *, email, name, conditions, enabled, user, via, remote_addr) -> Recipient:
    if not user_is_administrator(user):
        raise PermissionDenied("Only Administrators can change who gets alerts.")
    try:
        validate_email(email)
    except ValidationError:
        raise ValidationError({"email": "Enter a valid email address."}) from None
    if Recipient.objects.filter(email__iexact=email).exclude(pk=recipient.pk).exists():
        raise ValidationError({"email": "This address is already a recipient."})
    with transaction.atomic():
        recipient.email = email
        recipient.name = name or ""
        recipient.conditions = _clean_conditions(conditions)
        recipient.enabled = bool(enabled)
        recipient.save()
        audit_record(user=user, action=AuditAction.RECIPIENT_CHANGED, via=via, remote_addr=remote_addr,
                     object_repr=email, detail={"conditions": recipient.conditions, "enabled": recipient.enabled})
    return recipient


def recipient_delete(*, recipient: Recipient, user=None, via: str = "api", remote_addr: str | None = None) -> None:
    if not user_is_administrator(user):
        raise PermissionDenied("Only Administrators can change who gets alerts.")
    with transaction.atomic():
        audit_record(user=user, action=AuditAction.RECIPIENT_CHANGED, via=via, remote_addr=remote_addr,
                     object_repr=recipient.email, detail={"deleted": True})
        recipient.delete()


# -- sending --------------------------------------------------------------------------------------


def delivery_message(delivery: Delivery) -> EmailMessage:
    alert = delivery.alert
    what = {"raised": "RAISED", "cleared": "CLEARED", "test": "TEST"}[delivery.kind]
    about = " / ".join(x for x in (alert.vm_name, alert.host_name, alert.pool_name) if x)
    subject = f"[eAC] {what}: {alert.get_condition_display()}" + (f" — {about}" if about else "")
    body = render_to_string("alerts/mail.txt", {
        "alert": alert, "delivery": delivery, "what": what, "severity": SEVERITY.get(alert.condition, "info"),
        "at": alert.cleared_at if delivery.kind == DeliveryKind.CLEARED else alert.raised_at,
    })
    return EmailMessage(subject=subject, body=body, from_email=settings.DEFAULT_FROM_EMAIL, to=[delivery.email],
                        headers={"X-eAC-Alert": str(alert.pk), "X-eAC-Condition": alert.condition,
                                 "X-eAC-Kind": delivery.kind})


def delivery_send(*, delivery_id: int) -> str:
    """Send one mail unless already sent. An SMTP error is recorded on the row, then raised (the task
    retries with backoff); the row stays pending, so the sweeper retries it even if the task gives up."""
    now = timezone.now()
    error: Exception | None = None
    with transaction.atomic():
        # The row lock keeps two workers from sending the same mail at once.
        delivery = (
            Delivery.objects.select_for_update(skip_locked=True).select_related("alert").filter(pk=delivery_id).first()
        )
        if delivery is None:
            return "busy-or-gone"
        if delivery.state != DeliveryState.PENDING:
            return delivery.state
        delivery.attempts += 1
        try:
            delivery_message(delivery).send(fail_silently=False)
        except Exception as exc:
            delay = min(settings.EAC_MAIL_RETRY_DELAY * 2 ** (delivery.attempts - 1), 3600.0)
            delivery.last_error = f"{type(exc).__name__}: {exc}"[:1000]
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            if delivery.attempts >= settings.EAC_MAIL_MAX_ATTEMPTS:
                delivery.state = DeliveryState.FAILED
            delivery.save(update_fields=["attempts", "last_error", "next_attempt_at", "state"])
            log.warning("alert mail to %s failed (attempt %d): %s", delivery.email, delivery.attempts,
                        delivery.last_error)
            error = exc
        else:
            delivery.state = DeliveryState.SENT
            delivery.sent_at = timezone.now()
            delivery.last_error = ""
            delivery.save(update_fields=["attempts", "state", "sent_at", "last_error"])
    if error is not None:
        raise error
    return "sent"


def delivery_sweep() -> int:
    """Re-enqueue pending mails whose retry is due (or that no task ever picked up)."""
    from .tasks import delivery_send as delivery_send_task

    now = timezone.now()
    stale = now - timedelta(seconds=settings.EAC_MAIL_RESEND_AFTER)
    due = Delivery.objects.filter(state=DeliveryState.PENDING).filter(
        Q(next_attempt_at__lte=now) | Q(next_attempt_at__isnull=True, created_at__lt=stale)
    )
    ids = list(due.values_list("pk", flat=True)[:1000])
    for pk in ids:
        delivery_send_task.delay(pk)
    return len(ids)

