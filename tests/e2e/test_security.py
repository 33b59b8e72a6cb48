"""What must never leak and what must never be touched: real keys, virtual keys, other hosts' TLS.

- A host that is not a provider is tunneled: the app sees that host's own certificate, not mitmproxy's.
- Saved flows (`-w`), the gateway's own output (at flow_detail=4, full headers and bodies), the ledger and
  mitmweb's HTTP API hold no real key and no virtual key; every provider flow carries the tollgate comment.
- A provider left without a real key answers with its own native 401 that says what to set.
"""
from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .harness import REAL_KEYS, clean_env, find_secrets, flow_parts, ledger_dump, read_flows

pytestmark = pytest.mark.timeout(180)

MSGS = [{"role": "user", "content": "hi"}]
UNKNOWN_VK = "tg-unknown-virtual-key-0000000000000000"
# ok flows: "user · model · 11→8 tok · $0.000006"
COMMENT = re.compile(r"^(?P<user>[\w-]+) · (?P<model>\S+) · ~?\d+→\d+ tok · \$\d+\.\d{6}$")


def use(gw, monkeypatch) -> dict[str, str]:
    """This process becomes the app's shell after `eval "$(tollgate env)"` for gateway gw."""
    env = gw.env
    for k in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def wait_until(cond, timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- 1. other hosts keep their own certificate -----------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path, bytes]:
    """(cert.pem, key.pem, cert DER) for localhost / 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tollgate-test-tunneled-host")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = folder / "tunnel-cert.pem", folder / "tunnel-key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem, cert.public_bytes(serialization.Encoding.DER)


class TlsServer:
    """A tiny HTTPS server on 127.0.0.1 that answers every request with 'tunneled' and closes."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tls-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(10)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntunneled")
            except (OSError, ssl.SSLError):
                pass  # a client that refused our certificate (the negative control) ends up here

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def tls_server(tmp_path):
    cert, key, der = self_signed(tmp_path)
    srv = TlsServer(cert, key)
    srv.cert, srv.der = cert, der
    yield srv
    srv.close()


