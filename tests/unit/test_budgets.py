"""tollgate.budgets: policy validation, reserve/settle/release, periods, alerts, ledger reload, overshoot bound."""
from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollgate.budgets import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    Alert,
    BudgetPolicyError,
    Budgets,
    Refusal,
    Reservation,
    period_bounds,
)
from tollgate.ledger import connect

NOW = datetime(2025, 6, 18, 12, 0, tzinfo=UTC)  # a Wednesday
T = NOW.timestamp()

BRIEF = {  # the product brief's budgeting section, as it stands
    "tiers": [{"name": "team-basic", "monthly_limit_usd": 100, "reset": "monthly", "mode": "enforce",
               "shared_users": ["user1", "user2"]}],
    "costs": {"openai:gpt-4o-mini": {"input_token": 0.00015, "output_token": 0.0006}},
}


def make(tiers=None, glob=None, per_user=None, alerts=None, now=T, **extra) -> Budgets:
    b = dict(extra)
    if tiers is not None:
        b["tiers"] = tiers
    if glob is not None:
        b["global"] = glob
    if per_user is not None:
        b["per_user"] = per_user
    return Budgets.from_policy(b, alerts, now=now)


def pool(limit, mode="enforce", alert_at=None, users=("u1", "u2"), name="team", reset="monthly", **kw):
    t = {"name": name, "limit_usd": limit, "reset": reset, "mode": mode, "shared_users": list(users), **kw}
    if alert_at is not None:
        t["alert_at"] = alert_at
    return t


# --- policy ------------------------------------------------------------------------------------------------


def test_brief_example_is_accepted():
    b = Budgets.from_policy(BRIEF, None, now=T)
    (tier,) = b.tiers.values()
    assert tier.name == "team-basic" and tier.shared_users == ("user1", "user2")
    assert tier.budget.limit == D(100) and tier.budget.reset == "monthly" and tier.budget.mode == "enforce"
    assert tier.budget.alert_at == ()
    assert b.webhook is None and b.global_budget is None and b.default_max_output_tokens == DEFAULT_MAX_OUTPUT_TOKENS


def test_general_form_and_passthrough():
    rl = {"requests_per_minute": 5, "anything": [1, 2]}
    b = make([{"name": "t", "limit_usd": "12.50", "reset": "weekly", "mode": "track", "alert_at": [0.9, 0.5, 0.9],
               "rate_limits": rl}], glob={"monthly_limit_usd": 1000.1, "alert_at": 0.75},
             per_user={"limit_usd": 10, "reset": "daily"}, alerts={"webhook": "https://hooks.example/x"},
             timezone="Europe/Paris", default_max_output_tokens=1000)
    t = b.tiers["t"]
    assert t.rate_limits is rl  # untouched, for the rate limiter
    assert t.budget.limit == D("12.50") and t.budget.reset == "weekly" and t.budget.mode == "track"
    assert t.budget.alert_at == (D("0.5"), D("0.9"))
    assert b.global_budget.limit == D("1000.1") and b.global_budget.alert_at == (D("0.75"),)
    assert b.per_user_spec.reset == "daily"
    assert b.webhook == "https://hooks.example/x" and b.timezone == ZoneInfo("Europe/Paris")
    assert b.worst_case_output(None) == 1000


def test_tier_without_limit_is_for_rate_limits_only():
    b = make([{"name": "free", "shared_users": ["a"], "rate_limits": {"requests_per_minute": 1}}],
             per_user={"limit_usd": 1})
    assert b.tiers["free"].budget is None
    assert [x.id for x in b.applicable("a", None)] == ["user:a"]  # not pooled: the per-user cap applies


