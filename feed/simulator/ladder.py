"""The Betfair price ladder ("CLASSIC" tick ladder), decimal odds 1.01–1000.

========== ======
range      tick
========== ======
1.01–2     0.01
2–3        0.02
3–4        0.05
4–6        0.1
6–10       0.2
10–20      0.5
20–30      1
30–50      2
50–100     5
100–1000   10
========== ======

Prices are kept exact: each tick is built from integer hundredths, and
integral prices are ``int`` (``2``, not ``2.0``) so they serialise the way
Betfair writes them (``[0,2,150.5]``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["MAX_PRICE", "MIN_PRICE", "TICKS", "snap", "tick_index", "ticks_between"]

_BANDS: tuple[tuple[int, int, int], ...] = (
    # (from, to, step) in hundredths
    (101, 200, 1),
    (200, 300, 2),
    (300, 400, 5),
    (400, 600, 10),
    (600, 1000, 20),
    (1000, 2000, 50),
    (2000, 3000, 100),
    (3000, 5000, 200),
    (5000, 10000, 500),
    (10000, 100000, 1000),
)


def _build() -> tuple[float, ...]:
    cents: list[int] = []
    for lo, hi, step in _BANDS:
        c = lo if not cents else cents[-1] + step
        while c <= hi:
            cents.append(c)
            c += step
    return tuple(c // 100 if c % 100 == 0 else c / 100 for c in cents)


#: Every valid price, ascending (350 ticks).
TICKS: tuple[float, ...] = _build()
MIN_PRICE: float = TICKS[0]
MAX_PRICE: float = TICKS[-1]


def snap(price: float, mode: str = "nearest") -> float:
    """The tick nearest to ``price`` (``mode="down"``/``"up"``: the tick at or
    below/above it), clamped to 1.01–1000."""
    if price <= MIN_PRICE:
        return MIN_PRICE
    if price >= MAX_PRICE:
        return MAX_PRICE
    hi = bisect_left(TICKS, price - 1e-9)
    if abs(TICKS[hi] - price) < 1e-9:
        return TICKS[hi]
    lo = hi - 1
    if mode == "down":
        return TICKS[lo]
    if mode == "up":
        return TICKS[hi]
    return TICKS[lo] if price - TICKS[lo] <= TICKS[hi] - price else TICKS[hi]


def tick_index(price: float) -> int:
    """Index in :data:`TICKS` of the tick at or below ``price`` (clamped)."""
    i = bisect_right(TICKS, price + 1e-9) - 1
    return min(max(i, 0), len(TICKS) - 1)


def ticks_between(a: float, b: float) -> int:
    """Signed number of ticks from price ``a`` to price ``b`` (both snapped)."""
    return tick_index(snap(b)) - tick_index(snap(a))
