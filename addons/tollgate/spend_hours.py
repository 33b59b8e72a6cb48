"""Hourly spend totals kept in the ledger, so that budgets recount their period at start in milliseconds.

A month at 100 requests/s is 260M rows; summing their cost at ~31 ns a row took ~8 s, and the gateway waited
for it. Instead the ledger keeps ``spend_hours``: per UTC hour, tier and user, the number of rows and their
summed cost. Its rows are partial sums (a key may appear several times; readers add them up), so keeping it
never needs an index or an update, only appends.

The invariant: every ``requests`` row with ``ts < until`` is counted in ``spend_hours`` exactly once, where
``until`` (a whole UTC hour, kept in ``tollgate_meta``) is the watermark. It holds because

* the writer moves the watermark forward itself (:func:`advance_sql`), summing the hours it passes from
  ``requests``; it stays ``LAG`` behind the clock, so a row normally lands long before its hour is summed;
* a row that lands below the watermark anyway (a replayed spool, a request that ran for hours) is added by
  the landing itself, in the same transaction as its insert (:func:`late_sql`).

A recount (:func:`source`) then reads the whole hours of its window from ``spend_hours`` and only the ragged
edges from ``requests`` (the part of the first hour before a period start that is not on the hour, and the
rows since the watermark: at most ``LAG`` plus an hour), which zone maps on ``ts`` find without a scan.

Rows inserted into ``requests`` by hand below the watermark are not in the totals (only the gateway writes
the ledger); ``DELETE FROM spend_hours; DELETE FROM tollgate_meta WHERE key = 'spend_hours_until'`` makes the
writer rebuild them.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

HOUR = 3600
LAG = 2 * HOUR  # the watermark trails the clock by this much (and by the hour in progress)
STEP = 6 * HOUR  # at most this much of the ledger is summed per advance (a catch-up goes in steps)
META_KEY = "spend_hours_until"

DDL = ("CREATE TABLE IF NOT EXISTS spend_hours (hour TIMESTAMPTZ NOT NULL, tier VARCHAR, user_id VARCHAR,"
       " requests BIGINT NOT NULL, cost_usd DECIMAL(38,9))")

# The UTC hour of ts by integer arithmetic: independent of the session's TimeZone, and ~10x cheaper than
# date_trunc on TIMESTAMPTZ (which goes through ICU for every row).
_HOUR_OF = "to_timestamp((epoch_us(ts) // 3600000000) * 3600)"


def floor_hour(ts: float) -> datetime:
    return datetime.fromtimestamp(ts // HOUR * HOUR, UTC)


def ceil_hour(dt: datetime) -> datetime:
    ts = dt.timestamp()
    return datetime.fromtimestamp(-(-ts // HOUR) * HOUR, UTC)


def until(con, catalog: str | None = None) -> datetime | None:
    """The watermark in `con` (None: nothing summed yet, or a ledger from before the totals)."""
    meta = f"{catalog}.tollgate_meta" if catalog else "tollgate_meta"
    try:
        row = con.execute(f"SELECT value FROM {meta} WHERE key = ?", [META_KEY]).fetchone()
    except Exception:  # a ledger without the table (older schema, read-only): no totals
        return None
    if not row or not row[0]:
        return None
    try:
        return datetime.fromisoformat(row[0]).astimezone(UTC)
    except ValueError:
        return None


def next_row_sql(catalog: str, current: datetime | None) -> tuple[str, list[Any]]:
    """The first ts at or after the watermark (zone maps make it cheap): hours before it have no rows."""
    if current is None:
        return f"SELECT min(ts) FROM {catalog}.requests", []
    return f"SELECT min(ts) FROM {catalog}.requests WHERE ts >= ?", [current]


def advance_sql(catalog: str, current: datetime | None, next_row: datetime | None,
                now: float) -> tuple[list[tuple[str, list[Any]]], datetime] | None:
    """Statements that move the watermark forward by at most STEP of rows, and the new watermark; None when
    it is as far as it may go. `next_row` is next_row_sql's answer: empty hours are skipped at once."""
    limit = floor_hour(now - LAG)
    if current is not None and current >= limit:
        return None
    start = current
    if next_row is None or next_row >= limit:
        new = limit  # no rows to sum below the limit
    else:
        start = floor_hour(next_row.timestamp()) if current is None else max(current, floor_hour(next_row.timestamp()))
        new = min(limit, start + timedelta(seconds=STEP))
    lower, params = ("ts < ?", [new]) if start is None else ("ts >= ? AND ts < ?", [start, new])
    stmts: list[tuple[str, list[Any]]] = [
        (f"INSERT INTO {catalog}.spend_hours SELECT {_HOUR_OF} AS hour, tier, user_id, count(*), sum(cost_usd)"
         f" FROM {catalog}.requests WHERE {lower} GROUP BY ALL", params),
        (f"INSERT OR REPLACE INTO {catalog}.tollgate_meta VALUES (?, ?)", [META_KEY, new.isoformat()]),
    ]
    return stmts, new


def late_sql(catalog: str, rows_select: str) -> str:
    """Adds the rows of `rows_select` (the landing's new rows) that fall below the watermark (param 1)."""
    return (f"INSERT INTO {catalog}.spend_hours SELECT {_HOUR_OF} AS hour, tier, user_id, count(*), sum(cost_usd)"
            f" FROM ({rows_select}) WHERE ts < ? GROUP BY ALL")


def source(start: datetime | None, upper: datetime, wm: datetime | None) -> tuple[str, list[Any]]:
    """A subquery of (tier, user_id, cost_usd) rows whose costs add up to the spend of start <= ts < upper.

    Whole hours below the watermark come from spend_hours; the rest from requests, as two ranges on ts
    (each a zone-map range: an OR of ranges would scan the whole period).
    """
    raw = "SELECT tier, user_id, cost_usd FROM requests WHERE "
    if wm is None:
        if start is None:
            return f"({raw}ts < ?)", [upper]
        return f"({raw}ts >= ? AND ts < ?)", [start, upper]
    lo = ceil_hour(start) if start is not None else None  # the first whole hour in the window
    hi = min(wm, floor_hour(upper.timestamp()))  # the end of the whole hours the totals hold
    if lo is not None and lo >= hi:  # no whole hour in between: all from requests
        return f"({raw}ts >= ? AND ts < ?)", [start, upper]
    parts, params = [], []
    if lo is None:
        parts.append("SELECT tier, user_id, cost_usd FROM spend_hours WHERE hour < ?")
        params.append(hi)
    else:
        parts.append(f"{raw}ts >= ? AND ts < ?")
        params += [start, lo]
        parts.append("SELECT tier, user_id, cost_usd FROM spend_hours WHERE hour >= ? AND hour < ?")
        params += [lo, hi]
    parts.append(f"{raw}ts >= ? AND ts < ?")
    params += [hi, upper]
    return "(" + " UNION ALL ".join(parts) + ")", params
