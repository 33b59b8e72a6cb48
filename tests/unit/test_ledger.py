"""The ledger writer against real DuckDB files, with other processes holding the file."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import duckdb
import pytest

from tollgate import keys as vkeys
from tollgate.ledger import (
    COLUMNS,
    REQUEST_SCHEMA,
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    LedgerLocked,
    connect,
    ensure_schema,
    is_lock_error,
    row_to_json,
)

DESIGN_COLUMNS = (
    "request_id ts provider endpoint model response_model key_id user_id tier metadata status_code outcome"
    " stream input_tokens cached_input_tokens cache_write_tokens output_tokens reasoning_tokens token_source"
    " cost_usd latency_ms ttft_ms"
).split()

# A helper process that opens the file (read-only or read-write) and keeps it open until its stdin closes.
_HOLD = """
import duckdb, sys
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
print("held", flush=True)
sys.stdin.readline()
con.close()
"""


@contextmanager
def held(path: str, mode: str = "ro"):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, path, mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.stdin.close()
        p.wait(10)


def make_row(i: int = 0, **kw) -> dict:
    row = {
        "request_id": uuid.uuid4().hex,
        "ts": datetime.now(UTC),
        "provider": "openai",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "response_model": "gpt-4o-mini-2024-07-18",
        "key_id": "vk_0123456789",
        "user_id": f"user{i % 3}",
        "tier": None,
        "metadata": {"project": "apollo"},
        "status_code": 200,
        "outcome": "ok",
        "stream": bool(i % 2),
        "input_tokens": 100 + i,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 10 + i,
        "reasoning_tokens": 0,
        "token_source": "provider",
        "cost_usd": Decimal("0.000123456") * (i + 1),
        "latency_ms": 12.5,
        "ttft_ms": 3.25,
    }
    row.update(kw)
    return row


def count(path: str, sql: str = "SELECT count(*), count(DISTINCT request_id) FROM requests"):
    con = connect(path, read_only=True)
    try:
        return con.execute(sql).fetchone()
    finally:
        con.close()


def wait_until(pred, timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "usage.duckdb")


@pytest.fixture
def ledger(db):
    led = Ledger(db, flush_interval=0.05, keys_poll=0.1)
    led.start()
    yield led
    led.stop()


# --- schema -----------------------------------------------------------------------------------------------


def test_columns_are_designs():
    assert list(COLUMNS) == DESIGN_COLUMNS


def test_schema_types_views_and_version(ledger, db):
    con = connect(db, read_only=True)
    try:
        types = dict(con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'requests'"
            " ORDER BY ordinal_position").fetchall())
        assert list(types) == DESIGN_COLUMNS
        assert types["ts"] == "TIMESTAMP WITH TIME ZONE"
        assert types["cost_usd"] == "DECIMAL(18,9)"
        assert types["metadata"] == "JSON"
        assert types["stream"] == "BOOLEAN"
        assert types["input_tokens"] == "BIGINT"
        assert types["latency_ms"] == "DOUBLE"
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert {"spend_by_user", "spend_by_model", "spend_by_day", "spend_by_key"} <= views
        assert con.execute("SELECT value FROM tollgate_meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),)
        assert con.execute("SELECT count(*) FROM keys").fetchone() == (0,)
    finally:
        con.close()


def test_ensure_schema_is_idempotent_and_refuses_newer(db):
    con = connect(db)
    ensure_schema(con)
    ensure_schema(con)
    con.execute("UPDATE tollgate_meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="newer tollgate"):
        ensure_schema(con)
    con.close()


def test_files_are_private(ledger, db):
    ledger.record(make_row())
    assert ledger.flush()
    for path in (db, ledger.spool_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_memory_path_is_refused():
    with pytest.raises(ValueError):
        Ledger(":memory:")


# --- rows ---------------------------------------------------------------------------------------------------


def test_rows_land_with_exact_values(ledger, db):
    ts = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    row = make_row(1, ts=ts, cost_usd=Decimal("123456789.123456789"), metadata={"project": "ä", "n": "1"})
    ledger.record(row)
    assert ledger.flush()
    con = connect(db, read_only=True)
    got = dict(zip(COLUMNS, con.execute("SELECT * FROM requests").fetchone(), strict=True))
    con.close()
    assert got["ts"] == ts  # same instant, stored as UTC
    assert got["ts"].astimezone(UTC).hour == 1
    assert got["cost_usd"] == Decimal("123456789.123456789")
    assert json.loads(got["metadata"]) == {"project": "ä", "n": "1"}
    assert got["stream"] is True
    for name in ("request_id", "provider", "endpoint", "model", "response_model", "key_id", "user_id",
                 "status_code", "outcome", "input_tokens", "output_tokens", "token_source", "latency_ms",
                 "ttft_ms"):
        assert got[name] == row[name], name
    assert got["tier"] is None


def test_views_sum_rows(ledger, db):
    for i in range(6):
        ledger.record(make_row(i, cost_usd=Decimal("0.5"), input_tokens=10, output_tokens=1))
    ledger.record(make_row(9, user_id="user0", cost_usd=None, input_tokens=5, output_tokens=0))
    assert ledger.flush()
    con = connect(db, read_only=True)
    users = {r[0]: r[1:] for r in con.execute(
        "SELECT user_id, requests, input_tokens, output_tokens, cost_usd FROM spend_by_user").fetchall()}
    assert users["user0"] == (3, 25, 2, Decimal("1.0"))
    assert users["user1"] == (2, 20, 2, Decimal("1.0"))
    (day,) = con.execute("SELECT day, requests, cost_usd FROM spend_by_day").fetchall()
    assert day[1:] == (7, Decimal("3.0"))
    assert con.execute("SELECT requests FROM spend_by_model").fetchall() == [(7,)]
    con.close()


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("cost_usd", Decimal("0.000150000"), "0.000150000"),
        ("cost_usd", Decimal("1E-7"), "0.0000001"),
        ("cost_usd", 0.1, "0.1"),
        ("cost_usd", "0.25", "0.25"),
        ("cost_usd", None, None),
        ("cost_usd", Decimal("NaN"), None),
        ("cost_usd", Decimal("1e12"), None),  # does not fit DECIMAL(18,9): NULL, not a poisoned spool
        ("input_tokens", 12, 12),
        ("input_tokens", 12.0, 12),
        ("input_tokens", "12", 12),
        ("input_tokens", "many", None),
        ("input_tokens", float("inf"), None),
        ("input_tokens", 2**63, None),  # beyond BIGINT: DuckDB would refuse the whole spool over it
        ("input_tokens", -(2**63), -(2**63)),
        ("status_code", 2**31, None),  # beyond INTEGER
        ("stream", True, True),
        ("stream", 1, True),
        ("stream", "false", False),
        ("stream", "maybe", None),
        ("latency_ms", 5, 5),
        ("latency_ms", "1.5", 1.5),
        ("latency_ms", float("nan"), None),
        ("latency_ms", 10**400, None),
        ("status_code", 429, 429),
        ("metadata", {"a": "b"}, {"a": "b"}),
        ("metadata", '{"a": "b"}', {"a": "b"}),
        ("metadata", None, None),
        ("ts", datetime(2025, 1, 1, 12), "2025-01-01T12:00:00+00:00"),  # naive: UTC by convention
        ("ts", "2025-01-01T12:00:00Z", "2025-01-01T12:00:00+00:00"),
        ("ts", "2025-01-01T14:00:00+02:00", "2025-01-01T12:00:00+00:00"),
        ("ts", 0, "1970-01-01T00:00:00+00:00"),
        ("model", 42, "42"),
    ],
)
def test_row_to_json_coerces(field, value, stored):
    out = json.loads(row_to_json(make_row(**{field: value})))
    assert out[field] == stored
    assert list(out) == list(COLUMNS)


def test_row_to_json_fills_id_and_ts_and_ignores_extras(caplog):
    out = json.loads(row_to_json({"model": "m", "not_a_column_xyz": 1}))
    assert out["request_id"] and out["ts"]
    assert "not_a_column_xyz" not in out
    assert "not_a_column_xyz" in caplog.text


def test_record_is_cheap(db):
    led = Ledger(db, flush_interval=10)  # the thread stays asleep: we time record() alone
    led.start()
    try:
        rows = [make_row(i) for i in range(20000)]
        t = time.perf_counter()
        for r in rows:
            led.record(r)
        per_row = (time.perf_counter() - t) / len(rows)
        assert per_row < 20e-6, per_row
        assert led.pending == 20000
        assert led.flush(30)
        assert led.pending == 0
        assert count(db) == (20000, 20000)
    finally:
        led.stop()


def test_throughput(db, capsys):
    """Rows from record() to committed in DuckDB; the gateway needs far less, but this guards the insert path."""
    led = Ledger(db, flush_interval=0.05)
    led.start()
    rows = [make_row(i) for i in range(30000)]
    t = time.perf_counter()
    for r in rows:
        led.record(r)
    assert led.flush(60)
    rate = len(rows) / (time.perf_counter() - t)
    led.stop()
    with capsys.disabled():
        print(f"\n[ledger] {rate:,.0f} rows/s record->committed; lock held {led.stats['write_seconds']*1e3:.0f} ms"
              f" in {led.stats['batches']} batch(es)")
    assert rate > 5000
    assert count(db) == (30000, 30000)


def test_duplicate_request_ids_in_one_batch_land_once(ledger, db):
    row = make_row()
    ledger.record(row)
    ledger.record(dict(row))
    assert ledger.flush()
    assert count(db) == (1, 1)


def test_non_dict_rows_are_dropped_not_fatal(ledger, db, caplog):
    ledger.record("nonsense")  # type: ignore[arg-type]
    ledger.record(make_row())
    assert ledger.flush()
    assert count(db) == (1, 1)
    assert ledger.pending == 0


# --- other processes holding the file ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_rows_wait_while_another_process_holds_the_file(ledger, db, mode):
    with held(db, mode):
        for i in range(50):
            ledger.record(make_row(i))
        assert not ledger.flush(timeout=0.6)
        assert ledger.pending == 50
        assert ledger.healthy()  # merely locked
        with open(ledger.spool_path) as f:  # durable meanwhile
            assert sum(1 for _ in f) == 50
    assert ledger.flush(timeout=10)
    assert ledger.pending == 0
    assert count(db) == (50, 50)
    assert os.path.getsize(ledger.spool_path) == 0


def test_reader_in_a_loop_sees_no_errors_and_all_rows(ledger, db):
    reader = subprocess.Popen([sys.executable, "-c", """
