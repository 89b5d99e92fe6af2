"""Celery tasks of protection: thin wrappers over services."""
from celery import shared_task

from . import services


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True)
def workflow_run(self, run_id: int) -> str:
    """Claim and run a workflow. Redelivered after a worker died: the claim decides who runs it."""
    return services.workflow_run_execute(run_id=run_id, worker=services.worker_name(self.request.id))


@shared_task(acks_late=True)
def protection_sweep() -> dict:
    """Beat: resume runs whose worker died, re-evaluate pools (reachability, overdue restarts)."""
    return services.protection_sweep()
