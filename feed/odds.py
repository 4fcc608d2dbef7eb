"""Odds formats: decimal (canonical), American (moneyline) and fractional.

The one place where prices change format. Normalisers convert provider
prices to decimal here (and validate them); the streaming edge converts
back for ``?odds_format=``. Pure functions, no state.

Conventions:

- **decimal** odds are the total return per unit staked; canonical
  prices must be finite and satisfy ``MIN_DECIMAL <= price <= MAX_DECIMAL``
  (1.01–1000 inclusive: the Betfair ladder's bottom and top; the bounds are
  :data:`feed.validate.MIN_PRICE` / :data:`~feed.validate.MAX_PRICE`, the one
  set of bounds every provider shares). :func:`validate_decimal` enforces it.
- **American** odds: ``+150`` wins 150 per 100 staked (decimal 2.5);
  ``-200`` stakes 200 to win 100 (decimal 1.5). Valid values are
  ``>= +100`` or ``<= -100`` (``+100`` and ``-100`` both mean evens, 2.0).
- **fractional** odds: ``"5/2"`` wins 5 per 2 staked (decimal 3.5);
  ``"evs"`` / ``"evens"`` is ``1/1``.

Converted decimals are rounded to :data:`DECIMAL_PLACES` places so that a
provider price maps to one stable canonical value (``-110`` → ``1.9091``).
The bounds are checked on the exact value *before* rounding: American
``-10001`` (1.00999…) or fractional ``"1/101"`` is rejected, never rounded up
to 1.01.

>>> american_to_decimal(150), american_to_decimal(-200), american_to_decimal(-110)
(2.5, 1.5, 1.9091)
>>> fractional_to_decimal("5/2"), decimal_to_fractional(3.5), decimal_to_american(1.5)
(3.5, '5/2', -200)
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

from feed.errors import OddsfeedError
from feed.validate import MAX_PRICE, MIN_PRICE

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

#: canonical decimal prices are at least this … (inclusive; feed.validate.MIN_PRICE)
MIN_DECIMAL = MIN_PRICE
#: … and at most this (inclusive; anything above is a feed error)
MAX_DECIMAL = MAX_PRICE
#: places kept after converting from American or fractional odds
DECIMAL_PLACES = 4


class PriceError(OddsfeedError, ValueError):
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

    Rejects non-numbers (bool, str, None), NaN/inf, ``< 1.01`` and ``> 1000``.
    """
    x = _number(value, "decimal")
    if x < MIN_DECIMAL:
        raise PriceError(value, "decimal", f"must be at least {MIN_DECIMAL:g}")
    if x > MAX_DECIMAL:
        raise PriceError(value, "decimal", f"must be at most {MAX_DECIMAL:g}")
    return x


def american_to_decimal(value: object) -> float:
    """American odds → decimal (rounded to 4 places), or PriceError.

    ``+150`` → 2.5, ``-200`` → 1.5, ``±100`` → 2.0; values strictly between
    -100 and +100 do not exist in this format and are rejected, as is any
    result outside the canonical range 1.01–1000 (checked before rounding:
    ``-10001`` is 1.00999…, rejected).
    """
    x = _number(value, "american")
    if -100 < x < 100:
        raise PriceError(value, "american", "must be >= +100 or <= -100")
    exact = 1 + x / 100 if x > 0 else 1 + 100 / -x
    if not MIN_DECIMAL <= exact <= MAX_DECIMAL:
        raise PriceError(value, "american", f"decimal {exact:.8g} is outside the canonical range 1.01–1000")
    return validate_decimal(round(exact, DECIMAL_PLACES))


def fractional_to_decimal(value: object) -> float:
    """Fractional odds (``"5/2"``, ``"evs"``, ``"11-10"``) → decimal, or PriceError.

    The result must lie in 1.01–1000 before rounding (``"1/101"`` is
    rejected); numerator and denominator are whole numbers of at most 12
    digits."""
    if not isinstance(value, str):
        raise PriceError(value, "fractional", f"expected a string like '5/2', got {type(value).__name__}")
    text = value.strip().lower()
    if text in ("evs", "evens", "even"):
        return 2.0
    sep = "/" if "/" in text else "-"
    num, found, den = text.partition(sep)
    num, den = num.strip(), den.strip()
    if not found or not num.isascii() or not den.isascii() or not num.isdigit() or not den.isdigit() \
            or len(num) > 12 or len(den) > 12:
        raise PriceError(value, "fractional", "expected N/D with whole numbers")
    n, d = int(num), int(den)
    if d == 0 or n == 0:
        raise PriceError(value, "fractional", "numerator and denominator must be above 0")
    exact = Fraction(d + n, d)
    if not Fraction(repr(MIN_DECIMAL)) <= exact <= Fraction(repr(MAX_DECIMAL)):
        raise PriceError(value, "fractional", f"decimal {float(exact):.8g} is outside the canonical range 1.01–1000")
    return validate_decimal(round(1 + n / d, DECIMAL_PLACES))


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
