"""The ingest core of one source: payloads → normaliser → book → store.

:class:`feed.pipeline.Pipeline` (what a source delivers to) drives it: it
normalises payloads, quarantines what is rejected (typed reason, raw bytes
capped, counted — the source carries on), sequences the updates in the book
and writes them to Redis in batched atomic applies together with the
source's resume cursor. It keeps the source's counters and health.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypedDict

import msgspec
from msgspec import UNSET

from feed.aio import raise_if_cancelled, wait_event
from feed.book import Book, image_delta
from feed.errors import FeedDecodeError, StoreError
from feed.history import HistoryWriter
from feed.metrics import INGEST_METRICS
from feed.models import FINAL_EVENT_STATUSES, Delta, EventState, SourceHealth, SourceState
from feed.normalise.base import MarketUpdate, Normaliser
from feed.normalise.betfair import BetfairNormaliser
from feed.settings import Settings
from feed.sources.backoff import Backoff
from feed.sources.base import Delivered, Payload
from feed.sources.lag import LagWindow, apply_to_health
from feed.store import ApplyResult, EpochChanged, EventStateResult, Store, StoredMarks, partition_of
from feed.validate import CheckedLadders, validate_event_state, validate_update

logger = logging.getLogger(__name__)


def tune_gc() -> None:
    """Make the cyclic GC run less often in an ingest process.

    The hot path allocates many short-lived acyclic objects (decoded wire
    Structs, ladders); with CPython's default thresholds the collector
    takes about a third of ingest CPU. Canonical Structs are declared
    ``gc=False`` (they cannot form cycles) and the thresholds are raised.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


#: an event state unchanged for this long is forgotten (ms): two days (final ones go after the retention)
EVENT_STATE_IDLE_MS = 2 * 86_400_000

#: Reason of a source whose ingest cannot write to Redis.
STORE_UNAVAILABLE = "store_unavailable"
#: Rejected messages kept for the quarantine while the store is failing.
QUARANTINE_QUEUE_MAX = 1000
#: how often the ingest compares the store's seqs with its book (:meth:`Ingest._audit_store`), s
STORE_AUDIT_EVERY_S = 2.0
#: a periodic store audit reads at most this many of the book's markets (and as many event states) …
STORE_AUDIT_SLICE = 2000
#: … unless the book holds more than this many slices: then 1/STORE_AUDIT_ROUNDS of it, so a rotation of
#: the periodic audits covers every market (and event state) within this many audits
STORE_AUDIT_ROUNDS = 10
#: after an audit of everything that found the store gone back in time, one more this much later (s)
RECHECK_AFTER_S = 1.0
#: a writer mark (§81) whose newest entry is older than this is dropped (ms): an ingest gone, or quiet
#: that long (it then audits everything once)
WRITER_MARK_KEEP_MS = 2 * 86_400_000
#: a lost-writes detection re-images every market at most this often (s); one inside is deferred
REIMAGE_EVERY_S = 5.0


def new_session_id() -> str:
    """A fresh upstream-session id (random, 12 hex digits)."""
    return secrets.token_hex(6)


class IngestOptions(TypedDict):
    """The :class:`Ingest` keyword arguments that come from settings."""

    lease_ms: int
    max_future_skew_ms: int
    max_stream_lag_ms: int
    backlog_max: int
    settled_retention_ms: int
    history_retention_ms: int


def ingest_options(settings: Settings) -> IngestOptions:
    """The :class:`Ingest` keyword arguments that come from settings."""
    return IngestOptions(lease_ms=settings.health_lease_ms, max_future_skew_ms=settings.max_future_skew_ms,
                         max_stream_lag_ms=settings.max_stream_lag_ms,
                         backlog_max=settings.ingest_backlog_max,
                         settled_retention_ms=settings.settled_retention_ms,
                         history_retention_ms=settings.history_retention_ms)


def now_ms() -> int:
    """Wall clock, integer ms since the Unix epoch."""
    return time.time_ns() // 1_000_000


def _merged(result: ApplyResult | None, more: ApplyResult) -> ApplyResult:
    """``result`` (None: the flush wrote nothing before) with a re-image's apply
    ``more`` added: its log entries, deltas kept, dropped and foreign, lost
    writes found, markets applied and markets rebased."""
    if result is None:
        return more
    result.entries.update(more.entries)
    result.kept += more.kept
    result.dropped += more.dropped
    result.foreign += more.foreign
    result.lost += more.lost
    result.markets |= more.markets
    result.rebased.update(more.rebased)
    return result


