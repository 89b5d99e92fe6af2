"""VDIs and their SR's accounting, shared by the VM operations and HA.

Suspend images, copied and snapshotted disks (``ops_vm``) and HA's statefiles
(``ha_calls``) are made and removed here, so that an SR's ``VDIs``,
``virtual_allocation`` and ``physical_utilisation`` always add up.  Call with
the engine lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine


def new_vdi(
    engine: Engine, sr: str, name: str, size: int, *, vtype: str = "user", copy_of: str | None = None, **extra: Any
) -> str:
    """A new VDI on ``sr``; ``copy_of``: the VDI whose content it starts with (a copy or a snapshot)."""
    s = engine.store
    vdi = s.create(
        "VDI",
        {
            "name_label": name,
            "SR": sr,
            "virtual_size": size,
            "physical_utilisation": size,
            "type": vtype,
            "location": "",
            **extra,
        },
    )
    s.update(vdi, {"location": s.tables["VDI"][vdi]["uuid"]})
    srec = s.tables["SR"][sr]
    s.update(
        sr,
        {
            "VDIs": [*srec["VDIs"], vdi],
            "virtual_allocation": srec["virtual_allocation"] + size,
            "physical_utilisation": srec["physical_utilisation"] + size,
        },
    )
    if engine.storage_hook is not None:
        engine.storage_hook("created", vdi, copy_of)
    return vdi


def destroy_vdi(engine: Engine, vdi: str) -> None:
    s = engine.store
    if engine.storage_hook is not None:
        engine.storage_hook("destroyed", vdi, None)
    rec = s.tables["VDI"][vdi]
    sr = s.tables["SR"].get(rec["SR"])
    if sr is not None:
        s.update(
            rec["SR"],
            {
                "VDIs": [v for v in sr["VDIs"] if v != vdi],
                "virtual_allocation": max(0, sr["virtual_allocation"] - rec["virtual_size"]),
                "physical_utilisation": max(0, sr["physical_utilisation"] - rec["physical_utilisation"]),
            },
        )
    s.destroy(vdi)