import duckdb, sys, time, json
from tollgate.ledger import connect
errors, reads, last = 0, 0, 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        con = connect(sys.argv[1], read_only=True, wait=5)
        last = con.execute("SELECT count(*) FROM requests").fetchone()[0]
        con.close()
        reads += 1
    except Exception as e:
        errors += 1
        print(repr(e), file=sys.stderr)
print(json.dumps({"errors": errors, "reads": reads, "last": last}))
""", db, "2.0"], stdout=subprocess.PIPE, text=True)
    for i in range(400):
        ledger.record(make_row(i))
        time.sleep(0.004)
    out, _ = reader.communicate(timeout=30)
    result = json.loads(out)
    assert result["errors"] == 0
    assert result["reads"] > 10
    assert ledger.flush(10)
    assert count(db) == (400, 400)


def test_stop_flushes(db):
    led = Ledger(db, flush_interval=5)  # long interval: only stop() can get the rows in
    led.start()
    for i in range(100):
        led.record(make_row(i))
    led.stop()
    assert count(db) == (100, 100)


def test_stop_while_locked_keeps_rows_in_spool_for_next_start(db, caplog):
    led = Ledger(db, flush_interval=0.05)
    led.start()
    with held(db, "ro"):
        for i in range(20):
            led.record(make_row(i))
        with caplog.at_level(logging.WARNING, "tollgate.ledger"):
            led.stop(timeout=0.5)
        assert led.pending == 20
        assert "land on the next start" in caplog.text
    again = Ledger(db, flush_interval=0.05)
    again.start()  # replays synchronously when the file is free
    try:
        assert again.pending == 0
        assert count(db) == (20, 20)
    finally:
        again.stop()


_CRASH = """
import os, sys, time, uuid
from datetime import datetime, UTC
from tollgate.ledger import Ledger
led = Ledger(sys.argv[1], flush_interval=0.02)
led.start()
print("started", flush=True)
sys.stdin.readline()  # the test now holds the file
n = int(sys.argv[2])
for i in range(n):
    led.record({"request_id": f"crash-{i}", "ts": datetime.now(UTC), "model": "m", "input_tokens": i})
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    with open(led.spool_path) as f:
        if sum(1 for _ in f) >= n:
            break
    time.sleep(0.01)
