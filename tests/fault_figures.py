"""The fault ledger of the fault-injection suite (issue 4, tests/faults/): the check every case ends with, and the
figures they add up to. A pytest plugin (tests/conftest.py loads it, so the xdist controller has its hooks too).

Every case ends by checking the provider fakes (:meth:`FaultLedger.check_clouds`): nothing left running at any
fake (waited for: a detached reaper may still be at work), and every instance billed within its job's cap (a
fake's bill is its billed rate from the create call to the destroy, tests/fakes/base.py ``billed``).

The ``fault_ledger`` fixture records per case: trials, faults survived, instances leaked and the largest bill as
a fraction of its cap. The figures are printed at the end of the run. Under pytest-xdist each worker sends its
figures to the controller when it finishes (``workeroutput``), which adds them up and prints them once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from marketplaces import Markets

__all__ = ["FaultLedger", "Figures", "fault_ledger"]


@dataclass
class Figures:
    """One case's totals."""

    trials: int = 0
    faults: int = 0  # faults injected that the trials came through
    leaked: int = 0  # instances still running at a fake when the case was over
    worst: Decimal = Decimal(0)  # the largest bill / cap
    lost: int = 0  # files of the user's that the case lost or silently replaced (issue 9: must be 0)

    def add(self, other: Figures) -> None:
        self.trials += other.trials
        self.faults += other.faults
        self.leaked += other.leaked
        self.worst = max(self.worst, other.worst)
        self.lost += other.lost

    def to_json(self) -> dict[str, Any]:
        return {"trials": self.trials, "faults": self.faults, "leaked": self.leaked, "worst": str(self.worst),
                "lost": self.lost}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figures:
        return cls(int(data["trials"]), int(data["faults"]), int(data["leaked"]), Decimal(data["worst"]),
                   int(data["lost"]))


class FaultLedger:
    """Figures by case (shared by every case of the run), and the check each case ends with."""

    def __init__(self, figures: dict[str, Figures]) -> None:
        self._figures = figures

    def record(self, case: str, *, trials: int = 1, faults: int = 0, leaked: int = 0,
               worst: Decimal = Decimal(0), lost: int = 0) -> None:
        self._figures.setdefault(case, Figures()).add(Figures(trials, faults, leaked, worst, lost))

    def check_clouds(self, case: str, markets: Markets, caps: Decimal | Mapping[str, Decimal], *, faults: int,
                     trials: int = 1, timeout: float = 60.0, lost: int = 0) -> dict[str, Decimal]:
        """Wait until no fake has an instance running (up to ``timeout``), record the case, then assert that none
        leaked and that every instance's bill is within its cap. ``caps``: one cap for every instance the case
        made, or a cap per ``"provider:instance_id"`` (then every billed instance must have one).

        ``lost``: files of the user's the case found lost or silently replaced; recorded, and must be 0.

        Returns every bill, by ``"provider:instance_id"``."""
        deadline = time.monotonic() + timeout
        while markets.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = markets.leftovers()
        bills = {f"{name}:{iid}": bill for name, cloud in markets.all.items() for iid, bill in cloud.bills().items()}
        cap_of = caps if isinstance(caps, Mapping) else dict.fromkeys(bills, caps)
        fractions = [bill / cap_of[key] for key, bill in bills.items() if key in cap_of and cap_of[key] > 0]
        self.record(case, trials=trials, faults=faults, leaked=sum(len(v) for v in left.values()),
                    worst=max(fractions, default=Decimal(0)), lost=lost)
        assert lost == 0, f"{case}: {lost} file(s) of the user's lost or silently replaced"
        assert left == {}, f"{case}: left running after {timeout:.0f} s: {left}"
        assert set(bills) <= set(cap_of), f"{case}: instances no job accounts for: {set(bills) - set(cap_of)}"
        over = {key: (bill, cap_of[key]) for key, bill in bills.items() if bill > cap_of[key]}
        assert over == {}, f"{case}: billed above the cap (bill, cap): {over}"
        return bills


# -- the plugin: a fixture per test, figures gathered across xdist workers, one table at the end --------------

_OUTPUT_KEY = "burst_fault_figures"  # in xdist's workeroutput
_FIGURES = pytest.StashKey[dict[str, Figures]]()


@pytest.fixture
def fault_ledger(request: pytest.FixtureRequest) -> FaultLedger:
    return FaultLedger(request.config.stash.setdefault(_FIGURES, {}))


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if workeroutput is not None:
        figures = session.config.stash.get(_FIGURES, {})
        workeroutput[_OUTPUT_KEY] = {case: f.to_json() for case, f in figures.items()}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown (and never called) without xdist
def pytest_testnodedown(node: Any, error: object) -> None:
    sent = getattr(node, "workeroutput", {}).get(_OUTPUT_KEY, {})
    figures = node.config.stash.setdefault(_FIGURES, {})
    for case, data in sent.items():
        figures.setdefault(case, Figures()).add(Figures.from_json(data))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    figures = config.stash.get(_FIGURES, {})
    if not figures:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection (issues 4 and 9)")
    write(f"{'case':<34} {'trials':>6} {'faults survived':>15} {'leaked':>6} {'largest bill / cap':>18} "
          f"{'files lost':>10}")
    for case in sorted(figures, key=lambda c: (int(c.split()[0]), c) if c.split()[0].isdigit() else (99, c)):
        f = figures[case]
        write(f"{case:<34} {f.trials:>6} {f.faults:>15} {f.leaked:>6} {f'{f.worst * 100:.3g}%':>18} {f.lost:>10}")
