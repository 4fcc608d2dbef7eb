"""Node state: the markets one API node holds, its log positions, source
health, staleness, and the once-per-node preparation of log entries.

No I/O and no Starlette: the reader (:mod:`streaming.reader`) feeds it, the
hub and REST read it. Every time is integer ms since the Unix epoch (UTC).

Staleness (DESIGN §6) of a market at ``now_ms``::

    last_confirmed = max(market.received_at,
                         health[market.source].last_message_at   if that source is UP or DEGRADED
                                                                 and market.session == health.session)
    age_ms         = max(0, now_ms - last_confirmed)
    stale          = source is DOWN (or its health lease ran out: ``ingest_gone``)
                     or market.session is None while the source has one (a change was lost)
                     or age_ms > threshold(market.sport, live_for_limits(market, now_ms))

``live_for_limits`` (:func:`live_for_limits`): the market is in play
(``in_play``) or its ``start_time`` (ms since the epoch, when known) is at
or before ``now_ms`` — an event that has started is judged by the in-play
limits even while its provider has not said so yet (a poller's next poll,
a push provider's scores message); the market's ``in_play`` as served stays
the provider's. A market that was fresh under the pre-match limit turns
stale at its start time with no new message when its age then exceeds the
in-play limit: every health refresh the node re-judges every market at the
refresh's ``now`` (:meth:`NodeState.stale_ids`) and announces the change.

``threshold`` is ``settings.stale_in_play_ms`` / ``stale_pre_match_ms``
unless ``settings.stale_after_ms_by_sport`` names the sport:
``"soccer=8000"`` (both phases), ``"tennis:in_play=5000"``,
``"horse_racing:pre_match=120000"`` (a phase-specific entry wins; the sport
is spelled as markets carry it — ``Soccer`` / ``football`` read ``soccer``,
:func:`feed.matching.canonical_sport`); a
source that advertises a longer ``stale_after_ms`` in its health (a poller
confirms its markets only once per polling interval) raises it to that.

Source heartbeats thus confirm quiet markets — only those the source's
current upstream session imaged or updated (``Market.session``): markets an
earlier run or an earlier upstream left behind, and markets whose updates
were rejected or dropped (session cleared), age from their last change and
turn stale. A market whose source has no health record is judged by
``received_at`` alone.

A heartbeat confirmation is only as good as what this node has read: the
ingest confirms its source after *storing* everything it received, but the
node may not have read those writes yet (its reader of one partition is
reconnecting after a Redis failover while the health record, on another
node, already says "confirmed just now"). So the node vouches for a health
record's ``last_message_at`` in partition ``p`` only once its position in
``p``'s log has reached the log's head as read *after* that record
(:meth:`NodeState.set_health` with ``heads``); until then the markets of
``p`` keep the confirmation of an earlier record that was reached.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import msgspec

from feed.errors import OddsfeedError
from feed.models import (
    CLOCK_SKEW, CLOSED_STATUSES, ENCODER, MAX_CLOCK_SKEW_MS, Delta, Market, SourceHealth, apply_delta, clock_ahead,
    effective_health, lease_expired, lost_change,
)
from feed.settings import Settings
from feed.linker import SUMMARY_DECODER, CanonicalSummary
from feed.matching import CANONICAL_PREFIX, canonical_sport, record_id
from feed.store import StoredLink, partition_of
from feed.taxonomy import key_type, market_key, parse_market_key, race_event_id
from streaming.encoding import (
    LazyDeltaMessage, Message, StreamId, delta_message, encode_token, market_with_age, parse_stream_id,
)

logger = logging.getLogger(__name__)

#: how long (ms, past the skew itself) a node corrects the stamps of a source once seen skewed
SKEW_MEMORY_MS = 600_000

__all__ = [
    "DeltaInfo", "Filter", "FilterError", "MovedAt", "NodeOptions", "NodeState", "PreparedDelta", "PreparedEntry",
    "ReplayRing", "ReplayedDelta",
    "image_of", "live_for_limits", "now_ms", "parse_stale_by_sport",
]

MARKET_STATUSES = ("OPEN", "SUSPENDED", "INACTIVE", "CLOSED", "SETTLED", "CANCELLED")
_FILTER_LIST_MAX = 1000
_NO_IDS: frozenset[str] = frozenset()
_FILTER_ITEM_MAX = 256


def now_ms() -> int:
    """Wall clock in integer ms since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """Tuning of one API node (units in the names).

    read_block_ms: XREAD BLOCK per reader call (must stay below the Redis
    socket timeout of 5 s), and the longest a reader goes without checking
    the epoch and the log's oldest id; read_count: most log entries per read;
    health_refresh_ms: how often source health is reloaded from Redis;
    send_timeout_s: deadline of one transport write (a stuck client is
    dropped); replay_ring_entries / replay_ring_bytes: recent prepared log
    entries kept in memory for fast resumes (0 = always read Redis);
    replay_max_entries: most log entries a resume may replay from Redis
    (beyond it the client gets a fresh snapshot); max_subscriptions: per
    WebSocket connection; ws_max_message_bytes: largest inbound WS message;
    ws_ping_interval_s / ws_ping_timeout_s: WebSocket keepalive (a peer
    that does not answer a ping within the timeout is closed, 1011);
    max_conflate_ms: largest ``conflate_ms`` a subscription may ask for;
    ready_max_lag_ms: /ready says not ready when a reader is further behind
    the log than this; stall_after_s: a reader whose loop has not turned for
    this long is reported stalled (never hangs silently); tune_gc: make the
    cyclic GC run rarely (its full collections over the node's many small
    objects stalled delivery by hundreds of ms; see feed.ingest.tune_gc).
    """

    read_block_ms: int = 1000
    read_count: int = 1000
    health_refresh_ms: int = 1000
    send_timeout_s: float = 5.0
    replay_ring_entries: int = 10_000
    replay_ring_bytes: int = 64 << 20
    replay_max_entries: int = 10_000
    max_subscriptions: int = 100
    ws_max_message_bytes: int = 64 << 10
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 20.0
    max_conflate_ms: int = 120_000
    ready_max_lag_ms: int = 5_000
    stall_after_s: float = 15.0
    tune_gc: bool = True


class FilterError(OddsfeedError, ValueError):
    """A filter value the client must fix; ``str()`` says what to fix."""


MarketKeys = tuple[str | None, str | None, str | None, bool, str | None, str, str, str | None]
"""(sport, event_id, competition, in_play, canonical event id, canonical
market key, source, bookmaker) of a market: what filters look at."""

Newly = tuple[str, MarketKeys, MarketKeys | None]
"""(market_id, keys, keys before — None for a market new to the node) of a market
that may newly match a subscription (:attr:`PreparedEntry.newly`)."""


def keys_of(m: Market, canonical: str | None = None) -> MarketKeys:
    """A market's filter keys; ``canonical``: its canonical event id (None: not linked yet)."""
    return (m.sport, m.event_id, m.competition, m.in_play, canonical, market_key(m.market_type, m.specifiers, m.sport),
            m.source, m.bookmaker)


