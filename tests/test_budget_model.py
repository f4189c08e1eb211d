"""Budgets that do what users mean (issue 10), and rates shown as providers price them.

Where a cap lives and which one holds: ``burst budget set`` stores a cap in the budget file, for every folder; a
``daily-budget``/``weekly-budget`` in a config file is read each time a session starts, and holds for the jobs
of that session only (never stored). The lowest cap that applies holds, so a project's cap can only tighten.
Against real SQLite files, real sessions started in real folders, the CLI in this process, and the shell with
real local jobs.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import ledger_rows, open_reservations, run_cell, usage_line, write

import burst_jupyter as burst
from burst_jupyter.budget import Budget, LedgerRow, LedgerTable
from burst_jupyter.cli import main
from burst_jupyter.errors import BudgetExceededError
from burst_jupyter.money import format_rate
from burst_jupyter.providers.base import OfferQuery
from burst_jupyter.session import Session

Capsys = pytest.CaptureFixture[str]
NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.timezone.utc)


def project(folder: Path, table: str) -> Path:
    write(folder / "pyproject.toml", f"[project]\nname = 'p'\n\n[tool.burst]\n{table}\n")
    return folder


def session_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Session:
    """The session a kernel started in ``folder`` gets (the previous one closed, as after a restart)."""
    Session.reset_current()
    monkeypatch.chdir(folder)
    return Session.current()


def stored_caps(home: Path) -> dict[str, Decimal | None]:
    with Budget(home / "burst.sqlite3") as budget:
        return dict(budget.caps())


# --- where a cap lives --------------------------------------------------------------------------------------


def test_a_project_cap_holds_for_its_own_jobs_is_never_stored_and_follows_edits(
        tmp_path: Path, burst_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = project(tmp_path / "here", "daily-budget = 20")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    snapshot = session_in(here, monkeypatch).budget.snapshot()
    assert snapshot.day.cap == Decimal(20) and snapshot.week.cap is None
    assert "pyproject.toml" in (snapshot.day.source or "")
    assert stored_caps(burst_home) == {"day": None, "week": None}  # nothing seeded into the shared file

    # In another folder the project's cap does not apply.
    assert session_in(elsewhere, monkeypatch).budget.snapshot().day.cap is None

    # An edit holds from the next session on; so does a removal.
    project(here, "daily-budget = 10")
    assert session_in(here, monkeypatch).budget.snapshot().day.cap == Decimal(10)
    project(here, "max-cost = 1")
    assert session_in(here, monkeypatch).budget.snapshot().day.cap is None

    # Removing the stored cap leaves the project's in force, and it does not come back as a stored one.
    project(here, "daily-budget = 10")
    assert main(["budget", "set", "--daily", "none"]) == 0
    assert session_in(here, monkeypatch).budget.snapshot().day.cap == Decimal(10)
    assert stored_caps(burst_home) == {"day": None, "week": None}


def test_the_lowest_cap_holds_so_a_project_only_tightens(
        tmp_path: Path, burst_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = project(tmp_path / "here", "daily-budget = 20")
    budget = session_in(here, monkeypatch).budget
    budget.set_cap("day", Decimal(10))  # tighter than the project: it holds
    assert budget.snapshot(NOW).day.cap == Decimal(10)
    with pytest.raises(BudgetExceededError) as tighter:
        budget.reserve(job_id="a", name=None, provider="local", gpu="", amount=Decimal(11), now=NOW)
    assert str(tighter.value) == "daily budget: $0.00 spent + $0.00 reserved + $11.00 for this job > $10.00 cap"

    budget.set_cap("day", Decimal(50))  # looser than the project: the project's 20 holds, and is named
    with pytest.raises(BudgetExceededError) as project_cap:
        budget.reserve(job_id="b", name=None, provider="local", gpu="", amount=Decimal(21), now=NOW)
    assert str(project_cap.value) == (
        f"daily budget: $0.00 spent + $0.00 reserved + $21.00 for this job > $20.00 cap "
        f"(daily-budget in {here / 'pyproject.toml'} [tool.burst])")
    assert budget.reserve(job_id="c", name=None, provider="local", gpu="", amount=Decimal(20), now=NOW)

    # Jobs of other folders count against it: the cap is on what all jobs spend today.
    elsewhere = session_in(tmp_path, monkeypatch).budget
    assert elsewhere.snapshot(NOW).day.cap == Decimal(50)
    budget = session_in(here, monkeypatch).budget
    with pytest.raises(BudgetExceededError):
        budget.reserve(job_id="d", name=None, provider="local", gpu="", amount=Decimal("0.01"), now=NOW)


def test_budget_show_says_where_each_cap_comes_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    user = write(tmp_path / "user.toml", "weekly-budget = 100\n")
    monkeypatch.setenv("BURST_CONFIG", str(user))
    here = project(tmp_path / "here", "daily-budget = 20")
    monkeypatch.chdir(here)
    assert main(["budget", "set", "--daily", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "Today: $0.00 / $20.00 (0%)",
        "This week: $0.00 / $100.00 (0%)",
        f"daily cap $20.00: daily-budget in {here / 'pyproject.toml'} [tool.burst], for jobs started under "
        f"{here} (holds: the lowest)",
        "daily cap $50.00: set with burst budget set, for every folder",
        f"weekly cap $100.00: weekly-budget in {user}, for every folder",
    ]
    monkeypatch.chdir(tmp_path)
    assert main(["budget", "set", "--daily", "none"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "daily cap: none",
        f"weekly cap $100.00: weekly-budget in {user}, for every folder",
    ]


# --- what a job holds ---------------------------------------------------------------------------------------


def test_a_job_at_a_known_zero_rate_holds_nothing_against_the_cap(ip: Any, burst_home: Path) -> None:
    burst.set_daily_budget(usd=1)
    result, streams = run_cell(ip, "%%burst --provider local --max-cost 10\nprint('free')\n")
    assert result.error_in_exec is None, result.error_in_exec
    assert "free" in streams.text("stdout")
    [row] = ledger_rows(burst_home)
    assert (row.rate_usd_per_hour, row.reserved_usd, row.actual_usd) == (Decimal(0), Decimal(0), Decimal(0))
    assert open_reservations(burst_home) == []
    # A declared rate is still held for its whole cap.
    result, _ = run_cell(ip, "%%burst --provider local --rate 1 --max-cost 10\nprint('paid')\n")
    assert "daily budget" in usage_line(result)


def row(job_id: str, reserved: str, actual: str | None, **changes: Any) -> LedgerRow:
    fields: dict[str, Any] = {
        "job_id": job_id, "name": None, "provider": "vast", "instance_id": "i", "gpu": "RTX_4090",
        "rate_usd_per_hour": Decimal("0.347"), "started_at": NOW, "ended_at": NOW + dt.timedelta(hours=1),
        "reserved_usd": Decimal(reserved), "actual_usd": None if actual is None else Decimal(actual),
        "status": "completed", "message": None, "recorded_at": NOW}
    return LedgerRow(**(fields | changes))


def test_the_ledger_shows_what_is_reserved_now_apart_from_past_reservations(
        tmp_path: Path, burst_home: Path, capsys: Capsys) -> None:
    with Budget(burst_home / "burst.sqlite3") as budget:
        for job_id in ("old1", "old2"):
            budget.reserve(job_id=job_id, name=None, provider="vast", gpu="RTX_4090", amount=Decimal(5), now=NOW)
            budget.settle(job_id, provider="vast", instance_id="i", gpu="RTX_4090", rate_usd_per_hour=Decimal("0.347"),
                          started_at=NOW, ended_at=NOW + dt.timedelta(hours=1), actual_usd=Decimal("0.35"),
                          status="completed", now=NOW)
        budget.reserve(job_id="live", name="sweep", provider="vast", gpu="RTX_4090", amount=Decimal(3), now=NOW)
        table = budget.table(tz=dt.timezone.utc)
    assert (table.total, table.held) == (Decimal("0.70"), Decimal(3))
    text = repr(table).splitlines()
    assert text[0].split() == ["started", "job", "name", "provider", "gpu", "$/h", "time", "reserved", "reserved",
                               "now", "actual", "status"]
    [live] = [line for line in text if "live" in line]
    assert "$3.00" in live and "running" in live
    totals = text[-1].split()
    # The past reservations ($5 + $5) are shown per job and never added up; what is held now is.
    assert "$10.00" not in text[-1] and totals[:3] == ["total", "3", "jobs"], text
    assert "$3.00" in totals and "$0.70" in totals, totals
    grouped = repr(table.by("provider")).splitlines()
    assert grouped[0].split() == ["provider", "jobs", "actual", "reserved", "now"]
    assert grouped[2].split() == ["vast", "3", "$0.70", "$3.00"]
    assert main(["ledger", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["reserved_now_usd"] == "3" and [r["job_id"] for r in document["reservations"]] == ["live"]
    # Nothing held: no such column.
    settled_only = LedgerTable([row("a", "5", "1")], tz=dt.timezone.utc)
    assert "now" not in repr(settled_only).splitlines()[0]


# --- rates as providers price them --------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "shown"), [
    ("0.347", "$0.347"), ("0.35", "$0.35"), ("0.5", "$0.50"), ("2", "$2.00"), ("1.2345", "$1.2345"),
    ("0.52166666666666667", "$0.5217"), ("0", "$0.00"), ("0.0004213", "$0.00042"), (None, "unknown"),
])
def test_format_rate(rate: str | None, shown: str) -> None:
    assert format_rate(None if rate is None else Decimal(rate)) == shown


def test_a_vast_rate_shows_to_the_tenth_of_a_cent_in_the_ledger_and_the_views(
        markets: Any, capsys: Capsys) -> None:
    from burst_jupyter.events import EventType, JobEvent
    from burst_jupyter.widgets.offer_table import offer_rows

    offer = markets.vast.add_offer(gpu_name="RTX 4090", dph_total=0.347, dph_base=0.347)
    assert main(["offers", "--gpu", "RTX_4090", "--provider", "vast"]) == 0
    assert "$0.347" in capsys.readouterr().out
    found = Session.current().search_offers(OfferQuery(gpu_model="RTX_4090"), providers=["vast"])
    [mine] = [o for o in found.offers if o.offer_id == str(offer["id"])]
    assert offer_rows([mine])[0].price == "$0.347"
    assert "$0.347/h" in repr(Session.current().dry_run(burst.JobSpec(
        provider="vast", offer=f"vast:{offer['id']}", gpu_model="RTX_4090", max_cost_usd=Decimal(1),
        cell="print(1)")))
    event = JobEvent(type=EventType.OFFER_SELECTED, job_id="j", provider="vast",
                     cost_per_hour_usd=mine.price_usd_per_hour)
    assert "$0.347/h" in event.describe()
    table = LedgerTable([row("a", "1", "0.35", rate_usd_per_hour=mine.price_usd_per_hour)], tz=dt.timezone.utc)
    assert "$0.347" in repr(table) and "$0.347" in table._repr_html_()
