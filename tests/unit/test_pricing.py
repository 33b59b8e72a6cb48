"""tollgate.pricing: policy overrides, genai-prices parity, unknown models, speed, offline-ness."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings
from decimal import Decimal

import genai_prices
import pytest
from genai_prices import data_snapshot

from tollgate.pricing import QUANTUM, Pricer, genai_usage, parse_costs
from tollgate.usage import Usage

PLAIN = Usage(input_tokens=1000, output_tokens=500)
CACHED = Usage(
    input_tokens=1000, output_tokens=500, cached_input_tokens=200, cache_write_tokens=100, reasoning_tokens=50
)
USAGES = [
    Usage(),
    PLAIN,
    CACHED,
    # past the 200K tier of Claude/Gemini pricing: every token moves to the tier price
    Usage(input_tokens=300_000, output_tokens=20_000, cached_input_tokens=250_000, reasoning_tokens=5_000),
    Usage(input_tokens=150_000, output_tokens=7, cache_write_tokens=149_000),
    Usage(input_tokens=200_000, output_tokens=1),  # exactly at a tier start: still the base price
]


def reference(prices_id: str | None, model: str, usage: Usage) -> Decimal | None:
    """genai-prices' own answer, quantized like ours; None where it cannot price."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc = genai_prices.calc_price(genai_usage(usage), model, provider_id=prices_id)
    except (LookupError, ValueError):
        return None
    return calc.total_price.quantize(QUANTUM)


# ------------------------------------------------------------------------------------------- overrides


def test_override_per_1k_tokens():
    p = Pricer({"openai:gpt-4o-mini": {"input_token": 0.00015, "output_token": 0.0006}})
    assert p.cost("openai", "openai", "gpt-4o-mini", PLAIN) == Decimal("0.00045")  # 0.15 + 0.3 per 1K x 1000/500


@pytest.mark.parametrize(
    "entry, expected",
    [
        # cached and cache-write default to the input rate: 1000 in x 0.001 + 500 out x 0.002
        ({"input_token": 0.001, "output_token": 0.002}, Decimal("0.002")),
        # 700 uncached x 0.001 + 200 cached x 0.0001 + 100 written x 0.01 + 500 out x 0.002
        (
            {"input_token": 0.001, "output_token": 0.002, "cached_input_token": 0.0001, "cache_write_token": 0.01},
            Decimal("0.00272"),
        ),
        ({"input_token": 0.001, "output_token": 0.002, "cache_read_token": 0.0001}, Decimal("0.00182")),
    ],
)
def test_override_cache_rates(entry, expected):
    p = Pricer({"my-vllm:llama-3": entry})
    assert p.cost("my-vllm", None, "llama-3", CACHED) == expected


def test_override_matching_exact_then_longest_glob():
    p = Pricer(
        {
            "openai:*": {"input_token": 1, "output_token": 0},
            "openai:gpt-4o*": {"input_token": 2, "output_token": 0},
            "openai:gpt-4o-mini": {"input_token": 3, "output_token": 0},
            "*:llama*": {"input_token": 4, "output_token": 0},
        }
    )
    one_k = Usage(input_tokens=1000)
    assert p.cost("openai", "openai", "gpt-4o-mini", one_k) == 3
    assert p.cost("openai", "openai", "GPT-4o-Mini", one_k) == 3  # model ids are case-insensitive
    assert p.cost("openai", "openai", "gpt-4o-2024-08-06", one_k) == 2
    assert p.cost("openai", "openai", "o3", one_k) == 1
    assert p.cost("my-vllm", None, "llama-3.1-8b", one_k) == 4
    assert p.cost("openai", "openai", None, one_k) == 1  # "openai:" still matches "openai:*"


def test_override_beats_genai_prices():
    p = Pricer({"openai:gpt-4o": {"input_token": 0, "output_token": 0}})
    assert p.cost("openai", "openai", "gpt-4o", PLAIN) == 0
    assert Pricer().cost("openai", "openai", "gpt-4o", PLAIN) > 0


K, MINI = "budgeting.costs.", "openai:gpt-4o-mini"


