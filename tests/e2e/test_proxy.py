"""The core data path as an app sees it: official SDKs and curl through HTTPS_PROXY to the real hostnames.

Each test checks three sides: what the app got, what the provider (the stand-in) saw, and the ledger row
an auditor reads with DuckDB from this process while the gateway runs.
"""
from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time

import anthropic
import openai
import pytest
from standin import expected_usage

from .harness import REAL_KEYS

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def app_env(gateway, monkeypatch):
    """The app's shell after `eval "$(tollgate env)"`: proxy and CA bundle from the environment only."""
    for k, v in gateway.env.items():
        monkeypatch.setenv(k, v)
    return gateway.env


@pytest.fixture(scope="module")
def alice(gateway):
    return gateway.create_key("alice", "--meta", "project=demo", live=True)


def last_request(standin, api_prefix: str):
    reqs = [r for r in standin.requests if r.path.startswith(api_prefix)]
    assert reqs, f"the provider saw no request under {api_prefix}"
    return reqs[-1]


def row_for(gateway, since: float) -> dict:
    """The one ledger row of the request a test made after `since`."""
    rows = gateway.rows(wait_for=1, since=since)
    time.sleep(0.3)  # one more flush interval: a second row would be a bug
    rows = gateway.rows(since=since)
    assert len(rows) == 1, rows
    return rows[0]


def assert_usage(row: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert row[k] == v, (k, row[k], v)
    assert row["token_source"] == "provider"


# --- OpenAI ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat(gateway, standin, alice, app_env, stream):
    n = time.time()
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    if stream:
        chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True))
        # The app did not ask for usage: it must not get the extra usage-only chunk the gateway asked for.
        assert all(c.choices for c in chunks), [c for c in chunks if not c.choices]
        assert all(c.usage is None for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        text = r.choices[0].message.content
        assert r.usage.prompt_tokens == 12
    assert text
    seen = last_request(standin, "/openai/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {REAL_KEYS['openai']}"
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("openai.chat", {"model": "gpt-4o-mini", "messages": msgs}))
    assert (row["provider"], row["model"], row["user_id"], row["outcome"], row["stream"]) == \
        ("openai", "gpt-4o-mini", "alice", "ok", stream)
    assert row["endpoint"] == "/v1/chat/completions"
    assert json.loads(row["metadata"]) == {"project": "demo"}
    assert row["key_id"] == alice["key_id"]
    assert row["cost_usd"] is not None and row["cost_usd"] > 0
    assert row["latency_ms"] > 0 and row["ttft_ms"] > 0


def test_openai_stream_with_usage_requested_keeps_it(gateway, standin, alice, app_env):
    n = time.time()
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini-cached", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 11
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("openai.chat", {"model": "gpt-4o-mini-cached", "messages": [{}]}))


@pytest.mark.parametrize("stream", [False, True])
def test_openai_responses(gateway, standin, alice, app_env, stream):
    n = time.time()
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    if stream:
        events = list(client.responses.create(model="o4-mini", input="hello", instructions="x", stream=True))
        assert events[-1].type == "response.completed"
    else:
        r = client.responses.create(model="o4-mini", input="hello", instructions="x")
        assert r.output_text
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("openai.responses", {"model": "o4-mini", "input": "hello", "instructions": "x"}))
    assert row["reasoning_tokens"] == 3 and row["endpoint"] == "/v1/responses"


def test_openai_embeddings(gateway, standin, alice, app_env):
    n = time.time()
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    r = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert len(r.data) == 3
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("openai.embeddings", {"model": "text-embedding-3-small", "input": ["a", "b", "c"]}))


@pytest.mark.parametrize("stream", [False, True])
def test_openai_completions(gateway, standin, alice, app_env, stream):
    n = time.time()
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    r = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hello, world!", max_tokens=100,
                                  stream=stream)
    if stream:
        chunks = list(r)
        assert all(c.choices for c in chunks)
    else:
        assert r.choices[0].text
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("openai.completions", {"model": "x", "prompt": "Hello, world!"}))


def test_openai_models_list_is_metered_with_zero_tokens(gateway, standin, alice, app_env):
    n = time.time()
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    assert list(client.models.list())
    row = row_for(gateway, n)
    assert (row["endpoint"], row["input_tokens"], row["output_tokens"], row["outcome"]) == ("/v1/models", 0, 0, "ok")


def test_stream_reaches_the_app_as_it_is_produced(gateway, standin, alice, app_env):
    """A stream paced at 150 ms per event shows its first chunk in < 0.5 s (mitmproxy would buffer it)."""
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    t0 = time.monotonic()
    arrivals = []
    for _ in client.chat.completions.create(model="gpt-4o-mini-paced-150",
                                            messages=[{"role": "user", "content": "hi"}], stream=True):
        arrivals.append(time.monotonic() - t0)
    assert arrivals[0] < 0.5, arrivals
    assert arrivals[-1] - arrivals[0] > 1.0, arrivals  # spread out, not delivered in one lump


