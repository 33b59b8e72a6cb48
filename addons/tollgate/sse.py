"""An incremental Server-Sent Events parser that never loses a byte.

The gateway taps provider streams on the side (to read usage) and sometimes rewrites them (to drop the
usage-only chunk it asked for on the app's behalf). Both need events parsed across arbitrary chunk
boundaries, and the rewrite additionally needs to hand the client *exactly* the bytes the provider sent
for every event it keeps. So each event carries its raw bytes, and the invariant

    b"".join(ev.raw for every event returned by feed()/flush()) + parser.pending == all bytes fed

always holds. Blocks that the SSE spec does not dispatch (comments such as ": ping", a bare "event:"
or "id:" block) are, by default, not returned: their bytes are carried in the ``raw`` of the next
returned event. A rewriter that wants such keep-alive blocks forwarded at once can construct the parser
with ``emit_empty=True``; they are then returned as events with ``data == ""`` of their own.

Parsing follows the WHATWG EventSource rules: lines end in CRLF, LF or CR; a line starting with ":" is a
comment; "field: value" loses one leading space; a field without a colon has an empty value; ``data``
lines are joined with "\\n"; a blank line dispatches the event if any data line was seen; a leading
UTF-8 BOM is ignored. Work is done per line with ``bytes.find``, never per byte in Python.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser"]

_BOM = b"\xef\xbb\xbf"
_LF = 10


@dataclass(slots=True)
class SSEEvent:
    event: str | None  # the `event:` field, None if absent
    data: str  # data lines joined with "\n" (per the SSE spec)
    raw: bytes  # exact bytes of this event, including skipped blocks before it and its blank line


class SSEParser:
    """Feed it byte chunks as they arrive; it returns complete events and keeps the rest.

    Work stays linear in the bytes fed, however they are chunked: lines already parsed are moved out of
    the scan buffer (kept only for ``raw``), and chunks without any line terminator are queued, not
    concatenated, until a terminator arrives (a large event in small chunks would otherwise be
    quadratic).
    """

    __slots__ = (
        "_buf",
        "_head",
        "_tail",
        "_data",
        "_event",
        "_skip_lf",
        "_bom_done",
        "_emit_empty",
        "_has_fields",
    )

    def __init__(self, *, emit_empty: bool = False) -> None:
        self._head: list[bytes] = []  # parsed lines of the unfinished block (and skipped blocks before it)
        self._buf = b""  # unparsed bytes: the start of a line not yet terminated
        self._tail: list[bytes] = []  # later chunks that hold no line terminator
        self._data: list[bytes] = []  # data lines of the block being read
        self._event: bytes | None = None  # event field of the block being read
        self._has_fields = False  # block holds a comment/field line (matters only for emit_empty)
        self._skip_lf = False  # the last line ended in a CR at the buffer end: a following LF is its pair
        self._bom_done = False
        self._emit_empty = emit_empty

    @property
    def pending(self) -> bytes:
        """Bytes received but not (yet) part of a returned event."""
        return b"".join((*self._head, self._buf, *self._tail))

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events completed by them (possibly none)."""
        if not chunk:
            return []
        if not self._bom_done and not self._buf and not self._tail and chunk[:1] != _BOM[:1]:
            self._bom_done = True  # the stream's first byte is not a BOM's
        if self._bom_done and not (self._buf or self._head or self._tail or self._data or self._has_fields
                                   or self._skip_lf or self._event is not None) and chunk.find(b"\r") == -1:
            out, pos = _simple_blocks(chunk)
            if pos == len(chunk):
                return out
            if pos:
                return out + self.feed(chunk[pos:])
        if self._bom_done and chunk.find(b"\n") == -1 and chunk.find(b"\r") == -1:
            self._tail.append(bytes(chunk))  # cannot complete a line: parse when one can
            return []
        if self._tail:
            self._buf = b"".join((self._buf, *self._tail, chunk))
            self._tail = []
        else:
            self._buf = self._buf + chunk if self._buf else bytes(chunk)
        return self._parse(final=False)

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch a trailing event that lacks its blank line.

        Bytes that form no event (a trailing comment, a block without data) stay in ``pending``.
        """
        if self._tail:
            self._buf = b"".join((self._buf, *self._tail))
            self._tail = []
        return self._parse(final=True)

    # -- internals -------------------------------------------------------------------------------

    def _parse(self, final: bool) -> list[SSEEvent]:
        buf = self._buf
        n = len(buf)
        pos = 0
        out: list[SSEEvent] = []
        if not self._bom_done:
            if n < 3 and _BOM.startswith(buf) and not final:
                return out  # could still become a BOM
            self._bom_done = True
            if buf.startswith(_BOM) and not self._head:
                pos = 3
        if self._skip_lf and pos < n:
            if buf[pos] == _LF:
                pos += 1  # second half of a CRLF split across chunks
            self._skip_lf = False

        start = 0  # offset in buf where the raw of the next returned event begins (after _head)
        # Cached positions of the next LF / CR at or after pos; -1 means none before n. Each is
        # recomputed only once pos has moved past it, so the buffer is scanned O(n) in total.
        next_lf = buf.find(b"\n", pos)
        next_cr = buf.find(b"\r", pos)
        while pos < n:
            if next_lf != -1 and next_lf < pos:
                next_lf = buf.find(b"\n", pos)
            if next_cr != -1 and next_cr < pos:
                next_cr = buf.find(b"\r", pos)
            if next_lf == -1 and next_cr == -1:
                if not final:
                    break
                eol, after = n, n  # the unterminated last line of the stream
            elif next_cr == -1 or (next_lf != -1 and next_lf < next_cr):
                eol, after = next_lf, next_lf + 1
            else:
                eol = next_cr
                if eol + 1 < n:
                    after = eol + 2 if buf[eol + 1] == _LF else eol + 1
                else:
                    after = n  # CR at the buffer end: take it as the line end, swallow a later LF
                    self._skip_lf = not final
            if eol == pos:
                # Blank line: the block ends here.
                if self._data or (self._emit_empty and self._has_fields):
                    out.append(self._dispatch(buf[start:after]))
                    start = after
                else:
                    self._event = None
                    self._has_fields = False
            elif buf.startswith(b"data: ", pos, eol):  # the common line, without the general parse
                self._data.append(buf[pos + 6 : eol])
                self._has_fields = True
            else:
                self._field(buf, pos, eol)
            pos = after

        if final and (self._data or (self._emit_empty and self._has_fields)):
            out.append(self._dispatch(buf[start:n]))
            start = pos = n
        if start < pos:
            self._head.append(buf[start:pos])
        self._buf = buf[pos:] if pos else buf
        return out

    def _field(self, buf: bytes, pos: int, eol: int) -> None:
        self._has_fields = True
        if buf[pos] == 0x3A:  # ":" comment
            return
        colon = buf.find(b":", pos, eol)
        if colon == -1:
            name, value = buf[pos:eol], b""
        else:
            name = buf[pos:colon]
            vstart = colon + 1
            if vstart < eol and buf[vstart] == 0x20:
                vstart += 1
            value = buf[vstart:eol]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        # "id", "retry" and unknown fields carry nothing the gateway needs; their bytes stay in raw.

    def _dispatch(self, raw: bytes) -> SSEEvent:
        if self._head:
            raw = b"".join((*self._head, raw))
            self._head = []
        data = self._data
        text = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
        event = self._event.decode("utf-8", "replace") if self._event else None
        self._data = []
        self._event = None
        self._has_fields = False
        return SSEEvent(event=event, data=text, raw=raw)


def _simple_blocks(chunk: bytes) -> tuple[list[SSEEvent], int]:
    """The leading blocks of `chunk` that are one ``data: `` line each, LF-terminated (nearly every event
    a provider sends), as events; and where the rest starts. For these the general line-by-line parse
    gives exactly the same events; the parser takes over at the first block that is anything else.
    Only called between blocks (no partial state) on chunks without CR."""
    out: list[SSEEvent] = []
    pos = 0
    blocks = chunk.split(b"\n\n")
    blocks.pop()  # what follows the last blank line: not a complete block
    for block in blocks:
        if block[:6] != b"data: " or b"\n" in block:
            break
        out.append(SSEEvent(None, block[6:].decode("utf-8", "replace"), block + b"\n\n"))
        pos += len(block) + 2
    return out, pos
