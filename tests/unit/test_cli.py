"""The `tollgate` CLI's data commands, in-process through main(argv) and as the installed console script."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import types
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tollgate import cli
from tollgate import keys as vkeys
from tollgate.ledger import Ledger, connect

TOLLGATE = str(Path(sys.executable).parent / "tollgate")

_HOLD = """
import duckdb, sys
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def policy(tmp_path, monkeypatch):
    """A policy file in its own folder; the CWD elsewhere, so relative paths must follow the policy file."""
    folder = tmp_path / "conf"
    folder.mkdir()
    p = folder / "policies.yaml"
    p.write_text("analytics: {logging: true, database: usage.duckdb}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOLLGATE_POLICY", raising=False)
    return p


@pytest.fixture
def db(policy):
    return str(policy.parent / "usage.duckdb")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def create(capsys, policy, *extra: str) -> dict:
    code, out, err = run(capsys, "keys", "create", "--policy", str(policy), "--user", "alice", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def fill(db: str, rows: list[dict]) -> None:
    led = Ledger(db, flush_interval=0.02)
    led.start()
    for r in rows:
        led.record(r)
    led.stop()


def row(user: str, model: str, cost: str | None, *, days_ago: int = 0, key: str = "vk_a", tokens: int = 100):
    return {
        "request_id": uuid.uuid4().hex,
        "ts": datetime.now(UTC) - timedelta(days=days_ago),
        "provider": model.split(":")[0],
        "model": model.split(":")[1],
        "key_id": key,
        "user_id": user,
        "input_tokens": tokens,
        "output_tokens": tokens // 10,
        "cost_usd": None if cost is None else Decimal(cost),
        "outcome": "ok",
    }


# --- policy -> database path -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        (None, "{dir}/usage.duckdb"),
        ("usage.duckdb", "{dir}/usage.duckdb"),
        ("data/ledger.duckdb", "{dir}/data/ledger.duckdb"),
        ("/var/lib/tollgate/u.duckdb", "/var/lib/tollgate/u.duckdb"),
        ("duckdb:///usage.duckdb", "{dir}/usage.duckdb"),
        ("duckdb:////abs/usage.duckdb", "/abs/usage.duckdb"),
        ("sqlite:///usage.db", "{dir}/usage.duckdb"),  # the brief's example, read as a DuckDB file
        ("sqlite:////abs/usage.sqlite3", "/abs/usage.duckdb"),
        ("sqlite:///ledger", "{dir}/ledger.duckdb"),
        ("sqlite:///data/usage.v1.db", "{dir}/data/usage.v1.duckdb"),
        ("${TG_TEST_DB:-fallback.duckdb}", "{dir}/fallback.duckdb"),
    ],
)
def test_db_path_from_policy(policy, database, expected):
    text = "analytics: {logging: true}\n" if database is None else f"analytics: {{database: '{database}'}}\n"
    policy.write_text(text)
    assert cli.db_path_from_policy(str(policy)) == expected.format(dir=policy.parent)


def test_db_path_env_var(policy, monkeypatch):
    monkeypatch.setenv("TG_TEST_DB", "/tmp/x.duckdb")
    policy.write_text("analytics: {database: '${TG_TEST_DB}'}\n")
    assert cli.db_path_from_policy(str(policy)) == "/tmp/x.duckdb"
    monkeypatch.delenv("TG_TEST_DB")
    # Data commands read unset variables as empty (they need no provider keys); an empty path is refused.
    with pytest.raises(cli.CliError, match="analytics.database: empty path"):
        cli.db_path_from_policy(str(policy))


def test_db_path_without_policy_file(tmp_path):
    assert cli.db_path_from_policy(str(tmp_path / "nope.yaml")) == str(tmp_path / "usage.duckdb")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("analytics: {database: 'postgresql://db/usage'}\n", "the ledger is a DuckDB file"),
        ("analytics: {database: [1]}\n", "analytics.database: must be a string"),
        ("analytics: [1, 2]\n", "analytics: must be a mapping"),
        ("- a\n- b\n", "mapping of sections"),
        ("analytics: {database: [\n", "not valid YAML"),
    ],
)
def test_db_path_errors_name_the_file(policy, text, message):
    policy.write_text(text)
    with pytest.raises(cli.CliError, match=message) as err:
        cli.db_path_from_policy(str(policy))
    assert str(policy) in str(err.value)


