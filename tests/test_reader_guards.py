"""The partition reader's guards, now that a read is one ``XREAD BLOCK`` (issue 11 item 3).

The store epoch, the partition epoch and the log's oldest id are no longer
read with every XREAD; they are read on a timer (``read_block_ms``), after an
empty read or an error, and before applying a read that could follow a loss
(≥ ``VERIFY_BATCH_ENTRIES`` entries, or a ``seq`` not above the held one).
Each test below makes the store lose something while a node streams and
fails if the check that catches it stops happening: the node must reload and
its subscribers get a ``recovered: false`` snapshot within a bound
(``eventually``/``until``, never a timed assert on the interval itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
from redis.exceptions import RedisError

from feed.store import EPOCH_KEY, EpochChanged, LogCheck, LogTail, Store, log_key, pepoch_key
from streaming.encoding import decode_token
from streaming.reader import VERIFY_BATCH_ENTRIES, PartitionReader
from streaming_helpers import Feed, SSEEvent, SSEReader, eventually, make_app, serve

TIMEOUT_S = 15.0
#: read_block_ms of the tests that need the timer to be the only path: reads never come back
#: empty while a writer streams every few ms, and the check interval (= read_block_ms) is long
LONG_BLOCK_MS = 4000


async def _event(sse: SSEReader) -> SSEEvent:
    """The next event that is not a heartbeat or a source status."""
    while True:
        ev = await sse.next(TIMEOUT_S)
        if ev.event not in ("heartbeat", "status"):
            return ev


@asynccontextmanager
async def _writing(feed: Feed, market: str, *, every_s: float = 0.01) -> AsyncIterator[list[int]]:
    """Write a price change of ``market`` every ``every_s`` in the background
    (adopting a new store epoch when the store reports one, as the ingest
    does); yields the list of seqs written."""
    seqs: list[int] = []
    stop = asyncio.Event()

    async def run() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            u = feed.price(market, "1", 2.0 + (i % 100) / 100)
            d = feed.book.apply(u, u.received_at, feed.session)
            assert d is not None
            try:
                await feed.store.apply([d], feed.book.markets)
            except EpochChanged:  # adopt the new epoch and write the same delta again (no gap)
                await feed.store.reset_epoch()
                await feed.store.apply([d], feed.book.markets)
            seqs.append(d.seq)
            await asyncio.sleep(every_s)

    task = asyncio.create_task(run())
    try:
        await eventually(lambda: len(seqs) >= 3, TIMEOUT_S, "the writer to start")
        yield seqs
    finally:
        stop.set()
        await task


def _gate(reader: PartitionReader) -> tuple[asyncio.Event, asyncio.Event, Callable[[], None]]:
    """Hold the reader before its next read: (entered, release, restore)."""
    entered, release = asyncio.Event(), asyncio.Event()
    real = reader._read

    async def gated(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await real(*args, **kwargs)
    reader._read = gated  # type: ignore[method-assign]

    def restore() -> None:
        reader._read = real  # type: ignore[method-assign]
    return entered, release, restore


async def test_a_streaming_reader_reads_the_guards_on_a_timer_not_per_read(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url, read_block_ms=LONG_BLOCK_MS)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            assert (await _event(sse)).event == "snapshot"
            reader = app.state.node.readers[0]
            reads0, checks0, t0 = reader.reads, reader.checks, time.monotonic()
            for i in range(40):
                (d,) = await feed.write(feed.price("m1", "1", 3.0 + i / 100))
                ev = await _event(sse)
                assert ev.event == "delta" and ev.data["seq"] == d.seq
            reads, checks = reader.reads - reads0, reader.checks - checks0
            elapsed_s = time.monotonic() - t0
    assert reads >= 40
    # at most one check per interval (+ the one in flight and the first read's): never one per read
    assert checks <= 2 + int(elapsed_s / reader.check_interval_s), (reads, checks, elapsed_s)


async def test_an_epoch_change_while_streaming_is_noticed_by_the_timer(store: Store, redis_url: str) -> None:
    """The writer keeps writing deltas (same lineage, seq + 1) under the new epoch: no read comes
    back empty and no batch looks suspicious, so only the timed check can notice."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url, read_block_ms=LONG_BLOCK_MS)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            old = await _event(sse)
            assert old.event == "snapshot"
            async with _writing(feed, "m1"):
                await sse.until(lambda e: e.event == "delta")
                new_epoch = "an-epoch-from-elsewhere"
                await store.redis.set(EPOCH_KEY, new_epoch)
                await store.redis.set(pepoch_key(0), new_epoch)
                snap = await sse.until(lambda e: e.event == "snapshot", TIMEOUT_S)
            assert snap.data["recovered"] is False
            tok = decode_token(snap.id)
            assert tok is not None and tok.epoch == new_epoch
    assert app.state.node.reloads >= 1


