"""Sportradar Unified Odds Feed (UOF) XML messages → canonical market updates.

Pure: bytes in, :class:`~feed.normalise.base.NormalisedBatch` out; no I/O
(but a log line for a windowed ``bet_cancel``) and no clock reads (times come
in as arguments). The AMQP source
(:mod:`feed.sources.amqp`) hands every message body here with its routing key
as ``channel``; the same object replays a recording of them.

Follows the UOF message schema (``UnifiedFeed.xsd`` of Sportradar's
UnifiedOddsSdk; ``research/upstream.md`` §6). XML is parsed with the standard
library's ElementTree, hardened: a body over :data:`MAX_MESSAGE_BYTES`, or one
with a ``<!DOCTYPE`` / ``<!ENTITY`` declaration (entity expansion, external
entities), is rejected before the parser sees it. The parsed element is
decoded at the edge into msgspec Structs (``msgspec.convert``, attribute
text → typed values), then applied to a per-market cache.

Messages (root element = ``op``):

- ``odds_change`` (``product``, ``event_id``, ``timestamp``, optional
  ``request_id`` when it answers a recovery): each ``<market id specifiers
  status>`` with ``<outcome id odds active>`` children. Market ``status``
  (absent = 1): 1 → ``OPEN``, -1 → ``SUSPENDED`` (``suspend_reason``
  ``suspended``), 0 → ``INACTIVE`` (deactivated), -2 → ``SUSPENDED``
  (``handed_over``: another producer carries the market on), -3 →
  ``SETTLED`` (its outcomes follow in ``bet_settlement``), -4 →
  ``CANCELLED``. Outcome ``active="0"`` → selection ``SUSPENDED`` (its odds
  kept), else ``ACTIVE``; price = ``odds`` (decimal). An outcome the market
  no longer lists keeps its last state. ``<sport_event_status status>``
  sets the event's ``in_play`` as of the message's ``timestamp`` (see
  Ordering): 1 (live), 2 (suspended: "the match will continue") and 7
  (interrupted: "expected to be just a few minutes", the SDKs'
  ``EventStatus``) are in play — the match is under way and its prices are
  live prices, judged by the in-play limits; 0, 3–6, 8, 9 are not. A
  prematch producer's status (:data:`PREMATCH_PRODUCERS`, 3 = Ctrl) never
  takes out of play an event that another producer's status (1 =
  LiveOdds) put in play as of that time (Ctrl's view of a match under
  way may still say 0, e.g. on the markets it hands over, and arrives in
  any order against LiveOdds'); such a status is neither the event's
  ``in_play`` nor its state (counted ``prematch_status``); LiveOdds' own
  later "not in play" (3, 4 …) is. The
  element (``minOccurs=0``) may be absent: until a status of the event is
  known, a market reads in play when it comes from a live producer
  (:data:`LIVE_PRODUCERS`, 1 = LiveOdds), not otherwise; once one is, every
  market reads it — but a market a live producer priced (the producer of the
  last ``odds_change`` that set its odds; a ``bet_stop``, settlement or
  odds-less handover of another producer does not change it) reads in play
  while every status known (as of its close, for a closed one) is a prematch
  producer's: Ctrl's 0 says nothing of LiveOdds' odds, which are live odds
  (Sportradar's practice: the producer, 3 or 1, tells a match's pre-match
  section from its live one), so neither its order against them nor a Ctrl
  ``bet_stop`` makes them pre-match ones. LiveOdds' own 0 (it opens its
  markets minutes before the start with status 0) does: NOT_STARTED, its
  ``start_time``, when known, then judges it by the in-play limits from the
  start on (``streaming.state.live_for_limits``). The whole element becomes the
  :class:`~feed.models.EventState` of ``uof:<event_id>`` (its ``in_play``
  as above): ``status`` 0–9 → NOT_STARTED, LIVE, SUSPENDED, ENDED, CLOSED,
  CANCELLED, DELAYED, INTERRUPTED, POSTPONED, ABANDONED;
  ``match_status`` → the period while in play (6 ``1h``, 31 ``ht``, 7
  ``2h``, 41/42 ``et1``/``et2``, 50 ``pen``, 13–16 ``q1``–``q4``, 40 ``ot``, 1–3
  ``p1``–``p3``, 8–12 ``set1``–``set5``, breaks ``break``);
  ``home_score`` / ``away_score`` and ``<period_scores>`` (each period by
  its ``match_status_code``) the score; ``<clock match_time="23:10"
  stoppage_time remaining_time_in_period stopped>`` the clock (seconds,
  running unless ``stopped``, read at the message's ``timestamp``);
  ``<statistics><red_cards home away/>`` the red cards. A status that does
  not read, or a state out of bounds, rejects the state alone
  (``event_id`` set; the markets apply); an older one (``timestamp``) is
  dropped.
- ``bet_stop`` (``groups``, ``market_status``): every market of the event we
  hold becomes ``SUSPENDED`` (``suspend_reason`` ``bet_stop``), or
  ``INACTIVE`` for ``market_status="0"``. Market groups need Sportradar's
  market descriptions API, which this normaliser does not read: any
  ``groups`` value stops every market of the event (the safe side). A
  market first seen in an ``odds_change`` older than the event's newest
  ``bet_stop`` (another producer's, delivered after it) is held by that stop
  too, as if it had come in order (stamped with it).
- ``bet_settlement``: outcome ``void_factor="1"`` → ``VOID``, else
  ``result="1"`` → ``WINNER``, ``result="0"`` → ``LOSER``; the market
  becomes ``SETTLED``; the outcome's ``void_factor`` (0.5: half the stake
  refunded) and ``dead_heat_factor`` go to the selection as they are. ``rollback_bet_settlement``: the market goes back to
  ``SUSPENDED`` (``settlement_rolled_back``) with its outcomes ``SUSPENDED``
  until the next ``odds_change``.
- ``bet_cancel``: the market becomes ``CANCELLED`` and its outcomes
  ``VOID`` (the state before is kept); ``rollback_bet_cancel`` restores it.
  One with ``start_time`` and/or ``end_time`` (ms) cancels only the bets
  placed in that window (only ``start_time``: after it; only
  ``end_time``: before it): the market keeps trading, its status and
  outcomes are untouched. The model has no place for such a window, so it
  does not apply at all (no update; counted per market in
  :attr:`UofNormaliser.dropped` as ``windowed_cancel``, logged at INFO);
  nor does a ``rollback_bet_cancel`` with a window
  (``windowed_cancel_rollback``: it undoes only the cancel of that window).
- ``fixture_change`` (``start_time`` ms): the event's start time; every
  market of the event follows (header change; a closed market's
  ``source_ts`` stays its own, see Ordering).
- ``alive`` (``subscribed``): a producer's keep-alive (``heartbeat``);
  ``subscribed="0"`` asks the source for a recovery
  (``requests=["recovery:<product>"]``).
- ``snapshot_complete`` (``request_id``): the end of a recovery.

Synthetic messages, made by the source and delivered (and recorded) like any
other so a replay reproduces them; channel ``oddsfeed.*``:

- ``<producer_down product="1" reason="alive_violation" timestamp="…"/>``
  (channel :data:`PRODUCER_DOWN`): every market of that producer that is not
  closed becomes ``SUSPENDED`` (``suspend_reason`` ``producer_down``) and is
  listed in ``batch.unconfirm``: it reads stale until its next image, which
  the recovery's ``odds_change`` provides (the next update of such a market
  is emitted as an image);
- ``<recovery_requested product="1" request_id="7" after="…" timestamp="…"/>``
  (channel :data:`RECOVERY_REQUESTED`): only the ``snapshot_complete`` with
  that ``request_id`` ends the recovery.

Canonical ids: event ``uof:<event_id>`` (``uof:sr:match:123``), market
``uof:<event_id>:<market_id>`` plus ``:<specifiers>`` when it has any
(``uof:sr:match:123:18:total=2.5``); ``uof`` is the ``prefix`` argument.
Selection ids are the outcome ids. Specifiers also go, parsed, into
``MarketHeader.specifiers``; the routing key's sport id into ``sport``.

Ordering: UOF has no sequence numbers; messages carry their generation
``timestamp`` (ms). Each market keeps the timestamp of the last message
applied to its own state (``odds_change`` / ``bet_stop`` / settlement /
cancel parts, ``producer_down``; each event that of its last
``fixture_change``) and the digests (BLAKE2b of the body) of the messages
applied in that millisecond. A message part older than it is dropped (a
late message the queue reordered); one of the same millisecond applies in
arrival order (a producer's messages are in order on its queue, and a
``bet_stop`` may share the millisecond of the ``odds_change`` before it),
unless it is one of those messages again (a redelivery: a duplicate
changes nothing) — or the market was restored from the store, where what
was applied in that millisecond is not known, and it is taken as applied
(the recovery that follows a restart re-images the market). Dropped parts
are counted in :attr:`UofNormaliser.dropped` (``stale``); a message of
which nothing applied for that reason is returned with ``stale=True``. What
a market only inherits from its event — ``in_play``, ``start_time`` —
travels as a header change that never moves that timestamp (an update's
``source_ts`` still never goes back), so a late part of the market itself is
not lost behind it; a start-time change does not move even the
``source_ts`` of a closed market (its update keeps the market's own time),
so a closed market's stored time is that of its own last part and the
rollback of its close, generated after it but delivered after the
start-time change — and a restart — still applies. A market restored from
the store knows only its stored ``source_ts``, which such header changes (an
``in_play`` change, or a start-time change while it was open) may have moved past its own last
part (the final ``status="4"`` stamped after its ``bet_stop``): its own time
is not known, only that it is at most that. Until a part newer than it
applies (the market's time is then known again), an ``odds_change`` up to it
is taken as applied (it cannot be told from one that was, which would put
older prices back; the recovery re-images the market), while a
``bet_stop``, ``bet_settlement`` or (whole-market) ``bet_cancel`` up to it
applies to a market that is not closed, or that one of these closed since
the restore, and a ``rollback_bet_settlement`` / ``rollback_bet_cancel``
only undoes a close made since the restore; these go by their own
timestamps (one older than the last of them applied since the restore is
stale), and applied again they change nothing (a settlement of a market
already settled by it: the same results). So a settlement generated before
the final status, replayed by the recovery or redelivered after the
restart, is not lost; the update's ``source_ts`` is still the stored one.
``in_play`` is kept
per event as the last :data:`IN_PLAY_HISTORY` statuses with their
timestamps and producers' kinds, so a late ``sport_event_status`` is placed
where it belongs (a later one of the same millisecond and kind replaces it;
a late LiveOdds "in play" overrules a Ctrl "not in play" after it): an
open market reads the newest status; a closed one (settled, cancelled) the
status as of its close (``timestamp`` of the part that closed it) — a final
``status="4"`` that overtook the last ``bet_settlement`` does not make that
market "not in play", and a ``bet_cancel`` that overtook the ``odds_change``
taking the event live is corrected when that arrives. Whenever a status
arrives, every market of the event whose ``in_play`` it changes is emitted
(header change, not an image).

Cursor (``batch.cursor``): per producer, the timestamp up to which
everything that producer sent is applied, ``"1=1718000000123;3=…"`` (read it
with :func:`decode_cursor`). It advances on an ``alive`` of a producer that
is up (the producer's messages are in order on the queue, so its ``alive``
at *t* follows everything it generated before *t*) and on the
``snapshot_complete`` that ends its recovery; it does not advance while a
producer is down or recovering (after a restart, from the first ``alive``
after the recovery completes). A restart passes it to the recovery as
``after=``.

Rejections (:class:`~feed.errors.FeedDecodeError`): a body that is not
well-formed XML (``invalid_xml``), too large (``too_large``), has a DOCTYPE
or entity declaration (``invalid_xml``), an unknown root element
(``unknown_type``), or an envelope that fails its types (``invalid_schema``;
``clock_skew`` for a ``timestamp`` absurd or more than
``max_future_skew_ms`` after receipt) is rejected whole, nothing applied.
A ``<market>`` that fails (``invalid_price``: odds not within 1.01–1000;
``invalid_schema``: an attribute of the wrong type) is rejected alone
(``batch.rejected``, with its ``market_id``), the rest applies; the rejected
market's next update is emitted as an image.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from feed.errors import FeedDecodeError
from feed.models import (
    CLOSED_STATUSES,
    Clock,
    EventState,
    EventStatus,
    Market,
    MarketHeader,
    MarketStatus,
    PeriodScore,
    Score,
    Selection,
    SelectionStatus,
    TeamCounts,
)
from feed.normalise.base import MarketUpdate, NormalisedBatch, remember
from feed.taxonomy import is_unmapped, uof_market, uof_outcome
from feed.validate import (
    MAX_FUTURE_SKEW_MS,
    MAX_INT,
    MIN_PRICE,
    check_event_state,
    check_market,
    check_provider_time,
    is_price,
)

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

logger = logging.getLogger(__name__)

__all__ = [
    "LIVE_PRODUCERS",
    "MAX_MESSAGE_BYTES",
    "PREMATCH_PRODUCERS",
    "PRODUCER_DOWN",
    "RECOVERY_REQUESTED",
    "Control",
    "UofNormaliser",
    "decode_cursor",
    "encode_cursor",
    "from_spec",
    "market_id_of",
    "parse_xml",
    "peek_control",
    "peek_product",
    "producer_down_payload",
    "recovery_requested_payload",
]

PREFIX = "uof"
#: channel of the synthetic "producer down" payload (made by the source)
PRODUCER_DOWN = "oddsfeed.producer_down"
#: channel of the synthetic "recovery requested" payload (made by the source)
RECOVERY_REQUESTED = "oddsfeed.recovery_requested"
#: per event, how many ``sport_event_status`` statuses (with their timestamps) are kept to place a late one
IN_PLAY_HISTORY = 16
#: producers whose markets are live odds (1 = LiveOdds): in play while their event's status is not known
LIVE_PRODUCERS = frozenset({1})
#: producers of pre-match odds (3 = Ctrl): their status never takes an event out of play that another put in play
PREMATCH_PRODUCERS = frozenset({3})
#: per market (and event), at most this many digests of the messages applied in its last millisecond
SAME_MS_KEPT = 32
#: bodies larger than this are rejected unparsed (UOF messages are a few KiB; a full odds_change < 1 MiB)
MAX_MESSAGE_BYTES = 4 << 20

_FORBIDDEN = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY)", re.IGNORECASE)

# --- hardened XML --------------------------------------------------------------------------------


def _refuse(*_: object) -> None:
    raise ET.ParseError("DOCTYPE / entity declarations are not accepted")


def parse_xml(raw: bytes) -> ET.Element:
    """Parse one UOF body with ElementTree, hardened (see the module
    docstring). Raises FeedDecodeError ``too_large`` / ``invalid_xml``."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise FeedDecodeError("too_large", f"{len(raw)} bytes (at most {MAX_MESSAGE_BYTES})", raw[:4096])
    if _FORBIDDEN.search(raw):
        raise FeedDecodeError("invalid_xml", "DOCTYPE / entity declarations are not accepted", raw)
    parser = ET.XMLParser()
    expat: Any = getattr(parser, "parser", None)
    if expat is not None:  # belt and braces: the scan above already refused them
        expat.StartDoctypeDeclHandler = _refuse
        expat.EntityDeclHandler = _refuse
    try:
        parser.feed(raw)
        return parser.close()
    except ET.ParseError as exc:
        raise FeedDecodeError("invalid_xml", str(exc), raw) from None
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise FeedDecodeError("invalid_xml", f"{type(exc).__name__}: {exc}", raw) from None


