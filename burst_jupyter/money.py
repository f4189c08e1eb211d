"""How an amount of USD is shown, the same everywhere: ledger, CLI, widgets, text views."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

__all__ = ["format_usd"]

_CENT = Decimal("0.01")


def format_usd(amount: Decimal | None) -> str:
    """``$1.23``; amounts under a cent keep two significant digits (``$0.0042``); ``None`` is ``unknown``.

    A running job costs fractions of a cent for its first minutes, and $0.0042/h is a real rate: "$0.00" would
    hide that something is billing.

    Example:
        >>> format_usd(Decimal("0.004213")), format_usd(Decimal("12.5")), format_usd(None)
        ('$0.0042', '$12.50', 'unknown')
    """
    if amount is None:
        return "unknown"
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    if amount == 0 or amount >= _CENT:
        shown = amount.quantize(_CENT, rounding=ROUND_HALF_UP)
    else:
        shown = amount.quantize(Decimal(1).scaleb(amount.adjusted() - 1), rounding=ROUND_HALF_UP).normalize()
    return f"{sign}${shown:f}"
