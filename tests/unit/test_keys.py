"""Virtual keys: format, hashing, and create/list/revoke/load against a real DuckDB file."""
from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import pytest

from tollgate import keys
from tollgate.keys import KeyRecord
from tollgate.ledger import connect

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def con(tmp_path):
    c = connect(str(tmp_path / "usage.duckdb"))
    yield c
    c.close()


def test_new_key_shape_and_uniqueness():
    made = {keys.new_key() for _ in range(200)}
    assert len(made) == 200
    for k in made:
        assert k.startswith("tg-")
        assert len(k) >= 3 + 32
        assert re.fullmatch(r"tg-[A-Za-z0-9_-]+", k)
        assert keys.looks_virtual(k)


def test_hash_key_is_sha256_hex():
    assert keys.hash_key("tg-abc") == hashlib.sha256(b"tg-abc").hexdigest()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tg-abc", True),
        ("tg-", True),
        ("sk-proj-abc", False),
        ("sk-ant-api03-x", False),
        ("AIzaSy", False),
        ("", False),
        ("TG-abc", False),
        ("Bearer tg-abc", False),  # callers strip the scheme first
    ],
)
def test_looks_virtual(value, expected):
    assert keys.looks_virtual(value) is expected


@pytest.mark.parametrize(
    ("expires", "revoked", "now", "active", "status"),
    [
        (None, None, NOW, True, "active"),
        (NOW + timedelta(seconds=1), None, NOW, True, "active"),
        (NOW, None, NOW, False, "expired"),
        (NOW - timedelta(days=1), None, NOW, False, "expired"),
        (None, NOW - timedelta(seconds=1), NOW, False, "revoked"),
        # a revocation stamped slightly ahead of this host's clock still counts at once
        (None, NOW + timedelta(seconds=5), NOW, False, "revoked"),
        (NOW - timedelta(days=1), NOW - timedelta(days=2), NOW, False, "revoked"),
    ],
)
def test_active_and_status(expires, revoked, now, active, status):
    rec = KeyRecord("vk_x", "h", "u", NOW - timedelta(days=10), expires, revoked, {})
    assert rec.active(now) is active
    assert rec.status(now) == status


def test_create_returns_plaintext_once_and_stores_only_the_hash(con, tmp_path):
    key, rec = keys.create_key(con, "alice", 30, {"project": "apollo"}, now=NOW)
    assert keys.looks_virtual(key)
    assert rec.key_hash == keys.hash_key(key)
    assert re.fullmatch(r"vk_[0-9a-f]{10}", rec.key_id)
    assert rec.user_id == "alice"
    assert rec.created_at == NOW
    assert rec.expires_at == NOW + timedelta(days=30)
    assert rec.revoked_at is None
    assert rec.metadata == {"project": "apollo"}
    assert rec.tier is None
    # Nothing in the table holds the key itself.
    rows = con.execute("SELECT * FROM keys").fetchall()
    assert all(key not in str(v) for row in rows for v in row)
    con.execute("CHECKPOINT")
    assert key.encode() not in (tmp_path / "usage.duckdb").read_bytes()


@pytest.mark.parametrize("days", [None, 0])
def test_no_expiry(con, days):
    _, rec = keys.create_key(con, "bob", days, {})
    assert rec.expires_at is None
    assert keys.list_keys(con)[0].expires_at is None


@pytest.mark.parametrize(("user", "days"), [("", None), ("   ", None), ("alice", -1)])
def test_create_rejects_bad_input(con, user, days):
    with pytest.raises(ValueError):
        keys.create_key(con, user, days, {})


def test_list_round_trips_records(con):
    made = [keys.create_key(con, f"user{i}", i or None, {"i": str(i)}, now=NOW + timedelta(minutes=i))[1]
            for i in range(3)]
    listed = keys.list_keys(con)
    assert listed == made  # same values, UTC datetimes, oldest first
    assert all(r.created_at.tzinfo is UTC for r in listed)


def test_revoke(con):
    _, rec = keys.create_key(con, "alice", None, {})
    assert keys.revoke_key(con, rec.key_id, now=NOW) is True
    (got,) = keys.list_keys(con)
    assert got.revoked_at == NOW
    assert not got.active(NOW + timedelta(seconds=1))
    # revoking again keeps the first time; an unknown id is reported
    assert keys.revoke_key(con, rec.key_id, now=NOW + timedelta(days=1)) is True
    assert keys.list_keys(con)[0].revoked_at == NOW
    assert keys.revoke_key(con, "vk_doesnotexist") is False


def test_load_keys_by_hash_includes_revoked(con):
    k1, r1 = keys.create_key(con, "alice", None, {"a": "1"})
    k2, r2 = keys.create_key(con, "bob", None, {})
    keys.revoke_key(con, r2.key_id)
    loaded = keys.load_keys(con)
    assert set(loaded) == {keys.hash_key(k1), keys.hash_key(k2)}
    assert loaded[keys.hash_key(k1)] == r1
    assert loaded[keys.hash_key(k2)].revoked_at is not None
    assert keys.hash_key("tg-unknown") not in loaded


def test_signature_changes_only_with_content(con):
    empty = keys.keys_signature(con)
    assert empty == (0, 0)
    _, rec = keys.create_key(con, "alice", None, {})
    one = keys.keys_signature(con)
    assert one != empty
    assert keys.keys_signature(con) == one
    keys.revoke_key(con, rec.key_id)
    assert keys.keys_signature(con) not in (one, empty)
    before = keys.keys_signature(con)
    con.execute("UPDATE keys SET metadata = '{\"x\":\"y\"}'")  # a hand edit through SQL
    assert keys.keys_signature(con) != before


def test_metadata_values_are_strings(con):
    _, rec = keys.create_key(con, "alice", None, {"n": 5, "flag": True})  # type: ignore[dict-item]
    assert rec.metadata == {"n": "5", "flag": "True"}
    assert keys.list_keys(con)[0].metadata == {"n": "5", "flag": "True"}


def test_tier_column_is_nullable_and_kept(con):
    _, rec = keys.create_key(con, "alice", None, {}, tier="team-basic")
    assert keys.list_keys(con)[0].tier == "team-basic"
