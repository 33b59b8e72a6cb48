"""The DuckDB ledger: one row per intercepted request, written in batches on a thread of its own.

DuckDB lets one process write a database file, and a process that merely *reads* it (the `duckdb` CLI,
`duckdb.connect(path, read_only=True)`, `tollgate keys create` in another shell) locks it too. So the gateway
never keeps the file open: every `flush_interval` the writer thread attaches the file, inserts a batch, and
detaches it again. ``ATTACH``/``DETACH`` on a long-lived in-memory connection holds the file for ~7-10 ms per
small batch (measured, DuckDB 2.0.1, 1M-row table: attach ~1.5, insert ~4, checkpointing detach ~4); a fresh
``duckdb.connect(path)`` per batch holds it ~27-31 ms (most of it building a new database instance), so other
processes collide with the gateway 3-4 times less often. The spool is parsed (``read_json``) before the
attach, so parsing never extends the lock.

Durability: rows are appended to a JSONL *spool* (fsync once per batch) before any attempt on the database.
While someone else holds the file the rows stay there and land on a later round; after a crash the next
start replays the spool. Replays cannot duplicate rows: the insert anti-joins on ``request_id`` within the
spool's time window (see :data:`_INSERT` for why that rather than a PRIMARY KEY).

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
from concurrent.futures import Future
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import duckdb

from .keys import KeyRecord, keys_signature, load_keys

log = logging.getLogger("tollgate.ledger")

SCHEMA_VERSION = 1

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
)

_SUMS = """count(*) AS requests,
    coalesce(sum(input_tokens), 0)::BIGINT AS input_tokens,
    coalesce(sum(cached_input_tokens), 0)::BIGINT AS cached_input_tokens,
    coalesce(sum(cache_write_tokens), 0)::BIGINT AS cache_write_tokens,
    coalesce(sum(output_tokens), 0)::BIGINT AS output_tokens,
    coalesce(sum(reasoning_tokens), 0)::BIGINT AS reasoning_tokens,
    sum(cost_usd) AS cost_usd"""

# Views for the common audits. Days are UTC days whatever the reader's TimeZone setting.
_VIEWS = (
    f"CREATE VIEW IF NOT EXISTS spend_by_user AS SELECT user_id, {_SUMS} FROM requests"
    " GROUP BY user_id ORDER BY cost_usd DESC NULLS LAST, user_id",
    f"CREATE VIEW IF NOT EXISTS spend_by_model AS SELECT provider, model, {_SUMS} FROM requests"
    " GROUP BY provider, model ORDER BY cost_usd DESC NULLS LAST, provider, model",
    f"CREATE VIEW IF NOT EXISTS spend_by_key AS SELECT key_id, any_value(user_id) AS user_id, {_SUMS}"
    " FROM requests GROUP BY key_id ORDER BY cost_usd DESC NULLS LAST, key_id",
    f"CREATE VIEW IF NOT EXISTS spend_by_day AS SELECT CAST(timezone('UTC', ts) AS DATE) AS day, {_SUMS}"
    " FROM requests GROUP BY day ORDER BY day",
)

# Migrations from version N to N+1 go here as {N: (sql, ...)}; ensure_schema applies them in order.
_MIGRATIONS: dict[int, tuple[str, ...]] = {}


class LedgerError(RuntimeError):
    """A ledger problem to show as is (names the file; never holds row contents)."""


class LedgerLocked(LedgerError):
    """Another process holds the database file."""


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


def _as_int(v: Any) -> int | None:
    if v is None:
        return None
    if type(v) is int:
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _BadValue
        return int(v)
    try:
        return int(v)
    except (TypeError, ValueError):
        raise _BadValue from None


def _as_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
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
        dt = datetime.fromtimestamp(v, UTC)
    elif isinstance(v, date):
        dt = datetime(v.year, v.month, v.day)
    else:
        raise _BadValue
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
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
    "INTEGER": _as_int,
    "BIGINT": _as_int,
    "DOUBLE": _as_float,
    "BOOLEAN": _as_bool,
    "DECIMAL(18,9)": _as_decimal,
    "JSON": _as_json,
    "TIMESTAMPTZ": _as_ts,
}
# Values whose type is already right skip the coercion call (the common case; it halves the cost per row).
_READY: dict[str, frozenset[type]] = {
    "VARCHAR": frozenset({str}),
    "INTEGER": frozenset({int}),
    "BIGINT": frozenset({int}),
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
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # NaN/Infinity (not JSON: DuckDB would refuse the line) or a cycle, in metadata
        out["metadata"] = _plain_json(out["metadata"])
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)


def _plain_json(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str), parse_constant=lambda _: None)
    except ValueError:
        log.warning("ledger: metadata that is not JSON-representable was dropped")
        return None


_READ_SPOOL = (
    "CREATE OR REPLACE TEMP TABLE tg_spool AS SELECT * FROM read_json(?, format='newline_delimited', columns={"
    + ", ".join(f"'{n}': '{t}'" for n, t in REQUEST_SCHEMA)
    + "}) QUALIFY row_number() OVER (PARTITION BY request_id ORDER BY ts) = 1"
)
_COLS = ", ".join(COLUMNS)
# Rows already in the ledger (a crash between commit and spool truncation) share request_id *and* ts with their
# spool copy, so only rows at or after the spool's oldest ts need checking; DuckDB's zone maps skip the rest.
_INSERT = (
    f"INSERT INTO requests ({_COLS}) SELECT {_COLS} FROM temp.tg_spool s"
    " ANTI JOIN (SELECT request_id FROM requests WHERE ts >= ?) r USING (request_id)"
)

_ALIAS = "tg_ledger"
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
            good.append(row_to_json(obj).encode("utf-8", "replace"))  # re-coerce: the schema may have grown
        else:
            bad += 1
    return good, bad


class Ledger:
    """The gateway's ledger writer. See the module docstring for the why."""

    KEYS_SAFETY_INTERVAL = 30.0  # reload keys this often even if the file looks unchanged (coarse mtimes)
    LOCK_WARN_INTERVAL = 10.0
    MAX_BACKOFF = 2.0
    START_WAIT = 2.0
    LAND_ROWS = 5000  # land at once when this many rows wait, whatever the interval  # start() tries this long to create the schema and load keys before leaving it to the thread

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
        self._spool_rows = 0  # lines in the spool file (this run's and replayed)
        self._carry: list[bytes] = []  # serialized rows the spool could not take yet (disk trouble)
        self._schema_ok = False
        self._healthy = True
        self._fails = 0
        self._retry_at = 0.0
        self._locked_since: float | None = None
        self._lock_streak = False  # the last attempt met another process's lock
        self._parsed_rows = -1  # spool rows already in temp.tg_spool (-1: none)
        self._last_error_log = -math.inf
        self._last_lock_warn = -math.inf
        self._keys_sig: tuple[int, int] | None = None
        self._keys_at = -math.inf
        self._file_seen: tuple | None = None
        self._queries: list[tuple[str, list, Future]] = []  # read queries for the writer thread to run
        # For measurements and /health: inserts, rows inserted, lock conflicts met, seconds the file was held.
        self.stats = {"batches": 0, "rows": 0, "lock_waits": 0, "write_seconds": 0.0}

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

    def query(self, sql: str, params: list | None = None) -> Future:
        """Run a read query on the writer thread, after every earlier run's spool has landed.

        One process must not open the file twice (DuckDB's locks are per process), so the gateway's own
        reads — budget spend at start — go through the thread that owns the file. The future's result
        is the list of rows.
        """
        fut: Future = Future()
        with self._lock:
            self._queries.append((sql, list(params or []), fut))
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
        # One thread and a memory cap: the in-memory database only stages spool rows for the insert, and
        # DuckDB's defaults (a thread per core, 80 % of RAM) let its native memory creep up under load.
        self._mem = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": "64MB"})
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
                try:
                    self._cycle(stopping)
                except Exception:  # the writer must survive anything
                    self._healthy = False
                    log.exception("ledger writer round failed")
                if stopping:
                    with self._lock:
                        done = not self._buf and not self._carry and self._spool_rows == 0
                    if done or time.monotonic() >= self._stop_deadline:
                        break
                    time.sleep(0.05)
        finally:
            self._close()

    def _cycle(self, stopping: bool) -> None:
        now = time.monotonic()
        self._spool_new_rows()
        due = (stopping or self._force_land or self._queries or self._spool_rows >= self.LAND_ROWS
               or now - self._last_land >= self.land_interval)
        if (self._spool_rows and due or not self._schema_ok) and (stopping or now >= self._retry_at):
            self._force_land = False
            self._last_land = now
            self._land()
        elif self._keys_due(now):
            self._refresh_keys()
        if self._queries and self._schema_ok and not self._replay:
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
                for _sql, _params, fut in queries:
                    fut.set_exception(failure)
            else:  # locked by another process: try again next round
                with self._lock:
                    self._queries[:0] = queries
            return
        try:
            for sql, params, fut in queries:
                try:
                    fut.set_result(self._mem.execute(sql, params).fetchall())  # type: ignore[union-attr]
                except Exception as exc:
                    fut.set_exception(exc)
        finally:
            self._detach()

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
            _unlink(path + ".lock")
            os.close(fd)
        self._spool_fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._spool_rows = len(lines)
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
            lines = []
            dropped = 0
            for row in batch:
                try:
                    lines.append(row_to_json(row).encode("utf-8", "replace"))
                except Exception:  # not a dict, or something json cannot take even with default=str
                    dropped += 1
            if dropped:
                log.error("ledger: %d row(s) were not dicts of ledger columns and were dropped", dropped)
                self._count_landed(dropped)
            self._carry.extend(lines)
        if not self._carry:
            return
        data = b"\n".join(self._carry) + b"\n"
        size = os.lseek(self._spool_fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._spool_fd, data[written:])
            os.fsync(self._spool_fd)
        except OSError as exc:
            self._healthy = False
            try:
                os.ftruncate(self._spool_fd, size)  # no torn line: the whole batch is retried next round
            except OSError:
                pass
            log.error("cannot write spool %s (%s); %d row(s) kept in memory", self.spool_path, exc,
                      len(self._carry))
            return
        self._spool_rows += len(self._carry)
        self._carry = []

    def _truncate_spool(self) -> None:
        os.ftruncate(self._spool_fd, 0)
        os.fsync(self._spool_fd)

    # --- database ---------------------------------------------------------------------------------------------

    def _attach(self, read_only: bool) -> bool:
        """Attach the ledger file; False (with backoff and a throttled warning) if another process holds it."""
        assert self._mem is not None
        created = not read_only and not os.path.exists(self.path)
        opts = " (READ_ONLY)" if read_only else ""
        try:
            # (DETACH first in case an earlier round failed half-way and left it attached.)
            self._mem.execute(f"USE memory; DETACH DATABASE IF EXISTS {_ALIAS}")
            self._mem.execute(f"ATTACH {_sql_str(self.path)} AS {_ALIAS}{opts}")
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise
            self._note_lock(exc)
            return False
        if created:
            _chmod_private(self.path)
        self._mem.execute(f"USE {_ALIAS}")
        return True

    def _detach(self) -> None:
        assert self._mem is not None
        try:
            self._mem.execute(f"USE memory; DETACH {_ALIAS}")
        finally:
            self._file_seen = _file_sig(self.path)

    def _note_lock(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.stats["lock_waits"] += 1
        self._healthy = True  # merely busy
        self._lock_streak = True
        self._fails += 1
        self._retry_at = now + min(self.flush_interval * 2 ** min(self._fails, 8), self.MAX_BACKOFF)
        if self._locked_since is None:
            self._locked_since = now
        if now - self._last_lock_warn >= self.LOCK_WARN_INTERVAL and now - self._locked_since >= 1.0:
            self._last_lock_warn = now
            log.warning("ledger %s is held by %s; %d row(s) wait in %s", self.path, lock_holder(exc),
                        self._spool_rows + len(self._carry), self.spool_path)

    def _land(self) -> str:
        """Insert the whole spool (if any) and check the keys, in one short attach. 'ok'|'locked'|'error'."""
        assert self._mem is not None
        rows = self._spool_rows
        try:
            if rows:
                # After a lock conflict, probe before parsing: re-reading a spool that grew during an hour-long
                # reader session on every retry would burn CPU for nothing.
                if self._lock_streak and not self._probe():
                    return "locked"
                if rows != self._parsed_rows:
                    rows = self._parse_spool()
                    self._parsed_rows = rows
            t0 = time.perf_counter()
            # Keys are re-read only when another process changed the file since our own last write
            # (`tollgate keys create|revoke`), or now and then as a safety net against coarse mtimes.
            keys_changed = (_file_sig(self.path) != self._file_seen
                            or time.monotonic() - self._keys_at >= self.KEYS_SAFETY_INTERVAL)
            if not self._attach(read_only=False):
                return "locked"
            try:
                if not self._schema_ok:
                    ensure_schema(self._mem)
                    self._schema_ok = True
                if rows:
                    oldest = self._mem.execute("SELECT min(ts) FROM temp.tg_spool").fetchone()[0]
                    self._mem.execute(_INSERT, [oldest])
                if keys_changed:
                    self._check_keys()
            finally:
                self._detach()
            self.stats["write_seconds"] += time.perf_counter() - t0
        except Exception as exc:
            self._healthy = False
            self._schema_ok = False  # e.g. the file was replaced; re-check on the next round
            self._parsed_rows = -1
            self._fails += 1
            now = time.monotonic()
            self._retry_at = now + min(self.flush_interval * 2 ** min(self._fails, 8), self.MAX_BACKOFF)
            if now - self._last_error_log >= self.LOCK_WARN_INTERVAL:
                self._last_error_log = now
                log.error("ledger write to %s failed: %s; %d row(s) stay in %s", self.path, exc, rows,
                          self.spool_path)
            return "error"
        if rows:
            self._parsed_rows = -1
            self._mem.execute("DROP TABLE IF EXISTS temp.tg_spool")
            self._truncate_spool()
            self.stats["batches"] += 1
            self.stats["rows"] += rows
        if self._locked_since is not None and rows:
            log.info("ledger %s free again after %.1fs; %d row(s) landed", self.path,
                     time.monotonic() - self._locked_since, rows)
        self._locked_since = None
        self._lock_streak = False
        self._healthy = True
        self._fails = 0
        self._retry_at = 0.0
        self._spool_rows -= rows
        self._count_landed(rows)
        return "ok"

    def _probe(self) -> bool:
        """Is the file free right now? (An attach + detach without writing: a millisecond or two.)"""
        if not self._attach(read_only=False):
            return False
        self._detach()
        return True

    def _count_landed(self, n: int) -> None:
        """Rows that left the queue for good (inserted, or dropped as unreadable): earlier runs' first."""
        with self._lock:
            replayed = min(self._replay, n)
            self._replay -= replayed
            self._landed += n - replayed
            self._landed_cond.notify_all()

    def _parse_spool(self) -> int:
        """Read the spool into an in-memory table *before* taking the file lock, to keep the lock short.

        Returns the number of spool rows it holds.
        """
        assert self._mem is not None
        try:
            self._mem.execute(_READ_SPOOL, [self.spool_path])
            return self._spool_rows
        except duckdb.Error as exc:  # should not happen (rows are coerced); repair once, then let it fail
            log.error("spool %s unreadable (%s); rewriting it from its valid lines", self.spool_path, exc)
            with open(self.spool_path, "rb") as f:
                lines, bad = _valid_lines(f.read())
            os.ftruncate(self._spool_fd, 0)
            if lines:
                os.write(self._spool_fd, b"\n".join(lines) + b"\n")
            os.fsync(self._spool_fd)
            self._count_landed(self._spool_rows - len(lines))  # dropped: unreadable lines are lost anyway
            self._spool_rows = len(lines)
            self._mem.execute(_READ_SPOOL, [self.spool_path])
            return self._spool_rows

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
            log.error("reading keys from %s failed: %s", self.path, exc)

    def _close(self) -> None:
        if self._mem is not None:
            try:
                self._mem.close()
            except duckdb.Error:  # pragma: no cover
                pass
            self._mem = None
        for name in ("_spool_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)  # closing the lock fd releases the flock
                setattr(self, name, -1)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
