"""WebSocket turns: the pure bookkeeping (wsturns) and the hooks that wire it (taddons/tflow)."""
import asyncio
import json
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from mitmproxy import websocket
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from tollgate import wsturns

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import standin  # noqa: E402  (tests/standin.py: the events OpenAI sends)
from tollgate.addon import REDACTED, Gateway
from tollgate.keys import KeyRecord, hash_key

REAL = "sk-real-openai-key-000000000000000000"
VKEY = "tg-unit-test-virtual-key-0000000000000000000"
USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 9,
         "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 20}


def ev(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def created(rid: str, **extra) -> bytes:
    return ev({"type": "response.created", "response": {"id": rid, "status": "in_progress"}, **extra})


def delta(text: str, **extra) -> bytes:
    return ev({"type": "response.output_text.delta", "item_id": "msg_1", "delta": text, **extra})


def completed(rid: str, usage=USAGE, etype="response.completed", status="completed", **extra) -> bytes:
    return ev({"type": etype, "response": {"id": rid, "status": status, "model": "gpt-4o-mini-2024", "usage": usage},
               **extra})


# --- reading client events -------------------------------------------------------------------------------------


def test_mode_by_wire_and_path():
    assert wsturns.mode_for("openai", "/v1/responses") == wsturns.RESPONSES
    assert wsturns.mode_for("openai", "/openai/v1/realtime") == wsturns.REALTIME
    assert wsturns.mode_for("azure", "/openai/realtime") == wsturns.REALTIME
    assert wsturns.mode_for("openai", "/v1/chat/completions") is None
    assert wsturns.mode_for("anthropic", "/v1/responses") is None


def test_client_events_that_are_not_turns_pass():
    for raw in (b'{"type": "session.update", "session": {}}', b'{"type": "response.cancel"}',
                b'{"type": "input_audio_buffer.append", "audio": "AAAA"}'):
        assert wsturns.read_client(raw, True, wsturns.REALTIME) is None


def test_a_create_is_a_turn_with_its_parameters():
    e = wsturns.read_client(b'{"type": "response.create", "model": "gpt-4o", "input": "hi", "stream_id": "a"}',
                            True, wsturns.RESPONSES)
    assert e.error is None and e.body["model"] == "gpt-4o" and e.stream_id == "a"
    e = wsturns.read_client(b'{"type": "response.create", "event_id": "e1", "response": {"max_output_tokens": 5}}',
                            True, wsturns.REALTIME)
    assert e.body == {"max_output_tokens": 5} and e.event_id == "e1"
    assert wsturns.read_client(b'{"type": "response.create"}', True, wsturns.REALTIME).body == {}


@pytest.mark.parametrize("raw,is_text", [
    (b"\x00\x01", False), (b"not json", True), (b"[1]", True), (b"null", True), (b'{"type": 5}', True),
    (b'{"model": "x"}', True),
    (b'{"type": "response.create", "type": "session.update"}', True),  # which one a provider reads is unknown
    (b'{"type": "response.create", "\\u0074ype": "session.update"}', True),
    (b'{"type": "response.create", "response": "x"}', True),
])
def test_unreadable_client_events_are_refused(raw, is_text):
    e = wsturns.read_client(raw, is_text, wsturns.REALTIME)
    assert e is not None and e.error


def test_a_duplicated_type_that_reads_as_create_is_a_turn():
    # Admitted (and metered) as a create: a provider that reads the other type creates nothing.
    e = wsturns.read_client(b'{"type": "session.update", "type": "response.create"}', True, wsturns.RESPONSES)
    assert e.error is None and e.body is not None


def test_nested_types_are_not_duplicates():
    raw = ev({"type": "response.create", "model": "m", "input": [{"type": "message", "role": "user",
                                                                   "content": [{"type": "input_text", "text": "x"}]}]})
    assert wsturns.read_client(raw, True, wsturns.RESPONSES).error is None


def test_event_id_is_spliced_in_and_errors_are_native():
    raw, eid = wsturns.with_event_id(b'{"type":"response.create"}')
    assert json.loads(raw) == {"event_id": eid, "type": "response.create"}
    err = {"type": "requests", "code": "rate_limit_exceeded", "message": "slow down", "param": None}
    assert json.loads(wsturns.error_event(wsturns.RESPONSES, 429, err)) == {
        "type": "error", "status": 429, "error": err}
    rt = json.loads(wsturns.error_event(wsturns.REALTIME, 429, err, "e1"))
    assert rt["type"] == "error" and rt["error"]["event_id"] == "e1" and "status" not in rt


# --- matching server events to turns -----------------------------------------------------------------------------


def session(mode=wsturns.RESPONSES) -> wsturns.Session:
    return wsturns.Session(mode, "gpt-4o-realtime" if mode == wsturns.REALTIME else None, None, "h")


def turn(**kw) -> wsturns.Turn:
    return wsturns.Turn(ex=SimpleNamespace(), started=time.time(), **kw)


def test_turns_in_order_with_usage_ttft_and_text():
    s = session()
    a, b = turn(), turn()
    s.open(a)
    s.open(b)
    assert s.server_event(created("r1"), 1.0) is None
    assert a.response_id == "r1" and a.first == 1.0
    s.server_event(delta("Hel"), 1.1)
    s.server_event(delta("lo"), 1.2)
    step = s.server_event(completed("r1"), 2.0)
    assert step.ended == [a] and a.ended == 2.0 and a.status == "completed"
    u = a.usage
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens) == (11, 4, 9, 3)
    assert a.output_text() == "Hello" and a.response_model == "gpt-4o-mini-2024"
    s.server_event(created("r2"), 3.0)
    assert b.response_id == "r2" and s.in_flight() == [b]
    assert s.server_event(completed("r2", etype="response.incomplete", status="incomplete"), 4.0).ended == [b]
    assert s.in_flight() == [] and s.context == 20


