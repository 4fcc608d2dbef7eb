"""Odds formats: decimal (canonical), American (moneyline) and fractional.

The one place where prices change format. Normalisers convert provider
prices to decimal here (and validate them); the streaming edge converts
back for ``?odds_format=``. Pure functions, no state.

Conventions:

- **decimal** odds are the total return per unit staked, ``> 1.0``;
  canonical prices must satisfy ``MIN_DECIMAL < price <= MAX_DECIMAL``
  (1.0 exclusive: a price of 1.0 pays nothing; 1000 is the Betfair
  ladder's top) and be finite. :func:`validate_decimal` enforces it.
- **American** odds: ``+150`` wins 150 per 100 staked (decimal 2.5);
  ``-200`` stakes 200 to win 100 (decimal 1.5). Valid values are
  ``>= +100`` or ``<= -100`` (``+100`` and ``-100`` both mean evens, 2.0).
- **fractional** odds: ``"5/2"`` wins 5 per 2 staked (decimal 3.5);
  ``"evs"`` / ``"evens"`` is ``1/1``.

Converted decimals are rounded to :data:`DECIMAL_PLACES` places so that a
provider price maps to one stable canonical value (``-110`` → ``1.9091``).

>>> american_to_decimal(150), american_to_decimal(-200), american_to_decimal(-110)
(2.5, 1.5, 1.9091)
>>> fractional_to_decimal("5/2"), decimal_to_fractional(3.5), decimal_to_american(1.5)
(3.5, '5/2', -200)
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

__all__ = [
    "DECIMAL_PLACES",
    "MAX_DECIMAL",
    "MIN_DECIMAL",
    "OddsFormat",
    "PriceError",
    "american_to_decimal",
    "decimal_to_american",
    "decimal_to_fractional",
    "fractional_to_decimal",
    "to_decimal",
    "validate_decimal",
]

OddsFormat = Literal["decimal", "american", "fractional"]

#: canonical decimal prices are strictly above this …
MIN_DECIMAL = 1.0
#: … and at most this (anything above is treated as a feed error)
MAX_DECIMAL = 1000.0
#: places kept after converting from American or fractional odds
DECIMAL_PLACES = 4


class PriceError(ValueError):
    """A price that is not a valid number in its format.

    ``value`` is the offending input (as given), ``fmt`` its format.
    Normalisers turn it into ``FeedDecodeError("invalid_price", …)``.
    """

    def __init__(self, value: object, fmt: str, why: str) -> None:
        self.value = value
        self.fmt = fmt
        self.why = why
        super().__init__(value, fmt, why)

    def __str__(self) -> str:
        return f"invalid {self.fmt} price {self.value!r}: {self.why}"


def _number(value: object, fmt: str) -> float:
    """``value`` as a finite float; bools, strings and None are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PriceError(value, fmt, f"expected a number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise PriceError(value, fmt, "not a finite number")
    return x


def validate_decimal(value: object) -> float:
    """``value`` as a canonical decimal price, or PriceError.

    Rejects non-numbers (bool, str, None), NaN/inf, ``<= 1.0`` and ``> 1000``.
    """
    x = _number(value, "decimal")
    if x <= MIN_DECIMAL:
        raise PriceError(value, "decimal", f"must be above {MIN_DECIMAL:g}")
    if x > MAX_DECIMAL:
        raise PriceError(value, "decimal", f"must be at most {MAX_DECIMAL:g}")
    return x


def american_to_decimal(value: object) -> float:
    """American odds → decimal (rounded to 4 places), or PriceError.

    ``+150`` → 2.5, ``-200`` → 1.5, ``±100`` → 2.0; values strictly between
    -100 and +100 do not exist in this format and are rejected, as is any
    result outside the canonical range.
    """
    x = _number(value, "american")
    if -100 < x < 100:
        raise PriceError(value, "american", "must be >= +100 or <= -100")
    dec = 1 + x / 100 if x > 0 else 1 + 100 / -x
    dec = round(dec, DECIMAL_PLACES)
    try:
        return validate_decimal(dec)
    except PriceError:
        raise PriceError(value, "american", f"decimal {dec:g} is outside the canonical range") from None


def fractional_to_decimal(value: object) -> float:
    """Fractional odds (``"5/2"``, ``"evs"``, ``"11-10"``) → decimal, or PriceError."""
    if not isinstance(value, str):
        raise PriceError(value, "fractional", f"expected a string like '5/2', got {type(value).__name__}")
    text = value.strip().lower()
    if text in ("evs", "evens", "even"):
        return 2.0
    sep = "/" if "/" in text else "-"
    num, found, den = text.partition(sep)
    if not found or not num.strip().isdigit() or not den.strip().isdigit():
        raise PriceError(value, "fractional", "expected N/D with whole numbers")
    n, d = int(num), int(den)
    if d == 0 or n == 0:
        raise PriceError(value, "fractional", "numerator and denominator must be above 0")
    dec = round(1 + n / d, DECIMAL_PLACES)
    try:
        return validate_decimal(dec)
    except PriceError:
        raise PriceError(value, "fractional", f"decimal {dec:g} is outside the canonical range") from None


def to_decimal(value: object, fmt: OddsFormat | str) -> float:
    """Any supported format → validated decimal (PriceError otherwise)."""
    if fmt == "decimal":
        return validate_decimal(value)
    if fmt == "american":
        return american_to_decimal(value)
    if fmt == "fractional":
        return fractional_to_decimal(value)
    raise ValueError(f"unknown odds format {fmt!r}: use decimal, american or fractional")


def decimal_to_american(price: float) -> int:
    """Decimal → American, rounded to the nearest whole number.

    ``2.5`` → ``150``, ``1.5`` → ``-200``, ``2.0`` → ``100``.
    """
    x = validate_decimal(price)
    if x >= 2.0:
        return round((x - 1) * 100)
    return round(-100 / (x - 1))


def decimal_to_fractional(price: float, max_denominator: int = 100) -> str:
    """Decimal → fractional ``"N/D"`` in lowest terms (denominator capped).

    ``3.5`` → ``"5/2"``, ``2.0`` → ``"1/1"``, ``1.9091`` → ``"10/11"``.
    """
    x = validate_decimal(price)
    frac = Fraction(x - 1).limit_denominator(max_denominator)
    if frac <= 0:  # a price a hair above 1.0 with a small denominator cap
        frac = Fraction(1, max_denominator)
    return f"{frac.numerator}/{frac.denominator}"