@pytest.mark.parametrize(
    "costs, message",
    [
        ({MINI: {"input_tokn": 1, "output_token": 1}}, f"{K}{MINI}.input_tokn: unknown field"),
        ({MINI: {"input_token": "0.1", "output_token": 1}}, f"{K}{MINI}.input_token: must be a number"),
        ({"openai:x": {"input_token": True, "output_token": 1}}, f"{K}openai:x.input_token: must be a number"),
        ({"openai:x": {"input_token": -1, "output_token": 1}}, f"{K}openai:x.input_token: must be a finite number >= 0"),
        ({"openai:x": {"input_token": float("nan"), "output_token": 1}}, f"{K}openai:x.input_token: must be a finite"),
        ({"openai:x": {"input_token": 1}}, f"{K}openai:x.output_token: missing"),
        ({"openai:x": 0.1}, f"{K}openai:x: must be a mapping"),
        ({"gpt-4o": {"input_token": 1, "output_token": 1}}, f"{K}gpt-4o: key must be 'provider:model'"),
        (
            {"openai:x": {"input_token": 1, "output_token": 1, "cached_input_token": 1, "cache_read_token": 1}},
            "budgeting.costs.openai:x.cache_read_token: given twice",
        ),
    ],
)
def test_override_validation_names_the_key_path(costs, message):
    with pytest.raises(ValueError) as e:
        Pricer(costs)
    assert str(e.value).startswith(message)


def test_parse_costs_keeps_exact_decimals():
    rates = parse_costs({"openai:gpt-4o-mini": {"input_token": 0.00015, "output_token": 6e-4}})
    assert rates["openai:gpt-4o-mini"].input == Decimal("0.00015")
    assert rates["openai:gpt-4o-mini"].output == Decimal("0.0006")


# ---------------------------------------------------------------------------------------- genai-prices


def test_cache_reads_and_writes_priced_once_at_their_own_rates():
    # gpt-4o-mini: $0.15/M input, $0.075/M cache read, no cache-write price (so writes pay input), $0.6/M out.
    # 700 uncached + 100 written at 0.15, 200 cached at 0.075, 500 out (reasoning included) at 0.6.
    expected = (Decimal(800) * Decimal("0.15") + 200 * Decimal("0.075") + 500 * Decimal("0.6")) / 10**6
    assert Pricer().cost("openai", "openai", "gpt-4o-mini", CACHED) == expected


@pytest.mark.parametrize(
    "prices_id, model",
    [
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-4o-2024-08-06"),
        ("openai", "o3"),
        ("anthropic", "claude-sonnet-4-5"),  # tiered, cache write and 1h cache write prices
        ("anthropic", "claude-3-5-haiku-latest"),
        ("google", "gemini-2.5-pro"),  # tiered
        ("google", "gemini-2.5-flash"),
        ("deepseek", "deepseek-chat"),  # off-peak (time of day) conditional prices
        ("perplexity", "sonar"),  # a per-request price
        ("perplexity", "sonar-deep-research"),  # a reasoning price of its own
        ("mistral", "mistral-large-latest"),
        ("azure", "gpt-4o"),  # falls back to OpenAI's prices
        (None, "gpt-4o"),  # no prices id: genai-prices guesses the provider from the model
        (None, "claude-opus-4-1"),
    ],
)
@pytest.mark.parametrize("usage", USAGES, ids=range(len(USAGES)))
def test_fast_path_equals_calc_price(prices_id, model, usage):
    expected = reference(prices_id, model, usage)
    assert expected is not None, "model missing from the snapshot; pick another"
    assert Pricer().cost("p", prices_id, model, usage) == expected


def test_fast_path_equals_calc_price_for_every_model_in_the_snapshot(caplog):
    pricer = Pricer()
    checked = 0
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            for usage in USAGES[1:]:
                assert pricer.cost("p", provider.id, model.id, usage) == reference(provider.id, model.id, usage), (
                    provider.id,
                    model.id,
                    usage,
                )
                checked += 1
    assert checked > 1000


def test_result_is_quantized_to_nano_dollars():
    cost = Pricer().cost("openai", "openai", "gpt-4o-mini", Usage(input_tokens=1))
    assert cost == Decimal("0.00000015") and cost.as_tuple().exponent == -9


def test_inconsistent_usage_does_not_raise():
    # more cached than total input (a confused report): charge at least what was reported
    odd = Usage(input_tokens=10, cached_input_tokens=1000, output_tokens=5, reasoning_tokens=50)
    assert Pricer().cost("openai", "openai", "gpt-4o-mini", odd) == reference("openai", "gpt-4o-mini", odd)


# ---------------------------------------------------------------------------------------- unknown models


@pytest.mark.parametrize(
    "provider, prices_id, model",
    [
        ("openai", "openai", "no-such-model-xyz"),
        ("my-vllm", None, "my-finetune-7b"),
        ("my-vllm", "no-such-provider", "gpt-4o"),
        ("openai", "openai", None),
        ("openai", "openai", ""),
    ],
)
def test_unknown_model_is_none_with_one_warning(caplog, provider, prices_id, model):
    p = Pricer()
    with caplog.at_level(logging.WARNING, logger="tollgate.pricing"):
        assert p.cost(provider, prices_id, model, PLAIN) is None
        assert p.cost(provider, prices_id, model, CACHED) is None
    warnings_ = [r for r in caplog.records if r.name == "tollgate.pricing"]
    assert len(warnings_) == 1
    assert "cost_usd left NULL" in warnings_[0].getMessage()


