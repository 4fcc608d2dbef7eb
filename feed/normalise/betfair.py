"""Betfair Exchange Stream API (ESA) ``mcm`` → canonical market updates.

Pure: bytes in, :class:`~feed.normalise.base.MarketUpdate` objects out; no
I/O and no clock reads (times come in as arguments). The object keeps a
per-market cache of the provider's ladders, as the ESA cache algorithm
requires (betfairlightweight ``MarketBookCache``, nautilus ``BetfairParser``).

Follows ESA ``mcm`` semantics (``research/upstream.md`` §1–2):

- both layouts: raw stream captures (``ct`` = ``SUB_IMAGE`` / ``RESUB_DELTA``
  / ``HEARTBEAT``, level ladders ``batb``/``batl``/``bdatb``/``bdatl``) and
  historic-data files (no ``ct``, no ``id``, price ladders ``atb``/``atl``;
  the first sight of a market is an image);
- ``img: true`` replaces the market's cache; ``ct: SUB_IMAGE`` replaces
  every market it carries;
- level ladders are ``[level, price, size]``, price ladders ``[price, size]``;
  size 0 deletes that level/price, ``[0, 0, 0]`` empties a level ladder;
- ``marketDefinition`` arrives whole (status, inPlay, betDelay, version,
  runners with REMOVED/WINNER/LOSER and adjustment factors);
- BSP near/far prices may be the JSON *strings* ``"NaN"``/``"Infinity"``;
- ``status: 503`` marks a degraded stream; ``op`` other than ``mcm``
  (``connection``, ``status``, cricket ``ccm``) carries no odds;
- cricket ``ccm`` lines (the sports-data stream, ``op: ccm``, one ``cc``
  entry per event; each entry carries only what changed: ``fixtureInfo``
  with the teams and ``fixtureStatus`` PRE_MATCH / IN_RUNNING / FINISHED and
  ``eventStatus`` …/EVENT_CLOSED, ``matchStats`` with ``currentInnings`` and
  every innings' runs, wickets and overs) become
  :class:`~feed.models.EventState` s of event ``bf:<eventId>`` (the id the
  event's markets carry): status NOT_STARTED / LIVE / ENDED (CLOSED once the
  event is closed), period ``innings<n>``, score = runs per side (each
  innings credited to its batting team, matched by name against the
  fixture's home and away teams) with one ``innings<n>`` period per
  innings, and the innings (runs, wickets, balls = overs × 6 + balls);
  ``source_ts`` = the line's ``pt``. An entry that does not decode, or
  whose state is out of bounds, is rejected alone (``event_id`` set);
- race progress ``rcm`` lines (the sports-data stream's Total
  Performance Data, ``op: rcm``, one ``rc`` entry per race: ``id`` the race
  id ``<meeting eventId>.<HHMM UTC>``, ``mid`` its market, ``rpc`` the
  race's progress — last gate, leader's distance to the finish, speed,
  running time, running order — and ``rrc`` runners' tracking readings)
  become :class:`~feed.models.EventState` s of event ``bf:<race id>`` with
  a :class:`~feed.models.RaceProgress`: LIVE / in play until the leader
  passes the ``Finish`` gate, then ENDED; the clock is the running time.
  A state is emitted with each ``rpc`` (about once a second), carrying the
  latest reading of every runner (readings alone emit nothing). An entry
  that does not decode or is out of bounds is rejected alone;
- ``op: marketCatalogue`` lines (flumine's recorder writes the market
  catalogue beside the stream) give market, event, competition and runner
  names, which the stream itself lacks.

The canonical ``back``/``lay`` ladders come from the most complete ladder
the market has shown: full price ladders (``atb``/``atl``, EX_ALL_OFFERS)
over display ladders (``bdatb``/``bdatl``, EX_BEST_OFFERS_DISP) over best
offers (``batb``/``batl``, EX_BEST_OFFERS); best first, ``ladder_depth``
levels.

**Line markets are rejected.** On a market whose definition's
``bettingType`` is ``LINE`` (or the retired ``RANGE``; such a definition
also carries ``lineMinUnit`` / ``lineMaxUnit`` / ``lineInterval`` and the
price ladder ``LINE_RANGE``) every bet is struck at evens (2.0) and the
ladders' and ``ltp``'s "prices" are *line positions* (155.5 runs, say), not
decimal odds. The canonical model has only decimal odds (``price``,
``back``/``lay``, ``ltp``, ``bsp``) and no field for a line, so serving such a
market would make 155.5 read as odds of 155.5 — a back check at 155.5 would
pass. Such a market is never emitted: the first change that defines it (or
turns a held market into one) is rejected alone with reason
``unsupported_market`` (``market_id`` set: counted and quarantined by the
ingest, and a market held before reads stale), its cache is dropped, and its
later changes (definitions without a ``bettingType`` too) are left out
without another report (its id is remembered,
:attr:`BetfairNormaliser.unsupported`), so a market the stream keeps
updating is quarantined once, not once per change (the one report, like
any rejected change, makes the ingest ask the source for one fresh image;
that image's copy of the market is then left out silently, so it does not
repeat). A definition naming
another betting type (``ODDS``, ``ASIAN_HANDICAP_*``) serves it again, from
an image. The check runs before any price check, so line positions below 1.01
(a wickets line at 0.5) are not mistaken for bad odds.

**Duplicated markets in an image.** A market moved to another event appears
*twice* in an image (Betfair support, betcode-org/betfair#295): both copies
carry a ``marketDefinition``, and only the one with the higher ``version``
is current (later deltas are for it alone). Of the image copies of one
market in one message — or in one segmented message (``SEG_START`` …
``SEG_END``) — only those with the highest definition ``version`` apply; a
lower-version copy is ignored whole (nothing of it: not its event id, not
its ladder levels), whichever order the copies come in
(:attr:`BetfairNormaliser.stale_copies` counts them). Across segments, a
stale copy in an earlier segment than the current one is replaced by the
current copy's image when it arrives.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, TypeVar

import msgspec

from feed.errors import FeedDecodeError
from feed.models import (
    Clock,
    EventState,
    EventStatus,
    HomeAway,
    Innings,
    Market,
    MarketHeader,
    MarketStatus,
    PeriodScore,
    RaceProgress,
    RaceRunner,
    Score,
    Selection,
    SelectionStatus,
)
from feed.normalise.base import MarketUpdate, NormalisedBatch, iso_to_ms, remember
from feed.taxonomy import betfair_market, betfair_outcome, race_event_id  # noqa: F401 (race_event_id: re-exported)
from feed.validate import (
    MAX_ADJUSTMENT_FACTOR,
    MAX_FUTURE_SKEW_MS,
    MAX_HANDICAP,
    MAX_INT,
    MAX_PRICE,
    MAX_SIZE,
    MAX_TIME_MS,
    MIN_PRICE,
    check_event_state,
    check_provider_time,
)

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

SOURCE_PREFIX = "bf:"

# Bounds are feed.validate's (one set for every provider), expressed as
# msgspec constraints so that the decoder checks them in C.
Price = Annotated[float, msgspec.Meta(ge=MIN_PRICE, le=MAX_PRICE)]
NonNeg = Annotated[float, msgspec.Meta(ge=0, le=MAX_SIZE)]  # sizes, volumes (currency units)
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
RunnerId = Count
Handicap = Annotated[float, msgspec.Meta(ge=-MAX_HANDICAP, le=MAX_HANDICAP)]
Adjustment = Annotated[float, msgspec.Meta(ge=0, le=MAX_ADJUSTMENT_FACTOR)]  # percent
PriceSize = tuple[Price, NonNeg]
LevelPriceSize = tuple[Annotated[int, msgspec.Meta(ge=0, le=999)], Annotated[float, msgspec.Meta(ge=0, le=MAX_PRICE)], NonNeg]
Bsp = float | str  # float (decimal odds, 1.01–1000), or the strings "NaN" / "Infinity" (no price)

#: Betfair ``eventTypeId`` → canonical sport key.
SPORTS: dict[str, str] = {
    "1": "soccer", "2": "tennis", "3": "golf", "4": "cricket", "5": "rugby_union",
    "6": "boxing", "7": "horse_racing", "8": "motor_sport", "1477": "rugby_league",
    "3503": "darts", "4339": "greyhound_racing", "6422": "snooker",
    "6423": "american_football", "7511": "baseball", "7522": "basketball",
    "7524": "ice_hockey", "998917": "volleyball", "26420387": "mma",
    "2378961": "politics", "27454571": "esports",
}

_RUNNER_STATUS: dict[str, SelectionStatus] = {
    "ACTIVE": "ACTIVE", "REMOVED": "REMOVED", "REMOVED_VACANT": "REMOVED",
    "WINNER": "WINNER", "LOSER": "LOSER", "PLACED": "PLACED", "HIDDEN": "HIDDEN",
}
_MARKET_STATUS: dict[str, MarketStatus] = {"OPEN": "OPEN", "SUSPENDED": "SUSPENDED", "INACTIVE": "INACTIVE", "CLOSED": "CLOSED"}


# --- wire Structs: provider field names, only the fields we read ----------


class RunnerDefinition(msgspec.Struct, kw_only=True, gc=False):
    id: RunnerId
    status: str = "ACTIVE"
    sortPriority: Count | None = None
    hc: Handicap | None = None
    adjustmentFactor: Adjustment | None = None
    bsp: Bsp | None = None
    name: str | None = None


class MarketDefinition(msgspec.Struct, kw_only=True, gc=False):
    status: str = "OPEN"
    inPlay: bool = False
    betDelay: Count = 0
    version: Count = 0
    marketTime: str | None = None
    eventId: str | None = None
    eventTypeId: str | None = None
    marketType: str | None = None
    bettingType: str | None = None
    numberOfWinners: Count | None = None
    eachWayDivisor: float | None = None  # EACH_WAY only: the place part pays 1/divisor of the odds
    countryCode: str | None = None
    venue: str | None = None
    eventName: str | None = None
    name: str | None = None
    suspendReason: str | None = None
    lineInterval: float | None = None
    runners: list[RunnerDefinition] = []


class RunnerChange(msgspec.Struct, kw_only=True, gc=False):
    id: RunnerId
    hc: Handicap | None = None
    ltp: Annotated[float, msgspec.Meta(ge=0, le=MAX_PRICE)] | None = None  # 0 = no trade yet
    tv: NonNeg | None = None
    atb: list[PriceSize] | None = None
    atl: list[PriceSize] | None = None
    batb: list[LevelPriceSize] | None = None
    batl: list[LevelPriceSize] | None = None
    bdatb: list[LevelPriceSize] | None = None
    bdatl: list[LevelPriceSize] | None = None
    trd: list[PriceSize] | None = None
    spn: Bsp | None = None
    spf: Bsp | None = None


class MarketChange(msgspec.Struct, kw_only=True, gc=False):
    id: str
    img: bool = False
    con: bool = False
    tv: NonNeg | None = None
    marketDefinition: MarketDefinition | None = None
    rc: list[RunnerChange] | None = None


class ChangeMessage(msgspec.Struct, kw_only=True, gc=False):
    op: str
    id: Count | None = None
    pt: int | None = None  # checked in code: a bad pt rejects the message's markets (clock_skew)
    clk: str | None = None
    initialClk: str | None = None
    ct: str | None = None
    segmentType: str | None = None
    status: Count | None = None
    heartbeatMs: Count | None = None
    conflateMs: Count | None = None
    mc: list[MarketChange] | None = None


class _LooseChangeMessage(ChangeMessage, kw_only=True, gc=False):
    """The envelope alone (each market change left raw): decoded when the
    typed decode fails, to reject only the markets that fail."""

    # msgspec lets a Struct subclass redeclare an inherited field with another type (here: the
    # changes left undecoded); mypy models Structs as dataclasses and calls that an incompatible override
    mc: list[msgspec.Raw] | None = None  # type: ignore[assignment]


class _DefinitionProbe(msgspec.Struct, gc=False):
    bettingType: str | None = None


class _MarketProbe(msgspec.Struct, gc=False):
    """A market change's id and betting type alone: read when the change
    itself does not decode (a line market's positions below 1.01 fail the
    decimal-odds bounds), to tell a line market from bad odds."""

    id: str
    marketDefinition: _DefinitionProbe | None = None


#: ``bettingType`` s whose ladder "prices" are line positions, not decimal odds (module docstring)
UNSUPPORTED_BETTING_TYPES: frozenset[str] = frozenset({"LINE", "RANGE"})


class CatalogueRunner(msgspec.Struct, kw_only=True, gc=False):
    selectionId: RunnerId
    runnerName: str | None = None
    handicap: float | None = None


class CatalogueNamed(msgspec.Struct, kw_only=True, gc=False):
    id: str | None = None
    name: str | None = None


class MarketCatalogue(msgspec.Struct, kw_only=True, gc=False):
    """Betfair ``listMarketCatalogue`` item as flumine's recorder writes it
    (``"op": "marketCatalogue"``): names the stream itself does not carry."""

    marketId: str
    marketName: str | None = None
    runners: list[CatalogueRunner] = []
    event: CatalogueNamed | None = None
    competition: CatalogueNamed | None = None


class CcmTeam(msgspec.Struct, kw_only=True, gc=False):
    name: str | None = None


class CcmFixtureInfo(msgspec.Struct, kw_only=True, gc=False):
    """``fixtureInfo`` of a cricket change (what we read of it)."""

    homeTeam: str | None = None
    awayTeam: str | None = None
    fixtureStatus: str | None = None
    eventStatus: str | None = None


class CcmInnings(msgspec.Struct, kw_only=True, gc=False):
    """One ``inningsStats`` item: ``inningsOvers`` is cricket notation,
    ``"19.4"`` = 19 overs and 4 balls."""

    inningsNum: int
    battingTeam: str | None = None
    inningsRuns: int = 0
    inningsOvers: str | None = None
    inningsWickets: int = 0


class CcmMatchStats(msgspec.Struct, kw_only=True, gc=False):
    currentInnings: int | None = None
    inningsStats: list[CcmInnings] | None = None


class CricketChange(msgspec.Struct, kw_only=True, gc=False):
    """One ``cc`` entry of a ``ccm`` line: an event's changed parts."""

    eventId: str
    marketId: str | None = None
    fixtureInfo: CcmFixtureInfo | None = None
    homeTeam: CcmTeam | None = None
    awayTeam: CcmTeam | None = None
    matchStats: CcmMatchStats | None = None


