"""providers: credentials, request facts, usage from JSON and SSE, native errors — in real wire formats."""
from __future__ import annotations

import copy
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.providers import (
    WELL_KNOWN,
    Credential,
    StreamUsage,
    credential_value,
    endpoint_kind,
    error_body,
    find_credential,
    host_patterns,
    is_usage_only_chunk,
    loads,
    model_from_json,
    request_facts,
    usage_from_json,
)
from tollgate.sse import SSEParser
from tollgate.usage import Usage


def U(inp=0, out=0, cached=0, write=0, reasoning=0) -> Usage:
    return Usage(
        input_tokens=inp, output_tokens=out, cached_input_tokens=cached, cache_write_tokens=write,
        reasoning_tokens=reasoning,
    )


# ==================================================================================================
# Well-known providers and host patterns


def test_well_known_table() -> None:
    assert set(WELL_KNOWN) == {
        "openai", "anthropic", "gemini", "mistral", "groq", "deepseek", "xai", "openrouter", "together",
        "fireworks", "azure",
    }
    assert WELL_KNOWN["openai"].well_known_base == "https://api.openai.com/v1"
    assert WELL_KNOWN["anthropic"].well_known_base == "https://api.anthropic.com"
    assert WELL_KNOWN["gemini"].well_known_base == "https://generativelanguage.googleapis.com"
    assert WELL_KNOWN["groq"].well_known_base == "https://api.groq.com/openai/v1"
    assert WELL_KNOWN["fireworks"].well_known_base == "https://api.fireworks.ai/inference/v1"
    assert WELL_KNOWN["azure"].hosts == () and WELL_KNOWN["azure"].protocol == "azure"
    for spec in WELL_KNOWN.values():
        if spec.name not in ("anthropic", "gemini", "azure"):
            assert spec.protocol == "openai", spec
        if spec.well_known_base:
            host = spec.well_known_base.split("/")[2]
            assert host in spec.hosts


def test_prices_ids_exist_in_genai_prices() -> None:
    from genai_prices import data

    ids = {p.id for p in data.providers}
    for spec in WELL_KNOWN.values():
        assert spec.prices_id in ids, spec


@pytest.mark.parametrize(
    "host,pattern,matches,rejects",
    [
        ("api.openai.com", r"^api\.openai\.com:\d+$", ["api.openai.com:443", "API.OpenAI.com:443"],
         ["api.openai.com.evil.io:443", "xapi.openai.com:443", "api-openai-com:443", "api.openai.com"]),
        ("vllm.internal:8000", r"^vllm\.internal:8000$", ["vllm.internal:8000"], ["vllm.internal:8001"]),
        ("10.0.0.5", r"^10\.0\.0\.5:\d+$", ["10.0.0.5:8443"], ["10.0.0.55:8443"]),
        ("[::1]:8000", r"^::1:8000$", ["::1:8000"], ["::1:9000"]),
    ],
)
def test_host_patterns(host: str, pattern: str, matches: list[str], rejects: list[str]) -> None:
    (pat,) = host_patterns([host])
    assert pat == pattern
    rex = re.compile(pat, re.IGNORECASE)  # as mitmproxy's next_layer compiles allow_hosts
    assert all(rex.search(m) for m in matches)
    assert not any(rex.search(r) for r in rejects)


def test_host_patterns_dedupe_and_validate() -> None:
    assert host_patterns(["a.b", "A.B", "a.b:1"]) == [r"^a\.b:\d+$", r"^a\.b:1$"]
    for bad in ["host:abc", "host:0", "host:70000", ":80", "[::1"]:
        with pytest.raises(ValueError):
            host_patterns([bad])


# ==================================================================================================
# Credentials

CRED_CASES = [
    # protocol, headers, query, expected (value, where, name, scheme) or None
    ("openai", {"Authorization": "Bearer tg-123"}, {}, ("tg-123", "header", "authorization", "Bearer ")),
    ("openai", {"authorization": "bearer  tg-123 "}, {}, ("tg-123", "header", "authorization", "bearer ")),
    ("openai", {"Authorization": "Basic abc"}, {}, None),
    ("openai", {"Authorization": "Bearer "}, {}, None),
    ("openai", {"x-api-key": "tg-1"}, {}, None),
    ("openai", {}, {}, None),
    ("anthropic", {"X-Api-Key": "tg-a"}, {}, ("tg-a", "header", "x-api-key", "")),
    ("anthropic", {"x-api-key": "tg-a", "authorization": "Bearer tg-b"}, {}, ("tg-a", "header", "x-api-key", "")),
    ("anthropic", {"authorization": "Bearer tg-b"}, {}, ("tg-b", "header", "authorization", "Bearer ")),
    ("anthropic", {"x-api-key": "  "}, {}, None),
    ("gemini", {"x-goog-api-key": "tg-g"}, {"key": "tg-q"}, ("tg-g", "header", "x-goog-api-key", "")),
    ("gemini", {}, {"key": "tg-q", "alt": "sse"}, ("tg-q", "query", "key", "")),
    ("gemini", {"Authorization": "Bearer ya29.tok"}, {}, ("ya29.tok", "header", "authorization", "Bearer ")),
    ("gemini", {}, {"key": ""}, None),
    ("azure", {"api-key": "tg-z"}, {}, ("tg-z", "header", "api-key", "")),
    ("azure", {"Authorization": "Bearer tg-z"}, {}, ("tg-z", "header", "authorization", "Bearer ")),
]


@pytest.mark.parametrize("protocol,headers,query,expected", CRED_CASES)
def test_find_credential(protocol, headers, query, expected) -> None:
    cred = find_credential(protocol, headers, query)
    if expected is None:
        assert cred is None
    else:
        assert (cred.value, cred.where, cred.name, cred.scheme) == expected


def test_credential_value_and_repr_hides_secret() -> None:
    c = Credential(value="sk-secret-virtual", where="header", name="authorization", scheme="Bearer ")
    assert credential_value(c, "sk-real") == "Bearer sk-real"
    assert credential_value(Credential("k", "query", "key"), "real") == "real"
    assert "sk-secret-virtual" not in repr(c)


def test_find_credential_with_mitmproxy_headers() -> None:
    from mitmproxy.http import Headers

    h = Headers([(b"X-Goog-Api-Key", b"tg-gm"), (b"Content-Type", b"application/json")])
    cred = find_credential("gemini", h, {})
    assert (cred.value, cred.name) == ("tg-gm", "x-goog-api-key")


# ==================================================================================================
# Endpoints and request facts

