"""`scripts/bench --ledger-scale`: the ledger at 1M, 10M and 30M rows, in one run.

For each size a synthetic ledger is bulk-written the way ledgers written before this release are laid out
(DuckDB's default 122,880-row row groups, the last one 600 rows short of full: the boundary where landings
used to fail for good), with 1,000 users (100 pooled in a tier), 20 models, over the last 30 days. Then, each
step in a fresh process so that its memory is its own:

  land     the gateway's writer (tollgate.ledger.Ledger) starts on it: the hourly totals' first catch-up,
           the start-up budget recount through the totals (what the gateway runs) and without them (a scan
           of the period, as before), then LANDINGS landings of 300 rows (the first crosses the old
           boundary, later ones several 16,384-row ones): each landing's time holding the file, and the
           writer process's peak RSS.
  CLI      `tollgate usage --by user`, `usage --by day` and `tollgate budgets` on it: wall time and peak RSS.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addons"))

SIZES = (1_000_000, 10_000_000, 30_000_000)
OLD_GROUP = 122_880
LANDINGS = 150
PER_LANDING = 300
POLICY = """\
providers: {{openai: {{api_key: sk-bench-openai-REAL-000000000000000000}}}}
budgeting:
  tiers:
    - {{name: team-a, monthly_limit_usd: 1000000, reset: monthly, mode: enforce}}
  global: {{limit_usd: 100000000, reset: monthly, mode: enforce}}
  per_user: {{limit_usd: 1000000, reset: daily, mode: enforce}}
