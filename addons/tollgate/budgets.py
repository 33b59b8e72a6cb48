"""Spend budgets: tiers (pooled users), a global budget and a per-user default, enforced without overshoot.

How a request meets its budgets (all on the event loop, O(budgets that apply), no I/O):

    r = budgets.reserve(user, tier, worst_case_usd, now=request_start)   # before forwarding (None: unpriced)
    if isinstance(r, Refusal): answer 429 insufficient_quota, r.message (r.unpriced: 403, r.unpriced_message)
    ... forward ...
    alerts = budgets.settle(r, actual_usd)    # after the answer (or budgets.release(r) on error/abort)
    for a in alerts: sender.send(a)           # alerts.AlertSender: log + webhook, off the loop

Why this bounds overshoot: a request is admitted only while ``spent + reserved + its estimate <= limit``, and
``reserved`` holds the worst case (prompt estimate + the request's max output tokens, or
``default_max_output_tokens`` when it sets none) of every request in flight. When estimates are upper bounds
the spend can never pass the limit, however many requests race. When an estimate is low (the prompt was
under-counted), the excess is bounded by the errors of the requests that were in flight at the last
admission: ``spent <= limit + sum(max(0, actual - estimate))`` over those requests — one request's error
when they run one at a time. Every later request sees the real spend and is refused.

Spend attribution, and why by the ledger's ``tier`` column: a request's cost counts toward (a) the pool of the
tier it was served under, (b) the global budget, (c) the user's own per-user budget when that tier has no
budget. At start the spend is recomputed from the ledger (:meth:`Budgets.spend_query`), and there tier pools
are summed by the ``tier`` each row was *written with*, not by today's ``shared_users``. So editing
``shared_users`` moves no past money: a user who leaves a pool does not take the pool's spend with them (the
pool would suddenly regain headroom) nor drag it into their new pool (which would suddenly be over) — the
restart recount agrees with what the running gateway counted. The gateway must therefore write
``tier_of(user, key.tier)`` into each ledger row. Renaming a tier starts its pool afresh.

Periods are calendar-aligned in ``budgeting.timezone`` (default UTC): a day starts at local midnight, a week
on Monday, a month on the 1st; ``never`` is one endless period. A request belongs to the period its *start*
falls in (the ledger's ``ts``), so pass ``now=`` the request's start to :meth:`Budgets.reserve`; a request
that straddles a period end is charged to the period it started in, exactly as a restart would recount it.
Roll-over is lazy: the first access after a period's end resets spent and the alert marks.

Unknown prices fail closed: ``reserve(..., None)`` says the request cannot be priced (its model is in neither
genai-prices nor ``budgeting.costs``). An enforcing budget refuses it (``Refusal.unpriced``), because its cost
would count 0 and so could never be stopped; ``budgeting.unpriced: allow`` admits it holding nothing, and
tracking budgets always do. ``settle(r, None)`` adds nothing, exactly as the ledger's NULL ``cost_usd`` adds
nothing on restart.

Thread-safety: meant for the event loop; a lock (held for a few microseconds) makes :meth:`apply_spend`
from the ledger thread and :meth:`status` from anywhere safe as well.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import spend_hours
from .config_error import ConfigError

RESETS = ("daily", "weekly", "monthly", "never")
MODES = ("enforce", "track")
UNPRICED = ("refuse", "allow")
DEFAULT_MAX_OUTPUT_TOKENS = 4096

_BUDGETING_KEYS = frozenset({"timezone", "default_max_output_tokens", "tiers", "global", "per_user", "costs",
                             "unpriced"})
_BUDGET_KEYS = frozenset({"limit_usd", "monthly_limit_usd", "reset", "mode", "alert_at"})
_TIER_KEYS = _BUDGET_KEYS | {"name", "shared_users", "rate_limits"}
_ALERTS_KEYS = frozenset({"webhook"})
_ZERO = Decimal(0)
_CENT = Decimal("0.01")


BudgetPolicyError = ConfigError  # A bad budgeting/alerts section: the key path and problem, for policy.py to add the file


# --- policy --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    limit: Decimal
    reset: str = "monthly"
    mode: str = "enforce"
    alert_at: tuple[Decimal, ...] = ()  # sorted, distinct, each in (0, 1]


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    shared_users: tuple[str, ...] = ()
    budget: BudgetSpec | None = None  # None: a tier for rate limits only
    rate_limits: Any = None  # passed through untouched, for the rate limiter


def _budget_spec(d: Any, path: str, *, known: frozenset[str] = _BUDGET_KEYS) -> BudgetSpec | None:
    """A BudgetSpec from a tier / global / per_user mapping; None when it sets no limit at all."""
    if not isinstance(d, dict):
        raise BudgetPolicyError(path, f"must be a mapping, not {type(d).__name__}")
    for k in d:
        if k not in known:
            raise BudgetPolicyError(f"{path}.{k}", f"unknown key (known: {', '.join(sorted(known))})")
    monthly, general = d.get("monthly_limit_usd"), d.get("limit_usd")
    if monthly is not None and general is not None:
        raise BudgetPolicyError(f"{path}.limit_usd", "set either monthly_limit_usd or limit_usd, not both")
    reset = d.get("reset")
    if reset is not None:
        if not isinstance(reset, str) or reset.lower() not in RESETS:
            raise BudgetPolicyError(f"{path}.reset", f"must be one of {', '.join(RESETS)}, not {reset!r}")
        reset = reset.lower()
    if monthly is None and general is None:
        for k in ("reset", "mode", "alert_at"):
            if d.get(k) is not None:
                raise BudgetPolicyError(f"{path}.{k}", "needs a limit: set limit_usd (or monthly_limit_usd)")
        return None
    if monthly is not None:
        if reset not in (None, "monthly"):
            raise BudgetPolicyError(f"{path}.reset", f"monthly_limit_usd resets monthly; for {reset!r} write "
                                                     f"limit_usd with reset: {reset}")
        limit = _money(monthly, f"{path}.monthly_limit_usd")
        reset = "monthly"
    else:
        limit = _money(general, f"{path}.limit_usd")
        reset = reset or "monthly"
    mode = d.get("mode", "enforce")
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise BudgetPolicyError(f"{path}.mode", f"must be enforce or track, not {mode!r}")
    return BudgetSpec(limit, reset, mode.lower(), _fractions(d.get("alert_at"), f"{path}.alert_at"))


def _money(v: Any, path: str) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float, str, Decimal)):
        raise BudgetPolicyError(path, f"must be an amount in USD, not {type(v).__name__}")
    try:
        d = Decimal(repr(v)) if isinstance(v, float) else Decimal(str(v).strip())
    except InvalidOperation:
        raise BudgetPolicyError(path, f"must be an amount in USD, not {v!r}") from None
    if not d.is_finite() or d < 0:
        raise BudgetPolicyError(path, f"must be a finite amount >= 0, not {v!r}")
    return d


def _fractions(v: Any, path: str) -> tuple[Decimal, ...]:
    if v is None:
        return ()
    items = v if isinstance(v, list) else [v]
    out = set()
    for i, x in enumerate(items):
        where = f"{path}[{i}]" if isinstance(v, list) else path
        if isinstance(x, bool) or not isinstance(x, (int, float, str)):
            raise BudgetPolicyError(where, f"must be a fraction of the limit, not {type(x).__name__}")
        try:
            f = Decimal(repr(x)) if isinstance(x, float) else Decimal(str(x).strip())
        except InvalidOperation:
            raise BudgetPolicyError(where, f"must be a fraction of the limit, not {x!r}") from None
        if not f.is_finite() or not 0 < f <= 1:
            hint = f" ({x} looks like a percentage: write {f / 100})" if f.is_finite() and 1 < f <= 100 else ""
            raise BudgetPolicyError(where, f"must be a fraction in (0, 1], not {x!r}{hint}")
        out.add(f)
    return tuple(sorted(out))


def _timezone(v: Any) -> tzinfo:
    if v is None or v == "UTC":
        return UTC
    if not isinstance(v, str) or not v:
        raise BudgetPolicyError("budgeting.timezone", f"must be an IANA time zone name, not {v!r}")
    try:
        return ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise BudgetPolicyError("budgeting.timezone",
                                f"unknown time zone {v!r} (an IANA name such as UTC or Europe/Paris)") from None


def _webhook(alerts: Any) -> str | None:
    if alerts is None:
        return None
    if not isinstance(alerts, dict):
        raise BudgetPolicyError("alerts", f"must be a mapping, not {type(alerts).__name__}")
    for k in alerts:
        if k not in _ALERTS_KEYS:
            raise BudgetPolicyError(f"alerts.{k}", f"unknown key (known: {', '.join(sorted(_ALERTS_KEYS))})")
    url = alerts.get("webhook")
    if url is None or url == "":  # `${ALERT_WEBHOOK:-}` left unset: no webhook
        return None
    if not isinstance(url, str):
        raise BudgetPolicyError("alerts.webhook", f"must be an http(s) URL, not {type(url).__name__}")
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        # (never echo the URL: webhook URLs often carry a secret token)
        raise BudgetPolicyError("alerts.webhook", "must be an http:// or https:// URL with a host")
    return url


# --- periods -------------------------------------------------------------------------------------------------


def period_bounds(reset: str, ts: float, tz: tzinfo) -> tuple[datetime | None, datetime | None]:
    """The calendar period (start, end) in `tz` that the POSIX time `ts` falls in; (None, None) for never."""
    if reset == "never":
        return None, None
    day = datetime.fromtimestamp(ts, tz).date()
    if reset == "daily":
        first, nxt = day, day + timedelta(days=1)
    elif reset == "weekly":
        first = day - timedelta(days=day.weekday())  # Monday
        nxt = first + timedelta(days=7)
    elif reset == "monthly":
        first = day.replace(day=1)
        nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    else:  # pragma: no cover - validated
        raise ValueError(reset)
    return _midnight(first, tz), _midnight(nxt, tz)


def _midnight(d: date, tz: tzinfo) -> datetime:
    # Wall-clock midnight; zoneinfo resolves a midnight skipped by DST to the instant right after the gap.
    return datetime(d.year, d.month, d.day, tzinfo=tz)


def _ts(now: float | datetime | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return (now if now.tzinfo else now.replace(tzinfo=UTC)).timestamp()  # naive = UTC, as in the ledger
    return float(now)


# --- state ---------------------------------------------------------------------------------------------------


class Budget:
    """One budget's configuration and live state. Mutated only under Budgets' lock."""

    __slots__ = ("id", "scope", "name", "limit", "reset", "mode", "enforce", "alert_at", "tz",
                 "spent", "reserved", "period_start", "period_end", "_end_ts", "_thresholds", "_next",
                 "since", "loaded")

    def __init__(self, id: str, scope: str, name: str, spec: BudgetSpec, tz: tzinfo, now: float):
        self.id = id  # "tier:<name>" | "global" | "user:<user_id>"
        self.scope = scope  # tier | global | user
        self.name = name
        self.tz = tz
        self.reset = spec.reset
        self.spent = _ZERO
        self.reserved = _ZERO
        self.since = now  # live counting began here; the ledger supplies the period's spend before it
        self.loaded = False  # has the ledger's spend for this period been added?
        self._configure(spec)
        self._roll(now)

    def _configure(self, spec: BudgetSpec) -> None:
        self.limit = spec.limit
        self.mode = spec.mode
        self.enforce = spec.mode == "enforce"
        self.alert_at = spec.alert_at
        self._thresholds = tuple(self.limit * f for f in spec.alert_at)  # in USD, ascending

    def _roll(self, ts: float) -> None:
        """Enter the period `ts` falls in: spend and alert marks start again (reservations stay: in flight)."""
        self.period_start, self.period_end = period_bounds(self.reset, ts, self.tz)
        self._end_ts = self.period_end.timestamp() if self.period_end else math.inf
        self.spent = _ZERO
        self._next = 0  # thresholds[:_next] have been alerted this period

    def _mark_crossed_silently(self) -> None:
        """Thresholds the spend already passed count as alerted (a restart or reload must not re-alert)."""
        th, n, spent = self._thresholds, 0, self.spent
        while n < len(th) and spent >= th[n]:
            n += 1
        self._next = max(self._next, n)

    def _crossed(self, ts: float) -> list[Alert]:
        th = self._thresholds
        out = []
        while self._next < len(th) and self.spent >= th[self._next]:
            out.append(Alert(self.id, self.scope, self.name, self.mode, self.alert_at[self._next],
                             th[self._next], self.spent, self.limit, self.period_start, self.period_end,
                             datetime.fromtimestamp(ts, UTC)))
            self._next += 1
        return out

    def __repr__(self) -> str:
        return f"Budget({self.id!r}, {self.mode}, spent={self.spent}, reserved={self.reserved}, limit={self.limit})"


@dataclass(slots=True, eq=False)
class Reservation:
    """Money held in every applicable budget for one request in flight. Settle or release it exactly once."""

    budgets: tuple[Budget, ...]
    amount: Decimal
    period_ends: tuple[float, ...]  # each budget's period end when reserved: the period the request belongs to
    done: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not spend: the first enforcing budget it would overrun (values as of the refusal)."""

    budget_id: str
    scope: str
    name: str
    spent: Decimal
    reserved: Decimal
    estimate: Decimal
    limit: Decimal
    period_end: datetime | None  # None: the budget never resets
    unpriced: bool = False  # refused because the request cannot be priced (budgeting.unpriced: refuse)

    @property
    def _what(self) -> str:
        return {"tier": f"tier '{self.name}'", "global": "the gateway's global",
                "user": f"user '{self.name}'"}[self.scope]

    def unpriced_message(self, target: str | None) -> str:
        """For an unpriced refusal: `target` is the "provider:model" asked for (None: the request names no model)."""
        if target is None:
            head = "this request names no model, so tollgate cannot price it"
            fix = "name a model that has a price (or price it under budgeting.costs)"
        else:
            head = f"tollgate has no price for model '{target}' (neither genai-prices nor budgeting.costs knows it)"
            fix = (f"add budgeting.costs entry '{target}' {{input_token: ..., output_token: ...}} (USD per 1K "
                   f"tokens) to the gateway's policy")
        return (f"{head}, and {self._what} budget is enforced, so its cost could not be counted: {fix}, or set "
                f"budgeting.unpriced: allow to let unpriced requests through at $0")

    @property
    def message(self) -> str:
        """For the 429 body: safe to show (names a budget and amounts, nothing secret)."""
        what = self._what
        if self.spent >= self.limit:
            head = f"{what} budget is spent: ${_usd(self.spent)} of ${_usd(self.limit)}"
        else:
            head = (f"{what} budget cannot cover this request: ${_usd(self.spent)} spent and "
                    f"${_usd(self.reserved)} held by requests in flight, of ${_usd(self.limit)}; this request "
                    f"may cost up to ${_usd(self.estimate)}")
        tail = f"; it resets at {self.period_end.isoformat()}" if self.period_end else "; it does not reset"
        return head + tail

    def retry_after(self, now: float | datetime | None = None) -> int | None:
        """Seconds until the period ends (None: never resets)."""
        if self.period_end is None:
            return None
        return max(0, math.ceil(self.period_end.timestamp() - _ts(now)))


