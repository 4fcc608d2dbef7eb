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

Converted decimals are kept to :data:`DECIMAL_PLACES` places so that a
provider price maps to one stable canonical value, **rounded against the
bettor** on the exact value (never on a binary float): *down* for odds
offered to back (``side="back"``, the default: ``-110`` is exactly
1.90909…, stored ``1.909``), *up* for lay odds (``side="lay"``: ``1.9091``).
A stored price is therefore never better for the bettor than the
provider's, so a price check against it can never accept a bet the provider
would refuse (the price check rounds provider decimals with more places the
same way, ``streaming.pricecheck``). A converted price that is exact in 4
places (``+150`` → 2.5, ``"5/2"`` → 3.5) is unchanged by either direction.
The bounds are checked on the exact value *before* rounding: American
``-10001`` (1.00999…) or fractional ``"1/101"`` is rejected, never rounded up
to 1.01.

>>> american_to_decimal(150), american_to_decimal(-200), american_to_decimal(-110)
(2.5, 1.5, 1.909)
>>> american_to_decimal(-110, side="lay"), fractional_to_decimal("4/6"), fractional_to_decimal("4/6", side="lay")
(1.9091, 1.6666, 1.6667)
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
    "Side",
    "american_to_decimal",
    "decimal_to_american",
    "decimal_to_fractional",
    "fractional_to_decimal",
    "to_decimal",
    "validate_decimal",
]

OddsFormat = Literal["decimal", "american", "fractional"]
#: whose odds a converted price is: ``back`` (offered to back; rounded down) or ``lay`` (rounded up)
Side = Literal["back", "lay"]

#: canonical decimal prices are at least this … (inclusive; feed.validate.MIN_PRICE)
MIN_DECIMAL = MIN_PRICE
#: … and at most this (inclusive; anything above is a feed error)
MAX_DECIMAL = MAX_PRICE
#: places kept after converting from American or fractional odds
DECIMAL_PLACES = 4
_SCALE = 10**DECIMAL_PLACES
_MIN_EXACT = Fraction(repr(MIN_DECIMAL))
_MAX_EXACT = Fraction(repr(MAX_DECIMAL))


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


def _against_bettor(exact: Fraction, side: Side) -> float:
    """``exact`` to :data:`DECIMAL_PLACES` places, rounded against the bettor:
    down for ``back``, up for ``lay`` (exact arithmetic; the float returned
    is the one nearest that 4-place decimal, e.g. ``1.909``)."""
    units = exact * _SCALE
    n = math.floor(units) if side == "back" else math.ceil(units)
    return n / _SCALE


def _side(side: object) -> Side:
    """``side`` checked: ``"back"`` or ``"lay"`` (ValueError otherwise: a programming error)."""
    if side == "back":
        return "back"
    if side == "lay":
        return "lay"
    raise ValueError(f"unknown side {side!r}: use back or lay")


def american_to_decimal(value: object, *, side: Side = "back") -> float:
    """American odds → decimal, or PriceError.

    ``+150`` → 2.5, ``-200`` → 1.5, ``±100`` → 2.0; values strictly between
    -100 and +100 do not exist in this format and are rejected, as is any
    result outside the canonical range 1.01–1000 (checked on the exact value
    before rounding: ``-10001`` is 1.00999…, rejected). The result has at
    most 4 decimal places, rounded against the bettor: down for ``side``
    ``"back"`` (``-110`` → 1.909), up for ``"lay"`` (``-110`` → 1.9091). The
    input is read on its shortest decimal form (``repr``), so ``133.33`` is
    133.33, not the binary float just below it. ValueError for another
    ``side``.
    """
    side = _side(side)
    x = _number(value, "american")
    if -100 < x < 100:
        raise PriceError(value, "american", "must be >= +100 or <= -100")
    a = Fraction(repr(x))
    exact = 1 + a / 100 if a > 0 else 1 + 100 / -a
    if not _MIN_EXACT <= exact <= _MAX_EXACT:
        raise PriceError(value, "american", f"decimal {float(exact):.8g} is outside the canonical range 1.01–1000")
    return validate_decimal(_against_bettor(exact, side))


def fractional_to_decimal(value: object, *, side: Side = "back") -> float:
    """Fractional odds (``"5/2"``, ``"evs"``, ``"11-10"``) → decimal, or PriceError.

    The result must lie in 1.01–1000 before rounding (``"1/101"`` is
    rejected); numerator and denominator are whole numbers of at most 12
    digits. At most 4 decimal places, rounded against the bettor: down for
    ``side`` ``"back"`` (``"10/11"`` → 1.909, ``"4/6"`` → 1.6666), up for
    ``"lay"`` (1.9091, 1.6667). ValueError for another ``side``."""
    side = _side(side)
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
    if not _MIN_EXACT <= exact <= _MAX_EXACT:
        raise PriceError(value, "fractional", f"decimal {float(exact):.8g} is outside the canonical range 1.01–1000")
    return validate_decimal(_against_bettor(exact, side))


def to_decimal(value: object, fmt: OddsFormat | str, *, side: Side = "back") -> float:
    """Any supported format → validated decimal (PriceError otherwise).

    ``side``: whose odds they are, for the rounding of a converted price
    (down for ``back``, up for ``lay``: against the bettor); a decimal price
    is taken as sent. ValueError for an unknown format or side."""
    side = _side(side)
    if fmt == "decimal":
        return validate_decimal(value)
    if fmt == "american":
        return american_to_decimal(value, side=side)
    if fmt == "fractional":
        return fractional_to_decimal(value, side=side)
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
