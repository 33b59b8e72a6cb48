"""policies.yaml: load, expand ${VAR}, validate into ready-to-use objects.

A bad policy raises PolicyError naming the file, the key path and what is wrong, so the gateway refuses
to start (or, on a hot reload, keeps the old policy) with one clear line. Sections beyond the ones this
module understands in depth (rate_limits, budgeting) are checked for shape here and interpreted by their
own modules.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import providers as prov
from .config_error import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


class PolicyError(ValueError):
    def __init__(self, file: str | os.PathLike | None, keypath: str, problem: str):
        self.file = str(file) if file else "<policy>"
        self.keypath = keypath
        self.problem = problem
        super().__init__(f"{self.file}: {keypath or '(top level)'}: {problem}")


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a provider's traffic really goes when `base_url` redirects it."""

    scheme: str
    host: str
    port: int
    path: str  # without trailing slash

    @classmethod
    def parse(cls, url: str) -> "Upstream":
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        return cls(u.scheme, u.hostname, port, u.path.rstrip("/"))


@dataclass(slots=True)
class Provider:
    name: str
    protocol: str  # openai | anthropic | gemini | azure
    hosts: tuple[str, ...]  # "host" or "host:port", as the app dials them
    api_key: str | None  # the real key; None: requests get a clear native error
    prices_id: str | None
    well_known_prefix: str  # path prefix of the well-known base ("/v1" for OpenAI) that base_url replaces
    upstream: Upstream | None  # None: the request goes where the app sent it
    builtin: bool = False  # a well-known provider (its base URL is known)

    def __repr__(self) -> str:  # never print the real key
        return f"Provider({self.name!r}, {self.protocol}, hosts={self.hosts}, upstream={self.upstream})"

    def redirect(self, path: str) -> tuple[str, str, int, str] | None:
        """(scheme, host, port, path) for a request path, following base_url; None when not redirected."""
        up = self.upstream
        if up is None:
            return None
        p = self.well_known_prefix
        if p and (path == p or path.startswith(p + "/") or path.startswith(p + "?")):
            path = path[len(p):]
        return up.scheme, up.host, up.port, up.path + path


@dataclass(slots=True)
class Gateway:
    host: str = "127.0.0.1"
    port: int = 8000  # unified OpenAI-compatible API (as in the brief)
    proxy_port: int = 8080  # HTTPS_PROXY
    default_provider: str | None = "openai"  # unified API: where a model without "provider:" goes
    upstream_timeout: float = 600.0  # seconds to the answer's first byte (reasoning models think for minutes)
    unmanaged_llm_hosts: str = "refuse"  # well-known LLM hosts not under providers: refuse | allow (tunnel), both logged


@dataclass(slots=True)
class Auth:
    master_key: str | None = None
    virtual_keys_enabled: bool = True
    expiration_days: int | None = None
    metadata_fields: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"Auth(master_key={'set' if self.master_key else None}, expiration_days={self.expiration_days})"


@dataclass(slots=True)
class Policy:
    path: Path | None
    gateway: Gateway
    providers: dict[str, Provider]
    by_host: dict[str, Provider]  # "host" and "host:port" (lowercase) -> provider
    auth: Auth
    rate_limits: dict[str, Any] = field(default_factory=dict)
    budgeting: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    database: Path = Path("usage.duckdb")
    logging: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def provider_for(self, host: str, port: int) -> Provider | None:
        by = self.by_host
        found = by.get(f"{host}:{port}") or by.get(host)
        if found is None and not host.islower():
            # allow_hosts intercepts API.OpenAI.com too (it ignores case): unrecognised, its request would
            # go out unmetered with the app's credential.
            host = host.lower()
            found = by.get(f"{host}:{port}") or by.get(host)
        return found

    def secrets(self) -> list[str]:
        """Every real secret in the policy, for redaction filters."""
        out = [p.api_key for p in self.providers.values() if p.api_key]
        if self.auth.master_key:
            out.append(self.auth.master_key)
        return out


# --- loading -------------------------------------------------------------------------------------

