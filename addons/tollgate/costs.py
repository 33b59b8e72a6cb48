"""`budgeting.costs`: the policy's own prices, validated into exact rates (USD per 1K tokens).

Apart from pricing.py so that reading a policy (every CLI command does) does not import genai-prices' price
table (~0.3 s); pricing.py builds on these rates.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from .usage import Usage

_PER_1K = Decimal(1000)

# Override fields, USD per 1K tokens. cache_read_token is an alias of cached_input_token.
_FIELDS = ("input_token", "output_token", "cached_input_token", "cache_write_token")
_ALIASES = {"cache_read_token": "cached_input_token"}
_REQUIRED = ("input_token", "output_token")


# ---------------------------------------------------------------------------------------------- overrides


@dataclass(frozen=True, slots=True)
class Rates:
    """One `budgeting.costs` entry, USD per 1K tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal

    def cost(self, u: Usage) -> Decimal:
        # input_tokens includes cache reads and writes: price each part once, at its own rate.
        # Reasoning is part of output_tokens and has no rate of its own here.
        uncached, cached, written, visible, reasoning = _counts(u)
        return (
            uncached * self.input
            + cached * self.cached_input
            + written * self.cache_write
            + (visible + reasoning) * self.output
        ) / _PER_1K


def parse_rate(value: object, path: str) -> Decimal:
    """A price from YAML as an exact Decimal (via str, so 0.00015 stays 0.00015, not its binary float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: must be a number (USD per 1K tokens), got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{path}: must be a finite number >= 0, got {value!r}")
    return Decimal(str(value))


def parse_rates(entry: object, path: str) -> Rates:
    """One override entry; cached and cache-write rates default to the input rate."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{path}: must be a mapping like {{input_token: 0.00015, output_token: 0.0006}}")
    fields: dict[str, Decimal] = {}
    for name, value in entry.items():
        canonical = _ALIASES.get(name, name)
        if canonical not in _FIELDS:
            allowed = ", ".join((*_FIELDS, *_ALIASES))
            raise ValueError(f"{path}.{name}: unknown field (allowed: {allowed})")
        if canonical in fields:
            raise ValueError(f"{path}.{name}: given twice (cache_read_token is cached_input_token)")
        fields[canonical] = parse_rate(value, f"{path}.{name}")
    for name in _REQUIRED:
        if name not in fields:
            raise ValueError(f"{path}.{name}: missing (USD per 1K tokens)")
    return Rates(
        input=fields["input_token"],
        output=fields["output_token"],
        cached_input=fields.get("cached_input_token", fields["input_token"]),
        cache_write=fields.get("cache_write_token", fields["input_token"]),
    )


def parse_costs(costs: Mapping[str, object] | None, path: str = "budgeting.costs") -> dict[str, Rates]:
    """Validate the whole `budgeting.costs` section: keys are "provider:model", globs allowed."""
    parsed: dict[str, Rates] = {}
    for key, entry in (costs or {}).items():
        if not isinstance(key, str) or ":" not in key:
            raise ValueError(f"{path}.{key}: key must be 'provider:model' (globs allowed, e.g. 'openai:gpt-4o*')")
        parsed[key.lower()] = parse_rates(entry, f"{path}.{key}")
    return parsed



def _counts(u: Usage) -> tuple[int, ...]:
    """Exclusive counts per _KINDS, made consistent (input >= cached + cache-write, output >= reasoning).

    A provider or adapter reporting more cached than total input would make calc_price raise; charging at
    least what was reported is the safer reading.
    """
    cached, written, reasoning = max(u.cached_input_tokens, 0), max(u.cache_write_tokens, 0), max(u.reasoning_tokens, 0)
    input_total = max(u.input_tokens, cached + written)
    output_total = max(u.output_tokens, reasoning)
    return input_total - cached - written, cached, written, output_total - reasoning, reasoning
