"""The `tollgate` command: run the gateway, manage virtual keys, read the ledger.

Every command takes ``--policy FILE`` (default ``$TOLLGATE_POLICY``, else ``./policies.yaml``); the policy's
``analytics.database`` names the DuckDB file. Data commands open the file only for as long as they need it and
retry for a few seconds while the running gateway holds it (it does so for milliseconds per batch).

`run`, `web` and `env` live in :mod:`tollgate.launch`, imported only when used so `tollgate keys list` does not
pay for importing mitmproxy.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, TextIO

import duckdb

from . import keys as vkeys
from . import totals
from .ledger import LedgerError, connect

DEFAULT_POLICY = "policies.yaml"
DEFAULT_DATABASE = "usage.duckdb"
LOCK_WAIT = 5.0  # seconds a command waits for the file before giving up


class CliError(Exception):
    """A message for the user; main() prints it and exits 1."""


# --- the policy, read minimally (to be replaced by the real policy loader) -------------------------------------


def load_policy(policy_file: str):
    """The policy (see _load_policy), read once per command while its file and the environment stay as they
    are: validating one imports the price table (~0.3 s), and a command may need it twice."""
    try:
        st = os.stat(policy_file)
        sig: tuple = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        sig = ()
    return _load_policy(policy_file, (os.getcwd(), *sig), tuple(sorted(os.environ.items())))


@functools.lru_cache(maxsize=4)
def _load_policy(policy_file: str, _sig: tuple, _env: tuple):
    """The policy through the gateway's own loader, so the CLI and the gateway agree on every path.

    Data commands do not need provider keys, so an unset ``${VAR}`` reads as empty here instead of
    failing (the gateway itself stays strict). A missing file means the defaults: ``usage.duckdb``
    beside where the policy would be.
    """
    from .policy import PolicyError, load, loads

    try:
        if not os.path.exists(policy_file):
            return loads("", os.path.abspath(policy_file), strict_env=False)
        return load(policy_file, strict_env=False)
    except PolicyError as exc:
        raise CliError(str(exc)) from None


def db_path_from_policy(policy_file: str) -> str:
    """The ledger's file path from the policy's ``analytics.database`` (see policy.database_path)."""
    return os.path.normpath(str(load_policy(policy_file).database))


def key_expiry_from_policy(policy_file: str) -> int | None:
    """``auth.virtual_keys.expiration_days`` (None when unset or 0: keys do not expire)."""
    return load_policy(policy_file).auth.expiration_days


def _policy_file(args: argparse.Namespace) -> str:
    return getattr(args, "policy", None) or os.environ.get("TOLLGATE_POLICY") or DEFAULT_POLICY


# --- output ------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cell=_cell) -> str:
    """Plain aligned columns: numbers right-aligned, text left-aligned, a dashed rule under the header."""
    text = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text:
        for i, s in enumerate(row):
            widths[i] = max(widths[i], len(s))
    right = [bool(rows) and all(_numeric(r[i]) or r[i] is None for r in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(out).rstrip()

    lines = [line(headers), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in text]
    return "\n".join(lines)


def _json_value(value: Any) -> str:
    """JSON text for one value; a Decimal becomes an exact number literal (no float rounding)."""
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else "null"
    if isinstance(value, datetime | date):
        return json.dumps(value.isoformat())
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_json_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_json_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    try:
        return json.dumps(value)
    except TypeError:
        return json.dumps(str(value))


def write_json(objects: Sequence[dict[str, Any]] | dict[str, Any], out: TextIO) -> None:
    if isinstance(objects, dict):
        out.write(_json_value(objects) + "\n")
        return
    out.write("[" + ",\n ".join(_json_value(o) for o in objects) + "]\n")


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bool | dict | list):
        return _cell(value)
    return value


def write_csv(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(headers)
    for row in rows:
        w.writerow([_csv_cell(v) for v in row])


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "never"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- opening the ledger --------------------------------------------------------------------------------------


def _open(args: argparse.Namespace, *, read_only: bool):
    path = db_path_from_policy(_policy_file(args))
    try:
        return connect(path, read_only=read_only, wait=LOCK_WAIT), path
    except FileNotFoundError:
        raise CliError(
            f"no ledger at {path} yet (it is created when the gateway starts or a key is created)"
        ) from None
    except LedgerError as exc:
        raise CliError(str(exc)) from None
    except duckdb.Error as exc:
        raise CliError(f"cannot open {path}: {exc}") from None


# --- keys ----------------------------------------------------------------------------------------------------


def _meta(values: list[str] | None) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--meta {item!r}: expected KEY=VALUE")
        meta[key.strip()] = value
    return meta


def missing_metadata(required: Sequence[str], meta: dict[str, str]) -> list[str]:
    """The policy's ``auth.virtual_keys.metadata_fields`` not given (or given empty) with --meta.

    ``user_id`` is always satisfied: every key has its user (--user), recorded on each request anyway.
    """
    return [f for f in required if f != "user_id" and not meta.get(f, "").strip()]


def _check_tier(pol, tier: str | None, user: str) -> str | None:
    """--tier must name a tier of the policy. Returns a note when the policy puts `user` in another tier's
    shared_users, which wins over the key's tier (budgets.tier_of)."""
    if tier is None:
        return None
    budgets = _budgets(pol)
    if tier not in budgets.tiers:
        known = ", ".join(budgets.tiers) or "none defined"
        raise CliError(f"--tier {tier!r}: no such tier in {pol.path} (budgeting.tiers: {known})")
    pooled = budgets.tier_of(user, None)
    if pooled is not None and pooled != tier:
        return (f"note: user {user!r} is in the shared_users of tier {pooled!r} ({pol.path}), which wins over "
                f"--tier {tier}: this key's requests run under tier {pooled!r}")
    return None