class _CricketMessage(msgspec.Struct, kw_only=True, gc=False):
    op: str
    pt: int | None = None
    cc: list[msgspec.Raw] | None = None


class _EventIdOnly(msgspec.Struct, gc=False):
    eventId: str


class _Cricket(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the cricket stream has said of one event (merged entry by entry)."""

    home: str | None = None
    away: str | None = None
    fixture_status: str | None = None
    event_status: str | None = None
    current: int | None = None
    innings: tuple[CcmInnings, ...] | None = None


class RrcRunner(msgspec.Struct, kw_only=True, gc=False):
    """One ``rrc`` item of a race change: a runner's tracking reading
    (``ft`` ms, ``spd`` m/s, ``prg`` metres to the finish; ``lat``/``long``
    and ``sfq`` stride frequency are not kept)."""

    id: int
    ft: int | None = None
    spd: float | None = None
    prg: float | None = None


class RpcProgress(msgspec.Struct, kw_only=True, gc=False):
    """``rpc`` of a race change: the race's progress. ``ft`` ms; ``g`` the
    last gate the leader passed; ``st`` sectional time s; ``rt`` running
    time s; ``spd`` leader speed m/s; ``prg`` leader metres to the finish;
    ``ord`` selection ids in running order (``J`` jumps not kept)."""

    ft: int | None = None
    g: str | None = None
    st: float | None = None
    rt: float | None = None
    spd: float | None = None
    prg: float | None = None
    ord: list[int] | None = None


class RaceChange(msgspec.Struct, kw_only=True, gc=False):
    """One ``rc`` entry of an ``rcm`` line: ``id`` the race id
    (``<meeting eventId>.<HHMM UTC>``), ``mid`` its market id."""

    id: str
    mid: str | None = None
    rpc: RpcProgress | None = None
    rrc: list[RrcRunner] | None = None


class _RaceMessage(msgspec.Struct, kw_only=True, gc=False):
    op: str
    pt: int | None = None
    rc: list[msgspec.Raw] | None = None


class _RaceIdOnly(msgspec.Struct, gc=False):
    id: str


class _Race:
    """What the race stream has said of one race: its market, the latest
    progress (``rpc`` and its time) and each runner's latest reading."""

    __slots__ = ("market_id", "rpc", "rpc_at", "runners")

    def __init__(self) -> None:
        self.market_id: str | None = None
        self.rpc: RpcProgress | None = None
        self.rpc_at = 0
        self.runners: dict[str, RaceRunner] = {}


#: the gate a race's leader passes at the finish (Betfair TPD ``g``)
FINISH_GATE = "Finish"

_CRICKET_STATUS: dict[str, EventStatus] = {"PRE_MATCH": "NOT_STARTED", "IN_RUNNING": "LIVE", "FINISHED": "ENDED"}

_DECODER = msgspec.json.Decoder(ChangeMessage)
_CCM_DECODER = msgspec.json.Decoder(_CricketMessage)
_CC_DECODER = msgspec.json.Decoder(CricketChange)
_CC_ID_DECODER = msgspec.json.Decoder(_EventIdOnly)
_RCM_DECODER = msgspec.json.Decoder(_RaceMessage)
_RC_DECODER = msgspec.json.Decoder(RaceChange)
_RC_ID_DECODER = msgspec.json.Decoder(_RaceIdOnly)
_LOOSE_DECODER = msgspec.json.Decoder(_LooseChangeMessage)
_MC_DECODER = msgspec.json.Decoder(MarketChange)
_MC_PROBE_DECODER = msgspec.json.Decoder(_MarketProbe)
_CATALOGUE_DECODER = msgspec.json.Decoder(MarketCatalogue)

_JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)