async def test_epochs_that_stay_inconsistent_do_not_reload_the_node_on_every_read(store: Store,
                                                                                 redis_url: str) -> None:
    """``of:epoch`` lost while the partition epochs stay (a Redis Cluster shard lost, an eviction):
    what a reload finds disagrees again at the next check, and the node reloaded — a
    ``recovered: false`` snapshot to every client — on every read, ~5 a second, until a writer
    set the epochs right. Repeated reloads for the same reason now back off (0.5 s doubling to
    10 s). The count is an upper bound over a window: a loaded machine only lowers it."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url, read_block_ms=100)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            assert (await _event(sse)).event == "snapshot"
            node = app.state.node
            await store.redis.delete(EPOCH_KEY)
            await eventually(lambda: node.reloads >= 2, TIMEOUT_S, "the node to reload (twice)")
            first, t0 = node.reloads, time.monotonic()
            await asyncio.sleep(2.0)  # (an upper bound: the window only has to be long enough to count)
            reloads, elapsed_s = node.reloads - first, time.monotonic() - t0
            # backing off 0.5, 1, 2 s …: at most 2 in 2 s (+1 in flight); per read it was ≥ 10
            assert reloads <= 3, (reloads, elapsed_s)
            # the epochs agreeing again ends it: the node follows the log again
            await store.redis.set(EPOCH_KEY, store.epoch)
            (d,) = await feed.write(feed.price("m1", "1", 4.4))
            await eventually(lambda: node.state.markets.get("m1") is not None
                             and node.state.markets["m1"].seq == d.seq and node.state.epoch == store.epoch,
                             TIMEOUT_S * 2, "the node on the writer's epoch")


async def test_a_reload_made_while_a_read_was_in_flight_leaves_no_partition_marked_rebuilding(
        redis_url: str) -> None:
    """Partition 1's reader has its entries and guards from Redis when another reader's reload of
    every partition completes (its reply late: a busy loop, a big reply). Judged against the
    reload's newer position, those guards said "past the log's head": a reload asked for, skipped
    (the partition was loaded since) — and its rebuilding mark, taken as of after that load, never
    cleared: every market of the partition read stale until some other reload. Now a read that a
    reload overtook is read again, and a mark is as of the turn's start."""
    from feed.settings import Settings
    from feed.store import partition_of

    store = await Store.open(redis_url, partitions=2)
    try:
        ids = [f"m{i}" for i in range(20)]
        a = next(m for m in ids if partition_of(m, 2) == 0)
        b = next(m for m in ids if partition_of(m, 2) == 1)
        feed = Feed(store)
        await feed.write(feed.image(a), feed.image(b))
        app = make_app(redis_url, settings=Settings(partitions=2, heartbeat_ms=60_000), read_block_ms=200)
        async with serve(app):
            node = app.state.node
            await eventually(lambda: b in node.state.markets, TIMEOUT_S, "the node loaded")
            r1 = node.readers[1]
            real = r1._read
            got, release = asyncio.Event(), asyncio.Event()

            async def held(pos: str, block_ms: int, count: int, check: bool) -> Any:
                res = await real(pos, block_ms, count, True)  # (a checked read: guards with the entries)
                if res[0] and not got.is_set():
                    got.set()
                    await release.wait()  # Redis answered; the reader is late to judge it
                return res
            r1._read = held  # type: ignore[method-assign]
            for i in range(200):
                await feed.write(feed.price(b, "1", 2.5 + i / 1000))
                if got.is_set():
                    break
                await asyncio.sleep(0.02)
            await eventually(got.is_set, TIMEOUT_S, "partition 1's read answered and held")
            await feed.write(feed.price(b, "1", 2.6))  # the log moves on past the held read's guards
            await node.reload(None, "another reader reloads every partition", tuple(node.loaded))
            reloads = node.reloads
            release.set()
            (last,) = await feed.write(feed.price(b, "1", 2.7))
            await eventually(lambda: node.state.markets[b].seq == last.seq, TIMEOUT_S, "the next change applied")
            await eventually(lambda: r1.checks > 0 and not r1._check_now, TIMEOUT_S, "a check after it")
            assert node.state.rebuilding == {} and node.state.rebuilding_reason(b) is None
            assert node.reloads == reloads
    finally:
        await store.close()