os._exit(0)  # a crash: no stop(), no flush
"""


def test_spool_replay_after_a_crash(db):
    crash = subprocess.Popen([sys.executable, "-c", _CRASH, db, "30"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert crash.stdout.readline().strip() == "started"
    with held(db, "ro"):
        crash.stdin.write("go\n")
        crash.stdin.flush()
        assert crash.wait(20) == 0
    assert count(db) == (0, 0)
    led = Ledger(db, flush_interval=0.05)
    led.start()
    led.stop()
    assert count(db) == (30, 30)
    assert count(db, "SELECT sum(input_tokens) FROM requests") == (sum(range(30)),)


def test_replay_does_not_duplicate_rows_already_in_the_db(db, caplog):
    """A crash between commit and spool truncation: the spool repeats rows the file already has."""
    led = Ledger(db, flush_interval=0.05)
    led.start()
    rows = [make_row(i) for i in range(10)]
    for r in rows:
        led.record(r)
    led.stop()
    extra = make_row(99)
    with open(db + ".spool", "w") as f:
        for r in rows + [extra]:
            f.write(row_to_json(r) + "\n")
        f.write('{"request_id": "torn", "ts": "2025-01')  # the interrupted last write
    again = Ledger(db, flush_interval=0.05)
    with caplog.at_level(logging.WARNING, "tollgate.ledger"):
        again.start()
    again.stop()
    assert count(db) == (11, 11)
    assert "torn" in caplog.text


def test_orphan_spool_of_a_dead_gateway_is_adopted(db):
    orphan = db + ".spool.4242"
    with open(orphan, "w") as f:
        for i in range(5):
            f.write(row_to_json(make_row(i)) + "\n")
    led = Ledger(db, flush_interval=0.05)
    led.start()
    led.stop()
    assert count(db) == (5, 5)
    assert not os.path.exists(orphan)


def test_two_ledgers_on_one_file(db):
    """Two writers on one file (in one process here): separate spools, file-level exclusion, no loss."""
    a = Ledger(db, flush_interval=0.02)
    b = Ledger(db, flush_interval=0.02)
    a.start()
    b.start()
    assert a.spool_path != b.spool_path
    for i in range(300):
        (a if i % 2 else b).record(make_row(i))
    assert a.flush(10) and b.flush(10)
    a.stop()
    b.stop()
    assert count(db) == (300, 300)


def test_unusable_file_makes_it_unhealthy_then_recovers(db, caplog):
    with open(db, "w") as f:
        f.write("this is not a duckdb file")
    led = Ledger(db, flush_interval=0.05)
    with caplog.at_level(logging.ERROR, "tollgate.ledger"):
        led.start()
    try:
        led.record(make_row())
        assert not led.flush(0.5)
        assert not led.healthy()
        assert led._thread is not None and led._thread.is_alive()
        os.unlink(db)  # the operator fixes it
        assert led.flush(10)
        assert led.healthy()
        assert count(db) == (1, 1)
    finally:
        led.stop()


# --- keys -----------------------------------------------------------------------------------------------------

_CREATE_KEY = """
import sys, json
from tollgate.ledger import connect
from tollgate import keys
con = connect(sys.argv[1])
if sys.argv[2] == "create":
    key, rec = keys.create_key(con, "alice", None, {})
    print(json.dumps({"key": key, "key_id": rec.key_id}))