@pytest.mark.parametrize("budgeting, alerts, keypath, words", [
    ({"tiers": [{"name": "t", "monthly_limt_usd": 1}]}, None, "budgeting.tiers[0].monthly_limt_usd",
     "unknown key (known: alert_at, limit_usd, mode, monthly_limit_usd, name, rate_limits, reset, shared_users)"),
    ({"tier": []}, None, "budgeting.tier", "unknown key"),
    ({"tiers": {"name": "t"}}, None, "budgeting.tiers", "must be a list"),
    ({"tiers": ["t"]}, None, "budgeting.tiers[0]", "must be a mapping"),
    ({"tiers": [{"limit_usd": 1}]}, None, "budgeting.tiers[0].name", "needs a name"),
    ({"tiers": [{"name": "t"}, {"name": "t"}]}, None, "budgeting.tiers[1].name", "defined twice"),
    ({"tiers": [pool(1, users=["a", "b"]), pool(1, name="u", users=["c", "b"])]}, None,
     "budgeting.tiers[1].shared_users[1]", "'b' is already in tier 'team'"),
    ({"tiers": [pool(1, users=[None])]}, None, "budgeting.tiers[0].shared_users[0]", "must be a user id"),
    ({"tiers": [{"name": "t", "shared_users": "a"}]}, None, "budgeting.tiers[0].shared_users", "a list"),
    ({"tiers": [{"name": "t", "limit_usd": 1, "monthly_limit_usd": 1}]}, None, "budgeting.tiers[0].limit_usd",
     "not both"),
    ({"tiers": [{"name": "t", "monthly_limit_usd": 1, "reset": "daily"}]}, None, "budgeting.tiers[0].reset",
     "limit_usd with reset: daily"),
    ({"tiers": [{"name": "t", "limit_usd": 1, "reset": "hourly"}]}, None, "budgeting.tiers[0].reset",
     "daily, weekly, monthly, never"),
    ({"tiers": [{"name": "t", "limit_usd": 1, "mode": "warn"}]}, None, "budgeting.tiers[0].mode", "enforce or track"),
    ({"tiers": [{"name": "t", "limit_usd": -1}]}, None, "budgeting.tiers[0].limit_usd", ">= 0"),
    ({"tiers": [{"name": "t", "limit_usd": "lots"}]}, None, "budgeting.tiers[0].limit_usd", "amount in USD"),
    ({"tiers": [{"name": "t", "limit_usd": True}]}, None, "budgeting.tiers[0].limit_usd", "amount in USD"),
    ({"tiers": [{"name": "t", "limit_usd": float("nan")}]}, None, "budgeting.tiers[0].limit_usd", "finite"),
    ({"tiers": [{"name": "t", "limit_usd": 1, "alert_at": [0.5, 80]}]}, None, "budgeting.tiers[0].alert_at[1]",
     "write 0.8"),
    ({"tiers": [{"name": "t", "limit_usd": 1, "alert_at": [0]}]}, None, "budgeting.tiers[0].alert_at[0]", "(0, 1]"),
    ({"tiers": [{"name": "t", "alert_at": [0.5]}]}, None, "budgeting.tiers[0].alert_at", "needs a limit"),
    ({"global": {"reset": "daily"}}, None, "budgeting.global.reset", "needs a limit"),
    ({"global": {}}, None, "budgeting.global.limit_usd", "is required"),
    ({"per_user": {"limit_usd": 1, "shared_users": []}}, None, "budgeting.per_user.shared_users", "unknown key"),
    ({"per_user": 5}, None, "budgeting.per_user", "must be a mapping"),
    ({"timezone": "Mars/Olympus"}, None, "budgeting.timezone", "unknown time zone"),
    ({"default_max_output_tokens": 0}, None, "budgeting.default_max_output_tokens", ">= 1"),
    ({}, {"webhok": "x"}, "alerts.webhok", "unknown key (known: webhook)"),
    ({}, {"webhook": "ftp://secret-token@h/x"}, "alerts.webhook", "http:// or https://"),
    ({}, "https://h", "alerts", "must be a mapping"),
])
def test_bad_policy_names_the_key_path(budgeting, alerts, keypath, words):
    with pytest.raises(BudgetPolicyError) as ei:
        Budgets.from_policy(budgeting, alerts, now=T)
    e = ei.value
    assert isinstance(e, ValueError)
    assert e.keypath == keypath and words in e.problem, str(e)
    assert str(e).startswith(f"{keypath}: ")
    assert "secret-token" not in str(e)


@pytest.mark.parametrize("alerts", [None, {}, {"webhook": None}, {"webhook": ""}])
def test_no_webhook(alerts):
    assert make(alerts=alerts).webhook is None


# --- who pays ----------------------------------------------------------------------------------------------