# --- wire Structs (UnifiedFeed.xsd names; only what we read) ---------------------------------------

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
Spec = Annotated[str, msgspec.Meta(max_length=512)]
Ms = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Product = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
RequestId = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Factor = Annotated[float, msgspec.Meta(ge=0, le=1)]
DeadHeat = Annotated[float, msgspec.Meta(gt=0, le=1)]


class WireOutcome(msgspec.Struct, kw_only=True, gc=False, forbid_unknown_fields=False):
    id: Text
    odds: float | None = None
    active: int | None = None
    result: int | None = None
    void_factor: Factor | None = None
    dead_heat_factor: DeadHeat | None = None


class WireMarket(msgspec.Struct, kw_only=True, gc=False):
    id: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
    specifiers: Spec | None = None
    status: int | None = None
    void_reason: int | None = None
    outcomes: list[WireOutcome] = []


class WireClock(msgspec.Struct, kw_only=True, gc=False):
    """``<clock>``: times as ``"MM:SS"`` or whole minutes ``"MM"``."""

    match_time: str | None = None
    stoppage_time: str | None = None
    remaining_time: str | None = None
    remaining_time_in_period: str | None = None
    stopped: bool | None = None


class WirePeriodScore(msgspec.Struct, kw_only=True, gc=False):
    number: int
    match_status_code: int
    home_score: float
    away_score: float