else:
    print(keys.revoke_key(con, sys.argv[3]))
con.close()
"""


def test_keys_from_another_process_reach_the_gateway_within_2s(db):
    seen: list[dict] = []
    changed = threading.Event()

    def on_keys(d):
        seen.append(d)
        changed.set()

    led = Ledger(db, on_keys=on_keys)  # default intervals, as the gateway uses them
    led.start()
    try:
        assert seen == [{}]  # loaded synchronously in start()
        changed.clear()
        out = subprocess.run([sys.executable, "-c", _CREATE_KEY, db, "create"], capture_output=True, text=True,
                             check=True).stdout
        t0 = time.monotonic()
        made = json.loads(out)
        assert changed.wait(2.0), "new key not seen within 2 s"
        assert time.monotonic() - t0 < 2.0
        rec = seen[-1][vkeys.hash_key(made["key"])]
        assert rec.active(datetime.now(UTC))
        # while rows flow too
        changed.clear()
        for i in range(20):
            led.record(make_row(i))
        subprocess.run([sys.executable, "-c", _CREATE_KEY, db, "revoke", made["key_id"]], check=True,
                       capture_output=True)
        t0 = time.monotonic()
        assert wait_until(lambda: seen[-1][vkeys.hash_key(made["key"])].revoked_at is not None, 2.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        led.stop()


def test_keys_callback_only_on_change(db):
    calls: list[dict] = []
    led = Ledger(db, flush_interval=0.02, keys_poll=0.05, on_keys=calls.append)
    led.start()
    try:
        for i in range(50):
            led.record(make_row(i))
        assert led.flush()
        time.sleep(0.3)
        assert len(calls) == 1
    finally:
        led.stop()


def test_existing_keys_are_known_at_start(db):
    con = connect(db)
    key, _ = vkeys.create_key(con, "bob", None, {})
    con.close()
    got: list[dict] = []
    led = Ledger(db, on_keys=got.append)
    led.start()
    led.stop()
    assert vkeys.hash_key(key) in got[0]


def test_keys_load_while_only_readers_hold_the_file(db):
    con = connect(db)
    key, _ = vkeys.create_key(con, "bob", None, {})
    con.close()
    got: list[dict] = []
    with held(db, "ro"):
        led = Ledger(db, on_keys=got.append)
        led.START_WAIT = 0.2
        led.start()  # cannot write, but a read-only attach gets the keys
        assert got and vkeys.hash_key(key) in got[0]
        led.stop(timeout=0.2)


def test_failing_callback_does_not_stop_the_writer(db, caplog):
    def boom(_):
        raise RuntimeError("gateway bug")

    led = Ledger(db, flush_interval=0.02, on_keys=boom)
    led.start()
    try:
        con = connect(db)
        vkeys.create_key(con, "x", None, {})
        con.close()
        led.record(make_row())
        assert led.flush()
        assert wait_until(lambda: caplog.text.count("on_keys callback failed") >= 2)
        led.record(make_row())
        assert led.flush()
        assert count(db) == (2, 2)
    finally:
        led.stop()


# --- connect() -------------------------------------------------------------------------------------------------


def test_connect_waits_then_names_the_file_and_holder(db):
    connect(db).close()
    with held(db, "rw") as p:
        t = time.monotonic()
        with pytest.raises(LedgerLocked) as err:
            connect(db, wait=0.4)
        assert time.monotonic() - t >= 0.4
        assert db in str(err.value)
        assert f"PID {p.pid}" in str(err.value)


def test_connect_rides_over_a_short_lock(db):
    connect(db).close()
    p = subprocess.Popen([sys.executable, "-c", _HOLD, db, "rw"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    threading.Timer(0.5, p.stdin.close).start()
    con = connect(db, wait=5)
    con.close()
    p.wait(5)


def test_connect_read_only_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        connect(str(tmp_path / "nope.duckdb"), read_only=True)


def test_is_lock_error_in_process(db):
    mem = duckdb.connect()
    mem.execute(f"ATTACH '{db}' AS x")
    try:
        with pytest.raises(duckdb.Error) as err:
            duckdb.connect(db)
        assert is_lock_error(err.value)
    finally:
        mem.close()
    assert not is_lock_error(duckdb.IOException("Could not read block 12"))


def test_row_to_json_never_writes_invalid_json():
    loop: dict = {}
    loop["self"] = loop
    for meta, expected in [({"x": float("nan")}, {"x": None}), (loop, None), ({"d": datetime(2025, 1, 1)},
                                                                               {"d": "2025-01-01 00:00:00"})]:
        line = row_to_json(make_row(metadata=meta))
        assert json.loads(line, parse_constant=lambda c: pytest.fail(c))["metadata"] == expected


def test_a_long_lock_costs_no_work_per_retry(ledger, db, monkeypatch):
    """While another process holds the file, retries neither parse nor re-copy the waiting backlog."""
    monkeypatch.setattr(ledger, "LAND_BYTES", 4000)  # ~7 rows a chunk: the backlog needs a copy of its head
    copies: list[tuple] = []
    original = ledger._next_chunk

    def spy():
        before = ledger._chunk_at
        got = original()
        if ledger._chunk_at != before:
            copies.append(ledger._chunk_at)
        return got

    monkeypatch.setattr(ledger, "_next_chunk", spy)
    inserts: list[str] = []
    with held(db, "ro"):
        mem = ledger._mem
        monkeypatch.setattr(ledger, "_mem", _Spy(mem, lambda sql: sql.startswith("INSERT") and inserts.append(sql)))
        for i in range(15):
            ledger.record(make_row(i))
            time.sleep(0.06)
        assert wait_until(lambda: ledger.stats["lock_waits"] >= 4, timeout=5)
        assert len(copies) <= 1  # the head of the backlog, once
        assert not inserts
    monkeypatch.setattr(ledger, "_mem", mem)
    assert ledger.flush(10)
    assert count(db) == (15, 15)


class _Spy:
    """A DuckDB connection stand-in that reports each statement, then runs it."""

    def __init__(self, con, seen):
        self._con, self._seen = con, seen

    def execute(self, sql, *args):
        self._seen(sql)
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_a_backlog_larger_than_a_chunk_lands_in_pieces(db, monkeypatch):
    """A backlog bigger than what DuckDB's memory cap lets one landing parse goes in chunks, none lost."""
    monkeypatch.setattr(Ledger, "LAND_BYTES", 20_000)  # ~35 rows a chunk
    led = Ledger(db, flush_interval=0.02)
    led.start()
    try:
        with held(db, "ro"):
            for i in range(500):
                led.record(make_row(i))
            assert not led.flush(timeout=0.3)
        assert led.flush(30)
        assert count(db) == (500, 500)
        assert led.stats["batches"] >= 500 // 40
        assert os.path.getsize(led.spool_path) == 0
        assert not os.path.exists(led.spool_path + ".chunk")
    finally:
        led.stop()