def test_lanes_are_matched_by_stream_id():
    s = session()
    a, b = turn(stream_id="a"), turn(stream_id="b")
    s.open(a)
    s.open(b)
    s.server_event(created("rb", stream_id="b"), 1.0)
    s.server_event(created("ra", stream_id="a"), 1.0)
    assert (a.response_id, b.response_id) == ("ra", "rb")
    s.server_event(delta("A", stream_id="a"), 1.1)
    s.server_event(delta("B", stream_id="b"), 1.1)
    assert (a.output_text(), b.output_text()) == ("A", "B")
    assert s.server_event(completed("rb", stream_id="b"), 2.0).ended == [b]
    assert s.in_flight() == [a]


def test_realtime_responses_at_once_are_told_apart_by_response_id():
    s = session(wsturns.REALTIME)
    a, b = turn(event_id="e1"), turn(event_id="e2")
    s.open(a)
    s.open(b)
    s.server_event(created("r1"), 1.0)
    s.server_event(created("r2"), 1.0)
    s.server_event(ev({"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": "one"}), 1.1)
    s.server_event(ev({"type": "response.output_text.delta", "response_id": "r2", "delta": "two"}), 1.1)
    s.server_event(ev({"type": "response.output_audio.delta", "response_id": "r2", "delta": "AAAA"}), 1.1)
    assert (a.output_text(), b.output_text()) == ("one", "two")  # audio is not text
    rt_usage = {"input_tokens": 30, "output_tokens": 5, "input_token_details": {"cached_tokens": 10}}
    step = s.server_event(completed("r2", usage=rt_usage, etype="response.done"), 2.0)
    assert step.ended == [b] and (b.usage.input_tokens, b.usage.cached_input_tokens) == (30, 10)


def test_errors_end_the_turn_they_are_about():
    s = session(wsturns.REALTIME)
    a = turn(event_id="e1")
    s.open(a)
    # An error about another client event (a session.update) leaves the turn alone.
    assert s.server_event(ev({"type": "error", "error": {"type": "invalid_request_error", "event_id": "x"}}), 1) is None
    step = s.server_event(ev({"type": "error", "error": {"code": "bad", "message": "no", "event_id": "e1"}}), 2)
    assert step.ended == [a] and a.error == "bad: no" and a.response_id is None
    r = session()
    b = turn()
    r.open(b)
    step = r.server_event(ev({"type": "error", "status": 400, "error": {"type": "invalid_request_error",
                                                                       "message": "Invalid previous_response_id."}}), 3)
    assert step.ended == [b] and b.error_status == 400


def test_a_response_nobody_asked_for_is_reported():
    s = session(wsturns.REALTIME)
    step = s.server_event(created("r9"), 1.0)
    assert step.unsolicited == {"id": "r9", "status": "in_progress"}
    t = turn()
    s.adopt(t, "r9")
    assert s.server_event(completed("r9", etype="response.done"), 2.0).ended == [t]


def test_close_returns_every_turn_in_flight_once():
    s = session()
    a, b = turn(), turn()
    s.open(a)
    s.open(b)
    s.server_event(created("r1"), 1.0)
    assert s.close() == [a, b] and s.in_flight() == []


