"""The ``ssh`` provider: the user's own boxes, taken round-robin, billed at the declared $/h (0 if none).

An "instance" is a private job folder under ``~/.cache/burst/jobs`` on one host; the instance id is
``JOB_ID@HOST`` so terminate and get work from the id alone (the reaper has nothing else).
"""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from ._agent_hosts import AgentHost
from .base import REMOTE_JOB_ROOT, BootWatch, Capability, Endpoint, Instance, Offer, OfferQuery
from .ssh_declared import DECLARATION

if TYPE_CHECKING:
    from ..connections import Connections
    from ..spec import JobSpec

__all__ = ["SSHProvider", "parse_host"]



def parse_host(text: str, *, trust_on_first_use: bool = False) -> Endpoint:
    """``[user@]host[:port]`` (an alias from ~/.ssh/config is fine) as an Endpoint."""
    user, _, rest = text.strip().rpartition("@")
    host, _, port = rest.partition(":")
    if not host:
        raise ConfigError(f"--host {text!r}: expected [user@]host[:port]")
    if port and not port.isdigit():
        raise ConfigError(f"--host {text!r}: port must be a number")
    return Endpoint(host=host, port=int(port) if port else 22, user=user or None,
                    trust_on_first_use=trust_on_first_use)


class SSHProvider:
    name: ClassVar[str] = DECLARATION.name
    capabilities: ClassVar[frozenset[Capability]] = DECLARATION.capabilities
    teardown_seconds: ClassVar[float] = 2.0
    poll_seconds: float = 0.0  # launch returns a running "instance": nothing to poll

    def __init__(self, *, hosts: list[str], connections: Connections, rate: Decimal = Decimal(0),
                 trust_on_first_use: bool = False, python: str = "python3",
                 rotation: itertools.count[int] | None = None) -> None:
        if not hosts:
            raise ConfigError("provider ssh needs at least one host (--host gpu1,gpu2 or host = [...] in config)")
        self.hosts = list(hosts)
        self.rate = rate
        self._rotation = rotation if rotation is not None else itertools.count()
        self._next = 0
        self._agents = {h: AgentHost(connections=connections, root=REMOTE_JOB_ROOT, python=python,
                                     endpoint=parse_host(h, trust_on_first_use=trust_on_first_use))
                        for h in self.hosts}

    async def offers(self, query: OfferQuery) -> list[Offer]:
        """Every host, starting with the next in the rotation (so the cheapest pick goes round-robin).

        GPUs are not probed here (that would cost a connection per host); the agent checks them on arrival.
        """
        if query.max_price_usd_per_hour is not None and self.rate > query.max_price_usd_per_hour:
            return []
        self._next = next(self._rotation) % len(self.hosts)
        order = self.hosts[self._next:] + self.hosts[: self._next]
        return [Offer(provider=self.name, offer_id=h, gpu_model=query.gpu_model, gpus=query.gpus,
                      price_usd_per_hour=self.rate, description=h) for h in order]

    async def launch(self, offer: Offer, spec: JobSpec, *, job_id: str, tag: str,
                     ssh_public_key: str | None, watch: BootWatch | None = None) -> Instance:
        # ``watch`` is not armed: the user's own machine bills nothing before the job runs, and is never ended.
        agent = self._agent(offer.offer_id)
        # Connect now: an unreachable host, a refused key or an unknown host key fail before anything runs.
        await asyncio.to_thread(agent.connections.get, agent.endpoint)
        return agent.instance(provider=self.name, instance_id=f"{job_id}@{offer.offer_id}", job_id=job_id,
                              rate=self.rate, tag=tag, gpu_model=offer.gpu_model)

    def _agent(self, host: str) -> AgentHost:
        agent = self._agents.get(host)
        if agent is None:
            raise ConfigError(f"host {host!r} is not one of this provider's hosts ({', '.join(self.hosts)})")
        return agent

    @staticmethod
    def _split(instance_id: str) -> tuple[str, str]:
        job_id, _, host = instance_id.partition("@")
        return job_id, host

    async def get(self, instance_id: str) -> Instance | None:
        job_id, host = self._split(instance_id)
        agent = self._agent(host)
        if not await agent.exists(job_id):
            return None
        return agent.instance(provider=self.name, instance_id=instance_id, job_id=job_id, rate=self.rate, tag="",
                              gpu_model=None)

    async def list_owned(self, tag: str) -> list[Instance]:
        found = []
        for host, agent in self._agents.items():
            for job_id in await agent.list_jobs(tag):
                found.append(agent.instance(provider=self.name, instance_id=f"{job_id}@{host}", job_id=job_id,
                                            rate=self.rate, tag=tag, gpu_model=None))
        return found

    async def terminate(self, instance_id: str) -> None:
        job_id, host = self._split(instance_id)
        await self._agent(host).destroy(job_id)

    async def aclose(self) -> None:
        """Nothing to release: its connections belong to the session's pool (connections.py)."""
