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


# --- metering holes: unpriced models, unmanaged LLM hosts ------------------------------------------------------


@pytest.fixture
def budgeted(tmp_path):
    """make(budgeting yaml, gateway yaml) -> (gateway, recorded ledger rows), key VKEY for alice."""
    made = []

    def make(budgeting: str, gateway: str = "{}"):
        (tmp_path / "p.yaml").write_text(
            f"gateway: {gateway}\n"
            f"providers: {{openai: {{api_key: {REAL}, base_url: 'http://127.0.0.1:9/openai/v1'}},"
            f" anthropic: {{api_key: {REAL}, base_url: 'http://127.0.0.1:9/anthropic'}}}}\n"
            f"budgeting: {budgeting}\n"
            f"analytics: {{database: {tmp_path / 'u.duckdb'}}}\n")
        g = Gateway()
        ctx = taddons.context(g)
        tctx = ctx.__enter__()
        tctx.configure(g, tollgate_policy=str(tmp_path / "p.yaml"))
        from datetime import datetime, timezone
        g.auth.set_keys({hash_key(VKEY): KeyRecord("vk_1", hash_key(VKEY), "alice",
                                                   datetime.now(timezone.utc), None, None, {})})
        rows = []
        g.ledger.record = rows.append
        made.append((g, ctx))
        return g, rows

    yield make
    for g, ctx in made:
        g.done()
        ctx.__exit__(None, None, None)


def _ask(g, f):
    g.requestheaders(f)
    if f.response is None:
        asyncio.run(g.request(f))
    return f


def _flow(host: str, path: bytes, body: dict | None, headers: dict[str, str], method: bytes = b"POST"):
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", path=path, method=method,
                                    content=json.dumps(body).encode() if body is not None else b""))
    f.request.headers.clear()
    f.request.headers.update({"host": host, **headers})
    return f


def _chat(model: str | None):
    body = {"messages": [{"role": "user", "content": "hi"}]} | ({"model": model} if model else {})
    return _flow("api.openai.com", b"/v1/chat/completions", body, {"authorization": f"Bearer {VKEY}"})


def test_unpriced_model_under_an_enforcing_budget_is_refused_natively(budgeted):
    g, _ = budgeted("{per_user: {limit_usd: 5}}")
    f = _ask(g, _chat("gpt-9-unpriced"))
    assert f.response.status_code == 403 and f.response.headers["x-should-retry"] == "false"
    err = json.loads(f.response.content)["error"]
    assert err["code"] == "model_not_priced" and err["type"] == "invalid_request_error"
    assert "openai:gpt-9-unpriced" in err["message"] and "budgeting.costs" in err["message"]
    ex = g.live[f.id]
    assert ex.outcome == "unpriced_model" and ex.reservation is None and ex.subject is None
    assert REAL not in str(f.request.headers)  # never forwarded
    assert g.controls.budgets.budgets()[0].reserved == 0

    a = _ask(g, _flow("api.anthropic.com", b"/v1/messages",
                      {"model": "claude-9-unpriced", "max_tokens": 5, "messages": []}, {"x-api-key": VKEY}))
    body = json.loads(a.response.content)
    assert a.response.status_code == 403 and body["error"]["type"] == "permission_error"
    assert "anthropic:claude-9-unpriced" in body["error"]["message"]


def test_model_calls_without_a_model_are_unpriced_but_model_lists_pass(budgeted):
    g, _ = budgeted("{per_user: {limit_usd: 5}}")
    f = _ask(g, _chat(None))
    assert f.response.status_code == 403 and "names no model" in json.loads(f.response.content)["error"]["message"]
    models = _ask(g, _flow("api.openai.com", b"/v1/models", None, {"authorization": f"Bearer {VKEY}"}, b"GET"))
    assert models.response is None  # forwarded
    listing = _ask(g, _flow("api.openai.com", b"/v1/chat/completions", None,
                            {"authorization": f"Bearer {VKEY}"}, b"GET"))  # stored completions: not a model call
    assert listing.response is None
    priced = _ask(g, _chat("gpt-4o-mini"))
    assert priced.response is None and g.live[priced.id].reservation is not None


@pytest.mark.parametrize("budgeting", ["{per_user: {limit_usd: 5}, unpriced: allow}",
                                       "{per_user: {limit_usd: 5, mode: track}}", "{}"])
