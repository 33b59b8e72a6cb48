"""Virtual keys: what apps hold instead of the real provider key.

A virtual key is ``tg-`` plus 43 characters of URL-safe randomness (256 bits). Only its SHA-256 hex digest is
stored, in the ledger file's ``keys`` table, so a copy of the database gives nobody a usable key. Each key also
gets a short public ``key_id`` (``vk_`` + 10 hex) that lists, logs and the ledger show instead of the key.

The functions here take an open DuckDB connection whose default catalog holds the ``keys`` table (the table
itself is created by :func:`tollgate.ledger.ensure_schema`, which owns the schema and its version). They never
open files themselves: the CLI opens with lock retries, the gateway's ledger thread opens briefly and closes.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

PREFIX = "tg-"
KEY_ID_PREFIX = "vk_"
_KEY_RANDOM_BYTES = 32  # token_urlsafe(32) -> 43 characters
_KEY_ID_HEX_BYTES = 5  # -> 10 hex characters; collisions are retried at insert

# The columns as load_keys selects them; KeyRecord's field order.
_SELECT = "SELECT key_id, key_hash, user_id, created_at, expires_at, revoked_at, metadata, tier FROM keys"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One virtual key as stored (never the key itself)."""

    key_id: str
    key_hash: str
    user_id: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    metadata: dict[str, str] = field(default_factory=dict)
    tier: str | None = None  # nullable: the tier normally comes from the policy's budgeting.tiers.shared_users

    def active(self, now: datetime) -> bool:
        """True while the key is neither revoked nor expired at `now` (an aware datetime)."""
        # A revocation counts at once, even if its timestamp is a little ahead of this host's clock.
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at

    def status(self, now: datetime) -> str:
        """'active', 'revoked' or 'expired', for listings."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


def new_key() -> str:
    """A fresh virtual key (plaintext; shown once, never stored)."""
    return PREFIX + secrets.token_urlsafe(_KEY_RANDOM_BYTES)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored and looked up."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_virtual(value: str) -> bool:
    """Whether a presented credential is meant to be one of our keys (cheap prefix check, no lookup)."""
    return value.startswith(PREFIX)


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(_KEY_ID_HEX_BYTES)


def _utc(value: datetime | None) -> datetime | None:
    """DuckDB hands TIMESTAMPTZ back in the session's time zone; normalize to UTC for comparisons and display."""
    if value is None:
        return None
    if value.tzinfo is None:  # a TIMESTAMP written by hand through SQL: the ledger's convention is UTC
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _record(row: tuple) -> KeyRecord:
    key_id, key_hash, user_id, created_at, expires_at, revoked_at, metadata, tier = row
    return KeyRecord(
        key_id=key_id,
        key_hash=key_hash,
        user_id=user_id,
        created_at=_utc(created_at),  # type: ignore[arg-type]  # NOT NULL column
        expires_at=_utc(expires_at),
        revoked_at=_utc(revoked_at),
        metadata=_metadata(metadata),
        tier=tier,
    )


def create_key(
    con,
    user_id: str,
    expires_days: int | None,
    metadata: dict[str, str],
    *,
    tier: str | None = None,
    now: datetime | None = None,
) -> tuple[str, KeyRecord]:
    """Create and store a key for `user_id`; return (plaintext key, record). The plaintext exists only here.

    `expires_days` None (or 0) means the key never expires.
    """
    if not user_id or not user_id.strip():
        raise ValueError("user id must not be empty")
    if expires_days is not None and expires_days < 0:
        raise ValueError("expires_days must be >= 0 (0 or None: never expires)")
    created = (now or datetime.now(UTC)).astimezone(UTC)
    expires = created + timedelta(days=expires_days) if expires_days else None
    meta = {str(k): str(v) for k, v in metadata.items()}
    key = new_key()
    key_hash = hash_key(key)
    for _attempt in range(5):  # 40-bit ids: a collision is rare but the primary key would refuse it
        key_id = new_key_id()
        if con.execute("SELECT 1 FROM keys WHERE key_id = ?", [key_id]).fetchone() is None:
            break
    else:  # pragma: no cover - five 40-bit collisions in a row
        raise RuntimeError("could not find a free key id")
    con.execute(
        "INSERT INTO keys (key_id, key_hash, user_id, created_at, expires_at, revoked_at, metadata, tier)"
        " VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
        [key_id, key_hash, user_id, created, expires, json.dumps(meta, sort_keys=True), tier],
    )
    return key, KeyRecord(key_id, key_hash, user_id, created, expires, None, meta, tier)


def list_keys(con) -> list[KeyRecord]:
    """All keys, oldest first (revoked and expired ones included: they explain old ledger rows)."""
    return [_record(r) for r in con.execute(_SELECT + " ORDER BY created_at, key_id").fetchall()]


def revoke_key(con, key_id: str, *, now: datetime | None = None) -> bool:
    """Revoke `key_id`. True if the key exists (revoking twice keeps the first revocation time), else False."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    con.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", [when, key_id])
    return con.execute("SELECT 1 FROM keys WHERE key_id = ?", [key_id]).fetchone() is not None


def load_keys(con) -> dict[str, KeyRecord]:
    """Every key by its hash, for the gateway's O(1) lookup: ``keys.get(hash_key(presented))``.

    Revoked and expired keys are included so a refusal can still name the key and user in the ledger;
    callers check :meth:`KeyRecord.active`.
    """
    return {rec.key_hash: rec for rec in map(_record, con.execute(_SELECT).fetchall())}


def keys_signature(con) -> tuple[int, int]:
    """A cheap fingerprint of the keys table's content: (row count, xor of row hashes).

    The ledger thread compares it on every open so it rebuilds the KeyRecord dict (and wakes the gateway)
    only when a key was actually created, revoked or edited, not 4 times a second.
    """
    row = con.execute(
        "SELECT count(*), coalesce(bit_xor(hash(key_id, key_hash, user_id, created_at, expires_at,"
        " revoked_at, metadata, tier)), 0) FROM keys"
    ).fetchone()
    return int(row[0]), int(row[1])
