"""Generic JSON push format (``docs/push-format.md``) → canonical market updates.

Pure: bytes in, :class:`~feed.normalise.base.NormalisedBatch` out; no I/O and
no clock reads (times come in as arguments). The same object serves the
WebSocket and SSE consumers (:mod:`feed.sources.ws`, :mod:`feed.sources.sse`),
the REST snapshot used for resyncs, and recorded push traffic.

The format is modelled on OpticOdds' SSE stream and OddsPapi's WebSocket
(``research/upstream.md`` §5, §7). Messages are JSON objects tagged by
``type``:

- ``odds`` / ``locked-odds``: ``data`` is a list of odds, one per
  (fixture, market, selection). ``locked-odds`` (or ``locked: true`` on an
  odd) suspends the selection and keeps its last price: the canonical
  selection turns ``SUSPENDED`` with its price unchanged; an odd of a
  ``locked-odds`` message without a price keeps the one we hold;
- ``fixture-status``: a fixture's status / live flag / start time changed;
  every market of the fixture follows (status override, ``in_play``);
- ``snapshot``: the full state of the markets it carries (each becomes an
  image whose selections are exactly those listed); markets it does not
  carry are left alone; its optional ``scores`` list holds the current
  state of fixtures (as a ``scores`` message's ``data``);
- ``scores``: ``data`` is a list of fixture states (status, period, clock,
  score with periods, red cards, cricket innings; absent fields keep what
  was sent before, ``null`` clears one), each an :class:`~feed.models.EventState` of
  ``px:<fixture>``; ``fixture-status`` updates the same state's status and
  in-play flag. A state taken also moves its fixture's ``in_play`` as a
  ``fixture-status`` does (its ``is_live``, else a ``status`` ``live`` /
  ``not_started``): every market of the fixture whose header changes is
  emitted; its ``status`` moves no market status. A fixture state that
  fails its checks (a negative score, an unknown status, a period that is
  not a code) is rejected alone (``event_id`` set), moves nothing, and the
  message's others apply;
- ``ping`` / ``connected``: keep-alives (``heartbeat``), no data.

Odd results: ``status`` ``won`` / ``lost`` / ``placed`` / ``void`` with the
optional ``void_factor`` (0–1, the share of the stake refunded: 1 = void,
0.5 = half of an Asian quarter line) and ``dead_heat_factor`` (0 < x ≤ 1)
go to the selection as they are.

Canonical ids: event ``px:<fixture>``, market ``px:<fixture>:<market>`` plus
``:<line>`` when the market has a line (``px:f1:total:2.5``); selection ids
are the provider's. ``px`` is the ``prefix`` argument. ``market.line`` goes
to ``specifiers.line`` as sent: a total's line, a handicap's line *quoted on
the home side* (``-1.5`` = home −1.5 / away +1.5, :mod:`feed.taxonomy`);
a market of a lined type without one is rejected (``missing_line``).

Sportsbooks: one stream may carry several books' odds for one selection
(OpticOdds with several ``sportsbook=`` filters), and each book's market is
a market of its own. The first book named for a ``px:<fixture>:<market>[:<line>]``
keeps that id (so a one-book stream's ids do not depend on its book); every
other book's odds go to ``px:<fixture>:<market>[:<line>]@<book>``, ``<book>``
the sportsbook lower-cased with each run of characters outside ``[a-z0-9]``
replaced by ``_`` (``@fanduel``, ``@bet_365``). An odd without ``sportsbook``
belongs to the first book's market (``bookmaker`` is sticky: absent =
unchanged). Which book holds the plain id is remembered with the stored
markets (:meth:`PushNormaliser.restore`).

Market status (first rule that applies):

1. fixture ``settled`` → ``SETTLED`` if a selection won or placed, else
   ``CLOSED``; ``cancelled`` / ``abandoned`` → ``CANCELLED``;
   ``suspended`` / ``ended`` / ``postponed`` / ``interrupted`` →
   ``SUSPENDED`` (``suspend_reason`` = ``fixture_<status>``);
2. every selection carries a result (won/lost/placed/void; removed ones
   aside) → ``SETTLED`` if one won or placed, else ``CLOSED``;
3. every active selection is locked → ``SUSPENDED`` (``suspend_reason`` =
   ``locked``);
4. ``OPEN``.

Ordering: every data message carries an ``entry_id`` ``"<ms>-<n>"``,
monotonic per stream. An entry at or below the last one applied is dropped
without effect (counted in :attr:`PushNormaliser.dropped` as ``duplicate`` or
``out_of_order``); the entry id of the last message applied is the batch
``cursor``. Within a market, an odd older than the one held is dropped
(``stale_odd``) and changes nothing: neither prices nor the fixture fields
(status, ``is_live``, names, start time) it carries. Odds are ordered by
their ``timestamp`` (default: the message's ``emitted_at``, else receipt — or,
with ``ordered=False``, the ``<ms>`` of the entry id, a provider time), ties
by entry id. A market's ``source_ts`` never goes back (it is the newest change
time seen), so the book never discards a push update as out of order.

Fixture fields are newest-wins by the same order: a fixture remembers the
time of the newest odd or ``fixture-status`` whose fields it took, and the
fields of an older one are ignored (``late_fixture_fields``; the odd's price
still applies when it is newer than the one held) — so an odd changed
before a settlement but sent after it cannot reopen the settled market. A
``snapshot`` is the current state: its fixture fields always apply.
The in-play flag is newest-wins across odds, ``fixture-status`` and
``scores`` items alike (``_Fixture.live_at``): a ``scores`` item older than
the flag held is ignored (``late_fixture_fields``), and an odd or
``fixture-status`` older than a ``scores`` item keeps its other fields but
not its in-play flag.

Rejections (:class:`~feed.errors.FeedDecodeError`): a message whose envelope
cannot be read (``invalid_json``, ``invalid_schema``, ``unknown_type``; a
``fixture-status`` message with a bad status, time or timestamp) is raised
and nothing of it is applied. Within ``odds`` / ``locked-odds`` /
``snapshot``, an odd that fails its checks rejects *its market* alone:
``invalid_price`` (NaN, < 1.01, > 1000, wrong type, impossible
American/fractional values), ``invalid_size`` (``max_stake`` < 0 or
> 1e12), ``invalid_number`` (a ``line`` beyond ±1000), ``missing_line``
(a market whose canonical type is quoted per line — total, handicap,
European handicap, team total, player prop: :func:`lined_type` — without
``market.line``: it is never given a line it does not have, e.g. the
level-ball handicap 0), ``invalid_time`` (a
start time outside 1970..2100), ``clock_skew`` (a ``timestamp`` — or, for
odds without one, the message's default time above — absurd or more than
``max_future_skew_ms`` after receipt), ``invalid_schema`` (an odd that does
not decode). Every odd of that market in the message is left out (nothing
of the market is applied, ``batch.rejected`` names it — ``market_id`` None
when the odd is too broken to name it) and the message's other markets
apply; the entry id still advances.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import msgspec
from msgspec import UNSET, UnsetType

from feed.errors import FeedDecodeError
from feed.models import (
    Clock,
    EventState,
    EventStatus,
    Innings,
    Market,
    MarketHeader,
    MarketStatus,
    PeriodScore,
    Score,
    Selection,
    SelectionStatus,
    TeamCounts,
)
from feed.matching import canonical_sport
from feed.normalise.base import MarketUpdate, NormalisedBatch, remember
from feed.odds import PriceError, to_decimal
from feed.taxonomy import LINE_TYPES, generic_market, is_unmapped, outcome_from_name
from feed.validate import (
    MAX_FUTURE_SKEW_MS,
    MAX_HANDICAP,
    MAX_INT,
    MAX_SIZE,
    MAX_TIME_MS,
    MIN_TIME_MS,
    check_event_state,
    check_market,
    check_provider_time,
)

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = [
    "FIXTURE_STATUSES",
    "UNKNOWN_AGE_MS",
    "PushNormaliser",
    "book_key",
    "entry_key",
    "lined_type",
    "market_id_of",
    "ts_to_ms",
]

PREFIX = "px"

#: ``provider_ts`` (ms since the epoch) of an unordered delivery (webhook) of unknown age: one that
#: carries no credible provider time at all (a ``ping`` / ``connected`` without ``emitted_at``; a
#: data message without ``emitted_at`` whose entry id's ``<ms>`` is absurd or ahead of receipt),
#: and an exact re-delivery (:class:`~feed.normalise.webhook.WebhookNormaliser`). It counts as
#: arbitrarily late: the ingest confirms nothing by it (``Ingest.max_stream_lag_ms``: as of this +
#: the bound, long past) and counts it in ``late_messages``
UNKNOWN_AGE_MS = 0

# --- wire Structs: the format's field names, only what we read ----------------

_MAX_INT_ID = MAX_INT
Id = Annotated[str, msgspec.Meta(pattern=r"^[!-~]{1,128}$")] | Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT_ID)]
Name = Annotated[str, msgspec.Meta(max_length=256)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT_ID)]
Line = Annotated[float, msgspec.Meta(ge=-MAX_HANDICAP, le=MAX_HANDICAP)]
Stake = Annotated[float, msgspec.Meta(ge=0, le=MAX_SIZE)]
PriceFormat = Literal["decimal", "american", "fractional"]
Factor = Annotated[float, msgspec.Meta(ge=0, le=1)]
DeadHeat = Annotated[float, msgspec.Meta(gt=0, le=1)]
OddStatus = Literal["active", "removed", "won", "lost", "placed", "void"]


class WireFixture(msgspec.Struct, kw_only=True, gc=False):
    """A fixture as odds and ``fixture-status`` carry it (absent = unchanged)."""

    id: Id
    sport: Name | None = None
    league: Name | None = None
    home: Name | None = None
    away: Name | None = None
    name: Name | None = None
    start_time: Seconds | str | None = None
    is_live: bool | None = None
    status: str | None = None
    timestamp: Seconds | None = None


class WireMarket(msgspec.Struct, kw_only=True, gc=False):
    id: Id
    name: Name | None = None
    line: Line | None = None


class WireSelection(msgspec.Struct, kw_only=True, gc=False):
    id: Id
    name: Name | None = None


class WireOdd(msgspec.Struct, kw_only=True, gc=False):
    fixture: WireFixture
    market: WireMarket
    selection: WireSelection
    price: float | str | None = None
    price_format: PriceFormat | None = None
    is_live: bool | None = None
    timestamp: Seconds | None = None
    locked: bool = False
    status: OddStatus = "active"
    sportsbook: Name | None = None
    max_stake: Stake | None = None
    void_factor: Factor | None = None
    dead_heat_factor: DeadHeat | None = None


class _Message(msgspec.Struct, kw_only=True, gc=False, tag_field="type"):
    emitted_at: Seconds | None = None


class OddsMessage(_Message, kw_only=True, tag="odds"):
    entry_id: str
    seq: Seq | None = None
    price_format: PriceFormat | None = None
    data: list[WireOdd]


class LockedOddsMessage(OddsMessage, kw_only=True, tag="locked-odds"):
    pass


class SnapshotMessage(OddsMessage, kw_only=True, tag="snapshot"):
    scores: list[msgspec.Raw] | None = None


class FixtureStatusMessage(_Message, kw_only=True, tag="fixture-status"):
    entry_id: str
    seq: Seq | None = None
    data: WireFixture


class WireClock(msgspec.Struct, kw_only=True, gc=False):
    """A fixture's clock: ``seconds`` elapsed match time, running or stopped."""

    seconds: int
    running: bool = True
    remaining_seconds: int | None = None
    stoppage_seconds: int | None = None


