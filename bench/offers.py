"""How long ``--provider auto`` waits for offers, against the slowest provider alone, measured in the same run.

    python bench/offers.py [--runs 10] [--latency 0.2,0.3,0.4]

The three provider fakes (tests/fakes/) serve on real loopback HTTP servers and answer every request after a
delay (``--latency`` for vast, runpod, thunder; Thunder's search is three requests, sent at once). Median of
``--runs``:

- baseline: a fresh search of the slowest provider alone
- all three: a fresh search of Vast, RunPod and Thunder together (the real clients, the real OfferBook)
- cached: the same search again within the offer TTL

Printed as ratios to the baseline. Target: all three within 1.2x of the slowest alone (the searches overlap);
the cached re-query costs no round trip at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fakes.runpod import FakeRunPod
from fakes.thunder import FakeThunder
from fakes.vast import FakeVast

from burst_jupyter.offer_book import OfferBook
from burst_jupyter.providers.base import OfferQuery, Provider
from burst_jupyter.providers.runpod import RunPodProvider
from burst_jupyter.providers.thunder import ThunderProvider
from burst_jupyter.providers.vast import VastProvider

QUERY = OfferQuery(gpu_model="ANY", gpus=1)


async def measure(runs: int, providers: dict[str, Provider], slowest: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"slowest alone": [], "all three": [], "all three, cached": []}
    book = OfferBook(ttl=600)
    await book.search(providers, QUERY, refresh=True)  # warm connections and the pricing caches alike
    for _ in range(runs):
        t0 = time.perf_counter()
        alone = await book.search({slowest: providers[slowest]}, QUERY, refresh=True)
        times["slowest alone"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        together = await book.search(providers, QUERY, refresh=True)
        times["all three"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cached = await book.search(providers, QUERY)
        times["all three, cached"].append(time.perf_counter() - t0)
        assert alone.offers and together.offers and cached.offers == together.offers, "a search found nothing"
        assert not together.errors, together.errors
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--latency", default="0.2,0.3,0.4", help="seconds per answer: vast,runpod,thunder")
    args = parser.parse_args()
    latency = dict(zip(("vast", "runpod", "thunder"), map(float, args.latency.split(",")), strict=True))
    slowest = max(latency, key=latency.__getitem__)
    root = Path(tempfile.mkdtemp(prefix="burst-bench-offers-"))
    fakes = {"vast": FakeVast(root), "runpod": FakeRunPod(root), "thunder": FakeThunder(root)}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, fake in fakes.items():
            fake.switches.latency = latency[name]
            urls[name] = stack.enter_context(fake.serve()).url
        providers: dict[str, Provider] = {
            "vast": VastProvider(api_key=fakes["vast"].api_key, base_url=urls["vast"]),
            "runpod": RunPodProvider(api_key=fakes["runpod"].api_key, base_url=urls["runpod"]),
            "thunder": ThunderProvider(api_key=fakes["thunder"].api_key, base_url=urls["thunder"]),
        }

        async def run() -> dict[str, list[float]]:
            try:
                return await measure(args.runs, providers, slowest)
            finally:
                for p in providers.values():
                    await p.aclose()  # type: ignore[attr-defined]

        times = asyncio.run(run())
    base = statistics.median(times["slowest alone"])
    print(f"offer search, median of {args.runs}; answer delays: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in latency.items()))
    for label, values in times.items():
        median = statistics.median(values)
        print(f"  {label:<18} {median * 1000:8.1f} ms   {median / base:5.2f}x")
    print("target: all three within 1.2x of the slowest alone; cached far below 1x")


if __name__ == "__main__":
    main()
