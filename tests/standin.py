#!/usr/bin/env python3
"""A stand-in LLM provider on loopback that speaks the providers' real wire formats.

The end-to-end tests point the gateway's provider ``base_url``s here instead of the real APIs. One server
serves every format, picked by path; an optional first path segment names the provider and is recorded
(``/openai/v1/...``, ``/anthropic/v1/messages``, ``/gemini/v1beta/...``, ``/azure/openai/deployments/...``,
``/groq/openai/v1/...``); bare paths work too.

Endpoints (JSON and, where the real API streams, SSE — or Gemini's streamed JSON array):
  POST  …/v1/chat/completions  …/v1/completions  …/v1/responses  …/v1/embeddings      (OpenAI wire)
        …/openai/deployments/{dep}/chat/completions?api-version=…                      (Azure: api-key)
        /anthropic/v1/chat/completions, /gemini/v1beta/openai/chat/completions         (OpenAI-compatible)
  POST  …/v1/messages, …/v1/messages/count_tokens                                      (Anthropic)
  POST  …/v1beta/models/{m}:generateContent | :streamGenerateContent[?alt=sse] | :countTokens  (Gemini)
  GET   …/v1/models[/{id}] (OpenAI list; Anthropic's list when `anthropic-version` is sent), …/v1beta/models
  GET   /_standin/requests (recorded requests as JSON) · POST /_standin/clear · GET /_standin/health

Credentials, in the places the real APIs read them; only the key in ``real_keys[provider]`` is accepted
(falling back to ``real_keys[wire family]`` for other OpenAI-compatible provider segments):
  OpenAI wire (also the Anthropic/Gemini OpenAI-compatible paths): ``Authorization: Bearer``;
  Azure: ``api-key``; Anthropic: ``x-api-key`` or ``Authorization: Bearer`` (anthropic SDK 2.x sends its
  api_key as Bearer); Gemini: ``x-goog-api-key`` or ``?key=``.
  A wrong or missing key gets the provider's own answer: OpenAI 401 ``invalid_api_key``; Azure 401;
  Anthropic 401 ``authentication_error``; Gemini — as the real API does — 400 ``INVALID_ARGUMENT`` /
  ``API_KEY_INVALID`` for a wrong key and 403 ``PERMISSION_DENIED`` for none.

Deterministic usage (``expected_usage`` computes it, normalized as the ledger stores it):
  items   = input messages (chat ``messages``; Anthropic ``messages`` + 1 if ``system``; Responses ``input``
            items + 1 if ``instructions``; Gemini ``contents`` + 1 if ``systemInstruction``; a string prompt
            or embedding input counts 1, a list of them counts its length)
  input   = 10 + items (all input, cached included)
  output  = 8 — the answer is always the 8 pieces of ANSWER, one content event each when streamed
            (+3 reasoning tokens for reasoning models; embeddings: output 0)
  cached  = 4 when the model name contains "cached" (OpenAI ``cached_tokens``, Gemini
            ``cachedContentTokenCount``, Anthropic ``cache_read_input_tokens``; Anthropic also reports
            ``cache_creation_input_tokens`` = 2 and ``input_tokens`` = input - 6, as it counts them apart)
  reasoning = 3 when the model name starts with o<digit> or contains "thinking"/"reason" (OpenAI
            ``reasoning_tokens``, Anthropic ``output_tokens_details.thinking_tokens``, Gemini
            ``thoughtsTokenCount``, which Gemini reports beside, not inside, ``candidatesTokenCount``)
  Streams report it where the real ones do: OpenAI chat/completions only with
  ``stream_options.include_usage`` (every chunk then has ``"usage": null`` and a final extra chunk has
  ``"choices": []`` and the usage); Responses in ``response.completed``; Anthropic in ``message_start``
  (output 1) and ``message_delta`` (cumulative totals); Gemini's chunks carry ``promptTokenCount`` only,
  the last one the full ``usageMetadata``.

Behaviour knobs, read from the model name (the app's request is all the stand-in sees; they combine):
  -paced-N   N ms between stream events (the first goes at once)   -delay-N  N ms before the answer
  -error-NNN that HTTP status in the native error format             -hang     never answers
  -die       stream cut after 2 events (chunked body never finished, no usage); non-stream: half a body
  -gzip      answer gzip-encoded, SSE included (flushed per event, so pacing survives)
  -length    a stream sent whole with a Content-Length instead of chunked (as caches and some compatible
             servers do; combines with -gzip, not with pacing)
  cached / o1… / …thinking…  usage as above.
  Broken answers (status 200; for the gateway's "never crash, estimate what is missing" paths):
  -notjson   a JSON answer's body is not JSON (an HTML page); a streamed answer's event data is cut to
             half its JSON (``[DONE]`` kept)
  -nousage   no usage anywhere (``usage``/``usageMetadata`` removed; OpenAI's usage-only chunk dropped)
  -badusage  every count inside usage is a string ("11 tokens") instead of a number
  -badout    only the output count (completion_tokens, output_tokens, candidatesTokenCount) is a string
  -truncate  the answer ends cleanly but early: a JSON body cut in half with a matching content-length;
             a stream after 2 events and half of the third, then a proper end of the chunked body
  (usage knobs apply to JSON bodies and SSE events, not to Gemini's JSON-array stream)

Request bodies sent with ``Content-Encoding`` gzip, deflate, br or zstd are decoded before they are read
(as servers that accept compressed uploads do; an undecodable one gets the provider's 400). ``Recorded.body``
keeps the bytes as received.

Beyond the JSON APIs:
  POST  …/v1/audio/transcriptions  multipart/form-data with ``model`` and ``file`` parts →
        ``{"text": ANSWER, "usage": {"type": "tokens", ...}}`` (input 10, output 8)
  GET   …/v1/realtime?model=…  with ``Upgrade: websocket`` (OpenAI Realtime; ``Authorization: Bearer``):
        101, then ``session.created``; each client ``response.create`` event is answered with
        ``response.created``, the 8 ANSWER pieces as ``response.output_text.delta`` and ``response.done``
        carrying usage (input 10 + 1, output 8; ``input_token_details``, as Realtime spells it).
  GET   …/v1/responses  with ``Upgrade: websocket`` (the Responses API's WebSocket mode, as Codex CLI and
        ``client.responses.connect()`` open it): each ``response.create`` (the POST body's fields at the top
        level) gets the event sequence OpenAI streams: ``response.created``, ``response.in_progress``,
        ``response.output_item.added``, ``response.content_part.added``, 8 × ``response.output_text.delta``,
        ``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``,
        ``response.completed`` with the usage above (cached, reasoning). Creates of one ``stream_id`` lane
        are answered in order, and their events echo the ``stream_id``; ``generate: false`` (Codex's prewarm)
        gets ``response.created`` and ``response.completed`` with input usage only. Model knobs: ``-paced-N``,
        ``-delay-N``, ``-hang``, ``-nousage``, ``-error-NNN`` (an ``error`` event with that ``status``), ``-die``
        (the connection dropped after 2 events). A missing model gets an ``error`` event.
  Both: every client text event is recorded (method ``WS``, api ``ws.event``, the event as body); fragmented
  messages are joined; a close frame is answered and ends the connection.

Use it in-process (``Standin(real_keys=…)`` → ``start()`` → port; ``requests``; ``clear()``; ``stop()``;
also a context manager) or as a process: ``python tests/standin.py --port 0 --port-file F`` (keys from
``--real-keys JSON`` or env ``STANDIN_REAL_KEYS``, default ``DEFAULT_REAL_KEYS``).

Why asyncio and not ``http.server.ThreadingHTTPServer``: streams here are paced (sleeps between events),
some requests hang on purpose and 40+ run at once; coroutines make each of those cost nothing, let the
response be written event by event with an explicit drain, and let ``stop()`` cancel hung handlers —
a thread stuck in a handler cannot be cancelled, and BaseHTTPRequestHandler's buffered wfile and
HTTP/1.0-leaning defaults make chunked, flushed SSE and keep-alive fiddly.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import gzip
import itertools
import json
import os
import re
import signal
import struct
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

ANSWER_PIECES = ("Hello", " from", " the", " stand-in", " provider", ",", " all", " good.")
ANSWER = "".join(ANSWER_PIECES)
REASONING_TOKENS = 3
CACHED_TOKENS = 4
CACHE_WRITE_TOKENS = 2  # Anthropic only: the others report no cache writes
EMBEDDING_DIMS = 8
DEFAULT_REAL_KEYS = {
    "openai": "sk-test-openai-REAL",
    "anthropic": "sk-ant-test-anthropic-REAL",
    "gemini": "AIza-test-gemini-REAL",
    "azure": "azure-test-REAL",
}
MODELS = {
    "openai": ("gpt-4o-mini", "gpt-4o", "o3-mini", "text-embedding-3-small", "gpt-3.5-turbo-instruct"),
    "anthropic": ("claude-sonnet-4-5", "claude-haiku-4-5"),
    "gemini": ("gemini-2.5-flash", "gemini-2.5-pro"),
}
# First path segments that belong to an API path, so they never name a provider.
_NOT_PROVIDERS = frozenset({"v1", "v1beta", "v1alpha", "_standin", "chat", "completions", "responses",
                            "embeddings", "models", "messages"})
_MAX_HEAD = 1 << 20

# Wire APIs. Recorded requests carry one of these, and expected_usage() takes them (or an alias).
CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS = "openai.chat", "openai.completions", "openai.responses", "openai.embeddings"
MESSAGES, ANTHROPIC_COUNT = "anthropic.messages", "anthropic.count_tokens"
GENERATE, STREAM_GENERATE, GEMINI_COUNT = "gemini.generate", "gemini.stream_generate", "gemini.count_tokens"
OPENAI_MODELS, ANTHROPIC_MODELS, GEMINI_MODELS = "openai.models", "anthropic.models", "gemini.models"
TRANSCRIPTIONS, REALTIME = "openai.transcriptions", "openai.realtime"
RESPONSES_WS = "openai.responses_ws"  # the upgrade of GET …/v1/responses (Responses API WebSocket mode)
WS_EVENT = "ws.event"  # a client event received on an open WebSocket (recorded with method "WS")
_ALIASES = {"openai": CHAT, "chat": CHAT, "completions": COMPLETIONS, "responses": RESPONSES,
            "embeddings": EMBEDDINGS, "anthropic": MESSAGES, "messages": MESSAGES, "gemini": GENERATE,
            STREAM_GENERATE: GENERATE}


# ---------------------------------------------------------------- knobs and usage (pure)
@dataclass(frozen=True, slots=True)
class Knobs:
    pace_ms: int = 0
    delay_ms: int = 0
    error: int | None = None
    hang: bool = False
    die: bool = False
    gzip: bool = False
    cached: bool = False
    reasoning: bool = False
    not_json: bool = False
    no_usage: bool = False
    bad_usage: bool = False
    bad_out: bool = False
    truncate: bool = False
    length: bool = False


_PACE, _DELAY, _ERROR = re.compile(r"-paced-(\d+)"), re.compile(r"-delay-(\d+)"), re.compile(r"-error-(\d{3})")
_REASONING = re.compile(r"^(?:models/)?o\d|thinking|reason")


@functools.lru_cache(maxsize=256)
def knobs(model: str) -> Knobs:
    """The behaviour a model name asks for (see the module docstring)."""
    def num(rx: re.Pattern[str]) -> int | None:
        m = rx.search(model)
        return int(m.group(1)) if m else None

    return Knobs(pace_ms=num(_PACE) or 0, delay_ms=num(_DELAY) or 0, error=num(_ERROR),
                 hang=bool(re.search(r"-hang\b", model)), die=bool(re.search(r"-die\b", model)),
                 gzip=bool(re.search(r"-gzip\b", model)), cached="cached" in model,
                 reasoning=bool(_REASONING.search(model)), not_json=bool(re.search(r"-notjson\b", model)),
                 no_usage=bool(re.search(r"-nousage\b", model)), bad_usage=bool(re.search(r"-badusage\b", model)),
                 bad_out=bool(re.search(r"-badout\b", model)), truncate=bool(re.search(r"-truncate\b", model)),
                 length=bool(re.search(r"-length\b", model)))


def _count(value: Any) -> int:
    """A prompt / embedding input: a string or a token list is one item, a list of them counts its length."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1 if value not in (None, "", []) else 0


