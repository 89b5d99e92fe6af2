"""A small client of an Availability Manager's management API (am/README.md, docs/level2.md).

Synchronous (``requests``): it is called from workflow steps in a Celery worker, never in a web request.
Every failure is one exception, ``AMError``, whose text is a sentence an administrator can act on: the AM's
own ``{"error": ...}`` sentence when it gave one, else what went wrong on the way (timeout, refused
connection). The bearer token goes in the Authorization header only; no message, log line or exception
text holds it (the URL in messages is the AM's address alone).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from django.conf import settings

from .choices import EPOCH_MS_MAX, EPOCH_MS_MIN, LEVEL3_MAX_NICS, CheckpointState


class AMError(Exception):
    """A call to an AM failed: ``sentence`` says why, ``status`` is the HTTP status (None: no HTTP answer).

    ``transient``: worth retrying as is (the AM did not answer, or said it was unavailable); a missing token
    or a bad address is not.
    """

    def __init__(self, sentence: str, *, status: int | None = None, am: str = "", answered: bool = True) -> None:
        super().__init__(sentence)
        self.sentence = sentence
        self.status = status
        self.am = am
        self._no_answer = not answered

    @property
    def transient(self) -> bool:
        return self._no_answer or self.status in (502, 503, 504)

    @property
    def not_found(self) -> bool:
        return self.status == 404


def am_token() -> str:
    """The management token of the pool's AMs, from EAC_AM_TOKEN_FILE or EAC_AM_TOKEN."""
    path = getattr(settings, "EAC_AM_TOKEN_FILE", "")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise AMError(f"The AM management token file cannot be read ({exc.strerror}): "
                          "check EAC_AM_TOKEN_FILE.") from None
        except UnicodeDecodeError:
            raise AMError("The AM management token file is not text: check EAC_AM_TOKEN_FILE.") from None
    else:
        token = getattr(settings, "EAC_AM_TOKEN", "")
    if not token:
        raise AMError("No management token for the Availability Managers: set EAC_AM_TOKEN_FILE or EAC_AM_TOKEN.")
    return token


