"""One set of bounds for every provider: the canonical-model validator.

Every :class:`~feed.normalise.base.MarketUpdate` a normaliser emits — Betfair,
Pinnacle, The Odds API, push — must satisfy the same bounds, checked by
:func:`validate_update` (the ingest runs it per market update, on the hot
path) and, with the same functions and constants, by the normalisers
themselves *before* they absorb a change into their caches (so a market the
ingest would reject never leaves a normaliser's cache ahead of the book).
The bound constants live here and only here (:mod:`feed.odds` and the
normalisers import them).

Bounds (inclusive unless said otherwise):

===========================  =================================================  ==================
field                        bound                                              reason
===========================  =================================================  ==================
price, back/lay prices,      decimal odds, finite, ``1.01 ≤ x ≤ 1000``          ``invalid_price``
ltp, bsp                     (``bsp`` −0.0 is therefore invalid)
back/lay sizes,              finite, ``x ≥ 0`` (currency units)                 ``invalid_size``
traded_volume (selection
and market), max_stake
version, bet_delay_s,        ``int`` (not bool), ``0 ≤ x ≤ 2**53 − 1``          ``invalid_number``
number_of_winners,           (``2**53 − 1``: above it JavaScript clients
sort_priority                lose precision)
adjustment_factor            finite, ``0 ≤ x ≤ 100`` (percent)                  ``invalid_number``
void_factor                  finite, ``0 ≤ x ≤ 1`` (a fraction of the stake)    ``invalid_number``
dead_heat_factor             finite, ``0 < x ≤ 1`` (a fraction of the payout)   ``invalid_number``
handicap                     finite, ``|x| ≤ 1000``                             ``invalid_number``
start_time                   ``int`` ms, 1970-01-01 ≤ t ≤ 2100-01-01 (UTC)      ``invalid_time``
source_ts                    ``int`` ms, ``0 < t ≤ 2100-01-01`` and             ``clock_skew``
                             ``t ≤ recv_ms + max_future_skew_ms``
source_ts_original           ``int`` ms, ``0 < t ≤ 2100-01-01`` (a recording's  ``clock_skew``
                             own clock: may be far in the past)
===========================  =================================================  ==================

A value of the wrong type (a string where a number belongs, a ladder level
that is not a pair) is ``invalid_schema``. Absent optional values (None) are
always valid.

Provider inputs are bounded a little tighter by the normalisers, with the
constants here: a size, volume or stake a provider sends must be at most
:data:`MAX_SIZE` (1e12: no real amount is near it, and it keeps the sums the
normalisers derive — Betfair's traded volume from the traded ladder — finite).

**Clock-skew policy.** Updates are ordered by the provider's own sequence
(ESA ``clk``, push ``seq``/entry id) and by ``feed.book``'s per-market
``seq``, never by the provider's clock; but the book refuses to move a market
back in provider time, so one absurd provider time (year 2500, or an hour
ahead of us) would freeze a market until that time passed. Provider times
are therefore bounded on the way in: a ``source_ts`` more than
``max_future_skew_ms`` (default :data:`MAX_FUTURE_SKEW_MS`, 30 s) after the
update's receive time ``recv_ms``, beyond 2100-01-01, not positive or not an
integer — or an absurd ``source_ts_original`` — makes the market update
*quarantined* with reason ``clock_skew``: the ingest rejects that market
update alone (the rest of the message applies) and marks the market
unconfirmed. Times in the past are never rejected for skew (late delivery
and replays are normal; lag metrics record them).

Cost (``python benchmarks/fuzz.py --validator``): no allocation on success;
about 0.7 µs for a one-selection delta with 3 ladder levels a side, 1.1 µs
with 10 + 10 levels, ~1 µs per selection for images (one shared, loaded
2-core machine). A failed check takes a slower path that finds and
describes the first offending value. The ingest passes a
:class:`CheckedLadders` so that a ladder side that did not change (the very
list already found within bounds for that selection) is not walked again;
every other check still runs on every update.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from feed.errors import FeedDecodeError

if TYPE_CHECKING:
    from feed.models import EventState, Ladder, MarketHeader, RaceProgress, Selection
    from feed.normalise.base import MarketUpdate

__all__ = [
    "MAX_ADJUSTMENT_FACTOR",
    "MAX_FUTURE_SKEW_MS",
    "MAX_HANDICAP",
    "MAX_INT",
    "MAX_PRICE",
    "MAX_SIZE",
    "MAX_TIME_MS",
    "MIN_PRICE",
    "MIN_TIME_MS",
    "CheckedLadders",
    "check_market",
    "check_provider_time",
    "check_selection",
    "check_time",
    "is_price",
    "is_size",
    "check_event_state",
    "validate_event_state",
    "validate_update",
]

#: decimal odds: the Betfair ladder's bottom and top (inclusive)
MIN_PRICE = 1.01
MAX_PRICE = 1000.0
#: sizes, volumes and stakes a provider sends (currency units): at most this
#: (no real amount is near it; it keeps sums of sizes finite). Canonical sizes
#: need only be finite and >= 0.
MAX_SIZE = 1e12
#: the largest finite float: canonical sizes are at most this (i.e. finite)
_FINITE = sys.float_info.max
#: integers (ids, versions, counts): at most this (JavaScript's safe integer)
MAX_INT = 2**53 - 1
#: adjustment factors are percent
MAX_ADJUSTMENT_FACTOR = 100.0
#: |handicap| / line at most this
MAX_HANDICAP = 1000.0
#: times are ms since the epoch within [1970-01-01, 2100-01-01] UTC
MIN_TIME_MS = 0
MAX_TIME_MS = 4_102_444_800_000
#: provider times may run at most this far ahead of our receive time (ms)
MAX_FUTURE_SKEW_MS = 30_000


def is_price(x: object) -> bool:
    """``x`` is a canonical decimal price: a finite number 1.01–1000 (not bool)."""
    if type(x) is not float and type(x) is not int:
        return False
    return MIN_PRICE <= x <= MAX_PRICE


def is_size(x: object) -> bool:
    """``x`` is a canonical size / volume / stake: a finite number >= 0 (not bool)."""
    if type(x) is not float and type(x) is not int:
        return False
    return 0.0 <= x <= _FINITE


def check_time(ms: object, what: str = "time", market_id: str | None = None) -> None:
    """Raise ``FeedDecodeError("invalid_time")`` unless ``ms`` is an ``int``
    of ms within 1970-01-01 … 2100-01-01 (UTC)."""
    if type(ms) is not int or not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        raise FeedDecodeError("invalid_time", f"{what} {ms!r} is not within 1970..2100 (ms since the epoch)"
                              + (f" in market {market_id}" if market_id else ""), market_id=market_id)


def check_provider_time(ts: object, recv_ms: int, max_future_skew_ms: int = MAX_FUTURE_SKEW_MS,
                        what: str = "source_ts", market_id: str | None = None) -> None:
    """Raise ``FeedDecodeError("clock_skew")`` unless ``ts`` (provider time,
    int ms since the epoch) is positive, at most 2100-01-01 and at most
    ``max_future_skew_ms`` after ``recv_ms`` (see the module docstring)."""
    if type(ts) is not int or ts <= 0 or ts > MAX_TIME_MS or ts > recv_ms and ts - recv_ms > max_future_skew_ms:
        raise FeedDecodeError("clock_skew", f"{what} {ts!r} is absurd or more than {max_future_skew_ms} ms after "
                              f"its receive time {recv_ms}" + (f" in market {market_id}" if market_id else ""),
                              market_id=market_id)


def _bad(reason: str, market_id: str, what: str, value: object) -> FeedDecodeError:
    return FeedDecodeError(reason, f"{what} {value!r} out of range in market {market_id}", market_id=market_id)


def check_selection(s: Selection, market_id: str = "") -> None:
    """Raise :class:`FeedDecodeError` unless selection ``s`` is within the
    bounds of the module docstring (reasons ``invalid_price``,
    ``invalid_size``, ``invalid_number``, ``invalid_schema``)."""
    try:
        _selection(s, market_id)
    except (TypeError, ValueError) as exc:
        raise FeedDecodeError("invalid_schema", f"selection {s.selection_id!r} of market {market_id}: {exc}",
                              market_id=market_id or None) from None


def _selection(s: Selection, market_id: str) -> None:
    lo, hi, top = MIN_PRICE, MAX_PRICE, _FINITE
    x: Any = s.price
    if x is not None and not (lo <= x <= hi):
        raise _bad("invalid_price", market_id, f"selection {s.selection_id} price", x)
    for p, z in s.back:
        if not (lo <= p <= hi and 0.0 <= z <= top):
            raise _bad("invalid_price" if not (lo <= p <= hi) else "invalid_size", market_id,
                       f"selection {s.selection_id} back level", (p, z))
    for p, z in s.lay:
        if not (lo <= p <= hi and 0.0 <= z <= top):
            raise _bad("invalid_price" if not (lo <= p <= hi) else "invalid_size", market_id,
                       f"selection {s.selection_id} lay level", (p, z))
    x = s.ltp
    if x is not None and not (lo <= x <= hi):
        raise _bad("invalid_price", market_id, f"selection {s.selection_id} ltp", x)
    x = s.bsp
    if x is not None and not (lo <= x <= hi):
        raise _bad("invalid_price", market_id, f"selection {s.selection_id} bsp", x)
    x = s.traded_volume
    if x is not None and not (0.0 <= x <= top):
        raise _bad("invalid_size", market_id, f"selection {s.selection_id} traded_volume", x)
    x = s.max_stake
    if x is not None and not (0.0 <= x <= top):
        raise _bad("invalid_size", market_id, f"selection {s.selection_id} max_stake", x)
    x = s.sort_priority
    if x is not None and (type(x) is not int or not 0 <= x <= MAX_INT):
        raise _bad("invalid_number", market_id, f"selection {s.selection_id} sort_priority", x)
    x = s.adjustment_factor
    if x is not None and not (0.0 <= x <= MAX_ADJUSTMENT_FACTOR):
        raise _bad("invalid_number", market_id, f"selection {s.selection_id} adjustment_factor", x)
    x = s.handicap
    if not (-MAX_HANDICAP <= x <= MAX_HANDICAP):
        raise _bad("invalid_number", market_id, f"selection {s.selection_id} handicap", x)
    x = s.void_factor
    if x is not None and not (0.0 <= x <= 1.0):
        raise _bad("invalid_number", market_id, f"selection {s.selection_id} void_factor", x)
    x = s.dead_heat_factor
    if x is not None and not (0.0 < x <= 1.0):
        raise _bad("invalid_number", market_id, f"selection {s.selection_id} dead_heat_factor", x)


def _header(h: MarketHeader, market_id: str) -> None:
    x: Any = h.version
    if type(x) is not int or not 0 <= x <= MAX_INT:
        raise _bad("invalid_number", market_id, "version", x)
    x = h.bet_delay_s
    if type(x) is not int or not 0 <= x <= MAX_INT:
        raise _bad("invalid_number", market_id, "bet_delay_s", x)
    x = h.number_of_winners
    if x is not None and (type(x) is not int or not 0 <= x <= MAX_INT):
        raise _bad("invalid_number", market_id, "number_of_winners", x)
    x = h.start_time
    if x is not None and (type(x) is not int or not MIN_TIME_MS <= x <= MAX_TIME_MS):
        raise _bad("invalid_time", market_id, "start_time", x)
    x = h.traded_volume
    if x is not None and not (0.0 <= x <= _FINITE):
        raise _bad("invalid_size", market_id, "traded_volume", x)


def _ok(header: MarketHeader | None, selections: Iterable[Selection], traded_volume: float | None, ts: int,
        original: int | None, recv_ms: int, skew: int, checked: dict[str, tuple[Ladder, Ladder]] | None = None,
        _lo: float = MIN_PRICE, _hi: float = MAX_PRICE, _top: float = _FINITE, _imax: int = MAX_INT,
        _tmax: int = MAX_TIME_MS, _adj: float = MAX_ADJUSTMENT_FACTOR, _hc: float = MAX_HANDICAP,
        _int: type = int) -> bool:
    """The hot path: True when everything is within bounds (no exception;
    no allocation without ``checked``); False (or TypeError) sends the
    caller to :func:`_explain`. Constants are bound as defaults: locals are
    faster than globals.

    checked: the market's entry of a :class:`CheckedLadders` (selection id →
    the back and lay lists last found within bounds): a side that is the
    very list recorded there is not walked again; every side found within
    bounds is recorded (even when a later check of the update fails: the
    record is about that list alone)."""
    if type(ts) is not _int or ts <= 0 or ts > _tmax or ts > recv_ms and ts - recv_ms > skew:
        return False
    if original is not None and (type(original) is not _int or original <= 0 or original > _tmax):
        return False
    if traded_volume is not None and not 0.0 <= traded_volume <= _top:
        return False
    x: Any
    if header is not None:
        x = header.version
        if type(x) is not _int or x < 0 or x > _imax:
            return False
        x = header.bet_delay_s
        if type(x) is not _int or x < 0 or x > _imax:
            return False
        x = header.number_of_winners
        if x is not None and (type(x) is not _int or x < 0 or x > _imax):
            return False
        x = header.start_time
        if x is not None and (type(x) is not _int or x < 0 or x > _tmax):
            return False
        x = header.traded_volume
        if x is not None and not 0.0 <= x <= _top:
            return False
    back: Any
    lay: Any
    seen: Any = None
    for s in selections:
        x = s.price
        if x is not None and not _lo <= x <= _hi:
            return False
        back = s.back
        lay = s.lay
        if checked is not None:
            seen = checked.get(s.selection_id)
        if seen is None or seen[0] is not back:
            for p, z in back:
                if not (_lo <= p <= _hi and 0.0 <= z <= _top):
                    return False
        if seen is None or seen[1] is not lay:
            for p, z in lay:
                if not (_lo <= p <= _hi and 0.0 <= z <= _top):
                    return False
        if checked is not None and (seen is None or seen[0] is not back or seen[1] is not lay):
            checked[s.selection_id] = (back, lay)
        x = s.ltp
        if x is not None and not _lo <= x <= _hi:
            return False
        x = s.bsp
        if x is not None and not _lo <= x <= _hi:
            return False
        x = s.traded_volume
        if x is not None and not 0.0 <= x <= _top:
            return False
        x = s.max_stake
        if x is not None and not 0.0 <= x <= _top:
            return False
        x = s.sort_priority
        if x is not None and (type(x) is not _int or x < 0 or x > _imax):
            return False
        x = s.adjustment_factor
        if x is not None and not 0.0 <= x <= _adj:
            return False
        if not -_hc <= s.handicap <= _hc:
            return False
        x = s.void_factor
        if x is not None and not 0.0 <= x <= 1.0:
            return False
        x = s.dead_heat_factor
        if x is not None and not 0.0 < x <= 1.0:
            return False
    return True


def _explain(market_id: str, header: MarketHeader | None, selections: Iterable[Selection],
             traded_volume: float | None, source_ts: int, source_ts_original: int | None,
             recv_ms: int, max_future_skew_ms: int) -> None:
    """The slow path: find the first value out of bounds and raise its
    :class:`FeedDecodeError` (returns only if everything is in bounds)."""
    try:
        check_provider_time(source_ts, recv_ms, max_future_skew_ms, "source_ts", market_id)
        o = source_ts_original
        if o is not None and (type(o) is not int or o <= 0 or o > MAX_TIME_MS):
            raise _bad("clock_skew", market_id, "source_ts_original", o)
        if traded_volume is not None and not (0.0 <= traded_volume <= _FINITE):
            raise _bad("invalid_size", market_id, "traded_volume", traded_volume)
        if header is not None:
            _header(header, market_id)
        for s in selections:
            _selection(s, market_id)
    except (TypeError, ValueError) as exc:  # a non-number where a number belongs, a level that is not a pair
        raise FeedDecodeError("invalid_schema", f"market {market_id}: {exc}", market_id=market_id) from None


def check_market(market_id: str, header: MarketHeader | None, selections: Iterable[Selection],
                 traded_volume: float | None, source_ts: int, source_ts_original: int | None,
                 recv_ms: int, max_future_skew_ms: int = MAX_FUTURE_SKEW_MS) -> None:
    """The checks of :func:`validate_update` on a market's parts (for
    normalisers that validate a rendering before they emit it); raises
    :class:`FeedDecodeError` with ``market_id`` set."""
    try:
        if _ok(header, selections, traded_volume, source_ts, source_ts_original, recv_ms, max_future_skew_ms):
            return
    except (TypeError, ValueError):
        pass
    _explain(market_id, header, selections, traded_volume, source_ts, source_ts_original, recv_ms,
             max_future_skew_ms)
    # _ok said no but every check passed: only possible for a value _ok reads differently (a bool where an
    # int belongs, say); reject it rather than let it through
    raise FeedDecodeError("invalid_schema", f"market {market_id}: a value of the wrong type", market_id=market_id)


class CheckedLadders:
    """The ladder sides :func:`validate_update` already found within bounds,
    so that an unchanged side is not walked again (one per ingest source).

    Per market id and selection id it holds the ``back`` and ``lay`` lists
    of the last selection whose sides passed; a later selection whose side
    is the *very same list object* (``is``, not ``==``) skips that side's
    level checks — every other check of the selection and the market still
    runs, and any other list (a changed side, a copy, a side of another
    selection) is walked in full. Holding the lists keeps them alive, so an
    id can never be reused by another list while it is recorded.

    Sound because a ladder list a normaliser has emitted is never mutated
    afterwards (normalisers build a new list for a changed side and reuse
    the old one only when it is unchanged): the same invariant
    :mod:`feed.book` relies on to tell an unchanged side by identity.
    Bounded: past ``max_markets`` markets the record is dropped whole (the
    next update of each market is then walked in full).
    """

    __slots__ = ("markets", "max_markets")

    def __init__(self, max_markets: int = 200_000) -> None:
        self.markets: dict[str, dict[str, tuple[Ladder, Ladder]]] = {}
        self.max_markets = max_markets

    def of(self, market_id: str) -> dict[str, tuple[Ladder, Ladder]]:
        """The record of one market (selection id → (back, lay)), created empty."""
        rec = self.markets.get(market_id)
        if rec is None:
            if len(self.markets) >= self.max_markets:
                self.markets.clear()
            rec = self.markets[market_id] = {}
        return rec

    def forget(self, market_id: str) -> None:
        """Drop a market's record (its next update is walked in full)."""
        self.markets.pop(market_id, None)


