"""``--json`` on the ``burst`` commands that show something (issue 10): one JSON document, the same keys every time,
money as decimal strings. The real CLI: ``main([...])`` in this process as tests/test_cli.py calls it, and a
``python -m burst_jupyter.cli`` process where it matters that nothing else reaches stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import ledger_rows, wait_until
from marketplaces import Markets

import burst_jupyter as burst
from burst_jupyter import EventType, JobSpec, JobStatus
from burst_jupyter.cli import main
from burst_jupyter.job_log import read_events

pytestmark = pytest.mark.timeout(90)

Capsys = pytest.CaptureFixture[str]
TICKING = "import time\nfor i in range(1200):\n    print('tick', i, flush=True)\n    time.sleep(0.05)\n"


def cli_json(capsys: Capsys, *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def money(value: Any) -> Decimal:
    assert isinstance(value, str), f"money must be a decimal string, not {value!r}"
    return Decimal(value)


def test_a_finished_job_its_ledger_and_the_budget(burst_home: Path, capsys: Capsys) -> None:
    assert main(["submit", "--provider", "local", "--name", "hello", "--rate", "0.347", "--max-cost", "1", "--",
                 sys.executable, "-c", "print('one'); print('two')"]) == 0
    capsys.readouterr()
    [row] = ledger_rows(burst_home)

    # A process of its own: stdout is the JSON document and nothing else.
    proc = subprocess.run([sys.executable, "-m", "burst_jupyter.cli", "show", row.job_id, "--lines", "1", "--json"],
                          capture_output=True, text=True, timeout=60, check=True)
    shown = json.loads(proc.stdout)
    assert (shown["job_id"], shown["status"], shown["name"], shown["provider"]) == (row.job_id, "completed",
                                                                                   "hello", "local")
    assert money(shown["rate_usd_per_hour"]) == Decimal("0.347") and money(shown["max_cost_usd"]) == 1
    assert shown["cost_settled"] is True and money(shown["cost_usd"]) == row.actual_usd
    assert shown["output"] == ["two"] and shown["output_lines"] == 2 and shown["owner"] is None
    assert {e["type"] for e in shown["events"]} >= {"started", "completed"}
    assert [a["job_id"] for a in shown["attempts"]] == [row.job_id]

    ledger = cli_json(capsys, "ledger")
    assert ledger["by"] is None and ledger["groups"] is None and ledger["jobs"] == 1
    [line] = ledger["rows"]
    assert (line["job_id"], line["provider"], line["status"]) == (row.job_id, "local", "completed")
    assert money(line["rate_usd_per_hour"]) == Decimal("0.347") and money(line["actual_usd"]) == row.actual_usd
    assert money(ledger["total_usd"]) == row.actual_usd
    grouped = cli_json(capsys, "ledger", "--by", "provider")
    assert grouped["by"] == "provider" and [g["key"] for g in grouped["groups"]] == ["local"]
    assert set(grouped) == set(ledger)  # stable keys, grouped or not

    bars = cli_json(capsys, "budget", "set", "--daily", "5")
    assert money(bars["day"]["cap_usd"]) == 5 and bars["week"]["cap_usd"] is None
    shown_bars = cli_json(capsys, "budget", "show")
    assert shown_bars == bars and money(shown_bars["day"]["spent_usd"]) == row.actual_usd
    assert set(shown_bars["day"]) == set(shown_bars["week"])
    assert cli_json(capsys, "list") == []


def test_a_running_job_in_list_and_show_has_the_same_keys_as_a_finished_one(burst_home: Path,
                                                                           capsys: Capsys) -> None:
    job = burst.submit(JobSpec(name="ticker", cell=TICKING, rate_usd_per_hour=1, max_cost_usd="0.5"))
    wait_until(lambda: any(e.type is EventType.STARTED for e in read_events(job.id) or []), "the job started")
    [held] = cli_json(capsys, "list")
    assert (held["job_id"], held["provider"], held["state"], held["orphaned"]) == (job.id, "local", "launched",
                                                                                   False)
    assert money(held["rate_usd_per_hour"]) == 1 and set(held["owner"]) == {"host", "pid"}
    running = cli_json(capsys, "show", job.id)
    assert running["status"] == "running" and running["cost_settled"] is False
    assert money(running["cost_so_far_usd"]) <= Decimal("0.5") and running["owner"]["gone"] is False

    assert main(["kill", job.id]) == 0
    capsys.readouterr()
    assert job.wait(timeout=30).status is JobStatus.CANCELLED
    ended = cli_json(capsys, "show", job.id)
    assert ended["status"] == "cancelled" and set(ended) == set(running)


@pytest.mark.ssh
def test_providers_and_offers(markets: Markets, capsys: Capsys) -> None:
    providers = cli_json(capsys, "providers", "status")
    assert [p["provider"] for p in providers] == ["vast", "runpod", "thunder", "lambda"]
    assert all(p["configured"] and p["reachable"] for p in providers)
    assert money(providers[0]["lowest"]["RTX_4090"]["price_usd_per_hour"]) == Decimal("0.298")
    assert providers[0]["lowest"]["RTX_4090"]["offers"] >= 1

    found = cli_json(capsys, "offers", "--gpu", "RTX_4090", "--max-price", "0.5")
    assert found["errors"] == {} and found["error"] is None and found["left_out"] == []
    first = found["offers"][0]
    assert (first["offer"], first["gpu_model"], first["gpus"]) == ("vast:4102", "RTX_4090", 1)
    assert money(first["price_usd_per_hour"]) == Decimal("0.298") and money(first["price_usd_per_gpu_hour"])
    assert len({frozenset(o) for o in found["offers"]}) == 1  # every offer has the same keys
    assert {o["provider"] for o in found["offers"]} == {"vast", "runpod"}
    # "offer" is what --offer takes: RunPod's GPU type and cloud in one word; the cloud is its tier
    runpod = next(o for o in found["offers"] if o["provider"] == "runpod")
    assert (runpod["offer"], runpod["tier"], runpod["prototyping"]) == (
        "runpod:NVIDIA_GeForce_RTX_4090@community", "community", False)
    by_reliability = cli_json(capsys, "offers", "--gpu", "RTX_4090", "--sort", "reliability")
    scores = [o["reliability"] for o in by_reliability["offers"]]
    assert scores == sorted(scores, reverse=True)
