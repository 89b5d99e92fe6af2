"""The one exception the simulator raises for an API failure."""

from __future__ import annotations


class XapiError(Exception):
    """A XAPI failure: ``ErrorDescription`` is ``[code, *params]``, all strings."""

    def __init__(self, code: str, *params: object) -> None:
        super().__init__(code, *params)
        self.code = code
        self.params = [str(p) for p in params]

    @property
    def description(self) -> list[str]:
        return [self.code, *self.params]

    def __str__(self) -> str:
        return " ".join(self.description)


def handle_invalid(cls: str, ref: str) -> XapiError:
    return XapiError("HANDLE_INVALID", cls, ref)