def validate_update(update: MarketUpdate, recv_ms: int, *, max_future_skew_ms: int = MAX_FUTURE_SKEW_MS,
                    checked: CheckedLadders | None = None) -> None:
    """Check one market update against the bounds of the module docstring.

    update: a normaliser's :class:`~feed.normalise.base.MarketUpdate`.
    recv_ms: when its message was received (int ms since the epoch).
    max_future_skew_ms: how far ``source_ts`` may run ahead of ``recv_ms``.
    checked: ladder sides already found within bounds (see
    :class:`CheckedLadders`): a side that is the same list object as the one
    recorded for its selection is not walked again; the sides found within
    bounds are recorded. None: every side is walked.
    Returns None; raises :class:`~feed.errors.FeedDecodeError` (``raw``
    empty, ``market_id`` = the update's) with reason ``invalid_price``,
    ``invalid_size``, ``invalid_number``, ``invalid_time``, ``clock_skew`` or
    ``invalid_schema``. Allocates nothing when the update is valid and
    ``checked`` is None.
    """
    rec = None
    if checked is not None:
        rec = checked.markets.get(update.market_id)
        if rec is None:
            rec = checked.of(update.market_id)
    try:
        if _ok(update.header, update.selections, update.traded_volume, update.source_ts,
               update.source_ts_original, recv_ms, max_future_skew_ms, rec):
            return
    except (TypeError, ValueError):
        pass
    check_market(update.market_id, update.header, update.selections, update.traded_volume,
                 update.source_ts, update.source_ts_original, recv_ms, max_future_skew_ms)