class WireCounts(msgspec.Struct, kw_only=True, gc=False):
    home: int
    away: int


class WireEventStatus(msgspec.Struct, kw_only=True, gc=False):
    """``<sport_event_status>`` with its clock, period scores and red cards."""

    status: int
    match_status: int | None = None
    home_score: float | None = None
    away_score: float | None = None
    clock: WireClock | None = None
    period_scores: list[WirePeriodScore] = []
    red_cards: WireCounts | None = None


class _Msg(msgspec.Struct, kw_only=True, gc=False, tag_field="type"):
    product: Product
    timestamp: Ms


class _EventMsg(_Msg, kw_only=True):
    event_id: Text
    request_id: RequestId | None = None


class OddsChange(_EventMsg, kw_only=True, tag="odds_change"):
    markets: list[dict[str, Any]] = []
    event_status: int | None = None
    betting_status: int | None = None
    sport_event_status: dict[str, Any] | None = None


class BetStop(_EventMsg, kw_only=True, tag="bet_stop"):
    groups: Spec | None = None
    market_status: int | None = None


class BetSettlement(_EventMsg, kw_only=True, tag="bet_settlement"):
    certainty: int | None = None
    markets: list[dict[str, Any]] = []


class RollbackBetSettlement(_EventMsg, kw_only=True, tag="rollback_bet_settlement"):
    markets: list[dict[str, Any]] = []


class BetCancel(_EventMsg, kw_only=True, tag="bet_cancel"):
    start_time: Ms | None = None
    end_time: Ms | None = None
    superceded_by: Spec | None = None
    markets: list[dict[str, Any]] = []


class RollbackBetCancel(_EventMsg, kw_only=True, tag="rollback_bet_cancel"):
    start_time: Ms | None = None
    end_time: Ms | None = None
    markets: list[dict[str, Any]] = []


class FixtureChange(_EventMsg, kw_only=True, tag="fixture_change"):
    start_time: Ms | None = None
    next_live_time: Ms | None = None
    change_type: int | None = None


class Alive(_Msg, kw_only=True, tag="alive"):
    subscribed: int = 1


class SnapshotComplete(_Msg, kw_only=True, tag="snapshot_complete"):
    request_id: RequestId


class ProducerDown(_Msg, kw_only=True, tag="producer_down"):
    reason: Spec | None = None


class RecoveryRequested(_Msg, kw_only=True, tag="recovery_requested"):
    request_id: RequestId
    after: Ms | None = None


_MESSAGE = (OddsChange | BetStop | BetSettlement | RollbackBetSettlement | BetCancel | RollbackBetCancel
            | FixtureChange | Alive | SnapshotComplete | ProducerDown | RecoveryRequested)
_TAGS = frozenset({"odds_change", "bet_stop", "bet_settlement", "rollback_bet_settlement", "bet_cancel",
                   "rollback_bet_cancel", "fixture_change", "alive", "snapshot_complete", "producer_down",
                   "recovery_requested"})
_WITH_MARKETS = frozenset({"odds_change", "bet_settlement", "rollback_bet_settlement", "bet_cancel",
                           "rollback_bet_cancel"})
_SYNTHETIC = frozenset({"producer_down", "recovery_requested"})


def _element_dict(root: ET.Element) -> dict[str, Any]:
    """The root's attributes, ``type`` = its tag, ``markets`` = every
    ``<market>`` (attributes + ``outcomes``), ``event_status`` from
    ``<sport_event_status status>``, ``betting_status`` from ``<odds>``."""
    d: dict[str, Any] = dict(root.attrib)
    d["type"] = root.tag
    if root.tag in _WITH_MARKETS:
        markets = []
        for m in root.iter("market"):
            md: dict[str, Any] = dict(m.attrib)
            md["outcomes"] = [dict(o.attrib) for o in m.iter("outcome")]
            markets.append(md)
        d["markets"] = markets
    if root.tag == "odds_change":
        ses = root.find("sport_event_status")
        if ses is not None and "status" in ses.attrib:
            d["event_status"] = ses.attrib["status"]
        if ses is not None:
            sd: dict[str, Any] = dict(ses.attrib)
            clock = ses.find("clock")
            if clock is not None:
                sd["clock"] = dict(clock.attrib)
            sd["period_scores"] = [dict(p.attrib) for p in ses.iter("period_score")]
            red = ses.find("statistics/red_cards")
            if red is not None:
                sd["red_cards"] = dict(red.attrib)
            d["sport_event_status"] = sd
        odds = root.find("odds")
        if odds is not None and "betting_status" in odds.attrib:
            d["betting_status"] = odds.attrib["betting_status"]
    return d


def _decode(raw: bytes) -> _Msg:
    root = parse_xml(raw)
    if root.tag not in _TAGS:
        raise FeedDecodeError("unknown_type", f"unknown UOF message <{root.tag[:40]}>", raw)
    try:
        msg: _Msg = msgspec.convert(_element_dict(root), _MESSAGE, strict=False)
    except msgspec.ValidationError as exc:
        raise FeedDecodeError("invalid_schema", f"<{root.tag}>: {exc}", raw) from None
    return msg


class Control(msgspec.Struct, frozen=True, gc=False):
    """What the source needs of a control message: ``op`` (``alive`` /
    ``snapshot_complete``), ``product``, ``timestamp`` (ms), ``subscribed``
    (alive), ``request_id`` (snapshot_complete)."""

    op: str
    product: int
    timestamp: int
    subscribed: bool = True
    request_id: int | None = None


def peek_control(raw: bytes) -> Control | None:
    """The source's cheap look at a body: a :class:`Control` for ``alive``
    and ``snapshot_complete``, None for anything else (or anything
    unreadable: the normaliser rejects it)."""
    head = raw[:256]
    if b"<alive" not in head and b"<snapshot_complete" not in head:
        return None
    try:
        msg = _decode(raw)
    except FeedDecodeError:
        return None
    if isinstance(msg, Alive):
        return Control("alive", msg.product, msg.timestamp, subscribed=msg.subscribed != 0)
    if isinstance(msg, SnapshotComplete):
        return Control("snapshot_complete", msg.product, msg.timestamp, request_id=msg.request_id)
    return None


#: the root element's ``product`` attribute: an optional XML declaration, the root tag, attributes before it
_ROOT_PRODUCT = re.compile(
    rb"""\s*(?:<\?xml[^>]*\?>\s*)?<[A-Za-z_][\w.-]*(?:\s+[\w.:-]+\s*=\s*(?:"[^"<]*"|'[^'<]*'))*?"""
    rb"""\s+product\s*=\s*(?:"(\d{1,7})"|'(\d{1,7})')""")