def test_a_crash_after_some_chunks_replays_without_duplicates(db, monkeypatch):
    """Chunks landed, the spool not yet truncated (it is, only once all of it is in): the replay adds none twice."""
    monkeypatch.setattr(Ledger, "LAND_BYTES", 20_000)
    rows = [make_row(i) for i in range(200)]
    led = Ledger(db, flush_interval=0.02)
    led.start()
    led.stop()
    with open(db + ".spool", "w") as f:
        for r in rows:
            f.write(row_to_json(r) + "\n")
    con = connect(db)
    con.execute(f"INSERT INTO requests SELECT * FROM read_json('{db}.spool', format='newline_delimited',"
                " columns={" + ", ".join(f"'{n}': '{t}'" for n, t in REQUEST_SCHEMA) + "}) LIMIT 120")
    con.close()
    again = Ledger(db, flush_interval=0.02)
    again.start()
    try:
        assert again.flush(20)
    finally:
        again.stop()
    assert count(db) == (200, 200)


def test_a_repeated_request_id_lands_once_across_spool_rounds_and_landings(db):
    led = Ledger(db, flush_interval=0.02, land_interval=0.5)
    led.start()
    try:
        row = make_row()
        led.record(row)
        time.sleep(0.1)  # spooled, not landed yet
        led.record(dict(row))
        assert led.flush()
        led.record(dict(row))  # after it landed: the insert's anti-join
        assert led.flush()
        assert led.pending == 0
    finally:
        led.stop()
    assert count(db) == (1, 1)


