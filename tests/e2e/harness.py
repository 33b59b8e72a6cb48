"""Real processes for end-to-end tests: a mitmdump running the gateway, pointed at the stand-in provider.

Apps in these tests dial the providers' real hostnames through HTTPS_PROXY; the policy's base_url sends
that traffic to the stand-in on loopback (the real hosts do not even resolve here).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
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


def wait_key(proxy_port: int, confdir: Path, key: str, timeout: float = 15) -> None:
    """Wait until the gateway on proxy_port honours a new virtual key (it polls the keys table, within 2 s).

    Probes `GET https://api.openai.com/v1/models` with the key every 0.1 s until it is no longer refused as
    unknown; each probe is a request like any other (a flow, a ledger row).
    """
    ctx = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": f"http://127.0.0.1:{proxy_port}"}),
        urllib.request.HTTPSHandler(context=ctx))
    probe = urllib.request.Request("https://api.openai.com/v1/models", headers={"Authorization": f"Bearer {key}"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            opener.open(probe, timeout=10).close()
            return
        except urllib.error.HTTPError as e:
            if b"invalid_api_key" not in e.read():
                return  # refused for another reason (e.g. no real key for openai): the key itself is known
        assert time.monotonic() < deadline, f"the gateway did not honour a new key within {timeout}s"
        time.sleep(0.1)


class Gateway:
    """A mitmdump process running tollgate, plus helpers to use it as an app and as an auditor would."""

    def __init__(self, workdir: Path, policy: dict, confdir: Path, extra_args: list[str] | None = None,
                 program: str = "mitmdump", web_password: str = "secret"):
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
        self.program = program  # "mitmdump", or "mitmweb" (then web_port serves its UI and HTTP API)
        self.web_password = web_password
        self.web_port = free_port() if program == "mitmweb" else None

    # --- process ---------------------------------------------------------------------------------

    def start(self) -> "Gateway":
        web = [] if self.web_port is None else [
            "--web-host", "127.0.0.1", "--web-port", str(self.web_port),
            "--set", "web_open_browser=false", "--set", f"web_password={self.web_password}",
        ]
        args = [
            str(BIN / self.program), "-s", str(GATEWAY_SCRIPT),
            "--set", f"tollgate_policy={self.policy_file}",
            "--set", f"confdir={self.confdir}",
            "--listen-host", "127.0.0.1", "--mode", f"regular@{self.port}",
            "-w", str(self.flows_file),
            *web,
            *self.extra_args,
        ]
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        wait_port(self.port, self.proc)
        if self.web_port is not None:
            wait_port(self.web_port, self.proc)
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

    def create_key(self, user: str, *extra: str, live: bool = False) -> dict:
        """A new virtual key; live=True also waits until the running gateway honours it (it polls the keys
        table, within 2 s): a probe `GET /v1/models` per 0.1 s until it is no longer refused as unknown."""
        out = self.tollgate("keys", "create", "--user", user, "--json", *extra)
        key = json.loads(out[out.index("{"):out.rindex("}") + 1])
        if live:
            self.wait_key(key["key"])
        return key

    def wait_key(self, key: str, timeout: float = 15) -> None:
        wait_key(self.port, self.confdir, key, timeout)

    def web_get(self, path: str, timeout: float = 20) -> bytes:
        """GET from mitmweb's HTTP API (the same routes its UI uses), authenticated with the password."""
        assert self.web_port is not None, "not a mitmweb gateway"
        sep = "&" if "?" in path else "?"
        url = f"http://127.0.0.1:{self.web_port}{path}{sep}token={urllib.parse.quote(self.web_password)}"
        with urllib.request.urlopen(url, timeout=timeout) as r:  # never through a proxy: no env proxies here
            return r.read()

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


# --- other processes ---------------------------------------------------------------------------------------


