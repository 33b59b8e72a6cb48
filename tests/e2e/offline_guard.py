"""A mitmproxy script loaded beside the gateway when tests run third-party CLIs: nothing leaves this machine.

The CLIs call home (Codex: chatgpt.com, ab.chatgpt.com, github.com; Claude Code: settings endpoints) besides
the provider APIs the gateway intercepts. Those tunnels would reach the internet wherever it is reachable
(CI), so every CONNECT or plain request for a host the policy does not intercept is answered 403 here, and
the host is written to $OFFLINE_GUARD_LOG for the test to show.
"""
import os

from mitmproxy import http

ALLOWED = {"api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "tollgate.invalid",
           "127.0.0.1", "localhost"}


def _blocked(flow: http.HTTPFlow) -> None:
    host = flow.request.host
    if host in ALLOWED:
        return
    path = os.environ.get("OFFLINE_GUARD_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{host}:{flow.request.port}\n")
    flow.response = http.Response.make(403, b"offline test: this host is not reachable from the test\n")


def http_connect(flow: http.HTTPFlow) -> None:
    _blocked(flow)


def requestheaders(flow: http.HTTPFlow) -> None:
    if flow.response is None:
        _blocked(flow)