class _Rotation:
    """Ids taken a slice at a time, round and round: each round goes through a
    snapshot of the ids taken when it starts (ids added since wait for the next
    round; ids gone since are the caller's to skip)."""

    __slots__ = ("_ids", "_at")

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._at = 0

    def take(self, ids: Iterable[str], least: int) -> tuple[list[str], bool]:
        """The next slice of ids (a new round from ``ids`` when the last one is
        done): ``least`` of them, or 1/:data:`STORE_AUDIT_ROUNDS` of the round's
        when that is more (a round takes at most STORE_AUDIT_ROUNDS slices); and
        whether the slice is all of ``ids`` (a round of one slice)."""
        if self._at >= len(self._ids):
            self._ids = list(ids)
            self._at = 0
        start = self._at
        self._at = start + max(least, -(-len(self._ids) // STORE_AUDIT_ROUNDS))
        return self._ids[start:self._at], start == 0 and self._at >= len(self._ids)


def _entry_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id (``<ms>-<n>``) as a comparable pair; (0, 0) for anything else ("":
    no mark; a writer mark someone overwrote with garbage reads as missing: the store is audited,
    not trusted)."""
    ms, _, n = entry_id.partition("-")
    try:
        return int(ms), int(n or 0)
    except ValueError:
        return 0, 0


def _compare_mark(known: tuple[int, int] | None, mark: str, *, rebase: bool = False
                  ) -> tuple[tuple[int, int] | None, bool]:
    """The one rule for a writer mark read from the store (§81): ``known`` is the newest log
    entry this ingest knows it added (None: none yet), ``mark`` the store's ("" when none).
    Returns (what to remember now, whether the store went back in time). Older than known: it
    went back (remembered as the store's only with ``rebase``: an audit of everything made it the
    baseline); newer: this ingest's own write that landed without its reply, adopted (a rollback
    to before it must be seen too); none known yet: the store's, adopted."""
    at = _entry_id(mark)
    if known is None or at > known:
        return at, False
    if at < known:
        return (at if rebase else known), True
    return known, False


@dataclass
class _Audit:
    """What one store audit found (:meth:`Ingest._audit_store`)."""

    #: the epoch now in Redis (None: ``of:epoch`` is missing)
    epoch: str | None
    #: the book's markets whose stored seq is behind the book's, or missing
    markets: list[str]
    #: the held event states whose stored version is behind, or missing
    states: list[str]
    #: the audit covered every market and event state held (else a periodic slice)
    whole: bool
    #: this ingest's writer marks older than the entries it wrote ("the mark of partition 3 is …"):
    #: the store went back in time (§81)
    went_back: list[str] = field(default_factory=list)


@dataclass
class IngestStats:
    """Counters of one source since the process started."""

    messages: int = 0
    runner_changes: int = 0
    market_updates: int = 0
    deltas: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    heartbeats: int = 0
    #: messages received more than ``max_stream_lag_ms`` after their provider time
    late_messages: int = 0
    batches: int = 0
    foreign: int = 0
    #: event states stored (feed.models.EventState), and those dropped: older than the one held
    #: (``stale``), or refused by the store as not newer or another source's
    event_states: int = 0
    event_states_dropped: int = 0
    started_at_ms: int = field(default_factory=now_ms)


class Ingest:
    """Runs one source's messages into the store.

    source: the source's name (health key, cursor field, quarantine tag).
    normaliser: any :class:`~feed.normalise.base.Normaliser` (default: a
    Betfair ESA one). clock_ms: injectable wall clock (ms). stale_after_ms:
    advertised in the source's health. The source's resume cursor is an
    opaque string: the normaliser advances it (``batch.cursor``) or the
    source sets it (:meth:`set_cursor`, e.g. a poller's ``since``).

    Trust rules (docs/architecture.md §23–26):

    - every market update passes :func:`feed.validate.validate_update`
      (one set of bounds for every provider; provider times at most
      ``max_future_skew_ms`` ahead of receipt); a rejected market is
      quarantined alone and *unconfirmed* (its source's heartbeats stop
      confirming it), the rest of the message applies;
    - an event state rejected alone (``event_id`` set: a normaliser's, or
      :func:`feed.validate.validate_event_state`'s) marks the event's held
      state lost: it is written again with the next version and
      ``EventState.lost`` (every node reads it stale, final or not, whatever
      confirms the source) until a good state of the event replaces it;
    - ``session`` names the current upstream session (image lineage): a
      message that starts a full image of the subscription
      (``batch.full_image``) opens a new one, so markets the new upstream
      does not image stop being confirmed; it is persisted in the health
      record and restored with the cursor;
    - a store failure never ends the source: sequenced deltas wait in a
      backlog (compacted to one image per market past ``backlog_max``) and
      are written, in order, with the cursor, once Redis answers again
      (retries back off); meanwhile the health reads DOWN /
      ``store_unavailable``;
    - the health record carries a lease (``lease_ms``): a source whose
      ingest stops renewing it reads DOWN / ``ingest_gone`` everywhere;
    - a market id's seq never goes backwards, across a prune and a restart
      (docs/architecture.md §69): :meth:`restore` seeds the book's seq floor
      from the store's, and a market the store refuses as new at or below
      its partition's floor is re-imaged above it in the same flush
      (:meth:`feed.book.Book.rebase`; the flush returns that image in place
      of the market's deltas).
    """

    def __init__(self, store: Store, *, source: str = "betfair", normaliser: Normaliser | None = None,
                 book: Book | None = None, clock_ms: Callable[[], int] = now_ms, stale_after_ms: int = 10_000,
                 kind: str = "betfair", lease_ms: int = 5_000, max_future_skew_ms: int = 10_000,
                 max_stream_lag_ms: int = 0, backlog_max: int = 50_000, settled_retention_ms: int = 3_600_000,
                 history_retention_ms: int = 0) -> None:
        self.store = store
        self.source = source
        self.kind = kind
        self.normaliser: Normaliser = normaliser or BetfairNormaliser(source)
        self.book = book or Book()
        self.clock_ms = clock_ms
        self.stats = IngestStats()
        #: this source's Prometheus instruments (feed.metrics; they outlive this object)
        self.metrics = INGEST_METRICS.register(self)
        self.cursor: str | None = None
        self.session: str = new_session_id()
        #: :meth:`restore` found the source's stored session: its cursor and markets continue it
        self.resumed = False
        self.health = SourceHealth(source=source, kind=kind, state="DOWN", reason="starting",
                                   stale_after_ms=stale_after_ms, lease_ms=lease_ms, session=self.session,
                                   states_confirmed_at=0)
        self.max_future_skew_ms = max_future_skew_ms
        self._max_stream_lag_ms = 0
        self.max_stream_lag_ms = max_stream_lag_ms
        # one bound for the normaliser's own checks (before it caches a change) and the ingest's
        self.normaliser.max_future_skew_ms = max_future_skew_ms
        self.backlog_max = backlog_max
        #: closed markets are forgotten (book and store) this long after their last change (0 = never)
        self.settled_retention_ms = settled_retention_ms
        #: markets dropped from the store by :meth:`prune_closed`
        self.pruned = 0
        #: markets the store refused as new at or below their partition's seq floor (pruned at a
        #: higher seq, e.g. before a restart), re-imaged above it
        self.rebased = 0
        self._pending: list[MarketUpdate] = []
        #: (n, session): the first n pending updates came in ``session`` (a new one began after them)
        self._pending_sessions: list[tuple[int, str | None]] = []
        #: a payload rejected whole came after the first n pending updates: at the flush every market
        #: not imaged after it is unconfirmed (None: none came)
        self._unconfirm_all_from: int | None = None
        #: event states waiting for the store: the latest per event (each a whole state, versioned)
        self._states_pending: dict[str, EventState] = {}
        self._states_stored: list[EventState] = []  # since the last take_stored_states() (feed lag)
        #: the last event state stored per event of this source (versions continue from it)
        self.event_states: dict[str, EventState] = {}
        #: ladder sides already validated (an unchanged side is not walked again; feed.validate)
        self._checked = CheckedLadders()
        self._unconfirm: set[str] = set()
        #: events whose state the payload being taken rejected alone (:meth:`_mark_states_lost`)
        self._states_rejected: set[str] = set()
        self._backlog: list[Delta] = []
        self._cursor_dirty = False
        self._degraded = False
        self._rejections: list[FeedDecodeError] = []
        self._flush_lock = asyncio.Lock()
        self._store_error: str | None = None
        self._fed_at = 0
        #: every message received confirms the source's markets once it is stored
        #: (streams); a poller sets it False and confirms per poll (:meth:`confirm`)
        self.confirm_by_messages = True
        #: the source's event states come from calls of their own (The Odds API's ``/scores``):
        #: only :meth:`confirm_states` confirms them (``SourceHealth.states_confirmed_at``), never
        #: a confirmation of its markets; False: they are confirmed with the markets
        self.confirm_states_apart = False
        self._states_fed_at = 0
        self._store_down_since: float | None = None
        self._retry_at = 0.0
        self._store_backoff = Backoff(initial_s=0.2, factor=2.0, max_s=5.0)
        self._quarantine_backoff = Backoff(initial_s=1.0, factor=2.0, max_s=30.0)
        self._quarantine_retry_at = 0.0
        self.store_failures = 0
        self.compactions = 0
        #: market updates rejected alone (each leaves its market unconfirmed until re-imaged);
        #: a source that can ask its upstream for a fresh image watches it (:meth:`take_lost`)
        self.lost_changes = 0
        self._lost_seen = 0
        #: held event states marked lost (a later state of the event rejected alone; see the trust rules)
        self.lost_states = 0
        #: messages rejected whole (nothing of them applied)
        self.rejected_messages = 0
        #: the provider delivers a message rejected whole again (a webhook answered 422): its
        #: rejection loses no change (else it may have: see :meth:`_rejected_whole`)
        self.rejected_messages_redelivered = False
        #: markets the store was found to have lost acknowledged writes of (then re-imaged)
        self.lost_writes = 0
        #: event states the store was found to have lost acknowledged writes of (then written again)
        self.lost_state_writes = 0
        self._reimage_after = 0.0
        #: a lost-writes detection came within REIMAGE_EVERY_S of the last re-image of every market:
        #: that re-image waits for the interval's end
        self._reimage_due = False
        #: a lost-writes detection since which no audit of everything found the store clean and no
        #: re-image of every market was done: nothing is confirmed meanwhile (:meth:`_unverified`)
        self._lost_unverified = False
        #: the store is compared with the book (:meth:`_audit_store`) this often (s) — a slice of it
        #: each time — and wholly at the first flush after a store failure, a reconnect, an epoch
        #: adoption or a lost-writes detection (``_audit_due``)
        self.audit_every_s = STORE_AUDIT_EVERY_S
        #: a periodic audit reads at least this many markets (and event states), see :data:`STORE_AUDIT_SLICE`
        self.audit_slice = STORE_AUDIT_SLICE
        self._audit_at = time.monotonic() + STORE_AUDIT_EVERY_S
        self._audit_due = False
        self._market_rotation = _Rotation()
        self._state_rotation = _Rotation()
        #: event states the audit found the store lacking, waiting in ``_states_pending`` to be
        #: written again (each event's entry is written even if it says what the held state says)
        self._states_again: dict[str, EventState] = {}
        #: the store's connection count (:attr:`feed.store.Store.connects`) at the last audit: a
        #: reconnect (redis-py's are silent) may have reached a server that came back older
        self._connects_seen: int = getattr(store, "connects", 0)
        #: store audits run (:meth:`_audit_store`)
        self.audits = 0
        #: times the store was found holding this ingest's writer mark older than the entries it
        #: wrote (at a write, a periodic audit, or the health publisher's :meth:`check_store_marks`)
        self.store_went_back = 0
        #: per partition, the newest delta-log entry this ingest wrote (or, after an audit of
        #: everything that found its mark older, that mark), and the same on the event-state log: a
        #: mark older than it means the store went back in time, and everything is compared at once
        #: (§81) instead of waiting for the audit's slices to come round
        self._wrote: dict[int, tuple[int, int]] = {}
        self._wrote_state: tuple[int, int] | None = None
        #: when an audit of everything found the store gone back: one more a beat later (monotonic s)
        self._recheck_at: float | None = None
        #: this ingest's writer mark in the store (§81): its source and an id of this run, so a second
        #: ingest of the same source (an upgrade's overlap) can never move the mark this one compares
        self._writer = f"{source}#{secrets.token_hex(4)}"
        #: the store epoch this ingest's writer marks belong to (each ingest its own: ingests of one
        #: process share a Store, whose epoch the first to see a new one adopts for all)
        self._marks_epoch: str | None = None
        #: a replay maps provider times onto now through this (None: kept as they are)
        self.time_map: Callable[[int], int] | None = None
        #: awaited after every flush that stored deltas or event states — whichever task flushed (a
        #: delivery, the health publisher, a drain) — with the deltas as stored, in the order stored
        self.on_stored: Callable[[list[Delta]], Awaitable[None]] | None = None
        #: price history, written after each successful apply (best-effort; 0 ms = off)
        self.history = HistoryWriter(store, history_retention_ms)

    async def restore(self) -> str | None:
        """Load stored snapshots (so seq continues) and the upstream session
        they belong to; return the stored cursor — None when there is no
        stored session to continue (a first run, or data from an oddsfeed
        without sessions): the source then starts from a full image."""
        # this run's writer marks first, from the logs as they are now (§81, §88): a store that goes
        # back to before this — during the load below or at any time after — lacks them, and the next
        # mark check finds it (not only once this ingest has written in that partition, which a quiet
        # one may not for long, or a periodic audit's slice comes round); one that went back before
        # it is what the book loads
        marks, state_mark = await self.store.adopt_writer_marks(
            self._writer, range(self.store.partitions), states=True, newer_than_ms=now_ms() - WRITER_MARK_KEEP_MS)
        self._marks_epoch = self.store.epoch
        markets = await self.store.load_all_markets()
        # a market pruned before the restart and re-created now starts above every seq pruned
        self.book.restore([m for m in markets if m.source == self.source], seq_floor=await self.store.seq_floor())
        self.event_states = {es.event_id: es for es in await self.store.load_event_states(self.source)}
        # kept only where the source holds something: a mark that never moves (no write of this
        # ingest there) is pruned after two days and its writer would then cry "went back"
        mine = {partition_of(mid, self.store.partitions) for mid in self.book.markets}
        for p, mark in marks.items():
            if mark and p in mine:
                self._wrote[p] = _entry_id(mark)
        if state_mark and self.event_states:
            self._wrote_state = _entry_id(state_mark)
        unused = [p for p, mark in marks.items() if mark and p not in mine]
        unused_state = bool(state_mark) and not self.event_states
        if unused or unused_state:
            await self.store.drop_writer_marks(self._writer, unused, states=unused_state)
        self.cursor = await self.store.load_cursor(self.source)
        stored = await self.store.get_health(self.source)
        raise_if_cancelled()  # redis-py may have swallowed a cancel of this task
        if stored is not None and stored.session:
            # resuming continues that session: what it confirmed stays confirmed
            # until the upstream says otherwise (a source whose upstream cannot
            # resume sends a full image, which opens a new session)
            self._set_session(stored.session)
            self.resumed = True
            return self.cursor
        if self.cursor is not None:
            # data written by an oddsfeed without upstream sessions: resuming would leave every
            # stored market unconfirmed (stale) until it happens to be re-imaged; start afresh
            logger.info("source %s: no upstream session stored with its cursor; starting from a full image",
                        self.source)
            self.cursor = None
        return None

    def _set_session(self, session: str) -> None:
        self.session = session
        self.health.session = session

    def new_session(self) -> str:
        """Start a new upstream session (a full image of the subscription
        follows): markets not imaged from now on are no longer confirmed by
        the source's heartbeats. Updates fed before, still waiting for the
        flush, keep the session they came in (they do not vouch for the new one)."""
        if self._pending:
            self._pending_sessions.append((len(self._pending), self.session))
        self._set_session(new_session_id())
        return self.session

    def set_cursor(self, value: str) -> None:
        """Set the source's resume cursor; it is stored with the next flush."""
        if value != self.cursor:
            self.cursor = value
            self._cursor_dirty = True

    def feed_lines(self, lines: Iterable[bytes], recv_ms: int) -> Delivered:
        """:meth:`feed` for payloads of one channel-less stream read at ``recv_ms``."""
        return self.feed([Payload(recv_ms, raw) for raw in lines])

    def feed(self, payloads: Iterable[Payload]) -> Delivered:
        """Normalise payloads into the pending batch (no I/O); rejected
        payloads and markets are queued for quarantine. Never raises for a
        provider's bytes: whatever a normaliser raises is a rejection.
        Returns what the normaliser said of them (``stored``/``deltas`` are
        the caller's to fill after :meth:`flush`). With :attr:`time_map`
        set (a replay), every update's ``source_ts`` is mapped through it
        and the original kept in ``source_ts_original``. A payload's
        ``age_ms`` (a cache served it) stamps the market updates and event
        states it brings as received that much before ``recv_ms``, so they
        read as old as they are; the normaliser still times cutoffs and
        clock-skew bounds by ``recv_ms`` (when the answer arrived)."""
        normaliser = self.normaliser
        stats = self.stats
        pending = self._pending
        skew = self.max_future_skew_ms
        lag_cap = self.max_stream_lag_ms
        time_map = self.time_map
        checked = self._checked
        out = Delivered()
        requests: set[str] = set()
        recv_ms = 0
        fed_at = 0  # receipt of the last payload taken (a payload rejected whole vouches for nothing)
        for payload in payloads:
            if self._states_rejected:  # the previous payload's, after its own states (they may be of the same event)
                self._mark_states_lost()
            raw, recv_ms = payload.data, payload.recv_ms
            if not raw or raw.isspace():
                continue
            stats.messages += 1
            try:
                batch = normaliser.feed(raw, recv_ms, payload.channel)
            except FeedDecodeError as exc:
                self._rejected_whole(exc, out)
                continue
            except Exception as exc:  # a normaliser bug must not end the source (nor its neighbours)
                logger.exception("normaliser of %s failed on a message", self.source)
                self._rejected_whole(FeedDecodeError("internal_error", f"{type(exc).__name__}: {exc}", raw), out)
                continue
            as_of = recv_ms
            pt = batch.provider_ts
            if lag_cap and pt is not None:
                as_of = self._as_of(recv_ms, pt)
            aged = recv_ms - payload.age_ms if payload.age_ms > 0 else None  # (a cache's answer: as of then)
            if aged is not None and aged < as_of:
                as_of = aged
            fed_at = as_of
            if batch.full_image:
                self.new_session()
            for rejected in batch.rejected:
                if not rejected.raw:
                    rejected.raw = raw
                out.rejected_parts += 1
                self._reject(rejected)
            if batch.unconfirm:
                self._unconfirm.update(batch.unconfirm)
            if batch.updates:
                for u in batch.updates:
                    if time_map is not None:
                        if u.source_ts_original is None:
                            u.source_ts_original = u.source_ts
                        u.source_ts = time_map(u.source_ts)
                    try:
                        validate_update(u, recv_ms, max_future_skew_ms=skew, checked=checked)
                    except FeedDecodeError as invalid:
                        invalid.market_id = u.market_id
                        invalid.raw = raw
                        out.rejected_parts += 1
                        self._reject(invalid)
                        continue
                    if aged is not None and u.received_at > aged:
                        u.received_at = aged
                    pending.append(u)
                    stats.market_updates += 1
                stats.runner_changes += batch.runner_changes
            elif batch.heartbeat:
                stats.heartbeats += 1
            if batch.event_states:
                states = batch.event_states
                if aged is not None:
                    states = [msgspec.structs.replace(es, received_at=aged) if es.received_at > aged else es
                              for es in states]
                self._feed_states(states, raw, recv_ms, out)
            if batch.degraded is not None:
                self._degraded = batch.degraded
            if batch.cursor is not None:
                self.cursor = batch.cursor
                self._cursor_dirty = True
            if batch.stale:
                out.stale = True
            if batch.requests:
                requests.update(batch.requests)
            if batch.in_play is not None:
                out.in_play = batch.in_play
        if self._states_rejected:
            self._mark_states_lost()
        if requests:
            out.requests = frozenset(requests)
        if self.confirm_by_messages and fed_at:
            self._fed_at = max(self._fed_at, fed_at)
        return out

    def _rejected_whole(self, exc: FeedDecodeError, out: Delivered) -> None:
        """A payload the normaliser rejected whole: quarantined, and — unless the provider
        delivers it again (:attr:`rejected_messages_redelivered`: a webhook answered 422) or
        it is a message type we do not know (``unknown_type``: nothing of ours in it), or the
        source holds no market (a scores stream: each state is whole) — a change of unknown
        markets may be lost with it: the source asks for a fresh image
        (:meth:`take_lost`), and a stream's markets are all unconfirmed until that image
        re-images each (as a market whose change was rejected alone is), so none reads
        fresh at a price that may be behind."""
        self.rejected_messages += 1
        out.rejected_messages += 1
        self._reject(exc)
        if (exc.market_id is None and exc.reason != "unknown_type" and not self.rejected_messages_redelivered
                and (self.book.markets or self._pending)):  # (no market, no price to protect: scores send whole states)
            self.lost_changes += 1
            if self.confirm_by_messages:
                # every market waits for an image (a later delta does not vouch), except one re-imaged
                # after this payload: the flush unconfirms the book from here (see _flush)
                self._unconfirm_all_from = len(self._pending)

    def _feed_states(self, states: list[EventState], raw: bytes, recv_ms: int, out: Delivered) -> None:
        """Validate, order and version a message's event states into the
        pending set: a state older (provider time) than the one held for its
        event is dropped, one saying nothing new is skipped, a changed one
        gets the next version (the store keeps the highest)."""
        time_map = self.time_map
        pending = self._states_pending
        held = self.event_states
        for es in states:
            if time_map is not None:
                original = es.source_ts_original if es.source_ts_original is not None else es.source_ts
                mapped = time_map(es.source_ts)
                clock = es.clock
                if clock is not None:  # the clock reading moves with its state
                    clock = msgspec.structs.replace(clock, at=max(1, clock.at + mapped - es.source_ts))
                es = msgspec.structs.replace(es, source_ts=mapped, source_ts_original=original, clock=clock)
            if es.source != self.source:
                es = msgspec.structs.replace(es, source=self.source)
            try:
                validate_event_state(es, recv_ms, max_future_skew_ms=self.max_future_skew_ms)
            except FeedDecodeError as invalid:
                invalid.raw = raw
                out.rejected_parts += 1
                self._reject(invalid)
                continue
            prev = pending.get(es.event_id) or held.get(es.event_id)
            if prev is not None:
                if es.provider_ts < prev.provider_ts:
                    self.stats.event_states_dropped += 1
                    continue
                if es.same_content(prev):
                    continue
            # (only the ingest marks a state lost: a good one clears the mark, :meth:`_mark_states_lost`)
            pending[es.event_id] = msgspec.structs.replace(es, version=(prev.version if prev is not None else 0) + 1,
                                                           lost=UNSET)

    def _mark_states_lost(self) -> None:
        """The events whose state the payload just taken rejected alone (after the states it
        delivered, which may be of the same event: the rejected one may be the later word): the
        state held for each — waiting for the flush, else the last stored — is marked
        :attr:`~feed.models.EventState.lost`, a stored one written again with the next version
        (the store keeps the highest; every node takes it and reads it stale, final or not, until
        a good state of the event, written without the mark, replaces it). The provider has moved
        on from a state its other messages would otherwise keep confirming. An event with no
        state held has nothing to mark; one stored already marked is not written again."""
        pending, held = self._states_pending, self.event_states
        for eid in self._states_rejected:
            cur = pending.get(eid)
            if cur is None:
                cur = held.get(eid)
                if cur is None or cur.lost is True:
                    continue
                cur = msgspec.structs.replace(cur, version=cur.version + 1)
            elif cur.lost is True:
                continue
            pending[eid] = msgspec.structs.replace(cur, lost=True)
            self.lost_states += 1
        self._states_rejected.clear()

    async def _flush_states(self) -> None:
        """Write the pending event states (raises StoreError; they stay pending)."""
        held, pending, again = self.event_states, self._states_pending, self._states_again
        for eid, es in list(pending.items()):
            # states coalesce per event until the flush: one back where the stored state is (a
            # correction undone, A → B → C → A, within one flush) says nothing new — unless the
            # store lost the held state (the audit: ``again``)
            if eid not in again and (h := held.get(eid)) is not None and es.same_content(h):
                del pending[eid]
        states = list(pending.values())
        result = await self.store.apply_event_states(states, writer=self._writer)
        raise_if_cancelled()
        self._note_states_written(result)
        for es in states:
            if self._states_pending.get(es.event_id) is es:
                del self._states_pending[es.event_id]
            self.event_states[es.event_id] = es
        if len(self._states_stored) < 10_000:  # nobody taking them (a bare Ingest): bounded
            # (a state marked lost, or one the store lost, is one received earlier written again:
            # no feed-lag sample)
            self._states_stored.extend(es for es in states if es.lost is not True and again.get(es.event_id) is not es)
        if again:
            for es in states:
                again.pop(es.event_id, None)
        self.stats.event_states += result.kept
        self.stats.event_states_dropped += result.dropped + result.foreign
        if result.foreign:
            logger.warning("source %s: %d event states dropped: their events belong to another source",
                           self.source, result.foreign)

    @property
    def max_stream_lag_ms(self) -> int:
        """How late (ms) after its provider time a message may arrive and still count from its
        arrival — for a normaliser of live provider times only (0 = no bound): a later one (a
        backlog after a stall) confirms its source only as of its provider time plus this, and
        readers take its changes as current from then (``SourceHealth.max_lag_ms``: its prices
        were current then, not at their arrival — timing a price check from the arrival would
        call them fresh)."""
        return self._max_stream_lag_ms

    @max_stream_lag_ms.setter
    def max_stream_lag_ms(self, ms: int) -> None:
        self._max_stream_lag_ms = ms if getattr(self.normaliser, "live_provider_times", False) else 0
        self.health.max_lag_ms = self._max_stream_lag_ms

    def _as_of(self, recv_ms: int, provider_ms: int) -> int:
        """When a live message received at ``recv_ms`` with provider time ``provider_ms``
        (ms since the Unix epoch; mapped by :attr:`time_map` in a replay) counts as current:
        its receipt, or — arriving more than :attr:`max_stream_lag_ms` after its provider time
        (a backlog after a stall, a lagging upstream) — that time plus the bound (counted in
        ``late_messages``)."""
        if self.time_map is not None:
            provider_ms = self.time_map(provider_ms)
        lag_cap = self._max_stream_lag_ms
        if lag_cap and recv_ms - provider_ms > lag_cap:
            self.stats.late_messages += 1
            return provider_ms + lag_cap
        return recv_ms

    def confirm(self, recv_ms: int, provider_ms: int | None = None) -> None:
        """The upstream confirmed its data at ``recv_ms`` without a message to
        normalise (a poll answered 304 or with nothing new, an AMQP ``alive``); it
        counts like a heartbeat (see :meth:`_confirmed`). ``provider_ms``: the
        provider's time of that confirmation (an ``alive``'s timestamp), ms since
        the Unix epoch: arriving late, it confirms only as of that time plus
        :attr:`max_stream_lag_ms`, as any live message (:meth:`_as_of`)."""
        if provider_ms is not None and self._max_stream_lag_ms:
            recv_ms = self._as_of(recv_ms, provider_ms)
        self._fed_at = max(self._fed_at, recv_ms)
        if not self._pending and not self._backlog and self._store_error is None:
            self._confirmed(self._fed_at)

    def _confirmed(self, recv_ms: int) -> None:
        """Everything received up to ``recv_ms`` is stored: the source's
        markets are confirmed as of then (``SourceHealth.last_message_at``),
        and its event states too (``states_confirmed_at``) unless they are
        confirmed apart (:attr:`confirm_states_apart`). Never earlier: a
        heartbeat must not vouch for changes still waiting for the store.
        Never while the provider flags its stream degraded (ESA ``status:
        503``: "data may be delayed"): a heartbeat then does not say nothing
        changed, so quiet markets age from their own last change. Never while
        the store may be behind the book (:meth:`_unverified`: lost writes
        were found and no audit of everything has found the store clean since,
        nor a re-image of every market been done, or the store has not been
        compared with the book since a failure or reconnect) — a market whose
        last write the store lost must not read fresh at the older price, nor
        an event state at the older score."""
        if self._degraded or self._unverified():
            return
        h = self.health
        if recv_ms > h.last_message_at:
            h.last_message_at = recv_ms
        if not self.confirm_states_apart and recv_ms > (h.states_confirmed_at or 0):
            h.states_confirmed_at = recv_ms  # (its states came with what it confirms)

    def confirm_states(self, recv_ms: int) -> None:
        """The upstream confirmed the source's event states at ``recv_ms`` (a scores call
        answered, every one of the source's scores calls answered at or after it): with
        :attr:`confirm_states_apart`, ``SourceHealth.states_confirmed_at`` advances to it once
        every state received before is stored (:meth:`_states_confirmed`); otherwise nothing
        (the states are confirmed with the markets)."""
        self._states_fed_at = max(self._states_fed_at, recv_ms)
        if not self._states_pending and self._store_error is None:
            self._states_confirmed(self._states_fed_at)

    def _states_confirmed(self, recv_ms: int) -> None:
        """Every event state received up to ``recv_ms`` (ms since the Unix epoch) is stored
        and the upstream vouched for them then (:meth:`confirm_states`): a source whose states
        are confirmed apart advances ``states_confirmed_at`` — never while the provider flags
        its data degraded, nor while the store may be behind what the ingest holds
        (:meth:`_unverified`: a state whose last write the store lost must not read fresh)."""
        if not self.confirm_states_apart or self._degraded or self._unverified():
            return
        h = self.health
        if recv_ms > (h.states_confirmed_at or 0):
            h.states_confirmed_at = recv_ms

    def take_stored_states(self) -> list[EventState]:
        """The event states written since the last call (the pipeline's feed
        lag counts them, as it counts stored deltas: a source of scores only
        has a lag too)."""
        states, self._states_stored = self._states_stored, []
        return states

    def take_lost(self) -> bool:
        """True once after market updates were rejected alone since the last
        call: the source should get a fresh image of its markets (push: the
        REST snapshot; Pinnacle: a snapshot poll) to repair what was lost."""
        lost = self.lost_changes != self._lost_seen
        self._lost_seen = self.lost_changes
        return lost

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def backlog(self) -> int:
        """Deltas sequenced, and event states versioned, not yet acknowledged by the store."""
        return len(self._backlog) + len(self._states_pending)

    @property
    def store_ok(self) -> bool:
        """False while the last write to the store failed."""
        return self._store_error is None

    async def flush(self) -> list[Delta]:
        """See :meth:`_flush`; flushes never overlap, so batches reach Redis
        in the order the book sequenced them. :attr:`on_stored` sees what
        each one stored — after the flush, outside its lock: two calls of it
        may overlap (what they call must tolerate that), though each starts
        in flush order."""
        async with self._flush_lock:
            deltas = await self._flush()
        if self.on_stored is not None and (deltas or self._states_stored):
            await self.on_stored(deltas)
        return deltas

    async def _flush(self) -> list[Delta]:
        """Sequence the pending updates in the book and store them (after
        any backlog) with the cursor in one batched atomic apply; store
        queued rejections. Returns the deltas written (empty while the store
        is failing: they wait in the backlog). On EpochChanged (Redis lost
        its data) re-sends every market as an image under the new epoch."""
        updates, self._pending = self._pending, []
        marks, self._pending_sessions = self._pending_sessions, []
        unconfirm_all_from, self._unconfirm_all_from = self._unconfirm_all_from, None
        fed_at = self._fed_at
        stored_at = self.clock_ms()
        book = self.book
        session = self.session
        unconfirm = self._unconfirm
        new: list[Delta] = []
        start = 0
        for n, batch_session in [*marks, (len(updates), session)]:
            # (marks: a new upstream session began after the first n updates: those keep theirs)
            for u in updates[start:n] if marks else updates:
                d = book.apply(u, stored_at, batch_session)
                if d is not None:
                    new.append(d)
                elif book.last_drop == "out_of_order":
                    unconfirm.add(u.market_id)
            start = n
        if unconfirm_all_from is not None:  # a payload rejected whole: only an image after it vouches
            reimaged = {u.market_id for u in updates[unconfirm_all_from:] if u.image}
            unconfirm.update(mid for mid in book.markets if mid not in reimaged)
        if unconfirm:
            for mid in unconfirm:
                d = book.unconfirm(mid, stored_at)
                if d is not None:
                    new.append(d)
            unconfirm.clear()
        backlog = self._backlog
        backlog.extend(new)
        if len(backlog) > self.backlog_max:
            self._compact()
        cursor = (self.source, self.cursor) if self._cursor_dirty and self.cursor is not None else None
        states = bool(self._states_pending)
        # (the store audit and a deferred re-image ride a flush: a timer's cost, not a batch's)
        audit = self._audit_wanted()
        if (not self._backlog and cursor is None and not self._rejections and not states and not audit
                and not self._reimage_ready()):
            if self._store_error is None:
                self._confirmed(fed_at)
                self._states_confirmed(self._states_fed_at)
            return []
        if self._store_error is not None and time.monotonic() < self._retry_at:
            return []  # backing off: the backlog waits
        try:
            deltas = self._backlog
            # event states go after the markets; the cursor after both (it never runs ahead of the data
            # it covers), so with states to write the markets are applied without it
            market_cursor = None if states else cursor
            result: ApplyResult | None = None
            started = time.perf_counter()
            if deltas or market_cursor is not None:
                try:
                    result = await self.store.apply(deltas, book.markets, market_cursor, rebase=book.rebase,
                                                    writer=self._writer)
                    raise_if_cancelled()  # redis-py may have swallowed a cancel of this task
                    self._note_written(result)
                except EpochChanged:
                    logger.warning("store epoch changed under source %s: re-sending every market as an image",
                                   self.source)
                    await self.store.reset_epoch()
                    self._forget_written()  # (another store: its marks are not this ingest's)
                    self._backlog = deltas = book.reimage_all(stored_at)
                    result = await self.store.apply(deltas, book.markets, market_cursor, rebase=book.rebase,
                                                    writer=self._writer)
                    raise_if_cancelled()
                    self._note_written(result)
                    self._audit_due = True  # (an epoch adopted: the store is compared wholly before confirming)
                if result.rebased:
                    deltas = self._rebased(deltas, result.rebased)
                if result.lost:
                    # the store lost writes it had acknowledged (a failover to a replica that had
                    # not received them): what it holds for any market may be behind the book,
                    # quiet markets included — re-image them all before confirming anything
                    self.lost_writes += result.lost
                    self._reimage_due = self._lost_unverified = True
                    # the whole store is compared with the book and the event states at once: those
                    # found behind are written again in this flush (a lost write of an event state is
                    # repaired only so); nothing is confirmed until that audit finds the store clean
                    # or every market is re-imaged
                    self._audit_due = True
                    if time.monotonic() < self._reimage_after:
                        # within REIMAGE_EVERY_S of the last: deferred, not dropped
                        logger.warning("source %s: the store lost acknowledged writes of %d market(s); "
                                       "re-imaging every market in %.1f s", self.source, result.lost,
                                       self._reimage_after - time.monotonic())
            if self._reimage_ready():
                self._reimage_due = self._lost_unverified = False
                self._reimage_after = time.monotonic() + REIMAGE_EVERY_S
                logger.warning("source %s: the store lost acknowledged writes; re-sending every market as an image",
                               self.source)
                more, deltas = await self._resend(book.reimage_all(stored_at))
                result = _merged(result, more)
            if self._audit_wanted():  # (a write above may have reconnected, to a server back older)
                result, deltas = await self._audit_and_repair(stored_at, result, deltas)
            if result is not None:
                self.metrics.apply_seconds.observe(time.perf_counter() - started)
            states_error: StoreError | None = None
            if self._states_pending:  # (the audit may have added states the store lost, to write again)
                self._backlog = []  # stored: a failure below must not write them again
                try:
                    await self._flush_states()
                    if cursor is not None and market_cursor is None:
                        await self.store.apply([], book.markets, cursor)
                        raise_if_cancelled()
                except StoreError as exc:  # the states (and the cursor) wait; the deltas are stored
                    states_error = exc
        except StoreError as exc:
            self._store_failed(exc)
            return []
        self._backlog = []
        if self._rejections and time.monotonic() >= self._quarantine_retry_at:
            # after the prices: keeping a rejected message must never hold them back
            try:
                await self._flush_rejections()
                self._quarantine_backoff.reset()
            except StoreError as exc:  # they wait (bounded: QUARANTINE_QUEUE_MAX), retried with backoff
                delay = self._quarantine_backoff.next_delay()
                self._quarantine_retry_at = time.monotonic() + delay
                self.metrics.redis_error("quarantine")
                logger.warning("source %s: quarantine write failed (%s); %d rejected messages wait, retry in "
                               "%.1f s", self.source, exc, len(self._rejections), delay)
        if states_error is not None:
            self._store_failed(states_error)
        else:
            if cursor is not None:
                self._cursor_dirty = False
            self._confirmed(fed_at)
            self._states_confirmed(self._states_fed_at)
            if self._store_error is not None:
                logger.warning("source %s: store writable again after %.1f s; %d deltas written", self.source,
                               time.monotonic() - (self._store_down_since or 0.0), len(deltas))
                self._store_error = None
                self._store_down_since = None
                self._store_backoff.reset()
        if result is None:
            return []
        if result.markets:
            self.history.record(deltas, book.markets, result.markets)  # never raises nor waits
        self.stats.deltas += result.kept
        self.stats.batches += 1
        if result.foreign:
            self.stats.foreign += result.foreign
            logger.warning("source %s: %d changes dropped: their markets belong to another source "
                           "(market ids must be unique per source; set prefix= or name= apart)",
                           self.source, result.foreign)
        return deltas

    async def drain(self) -> None:
        """Flush until nothing waits for the store (retrying with backoff
        while Redis is unreachable); returns once everything sequenced so
        far is stored. Cancel it to give up."""
        await self.flush()
        while self._backlog or self._states_pending or self._store_error is not None:
            await asyncio.sleep(max(0.05, self._retry_at - time.monotonic()))
            await self.flush()
        await self.history.idle()  # best-effort: the price history, at most 5 s more

    def _rebased(self, deltas: list[Delta], images: dict[str, Delta]) -> list[Delta]:
        """``deltas`` as stored: each market the store re-imaged above its
        partition's seq floor (:meth:`feed.book.Book.rebase`) by that one
        image, in place of its first delta."""
        self.rebased += len(images)
        logger.info("source %s: %d market(s) new to the store re-imaged above the seq of a pruned market "
                    "of the same id: %s", self.source, len(images), ", ".join(sorted(images)[:5]))
        out: list[Delta] = []
        done: set[str] = set()
        for d in deltas:
            image = images.get(d.market_id)
            if image is None:
                out.append(d)
            elif d.market_id not in done:
                done.add(d.market_id)
                out.append(image)
        return out

    def _audit_wanted(self) -> bool:
        """The store is to be compared with the book at this flush: its interval
        (:attr:`audit_every_s`) is up (a slice), or something happened to the
        store since the last audit (a failure, an epoch adopted, lost writes
        found: :meth:`audit_soon`; a reconnect: :attr:`feed.store.Store.connects`
        moved — then everything)."""
        return (self._audit_due or self.store.connects != self._connects_seen
                or time.monotonic() >= self._audit_at
                or (self._recheck_at is not None and time.monotonic() >= self._recheck_at))

    def _unverified(self) -> bool:
        """The store may be behind the book or the held event states right now:
        lost writes were found and neither an audit of everything has found the
        store clean since nor a re-image of every market been done, or the store
        failed, reconnected, changed epoch or lost writes since it was last
        compared wholly (the periodic audits' slices do not count here)."""
        return self._lost_unverified or self._audit_due or self.store.connects != self._connects_seen

    def _reimage_ready(self) -> bool:
        """A deferred re-image of every market (lost writes found within
        REIMAGE_EVERY_S of the last one) is due now."""
        return self._reimage_due and time.monotonic() >= self._reimage_after

    @property
    def audit_due(self) -> bool:
        """A flush has store work even with nothing new to write: the store audit
        or a deferred re-image is due (:class:`HealthPublisher` flushes a quiet source then)."""
        return self._audit_wanted() or self._reimage_ready()

    def audit_soon(self) -> None:
        """Something happened to the store (an error or a reconnect seen outside
        the flush, e.g. by the health publisher): compare all of it with the book
        and the held event states at the next flush (:meth:`_audit_store`),
        before anything — markets or event states — is confirmed again."""
        self._audit_due = True

    def _note_written(self, result: ApplyResult) -> None:
        """Remember the newest log entry of each partition ``result`` wrote (see ``_wrote``) —
        after comparing the mark the store held before this write with it: older means the store
        went back in time (§81), and the flush compares everything before confirming anything. A
        mark newer than remembered is this ingest's own write that landed without its reply:
        adopted (a rollback to before it must be seen too)."""
        self._check_marks_epoch()
        wrote = self._wrote
        why: list[str] = []
        for p, mark in result.marks.items():
            known = wrote.get(p)
            now, went_back = _compare_mark(known, mark)
            if went_back and known is not None:
                why.append(f"the mark of partition {p} was {mark or 'missing'} before this write, "
                           f"not {known[0]}-{known[1]}")
            if now is not None:
                wrote[p] = now
        for p, entry_id in result.entries.items():
            at = _entry_id(entry_id)
            if at > wrote.get(p, (0, 0)):
                wrote[p] = at
        if why:
            self._store_went_back(why)

    def _note_states_written(self, result: EventStateResult) -> None:
        """:meth:`_note_written` for an event-state write (``mark`` None: nothing was written)."""
        self._check_marks_epoch()
        known = self._wrote_state
        if result.mark is not None:
            now, went_back = _compare_mark(known, result.mark)
            if went_back and known is not None:
                self._store_went_back([f"the event-state mark was {result.mark or 'missing'} before this write, "
                                       f"not {known[0]}-{known[1]}"])
            self._wrote_state = known = now
        if result.entry:
            at = _entry_id(result.entry)
            if known is None or at > known:
                self._wrote_state = at

    async def drop_marks(self) -> None:
        """Drop this ingest's writer marks from the store (a clean stop: a restart takes new
        ones, §88 — so restarts do not pile marks up). Raises StoreError."""
        await self.store.drop_writer_marks(self._writer)
        self._forget_written()

    def _marks_of(self, epoch: str | None) -> bool:
        """Whether this ingest's marks belong to store epoch ``epoch``; if not (Redis lost its
        data: FLUSHALL, a restart without persistence — and ingests of one process share a Store,
        whose epoch the first to see a new one adopts for all) they are forgotten: marks of
        another epoch are not compared (that is no "went back"; the caller has everything
        compared with the book instead)."""
        if self._marks_epoch is not None and epoch != self._marks_epoch:
            self._forget_written()
            return False
        return True

    def _check_marks_epoch(self) -> None:
        """Before comparing a write's marks (:meth:`_marks_of` the store's epoch now; else the
        next flush compares everything, and what the store lost is written again). The first
        marks take the current epoch."""
        if not self._marks_of(self.store.epoch):
            self.audit_soon()
        if self._marks_epoch is None:
            self._marks_epoch = self.store.epoch

    def _forget_written(self) -> None:
        """The store's epoch moved (Redis lost its data, or another store): its marks are not this
        ingest's to compare with (the audit of everything that follows compares the store)."""
        self._wrote.clear()
        self._wrote_state = None
        self._marks_epoch = None

    def _store_went_back(self, why: list[str]) -> None:
        """The store lost writes this ingest made (``why``): compare everything with the
        book and the held event states at the next audit, before confirming anything — and
        once more a beat after it (a restore still under way)."""
        logger.warning("source %s: the store went back in time (%s); comparing every market and event state "
                       "with the book before confirming anything", self.source, "; ".join(why))
        self.store_went_back += 1
        self._audit_due = True
        self._recheck_at = time.monotonic() + RECHECK_AFTER_S

    async def check_store_marks(self) -> bool:
        """Whether the store holds this ingest's marks older than the entries it
        knows it wrote (the store went back in time as a whole without an error or
        reconnect seen here: §81); if so the next flush compares everything with the
        book before anything is confirmed. The health publisher asks before each record
        it writes, so no record vouches for a store that lost writes; another writer's
        entries since cannot hide it (each writer has its own mark). One round trip
        (an HGET per partition written); raises StoreError."""
        async with self._flush_lock:  # (not beside a flush: its audit may move the baselines)
            if not self._wrote and self._wrote_state is None:
                return False
            found = await self.store.stored_marks((), writer=self._writer, marks=list(self._wrote),
                                                  state_mark=self._wrote_state is not None)
            raise_if_cancelled()
            if not self._marks_of(found.epoch):
                self.audit_soon()  # (the next flush's audit takes the epoch path: re-image everything)
                return False
            went_back = self._went_back(found, full=False)
            if went_back:
                self._store_went_back(went_back)
            return bool(went_back)

    def _went_back(self, found: StoredMarks, *, full: bool) -> list[str]:
        """This ingest's marks in ``found`` older than the entries it wrote, described;
        ``full`` (an audit of everything read them): the store as it is now becomes the
        baseline."""
        wrote = self._wrote
        went_back: list[str] = []
        for p, mark in found.writer_marks.items():
            known = wrote[p]
            now, back = _compare_mark(known, mark, rebase=full)
            if back:
                went_back.append(f"the mark of partition {p} is {mark or 'missing'}, not {known[0]}-{known[1]}")
            assert now is not None
            wrote[p] = now
        known_state = self._wrote_state
        if found.state_mark is not None and known_state is not None:
            self._wrote_state, back = _compare_mark(known_state, found.state_mark, rebase=full)
            if back:
                went_back.append(f"the event-state mark is {found.state_mark or 'missing'}, not "
                                 f"{known_state[0]}-{known_state[1]}")
        return went_back

    async def _resend(self, images: list[Delta]) -> tuple[ApplyResult, list[Delta]]:
        """Store ``images`` (re-images of book markets: they wait in the backlog
        if Redis fails); returns the apply's result and the images as stored
        (rebased above a seq floor where the store asked). Raises StoreError."""
        self._backlog = images
        result = await self.store.apply(images, self.book.markets, None, rebase=self.book.rebase, writer=self._writer)
        raise_if_cancelled()
        self._note_written(result)
        if result.rebased:
            images = self._rebased(images, result.rebased)
        return result, images

    async def _audit_store(self, full: bool) -> _Audit:
        """Compare what the store holds with the book and the held event states,
        in one round trip (:meth:`feed.store.Store.stored_marks`): returns the
        epoch now in Redis and the book's markets whose stored seq is behind the
        book's or missing, and the held event states whose stored version is
        behind or missing — writes the store acknowledged and then lost (Redis
        restarted on an older AOF, a replica promoted that had not received
        them, a backup restored), which no later batch would reveal for a market
        or an event that stays quiet. Not counted as behind: a market or event
        another source owns (its writes are dropped as foreign), one whose stored
        provider time is newer than the held one (a second writer of the same
        source went further; ours would be dropped as older), and an event state
        waiting to be written (it supersedes the stored one).

        ``full``: everything held is compared (after a store failure, a
        reconnect, an epoch adoption, a lost-writes detection: nothing is
        confirmed until it is done). Else a periodic audit reads the next slice
        of a rotation over the markets and one over the event states — at most
        ``max(audit_slice, ⌈n / STORE_AUDIT_ROUNDS⌉)`` of each (n: how many
        were held when the rotation's round began), so its cost (under the flush lock: every price write waits) is
        bounded for any book up to ``audit_slice × STORE_AUDIT_ROUNDS`` (2,000
        and 20,000 by default) and a tenth of a bigger one. The periodic slices
        do not hold confirmations back: they bound how long a store gone back
        older *without any error or reconnect the ingest sees* (a backup restored
        in place, a replica promoted behind a proxy) goes unnoticed — every
        market and event state held when it happened is compared within two
        rotations, at most ``2 × STORE_AUDIT_ROUNDS`` audits, about
        ``2 × STORE_AUDIT_ROUNDS × audit_every_s`` s (40 s by default, plus up
        to a health-publish interval per audit for a quiet source; one audit,
        2 s, while the book holds at most ``audit_slice`` of each).
        Call it only with nothing of the book waiting for the store. Raises
        StoreError."""
        self._audit_at = time.monotonic() + self.audit_every_s
        self.audits += 1
        book, held, pending = self.book, self.event_states, self._states_pending
        if full:
            self._audit_due = False
            self._connects_seen = self.store.connects  # (one made by this read itself: audited again next flush)
            mids, eids, whole = list(book.markets), list(held), True
        else:
            mids, all_mids = self._market_rotation.take(book.markets, self.audit_slice)
            eids, all_eids = self._state_rotation.take(held, self.audit_slice)
            whole = all_mids and all_eids
        found = await self.store.stored_marks(mids, eids, writer=self._writer, marks=list(self._wrote),
                                              state_mark=self._wrote_state is not None)
        raise_if_cancelled()
        went_back = self._went_back(found, full=full) if self._marks_of(found.epoch) else []
        behind: list[str] = []
        mark = book.mark
        for mid, (seq, owner, pt) in found.marks.items():
            m = mark(mid)
            if m is None:  # (pruned since the slice's round began)
                continue
            book_seq, source, book_pt = m
            if seq >= book_seq or (owner is not None and owner != source) or pt > book_pt:
                continue
            behind.append(mid)
        states: list[str] = []
        for eid, (version, owner, pt) in found.events.items():
            es = held.get(eid)
            if es is None or eid in pending:
                continue
            if version >= es.version or (owner is not None and owner != es.source) or pt > es.provider_ts:
                continue
            states.append(eid)
        return _Audit(found.epoch, behind, states, whole, went_back)

    async def _audit_and_repair(self, stored_at: int, result: ApplyResult | None,
                                deltas: list[Delta]) -> tuple[ApplyResult | None, list[Delta]]:
        """Run :meth:`_audit_store` after this flush's writes — of everything
        when something happened to the store since the last (``_audit_due``, a
        reconnect), else the periodic slice — and repair what it finds before
        anything is confirmed: ``of:epoch`` missing or another (a lost Redis
        Cluster shard; nodes reload until it is back) — the store's epoch is
        adopted (:meth:`feed.store.Store.reset_epoch`) and, if it moved, every
        market re-imaged; markets behind the book — each re-imaged at its next
        seq at once (not paced: only a market the store is proven to lack is
        written, so this cannot loop); event states behind — each queued to be
        written again at its next version in this flush (``_flush`` writes the
        pending states after this; nodes that kept the lost one marked lost take
        it). An audit of everything that finds nothing behind ends the hold a
        lost-writes detection put on confirmations (a deferred re-image of every
        market still runs). Returns the flush's result and deltas with the
        repair's merged in. Raises StoreError (the images then wait in the
        backlog, and nothing is confirmed)."""
        store = self.store
        recheck = self._recheck_at is not None and time.monotonic() >= self._recheck_at
        if recheck:
            self._recheck_at = None
        full = self._audit_due or store.connects != self._connects_seen or recheck
        found = await self._audit_store(full)
        if found.went_back and not full:
            # Redis went back in time without an error or reconnect seen here (a backup restored in
            # place, a replica promoted behind a proxy): what it lost may be any market's, so
            # everything is compared now rather than as the slices come round
            self._store_went_back(found.went_back)
            found = await self._audit_store(True)
        if found.went_back:
            # the baselines moved to the store as compared; one more audit of everything a beat later
            # finds what a restore still under way (key by key) takes back after this one
            self._recheck_at = time.monotonic() + RECHECK_AFTER_S
        old = store.epoch
        if found.states:
            self.lost_state_writes += len(found.states)
            logger.warning("source %s: the store is behind for %d event state(s) (writes it acknowledged were lost: "
                           "Redis went back in time?); writing them again: %s", self.source, len(found.states),
                           ", ".join(sorted(found.states)[:5]) + (" …" if len(found.states) > 5 else ""))
            for eid in found.states:
                es = self.event_states[eid]
                self._states_pending[eid] = self._states_again[eid] = msgspec.structs.replace(
                    es, version=es.version + 1)
        if found.whole and found.epoch == old and not found.markets and not found.states:
            self._lost_unverified = False
        if found.epoch != old:
            logger.warning("source %s: the store epoch is %s, not %s: adopting the store's", self.source,
                           found.epoch or "missing", old)
            if await store.reset_epoch() != old:
                self._forget_written()  # (another store: its marks are not this ingest's)
                more, images = await self._resend(self.book.reimage_all(stored_at))
                return _merged(result, more), images
        if found.markets:
            behind = found.markets
            self.lost_writes += len(behind)
            logger.warning("source %s: the store is behind the book for %d market(s) (writes it acknowledged "
                           "were lost: Redis went back in time?); re-imaging %s", self.source, len(behind),
                           ", ".join(sorted(behind)[:5]) + (" …" if len(behind) > 5 else ""))
            more, images = await self._resend(self.book.reimage(behind, stored_at))
            return _merged(result, more), [*deltas, *images]
        return result, deltas

    def _store_failed(self, exc: Exception) -> None:
        self._audit_due = True  # (Redis may come back older: compare before confirming again)
        self.store_failures += 1
        self.metrics.redis_error("store")
        first = self._store_error is None
        self._store_error = str(exc)
        if first:
            self._store_down_since = time.monotonic()
            logger.error("source %s: cannot write to the store (%s); keeping %d deltas and retrying",
                         self.source, exc, len(self._backlog))
        self._retry_at = time.monotonic() + self._store_backoff.next_delay()

    def _compact(self) -> None:
        """Replace the backlog by one image per market it touches, at the
        market's current seq: bounded memory during a long store outage; a
        client sees an image (which replaces), never a silent gap."""
        ids = dict.fromkeys(d.market_id for d in self._backlog)
        markets = self.book.markets
        self._backlog = [image_delta(markets[mid]) for mid in ids if mid in markets]
        self.compactions += 1
        logger.warning("source %s: store backlog over %d deltas: compacted to %d images", self.source,
                       self.backlog_max, len(self._backlog))

    def _reject(self, exc: FeedDecodeError) -> None:
        stats = self.stats
        stats.rejected += 1
        stats.rejected_by_reason[exc.reason] = stats.rejected_by_reason.get(exc.reason, 0) + 1
        where = f" market {exc.market_id}" if exc.market_id else f" event {exc.event_id}" if exc.event_id else ""
        logger.warning("rejected %s%s message (%s): %s; raw[:200]=%r", self.source, where, exc.reason,
                       exc.detail[:200], exc.raw[:200])
        if exc.market_id is not None:
            self._unconfirm.add(exc.market_id)
            self.lost_changes += 1
        elif exc.event_id is not None:  # an event state rejected alone: the held one is marked lost
            self._states_rejected.add(exc.event_id)
        rej = self._rejections
        if len(rej) >= QUARANTINE_QUEUE_MAX:  # the store is failing: keep the newest, count the rest
            del rej[0]
            self.stats.rejected_by_reason["quarantine_overflow"] = (
                self.stats.rejected_by_reason.get("quarantine_overflow", 0) + 1)
        rej.append(exc)

    async def _flush_rejections(self) -> None:
        rej = self._rejections
        at = self.clock_ms()
        while rej:
            exc = rej[0]
            await self.store.quarantine(self.source, exc.reason, exc.detail, exc.raw, at)
            del rej[0]

    def set_state(self, state: SourceState, reason: str | None) -> bool:
        """Change the source state; True when it changed."""
        h = self.health
        if h.state == state and h.reason == reason:
            return False
        if h.state != state:
            logger.info("source %s is %s%s", self.source, state, f" ({reason})" if reason else "")
        h.state = state
        h.reason = reason
        return True

    @property
    def degraded(self) -> bool:
        """The provider flagged the stream degraded (ESA ``status: 503``)."""
        return self._degraded

    def published_health(self) -> SourceHealth:
        """The health record as it must be persisted now: the source's own
        state, or DOWN / ``store_unavailable`` while deltas wait for the
        store (what Redis holds is behind the provider)."""
        h = self.health
        h.messages = self.stats.messages
        h.runner_changes = self.stats.runner_changes
        h.rejected = self.stats.rejected
        h.cursor = self.cursor
        h.updated_at = self.clock_ms()
        if self._store_error is not None and h.state != "DOWN":
            return msgspec.structs.replace(h, state="DOWN", reason=STORE_UNAVAILABLE)
        return h

    async def prune_closed(self) -> int:
        """Forget this source's markets closed, settled or cancelled longer than
        ``settled_retention_ms`` ago: from the book, then from the store (each
        only at the seq the book last wrote: a change since wins). Skipped while
        the store is unreachable or changes wait for it (they might touch those
        markets). Returns how many the store dropped. Raises RedisError.
        Runs under the flush lock: a flush in flight (its Store.apply reads
        ``book.markets`` between partitions) never sees a market vanish."""
        if self.settled_retention_ms <= 0:
            return 0
        async with self._flush_lock:
            return await self._prune_closed()

    async def _prune_closed(self) -> int:
        if self.backlog or self._pending or not self.store_ok:
            return 0
        await self._prune_states()
        items = self.book.prune_closed(self.clock_ms(), self.settled_retention_ms)
        if not items:
            return 0
        for mid, _ in items:
            self._checked.forget(mid)
        dropped = await self.store.prune(items)
        self.pruned += len(dropped)
        logger.info("%s: dropped %d closed markets older than %d s", self.source, len(dropped),
                    self.settled_retention_ms // 1000)
        return len(dropped)

    async def _prune_states(self) -> None:
        """Forget this source's event states that are final (ENDED, CLOSED,
        CANCELLED, ABANDONED) and older than ``settled_retention_ms``, or that
        have not changed for :data:`EVENT_STATE_IDLE_MS` — from memory and
        the store (each only at the version written: a newer state wins).
        Raises StoreError."""
        now = self.clock_ms()
        old = [(eid, es.version) for eid, es in self.event_states.items()
               if (es.status in FINAL_EVENT_STATUSES and now - es.received_at > self.settled_retention_ms)
               or now - es.received_at > EVENT_STATE_IDLE_MS]
        if not old:
            return
        await self.store.prune_event_states(old)
        for eid, _ in old:
            self.event_states.pop(eid, None)
        logger.info("%s: dropped %d event states (final, or idle for long)", self.source, len(old))

    async def publish_health(self) -> None:
        """Persist the source's health with its counters, cursor, session and lease."""
        await self.store.set_health(self.published_health())


#: how often a source's closed markets past the retention are pruned (HealthPublisher), s
PRUNE_EVERY_S = 30.0


class HealthPublisher:
    """Persists a source's health about once a second (renewing its lease),
    and at once when :meth:`wake` is called (a state change); retries the
    ingest's store backlog on the same beat, so a quiet source catches up
    when Redis returns. Use as an async context
    manager around the source's run; leaving it publishes a last time.

    It stops on its own flag rather than by cancellation alone, so a
    cancellation swallowed inside a Redis call can never keep it running.
    """

    def __init__(self, ingest: Ingest, interval_s: float = 1.0, *, lag: LagWindow | None = None,
                 prune_every_s: float = PRUNE_EVERY_S) -> None:
        self.ingest = ingest
        self.lag = lag
        self.interval_s = interval_s
        self.prune_every_s = prune_every_s
        self._pruned_at = time.monotonic()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            await wait_event(self._wake, self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            ingest = self.ingest
            try:
                if ingest.store_ok:
                    # a record vouches for the source's markets as the store holds them: not for a
                    # store that went back in time (§81) until the flush below compared and repaired it
                    try:
                        await ingest.check_store_marks()
                    except StoreError:  # unverified: the flush below audits everything first
                        ingest.audit_soon()
                if ingest.backlog or not ingest.store_ok or ingest.audit_due:
                    # a quiet source still drains what waits for the store, and has it compared
                    # with its book (Redis may have come back older: Ingest._audit_store)
                    await ingest.flush()
                if self.lag is not None:
                    apply_to_health(ingest.health, self.lag)
                await ingest.publish_health()
                if time.monotonic() - self._pruned_at >= self.prune_every_s:
                    self._pruned_at = time.monotonic()
                    await ingest.prune_closed()
                    # the marks of ingests gone (restarted, retired) — §81
                    await ingest.store.prune_writer_marks(now_ms() - WRITER_MARK_KEEP_MS)  # (entry ids: wall ms)
            except Exception as exc:  # a Redis hiccup must not stop the source
                ingest.metrics.redis_error("health")
                ingest.audit_soon()  # (Redis may be back older: compare before confirming again)
                logger.warning("could not publish health of %s: %s", ingest.source, exc)

    async def __aenter__(self) -> "HealthPublisher":
        self._task = asyncio.create_task(self._run(), name=f"health-{self.ingest.source}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=5.0)
            if not done:
                task.cancel()
