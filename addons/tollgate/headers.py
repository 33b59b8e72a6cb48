"""Header reads and writes on mitmproxy's raw header fields, for the per-request hot path.

mitmproxy's `Headers` is a case-insensitive multidict: one `headers.get(name)` walks four Python layers
(Mapping.get → __getitem__ → get_all → key conversion) and costs ~3 µs; `headers[name] = v` ~15 µs. The
gateway reads about eight and writes about ten headers per request, which profiled at a fifth of its hook
time. Both helpers work on `headers.fields` (a tuple of (name, value) byte pairs) directly, with the same
semantics as mitmproxy's: names compare case-insensitively, repeated fields read as one value joined by
", ", values are UTF-8 with surrogate escapes.
"""
from __future__ import annotations

from typing import Any

_ENC, _ERR = "utf-8", "surrogateescape"  # mitmproxy's own conversion between header bytes and str


def get(headers: Any, name: bytes) -> bytes | None:
    """A header's value (`name` in lower case) as raw bytes, repeated fields joined by ", "; None when absent.

    `headers` is a mitmproxy Headers (read through its fields) or any mapping (tests, plain dicts)."""
    fields = getattr(headers, "fields", None)
    if fields is None:
        fields = [(k if isinstance(k, bytes) else str(k).encode(_ENC, _ERR),
                   v if isinstance(v, bytes) else str(v).encode(_ENC, _ERR)) for k, v in headers.items()]
    found = None
    for k, v in fields:
        if k.lower() == name:
            found = v if found is None else found + b", " + v
    return found


def get_str(headers: Any, name: bytes, default: str = "") -> str:
    """`get` decoded as mitmproxy decodes header values."""
    v = get(headers, name)
    return default if v is None else v.decode(_ENC, _ERR)


def set_many(headers: Any, values: dict[str, str]) -> None:
    """Set a few headers in one pass over the fields: `headers[k] = v` for each, ~5x cheaper.

    A header already present keeps its position (its first field takes the value, later duplicates go);
    a new one is appended.
    """
    if not values:
        return
    new = {k.lower().encode(_ENC, _ERR): v.encode(_ENC, _ERR) for k, v in values.items()}
    out = []
    for k, v in headers.fields:
        low = k.lower()
        if low in new:
            val = new[low]
            if val is None:  # a duplicate of a header already written
                continue
            out.append((k, val))
            new[low] = None
        else:
            out.append((k, v))
    for k, v in new.items():
        if v is not None:
            out.append((k, v))
    headers.fields = tuple(out)


def remove(headers: Any, *names: bytes) -> None:
    """Drop every field of these headers (`names` in lower case), like `headers.pop(name, None)` for each."""
    fields = headers.fields
    kept = tuple(f for f in fields if f[0].lower() not in names)
    if len(kept) != len(fields):
        headers.fields = kept
