"""Budget: caps, reservations, settling, periods; against real SQLite files and, for races, real processes."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import subprocess
import sys
import zoneinfo
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from burst_jupyter.budget import Budget, CapUsage, LedgerRow, period_bounds
from burst_jupyter.db import connect
from burst_jupyter.errors import BudgetExceededError

# A fixed offset, not the machine's zone: the periods follow now's own calendar, so results do not depend on TZ.
TZ = dt.timezone(dt.timedelta(hours=2))
WEDNESDAY = dt.datetime(2024, 3, 13, 12, 0, tzinfo=TZ)
MONDAY = dt.datetime(2024, 3, 11, 0, 30, tzinfo=TZ)


@pytest.fixture
def budget(tmp_path: Path) -> Iterator[Budget]:
    with Budget(tmp_path / "burst.sqlite3") as opened:
        yield opened


def reserve(budget: Budget, job_id: str, amount: str, now: dt.datetime = WEDNESDAY) -> list[str]:
    """Reserve and return the warnings."""
    made = budget.reserve(
        job_id=job_id, name="sweep", provider="local", gpu="RTX_4090", amount=Decimal(amount), now=now
    )
    return list(made.warnings)


def settle(
    budget: Budget, job_id: str, actual: str | None, started_at: dt.datetime = WEDNESDAY, **changes: object
) -> LedgerRow:
    fields: dict[str, object] = {
        "provider": "local",
        "instance_id": f"i-{job_id}",
        "gpu": "RTX_4090",
        "rate_usd_per_hour": Decimal("0.35"),
        "started_at": started_at,
        "ended_at": started_at + dt.timedelta(hours=1),
        "actual_usd": None if actual is None else Decimal(actual),
        "status": "completed",
    }
    fields.update(changes)
    return budget.settle(job_id, **fields)  # type: ignore[arg-type]


# --- reserve ---------------------------------------------------------------------------------------------


def test_reserve_within_the_cap_holds_the_amount(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))

    made = budget.reserve(
        job_id="j1", name="sweep", provider="local", gpu="RTX_4090", amount=Decimal("10"), now=WEDNESDAY
    )

    assert (made.job_id, made.amount, made.warnings) == ("j1", Decimal("10"), ())
    assert made.created_at == WEDNESDAY
    [held] = budget.open_reservations()
    assert (held.job_id, held.amount, held.name, held.provider, held.gpu) == (
        "j1",
        Decimal("10"),
        "sweep",
        "local",
        "RTX_4090",
    )
    assert budget.snapshot(WEDNESDAY).day == CapUsage("day", Decimal(0), Decimal("10"), Decimal("20"))


def test_over_the_daily_cap_raises_one_line_and_reserves_nothing(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    settle(budget, "done", "12.50")
    reserve(budget, "held", "3")

    with pytest.raises(BudgetExceededError) as raised:
        reserve(budget, "big", "10")

    assert str(raised.value) == "daily budget: $12.50 spent + $3.00 reserved + $10.00 for this job > $20.00 cap"
    assert [held.job_id for held in budget.open_reservations()] == ["held"]
    # The refused job_id was not taken: it can reserve once it fits.
    reserve(budget, "big", "4.50")


def test_a_job_that_exactly_fills_the_cap_is_allowed(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    reserve(budget, "a", "20")
    with pytest.raises(BudgetExceededError):
        reserve(budget, "b", "0.01")


def test_weekly_cap_counts_earlier_days_of_the_week(budget: Budget) -> None:
    budget.set_cap("week", Decimal("50"))
    settle(budget, "monday", "30", started_at=MONDAY)
    reserve(budget, "tuesday", "15", now=MONDAY + dt.timedelta(days=1))

    with pytest.raises(BudgetExceededError) as raised:
        reserve(budget, "wednesday", "10")

    assert str(raised.value) == "weekly budget: $30.00 spent + $15.00 reserved + $10.00 for this job > $50.00 cap"
    assert budget.caps() == {"day": None, "week": Decimal("50")}


def test_warnings_name_each_cap_at_or_past_80_percent(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    budget.set_cap("week", Decimal("40"))

    assert reserve(budget, "a", "15.99") == []  # 79.95% of the day
    assert reserve(budget, "b", "0.01") == ["daily budget at 80% ($16.00 of $20.00)"]
    assert reserve(budget, "c", "1") == ["daily budget at 85% ($17.00 of $20.00)"]
    # The next day starts empty; this job takes both it and the week past 80%.
    assert reserve(budget, "d", "17", now=WEDNESDAY + dt.timedelta(days=1)) == [
        "daily budget at 85% ($17.00 of $20.00)",
        "weekly budget at 85% ($34.00 of $40.00)",
    ]


def test_reserve_refuses_a_job_id_twice(budget: Budget) -> None:
    reserve(budget, "j1", "1")
    with pytest.raises(ValueError, match="already has a reservation"):
        reserve(budget, "j1", "1")
    settle(budget, "j1", "1")
    with pytest.raises(ValueError, match="already settled"):
        reserve(budget, "j1", "1")


@pytest.mark.parametrize("amount", [Decimal("-1"), Decimal("NaN"), Decimal("Infinity")])
def test_reserve_refuses_amounts_that_are_not_money(budget: Budget, amount: Decimal) -> None:
    with pytest.raises(ValueError, match="amount"):
        budget.reserve(job_id="j", name=None, provider="local", gpu="ANY", amount=amount, now=WEDNESDAY)
    assert budget.open_reservations() == []


def test_reserve_refuses_floats(budget: Budget) -> None:
    with pytest.raises(TypeError, match="Decimal"):
        budget.reserve(job_id="j", name=None, provider="local", gpu="ANY", amount=0.1, now=WEDNESDAY)  # type: ignore[arg-type]


def test_reserve_without_now_uses_an_aware_clock(budget: Budget) -> None:
    made = budget.reserve(job_id="j", name=None, provider="local", gpu="ANY", amount=Decimal("1"))
    assert made.created_at.utcoffset() == dt.timedelta(0)
    assert budget.open_reservations()[0].created_at == made.created_at


# --- settle and release ----------------------------------------------------------------------------------


def test_settle_writes_one_row_drops_the_reservation_and_is_idempotent(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    reserve(budget, "j1", "10")

    first = settle(budget, "j1", "4.20", message="ok")
    # A reaper settling the same job later (knowing a different cost) changes nothing.
    again = settle(budget, "j1", "9.99", status="failed")

    assert again == first
    assert (first.actual_usd, first.reserved_usd, first.status, first.name) == (
        Decimal("4.20"),
        Decimal("10"),
        "completed",
        "sweep",
    )
    assert budget.rows() == [first]
    assert budget.open_reservations() == []
    assert budget.snapshot(WEDNESDAY).day == CapUsage("day", Decimal("4.20"), Decimal(0), Decimal("20"))


def test_settle_without_a_reservation_records_zero_reserved(budget: Budget) -> None:
    row = settle(budget, "ssh-job", "1.5", name="by hand")
    assert (row.reserved_usd, row.name, row.actual_usd) == (Decimal(0), "by hand", Decimal("1.5"))


def test_unknown_cost_stays_unknown_and_counts_its_reservation(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    reserve(budget, "lost", "8")

    row = settle(budget, "lost", None, status="failed", ended_at=None)

    assert row.actual_usd is None and row.ended_at is None
    # Not $0: the most the job was allowed to cost stays counted against the cap.
    assert budget.snapshot(WEDNESDAY).day.spent == Decimal("8")
    assert budget.table().unknown == 1


def test_settle_refuses_naive_times_and_writes_nothing(budget: Budget) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        settle(budget, "j", "1", started_at=dt.datetime(2024, 3, 13, 12))
    assert budget.rows() == []


def test_release_drops_the_reservation_without_a_row_and_is_idempotent(budget: Budget) -> None:
    budget.set_cap("day", Decimal("10"))
    reserve(budget, "j1", "10")

    budget.release("j1")
    budget.release("j1")
    budget.release("never-reserved")

    assert budget.open_reservations() == [] and budget.rows() == []
    reserve(budget, "j2", "10")  # the money is free again


# --- attempts (a job retried after a preemption) -----------------------------------------------------------


def record_attempt(budget: Budget, job_id: str, attempt: int, actual: str | None, **changes: object) -> LedgerRow:
    fields: dict[str, object] = {
        "attempt": attempt,
        "provider": "vast",
        "instance_id": f"i-{job_id}-{attempt}",
        "gpu": "RTX_4090",
        "rate_usd_per_hour": Decimal("0.35"),
        "started_at": WEDNESDAY,
        "ended_at": WEDNESDAY + dt.timedelta(minutes=20),
        "actual_usd": None if actual is None else Decimal(actual),
        "status": "preempted",
    }
    fields.update(changes)
    return budget.record_attempt(job_id, **fields)  # type: ignore[arg-type]


def held(budget: Budget) -> dict[str, Decimal]:
    return {reservation.job_id: reservation.amount for reservation in budget.open_reservations()}


def test_a_lost_attempt_is_billed_on_its_own_row_and_leaves_the_rest_reserved(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    reserve(budget, "j1", "10")

    lost = record_attempt(budget, "j1", 1, "3", message="outbid")

    assert (lost.attempt, lost.status, lost.actual_usd, lost.reserved_usd, lost.name) == (
        1, "preempted", Decimal("3"), Decimal("3"), "sweep")
    assert held(budget) == {"j1": Decimal("7")}
    # Spent + still reserved is what the job reserved: nothing counted twice, the job's cap holds.
    assert budget.snapshot(WEDNESDAY).day == CapUsage("day", Decimal("3"), Decimal("7"), Decimal("20"))

    final = settle(budget, "j1", "4", attempt=2, started_at=WEDNESDAY + dt.timedelta(minutes=21))

    assert (final.attempt, final.reserved_usd, final.actual_usd, final.status) == (
        2, Decimal("7"), Decimal("4"), "completed")
    assert budget.rows() == [lost, final] and held(budget) == {}
    assert budget.snapshot(WEDNESDAY).day == CapUsage("day", Decimal("7"), Decimal(0), Decimal("20"))
    table = budget.table()
    assert (table.total, table.held, table.jobs) == (Decimal("7"), Decimal(0), 1)
    assert sum(row.reserved_usd for row in table.rows) == Decimal("10")


def test_record_attempt_and_settle_are_idempotent_per_attempt(budget: Budget) -> None:
    reserve(budget, "j1", "10")
    first = record_attempt(budget, "j1", 1, "3")
    # Recorded again (a retry of the write, knowing another cost): the first row stands, nothing lowered twice.
    assert record_attempt(budget, "j1", 1, "5", status="boot-failed") == first
    assert held(budget) == {"j1": Decimal("7")}
    second = record_attempt(budget, "j1", 2, "2", status="boot-failed")
    assert held(budget) == {"j1": Decimal("5")}

    final = settle(budget, "j1", "1", attempt=3)
    # The kernel and the reaper both settle the final attempt: the first one wins.
    assert settle(budget, "j1", "9", attempt=3, status="cancelled") == final
    assert budget.rows() == [first, second, final]
    assert [r.reserved_usd for r in budget.rows()] == [Decimal("3"), Decimal("2"), Decimal("5")]
    assert held(budget) == {}
    with pytest.raises(ValueError, match="already settled"):
        reserve(budget, "j1", "1")


def test_an_attempt_dearer_than_the_reservation_lowers_it_to_zero_not_below(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    reserve(budget, "j1", "5")

    row = record_attempt(budget, "j1", 1, "8")

    assert (row.actual_usd, row.reserved_usd) == (Decimal("8"), Decimal("5"))
    assert held(budget) == {"j1": Decimal("0")}
    assert budget.snapshot(WEDNESDAY).day.used == Decimal("8")  # what it really cost, never less


def test_an_attempt_of_unknown_cost_keeps_the_reservation_and_the_job_counts_all_of_it(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    reserve(budget, "j1", "10")

    row = record_attempt(budget, "j1", 1, None, ended_at=None)

    assert (row.actual_usd, row.reserved_usd) == (None, Decimal(0))
    assert held(budget) == {"j1": Decimal("10")}
    assert budget.snapshot(WEDNESDAY).day.used == Decimal("10")
    settle(budget, "j1", "2", attempt=2)
    # Not $2: the lost attempt may have cost anything up to what the job was allowed.
    assert budget.snapshot(WEDNESDAY).day == CapUsage("day", Decimal("10"), Decimal(0), Decimal("20"))


def test_reserve_refuses_a_job_id_with_only_a_lost_attempt(budget: Budget) -> None:
    reserve(budget, "j1", "10")
    record_attempt(budget, "j1", 1, "3")
    budget.release("j1")  # no instance found for a retry: nothing more was rented
    with pytest.raises(ValueError, match="already settled"):
        reserve(budget, "j1", "1")


def test_settle_drops_the_reservation_even_when_its_attempt_is_already_recorded(budget: Budget) -> None:
    reserve(budget, "j1", "10")
    lost = record_attempt(budget, "j1", 1, "3")
    # A reaper whose handoff still names attempt 1: the job is over, so nothing may stay held for it.
    assert settle(budget, "j1", "4", attempt=1, status="cancelled") == lost
    assert held(budget) == {}


@pytest.mark.parametrize("attempt", [0, -1, True, "2"])
def test_attempt_numbers_are_ints_from_one(budget: Budget, attempt: object) -> None:
    reserve(budget, "j1", "10")
    with pytest.raises(ValueError, match="attempt"):
        record_attempt(budget, "j1", attempt, "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempt"):
        settle(budget, "j1", "1", attempt=attempt)
    assert budget.rows() == [] and held(budget) == {"j1": Decimal("10")}


def test_sums_are_exact_decimals(budget: Budget, tmp_path: Path) -> None:
    budget.set_cap("day", Decimal("0.3"))
    reserve(budget, "a", "0.1")
    reserve(budget, "b", "0.2")  # 0.1 + 0.2 == 0.3 exactly: in floats this would be 0.30000000000000004 > 0.3
    with pytest.raises(BudgetExceededError):
        reserve(budget, "c", "0.0001")

    settle(budget, "a", "0.1")
    settle(budget, "b", "0.2")

    assert budget.snapshot(WEDNESDAY).day.spent == Decimal("0.3")
    assert budget.table().total == Decimal("0.3")
    with contextlib.closing(sqlite3.connect(tmp_path / "burst.sqlite3")) as raw:
        stored = raw.execute("SELECT actual_usd, typeof(actual_usd) FROM ledger_rows ORDER BY seq").fetchall()
    assert stored == [("0.1", "text"), ("0.2", "text")]


# --- caps and snapshots ----------------------------------------------------------------------------------


def test_caps_persist_in_the_file_and_none_removes_them(budget: Budget) -> None:
    budget.set_cap("day", Decimal("20"))
    budget.set_cap("week", Decimal("100"))
    budget.set_cap("week", None)

    with Budget(budget.path) as other:
        assert other.caps() == {"day": Decimal("20"), "week": None}


def test_set_cap_refuses_bad_input(budget: Budget) -> None:
    with pytest.raises(ValueError, match="period"):
        budget.set_cap("month", Decimal("1"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="day cap"):
        budget.set_cap("day", Decimal("-5"))
    assert budget.caps() == {"day": None, "week": None}


def test_cap_usage_labels_and_fractions() -> None:
    today = CapUsage("day", Decimal("12.50"), Decimal(0), Decimal("50"))
    week = CapUsage("week", Decimal("87.30"), Decimal(0), Decimal("200"))
    open_ended = CapUsage("day", Decimal("12.5"), Decimal("3"), None)
    hot = CapUsage("day", Decimal("12"), Decimal("5"), Decimal("20"))

    assert today.label == "Today: $12.50 / $50.00 (25%)"
    assert week.label == "This week: $87.30 / $200.00 (44%)"
    assert open_ended.label == "Today: $12.50 + $3.00 reserved (no cap)"
    assert hot.label == "Today: $12.00 + $5.00 reserved / $20.00 (85%)"
    assert (today.fraction, today.warning, today.remaining) == (0.25, False, Decimal("37.50"))
    assert (open_ended.fraction, open_ended.warning, open_ended.remaining) == (None, False, None)
    assert (hot.fraction, hot.warning) == (0.85, True)


def test_snapshot_str_is_one_line_per_cap(budget: Budget) -> None:
    budget.set_cap("day", Decimal("50"))
    settle(budget, "j", "12.5")
    assert str(budget.snapshot(WEDNESDAY)) == "Today: $12.50 / $50.00 (25%)\nThis week: $12.50 (no cap)"


# --- periods ---------------------------------------------------------------------------------------------


def test_yesterday_counts_in_the_week_but_not_today(budget: Budget) -> None:
    settle(budget, "yesterday", "5", started_at=WEDNESDAY - dt.timedelta(days=1))
    reserve(budget, "held-yesterday", "2", now=WEDNESDAY - dt.timedelta(days=1))
    settle(budget, "today", "1")

    snap = budget.snapshot(WEDNESDAY)

    assert (snap.day.spent, snap.day.reserved) == (Decimal("1"), Decimal(0))
    assert (snap.week.spent, snap.week.reserved) == (Decimal("6"), Decimal("2"))


def test_monday_starts_a_new_week(budget: Budget) -> None:
    sunday_night = MONDAY - dt.timedelta(hours=1)  # Sunday 23:30
    settle(budget, "sunday", "40", started_at=sunday_night)
    reserve(budget, "sunday-held", "7", now=sunday_night)
    settle(budget, "monday", "3", started_at=MONDAY - dt.timedelta(minutes=20))  # Monday 00:10

    snap = budget.snapshot(MONDAY)

    assert (snap.day.spent, snap.day.reserved) == (Decimal("3"), Decimal(0))
    assert (snap.week.spent, snap.week.reserved) == (Decimal("3"), Decimal(0))
    assert budget.snapshot(sunday_night).week.spent == Decimal("40")


def test_periods_follow_the_calendar_of_nows_zone(budget: Budget) -> None:
    # 23:30 UTC on Sunday is 01:30 on Monday at UTC+2. Asked at 01:00 UTC on Monday, the same instant
    # seen from two zones: the row is today's at UTC+2, yesterday's (and last week's) in UTC.
    settle(budget, "late", "5", started_at=dt.datetime(2024, 3, 10, 23, 30, tzinfo=dt.timezone.utc))
    now = dt.datetime(2024, 3, 11, 1, 0, tzinfo=dt.timezone.utc)

    assert budget.snapshot(now.astimezone(TZ)).day.spent == Decimal("5")
    assert budget.snapshot(now).week.spent == Decimal(0)


def test_period_bounds() -> None:
    assert period_bounds("day", WEDNESDAY) == (
        dt.datetime(2024, 3, 13, tzinfo=TZ),
        dt.datetime(2024, 3, 14, tzinfo=TZ),
    )
    assert period_bounds("week", WEDNESDAY) == (
        dt.datetime(2024, 3, 11, tzinfo=TZ),
        dt.datetime(2024, 3, 18, tzinfo=TZ),
    )
    assert period_bounds("week", MONDAY)[0] == dt.datetime(2024, 3, 11, tzinfo=TZ)
    with pytest.raises(ValueError, match="timezone-aware"):
        period_bounds("day", dt.datetime(2024, 3, 13))


def test_a_week_across_a_daylight_saving_change_keeps_local_midnights() -> None:
    try:
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone data on this machine")
    start, end = period_bounds("week", dt.datetime(2024, 3, 31, 12, tzinfo=berlin))  # clocks went forward at 2:00
    assert (start.utcoffset(), end.utcoffset()) == (dt.timedelta(hours=1), dt.timedelta(hours=2))
    assert end.astimezone(dt.timezone.utc) - start.astimezone(dt.timezone.utc) == dt.timedelta(days=7, hours=-1)


# --- many processes --------------------------------------------------------------------------------------

_RACER = """
import datetime as dt, sys
from decimal import Decimal
from pathlib import Path
from burst_jupyter.budget import Budget
from burst_jupyter.db import connect
from burst_jupyter.errors import BudgetExceededError