class Filter(msgspec.Struct, frozen=True, kw_only=True):
    """What a subscription (or a REST list) wants. None = any.

    sport / competition / event / market / market_type: sets of accepted
    values (a query string gives them comma-separated); ``event`` takes
    provider event ids and canonical event ids (``ev:…``: every book's
    markets of that event); ``market_type`` takes canonical market types
    (``total``) or full canonical market keys (``total:line=2.5``, see
    :func:`feed.taxonomy.market_key`); in_play: True = only in-play
    markets, False = only not in-play; source: ingest source names (as in
    ``/v1/sources``); bookmaker: the markets' ``bookmaker`` (a market
    without one never matches a bookmaker filter). All given conditions
    must hold.
    """

    sport: frozenset[str] | None = None
    competition: frozenset[str] | None = None
    event: frozenset[str] | None = None
    market: frozenset[str] | None = None
    market_type: frozenset[str] | None = None
    in_play: bool | None = None
    source: frozenset[str] | None = None
    bookmaker: frozenset[str] | None = None
    #: a tenant's allow-lists (sport, source, bookmaker; streaming.tenants.Grant.restrict), None: no tenant
    #: restriction. The conditions above already include them; this says which markets are out of the
    #: tenant's sight (a market that leaves it gets ``removed``, as one that leaves any condition does —
    #: never the delta that moved it; :meth:`hides` keeps what it may not see out of states and merges)
    visible: tuple[frozenset[str] | None, frozenset[str] | None, frozenset[str] | None] | None = None

    def hides(self, keys: "MarketKeys") -> bool:
        """Whether a market with these keys is outside the tenant's allow-lists."""
        v = self.visible
        if v is None:
            return False
        sports, sources, books = v
        return ((sports is not None and keys[0] not in sports) or (sources is not None and keys[6] not in sources)
                or (books is not None and keys[7] not in books))

    @classmethod
    def parse(cls, *, sport: object = None, competition: object = None, event: object = None,
              market: object = None, in_play: object = None, market_type: object = None,
              source: object = None, bookmaker: object = None) -> "Filter":
        """Build a filter from query-string or JSON values. Lists may be a
        comma-separated string or a JSON list of strings; in_play accepts
        true/false/1/0 (string or JSON bool). Raises FilterError."""
        return cls(sport=_id_set("sport", sport), competition=_id_set("competition", competition),
                   event=_id_set("event", event), market=_id_set("market", market),
                   market_type=market_types(market_type), in_play=parse_bool("in_play", in_play),
                   source=_id_set("source", source), bookmaker=_id_set("bookmaker", bookmaker))

    def match(self, market_id: str, keys: MarketKeys) -> bool:
        """Whether a market with these keys passes the filter."""
        sport, event_id, competition, in_play, canonical, mkey, source, bookmaker = keys
        if self.source is not None and source not in self.source:
            return False
        if self.bookmaker is not None and bookmaker not in self.bookmaker:
            return False
        if self.market is not None and market_id not in self.market:
            return False
        if self.event is not None and event_id not in self.event and canonical not in self.event:
            return False
        if self.market_type is not None and mkey not in self.market_type \
                and key_type(mkey) not in self.market_type:
            return False
        if self.sport is not None and sport not in self.sport:
            return False
        if self.competition is not None and competition not in self.competition:
            return False
        return self.in_play is None or self.in_play == in_play

    def match_market(self, m: Market, canonical: str | None = None) -> bool:
        """Whether market ``m`` (of canonical event ``canonical``) passes the filter."""
        return self.match(m.market_id, keys_of(m, canonical))


def market_types(value: object) -> frozenset[str] | None:
    """``market_type`` filter values: canonical types (``total``) or market
    keys (``total:line=2.5``, checked by :func:`feed.taxonomy.parse_market_key`).
    Raises FilterError saying what to fix."""
    types = _id_set("market_type", value)
    for t in types or ():
        if ":" in t and not t.startswith("raw:"):
            try:
                parse_market_key(t)
            except ValueError as exc:
                raise FilterError(str(exc)) from None
    return types


