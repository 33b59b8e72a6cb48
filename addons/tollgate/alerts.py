"""Budget alerts, delivered off the hot path: a log line and, if ``alerts.webhook`` is set, a JSON POST.

``AlertSender.send`` only puts the alert on a queue (O(1), never blocks the event loop); a daemon thread logs
it and POSTs it with urllib, retrying transient failures with backoff. Nothing here ever raises into the
caller: a dead webhook costs a log line, not a request.

Webhook URLs (Slack, Teams, ...) usually carry a secret token in their path, so logs name only the
scheme and host.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger("tollgate.budgets")

_STOP = object()


class _AlertLike(Protocol):
    @property
    def message(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


def safe_url(url: str) -> str:
    """scheme://host[:port]/… for logs: the path and query may hold the webhook's secret."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc.rpartition('@')[2]}/…"


class AlertSender:
    """One daemon thread that logs and posts alerts in order.

    Retries: after a connection error, a timeout, HTTP 408/429 or 5xx, it waits `backoff`, 2×, 4× … seconds
    (`retries` times) before giving up on that alert. Other 4xx answers are final (the hook refuses it).
    """

    def __init__(self, webhook: str | None, *, timeout: float = 5.0, retries: int = 3, backoff: float = 0.5,
                 max_queue: int = 1000, opener: urllib.request.OpenerDirector | None = None):
        self.webhook = webhook
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        # urllib's default opener honours HTTPS_PROXY/NO_PROXY, which a gateway behind a corporate proxy needs.
        self._opener = opener or urllib.request.build_opener()
        self._q: queue.Queue = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._deadline = float("inf")  # set by stop(): no retry waits past it
        self.stats = {"sent": 0, "failed": 0, "dropped": 0, "attempts": 0}

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tollgate-alerts", daemon=True)
                self._thread.start()

    def send(self, alert: _AlertLike) -> None:
        """Queue one alert. Non-blocking; when the queue is full (a webhook down for long) it is dropped."""
        if self._thread is None:
            self.start()
        try:
            self._q.put_nowait(alert)
        except queue.Full:
            self.stats["dropped"] += 1
            log.error("alert queue full; dropped: %s", alert.message)

    def stop(self, timeout: float = 10.0) -> bool:
        """Deliver what is queued within `timeout` seconds, then end the thread. True if all was delivered."""
        thread = self._thread
        if thread is None:
            return True
        self._deadline = time.monotonic() + timeout
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        thread.join(max(0.0, self._deadline - time.monotonic()) + self.timeout + 1)
        drained = not thread.is_alive() and self._q.empty()
        if not drained:
            log.warning("alerts: %d alert(s) not delivered at shutdown", self._q.qsize())
        else:
            self._thread = None
        return drained

    # --- thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            alert = self._q.get()
            if alert is _STOP:
                return
            try:
                log.warning("%s", alert.message)
                if self.webhook:
                    self._post(alert)
            except Exception:  # the thread must outlive any one alert
                log.exception("alerts: delivering an alert failed")

    def _post(self, alert: _AlertLike) -> bool:
        assert self.webhook
        body = json.dumps(alert.to_json(), separators=(",", ":")).encode()
        where = safe_url(self.webhook)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.stats["attempts"] += 1
            req = urllib.request.Request(self.webhook, data=body, method="POST", headers={
                "Content-Type": "application/json", "User-Agent": "tollgate-alerts"})
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    resp.read(65536)
                self.stats["sent"] += 1
                return True
            except urllib.error.HTTPError as e:
                why, transient = f"HTTP {e.code}", e.code in (408, 429) or e.code >= 500
                e.close()
            except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, bad responses
                why, transient = type(getattr(e, "reason", e)).__name__, True
            if not transient or attempt == self.retries or time.monotonic() + delay > self._deadline:
                break
            log.info("alerts: webhook %s answered %s; retrying in %gs", where, why, delay)
            time.sleep(delay)
            delay *= 2
        self.stats["failed"] += 1
        log.error("alerts: webhook %s failed (%s) after %d attempt(s); alert not delivered", where, why,
                  attempt + 1)
        return False
