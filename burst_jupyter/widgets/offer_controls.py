"""The offer browser's live controls (ipywidgets): the filter, sort and Refresh; the status, table and error panes;
the offer choice with Launch; and the chosen offer's ``%%burst`` cell with a Copy button that works in the browser
alone, without the kernel.

The browser (:mod:`burst_jupyter.widgets.offer_browser`) wires their events and writes its state into them; this
module only builds them, reads the filter they show and shows one. ipywidgets is imported when they are built,
never at module level: ``%load_ext burst_jupyter`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from html import escape
from typing import Any

from burst_jupyter.spec import MAX_GPUS
from burst_jupyter.widgets.offer_table import SORT_KEYS, OfferFilter, OfferRow, one_line
from burst_jupyter.widgets.render import no_math

__all__ = ["OfferControls", "cell_html"]

_NO_CHOICE = -1  # the offer dropdown's "nothing chosen" value (None would blank the dropdown instead)
_NO_CHOICE_LABEL = "— choose an offer —"
_ALL = "all"
_COPY_HINT = "Copy, then paste it into a new cell: a click in a widget cannot add a cell in JupyterLab or Notebook 7"
_COPIED = "copied: paste it into a new cell (Ctrl+V, or ⌘V on a Mac)"
_NOT_COPIED = "this browser did not allow copying: the text is selected, press Ctrl+C (⌘C)"
# Runs in the browser on a click, without the kernel (which may be busy running a cell): the clipboard API where
# the page is a secure context (https, localhost), else the older execCommand("copy") on the selected text. It
# says itself whether the copy happened; the kernel never learns of the click and claims nothing.
_COPY_JS = (
    "(function(b){var box=b.closest('.burst-cell'),t=box.querySelector('textarea'),"
    "n=box.querySelector('.burst-cell-note');"
    f"function said(ok){{n.textContent=ok?{json.dumps(_COPIED)}:{json.dumps(_NOT_COPIED)};"
    "n.dataset.copied=ok?'yes':'no';if(!ok){t.focus();t.select();}}"
    "function old(){t.focus();t.select();var ok=false;try{ok=document.execCommand('copy');}catch(e){}said(ok);}"
    "if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(t.value)"
    ".then(function(){said(true);},old);}else{old();}})(this)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class OfferControls:
    """Every widget of one browser, built by :meth:`build` and laid out by :meth:`layout`."""

    gpu: Any
    gpus: Any
    max_price: Any
    provider: Any
    min_reliability: Any
    spot: Any
    prototyping: Any
    sort: Any
    refresh: Any
    status: Any
    table: Any
    errors: Any
    choice: Any
    launch: Any
    cell: Any

    @classmethod
    def build(
        cls,
        f: OfferFilter,
        *,
        sort_key: str,
        gpu_choices: Sequence[str],
        providers: Sequence[str],
        launchable: bool,
    ) -> OfferControls:
        """The widgets showing filter ``f`` and ``sort_key``, with no offers yet; Launch hidden unless
        ``launchable``. Raises ImportError without ipywidgets."""
        import ipywidgets as w  # lazy: keeps `import burst_jupyter` and %load_ext free of ipywidgets

        wide = {"description_width": "initial"}
        return cls(
            gpu=w.Combobox(
                description="GPU",
                options=gpu_choices,
                value=f.gpu or "",
                placeholder="any",
                ensure_option=False,
                continuous_update=False,
                style=wide,
                layout=w.Layout(width="14em"),
            ),
            gpus=w.BoundedIntText(
                description="GPUs", value=f.gpus, min=1, max=MAX_GPUS, style=wide, layout=w.Layout(width="7em")
            ),
            max_price=w.Text(
                description="max $/h",
                value="" if f.max_price is None else f"{f.max_price:f}",
                placeholder="any",
                continuous_update=False,
                style=wide,
                layout=w.Layout(width="10em"),
            ),
            provider=w.Dropdown(
                description="provider",
                options=[_ALL, *providers],
                value=f.provider or _ALL,
                style=wide,
                layout=w.Layout(width="12em"),
            ),
            min_reliability=w.FloatSlider(
                description="min reliability",
                value=f.min_reliability or 0.0,
                min=0.0,
                max=1.0,
                step=0.01,
                readout_format=".0%",
                continuous_update=False,
                style=wide,
            ),
            spot=w.Checkbox(description="spot", value=f.spot, indent=False, layout=w.Layout(width="5em")),
            prototyping=w.Checkbox(description="prototyping", value=f.prototyping, indent=False,
                                   layout=w.Layout(width="8em"),
                                   tooltip="also development capacity: cheaper, with limits its offers state"),
            sort=w.Dropdown(
                description="sort by",
                options=[(label, key) for key, label in SORT_KEYS.items()],
                value=sort_key,
                style=wide,
                layout=w.Layout(width="13em"),
            ),
            refresh=w.Button(description="Refresh", icon="refresh", tooltip="Ask every provider again"),
            status=w.HTML(),
            table=w.HTML(),
            errors=w.HTML(),
            choice=w.Dropdown(
                description="offer",
                options=[(_NO_CHOICE_LABEL, _NO_CHOICE)],
                value=_NO_CHOICE,
                style=wide,
                layout=w.Layout(width="34em"),
            ),
            launch=w.Button(
                description="Launch",
                icon="rocket",
                button_style="primary",
                tooltip="Run the given cell on the chosen offer now",
                layout=w.Layout(display=None if launchable else "none"),
            ),
            cell=w.HTML(),
        )

    def layout(self) -> Any:
        """The browser's widget: two rows of controls, the panes, the action row, the cell."""
        import ipywidgets as w

        return w.VBox(
            [
                w.HBox([self.gpu, self.gpus, self.max_price, self.provider]),
                w.HBox([self.min_reliability, self.spot, self.prototyping, self.sort, self.refresh]),
                self.status,
                self.table,
                self.errors,
                w.HBox([self.choice, self.launch]),
                self.cell,
            ]
        )

    def filters(self) -> tuple[Any, ...]:
        """The controls a filter is read from: a change to any of them asks for a new search."""
        return (self.gpu, self.gpus, self.max_price, self.provider, self.min_reliability, self.spot,
                self.prototyping)

    def all(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def read_filter(self) -> OfferFilter | str:
        """The filter the controls show, or what is wrong with them."""
        gpu = self.gpu.value.strip().upper().replace(" ", "_").replace("-", "_") or None
        price_text = self.max_price.value.strip().lstrip("$").strip()
        max_price = None
        if price_text:
            try:
                max_price = Decimal(price_text)
            except InvalidOperation:
                return f"max $/h: {one_line(price_text, 20)!r} is not a number"
            if not max_price.is_finite() or max_price <= 0:
                return f"max $/h: {one_line(price_text, 20)!r} must be more than 0"
        reliability = round(float(self.min_reliability.value), 2)
        return OfferFilter(
            gpu=gpu,
            gpus=int(self.gpus.value),
            max_price=max_price,
            provider=None if self.provider.value == _ALL else self.provider.value,
            min_reliability=reliability or None,
            spot=bool(self.spot.value),
            prototyping=bool(self.prototyping.value),
        )

    def show_filter(self, f: OfferFilter, providers: Sequence[str]) -> None:
        """Make the filter controls show ``f`` (a provider not among ``providers`` shows as all of them)."""
        self.gpu.value = f.gpu or ""
        self.gpus.value = f.gpus
        self.max_price.value = "" if f.max_price is None else f"{f.max_price:f}"
        self.provider.value = f.provider if f.provider in providers else _ALL
        self.min_reliability.value = f.min_reliability or 0.0
        self.spot.value = f.spot
        self.prototyping.value = f.prototyping

    def show_choices(self, rows: Sequence[OfferRow], chosen: int | None) -> None:
        """Offer ``rows`` in the choice dropdown, numbered from 1, with the ``chosen`` index (None: no choice)."""
        options = [(_NO_CHOICE_LABEL, _NO_CHOICE)] + [
            (f"{i + 1}. {r.provider} · {r.gpu} ×{r.gpus} · {r.price}/h · {r.offer_id}", i) for i, r in enumerate(rows)
        ]
        if tuple(self.choice.options) != tuple(options):
            self.choice.options = options
        self.choice.value = _NO_CHOICE if chosen is None else chosen


def cell_html(cell: str) -> str:
    """The ``%%burst`` cell in a read-only text box, with a Copy button that copies it in the browser alone."""
    rows = cell.count("\n") + 1
    return no_math(
        '<div class="burst-cell">'
        f'<textarea readonly rows="{rows}" spellcheck="false" style="width:100%;box-sizing:border-box;'
        f'font-family:monospace;resize:vertical">{escape(cell)}</textarea>'
        f'<button class="burst-copy jupyter-button" onclick="{escape(_COPY_JS)}">Copy %%burst cell</button> '
        f'<span class="burst-cell-note">{escape(_COPY_HINT)}</span></div>'
    )
