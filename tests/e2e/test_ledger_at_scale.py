"""The ledger at size, through real gateways: landings across the row-group boundary where they used to fail
for good, a restart on such a ledger, and a reader holding the file through a start."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from decimal import Decimal

import duckdb
import openai
import pytest

from tollgate.ledger import ensure_schema

from .harness import AppLoad, Gateway, LedgerHolder, app_env, base_policy, settled_rows

OLD_GROUP = 122_880  # DuckDB's default row group: ledgers written before tollgate chose its own
PRICES = {"input_token": 0.001, "output_token": 0.01}
MSGS = [{"role": "user", "content": "hi"}]


def build_old_ledger(path, n: int, tier_cost: Decimal) -> None:
    """n rows laid out as ledgers written before (122,880-row groups), this month's tier 'load' spend given."""
    con = duckdb.connect(str(path))
    ensure_schema(con)
    con.execute(f"""INSERT INTO requests (request_id, ts, provider, endpoint, model, user_id, tier, outcome,
                    input_tokens, output_tokens, cost_usd)
                    SELECT printf('old%029x', i), now() - INTERVAL 1 MINUTE * (i % 60), 'openai', '/v1/chat/completions',
                           'gpt-4o-mini-old', 'load', 'load', 'ok', 10, 1,
                           CASE WHEN i = 0 THEN ?::DECIMAL(18,9) ELSE 0 END
                    FROM range({n}) t(i)""", [str(tier_cost)])
    con.close()


def health(gw: Gateway) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{gw.port}"}))
    try:
        with opener.open("http://tollgate.invalid:1/health/ready", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def budget_policy(pol: dict) -> None:
    pol["budgeting"] = {"tiers": [{"name": "load", "limit_usd": 1000, "shared_users": ["load"]}],
                        "costs": {"openai:*": PRICES}}


@pytest.mark.slow
def test_gateway_lands_across_the_old_boundary_and_restarts(tmp_path, standin, confdir, monkeypatch):
    db = tmp_path / "gw" / "usage.duckdb"
    db.parent.mkdir()
    n0 = 2 * OLD_GROUP - 600  # the second row group 600 rows short of full: landings used to fail from here on
    build_old_ledger(db, n0, Decimal("12.5"))
    pol = base_policy(standin.port, db)
    budget_policy(pol)
    gw = Gateway(tmp_path / "gw", pol, confdir)
    key = gw.create_key("load")
    gw.start()
    try:
        app_env(gw, monkeypatch)
        gw.wait_key(key["key"])
        load = AppLoad(key["key"], workers=8, prefix="gpt-4o-mini-cross-", stream_every=4).spread(900, 12)
        load.join(120)
        assert len(load.answered) == 900, load.failed
        rows = settled_rows(gw, "model like 'gpt-4o-mini-cross-%'", n=900, timeout=60)
        assert len(rows) == 900
        status, body = health(gw)
        assert status == 200 and body["ledger"] == "ok" and body["budget_spend"] == "loaded", body
    finally:
        gw.stop()
    out = gw.output()
    assert "ledger write to" not in out and "failed" not in out.lower(), out[-2000:]
    spent = sum((r["cost_usd"] for r in rows if r["cost_usd"]), Decimal(0))

    # A restart on that ledger: it starts, recounts the tier's spend (old rows + this run's), and lands.
    gw.start()
    try:
        gw.wait_key(key["key"])
        client = openai.OpenAI(api_key=key["key"], max_retries=0)
        for i in range(20):
            client.chat.completions.create(model=f"gpt-4o-mini-again-{i}", messages=MSGS)
        assert len(settled_rows(gw, "model like 'gpt-4o-mini-again-%'", n=20, timeout=30)) == 20
        report = {b["id"]: Decimal(str(b["spent"])) for b in json.loads(gw.tollgate("budgets", "--json"))}
    finally:
        gw.stop()
    con = duckdb.connect(str(db), read_only=True)
    total, count = con.execute("SELECT sum(cost_usd), count(*) FILTER (model LIKE 'gpt-4o-mini-%')"
                               " FROM requests WHERE tier = 'load'").fetchone()
    con.close()
    assert count == n0 + 900 + 20
    assert spent > 0 and report["tier:load"] == total  # the recount agrees with the ledger, old rows included


def test_reader_holding_the_ledger_through_a_start(tmp_path, standin, confdir, monkeypatch):
    """The gateway starts and serves while an auditor holds the file; budgets still learn their spend (a
    read-only recount works beside a reader), and rows land once the reader lets go."""
    pol = base_policy(standin.port, tmp_path / "gw" / "usage.duckdb")
    budget_policy(pol)
    gw = Gateway(tmp_path / "gw", pol, confdir)
    key = gw.create_key("load")
    free = gw.create_key("free")
    holder = LedgerHolder(gw.db, 12)
    began = time.monotonic()
    gw.start()
    try:
        app_env(gw, monkeypatch)
        for k in (key, free):
            gw.wait_key(k["key"])
        for k in (key, free):
            openai.OpenAI(api_key=k["key"], max_retries=0).chat.completions.create(model="gpt-4o-mini-held",
                                                                                     messages=MSGS)
        served = time.monotonic() - began
        status, body = health(gw)
        assert body["budget_spend"] == "loaded", body
        holder.wait()
        rows = settled_rows(gw, "model = 'gpt-4o-mini-held'", n=2, timeout=30)
    finally:
        gw.stop()
    assert served < 10, "requests waited for the reader"
    assert len(rows) == 2
    assert "Error logged during startup" not in gw.output()


def test_a_ledger_that_cannot_be_written_at_start_never_stops_the_gateway(tmp_path, standin, confdir, monkeypatch):
    """A broken ledger file at start: the gateway still starts and serves, says why on /health/ready, keeps the
    rows in its spool, and lands them once the file is fixed."""
    pol = base_policy(standin.port, tmp_path / "gw" / "usage.duckdb")
    gw = Gateway(tmp_path / "gw", pol, confdir)
    key = gw.create_key("alice")
    keys_db = tmp_path / "keys.duckdb"
    gw.db.rename(keys_db)  # keep the keys aside; the ledger the gateway opens is garbage
    gw.db.write_text("this is not a duckdb file")
    gw.start()
    try:
        status, body = health(gw)
        assert status == 503 and body["ledger"] == "failing" and "reason" in body, body
        gw.db.unlink()
        keys_db.rename(gw.db)  # the operator puts the right file back
        app_env(gw, monkeypatch)
        gw.wait_key(key["key"], timeout=30)
        openai.OpenAI(api_key=key["key"], max_retries=0).chat.completions.create(model="gpt-4o-mini-back",
                                                                                 messages=MSGS)
        rows = settled_rows(gw, "model = 'gpt-4o-mini-back'", timeout=30)
        status, body = health(gw)
    finally:
        gw.stop()
    assert len(rows) == 1
    assert status == 200, body
    out = gw.output()
    assert "Error logged during startup" not in out
    assert "landing again after" in out