# -- event state (feed.models.EventState) ---------------------------------------------------------

#: scores (totals and periods, goals / points / runs) are ints within 0..this
MAX_SCORE = 100_000
#: red cards per side at most this
MAX_CARDS = 20
#: clock readings (elapsed, remaining, stoppage) are seconds within 0..this (a day)
MAX_CLOCK_S = 86_400
#: cricket: wickets per innings at most this; legal balls per innings at most this; innings at most this
MAX_WICKETS = 11
MAX_BALLS = 10_000
MAX_INNINGS = 20
#: periods listed in one score at most this
MAX_PERIODS = 64
#: races: distances to the finish in metres within 0..this; speeds in m/s within 0..this (a racehorse
#: tops out near 20, a greyhound near 18: anything past this is a broken reading); sectional times in
#: seconds within 0..this; runners (and the running order) at most this many
MAX_RACE_M = 10_000.0
MAX_RACE_SPEED_MPS = 40.0
MAX_SECTIONAL_S = 3_600.0
MAX_RACE_RUNNERS = 64
#: a period code: lowercase letters, digits, ``_``, 1–16 characters (``1h``, ``ht``, ``q3``, ``innings2``)
_PERIOD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_EVENT_STATUSES = frozenset({"NOT_STARTED", "LIVE", "SUSPENDED", "ENDED", "CLOSED", "CANCELLED", "POSTPONED",
                             "INTERRUPTED", "ABANDONED", "DELAYED"})