def count_items(api: str, body: dict[str, Any]) -> int:
    """How many input items a request has — the one request fact the usage depends on."""
    api = _ALIASES.get(api, api)
    if api == CHAT:
        return len(body.get("messages") or [])
    if api in (MESSAGES, ANTHROPIC_COUNT):
        return len(body.get("messages") or []) + (1 if body.get("system") else 0)
    if api == RESPONSES:
        inp = body.get("input")
        return (len(inp) if isinstance(inp, list) else _count(inp)) + (1 if body.get("instructions") else 0)
    if api in (GENERATE, GEMINI_COUNT):
        contents = body.get("contents") or []
        n = len(contents) if isinstance(contents, list) else 1
        return n + (1 if body.get("systemInstruction") or body.get("system_instruction") else 0)
    if api == COMPLETIONS:
        return _count(body.get("prompt"))
    if api == EMBEDDINGS:
        return _count(body.get("input"))
    return 0


def expected_usage(provider_format: str, body: dict[str, Any] | bytes | str,
                   model: str | None = None) -> dict[str, int]:
    """The usage the stand-in reports for this request, normalized as the ledger stores it.

    ``provider_format`` is a recorded request's ``api`` (e.g. ``openai.chat``, ``anthropic.messages``,
    ``gemini.generate``) or an alias (``openai``, ``anthropic``, ``gemini``, ``completions``, …);
    ``model`` is needed where the body has none (Gemini, Azure deployments). The keys are those of
    ``tollgate.usage.Usage``, so ``Usage(**expected_usage(...))`` works.
    """
    api = _ALIASES.get(provider_format, provider_format)
    if isinstance(body, (bytes, str)):
        body = json.loads(body or "{}")
    k = knobs(model or body.get("model") or "")
    inp = 10 + count_items(api, body)
    if api == EMBEDDINGS:
        return dict(input_tokens=inp, output_tokens=0, cached_input_tokens=0, cache_write_tokens=0, reasoning_tokens=0)
    reasoning = REASONING_TOKENS if k.reasoning else 0
    return dict(input_tokens=inp, output_tokens=len(ANSWER_PIECES) + reasoning,
                cached_input_tokens=CACHED_TOKENS if k.cached else 0,
                cache_write_tokens=CACHE_WRITE_TOKENS if k.cached and api == MESSAGES else 0,
                reasoning_tokens=reasoning)


