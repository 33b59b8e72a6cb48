"""One intercepted request's state, from the first header to its ledger row.

The addon keeps an Exchange per live flow (not in flow.metadata, which mitmproxy saves with `-w` and must
stay plain data); flow.metadata["tollgate"] only gets a small, serializable summary for mitmweb.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .auth import Identity
from .policy import Provider
from .usage import Usage

# Request ids: 64 random bits per process + a counter, as 32 hex digits (the length of a uuid4's hex). Unique
# across processes and restarts like a uuid4, without its os.urandom system call per request (~5 µs).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


OUTCOMES = ("ok", "unauthorized", "rate_limited", "budget_exceeded", "upstream_error", "client_aborted",
            "gateway_error", "unpriced_model", "unmanaged_host")


@dataclass(slots=True)
class Exchange:
    provider: Provider | None  # None until a unified-API request is routed by its model
    endpoint: str
    started: float  # epoch seconds (flow.request.timestamp_start)
    request_id: str = field(default_factory=new_request_id)
    cred: Any = None  # providers.Credential: where the app put its key (the value is never kept)
    identity: Identity | None = None
    key_hash: str | None = None  # WebSocket upgrades only: every turn checks the key again by it
    wire: str = "openai"  # the protocol whose formats the app speaks (errors, credentials)
    unified: bool = False  # came through the unified API (gateway.port), not the proxy
    tier: str | None = None  # the tier the request runs under (policy's shared_users, else the key's)
    subject: Any = None  # limits.Subject once the rate limiter counted the request (released at the end)
    limit_headers: dict[str, str] | None = None  # the answer's x-ratelimit-* headers, from the admission
    reservation: Any = None  # budgets.Reservation held while the request is in flight
    redacted: bool = False  # the flow holds the marker, not the real key
    deadline: float | None = None  # time.monotonic() by which the answer must start (upstream_timeout)
    kind: str = "other"
    model: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    body: Any = None  # the parsed request JSON, kept only until usage is known (for estimates)
    body_size: int = 0
    strip_usage: bool = False  # the gateway asked an OpenAI stream for usage the app did not ask for
    tap: Any = None  # StreamTap when streamed
    answer_text: str = ""  # a JSON answer's text, kept only when its usage is missing (for the estimate)
    response_model: str | None = None
    usage: Usage | None = None
    cost: Decimal | None = None
    status_code: int | None = None
    outcome: str = "ok"
    error: str | None = None  # why a refusal / failure happened (safe to log: never a credential)
    ttft_ms: float | None = None
    latency_ms: float | None = None

    def row(self) -> dict[str, Any]:
        ident = self.identity
        u = self.usage or Usage(source="estimated")
        return {
            "request_id": self.request_id,
            "ts": self.started,  # epoch seconds: the ledger's writer thread makes it a timestamp, off the loop
            "provider": self.provider.name if self.provider else None,
            "endpoint": self.endpoint,
            "model": self.model,
            "response_model": self.response_model,
            "key_id": ident.key_id if ident else None,
            "user_id": ident.user_id if ident else None,
            "tier": self.tier,
            "metadata": dict(ident.metadata) if ident else {},
            "status_code": self.status_code,
            "outcome": self.outcome,
            "stream": self.stream,
            "input_tokens": u.input_tokens,
            "cached_input_tokens": u.cached_input_tokens,
            "cache_write_tokens": u.cache_write_tokens,
            "output_tokens": u.output_tokens,
            "reasoning_tokens": u.reasoning_tokens,
            "token_source": u.source,
            "cost_usd": self.cost,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
        }

    def summary(self) -> dict[str, Any]:
        """What mitmweb shows and `-w` saves: plain values, no credentials."""
        ident = self.identity
        u = self.usage
        return {
            "request_id": self.request_id,
            "provider": self.provider.name if self.provider else None,
            "unified": self.unified,
            "user": ident.user_id if ident else None,
            "key_id": ident.key_id if ident else None,
            "model": self.response_model or self.model,
            "outcome": self.outcome,
            "input_tokens": u.input_tokens if u else None,
            "output_tokens": u.output_tokens if u else None,
            "token_source": u.source if u else None,
            "cost_usd": str(self.cost) if self.cost is not None else None,
        }

    def comment(self) -> str:
        who = self.identity.user_id if self.identity else "?"
        parts = [who, self.response_model or self.model or self.endpoint]
        if self.usage:
            est = "~" if self.usage.source == "estimated" else ""
            parts.append(f"{est}{self.usage.input_tokens}→{self.usage.output_tokens} tok")
        if self.cost is not None:
            parts.append(f"${self.cost:.6f}")
        if self.outcome != "ok":
            parts.append(self.outcome + (f": {self.error}" if self.error else ""))
        return " · ".join(parts)