def test_policy_from_env_and_flag_positions(policy, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other.yaml"
    other.write_text("analytics: {database: other.duckdb}\n")
    monkeypatch.setenv("TOLLGATE_POLICY", str(other))
    assert run(capsys, "keys", "create", "--user", "u")[0] == 0
    assert (tmp_path / "other.duckdb").exists()
    assert not (policy.parent / "usage.duckdb").exists()
    # --policy beats the environment, before or after the subcommand
    assert run(capsys, "--policy", str(policy), "keys", "create", "--user", "u")[0] == 0
    assert run(capsys, "keys", "--policy", str(policy), "list")[0] == 0
    code, out, _ = run(capsys, "keys", "list", "--policy", str(policy), "--json")
    assert len(json.loads(out)) == 1


# --- keys ---------------------------------------------------------------------------------------------------


def test_keys_create_json(policy, db, capsys):
    made = create(capsys, policy, "--meta", "project=apollo", "--meta", "team=a=b", "--expires-days", "7")
    assert made["key"].startswith("tg-")
    assert made["key_id"].startswith("vk_")
    assert made["user_id"] == "alice"
    assert made["metadata"] == {"project": "apollo", "team": "a=b"}
    expires = datetime.fromisoformat(made["expires_at"])
    assert timedelta(days=6, hours=23) < expires - datetime.now(UTC) <= timedelta(days=7)
    con = connect(db, read_only=True)
    (stored,) = vkeys.list_keys(con)
    con.close()
    assert stored.key_hash == vkeys.hash_key(made["key"])


def test_keys_create_plain_prints_key_once(policy, capsys):
    code, out, _ = run(capsys, "keys", "create", "--policy", str(policy), "--user", "bob")
    assert code == 0
    keys_printed = [w for w in out.split() if w.startswith("tg-")]
    assert len(keys_printed) == 1
    assert "vk_" in out and "bob" in out and "never" in out


@pytest.mark.parametrize(("policy_days", "flag", "expected_days"),
                         [(30, None, 30), (30, "0", None), (30, "2", 2), (None, None, None), (0, None, None)])
def test_default_expiry_comes_from_policy(policy, capsys, policy_days, flag, expected_days):
    lines = ["analytics: {database: usage.duckdb}"]
    if policy_days is not None:
        lines.append(f"auth: {{virtual_keys: {{enabled: true, expiration_days: {policy_days}}}}}")
    policy.write_text("\n".join(lines) + "\n")
    made = create(capsys, policy, *(["--expires-days", flag] if flag else []))
    if expected_days is None:
        assert made["expires_at"] is None
    else:
        left = datetime.fromisoformat(made["expires_at"]) - datetime.now(UTC)
        assert timedelta(days=expected_days) - timedelta(minutes=1) < left <= timedelta(days=expected_days)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--meta", "novalue"], "expected KEY=VALUE"),
        (["--meta", "=x"], "expected KEY=VALUE"),
        (["--expires-days", "-3"], ">= 0"),
    ],
)
def test_keys_create_rejects_bad_options(policy, capsys, argv, message):
    code, _, err = run(capsys, "keys", "create", "--policy", str(policy), "--user", "u", *argv)
    assert code == 1
    assert message in err


def test_keys_list_never_shows_key_or_hash(policy, capsys):
    made = create(capsys, policy, "--meta", "project=x")
    code, out, _ = run(capsys, "keys", "list", "--policy", str(policy))
    assert code == 0
    assert made["key_id"] in out and "alice" in out and "active" in out and "project=x" in out
    code, js, _ = run(capsys, "keys", "list", "--policy", str(policy), "--json")
    (entry,) = json.loads(js)
    assert entry["key_id"] == made["key_id"] and entry["status"] == "active"
    digest = vkeys.hash_key(made["key"])
    for text in (out, js):
        assert made["key"] not in text and digest not in text and made["key"][3:20] not in text


