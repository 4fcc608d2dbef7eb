"""Odds formats at the edge (``?odds_format=decimal|fractional|american``).

Prices are decimal everywhere inside oddsfeed (DESIGN §3); a client may ask
for another format and every price field of what it receives is converted
once per node per message (:meth:`streaming.encoding.Message.formatted`
caches the result), never per client.

- ``decimal``: as stored (the default).
- ``fractional``: a string ``"<num>/<den>"`` = decimal − 1 as a fraction
  (``2.5`` → ``"3/2"``, ``2.0`` → ``"1/1"``, ``1.91`` → ``"91/100"``); exact
  for prices with at most two decimals (the Betfair ladder), otherwise the
  closest fraction with a denominator ≤ 100.
- ``american``: an integer moneyline; decimal ≥ 2 → ``+round((d − 1) × 100)``,
  decimal < 2 → ``−round(100 / (d − 1))`` (``2.5`` → ``150``, ``1.5`` → ``-200``).

Converted fields: a selection's ``price``, ``ltp``, ``bsp`` and the price
(first element) of each ``back``/``lay`` level; in a ``view=best`` message
(:mod:`streaming.bestview`) each outcome's ``best.price``, ``best_lay.price``
and ``fair``. Sizes, volumes, ages and counts are left alone. ``None`` stays
``None``; a price ≤ 1.0 (never valid) is left as is. A fair price outside the
range of a stored price (1.01–1000: a de-vigged longshot) is converted by the
same formulas (fractional: denominator ≤ 100, or ≤ 1000 below 1.01 — a fair
price has three decimals —, never rounded to 0).

The converters are :func:`feed.odds.decimal_to_american` and
:func:`feed.odds.decimal_to_fractional` (re-exported here): one set of
converters in the project.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import msgspec

from feed.odds import PriceError, decimal_to_american, decimal_to_fractional

__all__ = ["FORMATS", "convert_best_json", "convert_json", "decimal_to_american", "decimal_to_fractional",
           "parse_odds_format"]

FORMATS = ("decimal", "fractional", "american")


def parse_odds_format(value: object) -> str | None:
    """``odds_format`` value → None (decimal) or the format name. Raises ValueError."""
    if value is None or value == "" or value == "decimal":
        return None
    if value in ("fractional", "american"):
        return str(value)
    raise ValueError(f"odds_format must be one of {', '.join(FORMATS)}, not {value!r}")


def _converter(fmt: str) -> Callable[[float], Any]:
    return decimal_to_fractional if fmt == "fractional" else decimal_to_american


def _conv(v: Any, fn: Callable[[float], Any]) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1.0:
        return fn(float(v))
    return v


def _unbounded(fn: Callable[[float], Any], x: float) -> Any:
    """:func:`_conv` of a derived price outside the stored range (the converters refuse it)."""
    if fn is decimal_to_american:
        return round((x - 1) * 100) if x >= 2.0 else round(-100 / (x - 1))
    # (below 1.01 a denominator of 100 would round the price up to 1.01 or down to nothing)
    frac = Fraction(x - 1).limit_denominator(100 if x >= 2.0 else 1000)
    if frac <= 0:
        frac = Fraction(x - 1).limit_denominator(10**6)
    return f"{frac.numerator}/{frac.denominator}"


def _conv_any(v: Any, fn: Callable[[float], Any]) -> Any:
    """:func:`_conv` of a derived price (a fair price) that may lie outside 1.01–1000."""
    try:
        return _conv(v, fn)
    except PriceError:
        return _unbounded(fn, float(v))


def _selection(sel: dict[str, Any], fn: Callable[[float], Any]) -> None:
    for key in ("price", "ltp", "bsp"):
        if key in sel:
            sel[key] = _conv(sel[key], fn)
    for key in ("back", "lay"):
        ladder = sel.get(key)
        if ladder:
            sel[key] = [[_conv(level[0], fn), *level[1:]] if level else level for level in ladder]


def _market(m: dict[str, Any], fn: Callable[[float], Any]) -> None:
    for sel in m.get("selections") or ():
        _selection(sel, fn)


def _best_markets(markets: Any, fn: Callable[[float], Any]) -> None:
    for m in markets:
        for o in m.get("outcomes") or ():
            for key in ("best", "best_lay"):
                side = o.get(key)
                if isinstance(side, dict) and "price" in side:
                    side["price"] = _conv_any(side["price"], fn)
            if "fair" in o:
                o["fair"] = _conv_any(o["fair"], fn)


def convert_best_json(body: bytes, fmt: str) -> bytes:
    """A ``view=best`` message (:mod:`streaming.bestview`: a snapshot's ``events[].markets``, or a
    change's ``markets``) with each outcome's ``best.price``, ``best_lay.price`` and ``fair``
    converted to ``fmt``; one without an outcome comes back unchanged (the same object)."""
    if b'"outcomes"' not in body:
        return body
    fn = _converter(fmt)
    obj = msgspec.json.decode(body)
    for ev in obj.get("events") or ():
        _best_markets(ev.get("markets") or (), fn)
    _best_markets(obj.get("markets") or (), fn)
    return msgspec.json.encode(obj)


def convert_json(body: bytes, fmt: str) -> bytes:
    """A wire message (JSON bytes) with every price converted to ``fmt``;
    messages without prices come back unchanged (the same object)."""
    if body.startswith(b'{"type":"best"'):
        return convert_best_json(body, fmt)
    if b'"selections"' not in body:
        return body
    fn = _converter(fmt)
    obj = msgspec.json.decode(body)
    if "markets" in obj:  # snapshot
        for m in obj["markets"]:
            _market(m, fn)
    if isinstance(obj.get("market"), dict):  # image delta
        _market(obj["market"], fn)
    for sel in obj.get("selections") or ():  # delta / market
        _selection(sel, fn)
    return msgspec.json.encode(obj)
