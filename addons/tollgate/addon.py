"""The mitmproxy addon: hooks that wire tollgate's modules together, and nothing else.

http_connect    a well-known LLM host the policy does not configure (llmhosts) → 403 or tunnel, ledger row
requestheaders  provider by host (or the unified API) → credential → identity; the credential in the
                flow is replaced by a redacted marker at once, so mitmweb never shows it
request         request facts (model, stream, max tokens) → (unified: route by model prefix)
                → rate limits → budget reservation (an unpriced model under an enforcing budget: 403)
                → OpenAI streams asked for usage → real key in
responseheaders redact again; x-ratelimit-* headers; streamed answers get a StreamTap
response/error  usage (provider-reported, else estimated off the loop) → cost → settle limits and
                budget → ledger row → flow comment

Decisions go into flow.metadata["tollgate"] (plain values) and the flow comment, as mitmproxy's own
addons do; the live per-request state stays in `self.live` because flow.metadata is saved with `-w`.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http.url import hostport

from . import headers as hdrs

from . import providers as prov
from . import native_errors, tokens, unified, wsturns
from .auth import Authenticator
from .budgets import Refusal
from .controls import Controls
from .exchange import Exchange
from .keys import hash_key
from .ledger import Ledger
from .limits import Subject
from .llmhosts import Unmanaged, UnmanagedHosts
from .policy import Policy, PolicyError, load as load_policy
from .redact import RedactingFilter
from .status import status_path, write_status
from .streamtap import StreamTap, decoder_for
from .usage import Usage

log = logging.getLogger("tollgate")

REDACTED = "tollgate-redacted"
POLICY_POLL = 1.0  # seconds between checks of policies.yaml for edits
# How long a request under an enforcing budget waits at start for the budget's spend to be read from the
# ledger before it is refused (503): never admitted against a spend counted from zero.
SPEND_WAIT = 10.0
SPEND_RETRY = 2.0  # seconds between attempts to read it when the ledger failed
BIG_BODY = 256 * 1024  # JSON bodies above this are parsed on a worker thread, not the event loop
# Answers above this are metered from their usage and model members alone (providers.metering_fields):
# below it a whole parse is as cheap (measured: 5.5 µs whole vs 11.5 µs for a 363-byte chat answer; a
# 68 KB embeddings answer 710 µs whole vs 27 µs).
TAIL_READ = 8 * 1024
_JSON_TYPES = (b"{", b"[")
_JSON = {"content-type": "application/json"}
_ZERO = Decimal(0)
# Endpoint kinds that run a model and are billed by it: one of these without a model cannot be priced.
_MODEL_CALLS = frozenset({"chat", "completions", "responses", "embeddings", "messages", "generate", "audio",
                          "realtime"})
# Refusals: answered by the gateway itself (no time to first byte).
_REFUSED = frozenset({"unauthorized", "gateway_error", "rate_limited", "budget_exceeded", "unpriced_model",
                      "unmanaged_host"})


class Gateway:
    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.auth = Authenticator()
        self.controls: Controls | None = None
        self.ledger: Ledger | None = None
        self.live: dict[str, Exchange] = {}
        self.flows: dict[str, http.HTTPFlow] = {}  # the flows of self.live, for done()
        self.sessions: dict[str, tuple[http.HTTPFlow, wsturns.Session]] = {}  # open WebSockets, by flow id
        self.redactor = RedactingFilter()
        self.unmanaged = UnmanagedHosts()
        self._estimator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-estimate")
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tollgate-io")
        self._spend: Future | None = None  # budgets' period spend being read from the ledger, until applied
        self._spend_event: asyncio.Event | None = None  # set when it has been applied
        self._spend_error: str | None = None  # why the last attempt failed
        self._spend_task: asyncio.Task | None = None
        self._policy_sig: tuple | None = None
        self._watcher: asyncio.Task | None = None
        self._models_cache: dict[str, tuple[float, list[str]]] = {}
        self._sweeper: asyncio.Task | None = None

    @property
    def pricer(self):
        return self.controls.pricer if self.controls else None

    # --- options and lifecycle -----------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("tollgate_policy", str, "policies.yaml",
                          "tollgate policy file (providers, keys, limits, budgets, ledger).")
        # str, not float: mitmproxy's --set parses only str, int, bool and sequences.
        loader.add_option("tollgate_flush_interval", str, "0.25",
                          "Seconds between ledger writes (rows wait in memory and a spool meanwhile).")
        self.redactor.install()
        native_errors.install()

    def configure(self, updated: set[str]) -> None:
        if "tollgate_policy" not in updated:
            return
        try:
            pol = load_policy(ctx.options.tollgate_policy)
            controls = Controls.build(pol, self.controls)
        except PolicyError as e:
            raise exceptions.OptionsError(str(e)) from None
        self._apply(pol, controls)

    def _apply(self, pol: Policy, controls: Controls) -> None:
        old = self.controls
        self.policy, self.controls = pol, controls
        self._policy_sig = _file_sig(pol.path)
        self.redactor.set_secrets(pol.secrets())
        self.auth.configure(pol.auth.master_key, pol.auth.virtual_keys_enabled)
        self.unmanaged.configure(pol)
        patterns = [pat for p in pol.providers.values() for pat in prov.host_patterns(p.hosts)]
        patterns.append(unified.UNIFIED_PATTERN)
        # Intercept only provider hosts (and the unified API's listener); everything else is tunneled
        # with its own certificate. Lazy connections: with base_url the provider's host may not resolve.
        opts: dict[str, Any] = {"allow_hosts": patterns}
        if "connection_strategy" in ctx.options:  # absent when the proxy server addon is not loaded (tests)
            opts["connection_strategy"] = "lazy"
        ctx.options.update(**opts)
        if self.ledger is None or os.path.abspath(self.ledger.path) != os.path.abspath(pol.database):
            if self.ledger is not None:
                self.ledger.stop()
            self.ledger = Ledger(str(pol.database), flush_interval=_seconds(ctx.options.tollgate_flush_interval),
                                 on_keys=self.auth.set_keys)
            self.ledger.error_level = _error_level
            self.ledger.start()
        if old is not None and old.alerts is not None and old.alerts is not controls.alerts:
            old.stop()
        if controls.budgets.spend_query() is not None:  # budgets recount their period's spend from the ledger
            self._spend = self.ledger.call(controls.budgets.fetch_spend)  # (on the ledger's thread)
            self._start_spend_task()
        missing = [p.name for p in pol.providers.values() if not p.api_key]
        log.info("tollgate: policy %s: providers %s%s; ledger %s", pol.path, ", ".join(pol.providers),
                 f" (no real key yet: {', '.join(missing)})" if missing else "", pol.database)

    async def running(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_policy())
            # The startup heap (genai-prices' price table, the tokenizers, DuckDB's bindings, mitmproxy:
            # ~120k objects) lives as long as the process; every full collection walked all of it, a 50-110 ms
            # pause for every request in flight (measured under load). Frozen, collections skip it.
            gc.collect()
            gc.freeze()
        # Not awaited: a big or locked ledger must not hold up the start (mitmproxy gives up on a start that
        # logs an error); requests under enforcing budgets wait for it instead (_spend_known).
        self._start_spend_task()

    def done(self) -> None:
        # Flows still in flight hold the real key (from `request` until the answer's headers). mitmproxy's Save
        # addon writes them as they are right after this hook, and their error hook would only come after the
        # ledger has stopped: redact them and write their rows now.
        for flow_id, flow in list(self.flows.items()):
            ex = self.live.pop(flow_id, None)
            if ex is None:
                continue
            self._redact(flow, ex)
            if ex.outcome == "ok":
                ex.outcome, ex.error = "client_aborted", "the gateway shut down during the request"
                self._usage_from_tap(ex)
                if ex.usage is None or ex.usage.source != "provider":
                    ex.usage = Usage(source="estimated", input_tokens=tokens.rough_tokens(ex.body_size))
            self._finish(flow, ex, time.time())
        self.flows.clear()
        for flow, s in list(self.sessions.values()):
            self._end_session(flow, s, "client_aborted", "the gateway shut down during the turn")
        self.sessions.clear()
        for task in (self._watcher, self._sweeper):
            if task is not None:
                task.cancel()
        if self.ledger is not None:
            self.ledger.stop()
        if self.controls is not None:
            self.controls.stop()
        self._estimator.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)
        self.redactor.uninstall()
        native_errors.uninstall()

    async def _watch_policy(self) -> None:
        """Hot reload: an edit takes effect within POLICY_POLL; a broken one is refused, the old stays.
        Also publishes the budgets' live state (reservations are known only here) for `tollgate budgets`."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(POLICY_POLL)
            if self.sessions:
                self._sweep_sessions()
            if self.controls is not None and self.ledger is not None:
                status = {"written_at": time.time(), "pid": os.getpid(), "budgets": self.controls.budgets.status()}
                loop.run_in_executor(self._io, write_status, status_path(self.ledger.path), status)
            pol = self.policy
            if pol is None or pol.path is None or _file_sig(pol.path) == self._policy_sig:
                continue
            self._policy_sig = _file_sig(pol.path)
            try:
                new = await loop.run_in_executor(self._io, load_policy, pol.path)
                controls = Controls.build(new, self.controls)
            except PolicyError as e:
                log.error("tollgate: policy change refused, the previous policy stays in force: %s", e)
                continue
            except Exception:
                log.exception("tollgate: policy change refused, the previous policy stays in force")
                continue
            self._apply(new, controls)
            log.info("tollgate: policy reloaded from %s", new.path)

    def _start_spend_task(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # configure() before the event loop runs: running() starts it
            return
        if self._spend_event is None:
            self._spend_event = asyncio.Event()
        if self._spend is not None and (self._spend_task is None or self._spend_task.done()):
            self._spend_event.clear()
            self._spend_task = loop.create_task(self._load_spend())

    async def _load_spend(self) -> None:
        """Apply the budgets' period spend once the ledger thread has read it; retry while it fails."""
        while (fut := self._spend) is not None:
            try:
                got = await asyncio.wrap_future(fut)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._spend is not fut:
                    continue  # a reload asked again meanwhile
                self._spend_error = str(e).strip().split("\n", 1)[0][:300]
                log.warning("tollgate: could not read budget spend from the ledger (%s); enforcing budgets "
                            "admit nothing until it is read, retrying in %gs", self._spend_error, SPEND_RETRY)
                await asyncio.sleep(SPEND_RETRY)
                if self._spend is fut and self.ledger is not None and self.controls is not None:
                    self._spend = self.ledger.call(self.controls.budgets.fetch_spend)
                continue
            if self._spend is not fut:
                continue
            self._spend = self._spend_error = None
            if got is not None:
                for alert in self.controls.budgets.apply_spend(*got):
                    self.controls.alerts.send(alert)
        if self._spend_event is not None:
            self._spend_event.set()

    async def _spend_known(self, flow: http.HTTPFlow, ex: Exchange) -> bool:
        """Whether this request may be admitted: False (refused with a 503) when an enforcing budget of its
        still does not know its period's spend after SPEND_WAIT. Other requests never wait."""
        ident = ex.identity
        if ident is None or self.controls.budgets.spend_unknown(ident.user_id, ex.tier) is None:
            return True
        self._start_spend_task()  # (if configure() ran before the loop did)
        if self._spend_event is not None:
            try:
                await asyncio.wait_for(self._spend_event.wait(), SPEND_WAIT)
            except TimeoutError:
                pass
        b = self.controls.budgets.spend_unknown(ident.user_id, ex.tier)
        if b is None:
            return True
        self._refuse_spend_unknown(flow, ex, b)
        return False

    def _refuse_spend_unknown(self, flow, ex: Exchange, b) -> None:
        why = self._spend_error or (f"the ledger is busy: {self.ledger.problem}" if self.ledger and
                                    self.ledger.problem else "the ledger has not answered yet")
        self._refuse(flow, ex, 503, "budget_spend_unknown", "gateway_error",
                     f"tollgate has not read this period's spend of budget {b.id!r} from the ledger yet ({why}); "
                     f"an enforcing budget admits nothing until it knows it. Retry shortly.",
                     headers={"retry-after": "5"})

    # --- hooks ---------------------------------------------------------------------------------

    # A hook that fails must refuse the request: mitmproxy logs an addon exception and lets the flow
    # continue, which here would forward it unmetered (or with the virtual key). The request-side hooks
    # therefore run guarded and answer a native 500 when they break.

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._requestheaders(flow)
        except Exception:
            self._fail(flow, "requestheaders")

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception:
            self._fail(flow, "request")

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """A CONNECT, before mitmproxy decides to intercept or tunnel (allow_hosts applies after this hook):
        a well-known LLM API the policy does not configure is refused or tunneled, and logged either way."""
        if self.policy is None:
            return
        try:
            u = self.unmanaged.check(flow.request.host, flow.request.port)
            if u is not None:
                self._unmanaged(flow, u)
        except Exception:
            log.exception("tollgate: http_connect hook failed; the CONNECT is refused")
            flow.response = http.Response.make(500, b"tollgate could not check this host; the CONNECT is refused\n",
                                               {"content-type": "text/plain; charset=utf-8"})

    def _unmanaged(self, flow: http.HTTPFlow, u: Unmanaged) -> None:
        req = flow.request
        client = flow.client_conn.peername[0] if flow.client_conn.peername else "?"
        msg = u.message(self.policy.providers)
        if u.refused:
            if req.method == "CONNECT":  # a proxy's answer: the reason phrase is what apps get to see
                flow.response = http.Response.make(403, (msg + "\n").encode(), {
                    "content-type": "text/plain; charset=utf-8",
                    "proxy-status": "tollgate; error=http_request_denied"})  # RFC 9209
                flow.response.reason = u.reason(self.policy.providers)
            else:  # absolute-form plain HTTP: the SDK reads the body, so the API's own error format
                body, headers = prov.error_body(u.api.protocol or "openai", 403, "unmanaged_llm_host", msg)
                flow.response = http.Response.make(403, body, headers)
        if self.unmanaged.should_warn(client, u.hostport):
            log.warning("%s (client %s)", msg, client)
        ex = Exchange(provider=None, endpoint=u.hostport, started=req.timestamp_start, outcome="unmanaged_host",
                      error=msg, status_code=403 if u.refused else 200 if req.method == "CONNECT" else None)
        flow.metadata["tollgate"] = ex.summary()
        flow.comment = f"unmanaged LLM host ({u.api.name}): {'refused' if u.refused else 'tunneled, unmetered'}"
        if self.ledger is not None:
            row = ex.row()
            row["metadata"], row["token_source"] = {"client": client, "llm_api": u.api.name}, None
            self.ledger.record(row)

    def _fail(self, flow: http.HTTPFlow, hook: str) -> None:
        log.exception("tollgate: %s hook failed; the request is refused", hook)
        ex = self.live.get(flow.id)
        if ex is None:
            # It broke before the exchange existed (e.g. before the credential was swapped): make one, so the
            # refusal is JSON the SDKs parse and gets its row, and take the app's key out of the flow, which
            # mitmdump prints (flow_detail) and -w saves.
            req = flow.request
            ex = Exchange(provider=None, endpoint=req.path.split("?", 1)[0], started=req.timestamp_start)
            self.live[flow.id] = ex
            self.flows[flow.id] = flow
        if ex.cred is None:  # the credential was not swapped for the marker yet
            _scrub_credentials(flow.request)
        flow.response = None
        self._refuse(flow, ex, 500, "gateway_error", "gateway_error",
                     f"tollgate could not process this request ({hook} failed); it was not forwarded")

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        pol = self.policy
        if pol is None:
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        if req.host == unified.UNIFIED_HOST:
            if path in ("/health", "/health/ready"):
                flow.response = self._health(path)
                return
            ex = Exchange(provider=None, endpoint=path, started=req.timestamp_start, unified=True)
        else:
            provider = pol.provider_for(req.host, req.port)
            if provider is None:  # not intercepted, or an absolute-form plain-HTTP request
                u = self.unmanaged.check(req.host, req.port)
                if u is not None:
                    self._unmanaged(flow, u)
                return
            ex = Exchange(provider=provider, endpoint=path, started=req.timestamp_start, wire=provider.protocol)
        self.live[flow.id] = ex
        self.flows[flow.id] = flow
        cred = prov.find_credential(ex.wire, req.headers, req.query if "?" in req.path else {})
        if cred is None:
            return self._refuse(flow, ex, 401, "invalid_api_key", "unauthorized",
                                "no API key was presented; use a tollgate virtual key")
        ident, why = self.auth.identify(cred.value)
        if ident is not None and hdrs.get(req.headers, b"upgrade") is not None:
            ex.key_hash = hash_key(cred.value)  # a WebSocket: each of its turns checks the key again
        cred.value = ""  # the virtual key itself is not kept past its hash lookup
        ex.cred, ex.identity = cred, ident
        _write_credential(req, cred, f"{REDACTED}:{ident.key_id if ident else 'rejected'}")
        ex.redacted = True
        if ident is None:
            return self._refuse(flow, ex, 401, "invalid_api_key", "unauthorized", why)
        ex.tier = self.controls.budgets.tier_of(ident.user_id, ident.tier)
        if ex.provider is not None and not ex.provider.api_key:
            self._refuse_missing_key(flow, ex)

    async def _request(self, flow: http.HTTPFlow) -> None:
        ex = self.live.get(flow.id)
        if ex is None or flow.response is not None:
            return
        if self._spend is not None and not await self._spend_known(flow, ex):
            return
        req = flow.request
        ex.body_size = len(req.raw_content or b"")
        if ex.body_size > BIG_BODY:  # a 20 MB prompt would stall every other request while parsed
            body = await asyncio.get_running_loop().run_in_executor(self._io, _json_body, req)
        else:
            body = _json_body(req)
        if ex.unified:
            if ex.endpoint == "/v1/models":
                return await self._models(flow, ex)
            target = self._route(flow, ex, body)
            if target is None:
                return
        else:
            target = None
        provider = ex.provider
        facts = prov.request_facts(ex.wire, ex.endpoint, body)
        ex.kind, ex.model, ex.stream = facts.kind, facts.model, facts.stream
        ex.max_output_tokens = facts.max_output_tokens
        ex.body = body
        if ex.key_hash is not None and _is_websocket(req):
            # A WebSocket is not a request the provider bills: each of its turns is admitted on its own.
            ex.kind = "websocket"
            if wsturns.mode_for(ex.wire, ex.endpoint) is None:
                return self._refuse(flow, ex, 400, "invalid_request", "gateway_error",
                                    f"tollgate meters WebSocket sessions on the Responses (/v1/responses) and "
                                    f"Realtime (/v1/realtime) APIs only; {ex.endpoint} would go unmetered")
        elif not self._admit(flow, ex):
            return
        extra = None
        if facts.stream and not facts.include_usage and facts.kind in ("chat", "completions") \
                and isinstance(body, dict):
            # Ask for usage so the stream can be metered exactly; the tap removes it again.
            opts = body.get("stream_options")
            if opts is None or isinstance(opts, dict):
                had_key = "stream_options" in body
                body["stream_options"] = {**(opts or {}), "include_usage": True}
                extra = _with_usage_asked(req, body, had_key)
                ex.strip_usage = True
        _forward(req, ex.cred, provider.api_key, target or provider.redirect(req.path), extra)
        ex.redacted = False  # the real key is in the flow now, until _redact
        # The upstream timeout: one sweeping task checks the deadlines (a timer per request cost ~5 µs).
        ex.deadline = time.monotonic() + self.policy.gateway.upstream_timeout
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep_deadlines())

    async def _sweep_deadlines(self) -> None:
        """Every tenth of the upstream timeout (at most a second), time out the requests past it."""
        while self.live:
            timeout = self.policy.gateway.upstream_timeout if self.policy else 600.0
            await asyncio.sleep(min(1.0, max(0.05, timeout / 10)))
            now = time.monotonic()
            for flow_id, ex in list(self.live.items()):
                if ex.deadline is not None and ex.deadline <= now:
                    ex.deadline = None
                    flow = self.flows.get(flow_id)
                    if flow is not None:
                        self._upstream_timeout(flow)

    def _upstream_timeout(self, flow: http.HTTPFlow) -> None:
        """No answer in time: close the upstream connection, so the app gets an error (and the row says
        why) instead of waiting forever. mitmproxy cannot kill a flow in transit (its issue 4711)."""
        ex = self.live.get(flow.id)
        if ex is None:
            return
        ex.error = f"no answer from the provider within {self.policy.gateway.upstream_timeout:g} s"
        log.warning("tollgate: %s %s: %s", ex.provider.name if ex.provider else "?", ex.endpoint, ex.error)
        server = ctx.master.addons.get("proxyserver")
        handler = server.connections.get(flow.client_conn.id) if server is not None else None
        if handler is not None and flow.server_conn in handler.transports:
            handler.close_connection(flow.server_conn)

    # The response side is guarded too: by now the request was forwarded, so a failure must not lose its row
    # nor keep its concurrency slot and budget reservation (the user would be refused for the life of the
    # process). mitmproxy only logs an addon's exception and goes on.

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._responseheaders(flow)
        except Exception:
            log.exception("tollgate: responseheaders hook failed; the answer is relayed unread and estimated")

    async def response(self, flow: http.HTTPFlow) -> None:
        ex = self.live.pop(flow.id, None)
        self.flows.pop(flow.id, None)
        if ex is None:
            return
        try:
            await self._response(flow, ex)
        except Exception:
            self._salvage(flow, ex, "response")

    async def error(self, flow: http.HTTPFlow) -> None:
        if flow.id in self.sessions:
            return await self.websocket_end(flow)
        ex = self.live.pop(flow.id, None)
        self.flows.pop(flow.id, None)
        if ex is None:
            return
        try:
            await self._error(flow, ex)
        except Exception:
            self._salvage(flow, ex, "error")

    def _salvage(self, flow: http.HTTPFlow, ex: Exchange, hook: str) -> None:
        """Record a request whose response-side hook broke (estimated), and give back what admission took."""
        log.exception("tollgate: %s hook failed for %s; recording it with an estimate", hook, ex.request_id)
        ex.error = f"tollgate {hook} hook failed"
        if ex.usage is None or ex.usage.source != "provider":
            ex.usage = Usage(source="estimated", input_tokens=tokens.rough_tokens(ex.body_size))
        try:
            self._redact(flow, ex)
            self._finish(flow, ex, time.time())
            return
        except Exception:
            log.exception("tollgate: recording %s failed; its slot and reservation are released", ex.request_id)
        try:
            self._release(ex)
        finally:
            if self.ledger is not None:
                self.ledger.record(ex.row())

    def _responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = self.live.get(flow.id)
        if ex is None:
            return
        self._redact(flow, ex)
        ex.deadline = None
        resp = flow.response
        assert resp is not None
        if ex.limit_headers:
            hdrs.set_many(resp.headers, ex.limit_headers)
        if ex.outcome != "ok" or resp.status_code >= 400:
            return  # refusals and provider errors are small JSON: buffer them
        sse = b"text/event-stream" in (hdrs.get(resp.headers, b"content-type") or b"")
        if not (sse or ex.stream):
            return
        decode = None
        enc = hdrs.get_str(resp.headers, b"content-encoding")
        if enc:
            try:
                decode = decoder_for(enc)
            except ValueError:
                sse = False  # cannot read it: relay untouched, estimate the usage
        ex.tap = StreamTap(prov.StreamUsage(ex.wire, ex.kind), sse=sse, strip_usage=ex.strip_usage, decode=decode)
        if decode is not None:  # (stripping usage keeps the length: see streamtap)
            _body_resized(resp, drop_encoding=True, client_http10=flow.request.http_version == "HTTP/1.0")
        resp.stream = ex.tap

    async def _response(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        self._redact(flow, ex)
        resp = flow.response
        assert resp is not None
        ex.status_code = resp.status_code
        if resp.status_code == 101 and ex.outcome == "ok":
            mode = wsturns.mode_for(ex.wire, ex.endpoint)
            if flow.websocket is not None and mode is not None:
                # The socket itself gets no row: each of its turns is admitted and recorded (websocket_message).
                if ex.kind != "websocket":  # (upgraded although the request did not look like an upgrade)
                    self._release(ex)
                query = flow.request.query
                model = (query.get("model") or query.get("deployment")) if mode == wsturns.REALTIME else None
                self.sessions[flow.id] = (flow, wsturns.Session(mode, model, ex, ex.key_hash))
                ex.key_hash = None
                flow.comment = self._session_comment(self.sessions[flow.id][1])
                return
            # Any other protocol switch on a provider host (raw TCP, a socket on another path) would be an
            # unmetered channel: cut it before mitmproxy hands the connection over.
            if flow.killable:
                flow.kill()
            ex.outcome, ex.error = "gateway_error", "an upgrade tollgate cannot meter was cut"
            ex.usage = Usage()
        if ex.outcome == "ok" and ex.kind != "models":
            if resp.status_code >= 400:
                ex.outcome = "upstream_error"
                ex.usage = Usage()  # the provider answered with an error and bills nothing
            else:
                await self._usage_from_answer(ex, resp)
                if ex.usage is None or ex.usage.source != "provider":
                    await self._estimate(ex)
        self._finish(flow, ex, resp.timestamp_end)

    async def _error(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        self._redact(flow, ex)
        ex.deadline = None
        msg = flow.error.msg if flow.error else "unknown error"
        if ex.outcome == "ok":
            by_client = "client" in msg.lower()
            # An app that hangs up after the provider's final event was relayed got the whole answer (an SDK
            # stops reading at [DONE]; a full pool closes the socket before the upstream's end of message).
            if not (by_client and ex.tap is not None and ex.tap.usage.complete):
                ex.outcome = "client_aborted" if by_client else "upstream_error"
                ex.error = ex.error or msg
            if flow.response is not None:
                ex.status_code = flow.response.status_code
                self._usage_from_tap(ex)
                if ex.usage is None or ex.usage.source != "provider":
                    await self._estimate(ex)  # a cut stream bills what was produced so far
            elif ex.outcome == "upstream_error":
                ex.status_code = 502  # mitmproxy answered the app; the provider produced nothing
                ex.usage = Usage(source="estimated")
            else:
                await self._estimate(ex)  # the app gave up while the provider was working on the prompt
        self._finish(flow, ex, flow.error.timestamp if flow.error else None)

    # --- WebSocket sessions: every response.create is a turn, admitted and recorded like a request -----------

    def websocket_message(self, flow: http.HTTPFlow):
        # Sync (every server delta passes here), except for a large client event: that returns a coroutine,
        # which mitmproxy awaits before relaying, so the JSON is parsed off the loop, as for a large POST.
        entry = self.sessions.get(flow.id)
        if entry is None or flow.websocket is None:
            return None
        msg = flow.websocket.messages[-1]
        if msg.injected:  # our own error events
            return None
        s = entry[1]
        if msg.from_client:
            if len(msg.content) > BIG_BODY and msg.is_text:
                return self._large_client_event(flow, s, msg)
            try:
                self._client_event(flow, s, msg)
            except Exception:
                self._client_event_failed(flow, s, msg)
            return None
        try:
            step = s.server_event(msg.content)
            if step is not None:
                self._server_step(flow, s, step)
        except Exception:  # the event is relayed; its turn is billed when it ends or the socket does
            log.exception("tollgate: reading a server WebSocket event failed")

    async def _large_client_event(self, flow: http.HTTPFlow, s: wsturns.Session, msg) -> None:
        try:
            data = await asyncio.get_running_loop().run_in_executor(self._io, prov.loads, msg.content)
            self._client_event(flow, s, msg, data)
        except Exception:
            self._client_event_failed(flow, s, msg)

    def _client_event_failed(self, flow: http.HTTPFlow, s: wsturns.Session, msg) -> None:
        """Fail closed: a turn the gateway could not admit is not forwarded."""
        log.exception("tollgate: websocket_message hook failed; the client event is dropped")
        msg.drop()
        self._inject(flow, wsturns.error_event(s.mode, 500, {
            "type": "server_error", "code": "gateway_error",
            "message": "tollgate could not process this event; it was not forwarded"}))

    def _client_event(self, flow: http.HTTPFlow, s: wsturns.Session, msg, data: Any = wsturns._UNPARSED) -> None:
        ev = wsturns.read_client(msg.content, msg.is_text, s.mode, data)
        if ev is None:
            return  # not a turn (session.update, audio, item edits...): forwarded as it is
        if ev.error is not None:
            msg.drop()
            log.info("tollgate: client WebSocket event refused on %s: %s", s.template.endpoint, ev.error)
            self._inject(flow, wsturns.error_event(s.mode, 400, {
                "type": "invalid_request_error", "code": "invalid_event",
                "message": f"tollgate: {ev.error}; the event was not forwarded"}))
            return
        turn = self._new_turn(s, ev.body, len(msg.content), time.time())
        turn.event_id, turn.stream_id = ev.event_id, ev.stream_id
        refusal = self._admit_turn(flow, s, turn)
        if refusal is not None:
            msg.drop()
            self._inject(flow, refusal)
            turn.ex.body = None
            self._finish_turn(flow, s, turn, time.time())
            return
        if s.mode == wsturns.REALTIME and turn.event_id is None:
            msg.content, turn.event_id = wsturns.with_event_id(msg.content)
        s.open(turn)

    def _new_turn(self, s: wsturns.Session, body: dict | None, size: int, now: float) -> wsturns.Turn:
        t = s.template
        ex = Exchange(provider=t.provider, endpoint=t.endpoint, started=now, wire=t.wire, unified=t.unified)
        ex.identity, ex.tier = t.identity, t.tier
        ex.kind, ex.stream = "responses", True
        body = body or {}
        ex.model, ex.max_output_tokens, carried = s.turn_facts(body)
        ex.body = body
        # The context the provider holds for this turn (previous_response_id, a Realtime conversation) is input
        # it bills: counted into the worst case, at the 3 bytes per token the reservation assumes.
        ex.body_size = size + 3 * carried
        return wsturns.Turn(ex=ex, started=now, carried=carried)

    def _admit_turn(self, flow: http.HTTPFlow, s: wsturns.Session, turn: wsturns.Turn) -> bytes | None:
        """The POST's admission for one turn: the key again, then _admit. None, or the error event to send."""
        ex = turn.ex
        shadow = _TurnFlow(flow)
        ident, why = self.auth.identify_hash(s.key_hash) if s.key_hash else (None, "no API key")
        if ident is None:
            self._refuse(shadow, ex, 401, "invalid_api_key", "unauthorized", why)
        else:
            ex.identity = ident
            ex.tier = self.controls.budgets.tier_of(ident.user_id, ident.tier)
            if ex.provider is not None and not ex.provider.api_key:
                self._refuse_missing_key(shadow, ex)
            elif self._spend is not None and (b := self.controls.budgets.spend_unknown(ident.user_id, ex.tier)):
                self._refuse_spend_unknown(shadow, ex, b)  # (a turn cannot wait for it: the socket would stall)
            elif self._admit(shadow, ex):
                return None
        resp = shadow.response
        data = prov.loads(resp.content) if resp is not None else None
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict):
            err = {"type": "server_error", "code": "gateway_error", "message": ex.error or "refused"}
        return wsturns.error_event(s.mode, ex.status_code or 500, err, turn.event_id)

    def _server_step(self, flow: http.HTTPFlow, s: wsturns.Session, step: wsturns.Step) -> None:
        now = time.time()
        if step.unsolicited is not None:
            # The server began a response on its own (Realtime voice activity): admitted now, as it starts.
            turn = self._new_turn(s, {}, 0, now)
            turn.first = now
            rid = step.unsolicited.get("id") if isinstance(step.unsolicited.get("id"), str) else None
            refusal = self._admit_turn(flow, s, turn)
            s.adopt(turn, rid)
            if refusal is not None:  # too late to keep it from the provider: stop it, and bill what it produced
                self._inject(flow, refusal)
                if rid and s.mode == wsturns.REALTIME:
                    self._inject(flow, json.dumps({"type": "response.cancel", "response_id": rid}).encode(),
                                 to_client=False)
        for turn in step.ended:
            ex = turn.ex
            ex.response_model = turn.response_model
            if turn.usage is not None:
                ex.usage = turn.usage
                ex.status_code = ex.status_code or 200
                if turn.error is not None:
                    ex.outcome, ex.error = "upstream_error", turn.error
            elif turn.error is not None and turn.response_id is None:
                # Refused by the provider before it began: providers bill nothing for that.
                ex.outcome, ex.error, ex.status_code = "upstream_error", turn.error, turn.error_status
                ex.usage = Usage()
            else:  # ended without a usage report: estimated (off the loop), then recorded
                ex.status_code = ex.status_code or 200
                if turn.error is not None:
                    ex.outcome, ex.error = "upstream_error", turn.error
                asyncio.ensure_future(self._estimate_turn(flow, s, turn))
                continue
            self._finish_soon(flow, s, turn, turn.ended or now)

    def _sweep_sessions(self) -> None:
        """A create the provider has not begun within gateway.upstream_timeout ends as upstream_error (0 tokens:
        nothing was produced), as a request without an answer does; its slot and reservation are freed."""
        timeout = self.policy.gateway.upstream_timeout if self.policy else 600.0
        now = time.time()
        for flow, s in list(self.sessions.values()):
            for turn in s.overdue(now - timeout):
                ex = turn.ex
                ex.outcome, ex.error = "upstream_error", f"no answer from the provider within {timeout:g} s"
                ex.usage = Usage()
                self._finish_turn(flow, s, turn, now)

    def _finish_soon(self, flow: http.HTTPFlow, s: wsturns.Session, turn: wsturns.Turn, end: float) -> None:
        """Record a turn right after its final event is relayed: pricing, settling and the row (~0.2 ms) stay
        off the app's wait, and run before the loop reads anything else (so before the app's next create).
        (For HTTP this was rejected because mitmproxy's -w saves a flow in the same event; a socket's flow
        is saved only when it closes, and websocket_end settles what is still waiting first.)"""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the hook called directly, in tests): at once
            return self._finish_turn(flow, s, turn, end)
        s.settling.append(turn)
        loop.call_soon(self._settle, flow, s, turn, end)

    def _settle(self, flow: http.HTTPFlow, s: wsturns.Session, turn: wsturns.Turn, end: float) -> None:
        if turn not in s.settling:
            return  # settled already (websocket_end, done)
        s.settling.remove(turn)
        try:
            self._finish_turn(flow, s, turn, end)
        except Exception:
            log.exception("tollgate: recording WebSocket turn %s failed; its slot and reservation are released",
                          turn.ex.request_id)
            self._release(turn.ex)

    def _settle_all(self, flow: http.HTTPFlow, s: wsturns.Session) -> None:
        for turn in list(s.settling):
            self._settle(flow, s, turn, turn.ended or time.time())

    async def _estimate_turn(self, flow: http.HTTPFlow, s: wsturns.Session, turn: wsturns.Turn) -> None:
        ex = turn.ex
        try:
            ex.answer_text = turn.output_text()
            await self._estimate(ex)
            ex.usage.input_tokens += turn.carried
        except Exception:  # an estimate must never lose the row
            log.exception("tollgate: estimating turn %s failed", ex.request_id)
            ex.usage = Usage(source="estimated", input_tokens=tokens.rough_tokens(ex.body_size))
        self._finish_turn(flow, s, turn, turn.ended or time.time())

    def _finish_turn(self, flow: http.HTTPFlow, s: wsturns.Session, turn: wsturns.Turn, end: float) -> None:
        """A turn's row: priced, its slot and reservation settled (as _finish does for a request)."""
        ex = turn.ex
        ex.body = None
        ex.answer_text = ""
        # (A turn refused after the provider began it, unasked, still used what its usage says.)
        billed = ex.usage is not None and ex.provider is not None
        if billed:
            ex.cost = self.pricer.cost(ex.provider.name, ex.provider.prices_id, ex.model or ex.response_model,
                                       ex.usage)
        self._release(ex, ex.cost, settle=billed)
        ex.latency_ms = round((end - turn.started) * 1000, 3)
        if turn.first is not None and ex.usage is not None:
            ex.ttft_ms = round((turn.first - turn.started) * 1000, 3)
        s.add(ex)
        self._session_summary(flow, s)  # (per turn: mitmproxy's -w saves the flow before our websocket_end)
        if ex.outcome != "ok":
            log.info("tollgate: %s %s %s (WebSocket turn): %s", ex.outcome, ex.provider.name if ex.provider else "?",
                     ex.endpoint, ex.error or ex.status_code)
        if self.ledger is not None:
            self.ledger.record(ex.row())

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        entry = self.sessions.pop(flow.id, None)
        if entry is None:
            return
        ws = flow.websocket
        by_client = ws is None or ws.closed_by_client is not False
        try:
            await self._end_session_async(flow, entry[1], "client_aborted" if by_client else "upstream_error")
        except Exception:
            log.exception("tollgate: closing a WebSocket session failed; its turns are recorded estimated")
            self._end_session(flow, entry[1], "client_aborted" if by_client else "upstream_error",
                              "the WebSocket closed during the turn")

    async def _end_session_async(self, flow: http.HTTPFlow, s: wsturns.Session, outcome: str) -> None:
        """The socket closed: turns still in flight bill what they produced (estimated, as a cut stream)."""
        self._settle_all(flow, s)
        for turn in s.close():
            ex = turn.ex
            ex.outcome, ex.error = outcome, "the WebSocket closed during the turn"
            if turn.response_id is not None or turn.first is not None:
                ex.status_code = 200
            ex.answer_text = turn.output_text()
            await self._estimate(ex)
            ex.usage.input_tokens += turn.carried
            self._finish_turn(flow, s, turn, time.time())
        self._session_summary(flow, s)

    def _end_session(self, flow: http.HTTPFlow, s: wsturns.Session, outcome: str, why: str) -> None:
        """As _end_session_async, synchronously (shutdown, or a failure there): rough estimates only."""
        self._settle_all(flow, s)
        for turn in s.close():
            ex = turn.ex
            ex.outcome, ex.error = outcome, why
            ex.usage = Usage(source="estimated", input_tokens=tokens.rough_tokens(ex.body_size))
            self._finish_turn(flow, s, turn, time.time())
        self._session_summary(flow, s)

    def _session_summary(self, flow: http.HTTPFlow, s: wsturns.Session) -> None:
        t = s.template
        ident = t.identity
        flow.metadata["tollgate"] = {
            "request_id": t.request_id, "provider": t.provider.name if t.provider else None, "unified": t.unified,
            "user": ident.user_id if ident else None, "key_id": ident.key_id if ident else None,
            "kind": "websocket", "mode": s.mode, "turns": s.turns, "refused": s.refused,
            "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
            "cost_usd": str(s.cost) if s.cost is not None else None}
        flow.comment = self._session_comment(s)

    def _session_comment(self, s: wsturns.Session) -> str:
        t = s.template
        parts = [t.identity.user_id if t.identity else "?", f"WebSocket {t.endpoint}",
                 f"{s.turns} turns" + (f" ({s.refused} refused)" if s.refused else ""),
                 f"{s.input_tokens}→{s.output_tokens} tok"]
        if s.cost is not None:
            parts.append(f"${s.cost:.6f}")
        return " · ".join(parts)

    def _inject(self, flow: http.HTTPFlow, message: bytes, to_client: bool = True) -> None:
        ctx.master.commands.call("inject.websocket", flow, to_client, message, True)

    # --- admission: rate limits, then budgets ---------------------------------------------------

    def _admit(self, flow: http.HTTPFlow, ex: Exchange) -> bool:
        c, ident, provider = self.controls, ex.identity, ex.provider
        limiter = c.limiter
        subject = Subject(ident.user_id, ident.key_id, ex.tier, f"{provider.name}:{ex.model or ''}")
        if not limiter.empty:
            # The answer's x-ratelimit-* headers are worked out now, from this hit: as OpenAI's, they describe
            # the limits when the request was admitted, and the answer needs no second look at the store.
            d = limiter.check_and_hit(subject, with_headers=True)
            if not d.allowed:
                wait = max(d.retry_after, 0.0)
                headers = {**d.headers, "retry-after": str(math.ceil(wait)),
                           "retry-after-ms": str(math.ceil(wait * 1000))}
                if not d.retryable or wait > 120:
                    headers["x-should-retry"] = "false"  # SDKs would wait in vain
                self._refuse(flow, ex, 429, "rate_limit_exceeded", "rate_limited",
                             f"rate limit {d.limit_name} reached; retry in {math.ceil(wait)}s",
                             headers, error_type=d.kind if ex.wire in ("openai", "azure") else None)
                return False
            ex.subject, ex.limit_headers = (limiter, subject), d.headers
        budgets = c.budgets
        if budgets.applicable(ident.user_id, ex.tier):
            # Worst case: the prompt's size bound (O(1); tokenizing a large body here would stall the
            # loop) plus the request's max output tokens, or the policy's default when it sets none.
            worst = Usage(input_tokens=tokens.rough_tokens(ex.body_size),
                          output_tokens=budgets.worst_case_output(ex.max_output_tokens))
            if ex.model is None and (ex.kind not in _MODEL_CALLS or not ex.body_size):
                estimate = _ZERO  # not a model call (model lists, files, retrievals, WebSocket upgrades)
            else:
                estimate = c.pricer.cost(provider.name, provider.prices_id, ex.model, worst)  # None: unpriced
            r = budgets.reserve(ident.user_id, ex.tier, estimate, now=ex.started)
            if isinstance(r, Refusal):
                self._release(ex)
                if r.unpriced:  # a policy gap, not spend: 403, which no SDK retries
                    target = f"{provider.name}:{ex.model}" if ex.model else None
                    self._refuse(flow, ex, 403, "model_not_priced", "unpriced_model", r.unpriced_message(target),
                                 {"x-should-retry": "false"})
                else:
                    self._refuse(flow, ex, 429, "insufficient_quota", "budget_exceeded", r.message,
                                 {"x-should-retry": "false"})
                return False
            ex.reservation = (budgets, r)
        return True

    def _release(self, ex: Exchange, cost: Decimal | None = None, settle: bool = False) -> None:
        """Give back what admission took: the in-flight slot (after charging tokens) and the reservation."""
        if ex.subject is not None:
            limiter, subject = ex.subject
            ex.subject = None
            limiter.finish(subject, ex.usage.total_tokens if ex.usage is not None else 0)
        if ex.reservation is not None:
            budgets, r = ex.reservation
            ex.reservation = None
            if settle:
                for alert in budgets.settle(r, cost, now=ex.started):
                    self.controls.alerts.send(alert)
            else:
                budgets.release(r)

    # --- the unified API ------------------------------------------------------------------------

    def _route(self, flow: http.HTTPFlow, ex: Exchange, body: Any) -> tuple[str, str, int, str] | None:
        """Pick the provider by the model's prefix; the request becomes one to that provider's host."""
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            self._refuse(flow, ex, 400, "invalid_request", "gateway_error",
                         "the request body must be JSON with a model such as \"openai:gpt-4o-mini\"")
            return None
        try:
            r = unified.route(self.policy, ex.endpoint, model, self.policy.gateway.default_provider)
        except unified.RouteError as e:
            self._refuse(flow, ex, e.status, e.code, "gateway_error", str(e))
            return None
        ex.provider, ex.endpoint = r.provider, r.path
        if not r.provider.api_key:
            self._refuse_missing_key(flow, ex)
            return None
        body["model"] = r.model  # the provider gets its own model name; the ledger records both parts
        flow.request.content = json.dumps(body, separators=(",", ":")).encode()
        return unified.target(r)

    async def _models(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        loop = asyncio.get_running_loop()
        data = []
        for p in self.policy.providers.values():
            if not p.api_key or p.protocol == "azure":
                continue
            cached = self._models_cache.get(p.name)
            if cached is None or cached[0] < time.monotonic():
                ids = await loop.run_in_executor(self._io, unified.fetch_models, p)
                if not ids:  # the provider did not answer: the price table's models
                    ids = self.pricer.known_models(p.prices_id) if p.prices_id else []
                cached = self._models_cache[p.name] = (time.monotonic() + 300, ids)
            data += [{"id": f"{p.name}:{m}", "object": "model", "created": 0, "owned_by": p.name} for m in cached[1]]
        flow.response = http.Response.make(200, json.dumps({"object": "list", "data": data}), _JSON)
        ex.kind, ex.usage = "models", None

    def _health(self, path: str) -> http.Response:
        if path == "/health":
            return http.Response.make(200, b'{"status":"ok"}', _JSON)
        ledger_ok = self.ledger is not None and self.ledger.healthy()
        spend_ok = self._spend is None
        ready = self.policy is not None and ledger_ok and spend_ok
        body = {"status": "ready" if ready else "not_ready", "policy": "loaded" if self.policy else "missing",
                "ledger": "ok" if ledger_ok else "failing",
                "ledger_pending_rows": self.ledger.pending if self.ledger else None,
                "budget_spend": "loaded" if spend_ok else "loading"}
        reasons = [r for r in (self.ledger.problem if self.ledger and not ledger_ok else None,
                               None if spend_ok else f"budget spend not read from the ledger yet"
                               + (f": {self._spend_error}" if self._spend_error else "")) if r]
        if reasons:
            body["reason"] = "; ".join(reasons)
        return http.Response.make(200 if ready else 503, json.dumps(body), _JSON)

    # --- helpers --------------------------------------------------------------------------------

    def _refuse(self, flow: http.HTTPFlow, ex: Exchange, status: int, code: str, outcome: str, why: str,
                headers: dict[str, str] | None = None, error_type: str | None = None) -> None:
        body, hdrs = prov.error_body(ex.wire, status, code, why, error_type=error_type)
        flow.response = http.Response.make(status, body, {**hdrs, **(headers or {})})
        ex.outcome, ex.error, ex.status_code = outcome, why, status

    def _refuse_missing_key(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        name = ex.provider.name
        self._refuse(flow, ex, 401, "missing_provider_key", "gateway_error",
                     f"tollgate has no real API key for provider '{name}': set providers.{name}.api_key "
                     f"in the gateway's policy")

    def _redact(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        cred = ex.cred
        if cred is not None and not ex.redacted:
            key_id = ex.identity.key_id if ex.identity else "rejected"
            _write_credential(flow.request, cred, f"{REDACTED}:{key_id}")
            ex.redacted = True

    async def _usage_from_answer(self, ex: Exchange, resp: http.Response) -> None:
        if ex.tap is not None:
            self._usage_from_tap(ex)
            return
        try:
            content = _content(resp) or b"null"
        except ValueError:  # undecodable content-encoding
            return
        if len(content) > TAIL_READ:  # a long answer: read only its usage and model members
            fields = prov.metering_fields(content)
            if fields is not None:
                ex.usage = prov.usage_from_json(ex.wire, ex.kind, fields)
                ex.response_model = prov.model_from_json(ex.wire, fields)
                if ex.usage is not None and ex.usage.source == "provider":
                    return
        if len(content) > BIG_BODY:  # e.g. thousands of embeddings: parse off the loop
            data = await asyncio.get_running_loop().run_in_executor(self._io, prov.loads, content)
        else:
            data = prov.loads(content)
        ex.usage = prov.usage_from_json(ex.wire, ex.kind, data)
        ex.response_model = prov.model_from_json(ex.wire, data)
        if ex.usage is None or ex.usage.source != "provider":
            ex.answer_text = prov.output_text_from_json(ex.kind, data)  # for _estimate

    def _usage_from_tap(self, ex: Exchange) -> None:
        """Usage seen in a streamed answer: complete if the provider's final report arrived; otherwise
        the partial report (e.g. Anthropic's message_start input counts), marked for estimation."""
        tap = ex.tap
        if tap is None:
            return
        tap.close()
        if tap.sse is None:  # a streamed JSON array (Gemini without alt=sse): parse it whole at the end
            try:
                data = json.loads(bytes(tap.raw))
            except (ValueError, UnicodeDecodeError):
                return
            chunks = data if isinstance(data, list) else [data]
            for chunk in reversed(chunks):
                u = prov.usage_from_json(ex.wire, ex.kind, chunk)
                if u is not None:
                    ex.usage = u
                    ex.response_model = prov.model_from_json(ex.wire, chunk)
                    break
            return
        su = tap.usage
        ex.response_model = su.model
        if su.complete and su.usage is not None:
            ex.usage = su.usage
        elif su.partial_usage is not None:
            ex.usage = su.partial_usage
            ex.usage.source = "estimated"  # to be completed by _estimate

    async def _estimate(self, ex: Exchange) -> None:
        """Fill in what the provider did not report, with tiktoken on a worker thread (never the loop)."""
        partial = ex.usage
        out_text = ex.tap.usage.output_text() if ex.tap is not None and ex.tap.sse is not None else ex.answer_text
        loop = asyncio.get_running_loop()
        try:
            est_in, est_out = await loop.run_in_executor(
                self._estimator, _estimate_tokens, ex.wire, ex.kind, ex.body, ex.model, out_text)
        except Exception as e:  # an estimate must never lose the row
            log.warning("tollgate: token estimate failed for %s: %s", ex.request_id, e)
            est_in, est_out = tokens.rough_tokens(ex.body_size), 0
        u = Usage(source="estimated")
        if partial is not None:  # keep what the provider did report (e.g. Anthropic's message_start)
            u.input_tokens = partial.input_tokens or est_in
            u.cached_input_tokens, u.cache_write_tokens = partial.cached_input_tokens, partial.cache_write_tokens
            u.output_tokens = max(partial.output_tokens, est_out)
        else:
            u.input_tokens, u.output_tokens = est_in, est_out
        ex.usage = u

    def _finish(self, flow: http.HTTPFlow, ex: Exchange, end: float | None) -> None:
        ex.body = None
        billed = ex.usage is not None and ex.provider is not None \
            and ex.outcome in ("ok", "upstream_error", "client_aborted")
        if billed:
            # Priced by the model asked for (what policies name), else the one that answered.
            ex.cost = self.pricer.cost(ex.provider.name, ex.provider.prices_id, ex.model or ex.response_model,
                                       ex.usage)
        self._release(ex, ex.cost, settle=billed)
        req, resp = flow.request, flow.response
        if end:
            ex.latency_ms = round((end - req.timestamp_start) * 1000, 3)
        if resp is not None and resp.timestamp_start and ex.status_code and ex.outcome not in _REFUSED:
            ex.ttft_ms = round((resp.timestamp_start - req.timestamp_start) * 1000, 3)
        if ex.tap is not None and ex.tap.error:
            log.warning("tollgate: stream tap for %s: %s", ex.request_id, ex.tap.error)
        flow.metadata["tollgate"] = ex.summary()
        flow.comment = ex.comment()
        if ex.outcome != "ok":
            where = ex.provider.name if ex.provider else "unified"
            log.info("tollgate: %s %s %s: %s", ex.outcome, where, ex.endpoint, ex.error or ex.status_code)
        if self.ledger is not None:
            self.ledger.record(ex.row())


def _error_level() -> int:
    """ERROR, but WARNING while mitmproxy's start-up check is watching: it exits on any error logged then,
    and a ledger that cannot be written must not stop the gateway (it serves, rows wait in the spool)."""
    for h in logging.getLogger().handlers:
        if type(h).__name__ == "ErrorCheckHandler":
            return logging.WARNING
    return logging.ERROR


class _TurnFlow:
    """What admission touches of a flow, for a WebSocket turn: a refusal lands here (to become an error event),
    never on the socket's own 101."""

    __slots__ = ("id", "request", "response", "metadata")

    def __init__(self, flow: http.HTTPFlow):
        self.id, self.request, self.response, self.metadata = flow.id, flow.request, None, {}


def _is_websocket(req: http.Request) -> bool:
    return (hdrs.get_str(req.headers, b"upgrade")).lower() == "websocket"


def _file_sig(path) -> tuple | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _content(msg: http.Message) -> bytes | None:
    """The decoded body; the raw one without a content-encoding (what `msg.content` returns then, ~3x cheaper).
    Raises ValueError for an undecodable content-encoding, as `msg.content` does."""
    if hdrs.get(msg.headers, b"content-encoding") is None:
        return msg.raw_content
    return msg.content


def _json_body(req: http.Request) -> Any:
    try:
        content = _content(req)
    except ValueError:  # undecodable content-encoding: forward as is, meter what we can
        return None
    if content and hdrs.get_str(req.headers, b"content-type").lower().startswith("multipart/form-data"):
        # Audio uploads: the form's text fields are the request facts (the file is not read).
        try:
            form = req.multipart_form
        except ValueError:
            return None
        return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in form.items(multi=False)
                if k in (b"model", b"stream", b"response_format") and len(v) < 256} or None
    if not content or content[:1] not in _JSON_TYPES and content.lstrip()[:1] not in _JSON_TYPES:
        return None
    return prov.loads(content)


_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")


def _scrub_credentials(req: http.Request) -> None:
    """Replace whatever credential an app put in a request by the marker (no parsing that could fail again)."""
    for name in _CREDENTIAL_HEADERS:
        if name in req.headers:
            req.headers[name] = REDACTED
    if "?" in req.path and "key" in req.query:
        req.query["key"] = REDACTED


def _write_credential(req: http.Request, cred: prov.Credential, secret: str) -> None:
    """Put a secret (or the redaction marker) where the app put its credential, in the app's own form."""
    value = prov.credential_value(cred, secret)
    if cred.where == "query":
        req.query[cred.name] = value
    else:
        hdrs.set_many(req.headers, {cred.name: value})


def _body_resized(resp: http.Response, drop_encoding: bool, client_http10: bool = False) -> None:
    """The tap will change the body's length (it decodes it): its Content-Length must go.

    An HTTP/1 answer left with neither a length nor chunked framing ends only when the connection closes,
    so mitmproxy would close the app's connection after every such stream (and the app reconnect, TLS
    handshake included): it is re-framed as chunked. (Real providers stream chunked already; some
    compatible servers and caches send a length. HTTP/2 frames need neither, and mitmproxy drops the
    header when it relays an HTTP/1 answer to an HTTP/2 client. HTTP/1.0 knows no chunking: its answers
    end at close.)
    """
    drop = (b"content-length", b"content-encoding") if drop_encoding else (b"content-length",)
    had_length = hdrs.get(resp.headers, b"content-length") is not None
    hdrs.remove(resp.headers, *drop)
    if had_length and resp.http_version == "HTTP/1.1" and not client_http10 \
            and hdrs.get(resp.headers, b"transfer-encoding") is None:
        hdrs.set_many(resp.headers, {"transfer-encoding": "chunked"})


def _with_usage_asked(req: http.Request, body: dict, had_key: bool) -> dict[str, str]:
    """Write the request body with stream_options.include_usage set; returns headers for _forward to write.

    A body without stream_options (the usual case) gets the member spliced in after its opening brace:
    re-serializing the whole prompt costs ~5 µs per KB. Anything else (the key present, a content-encoding)
    is serialized again from the parsed body.
    """
    raw = req.raw_content or b""
    body_start = raw.lstrip()[:1]
    if not had_key and body_start == b"{" and hdrs.get(req.headers, b"content-encoding") is None \
            and hdrs.get(req.headers, b"transfer-encoding") is None:
        i = raw.index(b"{") + 1
        rest = raw[i:]
        member = b'"stream_options":{"include_usage":true}'
        new = raw[:i] + member + (b"," if rest.strip()[:1] != b"}" else b"") + rest
        req.raw_content = new
        return {"content-length": str(len(new))}
    req.content = json.dumps(body, separators=(",", ":")).encode()
    return {}


def _forward(req: http.Request, cred: prov.Credential, secret: str,
             target: tuple[str, str, int, str] | None, extra: dict[str, str] | None = None) -> None:
    """Put the real key in and, for a base_url or the unified API, re-target the request — in one header pass.

    Same effect as `req.scheme, req.host, req.port, req.path = target` (which updates the Host header and
    the authority twice over, ~15 µs) followed by `_write_credential`.
    """
    values: dict[str, str] = dict(extra) if extra else {}
    if target is not None:
        scheme, host, port, path = target
        d = req.data
        d.scheme, d.host, d.port, d.path = scheme.encode(), host, port, path.encode("utf-8", "surrogateescape")
        hp = hostport(scheme, host, port)
        if hdrs.get(d.headers, b"host") is not None:
            values["host"] = hp
        if d.authority:
            req.authority = hp  # (HTTP/2: the :authority the provider sees)
    if cred.where == "query":
        req.query[cred.name] = prov.credential_value(cred, secret)
    else:
        values[cred.name] = prov.credential_value(cred, secret)
    hdrs.set_many(req.headers, values)


def _estimate_tokens(protocol: str, kind: str, body: Any, model: str | None, out_text: str) -> tuple[int, int]:
    est_in = tokens.estimate_input_tokens(protocol, kind, body, model) if body is not None else 0
    est_out = tokens.count_text(out_text, model) if out_text else 0
    return est_in, est_out


def _seconds(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not 0 < v <= 3600:
        raise exceptions.OptionsError(f"tollgate_flush_interval: expected seconds (0 < x <= 3600), not {value!r}")
    return v
