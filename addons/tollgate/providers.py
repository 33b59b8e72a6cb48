"""What tollgate knows about each provider's wire format, as pure functions of plain values.

One adapter per *wire protocol* ("openai", "azure", "anthropic", "gemini"): where the credential sits,
what a request asks for (model, stream, max output tokens), how usage is reported in a JSON answer and in
a stream, and what the provider's own error JSON looks like (so an SDK raises its usual exception when
tollgate refuses a request). Nothing here imports mitmproxy: callers pass headers, paths and parsed JSON,
which keeps every rule testable alone.

Usage is normalized as ``tollgate.usage.Usage`` documents: ``input_tokens`` counts all input, cached
included. Where the wire format of the *answer* depends on the endpoint rather than the provider (Gemini's
and Anthropic's OpenAI-compatible endpoints, OpenAI-compatible servers exposing ``/v1/messages``), the
endpoint kind decides the parser, so every protocol understands every shape it can be sent.

Provider JSON is untrusted input: every reader here treats a wrong type as a missing value and never
raises.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tollgate import headers as hdrs
from tollgate.sse import SSEEvent
from tollgate.usage import Usage

try:  # pydantic-core's Rust parser (installed with genai-prices): one C call, ~5x faster than json.loads on a
    # chat request, and the stdlib's four Python frames per parse were a measurable share of a request's cold
    # footprint (see README, Performance).
    from pydantic_core import from_json as _from_json
except ImportError:  # pragma: no cover - pydantic-core is a dependency
    _from_json = None

__all__ = [
    "WELL_KNOWN",
    "PROTOCOLS",
    "KINDS",
    "ProviderSpec",
    "Credential",
    "RequestFacts",
    "StreamUsage",
    "find_credential",
    "credential_value",
    "endpoint_kind",
    "request_facts",
    "usage_from_json",
    "model_from_json",
    "is_usage_only_chunk",
    "loads",
    "error_body",
    "host_patterns",
]

PROTOCOLS = ("openai", "azure", "anthropic", "gemini")
KINDS = ("chat", "responses", "completions", "embeddings", "messages", "generate", "audio", "other")


# --------------------------------------------------------------------------------------------------
# Well-known providers


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """Built-in knowledge about a provider name (a policy entry may override hosts and base_url)."""

    name: str
    protocol: str
    hosts: tuple[str, ...]
    well_known_base: str | None
    prices_id: str | None  # provider id in genai-prices' data


def _spec(name: str, protocol: str, hosts: tuple[str, ...], base: str | None, prices: str | None) -> ProviderSpec:
    return ProviderSpec(name=name, protocol=protocol, hosts=hosts, well_known_base=base, prices_id=prices)


WELL_KNOWN: dict[str, ProviderSpec] = {
    s.name: s
    for s in (
        _spec("openai", "openai", ("api.openai.com",), "https://api.openai.com/v1", "openai"),
        _spec("anthropic", "anthropic", ("api.anthropic.com",), "https://api.anthropic.com", "anthropic"),
        _spec(
            "gemini",
            "gemini",
            ("generativelanguage.googleapis.com",),
            "https://generativelanguage.googleapis.com",
            "google",
        ),
        _spec("mistral", "openai", ("api.mistral.ai",), "https://api.mistral.ai/v1", "mistral"),
        _spec("groq", "openai", ("api.groq.com",), "https://api.groq.com/openai/v1", "groq"),
        _spec("deepseek", "openai", ("api.deepseek.com",), "https://api.deepseek.com", "deepseek"),
        _spec("xai", "openai", ("api.x.ai",), "https://api.x.ai/v1", "x-ai"),
        _spec("openrouter", "openai", ("openrouter.ai",), "https://openrouter.ai/api/v1", "openrouter"),
        # Together's docs now give api.together.ai; SDKs and older code still dial api.together.xyz.
        _spec(
            "together", "openai", ("api.together.xyz", "api.together.ai"), "https://api.together.xyz/v1", "together"
        ),
        _spec("fireworks", "openai", ("api.fireworks.ai",), "https://api.fireworks.ai/inference/v1", "fireworks"),
        # Azure resources have per-customer hostnames: the policy must list them.
        _spec("azure", "azure", (), None, "azure"),
    )
}


def host_patterns(hosts: Iterable[str]) -> list[str]:
    """Regexes for mitmproxy's ``allow_hosts`` option, which matches "host:port" strings.

    "api.openai.com" -> any port; "vllm.internal:8000" -> that port only. mitmproxy compiles them with
    re.IGNORECASE and formats IPv6 peers without brackets, so "[::1]:8000" becomes "^::1:8000$".
    """
    out: list[str] = []
    for entry in hosts:
        h = entry.strip().lower()
        port: str | None = None
        if h.startswith("["):
            close = h.find("]")
            if close == -1:
                raise ValueError(f"invalid host {entry!r}: unclosed '['")
            rest = h[close + 1 :]
            h = h[1:close]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"invalid host {entry!r}")
                port = rest[1:]
        elif h.count(":") == 1:
            h, port = h.split(":")
        if not h:
            raise ValueError(f"invalid host {entry!r}: empty hostname")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"invalid host {entry!r}: bad port {port!r}")
        pat = "^" + re.escape(h) + ":" + (port if port is not None else r"\d+") + "$"
        if pat not in out:
            out.append(pat)
    return out


# --------------------------------------------------------------------------------------------------
# Credentials


@dataclass(slots=True)
class Credential:
    """Where the app put its key, so the real key can be written back in the same place."""

    value: str = field(repr=False)  # the secret presented; kept out of repr so it never reaches a log
    where: str  # "header" or "query"
    name: str  # lower-case header name ("authorization", "x-api-key", ...) or query parameter ("key")
    scheme: str = ""  # "Bearer " prefix as sent, kept for re-writing; "" otherwise


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for mitmproxy's Headers (read off its raw fields: see
    headers.py for why) and for a plain dict."""
    if hasattr(headers, "fields"):
        v = hdrs.get(headers, name.encode())
        return None if v is None else v.decode("utf-8", "surrogateescape")
    try:
        v = headers.get(name)
    except Exception:
        v = None
    if v is None:
        for k in headers:
            if isinstance(k, str) and k.lower() == name:
                v = headers[k]
                break
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    return v if isinstance(v, str) else None


