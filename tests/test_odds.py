"""feed.odds: one tested place for decimal / American / fractional prices."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize(("american", "decimal"), [
    (150, 2.5), (-200, 1.5), (100, 2.0), (-100, 2.0), (-110, 1.9091), (105, 2.05), (-125, 1.8),
    (-105, 1.9524), (-115, 1.8696), (1000, 11.0), (-10000, 1.01), (99900, 1000.0), (150.0, 2.5),
])
def test_american_to_decimal(american: float, decimal: float) -> None:
    assert american_to_decimal(american) == decimal


@pytest.mark.parametrize("bad", [0, 50, -99, 99.9, 100_000, -1e9, math.nan, math.inf, "150", None, True, [150],
                                 -10001, -15000, -20000, 99901, 2**63, -2**63, 1e308])
def test_american_rejects(bad: object) -> None:
    with pytest.raises(PriceError) as info:
        american_to_decimal(bad)
    assert "american" in str(info.value)


@pytest.mark.parametrize(("frac", "decimal"), [
    ("5/2", 3.5), ("1/1", 2.0), ("evs", 2.0), ("Evens", 2.0), ("10/11", 1.9091), ("11-10", 2.1), ("1/100", 1.01),
    (" 4/6 ", 1.6667), ("999/1", 1000.0),
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
    # favourites differ by less than 0.00005 in decimal per American point)
    for american in list(range(100, 5000, 7)) + list(range(-700, -100, 3)):
        assert decimal_to_american(american_to_decimal(american)) == american
    assert abs(decimal_to_american(american_to_decimal(-2400)) + 2400) <= 3
    for d in (1.02, 1.5, 1.91, 2.2, 3.75, 7.0, 26.0, 101.0):
        assert abs(fractional_to_decimal(decimal_to_fractional(d)) - d) < 0.01


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
