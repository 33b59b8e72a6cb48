"""The DuckDB ledger: one row per intercepted request, written in batches on a thread of its own.

DuckDB lets one process write a database file, and a process that merely *reads* it (the `duckdb` CLI,
`duckdb.connect(path, read_only=True)`, `tollgate keys create` in another shell) locks it too. So the gateway
never keeps the file open: every `land_interval` (or at once when LAND_ROWS rows wait) the writer thread
attaches the file, inserts what the spool holds, and detaches it again. ``ATTACH``/``INSERT``/``DETACH`` on a
long-lived in-memory connection holds the file ~10-12 ms per landing of a few hundred rows (measured, DuckDB
2.0.1, 1M-row table: attach ~1, the insert ~6 of which ~2 parse the spool with ``read_json``, checkpointing
detach ~4); a fresh ``duckdb.connect(path)`` per batch holds it ~27-31 ms (most of it building a new database
instance), so other processes collide with the gateway 3-4 times less often. The insert parses the spool
itself: parsing it into a temp table before the attach kept ~2 ms out of the lock but cost ~5 ms more CPU
per landing (the temp table, a window function, five more statements) for about the same hold.

CPU is the writer's budget (the proxy's cores are shared; measured with ``stats['cpu_seconds']``): rows that
already have their columns' types skip coercion and are encoded in Rust (:func:`_fast_line`), a landing is
three statements, and the de-duplicating window function runs only for chunks the writer cannot vouch for.

Durability: rows are appended to a JSONL *spool* (fsync once per batch) before any attempt on the database.
While someone else holds the file the rows stay there and land on a later round; after a crash the next
start replays the spool. A backlog lands in chunks of at most LAND_BYTES (DuckDB's memory is capped), and the
spool is truncated once all of it is in. Replays cannot duplicate rows: the insert of a chunk that may have
landed before (replayed, or retried after a failed landing) anti-joins on ``request_id`` within the chunk's
time window (see :data:`_DDL` for why that rather than a PRIMARY KEY).

The event loop only ever calls :meth:`Ledger.record` (a list append under a lock held for nanoseconds).
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from operator import contains
from typing import Any, NamedTuple

import duckdb

try:  # Rust JSON encoder, ~6x json.dumps per row; pydantic (which genai-prices requires) always brings it
    from pydantic_core import to_json as _rust_json
except ImportError:  # pragma: no cover - the row fast path then uses json.dumps
    _rust_json = None

from . import totals
from .keys import KeyRecord, keys_signature, load_keys

log = logging.getLogger("tollgate.ledger")

SCHEMA_VERSION = 2

# DESIGN.md's ledger columns, in order, with their DuckDB types.
REQUEST_SCHEMA: tuple[tuple[str, str], ...] = (
    ("request_id", "VARCHAR"),
    ("ts", "TIMESTAMPTZ"),
    ("provider", "VARCHAR"),
    ("endpoint", "VARCHAR"),
    ("model", "VARCHAR"),
    ("response_model", "VARCHAR"),
    ("key_id", "VARCHAR"),
    ("user_id", "VARCHAR"),
    ("tier", "VARCHAR"),
    ("metadata", "JSON"),
    ("status_code", "INTEGER"),
    ("outcome", "VARCHAR"),
    ("stream", "BOOLEAN"),
    ("input_tokens", "BIGINT"),
    ("cached_input_tokens", "BIGINT"),
    ("cache_write_tokens", "BIGINT"),
    ("output_tokens", "BIGINT"),
    ("reasoning_tokens", "BIGINT"),
    ("token_source", "VARCHAR"),
    ("cost_usd", "DECIMAL(18,9)"),
    ("latency_ms", "DOUBLE"),
    ("ttft_ms", "DOUBLE"),
)
COLUMNS: tuple[str, ...] = tuple(name for name, _ in REQUEST_SCHEMA)

_COST_LIMIT = Decimal(10) ** 9  # DECIMAL(18,9) holds |x| < 1e9

# --- schema ---------------------------------------------------------------------------------------------------

# No PRIMARY KEY on request_id, on purpose. Measured with 1M rows (DuckDB 2.0.1): the ART index makes the file
# 5x larger (116 MB vs 23 MB) and each 1k-row batch 3-6x slower, and the gateway pays that 4 times a second
# while holding the lock auditors wait on. The writer is the only inserter and de-duplicates replays itself.
_DDL = (
    "CREATE TABLE IF NOT EXISTS tollgate_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    "CREATE TABLE IF NOT EXISTS requests ("
    + ", ".join(
        f"{name} {typ}" + (" NOT NULL" if name in ("request_id", "ts") else "") for name, typ in REQUEST_SCHEMA
    )
    + ")",
    """CREATE TABLE IF NOT EXISTS keys (
        key_id VARCHAR PRIMARY KEY,
        key_hash VARCHAR NOT NULL UNIQUE,
        user_id VARCHAR NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ,
        revoked_at TIMESTAMPTZ,
        metadata JSON,
        tier VARCHAR)""",
    *totals.DDL,
)

_SUMS = """coalesce(sum(requests), 0)::BIGINT AS requests,
    coalesce(sum(input_tokens), 0)::BIGINT AS input_tokens,
    coalesce(sum(cached_input_tokens), 0)::BIGINT AS cached_input_tokens,
    coalesce(sum(cache_write_tokens), 0)::BIGINT AS cache_write_tokens,
    coalesce(sum(output_tokens), 0)::BIGINT AS output_tokens,
    coalesce(sum(reasoning_tokens), 0)::BIGINT AS reasoning_tokens,
    sum(cost_usd) AS cost_usd"""

# Views for the common audits, over usage_rows (the daily totals below their watermark and the rows above it,
# see totals.py): the same sums as over every row, in milliseconds at any size. Days are UTC days.
_VIEWS = (
    totals.USAGE_ROWS_VIEW,
    f"CREATE OR REPLACE VIEW spend_by_user AS SELECT user_id, {_SUMS} FROM usage_rows"
    " GROUP BY user_id ORDER BY cost_usd DESC NULLS LAST, user_id",
    f"CREATE OR REPLACE VIEW spend_by_model AS SELECT provider, model, {_SUMS} FROM usage_rows"
    " GROUP BY provider, model ORDER BY cost_usd DESC NULLS LAST, provider, model",
    f"CREATE OR REPLACE VIEW spend_by_key AS SELECT key_id, any_value(user_id) AS user_id, {_SUMS}"
    " FROM usage_rows GROUP BY key_id ORDER BY cost_usd DESC NULLS LAST, key_id",
    f"CREATE OR REPLACE VIEW spend_by_day AS SELECT day, {_SUMS} FROM usage_rows GROUP BY day ORDER BY day",
)

# Migrations from version N to N+1 go here as {N: (sql, ...)}; ensure_schema applies them in order.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: totals for fast budget recounts and reports (filled in by the writer, from the oldest row on), and
    # the views over them.
    1: (*totals.DDL, *_VIEWS),
}


class LedgerError(RuntimeError):
    """A ledger problem to show as is (names the file; never holds row contents)."""


class LedgerLocked(LedgerError):
    """Another process holds the database file."""


class _SpoolRefused(Exception):
    """DuckDB could not read a spool chunk (a value of the wrong type, a line that is not JSON)."""


def ensure_schema(con) -> None:
    """Create or migrate the ledger's tables and views in `con`'s default catalog. Idempotent and cheap."""
    con.execute(_DDL[0])
    row = con.execute("SELECT value FROM tollgate_meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"the ledger was written by a newer tollgate (schema {version}; this one knows {SCHEMA_VERSION})"
        )
    if version == SCHEMA_VERSION:
        return
    con.execute("BEGIN")
    try:
        if version == 0:  # a new file (or one from before versioning): the current schema at once
            for sql in _DDL[1:] + _VIEWS:
                con.execute(sql)
        else:
            for v in range(version, SCHEMA_VERSION):
                for sql in _MIGRATIONS[v]:
                    con.execute(sql)
        con.execute(
            "INSERT OR REPLACE INTO tollgate_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


# --- opening the file (the CLI's way) --------------------------------------------------------------------------

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")


def is_lock_error(exc: BaseException) -> bool:
    """Whether a DuckDB error means "someone else has this file open" (worth retrying) rather than a fault."""
    if isinstance(exc, duckdb.Error) and type(exc).__name__ == "ResourceInUseException":
        return True  # the same file attached elsewhere in this process
    text = str(exc)
    if isinstance(exc, duckdb.IOException):
        low = text.lower()
        return "could not set lock" in low or "conflicting lock" in low
    return isinstance(exc, duckdb.ConnectionException) and "different configuration" in text


def lock_holder(exc: BaseException) -> str:
    """'PID 123 (/usr/bin/duckdb)' from DuckDB's lock error, or a generic phrase."""
    if m := _LOCK_HOLDER.search(str(exc)):
        return f"PID {m['pid']} ({os.path.basename(m['exe'])})"
    return "another process"


