"""``burst ... --json``: the records the text views show, for scripts and dashboards.

One JSON document on stdout. Every record of a kind has the same keys every time (``null`` where a value is
unknown); money is a decimal string (``"0.352"``), never a float; times are ISO 8601 with their UTC offset;
fractions (reliability, how full a cap is) are numbers. Text that came from an instance is JSON-escaped (control
characters included), so no terminal escape reaches a terminal that prints it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
from collections.abc import Mapping
from decimal import Decimal
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import BudgetSnapshot, CapUsage, LedgerTable
    from .offer_book import ProvidersStatus
    from .providers.base import Offer
    from .state import OwnedInstance

__all__ = ["budget_json", "dumps", "ledger_json", "offer_json", "owned_json", "plain", "providers_json"]


def plain(value: Any) -> Any:
    """``value`` as JSON types: Decimal as its string, datetimes ISO 8601, enums their value, dataclasses their
    fields (every one, ``None`` kept)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    raise TypeError(f"no JSON form for {type(value).__name__}")


def dumps(value: Any) -> str:
    return json.dumps(plain(value), indent=2)


def offer_json(offer: Offer) -> dict[str, Any]:
    return {"offer": offer.ref, "provider": offer.provider, "offer_id": offer.offer_id,
            "gpu_model": offer.gpu_model, "gpus": offer.gpus, "memory_gb": offer.memory_gb,
            "price_usd_per_hour": offer.price_usd_per_hour, "price_usd_per_gpu_hour": offer.price_per_gpu_hour,
            "reliability": offer.reliability, "spot": offer.spot, "prototyping": offer.prototyping,
            "tier": offer.tier, "location": offer.location,
            "description": offer.description}


def owned_json(owned: OwnedInstance) -> dict[str, Any]:
    return {"job_id": owned.job_id, "provider": owned.provider, "instance_id": owned.instance_id,
            "state": owned.state, "rate_usd_per_hour": owned.rate_usd_per_hour,
            "owner": {"host": owned.owner.host, "pid": owned.owner.pid}, "orphaned": owned.orphaned,
            "reaper_pid": owned.reaper_pid, "created_at": owned.created_at}


def ledger_json(table: LedgerTable) -> dict[str, Any]:
    """Every row (one per attempt), the reservations of jobs not settled yet, the groups when the table is grouped
    (``by``), and the cells kept machines ran, each with its share of its machine's row (``machine_job_id``)."""
    groups = table.groups
    return {"by": table.group_by, "total_usd": table.total, "jobs": table.jobs, "unknown_costs": table.unknown,
            "reserved_now_usd": table.held, "rows": list(table.rows), "reservations": list(table.reservations),
            "groups": groups, "cells": list(table.cells)}


def budget_json(snapshot: BudgetSnapshot) -> dict[str, Any]:
    return {usage.period: _usage(usage) for usage in snapshot}


def _usage(usage: CapUsage) -> dict[str, Any]:
    named = {"period", "spent", "reserved", "cap"}
    more = {k: v for k, v in plain(usage).items() if k not in named}  # what else the budget records
    return {"period": usage.period, "spent_usd": usage.spent, "reserved_usd": usage.reserved, "cap_usd": usage.cap,
            "used_usd": usage.used, "remaining_usd": usage.remaining, "fraction": usage.fraction,
            "warning": usage.warning, **more}


def providers_json(status: ProvidersStatus) -> list[dict[str, Any]]:
    return [{"provider": line.name, "configured": line.configured, "reachable": line.reachable,
             "note": line.note or None,
             "lowest": {gpu: {"price_usd_per_hour": price, "offers": count}
                        for gpu, (price, count) in line.lowest.items()}} for line in status.lines]