def _bearer(headers: Mapping[str, str]) -> Credential | None:
    v = _header(headers, "authorization")
    if v is None:
        return None
    s = v.strip()
    if len(s) > 7 and s[:6].lower() == "bearer" and s[6] in " \t":
        token = s[7:].strip()
        if token:
            return Credential(value=token, where="header", name="authorization", scheme=s[:6] + " ")
    return None


def _plain_header(headers: Mapping[str, str], name: str) -> Credential | None:
    v = _header(headers, name)
    if v is not None and (v := v.strip()):
        return Credential(value=v, where="header", name=name)
    return None


def find_credential(protocol: str, headers: Mapping[str, str], query: Mapping[str, str]) -> Credential | None:
    """The credential the app presented, looked up where that protocol's SDKs put it.

    openai: ``Authorization: Bearer``; anthropic: ``x-api-key``, else Bearer; gemini: ``x-goog-api-key``,
    else ``?key=``, else Bearer; azure: ``api-key``, else Bearer. None when nothing usable is present.
    """
    if protocol == "anthropic":
        return _plain_header(headers, "x-api-key") or _bearer(headers)
    if protocol == "gemini":
        cred = _plain_header(headers, "x-goog-api-key")
        if cred:
            return cred
        try:
            key = query.get("key")
        except Exception:
            key = None
        if isinstance(key, str) and key:
            return Credential(value=key, where="query", name="key")
        return _bearer(headers)
    if protocol == "azure":
        return _plain_header(headers, "api-key") or _bearer(headers)
    return _bearer(headers)


def credential_value(cred: Credential, secret: str) -> str:
    """The value to write back where ``cred`` was found: "Bearer <secret>" or the bare secret."""
    return cred.scheme + secret


# --------------------------------------------------------------------------------------------------
# Requests

# Suffix rules tolerate any base-path prefix: /v1/chat/completions, /openai/v1/..., /api/v1/...,
# /openai/deployments/{d}/chat/completions, /v1beta/openai/chat/completions.
_OPENAI_KINDS = (
    ("/audio/transcriptions", "audio"),
    ("/audio/translations", "audio"),
    ("/chat/completions", "chat"),
    ("/responses", "responses"),
    ("/completions", "completions"),
    ("/embeddings", "embeddings"),
)
# Gemini: /v1beta/models/{model}:{method} (also tunedModels/, and Vertex-style publisher paths).
_GEMINI_PATH = re.compile(r"/(?:models|tunedModels)/([^/:]+):([A-Za-z]+)$")
_GEMINI_KINDS = {
    "generateContent": "generate",
    "streamGenerateContent": "generate",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
}
_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")


def endpoint_kind(protocol: str, path: str) -> str:
    """Which API a request path calls: chat, responses, completions, embeddings, messages, generate, other.

    Paths are matched by suffix, so a base-path prefix is tolerated. Anthropic's ``/v1/messages`` is
    recognized under every protocol (several OpenAI-compatible servers expose it), and the OpenAI shapes
    under every protocol (Gemini and Anthropic both serve an OpenAI-compatible API).
    """
    # The query is cut before the cache so that a ?key=... credential is never kept in it.
    return _endpoint_kind(protocol, path.split("?", 1)[0])


