"""BudgetBars: today's and this week's spend against their caps, as two bars.

It reads any object shaped like ``BudgetSnapshot`` (duck-typed, so this module does not depend on the budget
package) and never asks the budget anything itself.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from html import escape
from typing import Any, Protocol

from burst_jupyter.widgets.render import LiveView, bar_style, html_bar, ipython_kernel_present, set_bar

__all__ = ["BudgetBars", "BudgetSnapshot", "PeriodSnapshot"]


class PeriodSnapshot(Protocol):
    """Spend in one budget period. ``fraction`` is (spent + reserved) / cap, None without a cap."""

    @property
    def period(self) -> str: ...  # "day" | "week"
    @property
    def spent(self) -> Decimal: ...
    @property
    def reserved(self) -> Decimal: ...
    @property
    def cap(self) -> Decimal | None: ...
    @property
    def fraction(self) -> float | None: ...
    @property
    def warning(self) -> bool: ...  # fraction >= 0.8
    @property
    def label(self) -> str: ...  # "Today: $12.50 / $50.00 (25%)"


class BudgetSnapshot(Protocol):
    @property
    def day(self) -> PeriodSnapshot: ...
    @property
    def week(self) -> PeriodSnapshot: ...


class BudgetBars(LiveView):
    """Two bars, today and this week: 'success' below 80 % of the cap, 'warning' from 80 %, 'danger' from 100 %.

    Without a cap a period shows its label (spent only) and an empty bar.

    Example:
        >>> bars = BudgetBars(snapshot)  # doctest: +SKIP
        >>> print(bars.snapshot_text())  # doctest: +SKIP
        Today: $12.50 / $50.00 (25%)
        This week: $87.30 / $200.00 (44%)
    """

    def __init__(
        self, snapshot: BudgetSnapshot, *, kernel_present: Callable[[], bool] = ipython_kernel_present
    ) -> None:
        super().__init__(kernel_present=kernel_present)
        self._snapshot = snapshot
        self._rows: tuple[tuple[Any, Any], ...] = ()  # (label HTML, FloatProgress) per period, once built

    @property
    def snapshot(self) -> BudgetSnapshot:
        return self._snapshot

    def update(self, snapshot: BudgetSnapshot) -> None:
        """Show ``snapshot`` instead; the widget, if built, changes in place."""
        with self._lock:
            self._snapshot = snapshot
            self._render_widget()

    def _periods(self) -> tuple[PeriodSnapshot, PeriodSnapshot]:
        return self._snapshot.day, self._snapshot.week

    def snapshot_text(self) -> str:
        with self._lock:
            return "\n".join(p.label for p in self._periods())

    def snapshot_html(self) -> str:
        with self._lock:
            rows = "".join(
                f"<div>{html_bar(p.fraction, bar_style(p.fraction))} <span>{escape(p.label)}</span></div>"
                for p in self._periods()
            )
        return f'<div class="burst-budget">{rows}</div>'

    def _build_widget(self) -> Any:
        import ipywidgets as w  # lazy: keeps `import burst_jupyter` and %load_ext free of ipywidgets

        self._rows = tuple(
            (w.HTML(), w.FloatProgress(min=0, max=100, layout=w.Layout(width="16em"))) for _ in self._periods()
        )
        return w.VBox([w.HBox([bar, label]) for label, bar in self._rows])

    def _render_widget(self) -> None:
        if not self._rows:
            return
        for (label, bar), period in zip(self._rows, self._periods(), strict=True):
            with label.hold_sync(), bar.hold_sync():
                label.value = escape(period.label)
                set_bar(bar, period.fraction, bar_style(period.fraction))
