"""The unified OpenAI-compatible API (the brief's `base_url=http://localhost:8000/v1` mode), as routing.

It runs in the same mitmproxy process as the proxy: a reverse-proxy listener on `gateway.port` whose
requests the addon re-targets, by the `provider:` prefix of the model, to that provider's own
OpenAI-compatible API. From there on a unified request is an ordinary intercepted request to the
provider's host — same keys, limits, budgets, metering, ledger — which is why this module only computes
*where* a request goes and *what* it asks for, and the addon does the rest with the code the proxy uses.
"""
from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass

from .policy import Policy, Provider

# The reverse listener's nominal upstream: a reserved name that never resolves, so a request the addon
# did not re-target fails instead of going anywhere.
UNIFIED_HOST = "tollgate.invalid"
UNIFIED_PORT = 1
UNIFIED_PATTERN = rf"^{re.escape(UNIFIED_HOST)}:{UNIFIED_PORT}$"

# Where each provider's OpenAI-compatible API lives on its own host. Everything else built in speaks
# OpenAI's wire format at its well-known base.
COMPAT_PREFIX = {
    "anthropic": "/v1",  # https://api.anthropic.com/v1/chat/completions
    "gemini": "/v1beta/openai",  # https://generativelanguage.googleapis.com/v1beta/openai/chat/completions
}
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


class RouteError(Exception):
    """A request the unified API cannot route; the message is shown to the app (OpenAI format)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    model: str  # without the provider prefix
    scheme: str
    host: str
    port: int
    path: str  # the path on the provider's own host (before any base_url redirect)


def split_model(model: str, pol: Policy, default_provider: str | None) -> tuple[str, str]:
    """("provider", "model") from "provider:model"; an unprefixed model goes to the default provider."""
    name, colon, rest = model.partition(":")
    if colon and name in pol.providers:
        return name, rest
    # OpenAI's fine-tuned ids ("ft:gpt-4o-mini:org::id") have colons but no provider prefix.
    if (not colon or name == "ft") and default_provider and default_provider in pol.providers:
        return default_provider, model
    known = ", ".join(f"{n}:…" for n in pol.providers)
    raise RouteError(400, "model_not_found",
                     f"model {model!r} names no configured provider; use provider:model ({known})")


def route(pol: Policy, path: str, model: str, default_provider: str | None) -> Route:
    base_path = path.split("?", 1)[0]
    if base_path not in ROUTES:
        raise RouteError(404, "unknown_url", f"tollgate's unified API has no {base_path} "
                                             f"(it serves {', '.join(ROUTES)}, /v1/models, /health)")
    name, bare = split_model(model, pol, default_provider)
    prv = pol.providers[name]
    if prv.protocol == "azure":
        raise RouteError(400, "unsupported_provider", f"provider {name!r} (Azure deployments) is reached "
                                                      f"through the proxy, not the unified API")
    # Built-in providers: their OpenAI-compatible API on their own host; custom ones: /v1 on theirs.
    prefix = COMPAT_PREFIX.get(prv.protocol, prv.well_known_prefix) if prv.builtin else "/v1"
    host, _, port = prv.hosts[0].partition(":")
    return Route(prv, bare, "https", host, int(port or 443), prefix + path[len("/v1"):])


def target(r: Route) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) the request really goes to: the provider's host, or its base_url."""
    return r.provider.redirect(r.path) or (r.scheme, r.host, r.port, r.path)


def models_path(prv: Provider) -> str:
    """The provider-host path of its OpenAI-compatible models list."""
    return (COMPAT_PREFIX.get(prv.protocol, prv.well_known_prefix) if prv.builtin else "/v1") + "/models"


def fetch_models(prv: Provider, timeout: float = 3.0) -> list[str]:
    """The provider's own model ids from its OpenAI-compatible list; [] when it does not answer.

    Blocking (urllib): the addon runs it on a worker thread. No proxy from the environment: the
    gateway may itself be the HTTPS_PROXY of the shell it was started from.
    """
    path = models_path(prv)
    host, _, port = prv.hosts[0].partition(":")
    scheme, host, port_n, path = prv.redirect(path) or ("https", host, int(port or 443), path)
    url = f"{scheme}://{host}:{port_n}{path}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {prv.api_key}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            data = json.loads(resp.read(4 * 1024 * 1024))
    except Exception:  # unreachable, refused, not JSON: the caller falls back to the price table
        return []
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    ids = [m.get("id") for m in items if isinstance(m, dict)]
    return sorted({i.removeprefix("models/") for i in ids if isinstance(i, str) and i})
