"""Errors mitmproxy itself answers (upstream refused, reset, timed out) as provider-style JSON.

When the connection to the provider fails, mitmproxy answers the app with its own HTML error page
(`_http1.make_error_response`), and no addon hook can replace it: the flow is already past its hooks.
SDKs pick their exception from the status code, but an HTML body is not what any of them expects.
tollgate intercepts only LLM API hosts, so every such answer is for an SDK: this module swaps mitmproxy's
page for a JSON body that the OpenAI, Anthropic and Gemini SDKs all parse (`error.message`,
`error.type`, `error.code`, and Anthropic's top-level `"type": "error"`).

It replaces one module-level function of mitmproxy's HTTP/1 layer (mitmproxy is pinned to 12.x in
pyproject.toml); if a future version renames it, install() does nothing and mitmproxy's page remains.
"""
from __future__ import annotations

import json

from mitmproxy import http, version
from mitmproxy.net.http import http1

try:
    from mitmproxy.proxy.layers.http import _http1
except ImportError:  # pragma: no cover - mitmproxy's internals moved
    _http1 = None

_original = getattr(_http1, "make_error_response", None)


def error_json(status: int, message: str) -> bytes:
    kind = "timeout_error" if status == 504 else "api_error"
    return json.dumps({
        "type": "error",
        "error": {"message": f"tollgate: the provider could not be reached or failed: {message}",
                  "type": kind, "code": "upstream_error", "param": None, "status": "UNAVAILABLE"},
    }).encode()


def make_error_response(status_code: int, message: str = "") -> bytes:
    resp = http.Response.make(
        status_code,
        error_json(status_code, message),
        http.Headers(Server=version.MITMPROXY, Connection="close", Content_Type="application/json"),
    )
    return http1.assemble_response(resp)


def install() -> bool:
    if _http1 is None or _original is None:
        return False
    _http1.make_error_response = make_error_response
    return True


def uninstall() -> None:
    if _http1 is not None and _original is not None:
        _http1.make_error_response = _original