def test_carried_context_counts_for_continued_turns():
    s = session()
    s.context = 500
    assert s.turn_facts({"model": "m", "max_output_tokens": 7})[1:] == (7, 0)
    assert s.turn_facts({"model": "m", "previous_response_id": "r1"}) == ("m", None, 500)
    rt = session(wsturns.REALTIME)
    rt.context = 40
    assert rt.turn_facts({}) == ("gpt-4o-realtime", None, 40)
    assert rt.turn_facts({"conversation": "none"})[2] == 0


def test_garbage_server_events_do_not_raise():
    s = session()
    s.open(turn())
    for raw in (b"", b"\xff\xfe", b"[]", b'{"type": 1}', b'{"type": "response.completed", "response": 5}',
                b'{"type": "error", "error": "x"}', b'{"response": {}, "type": "response.created"}'):
        s.server_event(raw, 1.0)


# --- the hooks (taddons / tflow) ---------------------------------------------------------------------------------


@pytest.fixture
def gw(tmp_path):
    (tmp_path / "p.yaml").write_text(
        f"providers: {{openai: {{api_key: {REAL}, base_url: 'http://127.0.0.1:9/openai/v1'}}}}\n"
        f"rate_limits: {{per_key: {{max_concurrent: 1}}}}\n"
        f"analytics: {{database: {tmp_path / 'u.duckdb'}}}\n")
    g = Gateway()
    with taddons.context(g) as tctx:
        tctx.configure(g, tollgate_policy=str(tmp_path / "p.yaml"))
        g.auth.set_keys({hash_key(VKEY): KeyRecord("vk_1", hash_key(VKEY), "alice",
                                                   datetime.now(timezone.utc), None, None, {})})
        rows, injected = [], []
        g.ledger.record = rows.append
        g._inject = lambda flow, message, to_client=True: injected.append((to_client, json.loads(message)))
        yield g, rows, injected
        g.done()


def ws_flow(g, path="/v1/responses", key=VKEY):
    f = tflow.twebsocketflow()
    f.websocket.messages = []
    req = f.request
    req.host, req.port, req.scheme, req.path = "api.openai.com", 443, "https", path
    req.headers["host"] = "api.openai.com"
    req.headers["authorization"] = f"Bearer {key}"
    resp = f.response
    f.response = None
    g.requestheaders(f)
    asyncio.run(g.request(f))
    if f.response is not None:  # refused
        return f
    f.response = resp
    g.responseheaders(f)
    asyncio.run(g.response(f))
    return f


def send(g, f, content: bytes, from_client: bool, is_text: bool = True) -> WebSocketMessage:
    msg = websocket.WebSocketMessage(Opcode.TEXT if is_text else Opcode.BINARY, from_client, content)
    f.websocket.messages.append(msg)
    g.websocket_message(f)
    return msg


def test_the_upgrade_is_not_admitted_and_holds_no_slot(gw):
    g, rows, _ = gw
    a, b = ws_flow(g), ws_flow(g)  # max_concurrent 1: two sockets are fine
    assert f"{REDACTED}:vk_1" in a.request.headers["authorization"] and a.id in g.sessions and b.id in g.sessions
    assert rows == []  # no row for a socket


def test_a_turn_is_admitted_forwarded_and_recorded(gw):
    g, rows, injected = gw
    f = ws_flow(g)
    m = send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"}), True)
    assert not m.dropped and injected == []
    send(g, f, created("r1"), False)
    send(g, f, delta("hi"), False)
    send(g, f, completed("r1"), False)
    assert len(rows) == 1
    r = rows[0]
    assert (r["endpoint"], r["model"], r["response_model"], r["outcome"], r["status_code"]) == (
        "/v1/responses", "gpt-4o-mini", "gpt-4o-mini-2024", "ok", 200)
    assert (r["input_tokens"], r["cached_input_tokens"], r["output_tokens"], r["reasoning_tokens"]) == (11, 4, 9, 3)
    assert r["cost_usd"] is not None and r["ttft_ms"] is not None and r["user_id"] == "alice"
    assert "1 turns" in f.comment


def test_a_second_turn_in_flight_is_refused_by_max_concurrent(gw):
    g, rows, injected = gw
    f = ws_flow(g)
    send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini", "stream_id": "a"}), True)
    m = send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini", "stream_id": "b"}), True)
    assert m.dropped
    assert injected[0][0] is True and injected[0][1]["error"]["code"] == "rate_limit_exceeded"
    assert injected[0][1]["status"] == 429
    assert rows[-1]["outcome"] == "rate_limited"
    send(g, f, created("r1", stream_id="a"), False)
    send(g, f, completed("r1", stream_id="a"), False)
    assert rows[-1]["outcome"] == "ok"
    assert not send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini"}), True).dropped  # slot is free