def test_chunks_shrink_when_duckdb_runs_out_of_memory(ledger, db, monkeypatch, caplog):
    """Rows far larger than usual: a chunk DuckDB cannot hold is split until it fits, none lost."""
    mem = ledger._mem

    def seen(sql):
        if sql.startswith("INSERT") and ledger._next_chunk()[2] > 3000:
            raise duckdb.OutOfMemoryException("Out of Memory Error: could not allocate block (test)")

    with held(db, "ro"):  # let a backlog build up first
        for i in range(40):
            ledger.record(make_row(i))
        assert not ledger.flush(0.3)
    monkeypatch.setattr(ledger, "_mem", _Spy(mem, seen))
    with caplog.at_level(logging.WARNING, "tollgate.ledger"):
        assert ledger.flush(20)
    assert count(db) == (40, 40)
    assert "trying smaller ones" in caplog.text
    assert ledger._halvings == 0  # back to full chunks once the backlog is in


def test_past_the_tracked_ids_duplicates_are_dropped_in_sql(db, monkeypatch):
    monkeypatch.setattr(Ledger, "TRACK_IDS", 10)
    led = Ledger(db, flush_interval=10)  # asleep until flush(): one batch
    led.start()
    statements: list[str] = []
    monkeypatch.setattr(led, "_mem", _Spy(led._mem, statements.append))
    try:
        rows = [make_row(i) for i in range(100)]  # the set gives up after the batch's first slice
        for r in rows + [dict(rows[0]), dict(rows[99])]:
            led.record(r)
        assert led.flush()
        assert led.pending == 0
        assert any("QUALIFY" in sql for sql in statements)
    finally:
        led.stop()
    assert count(db) == (100, 100)


def test_a_value_out_of_range_is_null_and_blocks_nothing(ledger, db):
    ledger.record(make_row(1, input_tokens=2**70, status_code=2**40, latency_ms=10**400))
    ledger.record(make_row(2))
    assert ledger.flush()
    assert count(db, "SELECT count(*), count(input_tokens), count(status_code), count(latency_ms) FROM requests") \
        == (2, 1, 1, 1)