class WirePeriodScore(msgspec.Struct, kw_only=True, gc=False):
    period: str
    home: int
    away: int


class WireScore(msgspec.Struct, kw_only=True, gc=False):
    home: int
    away: int
    periods: list[WirePeriodScore] | None = None


class WireCounts(msgspec.Struct, kw_only=True, gc=False):
    home: int = 0
    away: int = 0


class WireInnings(msgspec.Struct, kw_only=True, gc=False):
    number: int
    team: Literal["home", "away"] | None = None
    runs: int = 0
    wickets: int = 0
    balls: int = 0


class WireFixtureState(msgspec.Struct, kw_only=True, gc=False):
    """One item of a ``scores`` message: an absent field keeps what was sent
    before, ``null`` clears it (``status`` / ``is_live``: null = unchanged)."""

    fixture_id: Id
    status: str | None = None
    is_live: bool | None = None
    period: str | None | UnsetType = UNSET
    clock: WireClock | None | UnsetType = UNSET
    score: WireScore | None | UnsetType = UNSET
    red_cards: WireCounts | None | UnsetType = UNSET
    innings: list[WireInnings] | None | UnsetType = UNSET
    timestamp: Seconds | None = None


class ScoresMessage(_Message, kw_only=True, tag="scores"):
    entry_id: str
    seq: Seq | None = None
    data: list[msgspec.Raw]


class _FixtureRef(msgspec.Struct, gc=False):
    fixture_id: Id


_FIXTURE_STATE_DECODER = msgspec.json.Decoder(WireFixtureState)
_FIXTURE_REF_DECODER = msgspec.json.Decoder(_FixtureRef)


class PingMessage(_Message, kw_only=True, tag="ping"):
    seq: Seq | None = None


class ConnectedMessage(_Message, kw_only=True, tag="connected"):
    seq: Seq | None = None
    ping_interval_ms: int | None = None
    resumed: bool | None = None


_DECODER = msgspec.json.Decoder(
    OddsMessage | LockedOddsMessage | SnapshotMessage | FixtureStatusMessage | ScoresMessage | PingMessage
    | ConnectedMessage)


class _LooseOdds(_Message, kw_only=True, tag="odds"):
    """An odds message with each odd left raw: decoded when the typed decode
    fails, to reject only the markets whose odds fail."""

    entry_id: str
    seq: Seq | None = None
    price_format: PriceFormat | None = None
    data: list[msgspec.Raw]


class _LooseLocked(_LooseOdds, kw_only=True, tag="locked-odds"):
    pass


class _LooseSnapshot(_LooseOdds, kw_only=True, tag="snapshot"):
    scores: list[msgspec.Raw] | None = None


class _RefId(msgspec.Struct, gc=False):
    id: Id


class _RefMarket(msgspec.Struct, gc=False):
    id: Id
    line: Line | None = None


