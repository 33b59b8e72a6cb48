"""The hooks with mitmproxy's own test helpers (taddons/tflow); the e2e tests cover real processes."""
import asyncio
import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from tollgate import addon as addon_mod
from tollgate.addon import REDACTED, Gateway
from tollgate.keys import KeyRecord, hash_key

REAL = "sk-real-openai-key-000000000000000000"
VKEY = "tg-unit-test-virtual-key-0000000000000000000"


@pytest.fixture
def gw(tmp_path):
    (tmp_path / "p.yaml").write_text(
        f"providers: {{openai: {{api_key: {REAL}, base_url: 'http://127.0.0.1:9/openai/v1'}}}}\n"
        f"analytics: {{database: {tmp_path / 'u.duckdb'}}}\n")
    g = Gateway()
    with taddons.context(g) as tctx:
        tctx.configure(g, tollgate_policy=str(tmp_path / "p.yaml"))
        from datetime import datetime, timezone
        g.auth.set_keys({hash_key(VKEY): KeyRecord("vk_1", hash_key(VKEY), "alice",
                                                   datetime.now(timezone.utc), None, None, {})})
        yield g, tctx
        g.done()


def openai_flow(key: str | None):
    f = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", path=b"/v1/chat/completions",
                                    content=json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()))
    f.request.headers.clear()
    f.request.headers["host"] = "api.openai.com"
    if key:
        f.request.headers["authorization"] = f"Bearer {key}"
    return f


def test_only_provider_hosts_are_intercepted(gw):
    g, tctx = gw
    assert tctx.options.allow_hosts == [r"^api\.openai\.com:\d+$", r"^tollgate\.invalid:1$"]


def test_virtual_key_swapped_and_redirected(gw):
    g, _ = gw
    f = openai_flow(VKEY)
    g.requestheaders(f)
    assert f.request.headers["authorization"] == f"Bearer {REDACTED}:vk_1"  # what mitmweb first sees
    asyncio.run(g.request(f))
    assert f.response is None
    assert f.request.headers["authorization"] == f"Bearer {REAL}"
    assert (f.request.scheme, f.request.host, f.request.port, f.request.path) == \
        ("http", "127.0.0.1", 9, "/openai/v1/chat/completions")
    f.response = tutils.tresp(content=b"{}")
    g.responseheaders(f)
    assert REAL not in f.request.headers["authorization"]


@pytest.mark.parametrize("key", [None, "tg-unknown-000000000000000000000000", REAL])
def test_other_credentials_refused_natively(gw, key):
    g, _ = gw
    f = openai_flow(key)
    g.requestheaders(f)
    assert f.response is not None and f.response.status_code == 401
    assert json.loads(f.response.content)["error"]["code"] == "invalid_api_key"
    assert REAL not in str(f.request.headers)


def test_a_failing_hook_refuses_instead_of_forwarding(gw, monkeypatch):
    g, _ = gw
    f = openai_flow(VKEY)
    g.requestheaders(f)

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(addon_mod.prov, "request_facts", boom)
    asyncio.run(g.request(f))
    assert f.response is not None and f.response.status_code == 500
    assert g.live[f.id].outcome == "gateway_error"


def test_bad_policy_is_an_options_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("providers: {openai: {api_kye: x}}\n")
    g = Gateway()
    with taddons.context(g) as tctx:
        with pytest.raises(exceptions.OptionsError, match="providers.openai.api_kye: unknown key"):
            tctx.configure(g, tollgate_policy=str(tmp_path / "bad.yaml"))


def test_spent_budget_is_a_native_429_that_says_do_not_retry(tmp_path):
    (tmp_path / "p.yaml").write_text(
        f"providers: {{openai: {{api_key: {REAL}}}}}\n"
        "budgeting: {per_user: {limit_usd: 0, reset: daily, mode: enforce}}\n"
        f"analytics: {{database: {tmp_path / 'u.duckdb'}}}\n")
    g = Gateway()
    with taddons.context(g) as tctx:
        tctx.configure(g, tollgate_policy=str(tmp_path / "p.yaml"))
        from datetime import datetime, timezone
        g.auth.set_keys({hash_key(VKEY): KeyRecord("vk_1", hash_key(VKEY), "alice",
                                                   datetime.now(timezone.utc), None, None, {})})
        f = openai_flow(VKEY)
        g.requestheaders(f)
        asyncio.run(g.request(f))
        g.done()
    assert f.response.status_code == 429
    assert f.response.headers["x-should-retry"] == "false"
    assert json.loads(f.response.content)["error"]["code"] == "insufficient_quota"