def test_a_revoked_key_refuses_the_next_turn(gw):
    g, rows, injected = gw
    f = ws_flow(g)
    g.auth.set_keys({hash_key(VKEY): KeyRecord("vk_1", hash_key(VKEY), "alice", datetime.now(timezone.utc), None,
                                               datetime.now(timezone.utc), {})})
    m = send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini"}), True)
    assert m.dropped and injected[-1][1]["error"]["code"] == "invalid_api_key" and injected[-1][1]["status"] == 401
    assert rows[-1]["outcome"] == "unauthorized"


def test_bad_client_input_is_dropped_with_an_error(gw):
    g, rows, injected = gw
    f = ws_flow(g)
    assert send(g, f, b"\x00", True, is_text=False).dropped
    assert send(g, f, b"{", True).dropped
    assert [i[1]["error"]["code"] for i in injected] == ["invalid_event", "invalid_event"]
    assert rows == []
    assert not send(g, f, ev({"type": "session.update"}), True).dropped


def test_a_failing_hook_drops_the_turn(gw, monkeypatch):
    g, rows, injected = gw
    f = ws_flow(g)
    monkeypatch.setattr(g, "_admit", lambda *a: 1 / 0)
    m = send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini"}), True)
    assert m.dropped and injected[-1][1]["error"]["code"] == "gateway_error"


def test_injected_messages_are_ignored(gw):
    g, rows, _ = gw
    f = ws_flow(g)
    msg = WebSocketMessage(Opcode.TEXT, True, ev({"type": "response.create", "model": "m"}), injected=True)
    f.websocket.messages.append(msg)
    g.websocket_message(f)
    assert not msg.dropped and g.sessions[f.id][1].in_flight() == []


def test_a_socket_closed_mid_turn_bills_an_estimate(gw):
    g, rows, _ = gw
    f = ws_flow(g)
    send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini", "input": "say something"}), True)
    send(g, f, created("r1"), False)
    send(g, f, delta("Hello there, friend"), False)
    f.websocket.closed_by_client = True
    asyncio.run(g.websocket_end(f))
    r = rows[-1]
    assert (r["outcome"], r["token_source"], r["status_code"]) == ("client_aborted", "estimated", 200)
    assert r["input_tokens"] > 0 and r["output_tokens"] == 4
    assert f.id not in g.sessions and f.metadata["tollgate"]["turns"] == 1


def test_unmeterable_websocket_paths_are_refused(gw):
    g, rows, _ = gw
    f = ws_flow(g, path="/v1/chat/completions")
    assert f.response.status_code == 400 and "unmetered" in f.response.text


def test_realtime_turn_gets_an_event_id(gw):
    g, rows, injected = gw
    f = ws_flow(g, path="/v1/realtime?model=gpt-realtime")
    m = send(g, f, ev({"type": "response.create"}), True)
    eid = json.loads(m.content)["event_id"]
    assert eid.startswith("tollgate_evt_")
    send(g, f, ev({"type": "error", "error": {"message": "busy", "event_id": eid}}), False)
    assert rows[-1]["outcome"] == "upstream_error" and rows[-1]["model"] == "gpt-realtime"


def test_a_large_create_is_parsed_off_the_loop(gw):
    g, rows, injected = gw
    f = ws_flow(g)
    big = ev({"type": "response.create", "model": "gpt-4o-mini", "input": "x" * 300_000})
    msg = WebSocketMessage(Opcode.TEXT, True, big)
    f.websocket.messages.append(msg)
    pending = g.websocket_message(f)
    assert pending is not None  # a coroutine mitmproxy awaits before relaying
    asyncio.run(pending)
    assert not msg.dropped and injected == []
    (turn,) = g.sessions[f.id][1].in_flight()
    assert turn.ex.model == "gpt-4o-mini" and turn.ex.body_size == len(big)


def test_an_upgrade_tollgate_cannot_meter_is_cut(gw):
    g, rows, _ = gw
    f = tflow.twebsocketflow()
    req = f.request
    req.host, req.port, req.scheme, req.path = "api.openai.com", 443, "https", "/v1/chat/completions"
    req.headers["host"] = "api.openai.com"
    req.headers["authorization"] = f"Bearer {VKEY}"
    del req.headers["upgrade"]  # not an upgrade request, so admitted as one; the provider switches anyway
    resp, f.response = f.response, None
    g.requestheaders(f)
    asyncio.run(g.request(f))
    f.response = resp
    asyncio.run(g.response(f))
    assert f.error is not None and f.error.msg == "Connection killed."
    assert f.id not in g.sessions and rows[-1]["outcome"] == "gateway_error"


