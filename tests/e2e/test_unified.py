"""The brief's unified API: base_url=http://localhost:PORT/v1 with provider:model, beside the proxy."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
from standin import expected_usage

from .harness import REAL_KEYS, free_port

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, standin, confdir):
    from .harness import Gateway, base_policy

    d = tmp_path_factory.mktemp("unified")
    pol = base_policy(standin.port, d / "usage.duckdb")
    port = free_port()
    pol["gateway"]["port"] = port
    # Both modes draw on the same limits and budget: a per-key limit both can be seen to count against.
    pol["rate_limits"] = {"per_key": {"requests_per_day": 1000}}
    g = Gateway(d, pol, confdir, ["--mode", f"reverse:http://tollgate.invalid:1@{port}"]).start()
    g.api = f"http://127.0.0.1:{port}"
    yield g
    g.stop()


@pytest.fixture(scope="module")
def key(gw):
    k = gw.create_key("carol")
    time.sleep(2)  # a running gateway honours a new key within 2 s
    return k


def client(gw, key, **kw):
    return openai.OpenAI(base_url=f"{gw.api}/v1", api_key=key["key"], max_retries=0, **kw)


def one_row(gw, since):
    rows = gw.rows(wait_for=1, since=since)
    time.sleep(0.3)
    rows = gw.rows(since=since)
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("provider,path", [("openai", "/openai/v1/chat/completions"),
                                           ("anthropic", "/anthropic/v1/chat/completions"),
                                           ("gemini", "/gemini/v1beta/openai/chat/completions")])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_routed_by_provider_prefix(gw, standin, key, provider, path, stream):
    model = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku", "gemini": "gemini-2.0-flash"}[provider]
    msgs = [{"role": "user", "content": "Hello, world!"}]
    t0 = time.time()
    c = client(gw, key)
    if stream:
        chunks = list(c.chat.completions.create(model=f"{provider}:{model}", messages=msgs, stream=True))
        assert all(ch.choices for ch in chunks)  # the usage chunk the gateway asked for is not passed on
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    else:
        r = c.chat.completions.create(model=f"{provider}:{model}", messages=msgs)
        text = r.choices[0].message.content
    assert text
    seen = [r for r in standin.requests if r.path == path][-1]
    assert json.loads(seen.body)["model"] == model  # the prefix is stripped before forwarding
    assert seen.headers["authorization"] == f"Bearer {REAL_KEYS[provider]}"
    row = one_row(gw, t0)
    exp = expected_usage("openai.chat", {"model": model, "messages": msgs})
    assert (row["provider"], row["model"], row["user_id"], row["stream"]) == (provider, model, "carol", stream)
    assert (row["input_tokens"], row["output_tokens"], row["token_source"]) == \
        (exp["input_tokens"], exp["output_tokens"], "provider")


def test_the_briefs_client_code(gw, standin, key):
    """client.completions.create(model="openai:gpt-4o-mini", prompt="Hello, world!", max_tokens=100)"""
    t0 = time.time()
    response = client(gw, key).completions.create(model="openai:gpt-4o-mini", prompt="Hello, world!", max_tokens=100)
    assert response.choices[0].text
    chunks = list(client(gw, key).completions.create(model="openai:gpt-4o-mini", prompt="Hello, world!",
                                                      max_tokens=100, stream=True))
    assert chunks and all(ch.choices for ch in chunks)
    rows = gw.rows(wait_for=2, since=t0)
    assert [(r["provider"], r["model"], r["endpoint"], r["input_tokens"]) for r in rows] == \
        [("openai", "gpt-4o-mini", "/v1/completions", 11)] * 2


def test_embeddings_and_responses(gw, standin, key):
    t0 = time.time()
    c = client(gw, key)
    assert len(c.embeddings.create(model="openai:text-embedding-3-small", input=["a", "b"]).data) == 2
    assert c.responses.create(model="openai:gpt-4o-mini", input="hi").output_text
    rows = gw.rows(wait_for=2, since=t0)
    assert sorted(r["endpoint"] for r in rows) == ["/v1/embeddings", "/v1/responses"]
    assert all(r["token_source"] == "provider" and r["input_tokens"] > 0 for r in rows)


def test_unprefixed_model_goes_to_the_default_provider(gw, standin, key):
    t0 = time.time()
    client(gw, key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert one_row(gw, t0)["provider"] == "openai"


def test_unknown_provider_prefix_is_a_clear_openai_error(gw, standin, key):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw, key).chat.completions.create(model="nope:model", messages=[{"role": "user", "content": "x"}])
    assert "provider:model" in e.value.message


def test_brief_curl_models_requires_a_key(gw, key):
    def curl(*args):
        return subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args, f"{gw.api}/v1/models"],
                              capture_output=True, text=True, timeout=30).stdout.rsplit("\n", 1)

    body, code = curl("-H", f"Authorization: Bearer {key['key']}")
    assert code == "200"
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert any(i.startswith("openai:") for i in ids) and any(i.startswith("anthropic:") for i in ids)
    body, code = curl()
    assert code == "401" and json.loads(body)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_health_without_a_key(gw, path):
    with urllib.request.urlopen(f"{gw.api}{path}", timeout=10) as r:
        body = json.loads(r.read())
    assert r.status == 200 and body["status"] in ("ok", "ready")
    assert not any(k in json.dumps(body) for k in REAL_KEYS.values())


def test_same_key_both_modes_same_limits(gw, standin, key, monkeypatch):
    """One virtual key, two doors: both are metered into one ledger and counted by one limiter."""
    for k, v in gw.env.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    via_proxy = openai.OpenAI(api_key=key["key"], max_retries=0).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    via_api = client(gw, key).chat.completions.with_raw_response.create(
        model="openai:gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    left_proxy = int(via_proxy.headers["x-ratelimit-remaining-requests"])
    left_api = int(via_api.headers["x-ratelimit-remaining-requests"])
    assert left_api == left_proxy - 1
    rows = gw.rows(wait_for=2, since=t0)
    assert {r["key_id"] for r in rows} == {key["key_id"]} and len(rows) == 2