class _OddRef(msgspec.Struct, gc=False):
    """Just enough of an odd to name its market."""

    fixture: _RefId
    market: _RefMarket
    sportsbook: Any = None


_LOOSE_DECODER = msgspec.json.Decoder(
    _LooseOdds | _LooseLocked | _LooseSnapshot | FixtureStatusMessage | ScoresMessage | PingMessage
    | ConnectedMessage)
_ODD_DECODER = msgspec.json.Decoder(WireOdd)
_ODD_REF_DECODER = msgspec.json.Decoder(_OddRef)
_TYPED = {_LooseOdds: OddsMessage, _LooseLocked: LockedOddsMessage, _LooseSnapshot: SnapshotMessage}
_JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)


def _odd_reason(text: str) -> str:
    """A msgspec ValidationError message about one odd → rejection reason."""
    if ".price`" in text:
        return "invalid_price"
    if (text.endswith(".void_factor`") or text.endswith(".dead_heat_factor`")) and "Expected `float`" in text:
        return "invalid_number"
    if ">=" in text or "<=" in text:
        if text.endswith(".max_stake`"):
            return "invalid_size"
        if text.endswith(".line`"):
            return "invalid_number"
        if text.endswith(".start_time`"):
            return "invalid_time"
        if text.endswith(".timestamp`"):
            return "clock_skew"
    return "invalid_schema"

# --- vocabularies --------------------------------------------------------------

#: canonical fixture status keys (after aliases)
FIXTURE_STATUSES = ("not_started", "live", "suspended", "ended", "settled", "cancelled", "postponed",
                    "interrupted", "abandoned")
_STATUS_ALIASES = {
    "unplayed": "not_started", "scheduled": "not_started", "pre": "not_started", "prematch": "not_started",
    "in_progress": "live", "inplay": "live", "in_play": "live", "half": "live", "halftime": "live",
    "completed": "ended", "finished": "ended", "final": "ended",
    "closed": "settled", "resulted": "settled",
    "canceled": "cancelled",
}
_SUSPENDING = frozenset({"suspended", "ended", "postponed", "interrupted"})
#: fixture status key -> canonical event status
_EVENT_STATUS: dict[str, EventStatus] = {
    "not_started": "NOT_STARTED", "live": "LIVE", "suspended": "SUSPENDED", "ended": "ENDED", "settled": "CLOSED",
    "cancelled": "CANCELLED", "postponed": "POSTPONED", "interrupted": "INTERRUPTED", "abandoned": "ABANDONED",
}
_CANCELLING = frozenset({"cancelled", "abandoned"})
_ODD_STATUS: dict[str, SelectionStatus] = {"active": "ACTIVE", "removed": "REMOVED", "won": "WINNER", "lost": "LOSER",
               "placed": "PLACED", "void": "VOID"}
_RESULTS = frozenset({"WINNER", "LOSER", "PLACED", "VOID"})
_WINNING = frozenset({"WINNER", "PLACED"})
_LIVE_SELECTION = frozenset({"ACTIVE", "SUSPENDED"})

_ENTRY_RE = re.compile(r"^(\d{1,16})-(\d{1,19})$")

#: an odd's decimal price and, when it came in another format, the provider's text of it
_Price = tuple[float | None, str | None]


def _price_text(value: float | str) -> str:
    """An American / fractional price as the provider wrote it (``-110``, ``"5/2"``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def entry_key(entry_id: str) -> tuple[int, int] | None:
    """``"<ms>-<n>"`` → ``(ms, n)`` for ordering; None when malformed."""
    m = _ENTRY_RE.match(entry_id)
    return (int(m.group(1)), int(m.group(2))) if m else None


def ts_to_ms(value: float) -> int:
    """A provider time in epoch seconds (float, < 10^11) or ms → integer ms."""
    return round(value * 1000) if value < 1e11 else int(value)


def _start_ms(value: float | str | None, raw: bytes) -> int | None:
    """A fixture start time (ISO-8601 text, epoch seconds or ms) → int ms;
    ``invalid_schema`` when unreadable, ``invalid_time`` outside 1970..2100."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise FeedDecodeError("invalid_schema", f"start_time {value[:40]!r} is not ISO-8601", raw) from None
        if dt.tzinfo is None:  # no offset given: UTC
            dt = dt.replace(tzinfo=UTC)
        try:
            ms = int(dt.timestamp() * 1000)
        except (OverflowError, ValueError):
            ms = -1
    else:
        ms = ts_to_ms(value)
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        raise FeedDecodeError("invalid_time", f"start_time {value!r} is not within 1970..2100", raw)
    return ms


def _status_key(value: str | None, raw: bytes) -> str | None:
    if value is None:
        return None
    key = value.strip().lower().replace(" ", "_").replace("-", "_")
    key = _STATUS_ALIASES.get(key, key)
    if key not in FIXTURE_STATUSES:
        raise FeedDecodeError("invalid_schema", f"unknown fixture status {value!r}", raw)
    return key


@functools.lru_cache(maxsize=4096)
def lined_type(raw_id: str) -> str | None:
    """The canonical market type (:mod:`feed.taxonomy`) of a push market id
    when that type is quoted per line and the id does not carry the line
    itself: ``total`` / ``over_under`` → ``total``, ``spread`` /
    ``asian_handicap`` → ``handicap``, ``european_handicap`` →
    ``handicap_3way``, ``team_total``, ``player_points`` (a player prop);
    None for a type without a line (``ml``, ``btts``, ``win``, ``raw:…``) or
    an id with the line in it (``over_under_25`` → ``total`` ``line=2.5``).
    A market of such a type must carry ``market.line`` (``missing_line``)."""
    kind, specs = generic_market(raw_id)
    if "line" in specs or not (kind in LINE_TYPES or kind.startswith("player_")):
        return None
    return kind


def _live_of(is_live: bool | None, status: str | None) -> bool | None:
    """A fixture's in-play signal: its ``is_live``; without it status ``live`` → in play,
    ``not_started`` → not; None: it says nothing of it."""
    if is_live is not None:
        return is_live
    return status == "live" if status in ("live", "not_started") else None


def _sport_key(value: str) -> str:
    """A provider's sport text as every market spells it (:func:`feed.matching.canonical_sport`:
    ``Football`` → ``soccer``, ``Ice-Hockey`` → ``ice_hockey``): the taxonomy's full-time scopes,
    the per-sport stale settings, filters and the linker all read that spelling."""
    return canonical_sport(value) or value.strip().lower()


def _line_text(line: float) -> str:
    return f"{line:g}"


_BOOK_JUNK = re.compile(r"[^a-z0-9]+")


def book_key(sportsbook: str) -> str:
    """A sportsbook's name → its id part: lower-cased, each run of characters
    outside ``[a-z0-9]`` → ``_`` (``"Bet 365"`` → ``bet_365``); a name with no
    such character → ``book_<12 hex digits of its SHA-1>``."""
    key = _BOOK_JUNK.sub("_", sportsbook.strip().lower()).strip("_")
    return key or "book_" + hashlib.sha1(sportsbook.encode()).hexdigest()[:12]