KIND_CASES = [
    ("openai", "/v1/chat/completions", "chat"),
    ("openai", "/v1/chat/completions?foo=1", "chat"),
    ("openai", "/v1/chat/completions/", "chat"),
    ("openai", "/v1/responses", "responses"),
    ("openai", "/v1/responses/resp_123", "other"),
    ("openai", "/v1/responses/resp_123/input_items", "other"),
    ("openai", "/v1/embeddings", "embeddings"),
    ("openai", "/v1/completions", "completions"),
    ("openai", "/v1/models", "other"),
    ("openai", "/v1/files", "other"),
    ("openai", "/v1/chat/completions/chatcmpl-1/messages", "other"),
    ("openai", "/v1/threads/thread_1/messages", "other"),
    ("openai", "/openai/v1/chat/completions", "chat"),  # groq
    ("openai", "/api/v1/chat/completions", "chat"),  # openrouter
    ("openai", "/inference/v1/completions", "completions"),  # fireworks
    ("openai", "/chat/completions", "chat"),  # deepseek without /v1
    ("openai", "/anthropic/v1/messages", "messages"),  # OpenAI-compatible servers with an Anthropic API
    ("azure", "/openai/deployments/gpt4o/chat/completions", "chat"),
    ("azure", "/openai/deployments/emb/embeddings", "embeddings"),
    ("azure", "/openai/v1/responses", "responses"),
    ("anthropic", "/v1/messages", "messages"),
    ("anthropic", "/v1/messages/count_tokens", "other"),
    ("anthropic", "/v1/messages/batches", "other"),
    ("anthropic", "/v1/models", "other"),
    ("anthropic", "/mirror/anthropic/v1/messages", "messages"),
    ("anthropic", "/v1/chat/completions", "chat"),  # Anthropic's OpenAI SDK compatibility
    ("gemini", "/v1beta/models/gemini-2.0-flash:generateContent", "generate"),
    ("gemini", "/v1beta/models/gemini-2.5-pro:streamGenerateContent", "generate"),
    ("gemini", "/v1/models/gemini-1.5-flash-002:generateContent", "generate"),
    ("gemini", "/v1beta/tunedModels/my-model:generateContent", "generate"),
    ("gemini", "/v1beta/models/text-embedding-004:embedContent", "embeddings"),
    ("gemini", "/v1beta/models/gemini-2.0-flash:countTokens", "other"),
    ("gemini", "/v1beta/models", "other"),
    ("gemini", "/v1beta/openai/chat/completions", "chat"),  # Gemini's OpenAI compatibility
    ("gemini", "/v1beta/openai/embeddings", "embeddings"),
]


@pytest.mark.parametrize("protocol,path,kind", KIND_CASES)
def test_endpoint_kind(protocol: str, path: str, kind: str) -> None:
    assert endpoint_kind(protocol, path) == kind


FACT_CASES = [
    # protocol, path, body, (kind, model, stream, max_output_tokens, include_usage)
    ("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [], "max_tokens": 50},
     ("chat", "gpt-4o-mini", False, 50, False)),
    ("openai", "/v1/chat/completions",
     {"model": "o3", "stream": True, "max_completion_tokens": 900, "max_tokens": 10,
      "stream_options": {"include_usage": True}},
     ("chat", "o3", True, 900, True)),
    ("openai", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": False}},
     ("chat", "gpt-4o", True, None, False)),
    ("openai", "/v1/chat/completions", {"model": "gpt-4o", "stream_options": {"include_usage": True}},
     ("chat", "gpt-4o", False, None, False)),
    ("openai", "/v1/responses", {"model": "gpt-4.1", "input": "hi", "stream": True, "max_output_tokens": 300},
     ("responses", "gpt-4.1", True, 300, False)),
    ("openai", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "max_tokens": 7, "stream": True},
     ("completions", "gpt-3.5-turbo-instruct", True, 7, False)),
    ("openai", "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]},
     ("embeddings", "text-embedding-3-small", False, None, False)),
    ("anthropic", "/v1/messages", {"model": "claude-sonnet-4-20250514", "max_tokens": 1024, "stream": True},
     ("messages", "claude-sonnet-4-20250514", True, 1024, False)),
    ("gemini", "/v1beta/models/gemini-2.0-flash:generateContent",
     {"contents": [], "generationConfig": {"maxOutputTokens": 256}},
     ("generate", "gemini-2.0-flash", False, 256, False)),
    ("gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
     {"contents": [], "generation_config": {"max_output_tokens": 64}},
     ("generate", "gemini-2.5-flash", True, 64, False)),
    ("gemini", "/v1beta/openai/chat/completions", {"model": "gemini-2.0-flash", "stream": True},
     ("chat", "gemini-2.0-flash", True, None, False)),
    ("azure", "/openai/deployments/my-gpt4o/chat/completions", {"messages": []},
     ("chat", "my-gpt4o", False, None, False)),
    ("azure", "/openai/deployments/my-gpt4o/chat/completions", {"model": "gpt-4o", "messages": []},
     ("chat", "gpt-4o", False, None, False)),
    ("openai", "/v1/models", None, ("other", None, False, None, False)),
    # odd types never raise and fall back to None/False
    ("openai", "/v1/chat/completions", [1, 2], ("chat", None, False, None, False)),
    ("openai", "/v1/chat/completions", "text", ("chat", None, False, None, False)),
    ("openai", "/v1/chat/completions",
     {"model": 5, "stream": "yes", "max_tokens": True, "stream_options": "x"}, ("chat", None, False, None, False)),
    ("openai", "/v1/chat/completions", {"model": "m", "max_tokens": -3}, ("chat", "m", False, None, False)),
    ("openai", "/v1/chat/completions", {"model": "m", "max_tokens": 12.0}, ("chat", "m", False, 12, False)),
    ("openai", "/v1/chat/completions", {"model": "m", "max_tokens": float("nan")}, ("chat", "m", False, None, False)),
    ("anthropic", "/v1/messages", {"model": None, "max_tokens": "100"}, ("messages", None, False, None, False)),
    ("gemini", "/v1beta/models/g:generateContent", {"generationConfig": [1]}, ("generate", "g", False, None, False)),
]


@pytest.mark.parametrize("protocol,path,body,expected", FACT_CASES)
def test_request_facts(protocol, path, body, expected) -> None:
    f = request_facts(protocol, path, body)
    assert (f.kind, f.model, f.stream, f.max_output_tokens, f.include_usage) == expected


# ==================================================================================================
# Real-format answers: JSON and SSE

