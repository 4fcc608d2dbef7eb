"""feed.odds: one tested place for decimal / American / fractional prices."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from feed.odds import (
    PriceError,
    american_to_decimal,
    decimal_to_american,
    decimal_to_fractional,
    fractional_to_decimal,
    to_decimal,
    validate_decimal,
)


# Converted prices are rounded against the bettor (README: "rounded against the bettor"), down for
# odds offered to back: -110 is 1.90909… → 1.909 (was 1.9091, rounded to nearest: above the exact
# price), -105 is 1.952380… → 1.9523 (was 1.9524), -115 is 1.869565… → 1.8695 (was 1.8696).
@pytest.mark.parametrize(("american", "decimal"), [
    (150, 2.5), (-200, 1.5), (100, 2.0), (-100, 2.0), (-110, 1.909), (105, 2.05), (-125, 1.8),
    (-105, 1.9523), (-115, 1.8695), (1000, 11.0), (-10000, 1.01), (99900, 1000.0), (150.0, 2.5),
    (133.33, 2.3333), (-9950, 1.01),
])
def test_american_to_decimal(american: float, decimal: float) -> None:
    assert american_to_decimal(american) == decimal


@pytest.mark.parametrize("bad", [0, 50, -99, 99.9, 100_000, -1e9, math.nan, math.inf, "150", None, True, [150],
                                 -10001, -15000, -20000, 99901, 2**63, -2**63, 1e308])
def test_american_rejects(bad: object) -> None:
    with pytest.raises(PriceError) as info:
        american_to_decimal(bad)
    assert "american" in str(info.value)


# 10/11 is 1.90909… → 1.909 (was 1.9091); 4/6 is 1.6666… → 1.6666 (was 1.6667): down, against the bettor.
@pytest.mark.parametrize(("frac", "decimal"), [
    ("5/2", 3.5), ("1/1", 2.0), ("evs", 2.0), ("Evens", 2.0), ("10/11", 1.909), ("11-10", 2.1), ("1/100", 1.01),
    (" 4/6 ", 1.6666), ("999/1", 1000.0),
])
def test_fractional_to_decimal(frac: str, decimal: float) -> None:
    assert fractional_to_decimal(frac) == decimal


@pytest.mark.parametrize("bad", ["", "5", "5/0", "0/5", "a/b", "-1/2", "1/2/3", "1000/1", 2.5, None,
                                 "1/101", "1/150", "1/1000", "99901/100", "\u0661/\u0662", "1" * 400 + "/1"])
def test_fractional_rejects(bad: object) -> None:
    with pytest.raises(PriceError):
        fractional_to_decimal(bad)


@pytest.mark.parametrize("good", [1.01, 1.02, 2, 1000, 1000.0])
def test_validate_decimal_accepts(good: float) -> None:
    assert validate_decimal(good) == float(good)


@pytest.mark.parametrize("bad", [1.0, 0.99, 0, -2.0, 1000.01, 1e400, math.nan, -math.inf, "2.0", None, False, True,
                                 1.0001, 1.001, 1.0099, 1.00999999, -0.0, 1e308, 2**63])
def test_validate_decimal_rejects(bad: object) -> None:
    with pytest.raises(PriceError):
        validate_decimal(bad)


@pytest.mark.parametrize(("decimal", "american"), [(2.5, 150), (1.5, -200), (2.0, 100), (1.9091, -110), (11.0, 1000), (1.01, -10000)])
def test_decimal_to_american(decimal: float, american: int) -> None:
    assert decimal_to_american(decimal) == american


@pytest.mark.parametrize(("decimal", "frac"), [(3.5, "5/2"), (2.0, "1/1"), (1.9091, "10/11"), (1.5, "1/2"), (11.0, "10/1"), (1.6667, "2/3")])
def test_decimal_to_fractional(decimal: float, frac: str) -> None:
    assert decimal_to_fractional(decimal) == frac


def test_round_trips_stay_within_rounding() -> None:
    # 4 decimal places resolve whole American odds down to about -700 (heavier
    # favourites differ by less than 0.0001 in decimal per American point); a back
    # price is rounded down (up to one ten-thousandth): at -2400 (1.041666…, stored
    # 1.0416) that is 4 American points (-2404), where rounding to nearest (1.0417) gave 3
    for american in list(range(100, 5000, 7)) + list(range(-700, -100, 3)):
        assert decimal_to_american(american_to_decimal(american)) == american
    assert abs(decimal_to_american(american_to_decimal(-2400)) + 2400) <= 6
    for d in (1.02, 1.5, 1.91, 2.2, 3.75, 7.0, 26.0, 101.0):
        assert abs(fractional_to_decimal(decimal_to_fractional(d)) - d) < 0.01


def test_conversions_round_against_the_bettor() -> None:
    """A converted price is never better for the bettor than the provider's
    exact price: a back price is rounded down, a lay price up (to 4 places,
    on the exact value). Rounded to nearest, -110 was stored 1.9091 — above
    the exact 1.90909…, so a back check at 1.9091 passed against a book that
    pays less."""
    americans = list(range(-10000, -99, 7)) + list(range(100, 99901, 97)) + [-110, -105, -115, -9950]
    above = [a for a in americans
             if Fraction(repr(american_to_decimal(a))) > (Fraction(100, -a) + 1 if a < 0 else Fraction(a, 100) + 1)]
    assert above == []  # rounded to nearest, 707 of these (-110 among them) were stored above the exact price
    for american in americans:
        exact = Fraction(100, -american) + 1 if american < 0 else Fraction(american, 100) + 1
        back = Fraction(repr(american_to_decimal(american)))
        lay = Fraction(repr(american_to_decimal(american, side="lay")))
        assert back <= exact <= lay, american
        assert exact - back < Fraction(1, 10_000) and lay - exact < Fraction(1, 10_000), american
        assert back == lay or lay - back == Fraction(1, 10_000), american
    for frac in ("10/11", "4/6", "2/3", "1/7", "8/13", "100/30", "5/2"):
        n, d = (int(x) for x in frac.split("/"))
        exact = Fraction(n + d, d)
        back = Fraction(repr(fractional_to_decimal(frac)))
        lay = Fraction(repr(fractional_to_decimal(frac, side="lay")))
        assert back <= exact <= lay and lay - back <= Fraction(1, 10_000), frac
    assert american_to_decimal(-110) == 1.909 and american_to_decimal(-110, side="lay") == 1.9091
    assert to_decimal(-110, "american") == 1.909 and to_decimal(-110, "american", side="lay") == 1.9091
    assert to_decimal("10/11", "fractional", side="lay") == 1.9091
    assert to_decimal(1.90909, "decimal", side="lay") == 1.90909  # decimal odds are taken as sent
    with pytest.raises(ValueError, match="unknown side"):
        to_decimal(-110, "american", side="middle")  # type: ignore[arg-type]


def test_to_decimal_dispatches_and_names_unknown_formats() -> None:
    assert to_decimal(2.5, "decimal") == 2.5
    assert to_decimal(-200, "american") == 1.5
    assert to_decimal("5/2", "fractional") == 3.5
    with pytest.raises(ValueError, match="unknown odds format"):
        to_decimal(2.5, "hongkong")
    with pytest.raises(PriceError):
        to_decimal(1.0, "decimal")


def test_bounds_are_the_shared_ones_and_inclusive() -> None:
    """Issue 8: one set of bounds (feed.validate), 1.01 ≤ price ≤ 1000, both
    ends inclusive; conversions are checked before rounding."""
    from feed import odds, validate

    assert (odds.MIN_DECIMAL, odds.MAX_DECIMAL) == (validate.MIN_PRICE, validate.MAX_PRICE) == (1.01, 1000.0)
    assert validate_decimal(1.01) == 1.01 and validate_decimal(1000) == 1000.0
    assert american_to_decimal(-10000) == 1.01 and fractional_to_decimal("1/100") == 1.01
    assert american_to_decimal(99900) == 1000.0 and fractional_to_decimal("999/1") == 1000.0