@lru_cache(maxsize=4096)
def _endpoint_kind(protocol: str, path: str) -> str:
    p = path.rstrip("/")
    if protocol == "gemini":
        m = _GEMINI_PATH.search(p)
        if m:
            return _GEMINI_KINDS.get(m.group(2), "other")
    if p.endswith("/v1/messages") or (protocol == "anthropic" and p.endswith("/messages")):
        # /v1/threads/{id}/messages (OpenAI Assistants) never ends in /v1/messages.
        if "/threads/" not in p:
            return "messages"
    for suffix, kind in _OPENAI_KINDS:
        if p.endswith(suffix):
            return kind
    return "other"


@dataclass(slots=True)
class RequestFacts:
    kind: str  # "chat", "responses", "completions", "embeddings", "messages", "generate", "other"
    model: str | None
    stream: bool
    max_output_tokens: int | None  # the output ceiling the request sets, if any
    include_usage: bool  # OpenAI chat/completions stream: stream_options.include_usage already true


# No request has a quadrillion tokens: a larger count is corrupt (an unsigned -1 from a buggy server, 1e25)
# and would only break pricing (Decimal's 28 digits) and budgets downstream; it is treated as absent.
MAX_COUNT = 10**15


def _int(v: Any) -> int | None:
    """A plausible non-negative token count, or None for anything else (bools, strings, NaN, negatives, absurd)."""
    if type(v) is int:
        return v if 0 <= v <= MAX_COUNT else None
    if type(v) is float and math.isfinite(v) and 0 <= v <= MAX_COUNT and v.is_integer():
        return int(v)
    return None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def request_facts(protocol: str, path: str, body: Any) -> RequestFacts:
    """Model, stream flag and output ceiling of a request. Never raises on odd bodies."""
    kind = endpoint_kind(protocol, path)
    b = _dict(body)
    model = _str(b.get("model"))
    stream = b.get("stream") is True
    max_out: int | None = None
    include_usage = False

    if kind == "chat":
        max_out = _first_int(b, "max_completion_tokens", "max_tokens")
    elif kind == "completions":
        max_out = _int(b.get("max_tokens"))
    elif kind == "responses":
        max_out = _int(b.get("max_output_tokens"))
    elif kind == "messages":
        max_out = _int(b.get("max_tokens"))
    if kind in ("chat", "completions") and stream:
        include_usage = _dict(b.get("stream_options")).get("include_usage") is True

    if protocol == "gemini":
        m = _GEMINI_PATH.search(path.split("?", 1)[0])
        if m:
            model = m.group(1)
            stream = m.group(2) == "streamGenerateContent"
            if kind == "generate":
                cfg = _dict(b.get("generationConfig")) or _dict(b.get("generation_config"))
                max_out = _first_int(cfg, "maxOutputTokens", "max_output_tokens")
    elif protocol == "azure" and model is None:
        m = _AZURE_DEPLOYMENT.search(path)
        if m:
            model = m.group(1)
    return RequestFacts(kind=kind, model=model, stream=stream, max_output_tokens=max_out, include_usage=include_usage)


def _first_int(d: dict, *keys: str) -> int | None:
    for k in keys:
        v = _int(d.get(k))
        if v is not None:
            return v
    return None


# --------------------------------------------------------------------------------------------------
# Usage normalization (one function per wire shape)


def _openai_usage(u: dict, fallback: bool = True) -> Usage | None:
    """Chat/completions/embeddings ``usage``: prompt_tokens (cached included), completion_tokens."""
    prompt = _int(u.get("prompt_tokens"))
    completion = _int(u.get("completion_tokens"))
    if prompt is None and completion is None:
        # A compatible server may speak the Responses API's names on a chat endpoint.
        return _responses_usage(u, fallback=False) if fallback else None
    prompt = prompt or 0
    completion = completion or 0
    pd = _dict(u.get("prompt_tokens_details"))
    cd = _dict(u.get("completion_tokens_details"))
    cached = _int(pd.get("cached_tokens"))
    if cached is None:
        cached = _int(u.get("prompt_cache_hit_tokens"))  # DeepSeek's own field
    cache_write = _int(pd.get("cache_write_tokens"))  # OpenRouter (part of prompt_tokens)
    reasoning = _int(cd.get("reasoning_tokens"))
    if reasoning is None:
        reasoning = _int(u.get("reasoning_tokens"))
    output = _additive_reasoning(prompt, completion, reasoning, u.get("total_tokens"))
    return _usage(prompt, output, cached, cache_write, reasoning)


