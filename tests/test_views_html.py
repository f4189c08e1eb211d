"""Every HTML view goes out in a block MathJax skips, through IPython's own display formatter: JupyterLab,
Notebook 7 and nbconvert typeset text between two ``$`` as LaTeX, and these views are full of amounts.
tests/test_browser_tables.py shows the same in JupyterLab itself."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from burst_jupyter.budget import Budget, LedgerTable
from burst_jupyter.offer_book import ProviderLine, ProvidersStatus
from burst_jupyter.widgets import BudgetBars, JobView

NO_MATH = '<div class="mathjax_ignore tex2jax_ignore">'


def views(tmp_path: Path) -> dict[str, Any]:
    with Budget(tmp_path / "burst.sqlite3") as budget:
        budget.set_cap("day", Decimal(20))
        snapshot = budget.snapshot()
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "providers": ProvidersStatus([ProviderLine("vast", True, True, {"RTX_4090": (Decimal("0.298"), 2),
                                                                         "H100": (Decimal("2.401"), 1)})]),
        "ledger": LedgerTable([], tz=dt.timezone.utc).since(now),
        "budget bars": BudgetBars(snapshot, kernel_present=lambda: False),
        "job view": JobView(job_id="j1", name="sweep", max_cost_usd=Decimal(1), kernel_present=lambda: False),
    }


@pytest.mark.parametrize("name", ["providers", "ledger", "budget bars", "job view"])
def test_every_html_view_is_kept_from_mathjax(ip: Any, tmp_path: Path, name: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ip.display_formatter.formatters["text/html"], "enabled", True)  # as in a kernel
    bundle, _ = ip.display_formatter.format(views(tmp_path)[name])
    page = bundle["text/html"]
    assert page.startswith(NO_MATH) and page.endswith("</div>") and "$" in page, page
