"""Who is calling: a presented credential -> an Identity, by one hash lookup.

The key table is a dict from SHA-256 hex to KeyRecord, replaced whole (an atomic reference swap) by the
ledger thread whenever the keys table changes, so the event loop never locks or touches DuckDB.
"""
from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .keys import KeyRecord, hash_key


@dataclass(frozen=True, slots=True)
class Identity:
    key_id: str
    user_id: str
    tier: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


MASTER = Identity(key_id="master", user_id="master")


class Authenticator:
    def __init__(self, master_key: str | None = None, virtual_keys_enabled: bool = True):
        self.master_key = master_key
        self.virtual_keys_enabled = virtual_keys_enabled
        # (keys by hash, cache) swapped whole by the ledger thread: the loop sees the old or the new pair,
        # never half. The cache maps a hash to (Identity, expiry as epoch seconds) of an active key, filled on
        # first use: one dict lookup per request instead of building an Identity and a datetime each time.
        self._table: tuple[dict[str, KeyRecord], dict[str, tuple[Identity, float]]] = ({}, {})

    def set_keys(self, keys: dict[str, KeyRecord]) -> None:
        self._table = (keys, {})

    @property
    def _keys(self) -> dict[str, KeyRecord]:
        return self._table[0]

    def configure(self, master_key: str | None, virtual_keys_enabled: bool) -> None:
        self.master_key = master_key
        self.virtual_keys_enabled = virtual_keys_enabled

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def identify(self, presented: str, now: datetime | None = None) -> tuple[Identity | None, str]:
        """(identity, "") or (None, why) — `why` is safe to show: it never echoes the credential."""
        if not presented:
            return None, "no API key was presented"
        if self.master_key and hmac.compare_digest(presented.encode(), self.master_key.encode()):
            return MASTER, ""
        if not self.virtual_keys_enabled:
            return None, "virtual keys are disabled on this gateway"
        return self.identify_hash(hash_key(presented), now, master_checked=True)

    def identify_hash(self, h: str, now: datetime | None = None,
                      master_checked: bool = False) -> tuple[Identity | None, str]:
        """identify() for a credential already hashed: a WebSocket's later turns check its key again this way,
        so the key itself is not kept for the life of the socket."""
        if not master_checked:
            if self.master_key and hmac.compare_digest(h, hash_key(self.master_key)):
                return MASTER, ""
            if not self.virtual_keys_enabled:
                return None, "virtual keys are disabled on this gateway"
        keys, active = self._table
        if now is None:
            hit = active.get(h)
            if hit is not None and time.time() < hit[1]:
                return hit[0], ""
        rec = keys.get(h)
        if rec is None:
            return None, "unknown API key: present a tollgate virtual key (tollgate keys create)"
        now = now or datetime.now(timezone.utc)
        if rec.revoked_at is not None:
            return None, f"virtual key {rec.key_id} has been revoked"
        if rec.expires_at is not None and rec.expires_at <= now:
            return None, f"virtual key {rec.key_id} expired at {rec.expires_at:%Y-%m-%d %H:%M} UTC"
        ident = Identity(rec.key_id, rec.user_id, rec.tier, rec.metadata)
        active[h] = (ident, rec.expires_at.timestamp() if rec.expires_at is not None else math.inf)
        return ident, ""
