"""Reads of the inventory for other apps: XAPI errors told with the objects' names."""
from __future__ import annotations

from .models import SR, VM, Host, Network, Pool
from .xapi import XapiAuthError, XapiError, XapiUnreachable
from .xapi_errors import Namer, sentence

# -- XAPI errors, with the objects named as the inventory knows them ------------------------------------


def _ref_namer(pool: Pool | None) -> Namer:
    models = {"SR": SR, "network": Network, "host": Host, "VM": VM}

    def name(kind: str, ref) -> str:
        if not isinstance(ref, str) or pool is None:
            return str(ref)
        obj = models[kind].objects.filter(pool=pool, ref=ref).only("name_label", "uuid").first()
        if obj is None:
            return ref if not ref.startswith("OpaqueRef:") else "an object the console does not know"
        return f"“{obj.name_label or obj.uuid}”"

    return name


def xapi_error_sentence(code: str, params, pool: Pool | None = None) -> str:
    """``xapi_errors.sentence`` with refs replaced by the names of the pool's objects."""
    return sentence(code, params, _ref_namer(pool))


def xapi_error_describe(exc: Exception, pool: Pool | None = None) -> tuple[str, str]:
    """(code, sentence) for any error the XAPI client raised (or anything else, worded generically)."""
    if isinstance(exc, XapiUnreachable):
        return "UNREACHABLE", "The pool master cannot be reached: " + (str(exc) or type(exc).__name__)[:300]
    if isinstance(exc, XapiAuthError):
        return "SESSION_AUTHENTICATION_FAILED", sentence("SESSION_AUTHENTICATION_FAILED")
    if isinstance(exc, XapiError):
        return exc.code, xapi_error_sentence(exc.code, exc.params, pool)
    return type(exc).__name__, "An unexpected error happened; the administrator can find it in the worker log."
