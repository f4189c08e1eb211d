"""LedgerTable: the ledger as something to look at, in a notebook (HTML) or a terminal (aligned text).

One class, two shapes sharing one renderer: a detail table (one line per job, or per attempt of a job that was
retried) and, after ``.by(key)``, a grouped table (key, jobs, actual, reserved now). Both keep the underlying
rows, so ``.since()`` and ``.by()`` chain in any order. Unknown costs are shown as "unknown" and counted apart;
they are never summed as $0. Attempts are shown (an "attempt" column, an "attempts" count) only when some job has
more than one; totals always sum every attempt.

Money still committed is kept apart from the past: a settled job's "reserved" is what was held for it before it
ran, released since, so it is shown per job and never summed; a job not settled yet (its reservation still open)
is a "running" line whose "reserved now" is summed, the money the caps count as committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from ..money import format_rate
from .ledger import LedgerRow, format_usd, require_aware

if TYPE_CHECKING:
    import pandas

    from .cells import CellRow
    from .reservations import Reservation

__all__ = ["GROUP_KEYS", "GroupKey", "LedgerGroup", "LedgerTable"]

GroupKey = Literal["day", "provider", "gpu", "status"]
GROUP_KEYS: tuple[GroupKey, ...] = ("day", "provider", "gpu", "status")


@dataclass(frozen=True, slots=True)
class LedgerGroup:
    """One line of a grouped table: ``jobs`` distinct jobs over ``attempts`` ledger rows (and open reservations).
    ``actual`` sums the known costs; ``unknown`` counts rows without one; ``held`` is what is reserved now."""

    key: str
    jobs: int
    attempts: int
    actual: Decimal
    held: Decimal
    unknown: int


@dataclass(frozen=True, slots=True)
class _Column:
    title: str
    numeric: bool = False  # right-aligned


# JupyterLab wraps table cells (white-space: normal on td and th): a date or "1h 35m" on two lines is hard to read.
_STYLE = {False: ' style="white-space:nowrap"', True: ' style="white-space:nowrap;text-align:right"'}
_RUNNING = "running"  # the status of a job whose reservation is still open

_DETAIL_COLUMNS = (
    _Column("started"),
    _Column("job"),
    _Column("attempt", numeric=True),  # dropped when every row is a first attempt
    _Column("name"),
    _Column("provider"),
    _Column("gpu"),
    _Column("$/h", numeric=True),
    _Column("time", numeric=True),
    _Column("reserved", numeric=True),
    _Column("reserved now", numeric=True),  # dropped when no reservation is open
    _Column("actual", numeric=True),
    _Column("status"),
)


class LedgerTable:
    """Ledger rows and the reservations still open, shown as a table with a totals line. A plain object: ``repr()``
    for terminals, ``_repr_html_()`` for notebooks.

    ``tz`` is the zone for shown times and for ``by("day")``; ``None`` means the system's local zone.

    Example:
        >>> table = budget.table()  # doctest: +SKIP
        >>> table.by("provider").total, table.unknown  # doctest: +SKIP
        (Decimal('12.50'), 1)
    """

    def __init__(
        self,
        rows: Iterable[LedgerRow],
        *,
        reservations: Iterable[Reservation] = (),
        cells: Iterable[CellRow] = (),
        group_by: GroupKey | None = None,
        tz: dt.tzinfo | None = None,
    ) -> None:
        if group_by is not None and group_by not in GROUP_KEYS:
            raise ValueError(f"group by one of {GROUP_KEYS}, not {group_by!r}")
        self.rows: list[LedgerRow] = list(rows)
        self.reservations: list[Reservation] = list(reservations)  # open: their jobs have not settled
        # The cells kept machines ran: shown under their machine's row, each with its share (never summed again).
        self.cells: list[CellRow] = list(cells)
        self.group_by = group_by
        self.tz = tz

    # --- numbers ---

    @property
    def total(self) -> Decimal:
        """Sum of the known actual costs (see :attr:`unknown` for the rest)."""
        return sum((row.actual_usd for row in self.rows if row.actual_usd is not None), Decimal(0))

    @property
    def jobs(self) -> int:
        """How many distinct jobs the rows and open reservations are (a retried job has a row per attempt)."""
        return len({row.job_id for row in self.rows} | {held.job_id for held in self.reservations})

    @property
    def retried(self) -> bool:
        """Whether some row is a later attempt of its job: only then are attempts shown."""
        return any(row.attempt > 1 for row in self.rows)

    @property
    def unknown(self) -> int:
        """How many rows have an unknown cost."""
        return sum(1 for row in self.rows if row.actual_usd is None)

    @property
    def held(self) -> Decimal:
        """What is reserved now for the jobs not settled yet: money committed, which the caps count."""
        return sum((held.amount for held in self.reservations), Decimal(0))

    @property
    def groups(self) -> list[LedgerGroup] | None:
        """The grouped lines, sorted by key; ``None`` for a detail table."""
        if self.group_by is None:
            return None
        key_of = self._key_function(self.group_by)
        members: dict[str, LedgerTable] = {}
        for row in self.rows:
            members.setdefault(key_of(row), LedgerTable([])).rows.append(row)
        for held in self.reservations:
            members.setdefault(key_of(held), LedgerTable([])).reservations.append(held)
        return [
            LedgerGroup(key, part.jobs, len(part.rows), part.total, part.held, part.unknown)
            for key, part in sorted(members.items())
        ]

    def _key_function(self, key: GroupKey) -> Callable[[LedgerRow | Reservation], str]:
        def value(line: LedgerRow | Reservation) -> str:
            if key == "day":
                at = line.started_at if isinstance(line, LedgerRow) else line.created_at
                return at.astimezone(self.tz).date().isoformat()
            if key == "status" and not isinstance(line, LedgerRow):
                return _RUNNING
            return str(getattr(line, key) or "")

        return value

    # --- derived tables ---

    def by(self, key: GroupKey) -> LedgerTable:
        """The same rows grouped by ``"day"`` (of ``started_at``, in :attr:`tz`), provider, gpu or status."""
        return LedgerTable(self.rows, reservations=self.reservations, cells=self.cells, group_by=key, tz=self.tz)

    def since(self, moment: dt.datetime) -> LedgerTable:
        """Only the rows that started (and reservations made) at or after ``moment`` (timezone-aware), keeping the
        grouping."""
        require_aware(moment, "since")
        return LedgerTable([row for row in self.rows if row.started_at >= moment],
                           reservations=[held for held in self.reservations if held.created_at >= moment],
                           cells=self.cells, group_by=self.group_by, tz=self.tz)

    def to_pandas(self) -> pandas.DataFrame:
        """A DataFrame of the ledger rows (or of the groups); money stays ``Decimal``. Needs pandas, imported here."""
        try:
            import pandas
        except ImportError as exc:
            raise ImportError(
                "LedgerTable.to_pandas() needs pandas, which is not installed: pip install pandas"
            ) from exc
        groups = self.groups
        if groups is None:
            names = [field.name for field in dataclasses.fields(LedgerRow)]
            return pandas.DataFrame([dataclasses.asdict(row) for row in self.rows], columns=names)
        records = [dataclasses.astuple(group) for group in groups]
        names = [str(self.group_by), *(field.name for field in dataclasses.fields(LedgerGroup)[1:])]  # "key" renamed
        return pandas.DataFrame.from_records(records, columns=names)

    # --- rendering ---

    def __repr__(self) -> str:
        columns, body, totals = self._grid()
        widths = [
            max(len(column.title), len(totals[i]), *(len(line[i]) for line in body)) for i, column in enumerate(columns)
        ]

        def text_line(cells: list[str]) -> str:
            padded = (
                cell.rjust(width) if column.numeric else cell.ljust(width)
                for cell, width, column in zip(cells, widths, columns, strict=True)
            )
            return "  ".join(padded).rstrip()

        rule = "  ".join("-" * width for width in widths)
        titles = [column.title for column in columns]
        return "\n".join([text_line(titles), rule, *(text_line(line) for line in body), rule, text_line(totals)])

    def _repr_html_(self) -> str:
        from ..widgets.render import no_math

        columns, body, totals = self._grid()

        def html_line(cells: list[str], tag: str) -> str:
            return (
                "<tr>"
                + "".join(
                    f"<{tag}{_STYLE[column.numeric]}>{html.escape(cell)}</{tag}>"
                    for cell, column in zip(cells, columns, strict=True)
                )
                + "</tr>"
            )

        return no_math(
            '<table class="burst-ledger">'
            f"<thead>{html_line([column.title for column in columns], 'th')}</thead>"
            f"<tbody>{''.join(html_line(line, 'td') for line in body)}</tbody>"
            f'<tfoot style="font-weight:bold">{html_line(totals, "td")}</tfoot>'
            "</table>"
        )

    def _grid(self) -> tuple[tuple[_Column, ...], list[list[str]], list[str]]:
        """Column specs, body cells and totals cells: everything both renderers need, as text."""
        columns, body, totals = self._full_grid()
        dropped: tuple[str, ...] = () if self.retried else ("attempt", "attempts")
        if not self.reservations:
            dropped += ("reserved now",)
        keep = [i for i, column in enumerate(columns) if column.title not in dropped]
        return tuple(columns[i] for i in keep), [[line[i] for i in keep] for line in body], [totals[i] for i in keep]

    def _full_grid(self) -> tuple[tuple[_Column, ...], list[list[str]], list[str]]:
        """:meth:`_grid` with every column there."""
        jobs = f"{self.jobs} job{'' if self.jobs == 1 else 's'}"
        attempts = f"{len(self.rows)} attempt{'' if len(self.rows) == 1 else 's'}"
        actual = _cost_text(self.total, self.unknown, len(self.rows))
        groups = self.groups
        if groups is None:
            body = []
            for row in self.rows:
                body.append(self._detail_cells(row))
                body += [self._cell_cells(cell) for cell in self.cells if cell.machine_job_id == row.job_id]
            for held in self.reservations:
                body.append(self._open_cells(held))
                body += [self._cell_cells(cell) for cell in self.cells if cell.machine_job_id == held.job_id]
            # No total under "reserved": those reservations were released when each job settled.
            totals = ["total", jobs, attempts, "", "", "", "", "", "", format_usd(self.held), actual, ""]
            return _DETAIL_COLUMNS, body, totals
        columns = (
            _Column(str(self.group_by)),
            _Column("jobs", True),
            _Column("attempts", True),
            _Column("actual", True),
            _Column("reserved now", True),
        )
        body = [
            [
                group.key,
                str(group.jobs),
                str(group.attempts),
                _cost_text(group.actual, group.unknown, group.attempts) if group.attempts else "",
                format_usd(group.held),
            ]
            for group in groups
        ]
        return columns, body, ["total", str(self.jobs), str(len(self.rows)), actual, format_usd(self.held)]

    def _detail_cells(self, row: LedgerRow) -> list[str]:
        return [
            row.started_at.astimezone(self.tz).strftime("%Y-%m-%d %H:%M"),
            row.job_id,
            str(row.attempt),
            row.name or "",
            row.provider,
            row.gpu,
            format_rate(row.rate_usd_per_hour),
            _duration_text(row.duration),
            format_usd(row.reserved_usd),
            "",
            format_usd(row.actual_usd),
            row.status,
        ]

    def _cell_cells(self, cell: CellRow) -> list[str]:
        """A cell under its kept machine's line: its time, its output, and its share of the machine's bill."""
        when = cell.started_at.astimezone(self.tz).strftime("%Y-%m-%d %H:%M")
        name = f"{cell.name or 'cell'} · {_size_text(cell.output_bytes)} out"
        return [when, f"  cell {cell.cell_job_id}", "", name, "", "", "", _duration_text(cell.duration), "", "",
                f"({format_usd(cell.share_usd)})", cell.status]

    def _open_cells(self, held: Reservation) -> list[str]:
        when = held.created_at.astimezone(self.tz).strftime("%Y-%m-%d %H:%M")
        return [when, held.job_id, "", held.name or "", held.provider or "", held.gpu or "", "", "", "",
                format_usd(held.amount), "", _RUNNING]


def _cost_text(known: Decimal, unknown: int, rows: int) -> str:
    """``$4.20``, ``$4.20 + 1 unknown``, or ``unknown`` when no row's cost is known."""
    if unknown == 0:
        return format_usd(known)
    if unknown == rows:
        return "unknown"
    return f"{format_usd(known)} + {unknown} unknown"


def _size_text(size: int) -> str:
    """``512 B``, ``1.5 KB``, ``2.0 MB`` (powers of 1000, as disks are sold)."""
    if size < 1000:
        return f"{size} B"
    scaled, units = size / 1000, ["KB", "MB", "GB"]
    while scaled >= 1000 and len(units) > 1:
        scaled, units = scaled / 1000, units[1:]
    return f"{scaled:.1f} {units[0]}"


def _duration_text(duration: dt.timedelta | None) -> str:
    if duration is None:
        return "unknown"
    minutes, seconds = divmod(max(0, round(duration.total_seconds())), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"
