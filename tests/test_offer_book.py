"""The offer search across providers: ranking, ties, the TTL cache, a failing provider, a misquoted offer."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from burst_jupyter.errors import RateLimited
from burst_jupyter.offer_book import OfferBook, rank
from burst_jupyter.providers.base import Offer, OfferQuery


def offer(provider: str, price: str, *, rel: float = 0.99, oid: str = "1", gpu: str = "RTX_4090") -> Offer:
    return Offer(provider=provider, offer_id=oid, gpu_model=gpu, gpus=1, price_usd_per_hour=Decimal(price),
                 memory_gb=24, reliability=rel)


class Shelf:
    """A provider stand-in that holds its offers and counts the searches it answered."""

    def __init__(self, name: str, offers: list[Offer], *, fail: BaseException | None = None) -> None:
        self.name, self.stock, self.fail, self.asked = name, offers, fail, 0

    async def offers(self, query: OfferQuery) -> list[Offer]:
        self.asked += 1
        if self.fail is not None:
            raise self.fail
        return list(self.stock)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cheapest_first_then_the_preferred_provider_then_reliability() -> None:
    offers = [offer("vast", "0.30", rel=0.999), offer("runpod", "0.30", rel=0.9), offer("thunder", "0.29"),
              offer("vast", "0.30", rel=0.95, oid="2")]
    ranked = rank(offers, ("runpod", "thunder", "vast"))
    assert [(o.provider, o.offer_id) for o in ranked] == [("thunder", "1"), ("runpod", "1"), ("vast", "1"),
                                                         ("vast", "2")]
    assert rank(offers, ("vast", "runpod"))[1].provider == "vast"  # the preference is configurable


def test_offers_that_do_not_fit_are_dropped_whatever_the_provider_sent() -> None:
    shelf = Shelf("vast", [offer("vast", "0.30"), offer("vast", "0.90", oid="2"), offer("vast", "0.2", gpu="H100")])
    result = asyncio.run(OfferBook().search({"vast": shelf}, OfferQuery(gpu_model="RTX_4090",
                                                                       max_price_usd_per_hour=Decimal("0.5"))))
    assert [o.offer_id for o in result.offers] == ["1"]


def test_answers_are_reused_within_the_ttl_and_refreshed_after() -> None:
    clock = Clock()
    shelf = Shelf("vast", [offer("vast", "0.30")])
    book = OfferBook(ttl=30, clock=clock)
    query = OfferQuery(gpu_model="RTX_4090")
    asyncio.run(book.search({"vast": shelf}, query))
    clock.now = 29
    again = asyncio.run(book.search({"vast": shelf}, query))
    assert shelf.asked == 1 and again.seconds["vast"] == 0.0
    asyncio.run(book.search({"vast": shelf}, query, refresh=True))
    clock.now = 100
    asyncio.run(book.search({"vast": shelf}, query))
    assert shelf.asked == 3


def test_a_failing_provider_is_reported_and_the_others_still_answer() -> None:
    good = Shelf("runpod", [offer("runpod", "0.34")])
    limited = Shelf("vast", [], fail=RateLimited("vast: rate limited: HTTP 429"))
    broken = Shelf("thunder", [], fail=KeyError("pricing"))
    result = asyncio.run(OfferBook().search({"vast": limited, "runpod": good, "thunder": broken}, OfferQuery()))
    assert [o.provider for o in result.offers] == ["runpod"]
    assert result.errors == {"vast": "rate limited: HTTP 429", "thunder": "KeyError: 'pricing'"}  # keyed: named once


def test_a_misquoted_offer_is_left_out_of_every_later_search_and_said() -> None:
    shelf = Shelf("vast", [offer("vast", "0.30"), offer("vast", "0.31", oid="2")])
    book = OfferBook()
    first = asyncio.run(book.search({"vast": shelf}, OfferQuery()))
    book.misquote(first.offers[0], "quoted $0.30/h, billed $0.60/h")
    for refresh in (False, True):  # the cached answer and the provider's fresh one alike
        again = asyncio.run(book.search({"vast": shelf}, OfferQuery(), refresh=refresh))
        assert [o.offer_id for o in again.offers] == ["2"]
        assert again.left_out == ["vast:1 left out for this session: quoted $0.30/h, billed $0.60/h"]
    assert shelf.asked == 2
    elsewhere = asyncio.run(OfferBook().search({"vast": shelf}, OfferQuery()))  # another session's book
    assert [o.offer_id for o in elsewhere.offers] == ["1", "2"] and elsewhere.left_out == []
