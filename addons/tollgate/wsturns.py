"""The turns of one WebSocket session: each `response.create` a client sends is one metered request.

OpenAI's Responses API in WebSocket mode (`GET /v1/responses` upgraded; also xAI and other OpenAI-compatible
servers) and the Realtime API (`/v1/realtime`) keep one socket open for many responses. The addon admits
every `response.create` like a POST (same admission: key, limits, budgets) and writes a ledger row for every
turn that ends. This module is the per-socket bookkeeping that needs no mitmproxy: reading client events,
matching server events to the turns they belong to, the usage of a finished turn, the text produced so far
(for estimating a cut one) and the provider's own `error` event for a refused turn.

Matching: a turn is *pending* from its `response.create` until the server's `response.created`, which names
its response id. The server answers the creates of one lane in order (Responses: one lane per `stream_id`,
which every event of it echoes; Realtime: one lane), so pending turns are matched in order. Events that
name no response (Responses deltas) belong to their lane's response in progress; Realtime events name it
(`response_id`), which tells apart responses running at once.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import providers as prov
from .usage import Usage

RESPONSES, REALTIME = "responses", "realtime"
FINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "response.cancelled",
                   "response.done"})
_LEADING_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]*)"')
_RESPONSE_ID = re.compile(rb'"response_id"\s*:\s*"([^"\\]*)"')
# OpenAI's compact response.created: {"type":...,"sequence_number":N,"response":{"id":"resp_..."
_CREATED_ID = re.compile(rb'\{"type":"response\.created",(?:"sequence_number":\d+,)?"response":\{"id":"([^"\\]*)"')
_FINAL_HEAD = re.compile(rb'\{"type":"response\.(?:completed|incomplete|cancelled|done)",(?:"sequence_number":\d+,)?'
                         rb'"response":\{"id":"([^"\\]*)"')
_STATUS = re.compile(rb'"status":"([a-z_]+)"')
_MODEL = re.compile(rb'"model":"([^"\\]*)"')
_DECODER = json.JSONDecoder()
_STREAM_ID = re.compile(rb'"stream_id"\s*:\s*"([^"\\]*)"')
_MATTERS = frozenset({b"response.created", b"error", *(t.encode() for t in FINAL)})
_TEXT_CAP = 4_000_000  # bytes of delta events kept per turn for estimating a cut one
_event_ids = itertools.count(1)


def mode_for(wire: str, path: str) -> str | None:
    """Which turn protocol a WebSocket on this path speaks; None when the gateway cannot meter it."""
    if wire not in ("openai", "azure"):
        return None
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith("/responses"):
        return RESPONSES
    if p.endswith("/realtime"):
        return REALTIME
    return None


# --- client events -------------------------------------------------------------------------------------


@dataclass(slots=True)
class ClientEvent:
    """A client event that matters: a `response.create` (body = the response's parameters) or bad input."""

    body: dict | None = None
    event_id: str | None = None  # the client's own event_id (Realtime echoes it in errors)
    stream_id: str | None = None  # the Responses WebSocket lane
    error: str | None = None  # why it cannot be forwarded; None for a response.create


_UNPARSED = object()


def read_client(content: bytes, is_text: bool, mode: str, data: Any = _UNPARSED) -> ClientEvent | None:
    """None for a client event to forward untouched; a ClientEvent for a turn or for input to refuse.

    Everything the gateway cannot read is refused rather than forwarded: a provider that read it differently
    could start a response nobody admitted. `data`: the content already parsed (a large event, off the loop).
    """
    if not is_text:
        return ClientEvent(error="binary WebSocket frames are not accepted: client events are JSON text")
    if data is _UNPARSED:
        data = prov.loads(content)
    if not isinstance(data, dict):
        return ClientEvent(error="a client event must be a JSON object with a \"type\"")
    etype = data.get("type")
    if not isinstance(etype, str):
        return ClientEvent(error="a client event must have a string \"type\"")
    if etype != "response.create" and (b'"response.create"' in content or b"\\u" in content):
        # A duplicated "type" reads as its last value here; a provider that takes the first would start a
        # response nobody admitted. (The strict parse is slow, so only for events that could be such.)
        if _top_level_count(content, "type") > 1:
            return ClientEvent(error="a client event must have exactly one \"type\"")
    if etype != "response.create":
        return None
    body = data if mode == RESPONSES else data.get("response", {})
    if not isinstance(body, dict):
        return ClientEvent(error="response.create: \"response\" must be an object")
    eid, sid = data.get("event_id"), data.get("stream_id")
    return ClientEvent(body=body, event_id=eid if isinstance(eid, str) else None,
                       stream_id=sid if isinstance(sid, str) and mode == RESPONSES else None)


def _top_level_count(content: bytes, key: str) -> int:
    top: list = []

    def hook(pairs: list) -> dict:
        top[:] = pairs  # the outermost object is the last one finished
        return dict(pairs)

    try:
        json.loads(content, object_pairs_hook=hook)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 2  # unreadable by the stricter parser: treat as ambiguous
    return sum(1 for k, _ in top if k == key)


def with_event_id(content: bytes) -> tuple[bytes, str]:
    """A Realtime response.create given an event_id (spliced in first), so an error about it can be matched."""
    eid = f"tollgate_evt_{next(_event_ids)}"
    i = content.index(b"{") + 1
    return content[:i] + b'"event_id":"' + eid.encode() + b'",' + content[i:], eid


def error_event(mode: str, status: int, error: dict, event_id: str | None = None) -> bytes:
    """The provider's own `error` event for a refused turn (from the HTTP refusal's `error` object)."""
    err = {k: error.get(k) for k in ("type", "code", "message", "param")}
    if mode == REALTIME:  # Realtime errors name the client event, and carry no status
        err["event_id"] = event_id
        obj: dict[str, Any] = {"type": "error", "event_id": f"event_tollgate{next(_event_ids)}", "error": err}
    else:
        obj = {"type": "error", "status": status, "error": err}
    return json.dumps(obj, separators=(",", ":")).encode()


# --- turns and the session -----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Turn:
    ex: Any  # the addon's Exchange for this turn (identity, limits, reservation, its row)
    started: float
    event_id: str | None = None
    stream_id: str | None = None  # the Responses WebSocket lane it was created on
    response_id: str | None = None
    first: float | None = None  # first server event of this turn
    ended: float | None = None
    status: str | None = None  # the final event's response status (completed, failed, incomplete, cancelled)
    usage: Usage | None = None  # provider-reported, from the final event
    response_model: str | None = None
    error: str | None = None  # an error event or a failed response's error
    error_status: int | None = None
    carried: int = 0  # tokens of earlier turns the provider holds as this turn's context (estimates only)
    parts: list[bytes] = field(default_factory=list)
    kept: int = 0

    def keep(self, raw: bytes) -> None:
        if self.kept < _TEXT_CAP:
            self.parts.append(raw)
            self.kept += len(raw)

    def output_text(self) -> str:
        """The text produced so far (text, transcripts, tool arguments), for estimating a cut turn."""
        out = []
        for raw in self.parts:
            d = prov.loads(raw)
            delta = d.get("delta") if isinstance(d, dict) else None
            if isinstance(delta, str):
                out.append(delta)
        return "".join(out)


@dataclass(slots=True)
class Step:
    """What one server event changed: turns it ended, and a response the server began on its own."""

    ended: list[Turn] = field(default_factory=list)
    unsolicited: dict | None = None  # the `response` of a response.created no response.create asked for


class _Lane:
    """Turns of one `stream_id` (Responses) lane: the server answers a lane's creates in order."""

    __slots__ = ("pending", "current")

    def __init__(self) -> None:
        self.pending: deque[Turn] = deque()  # admitted and forwarded, waiting for response.created
        self.current: Turn | None = None  # the lane's response in progress (events without an id go to it)


class Session:
    """One socket's turns in flight, and what it did in total (for the flow's summary)."""

    def __init__(self, mode: str, model: str | None, template: Any, key_hash: str | None):
        self.mode = mode
        self.model = model  # the session's model (Realtime: ?model=); Responses turns name their own
        self.template = template  # the upgrade's Exchange: provider, endpoint, who
        self.key_hash = key_hash  # to check the key again at every turn (the key itself is not kept)
        self.lanes: dict[str | None, _Lane] = {}
        self._single: _Lane | None = None  # the only lane, while there is one (the common case)
        self.running: dict[str, Turn] = {}  # by response id
        self.context = 0  # input + output tokens of the last finished turn: the conversation so far
        self.settling: list[Turn] = []  # ended, their rows about to be written (the addon's _finish_soon)
        self.turns = self.refused = 0
        self.input_tokens = self.output_tokens = 0
        self.cost: Any = None

    def turn_facts(self, body: dict) -> tuple[str | None, int | None, int]:
        """(model, max output tokens, carried context tokens) of a response.create's parameters."""
        facts = prov.request_facts("openai", "/v1/responses", body)
        max_out = facts.max_output_tokens
        if max_out is None and self.mode == REALTIME:
            max_out = prov.request_facts("openai", "/v1/chat/completions", body).max_output_tokens
        if self.mode == REALTIME:
            carried = 0 if body.get("conversation") == "none" else self.context
        else:
            carried = self.context if body.get("previous_response_id") else 0
        return facts.model or self.model, max_out, carried

    def open(self, turn: Turn) -> None:
        self._lane(turn.stream_id).pending.append(turn)

    def adopt(self, turn: Turn, response_id: str | None) -> None:
        """A turn for a response the server began without a response.create (Realtime voice activity, a
        steered successor)."""
        turn.response_id = response_id
        if response_id:
            self.running[response_id] = turn
        self._lane(turn.stream_id).current = turn

    def in_flight(self) -> list[Turn]:
        seen: dict[int, Turn] = {}
        for lane in self.lanes.values():
            for t in [*lane.pending, lane.current]:
                if t is not None and t.ended is None:
                    seen.setdefault(id(t), t)
        for t in self.running.values():
            if t.ended is None:
                seen.setdefault(id(t), t)
        return sorted(seen.values(), key=lambda t: t.started)  # in the order they were asked for

    def overdue(self, before: float) -> list[Turn]:
        """Pending turns asked for before `before` that the server never began: taken out (the caller ends
        them), so a create the provider ignores does not hold its concurrency slot for the socket's life."""
        out: list[Turn] = []
        for lane in self.lanes.values():
            while lane.pending and lane.pending[0].started < before:
                out.append(lane.pending.popleft())
        return out

    def close(self) -> list[Turn]:
        """The socket ended: every turn still in flight (to be billed for what it produced)."""
        left = self.in_flight()
        self.lanes = {}
        self._single = None
        self.running.clear()
        return left

    def _lane(self, stream_id: str | None) -> _Lane:
        lane = self.lanes.get(stream_id)
        if lane is None:
            lane = self.lanes[stream_id] = _Lane()
            self._single = lane if len(self.lanes) == 1 else None
        return lane

    def _lane_of(self, content: bytes, data: dict | None) -> _Lane:
        if len(self.lanes) == 1:
            return next(iter(self.lanes.values()))
        if data is not None:
            sid = data.get("stream_id")
        else:
            m = _STREAM_ID.search(content)
            sid = m.group(1).decode("ascii", "replace") if m else None
        return self._lane(sid if isinstance(sid, str) else None)

    def server_event(self, content: bytes, now: float | None = None) -> Step | None:
        """Feed one server event (`now`: its time, default time.time())."""
        if content.startswith(b'{"type":"'):  # providers' compact JSON: the type without a regex
            end = content.find(b'"', 9)
            raw_type = content[9:end] if end != -1 and content.find(b"\\", 9, end) == -1 else None
        else:
            m = _LEADING_TYPE.match(content)
            raw_type = m.group(1) if m is not None else None
        if raw_type is not None:
            if raw_type not in _MATTERS:
                # The bulk of the traffic (deltas, item and part events): no parse, no dict, no clock unless
                # it is the turn's first event. (Every event, in the common single-lane case, ~1 µs.)
                if len(self.running) > 1 or len(self.lanes) > 1:
                    turn = self._turn_for(content, None)
                else:
                    lane = self._single
                    turn = lane.current if lane is not None else None
                if turn is not None:
                    if turn.first is None:
                        turn.first = time.time() if now is None else now
                    if raw_type.endswith(b".delta") and (b"audio" not in raw_type or b"transcript" in raw_type):
                        turn.keep(content)
                return None
            etype = raw_type.decode("ascii", "replace")
            data = None
        else:  # "type" not first: parse (rare; providers put it first)
            data = prov.loads(content)
            etype = data.get("type") if isinstance(data, dict) else None
            if not isinstance(etype, str):
                return None
            if etype not in FINAL and etype not in ("response.created", "error"):
                turn = self._turn_for(content, data)
                if turn is not None:
                    if turn.first is None:
                        turn.first = time.time() if now is None else now
                    if etype.endswith(".delta") and ("audio" not in etype or "transcript" in etype):
                        turn.keep(content)
                return None
        if now is None:
            now = time.time()
        resp = None
        if data is None and etype != "error" and etype != "response.failed":
            # What metering reads, without parsing the response object (a final one holds the whole output)
            m = _CREATED_ID.match(content) if etype == "response.created" else None
            resp = {"id": m.group(1).decode("ascii", "replace")} if m is not None else \
                final_fields(content) if etype != "response.created" else None
        if resp is not None:
            rid = resp["id"]
            lane = self._lane_of(content, None)
        else:
            if data is None:
                data = prov.loads(content)
            if not isinstance(data, dict):
                return None
            if etype == "error":
                return self._error(content, data, now)
            resp = data.get("response")
            resp = resp if isinstance(resp, dict) else {}
            rid = resp.get("id") if isinstance(resp.get("id"), str) else None
            lane = self._lane_of(content, data)
        if etype == "response.created":
            if rid is not None and rid in self.running:
                return None
            if not lane.pending:
                return Step(unsolicited=resp)
            turn = lane.pending.popleft()
            turn.response_id = rid
            if rid:
                self.running[rid] = turn
            lane.current = turn
            if turn.first is None:
                turn.first = now
            return None
        turn = self.running.pop(rid, None) if rid else lane.current
        if turn is None or turn.ended is not None:
            return None
        turn.ended = now
        if turn.first is None:
            turn.first = now
        for ln in self.lanes.values():
            if ln.current is turn:
                ln.current = None
        status = resp.get("status")
        turn.status = status if isinstance(status, str) else etype.rsplit(".", 1)[1]
        turn.response_model = resp.get("model") if isinstance(resp.get("model"), str) else None
        turn.usage = usage_of(resp)
        if etype == "response.failed" or turn.status == "failed":
            turn.error = _error_text(resp.get("error")) or "the provider failed the response"
        if turn.usage is not None:
            self.context = turn.usage.input_tokens + turn.usage.output_tokens
        return Step(ended=[turn])

    def _turn_for(self, content: bytes, data: dict | None) -> Turn | None:
        if len(self.running) > 1:  # several responses at once: the event names its own (Realtime)
            if data is not None:
                rid = data.get("response_id")
            else:
                m = _RESPONSE_ID.search(content)
                rid = m.group(1).decode("ascii", "replace") if m else None
            t = self.running.get(rid) if isinstance(rid, str) else None
            if t is not None:
                return t
        return self._lane_of(content, data).current

    def _error(self, content: bytes, data: dict, now: float) -> Step | None:
        """An error event: it ends the turn it is about (none when it concerns another client event)."""
        err = data.get("error")
        err = err if isinstance(err, dict) else {}
        about = err.get("event_id") if isinstance(err.get("event_id"), str) else None
        turn = None
        if about is not None:
            for lane in self.lanes.values():
                for t in lane.pending:
                    if t.event_id == about:
                        turn = t
                        lane.pending.remove(t)
                        break
            if turn is None:
                return None  # about another client event (session.update, an audio append...)
        elif self.mode == RESPONSES:
            # No event ids in this API: an error before response.created refuses the lane's oldest create;
            # after it, the response in progress ended with it.
            lane = self._lane_of(content, data)
            if lane.pending:
                turn = lane.pending.popleft()
            elif lane.current is not None:
                turn, lane.current = lane.current, None
                if turn.response_id:
                    self.running.pop(turn.response_id, None)
        if turn is None:
            return None
        turn.ended = now
        turn.error = _error_text(err) or "error"
        status = data.get("status")
        turn.error_status = status if type(status) is int else None
        return Step(ended=[turn])

    def add(self, ex: Any) -> None:
        """A finished turn's row, into the socket's totals."""
        self.turns += 1
        if ex.outcome in ("unauthorized", "rate_limited", "budget_exceeded", "unpriced_model", "gateway_error") \
                and ex.usage is None:
            self.refused += 1
        if ex.usage is not None:
            self.input_tokens += ex.usage.input_tokens
            self.output_tokens += ex.usage.output_tokens
        if ex.cost is not None:
            self.cost = ex.cost if self.cost is None else self.cost + ex.cost


def final_fields(content: bytes) -> dict | None:
    """id, status, model and usage of a final event in OpenAI's compact serialization, read without parsing
    its response (whose output can be large): the id first, status and model before "output", usage after
    it, last. None when the event is not shaped so (the caller parses it whole)."""
    m = _FINAL_HEAD.match(content)
    if m is None:
        return None
    start = m.end()
    out = content.find(b'"output":', start)
    head_end = out if out != -1 else len(content)
    st = _STATUS.search(content, start, head_end)
    mo = _MODEL.search(content, start, head_end)
    i = content.rfind(b'"usage":')
    # Exactly one "usage" key (no string holds an unescaped one): else another object has a member of that
    # name — the app's own metadata could — and only the whole parse tells which one is the response's.
    if st is None or i < head_end or content.count(b'"usage":') != 1:
        return None
    try:
        usage, _ = _DECODER.raw_decode(content[i + 8:].decode("utf-8").lstrip())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(usage, dict):
        return None
    return {"id": m.group(1).decode("ascii", "replace"), "status": st.group(1).decode("ascii"),
            "model": mo.group(1).decode("utf-8", "replace") if mo is not None else None, "usage": usage}


def usage_of(resp: dict) -> Usage | None:
    """Provider-reported usage of a finished response (Responses, or Realtime's `*_token_details` names)."""
    u = resp.get("usage")
    if not isinstance(u, dict):
        return None
    if "input_token_details" in u or "output_token_details" in u:  # Realtime spells the details so
        u = dict(u)
        u.setdefault("input_tokens_details", u.get("input_token_details"))
        u.setdefault("output_tokens_details", u.get("output_token_details"))
    return prov.usage_from_json("openai", "responses", {"usage": u})


def _error_text(err: Any) -> str | None:
    if not isinstance(err, dict):
        return None
    parts = [str(err[k])[:200] for k in ("code", "message") if isinstance(err.get(k), str) and err[k]]
    return ": ".join(parts) or (err.get("type") if isinstance(err.get("type"), str) else None)