class Proc:
    """A command-line process under test (`tollgate run`, `scripts/run`…) with its output in a file.

    stop() always ends it (SIGKILL after `timeout`), so a test that fails half-way leaves nothing behind.
    """

    def __init__(self, args: list[str], log_file: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.args = args
        self.log_file = log_file
        self._log = open(log_file, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_port(self, port: int, timeout: float = 30) -> None:
        wait_port(port, self.proc, timeout)

    def wait(self, timeout: float) -> int:
        """The exit status; kills the process and fails if it is still running after `timeout`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"{self.args[0]} still running after {timeout}s:\n{self.output()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without proxies and provider keys (a fresh shell on a fresh machine), plus extra."""
    drop = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "TOLLGATE_MASTER_KEY",
            "TOLLGATE_POLICY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


# --- looking for secrets -------------------------------------------------------------------------------------


def find_secrets(data: bytes | str, secrets: dict[str, str]) -> list[str]:
    """Names of the secrets that occur in data (exact substrings)."""
    blob = data if isinstance(data, bytes) else data.encode("utf-8", "replace")
    return [name for name, value in secrets.items() if value and value.encode() in blob]


def read_flows(path: Path) -> list:
    """The flows mitmproxy saved with `-w` (a truncated last record, from a killed process, is skipped)."""
    from mitmproxy import exceptions, io

    flows = []
    with open(path, "rb") as f:
        try:
            for flow in io.FlowReader(f).stream():
                flows.append(flow)
        except exceptions.FlowReadException:
            pass
    return flows


def flow_parts(flow) -> dict[str, bytes]:
    """Every place of a saved flow a credential could hide in, by name, as bytes.

    Bodies are taken both raw (as stored, possibly compressed) and decoded; the full serialized state is
    included last so nothing is missed (certificates, connection data, websocket messages…).
    """
    parts: dict[str, bytes] = {}

    def text(v) -> bytes:
        return v if isinstance(v, bytes) else str(v).encode("utf-8", "replace")

    for side in ("request", "response"):
        msg = getattr(flow, side, None)
        if msg is None:
            continue
        for i, (k, v) in enumerate(msg.headers.fields):
            parts[f"{side}.headers[{k.decode(errors='replace')}]#{i}"] = k + b": " + v
        parts[f"{side}.raw_content"] = msg.raw_content or b""
        try:
            parts[f"{side}.content"] = msg.get_content(strict=False) or b""
        except ValueError:
            pass
        if msg.trailers:
            parts[f"{side}.trailers"] = text(msg.trailers.fields)
    req = getattr(flow, "request", None)
    if req is not None:
        parts["request.url"] = text(req.url)
        parts["request.pretty_url"] = text(req.pretty_url)
        parts["request.path"] = text(req.path)
    parts["comment"] = text(flow.comment)
    parts["metadata"] = text(json.dumps(flow.metadata, default=str))
    if flow.error is not None:
        parts["error"] = text(flow.error.msg)
    parts["state"] = text(repr(flow.get_state()))
    return parts


def ledger_dump(db: Path) -> str:
    """Every row of every table and view in the ledger file, as text (read-only, retried while locked)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            con = duckdb.connect(str(db), read_only=True)
            break
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        out = []
        for (name,) in con.execute("select table_name from duckdb_tables() union all "
                                   "select view_name from duckdb_views() where not internal").fetchall():
            out.append(f"== {name}")
            out += [repr(row) for row in con.execute(f'select * from "{name}"').fetchall()]
        return "\n".join(out)
    finally:
        con.close()


# --- hardening helpers (faults, bad input, scans) ----------------------------------------------------------


def app_env(gw: "Gateway", monkeypatch) -> dict[str, str]:
    """This process becomes the app's shell after `eval "$(tollgate env)"` for gw (SDKs read it at creation)."""
    env = gw.env
    for k in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def read_status(gw: "Gateway") -> dict | None:
    """The live status file the gateway writes every second beside its ledger (budgets' reservations)."""
    try:
        return json.loads(Path(str(gw.db) + ".status.json").read_text())
    except (OSError, ValueError):
        return None


def fresh_status(gw: "Gateway", after: float, timeout: float = 10) -> dict:
    """The first status written after time.time() `after` (so it reflects everything done before)."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_status(gw)
        if st and float(st.get("written_at", 0)) > after:
            return st
        assert time.monotonic() < deadline, f"no status written after {after} within {timeout}s"
        time.sleep(0.05)


def raw_request(gw: "Gateway", url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
                method: str | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request through the gateway's proxy, as a bare HTTP client sends it: (status, headers, body).

    For inputs an SDK would never send (not JSON, wrong types, compressed bodies); errors are answers too.
    """
    ctx = ssl.create_default_context(cafile=str(gw.confdir / "mitmproxy-ca-cert.pem"))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": f"http://127.0.0.1:{gw.port}"}),
        urllib.request.HTTPSHandler(context=ctx))
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def realtime_session(gw: "Gateway", key: str | None, model: str = "gpt-4o-realtime-preview",
                     host: str = "api.openai.com", events: tuple[dict, ...] = ({"type": "response.create"},),
                     timeout: float = 15) -> dict:
    """An OpenAI Realtime WebSocket session through the proxy (CONNECT, TLS, upgrade), as the SDK opens it.

    Sends `events` after `session.created`, closes after a `response.done` for each `response.create`. Returns {"status": 101 or the
    refusal's status, "events": server events (parsed), "body": a refusal's body}.
    """
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (AcceptConnection, CloseConnection, Message, RejectConnection, RejectData, Request,
                                TextMessage)

    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = sock.recv(1)
        assert c, f"proxy closed the connection after {head!r}"
        head += c
    assert head.split(b" ", 2)[1] == b"200", head
    tls = ssl.create_default_context(cafile=str(gw.confdir / "mitmproxy-ca-cert.pem")).wrap_socket(
        sock, server_hostname=host)
    ws = WSConnection(ConnectionType.CLIENT)
    extra = [(b"authorization", f"Bearer {key}".encode())] if key else []
    tls.sendall(ws.send(Request(host=host, target=f"/v1/realtime?model={model}", extra_headers=extra)))
    out: dict = {"status": None, "events": [], "body": b""}
    pending = list(events)
    responses = sum(1 for e in events if e.get("type") == "response.create")
    try:
        while True:
            data = tls.recv(65536)
            if not data:
                break
            ws.receive_data(data)
            done = False
            for ev in ws.events():
                if isinstance(ev, AcceptConnection):
                    out["status"] = 101
                elif isinstance(ev, RejectConnection):
                    out["status"] = ev.status_code
                    done = not ev.has_body
                elif isinstance(ev, RejectData):
                    out["body"] += ev.data
                    done = ev.body_finished
                elif isinstance(ev, TextMessage):
                    msg = json.loads(ev.data)
                    out["events"].append(msg)
                    if msg.get("type") == "session.created":
                        for e in pending:
                            tls.sendall(ws.send(Message(data=json.dumps(e))))
                        pending = []
                    elif msg.get("type") == "response.done":
                        responses -= 1
                        if responses <= 0:
                            tls.sendall(ws.send(CloseConnection(code=1000)))
                elif isinstance(ev, CloseConnection):
                    done = True
            if done:
                break
    finally:
        tls.close()
    return out


class AppLoad:
    """Apps hammering the gateway with the OpenAI SDK from `workers` threads, until stop().

    Every request's model is unique (``{prefix}{n}``, streams add ``-paced-N``), so each answer the app saw can
    be matched to its ledger row. `answered` maps model -> time.monotonic() the whole answer had arrived;
    `started` holds every model sent. `pace` > 0 spaces each worker's requests (seconds between starts).
    The process environment must be the app's (app_env) before start().
    """

    def __init__(self, key: str, workers: int = 8, prefix: str = "gpt-4o-mini-load-", stream_every: int = 3,
                 pace_ms: int = 20):
        self.key, self.workers, self.prefix = key, workers, prefix
        self.stream_every, self.pace_ms = stream_every, pace_ms
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.started: list[str] = []
        self.answered: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.latencies: list[float] = []
        self._n = 0
        self._threads: list[threading.Thread] = []
        self._schedule: tuple[float, float, int] | None = None  # (t0, interval, total) for spread()

    def _next(self) -> int | None:
        with self._lock:
            if self._schedule is not None and self._n >= self._schedule[2]:
                return None
            self._n += 1
            return self._n

    def one(self, client, n: int) -> None:
        import openai  # noqa: F401  (the SDK is the app)

        stream = self.stream_every and n % self.stream_every == 0
        model = f"{self.prefix}{n}" + (f"-paced-{self.pace_ms}" if stream else "")
        msgs = [{"role": "user", "content": "hi"}]
        with self._lock:
            self.started.append(model)
        t = time.monotonic()
        try:
            if stream:
                chunks = client.chat.completions.create(model=model, messages=msgs, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = client.chat.completions.create(model=model, messages=msgs).choices[0].message.content
            assert text, "empty answer"
        except Exception as e:  # the gateway went away under it, or refused: not answered
            with self._lock:
                self.failed[model] = f"{type(e).__name__}: {e}"[:300]
            return
        done = time.monotonic()
        with self._lock:
            self.answered[model] = done
            self.latencies.append(done - t)

    def _worker(self) -> None:
        import openai

        client = openai.OpenAI(api_key=self.key, max_retries=0, timeout=30)
        while not self._stop.is_set():
            n = self._next()
            if n is None:
                return
            if self._schedule is not None:  # spread(): request n starts at t0 + (n - 1) * interval
                t0, interval, _ = self._schedule
                wait = t0 + (n - 1) * interval - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
            self.one(client, n)

    def start(self) -> "AppLoad":
        for i in range(self.workers):
            th = threading.Thread(target=self._worker, name=f"app-load-{i}", daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def spread(self, total: int, seconds: float) -> "AppLoad":
        """Start `total` requests evenly over `seconds` (instead of back to back)."""
        self._schedule = (time.monotonic(), seconds / total, total)
        return self.start()

    def stop(self) -> None:
        """No new requests from now on (those in flight go on)."""
        self._stop.set()

    def join(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))

    def p(self, q: float) -> float:
        """A latency percentile (0 < q < 1) in seconds."""
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class LedgerHolder:
    """Another process (an auditor's notebook) holding the DuckDB ledger open read-only for `seconds`."""

    SCRIPT = r"""
import sys, time, duckdb
db, seconds = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + 30
while True:
    try:
        con = duckdb.connect(db, read_only=True)
        break
    except duckdb.IOException:  # the gateway holds it for its few milliseconds: retry
        if time.monotonic() > deadline:
            raise
        time.sleep(0.01)
n = con.execute("select count(*) from requests").fetchone()[0]
print(f"held {n}", flush=True)
time.sleep(seconds)
con.close()
print("released", flush=True)
"""

    def __init__(self, db: Path, seconds: float):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(db), str(seconds)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("held "), line + self.proc.stdout.read()
        self.rows_at_start = int(line.split()[1])
        self.held_at = time.monotonic()

    def wait(self, timeout: float = 120) -> None:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0 and "released" in out, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


PRIVATE_FILES = ("usage.duckdb", "usage.duckdb.spool", "usage.duckdb.spool.lock", "usage.duckdb.status.json")


def file_modes(folder: Path) -> dict[str, int]:
    """Permission bits of every file in a gateway's folder."""
    return {p.name: p.stat().st_mode & 0o777 for p in sorted(folder.iterdir()) if p.is_file()}


def scan_gateway(gw: "Gateway", secrets: dict[str, str]) -> dict[str, int]:
    """Look for every secret in everything a (stopped) gateway wrote: its output, every file in its folder
    (ledger, WAL, spool, status, saved flows; not policies.yaml, the operator's own file that holds the real
    keys), every part of every saved flow and a dump of every ledger table. Raises on a find; returns counts."""
    found: list[str] = []
    counts = {"files": 0, "bytes": 0, "flows": 0, "secrets": len(secrets)}

    def check(what: str, data: bytes | str) -> None:
        counts["bytes"] += len(data)
        found.extend(f"{what}: {name}" for name in find_secrets(data, secrets))

    check("gateway output", gw.output())
    for p in sorted(gw.dir.iterdir()):
        if p.is_file() and p.name != "policies.yaml" and p != gw.log_file:
            counts["files"] += 1
            check(p.name, p.read_bytes())
    if gw.flows_file.exists():
        for f in read_flows(gw.flows_file):
            counts["flows"] += 1
            for where, data in flow_parts(f).items():
                check(f"flow {f.request.path[:50]} {where}", data)
    if gw.db.exists():
        check("ledger dump", ledger_dump(gw.db))
    assert not found, found
    return counts


def ledger_pending(gw: "Gateway") -> int | None:
    """Rows the gateway has recorded but not yet written, from its readiness probe (no file lock taken)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{gw.port}"}))
    try:
        with opener.open("http://tollgate.invalid:1/health/ready", timeout=5) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while the ledger is failing: the body still says how many wait
        data = json.loads(e.read())
    return data.get("ledger_pending_rows")


def settled_rows(gw: "Gateway", where: str = "true", since: float | None = None, n: int = 1,
                 timeout: float = 15) -> list[dict]:
    """Ledger rows once the gateway reports nothing pending (at least n of them, or whatever is there at timeout).

    Polls the readiness probe rather than the file: every read-only open of the DuckDB file locks it for
    ~30 ms, and a writer that meets that lock backs off (up to 2 s), so polling the file slows the very rows
    being waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        if ledger_pending(gw) == 0:
            rows = gw.rows(where, since=since)
            if len(rows) >= n:
                return rows
        if time.monotonic() > deadline:
            return gw.rows(where, since=since)
        time.sleep(0.05)
