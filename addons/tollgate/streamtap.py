"""A tap on a streamed answer: bytes go to the app as they arrive, usage is read on the side.

mitmproxy calls the tap (installed as `flow.response.stream`) with each chunk as it comes off the
upstream socket and sends back whatever the tap returns, so the app sees every event when the provider
sends it — mitmproxy's default (no stream) would buffer the whole answer first.

Two cases rewrite bytes, both with the event as the smallest unit so the app never sees half an edit:
- the answer was content-encoded: it is decoded on the fly and forwarded decoded (the addon drops the
  Content-Encoding header), because an SSE client needs each event now, not at the end of a gzip member;
- the gateway asked an OpenAI stream for usage the app did not ask for: the extra usage-only chunk and
  the `"usage": null` fields it adds to every chunk are taken out again — blanked, not cut: the field
  becomes JSON whitespace and the chunk an SSE comment of the same length (both ignored by every
  client), so the body keeps its length and its framing. An upstream that sent a Content-Length keeps
  it, and the app's connection stays reusable without re-framing the answer as chunked.
"""
from __future__ import annotations

import re
import zlib
from typing import Callable

from .providers import StreamUsage
from .sse import SSEParser

try:  # Python 3.14 has zstd in the stdlib; mitmproxy depends on the backport before that.
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd as _zstd  # type: ignore[no-redef]

import brotli

_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')
_COMPACT_NULL = b',"usage":null'  # OpenAI's compact JSON
_COMPACT_BLANK = b" " * len(_COMPACT_NULL)


def _blank(m: re.Match[bytes]) -> bytes:
    return b" " * len(m.group())


def blank_event(raw: bytes) -> bytes:
    """An SSE comment block as long as the event `raw` (same line ends), which clients skip."""
    for eol in (b"\r\n", b"\n", b"\r"):
        if raw.endswith(eol + eol):
            pad = len(raw) - 1 - 2 * len(eol)
            if pad >= 0:
                return b":" + b" " * pad + eol + eol
    return b":" + b" " * (len(raw) - 1) if raw else raw  # the stream's last, unterminated block


RAW_CAP = 8 * 1024 * 1024  # non-SSE streams (Gemini's JSON array) are kept up to this for the final parse


def decoder_for(encoding: str) -> Callable[[bytes], bytes] | None:
    """An incremental decoder for a Content-Encoding, or None when there is nothing to decode."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if enc == "deflate":
        return zlib.decompressobj().decompress
    if enc == "br":
        return brotli.Decompressor().process
    if enc == "zstd":
        return _zstd.ZstdDecompressor().decompress
    raise ValueError(f"unsupported content-encoding {encoding!r}")


class StreamTap:
    def __init__(self, usage: StreamUsage, *, sse: bool, strip_usage: bool = False,
                 decode: Callable[[bytes], bytes] | None = None):
        self.usage = usage
        self.strip_usage = strip_usage and sse
        # When rewriting, keep-alive comments must still go out at once, not wait for the next event.
        self.sse = SSEParser(emit_empty=self.strip_usage) if sse else None
        self.decode = decode
        self.raw = bytearray()  # non-SSE streams only
        self.bytes_out = 0
        self.error: str | None = None
        self._closed = False

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        try:
            out = self._tap(chunk)
        except Exception as e:  # a tap that raises would kill the app's stream: log-worthy, never fatal
            self.error = f"{type(e).__name__}: {e}"
            out = chunk
        # Nothing to send yet (half an event held back, a gzip block not decoded yet) must be an empty
        # list: mitmproxy writes an empty bytes chunk as a chunked-encoding terminator ("0\r\n\r\n"),
        # which would end the app's response early and corrupt the next one on a kept-alive connection.
        return out if out else []

    def close(self) -> None:
        """The body really ended (the addon's response/error hook): read a last event that lacks its blank line.

        Not done on mitmproxy's b"" alone: it also passes an empty HTTP/2 DATA frame (without END_STREAM) as
        b"" in the middle of a stream, and flushing the parser there would cut the event it falls in.
        """
        if self.sse is not None and not self.strip_usage and not self._closed:
            self._closed = True
            try:
                for ev in self.sse.flush():
                    self.usage.feed(ev)
            except Exception as e:  # as in __call__: never fatal
                self.error = self.error or f"{type(e).__name__}: {e}"

    def _tap(self, chunk: bytes) -> bytes:
        end = not chunk
        if self.decode is not None and chunk:
            chunk = self.decode(chunk)
        if self.sse is None:
            if len(self.raw) < RAW_CAP:
                self.raw += chunk
            self.bytes_out += len(chunk)
            return chunk
        events = self.sse.feed(chunk) if chunk else []
        if end and self.strip_usage:  # held-back bytes must go out before the body ends (see close())
            events += self.sse.flush()
        feed = self.usage.feed
        if not self.strip_usage:
            for ev in events:
                feed(ev)
            self.bytes_out += len(chunk)
            return chunk
        for ev in events:
            feed(ev)
        # Whole events only, so a field cannot straddle two of them: blank OpenAI's compact
        # ',"usage":null' in one pass over the lot, and look at single events only if "usage" remains.
        data = b"".join([ev.raw for ev in events]).replace(_COMPACT_NULL, _COMPACT_BLANK)
        hit = data.find(b'"usage"')
        if hit != -1:  # the usage-only chunk, or other spacing: fix the events that hold what remains
            buf = bytearray(data)
            off = 0
            for ev in events:
                end = off + len(ev.raw)  # (blanking keeps lengths, so event offsets hold in data)
                if off <= hit < end:
                    seg = data[off:end]
                    buf[off:end] = blank_event(seg) if self.usage.usage_only(ev) else _USAGE_NULL.sub(_blank, seg)
                    hit = data.find(b'"usage"', end)
                    if hit == -1:
                        break
                off = end
            data = bytes(buf)
        self.bytes_out += len(data)
        return data
