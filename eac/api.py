"""REST helpers shared by every app's API: the one exception handler, the routers, the schema generator and
the 404 of paths nothing routes.

Bad input is refused before it reaches the database (ids in paths by the routers' ``int`` converter, filters by
``eac.filters``, bodies by the serializers) and the OpenAPI schema says what is accepted and every error an
operation can answer with, so that a client (or schemathesis, ``make fuzz``) can rely on it.
"""
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.translation import gettext_lazy as _
from django.views import defaults
from drf_spectacular import openapi
from rest_framework import exceptions, routers, serializers, status
from rest_framework.views import exception_handler as drf_exception_handler

from .errors import Conflict
from .filters import MAX_ID, id_schema


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


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``handler404``: under /api/ a path nothing routes (``/api/v1/vms/abc/``) answers as the API's own 404s
    do, in JSON; elsewhere Django's page."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
    return defaults.page_not_found(request, exception)


# -- routers ------------------------------------------------------------------------------------------------


class Router(routers.SimpleRouter):
    """Every app's router: an object's id in a path goes through Django's ``int`` converter, so
    ``/api/v1/protections/null,null/`` is a 404 before a view or the database sees it (a viewset may name
    another converter with ``lookup_value_converter``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(use_regex_path=False, **kwargs)

    def get_lookup_regex(self, viewset, lookup_prefix: str = "") -> str:
        kwarg = getattr(viewset, "lookup_url_kwarg", None) or getattr(viewset, "lookup_field", "pk")
        return f"<{getattr(viewset, 'lookup_value_converter', 'int')}:{lookup_prefix}{kwarg}>"


class RootRouter(Router, routers.DefaultRouter):
    """A ``Router`` that also serves the API's root view (the inventory's, at /api/v1/), without
    DefaultRouter's format-suffixed twins of every route (``/vms/1/power.json``): they are not in the schema,
    and each passed a ``format`` argument that an action not expecting it (``power``) turned into a 500.
    ``?format=json`` still chooses the format."""

    include_format_suffixes = False


# -- the OpenAPI schema -------------------------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    """A 4xx answer: a sentence in ``detail``, or a list of sentences per field at fault."""

    detail = serializers.CharField(required=False, help_text="What went wrong, in a sentence")


NO_BODY = _("No response body")  # what drf-spectacular says of ``{400: None}``: DRF does send one
# What each error means, for an operation that does not say more.
ERRORS = {
    "400": "Bad input: a sentence in detail, or a list of sentences per field at fault",
    "401": "Not signed in: no session, or an unknown token",
    "403": "Not allowed for this user",
    "404": "No such object, or no such page of a list",
}


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's, plus what every operation shares: the errors it can answer with (as ``Error``, unless
    the view documents its own body, as a 409's reasons), ids in paths bounded to what the database stores,
    and pages numbered from 1."""

    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        parameters = operation.get("parameters", [])
        for parameter in parameters:
            schema = parameter.get("schema", {})
            if parameter["in"] == "path" and schema.get("type") == "integer":
                schema.update(id_schema())
            elif parameter["in"] == "query" and parameter["name"] == "page" and schema.get("type") == "integer":
                schema.update(minimum=1, maximum=MAX_ID)
        codes = ["401", "403"]
        if "requestBody" in operation or any(p["in"] == "query" for p in parameters):
            codes.append("400")
        if any(p["in"] == "path" or p["name"] == "page" for p in parameters):
            codes.append("404")
        responses = operation["responses"]
        for code in {*codes, *(c for c in responses if c.startswith("4"))}:
            declared = responses.get(code) or {}
            if "content" not in declared:
                responses[code] = self._get_response_for_code(ErrorSerializer, code)
                described = declared.get("description", "")
                responses[code]["description"] = (
                    described if described and described != NO_BODY else ERRORS.get(code, "Refused")
                )
        operation["responses"] = dict(sorted(responses.items()))
        return operation
