"""A marketplace that accepts the connection and never answers (issue 10: it cost 30 s on every search).

The fake's ``silent`` switch (tests/fakes/base.py) reads each request, records it and never replies, behind a real
loopback HTTP server. The provider gives up by itself with a clear error (short connect and read timeouts for a
search, providers/_http.py); the offer book then leaves it out of the searches that follow for a while, shown as
failing, so the others answer at once. No timed asserts: the checks are what was asked, and what is shown.
"""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path
from typing import Any

import pytest
from burst_checks import run_cell
from fakes.runpod import FakeRunPod
from fakes.vast import FakeVast
from marketplaces import Markets

from burst_jupyter.errors import ConnectFailed
from burst_jupyter.offer_book import OfferBook, ProvidersStatus
from burst_jupyter.providers.base import OfferQuery
from burst_jupyter.providers.runpod import RunPodProvider
from burst_jupyter.providers.vast import VastProvider

QUERY = OfferQuery(gpu_model="RTX_4090")


def searches(fake: FakeVast) -> int:
    return sum(1 for r in fake.requests if r.path == "/api/v0/bundles/")


def test_a_provider_that_never_answers_fails_the_search_by_itself(tmp_path: Path) -> None:
    """Without the offer book's bound around it: Vast's own client (120 s read timeout for its other calls, as
    its SDK has) gives a search a few seconds, and does not ask again."""
    fake = FakeVast(tmp_path)
    fake.switches.silent = True
    try:
        with fake.serve() as server:
            async def go() -> None:
                vast = VastProvider(api_key=fake.api_key, base_url=server.url)
                try:
                    await asyncio.wait_for(vast.offers(QUERY), 60)  # a bound on a hang, not a timing
                finally:
                    await vast.aclose()

            with pytest.raises(ConnectFailed, match="no answer"):
                asyncio.run(go())
            assert searches(fake) == 1
    finally:
        fake.close()


def test_a_provider_that_just_failed_is_skipped_and_shown_failing(tmp_path: Path) -> None:
    vast_fake, runpod_fake = FakeVast(tmp_path / "vast"), FakeRunPod(tmp_path / "runpod")
    vast_fake.switches.silent = True
    try:
        with vast_fake.serve() as server:
            async def go() -> tuple[Any, Any]:
                providers = {"vast": VastProvider(api_key=vast_fake.api_key, base_url=server.url),
                             "runpod": RunPodProvider(api_key=runpod_fake.api_key, client=runpod_fake.client(),
                                                      ssh_user=getpass.getuser())}
                book = OfferBook(timeout=1.0)  # the bound the session uses is longer; what happens next is the same
                try:
                    first = await book.search(providers, QUERY)
                    second = await book.search(providers, QUERY, refresh=True)  # %burst providers refreshes
                    return first, second
                finally:
                    await asyncio.gather(*(p.aclose() for p in providers.values()))

            first, second = asyncio.run(go())
    finally:
        vast_fake.close()
        runpod_fake.close()
    assert searches(vast_fake) == 1, "the second search asked the provider that had just failed"
    for result in (first, second):
        assert "vast" in result.errors and {o.provider for o in result.offers} == {"runpod"}
    assert "not asked again for" in second.errors["vast"]
    status = repr(ProvidersStatus.from_search(second, configured=["vast", "runpod"], missing={}))
    assert "vast: not answering: " in status and "runpod: available" in status


@pytest.mark.ssh
@pytest.mark.timeout(120)
def test_providers_and_offers_in_the_notebook_skip_it_and_say_so(ip: Any, markets: Markets) -> None:
    markets.vast.switches.silent = True
    run_cell(ip, "%burst providers")
    asked = searches(markets.vast)
    result, _ = run_cell(ip, "%burst providers")
    text = repr(result.result)
    assert "vast: not answering: " in text and "not asked again for" in text, text
    assert "runpod: available" in text
    result, _ = run_cell(ip, "%burst offers --gpu RTX_4090")
    text = repr(result.result)
    assert "not asked again for" in text and "runpod" in text, text
    assert searches(markets.vast) == asked, "a search asked the provider that had just failed"