@dataclass(frozen=True, slots=True)
class Alert:
    """A budget crossed one of its alert_at fractions (once per period)."""

    budget_id: str
    scope: str
    name: str
    mode: str
    fraction: Decimal
    threshold_usd: Decimal
    spent_usd: Decimal
    limit_usd: Decimal
    period_start: datetime | None
    period_end: datetime | None
    at: datetime

    @property
    def message(self) -> str:
        label = {"tier": f"tier '{self.name}'", "global": "global", "user": f"user '{self.name}'"}[self.scope]
        ends = self.period_end.isoformat() if self.period_end else "never"
        return (f"budget {label} crossed {float(self.fraction) * 100:g}% of its limit: ${_usd(self.spent_usd)} "
                f"of ${_usd(self.limit_usd)} spent ({self.mode}; period ends {ends})")

    def to_json(self) -> dict[str, Any]:
        """The webhook body. Money as exact decimal strings; `text` makes Slack-style hooks show a line."""
        return {
            "event": "budget_threshold",
            "text": f"tollgate: {self.message}",
            "budget": self.name,
            "budget_id": self.budget_id,
            "scope": self.scope,
            "mode": self.mode,
            "fraction": float(self.fraction),
            "threshold_usd": str(self.threshold_usd),
            "spent_usd": str(self.spent_usd),
            "limit_usd": str(self.limit_usd),
            "period_start": self.period_start.isoformat() if self.period_start else None,
            "period_end": self.period_end.isoformat() if self.period_end else None,
            "at": self.at.isoformat(),
        }