def cmd_keys_create(args: argparse.Namespace) -> int:
    policy = _policy_file(args)
    pol = load_policy(policy)
    meta = _meta(args.meta)
    missing = missing_metadata(pol.auth.metadata_fields, meta)
    if missing:
        flags = " ".join(f"--meta {f}=…" for f in missing)
        raise CliError(f"missing {flags} (required by auth.virtual_keys.metadata_fields in {policy})")
    note = _check_tier(pol, args.tier, args.user)
    days = args.expires_days if args.expires_days is not None else pol.auth.expiration_days
    if days is not None and days < 0:
        raise CliError("--expires-days must be >= 0 (0: never expires)")
    con, _path = _open(args, read_only=False)
    try:
        key, rec = vkeys.create_key(con, args.user, days or None, meta, tier=args.tier)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    finally:
        con.close()
    if note:
        print(f"tollgate: {note}", file=sys.stderr)
    if args.json:
        write_json(
            {
                "key": key,
                "key_id": rec.key_id,
                "user_id": rec.user_id,
                "created_at": rec.created_at,
                "expires_at": rec.expires_at,
                "metadata": rec.metadata,
                "tier": rec.tier,
            },
            sys.stdout,
        )
    else:
        expires = _fmt_time(rec.expires_at) + (f" ({days} days)" if days else "")
        meta_text = ", ".join(f"{k}={v}" for k, v in rec.metadata.items()) or "-"
        print("New virtual key (shown once; only its hash is stored):\n")
        print(f"  {key}\n")
        print(f"key_id:   {rec.key_id}\nuser:     {rec.user_id}\nexpires:  {expires}\nmetadata: {meta_text}")
        if rec.tier:
            print(f"tier:     {rec.tier}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    path = db_path_from_policy(_policy_file(args))
    records: list[vkeys.KeyRecord] = []
    if os.path.exists(path):
        con, _ = _open(args, read_only=True)
        try:
            records = vkeys.list_keys(con)
        except duckdb.CatalogException:
            records = []  # a ledger file without a keys table yet
        finally:
            con.close()
    now = datetime.now(UTC)
    if args.json:
        write_json(
            [
                {
                    "key_id": r.key_id,
                    "user_id": r.user_id,
                    "status": r.status(now),
                    "created_at": r.created_at,
                    "expires_at": r.expires_at,
                    "revoked_at": r.revoked_at,
                    "metadata": r.metadata,
                    "tier": r.tier,
                }
                for r in records
            ],
            sys.stdout,
        )
        return 0
    if not records:
        print(f"no keys yet in {path}", file=sys.stderr)
        return 0
    rows = [
        (
            r.key_id,
            r.user_id,
            r.status(now),
            _fmt_time(r.created_at),
            _fmt_time(r.expires_at),
            r.tier or "-",
            ", ".join(f"{k}={v}" for k, v in r.metadata.items()),
        )
        for r in records
    ]
    print(format_table(("key_id", "user", "status", "created", "expires", "tier", "metadata"), rows))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    path = db_path_from_policy(_policy_file(args))
    if not os.path.exists(path):
        raise CliError(f"no key {args.key_id} (no ledger at {path} yet)")
    con, _ = _open(args, read_only=False)
    try:
        found = vkeys.revoke_key(con, args.key_id)
    finally:
        con.close()
    if not found:
        raise CliError(f"no key {args.key_id} in {path} (see `tollgate keys list`)")
    print(f"revoked {args.key_id}; a running gateway refuses it within 2 seconds")
    return 0


# --- sql and usage -------------------------------------------------------------------------------------------

# Statement kinds that only read. The connection is read-only as well; this check just says so clearly and
# before DuckDB's own, less obvious message ("...attached in read-only mode").
_READ_KINDS = frozenset({"SELECT", "EXPLAIN", "PRAGMA", "CALL", "SET", "VARIABLE_SET", "RELATION"})


def _check_read_only(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise CliError(f"SQL error: {exc}") from None
    if not statements:
        raise CliError("no SQL statement given")
    for st in statements:
        kind = st.type.name
        if kind not in _READ_KINDS:
            raise CliError(
                f"sql is read-only: {kind} statements are refused (use SELECT, DESCRIBE, SHOW, EXPLAIN)"
            )


def _emit(headers: list[str], rows: list[tuple], args: argparse.Namespace, *, cell=_cell) -> None:
    if getattr(args, "json", False):
        write_json([dict(zip(headers, r, strict=True)) for r in rows], sys.stdout)
    elif getattr(args, "csv", False):
        write_csv(headers, rows, sys.stdout)
    else:
        print(format_table(headers, rows, cell=cell))
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def cmd_sql(args: argparse.Namespace) -> int:
    _check_read_only(args.query)
    con, _ = _open(args, read_only=True)
    try:
        try:
            result = con.execute(args.query)
            headers = [d[0] for d in result.description] if result.description else []
            rows = result.fetchall() if headers else []
        except duckdb.Error as exc:
            if "read-only" in str(exc):
                raise CliError(f"sql is read-only: {exc}") from None
            raise CliError(f"SQL error: {exc}") from None
    finally:
        con.close()
    if headers:
        _emit(headers, rows, args)
    return 0


_USAGE_GROUPS: dict[str, tuple[str, str, str]] = {
    # --by: (select list, group by, order by)
    "user": ("user_id AS user", "user_id", "cost_usd DESC NULLS LAST, requests DESC, user"),
    "model": ("provider, model", "provider, model", "cost_usd DESC NULLS LAST, requests DESC, provider, model"),
    "key": ("key_id, any_value(user_id) AS user", "key_id", "cost_usd DESC NULLS LAST, requests DESC, key_id"),
    "day": ("day", "day", "day"),
    "tier": ("tier", "tier", "cost_usd DESC NULLS LAST, requests DESC, tier"),
}


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--since {text!r}: expected a date as YYYY-MM-DD") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def usage_query(by: str, since: datetime | None, until: datetime | None = None) -> tuple[str, list]:
    """The report's SQL: over the ledger's daily totals below their watermark `until` and the rows since
    (totals.usage_source), so it stays fast at any size."""
    select, group, order = _USAGE_GROUPS[by]
    src, params = totals.usage_source(since, until)
    sql = (
        f"SELECT {select}, coalesce(sum(requests), 0)::BIGINT AS requests,"
        " coalesce(sum(input_tokens), 0)::BIGINT AS input_tokens,"
        " coalesce(sum(output_tokens), 0)::BIGINT AS output_tokens,"
        " sum(cost_usd) AS cost_usd"
        f" FROM {src} GROUP BY {group} ORDER BY {order}"
    )
    return sql, params


def _usage_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return f"{value:.6f}"
    return _cell(value)


def _usage_table(headers: list[str], rows: list[tuple]) -> str:
    """The usage rows plus a total line under a second rule."""
    n = len(headers) - 4  # the grouping columns come first, then requests, input, output, cost
    costs = [r[-1] for r in rows if r[-1] is not None]
    sums = tuple(sum(r[i] for r in rows) for i in range(n, n + 3))
    total = ("total",) + ("",) * (n - 1) + sums + (sum(costs) if costs else None,)
    lines = format_table(headers, [*rows, total], cell=_usage_cell).split("\n")
    return "\n".join([*lines[:-1], lines[1], lines[-1]])


def cmd_usage(args: argparse.Namespace) -> int:
    since = _since(args.since)
    path = db_path_from_policy(_policy_file(args))
    if not os.path.exists(path):
        if args.json:
            write_json([], sys.stdout)
        else:
            print(f"no requests yet (no ledger at {path})", file=sys.stderr)
        return 0
    con, _ = _open(args, read_only=True)
    try:
        sql, params = usage_query(args.by, since, totals.until(con))
        result = con.execute(sql, params)
        headers = [d[0] for d in result.description]
        rows = result.fetchall()
    except duckdb.Error as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    finally:
        con.close()
    if args.json:
        write_json([dict(zip(headers, r, strict=True)) for r in rows], sys.stdout)
        return 0
    if rows:
        print(_usage_table(headers, rows))
    else:
        print("no requests" + (f" since {args.since}" if since else ""), file=sys.stderr)
    return 0


# --- budgets ------------------------------------------------------------------------------------------------


def _budgets(pol):
    """The policy's budgets, built by the gateway's own code (the policy loader has validated them)."""
    from .budgets import Budgets

    try:
        return Budgets.from_policy(pol.budgeting, pol.raw.get("alerts"))
    except ValueError as exc:  # pragma: no cover - load_policy already refused a bad section
        raise CliError(f"{pol.path}: {exc}") from None


def live_status(db_path: str) -> dict[str, Any] | None:
    """What the running gateway last published beside this ledger (None: no gateway is running).

    read_status drops a stale file; a fresh one whose writer has exited (killed within the last seconds)
    is dropped too, so its reservations are not reported as in flight.
    """
    from .status import read_status, status_path

    data = read_status(status_path(db_path))
    if data is None:
        return None
    pid = data.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:  # alive, but another user's (EPERM)
            pass
    return data


def _decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value))
    except (ArithmeticError, ValueError):
        return None


