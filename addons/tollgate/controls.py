"""The policy's spending controls, built into ready objects: prices, rate limits, budgets, alerts.

Built whole from a validated Policy on start and on every hot reload; a reload hands over the live
state (rate-limit counters, budget spend and reservations) so editing policies.yaml never resets
anyone's usage.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from .alerts import AlertSender
from .budgets import Budgets
from .limits import RateLimiter
from .policy import Policy, tier_limits
from .pricing import Pricer


@dataclass(slots=True)
class Controls:
    pricer: Pricer
    limiter: RateLimiter
    budgets: Budgets
    alerts: AlertSender | None

    @classmethod
    def build(cls, pol: Policy, old: "Controls | None" = None) -> "Controls":
        budgets = Budgets.from_policy(pol.budgeting, pol.raw.get("alerts"))
        limiter = RateLimiter.from_policy(pol.rate_limits, tier_limits(budgets),
                                          storage=old.limiter.storage if old else None)
        if old is not None:
            budgets.inherit(old.budgets)
        alerts = old.alerts if old is not None and old.alerts is not None \
            and old.alerts.webhook == budgets.webhook else None
        if alerts is None:
            alerts = AlertSender(budgets.webhook)
        return cls(Pricer(pol.costs), limiter, budgets, alerts)

    def stop(self) -> None:
        if self.alerts is not None:
            self.alerts.stop(timeout=5)


ZERO = Decimal(0)
