"""scripts/bench --quick runs end to end: nginx, bare mitmdump and tollgate, hey through both, the paced
time-to-first-token client, and the ledger count. Proves the benchmark works; its figures mean nothing here."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench"


@pytest.fixture(scope="module")
def bench_env() -> dict[str, str]:
    """The environment the bench runs in (no proxy variables), once hey and nginx are installed (or a skip)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    inst = subprocess.run([str(BENCH), "--install"], capture_output=True, text=True, env=env, timeout=360)
    if inst.returncode == 2:
        pytest.skip(f"hey/nginx cannot be installed here: {inst.stderr.strip()[-300:]}")
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return env


@pytest.mark.timeout(420)  # the install may download hey and nginx; the run itself is bounded to 60 s below
def test_bench_quick(tmp_path: Path, bench_env: dict[str, str]) -> None:
    env = bench_env
    out = tmp_path / "bench.json"
    r = subprocess.run([str(BENCH), "--quick", "--json", str(out)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
    assert "| path | bare req/s | tollgate req/s |" in r.stdout
    assert "Command: `scripts/bench --quick" in r.stdout
    res = json.loads(out.read_text())["results"]
    for path, by_proxy in res["runs"].items():
        for proxy, run in by_proxy.items():
            assert run["n"] > 0 and run["ok"] == run["n"], (path, proxy, run)
    assert res["ledger"]["rows"] == res["ledger"]["sent"] == res["ledger"]["outcomes"].get("ok"), res["ledger"]
    assert res["ttft_ms"]["tollgate"]["median"] > 0 and res["ttft_ms"]["bare"]["median"] > 0


@pytest.mark.timeout(420)
def test_bench_floor_quick(tmp_path: Path, bench_env: dict[str, str]) -> None:
    """scripts/bench --floor: the same comparison with scripts/bench_floor.py in tollgate's place."""
    env = bench_env
    out = tmp_path / "floor.json"
    r = subprocess.run([str(BENCH), "--floor", "--quick", "--json", str(out)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
    assert "scripts/bench_floor.py" in r.stdout and "(--floor keeps no ledger)" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert res["floor"] is True and res["ledger"] is None
    for path, by_proxy in res["runs"].items():
        for proxy, run in by_proxy.items():
            assert run["n"] > 0 and run["ok"] == run["n"], (path, proxy, run)  # the floor swapped the key


@pytest.mark.timeout(180)
def test_bench_hooks_mode(tmp_path: Path) -> None:
    """scripts/bench --hooks needs no network or tools: tollgate's hooks in-process, warm and cache-evicted."""
    out = tmp_path / "hooks.json"
    r = subprocess.run([str(BENCH), "--hooks", "--hooks-n", "30", "--rounds", "1", "--evict-mb", "1", "--json",
                        str(out)], capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
    assert "| path | hook | warm µs | caches evicted µs | evicted / warm |" in r.stdout
    res = json.loads(out.read_text())["results"]
    for path in ("JSON", "SSE"):
        assert res[path]["warm"]["all"] > 0 and res[path]["evicted"]["all"] > 0
        assert res[path]["python"]["tollgate"]["functions"] > 10  # the hooks really ran tollgate's code


@pytest.mark.timeout(420)
def test_bench_ws_mode(tmp_path: Path, bench_env: dict[str, str]) -> None:
    """scripts/bench --ws: turns on one socket through bare and tollgate; every turn is a row."""
    out = tmp_path / "ws.json"
    r = subprocess.run([str(BENCH), "--ws", "--rounds", "1", "--ws-turns", "10", "--json", str(out)],
                       capture_output=True, text=True, env=bench_env, timeout=120)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
    assert "| WebSocket turns, c=1 (one socket per round) |" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert res["rows"] == res["sent"] == res["outcomes"]["ok"] > 10, res
    assert len(res["tollgate"]["all"]) == len(res["bare"]["all"]) == 10