def budget_report(budgets, live: dict[str, Any] | None, now: float) -> list[dict[str, Any]]:
    """One entry per budget in its current period: spent (as loaded into `budgets`), reserved from `live`.

    Per-user budgets appear only for users with spend or a live reservation; `reserved` is None when no
    gateway is running (nothing can be in flight).
    """
    held: dict[str, Decimal] = {}
    if live is not None:
        for b in live.get("budgets") or ():
            amount = _decimal(b.get("reserved")) if isinstance(b, dict) else None
            if amount is not None:
                held[str(b.get("id"))] = amount
    out = []
    for b in budgets.status(now):
        reserved = held.get(b["id"], Decimal(0)) if live is not None else None
        if b["scope"] == "user" and not b["spent"] and not reserved:
            continue
        out.append({
            "id": b["id"], "name": b["name"], "scope": b["scope"], "mode": b["mode"], "reset": b["reset"],
            "spent": b["spent"], "limit": b["limit"], "pct": b["pct"], "reserved": reserved,
            "remaining": max(Decimal(0), b["limit"] - b["spent"] - (reserved or 0)),
            "period_start": b["period_start"], "period_end": b["period_end"], "alert_at": b["alert_at"],
        })
    if live is not None:  # users the gateway holds money for that have no spend in the ledger yet
        known = {e["id"] for e in out}
        for b in live.get("budgets") or ():
            if isinstance(b, dict) and b.get("scope") == "user" and b.get("id") not in known \
                    and held.get(str(b.get("id"))):
                limit = _decimal(b.get("limit")) or Decimal(0)
                reserved = held[str(b["id"])]
                out.append({
                    "id": b["id"], "name": b.get("name"), "scope": "user", "mode": b.get("mode"),
                    "reset": b.get("reset"), "spent": Decimal(0), "limit": limit, "pct": 0.0 if limit else None,
                    "reserved": reserved, "remaining": max(Decimal(0), limit - reserved),
                    "period_start": b.get("period_start"), "period_end": b.get("period_end"),
                    "alert_at": b.get("alert_at") or [],
                })
    return out


