"""Helpers shared by the views: money and time formatting, safe text, HTML bars, HTML kept from MathJax, and the
LiveView base.

Nothing here imports ipywidgets at module level: ``%load_ext burst_jupyter`` must stay fast, and the views must
still render as text/html and text/plain where ipywidgets is missing.
"""

from __future__ import annotations

import abc
import importlib.util
import re
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

__all__ = [
    "WIDGET_VIEW_MIMETYPE",
    "LiveView",
    "aligned_rows",
    "bar_style",
    "clean_text",
    "format_duration",
    "html_bar",
    "ipython_kernel_present",
    "no_math",
    "set_bar",
]

WIDGET_VIEW_MIMETYPE = "application/vnd.jupyter.widget-view+json"

# The colours JupyterLab uses for FloatProgress bar_style, so the HTML snapshot looks like the live widget.
_BAR_COLOURS = {"": "#2196f3", "success": "#4caf50", "info": "#00bcd4", "warning": "#ff9800", "danger": "#f44336"}
_WARN_FRACTION = 0.8

# The class each MathJax skips, with all it holds: 3's default (JupyterLab 4, Notebook 7), then 2's (nbconvert's
# classic template). Both typeset text between two `$` in any HTML output as LaTeX (seen in JupyterLab 4 on
# 2026-12-06: "$0.19/hr (1 offers), lowest RTX_4090 = $" became a formula), and every money view holds several.
_NO_MATH_CLASSES = "mathjax_ignore tex2jax_ignore"
# CSI sequences (colours, cursor moves) and OSC strings (window titles, hyperlinks) first, so a coloured line
# keeps its text and a link its label, then any other control byte.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def aligned_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table: each column padded to its widest cell, two spaces between, no trailing blanks."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_duration(seconds: float) -> str:
    """H:MM:SS, like ``datetime.timedelta`` without the microseconds.

    Example:
        >>> format_duration(3725.9)
        '1:02:05'
    """
    whole = max(int(seconds), 0)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def clean_text(text: str) -> str:
    """Remote text without terminal escapes or control bytes (tabs and newlines stay).

    Remote output is untrusted: an escape sequence could rewrite the user's terminal, so it is dropped before
    any view shows it. HTML escaping is separate and happens where HTML is built.
    """
    return _CONTROL.sub("", _ANSI.sub("", text))


def no_math(html: str) -> str:
    """``html`` in a block MathJax leaves alone, so ``$`` amounts show as written. Every view's HTML goes out
    through this (LiveView does it for its subclasses).

    Example:
        >>> no_math("<b>$0.35 of $1.00</b>")
        '<div class="mathjax_ignore tex2jax_ignore"><b>$0.35 of $1.00</b></div>'
    """
    return f'<div class="{_NO_MATH_CLASSES}">{html}</div>'


def bar_style(fraction: float | None) -> str:
    """'success' below 80 %, 'warning' from 80 %, 'danger' from 100 %; '' when there is no cap to compare with."""
    if fraction is None:
        return ""
    if fraction >= 1:
        return "danger"
    return "warning" if fraction >= _WARN_FRACTION else "success"


def html_bar(fraction: float | None, style: str) -> str:
    """A progress bar in plain HTML/CSS for frontends without widgets (nbconvert, GitHub); no fill when None."""
    width = 0.0 if fraction is None else min(max(fraction, 0.0), 1.0) * 100
    return (
        '<div style="display:inline-block;vertical-align:middle;width:12em;height:0.8em;'
        'background:#e0e0e0;border-radius:2px;overflow:hidden">'
        f'<div style="width:{width:.1f}%;height:100%;background:{_BAR_COLOURS[style]}"></div></div>'
    )


def set_bar(bar: Any, fraction: float | None, style: str) -> None:
    """Point a 0..100 ``FloatProgress`` at ``fraction`` (clipped, so an overrun shows a full bar)."""
    bar.value = 0.0 if fraction is None else min(max(fraction, 0.0), 1.0) * 100
    bar.bar_style = style


def ipython_kernel_present() -> bool:
    """True inside a Jupyter kernel; false in terminal IPython and plain Python, where no frontend draws widgets."""
    from IPython import get_ipython  # lazy: plain-Python users of the views never pay for IPython

    return getattr(get_ipython(), "kernel", None) is not None


def _ipywidgets_importable() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


class LiveView(abc.ABC):
    """A display object that is a live widget in a kernel and an HTML/text snapshot everywhere else.

    Subclasses render their state three ways (``snapshot_text``, ``snapshot_html``, ``_build_widget`` plus
    ``_render_widget``). State changes and widget writes happen under one lock: updates come from the runner's
    loop thread while IPython calls ``_repr_mimebundle_`` from the main thread, and ``Widget.hold_sync`` is not
    thread-safe.
    """

    def __init__(self, *, kernel_present: Callable[[], bool]) -> None:
        self._lock = threading.RLock()
        self._kernel_present = kernel_present
        self._widget: Any = None

    @abc.abstractmethod
    def snapshot_text(self) -> str:
        """The current state as plain text (terminal IPython, logs)."""

    @abc.abstractmethod
    def snapshot_html(self) -> str:
        """The current state as self-contained HTML, every remote string escaped."""

    @abc.abstractmethod
    def _build_widget(self) -> Any:
        """Create the ipywidgets tree (import ipywidgets here, not at module level)."""

    @abc.abstractmethod
    def _render_widget(self) -> None:
        """Write the current state into the widget's traits."""

    @property
    def widget(self) -> Any:
        """The ipywidgets container, built on first access. Raises ImportError without ipywidgets."""
        with self._lock:
            if self._widget is None:
                self._widget = self._build_widget()
                self._render_widget()
            return self._widget

    def close(self) -> None:
        """Close every widget this view opened (they stay in ipywidgets' registry until closed)."""
        with self._lock:
            if self._widget is not None:
                for widget in _descendants(self._widget):
                    widget.close()
                self._widget = None

    def __repr__(self) -> str:
        # print(view) and terminal IPython read the same text as the text/plain snapshot (tqdm does this too).
        return self.snapshot_text()

    def _repr_mimebundle_(
        self, include: Collection[str] | None = None, exclude: Collection[str] | None = None
    ) -> dict[str, Any]:
        def wanted(mimetype: str) -> bool:
            return (include is None or mimetype in include) and (exclude is None or mimetype not in exclude)

        with self._lock:
            bundle: dict[str, Any] = {}
            if wanted(WIDGET_VIEW_MIMETYPE) and self._kernel_present() and _ipywidgets_importable():
                # The same payload ipywidgets' own Widget._repr_mimebundle_ returns (protocol 2.0).
                bundle[WIDGET_VIEW_MIMETYPE] = {
                    "version_major": 2,
                    "version_minor": 0,
                    "model_id": self.widget.model_id,
                }
            # Always send snapshots too: nbconvert drops the widget view when no widget state was saved, and
            # terminal IPython only shows text/plain.
            if wanted("text/html"):
                bundle["text/html"] = no_math(self.snapshot_html())
            if wanted("text/plain"):
                bundle["text/plain"] = self.snapshot_text()
            return bundle


def _descendants(widget: Any) -> Iterator[Any]:
    yield widget
    for extra in ("layout", "style"):
        if getattr(widget, extra, None) is not None:
            yield getattr(widget, extra)
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)
