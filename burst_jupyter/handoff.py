"""The handoff: what a job's state-store row carries for whoever finishes the job without the kernel that started
it (a reaper, ``burst kill``, reconciliation), in another process.

The job writes it as it goes: the plan's part first (names, mounts, the result sink), then what each attempt bills
(the provider, its rate, the cap), then the instance (where its agent answers). It is JSON in the row, under the
keys rows have always had, so a row an earlier version wrote reads too: every field may be absent there.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .providers import ProviderConfig
from .providers.base import Endpoint

if TYPE_CHECKING:
    from .connections import Connections
    from .remote import AgentClient
    from .sync import MountPlan

__all__ = ["Handoff"]


@dataclass
class Handoff:
    # -- what the plan decided (session.plan) ------------------------------------------------------------------
    name: str | None = None
    tag: str = ""  # this install's owner tag: how a launch whose instance id was never recorded is found
    #: Each rw and ro mount as ``MountPlan.to_json`` wrote it: as uploaded and synced back so far, kept current by
    #: the remote run (a reaper tells local edits from the uploaded files by it). Kept as written, parsed by
    #: :meth:`mount_plans`: rows are read at a kernel's exit and by ``burst list``, which need no pydantic.
    mounts: list[dict[str, Any]] = field(default_factory=list)
    max_results: int | None = None  # bytes of results accepted back (--max-results)
    result_sink: str | None = None  # absolute and job-specific: the reaper reopens it as is
    # -- what bounds a reaper's wait on the agent: the chosen provider, the cap, the maximum duration ----------
    provider_config: ProviderConfig | None = None
    max_cost_usd: Decimal | None = None
    spent_usd: Decimal = Decimal(0)  # what earlier attempts cost (billed on rows of their own)
    max_seconds: float | None = None
    first_launch: float | None = None  # wall clock seconds, at the job's first create request
    # -- what the current attempt bills ---------------------------------------------------------------------
    rate: Decimal | None = None
    attempt: int = 1
    gpu: str | None = None
    launched_at: dt.datetime | None = None  # the attempt's create request
    # -- the instance ---------------------------------------------------------------------------------------
    instance_id: str | None = None
    workdir: str | None = None
    python: str | None = None
    endpoint: Endpoint | None = None  # None until the instance reported a way in

    @property
    def ends_at(self) -> float | None:
        """Wall clock seconds when the job's maximum duration is over, if both ends were recorded."""
        if self.first_launch is None or self.max_seconds is None:
            return None
        return self.first_launch + self.max_seconds

    def mount_plans(self) -> list[MountPlan]:
        """The job's mounts: where rw results land on this machine."""
        from .sync import MountPlan  # pydantic (the mount's spec): only for a reaper that syncs

        return [MountPlan.from_json(m) for m in self.mounts]

    def agent(self, connections: Connections) -> AgentClient | None:
        """A client for the job's agent, or None while the job has none to ask (still provisioning)."""
        if self.endpoint is None or self.workdir is None or self.python is None:
            return None
        return connections.agent(self.endpoint, self.python, self.workdir)

    def to_json(self) -> dict[str, Any]:
        """Fields not known yet are left out, as rows have always had them."""
        values = {
            "name": self.name, "tag": self.tag, "mounts": self.mounts, "max_results": self.max_results,
            "result_sink": self.result_sink,
            "provider_config": self.provider_config.to_json() if self.provider_config else None,
            "max_cost_usd": _text(self.max_cost_usd), "spent_usd": str(self.spent_usd),
            "max_seconds": self.max_seconds, "first_launch": self.first_launch,
            "rate": _text(self.rate), "attempt": self.attempt, "gpu": self.gpu,
            "launched_at": self.launched_at.isoformat() if self.launched_at else None,
            "instance_id": self.instance_id, "workdir": self.workdir, "python": self.python,
            "endpoint": self.endpoint.to_json() if self.endpoint else None,
        }
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Handoff:
        limit, config, endpoint, at = (data.get(k) for k in ("max_results", "provider_config", "endpoint",
                                                              "launched_at"))
        return cls(
            name=data.get("name"), tag=data.get("tag") or "", mounts=list(data.get("mounts") or []),
            max_results=limit if isinstance(limit, int) else None, result_sink=_str(data.get("result_sink")),
            provider_config=ProviderConfig.from_json(config) if config else None,
            max_cost_usd=_decimal(data.get("max_cost_usd")), spent_usd=_decimal(data.get("spent_usd")) or Decimal(0),
            max_seconds=_float(data.get("max_seconds")), first_launch=_float(data.get("first_launch")),
            rate=_decimal(data.get("rate")), attempt=int(data.get("attempt", 1)), gpu=data.get("gpu"),
            launched_at=dt.datetime.fromisoformat(at) if at else None,
            instance_id=data.get("instance_id"), workdir=data.get("workdir"), python=data.get("python"),
            endpoint=Endpoint.from_json(endpoint) if endpoint else None,
        )


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _decimal(value: Any) -> Decimal | None:
    """An amount as the row wrote it (a string): empty or absent is unknown."""
    return Decimal(value) if value not in (None, "") else None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