def test_keys_list_without_ledger(policy, capsys):
    code, out, err = run(capsys, "keys", "list", "--policy", str(policy), "--json")
    assert code == 0 and json.loads(out) == []
    code, out, err = run(capsys, "keys", "list", "--policy", str(policy))
    assert code == 0 and "no keys" in err


def test_keys_revoke(policy, capsys):
    made = create(capsys, policy)
    code, out, _ = run(capsys, "keys", "revoke", made["key_id"], "--policy", str(policy))
    assert code == 0 and "revoked" in out
    _, js, _ = run(capsys, "keys", "list", "--policy", str(policy), "--json")
    assert json.loads(js)[0]["status"] == "revoked"
    code, _, err = run(capsys, "keys", "revoke", "vk_unknown", "--policy", str(policy))
    assert code == 1 and "no key vk_unknown" in err


def test_keys_without_action_shows_help(policy, capsys):
    code, _, err = run(capsys, "keys", "--policy", str(policy))
    assert code == 2 and "create" in err and "revoke" in err


# --- sql ---------------------------------------------------------------------------------------------------


def test_sql_table_json_csv(policy, db, capsys):
    fill(db, [row("alice", "openai:gpt-4o-mini", "0.000150000"), row("bob", "openai:gpt-4o", None)])
    query = "SELECT user_id, cost_usd, ts FROM requests ORDER BY user_id"
    code, out, _ = run(capsys, "sql", query, "--policy", str(policy))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["user_id", "cost_usd", "ts"]
    assert "0.000150000" in lines[2] and "NULL" in lines[3] and lines[-1] == "(2 rows)"
    code, out, _ = run(capsys, "sql", query, "--json", "--policy", str(policy))
    data = json.loads(out, parse_float=Decimal)
    assert data[0]["cost_usd"] == Decimal("0.000150000") and data[1]["cost_usd"] is None
    assert datetime.fromisoformat(data[0]["ts"]).tzinfo is not None
    code, out, _ = run(capsys, "sql", query, "--csv", "--policy", str(policy))
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == ["user_id", "cost_usd", "ts"]
    assert parsed[1][:2] == ["alice", "0.000150000"] and parsed[2][:2] == ["bob", ""]


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM requests",
        "INSERT INTO keys VALUES ('a','b','c',now(),NULL,NULL,NULL,NULL)",
        "UPDATE keys SET revoked_at = now()",
        "DROP TABLE requests",
        "CREATE TABLE x (a INT)",
        "SELECT 1; DELETE FROM requests",
        "COPY requests TO 'out.csv'",
        "ATTACH 'other.duckdb' AS o",
        "INSTALL httpfs",
    ],
)
def test_sql_refuses_writes_clearly(policy, db, capsys, query):
    fill(db, [row("alice", "openai:gpt-4o-mini", "0.1")])
    code, out, err = run(capsys, "sql", query, "--policy", str(policy))
    assert code == 1
    assert "read-only" in err
    assert out == ""
    con = connect(db, read_only=True)
    assert con.execute("SELECT count(*) FROM requests").fetchone() == (1,)
    con.close()


@pytest.mark.parametrize("query", ["DESCRIBE requests", "SHOW TABLES", "SELECT * FROM spend_by_user",
                                   "EXPLAIN SELECT 1", "PRAGMA table_info('requests')"])
def test_sql_allows_reads(policy, db, capsys, query):
    fill(db, [row("alice", "openai:gpt-4o-mini", "0.1")])
    code, out, err = run(capsys, "sql", query, "--policy", str(policy))
    assert code == 0, err


def test_sql_errors_and_missing_ledger(policy, db, capsys):
    code, _, err = run(capsys, "sql", "SELECT 1", "--policy", str(policy))
    assert code == 1 and "no ledger at" in err and db in err
    fill(db, [])
    code, _, err = run(capsys, "sql", "SELECT nope FROM requests", "--policy", str(policy))
    assert code == 1 and "SQL error" in err and "nope" in err
    code, _, err = run(capsys, "sql", "SELEC 1", "--policy", str(policy))
    assert code == 1 and "SQL error" in err