def connect(path: str, *, read_only: bool = False, wait: float = 5.0) -> duckdb.DuckDBPyConnection:
    """Open the ledger for a short-lived command, retrying while another process holds the file.

    The gateway holds the lock for a few milliseconds per batch, so a few seconds of retries ride over it;
    a reader that keeps the file open (an interactive `duckdb` session) yields a clear LedgerLocked.
    Read-write opens create the file (mode 0600) and its schema.
    """
    if read_only and not os.path.exists(path):
        raise FileNotFoundError(f"no ledger at {path} yet")
    if not read_only:
        _make_parent(path)
    created = not os.path.exists(path)
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(path, read_only=read_only)
            break
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise
            if time.monotonic() >= deadline:
                raise LedgerLocked(
                    f"{path} is locked by {lock_holder(exc)}; it holds the file open"
                    f" (waited {wait:g}s). Close it (or use read-only access there) and retry."
                ) from None
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
    if not read_only:
        if created:
            _chmod_private(path)
        try:
            ensure_schema(con)
        except BaseException:
            con.close()
            raise
    return con


def _make_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _chmod_private(path: str) -> None:
    try:
        os.chmod(path, 0o600)
    except OSError as exc:  # pragma: no cover - e.g. a filesystem without modes
        log.warning("could not make %s private (mode 0600): %s", path, exc)


# --- row serialization -----------------------------------------------------------------------------------------
#
# Rows are coerced to their column types here, on the writer thread, so that read_json never meets a value it
# cannot convert (a spool line DuckDB refuses would block every later row). A value that cannot be coerced
# becomes NULL with a warning naming the column (never the value).


class _BadValue(Exception):
    pass


def _as_str(v: Any) -> str | None:
    if v is None or type(v) is str:
        return v
    return str(v)


_I32 = 2**31  # INTEGER holds -2**31 <= x < 2**31
_I64 = 2**63  # BIGINT


def _as_int(v: Any, limit: int = _I64) -> int | None:
    """An int that fits the column: read_json refuses the whole spool over one value out of range."""
    if v is None:
        return None
    if type(v) is not int:
        if isinstance(v, float) and not math.isfinite(v):
            raise _BadValue
        try:
            v = int(v)
        except (TypeError, ValueError, OverflowError):
            raise _BadValue from None
    if not -limit <= v < limit:
        raise _BadValue
    return v


def _as_int32(v: Any) -> int | None:
    return _as_int(v, _I32)


def _as_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise _BadValue from None
    if not math.isfinite(f):
        raise _BadValue
    return f


def _as_bool(v: Any) -> bool | None:
    if v is None or type(v) is bool:
        return v
    if isinstance(v, int | float):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    raise _BadValue


def _as_decimal(v: Any) -> str | None:
    """Decimal text, exact ('0.000150000'), never via float unless a float was given."""
    if v is None:
        return None
    try:
        d = v if isinstance(v, Decimal) else Decimal(repr(v) if isinstance(v, float) else str(v))
    except (InvalidOperation, ValueError):
        raise _BadValue from None
    if not d.is_finite() or abs(d) >= _COST_LIMIT:
        raise _BadValue
    return format(d, "f")


def _as_ts(v: Any) -> str:
    """ISO 8601 in UTC. Naive datetimes are taken as UTC (the ledger's convention)."""
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise _BadValue from None
    elif isinstance(v, int | float) and not isinstance(v, bool):
        try:
            dt = datetime.fromtimestamp(v, UTC)
        except (OverflowError, OSError, ValueError):  # NaN, inf, beyond year 9999
            raise _BadValue from None
    elif isinstance(v, date):
        dt = datetime(v.year, v.month, v.day)
    else:
        raise _BadValue
    try:
        dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except (OverflowError, ValueError):  # an offset that pushes year 1 or 9999 out of range
        raise _BadValue from None
    return dt.isoformat()


def _as_json(v: Any) -> Any:
    """Any JSON value; a string that holds a JSON object/array is stored as that object/array."""
    if isinstance(v, str) and v[:1] in ("{", "["):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


_COERCE: dict[str, Callable[[Any], Any]] = {
    "VARCHAR": _as_str,
    "INTEGER": _as_int32,
    "BIGINT": _as_int,
    "DOUBLE": _as_float,
    "BOOLEAN": _as_bool,
    "DECIMAL(18,9)": _as_decimal,
    "JSON": _as_json,
    "TIMESTAMPTZ": _as_ts,
}
# Values whose type is already right skip the coercion call. (Not ints: they need their range checked.)
_READY: dict[str, frozenset[type]] = {
    "VARCHAR": frozenset({str}),
    "BOOLEAN": frozenset({bool}),
    "JSON": frozenset({dict, list, int, float, bool}),
}
_PLAN: tuple[tuple[str, Callable[[Any], Any], frozenset[type]], ...] = tuple(
    (n, _COERCE[t], _READY.get(t, frozenset())) for n, t in REQUEST_SCHEMA
)
_KNOWN = frozenset(COLUMNS)
_warned_fields: set[str] = set()
_warned_values: set[tuple[str, type]] = set()


def row_to_json(row: dict[str, Any]) -> str:
    """One spool line (no newline) for a ledger row dict: all columns, coerced, Decimal exact."""
    return _row_line(row)[0].decode("utf-8")


def _row_line(row: dict[str, Any]) -> tuple[bytes, str]:
    """(spool line, request_id) for a row: the fast path when every value already has its column's type."""
    fast = _fast_line(row)
    return fast if fast is not None else _coerced_line(row)


