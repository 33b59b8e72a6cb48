"""The agent CLIs teams put behind a gateway, run through it against the stand-in: Codex CLI and Claude Code.

Both are installed with npm into a cache folder outside the repo (reused when present); the tests skip only
where `npm` itself is missing. Codex opens the Responses API over a WebSocket (`wss://api.openai.com/v1/
responses`, with a `generate: false` prewarm turn before the real one); Claude Code streams Anthropic
Messages. Each answers with the stand-in's text, and each of their model turns is a ledger row.

Nothing reaches the internet: the policy's base_url sends the provider hosts to the stand-in, and
offline_guard.py (loaded beside the gateway) refuses every other host the CLIs call home to.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from standin import ANSWER, WS_EVENT

from .harness import settled_rows

CODEX = "@openai/codex@0.171.0"
CLAUDE = "@anthropic-ai/claude-code@2.1.197"
NPM_DIR = Path(os.environ.get("TOLLGATE_TEST_NPM_DIR", Path.home() / ".cache" / "tollgate-tests" / "npm"))
GUARD = Path(__file__).with_name("offline_guard.py")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clis() -> dict[str, Path]:
    """{"codex": path, "claude": path}, installed with npm on first use (a few minutes), then reused."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("SKIPPED LOUDLY: `npm` is not installed on this machine, so Codex CLI and Claude Code cannot be "
                    "installed; install Node.js/npm to run these tests")
    bins = {"codex": NPM_DIR / "node_modules" / ".bin" / "codex", "claude": NPM_DIR / "node_modules" / ".bin" / "claude"}
    versions = NPM_DIR / ".installed"
    wanted = f"{CODEX} {CLAUDE}"
    if not all(p.exists() for p in bins.values()) or not versions.exists() or versions.read_text() != wanted:
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR), CODEX, CLAUDE],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"npm install failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        versions.write_text(wanted)
    for name, p in bins.items():
        assert p.exists(), f"{name} was not installed at {p}"
    return bins


@pytest.fixture
def guarded(make_gateway, tmp_path, monkeypatch):
    """A gateway with the offline guard beside it; returns (gateway, file listing the hosts it refused)."""
    log = tmp_path / "blocked-hosts.txt"
    monkeypatch.setenv("OFFLINE_GUARD_LOG", str(log))
    gw = make_gateway(extra_args=["-s", str(GUARD)])
    return gw, log


def _cli_env(gw, home: Path, **extra: str) -> dict[str, str]:
    """A fresh user's shell: no real keys, the proxy and the gateway's CA, a private HOME."""
    home.mkdir(parents=True, exist_ok=True)
    bundle = gw.env["SSL_CERT_FILE"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
           "HTTPS_PROXY": f"http://127.0.0.1:{gw.port}", "HTTP_PROXY": f"http://127.0.0.1:{gw.port}",
           "NO_PROXY": "", "SSL_CERT_FILE": bundle, "NODE_EXTRA_CA_CERTS": str(gw.confdir / "mitmproxy-ca-cert.pem"),
           "NODE_USE_ENV_PROXY": "1"}
    env.update(extra)
    return env


def test_codex_exec_over_the_websocket_is_metered_per_turn(clis, guarded, standin, tmp_path):
    gw, blocked = guarded
    key = gw.create_key("codex-user", live=True)
    home = tmp_path / "codex-home"
    work = tmp_path / "work"
    work.mkdir()
    env = _cli_env(gw, home, CODEX_HOME=str(home), CODEX_API_KEY=key["key"], OPENAI_API_KEY=key["key"],
                   CODEX_CA_CERTIFICATE=gw.env["SSL_CERT_FILE"])
    t0 = time.time()
    r = subprocess.run([str(clis["codex"]), "exec", "--skip-git-repo-check", "say hi"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert ANSWER in r.stdout, out[-3000:]
    creates = [x for x in standin.requests if x.api == WS_EVENT and x.time >= t0 and b'"response.create"' in x.body]
    upgrades = [x for x in standin.requests if x.api == "openai.responses_ws" and x.time >= t0]
    assert upgrades, "Codex did not use the Responses WebSocket"
    assert key["key"] not in str([u.headers for u in upgrades]), "the virtual key reached the provider"
    rows = settled_rows(gw, f"key_id = '{key['key_id']}' and endpoint = '/v1/responses'", since=t0, n=len(creates))
    assert len(rows) == len(creates) >= 1, (rows, len(creates))
    assert all(r["outcome"] == "ok" and r["token_source"] == "provider" and r["input_tokens"] >= 10 for r in rows)
    assert {r["model"] for r in rows} == {c.model for c in creates}
    prewarms = sum(1 for c in creates if b'"generate":false' in c.body)
    assert sorted(r["output_tokens"] for r in rows) == [0] * prewarms + [8] * (len(rows) - prewarms), rows
    print(f"codex: {len(creates)} turns on {len(upgrades)} socket(s) -> {len(rows)} rows; "
          f"hosts refused by the offline guard: {sorted(set(blocked.read_text().split())) if blocked.exists() else []}")


def test_claude_code_print_mode_is_metered(clis, guarded, standin, tmp_path):
    gw, blocked = guarded
    key = gw.create_key("claude-user", live=True)
    env = _cli_env(gw, tmp_path / "claude-home", ANTHROPIC_API_KEY=key["key"],
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1", DISABLE_TELEMETRY="1")
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.time()
    r = subprocess.run([str(clis["claude"]), "-p", "say hi"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=180, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert ANSWER in r.stdout, out[-3000:]
    sent = [x for x in standin.requests if x.api == "anthropic.messages" and x.time >= t0]
    assert sent and all(x.headers.get("x-api-key") != key["key"] for x in sent)
    rows = settled_rows(gw, f"key_id = '{key['key_id']}' and endpoint = '/v1/messages'", since=t0, n=len(sent))
    assert len(rows) == len(sent), (rows, len(sent))
    assert all(r["outcome"] == "ok" and r["token_source"] == "provider" and r["output_tokens"] == 8 for r in rows)
    print(f"claude: {len(sent)} message requests -> {len(rows)} rows; hosts refused by the offline guard: "
          f"{sorted(set(blocked.read_text().split())) if blocked.exists() else []}")
