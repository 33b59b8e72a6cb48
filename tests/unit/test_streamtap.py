import gzip
import json

import pytest

from tollgate.providers import StreamUsage
from tollgate.streamtap import StreamTap, decoder_for


def chat_stream(include_usage: bool) -> bytes:
    chunks = []
    for word in ["Hel", "lo"]:
        c = {"id": "x", "choices": [{"index": 0, "delta": {"content": word}}]}
        if include_usage:
            c["usage"] = None
        chunks.append(c)
    if include_usage:
        chunks.append({"id": "x", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2,
                                                           "total_tokens": 13}})
    body = b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks)
    return body + b"data: [DONE]\n\n"


def run(tap, data: bytes, size: int):
    out = []
    for i in range(0, len(data), size):
        r = tap(data[i:i + size])
        assert r != b"", "an empty bytes chunk would end a chunked response early"
        out.append(r if isinstance(r, bytes) else b"".join(r))
    r = tap(b"")
    out.append(r if isinstance(r, bytes) else b"".join(r))
    return b"".join(out)


def sse_data(body: bytes) -> list:
    """What an SSE client reads: the data of each dispatched event (comments skipped), JSON parsed."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if data:
            text = b"\n".join(data)
            out.append(text if text == b"[DONE]" else json.loads(text))
    return out


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_stripped_stream_is_what_the_app_asked_for(size):
    tap = StreamTap(StreamUsage("openai", "chat"), sse=True, strip_usage=True)
    sent = chat_stream(include_usage=True)
    out = run(tap, sent, size)
    assert sse_data(out) == sse_data(chat_stream(include_usage=False))
    assert len(out) == len(sent)  # blanked, not cut: a Content-Length stays true
    assert b'"usage"' not in out
    assert (tap.usage.usage.input_tokens, tap.usage.usage.output_tokens) == (11, 2)


@pytest.mark.parametrize("raw", [b'data: {"usage":{}}\n\n', b'data: {"usage":{}}\r\n\r\n', b'data: {}\r\r',
                                 b'data: {"x":1}', b":\n\n", b""])
def test_blank_event_is_a_comment_of_the_same_length(raw):
    from tollgate.streamtap import blank_event
    from tollgate.sse import SSEParser
    b = blank_event(raw)
    assert len(b) == len(raw)
    p = SSEParser()
    assert p.feed(b) + p.flush() == []  # nothing an SSE client would dispatch


def test_spaced_usage_null_is_blanked_too():
    tap = StreamTap(StreamUsage("openai", "chat"), sse=True, strip_usage=True)
    sent = b'data: {"id": "x", "choices": [], "usage" : null}\n\ndata: [DONE]\n\n'
    out = run(tap, sent, 5)
    assert len(out) == len(sent) and b"usage" not in out
    assert sse_data(out) == [{"id": "x", "choices": []}, b"[DONE]"]


@pytest.mark.parametrize("size", [1, 5, 100])
def test_untouched_stream_passes_byte_for_byte(size):
    tap = StreamTap(StreamUsage("openai", "chat"), sse=True)
    data = chat_stream(include_usage=True)
    assert run(tap, data, size) == data


@pytest.mark.parametrize("size", [1, 17, 4096])
def test_gzip_stream_is_decoded_on_the_fly(size):
    data = chat_stream(include_usage=True)
    tap = StreamTap(StreamUsage("openai", "chat"), sse=True, decode=decoder_for("gzip"))
    assert run(tap, gzip.compress(data), size) == data
    assert tap.usage.complete


@pytest.mark.parametrize("enc", ["", "identity"])
def test_no_decoder_for_identity(enc):
    assert decoder_for(enc) is None


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError):
        decoder_for("compress")