def test_tier_of_and_applicable():
    b = make([pool(100, users=["u1", "u2"]), {"name": "gold", "limit_usd": 50}], glob={"limit_usd": 1000},
             per_user={"limit_usd": 10})
    assert b.tier_of("u1", None) == "team"
    assert b.tier_of("u1", "gold") == "team"  # shared_users wins over the key's tier
    assert b.tier_of("carol", "gold") == "gold"
    assert b.tier_of("carol", None) is None
    assert [x.id for x in b.applicable("u1", "team")] == ["tier:team", "global"]
    assert [x.id for x in b.applicable("u1", None)] == ["tier:team", "global"]  # resolved even if not passed
    assert [x.id for x in b.applicable("carol", "gold")] == ["tier:gold", "global"]
    assert [x.id for x in b.applicable("carol", None)] == ["user:carol", "global"]
    assert [x.id for x in b.applicable("dave", "no-such-tier")] == ["user:dave", "global"]
    assert b.applicable("u1", "team")[0] is b.applicable("u2", "team")[0]  # one pool
    assert b.applicable("carol", None) is b.applicable("carol", None)  # cached
    assert b.applicable("dave", "x")[0] is b.applicable("dave", None)[0]  # one per-user budget per user
    assert make().applicable("anyone", None) == ()


@pytest.mark.parametrize("asked, expected", [(None, 4096), (0, 4096), (-1, 4096), (1, 1), (100_000, 100_000)])
def test_worst_case_output(asked, expected):
    assert make().worst_case_output(asked) == expected


# --- reserve / settle / release ------------------------------------------------------------------------------


def test_refuses_only_past_the_limit():
    b = make([pool(10)])
    r1 = b.reserve("u1", None, D(6), now=T)
    assert isinstance(r1, Reservation)
    r2 = b.reserve("u2", None, D(4), now=T)  # 6 + 4 == 10: exactly fits
    assert isinstance(r2, Reservation)
    no = b.reserve("u1", None, D("0.000000001"), now=T)
    assert isinstance(no, Refusal)
    assert (no.budget_id, no.scope, no.name) == ("tier:team", "tier", "team")
    assert (no.spent, no.reserved, no.limit) == (0, D(10), D(10))
    assert no.period_end == datetime(2025, 7, 1, tzinfo=UTC)
    assert no.retry_after(T) == int((datetime(2025, 7, 1, tzinfo=UTC) - NOW).total_seconds())
    assert "held by requests in flight" in no.message and "2025-07-01" in no.message
    b.release(r1)
    assert isinstance(b.reserve("u1", None, D(6), now=T), Reservation)


def test_spent_budget_refuses_even_free_requests():
    b = make([pool(1)])
    r = b.reserve("u1", None, D(1), now=T)
    b.settle(r, D(1), now=T)
    no = b.reserve("u1", None, D(0), now=T)
    assert isinstance(no, Refusal) and "budget is spent: $1.00 of $1.00" in no.message
    zero = make([pool(0)])
    assert isinstance(zero.reserve("u1", None, D(0), now=T), Refusal)


def test_most_specific_budget_is_named_and_global_applies_to_all():
    b = make([pool(5)], glob={"limit_usd": 8}, per_user={"limit_usd": 2, "reset": "daily"})
    no = b.reserve("u1", None, D(6), now=T)
    assert isinstance(no, Refusal) and no.budget_id == "tier:team"
    no = b.reserve("bob", None, D(3), now=T)
    assert isinstance(no, Refusal) and no.budget_id == "user:bob" and "user 'bob'" in no.message
    assert no.period_end == datetime(2025, 6, 19, tzinfo=UTC)
    r = b.reserve("u1", None, D(5), now=T)
    b.settle(r, D(5), now=T)
    r = b.reserve("bob", None, D(2), now=T)
    b.settle(r, D(2), now=T)
    no = b.reserve("carol", None, D(2), now=T)  # her own budget is fine, the global one is not
    assert isinstance(no, Refusal) and no.budget_id == "global" and "global budget" in no.message
    assert isinstance(b.reserve("carol", None, D(1), now=T), Reservation)


def test_refusal_holds_nothing():
    b = make([pool(5)], glob={"limit_usd": 100})
    assert isinstance(b.reserve("u1", None, D(6), now=T), Refusal)
    assert all(x.reserved == 0 for x in b.budgets())
    g = make([pool(100)], glob={"limit_usd": 5})
    assert isinstance(g.reserve("u1", None, D(6), now=T), Refusal)  # refused by the 2nd budget: 1st untouched
    assert all(x.reserved == 0 for x in g.budgets())


def test_track_mode_never_refuses_but_reserves_and_alerts():
    b = make([pool(10, mode="track", alert_at=[0.5, 1])])
    rs = [b.reserve("u1", None, D(4), now=T) for _ in range(5)]
    assert all(isinstance(r, Reservation) for r in rs)
    assert b.status(T)[0]["reserved"] == D(20)
    alerts = [a for r in rs for a in b.settle(r, D(4), now=T)]
    assert [(a.fraction, a.spent_usd) for a in alerts] == [(D("0.5"), D(8)), (D(1), D(12))]
    assert b.status(T)[0]["spent"] == D(20) and b.status(T)[0]["pct"] == 200.0


