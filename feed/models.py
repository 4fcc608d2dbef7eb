"""Canonical model: every provider is normalised into these Structs.

Shapes and units (DESIGN §3):

- ids are strings namespaced by source: market ``bf:1.206064380``, event
  ``bf:31880539``; a selection id is the provider's id, with ``:<handicap>``
  appended when the provider keys runners by (id, handicap) and the handicap
  is not 0 (Betfair Asian handicap markets): ``47972``, ``47972:-0.25``.
- prices are **decimal odds** (> 1.0, Betfair ladder 1.01–1000); sizes and
  volumes are in the market's currency units as the provider gives them.
- ladders are ``[[price, size], …]`` best first (back: highest price first,
  lay: lowest price first), at most ``ladder_depth`` levels.
- every time is an **integer number of milliseconds since the Unix epoch
  (UTC)**: ``source_ts`` (provider publish/change time, Betfair ``pt``),
  ``received_at`` (ingest read the bytes; a poller's answer: as of its
  request, less its age in a cache — ``Payload.age_ms``), ``stored_at`` (ingest handed the
  change to Redis). ``source_ts_original`` keeps the recording's own clock
  when a replay maps it onto now.

A :class:`Delta` carries only what changed: a changed market header (all
market-level fields, small) and, per changed selection, a
:class:`SelectionChange` holding its id and only the fields that changed (a
ladder side travels whole when any level of it changed, and not at all
otherwise), so a consumer applies it field by field (:func:`apply_delta`).
``kind="image"`` carries the whole market and replaces it. ``seq`` is per
market, strictly increasing, assigned by ``feed.book``; a delta applies only
to the market at ``seq - 1`` (a consumer that misses one resyncs: the README's
seq-gap rule).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

EventStatus = Literal[
    "NOT_STARTED", "LIVE", "SUSPENDED", "ENDED", "CLOSED", "CANCELLED",
    "POSTPONED", "INTERRUPTED", "ABANDONED", "DELAYED",
]
#: Event statuses after which the event's state no longer changes (its score is final).
FINAL_EVENT_STATUSES: frozenset[str] = frozenset({"ENDED", "CLOSED", "CANCELLED", "ABANDONED"})
MarketStatus = Literal["OPEN", "SUSPENDED", "INACTIVE", "CLOSED", "SETTLED", "CANCELLED"]
SelectionStatus = Literal["ACTIVE", "SUSPENDED", "REMOVED", "WINNER", "LOSER", "PLACED", "VOID", "HIDDEN"]
SourceState = Literal["UP", "DEGRADED", "DOWN"]
DeltaKind = Literal["image", "delta"]

#: Market statuses after which no price may be taken and no delta is applied.
CLOSED_STATUSES: frozenset[str] = frozenset({"CLOSED", "SETTLED", "CANCELLED"})

Ladder = list[tuple[float, float]]


class Selection(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One selection (runner) of a market.

    price: best decimal odds to back (exchanges: best ``back`` level;
    bookmakers: the offered price), ``None`` when nothing is offered.
    price_raw: the provider's own price text when it was not decimal
    (American ``"-115"``, fractional ``"5/2"``), else None.
    back / lay: ``[[price, size], …]`` best first. ltp: last traded decimal
    price. traded_volume: total matched on this selection.
    void_factor: the share of a stake refunded at settlement, 0–1 (a fraction,
    not percent): ``1.0`` with status VOID (the bet is void), ``0.5`` with
    WINNER / LOSER on an Asian quarter line (half the stake refunded, the
    other half won / lost); None when the provider gives none.
    dead_heat_factor: the share of a WINNER's (or PLACED's) payout paid after
    a dead heat, in (0, 1] (``0.5``: two runners tied for one place; UOF
    ``dead_heat_factor``); None when there was no dead heat or the provider
    gives none.
    """

    selection_id: str
    name: str | None = None
    handicap: float = 0.0
    status: SelectionStatus = "ACTIVE"
    price: float | None = None
    back: Ladder = []
    lay: Ladder = []
    ltp: float | None = None
    traded_volume: float | None = None
    max_stake: float | None = None
    sort_priority: int | None = None
    adjustment_factor: float | None = None
    bsp: float | None = None
    price_raw: str | None = None
    outcome: str | None = None
    void_factor: float | None = None
    dead_heat_factor: float | None = None


