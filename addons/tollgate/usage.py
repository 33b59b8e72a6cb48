"""The normalized token usage of one request, whatever the provider's wire format."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    """Token counts as DESIGN.md's ledger defines them.

    input_tokens counts *all* input, cached included (Anthropic: input + cache creation + cache read;
    OpenAI: prompt_tokens, which already includes cached_tokens), so cost and limits use one number.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0  # cache reads (part of input_tokens)
    cache_write_tokens: int = 0  # cache creation (part of input_tokens)
    reasoning_tokens: int = 0  # part of output_tokens, as the providers report it
    source: str = "provider"  # "provider" or "estimated"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