def _money(d: Decimal) -> str:
    """USD with 2 to 9 decimals: cents for whole amounts, nano-dollars (the ledger's unit) when needed."""
    text = f"{d:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _budget_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return _money(value)
    if isinstance(value, float):
        return f"{value:.1f}%"
    return _cell(value)


def _period_end(value: Any) -> str:
    if value is None:
        return "never"
    if isinstance(value, datetime):  # in the budget's own time zone (budgeting.timezone), as it resets
        return value.strftime("%Y-%m-%d %H:%M %Z")
    return str(value)


def cmd_budgets(args: argparse.Namespace) -> int:
    policy = _policy_file(args)
    pol = load_policy(policy)
    now = time.time()
    budgets = _budgets(pol)
    path = os.path.abspath(str(pol.database))
    if os.path.exists(path):
        con, _ = _open(args, read_only=True)
        try:
            budgets.load_spend(con, now)
        except duckdb.CatalogException:
            pass  # a ledger without a requests table yet: nothing spent
        except duckdb.Error as exc:
            raise CliError(f"cannot read {path}: {exc}") from None
        finally:
            con.close()
    live = live_status(path)
    report = budget_report(budgets, live, now)
    if args.json:
        write_json(report, sys.stdout)
        return 0
    if not report:
        print(f"no budgets in {policy} (budgeting.tiers with a limit, budgeting.global, budgeting.per_user)",
              file=sys.stderr)
        return 0
    headers = ("budget", "scope", "mode", "spent", "limit", "%", "reserved", "period end")
    rows = [(e["name"], e["scope"], e["mode"], e["spent"], e["limit"], e["pct"], e["reserved"],
             _period_end(e["period_end"])) for e in report]
    print(format_table(headers, rows, cell=_budget_cell))
    if live is None:
        print("(reserved: no running gateway, nothing in flight)")
    else:
        print(f"(reserved: held by requests in flight at the running gateway, pid {live.get('pid')})")
    return 0


