"""Odds formats at the edge (``?odds_format=decimal|fractional|american``).

Prices are decimal everywhere inside oddsfeed (DESIGN §3); a client may ask
for another format and every price field of what it receives is converted
once per node per message (:meth:`streaming.encoding.Message.formatted`
caches the result), never per client.

- ``decimal``: as stored (the default).
- ``fractional``: a string ``"<num>/<den>"`` = decimal − 1 as a fraction
  (``2.5`` → ``"3/2"``, ``2.0`` → ``"1/1"``, ``1.91`` → ``"91/100"``); exact
  for prices with at most two decimals (the Betfair ladder), otherwise the
  closest fraction with a denominator ≤ 1000.
- ``american``: an integer moneyline; decimal ≥ 2 → ``+round((d − 1) × 100)``,
  decimal < 2 → ``−round(100 / (d − 1))`` (``2.5`` → ``150``, ``1.5`` → ``-200``).

Converted fields: a selection's ``price``, ``ltp``, ``bsp`` and the price
(first element) of each ``back``/``lay`` level; sizes and volumes are left
alone. ``None`` stays ``None``; a price ≤ 1.0 (never valid) is left as is.

If ``feed/odds.py`` (``decimal_to_american`` / ``decimal_to_fractional``)
exists it is used, so there is one set of converters in the project.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import msgspec

__all__ = ["FORMATS", "convert_json", "decimal_to_american", "decimal_to_fractional", "parse_odds_format"]

FORMATS = ("decimal", "fractional", "american")


def _decimal_to_fractional(d: float) -> str:
    frac = Fraction(round(d - 1.0, 6)).limit_denominator(1000)
    return f"{frac.numerator}/{frac.denominator}"


def _decimal_to_american(d: float) -> int:
    if d >= 2.0:
        return int(round((d - 1.0) * 100))
    return -int(round(100.0 / (d - 1.0)))


try:  # one set of converters in the project when feed.odds exists
    from feed.odds import decimal_to_american as _ext_american  # type: ignore[import-not-found]
    from feed.odds import decimal_to_fractional as _ext_fractional  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the other module being present
    _ext_american = _ext_fractional = None


def decimal_to_fractional(d: float) -> str:
    """Decimal odds → ``"num/den"`` (see the module docstring)."""
    if _ext_fractional is not None:
        out = _ext_fractional(d)
        return out if isinstance(out, str) else f"{out[0]}/{out[1]}"
    return _decimal_to_fractional(d)


def decimal_to_american(d: float) -> int:
    """Decimal odds → American moneyline (see the module docstring)."""
    if _ext_american is not None:
        return int(_ext_american(d))
    return _decimal_to_american(d)


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
