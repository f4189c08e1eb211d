"""Money on a meter: the billed rate times wall-clock time since the create request, against the job's cap.

Providers bill on the wall clock, from the create request to the terminate. ``time.monotonic()`` stops while a
Linux or macOS laptop is suspended and the rented instance keeps billing, so money never runs on it: a
:class:`Meter` reads an injected :class:`Clock` (:data:`WALL_CLOCK` in production; a test's clock may jump, as
the wall clock does across a suspend). The lifecycle and the reaper share it, so the cap logic is one pure piece
of code. Waits that are only about elapsed waiting (a reconnect timeout, a poll) may stay monotonic.

Example:
    >>> class Fixed:
    ...     def __init__(self, now: float) -> None: self.now = now
    ...     def time(self) -> float: return self.now
    >>> clock = Fixed(1000.0)
    >>> meter = Meter(rate=Decimal(36), cap=Decimal(1), since=990.0, clock=clock)
    >>> meter.cost(), meter.seconds_left(reserve=5.0)
    (Decimal('0.100000'), 85.0)
    >>> clock.now = 1090.0   # a suspend: 90 s pass on the wall clock at once
    >>> meter.exhausted(reserve=5.0), meter.seconds_left(reserve=5.0)
    (True, 0.0)
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from .job import cost_of

__all__ = ["WALL_CLOCK", "Clock", "Meter", "WallClock", "utc"]


class Clock(Protocol):
    """This machine's two clocks. Across a laptop's suspend the wall clock runs on and the monotonic one stops."""

    def time(self) -> float:
        """Seconds since the epoch: what the provider's billing runs on. Money reads only this one."""
        ...

    def monotonic(self) -> float:
        """Seconds for waits that are only about elapsed waiting (a grace period, a poll, a reconnect timeout)."""
        ...


class WallClock:
    """The real clocks: ``time.time`` for money, ``time.monotonic`` for waits."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


WALL_CLOCK: Clock = WallClock()


@dataclass
class Meter:
    """One job's money: ``spent`` by earlier attempts plus ``rate`` $/h since ``since`` (the current attempt's
    create request, wall-clock seconds; None before it), against ``cap``."""

    rate: Decimal
    cap: Decimal
    since: float | None
    spent: Decimal = Decimal(0)
    clock: Clock = field(default=WALL_CLOCK, repr=False)

    def attempt_cost(self) -> Decimal:
        """What the current attempt has billed so far (rounded up, never under)."""
        return Decimal(0) if self.since is None else cost_of(self.rate, self.clock.time() - self.since)

    def cost(self) -> Decimal:
        """What the whole job has billed so far."""
        return self.spent + self.attempt_cost()

    def exhausted(self, *, reserve: float) -> bool:
        """True once only ``reserve`` seconds of money (or less) are left before the cap."""
        return self.rate > 0 and self.cost() + cost_of(self.rate, reserve) >= self.cap

    def seconds_left(self, *, reserve: float) -> float | None:
        """Wall-clock seconds until :meth:`exhausted` (0 once it is); None when the rate is 0 (nothing bills)."""
        if self.rate <= 0:
            return None
        money = self.cap - self.cost() - cost_of(self.rate, reserve)
        return max(float(money / self.rate) * 3600, 0.0)


def utc(seconds: float) -> dt.datetime:
    """Wall-clock seconds (a :class:`Clock`'s ``time()``) as the UTC time a ledger row keeps."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
