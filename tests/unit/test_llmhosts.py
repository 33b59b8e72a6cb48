"""tollgate.llmhosts: the one list of well-known LLM API hosts, and the verdict for a policy."""
import pytest

from tollgate import llmhosts, policy
from tollgate.llmhosts import UnmanagedHosts, lookup
from tollgate.providers import WELL_KNOWN


@pytest.mark.parametrize(("host", "name"), [
    ("api.openai.com", "openai"),
    ("API.Anthropic.com.", "anthropic"),  # case and a trailing dot do not hide a host
    ("generativelanguage.googleapis.com", "gemini"),
    ("api.together.ai", "together"),
    ("myres.openai.azure.com", "azure"),
    ("proj.services.ai.azure.com", "azure"),
    ("bedrock-runtime.us-east-1.amazonaws.com", "bedrock"),
    ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "bedrock"),
    ("us-central1-aiplatform.googleapis.com", "vertex"),
    ("aiplatform.googleapis.com", "vertex"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
    ("api.perplexity.ai", "perplexity"),
])
def test_well_known_hosts(host, name):
    assert lookup(host).name == name


@pytest.mark.parametrize("host", [
    "example.com", "openai.azure.com", "a.b.openai.azure.com", "s3.us-east-1.amazonaws.com",
    "storage.googleapis.com", "api.openai.com.evil.example", "evilapi.openai.com", "pypi.org", "127.0.0.1",
])
def test_other_hosts_are_not_llm_apis(host):
    assert lookup(host) is None


def test_every_built_in_provider_host_is_in_the_one_list():
    for spec in WELL_KNOWN.values():
        for h in spec.hosts:
            assert lookup(h).name == spec.name


def _gate(text: str) -> UnmanagedHosts:
    u = UnmanagedHosts()
    u.configure(policy.loads(text, None, {}))
    return u


def test_configured_hosts_are_managed_the_rest_refused_with_the_key_to_add():
    u = _gate("providers: {openai: {api_key: k}, az: {protocol: azure, hosts: ['mine.openai.azure.com'], api_key: k},"
              " vllm: {protocol: openai, hosts: ['api.cohere.ai:8443'], api_key: k}}")
    assert u.check("api.openai.com", 443) is None
    assert u.check("mine.openai.azure.com", 443) is None
    assert u.check("api.cohere.ai", 8443) is None  # host:port entries manage that port only
    assert u.check("example.com", 443) is None

    a = u.check("api.anthropic.com", 443)
    assert a.refused and a.hostport == "api.anthropic.com:443"
    assert "add providers.anthropic (with its api_key)" in a.message(u.providers)
    assert "gateway.unmanaged_llm_hosts: allow" in a.message(u.providers)

    other = u.check("theirs.openai.azure.com", 443)
    assert 'providers.azure: {protocol: azure, hosts: ["theirs.openai.azure.com"]' in other.message(u.providers)
    cohere = u.check("api.cohere.ai", 443)
    assert 'providers.cohere: {protocol: openai, hosts: ["api.cohere.ai"]' in cohere.message(u.providers)
    bedrock = u.check("bedrock-runtime.eu-west-1.amazonaws.com", 443)
    assert "cannot meter bedrock" in bedrock.message(u.providers)


def test_managed_means_intercepted_whatever_the_case_but_not_with_a_trailing_dot():
    u = _gate("providers: {openai: {api_key: k}}")
    assert u.check("API.OpenAI.com", 443) is None  # allow_hosts ignores case: intercepted
    dotted = u.check("api.openai.com.", 443)  # allow_hosts does not match it: it would be tunneled
    assert dotted.refused and dotted.hostport == "api.openai.com.:443"


def test_a_provider_whose_hosts_replace_the_well_known_one_is_told_to_add_it():
    u = _gate("providers: {anthropic: {hosts: ['anthropic.internal'], api_key: k}}")
    assert 'add "api.anthropic.com" to providers.anthropic.hosts' in u.check("api.anthropic.com", 443).message(
        u.providers)


def test_allow_tunnels_and_says_so():
    u = _gate("gateway: {unmanaged_llm_hosts: allow}")
    v = u.check("api.openai.com", 443)
    assert not v.refused and "tunneled unmetered" in v.message(u.providers)


def test_warnings_once_per_client_and_host_per_minute(monkeypatch):
    u = UnmanagedHosts()
    assert u.should_warn("10.0.0.1", "api.cohere.ai:443", now=100.0)
    assert not u.should_warn("10.0.0.1", "api.cohere.ai:443", now=159.0)
    assert u.should_warn("10.0.0.2", "api.cohere.ai:443", now=159.0)  # another client
    assert u.should_warn("10.0.0.1", "api.perplexity.ai:443", now=159.0)  # another host
    assert u.should_warn("10.0.0.1", "api.cohere.ai:443", now=160.0)  # a minute later
    monkeypatch.setattr(llmhosts, "_WARNED_MAX", 3)
    for i in range(10):  # bounded memory, whatever the number of clients
        u.should_warn(f"c{i}", "h:443", now=200.0)
    assert len(u._warned) <= 3