async def test_a_wiped_store_with_a_new_writer_is_noticed_before_its_entries_are_applied(
        store: Store, redis_url: str) -> None:
    """Redis loses everything and a writer starts over (seqs from 1): its first entry is read
    and checked before anything of it reaches a client, so no client ever sees the new
    writer's changes applied on top of the node's old state."""
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    app = make_app(redis_url, read_block_ms=LONG_BLOCK_MS)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            assert (await _event(sse)).event == "snapshot"
            async with _writing(feed, "m1") as seqs:
                await eventually(lambda: len(seqs) >= 10, TIMEOUT_S, "ten old deltas")
            last = seqs[-1]
            await sse.until(lambda e: e.event == "delta" and e.data["seq"] == last)
            # the store is wiped; a new writer (empty book) adopts a new epoch and images its markets
            await store.redis.flushall()
            await store.reset_epoch()
            fresh = Feed(store)
            await fresh.write(fresh.image("m1", prices={"1": 9.0, "2": 9.5}), fresh.image("m9"))
            for i in range(5):
                await fresh.write(fresh.price("m1", "1", 9.0 + i / 10))
            ev = await _event(sse)
            # nothing of the new writer may come before the resync (no delta of m9, no m1 at 9.x)
            assert ev.event == "snapshot" and ev.data["recovered"] is False, ev
            book = {m["market_id"]: m for m in ev.data["markets"]}
            if "m9" not in book:  # the node resynced before the new writer's images landed
                ev = await sse.until(lambda e: e.event == "snapshot" and
                                     "m9" in [m["market_id"] for m in e.data["markets"]], TIMEOUT_S)
                book = {m["market_id"]: m for m in ev.data["markets"]}
            assert set(book) == {"m1", "m9"}  # m2 went with the old store
            assert book["m1"]["seq"] <= fresh.book.markets["m1"].seq
    assert app.state.node.reloads >= 1


async def test_a_log_trimmed_past_the_reader_while_it_streams_is_noticed(store: Store, redis_url: str) -> None:
    """Changes of m2 are trimmed away before the node reads them and m2 never changes again
    (no seq gap to notice); the one entry left (of m1) is a small, ordinary batch. The check
    compares the oldest kept entry with where the reads since the last check started, so the
    loss is noticed within the check interval, not never."""
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    app = make_app(redis_url, read_block_ms=LONG_BLOCK_MS)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            assert (await _event(sse)).event == "snapshot"
            reader = app.state.node.readers[0]
            entered, release, restore = _gate(reader)
            (nudge,) = await feed.write(feed.price("m1", "1", 2.2))  # ends the read in flight
            await sse.until(lambda e: e.event == "delta" and e.data["seq"] == nudge.seq)
            await asyncio.wait_for(entered.wait(), TIMEOUT_S)
            for i in range(5):
                await feed.write(feed.price("m2", "1", 4.0 + i / 10))
            await feed.write(feed.price("m1", "1", 2.3))
            await store.redis.xtrim(log_key(0), maxlen=1, approximate=False)  # only m1's entry is left
            restore()
            release.set()
            snap = await sse.until(lambda e: e.event == "snapshot", TIMEOUT_S)
            assert snap.data["recovered"] is False
            m2 = next(m for m in snap.data["markets"] if m["market_id"] == "m2")
            assert m2["seq"] == feed.book.markets["m2"].seq
    assert app.state.node.reloads >= 1


