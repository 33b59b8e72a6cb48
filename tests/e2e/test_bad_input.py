"""Bad input through a real gateway: every odd request body and every broken provider answer gets a defined
answer, a ledger row, no crash, and the gateway keeps serving (one good SDK request after each).

Observed and pinned behaviour (the closing note's "bad inputs" table):

- Request bodies the gateway cannot read as a chat request (not JSON, a JSON array, empty, no `model`, an
  undecodable Content-Encoding) are forwarded untouched with the real key; the provider's own 400 reaches the
  app; the row is `upstream_error` with the model left NULL. Wrong types (`"model": 5`, `"messages": "x"`,
  `"stream": "yes"`, `"max_tokens": -1`) are forwarded too: the provider decides; the gateway meters what it
  can (a non-string model is not recorded; `"stream": "yes"` is not taken as a stream, so usage is not asked
  for and the streamed answer is metered by estimate).
- gzip / deflate / br / zstd request bodies are decoded for metering and forwarded encoded; when the gateway
  adds `stream_options.include_usage` it re-encodes the body in the same encoding (the stand-in decodes it).
- 20 MB bodies are parsed off the event loop and forwarded; metered from the provider's usage.
- Multipart (audio transcription) is forwarded with the real key; the model comes from the form's text fields
  and the provider's token usage is read.
- An OpenAI Realtime WebSocket upgrade with a virtual key is authenticated and the key swapped (the provider
  never sees the virtual key); a real key or none is refused 401 before any upstream connection. Each
  `response.create` turn is a row, metered from its `response.done` (test_websocket.py has the rest).
- Broken provider answers (not JSON, no usage, usage counts of the wrong type, cut short but ended cleanly)
  give an `ok` row with `estimated` tokens.

Figures for the closing note are printed as `FIGURE ...` lines (run with -s or -rP to see them).
"""
from __future__ import annotations

import gzip
import io
import json
import time
import wave
import zlib
from decimal import Decimal

import anthropic
import brotli
import openai
import pytest

from .harness import (PRIVATE_FILES, REAL_KEYS, Gateway, app_env, base_policy, file_modes, fresh_status,
                      raw_request, realtime_session, scan_gateway, settled_rows)

try:  # Python 3.14 has zstd in the stdlib; mitmproxy depends on the backport before that.
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(120)

MSGS = [{"role": "user", "content": "hi"}]
CHAT = "https://api.openai.com/v1/chat/completions"
MESSAGES = "https://api.anthropic.com/v1/messages"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models"
TRIED: list[str] = []  # bad inputs tried, for the closing note


def figure(line: str) -> None:
    print(f"\nFIGURE {line}")


@pytest.fixture(scope="module")
def bgw(tmp_path_factory, standin, confdir):
    """One gateway for all bad input, output at debug level with full flows (scanned at the end); the user is
    in an enforcing budget tier, so every odd request also goes through reservation and settlement."""
    d = tmp_path_factory.mktemp("badinput")
    pol = base_policy(standin.port, d / "usage.duckdb")
    pol["budgeting"] = {"tiers": [{"name": "bad", "limit_usd": 50, "shared_users": ["bad"]}],
                        # every provider priced: odd bodies are the subject here, not unpriced models
                        "costs": {f"{p}:*": {"input_token": 0.001, "output_token": 0.01}
                                  for p in ("openai", "anthropic", "gemini")}}
    gw = Gateway(d, pol, confdir, ["--set", "termlog_verbosity=debug", "--set", "flow_detail=4"])
    gw.key = gw.create_key("bad")
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def app(bgw, monkeypatch):
    app_env(bgw, monkeypatch)
    return bgw


def openai_headers(gw: Gateway, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key['key']}", "Content-Type": "application/json", **extra}


def one_row(gw: Gateway, since: float) -> dict:
    rows = settled_rows(gw, since=since)
    assert len(rows) == 1, rows
    return rows[0]


def still_serving(gw: Gateway) -> None:
    """One good request after each bad one: the gateway is alive and answers normally."""
    assert gw.proc.poll() is None, "the gateway died"
    r = openai.OpenAI(api_key=gw.key["key"], max_retries=0, timeout=30).chat.completions.create(
        model="gpt-4o-mini", messages=MSGS)
    assert r.choices[0].message.content