# --- Anthropic ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_messages(gateway, standin, alice, app_env, stream):
    n = time.time()
    client = anthropic.Anthropic(api_key=alice["key"], max_retries=0)
    kw = dict(model="claude-3-5-sonnet-cached", max_tokens=100, system="be brief",
              messages=[{"role": "user", "content": "hi"}])
    if stream:
        with client.messages.stream(**kw) as s:
            text = "".join(s.text_stream)
    else:
        text = client.messages.create(**kw).content[0].text
    assert text
    seen = last_request(standin, "/anthropic/v1/messages")
    creds = {seen.headers.get("x-api-key"), seen.headers.get("authorization", "").removeprefix("Bearer ")}
    assert REAL_KEYS["anthropic"] in creds
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("anthropic.messages", kw))
    assert row["cached_input_tokens"] == 4 and row["cache_write_tokens"] == 2
    assert row["provider"] == "anthropic" and row["stream"] == stream


# --- Gemini and curl ---------------------------------------------------------------------------------

def curl(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("how", ["header", "query"])
def test_gemini_generate_with_curl(gateway, standin, alice, app_env, how):
    n = time.time()
    url = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
    body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]})
    auth = ["-H", f"x-goog-api-key: {alice['key']}"] if how == "header" else []
    if how == "query":
        url += f"?key={alice['key']}"
    r = curl(app_env, url, "-H", "content-type: application/json", *auth, "-d", body)
    assert r.returncode == 0, r.stderr
    assert "candidates" in json.loads(r.stdout)
    seen = last_request(standin, "/gemini/v1beta/models/")
    assert REAL_KEYS["gemini"] in (seen.headers.get("x-goog-api-key"), seen.query.get("key"))
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("gemini.generate", json.loads(body), model="gemini-2.0-flash"))
    assert row["model"] == "gemini-2.0-flash"


@pytest.mark.parametrize("sse", [True, False])
def test_gemini_stream_with_curl(gateway, standin, alice, app_env, sse):
    n = time.time()
    url = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    if sse:
        url += "?alt=sse"
    body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}, {"parts": [{"text": "again"}]}]})
    r = curl(app_env, "-N", url, "-H", f"x-goog-api-key: {alice['key']}", "-H", "content-type: application/json",
             "-d", body)
    assert r.returncode == 0, r.stderr
    row = row_for(gateway, n)
    assert row["stream"] is True
    assert_usage(row, expected_usage("gemini.stream_generate", json.loads(body), model="gemini-2.0-flash"))


def test_gzip_stream_is_decoded_and_metered(gateway, standin, alice, app_env):
    n = time.time()
    client = openai.OpenAI(api_key=alice["key"], max_retries=0)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini-gzip",
                                                 messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    row = row_for(gateway, n)
    assert_usage(row, expected_usage("openai.chat", {"model": "gpt-4o-mini-gzip", "messages": [{}]}))



@pytest.mark.parametrize("model", ["gpt-4o-mini-length", "gpt-4o-mini-length-gzip"])
def test_stream_sent_with_a_length_keeps_the_app_connection(gateway, standin, alice, model):
    """An upstream that sends a stream whole with Content-Length (caches, some compatible servers). Blanking
    the usage the gateway asked for keeps the length, so the Content-Length stays; decoding gzip changes
    it, so that answer is re-framed as chunked instead of ending at connection close. Either way the
    app's kept-alive connection serves the next request."""
    ctx = ssl.create_default_context(cafile=str(gateway.confdir / "mitmproxy-ca-cert.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=ctx, timeout=30)
    conn.set_tunnel("api.openai.com", 443)
    body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    n = time.time()
    socks = []
    for _ in range(2):
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {alice['key']}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        socks.append(conn.sock)
        assert resp.status == 200
        if "gzip" in model:
            assert resp.getheader("transfer-encoding") == "chunked" and resp.getheader("content-length") is None
        else:
            assert resp.getheader("content-length") == str(len(data)) and resp.getheader("transfer-encoding") is None
        assert resp.getheader("content-encoding") is None  # decoded for the app
        assert not resp.will_close
        assert b"data: [DONE]" in data and b'"usage"' not in data  # the usage the gateway asked for is gone
    assert socks[0] is socks[1] and socks[0] is not None
    conn.close()
    rows = gateway.rows(wait_for=2, since=n)
    assert [r["token_source"] for r in rows] == ["provider", "provider"]


# --- keys --------------------------------------------------------------------------------------------

def test_unknown_key_refused_and_provider_untouched(gateway, standin, app_env):
    n = time.time()
    before = len(standin.requests)
    client = openai.OpenAI(api_key="tg-not-a-real-virtual-key-000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "invalid_api_key"
    # A real provider key presented directly is refused too: it would bypass metering.
    client = anthropic.Anthropic(api_key=REAL_KEYS["anthropic"], max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="claude-3-5-haiku", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert len(standin.requests) == before
    rows = gateway.rows(wait_for=2, since=n)
    assert [r["outcome"] for r in rows] == ["unauthorized", "unauthorized"]
    assert [r["status_code"] for r in rows] == [401, 401]


def test_revocation_takes_effect_within_2s(gateway, standin, app_env):
    key = gateway.create_key("bob")
    client = openai.OpenAI(api_key=key["key"], max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    deadline = time.monotonic() + 2.5  # a new key too is honoured within the same bound
    while True:
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "new key not honoured within 2 s"
            time.sleep(0.1)
    gateway.tollgate("keys", "revoke", key["key_id"])
    revoked_at = time.monotonic()
    while True:
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        except openai.AuthenticationError as e:
            assert "revoked" in e.message
            break
        assert time.monotonic() - revoked_at < 2.0, "revoked key still accepted after 2 s"
        time.sleep(0.1)
