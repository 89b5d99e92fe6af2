"""Celery tasks of protection: thin wrappers over the engine and the observer."""
from celery import shared_task

from . import engine, observe


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True)
def workflow_run(self, run_id: int) -> str:
    """Claim and run a workflow. Redelivered after a worker died: the claim decides who runs it."""
    return engine.workflow_run_execute(run_id=run_id, worker=engine.worker_name(self.request.id))


@shared_task(acks_late=True)
def protection_sweep() -> dict:
    """Beat: resume runs whose worker died, re-evaluate pools (reachability, overdue restarts)."""
    runs = engine.runs_to_resume()
    for pk in runs:
        workflow_run.delay(pk)
    return {"resumed": len(runs), "pools": observe.pools_evaluate()}
