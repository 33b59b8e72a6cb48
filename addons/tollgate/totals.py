"""Totals kept in the ledger beside its rows, so that budgets recount and reports sum in milliseconds at any size.

A month at 100 requests/s is 260M rows: summing their cost at ~31 ns a row took ~8 s at every start, and
`tollgate usage` grew the same way. So the ledger also keeps

* ``spend_hours``: per UTC hour, tier and user, the rows and their cost (what budgets recount), and
* ``usage_days``: per UTC day, provider, model, key, user and tier, the rows, their tokens and cost (what
  ``tollgate usage`` and the ``spend_by_*`` views report).

Their rows are partial sums (a key may appear several times; readers add them up), so keeping them never
needs an index or an update, only appends.

The invariant: every ``requests`` row with ``ts < until`` is counted in both exactly once, where ``until`` (a
whole UTC hour, kept in ``tollgate_meta``) is the watermark. It holds because

* the writer moves the watermark forward itself (:func:`advance_sql`), summing the hours it passes from
  ``requests``; it stays ``LAG`` behind the clock, so a row normally lands long before its hour is summed;
* a row that lands below the watermark anyway (a replayed spool, a request that ran for hours) is added by
  the landing itself, in the same transaction as its insert (:func:`late_sql`).

A reader sums the totals below the watermark and the rows above it (plus, for a budget period that does not
start on the hour, the ragged first hour): at most ``LAG`` plus an hour of rows, which zone maps on ``ts``
find without a scan.

Rows inserted into ``requests`` by hand below the watermark are not in the totals (only the gateway writes
the ledger). To rebuild them: ``DELETE FROM spend_hours; DELETE FROM usage_days; DELETE FROM tollgate_meta
WHERE key = 'spend_hours_until'`` — the writer then sums the ledger again from its first row.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

HOUR = 3600
LAG = 2 * HOUR  # the watermark trails the clock by this much (and by the hour in progress)
STEP = 6 * HOUR  # at most this much of the ledger is summed per advance (a catch-up goes in steps)
META_KEY = "spend_hours_until"

_TOKENS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens")
DDL = (
    "CREATE TABLE IF NOT EXISTS spend_hours (hour TIMESTAMPTZ NOT NULL, tier VARCHAR, user_id VARCHAR,"
    " requests BIGINT NOT NULL, cost_usd DECIMAL(38,9))",
    "CREATE TABLE IF NOT EXISTS usage_days (day DATE NOT NULL, provider VARCHAR, model VARCHAR, key_id VARCHAR,"
    " user_id VARCHAR, tier VARCHAR, requests BIGINT NOT NULL, "
    + ", ".join(f"{t} BIGINT" for t in _TOKENS) + ", cost_usd DECIMAL(38,9))",
)

# The UTC hour and day of ts by integer arithmetic: independent of the session's TimeZone, and far cheaper
# than date_trunc or a cast on TIMESTAMPTZ (which go through ICU for every row: 1.2 s for 30M rows).
HOUR_OF = "to_timestamp((epoch_us(ts) // 3600000000) * 3600)"
UTC_DAY = "(DATE '1970-01-01' + CAST(epoch_us(ts) // 86400000000 AS INTEGER))"
_DAY_DIMS = "provider, model, key_id, user_id, tier"
_USAGE_SUMS = "count(*), " + ", ".join(f"sum({t})" for t in _TOKENS) + ", sum(cost_usd)"


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


def _sum_into(catalog: str, source: str) -> tuple[str, str]:
    """The two statements that add the rows of `source` (a FROM target with a WHERE) to both totals."""
    return (f"INSERT INTO {catalog}.spend_hours SELECT {HOUR_OF}, tier, user_id, count(*), sum(cost_usd)"
            f" FROM {source} GROUP BY ALL",
            f"INSERT INTO {catalog}.usage_days SELECT {UTC_DAY}, {_DAY_DIMS}, {_USAGE_SUMS}"
            f" FROM {source} GROUP BY ALL")


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
        first = floor_hour(next_row.timestamp())
        start = first if current is None else max(current, first)
        new = min(limit, start + timedelta(seconds=STEP))
    lower, params = ("ts < ?", [new]) if start is None else ("ts >= ? AND ts < ?", [start, new])
    stmts = [(sql, params) for sql in _sum_into(catalog, f"{catalog}.requests WHERE {lower}")]
    stmts.append((f"INSERT OR REPLACE INTO {catalog}.tollgate_meta VALUES (?, ?)", [META_KEY, new.isoformat()]))
    return stmts, new


def late_sql(catalog: str, rows_select: str) -> tuple[str, str]:
    """Statements that add the rows of `rows_select` (a landing's new rows; its parameter first) that fall below
    the watermark (the second parameter) to both totals."""
    return _sum_into(catalog, f"({rows_select}) WHERE ts < ?")


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


_USAGE_COLS = f"day, {_DAY_DIMS}, requests, " + ", ".join(_TOKENS) + ", cost_usd"
_RAW_USAGE = f"SELECT {UTC_DAY} AS day, {_DAY_DIMS}, 1 AS requests, " + ", ".join(_TOKENS) + ", cost_usd FROM requests"
# Every row's usage, as the totals below the watermark and the rows above it (the spend_by_* views read this).
USAGE_ROWS_VIEW = (
    f"CREATE OR REPLACE VIEW usage_rows AS SELECT {_USAGE_COLS} FROM usage_days UNION ALL {_RAW_USAGE}"
    f" WHERE ts >= coalesce((SELECT CAST(value AS TIMESTAMPTZ) FROM tollgate_meta WHERE key = '{META_KEY}'),"
    " '-infinity'::TIMESTAMPTZ)")


def usage_source(since: datetime | None, wm: datetime | None) -> tuple[str, list[Any]]:
    """A subquery of usage rows (day, provider, model, key_id, user_id, tier, requests, tokens..., cost_usd) for
    ts >= since: whole UTC days below the watermark from usage_days, the rest from requests."""
    if wm is None:
        return (f"({_RAW_USAGE} WHERE ts >= ?)", [since]) if since else (f"({_RAW_USAGE})", [])
    if since is None:
        return f"(SELECT {_USAGE_COLS} FROM usage_days UNION ALL {_RAW_USAGE} WHERE ts >= ?)", [wm]
    s = since.astimezone(UTC)
    first_day = (s - timedelta(microseconds=1)).date() + timedelta(days=1)  # the first whole day from since
    first = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    if first >= wm:
        return f"({_RAW_USAGE} WHERE ts >= ?)", [s]
    # [since, first) and [wm, ...) from the rows; whole days from first on (all below wm) from the totals.
    return (f"({_RAW_USAGE} WHERE ts >= ? AND ts < ? UNION ALL SELECT {_USAGE_COLS} FROM usage_days WHERE day >= ?"
            f" UNION ALL {_RAW_USAGE} WHERE ts >= ?)", [s, first, first_day, wm])