def market_id_of(fixture_id: str, market_id: str, line: float | None, prefix: str = PREFIX,
                 book: str | None = None) -> str:
    """Canonical market id: ``px:<fixture>:<market>[:<line>]``, plus
    ``@<book>`` (:func:`book_key` of ``book``) for a sportsbook other than the
    first one named for that market (module docstring)."""
    base = f"{prefix}:{fixture_id}:{market_id}"
    if line is not None:
        base = f"{base}:{_line_text(line)}"
    return base if book is None else f"{base}@{book_key(book)}"


# --- cache ---------------------------------------------------------------------


#: an order of changes: (provider time in ms, entry id as (ms, n)); (0, (0, 0)) = unknown
_At = tuple[int, tuple[int, int]]
_NO_KEY = (0, 0)


class _Fixture:
    __slots__ = ("at", "away", "home", "id", "in_play", "league", "live_at", "markets", "name", "sport",
                 "start_time", "status")

    def __init__(self, fixture_id: str) -> None:
        self.id = fixture_id
        self.sport: str | None = None
        self.league: str | None = None
        self.home: str | None = None
        self.away: str | None = None
        self.name: str | None = None
        self.start_time: int | None = None
        self.in_play = False
        self.status: str | None = None
        self.markets: dict[str, None] = {}  # canonical market ids, insertion ordered
        self.at: _At = (0, _NO_KEY)  # order of the newest odd / fixture-status whose fields were taken
        #: order of the newest in-play flag taken (an odd's, a fixture-status' or a ``scores`` item's)
        self.live_at: _At = (0, _NO_KEY)

    def event_name(self) -> str | None:
        if self.name:
            return self.name
        if self.home and self.away:
            return f"{self.home} v {self.away}"
        return None


class _Market:
    __slots__ = ("bookmaker", "fixture", "header", "line", "locked", "market_id", "name", "odd_at", "raw_id", "sels",
                 "ts")

    def __init__(self, market_id: str, fixture: _Fixture, raw_id: str, line: float | None) -> None:
        self.market_id = market_id
        self.fixture = fixture
        self.raw_id = raw_id
        self.line = line
        self.name: str | None = None
        self.bookmaker: str | None = None
        self.sels: dict[str, Selection] = {}
        self.locked: set[str] = set()
        self.odd_at: dict[str, _At] = {}  # selection id -> order of the odd held (change time ms, entry)
        self.header: MarketHeader | None = None  # last emitted
        self.ts = 0  # newest change time seen (ms)