#: wire field → reason when its bound is violated (prices / sizes / numbers)
_PRICE_FIELDS = frozenset({"ltp", "bsp", "spn", "spf"})
_SIZE_FIELDS = frozenset({"tv"})
_PAIR_LADDERS = frozenset({"atb", "atl", "trd"})  # [price, size]
_LEVEL_LADDERS = frozenset({"batb", "batl", "bdatb", "bdatl"})  # [level, price, size]
_NUMBER_FIELDS = frozenset({"version", "betDelay", "numberOfWinners", "sortPriority", "adjustmentFactor", "hc",
                            "id", "status", "heartbeatMs", "conflateMs"})
_PATH_TAIL = re.compile(r"\.(\w+)((?:\[\d+\])*)$")


def _reason_of(text: str) -> str:
    """The rejection reason of a msgspec ValidationError message: a bound
    violated on a price / size / number field → ``invalid_price`` /
    ``invalid_size`` / ``invalid_number``; anything else ``invalid_schema``."""
    head, _, path = text.rpartition(" - at `")
    if not (">=" in head or "<=" in head or "out of range" in head):
        return "invalid_schema"
    m = _PATH_TAIL.search(path.rstrip("`"))
    if m is None:
        return "invalid_schema"
    key, idx = m.group(1), m.group(2)
    last = idx.rpartition("[")[2].rstrip("]") if idx.count("[") >= 2 else None
    if key in _PAIR_LADDERS and last is not None:
        return "invalid_price" if last == "0" else "invalid_size"
    if key in _LEVEL_LADDERS and last is not None:
        return {"0": "invalid_number", "1": "invalid_price"}.get(last, "invalid_size")
    if key in _PRICE_FIELDS:
        return "invalid_price"
    if key in _SIZE_FIELDS:
        return "invalid_size"
    if key in _NUMBER_FIELDS:
        return "invalid_number"
    return "invalid_schema"


# --- cache -----------------------------------------------------------------

_ATB, _BDATB, _BATB = 3, 2, 1  # ladder source preference


class _Runner:
    __slots__ = (
        "key", "id", "hc", "atb", "atl", "atb_px", "atl_px", "batb", "batl", "bdatb", "bdatl",
        "ltp", "tv", "tv_sent", "trd", "status", "sort", "adj", "bsp", "name", "back", "lay", "back_dirty",
        "lay_dirty", "outcome", "sel",
    )

    def __init__(self, key: str, rid: int, hc: float) -> None:
        self.key = key
        self.id = rid
        self.hc = hc
        # price ladders as [(price, size), …] ascending by price, with their prices alone beside
        # them (for bisect), kept sorted incrementally; the levels are the decoded tuples, so a
        # canonical side is a slice of them (built in C, no tuple per level)
        self.atb: list[tuple[float, float]] = []
        self.atl: list[tuple[float, float]] = []
        self.atb_px: list[float] = []
        self.atl_px: list[float] = []
        self.batb: dict[int, tuple[float, float]] = {}
        self.batl: dict[int, tuple[float, float]] = {}
        self.bdatb: dict[int, tuple[float, float]] = {}
        self.bdatl: dict[int, tuple[float, float]] = {}
        self.ltp: float | None = None
        self.tv: float | None = None
        self.tv_sent = False  # the stream sends runner tv (EX_TRADED_VOL)
        self.trd: dict[float, float] = {}  # traded ladder price -> size (EX_TRADED)
        self.status: SelectionStatus = "ACTIVE"
        self.sort: int | None = None
        self.adj: float | None = None
        self.outcome: str | None = None
        self.bsp: float | None = None
        self.name: str | None = None
        # canonical ladders, rebuilt only when dirty (a change reached the best ladder_depth levels);
        # never mutated in place: an unchanged side is the same list in every Selection built from it,
        # which is how the book tells it unchanged at the cost of an identity check
        self.back: list[tuple[float, float]] = []
        self.lay: list[tuple[float, float]] = []
        self.back_dirty = True
        self.lay_dirty = True
        # the last Selection built from this runner: handed out again while every field equals it
        self.sel: Selection | None = None


class _Market:
    __slots__ = ("market_id", "runners", "by_id", "header", "ladder", "tv", "source_ts", "divisor")

    def __init__(self, market_id: str) -> None:
        self.market_id = market_id
        self.runners: dict[str, _Runner] = {}
        self.by_id: dict[int, _Runner] = {}  # the runners of `runners` without handicap, by runner id
        self.header: MarketHeader | None = None
        self.ladder = 0
        self.tv: float | None = None
        self.source_ts = 0  # provider time of the last change applied (a catalogue's names carry it)
        self.divisor: float | None = None  # the definition's eachWayDivisor (the catalogue re-maps with it)


class EsaCursor(msgspec.Struct, kw_only=True):
    """The ESA resume cursor stored with the data: ``initialClk`` + ``clk``."""

    initial_clk: str | None = None
    clk: str | None = None


def encode_cursor(initial_clk: str | None, clk: str | None) -> str:
    return msgspec.json.encode(EsaCursor(initial_clk=initial_clk, clk=clk)).decode()


def decode_cursor(value: str | None) -> EsaCursor:
    """The stored cursor (empty when absent or unreadable)."""
    if not value:
        return EsaCursor()
    try:
        return msgspec.json.decode(value, type=EsaCursor)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return EsaCursor()


def selection_key(rid: int, hc: float | None) -> str:
    """Canonical selection id: ``"<id>"``, or ``"<id>:<hc>"`` when hc ≠ 0."""
    if not hc:
        return str(rid)
    return f"{rid}:{hc:g}"


def _bsp(value: Bsp | None) -> float | None:
    """A definition's ``bsp``: a float (checked 1.01–1000 before), or None
    for absent / the strings ``"NaN"`` / ``"Infinity"``."""
    if value is None or isinstance(value, str):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


@lru_cache(maxsize=4096)
def _market_time(text: str | None) -> int | None:
    """``marketTime`` → ms (:func:`~feed.normalise.base.iso_to_ms`; raises
    ``invalid_time`` outside 1970..2100), cached: definitions repeat it."""
    return iso_to_ms(text)


