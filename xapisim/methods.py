"""The composition root: every XAPI method the simulator serves, registered in one place.

The generic class methods (``api``) go in first; the handlers of ``ops_misc``,
``ops_vm``, ``ops_devices``, ``ha_calls`` and ``hosts`` then replace a generic method of the
same name.  Called where the engine is built (``server.Simulator``), so that
the engine itself imports no handler module.
"""

from __future__ import annotations

from . import ha_calls, hosts, ops_devices, ops_misc, ops_vm
from .api import Registry, register_generic


def register_all(registry: Registry) -> None:
    register_generic(registry)
    ops_misc.register(registry)
    ops_vm.register(registry)
    ops_devices.register(registry)
    ha_calls.register(registry)
    hosts.register(registry)
