"""Real processes for end-to-end tests: a mitmdump running the gateway, pointed at the stand-in provider.

Apps in these tests dial the providers' real hostnames through HTTPS_PROXY; the policy's base_url sends
that traffic to the stand-in on loopback (the real hosts do not even resolve here).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GATEWAY_SCRIPT = ROOT / "addons" / "gateway.py"

REAL_KEYS = {
    "openai": "sk-test-openai-REAL-0000000000000000",
    "anthropic": "sk-ant-test-REAL-000000000000000000",
    "gemini": "AIzaTEST-REAL-gemini-000000000000000000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def base_policy(standin_port: int, db: Path) -> dict:
    up = f"http://127.0.0.1:{standin_port}"
    return {
        "gateway": {"host": "127.0.0.1", "port": 0, "proxy_port": 0},
        "providers": {
            "openai": {"api_key": REAL_KEYS["openai"], "base_url": f"{up}/openai/v1"},
            "anthropic": {"api_key": REAL_KEYS["anthropic"], "base_url": f"{up}/anthropic"},
            "gemini": {"api_key": REAL_KEYS["gemini"], "base_url": f"{up}/gemini"},
        },
        "auth": {"virtual_keys": {"enabled": True}},
        "analytics": {"database": str(db)},
    }


class Gateway:
    """A mitmdump process running tollgate, plus helpers to use it as an app and as an auditor would."""

    def __init__(self, workdir: Path, policy: dict, confdir: Path, extra_args: list[str] | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.confdir = confdir
        self.db = Path(policy["analytics"]["database"])
        self.port = free_port()
        policy["gateway"]["proxy_port"] = self.port
        self.policy_file = self.dir / "policies.yaml"
        self.policy_file.write_text(yaml.safe_dump(policy))
        self.flows_file = self.dir / "flows.mitm"
        self.log_file = self.dir / "mitmdump.log"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    # --- process ---------------------------------------------------------------------------------

    def start(self) -> "Gateway":
        args = [
            str(BIN / "mitmdump"), "-s", str(GATEWAY_SCRIPT),
            "--set", f"tollgate_policy={self.policy_file}",
            "--set", f"confdir={self.confdir}",
            "--listen-host", "127.0.0.1", "--mode", f"regular@{self.port}",
            "-w", str(self.flows_file),
            *self.extra_args,
        ]
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        wait_port(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc, self.proc = self.proc.returncode, None
        return rc

    def output(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # --- as an app -------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        bundle = self.confdir / "tollgate-ca-bundle.pem"
        if not bundle.exists():
            out = self.tollgate("env")
            assert "SSL_CERT_FILE" in out, out
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({
            "HTTPS_PROXY": f"http://127.0.0.1:{self.port}",
            "SSL_CERT_FILE": str(bundle),
            "REQUESTS_CA_BUNDLE": str(bundle),
            "CURL_CA_BUNDLE": str(bundle),
            "NO_PROXY": "",
        })
        return env

    def tollgate(self, *args: str, check: bool = True) -> str:
        env = dict(os.environ, TOLLGATE_CONFDIR=str(self.confdir))
        r = subprocess.run([str(BIN / "tollgate"), *args, "--policy", str(self.policy_file)],
                           capture_output=True, text=True, env=env, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"tollgate {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r.stdout + r.stderr

    def create_key(self, user: str, *extra: str) -> dict:
        out = self.tollgate("keys", "create", "--user", user, "--json", *extra)
        return json.loads(out[out.index("{"):out.rindex("}") + 1])

    # --- as an auditor ---------------------------------------------------------------------------

    def rows(self, where: str = "true", wait_for: int | None = None, timeout: float = 10,
             since: float | None = None) -> list[dict]:
        """Ledger rows read with DuckDB from this (another) process, as an auditor would.

        since: only rows of requests started at or after this time.time() (isolates a test's own rows).
        """
        if since is not None:
            where = f"({where}) and ts >= to_timestamp({since!r})"
        deadline = time.monotonic() + timeout
        while True:
            try:
                con = duckdb.connect(str(self.db), read_only=True)
                try:
                    cur = con.execute(f"select * from requests where {where} order by ts")
                    cols = [d[0] for d in cur.description]
                    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
                finally:
                    con.close()
            except (duckdb.IOException, duckdb.CatalogException):
                rows = []  # the gateway holds the file for a moment, or has not created it yet
            if wait_for is None or len(rows) >= wait_for or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)
