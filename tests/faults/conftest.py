"""What the fault-injection cases (issue 4) share: the check each one ends with, and the figures they add up to.

Every case ends by checking the provider fakes (:meth:`FaultLedger.check_clouds`): nothing left running at any
fake (waited for: a detached reaper may still be at work), and every instance billed within its job's cap (a
fake's bill is its billed rate from the create call to the destroy, tests/fakes/base.py ``billed``).

The ``fault_ledger`` fixture records per case: trials, faults survived, instances leaked and the largest bill as
a fraction of its cap. The figures are printed at the end of the run. Under pytest-xdist each worker sends its
figures to the controller when it finishes (``workeroutput``), which adds them up and prints them once.
"""

from __future__ import annotations

from typing import Any

import pytest
from fault_figures import FaultLedger, Figures

__all__ = ["fault_ledger"]

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
    terminalreporter.section("fault injection (issue 4)")
    write(f"{'case':<34} {'trials':>6} {'faults survived':>15} {'leaked':>6} {'largest bill / cap':>18}")
    for case in sorted(figures, key=lambda c: (int(c.split()[0]), c) if c.split()[0].isdigit() else (99, c)):
        f = figures[case]
        write(f"{case:<34} {f.trials:>6} {f.faults:>15} {f.leaked:>6} {f'{f.worst * 100:.3g}%':>18}")