OPENAI_CHAT_JSON = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion", "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I assist you today?",
                                         "refusal": None, "annotations": []},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035",
}
OPENAI_O_SERIES_JSON = {
    "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "o3-mini-2025-01-31",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
              "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0}},
}
XAI_REASONING_JSON = {  # xAI counts reasoning on top of completion_tokens: total = 32 + 9 + 94
    "id": "x", "object": "chat.completion", "created": 1, "model": "grok-3-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": 135,
              "prompt_tokens_details": {"text_tokens": 32, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 6},
              "completion_tokens_details": {"reasoning_tokens": 94, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
              "num_sources_used": 0},
    "system_fingerprint": "fp_1",
}
DEEPSEEK_JSON = {
    "id": "d", "object": "chat.completion", "created": 1, "model": "deepseek-chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
              "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36},
}
GROQ_JSON = {
    "id": "chatcmpl-groq", "object": "chat.completion", "created": 7, "model": "llama-3.1-8b-instant",
    "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"queue_time": 0.037, "prompt_tokens": 18, "prompt_time": 0.0007, "completion_tokens": 5,
              "completion_time": 0.46, "total_tokens": 23, "total_time": 0.46},
    "system_fingerprint": "fp_179b0f92c9", "x_groq": {"id": "req_01jbd6g2qdfw2adyrt2az8hz4w"},
}
OPENROUTER_JSON = {
    "id": "gen-1", "object": "chat.completion", "created": 1, "model": "anthropic/claude-3.5-sonnet",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240,
              "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 150}, "cost": 0.0012},
}
OPENAI_COMPLETIONS_JSON = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7", "object": "text_completion", "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}
OPENAI_EMBEDDINGS_JSON = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, -0.0028842222]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
OPENAI_RESPONSES_JSON = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b", "object": "response", "created_at": 1741476542,
    "status": "completed", "error": None, "incomplete_details": None, "instructions": None,
    "max_output_tokens": None, "model": "gpt-4.1-2025-04-14",
    "output": [{"type": "message", "id": "msg_67ccd2bf17f0", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "In a peaceful grove...", "annotations": []}]}],
    "parallel_tool_calls": True, "reasoning": {"effort": None, "summary": None}, "store": True,
    "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
    "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123},
    "user": None, "metadata": {},
}
OPENAI_RESPONSES_REASONING_JSON = {
    **OPENAI_RESPONSES_JSON, "model": "o4-mini-2025-04-16",
    "usage": {"input_tokens": 5000, "input_tokens_details": {"cached_tokens": 4096}, "output_tokens": 700,
              "output_tokens_details": {"reasoning_tokens": 512}, "total_tokens": 5700},
}
ANTHROPIC_JSON = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-20250514", "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
              "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 0},
              "output_tokens": 6, "service_tier": "standard"},
}
ANTHROPIC_PLAIN_JSON = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
    "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 25, "output_tokens": 3},
}
GEMINI_JSON = {
    "candidates": [{"content": {"parts": [{"text": "AI learns patterns from data."}], "role": "model"},
                    "finishReason": "STOP", "avgLogprobs": -0.12, "index": 0}],
    "usageMetadata": {"promptTokenCount": 812, "candidatesTokenCount": 12, "totalTokenCount": 1324,
                      "cachedContentTokenCount": 512, "thoughtsTokenCount": 500,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 812}],
                      "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 512}]},
    "modelVersion": "gemini-2.5-flash", "responseId": "mK3taL2bFqPYz7IP0ZSEqQg",
}
GEMINI_TOOL_JSON = {
    "candidates": [{"content": {"parts": [{"text": "Found it."}], "role": "model"}, "finishReason": "STOP"}],
    "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 10, "toolUsePromptTokenCount": 300,
                      "totalTokenCount": 350},
    "modelVersion": "gemini-2.0-flash",
}

JSON_CASES = [
    ("openai", "chat", OPENAI_CHAT_JSON, U(19, 10), "gpt-4o-2024-08-06"),
    ("openai", "chat", OPENAI_O_SERIES_JSON, U(2006, 300, cached=1920, reasoning=192), "o3-mini-2025-01-31"),
    ("openai", "chat", XAI_REASONING_JSON, U(32, 103, cached=6, reasoning=94), "grok-3-mini"),
    ("openai", "chat", DEEPSEEK_JSON, U(100, 5, cached=64), "deepseek-chat"),
    ("openai", "chat", GROQ_JSON, U(18, 5), "llama-3.1-8b-instant"),
    ("openai", "chat", OPENROUTER_JSON, U(1200, 40, cached=1000, write=150), "anthropic/claude-3.5-sonnet"),
    ("azure", "chat", OPENAI_CHAT_JSON, U(19, 10), "gpt-4o-2024-08-06"),
    ("openai", "completions", OPENAI_COMPLETIONS_JSON, U(5, 7), "gpt-3.5-turbo-instruct"),
    ("openai", "embeddings", OPENAI_EMBEDDINGS_JSON, U(8, 0), "text-embedding-3-small"),
    ("openai", "responses", OPENAI_RESPONSES_JSON, U(36, 87), "gpt-4.1-2025-04-14"),
    ("openai", "responses", OPENAI_RESPONSES_REASONING_JSON, U(5000, 700, cached=4096, reasoning=512),
     "o4-mini-2025-04-16"),
    ("anthropic", "messages", ANTHROPIC_JSON, U(2112, 6, cached=2000, write=100), "claude-sonnet-4-20250514"),
    ("anthropic", "messages", ANTHROPIC_PLAIN_JSON, U(25, 3), "claude-3-5-haiku-20241022"),
    ("gemini", "generate", GEMINI_JSON, U(812, 512, cached=512, reasoning=500), "gemini-2.5-flash"),
    ("gemini", "generate", GEMINI_TOOL_JSON, U(340, 10), "gemini-2.0-flash"),
    # Gemini streamGenerateContent without alt=sse: a JSON array; the last usageMetadata wins
    ("gemini", "generate", [{**GEMINI_JSON, "usageMetadata": {"promptTokenCount": 812, "totalTokenCount": 812}},
                            GEMINI_JSON], U(812, 512, cached=512, reasoning=500), "gemini-2.5-flash"),
    # The compatibility endpoints answer in OpenAI's shape whatever the protocol
    ("gemini", "chat", {**OPENAI_CHAT_JSON, "model": "gemini-2.0-flash"}, U(19, 10), "gemini-2.0-flash"),
    ("anthropic", "chat", {**OPENAI_CHAT_JSON, "model": "claude-opus-4-1"}, U(19, 10), "claude-opus-4-1"),
    ("openai", "messages", ANTHROPIC_JSON, U(2112, 6, cached=2000, write=100), "claude-sonnet-4-20250514"),
]


