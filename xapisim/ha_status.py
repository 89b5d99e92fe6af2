"""The pool's HA status, kept current from the plan: ``ha_plan_exists_for`` and ``ha_overcommitted``.

Every change that can move the plan (a VM starts, stops, migrates or crashes,
a host fails, comes back or is disabled, a setting changes) calls
``update_pool_status`` afterwards, which writes the two fields and emits
xapi's ``HA_POOL_DROP_IN_PLAN_EXISTS_FOR`` and ``HA_POOL_OVERCOMMITTED``
messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .ha_plan import ALL, max_failures, plan_status

if TYPE_CHECKING:
    from .engine import Engine


def update_pool_status(engine: Engine) -> None:
    """Keep ha_plan_exists_for and ha_overcommitted current, with xapi's messages."""
    with engine.lock:
        pool = engine.pool_record()
        if not pool["ha_enabled"]:
            return
        s = engine.store
        to_tolerate = pool["ha_host_failures_to_tolerate"]
        planned_for = pool["ha_plan_exists_for"]
        if plan_status(engine, to_tolerate) == ALL:
            s.update(engine.pool_ref, {"ha_overcommitted": False, "ha_plan_exists_for": to_tolerate})
            return
        most = max_failures(engine)
        if planned_for != most:
            s.update(engine.pool_ref, {"ha_plan_exists_for": min(to_tolerate, most)})
            if most < planned_for:
                engine.message("HA_POOL_DROP_IN_PLAN_EXISTS_FOR", "Pool", pool["uuid"], str(most))
        if not pool["ha_overcommitted"]:
            s.update(engine.pool_ref, {"ha_overcommitted": True})
            engine.message(
                "HA_POOL_OVERCOMMITTED",
                "Pool",
                pool["uuid"],
                f"The failover tolerance for pool '{pool['name_label']}' has dropped and the initially "
                "specified number of host failures to tolerate can no longer be guaranteed",
            )