analytics: {{database: {db}}}
"""


def near_boundary(n: int) -> int:
    """The row count closest to n that leaves the last 122,880-row group 600 rows short of full."""
    return max(1, round(n / OLD_GROUP)) * OLD_GROUP - 600


def build(path: str, n: int) -> dict[str, Any]:
    import duckdb

    from tollgate.ledger import ensure_schema

    t = time.perf_counter()
    con = duckdb.connect(path)
    ensure_schema(con)
    con.execute(f"""
        INSERT INTO requests
        SELECT printf('%032x', i) AS request_id,
               now() - INTERVAL 30 DAY + to_microseconds(CAST(i * (30 * 86400000000 // {n}) AS BIGINT)) AS ts,
               'openai', '/v1/chat/completions', 'model-' || (i % 20), 'model-' || (i % 20) || '-2025',
               'vk_' || lpad(CAST(hash(i) % 1000 AS VARCHAR), 10, '0'),
               'user' || (hash(i) % 1000),
               CASE WHEN hash(i) % 1000 < 100 THEN 'team-a' END,
               '{{"project": "bench"}}', 200, 'ok', i % 2 = 0,
               100 + i % 900, 0, 0, 10 + i % 300, 0, 'provider',
               CAST((100 + i % 900) * 0.00000015 + (10 + i % 300) * 0.0000006 AS DECIMAL(18,9)),
               10.0 + i % 500, 5.0 + i % 100
        FROM range({n}) t(i)""")
    con.close()
    return {"rows": n, "build_s": round(time.perf_counter() - t, 1), "bytes": os.path.getsize(path)}


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def land(path: str, policy: str) -> dict[str, Any]:
    """The writer on an existing ledger: catch-up, recounts, landings (run in a process of its own)."""
    from datetime import UTC, datetime

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import synthetic_row

    from tollgate import totals
    from tollgate.budgets import Budgets
    from tollgate.ledger import Ledger
    from tollgate.policy import load as load_policy

    pol = load_policy(policy)
    rss0 = _rss_peak_mb()
    led = Ledger(path, flush_interval=0.02, land_interval=0.02)
    t = time.perf_counter()
    led.start()
    out: dict[str, Any] = {"start_s": round(time.perf_counter() - t, 3)}
    limit = totals.floor_hour(time.time() - totals.LAG)
    t = time.perf_counter()
    while (wm := led.call(totals.until).result(60)) is None or wm < limit:
        time.sleep(0.05)
    out["catch_up_s"] = round(time.perf_counter() - t, 2)

    def recount(with_totals: bool) -> float:
        b = Budgets.from_policy(pol.budgeting, None)
        now = time.time()

        def run(con):
            q = b.spend_query(now, totals.until(con) if with_totals else None)
            t0 = time.perf_counter()
            rows = con.execute(q.sql, q.params).fetchall()
            return time.perf_counter() - t0, len(rows)

        return led.call(run).result(300)[0]

    out["recount_s"] = round(statistics.median(recount(True) for _ in range(3)), 3)
    out["recount_rows_s"] = round(recount(False), 3)  # the period scanned row by row, as before the totals
    times: list[float] = []
    now = time.time()
    base = 10**12
    for k in range(LANDINGS):
        for j in range(PER_LANDING):
            led.record(synthetic_row(base + k * PER_LANDING + j, now))
        before = led.stats["write_seconds"]
        if not led.flush(60):
            out["error"] = f"landing {k} did not land within 60 s"
            break
        times.append(led.stats["write_seconds"] - before)
    led.stop()
    times.sort()
    out.update(landings=len(times), land_p50_ms=round(times[len(times) // 2] * 1000, 1),
               land_p99_ms=round(times[int(len(times) * 0.99)] * 1000, 1), land_max_ms=round(times[-1] * 1000, 1),
               writer_rss_mb=round(_rss_peak_mb(), 1), rss_before_mb=round(rss0, 1),
               rows_after=None, stamp=datetime.now(UTC).isoformat())
    import duckdb

    con = duckdb.connect(path, read_only=True)
    out["rows_after"] = con.execute("SELECT count(*) FROM requests").fetchone()[0]
    out["row_groups_written"] = con.execute(
        "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('requests')").fetchone()[0]
    con.close()
    return out


def timed(cmd: list[str]) -> dict[str, Any]:
    """Wall seconds and peak RSS of a command (GNU time)."""
    p = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True)
    last = p.stderr.strip().splitlines()[-1].split()
    return {"s": float(last[0]), "rss_mb": round(int(last[1]) / 1024, 1), "rc": p.returncode}


def run(d: Path, sizes=SIZES) -> dict[str, Any]:
    py = sys.executable
    tg = str(Path(py).parent / "tollgate")
    results = []
    for n in sizes:
        n = near_boundary(n)
        db = d / f"l{n}.duckdb"
        pol = d / f"p{n}.yaml"
        pol.write_text(POLICY.format(db=db))
        print(f"[ledger-scale] building {n:,} rows", file=sys.stderr, flush=True)
        r = json.loads(subprocess.run([py, __file__, "build", str(db), str(n)], check=True,
                                      capture_output=True, text=True).stdout)
        print(f"[ledger-scale] the writer on {n:,} rows", file=sys.stderr, flush=True)
        r |= json.loads(subprocess.run([py, __file__, "land", str(db), str(pol)], check=True,
                                       capture_output=True, text=True).stdout)
        for name, args in (("usage_user", ["usage", "--by", "user"]), ("usage_day", ["usage", "--by", "day"]),
                           ("budgets", ["budgets"])):
            r[name] = timed([tg, "--policy", str(pol), *args])
        r["usage_sql_s"] = json.loads(subprocess.run([py, __file__, "query", str(db)], check=True,
                                                     capture_output=True, text=True).stdout)
        r["bytes_per_row"] = round(os.path.getsize(db) / r["rows_after"], 1)
        results.append(r)
        for p in d.glob(f"l{n}.duckdb*"):
            p.unlink()
    ok = all(r.get("error") is None and r["land_p50_ms"] <= 20 and r["land_max_ms"] <= 1000
             and r["recount_s"] <= 1 and r["usage_user"]["s"] <= 1 and r["usage_day"]["s"] <= 1
             and all(r[k]["rc"] == 0 for k in ("usage_user", "usage_day", "budgets")) for r in results)
    return {"sizes": results, "ok": ok}


def report(raw: dict[str, Any], cmd: str, env: dict[str, str]) -> str:
    lines = ["| rows | landing p50 / p99 / max (ms) | writer peak RSS | recount at start: totals / rows (s) "
             "| first catch-up (s) | usage --by user / day: command (s, peak MB) | their SQL: totals / rows (s) "
             "| budgets (s) | bytes/row |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in raw["sizes"]:
        u, dd, b, q = r["usage_user"], r["usage_day"], r["budgets"], r["usage_sql_s"]
        lines.append(f"| {r['rows']:,} | {r['land_p50_ms']} / {r['land_p99_ms']} / {r['land_max_ms']} "
                     f"| {r['writer_rss_mb']} MB | {r['recount_s']} / {r['recount_rows_s']} | {r['catch_up_s']} "
                     f"| {u['s']} ({u['rss_mb']} MB) / {dd['s']} ({dd['rss_mb']} MB) "
                     f"| {q['user']} / {q['user_rows']}; {q['day']} / {q['day_rows']} | {b['s']} "
                     f"| {r['bytes_per_row']} |")
        if r.get("error"):
            lines.append(f"\n**{r['rows']:,} rows: {r['error']}**")
    lines.append("")
    lines.append("Targets: landing ≤ 20 ms (p50) and ≤ 1 s (max, the boundary crossings included); recount ≤ 1 s; "
                 f"usage ≤ 1 s — {'all met' if raw['ok'] else 'NOT all met'}. {LANDINGS} landings of "
                 f"{PER_LANDING} rows per size, the first crossing the old 122,880-row boundary.")
    lines.append(f"\nCommand: `{cmd}` — {env['machine']}; {env['versions']}.")
    return "\n".join(lines)


def query(path: str) -> dict[str, float]:
    """The usage reports' SQL alone (what the CLI's ~0.5 s of start-up, imports and policy, is added to)."""
    import duckdb

    from tollgate import totals
    from tollgate.cli import usage_query

    con = duckdb.connect(path, read_only=True)
    out = {}
    for by in ("user", "day"):
        sql, params = usage_query(by, None, totals.until(con))
        t = time.perf_counter()
        con.execute(sql, params).fetchall()
        out[by] = round(time.perf_counter() - t, 3)
        sql, params = usage_query(by, None, None)  # every row, as before the totals
        t = time.perf_counter()
        con.execute(sql, params).fetchall()
        out[f"{by}_rows"] = round(time.perf_counter() - t, 3)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "build":
        print(json.dumps(build(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1] == "query":
        print(json.dumps(query(sys.argv[2])))
    elif sys.argv[1] == "land":
        print(json.dumps(land(sys.argv[2], sys.argv[3]), default=str))
