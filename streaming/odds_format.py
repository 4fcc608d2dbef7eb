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
(first element) of each ``back``/``lay`` level; sizes and volumes are left
alone. ``None`` stays ``None``; a price ≤ 1.0 (never valid) is left as is.

The converters are :func:`feed.odds.decimal_to_american` and
:func:`feed.odds.decimal_to_fractional` (re-exported here): one set of
converters in the project.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from feed.odds import decimal_to_american, decimal_to_fractional

__all__ = ["FORMATS", "convert_json", "decimal_to_american", "decimal_to_fractional", "parse_odds_format"]

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


def convert_json(body: bytes, fmt: str) -> bytes:
    """A wire message (JSON bytes) with every price converted to ``fmt``;
    messages without prices come back unchanged (the same object)."""
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
