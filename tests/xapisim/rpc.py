"""Raw HTTP helpers: JSON-RPC, hand-written XML-RPC and the /sim/ control API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def post(url: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def jsonrpc(base: str, method: str, params: list[Any], version: str = "2.0", rid: Any = 7) -> dict[str, Any]:
    call: dict[str, Any] = {"method": method, "params": params, "id": rid}
    if version == "2.0":
        call["jsonrpc"] = "2.0"
    status, content_type, body = post(base + "/jsonrpc", json.dumps(call).encode(), "application/json")
    assert status == 200, body
    assert content_type == "application/json"
    return json.loads(body)


def xmlrpc_raw(base: str, method: str, *params: str, path: str = "/") -> tuple[int, str, str]:
    """Call with string parameters written by hand; returns the raw answer."""
    values = "".join(f"<param><value>{p}</value></param>" for p in params)
    body = f'<?xml version="1.0"?><methodCall><methodName>{method}</methodName><params>{values}</params></methodCall>'
    status, content_type, raw = post(base + path, body.encode(), "text/xml")
    return status, content_type, raw.decode()


def control(base: str, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """Call the /sim/ API; returns (status, JSON body) whatever the status."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