@pytest.mark.parametrize("protocol,kind,body,usage,model", JSON_CASES)
def test_usage_and_model_from_json(protocol, kind, body, usage, model) -> None:
    assert usage_from_json(protocol, kind, body) == usage
    assert model_from_json(protocol, body) == model


@pytest.mark.parametrize(
    "protocol,kind,body",
    [
        ("openai", "chat", {"id": "x", "choices": []}),
        ("openai", "chat", {"usage": None}),
        ("openai", "chat", {"usage": {}}),
        ("openai", "other", OPENAI_CHAT_JSON),  # other endpoints are logged with zero tokens
        ("openai", "chat", {"error": {"message": "bad", "type": "invalid_request_error"}}),
        ("anthropic", "messages", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ("gemini", "generate", {"candidates": []}),
        ("gemini", "embeddings", {"embedding": {"values": [0.1, 0.2]}}),
        ("gemini", "generate", []),
        ("openai", "chat", None),
        ("openai", "chat", "str"),
        ("openai", "chat", 12),
    ],
)
def test_usage_absent(protocol, kind, body) -> None:
    assert usage_from_json(protocol, kind, body) is None


def test_groq_x_groq_usage_placement() -> None:
    body = {"id": "c", "model": "llama", "choices": [], "x_groq": {"id": "req_1", "usage": {
        "queue_time": 0.06, "prompt_tokens": 18, "completion_tokens": 439, "total_tokens": 457}}}
    assert usage_from_json("openai", "chat", body) == U(18, 439)


def test_inconsistent_parts_are_clamped() -> None:
    body = {"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                      "prompt_tokens_details": {"cached_tokens": 50},
                      "completion_tokens_details": {"reasoning_tokens": 9}}}
    assert usage_from_json("openai", "chat", body) == U(10, 2, cached=10, reasoning=2)


# -- streams -------------------------------------------------------------------------------------


def sse(events: list[tuple[str | None, dict | str]], eol: str = "\n") -> bytes:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        block = (f"event: {name}{eol}" if name else "") + f"data: {text}{eol}{eol}"
        out.append(block)
    return "".join(out).encode()


