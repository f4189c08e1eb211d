"""JobEvent: the one stream every view (widget, text, CLI, ``async for``) renders.

A job emits, in order: queued, offer_selected, budget_reserved (budget_warning when a cap passes 80%),
provisioning, provisioned, ssh_ready, protected (which layers guard against a leaked instance), syncing_up, started,
then output/display/progress while it runs (synced after each ``--sync-every`` pull), stopping when it is ended early,
preempted when the provider took the instance (then provisioning again with ``--retries``), syncing_down,
terminated, and exactly one final event: completed, failed, cancelled or budget_killed. Money fields are
``Decimal``.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any

from .money import format_rate, format_usd

__all__ = ["FINAL_EVENTS", "EventType", "JobEvent"]


class EventType(str, enum.Enum):
    QUEUED = "queued"
    OFFER_SELECTED = "offer_selected"
    BUDGET_RESERVED = "budget_reserved"
    BUDGET_WARNING = "budget_warning"
    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"
    PROTECTED = "protected"  # message: what happens if the kernel dies, one line; text: the layers behind it
    SSH_READY = "ssh_ready"
    SYNCING_UP = "syncing_up"
    STARTED = "started"
    OUTPUT = "output"
    DISPLAY = "display"  # data: what the cell displayed, an inert display bundle (output.RemoteDisplay.bundle)
    PROGRESS = "progress"
    RECONNECTING = "reconnecting"
    SYNCED = "synced"  # a periodic pull of rw mounts (--sync-every) landed
    PREEMPTED = "preempted"  # the provider paused, outbid, exited or removed the instance mid-run
    STOPPING = "stopping"
    SYNCING_DOWN = "syncing_down"
    TERMINATED = "terminated"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_KILLED = "budget_killed"

    def __str__(self) -> str:
        return self.value


FINAL_EVENTS = frozenset(
    {EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED, EventType.BUDGET_KILLED}
)


_MONEY = ("cost_per_hour_usd", "cost_so_far_usd", "total_cost_usd", "max_cost_usd")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True, kw_only=True, slots=True)
class JobEvent:
    """One thing that happened to a job. Fields that do not apply to a type stay ``None``.

    Example:
        >>> JobEvent(type=EventType.PROGRESS, job_id="j1", percent=12.5).percent
        12.5
    """

    type: EventType
    job_id: str
    at: dt.datetime = field(default_factory=_now)
    message: str | None = None
    # output
    stream: str | None = None  # "stdout" | "stderr"
    text: str | None = None
    # display
    data: dict[str, Any] | None = None
    # progress
    percent: float | None = None
    # money
    cost_per_hour_usd: Decimal | None = None
    cost_so_far_usd: Decimal | None = None
    total_cost_usd: Decimal | None = None
    max_cost_usd: Decimal | None = None
    # where
    provider: str | None = None
    instance_id: str | None = None
    gpu: str | None = None
    # failure
    error: str | None = None

    @property
    def is_final(self) -> bool:
        return self.type in FINAL_EVENTS

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (money as strings, times in ISO 8601); fields left ``None`` are left out."""
        out: dict[str, Any] = {"type": self.type.value, "job_id": self.job_id, "at": self.at.isoformat()}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in out and value is not None:
                out[f.name] = str(value) if isinstance(value, Decimal) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobEvent:
        """The inverse of :meth:`to_json`. Unknown keys (a newer writer) are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        values["type"] = EventType(values["type"])
        values["at"] = dt.datetime.fromisoformat(values["at"])
        for name in _MONEY:
            if name in values:
                values[name] = Decimal(values[name])
        return cls(**values)

    def __repr__(self) -> str:
        parts = [f"type={self.type.value!r}", f"at={self.at.isoformat(timespec='milliseconds')}"]
        for f in fields(self):
            if f.name in {"type", "at", "job_id"}:
                continue
            value = getattr(self, f.name)
            if value is not None:
                parts.append(f"{f.name}={value!r}" if not isinstance(value, Decimal) else f"{f.name}={value}")
        return f"JobEvent({', '.join(parts)})"

    def describe(self) -> str:
        """One plain-text line for logs and text views (no markup)."""
        t = self.type
        if t is EventType.OUTPUT:
            return self.text or ""
        if t is EventType.DISPLAY:
            return str((self.data or {}).get("text/plain", ""))
        if t is EventType.PROGRESS:
            pct = f"{self.percent:.0f}%" if self.percent is not None else "?"
            return f"progress {pct}" + (f" {self.message}" if self.message else "")
        bits = [t.value.replace("_", " ")]
        if self.provider:
            bits.append(self.provider)
        if self.gpu:
            bits.append(self.gpu)
        if self.instance_id:
            bits.append(f"instance {self.instance_id}")
        if self.cost_per_hour_usd is not None:
            bits.append(f"{format_rate(self.cost_per_hour_usd)}/h")
        if self.total_cost_usd is not None:
            bits.append(f"total {format_usd(self.total_cost_usd)}")
        if self.max_cost_usd is not None and self.total_cost_usd is None:
            bits.append(f"cap {format_usd(self.max_cost_usd)}")
        if self.message:
            bits.append(self.message)
        if self.error:
            bits.append(f"error: {self.error}")
        return " · ".join(bits)
