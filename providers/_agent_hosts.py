"""What local and ssh share: their "instance" is a private job folder on a machine the user already has, and
the agent itself answers get/list/terminate there. Lifted here so the two providers stay thin."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from ..connections import Connections
from ..remote import AgentClient
from .base import Endpoint, Instance, InstanceState

__all__ = ["AgentHost"]


class AgentHost:
    """A job root on one machine (``root`` may be relative to the remote home)."""

    def __init__(self, *, connections: Connections, endpoint: Endpoint, root: str, python: str) -> None:
        self.connections = connections
        self.endpoint = endpoint
        self.root = root.rstrip("/")
        self.python = python

    def jobdir(self, job_id: str) -> str:
        return f"{self.root}/{job_id}"

    def _client(self, path: str) -> AgentClient:
        return self.connections.agent(self.endpoint, self.python, path)

    async def exists(self, job_id: str) -> bool:
        status = await asyncio.to_thread(lambda: self._client(self.jobdir(job_id)).status())
        return bool(status.get("exists"))

    async def destroy(self, job_id: str) -> None:
        await asyncio.to_thread(lambda: self._client(self.jobdir(job_id)).destroy())

    async def list_jobs(self, tag: str) -> list[str]:
        records = await asyncio.to_thread(lambda: self._client(self.root).list(tag))
        return [str(r["job_id"]) for r in records]

    def instance(self, *, provider: str, instance_id: str, job_id: str, rate: Decimal, tag: str,
                 gpu_model: str | None) -> Instance:
        return Instance(
            provider=provider,
            instance_id=instance_id,
            state=InstanceState.RUNNING,
            endpoint=self.endpoint,
            workdir=self.jobdir(job_id),
            price_usd_per_hour=rate,
            tag=tag,
            gpu_model=gpu_model,
            python=self.python,
            job_id=job_id,
        )