# --- request bodies ----------------------------------------------------------------------------------------------


def _chat(model: str = "gpt-4o-mini", **kw) -> bytes:
    return json.dumps({"model": model, "messages": MSGS, **kw}).encode()


def _deflate(b: bytes) -> bytes:
    return zlib.compress(b)


# id: (url, body, extra headers, expected: app status, row outcome, row model, token_source or None)
BODIES = {
    "not-json": (CHAT, b"this is not json", {}, (400, "upstream_error", None, None)),
    "json-array": (CHAT, b"[1, 2, 3]", {}, (400, "upstream_error", None, None)),
    "empty": (CHAT, b"", {}, (400, "upstream_error", None, None)),
    "no-model": (CHAT, json.dumps({"messages": MSGS}).encode(), {}, (400, "upstream_error", None, None)),
    "model-int": (CHAT, json.dumps({"model": 5, "messages": MSGS}).encode(), {}, (200, "ok", None, "provider")),
    "messages-str": (CHAT, json.dumps({"model": "gpt-4o-mini-msgstr", "messages": "x"}).encode(), {},
                     (200, "ok", "gpt-4o-mini-msgstr", "provider")),
    "stream-yes": (CHAT, _chat("gpt-4o-mini-streamyes", stream="yes"), {},
                   (200, "ok", "gpt-4o-mini-streamyes", "estimated")),
    "max-tokens-negative": (CHAT, _chat("gpt-4o-mini-neg", max_tokens=-1), {}, (200, "ok", "gpt-4o-mini-neg",
                                                                                 "provider")),
    "max-tokens-nan": (CHAT, b'{"model": "gpt-4o-mini-nan", "messages": [], "max_tokens": NaN}', {},
                       (200, "ok", "gpt-4o-mini-nan", "provider")),
    "utf8-bom": (CHAT, b"\xef\xbb\xbf" + _chat("gpt-4o-mini-bom"), {}, (200, "ok", None, "provider")),
    "gzip": (CHAT, gzip.compress(_chat("gpt-4o-mini-gz")), {"Content-Encoding": "gzip"},
             (200, "ok", "gpt-4o-mini-gz", "provider")),
    "deflate": (CHAT, _deflate(_chat("gpt-4o-mini-df")), {"Content-Encoding": "deflate"},
                (200, "ok", "gpt-4o-mini-df", "provider")),
    "br": (CHAT, brotli.compress(_chat("gpt-4o-mini-br")), {"Content-Encoding": "br"},
           (200, "ok", "gpt-4o-mini-br", "provider")),
    "zstd": (CHAT, zstd.compress(_chat("gpt-4o-mini-zs")), {"Content-Encoding": "zstd"},
             (200, "ok", "gpt-4o-mini-zs", "provider")),
    # Streams: the gateway rewrites the body (stream_options) and must re-encode it as it came.
    "gzip-stream": (CHAT, gzip.compress(_chat("gpt-4o-mini-gzs", stream=True)), {"Content-Encoding": "gzip"},
                    (200, "ok", "gpt-4o-mini-gzs", "provider")),
    "br-stream": (CHAT, brotli.compress(_chat("gpt-4o-mini-brs", stream=True)), {"Content-Encoding": "br"},
                  (200, "ok", "gpt-4o-mini-brs", "provider")),
    "zstd-stream": (CHAT, zstd.compress(_chat("gpt-4o-mini-zss", stream=True)), {"Content-Encoding": "zstd"},
                    (200, "ok", "gpt-4o-mini-zss", "provider")),
    "gzip-garbage": (CHAT, b"certainly not gzip", {"Content-Encoding": "gzip"}, (400, "upstream_error", None, None)),
    "unknown-encoding": (CHAT, _chat("gpt-4o-mini-lzw"), {"Content-Encoding": "compress"},
                         (400, "upstream_error", None, None)),
    "anthropic-max-tokens-str": (MESSAGES, json.dumps({"model": "claude-x-mt", "max_tokens": "many",
                                                       "messages": MSGS}).encode(),
                                 {"anthropic-version": "2023-06-01"}, (400, "upstream_error", "claude-x-mt", None)),
    "gemini-not-json": (f"{GEMINI}/gemini-2.5-flash:generateContent", b"{oops", {},
                        (400, "upstream_error", "gemini-2.5-flash", None)),
}