def _responses_usage(u: dict, fallback: bool = True) -> Usage | None:
    """Responses API ``usage``: input_tokens (cached included), output_tokens (reasoning included)."""
    inp = _int(u.get("input_tokens"))
    out = _int(u.get("output_tokens"))
    if inp is None and out is None:
        return _openai_usage(u, fallback=False) if fallback else None
    inp = inp or 0
    out = out or 0
    idt = _dict(u.get("input_tokens_details"))
    odt = _dict(u.get("output_tokens_details"))
    reasoning = _int(odt.get("reasoning_tokens"))
    out = _additive_reasoning(inp, out, reasoning, u.get("total_tokens"))
    return _usage(inp, out, _int(idt.get("cached_tokens")), _int(idt.get("cache_write_tokens")), reasoning)


def _additive_reasoning(inp: int, out: int, reasoning: int | None, total: Any) -> int:
    """Output tokens with reasoning counted once, whichever convention the provider follows.

    OpenAI counts reasoning inside completion_tokens (total = prompt + completion); xAI reports it on top
    (total = prompt + completion + reasoning). The total tells the two apart without naming providers.
    """
    t = _int(total)
    if reasoning and t is not None and t == inp + out + reasoning:
        return out + reasoning
    return out


def _anthropic_usage(u: dict) -> Usage | None:
    """Messages ``usage``: input_tokens excludes cache creation and cache reads, so add them back."""
    base = _int(u.get("input_tokens"))
    out = _int(u.get("output_tokens"))
    write = _int(u.get("cache_creation_input_tokens"))
    read = _int(u.get("cache_read_input_tokens"))
    if write is None:
        cc = _dict(u.get("cache_creation"))
        parts = [_int(v) for v in cc.values()]
        if any(p is not None for p in parts):
            write = sum(p for p in parts if p is not None)
    if base is None and out is None and write is None and read is None:
        return None
    odt = _dict(u.get("output_tokens_details"))
    reasoning = _first_int(odt, "thinking_tokens", "reasoning_tokens")
    return _usage((base or 0) + (write or 0) + (read or 0), out or 0, read, write, reasoning)


def _gemini_usage(m: dict) -> Usage | None:
    """``usageMetadata``: thoughts and tool-use prompt tokens are reported beside, not inside, the counts."""
    prompt = _int(m.get("promptTokenCount"))
    cand = _int(m.get("candidatesTokenCount"))
    thoughts = _int(m.get("thoughtsTokenCount"))
    tool = _int(m.get("toolUsePromptTokenCount"))
    if prompt is None and cand is None and thoughts is None:
        return None
    return _usage(
        (prompt or 0) + (tool or 0),
        (cand or 0) + (thoughts or 0),
        _int(m.get("cachedContentTokenCount")),
        None,
        thoughts,
    )


def _usage(inp: int, out: int, cached: int | None, write: int | None, reasoning: int | None) -> Usage:
    # Parts never exceed their whole, even when a provider's numbers disagree.
    cached = min(cached or 0, inp)
    write = min(write or 0, inp - cached)
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=cached,
        cache_write_tokens=write,
        reasoning_tokens=min(reasoning or 0, out),
    )


_COUNT_FIELDS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "promptTokenCount",
                 "candidatesTokenCount", "cache_read_input_tokens", "cache_creation_input_tokens")


def _doubtful(u: Any) -> bool:
    """A count field that is present but not a count: what was read from this usage is not the whole truth."""
    if not isinstance(u, dict):
        return False
    get = u.get
    for k in _COUNT_FIELDS:  # (a loop, not any(<generator>): this runs twice per answer)
        v = get(k)
        if v is not None and not (type(v) is int and 0 <= v <= MAX_COUNT) and _int(v) is None:
            return True
    return False


def usage_from_json(protocol: str, kind: str, body: Any) -> Usage | None:
    """See _usage_from_json; a usage with a malformed count comes back marked ``estimated`` (to be completed)."""
    u = _usage_from_json(protocol, kind, body)
    if u is not None and isinstance(body, dict) and (_doubtful(body.get("usage"))
                                                     or _doubtful(body.get("usageMetadata"))):
        u.source = "estimated"
    return u