def chat_chunk(delta: dict, finish=None, usage="absent", model="gpt-4o-mini-2024-07-18", **extra) -> dict:
    d = {"id": "chatcmpl-AbC", "object": "chat.completion.chunk", "created": 1721596428, "model": model,
         "system_fingerprint": "fp_611b667b19",
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    if usage != "absent":
        d["usage"] = usage
    return d


CHAT_USAGE = {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

OPENAI_CHAT_STREAM = sse([
    (None, chat_chunk({"role": "assistant", "content": "", "refusal": None}, usage=None)),
    (None, chat_chunk({"content": "Hello"}, usage=None)),
    (None, chat_chunk({"content": " there"}, usage=None)),
    (None, chat_chunk({"content": "!"}, usage=None)),
    (None, chat_chunk({}, finish="stop", usage=None)),
    (None, {"id": "chatcmpl-AbC", "object": "chat.completion.chunk", "created": 1721596428,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_611b667b19", "choices": [],
            "usage": CHAT_USAGE}),
    (None, "[DONE]"),
])
OPENAI_CHAT_TOOL_STREAM = sse([
    (None, chat_chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})),
    (None, chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]})),
    (None, chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]})),
    (None, chat_chunk({}, finish="tool_calls")),
    (None, "[DONE]"),
])
XAI_STREAM = sse([  # usage, cumulative, on every chunk
    (None, chat_chunk({"content": "Coca", "role": "assistant"}, model="grok-beta",
                      usage={"prompt_tokens": 38, "completion_tokens": 1, "total_tokens": 39,
                             "prompt_tokens_details": {"text_tokens": 38, "cached_tokens": 0}})),
    (None, chat_chunk({"content": "-Cola"}, model="grok-beta",
                      usage={"prompt_tokens": 38, "completion_tokens": 2, "total_tokens": 40,
                             "prompt_tokens_details": {"text_tokens": 38, "cached_tokens": 0}})),
    (None, chat_chunk({}, finish="stop", model="grok-beta",
                      usage={"prompt_tokens": 38, "completion_tokens": 2, "total_tokens": 40,
                             "prompt_tokens_details": {"text_tokens": 38, "cached_tokens": 0}})),
    (None, "[DONE]"),
])
GROQ_STREAM = sse([
    (None, chat_chunk({"role": "assistant", "content": "hi"}, model="llama-3.1-8b-instant")),
    (None, chat_chunk({}, finish="stop", model="llama-3.1-8b-instant", x_groq={
        "id": "req_01jadadp0femyae9kav1gpkhe8",
        "usage": {"queue_time": 0.06, "prompt_tokens": 18, "prompt_time": 0.0002, "completion_tokens": 439,
                  "completion_time": 0.79, "total_tokens": 457, "total_time": 0.79}})),
    (None, "[DONE]"),
])
DEEPSEEK_REASONER_STREAM = sse([
    (None, chat_chunk({"role": "assistant", "content": None, "reasoning_content": "Let me think"},
                      model="deepseek-reasoner")),
    (None, chat_chunk({"content": "Answer"}, model="deepseek-reasoner")),
    (None, chat_chunk({"content": ""}, finish="stop", model="deepseek-reasoner",
                      usage={"prompt_tokens": 13, "completion_tokens": 120, "total_tokens": 133,
                             "prompt_tokens_details": {"cached_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 100},
                             "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 13})),
    (None, "[DONE]"),
])


def completion_chunk(text: str, finish=None) -> dict:
    return {"id": "cmpl-7i", "object": "text_completion", "created": 1690759702,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "model": "gpt-3.5-turbo-instruct"}


OPENAI_COMPLETIONS_STREAM = sse([
    (None, completion_chunk("This")),
    (None, completion_chunk(" is")),
    (None, completion_chunk(" a test", "length")),
    (None, {"id": "cmpl-7i", "object": "text_completion", "created": 1690759702, "model": "gpt-3.5-turbo-instruct",
            "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
    (None, "[DONE]"),
])

_RESP = {"id": "resp_1", "object": "response", "created_at": 1741290958, "status": "in_progress", "error": None,
         "model": "gpt-4.1-2025-04-14", "output": [], "usage": None, "tools": [], "instructions": None}


def responses_stream(final: str = "response.completed", usage: dict | None = None) -> bytes:
    usage = usage or {"input_tokens": 37, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 11,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 48}
    status = final.split(".")[1]
    return sse([
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": _RESP}),
        ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1, "response": _RESP}),
        ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
                                        "item": {"id": "msg_1", "status": "in_progress", "type": "message",
                                                 "role": "assistant", "content": []}}),
        ("response.content_part.added", {"type": "response.content_part.added", "sequence_number": 3,
                                         "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                         "part": {"type": "output_text", "text": "", "annotations": []}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 4,
                                        "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi"}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 5,
                                        "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                        "delta": " there"}),
        ("response.output_text.done", {"type": "response.output_text.done", "sequence_number": 6,
                                       "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                       "text": "Hi there"}),
        (final, {"type": final, "sequence_number": 7,
                 "response": {**_RESP, "status": status, "usage": usage,
                              "output": [{"id": "msg_1", "type": "message", "status": "completed",
                                          "role": "assistant",
                                          "content": [{"type": "output_text", "text": "Hi there"}]}]}}),
    ])


def anthropic_stream(delta_usage: dict, start_usage: dict | None = None, eol: str = "\n") -> bytes:
    start_usage = start_usage or {"input_tokens": 472, "cache_creation_input_tokens": 0,
                                  "cache_read_input_tokens": 0, "output_tokens": 2}
    return sse([
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-20250514", "stop_sequence": None, "usage": start_usage,
            "content": [], "stop_reason": None}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "thinking_delta", "thinking": "Hmm."}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("ping", {"type": "ping"}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "text_delta", "text": "Okay"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "text_delta", "text": ", here."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": delta_usage}),
        ("message_stop", {"type": "message_stop"}),
    ], eol=eol)


def gemini_chunk(text: str, usage: dict, finish: str | None = None) -> dict:
    cand = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    return {"candidates": [cand], "usageMetadata": usage, "modelVersion": "gemini-2.0-flash",
            "responseId": "y7vZaKmtCo6fz7IPsLugqAE"}


GEMINI_STREAM = sse([  # Google's SSE uses CRLF line ends
    (None, gemini_chunk("The", {"promptTokenCount": 9, "totalTokenCount": 9,
                                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}]})),
    (None, gemini_chunk(" sky is blue", {"promptTokenCount": 9, "totalTokenCount": 9})),
    (None, gemini_chunk(" because...", {"promptTokenCount": 9, "candidatesTokenCount": 40, "totalTokenCount": 79,
                                        "cachedContentTokenCount": 4, "thoughtsTokenCount": 30}, "STOP")),
], eol="\r\n")
GEMINI_OPENAI_COMPAT_STREAM = sse([
    (None, chat_chunk({"content": "Hi", "role": "assistant"}, model="gemini-2.0-flash")),
    (None, chat_chunk({"content": "!"}, finish="stop", model="gemini-2.0-flash",
                      usage={"completion_tokens": 2, "prompt_tokens": 4, "total_tokens": 6})),
    (None, "[DONE]"),
])

STREAM_CASES = [
    # protocol, kind, stream bytes, usage, model, output text
    pytest.param("openai", "chat", OPENAI_CHAT_STREAM, U(14, 3), "gpt-4o-mini-2024-07-18", "Hello there!",
                 id="openai-chat"),
    pytest.param("openai", "chat", OPENAI_CHAT_STREAM.replace(b"\n", b"\r\n"), U(14, 3), "gpt-4o-mini-2024-07-18",
                 "Hello there!", id="openai-chat-crlf"),
    pytest.param("openai", "chat", OPENAI_CHAT_TOOL_STREAM, None, "gpt-4o-mini-2024-07-18",
                 'get_weather{"city":"Paris"}', id="openai-chat-tools-no-usage"),
    pytest.param("openai", "chat", XAI_STREAM, U(38, 2), "grok-beta", "Coca-Cola", id="xai"),
    pytest.param("openai", "chat", GROQ_STREAM, U(18, 439), "llama-3.1-8b-instant", "hi", id="groq"),
    pytest.param("openai", "chat", DEEPSEEK_REASONER_STREAM, U(13, 120, reasoning=100), "deepseek-reasoner",
                 "Let me thinkAnswer", id="deepseek-reasoner"),
    pytest.param("openai", "completions", OPENAI_COMPLETIONS_STREAM, U(5, 3), "gpt-3.5-turbo-instruct",
                 "This is a test", id="openai-completions"),
    pytest.param("openai", "responses", responses_stream(), U(37, 11), "gpt-4.1-2025-04-14", "Hi there",
                 id="responses"),
    pytest.param("openai", "responses", responses_stream("response.incomplete", {
        "input_tokens": 100, "input_tokens_details": {"cached_tokens": 64}, "output_tokens": 16,
        "output_tokens_details": {"reasoning_tokens": 16}, "total_tokens": 116}),
        U(100, 16, cached=64, reasoning=16), "gpt-4.1-2025-04-14", "Hi there", id="responses-incomplete"),
    pytest.param("anthropic", "messages", anthropic_stream({"output_tokens": 503}), U(472, 503),
                 "claude-sonnet-4-20250514", "Hmm.Okay, here.", id="anthropic"),
    pytest.param("anthropic", "messages", anthropic_stream(
        {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
         "output_tokens": 50},
        {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
         "output_tokens": 1}),
        U(2112, 50, cached=2000, write=100), "claude-sonnet-4-20250514", "Hmm.Okay, here.", id="anthropic-cache"),
    pytest.param("anthropic", "messages", anthropic_stream(  # OpenRouter-style: input only in message_delta
        {"input_tokens": 9, "output_tokens": 20}, {"input_tokens": 0, "output_tokens": 0}),
        U(9, 20), "claude-sonnet-4-20250514", "Hmm.Okay, here.", id="anthropic-delta-overwrites-input"),
    pytest.param("anthropic", "messages", anthropic_stream(  # null fields in the delta keep earlier values
        {"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 7},
        {"input_tokens": 30, "cache_read_input_tokens": 10, "output_tokens": 1}),
        U(40, 7, cached=10), "claude-sonnet-4-20250514", "Hmm.Okay, here.", id="anthropic-null-keeps"),
    pytest.param("anthropic", "messages", anthropic_stream({"output_tokens": 503}, eol="\r\n"), U(472, 503),
                 "claude-sonnet-4-20250514", "Hmm.Okay, here.", id="anthropic-crlf"),
    pytest.param("gemini", "generate", GEMINI_STREAM, U(9, 70, cached=4, reasoning=30), "gemini-2.0-flash",
                 "The sky is blue because...", id="gemini"),
    pytest.param("gemini", "chat", GEMINI_OPENAI_COMPAT_STREAM, U(4, 2), "gemini-2.0-flash", "Hi!",
                 id="gemini-openai-compat"),
]


def run_stream(protocol: str, kind: str, chunks: list[bytes]) -> StreamUsage:
    parser, su = SSEParser(), StreamUsage(protocol, kind)
    for c in chunks:
        for ev in parser.feed(c):
            su.feed(ev)
    for ev in parser.flush():
        su.feed(ev)
    return su


@pytest.mark.parametrize("protocol,kind,stream,usage,model,text", STREAM_CASES)
def test_stream_usage(protocol, kind, stream, usage, model, text) -> None:
    su = run_stream(protocol, kind, [stream])
    assert su.usage == usage
    assert su.complete is (usage is not None)
    assert su.model == model
    assert su.output_text() == text
    assert su.error is None


@pytest.mark.parametrize("protocol,kind,stream,usage,model,text", STREAM_CASES)
def test_stream_usage_identical_under_every_split(protocol, kind, stream, usage, model, text) -> None:
    step = max(1, len(stream) // 300)
    for i in range(0, len(stream) + 1, step):
        su = run_stream(protocol, kind, [stream[:i], stream[i:]])
        assert (su.usage, su.model) == (usage, model), i
    su = run_stream(protocol, kind, [stream[i : i + 7] for i in range(0, len(stream), 7)])
    assert (su.usage, su.model, su.output_text()) == (usage, model, text)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([p.values for p in STREAM_CASES]), st.lists(st.integers(0, 10_000), max_size=8))
def test_stream_usage_random_splits(case, cuts) -> None:
    protocol, kind, stream, usage, model, text = case
    cuts = sorted(c % (len(stream) + 1) for c in cuts)
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    su = run_stream(protocol, kind, chunks)
    assert (su.usage, su.model, su.output_text()) == (usage, model, text)


def test_aborted_anthropic_stream_keeps_input_counts_as_partial() -> None:
    stream = anthropic_stream({"output_tokens": 503})
    cut = stream.index(b"event: message_delta")
    su = run_stream("anthropic", "messages", [stream[:cut]])
    assert su.usage is None and not su.complete
    assert su.partial_usage == U(472, 2)
    assert su.output_text() == "Hmm.Okay, here."


def test_aborted_openai_stream_has_no_usage_but_text() -> None:
    stream = OPENAI_CHAT_STREAM
    cut = stream.index(b'"choices":[]') - 100
    su = run_stream("openai", "chat", [stream[:cut]])
    assert su.usage is None and su.partial_usage is None
    assert su.output_text() == "Hello there!"


def test_aborted_gemini_stream_is_not_complete() -> None:
    cut = GEMINI_STREAM.index(b" because")
    su = run_stream("gemini", "generate", [GEMINI_STREAM[:cut]])
    assert su.usage is None
    assert su.partial_usage == U(9, 0)
    assert su.output_text() == "The sky is blue"


def test_anthropic_several_message_deltas_are_cumulative_not_summed() -> None:
    stream = anthropic_stream({"output_tokens": 10}) + sse([
        ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 25}})])
    assert run_stream("anthropic", "messages", [stream]).usage == U(472, 25)


