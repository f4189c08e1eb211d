"""The fault ledger of the fault-injection suite (issue 4): the check every case ends with, and per-case figures.

tests/faults/conftest.py gives it to the cases as the ``fault_ledger`` fixture and prints the figures at the end of
the run; a case module imports :class:`FaultLedger` from here for its annotations.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from marketplaces import Markets

__all__ = ["FaultLedger", "Figures"]


@dataclass
class Figures:
    """One case's totals."""

    trials: int = 0
    faults: int = 0  # faults injected that the trials came through
    leaked: int = 0  # instances still running at a fake when the case was over
    worst: Decimal = Decimal(0)  # the largest bill / cap

    def add(self, other: Figures) -> None:
        self.trials += other.trials
        self.faults += other.faults
        self.leaked += other.leaked
        self.worst = max(self.worst, other.worst)

    def to_json(self) -> dict[str, Any]:
        return {"trials": self.trials, "faults": self.faults, "leaked": self.leaked, "worst": str(self.worst)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figures:
        return cls(int(data["trials"]), int(data["faults"]), int(data["leaked"]), Decimal(data["worst"]))


class FaultLedger:
    """Figures by case (shared by every case of the run), and the check each case ends with."""

    def __init__(self, figures: dict[str, Figures]) -> None:
        self._figures = figures

    def record(self, case: str, *, trials: int = 1, faults: int = 0, leaked: int = 0,
               worst: Decimal = Decimal(0)) -> None:
        self._figures.setdefault(case, Figures()).add(Figures(trials, faults, leaked, worst))

    def check_clouds(self, case: str, markets: Markets, caps: Decimal | Mapping[str, Decimal], *, faults: int,
                     trials: int = 1, timeout: float = 60.0) -> dict[str, Decimal]:
        """Wait until no fake has an instance running (up to ``timeout``), record the case, then assert that none
        leaked and that every instance's bill is within its cap. ``caps``: one cap for every instance the case
        made, or a cap per ``"provider:instance_id"`` (then every billed instance must have one).

        Returns every bill, by ``"provider:instance_id"``."""
        deadline = time.monotonic() + timeout
        while markets.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = markets.leftovers()
        bills = {f"{name}:{iid}": bill for name, cloud in markets.all.items() for iid, bill in cloud.bills().items()}
        cap_of = caps if isinstance(caps, Mapping) else dict.fromkeys(bills, caps)
        fractions = [bill / cap_of[key] for key, bill in bills.items() if key in cap_of and cap_of[key] > 0]
        self.record(case, trials=trials, faults=faults, leaked=sum(len(v) for v in left.values()),
                    worst=max(fractions, default=Decimal(0)))
        assert left == {}, f"{case}: left running after {timeout:.0f} s: {left}"
        assert set(bills) <= set(cap_of), f"{case}: instances no job accounts for: {set(bills) - set(cap_of)}"
        over = {key: (bill, cap_of[key]) for key, bill in bills.items() if bill > cap_of[key]}
        assert over == {}, f"{case}: billed above the cap (bill, cap): {over}"
        return bills