def _usage_from_json(protocol: str, kind: str, body: Any) -> Usage | None:
    """Usage from a non-streamed JSON answer, normalized; None if the answer reports none.

    ``body`` may be any JSON value. A Gemini ``streamGenerateContent`` answer without ``alt=sse`` is a
    JSON array of chunks; the last chunk carrying ``usageMetadata`` wins.
    """
    try:
        if isinstance(body, list):
            for item in reversed(body):
                if isinstance(item, dict) and isinstance(item.get("usageMetadata"), dict):
                    return _gemini_usage(item["usageMetadata"])
            return None
        if not isinstance(body, dict) or kind == "other":
            return None
        meta = body.get("usageMetadata")
        if isinstance(meta, dict):
            return _gemini_usage(meta)
        u = body.get("usage")
        if not isinstance(u, dict):
            u = _dict(_dict(body.get("x_groq")).get("usage"))  # Groq's older placement
            if not u:
                return None
        if kind == "messages":
            return _anthropic_usage(u)
        if kind == "responses":
            return _responses_usage(u)
        if kind == "audio":  # gpt-4o-transcribe: {"type": "tokens", input_tokens, output_tokens}; whisper: seconds
            return _responses_usage(u) if u.get("type", "tokens") == "tokens" else None
        if "cache_creation_input_tokens" in u or "cache_read_input_tokens" in u:
            return _anthropic_usage(u)  # an Anthropic-shaped usage where we did not expect it
        return _openai_usage(u)
    except Exception:  # defensive: malformed provider JSON must never break metering
        return None


# --------------------------------------------------------------------------------------------------
# Reading only what metering needs from a large JSON answer

_REPORT_KEYS = (b'"usageMetadata"', b'"usage"')  # Gemini's first: an OpenAI answer never has it
_MODEL_HEAD = 2048  # an answer's model is among its first members (id, object, created, model, ...)
_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')


def metering_fields(content: bytes) -> dict | None:
    """The top-level members of a JSON answer that metering reads, without parsing the rest.

    An answer's bulk is its choices, content or embeddings; its usage report is one of its last members
    (OpenAI, Anthropic, Gemini and the compatible servers all put it after the content) and its model one of
    the first. So the report is found from the end and parsed together with the members after it, which
    *proves* it is a member of the top-level object: from a nested position the rest would not parse as the
    object's closing members. The model comes from the members after the report (Gemini's modelVersion) or
    from the head, proven top-level the same way. Returns e.g. {"usage": {...}, "model": "..."} or None
    when anything is not as expected — the caller then parses the whole answer, so this is never less exact.
    """
    for key in _REPORT_KEYS:
        i = content.rfind(key)
        if i > 0:
            break
    else:
        return None
    if _escaped(content, i):
        return None
    try:
        fields = json.loads(b"{" + content[i:])
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or not isinstance(fields.get(key[1:-1].decode()), dict):
        return None
    if "model" in fields or "modelVersion" in fields:
        return fields
    j = content.rfind(b'"model"', max(0, i - _MODEL_HEAD), i)  # e.g. embeddings: data, model, usage
    if j > 0 and not _escaped(content, j):
        try:
            near = json.loads(b"{" + content[j:])
        except (ValueError, RecursionError):
            near = None
        if isinstance(near, dict) and "model" in near:
            return near
    m = _MODEL_MEMBER.search(content, 0, min(i, _MODEL_HEAD))
    if m is None or _escaped(content, m.start()):
        return None
    try:  # the members before it plus a stand-in must close the top-level object
        json.loads(content[:m.start()] + b'"_":0}')
        model = json.loads(m.group(1))
    except (ValueError, RecursionError):
        return None
    fields["model"] = model
    return fields


def _escaped(content: bytes, i: int) -> bool:
    """Whether the quote at content[i] is escaped (inside a string), i.e. preceded by an odd run of backslashes."""
    n = 0
    while i - n - 1 >= 0 and content[i - n - 1] == 0x5C:
        n += 1
    return n % 2 == 1


def model_from_json(protocol: str, body: Any) -> str | None:
    """The model that answered: ``model`` (OpenAI, Anthropic) or ``modelVersion`` (Gemini)."""
    if isinstance(body, list):  # Gemini's JSON-array stream: the last chunk that names it
        for item in reversed(body):
            m = _model_of(item)
            if m:
                return m
        return None
    return _model_of(body)


