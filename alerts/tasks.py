"""Celery tasks of alerts: thin wrappers over services."""
from celery import shared_task
from django.conf import settings

from . import services


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=8)
def delivery_send(self, delivery_id: int) -> str:
    """Send one alert mail; an SMTP failure retries with exponential backoff (then the sweeper takes over)."""
    try:
        return services.delivery_send(delivery_id=delivery_id)
    except Exception as exc:
        countdown = min(settings.EAC_MAIL_RETRY_DELAY * 2**self.request.retries, 600)
        raise self.retry(exc=exc, countdown=countdown) from None


@shared_task(acks_late=True)
def delivery_sweep() -> int:
    return services.delivery_sweep()
