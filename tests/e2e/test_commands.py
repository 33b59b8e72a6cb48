"""The commands a new user types: scripts/run, tollgate run/env/usage/sql, and a bad policy at start."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import duckdb
import openai
import pytest

from .harness import BIN, GATEWAY_SCRIPT, REAL_KEYS, ROOT, clean_env, find_secrets, free_port, wait_key

pytestmark = pytest.mark.timeout(180)

MSGS = [{"role": "user", "content": "hi"}]
MASTER_KEY = "tg-master-SECRET-000000000000000000"


def tollgate(policy: Path, *args: str, confdir: Path, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess:
    e = clean_env(TOLLGATE_CONFDIR=str(confdir)) if env is None else env
    return subprocess.run([str(BIN / "tollgate"), *args, "--policy", str(policy)], capture_output=True, text=True,
                          env=e, timeout=60)


def sdk_env(monkeypatch, proxy_port: int, confdir: Path) -> None:
    """This process as an app using the gateway on proxy_port (the mitmproxy CA is all it needs to trust)."""
    for k in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.setenv("SSL_CERT_FILE", str(confdir / "mitmproxy-ca-cert.pem"))


def ledger_rows(db: Path, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            con = duckdb.connect(str(db), read_only=True)
            break
        except duckdb.IOException:
            assert time.monotonic() < deadline, f"{db} stayed locked"
            time.sleep(0.05)
    try:
        cur = con.execute("select * from requests order by ts")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def repo_policy_copy(folder: Path) -> tuple[Path, int]:
    """The repo's own policies.yaml, byte for byte except free ports (its database is relative: lands here)."""
    text = (ROOT / "policies.yaml").read_text()
    proxy_port, api_port = free_port(), free_port()
    text, n1 = re.subn(r"(?m)^(\s+proxy_port:\s*)8080\b", rf"\g<1>{proxy_port}", text)
    text, n2 = re.subn(r"(?m)^(\s+port:\s*)8000\b", rf"\g<1>{api_port}", text)
    assert (n1, n2) == (1, 1), "policies.yaml no longer has gateway.port 8000 / proxy_port 8080; update this test"
    assert "database: usage.duckdb" in text
    folder.mkdir(parents=True, exist_ok=True)
    policy = folder / "policies.yaml"
    policy.write_text(text)
    return policy, proxy_port


# --- 6. a bad policy stops the start with one clear line --------------------------------------------------

BAD_POLICIES = {
    "typo": ("providers: {openai: {api_kye: x}}\n", "providers.openai.api_kye", "unknown key"),
    "unset-var": ("providers:\n  openai:\n    api_key: ${NOPE_UNSET_TOLLGATE_VAR}\n",
                  "providers.openai.api_key", "${NOPE_UNSET_TOLLGATE_VAR} is not set"),
    "bad-port": ("gateway: {proxy_port: eighty}\n", "gateway.proxy_port", "must be a whole number"),
}


@pytest.mark.parametrize("runner", ["mitmdump", "tollgate run"])
@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_bad_policy_stops_the_start(tmp_path, confdir, procs, monkeypatch, case, runner):
    text, keypath, problem = BAD_POLICIES[case]
    bad = tmp_path / "bad-policy.yaml"
    bad.write_text(text)
    env = clean_env(TOLLGATE_CONFDIR=str(confdir))
    env.pop("NOPE_UNSET_TOLLGATE_VAR", None)
    port = free_port()
    if runner == "mitmdump":
        args = [BIN / "mitmdump", "-s", GATEWAY_SCRIPT, "--set", f"tollgate_policy={bad}", "--set",
                f"confdir={confdir}", "--listen-host", "127.0.0.1", "--mode", f"regular@{port}"]
    else:
        args = [BIN / "tollgate", "run", "--policy", bad]
    t0 = time.monotonic()
    p = procs.start(args, tmp_path / "out.log", env=env, cwd=tmp_path)
    rc = p.wait(timeout=60)
    elapsed = time.monotonic() - t0
    out = p.output()
    assert rc != 0, out
    assert elapsed < 20, f"took {elapsed:.1f}s to give up"
    clear = [line for line in out.splitlines() if str(bad) in line and keypath in line and problem in line]
    assert clear, f"no line names {bad}, {keypath} and '{problem}':\n{out}"
    if runner == "tollgate run":  # before mitmproxy starts: nothing but that one line
        assert out.strip().splitlines() == clear, out


