"""REST helpers shared by every app's API: the one exception handler."""
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status
from rest_framework.views import exception_handler as drf_exception_handler

from .errors import Conflict


class ConflictError(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"

    def __init__(self, conflict: Conflict) -> None:
        super().__init__(detail={"detail": conflict.message, "reasons": conflict.reasons})


def exception_handler(exc, context):
    """DRF's handler, plus the services' errors: ValidationError → 400, PermissionDenied → 403 (with the
    service's sentence), Conflict → 409 with its reasons."""
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        exc = exceptions.ValidationError(detail=detail)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    elif isinstance(exc, Conflict):
        exc = ConflictError(exc)
    return drf_exception_handler(exc, context)
