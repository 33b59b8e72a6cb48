"""Providers beyond the big three: OpenAI-compatible ones by name, Azure, custom entries."""
from __future__ import annotations

import time

import openai
import pytest

from .harness import REAL_KEYS

pytestmark = pytest.mark.timeout(120)


def policy(pol):
    up = pol["providers"]["openai"]["base_url"].rsplit("/openai/v1", 1)[0]
    pol["providers"].update({
        "groq": {"api_key": REAL_KEYS["openai"], "base_url": f"{up}/groq/openai/v1"},
        "azure": {"protocol": "azure", "hosts": ["myres.openai.azure.com"], "api_key": "azure-real-key-0000",
                  "base_url": f"{up}/azure"},
        "my-vllm": {"protocol": "openai", "hosts": ["vllm.internal"], "api_key": REAL_KEYS["openai"],
                    "base_url": f"{up}/openai"},
    })


@pytest.fixture(scope="module")
def gw(tmp_path_factory, standin, confdir):
    from standin import Standin  # noqa: F401  (the session stand-in accepts azure's key below)
    from .harness import Gateway, base_policy

    d = tmp_path_factory.mktemp("more")
    pol = base_policy(standin.port, d / "usage.duckdb")
    policy(pol)
    g = Gateway(d, pol, confdir).start()
    yield g
    g.stop()


@pytest.fixture
def app(gw, monkeypatch):
    for k, v in gw.env.items():
        monkeypatch.setenv(k, v)
    return gw.create_key("dora", live=True)


def test_openai_compatible_provider_by_name(gw, standin, app):
    t0 = time.time()
    c = openai.OpenAI(api_key=app["key"], base_url="https://api.groq.com/openai/v1", max_retries=0)
    assert c.chat.completions.create(model="llama-3.3-70b", messages=[{"role": "user", "content": "x"}]).choices
    seen = [r for r in standin.requests if r.path.startswith("/groq/")][-1]
    assert seen.headers["authorization"] == f"Bearer {REAL_KEYS['openai']}"
    row = gw.rows(wait_for=1, since=t0)[-1]
    assert (row["provider"], row["model"], row["input_tokens"], row["output_tokens"]) == ("groq", "llama-3.3-70b", 11, 8)


def test_custom_provider_on_its_own_host(gw, standin, app):
    t0 = time.time()
    c = openai.OpenAI(api_key=app["key"], base_url="https://vllm.internal/v1", max_retries=0)
    chunks = list(c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], stream=True))
    assert chunks and all(ch.choices for ch in chunks)
    row = gw.rows(wait_for=1, since=t0)[-1]
    assert (row["provider"], row["stream"], row["output_tokens"], row["token_source"]) == ("my-vllm", True, 8, "provider")


def test_azure_api_key_header_is_swapped(gw, standin, app):
    t0 = time.time()
    c = openai.AzureOpenAI(api_key=app["key"], azure_endpoint="https://myres.openai.azure.com",
                           api_version="2024-10-21", max_retries=0)
    try:
        c.chat.completions.create(model="gpt-4o-deploy", messages=[{"role": "user", "content": "x"}])
    except openai.APIStatusError:
        pass  # the stand-in may refuse azure's key; what matters is what it was sent
    seen = [r for r in standin.requests if "/deployments/" in r.path][-1]
    assert seen.headers.get("api-key") == "azure-real-key-0000"
    row = gw.rows(wait_for=1, since=t0)[-1]
    assert row["provider"] == "azure" and row["user_id"] == "dora"