def is_period(text: object) -> bool:
    """``text`` is a period code (see :class:`feed.models.EventState`)."""
    return type(text) is str and 1 <= len(text) <= 16 and all(c in _PERIOD_CHARS for c in text)


def _es_bad(reason: str, event_id: str, what: str, value: object) -> FeedDecodeError:
    return FeedDecodeError(reason, f"{what} {value!r:.80} out of range in the state of event {event_id}",
                           event_id=event_id)


def _es_float(event_id: str, what: str, value: float | None, hi: float) -> None:
    """``value`` is None or a finite number within 0..``hi``."""
    if value is None:
        return
    if type(value) not in (int, float):
        raise FeedDecodeError("invalid_schema", f"{what} {value!r:.80} is not a number in the state of event "
                              f"{event_id}", event_id=event_id)
    if not 0 <= value <= hi:  # NaN fails both
        raise _es_bad("invalid_number", event_id, what, value)


def _check_race(eid: str, race: RaceProgress, recv_ms: int, max_future_skew_ms: int) -> None:
    if type(race.race_id) is not str or not 0 < len(race.race_id) <= 64:
        raise FeedDecodeError("invalid_schema", f"race id {race.race_id!r:.80} of event {eid}")
    if race.gate is not None and (type(race.gate) is not str or not 0 < len(race.gate) <= 16):
        raise FeedDecodeError("invalid_schema", f"race gate {race.gate!r:.40} of event {eid}")
    _es_float(eid, "race distance_m", race.distance_m, MAX_RACE_M)
    _es_float(eid, "race leader_speed_mps", race.leader_speed_mps, MAX_RACE_SPEED_MPS)
    _es_float(eid, "race sectional_s", race.sectional_s, MAX_SECTIONAL_S)
    if len(race.order) > MAX_RACE_RUNNERS or len(race.runners) > MAX_RACE_RUNNERS:
        raise FeedDecodeError("invalid_schema", f"more than {MAX_RACE_RUNNERS} runners in the race of event {eid}")
    if len(set(race.order)) != len(race.order):
        raise FeedDecodeError("invalid_schema", f"a runner twice in the running order of event {eid}")
    for r in race.runners:
        _es_float(eid, f"runner {r.selection_id} distance_m", r.distance_m, MAX_RACE_M)
        _es_float(eid, f"runner {r.selection_id} speed_mps", r.speed_mps, MAX_RACE_SPEED_MPS)
        check_provider_time(r.at, recv_ms, max_future_skew_ms, f"tracking time of runner {r.selection_id}")