def test_settle_replaces_estimate_and_alerts_once_per_threshold():
    b = make([pool(100, alert_at=[0.8, 0.9, 0.5])], glob={"limit_usd": 1000, "alert_at": [0.05]})
    r = b.reserve("u1", None, D(60), now=T)
    a = b.settle(r, D(45), now=T)
    assert a == [] and b.status(T)[0]["spent"] == D(45) and b.status(T)[0]["reserved"] == 0
    r = b.reserve("u2", None, D(50), now=T)
    a = b.settle(r, D("50.5"), now=T)  # 95.5: crosses 0.5, 0.8 and 0.9 at once; global crosses 0.05
    assert [(x.budget_id, x.fraction) for x in a] == [
        ("tier:team", D("0.5")), ("tier:team", D("0.8")), ("tier:team", D("0.9")), ("global", D("0.05"))]
    assert all(isinstance(x, Alert) for x in a)
    assert a[2].threshold_usd == D(90) and a[2].spent_usd == D("95.5") and a[2].limit_usd == D(100)
    assert a[2].message == ("budget tier 'team' crossed 90% of its limit: $95.50 of $100.00 spent "
                            "(enforce; period ends 2025-07-01T00:00:00+00:00)")
    j = a[2].to_json()
    assert j["budget"] == "team" and j["fraction"] == 0.9 and j["spent_usd"] == "95.5" and j["limit_usd"] == "100"
    r = b.reserve("u1", None, D(1), now=T)
    assert b.settle(r, D(1), now=T) == []  # no threshold twice in a period


def test_settle_none_counts_zero_and_reservations_end_once():
    b = make([pool(10)])
    r = b.reserve("u1", None, D(3), now=T)
    assert b.settle(r, None, now=T) == []
    assert b.settle(r, D(3), now=T) == []  # already settled
    b.release(r)
    (s,) = b.status(T)
    assert s["spent"] == 0 and s["reserved"] == 0
    r = b.reserve("u1", None, D(3), now=T)
    b.release(r)
    b.release(r)
    assert b.settle(r, D(3), now=T) == []
    assert b.status(T)[0]["reserved"] == 0 and b.status(T)[0]["spent"] == 0
    with pytest.raises(ValueError):
        b.reserve("u1", None, D(-1), now=T)


def test_status_rows():
    b = make([pool(100)], glob={"limit_usd": 1000}, per_user={"limit_usd": 10, "reset": "never"})
    b.applicable("zed", None)
    b.applicable("amy", None)
    r = b.reserve("u1", None, D(30), now=T)
    b.settle(r, D(25), now=T)
    b.reserve("u1", None, D(5), now=T)
    rows = b.status(T)
    assert [x["id"] for x in rows] == ["tier:team", "user:amy", "user:zed", "global"]
    t = rows[0]
    assert {k: t[k] for k in ("name", "scope", "mode", "spent", "reserved", "limit", "remaining", "pct")} == {
        "name": "team", "scope": "tier", "mode": "enforce", "spent": D(25), "reserved": D(5), "limit": D(100),
        "remaining": D(70), "pct": 25.0}
    assert (t["period_start"], t["period_end"]) == (datetime(2025, 6, 1, tzinfo=UTC), datetime(2025, 7, 1, tzinfo=UTC))
    assert rows[1]["period_start"] is None and rows[1]["period_end"] is None  # never resets


# --- periods -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset, at, tz, start, end", [
    ("daily", "2025-06-18T12:00:00+00:00", "UTC", "2025-06-18T00:00:00+00:00", "2025-06-19T00:00:00+00:00"),
    ("weekly", "2025-06-18T12:00:00+00:00", "UTC", "2025-06-16T00:00:00+00:00", "2025-06-23T00:00:00+00:00"),
    ("weekly", "2025-06-16T00:00:00+00:00", "UTC", "2025-06-16T00:00:00+00:00", "2025-06-23T00:00:00+00:00"),
    ("weekly", "2025-06-15T23:59:59+00:00", "UTC", "2025-06-09T00:00:00+00:00", "2025-06-16T00:00:00+00:00"),
    ("monthly", "2025-12-31T23:59:59+00:00", "UTC", "2025-12-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
    ("monthly", "2024-02-29T10:00:00+00:00", "UTC", "2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"),
    # 23:30 UTC on June 30th is already July 1st in Paris (UTC+2)
    ("monthly", "2025-06-30T23:30:00+00:00", "Europe/Paris", "2025-07-01T00:00:00+02:00", "2025-08-01T00:00:00+02:00"),
    # the day DST starts in Paris has 23 hours
    ("daily", "2025-03-30T12:00:00+00:00", "Europe/Paris", "2025-03-30T00:00:00+01:00", "2025-03-31T00:00:00+02:00"),
    ("daily", "2025-06-18T03:00:00+00:00", "America/New_York", "2025-06-17T00:00:00-04:00",
     "2025-06-18T00:00:00-04:00"),
])
def test_period_bounds(reset, at, tz, start, end):
    zone = ZoneInfo(tz)
    s, e = period_bounds(reset, datetime.fromisoformat(at).timestamp(), zone)
    assert s == datetime.fromisoformat(start) and e == datetime.fromisoformat(end)
    assert s.timestamp() <= datetime.fromisoformat(at).timestamp() < e.timestamp()