class SelectionChange(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One changed selection in a :class:`Delta`: its id and the fields of
    :class:`Selection` that changed, nothing else.

    A field that is present holds its new value (shapes and units as in
    :class:`Selection`): ``"back": []`` means nothing is offered to back any
    more, ``"ltp": null`` that there is no last traded price. A field that is
    absent (:data:`msgspec.UNSET` here) did not change. ``back`` / ``lay``
    travel whole — every level, best first — when any level of that side
    changed. A selection new to the market is sent with every field (a
    consumer builds it from the fields present, absent ones taking
    :class:`Selection`'s defaults). Applied by :func:`apply_selection_change`;
    built by :func:`selection_change`. Delta log entries written before this
    type existed hold every field of each selection, so they apply the same
    way (all fields replaced).
    """

    selection_id: str
    name: str | None | UnsetType = UNSET
    handicap: float | UnsetType = UNSET
    status: SelectionStatus | UnsetType = UNSET
    price: float | None | UnsetType = UNSET
    back: Ladder | UnsetType = UNSET
    lay: Ladder | UnsetType = UNSET
    ltp: float | None | UnsetType = UNSET
    traded_volume: float | None | UnsetType = UNSET
    max_stake: float | None | UnsetType = UNSET
    sort_priority: int | None | UnsetType = UNSET
    adjustment_factor: float | None | UnsetType = UNSET
    bsp: float | None | UnsetType = UNSET
    price_raw: str | None | UnsetType = UNSET
    outcome: str | None | UnsetType = UNSET
    void_factor: float | None | UnsetType = UNSET
    dead_heat_factor: float | None | UnsetType = UNSET


#: The fields of a selection other than its id (those a SelectionChange may carry).
SELECTION_FIELDS: tuple[str, ...] = Selection.__struct_fields__[1:]
assert SelectionChange.__struct_fields__ == Selection.__struct_fields__

# fields that seldom change, compared together (selection_change: by identity first, the same
# semantics as the tuple comparison, which also takes identical items as equal)
_RARE_FIELDS = ("name", "handicap", "status", "max_stake", "sort_priority", "adjustment_factor", "bsp",
                "price_raw", "outcome", "void_factor", "dead_heat_factor")
_rare = attrgetter(*_RARE_FIELDS)


def selection_change(old: Selection | None, new: Selection) -> SelectionChange | None:
    """What a delta carries for ``new`` when a consumer holds ``old``: the
    fields of ``new`` that differ from ``old`` (a ladder side whole, when any
    level of it differs), every field when ``old`` is None (a new selection),
    or None when nothing differs. ``apply_selection_change(old, result)``
    equals ``new``."""
    if old is None:
        return whole_change(new)
    if old is new:  # a normaliser hands out the same (frozen) Selection while nothing of it changed
        return None
    u: Any = UNSET
    back: Any = new.back
    x = old.back
    if back is x or back == x:  # an unchanged side is usually the very same list
        back = u
    lay: Any = new.lay
    x = old.lay
    if lay is x or lay == x:
        lay = u
    price: Any = new.price
    if price == old.price:
        price = u
    ltp: Any = new.ltp
    if ltp == old.ltp:
        ltp = u
    tv: Any = new.traded_volume
    if tv == old.traded_volume:
        tv = u
    # the rare fields are usually the very same objects (a normaliser copies them from its cache):
    # unchanged without building the tuples
    if not (new.name is old.name and new.handicap is old.handicap and new.status is old.status
            and new.max_stake is old.max_stake and new.sort_priority is old.sort_priority
            and new.adjustment_factor is old.adjustment_factor and new.bsp is old.bsp
            and new.price_raw is old.price_raw and new.outcome is old.outcome
            and new.void_factor is old.void_factor and new.dead_heat_factor is old.dead_heat_factor):
        rare_new = _rare(new)
        rare_old = _rare(old)
        if rare_new != rare_old:
            rare = {f: b for f, a, b in zip(_RARE_FIELDS, rare_old, rare_new) if a != b}
            return SelectionChange(selection_id=new.selection_id, back=back, lay=lay, price=price, ltp=ltp,
                                   traded_volume=tv, **rare)
    if back is u and lay is u and price is u and ltp is u and tv is u:
        return None
    return SelectionChange(selection_id=new.selection_id, back=back, lay=lay, price=price, ltp=ltp,
                           traded_volume=tv)


def whole_change(sel: Selection) -> SelectionChange:
    """``sel`` as a change carrying every field (a new selection, or a merge
    of several changes: see :class:`SelectionChange`)."""
    return SelectionChange(**msgspec.structs.asdict(sel))


def apply_selection_change(current: Selection | None, change: SelectionChange) -> Selection:
    """``current`` with the fields present in ``change`` replaced (the
    others kept); a selection built from ``change``'s fields (absent ones
    at their defaults) when ``current`` is None."""
    fields = _present(change)
    if current is None:
        return Selection(selection_id=change.selection_id, **fields)
    return msgspec.structs.replace(current, **fields) if fields else current


def _present(c: SelectionChange) -> dict[str, Any]:
    """The fields ``c`` carries (written out: 2× faster than a loop over getattr)."""
    u: Any = UNSET
    out: dict[str, Any] = {}
    v: Any = c.name
    if v is not u:
        out["name"] = v
    v = c.handicap
    if v is not u:
        out["handicap"] = v
    v = c.status
    if v is not u:
        out["status"] = v
    v = c.price
    if v is not u:
        out["price"] = v
    v = c.back
    if v is not u:
        out["back"] = v
    v = c.lay
    if v is not u:
        out["lay"] = v
    v = c.ltp
    if v is not u:
        out["ltp"] = v
    v = c.traded_volume
    if v is not u:
        out["traded_volume"] = v
    v = c.max_stake
    if v is not u:
        out["max_stake"] = v
    v = c.sort_priority
    if v is not u:
        out["sort_priority"] = v
    v = c.adjustment_factor
    if v is not u:
        out["adjustment_factor"] = v
    v = c.bsp
    if v is not u:
        out["bsp"] = v
    v = c.price_raw
    if v is not u:
        out["price_raw"] = v
    v = c.outcome
    if v is not u:
        out["outcome"] = v
    v = c.void_factor
    if v is not u:
        out["void_factor"] = v
    v = c.dead_heat_factor
    if v is not u:
        out["dead_heat_factor"] = v
    return out


assert _present(whole_change(Selection(selection_id=""))).keys() == set(SELECTION_FIELDS)  # none left out


class _MarketFields(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The market-level fields shared by :class:`MarketHeader` and :class:`Market`.

    start_time: scheduled start, ms since the epoch. bet_delay_s: in-play
    bet delay, seconds. version: the provider's definition version.
    traded_volume: total matched on the market.
    """

    event_id: str | None = None
    bookmaker: str | None = None
    sport: str | None = None
    competition: str | None = None
    event_name: str | None = None
    name: str | None = None
    market_type: str | None = None
    market_type_raw: str | None = None
    specifiers: dict[str, str] | None = None
    status: MarketStatus = "OPEN"
    suspend_reason: str | None = None
    in_play: bool = False
    bet_delay_s: int = 0
    start_time: int | None = None
    version: int = 0
    traded_volume: float | None = None
    number_of_winners: int | None = None
    country_code: str | None = None
    venue: str | None = None


class MarketHeader(_MarketFields, frozen=True, kw_only=True, gc=False):
    """Market-level fields (everything of a :class:`Market` but its id,
    source, selections and latency tags). Sent whole in a delta when any
    changed."""


HEADER_FIELDS: tuple[str, ...] = MarketHeader.__struct_fields__


class Market(_MarketFields, frozen=True, kw_only=True, gc=False):
    """A book's market: the snapshot stored in Redis (``of:{p}:m:<id>``).

    Header fields are as :class:`MarketHeader`; ``seq`` is the last applied
    delta's sequence number; latency tags are integer ms since the epoch.
    session: the upstream session (image lineage) of its source that last
    imaged or updated the market, None once an update of it was rejected or
    dropped; the source's heartbeats confirm the market only while this is
    the source's current ``SourceHealth.session``.
    """

    market_id: str
    source: str
    seq: int = 0
    source_ts: int = 0
    source_ts_original: int | None = None
    received_at: int = 0
    stored_at: int = 0
    session: str | None = None
    selections: list[Selection] = []

    def header(self) -> MarketHeader:
        """The market-level fields of this market."""
        return MarketHeader(**{f: getattr(self, f) for f in HEADER_FIELDS})

    def selection(self, selection_id: str) -> Selection | None:
        """The selection with ``selection_id``, or None."""
        for sel in self.selections:
            if sel.selection_id == selection_id:
                return sel
        return None


# -- event state: scores, clock, period ----------------------------------------------------------

HomeAway = Literal["home", "away"]


class PeriodScore(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The score of one period. period: a period code (see :class:`EventState`);
    home / away: points, goals or runs scored in it (non-negative ints)."""

    period: str
    home: int
    away: int


class Score(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event's score. home / away: the running (or final) totals in the
    sport's unit — goals, points, runs, sets for tennis — as non-negative ints.
    periods: per-period scores in the order they were played, as the provider
    gives them (they may overlap: Pinnacle settles basketball halves *and*
    quarters; [] when the provider gives only totals)."""

    home: int
    away: int
    periods: list[PeriodScore] = []


class Clock(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The match clock as read at ``at``.

    seconds: elapsed match time in seconds at ``at`` (soccer 23:10 → 1390;
    counts up across periods as the sport counts it: 45:00 at the start of
    a soccer second half). running: the clock was running at ``at``; a
    client extrapolates ``seconds + (now − at) / 1000`` while it runs (no
    message per second) and shows ``seconds`` while it is stopped.
    at: int ms since the epoch (provider time) the reading refers to.
    remaining_s: seconds left in the current period (count-down sports:
    basketball quarters), None when not given. stoppage_s: stoppage /
    added time played or announced, seconds, None when not given.
    """

    seconds: int
    running: bool
    at: int
    remaining_s: int | None = None
    stoppage_s: int | None = None


class TeamCounts(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A count per side (red cards): non-negative ints."""

    home: int = 0
    away: int = 0


class Innings(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One cricket innings. number: 1, 2 …; team: the batting side
    (``home`` / ``away``; None when the provider has not named it yet);
    runs, wickets: non-negative ints; balls: legal deliveries bowled
    (overs × 6 + balls: Betfair's ``"19.4"`` overs → 118)."""

    number: int
    team: HomeAway | None = None
    runs: int = 0
    wickets: int = 0
    balls: int = 0


class RaceRunner(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One runner's place in a race as last tracked (Betfair TPD ``rrc``).

    selection_id: the race market's selection id (``"7390417"``).
    distance_m: metres to the finish, ≥ 0 (0 once past it). speed_mps:
    ground speed, m/s (None: not given). at: the tracking time of the
    reading, int ms since the epoch (provider time).
    """

    selection_id: str
    distance_m: float
    speed_mps: float | None = None
    at: int = 0


class RaceProgress(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A race's progress (Betfair Total Performance Data, the ``rcm`` stream).

    race_id: the provider's race id (Betfair: ``<meeting event id>.<HHMM of
    the scheduled start, UTC>``, ``"28587288.1650"``). market_id: the race's
    market the provider names (``bf:1.173853449``). gate: the last timing
    gate the leader passed (``Start``, ``7f`` … ``1f``, ``Finish``; None:
    none yet). distance_m: the leader's metres to the finish (0 once
    finished). leader_speed_mps: m/s. sectional_s: time of the last
    section, seconds. order: selection ids in running order, leader first
    (the finishing order once finished — the result is the market's
    settlement, not this). runners: every tracked runner, nearest the
    finish first.
    """

    race_id: str
    market_id: str | None = None
    gate: str | None = None
    distance_m: float | None = None
    leader_speed_mps: float | None = None
    sectional_s: float | None = None
    order: list[str] = []
    runners: list[RaceRunner] = []


class EventState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The state of one provider event: status, period, clock, score, cards,
    cricket innings, race progress — what the provider gives, nothing derived.

    event_id: the provider event id markets carry in ``Market.event_id``
    (``bf:31573045``, ``pn:1590000001``, ``uof:sr:match:1001``).
    source: the ingest source that wrote it. status / in_play: the event's
    status (:data:`EventStatus`) and whether it is being played.
    period: the current period as a lowercase code, the same vocabulary as
    the markets' ``period`` specifier (:mod:`feed.taxonomy`): ``1h``,
    ``2h``, ``q1``–``q4``, ``p1``–``p3``, ``set1``…, plus the states between
    and after periods: ``ht`` (half time), ``et`` (extra time), ``pen``
    (penalties), ``ot`` (overtime), ``break``, cricket ``innings1``,
    ``innings2`` …; None when not in play or not given.
    clock: see :class:`Clock` (None: the provider gives none).
    score: see :class:`Score` (None: not given). red_cards: per side (None:
    not given). innings: cricket innings in order ([] for other sports).
    race: a race's progress (:class:`RaceProgress`; None for other events).
    A race's state is keyed by the race, not its meeting: ``event_id`` is
    ``bf:<race id>`` (``bf:28587288.1650``), and it belongs to the markets
    of the meeting's event whose scheduled start is that race's
    (:func:`feed.taxonomy.race_event_id` of a market gives it).
    source_ts / received_at: the provider's time of the state and when the
    ingest read it (a poller's answer: as of its request, less its age in a
    cache), int ms since the epoch (UTC); source_ts_original: a
    replay's own clock when it was mapped onto now. version: per event,
    strictly increasing, assigned by the ingest when it stores a changed
    state (a consumer that holds version v ignores anything ≤ v).
    lost: True when the ingest rejected a later state of the event alone
    (out of bounds): this is the last state it held, written again with the
    next version to say a change of the event may be lost — readers take it
    as stale (final or not) until a newer good state replaces it (written
    without the mark). Absent otherwise (:data:`msgspec.UNSET`: old records
    and the wire stay as they were); only the ingest sets it.
    """

    event_id: str
    source: str
    status: EventStatus = "NOT_STARTED"
    in_play: bool = False
    period: str | None = None
    clock: Clock | None = None
    score: Score | None = None
    red_cards: TeamCounts | None = None
    innings: list[Innings] = []
    race: RaceProgress | None = None
    source_ts: int = 0
    received_at: int = 0
    source_ts_original: int | None = None
    version: int = 0
    lost: bool | UnsetType = UNSET

    def same_content(self, other: EventState | None) -> bool:
        """True when ``other`` says the same as this state (status, in-play,
        period, clock, score, cards, innings, race), whatever the times and version
        — and both or neither are marked :attr:`lost` (a good state clears the mark
        even when it says what the marked one said)."""
        return (other is not None and self.event_id == other.event_id and self.status == other.status
                and self.in_play == other.in_play and self.period == other.period and self.clock == other.clock
                and self.score == other.score and self.red_cards == other.red_cards
                and self.innings == other.innings and self.race == other.race
                and (self.lost is True) == (other.lost is True))

    @property
    def provider_ts(self) -> int:
        """The provider's own time of this state: a replay's original clock when set, else ``source_ts``."""
        return self.source_ts if self.source_ts_original is None else self.source_ts_original


class Delta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One change of one market, as appended to the delta log.

    kind="image": ``market`` is the whole market (replace). kind="delta":
    ``header`` is set when a market-level field other than the market's
    traded volume changed; ``traded_volume`` is set when only that moved
    (it changes with nearly every trade); ``selections`` holds a
    :class:`SelectionChange` per changed selection (only its changed fields,
    applied in order). Latency tags in integer ms. session: the
    market's confirmation session after this delta (see :class:`Market`); a
    delta without changes only moves ``session`` (re-confirmed by a new
    upstream image, or unconfirmed after a rejected update).
    """

    market_id: str
    seq: int
    kind: DeltaKind
    source: str
    source_ts: int
    received_at: int
    stored_at: int = 0
    source_ts_original: int | None = None
    session: str | None = None
    market: Market | None = None
    header: MarketHeader | None = None
    selections: list[SelectionChange] = []
    traded_volume: float | None = None


class SourceHealth(msgspec.Struct, kw_only=True):
    """Health of one upstream source, persisted in Redis (``of:src:<name>``).

    state: UP / DEGRADED / DOWN; reason: heartbeat_missed, upstream_503,
    reconnecting, recovering, rate_limited, quota_exhausted, finished, …;
    last_message_at: ms since the epoch of the last message (data or
    heartbeat); stale_after_ms: markets older than this are stale.
    lag_p50_ms / lag_p99_ms: ingest lag (``received_at − source_ts``) over a
    recent window, ms. lease_ms: the record is only good until
    ``updated_at + lease_ms`` (the ingest renews it about once a second; see
    :func:`effective_health`). session: the current upstream session (image
    lineage); heartbeats confirm only the markets of this session.
    max_lag_ms: for a source whose messages carry live provider times (ESA
    ``pt``, push, UOF), how late after its provider time a change may arrive
    and still count from its arrival: a reader takes a market's change as
    current at ``min(received_at, source_ts + max_lag_ms)`` — a backlog
    delivered after a stall is as old as it was published, not as fresh as
    its arrival (0: no such bound, e.g. polled snapshots).
    states_confirmed_at: ms since the epoch up to which the source's event
    states (scores, clock) are confirmed — everything it received about them
    up to then is stored. A source whose messages carry its states advances it
    with ``last_message_at``; one whose states come from calls of their own
    (The Odds API's ``/scores``) only when those succeed, so a failing scores
    call never lets an odds poll vouch for a frozen score. None (a record
    written before the field existed): ``last_message_at`` stands for it
    (:func:`states_confirmed_at`).
    """

    source: str
    kind: str = "betfair"
    state: SourceState = "UP"
    reason: str | None = None
    last_message_at: int = 0
    stale_after_ms: int = 0
    cursor: str | None = None
    messages: int = 0
    runner_changes: int = 0
    rejected: int = 0
    updated_at: int = 0
    lag_p50_ms: int | None = None
    lag_p99_ms: int | None = None
    lease_ms: int = 0
    session: str | None = None
    max_lag_ms: int = 0
    states_confirmed_at: int | None = None


def states_confirmed_at(h: SourceHealth) -> int:
    """Up to when (ms since the epoch) ``h``'s source confirmed its event states:
    its ``states_confirmed_at``, or ``last_message_at`` in a record without it."""
    return h.last_message_at if h.states_confirmed_at is None else h.states_confirmed_at


#: Reason of a source whose ingest stopped renewing its health lease.
INGEST_GONE = "ingest_gone"
#: Reason of a source whose health record was stamped ahead of the reader's clock by more than
#: :data:`MAX_CLOCK_SKEW_MS`: the ingest host's clock runs ahead, so ages and the lease measured
#: against it would read younger than they are (a dead ingest would look alive for the skew).
CLOCK_SKEW = "clock_skew"
#: How far (ms) an ingest's timestamps may run ahead of a reader's clock before its prices are
#: no longer vouched for (hosts kept in step by NTP differ by a few ms).
MAX_CLOCK_SKEW_MS = 1000


def lease_expired(h: SourceHealth, now_ms: int) -> bool:
    """``h`` was not renewed in time: ``updated_at + lease_ms`` passed (a
    record without a lease, ``lease_ms`` 0, never expires)."""
    return h.lease_ms > 0 and now_ms > h.updated_at + h.lease_ms


def clock_ahead(h: SourceHealth, now_ms: int) -> bool:
    """``h`` was stamped more than :data:`MAX_CLOCK_SKEW_MS` after ``now_ms``
    (the reader's clock): its writer's clock runs ahead of the reader's."""
    return h.updated_at > now_ms + MAX_CLOCK_SKEW_MS


def lost_change(m: Market, h: SourceHealth | None) -> bool:
    """A change of ``m`` was rejected or dropped (its session was cleared)
    while its source works in sessions: ``m`` is not to be trusted until its
    source re-images it."""
    return m.session is None and h is not None and h.session is not None


def effective_health(h: SourceHealth, now_ms: int) -> SourceHealth:
    """``h`` as a reader must take it at ``now_ms``: DOWN with reason
    ``ingest_gone`` once its lease ran out (``updated_at + lease_ms`` passed:
    the ingest process that owns the source died or cannot reach Redis);
    ``h`` itself otherwise. A record without a lease (``lease_ms`` 0) never
    expires. DOWN with reason ``clock_skew`` when the record was stamped more
    than :data:`MAX_CLOCK_SKEW_MS` ahead of ``now_ms``: measured against a clock
    that runs ahead, its lease and its markets' ages would read younger than
    they are."""
    if h.state != "DOWN":
        if lease_expired(h, now_ms):
            return msgspec.structs.replace(h, state="DOWN", reason=INGEST_GONE)
        if clock_ahead(h, now_ms):
            return msgspec.structs.replace(h, state="DOWN", reason=CLOCK_SKEW)
    return h


def apply_delta(market: Market | None, delta: Delta) -> Market | None:
    """Apply ``delta`` to ``market`` and return the new market.

    An image replaces; a delta with ``seq <= market.seq`` (duplicate or out
    of order) returns ``market`` unchanged; a delta for an unknown market
    returns None (a delta never creates a market). Otherwise the delta's
    latency tags and ``session`` are taken, ``header`` replaces every
    market-level field (else ``traded_volume``, when set, the market's
    volume) and each :class:`SelectionChange` is applied in order
    (:func:`merge_selections`). The caller keeps seq order: a delta whose
    ``seq`` is not ``market.seq + 1`` means a change was missed (resync —
    see the README), unless it is ``conflated`` (it then carries every field
    of each selection it touches). Pure.
    """
    if delta.kind == "image":
        return delta.market
    if market is None or delta.seq <= market.seq:
        return market
    changes: dict[str, object] = {
        "seq": delta.seq,
        "source_ts": delta.source_ts,
        "received_at": delta.received_at,
        "stored_at": delta.stored_at,
        "source_ts_original": delta.source_ts_original,
        "session": delta.session,
    }
    if delta.header is not None:
        h = delta.header
        for f in HEADER_FIELDS:
            changes[f] = getattr(h, f)
    elif delta.traded_volume is not None:
        changes["traded_volume"] = delta.traded_volume
    if delta.selections:
        changes["selections"] = merge_selections(market.selections, delta.selections)
    return msgspec.structs.replace(market, **changes)


def merge_selections(current: list[Selection], changed: list[SelectionChange]) -> list[Selection]:
    """Apply each change of ``changed``, in order, to the selection of
    ``current`` with its id (:func:`apply_selection_change`); a change for an
    id not held appends a new selection. Order of existing selections is
    kept; ``current`` is not modified."""
    out = list(current)
    index = {s.selection_id: i for i, s in enumerate(out)}
    for c in changed:
        i = index.get(c.selection_id)
        if i is None:
            index[c.selection_id] = len(out)
            out.append(apply_selection_change(None, c))
        else:
            out[i] = apply_selection_change(out[i], c)
    return out


# One encoder/decoder per process (msgspec perf tips).
ENCODER = msgspec.json.Encoder()
MARKET_DECODER = msgspec.json.Decoder(Market)
DELTA_DECODER = msgspec.json.Decoder(Delta)
DELTAS_DECODER = msgspec.json.Decoder(list[Delta])
HEALTH_DECODER = msgspec.json.Decoder(SourceHealth)
EVENT_STATE_DECODER = msgspec.json.Decoder(EventState)
EVENT_STATES_DECODER = msgspec.json.Decoder(list[EventState])