def test_unpriced_allowed_or_tracked_is_forwarded(budgeted, budgeting):
    g, _ = budgeted(budgeting)
    f = _ask(g, _chat("gpt-9-unpriced"))
    assert f.response is None and g.live[f.id].outcome == "ok"
    assert f.request.headers["authorization"] == f"Bearer {REAL}"


def _connect(host: str, port: int = 443):
    f = tflow.tflow(req=tutils.treq(method=b"CONNECT", host=host, port=port, path=b"", scheme=b"",
                                    authority=f"{host}:{port}".encode()))
    return f


def test_connect_to_an_unmanaged_llm_host_is_refused_and_logged(budgeted, caplog):
    g, rows = budgeted("{}")
    f = _connect("api.cohere.ai")
    with caplog.at_level("WARNING", "tollgate"):
        g.http_connect(f)
        g.http_connect(_connect("api.cohere.ai"))  # a second CONNECT: a row, no second warning
    assert f.response.status_code == 403
    text = f.response.content.decode()
    assert "api.cohere.ai:443" in text and "providers.cohere" in text and "unmanaged_llm_hosts: allow" in text
    assert [(r["outcome"], r["endpoint"], r["provider"], r["status_code"], r["token_source"]) for r in rows] == \
        [("unmanaged_host", "api.cohere.ai:443", None, 403, None)] * 2
    assert rows[0]["metadata"] == {"client": "127.0.0.1", "llm_api": "cohere"}
    assert len([r for r in caplog.records if "api.cohere.ai:443" in r.getMessage()]) == 1

    for managed in ("api.openai.com", "api.anthropic.com", "example.com"):
        ok = _connect(managed)
        g.http_connect(ok)
        assert ok.response is None
    assert len(rows) == 2


def test_connect_allowed_is_tunneled_and_still_logged(budgeted):
    g, rows = budgeted("{}", "{unmanaged_llm_hosts: allow}")
    f = _connect("myres.openai.azure.com")
    g.http_connect(f)
    assert f.response is None
    assert [(r["outcome"], r["endpoint"], r["status_code"]) for r in rows] == \
        [("unmanaged_host", "myres.openai.azure.com:443", 200)]


def test_absolute_form_plain_http_to_an_unmanaged_host(budgeted):
    g, rows = budgeted("{}")
    f = tflow.tflow(req=tutils.treq(host="api.perplexity.ai", port=80, scheme=b"http", path=b"/chat/completions"))
    g.requestheaders(f)
    assert f.response.status_code == 403
    assert json.loads(f.response.content)["error"]["code"] == "unmanaged_llm_host"
    assert [(r["outcome"], r["endpoint"]) for r in rows] == [("unmanaged_host", "api.perplexity.ai:80")]


def test_a_provider_host_in_capitals_is_still_the_provider(gw):
    g, _ = gw
    f = openai_flow(REAL)  # a real key presented directly, to a host allow_hosts intercepts whatever its case
    f.request.host = "API.OpenAI.com"
    g.requestheaders(f)
    assert f.response is not None and f.response.status_code == 401
    assert REAL not in str(f.request.headers)


# --- a stream the app stopped reading at its end -----------------------------------------------------------------

_SSE = (b'data: {"id":"c1","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b'data: {"id":"c1","model":"gpt-4o-mini","choices":[],'
        b'"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
        b'data: [DONE]\n\n')


@pytest.mark.parametrize("sent,outcome", [(_SSE, "ok"), (_SSE[:80], "client_aborted")])
def test_app_hanging_up_after_the_final_event_is_not_an_abort(budgeted, sent, outcome):
    """An SDK stops at [DONE]; a full connection pool then closes the socket before the upstream's end of
    message reaches mitmproxy, which reports "client disconnected": the answer was delivered all the same."""
    from mitmproxy import flow as mflow
    g, rows = budgeted("{}")
    f = _ask(g, _chat("gpt-4o-mini"))
    f.response = tutils.tresp(content=b"", headers=((b"content-type", b"text/event-stream"),))
    g.responseheaders(f)
    f.response.stream(sent)
    f.error = mflow.Error("Client disconnected.")
    asyncio.run(g.error(f))
    (row,) = rows
    assert row["outcome"] == outcome
    if outcome == "ok":
        assert (row["token_source"], row["input_tokens"], row["output_tokens"]) == ("provider", 7, 3)
        assert "client" not in f.comment.lower()