# --- 7. tollgate env ------------------------------------------------------------------------------------------


def parse_exports(out: str) -> dict[str, str]:
    env = {}
    for line in out.strip().splitlines():
        m = re.fullmatch(r"export ([A-Za-z_]+)='([^']*)'", line)
        assert m, f"not an export line: {line!r}"
        env[m[1]] = m[2]
    return env


_PEM = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def pem_ders(path: Path) -> set[bytes]:
    """The certificates in a PEM file, as DER. Not parsed: some system roots have serials that cryptography
    warns about (and will refuse one day), and only identity matters here."""
    return {base64.b64decode("".join(block.split())) for block in _PEM.findall(path.read_text())}


def system_roots() -> Path | None:
    """The system CA file as OpenSSL knows it (ignoring SSL_CERT_FILE, which may be our own bundle)."""
    paths = ssl.get_default_verify_paths()
    for p in (paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if p and os.path.isfile(p):
            return Path(p)
    return None


def test_env_prints_exports_without_secrets_and_curl_works(make_gateway, standin):
    gw = make_gateway(lambda pol: pol["auth"].update(master_key=MASTER_KEY))
    r = tollgate(gw.policy_file, "env", confdir=gw.confdir)
    assert r.returncode == 0, r.stderr
    assert not find_secrets(r.stdout + r.stderr, {**REAL_KEYS, "master key": MASTER_KEY})
    exports = parse_exports(r.stdout)
    assert exports["HTTPS_PROXY"] == f"http://127.0.0.1:{gw.port}"
    assert exports["NODE_USE_ENV_PROXY"] == "1"
    ca = gw.confdir / "mitmproxy-ca-cert.pem"
    assert Path(exports["NODE_EXTRA_CA_CERTS"]) == ca
    bundle = Path(exports["SSL_CERT_FILE"])
    assert exports["REQUESTS_CA_BUNDLE"] == str(bundle)
    in_bundle = pem_ders(bundle)
    assert pem_ders(ca) <= in_bundle, "the bundle lacks the mitmproxy CA"
    roots = system_roots()
    if roots is not None:
        assert pem_ders(roots) <= in_bundle, "the bundle lacks system roots"
    assert len(in_bundle) > 1

    # An app's shell: eval the exports, then plain curl to the provider's real hostname with the virtual key.
    vk = gw.create_key("carol", live=True)
    t0 = time.time()
    before = len(standin.requests)
    script = ('eval "$(tollgate env --policy "$POLICY")" && '
              'curl -sS --max-time 20 https://api.openai.com/v1/models -H "Authorization: Bearer $VK"')
    env = clean_env(TOLLGATE_CONFDIR=str(gw.confdir), VK=vk["key"], POLICY=str(gw.policy_file),
                    PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data"], r.stdout
    seen = standin.requests[before:]
    assert [s.headers.get("authorization") for s in seen] == [f"Bearer {REAL_KEYS['openai']}"]
    rows = gw.rows(wait_for=1, since=t0)
    assert [(row["user_id"], row["endpoint"], row["outcome"]) for row in rows] == [("carol", "/v1/models", "ok")]


def test_env_run_again_in_the_apps_shell_keeps_the_bundle(tmp_path, confdir):
    own = tmp_path / "confdir"  # a copy, so the session's bundle is not touched
    own.mkdir()
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem"):
        shutil.copy(confdir / name, own / name)
    policy = tmp_path / "policies.yaml"
    policy.write_text("gateway: {proxy_port: 18080, port: 18000}\n")
    first = parse_exports(tollgate(policy, "env", confdir=own).stdout)
    bundle = Path(first["SSL_CERT_FILE"])
    size = bundle.stat().st_size
    shell = clean_env(TOLLGATE_CONFDIR=str(own), **first)  # the app's shell after eval "$(tollgate env)"
    for _ in range(2):
        r = tollgate(policy, "env", confdir=own, env=shell)
        assert r.returncode == 0, r.stderr
    ca = (own / "mitmproxy-ca-cert.pem").read_text().strip()
    assert bundle.read_text().count(ca) == 1
    assert bundle.stat().st_size == size


# --- 8. scripts/run and tollgate run on the repo's own policies.yaml -----------------------------------------


def _venv_stale() -> bool:
    stamp = ROOT / ".venv" / ".tollgate-installed"
    return not stamp.exists() or any((ROOT / f).stat().st_mtime > stamp.stat().st_mtime
                                     for f in ("pyproject.toml", "requirements.lock"))


def scripts_run(tmp_path: Path) -> Path:
    """scripts/run, or, when the venv looks stale, the same scripts in a sandbox root.

    scripts/run bootstraps (pip installs into .venv) when pyproject.toml or requirements.lock is newer than
    the venv's stamp; a test must never do that. In CI scripts/test bootstraps first, so the real script runs.
    The sandbox holds copies of scripts/ and of those two files dated at the stamp, and links the real .venv,
    so the very same script logic runs and finds the venv up to date.
    """
    if not _venv_stale():
        return ROOT / "scripts" / "run"
    stamp = (ROOT / ".venv" / ".tollgate-installed").stat().st_mtime
    box = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", box / "scripts")
    for f in ("pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / f, box / f)
        os.utime(box / f, (stamp, stamp))
    (box / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    return box / "scripts" / "run"


def test_scripts_run_smoke(tmp_path, confdir, procs, monkeypatch, standin):
    if not (ROOT / ".venv" / ".tollgate-installed").exists():
        pytest.skip("no bootstrapped venv (run scripts/test, which bootstraps first)")
    policy, port = repo_policy_copy(tmp_path / "run")
    env = clean_env(TOLLGATE_CONFDIR=str(confdir))
    p = procs.start(["bash", scripts_run(tmp_path), "--policy", policy], tmp_path / "run.log", env=env, cwd=tmp_path)
    p.wait_port(port)
    assert "bootstrap" not in p.output(), p.output()
    sdk_env(monkeypatch, port, confdir)
    before = len(standin.requests)
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(api_key="tg-unknown-virtual-key-0000000000000000", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=MSGS)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert len(standin.requests) == before
    rc = p.stop(signal.SIGTERM)  # at once: the row may still wait for the writer's next round
    out = p.output()
    assert rc == 0, f"exit status {rc} on SIGTERM:\n{out}"  # mitmproxy handles SIGTERM as a clean shutdown
    assert f"proxy on http://127.0.0.1:{port}" in out, out
    rows = ledger_rows(tmp_path / "run" / "usage.duckdb")
    assert [(r["provider"], r["outcome"], r["status_code"]) for r in rows] == [("openai", "unauthorized", 401)]


def test_graceful_shutdown_flushes_rows_still_waiting(make_gateway, monkeypatch):
    # A flush interval far longer than the test: the rows can only land through the flush at shutdown.
    gw = make_gateway(extra_args=["--set", "tollgate_flush_interval=60"])
    for k, v in gw.env.items():
        monkeypatch.setenv(k, v)
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="tg-unknown-virtual-key-0000000000000000", max_retries=0).models.list()
    assert gw.stop() == 0
    assert [r["outcome"] for r in ledger_rows(gw.db)] == ["unauthorized"] * 3


def test_tollgate_run_repo_policy_starts_without_any_key_set(tmp_path, confdir, procs, monkeypatch, standin):
    policy, port = repo_policy_copy(tmp_path / "run")
    p = procs.start([BIN / "tollgate", "run", "--policy", policy], tmp_path / "run.log",
                    env=clean_env(TOLLGATE_CONFDIR=str(confdir)), cwd=tmp_path)
    p.wait_port(port)
    r = tollgate(policy, "keys", "create", "--user", "dave", "--json", confdir=confdir)
    assert r.returncode == 0, r.stderr
    vk = json.loads(r.stdout)["key"]
    wait_key(port, confdir, vk)
    sdk_env(monkeypatch, port, confdir)
    t0 = time.time()
    # A provider without a real key answers with its own native error, saying what to set.
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(api_key=vk, max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert "providers.openai.api_key" in e.value.message, e.value.message
    with pytest.raises(anthropic.AuthenticationError) as e2:
        anthropic.Anthropic(api_key=vk, max_retries=0).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=5, messages=MSGS)
    assert "providers.anthropic.api_key" in e2.value.message, e2.value.message
    assert p.stop(signal.SIGTERM) == 0, p.output()
    rows = [r for r in ledger_rows(tmp_path / "run" / "usage.duckdb") if r["ts"].timestamp() >= t0]
    assert [(r["provider"], r["outcome"], r["user_id"]) for r in rows] == [
        ("openai", "gateway_error", "dave"), ("anthropic", "gateway_error", "dave")]
    assert "no real key yet: openai, anthropic, gemini" in p.output()


# --- 9. usage and sql while the gateway runs --------------------------------------------------------------


def test_usage_and_sql_on_a_running_gateway(make_gateway, monkeypatch):
    gw = make_gateway()
    for k, v in gw.env.items():
        monkeypatch.setenv(k, v)
    alice, bob = gw.create_key("alice", live=True), gw.create_key("bob", live=True)
    openai.OpenAI(api_key=alice["key"], max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    openai.OpenAI(api_key=alice["key"], max_retries=0).chat.completions.create(model="gpt-4o", messages=MSGS)
    anthropic.Anthropic(api_key=bob["key"], max_retries=0).messages.create(
        model="claude-3-5-haiku-latest", max_tokens=50, messages=MSGS)
    t0 = time.time() - 60
    all_rows = gw.rows(wait_for=1, since=t0)
    deadline = time.monotonic() + 20
    while sum(r["user_id"] == "bob" and r["model"] == "claude-3-5-haiku-latest" for r in all_rows) < 1:
        assert time.monotonic() < deadline, "bob's request never reached the ledger"
        time.sleep(0.1)
        all_rows = gw.rows()
    all_rows = gw.rows()  # everything, the keys' liveness probes included: usage must agree with it

    def run(*args: str) -> subprocess.CompletedProcess:
        return tollgate(gw.policy_file, *args, confdir=gw.confdir)

    # --by user: the same numbers an auditor gets by hand.
    r = run("usage", "--by", "user", "--json")
    assert r.returncode == 0, r.stderr
    by_user = {u["user"]: u for u in json.loads(r.stdout)}
    for user in ("alice", "bob"):
        mine = [row for row in all_rows if row["user_id"] == user]
        assert by_user[user]["requests"] == len(mine)
        assert by_user[user]["input_tokens"] == sum(row["input_tokens"] or 0 for row in mine)
        assert by_user[user]["output_tokens"] == sum(row["output_tokens"] or 0 for row in mine)
    r = run("usage", "--by", "user")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["user", "requests"], r.stdout
    assert any(line.startswith("alice ") for line in lines) and any(line.startswith("bob ") for line in lines)
    assert lines[-1].startswith("total") and lines[-1].split()[1] == str(len(all_rows)), r.stdout

    r = run("usage", "--by", "model", "--json")
    assert r.returncode == 0, r.stderr
    models = {(m["provider"], m["model"]): m["requests"] for m in json.loads(r.stdout)}
    assert models[("openai", "gpt-4o")] == 1 and models[("anthropic", "claude-3-5-haiku-latest")] == 1

    r = run("usage", "--by", "day", "--json")
    assert r.returncode == 0, r.stderr
    days = {d["day"]: d["requests"] for d in json.loads(r.stdout)}
    expected_days: dict[str, int] = {}
    for row in all_rows:
        day = row["ts"].astimezone(UTC).date().isoformat()
        expected_days[day] = expected_days.get(day, 0) + 1
    assert days == expected_days
    assert datetime.now(UTC).date().isoformat() in days or len(days) == 1

    r = run("sql", "select count(*) as n from requests")
    assert r.returncode == 0, r.stderr
    assert re.search(rf"(?m)^\s*{len(all_rows)}\s*$", r.stdout), r.stdout
    r = run("sql", "select user_id, count(*) as n from requests where user_id is not null group by 1 order by 1",
            "--json")
    assert [u["user_id"] for u in json.loads(r.stdout)] == ["alice", "bob"]

    # Writes are refused, clearly, and change nothing.
    for statement in ("delete from requests", "drop table requests", "select 1; delete from requests"):
        r = run("sql", statement)
        assert r.returncode == 1, (statement, r.stdout)
        assert "read-only" in r.stderr and "refused" in r.stderr, (statement, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr  # one line, no traceback
    assert len(gw.rows()) == len(all_rows)

    # The commands did not hold the file: the running gateway still lands new rows.
    t1 = time.time()
    openai.OpenAI(api_key=bob["key"], max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert len(gw.rows(wait_for=1, since=t1)) == 1