def _usd(d: Decimal) -> str:
    """Cents for display, more digits only when the amount is below a cent and not zero."""
    if d == 0 or abs(d) >= _CENT:
        return f"{d.quantize(_CENT):,}"
    return format(d.normalize(), "f")


@dataclass(frozen=True, slots=True)
class SpendQuery:
    """One SQL statement over the ledger giving each budget's spend in its current period, before live counting.

    Rows: (scope, name, spent) with scope 'tier' (name = tier), 'global' (name NULL) or 'user' (name =
    user_id, one row per user). Run it on the ledger thread, hand the rows to :meth:`Budgets.apply_spend`.
    """

    sql: str
    params: list[Any]
    period_ends: dict[str, float] = field(default_factory=dict)  # budget id ('user' for the group) -> end


# --- the budgets -----------------------------------------------------------------------------------------------


class Budgets:
    def __init__(self, tiers: dict[str, Tier], global_spec: BudgetSpec | None, per_user: BudgetSpec | None,
                 *, timezone: tzinfo = UTC, default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
                 webhook: str | None = None, refuse_unpriced: bool = True, now: float | datetime | None = None):
        ts = _ts(now)
        self.tiers = tiers
        self.refuse_unpriced = refuse_unpriced  # budgeting.unpriced: refuse (the default) | allow
        self.timezone = timezone
        self.default_max_output_tokens = default_max_output_tokens
        self.webhook = webhook  # may hold a secret token: never log it whole
        self.per_user_spec = per_user
        self._lock = threading.Lock()
        self._member: dict[str, str] = {u: t.name for t in tiers.values() for u in t.shared_users}
        self._pools: dict[str, Budget] = {
            t.name: Budget(f"tier:{t.name}", "tier", t.name, t.budget, timezone, ts)
            for t in tiers.values() if t.budget is not None
        }
        self.global_budget = Budget("global", "global", "global", global_spec, timezone, ts) if global_spec else None
        self._users: dict[str, Budget] = {}  # per-user budgets, created on first sight
        self._users_since = ts  # live per-user counting began here
        self._users_loaded = per_user is None
        self._applicable: dict[tuple[str, str | None], tuple[Budget, ...]] = {}

    # --- building --------------------------------------------------------------------------------------------

    @classmethod
    def from_policy(cls, budgeting: dict | None, alerts: dict | None = None,
                    now: float | datetime | None = None) -> Budgets:
        """Validate the policy's ``budgeting`` and ``alerts`` sections (BudgetPolicyError names the key path)."""
        b = budgeting or {}
        if not isinstance(b, dict):
            raise BudgetPolicyError("budgeting", f"must be a mapping, not {type(b).__name__}")
        for k in b:
            if k not in _BUDGETING_KEYS:
                raise BudgetPolicyError(f"budgeting.{k}",
                                        f"unknown key (known: {', '.join(sorted(_BUDGETING_KEYS))})")
        tz = _timezone(b.get("timezone"))
        unpriced = b.get("unpriced", "refuse")
        if not isinstance(unpriced, str) or unpriced.lower() not in UNPRICED:
            raise BudgetPolicyError("budgeting.unpriced", f"must be refuse or allow, not {unpriced!r}")
        dmot = b.get("default_max_output_tokens", DEFAULT_MAX_OUTPUT_TOKENS)
        if isinstance(dmot, bool) or not isinstance(dmot, int) or dmot < 1:
            raise BudgetPolicyError("budgeting.default_max_output_tokens",
                                    f"must be a whole number of tokens >= 1, not {dmot!r}")
        raw_tiers = b.get("tiers") or []
        if not isinstance(raw_tiers, list):
            raise BudgetPolicyError("budgeting.tiers", f"must be a list of tiers, not {type(raw_tiers).__name__}")
        tiers: dict[str, Tier] = {}
        member: dict[str, str] = {}
        for i, t in enumerate(raw_tiers):
            path = f"budgeting.tiers[{i}]"
            spec = _budget_spec(t, path, known=_TIER_KEYS)
            name = t.get("name")
            if not isinstance(name, str) or not name.strip():
                raise BudgetPolicyError(f"{path}.name", "every tier needs a name (a non-empty string)")
            if name in tiers:
                raise BudgetPolicyError(f"{path}.name", f"tier {name!r} is defined twice")
            users = t.get("shared_users") or []
            if not isinstance(users, list):
                raise BudgetPolicyError(f"{path}.shared_users", "must be a list of user ids")
            seen: list[str] = []
            for j, u in enumerate(users):
                if isinstance(u, bool) or not isinstance(u, (str, int)) or str(u) == "":
                    raise BudgetPolicyError(f"{path}.shared_users[{j}]", f"must be a user id, not {u!r}")
                u = str(u)
                if u in member and member[u] != name:
                    raise BudgetPolicyError(f"{path}.shared_users[{j}]",
                                            f"user {u!r} is already in tier {member[u]!r} (a user has one tier)")
                if u not in member:
                    member[u] = name
                    seen.append(u)
            tiers[name] = Tier(name, tuple(seen), spec, t.get("rate_limits"))
        glob = b.get("global")
        per_user = b.get("per_user")
        specs = []
        for key, raw in (("global", glob), ("per_user", per_user)):
            spec = None if raw is None else _budget_spec(raw, f"budgeting.{key}")
            if raw is not None and spec is None:
                raise BudgetPolicyError(f"budgeting.{key}.limit_usd", "is required (or monthly_limit_usd)")
            specs.append(spec)
        return cls(tiers, specs[0], specs[1], timezone=tz, default_max_output_tokens=dmot,
                   webhook=_webhook(alerts), refuse_unpriced=unpriced.lower() == "refuse", now=now)

    def inherit(self, old: Budgets) -> None:
        """On a policy reload: take over the old instance's live state, so spend and reservations carry on.

        A budget with the same id, reset and time zone keeps its very object (requests in flight settle into
        it) with the new limit, mode and alert_at; thresholds its spend already passed count as alerted. A
        budget that is new or whose period changed starts afresh and is loaded by the next
        :meth:`spend_query` (requests in flight during such a reload are not counted toward it).
        Call before the new instance serves any request.
        """
        with old._lock, self._lock:
            for name, b in list(self._pools.items()):
                self._pools[name] = self._adopt(old._pools.get(name), b)
            if self.global_budget is not None:
                self.global_budget = self._adopt(old.global_budget, self.global_budget)
            spec = self.per_user_spec
            if spec is not None and old.per_user_spec is not None and spec.reset == old.per_user_spec.reset \
                    and self.timezone == old.timezone:
                for uid, ob in old._users.items():
                    ob._configure(spec)
                    ob._mark_crossed_silently()
                    self._users[uid] = ob
                self._users_since = old._users_since
                self._users_loaded = old._users_loaded
            self._applicable.clear()

    def _adopt(self, old: Budget | None, new: Budget) -> Budget:
        if old is None or old.reset != new.reset or old.tz != new.tz:
            return new
        old.name = new.name
        old._configure(BudgetSpec(new.limit, new.reset, new.mode, new.alert_at))
        old._mark_crossed_silently()
        return old

    # --- who pays ----------------------------------------------------------------------------------------------

    def tier_of(self, user_id: str, key_tier: str | None) -> str | None:
        """The tier a user's requests run under: the tier listing them in shared_users, else their key's tier."""
        return self._member.get(user_id, key_tier)

    def worst_case_output(self, max_output_tokens: int | None) -> int:
        """Output tokens to reserve for: the request's own max, else ``default_max_output_tokens``."""
        if max_output_tokens is None or isinstance(max_output_tokens, bool) or max_output_tokens <= 0:
            return self.default_max_output_tokens
        return int(max_output_tokens)

    def applicable(self, user_id: str, tier: str | None,
                   now: float | datetime | None = None) -> tuple[Budget, ...]:
        """The budgets a request pays into, most specific first: its tier's pool (or, when its tier has no
        budget, the user's per-user budget), then the global budget. Cached per (user, tier); `now` only
        dates a per-user budget created on first sight."""
        key = (user_id, tier)
        got = self._applicable.get(key)
        if got is not None:
            return got
        with self._lock:
            out = []
            pool = self._pools.get(self._member.get(user_id, tier))  # shared_users wins over the key's tier
            if pool is not None:
                out.append(pool)
            elif self.per_user_spec is not None:
                out.append(self._user_budget(user_id, _ts(now)))
            if self.global_budget is not None:
                out.append(self.global_budget)
            got = self._applicable[key] = tuple(out)
        return got

    def _user_budget(self, user_id: str, ts: float) -> Budget:
        b = self._users.get(user_id)
        if b is None:
            assert self.per_user_spec is not None
            b = self._users[user_id] = Budget(f"user:{user_id}", "user", user_id, self.per_user_spec,
                                              self.timezone, ts)
            b.since = self._users_since  # the group's ledger load covers this user up to then
        return b

    # --- the hot path ------------------------------------------------------------------------------------------

    def reserve(self, user_id: str, tier: str | None, estimate_usd: Decimal | None,
                now: float | datetime | None = None) -> Reservation | Refusal:
        """Hold `estimate_usd` (the request's worst-case cost) in every applicable budget, or refuse.

        An enforcing budget refuses when it is already spent (spent >= limit) or when spent + reserved +
        estimate would pass its limit; a tracking one never refuses but still holds the estimate, so
        `status()` shows what is in flight. Pass now= the request's start time (the ledger's ts).
        `estimate_usd` None: the request cannot be priced; an enforcing budget refuses it (Refusal.unpriced)
        unless budgeting.unpriced is allow, else it holds nothing.
        """
        refuse_unpriced = False
        if estimate_usd is None:
            refuse_unpriced, estimate_usd = self.refuse_unpriced, _ZERO
        elif estimate_usd < 0:
            raise ValueError("estimate_usd must be >= 0")
        ts = _ts(now)
        budgets = self.applicable(user_id, tier, ts)
        with self._lock:
            for b in budgets:
                if ts >= b._end_ts:
                    b._roll(ts)
                if b.enforce and (refuse_unpriced or b.spent >= b.limit
                                  or b.spent + b.reserved + estimate_usd > b.limit):
                    return Refusal(b.id, b.scope, b.name, b.spent, b.reserved, estimate_usd, b.limit, b.period_end,
                                   refuse_unpriced)
            for b in budgets:
                b.reserved += estimate_usd
            return Reservation(budgets, estimate_usd, tuple([b._end_ts for b in budgets]))

    def settle(self, r: Reservation, actual_usd: Decimal | None,
               now: float | datetime | None = None) -> list[Alert]:
        """Replace the reservation by the real cost (None: unpriced, counts 0). Returns the alerts crossed,
        for an AlertSender. A second settle/release of the same reservation does nothing."""
        if r.done:
            return []
        if actual_usd is not None and actual_usd < 0:
            raise ValueError("actual_usd must be >= 0")
        ts = _ts(now)
        alerts: list[Alert] = []
        with self._lock:
            r.done = True
            for b, end in zip(r.budgets, r.period_ends):
                b.reserved -= r.amount
                if ts >= b._end_ts:
                    b._roll(ts)
                # Charged to the period the request started in, as the ledger's ts will say on a restart.
                if actual_usd and b._end_ts == end:
                    b.spent += actual_usd
                    if b._next < len(b._thresholds):
                        alerts += b._crossed(ts)
        return alerts

    def release(self, r: Reservation) -> None:
        """Give the estimate back without spending (refused elsewhere, failed, or aborted before the provider)."""
        if r.done:
            return
        with self._lock:
            r.done = True
            for b in r.budgets:
                b.reserved -= r.amount

    # --- reports -----------------------------------------------------------------------------------------------

    def budgets(self) -> list[Budget]:
        """Every budget: tier pools (policy order), per-user ones (by user), global last."""
        out = list(self._pools.values())
        out += [self._users[u] for u in sorted(self._users)]
        if self.global_budget is not None:
            out.append(self.global_budget)
        return out

    def status(self, now: float | datetime | None = None) -> list[dict[str, Any]]:
        """For `tollgate budgets` and /health: one dict per budget, current period."""
        ts = _ts(now)
        rows = []
        with self._lock:
            for b in self.budgets():
                if ts >= b._end_ts:
                    b._roll(ts)
                rows.append({
                    "id": b.id, "name": b.name, "scope": b.scope, "mode": b.mode, "reset": b.reset,
                    "spent": b.spent, "reserved": b.reserved, "limit": b.limit,
                    "remaining": max(_ZERO, b.limit - b.spent - b.reserved),
                    "pct": float(b.spent / b.limit * 100) if b.limit else None,
                    "period_start": b.period_start, "period_end": b.period_end,
                    "alert_at": [float(f) for f in b.alert_at],
                })
        return rows

    # --- restart: spend from the ledger ------------------------------------------------------------------------

    def spend_query(self, now: float | datetime | None = None,
                    until: datetime | None = None) -> SpendQuery | None:
        """The single statement that loads every not-yet-loaded budget's spend for its current period.

        Each budget counts ledger rows with period_start <= ts < min(period_end, since), `since` being when
        it began counting live, so rows are never counted twice even if traffic ran before the load.
        `until`: the ledger's hourly-totals watermark (spend_hours.until), below which whole hours are read
        from the totals instead of the rows. None when everything is loaded.
        """
        ts = _ts(now)
        parts: list[str] = []
        params: list[Any] = []
        ends: dict[str, float] = {}
        with self._lock:
            for b in [*self._pools.values(), self.global_budget]:
                if b is None or b.loaded:
                    continue
                if ts >= b._end_ts:
                    b._roll(ts)
                src, p = _window(b.period_start, b.period_end, b.since, until)
                if b.scope == "tier":
                    parts.append(f"SELECT 'tier', ?, sum(cost_usd) FROM {src} WHERE tier = ?")
                    params += [b.name, *p, b.name]
                else:
                    parts.append(f"SELECT 'global', NULL, sum(cost_usd) FROM {src}")
                    params += p
                ends[b.id] = b._end_ts
            if not self._users_loaded and self.per_user_spec is not None:
                start, end = period_bounds(self.per_user_spec.reset, ts, self.timezone)
                src, p = _window(start, end, self._users_since, until)
                pooled = list(self._pools)
                where = "user_id IS NOT NULL"
                if pooled:
                    where += f" AND (tier IS NULL OR tier NOT IN ({', '.join('?' * len(pooled))}))"
                parts.append(f"SELECT 'user', user_id, sum(cost_usd) FROM {src} WHERE {where} GROUP BY user_id")
                params += p + pooled
                ends["user"] = end.timestamp() if end else math.inf
        if not parts:
            return None
        return SpendQuery(" UNION ALL ".join(parts), params, ends)

    def apply_spend(self, q: SpendQuery, rows: Iterable[tuple[str, str | None, Any]],
                    now: float | datetime | None = None) -> list[Alert]:
        """Add the ledger's spend (rows of q) to the budgets. Thresholds the ledger's spend alone had crossed
        count as alerted (no repeat after a restart); those crossed only together with live spend since are
        returned. Rows whose period has ended meanwhile are dropped (the budget has rolled over)."""
        ts = _ts(now)
        alerts: list[Alert] = []
        with self._lock:
            for scope, name, spent in rows:
                amount = Decimal(str(spent)) if spent is not None and not isinstance(spent, Decimal) else spent
                if scope == "tier":
                    b = self._pools.get(name)
                    key = b.id if b else None
                elif scope == "global":
                    b, key = self.global_budget, "global"
                elif scope == "user" and self.per_user_spec is not None and name is not None:
                    if self._member.get(name) in self._pools:
                        continue  # pooled now (spent before joining): no per-user budget applies to them
                    b, key = self._user_budget(name, ts), "user"
                else:
                    continue
                if b is None or key not in q.period_ends:
                    continue
                if ts >= b._end_ts:
                    b._roll(ts)
                if b._end_ts != q.period_ends[key] or not amount:
                    continue
                before = b.spent
                b.spent = amount
                b._mark_crossed_silently()
                b.spent = before + amount
                alerts += b._crossed(ts)
            for key in q.period_ends:
                if key == "user":
                    self._users_loaded = True
                elif key == "global":
                    if self.global_budget is not None:
                        self.global_budget.loaded = True
                elif (b := self._pools.get(key.removeprefix("tier:"))) is not None:
                    b.loaded = True
        return alerts

    def fetch_spend(self, con, now: float | datetime | None = None) -> tuple[SpendQuery, list] | None:
        """Run spend_query on a DuckDB connection whose default catalog is the ledger (blocking: not on the
        loop); the rows are for :meth:`apply_spend`. None when everything is loaded."""
        q = self.spend_query(now, spend_hours.until(con))
        if q is None:
            return None
        return q, con.execute(q.sql, q.params).fetchall()

    def load_spend(self, con, now: float | datetime | None = None) -> list[Alert]:
        """fetch_spend + apply_spend (blocking: not on the loop)."""
        got = self.fetch_spend(con, now)
        return [] if got is None else self.apply_spend(*got, now)

    def spend_unknown(self, user_id: str, tier: str | None) -> Budget | None:
        """An enforcing budget of this request whose period spend has not been read from the ledger yet:
        admitting against it would count from zero."""
        for b in self.applicable(user_id, tier):
            if b.enforce and not (self._users_loaded if b.scope == "user" else b.loaded):
                return b
        return None


def _window(start: datetime | None, end: datetime | None, since: float,
            until: datetime | None) -> tuple[str, list[Any]]:
    """A subquery of the rows (tier, user_id, cost_usd) with period_start <= ts < min(period_end, since)."""
    upper = datetime.fromtimestamp(since, UTC)
    if end is not None and end.timestamp() < since:
        upper = end.astimezone(UTC)
    return spend_hours.source(start.astimezone(UTC) if start is not None else None, upper, until)