def peek_product(raw: bytes) -> int | None:
    """The producer id of a body (its root element's ``product``), read
    without parsing from the first 1 KiB; None when that does not show one
    (the normaliser then reads the body, or rejects it)."""
    m = _ROOT_PRODUCT.match(raw, 0, 1024)
    if m is None:
        return None
    return int(m.group(1) or m.group(2))


def producer_down_payload(product: int, timestamp: int, reason: str) -> bytes:
    """Body of the synthetic :data:`PRODUCER_DOWN` payload. ``timestamp``:
    the producer's last known time (its last ``alive``, provider clock, ms)."""
    return f'<producer_down product="{int(product)}" timestamp="{int(timestamp)}" reason="{reason}"/>'.encode()


def recovery_requested_payload(product: int, timestamp: int, request_id: int, after: int | None) -> bytes:
    """Body of the synthetic :data:`RECOVERY_REQUESTED` payload."""
    a = f' after="{int(after)}"' if after is not None else ""
    return (f'<recovery_requested product="{int(product)}" timestamp="{int(timestamp)}" '
            f'request_id="{int(request_id)}"{a}/>').encode()


# --- cursor ---------------------------------------------------------------------------------------


def decode_cursor(text: str | None) -> dict[int, int]:
    """``"1=1718000000123;3=…"`` → ``{product: timestamp ms}`` ({} for None
    or anything unreadable)."""
    out: dict[int, int] = {}
    if not text:
        return out
    for part in text.split(";"):
        p, eq, ts = part.partition("=")
        if eq and p.isdigit() and ts.isdigit() and len(p) < 8 and len(ts) < 17:
            out[int(p)] = int(ts)
    return out


def encode_cursor(cursor: dict[int, int]) -> str:
    return ";".join(f"{p}={ts}" for p, ts in sorted(cursor.items()))


# --- vocabularies ---------------------------------------------------------------------------------

_MARKET_STATUS: dict[int, tuple[MarketStatus, str | None]] = {
    1: ("OPEN", None), -1: ("SUSPENDED", "suspended"), 0: ("INACTIVE", None), -2: ("SUSPENDED", "handed_over"),
    -3: ("SETTLED", None), -4: ("CANCELLED", "cancelled"),
}
_RESULTS = frozenset({"WINNER", "LOSER", "VOID", "PLACED"})
#: sport_event_status codes that are in play: 1 live, 2 suspended ("will continue"), 7 interrupted (a few minutes)
_IN_PLAY_CODES = frozenset({1, 2, 7})
_IN_PLAY_STATES = frozenset({"LIVE", "SUSPENDED", "INTERRUPTED"})
_EVENT_STATUS: dict[int, EventStatus] = {
    0: "NOT_STARTED", 1: "LIVE", 2: "SUSPENDED", 3: "ENDED", 4: "CLOSED", 5: "CANCELLED", 6: "DELAYED",
    7: "INTERRUPTED", 8: "POSTPONED", 9: "ABANDONED",
}
#: UOF match_status (and period_score match_status_code) -> period code (feed.models.EventState)
_MATCH_PERIOD: dict[int, str] = {
    6: "1h", 7: "2h", 31: "ht", 32: "break", 33: "et_ht", 34: "break", 41: "et1", 42: "et2", 50: "pen",
    13: "q1", 14: "q2", 15: "q3", 16: "q4", 40: "ot", 1: "p1", 2: "p2", 3: "p3", 8: "set1", 9: "set2",
    10: "set3", 11: "set4", 12: "set5", 301: "break", 302: "break", 303: "break",
}
#: periods in which the clock runs (unless the feed says ``stopped``)
_PLAYING = frozenset({"1h", "2h", "et1", "et2", "q1", "q2", "q3", "q4", "ot", "p1", "p2", "p3"})
_SPORTS = {"1": "soccer", "2": "basketball", "3": "baseball", "4": "ice_hockey", "5": "tennis", "6": "handball",
           "12": "rugby", "16": "american_football", "20": "table_tennis", "21": "cricket", "23": "volleyball"}


