"""The addon's small request-rewriting helpers, on real mitmproxy requests."""
from __future__ import annotations

import gzip
import json

import pytest
from mitmproxy.test import tutils

from tollgate.addon import _body_resized, _forward, _with_usage_asked
from tollgate.providers import Credential


def req(content: bytes, **headers: str):
    r = tutils.treq(host="api.openai.com", port=443, scheme=b"https", path=b"/v1/chat/completions", content=content)
    r.headers["content-length"] = str(len(r.raw_content))
    for k, v in headers.items():
        r.headers[k.replace("_", "-")] = v
    return r


@pytest.mark.parametrize("raw", [
    b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}',
    b'  \n{ "model": "m", "stream": true }',
    b'{"model":"m","stream":true,"stream_options":null}',  # present but null: the splice would be shadowed
    b'{"model":"m","stream":true,"stream_options":{"x":1}}',
    b'{}',
])
def test_usage_asked_body_parses_to_the_edited_body(raw):
    r = req(raw)
    body = json.loads(raw)
    had = "stream_options" in body
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    extra = _with_usage_asked(r, body, had)
    _forward(r, Credential("k", "header", "authorization", "Bearer "), "sk-real", None, extra)
    assert json.loads(r.content) == body
    assert r.headers["content-length"] == str(len(r.raw_content))
    assert r.headers["authorization"] == "Bearer sk-real"


def test_usage_asked_on_an_encoded_body_re_encodes_it():
    raw = json.dumps({"model": "m", "stream": True}).encode()
    r = req(b"")
    r.headers["content-encoding"] = "gzip"
    r.content = raw  # mitmproxy encodes it
    body = json.loads(raw)
    body["stream_options"] = {"include_usage": True}
    _with_usage_asked(r, body, False)
    assert json.loads(gzip.decompress(r.raw_content)) == body


@pytest.mark.parametrize("target, host_header", [
    (("https", "127.0.0.1", 8443, "/v1/chat/completions"), "127.0.0.1:8443"),
    (("https", "llm.internal", 443, "/openai/v1/chat/completions"), "llm.internal"),
    (("http", "localhost", 80, "/v1/x"), "localhost"),
])
def test_forward_retargets_as_the_setters_do(target, host_header):
    r = req(b"{}")
    r.headers["host"] = "api.openai.com"
    ref = req(b"{}")
    ref.headers["host"] = "api.openai.com"
    _forward(r, Credential("k", "header", "authorization", "Bearer "), "sk-real", target)
    ref.scheme, ref.host, ref.port, ref.path = target
    assert (r.scheme, r.host, r.port, r.path) == (ref.scheme, ref.host, ref.port, ref.path)
    assert r.headers["host"] == ref.headers["host"] == host_header
    assert r.url == ref.url


def test_forward_puts_a_query_credential_back_in_the_query():
    r = req(b"{}")
    r.path = "/v1beta/models/gemini-2.0-flash:generateContent?key=tollgate-redacted"
    _forward(r, Credential("k", "query", "key"), "AIza-real", None)
    assert r.query["key"] == "AIza-real"
    assert "authorization" not in r.headers


@pytest.mark.parametrize("version, headers, drop_encoding, want", [
    ("HTTP/1.1", {"content-length": "900"}, False, {"transfer-encoding": "chunked"}),
    ("HTTP/1.1", {"content-length": "900", "content-encoding": "gzip"}, True, {"transfer-encoding": "chunked"}),
    ("HTTP/1.1", {"transfer-encoding": "chunked"}, False, {"transfer-encoding": "chunked"}),  # already framed
    ("HTTP/1.1", {"content-encoding": "gzip", "transfer-encoding": "chunked"}, True, {"transfer-encoding": "chunked"}),
    ("HTTP/2.0", {"content-length": "900"}, False, {}),  # frames delimit the body
    ("HTTP/1.0", {"content-length": "900"}, False, {}),  # no chunking in HTTP/1.0: it ends at close
])
def test_body_resized_keeps_http1_answers_framed(version, headers, drop_encoding, want):
    resp = tutils.tresp(http_version=version.encode())
    resp.headers.clear()
    resp.headers["content-type"] = "text/event-stream"
    for k, v in headers.items():
        resp.headers[k] = v
    _body_resized(resp, drop_encoding)
    assert dict(resp.headers) == {"content-type": "text/event-stream", **want}


def test_body_resized_never_chunks_for_an_http10_client():
    resp = tutils.tresp()
    resp.headers["content-length"] = "900"
    _body_resized(resp, False, client_http10=True)
    assert "transfer-encoding" not in resp.headers and "content-length" not in resp.headers