def tls_through_proxy(proxy_port: int, target: str, ctx: ssl.SSLContext, sni: str) -> ssl.SSLSocket:
    """CONNECT target through the proxy, then a TLS handshake verified by ctx (raises if it fails)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=15)
    try:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)  # byte by byte: nothing after the proxy's answer may be consumed here
            assert chunk, f"proxy closed the connection after {head!r}"
            head += chunk
        assert head.split(b" ", 2)[1] == b"200", head
        return ctx.wrap_socket(s, server_hostname=sni)
    except BaseException:
        s.close()
        raise


def test_non_provider_host_keeps_its_own_certificate(gateway, tls_server, standin):
    target = f"127.0.0.1:{tls_server.port}"
    before = len(standin.requests)
    ctx = ssl.create_default_context(cafile=str(tls_server.cert))  # trusts only our own certificate
    with tls_through_proxy(gateway.port, target, ctx, sni="localhost") as tls:
        assert tls.getpeercert(binary_form=True) == tls_server.der
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.endswith(b"tunneled"), answer

    # curl, as an app would: verifies the chain against our certificate alone, so mitmproxy's would fail.
    env = clean_env()
    proxy = f"http://127.0.0.1:{gateway.port}"
    ok = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy, "--cacert", str(tls_server.cert),
                         f"https://{target}/"], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and ok.stdout == "tunneled", ok.stderr
    # Negative control: trusting only mitmproxy's CA, the same host must NOT verify (it was not intercepted).
    mitm_ca = gateway.confdir / "mitmproxy-ca-cert.pem"
    bad = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy, "--cacert", str(mitm_ca),
                          f"https://{target}/"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0, bad.stdout
    assert len(standin.requests) == before
    assert tls_server.handshakes >= 2


def test_provider_host_is_intercepted_with_mitmproxy_ca(gateway, standin):
    mitm_ca = gateway.confdir / "mitmproxy-ca-cert.pem"
    ca = x509.load_pem_x509_certificate(mitm_ca.read_bytes())
    ctx = ssl.create_default_context(cafile=str(mitm_ca))
    before = len(standin.requests)
    # api.openai.com does not even resolve here: interception must not dial it first (lazy connection).
    with tls_through_proxy(gateway.port, "api.openai.com:443", ctx, sni="api.openai.com") as tls:
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n"
                    b"Authorization: Bearer " + UNKNOWN_VK.encode() + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert leaf.issuer == ca.subject
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "api.openai.com" in sans.get_values_for_type(x509.DNSName)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"invalid_api_key" in answer
    assert len(standin.requests) == before


# --- 3. saved flows, output and ledger hold no key ---------------------------------------------------------


def _assert_clean(what: str, data: bytes | str, secrets: dict[str, str]) -> None:
    found = find_secrets(data, secrets)
    assert not found, f"{what} contains {found}"


def _assert_flows_clean(flows, secrets: dict[str, str]) -> None:
    for f in flows:
        for where, data in flow_parts(f).items():
            _assert_clean(f"flow {f.request.method} {f.request.path[:60]} {where}", data, secrets)


def _make_traffic(gw, key: str) -> int:
    """Every kind of provider request, with the credential in each place apps put it. Returns how many."""
    oa = openai.OpenAI(api_key=key, max_retries=0, timeout=30)
    oa.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert list(oa.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
    oa.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.RateLimitError):  # an upstream error: its body is stored too
        oa.chat.completions.create(model="gpt-4o-mini-error-429", messages=MSGS)
    with pytest.raises(openai.APIError):  # a stream cut by the provider: the flow ends in an error
        list(oa.chat.completions.create(model="gpt-4o-mini-die", messages=MSGS, stream=True))
    an = anthropic.Anthropic(api_key=key, max_retries=0, timeout=30)
    with an.messages.stream(model="claude-3-5-haiku-latest", max_tokens=50, messages=MSGS) as s:
        assert "".join(s.text_stream)
    gem = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
    body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]})
    for auth in (["-H", f"x-goog-api-key: {key}"], []):
        url = gem if auth else f"{gem}?key={key}"
        r = subprocess.run(["curl", "-sS", "--max-time", "20", url, "-H", "content-type: application/json",
                            *auth, "-d", body], capture_output=True, text=True, env=gw.env, timeout=60)
        assert r.returncode == 0 and "candidates" in r.stdout, (r.stdout, r.stderr)
    # Refused: an unknown virtual key, and a real provider key presented directly.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key=UNKNOWN_VK, max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key=REAL_KEYS["anthropic"], max_retries=0).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=5, messages=MSGS)
    return 10


def test_saved_flows_output_and_ledger_hold_no_key(make_gateway, monkeypatch):
    gw = make_gateway(extra_args=["--set", "flow_detail=4"])
    use(gw, monkeypatch)
    vk = gw.create_key("alice", live=True)
    t0 = time.time()
    n = _make_traffic(gw, vk["key"])
    rows = gw.rows(wait_for=n, since=t0, timeout=20)
    assert len(rows) == n, [(r["endpoint"], r["outcome"]) for r in rows]
    assert gw.stop() == 0

    secrets = {**REAL_KEYS, "virtual key": vk["key"], "unknown virtual key": UNKNOWN_VK}
    all_flows = read_flows(gw.flows_file)  # the key's liveness probes included: they are scanned too
    _assert_flows_clean(all_flows, secrets)
    flows = [f for f in all_flows if f.request.timestamp_start >= t0]
    assert len(flows) == n, [f.request.path for f in flows]
    _assert_clean("flows file", gw.flows_file.read_bytes(), secrets)
    out = gw.output()
    assert "Authorization" in out or "authorization" in out, "flow_detail=4 should print full headers"
    _assert_clean("gateway output", out, secrets)
    _assert_clean("ledger", ledger_dump(gw.db), secrets)
    for f in gw.dir.iterdir():  # the database file itself, spools, anything else the gateway wrote there
        if f.is_file() and f.name != "policies.yaml":
            _assert_clean(str(f), f.read_bytes(), secrets)

    # Every flow is annotated for mitmweb: metadata always, "user · model · tokens · cost" when it went through.
    for f in flows:
        meta = f.metadata.get("tollgate")
        assert isinstance(meta, dict) and meta.get("request_id"), (f.request.path, f.metadata)
        if meta["outcome"] == "ok":
            m = COMMENT.match(f.comment)
            assert m and m["user"] == "alice" and m["model"] == meta["model"], f.comment
        else:
            assert meta["outcome"] in f.comment, (meta, f.comment)
    outcomes = sorted(f.metadata["tollgate"]["outcome"] for f in flows)
    assert outcomes.count("ok") == 6 and outcomes.count("unauthorized") == 2, outcomes


def _hang_in_flight(gw, standin, key: str) -> threading.Thread:
    """A request the provider never answers, started and seen by the provider (so the real key was sent)."""
    before = len(standin.requests)

    def call() -> None:
        try:
            openai.OpenAI(api_key=key, max_retries=0, timeout=30).chat.completions.create(
                model="gpt-4o-mini-hang", messages=MSGS)
        except openai.APIError:
            pass  # the gateway goes away under it

    t = threading.Thread(target=call, daemon=True)
    t.start()
    wait_until(lambda: len(standin.requests) > before, what="the provider to see the hanging request")
    return t


def test_flow_in_flight_at_shutdown_is_saved_without_real_key(make_gateway, standin, monkeypatch):
    gw = make_gateway()
    use(gw, monkeypatch)
    vk = gw.create_key("alice", live=True)
    t = _hang_in_flight(gw, standin, vk["key"])
    gw.stop()
    t.join(10)
    flows = read_flows(gw.flows_file)
    assert flows, "the in-flight flow should be saved"
    _assert_flows_clean(flows, {**REAL_KEYS, "virtual key": vk["key"]})


def test_request_in_flight_at_shutdown_still_gets_its_row(make_gateway, standin, monkeypatch):
    gw = make_gateway()
    use(gw, monkeypatch)
    vk = gw.create_key("alice", live=True)
    t0 = time.time()
    t = _hang_in_flight(gw, standin, vk["key"])
    gw.stop()
    t.join(10)
    rows = gw.rows(since=t0)
    assert [r["model"] for r in rows] == ["gpt-4o-mini-hang"] and rows[0]["outcome"] != "ok", rows


# --- 4. mitmweb ----------------------------------------------------------------------------------------------


def test_mitmweb_api_shows_comments_and_no_key(make_gateway, standin, monkeypatch):
    from mitmproxy import io as mio

    gw = make_gateway(program="mitmweb", name="web")
    use(gw, monkeypatch)
    vk = gw.create_key("alice", live=True)
    t0 = time.time()
    oa = openai.OpenAI(api_key=vk["key"], max_retries=0, timeout=30)
    oa.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert list(oa.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
    with anthropic.Anthropic(api_key=vk["key"], max_retries=0).messages.stream(
            model="claude-3-5-haiku-latest", max_tokens=50, messages=MSGS) as s:
        assert "".join(s.text_stream)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key=REAL_KEYS["anthropic"], max_retries=0).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=5, messages=MSGS)
    assert len(gw.rows(wait_for=4, since=t0)) == 4
    secrets = {**REAL_KEYS, "virtual key": vk["key"]}

    # The API is password-protected (so what it shows is what an operator sees after logging in).
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{gw.web_port}/flows", timeout=20)
    assert e.value.code == 403

    listing = gw.web_get("/flows")
    _assert_clean("mitmweb /flows", listing, secrets)
    flows = [f for f in json.loads(listing) if f["request"]["timestamp_start"] >= t0]
    assert len(flows) == 4, [f["request"]["path"] for f in flows]
    comments = sorted(f["comment"] for f in flows)
    assert sum(bool(COMMENT.match(c)) for c in comments) == 3, comments
    assert any("unauthorized" in c for c in comments), comments
    for f in flows:  # bodies are fetched separately by the UI (streamed ones are not kept: no body to show)
        for side in ("request", "response"):
            if f.get(side, {}).get("contentLength") is None:
                continue
            _assert_clean(f"mitmweb {side} body", gw.web_get(f"/flows/{f['id']}/{side}/content.data"), secrets)
    dump = gw.web_get("/flows/dump")  # everything mitmweb holds, in mitmproxy's own file format
    _assert_clean("mitmweb /flows/dump", dump, secrets)
    _assert_flows_clean(list(mio.FlowReader(io.BytesIO(dump)).stream()), secrets)
    _assert_clean("mitmweb /events", gw.web_get("/events"), secrets)
    gw.stop()
    _assert_clean("mitmweb output", gw.output(), secrets)


@pytest.mark.xfail(strict=True, reason="bug: between the `request` hook (real key written into flow.request) and "
                   "the answer's headers, mitmweb's /flows serves the live flow object with the real key")
def test_mitmweb_does_not_show_real_key_while_request_in_flight(make_gateway, standin, monkeypatch):
    gw = make_gateway(program="mitmweb", name="web")
    use(gw, monkeypatch)
    vk = gw.create_key("alice", live=True)
    before = len(standin.requests)
    done = threading.Event()

    def slow() -> None:
        try:
            openai.OpenAI(api_key=vk["key"], max_retries=0, timeout=30).chat.completions.create(
                model="gpt-4o-mini-delay-3000", messages=MSGS)
        finally:
            done.set()

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    wait_until(lambda: len(standin.requests) > before, what="the provider to see the request")
    try:
        listing = gw.web_get("/flows")  # an operator (re)loading the UI while a long request runs
        assert not done.is_set(), "the request finished before the check; the check proves nothing"
        _assert_clean("mitmweb /flows during the request", listing, {**REAL_KEYS, "virtual key": vk["key"]})
    finally:
        t.join(15)


# --- 5. a provider without a real key --------------------------------------------------------------------


def test_provider_without_real_key_answers_native_401(make_gateway, standin, monkeypatch):
    monkeypatch.delenv("NOPE_UNSET_KEY", raising=False)

    def no_keys(pol: dict) -> None:
        pol["providers"]["openai"]["api_key"] = "${NOPE_UNSET_KEY:-}"
        pol["providers"]["anthropic"]["api_key"] = "${NOPE_UNSET_KEY:-}"

    gw = make_gateway(no_keys)
    use(gw, monkeypatch)
    vk = gw.create_key("alice", live=True)
    before = len(standin.requests)
    t0 = time.time()
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(api_key=vk["key"], max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert e.value.status_code == 401
    assert "'openai'" in e.value.message and "providers.openai.api_key" in e.value.message, e.value.message
    with pytest.raises(anthropic.AuthenticationError) as e2:
        anthropic.Anthropic(api_key=vk["key"], max_retries=0).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=5, messages=MSGS)
    assert "'anthropic'" in e2.value.message and "providers.anthropic.api_key" in e2.value.message
    assert e2.value.body["type"] == "error"  # Anthropic's own error envelope
    assert len(standin.requests) == before, "the provider must not be called without a real key"
    rows = gw.rows(wait_for=2, since=t0)
    assert [(r["provider"], r["outcome"], r["status_code"], r["user_id"]) for r in rows] == [
        ("openai", "gateway_error", 401, "alice"), ("anthropic", "gateway_error", 401, "alice")]
