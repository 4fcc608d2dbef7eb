"""Server-side market state and its projection onto ESA change messages.

Both upstreams of the simulator (the synthetic :mod:`market_model` and the
recorded-file replay) keep their state as :class:`MarketBook` objects and
report what they touched as :class:`MarketDirty` marks. The ESA server keeps,
per connection, the last *projection* it sent of each runner (only the
columns that connection subscribed to, cut to its ``ladderLevels``) and
sends the difference, following the ESA delta rules:

- price ladders (``atb``, ``atl``, ``trd``, ``spb``, ``spl``) are
  ``[[price, size], …]``; size 0 deletes that price;
- level ladders (``batb``, ``batl``, ``bdatb``, ``bdatl``) are
  ``[[level, price, size], …]``; every changed level is sent, ``[level, 0, 0]``
  deletes a level;
- scalars (``ltp``, ``tv``, ``spn``, ``spf``) are sent when they change;
- ``marketDefinition`` is sent whole when it changed;
- a market the connection has not seen yet is sent whole with ``img: true``.

Diffing per connection makes conflation, slow readers, stalls and resubscribes
fall out for free: pending marks merge, and the next flush sends the net
change (with ``con: true`` when several changes were merged).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "FIELD_COLUMNS",
    "FieldSpec",
    "MarketBook",
    "MarketDirty",
    "RunnerBook",
    "apply_recorded",
    "diff_runner",
    "image_runner",
    "market_matches",
    "merge_dirty",
    "num",
    "project_runner",
    "truth_of",
]

RunnerKey = tuple[int, float | None]

PRICE_LADDERS = ("atb", "atl", "trd", "spb", "spl")
LEVEL_LADDERS = ("batb", "batl", "bdatb", "bdatl")
SCALARS = ("spn", "spf", "ltp", "tv")
#: wire key order of a runner change (as Betfair writes it), ``id``/``hc`` last
RC_ORDER = ("atb", "atl", "trd", "spb", "spl", "batb", "batl", "bdatb", "bdatl", "spn", "spf", "ltp", "tv")

#: marketDataFilter field -> the runner columns it selects
FIELD_COLUMNS: dict[str, tuple[str, ...]] = {
    "EX_ALL_OFFERS": ("atb", "atl"),
    "EX_BEST_OFFERS": ("batb", "batl"),
    "EX_BEST_OFFERS_DISP": ("bdatb", "bdatl"),
    "EX_TRADED": ("trd",),
    "EX_TRADED_VOL": ("tv",),
    "EX_LTP": ("ltp",),
    "SP_TRADED": ("spb", "spl"),
    "SP_PROJECTED": ("spn", "spf"),
}


def num(x: float) -> float:
    """``x`` rounded to 2 dp, as ``int`` when integral (Betfair writes ``5``, not ``5.0``)."""
    r = round(x, 2)
    i = int(r)
    return i if i == r else r


class RunnerBook:
    """Full state of one runner.

    ``atb``/``atl``/``trd``/``spb``/``spl``: ``{price: size}``.
    ``batb``/``batl``/``bdatb``/``bdatl``: ``{level: (price, size)}`` when the
    upstream gives level ladders (recordings); ``None`` means "derive the best
    levels from ``atb``/``atl``" (the synthetic model).
    ``ltp``: last traded price; ``tv``: traded volume; ``spn``/``spf``: SP
    near/far. ``hc``: handicap, ``None`` when the upstream sends none.
    """

    __slots__ = (
        "atb", "atl", "batb", "batl", "bdatb", "bdatl", "hc", "id", "ltp",
        "spb", "spf", "spl", "spn", "trd", "tv",
    )

    def __init__(self, selection_id: int, hc: float | None = None) -> None:
        self.id = selection_id
        self.hc = hc
        self.atb: dict[float, float] = {}
        self.atl: dict[float, float] = {}
        self.trd: dict[float, float] = {}
        self.spb: dict[float, float] = {}
        self.spl: dict[float, float] = {}
        self.batb: dict[int, tuple[float, float]] | None = None
        self.batl: dict[int, tuple[float, float]] | None = None
        self.bdatb: dict[int, tuple[float, float]] | None = None
        self.bdatl: dict[int, tuple[float, float]] | None = None
        self.ltp: float | None = None
        self.tv: float | None = None
        self.spn: float | None = None
        self.spf: float | None = None

    @property
    def key(self) -> RunnerKey:
        return (self.id, self.hc)

    def back(self) -> list[list[float]]:
        """``[[price, size], …]`` to back, best (highest) first."""
        if self.atb or self.batb is None:
            return [[p, s] for p, s in sorted(self.atb.items(), reverse=True)]
        return [[p, s] for _, (p, s) in sorted(self.batb.items())]

    def lay(self) -> list[list[float]]:
        """``[[price, size], …]`` to lay, best (lowest) first."""
        if self.atl or self.batl is None:
            return [[p, s] for p, s in sorted(self.atl.items())]
        return [[p, s] for _, (p, s) in sorted(self.batl.items())]


class MarketBook:
    """Full state of one market.

    ``definition`` is the ESA ``marketDefinition`` dict (``None`` until
    known); replace it (never mutate it in place) and bump ``def_seq`` via
    :meth:`set_definition`. ``runners`` is keyed by ``(selection_id, hc)``.
    ``tv``: market traded volume.
    """

    __slots__ = ("def_seq", "definition", "market_id", "runners", "tv")

    def __init__(self, market_id: str) -> None:
        self.market_id = market_id
        self.definition: dict[str, Any] | None = None
        self.def_seq = 0
        self.runners: dict[RunnerKey, RunnerBook] = {}
        self.tv: float | None = None

    def set_definition(self, definition: dict[str, Any]) -> None:
        self.definition = definition
        self.def_seq += 1

    def runner(self, selection_id: int, hc: float | None = None) -> RunnerBook:
        key = (selection_id, hc)
        rb = self.runners.get(key)
        if rb is None:
            rb = self.runners[key] = RunnerBook(selection_id, hc)
        return rb


class MarketDirty:
    """What changed in one market since the last drain.

    ``image``: replace the market (new, or an ``img`` in a recording).
    ``removed``: the market left the upstream. ``count``: how many upstream
    changes were merged into this mark (> 1 ⇒ ``con: true``).
    """

    __slots__ = ("count", "definition", "image", "removed", "runners", "tv")

    def __init__(self) -> None:
        self.definition = False
        self.image = False
        self.removed = False
        self.tv = False
        self.runners: set[RunnerKey] = set()
        self.count = 1

    def merge(self, other: MarketDirty) -> None:
        self.definition |= other.definition
        self.image |= other.image
        self.removed = other.removed
        self.tv |= other.tv
        self.runners |= other.runners
        self.count += other.count


def merge_dirty(into: dict[str, MarketDirty], marks: dict[str, MarketDirty]) -> None:
    """Merge ``marks`` into ``into`` (copies, so one drain can feed many connections)."""
    for market_id, mark in marks.items():
        mine = into.get(market_id)
        if mine is None:
            mine = into[market_id] = MarketDirty()
            mine.count = 0
        mine.merge(mark)


class FieldSpec:
    """The columns one subscription asked for (``marketDataFilter``).

    ``columns``: runner columns in wire order; ``levels``: ``ladderLevels``
    (1–10); ``definition``: EX_MARKET_DEF; ``market_tv``: EX_TRADED_VOL.
    """

    __slots__ = ("columns", "definition", "levels", "market_tv")

    def __init__(self, market_data_filter: dict[str, Any] | None) -> None:
        mdf = market_data_filter or {}
        fields = mdf.get("fields")
        if not isinstance(fields, list):
            fields = ["EX_MARKET_DEF"]
        wanted: set[str] = set()
        for f in fields:
            wanted.update(FIELD_COLUMNS.get(f, ()))
        self.columns: tuple[str, ...] = tuple(c for c in RC_ORDER if c in wanted)
        levels = mdf.get("ladderLevels", 3)
        self.levels: int = min(max(int(levels), 1), 10) if isinstance(levels, int) else 3
        self.definition: bool = "EX_MARKET_DEF" in fields
        self.market_tv: bool = "EX_TRADED_VOL" in fields


def _best_levels(side: dict[float, float], reverse: bool, levels: int) -> dict[int, tuple[float, float]]:
    best = sorted(side.items(), reverse=reverse)[:levels]
    return {i: ps for i, ps in enumerate(best)}


def project_runner(rb: RunnerBook, spec: FieldSpec) -> dict[str, Any]:
    """The runner as ``spec`` sees it: ``{column: value}`` (copies)."""
    out: dict[str, Any] = {}
    levels = spec.levels
    for col in spec.columns:
        if col in ("atb", "atl", "trd", "spb", "spl"):
            out[col] = dict(getattr(rb, col))
        elif col in ("batb", "bdatb"):
            given = getattr(rb, col)
            if given is None:
                out[col] = _best_levels(rb.atb, True, levels)
            else:
                out[col] = {lv: ps for lv, ps in given.items() if lv < levels}
        elif col in ("batl", "bdatl"):
            given = getattr(rb, col)
            if given is None:
                out[col] = _best_levels(rb.atl, False, levels)
            else:
                out[col] = {lv: ps for lv, ps in given.items() if lv < levels}
        else:
            out[col] = getattr(rb, col)
    return out


def _runner_tail(rc: dict[str, Any], rb: RunnerBook) -> dict[str, Any]:
    rc["id"] = rb.id
    if rb.hc is not None:
        rc["hc"] = rb.hc
    return rc


def image_runner(rb: RunnerBook, proj: dict[str, Any]) -> dict[str, Any]:
    """A full runner change (for ``img: true``) from a projection."""
    rc: dict[str, Any] = {}
    for col, value in proj.items():
        if col in ("atb", "atl", "trd", "spb", "spl"):
            if value:
                rc[col] = [[p, s] for p, s in value.items()]
        elif col in ("batb", "batl", "bdatb", "bdatl"):
            if value:
                rc[col] = [[lv, p, s] for lv, (p, s) in sorted(value.items())]
        elif value is not None:
            rc[col] = value
    return _runner_tail(rc, rb)


def diff_runner(rb: RunnerBook, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """The runner change turning projection ``old`` into ``new``, or ``None``."""
    if old is None:
        return image_runner(rb, new)
    rc: dict[str, Any] = {}
    for col, value in new.items():
        before = old.get(col)
        if col in ("atb", "atl", "trd", "spb", "spl"):
            if value == before:
                continue
            before = before or {}
            changes = [[p, s] for p, s in value.items() if before.get(p) != s]
            changes.extend([p, 0] for p in before if p not in value)
            if changes:
                rc[col] = changes
        elif col in ("batb", "batl", "bdatb", "bdatl"):
            if value == before:
                continue
            before = before or {}
            changes = []
            for lv in sorted(set(value) | set(before)):
                now = value.get(lv)
                if now is None:
                    changes.append([lv, 0, 0])
                elif before.get(lv) != now:
                    changes.append([lv, now[0], now[1]])
            if changes:
                rc[col] = changes
        elif value != before and value is not None:
            rc[col] = value
    if not rc:
        return None
    return _runner_tail(rc, rb)


# -- marketFilter ------------------------------------------------------------

_DEF_CRITERIA = {
    "eventTypeIds": "eventTypeId",
    "eventIds": "eventId",
    "marketTypes": "marketType",
    "countryCodes": "countryCode",
    "venues": "venue",
    "bettingTypes": "bettingType",
}


def market_matches(mb: MarketBook, market_filter: dict[str, Any] | None) -> bool:
    """Whether ``mb`` passes an ESA ``marketFilter`` (missing criteria match all).

    Criteria on the definition (``eventTypeIds``, ``eventIds``, ``marketTypes``,
    ``countryCodes``, ``venues``, ``bettingTypes``, ``bspMarket``,
    ``turnInPlayEnabled``) fail while the definition is unknown.
    """
    if not market_filter:
        return True
    ids = market_filter.get("marketIds")
    if ids is not None and mb.market_id not in ids:
        return False
    md = mb.definition
    for crit, key in _DEF_CRITERIA.items():
        wanted = market_filter.get(crit)
        if wanted is None:
            continue
        if md is None or md.get(key) not in wanted:
            return False
    for flag in ("bspMarket", "turnInPlayEnabled"):
        wanted = market_filter.get(flag)
        if wanted is None:
            continue
        if md is None or bool(md.get(flag)) != bool(wanted):
            return False
    return True


# -- recordings ------------------------------------------------------------


def _apply_prices(book: dict[float, float], updates: Iterable[list[float]]) -> None:
    for p, s in updates:
        if s == 0:
            book.pop(p, None)
        else:
            book[p] = s


def _apply_levels(
    book: dict[int, tuple[float, float]] | None, updates: Iterable[list[float]]
) -> dict[int, tuple[float, float]]:
    if book is None:
        book = {}
    for lv, p, s in updates:
        if s == 0:
            book.pop(int(lv), None)
        else:
            book[int(lv)] = (p, s)
    return book


def apply_recorded(books: dict[str, MarketBook], msg: dict[str, Any]) -> dict[str, MarketDirty]:
    """Apply one recorded ``mcm`` (decoded) to ``books``; return the marks.

    A market seen for the first time, or carrying ``img: true``, is replaced
    (historic files carry no ``img``: the first line of a market is its image).
    """
    marks: dict[str, MarketDirty] = {}
    for mc in msg.get("mc") or ():
        market_id = mc.get("id")
        if not isinstance(market_id, str):
            continue
        mark = marks.get(market_id)
        if mark is None:
            mark = marks[market_id] = MarketDirty()
        mb = books.get(market_id)
        if mb is None or mc.get("img"):
            old_seq = mb.def_seq if mb is not None else 0
            mb = books[market_id] = MarketBook(market_id)
            mb.def_seq = old_seq
            mark.image = True
        md = mc.get("marketDefinition")
        if md is not None:
            mb.set_definition(md)
            mark.definition = True
        if "tv" in mc:
            mb.tv = mc["tv"]
            mark.tv = True
        for rc in mc.get("rc") or ():
            rb = mb.runner(rc["id"], rc.get("hc"))
            for col, value in rc.items():
                if col in ("atb", "atl", "trd", "spb", "spl"):
                    _apply_prices(getattr(rb, col), value)
                elif col in ("batb", "batl", "bdatb", "bdatl"):
                    setattr(rb, col, _apply_levels(getattr(rb, col), value))
                elif col in ("ltp", "tv", "spn", "spf"):
                    setattr(rb, col, value)
            mark.runners.add(rb.key)
    return marks


# -- ground truth ------------------------------------------------------------


def selection_key(rb: RunnerBook) -> str:
    """Canonical selection id: ``"47972"``, or ``"47972:-0.25"`` with a non-zero handicap."""
    return f"{rb.id}:{num(rb.hc)}" if rb.hc else str(rb.id)


def truth_of(books: dict[str, MarketBook]) -> dict[str, Any]:
    """Current state of ``books`` for tests:
    ``{market_id: {"status", "in_play", "version", "runners": {selection_id:
    {"back": [[price, size], …] best first, "lay": […] best first, "ltp", "tv", "status"}}}}``.

    Selection ids are strings (:func:`selection_key`); ladders are full depth.
    """
    out: dict[str, Any] = {}
    for market_id, mb in books.items():
        md = mb.definition or {}
        statuses = {(r.get("id"), r.get("hc")): r.get("status") for r in md.get("runners", ())}
        out[market_id] = {
            "status": md.get("status"),
            "in_play": md.get("inPlay", False),
            "version": md.get("version"),
            "runners": {
                selection_key(rb): {
                    "back": rb.back(),
                    "lay": rb.lay(),
                    "ltp": rb.ltp,
                    "tv": rb.tv,
                    "status": statuses.get((rb.id, rb.hc)) or statuses.get((rb.id, None)),
                }
                for rb in mb.runners.values()
            },
        }
    return out
