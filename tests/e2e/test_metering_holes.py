"""No request escapes metering: unpriced models under enforcing budgets, and LLM APIs the policy does not manage.

Real mitmdump processes, the official SDKs and curl through HTTPS_PROXY; the ledger is read with DuckDB from
this process. Nothing leaves the machine: refused CONNECTs never connect anywhere, and the tunneled
"api.cohere.ai" is a local TLS server — a second `-s` script (ROUTE) sends the gateway's upstream connection
for that name to loopback and kills any other non-loopback connection, so the app dials the real hostname
through the proxy and the answer proves it was tunneled (its certificate is trusted by this test alone, so an
intercepting mitmproxy could not have produced it).
"""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import time

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from standin import ANSWER

from .harness import clean_env, free_port
from .test_controls import MSGS, PRICES, calls, gateways, use  # noqa: F401 (gateways is a fixture)
from .test_security import TlsServer

pytestmark = pytest.mark.timeout(120)

ROUTE = """\
import ipaddress

TARGETS = {{"api.cohere.ai": ("127.0.0.1", {port})}}


class Route:
    def server_connect(self, data):
        host, port, *_ = data.server.address
        if host in TARGETS:
            data.server.address = TARGETS[host]
            return
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            data.server.error = f"test: {{host}} is not on this machine; nothing may reach the internet"


addons = [Route()]
"""


def _enforced(**extra):
    return lambda p: p.update(budgeting={"per_user": {"limit_usd": 5, "reset": "daily", "mode": "enforce"}, **extra})


# --- unpriced models --------------------------------------------------------------------------------------------


def test_unpriced_model_under_an_enforcing_budget_is_refused_before_the_provider(gateways, standin):
    model = "gpt-4o-mini-unpriced"
    gw, keys = gateways(_enforced(costs={"openai:gpt-4o-mini-priced": PRICES}), ["ann"])
    client = openai.OpenAI(api_key=keys["ann"], max_retries=2)
    t0 = time.time()
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model=model, messages=MSGS, max_tokens=8)
    e = ei.value
    assert e.status_code == 403 and e.code == "model_not_priced"
    assert f"'openai:{model}'" in e.message and "budgeting.costs" in e.message and "user 'ann'" in e.message
    assert calls(standin, model) == 0  # not forwarded, and not retried by the SDK
    assert client.chat.completions.create(model="gpt-4o-mini-priced", messages=MSGS).choices[0].message.content \
        == ANSWER
    rows = gw.rows(since=t0, wait_for=2)
    assert [(r["model"], r["outcome"], r["status_code"], r["cost_usd"]) for r in rows] == [
        (model, "unpriced_model", 403, None), ("gpt-4o-mini-priced", "ok", 200, rows[1]["cost_usd"])]
    assert rows[1]["cost_usd"] > 0


def test_unpriced_allow_serves_it_with_cost_null_and_one_warning(gateways, standin):
    model = "gpt-4o-mini-unpriced-allowed"
    gw, keys = gateways(_enforced(unpriced="allow"), ["bea"])
    client = openai.OpenAI(api_key=keys["bea"], max_retries=0)
    t0 = time.time()
    for _ in range(2):
        assert client.chat.completions.create(model=model, messages=MSGS).choices[0].message.content == ANSWER
    rows = gw.rows(since=t0, wait_for=2)
    assert [(r["outcome"], r["cost_usd"], r["input_tokens"]) for r in rows] == [("ok", None, 11)] * 2
    assert calls(standin, model) == 2
    assert gw.output().count(f"no price for provider openai model '{model}'") == 1


def test_track_mode_budget_never_refuses(gateways, standin):
    model = "gpt-4o-mini-unpriced-tracked"
    gw, keys = gateways(lambda p: p.update(budgeting={
        "tiers": [{"name": "watch", "limit_usd": 0, "mode": "track", "shared_users": ["cal"]}],
        "costs": {"openai:gpt-4o-mini-tracked-priced": PRICES}}), ["cal"])
    client = openai.OpenAI(api_key=keys["cal"], max_retries=0)
    t0 = time.time()
    # unpriced, and priced past a limit of $0: tracked, never refused
    for m in (model, "gpt-4o-mini-tracked-priced", "gpt-4o-mini-tracked-priced"):
        assert client.chat.completions.create(model=m, messages=MSGS).choices[0].message.content == ANSWER
    rows = gw.rows(since=t0, wait_for=3)
    assert [r["outcome"] for r in rows] == ["ok"] * 3 and rows[0]["cost_usd"] is None
    assert calls(standin, model) == 1


def test_unified_api_refuses_an_unpriced_model_too(make_gateway, standin):
    port = free_port()

    def update(p):
        p["gateway"]["port"] = port
        p["budgeting"] = {"global": {"limit_usd": 5}}

    gw = make_gateway(update, extra_args=["--mode", f"reverse:http://tollgate.invalid:1@{port}"])
    key = gw.create_key("eve", live=True)["key"]  # (its probe, GET /v1/models, is no model call: admitted)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    t0 = time.time()
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model="anthropic:claude-unpriced-unified", messages=MSGS)
    assert "'anthropic:claude-unpriced-unified'" in ei.value.message and "global budget" in ei.value.message
    assert calls(standin, "claude-unpriced-unified") == 0
    assert client.chat.completions.create(model="openai:gpt-4o-mini", messages=MSGS).choices[0].message.content \
        == ANSWER
    rows = gw.rows(since=t0, wait_for=2)
    assert [(r["provider"], r["model"], r["outcome"]) for r in rows] == [
        ("anthropic", "claude-unpriced-unified", "unpriced_model"), ("openai", "gpt-4o-mini", "ok")]


