"""Live offers across providers: ask every configured provider at once, keep what fits, rank, cache briefly.

The ranking is the whole policy of ``--provider auto``: the cheapest offer that fits; equal prices go to the more
reliable provider (``prefer``, by default the order the providers declare: RunPod > Thunder > Vast, as the seed's
job-completion ranking has it), then
to the higher reliability score. Offers are cached per (provider, query) for a short TTL: the price truth
decays in minutes, and a notebook re-running a cell should not pay a search round trip each time.

An offer whose instance billed another rate than its quote (:meth:`OfferBook.misquote`) is left out of every
later search of the session, and each search says so (``SearchResult.left_out``).

A provider that fails (unreachable, rate limited, bad key) does not fail the search: its error is reported next
to the offers of the others, and the job view and ``%burst providers`` show it. Each provider's answer is awaited
at most ``timeout`` seconds (an interactive search; the providers' own connect and read timeouts are shorter,
providers/_http.py), and a provider that just failed is not asked again for ``quiet`` seconds: searches in that
while show it as failing, with its last error, and the others answer at once (issue 10: a provider that accepted
the connection and never answered cost 30 s on every search).
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from .errors import BurstError, one_line
from .money import format_rate
from .providers import preference as declared_preference

if TYPE_CHECKING:
    from .providers.base import Offer, OfferQuery, Provider

__all__ = ["COMMON_GPUS", "OfferBook", "ProvidersStatus", "SearchResult", "rank"]


def rank(offers: Iterable[Offer], preference: Sequence[str] | None = None) -> list[Offer]:
    """Cheapest first; ties to the preferred provider (None: as declared), then the more reliable offer."""
    order = {name: i for i, name in enumerate(declared_preference() if preference is None else preference)}
    return sorted(offers, key=lambda o: (o.price_usd_per_hour, order.get(o.provider, len(order)), -o.reliability))


@dataclass
class SearchResult:
    offers: list[Offer]  # ranked, every one fits the query
    errors: dict[str, str] = field(default_factory=dict)  # provider -> one line
    seconds: dict[str, float] = field(default_factory=dict)  # provider -> how long its answer took (0: cached)
    elapsed: float = 0.0
    left_out: list[str] = field(default_factory=list)  # fitting offers not shown, one line each: why

    @property
    def best(self) -> Offer | None:
        return self.offers[0] if self.offers else None

    def by_provider(self, name: str) -> list[Offer]:
        return [o for o in self.offers if o.provider == name]


@dataclass
class _Entry:
    at: float
    offers: list[Offer]


@dataclass(frozen=True)
class _Failure:
    at: float
    error: str


class OfferBook:
    """Searches providers concurrently. Thread-safe enough for one event loop (the session's)."""

    def __init__(self, *, ttl: float = 30.0, preference: Sequence[str] | None = None,
                 timeout: float = 10.0, quiet: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.preference = tuple(declared_preference() if preference is None else preference)
        self.timeout = timeout
        self.quiet = quiet
        self._clock = clock
        self._cache: dict[tuple[str, OfferQuery], _Entry] = {}
        self._failed: dict[str, _Failure] = {}  # provider -> its last failure, while it is not asked
        self._misquoted: dict[tuple[str, str, int, bool], str] = {}  # offer -> why it is not offered again

    async def search(self, providers: Mapping[str, Provider], query: OfferQuery, *,
                     refresh: bool = False) -> SearchResult:
        t0 = self._clock()
        result = SearchResult(offers=[])
        answers = await asyncio.gather(*(self._one(name, p, query, refresh) for name, p in providers.items()))
        found: list[Offer] = []
        for name, (offers, error, seconds) in zip(providers, answers, strict=True):
            result.seconds[name] = seconds
            if error is not None:
                result.errors[name] = error
            for offer in offers:
                why = self._misquoted.get(_identity(offer))
                if why is not None and query.fits(offer):
                    result.left_out.append(f"{offer.ref} left out for this session: {why}")
                elif query.fits(offer):
                    found.append(offer)
        result.offers = rank(found, self.preference)
        result.elapsed = self._clock() - t0
        return result

    def misquote(self, offer: Offer, why: str) -> None:
        """An offer whose instance billed another rate than it quoted (``why``: both figures): no search of this
        session offers it again, as long as the provider lists it."""
        self._misquoted[_identity(offer)] = why

    async def _one(self, name: str, provider: Provider, query: OfferQuery,
                   refresh: bool) -> tuple[list[Offer], str | None, float]:
        key = (name, query)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and not refresh and now - entry.at <= self.ttl:
            return entry.offers, None, 0.0
        failed = self._failed.get(name)
        if failed is not None and now - failed.at < self.quiet:  # a refresh too: it would wait on it again
            again = self.quiet - (now - failed.at)
            return [], f"{failed.error}; not asked again for {again:.0f} s", 0.0
        try:
            offers = await asyncio.wait_for(provider.offers(query), self.timeout)
        except asyncio.TimeoutError:
            return [], self._failing(name, f"no answer within {self.timeout:.0f} s"), self._clock() - now
        except Exception as exc:  # one provider's failure (even a bug in its parser) must not hide the others
            text = one_line(exc, about=name)  # keyed by provider: each view names it once
            if not isinstance(exc, (BurstError, OSError)):
                text = f"{type(exc).__name__}: {text}"
            return [], self._failing(name, text), self._clock() - now
        self._failed.pop(name, None)
        self._cache[key] = _Entry(self._clock(), offers)
        return offers, None, self._clock() - now

    def _failing(self, name: str, error: str) -> str:
        self._failed[name] = _Failure(self._clock(), error)
        return error


def _identity(offer: Offer) -> tuple[str, str, int, bool]:
    return offer.provider, offer.offer_id, offer.gpus, offer.spot


#: The GPUs ``%burst providers`` prices for each provider (the ones researchers rent most; seeds/000).
COMMON_GPUS = ("RTX_3090", "RTX_4090", "A100_80GB", "H100")


@dataclass(frozen=True)
class ProviderLine:
    name: str
    configured: bool
    reachable: bool | None  # None: not asked (not configured)
    lowest: dict[str, tuple[Decimal, int]]  # canonical GPU -> (lowest $/h, offers)
    note: str = ""

    def describe(self) -> str:
        if not self.configured:
            return f"{self.name}: not configured ({self.note})"
        if not self.reachable:
            return f"{self.name}: not answering: {self.note}"
        from .widgets.offer_table import plural

        prices = ", ".join(f"lowest {gpu} = {format_rate(price)}/hr ({plural(count, 'offer')})"
                           for gpu, (price, count) in self.lowest.items())
        return f"{self.name}: available, {prices or 'no offers for ' + ', '.join(COMMON_GPUS)}"


@dataclass(frozen=True)
class ProvidersStatus:
    """``%burst providers`` / ``burst providers status``: configured, reachable, lowest price per common GPU."""

    lines: list[ProviderLine]

    @classmethod
    def from_search(cls, result: SearchResult, *, configured: Sequence[str],
                    missing: Mapping[str, str]) -> ProvidersStatus:
        lines = []
        for name in configured:
            lowest: dict[str, tuple[Decimal, int]] = {}
            for gpu in COMMON_GPUS:
                mine = [o for o in result.by_provider(name) if o.gpu_model == gpu and o.gpus == 1]
                if mine:
                    lowest[gpu] = (min(o.price_usd_per_hour for o in mine), len(mine))
            error = result.errors.get(name)
            lines.append(ProviderLine(name, True, error is None, lowest, error or ""))
        lines += [ProviderLine(name, False, None, {}, hint) for name, hint in missing.items()]
        return cls(lines)

    def __repr__(self) -> str:
        return "\n".join(line.describe() for line in self.lines)

    def _repr_html_(self) -> str:
        from .widgets.render import no_math

        rows = "".join(f"<tr><td>{html.escape(line.name)}</td><td>{html.escape(line.describe().split(': ', 1)[1])}"
                       "</td></tr>" for line in self.lines)
        return no_math(f"<table><tr><th>provider</th><th>status</th></tr>{rows}</table>")
