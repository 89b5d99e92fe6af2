"""The Content-Security-Policy of every response: django-csp's, with the page's own WebSocket origin."""
from __future__ import annotations

from csp.constants import UNSAFE_INLINE
from csp.middleware import CSPMiddleware, PolicyParts
from django.core.exceptions import DisallowedHost


class ContentSecurityPolicyMiddleware(CSPMiddleware):
    """``settings.CONTENT_SECURITY_POLICY``, plus ``ws://`` (``wss://`` over HTTPS) of the host that served
    the page in ``connect-src``: the live pages talk to ``/ws/live/`` there. CSP Level 3 lets ``'self'`` cover
    it, but browsers before that (Safari up to 15) do not, and a plain ``ws:`` would allow any host.

    DRF's browsable API (``?format=api``, or an API URL opened in a browser) writes Pygments' CSS and two
    style attributes inline: its pages alone allow inline styles. Scripts stay files everywhere."""

    def get_policy_parts(self, request, response, report_only: bool = False) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        update = dict(parts.update or {})
        try:
            host = request.get_host()
        except DisallowedHost:  # answered with a 400 already; nothing to connect to
            host = None
        if host:
            update["connect-src"] = [f"{'wss' if request.is_secure() else 'ws'}://{host}"]
        if getattr(getattr(response, "accepted_renderer", None), "format", None) == "api":
            update["style-src"] = [UNSAFE_INLINE]
        parts.update = update
        return parts
