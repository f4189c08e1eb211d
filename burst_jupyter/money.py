"""How an amount of USD and an hourly rate are shown, the same everywhere: ledger, CLI, widgets, text views."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

__all__ = ["format_rate", "format_usd"]

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


_MILL = Decimal("0.001")
_RATE_DIGITS = Decimal("0.0001")


def format_rate(rate: Decimal | None) -> str:
    """An hourly rate as the provider prices it: every digit it gives, to the cent at least and a hundredth of a
    cent at most (``$0.347``, ``$0.50``, ``$1.2345``); under a tenth of a cent, two significant digits as
    :func:`format_usd`. ``None`` is ``unknown``. Callers add the ``/h``.

    Vast bills $0.347/h, and "$0.35" would be a rate nobody charges. Its ``dph_total`` is a float sum (storage
    folded in), so digits past a hundredth of a cent are arithmetic noise, not a price (2026-12-06).

    Example:
        >>> format_rate(Decimal("0.347")), format_rate(Decimal("0.5")), format_rate(Decimal("0.52166666666667"))
        ('$0.347', '$0.50', '$0.5217')
    """
    if rate is None:
        return "unknown"
    if 0 < abs(rate) < _MILL:
        return format_usd(rate)
    shown = rate.quantize(_RATE_DIGITS, rounding=ROUND_HALF_UP).normalize()
    if shown.as_tuple().exponent > -2:  # type: ignore[operator]  # an int for a finite Decimal
        shown = shown.quantize(_CENT)
    return f"${shown:f}"