class PushNormaliser:
    """Feeds push-format messages through a per-market cache.

    ``source`` names the source; ``prefix`` namespaces ids (``px`` →
    ``px:<fixture>:<market>``). ``ordered`` False: deliveries stand alone
    (webhooks): no entry is dropped for its place in the stream, and an odd
    without ``timestamp`` in a message without ``emitted_at`` is timed by
    its entry id's ``<ms>`` (checked like ``emitted_at``: ``clock_skew``)
    instead of the receive time; and a delivery's ``provider_ts`` (its age,
    by which the ingest confirms the source's markets: ``Ingest.feed``) is
    the *oldest* credible provider time it carries — the smaller of
    ``emitted_at`` and the entry id's ``<ms>``, either alone when the other
    is missing or not credible (absurd, or more than ``max_future_skew_ms``
    after receipt) — so a late retry re-stamped with a fresh ``emitted_at``,
    or one without it, is still seen late; a delivery with no credible time
    (a ``ping`` / ``connected`` without ``emitted_at`` — they carry no entry
    id) gets :data:`UNKNOWN_AGE_MS` and confirms nothing. A stream
    (``ordered`` True) keeps ``emitted_at`` alone: there the entry id is an
    order key, not a documented time (a ``snapshot``'s is that of the last
    entry it covers, however old). :attr:`dropped` counts what was dropped
    without being an error (``duplicate``, ``out_of_order``, ``stale_odd``,
    ``stale_snapshot``, ``late_fixture_fields``, ``stale_state``).
    :attr:`last_entry_id` is the last entry applied.
    """

    #: provider times of a live stream (see Normaliser.live_provider_times)
    live_provider_times = True

    def __init__(self, source: str = "push", *, prefix: str = PREFIX,
                 max_future_skew_ms: int = MAX_FUTURE_SKEW_MS, ordered: bool = True) -> None:
        self.source = source
        self.prefix = prefix
        #: a stream: messages at or below the last applied ``entry_id`` are dropped whole
        #: (False: deliveries stand alone, e.g. webhooks; provider times per odd still rule)
        self.ordered = ordered
        self.max_future_skew_ms = max_future_skew_ms
        self.fixtures: dict[str, _Fixture] = {}
        self.markets: dict[str, _Market] = {}
        #: ``px:<fixture>:<market>[:<line>]`` -> book_key of the sportsbook whose market has that id
        self.book_of: dict[str, str] = {}
        self.last_entry_id: str | None = None
        self._last_key: tuple[int, int] | None = None
        self.dropped: dict[str, int] = {}
        #: the last event state emitted per event id (``px:<fixture>``)
        self.states: dict[str, EventState] = {}
        self._rejected: list[FeedDecodeError] = []  # the current batch's (for the safety net in _emit)
        self._raw = b""
        self._recv_ms = 0

    # -- public -----------------------------------------------------------

    def restore(self, markets: Iterable[Market], cursor: str | None) -> None:
        """Seed the cache from stored canonical markets of this source (and the
        stored cursor), so a restarted ingest that resumes mid-stream applies
        deltas to what it already holds instead of mistaking them for images.
        A fixture's fields count as taken at the newest ``source_ts`` of its
        markets, each odd as changed at its market's ``source_ts``.

        A fixture's status is read only from what a fixture status made of
        a market (:func:`_fixture_status_of`), the newest such market
        (``source_ts``) telling: a market closed because its own selections
        all carry results says nothing of its fixture, so it never settles
        the fixture's other (open) markets; a market that would be what it
        is without any fixture status says the fixture has none of the
        statuses that override its markets."""
        pfx = self.prefix + ":"
        said: dict[str, tuple[int, int, str | None]] = {}  # fixture -> (source_ts, said a status, the status)
        for m in markets:
            if m.source != self.source or not m.event_id or not m.event_id.startswith(pfx):
                continue
            fixture_id = m.event_id[len(pfx):]
            fx = self.fixtures.get(fixture_id)
            if fx is None:
                fx = self.fixtures[fixture_id] = _Fixture(fixture_id)
                fx.sport, fx.league, fx.name = m.sport, m.competition, m.event_name
                fx.start_time, fx.in_play = m.start_time, m.in_play
            line = float(m.specifiers["line"]) if m.specifiers and "line" in m.specifiers else None
            raw_id = m.market_type_raw
            if raw_id is None or m.market_id not in (market_id_of(fixture_id, raw_id, line, self.prefix),
                                                     market_id_of(fixture_id, raw_id, line, self.prefix, m.bookmaker)):
                # no raw type stored (or one that does not make the id): read it from the id
                rest = m.market_id[len(pfx) + len(fixture_id) + 1:]
                suffix = "@" + book_key(m.bookmaker) if m.bookmaker else None
                if suffix and rest.endswith(suffix):
                    rest = rest[:-len(suffix)]
                raw_id = rest.rsplit(":", 1)[0] if line is not None else rest
            plain = market_id_of(fixture_id, raw_id, line, self.prefix)
            if m.market_id == plain:
                if m.bookmaker:
                    self.book_of[plain] = book_key(m.bookmaker)
            else:  # another book's: the plain id is not free for it (its owner, when stored, says whose it is)
                self.book_of.setdefault(plain, "")
            mk = _Market(m.market_id, fx, raw_id, line)
            mk.name, mk.bookmaker, mk.ts = m.name, m.bookmaker, m.source_ts
            fx.at = max(fx.at, (m.source_ts, _NO_KEY))
            fx.live_at = fx.at
            for s in m.selections:
                mk.sels[s.selection_id] = s
                mk.odd_at[s.selection_id] = (m.source_ts, _NO_KEY)
                if s.status == "SUSPENDED":
                    mk.locked.add(s.selection_id)
            mk.header = m.header()
            self.markets[m.market_id] = mk
            fx.markets[m.market_id] = None
            told = _fixture_status_of(m, mk)
            if told is not False:
                evidence = (m.source_ts, told is not None, told)
                if fixture_id not in said or evidence[:2] > said[fixture_id][:2]:
                    said[fixture_id] = evidence
        for fixture_id, (_, _, status) in said.items():
            self.fixtures[fixture_id].status = status
        if cursor is not None and entry_key(cursor) is not None:
            self.last_entry_id, self._last_key = cursor, entry_key(cursor)

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Decode one push message and apply it to the cache.

        raw: one JSON message (a WebSocket text frame, an SSE ``data`` field,
        a REST snapshot body). recv_ms: when it was read, ms since the epoch.
        channel: unused (one stream). Raises
        :class:`FeedDecodeError` for a message rejected whole, and then
        leaves the cache untouched; markets rejected alone are in
        ``batch.rejected`` (see the module docstring).
        """
        bad: dict[str | None, FeedDecodeError] = {}  # market id (None: unnameable) -> why
        claims: dict[str, str] = {}  # plain market ids this message gives a sportsbook (see _market_id)
        msg = self._decode(raw, bad, claims)
        emitted = ts_to_ms(msg.emitted_at) if msg.emitted_at is not None else None
        emitted_error = None
        if emitted is not None:
            try:
                check_provider_time(emitted, recv_ms, self.max_future_skew_ms, "emitted_at")
            except FeedDecodeError as exc:
                emitted_error, emitted = exc.detail, None
        if isinstance(msg, (PingMessage, ConnectedMessage)):
            if emitted is None and not self.ordered:
                emitted = UNKNOWN_AGE_MS  # a delivery of unknown age: it confirms nothing (see PushNormaliser)
            return NormalisedBatch(op=_tag(msg), provider_ts=emitted, heartbeat=True)
        assert isinstance(msg, (OddsMessage, FixtureStatusMessage, ScoresMessage))
        key = entry_key(msg.entry_id)
        if key is None:
            raise FeedDecodeError("invalid_schema", f"entry_id {msg.entry_id[:40]!r} is not <ms>-<n>", raw)
        batch = NormalisedBatch(op=_tag(msg), provider_ts=emitted, full_image=isinstance(msg, SnapshotMessage))
        if not self.ordered:  # a delivery is as old as the oldest credible provider time it carries
            try:
                check_provider_time(key[0], recv_ms, self.max_future_skew_ms, "entry_id <ms>")
                batch.provider_ts = key[0] if emitted is None else min(emitted, key[0])
            except FeedDecodeError:  # (not a credible time; the odds' own checks below reject what it times)
                batch.provider_ts = UNKNOWN_AGE_MS if emitted is None else emitted
        default_ts = emitted
        if default_ts is None and emitted_error is None:
            if self.ordered:  # a stream: applied in entry order, receipt order is that order
                default_ts = recv_ms
            else:  # deliveries in any order: the entry id's <ms> is the provider's time of the entry
                try:
                    check_provider_time(key[0], recv_ms, self.max_future_skew_ms, "entry_id <ms>")
                    default_ts = key[0]
                except FeedDecodeError as exc:
                    emitted_error = exc.detail
        if isinstance(msg, OddsMessage):
            prices, mids = self._validate_odds(msg, raw, recv_ms, emitted_error, bad, claims)
            status = None
        elif isinstance(msg, ScoresMessage):
            if emitted_error is not None:
                raise FeedDecodeError("clock_skew", emitted_error, raw)
            prices, mids, status = [], [], None
        else:
            if emitted_error is not None:
                raise FeedDecodeError("clock_skew", emitted_error, raw)
            prices, mids = [], []
            status = _status_key(msg.data.status, raw)
            _start_ms(msg.data.start_time, raw)
            if msg.data.timestamp is not None:
                try:
                    check_provider_time(ts_to_ms(msg.data.timestamp), recv_ms, self.max_future_skew_ms, "timestamp")
                except FeedDecodeError as exc:
                    raise FeedDecodeError(exc.reason, exc.detail, raw) from None
        for mid, error in bad.items():  # (reported even when the message turns out old: it was bad all the same)
            batch.rejected.append(FeedDecodeError(error.reason, error.detail, raw, market_id=mid))
        last = self._last_key if self.ordered else None
        snapshot = isinstance(msg, SnapshotMessage)
        if last is not None and (key < last if snapshot else key <= last):
            reason = "stale_snapshot" if snapshot else "duplicate" if key == last else "out_of_order"
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            batch.stale = True
            return batch
        if default_ts is None:  # (only odds with their own timestamp need no default: the others were rejected)
            default_ts = recv_ms
        self.book_of.update(claims)
        self._rejected = batch.rejected
        self._recv_ms = recv_ms
        self._raw = raw
        if isinstance(msg, OddsMessage):
            self._apply_odds(msg, prices, mids, bad, batch, raw, default_ts, key, recv_ms)
            if isinstance(msg, SnapshotMessage) and msg.scores:
                self._apply_scores(msg.scores, batch, raw, default_ts, key, recv_ms, snapshot=True)
        elif isinstance(msg, ScoresMessage):
            self._apply_scores(msg.data, batch, raw, default_ts, key, recv_ms)
        else:
            taken = self._apply_fixture_status(msg.data, batch, raw, default_ts, key, recv_ms)
            if taken and (status is not None or msg.data.is_live is not None):
                fts = ts_to_ms(msg.data.timestamp) if msg.data.timestamp is not None else default_ts
                self._state(str(msg.data.id), WireFixtureState(fixture_id=msg.data.id, status=msg.data.status,
                                                               is_live=msg.data.is_live), fts, batch, raw, recv_ms)
        if self._last_key is None or key > self._last_key:
            self._last_key = key
            self.last_entry_id = msg.entry_id
            batch.cursor = msg.entry_id
        return batch

    def forget(self, market_id: str) -> None:
        """Drop a market's cache (e.g. long after it closed). Which sportsbook
        holds its plain id is kept (another book's odds keep their ``@<book>`` id)."""
        m = self.markets.pop(market_id, None)
        if m is not None:
            m.fixture.markets.pop(market_id, None)

    def _market_id(self, fixture_id: str, raw_id: str, line: float | None, sportsbook: str | None,
                   claims: dict[str, str]) -> str:
        """The canonical id of an odd's market (module docstring, Sportsbooks):
        the plain id unless the odd names a book other than the one holding
        it. A plain id no book holds yet is given to ``sportsbook`` in
        ``claims`` (kept only if the message is applied)."""
        plain = market_id_of(fixture_id, raw_id, line, self.prefix)
        if sportsbook is None:
            return plain
        key = book_key(sportsbook)
        holder = self.book_of.get(plain)
        if holder is None:
            holder = claims.setdefault(plain, key)
        return plain if holder == key else market_id_of(fixture_id, raw_id, line, self.prefix, sportsbook)

    # -- decoding -----------------------------------------------------------

    def _decode(self, raw: bytes, bad: dict[str | None, FeedDecodeError], claims: dict[str, str]) -> _Message:
        try:
            return _DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            first = exc
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        try:  # the envelope alone, each odd left raw
            loose = _LOOSE_DECODER.decode(raw)
        except msgspec.ValidationError:
            self._raise_whole(raw, first)
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        typed = _TYPED.get(type(loose))
        if typed is None:  # cannot happen (the same Structs failed): never lose the error
            self._raise_whole(raw, first)
        good: list[WireOdd] = []
        for i, part in enumerate(loose.data):
            try:
                good.append(_ODD_DECODER.decode(part))
            except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
                text = str(exc)
                try:
                    ref = _ODD_REF_DECODER.decode(part)
                    book = ref.sportsbook if isinstance(ref.sportsbook, str) and ref.sportsbook else None
                    mid: str | None = self._market_id(str(ref.fixture.id), str(ref.market.id), ref.market.line, book,
                                                      claims)
                except (msgspec.ValidationError, *_JSON_ERRORS):
                    mid = None
                bad.setdefault(mid, FeedDecodeError(_odd_reason(text), f"{text} (at $.data[{i}])", raw, market_id=mid))
        extra = {"scores": loose.scores} if isinstance(loose, _LooseSnapshot) else {}
        return typed(entry_id=loose.entry_id, seq=loose.seq, price_format=loose.price_format,
                     emitted_at=loose.emitted_at, data=good, **extra)

    @staticmethod
    def _raise_whole(raw: bytes, exc: msgspec.ValidationError) -> NoReturn:
        text = str(exc)
        if text.startswith("Invalid value") and text.endswith("`$.type`"):
            reason = "unknown_type"
        elif ".price`" in text:
            reason = "invalid_price"
        else:
            try:  # a fragment like ` "x", …}` decodes as the wrong type: call it what it is
                msgspec.json.decode(raw)
            except _JSON_ERRORS as exc2:
                raise FeedDecodeError("invalid_json", str(exc2), raw) from None
            reason = "invalid_schema"
        raise FeedDecodeError(reason, text, raw) from None

    def _validate_odds(self, msg: OddsMessage, raw: bytes, recv_ms: int, emitted_error: str | None,
                       bad: dict[str | None, FeedDecodeError],
                       claims: dict[str, str]) -> tuple[list[_Price], list[str]]:
        """Every price converted to decimal, every fixture field and time
        checked, before anything is applied: ((decimal price, the provider's
        text of an American / fractional one), market id) per odd; an odd that
        fails marks its market bad (in ``bad``).
        ``emitted_error``: why the message's default time is unusable (odds
        without ``timestamp`` are then ``clock_skew``)."""
        out: list[_Price] = []
        mids: list[str] = []
        default_fmt = msg.price_format or "decimal"
        skew = self.max_future_skew_ms
        for i, odd in enumerate(msg.data):
            mid = self._market_id(str(odd.fixture.id), str(odd.market.id), odd.market.line, odd.sportsbook, claims)
            mids.append(mid)
            price: _Price = (None, None)
            try:
                if odd.market.line is None:
                    kind = lined_type(str(odd.market.id))
                    if kind is not None:  # (its selections would be filed on some line they are not offered at)
                        raise FeedDecodeError("missing_line", f"market {str(odd.market.id)[:40]!r} is a {kind} "
                                              "market: market.line is required")
                _status_key(odd.fixture.status, raw)
                _start_ms(odd.fixture.start_time, raw)
                if odd.timestamp is not None:
                    check_provider_time(ts_to_ms(odd.timestamp), recv_ms, skew, "timestamp")
                elif emitted_error is not None:
                    raise FeedDecodeError("clock_skew", emitted_error)
                if odd.price is not None:
                    fmt = odd.price_format or default_fmt
                    try:
                        price = (to_decimal(odd.price, fmt), None if fmt == "decimal" else _price_text(odd.price))
                    except PriceError as exc:
                        raise FeedDecodeError("invalid_price", str(exc)) from None
            except FeedDecodeError as exc:
                bad.setdefault(mid, FeedDecodeError(exc.reason, f"{exc.detail} at $.data[{i}]", raw, market_id=mid))
            out.append(price)
        return out, mids

    # -- applying -------------------------------------------------------------

    def _fixture(self, wf: WireFixture, raw: bytes, at: _At, *, is_live: bool | None = None,
                 force: bool = False) -> tuple[_Fixture, bool]:
        """Update the cached fixture from ``wf`` (and an odd's ``is_live``),
        unless what it sets is older (``at``) than the fields the fixture
        took last (``late_fixture_fields``; ``force``: a snapshot's, always
        taken); its in-play flag also not when a newer one was taken from a
        ``scores`` item (``live_at``, the other fields still apply);
        (fixture, whether it changed)."""
        fid = str(wf.id)
        fx = self.fixtures.get(fid)
        changed = False
        if fx is None:
            fx = self.fixtures[fid] = _Fixture(fid)
        sets = is_live is not None or any(
            v is not None for v in (wf.sport, wf.league, wf.home, wf.away, wf.name, wf.start_time, wf.is_live,
                                    wf.status))
        if not sets:
            return fx, False
        if at < fx.at and not force:
            self.dropped["late_fixture_fields"] = self.dropped.get("late_fixture_fields", 0) + 1
            return fx, False
        fx.at = max(fx.at, at)
        for attr, value in (("sport", _sport_key(wf.sport) if wf.sport else None), ("league", wf.league),
                            ("home", wf.home), ("away", wf.away), ("name", wf.name),
                            ("start_time", _start_ms(wf.start_time, raw))):
            if value is not None and getattr(fx, attr) != value:
                setattr(fx, attr, value)
                changed = True
        status = _status_key(wf.status, raw)
        if status is not None and status != fx.status:
            fx.status = status
            changed = True
        live = is_live if is_live is not None else _live_of(wf.is_live, status)  # an odd's own flag wins
        if live is not None and self._take_live(fx, live, at, force):
            changed = True
        return fx, changed

    def _take_live(self, fx: _Fixture, live: bool, at: _At, force: bool) -> bool:
        """Set the fixture's in-play flag to ``live`` unless a flag newer than ``at`` was
        taken already (``late_fixture_fields``; ``force``: a snapshot's, always taken);
        True when the flag changed."""
        if at < fx.live_at and not force:
            self.dropped["late_fixture_fields"] = self.dropped.get("late_fixture_fields", 0) + 1
            return False
        fx.live_at = max(fx.live_at, at)
        if live == fx.in_play:
            return False
        fx.in_play = live
        return True

    def _apply_odds(self, msg: OddsMessage, prices: list[_Price], mids: list[str],
                    bad: dict[str | None, FeedDecodeError], batch: NormalisedBatch, raw: bytes,
                    default_ts: int, key: tuple[int, int], recv_ms: int) -> None:
        """Apply the odds of the markets not in ``bad``. ``default_ts``: the
        change time (ms) of odds without ``timestamp``; ``key``: the entry id."""
        snapshot = isinstance(msg, SnapshotMessage)
        locked_msg = isinstance(msg, LockedOddsMessage)
        touched: dict[str, list[str]] = {}  # market id -> changed selection ids (ordered)
        images: set[str] = set()
        newest: dict[str, int] = {}
        refreshed: set[str] = set()  # fixtures whose header fields changed
        for odd, (price, price_raw), mid in zip(msg.data, prices, mids, strict=True):
            if bad and mid in bad:
                continue
            ts = ts_to_ms(odd.timestamp) if odd.timestamp is not None else default_ts
            at = (ts, key)
            sid = str(odd.selection.id)
            m = self.markets.get(mid)
            if (not snapshot and m is not None and sid in m.sels
                    and at < m.odd_at.get(sid, (0, _NO_KEY))):
                # older than the odd held: changes nothing (neither its price nor its fixture's fields)
                self.dropped["stale_odd"] = self.dropped.get("stale_odd", 0) + 1
                continue
            fx, fx_changed = self._fixture(odd.fixture, raw, at, is_live=odd.is_live, force=snapshot)
            if fx_changed:
                refreshed.add(fx.id)
            wm = odd.market
            if m is None:
                m = self.markets[mid] = _Market(mid, fx, str(wm.id), wm.line)
                fx.markets[mid] = None
                images.add(mid)
            if snapshot and mid not in images:
                images.add(mid)
            if snapshot and mid not in touched:
                m.sels, m.locked, m.odd_at = {}, set(), {}
            if wm.name is not None:
                m.name = wm.name
            if odd.sportsbook is not None:
                m.bookmaker = odd.sportsbook
            prev = m.sels.get(sid)
            changed = touched.setdefault(mid, [])
            locked = odd.locked or locked_msg
            if locked and price is None and prev is not None:
                price, price_raw = prev.price, prev.price_raw
            status: SelectionStatus = _ODD_STATUS[odd.status]
            if status == "ACTIVE" and locked:
                status = "SUSPENDED"
            if locked:
                m.locked.add(sid)
            else:
                m.locked.discard(sid)
            m.sels[sid] = Selection(
                selection_id=sid,
                name=odd.selection.name if odd.selection.name is not None else (prev.name if prev else None),
                handicap=0.0,
                status=status,
                price=price,
                price_raw=price_raw,
                max_stake=odd.max_stake if odd.max_stake is not None else (prev.max_stake if prev else None),
                void_factor=odd.void_factor,
                dead_heat_factor=odd.dead_heat_factor,
            )
            m.odd_at[sid] = at
            if sid not in changed:
                changed.append(sid)
            if ts > newest.get(mid, 0):
                newest[mid] = ts
        # markets of a fixture whose header fields changed follow, even when not in this message
        for fid in refreshed:
            for mid in self.fixtures[fid].markets:
                if not (bad and mid in bad):  # a market rejected here: it follows with its next update
                    touched.setdefault(mid, [])
        msg_ts = max(newest.values(), default=default_ts)
        for mid, sids in touched.items():
            m = self.markets[mid]
            ts = newest.get(mid, msg_ts)
            if mid not in images:
                ts = max(m.ts, ts)
            self._emit(m, mid in images, sids, ts, batch, recv_ms)
            batch.runner_changes += len(sids)

    def _apply_scores(self, items: list[msgspec.Raw], batch: NormalisedBatch, raw: bytes, default_ts: int,
                      key: tuple[int, int], recv_ms: int, *, snapshot: bool = False) -> None:
        """Each fixture state of a ``scores`` message (or of a snapshot's
        ``scores``, ``snapshot`` True); one that does not decode or check is
        rejected alone. A state taken also moves its fixture's in-play flag
        (:meth:`_scores_live`); ``key``: the message's entry id."""
        for i, part in enumerate(items):
            try:
                item = _FIXTURE_STATE_DECODER.decode(part)
            except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
                try:
                    eid: str | None = f"{self.prefix}:{_FIXTURE_REF_DECODER.decode(part).fixture_id}"
                except (msgspec.ValidationError, *_JSON_ERRORS):
                    eid = None
                batch.rejected.append(FeedDecodeError("invalid_schema", f"{exc} (at $.data[{i}])", raw, event_id=eid))
                continue
            ts = ts_to_ms(item.timestamp) if item.timestamp is not None else default_ts
            if self._state(str(item.fixture_id), item, ts, batch, raw, recv_ms):
                self._scores_live(str(item.fixture_id), item, (ts, key), batch, raw, recv_ms, force=snapshot)

    def _scores_live(self, fixture_id: str, item: WireFixtureState, at: _At, batch: NormalisedBatch, raw: bytes,
                     recv_ms: int, *, force: bool = False) -> None:
        """A ``scores`` item's in-play signal (its ``is_live``; without it a
        ``status`` ``live`` → in play, ``not_started`` → not) moves the
        fixture's ``in_play`` as a ``fixture-status`` does, unless an in-play
        flag newer than ``at`` (``(ms, entry id)``) was taken already
        (``late_fixture_fields``; ``force``: a snapshot's, always taken);
        every market of the fixture whose header changed is emitted. Its
        ``status`` moves no market status (markets follow ``fixture-status``
        and odds for that)."""
        live = _live_of(item.is_live, _status_key(item.status, raw))  # (the status checked by _state already)
        if live is None:
            return
        fx = self.fixtures.get(fixture_id)
        if fx is None:  # remembered for the fixture's first odds
            fx = self.fixtures[fixture_id] = _Fixture(fixture_id)
        if not self._take_live(fx, live, at, force):
            return
        for mid in fx.markets:
            m = self.markets[mid]
            self._emit(m, False, [], max(m.ts, at[0]), batch, recv_ms)

    def _state(self, fixture_id: str, item: WireFixtureState, ts: int, batch: NormalisedBatch, raw: bytes,
               recv_ms: int) -> bool:
        """Merge ``item`` into the fixture's last state; emit it when it changed
        (reject it alone when it does not check). True when it was taken
        (checked and not older than the state held: ``stale_state``)."""
        eid = f"{self.prefix}:{fixture_id}"
        prev = self.states.get(eid)
        try:
            status: EventStatus = prev.status if prev is not None else "NOT_STARTED"
            key = _status_key(item.status, raw)
            if key is not None:
                status = _EVENT_STATUS[key]
            in_play = item.is_live if item.is_live is not None else (
                status == "LIVE" if key is not None else (prev.in_play if prev is not None else False))
            period = prev.period if prev is not None else None
            if item.period is not UNSET:
                period = (item.period.strip().lower().replace(" ", "").replace("-", "_")
                          if item.period is not None else None)
            clock = prev.clock if prev is not None else None
            if item.clock is not UNSET:
                c = item.clock
                clock = None if c is None else Clock(seconds=c.seconds, running=c.running, at=ts,
                                                     remaining_s=c.remaining_seconds, stoppage_s=c.stoppage_seconds)
            score = prev.score if prev is not None else None
            if item.score is not UNSET:
                sc = item.score
                score = None if sc is None else Score(
                    home=sc.home, away=sc.away,
                    periods=[PeriodScore(period=p.period.strip().lower(), home=p.home, away=p.away)
                             for p in sc.periods or ()])
            cards = prev.red_cards if prev is not None else None
            if item.red_cards is not UNSET:
                rc = item.red_cards
                cards = None if rc is None else TeamCounts(home=rc.home, away=rc.away)
            innings = prev.innings if prev is not None else []
            if item.innings is not UNSET:
                innings = [Innings(number=x.number, team=x.team, runs=x.runs, wickets=x.wickets, balls=x.balls)
                           for x in item.innings or ()]
            if prev is not None:
                if ts < prev.source_ts:
                    self.dropped["stale_state"] = self.dropped.get("stale_state", 0) + 1
                    return False
            state = EventState(event_id=eid, source=self.source, status=status, in_play=in_play, period=period,
                               clock=clock, score=score, red_cards=cards, innings=innings, source_ts=ts,
                               received_at=recv_ms)
            check_event_state(state, recv_ms, max_future_skew_ms=self.max_future_skew_ms)
        except FeedDecodeError as exc:
            batch.rejected.append(FeedDecodeError(exc.reason, exc.detail, raw, event_id=eid))
            return False
        if not state.same_content(prev):
            remember(self.states, eid, state)
            batch.event_states.append(state)
        return True

    def _apply_fixture_status(self, wf: WireFixture, batch: NormalisedBatch, raw: bytes, default_ts: int,
                              key: tuple[int, int], recv_ms: int) -> bool:
        """A ``fixture-status``: its fields (unless older than the fixture's,
        see :meth:`_fixture`) and every market of the fixture following them.
        False when it was older (nothing of it taken)."""
        ts = ts_to_ms(wf.timestamp) if wf.timestamp is not None else default_ts
        held = self.fixtures.get(str(wf.id))
        late = held is not None and (ts, key) < held.at
        fx, _ = self._fixture(wf, raw, (ts, key))
        for mid in fx.markets:
            m = self.markets[mid]
            self._emit(m, False, [], max(m.ts, ts), batch, recv_ms)
        return not late

    def _emit(self, m: _Market, image: bool, sids: list[str], ts: int, batch: NormalisedBatch, recv_ms: int) -> None:
        self._outcomes(m, sids)
        header = self._header(m)
        if not image and header == m.header and not sids:
            return
        m.ts = max(m.ts, ts)
        source_ts, original = ts, None  # (a replay maps the clock in the pipeline)
        if image:
            selections = list(m.sels.values())
        else:
            selections = [m.sels[s] for s in sids]
        update = MarketUpdate(
            market_id=m.market_id,
            source=self.source,
            image=image,
            header=header if image or header != m.header else None,
            selections=selections,
            source_ts=source_ts,
            source_ts_original=original,
            received_at=recv_ms,
        )
        try:  # the bounds every update must meet (checked on the odds already: a safety net)
            check_market(update.market_id, update.header, selections, None, source_ts, original, recv_ms,
                         self.max_future_skew_ms)
        except FeedDecodeError as exc:
            exc.raw = self._raw
            self._rejected.append(exc)
            return
        batch.updates.append(update)
        m.header = header

    @staticmethod
    def _canonical(m: _Market) -> tuple[str, dict[str, str] | None]:
        """The market's canonical type and specifiers (:mod:`feed.taxonomy`)."""
        draw = any(s.outcome == "draw" for s in m.sels.values())
        kind, specs = generic_market(m.raw_id, has_draw=draw if m.sels else None, sport=m.fixture.sport)
        if m.line is not None:
            specs["line"] = _line_text(m.line)
        return kind, specs or None

    def _outcomes(self, m: _Market, sids: list[str]) -> None:
        """Give each selection its canonical outcome (from its name against the
        fixture's home/away names; racing and unmapped types: its id); one
        whose outcome moved joins ``sids``."""
        fx = m.fixture
        kind = generic_market(m.raw_id, sport=fx.sport)[0]
        for sid, sel in m.sels.items():
            if kind in ("win", "place") or is_unmapped(kind):
                outcome: str | None = sid
            else:
                outcome = outcome_from_name(kind, sel.name, fx.home, fx.away)
            if outcome != sel.outcome:
                m.sels[sid] = msgspec.structs.replace(sel, outcome=outcome)
                if sid not in sids:
                    sids.append(sid)

    def _header(self, m: _Market) -> MarketHeader:
        fx = m.fixture
        status, reason = _market_status(m, fx.status)
        market_type, specifiers = self._canonical(m)
        return MarketHeader(
            event_id=f"{self.prefix}:{fx.id}",
            bookmaker=m.bookmaker,
            sport=fx.sport,
            competition=fx.league,
            event_name=fx.event_name(),
            name=m.name,
            market_type=market_type,
            market_type_raw=m.raw_id,
            specifiers=specifiers,
            status=status,
            suspend_reason=reason,
            in_play=fx.in_play,
            start_time=fx.start_time,
        )


def _tag(msg: _Message) -> str:
    tag = msg.__struct_config__.tag
    assert isinstance(tag, str)  # every message Struct declares a string tag
    return tag


def _fixture_status_of(stored: Market, m: _Market) -> str | None | Literal[False]:
    """What a stored market says of its fixture's status (the rules of
    :func:`_market_status` read backwards; ``m``: its restored cache): the
    fixture status key when only that status makes the market what it is
    (``suspend_reason`` ``fixture_<status>``; ``SETTLED`` / ``CLOSED``
    while a selection is still live or none has a result: ``settled``);
    None when the market is what its own selections make it (so the fixture
    has no status that overrides markets); False when it cannot tell (a
    market closed with every selection resulted: by its results or by a
    fixture settlement alike)."""
    reason = stored.suspend_reason
    if reason and reason.startswith("fixture_"):
        status = reason.removeprefix("fixture_")
        if status in _CANCELLING or status in _SUSPENDING:
            return status
    if stored.status in ("SETTLED", "CLOSED"):
        own, _ = _market_status(m, None)
        return False if own == stored.status else "settled"
    if stored.status == "CANCELLED":  # (only a fixture cancels a market; a reason lost: cancelled)
        return "cancelled"
    return None


def _market_status(m: _Market, fixture_status: str | None) -> tuple[MarketStatus, str | None]:
    """(status, suspend_reason) by the rules in the module docstring."""
    statuses = [s.status for s in m.sels.values()]
    won = any(s in _WINNING for s in statuses)
    if fixture_status == "settled":
        return ("SETTLED" if won else "CLOSED"), None
    if fixture_status in _CANCELLING:
        return "CANCELLED", f"fixture_{fixture_status}"
    if fixture_status in _SUSPENDING:
        return "SUSPENDED", f"fixture_{fixture_status}"
    live = [s for s in statuses if s in _LIVE_SELECTION]
    if not live and any(s in _RESULTS for s in statuses):
        return ("SETTLED" if won else "CLOSED"), None
    if live and all(s == "SUSPENDED" for s in live):
        return "SUSPENDED", "locked"
    return "OPEN", None



def from_spec(spec: SourceSpec, settings: Settings) -> PushNormaliser:
    """The registry's normaliser factory for ``push-ws`` / ``push-sse``
    sources: market ids under ``prefix=`` (default ``px``)."""
    return PushNormaliser(spec.name, prefix=spec.get("prefix") or PREFIX)
