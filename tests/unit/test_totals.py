"""Hourly spend totals: a recount through them equals a recount over the rows, wherever the watermark is."""
from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollgate import totals
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
        sql, params = totals.next_row_sql(cat, totals.until(con))
        step = totals.advance_sql(cat, totals.until(con), con.execute(sql, params).fetchone()[0], now)
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


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kathmandu", "America/St_Johns"])  # on the hour, +5:45, -3:30
@pytest.mark.parametrize("reset", ["daily", "weekly", "monthly", "never"])
def test_recount_through_the_totals_equals_the_rows(tmp_path, tz, reset):
    rng = random.Random(f"{tz}{reset}")
    con = connect(str(tmp_path / "l.duckdb"))
    insert(con, random_rows(rng, 3000))
    raw = budgets(tz, reset)
    raw.load_spend(con, now=T)  # no watermark yet: all from the rows
    advance_fully(con)
    assert totals.until(con) == totals.floor_hour(T - totals.LAG)
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
                wm = totals.until(c)
            if wm is not None and wm >= totals.floor_hour(time.time() - totals.LAG):
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
    w = totals.floor_hour((base + wm * q).timestamp()) if wm is not None else None
    if s is not None and s >= u:
        return
    con = connect(str(tmp_path_factory.mktemp("p") / "l.duckdb"))
    rows = [(f"r{i}", base + i * timedelta(minutes=7), "bob", None, D(1)) for i in range(130)]
    insert(con, rows)
    if w is not None:
        con.execute("INSERT INTO spend_hours SELECT to_timestamp((epoch_us(ts) // 3600000000) * 3600), tier, user_id,"
                    " count(*), sum(cost_usd) FROM requests WHERE ts < ? GROUP BY ALL", [w])
    sql, params = totals.source(s, u, w)
    got = con.execute(f"SELECT coalesce(sum(cost_usd), 0) FROM {sql}", params).fetchone()[0]
    want = sum(1 for r in rows if (s is None or r[1] >= s) and r[1] < u)
    assert got == want


@pytest.mark.parametrize("since", [None, datetime(2025, 6, 10, 13, 37, tzinfo=UTC), NOW - timedelta(hours=1)])
@pytest.mark.parametrize("by", ["user", "key", "day"])
def test_usage_and_views_through_the_totals_equal_the_rows(tmp_path, by, since):
    from tollgate.cli import usage_query

    rng = random.Random(f"{by}{since}")
    con = connect(str(tmp_path / "l.duckdb"))
    rows = random_rows(rng, 2000)
    insert(con, rows)
    con.execute("UPDATE requests SET provider = 'openai', model = 'm' || (hash(request_id) % 3),"
                " key_id = 'vk_' || (hash(request_id) % 4), input_tokens = hash(request_id) % 100,"
                " output_tokens = hash(request_id) % 7")
    # (spend_by_key's any_value(user_id) is any of a key's users: a real key has one, these random rows many)
    view_sql = {v: f"SELECT * FROM {v}" for v in ("spend_by_user", "spend_by_model", "spend_by_day")}
    view_sql["spend_by_key"] = "SELECT * EXCLUDE (user_id) FROM spend_by_key"
    views = {v: con.execute(q).fetchall() for v, q in view_sql.items()}
    sql, params = usage_query(by, since, None)
    raw = con.execute(sql, params).fetchall()
    advance_fully(con)
    wm = totals.until(con)
    assert wm is not None and con.execute("SELECT count(*) FROM usage_days").fetchone()[0] > 0
    sql, params = usage_query(by, since, wm)
    assert ("usage_days" in sql) == (since is None or since < wm - timedelta(days=1))
    got = con.execute(sql, params).fetchall()
    if by == "key":  # (any_value(user_id): see above)
        got, raw = [r[:1] + r[2:] for r in got], [r[:1] + r[2:] for r in raw]
    assert got == raw
    for v, want in views.items():
        assert con.execute(view_sql[v]).fetchall() == want, v