def _bad_bsp(value: Bsp | None) -> bool:
    """A numeric ``bsp`` outside 1.01–1000 (−0.0, 0, 1e6 …)."""
    return value is not None and not isinstance(value, str) and not (MIN_PRICE <= value <= MAX_PRICE)


def _apply_prices(levels: list[tuple[float, float]], prices: list[float], changes: list[tuple[float, float]],
                  depth: int, back: bool, dirty: bool) -> bool:
    """Apply ``[price, size]`` changes to ``levels`` (``(price, size)``
    ascending by price, no price twice) and ``prices`` (their prices, kept
    beside them for bisect); size 0 deletes the price.

    Returns whether the side's best ``depth`` prices (the highest for
    ``back``, the lowest for lay) may have changed (``dirty``: they are
    already to be rebuilt): False only when every change lies strictly
    beyond the ``depth``-th best price held before — an insert, update or
    delete there cannot reach the top ``depth``."""
    n = len(prices)
    if dirty or n < depth or depth <= 0:
        lo, hi = -math.inf, math.inf  # every change is visible
    elif back:
        lo, hi = prices[n - depth], math.inf
    else:
        lo, hi = -math.inf, prices[depth - 1]
    visible = dirty
    for level in changes:
        price = level[0]
        if not visible and lo <= price <= hi:
            visible = True
        i = bisect_left(prices, price)
        if i < len(prices) and prices[i] == price:
            if level[1]:
                levels[i] = level
            else:
                del prices[i]
                del levels[i]
        elif level[1]:
            prices.insert(i, price)
            levels.insert(i, level)
    return visible


def _apply_levels(book: dict[int, tuple[float, float]], changes: list[tuple[int, float, float]]) -> None:
    """Apply ``[level, price, size]`` changes: size 0 removes the level and
    ``[0, 0, 0]`` (level 0 with no price) means the ladder is now empty."""
    for level, price, size in changes:
        if not level and not price and not size:
            book.clear()
            continue
        if size:
            book[level] = (price, size)
        else:
            book.pop(level, None)


def _check_levels(changes: list[tuple[int, float, float]] | None) -> bool:
    if changes:
        for _, price, size in changes:
            if size and not (MIN_PRICE <= price <= MAX_PRICE):
                return False
    return True


def market_type_to_canonical(raw: str | None, sport: str | None = None, places: int | None = None, *,
                             runners: Sequence[str | None] | None = None, event_name: str | None = None,
                             divisor: float | None = None) -> tuple[str, dict[str, str] | None]:
    """Betfair ``marketType`` → (canonical key, specifiers) of
    :mod:`feed.taxonomy` (:func:`feed.taxonomy.betfair_market`):
    ``MATCH_ODDS`` → ``("match_result", None)`` (``moneyline`` in sports
    without a draw, unless its runners include one); ``OVER_UNDER_25`` →
    ``("total", {"line": "2.5"})``; ``TEAM_A_OVER_UNDER_25`` → Team A's side
    by the event name ("Away @ Home": ``away``); unknown types →
    ``raw:<type>``. runners: the runners' names in definition order (None
    for one not known); event_name: "Home v Away" / "Away @ Home", or None;
    divisor: the definition's ``eachWayDivisor`` (an EACH_WAY market's
    ``ew_fraction``: ``4.0`` → ``1/4``)."""
    return betfair_market(raw, sport, places=places, runners=runners, event_name=event_name, divisor=divisor)