def test_a_spool_duckdb_refuses_is_repaired_by_the_slow_path(ledger, db, monkeypatch, caplog):
    """The safety net under the fast path: if a line it wrote were refused, the slow path rewrites the spool."""
    import tollgate.ledger as ledger_module

    real = ledger_module._fast_line

    def wrong(row):  # a fast path with a bug: a str where a BIGINT belongs
        got = real(row)
        return got and (got[0].replace(b'"input_tokens":100', b'"input_tokens":"many"'), got[1])

    monkeypatch.setattr(ledger_module, "_fast_line", wrong)
    with caplog.at_level(logging.ERROR, "tollgate.ledger"):
        ledger.record(make_row(0))
        ledger.record(make_row(1))
        assert ledger.flush(10)
    assert "rewriting it" in caplog.text
    # Both rows land; the value the faulty line held ("many") becomes NULL, as the slow path stores it.
    assert count(db, "SELECT count(*), count(input_tokens) FROM requests") == (2, 1)
    assert ledger.healthy()


def test_float_epoch_ts_lands_as_that_instant(ledger, db):
    ledger.record(make_row(ts=1_750_000_000.25))
    assert ledger.flush()
    con = connect(db, read_only=True)
    (ts,) = con.execute("SELECT ts FROM requests").fetchone()
    con.close()
    assert ts == datetime.fromtimestamp(1_750_000_000.25, UTC)


def test_writer_cpu_is_counted(ledger):
    for i in range(200):
        ledger.record(make_row(i))
    assert ledger.flush()
    assert ledger.stats["cpu_seconds"] > 0


# --- fast path ------------------------------------------------------------------------------------------------


def _as_stored(line: str) -> dict:
    out = json.loads(line)
    out["ts"] = datetime.fromisoformat(out["ts"])
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ts": 1_750_000_000.5},
        {"ts": datetime(2025, 6, 1, tzinfo=UTC)},
        {"cost_usd": Decimal("1E-7")},
        {"cost_usd": Decimal("-0.5")},
        {"cost_usd": None, "tier": None, "metadata": None, "latency_ms": None, "stream": None},
        {"metadata": {}},
        {"metadata": {"a": 1, "b": 1.5, "c": True, "d": None, "e": "ü"}},
        {"input_tokens": 2**63 - 1, "status_code": -(2**31)},
        {"model": "quote \" backslash \\ newline \n tab \t \x00 \u2028"},
    ],
)
def test_fast_path_writes_what_the_slow_path_writes(kw):
    from tollgate.ledger import _coerced_line, _fast_line

    row = make_row(3, **kw)
    fast = _fast_line(row)
    assert fast is not None, kw
    slow = _coerced_line(row)
    assert fast[1] == slow[1] == row["request_id"]
    assert _as_stored(fast[0].decode()) == _as_stored(slow[0].decode())


@pytest.mark.parametrize(
    "kw",
    [
        {"ts": datetime(2025, 1, 1)},  # naive
        {"ts": datetime(2025, 1, 1, tzinfo=timezone(timedelta(hours=2)))},
        {"ts": "2025-01-01T00:00:00Z"},
        {"ts": float("nan")},
        {"ts": None},
        {"request_id": None},
        {"input_tokens": 2**63},
        {"input_tokens": True},
        {"status_code": 2**31},
        {"latency_ms": float("inf")},
        {"latency_ms": 5},
        {"cost_usd": Decimal("1e9")},
        {"cost_usd": Decimal("NaN")},
        {"cost_usd": 0.1},
        {"metadata": {"nested": {"a": 1}}},
        {"metadata": {1: "int key"}},
        {"metadata": '{"a": 1}'},
        {"model": "lone \ud800 surrogate"},
        {"extra_column": 1},
    ],
)
def test_fast_path_leaves_the_rest_to_the_slow_path(kw):
    from tollgate.ledger import _fast_line

    assert _fast_line(make_row(3, **kw)) is None
    assert json.loads(row_to_json(make_row(3, **kw)))  # which still writes a valid line


def test_rows_in_another_key_order_take_the_slow_path_and_land_the_same():
    from tollgate.ledger import _fast_line

    row = make_row(1)
    shuffled = dict(reversed(list(row.items())))
    assert _fast_line(shuffled) is None
    assert _as_stored(row_to_json(shuffled)) == _as_stored(row_to_json(row))


def _spied(led, monkeypatch) -> list[str]:
    statements: list[str] = []
    monkeypatch.setattr(led, "_mem", _Spy(led._mem, statements.append))
    return statements


def test_a_fresh_chunk_lands_without_the_anti_join(db, monkeypatch):
    """Rows this run recorded and never offered to the database skip the check against the ledger."""
    led = Ledger(db, flush_interval=10)
    led.start()
    statements = _spied(led, monkeypatch)
    try:
        for i in range(20):
            led.record(make_row(i))
        assert led.flush()
    finally:
        led.stop()
    inserts = [s for s in statements if s.startswith("INSERT INTO tg_ledger.requests")]
    assert inserts and not any("ANTI JOIN" in s for s in inserts)
    assert count(db) == (20, 20)