def test_compact_created_events_are_read_without_a_parse():
    s = session()
    a = turn()
    s.open(a)
    s.server_event(b'{"type":"response.created","sequence_number":0,"response":{"id":"resp_9","object":"response"}}')
    assert a.response_id == "resp_9" and s.running == {"resp_9": a} and a.first is not None


def test_final_fields_agree_with_a_whole_parse():
    body = {"type": "response.create", "model": "o3-mini-cached", "input": "hi"}
    u = standin.expected_usage(standin.RESPONSES, body, body["model"])
    events = standin.responses_ws_events(body, body["model"], u)
    final = events[-1]
    final["response"]["output"][0]["content"][0]["text"] = 'x "usage":{"input_tokens": 999} ' * 2000  # large
    raw = json.dumps(final, separators=(",", ":")).encode()
    fast = wsturns.final_fields(raw)
    assert fast is not None and len(raw) > 60_000
    whole = final["response"]
    assert (fast["id"], fast["status"], fast["model"], fast["usage"]) == (
        whole["id"], whole["status"], whole["model"], whole["usage"])
    assert wsturns.usage_of(fast) == wsturns.usage_of(whole)
    # Shapes it does not recognise are left to the whole parse.
    assert wsturns.final_fields(json.dumps(final).encode()) is None  # spaced
    assert wsturns.final_fields(b'{"type":"response.completed","response":{"id":"r","status":"completed"}}') is None
    # The app's metadata echoed after the usage must not pass for it: two "usage" keys, the whole parse decides.
    spoof = {**final, "response": {**whole, "metadata": {"usage": {"input_tokens": 0, "output_tokens": 0}}}}
    assert wsturns.final_fields(json.dumps(spoof, separators=(",", ":")).encode()) is None
    s = session()
    t = turn()
    s.open(t)
    s.server_event(json.dumps(events[0], separators=(",", ":")).encode())
    assert s.server_event(raw).ended == [t] and t.usage.input_tokens == u["input_tokens"]
    assert t.usage.reasoning_tokens == 3 and t.usage.cached_input_tokens == 4 and t.response_model == "o3-mini-cached"


def test_a_create_the_provider_never_begins_frees_its_slot(gw):
    g, rows, _ = gw
    f = ws_flow(g)
    send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini"}), True)
    assert send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini"}), True).dropped  # max_concurrent 1
    g.policy.gateway.upstream_timeout = 0.0  # (what the sweep compares against)
    g._sweep_sessions()
    assert (rows[-1]["outcome"], rows[-1]["input_tokens"]) == ("upstream_error", 0)
    assert g.sessions[f.id][1].in_flight() == []
    assert not send(g, f, ev({"type": "response.create", "model": "gpt-4o-mini"}), True).dropped  # slot free


def test_a_response_the_server_begins_unasked_is_admitted_and_recorded(gw):
    g, rows, injected = gw
    f = ws_flow(g, path="/v1/realtime?model=gpt-realtime")
    send(g, f, created("r_vad"), False)  # server VAD began a response: no create was sent
    (turn,) = g.sessions[f.id][1].in_flight()
    assert turn.response_id == "r_vad" and injected == []
    send(g, f, completed("r_vad", etype="response.done"), False)
    assert rows[-1]["outcome"] == "ok" and rows[-1]["model"] == "gpt-realtime" and rows[-1]["input_tokens"] == 11


def test_an_unasked_response_over_the_limit_is_cancelled_and_still_billed(gw):
    g, rows, injected = gw
    f = ws_flow(g, path="/v1/realtime?model=gpt-realtime")
    send(g, f, ev({"type": "response.create"}), True)  # holds the one slot
    send(g, f, created("r1"), False)
    send(g, f, created("r_vad"), False)  # a second response at once, unasked: over max_concurrent
    assert [i[0] for i in injected] == [True, False]  # the error to the app, response.cancel to the provider
    assert injected[1][1] == {"type": "response.cancel", "response_id": "r_vad"}
    send(g, f, completed("r_vad", etype="response.done", status="cancelled"), False)
    assert rows[-1]["outcome"] == "rate_limited" and rows[-1]["input_tokens"] == 11 and rows[-1]["cost_usd"]