def _headers_for(gw: Gateway, url: str, extra: dict[str, str]) -> dict[str, str]:
    if url.startswith(MESSAGES):
        return {"x-api-key": gw.key["key"], "Content-Type": "application/json", **extra}
    if url.startswith(GEMINI):
        return {"x-goog-api-key": gw.key["key"], "Content-Type": "application/json", **extra}
    return openai_headers(gw, **extra)


@pytest.mark.parametrize("case", list(BODIES))
def test_odd_request_body_is_forwarded_and_metered(app, standin, case):
    url, body, extra, (status, outcome, model, source) = BODIES[case]
    TRIED.append(f"request:{case}")
    before = len(standin.requests)
    t0 = time.time()
    got, headers, answer = raw_request(app, url, body, _headers_for(app, url, extra))
    assert got == status, answer[:300]
    if status >= 400:  # the provider's own error, in its own format, reached the app
        err = json.loads(answer)["error"]
        assert err["message"] and "tollgate" not in err["message"], err
    seen = standin.requests[before:]
    assert len(seen) == 1, "forwarded exactly once"
    assert REAL_KEYS["openai"] in json.dumps(seen[0].headers) or REAL_KEYS["anthropic"] in json.dumps(
        seen[0].headers) or REAL_KEYS["gemini"] in json.dumps(seen[0].headers)
    assert app.key["key"] not in json.dumps(seen[0].headers)
    if extra.get("Content-Encoding") in ("gzip", "br", "zstd", "deflate") and status == 200:
        assert seen[0].headers.get("content-encoding") == extra["Content-Encoding"]  # still encoded
    if case.endswith("-stream"):  # the app did not ask for usage: the gateway did, and took it out again
        assert answer.rstrip().endswith(b"data: [DONE]") and b'"usage"' not in answer, answer[-300:]
    row = one_row(app, t0)
    assert (row["outcome"], row["status_code"], row["model"], row["user_id"], row["tier"]) == (
        outcome, status, model, "bad", "bad"), row
    if source:
        assert row["token_source"] == source and row["input_tokens"] > 0 and row["output_tokens"] > 0, row
    else:
        assert row["output_tokens"] == 0
    still_serving(app)


def test_20mb_body(app, standin):
    TRIED.append("request:20MB")
    body = json.dumps({"model": "gpt-4o-mini-20mb", "messages": [{"role": "user", "content": "x " * 10_000_000}]})
    t0 = time.time()
    began = time.monotonic()
    status, _, answer = raw_request(app, CHAT, body.encode(), openai_headers(app))
    took = time.monotonic() - began
    assert status == 200, answer[:300]
    assert len(standin.requests[-1].body) == len(body)
    row = one_row(app, t0)
    assert (row["outcome"], row["model"], row["token_source"]) == ("ok", "gpt-4o-mini-20mb", "provider")
    figure(f"20 MB request body: forwarded and metered in {took:.2f}s (row latency {row['latency_ms']:.0f} ms)")
    still_serving(app)


def test_deeply_nested_json_is_handled_like_any_unreadable_body(app, standin):
    TRIED.append("request:deep-nesting")
    body = b'{"model": "gpt-4o-mini-deep", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    before = len(standin.requests)
    t0 = time.time()
    status, _, answer = raw_request(app, CHAT, body, openai_headers(app))
    try:
        assert status == 400 and len(standin.requests) == before + 1, (status, answer[:300])  # the provider's 400
        assert "request hook failed" not in app.output()
    finally:
        one_row(app, t0)
        still_serving(app)


def test_absurd_max_tokens_is_not_a_gateway_error(app, standin):
    TRIED.append("request:max-tokens-1e30")
    before = len(standin.requests)
    t0 = time.time()
    status, _, answer = raw_request(app, CHAT, _chat("gpt-4o-mini-huge", max_tokens=10**30), openai_headers(app))
    try:
        assert status != 500 and len(standin.requests) == before + 1, (status, answer[:300])  # the provider decides
    finally:
        one_row(app, t0)
        still_serving(app)


# --- multipart: audio transcription ------------------------------------------------------------------------------


def _wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)  # 0.1 s of silence
    return buf.getvalue()


