"""The mitmproxy addon: hooks that wire tollgate's modules together, and nothing else.

requestheaders  provider by host → credential → identity; the credential in the flow is replaced by a
                redacted marker at once, so mitmweb never shows it (refusals answer here)
request         request facts (model, stream, max tokens) → OpenAI streams asked for usage →
                real key in, base_url redirect
responseheaders redact again; streamed answers get a StreamTap (bytes to the app as they arrive)
response/error  usage (provider-reported, else estimated off the loop) → cost → ledger row → flow comment

Decisions go into flow.metadata["tollgate"] (plain values) and the flow comment, as mitmproxy's own
addons do; the live per-request state stays in `self.live` because flow.metadata is saved with `-w`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mitmproxy import ctx, exceptions, http

from . import providers as prov
from . import tokens
from .auth import Authenticator
from .exchange import Exchange
from .ledger import Ledger
from .policy import Policy, PolicyError, load as load_policy
from .pricing import Pricer
from .redact import RedactingFilter
from .streamtap import StreamTap, decoder_for
from .usage import Usage

log = logging.getLogger("tollgate")

REDACTED = "tollgate-redacted"
_JSON_TYPES = (b"{", b"[")


class Gateway:
    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.auth = Authenticator()
        self.pricer = Pricer({})
        self.ledger: Ledger | None = None
        self.live: dict[str, Exchange] = {}
        self.redactor = RedactingFilter()
        self._estimator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-estimate")

    # --- options -------------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("tollgate_policy", str, "policies.yaml",
                          "tollgate policy file (providers, keys, limits, budgets, ledger).")
        loader.add_option("tollgate_flush_interval", float, 0.25,
                          "Seconds between ledger writes (rows wait in memory and a spool meanwhile).")
        self.redactor.install()

    def configure(self, updated: set[str]) -> None:
        if "tollgate_policy" not in updated:
            return
        try:
            pol = load_policy(ctx.options.tollgate_policy)
            pricer = Pricer(pol.costs)
        except PolicyError as e:
            raise exceptions.OptionsError(str(e)) from None
        except ValueError as e:  # price overrides name their own key path
            raise exceptions.OptionsError(f"{ctx.options.tollgate_policy}: {e}") from None
        self._apply(pol, pricer)

    def _apply(self, pol: Policy, pricer: Pricer) -> None:
        self.policy = pol
        self.pricer = pricer
        self.redactor.set_secrets(pol.secrets())
        self.auth.configure(pol.auth.master_key, pol.auth.virtual_keys_enabled)
        patterns = [pat for p in pol.providers.values() for pat in prov.host_patterns(p.hosts)]
        # Intercept only provider hosts; everything else is tunneled with its own certificate.
        # Lazy connections: with base_url the provider's own host may not even resolve from here.
        opts: dict[str, Any] = {"allow_hosts": patterns}
        if "connection_strategy" in ctx.options:  # absent when the proxy server addon is not loaded (tests)
            opts["connection_strategy"] = "lazy"
        ctx.options.update(**opts)
        if self.ledger is None or os.path.abspath(self.ledger.path) != os.path.abspath(pol.database):
            if self.ledger is not None:
                self.ledger.stop()
            self.ledger = Ledger(str(pol.database), flush_interval=ctx.options.tollgate_flush_interval,
                                 on_keys=self.auth.set_keys)
            self.ledger.start()
        missing = [p.name for p in pol.providers.values() if not p.api_key]
        log.info("tollgate: policy %s: providers %s%s; ledger %s", pol.path, ", ".join(pol.providers),
                 f" (no real key yet: {', '.join(missing)})" if missing else "", pol.database)

    def done(self) -> None:
        if self.ledger is not None:
            self.ledger.stop()
        self._estimator.shutdown(wait=False, cancel_futures=True)
        self.redactor.uninstall()

    # --- hooks ---------------------------------------------------------------------------------

    # A hook that fails must refuse the request: mitmproxy logs an addon exception and lets the flow
    # continue, which here would forward it unmetered (or with the virtual key). Each request-side hook
    # therefore runs guarded and answers a native 500 when it breaks.

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._requestheaders(flow)
        except Exception:
            self._fail(flow, "requestheaders")

    def request(self, flow: http.HTTPFlow) -> None:
        try:
            self._request(flow)
        except Exception:
            self._fail(flow, "request")

    def _fail(self, flow: http.HTTPFlow, hook: str) -> None:
        log.exception("tollgate: %s hook failed; the request is refused", hook)
        ex = self.live.get(flow.id)
        if ex is None:
            flow.response = http.Response.make(502, b"tollgate: internal error; request refused\n",
                                               {"content-type": "text/plain"})
            return
        flow.response = None
        self._refuse(flow, ex, 500, "gateway_error", "gateway_error",
                     f"tollgate could not process this request ({hook} failed); it was not forwarded")

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        pol = self.policy
        if pol is None:
            return
        req = flow.request
        provider = pol.provider_for(req.host, req.port)
        if provider is None:
            return
        ex = Exchange(provider=provider, endpoint=req.path.split("?", 1)[0], started=req.timestamp_start)
        self.live[flow.id] = ex
        cred = prov.find_credential(provider.protocol, req.headers, req.query if "?" in req.path else {})
        if cred is None:
            return self._refuse(flow, ex, 401, "invalid_api_key", "unauthorized",
                                "no API key was presented; use a tollgate virtual key")
        ident, why = self.auth.identify(cred.value)
        cred.value = ""  # the virtual key itself is not kept past its hash lookup
        ex.cred = cred
        ex.identity = ident
        _write_credential(req, cred, f"{REDACTED}:{ident.key_id if ident else 'rejected'}")
        if ident is None:
            return self._refuse(flow, ex, 401, "invalid_api_key", "unauthorized", why)
        if not provider.api_key:
            return self._refuse(flow, ex, 401, "missing_provider_key", "gateway_error",
                                f"tollgate has no real API key for provider '{provider.name}': set "
                                f"providers.{provider.name}.api_key in the gateway's policy")

    def _request(self, flow: http.HTTPFlow) -> None:
        ex = self.live.get(flow.id)
        if ex is None or flow.response is not None:
            return
        req = flow.request
        provider = ex.provider
        body = _json_body(req)
        ex.body_size = len(req.raw_content or b"")
        facts = prov.request_facts(provider.protocol, ex.endpoint, body)
        ex.kind, ex.model, ex.stream = facts.kind, facts.model, facts.stream
        ex.max_output_tokens = facts.max_output_tokens
        ex.body = body
        if facts.stream and not facts.include_usage and facts.kind in ("chat", "completions") \
                and provider.protocol in ("openai", "azure") and isinstance(body, dict):
            # Ask for usage so the stream can be metered exactly; the tap removes it again.
            opts = body.get("stream_options")
            if opts is None or isinstance(opts, dict):
                body["stream_options"] = {**(opts or {}), "include_usage": True}
                req.content = json.dumps(body, separators=(",", ":")).encode()
                ex.strip_usage = True
        _write_credential(req, ex.cred, provider.api_key)
        target = provider.redirect(req.path)
        if target is not None:
            req.scheme, req.host, req.port, req.path = target

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = self.live.get(flow.id)
        if ex is None:
            return
        self._redact(flow, ex)
        resp = flow.response
        assert resp is not None
        if ex.outcome != "ok" or resp.status_code >= 400:
            return  # refusals and provider errors are small JSON: buffer them
        ctype = resp.headers.get("content-type", "")
        sse = "text/event-stream" in ctype
        if not (sse or ex.stream):
            return
        decode = None
        enc = resp.headers.get("content-encoding")
        if enc:
            try:
                decode = decoder_for(enc)
            except ValueError:
                decode = None
                sse = False  # cannot read it: relay untouched, estimate the usage
            else:
                del resp.headers["content-encoding"]
                resp.headers.pop("content-length", None)
        ex.tap = StreamTap(prov.StreamUsage(ex.provider.protocol, ex.kind), sse=sse,
                           strip_usage=ex.strip_usage, decode=decode)
        resp.stream = ex.tap

    async def response(self, flow: http.HTTPFlow) -> None:
        ex = self.live.pop(flow.id, None)
        if ex is None:
            return
        self._redact(flow, ex)
        resp = flow.response
        assert resp is not None
        ex.status_code = resp.status_code
        if ex.outcome == "ok":
            if resp.status_code >= 400:
                ex.outcome = "upstream_error"
                ex.usage = Usage()  # the provider answered with an error and bills nothing
            else:
                self._usage_from_answer(ex, resp)
                if ex.usage is None or ex.usage.source != "provider":
                    await self._estimate(ex)
        await self._finish(flow, ex, resp.timestamp_end)

    async def error(self, flow: http.HTTPFlow) -> None:
        ex = self.live.pop(flow.id, None)
        if ex is None:
            return
        self._redact(flow, ex)
        msg = flow.error.msg if flow.error else "unknown error"
        if ex.outcome == "ok":
            ex.outcome = "client_aborted" if "client" in msg.lower() else "upstream_error"
            ex.error = msg
            if flow.response is not None:
                ex.status_code = flow.response.status_code
            self._usage_from_tap(ex)
            if ex.usage is None or ex.usage.source != "provider":
                await self._estimate(ex)
        await self._finish(flow, ex, flow.error.timestamp if flow.error else None)

    # --- helpers -------------------------------------------------------------------------------

    def _refuse(self, flow: http.HTTPFlow, ex: Exchange, status: int, code: str, outcome: str, why: str) -> None:
        body, headers = prov.error_body(ex.provider.protocol, status, code, why)
        flow.response = http.Response.make(status, body, headers)
        ex.outcome = outcome
        ex.error = why
        ex.status_code = status

    def _redact(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        cred = ex.cred
        if cred is not None:
            key_id = ex.identity.key_id if ex.identity else "rejected"
            _write_credential(flow.request, cred, f"{REDACTED}:{key_id}")

    def _usage_from_answer(self, ex: Exchange, resp: http.Response) -> None:
        if ex.tap is not None:
            self._usage_from_tap(ex)
            return
        try:
            data = json.loads(resp.content or b"null")
        except (ValueError, UnicodeDecodeError):
            return
        ex.usage = prov.usage_from_json(ex.provider.protocol, ex.kind, data)
        ex.response_model = prov.model_from_json(ex.provider.protocol, data)

    def _usage_from_tap(self, ex: Exchange) -> None:
        """Usage seen in a streamed answer: complete if the provider's final report arrived; otherwise
        the partial report (e.g. Anthropic's message_start input counts), marked for estimation."""
        tap = ex.tap
        if tap is None:
            return
        if tap.sse is None:  # a streamed JSON array (Gemini without alt=sse): parse it whole at the end
            try:
                data = json.loads(bytes(tap.raw))
            except (ValueError, UnicodeDecodeError):
                return
            chunks = data if isinstance(data, list) else [data]
            for chunk in reversed(chunks):
                u = prov.usage_from_json(ex.provider.protocol, ex.kind, chunk)
                if u is not None:
                    ex.usage = u
                    ex.response_model = prov.model_from_json(ex.provider.protocol, chunk)
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
        out_text = ex.tap.usage.output_text() if ex.tap is not None and ex.tap.sse is not None else ""
        loop = asyncio.get_running_loop()
        try:
            est_in, est_out = await loop.run_in_executor(
                self._estimator, _estimate_tokens, ex.provider.protocol, ex.kind, ex.body, ex.model, out_text)
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

    async def _finish(self, flow: http.HTTPFlow, ex: Exchange, end: float | None) -> None:
        ex.body = None
        if ex.usage is not None and ex.outcome in ("ok", "upstream_error", "client_aborted"):
            # Priced by the model asked for (what policies name), else the one that answered.
            ex.cost = self.pricer.cost(ex.provider.name, ex.provider.prices_id,
                                       ex.model or ex.response_model, ex.usage)
        req, resp = flow.request, flow.response
        if end:
            ex.latency_ms = round((end - req.timestamp_start) * 1000, 3)
        if resp is not None and resp.timestamp_start and ex.outcome not in ("unauthorized", "gateway_error"):
            ex.ttft_ms = round((resp.timestamp_start - req.timestamp_start) * 1000, 3)
        if ex.tap is not None and ex.tap.error:
            log.warning("tollgate: stream tap for %s: %s", ex.request_id, ex.tap.error)
        flow.metadata["tollgate"] = ex.summary()
        flow.comment = ex.comment()
        if ex.outcome != "ok":
            log.info("tollgate: %s %s %s: %s", ex.outcome, ex.provider.name, ex.endpoint, ex.error or ex.status_code)
        if self.ledger is not None:
            self.ledger.record(ex.row())


def _json_body(req: http.Request) -> Any:
    try:
        content = req.content
    except ValueError:  # undecodable content-encoding: forward as is, meter what we can
        return None
    if not content or content[:1] not in _JSON_TYPES and content.lstrip()[:1] not in _JSON_TYPES:
        return None
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None


def _write_credential(req: http.Request, cred: prov.Credential, secret: str) -> None:
    """Put a secret (or the redaction marker) where the app put its credential, in the app's own form."""
    value = prov.credential_value(cred, secret)
    if cred.where == "query":
        req.query[cred.name] = value
    else:
        req.headers[cred.name] = value


def _estimate_tokens(protocol: str, kind: str, body: Any, model: str | None, out_text: str) -> tuple[int, int]:
    est_in = tokens.estimate_input_tokens(protocol, kind, body, model) if body is not None else 0
    est_out = tokens.count_text(out_text, model) if out_text else 0
    return est_in, est_out
