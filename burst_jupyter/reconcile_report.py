"""What one reconciliation pass (reconcile.py) found and did: a :class:`Finding` per instance or live row that no
live job owns, and the pass's :class:`Report`, whose ``str()`` is the table ``burst cleanup`` prints."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from .money import format_rate, format_usd

__all__ = ["Finding", "Report"]


@dataclass(frozen=True)
class Finding:
    """An instance (or a live row) that no live job owns: ended, to be ended (dry run), or not ended and why."""

    provider: str
    instance_id: str | None
    job_id: str | None
    kind: str  # "leaked" (no live row knows it) or "stranded" (its row's process is gone)
    why: str
    rate_usd_per_hour: Decimal | None
    since: dt.datetime | None  # when it began to bill, as far as anyone knows
    cost_usd: Decimal | None  # so far (dry run), or as settled
    ended: bool = False
    problem: str | None = None


@dataclass(frozen=True, repr=False)
class Report:
    """What one pass found and did. ``str()``/``repr()`` is a table; ``ok`` is False when a provider could not be
    asked or something that should have been ended was not."""

    reason: str
    dry_run: bool
    at: dt.datetime
    asked: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    protected: int = 0  # instances of live jobs, left alone
    errors: Mapping[str, str] = field(default_factory=dict)  # provider -> why it could not be asked

    @property
    def ok(self) -> bool:
        return not self.errors and all(f.problem is None and (f.ended or self.dry_run) for f in self.findings)

    @property
    def ended(self) -> list[Finding]:
        return [f for f in self.findings if f.ended]

    @property
    def eventful(self) -> bool:
        """Worth telling the user about when nobody asked: something was found, or a provider did not answer."""
        return bool(self.findings or self.errors)

    def headline(self) -> str:
        n = len(self.findings)
        if not n:
            return f"{self.reason}: nothing to end"
        if self.dry_run:
            return f"{self.reason} (dry run): {n} instance(s) no live job owns; nothing was ended"
        return f"{self.reason}: ended {len(self.ended)} of {n} instance(s) no live job owned"

    def __str__(self) -> str:
        lines = [self.headline()]
        if self.findings:
            cost = "COST SO FAR" if self.dry_run else "COST"
            rows: list[tuple[str, ...]] = [("PROVIDER", "INSTANCE", "JOB", "$/H", "UP FOR", cost, "RESULT")]
            rows += [self._row(f) for f in self.findings]
            from .widgets.render import aligned_rows  # the views' package: only when there is a table to show

            lines += ["  " + line for line in aligned_rows(rows)]
        lines += [f"  {name}: could not be asked: {text}" for name, text in self.errors.items()]
        asked = f"asked {', '.join(self.asked)}" if self.asked else "no provider to ask (no marketplace account)"
        if self.protected:
            asked += f"; left {self.protected} instance(s) of live jobs alone"
        lines.append(f"  {asked}")
        return "\n".join(lines)

    __repr__ = __str__

    def _row(self, f: Finding) -> tuple[str, ...]:
        up = "?" if f.since is None else _duration((self.at - f.since).total_seconds())
        rate = "?" if f.rate_usd_per_hour is None else format_rate(f.rate_usd_per_hour)
        done = "would end" if self.dry_run else "ended"
        result = done if f.problem is None else f"NOT ENDED ({f.problem})"
        return (f.provider, f.instance_id or "-", f.job_id or "-", rate, up, format_usd(f.cost_usd),
                f"{result}: {f.kind}, {f.why}")


def _duration(seconds: float) -> str:
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    minutes = s // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours < 48 else f"{hours // 24}d {hours % 24}h"
