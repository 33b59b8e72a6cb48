"""`scripts/bench --floor`: the least a key-swapping gateway addon can do, run in tollgate's place.

It answers "what does being a mitmproxy addon cost at all?": on the bench's own traffic it looks at the
credential, swaps in the real key, redirects to the upstream and streams SSE answers, in a few lines of
Python and nothing else (no policy, no parsing, no limits, budgets or ledger). Whatever tollgate costs beyond
this floor is tollgate's own per-request work. Not a gateway: any `Bearer tg-…` passes.
"""
from __future__ import annotations

from urllib.parse import urlsplit

import yaml
from mitmproxy import ctx, http

HOST = "api.openai.com"


class Floor:
    def __init__(self) -> None:
        self.real = ""
        self.target: tuple[str, str, int] | None = None

    def load(self, loader) -> None:
        # tollgate's options, so the bench starts it with tollgate's command line
        loader.add_option("tollgate_policy", str, "", "the bench's policy (provider key and base_url)")
        loader.add_option("tollgate_flush_interval", str, "0.25", "unused")

    def configure(self, updated: set[str]) -> None:
        if "tollgate_policy" in updated and ctx.options.tollgate_policy:
            with open(ctx.options.tollgate_policy) as f:
                p = yaml.safe_load(f)["providers"]["openai"]
            self.real = f"Bearer {p['api_key']}"
            u = urlsplit(p["base_url"])
            self.target = (u.scheme, u.hostname or "", u.port or 443)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if req.host != HOST or self.target is None:
            return
        if not req.headers.get("authorization", "").startswith("Bearer tg-"):
            flow.response = http.Response.make(401, b'{"error":{"message":"no virtual key"}}',
                                               {"content-type": "application/json"})
            return
        req.headers["authorization"] = self.real
        req.scheme, req.host, req.port = self.target

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None and resp.headers.get("content-type", "").startswith("text/event-stream"):
            resp.stream = True  # relayed as it arrives, as tollgate relays streams


addons = [Floor()]