path, job_id, now = Path(sys.argv[1]), sys.argv[2], dt.datetime.fromisoformat(sys.argv[3])
budget = Budget(path) if sys.argv[4] == "early" else None
print("ready", flush=True)
sys.stdin.readline()  # every racer waits here until the parent says go
budget = budget or Budget(path)
try:
    budget.reserve(job_id=job_id, name="race", provider="local", gpu="RTX_4090", amount=Decimal("10"), now=now)
except BudgetExceededError:
    print("refused", flush=True)
else:
    print("reserved", flush=True)
"""


def race(path: Path, racers: int, open_when: str) -> list[str]:
    """Start ``racers`` processes, let each get ready, then release them together; their answers."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(path), f"job-{n}", WEDNESDAY.isoformat(), open_when],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(racers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.communicate()[1]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        answers = []
        for proc in procs:
            out, err = proc.communicate()
            assert proc.returncode == 0, err
            answers.append(out.strip())
        return answers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_eight_processes_race_for_a_50_dollar_cap_and_exactly_5_win(tmp_path: Path) -> None:
    path = tmp_path / "burst.sqlite3"
    with Budget(path) as budget:
        budget.set_cap("day", Decimal("50"))

    answers = race(path, 8, open_when="early")

    assert sorted(answers) == ["refused"] * 3 + ["reserved"] * 5
    with Budget(path) as budget:
        held = budget.open_reservations()
        assert len(held) == 5
        assert budget.snapshot(WEDNESDAY).day.reserved == Decimal("50")


def test_eight_processes_create_the_schema_at_once(tmp_path: Path) -> None:
    path = tmp_path / "burst.sqlite3"
    # A WAL file without budget tables, as the state store leaves it: the racers all create the schema at once.
    connect(path).close()

    answers = race(path, 8, open_when="late")

    assert answers == ["reserved"] * 8
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("SELECT count(*) FROM budget_schema_version").fetchone() == (1,)
        assert raw.execute("SELECT count(*) FROM budget_reservations").fetchone() == (8,)


def test_eight_processes_open_a_brand_new_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh.sqlite3"

    answers = race(path, 8, open_when="late")

    assert answers == ["reserved"] * 8
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("SELECT count(*) FROM budget_schema_version").fetchone() == (1,)
        assert raw.execute("SELECT count(*) FROM budget_reservations").fetchone() == (8,)
