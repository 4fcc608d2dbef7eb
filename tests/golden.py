"""Independent Betfair ESA decoder for the golden tests, built on betfairlightweight.

Expected values come from betfairlightweight (``StreamListener`` +
``MarketStream`` caches, the library the ESA community replays recordings
with), never from ``feed.*``: this module imports nothing from the project.
Only our canonical-model rules are re-stated here, from the spec:

- selection id ``"<id>"``, or ``"<id>:<hc>"`` when the handicap is not 0;
- ladder choice per market: the full price ladders ``atb``/``atl`` if the
  market has ever carried them, else the display ladders ``bdatb``/``bdatl``,
  else ``batb``/``batl`` (betfairlightweight keeps all three per runner as
  ``available_to_back`` / ``best_display_available_to_back`` /
  ``best_available_to_back`` and the lay equivalents); best first;
- market status: Betfair ``CLOSED`` becomes ``SETTLED`` when any runner is
  WINNER or PLACED; runner ``REMOVED_VACANT`` becomes ``REMOVED``; a runner
  never named in a marketDefinition is ``ACTIVE``;
- ``ltp`` 0 (no trade yet) is None; a BSP that is not a finite number
  (``"NaN"``, ``"Infinity"``) is None;
- after a market is CLOSED/SETTLED our book takes only definitions: price
  changes betfairlightweight applies after the close are tracked here and
  the price fields (ladders, ltp) of such a market are compared at their
  state just before the first such change (see :attr:`GoldenDecoder.frozen`).

The listener is set up the way betfairlightweight's ``HistoricalStream``
replays a file: ``StreamListener(max_latency=None, lightweight=True,
update_clk=False)``, ``register_stream(0, "marketSubscription")`` and one
``on_data(line)`` per recorded line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from betfairlightweight import StreamListener
from betfairlightweight.compat import json as bflw_json

DEPTH = 3  # levels compared per side

#: ladder ranks, best source first
_FULL, _DISPLAY, _BEST = 3, 2, 1
_LADDER_KEYS = {"atb": _FULL, "atl": _FULL, "bdatb": _DISPLAY, "bdatl": _DISPLAY, "batb": _BEST, "batl": _BEST}

Ladder = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SelectionView:
    """What the golden test compares of one selection."""

    status: str
    back: Ladder
    lay: Ladder
    ltp: float | None
    adjustment_factor: float | None
    bsp: float | None


@dataclass(frozen=True)
class MarketView:
    """What the golden test compares of one market (selections by our id)."""

    status: str
    in_play: bool
    bet_delay: int
    version: int
    selections: dict[str, SelectionView]


@dataclass
class LineResult:
    """How betfairlightweight took one line.

    outcome: ``ok``; ``invalid_json`` (its ``on_data`` logs "value error" and
    drops the line); ``error`` (``on_data`` raised, e.g. ``KeyError: 'pt'``
    for a change message without a publish time). created_from_delta: ids of
    markets betfairlightweight created from a change without a
    marketDefinition (it builds a cache for any unknown market). markets:
    ids of every market the line changes.
    """

    outcome: str
    detail: str = ""
    markets: list[str] = field(default_factory=list)
    created_from_delta: list[str] = field(default_factory=list)


def selection_id(rid: int, hc: float | None) -> str:
    """Our selection id for a betfairlightweight (selectionId, handicap) key."""
    if not hc:
        return str(rid)
    return f"{rid}:{format(float(hc), 'g')}"


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _top(available: Any) -> Ladder:
    """Best ``DEPTH`` levels of a betfairlightweight ``Available`` (its
    ``serialised`` list is kept in ladder order: prices best first, levels by
    position)."""
    return tuple((float(lv["price"]), float(lv["size"])) for lv in available.serialised[:DEPTH])


_RUNNER_STATUS = {"REMOVED_VACANT": "REMOVED"}


class GoldenDecoder:
    """Feeds raw lines to a betfairlightweight listener and exposes views."""

    def __init__(self) -> None:
        self.listener = StreamListener(max_latency=None, lightweight=True, update_clk=False)
        self.listener.register_stream(0, "marketSubscription")
        #: market id → best ladder rank the market has ever carried
        self.ladder: dict[str, int] = {}
        #: market id → view frozen before the first price-only change after close
        self.frozen: dict[str, MarketView] = {}
        #: market id → number of price-only changes betfairlightweight applied after the close
        self.changes_after_close: dict[str, int] = {}

    @property
    def caches(self) -> dict[str, Any]:
        return self.listener.stream._caches

    # -- feeding ------------------------------------------------------------

    def feed(self, raw: bytes) -> LineResult:
        """Give one recorded line to betfairlightweight; say how it took it."""
        try:
            text = raw.decode("utf-8")
            data = bflw_json.loads(text)
        except ValueError as exc:  # UnicodeDecodeError and orjson.JSONDecodeError are ValueErrors
            self.listener.on_data(raw.decode("utf-8", "replace"))  # bflw logs and drops it
            return LineResult("invalid_json", str(exc))
        changes = []
        if isinstance(data, dict) and data.get("op") == "mcm" and isinstance(data.get("mc"), list):
            changes = [mc for mc in data["mc"] if isinstance(mc, dict)]
        created = [mc.get("id") for mc in changes
                   if mc.get("id") not in self.caches and "marketDefinition" not in mc]
        self._freeze_before_close_changes(changes)
        try:
            self.listener.on_data(text)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot process"
            return LineResult("error", f"{type(exc).__name__}: {exc}")
        for mc in changes:
            market_id = mc.get("id")
            for rc in mc.get("rc") or ():
                for key, rank in _LADDER_KEYS.items():
                    if key in rc and rank > self.ladder.get(market_id, 0):
                        self.ladder[market_id] = rank
        return LineResult("ok", markets=[mc.get("id") for mc in changes], created_from_delta=created)

    def _freeze_before_close_changes(self, changes: list[dict[str, Any]]) -> None:
        for mc in changes:
            market_id = mc.get("id")
            cache = self.caches.get(market_id)
            if cache is None or mc.get("img") or "marketDefinition" in mc or "tv" in mc or not mc.get("rc"):
                continue
            if cache.closed:  # Betfair CLOSED (our CLOSED or SETTLED)
                self.changes_after_close[market_id] = self.changes_after_close.get(market_id, 0) + 1
                if market_id not in self.frozen:
                    self.frozen[market_id] = self._market_view(market_id, cache)

    # -- views --------------------------------------------------------------

    def snapshot(self) -> dict[str, MarketView]:
        """Every market betfairlightweight holds, as canonical views.

        Scalars come from ``listener.snap()`` (lightweight dicts: the
        MarketBook / RunnerBook json); ladders from the runner caches.
        """
        out: dict[str, MarketView] = {}
        for book in self.listener.snap():
            market_id = book["marketId"]
            view = self._market_view(market_id, self.caches[market_id], book)
            frozen = self.frozen.get(market_id)
            if frozen is not None:
                selections = {
                    sid: (replace(sel, back=old.back, lay=old.lay, ltp=old.ltp)
                          if (old := frozen.selections.get(sid)) is not None else sel)
                    for sid, sel in view.selections.items()
                }
                view = replace(view, selections=selections)
            out[market_id] = view
        return out

    def _market_view(self, market_id: str, cache: Any, book: dict[str, Any] | None = None) -> MarketView:
        if book is None:
            book = cache.serialise
        rank = self.ladder.get(market_id, 0)
        runners = {(r.selection_id, r.handicap): r for r in cache.runners}
        selections: dict[str, SelectionView] = {}
        any_placed = False
        for rb in book["runners"]:
            runner = runners[(rb["selectionId"], rb["handicap"])]
            if rank == _FULL:
                back, lay = _top(runner.available_to_back), _top(runner.available_to_lay)
            elif rank == _DISPLAY:
                back = _top(runner.best_display_available_to_back)
                lay = _top(runner.best_display_available_to_lay)
            elif rank == _BEST:
                back, lay = _top(runner.best_available_to_back), _top(runner.best_available_to_lay)
            else:
                back = lay = ()
            raw_status = rb["status"] or "ACTIVE"
            any_placed = any_placed or raw_status in ("WINNER", "PLACED")
            ltp = rb["lastPriceTraded"]
            selections[selection_id(rb["selectionId"], rb["handicap"])] = SelectionView(
                status=_RUNNER_STATUS.get(raw_status, raw_status),
                back=back,
                lay=lay,
                ltp=float(ltp) if ltp else None,
                adjustment_factor=rb["adjustmentFactor"],
                bsp=_finite(rb["sp"]["actualSP"]),
            )
        status = book["status"]
        if status == "CLOSED" and any_placed:
            status = "SETTLED"
        return MarketView(
            status=status,
            in_play=bool(book["inplay"]),
            bet_delay=book["betDelay"] or 0,
            version=book["version"] or 0,
            selections=selections,
        )
