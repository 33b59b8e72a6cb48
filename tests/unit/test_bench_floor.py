"""scripts/bench --floor: the minimal key-swapping addon it runs in tollgate's place, and its report."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from mitmproxy.test import taddons, tflow, tutils

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
REAL = "sk-floor-test-REAL-0000"


def _module(name: str):
    """A script of scripts/ as a module of its own name (registered: dataclasses look their module up)."""
    qual = f"_bench_scripts_{name}"
    if qual in sys.modules:
        return sys.modules[qual]
    spec = importlib.util.spec_from_file_location(qual, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[qual] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def floor(tmp_path: Path):
    policy = tmp_path / "policies.yaml"
    policy.write_text(yaml.safe_dump({"providers": {"openai": {"api_key": REAL,
                                                               "base_url": "https://127.0.0.1:8443/v1"}}}))
    addon = _module("bench_floor").Floor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tollgate_policy=str(policy))
        yield addon


def _flow(host: str, auth: str | None):
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", path=b"/v1/chat/completions"))
    if auth is not None:
        f.request.headers["authorization"] = auth
    return f


@pytest.mark.parametrize("auth, status", [(None, 401), ("Bearer sk-app-key", 401), ("Bearer tg-virtual", None)])
def test_floor_checks_the_credential(floor, auth: str | None, status: int | None) -> None:
    f = _flow("api.openai.com", auth)
    floor.requestheaders(f)
    assert (f.response.status_code if f.response else None) == status
    if status is None:
        assert f.request.headers["authorization"] == f"Bearer {REAL}"
        assert (f.request.scheme, f.request.host, f.request.port) == ("https", "127.0.0.1", 8443)


def test_floor_leaves_other_hosts_alone(floor) -> None:
    f = _flow("example.com", "Bearer tg-virtual")
    floor.requestheaders(f)
    assert f.response is None and f.request.headers["authorization"] == "Bearer tg-virtual"
    assert f.request.host == "example.com"


@pytest.mark.parametrize("ctype, streamed", [("text/event-stream", True), ("text/event-stream; charset=utf-8", True),
                                             ("application/json", False)])
def test_floor_streams_sse_only(floor, ctype: str, streamed: bool) -> None:
    f = _flow("api.openai.com", "Bearer tg-virtual")
    f.response = tutils.tresp(headers=[(b"content-type", ctype.encode())])
    floor.responseheaders(f)
    assert bool(f.response.stream) is streamed


def _run(rps: float) -> dict:
    return {"n": 10, "ok": 10, "rps": rps, "rps_rounds": [rps], "p50_ms": 3.0, "p50_ms_rounds": [3.0],
            "mean_ms_rounds": [3.1], "cpu_ms_per_request": 3.0, "p99_ms": 4.0}


@pytest.mark.parametrize("floor_run", [True, False])
def test_report_names_the_floor_and_skips_the_ledger(floor_run: bool) -> None:
    bench = _module("bench")
    res = {"runs": {name: {"bare": _run(300.0), "tollgate": _run(290.0)}
                    for name in ("JSON c=1", "JSON c=8", "SSE c=1", "SSE c=8")},
           "ttft_ms": {"bare": {"median": 5.0}, "tollgate": {"median": 5.1}}, "ttft_n": 5,
           "ledger": None if floor_run else {"rows": 40, "sent": 40, "outcomes": {"ok": 40}},
           "rss_before": {"bare": 70.0, "bare-stream": 70.0, "tollgate": 71.0},
           "rss_after": {"bare": 71.0, "bare-stream": 71.0, "tollgate": 72.0}, "floor": floor_run}
    text, ok = bench.report_compare(res, "scripts/bench", {"machine": "m", "versions": "v"})
    assert ok
    assert ("scripts/bench_floor.py" in text) is floor_run
    assert ("(--floor keeps no ledger)" in text) is floor_run
    assert ("| 40 / 40 (ok 40) | equal | yes |" in text) is not floor_run


@pytest.mark.parametrize("argv, ok", [(["--floor"], True), (["--floor", "--quick"], True),
                                      (["--floor", "--pin", "--rounds", "3"], True), (["--floor", "--hooks"], False),
                                      (["--floor", "--soak"], False), (["--floor", "--ledger"], False)])
def test_floor_is_a_comparison_option(argv: list[str], ok: bool, capsys) -> None:
    bench = _module("bench")
    if ok:
        assert bench.parse_args(argv).floor
    else:
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert "--floor replaces tollgate in the comparison" in capsys.readouterr().err