def test_each_unknown_model_warns_once(caplog):
    p = Pricer()
    with caplog.at_level(logging.WARNING, logger="tollgate.pricing"):
        for _ in range(3):
            p.cost("a", None, "unknown-1", PLAIN)
            p.cost("a", None, "unknown-2", PLAIN)
            p.cost("b", None, "unknown-1", PLAIN)
    assert len(caplog.records) == 3


def test_invented_model_names_do_not_grow_genai_prices_caches():
    snap = data_snapshot.get_snapshot()
    Pricer().cost("openai", "openai", "gpt-4o", PLAIN)
    sizes = [len(snap._lookup_cache), len(snap._provider_cache), len(snap._provider_misses)]
    p = Pricer()
    for i in range(300):
        p.cost("openai", "openai", f"invented-{i}", PLAIN)
        p.cost("my-vllm", None, f"invented-{i}", PLAIN)
    assert [len(snap._lookup_cache), len(snap._provider_cache), len(snap._provider_misses)] == sizes


def test_known_models():
    p = Pricer()
    assert "gpt-4o-mini" in p.known_models("openai")
    assert any(m.startswith("claude") for m in p.known_models("anthropic"))
    assert p.known_models("no-such-provider") == []


# ---------------------------------------------------------------------------------------- speed, offline


@pytest.mark.parametrize("prices_id, model", [("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5")])
def test_repeated_model_is_much_faster_than_calc_price(prices_id, model):
    p = Pricer()
    p.cost("p", prices_id, model, CACHED)  # warm
    gusage = genai_usage(CACHED)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        p.cost("p", prices_id, model, CACHED)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        genai_prices.calc_price(gusage, model, provider_id=prices_id)
    theirs = time.perf_counter() - t0
    assert ours * 4 < theirs, f"{ours / n * 1e6:.1f} µs vs calc_price {theirs / n * 1e6:.1f} µs"


def test_prices_never_fetched():
    Pricer().cost("openai", "openai", "gpt-4o", PLAIN)
    assert genai_prices.update_prices._shared_updater.thread is None  # the only network path never started
    assert not data_snapshot.get_snapshot().from_auto_update


def test_prices_load_with_the_network_blocked(tmp_path):
    script = """
import socket, threading
def refuse(*a, **k):
    raise OSError("network used")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from tollgate.pricing import Pricer
from tollgate.usage import Usage
p = Pricer({"x:y": {"input_token": 1, "output_token": 1}})
print(p.cost("openai", "openai", "gpt-4o-mini", Usage(input_tokens=1000, output_tokens=500)))
assert not [t for t in threading.enumerate() if "genai_prices" in t.name]
"""
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.000450000"


@pytest.mark.parametrize(
    "kinds, per_request, counts",
    [
        # a tie at half a nano-dollar rounds to even, both ways
        (((Decimal("0.5"), 10**9), None, None, None, None), None, (1, 0, 0, 0, 0)),
        (((Decimal("0.5"), 10**9), None, None, None, None), None, (3, 0, 0, 0, 0)),
        (((Decimal("0.15"), 10**6), (Decimal("0.075"), 10**6), None, (Decimal("0.6"), 10**6), None), None,
         (11, 7, 0, 8, 0)),
        (((Decimal("3"), 10**6), None, (Decimal("3.75"), 10**6), (Decimal("15"), 10**6), (Decimal("15"), 10**6)),
         (Decimal("0.01"), 1), (123_457, 0, 9_999, 31_337, 2_048)),
        (((Decimal("1E+1"), 1000), None, None, None, None), None, (7, 0, 0, 0, 0)),  # a positive exponent
        (((Decimal("0.15"), 10**6), None, None, None, None), None, (0, 0, 0, 0, 0)),
    ],
)
def test_integer_pricing_equals_the_decimal_sum(kinds, per_request, counts):
    from tollgate.pricing import _exact_cost, _int_plan, _reduced_cost, _Reduced

    plan = _int_plan(kinds, per_request)
    assert plan is not None
    expected = _reduced_cost(_Reduced(None, kinds, per_request), counts).quantize(QUANTUM)
    got = _exact_cost(plan, counts)
    assert got == expected and str(got) == str(expected)


def test_integer_pricing_refuses_what_decimal_cannot_hold():
    from decimal import InvalidOperation

    from tollgate.pricing import _exact_cost, _int_plan

    plan = _int_plan(((Decimal("0.15"), 10**6), None, None, None, None), None)
    with pytest.raises(InvalidOperation):
        _exact_cost(plan, (10**30, 0, 0, 0, 0))
    assert Pricer().cost("openai", "openai", "gpt-4o-mini", Usage(input_tokens=10**30)) is None
