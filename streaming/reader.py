"""Redis → node state → hub: one reader task per partition, source health.

No Starlette imports. :class:`Node` is what an API process runs once:

- ``start()``: for every partition, position = ``last_log_id(p)`` and then
  the snapshots (``load_markets(p)``), so every log entry after the position
  is applied on top (deltas with ``seq`` ≤ the held one are skipped); then
  one :class:`PartitionReader` per partition and a health poller;
- each reader follows its partition with a :class:`~feed.store.LogTail`
  on its OWN Redis connection (XREAD BLOCK holds one): on a plain Redis new
  entries come from the pushed log (:class:`~feed.store.LogPush`: the apply
  script PUBLISHes each entry with the epoch and the previous entry's id, and
  one is taken only when it directly follows the node's position — after any
  gap, and after ``read_block_ms`` without a push, the log itself is read),
  else one ``XREAD BLOCK`` per read; each entry decoded once, applied to
  :class:`~streaming.state.NodeState` and handed to the
  :class:`~streaming.hub.Hub` once (encoded once, never per client);
- the guards — store epoch, partition epoch, oldest retained log id — are
  read (right after a read returns, before its entries are applied) when a
  check is due: at least every ``read_block_ms`` (the reader's
  ``check_interval_s``), after every read that returned nothing, after an
  error or a reload, while the reader is behind, for any read of
  ≥ ``VERIFY_BATCH_ENTRIES`` entries and for any read holding a delta whose
  ``seq`` is not above the market's held one. A changed/missing epoch (Redis
  flushed or restarted empty) reloads every partition; a log whose oldest
  entry is newer than where the reads since the last check started (trimmed
  past us, or deleted) reloads that partition; either way the hub sends every
  subscriber a fresh snapshot flagged ``recovered: false``. Why that still
  catches every loss before it is served: the guards are read after a read
  returns, before its entries are applied, so a loss before a check is seen
  by that check; entries read within ``check_interval_s`` after a check are
  applied unchecked only when nothing marks them as following a loss — a
  writer's ``MAXLEN ~ N`` trim past a reader leaves ≥ N entries after it
  (a batch of ≥ ``VERIFY_BATCH_ENTRIES``), and a writer starting over on a
  wiped store restarts its markets' seqs (a seq not above the held one) —
  so what is left (an operator's XTRIM/DEL of a live log, markets a wiped
  store no longer holds) is caught within ``check_interval_s``, the bound an
  idle reader always had (one ``read_block_ms``);
- Redis errors: ``connected`` goes False, the reader retries with capped,
  jittered backoff (never hangs: each read waits at most ``read_block_ms``
  for entries, and every reply has a deadline);
  an unexpected error (a bug) reloads the partition, so a change applied but
  not handed to every subscriber is never lost silently;
- every ~``health_refresh_ms`` the node reloads source health
  (``store.sources()``) and announces changes of a source's state, reason or
  stale markets as ``status`` messages.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Sequence

import msgspec
from redis.exceptions import RedisError

from feed.aio import wait_event
from feed.errors import ConfigError, StoreError
from feed.models import INGEST_GONE, Delta, Market
from feed.settings import Settings
from feed.sources.backoff import Backoff
from feed.store import LogCheck, Store
from streaming.aggregate import FAIR_METHODS
from streaming.encoding import parse_stream_id
from streaming.hub import Hub
from streaming.latency import HOPS, PRICE_CHECK_BUCKETS_S, Histogram
from streaming.event_states import EventStates, EventStateTail
from streaming.state import NodeOptions, NodeState, now_ms
from streaming.tenants import Tenants

__all__ = ["Node", "PartitionReader"]

logger = logging.getLogger(__name__)

#: how long :meth:`Node.stop` waits for its cancelled tasks to end, s
STOP_WAIT_S = 3.0
#: how often the node drops closed markets past ``settings.settled_retention_ms``, ms
PRUNE_EVERY_MS = 30_000

_REDIS_ERRORS = (RedisError, OSError, StoreError, asyncio.TimeoutError)

#: Log entries applied between two yields to the event loop.
YIELD_EVERY = 32
#: A read returning this many entries (or ``read_count``, when smaller) is checked before it
#: is applied: a writer's ``MAXLEN ~ N`` trim keeps ≥ N entries, so a trim past a reader's
#: position leaves ≥ N entries after it, i.e. a batch this big whenever N ≥ this.
VERIFY_BATCH_ENTRIES = 64


class PartitionReader:
    """Follows the delta log of one partition.

    connected: the last Redis call succeeded; behind: the last read returned
    a full batch (more is waiting) or the reader is reconnecting;
    last_entry_at: ms since the epoch when the last entry was read (None
    before the first); last_error: the last Redis error, for /ready;
    lag_ms: newest entry id in Redis minus the node's position (ms part of
    the stream ids, i.e. Redis clock); loop_at: loop time of the last turn
    of the read loop (a stalled reader is reported, never silent);
    errors: Redis errors so far; reads / checks: XREADs and guard checks
    (epoch, partition epoch, oldest id) so far.

    Guards (see the module docstring): a read is entries from the pushed log or
    an ``XREAD BLOCK`` alone (:meth:`feed.store.LogTail.read`) unless a check is
    due before it (the first read, after an error or a reload,
    while behind, or ``check_interval_s`` after the last check: then the
    guards go in the same round trip); after an unchecked read, the guards
    are read before anything is applied when the read returned nothing,
    when the check came due while it waited, when it returned
    ≥ ``VERIFY_BATCH_ENTRIES`` entries, or when it holds a delta whose
    ``seq`` is not above the market's held one.
    """

    def __init__(self, node: "Node", partition: int, store: Store) -> None:
        self.node = node
        self.partition = partition
        self.store = store
        self.connected = True
        self.behind = False
        self.last_entry_at: int | None = None
        self.last_error: str | None = None
        self.entries = 0
        self.errors = 0
        self.reads = 0
        self.checks = 0
        self.lag_ms = 0
        self.loop_at = asyncio.get_running_loop().time()
        #: longest time (loop seconds) a read's entries are applied after the last check
        self.check_interval_s = node.state.options.read_block_ms / 1000
        #: a reload to do at the next turn: (partitions or None = all, reason, Node.loaded when the
        #: turn that found the problem began — a partition loaded again since needs no reload)
        self._reload: tuple[list[int] | None, str, tuple[int, ...]] | None = None
        self._tail = store.tail(partition)
        self._push = node.settings.log_push  # take entries from the pushed log (feed.store.LogPush)
        self._check_now = True  # the first read is checked
        self._check_due = 0.0  # loop time after which the next read is checked
        #: every read since the last check started at or after this position; a
        #: log whose oldest entry is newer may have lost entries we never read
        self._verified_pos = node.state.positions[partition]
        self._gen = -1  # state generation of the last turn
        self._loaded = node.loaded[partition]  # Node.loaded[p] of the last turn
        #: the store's epochs still disagree with what a reload just found (a lost ``of:epoch``, a
        #: Redis Cluster shard lost: until the writer sets them right again): the next reload for
        #: the same reason waits, 0.5 s doubling to 10 s — not one reload (and one recovered:false
        #: snapshot to every client) per read
        self._epoch_backoff = Backoff(initial_s=0.5, factor=2.0, max_s=10.0)
        self._epoch_reloaded = False

    async def run(self) -> None:
        """Read until the node stops; never raises except CancelledError."""
        try:
            await self._run()
        finally:
            await self._tail.aclose()

    async def _run(self) -> None:
        node, st, p = self.node, self.node.state, self.partition
        opts = st.options
        backoff = Backoff(initial_s=0.05, factor=2.0, max_s=2.0)
        loop = asyncio.get_running_loop()
        verify_at = min(opts.read_count, VERIFY_BATCH_ENTRIES)
        while not node.stopping:
            self.loop_at = now_s = loop.time()
            since = tuple(node.loaded)  # (what a reload found in this turn is judged against)
            try:
                if self._reload is not None:
                    parts, reason, asked = self._reload
                    await node.reload(parts, reason, asked)
                    self._reload = None
                    continue
                gen = st.generation
                pos = st.positions[p]
                if gen != self._gen:  # a reload (of any partition) since the last turn: check the next read
                    self._gen = gen
                    self._check_now = True
                    if node.loaded[p] != self._loaded:  # this partition was reloaded: fresh from Redis
                        self._loaded = node.loaded[p]
                        self._verified_pos = pos
                checked = self._check_now or self.behind or now_s >= self._check_due
                self.reads += 1
                batch, guards = await self._read(pos, opts.read_block_ms, opts.read_count, checked)
                if not self.connected:
                    logger.info("reader of partition %d reconnected to redis", p)
                self.connected = True
                self.last_error = None
                backoff.reset()
                if guards is None and (not batch or len(batch) >= verify_at or loop.time() >= self._check_due
                                       or _holds_old_seq(batch, st.markets)):
                    # nothing came (quiet, or the log is gone), we may be behind a trim, the check came
                    # due while we waited, or a market's seq went back (another lineage): check first
                    guards = await self._guards()
                if st.generation != gen:
                    # the state was reloaded while we read: re-read from the new position (and check
                    # again: _check_now) — the guards and the entries belong to the state before it,
                    # judged against the reload's positions they would ask for a reload it made needless
                    continue
                if guards is not None:
                    self.checks += 1
                    problem = self._problem(guards, self._verified_pos, batch[-1][0] if batch else None)
                    if problem is not None:
                        epoch = problem[0] is None  # (only a changed store epoch reloads every partition)
                        if epoch and self._epoch_reloaded:
                            await node.sleep(self._epoch_backoff.next_delay())
                        self._epoch_reloaded = epoch
                        self._ask_reload(problem[0], problem[1], since)
                        continue
                    if self._epoch_reloaded:
                        self._epoch_reloaded = False
                        self._epoch_backoff.reset()
                    self._check_now = False
                    self._check_due = loop.time() + self.check_interval_s
                if batch:
                    now = self.last_entry_at = now_ms()
                    self.entries += len(batch)
                    for i, (entry_id, deltas) in enumerate(batch):
                        if i and i % YIELD_EVERY == 0:
                            await asyncio.sleep(0)  # let connection writers drain between chunks of a big batch
                            if st.generation != gen:
                                break
                            now = now_ms()
                        node.on_entry(p, entry_id, deltas, now)
                        if st.seq_gap is not None:
                            gp, mid, held, got = st.seq_gap
                            st.seq_gap = None
                            logger.error("partition %d: market %s jumped from seq %d to %d in the log; reloading",
                                         gp, mid, held, got)
                            self._ask_reload([gp], f"seq gap in market {mid} ({held} -> {got})", since)
                            break
                if guards is not None and st.generation == gen:
                    self._verified_pos = st.positions[p]  # where the next unchecked read starts
                self.behind = len(batch) >= opts.read_count
                if not self.behind:
                    self.lag_ms = 0  # read to the top of the log
                elif st.generation == gen:  # more waiting: how old is what we just applied
                    self.lag_ms = max(0, now_ms() - parse_stream_id(st.positions[p])[0])
            except asyncio.CancelledError:
                raise
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                if self._reload is not None:  # the reload itself met an undecodable stored snapshot
                    self.connected = False  # (/ready says so) — retried with backoff, not in a tight loop
                    self.last_error = f"undecodable stored snapshot: {exc}"
                    delay = backoff.next_delay()
                    logger.error("partition %d: reload failed on an undecodable stored snapshot (%s); retry in "
                                 "%.2f s", p, exc, delay)
                    await node.sleep(delay)
                    continue
                logger.error("partition %d: undecodable log entry after %s (%s); reloading", p,
                             st.positions[p], exc)
                self._ask_reload([p], "undecodable log entry", since)
            except _REDIS_ERRORS as exc:
                self.connected = False
                self.behind = True
                self._check_now = True  # Redis may come back empty or older: check before applying anything
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = backoff.next_delay()
                logger.warning("reader of partition %d: redis error (%s); retry %d in %.2f s", p,
                               self.last_error, backoff.attempts, delay)
                await node.sleep(delay)
            except Exception:  # a bug must not kill the feed silently
                self.connected = False
                self._check_now = True
                self.last_error = "internal error (see log)"
                logger.exception("reader of partition %d failed; reloading it from redis", p)
                # the failure may have come between applying an entry and handing it to every
                # subscription: the node's state or some clients may be missing a change. A
                # reload rebuilds the partition from the store's snapshots and sends every
                # subscriber a recovered:false snapshot (the entry itself is not read again)
                pending_all = self._reload is not None and self._reload[0] is None
                self._ask_reload(None if pending_all else [p], "internal error in the reader", since)
                await node.sleep(backoff.next_delay())

    def _ask_reload(self, partitions: list[int] | None, reason: str, since: tuple[int, ...]) -> None:
        """Reload ``partitions`` (None = all) at the next turn; until then the node
        knows their markets may miss a change (a gap, a trim, an error between an
        apply and the fan-out): they read as stale (:meth:`NodeState.mark_rebuilding`)."""
        self._reload = (partitions, reason, since)
        # (as of ``since``: a reload of the partition completed after the turn began — by another
        # reader — makes this one needless, and Node.reload then clears the mark)
        self.node.state.mark_rebuilding(partitions, reason, since)

    @property
    def pushed(self) -> int:
        """Log entries taken from the pushed log (no round trip) so far."""
        return getattr(self._tail, "pushed", 0)

    @property
    def push_gaps(self) -> int:
        """Pushed-log gaps so far (each followed by a read of the log itself)."""
        return getattr(self._tail, "push_gaps", 0)

    async def _read(self, pos: str, block_ms: int, count: int,
                    check: bool) -> tuple[list[tuple[str, list[Delta]]], LogCheck | None]:
        """Log entries after ``pos`` (from the pushed log, or one XREAD [BLOCK];
        each entry decoded once) and, with ``check``, the guards read in the
        same round trip as an XREAD of the log (else None)."""
        st = self.node.state
        return await self._tail.read(pos, block_ms=block_ms, count=count, check=check,
                                     epoch=st.epoch if self._push else None)

    async def _guards(self) -> LogCheck:
        """The guards alone, read now (one round trip)."""
        return await self._tail.check()

    def _problem(self, g: LogCheck, verified_pos: str, newest: str | None) -> tuple[list[int] | None, str] | None:
        """(partitions to reload or None = all, reason) when the guards say the
        node's state cannot be continued from the log; else None.
        ``verified_pos``: every read since the last check started at or after it;
        ``newest``: the id of the last entry read with the guards (None: none came)."""
        st, p = self.node.state, self.partition
        got_entries = newest is not None
        if g.epoch != st.epoch or (g.partition_epoch != st.epoch and g.partition_epoch is not None):
            return None, f"store epoch changed from {st.epoch} to {g.epoch} (redis reset or flushed)"
        pos = st.positions[p]
        ahead = newest if newest is not None and parse_stream_id(newest) > parse_stream_id(pos) else pos
        if g.last_id is not None and ahead != "0-0" and parse_stream_id(ahead) > parse_stream_id(g.last_id):
            # the node applied (or was handed) an entry the log does not hold: a pushed message no
            # XADD wrote (anyone who may PUBLISH can send one: the push is checked for its epoch and
            # chain, not its content), or Redis went back under the same epoch. What the node holds
            # past the log's head is not the store's: reload the partition
            return [p], f"the node is at {ahead} in partition {p}, past the log's newest entry {g.last_id}"
        if verified_pos != "0-0":
            if g.first_id is not None:
                if parse_stream_id(g.first_id) > parse_stream_id(verified_pos):
                    return [p], (f"log of partition {p} trimmed past position {verified_pos} "
                                 f"(oldest kept {g.first_id})")
            elif not got_entries:
                # our position is gone and the log is empty: it was deleted (or Redis came back
                # without it under the same epoch): reload to make sure nothing was lost
                return [p], f"log of partition {p} is empty but the node is at {verified_pos}"
        return None


def _holds_old_seq(batch: list[tuple[str, list[Delta]]], markets: dict[str, Market]) -> bool:
    """True when a delta of ``batch`` carries a ``seq`` not above its market's
    held one: normal only while a reader catches up over entries the loaded
    snapshots already hold; otherwise the store's seq went back (Redis lost
    its data and a writer started a new lineage) and the guards must be read
    before the entry is applied (skipped)."""
    for _, deltas in batch:
        for d in deltas:
            m = markets.get(d.market_id)
            if m is not None and d.seq <= m.seq:
                return True
    return False


class Node:
    """One API node: node state, hub, partition readers, health poller.

    store: the Store to read (``owns_store`` = close it on stop).
    ``shutdown`` is set when the node stops; transports watch it.
    """

    def __init__(self, settings: Settings, store: Store, *, options: NodeOptions | None = None,
                 owns_store: bool = False) -> None:
        self.settings = settings
        #: when closed markets past the retention were last dropped (ms since the epoch)
        self._pruned_at = 0
        self.store = store
        self.options = options or NodeOptions()
        self.owns_store = owns_store
        self.state = NodeState(settings, store.partitions, self.options)
        self.hub = Hub(self.state, store, outbox_max_bytes=settings.outbox_max_bytes,
                       replay_max_entries=self.options.replay_max_entries,
                       send_timeout_s=self.options.send_timeout_s)
        if settings.fair_method not in FAIR_METHODS:
            raise ConfigError(f"fair_method must be one of {', '.join(FAIR_METHODS)}, not {settings.fair_method!r}")
        self.hub.best.fair_method = settings.fair_method
        self.readers: list[PartitionReader] = []
        #: event states (scores, clock, status: streaming.event_states), kept current by their own tail task
        self.event_states = EventStates()
        self.event_state_tail = EventStateTail(store, self.event_states, block_ms=self.options.read_block_ms,
                                               retention_ms=settings.settled_retention_ms)
        # every changed state goes out as an ``event_state`` message to the subscriptions that see its event
        self.hub.event_states = self.event_states
        self.event_states.listeners.append(self.hub.event_states_changed)
        #: per partition, how many times it was loaded from Redis (readers reset their guards on a change)
        self.loaded: list[int] = [0] * store.partitions
        self.shutdown = asyncio.Event()
        self.stopping = False
        self.health_error: str | None = None
        #: the last health refresh could not read the event-state log head (None: it could)
        self.es_head_error: str | None = None
        self.health_at: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        #: per source, what was last announced: (state, reason, stale markets, stale event states)
        self._status: dict[str, tuple[str, str | None, tuple[str, ...], tuple[str, ...]]] = {}
        self.reloads = 0
        #: per-hop latency histograms (seconds), see streaming.metrics
        self.hops: dict[str, Histogram] = {hop: Histogram() for hop in HOPS}
        self.hub.send_delay = self.hops["queued_to_sent"]
        self._hop_hists = (self.hops["provider_to_received"], self.hops["received_to_stored"],
                           self.hops["stored_to_read"])
        #: price checks answered: reason → count (a batch counts each leg), and how long each request's
        #: handling took once its body was read (seconds), see streaming.pricecheck / streaming.metrics
        self.price_checks: dict[str, int] = {}
        self.price_check_latency = Histogram(PRICE_CHECK_BUCKETS_S)
        #: the app's tenants (streaming.tenants; set by streaming.app's lifespan), for metrics
        self.tenants: Tenants | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Load every partition, then start readers and the health poller.
        Raises StoreError (or RedisError) when Redis cannot be read."""
        await self._load(None)
        self.hub.started()
        await self.event_state_tail.load()
        await self.refresh_health(announce=False)
        if self.options.tune_gc:
            # latency over throughput: frequent, short young collections; full ones rare; what was
            # loaded at start is never scanned again (gc.freeze)
            import gc

            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, 50, 1000)
        for p in range(self.state.partitions):
            reader = PartitionReader(self, p, self.store)  # its LogTail opens a connection of its own
            self.readers.append(reader)
            self._tasks.append(asyncio.create_task(reader.run(), name=f"reader-p{p}"))
        self._tasks.append(asyncio.create_task(self._health_loop(), name="health"))
        self._tasks.append(asyncio.create_task(self.event_state_tail.run(), name="event-states"))
        logger.info("node started: %d markets, %d partitions, epoch %s", len(self.state.markets),
                    self.state.partitions, self.state.epoch)

    async def stop(self) -> None:
        """Close every client connection, stop the tasks, close connections
        this node opened (the main store only when it owns it)."""
        self.stopping = True
        self.shutdown.set()
        self.hub.close_all()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)
            for t in pending:  # a task that does not end on cancel is a bug: say where it is, go on
                stack = "".join(f"\n  {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in t.get_stack())
                logger.error("node stop: task %s did not end within %g s of its cancel:%s", t.get_name(),
                             STOP_WAIT_S, stack)
        self._tasks.clear()
        if self.owns_store:
            await self.store.close()
        logger.info("node stopped")

    async def sleep(self, seconds: float) -> None:
        """Sleep, returning early when the node stops."""
        await wait_event(self.shutdown, seconds)

    # -- state ----------------------------------------------------------------

    async def _load(self, partitions: Sequence[int] | None) -> None:
        store = self.store
        epoch = await store.current_epoch()
        if partitions is not None and self.state.loaded and epoch != self.state.epoch:
            # the store's epoch moved (Redis reset or flushed): the partitions not asked for hold
            # the old epoch's data — loading some under the new epoch would make the node take
            # the rest as current (their readers' epoch check would pass): load every partition
            logger.warning("store epoch changed from %s to %s during a partial reload: reloading every partition",
                           self.state.epoch, epoch)
            partitions = None
        parts = range(self.state.partitions) if partitions is None else partitions
        loaded = {}
        heads = {}
        for p in parts:
            position = await store.last_log_id(p)
            loaded[p] = (position, await store.load_markets(p))
            # the snapshots may hold changes logged after ``position``: up to this head the reader
            # skips a delta it already holds; past it a seq at or below the held one is a lineage
            # the node did not load (Redis went back in time under the same epoch): reload
            heads[p] = await store.last_log_id(p)
        self.state.replace_partitions(loaded, epoch)
        for p, head in heads.items():
            self.state.load_heads[p] = head
        for p in parts:
            self.loaded[p] += 1

    async def reload(self, partitions: list[int] | None, reason: str, since: Sequence[int]) -> None:
        """Reload ``partitions`` (None = all) from Redis, except those loaded again
        since ``since`` (:attr:`loaded` when the problem was found: a later load
        read the store after it); then resync clients."""
        async with self._reload_lock:
            wanted = range(self.state.partitions) if partitions is None else partitions
            todo = [q for q in wanted if self.loaded[q] == since[q]]
            for q in wanted:
                if q not in todo:  # loaded since the problem was found: fresh, not rebuilding
                    self.state.loaded_since_mark(q, self.loaded[q])
            if not todo:
                return
            parts = None if len(todo) == self.state.partitions else todo
            logger.warning("reloading %s: %s", "all partitions" if parts is None else f"partitions {parts}", reason)
            await self._load(parts)
            self.reloads += 1
            self.hub.resync(reason)

    def on_entry(self, partition: int, entry_id: str, deltas: list[Delta], now: int) -> None:
        """Apply one log entry and hand it to the hub (synchronous)."""
        # (no stream connection: nothing is sent now, the messages are encoded if a resume replays them)
        entry = self.state.apply_entry(partition, entry_id, deltas, now, bool(self.hub.connections))
        if entry is not None:
            h1, h2, h3 = self._hop_hists
            b1, c1, b2, c2, b3, c3 = h1.bounds, h1.counts, h2.bounds, h2.counts, h3.bounds, h3.counts
            s1 = s2 = s3 = 0.0
            for d in deltas:  # Histogram.observe inlined: three per delta on the hot path
                v = (d.received_at - d.source_ts) / 1000
                c1[bisect_left(b1, v)] += 1
                s1 += v
                v = (d.stored_at - d.received_at) / 1000
                c2[bisect_left(b2, v)] += 1
                s2 += v
                v = (now - d.stored_at) / 1000
                c3[bisect_left(b3, v)] += 1
                s3 += v
            n = len(deltas)
            h1.sum += s1
            h1.count += n
            h2.sum += s2
            h2.count += n
            h3.sum += s3
            h3.count += n
            self.hub.dispatch(entry)

    # -- health ---------------------------------------------------------------

    async def _health_loop(self) -> None:
        backoff = Backoff(initial_s=0.5, factor=2.0, max_s=10.0)
        delay = self.options.health_refresh_ms / 1000
        while not self.stopping:
            await self.sleep(delay)
            if self.stopping:
                break
            try:
                await self.refresh_health()
                self.health_error = None
                backoff.reset()
                delay = self.options.health_refresh_ms / 1000
            except asyncio.CancelledError:
                raise
            except _REDIS_ERRORS as exc:
                self.health_error = f"{type(exc).__name__}: {exc}"
                delay = max(self.options.health_refresh_ms / 1000, backoff.next_delay())
                logger.warning("source health refresh failed (%s); retry in %.2f s", self.health_error, delay)
                try:
                    self._announce(now_ms())  # leases still run out while Redis is unreachable
                except Exception:  # never end the health loop
                    logger.exception("announcing source health failed")
            except Exception:
                logger.exception("source health refresh failed")

    async def refresh_health(self, *, announce: bool = True) -> None:
        """Reload source health; announce each change of a source's state,
        reason, set of stale markets or set of stale event states as a ``status`` message."""
        sources = await self.store.sources()
        # read after the records: the node vouches for a record in a partition once it has read that far
        heads = await self.store.log_heads()
        # the event states likewise: once the event-state tail has read that far. Its log lives on one
        # slot of its own ({es}): a failure to read its head leaves the states with the confirmation
        # last reached (they age) and must not hold back the markets' records
        try:
            es_head: str | None = await self.store.event_state_log_head()
        except _REDIS_ERRORS as exc:
            es_head = None
            if self.es_head_error is None:
                logger.warning("reading the event-state log head failed (%s): event states are not "
                               "confirmed until it is read", exc)
            self.es_head_error = f"{type(exc).__name__}: {exc}"
        else:
            self.es_head_error = None
        self.state.set_health(sources, heads)
        if es_head is not None:
            self.event_states.set_health(sources, es_head)
        if await self.store.links_version() != self.state.links_version:  # the linker re-linked events
            version, links, canon = await self.store.load_links()
            moved = self.state.set_links(version, links, canon)
            if moved or self.hub.best.subs:
                # (with nothing moved the linker may still have changed a canonical event's summary —
                # its start time, its sides — which the best view judges books by (the start-time
                # net, streaming.aggregate.start_disagrees): relinked refreshes the best view once,
                # closing its subscribers' connections when that fails, as for a move)
                self.hub.relinked(moved)
        self.health_at = now = now_ms()
        self._announce(now, announce=announce)
        if now - self._pruned_at >= PRUNE_EVERY_MS:
            self._pruned_at = now
            gone = self.state.prune_closed(now, self.settings.settled_retention_ms)
            if gone:
                logger.info("dropped %d closed markets older than %d s", len(gone),
                            self.settings.settled_retention_ms // 1000)
                if self.hub.best.subs:
                    self.hub.best.refresh()

    def _announce(self, now: int, *, announce: bool = True) -> None:
        """Announce each change of a source's state (as it stands at ``now``:
        an expired lease reads DOWN / ``ingest_gone``), reason, set of stale
        markets or set of stale event states as a ``status`` message."""
        st = self.state
        seen = set()
        stale_states = self.event_states.stale_ids(st, now)  # source → its stale event states, sorted
        for h in st.health.values():
            h = st.effective(h, now)
            seen.add(h.source)
            stale = tuple(st.stale_ids(h.source, now))
            stale_events = tuple(stale_states.get(h.source, ()))
            sig = (h.state, h.reason, stale, stale_events)
            old = self._status.get(h.source)
            if old != sig:
                if announce:
                    before = set(old[2]) if old is not None else set()
                    went_stale = sorted(set(stale) - before)
                    went_fresh = sorted(before - set(stale))
                    logger.info("source %s is %s (%s), %d stale markets (%d newly stale, %d fresh again), "
                                "%d stale event states", h.source, h.state, h.reason, len(stale), len(went_stale),
                                len(went_fresh), len(stale_events))
                    self.hub.status(h.source, h.state, h.reason, list(stale), went_stale, went_fresh,
                                    stale_events=stale_events)
                self._status[h.source] = sig
        for name in set(self._status) - seen:
            del self._status[name]

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready when the state is loaded and every reader
        is connected and not behind."""
        if self.stopping:
            return False, "shutting down"
        if not self.state.loaded:
            return False, "node state not loaded yet"
        wall = now_ms()
        gone = sorted(name for name in self.state.health
                      if (h := self.state.source_health(name, wall)) is not None and h.reason == INGEST_GONE)
        if gone:
            return False, f"{INGEST_GONE}: no ingest is renewing the health of source {', '.join(gone)}"
        now = asyncio.get_running_loop().time()
        opts = self.options
        for r in self.readers:
            if not r.connected:
                return False, f"reader of partition {r.partition} not connected to redis ({r.last_error})"
            if now - r.loop_at > opts.stall_after_s:
                return False, f"reader of partition {r.partition} stalled for {now - r.loop_at:.1f} s"
            if r.behind:
                return False, f"reader of partition {r.partition} is behind the log"
            if r.lag_ms > opts.ready_max_lag_ms:
                return False, f"reader of partition {r.partition} is {r.lag_ms} ms behind the log"
        return True, "ok"
