"""SSEParser: spec-conformant events, across any chunk split, with every byte accounted for."""
from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.sse import SSEEvent, SSEParser


def parse_all(chunks: list[bytes], **kw) -> tuple[list[SSEEvent], SSEParser]:
    p = SSEParser(**kw)
    events: list[SSEEvent] = []
    for c in chunks:
        events += p.feed(c)
    events += p.flush()
    return events, p


def pairs(events: list[SSEEvent]) -> list[tuple[str | None, str]]:
    return [(e.event, e.data) for e in events]


def assert_accounted(events: list[SSEEvent], p: SSEParser, stream: bytes) -> None:
    assert b"".join(e.raw for e in events) + p.pending == stream


CASES = [
    pytest.param(b"data: hello\n\n", [(None, "hello")], id="lf"),
    pytest.param(b"data: hello\r\n\r\n", [(None, "hello")], id="crlf"),
    pytest.param(b"data: hello\r\r", [(None, "hello")], id="cr"),
    pytest.param(b"data:hello\n\n", [(None, "hello")], id="no-space"),
    pytest.param(b"data:  two\n\n", [(None, " two")], id="only-one-space-stripped"),
    pytest.param(b"data: a\ndata: b\ndata:\n\n", [(None, "a\nb\n")], id="multi-data"),
    pytest.param(b"data:\n\n", [(None, "")], id="empty-data-dispatches"),
    pytest.param(b"data\n\n", [(None, "")], id="field-without-colon"),
    pytest.param(b": ping\n\ndata: x\n\n", [(None, "x")], id="comment-block-skipped"),
    pytest.param(b"event: ping\n\ndata: x\n\n", [(None, "x")], id="event-without-data-skipped"),
    pytest.param(b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n", [("a", "1"), ("b", "2")], id="named"),
    pytest.param(b"id: 7\nretry: 10\nfoo: bar\ndata: x\n\n", [(None, "x")], id="other-fields"),
    pytest.param(b": c\ndata: x\n: c2\n\n", [(None, "x")], id="comments-inside"),
    pytest.param(b"\xef\xbb\xbfdata: bom\n\n", [(None, "bom")], id="bom"),
    pytest.param(b"data: a\r\n\ndata: b\r\rdata: c\n\r\n", [(None, "a"), (None, "b"), (None, "c")], id="mixed-eol"),
    pytest.param(b"\n\n\ndata: x\n\n\n\n", [(None, "x")], id="extra-blank-lines"),
    pytest.param("data: héllo ✓\n\n".encode(), [(None, "héllo ✓")], id="utf8"),
    pytest.param(b"data: bad \xff\n\n", [(None, "bad \ufffd")], id="invalid-utf8"),
    pytest.param(b"event:\ndata: x\n\n", [(None, "x")], id="empty-event-name"),
    pytest.param(b"data: x: y\n\n", [(None, "x: y")], id="colon-in-value"),
    pytest.param(b"data: trailing", [(None, "trailing")], id="flush-unterminated-line"),
    pytest.param(b"data: trailing\n", [(None, "trailing")], id="flush-no-blank-line"),
    pytest.param(b"data: [DONE]\n\n", [(None, "[DONE]")], id="done"),
]


@pytest.mark.parametrize("stream,expected", CASES)
def test_whole(stream: bytes, expected) -> None:
    events, p = parse_all([stream])
    assert pairs(events) == expected
    assert_accounted(events, p, stream)


@pytest.mark.parametrize("stream,expected", CASES)
def test_every_two_and_three_way_split(stream: bytes, expected) -> None:
    n = len(stream)
    for i in range(n + 1):
        for j in range(i, n + 1, 3 if n > 40 else 1):
            chunks = [stream[:i], stream[i:j], stream[j:]]
            events, p = parse_all(chunks)
            assert pairs(events) == expected, (i, j)
            assert_accounted(events, p, stream)


@pytest.mark.parametrize("stream,expected", CASES)
def test_byte_by_byte(stream: bytes, expected) -> None:
    events, p = parse_all([stream[i : i + 1] for i in range(len(stream))])
    assert pairs(events) == expected
    assert_accounted(events, p, stream)


def test_raw_is_exact_and_carries_skipped_blocks() -> None:
    stream = b": ping\n\nevent: a\ndata: 1\n\n: keepalive\n\ndata: 2\r\n\r\n"
    events, p = parse_all([stream])
    assert [e.raw for e in events] == [
        b": ping\n\nevent: a\ndata: 1\n\n",
        b": keepalive\n\ndata: 2\r\n\r\n",
    ]
    assert p.pending == b""


def test_pending_holds_partial_event_until_complete() -> None:
    p = SSEParser()
    assert p.feed(b"data: one\n\ndata: tw") == [SSEEvent(None, "one", b"data: one\n\n")]
    assert p.pending == b"data: tw"
    assert p.feed(b"o\n") == []
    assert p.pending == b"data: two\n"
    (ev,) = p.feed(b"\n")
    assert (ev.data, ev.raw, p.pending) == ("two", b"data: two\n\n", b"")


def test_event_is_returned_as_soon_as_its_blank_line_arrives() -> None:
    # A CR at the end of a chunk is taken as a line end at once (a later LF is its CRLF partner),
    # so a CR-terminated event is not held back waiting for the next chunk.
    p = SSEParser()
    assert pairs(p.feed(b"data: x\r\r")) == [(None, "x")]
    assert p.feed(b"\n") == []  # the LF after a final CR belongs to the CRLF; no spurious event
    assert p.pending == b"\n"
    assert pairs(p.feed(b"data: y\n\n")) == [(None, "y")]


def test_trailing_comment_stays_pending_after_flush() -> None:
    stream = b"data: x\n\n: bye\n"
    events, p = parse_all([stream])
    assert pairs(events) == [(None, "x")]
    assert p.pending == b": bye\n"
    assert_accounted(events, p, stream)


def test_flush_is_idempotent() -> None:
    p = SSEParser()
    p.feed(b"data: x\n\n")
    assert p.flush() == []
    assert p.flush() == []


def test_emit_empty_returns_keepalive_blocks_on_their_own() -> None:
    stream = b": OPENROUTER PROCESSING\n\nevent: ping\n\ndata: x\n\n\n\n: bye\n"
    events, p = parse_all([stream], emit_empty=True)
    assert [(e.event, e.data, e.raw) for e in events] == [
        (None, "", b": OPENROUTER PROCESSING\n\n"),
        ("ping", "", b"event: ping\n\n"),
        (None, "x", b"data: x\n\n"),
        (None, "", b"\n\n: bye\n"),
    ]
    assert_accounted(events, p, stream)


def test_short_bom_prefix_is_not_mistaken_for_data() -> None:
    p = SSEParser()
    assert p.feed(b"\xef") == []
    assert p.feed(b"\xbb") == []
    assert pairs(p.feed(b"\xbfdata: x\n\n")) == [(None, "x")]


def test_bom_only_at_stream_start() -> None:
    events, _ = parse_all([b"data: a\n\n\xef\xbb\xbfdata: b\n\n"])
    # A BOM later in the stream is part of the field name, which is then unknown: ignored.
    assert pairs(events) == [(None, "a")]


def test_large_event_split_in_many_chunks() -> None:
    payload = "x" * 200_000
    stream = f"data: {payload}\n\n".encode()
    events, p = parse_all([stream[i : i + 1000] for i in range(0, len(stream), 1000)])
    assert pairs(events) == [(None, payload)]
    assert_accounted(events, p, stream)


# -- property-based: an independent reference implementation of the spec --------------------------

def reference(stream: bytes) -> list[tuple[str | None, str]]:
    if stream.startswith(b"\xef\xbb\xbf"):
        stream = stream[3:]
    lines = re.split(rb"\r\n|\r|\n", stream)
    out, data, event = [], [], None
    for line in lines + [b""]:
        if line == b"":
            if data:
                out.append((event.decode() if event else None, b"\n".join(data).decode()))
            data, event = [], None
        elif line.startswith(b":"):
            continue
        else:
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value
    return out


_value = st.text(alphabet=st.sampled_from("ab :{}\"é"), max_size=8).map(lambda s: s.encode())
_line = st.one_of(
    _value.map(lambda v: b"data: " + v),
    _value.map(lambda v: b"data:" + v),
    _value.map(lambda v: b"event: " + v.replace(b":", b"")),
    _value.map(lambda v: b": " + v),
    st.sampled_from([b"data", b"id: 1", b"retry: 5", b""]),
)
_eol = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_streams(draw) -> tuple[bytes, list[bytes]]:
    parts = []
    for line in draw(st.lists(_line, max_size=14)):
        parts.append(line + draw(_eol))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    return stream, chunks


@settings(max_examples=400, deadline=None)
@given(sse_streams())
def test_matches_reference_under_random_splits(sc) -> None:
    stream, chunks = sc
    events, p = parse_all(chunks)
    assert pairs(events) == reference(stream)
    assert_accounted(events, p, stream)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_arbitrary_bytes_never_raise_and_stay_accounted(stream: bytes, cuts: list[int]) -> None:
    cuts = sorted(min(c, len(stream)) for c in cuts)
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    for emit_empty in (False, True):
        events, p = parse_all(chunks, emit_empty=emit_empty)
        assert_accounted(events, p, stream)


def test_speed_many_small_events() -> None:
    one = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk",'
           b'"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
    stream = one * 20_000
    chunks = [stream[i : i + 1400] for i in range(0, len(stream), 1400)]  # TLS-record-ish chunks
    t = time.perf_counter()
    events, _ = parse_all(chunks)
    elapsed = time.perf_counter() - t
    assert len(events) == 20_000
    assert elapsed < 1.0, f"{elapsed:.3f}s for 20k events"
