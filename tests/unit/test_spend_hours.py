"""Hourly spend totals: a recount through them equals a recount over the rows, wherever the watermark is."""
from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollgate import spend_hours
from tollgate.budgets import Budgets
from tollgate.ledger import Ledger, connect

NOW = datetime(2025, 6, 18, 12, 0, tzinfo=UTC)
T = NOW.timestamp()


def budgets(tz="UTC", reset="monthly"):
    return Budgets.from_policy({
        "timezone": tz,
        "tiers": [{"name": "team", "limit_usd": 100, "reset": reset, "shared_users": ["u1", "u2"]}],
        "global": {"limit_usd": 1000, "reset": reset},
        "per_user": {"limit_usd": 50, "reset": reset},
    }, now=T)


def spent(b):
    return {s["id"]: s["spent"] for s in b.status(T)}


def insert(con, rows):
    """One statement (executemany costs ~2 ms a row)."""
    cols = list(zip(*rows))
    con.execute("INSERT INTO requests (request_id, ts, user_id, tier, cost_usd) SELECT unnest(?), unnest(?),"
                " unnest(?), unnest(?), unnest(?::DECIMAL(18,9)[])",
                [list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), [str(c) if c is not None else None for c in cols[4]]])


def advance_fully(con, now=T):
    """What the writer does, run on a plain connection: every step until the watermark is as far as it goes."""
    cat = con.execute("SELECT current_database()").fetchone()[0]
    con.execute("BEGIN")
    while True:
        sql, params = spend_hours.next_row_sql(cat, spend_hours.until(con))
        step = spend_hours.advance_sql(cat, spend_hours.until(con), con.execute(sql, params).fetchone()[0], now)
        if step is None:
            break
        for sql, params in step[0]:
            con.execute(sql, params)
    con.execute("COMMIT")


def random_rows(rng, n, days=40):
    rows = []
    for i in range(n):
        ts = NOW - timedelta(seconds=rng.uniform(0, days * 86400)) + timedelta(seconds=rng.uniform(-60, 0))
        user = rng.choice(["u1", "u2", "bob", "carol", None])
        tier = "team" if user in ("u1", "u2") and rng.random() < 0.8 else rng.choice([None, "gone"])
        cost = None if rng.random() < 0.1 else D(rng.randint(0, 10**6)) / D(10**6)
        rows.append((f"r{i}", ts, user, tier, cost))
    return rows


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns", "Pacific/Kiritimati"])
@pytest.mark.parametrize("reset", ["daily", "weekly", "monthly", "never"])
def test_recount_through_the_totals_equals_the_rows(tmp_path, tz, reset):
    rng = random.Random(f"{tz}{reset}")
    con = connect(str(tmp_path / "l.duckdb"))
    insert(con, random_rows(rng, 3000))
    raw = budgets(tz, reset)
    raw.load_spend(con, now=T)  # no watermark yet: all from the rows
    advance_fully(con)
    assert spend_hours.until(con) == spend_hours.floor_hour(T - spend_hours.LAG)
    assert con.execute("SELECT count(*) FROM spend_hours").fetchone()[0] > 0
    summed = budgets(tz, reset)
    summed.load_spend(con, now=T)
    assert spent(summed) == spent(raw)
    assert spent(raw)  # something was counted at all


def test_late_rows_are_added_by_the_landing(tmp_path):
    """A row that lands below the watermark (a replayed spool) is added to the totals by its landing."""
    db = str(tmp_path / "l.duckdb")
    con = connect(db)
    insert(con, [("old", NOW - timedelta(days=1), "bob", None, D(2))])
    advance_fully(con, now=T + 86400)  # the watermark past every row
    con.close()
    led = Ledger(db, flush_interval=0.02)
    led.start()
    try:
        led.record({"request_id": "late", "ts": NOW - timedelta(hours=5), "user_id": "bob", "cost_usd": D(3)})
        led.record({"request_id": "late2", "ts": NOW - timedelta(hours=5), "user_id": "bob", "cost_usd": D(1)})
        assert led.flush()
    finally:
        led.stop()
    con = connect(db, read_only=True)
    assert con.execute("SELECT sum(cost_usd) FROM spend_hours").fetchone()[0] == D(6)
    b = budgets()
    b.load_spend(con, now=T)
    assert spent(b)["user:bob"] == D(6)


def test_the_writer_moves_the_watermark(tmp_path):
    db = str(tmp_path / "l.duckdb")
    con = connect(db)
    insert(con, [(f"r{i}", datetime.now(UTC) - timedelta(days=3, hours=i), "bob", None, D(1)) for i in range(48)])
    con.close()
    led = Ledger(db, flush_interval=0.02)
    led.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with connect(db, read_only=True, wait=5) as c:
                wm = spend_hours.until(c)
            if wm is not None and wm >= spend_hours.floor_hour(time.time() - spend_hours.LAG):
                break
            time.sleep(0.1)
    finally:
        led.stop()
    con = connect(db, read_only=True)
    assert con.execute("SELECT sum(requests), sum(cost_usd) FROM spend_hours").fetchone() == (48, D(48))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 200) | st.none(), upper=st.integers(1, 300), wm=st.integers(0, 300) | st.none())
def test_source_partitions_the_window(tmp_path_factory, start, upper, wm):
    """Any window and watermark: the totals' hours and the two raw ranges cover [start, upper) once."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    q = timedelta(minutes=20)  # windows on 20-minute marks, so not on the hour
    s = base + start * q if start is not None else None
    u = base + upper * q
    w = spend_hours.floor_hour((base + wm * q).timestamp()) if wm is not None else None
    if s is not None and s >= u:
        return
    con = connect(str(tmp_path_factory.mktemp("p") / "l.duckdb"))
    rows = [(f"r{i}", base + i * timedelta(minutes=7), "bob", None, D(1)) for i in range(130)]
    insert(con, rows)
    if w is not None:
        con.execute("INSERT INTO spend_hours SELECT to_timestamp((epoch_us(ts) // 3600000000) * 3600), tier, user_id,"
                    " count(*), sum(cost_usd) FROM requests WHERE ts < ? GROUP BY ALL", [w])
    sql, params = spend_hours.source(s, u, w)
    got = con.execute(f"SELECT coalesce(sum(cost_usd), 0) FROM {sql}", params).fetchone()[0]
    want = sum(1 for r in rows if (s is None or r[1] >= s) and r[1] < u)
    assert got == want
