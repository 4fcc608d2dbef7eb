"""The ingest pipeline of one source: raw lines → normaliser → book → store.

Sources (``feed.sources``) hand raw provider lines here; the pipeline
normalises them, quarantines what is rejected (typed reason, raw bytes
capped, counted — the source carries on), sequences the updates in the book
and writes them to Redis in batched atomic applies together with the
source's resume cursor. It keeps the source's counters and health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field


from feed.aio import raise_if_cancelled, wait_event
from feed.book import Book
from feed.errors import FeedDecodeError
from feed.models import Delta, SourceHealth, SourceState
from feed.normalise.base import MarketUpdate, Normaliser
from feed.normalise.betfair import BetfairNormaliser
from feed.store import EpochChanged, Store

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


def now_ms() -> int:
    """Wall clock, integer ms since the Unix epoch."""
    return time.time_ns() // 1_000_000


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
    batches: int = 0
    foreign: int = 0
    started_at_ms: int = field(default_factory=now_ms)


class Ingest:
    """Runs one source's messages into the store.

    source: the source's name (health key, cursor field, quarantine tag).
    normaliser: any :class:`~feed.normalise.base.Normaliser` (default: a
    Betfair ESA one). clock_ms: injectable wall clock (ms). stale_after_ms:
    advertised in the source's health. The source's resume cursor is an
    opaque string: the normaliser advances it (``batch.cursor``) or the
    source sets it (:meth:`set_cursor`, e.g. a poller's ``since``).
    """

    def __init__(self, store: Store, *, source: str = "betfair", normaliser: Normaliser | None = None,
                 book: Book | None = None, clock_ms: Callable[[], int] = now_ms, stale_after_ms: int = 10_000,
                 kind: str = "betfair") -> None:
        self.store = store
        self.source = source
        self.kind = kind
        self.normaliser: Normaliser = normaliser or BetfairNormaliser(source)
        self.book = book or Book()
        self.clock_ms = clock_ms
        self.stats = IngestStats()
        self.cursor: str | None = None
        self.health = SourceHealth(source=source, kind=kind, state="DOWN", reason="starting",
                                   stale_after_ms=stale_after_ms)
        self._pending: list[MarketUpdate] = []
        self._cursor_dirty = False
        self._degraded = False
        self._rejections: list[FeedDecodeError] = []
        self._flush_lock = asyncio.Lock()

    async def restore(self) -> str | None:
        """Load stored snapshots (so seq continues); return the stored cursor."""
        markets = await self.store.load_all_markets()
        self.book.restore([m for m in markets if m.source == self.source])
        self.cursor = await self.store.load_cursor(self.source)
        return self.cursor

    def set_cursor(self, value: str) -> None:
        """Set the source's resume cursor; it is stored with the next flush."""
        if value != self.cursor:
            self.cursor = value
            self._cursor_dirty = True

    def feed_lines(self, lines: list[bytes], recv_ms: int, pt_map: Callable[[int], int] | None = None) -> None:
        """Normalise lines into the pending batch (no I/O); rejected lines
        are queued for quarantine. ``pt_map`` maps provider ``pt`` to
        ``source_ts`` (replays); None keeps ``pt``."""
        normaliser = self.normaliser
        stats = self.stats
        pending = self._pending
        for raw in lines:
            if not raw or raw.isspace():
                continue
            stats.messages += 1
            try:
                batch = normaliser.feed(raw, recv_ms, pt_map=pt_map)
            except FeedDecodeError as exc:
                self._reject(exc)
                continue
            if batch.updates:
                pending.extend(batch.updates)
                stats.runner_changes += batch.runner_changes
                stats.market_updates += len(batch.updates)
            elif batch.heartbeat:
                stats.heartbeats += 1
            if batch.degraded is not None:
                self._degraded = batch.degraded
            if batch.cursor is not None:
                self.cursor = batch.cursor
                self._cursor_dirty = True
        self.health.last_message_at = recv_ms

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> list[Delta]:
        """See :meth:`_flush`; flushes never overlap, so batches reach Redis
        in the order the book sequenced them."""
        async with self._flush_lock:
            return await self._flush()

    async def _flush(self) -> list[Delta]:
        """Sequence the pending updates in the book and store them with the
        cursor in one batched atomic apply; store queued rejections. Returns
        the deltas written. On EpochChanged (Redis lost its data) re-sends
        every market as an image under the new epoch."""
        await self._flush_rejections()
        updates, self._pending = self._pending, []
        cursor = None
        if self._cursor_dirty and self.cursor is not None:
            cursor = (self.source, self.cursor)
            self._cursor_dirty = False
        if not updates and cursor is None:
            return []
        stored_at = self.clock_ms()
        apply = self.book.apply
        deltas = [d for d in (apply(u, stored_at) for u in updates) if d is not None]
        if not deltas and cursor is None:
            return []
        try:
            result = await self.store.apply(deltas, self.book.markets, cursor)
            raise_if_cancelled()  # redis-py may have swallowed a cancel of this task
        except EpochChanged:
            logger.warning("store epoch changed under source %s: re-sending every market as an image", self.source)
            await self.store.reset_epoch()
            deltas = self.book.reimage_all(stored_at)
            result = await self.store.apply(deltas, self.book.markets, cursor)
        self.stats.deltas += result.kept
        self.stats.batches += 1
        if result.foreign:
            self.stats.foreign += result.foreign
            logger.warning("source %s: %d changes dropped: their markets belong to another source "
                           "(market ids must be unique per source; set prefix= or name= apart)",
                           self.source, result.foreign)
        return deltas

    def _reject(self, exc: FeedDecodeError) -> None:
        stats = self.stats
        stats.rejected += 1
        stats.rejected_by_reason[exc.reason] = stats.rejected_by_reason.get(exc.reason, 0) + 1
        logger.warning("rejected %s message (%s): %s; raw[:200]=%r", self.source, exc.reason,
                       exc.detail[:200], exc.raw[:200])
        self._rejections.append(exc)

    async def _flush_rejections(self) -> None:
        rej = self._rejections
        if not rej:
            return
        at = self.clock_ms()
        for exc in rej:
            await self.store.quarantine(self.source, exc.reason, exc.detail, exc.raw, at)
        rej.clear()

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

    async def publish_health(self) -> None:
        """Persist the source's health with its counters and cursor."""
        h = self.health
        h.messages = self.stats.messages
        h.runner_changes = self.stats.runner_changes
        h.rejected = self.stats.rejected
        h.cursor = self.cursor
        h.updated_at = self.clock_ms()
        await self.store.set_health(h)


class HealthPublisher:
    """Persists a source's health about once a second, and at once when
    :meth:`wake` is called (a state change). Use as an async context
    manager around the source's run; leaving it publishes a last time.

    It stops on its own flag rather than by cancellation alone, so a
    cancellation swallowed inside a Redis call can never keep it running.
    """

    def __init__(self, ingest: Ingest, interval_s: float = 1.0) -> None:
        self.ingest = ingest
        self.interval_s = interval_s
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
            try:
                await self.ingest.publish_health()
            except Exception as exc:  # a Redis hiccup must not stop the source
                logger.warning("could not publish health of %s: %s", self.ingest.source, exc)

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