def _coerced_line(row: dict[str, Any]) -> tuple[bytes, str]:
    """The slow path: coerce each value to its column type (NULL and a warning for what cannot be)."""
    out: dict[str, Any] = {}
    get = row.get
    for name, coerce, ready in _PLAN:
        value = get(name)
        if value is None or type(value) in ready:
            out[name] = value
            continue
        try:
            out[name] = coerce(value)
        except _BadValue:
            out[name] = None
            if (name, type(value)) not in _warned_values:  # once per kind, not once per row
                _warned_values.add((name, type(value)))
                log.warning("ledger: a %s value for column %s could not be stored (NULL instead)",
                            type(value).__name__, name)
    if out["ts"] is None:  # the caller forgot it: now is within a flush interval of the truth
        out["ts"] = datetime.now(UTC).isoformat()
    if not out["request_id"]:
        out["request_id"] = uuid.uuid4().hex
    if not _KNOWN.issuperset(row):
        for extra in row.keys() - _KNOWN - _warned_fields:
            _warned_fields.add(extra)
            log.warning("ledger: row field %r is not a ledger column (ignored)", extra)
    try:
        text = json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # NaN/Infinity (not JSON: DuckDB would refuse the line) or a cycle, in metadata
        out["metadata"] = _plain_json(out["metadata"])
        text = json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)
    return text.encode("utf-8", "replace"), out["request_id"]


# The fast path: rows as Exchange.row() makes them (str/int/bool/None, an aware UTC datetime or a float epoch
# for ts, a Decimal cost, float latencies, a flat dict of metadata) need no coercion, only a check. The check
# runs in C (map/all over per-column type sets), and the line is written by pydantic-core's Rust encoder.
# Anything else, or anything the checks below are unsure of, takes the slow path above, so both write the same
# values (the fast path only writes ts as '...Z' rather than '...+00:00', which is the same instant).
_NONE = type(None)
_FAST_TYPES: dict[str, frozenset[type]] = {
    "VARCHAR": frozenset({str, _NONE}),
    "TIMESTAMPTZ": frozenset({datetime, float}),
    "INTEGER": frozenset({int, _NONE}),
    "BIGINT": frozenset({int, _NONE}),
    "DOUBLE": frozenset({float, _NONE}),
    "BOOLEAN": frozenset({bool, _NONE}),
    "DECIMAL(18,9)": frozenset({Decimal, _NONE}),
    "JSON": frozenset({dict, _NONE}),
}
_FAST: tuple[frozenset[type], ...] = tuple(_FAST_TYPES[t] for _, t in REQUEST_SCHEMA)
_INT32_COLS = tuple(n for n, t in REQUEST_SCHEMA if t == "INTEGER")
_INT64_COLS = tuple(n for n, t in REQUEST_SCHEMA if t == "BIGINT")
_FLOAT_COLS = tuple(n for n, t in REQUEST_SCHEMA if t == "DOUBLE")
_FLAT_JSON = frozenset({str, int, float, bool, _NONE})  # metadata values the fast path takes as they are
_STR = frozenset({str})
_isfinite = math.isfinite
_fromtimestamp = datetime.fromtimestamp
_FAST_SIGS: dict[tuple[type, ...], bool] = {}  # a row's value types -> all of them fit their columns
_TS_MAX = 253402300000.0  # epoch seconds a little before 9999-12-31: fromtimestamp never overflows below


def _fast_line(row: Any) -> tuple[bytes, str] | None:
    """The spool line for a row that needs no coercion, or None (then the slow path decides).

    Rows must have exactly the ledger's columns in the ledger's order (as Exchange.row() builds them): then
    the row dict itself is what gets encoded, with no copy unless ts or cost_usd need rewriting.
    """
    if type(row) is not dict or tuple(row) != COLUMNS or _rust_json is None:
        return None
    types = tuple(map(type, row.values()))
    ok = _FAST_SIGS.get(types)
    if ok is None:  # a new pattern of types (which columns are None, float or datetime ts): judge it once
        ok = all(map(contains, _FAST, types))
        if len(_FAST_SIGS) < 1024:
            _FAST_SIGS[types] = ok
    if not ok:
        return None
    rid = row["request_id"]
    if not rid:
        return None
    for name in _INT64_COLS:
        v = row[name]
        if v is not None and not -_I64 <= v < _I64:
            return None
    for name in _INT32_COLS:
        v = row[name]
        if v is not None and not -_I32 <= v < _I32:
            return None
    for name in _FLOAT_COLS:
        v = row[name]
        if v is not None and not _isfinite(v):
            return None
    meta = row["metadata"]
    if meta and not (_FLAT_JSON.issuperset(map(type, meta.values())) and _STR.issuperset(map(type, meta))):
        return None  # nested or odd metadata: json.dumps(default=str) decides how it looks
    fix: dict[str, Any] | None = None
    ts = row["ts"]
    if type(ts) is float:
        if not 0.0 <= ts < _TS_MAX:  # NaN, before 1970 or near year 9999: the slow path (and its warning)
            return None
        fix = {"ts": _fromtimestamp(ts, UTC)}
    elif ts.tzinfo is not UTC:  # naive (UTC by convention) or another zone: the slow path converts
        return None
    cost = row["cost_usd"]
    if cost is not None:
        if not cost.is_finite() or not -_COST_LIMIT < cost < _COST_LIMIT:
            return None
        if "E" in str(cost):  # the encoder writes str(cost): '1E-7' would be exact too, but plain is plainer
            fix = (fix or {}) | {"cost_usd": format(cost, "f")}
    try:
        # inf_nan_mode='null': a NaN in metadata becomes null, as the slow path makes it.
        return _rust_json(row if fix is None else row | fix, inf_nan_mode="null"), rid
    except Exception:  # e.g. a lone surrogate in a string: the slow path replaces it
        return None


def _plain_json(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str), parse_constant=lambda _: None)
    except ValueError:
        log.warning("ledger: metadata that is not JSON-representable was dropped")
        return None


_ALIAS = "tg_ledger"
_COLS = ", ".join(COLUMNS)
_JSON_COLUMNS = "{" + ", ".join(f"'{n}': '{t}'" for n, t in REQUEST_SCHEMA) + "}"


def _rows_sql(dedup: bool, anti: bool = True) -> str:
    """One SELECT of a spool chunk's new rows (its file is the one parameter): DuckDB's read_json parses it off
    the GIL.

    `anti`: rows already in the ledger (a crash between commit and spool truncation, or a landing whose
    outcome was unclear) share request_id *and* ts with their spool copy, so only rows at or after the chunk's
    oldest ts need checking; DuckDB's zone maps skip the rest (with the bound as a subquery too: measured on
    1M rows). Zone maps are per row group, so the check still reads the newest row groups' ids: a few ms of
    CPU a landing. It is therefore only used for chunks that may have been inserted before (see Ledger._fresh).
    `dedup` also keeps one row per request_id within the chunk, for chunks the writer could not vouch for
    (a window function: ~2 ms a landing, so only when needed).
    """
    qualify = " QUALIFY row_number() OVER (PARTITION BY request_id ORDER BY ts) = 1" if dedup else ""
    src = f"read_json(?, format='newline_delimited', columns={_JSON_COLUMNS})"
    if not anti:
        return f"SELECT {_COLS} FROM {src}{qualify}"
    return (
        f"WITH s AS MATERIALIZED (SELECT * FROM {src}{qualify})"
        f" SELECT {_COLS} FROM s ANTI JOIN (SELECT request_id FROM {_ALIAS}.requests"
        " WHERE ts >= (SELECT min(ts) FROM s)) r USING (request_id)"
    )


