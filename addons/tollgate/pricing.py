"""The cost in USD of one request: the policy's `budgeting.costs` overrides first, then genai-prices.

genai-prices is used only through its bundled data snapshot. Its one network path is `UpdatePrices`
(a background fetcher that must be started explicitly); tollgate never starts it, so prices never change
under a running gateway and nothing is fetched.

Costs are quantized to 1e-9 USD (a nano-dollar, ROUND_HALF_EVEN): the cheapest per-token prices are around
1e-8 USD, so per-request precision is kept, and half-even rounding does not drift when the ledger sums
millions of rows.

Hot path: `calc_price` costs ~100 µs (model matching plus generic unit decomposition). `cost()` instead
resolves a (prices id, model) to genai-prices' `ModelInfo` once, reduces each `ModelPrice` it meets to the
rate of each token kind our `Usage` can carry, and multiplies. tests/unit/test_pricing.py checks that this
equals `calc_price` for every model in the snapshot, tiered prices included.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from genai_prices import data_snapshot
from genai_prices import types as gp
from genai_prices.decompose import is_descendant_or_self
from genai_prices.units import _get_registry  # the registry calc_price itself uses
from genai_prices.validation import validate_priced_units

from .costs import _PER_1K, Rates, _counts, parse_costs  # noqa: F401 (parse_costs: re-exported)
from .usage import Usage

logger = logging.getLogger("tollgate.pricing")

QUANTUM = Decimal("1e-9")
_CACHE_MAX = 4096  # bounds every memo: model names come from clients, so a flood of new ones must not grow memory

class _Overrides:
    """Exact keys win; among globs the longest (most specific) pattern wins, ties by order in the file."""

    def __init__(self, rates: dict[str, Rates]):
        self.exact = {k: r for k, r in rates.items() if not _is_glob(k)}
        globs = sorted((k for k in rates if _is_glob(k)), key=len, reverse=True)  # stable: file order on ties
        self.globs = [(re.compile(fnmatch.translate(k)).match, rates[k]) for k in globs]
        self.memo: dict[str, Rates | None] = {}

    def find(self, target: str) -> Rates | None:
        try:
            return self.memo[target]
        except KeyError:
            pass
        found = self.exact.get(target)
        if found is None:
            found = next((r for match, r in self.globs if match(target)), None)
        _bounded_put(self.memo, target, found)
        return found


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


# ------------------------------------------------------------------------------------------ genai-prices

# Our Usage, as genai-prices usage keys. Both count cache reads/writes inside input_tokens and reasoning
# inside output_tokens; genai-prices subtracts a sub-kind from its parent only when the model prices it.
_KINDS = ("input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "output_reasoning_tokens")
_Price = Decimal | gp.TieredPrices


@dataclass(frozen=True, slots=True)
class _Reduced:
    """A ModelPrice reduced to what our Usage can carry.

    With only _KINDS reported, genai-prices' leaf decomposition puts every token of a kind at the price of
    the most specific priced unit that contains it (a cache read falls back to the input price when the
    model has no cache-read price); every other unit (audio, web searches...) counts zero, except the
    flat per-request price, which counts one.
    """

    model_price: gp.ModelPrice  # held so the id() key in _REDUCED stays valid
    kinds: tuple[tuple[_Price, int] | None, ...]  # (price, per), aligned with _KINDS
    per_request: tuple[_Price, int] | None
    exact: _IntPlan | None = None  # the same prices as integers, when none is tiered (see _int_plan)


# A cost in nano-dollars as one fraction, `sum(mult[k] * counts[k]) + flat` over `denom`: Python ints instead of
# five Decimal multiplications and divisions and a quantize (3.0 -> 2.1 µs a call in a warm loop; the gateway
# prices each request twice, its worst case at admission and its cost at the end). Exact, as the Decimal sum
# is below 28 digits.
_IntPlan = tuple[tuple[int, ...], int, int]
_NANO = 10**9
_MAX_NANO = 10**28  # a quantized cost with more digits is what Decimal's quantize refuses


def _int_plan(kinds: tuple[tuple[_Price, int] | None, ...], per_request: tuple[_Price, int] | None) -> _IntPlan | None:
    terms = [*kinds, per_request]
    if any(t is not None and not isinstance(t[0], Decimal) for t in terms):
        return None  # threshold tiers: the price depends on the input count; the Decimal path picks it
    fracs = []  # (numerator, denominator) of each term's nano-dollars per unit
    for t in terms:
        if t is None:
            fracs.append((0, 1))
            continue
        price, per = t
        if not price.is_finite() or price < 0:
            return None  # (the rounding below assumes a non-negative sum)
        _, digits, exp = price.as_tuple()
        num = int("".join(map(str, digits)) or "0") * _NANO
        den = per
        if exp >= 0:
            num *= 10**exp
        else:
            den *= 10**-exp
        fracs.append((num, den))
    denom = math.lcm(*(d for _, d in fracs))
    scaled = [n * (denom // d) for n, d in fracs]
    return tuple(scaled[:-1]), scaled[-1], denom


def _reduce(mp: gp.ModelPrice) -> _Reduced:
    registry = _get_registry()
    priced = gp._collect_resolved_model_prices(mp, registry)  # same resolution calc_price does
    validate_priced_units(tuple(unit for unit, _ in priced), registry)  # calc_price would raise too
    kinds = []
    for key in _KINDS:
        unit = registry.units[key]
        holders = [(u, p) for u, p in priced if is_descendant_or_self(u, unit)]
        best = max(holders, key=lambda up: len(up[0].dimensions), default=None)
        kinds.append((best[1], best[0].per) if best else None)
    per_request = next(((p, u.per) for u, p in priced if u.usage_key == "requests"), None)
    return _Reduced(mp, tuple(kinds), per_request, _int_plan(tuple(kinds), per_request))


def _exact_cost(plan: _IntPlan, counts: tuple[int, ...]) -> Decimal:
    """`_reduced_cost(...).quantize(QUANTUM, ROUND_HALF_EVEN)` for an untiered model, in integers."""
    mult, flat, denom = plan
    total = flat
    for m, c in zip(mult, counts):
        if c:
            total += m * c
    q, r = divmod(total, denom)
    r2 = 2 * r
    if r2 > denom or r2 == denom and q & 1:
        q += 1
    if q >= _MAX_NANO:  # what quantize refuses (more than 28 digits): cost() prices it as unknown
        raise InvalidOperation("cost beyond Decimal precision")
    return Decimal(q).scaleb(-9)


def _at(price: _Price, input_total: int) -> Decimal:
    """genai-prices' threshold tiers: past a tier's start, *all* tokens pay that tier's price."""
    if isinstance(price, Decimal):
        return price
    for tier in reversed(price.tiers):
        if input_total > tier.start:
            return tier.price
    return price.base