class BetfairNormaliser:
    """Feeds ESA lines through the Betfair cache and yields canonical updates.

    ``source`` names the source (``betfair`` by default); market ids are
    namespaced ``bf:<marketId>`` and event ids ``bf:<eventId>``.
    ``ladder_depth`` caps each canonical ladder (levels, best first).
    ``max_future_skew_ms``: how far a message's ``pt`` may
    run ahead of its receive time (set it to the ingest's
    ``max_future_skew_ms``; see :mod:`feed.validate`).

    Rejections: a message that cannot be read as an ESA envelope raises
    :class:`FeedDecodeError` (nothing applied). Within an ``mcm``, each market
    change is checked on its own before anything of it is applied: a market
    that fails (``unknown_market``: a delta for a market never defined;
    ``invalid_price`` / ``invalid_size`` / ``invalid_number`` /
    ``invalid_time`` / ``invalid_schema``: its values; ``clock_skew``: the
    message's ``pt``) is reported in ``batch.rejected`` (``market_id`` =
    ``bf:<id>``, ``raw`` = the message) and its cache is left as it was; the
    message's other markets apply (betfairlightweight, too, handles the
    markets of one message independently). A line market (``bettingType``
    ``LINE`` / ``RANGE``) is rejected once with ``unsupported_market`` and
    its later changes are left out; of a market's copies in one image only
    those with the highest definition ``version`` apply (module docstring).
    """

    #: provider times of a live stream (see Normaliser.live_provider_times)
    live_provider_times = True

    def __init__(self, source: str = "betfair", *, ladder_depth: int = 10,
                 max_future_skew_ms: int = MAX_FUTURE_SKEW_MS, cursor_op: str = "mcm") -> None:
        self.source = source
        #: the op whose lines' ``initialClk``/``clk`` are the resume cursor: ``mcm`` (the
        #: market stream; a replay mixing streams keeps the market stream's tokens), ``ccm``
        #: (a ``betfair-cricket`` source) or ``rcm`` (``betfair-race``): the sports-data
        #: stream a source subscribes to is its only stream
        self.cursor_op = cursor_op
        self.ladder_depth = ladder_depth
        self.max_future_skew_ms = max_future_skew_ms
        self.markets: dict[str, _Market] = {}
        self.catalogues: dict[str, MarketCatalogue] = {}
        self.initial_clk: str | None = None
        self.clk: str | None = None
        #: cricket stream state per raw event id, and the last state emitted per event
        self.cricket: dict[str, _Cricket] = {}
        #: race stream state per race id
        self.races: dict[str, _Race] = {}
        self.states: dict[str, EventState] = {}
        #: raw ids of line markets (not served: module docstring) → their ``bettingType``
        self.unsupported: dict[str, str] = {}
        #: lower-version copies of a market ignored in images (a market moved to another event)
        self.stale_copies = 0
        #: the highest definition version of each market's image copies in the current segmented
        #: message (SEG_START … SEG_END); empty between messages
        self._image_versions: dict[str, int] = {}

    # -- public -----------------------------------------------------------

    def restore(self, markets: Iterable[Market], cursor: str | None) -> None:
        """Resume after a restart: the stored ``initialClk``/``clk`` (the
        cache itself is rebuilt from the images and ``img`` changes ESA sends
        after a resubscription)."""
        stored = decode_cursor(cursor)
        self.initial_clk, self.clk = stored.initial_clk, stored.clk

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Decode one ESA line and apply it to the cache.

        raw: one JSON line (bytes). recv_ms: when it was read, ms since the
        epoch. channel: unused (one stream). ``source_ts`` is the message's
        ``pt``; a message without ``pt`` takes ``recv_ms``. Raises :class:`FeedDecodeError` (reason
        ``invalid_json``, ``invalid_schema``, ``invalid_number``, …) for a
        message rejected whole, and then leaves the cache untouched; markets
        rejected alone are in ``batch.rejected`` (see the class docstring).
        """
        rejected: list[FeedDecodeError] = []
        try:
            msg = _DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            msg = self._decode_by_market(raw, exc, rejected)
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        batch = NormalisedBatch(op=msg.op, provider_ts=msg.pt, heartbeat=msg.ct == "HEARTBEAT",
                                rejected=rejected)
        if msg.op == "mcm":
            batch.degraded = msg.status == 503
            batch.full_image = msg.ct == "SUB_IMAGE" and msg.segmentType in (None, "SEG_START")
            self._track_clock(msg, batch)
        if msg.op == "marketCatalogue":
            self._apply_catalogue(raw, batch, recv_ms)
            return batch
        if msg.op in ("ccm", "rcm"):
            if self.cursor_op == msg.op:  # the sports-data stream's own envelope (a replay leaves it to mcm)
                batch.degraded = msg.status == 503
                self._track_clock(msg, batch)
            if msg.op == "ccm":
                self._apply_cricket(raw, batch, recv_ms)
            else:
                self._apply_race(raw, batch, recv_ms)
            return batch
        if msg.op != "mcm" or not msg.mc:
            return batch
        pt = msg.pt
        clock_error = None
        if pt is None:
            source_ts, original = recv_ms, None
        elif type(pt) is not int or pt <= 0 or pt > MAX_TIME_MS:
            source_ts, original = recv_ms, None
            clock_error = f"pt {pt!r} is not a time within 1970..2100"
        else:
            source_ts, original = pt, None
        if clock_error is None:
            try:
                check_provider_time(source_ts, recv_ms, self.max_future_skew_ms, "pt")
            except FeedDecodeError as exc:
                clock_error = exc.detail
        if clock_error is not None:
            batch.provider_ts = None
        sub_image = msg.ct == "SUB_IMAGE"
        changes = msg.mc
        if len(changes) > 1 or msg.segmentType is not None or self._image_versions:
            changes = self._current_copies(changes, sub_image, msg.segmentType)
        bad = self._check_markets(changes, rejected, raw, clock_error)
        updates = batch.updates
        for mc in changes:
            if bad and mc.id in bad:
                continue
            update = self._apply_market(mc, sub_image, source_ts, original, recv_ms)
            if update is not None:
                updates.append(update)
                batch.runner_changes += len(mc.rc) if mc.rc else 0
        return batch

    # -- internals ----------------------------------------------------------

    def _decode_by_market(self, raw: bytes, first: msgspec.ValidationError,
                          rejected: list[FeedDecodeError]) -> ChangeMessage:
        """The typed decode failed: decode the envelope alone and each market
        change on its own. A bad envelope rejects the message (raises); a bad
        market change is appended to ``rejected`` and left out."""
        try:
            loose = _LOOSE_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            try:  # a fragment like ` "x", …}` is a JSON string of the wrong type: call it what it is
                msgspec.json.decode(raw)
            except _JSON_ERRORS as exc2:
                raise FeedDecodeError("invalid_json", str(exc2), raw) from None
            raise FeedDecodeError(_reason_of(str(exc)), str(exc), raw) from None
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        if loose.mc is None:  # cannot happen (the envelope was the problem), but never lose the error
            raise FeedDecodeError(_reason_of(str(first)), str(first), raw)
        good: list[MarketChange] = []
        left_out: set[str] = set()  # line markets (raw ids): see _unsupported
        for i, part in enumerate(loose.mc):
            try:
                good.append(_MC_DECODER.decode(part))
            except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
                try:
                    probe: _MarketProbe | None = _MC_PROBE_DECODER.decode(part)
                except (msgspec.ValidationError, *_JSON_ERRORS):
                    probe = None
                if probe is not None:
                    kind = probe.marketDefinition.bettingType if probe.marketDefinition is not None else None
                    if kind in UNSUPPORTED_BETTING_TYPES or (kind is None and probe.id in self.unsupported):
                        # a line market's positions (0.5 …) are no odds: not a bad price
                        self._unsupported(probe.id, kind, raw, rejected)
                        left_out.add(probe.id)
                        continue
                mid = SOURCE_PREFIX + probe.id if probe is not None else None
                text = f"{exc} (market change {i})"
                rejected.append(FeedDecodeError(_reason_of(str(exc)), text, raw, market_id=mid))
        fields = {f: getattr(loose, f) for f in ChangeMessage.__struct_fields__ if f != "mc"}
        msg = ChangeMessage(**fields, mc=good)
        if rejected or left_out:  # a market that failed in one change of the message fails in all of them
            ids = {e.market_id for e in rejected} | {SOURCE_PREFIX + x for x in left_out}
            msg.mc = [mc for mc in good if SOURCE_PREFIX + mc.id not in ids]
        return msg

    def _apply_cricket(self, raw: bytes, batch: NormalisedBatch, recv_ms: int) -> None:
        """A ``ccm`` line: each ``cc`` entry merged into its event's cricket
        state, one :class:`EventState` per event whose state changed (an
        entry that fails is rejected alone, its event's state untouched)."""
        msg = _envelope(_CCM_DECODER, raw, "ccm")
        pt = msg.pt if msg.pt is not None else recv_ms
        for cc in _entries(msg.cc, _CC_DECODER, lambda part: _CC_ID_DECODER.decode(part).eventId, "cricket change",
                           raw, batch):
            event_id = SOURCE_PREFIX + cc.eventId
            old = self.cricket.get(cc.eventId) or _Cricket()
            new = _merge_cricket(old, cc)
            try:
                state = _cricket_state(new, event_id, self.source, pt, recv_ms)
                check_event_state(state, recv_ms, max_future_skew_ms=self.max_future_skew_ms)
            except FeedDecodeError as exc:
                batch.rejected.append(FeedDecodeError(exc.reason, exc.detail, raw, event_id=event_id))
                continue
            remember(self.cricket, cc.eventId, new)
            if new.fixture_status is None:
                # nothing said yet of the fixture (a stream joined mid-match, after a restart, whose
                # first entries carry only matchStats): no state until fixtureInfo names the status
                # and the teams — a guess (NOT_STARTED, innings of no side) would overwrite the truth
                continue
            if not state.same_content(self.states.get(event_id)):
                remember(self.states, event_id, state)
                batch.event_states.append(state)

    def _apply_race(self, raw: bytes, batch: NormalisedBatch, recv_ms: int) -> None:
        """An ``rcm`` line: each ``rc`` entry merged into its race (runner
        readings by selection, the progress whole); a race whose ``rpc``
        came emits its :class:`EventState` (event ``bf:<race id>``) when it
        says something new. Readings and progress older (``ft``) than the
        ones held are skipped (a reordered or repeated line cannot take a
        race back). An entry that fails is rejected alone, its race untouched."""
        msg = _envelope(_RCM_DECODER, raw, "rcm")
        pt = msg.pt if msg.pt is not None else recv_ms
        for rc in _entries(msg.rc, _RC_DECODER, lambda part: _RC_ID_DECODER.decode(part).id, "race change", raw,
                           batch):
            event_id = SOURCE_PREFIX + rc.id
            held = self.races.get(rc.id) or _Race()
            try:
                new = _merge_race(held, rc, pt)
                # checked whole even without a progress yet: a bad reading must not be held and
                # then fail every later progress of its race
                state = _race_state(new, rc.id, event_id, self.source, pt, recv_ms)
                check_event_state(state, recv_ms, max_future_skew_ms=self.max_future_skew_ms)
            except FeedDecodeError as exc:
                batch.rejected.append(FeedDecodeError(exc.reason, exc.detail, raw, event_id=event_id))
                continue
            remember(self.races, rc.id, new)
            if rc.rpc is None or new.rpc is not rc.rpc:
                continue  # runner readings ride with the next progress; a stale progress says nothing
            if not state.same_content(self.states.get(event_id)):
                remember(self.states, event_id, state)
                batch.event_states.append(state)

    def _track_clock(self, msg: ChangeMessage, batch: NormalisedBatch) -> None:
        """ESA resume tokens: ``initialClk`` from images, ``clk`` from every
        unsegmented message or SEG_END; the cursor is their JSON."""
        changed = False
        if msg.initialClk and msg.initialClk != self.initial_clk:
            self.initial_clk = msg.initialClk
            changed = True
        if msg.clk and msg.segmentType in (None, "SEG_END") and msg.clk != self.clk:
            self.clk = msg.clk
            changed = True
        if changed:
            batch.cursor = encode_cursor(self.initial_clk, self.clk)

    def _current_copies(self, changes: list[MarketChange], sub_image: bool,
                        segment: str | None) -> list[MarketChange]:
        """``changes`` without the stale copies of a market duplicated in an
        image (module docstring): an image copy (``img``, a ``SUB_IMAGE``, or
        the first sight of the market) whose definition ``version`` is below
        that of another image copy of the market in this message, or in an
        earlier segment of this segmented message, is left out (counted in
        :attr:`stale_copies`)."""
        held = self._image_versions
        if held and segment not in ("SEG", "SEG_END"):
            held.clear()  # a new message (or segmented run): earlier copies say nothing of it
        known = self.markets
        best: dict[str, int] | None = None
        for mc in changes:
            md = mc.marketDefinition
            if md is not None and (mc.img or sub_image or mc.id not in known):
                if best is None:
                    best = {}
                v = best.get(mc.id)
                if v is None or md.version > v:
                    best[mc.id] = md.version
        if best is None:
            return changes
        for mid, v in best.items():  # an earlier segment carried a newer copy: that one stands
            before = held.get(mid)
            if before is not None and before > v:
                best[mid] = before
        kept = [mc for mc in changes
                if not (mc.marketDefinition is not None and mc.marketDefinition.version < best.get(mc.id, -1)
                        and (mc.img or sub_image or mc.id not in known))]
        if segment in ("SEG_START", "SEG"):
            held.update(best)
        elif held:
            held.clear()  # SEG_END: the run is over
        self.stale_copies += len(changes) - len(kept)
        return kept

    def _unsupported(self, mid: str, betting_type: str | None, raw: bytes,
                     rejected: list[FeedDecodeError]) -> None:
        """A change of a line market (``betting_type`` set: its definition; None: a
        change of a market already known to be one): left out, and reported in
        ``rejected`` (``unsupported_market``) only the first time; the market's
        cache is dropped (module docstring)."""
        if mid in self.unsupported:
            return
        remember(self.unsupported, mid, betting_type or "LINE")
        self.markets.pop(mid, None)
        rejected.append(FeedDecodeError(
            "unsupported_market",
            f"market {mid} is a {betting_type} market: its prices are line positions traded at evens, "
            "not decimal odds; not served", raw, market_id=SOURCE_PREFIX + mid))

    def _check_markets(self, changes: list[MarketChange], rejected: list[FeedDecodeError], raw: bytes,
                       clock_error: str | None) -> set[str] | None:
        """Check every market change before anything is applied (what msgspec
        cannot express). Returns the raw ids of the markets to leave out
        (each reported once in ``rejected``, except a line market already
        reported before: see :meth:`_unsupported`), or None when all are good."""
        bad: set[str] | None = None
        known = self.markets
        unsupported = self.unsupported
        defined: set[str] | None = None  # markets first defined earlier in this message
        for mc in changes:
            mid = mc.id
            if bad is not None and mid in bad:
                continue
            md = mc.marketDefinition
            betting_type = md.bettingType if md is not None else None
            if betting_type in UNSUPPORTED_BETTING_TYPES or (betting_type is None and unsupported and mid in unsupported):
                self._unsupported(mid, betting_type, raw, rejected)
                if bad is None:
                    bad = set()
                bad.add(mid)
                continue
            if betting_type is not None and unsupported and mid in unsupported:
                del unsupported[mid]  # now of another betting type: served again, from this definition (an image)
            error: FeedDecodeError | None
            if clock_error is not None:
                error = FeedDecodeError("clock_skew", f"{clock_error} (market {mid})", raw,
                                        market_id=SOURCE_PREFIX + mid)
            else:
                error = self._check_market(mc, mid in known or (defined is not None and mid in defined), raw)
            if error is None:
                if mc.marketDefinition is not None and mid not in known:
                    if defined is None:
                        defined = set()
                    defined.add(mid)
                continue
            if bad is None:
                bad = set()
            bad.add(mid)
            rejected.append(error)
        return bad

    @staticmethod
    def _check_market(mc: MarketChange, known: bool, raw: bytes) -> FeedDecodeError | None:
        """The rejection of one market change, or None when it is good."""
        mid = mc.id
        if not known and mc.marketDefinition is None:
            return FeedDecodeError("unknown_market", f"delta for market {mid} before its definition", raw,
                                   market_id=SOURCE_PREFIX + mid)
        for rc in mc.rc or ():
            if rc.ltp and rc.ltp < MIN_PRICE:
                return FeedDecodeError("invalid_price", f"ltp {rc.ltp} below {MIN_PRICE} in market {mid} runner {rc.id}",
                                       raw, market_id=SOURCE_PREFIX + mid)
            if (rc.batb or rc.batl or rc.bdatb or rc.bdatl) and not (
                    _check_levels(rc.batb) and _check_levels(rc.batl)
                    and _check_levels(rc.bdatb) and _check_levels(rc.bdatl)):
                return FeedDecodeError("invalid_price", f"level ladder price out of range in market {mid} runner {rc.id}",
                                       raw, market_id=SOURCE_PREFIX + mid)
        md = mc.marketDefinition
        if md is not None:
            try:
                _market_time(md.marketTime)
            except FeedDecodeError as exc:
                return FeedDecodeError(exc.reason, f"marketTime of market {mid}: {exc.detail}", raw,
                                       market_id=SOURCE_PREFIX + mid)
            for rd in md.runners:
                if _bad_bsp(rd.bsp):
                    return FeedDecodeError("invalid_price", f"bsp {rd.bsp!r} out of range in market {mid} runner {rd.id}",
                                           raw, market_id=SOURCE_PREFIX + mid)
        return None

    def _apply_market(self, mc: MarketChange, sub_image: bool, source_ts: int,
                      original: int | None, recv_ms: int) -> MarketUpdate | None:
        market = self.markets.get(mc.id)
        image = mc.img or sub_image or market is None
        if market is None:
            market = self.markets[mc.id] = _Market(mc.id)
        elif image:
            market.runners = {}
            market.by_id = {}
            market.ladder = 0
            market.tv = None
        changed: dict[str, _Runner] = {}
        header_changed = image
        if mc.marketDefinition is not None:
            self._apply_definition(market, mc.marketDefinition, changed)
            header_changed = True
        tv_changed = False
        if mc.tv is not None and mc.tv != market.tv:
            market.tv = mc.tv
            tv_changed = True
        if mc.rc:
            for rc in mc.rc:
                runner = self._runner(market, rc.id, rc.hc)
                self._apply_runner(market, runner, rc, self.ladder_depth)
                changed[runner.key] = runner
        market.source_ts = source_ts
        if header_changed or tv_changed:
            header = market.header
            if header is None:
                header = MarketHeader(bookmaker="betfair_exchange")
            if market.tv != header.traded_volume:
                header = msgspec.structs.replace(header, traded_volume=market.tv)
            market.header = header
        if image:
            changed = market.runners
        elif not changed and not header_changed and not tv_changed:
            return None
        return MarketUpdate(
            market_id=SOURCE_PREFIX + mc.id,
            source=self.source,
            image=image,
            header=market.header if header_changed else None,
            selections=[self._selection(market, r) for r in changed.values()],
            source_ts=source_ts,
            source_ts_original=original,
            received_at=recv_ms,
            conflated=mc.con,
            traded_volume=market.tv if tv_changed else None,
        )

    def _runner(self, market: _Market, rid: int, hc: float | None) -> _Runner:
        if not hc:
            runner = market.by_id.get(rid)
            if runner is not None:
                return runner
        key = selection_key(rid, hc)
        runner = market.runners.get(key)
        if runner is None:
            runner = market.runners[key] = _Runner(key, rid, hc or 0.0)
            cat = self.catalogues.get(market.market_id)
            if cat is not None:
                runner.name = next((r.runnerName for r in cat.runners
                                    if selection_key(r.selectionId, r.handicap) == key), None)
        if not hc:
            market.by_id[rid] = runner
        return runner

    def _apply_catalogue(self, raw: bytes, batch: NormalisedBatch, recv_ms: int) -> None:
        """Remember a catalogue's names; if the market is known, emit them."""
        try:
            cat = _CATALOGUE_DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise FeedDecodeError("invalid_schema", str(exc), raw) from None
        self.catalogues[cat.marketId] = cat
        market = self.markets.get(cat.marketId)
        if market is None or market.header is None:
            return
        changed: dict[str, _Runner] = {}
        for r in cat.runners:
            runner = market.runners.get(selection_key(r.selectionId, r.handicap))
            if runner is not None and r.runnerName and runner.name != r.runnerName:
                runner.name = r.runnerName
                changed[runner.key] = runner
        h = market.header
        event_name = h.event_name or (cat.event.name if cat.event else None)
        # the names may settle what the stream could not: which side Team A is ("Away @ Home")
        market_type, specifiers = market_type_to_canonical(
            h.market_type_raw, h.sport, h.number_of_winners, event_name=event_name,
            runners=[r.name for r in market.runners.values()], divisor=market.divisor)
        market.header = msgspec.structs.replace(
            h, name=h.name or cat.marketName, event_name=event_name, market_type=market_type,
            specifiers=specifiers, competition=h.competition or (cat.competition.name if cat.competition else None))
        if market_type != h.market_type:  # every runner's outcome is of the new type
            changed.update(market.runners)
        self._outcomes(market, changed)
        batch.updates.append(MarketUpdate(
            market_id=SOURCE_PREFIX + cat.marketId, source=self.source, image=False, header=market.header,
            selections=[self._selection(market, r) for r in changed.values()],
            source_ts=market.source_ts or recv_ms, received_at=recv_ms))

    def _apply_definition(self, market: _Market, md: MarketDefinition, changed: dict[str, _Runner]) -> None:
        status: MarketStatus = _MARKET_STATUS.get(md.status, "SUSPENDED")
        for rd in md.runners:
            runner = self._runner(market, rd.id, rd.hc)
            new_status = _RUNNER_STATUS.get(rd.status, "ACTIVE")
            bsp = _bsp(rd.bsp)
            if (runner.status != new_status or runner.sort != rd.sortPriority or runner.adj != rd.adjustmentFactor
                    or runner.bsp != bsp or (rd.name is not None and runner.name != rd.name)):
                runner.status = new_status
                runner.sort = rd.sortPriority
                runner.adj = rd.adjustmentFactor
                runner.bsp = bsp
                if rd.name is not None:
                    runner.name = rd.name
                changed[runner.key] = runner
        if status == "CLOSED" and any(r.status in ("WINNER", "PLACED") for r in market.runners.values()):
            status = "SETTLED"
        sport = SPORTS.get(md.eventTypeId or "", f"betfair_{md.eventTypeId}" if md.eventTypeId else None)
        cat = self.catalogues.get(market.market_id)
        event_name = md.eventName or (cat.event.name if cat and cat.event else None)
        market.divisor = md.eachWayDivisor
        market_type, specifiers = market_type_to_canonical(
            md.marketType, sport, md.numberOfWinners, event_name=event_name,
            runners=[self._runner(market, rd.id, rd.hc).name for rd in md.runners], divisor=md.eachWayDivisor)
        market.header = MarketHeader(
            event_id=SOURCE_PREFIX + md.eventId if md.eventId else None,
            bookmaker="betfair_exchange",
            sport=sport,
            event_name=event_name,
            competition=cat.competition.name if cat and cat.competition else None,
            name=md.name or (cat.marketName if cat else None),
            market_type=market_type,
            market_type_raw=md.marketType,
            specifiers=specifiers,
            status=status,
            suspend_reason=md.suspendReason,
            in_play=md.inPlay,
            bet_delay_s=md.betDelay,
            start_time=_market_time(md.marketTime),
            version=md.version,
            traded_volume=market.tv,
            number_of_winners=md.numberOfWinners,
            country_code=md.countryCode,
            venue=md.venue,
        )
        self._outcomes(market, changed)

    @staticmethod
    def _outcomes(market: _Market, changed: dict[str, _Runner]) -> None:
        """Give each runner its canonical outcome (:func:`feed.taxonomy.betfair_outcome`);
        a runner whose outcome moved joins ``changed``."""
        h = market.header
        if h is None or h.market_type is None:
            return
        for runner in market.runners.values():
            outcome = betfair_outcome(h.market_type, runner.key, runner.name, runner.sort, h.event_name, runner.hc,
                                      sport=h.sport)
            if outcome != runner.outcome:
                runner.outcome = outcome
                changed[runner.key] = runner

    @staticmethod
    def _apply_runner(market: _Market, runner: _Runner, rc: RunnerChange, depth: int) -> None:
        """Apply one runner change to the cache; a canonical side is marked
        dirty (rebuilt by :meth:`_selection`) only when its best ``depth``
        levels may have moved."""
        kind = market.ladder
        if rc.atb is not None:
            runner.back_dirty = _apply_prices(runner.atb, runner.atb_px, rc.atb, depth, True, runner.back_dirty)
            kind = _ATB
        if rc.atl is not None:
            runner.lay_dirty = _apply_prices(runner.atl, runner.atl_px, rc.atl, depth, False, runner.lay_dirty)
            kind = _ATB
        if rc.bdatb is not None:
            _apply_levels(runner.bdatb, rc.bdatb)
            runner.back_dirty = True
            kind = max(kind, _BDATB)
        if rc.bdatl is not None:
            _apply_levels(runner.bdatl, rc.bdatl)
            runner.lay_dirty = True
            kind = max(kind, _BDATB)
        if rc.batb is not None:
            _apply_levels(runner.batb, rc.batb)
            runner.back_dirty = True
            kind = max(kind, _BATB)
        if rc.batl is not None:
            _apply_levels(runner.batl, rc.batl)
            runner.lay_dirty = True
            kind = max(kind, _BATB)
        if kind != market.ladder:
            market.ladder = kind
            for r in market.runners.values():
                r.back_dirty = r.lay_dirty = True
        if rc.ltp is not None:
            runner.ltp = rc.ltp or None
        if rc.tv is not None:
            runner.tv = rc.tv
            runner.tv_sent = True
        if rc.trd is not None:
            trd = runner.trd
            for price, size in rc.trd:
                if size:
                    trd[price] = size
                else:
                    trd.pop(price, None)
            if not runner.tv_sent:  # EX_TRADED without EX_TRADED_VOL: the volume is the ladder's sum
                runner.tv = round(sum(trd.values()), 2)

    def _selection(self, market: _Market, r: _Runner) -> Selection:
        depth = self.ladder_depth
        kind = market.ladder
        if r.back_dirty:
            r.back_dirty = False
            if kind == _ATB:
                r.back = r.atb[-depth:][::-1]  # best (highest) first
            elif kind == _BDATB:
                r.back = [r.bdatb[k] for k in sorted(r.bdatb)][:depth]
            elif kind == _BATB:
                r.back = [r.batb[k] for k in sorted(r.batb)][:depth]
            else:
                r.back = []
        if r.lay_dirty:
            r.lay_dirty = False
            if kind == _ATB:
                r.lay = r.atl[:depth]
            elif kind == _BDATB:
                r.lay = [r.bdatl[k] for k in sorted(r.bdatl)][:depth]
            elif kind == _BATB:
                r.lay = [r.batl[k] for k in sorted(r.batl)][:depth]
            else:
                r.lay = []
        back = r.back
        lay = r.lay
        sel = r.sel
        if (sel is not None and sel.back is back and sel.lay is lay and sel.ltp == r.ltp
                and sel.traded_volume == r.tv and sel.status == r.status and sel.name == r.name
                and sel.sort_priority == r.sort and sel.adjustment_factor == r.adj and sel.bsp == r.bsp
                and sel.outcome == r.outcome):
            # nothing of the runner changed (a price-ladder change deeper than ladder_depth, a resent
            # definition): the Selection it would build equals the last one (selection_id and handicap
            # never change, price follows back), so that one is handed out again
            return sel
        sel = r.sel = Selection(
            selection_id=r.key,
            name=r.name,
            handicap=r.hc,
            status=r.status,
            price=back[0][0] if back else None,
            back=back,
            lay=lay,
            ltp=r.ltp,
            traded_volume=r.tv,
            sort_priority=r.sort,
            adjustment_factor=r.adj,
            bsp=r.bsp,
            outcome=r.outcome,
        )
        return sel

    def forget(self, market_id: str) -> None:
        """Drop a market's cache (``bf:`` id or raw id), e.g. after it closed."""
        self.markets.pop(market_id.removeprefix(SOURCE_PREFIX), None)


_T = TypeVar("_T")
_E = TypeVar("_E")


def _envelope(decoder: msgspec.json.Decoder[_E], raw: bytes, op: str) -> _E:
    """A sports-data line's envelope; raises ``FeedDecodeError("invalid_schema")`` (the whole line)."""
    try:
        return decoder.decode(raw)
    except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
        raise FeedDecodeError("invalid_schema", f"{op}: {exc}", raw) from None


def _entries(parts: list[msgspec.Raw] | None, decoder: msgspec.json.Decoder[_T], id_of: Callable[[msgspec.Raw], str],
             what: str, raw: bytes, batch: NormalisedBatch) -> Iterator[_T]:
    """Each entry of a sports-data line (``cc`` / ``rc``) decoded; one that does not decode is
    rejected alone in ``batch.rejected`` (``invalid_schema``, with its event id when at least
    its id decodes: ``id_of``) and the others go on."""
    for i, part in enumerate(parts or ()):
        try:
            entry = decoder.decode(part)
        except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
            try:
                eid: str | None = SOURCE_PREFIX + id_of(part)
            except (msgspec.ValidationError, *_JSON_ERRORS):
                eid = None
            batch.rejected.append(FeedDecodeError("invalid_schema", f"{exc} ({what} {i})", raw, event_id=eid))
            continue
        yield entry


def _merge_cricket(old: _Cricket, cc: CricketChange) -> _Cricket:
    """``old`` with what the change ``cc`` says (absent parts keep theirs)."""
    fi = cc.fixtureInfo
    home = fi.homeTeam if fi is not None and fi.homeTeam else (cc.homeTeam.name if cc.homeTeam else None)
    away = fi.awayTeam if fi is not None and fi.awayTeam else (cc.awayTeam.name if cc.awayTeam else None)
    ms = cc.matchStats
    return _Cricket(
        home=home or old.home, away=away or old.away,
        fixture_status=(fi.fixtureStatus if fi is not None and fi.fixtureStatus else old.fixture_status),
        event_status=(fi.eventStatus if fi is not None and fi.eventStatus else old.event_status),
        current=ms.currentInnings if ms is not None and ms.currentInnings is not None else old.current,
        innings=tuple(ms.inningsStats) if ms is not None and ms.inningsStats is not None else old.innings)


def _merge_race(held: _Race, rc: RaceChange, pt: int) -> _Race:
    """A copy of ``held`` with what ``rc`` says: its market, each runner
    reading newer than the one held (by ``ft``; none → ``pt``), its
    progress when newer. Raises ``FeedDecodeError`` for a reading that is
    not a distance (``invalid_number``)."""
    new = _Race()
    new.market_id = rc.mid or held.market_id
    new.rpc, new.rpc_at = held.rpc, held.rpc_at
    runners = new.runners = dict(held.runners)
    for r in rc.rrc or ():
        at = r.ft if r.ft is not None else pt
        key = str(r.id)
        old = runners.get(key)
        if r.prg is None or (old is not None and at < old.at):
            continue
        runners[key] = RaceRunner(selection_id=key, distance_m=r.prg, speed_mps=r.spd, at=at)
    p = rc.rpc
    if p is not None:
        at = p.ft if p.ft is not None else pt
        if held.rpc is None or at >= held.rpc_at:
            new.rpc, new.rpc_at = p, at
    return new


def _race_state(race: _Race, race_id: str, event_id: str, source: str, pt: int, recv_ms: int) -> EventState:
    """The state of a race from its merged stream: LIVE and in play until the
    leader passes the ``Finish`` gate, then ENDED; the clock is the running
    time as of the progress' ``ft``. Raises ``FeedDecodeError`` for a running
    time that is not 0..86400 s."""
    p = race.rpc or RpcProgress()
    finished = p.g == FINISH_GATE
    clock = None
    if p.rt is not None:
        if not (math.isfinite(p.rt) and 0 <= p.rt <= 86_400):
            raise FeedDecodeError("invalid_number", f"running time {p.rt!r:.40} of race {race_id}")
        clock = Clock(seconds=int(p.rt), running=not finished, at=race.rpc_at)
    runners = sorted(race.runners.values(), key=lambda r: (r.distance_m, r.selection_id))
    return EventState(
        event_id=event_id, source=source, status="ENDED" if finished else "LIVE", in_play=not finished,
        clock=clock,
        race=RaceProgress(race_id=race_id, market_id=SOURCE_PREFIX + race.market_id if race.market_id else None,
                          gate=p.g, distance_m=p.prg, leader_speed_mps=p.spd, sectional_s=p.st,
                          order=[str(x) for x in p.ord or ()], runners=runners),
        source_ts=pt, received_at=recv_ms)


def overs_to_balls(text: str | None) -> int:
    """Cricket overs notation → legal balls: ``"19.4"`` → 118, ``"20"`` → 120.
    Raises ``FeedDecodeError("invalid_schema")`` for anything else."""
    if not text:
        return 0
    whole, dot, part = text.partition(".")
    if not whole.isdigit() or len(whole) > 4 or (dot and not (len(part) == 1 and part in "012345")):
        raise FeedDecodeError("invalid_schema", f"overs {text[:20]!r} is not <overs>[.<balls 0-5>]")
    return int(whole) * 6 + (int(part) if dot else 0)


def _cricket_state(c: _Cricket, event_id: str, source: str, ts: int, recv_ms: int) -> EventState:
    status: EventStatus = _CRICKET_STATUS.get(c.fixture_status or "", "NOT_STARTED")
    if c.event_status == "EVENT_CLOSED":
        status = "CLOSED"
    live = status == "LIVE"
    innings: list[Innings] = []
    periods: list[PeriodScore] = []
    home = away = 0
    for inn in sorted(c.innings or (), key=lambda x: x.inningsNum):
        team: HomeAway | None = ("home" if inn.battingTeam and inn.battingTeam == c.home
                                 else "away" if inn.battingTeam and inn.battingTeam == c.away else None)
        balls = overs_to_balls(inn.inningsOvers)
        if team is None and not (inn.inningsRuns or inn.inningsWickets or balls):
            continue  # an innings not started (a T20 lists four)
        innings.append(Innings(number=inn.inningsNum, team=team, runs=inn.inningsRuns, wickets=inn.inningsWickets,
                               balls=balls))
        if team is not None:
            periods.append(PeriodScore(period=f"innings{inn.inningsNum}",
                                       home=inn.inningsRuns if team == "home" else 0,
                                       away=inn.inningsRuns if team == "away" else 0))
            if team == "home":
                home += inn.inningsRuns
            else:
                away += inn.inningsRuns
    return EventState(
        event_id=event_id, source=source, status=status, in_play=live,
        period=f"innings{c.current}" if live and c.current else None,
        score=Score(home=home, away=away, periods=periods) if c.innings is not None else None,
        innings=innings, source_ts=ts, received_at=recv_ms)


def from_spec(spec: SourceSpec, settings: Settings) -> BetfairNormaliser:
    """The registry's normaliser factory for ``esa`` sources (and Betfair
    recordings): ``ladder_depth`` from the settings."""
    return BetfairNormaliser(spec.name, ladder_depth=settings.ladder_depth)


def cricket_from_spec(spec: SourceSpec, settings: Settings) -> BetfairNormaliser:
    """The registry's normaliser factory for ``betfair-cricket`` sources: the
    same normaliser (``ccm`` lines → event states), its cursor following the
    ``ccm`` stream's ``initialClk``/``clk``."""
    return BetfairNormaliser(spec.name, ladder_depth=settings.ladder_depth, cursor_op="ccm")


def race_from_spec(spec: SourceSpec, settings: Settings) -> BetfairNormaliser:
    """The registry's normaliser factory for ``betfair-race`` sources: the
    same normaliser (``rcm`` lines → race states), its cursor following the
    ``rcm`` stream's ``initialClk``/``clk``."""
    return BetfairNormaliser(spec.name, ladder_depth=settings.ladder_depth, cursor_op="rcm")
