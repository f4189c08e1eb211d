"""The handoff a job's state-store row carries to a reaper in another process: typed both ways, and rows that an
earlier version wrote (plain JSON, fields missing) read as they were meant."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

from burst_jupyter.connections import Connections
from burst_jupyter.handoff import Handoff
from burst_jupyter.providers import ProviderConfig
from burst_jupyter.providers.base import Endpoint
from burst_jupyter.spec import Mount
from burst_jupyter.state import Owner, StateStore
from burst_jupyter.sync import MountPlan

ENDPOINT = Endpoint(host="203.0.113.7", port=40022, user="root", key_path="/k/id", trust_on_first_use=True,
                    known_hosts="/k/known_hosts")
LAUNCHED = dt.datetime(2026, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)


def full(tmp_path: Path) -> Handoff:
    mount = MountPlan(0, Mount(local="./out", remote="out", mode="rw"), tmp_path / "out", False, {"a.txt": [1, 2]})
    return Handoff(name="train", tag="burst-abc", mounts=[mount.to_json()], max_results=10**6,
                   result_sink="s3://bucket/runs/train-1234abcd", provider_config=ProviderConfig(name="vast"),
                   max_cost_usd=Decimal("1.50"), spent_usd=Decimal("0.25"), max_seconds=3600.0,
                   first_launch=1700000000.5, rate=Decimal("0.298"), attempt=2, gpu="RTX_4090",
                   launched_at=LAUNCHED, instance_id="4102", workdir="/root/burst/train-1234abcd",
                   python="python3", endpoint=ENDPOINT)


def test_every_field_survives_the_json_of_a_row(tmp_path: Path) -> None:
    h = full(tmp_path)
    assert Handoff.from_json(json.loads(json.dumps(h.to_json()))) == h
    (plan,) = h.mount_plans()
    assert (plan.local, plan.rw, plan.uploaded) == (tmp_path / "out", True, {"a.txt": [1, 2]})
    assert h.ends_at == 1700003600.5


def test_a_row_an_earlier_version_wrote_reads_as_meant() -> None:
    """The keys rows have always had, amounts as strings, no instance yet: what a kernel that died during its
    create left (no endpoint: no agent to ask; no maximum duration recorded: no end known)."""
    old = {"name": "held", "tag": "burst-abc", "mounts": [], "max_results": None,
           "provider_config": {"name": "vast"}, "max_cost_usd": "0.05", "spent_usd": "0", "rate": "0.40",
           "attempt": 1, "gpu": None, "launched_at": LAUNCHED.isoformat()}
    h = Handoff.from_json(old)
    assert (h.rate, h.max_cost_usd, h.spent_usd, h.launched_at) == (Decimal("0.40"), Decimal("0.05"), 0, LAUNCHED)
    assert h.provider_config == ProviderConfig(name="vast") and h.endpoint is None and h.ends_at is None
    assert h.agent(Connections()) is None
    assert Handoff.from_json({}) == Handoff()  # the oldest rows: nothing but what the row's columns say


def test_absent_fields_stay_out_of_the_row(tmp_path: Path) -> None:
    """An earlier version reading a row back checks keys (``"endpoint" in h``): a field not known is no key."""
    assert Handoff(tag="t").to_json() == {"tag": "t", "mounts": [], "spent_usd": "0", "attempt": 1}
    assert "endpoint" not in Handoff.from_json(full(tmp_path).to_json() | {"endpoint": None}).to_json()


def test_the_store_keeps_the_handoff_typed_and_updates_fields_in_place(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    try:
        store.record_intent("train-1234abcd", "vast", Owner.current(), Handoff(name="train", rate=Decimal("0.3")))
        store.update_handoff("train-1234abcd", endpoint=ENDPOINT, workdir="/w", python="python3")
        row = store.get("train-1234abcd")
        assert row is not None and row.handoff == Handoff(name="train", rate=Decimal("0.3"), endpoint=ENDPOINT,
                                                          workdir="/w", python="python3")
        assert row.rate_usd_per_hour == Decimal("0.3") and row.billing_since == row.created_at
    finally:
        store.close()
