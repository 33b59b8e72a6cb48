"""tollgate.alerts: log line + webhook POST off the hot path; retries; never raises; exactly one POST per threshold."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from decimal import Decimal as D
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tollgate.alerts import AlertSender, safe_url
from tollgate.budgets import Budgets, Reservation

T = 1750248000.0  # 2025-06-18 12:00 UTC
SECRET = "T000/B000/XXXXsecretXXXX"


class Hook:
    """A local webhook that records POSTs and answers with scripted status codes (then 200)."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.attempts = 0
        self.script: list[int] = []
        self.delay = 0.0
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(hook.delay)
                with hook.lock:
                    hook.attempts += 1
                    code = hook.script.pop(0) if hook.script else 200
                    if code == 200:
                        assert self.headers["Content-Type"] == "application/json"
                        hook.bodies.append(json.loads(body))
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/{SECRET}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    h = Hook()
    yield h
    h.close()


def _budgets(webhook, mode="enforce", alert_at=(0.5, 0.8, 0.9)):
    return Budgets.from_policy(
        {"tiers": [{"name": "team", "limit_usd": 10, "mode": mode, "shared_users": ["u1", "u2"],
                    "alert_at": list(alert_at)}]},
        {"webhook": webhook}, now=T)


def _spend(b: Budgets, sender: AlertSender, amounts):
    for a in amounts:
        r = b.reserve("u1", None, D(a), now=T)
        assert isinstance(r, Reservation)
        for alert in b.settle(r, D(a), now=T):
            sender.send(alert)


@pytest.mark.parametrize("mode", ["enforce", "track"])
def test_exactly_one_post_per_threshold(hook, caplog, mode):
    b = _budgets(hook.url, mode)
    sender = AlertSender(b.webhook, backoff=0.01)
    caplog.set_level(logging.INFO, logger="tollgate.budgets")
    _spend(b, sender, ["4", "0.5", "0.5", "3", "0.5", "0.5"] + (["5"] if mode == "track" else []))
    assert sender.stop(5)
    assert [x["fraction"] for x in hook.bodies] == [0.5, 0.8, 0.9]
    assert hook.attempts == 3
    first = hook.bodies[0]
    assert first["event"] == "budget_threshold" and first["budget"] == "team" and first["scope"] == "tier"
    assert first["mode"] == mode and first["spent_usd"] == "5.0" and first["limit_usd"] == "10"
    assert first["threshold_usd"] == "5.0" and first["period_end"] == "2025-07-01T00:00:00+00:00"
    assert "crossed 50% of its limit: $5.00 of $10.00" in first["text"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "tollgate.budgets"]
    assert [r.getMessage().split(" crossed ")[1].split("%")[0] for r in warnings] == ["50", "80", "90"]
    assert "tier 'team'" in warnings[0].getMessage() and "$5.00 of $10.00" in warnings[0].getMessage()


def test_failing_webhook_is_retried_with_backoff(hook, caplog):
    caplog.set_level(logging.INFO, logger="tollgate.budgets")
    hook.script = [500, 503, 429]  # three transient failures, then 200
    sender = AlertSender(hook.url, backoff=0.05)
    b = _budgets(hook.url, alert_at=[0.5])
    t0 = time.monotonic()
    _spend(b, sender, ["6"])
    assert sender.stop(5)
    assert time.monotonic() - t0 >= 0.05 + 0.1 + 0.2  # 0.05, 0.1, 0.2 s between attempts
    assert hook.attempts == 4 and len(hook.bodies) == 1
    assert sender.stats["sent"] == 1 and sender.stats["failed"] == 0
    assert SECRET not in caplog.text and f"127.0.0.1:{hook.server.server_port}" in caplog.text


def test_gives_up_after_three_retries_and_never_raises(hook, caplog):
    hook.script = [500] * 10
    sender = AlertSender(hook.url, backoff=0.01)
    _spend(_budgets(hook.url, alert_at=[0.5, 0.9]), sender, ["9"])
    assert sender.stop(5)
    assert hook.attempts == 2 * 4  # each alert: 1 try + 3 retries
    assert sender.stats["failed"] == 2 and not hook.bodies
    assert "failed (HTTP 500) after 4 attempt(s)" in caplog.text and SECRET not in caplog.text


def test_client_errors_are_not_retried(hook):
    hook.script = [404]
    sender = AlertSender(hook.url, backoff=0.01)
    _spend(_budgets(hook.url, alert_at=[0.5]), sender, ["6"])
    assert sender.stop(5)
    assert hook.attempts == 1 and sender.stats["failed"] == 1


def test_unreachable_webhook(caplog):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    url = f"http://127.0.0.1:{port}/{SECRET}"
    sender = AlertSender(url, backoff=0.01, timeout=1)
    _spend(_budgets(url, alert_at=[0.5]), sender, ["6"])
    assert sender.stop(5)
    assert sender.stats["attempts"] == 4 and sender.stats["failed"] == 1
    assert "URLError" in caplog.text or "ConnectionRefusedError" in caplog.text
    assert SECRET not in caplog.text


def test_send_never_blocks(hook):
    hook.delay = 0.1  # a slow webhook
    sender = AlertSender(hook.url, backoff=0.01)
    b = _budgets(hook.url, alert_at=[0.1, 0.2, 0.3, 0.4, 0.5])
    r = b.reserve("u1", None, D(6), now=T)
    alerts = b.settle(r, D(6), now=T)
    assert len(alerts) == 5
    t0 = time.perf_counter()
    for a in alerts:
        sender.send(a)
    assert time.perf_counter() - t0 < 0.05
    assert sender.stop(10)  # drains all five
    assert [x["fraction"] for x in hook.bodies] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_stop_gives_up_at_its_timeout(hook, caplog):
    hook.script = [500] * 100
    sender = AlertSender(hook.url, backoff=1.0)
    _spend(_budgets(hook.url, alert_at=[0.5]), sender, ["6"])
    t0 = time.monotonic()
    sender.stop(0.3)  # no retry wait may run past the deadline
    assert time.monotonic() - t0 < 2


def test_log_only_without_webhook(caplog):
    sender = AlertSender(None)
    caplog.set_level(logging.WARNING, logger="tollgate.budgets")
    _spend(_budgets(None, alert_at=[0.5]), sender, ["6"])
    assert sender.stop(5)
    assert sender.stats["attempts"] == 0
    assert "budget tier 'team' crossed 50% of its limit: $6.00 of $10.00 spent" in caplog.text


def test_full_queue_drops_instead_of_blocking(caplog):
    sender = AlertSender(None, max_queue=1)
    sender._thread = threading.Thread(target=lambda: None)  # a thread that never consumes
    b = _budgets(None, alert_at=[0.5, 0.9])
    got = b.settle(b.reserve("u1", None, D(10), now=T), D(10), now=T)
    assert len(got) == 2
    for a in got:
        sender.send(a)
    assert sender.stats["dropped"] == 1 and "alert queue full" in caplog.text


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T0/B0/secret", "https://hooks.slack.com/…"),
    ("http://user:pw@h.example:8080/x?token=s", "http://h.example:8080/…"),
])
def test_safe_url(url, shown):
    assert safe_url(url) == shown