def _transcribe(gw: Gateway, model: str) -> tuple[str, float]:
    t0 = time.time()
    tr = openai.OpenAI(api_key=gw.key["key"], max_retries=0).audio.transcriptions.create(
        model=model, file=("hello.wav", _wav(), "audio/wav"))
    return tr.text, t0


def test_multipart_transcription_is_forwarded_with_the_real_key(app, standin):
    TRIED.append("request:multipart-transcription")
    text, t0 = _transcribe(app, "gpt-4o-transcribe")
    assert text == "Hello from the stand-in provider, all good."
    seen = standin.requests[-1]
    assert seen.path == "/openai/v1/audio/transcriptions" and seen.model == "gpt-4o-transcribe"
    assert seen.headers["authorization"] == f"Bearer {REAL_KEYS['openai']}"
    assert seen.headers["content-type"].startswith("multipart/form-data") and b"RIFF" in seen.body
    row = one_row(app, t0)
    assert (row["outcome"], row["status_code"], row["endpoint"], row["user_id"]) == (
        "ok", 200, "/v1/audio/transcriptions", "bad")
    figure(f"multipart transcription: forwarded, row ok, model={row['model']!r}, "
           f"{row['input_tokens']} in / {row['output_tokens']} out {row['token_source']}, cost {row['cost_usd']}")
    still_serving(app)


def test_multipart_transcription_is_metered(app):
    _, t0 = _transcribe(app, "gpt-4o-transcribe")
    row = one_row(app, t0)
    assert row["model"] == "gpt-4o-transcribe"
    assert (row["input_tokens"], row["output_tokens"], row["token_source"]) == (10, 8, "provider")


# --- WebSocket: OpenAI Realtime ----------------------------------------------------------------------------------


def test_realtime_websocket_upgrade(app, standin):
    TRIED.extend(["websocket:virtual-key", "websocket:real-key", "websocket:no-key"])
    before = len(standin.requests)
    t0 = time.time()
    s = realtime_session(app, app.key["key"])
    assert s["status"] == 101
    assert [e["type"] for e in s["events"]][:2] == ["session.created", "response.created"]
    assert s["events"][-1]["type"] == "response.done"
    seen = [r for r in standin.requests[before:] if r.method == "GET"]
    assert len(seen) == 1 and seen[0].path == "/openai/v1/realtime"
    assert seen[0].headers["authorization"] == f"Bearer {REAL_KEYS['openai']}", "the virtual key reached the provider"
    row = one_row(app, t0)  # the turn's row (the socket itself is none)
    assert (row["outcome"], row["status_code"], row["user_id"], row["endpoint"]) == (
        "ok", 200, "bad", "/v1/realtime")

    # A real key presented directly, or none: refused before any upstream connection, in OpenAI's format.
    for key in (REAL_KEYS["openai"], None):
        t1 = time.time()
        r = realtime_session(app, key)
        assert r["status"] == 401 and json.loads(r["body"])["error"]["code"] == "invalid_api_key", r
        assert one_row(app, t1)["outcome"] == "unauthorized"
    assert len([r for r in standin.requests[before:] if r.method == "GET"]) == 1, \
        "a refused upgrade reached the provider"
    figure(f"realtime WebSocket: virtual key -> 101, provider saw the real key only, row ok (model {row['model']!r}, "
           f"{row['input_tokens']} in / {row['output_tokens']} out {row['token_source']}); real key / no key -> 401")
    still_serving(app)


def test_realtime_session_usage_is_metered(app):
    t0 = time.time()
    realtime_session(app, app.key["key"], events=({"type": "response.create"}, {"type": "response.create"}))
    rows = settled_rows(app, since=t0, n=2)  # one row per turn
    assert [(r["model"], r["input_tokens"], r["output_tokens"], r["token_source"]) for r in rows] == [
        ("gpt-4o-realtime-preview", 11, 8, "provider")] * 2


# --- broken provider answers -------------------------------------------------------------------------------------

# id: (url, body builder(model) -> bytes, extra headers, base model, streamed)
def _anthropic(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "max_tokens": 50, "messages": MSGS, "stream": stream}).encode()


def _gemini_body(_model: str, _stream: bool) -> bytes:
    return json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()


