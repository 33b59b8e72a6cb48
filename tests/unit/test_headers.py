"""headers: raw-field reads and writes behave like mitmproxy's Headers, case-insensitively."""
from __future__ import annotations

import pytest
from mitmproxy.http import Headers

from tollgate import headers as hdrs


def H(*pairs: tuple[str, str]) -> Headers:
    return Headers([(k.encode(), v.encode()) for k, v in pairs])


@pytest.mark.parametrize("fields, name, want", [
    ((("Content-Type", "application/json"),), b"content-type", b"application/json"),
    ((("content-type", "a"), ("Content-Type", "b")), b"content-type", b"a, b"),  # joined, as mitmproxy
    ((("X-Api-Key", "k"),), b"authorization", None),
    ((), b"host", None),
])
def test_get_matches_mitmproxy(fields, name, want):
    h = H(*fields)
    assert hdrs.get(h, name) == want
    assert (h.get(name.decode()) or "").encode() == (want or b"")


@pytest.mark.parametrize("mapping, want", [
    ({"Authorization": "Bearer x"}, b"Bearer x"),
    ({"authorization": b"Bearer y"}, b"Bearer y"),
    ({"other": "z"}, None),
])
def test_get_on_plain_mappings(mapping, want):
    assert hdrs.get(mapping, b"authorization") == want


def test_get_str_decodes_latin1_and_defaults():
    assert hdrs.get_str(H(("X", "caf\u00e9")), b"x") == "caf\u00e9"
    assert hdrs.get_str(H(), b"x") == ""
    assert hdrs.get_str(H(), b"x", "d") == "d"


@pytest.mark.parametrize("fields, values, want", [
    # replaced in place, the existing name's spelling kept
    ([("Host", "a"), ("Authorization", "old"), ("Accept", "*/*")], {"authorization": "new"},
     [("Host", "a"), ("Authorization", "new"), ("Accept", "*/*")]),
    # duplicates collapse into the first position
    ([("X-A", "1"), ("Y", "y"), ("x-a", "2")], {"x-a": "3"}, [("X-A", "3"), ("Y", "y")]),
    # new names are appended in the order given
    ([("Host", "a")], {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9"},
     [("Host", "a"), ("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "9")]),
    ([("Host", "a")], {}, [("Host", "a")]),
])
def test_set_many_is_setitem_in_one_pass(fields, values, want):
    h = H(*fields)
    hdrs.set_many(h, values)
    assert [(k.decode(), v.decode()) for k, v in h.fields] == want
    ref = H(*fields)
    for k, v in values.items():
        ref[k] = v
    assert {k.lower(): v for k, v in ref.items(multi=True)} == {k.lower(): v for k, v in h.items(multi=True)}


@pytest.mark.parametrize("fields, names, want", [
    ([("Content-Length", "5"), ("Content-Encoding", "gzip"), ("X", "1")], (b"content-encoding", b"content-length"),
     [("X", "1")]),
    ([("X", "1"), ("content-length", "5"), ("Content-Length", "6")], (b"content-length",), [("X", "1")]),
    ([("X", "1")], (b"content-length",), [("X", "1")]),
])
def test_remove_is_pop_for_each(fields, names, want):
    h = H(*fields)
    hdrs.remove(h, *names)
    assert [(k.decode(), v.decode()) for k, v in h.fields] == want
