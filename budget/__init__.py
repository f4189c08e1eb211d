"""burst_jupyter.budget: caps per day and week, reservations, and the append-only ledger.

Example:
    >>> from burst_jupyter.budget import Budget  # doctest: +SKIP
    >>> Budget(paths.db_path()).snapshot().day.label  # doctest: +SKIP
    'Today: $12.50 / $50.00 (25%)'
"""

from __future__ import annotations

from .enforcer import Budget, BudgetSnapshot, Cap, CapUsage, Period, Reservation, period_bounds
from .ledger import LedgerRow, format_usd
from .table import GroupKey, LedgerGroup, LedgerTable

__all__ = [
    "Budget",
    "BudgetSnapshot",
    "Cap",
    "CapUsage",
    "GroupKey",
    "LedgerGroup",
    "LedgerRow",
    "LedgerTable",
    "Period",
    "Reservation",
    "format_usd",
    "period_bounds",
]