# --- usage -------------------------------------------------------------------------------------------------


@pytest.fixture
def usage_db(db):
    fill(db, [
        row("alice", "openai:gpt-4o-mini", "0.5", key="vk_1"),
        row("alice", "anthropic:claude-3-5-haiku", "0.25", key="vk_1"),
        row("bob", "openai:gpt-4o-mini", "2", key="vk_2", days_ago=3),
        row("carol", "openai:mystery", None, key="vk_3", days_ago=1),
    ])
    return db


@pytest.mark.parametrize(
    ("by", "first_cols", "expected"),
    [
        ("user", ["user"], {("bob",): (1, Decimal("2")), ("alice",): (2, Decimal("0.75")), ("carol",): (1, None)}),
        ("model", ["provider", "model"], {("openai", "gpt-4o-mini"): (2, Decimal("2.5")),
                                          ("anthropic", "claude-3-5-haiku"): (1, Decimal("0.25")),
                                          ("openai", "mystery"): (1, None)}),
        ("key", ["key_id", "user"], {("vk_2", "bob"): (1, Decimal("2")), ("vk_1", "alice"): (2, Decimal("0.75")),
                                     ("vk_3", "carol"): (1, None)}),
    ],
)
def test_usage_json(policy, usage_db, capsys, by, first_cols, expected):
    code, out, _ = run(capsys, "usage", "--by", by, "--json", "--policy", str(policy))
    assert code == 0
    data = json.loads(out, parse_float=Decimal)
    assert list(data[0]) == first_cols + ["requests", "input_tokens", "output_tokens", "cost_usd"]
    got = {tuple(d[c] for c in first_cols): (d["requests"], d["cost_usd"]) for d in data}
    assert got == expected
    assert tuple(data[0][c] for c in first_cols) == next(iter(expected))  # most expensive first


def test_usage_by_day_and_since(policy, usage_db, capsys):
    code, out, _ = run(capsys, "usage", "--by", "day", "--json", "--policy", str(policy))
    days = [d["day"] for d in json.loads(out)]
    assert days == sorted(days) and len(days) == 3
    today = datetime.now(UTC).date().isoformat()
    code, out, _ = run(capsys, "usage", "--since", today, "--json", "--policy", str(policy))
    assert {d["user"] for d in json.loads(out)} == {"alice"}


def test_usage_table_has_totals(policy, usage_db, capsys):
    code, out, _ = run(capsys, "usage", "--policy", str(policy))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["user", "requests", "input_tokens", "output_tokens", "cost_usd"]
    assert lines[2].split()[0] == "bob"
    assert lines[-1].split() == ["total", "4", "400", "40", "2.750000"]
    assert "-" in lines[4].split()  # carol: unknown cost shown as '-'
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned


@pytest.mark.parametrize("since", ["yesterday", "2025-13-01", "01/02/2025"])
def test_usage_bad_since(policy, usage_db, capsys, since):
    code, _, err = run(capsys, "usage", "--since", since, "--policy", str(policy))
    assert code == 1 and "YYYY-MM-DD" in err


def test_usage_without_ledger(policy, capsys):
    code, out, err = run(capsys, "usage", "--policy", str(policy))
    assert code == 0 and "no requests yet" in err


# --- locks ---------------------------------------------------------------------------------------------------


