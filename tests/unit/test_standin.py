"""Tests of the stand-in provider itself: the official SDKs must parse what it says, and its knobs must hold."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import standin  # noqa: E402
from standin import ANSWER, ANSWER_PIECES, DEFAULT_REAL_KEYS, Standin, expected_usage, iter_sse  # noqa: E402

OPENAI_KEY, ANTHROPIC_KEY, GEMINI_KEY, AZURE_KEY = (DEFAULT_REAL_KEYS[p]
                                                     for p in ("openai", "anthropic", "gemini", "azure"))
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    with Standin(real_keys=dict(DEFAULT_REAL_KEYS)) as s:
        yield s


@pytest.fixture
def srv(server):
    server.clear()
    return server


def oai(srv, provider="openai", suffix="/v1", key=OPENAI_KEY):
    return openai.OpenAI(api_key=key, base_url=srv.url(provider) + suffix, max_retries=0)


def claude(srv, key=ANTHROPIC_KEY):
    return anthropic.Anthropic(api_key=key, base_url=srv.url("anthropic"), max_retries=0)


# ------------------------------------------------------------------ expected_usage
@pytest.mark.parametrize(("fmt", "body", "model", "want"), [
    ("openai.chat", {"model": "gpt-4o-mini", "messages": MSGS}, None, (12, 8, 0, 0, 0)),
    ("openai", {"model": "gpt-4o-mini-cached", "messages": MSGS[1:]}, None, (11, 8, 4, 0, 0)),
    ("openai.chat", {"model": "o3-mini", "messages": MSGS}, None, (12, 11, 0, 0, 3)),
    ("openai.completions", {"model": "x", "prompt": "hi"}, None, (11, 8, 0, 0, 0)),
    ("openai.completions", {"model": "x", "prompt": ["a", "b", "c"]}, None, (13, 8, 0, 0, 0)),
    ("openai.responses", {"model": "x", "input": "hi", "instructions": "sys"}, None, (12, 8, 0, 0, 0)),
    ("openai.embeddings", {"model": "e-cached", "input": ["a", "b"]}, None, (12, 0, 0, 0, 0)),
    ("openai.embeddings", {"model": "e", "input": [1, 2, 3]}, None, (11, 0, 0, 0, 0)),
    ("anthropic", {"model": "claude-cached", "system": "s", "messages": MSGS[1:]}, None, (12, 8, 4, 2, 0)),
    ("anthropic.messages", {"model": "claude-thinking", "messages": MSGS[1:]}, None, (11, 11, 0, 0, 3)),
    ("gemini.generate", {"contents": [{}, {}], "systemInstruction": {"parts": []}}, "gemini-cached", (13, 8, 4, 0, 0)),
    ("gemini.stream_generate", {"contents": [{}]}, "gemini-2.5-thinking", (11, 11, 0, 0, 3)),
])
def test_expected_usage(fmt, body, model, want):
    u = expected_usage(fmt, json.dumps(body).encode(), model)
    assert (u["input_tokens"], u["output_tokens"], u["cached_input_tokens"], u["cache_write_tokens"],
            u["reasoning_tokens"]) == want


@pytest.mark.parametrize(("model", "knobs"), [
    ("gpt-4o-mini", standin.Knobs()),
    ("gpt-4o-mini-paced-150-gzip", standin.Knobs(pace_ms=150, gzip=True)),
    ("claude-x-error-529", standin.Knobs(error=529)),
    ("m-hang", standin.Knobs(hang=True)),
    ("m-delay-20-die", standin.Knobs(delay_ms=20, die=True)),
    ("o1-cached", standin.Knobs(cached=True, reasoning=True)),
])
def test_knobs(model, knobs):
    assert standin.knobs(model) == knobs


@pytest.mark.parametrize(("method", "path", "headers", "want"), [
    ("POST", "/v1/chat/completions", {}, (None, "openai", "openai.chat", "bearer")),
    ("POST", "/openai/v1/responses", {}, ("openai", "openai", "openai.responses", "bearer")),
    ("POST", "/groq/openai/v1/chat/completions", {}, ("groq", "groq", "openai.chat", "bearer")),
    ("POST", "/chat/completions", {}, (None, "openai", "openai.chat", "bearer")),
    ("POST", "/anthropic/v1/messages", {}, ("anthropic", "anthropic", "anthropic.messages", "x-api-key")),
    ("POST", "/v1/messages", {}, (None, "anthropic", "anthropic.messages", "x-api-key")),
    ("POST", "/anthropic/v1/chat/completions", {}, ("anthropic", "anthropic", "openai.chat", "bearer")),
    ("POST", "/gemini/v1beta/openai/chat/completions", {}, ("gemini", "gemini", "openai.chat", "bearer")),
    ("POST", "/v1beta/models/g:generateContent", {}, (None, "gemini", "gemini.generate", "goog")),
    ("POST", "/gemini/v1beta/models/g:streamGenerateContent", {},
     ("gemini", "gemini", "gemini.stream_generate", "goog")),
    ("POST", "/openai/deployments/dep/chat/completions", {}, (None, "azure", "openai.chat", "api-key")),
    ("POST", "/azure/openai/deployments/dep/embeddings", {}, ("azure", "azure", "openai.embeddings", "api-key")),
    ("GET", "/v1/models", {}, (None, "openai", "openai.models", "bearer")),
    ("GET", "/anthropic/v1/models", {"anthropic-version": "2023-06-01"},
     ("anthropic", "anthropic", "anthropic.models", "x-api-key")),
    ("GET", "/v1beta/models", {}, (None, "gemini", "gemini.models", "goog")),
])
def test_route(method, path, headers, want):
    r = standin.route(method, path, headers)
    assert (r.segment, r.provider, r.api, r.auth) == want


def test_unknown_path_is_a_native_404(srv):
    assert httpx2.post(srv.url() + "/v1/nope", json={}).status_code == 404


# ------------------------------------------------------------------ OpenAI wire, through the official SDK
def test_openai_chat(srv):
    r = oai(srv).chat.completions.create(model="gpt-4o-mini-cached", messages=MSGS)
    assert r.choices[0].message.content == ANSWER
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens) == (12, 8, 4)
    (rec,) = srv.requests
    assert (rec.provider, rec.api, rec.model) == ("openai", "openai.chat", "gpt-4o-mini-cached")
    assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert expected_usage(rec.api, rec.body)["input_tokens"] == r.usage.prompt_tokens


def test_openai_chat_stream_include_usage(srv):
    chunks = list(oai(srv).chat.completions.create(model="o3-mini", messages=MSGS, stream=True,
                                                   stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 11
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == ANSWER
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 8


def test_openai_chat_stream_without_usage(srv):
    with httpx2.stream("POST", srv.url("openai") + "/v1/chat/completions",
                       headers={"authorization": f"Bearer {OPENAI_KEY}"},
                       json={"model": "gpt-4o-mini", "messages": MSGS, "stream": True}) as resp:
        raw = resp.read()
    events = [json.loads(d) for _, d in iter_sse(raw) if d != "[DONE]"]
    assert all("usage" not in e and len(e["choices"]) == 1 for e in events)
    assert raw.endswith(b"data: [DONE]\n\n")


def test_openai_completions(srv):
    c = oai(srv)
    r = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert r.choices[0].text == ANSWER and r.usage.total_tokens == 19
    chunks = list(c.completions.create(model="gpt-3.5-turbo-instruct", prompt=["a", "b"], stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ANSWER
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 12
    plain = list(c.completions.create(model="gpt-3.5-turbo-instruct", prompt="a", stream=True))
    assert all(ch.usage is None and ch.choices for ch in plain)


def test_openai_responses(srv):
    c = oai(srv)
    r = c.responses.create(model="gpt-4o-mini-cached", input="hi", instructions="brief")
    assert r.output_text == ANSWER
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.input_tokens_details.cached_tokens) == (12, 8, 4)
    events = list(c.responses.create(model="gpt-4o-mini", input=[{"role": "user", "content": "hi"}], stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == len(ANSWER_PIECES)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.usage.total_tokens == 19 and events[-1].response.output_text == ANSWER
    with c.responses.stream(model="gpt-4o-mini", input="hi") as s:
        assert s.get_final_response().usage.input_tokens == 11


def test_openai_embeddings(srv):
    c = oai(srv)
    r = c.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])  # the SDK asks for base64
    assert json.loads(srv.requests[-1].body)["encoding_format"] == "base64"
    assert len(r.data) == 3 and len(r.data[0].embedding) == standin.EMBEDDING_DIMS
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (13, 13)
    f = c.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float", dimensions=4)
    assert len(f.data[0].embedding) == 4
    assert r.data[0].embedding == pytest.approx(c.embeddings.create(model="m", input=["a"], encoding_format="float")
                                                .data[0].embedding)


def test_openai_models(srv):
    c = oai(srv)
    ids = [m.id for m in c.models.list()]
    assert "gpt-4o-mini" in ids and "claude-sonnet-4-5" in ids
    assert c.models.retrieve("gpt-4o").id == "gpt-4o"


def test_openai_errors(srv):
    with pytest.raises(openai.AuthenticationError) as e:
        oai(srv, key="sk-virtual-nope").chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.InternalServerError) as e:
        oai(srv).chat.completions.create(model="gpt-4o-mini-error-500", messages=MSGS)
    assert e.value.body["type"] == "server_error"
    with pytest.raises(openai.RateLimitError) as e:
        oai(srv).chat.completions.create(model="gpt-4o-mini-error-429", messages=MSGS)
    assert e.value.response.headers["retry-after"] == "1"
    assert httpx2.post(srv.url() + "/v1/chat/completions", json={}).status_code == 401  # no key at all
    bad = httpx2.post(srv.url() + "/v1/chat/completions", content=b"{nope",
                      headers={"authorization": f"Bearer {OPENAI_KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_azure_via_sdk(srv):
    az = openai.AzureOpenAI(api_key=AZURE_KEY, azure_endpoint=srv.url("azure"), api_version="2024-10-21", max_retries=0)
    r = az.chat.completions.create(model="my-gpt4o-cached", messages=MSGS)
    assert r.choices[0].message.content == ANSWER and r.usage.prompt_tokens_details.cached_tokens == 4
    rec = srv.requests[-1]
    assert rec.path == "/azure/openai/deployments/my-gpt4o-cached/chat/completions"
    assert (rec.provider, rec.headers["api-key"], rec.query["api-version"]) == ("azure", AZURE_KEY, "2024-10-21")
    with pytest.raises(openai.AuthenticationError):
        openai.AzureOpenAI(api_key="nope", azure_endpoint=srv.url("azure"), api_version="2024-10-21",
                           max_retries=0).chat.completions.create(model="d", messages=MSGS)


@pytest.mark.parametrize(("provider", "suffix", "key"), [("anthropic", "/v1/", ANTHROPIC_KEY),
                                                         ("gemini", "/v1beta/openai/", GEMINI_KEY)])
def test_openai_compatible_paths(srv, provider, suffix, key):
    c = oai(srv, provider, suffix, key)
    assert c.chat.completions.create(model="m", messages=MSGS).usage.prompt_tokens == 12
    chunks = list(c.chat.completions.create(model="m", messages=MSGS, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == 20
    assert srv.requests[-1].provider == provider
    with pytest.raises(openai.AuthenticationError):
        oai(srv, provider, suffix, OPENAI_KEY).chat.completions.create(model="m", messages=MSGS)


# ------------------------------------------------------------------ Anthropic, through the official SDK
def test_anthropic_messages(srv):
    m = claude(srv).messages.create(model="claude-sonnet-4-5-cached", max_tokens=50, system="s", messages=MSGS[1:])
    assert m.content[0].text == ANSWER and m.stop_reason == "end_turn"
    u = m.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (6, 4, 2, 8)
    assert srv.requests[-1].headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"  # anthropic 2.x sends Bearer
    raw = httpx2.post(srv.url("anthropic") + "/v1/messages", json={"model": "c", "max_tokens": 5, "messages": MSGS[1:]},
                      headers={"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"})  # curl's way
    assert raw.json()["usage"]["input_tokens"] == 11


def test_anthropic_stream(srv):
    c = claude(srv)
    with c.messages.stream(model="claude-thinking", max_tokens=50, messages=MSGS[1:]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == ANSWER and final.usage.output_tokens == 11 and final.usage.input_tokens == 11
    assert final.usage.output_tokens_details.thinking_tokens == 3
    events = list(c.messages.create(model="claude-x", max_tokens=5, messages=MSGS[1:], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.usage.output_tokens == 1 and events[-2].usage.output_tokens == 8
    assert kinds.count("content_block_delta") == len(ANSWER_PIECES)


def test_anthropic_errors_and_extras(srv):
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(srv, key=OPENAI_KEY).messages.create(model="c", max_tokens=5, messages=MSGS[1:])
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.OverloadedError):
        claude(srv).messages.create(model="c-error-529", max_tokens=5, messages=MSGS[1:])
    assert claude(srv).messages.count_tokens(model="c", messages=MSGS[1:]).input_tokens == 11
    assert [m.id for m in claude(srv).models.list()] == list(standin.MODELS["anthropic"])
    bad = httpx2.post(srv.url("anthropic") + "/v1/messages", headers={"x-api-key": ANTHROPIC_KEY,
                      "anthropic-version": "2023-06-01"}, json={"model": "c", "messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------ Gemini, raw
def gemini_url(srv, model, method, query=""):
    return f"{srv.url('gemini')}/v1beta/models/{model}:{method}{query}"


GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
               "systemInstruction": {"parts": [{"text": "s"}]}}


def test_gemini_generate(srv):
    r = httpx2.post(gemini_url(srv, "gemini-2.5-flash-cached", "generateContent"), json=GEMINI_BODY,
                    headers={"x-goog-api-key": GEMINI_KEY})
    body = r.json()
    assert body["candidates"][0]["content"]["parts"][0]["text"] == ANSWER
    assert body["usageMetadata"].items() >= {"promptTokenCount": 12, "candidatesTokenCount": 8, "totalTokenCount": 20,
                                          "cachedContentTokenCount": 4}.items()
    rec = srv.requests[-1]
    assert (rec.api, rec.model) == ("gemini.generate", "gemini-2.5-flash-cached")
    assert expected_usage(rec.api, rec.body, rec.model)["cached_input_tokens"] == 4


def test_gemini_stream_array_and_sse(srv):
    arr = httpx2.post(gemini_url(srv, "gemini-2.5-pro-thinking", "streamGenerateContent", f"?key={GEMINI_KEY}"),
                      json=GEMINI_BODY)
    assert arr.headers["content-type"].startswith("application/json")
    items = arr.json()
    assert len(items) == len(ANSWER_PIECES)
    assert "".join(i["candidates"][0]["content"]["parts"][0]["text"] for i in items) == ANSWER
    assert "candidatesTokenCount" not in items[0]["usageMetadata"]
    assert items[-1]["usageMetadata"].items() >= {"candidatesTokenCount": 8, "thoughtsTokenCount": 3,
                                                  "totalTokenCount": 23}.items()
    sse = httpx2.post(gemini_url(srv, "gemini-2.5-flash", "streamGenerateContent", "?alt=sse"), json=GEMINI_BODY,
                      headers={"x-goog-api-key": GEMINI_KEY})
    assert sse.headers["content-type"].startswith("text/event-stream") and b"\r\n\r\n" in sse.content
    events = [json.loads(d) for _, d in iter_sse(sse.content)]
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 8


def test_gemini_auth_and_extras(srv):
    wrong = httpx2.post(gemini_url(srv, "g", "generateContent", "?key=nope"), json=GEMINI_BODY)
    assert wrong.status_code == 400 and wrong.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert httpx2.post(gemini_url(srv, "g", "generateContent"), json=GEMINI_BODY).status_code == 403
    err = httpx2.post(gemini_url(srv, "g-error-503", "generateContent"), json=GEMINI_BODY,
                      headers={"x-goog-api-key": GEMINI_KEY})
    assert err.status_code == 503 and err.json()["error"]["status"] == "UNAVAILABLE"
    count = httpx2.post(gemini_url(srv, "g", "countTokens"), json=GEMINI_BODY, headers={"x-goog-api-key": GEMINI_KEY})
    assert count.json() == {"totalTokens": 12}
    models = httpx2.get(srv.url("gemini") + "/v1beta/models", headers={"x-goog-api-key": GEMINI_KEY}).json()
    assert models["models"][0]["name"].startswith("models/")


# ------------------------------------------------------------------ knobs: pacing, die, hang, gzip
def test_paced_stream_reaches_the_client_event_by_event(srv):
    c = oai(srv)
    t0 = time.monotonic()
    stamps = [time.monotonic() - t0 for _ in c.chat.completions.create(model="gpt-4o-mini-paced-150",
                                                                        messages=MSGS, stream=True)]
    assert stamps[0] < 0.5
    assert stamps[-1] >= 0.15 * (len(stamps) - 1) * 0.9  # ≥ 8 content events, 150 ms apart
    assert stamps[4] - stamps[0] >= 0.5


def test_die_cuts_the_stream_without_usage(srv):
    got = []
    with pytest.raises(openai.APIError):
        for ch in oai(srv).chat.completions.create(model="gpt-4o-mini-die", messages=MSGS, stream=True,
                                                   stream_options={"include_usage": True}):
            got.append(ch)
    assert len(got) == 2 and all(ch.usage is None for ch in got)
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.post(srv.url("anthropic") + "/v1/messages",
                    json={"model": "c-die", "max_tokens": 5, "messages": MSGS[1:]},
                    headers={"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"})


def test_hang_never_answers_and_others_go_on(srv):
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(srv.url("openai") + "/v1/chat/completions", json={"model": "m-hang", "messages": MSGS},
                    headers={"authorization": f"Bearer {OPENAI_KEY}"}, timeout=0.5)
    assert oai(srv).chat.completions.create(model="m", messages=MSGS).usage.total_tokens == 20


def test_gzip_json_and_sse(srv):
    hdr = {"authorization": f"Bearer {OPENAI_KEY}", "accept-encoding": "gzip"}
    r = httpx2.post(srv.url("openai") + "/v1/chat/completions", json={"model": "m-gzip", "messages": MSGS}, headers=hdr)
    assert r.headers["content-encoding"] == "gzip" and r.json()["usage"]["total_tokens"] == 20
    t0, stamps = time.monotonic(), []
    with httpx2.stream("POST", srv.url("openai") + "/v1/chat/completions", headers=hdr,
                       json={"model": "m-gzip-paced-100", "messages": MSGS, "stream": True}) as resp:
        assert resp.headers["content-encoding"] == "gzip"
        raw = b""
        for part in resp.iter_bytes():  # decoded as it arrives
            stamps.append(time.monotonic() - t0)
            raw += part
    assert stamps[0] < 0.5 and stamps[-1] > 0.8 and len(stamps) >= 8
    deltas = [json.loads(d)["choices"][0]["delta"].get("content") for _, d in iter_sse(raw) if d != "[DONE]"]
    assert "".join(filter(None, deltas)) == ANSWER
    assert oai(srv).chat.completions.create(model="x-gzip", messages=MSGS).choices[0].message.content == ANSWER


# ------------------------------------------------------------------ HTTP/1.1 details and concurrency
def test_chunked_request_body_expect_continue_and_keep_alive(srv):
    body = json.dumps({"model": "m", "messages": MSGS}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + OPENAI_KEY.encode()
                  + b"\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        f = s.makefile("rb")
        status, head = f.readline(), list(iter(f.readline, b"\r\n"))
        length = next(int(line.split(b":")[1]) for line in head if line.lower().startswith(b"content-length"))
        assert status.startswith(b"HTTP/1.1 200") and json.loads(f.read(length))["usage"]["prompt_tokens"] == 12
        s.sendall(b"GET /_standin/health HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection
        assert f.readline().startswith(b"HTTP/1.1 200")
    assert srv.requests[-1].body == body


def test_forty_concurrent_paced_streams(srv):
    async def one(client: httpx2.AsyncClient, i: int) -> str:
        async with client.stream("POST", "/v1/chat/completions", json={"model": "m-paced-100", "messages": MSGS,
                                                                       "stream": True}) as r:
            return (await r.aread()).decode()

    async def run() -> list[str]:
        limits = httpx2.Limits(max_connections=100)
        async with httpx2.AsyncClient(base_url=srv.url("openai"), limits=limits, timeout=20,
                                      headers={"authorization": f"Bearer {OPENAI_KEY}"}) as client:
            return await asyncio.gather(*(one(client, i) for i in range(45)))

    t0 = time.monotonic()
    bodies = asyncio.run(run())
    assert time.monotonic() - t0 < 5  # one stream takes ~1 s; serially it would be 45 s
    assert all(b.endswith("data: [DONE]\n\n") for b in bodies) and len(srv.requests) == 45


def test_control_api(srv):
    oai(srv).chat.completions.create(model="m", messages=MSGS)
    listed = json.load(urllib.request.urlopen(srv.url() + "/_standin/requests"))
    assert [(r["provider"], r["api"], r["path"]) for r in listed] == [
        ("openai", "openai.chat", "/openai/v1/chat/completions")]
    assert json.loads(listed[0]["body"])["model"] == "m"
    urllib.request.urlopen(urllib.request.Request(srv.url() + "/_standin/clear", method="POST"))
    assert srv.requests == []


def test_unlisted_provider_falls_back_to_its_family_key():
    with Standin(real_keys={"openai": "sk-o", "groq": "gsk-g"}) as s:
        c = openai.OpenAI(api_key="gsk-g", base_url=s.url("groq") + "/openai/v1", max_retries=0)
        assert c.chat.completions.create(model="llama", messages=MSGS).usage.total_tokens == 20
        c2 = openai.OpenAI(api_key="sk-o", base_url=s.url("mistral") + "/v1", max_retries=0)
        assert c2.chat.completions.create(model="m", messages=MSGS).usage.total_tokens == 20
        assert [r.provider for r in s.requests] == ["groq", "mistral"]


def test_stop_ends_hung_connections():
    s = Standin()
    port = s.start()
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": "m-hang", "messages": MSGS}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (OPENAI_KEY.encode(), len(body), body))
    time.sleep(0.2)
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 3
    sock.settimeout(2)
    assert sock.recv(10) == b""
    sock.close()


def test_runs_as_a_subprocess(tmp_path):
    port_file = tmp_path / "port"
    env = {**os.environ, "STANDIN_REAL_KEYS": json.dumps({"openai": "sk-sub"})}
    proc = subprocess.Popen([sys.executable, str(Path(standin.__file__)), "--port", "0", "--port-file", str(port_file)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        c = openai.OpenAI(api_key="sk-sub", base_url=base + "/openai/v1", max_retries=0)
        assert c.chat.completions.create(model="m", messages=MSGS).usage.prompt_tokens == 12
        listed = httpx2.get(base + "/_standin/requests").json()
        assert listed[0]["headers"]["authorization"] == "Bearer sk-sub"
        assert httpx2.post(base + "/_standin/clear").json() == {"cleared": True}
        assert httpx2.get(base + "/_standin/requests").json() == []
    finally:
        proc.terminate()
        assert proc.wait(10) == 0

