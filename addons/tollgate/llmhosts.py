"""The well-known LLM API hosts, in one list, and the decision for those the policy does not configure.

Traffic to an LLM API the policy does not list under `providers` is not intercepted, so nothing about it is
metered. `UnmanagedHosts.check` recognises such a host (a CONNECT, or an absolute-form plain-HTTP request) so
the addon can refuse it (`gateway.unmanaged_llm_hosts: refuse`, the default) or tunnel it (`allow`), and log
it either way.

The list is the built-in providers' hosts (providers.WELL_KNOWN) plus the LLM APIs tollgate has no built-in
entry for. `*` stands for the characters of one DNS label ("myres" in myres.openai.azure.com, "us-east-1" in
bedrock-runtime.us-east-1.amazonaws.com, "us-central1" in us-central1-aiplatform.googleapis.com).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache

from .providers import WELL_KNOWN


@dataclass(frozen=True, slots=True)
class LLMHost:
    name: str  # the API's usual name: what `providers.<name>` would be called
    hosts: tuple[str, ...]
    protocol: str | None  # the tollgate protocol that can manage it; None: tollgate has no adapter for its API


_OTHERS = (
    # Azure OpenAI resources and Azure AI Foundry (per-customer names: a policy entry lists its own).
    LLMHost("azure", ("*.openai.azure.com", "*.services.ai.azure.com", "*.models.ai.azure.com"), "azure"),
    LLMHost("github-models", ("models.github.ai", "models.inference.ai.azure.com"), "openai"),
    # Bedrock and Vertex AI sign requests with cloud credentials (SigV4, OAuth): no key swap can manage them.
    LLMHost("bedrock", ("bedrock-runtime.*.amazonaws.com", "bedrock-runtime-fips.*.amazonaws.com",
                        "bedrock-agent-runtime.*.amazonaws.com"), None),
    LLMHost("vertex", ("aiplatform.googleapis.com", "*-aiplatform.googleapis.com"), None),
    LLMHost("cohere", ("api.cohere.com", "api.cohere.ai"), "openai"),  # its Compatibility API: /compatibility/v1
    LLMHost("perplexity", ("api.perplexity.ai",), "openai"),
    LLMHost("cerebras", ("api.cerebras.ai",), "openai"),
    LLMHost("sambanova", ("api.sambanova.ai",), "openai"),
    LLMHost("deepinfra", ("api.deepinfra.com",), "openai"),
    LLMHost("nvidia", ("integrate.api.nvidia.com",), "openai"),
    LLMHost("huggingface", ("router.huggingface.co", "api-inference.huggingface.co"), "openai"),
    LLMHost("hyperbolic", ("api.hyperbolic.xyz",), "openai"),
    LLMHost("novita", ("api.novita.ai",), "openai"),
    LLMHost("nebius", ("api.studio.nebius.com", "api.studio.nebius.ai"), "openai"),
    LLMHost("moonshot", ("api.moonshot.ai", "api.moonshot.cn"), "openai"),
    LLMHost("dashscope", ("dashscope.aliyuncs.com", "dashscope-intl.aliyuncs.com"), "openai"),
    LLMHost("zhipu", ("open.bigmodel.cn", "api.z.ai"), "openai"),
    LLMHost("ai21", ("api.ai21.com",), "openai"),
    LLMHost("replicate", ("api.replicate.com",), None),
    LLMHost("voyage", ("api.voyageai.com",), None),
)

KNOWN: tuple[LLMHost, ...] = tuple(
    LLMHost(s.name, s.hosts, s.protocol) for s in WELL_KNOWN.values() if s.hosts
) + _OTHERS

_EXACT: dict[str, LLMHost] = {h: e for e in KNOWN for h in e.hosts if "*" not in h}
_WILD = [(e, h) for e in KNOWN for h in e.hosts if "*" in h]
# One regex for every wildcard pattern; the named group that matched says which entry it was.
_LABEL = "[a-z0-9-]+"
_WILD_RE = re.compile("|".join(
    f"(?P<w{i}>{_LABEL.join(re.escape(part) for part in h.split('*'))})" for i, (_, h) in enumerate(_WILD)))


@lru_cache(maxsize=4096)  # bounded: host names come from clients
def lookup(host: str) -> LLMHost | None:
    """The well-known LLM API a host name belongs to, or None."""
    h = host.lower().rstrip(".")
    found = _EXACT.get(h)
    if found is None and _WILD:
        m = _WILD_RE.fullmatch(h)
        if m is not None:
            found = _WILD[int(m.lastgroup[1:])][0]
    return found


@dataclass(frozen=True, slots=True)
class Unmanaged:
    """A well-known LLM host the policy does not configure, and what to tell the app about it."""

    host: str
    port: int
    api: LLMHost
    refused: bool

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def fix(self, providers: dict) -> str:
        """The policy change that would meter this host."""
        name, h = self.api.name, self.host
        if name in providers:
            return f'add "{h}" to providers.{name}.hosts'
        if name in WELL_KNOWN and WELL_KNOWN[name].hosts:
            return f"add providers.{name} (with its api_key)"
        if self.api.protocol is not None:
            return f'add providers.{name}: {{protocol: {self.api.protocol}, hosts: ["{h}"], api_key: ...}}'
        return f"tollgate cannot meter {name} (no adapter for its API); keep it off this gateway"

    def reason(self, providers: dict) -> str:
        """The 403's reason phrase. A CONNECT's body reaches no one (curl and the SDKs' HTTP clients drop it),
        its status line does: curl -v prints it, httpx puts it in the ProxyError the SDK raises."""
        return (f"Forbidden by tollgate: {self.hostport} is an LLM API the policy does not configure; "
                f"{self.fix(providers)}, or set gateway.unmanaged_llm_hosts: allow")

    def message(self, providers: dict) -> str:
        head = (f"tollgate: {self.hostport} is an LLM API ({self.api.name}) that this gateway's policy does not "
                f"configure, so its use would not be metered")
        if self.refused:
            return (f"{head}; it is refused. To use it through the gateway, {self.fix(providers)} in the policy, "
                    f"or set gateway.unmanaged_llm_hosts: allow to tunnel such hosts unmetered (still logged).")
        return f"{head}; tunneled unmetered (gateway.unmanaged_llm_hosts: allow). To meter it, {self.fix(providers)}."


WARN_EVERY = 60.0  # seconds: one WARNING per (client, host) per minute, however many connections
_WARNED_MAX = 4096


class UnmanagedHosts:
    """Recognises unmanaged LLM hosts for a policy, and throttles the WARNING about each (client, host)."""

    def __init__(self) -> None:
        self.by_host: dict[str, object] = {}
        self.providers: dict = {}
        self.refuse = True
        self._warned: dict[tuple[str, str], float] = {}

    def configure(self, policy) -> None:
        self.by_host, self.providers = policy.by_host, policy.providers
        self.refuse = policy.gateway.unmanaged_llm_hosts == "refuse"

    def check(self, host: str, port: int) -> Unmanaged | None:
        """The verdict for a connection to host:port; None when it is not an LLM API or the policy manages it."""
        api = lookup(host)
        if api is None:
            return None
        # Managed means intercepted: allow_hosts ignores case but not a trailing dot ("api.openai.com." is
        # tunneled, so it is unmanaged here too).
        h = host.lower()
        if f"{h}:{port}" in self.by_host or h in self.by_host:
            return None
        return Unmanaged(h, port, api, self.refuse)

    def should_warn(self, client: str, hostport: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        key = (client, hostport)
        last = self._warned.get(key)
        if last is not None and now - last < WARN_EVERY:
            return False
        if len(self._warned) >= _WARNED_MAX:  # bounded: clients and hosts are many
            self._warned = {k: t for k, t in self._warned.items() if now - t < WARN_EVERY}
            if len(self._warned) >= _WARNED_MAX:
                self._warned.clear()
        self._warned[key] = now
        return True
