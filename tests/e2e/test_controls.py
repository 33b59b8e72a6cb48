"""Rate limits, budgets, alerts, restarts and hot reload, as an app and an operator see them.

Every test runs a real mitmdump with the gateway and talks to it through HTTPS_PROXY with the official SDKs;
the stand-in provider records what reached it, the ledger is read with DuckDB from this process and
`tollgate budgets` runs as the installed command.

The stand-in's usage for one user message: input 10 + 1 = 11 tokens, output 8 (19 in all). Prices are pinned
with `budgeting.costs` (USD per 1K tokens), so with PRICES one such answer costs exactly ACTUAL.
Keys are created before each gateway starts (the gateway loads them at start), so no liveness probe spends
anyone's rate limit.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_HALF_EVEN, Decimal

import anthropic
import openai
import pytest
import yaml
from standin import ANSWER

from .harness import REAL_KEYS, Gateway, base_policy

pytestmark = pytest.mark.timeout(120)

MSGS = [{"role": "user", "content": "hi"}]
TOKENS = 19  # 11 in + 8 out
PRICES = {"input_token": 0.001, "output_token": 0.01}  # USD per 1K tokens
ACTUAL = Decimal("0.000091")  # (11 * 0.001 + 8 * 0.01) / 1000
MAX_TOKENS = 8  # the stand-in answers 8 tokens: the reservation's output part is exact


# --- helpers -----------------------------------------------------------------------------------------------


def use(gw: Gateway, monkeypatch) -> None:
    """This process becomes the app's shell after `eval "$(tollgate env)"` for gw."""
    env = gw.env
    for k in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def gateways(tmp_path, standin, confdir, monkeypatch):
    """make(update, users, name) -> (gateway, {user: virtual key}); keys exist before the gateway starts.

    make.key_ids holds each user's key_id.
    """
    made: list[Gateway] = []

    def make(update, users, name: str = "gw") -> tuple[Gateway, dict[str, str]]:
        pol = base_policy(standin.port, tmp_path / name / "usage.duckdb")
        update(pol)
        gw = Gateway(tmp_path / name, pol, confdir)
        made.append(gw)
        made_keys = {u: gw.create_key(u) for u in users}
        make.key_ids.update({u: k["key_id"] for u, k in made_keys.items()})
        keys = {u: k["key"] for u, k in made_keys.items()}
        gw.start()
        use(gw, monkeypatch)
        return gw, keys

    make.key_ids = {}
    yield make
    for gw in made:
        gw.stop()


def calls(standin, model: str) -> int:
    """How many requests for `model` reached the provider."""
    return sum(1 for r in standin.requests if r.model == model)


def chat(client, model: str, **kw):
    return client.chat.completions.create(model=model, messages=MSGS, **kw)


def raw_chat(client, model: str, **kw):
    """(answer, headers) of a chat completion, through the SDK's raw-response accessor."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSGS, **kw)
    return raw.parse(), raw.headers


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def seconds(go_duration: str) -> float:
    """OpenAI's x-ratelimit-reset-* value ("20ms", "17.5s", "1m0s") in seconds."""
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = _DURATION.findall(go_duration)
    assert parts and "".join(n + u for n, u in parts) == go_duration, go_duration
    return sum(float(n) * scale[u] for n, u in parts)