def test_commands_fail_clearly_when_file_stays_locked(policy, db, capsys, monkeypatch):
    connect(db).close()
    monkeypatch.setattr(cli, "LOCK_WAIT", 0.3)
    p = subprocess.Popen([sys.executable, "-c", _HOLD, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        for argv in (["keys", "create", "--user", "u"], ["keys", "list"], ["sql", "SELECT 1"], ["usage"]):
            code, _, err = run(capsys, *argv, "--policy", str(policy))
            assert code == 1, argv
            assert db in err and "locked" in err and f"PID {p.pid}" in err, err
    finally:
        p.stdin.close()
        p.wait(5)


def test_commands_work_while_the_gateway_writes(policy, db, capsys):
    led = Ledger(db, flush_interval=0.01)
    led.start()
    try:
        for i in range(200):
            led.record(row("alice", "openai:gpt-4o-mini", "0.001"))
            if i % 40 == 0:
                assert run(capsys, "keys", "create", "--user", f"u{i}", "--policy", str(policy))[0] == 0
                assert run(capsys, "usage", "--policy", str(policy))[0] == 0
        assert led.flush(10)
    finally:
        led.stop()
    _, out, _ = run(capsys, "sql", "SELECT count(*) AS n FROM requests", "--json", "--policy", str(policy))
    assert json.loads(out) == [{"n": 200}]


# --- run / web / env wiring -----------------------------------------------------------------------------------


@pytest.fixture
def fake_launch(monkeypatch):
    monkeypatch.delenv("TOLLGATE_POLICY", raising=False)
    calls: list[tuple[str, object]] = []
    mod = types.ModuleType("tollgate.launch")
    for name in ("run", "web", "env"):
        setattr(mod, f"cmd_{name}", lambda args, name=name: calls.append((name, args)) or 0)
    monkeypatch.setitem(sys.modules, "tollgate.launch", mod)
    import tollgate

    monkeypatch.setattr(tollgate, "launch", mod, raising=False)
    return calls


@pytest.mark.parametrize(
    ("argv", "command", "policy", "extra"),
    [
        (["run"], "run", "policies.yaml", []),
        (["run", "--policy", "p.yaml", "--set", "x=1", "-p", "9090"], "run", "p.yaml", ["--set", "x=1", "-p", "9090"]),
        (["--policy", "q.yaml", "web", "--web-port", "8082"], "web", "q.yaml", ["--web-port", "8082"]),
        (["run", "--", "--policy", "mitm-owned"], "run", "policies.yaml", ["--policy", "mitm-owned"]),
        (["run", "--pol", "x"], "run", "policies.yaml", ["--pol", "x"]),  # no abbreviations: mitmproxy gets it
    ],
)
def test_run_and_web_pass_extra_args(fake_launch, argv, command, policy, extra):
    assert cli.main(argv) == 0
    ((name, args),) = fake_launch
    assert name == command
    assert args.policy == policy
    assert args.extra == extra


@pytest.mark.parametrize(("argv", "shell"), [(["env"], None), (["env", "--shell", "fish"], "fish"),
                                             (["env", "--shell", "sh"], "sh")])
def test_env_wiring(fake_launch, monkeypatch, argv, shell):
    monkeypatch.setenv("TOLLGATE_POLICY", "/etc/tollgate/p.yaml")
    assert cli.main(argv) == 0
    ((name, args),) = fake_launch
    assert name == "env" and args.shell == shell
    assert args.policy == "/etc/tollgate/p.yaml"


def test_unknown_args_rejected_outside_run(policy, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["keys", "list", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# --- the installed console script ------------------------------------------------------------------------------


def test_console_script(policy, db, tmp_path):
    env = {**os.environ, "TOLLGATE_POLICY": str(policy)}

    def tg(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([TOLLGATE, *argv], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=60)

    made = tg("keys", "create", "--user", "alice", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    listed = tg("keys", "list")
    assert key["key_id"] in listed.stdout and key["key"] not in listed.stdout
    revoked = tg("keys", "revoke", key["key_id"])
    assert revoked.returncode == 0
    q = tg("sql", "SELECT user_id, revoked_at IS NOT NULL AS revoked FROM keys", "--json")
    assert json.loads(q.stdout) == [{"user_id": "alice", "revoked": True}]
    refused = tg("sql", "DELETE FROM keys")
    assert refused.returncode == 1 and "read-only" in refused.stderr
    assert tg("usage").returncode == 0
    assert tg("--help").returncode == 0


# --- formatting ------------------------------------------------------------------------------------------------


def test_format_table_alignment():
    text = cli.format_table(["name", "n", "cost"], [("a", 1, Decimal("0.5")), ("bbbb", 100, None)])
    lines = text.splitlines()
    assert lines[0] == "name    n  cost"
    assert lines[1] == "----  ---  ----"
    assert lines[2] == "a       1   0.5"
    assert lines[3] == "bbbb  100  NULL"


# --- keys create: required metadata and tiers -------------------------------------------------------------------

_TIERED = """analytics: {database: usage.duckdb}
auth: {virtual_keys: {metadata_fields: [user_id, project, team]}}
budgeting:
  tiers:
    - {name: team-basic, monthly_limit_usd: 100, shared_users: [alice, bob]}
    - {name: pro, limit_usd: 5, reset: daily}
    - {name: limits-only, rate_limits: {requests_per_minute: 10}}
"""


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        ([], ["project", "team"]),
        (["--meta", "project=x"], ["team"]),
        (["--meta", "project=x", "--meta", "team="], ["team"]),  # empty counts as missing
        (["--meta", "project=x", "--meta", "team=y", "--meta", "user_id=z"], []),
        (["--meta", "project=x", "--meta", "team=y"], []),  # user_id: satisfied by --user
    ],
)
def test_keys_create_requires_metadata_fields(policy, db, capsys, argv, missing):
    policy.write_text(_TIERED)
    code, out, err = run(capsys, "keys", "create", "--policy", str(policy), "--user", "carol", "--json", *argv)
    if missing:
        assert code == 1 and out == ""
        flags = " ".join(f"--meta {f}=…" for f in missing)
        assert f"missing {flags} (required by auth.virtual_keys.metadata_fields" in err
        assert not os.path.exists(db) or not vkeys.list_keys(connect(db, read_only=True))
    else:
        assert code == 0, err
        assert json.loads(out)["user_id"] == "carol"


@pytest.mark.parametrize("fields", [[], ["user_id"]])
def test_keys_create_without_required_metadata_policy(policy, capsys, fields):
    policy.write_text(f"auth: {{virtual_keys: {{metadata_fields: {fields}}}}}\n")
    assert create(capsys, policy)["metadata"] == {}


@pytest.mark.parametrize(
    ("user", "tier", "code", "message"),
    [
        ("carol", "pro", 0, ""),
        ("carol", "limits-only", 0, ""),  # a tier without a budget is still a tier
        ("alice", "team-basic", 0, ""),  # the same tier the policy pools her in: no note
        ("alice", "pro", 0, "shared_users of tier 'team-basic'"),  # stored, but the policy's pool wins
        ("carol", "nope", 1, "--tier 'nope': no such tier"),
        ("carol", "PRO", 1, "budgeting.tiers: team-basic, pro, limits-only"),
    ],
)
def test_keys_create_tier(policy, db, capsys, user, tier, code, message):
    policy.write_text(_TIERED)
    got, out, err = run(capsys, "keys", "create", "--policy", str(policy), "--user", user, "--tier", tier,
                        "--meta", "project=p", "--meta", "team=t", "--json")
    assert got == code, err
    assert message in err
    if code:
        return
    assert json.loads(out)["tier"] == tier
    con = connect(db, read_only=True)
    (stored,) = vkeys.list_keys(con)
    con.close()
    assert stored.tier == tier
    _, js, _ = run(capsys, "keys", "list", "--json", "--policy", str(policy))
    assert json.loads(js)[0]["tier"] == tier
    _, table, _ = run(capsys, "keys", "list", "--policy", str(policy))
    assert table.splitlines()[0].split()[5] == "tier" and f" {tier} " in table


def test_keys_create_tier_without_budgeting(policy, capsys):
    code, _, err = run(capsys, "keys", "create", "--policy", str(policy), "--user", "u", "--tier", "x")
    assert code == 1 and "no such tier" in err and "none defined" in err


def test_keys_create_plain_shows_tier(policy, capsys):
    policy.write_text(_TIERED)
    code, out, _ = run(capsys, "keys", "create", "--policy", str(policy), "--user", "carol", "--tier", "pro",
                       "--meta", "project=p", "--meta", "team=t")
    assert code == 0 and "tier:     pro" in out


# --- usage --by tier ------------------------------------------------------------------------------------------


def test_usage_by_tier(policy, db, capsys):
    fill(db, [
        {**row("alice", "openai:gpt-4o-mini", "1"), "tier": "team"},
        {**row("bob", "openai:gpt-4o-mini", "2"), "tier": "team"},
        {**row("carol", "openai:gpt-4o-mini", "0.5"), "tier": "pro"},
        row("dave", "openai:gpt-4o-mini", "0.25"),
    ])
    code, out, _ = run(capsys, "usage", "--by", "tier", "--json", "--policy", str(policy))
    assert code == 0
    data = json.loads(out, parse_float=Decimal)
    assert [(d["tier"], d["requests"], d["cost_usd"]) for d in data] == [
        ("team", 2, Decimal("3")), ("pro", 1, Decimal("0.5")), (None, 1, Decimal("0.25"))]
    code, out, _ = run(capsys, "usage", "--by", "tier", "--policy", str(policy))
    lines = out.splitlines()
    assert lines[0].split()[0] == "tier" and lines[2].split()[:2] == ["team", "2"]
    assert lines[4].split()[0] == "-"  # requests under no tier


# --- budgets --------------------------------------------------------------------------------------------------

_BUDGETED = """analytics: {database: usage.duckdb}
budgeting:
  tiers:
    - {name: team, limit_usd: 10, reset: daily, shared_users: [alice, bob], alert_at: [0.5]}
    - {name: pro, monthly_limit_usd: 1}
    - {name: limits-only, rate_limits: {requests_per_minute: 10}}
  global: {limit_usd: 100, mode: track}
  per_user: {limit_usd: 2, reset: weekly}
"""


def budget_rows() -> list[dict]:
    return [
        {**row("alice", "openai:gpt-4o-mini", "1.5"), "tier": "team"},
        {**row("bob", "openai:gpt-4o-mini", "0.000000123"), "tier": "team"},
        {**row("alice", "openai:gpt-4o-mini", "7", days_ago=40), "tier": "team"},  # an earlier period
        row("carol", "openai:gpt-4o-mini", "0.25"),
        row("dave", "openai:gpt-4o-mini", None),  # unpriced: no spend, so no line
        {**row("erin", "openai:gpt-4o-mini", "0.1"), "tier": "pro"},
    ]


def budgets_json(capsys, policy) -> dict[str, dict]:
    code, out, err = run(capsys, "budgets", "--json", "--policy", str(policy))
    assert code == 0, err
    return {b["id"]: b for b in json.loads(out, parse_float=Decimal)}


def test_budgets_spent_from_the_ledger(policy, db, capsys):
    policy.write_text(_BUDGETED)
    fill(db, budget_rows())
    got = budgets_json(capsys, policy)
    assert list(got) == ["tier:team", "tier:pro", "user:carol", "global"]  # pools, users with spend, global
    team = got["tier:team"]
    assert (team["name"], team["scope"], team["mode"], team["reset"]) == ("team", "tier", "enforce", "daily")
    assert (team["spent"], team["limit"], team["remaining"]) == (Decimal("1.500000123"), 10, Decimal("8.499999877"))
    assert float(team["pct"]) == pytest.approx(15.00000123) and team["reserved"] is None
    start, end = (datetime.fromisoformat(team[k]) for k in ("period_start", "period_end"))
    assert end == start + timedelta(days=1)
    assert got["tier:pro"]["spent"] == Decimal("0.1") and got["user:carol"]["spent"] == Decimal("0.25")
    assert got["user:carol"]["limit"] == 2
    assert got["global"]["spent"] == Decimal("1.850000123") and got["global"]["mode"] == "track"


def test_budgets_table(policy, db, capsys):
    policy.write_text(_BUDGETED)
    fill(db, budget_rows())
    code, out, _ = run(capsys, "budgets", "--policy", str(policy))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["budget", "scope", "mode", "spent", "limit", "%", "reserved", "period", "end"]
    cells = {ln.split()[0]: ln.split() for ln in lines[2:-1]}
    assert cells["team"][:7] == ["team", "tier", "enforce", "1.500000123", "10.00", "15.0%", "-"]
    assert cells["carol"][:6] == ["carol", "user", "enforce", "0.25", "2.00", "12.5%"]
    assert cells["global"][2:5] == ["track", "1.850000123", "100.00"]
    end = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    assert cells["team"][7:] == [end, "00:00", "UTC"]
    assert "no running gateway" in lines[-1]
    assert lines[0].index("spent") + len("spent") == lines[2].index("1.500000123") + len("1.500000123")  # right-aligned


def test_budgets_reserved_comes_from_the_running_gateway(policy, db, capsys):
    from tollgate.budgets import Budgets
    from tollgate.status import status_path, write_status

    policy.write_text(_BUDGETED)
    fill(db, budget_rows())
    live = Budgets.from_policy(cli.load_policy(str(policy)).budgeting)
    live.reserve("alice", None, Decimal("0.75"))
    live.reserve("frank", None, Decimal("0.5"))  # in flight, nothing in the ledger yet: still shown
    status = {"written_at": datetime.now(UTC).timestamp(), "pid": os.getpid(), "budgets": live.status()}
    write_status(status_path(db), status)
    got = budgets_json(capsys, policy)
    assert got["tier:team"]["reserved"] == Decimal("0.75")
    assert got["tier:team"]["remaining"] == Decimal("7.749999877")
    assert got["global"]["reserved"] == Decimal("1.25")
    assert got["tier:pro"]["reserved"] == 0 and got["user:carol"]["reserved"] == 0
    assert got["user:frank"]["reserved"] == Decimal("0.5") and got["user:frank"]["spent"] == 0
    code, out, _ = run(capsys, "budgets", "--policy", str(policy))
    assert f"pid {os.getpid()}" in out
    assert [ln.split()[6] for ln in out.splitlines() if ln.startswith("team ")] == ["0.75"]


@pytest.mark.parametrize("how", ["stale", "dead pid", "garbage"])
def test_budgets_ignores_a_gone_gateway(policy, db, capsys, how):
    from tollgate.status import status_path, write_status

    policy.write_text(_BUDGETED)
    fill(db, budget_rows())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = {"written_at": datetime.now(UTC).timestamp() - (60 if how == "stale" else 0),
              "pid": dead.pid if how == "dead pid" else os.getpid(),
              "budgets": [{"id": "tier:team", "reserved": "0.5"}]}
    write_status(status_path(db), status)
    if how == "garbage":
        Path(status_path(db)).write_text("{not json")
    assert budgets_json(capsys, policy)["tier:team"]["reserved"] is None


def test_budgets_without_ledger_or_budgets(policy, capsys):
    code, out, err = run(capsys, "budgets", "--policy", str(policy))
    assert code == 0 and "no budgets in" in err
    assert run(capsys, "budgets", "--json", "--policy", str(policy))[1] == "[]\n"
    policy.write_text(_BUDGETED)  # budgets but no ledger yet: nothing spent
    got = budgets_json(capsys, policy)
    assert list(got) == ["tier:team", "tier:pro", "global"]
    assert all(b["spent"] == 0 for b in got.values())


def test_budgets_period_end_in_the_policy_time_zone(policy, capsys):
    policy.write_text("budgeting: {timezone: Asia/Tokyo, global: {limit_usd: 1, reset: never}, "
                      "tiers: [{name: t, limit_usd: 1, reset: daily}]}\n")
    code, out, _ = run(capsys, "budgets", "--policy", str(policy))
    assert code == 0
    cells = {ln.split()[0]: ln.split() for ln in out.splitlines()[2:-1]}
    assert cells["t"][-1] == "JST" and cells["global"][-1] == "never"


@pytest.mark.parametrize(("amount", "text"), [("0", "0.00"), ("100", "100.00"), ("1.5", "1.50"),
                                              ("0.000123", "0.000123"), ("0.000000009", "0.000000009")])
def test_money_format(amount, text):
    assert cli._money(Decimal(amount)) == text
