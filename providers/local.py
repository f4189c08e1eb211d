"""The ``local`` provider: this machine, in a private job folder. No account, no credentials; $0/h unless a
rate is declared. It runs the same agent through the same protocol as every other provider (only the transport
is a subprocess instead of SSH), so the quickstart exercises the real path.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..errors import NoCapacity
from ..paths import local_jobs_dir
from ._agent_hosts import AgentHost
from .base import BootWatch, Capability, Endpoint, Instance, Offer, OfferQuery
from .catalog import ANY, CATALOG
from .local_declared import DECLARATION

if TYPE_CHECKING:
    from ..connections import Connections
    from ..spec import JobSpec

__all__ = ["LocalProvider", "local_gpus"]


@functools.lru_cache(maxsize=1)
def local_gpus() -> tuple[tuple[str, int], ...]:
    """(name, memory MiB) of each NVIDIA GPU here, from nvidia-smi; empty when there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.splitlines():
        name, _, mem = line.rpartition(",")
        if name.strip():
            gpus.append((name.strip(), int(float(mem.strip() or 0))))
    return tuple(gpus)


def _fitting(query: OfferQuery, gpus: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
    fit = list(gpus)
    if query.gpu_model not in (None, ANY):
        model = CATALOG[str(query.gpu_model)]
        fit = [g for g in fit if model.matches_smi(g[0])]
    if query.memory_gb:
        fit = [g for g in fit if g[1] >= query.memory_gb * 1000]
    return fit


class LocalProvider:
    name: ClassVar[str] = DECLARATION.name
    capabilities: ClassVar[frozenset[Capability]] = DECLARATION.capabilities
    teardown_seconds: ClassVar[float] = 1.0
    poll_seconds: float = 0.0  # launch returns a running "instance": nothing to poll

    def __init__(self, *, connections: Connections, rate: Decimal = Decimal(0), root: Path | None = None,
                 python: str = sys.executable) -> None:
        self.rate = rate
        self.host = AgentHost(connections=connections, endpoint=Endpoint(), root=str(root or local_jobs_dir()),
                              python=python)

    async def offers(self, query: OfferQuery) -> list[Offer]:
        """One offer: this machine. Raises NoCapacity saying what is here when the GPUs asked for are not."""
        gpus = await asyncio.to_thread(local_gpus) if query.gpu_model is not None else ()
        fit = _fitting(query, gpus)
        if query.gpu_model is not None and len(fit) < query.gpus:
            have = ", ".join(name for name, _ in gpus) or "no NVIDIA GPU"
            want = "GPU" if query.gpu_model == ANY else query.gpu_model
            raise NoCapacity(f"this machine has {have}; the job asks for {query.gpus} x {want}")
        if query.max_price_usd_per_hour is not None and self.rate > query.max_price_usd_per_hour:
            return []
        return [Offer(provider=self.name, offer_id="local", gpu_model=query.gpu_model,
                      gpus=len(fit) if query.gpu_model is not None else 0, price_usd_per_hour=self.rate,
                      description="this machine")]

    async def launch(self, offer: Offer, spec: JobSpec, *, job_id: str, tag: str,
                     ssh_public_key: str | None, watch: BootWatch | None = None) -> Instance:
        # ``watch`` is not armed: the user's own machine bills nothing before the job runs, and is never ended.
        return self.host.instance(provider=self.name, instance_id=job_id, job_id=job_id, rate=self.rate, tag=tag,
                                  gpu_model=offer.gpu_model)

    async def get(self, instance_id: str) -> Instance | None:
        if not await self.host.exists(instance_id):
            return None
        return self.host.instance(provider=self.name, instance_id=instance_id, job_id=instance_id, rate=self.rate,
                                  tag="", gpu_model=None)

    async def list_owned(self, tag: str) -> list[Instance]:
        return [self.host.instance(provider=self.name, instance_id=j, job_id=j, rate=self.rate, tag=tag,
                                   gpu_model=None) for j in await self.host.list_jobs(tag)]

    async def terminate(self, instance_id: str) -> None:
        await self.host.destroy(instance_id)

    async def aclose(self) -> None:
        """Nothing to release: its connections belong to the session's pool (connections.py)."""