# --- unmanaged LLM hosts ----------------------------------------------------------------------------------------


def _curl(gw, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-v", "--max-time", "20", "-p", "-x", f"http://127.0.0.1:{gw.port}", url,
                           *args], capture_output=True, text=True, env=clean_env(), timeout=60)


def test_unmanaged_llm_host_is_refused_at_connect_and_logged(make_gateway, monkeypatch, standin):
    gw = make_gateway()
    t0 = time.time()
    r = _curl(gw, "https://api.cohere.ai/compatibility/v1/chat/completions", "-d", "{}")
    assert r.returncode != 0 and "CONNECT tunnel failed, response 403" in r.stderr, r.stderr
    assert ('< HTTP/1.1 403 Forbidden by tollgate: api.cohere.ai:443 is an LLM API the policy does not configure; '
            'add providers.cohere: {protocol: openai, hosts: ["api.cohere.ai"], api_key: ...}, or set '
            'gateway.unmanaged_llm_hosts: allow') in r.stderr, r.stderr

    # The official SDK through HTTPS_PROXY: the proxy's 403 is a connection error, never a request sent.
    use(gw, monkeypatch)
    az = openai.AzureOpenAI(azure_endpoint="https://contoso.openai.azure.com", api_key="real-azure-key-000",
                            api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.APIConnectionError) as ei:
        az.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert "403 Forbidden by tollgate: contoso.openai.azure.com:443" in str(ei.value.__cause__)
    assert 'providers.azure: {protocol: azure, hosts: ["contoso.openai.azure.com"]' in str(ei.value.__cause__)
    # A managed provider on the same gateway is untouched.
    assert openai.OpenAI(api_key=gw.create_key("dee", live=True)["key"], max_retries=0).models.list() is not None

    rows = gw.rows("outcome = 'unmanaged_host'", since=t0, wait_for=2)
    assert [(r["endpoint"], r["provider"], r["status_code"], r["key_id"], r["cost_usd"]) for r in rows] == [
        ("api.cohere.ai:443", None, 403, None, None), ("contoso.openai.azure.com:443", None, 403, None, None)]
    assert json.loads(rows[1]["metadata"]) == {"client": "127.0.0.1", "llm_api": "azure"}
    out = gw.output()
    warning = "api.cohere.ai:443 is an LLM API (cohere) that this gateway's policy does not configure"
    assert out.count(warning) == 1 and "contoso.openai.azure.com:443 is an LLM API (azure)" in out
    for _ in range(2):  # more connections from the same client within the minute: rows, no more warnings
        _curl(gw, "https://api.cohere.ai/v1/chat")
    # Plain HTTP in absolute form (HTTP_PROXY): refused alike, in the API's error format, which the SDK reads.
    plain = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", f"http://127.0.0.1:{gw.port}",
                            "http://api.perplexity.ai/chat/completions", "-d", "{}", "-w", "%{http_code}"],
                           capture_output=True, text=True, env=clean_env(), timeout=60)
    assert plain.stdout.endswith("403"), plain
    assert json.loads(plain.stdout[:-3])["error"]["code"] == "unmanaged_llm_host"
    rows = gw.rows("outcome = 'unmanaged_host'", since=t0, wait_for=5)
    assert [r["endpoint"] for r in rows[2:]] == ["api.cohere.ai:443", "api.cohere.ai:443", "api.perplexity.ai:80"]
    time.sleep(0.3)
    assert gw.output().count(warning) == 1


def _cert_for(folder, host: str):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = folder / "cohere-cert.pem", folder / "cohere-key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def test_unmanaged_llm_hosts_allow_tunnels_and_still_logs(make_gateway, tmp_path):
    cert, key = _cert_for(tmp_path, "api.cohere.ai")
    server = TlsServer(cert, key)
    try:
        route = tmp_path / "route.py"
        route.write_text(ROUTE.format(port=server.port))
        gw = make_gateway(lambda p: p["gateway"].update(unmanaged_llm_hosts="allow"), extra_args=["-s", str(route)])
        t0 = time.time()
        r = _curl(gw, "https://api.cohere.ai/v1/chat", "--cacert", str(cert))
        assert r.returncode == 0 and r.stdout == "tunneled", r.stderr  # our certificate: not intercepted
        mitm = _curl(gw, "https://api.cohere.ai/v1/chat", "--cacert", str(gw.confdir / "mitmproxy-ca-cert.pem"))
        # Negative control: trusting only mitmproxy's CA, the same host does not verify (it was not intercepted).
        assert mitm.returncode != 0 and "certificate" in mitm.stderr, mitm.stderr
        assert server.handshakes == 1
        rows = gw.rows(since=t0, wait_for=2)
        assert [(r["outcome"], r["endpoint"], r["status_code"]) for r in rows] == \
            [("unmanaged_host", "api.cohere.ai:443", 200)] * 2
        out = gw.output()
        assert out.count("api.cohere.ai:443 is an LLM API (cohere) that") == 1 and "tunneled unmetered" in out
    finally:
        server.close()