def estimate(body: bytes, max_tokens: int, prices: dict = PRICES) -> Decimal:
    """The gateway's worst case for a request: ceil(bytes / 3) input tokens + max_tokens output, priced."""
    rough = -(-len(body) // 3)
    usd = (rough * Decimal(str(prices["input_token"])) + max_tokens * Decimal(str(prices["output_token"]))) / 1000
    return usd.quantize(Decimal("1e-9"), ROUND_HALF_EVEN)


def budgets(gw: Gateway) -> dict[str, dict]:
    out = gw.tollgate("budgets", "--json")
    return {b["id"]: b for b in json.loads(out[out.index("["):], parse_float=Decimal)}


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return got


def outcomes(gw: Gateway, since: float, n: int) -> list[str]:
    rows = gw.rows(since=since, wait_for=n)
    return [r["outcome"] for r in rows]


# --- rate limits ---------------------------------------------------------------------------------------------


def test_fourth_request_in_a_minute_is_refused_then_the_sdk_retry_passes(gateways, standin):
    gw, keys = gateways(lambda p: p.update(rate_limits={"per_user": {"requests_per_minute": 3,
                                                                     "tokens_per_minute": 1000}}), ["alice"])
    model = "gpt-4o-mini-rpm"
    t0 = time.time()
    client = openai.OpenAI(api_key=keys["alice"], max_retries=0)
    heads = [raw_chat(client, model)[1] for _ in range(3)]

    # Every metered answer carries OpenAI's headers for the tightest request and token limits.
    assert [h["x-ratelimit-limit-requests"] for h in heads] == ["3"] * 3
    assert [h["x-ratelimit-remaining-requests"] for h in heads] == ["2", "1", "0"]
    resets = [seconds(h["x-ratelimit-reset-requests"]) for h in heads]
    for i, r in enumerate(resets):  # 20 s per request: back to full after 20, 40, 60 s (less the time taken)
        assert 20 * (i + 1) - 10 < r <= 20 * (i + 1), resets
    assert [h["x-ratelimit-limit-tokens"] for h in heads] == ["1000"] * 3
    # Tokens are charged after each answer (19 each, 60 ms of the bucket apiece), so the next answer shows them.
    assert heads[0]["x-ratelimit-remaining-tokens"] == "1000" and heads[0]["x-ratelimit-reset-tokens"] == "0s"
    assert 1000 - TOKENS <= int(heads[1]["x-ratelimit-remaining-tokens"]) < 1000
    assert 1000 - 2 * TOKENS <= int(heads[2]["x-ratelimit-remaining-tokens"]) < 1000
    assert 0 < seconds(heads[2]["x-ratelimit-reset-tokens"]) <= 2 * TOKENS * 0.06
    assert calls(standin, model) == 3

    with pytest.raises(openai.RateLimitError) as refused:
        chat(client, model)
    e = refused.value
    assert (e.status_code, e.code, e.type) == (429, "rate_limit_exceeded", "requests")
    retry_after = int(e.response.headers["retry-after"])
    assert 10 <= retry_after <= 20, retry_after  # 20 s after the first request, less the time since
    assert "x-should-retry" not in e.response.headers  # waiting helps: let the SDK retry
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert calls(standin, model) == 3, "a refused request reached the provider"

    # The SDK's own retry (default max_retries=2) honours retry-after and gets through once the window allows.
    patient = openai.OpenAI(api_key=keys["alice"], timeout=60)
    began = time.monotonic()
    answer = chat(patient, model)
    waited = time.monotonic() - began
    assert answer.choices[0].message.content == ANSWER
    assert retry_after - 3 <= waited <= retry_after + 5, waited
    assert calls(standin, model) == 4
    assert outcomes(gw, t0, 6) == ["ok"] * 3 + ["rate_limited"] * 2 + ["ok"]


def test_tokens_per_minute_refuses_after_real_tokens_are_charged(gateways, standin):
    gw, keys = gateways(lambda p: p.update(rate_limits={"per_user": {"tokens_per_minute": 25}}), ["bob"])
    model = "gpt-4o-mini-tpm"
    t0 = time.time()
    client = openai.OpenAI(api_key=keys["bob"], max_retries=0)
    _, h1 = raw_chat(client, model)  # nothing charged yet: the bucket is full
    assert (h1["x-ratelimit-limit-tokens"], h1["x-ratelimit-remaining-tokens"]) == ("25", "25")
    _, h2 = raw_chat(client, model)  # the first answer's 19 real tokens are charged: 6 left, so it passes
    assert h2["x-ratelimit-remaining-tokens"] == "6"
    with pytest.raises(openai.RateLimitError) as refused:  # 38 tokens charged: over the limit
        chat(client, model)
    e = refused.value
    assert (e.status_code, e.code, e.type) == (429, "rate_limit_exceeded", "tokens")
    # Debt of 38 tokens at 2.4 s each, minus the bucket's 57.6 s of room: 33.6 s until one token is free.
    assert 25 <= int(e.response.headers["retry-after"]) <= 34
    assert e.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert calls(standin, model) == 2
    rows = gw.rows(since=t0, wait_for=3)
    assert [(r["outcome"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("ok", 11, 8), ("ok", 11, 8), ("rate_limited", 0, 0)]


# --- budgets -------------------------------------------------------------------------------------------------


# Every budget refusal currently breaks in the gateway: addon.py `_admit` calls `r.message()`, but
# budgets.Refusal.message is a property (a str), so the request hook raises TypeError and the request is
# refused with a native 500 gateway_error instead of 429 insufficient_quota (SDKs then retry a 500).
# Fix: `r.message()` -> `r.message` in tollgate/addon.py. Both tests pass with it.


def test_twelve_concurrent_requests_on_a_pooled_tier(gateways, standin):
    model = "gpt-4o-mini-delay-500"  # each answer takes 0.5 s: all 12 are in flight together
    # The exact body the SDK sends for this call (the SDK's serialization does not depend on where it sends).
    direct = openai.OpenAI(api_key=REAL_KEYS["openai"], base_url=f"http://127.0.0.1:{standin.port}/openai/v1",
                           max_retries=0)
    chat(direct, model, max_tokens=MAX_TOKENS)
    body = [r for r in standin.requests if r.model == model][-1].body
    worst = estimate(body, MAX_TOKENS)
    limit = (worst * Decimal("2.7")).quantize(Decimal("1e-9"))  # fits 2.7 requests' worst case
    assert worst >= ACTUAL and limit >= 2 * worst

    gw, keys = gateways(lambda p: p.update(budgeting={
        "tiers": [{"name": "pool", "limit_usd": float(limit), "reset": "monthly", "mode": "enforce",
                   "shared_users": ["u1", "u2"]}],
        "costs": {f"openai:{model}": PRICES}}), ["u1", "u2"])
    before = calls(standin, model)
    t0 = time.time()
    clients = [openai.OpenAI(api_key=keys[u], timeout=60) for u in ("u1", "u2")]  # default retries on
    start = threading.Barrier(12)

    def one(i: int):
        start.wait(timeout=30)
        try:
            return chat(clients[i % 2], model, max_tokens=MAX_TOKENS)
        except openai.RateLimitError as e:
            return e

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert 1 <= len(ok) <= 3, results
    assert len(ok) + len(refused) == 12
    for e in refused:
        assert (e.status_code, e.code) == (429, "insufficient_quota"), e
        assert e.response.headers["x-should-retry"] == "false"
        assert "tier 'pool' budget" in e.message
    # The refusal states the reservation it could not make: exactly the estimate computed from the body.
    held = [Decimal(m.group(1)) for e in refused if (m := re.search(r"may cost up to \$([\d.]+)", e.message))]
    assert held and set(held) == {worst}, (held, worst)
    assert calls(standin, model) == before + len(ok), "a refused request reached the provider"

    rows = gw.rows(since=t0, wait_for=12)
    time.sleep(0.5)  # a retried request would add rows now
    rows = gw.rows(since=t0)
    assert len(rows) == 12, "the SDKs retried a budget refusal"
    assert sorted(r["outcome"] for r in rows) == ["budget_exceeded"] * len(refused) + ["ok"] * len(ok)
    assert {r["tier"] for r in rows} == {"pool"} and {r["user_id"] for r in rows} == {"u1", "u2"}
    spent = sum(r["cost_usd"] for r in rows if r["outcome"] == "ok")
    assert spent == ACTUAL * len(ok)
    assert spent <= limit + ACTUAL  # no overshoot beyond one request
    print(f"\n12 concurrent on a pool fitting 2.7 worst cases (${worst} each, limit ${limit}): "
          f"{len(ok)} served, spent ${spent}")


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.posts.append((self.path, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.posts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_track_mode_never_refuses_and_alerts_once_per_threshold(gateways, standin, webhook):
    model = "gpt-4o-mini-track"
    url = f"http://127.0.0.1:{webhook.server_address[1]}/hook"
    gw, keys = gateways(lambda p: p.update(
        budgeting={"tiers": [{"name": "watch", "limit_usd": 0.0002, "reset": "daily", "mode": "track",
                              "shared_users": ["w1"], "alert_at": [0.25, 0.5, 1.0]}],
                   "costs": {f"openai:{model}": PRICES}},
        alerts={"webhook": url}), ["w1"])
    t0 = time.time()
    client = openai.OpenAI(api_key=keys["w1"], max_retries=0)
    # Spend after each answer: 91, 182, 273, 364, 455 micro-USD against a 200 limit. An enforcing tier
    # would refuse from the third on; tracking serves all and alerts at 50, 100 and 200.
    for _ in range(5):
        assert chat(client, model).choices[0].message.content == ANSWER
    assert calls(standin, model) == 5
    wait_for(lambda: len(webhook.posts) >= 3, 10, "three webhook POSTs")
    time.sleep(1.5)  # a repeated alert would arrive now
    assert [p for p, _ in webhook.posts] == ["/hook"] * 3
    alerts = [a for _, a in webhook.posts]
    assert [a["fraction"] for a in alerts] == [0.25, 0.5, 1.0]
    assert {(a["budget"], a["scope"], a["mode"], a["limit_usd"]) for a in alerts} == {
        ("watch", "tier", "track", "0.0002")}
    assert [Decimal(a["spent_usd"]) for a in alerts] == [ACTUAL, 2 * ACTUAL, 3 * ACTUAL]
    assert outcomes(gw, t0, 5) == ["ok"] * 5
    log = gw.output()
    for pct in ("25%", "50%", "100%"):
        assert len(re.findall(rf"budget tier 'watch' crossed {pct} of its limit", log)) == 1, log[-3000:]
    watch = budgets(gw)["tier:watch"]
    assert watch["mode"] == "track" and watch["spent"] == 5 * ACTUAL and watch["pct"] > 100


def test_restart_keeps_spend_and_refusals(gateways, standin):
    model = "gpt-4o-mini-restart"
    gw, keys = gateways(lambda p: p.update(budgeting={
        "tiers": [{"name": "small", "limit_usd": 0.0003, "reset": "monthly", "shared_users": ["r1"]}],
        "costs": {f"openai:{model}": PRICES}}), ["r1"])
    client = openai.OpenAI(api_key=keys["r1"], max_retries=0)
    served = 0
    for _ in range(10):  # spend until the budget refuses
        try:
            chat(client, model, max_tokens=MAX_TOKENS)
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota"
            break
        served += 1
    else:
        pytest.fail("the budget never refused")
    assert served == 3  # 3 x 91 spent + a 114 worst case > 300 micro-USD
    assert calls(standin, model) == served
    assert gw.stop() == 0

    gw.start()  # a new process on the same ledger
    t1 = time.time()
    began = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        chat(openai.OpenAI(api_key=keys["r1"]), model, max_tokens=MAX_TOKENS)  # default retries: none happen
    assert time.monotonic() - began < 5  # at once: no waiting for a window, no retry
    e = refused.value
    assert (e.code, e.response.headers["x-should-retry"]) == ("insufficient_quota", "false")
    assert "$0.000273 spent" in e.message, e.message
    assert calls(standin, model) == served, "refused after the restart, yet it reached the provider"
    assert outcomes(gw, t1, 1) == ["budget_exceeded"]

    small = wait_for(lambda: (b := budgets(gw)["tier:small"])["reserved"] is not None and b, 5,
                     "the restarted gateway's live status")
    assert (small["spent"], small["limit"], small["reserved"]) == (served * ACTUAL, Decimal("0.0003"), 0)
    table = gw.tollgate("budgets")
    line = next(ln for ln in table.splitlines() if ln.startswith("small "))
    assert line.split()[:7] == ["small", "tier", "enforce", "0.000273", "0.0003", "91.0%", "0.00"], table


# --- policy --------------------------------------------------------------------------------------------------


def edit_policy(gw: Gateway, change) -> None:
    pol = yaml.safe_load(gw.policy_file.read_text())
    change(pol)
    gw.policy_file.write_text(yaml.safe_dump(pol))


def test_hot_reload_good_and_broken(gateways, standin):
    gw, keys = gateways(lambda p: p.update(rate_limits={"per_user": {"requests_per_minute": 1}}), ["hot"])
    model = "gpt-4o-mini-reload"
    client = openai.OpenAI(api_key=keys["hot"], max_retries=0)
    chat(client, model)
    with pytest.raises(openai.RateLimitError):
        chat(client, model)

    edit_policy(gw, lambda p: p["rate_limits"]["per_user"].update(requests_per_minute=100))
    edited = time.monotonic()
    while True:
        try:
            _, headers = raw_chat(client, model)
            break
        except openai.RateLimitError:
            assert time.monotonic() - edited < 2.0, "the edit did not take effect within 2 s"
            time.sleep(0.05)
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert "policy reloaded from" in gw.output()

    # A broken edit: it would bring back 1 per minute, but a typo'd key makes the whole file invalid.
    edit_policy(gw, lambda p: p["rate_limits"].update(per_user={"requests_per_minute": 1, "tokens_per_minut": 9}))
    refused_lines = lambda: [ln for ln in gw.output().splitlines() if "policy change refused" in ln]  # noqa: E731
    (line,) = wait_for(refused_lines, 3, "the gateway to refuse the broken policy")
    assert str(gw.policy_file) in line and "rate_limits.per_user.tokens_per_minut" in line, line
    assert "previous policy stays in force" in line
    # Still 100 per minute. (The raise kept the bucket's fraction used, so requests pass one per 0.6 s for
    # now.) Under the broken file's 1 per minute the next request would wait a minute.
    for _ in range(2):
        time.sleep(0.65)
        _, headers = raw_chat(client, model)
        assert headers["x-ratelimit-limit-requests"] == "100"
    time.sleep(1.2)  # another poll of the unchanged file must not log again
    assert len(refused_lines()) == 1


def test_identity_comes_from_the_key_never_the_body(gateways, standin):
    model, claude = "gpt-4o-mini-ident", "claude-3-5-haiku-ident"
    gw, keys = gateways(lambda p: p.update(budgeting={
        # The victim's tier allows nothing: a request charged to the victim would be refused.
        "tiers": [{"name": "locked", "limit_usd": 0, "shared_users": ["victim"]}],
        "per_user": {"limit_usd": 1},
        "costs": {f"openai:{model}": PRICES, f"anthropic:{claude}": PRICES}}), ["mallory", "victim"])
    t0 = time.time()
    answer = chat(openai.OpenAI(api_key=keys["mallory"], max_retries=0), model, max_tokens=MAX_TOKENS,
                  user="victim")
    assert answer.choices[0].message.content == ANSWER
    msg = anthropic.Anthropic(api_key=keys["mallory"], max_retries=0).messages.create(
        model=claude, max_tokens=MAX_TOKENS, messages=MSGS, metadata={"user_id": "victim"})
    assert msg.content[0].text == ANSWER
    seen = [r.json() for r in standin.requests if r.model in (model, claude)]
    assert seen[-2]["user"] == "victim" and seen[-1]["metadata"] == {"user_id": "victim"}  # forwarded as is

    rows = gw.rows(since=t0, wait_for=2)
    assert [(r["user_id"], r["tier"], r["outcome"]) for r in rows] == [("mallory", None, "ok")] * 2
    assert {r["key_id"] for r in rows} == {gateways.key_ids["mallory"]}
    assert [json.loads(r["metadata"]) for r in rows] == [{}, {}]
    state = budgets(gw)
    assert state["user:mallory"]["spent"] == rows[0]["cost_usd"] + rows[1]["cost_usd"] == 2 * ACTUAL
    assert (state["tier:locked"]["spent"], state["tier:locked"]["limit"]) == (0, 0)
    assert "user:victim" not in state
