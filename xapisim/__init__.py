"""xapisim: a XAPI-compatible XenServer / XCP-ng pool simulator with fault injection.

Standard library only; imports nothing from the console.  See README.md.
"""

__all__ = ["Simulator"]


def __getattr__(name: str) -> object:
    # Lazy, so that "python -m xapisim" and "import xapisim.planner" stay light.
    if name == "Simulator":
        from .server import Simulator

        return Simulator
    raise AttributeError(name)
