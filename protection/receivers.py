"""Protection's receivers of the inventory's signals (connected in ``ProtectionConfig.ready()``)."""
from __future__ import annotations

from .observe import protection_observe_changes


def on_batch_committed(sender, *, pool, changed=None, **kwargs) -> None:
    protection_observe_changes(pool=pool, changed=changed)