def _specifiers(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    out: dict[str, str] = {}
    for part in text.split("|"):
        k, _, v = part.partition("=")
        out[k] = v
    return out


def clock_seconds(text: str | None) -> int | None:
    """A UOF time ``"23:10"`` (minutes:seconds) or ``"23"`` (minutes) → seconds;
    None when absent. Raises FeedDecodeError ``invalid_schema`` otherwise."""
    if text is None or text == "":
        return None
    mm, colon, ss = text.partition(":")
    if not mm.isdigit() or len(mm) > 5 or (colon and not (ss.isdigit() and len(ss) <= 2)):
        raise FeedDecodeError("invalid_schema", f"time {text[:20]!r} is not MM:SS or MM")
    return int(mm) * 60 + (int(ss) if colon else 0)


def _whole(x: float | None, what: str) -> int | None:
    if x is None:
        return None
    if not (0 <= x <= 1e9) or x != int(x):
        raise FeedDecodeError("invalid_number", f"{what} {x!r} is not a whole number >= 0")
    return int(x)


def event_status_to_state(ses: WireEventStatus, event_id: str, source: str, ts: int, recv_ms: int) -> EventState:
    """A decoded ``<sport_event_status>`` → EventState (module docstring).
    Raises FeedDecodeError for a status or time that does not read."""
    status = _EVENT_STATUS.get(ses.status)
    if status is None:
        raise FeedDecodeError("invalid_schema", f"sport_event_status status {ses.status} is not 0-9")
    live = status == "LIVE"  # the clock runs only while live
    in_play = status in _IN_PLAY_STATES
    period = _MATCH_PERIOD.get(ses.match_status) if in_play and ses.match_status is not None else None
    clock = None
    c = ses.clock
    if c is not None and c.match_time:
        seconds = clock_seconds(c.match_time)
        assert seconds is not None
        running = (not c.stopped) if c.stopped is not None else (live and period in _PLAYING)
        clock = Clock(seconds=seconds, running=running and live, at=ts,
                      remaining_s=clock_seconds(c.remaining_time_in_period or c.remaining_time),
                      stoppage_s=clock_seconds(c.stoppage_time))
    periods = [PeriodScore(period=_MATCH_PERIOD.get(p.match_status_code, f"p{p.number}"),
                           home=_whole(p.home_score, "period home_score") or 0,
                           away=_whole(p.away_score, "period away_score") or 0)
               for p in sorted(ses.period_scores, key=lambda x: x.number)]
    home, away = _whole(ses.home_score, "home_score"), _whole(ses.away_score, "away_score")
    score = None
    if home is not None or away is not None or periods:
        score = Score(home=home if home is not None else sum(p.home for p in periods),
                      away=away if away is not None else sum(p.away for p in periods), periods=periods)
    cards = TeamCounts(home=ses.red_cards.home, away=ses.red_cards.away) if ses.red_cards is not None else None
    return EventState(event_id=event_id, source=source, status=status, in_play=in_play, period=period, clock=clock,
                      score=score, red_cards=cards, source_ts=ts, received_at=recv_ms)


def _bad_odds(o: WireOutcome) -> bool:
    """Odds that reject their market: not a price (1.01–1000), except the
    placeholder odds (0 ≤ x < 1.01) UOF may send for an inactive outcome."""
    if o.odds is None or is_price(o.odds):
        return False
    return not (o.active == 0 and math.isfinite(o.odds) and 0 <= o.odds < MIN_PRICE)


def market_id_of(event_id: str, market_id: int | str, specifiers: str | None, prefix: str = PREFIX) -> str:
    """Canonical market id: ``<prefix>:<event_id>:<market_id>[:<specifiers>]``."""
    base = f"{prefix}:{event_id}:{market_id}"
    return f"{base}:{specifiers}" if specifiers else base


def _is_stale(ts: int, last: int, seen: list[bytes] | None, digest: bytes) -> bool:
    """Whether a message part of ``ts`` (ms) is stale against ``last``, the
    timestamp of the last part applied, and ``seen``, the digests of the
    messages applied at ``last``: an older one is; one of the same ms only
    when it is one of those messages again (a redelivery), or when they are
    not known (``seen`` None)."""
    if ts != last:
        return ts < last
    return seen is None or digest in seen


def _late_part(m: _Market, msg: _Msg) -> bool:
    """Whether a part stale against a restored market's ``ts`` (the stored
    ``source_ts``, maybe moved by header changes past the market's own last
    part) applies anyway (module docstring, Ordering): a ``bet_stop`` /
    ``bet_settlement`` / ``bet_cancel`` to a market not closed or closed since
    the restore, a rollback only of a close made since the restore; never an
    ``odds_change``; never one older than the last part applied so since the
    restore."""
    late = m.unsure
    if late is None or msg.timestamp < late or isinstance(msg, OddsChange):
        return False
    if isinstance(msg, RollbackBetSettlement):
        return late > 0 and m.status == "SETTLED"
    if isinstance(msg, RollbackBetCancel):
        return late > 0 and m.status == "CANCELLED"
    # while the time is unsure only such parts change the market: closed with one applied = closed by it
    return m.status not in CLOSED_STATUSES or late > 0


def _stamp(obj: _Market | _Event, ts: int, digest: bytes) -> None:
    """Record that the message of ``digest`` applied at ``ts`` (not older
    than ``obj.ts``; at that very ms, ``seen`` unknown stays unknown; a
    restored market's own time is known from a newer part on)."""
    if ts > obj.ts:
        obj.ts, obj.seen = ts, [digest]
        if isinstance(obj, _Market):
            obj.unsure = None
    elif obj.seen is not None and digest not in obj.seen:
        obj.seen.append(digest)
        if len(obj.seen) > SAME_MS_KEPT:
            del obj.seen[0]


# --- cache ----------------------------------------------------------------------------------------


class _Event:
    __slots__ = ("before", "before_auth", "eff", "id", "in_play", "known", "live", "markets", "seen", "sport",
                 "start_time", "stop", "ts")

    def __init__(self, event_id: str) -> None:
        self.id = event_id
        self.sport: str | None = None
        self.start_time: int | None = None
        self.in_play = False  # as of the newest status (what an open market reads), when :attr:`known`
        self.known = False  # a status was observed (or restored): else a market reads its producer's default
        #: ``(timestamp ms, in play, from a prematch producer)`` of the last IN_PLAY_HISTORY statuses, in
        #: order (timestamp, then arrival)
        self.live: list[tuple[int, bool, bool]] = []
        #: ``(timestamp ms, in play)`` per entry of :attr:`live` after the prematch rule (module docstring)
        self.eff: list[tuple[int, bool]] = []
        #: in play before the oldest kept status: None when unknown (nothing before it was seen, a restored
        #: event, or statuses dropped off the history)
        self.before: bool | None = None
        #: in play per the last status of a producer that is not prematch before the oldest kept status
        self.before_auth: bool | None = None
        self.ts = 0  # timestamp of the last fixture_change applied
        self.seen: list[bytes] | None = []  # digests of the fixture_change messages applied at ``ts``
        #: the newest bet_stop: (timestamp ms, the status it sets, its digest) — for a market first seen after it
        self.stop: tuple[int, MarketStatus, bytes] | None = None
        self.markets: dict[str, None] = {}

    def observe(self, ts: int, live: bool, prematch: bool) -> bool:
        """A ``sport_event_status`` of ``ts`` (ms) said ``live`` (from a
        prematch producer when ``prematch``); a late one is placed by its
        timestamp (it changes :attr:`in_play` only if newest), one of the same
        ms and kind replaces the one it follows. Returns whether in play as of
        some time changed (else no market's ``in_play`` can have)."""
        was = self.in_play if self.known else None
        if not self.live or ts > self.live[-1][0]:  # the newest (the usual case): nothing before it changes
            auth = self.auth_now()
            now = live or (prematch and auth is True)
            last = self.eff[-1][1] if self.eff else self.before  # as of ts (and after) until now
            self.live.append((ts, live, prematch))
            self.eff.append((ts, now))
            if len(self.live) > IN_PLAY_HISTORY:
                self._forget()
            self.in_play, self.known = now, True
            return was != now or last != now
        probe = sorted({t for t, _ in self.eff} | {ts})  # where in play as of a time can change
        old = [self.in_play_at(t) for t in probe]
        # one status per ms and kind: a later one of the same ms replaces it (arrival order)
        hist = self.live = [e for e in self.live if e[0] != ts or e[2] != prematch]
        i = len(hist)
        while i > 0 and hist[i - 1][0] > ts:
            i -= 1
        hist.insert(i, (ts, live, prematch))
        auth = self.before_auth
        eff: list[tuple[int, bool]] = []
        for t, v, pre in hist:
            # a prematch producer never takes out of play what another producer put in play
            eff.append((t, v or (pre and auth is True)))
            if not pre:
                auth = v
        self.eff = eff
        if len(hist) > IN_PLAY_HISTORY:
            self._forget()
        self.in_play, self.known = eff[-1][1], True
        return was != self.in_play or old != [self.in_play_at(t) for t in probe]

    def _forget(self) -> None:
        """Drop the oldest status (the history is full): what was before the rest is no longer known."""
        _, gone_live, gone_pre = self.live.pop(0)
        del self.eff[0]
        if not gone_pre:
            self.before_auth = gone_live
        self.before = None

    def auth_now(self) -> bool | None:
        """In play per the newest status of a producer that is not prematch
        (None: none known)."""
        return next((v for _, v, pre in reversed(self.live) if not pre), self.before_auth)

    def auth_at(self, ts: int) -> bool | None:
        """In play as of ``ts`` per the last status of a producer that is not
        prematch at or before it (None: none known)."""
        for t, live, pre in reversed(self.live):
            if t <= ts and not pre:
                return live
        return self.before_auth

    def in_play_at(self, ts: int) -> bool | None:
        """In play as of ``ts`` (ms): the last status at or before it (after the
        prematch rule); None when unknown."""
        for t, live in reversed(self.eff):
            if t <= ts:
                return live
        return self.before


class _Market:
    __slots__ = ("canonical_specifiers", "closed_ts", "event", "header", "kind", "kind_sport", "market_id",
                 "need_image", "out_ts", "pre_cancel", "priced_by", "product", "raw_id", "reason", "seen", "sels",
                 "specifiers", "status", "ts", "unsure")

    def __init__(self, market_id: str, event: _Event, raw_id: str, specifiers: str | None) -> None:
        self.market_id = market_id
        self.event = event
        self.raw_id = raw_id
        self.specifiers = specifiers
        self.kind, self.canonical_specifiers = uof_market(raw_id, _specifiers(specifiers), sport=event.sport)
        self.kind_sport = event.sport  # the sport the kind was mapped with (None: the period is always kept)
        self.product: int | None = None  # the producer of the last part applied
        #: the producer of the last odds_change that priced it (set an outcome's odds): whose odds it carries
        #: (a bet_stop, settlement or odds-less handover of another producer does not change it)
        self.priced_by: int | None = None
        self.status: MarketStatus = "OPEN"
        self.reason: str | None = None
        self.sels: dict[str, Selection] = {}
        self.ts = 0  # timestamp of the last part applied to the market's own state (older parts are stale)
        #: digests of the messages whose parts were applied at ``ts`` (a redelivered one is a duplicate);
        #: None when not known (a restored market: a part of that very ms is then taken as applied)
        self.seen: list[bytes] | None = []
        self.out_ts = 0  # source_ts of the last update emitted (also moved by header changes of its event)
        #: restored from the store: its own last part's time is not known, only that it is at most ``ts``
        #: (the stored source_ts); meanwhile the timestamp of the last part applied at or before ``ts`` since
        #: the restore (0: none yet; see _late_part). None: ``ts`` is the market's own
        self.unsure: int | None = None
        self.closed_ts: int | None = None  # timestamp of the part that closed it (while closed)
        self.header: MarketHeader | None = None  # last emitted
        self.need_image = True
        self.pre_cancel: tuple[MarketStatus, str | None, dict[str, Selection]] | None = None

    def outcome_of(self, outcome_id: str) -> str | None:
        """The canonical outcome of one of this market's outcome ids (unmapped markets: the id)."""
        if is_unmapped(self.kind):
            return outcome_id
        return uof_outcome(self.raw_id, outcome_id)


class UofNormaliser:
    """Feeds UOF messages through a per-market cache (see the module docstring).

    source: the source's name; prefix: namespaces ids. :attr:`dropped`
    counts parts dropped without error (``stale``: a market part older than
    the market's last timestamp, or a message applied at that very ms again;
    ``stale_fixture``; ``unknown_market``: a bet_stop/settlement/cancel of a
    market never seen, which applies; ``windowed_cancel`` /
    ``windowed_cancel_rollback``: markets of a bet_cancel (rollback) of a
    time window, not applied; ``prematch_status``: a prematch producer's
    status overruled; ``stale_state``). :attr:`cursor`:
    per producer, the timestamp everything is applied up to. :attr:`up`:
    producers whose recovery is complete (their ``alive`` advances the
    cursor).
    """

    #: provider times of a live stream (see Normaliser.live_provider_times)
    live_provider_times = True

    def __init__(self, source: str = "uof", *, prefix: str = PREFIX,
                 max_future_skew_ms: int = MAX_FUTURE_SKEW_MS) -> None:
        self.source = source
        self.prefix = prefix
        self.max_future_skew_ms = max_future_skew_ms
        self.events: dict[str, _Event] = {}
        self.markets: dict[str, _Market] = {}
        self.cursor: dict[int, int] = {}
        self.up: set[int] = set()
        self.pending: dict[int, int] = {}  # product -> request id of the recovery in progress
        self.dropped: dict[str, int] = {}
        #: the last event state emitted per event id (``uof:<event_id>``)
        self.states: dict[str, EventState] = {}
        self._raw = b""
        self._digest = b""
        self._rejected: list[FeedDecodeError] = []

    # -- public ----------------------------------------------------------------------------------

    def restore(self, markets: Iterable[Market], cursor: str | None) -> None:
        """Seed the cache from this source's stored markets and cursor. The
        producers start down (not :attr:`up`): the source recovers each
        from the cursor before its ``alive`` advances it again."""
        pfx = self.prefix + ":"
        for m in markets:
            if m.source != self.source or not m.event_id or not m.event_id.startswith(pfx):
                continue
            eid = m.event_id[len(pfx):]
            ev = self.events.get(eid)
            if ev is None:
                ev = self.events[eid] = _Event(eid)
                ev.sport, ev.start_time, ev.in_play, ev.known = m.sport, m.start_time, m.in_play, True
                # its statuses are not known: a closed market keeps its stored in_play; an event stored in
                # play stays so against a prematch producer's status until a live producer says otherwise
                ev.before, ev.before_auth = None, (True if m.in_play else None)
            raw_id = m.market_type_raw or m.market_id[len(m.event_id) + 1:].split(":", 1)[0]
            spec = m.market_id[len(m.event_id) + 1 + len(raw_id) + 1:] or None
            mk = _Market(m.market_id, ev, raw_id, spec)
            mk.status, mk.reason, mk.ts, mk.out_ts = m.status, m.suspend_reason, m.source_ts, m.source_ts
            mk.closed_ts = m.source_ts if m.status in CLOSED_STATUSES else None
            mk.sels = {s.selection_id: s for s in m.selections}
            mk.header = m.header()
            mk.need_image = False
            mk.seen = None  # what was applied at its last ms is not known: that ms is not taken again
            # the stored source_ts is the market's out_ts (header changes of its event move it): its own last
            # part may be older (see _late_part)
            mk.unsure = 0
            self.markets[m.market_id] = mk
            ev.markets[m.market_id] = None
        self.cursor = decode_cursor(cursor)
        self.up.clear()

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Decode one UOF message (``channel``: its AMQP routing key, or a
        synthetic ``oddsfeed.*`` channel) and apply it to the cache.

        raw: the XML body. recv_ms: when it was received, ms since the epoch.
        Raises :class:`FeedDecodeError` for a message rejected whole (the
        cache is then untouched); markets rejected alone are in
        ``batch.rejected``.
        """
        msg = _decode(raw)
        tag = msg.__struct_config__.tag
        assert isinstance(tag, str)
        if tag in _SYNTHETIC and not channel.startswith("oddsfeed."):
            raise FeedDecodeError("unknown_type", f"<{tag}> is oddsfeed's own message, not the provider's", raw)
        if not isinstance(msg, (ProducerDown, RecoveryRequested)):
            try:
                check_provider_time(msg.timestamp, recv_ms, self.max_future_skew_ms, "timestamp")
            except FeedDecodeError as exc:
                raise FeedDecodeError(exc.reason, exc.detail, raw) from None
        batch = NormalisedBatch(op=tag, provider_ts=msg.timestamp)
        self._raw, self._rejected = raw, batch.rejected
        # the message's identity within its ms: a redelivered copy is a duplicate, another message is not
        self._digest = hashlib.blake2b(raw, digest_size=16).digest()
        if isinstance(msg, Alive):
            batch.heartbeat = True
            if msg.subscribed == 0:
                self.up.discard(msg.product)
                batch.requests.append(f"recovery:{msg.product}")
            elif msg.product in self.up:
                self._advance(msg.product, msg.timestamp, batch)
        elif isinstance(msg, SnapshotComplete):
            want = self.pending.get(msg.product)
            if want is None or want == msg.request_id:
                self.pending.pop(msg.product, None)
                self.up.add(msg.product)
                self._advance(msg.product, msg.timestamp, batch)
        elif isinstance(msg, RecoveryRequested):
            self.pending[msg.product] = msg.request_id
            self.up.discard(msg.product)
        elif isinstance(msg, ProducerDown):
            self._producer_down(msg, batch, recv_ms)
        elif isinstance(msg, FixtureChange):
            self._fixture_change(msg, batch, recv_ms, channel)
        elif isinstance(msg, BetStop):
            self._bet_stop(msg, batch, recv_ms, channel)
        else:
            assert isinstance(msg, (OddsChange, BetSettlement, RollbackBetSettlement, BetCancel, RollbackBetCancel))
            self._markets_message(msg, batch, recv_ms, channel)
        self._raw, self._rejected, self._digest = b"", [], b""
        return batch

    # -- helpers ---------------------------------------------------------------------------------

    def _advance(self, product: int, ts: int, batch: NormalisedBatch) -> None:
        if ts > self.cursor.get(product, 0):
            self.cursor[product] = ts
            batch.cursor = encode_cursor(self.cursor)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _event(self, event_id: str, channel: str) -> _Event:
        ev = self.events.get(event_id)
        if ev is None:
            ev = self.events[event_id] = _Event(event_id)
        if ev.sport is None:
            parts = channel.split(".")
            if len(parts) >= 8 and parts[4] not in ("-", ""):
                ev.sport = _SPORTS.get(parts[4], f"sport_{parts[4][:16]}")
        return ev

    def _market(self, ev: _Event, raw_id: str, specifiers: str | None) -> _Market:
        mid = market_id_of(ev.id, raw_id, specifiers, self.prefix)
        m = self.markets.get(mid)
        if m is None:
            m = self.markets[mid] = _Market(mid, ev, raw_id, specifiers)
            ev.markets[mid] = None
        return m

    def _reject(self, mid: str | None, reason: str, detail: str) -> None:
        self._rejected.append(FeedDecodeError(reason, detail, self._raw, market_id=mid))
        if mid is not None and mid in self.markets:
            self.markets[mid].need_image = True

    # -- messages --------------------------------------------------------------------------------

    def _producer_down(self, msg: ProducerDown, batch: NormalisedBatch, recv_ms: int) -> None:
        product = msg.product
        self.up.discard(product)
        for m in self.markets.values():
            if m.product not in (product, None) or m.status in CLOSED_STATUSES:
                continue
            m.status, m.reason = "SUSPENDED", "producer_down"
            if msg.timestamp >= m.ts:
                _stamp(m, msg.timestamp, self._digest)
            self._emit(m, False, [], msg.timestamp, batch, recv_ms)
            m.need_image = True  # confirmed again only by its next image (the recovery's odds_change)
            batch.unconfirm.append(m.market_id)

    def _fixture_change(self, msg: FixtureChange, batch: NormalisedBatch, recv_ms: int, channel: str) -> None:
        ev = self._event(msg.event_id, channel)
        if _is_stale(msg.timestamp, ev.ts, ev.seen, self._digest):
            self._drop("stale_fixture")
            batch.stale = True
            return
        _stamp(ev, msg.timestamp, self._digest)
        if msg.start_time is not None and msg.start_time != ev.start_time:
            ev.start_time = msg.start_time
            for mid in ev.markets:
                m = self.markets[mid]
                # a closed market's source_ts stays its own (its close's, or a later part's): stored, it is all a
                # restart knows of the market's time, and a rollback newer than the close must still apply
                self._emit(m, m.need_image, [], m.ts if m.status in CLOSED_STATUSES else msg.timestamp, batch,
                           recv_ms)

    def _bet_stop(self, msg: BetStop, batch: NormalisedBatch, recv_ms: int, channel: str) -> None:
        ev = self._event(msg.event_id, channel)
        status: MarketStatus = "INACTIVE" if msg.market_status == 0 else "SUSPENDED"
        if ev.stop is None or msg.timestamp >= ev.stop[0]:
            ev.stop = (msg.timestamp, status, self._digest)
        applied = stale = 0
        for mid in ev.markets:
            m = self.markets[mid]
            if _is_stale(msg.timestamp, m.ts, m.seen, self._digest):
                if not _late_part(m, msg):
                    stale += 1
                    continue
                m.unsure = msg.timestamp
            m.product = msg.product
            _stamp(m, msg.timestamp, self._digest)
            if m.status in CLOSED_STATUSES:
                continue
            applied += 1
            m.status, m.reason = status, "bet_stop"
            self._emit(m, m.need_image, [], msg.timestamp, batch, recv_ms)
        if stale:
            self.dropped["stale"] = self.dropped.get("stale", 0) + stale
            batch.stale = not applied

    def _markets_message(self, msg: OddsChange | BetSettlement | RollbackBetSettlement | BetCancel
                         | RollbackBetCancel, batch: NormalisedBatch, recv_ms: int, channel: str) -> None:
        ev = self._event(msg.event_id, channel)
        if isinstance(msg, (BetCancel, RollbackBetCancel)) and (msg.start_time is not None
                                                                 or msg.end_time is not None):
            self._windowed_cancel(ev, msg)
            return
        live_changed = False
        if isinstance(msg, OddsChange) and msg.event_status is not None:
            prematch = msg.product in PREMATCH_PRODUCERS
            live = msg.event_status in _IN_PLAY_CODES
            # a prematch producer's "not in play" against another producer's "in play": neither the
            # event's in_play (see _Event.observe) nor its state
            overruled = prematch and not live and ev.auth_at(msg.timestamp) is True
            if msg.sport_event_status is not None:
                if overruled:
                    self._drop("prematch_status")
                else:
                    self._event_state(ev, msg, batch, recv_ms)
            # the first status of a producer that is not prematch (as of then) decides the markets of a live
            # producer that read in play while none was known (see _in_play)
            first_auth = not prematch and ev.auth_at(msg.timestamp) is None
            # before the markets: a part closing one reads it
            live_changed = ev.observe(msg.timestamp, live, prematch) or first_auth
            batch.in_play = ev.in_play
        elif isinstance(msg, OddsChange) and msg.sport_event_status is not None:
            self._event_state(ev, msg, batch, recv_ms)  # no status attribute: rejected as a state
        applied = stale = 0
        touched: set[str] = set()
        for raw_market in msg.markets:
            try:
                wm = msgspec.convert(raw_market, WireMarket, strict=False)
            except msgspec.ValidationError as exc:
                spec = raw_market.get("specifiers")
                rid = raw_market.get("id")
                mid = (market_id_of(ev.id, rid, spec if isinstance(spec, str) else None, self.prefix)
                       if isinstance(rid, str) and rid.isdigit() else None)
                reason = "invalid_price" if ".odds`" in str(exc) else "invalid_schema"
                self._reject(mid, reason, f"<market>: {exc}")
                continue
            mid = market_id_of(ev.id, wm.id, wm.specifiers, self.prefix)
            known = self.markets.get(mid)
            late = False
            if known is not None and _is_stale(msg.timestamp, known.ts, known.seen, self._digest):
                if not _late_part(known, msg):
                    stale += 1
                    continue
                late = True  # a restored market's part older than its stored time (module docstring)
            if known is None and not isinstance(msg, OddsChange):
                self._drop("unknown_market")  # a settlement of a market we never had: nothing to settle
            bad = next((o for o in wm.outcomes if _bad_odds(o)), None) if isinstance(msg, OddsChange) else None
            if bad is not None:
                self._reject(mid, "invalid_price", f"outcome {bad.id} odds {bad.odds!r} not within 1.01..1000 "
                             f"in market {mid}")
                continue
            m = self._market(ev, str(wm.id), wm.specifiers)
            m.product = msg.product
            _stamp(m, msg.timestamp, self._digest)
            if late:
                m.unsure = msg.timestamp
            was_closed = m.status in CLOSED_STATUSES
            sids = self._apply_market(msg, m, wm)
            stop = ev.stop
            if (known is None and stop is not None and msg.timestamp < stop[0] and isinstance(msg, OddsChange)
                    and m.status not in CLOSED_STATUSES):
                # first seen in a part older than the event's last bet_stop (it arrived after it): that stop
                # holds it too, as it holds every market it reached (stamped with it: parts between are stale)
                m.status, m.reason = stop[1], "bet_stop"
                _stamp(m, stop[0], stop[2])
            if m.status not in CLOSED_STATUSES:
                m.closed_ts = None
            elif not was_closed or m.closed_ts is None:
                m.closed_ts = msg.timestamp
            applied += 1
            touched.add(mid)
            self._emit(m, m.need_image, sids, msg.timestamp, batch, recv_ms)
            batch.runner_changes += len(sids)
        if live_changed:  # every other market whose in_play this status changes follows (header change)
            for mid in ev.markets:
                m = self.markets[mid]
                if mid not in touched and m.header is not None and m.header.in_play != self._in_play(m):
                    self._emit(m, False, [], msg.timestamp, batch, recv_ms)
        if stale:
            self.dropped["stale"] = self.dropped.get("stale", 0) + stale
            batch.stale = not applied

    def _windowed_cancel(self, ev: _Event, msg: BetCancel | RollbackBetCancel) -> None:
        """A ``bet_cancel`` (or its rollback) of the bets placed in a time
        window: the markets keep trading and the model has no place for the
        window, so nothing of it applies (counted in :attr:`dropped` as
        ``windowed_cancel`` / ``windowed_cancel_rollback`` per market, logged)."""
        reason = "windowed_cancel" if isinstance(msg, BetCancel) else "windowed_cancel_rollback"
        n = len(msg.markets)
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        ids = [f"{m.get('id')}{':' + str(m['specifiers']) if m.get('specifiers') else ''}" for m in msg.markets[:8]]
        logger.info("%s: %s of %s (product %s, timestamp %s) for the bets placed %s..%s, markets %s%s: not applied "
                    "(the markets keep trading; bets of that window are void)", self.source,
                    msg.__struct_config__.tag, ev.id, msg.product, msg.timestamp, msg.start_time, msg.end_time,
                    ",".join(ids), " …" if n > len(ids) else "")

    def _event_state(self, ev: _Event, msg: OddsChange, batch: NormalisedBatch, recv_ms: int) -> None:
        """The event's state from the message's ``<sport_event_status>``."""
        eid = f"{self.prefix}:{ev.id}"
        prev = self.states.get(eid)
        if prev is not None and msg.timestamp < prev.source_ts:
            self._drop("stale_state")
            return
        try:
            ses = msgspec.convert(msg.sport_event_status, WireEventStatus, strict=False)
            state = event_status_to_state(ses, eid, self.source, msg.timestamp, recv_ms)
            check_event_state(state, recv_ms, max_future_skew_ms=self.max_future_skew_ms)
        except msgspec.ValidationError as exc:
            self._rejected.append(FeedDecodeError("invalid_schema", f"<sport_event_status>: {exc}", self._raw,
                                                  event_id=eid))
            return
        except FeedDecodeError as exc:
            self._rejected.append(FeedDecodeError(exc.reason, f"<sport_event_status>: {exc.detail}", self._raw,
                                                  event_id=eid))
            return
        if not state.same_content(prev):
            remember(self.states, eid, state)
            batch.event_states.append(state)

    def _apply_market(self, msg: _Msg, m: _Market, wm: WireMarket) -> list[str]:
        """Apply one ``<market>`` to the cache; the changed selection ids."""
        changed: list[str] = []
        if isinstance(msg, OddsChange):
            m.status, m.reason = _MARKET_STATUS.get(wm.status if wm.status is not None else 1, ("SUSPENDED", "unknown"))
            m.pre_cancel = None
            closing = m.status in CLOSED_STATUSES
            for o in wm.outcomes:
                prev = m.sels.get(o.id)
                if o.odds is not None and is_price(o.odds):
                    price: float | None = o.odds
                    m.priced_by = msg.product  # whose odds it carries (see _in_play)
                else:
                    price = prev.price if prev else None
                status: SelectionStatus = "SUSPENDED" if o.active == 0 else "ACTIVE"
                if closing and prev is not None and prev.status in _RESULTS:
                    # odds of a settled / cancelled market: its results (and their factors) stand
                    self._set(m, msgspec.structs.replace(prev, price=price), changed)
                    continue
                self._set(m, Selection(selection_id=o.id, status=status, price=price), changed)
        elif isinstance(msg, BetSettlement):
            m.status, m.reason = "SETTLED", None
            for o in wm.outcomes:
                prev = m.sels.get(o.id)
                res: SelectionStatus
                if o.void_factor is not None and o.void_factor >= 1:
                    res = "VOID"
                elif o.result == 1:
                    res = "WINNER"
                elif o.result == 0:
                    res = "LOSER"
                else:
                    continue
                self._set(m, Selection(selection_id=o.id, status=res, price=prev.price if prev else None,
                                       void_factor=o.void_factor, dead_heat_factor=o.dead_heat_factor), changed)
        elif isinstance(msg, RollbackBetSettlement):
            m.status, m.reason = "SUSPENDED", "settlement_rolled_back"
            for sid, s in list(m.sels.items()):
                self._set(m, msgspec.structs.replace(s, status="SUSPENDED", void_factor=None, dead_heat_factor=None),
                          changed)
        elif isinstance(msg, BetCancel):
            if m.status != "CANCELLED":
                m.pre_cancel = (m.status, m.reason, dict(m.sels))
            m.status, m.reason = "CANCELLED", "bet_cancel"
            for sid, s in list(m.sels.items()):
                self._set(m, msgspec.structs.replace(s, status="VOID"), changed)
        elif isinstance(msg, RollbackBetCancel):
            if m.pre_cancel is not None:
                m.status, m.reason, sels = m.pre_cancel
                m.pre_cancel = None
                for s in sels.values():
                    self._set(m, s, changed)
            elif m.status == "CANCELLED":
                m.status, m.reason = "SUSPENDED", "cancel_rolled_back"
        return changed

    @staticmethod
    def _set(m: _Market, s: Selection, changed: list[str]) -> None:
        if s.outcome is None:
            outcome = m.outcome_of(s.selection_id)
            if outcome is not None:
                s = msgspec.structs.replace(s, outcome=outcome)
        if m.sels.get(s.selection_id) != s:
            m.sels[s.selection_id] = s
            if s.selection_id not in changed:
                changed.append(s.selection_id)

    def _emit(self, m: _Market, image: bool, sids: list[str], ts: int, batch: NormalisedBatch, recv_ms: int) -> None:
        header = self._header(m)
        if not image and header == m.header and not sids:
            return
        # never back in time (the book drops an older update), even for a late part applied now
        m.out_ts = max(m.out_ts, m.ts, ts)
        update = MarketUpdate(
            market_id=m.market_id, source=self.source, image=image,
            # a closed market's header always travels: after the close the book takes only definitions
            header=header if image or header != m.header or m.status in CLOSED_STATUSES else None,
            selections=list(m.sels.values()) if image else [m.sels[s] for s in sids],
            source_ts=m.out_ts, received_at=recv_ms)
        try:  # the bounds every update must meet (odds were checked on the way in: a safety net)
            check_market(update.market_id, update.header, update.selections, None, update.source_ts, None, recv_ms,
                         self.max_future_skew_ms)
        except FeedDecodeError as exc:
            exc.raw = self._raw
            self._rejected.append(exc)
            m.need_image = True
            return
        batch.updates.append(update)
        m.header = header
        if image:
            m.need_image = False

    @staticmethod
    def _in_play(m: _Market) -> bool:
        """An open market: its event's newest status; a closed one: the
        status as of its close (its last emitted value when not known). An
        event whose status is not known: in play for a market of a live
        producer (:data:`LIVE_PRODUCERS`: the producer whose odds it carries,
        else of its last part), else not. A market of a live producer is in
        play, too, while every status known (as of then) is a prematch
        producer's (:data:`PREMATCH_PRODUCERS`): Ctrl's "not started" never
        makes LiveOdds' odds pre-match ones, in whatever order they come."""
        ev = m.event
        live_odds = m.priced_by in LIVE_PRODUCERS
        if m.status not in CLOSED_STATUSES or m.closed_ts is None:
            if not ev.known:
                return (m.product if m.priced_by is None else m.priced_by) in LIVE_PRODUCERS
            return ev.in_play or (live_odds and ev.auth_now() is None)
        live = ev.in_play_at(m.closed_ts)
        if live is None:
            if m.header is not None:
                return m.header.in_play
            if not ev.known:
                return (m.product if m.priced_by is None else m.priced_by) in LIVE_PRODUCERS
            return ev.in_play or (live_odds and ev.auth_now() is None)
        return live or (live_odds and ev.auth_at(m.closed_ts) is None)

    def _header(self, m: _Market) -> MarketHeader:
        ev = m.event
        if ev.sport is not None and m.kind_sport != ev.sport:  # the sport decides a period's key (regular time …)
            m.kind, m.canonical_specifiers = uof_market(m.raw_id, _specifiers(m.specifiers), sport=ev.sport)
            m.kind_sport = ev.sport
        return MarketHeader(
            event_id=f"{self.prefix}:{ev.id}", sport=ev.sport, market_type=m.kind, market_type_raw=m.raw_id,
            specifiers=m.canonical_specifiers, status=m.status, suspend_reason=m.reason, in_play=self._in_play(m),
            start_time=ev.start_time)


def from_spec(spec: SourceSpec, settings: Settings) -> UofNormaliser:
    """The normaliser of a ``--source uof=…`` spec (``prefix=``, default ``uof``)."""
    return UofNormaliser(spec.name, prefix=spec.get("prefix") or PREFIX)