def test_never_is_one_endless_period():
    assert period_bounds("never", T, UTC) == (None, None)
    b = make([pool(10, reset="never")])
    r = b.reserve("u1", None, D(10), now=T)
    b.settle(r, D(10), now=T + 10 * 365 * 86400)
    assert isinstance(b.reserve("u1", None, D(1), now=T + 20 * 365 * 86400), Refusal)


def test_rollover_resets_spend_and_alerts_lazily():
    b = make([pool(10, reset="daily", alert_at=[0.5])])
    r = b.reserve("u1", None, D(6), now=T)
    assert len(b.settle(r, D(6), now=T)) == 1
    assert isinstance(b.reserve("u1", None, D(5), now=T), Refusal)
    tomorrow = T + 86400
    r = b.reserve("u1", None, D(5), now=tomorrow)
    assert isinstance(r, Reservation)
    assert [a.period_start for a in b.settle(r, D(5), now=tomorrow)] == [datetime(2025, 6, 19, tzinfo=UTC)]


def test_request_straddling_the_period_end_is_charged_to_its_start():
    """As the ledger (ts = request start) will recount it after a restart."""
    b = make([pool(10, reset="daily")])
    midnight = datetime(2025, 6, 19, tzinfo=UTC).timestamp()
    late = b.reserve("u1", None, D(4), now=midnight - 1)
    early = b.reserve("u1", None, D(4), now=midnight + 1)  # the new day: in-flight reservations still count
    assert b.status(midnight + 1)[0]["reserved"] == D(8) and b.status(midnight + 1)[0]["spent"] == 0
    b.settle(late, D(4), now=midnight + 2)
    b.settle(early, D(3), now=midnight + 2)
    assert b.status(midnight + 3)[0]["spent"] == D(3)


def test_timezone_aligns_periods():
    b = make([pool(10, reset="daily")], timezone="Asia/Tokyo")
    (s,) = b.status(T)  # 12:00 UTC = 21:00 in Tokyo
    assert s["period_start"] == datetime(2025, 6, 18, tzinfo=ZoneInfo("Asia/Tokyo"))
    r = b.reserve("u1", None, D(10), now=T)
    b.settle(r, D(10), now=T)
    assert isinstance(b.reserve("u1", None, D(1), now=T + 3 * 3600 - 1), Refusal)
    assert isinstance(b.reserve("u1", None, D(1), now=T + 3 * 3600), Reservation)  # Tokyo midnight


def test_now_accepts_datetimes():
    b = make([pool(10, reset="daily")])
    r = b.reserve("u1", None, D(10), now=NOW)
    b.settle(r, D(10), now=NOW.replace(tzinfo=None))  # naive = UTC, as in the ledger
    assert isinstance(b.reserve("u1", None, D(1), now=NOW + timedelta(hours=11)), Refusal)
    assert isinstance(b.reserve("u1", None, D(1), now=NOW + timedelta(hours=12)), Reservation)


# --- restart: spend from the ledger ----------------------------------------------------------------------------


def _row(i, ts, user, tier, cost):
    return (f"r{i}", ts, user, tier, None if cost is None else D(cost))


@pytest.fixture
def ledger(tmp_path):
    con = connect(str(tmp_path / "usage.duckdb"))
    yield con
    con.close()


def _insert(con, rows):
    con.executemany("INSERT INTO requests (request_id, ts, user_id, tier, cost_usd) VALUES (?, ?, ?, ?, ?)", rows)