# [dedup, anti] -> (the insert, the statement that adds the chunk's rows below the hourly totals' watermark)
_INSERTS = {(d, a): f"INSERT INTO {_ALIAS}.requests ({_COLS}) {_rows_sql(d, a)}"
            for d in (False, True) for a in (False, True)}
_LATE = {(d, a): totals.late_sql(_ALIAS, _rows_sql(d, a)) for d in (False, True) for a in (False, True)}  # 2 each
_ORPHAN = re.compile(r"\.\d+")  # the '.<pid>' of a fallback spool


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _file_sig(path: str) -> tuple:
    """What changes when anyone writes the database: (mtime_ns, size) of the file and of its WAL."""
    sig = []
    for p in (path, path + ".wal"):
        try:
            st = os.stat(p)
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append(None)
    return tuple(sig)


def _valid_lines(data: bytes) -> tuple[list[bytes], int]:
    """Spool lines that parse as JSON objects, and how many did not (a crash can tear the last one)."""
    good, bad = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            good.append(_coerced_line(obj)[0])  # re-coerce: the schema may have grown
        else:
            bad += 1
    return good, bad


class Ledger:
    """The gateway's ledger writer. See the module docstring for the why."""

    KEYS_SAFETY_INTERVAL = 30.0  # reload keys this often even if the file looks unchanged (coarse mtimes)
    LOCK_WARN_INTERVAL = 10.0
    MAX_BACKOFF = 2.0
    START_WAIT = 2.0  # start() tries this long to create the schema and load keys before leaving it to the thread
    LAND_ROWS = 5000  # land at once when this many rows wait, whatever the interval
    # One landing takes at most this much of the spool (~15k rows): a backlog (a burst, or an hour behind a
    # reader's lock) lands chunk after chunk, within DuckDB's 64 MB cap, instead of failing to parse at once.
    LAND_BYTES = 8 << 20
    TRACK_IDS = 16_384  # request_ids of unlanded rows the writer remembers (past that, SQL de-duplicates);
    # bounded because dropping the set frees them all at once under the GIL (50k: ~4 ms)
    # Rows serialized between GIL hand-overs (time.sleep(0)) to the event loop: ~0.2 ms of work. Measured on a
    # 30k-row burst: 32 keeps the loop's lag p99 under 1 ms; 256 let it reach ~7 ms, no slicing 5 ms (the
    # interpreter's switch interval) on every wake-up.
    SLICE_ROWS = 32
    BLOB_ROWS = 1024  # lines joined into one bytes object (one write), so that no join holds the GIL for long
    # DuckDB's row group (122,880 rows by default) is what a checkpoint rewrites when a landing fills it: at
    # that size the checkpoint needed 72-128 MB and failed against the 64 MB cap, for good, at every
    # boundary. At 16,384 rows it needs ~12 MB and takes tens of ms (README "The ledger at any size").
    # Applies to the row groups written from now on, so existing ledgers are mended too.
    ROW_GROUP_SIZE = 16_384
    MEMORY_MB = 64  # the writer's DuckDB memory; doubled per recovery attempt up to MAX_MEMORY_MB
    MAX_MEMORY_MB = 1024
    TEMP_MAX = "2GB"  # spill room in the private '<ledger>.tmp' folder, for what still does not fit
    ERROR_REMIND = 60.0  # a landing that keeps failing is logged again this often (with its count)
    ADVANCE_BUDGET = 0.1  # seconds one round may spend moving the hourly totals' watermark (catch-up)

    def __init__(
        self,
        path: str,
        *,
        spool_path: str | None = None,
        flush_interval: float = 0.25,
        land_interval: float = 1.0,
        on_keys: Callable[[dict[str, KeyRecord]], None] | None = None,
        keys_poll: float = 0.5,
    ) -> None:
        if not path or path == ":memory:" or path.startswith(":"):
            raise ValueError("the ledger needs a database file (it is reopened for every batch)")
        self.path = os.path.abspath(path)
        self.spool_path = os.path.abspath(spool_path) if spool_path else self.path + ".spool"
        self._spool_base = self.spool_path  # '<base>.<pid>' when another live gateway owns the base spool
        self.flush_interval = flush_interval  # rows reach the durable spool this often
        # ...and the database this often (or at LAND_ROWS): each landing costs a fixed ~10 ms of attach,
        # insert and detach on a core the proxy also needs, so landing every spool round cost ~10 % of
        # throughput under load. Durability comes from the spool; readers see rows within land_interval.
        self.land_interval = max(land_interval, flush_interval)
        self._last_land = -math.inf
        self._force_land = False
        self.keys_poll = keys_poll
        self._on_keys = on_keys

        # Shared with the event loop: guarded by _lock, held only for list swaps and counter bumps.
        self._lock = threading.Lock()
        self._landed_cond = threading.Condition(self._lock)
        self._buf: list[dict] = []
        self._recorded = 0  # rows recorded in this run
        self._landed = 0  # of those, rows in the database (or dropped as unserializable)
        self._replay = 0  # rows from an earlier run's spool, not yet in the database

        # Writer-thread state.
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_deadline = math.inf
        self._thread: threading.Thread | None = None
        self._mem: duckdb.DuckDBPyConnection | None = None
        self._spool_fd = -1
        self._lock_fd = -1
        self._spool_rows = 0  # lines in the spool file not landed yet (this run's and replayed)
        self._spool_off = 0  # where they start: the lines before were landed by an earlier chunk
        self._chunk_at: tuple[int, int, int] | None = None  # (offset, bytes, rows) copied to the .chunk file
        self._carry: list[bytes] = []  # serialized rows ('\n'-terminated blobs) the spool could not take yet
        self._carry_rows = 0
        # request_ids of the unlanded spool rows, while it holds at most TRACK_IDS of them ("exact"): then a
        # chunk is known to be free of duplicates and its insert skips the de-duplicating window function.
        self._ids: set[str] = set()
        self._ids_exact = True
        # Every unlanded spool row was recorded by this run and no landing attempt can have inserted it: then
        # the insert skips the anti-join on the ledger (see _rows_sql). False after a replay or a failed
        # landing, until the spool is empty again. A request recorded twice by mistake is still caught while
        # its first copy is unlanded (_ids) or in the last landing (_landed_ids).
        self._fresh = True
        self._landed_ids: set[str] = set()
        self._attached = False  # the file may be attached (set before ATTACH, cleared by a clean DETACH)
        self._using = False  # it is also the default catalog (USE), which DETACH must undo first
        self._repaired = False  # the spool was rewritten after DuckDB refused it, and not landed since
        self._warned_dups = False
        self._halvings = 0  # of LAND_BYTES, after DuckDB ran out of memory on a chunk (huge rows)
        self._memory_mb = self.MEMORY_MB
        self.temp_dir = self.path + ".tmp"
        # Totals (totals.py): the oldest ts among this run's unlanded rows tells whether a landing
        # may hold rows below the watermark; when the watermark may move next (monotonic).
        self._spool_min_ts = math.inf
        self._advance_at = 0.0
        # Failures other than a reader's lock: the first of a streak is logged loudly, then a reminder per
        # ERROR_REMIND; `problem` is what /health/ready shows.
        self.problem: str | None = None
        self._streak = 0
        self._streak_logged_level = 0
        self._last_remind = -math.inf
        # The level for that loud line. mitmproxy exits when an ERROR is logged during its start-up, so the
        # gateway passes a function that says WARNING until start-up is over (the line then comes again).
        self.error_level: Callable[[], int] = lambda: logging.ERROR
        self._schema_ok = False
        self._healthy = True
        self._fails = 0
        self._retry_at = 0.0
        self._locked_since: float | None = None
        self._last_lock_warn = -math.inf
        self._keys_sig: tuple[int, int] | None = None
        self._keys_at = -math.inf
        self._file_seen: tuple | None = None
        self._queries: list[tuple[Callable, Future]] = []  # reads for the writer thread to run (call)
        # For measurements and /health: inserts, rows inserted, lock conflicts met, seconds the file was held,
        # and the writer thread's CPU seconds (time.thread_time, so it counts only this thread's work: what
        # the writer takes from the proxy's cores, whatever the machine's other load).
        self.stats = {"batches": 0, "rows": 0, "lock_waits": 0, "write_seconds": 0.0, "cpu_seconds": 0.0}

    # --- API used on the event loop ------------------------------------------------------------------------

    def record(self, row: dict) -> None:
        """Queue one ledger row. O(1), no I/O: the writer thread serializes, spools and inserts it."""
        with self._lock:
            self._buf.append(row)
            self._recorded += 1

    @property
    def pending(self) -> int:
        """Rows recorded (or left by an earlier run) that are not in the database yet."""
        with self._lock:
            return self._recorded - self._landed + self._replay

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Future:
        """Run fn(connection) on the writer thread, the ledger attached read-only as the default catalog, after
        every earlier run's spool has landed; the future holds what it returns.

        One process must not open the file twice (DuckDB's locks are per process), so the gateway's own
        reads — budget spend at start — go through the thread that owns the file."""
        fut: Future = Future()
        with self._lock:
            self._queries.append((fn, fut))
        self._wake.set()
        return fut

    def healthy(self) -> bool:
        """False only when the last write attempt failed for a reason other than another process's lock."""
        return self._healthy

    # --- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the schema, replay a previous run's spool and load the keys, then start the writer thread.

        If another process holds the file for longer than START_WAIT, that work moves to the thread and
        start() returns anyway: the gateway can run, its rows wait in the spool.
        """
        if self._thread is not None:
            raise RuntimeError("ledger already started")
        _make_parent(self.path)
        self._open_spool()
        self._mem = self._connect_memory()
        deadline = time.monotonic() + self.START_WAIT
        while True:
            outcome = self._land()
            if outcome != "locked" or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if outcome == "locked":
            self._refresh_keys()  # a read-only attach still works while others only read
            log.warning("ledger %s is busy; schema, replay and keys continue in the background", self.path)
        self._thread = threading.Thread(target=self._run, name="tollgate-ledger", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    def flush(self, timeout: float = 5) -> bool:
        """Wait until every row recorded so far is in the database. For tests and shutdown."""
        with self._lock:
            target = self._recorded
        self._force_land = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._landed_cond:
            while self._landed < target or self._replay:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._landed_cond.wait(min(left, 0.05))
                self._wake.set()
        return True

    def stop(self, timeout: float = 10) -> None:
        """Flush what can be flushed within `timeout`, then stop. Rows still blocked stay in the spool."""
        atexit.unregister(self._atexit)
        thread = self._thread
        if thread is None:
            return
        self._stop_deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        thread.join(timeout + 5)
        if thread.is_alive():  # pragma: no cover - DuckDB stuck; leave its resources alone
            log.error("ledger writer did not stop; %d rows stay in %s", self.pending, self.spool_path)
            return
        self._thread = None
        if self.pending:
            log.warning("ledger %s stayed locked; %d rows wait in %s and land on the next start",
                        self.path, self.pending, self.spool_path)

    def _connect_memory(self) -> duckdb.DuckDBPyConnection:
        """The writer's DuckDB: one thread and a memory cap (the defaults, a thread per core and 80 % of RAM,
        let its native memory creep up under load), spilling past the cap into a folder of its own, mode 0700
        (DuckDB's default is '.tmp' in whatever the working directory is, with ledger rows in files nobody
        made private)."""
        os.makedirs(self.temp_dir, mode=0o700, exist_ok=True)
        os.chmod(self.temp_dir, 0o700)
        return duckdb.connect(":memory:", config={
            "threads": 1, "memory_limit": f"{self._memory_mb}MB", "temp_directory": self.temp_dir,
            "max_temp_directory_size": self.TEMP_MAX})

    def _atexit(self) -> None:  # pragma: no cover - interpreter shutdown without stop()
        self.stop(timeout=3)

    # --- writer thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stopping.is_set()
                if not stopping:
                    self._wake.wait(self.flush_interval)
                    self._wake.clear()
                cpu = time.thread_time()
                try:
                    self._cycle(stopping)
                except Exception as exc:  # the writer must survive anything
                    self._healthy = False
                    self.problem = f"ledger writer round failed: {_first_line(exc)}"
                    log.log(self.error_level(), "ledger writer round failed", exc_info=True)
                finally:
                    self.stats["cpu_seconds"] += time.thread_time() - cpu
                if stopping:
                    with self._lock:
                        done = not self._buf and not self._carry_rows and self._spool_rows == 0
                    if done or time.monotonic() >= self._stop_deadline:
                        break
                    time.sleep(0.05)
        finally:
            self._close()

    def _cycle(self, stopping: bool) -> None:
        now = time.monotonic()
        self._spool_new_rows()
        due = (stopping or self._force_land or self._queries or self._spool_rows >= self.LAND_ROWS
               or self._spool_off or now - self._last_land >= self.land_interval)
        if (self._spool_rows and due or not self._schema_ok) and (stopping or now >= self._retry_at):
            self._force_land = False
            self._last_land = now
            self._land()
        elif self._keys_due(now):
            self._refresh_keys()
        elif now >= self._advance_at and self._schema_ok and not stopping and now >= self._retry_at:
            self._advance(now)
        # Reads wait for an earlier run's rows (a recount without them would undercount), not for a write:
        # while a reader holds the file they still run, read-only, if the file's schema is current.
        if self._queries and not self._replay and os.path.exists(self.path) and (self._schema_ok or self._fails):
            self._run_queries()

    def _run_queries(self) -> None:
        with self._lock:
            queries, self._queries = self._queries, []
        try:
            attached = self._attach(read_only=True)
        except Exception as exc:
            attached, failure = False, exc
        else:
            failure = None
        if not attached:
            if failure is not None:
                for _fn, fut in queries:
                    fut.set_exception(failure)
            else:  # locked by another process: try again next round
                with self._lock:
                    self._queries[:0] = queries
            return
        try:
            if not self._schema_ok and not self._schema_current():  # a write must migrate it first
                with self._lock:
                    self._queries[:0] = queries
                return
            for fn, fut in queries:
                try:
                    fut.set_result(fn(self._mem))
                except Exception as exc:
                    fut.set_exception(exc)
        finally:
            self._detach()

    def _schema_current(self) -> bool:
        try:
            row = self._mem.execute(  # type: ignore[union-attr]
                "SELECT value FROM tollgate_meta WHERE key = 'schema_version'").fetchone()
        except duckdb.Error:
            return False
        return bool(row) and row[0] == str(SCHEMA_VERSION)

    def _keys_due(self, now: float) -> bool:
        if self._on_keys is None:
            return False
        elapsed = now - self._keys_at
        if self._keys_sig is None or elapsed >= self.KEYS_SAFETY_INTERVAL:
            return now >= self._retry_at
        return elapsed >= self.keys_poll and _file_sig(self.path) != self._file_seen

    # --- spool ------------------------------------------------------------------------------------------------

    def _open_spool(self) -> None:
        """Lock our spool, fold in spools that crashed runs left behind, and count what needs replaying."""
        self._lock_fd = os.open(self.spool_path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another live gateway writes this ledger: take a spool of our own
            os.close(self._lock_fd)
            base = self._spool_base
            self.spool_path = f"{base}.{os.getpid()}"
            log.info("spool %s is in use by another process; using %s", base, self.spool_path)
            self._lock_fd = os.open(self.spool_path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lines, bad = [], 0
        for path in self._orphan_spools():
            got, nbad = self._adopt(path)
            lines += got
            bad += nbad
        if os.path.exists(self.spool_path):
            with open(self.spool_path, "rb") as f:
                got, nbad = _valid_lines(f.read())
            lines = got + lines
            bad += nbad
        if bad:
            log.warning("spool %s: %d torn line(s) from an interrupted write were dropped", self.spool_path, bad)
        # Rewrite the spool atomically with only good, re-coerced lines before anything else touches it.
        tmp = self.spool_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if lines:
                os.write(fd, b"\n".join(lines) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.spool_path)
        for path, fd in self._adopted:  # still locked by us, so nobody else adopts them meanwhile
            _unlink(path)
            _unlink(path + ".chunk")
            _unlink(path + ".lock")
            os.close(fd)
        _unlink(self._chunk_path())  # a copy an earlier run made of its spool's head
        self._spool_fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._spool_rows = len(lines)
        self._spool_off = 0
        self._ids_exact = not lines  # replayed rows are not in _ids: their first landing de-duplicates in SQL
        self._fresh = not lines  # and may be in the ledger already (a crash between commit and truncation)
        with self._lock:
            self._replay = len(lines)
        if lines:
            log.info("replaying %d ledger row(s) left in %s by an earlier run", len(lines), self.spool_path)

    _adopted: list[tuple[str, int]]

    def _orphan_spools(self) -> Iterable[str]:
        """Spools of other (possibly dead) gateways on the same ledger: '<spool>.<pid>' and the primary one."""
        self._adopted = []
        base = self.spool_path
        primary = self._spool_base
        folder = os.path.dirname(primary) or "."
        prefix = os.path.basename(primary)
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        found = []
        for name in names:
            path = os.path.join(folder, name)
            if path == base:
                continue
            if path == primary or (name.startswith(prefix) and _ORPHAN.fullmatch(name[len(prefix):])):
                found.append(path)
        return found

    def _adopt(self, path: str) -> tuple[list[bytes], int]:
        """Take over a spool whose owner is gone (its lock is free)."""
        try:
            fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return [], 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return [], 0  # alive: it lands its own rows
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            os.close(fd)
            return [], 0
        self._adopted.append((path, fd))  # released once its rows are safe in our spool
        return _valid_lines(data)

    def _spool_new_rows(self) -> None:
        """Move recorded rows into the spool file (one write + fsync per batch)."""
        with self._lock:
            batch, self._buf = self._buf, []
        if batch:
            self._serialize(batch)
        if not self._carry_rows:
            return
        size = os.lseek(self._spool_fd, 0, os.SEEK_END)
        try:
            for blob in self._carry:
                view = memoryview(blob)
                while view:
                    view = view[os.write(self._spool_fd, view):]
            os.fsync(self._spool_fd)
        except OSError as exc:
            self._healthy = False
            try:
                os.ftruncate(self._spool_fd, size)  # no torn line: the whole batch is retried next round
            except OSError:
                pass
            log.error("cannot write spool %s (%s); %d row(s) kept in memory", self.spool_path, exc,
                      self._carry_rows)
            return
        self._spool_rows += self._carry_rows
        self._carry, self._carry_rows = [], 0

    def _serialize(self, batch: list) -> None:
        """Serialize a batch into `_carry`, in slices with the GIL handed back to the event loop in between.

        Rows whose request_id is already waiting in the spool are dropped here (while _ids is exact), so
        that most landings can skip the de-duplicating window function.
        """
        ids = self._ids if self._ids_exact else None
        dropped = dups = 0
        min_ts = self._spool_min_ts
        lines: list[bytes] = []
        n = len(batch)
        for start in range(0, n, self.SLICE_ROWS):
            if start:
                time.sleep(0)  # a GIL release: a burst's serialization must not stall the loop for long
            for i in range(start, min(n, start + self.SLICE_ROWS)):
                # Each row is freed as soon as it is serialized: freeing 100k rows at once when the batch
                # goes held the GIL ~40 ms (measured), a stall the slices above are there to prevent.
                row, batch[i] = batch[i], None
                try:
                    line, rid = _row_line(row)
                except Exception:  # not a dict, or something json cannot take even with default=str
                    dropped += 1
                    continue
                t = _epoch(row.get("ts"))
                if t < min_ts:
                    min_ts = t
                if ids is not None:
                    if rid in ids or rid in self._landed_ids:
                        dups += 1
                        continue
                    ids.add(rid)
                lines.append(line)
            if len(lines) >= self.BLOB_ROWS:
                self._add_blob(lines)
                lines = []
            if ids is not None and len(ids) > self.TRACK_IDS:  # a backlog: SQL de-duplicates until it lands
                self._ids_exact = False
                ids.clear()
                ids = None
        if lines:
            self._add_blob(lines)
        self._spool_min_ts = min_ts
        if dropped:
            log.error("ledger: %d row(s) were not dicts of ledger columns and were dropped", dropped)
        if dups:  # a caller recording one request twice: say so once, loudly, then quietly
            log.log(logging.DEBUG if self._warned_dups else logging.WARNING,
                    "ledger: %d row(s) repeated the request_id of a row not landed yet (dropped)", dups)
            self._warned_dups = True
        if dropped or dups:
            self._count_landed(dropped + dups)

    def _add_blob(self, lines: list[bytes]) -> None:
        self._carry_rows += len(lines)
        lines.append(b"")
        self._carry.append(b"\n".join(lines))

    def _truncate_spool(self) -> None:
        os.ftruncate(self._spool_fd, 0)
        os.fsync(self._spool_fd)
        self._spool_off = 0
        if self._chunk_at is not None:
            self._chunk_at = None
            _unlink(self._chunk_path())
        self._fresh = True  # whatever the spool takes from now on was never offered to the database
        if not self._carry_rows:
            self._spool_min_ts = math.inf
        if not self._carry_rows:  # (rows still in _carry are in _ids, or exactness was already lost)
            self._landed_ids, self._ids = self._ids, set()  # kept one more round: see _fresh
            self._ids_exact = True

    def _chunk_path(self) -> str:
        return self.spool_path + ".chunk"

    def _next_chunk(self) -> tuple[str, int, int]:
        """(file to read_json, rows, bytes) for the next landing: the spool itself, or a copy of its head.

        Usually the whole spool is one chunk. A backlog larger than LAND_BYTES lands in pieces: the next piece
        (whole lines) is copied to '<spool>.chunk' (no fsync: the spool keeps the durable copy), and reused
        while the ledger stays locked.
        """
        limit = max(self.LAND_BYTES >> self._halvings, 1)
        size = os.fstat(self._spool_fd).st_size
        if self._spool_off == 0 and size <= limit:
            return self.spool_path, self._spool_rows, size
        if self._chunk_at is not None and self._chunk_at[0] == self._spool_off and self._chunk_at[1] <= limit:
            return self._chunk_path(), self._chunk_at[2], self._chunk_at[1]
        with open(self.spool_path, "rb") as f:
            f.seek(self._spool_off)
            data = f.read(limit)
            while data and b"\n" not in data:  # one line longer than the limit
                more = f.read(limit)
                if not more:
                    break
                data += more
        end = data.rfind(b"\n") + 1  # whole lines only
        rows = data.count(b"\n", 0, end)
        fd = os.open(self._chunk_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)[:end]
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._chunk_at = (self._spool_off, end, rows)
        return self._chunk_path(), rows, end

    # --- database ---------------------------------------------------------------------------------------------

    def _attach(self, read_only: bool, use: bool = True) -> bool:
        """Attach the ledger file; False (with backoff and a throttled warning) if another process holds it.

        `use` makes it the default catalog, for statements that name its tables unqualified (schema, keys,
        gateway queries). A landing does without: one statement fewer on each side of the insert.
        """
        assert self._mem is not None
        created = not read_only and not os.path.exists(self.path)
        opts = " (READ_ONLY)" if read_only else f" (ROW_GROUP_SIZE {self.ROW_GROUP_SIZE})"
        try:
            if self._attached:  # an earlier round failed half-way and may have left it attached
                self._mem.execute(f"USE memory; DETACH DATABASE IF EXISTS {_ALIAS}")
                self._using = False
            self._attached = True
            self._mem.execute(f"ATTACH {_sql_str(self.path)} AS {_ALIAS}{opts}")
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise
            self._attached = False
            self._note_lock(exc)
            return False
        if created:
            _chmod_private(self.path)
        if use:
            self._mem.execute(f"USE {_ALIAS}")
            self._using = True
        return True

    def _detach(self) -> None:
        """Detach (which checkpoints: readers that open the file next see every landed row)."""
        assert self._mem is not None
        try:
            self._mem.execute(f"USE memory; DETACH {_ALIAS}" if self._using else f"DETACH {_ALIAS}")
            self._attached = self._using = False
        finally:
            self._file_seen = _file_sig(self.path)

    def _note_lock(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.stats["lock_waits"] += 1
        self._healthy = True  # merely busy
        self._fails += 1
        self._retry_at = now + min(self.flush_interval * 2 ** min(self._fails, 8), self.MAX_BACKOFF)
        if self._locked_since is None:
            self._locked_since = now
        if now - self._last_lock_warn >= self.LOCK_WARN_INTERVAL and now - self._locked_since >= 1.0:
            self._last_lock_warn = now
            log.warning("ledger %s is held by %s; %d row(s) wait in %s", self.path, lock_holder(exc),
                        self._spool_rows + self._carry_rows, self.spool_path)

    def _land(self) -> str:
        """Insert the next spool chunk (if any) and check the keys, in one short attach. 'ok'|'locked'|'error'.

        Three statements hold the file: ATTACH, the INSERT (which parses the chunk: a separate parse into a
        temp table first cost more CPU than it saved lock time), and DETACH (a checkpoint).
        """
        assert self._mem is not None
        rows = 0
        try:
            if self._spool_rows:
                path, rows, nbytes = self._next_chunk()
                if not rows:  # cannot happen (the count follows every write); never spin on it
                    log.error("spool %s holds no complete line where %d row(s) were counted", self.spool_path,
                              self._spool_rows)
                    self._count_landed(self._spool_rows)  # whatever they were, they are not there to land
                    self._spool_rows = 0
                    self._truncate_spool()
            t0 = time.perf_counter()
            keys_changed = self._keys_stale()
            if not self._attach(read_only=False, use=keys_changed or not self._schema_ok):
                return "locked"
            try:
                if not self._schema_ok:
                    ensure_schema(self._mem)
                    self._schema_ok = True
                if rows:
                    try:
                        self._insert(path)
                    except (duckdb.ConversionException, duckdb.InvalidInputException) as exc:
                        raise _SpoolRefused(exc) from exc
                if keys_changed:
                    self._check_keys()
            finally:
                self._detach()
            self.stats["write_seconds"] += time.perf_counter() - t0
        except Exception as exc:
            self._healthy = False
            self._schema_ok = False  # e.g. the file was replaced; re-check on the next round
            if rows:
                self._fresh = False  # the insert may have committed before the failure: check on the retry
            self._fails += 1
            now = time.monotonic()
            self._retry_at = now + min(self.flush_interval * 2 ** min(self._fails, 8), self.MAX_BACKOFF)
            if isinstance(exc, _SpoolRefused) and not self._repaired:
                self._repair_spool(exc)
                self._retry_at = now  # the repaired spool is worth a try right away
            elif isinstance(exc, duckdb.OutOfMemoryException) and rows > 1 and self._halvings < 16:
                self._halvings += 1  # rows far larger than usual: smaller chunks, at once
                self._retry_at = now
                log.warning("ledger: a chunk of %d rows did not fit DuckDB's memory; trying smaller ones", rows)
            else:
                self._recover(exc, rows)
            return "error"
        if rows:
            self._spool_rows -= rows
            self._spool_off += nbytes
            if self._spool_rows:
                self._wake.set()  # a backlog: the next chunk at once
            else:
                self._truncate_spool()
                self._halvings = 0
            self._repaired = False
            self.stats["batches"] += 1
            self.stats["rows"] += rows
        if self._locked_since is not None and rows:
            log.info("ledger %s free again after %.1fs; %d row(s) landed", self.path,
                     time.monotonic() - self._locked_since, rows)
        if self._streak:
            log.log(logging.WARNING if self._streak_logged_level >= logging.WARNING else logging.INFO,
                    "ledger %s: landing again after %d failed attempt(s)", self.path, self._streak)
            self._streak = self._streak_logged_level = 0
            self.problem = None
        self._locked_since = None
        self._healthy = True
        self._fails = 0
        self._retry_at = 0.0
        self._count_landed(rows)
        return "ok"

    def _keys_stale(self) -> bool:
        """Keys are re-read only when another process changed the file since our own last write
        (`tollgate keys create|revoke`), or now and then as a safety net against coarse mtimes."""
        return self._on_keys is not None and (
            _file_sig(self.path) != self._file_seen
            or time.monotonic() - self._keys_at >= self.KEYS_SAFETY_INTERVAL)

    def _insert(self, path: str) -> None:
        """Insert a chunk; rows of it below the hourly totals' watermark are added to the totals in the same
        transaction. Only chunks that may hold such rows pay for the check: no watermark is ever above
        floor_hour(now - LAG), so this run's rows, newer than that, cannot."""
        mem = self._mem
        assert mem is not None
        variant = (not self._ids_exact, not self._fresh)
        if self._fresh and self._spool_min_ts >= totals.floor_hour(time.time() - totals.LAG).timestamp():
            mem.execute(_INSERTS[variant], [path])
            return
        mem.execute("BEGIN")
        try:
            wm = totals.until(mem, _ALIAS)
            if wm is not None:
                for sql in _LATE[variant]:
                    mem.execute(sql, [path, wm])
            mem.execute(_INSERTS[variant], [path])
            mem.execute("COMMIT")
        except BaseException:
            mem.execute("ROLLBACK")
            raise

    def _advance(self, now: float) -> None:
        """Move the hourly totals' watermark forward (a first run or a catch-up in steps, within
        ADVANCE_BUDGET), then sleep until the next hour may be summed."""
        wall = time.time()
        try:
            keys_changed = self._keys_stale()  # (our own write below would hide another process's)
            if not self._attach(read_only=False, use=keys_changed):
                return
            try:
                if keys_changed:
                    self._check_keys()
                t0 = time.perf_counter()
                mem = self._mem
                assert mem is not None
                mem.execute("BEGIN")  # one commit per round, however many steps a catch-up takes in it
                try:
                    while True:
                        wm = totals.until(mem, _ALIAS)
                        sql, params = totals.next_row_sql(_ALIAS, wm)
                        step = totals.advance_sql(_ALIAS, wm, mem.execute(sql, params).fetchone()[0], wall)
                        if step is not None:
                            for sql, params in step[0]:
                                mem.execute(sql, params)
                        if step is None or step[1] >= totals.floor_hour(wall - totals.LAG):
                            self._advance_at = now + (totals.HOUR - wall % totals.HOUR) + 1.0
                            break
                        if time.perf_counter() - t0 >= self.ADVANCE_BUDGET:
                            self._advance_at = now  # more to catch up: the next idle round
                            break
                    mem.execute("COMMIT")
                except BaseException:
                    mem.execute("ROLLBACK")
                    raise
            finally:
                self._detach()
        except Exception as exc:
            self._advance_at = now + 60.0
            log.warning("ledger %s: updating the hourly spend totals failed (%s); budgets recount from rows "
                        "until it works", self.path, _first_line(exc))

    def _recover(self, exc: BaseException, rows: int) -> None:
        """A landing failed for a reason other than a lock: say so once, loudly, and try something that can
        make progress instead of the same thing again. In turn: a fresh DuckDB with twice the memory (at once
        when memory is what failed or the database was invalidated, as a failed checkpoint does; from the
        second failure otherwise), then smaller chunks; each after the backoff, with a reminder every
        ERROR_REMIND while it lasts."""
        self._streak += 1
        self.problem = f"ledger write failed ({self._streak}x): {_first_line(exc)}"
        text = str(exc).lower()
        memoryish = isinstance(exc, duckdb.OutOfMemoryException) or any(
            w in text for w in ("allocate", "memory", "invalidated"))
        steps = []
        if (memoryish or self._streak >= 2) and self._memory_mb < self.MAX_MEMORY_MB:
            self._memory_mb = min(self._memory_mb * 2, self.MAX_MEMORY_MB)
            steps.append(f"retrying with {self._memory_mb} MB")
            self._reopen_memory()
        elif self._streak >= 2 and rows > 1 and self._halvings < 16:
            self._halvings += 1
            steps.append(f"retrying in chunks of at most {max(self.LAND_BYTES >> self._halvings, 1)} bytes")
            self._reopen_memory()
        level = self.error_level()
        now = time.monotonic()
        if self._streak_logged_level < level:
            self._streak_logged_level = level
            self._last_remind = now
            log.log(level, "ledger write to %s failed: %s; %d row(s) stay in %s; %s", self.path,
                    _first_line(exc), self._spool_rows, self.spool_path,
                    steps[0] if steps else "retrying with backoff")
        elif now - self._last_remind >= self.ERROR_REMIND:
            self._last_remind = now
            log.warning("ledger write to %s still failing after %d attempts: %s; %d row(s) wait in %s",
                        self.path, self._streak, _first_line(exc), self._spool_rows, self.spool_path)

    def _reopen_memory(self) -> None:
        old, self._mem = self._mem, None
        try:
            if old is not None:
                old.close()
        except duckdb.Error:  # pragma: no cover - an invalidated instance may refuse even this
            pass
        self._attached = self._using = False
        self._mem = self._connect_memory()

    def _count_landed(self, n: int) -> None:
        """Rows that left the queue for good (inserted, or dropped as unreadable): earlier runs' first."""
        with self._lock:
            replayed = min(self._replay, n)
            self._replay -= replayed
            self._landed += n - replayed
            self._landed_cond.notify_all()

    def _repair_spool(self, exc: BaseException) -> None:
        """DuckDB refused a chunk (should not happen: rows are coerced). Rewrite the unlanded spool from its
        valid lines, each re-coerced by the slow path, once; if even that is refused, the error stays."""
        log.error("spool %s refused by DuckDB (%s); rewriting it from its valid lines", self.spool_path, exc)
        with open(self.spool_path, "rb") as f:
            f.seek(self._spool_off)
            lines, bad = _valid_lines(f.read())
        tmp = self.spool_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if lines:
                os.write(fd, b"\n".join(lines) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.spool_path)  # atomic: a crash leaves the old spool or the new one
        os.close(self._spool_fd)
        self._spool_fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._count_landed(self._spool_rows - len(lines))  # dropped: unreadable lines are lost anyway
        self._spool_rows = len(lines)
        self._spool_off = 0
        self._chunk_at = None
        self._ids.clear()
        self._ids_exact = False
        self._repaired = True

    def _check_keys(self) -> None:
        """In an attached session: reload the keys if their fingerprint changed, and tell the gateway."""
        if self._on_keys is None:
            return
        assert self._mem is not None
        self._keys_at = time.monotonic()
        sig = keys_signature(self._mem)
        if sig == self._keys_sig:
            return
        keys = load_keys(self._mem)
        self._keys_sig = sig
        try:
            self._on_keys(keys)
        except Exception:
            log.exception("on_keys callback failed")

    def _refresh_keys(self) -> None:
        """Check the keys without writing: a read-only attach (which works while others only read)."""
        if self._on_keys is None or not os.path.exists(self.path):
            return
        try:
            if not self._attach(read_only=True):
                return
            try:
                if self._mem.execute(  # type: ignore[union-attr]
                    "SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND table_name = 'keys'", [_ALIAS]
                ).fetchone():
                    self._check_keys()
            finally:
                self._detach()
        except Exception as exc:
            self._healthy = False
            self.problem = f"reading keys failed: {_first_line(exc)}"
            log.log(self.error_level(), "reading keys from %s failed: %s", self.path, _first_line(exc))

    def _close(self) -> None:
        if self._mem is not None:
            try:
                self._mem.close()
            except duckdb.Error:  # pragma: no cover
                pass
            self._mem = None
            try:
                os.rmdir(self.temp_dir)  # DuckDB removed its spill files on close; leave the folder only if not
            except OSError:
                pass
        for name in ("_spool_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                if name == "_lock_fd":  # still ours until the flock goes
                    _unlink(self._chunk_path())
                os.close(fd)  # closing the lock fd releases the flock
                setattr(self, name, -1)


def _epoch(ts: Any) -> float:
    """A row's ts in epoch seconds, for the oldest-row bound; -inf when it is not plain (the safe side)."""
    if type(ts) is float:
        return ts
    if isinstance(ts, datetime):
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
    return -math.inf


def _first_line(exc: BaseException) -> str:
    """An exception's first line, short: DuckDB's messages run on with advice over many lines."""
    text = str(exc).strip().split("\n", 1)[0].strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
