"""Errors a user can cause, and how they are told: one sentence, one HTTP status.

Services raise Django's ``ValidationError`` (bad input: 400), ``PermissionDenied`` (403) or
``Conflict`` (valid, but the state of things refuses it: 409). The DRF exception handler
(``eac.api``), the pages and the sockets all word them with ``validation_sentence``.
"""
from __future__ import annotations

from django.core.exceptions import ValidationError


class Conflict(Exception):
    """The request is valid but the state of things refuses it (HTTP 409), with the reasons."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reasons = reasons or []

    def sentence(self) -> str:
        return " ".join([self.message, *self.reasons])


def validation_sentence(exc: ValidationError) -> str:
    """Every message of a ValidationError in one line (field names left out: the form shows them)."""
    if hasattr(exc, "error_dict"):
        return " ".join(m for messages in exc.message_dict.values() for m in messages)
    return " ".join(exc.messages)


def client_ip(request) -> str | None:
    """The address a page or API request came from, for the audit log (behind a proxy, its address)."""
    return request.META.get("REMOTE_ADDR") or None