def _model_of(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    m = _str(body.get("model")) or _str(body.get("modelVersion"))
    if m is None:
        m = _str(_dict(body.get("response")).get("model"))  # responses API event envelopes
    return m


# --------------------------------------------------------------------------------------------------
# Streams

_USAGE_OBJ = re.compile(r'"usage"\s*:\s*\{')
# A chat chunk's first "model" member (top-level: nothing nested in a chunk has one; text is escaped).
_CHUNK_MODEL = re.compile(r'"model"\s*:\s*"([^"\\]*)"')
_LEADING_TYPE = re.compile(r'\s*\{\s*"type"\s*:\s*"([^"\\]*)"')
_TEXT_CAP = 1_000_000  # characters of output text kept for estimating an aborted stream
_RAW_CAP = 4_000_000  # characters of raw event data kept for the same purpose
_RESPONSES_FINAL = ("response.completed", "response.incomplete", "response.failed")


class _Text(str):
    """Output text already extracted from an event (other kept parts are raw JSON, parsed on demand)."""

    __slots__ = ()


def loads(data: str | bytes) -> Any:
    """Parsed JSON, or None when it is not JSON. Never raises.

    The Rust parser takes what providers send (UTF-8); what it refuses goes to json.loads, which also reads
    a BOM, UTF-16/32 and lone surrogate escapes ("\\ud800"), so the result is json.loads' in every case.
    """
    if _from_json is not None:
        try:
            return _from_json(data)
        except ValueError:
            pass
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deeply nested JSON is unreadable too
        return None



def _event_type(ev: SSEEvent) -> str:
    """The SSE ``event:`` name, else the JSON ``type`` (some compatible servers send only the latter)."""
    if ev.event:
        return ev.event
    m = _LEADING_TYPE.match(ev.data)
    if m:
        return m.group(1)
    return _str(_dict(loads(ev.data)).get("type")) or ""


def _error_text(err: Any) -> str:
    """A short label for an in-stream error: its type, else its code, else its message."""
    if isinstance(err, dict):
        for key in ("type", "code", "message"):
            v = _str(err.get(key))
            if v and v != "error":
                return v[:200]
        return "error"
    return (_str(err) or "error")[:200]


_FEEDS = {"chat": "_feed_chat", "completions": "_feed_chat", "responses": "_feed_responses",
          "messages": "_feed_anthropic", "generate": "_feed_gemini"}


class StreamUsage:
    """Fed the SSE events of one streamed answer; knows the usage and answering model at the end.

    ``usage`` is the provider's *final* report (None until it arrives, so an aborted stream is never
    mistaken for a complete one); ``partial_usage`` is the best report so far (e.g. Anthropic's input
    counts from ``message_start``), which lets a caller keep provider input counts and estimate only the
    output of an aborted stream from ``output_text()``.

    Cost per event matters (streams have thousands): events are JSON-parsed only when they can carry
    usage, the model or an error; content deltas are kept as their raw data and parsed only if
    ``output_text()`` is asked for, which happens only when the provider reported no usage.
    """

    __slots__ = ("protocol", "kind", "model", "error", "_usage", "_complete", "_parts", "_kept",
                 "_anth", "_finished", "_handler", "_parsed")

    def __init__(self, protocol: str, kind: str) -> None:
        self.protocol = protocol
        self.kind = kind
        self.model: str | None = None
        self.error: str | None = None  # error type/code reported inside the stream, if any
        self._usage: Usage | None = None
        self._complete = False
        self._parts: list[str] = []
        self._kept = 0
        self._anth: dict[str, Any] = {}
        self._finished = False
        self._parsed: tuple[str, Any] | None = None  # (event data, its JSON) of the last event parsed
        self._handler = getattr(self, _FEEDS.get(kind, "_feed_ignore"))  # one bound method, not five

    @property
    def usage(self) -> Usage | None:
        """The provider's final usage report, or None if the stream did not deliver one."""
        return self._usage if self._complete else None

    @property
    def partial_usage(self) -> Usage | None:
        """The latest usage seen, final or not."""
        return self._usage

    @property
    def complete(self) -> bool:
        return self._complete

    def feed(self, ev: SSEEvent) -> None:
        try:
            self._handler(ev)
        except Exception:  # a malformed event must never break the stream it rides on
            pass

    def output_text(self) -> str:
        """The generated text (content, reasoning, tool arguments) seen so far, capped at ~1 MB."""
        extract = {
            "chat": _chat_text,
            "completions": _chat_text,
            "responses": _responses_text,
            "messages": _anthropic_text,
            "generate": _gemini_text,
        }.get(self.kind)
        if extract is None:
            return ""
        out: list[str] = []
        size = 0
        for part in self._parts:
            if not isinstance(part, _Text):
                try:
                    part = extract(loads(part))
                except Exception:
                    part = ""
            if part:
                out.append(part)
                size += len(part)
                if size >= _TEXT_CAP:
                    break
        return "".join(out)[:_TEXT_CAP]

    # -- per wire format ---------------------------------------------------------------------------

    def _keep(self, part: str) -> None:
        if part and self._kept < _RAW_CAP:
            self._parts.append(part)
            self._kept += len(part)

    def _feed_ignore(self, ev: SSEEvent) -> None:
        pass

    def usage_only(self, ev: SSEEvent) -> bool:
        """is_usage_only_chunk(ev.data), reusing the parse feed() just made of the same event."""
        parsed = self._parsed
        if parsed is not None and parsed[0] is ev.data:
            obj = parsed[1]
            if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
                return False
            choices = obj.get("choices")
            return choices is None or choices == []
        return is_usage_only_chunk(ev.data)

    def _feed_chat(self, ev: SSEEvent) -> None:
        data = ev.data
        if not data or data == "[DONE]":
            return
        # A content chunk: OpenAI's compact '...,"usage":null}' ending (the usage the gateway asked for)
        # tells it without the regex; either way no usage object and no error in it.
        if (data.endswith(',"usage":null}') or not _USAGE_OBJ.search(data)) and '"error"' not in data:
            if self.model is None:  # the first chunk: its model without parsing it (a plain string only)
                m = _CHUNK_MODEL.search(data)
                if m is not None:
                    self.model = m.group(1) or None
            if self.model is not None:
                self._keep(data)  # the common content chunk: no parsing now
                return
        obj = loads(data)
        self._parsed = (data, obj)
        if not isinstance(obj, dict):
            return
        if self.model is None:
            self.model = _str(obj.get("model"))
        if "error" in obj and obj["error"]:
            self.error = _error_text(obj["error"])
        u = obj.get("usage")
        if not isinstance(u, dict):
            u = _dict(_dict(obj.get("x_groq")).get("usage"))
        if u:
            usage = _openai_usage(u)
            if usage is not None:
                if _doubtful(u):
                    usage.source = "estimated"
                self._usage = usage
                self._complete = True
        self._keep(_Text(_chat_text(obj)))

    def _feed_responses(self, ev: SSEEvent) -> None:
        etype = _event_type(ev)
        if etype.endswith(".delta"):
            if "audio" not in etype or "transcript" in etype:
                self._keep(ev.data)
            return
        final = etype in _RESPONSES_FINAL
        if not final and etype not in ("response.created", "error"):
            return
        obj = _dict(loads(ev.data))
        if etype == "error":
            self.error = _error_text(obj.get("error") or obj)
            return
        resp = _dict(obj.get("response"))
        self.model = _str(resp.get("model")) or self.model
        if etype == "response.failed":
            self.error = _error_text(resp.get("error"))
        u = resp.get("usage")
        if final and isinstance(u, dict):
            usage = _responses_usage(u)
            if usage is not None:
                if _doubtful(u):
                    usage.source = "estimated"
                self._usage = usage
                self._complete = True

    def _feed_anthropic(self, ev: SSEEvent) -> None:
        etype = _event_type(ev)
        if etype == "content_block_delta":
            self._keep(ev.data)
            return
        if etype == "message_start":
            msg = _dict(_dict(loads(ev.data)).get("message"))
            self.model = _str(msg.get("model")) or self.model
            self._merge_anthropic(msg.get("usage"), final=False)
        elif etype == "message_delta":
            self._merge_anthropic(_dict(loads(ev.data)).get("usage"), final=True)
        elif etype == "error":
            self.error = _error_text(_dict(loads(ev.data)).get("error"))

    def _merge_anthropic(self, u: Any, final: bool) -> None:
        # Overwrite semantics, as Anthropic's SDKs apply them: a later event's non-null field replaces the
        # earlier value (message_delta carries cumulative output_tokens, and may restate input counts).
        if not isinstance(u, dict):
            return
        for k, v in u.items():
            if v is not None:
                self._anth[k] = v
        usage = _anthropic_usage(self._anth)
        if usage is not None:
            if _doubtful(self._anth):
                usage.source = "estimated"
            self._usage = usage
            if final:
                self._complete = True

    def _feed_gemini(self, ev: SSEEvent) -> None:
        data = ev.data
        if "usageMetadata" not in data and "finishReason" not in data and '"error"' not in data and self.model:
            self._keep(data)
            return
        obj = loads(data)
        if isinstance(obj, list):  # a JSON-array framing that slipped into an event: take its last chunk
            obj = obj[-1] if obj else None
        if not isinstance(obj, dict):
            return
        self.model = _str(obj.get("modelVersion")) or self.model
        if "error" in obj and obj["error"]:
            err = _dict(obj["error"])
            self.error = _str(err.get("status")) or _error_text(obj["error"])
        cands = obj.get("candidates")
        if isinstance(cands, list) and any(isinstance(c, dict) and c.get("finishReason") for c in cands):
            self._finished = True
        meta = obj.get("usageMetadata")
        if isinstance(meta, dict):
            usage = _gemini_usage(meta)
            if usage is not None:
                if _doubtful(meta):
                    usage.source = "estimated"
                self._usage = usage  # every chunk may restate it; the last one wins
        if self._finished and self._usage is not None:
            self._complete = True
        self._keep(_Text(_gemini_text(obj)))


def _chat_text(obj: Any) -> str:
    out: list[str] = []
    for ch in _list(_dict(obj).get("choices")):
        ch = _dict(ch)
        delta = _dict(ch.get("delta")) or _dict(ch.get("message"))
        for key in ("content", "reasoning_content", "reasoning", "refusal"):
            v = delta.get(key)
            if isinstance(v, str):
                out.append(v)
        for tc in _list(delta.get("tool_calls")):
            fn = _dict(_dict(tc).get("function"))
            for key in ("name", "arguments"):
                v = fn.get(key)
                if isinstance(v, str):
                    out.append(v)
        t = ch.get("text")  # legacy completions
        if isinstance(t, str):
            out.append(t)
    return "".join(out)


def _responses_text(obj: Any) -> str:
    d = _dict(obj).get("delta")
    return d if isinstance(d, str) else ""


def _anthropic_text(obj: Any) -> str:
    d = _dict(_dict(obj).get("delta"))
    for key in ("text", "thinking", "partial_json"):
        v = d.get(key)
        if isinstance(v, str):
            return v
    return ""


def _gemini_text(obj: Any) -> str:
    out: list[str] = []
    for c in _list(_dict(obj).get("candidates")):
        for part in _list(_dict(_dict(c).get("content")).get("parts")):
            part = _dict(part)
            t = part.get("text")
            if isinstance(t, str):
                out.append(t)
            fc = part.get("functionCall")
            if isinstance(fc, dict):
                try:
                    out.append(json.dumps(fc, ensure_ascii=False))
                except (TypeError, ValueError):
                    pass
    return "".join(out)


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def output_text_from_json(kind: str, body: Any) -> str:
    """The generated text of a whole JSON answer (for estimating its output when usage is missing)."""
    try:
        if kind in ("chat", "completions"):
            return _chat_text(body)
        if kind == "messages":
            return "".join(_str(_dict(c).get("text")) or _str(_dict(c).get("thinking")) or ""
                           for c in _list(_dict(body).get("content")))
        if kind == "responses":
            return "".join(_str(_dict(p).get("text")) or "" for item in _list(_dict(body).get("output"))
                           for p in _list(_dict(item).get("content")))
        if kind == "generate":
            return "".join(_gemini_text(b) for b in (body if isinstance(body, list) else [body]))
        if kind == "audio":
            return _str(_dict(body).get("text")) or ""
    except Exception:  # never let an estimate break metering
        pass
    return ""


def is_usage_only_chunk(data: str) -> bool:
    """True for the extra final chat/completions chunk that carries only usage (``"choices": []``).

    The gateway asks for it on the app's behalf and removes it when the app did not ask, so an app that
    reads ``chunk.choices[0]`` never meets an empty list.
    """
    if not _USAGE_OBJ.search(data):
        return False
    obj = loads(data)
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return False
    choices = obj.get("choices")
    return choices is None or choices == []


# --------------------------------------------------------------------------------------------------
# Errors in each provider's own format

_OPENAI_TYPES = {
    "invalid_api_key": "invalid_request_error",
    "missing_provider_key": "invalid_request_error",
    "invalid_request": "invalid_request_error",
    "rate_limit_exceeded": "requests",
    "insufficient_quota": "insufficient_quota",
    "upstream_error": "server_error",
    "gateway_error": "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_GOOGLE_REASONS = {
    "invalid_api_key": "API_KEY_INVALID",
    "rate_limit_exceeded": "RATE_LIMIT_EXCEEDED",
    "insufficient_quota": "QUOTA_EXCEEDED",
}
_JSON = {"content-type": "application/json"}


def error_body(
    protocol: str, status: int, code: str, message: str, *, error_type: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """The provider's own error JSON for a refusal, so SDKs raise their usual exception class.

    ``code`` is tollgate's: invalid_api_key, rate_limit_exceeded, insufficient_quota, missing_provider_key,
    upstream_error, gateway_error, invalid_request. ``error_type`` overrides the format's type field
    (e.g. "tokens" for an OpenAI token-rate limit). SDKs pick the exception from the status, so the type
    is chosen to match the status the caller sends.
    """
    if protocol == "anthropic":
        etype = error_type or _ANTHROPIC_TYPES.get(status) or (
            "api_error" if status >= 500 else "invalid_request_error"
        )
        obj: dict[str, Any] = {"type": "error", "error": {"type": etype, "message": message}}
    elif protocol == "gemini":
        gstatus = error_type or _GOOGLE_STATUS.get(status) or ("INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        obj = {
            "error": {
                "code": status,
                "message": message,
                "status": gstatus,
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": _GOOGLE_REASONS.get(code, code.upper()),
                        "domain": "tollgate",
                    }
                ],
            }
        }
    else:  # openai, azure and every OpenAI-compatible server
        etype = error_type or _OPENAI_TYPES.get(code) or ("server_error" if status >= 500 else "invalid_request_error")
        obj = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return json.dumps(obj).encode(), dict(_JSON)