async def test_a_trim_past_a_lagging_reader_is_noticed_before_anything_after_it_is_applied(
        store: Store, redis_url: str) -> None:
    """A writer's MAXLEN trim keeps at least its maxlen entries, so a trim past a lagging reader
    always shows as a big read (≥ VERIFY_BATCH_ENTRIES): checked before it is applied."""
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    app = make_app(redis_url, read_block_ms=LONG_BLOCK_MS)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            assert (await _event(sse)).event == "snapshot"
            reader = app.state.node.readers[0]
            entered, release, restore = _gate(reader)
            (nudge,) = await feed.write(feed.price("m1", "1", 2.2))
            await sse.until(lambda e: e.event == "delta" and e.data["seq"] == nudge.seq)
            await asyncio.wait_for(entered.wait(), TIMEOUT_S)
            await feed.write(feed.price("m2", "1", 4.0))  # lost below: the only entry trimmed unread
            for i in range(VERIFY_BATCH_ENTRIES):  # m1 continues without a gap after the trim
                await feed.write(feed.price("m1", "1", 2.0 + (i % 50) / 100))
            await store.redis.xtrim(log_key(0), maxlen=VERIFY_BATCH_ENTRIES, approximate=False)
            restore()
            release.set()
            ev = await _event(sse)
            # not one delta of what followed the trim reaches a client before the resync
            assert ev.event == "snapshot" and ev.data["recovered"] is False, ev
            m2 = next(m for m in ev.data["markets"] if m["market_id"] == "m2")
            assert m2["seq"] == feed.book.markets["m2"].seq
    assert app.state.node.reloads >= 1


