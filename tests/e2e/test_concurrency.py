"""An auditor reads the ledger in a loop from another process while 40 requests run at once.

DuckDB allows one writer *process*, and a read-only open takes the file lock too. The gateway therefore attaches
the file only for a few milliseconds per batch; a reader that tries to open it in that moment gets a lock
error and must retry (as `tollgate sql` does). That is expected and counted. Any other error is a failure, and
every one of the 40 requests must land as exactly one row (rows the reader delays wait in the spool).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import duckdb
import openai
import pytest
from standin import ANSWER, expected_usage

pytestmark = pytest.mark.timeout(240)

N = 40

# The auditor: connect read-only, count, close, again, until told to stop (or a hard bound passes).
READER = r"""
import json, os, sys, time
import duckdb

db, stop_file, out_file, ready_file = sys.argv[1:5]
iterations = retries = 0
errors, counts = [], []
hard_stop = time.monotonic() + 180
while not os.path.exists(stop_file) and time.monotonic() < hard_stop:
    try:
        con = duckdb.connect(db, read_only=True)
        try:
            counts.append(con.execute("select count(*) from requests").fetchone()[0])
        finally:
            con.close()
        iterations += 1
    except duckdb.Error as e:
        low = str(e).lower()
        if isinstance(e, duckdb.IOException) and ("could not set lock" in low or "conflicting lock" in low):
            retries += 1  # the gateway holds the file for its few milliseconds: try again
        else:
            errors.append(f"{type(e).__name__}: {e}")
    if iterations + retries + len(errors) == 1:
        open(ready_file, "w").close()
    time.sleep(0.01)  # back-to-back, as a script polling the ledger would; each open holds the file ~30 ms
with open(out_file, "w") as f:
    json.dump({"iterations": iterations, "retries": retries, "errors": errors[:20], "n_errors": len(errors),
               "counts": counts}, f)
"""


def wait_for_ledger(db, timeout: float = 20) -> int:
    """Rows in the ledger once it exists with its schema (the gateway creates it on its first round)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            con = duckdb.connect(str(db), read_only=True)
            try:
                return con.execute("select count(*) from requests").fetchone()[0]
            finally:
                con.close()
        except (duckdb.IOException, duckdb.CatalogException):
            assert time.monotonic() < deadline, f"no ledger at {db} after {timeout}s"
            time.sleep(0.05)


def test_reader_loop_during_40_concurrent_requests(make_gateway, standin, monkeypatch, tmp_path):
    gw = make_gateway()
    for k, v in gw.env.items():
        monkeypatch.setenv(k, v)
    vk = gw.create_key("alice", live=True)
    wait_for_ledger(gw.db)
    t0 = time.time()  # this test's rows are the ones at or after t0 (the key's liveness probes came before)

    script = tmp_path / "reader.py"
    script.write_text(READER)
    stop_file, out_file, ready = tmp_path / "stop-reader", tmp_path / "reader.json", tmp_path / "reader-ready"
    reader = subprocess.Popen([sys.executable, str(script), str(gw.db), str(stop_file), str(out_file), str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():  # the reader loops before the burst starts (importing duckdb takes a moment)
            assert reader.poll() is None and time.monotonic() < deadline, "the reader did not start"
            time.sleep(0.02)
        client = openai.OpenAI(api_key=vk["key"], max_retries=0, timeout=90)
        start = threading.Barrier(N)

        def one(i: int) -> tuple[bool, str]:
            stream = i % 2 == 0
            model = "gpt-4o-mini-paced-20" if i % 4 == 0 else "gpt-4o-mini"  # some streams last a while
            start.wait(timeout=60)
            if stream:
                chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                             stream=True))
                return True, "".join(c.choices[0].delta.content or "" for c in chunks)
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            return False, r.choices[0].message.content

        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=N) as pool:
            results = list(pool.map(one, range(N)))
        burst = time.monotonic() - began
        assert all(text == ANSWER for _, text in results), results

        rows = gw.rows(since=t0, wait_for=N, timeout=90)
        landed = time.monotonic() - began
        time.sleep(1.0)  # a few more flush rounds, still under the reader's loop: a duplicate would show now
    finally:
        stop_file.touch()
        try:
            out, _ = reader.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            reader.kill()
            out, _ = reader.communicate()
    assert reader.returncode == 0, out.decode(errors="replace")
    report = json.loads(out_file.read_text())
    print(f"\n40 concurrent requests: burst {burst:.2f}s, all rows landed after {landed:.2f}s; reader: "
          f"{report['iterations']} reads, {report['retries']} lock retries, {report['n_errors']} errors")

    assert report["n_errors"] == 0, report["errors"]
    assert report["iterations"] > 0
    counts = report["counts"]
    assert counts == sorted(counts), "a reader saw the row count go down"
    assert len(rows) == N, f"{len(rows)} rows for {N} requests"
    rows = gw.rows(since=t0)
    assert len(rows) == N, f"exactly {N} new rows (no duplicates, none lost), got {len(rows)}"
    assert len({r["request_id"] for r in rows}) == N
    expected = expected_usage("openai.chat", {"model": "gpt-4o-mini", "messages": [{}]})
    for r in rows:
        assert (r["outcome"], r["user_id"], r["token_source"]) == ("ok", "alice", "provider"), r
        assert all(r[k] == v for k, v in expected.items()), (r, expected)
    assert sum(r["stream"] for r in rows) == N // 2
