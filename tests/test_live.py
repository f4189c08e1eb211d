"""Against the real marketplaces, opt in: ``pytest -m live`` with VAST_API_KEY / RUNPOD_API_KEY / TNR_API_TOKEN.

The search tests cost nothing. The one that rents runs only when BURST_LIVE_RENT=1 as well, with a cap of
$0.10 and the cheapest RTX 4090 (or BURST_LIVE_GPU); afterwards the provider is asked for everything carrying
this install's tag, which must be nothing. No test here runs in CI (the default addopts say ``-m 'not live'``).
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal

import pytest

from burst_jupyter.config import load_settings
from burst_jupyter.providers import marketplaces
from burst_jupyter.providers.accounts import accounts
from burst_jupyter.providers.base import OfferQuery

pytestmark = pytest.mark.live

CONFIGURED = accounts(load_settings())


@pytest.mark.parametrize("name", [d.name for d in marketplaces()])
def test_live_offers_are_real_prices_with_known_gpus(name: str) -> None:
    if name not in CONFIGURED:
        pytest.skip(f"{name}: no API key")
    from burst_jupyter.session import Session

    session = Session.current()
    result = session.search_offers(OfferQuery(gpu_model="ANY"), providers=[name], refresh=True)
    assert result.errors == {}, result.errors
    assert result.offers, f"{name} offers nothing at all"
    for offer in result.offers:
        assert offer.gpu_model and Decimal(0) < offer.price_usd_per_hour < Decimal(200), offer


@pytest.mark.skipif(os.environ.get("BURST_LIVE_RENT") != "1", reason="renting costs money: BURST_LIVE_RENT=1")
def test_live_rent_runs_a_cell_and_leaves_nothing() -> None:
    import burst_jupyter as burst
    from burst_jupyter.session import Session

    gpu = os.environ.get("BURST_LIVE_GPU", "RTX_4090")
    result = burst.run(burst.JobSpec(cell="import subprocess; print(subprocess.run(['nvidia-smi', '-L'], "
                                     "capture_output=True, text=True).stdout)", gpu_model=gpu, max_cost_usd="0.10",
                                     max_duration_minutes=5, name="live-smoke"))
    assert result.total_cost_usd is not None and result.total_cost_usd <= Decimal("0.10")
    session = Session.current()
    for name, provider in session.marketplaces().items():
        left = asyncio.run_coroutine_threadsafe(provider.list_owned(session.tag), session.loop).result(60)
        assert left == [], f"{name} still holds {left}"
