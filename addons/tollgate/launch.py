"""`tollgate run`, `tollgate web`, `tollgate env`: start mitmproxy with the gateway, tell apps how to use it.

run/web call mitmproxy's own entry points in this process with `-s addons/gateway.py`, so the gateway is
a script addon exactly as with a hand-typed `mitmdump -s`: it sits before mitmproxy's Save addon and
mitmweb's view, which matters because credentials are redacted in hooks that must run first.
"""
from __future__ import annotations

import os
import secrets
import ssl
import sys
from pathlib import Path

from . import unified
from .policy import Policy, PolicyError, load as load_policy

GATEWAY_SCRIPT = Path(__file__).resolve().parent.parent / "gateway.py"
DEFAULT_CONFDIR = "~/.mitmproxy"


def _policy(path: str) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as e:
        sys.exit(f"tollgate: {e}")


def mitm_args(pol: Policy, policy_path: str, extra: list[str]) -> list[str]:
    g = pol.gateway
    args = [
        "-s", str(GATEWAY_SCRIPT),
        "--set", f"tollgate_policy={os.path.abspath(policy_path)}",
        "--listen-host", g.host,
        "--mode", f"regular@{g.proxy_port}",
        "--set", "connection_strategy=lazy",
    ]
    if g.port:  # the unified OpenAI-compatible API: a reverse listener the addon re-targets per request
        args += ["--mode", f"reverse:http://{unified.UNIFIED_HOST}:{unified.UNIFIED_PORT}@{g.port}"]
    if os.environ.get("TOLLGATE_CONFDIR"):
        args += ["--set", f"confdir={os.environ['TOLLGATE_CONFDIR']}"]
    return args + list(extra)


def cmd_run(args) -> int:
    from mitmproxy.tools.main import mitmdump

    pol = _policy(args.policy)
    g = pol.gateway
    api = f"; unified API on http://{g.host}:{g.port}/v1" if g.port else ""
    print(f"tollgate: proxy on http://{g.host}:{g.proxy_port} (eval \"$(tollgate env)\" in the app's shell)"
          f"{api}; ledger {pol.database}", file=sys.stderr)
    return mitmdump(mitm_args(pol, args.policy, getattr(args, "extra", []) or [])) or 0


def cmd_web(args) -> int:
    from mitmproxy.tools.main import mitmweb

    pol = _policy(args.policy)
    extra = list(getattr(args, "extra", []) or [])
    password = os.environ.get("TOLLGATE_WEB_PASSWORD") or secrets.token_urlsafe(12)
    web = ["--web-host", "127.0.0.1", "--set", "web_open_browser=false", "--set", f"web_password={password}"]
    print(f"tollgate: mitmweb on http://127.0.0.1:8081 (password: {password}; set TOLLGATE_WEB_PASSWORD to "
          f"choose it); proxy on http://{pol.gateway.host}:{pol.gateway.proxy_port}", file=sys.stderr)
    return mitmweb(mitm_args(pol, args.policy, web + extra)) or 0


def ca_bundle(confdir: str = DEFAULT_CONFDIR) -> tuple[Path, Path]:
    """(bundle with the system roots + mitmproxy's CA, mitmproxy's CA cert), creating the CA if needed."""
    from mitmproxy import certs

    cdir = Path(os.path.expanduser(confdir))
    cdir.mkdir(parents=True, exist_ok=True)
    certs.CertStore.from_store(cdir, "mitmproxy", 2048)  # creates the CA on first use, like mitmproxy does
    ca = cdir / "mitmproxy-ca-cert.pem"
    roots = _system_roots(exclude=cdir / "tollgate-ca-bundle.pem")
    bundle = cdir / "tollgate-ca-bundle.pem"
    content = (roots.read_text() if roots else "") + "\n" + ca.read_text()
    if not bundle.exists() or bundle.read_text() != content:
        tmp = bundle.with_suffix(".tmp")
        tmp.write_text(content)
        tmp.replace(bundle)
    return bundle, ca


def _system_roots(exclude: Path) -> Path | None:
    # paths.cafile is $SSL_CERT_FILE when set, which in an app's shell is our own bundle: prefer OpenSSL's
    # compiled-in file, and never read the bundle back into itself.
    paths = ssl.get_default_verify_paths()
    for p in (paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt", paths.cafile):
        if p and os.path.isfile(p) and Path(p).resolve() != exclude.resolve():
            return Path(p)
    try:
        import certifi  # a dependency of the SDKs, not of tollgate: only a fallback

        return Path(certifi.where())
    except ImportError:
        return None


def env_lines(pol: Policy, confdir: str = DEFAULT_CONFDIR, shell: str = "sh") -> list[str]:
    bundle, ca = ca_bundle(confdir)
    host = pol.gateway.host if pol.gateway.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    proxy = f"http://{host}:{pol.gateway.proxy_port}"
    pairs = [
        ("HTTPS_PROXY", proxy),
        ("https_proxy", proxy),
        ("NO_PROXY", "localhost,127.0.0.1,::1"),
        ("SSL_CERT_FILE", str(bundle)),
        ("REQUESTS_CA_BUNDLE", str(bundle)),
        ("CURL_CA_BUNDLE", str(bundle)),
        ("NODE_EXTRA_CA_CERTS", str(ca)),
        ("NODE_USE_ENV_PROXY", "1"),
    ]
    if shell == "fish":
        return [f"set -gx {k} {_quote(v)};" for k, v in pairs]
    return [f"export {k}={_quote(v)}" for k, v in pairs]


def _quote(v: str) -> str:
    return "'" + v.replace("'", "'\\''") + "'"


def cmd_env(args) -> int:
    pol = _policy(args.policy)
    confdir = getattr(args, "confdir", None) or os.environ.get("TOLLGATE_CONFDIR") or DEFAULT_CONFDIR
    print("\n".join(env_lines(pol, confdir, getattr(args, "shell", None) or "sh")))
    return 0
