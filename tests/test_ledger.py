"""The ledger: append-only storage, schema, money and time codecs, and LedgerTable's views."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import sqlite3
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from burst_jupyter.budget import Budget, LedgerGroup, LedgerRow, LedgerTable, format_usd
from burst_jupyter.budget.ledger import _MIGRATIONS, SCHEMA_VERSION
from burst_jupyter.errors import BurstError

UTC = dt.timezone.utc
START = dt.datetime(2024, 3, 13, 10, 0, tzinfo=UTC)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "burst.sqlite3"


@pytest.fixture
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection beside the Budget, to do what the library never would."""
    Budget(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


def row(job_id: str, actual: str | None, started_at: dt.datetime = START, **changes: object) -> LedgerRow:
    """A ledger row for table tests, which need no database: it ran 1h 02m from ``started_at``."""
    base = LedgerRow(
        job_id=job_id,
        name="sweep",
        provider="vast",
        instance_id="42",
        gpu="RTX_4090",
        rate_usd_per_hour=Decimal("0.35"),
        started_at=started_at,
        ended_at=started_at + dt.timedelta(hours=1, minutes=2),
        reserved_usd=Decimal("1"),
        actual_usd=None if actual is None else Decimal(actual),
        status="completed",
        message=None,
        recorded_at=started_at + dt.timedelta(hours=2),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def record(budget: Budget, kept: LedgerRow) -> LedgerRow:
    """Settle ``kept`` through the public API and return what was stored."""
    return budget.settle(
        kept.job_id,
        provider=kept.provider,
        instance_id=kept.instance_id,
        gpu=kept.gpu,
        rate_usd_per_hour=kept.rate_usd_per_hour,
        started_at=kept.started_at,
        ended_at=kept.ended_at,
        actual_usd=kept.actual_usd,
        status=kept.status,
        name=kept.name,
        message=kept.message,
        now=kept.recorded_at,
    )


# --- storage ---------------------------------------------------------------------------------------------


def test_ledger_rows_refuse_update_and_delete(path: Path, raw: sqlite3.Connection) -> None:
    with Budget(path) as budget:
        record(budget, row("j1", "4.20"))

    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("UPDATE ledger_rows SET actual_usd = '0' WHERE job_id = 'j1'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM ledger_rows")

    assert raw.execute("SELECT job_id, actual_usd FROM ledger_rows").fetchall() == [("j1", "4.20")]


def test_rows_round_trip_exactly_and_in_utc(path: Path) -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    kept = row(
        "j1",
        "0.0042",
        started_at=START.astimezone(plus_two),
        rate_usd_per_hour=Decimal("1.23456789"),
        message="preempted",
        ended_at=None,
    )
    with Budget(path) as budget:
        stored = record(budget, kept)
    with Budget(path) as reopened:
        [again] = reopened.rows()

    assert again == stored
    assert stored.started_at == START and stored.started_at.utcoffset() == dt.timedelta(0)
    assert (stored.rate_usd_per_hour, stored.actual_usd, stored.ended_at, stored.message) == (
        Decimal("1.23456789"),
        Decimal("0.0042"),
        None,
        "preempted",
    )


def test_rows_since_and_order(path: Path) -> None:
    with Budget(path) as budget:
        for job_id, hours in (("late", 5), ("early", 1), ("middle", 3)):
            record(budget, row(job_id, "1", started_at=START + dt.timedelta(hours=hours)))

        assert [r.job_id for r in budget.rows()] == ["early", "middle", "late"]
        assert [r.job_id for r in budget.rows(since=START + dt.timedelta(hours=3))] == ["middle", "late"]


def test_schema_is_versioned_and_shares_the_file(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE instances (id TEXT PRIMARY KEY)")  # the state store got there first
        conn.execute("INSERT INTO instances VALUES ('i-1')")

    Budget(path).close()
    Budget(path).close()  # opening again migrates nothing

    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert conn.execute("SELECT version FROM budget_schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("SELECT id FROM instances").fetchall() == [("i-1",)]
    ours = tables - {"instances", "sqlite_sequence"}
    assert ours and all(name.startswith(("budget_", "ledger_")) for name in ours)


def test_a_file_from_a_newer_release_is_refused(path: Path, raw: sqlite3.Connection) -> None:
    raw.execute("UPDATE budget_schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(BurstError, match="upgrade burst-jupyter"):
        Budget(path)


def v1_file(path: Path) -> None:
    """A file as a release with budget schema 1 left it (one row per job): migration 1 as it ever was, and data."""
    [statements] = [statements for version, statements in _MIGRATIONS if version == 1]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in statements:
            conn.execute(statement)
        conn.execute(
            "CREATE TABLE budget_schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
        )
        conn.execute("INSERT INTO budget_schema_version VALUES (1, 1)")
        for job_id, actual, hour in (("old-2", None, "11"), ("old-1", "4.20", "10")):
            conn.execute(
                "INSERT INTO ledger_rows (job_id, name, provider, instance_id, gpu, rate_usd_per_hour, started_at,"
                " ended_at, reserved_usd, actual_usd, status, message, recorded_at)"
                " VALUES (?, 'sweep', 'vast', '42', 'RTX_4090', '0.35', ?, NULL, '5', ?, 'completed', NULL, ?)",
                (job_id, f"2024-03-13T{hour}:00:00.000000+00:00", actual, f"2024-03-13T{hour}:30:00.000000+00:00"),
            )
        conn.execute(
            "INSERT INTO budget_reservations VALUES ('running', NULL, 'vast', 'H100', '7.5',"
            " '2024-03-13T12:00:00.000000+00:00')"
        )
        conn.execute("INSERT INTO budget_caps VALUES ('day', '20')")


def test_a_v1_file_upgrades_in_place_keeping_rows_reservations_and_caps(path: Path) -> None:
    v1_file(path)

    with Budget(path) as budget:
        old = budget.rows()
        assert [(r.job_id, r.attempt, r.actual_usd, r.reserved_usd) for r in old] == [
            ("old-1", 1, Decimal("4.20"), Decimal("5")),
            ("old-2", 1, None, Decimal("5")),
        ]
        assert old[0].started_at == START and old[0].recorded_at == START + dt.timedelta(minutes=30)
        assert [(r.job_id, r.amount) for r in budget.open_reservations()] == [("running", Decimal("7.5"))]
        assert budget.caps() == {"day": Decimal("20"), "week": None}
        # The new shape: one row per (job, attempt).
        budget.record_attempt(
            "running", attempt=1, provider="vast", instance_id="43", gpu="H100", rate_usd_per_hour=Decimal("2"),
            started_at=START, ended_at=START, actual_usd=Decimal("0.5"), status="preempted",
        )
        final = budget.settle(
            "running", attempt=2, provider="vast", instance_id="44", gpu="H100", rate_usd_per_hour=Decimal("2"),
            started_at=START, ended_at=START, actual_usd=Decimal("1"), status="completed",
        )
        assert (final.reserved_usd, budget.open_reservations()) == (Decimal("7.0"), [])

    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        assert raw.execute("SELECT version FROM budget_schema_version").fetchall() == [(SCHEMA_VERSION,)]
        # Rowids kept, and the sequence goes on after them: insertion order survives the rebuild.
        assert raw.execute("SELECT job_id, attempt FROM ledger_rows ORDER BY seq").fetchall() == [
            ("old-2", 1), ("old-1", 1), ("running", 1), ("running", 2)]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            raw.execute(
                "INSERT INTO ledger_rows (job_id, attempt, provider, gpu, rate_usd_per_hour, started_at,"
                " reserved_usd, status, recorded_at) VALUES ('running', 2, 'vast', '', '0', '', '0', 'x', '')"
            )
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("UPDATE ledger_rows SET actual_usd = '0'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("DELETE FROM ledger_rows")
        schema = dict(raw.execute("SELECT name, type FROM sqlite_master WHERE tbl_name LIKE 'ledger_rows%'"))
    assert schema == {
        "ledger_rows": "table",
        "ledger_rows_started_at": "index",
        "ledger_rows_no_update": "trigger",
        "ledger_rows_no_delete": "trigger",
        "sqlite_autoindex_ledger_rows_1": "index",  # UNIQUE (job_id, attempt)
    }


# --- money formatting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        (Decimal("1.234"), "$1.23"),
        (Decimal("12.5"), "$12.50"),
        (Decimal("0"), "$0.00"),
        (Decimal("0.01"), "$0.01"),
        (Decimal("0.004213"), "$0.0042"),
        (Decimal("0.004"), "$0.004"),
        (Decimal("0.00999"), "$0.01"),
        (Decimal("1E+3"), "$1000.00"),
        (Decimal("-2.5"), "-$2.50"),
        (None, "unknown"),
    ],
)
def test_format_usd(amount: Decimal | None, shown: str) -> None:
    assert format_usd(amount) == shown


# --- LedgerTable -----------------------------------------------------------------------------------------


def sample() -> LedgerTable:
    return LedgerTable(
        [
            row("a", "1.10", provider="vast"),
            row("b", "2.20", provider="runpod", gpu="H100", started_at=START + dt.timedelta(days=1)),
            row("c", None, provider="vast", status="failed", ended_at=None, started_at=START + dt.timedelta(days=1)),
        ],
        tz=UTC,
    )


def test_totals_count_unknown_costs_apart() -> None:
    table = sample()
    assert (table.total, table.unknown, table.held) == (Decimal("3.30"), 1, Decimal(0))


def test_by_groups_sum_actual_and_count_jobs() -> None:
    groups = sample().by("provider").groups
    assert groups is not None
    assert [(g.key, g.jobs, g.actual, g.held, g.unknown) for g in groups] == [
        ("runpod", 1, Decimal("2.20"), Decimal(0), 0),
        ("vast", 2, Decimal("1.10"), Decimal(0), 1),
    ]
    by_day = sample().by("day").groups
    assert by_day is not None
    assert [(g.key, g.jobs) for g in by_day] == [("2024-03-13", 1), ("2024-03-14", 2)]
    assert sample().groups is None


def test_since_filters_and_keeps_the_grouping() -> None:
    later = sample().by("status").since(START + dt.timedelta(hours=1))
    assert [r.job_id for r in later.rows] == ["b", "c"]
    assert later.group_by == "status"
    with pytest.raises(ValueError, match="timezone-aware"):
        sample().since(dt.datetime(2024, 3, 13))


def test_by_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="group by"):
        sample().by("name")  # type: ignore[arg-type]


def test_text_repr_is_an_aligned_table_with_totals() -> None:
    text = repr(sample())
    lines = text.splitlines()

    assert lines[0].split() == [
        "started",
        "job",
        "name",
        "provider",
        "gpu",
        "$/h",
        "time",
        "reserved",
        "actual",
        "status",
    ]
    assert lines[2].split() == [
        "2024-03-13",
        "10:00",
        "a",
        "sweep",
        "vast",
        "RTX_4090",
        "$0.35",
        "1h",
        "02m",
        "$1.00",
        "$1.10",
        "completed",
    ]
    assert "unknown" in lines[4]  # c: duration and cost both unknown
    assert lines[-1].split() == ["total", "3", "jobs", "$3.30", "+", "1", "unknown"]  # past reservations: no sum
    # Right-aligned money: every "actual" cell ends where its title does.
    end = lines[0].index("actual") + len("actual")
    assert all(line[end - 1] != " " and line[end : end + 1] in ("", " ") for line in lines[2:5])


def test_grouped_text_repr_lines_up() -> None:
    lines = repr(sample().by("gpu")).splitlines()
    assert lines[0].split() == ["gpu", "jobs", "actual"]
    assert lines[2].split() == ["H100", "1", "$2.20"]
    assert lines[3].split() == ["RTX_4090", "2", "$1.10", "+", "1", "unknown"]
    assert lines[-1].split() == ["total", "3", "$3.30", "+", "1", "unknown"]
    assert len({len(line) for line in lines}) == 1  # last column right-aligned: every line the same width


def test_html_repr_escapes_and_has_a_totals_row() -> None:
    table = LedgerTable([row("j<1>", "1", name="<b>x</b>"), row("j2", None)], tz=UTC)

    page = table._repr_html_()

    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "j&lt;1&gt;" in page
    assert page.startswith('<div class="mathjax_ignore tex2jax_ignore"><table') and page.endswith("</table></div>")
    assert "<tfoot" in page and "2 jobs" in page and "$1.00 + 1 unknown" in page
    assert '<th style="white-space:nowrap">provider</th>' in table.by("provider")._repr_html_()


def test_an_empty_table_still_renders() -> None:
    empty = LedgerTable([])
    assert (empty.total, empty.unknown) == (Decimal(0), 0)
    assert repr(empty).splitlines()[-1].split() == ["total", "0", "jobs", "$0.00"]
    assert "0 jobs" in empty._repr_html_()


def test_budget_table_holds_all_rows(path: Path) -> None:
    with Budget(path) as budget:
        for kept in sample().rows:
            record(budget, kept)
        table = budget.table(tz=UTC)
    assert [r.job_id for r in table.rows] == ["a", "b", "c"]
    assert (table.total, table.unknown) == (Decimal("3.30"), 1)


def retried() -> LedgerTable:
    """Job "a" lost its first instance and finished on a second; "b" ran once."""
    return LedgerTable(
        [
            row("a", "0.40", status="preempted", reserved_usd=Decimal("0.40")),
            row("a", "1.10", attempt=2, started_at=START + dt.timedelta(hours=1), reserved_usd=Decimal("0.60")),
            row("b<i>", None, provider="runpod", started_at=START + dt.timedelta(hours=2)),
        ],
        tz=UTC,
    )


def test_a_retried_job_shows_each_attempt_and_the_totals_sum_them_all() -> None:
    table = retried()
    lines = repr(table).splitlines()

    assert lines[0].split()[:4] == ["started", "job", "attempt", "name"]
    assert [line.split()[2:5] for line in lines[2:5]] == [["a", "1", "sweep"], ["a", "2", "sweep"],
                                                          ["b<i>", "1", "sweep"]]
    assert lines[2].split()[-1] == "preempted"
    assert lines[-1].split() == ["total", "2", "jobs", "3", "attempts", "$1.50", "+", "1", "unknown"]
    assert (table.total, table.held, table.jobs, table.unknown) == (Decimal("1.50"), Decimal(0), 2, 1)
    page = table._repr_html_()
    assert '<th style="white-space:nowrap;text-align:right">attempt</th>' in page and "3 attempts" in page
    assert "b&lt;i&gt;" in page and "b<i>" not in page


def test_a_retried_job_counts_once_per_group_with_its_attempts() -> None:
    by_provider = retried().by("provider")
    assert by_provider.groups == [
        LedgerGroup("runpod", jobs=1, attempts=1, actual=Decimal(0), held=Decimal(0), unknown=1),
        LedgerGroup("vast", jobs=1, attempts=2, actual=Decimal("1.50"), held=Decimal(0), unknown=0),
    ]
    lines = repr(by_provider).splitlines()
    assert lines[0].split() == ["provider", "jobs", "attempts", "actual"]
    assert lines[-1].split() == ["total", "2", "3", "$1.50", "+", "1", "unknown"]
    by_status = retried().by("status").groups
    assert by_status is not None
    assert [(g.key, g.jobs, g.attempts, g.actual) for g in by_status] == [
        ("completed", 2, 2, Decimal("1.10")),
        ("preempted", 1, 1, Decimal("0.40")),  # what the lost instances cost
    ]


def test_to_pandas_without_pandas_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError, installed or not
    with pytest.raises(ImportError, match="pip install pandas"):
        sample().to_pandas()


def test_to_pandas_keeps_decimals() -> None:
    pytest.importorskip("pandas")
    frame = sample().to_pandas()
    assert list(frame["job_id"]) == ["a", "b", "c"]
    assert frame["actual_usd"][0] == Decimal("1.10")
    assert list(frame["attempt"]) == [1, 1, 1]
    grouped = sample().by("provider").to_pandas()
    assert list(grouped.columns) == ["provider", "jobs", "attempts", "actual", "held", "unknown"]
    assert list(grouped["jobs"]) == [1, 2]
    assert list(retried().to_pandas()["attempt"]) == [1, 2, 1]
    assert list(retried().by("provider").to_pandas()[["jobs", "attempts"]].itertuples(index=False)) == [(1, 1), (1, 2)]