def expand_vars(value: Any, env: dict[str, str], file: Any, keypath: str = "", strict: bool = True) -> Any:
    """Replace ${VAR} (must be set, unless not strict) and ${VAR:-default} in every string of a document."""
    if isinstance(value, dict):
        return {k: expand_vars(v, env, file, _join(keypath, k), strict) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, env, file, f"{keypath}[{i}]", strict) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        name, has_default, default = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if has_default is not None or not strict:
            return default or ""
        raise PolicyError(file, keypath, f"${{{name}}} is not set in the environment "
                                         f"(write ${{{name}:-}} to allow it to be empty)")

    return _VAR.sub(sub, value)


def _join(keypath: str, key: Any) -> str:
    return f"{keypath}.{key}" if keypath else str(key)


def load(path: str | os.PathLike, env: dict[str, str] | None = None, *, strict_env: bool = True) -> Policy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(p, "", "file not found") from None
    except OSError as e:
        raise PolicyError(p, "", f"cannot read: {e.strerror}") from None
    return loads(text, p, env, strict_env=strict_env)


def loads(text: str, path: str | os.PathLike | None = None, env: dict[str, str] | None = None, *,
          strict_env: bool = True) -> Policy:
    p = Path(path) if path else None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PolicyError(p, where, f"not valid YAML: {problem}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PolicyError(p, "", f"must be a mapping of sections, not {type(doc).__name__}")
    doc = expand_vars(doc, dict(os.environ) if env is None else env, p, strict=strict_env)
    return _build(doc, p)


SECTIONS = {"gateway", "providers", "rate_limits", "auth", "budgeting", "analytics", "alerts"}


def _build(doc: dict, p: Path | None) -> Policy:
    for k in doc:
        if k not in SECTIONS:
            raise PolicyError(p, str(k), f"unknown section (known: {', '.join(sorted(SECTIONS))})")
    base_dir = p.parent.absolute() if p else Path.cwd()
    gw = _gateway(_section(doc, "gateway", p), p)
    providers = _providers(_section(doc, "providers", p), p)
    by_host: dict[str, Provider] = {}
    for prv in providers.values():
        for h in prv.hosts:
            other = by_host.get(h)
            if other is not None:
                raise PolicyError(p, f"providers.{prv.name}.hosts", f"host {h!r} is already {other.name!r}'s")
            by_host[h] = prv
    if gw.default_provider not in providers:
        if "default_provider" in _section(doc, "gateway", p):
            raise PolicyError(p, "gateway.default_provider", f"{gw.default_provider!r} is not in providers")
        gw.default_provider = None
    auth = _auth(_section(doc, "auth", p), p)
    budgeting = _section(doc, "budgeting", p)
    costs = budgeting.get("costs") or {}
    if not isinstance(costs, dict):
        raise PolicyError(p, "budgeting.costs", "must be a mapping of 'provider:model' to prices")
    alerts = _section(doc, "alerts", p)
    _validate_controls(doc, budgeting, alerts, costs, p)
    analytics = _section(doc, "analytics", p)
    _check_keys(analytics, {"logging", "database"}, p, "analytics")
    db = analytics.get("database", "usage.duckdb")
    return Policy(
        path=p,
        gateway=gw,
        providers=providers,
        by_host=by_host,
        auth=auth,
        rate_limits=_section(doc, "rate_limits", p),
        budgeting=budgeting,
        costs=costs,
        database=database_path(db, base_dir, p),
        logging=_logging(analytics.get("logging", True), p),
        raw=doc,
    )


def _logging(v: Any, p: Path | None) -> bool:
    """analytics.logging: true is the ledger, as always. false is refused, not ignored: the ledger is what
    meters (budgets recount their spend from it at start; usage, audits and refusals are its rows)."""
    if _bool(v, p, "analytics.logging"):
        return True
    raise PolicyError(p, "analytics.logging", "false is not supported: every request's ledger row is how tollgate "
                      "meters (budgets recount their spend from it at start, `tollgate usage` and audits read it); "
                      "set true, or move the ledger with analytics.database. Console lines per request are "
                      "mitmproxy's own: --set flow_detail=0 or termlog_verbosity=warn")


def _validate_controls(doc: dict, budgeting: dict, alerts: dict, costs: dict, p: Path | None) -> None:
    """rate_limits, budgeting and costs are interpreted by their own modules; let them judge the shape
    here so every reader of the policy (gateway start, hot reload, CLI) gets the same clear error."""
    from .budgets import Budgets
    from .limits import parse_rules
    from .costs import parse_costs

    try:
        budgets = Budgets.from_policy(budgeting, alerts)
        parse_rules(_section(doc, "rate_limits", p), tier_limits(budgets))
        parse_costs(costs)
    except ConfigError as e:
        raise PolicyError(p, e.keypath, e.problem) from None
    except ValueError as e:  # pricing's overrides say "keypath: problem"
        keypath, _, problem = str(e).partition(": ")
        raise PolicyError(p, keypath, problem or str(e)) from None


def tier_limits(budgets) -> dict[str, Any]:
    """The rate limits set on tiers, for the rate limiter (pooled per tier)."""
    return {name: t.rate_limits for name, t in budgets.tiers.items() if t.rate_limits}


def _section(doc: dict, name: str, p: Path | None) -> dict:
    v = doc.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise PolicyError(p, name, f"must be a mapping, not {type(v).__name__}")
    return v


def _check_keys(d: dict, allowed: set[str], p: Path | None, keypath: str) -> None:
    for k in d:
        if k not in allowed:
            raise PolicyError(p, _join(keypath, k), f"unknown key (known: {', '.join(sorted(allowed))})")


def _int(v: Any, p: Path | None, keypath: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        # isdecimal + isascii, not isdigit: "²".isdigit() is True but int("²") raises a bare ValueError.
        if isinstance(v, str) and v.strip().isascii() and v.strip().isdecimal():
            v = int(v)
        else:
            raise PolicyError(p, keypath, f"must be a whole number, not {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise PolicyError(p, keypath, f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")
    return v


def _bool(v: Any, p: Path | None, keypath: str) -> bool:
    if isinstance(v, bool):
        return v
    raise PolicyError(p, keypath, f"must be true or false, not {v!r}")


def _str(v: Any, p: Path | None, keypath: str) -> str:
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v)
    raise PolicyError(p, keypath, f"must be a string, not {type(v).__name__}")


def _gateway(d: dict, p: Path | None) -> Gateway:
    _check_keys(d, {"host", "port", "proxy_port", "default_provider", "upstream_timeout", "unmanaged_llm_hosts"},
                p, "gateway")
    g = Gateway()
    if "host" in d:
        g.host = _str(d["host"], p, "gateway.host")
    if "port" in d:
        g.port = _int(d["port"], p, "gateway.port", 0, 65535)
    if "proxy_port" in d:
        g.proxy_port = _int(d["proxy_port"], p, "gateway.proxy_port", 0, 65535)
    if d.get("upstream_timeout") is not None:
        t = d["upstream_timeout"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 86400:
            raise PolicyError(p, "gateway.upstream_timeout", f"must be seconds between 0 and 86400, not {t!r}")
        g.upstream_timeout = float(t)
    if "unmanaged_llm_hosts" in d:
        v = d["unmanaged_llm_hosts"]
        if not isinstance(v, str) or v.lower() not in ("refuse", "allow"):
            raise PolicyError(p, "gateway.unmanaged_llm_hosts", f"must be refuse or allow, not {v!r}")
        g.unmanaged_llm_hosts = v.lower()
    if d.get("default_provider") is not None:
        g.default_provider = _str(d["default_provider"], p, "gateway.default_provider")
    if g.port and g.port == g.proxy_port:
        raise PolicyError(p, "gateway.proxy_port", f"must differ from gateway.port ({g.port})")
    return g


_PROVIDER_KEYS = {"api_key", "base_url", "protocol", "hosts", "prices_id"}


def _providers(d: dict, p: Path | None) -> dict[str, Provider]:
    out: dict[str, Provider] = {}
    for name, conf in d.items():
        kp = f"providers.{name}"
        if conf is None:
            conf = {}
        if not isinstance(conf, dict):
            raise PolicyError(p, kp, "must be a mapping (api_key, base_url, protocol, hosts)")
        _check_keys(conf, _PROVIDER_KEYS, p, kp)
        spec = prov.WELL_KNOWN.get(str(name))
        protocol = conf.get("protocol", spec.protocol if spec else None)
        if protocol is None:
            raise PolicyError(p, f"{kp}.protocol", f"{name!r} is not a built-in provider: set protocol "
                                                   f"(openai, anthropic, gemini or azure) and hosts")
        if protocol not in ("openai", "anthropic", "gemini", "azure"):
            raise PolicyError(p, f"{kp}.protocol", f"unknown protocol {protocol!r} (openai, anthropic, gemini, azure)")
        hosts_v = conf.get("hosts", list(spec.hosts) if spec else None)
        if isinstance(hosts_v, str):
            hosts_v = [hosts_v]
        if not hosts_v or not isinstance(hosts_v, list):
            raise PolicyError(p, f"{kp}.hosts", "a list of host names (host or host:port) the apps call is required")
        hosts = tuple(_host(h, p, f"{kp}.hosts[{i}]") for i, h in enumerate(hosts_v))
        key = conf.get("api_key")
        key = _str(key, p, f"{kp}.api_key").strip() or None if key is not None else None
        upstream, prefix = None, ""
        well_known = spec.well_known_base if spec else None
        if well_known:
            prefix = urlsplit(well_known).path.rstrip("/")
        if "base_url" in conf and conf["base_url"] not in (None, ""):
            bu = _str(conf["base_url"], p, f"{kp}.base_url")
            try:
                up = Upstream.parse(bu)
            except ValueError as e:
                raise PolicyError(p, f"{kp}.base_url", str(e)) from None
            # A base_url on the provider's own host (the brief's `https://api.openai.com/v1`,
            # `https://api.anthropic.com/v1`) only restates where the app already goes: not a redirect.
            if not any(up.host == h.split(":")[0] for h in hosts):
                upstream = up
        out[str(name)] = Provider(
            name=str(name),
            protocol=protocol,
            hosts=hosts,
            api_key=key,
            prices_id=conf.get("prices_id", spec.prices_id if spec else None),
            well_known_prefix=prefix,
            upstream=upstream,
            builtin=bool(well_known),
        )
    return out


_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")


def _host(h: Any, p: Path | None, keypath: str) -> str:
    if not isinstance(h, str) or not _HOST.match(h.strip()):
        raise PolicyError(p, keypath, f"not a host name or host:port: {h!r}")
    return h.strip().lower()


def _auth(d: dict, p: Path | None) -> Auth:
    _check_keys(d, {"master_key", "virtual_keys"}, p, "auth")
    a = Auth()
    mk = d.get("master_key")
    if mk is not None:
        a.master_key = _str(mk, p, "auth.master_key").strip() or None
        if a.master_key and len(a.master_key) < 8:
            raise PolicyError(p, "auth.master_key", "too short to be a secret (at least 8 characters)")
    vk = d.get("virtual_keys") or {}
    if not isinstance(vk, dict):
        raise PolicyError(p, "auth.virtual_keys", "must be a mapping")
    _check_keys(vk, {"enabled", "expiration_days", "metadata_fields"}, p, "auth.virtual_keys")
    if "enabled" in vk:
        a.virtual_keys_enabled = _bool(vk["enabled"], p, "auth.virtual_keys.enabled")
    if vk.get("expiration_days") is not None:
        a.expiration_days = _int(vk["expiration_days"], p, "auth.virtual_keys.expiration_days", 0) or None
    mf = vk.get("metadata_fields") or []
    if not isinstance(mf, list) or not all(isinstance(x, str) for x in mf):
        raise PolicyError(p, "auth.virtual_keys.metadata_fields", "must be a list of field names")
    a.metadata_fields = tuple(mf)
    return a


def database_path(value: Any, base_dir: Path, p: Path | None) -> Path:
    """analytics.database: a path, `duckdb:///path`, or the brief's `sqlite:///usage.db`.

    The ledger is always DuckDB; a sqlite URL keeps its file name with a .duckdb suffix so the brief's
    config works as written without pretending the file is SQLite.
    """
    s = _str(value, p, "analytics.database").strip()
    for scheme in ("duckdb:///", "duckdb://", "sqlite:///", "sqlite://"):
        if s.startswith(scheme):
            rest = s[len(scheme):]
            s = str(Path(rest).with_suffix(".duckdb")) if scheme.startswith("sqlite") else rest
            break
    else:
        if "://" in s:
            raise PolicyError(p, "analytics.database", f"the ledger is a DuckDB file; {s!r} is not a path")
    if not s:
        raise PolicyError(p, "analytics.database", "empty path")
    try:
        dbp = Path(s).expanduser()
    except RuntimeError:  # "~someone" whose home directory cannot be found
        raise PolicyError(p, "analytics.database", f"cannot expand {s.split('/')[0]!r}: no such user's home") from None
    return dbp if dbp.is_absolute() else base_dir / dbp