def test_spend_is_recomputed_from_the_ledger(ledger):
    june = datetime(2025, 6, 1, tzinfo=UTC)
    _insert(ledger, [
        _row(1, june + timedelta(days=2), "u1", "team", "30"),
        _row(2, june + timedelta(days=3), "u2", "team", "55.5"),
        _row(3, june - timedelta(seconds=1), "u1", "team", "99"),  # May: another period
        _row(4, june + timedelta(days=4), "u1", None, "7"),  # u1 before joining the pool: not the pool's
        _row(5, NOW - timedelta(hours=1), "bob", None, "3"),
        _row(6, NOW - timedelta(days=1), "bob", None, "4"),  # yesterday: bob's budget is daily
        _row(7, NOW - timedelta(hours=2), "carol", "gone-tier", "1.25"),  # a tier no longer configured
        _row(8, NOW - timedelta(hours=2), "carol", None, None),  # unpriced / refused
        _row(9, NOW + timedelta(seconds=5), "bob", None, "100"),  # after live counting began: not loaded
        _row(10, NOW - timedelta(hours=3), "u2", None, "2"),  # u2 before joining the pool: global only
    ])
    b = make([pool(100, alert_at=[0.5, 0.8, 0.9])], glob={"limit_usd": 1000, "alert_at": [0.1]},
             per_user={"limit_usd": 5, "reset": "daily", "alert_at": [0.5]})
    assert b.load_spend(ledger, now=T) == []  # thresholds passed before the restart are not alerted again
    spent = {s["id"]: s["spent"] for s in b.status(T)}
    assert spent == {"tier:team": D("85.5"), "user:bob": D(3), "user:carol": D("1.25"),
                     "global": D("30") + D("55.5") + 7 + 3 + 4 + D("1.25") + 2}
    assert b.spend_query(T) is None  # loaded
    # the restart keeps refusing what the pool cannot pay for, and alerts only what is new
    assert isinstance(b.reserve("u1", None, D(15), now=T), Refusal)
    r = b.reserve("u1", None, D(14), now=T)
    assert [a.fraction for a in b.settle(r, D(5), now=T)] == [D("0.9")]
    r = b.reserve("bob", None, D(2), now=T)
    assert b.settle(r, D(1), now=T) == []  # 4/5 but 0.5 was already passed before the restart


def test_ledger_load_after_live_traffic_counts_nothing_twice(ledger):
    b = make([pool(100, alert_at=[0.5])])
    r = b.reserve("u1", None, D(30), now=T + 1)  # the ledger is slow to open: traffic first
    assert b.settle(r, D(30), now=T + 2) == []
    _insert(ledger, [_row(1, NOW - timedelta(days=1), "u1", "team", "25"),
                     _row(2, NOW + timedelta(seconds=1), "u1", "team", "30")])  # this run's own row
    alerts = b.load_spend(ledger, now=T + 3)
    assert b.status(T + 3)[0]["spent"] == D(55)
    assert [a.fraction for a in alerts] == [D("0.5")]  # crossed by old + new spend together: alerted now


def test_spend_from_a_finished_period_is_dropped(ledger):
    b = make([pool(10, reset="daily")])
    _insert(ledger, [_row(1, NOW - timedelta(hours=1), "u1", "team", "9")])
    q = b.spend_query(T)
    rows = ledger.execute(q.sql, q.params).fetchall()
    b.apply_spend(q, rows, now=T + 86400)  # answered after midnight
    assert b.status(T + 86400)[0]["spent"] == 0


def test_ledger_query_ignores_the_session_time_zone(ledger):
    ledger.execute("SET TimeZone = 'Pacific/Kiritimati'")  # UTC+14
    _insert(ledger, [_row(1, datetime(2025, 6, 18, 0, 30, tzinfo=UTC), "u1", "team", "2"),
                     _row(2, datetime(2025, 6, 17, 23, 30, tzinfo=UTC), "u1", "team", "3")])
    b = make([pool(10, reset="daily")])
    b.load_spend(ledger, now=T)
    assert b.status(T)[0]["spent"] == D(2)


def test_spend_query_shape():
    b = make([pool(10), {"name": "free"}], glob={"limit_usd": 100}, per_user={"limit_usd": 1})
    q = b.spend_query(T)
    assert q.sql.count("sum(cost_usd)") == 3 and "GROUP BY user_id" in q.sql
    assert set(q.period_ends) == {"tier:team", "global", "user"}
    assert make().spend_query(T) is None


# --- hot reload ---------------------------------------------------------------------------------------------