def _es_int(event_id: str, what: str, value: object, hi: int, lo: int = 0) -> None:
    if type(value) is not int:
        raise FeedDecodeError("invalid_schema", f"{what} {value!r:.80} is not an integer in the state of event "
                              f"{event_id}", event_id=event_id)
    if not lo <= value <= hi:
        raise _es_bad("invalid_number", event_id, what, value)


def validate_event_state(es: EventState, recv_ms: int, *, max_future_skew_ms: int = MAX_FUTURE_SKEW_MS) -> None:
    """Check one :class:`~feed.models.EventState` (the ingest runs it on every
    state a normaliser emits; normalisers run it before they absorb a state).

    Bounds: scores (totals, periods, innings runs) ints 0..:data:`MAX_SCORE`;
    red cards 0..:data:`MAX_CARDS`; wickets 0..:data:`MAX_WICKETS`; balls
    0..:data:`MAX_BALLS`; innings numbers 1..:data:`MAX_INNINGS`; clock
    seconds / remaining / stoppage 0..:data:`MAX_CLOCK_S`; a race's
    distances 0..:data:`MAX_RACE_M` m, speeds 0..:data:`MAX_RACE_SPEED_MPS`
    m/s, sectional time 0..:data:`MAX_SECTIONAL_S` s — ``invalid_number``;
    more than :data:`MAX_RACE_RUNNERS` runners, a runner twice in the order,
    a value of the wrong type, an unknown status, a period code that is not
    1–16 of ``[a-z0-9_]``, more than :data:`MAX_PERIODS` periods or
    :data:`MAX_INNINGS` innings, an empty event id — ``invalid_schema``;
    ``source_ts`` and the clock's ``at`` as every provider time (positive,
    ≤ 2100-01-01, at most ``max_future_skew_ms`` after ``recv_ms``),
    ``source_ts_original`` positive and ≤ 2100 — ``clock_skew``.
    Raises :class:`~feed.errors.FeedDecodeError` with ``event_id`` set;
    returns None when the state is within bounds.
    """
    eid = es.event_id
    if type(eid) is not str or not 0 < len(eid) <= 256:
        raise FeedDecodeError("invalid_schema", f"event id {eid!r:.80} is not 1-256 characters", event_id=None)
    try:
        check_provider_time(es.source_ts, recv_ms, max_future_skew_ms, f"source_ts of the state of event {eid}")
        o = es.source_ts_original
        if o is not None and (type(o) is not int or o <= 0 or o > MAX_TIME_MS):
            raise _es_bad("clock_skew", eid, "source_ts_original", o)
        if es.status not in _EVENT_STATUSES:
            raise FeedDecodeError("invalid_schema", f"status {es.status!r:.40} of event {eid}")
        if type(es.in_play) is not bool:
            raise FeedDecodeError("invalid_schema", f"in_play {es.in_play!r:.40} of event {eid}")
        if es.period is not None and not is_period(es.period):
            raise FeedDecodeError("invalid_schema", f"period {es.period!r:.40} of event {eid} is not 1-16 of [a-z0-9_]")
        _es_int(eid, "version", es.version, MAX_INT)
        c = es.clock
        if c is not None:
            _es_int(eid, "clock seconds", c.seconds, MAX_CLOCK_S)
            if type(c.running) is not bool:
                raise FeedDecodeError("invalid_schema", f"clock running {c.running!r:.40} of event {eid}")
            check_provider_time(c.at, recv_ms, max_future_skew_ms, f"clock at of event {eid}")
            if c.remaining_s is not None:
                _es_int(eid, "clock remaining_s", c.remaining_s, MAX_CLOCK_S)
            if c.stoppage_s is not None:
                _es_int(eid, "clock stoppage_s", c.stoppage_s, MAX_CLOCK_S)
        sc = es.score
        if sc is not None:
            _es_int(eid, "home score", sc.home, MAX_SCORE)
            _es_int(eid, "away score", sc.away, MAX_SCORE)
            if len(sc.periods) > MAX_PERIODS:
                raise FeedDecodeError("invalid_schema", f"{len(sc.periods)} periods in the score of event {eid}")
            for p in sc.periods:
                if not is_period(p.period):
                    raise FeedDecodeError("invalid_schema", f"period {p.period!r:.40} in the score of event {eid}")
                _es_int(eid, f"{p.period} home score", p.home, MAX_SCORE)
                _es_int(eid, f"{p.period} away score", p.away, MAX_SCORE)
        rc = es.red_cards
        if rc is not None:
            _es_int(eid, "home red cards", rc.home, MAX_CARDS)
            _es_int(eid, "away red cards", rc.away, MAX_CARDS)
        if len(es.innings) > MAX_INNINGS:
            raise FeedDecodeError("invalid_schema", f"{len(es.innings)} innings in the state of event {eid}")
        for inn in es.innings:
            _es_int(eid, "innings number", inn.number, MAX_INNINGS, 1)
            if inn.team not in (None, "home", "away"):
                raise FeedDecodeError("invalid_schema", f"innings team {inn.team!r:.40} of event {eid}")
            _es_int(eid, f"innings {inn.number} runs", inn.runs, MAX_SCORE)
            _es_int(eid, f"innings {inn.number} wickets", inn.wickets, MAX_WICKETS)
            _es_int(eid, f"innings {inn.number} balls", inn.balls, MAX_BALLS)
        if es.race is not None:
            _check_race(eid, es.race, recv_ms, max_future_skew_ms)
    except FeedDecodeError as exc:
        exc.event_id = eid
        raise
    except (TypeError, ValueError) as exc:  # a structure that is not what the model says
        raise FeedDecodeError("invalid_schema", f"state of event {eid}: {exc}", event_id=eid) from None


#: the same checks, under the name the normalisers use before they absorb a state
check_event_state = validate_event_state
