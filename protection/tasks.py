"""Celery tasks of protection: thin wrappers over the engine, the observer and the Level 2 health."""
import logging

from celery import shared_task
from django.conf import settings as django_settings

# services enqueues these tasks and these call services: each module uses the other only at call time.
from . import engine, health, observe, services
from .choices import AM_LEVELS, ProtectionStatus
from .models import Protection

log = logging.getLogger(__name__)


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


def _level2(protection_id: int):
    return Protection.objects.select_related("vm", "pool", "secondary_host", "observed_host").filter(
        pk=protection_id, level__in=AM_LEVELS).first()


@shared_task(ignore_result=True)
def level2_poll(protection_id: int) -> bool:
    """Read both AMs of one Level 2 protection and record its components (on demand, and after a batch of
    inventory changes that touched it). True when what the console shows changed."""
    protection = _level2(protection_id)
    if protection is None:
        return False
    return _poll(protection)


def _poll(protection: Protection, ams: dict | None = None) -> bool:
    protection_id = protection.pk
    reading = health.protection_read(protection, ams)
    changed = services.protection_health_record(reading=reading)
    from . import failover  # it uses services, which uses this module

    acted = False
    if health.crash_restart_due(reading):
        acted = bool(failover.restart_crashed(protection_id))
    elif django_settings.EAC_L2_AUTO_RESERVE:  # the reading knows a failover its record just made
        acted = bool(failover.reserve_again(reading))
    if acted:
        changed = services.protection_health_record(
            reading=health.protection_read(_level2(protection_id) or protection)) or changed
    return changed


@shared_task(ignore_result=True)
def level2_poll_all() -> int:
    """Beat (EAC_AM_HEALTH_INTERVAL): every Level 2 protection's components, each AM read once for all of them
    (``health.am_reads``). A failure on one is logged and the others go on."""
    protections = list(Protection.objects.select_related("vm", "pool", "secondary_host", "observed_host")
                       .filter(level__in=AM_LEVELS))
    ams = health.am_reads(protections)
    n = 0
    for protection in protections:
        try:
            _poll(protection, ams)
            n += 1
        except Exception:
            log.exception("level 2 health of protection %s", protection.pk)
    return n


@shared_task(ignore_result=True)
def level2_validate_all() -> int:
    """Beat (EAC_AM_VERIFY_INTERVAL): the active validation of every protected Level 2 VM."""
    n = 0
    for pk in Protection.objects.filter(level__in=AM_LEVELS, status__in=[
            ProtectionStatus.PROTECTED, ProtectionStatus.DEGRADED]).values_list("pk", flat=True):
        try:
            level2_action(pk, "validate")
            n += 1
        except Exception:
            log.exception("level 2 validation of protection %s", pk)
    return n


@shared_task(ignore_result=True)
def level2_action(protection_id: int, action: str, resource: str = "") -> dict:
    """Validate, swap or repair (``services.protection_level2_request`` checked it), then look again."""
    protection = _level2(protection_id)
    if protection is None:
        return {}
    reading = health.protection_read(protection)
    if action == "validate":
        out = services.protection_verify_record(protection=protection, results=health.protection_verify(reading))
    else:
        out = {"said": health.protection_act(reading, action, resource)}
    level2_poll(protection_id)
    return out