def test_in_stream_errors_are_reported() -> None:
    anth = sse([("message_start", {"type": "message_start", "message": {"model": "claude-x", "usage": {
        "input_tokens": 5, "output_tokens": 1}}}),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})])
    su = run_stream("anthropic", "messages", [anth])
    assert (su.error, su.usage, su.model) == ("overloaded_error", None, "claude-x")

    chat = sse([(None, chat_chunk({"content": "a"})),
                (None, {"error": {"message": "server had an error", "type": "server_error", "code": None}})])
    assert run_stream("openai", "chat", [chat]).error == "server_error"

    head, sep, tail = responses_stream("response.failed").rpartition(b'"error":null,"model"')
    failed = head + b'"error":{"code":"server_error","message":"boom"},"model"' + tail
    su = run_stream("openai", "responses", [failed])
    assert (su.error, su.usage) == ("server_error", U(37, 11))

    err = sse([("error", {"type": "error", "code": "rate_limit_exceeded", "message": "slow", "param": None})])
    assert run_stream("openai", "responses", [err]).error == "rate_limit_exceeded"


def test_responses_events_without_event_lines() -> None:
    # Some compatible servers send only data lines; the JSON "type" is used instead.
    stripped = b"\n".join(l for l in responses_stream().split(b"\n") if not l.startswith(b"event:"))
    su = run_stream("openai", "responses", [stripped])
    assert (su.usage, su.output_text()) == (U(37, 11), "Hi there")


def test_output_text_is_capped() -> None:
    su = StreamUsage("openai", "chat")
    big = "x" * 100_000
    for ev in SSEParser().feed(sse([(None, chat_chunk({"content": big}))] * 60)):
        su.feed(ev)
    text = su.output_text()
    assert 900_000 <= len(text) <= 1_000_000


def test_unknown_kind_stream_is_ignored() -> None:
    su = run_stream("openai", "other", [OPENAI_CHAT_STREAM])
    assert (su.usage, su.model, su.output_text()) == (None, None, "")


# ==================================================================================================
# The usage-only chunk


