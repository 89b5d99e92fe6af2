"""Celery tasks of the inventory: thin wrappers over services."""
from celery import shared_task

from . import services


@shared_task(acks_late=False)  # the global default is acks_late: a start redelivered could run twice
def vm_power(vm_id: int, action: str, requested_by_id: int | None = None) -> str:
    """Start or shut down a VM on XAPI; a refusal is recorded for the VM's page.

    Not acks_late: a start redelivered after a worker died could run twice.
    """
    return services.vm_power(vm_id=vm_id, action=action, requested_by_id=requested_by_id)