WIRES = {
    "openai": (lambda m, s: CHAT, lambda m, s: _chat(m, stream=s) if s else _chat(m), {}, "gpt-4o-mini"),
    "anthropic": (lambda m, s: MESSAGES, _anthropic, {"anthropic-version": "2023-06-01"}, "claude-x"),
    "gemini": (lambda m, s: f"{GEMINI}/{m}:" + ("streamGenerateContent?alt=sse" if s else "generateContent"),
               _gemini_body, {}, "gemini-2.5-flash"),
}
ANSWERS = [(wire, knob, stream) for wire in WIRES for knob in ("notjson", "nousage", "badusage", "truncate")
           for stream in (False, True) if not (wire == "gemini" and knob == "truncate" and stream)]


def _broken_answer(gw: Gateway, wire: str, knob: str, stream: bool) -> tuple[int, bytes, dict]:
    url_of, body_of, extra, base = WIRES[wire]
    model = f"{base}-{knob}" + ("-s" if stream else "")
    t0 = time.time()
    url = url_of(model, stream)
    status, _, answer = raw_request(gw, url, body_of(model, stream), _headers_for(gw, url, extra))
    return status, answer, one_row(gw, t0)


@pytest.mark.parametrize("wire,knob,stream", ANSWERS, ids=[f"{w}-{k}-{'stream' if s else 'json'}"
                                                          for w, k, s in ANSWERS])
def test_broken_provider_answer_gives_an_estimated_row(app, wire, knob, stream):
    TRIED.append(f"answer:{wire}-{knob}-{'stream' if stream else 'json'}")
    status, answer, row = _broken_answer(app, wire, knob, stream)
    assert status == 200
    assert (row["outcome"], row["status_code"], row["token_source"]) == ("ok", 200, "estimated"), row
    assert row["input_tokens"] > 0, "the prompt is estimated from the request"
    if stream and knob != "notjson":
        assert row["output_tokens"] > 0, "the relayed text is estimated"
    if knob == "notjson" and not stream:
        assert answer.startswith(b"<html>"), "the provider's bytes reach the app as they are"
    still_serving(app)


@pytest.mark.parametrize("wire,knob", [("openai", "nousage"), ("anthropic", "badusage"), ("gemini", "nousage")])
def test_json_answer_without_usage_estimates_the_output(app, wire, knob):
    _, _, row = _broken_answer(app, wire, knob, False)
    assert row["token_source"] == "estimated"
    assert row["output_tokens"] > 0, "8 tokens of text were answered and billed as 0"


@pytest.mark.parametrize("stream", [False, True])
def test_wrong_typed_output_count_is_not_taken_as_exact(app, stream):
    TRIED.append(f"answer:openai-badout-{'stream' if stream else 'json'}")
    _, _, row = _broken_answer(app, "openai", "badout", stream)
    assert row["token_source"] == "estimated" or row["output_tokens"] > 0, row


# --- what the bad-input gateway wrote ----------------------------------------------------------------------------


def test_bad_input_gateway_released_everything_and_wrote_no_key(bgw):
    """Last in this module: no reservation left behind, then, stopped: its output (debug, full flows), files and
    saved flows hold no real or virtual key, and its ledger, spool and status files are 0600."""
    st = fresh_status(bgw, time.time())
    assert {b["id"]: Decimal(str(b["reserved"])) for b in st["budgets"]}["tier:bad"] == 0
    rows = bgw.rows()
    assert bgw.stop() == 0
    counts = scan_gateway(bgw, {**REAL_KEYS, "virtual key": bgw.key["key"]})
    modes = file_modes(bgw.dir)
    assert {n: oct(modes[n]) for n in PRIVATE_FILES} == {n: "0o600" for n in PRIVATE_FILES}, modes
    figure(f"bad inputs: {len(TRIED)} tried ({len([t for t in TRIED if t.startswith('request')])} request bodies, "
           f"{len([t for t in TRIED if t.startswith('websocket')])} WebSocket upgrades, "
           f"{len([t for t in TRIED if t.startswith('answer')])} broken provider answers), gateway alive after "
           f"each, {len(rows)} rows")
    figure(f"secret scan (bad-input gateway, debug + flow_detail=4): {counts['files']} files, {counts['flows']} saved "
           f"flows, {counts['bytes']} bytes, {counts['secrets']} keys: clean")