def test_a_retry_after_a_failed_landing_checks_the_ledger(db, monkeypatch):
    """An insert that failed may have committed: its chunk is anti-joined on the retry, and lands once."""
    led = Ledger(db, flush_interval=10)
    led.start()
    statements: list[str] = []
    real = led._mem
    failed = []

    class CommitThenFail(_Spy):
        def execute(self, sql, *args):
            statements.append(sql)
            result = self._con.execute(sql, *args)
            if sql.startswith("INSERT") and not failed:
                failed.append(sql)
                raise duckdb.IOException("disk hiccup after commit")
            return result

    monkeypatch.setattr(led, "_mem", CommitThenFail(real, statements.append))
    try:
        rows = [make_row(i) for i in range(5)]
        for r in rows:
            led.record(r)
        assert led.flush(timeout=15)
    finally:
        led.stop()
    inserts = [s for s in statements if s.startswith("INSERT INTO tg_ledger.requests")]
    assert "ANTI JOIN" not in inserts[0] and "ANTI JOIN" in inserts[-1]
    assert count(db) == (5, 5)


def test_a_request_recorded_again_after_its_landing_is_dropped(db, caplog):
    led = Ledger(db, flush_interval=0.05)
    led.start()
    try:
        row = make_row(1)
        led.record(row)
        assert led.flush()
        with caplog.at_level(logging.WARNING, "tollgate.ledger"):
            led.record(dict(row))
            led.record(make_row(2))
            assert led.flush()
    finally:
        led.stop()
    assert count(db) == (2, 2)
    assert "repeated the request_id" in caplog.text


# --- at size ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_writer_lands_across_many_row_group_boundaries(tmp_path, caplog):
    """500,000 rows in small landings onto a ledger laid out the old way (122,880-row groups, the second one
    600 rows short): every landing lands, across the old boundary and thirty of the writer's own."""
    db = str(tmp_path / "big.duckdb")
    con = duckdb.connect(db)
    ensure_schema(con)
    con.execute("INSERT INTO requests (request_id, ts, outcome) SELECT printf('old%029x', i), now(), 'ok'"
                " FROM range(245160) t(i)")
    con.close()
    led = Ledger(db, flush_interval=0.01, land_interval=0.01)
    led.start()
    slowest = 0.0
    try:
        with caplog.at_level(logging.WARNING, "tollgate.ledger"):
            for batch in range(500):
                for j in range(1000):
                    led.record(make_row(batch * 1000 + j))
                before = led.stats["write_seconds"]
                assert led.flush(30), f"landing {batch} did not land: {led.problem}"
                slowest = max(slowest, led.stats["write_seconds"] - before)
        assert led.problem is None and led.healthy()
    finally:
        led.stop()
    assert not [r for r in caplog.records if db in r.getMessage() and "fail" in r.getMessage()]
    assert count(db) == (745160, 745160)
    print(f"\n[ledger] 500 landings of 1000 rows across the boundaries: slowest held the file {slowest * 1000:.0f} ms")


def test_a_failed_checkpoint_is_said_once_and_a_fresh_duckdb_lands_it(ledger, db, monkeypatch, caplog):
    """DuckDB's own failure at the old row-group boundary: the insert commits, the DETACH's checkpoint fails
    and invalidates the database. One ERROR line; a fresh DuckDB with twice the memory lands the rows (once)."""
    real = ledger._mem
    failed = []

    def seen(sql):
        if "DETACH" in sql and not failed and ledger._spool_rows:
            failed.append(sql)
            real.execute(sql)  # the detach happens, then its checkpoint "fails"
            raise duckdb.IOException("IO Error: Detached database 'tg_ledger', but CHECKPOINT during DETACH "
                                     "failed. Checkpoint failed: The database has been invalidated. Original "
                                     "error: could not allocate block of size 256.0 KiB\nPossible solutions: ...")

    monkeypatch.setattr(ledger, "_mem", _Spy(real, seen))
    with caplog.at_level(logging.INFO, "tollgate.ledger"):
        for i in range(5):
            ledger.record(make_row(i))
        assert ledger.flush(15)
    assert failed and ledger._memory_mb == 2 * Ledger.MEMORY_MB and ledger.problem is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "retrying with 128 MB" in errors[0].getMessage()
    assert "Possible solutions" not in caplog.text  # one line, not DuckDB's page of advice
    assert "landing again after 1 failed attempt" in caplog.text
    assert count(db) == (5, 5)  # the rows the failed landing had committed are not inserted twice