# --- run / web / env (tollgate.launch) -----------------------------------------------------------------------


def _launch(name: str):
    def run(args: argparse.Namespace) -> int:
        from . import launch  # lazy: imports mitmproxy

        return getattr(launch, f"cmd_{name}")(args) or 0

    return run


# --- argument parsing ----------------------------------------------------------------------------------------


def _add_policy(p: argparse.ArgumentParser, top: bool = False) -> None:
    # SUPPRESS below the top level: otherwise a subcommand's default would overwrite `tollgate --policy X ...`.
    p.add_argument(
        "--policy",
        metavar="FILE",
        default=None if top else argparse.SUPPRESS,
        help=f"policy file (default: $TOLLGATE_POLICY or {DEFAULT_POLICY}); it names the database",
    )


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: `run`/`web` pass unknown options to mitmproxy, and a prefix such as
    # `--p` must reach it rather than be taken for our --policy.
    parser = argparse.ArgumentParser(
        prog="tollgate", description="LLM gateway: virtual keys, limits, budgets and a DuckDB ledger.",
        allow_abbrev=False,
    )
    _add_policy(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(parent, name: str, help: str, func) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, allow_abbrev=False)
        _add_policy(p)
        p.set_defaults(func=func, parser_=p)
        return p

    run = add(sub, "run", "run the gateway (mitmdump); extra options go to mitmproxy", _launch("run"))
    run.set_defaults(passthrough=True)
    web = add(sub, "web", "run the gateway under mitmweb; extra options go to mitmproxy", _launch("web"))
    web.set_defaults(passthrough=True)
    env = add(sub, "env", "print the exports an app needs to use the gateway", _launch("env"))
    env.add_argument("--shell", choices=("sh", "fish"), default=None, help="syntax (default: sh)")

    keys = add(sub, "keys", "create, list and revoke virtual keys", None)
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    create = add(keys_sub, "create", "create a virtual key (printed once)", cmd_keys_create)
    create.add_argument("--user", required=True, metavar="ID", help="the user the key belongs to")
    create.add_argument(
        "--expires-days", type=int, metavar="N", default=None,
        help="days until it expires; 0: never (default: auth.virtual_keys.expiration_days, else never)",
    )
    create.add_argument(
        "--meta", action="append", metavar="KEY=VALUE",
        help="metadata (repeatable); auth.virtual_keys.metadata_fields are required",
    )
    create.add_argument(
        "--tier", metavar="NAME", default=None,
        help="the key's tier (a budgeting.tiers name); a tier listing the user in shared_users wins",
    )
    create.add_argument("--json", action="store_true", help="print a JSON object")
    lst = add(keys_sub, "list", "list keys (never the keys themselves)", cmd_keys_list)
    lst.add_argument("--json", action="store_true", help="print JSON")
    revoke = add(keys_sub, "revoke", "revoke a key by its key_id", cmd_keys_revoke)
    revoke.add_argument("key_id", metavar="KEY_ID")

    sql = add(sub, "sql", "run read-only SQL on the ledger", cmd_sql)
    sql.add_argument("query", metavar="SQL")
    fmt = sql.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")

    usage = add(sub, "usage", "requests, tokens and cost from the ledger", cmd_usage)
    usage.add_argument("--by", choices=tuple(_USAGE_GROUPS), default="user", help="group by (default: user)")
    usage.add_argument("--since", metavar="YYYY-MM-DD", help="only requests from this UTC date on")
    usage.add_argument("--json", action="store_true", help="print JSON")

    budgets = add(sub, "budgets", "each budget's spend, limit and reservations in its current period",
                  cmd_budgets)
    budgets.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "passthrough", False):
        args.extra = extra[1:] if extra[:1] == ["--"] else extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    args.policy = _policy_file(args)  # resolved once: launch's commands get a path, never None
    func = getattr(args, "func", None)
    if func is None:  # `tollgate keys` without an action
        args.parser_.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except CliError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tollgate sql ... | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