def parse_bool(name: str, value: object) -> bool | None:
    """true/false/1/0 (any case) or a JSON bool → bool; None/"" → None. Raises FilterError."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes"):
            return True
        if v in ("false", "0", "no"):
            return False
    raise FilterError(f"{name} must be true or false, not {value!r}")


def _id_set(name: str, value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = [x.strip() for x in value.split(",")]
    elif isinstance(value, list) and all(isinstance(x, str) for x in value):
        items = [x.strip() for x in value]
    else:
        raise FilterError(f"{name} must be a string (comma-separated values allowed) or a list of strings")
    items = [x for x in items if x]
    if not items:
        return None
    if len(items) > _FILTER_LIST_MAX:
        raise FilterError(f"{name} lists at most {_FILTER_LIST_MAX} values, got {len(items)}")
    for x in items:
        if len(x) > _FILTER_ITEM_MAX:
            raise FilterError(f"{name} values are at most {_FILTER_ITEM_MAX} characters")
    return frozenset(items)


class DeltaInfo:
    """What one delta message changed (``Message.info``): the hub merges messages of one
    market from it (conflation, collapsing a slow consumer's queue)."""

    __slots__ = ("market_id", "sel_ids", "has_header", "has_tv", "is_image", "removed")

    def __init__(self, market_id: str, sel_ids: tuple[str, ...], has_header: bool, has_tv: bool,
                 is_image: bool) -> None:
        self.market_id = market_id
        self.sel_ids = sel_ids
        self.has_header = has_header
        self.has_tv = has_tv
        self.is_image = is_image
        self.removed = False


class PreparedDelta:
    """One applied delta, decoded and encoded once per node.

    keys: the market's filter keys (:data:`MarketKeys`) after the delta; prev:
    the keys before it when they differ (else None) — then the market may
    newly match a subscription, and ``image`` holds the same change as a
    ``kind="image"`` message (the whole market) for it; or it may leave one,
    which gets ``removed`` (built once, on the first such subscription: ``gone``).

    sel_ids / has_header / has_tv / is_image: what the delta changed (the
    hub merges several deltas of one market into one message from them).
    """

    __slots__ = ("market_id", "keys", "prev", "msg", "image", "sel_ids", "has_header", "has_tv", "is_image",
                 "gone")
    gone: Message

    def __init__(self, market_id: str, keys: MarketKeys, prev: MarketKeys | None,
                 msg: Message, image: Message | None, delta: Delta | None = None) -> None:
        self.market_id = market_id
        self.keys = keys
        self.prev = prev
        self.msg = msg
        self.image = image
        # (``gone`` is left unset: set by :meth:`removed`, for a market whose keys moved, so a delta
        # that moves nothing costs nothing more)
        if delta is None:
            self.sel_ids: tuple[str, ...] = ()
            self.has_header = self.has_tv = False
            self.is_image = True
        else:
            self.sel_ids = tuple(s.selection_id for s in delta.selections)
            self.has_header = delta.header is not None
            self.has_tv = delta.traded_volume is not None
            self.is_image = delta.kind == "image"
        # what the hub needs to merge the messages (no reference back to self: no cycle for the GC)
        msg.info = DeltaInfo(market_id, self.sel_ids, self.has_header, self.has_tv, self.is_image)
        if image is not None:
            image.info = DeltaInfo(market_id, (), False, False, True)

    def message_for(self, f: Filter) -> Message | None:
        """The message a subscription with filter ``f`` gets, or None:
        the delta when the market matched before and matches now; the image
        when it matches now but did not before; ``removed`` when it matched
        before and does not now — whichever key moved it out (sport,
        competition, event or canonical event, market type, in play,
        bookmaker, a tenant's sight): the client drops it, and need not judge
        the filter itself (it cannot judge them all: an ``ev:`` canonical
        event, a filter it does not implement). ``removed`` carries the
        delta's tokens, so a resume position moves exactly as the delta's
        would have."""
        now = f.match(self.market_id, self.keys)
        if self.prev is None:  # (the hot path: the keys did not move)
            return self.msg if now else None
        before = f.match(self.market_id, self.prev)
        if now:
            return self.msg if before else (self.image or self.msg)
        return self.removed() if before else None

    def removed(self) -> Message:
        """``removed`` for this delta's market, with the delta's tokens (built once per delta, on
        the first subscription it leaves: shared, with its frames, by every other)."""
        try:
            return self.gone
        except AttributeError:
            gone = self.gone = removed_message(self.market_id, self.msg.token, self.msg.prev_token)
            return gone

    def nbytes(self) -> int:
        return self.msg.size_hint() * 2 + (len(self.image.json) * 2 if self.image is not None else 0)


def removed_message(market_id: str, token: bytes | None, prev_token: bytes | None) -> Message:
    """``{"type":"removed","market_id":…}``: the market left what the subscription sees — its
    filter (a change of its keys, or a relink out of an ``ev:`` canonical event) or what its
    tenant may see — drop it; nothing of its new state is sent. ``token`` / ``prev_token``: those
    of the change that moved it (None for a relink, which is no log entry)."""
    info = DeltaInfo(market_id, (), False, False, False)
    info.removed = True
    return Message(b"removed", b'{"type":"removed","market_id":' + ENCODER.encode(market_id) + b',"reason":"not_visible"}',
                   token, prev_token, info)


MovedAt = Callable[[int, StreamId, str], tuple[bool, "MarketKeys | None"]]
"""(partition, entry key, market id) → (whether this node applied that log entry itself, so knows
what it did; the market's filter keys before it when that entry moved them, else None): what a
Redis replay asks the hub (:meth:`streaming.hub.Hub.moved_at`)."""


def _may_hold(f: Filter, market_id: str, source: str) -> bool:
    """Whether a subscription with filter ``f`` may hold a market whatever its keys were (the
    conditions no change moves: market id, source)."""
    return (f.market is None or market_id in f.market) and (f.source is None or source in f.source)


def _keyed(f: Filter) -> bool:
    """Whether ``f`` selects on a key a change can move (sport, competition, event, market type,
    in play, bookmaker) or a tenant's sight: if not, a market matched it before a change exactly
    when it matches it after."""
    return (f.sport is not None or f.competition is not None or f.event is not None or f.market_type is not None
            or f.in_play is not None or f.bookmaker is not None or f.visible is not None)


class ReplayedDelta(PreparedDelta):
    """A delta of a market the replay re-keys, read back from Redis for one resume
    (:meth:`NodeState.prepare_replay`): the log holds each change's keys after it, not before,
    so those come from the replay itself (the keys the market's previous header or image set)
    or from what this node saw when it applied the entry; ``after`` / ``before`` None = not
    known (a change before this node can vouch for: ``unknown``).

    As a live or ring delta does (:meth:`PreparedDelta.message_for`), the delta goes to a
    subscription that matches the market before and after it, and one that held a market the
    delta moves out of its filter gets ``removed`` (with the delta's tokens) and drops it.
    Where the keys before are not known, a subscription it matches now gets it as newly
    matching (below) and every other subscription that may hold the market gets ``removed``
    (one that does not hold it has nothing to drop). A market that may newly match is sent as
    ``image``: the market as the node holds it now (the replay has no image of it as it was
    then; the replay's later deltas of it are older and clients skip them), while it still
    matches the subscription — else as the delta (a market it leaves again later: a client that
    does not hold it ignores the delta, and the later move out is a ``removed``)."""

    __slots__ = ("after", "before", "unknown", "cur_keys", "source")

    def __init__(self, market_id: str, after: MarketKeys | None, before: MarketKeys | None, unknown: bool,
                 msg: Message, image: Message | None, cur_keys: MarketKeys | None, delta: Delta) -> None:
        super().__init__(market_id, after or cur_keys or (None, None, None, False, None, "", delta.source, None),
                         None, msg, image, delta)
        self.after = after
        #: the keys before when the delta moved them (None: moved none, or ``unknown``)
        self.before = before
        self.unknown = unknown
        self.cur_keys = cur_keys
        self.source = delta.source

    def message_for(self, f: Filter) -> Message | None:
        mid, after = self.market_id, self.after
        if not _keyed(f):  # no move changes what it gets: the delta, as any other
            return self.msg if _may_hold(f, mid, self.source) else None
        if after is None:  # its keys at the time are not known
            return self.msg if _may_hold(f, mid, self.source) else None
        now = f.match(mid, after)
        if self.unknown:
            if now:
                return self._newly(f)
            # it may have matched before (then it left the filter: drop it) or not (nothing to drop)
            return self.removed() if _may_hold(f, mid, self.source) else None
        before = self.before
        if before is None:
            return self.msg if now else None
        was = f.match(mid, before)
        if now:
            return self.msg if was else self._newly(f)
        return self.removed() if was else None

    def unsure(self, f: Filter) -> bool:
        """Whether ``f`` may have held the market while its keys are not known (and they matter to it)."""
        return self.unknown and _keyed(f) and _may_hold(f, self.market_id, self.source)

    def _newly(self, f: Filter) -> Message:
        image, ck = self.image, self.cur_keys
        if not self.is_image and image is not None and ck is not None and f.match(self.market_id, ck):
            return image
        return self.msg


class PreparedEntry:
    """One delta-log entry after the node applied it.

    partition / entry_id / key: where it sits in the log; token: the resume
    token once it is delivered (the node's positions right after it);
    deltas: the deltas the node applied (duplicates skipped); newly: the
    markets among them that may newly match a subscription — new to the node,
    or their filter keys moved — as ``(market_id, keys, keys before or None)``,
    or None (the hub sends their event's state with them, see
    :meth:`streaming.hub.Hub.dispatch`).
    """

    __slots__ = ("partition", "entry_id", "key", "token", "prev_token", "deltas", "nbytes", "newly")

    def __init__(self, partition: int, entry_id: str, token: bytes, deltas: list[PreparedDelta],
                 prev_token: bytes | None = None, newly: list[Newly] | None = None) -> None:
        self.partition = partition
        self.entry_id = entry_id
        self.key: StreamId = parse_stream_id(entry_id)
        self.token = token
        self.prev_token = prev_token
        self.deltas = deltas
        n = 200
        for d in deltas:  # PreparedDelta.nbytes() inlined (once per entry, on the hot path)
            n += d.msg.size_hint() * 2
            if d.image is not None:
                n += len(d.image.json) * 2
        self.nbytes = n
        self.newly = newly


class ReplayRing:
    """The most recent prepared entries, in dispatch order, bounded by count
    and bytes; serves resumes without touching Redis.

    base[p] is the position of partition p just before the oldest entry held
    (nothing of p after base[p] is missing), so a token whose every position
    is ≥ base is covered. ``appended`` counts every entry ever appended and
    ``generation`` changes on :meth:`reset`, so a replay built from the ring
    (the hub shares one per token and filter) can be extended later with
    :meth:`after` instead of rebuilt.
    """

    def __init__(self, max_entries: int, max_bytes: int, positions: Sequence[str]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: deque[PreparedEntry] = deque()
        self.nbytes = 0
        self.base: list[StreamId] = [parse_stream_id(p) for p in positions]
        self.appended = 0
        self.generation = 0

    def reset(self, positions: Sequence[str]) -> None:
        self.entries.clear()
        self.nbytes = 0
        self.base = [parse_stream_id(p) for p in positions]
        self.generation += 1

    def append(self, entry: PreparedEntry) -> None:
        self.appended += 1
        if self.max_entries <= 0:
            self.base[entry.partition] = entry.key
            return
        self.entries.append(entry)
        self.nbytes += entry.nbytes
        while self.entries and (len(self.entries) > self.max_entries or self.nbytes > self.max_bytes):
            old = self.entries.popleft()
            self.nbytes -= old.nbytes
            self.base[old.partition] = old.key

    def covers(self, keys: Sequence[StreamId]) -> bool:
        return len(keys) == len(self.base) and all(k >= b for k, b in zip(keys, self.base))

    def since(self, keys: Sequence[StreamId]) -> Iterator[PreparedEntry]:
        """Entries after ``keys`` (per partition), in dispatch order."""
        for e in self.entries:
            if e.key > keys[e.partition]:
                yield e

    def after(self, count: int) -> list[PreparedEntry] | None:
        """The entries appended after the first ``count`` appends (``count`` ≤ ``appended``),
        in order; None when some of them have already left the ring."""
        n = self.appended - count
        if n <= 0:
            return []
        if n > len(self.entries):
            return None
        out = list(itertools.islice(reversed(self.entries), n))
        out.reverse()
        return out


class NodeState:
    """Markets, indexes, positions, epoch and source health of one node.

    markets: market_id → Market (the latest applied); positions[p]: id of
    the last log entry applied from partition p ("0-0" = none); epoch: the
    store epoch the state belongs to; generation: bumped on every reload so
    in-flight reads of the old state are discarded; health: source → SourceHealth.
    """

    def __init__(self, settings: Settings, partitions: int, options: NodeOptions | None = None) -> None:
        self.settings = settings
        self.options = options or NodeOptions()
        self.partitions = partitions
        self.markets: dict[str, Market] = {}
        self.by_event: dict[str, set[str]] = {}
        self.by_sport: dict[str, set[str]] = {}
        self.by_source: dict[str, set[str]] = {}
        #: race event id (``bf:28587288.1650``) -> the race's market ids: a Betfair meeting's
        #: markets split by scheduled start (:func:`feed.taxonomy.race_event_id`), what a
        #: race's event state (race progress) belongs to
        self.by_race: dict[str, set[str]] = {}
        #: canonical event id -> market ids of every book (see :meth:`canonical_of`)
        self.by_canonical: dict[str, set[str]] = {}
        #: event record id -> its stored link; canonical id -> summary (from the linker)
        self.links: dict[str, StoredLink] = {}
        self.canon: dict[str, CanonicalSummary] = {}
        self.links_version = -1
        self.positions: list[str] = ["0-0"] * partitions
        self.epoch: str | None = None
        self.generation = 0
        self.loaded = False
        self.health: dict[str, SourceHealth] = {}
        self.changes = 0
        #: (partition, market, held seq, seq received) of the last per-market seq gap seen in the log,
        #: or of a seq at or below the held one past ``load_heads`` (a lineage the node never loaded),
        #: or (held seq 0) of a delta past ``load_heads`` for a market the node does not hold
        self.seq_gap: tuple[int, str, int, int] | None = None
        #: per partition: the log head read right after the snapshots were loaded ("0-0": none)
        self.load_heads: list[str] = ["0-0"] * partitions
        #: partition -> why it is to be reloaded from the store: from the moment a reader finds that
        #: this node may miss a change of it (a seq gap, a trim past its position, an undecodable
        #: entry, an error between an apply and the fan-out) until the reload swaps it in, its
        #: markets are stale — the node knows they may be wrong (:meth:`mark_rebuilding`)
        self.rebuilding: dict[int, str] = {}
        #: partition -> how many loads of it had completed when it was last marked rebuilding
        self._marked_after: dict[int, int] = {}
        self.token: bytes = encode_token(None, self.positions, self.links_version)
        #: the token before the last set_links (what a relink's messages carry as their token before)
        self.links_token_before: bytes = self.token
        #: apply_entry: the entry's markets that may newly match a subscription (PreparedEntry.newly)
        self._newly: list[Newly] | None = None
        self.ring = ReplayRing(self.options.replay_ring_entries, self.options.replay_ring_bytes, self.positions)
        self._json: dict[str, bytes] = {}
        self._stale_in_play_ms = settings.stale_in_play_ms
        self._stale_pre_match_ms = settings.stale_pre_match_ms
        self._stale_by_sport = parse_stale_by_sport(getattr(settings, "stale_after_ms_by_sport", ()))
        #: source -> how far (ms) its last health record read ahead of this node's clock, for the
        #: sources seen stamped more than MAX_CLOCK_SKEW_MS ahead (see :meth:`set_health`)
        self.skewed: dict[str, int] = {}
        #: source -> (the largest skew seen, ms; node time after which it is forgotten, 0 while the
        #: source is still skewed): the times its ingest stamped while ahead stay in its markets
        #: (``received_at``) after the clocks agree again, ``skew`` ms too young — ages of its
        #: markets count from ``received_at − skew`` meanwhile (see :meth:`stamp_time`)
        self._skew_seen: dict[str, tuple[int, int]] = {}
        #: source -> per partition: the newest ``last_message_at`` this node has read far enough to vouch for
        self._vouched: dict[str, list[int]] = {}
        #: per partition: (log head read after the record, source, last_message_at) not reached yet
        self._waiting: list[list[tuple[StreamId, str, int]]] = [[] for _ in range(partitions)]

    # -- staleness -----------------------------------------------------------

    def source_health(self, source: str, now: int) -> SourceHealth | None:
        """The health of ``source`` as it stands at ``now`` (:meth:`effective`);
        None when it has no record."""
        h = self.health.get(source)
        return self.effective(h, now) if h is not None else None

    def effective(self, h: SourceHealth, now: int) -> SourceHealth:
        """``h`` as this node must take it at ``now``: DOWN / ``ingest_gone``
        once its lease ran out, DOWN / ``clock_skew`` while it is stamped ahead
        of this node's clock or its source was last seen so (see
        :func:`feed.models.effective_health` and :attr:`skewed`)."""
        h = effective_health(h, now)
        if h.state != "DOWN" and self.skewed and h.source in self.skewed:
            return msgspec.structs.replace(h, state="DOWN", reason=CLOCK_SKEW)
        return h

    def mark_rebuilding(self, partitions: Iterable[int] | None, reason: str, loaded: Sequence[int]) -> None:
        """``partitions`` (None = all) are to be reloaded: their markets read as
        stale until :meth:`replace_partitions` swaps them in. ``loaded``: per
        partition, the loads completed so far (see :meth:`loaded_since_mark`)."""
        for p in range(self.partitions) if partitions is None else partitions:
            self.rebuilding[p] = reason
            self._marked_after[p] = loaded[p]

    def loaded_since_mark(self, p: int, loads: int) -> None:
        """Partition ``p`` has completed ``loads`` loads and a reload asked for it is skipped
        (loaded since it was asked): its rebuilding mark goes — unless a newer problem marked
        it after that load (its own reload, still to come, clears it)."""
        if self._marked_after.get(p, -1) < loads:
            self.rebuilding.pop(p, None)
            self._marked_after.pop(p, None)

    def rebuilding_reason(self, market_id: str) -> str | None:
        """Why the partition of ``market_id`` is being reloaded, else None."""
        if not self.rebuilding:
            return None
        return self.rebuilding.get(partition_of(market_id, self.partitions))

    def stamp_time(self, source: str, stamped: int, now: int) -> int:
        """A time ``source``'s ingest stamped (``received_at``), as this node's clock reads it:
        less the largest skew seen of that source, while it is remembered (a stamp made while
        its clock ran ahead reads that much too young; one made since reads older than it is
        until a confirmation supersedes it — the safe side)."""
        if self._skew_seen:
            seen = self._skew_seen.get(source)
            if seen is not None:
                if seen[1] == 0 or now < seen[1]:
                    return stamped - seen[0]
                del self._skew_seen[source]
        return stamped

    def stamp_problem(self, m: Market, now: int) -> str | None:
        """Why market ``m``'s age cannot be told (its receipt was stamped more than
        ``MAX_CLOCK_SKEW_MS`` after ``now``, this node's clock), else None."""
        ahead = self.stamp_time(m.source, m.received_at, now) - now
        if ahead > MAX_CLOCK_SKEW_MS:
            return f"market {m.market_id} was stamped {ahead} ms ahead of this node's clock (clock skew)"
        return None

    def changed_at(self, source: str, received_at: int, source_ts: int | None, h: SourceHealth | None,
                   now: int) -> tuple[int, bool]:
        """(when a change of ``source`` counts as current, stamped ahead): its receipt as this
        node's clock reads it (:meth:`stamp_time`), or — it arrived late, a backlog — its
        provider time + the source's ``max_lag_ms``; and whether the receipt was stamped more
        than ``MAX_CLOCK_SKEW_MS`` after ``now`` (its age is then not known). Markets and event
        states alike."""
        last = self.stamp_time(source, received_at, now) if self._skew_seen else received_at
        ahead = last - now > MAX_CLOCK_SKEW_MS
        if h is not None and h.max_lag_ms and source_ts and source_ts + h.max_lag_ms < last:
            last = source_ts + h.max_lag_ms
        return last, ahead

    def age_stale(self, m: Market, now: int) -> tuple[int, bool]:
        """(age_ms, stale) of market ``m`` at ``now`` (see the module docstring)."""
        h = self.health.get(m.source)
        last, down = self.changed_at(m.source, m.received_at, m.source_ts, h, now)
        if self.rebuilding and partition_of(m.market_id, self.partitions) in self.rebuilding:
            down = True
        if h is not None:
            if (h.state == "DOWN" or lease_expired(h, now) or lost_change(m, h) or clock_ahead(h, now)
                    or (self.skewed and m.source in self.skewed)):
                down = True  # (a lost change: stale until its source re-images the market)
            elif h.last_message_at > last and m.session is not None and m.session == h.session:
                vouched = self._vouched.get(m.source)
                if vouched is not None:
                    confirmed = min(h.last_message_at, vouched[partition_of(m.market_id, self.partitions)])
                    if confirmed > last:
                        last = confirmed
        age = now - last
        if age < 0:
            age = 0
        if down:
            return age, True
        live = live_for_limits(m, now)
        limit = self._stale_by_sport.get((m.sport, live)) if self._stale_by_sport else None
        if limit is None:
            limit = self._stale_in_play_ms if live else self._stale_pre_match_ms
        if h is not None and h.stale_after_ms > limit:
            # a polled source confirms only once per interval: its own limit (≈ 2.5 × the
            # in-play interval + the request deadline) is the earliest honest "stale"
            limit = h.stale_after_ms
        return age, age > limit

    def stale_after_ms(self, sport: str | None, in_play: bool) -> int:
        """The age (ms) after which a market of ``sport`` / phase is stale (``in_play``: judged
        by the in-play limits — for a market, :func:`live_for_limits`, not its flag alone)."""
        limit = self._stale_by_sport.get((sport, in_play))
        if limit is not None:
            return limit
        return self._stale_in_play_ms if in_play else self._stale_pre_match_ms

    def market_json(self, m: Market, now: int) -> bytes:
        """Market JSON with ``age_ms``/``stale`` (the encoded market is cached until it changes)."""
        raw = self._json.get(m.market_id)
        if raw is None:
            raw = self._json[m.market_id] = ENCODER.encode(m)
        age, stale = self.age_stale(m, now)
        return market_with_age(raw, age, stale)

    # -- canonical events ----------------------------------------------------

    def canonical_id(self, event_id: str | None, sport: str | None, start_time: int | None) -> str | None:
        """The canonical event id of a provider event (per race for racing):
        its link, or ``ev:<record id>`` while it has none (an unmatched event
        is its own canonical event; the linker gives it that same id)."""
        if event_id is None:
            return None
        rid = record_id(event_id, sport, start_time)
        link = self.links.get(rid)
        return link.c if link is not None else CANONICAL_PREFIX + rid

    def reversed_of(self, m: Market) -> bool:
        """Whether market ``m``'s event names the sides the other way round
        from its canonical event (its home outcome is the canonical away)."""
        if m.event_id is None or not self.links:
            return False
        link = self.links.get(record_id(m.event_id, m.sport, m.start_time))
        return link is not None and link.r

    def state_markets(self, event_id: str) -> set[str] | frozenset[str]:
        """The ids of the markets an event state of ``event_id`` belongs to: the provider
        event's markets, or a race's (``bf:<race id>``: :attr:`by_race`)."""
        return self.by_event.get(event_id) or self.by_race.get(event_id) or _NO_IDS

    def state_events(self, m: Market) -> tuple[str, ...]:
        """The event ids whose states belong to market ``m``: its event's, and its race's
        when it is a Betfair race market."""
        race = race_event_id(m.event_id, m.sport, m.start_time)
        if m.event_id is None:
            return ()
        return (m.event_id,) if race is None else (m.event_id, race)

    def canonical_of(self, m: Market) -> str | None:
        """The canonical event id of market ``m`` (see :meth:`canonical_id`)."""
        return self.canonical_id(m.event_id, m.sport, m.start_time)

    def keys_of(self, m: Market) -> MarketKeys:
        """Market ``m``'s filter keys, with its canonical event."""
        return keys_of(m, self.canonical_of(m))

    def set_links(self, version: int, links: dict[str, StoredLink],
                  canon: dict[str, bytes]) -> dict[str, tuple[str | None, bool]]:
        """Adopt the linker's links (version ``version``) and re-index every
        market by canonical event. Returns the markets whose canonical event
        or orientation changed: market id → its (canonical event id, reversed)
        before the change (what :meth:`streaming.hub.Hub.relinked` needs to
        tell the subscriptions it left)."""
        before = {m.market_id: (self.canonical_of(m), self.reversed_of(m)) for m in self.markets.values()}
        summaries: dict[str, CanonicalSummary] = {}
        for key, raw in canon.items():
            try:
                summaries[key] = SUMMARY_DECODER.decode(raw)
            except msgspec.MsgspecError:
                continue
        self.links, self.canon, self.links_version = links, summaries, version
        # tokens from now on say these links (a resume elsewhere judges relinks by it) — once what
        # the relink sends (Hub.relinked) is queued: those messages go with the token from before
        self.links_token_before = self.token
        self.token = encode_token(self.epoch, self.positions, version)
        index: dict[str, set[str]] = {}
        for m in self.markets.values():
            cid = self.canonical_of(m)
            if cid is not None:
                index.setdefault(cid, set()).add(m.market_id)
        self.by_canonical = index
        self.changes += 1
        return {mid: was for mid, m in self.markets.items()
                if (was := before[mid]) != (self.canonical_of(m), self.reversed_of(m))}

    # -- queries -------------------------------------------------------------

    def matching(self, f: Filter) -> Iterator[Market]:
        """Markets passing ``f``, using the market/event/sport index when the filter allows."""
        markets = self.markets
        ids: Iterable[str]
        if f.market is not None:
            ids = f.market
        elif f.event is not None:
            ids = {mid for ev in f.event for mid in (*self.by_event.get(ev, ()), *self.by_canonical.get(ev, ()))}
        elif f.sport is not None:
            ids = [mid for sp in f.sport for mid in self.by_sport.get(sp, ())]
        else:
            for m in markets.values():
                if f.match(m.market_id, self.keys_of(m)):
                    yield m
            return
        for mid in ids:
            found = markets.get(mid)
            if found is not None and f.match(mid, self.keys_of(found)):
                yield found

    # -- mutation ------------------------------------------------------------

    def _index_add(self, m: Market) -> None:
        if m.event_id is not None:
            self.by_event.setdefault(m.event_id, set()).add(m.market_id)
        if m.sport is not None:
            self.by_sport.setdefault(m.sport, set()).add(m.market_id)
        self.by_source.setdefault(m.source, set()).add(m.market_id)
        race = race_event_id(m.event_id, m.sport, m.start_time)
        if race is not None:
            self.by_race.setdefault(race, set()).add(m.market_id)
        cid = self.canonical_of(m)
        if cid is not None:
            self.by_canonical.setdefault(cid, set()).add(m.market_id)

    def _index_remove(self, m: Market) -> None:
        pairs: tuple[tuple[dict[str, set[str]], str | None], ...] = (
            (self.by_event, m.event_id), (self.by_sport, m.sport), (self.by_source, m.source),
            (self.by_canonical, self.canonical_of(m)), (self.by_race, race_event_id(m.event_id, m.sport, m.start_time)))
        for index, key in pairs:
            if key is None:
                continue
            ids = index.get(key)
            if ids is not None:
                ids.discard(m.market_id)
                if not ids:
                    del index[key]

    def _put(self, m: Market, old: Market | None) -> None:
        if old is not None and (old.event_id != m.event_id or old.sport != m.sport or old.source != m.source
                                or old.start_time != m.start_time):
            self._index_remove(old)
            self._index_add(m)
        elif old is None:
            self._index_add(m)
        self.markets[m.market_id] = m
        self._json.pop(m.market_id, None)

    def prune_closed(self, now: int, retention_ms: int) -> list[str]:
        """Drop the markets closed, settled or cancelled whose last change
        (``received_at``) is more than ``retention_ms`` old (0 = none): from
        snapshots, lists, counts and the price check (then ``UNKNOWN_MARKET``
        instead of ``MARKET_CLOSED``: a refusal either way). Their ingest drops
        them from the store by the same rule. Returns the ids dropped."""
        if retention_ms <= 0:
            return []
        limit = now - retention_ms
        gone = [m for m in self.markets.values() if m.status in CLOSED_STATUSES and m.received_at < limit]
        for m in gone:
            self._index_remove(m)
            del self.markets[m.market_id]
            self._json.pop(m.market_id, None)
        if gone:
            self.changes += 1
        return [m.market_id for m in gone]

    def replace_partitions(self, loaded: dict[int, tuple[str, list[Market]]], epoch: str | None) -> None:
        """Swap in freshly loaded partitions ({p: (position, snapshots)}) and
        the epoch; bumps ``generation`` and resets the replay ring."""
        P = self.partitions
        for m in [m for m in self.markets.values() if partition_of(m.market_id, P) in loaded]:
            self._index_remove(m)
            del self.markets[m.market_id]
            self._json.pop(m.market_id, None)
        for p, (position, markets) in loaded.items():
            self.rebuilding.pop(p, None)
            self._marked_after.pop(p, None)
            self.positions[p] = position
            for m in markets:
                self._put(m, self.markets.get(m.market_id))
            self._reach(p)
        self.epoch = epoch
        self.generation += 1
        self.changes += 1
        self.loaded = True
        self.token = encode_token(epoch, self.positions, self.links_version)
        self.ring.reset(self.positions)

    def apply_entry(self, p: int, entry_id: str, deltas: list[Delta], now: int,
                    encode: bool = True) -> PreparedEntry | None:
        """Apply one log entry of partition ``p`` (skipping deltas with
        ``seq`` ≤ the held one), advance the position and return the entry
        prepared for the hub (None when nothing was applied). ``encode`` False:
        no one is connected to receive it now — a delta that moves no market
        gets a :class:`~streaming.encoding.LazyDeltaMessage` (encoded if a resume
        ever replays it from the ring)."""
        prepared: list[PreparedDelta] = []
        self._newly = None
        prev_token = self.token
        self.positions[p] = entry_id
        self.token = token = encode_token(self.epoch, self.positions, self.links_version)
        if self._waiting[p]:
            self._reach(p)
        markets = self.markets
        for d in deltas:
            old = markets.get(d.market_id)
            if old is not None and d.seq <= old.seq:
                if self.seq_gap is None and parse_stream_id(entry_id) > parse_stream_id(self.load_heads[p]):
                    # logged after everything this node loaded, yet not newer than what it holds:
                    # the store went back (an older snapshot restored under the same epoch) and a
                    # writer goes on from there — skipping it would freeze the market at a state
                    # the store no longer has; the reader reloads the partition
                    self.seq_gap = (p, d.market_id, old.seq, d.seq)
                continue
            if d.kind == "image":
                new = d.market
            elif old is None:
                # a delta never creates a market. Logged after everything this node loaded, it
                # changes a market the store holds and this node does not: one the node dropped
                # (closed past the retention) before its ingest did, reopened by that delta.
                # Skipping it would leave the market unknown here while every other node serves
                # it; the reader reloads the partition (the store's snapshot has it)
                if self.seq_gap is None and parse_stream_id(entry_id) > parse_stream_id(self.load_heads[p]):
                    self.seq_gap = (p, d.market_id, 0, d.seq)
                continue
            elif d.seq != old.seq + 1:
                # a change is missing from the log (it should never be): applying this one would
                # serve a book that differs from the provider's; the reader reloads the partition
                # and subscribers get a recovered:false snapshot instead of a silent gap
                self.seq_gap = (p, d.market_id, old.seq, d.seq)
                continue
            else:
                new = apply_delta(old, d)
            if new is None:
                continue
            self._put(new, old)
            prepared.append(self._prepare(d, old, new, now, token, prev_token, encode))
        if not prepared:
            return None
        self.changes += 1
        entry = PreparedEntry(p, entry_id, token, prepared, prev_token, self._newly)
        self.ring.append(entry)
        return entry

    def _prepare(self, d: Delta, old: Market | None, new: Market, now: int, token: bytes,
                 prev_token: bytes | None, encode: bool = True) -> PreparedDelta:
        age, stale = self.age_stale(new, now)
        keys = self.keys_of(new)
        prev = None
        if old is None:  # new to the node: may newly match subscriptions (as may a move, below)
            self._note_newly((d.market_id, keys, None))
        elif d.kind == "image" or d.header is not None:  # only a header moves the keys
            prev = self.keys_of(old)
            if prev == keys:
                prev = None
            else:
                self._note_newly((d.market_id, keys, prev))
        if d.kind == "image":
            msg = delta_message(d, market_json=self.market_json(new, now), age_ms=age, stale=stale,
                                sent_at=now, token=token, prev_token=prev_token)
            return PreparedDelta(d.market_id, keys, prev, msg, None, d)
        if prev is None and not encode:
            return PreparedDelta(d.market_id, keys, None, LazyDeltaMessage(d, age_ms=age, stale=stale, sent_at=now,
                                                                            token=token, prev_token=prev_token), None, d)
        msg = delta_message(d, market_json=None, age_ms=age, stale=stale, sent_at=now, token=token,
                            prev_token=prev_token)
        image = None
        if prev is not None:
            image = delta_message(image_of(new, d), market_json=self.market_json(new, now), age_ms=age,
                                  stale=stale, sent_at=now, token=token, prev_token=prev_token)
        return PreparedDelta(d.market_id, keys, prev, msg, image, d)

    def _note_newly(self, item: Newly) -> None:
        if self._newly is None:
            self._newly = [item]
        else:
            self._newly.append(item)

    def _replay_keys(self, d: Delta, cur: Market | None) -> MarketKeys:
        """A replayed delta's keys after it: from its own market or header, else the market's
        as the node holds it now."""
        if d.market is not None:
            return self.keys_of(d.market)
        if d.header is not None:
            h = d.header
            return (h.sport, h.event_id, h.competition, h.in_play,
                    self.canonical_id(h.event_id, h.sport, h.start_time), market_key(h.market_type, h.specifiers, h.sport),
                    d.source, h.bookmaker)
        if cur is not None:
            return self.keys_of(cur)
        return (None, None, None, False, None, "", d.source, None)

    def replay_held(self, rows: Iterable[tuple[int, str, list[Delta]]], moved_at: MovedAt) -> dict[str, MarketKeys | None]:
        """For a Redis replay of ``rows`` ((partition, entry id, deltas), in replay order): the
        filter keys, as of the resume position, of every market a replayed delta re-keys (an
        image or a header: it may move the market into or out of a filter) — None where not
        known. Known from what this node saw when it applied the first such delta
        (``moved_at``, see :meth:`prepare_replay`); the others' deltas keep their keys as
        the node holds them now (nothing in the replay moved them)."""
        held: dict[str, MarketKeys | None] = {}
        for p, entry_id, deltas in rows:
            key: StreamId | None = None
            for d in deltas:
                mid = d.market_id
                if (d.market is None and d.header is None) or mid in held:
                    continue
                if key is None:
                    key = parse_stream_id(entry_id)
                seen, before = moved_at(p, key, mid)
                held[mid] = (before or self._replay_keys(d, self.markets.get(mid))) if seen else None
        return held

    def prepare_replay(self, p: int, entry_id: str, deltas: list[Delta], positions: Sequence[str],
                       now: int, prev_position: str, held: dict[str, MarketKeys | None] | None = None,
                       moved_at: MovedAt | None = None) -> PreparedEntry:
        """A log entry read back from Redis for one resuming client (not
        applied to state): keys come from the delta's own header/market, else
        from the market as the node holds it now; ``positions`` are the
        client's positions after this entry (its token).

        held (:meth:`replay_held`, updated here as the replay goes): the keys in force of the
        markets the replay re-keys, so a delta that moves one out of a filter reaches the
        subscriptions that held it (and one that moves it in sends the market), as live and
        from the ring (:class:`ReplayedDelta`); moved_at(p, entry key, market id) → (this
        node applied that entry, so knows; the market's keys before it when it moved them,
        else None)."""
        token = encode_token(self.epoch, positions, self.links_version)
        before = list(positions)
        before[p] = prev_position
        prev_token = encode_token(self.epoch, before, self.links_version)
        out: list[PreparedDelta] = []
        key: StreamId | None = None
        asked: set[str] = set()  # the markets moved_at was asked about for this entry
        for d in deltas:
            cur = self.markets.get(d.market_id)
            ref = d.market or cur
            if ref is not None:
                age, stale = self.age_stale(msgspec.structs.replace(ref, received_at=d.received_at), now)
            else:
                age, stale = max(0, now - d.received_at), True
            mj = None
            if d.market is not None:
                mj = market_with_age(ENCODER.encode(d.market), age, stale)
            msg = delta_message(d, market_json=mj, age_ms=age, stale=stale, sent_at=now, token=token,
                                prev_token=prev_token)
            mid = d.market_id
            if held is None or mid not in held:
                out.append(PreparedDelta(mid, self._replay_keys(d, cur), None, msg, None, d))
                continue
            was = held[mid]  # (None: not known)
            if d.market is None and d.header is None:  # moves nothing: its keys are the ones in force
                out.append(ReplayedDelta(mid, was, None, was is None, msg, None, None, d))
                continue
            keys = self._replay_keys(d, cur)
            held[mid] = keys
            if moved_at is not None and mid not in asked:
                # only for the market's first re-keying delta in the entry: moved_at knows its keys
                # before the ENTRY; a later delta's keys before are the ones the entry's earlier
                # delta set (``was``, from held) — c1 → c2 → c3 is c1 → c2, then c2 → c3
                asked.add(mid)
                if key is None:
                    key = parse_stream_id(entry_id)
                seen, moved_from = moved_at(p, key, mid)
                if seen:
                    was = moved_from or keys  # (not moved by it: its keys before are its keys after)
            image = None
            if d.kind != "image" and cur is not None and (was is None or was != keys):
                # it may newly match a subscription: the market as held now (see ReplayedDelta)
                cage, cstale = self.age_stale(cur, now)
                image = delta_message(image_of(cur), market_json=self.market_json(cur, now), age_ms=cage,
                                      stale=cstale, sent_at=now, token=token, prev_token=prev_token)
            out.append(ReplayedDelta(mid, keys, None if was == keys else was, was is None, msg, image,
                                     self.keys_of(cur) if cur is not None else None, d))
        return PreparedEntry(p, entry_id, token, out, prev_token)

    def set_health(self, sources: Iterable[SourceHealth], heads: Sequence[str] | None = None, *,
                   now: int | None = None) -> None:
        """Replace the source health records. ``heads``: each partition's
        newest log entry id, read *after* the records; a record's
        confirmation counts in partition ``p`` once this node's position
        reaches ``heads[p]`` (see the module docstring). None: the caller
        holds every write already (tests, tools) and vouches at once.
        ``now``: when the records were read, ms (default: this node's clock) —
        a record stamped more than ``MAX_CLOCK_SKEW_MS`` after it marks its
        source skewed (:attr:`skewed`)."""
        old = self.health
        self.health = {h.source: h for h in sources}
        if now is None:
            now = now_ms()
        for h in self.health.values():
            if h.updated_at > now + MAX_CLOCK_SKEW_MS:
                # stamped ahead of this node's clock: the writer's clock runs ahead, and every age and
                # lease measured against it reads younger than it is — until a record stamped within
                # the bound arrives, the source is DOWN here (a writer that dies skewed sends none:
                # without this its last record would read alive and current for the skew plus a lease)
                if h.source not in self.skewed:
                    logger.error("source %s: health record stamped %d ms ahead of this node's clock; its prices "
                                 "are not vouched for until the clocks agree (NTP)", h.source, h.updated_at - now)
                skew = h.updated_at - now
                self.skewed[h.source] = skew
                seen = self._skew_seen.get(h.source)
                self._skew_seen[h.source] = (max(skew, seen[0]) if seen is not None else skew, 0)
            elif h.source in self.skewed:
                prev = old.get(h.source)
                if prev is None or prev.updated_at != h.updated_at:  # a new record, within the bound
                    del self.skewed[h.source]
                    skew = self._skew_seen.get(h.source, (0, 0))[0]
                    # stamps made while it ran ahead are at most ``skew`` in the future of now: past
                    # this they read older than any stale limit or are superseded by confirmations
                    self._skew_seen[h.source] = (skew, now + skew + SKEW_MEMORY_MS)
                    logger.warning("source %s: its health records are within %d ms of this node's clock again",
                                   h.source, MAX_CLOCK_SKEW_MS)
        for name in [n for n in self.skewed if n not in self.health]:
            del self.skewed[name]
        P = self.partitions
        for name in [n for n in self._vouched if n not in self.health]:
            del self._vouched[name]
        if heads is None:
            self._vouched = {h.source: [h.last_message_at] * P for h in self.health.values()}
            return
        for h in self.health.values():
            self._vouched.setdefault(h.source, [0] * P)
        for p, head in enumerate(heads):
            waiting = self._waiting[p]
            hid = parse_stream_id(head)
            waiting.extend((hid, h.source, h.last_message_at) for h in self.health.values())
            if len(waiting) > _WAITING_MAX:  # a reader that cannot keep up: keep the newest (conservative)
                del waiting[:len(waiting) - _WAITING_MAX]
            self._reach(p)

    def _reach(self, p: int) -> None:
        """Vouch for the waiting records whose log head partition ``p`` has reached."""
        waiting = self._waiting[p]
        if not waiting:
            return
        pos = parse_stream_id(self.positions[p])
        keep = []
        for item in waiting:
            head, source, at = item
            if head <= pos:
                vouched = self._vouched.get(source)
                if vouched is not None and at > vouched[p]:
                    vouched[p] = at
            else:
                keep.append(item)
        self._waiting[p] = keep

    def stale_ids(self, source: str, now: int) -> list[str]:
        """Ids of the stale markets of ``source`` at ``now``, sorted."""
        out = []
        for mid in self.by_source.get(source, ()):
            m = self.markets.get(mid)
            if m is not None and self.age_stale(m, now)[1]:
                out.append(mid)
        out.sort()
        return out


#: most health records waiting per partition for the node's reader to reach their log head
_WAITING_MAX = 256


def live_for_limits(m: Market, now: int) -> bool:
    """Whether market ``m`` is judged by the in-play limits (stale limit, the price check's
    default ``max_age_ms``) at ``now`` (ms since the epoch): it is in play, or its
    ``start_time`` (ms since the epoch, when known) is at or before ``now`` — its event has
    started though its provider has not said so yet (The Odds API until its next poll,
    Pinnacle until its next answer, a push provider until its scores message). Limits only:
    the market's ``in_play`` as served stays the provider's."""
    if m.in_play:
        return True
    start = m.start_time
    return start is not None and start <= now


def parse_stale_by_sport(entries: Iterable[str]) -> dict[tuple[str | None, bool], int]:
    """``("soccer=8000", "tennis:in_play=5000", …)`` → {(sport, in_play): ms}. The sport is
    spelled as markets carry it (:func:`feed.matching.canonical_sport`: stripped, lower-case,
    ``Soccer`` / ``football`` → ``soccer``, ``Horse Racing`` → ``horse_racing``) and the phase
    is stripped and lower-cased, so ``"Soccer : in_play=3000"`` applies to soccer. Raises
    ValueError naming the bad entry (the app raises it as ConfigError)."""
    general: dict[tuple[str | None, bool], int] = {}
    specific: dict[tuple[str | None, bool], int] = {}
    for raw in entries:
        key, sep, value = raw.partition("=")
        name, _, phase = key.partition(":")
        sport = canonical_sport(name.strip())
        phase = phase.strip().lower()
        try:
            ms = int(value)
        except ValueError:
            ms = -1
        if not sep or not sport or ms < 0 or phase not in ("", "in_play", "pre_match"):
            raise ValueError(f"stale_after_ms_by_sport entry {raw!r} is not sport[:in_play|:pre_match]=ms")
        if phase:
            specific[(sport, phase == "in_play")] = ms
        else:
            general[(sport, True)] = general[(sport, False)] = ms
    return {**general, **specific}


def image_of(m: Market, d: Delta | None = None) -> Delta:
    """The whole market ``m`` as an image delta with its latency tags."""
    return Delta(market_id=m.market_id, seq=m.seq, kind="image", source=m.source, source_ts=m.source_ts,
                 received_at=m.received_at, stored_at=m.stored_at, source_ts_original=m.source_ts_original,
                 session=m.session, market=m)
