"""Celery tasks of the inventory: thin wrappers over services."""
from celery import shared_task
from django.db import DatabaseError

from . import services


@shared_task(acks_late=False)  # the global default is acks_late: a start redelivered could run twice
def vm_power(vm_id: int, action: str, requested_by_id: int | None = None) -> str:
    """Start or shut down a VM on XAPI; a refusal is recorded for the VM's page.

    Not acks_late: a start redelivered after a worker died could run twice.
    """
    return services.vm_power(vm_id=vm_id, action=action, requested_by_id=requested_by_id)


@shared_task(acks_late=True, reject_on_worker_lost=True, autoretry_for=(DatabaseError,), retry_backoff=2,
             max_retries=5)
def pool_remove(pool_id: int) -> int:
    """Delete a pool being removed, with all its rows, in bulk. Idempotent: redelivered after a worker died, or
    retried after a database error (a deadlock with a watcher's last batch), it finishes the job or finds it done.
    Returns the number of rows deleted or updated."""
    counts = services.pool_remove_rows(pool_id=pool_id)
    return sum(counts.values()) if counts else 0


@shared_task(acks_late=True)
def pool_remove_sweep() -> list[int]:
    """Beat: queue again the removals that should have ended by now (a task lost or failed)."""
    return services.pools_removal_resume()
