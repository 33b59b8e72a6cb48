"""`scripts/bench --hooks`: tollgate's hooks in one process, with warm caches and with caches evicted.

Why this mode exists: in the running gateway (perf_counter around tollgate's four hooks, c=1) the hooks take
~400 µs of CPU per request, while the same hooks in a tight loop take ~120 µs. The gap is the CPU caches:
on a machine where the load generator, the upstream and the proxy share two cores, every request finds
tollgate's code and data (~90 Python functions, their bytecode, the policy, limiter and budget state)
evicted by the other processes. This mode reproduces that without the network and without the other
processes: before each request it overwrites a buffer several times the size of the L2 cache (outside the
timed part), so the figures are the hooks' own, warm and cold, with no load generator's noise.

It also counts what one request runs in Python (sys.setprofile): distinct functions and calls, tollgate's
and mitmproxy's. That count is deterministic, and the cold figure follows it more than any single function.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HOOKS = ("requestheaders", "request", "responseheaders", "response")
VKEY = "tg-bench-hooks-virtual-key-000000000000000000"


def cache_sizes() -> str:
    """This machine's cache sizes as sysfs lists them for CPU 0, e.g. 'L1d 48K, L1i 32K, L2 2048K, L3 ...'."""
    out = []
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            level, kind, size = ((idx / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        out.append(f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''} {size}")
    return ", ".join(out) or "unknown"


class Lab:
    """A configured Gateway (bench policy, a valid virtual key) and ready-made flows for one path."""

    def __init__(self, gateway: Any, stream: bool, request: bytes, answer: bytes):
        self.g, self.stream, self.request, self.answer = gateway, stream, request, answer

    def flows(self, n: int) -> list[tuple[Any, Any]]:
        from mitmproxy.test import tflow, tutils

        out = []
        for _ in range(n):
            f = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https",
                                            path=b"/v1/chat/completions", content=self.request))
            f.request.headers["authorization"] = f"Bearer {VKEY}"
            f.request.headers["content-type"] = "application/json"
            now = time.time()
            f.request.timestamp_start, f.request.timestamp_end = now, now
            if self.stream:
                r = tutils.tresp(content=b"")
                r.headers["content-type"] = "text/event-stream"
            else:
                r = tutils.tresp(content=self.answer)
                r.headers["content-type"] = "application/json"
            r.headers["content-length"] = str(len(self.answer))
            r.timestamp_start = r.timestamp_end = now
            out.append((f, r))
        return out

    async def one(self, f: Any, r: Any, t: list[float]) -> None:
        """The hooks of one request, as mitmproxy calls them; t[i] += seconds spent in hook i."""
        g, pc = self.g, time.perf_counter
        t0 = pc()
        g.requestheaders(f)
        t1 = pc()
        await g.request(f)
        t2 = pc()
        f.response = r
        g.responseheaders(f)
        if self.stream:  # the tap is part of this path's cost: the whole answer in one chunk, then the end
            r.stream(self.answer)
            r.stream(b"")
        t3 = pc()
        await g.response(f)
        t4 = pc()
        t[0] += t1 - t0
        t[1] += t2 - t1
        t[2] += t3 - t2
        t[3] += t4 - t3


async def _measure(lab: Lab, n: int, rounds: int, evict_mb: int) -> dict[str, Any]:
    big_a, big_b = bytearray(evict_mb << 20), bytes(evict_mb << 20)
    per: dict[str, list[list[float]]] = {"warm": [], "evicted": []}
    for f, r in lab.flows(200):  # warm-up: caches of the pricing plan, limiter plan, key lookup
        await lab.one(f, r, [0.0] * 4)
    for i in range(rounds):
        for mode in (("warm", "evicted") if i % 2 == 0 else ("evicted", "warm")):
            flows = lab.flows(n)
            t = [0.0] * 4
            for f, r in flows:
                if mode == "evicted":
                    big_a[:] = big_b  # untimed: the other processes' work between two requests
                await lab.one(f, r, t)
            per[mode].append([x / n * 1e6 for x in t])
    out: dict[str, Any] = {}
    for mode, runs in per.items():
        cols = list(zip(*runs))
        out[mode] = {h: statistics.median(c) for h, c in zip(HOOKS, cols)}
        out[mode]["all"] = statistics.median(sum(r) for r in runs)
        out[mode]["rounds"] = [round(sum(r), 1) for r in runs]
    return out