# ---------------------------------------------------------------- native usage objects
def _openai_usage(u: dict[str, int], details: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"],
                           "total_tokens": u["input_tokens"] + u["output_tokens"]}
    if details:
        out["prompt_tokens_details"] = {"cached_tokens": u["cached_input_tokens"], "audio_tokens": 0}
        out["completion_tokens_details"] = {"reasoning_tokens": u["reasoning_tokens"], "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    return out


def _responses_usage(u: dict[str, int]) -> dict[str, Any]:
    return {"input_tokens": u["input_tokens"],
            "input_tokens_details": {"cached_tokens": u["cached_input_tokens"], "cache_write_tokens": 0},
            "output_tokens": u["output_tokens"], "output_tokens_details": {"reasoning_tokens": u["reasoning_tokens"]},
            "total_tokens": u["input_tokens"] + u["output_tokens"]}


def _anthropic_usage(u: dict[str, int], output_tokens: int | None = None) -> dict[str, Any]:
    read, write = u["cached_input_tokens"], u["cache_write_tokens"]
    out: dict[str, Any] = {"input_tokens": u["input_tokens"] - read - write, "cache_creation_input_tokens": write,
                           "cache_read_input_tokens": read,
                           "cache_creation": {"ephemeral_5m_input_tokens": write, "ephemeral_1h_input_tokens": 0},
                           "output_tokens": u["output_tokens"] if output_tokens is None else output_tokens,
                           "service_tier": "standard"}
    if u["reasoning_tokens"]:
        out["output_tokens_details"] = {"thinking_tokens": u["reasoning_tokens"]}
    return out


def _gemini_usage(u: dict[str, int], final: bool = True) -> dict[str, Any]:
    inp = u["input_tokens"]
    out: dict[str, Any] = {"promptTokenCount": inp, "totalTokenCount": inp}
    if u["cached_input_tokens"]:
        out["cachedContentTokenCount"] = u["cached_input_tokens"]
    if final:
        out["candidatesTokenCount"] = u["output_tokens"] - u["reasoning_tokens"]
        if u["reasoning_tokens"]:
            out["thoughtsTokenCount"] = u["reasoning_tokens"]
        out["totalTokenCount"] = inp + u["output_tokens"]
    out["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": inp}]
    return out


# ---------------------------------------------------------------- native bodies
_ids = itertools.count(1)


def _sse(obj: Any, event: str | None = None, eol: str = "\n") -> bytes:
    head = f"event: {event}{eol}" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}{eol}{eol}".encode()


@dataclass(slots=True)
class Answer:
    """A success answer: a JSON body, or stream frames (each flushed on its own)."""
    body: Any = None
    frames: list[bytes] | None = None
    content_type: str = "application/json"


def answer_chat(body: dict, model: str, u: dict[str, int], stream: bool) -> Answer:
    rid, now = f"chatcmpl-standin{next(_ids):06d}", int(time.time())
    base = {"id": rid, "object": "chat.completion", "created": now, "model": model,
            "system_fingerprint": "fp_standin", "service_tier": "default"}
    if not stream:
        return Answer({**base, "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER,
                                                                     "refusal": None, "annotations": []},
                                            "logprobs": None, "finish_reason": "stop"}],
                       "usage": _openai_usage(u)})
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base["object"] = "chat.completion.chunk"

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return _sse({**c, "usage": None} if with_usage else c)

    frames = [chunk({"role": "assistant", "content": "", "refusal": None})]
    frames += [chunk({"content": p}) for p in ANSWER_PIECES]
    frames.append(chunk({}, "stop"))
    if with_usage:
        frames.append(_sse({**base, "choices": [], "usage": _openai_usage(u)}))
    frames.append(b"data: [DONE]\n\n")
    return Answer(frames=frames, content_type="text/event-stream; charset=utf-8")