def _where(url: str) -> str:
    """The AM's address as messages show it: scheme, host and port, nothing else of the URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}" if parts.hostname else url


@dataclass
class AMClient:
    """One AM's management API at ``url`` (a host's ``eac_am_url``)."""

    url: str
    token: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AMError(f"The AM address {self.url!r} is not an http(s) URL: check the host's eac_am_url.")
        self.where = _where(self.url)
        self._session: requests.Session | None = None

    # -- plumbing ---------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # a proxy from the environment must not see the token
            self._session.headers["Authorization"] = f"Bearer {self.token or am_token()}"
        timeout = self.timeout if self.timeout is not None else settings.EAC_AM_TIMEOUT
        try:
            response = self._session.request(method, self.url.rstrip("/") + path, json=body, timeout=timeout)
        except requests.Timeout:
            raise AMError(f"The Availability Manager at {self.where} did not answer within {timeout:g} s.",
                          am=self.where, answered=False) from None
        except requests.ConnectionError:
            raise AMError(f"The Availability Manager at {self.where} cannot be reached.", am=self.where,
                          answered=False) from None
        except requests.RequestException as exc:
            raise AMError(f"The call to the Availability Manager at {self.where} failed ({type(exc).__name__}).",
                          am=self.where, answered=False) from None
        if response.status_code == 401:
            raise AMError(f"The Availability Manager at {self.where} refused the console's management token: "
                          "check EAC_AM_TOKEN_FILE or EAC_AM_TOKEN.", status=401, am=self.where)
        if response.status_code >= 400:
            said = ""
            try:
                payload = response.json()
                said = str(payload.get("error", "")) if isinstance(payload, dict) else ""
            except ValueError:
                pass
            said = said.strip()[:500] or f"HTTP {response.status_code}"
            raise AMError(f"The Availability Manager at {self.where} refused {method} {path}: {said}.",
                          status=response.status_code, am=self.where)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AMError(f"The Availability Manager at {self.where} answered {method} {path} with something "
                          "that is not JSON.", status=response.status_code, am=self.where) from None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> AMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the routes -------------------------------------------------------------------------------------

    def status(self) -> dict:
        """GET /v1/status: node, peer (state, links), witness reachability, resources."""
        return self._request("GET", "/v1/status")

    def events(self, after: int, wait: float = 0.0) -> list[dict]:
        """GET /v1/events: the AM's changes numbered above ``after``; when there are none yet, the AM holds the
        answer up to ``wait`` seconds for the next (a long poll: this client's own timeout must exceed it)."""
        return self._request("GET", f"/v1/events?after={int(after)}&timeout={wait:g}")

    def resources(self) -> list[dict]:
        return self._request("GET", "/v1/resources")

    def resource(self, name: str) -> dict:
        """GET /v1/resources/{name}; AMError with ``not_found`` when this AM has no such resource."""
        return self._request("GET", f"/v1/resources/{quote(name, safe='')}")

    def resource_or_none(self, name: str) -> dict | None:
        try:
            return self.resource(name)
        except AMError as exc:
            if exc.not_found:
                return None
            raise

    def resource_create(self, *, name: str, role: str, sr: str | None = None, vdi: str | None = None,
                        vm: str | None = None, size: int | None = None, image: str | None = None,
                        peer: str | None = None, checkpoint: dict | None = None) -> dict:
        """POST /v1/resources. Level 2 gives ``sr``, ``vdi`` and ``vm`` (docs/level2.md) instead of ``image``;
        Level 3 adds ``checkpoint`` (``checkpoint_body``: the epoch length and the VM's MACs, docs/level3.md)."""
        body: dict[str, Any] = {"name": name, "role": role}
        for key, value in (("sr", sr), ("vdi", vdi), ("vm", vm), ("size", size), ("image", image), ("peer", peer),
                           ("checkpoint", checkpoint)):
            if value is not None:
                body[key] = value
        return self._request("POST", "/v1/resources", body)

    def resource_set_vm(self, name: str, vm: str | None) -> dict:
        """PATCH /v1/resources/{name} {"vm"}: the VM on this replica's side now (after a planned swap)."""
        return self._request("PATCH", f"/v1/resources/{quote(name, safe='')}", {"vm": vm})

    def resource_delete(self, name: str) -> None:
        self._request("DELETE", f"/v1/resources/{quote(name, safe='')}")

    def resource_action(self, name: str, action: str, body: dict | None = None) -> dict:
        """POST /v1/resources/{name}/{action}: promote, demote, swap, verify, resync…"""
        return self._request("POST", f"/v1/resources/{quote(name, safe='')}/{quote(action, safe='')}", body)


def pair_problems(status: dict) -> list[str]:
    """What is wrong with an AM's view of its pair (GET /v1/status), in words; empty when all is well:
    the peer connected, both availability links up, the witness reachable."""
    problems = []
    peer = status.get("peer") or {}
    if peer.get("state") != "connected":
        problems.append(f"its peer {peer.get('name', '?')} is {peer.get('state', 'unknown')}")
    for link, info in sorted((peer.get("links") or {}).items()):
        state = (info or {}).get("state")
        if str(state).lower() != "up":
            problems.append(f"availability link {link.upper()} is {state or 'unknown'}")
    if not (status.get("witness") or {}).get("reachable"):
        problems.append("the witness is not reachable")
    return problems


# -- Level 3: checkpointing (docs/level3.md) -------------------------------------------------------------

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
CHECKPOINT_STATES = tuple(CheckpointState.values)


def checkpoint_body(*, epoch_ms: int, macs: list[str]) -> dict:
    """The ``checkpoint`` object of ``POST /v1/resources``: the epoch length and the VM's VIF MACs, lowercase colon
    form. ValueError with a sentence when they are outside what the AM's API takes (20..500 ms, 1..8 MACs)."""
    if isinstance(epoch_ms, bool) or not isinstance(epoch_ms, int) or not EPOCH_MS_MIN <= epoch_ms <= EPOCH_MS_MAX:
        raise ValueError(f"The epoch length {epoch_ms!r} is not a whole number of milliseconds from {EPOCH_MS_MIN} "
                         f"to {EPOCH_MS_MAX}.")
    macs = [str(m).strip().lower().replace("-", ":") for m in macs]
    bad = [m for m in macs if not MAC_RE.match(m)]
    if bad:
        raise ValueError(f"The MAC address {bad[0]!r} of the VM is not of the form 02:ab:cd:ef:01:23.")
    if not 1 <= len(macs) <= LEVEL3_MAX_NICS:
        raise ValueError(f"The VM has {len(macs)} network interface(s): Level 3 holds the output of 1 to "
                         f"{LEVEL3_MAX_NICS}.")
    return {"epoch_ms": epoch_ms, "macs": macs}


class MalformedAnswer(ValueError):
    """An AM answered something the console cannot read (bad input from an AM: logged and shown, never a 500)."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


@dataclass(frozen=True)
class Checkpoint:
    """A resource's ``checkpoint`` as its AM reports it (``GET /v1/resources/{name}``); a figure the AM left out
    is None."""

    epoch_ms: int
    state: str  # one of CHECKPOINT_STATES
    why: str = ""
    last_committed: int | None = None
    last_commit_age_ms: float | None = None
    size_bytes: int | None = None
    capture_ms: float | None = None
    commit_ms: float | None = None
    output_hold_ms: float | None = None
    held_packets: int | None = None

    def figures(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("epoch_ms", "state", "last_committed", "last_commit_age_ms",
                                              "size_bytes", "capture_ms", "commit_ms", "output_hold_ms",
                                              "held_packets")}


def _count(data: dict, key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedAnswer(f"its checkpoint's {key} is {str(value)[:40]!r}, not a whole number ≥ 0")
    return value


def _ms(data: dict, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise MalformedAnswer(f"its checkpoint's {key} is {str(value)[:40]!r}, not a number of milliseconds ≥ 0")
    return float(value)


def checkpoint_of(resource: Any) -> Checkpoint | None:
    """The ``checkpoint`` of an AM's resource answer: None when the answer has none (a Level 2 resource, or an AM
    without Level 3: the key missing or null). MalformedAnswer, whose sentence says what was wrong, when it is
    there but not what docs/level3.md says."""
    if not isinstance(resource, dict):
        return None
    data = resource.get("checkpoint")
    if data is None:
        return None
    try:
        if not isinstance(data, dict):
            raise MalformedAnswer(f"its checkpoint is a {type(data).__name__}, not an object")
        state = data.get("state")
        if state not in CHECKPOINT_STATES:
            raise MalformedAnswer(f"its checkpoint state {str(state)[:40]!r} is none of {', '.join(CHECKPOINT_STATES)}")
        epoch = data.get("epoch_ms")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= 60_000:
            raise MalformedAnswer(f"its checkpoint's epoch_ms is {str(epoch)[:40]!r}, not a number of milliseconds")
        why = data.get("why") or ""
        if not isinstance(why, str):
            raise MalformedAnswer("its checkpoint's why is not a sentence")
        return Checkpoint(epoch_ms=epoch, state=state, why=why.strip()[:500],
                          last_committed=_count(data, "last_committed"),
                          last_commit_age_ms=_ms(data, "last_commit_age_ms"), size_bytes=_count(data, "size_bytes"),
                          capture_ms=_ms(data, "capture_ms"), commit_ms=_ms(data, "commit_ms"),
                          output_hold_ms=_ms(data, "output_hold_ms"), held_packets=_count(data, "held_packets"))
    except MalformedAnswer as exc:
        name = resource.get("name")
        raise MalformedAnswer(f"The answer about {str(name)[:80] if name else 'a resource'} cannot be read: "
                              f"{exc.sentence}.") from None