@pytest.mark.parametrize(
    "data,expected",
    [
        (json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": CHAT_USAGE}), True),
        (json.dumps({"id": "c", "usage": {"prompt_tokens": 1}}), True),
        (json.dumps(chat_chunk({"content": "x"}, usage=None)), False),
        (json.dumps(chat_chunk({"content": "x"}, usage=CHAT_USAGE)), False),  # xAI: usage on a real chunk
        (json.dumps({"id": "c", "choices": [], "usage": None}), False),
        ('{"choices": [], "usage" : {"prompt_tokens": 3}}', True),
        ("[DONE]", False),
        ("", False),
        ('{"usage": {', False),
        ('["usage", {}]', False),
        (json.dumps(chat_chunk({"content": '"usage": {"x": 1}'})), False),
    ],
)
def test_is_usage_only_chunk(data: str, expected: bool) -> None:
    assert is_usage_only_chunk(data) is expected


def test_usage_only_chunk_found_in_real_stream() -> None:
    events = SSEParser().feed(OPENAI_CHAT_STREAM)
    assert [is_usage_only_chunk(e.data) for e in events] == [False] * 5 + [True, False]


# ==================================================================================================
# Native errors

CODES = [
    ("invalid_api_key", 401),
    ("missing_provider_key", 401),
    ("rate_limit_exceeded", 429),
    ("insufficient_quota", 429),
    ("invalid_request", 400),
    ("upstream_error", 502),
    ("upstream_error", 504),
    ("gateway_error", 500),
]


@pytest.mark.parametrize("code,status", CODES)
def test_error_body_openai(code: str, status: int) -> None:
    body, headers = error_body("openai", status, code, "nope")
    assert headers == {"content-type": "application/json"}
    err = json.loads(body)["error"]
    assert err["message"] == "nope" and err["code"] == code and "param" in err and err["param"] is None
    assert err["type"] == {
        "invalid_api_key": "invalid_request_error", "rate_limit_exceeded": "requests",
        "insufficient_quota": "insufficient_quota", "upstream_error": "server_error",
        "gateway_error": "server_error", "invalid_request": "invalid_request_error",
        "missing_provider_key": "invalid_request_error",
    }[code]


def test_error_body_openai_type_override() -> None:
    err = json.loads(error_body("azure", 429, "rate_limit_exceeded", "m", error_type="tokens")[0])["error"]
    assert (err["type"], err["code"]) == ("tokens", "rate_limit_exceeded")


@pytest.mark.parametrize(
    "status,etype",
    [(400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
     (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (504, "timeout_error"),
     (529, "overloaded_error"), (418, "invalid_request_error"), (599, "api_error")],
)
def test_error_body_anthropic(status: int, etype: str) -> None:
    obj = json.loads(error_body("anthropic", status, "x", "msg")[0])
    assert obj == {"type": "error", "error": {"type": etype, "message": "msg"}}


@pytest.mark.parametrize(
    "code,status,gstatus,reason",
    [("invalid_api_key", 401, "UNAUTHENTICATED", "API_KEY_INVALID"),
     ("rate_limit_exceeded", 429, "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"),
     ("insufficient_quota", 429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
     ("gateway_error", 500, "INTERNAL", "GATEWAY_ERROR"),
     ("upstream_error", 502, "UNAVAILABLE", "UPSTREAM_ERROR"),
     ("upstream_error", 504, "DEADLINE_EXCEEDED", "UPSTREAM_ERROR"),
     ("invalid_request", 400, "INVALID_ARGUMENT", "INVALID_REQUEST")],
)
def test_error_body_gemini(code, status, gstatus, reason) -> None:
    err = json.loads(error_body("gemini", status, code, "m")[0])["error"]
    assert (err["code"], err["message"], err["status"]) == (status, "m", gstatus)
    assert err["details"][0]["reason"] == reason


def _httpx_response(status: int, body: bytes, url: str):
    import httpx2

    return httpx2.Response(status, content=body, headers={"content-type": "application/json"},
                           request=httpx2.Request("POST", url))


@pytest.mark.parametrize(
    "code,status,exc",
    [("invalid_api_key", 401, "AuthenticationError"), ("rate_limit_exceeded", 429, "RateLimitError"),
     ("insufficient_quota", 429, "RateLimitError"), ("gateway_error", 500, "InternalServerError"),
     ("invalid_request", 400, "BadRequestError")],
)
def test_openai_sdk_raises_its_usual_exception(code: str, status: int, exc: str) -> None:
    import openai

    client = openai.OpenAI(api_key="x", max_retries=0)
    body, _ = error_body("openai", status, code, "refused by tollgate")
    err = client._make_status_error_from_response(
        _httpx_response(status, body, "https://api.openai.com/v1/chat/completions"))
    assert type(err).__name__ == exc
    assert err.code == code and "refused by tollgate" in str(err)


@pytest.mark.parametrize(
    "status,exc",
    [(401, "AuthenticationError"), (429, "RateLimitError"), (500, "InternalServerError"),
     (529, "OverloadedError"), (400, "BadRequestError")],
)
def test_anthropic_sdk_raises_its_usual_exception(status: int, exc: str) -> None:
    import anthropic

    client = anthropic.Anthropic(api_key="x", max_retries=0)
    body, _ = error_body("anthropic", status, "x", "refused by tollgate")
    err = client._make_status_error_from_response(
        _httpx_response(status, body, "https://api.anthropic.com/v1/messages"))
    assert type(err).__name__ == exc
    assert err.body["error"]["message"] == "refused by tollgate"


# ==================================================================================================
# Malformed input never raises

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["usage", "usageMetadata", "model", "modelVersion", "choices", "prompt_tokens",
                         "completion_tokens", "input_tokens", "output_tokens", "total_tokens",
                         "prompt_tokens_details", "completion_tokens_details", "cached_tokens",
                         "reasoning_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                         "cache_creation", "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
                         "cachedContentTokenCount", "response", "message", "delta", "x_groq", "error",
                         "type", "candidates", "content", "parts", "text", "finishReason", "stream",
                         "max_tokens", "stream_options", "include_usage", "generationConfig",
                         "maxOutputTokens"]),
        children, max_size=6),
    max_leaves=25,
)
KINDS = ["chat", "responses", "completions", "embeddings", "messages", "generate", "other"]
PROTOCOLS = ["openai", "azure", "anthropic", "gemini"]


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(PROTOCOLS), st.sampled_from(KINDS))
def test_json_functions_never_raise(body, protocol, kind) -> None:
    u = usage_from_json(protocol, kind, body)
    assert u is None or (u.input_tokens >= u.cached_input_tokens + u.cache_write_tokens >= 0
                         and u.output_tokens >= u.reasoning_tokens >= 0)
    m = model_from_json(protocol, body)
    assert m is None or isinstance(m, str)
    request_facts(protocol, "/v1beta/models/x:streamGenerateContent", body)
    request_facts(protocol, "/openai/deployments/d/chat/completions", body)
    request_facts(protocol, "/v1/messages", body)


EVENT_NAMES = [None, "message_start", "message_delta", "content_block_delta", "error", "response.created",
               "response.completed", "response.failed", "response.output_text.delta", "ping"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(EVENT_NAMES), json_values | st.text(max_size=20)), max_size=6),
       st.sampled_from(PROTOCOLS), st.sampled_from(KINDS))
def test_stream_usage_never_raises(events, protocol, kind) -> None:
    from tollgate.sse import SSEEvent

    su = StreamUsage(protocol, kind)
    for name, value in events:
        data = value if isinstance(value, str) else json.dumps(value)
        su.feed(SSEEvent(event=name, data=data, raw=b""))
        is_usage_only_chunk(data)
    su.usage, su.partial_usage, su.model, su.output_text()