def answer_completions(body: dict, model: str, u: dict[str, int], stream: bool) -> Answer:
    base = {"id": f"cmpl-standin{next(_ids):06d}", "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_standin"}
    if not stream:
        return Answer({**base, "choices": [{"text": ANSWER, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                       "usage": _openai_usage(u, details=False)})
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(text: str, finish: str | None = None) -> bytes:
        c = {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        return _sse({**c, "usage": None} if with_usage else c)

    frames = [chunk(p) for p in ANSWER_PIECES] + [chunk("", "stop")]
    if with_usage:
        frames.append(_sse({**base, "choices": [], "usage": _openai_usage(u, details=False)}))
    frames.append(b"data: [DONE]\n\n")
    return Answer(frames=frames, content_type="text/event-stream; charset=utf-8")


def answer_responses(body: dict, model: str, u: dict[str, int], stream: bool) -> Answer:
    n = next(_ids)
    rid, mid = f"resp_standin{n:06d}", f"msg_standin{n:06d}"
    text_part = {"type": "output_text", "text": ANSWER, "annotations": [], "logprobs": []}
    message = {"type": "message", "id": mid, "status": "completed", "role": "assistant", "content": [text_part]}
    resp = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model, "output": [message], "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "usage": _responses_usage(u), "user": None, "metadata": {}}
    if not stream:
        return Answer(resp)
    frames = [_sse(e, event=e["type"]) for e in _responses_events(resp, message, text_part)]
    return Answer(frames=frames, content_type="text/event-stream; charset=utf-8")


def _responses_events(resp: dict, message: dict, text_part: dict) -> list[dict]:
    """The event sequence OpenAI streams for a text answer (SSE, and WebSocket mode alike)."""
    seq = itertools.count()
    started = {**resp, "status": "in_progress", "output": [], "usage": None}
    item0 = {**message, "status": "in_progress", "content": []}
    where = {"item_id": message["id"], "output_index": 0}

    def ev(kind: str, **data: Any) -> dict:
        return {"type": kind, "sequence_number": next(seq), **data}

    events = [ev("response.created", response=started), ev("response.in_progress", response=started),
              ev("response.output_item.added", output_index=0, item=item0),
              ev("response.content_part.added", **where, content_index=0, part={**text_part, "text": ""})]
    events += [ev("response.output_text.delta", **where, content_index=0, delta=p, logprobs=[])
               for p in ANSWER_PIECES]
    events += [ev("response.output_text.done", **where, content_index=0, text=ANSWER, logprobs=[]),
               ev("response.content_part.done", **where, content_index=0, part=text_part),
               ev("response.output_item.done", output_index=0, item=message),
               ev("response.completed", response=resp)]
    return events


def responses_ws_events(body: dict, model: str, u: dict[str, int]) -> list[dict]:
    """One turn of the Responses API's WebSocket mode: the streamed event sequence, as JSON objects."""
    ans = answer_responses(body, model, u, stream=False)
    resp = ans.body
    message = resp["output"][0]
    return _responses_events(resp, message, message["content"][0])


def _embedding(i: int, dims: int, fmt: str | None) -> Any:
    vec = [round(((i + 1) * (j + 1) % 7) / 7 - 0.5, 4) for j in range(dims)]
    return base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if fmt == "base64" else vec


def answer_embeddings(body: dict, model: str, u: dict[str, int], stream: bool) -> Answer:
    dims = int(body.get("dimensions") or EMBEDDING_DIMS)
    data = [{"object": "embedding", "index": i, "embedding": _embedding(i, dims, body.get("encoding_format"))}
            for i in range(max(1, count_items(EMBEDDINGS, body)))]
    return Answer({"object": "list", "data": data, "model": model,
                   "usage": {"prompt_tokens": u["input_tokens"], "total_tokens": u["input_tokens"]}})


def answer_messages(body: dict, model: str, u: dict[str, int], stream: bool) -> Answer:
    msg = {"id": f"msg_standin{next(_ids):06d}", "type": "message", "role": "assistant", "model": model,
           "content": [{"type": "text", "text": ANSWER}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": _anthropic_usage(u)}
    if not stream:
        return Answer(msg)

    def ev(kind: str, **data: Any) -> bytes:
        return _sse({"type": kind, **data}, event=kind)

    start = {**msg, "content": [], "stop_reason": None, "usage": _anthropic_usage(u, output_tokens=1)}
    final = {k: v for k, v in _anthropic_usage(u).items() if k not in ("cache_creation", "service_tier")}
    frames = [ev("message_start", message=start),
              ev("content_block_start", index=0, content_block={"type": "text", "text": ""}), ev("ping")]
    frames += [ev("content_block_delta", index=0, delta={"type": "text_delta", "text": p}) for p in ANSWER_PIECES]
    frames += [ev("content_block_stop", index=0),
               ev("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage=final),
               ev("message_stop")]
    return Answer(frames=frames, content_type="text/event-stream; charset=utf-8")


def answer_gemini(model: str, u: dict[str, int], stream: bool, sse: bool) -> Answer:
    rid = f"standin{next(_ids):06d}"

    def resp(text: str, final: bool) -> dict:
        cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if final:
            cand["finishReason"] = "STOP"
        return {"candidates": [cand], "usageMetadata": _gemini_usage(u, final), "modelVersion": model,
                "responseId": rid}

    if not stream:
        return Answer(resp(ANSWER, True))
    last = len(ANSWER_PIECES) - 1
    objs = [resp(p, i == last) for i, p in enumerate(ANSWER_PIECES)]
    if sse:  # Google ends SSE lines with CRLF
        return Answer(frames=[_sse(o, eol="\r\n") for o in objs], content_type="text/event-stream")
    # Without alt=sse the stream is one JSON array, written element by element.
    frames = [(b"[" if i == 0 else b",\r\n") + json.dumps(o, indent=2).encode() for i, o in enumerate(objs)]
    frames.append(b"]")
    return Answer(frames=frames, content_type="application/json; charset=UTF-8")


def models_list(api: str, model_id: str | None) -> dict:
    """A models list (or, given an id, one model) in the OpenAI, Anthropic or Gemini shape."""
    if api == ANTHROPIC_MODELS:
        one = lambda m: {"type": "model", "id": m, "display_name": m,  # noqa: E731
                         "created_at": "2025-01-01T00:00:00Z"}
        data = [one(m) for m in MODELS["anthropic"]]
        return one(model_id) if model_id else {"data": data, "has_more": False, "first_id": data[0]["id"],
                                                "last_id": data[-1]["id"]}
    if api == GEMINI_MODELS:
        one = lambda m: {"name": f"models/{m}", "displayName": m, "inputTokenLimit": 1048576,  # noqa: E731
                         "outputTokenLimit": 65536, "supportedGenerationMethods": ["generateContent", "countTokens"]}
        return one(model_id) if model_id else {"models": [one(m) for m in MODELS["gemini"]]}
    one = lambda m: {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"}  # noqa: E731
    return one(model_id) if model_id else {"object": "list", "data": [one(m) for ms in MODELS.values() for m in ms]}


# ---------------------------------------------------------------- native errors
_OPENAI_ERR = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
               403: ("invalid_request_error", "unsupported_country_region_territory"),
               404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded")}
_ANTHROPIC_ERR = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                  404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                  503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def error_body(flavour: str, status: int, message: str, reason: str | None = None) -> dict:
    """The error body each provider sends for ``status``; SDKs map these to their own exception types."""
    if flavour == "anthropic":
        kind = _ANTHROPIC_ERR.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message},
                "request_id": f"req_standin{next(_ids):06d}"}
    if flavour == "gemini":
        err: dict[str, Any] = {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}
        if reason:
            err["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                               "domain": "googleapis.com",
                               "metadata": {"service": "generativelanguage.googleapis.com"}}]
        return {"error": err}
    if flavour == "azure" and status == 401:
        return {"error": {"code": "401", "message": message}}
    kind, code = _OPENAI_ERR.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# ---------------------------------------------------------------- routing and credentials
@dataclass(frozen=True, slots=True)
class Route:
    segment: str | None  # the provider path segment as sent, if any
    provider: str  # segment, or inferred from the path shape
    api: str  # one of the wire API names above
    path_model: str | None  # Gemini model / Azure deployment / model id in the path
    flavour: str  # error format: openai | azure | anthropic | gemini
    auth: str  # bearer | api-key | x-api-key | goog


_GEMINI_PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|countTokens)$")
_AZURE_DEP = re.compile(r"^/openai/deployments/([^/]+)/")
_MODEL_ID = re.compile(r"/models/([^/:]+)$")


def route(method: str, path: str, headers: dict[str, str]) -> Route | None:
    """Which provider and wire API a request is for; None when the stand-in has no such endpoint."""
    parts = path.split("/", 2)  # ["", first, rest]
    first = parts[1] if len(parts) > 1 else ""
    segment = None
    rest = path
    if first and first not in _NOT_PROVIDERS and not (first == "openai" and path.startswith("/openai/deployments/")):
        segment, rest = first, "/" + (parts[2] if len(parts) > 2 else "")
    azure_dep = _AZURE_DEP.match(rest)
    gem = _GEMINI_PATH.search(rest)
    if segment:
        provider = segment
    elif azure_dep:
        provider = "azure"
    elif gem or rest.startswith(("/v1beta/", "/v1alpha/")):
        provider = "gemini"
    elif rest.startswith("/v1/messages"):
        provider = "anthropic"
    else:
        provider = "openai"
    flavour, auth = ("azure", "api-key") if provider == "azure" else ("openai", "bearer")
    path_model = azure_dep.group(1) if azure_dep else None

    if method == "POST":
        if gem:
            api = {"generateContent": GENERATE, "streamGenerateContent": STREAM_GENERATE,
                   "countTokens": GEMINI_COUNT}[gem.group(2)]
            return Route(segment, provider, api, gem.group(1), "gemini", "goog")
        if rest.endswith("/messages") or rest.endswith("/messages/count_tokens"):
            api = MESSAGES if rest.endswith("/messages") else ANTHROPIC_COUNT
            return Route(segment, provider, api, None, "anthropic", "x-api-key")
        if rest.endswith("/audio/transcriptions"):
            return Route(segment, provider, TRANSCRIPTIONS, None, flavour, auth)
        for suffix, api in (("/chat/completions", CHAT), ("/completions", COMPLETIONS),
                            ("/responses", RESPONSES), ("/embeddings", EMBEDDINGS)):
            if rest.endswith(suffix):
                return Route(segment, provider, api, path_model, flavour, auth)
        return None
    if method == "GET" and rest.endswith("/realtime") and "websocket" in headers.get("upgrade", "").lower():
        return Route(segment, provider, REALTIME, None, flavour, auth)
    if method == "GET" and rest.endswith("/responses") and "websocket" in headers.get("upgrade", "").lower():
        return Route(segment, provider, RESPONSES_WS, None, flavour, auth)
    if method == "GET" and (rest.endswith("/models") or _MODEL_ID.search(rest)):
        m = _MODEL_ID.search(rest)
        model_id = m.group(1) if m else None
        if provider == "gemini" and rest.startswith(("/v1beta/models", "/v1/models")):
            return Route(segment, provider, GEMINI_MODELS, model_id, "gemini", "goog")
        if "anthropic-version" in headers:
            return Route(segment, provider, ANTHROPIC_MODELS, model_id, "anthropic", "x-api-key")
        return Route(segment, provider, OPENAI_MODELS, model_id, flavour, auth)
    return None


def presented_key(r: Route, headers: dict[str, str], query: dict[str, str]) -> str | None:
    """The credential from the place this provider's real API reads it."""
    if r.auth == "x-api-key" and "x-api-key" in headers:
        return headers["x-api-key"]
    if r.auth == "goog":
        return headers.get("x-goog-api-key") or query.get("key")
    if r.auth == "api-key" and "api-key" in headers:
        return headers["api-key"]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def auth_error(r: Route, key: str | None, real_keys: dict[str, str]) -> tuple[int, dict] | None:
    """None when ``key`` is the real key for the route's provider, else the native refusal."""
    family = {"anthropic": "anthropic", "gemini": "gemini"}.get(r.flavour, "openai")
    real = real_keys.get(r.provider) or real_keys.get(family)
    if key and real and key == real:
        return None
    if r.flavour == "anthropic":
        msg = "x-api-key header is required" if not key else "invalid x-api-key"
        return 401, error_body("anthropic", 401, msg)
    if r.flavour == "gemini":
        if not key:
            return 403, error_body("gemini", 403, "Method doesn't allow unregistered callers (callers without "
                                   "established identity). Please use API Key or other form of API consumer "
                                   "identity to call this API.")
        return 400, error_body("gemini", 400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID")
    if r.flavour == "azure":
        return 401, error_body("azure", 401, "Access denied due to invalid subscription key or wrong API endpoint. "
                               "Make sure to provide a valid key for an active subscription and use a correct "
                               "regional API endpoint for your resource.")
    if not key:
        return 401, {"error": {"message": "You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                               "type": "invalid_request_error", "param": None, "code": None}}
    return 401, error_body("openai", 401, "Incorrect API key provided. You can find your API key at "
                           "https://platform.openai.com/account/api-keys.")


# ---------------------------------------------------------------- the recorded request
@dataclass(slots=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    time: float
    provider: str | None = None  # the provider path segment, None for a bare path
    api: str | None = None  # wire API (see expected_usage), None when unrouted
    model: str | None = None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["body"] = self.body.decode("utf-8", "replace")
        return d


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
    """One HTTP/1.1 request (Content-Length or chunked body, ``Expect: 100-continue``); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise _BadRequest("truncated head") from e
        return None
    except asyncio.LimitOverrunError as e:
        raise _BadRequest("head too large") from e
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError as e:
        raise _BadRequest(lines[0]) from e
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.readexactly(int(headers.get("content-length") or 0))
    conn = headers.get("connection", "").lower()
    keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
    return _Request(method.upper(), target, version, headers, body, keep)


def _json_object(raw: bytes) -> tuple[dict[str, Any], bool]:
    """The request body as a JSON object ({} when empty), and whether it failed to parse."""
    if not raw:
        return {}, False
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):  # too deeply nested is unparseable too (a real API answers 400)
        return {}, True
    return (parsed, False) if isinstance(parsed, dict) else ({}, True)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return {529: "Overloaded"}.get(status, "Unknown")


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# ---------------------------------------------------------------- broken answers and other inputs
def _decode_body(raw: bytes, encoding: str) -> bytes:
    """A request body without its Content-Encoding; ValueError when it cannot be decoded."""
    enc = encoding.strip().lower()
    if not raw or enc in ("", "identity"):
        return raw
    try:
        if enc in ("gzip", "x-gzip"):
            return gzip.decompress(raw)
        if enc == "deflate":
            return zlib.decompress(raw)
        if enc == "br":
            import brotli  # a mitmproxy dependency
            return brotli.decompress(raw)
        if enc == "zstd":
            try:
                from compression import zstd  # type: ignore[import-not-found]  # Python 3.14
            except ImportError:
                from backports import zstd  # type: ignore[no-redef]  # a mitmproxy dependency
            return zstd.decompress(raw)
    except Exception as e:
        raise ValueError(f"undecodable {enc} body") from e
    raise ValueError(f"unsupported content-encoding {encoding!r}")


_PART = re.compile(rb'Content-Disposition:[^\r\n]*?\bname="([^"]*)"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n', re.I)


def _multipart_fields(raw: bytes, content_type: str) -> dict[str, Any]:
    """A multipart/form-data body's fields: text parts as str, file parts as their byte size."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return {}
    out: dict[str, Any] = {}
    for part in raw.split(b"--" + m.group(1).encode())[1:]:
        head = _PART.search(part)
        if head is None:
            continue
        value = part[head.end():].removesuffix(b"\r\n")
        out[head.group(1).decode()] = len(value) if b"filename=" in head.group(0) else value.decode("utf-8", "replace")
    return out


_OUTPUT_COUNTS = frozenset({"completion_tokens", "output_tokens", "candidatesTokenCount"})


def _spoil_counts(obj: Any, only: frozenset[str] | None, key: str = "") -> Any:
    """Numbers become strings ("11 tokens"): all of them, or only those under the keys in `only`."""
    if isinstance(obj, dict):
        return {k: _spoil_counts(v, only, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_spoil_counts(v, only, key) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and (only is None or key in only):
        return f"{obj} tokens"
    return obj


def _mangle_usage(obj: Any, k: Knobs) -> Any:
    """Apply -nousage / -badusage / -badout to every usage object inside a JSON value."""
    if not (k.no_usage or k.bad_usage or k.bad_out):
        return obj
    if isinstance(obj, list):
        return [_mangle_usage(v, k) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for key, v in obj.items():
        if key in ("usage", "usageMetadata") and isinstance(v, dict):
            if k.no_usage:
                continue
            v = _spoil_counts(v, None if k.bad_usage else _OUTPUT_COUNTS)
        else:
            v = _mangle_usage(v, k)
        out[key] = v
    return out


_SSE_DATA = re.compile(rb"^data: ?(.*?)(\r?\n)", re.M)


def _spoil_frame(frame: bytes, k: Knobs) -> bytes | None:
    """One SSE frame with its data spoiled as the knobs say; None drops the frame."""
    m = _SSE_DATA.search(frame)
    if m is None or m.group(1) == b"[DONE]":
        return frame
    data = m.group(1)
    if k.not_json:
        new = data[: len(data) // 2]
    else:
        try:
            obj = json.loads(data)
        except ValueError:
            return frame
        if k.no_usage and isinstance(obj, dict) and isinstance(obj.get("usage"), dict) and obj.get("choices") == []:
            return None  # OpenAI's usage-only chunk has nothing else to say
        new = json.dumps(_mangle_usage(obj, k), separators=(",", ":")).encode()
    return frame[: m.start(1)] + new + frame[m.end(1):]


def _spoil_answer(ans: Answer, k: Knobs) -> Answer:
    if not (k.not_json or k.no_usage or k.bad_usage or k.bad_out):
        return ans
    if ans.frames is None:
        if k.not_json:
            return Answer(b"<html><body><h1>upstream hiccup</h1></body></html>\n", content_type=ans.content_type)
        return Answer(_mangle_usage(ans.body, k), content_type=ans.content_type)
    if "event-stream" not in ans.content_type:
        return ans  # Gemini's JSON-array stream: left as it is
    frames = [f for f in (_spoil_frame(f, k) for f in ans.frames) if f is not None]
    return Answer(frames=frames, content_type=ans.content_type)


# ---------------------------------------------------------------- WebSocket (OpenAI Realtime)
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _ws_accept(key: str) -> str:
    import hashlib

    return base64.b64encode(hashlib.sha1(key.strip().encode() + _WS_GUID).digest()).decode()


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


async def _ws_read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """(fin, opcode, payload) of one client frame (masked, as clients must send them)."""
    b1, b2 = await reader.readexactly(2)
    n = b2 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if b2 & 0x80 else b"\0\0\0\0"
    data = await reader.readexactly(n)
    if b2 & 0x80:
        m = (mask * (n // 4 + 1))[:n]  # XOR as one big integer: a per-byte loop is slow for large events
        data = (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
    return bool(b1 & 0x80), b1 & 0x0F, data


async def _ws_read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of one whole client message, its fragments (continuation frames) joined: a proxy
    re-fragments a message it edits. Control frames between fragments are returned as they come."""
    opcode, parts = None, []
    while True:
        fin, op, data = await _ws_read_frame(reader)
        if op >= 0x8:
            return op, data
        if op != 0x0:
            opcode = op
        parts.append(data)
        if fin:
            return opcode if opcode is not None else 0x1, b"".join(parts)


_ANSWERS = {CHAT: answer_chat, COMPLETIONS: answer_completions, RESPONSES: answer_responses,
            EMBEDDINGS: answer_embeddings, MESSAGES: answer_messages}


class Standin:
    """The stand-in server; runs its asyncio loop on a daemon thread so tests can use it in-process."""

    def __init__(self, real_keys: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0):
        if real_keys is None:
            env = os.environ.get("STANDIN_REAL_KEYS")
            real_keys = json.loads(env) if env else dict(DEFAULT_REAL_KEYS)
        self.real_keys = real_keys
        self.host, self.port = host, port
        self._records: list[Recorded] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.Task, asyncio.StreamWriter]] = set()

    # -- lifecycle
    def start(self) -> int:
        """Listen (port 0 picks a free one) and return the port once connections are accepted."""
        ready, failure = threading.Event(), []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve_conn, self.host, self.port, limit=_MAX_HEAD, backlog=512))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # surfaced to start()'s caller
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="standin", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self.port

    def stop(self) -> None:
        """Stop listening, cut every open connection (hung ones included) and end the loop thread."""
        if not self._loop or not self._thread:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server:
            self._server.close()
        for task, writer in list(self._conns):
            writer.transport.abort()
            task.cancel()
        if self._conns:
            await asyncio.wait([t for t, _ in self._conns], timeout=5)
        if self._server:
            await self._server.wait_closed()

    def __enter__(self) -> Standin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, provider: str | None = None) -> str:
        """Base URL, optionally with a provider segment: ``url("openai") + "/v1"`` is an OpenAI base_url."""
        return f"http://{self.host}:{self.port}" + (f"/{provider}" if provider else "")

    # -- recorded requests
    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    # -- HTTP
    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        entry = (asyncio.current_task(), writer)
        self._conns.add(entry)  # type: ignore[arg-type]
        try:
            while (req := await _read_request(reader, writer)) is not None:
                if not await self._handle(req, reader, writer) or not req.keep_alive:
                    break
        except (_BadRequest, ValueError):
            writer.write(_head(400, {"content-length": "0", "connection": "close"}))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(entry)  # type: ignore[arg-type]
            writer.close()

    async def _handle(self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        parts = urlsplit(req.target)
        path = parts.path
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if path.startswith("/_standin/"):
            return await self._control(req, path, writer)

        r = route(req.method, path, req.headers)
        try:
            raw = _decode_body(req.body, req.headers.get("content-encoding", ""))
        except ValueError:
            raw, undecodable = b"", True
        else:
            undecodable = False
        body, bad_json = _json_object(raw)
        if r is not None and r.api == TRANSCRIPTIONS:
            body, bad_json = _multipart_fields(raw, req.headers.get("content-type", "")), False
        model = str(body.get("model") or (r.path_model if r else "")
                    or (query.get("model") if r is not None and r.api == REALTIME else "") or "")
        rec = Recorded(req.method, path, query, dict(req.headers), req.body, time.time(),
                       provider=r.segment if r else None, api=r.api if r else None, model=model or None)
        with self._lock:
            self._records.append(rec)
        k = knobs(model)
        send = functools.partial(self._send, writer, gz=k.gzip, keep=req.keep_alive)

        if r is None:
            flavour = "anthropic" if "anthropic-version" in req.headers else "gemini" if "v1beta" in path else "openai"
            return await send(404, error_body(flavour, 404, f"Invalid URL ({req.method} {path})"))
        if refusal := auth_error(r, presented_key(r, req.headers, query), self.real_keys):
            return await send(*refusal)
        if undecodable:
            return await send(400, error_body(r.flavour, 400, "We could not decode the body of your request "
                                              f"(content-encoding {req.headers.get('content-encoding')!r})."))
        if bad_json:
            return await send(400, error_body(r.flavour, 400, "We could not parse the JSON body of your request."))
        if r.api in (REALTIME, RESPONSES_WS):
            return await self._websocket(req, r, reader, writer, model)
        if r.api in (OPENAI_MODELS, ANTHROPIC_MODELS, GEMINI_MODELS):
            return await send(200, models_list(r.api, r.path_model))
        if not model:
            return await send(400, error_body(r.flavour, 400, "you must provide a model parameter"))
        if r.flavour == "anthropic":
            if "anthropic-version" not in req.headers:
                return await send(400, error_body("anthropic", 400, "anthropic-version: header is required"))
            if r.api == MESSAGES and not isinstance(body.get("max_tokens"), int):
                return await send(400, error_body("anthropic", 400, "max_tokens: Field required"))

        if k.delay_ms:
            await asyncio.sleep(k.delay_ms / 1000)
        if k.hang:
            while await reader.read(65536):  # until the client gives up
                pass
            return False
        if k.error:
            extra = {"retry-after": "1"} if k.error == 429 else {}
            return await send(k.error, error_body(r.flavour, k.error, f"Stand-in error {k.error} for {model}"), extra)

        u = expected_usage(r.api, body, model)
        if r.api == TRANSCRIPTIONS:
            if "file" not in body:
                return await send(400, error_body(r.flavour, 400, "file: a multipart 'file' part is required"))
            return await send(200, _mangle_usage({"text": ANSWER, "usage": {
                "type": "tokens", "input_tokens": u["input_tokens"],
                "input_token_details": {"text_tokens": 0, "audio_tokens": u["input_tokens"]},
                "output_tokens": u["output_tokens"], "total_tokens": u["input_tokens"] + u["output_tokens"]}}, k))
        if r.api == ANTHROPIC_COUNT:
            return await send(200, {"input_tokens": u["input_tokens"]})
        if r.api == GEMINI_COUNT:
            return await send(200, {"totalTokens": u["input_tokens"]})
        if r.api in (GENERATE, STREAM_GENERATE):
            ans = answer_gemini(model, u, r.api == STREAM_GENERATE, query.get("alt") == "sse")
        else:
            ans = _ANSWERS[r.api](body, model, u, bool(body.get("stream")) and r.api != EMBEDDINGS)
        rid = f"req_standin{next(_ids):06d}"
        extra = ({"request-id": rid} if r.flavour == "anthropic" else {} if r.flavour == "gemini"
                 else {"x-request-id": rid, "openai-processing-ms": "1"})
        ans = _spoil_answer(ans, k)
        if ans.frames is None:
            return await send(200, ans.body, extra, die=k.die, truncate=k.truncate, content_type=ans.content_type)
        return await self._stream(writer, ans, extra, k)

    async def _send(self, writer: asyncio.StreamWriter, status: int, obj: Any, extra: dict[str, str] | None = None,
                    *, gz: bool = False, keep: bool = True, die: bool = False, truncate: bool = False,
                    content_type: str = "application/json") -> bool:
        payload = obj if isinstance(obj, bytes) else json.dumps(obj, indent=2).encode() + b"\n"
        if truncate:
            payload = payload[: len(payload) // 2]
        headers = {"content-type": content_type, **(extra or {})}
        if gz:
            payload = gzip.compress(payload, mtime=0)
            headers["content-encoding"] = "gzip"
        headers["content-length"] = str(len(payload))
        if not keep:
            headers["connection"] = "close"
        writer.write(_head(status, headers) + (payload[: len(payload) // 2] if die else payload))
        await writer.drain()
        return keep and not die

    async def _stream(self, writer: asyncio.StreamWriter, ans: Answer, extra: dict[str, str], k: Knobs) -> bool:
        """Write each frame as its own chunk and flush it, pacing between them; cut short for ``-die``."""
        if k.length:
            return await self._send(writer, 200, b"".join(ans.frames or []), extra, gz=k.gzip,
                                    content_type=ans.content_type)
        headers = {"content-type": ans.content_type, "cache-control": "no-cache", **extra,
                   "transfer-encoding": "chunked"}
        comp = None
        if k.gzip:
            comp = zlib.compressobj(wbits=31)  # gzip container
            headers["content-encoding"] = "gzip"
        writer.write(_head(200, headers))
        frames = ans.frames or []
        for i, frame in enumerate(frames):
            if i and k.pace_ms:
                await asyncio.sleep(k.pace_ms / 1000)
            if k.die and i == 2:
                return False  # closing now leaves the chunked body unfinished: the client sees a cut stream
            if k.truncate and i == 2:
                frame = frame[: len(frame) // 2]  # half an event, then a clean end of the body
            data = comp.compress(frame) + comp.flush(zlib.Z_SYNC_FLUSH) if comp else frame
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            if k.truncate and i == 2:
                break
        tail = comp.flush() if comp else b""
        writer.write((b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _websocket(self, req: _Request, r: Route, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, model: str) -> bool:
        """A WebSocket session (see the module docstring): OpenAI Realtime, or the Responses API's WebSocket
        mode. Every client text event is recorded (method "WS"); each response.create is answered in its own
        task (Realtime answers may overlap; Responses mode answers one at a time, as OpenAI does). Always ends
        the connection."""
        key = req.headers.get("sec-websocket-key")
        if not key:
            return await self._send(writer, 400, error_body("openai", 400, "Sec-WebSocket-Key is required"),
                                    keep=False)
        writer.write(_head(101, {"upgrade": "websocket", "connection": "Upgrade",
                                 "sec-websocket-accept": _ws_accept(key)}))
        realtime = r.api == REALTIME
        path = urlsplit(req.target).path
        lanes: dict[Any, asyncio.Lock] = {}  # Responses mode: one lane per stream_id, answered in order
        tasks: set[asyncio.Task] = set()

        def event(obj: dict) -> None:
            if not writer.is_closing():
                writer.write(_ws_frame(0x1, json.dumps(obj, separators=(",", ":")).encode()))

        if realtime:
            event({"type": "session.created", "event_id": f"event_{next(_ids)}",
                   "session": {"id": f"sess_standin{next(_ids):06d}", "object": "realtime.session", "model": model}})
            await writer.drain()
        try:
            while True:
                opcode, data = await _ws_read_message(reader)
                if opcode == 0x8:  # close: answer it and end
                    writer.write(_ws_frame(0x8, data[:2]))
                    await writer.drain()
                    return False
                if opcode == 0x9:  # ping
                    writer.write(_ws_frame(0xA, data))
                    await writer.drain()
                    continue
                if opcode != 0x1:
                    continue
                try:
                    msg = json.loads(data)
                except ValueError:
                    msg = None
                if not isinstance(msg, dict):
                    event({"type": "error", "status": 400, "error": {
                        "type": "invalid_request_error", "code": "invalid_json", "message": "Invalid JSON", "param": None}})
                    await writer.drain()
                    continue
                body = (msg.get("response") or {}) if realtime else msg
                turn_model = str((body.get("model") if isinstance(body, dict) else None) or model or "")
                with self._lock:
                    self._records.append(Recorded("WS", path, {}, {}, data, time.time(), provider=r.segment,
                                                  api=WS_EVENT, model=turn_model or None))
                if msg.get("type") != "response.create":
                    continue
                lane = msg.get("stream_id")
                turn = self._realtime_turn(event, writer, msg, turn_model) if realtime else \
                    self._responses_turn(event, writer, body, turn_model,
                                         lanes.setdefault(lane, asyncio.Lock()), lane)
                t = asyncio.ensure_future(turn)
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        finally:
            for t in tasks:
                t.cancel()

    async def _responses_turn(self, send, writer: asyncio.StreamWriter, body: dict, model: str,
                              lock: asyncio.Lock, lane: Any) -> None:
        k = knobs(model)

        def event(obj: dict) -> None:  # every event of a lane echoes its stream_id, as OpenAI's do
            send({**obj, "stream_id": lane} if isinstance(lane, str) else obj)

        async with lock:
            if not model:
                event({"type": "error", "status": 400, "error": {"type": "invalid_request_error",
                       "code": "missing_required_parameter", "message": "Missing required parameter: 'model'.",
                       "param": "model"}})
                return
            if k.delay_ms:
                await asyncio.sleep(k.delay_ms / 1000)
            if k.hang:
                await asyncio.Event().wait()
            if k.error:
                event({"type": "error", "status": k.error, "error": {
                    "type": "invalid_request_error" if k.error < 500 else "server_error",
                    "code": "rate_limit_exceeded" if k.error == 429 else None,
                    "message": f"Stand-in error {k.error} for {model}", "param": None}})
                await writer.drain()
                return
            u = expected_usage(RESPONSES, body, model)
            events = responses_ws_events(body, model, u)
            if body.get("generate") is False:  # a prewarm (Codex sends one first): input read, nothing generated
                done = events[-1]["response"]
                done.update(output=[], usage=_responses_usage({**u, "output_tokens": 0, "reasoning_tokens": 0}))
                events = [events[0], events[-1]]
            if k.no_usage:
                events[-1]["response"]["usage"] = None
            for i, obj in enumerate(events):
                if i and k.pace_ms:
                    await asyncio.sleep(k.pace_ms / 1000)
                if k.die and i == 2:
                    writer.transport.abort()  # the provider goes away mid-turn (no close frame)
                    return
                event(obj)
                await writer.drain()

    async def _realtime_turn(self, event, writer: asyncio.StreamWriter, msg: dict, model: str) -> None:
        k = knobs(model)
        u = expected_usage(CHAT, {"messages": [{}]}, model)
        rid = f"resp_standin{next(_ids):06d}"
        event({"type": "response.created", "response": {"id": rid, "status": "in_progress"}})
        for i, p in enumerate(ANSWER_PIECES):
            if k.pace_ms:
                await asyncio.sleep(k.pace_ms / 1000)
            event({"type": "response.output_text.delta", "response_id": rid, "delta": p})
            await writer.drain()
        event({"type": "response.done", "response": {
            "id": rid, "object": "realtime.response", "status": "completed",
            "usage": {"total_tokens": u["input_tokens"] + u["output_tokens"], "input_tokens": u["input_tokens"],
                      "output_tokens": u["output_tokens"],
                      "input_token_details": {"cached_tokens": u["cached_input_tokens"],
                                              "text_tokens": u["input_tokens"], "audio_tokens": 0},
                      "output_token_details": {"text_tokens": u["output_tokens"], "audio_tokens": 0}}}})
        await writer.drain()

    async def _control(self, req: _Request, path: str, writer: asyncio.StreamWriter) -> bool:
        if req.method == "GET" and path == "/_standin/requests":
            return await self._send(writer, 200, [r.to_dict() for r in self.requests], keep=req.keep_alive)
        if req.method == "POST" and path == "/_standin/clear":
            self.clear()
            return await self._send(writer, 200, {"cleared": True}, keep=req.keep_alive)
        if path == "/_standin/health":
            return await self._send(writer, 200, {"ok": True}, keep=req.keep_alive)
        return await self._send(writer, 404, {"error": f"no control endpoint {req.method} {path}"}, keep=req.keep_alive)


def iter_sse(raw: bytes) -> Iterator[tuple[str | None, str]]:
    """(event, data) pairs of an SSE body — a small helper for tests that read raw streams."""
    for block in re.split(rb"\r?\n\r?\n", raw):
        event, data = None, []
        for line in block.decode().splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            yield event, "\n".join(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stand-in LLM provider for tollgate's end-to-end tests.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the listening port here once ready")
    ap.add_argument("--real-keys", help='JSON object provider → real key (else $STANDIN_REAL_KEYS, else defaults)')
    args = ap.parse_args(argv)
    server = Standin(json.loads(args.real_keys) if args.real_keys else None, args.host, args.port)
    port = server.start()
    if args.port_file:  # written then renamed, so a poller never reads half a number
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"standin listening on http://{args.host}:{port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