def test_inherit_keeps_spend_and_in_flight_reservations(ledger):
    old = make([pool(100, alert_at=[0.5])], glob={"limit_usd": 1000}, per_user={"limit_usd": 10})
    old.load_spend(ledger, now=T)
    r = old.reserve("u1", None, D(40), now=T)
    old.settle(old.reserve("u2", None, D(50), now=T), D(50), now=T)
    old.settle(old.reserve("bob", None, D(2), now=T), D(2), now=T)
    new = make([pool(60, alert_at=[0.5, 0.9])], glob={"limit_usd": 1000, "reset": "daily"},
               per_user={"limit_usd": 3})
    new.inherit(old)
    st_ = {s["id"]: s for s in new.status(T)}
    assert st_["tier:team"]["spent"] == D(50) and st_["tier:team"]["reserved"] == D(40)
    assert st_["tier:team"]["limit"] == D(60)
    assert st_["user:bob"]["spent"] == D(2) and st_["user:bob"]["limit"] == D(3)
    assert st_["global"]["spent"] == 0 and st_["global"]["reset"] == "daily"  # period changed: reloaded
    assert set(new.spend_query(T).period_ends) == {"global"}
    assert isinstance(new.reserve("u1", None, D(1), now=T), Refusal)  # 50 + 40 in flight > 60
    assert [a.fraction for a in old.settle(r, D(5), now=T)] == [D("0.9")]  # the old reservation lands in the pool
    assert new.status(T)[0]["spent"] == D(55) and new.status(T)[0]["reserved"] == 0


# --- the overshoot bound -------------------------------------------------------------------------------------


def _check_bound(limit, estimates, actuals, ops, glob_limit=None):
    """Run one interleaving. ops: a list of (kind, pick) with kind 0=reserve next, 1=settle, 2=release."""
    b = make([pool(limit, users=["u1", "u2", "u3"])],
             glob=None if glob_limit is None else {"limit_usd": glob_limit})
    enforce = [x for x in b.budgets()]
    waiting = list(range(len(estimates)))
    flight: dict[int, Reservation] = {}
    most_in_flight = 0
    at_last_admission: set[int] = set()
    settled_actual = D(0)
    for kind, pick in ops:
        if kind == 0 and waiting:
            i = waiting.pop(0)
            r = b.reserve(f"u{i % 3 + 1}", None, estimates[i], now=T)
            if isinstance(r, Reservation):
                flight[i] = r
                at_last_admission = set(flight)
                most_in_flight = max(most_in_flight, len(flight))
                for x in enforce:  # the invariant every admission keeps
                    assert x.spent + x.reserved <= x.limit
        elif kind in (1, 2) and flight:
            i = sorted(flight)[pick % len(flight)]
            r = flight.pop(i)
            if kind == 1:
                b.settle(r, actuals[i], now=T)
                settled_actual += actuals[i]
            else:
                b.release(r)
    for i, r in flight.items():  # the rest answer
        b.settle(r, actuals[i], now=T)
        settled_actual += actuals[i]
    pool_b = b.budgets()[0]
    assert pool_b.reserved == 0 and pool_b.spent == settled_actual
    error = sum((max(D(0), actuals[i] - estimates[i]) for i in at_last_admission), D(0))
    assert pool_b.spent <= pool_b.limit + error
    if all(a <= e for a, e in zip(actuals, estimates)):
        assert pool_b.spent <= pool_b.limit
    if len(set(estimates)) == 1:  # never more than floor(limit / estimate) at the provider at once
        assert most_in_flight <= math.floor(pool_b.limit / estimates[0])
    return most_in_flight


def test_twelve_concurrent_against_a_pool_that_fits_2_7():
    est = D("0.01")
    # all twelve arrive before any answer: floor(2.7) = 2 go to the provider, 10 are refused
    most = _check_bound(est * D("2.7"), [est] * 12, [est] * 12, [(0, 0)] * 12)
    assert most == 2


