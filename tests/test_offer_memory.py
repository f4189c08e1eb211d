"""A GPU model name means the whole card (issue 10): an offer reporting less memory than the model has (part of a
card, or a misreport) is left out unless ``--memory`` asks for less. Each marketplace fake serves such an offer, in
its own units: Vast ``gpu_ram`` in MB (FakeVast's default ask 4105, a "4090" with 12282 MB), RunPod ``memoryInGb``
of a GPU type, Thunder ``vramGB`` of a spec, Lambda the GB in an instance type's ``gpu_description``
(reference/provider-apis.md 1.3, 2.1, 3, 4.3).
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from burst_checks import FAST_RETRY, cell, ledger_rows, run_cell
from fakes.base import FakeCloud
from fakes.lambda_cloud import FakeLambda
from fakes.runpod import FakeRunPod
from fakes.thunder import FakeThunder
from fakes.vast import FakeVast
from marketplaces import Markets

from burst_jupyter.providers.base import Offer, OfferQuery
from burst_jupyter.providers.lambda_cloud import LambdaProvider
from burst_jupyter.providers.runpod import RunPodProvider
from burst_jupyter.providers.thunder import ThunderProvider
from burst_jupyter.providers.vast import VastProvider


def runpod_4090_reports(fake: FakeRunPod, memory: int) -> None:
    for gpu in fake.gpu_types:
        if gpu["id"] == "NVIDIA GeForce RTX 4090":
            gpu["memoryInGb"] = memory


def thunder_h100_reports(fake: FakeThunder, memory: int) -> None:
    fake.specs["h100_x1_production"]["vramGB"] = memory


def lambda_h100_reports(fake: FakeLambda, memory: int) -> None:
    fake.instance_types["gpu_1x_h100_pcie"]["gpu_description"] = f"H100 ({memory} GB PCIe)"


# provider name, its fake, how the fake is made to serve part of a card, the GPU, and the memory it then reports
CASES: dict[str, tuple[type[FakeCloud], Callable[[Any], None], str, int]] = {
    "vast": (FakeVast, lambda fake: None, "RTX_4090", 12),  # ask 4105 is in FakeVast's default book
    "runpod": (FakeRunPod, lambda fake: runpod_4090_reports(fake, 12), "RTX_4090", 12),
    "thunder": (FakeThunder, lambda fake: thunder_h100_reports(fake, 40), "H100", 40),
    "lambda": (FakeLambda, lambda fake: lambda_h100_reports(fake, 40), "H100", 40),
}


@pytest.fixture(params=list(CASES))
def market(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    fake_type, shape, _, _ = CASES[request.param]
    fake = fake_type(tmp_path)
    fake.switches.boot_delay = 60.0
    shape(fake)
    yield request.param, fake
    fake.close()


def search(name: str, fake: Any, query: OfferQuery) -> list[Offer]:
    kinds = {"vast": VastProvider, "runpod": RunPodProvider, "thunder": ThunderProvider, "lambda": LambdaProvider}

    async def go() -> list[Offer]:
        provider = kinds[name](api_key="test-key", client=fake.client(), retry=FAST_RETRY, ssh_user=getpass.getuser())
        try:
            return await provider.offers(query)
        finally:
            await provider.aclose()

    return asyncio.run(go())


def test_a_model_name_leaves_out_offers_below_its_memory(market: tuple[str, Any]) -> None:
    name, fake = market
    _, _, gpu, partial = CASES[name]
    found = search(name, fake, OfferQuery(gpu_model=gpu))
    assert all(o.memory_gb is not None and o.memory_gb > partial for o in found), found
    assert all(o.memory_gb != partial for o in search(name, fake, OfferQuery(gpu_model="ANY")))


def test_memory_asking_for_less_lets_them_in(market: tuple[str, Any]) -> None:
    name, fake = market
    _, _, gpu, partial = CASES[name]
    found = search(name, fake, OfferQuery(gpu_model=gpu, memory_gb=partial))
    assert any(o.memory_gb == partial for o in found), found


def test_a_card_reporting_a_little_under_its_figure_is_whole(tmp_path: Path) -> None:
    """An L4 shows 23034 MiB in nvidia-smi, and Vast's MB read 23.0 "GB" of its 24: still a whole card."""
    fake = FakeVast(tmp_path, offers=[])
    fake.add_offer(gpu_name="L4", gpu_ram=23034, gpu_total_ram=23034, dph_total=0.2)
    try:
        assert [o.gpu_model for o in search("vast", fake, OfferQuery(gpu_model="L4"))] == ["L4"]
    finally:
        fake.close()


@pytest.mark.ssh
def test_the_magic_rents_the_whole_card_unless_memory_says_less(ip: Any, markets: Markets,
                                                               burst_home: Path) -> None:
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --max-cost 2 --dry-run"))
    assert "[vast:4102]" in repr(result.result), repr(result.result)  # not the $0.12/h 12 GB "4090", ask 4105
    result, _ = run_cell(ip, cell("--gpu RTX_4090 --memory 12 --max-cost 2 --dry-run"))
    assert "[vast:4105]" in repr(result.result), repr(result.result)
    assert markets.creates() == 0 and ledger_rows(burst_home) == []