def _reduced_cost(r: _Reduced, counts: tuple[int, ...]) -> Decimal:
    input_total = counts[0] + counts[1] + counts[2]
    total = Decimal(0)
    for kind, count in zip(r.kinds, counts):
        if kind is not None and count:
            price, per = kind
            total += _at(price, input_total) * count / per
    if r.per_request is not None:
        price, per = r.per_request
        total += _at(price, input_total) / per
    return total


_Resolved = tuple[gp.Provider, gp.ModelInfo]
# Shared by all Pricer instances (a policy reload builds a new Pricer; genai-prices' data does not change).
_RESOLVED: dict[tuple[str | None, str], _Resolved | None] = {}
_REDUCED: dict[int, _Reduced] = {}
_snapshot: data_snapshot.DataSnapshot | None = None


def _resolve(prices_id: str | None, model: str) -> _Resolved | None:
    """genai-prices' own lookup (provider by id, or guessed from the model name), memoized, misses too."""
    global _snapshot
    snap = data_snapshot.get_snapshot()
    if snap is not _snapshot:  # someone swapped the snapshot: every memo is stale
        _RESOLVED.clear()
        _REDUCED.clear()
        _snapshot = snap
    key = (prices_id, model.lower())
    try:
        return _RESOLVED[key]
    except KeyError:
        pass
    found = _lookup(snap, prices_id, key[1])
    _bounded_put(_RESOLVED, key, found)
    return found


def _lookup(snap: data_snapshot.DataSnapshot, prices_id: str | None, ref: str) -> _Resolved | None:
    """DataSnapshot.find_provider_model, minus its per-name caches, which grow without bound on the
    model names clients invent; _RESOLVED (bounded) caches instead."""
    if prices_id is not None:
        provider = data_snapshot.find_provider_by_id(snap.providers, prices_id)
    else:
        provider = next((p for p in snap.providers if p.model_match and p.model_match.is_match(ref)), None)
    info = provider.find_model(ref, all_providers=snap.providers) if provider else None
    return (provider, info) if provider and info else None


def _model_price(info: gp.ModelInfo) -> gp.ModelPrice:
    if isinstance(info.prices, gp.ModelPrice):
        return info.prices
    return info.get_prices(datetime.now(tz=UTC))  # dated or time-of-day prices: pick the one active now


def _reduced_for(prices_id: str | None, model: str) -> _Reduced | None:
    """The model's prices active now, reduced to our usage kinds; None when genai-prices does not know it."""
    resolved = _resolve(prices_id, model)
    if resolved is None:
        return None
    mp = _model_price(resolved[1])
    reduced = _REDUCED.get(id(mp))
    if reduced is None or reduced.model_price is not mp:
        try:
            reduced = _reduce(mp)
        except ValueError:  # invalid price data in the snapshot; calc_price raises on it as well
            return None
        _bounded_put(_REDUCED, id(mp), reduced)
    return reduced


