"""Pinnacle Lines API (``/v1/fixtures``, ``/v2/odds``) → canonical market updates.

Pure: response bodies in, :class:`~feed.normalise.base.MarketUpdate` objects
out; no I/O and no clock reads (``recv_ms`` comes in). Follows the Lines API
semantics (``research/upstream.md`` §3):

- **cursor**: every response carries ``last``; the next call passes it back
  as ``since``. A call without ``since`` is a *snapshot* (the full current
  state of the sport); a call with it is a *delta* carrying only the
  changed **periods**, each whole. The normaliser merges a delta period over
  the period it holds, and keeps the cursors (per endpoint and ``sportId``)
  itself: they advance only with data it applied, and the batch carries
  them (``NormalisedBatch.cursor``, JSON ``{"fixtures": {sportId: last},
  "odds": {sportId: last}}``) so Ingest stores them with that data.
- **duplicates / out of order**: a delta whose ``last`` is not above the
  cursor (the server replayed an old answer) is dropped whole; so is a
  snapshot whose ``last`` is below the cursor (a replayed or cached answer
  to a snapshot call would put old prices back and confirm them), unless
  :data:`OLD_SNAPSHOTS_TO_RESET` of them come in a row (the provider's
  counter went back: the last one is taken); a period
  whose ``*UpdatedAt`` times are all older than the period held is dropped.
- **status**: period ``status`` 1 = online, 2 = offline → SUSPENDED
  (``offline``); a line the provider stopped offering (absent from a period
  it re-sent, or from a snapshot) → SUSPENDED (``not_offered``), prices
  kept. A market is open only while its period's ``cutoff`` is ahead
  (Pinnacle's FAQ): an online period past it (compared with ``recv_ms``) →
  SUSPENDED (``past_cutoff``), and since a delta re-sends a period only when
  it changes, *every* fixtures or odds answer (delta, snapshot, stale or
  empty, of any sport: each odds poll confirms all the source's markets)
  also suspends each OPEN market whose cutoff is at or before its receipt,
  stamped with the cutoff (the poller delivers an empty odds answer as an
  empty delta for this). Markets restored after a restart (:meth:`restore`)
  have no known cutoff until their period is sent again, so the poller's
  first odds call of a run is a snapshot even with a stored cursor (after
  an applied fixtures snapshot): it re-renders each restored market with
  its period's cutoff, or suspends it (``not_offered``), and confirms
  nothing (``feed.sources.poller``). The
  cutoff is not derived from the stored market: Pinnacle documents it only
  as the period's wagering cut-off (its FAQ: open while it is ahead; nowhere
  the period's start), and a live period's cutoff follows no stored field.
- **snapshot age**: Pinnacle caches snapshot answers (``/odds`` and
  ``/fixtures`` without ``since``) 60 s, so a snapshot's prices may be up to
  :data:`SNAPSHOT_CACHE_MS` older than its request: every update and event
  state of a snapshot answer is stamped ``received_at`` = its request (the
  channel says how long before the receipt it was sent) −
  :data:`SNAPSHOT_CACHE_MS`, and the poller confirms nothing by it (the next
  delta, ``since`` = the snapshot's ``last``, brings every change since and
  confirms): a market it imaged or changed reads that old — stale under the
  default limits — until then. Provider times are still checked against
  the receipt itself (a receipt moved back would refuse a change of the
  last minute as ``clock_skew``).
- **dropped events**: a fixtures snapshot is the sport's full list, so an
  event it no longer lists (fixtures and odds forgotten) is no longer
  offered: each market of a period that event held lines for, that no
  remaining event of its group now holds, is SUSPENDED (``not_offered``,
  prices kept), and so is every market of a group none of whose events is
  listed any more (markets restored after a restart too), unless settled
  or cancelled, or of an event rejected in that snapshot.
- **identity**: live events have their own id and point to the pre-match
  event through ``parentId`` (corners / bookings events too, told apart by
  ``resultingUnit``). The canonical event is the parent, so a market keeps
  its id when the match goes in play: ``pn:<eventId>:<period>:moneyline``,
  ``pn:<eventId>:<period>:spread:<hdp>``, ``pn:<eventId>:<period>:total:<points>``
  (``pn:<eventId>:<period>:<unit>:…`` for a non-regular ``resultingUnit``).
  The events of one group (parent id, unit) share these ids, so each
  period is served from its *sources*: every live event (``liveStatus`` 1)
  of the group that holds lines for the period — Pinnacle may run several
  live events for one match (alternative odds) but never offers one market
  on two at once; when two do price one market, the event whose period
  changed last wins, then the higher id — and, only when no live event
  holds the period, the pre-match event (the highest non-live id: a
  duplicated parent's newer copy). A pre-match price is never served for a
  period a live event offers, and each market takes its status (offline,
  cutoff) and ``in_play`` from the event that supplies it: any event of the
  group going offline suspends the markets it supplies. A market none of
  the period's sources offers is SUSPENDED (``not_offered``).
- **prices**: decimal by default; with ``odds_format="american"`` (the
  ``oddsFormat=American`` query) they are converted to decimal
  (:mod:`feed.odds`).
- **rejections**: a body that is not a Lines API response (bad JSON, wrong
  envelope, wrong endpoint or sport) raises :class:`FeedDecodeError` and
  applies nothing. An *event* that fails its checks (``invalid_price``;
  ``invalid_size`` / ``invalid_number``: a ``max*`` / ``hdp`` / ``points``
  out of :mod:`feed.validate`'s bounds; ``invalid_time``: a time outside
  1970..2100; ``clock_skew``: an ``*UpdatedAt`` more than
  ``max_future_skew_ms`` after receipt; ``invalid_schema``) is rejected
  alone: nothing of it is applied, each of its known markets is reported in
  ``batch.rejected`` (one entry with ``market_id`` None when none is known),
  its markets are neither suspended nor forgotten by a snapshot, and the
  rest of the body applies (the cursor advances).

Scores, results (issue 12 item 3):

- **live scores**: an odds event may carry ``homeScore`` / ``awayScore``
  (doubles holding whole goals) and ``homeRedCards`` / ``awayRedCards``
  (Pinnacle gives them for live soccer events, full-match period only):
  an :class:`~feed.models.EventState` of the canonical event
  ``pn:<parent id>`` (the id its markets carry), status LIVE, in play, the
  score and red cards; ``source_ts`` the event's newest ``*UpdatedAt`` in
  the body (else the receive time), never earlier than the last state's.
  A score that is not a whole number ≥ 0 rejects that state alone
  (``invalid_number``, ``event_id`` set; the event's lines apply).
- **settled** (``/v1/fixtures/settled``, cursor ``since``/``last`` like
  the others): each settled period (``status`` 1 settled, 2 re-settled)
  settles the markets of that period: moneyline home / away / draw by the
  score; spreads and totals by the line — a push is VOID
  (``void_factor`` 1), an Asian quarter line split in two halves (half won
  and half pushed → WINNER with ``void_factor`` 0.5, half lost and half
  pushed → LOSER with 0.5); the market becomes SETTLED and is never
  re-rendered from odds again. ``status`` 3 / 4 (cancelled) → the
  period's markets CANCELLED, every selection VOID (``void_factor`` 1);
  5 (deleted) is dropped. ``team1Score`` / ``team2Score`` are the home /
  away scores unless ``/v2/leagues`` says the league's ``homeTeamType`` is
  ``Team2`` (then team1 is the away side): the poller delivers the
  leagues answer (channel ``leagues:<sportId>:snapshot``) before the first
  settled poll. The event's state follows: per-period scores, and period
  0 settled → CLOSED with the final score (cancelled → CANCELLED);
  ``source_ts`` = ``settledAt``. A re-delivered settlement (``settlementId``
  not above the one applied) is dropped.

Which endpoint a body came from, and whether it answered a snapshot call,
is told by the caller with :meth:`PinnacleNormaliser.expect` before
:meth:`~PinnacleNormaliser.feed`; without it the endpoint is recognised by
its list key (fixtures: ``league``, odds: ``leagues``) and the body is taken
as a delta (recorded traffic replays that way).

Odds for an event whose fixture is not known yet are kept and rendered when
the fixture arrives (``missing_fixtures`` lists them so the poller can fetch
fixtures early).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from feed.errors import FeedDecodeError
from feed.models import (
    CLOSED_STATUSES,
    EventState,
    Market,
    MarketHeader,
    PeriodScore,
    Score,
    Selection,
    SelectionStatus,
    TeamCounts,
)
from feed.normalise.base import MarketUpdate, NormalisedBatch, odds_format_of, remember
from feed.normalise.rendered import (
    MarketDiffer,
    Rendered,
    display_name,
    fmt_line,
    iso_to_ms,
    make_selection,
    price_to_decimal,
)
from feed.taxonomy import line_text, period_of
from feed.validate import (
    MAX_FUTURE_SKEW_MS,
    MAX_HANDICAP,
    MAX_INT,
    MAX_SIZE,
    check_event_state,
    check_market,
    check_provider_time,
)

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = ["SPORTS", "PinnacleNormaliser", "market_id_parts", "sport_id_of"]

SOURCE_PREFIX = "pn:"

EventId = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Price = float  # validated (and converted) by feed.odds, so that a bad price gets reason invalid_price
Line = Annotated[float, msgspec.Meta(ge=-MAX_HANDICAP, le=MAX_HANDICAP)]  # hdp / points
Stake = Annotated[float, msgspec.Meta(ge=0, le=MAX_SIZE)]  # max* (currency units)

#: Pinnacle ``sportId`` → canonical sport key.
SPORTS: dict[int, str] = {
    3: "baseball", 4: "basketball", 6: "boxing", 8: "cricket", 10: "darts", 12: "esports",
    15: "american_football", 17: "golf", 18: "handball", 19: "ice_hockey", 22: "mma",
    26: "rugby_league", 27: "rugby_union", 28: "snooker", 29: "soccer", 33: "tennis", 34: "volleyball",
}
_SPORT_IDS = {v: k for k, v in SPORTS.items()}

_PRICE_KEYS = frozenset({"home", "away", "draw", "over", "under"})
_KINDS = ("moneyline", "spread", "total")


def sport_id_of(sport: str | None) -> int | None:
    """Canonical sport key → Pinnacle sportId (``pinnacle_<id>`` keys too)."""
    if sport is None:
        return None
    if sport in _SPORT_IDS:
        return _SPORT_IDS[sport]
    if sport.startswith("pinnacle_") and sport[9:].isdigit():
        return int(sport[9:])
    return None


def _sport_key(sport_id: int) -> str:
    return SPORTS.get(sport_id, f"pinnacle_{sport_id}")


# --- wire Structs: provider field names, only the fields we read ----------


class Moneyline(msgspec.Struct, kw_only=True, gc=False):
    home: Price | None = None
    away: Price | None = None
    draw: Price | None = None


class Spread(msgspec.Struct, kw_only=True, gc=False):
    hdp: Line
    home: Price | None = None
    away: Price | None = None
    altLineId: EventId | None = None
    max: Stake | None = None


class Total(msgspec.Struct, kw_only=True, gc=False):
    points: Line
    over: Price | None = None
    under: Price | None = None
    altLineId: EventId | None = None
    max: Stake | None = None


class Period(msgspec.Struct, kw_only=True, gc=False):
    number: Annotated[int, msgspec.Meta(ge=0, le=99)]
    status: int = 1
    lineId: EventId | None = None
    cutoff: str | None = None
    maxSpread: Stake | None = None
    maxMoneyline: Stake | None = None
    maxTotal: Stake | None = None
    moneylineUpdatedAt: str | None = None
    spreadUpdatedAt: str | None = None
    totalUpdatedAt: str | None = None
    moneyline: Moneyline | None = None
    spreads: list[Spread] | None = None
    totals: list[Total] | None = None


class OddsEvent(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    periods: list[Period] = []
    homeScore: float | None = None
    awayScore: float | None = None
    homeRedCards: int | None = None
    awayRedCards: int | None = None


class OddsLeague(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    events: list[OddsEvent] = []


class SettledPeriod(msgspec.Struct, kw_only=True, gc=False):
    """A period of ``/v1/fixtures/settled``: ``status`` 1 settled, 2
    re-settled, 3 cancelled, 4 re-settled as cancelled, 5 deleted."""

    number: Annotated[int, msgspec.Meta(ge=0, le=99)]
    status: int = 1
    settlementId: EventId | None = None
    settledAt: str | None = None
    team1Score: float | None = None
    team2Score: float | None = None


class SettledEvent(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    periods: list[SettledPeriod] = []


class SettledLeague(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    events: list[SettledEvent] = []


class SettledResponse(msgspec.Struct, kw_only=True, gc=False):
    sportId: EventId
    last: EventId | None = None
    leagues: list[SettledLeague] = []


class _LooseSettledLeague(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    events: list[msgspec.Raw] = []


class _LooseSettledResponse(msgspec.Struct, kw_only=True, gc=False):
    sportId: EventId
    last: EventId | None = None
    leagues: list[_LooseSettledLeague] = []


class LeagueInfo(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    name: str | None = None
    homeTeamType: str | None = None


class LeaguesResponse(msgspec.Struct, kw_only=True, gc=False):
    """``/v2/leagues?sportId=``: which team (Team1 / Team2) is the home side, per league."""

    leagues: list[LeagueInfo] = []


class FixtureEvent(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    parentId: EventId | None = None
    starts: str | None = None
    home: str | None = None
    away: str | None = None
    liveStatus: int = 0
    resultingUnit: str | None = None


class FixtureLeague(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    name: str | None = None
    events: list[FixtureEvent] = []


class Response(msgspec.Struct, kw_only=True, gc=False):
    """A fixtures (``league``) or odds (``leagues``) response."""

    sportId: EventId
    last: EventId | None = None
    leagues: list[OddsLeague] | None = None
    league: list[FixtureLeague] | None = None


_DECODER = msgspec.json.Decoder(Response)
_SETTLED_DECODER = msgspec.json.Decoder(SettledResponse)
_LOOSE_SETTLED_DECODER = msgspec.json.Decoder(_LooseSettledResponse)
_SETTLED_EVENT_DECODER = msgspec.json.Decoder(SettledEvent)
_LEAGUES_DECODER = msgspec.json.Decoder(LeaguesResponse)


class _LooseOddsLeague(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    events: list[msgspec.Raw] = []


class _LooseFixtureLeague(msgspec.Struct, kw_only=True, gc=False):
    id: EventId
    name: str | None = None
    events: list[msgspec.Raw] = []


class _LooseResponse(msgspec.Struct, kw_only=True, gc=False):
    """The envelope with each event left raw: decoded when the typed decode
    fails, to reject only the events that fail."""

    sportId: EventId
    last: EventId | None = None
    leagues: list[_LooseOddsLeague] | None = None
    league: list[_LooseFixtureLeague] | None = None


class _EventIdOnly(msgspec.Struct, gc=False):
    id: EventId


_LOOSE_DECODER = msgspec.json.Decoder(_LooseResponse)
_ODDS_EVENT_DECODER = msgspec.json.Decoder(OddsEvent)
_FIXTURE_EVENT_DECODER = msgspec.json.Decoder(FixtureEvent)
_EVENT_ID_DECODER = msgspec.json.Decoder(_EventIdOnly)
_JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)
_SIZE_KEYS = frozenset({"max", "maxSpread", "maxMoneyline", "maxTotal"})
_LINE_KEYS = frozenset({"hdp", "points"})


def _reason_of(text: str) -> str:
    """A msgspec ValidationError message → rejection reason, by the field."""
    path = text.rpartition("`$")[2].rstrip("`")
    key = path.rpartition(".")[2].partition("[")[0]
    if key in _PRICE_KEYS:
        return "invalid_price"
    bound = ">=" in text or "<=" in text or "out of range" in text
    if bound and key in _SIZE_KEYS:
        return "invalid_size"
    if bound and key in _LINE_KEYS:
        return "invalid_number"
    return "invalid_schema"


class PinnacleCursor(msgspec.Struct, kw_only=True):
    """The stored resume cursor: ``last`` per endpoint and sportId."""

    fixtures: dict[str, int] = {}
    odds: dict[str, int] = {}
    settled: dict[str, int] | UnsetType = UNSET  # absent until a settled answer was applied

    def of(self, endpoint: str) -> dict[str, int]:
        """The ``last`` per sportId of ``endpoint`` (``fixtures``, ``odds``, ``settled``)."""
        value = getattr(self, endpoint)
        if value is UNSET:
            value = {}
            setattr(self, endpoint, value)
        return value


# --- state -------------------------------------------------------------------


class _Fixture(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: int
    parent: int | None
    sport: int
    league: str | None
    home: str | None
    away: str | None
    starts: int | None
    live: int
    unit: str

    @property
    def group(self) -> tuple[int, str]:
        return (self.parent or self.id, self.unit)


Side = tuple[float, float | int]  # (decimal price, raw price)


class _Line(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    line: float
    a: Side | None  # home / over
    b: Side | None  # away / under
    alt: int | None
    max: float | None


class _Period(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    number: int
    status: int
    line_id: int | None
    cutoff_ms: int | None
    ml: dict[str, Side] | None
    ml_ts: int | None
    spreads: list[_Line]
    sp_ts: int | None
    totals: list[_Line]
    tot_ts: int | None
    max_ml: float | None
    max_spread: float | None
    max_total: float | None

    @property
    def newest_ts(self) -> int | None:
        ts = [t for t in (self.ml_ts, self.sp_ts, self.tot_ts) if t is not None]
        return max(ts) if ts else None


def market_id_parts(market_id: str) -> tuple[int, str, int, str, str | None] | None:
    """``pn:`` market id → (event id, unit, period, kind, line) or None."""
    parts = market_id.split(":")
    if len(parts) < 4 or parts[0] != "pn" or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    rest = parts[3:]
    unit = ""
    if rest[0] not in _KINDS:
        unit, rest = rest[0], rest[1:]
    if not rest or rest[0] not in _KINDS:
        return None
    return int(parts[1]), unit, int(parts[2]), rest[0], rest[1] if len(rest) > 1 else None


#: Snapshot answers in a row whose ``last`` is below the held cursor before one is taken as the
#: provider's counter having gone back (the ones before are dropped as replayed old answers).
OLD_SNAPSHOTS_TO_RESET = 3

#: How old (ms) a snapshot answer may be when it is served: Pinnacle caches ``/odds`` and
#: ``/fixtures`` snapshot answers 60 s (its FAQ; "odds requested without since are delayed by up to
#: 1 min"). Updates and event states of a snapshot answer are stamped ``received_at`` = its request
#: − this (module docstring).
SNAPSHOT_CACHE_MS = 60_000


class PinnacleNormaliser:
    """Pinnacle fixtures + odds → canonical markets (see the module docstring).

    source: the source name; odds_format: ``decimal`` or ``american`` (what
    the poller asked for); bookmaker: the canonical bookmaker key.
    Counters of dropped input are in ``dropped`` (``stale_response``,
    ``stale_period``, ``no_fixture``).
    """

    #: no live provider times (see Normaliser.live_provider_times)
    live_provider_times = False

    def __init__(self, source: str = "pinnacle", *, odds_format: Literal["decimal", "american"] = "decimal",
                 bookmaker: str = "pinnacle", max_future_skew_ms: int = MAX_FUTURE_SKEW_MS) -> None:
        self.source = source
        self.max_future_skew_ms = max_future_skew_ms
        self.odds_format = odds_format
        self.bookmaker = bookmaker
        self.fixtures: dict[int, _Fixture] = {}
        self.members: dict[tuple[int, str], set[int]] = {}
        self.odds: dict[int, dict[int, _Period]] = {}
        self.odds_sport: dict[int, int] = {}
        self.differ = MarketDiffer(source)
        self.by_gp: dict[tuple[int, str, int], set[str]] = {}
        #: market id -> the cutoff (ms) of the period it was last rendered OPEN from (until that
        #: cutoff is reached); ``_cutoff_heap`` holds (cutoff, market id) for :meth:`_expire_cutoffs`
        self.cutoffs: dict[str, int] = {}
        self._cutoff_heap: list[tuple[int, str]] = []
        self.cursors = PinnacleCursor()
        self.missing_fixtures: set[int] = set()
        self.dropped: Counter[str] = Counter()
        #: (endpoint, sport) → snapshot answers in a row older than the held cursor (see feed())
        self._old_snapshots: Counter[tuple[str, str]] = Counter()
        #: (base event, unit, period) settled or cancelled: its markets are never re-rendered from odds
        self.settled: dict[tuple[int, str, int], None] = {}
        #: settlementId applied per (base event, unit, period)
        self.settlements: dict[tuple[int, str, int], int] = {}
        #: league ids whose home side is Team2 (``/v2/leagues`` homeTeamType)
        self.team2_home: set[int] = set()
        #: the last event state emitted per canonical event id, and settled period scores per base event
        self.states: dict[str, EventState] = {}
        self.period_scores: dict[int, dict[int, tuple[int, int]]] = {}
        # per feed() call: the body, its receive time, the events rejected alone
        # (raw event id, None when unreadable → error) and the batch's rejections
        self._raw = b""
        self._recv_ms = 0
        self._bad_events: dict[int | None, FeedDecodeError] = {}
        self._rejected: list[FeedDecodeError] = []

    # -- public -----------------------------------------------------------

    def since(self, endpoint: Literal["fixtures", "odds", "settled"], sport_id: int) -> int | None:
        """The ``since`` to send next for ``endpoint`` and ``sport_id`` (None: snapshot)."""
        return self.cursors.of(endpoint).get(str(sport_id))

    def cursor(self) -> str:
        """The resume cursor as stored (JSON)."""
        return msgspec.json.encode(self.cursors).decode()

    def restore(self, markets: Iterable[Market], cursor: str | None) -> None:
        """Resume after a restart: the stored cursor and the stored markets
        of this source (so a later delta can suspend a line that vanished,
        and a fixtures snapshot the markets of an event it no longer lists).
        Their cutoffs are not known until their period is sent again (the
        poller's first odds call of a run is a snapshot: module docstring)."""
        if cursor:
            try:
                self.cursors = msgspec.json.decode(cursor, type=PinnacleCursor)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.cursors = PinnacleCursor()
        mine = [m for m in markets if m.source == self.source and m.market_id.startswith(SOURCE_PREFIX)]
        self.differ.seed(mine)
        for m in mine:
            parts = market_id_parts(m.market_id)
            if parts is not None:
                e, unit, period, _, _ = parts
                self.by_gp.setdefault((e, unit, period), set()).add(m.market_id)
                if m.status in ("SETTLED", "CANCELLED"):
                    remember(self.settled, (e, unit, period), None)

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Decode one response body and apply it (see the module docstring).

        channel: what the body answers, :func:`channel` ``(endpoint, sport,
        snapshot, asked_before_ms)`` — ``odds:29:snapshot``,
        ``odds:29:snapshot:180``, ``fixtures:29:since``: a body of
        the other endpoint's shape or of another sport is then rejected
        (``invalid_schema``: applying it would move the wrong cursor). An
        empty channel infers the endpoint from the body (a delta). Every
        update and event state of a fixtures or odds snapshot answer is
        stamped ``received_at`` = ``recv_ms`` − ``asked_before_ms`` −
        :data:`SNAPSHOT_CACHE_MS` (ms; at least 0): the answer may be
        Pinnacle's cached one, that old at its request.

        Raises :class:`FeedDecodeError` (``invalid_json``, ``invalid_schema``)
        for a body rejected whole, and then has applied nothing; events
        rejected alone are reported in ``batch.rejected``.
        """
        expect = _parse_channel(channel, raw)
        self._raw, self._recv_ms, self._bad_events = raw, recv_ms, {}
        self._rejected = []
        if expect is not None and expect[0] == "leagues":
            return self._apply_leagues(raw)
        if (expect is not None and expect[0] == "settled") or (expect is None and b'"settlementId"' in raw):
            return self._feed_settled(raw, recv_ms, expect)
        batch = self._feed_lines(raw, recv_ms, expect)
        if expect is not None and expect[1]:
            # a snapshot call's answer (fixtures or odds) may be Pinnacle's cached one: nothing of it
            # counts as received later than SNAPSHOT_CACHE_MS before the request (provider times were
            # checked against the receipt itself: a change of the last minute is no clock skew)
            as_of = max(0, recv_ms - SNAPSHOT_CACHE_MS - expect[3])
            for u in batch.updates:
                u.received_at = min(u.received_at, as_of)
            batch.event_states = [msgspec.structs.replace(es, received_at=min(es.received_at, as_of))
                                  for es in batch.event_states]
        return batch

    def _feed_lines(self, raw: bytes, recv_ms: int,
                    expect: tuple[str, bool, int | None, int] | None) -> NormalisedBatch:
        """:meth:`feed` of a fixtures or odds body (``expect``: the parsed channel, None: none given)."""
        rejected = self._rejected
        msg = self._decode(raw)
        if expect is not None:
            endpoint, snapshot, sport_id, _ = expect
            other = msg.leagues if endpoint == "fixtures" else msg.league
            if other is not None:
                raise FeedDecodeError("invalid_schema", f"a {'odds' if endpoint == 'fixtures' else 'fixtures'} "
                                      f"body where {endpoint} were expected", raw)
            if sport_id is not None and msg.sportId != sport_id:
                raise FeedDecodeError("invalid_schema", f"sportId {msg.sportId} in the answer for sportId {sport_id}", raw)
        else:
            endpoint = "fixtures" if msg.league is not None else "odds" if msg.leagues is not None else ""
            snapshot = False
        batch = NormalisedBatch(op=endpoint or "empty", rejected=rejected)
        if not endpoint:
            self._expire_cutoffs(recv_ms, batch.updates)
            return batch
        sport = str(msg.sportId)
        cursors: dict[str, int] = self.cursors.of(endpoint)
        current = cursors.get(sport)
        if not snapshot and msg.last is not None and current is not None and msg.last <= current:
            has_data = bool(msg.leagues or msg.league or self._bad_events)
            if msg.last < current or has_data:
                self.dropped["stale_response"] += 1
                batch.stale = True
            self._report_bad_events()  # (an old answer, but its bad parts were bad all the same)
            self._expire_cutoffs(recv_ms, batch.updates)
            return batch
        if snapshot and msg.last is not None and current is not None and msg.last < current:
            # a snapshot older than what is held (a replayed or cached answer): applying it would
            # put old prices back and confirm them as of this request. Only when the provider keeps
            # answering snapshots older than the cursor (its counter went back) is one taken
            key = (endpoint, sport)
            self._old_snapshots[key] += 1
            if self._old_snapshots[key] < OLD_SNAPSHOTS_TO_RESET:
                self.dropped["stale_response"] += 1
                batch.stale = True
                self._report_bad_events()
                self._expire_cutoffs(recv_ms, batch.updates)
                return batch
        self._old_snapshots.pop((endpoint, sport), None)
        missing_before = len(self.missing_fixtures)
        if endpoint == "fixtures":
            fixtures = self._fixtures_of(msg, raw)
            self._apply_fixtures(msg.sportId, fixtures, snapshot, recv_ms, batch.updates)
        else:
            periods = self._periods_of(msg, raw, recv_ms)
            self._apply_odds(msg.sportId, periods, snapshot, recv_ms, batch.updates)
            self._live_scores(msg, periods, recv_ms, batch)
        if len(self.missing_fixtures) > missing_before:
            batch.requests.append("fixtures")  # odds of events whose fixture is unknown yet
        batch.in_play = any(f.live == 1 and f.sport == msg.sportId for f in self.fixtures.values())
        self._report_bad_events()
        self._expire_cutoffs(recv_ms, batch.updates)
        batch.runner_changes = sum(len(u.selections) for u in batch.updates)
        if msg.last is not None and msg.last != current:
            cursors[sport] = msg.last
            batch.cursor = self.cursor()
        return batch

    # -- scores and results -------------------------------------------------------

    def _emit_state(self, state: EventState, batch: NormalisedBatch) -> None:
        """Emit ``state`` when it says something new (checked first: a state
        out of bounds is rejected alone, with its ``event_id``)."""
        try:
            check_event_state(state, self._recv_ms, max_future_skew_ms=self.max_future_skew_ms)
        except FeedDecodeError as exc:
            self._rejected.append(FeedDecodeError(exc.reason, exc.detail, self._raw, event_id=state.event_id))
            return
        if not state.same_content(self.states.get(state.event_id)):
            remember(self.states, state.event_id, state)
            batch.event_states.append(state)

    def _live_scores(self, msg: Response, periods: list[tuple[int, list[_Period]]], recv_ms: int,
                     batch: NormalisedBatch) -> None:
        """Live scores and red cards of the body's odds events (module docstring)."""
        newest = {rid: max((t for p in ps if (t := p.newest_ts) is not None), default=None) for rid, ps in periods}
        for league in msg.leagues or ():
            for ev in league.events:
                if ev.homeScore is None and ev.awayScore is None and ev.homeRedCards is None \
                        and ev.awayRedCards is None:
                    continue
                if ev.id in self._bad_events:
                    continue
                fx = self.fixtures.get(ev.id)
                if fx is not None and fx.unit:
                    continue  # a corners / bookings event: its "score" is not the match's
                base = fx.group[0] if fx is not None else ev.id
                eid = f"{SOURCE_PREFIX}{base}"
                prev = self.states.get(eid)
                score = prev.score if prev is not None else None
                if ev.homeScore is not None or ev.awayScore is not None:
                    h, a = _whole(ev.homeScore), _whole(ev.awayScore)
                    if h is None or a is None:
                        self._rejected.append(FeedDecodeError(
                            "invalid_number", f"score {ev.homeScore!r}-{ev.awayScore!r} of event {ev.id} is not "
                            "two whole numbers >= 0", self._raw, event_id=eid))
                        continue
                    score = Score(home=h, away=a, periods=score.periods if score is not None else [])
                cards = prev.red_cards if prev is not None else None
                if ev.homeRedCards is not None or ev.awayRedCards is not None:
                    cards = TeamCounts(home=ev.homeRedCards or 0, away=ev.awayRedCards or 0)
                ts = newest.get(ev.id) or recv_ms
                if prev is not None:
                    if prev.status in ("CLOSED", "CANCELLED"):
                        continue  # settled: the live feed's last words change nothing
                    ts = max(ts, prev.source_ts)
                self._emit_state(EventState(event_id=eid, source=self.source, status="LIVE", in_play=True,
                                            period=prev.period if prev is not None else None, score=score,
                                            red_cards=cards, source_ts=ts, received_at=recv_ms), batch)

    def _apply_leagues(self, raw: bytes) -> NormalisedBatch:
        """``/v2/leagues``: remember the leagues whose home side is Team2."""
        try:
            body = _LEAGUES_DECODER.decode(raw)
        except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
            raise FeedDecodeError("invalid_schema", f"leagues: {exc}", raw) from None
        for lg in body.leagues:
            if (lg.homeTeamType or "").lower() == "team2":
                self.team2_home.add(lg.id)
            else:
                self.team2_home.discard(lg.id)
        return NormalisedBatch(op="leagues")

    def _feed_settled(self, raw: bytes, recv_ms: int,
                      expect: tuple[str, bool, int | None, int] | None) -> NormalisedBatch:
        """``/v1/fixtures/settled``: results of settled periods (module docstring)."""
        try:
            msg = _SETTLED_DECODER.decode(raw)
        except msgspec.ValidationError:
            msg = self._decode_settled_by_event(raw)
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        if expect is not None and expect[2] is not None and msg.sportId != expect[2]:
            raise FeedDecodeError("invalid_schema", f"sportId {msg.sportId} in the answer for sportId {expect[2]}", raw)
        batch = NormalisedBatch(op="settled", rejected=self._rejected)
        sport = str(msg.sportId)
        current = self.cursors.of("settled").get(sport)
        snapshot = expect is not None and expect[1]
        if not snapshot and msg.last is not None and current is not None and msg.last < current:
            self.dropped["stale_response"] += 1
            batch.stale = True
            return batch
        for league in msg.leagues:
            swap = league.id in self.team2_home
            for ev in league.events:
                try:
                    self._apply_settled_event(msg.sportId, ev, swap, recv_ms, batch)
                except FeedDecodeError as exc:  # (its markets left as they were)
                    self._rejected.append(FeedDecodeError(exc.reason, exc.detail, raw,
                                                          event_id=f"{SOURCE_PREFIX}{self._base_of(ev.id)}"))
        batch.runner_changes = sum(len(u.selections) for u in batch.updates)
        if msg.last is not None and msg.last != current:
            self.cursors.of("settled")[sport] = msg.last
            batch.cursor = self.cursor()
        return batch

    def _decode_settled_by_event(self, raw: bytes) -> SettledResponse:
        try:
            loose = _LOOSE_SETTLED_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            raise FeedDecodeError("invalid_schema", f"settled: {exc}", raw) from None
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        leagues = []
        for lg in loose.leagues:
            events = []
            for part in lg.events:
                try:
                    events.append(_SETTLED_EVENT_DECODER.decode(part))
                except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
                    try:
                        eid: str | None = f"{SOURCE_PREFIX}{self._base_of(_EVENT_ID_DECODER.decode(part).id)}"
                    except (msgspec.ValidationError, *_JSON_ERRORS):
                        eid = None
                    self._rejected.append(FeedDecodeError("invalid_schema", f"settled event: {exc}", raw,
                                                          event_id=eid))
            leagues.append(SettledLeague(id=lg.id, events=events))
        return SettledResponse(sportId=loose.sportId, last=loose.last, leagues=leagues)

    def _base_of(self, rid: int) -> int:
        fx = self.fixtures.get(rid)
        return fx.group[0] if fx is not None else rid

    def _apply_settled_event(self, sport_id: int, ev: SettledEvent, swap: bool, recv_ms: int,
                             batch: NormalisedBatch) -> None:
        fx = self.fixtures.get(ev.id)
        base, unit = fx.group if fx is not None else (ev.id, "")
        sport = _sport_key(fx.sport if fx is not None else sport_id)
        where = f"settled event {ev.id}"
        checked = []
        for p in sorted(ev.periods, key=lambda x: x.number):  # phase 1: check everything
            ts = self._time(p.settledAt, f"{where} period {p.number} settledAt", self._raw, True) or recv_ms
            t1, t2 = _whole(p.team1Score), _whole(p.team2Score)
            if p.status in (1, 2) and (t1 is None or t2 is None):
                raise FeedDecodeError("invalid_number", f"{where} period {p.number} score {p.team1Score!r}-"
                                      f"{p.team2Score!r} is not two whole numbers >= 0")
            checked.append((p, ts, t1, t2))
        state_changed = False
        final: str | None = None
        final_ts = recv_ms
        for p, ts, t1, t2 in checked:
            key = (base, unit, p.number)
            if p.status == 5 or p.status not in (1, 2, 3, 4):
                self.dropped["settled_deleted" if p.status == 5 else "settled_unknown_status"] += 1
                continue
            done = self.settlements.get(key)
            if done is not None and (p.settlementId is None or p.settlementId <= done):
                self.dropped["stale_settlement"] += 1
                continue
            if p.settlementId is not None:
                remember(self.settlements, key, p.settlementId)
            remember(self.settled, key, None)
            cancelled = p.status in (3, 4)
            home, away = ((t2, t1) if swap else (t1, t2)) if not cancelled else (None, None)
            for mid in sorted(self.by_gp.get(key, ())):
                u = self._settle_market(mid, home, away, ts, recv_ms)
                if u is not None:
                    batch.updates.append(u)
            if unit:
                continue
            scores = self.period_scores.get(base) or {}
            remember(self.period_scores, base, scores)
            if not cancelled and home is not None and away is not None:
                scores[p.number] = (home, away)
                state_changed = True
            if p.number == 0:
                final = "CANCELLED" if cancelled else "CLOSED"
                state_changed = True
            final_ts = max(final_ts, ts)
        if state_changed:
            self._settled_state(base, sport, final, final_ts, recv_ms, batch)

    def _settle_market(self, mid: str, home: int | None, away: int | None, ts: int,
                       recv_ms: int) -> MarketUpdate | None:
        """The update settling (scores given) or cancelling (None) one emitted market."""
        e = self.differ.emitted.get(mid)
        parts = market_id_parts(mid)
        if e is None or parts is None:
            return None
        kind, line = parts[3], parts[4]
        sels: list[Selection] = []
        for sel in e.selections.values():
            status: SelectionStatus
            void: float | None
            if home is None or away is None:
                status, void = "VOID", 1.0
            else:
                status, void = selection_result(kind, sel.selection_id, line, home, away, "draw" in e.selections)
            sels.append(msgspec.structs.replace(sel, status=status, void_factor=void))
        if home is None:
            header = msgspec.structs.replace(e.header, status="CANCELLED", suspend_reason="cancelled")
        else:
            header = msgspec.structs.replace(e.header, status="SETTLED", suspend_reason=None)
        return self.differ.emit(Rendered(market_id=mid, header=header, selections=sels, source_ts=ts,
                                         header_ts=ts), recv_ms)

    def _settled_state(self, base: int, sport: str, final: str | None, ts: int, recv_ms: int,
                       batch: NormalisedBatch) -> None:
        eid = f"{SOURCE_PREFIX}{base}"
        prev = self.states.get(eid)
        scores = self.period_scores.get(base, {})
        periods = [PeriodScore(period=period_of(sport, n) or f"p{n}", home=h, away=a)
                   for n, (h, a) in sorted(scores.items()) if n != 0]
        if 0 in scores:
            score: Score | None = Score(home=scores[0][0], away=scores[0][1], periods=periods)
        elif prev is not None and prev.score is not None:
            score = Score(home=prev.score.home, away=prev.score.away, periods=periods)
        else:
            score = None  # totals unknown yet: the periods wait for them
        if final is not None:
            status, in_play = final, False
        elif prev is not None:
            status, in_play = prev.status, prev.in_play
        else:
            status, in_play = "LIVE", True
        self._emit_state(EventState(
            event_id=eid, source=self.source, status=status,  # type: ignore[arg-type]  # (one of the literals)
            in_play=in_play, period=None if final is not None else (prev.period if prev is not None else None),
            score=score, red_cards=prev.red_cards if prev is not None else None,
            source_ts=max(ts, prev.source_ts if prev is not None else 0), received_at=recv_ms), batch)

    # -- decoding (phase 1: validate everything, apply nothing) -------------

    def _decode(self, raw: bytes) -> Response:
        try:
            return _DECODER.decode(raw)
        except msgspec.ValidationError:
            pass
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        # some part failed: decode the envelope, then each event on its own
        try:
            loose = _LOOSE_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            text = str(exc)
            raise FeedDecodeError(_reason_of(text), text, raw) from None
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        leagues = None if loose.leagues is None else [
            OddsLeague(id=lg.id, events=self._events_of(lg.events, _ODDS_EVENT_DECODER, raw)) for lg in loose.leagues]
        league = None if loose.league is None else [
            FixtureLeague(id=lg.id, name=lg.name, events=self._events_of(lg.events, _FIXTURE_EVENT_DECODER, raw))
            for lg in loose.league]
        return Response(sportId=loose.sportId, last=loose.last, leagues=leagues, league=league)

    def _events_of(self, parts: list[msgspec.Raw], decoder: msgspec.json.Decoder, raw: bytes) -> list:
        out = []
        for part in parts:
            try:
                out.append(decoder.decode(part))
            except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
                try:
                    rid: int | None = _EVENT_ID_DECODER.decode(part).id
                except (msgspec.ValidationError, *_JSON_ERRORS):
                    rid = None
                text = str(exc)
                self._reject_event(rid, FeedDecodeError(_reason_of(text), f"event {rid}: {text}", raw))
        return out

    def _reject_event(self, rid: int | None, exc: FeedDecodeError) -> None:
        if rid not in self._bad_events:
            self._bad_events[rid] = exc

    def _report_bad_events(self) -> None:
        """One ``batch.rejected`` entry per known market of each rejected
        event (one with ``market_id`` None when it has none)."""
        raw = self._raw
        for rid, exc in self._bad_events.items():
            mids = self._markets_of_event(rid) if rid is not None else []
            if not mids:
                self._rejected.append(FeedDecodeError(exc.reason, exc.detail, raw))
            for mid in mids:
                self._rejected.append(FeedDecodeError(exc.reason, exc.detail, raw, market_id=mid))
                self.differ.forget(mid)  # its change is lost: re-imaged by the next snapshot (the poller takes one)

    def _markets_of_event(self, rid: int) -> list[str]:
        fx = self.fixtures.get(rid)
        if fx is None:
            return []
        group = fx.group
        return sorted(m for (e, unit, _), mids in self.by_gp.items() if (e, unit) == group for m in mids)

    def _side(self, value: float | None, where: str, raw: bytes) -> Side | None:
        if value is None:
            return None
        return (price_to_decimal(value, self.odds_format, where, raw), value)

    def _time(self, text: str | None, where: str, raw: bytes, provider: bool = False) -> int | None:
        """An ISO time → ms (None when absent/unreadable); ``invalid_time``
        outside 1970..2100; with ``provider``, ``clock_skew`` beyond the
        future-skew bound (it becomes a ``source_ts``)."""
        try:
            ms = iso_to_ms(text)
            if provider and ms is not None:
                check_provider_time(ms, self._recv_ms, self.max_future_skew_ms, where)
        except FeedDecodeError as exc:
            raise FeedDecodeError(exc.reason, f"{where}: {exc.detail}", raw) from None
        return ms

    def _periods_of(self, msg: Response, raw: bytes, recv_ms: int) -> list[tuple[int, list[_Period]]]:
        out: list[tuple[int, list[_Period]]] = []
        for league in msg.leagues or ():
            for ev in league.events:
                try:
                    out.append((ev.id, [self._period_of(ev.id, p, raw) for p in ev.periods]))
                except FeedDecodeError as exc:
                    self._reject_event(ev.id, exc)
        return out

    def _period_of(self, rid: int, p: Period, raw: bytes) -> _Period:
        where = f"event {rid} period {p.number}"
        ml = None
        if p.moneyline is not None:
            ml = {}
            for side in ("home", "away", "draw"):
                s = self._side(getattr(p.moneyline, side), f"{where} moneyline.{side}", raw)
                if s is not None:
                    ml[side] = s
        spreads = [
            _Line(line=sp.hdp, a=self._side(sp.home, f"{where} spread {sp.hdp:g} home", raw),
                  b=self._side(sp.away, f"{where} spread {sp.hdp:g} away", raw), alt=sp.altLineId, max=sp.max)
            for sp in p.spreads or ()
        ]
        totals = [
            _Line(line=t.points, a=self._side(t.over, f"{where} total {t.points:g} over", raw),
                  b=self._side(t.under, f"{where} total {t.points:g} under", raw), alt=t.altLineId, max=t.max)
            for t in p.totals or ()
        ]
        return _Period(
            number=p.number, status=p.status, line_id=p.lineId, cutoff_ms=self._time(p.cutoff, f"{where} cutoff", raw),
            ml=ml, ml_ts=self._time(p.moneylineUpdatedAt, f"{where} moneylineUpdatedAt", raw, True), spreads=spreads,
            sp_ts=self._time(p.spreadUpdatedAt, f"{where} spreadUpdatedAt", raw, True), totals=totals,
            tot_ts=self._time(p.totalUpdatedAt, f"{where} totalUpdatedAt", raw, True),
            max_ml=p.maxMoneyline, max_spread=p.maxSpread, max_total=p.maxTotal)

    def _fixtures_of(self, msg: Response, raw: bytes) -> list[_Fixture]:
        out = []
        for league in msg.league or ():
            for ev in league.events:
                unit = (ev.resultingUnit or "Regular").strip().lower().replace(" ", "_")
                if not unit.replace("_", "").isalnum() or not unit.isascii():
                    self._reject_event(ev.id, FeedDecodeError(
                        "invalid_schema", f"resultingUnit {(ev.resultingUnit or '')[:80]!r} of event {ev.id}", raw))
                    continue
                try:
                    starts = self._time(ev.starts, f"event {ev.id} starts", raw)
                except FeedDecodeError as exc:
                    self._reject_event(ev.id, exc)
                    continue
                out.append(_Fixture(
                    id=ev.id, parent=ev.parentId if ev.parentId and ev.parentId != ev.id else None,
                    sport=msg.sportId, league=display_name(league.name), home=display_name(ev.home),
                    away=display_name(ev.away), starts=starts, live=ev.liveStatus,
                    unit="" if unit == "regular" else unit))
        return out

    # -- applying (phase 2) ---------------------------------------------------

    def _sources(self, group: tuple[int, str], number: int) -> list[int]:
        """The raw events whose lines of period ``number`` define the group's
        markets (module docstring, *identity*), ascending ids: every live
        member (liveStatus 1) that holds the period; when none does, the
        pre-match one (the highest non-live id: a duplicated parent's newer
        copy) if it holds the period; else none."""
        members = self.members.get(group)
        if not members:
            return []
        fx, odds = self.fixtures, self.odds
        live = sorted(r for r in members if fx[r].live == 1 and number in odds.get(r, ()))
        if live:
            return live
        pre = max((r for r in members if fx[r].live != 1), default=None)
        return [pre] if pre is not None and number in odds.get(pre, ()) else []

    def _set_fixture(self, fx: _Fixture) -> None:
        old = self.fixtures.get(fx.id)
        if old is not None and old.group != fx.group:
            members = self.members.get(old.group)
            if members is not None:
                members.discard(fx.id)
        self.fixtures[fx.id] = fx
        self.members.setdefault(fx.group, set()).add(fx.id)

    def _drop_fixture(self, rid: int) -> None:
        fx = self.fixtures.pop(rid, None)
        if fx is not None:
            members = self.members.get(fx.group)
            if members is not None:
                members.discard(rid)
                if not members:
                    del self.members[fx.group]
        self.odds.pop(rid, None)
        self.odds_sport.pop(rid, None)

    def _apply_fixtures(self, sport_id: int, fixtures: list[_Fixture], snapshot: bool, recv_ms: int,
                        updates: list[MarketUpdate]) -> None:
        changed: set[tuple[int, str]] = set()
        gone: dict[tuple[int, str], set[int]] = {}  # group -> periods an unlisted event held lines for
        complete = snapshot and None not in self._bad_events  # (an unreadable event: we cannot tell what is unlisted)
        if complete:
            listed = {f.id for f in fixtures} | self._bad_events.keys()
            for rid in [r for r, f in self.fixtures.items() if f.sport == sport_id and r not in listed]:
                group = self.fixtures[rid].group
                changed.add(group)
                gone.setdefault(group, set()).update(self.odds.get(rid, ()))
                self._drop_fixture(rid)
        for fx in fixtures:
            if self.fixtures.get(fx.id) == fx:
                continue
            old = self.fixtures.get(fx.id)
            if old is not None:
                changed.add(old.group)
            self._set_fixture(fx)
            changed.add(fx.group)
            self.missing_fixtures.discard(fx.id)
        for group in sorted(changed):
            self._render_group(group, recv_ms, updates, gone.get(group, set()))
        if complete:
            self._suspend_unlisted(sport_id, recv_ms, updates)

    def _suspend_unlisted(self, sport_id: int, recv_ms: int, updates: list[MarketUpdate]) -> None:
        """After a complete fixtures snapshot of ``sport_id``: suspend
        (``not_offered``, no provider time: the markets vanished from a
        snapshot) every market of that sport whose group (base event id,
        unit) no listed event belongs to; a group of an event rejected in
        the snapshot, and settled or cancelled periods, are left alone. The
        markets stay known (a settlement may still come for them); the next
        odds snapshot forgets them."""
        sport = _sport_key(sport_id)
        bad = {r for r in self._bad_events if r is not None}
        kept = {self.fixtures[r].group for r in bad if r in self.fixtures}
        for gp, mids in sorted(self.by_gp.items()):
            group = (gp[0], gp[1])
            if self.members.get(group) or group in kept or gp[0] in bad or gp in self.settled:
                continue
            for mid in sorted(mids):
                h = self.differ.header(mid)
                if h is None or h.sport != sport or h.status in CLOSED_STATUSES:
                    continue
                u = self.differ.suspend(mid, "not_offered", None, recv_ms)
                if u is not None:
                    updates.append(u)

    def _apply_odds(self, sport_id: int, events: list[tuple[int, list[_Period]]], snapshot: bool,
                    recv_ms: int, updates: list[MarketUpdate]) -> None:
        bad = self._bad_events
        complete = None not in bad  # every event of the body could at least be identified
        if snapshot and complete:
            for rid in [r for r, s in self.odds_sport.items() if s == sport_id and r not in bad]:
                del self.odds[rid]
                del self.odds_sport[rid]
        touched: dict[int, set[int]] = {}
        for rid, periods in events:
            self.odds_sport[rid] = sport_id
            held = self.odds.setdefault(rid, {})
            for p in periods:
                prev = held.get(p.number)
                if (prev is not None and p.newest_ts is not None and prev.newest_ts is not None
                        and p.newest_ts < prev.newest_ts):
                    self.dropped["stale_period"] += 1
                    continue
                held[p.number] = p
                touched.setdefault(rid, set()).add(p.number)
        rendered: set[tuple[int, str, int]] = set()
        for rid, numbers in touched.items():
            fx = self.fixtures.get(rid)
            if fx is None:
                self.missing_fixtures.add(rid)
                self.dropped["no_fixture"] += 1
                continue
            rendered.update((*fx.group, n) for n in numbers)
        for gp in sorted(rendered):  # (whichever member changed: the period is served from its sources)
            self._render_period((gp[0], gp[1]), gp[2], recv_ms, updates)
        if snapshot and complete:
            sport = _sport_key(sport_id)
            fixtures = self.fixtures
            kept = {fixtures[r].group for r in bad if r is not None and r in fixtures}  # rejected: left alone
            for gp, mids in list(self.by_gp.items()):
                if gp in rendered or (gp[0], gp[1]) in kept or gp in self.settled:
                    continue
                if self._render_period((gp[0], gp[1]), gp[2], recv_ms, updates):
                    continue
                for mid in sorted(mids):
                    h = self.differ.header(mid)
                    if h is None or h.sport != sport:
                        continue
                    u = self.differ.suspend(mid, "not_offered", None, recv_ms)
                    if u is not None:
                        updates.append(u)
                    self.differ.forget(mid)
                    mids.discard(mid)
                if not mids:
                    del self.by_gp[gp]

    def _render_group(self, group: tuple[int, str], recv_ms: int, updates: list[MarketUpdate],
                      gone: set[int] | None = None) -> None:
        """After a fixture change: re-render every period some member has
        lines for (its sources may have changed: a live event listed or
        gone); a period in ``gone`` (period numbers an event no longer
        listed held lines for) that no member holds now is SUSPENDED
        (``not_offered``, no provider time); elsewhere only refresh the
        names and times. A group left without members is
        :meth:`_suspend_unlisted`'s."""
        members = self.members.get(group)
        if not members:
            return
        numbers = {n for r in members for n in self.odds.get(r, ())}
        numbers.update(n for (e, unit, n) in self.by_gp if (e, unit) == group)
        held = {n for n in sorted(numbers) if self._render_period(group, n, recv_ms, updates)}
        fx = self.fixtures[max(members)]
        base = self.fixtures.get(group[0], fx)
        for (e, unit, n), mids in self.by_gp.items():
            if (e, unit) != group or n in held:
                continue
            if gone and n in gone:  # (not settled: _render_period held those)
                for mid in sorted(mids):
                    h = self.differ.header(mid)
                    if h is not None and h.status not in CLOSED_STATUSES:
                        u = self.differ.suspend(mid, "not_offered", None, recv_ms)
                        if u is not None:
                            updates.append(u)
                continue
            for mid in sorted(mids):
                h = self.differ.header(mid)
                if h is None:
                    continue
                new = msgspec.structs.replace(h, competition=fx.league or base.league,
                                              event_name=_event_name(base), start_time=base.starts)
                u = self.differ.update_header(mid, new, recv_ms)
                if u is not None:
                    updates.append(u)

    def _render_period(self, group: tuple[int, str], number: int, recv_ms: int,
                       updates: list[MarketUpdate]) -> bool:
        """Render period ``number`` of ``group`` from its sources
        (:meth:`_sources`) and emit what changed; a market none of them
        offers any more is SUSPENDED (``not_offered``). Each market takes
        its status from the period of the event that supplies it. Two live
        events pricing the same market (Pinnacle never offers one market on
        both at once: the other's is a leftover) → the event whose period
        changed last, then the higher id. Returns False when no source holds
        the period (nothing done); True otherwise, settled periods included."""
        key = (group[0], group[1], number)
        if key in self.settled:
            return True  # settled or cancelled: its results stand, whatever the odds still say
        sources = self._sources(group, number)
        if not sources:
            return False
        now: dict[str, tuple[Rendered, _Period, tuple[int, int]]] = {}
        newest: int | None = None
        for rid in sources:
            period = self.odds[rid][number]
            fx = self.fixtures[rid]
            base = self.fixtures.get(group[0], fx)
            rank = (period.newest_ts or 0, rid)
            if period.newest_ts is not None:
                newest = max(newest or 0, period.newest_ts)
            for r in self._markets_of(group, period, fx, base, recv_ms):
                # a new lineId (any change in the period) dates from the period's newest change; a
                # period past its cutoff, from the cutoff at the earliest
                r.header_ts = period.newest_ts
                if r.header.suspend_reason == "past_cutoff" and period.cutoff_ms is not None:
                    r.header_ts = max(r.header_ts or 0, period.cutoff_ms)
                held = now.get(r.market_id)
                if held is None or rank > held[2]:
                    now[r.market_id] = (r, period, rank)
        for r, period, _ in now.values():
            try:  # the bounds every update must meet (checked on the event already: a safety net)
                check_market(r.market_id, r.header, r.selections, None, max(r.source_ts, r.header_ts or 0), None,
                             self._recv_ms, self.max_future_skew_ms)
            except FeedDecodeError as exc:
                exc.raw = self._raw
                self._rejected.append(exc)
                continue
            u = self.differ.emit(r, recv_ms)
            if u is not None:
                updates.append(u)
            if r.header.status == "OPEN":
                self._watch_cutoff(r.market_id, period.cutoff_ms)
        known = self.by_gp.setdefault(key, set())
        ts = newest or recv_ms
        for mid in sorted(known - now.keys()):
            u = self.differ.suspend(mid, "not_offered", ts, recv_ms)
            if u is not None:
                updates.append(u)
        known.update(now)
        return True

    def _watch_cutoff(self, market_id: str, cutoff_ms: int | None) -> None:
        """Remember the cutoff of an OPEN market's period (None: it has none)."""
        if cutoff_ms is None:
            self.cutoffs.pop(market_id, None)
        elif self.cutoffs.get(market_id) != cutoff_ms:
            self.cutoffs[market_id] = cutoff_ms
            heapq.heappush(self._cutoff_heap, (cutoff_ms, market_id))

    def _expire_cutoffs(self, recv_ms: int, updates: list[MarketUpdate]) -> None:
        """Suspend (``past_cutoff``) every OPEN market whose period's cutoff
        is at or before ``recv_ms`` (ms, the answer's receipt), whether or not
        the answer mentions it: Pinnacle sends a period again only when it
        changes, and a market is open only while its cutoff is ahead. The
        update is stamped with the cutoff (its provider time)."""
        heap, cutoffs = self._cutoff_heap, self.cutoffs
        while heap and heap[0][0] <= recv_ms:
            cutoff, mid = heapq.heappop(heap)
            if cutoffs.get(mid) != cutoff:
                continue  # re-rendered since with another cutoff (or none)
            del cutoffs[mid]
            h = self.differ.header(mid)
            if h is None or h.status != "OPEN":
                continue
            u = self.differ.suspend(mid, "past_cutoff", cutoff, recv_ms)
            if u is not None:
                updates.append(u)

    def _markets_of(self, group: tuple[int, str], p: _Period, fx: _Fixture, base: _Fixture,
                    recv_ms: int) -> list[Rendered]:
        e, unit = group
        prefix = f"{SOURCE_PREFIX}{e}:{p.number}:" + (f"{unit}:" if unit else "")
        if p.status != 1:
            status, reason = "SUSPENDED", "offline"
        elif p.cutoff_ms is not None and p.cutoff_ms <= recv_ms:
            status, reason = "SUSPENDED", "past_cutoff"
        else:
            status, reason = "OPEN", None
        common: dict[str, Any] = dict(event_id=f"{SOURCE_PREFIX}{e}", bookmaker=self.bookmaker, sport=_sport_key(fx.sport),
                      competition=fx.league or base.league, event_name=_event_name(base), status=status,
                      suspend_reason=reason, in_play=fx.live == 1, start_time=base.starts)
        suffix = "" if p.number == 0 else f" (period {p.number})"
        base_spec: dict[str, str] = {}  # canonical specifiers (feed.taxonomy)
        period = period_of(common["sport"], p.number)
        if period is not None:
            base_spec["period"] = period
        if unit:
            base_spec["unit"] = unit.lower()
        fmt = self.odds_format
        out: list[Rendered] = []
        home, away = base.home or "Home", base.away or "Away"
        if p.ml:
            sels = []
            for side, name in (("home", home), ("away", away), ("draw", "Draw")):
                s = p.ml.get(side)
                if s is not None:
                    sels.append(make_selection(side, name, s[0], raw_price=s[1], odds_format=fmt, max_stake=p.max_ml,
                                               outcome=side))
            out.append(Rendered(
                market_id=prefix + "moneyline",
                header=MarketHeader(**common, name="Moneyline" + suffix,
                                    market_type="match_result" if "draw" in p.ml else "moneyline",
                                    market_type_raw="moneyline", specifiers=dict(base_spec) or None,
                                    version=p.line_id or 0),
                selections=sels, source_ts=p.ml_ts or recv_ms))
        for ln in p.spreads:
            if ln.a is None and ln.b is None:
                continue
            hdp = fmt_line(ln.line)
            sels = []
            if ln.a is not None:
                sels.append(make_selection("home", home, ln.a[0], raw_price=ln.a[1], odds_format=fmt,
                                           handicap=ln.line, max_stake=ln.max or p.max_spread, outcome="home"))
            if ln.b is not None:
                sels.append(make_selection("away", away, ln.b[0], raw_price=ln.b[1], odds_format=fmt,
                                           handicap=-ln.line if ln.line else 0.0, max_stake=ln.max or p.max_spread,
                                           outcome="away"))
            out.append(Rendered(
                market_id=f"{prefix}spread:{hdp}",
                header=MarketHeader(**common, name=f"Handicap {hdp}{suffix}", market_type="handicap",
                                    market_type_raw="spreads", specifiers={**base_spec, "line": line_text(ln.line)},
                                    version=ln.alt or p.line_id or 0),
                selections=sels, source_ts=p.sp_ts or recv_ms))
        for ln in p.totals:
            if ln.a is None and ln.b is None:
                continue
            pts = fmt_line(ln.line)
            sels = []
            if ln.a is not None:
                sels.append(make_selection("over", f"Over {pts}", ln.a[0], raw_price=ln.a[1], odds_format=fmt,
                                           max_stake=ln.max or p.max_total, outcome="over"))
            if ln.b is not None:
                sels.append(make_selection("under", f"Under {pts}", ln.b[0], raw_price=ln.b[1], odds_format=fmt,
                                           max_stake=ln.max or p.max_total, outcome="under"))
            out.append(Rendered(
                market_id=f"{prefix}total:{pts}",
                header=MarketHeader(**common, name=f"Total {pts}{suffix}", market_type="total",
                                    market_type_raw="totals", specifiers={**base_spec, "line": line_text(ln.line)},
                                    version=ln.alt or p.line_id or 0),
                selections=sels, source_ts=p.tot_ts or recv_ms))
        return out


def _whole(x: float | None) -> int | None:
    """A provider score (a double holding a whole number) → int; None when
    absent, negative, fractional or not finite."""
    if x is None or not (0 <= x <= 1e9) or x != int(x):
        return None
    return int(x)


def _half_result(margin: float) -> int:
    return 1 if margin > 0 else -1 if margin < 0 else 0


def line_result(margin: float) -> tuple[SelectionStatus, float | None]:
    """The result of a bet whose score difference with its handicap applied
    is ``margin`` (positive = ahead): WINNER / LOSER, or VOID on a push
    (``void_factor`` 1.0). An Asian quarter line (``margin`` ending in .25
    or .75) is two half-stakes on the neighbouring half lines: half won and
    half pushed → (WINNER, 0.5), half lost and half pushed → (LOSER, 0.5)."""
    if (margin * 4) % 2 == 1:  # a quarter line
        a, b = _half_result(margin - 0.25), _half_result(margin + 0.25)
        if a == b:
            return ("WINNER", None) if a > 0 else ("LOSER", None) if a < 0 else ("VOID", 1.0)
        if 1 in (a, b):
            return "WINNER", 0.5
        return "LOSER", 0.5
    r = _half_result(margin)
    return ("WINNER", None) if r > 0 else ("LOSER", None) if r < 0 else ("VOID", 1.0)


def selection_result(kind: str, selection_id: str, line: str | None, home: int, away: int,
                     has_draw: bool) -> tuple[SelectionStatus, float | None]:
    """(status, void_factor) of one selection of a settled Pinnacle market:
    ``kind`` moneyline / spread / total, ``line`` the home side's handicap or
    the total's points (as in the market id), ``home`` / ``away`` the period's
    scores. A two-way moneyline tied is VOID for both sides."""
    if kind == "moneyline":
        if selection_id == "draw":
            return ("WINNER", None) if home == away else ("LOSER", None)
        diff = home - away if selection_id == "home" else away - home
        if has_draw:
            return ("WINNER", None) if diff > 0 else ("LOSER", None)
        return line_result(diff)
    points = float(line) if line is not None else 0.0
    if kind == "spread":
        margin = home - away + points
        return line_result(margin if selection_id == "home" else -margin)
    total = home + away - points
    return line_result(total if selection_id == "over" else -total)


def _event_name(fx: _Fixture) -> str | None:
    if fx.home and fx.away:
        return f"{fx.home} v {fx.away}"
    return fx.home or fx.away


def channel(endpoint: Literal["fixtures", "odds", "settled", "leagues"], sport_id: int | None, *,
            snapshot: bool, asked_before_ms: int = 0) -> str:
    """The :class:`~feed.sources.base.Payload` channel of a Pinnacle answer:
    ``<endpoint>:<sportId>:snapshot|since`` (sportId empty: not checked),
    ``<endpoint>:<sportId>:snapshot:<ms>`` when a snapshot call was sent
    ``asked_before_ms`` (int ms, 0..999999999) before its answer was read:
    what the answer's age is counted from (see :data:`SNAPSHOT_CACHE_MS`).
    Raises ValueError for ``asked_before_ms`` out of range or given to a delta."""
    mode = "snapshot" if snapshot else "since"
    if asked_before_ms:
        if not snapshot or not 0 < asked_before_ms <= 999_999_999:
            raise ValueError(f"asked_before_ms {asked_before_ms!r}: only a snapshot's, 0..999999999")
        mode = f"snapshot:{asked_before_ms}"
    return f"{endpoint}:{'' if sport_id is None else sport_id}:{mode}"


def _parse_channel(value: str, raw: bytes) -> tuple[str, bool, int | None, int] | None:
    """A :func:`channel` → (endpoint, snapshot, sportId or None, asked_before_ms); None for ``""``.
    Raises FeedDecodeError (``invalid_schema``) for anything else."""
    if not value:
        return None
    endpoint, _, rest = value.partition(":")
    sport, _, rest = rest.partition(":")
    mode, sep, before = rest.partition(":")
    if endpoint not in ("fixtures", "odds", "settled", "leagues") or mode not in ("snapshot", "since") \
            or not (sport.isdigit() or not sport) \
            or (sep and not (mode == "snapshot" and before.isdigit() and len(before) <= 9)):
        raise FeedDecodeError("invalid_schema", f"channel {value[:60]!r} is not "
                              "<fixtures|odds|settled|leagues>:<sportId>:<snapshot[:<ms>]|since>", raw)
    return endpoint, mode == "snapshot", int(sport) if sport else None, int(before) if sep else 0


def decode_cursor(value: str | None) -> PinnacleCursor:
    """The stored cursor (empty when absent or unreadable): ``since`` per
    endpoint and sportId, for the source to send."""
    if value:
        try:
            return msgspec.json.decode(value, type=PinnacleCursor)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
    return PinnacleCursor()


def from_spec(spec: SourceSpec, settings: Settings) -> PinnacleNormaliser:
    """The registry's normaliser factory for ``pinnacle`` sources
    (``odds_format=decimal|american``)."""
    return PinnacleNormaliser(spec.name, odds_format=odds_format_of(spec))