async def test_a_log_deleted_while_the_node_is_idle_is_noticed(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    await feed.write(feed.price("m1", "1", 2.5))
    app = make_app(redis_url)  # short blocks: every empty read is followed by a check
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            assert (await _event(sse)).event == "snapshot"
            await store.redis.delete(log_key(0))
            snap = await sse.until(lambda e: e.event == "snapshot", TIMEOUT_S)
            assert snap.data["recovered"] is False
    assert app.state.node.reloads >= 1


async def test_log_tail_reads_entries_and_guards_in_one_call(store: Store) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    (d,) = await feed.write(feed.price("m1", "1", 2.5))
    first = await store.first_log_id(0)
    tail = LogTail(store, 0)
    try:
        entries, guards = await tail.read("0-0", block_ms=100, count=10, check=True)
        assert [(i, [x.seq for x in ds]) for i, ds in entries] == [(first, [1]), (await store.last_log_id(0), [d.seq])]
        assert guards == LogCheck(store.epoch, store.epoch, first, entries[-1][0])
        entries, guards = await tail.read(entries[-1][0], block_ms=50, count=10)
        assert entries == [] and guards is None  # timed out; no guards asked for
        await store.redis.flushall()
        assert await tail.check() == LogCheck(None, None, None)
        # a dropped connection fails the call in flight (or the next one) and is re-opened after it
        await store.redis.client_kill_filter(_type="normal", skipme=True)
        try:
            await tail.read("0-0", block_ms=50, count=10)
        except RedisError:
            pass
        assert (await tail.read("0-0", block_ms=50, count=10)) == ([], None)
    finally:
        await tail.aclose()


def test_log_tail_parses_resp2_and_resp3_xread_replies(store: Store) -> None:
    payload = b'[{"market_id":"m1","seq":4,"kind":"delta","source":"t","source_ts":1,"received_at":2}]'
    rows = [[b"5-0", [b"d", payload]], [b"6-1", [b"d", payload]]]
    tail = LogTail(store, 0)
    for reply in ({log_key(0).encode(): rows}, [[log_key(0).encode(), rows]]):
        entries = tail._entries(reply)
        assert [(i, [d.seq for d in ds]) for i, ds in entries] == [("5-0", [4]), ("6-1", [4])]
    assert tail._entries(None) == []


async def test_a_store_gone_back_in_time_under_the_same_epoch_is_reloaded_not_skipped(
        store: Store, redis_url: str) -> None:
    """Redis restored from an older snapshot (same epoch: the AOF/RDB of an hour ago) and the
    ingest restarted from it: its next change of m1 carries seq 2 while the node holds seq 3.
    Skipping it as "already held" would freeze m1 at a price the store no longer has; the node
    reloads the partition and its subscribers get the store's state as a recovered:false snapshot."""
    from feed.book import Book
    from feed.store import market_key, seq_key

    feed = Feed(store)
    await feed.write(feed.image("m1"))
    restored = feed.book.markets["m1"]  # what the older snapshot holds (seq 1)
    await feed.write(feed.price("m1", "1", 2.2))
    await feed.write(feed.price("m1", "1", 2.3))  # the node will hold seq 3
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            snap = await _event(sse)
            assert snap.event == "snapshot" and snap.data["markets"][0]["seq"] == 3
            # the restore: the stored state of m1 goes back to seq 1 (its log entries stay: ids are newer)
            await store.redis.hset(seq_key(0), "m1", 1)
            await store.redis.set(market_key(0, "m1"), msgspec.json.encode(restored))
            # the ingest restarts from the restored store and goes on: seq 2, another price
            again = Feed(store)
            again.book = Book()
            again.book.restore([restored])
            (d,) = await again.write(again.price("m1", "1", 9.9))
            assert d.seq == 2
            ev = await sse.until(lambda e: e.event == "snapshot", TIMEOUT_S)
            assert ev.data["recovered"] is False
            (m1,) = ev.data["markets"]
            assert (m1["seq"], m1["selections"][0]["price"]) == (2, 9.9)
    assert app.state.node.reloads >= 1


async def test_log_tail_starts_a_new_connection_when_a_reply_comes_too_late(store: Store) -> None:
    """A reply that misses its deadline must never be read later as the answer of the
    next command (a node stalled on Redis — SIGSTOP in the fault suite — then read
    the epoch as an XREAD reply forever)."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    tail = store.tail(0)
    try:
        await tail.check()  # connected
        tail.timeout_s = 0.05
        await store.redis.execute_command("CLIENT", "PAUSE", 400, "ALL")  # every other client waits 0.4 s
        try:
            await tail.check()
        except TimeoutError:
            pass
        else:
            raise AssertionError("the check answered although Redis was paused")
        tail.timeout_s = 5.0

        async def reads() -> bool:
            entries, guards = await tail.read("0-0", block_ms=10, count=10, check=True)
            return [d.market_id for _, ds in entries for d in ds] == ["m1"] and guards is not None \
                and guards.epoch is not None
        await eventually(reads, TIMEOUT_S, "a read with its own replies after the pause")
        entries, _ = await tail.read("0-0", block_ms=10, count=10)
        assert [d.market_id for _, ds in entries for d in ds] == ["m1"]
    finally:
        await tail.aclose()


async def test_a_bug_between_applying_an_entry_and_sending_it_reloads_and_resyncs(store: Store,
                                                                                   redis_url: str) -> None:
    """An exception inside the hub's dispatch (after the node applied the entry, before every
    subscriber got it) must not leave a client silently without that change: the reader
    reloads the partition and the client gets a recovered:false snapshot holding it."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            assert (await _event(sse)).event == "snapshot"
            hub = app.state.node.hub
            real = hub.dispatch
            failed: list[int] = []

            def dispatch_failing_once(entry: Any) -> None:
                if not failed:
                    failed.append(1)
                    raise RuntimeError("a bug in dispatch")
                real(entry)

            hub.dispatch = dispatch_failing_once
            (d,) = await feed.write(feed.price("m1", "1", 3.3))
            snap = await sse.until(lambda e: e.event == "snapshot", TIMEOUT_S)
            assert snap.data["recovered"] is False
            (m,) = [m for m in snap.data["markets"] if m["market_id"] == "m1"]
            assert m["seq"] == d.seq  # the change the subscriber never got as a delta is in it
            (d2,) = await feed.write(feed.price("m1", "1", 3.4))
            ev = await _event(sse)
            assert ev.event == "delta" and ev.data["seq"] == d2.seq  # and the stream goes on
    assert app.state.node.reloads >= 1