def genai_usage(u: Usage) -> object:
    """Our Usage as genai-prices' Usage (for calc_price and tests); same conventions, after _counts."""
    from genai_prices import Usage as GenaiUsage

    uncached, cached, written, visible, reasoning = _counts(u)
    return GenaiUsage(
        input_tokens=uncached + cached + written,
        cache_read_tokens=cached,
        cache_write_tokens=written,
        output_tokens=visible + reasoning,
        output_reasoning_tokens=reasoning,
    )


def _bounded_put(memo: dict, key: object, value: object) -> None:
    if len(memo) >= _CACHE_MAX:
        memo.clear()
    memo[key] = value


# ------------------------------------------------------------------------------------------------ Pricer


class Pricer:
    """Prices requests. Build one per loaded policy; cost() is cheap enough for the event loop."""

    def __init__(self, overrides: Mapping[str, Mapping[str, float]] | None = None):
        self._overrides = _Overrides(parse_costs(overrides))
        self._warned: set[tuple[str, str | None]] = set()
        # (provider, prices_id, model) -> (valid until, override rates, genai-prices' reduced prices): one dict
        # lookup per request instead of the override globs, genai-prices' resolution and the dated-price pick
        # (two lookups per request: the budget's worst case and the cost). Entries live PLAN_TTL seconds so
        # prices that change with the date (genai-prices' dated and time-of-day prices) are picked up.
        self._plans: dict[tuple[str, str | None, str | None], tuple[float, Rates | None, _Reduced | None]] = {}
        data_snapshot.get_snapshot()  # load the bundled table (~0.3 s, once per process) now, not mid-request

    def cost(self, provider: str, prices_id: str | None, model: str | None, usage: Usage) -> Decimal | None:
        """USD for one request, or None (cost_usd NULL) when neither the policy nor genai-prices knows the model.

        Never raises: it runs in the gateway's hooks, where an exception would refuse (request side) or lose
        the row of (response side) a request. An amount beyond Decimal's precision is priced as unknown.
        """
        try:
            return self._cost(provider, prices_id, model, usage)
        except ArithmeticError:  # decimal.InvalidOperation: a quantized cost of more than 28 digits
            logger.warning("pricing %s model %r: usage too large to price (%d in, %d out)", provider,
                           (model or "")[:200], usage.input_tokens, usage.output_tokens)
            return None

    PLAN_TTL = 60.0

    def _cost(self, provider: str, prices_id: str | None, model: str | None, usage: Usage) -> Decimal | None:
        key = (provider, prices_id, model)
        plan = self._plans.get(key)
        if plan is None or plan[0] <= time.monotonic():
            plan = self._plan(provider, prices_id, model)
            _bounded_put(self._plans, key, plan)
        _, rates, reduced = plan
        if rates is not None:
            return rates.cost(usage).quantize(QUANTUM, ROUND_HALF_EVEN)
        if reduced is None:
            self._warn_unknown(provider, prices_id, model)
            return None
        if reduced.exact is not None:
            return _exact_cost(reduced.exact, _counts(usage))
        return _reduced_cost(reduced, _counts(usage)).quantize(QUANTUM, ROUND_HALF_EVEN)

    def _plan(self, provider: str, prices_id: str | None, model: str | None) -> tuple[float, Rates | None, _Reduced | None]:
        rates = self._overrides.find(f"{provider}:{model or ''}".lower())
        reduced = None
        if rates is None and model:
            try:
                reduced = _reduced_for(prices_id, model)
            except Exception:  # never let pricing fail a request; the ledger row just has no cost
                logger.exception("pricing %s model %r failed", provider, model[:200])
        return time.monotonic() + self.PLAN_TTL, rates, reduced

    def known_models(self, prices_id: str) -> list[str]:
        """The model ids genai-prices has prices for under this provider (empty when it has none)."""
        provider = data_snapshot.find_provider_by_id(data_snapshot.get_snapshot().providers, prices_id)
        return [m.id for m in provider.models] if provider else []

    def _warn_unknown(self, provider: str, prices_id: str | None, model: str | None) -> None:
        key = (provider, model)
        if key in self._warned:
            return
        if len(self._warned) >= _CACHE_MAX:  # bounded like the memos; a flood of names may warn again
            self._warned.clear()
        self._warned.add(key)
        logger.warning(
            "no price for provider %s model %r (genai-prices provider %r): cost_usd left NULL; "
            "add it under budgeting.costs to price it",
            provider,
            (model or "")[:200],
            prices_id,
        )
