"""burst_jupyter.budget: caps per day and week, reservations, and the append-only ledger.

Example:
    >>> from burst_jupyter.budget import Budget  # doctest: +SKIP
    >>> Budget(paths.db_path()).snapshot().day.label  # doctest: +SKIP
    'Today: $12.50 / $50.00 (25%)'
"""

from __future__ import annotations

from .caps import BudgetSnapshot, Cap, CapUsage
from .enforcer import Budget
from .ledger import LedgerRow, format_usd
from .periods import Period, period_bounds
from .reservations import Reservation
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

