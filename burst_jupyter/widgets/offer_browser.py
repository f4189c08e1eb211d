"""OfferBrowser: live GPU offers across providers, filtered, sorted, and turned into a ``%%burst`` cell or a launch.

It only renders: the caller injects ``search(filter, refresh)`` (blocking; the caller runs it on its own loop),
and optionally ``on_launch(offer)`` and ``on_insert(cell_text)``. It never imports a provider or the session.

The cell for the chosen offer is shown with a Copy button that works in the browser alone. A widget click cannot
add a cell: the kernel's ``set_next_input`` rides on an execute reply, and a click is a comm message, which has
none, so JupyterLab and Notebook 7 drop it (jupyterlab#8893, #13080: adding cells from a widget needs a front-end
extension such as ipylab). ``insert()`` run in a cell does add one, below that cell.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from burst_jupyter.offer_book import SearchResult
from burst_jupyter.widgets.offer_controls import OfferControls, cell_html
from burst_jupyter.widgets.offer_table import (
    COLUMNS,
    NUMERIC,
    SORT_KEYS,
    OfferFilter,
    error_line,
    offer_key,
    offer_rows,
    one_line,
    plural,
    prototyping_lines,
    sort_offers,
    table_cell,
    text_table,
)
from burst_jupyter.widgets.render import LiveView, ipython_kernel_present, no_math

if TYPE_CHECKING:
    from burst_jupyter.providers.base import Offer

__all__ = ["OfferBrowser"]


class OfferBrowser(LiveView):
    """Live offers: filter controls, a sortable table, per-provider errors, and the ``%%burst`` cell for a chosen
    offer (copied in one click) or Launch.

    ``search(filter, refresh)`` blocks until the offers are in; ``refresh=True`` bypasses the offer cache. It is
    called once by the constructor (unless ``result`` is given), on every filter change with ``refresh=False``
    and by Refresh with ``refresh=True``. A search that raises shows as the status line and never propagates.
    ``on_insert(cell_text)`` gets the ``%%burst`` cell for the chosen offer (or the filter when none is chosen)
    when code calls ``insert()``; ``on_launch(offer)`` gets the chosen offer and should return promptly (start the
    job, do not wait for it). Without ``on_launch`` there is no Launch button.
    Without a kernel, or without ipywidgets, the browser shows as an HTML table and a fixed-width text table.

    Example:
        >>> flt = OfferFilter(gpu="RTX_4090")
        >>> browser = OfferBrowser(search=search, initial=flt, providers=["vast", "runpod"])  # doctest: +SKIP
        >>> print(browser)  # doctest: +SKIP
        2 offers from 1 of 2 providers in 0.42 s · RTX_4090 ×1 · all providers
        provider  GPU       count    $/h  $/GPU-h  GPU GB  reliability  spot  tier  location    --offer
        vast      RTX_4090      1  $0.35    $0.35      24        99.0%              Quebec, CA  vast:4242
        vast      RTX_4090      2  $0.80    $0.40      24        97.5%              US          vast:5151:x2
        errors:
          runpod: rate limited (429)
    """

    def __init__(
        self,
        *,
        search: Callable[[OfferFilter, bool], SearchResult],
        initial: OfferFilter,
        providers: Sequence[str],
        on_launch: Callable[[Offer], object] | None = None,
        on_insert: Callable[[str], None] | None = None,
        result: SearchResult | None = None,
        gpu_choices: Sequence[str] = (),
        max_rows: int = 50,
        kernel_present: Callable[[], bool] = ipython_kernel_present,
    ) -> None:
        super().__init__(kernel_present=kernel_present)
        self._search = search
        self._providers = tuple(providers)
        self._gpu_choices = tuple(dict.fromkeys(["ANY", *gpu_choices]))
        self._on_launch = on_launch
        self._on_insert = on_insert
        self._max_rows = max_rows
        self._filter = initial
        self._result = result if result is not None else SearchResult(offers=[])
        self._sort_key = "price"
        self._selected: tuple[str, str] | None = None
        self._message: str | None = None  # the last action's outcome ("inserted …", "launch failed: …")
        self._message_failed = False
        self._error: str | None = None  # the last search's exception
        self._busy = False
        self._generation = 0
        self._syncing = False  # true while the view writes its own controls: their observers must not search
        self._parts: OfferControls | None = None
        self._shown_cell: str | None = None
        if result is None:
            self._run_search(initial, refresh=False)

    # --- state and actions (the widget's buttons call these; so can code) ----------------------------------------

    @property
    def filter(self) -> OfferFilter:
        return self._filter

    @property
    def result(self) -> SearchResult:
        return self._result

    @property
    def sort_key(self) -> str:
        return self._sort_key

    @property
    def error(self) -> str | None:
        """The last search's failure, one line; None once a search succeeds."""
        return self._error

    @property
    def offers(self) -> list[Offer]:
        """The shown offers, in display order (at most ``max_rows``)."""
        with self._lock:
            return sort_offers(self._result.offers, self._sort_key)[: self._max_rows]

    @property
    def selected(self) -> Offer | None:
        with self._lock:
            return next((o for o in self.offers if offer_key(o) == self._selected), None)

    def update_filter(self, new: OfferFilter) -> None:
        """Search again with ``new`` (from the cache: ``refresh=False``); the controls follow."""
        self._run_search(new, refresh=False)

    def refresh(self) -> None:
        """Search again with the current filter, bypassing the cache."""
        self._run_search(self._filter, refresh=True)

    def sort_by(self, key: str) -> None:
        if key not in SORT_KEYS:
            raise ValueError(f"unknown sort key {key!r}; one of {', '.join(SORT_KEYS)}")
        with self._lock:
            self._sort_key = key
            self._render_widget()

    def select(self, offer: Offer | None) -> None:
        """Choose ``offer`` (one of ``offers``) for Insert and Launch; None clears the choice."""
        with self._lock:
            self._selected = None if offer is None else offer_key(offer)
            self._render_widget()

    def cell_text(self) -> str:
        """The ``%%burst`` cell for the chosen offer: the option line, then a comment naming what was chosen."""
        offer = self.selected
        if offer is None:
            comment = f"# the cheapest offer that fits when the cell runs ({self._filter.describe()})"
        else:
            row = offer_rows([offer])[0]
            where = f", {row.location}" if row.location else ""
            comment = (
                f"# {row.gpu} ×{row.gpus} on {row.provider}, {row.price}/h when listed (offer {row.offer_id}{where})"
            )
        return f"%%burst {self._filter.to_burst_options(offer)}\n{comment}\n"

    def insert(self) -> None:
        """Hand ``cell_text()`` to ``on_insert`` (in a notebook: a new cell below the cell that runs this); a
        failure shows in the status line."""
        on_insert = self._on_insert
        if on_insert is None:
            return
        text = self.cell_text()
        self._act(lambda: on_insert(text), "inserted a %%burst cell below the cell that ran insert()", "insert")

    def launch(self) -> None:
        """Hand the chosen offer to ``on_launch``; nothing without a choice. A failure shows in the status line."""
        offer = self.selected
        if self._on_launch is None or offer is None:
            return
        on_launch = self._on_launch
        row = offer_rows([offer])[0]
        self._act(
            lambda: on_launch(offer), f"launching {row.gpu} ×{row.gpus} on {row.provider} at {row.price}/h", "launch"
        )

    def _act(self, call: Callable[[], object], done: str, what: str) -> None:
        try:
            call()
        except Exception as exc:  # a widget callback must never raise into the kernel's comm handler
            self._note(f"{what} failed: {error_line(exc)}", failed=True)
        else:
            self._note(done, failed=False)

    def _note(self, message: str | None, *, failed: bool) -> None:
        with self._lock:
            self._message, self._message_failed = message, failed
            self._render_widget()

    def _run_search(self, new: OfferFilter, *, refresh: bool) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._filter = new
            self._busy = True
            self._error = None
            self._message = None
            self._write_controls()
            self._render_widget()
        # Not under the lock: the search blocks for seconds, and displaying the view must not wait for it.
        try:
            result = self._search(new, refresh)
        except Exception as exc:  # shown, never raised: this runs inside widget callbacks
            with self._lock:
                if generation == self._generation:
                    self._busy = False
                    self._error = error_line(exc)
                    self._render_widget()
            return
        with self._lock:
            if generation != self._generation:
                return  # a newer search started meanwhile; its answer is the one to show
            self._busy = False
            self._error = None
            self._result = result
            if self.selected is None:
                self._selected = None
            self._render_widget()

    # --- text and HTML --------------------------------------------------------------------------------------------

    def _status(self) -> str:
        if self._busy:
            return f"searching… · {self._filter.describe()}"
        r = self._result
        asked = len(set(r.seconds) | set(r.errors) | {o.provider for o in r.offers})
        found = len({o.provider for o in r.offers})
        source = plural(found, "provider") if found == asked else f"{found} of {plural(asked, 'provider')}"
        cached = " (cached)" if r.seconds and not any(r.seconds.values()) else ""
        line = f"{plural(len(r.offers), 'offer')} from {source} in {r.elapsed:.2f} s{cached}"
        return f"{line} · {self._filter.describe()}"

    def _notes(self) -> list[tuple[str, bool]]:
        """(line, is a failure) for the last search's error, the offers it left out, and the last action's outcome."""
        notes = []
        if self._error is not None:
            notes.append((f"search failed: {self._error}", True))
        notes.extend((one_line(line, 300), False) for line in self._result.left_out)
        if self._message is not None:
            notes.append((self._message, self._message_failed))
        return notes

    def _errors(self) -> list[str]:
        return [f"{table_cell(name)}: {one_line(line, 300)}" for name, line in sorted(self._result.errors.items())]

    def _more(self) -> str | None:
        hidden = len(self._result.offers) - self._max_rows
        return f"… and {hidden} more; narrow the filter to see them" if hidden > 0 else None

    def snapshot_text(self) -> str:
        with self._lock:
            lines = [self._status(), *(note for note, _ in self._notes())]
            rows = offer_rows(self.offers)
            if rows:
                lines.extend(text_table(rows))
                lines.extend(f"  {line}" for line in prototyping_lines(self.offers))
                more = self._more()
                if more:
                    lines.append(more)
            else:
                lines.append("no offers fit")
            errors = self._errors()
        if errors:
            lines.append("errors:")
            lines.extend(f"  {e}" for e in errors)
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.snapshot_text())

    def _repr_html_(self) -> str:
        return no_math(self.snapshot_html())  # as the mimebundle sends it

    def snapshot_html(self) -> str:
        with self._lock:
            status = escape(self._status())
            notes = self._notes_html()
            table = self._table_html()
            errors = self._errors_html()
        return f'<div class="burst-offers"><div>{status}</div>{notes}{table}{errors}</div>'

    def _notes_html(self) -> str:
        return "".join(
            f'<div style="color:{"#c62828" if failed else "inherit"}">{escape(note)}</div>'
            for note, failed in self._notes()
        )

    def _table_html(self) -> str:
        offers = self.offers
        if not offers:
            return "<div><i>no offers fit</i></div>"
        head = "".join(f'<th style="text-align:left;padding:0 0.6em">{escape(h)}</th>' for _, h in COLUMNS)
        body = []
        for offer, row in zip(offers, offer_rows(offers), strict=True):
            # The provider's description is on hover: as a column it made the table wider than the output.
            mark = ' style="background:#e3f2fd"' if offer_key(offer) == self._selected else ""
            cells = "".join(
                f'<td style="text-align:{"right" if f in NUMERIC else "left"};padding:0 0.6em;white-space:nowrap">'
                f"{escape(getattr(row, f))}</td>"
                for f, _ in COLUMNS
            )
            body.append(f'<tr title="{escape(row.description)}"{mark}>{cells}</tr>')
        more = self._more()
        tail = "".join(f"<div>{escape(line)}</div>" for line in prototyping_lines(offers))
        tail += f"<div><i>{escape(more)}</i></div>" if more else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{tail}"

    def _errors_html(self) -> str:
        return "".join(f'<div style="color:#c62828">{escape(e)}</div>' for e in self._errors())

    # --- the live widget ------------------------------------------------------------------------------------------

    def _build_widget(self) -> Any:
        p = self._parts = OfferControls.build(
            self._filter,
            sort_key=self._sort_key,
            gpu_choices=self._gpu_choices,
            providers=self._providers,
            launchable=self._on_launch is not None,
        )
        for control in p.filters():
            control.observe(self._on_filter_change, names="value")
        p.sort.observe(self._on_sort_change, names="value")
        p.choice.observe(self._on_choice_change, names="value")
        p.refresh.on_click(lambda _b: self.refresh())
        p.launch.on_click(lambda _b: self.launch())
        return p.layout()

    def _on_filter_change(self, _change: Any) -> None:
        if self._syncing:
            return
        try:
            assert self._parts is not None  # the controls call this: they are built
            new = self._parts.read_filter()
        except Exception as exc:  # a widget callback must never raise into the kernel's comm handler
            new = f"filter: {error_line(exc)}"
        if isinstance(new, str):
            self._note(f"not searched: {new}", failed=True)
        elif new != self._filter:
            self.update_filter(new)

    def _on_sort_change(self, change: Any) -> None:
        if not self._syncing and change.new in SORT_KEYS:
            self.sort_by(change.new)

    def _on_choice_change(self, change: Any) -> None:
        if self._syncing:
            return
        offers = self.offers
        index = change.new
        self.select(offers[index] if isinstance(index, int) and 0 <= index < len(offers) else None)

    @contextlib.contextmanager
    def _writing_controls(self) -> Iterator[None]:
        self._syncing, before = True, self._syncing
        try:
            yield
        finally:
            self._syncing = before

    def _write_controls(self) -> None:
        """Make the filter controls show ``self._filter`` (after ``update_filter`` from code)."""
        p = self._parts
        if p is None or p.read_filter() == self._filter:
            return
        with self._writing_controls():
            p.show_filter(self._filter, self._providers)

    def _render_widget(self) -> None:
        p = self._parts
        if p is None:
            return
        offers = self.offers
        selected = self.selected
        keys = [offer_key(o) for o in offers]
        choice = keys.index(self._selected) if selected is not None and self._selected in keys else None
        rows = offer_rows(offers)
        with contextlib.ExitStack() as stack, self._writing_controls():
            for part in p.all():
                stack.enter_context(part.hold_sync())
            colour = "#c62828" if self._error else "inherit"
            p.status.value = no_math(
                f'<span style="color:{colour}">{escape(self._status())}</span>{self._notes_html()}'
            )
            p.table.value = no_math(self._table_html())
            p.errors.value = self._errors_html()
            cell = self.cell_text()
            if cell != self._shown_cell:  # a new value would also wipe the browser's "copied" note
                self._shown_cell = cell
                p.cell.value = cell_html(cell)
            p.sort.value = self._sort_key
            p.show_choices(rows, choice)
            p.refresh.disabled = self._busy
            p.launch.disabled = self._on_launch is None or selected is None
