from pathlib import Path

import pytest

from tollgate import policy

ROOT = Path(__file__).resolve().parents[2]

BRIEF = """
gateway:
  host: 0.0.0.0
  port: 8000

providers:
  openai:
    api_key: ${OPENAI_API_KEY}
    base_url: https://api.openai.com/v1
  anthropic:
    api_key: ${ANTHROPIC_API_KEY}
    base_url: https://api.anthropic.com/v1

rate_limits:
  global:
    requests_per_minute: 1000
    tokens_per_day: 1000000
  per_user:
    requests_per_minute: 60
    tokens_per_hour: 50000

auth:
  master_key: "your-master-secret-key"
  virtual_keys:
    enabled: true
    expiration_days: 30
    metadata_fields: ["user_id", "project"]

budgeting:
  tiers:
    - name: "team-basic"
      monthly_limit_usd: 100
      reset: "monthly"
      mode: "enforce"
      shared_users: ["user1", "user2"]
  costs:
    openai:gpt-4o-mini:
      input_token: 0.00015
      output_token: 0.0006

analytics:
  logging: true
  database: "sqlite:///usage.db"
"""

ENV = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a"}


def test_the_brief_config_loads_as_written(tmp_path):
    pol = policy.loads(BRIEF, tmp_path / "config.yaml", ENV)
    assert (pol.gateway.host, pol.gateway.port, pol.gateway.proxy_port) == ("0.0.0.0", 8000, 8080)
    assert pol.providers["openai"].api_key == "sk-o"
    # base_url on the provider's own host restates the default: no redirect, no doubled /v1
    assert pol.providers["openai"].upstream is None and pol.providers["anthropic"].upstream is None
    assert pol.auth.master_key == "your-master-secret-key" and pol.auth.expiration_days == 30
    assert pol.database == tmp_path / "usage.duckdb"
    assert "sk-o" not in repr(pol.providers["openai"]) and "your-master" not in repr(pol.auth)


def test_shipped_policy_starts_without_any_env():
    pol = policy.load(ROOT / "policies.yaml", env={})
    assert set(pol.providers) >= {"openai", "anthropic", "gemini"}
    # the metering-hole keys are shipped, at their closed defaults
    assert pol.gateway.unmanaged_llm_hosts == "refuse" and pol.budgeting["unpriced"] == "refuse" and pol.logging
    assert all(p.api_key is None for p in pol.providers.values())
    assert pol.gateway.proxy_port == 8080 and pol.gateway.port == 8000


@pytest.mark.parametrize(("text", "keypath", "problem"), [
    ("providers: {openai: {api_kye: x}}", "providers.openai.api_kye", "unknown key"),
    ("providers: {openai: {api_key: '${NOPE}'}}", "providers.openai.api_key", "${NOPE} is not set"),
    ("providers: {mine: {api_key: x}}", "providers.mine.protocol", "not a built-in provider"),
    ("providers: {mine: {protocol: grpc, hosts: [a]}}", "providers.mine.protocol", "unknown protocol"),
    ("providers: {openai: {base_url: 'ftp://x'}}", "providers.openai.base_url", "not an http(s) URL"),
    ("providers: {a: {protocol: openai, hosts: ['x.y']}, b: {protocol: openai, hosts: ['x.y']}}",
     "providers.b.hosts", "already 'a'"),
    ("gateway: {port: 99999}", "gateway.port", "between 0 and 65535"),
    ("gateway: {port: 8080}", "gateway.proxy_port", "must differ"),
    ("gatway: {}", "gatway", "unknown section"),
    ("auth: {master_key: short}", "auth.master_key", "too short"),
    ("analytics: {database: 'postgres://x'}", "analytics.database", "DuckDB"),
    ("analytics: {databse: x.duckdb}", "analytics.databse", "unknown key (known: database, logging)"),
    ("analytics: {logging: false}", "analytics.logging", "false is not supported"),
    ("analytics: {logging: 'no'}", "analytics.logging", "must be true or false, not 'no'"),
    ("gateway: {unmanaged_llm_hosts: tunnel}", "gateway.unmanaged_llm_hosts", "must be refuse or allow, not 'tunnel'"),
    ("gateway: {unmanaged_llm_hosts: false}", "gateway.unmanaged_llm_hosts", "must be refuse or allow, not False"),
    ("budgeting: {unpriced: free}", "budgeting.unpriced", "must be refuse or allow, not 'free'"),
    ("providers: [1]", "providers", "must be a mapping"),
    ("a: [", "line 1", "not valid YAML"),
    ("- 1", "(top level)", "must be a mapping of sections"),
])
def test_bad_policies_name_file_keypath_and_problem(tmp_path, text, keypath, problem):
    f = tmp_path / "p.yaml"
    with pytest.raises(policy.PolicyError) as e:
        policy.loads(text, f, {})
    msg = str(e.value)
    assert msg.startswith(str(f)) and keypath in msg and problem in msg, msg


@pytest.mark.parametrize(("value", "env", "expected"), [
    ("${A}", {"A": "1"}, "1"),
    ("${A:-}", {}, ""),
    ("${A:-dflt}", {}, "dflt"),
    ("x-${A}-${B:-b}", {"A": "a"}, "x-a-b"),
    ("no vars", {}, "no vars"),
])
def test_expand_vars(value, env, expected):
    assert policy.expand_vars(value, env, None) == expected


def test_expand_vars_lenient_reads_unset_as_empty():
    assert policy.expand_vars("${NOPE}", {}, None, strict=False) == ""


@pytest.mark.parametrize(("base_url", "path", "expected"), [
    ("http://127.0.0.1:9/openai/v1", "/v1/chat/completions", ("http", "127.0.0.1", 9, "/openai/v1/chat/completions")),
    ("https://mirror.internal/v1/", "/v1/models?x=1", ("https", "mirror.internal", 443, "/v1/models?x=1")),
    ("http://m:8/base", "/other", ("http", "m", 8, "/base/other")),
])
def test_base_url_redirect(base_url, path, expected):
    pol = policy.loads(f"providers: {{openai: {{base_url: '{base_url}'}}}}", None, {})
    assert pol.providers["openai"].redirect(path) == expected


def test_custom_provider_hosts_and_lookup():
    pol = policy.loads("providers: {my-vllm: {protocol: openai, hosts: ['vllm.internal:8000'], api_key: k}}",
                       None, {})
    assert pol.provider_for("vllm.internal", 8000).name == "my-vllm"
    assert pol.provider_for("vllm.internal", 9000) is None
    assert pol.provider_for("api.openai.com", 443) is None  # only configured providers are intercepted
    assert pol.provider_for("VLLM.Internal", 8000).name == "my-vllm"  # as allow_hosts, whatever the case


def test_metering_hole_keys_default_to_closed():
    pol = policy.loads("", None, {})
    assert pol.gateway.unmanaged_llm_hosts == "refuse" and pol.logging is True
    pol = policy.loads("gateway: {unmanaged_llm_hosts: Allow}\nbudgeting: {unpriced: allow}\n"
                       "analytics: {logging: true}", None, {})
    assert pol.gateway.unmanaged_llm_hosts == "allow" and pol.budgeting["unpriced"] == "allow"


def test_logging_false_says_why_and_what_to_do_instead(tmp_path):
    with pytest.raises(policy.PolicyError) as e:
        policy.loads("analytics: {logging: false}", tmp_path / "p.yaml", {})
    msg = str(e.value)
    assert "budgets recount" in msg and "analytics.database" in msg and "flow_detail" in msg