_money = st.decimals(min_value=D("0.000001"), max_value=D("5"), places=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_overshoot_beyond_the_estimate_error(data):
    n = 12
    uniform = data.draw(st.booleans(), "uniform")
    if uniform:
        e = data.draw(_money, "estimate")
        estimates = [e] * n
        limit = e * D("2.7")
    else:
        estimates = data.draw(st.lists(_money, min_size=n, max_size=n), "estimates")
        limit = data.draw(st.decimals(min_value=D(0), max_value=D(10), places=6), "limit")
    honest = data.draw(st.booleans(), "honest")  # actual <= estimate, or prompts under-counted by up to 50%
    hi = 100 if honest else 150
    actuals = [e * data.draw(st.integers(0, hi), "pct") / 100 for e in estimates]
    ops = data.draw(st.lists(st.tuples(st.sampled_from([0, 0, 1, 1, 2]), st.integers(0, 11)), max_size=60), "ops")
    glob = data.draw(st.none() | st.decimals(min_value=D(0), max_value=D(20), places=6), "global")
    _check_bound(limit, estimates, actuals, ops + [(0, 0)] * n, glob)


def test_asyncio_gather_twelve_requests():
    """The gateway's shape: reserve on the loop, await the provider, settle. Actual = estimate."""
    b = make([pool(D("2.7"), users=["u1", "u2"])])
    est = D(1)

    async def request(i):
        r = b.reserve(f"u{i % 2 + 1}", None, est)
        if isinstance(r, Refusal):
            return "insufficient_quota"
        await asyncio.sleep(0.01)  # the provider answers
        b.settle(r, est)
        return "ok"

    async def main():
        return await asyncio.gather(*(request(i) for i in range(12)))

    out = asyncio.run(main())
    assert out.count("ok") == 2 and out.count("insufficient_quota") == 10
    assert b.status()[0]["spent"] == D(2) <= D("2.7")


# --- speed ---------------------------------------------------------------------------------------------------


def test_reserve_settle_is_a_few_microseconds(capsys):
    b = make([pool(10**9, alert_at=[0.9])], glob={"limit_usd": 10**9}, per_user={"limit_usd": 10**9})
    est, act = D("0.004096"), D("0.001234")
    users = [("u1", None), ("bob", None)]  # pool + global, per-user + global
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        u, t = users[i & 1]
        r = b.reserve(u, t, est)
        b.settle(r, act)
    us = (time.perf_counter() - t0) / n * 1e6
    with capsys.disabled():
        print(f"\nreserve+settle: {us:.2f} µs (2 budgets each)")
    assert us < 100  # generous for slow CI; ~3-5 µs measured


# --- unpriced requests (reserve with None) -------------------------------------------------------------------


def test_unpriced_request_is_refused_by_an_enforcing_budget_and_holds_nothing():
    b = make([pool(10)], glob={"limit_usd": 100})
    no = b.reserve("u1", None, None, now=T)
    assert isinstance(no, Refusal) and no.unpriced and no.budget_id == "tier:team"
    msg = no.unpriced_message("openai:gpt-9-mystery")
    assert "openai:gpt-9-mystery" in msg and "budgeting.costs" in msg and "budgeting.unpriced: allow" in msg
    assert "tier 'team' budget is enforced" in msg
    assert "names no model" in no.unpriced_message(None)
    assert all(x.reserved == 0 for x in b.budgets())
    priced = b.reserve("u1", None, D(1), now=T)  # a priced request is unaffected
    assert isinstance(priced, Reservation) and not isinstance(priced, Refusal)


def test_unpriced_under_track_budgets_only_is_admitted_holding_nothing():
    b = make([pool(10, mode="track")], glob={"limit_usd": 100, "mode": "track"})
    r = b.reserve("u1", None, None, now=T)
    assert isinstance(r, Reservation) and r.amount == 0
    assert b.settle(r, None, now=T) == [] and all(x.spent == 0 for x in b.budgets())
    mixed = make([pool(10, mode="track")], glob={"limit_usd": 100})  # the enforcing global budget refuses it
    no = mixed.reserve("u1", None, None, now=T)
    assert isinstance(no, Refusal) and no.unpriced and no.budget_id == "global"


@pytest.mark.parametrize("value", ["allow", "Allow"])
def test_unpriced_allow_admits_at_zero(value):
    b = make([pool(10)], unpriced=value)
    r = b.reserve("u1", None, None, now=T)
    assert isinstance(r, Reservation) and r.amount == 0
    b.settle(r, None, now=T)
    assert b.status(T)[0]["spent"] == 0
    spent = make([pool(0)], unpriced=value)  # a spent budget still refuses it, as any request
    no = spent.reserve("u1", None, None, now=T)
    assert isinstance(no, Refusal) and not no.unpriced


def test_unpriced_defaults_to_refuse_and_bad_values_are_named():
    assert make().refuse_unpriced is True and make(unpriced="refuse").refuse_unpriced is True
    for bad in ("maybe", True, None, 1):
        with pytest.raises(BudgetPolicyError) as ei:
            make(unpriced=bad)
        assert ei.value.keypath == "budgeting.unpriced" and "must be refuse or allow, not " + repr(bad) in str(ei.value)
