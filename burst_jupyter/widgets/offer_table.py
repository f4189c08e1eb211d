"""The data behind the offer browser, without any widget: the filter, sorting, display rows and the text table.

Used by the browser (burst_jupyter/widgets/offer_browser.py) and by ``burst offers`` in a terminal.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

from burst_jupyter.errors import BurstError
from burst_jupyter.money import format_rate
from burst_jupyter.widgets.render import clean_text

if TYPE_CHECKING:
    from burst_jupyter.providers.base import Offer, OfferQuery

__all__ = ["CELL_CHARS", "COLUMNS", "NUMERIC", "SORT_KEYS", "OfferFilter", "OfferRow", "error_line", "offer_key",
           "offer_rows", "one_line", "plural", "prototyping_lines", "sort_offers", "table_cell", "text_table"]

#: Sort keys and their labels: price and $/GPU-hour cheapest first, memory and reliability highest first.
SORT_KEYS: dict[str, str] = {
    "price": "price $/h",
    "gpu_price": "$/GPU-hour",
    "memory": "GPU memory",
    "reliability": "reliability",
}
#: (OfferRow field, header) in display order; the HTML table adds the description after them.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("provider", "provider"),
    ("gpu", "GPU"),
    ("gpus", "count"),
    ("price", "$/h"),
    ("gpu_price", "$/GPU-h"),
    ("memory", "GPU GB"),
    ("reliability", "reliability"),
    ("spot", "spot"),
    ("tier", "tier"),
    ("location", "location"),
    ("offer_id", "--offer"),
)
NUMERIC = frozenset({"gpus", "price", "gpu_price", "memory", "reliability"})
CELL_CHARS = 40  # remote strings (location, ids) are cut to this in the tables
REF_CHARS = 100  # an offer's --offer word is shown whole up to this, so that it can be copied as it is
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.:/+-]+")
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OfferFilter:
    """What the browser asks for. ``gpu`` is a canonical name, ``"ANY"``, or None (any machine); ``max_price`` is
    USD per hour for the whole instance; ``provider`` None means every provider.

    Example:
        >>> OfferFilter(gpu="H100", gpus=2, max_price=Decimal("6"), spot=True).to_burst_options()
        '--gpu H100 --gpus 2 --max-price 6 --spot'
    """

    gpu: str | None = None
    gpus: int = 1
    max_price: Decimal | None = None
    provider: str | None = None
    min_reliability: float | None = None
    spot: bool = False
    prototyping: bool = False  # development capacity allowed too (Thunder's prototyping mode)

    def to_burst_options(self, offer: Offer | None = None) -> str:
        """The ``%%burst`` option line for this filter, or, given an offer (one this filter chose), one that rents
        exactly it at no more than its listed price and keeps every filter that chose it:
        ``--offer REF --gpu G --max-price PRICE [--min-reliability R] [--spot] [--prototyping]``.
        """
        reliability = None if self.min_reliability is None else f"{self.min_reliability:g}"
        if offer is not None:
            parts = [
                ("--offer", offer.ref),
                ("--gpu", offer.gpu_model),
                ("--max-price", f"{offer.price_usd_per_hour:f}"),
                ("--min-reliability", reliability),
            ]
            spot, prototyping = offer.spot, offer.prototyping
        else:
            parts = [
                ("--provider", self.provider),
                ("--gpu", self.gpu),
                ("--gpus", str(self.gpus) if self.gpus != 1 else None),
                ("--max-price", None if self.max_price is None else f"{self.max_price:f}"),
                ("--min-reliability", reliability),
            ]
            spot, prototyping = self.spot, self.prototyping
        words = [f"{flag} {_token(value)}" for flag, value in parts if value is not None]
        return " ".join([*words, *(["--spot"] if spot else []), *(["--prototyping"] if prototyping else [])])

    def to_query(self) -> OfferQuery:
        """The provider-side query (``provider`` is not part of it: it picks which providers are asked)."""
        from burst_jupyter.providers.base import OfferQuery

        return OfferQuery(
            gpu_model=self.gpu,
            gpus=self.gpus,
            max_price_usd_per_hour=self.max_price,
            spot=self.spot,
            prototyping=self.prototyping,
            min_reliability=self.min_reliability,
        )

    def describe(self) -> str:
        """One short line: ``RTX_4090 ×2 · ≤ $1.50/h · vast · ≥ 95% reliable · spot``."""
        bits = [f"{self.gpu or 'any GPU'} ×{self.gpus}"]
        if self.max_price is not None:
            bits.append(f"≤ {format_rate(self.max_price)}/h")
        bits.append(self.provider or "all providers")
        if self.min_reliability is not None:
            bits.append(f"≥ {self.min_reliability:.0%} reliable")
        if self.spot:
            bits.append("spot")
        if self.prototyping:
            bits.append("prototyping allowed")
        return " · ".join(bits)


def _token(value: str) -> str:
    # Values come from the catalog and provider names, but a line must never carry `$x`/`{x}` (IPython expands
    # them in a magic's line) or an unquoted space.
    value = _WHITESPACE.sub(" ", clean_text(value)).strip().replace("$", "").replace("{", "").replace("}", "")
    return value if _SAFE_TOKEN.fullmatch(value) else shlex.quote(value)


def sort_offers(offers: Iterable[Offer], key: str = "price") -> list[Offer]:
    """Offers sorted by one of ``SORT_KEYS``: price and $/GPU-hour ascending, GPU memory and reliability
    descending (unknown memory last). The sort is stable, so ties keep the search's ranking.
    """
    if key == "price":
        return sorted(offers, key=lambda o: o.price_usd_per_hour)
    if key == "gpu_price":
        return sorted(offers, key=lambda o: o.price_per_gpu_hour)
    if key == "memory":
        return sorted(offers, key=lambda o: (o.memory_gb is None, -(o.memory_gb or 0)))
    if key == "reliability":
        return sorted(offers, key=lambda o: -o.reliability)
    raise ValueError(f"unknown sort key {key!r}; one of {', '.join(SORT_KEYS)}")


@dataclasses.dataclass(frozen=True, slots=True)
class OfferRow:
    """One offer as display strings, cleaned of control bytes but not yet HTML-escaped."""

    provider: str
    gpu: str
    gpus: str
    price: str
    gpu_price: str
    memory: str
    reliability: str
    spot: str
    tier: str  # the provider's product: RunPod's secure or community cloud, Thunder's production or prototyping
    location: str
    offer_id: str  # the offer as ``--offer`` takes it: PROVIDER:ID in one word
    description: str


def offer_rows(offers: Iterable[Offer]) -> list[OfferRow]:
    """The table rows for ``offers``, in order. Money stays Decimal until ``format_rate``."""
    return [
        OfferRow(
            provider=table_cell(o.provider),
            gpu=table_cell(o.gpu_model or "-"),
            gpus=str(o.gpus),
            price=format_rate(o.price_usd_per_hour),
            gpu_price=format_rate(o.price_per_gpu_hour),
            memory="?" if o.memory_gb is None else str(o.memory_gb),
            reliability=f"{o.reliability * 100:.1f}%",
            spot="spot" if o.spot else "",
            tier=table_cell(o.tier),
            location=table_cell(o.location),
            offer_id=one_line(o.ref, REF_CHARS),
            description=one_line(o.description, 200),
        )
        for o in offers
    ]


def prototyping_lines(offers: Iterable[Offer]) -> list[str]:
    """Each shown prototyping offer with its description, whose limits must be read wherever it is offered (the
    table itself only says ``prototyping``)."""
    return [one_line(f"{o.ref}: {o.description}", 300) for o in offers if o.prototyping]


def one_line(text: str, limit: int) -> str:
    text = _WHITESPACE.sub(" ", clean_text(text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_cell(text: str) -> str:
    return one_line(text, CELL_CHARS)


def offer_key(offer: Offer) -> tuple[str, str]:
    return offer.provider, offer.offer_id


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def error_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    line = text if isinstance(exc, BurstError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")
    return one_line(line, 300)


def text_table(rows: Sequence[OfferRow]) -> list[str]:
    widths = {f: max(len(h), *(len(getattr(r, f)) for r in rows)) for f, h in COLUMNS}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(
            cells[f].rjust(widths[f]) if f in NUMERIC else cells[f].ljust(widths[f]) for f, _ in COLUMNS
        ).rstrip()

    header = line({f: h for f, h in COLUMNS})
    return [header, *(line({f: getattr(r, f) for f, _ in COLUMNS}) for r in rows)]