def _mutations(obj, path=()):
    """Every leaf and subtree of obj, each replaced by each odd value in turn."""
    odd = [None, "12", True, -1, 1.5, float("inf"), [], {}, [1], {"a": 1}]
    if isinstance(obj, dict):
        for k, v in obj.items():
            for o in odd:
                yield (*path, k), o
            yield from _mutations(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _mutations(v, (*path, i))


def _set(obj, path, value):
    obj = copy.deepcopy(obj)
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


@pytest.mark.parametrize("protocol,kind,body,usage,model", JSON_CASES)
def test_fixture_mutations_never_raise(protocol, kind, body, usage, model) -> None:
    for path, value in _mutations(body):
        mutated = _set(body, path, value)
        u = usage_from_json(protocol, kind, mutated)
        assert u is None or isinstance(u, Usage)
        model_from_json(protocol, mutated)
        su = StreamUsage(protocol, kind)
        from tollgate.sse import SSEEvent

        su.feed(SSEEvent(None, json.dumps(mutated), b""))
        su.output_text()


def test_usage_name_fallbacks_between_chat_and_responses_shapes() -> None:
    assert usage_from_json("openai", "responses", {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == U(3, 4)
    assert usage_from_json("openai", "chat", {"usage": {"input_tokens": 3, "output_tokens": 4}}) == U(3, 4)
    assert usage_from_json("openai", "chat", {"usage": {"prompt_tokens": "x", "input_tokens": "y"}}) is None


def test_deeply_nested_json_never_raises() -> None:
    deep: object = {"model": "m"}
    for _ in range(5000):
        deep = [deep]
    assert model_from_json("gemini", deep) is None
    assert usage_from_json("gemini", "generate", deep) is None


def test_endpoint_kind_cache_never_holds_the_query() -> None:
    from tollgate import providers

    cached = providers._endpoint_kind
    endpoint_kind("gemini", "/v1beta/models/g:generateContent?key=tg-secret-in-query")
    # lru_cache exposes no keys: the query-less path being a hit shows what was stored.
    hits = cached.cache_info().hits
    cached("gemini", "/v1beta/models/g:generateContent")
    assert cached.cache_info().hits == hits + 1


# ==================================================================================================
# metering_fields: a long answer's usage and model without parsing its bulk

from tollgate.providers import metering_fields  # noqa: E402

_CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 3000}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 11, "completion_tokens": 3000, "total_tokens": 3011}, "system_fingerprint": "fp"}
_EMB = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [0.25] * 1536} for i in range(3)],
        "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
_MSG = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "x" * 9000},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {"usage": {"input_tokens": 999}}}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 2400, "cache_read_input_tokens": 4}}
_GEM = {"candidates": [{"content": {"parts": [{"text": "y" * 9000}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2000, "totalTokenCount": 2005},
        "modelVersion": "gemini-2.0-flash", "responseId": "r"}


@pytest.mark.parametrize("doc, protocol, kind", [
    (_CHAT, "openai", "chat"), (_EMB, "openai", "embeddings"), (_MSG, "anthropic", "messages"),
    (_GEM, "gemini", "generate"),
    ({**_CHAT, "model": "m\u00e9\\\"x"}, "openai", "chat"),  # escapes in the model name
])
@pytest.mark.parametrize("indent", [None, 2])
def test_metering_fields_meter_as_the_whole_answer(doc, protocol, kind, indent):
    raw = json.dumps(doc, indent=indent).encode()
    fields = metering_fields(raw)
    assert fields is not None
    assert usage_from_json(protocol, kind, fields) == usage_from_json(protocol, kind, doc)
    assert model_from_json(protocol, fields) == model_from_json(protocol, doc)


@pytest.mark.parametrize("raw", [
    b'{"choices": [{"usage": {"prompt_tokens": 1}}], "model": "m"}',  # only a nested usage
    b'{"model": "m", "x": {"usage": {"prompt_tokens": 1}, "y": 1}}',  # nested, members after it
    b'{"model": "m", "content": "say \\"usage\\": {\\"prompt_tokens\\": 1}"}',  # inside a string
    b'{"model": "m", "usage": {"prompt_tokens": 1}',  # truncated
    b'{"usage": "none", "model": "m"}',  # not an object
    b'{"nested": {"model": "m"}, "usage": {"prompt_tokens": 1}}',  # the only model is nested
    b'[{"usage": {"prompt_tokens": 1}, "model": "m"}]',  # an array answer
    b'not json "usage": {}}',
    b'',
])
def test_metering_fields_refuses_what_it_cannot_prove(raw):
    fields = metering_fields(raw)
    assert fields is None or (isinstance(fields.get("usage"), dict) and "model" in fields)
    if fields is not None:  # whatever it returns must be what a whole parse says
        doc = json.loads(raw)
        assert fields["usage"] == doc["usage"] and fields["model"] == doc["model"]


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["usage", "model", "a"]), c, max_size=3),
                    max_leaves=12))
def test_metering_fields_never_contradicts_a_whole_parse(doc):
    raw = json.dumps(doc).encode()
    fields = metering_fields(raw)
    if fields is not None:
        assert isinstance(doc, dict)
        assert fields["usage"] == doc["usage"]
        assert fields.get("model", fields.get("modelVersion")) == doc.get("model", doc.get("modelVersion"))


@pytest.mark.parametrize("model", ["gpt-4o-mini-2024-07-18", "m\u00e9", 'we"ird', "a\\b", ""])
def test_chat_stream_model_read_without_parsing_matches_a_parse(model):
    su = StreamUsage("openai", "chat")
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": model,
             "choices": [{"index": 0, "delta": {"content": '"model": "not-this"'}}], "usage": None}
    parser = SSEParser()
    for ev in parser.feed(b"data: " + json.dumps(chunk).encode() + b"\n\n"):
        su.feed(ev)
    assert su.model == (model or None)


# --- loads: the Rust parser, with json.loads for what it refuses --------------------------------------------

@pytest.mark.parametrize("data", [
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \\u00e9"}],"max_tokens":5}',
    '{"a": [1, 2.5, -0.0, 1e400, null, true]}',
    b'{"a":12345678901234567890123}',
    b'{"a":1,"a":2}',  # the last duplicate wins
    b' {"a":NaN} ',
    b'"plain string"',
    b'{"a":"\\ud800"}',  # a lone surrogate escape: the Rust parser refuses it, json.loads reads it
    b'\xef\xbb\xbf{"a":1}',  # a UTF-8 byte-order mark
    '{"a":"\u00e9"}'.encode("utf-16"),  # JSON may be UTF-16 (RFC 4627 detection, as json.loads does)
    b"[" * 300 + b"]" * 300,  # deeper than the Rust parser goes, within json.loads' recursion
])
def test_loads_is_json_loads(data):
    want = json.loads(data)
    assert repr(loads(data)) == repr(want)  # repr: NaN != NaN, and -0.0 must stay -0.0


@pytest.mark.parametrize("data", [b"", b"{", b'{"a":1} x', b'{"a":"\xff"}', b"[" * 100_000, "not json", b"\x00"])
def test_loads_gives_none_for_what_is_not_json(data):
    assert loads(data) is None
