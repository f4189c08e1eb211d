"""``--offer PROVIDER:ID`` against the three marketplace fakes (tests/marketplaces.py): the word the offer browser
shows for an offer rents exactly that offer, alone, typed or pasted into a ``%%burst`` line (quoted or not) or
given to ``burst run``; and an option that contradicts it is one clear line before anything is rented.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from burst_checks import cell, last_job, ok, run_cell, usage_line
from marketplaces import GPU, LAMBDA_OFFER, RUNPOD_GPU, THUNDER_SPEC, Markets

from burst_jupyter.events import EventType
from burst_jupyter.offer_book import ProviderLine

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

# One offer of each marketplace's fake, as the browser shows it: Vast ask 4101 ($0.352/h, not the cheapest
# 4090, so `auto` would never pick it), RunPod's RTX 4090 type on secure cloud (spaces in its id; not the cheaper
# community one), Thunder's production H100, Lambda's H100 PCIe in one of its two regions (type and region).
SHOWN = {"vast": "vast:4101", "runpod": "runpod:NVIDIA_GeForce_RTX_4090@secure", "thunder": f"thunder:{THUNDER_SPEC}",
         "lambda": LAMBDA_OFFER}


def dry_run(ip: Any, options: str) -> Any:
    result, streams = run_cell(ip, cell(f"{options} --dry-run"))
    ok(result, streams)
    return result.result


@pytest.mark.parametrize("provider", ["vast", "runpod", "thunder", "lambda"])
def test_the_offer_alone_rents_exactly_it(ip: Any, markets: Markets, provider: str) -> None:
    result, streams = run_cell(ip, cell(f"--offer {SHOWN[provider]} --max-cost 1", "print('ran on the offer')"))
    ok(result, streams)
    assert "ran on the offer" in streams.text("stdout")
    selected = next(e for e in last_job().events if e.type is EventType.OFFER_SELECTED)
    assert (selected.provider, selected.gpu) == (provider, GPU[provider])
    spec = last_job().plan.spec  # what was asked: the provider came from the offer's prefix
    assert (spec.offer, spec.provider) == (SHOWN[provider], provider)
    if provider == "runpod":
        assert [p["_cloud"] for p in markets.runpod.pods.values()] == ["SECURE"]  # the cloud it names, no other


def test_a_runpod_id_from_before_clouds_rents_the_cheapest_cloud_and_moves_on_to_the_other(
        ip: Any, markets: Markets) -> None:
    """``runpod:TYPE`` (no ``@cloud``, as offers were named before issue 13) names the type on either cloud."""
    assert dry_run(ip, f"--offer runpod:{RUNPOD_GPU.replace(' ', '_')}").offer.tier == "community"
    markets.runpod.sold_out_on_create = {"COMMUNITY": 1}
    result, streams = run_cell(ip, cell(f"--offer runpod:{RUNPOD_GPU.replace(' ', '_')} --max-cost 1", "print(1)"))
    ok(result, streams)
    assert [p["_cloud"] for p in markets.runpod.pods.values()] == ["SECURE"]


def test_every_offer_the_browser_shows_can_be_pasted_alone(ip: Any, markets: Markets) -> None:
    import burst_jupyter as burst

    for gpus in (1, 2):
        shown = burst.offers("ANY", gpus=gpus).offers
        assert {o.provider for o in shown} == {"vast", "runpod", "thunder", "lambda"}
        for offer in shown:
            would = dry_run(ip, f"--offer {offer.ref}").offer
            assert (would.provider, would.offer_id, would.gpus, would.price_usd_per_hour) == (
                offer.provider, offer.offer_id, offer.gpus, offer.price_usd_per_hour), offer.ref
    assert markets.creates() == 0


def test_a_quoted_id_with_spaces_is_one_word(ip: Any, markets: Markets) -> None:
    for quoted in (f'"runpod:{RUNPOD_GPU}"', f"'runpod:{RUNPOD_GPU}:x2'"):
        would = dry_run(ip, f"--offer {quoted} --max-cost 1").offer
        assert (would.provider, would.offer_id) == ("runpod", f"{RUNPOD_GPU}@community")
    assert would.gpus == 2 and would.price_usd_per_hour == 2 * Decimal("0.34")
    assert markets.creates() == 0


@pytest.mark.parametrize(("options", "says"), [
    ("--offer vast:4101 --provider runpod", "--offer vast:4101 is a vast offer, not --provider runpod"),
    ("--offer runpod:NVIDIA_GeForce_RTX_4090:x2 --gpus 1", "is 2 GPUs, not --gpus 1"),
    ("--offer local:local", "local is not a marketplace"),
    ("--offer 4101", "is not PROVIDER:ID"),
    ('--offer "vast:4101', "No closing quotation"),
])
def test_an_offer_that_cannot_be_meant_is_one_line(ip: Any, markets: Markets, options: str, says: str) -> None:
    result, _ = run_cell(ip, cell(f"{options} --max-cost 1"))
    assert says in usage_line(result)
    assert markets.creates() == 0


def test_the_cli_takes_the_same_word(markets: Markets, capsys: pytest.CaptureFixture[str]) -> None:
    from burst_jupyter.cli import main

    assert main(["submit", "--offer", f"runpod:{RUNPOD_GPU}", "--dry-run", "--", "python", "-c", "1"]) == 0
    assert "would rent: runpod 1 x RTX_4090" in capsys.readouterr().out
    assert markets.creates() == 0


def test_a_gpu_typo_in_the_browser_is_one_line_about_the_name(ip: Any, markets: Markets) -> None:
    import burst_jupyter as burst
    from burst_jupyter.widgets import OfferFilter

    browser = burst.offers("RTX_4090")
    browser.update_filter(OfferFilter(gpu="RTX_4O90"))
    assert browser.error is not None and browser.error.startswith("unknown GPU 'RTX_4O90'; did you mean RTX_4090")
    text = browser.snapshot_text()  # one line about the name, and no provider blamed for it
    assert text.splitlines()[1] == f"search failed: {browser.error}" and "errors:" not in text


def test_one_offer_is_singular() -> None:
    line = ProviderLine("vast", True, True, {"RTX_4090": (Decimal("0.30"), 1), "H100": (Decimal("2"), 2)})
    assert line.describe() == "vast: available, lowest RTX_4090 = $0.30/hr (1 offer), lowest H100 = $2.00/hr (2 offers)"