async def _count(lab: Lab) -> dict[str, Any]:
    """Python functions (distinct, and calls) one request runs, by package."""
    flows = lab.flows(11)
    await lab.one(*flows[0], [0.0] * 4)
    calls: Counter = Counter()

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls[(frame.f_code.co_filename, frame.f_code.co_firstlineno, frame.f_code.co_name)] += 1

    sys.setprofile(prof)
    try:
        for f, r in flows[1:]:
            await lab.one(f, r, [0.0] * 4)
    finally:
        sys.setprofile(None)
    by: dict[str, list[float]] = {}
    for (path, _, name), c in calls.items():
        if name == "one" or name == "prof":
            continue
        owner = "tollgate" if "/tollgate/" in path else "mitmproxy" if "/mitmproxy/" in path else "stdlib/other"
        d = by.setdefault(owner, [0, 0.0])
        d[0] += 1
        d[1] += c / 10
    return {k: {"functions": v[0], "calls": round(v[1], 1)} for k, v in sorted(by.items())}


def run(policy: dict, request: dict, answers: tuple[bytes, bytes], *, n: int, rounds: int,
        evict_mb: int) -> dict[str, Any]:
    import yaml
    from mitmproxy.test import taddons
    from tollgate.addon import Gateway
    from tollgate.keys import KeyRecord, hash_key

    d = Path(tempfile.mkdtemp(prefix="tollgate-hooks-"))
    policy = json.loads(json.dumps(policy))
    policy["analytics"]["database"] = str(d / "usage.duckdb")
    (d / "policies.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    results: dict[str, Any] = {"n": n, "rounds": rounds, "evict_mb": evict_mb, "caches": cache_sizes()}

    async def main() -> None:
        g = Gateway()
        with taddons.context(g) as tctx:
            tctx.configure(g, tollgate_policy=str(d / "policies.yaml"))
            key = hash_key(VKEY)
            g.auth.set_keys({key: KeyRecord("vk_bench", key, "bench", datetime.now(UTC), None, None, {})})
            g._start_spend_task()  # the budgets' spend read from the ledger before the first request
            if g._spend_task is not None:
                await g._spend_task
            for name, stream in (("JSON", False), ("SSE", True)):
                body = json.dumps({**request, "stream": True} if stream else request).encode()
                lab = Lab(g, stream, body, answers[1] if stream else answers[0])
                results[name] = await _measure(lab, n, rounds, evict_mb)
                results[name]["python"] = await _count(lab)
            g.done()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return results


def report(res: dict[str, Any], cmd: str, env: dict[str, str]) -> str:
    lines = [f"tollgate's hooks in one process, µs per request: median of {res['rounds']} alternating rounds of "
             f"{res['n']} requests; 'evicted': {res['evict_mb']} MB overwritten before each request (untimed). "
             f"Caches: {res['caches']}.", "",
             "| path | hook | warm µs | caches evicted µs | evicted / warm |", "|---|---|---|---|---|"]
    for path in ("JSON", "SSE"):
        r = res[path]
        for h in (*HOOKS, "all"):
            label = "responseheaders + tap" if h == "responseheaders" and path == "SSE" else h
            w, e = r["warm"][h], r["evicted"][h]
            lines.append(f"| {path} | {'**all four**' if h == 'all' else label} | {w:.1f} | {e:.1f} | {e / w:.2f} |")
    lines += ["", "Python run per request (sys.setprofile, deterministic): distinct functions / calls", ""]
    for path in ("JSON", "SSE"):
        parts = [f"{k} {v['functions']} / {v['calls']:g}" for k, v in res[path]["python"].items()]
        lines.append(f"- {path}: " + "; ".join(parts))
    lines += ["", "Rounds (all four hooks, µs): " + "; ".join(
        f"{p} warm {res[p]['warm']['rounds']}, evicted {res[p]['evicted']['rounds']}" for p in ("JSON", "SSE")),
        "", f"Command: `{cmd}` — {env.get('cpu') or 'this machine'}; {env['versions']}."]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - run through scripts/bench --hooks
    sys.exit("run it as: scripts/bench --hooks")
