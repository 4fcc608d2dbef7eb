"""Store against a real redis-server: batched atomic apply, seq checks, epoch, cursor."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from feed.book import Book
from feed.models import MarketHeader, Selection
from feed.normalise.base import MarketUpdate
from feed.store import EpochChanged, Store


def _update(mid: str, price: float, *, image: bool = False, ts: int = 1000) -> MarketUpdate:
    return MarketUpdate(
        market_id=mid, source="t", image=image,
        header=MarketHeader(sport="soccer", status="OPEN") if image else None,
        selections=[Selection(selection_id="1", price=price, back=[(price, 10.0)])],
        source_ts=ts, received_at=ts + 5,
    )


async def test_apply_writes_snapshot_log_and_cursor(store: Store) -> None:
    book = Book()
    deltas = [book.apply(_update("m1", 2.0, image=True), stored_at=7),
              book.apply(_update("m1", 2.1, ts=1001), stored_at=7),
              book.apply(_update("m2", 3.0, image=True), stored_at=7)]
    res = await store.apply(deltas, book.markets, cursor=("t", "clk-1"))
    assert res.kept == 3 and res.dropped == 0
    m1 = await store.get_market("m1")
    assert m1 is not None and m1.seq == 2 and m1.selections[0].price == 2.1 and m1.stored_at == 7
    rows = await store.log_range(0, "0-0")
    assert [[(d.market_id, d.seq) for d in ds] for _, ds in rows] == [[("m1", 1), ("m1", 2), ("m2", 1)]]
    assert await store.load_cursor("t") == "clk-1"
    assert sorted(m.market_id for m in await store.load_all_markets()) == ["m1", "m2"]


async def test_apply_drops_stale_seq_atomically(store: Store) -> None:
    book = Book()
    d1 = book.apply(_update("m1", 2.0, image=True))
    d2 = book.apply(_update("m1", 2.2, ts=1002))
    await store.apply([d1, d2], book.markets)
    # a second writer with an older book replays seq 2 and adds nothing new
    res = await store.apply([d2], book.markets)
    assert res.kept == 0 and res.dropped == 1
    assert len(await store.log_range(0, "0-0")) == 1


async def test_epoch_change_is_detected(store: Store, redis_url: str) -> None:
    book = Book()
    d = book.apply(_update("m1", 2.0, image=True))
    await store.redis.flushall()
    with pytest.raises(EpochChanged):
        await store.apply([d], book.markets)
    old = store.epoch
    await store.reset_epoch()
    assert store.epoch != old
    assert (await store.apply([d], book.markets)).kept == 1


async def test_partitions_use_hash_tags(redis_url: str) -> None:
    s = await Store.open(redis_url, partitions=4)
    try:
        book = Book()
        ds = [book.apply(_update(f"m{i}", 2.0, image=True)) for i in range(20)]
        res = await s.apply(ds, book.markets, cursor=("t", "c"))
        assert res.kept == 20 and len(res.entries) > 1
        keys = [k.decode() for k in await s.redis.keys("of:{*}:log")]
        assert len(keys) == len(res.entries)
        assert len(await s.load_all_markets()) == 20
    finally:
        await s.close()


async def test_partition_count_is_fixed(redis_url: str) -> None:
    s = await Store.open(redis_url, partitions=2)
    await s.close()
    from feed.errors import StoreError

    with pytest.raises(StoreError, match="2 partitions"):
        await Store.open(redis_url, partitions=3)


async def test_unreachable_redis_is_one_line_error() -> None:
    from feed.errors import StoreError

    with pytest.raises(StoreError) as info:
        await Store.open("redis://127.0.0.1:1/0")
    assert "cannot reach redis at redis://127.0.0.1:1/0" in str(info.value)
    assert "\n" not in str(info.value)


def test_market_json_roundtrip() -> None:
    from feed.models import ENCODER, MARKET_DECODER

    book = Book()
    book.apply(_update("m1", 2.0, image=True))
    m = book.markets["m1"]
    assert MARKET_DECODER.decode(ENCODER.encode(m)) == m
    assert msgspec.json.decode(ENCODER.encode(m))["selections"][0]["back"] == [[2.0, 10.0]]


async def test_apply_trims_a_partial_overlap(store: Store) -> None:
    book = Book()
    d1 = book.apply(_update("m1", 2.0, image=True))
    d2 = book.apply(_update("m1", 2.2, ts=1002))
    d3 = book.apply(_update("m1", 2.4, ts=1003))
    await store.apply([d1, d2], book.markets)
    res = await store.apply([d2, d3], book.markets)
    assert (res.kept, res.dropped) == (1, 1)
    rows = await store.log_range(0, "0-0")
    assert [d.seq for _, ds in rows for d in ds] == [1, 2, 3]


async def test_a_retried_batch_whose_first_try_landed_keeps_its_newest_change(store: Store) -> None:
    """A flush whose write landed without a reply (a timeout, a killed connection) is retried
    with a change more: the store holds seqs 1–3, the retry carries 2–4. Judged whole by
    provider time, its oldest delta (2) is older than the stored state (3) and the whole batch
    was dropped — seq 4 with it, counted as written: the store and every node kept 2.4 while
    the provider had moved to 2.6. Now the part the store holds is trimmed first."""
    book = Book()
    d1 = book.apply(_update("m1", 2.0, image=True, ts=1000))
    await store.apply([d1], book.markets)
    d2 = book.apply(_update("m1", 2.2, ts=1002))
    d3 = book.apply(_update("m1", 2.4, ts=1003))
    await store.apply([d2, d3], book.markets)  # landed; the writer never saw the reply
    d4 = book.apply(_update("m1", 2.6, ts=1004))
    res = await store.apply([d2, d3, d4], book.markets)  # the retry, with the change since
    assert (res.kept, res.dropped) == (1, 2)
    m1 = await store.get_market("m1")
    assert m1 is not None and m1.seq == 4 and m1.selections[0].price == 2.6
    rows = await store.log_range(0, "0-0")
    assert [d.seq for _, ds in rows for d in ds] == [1, 2, 3, 4]
    # an older writer's batch the store does not hold yet is still dropped by provider time
    old = Book()
    o1 = old.apply(_update("m9", 5.0, image=True, ts=2000))
    await store.apply([o1], old.markets)
    o2 = old.apply(_update("m9", 5.5, ts=2001))
    older = Book()
    older.apply(_update("m9", 4.0, image=True, ts=1500))
    stale = older.apply(_update("m9", 4.5, ts=1501))
    assert stale is not None and stale.seq == 2 == o2.seq
    res = await store.apply([stale], older.markets)
    assert (res.kept, res.dropped) == (0, 1)
    m9 = await store.get_market("m9")
    assert m9 is not None and m9.seq == 1 and m9.selections[0].price == 5.0


async def test_a_script_that_fails_writes_nothing(store: Store) -> None:
    """Redis does not roll a script back: the apply script's snapshot, seq and cursor writes went
    before its XADD, so an XADD that failed (a key of another type at the log, a MAXLEN Redis
    refuses) left the market stored at its new seq with no log entry — the retry was dropped as
    already stored and no node ever got the change. The XADD goes first now."""
    from feed.errors import StoreError
    from feed.store import CURSOR_KEY, idx_key, log_key

    book = Book()
    d1 = book.apply(_update("m1", 2.0, image=True))
    for key in (log_key(0), idx_key(0), CURSOR_KEY):  # (the log, the market index, the cursor hash)
        await store.redis.set(key, "not a stream, set or hash")
        with pytest.raises(StoreError):
            await store.apply([d1], book.markets, cursor=("t", "clk-1"))
        await store.redis.delete(key)
        assert await store.get_market("m1") is None and await store.load_cursor("t") is None, key
        assert await store.redis.exists(log_key(0)) == 0, key
    res = await store.apply([d1], book.markets, cursor=("t", "clk-1"))
    assert res.kept == 1
    assert [[d.seq for d in ds] for _, ds in await store.log_range(0, "0-0")] == [[1]]


def test_a_log_of_no_entries_is_refused_as_configuration() -> None:
    from feed.errors import ConfigError
    from feed.settings import from_env

    with pytest.raises(ConfigError, match="log_maxlen"):
        from_env({"ODDSFEED_LOG_MAXLEN": "-1"})
    with pytest.raises(ConfigError, match="at least 1"):
        Store(None, log_maxlen=0)  # type: ignore[arg-type]


async def test_a_market_belongs_to_the_source_that_wrote_it_first(store: Store) -> None:
    """Two sources with colliding market ids must never interleave their books."""
    a, b = Book(), Book()
    ua = _update("m1", 2.0, image=True)
    ub = msgspec.structs.replace(_update("m1", 9.0, image=True), source="other")
    ds_a = [a.apply(ua), a.apply(_update("m1", 2.2, ts=1001))]
    ds_b = [b.apply(ub)] + [b.apply(msgspec.structs.replace(_update("m1", 9.0 + i / 10, ts=1001 + i), source="other"))
                            for i in range(1, 5)]
    assert (await store.apply(ds_a, a.markets)).kept == 2
    res = await store.apply(ds_b, b.markets)  # higher seqs, but a foreign source
    assert (res.kept, res.foreign) == (0, 5)
    m = await store.get_market("m1")
    assert m is not None and m.source == "t" and m.selections[0].price == 2.2


async def test_the_embedded_append_only_file_is_rewritten_as_the_trimmed_log_grows(tmp_path) -> None:
    """The delta log is trimmed (XADD MAXLEN) but the AOF keeps every command until a rewrite: the
    embedded server rewrites it past AOF_REWRITE_MIN_BYTES, so it does not grow with the traffic."""
    import redis.asyncio as aioredis

    from feed.embedded_redis import AOF_REWRITE_MIN_BYTES, EmbeddedRedis
    from streaming_helpers import eventually

    server = EmbeddedRedis(tmp_path / "r", appendonly=True)
    server.start()
    r = aioredis.from_url(server.url)
    try:
        assert int((await r.config_get("auto-aof-rewrite-min-size"))["auto-aof-rewrite-min-size"]) \
            == AOF_REWRITE_MIN_BYTES
        payload = b"x" * 4096
        written = 0
        while written < 3 * AOF_REWRITE_MIN_BYTES:  # bounded: 48 MB of trimmed stream entries
            pipe = r.pipeline(transaction=False)
            for _ in range(256):
                pipe.xadd("of:{0}:log", {"d": payload}, maxlen=100, approximate=False)
            await pipe.execute()
            written += 256 * len(payload)

        async def rewritten() -> bool:  # (Redis 6.2 has no aof_rewrites counter: -1 = never rewritten)
            info = await r.info("persistence")
            return int(info.get("aof_last_rewrite_time_sec", -1)) >= 0 and not int(info.get("aof_rewrite_in_progress", 0))
        await eventually(rewritten, 60, "an AOF rewrite")
        aof = sum(f.stat().st_size for f in (tmp_path / "r").rglob("*.aof*"))
        assert aof < written, (aof, written)  # rewritten: not every command written
    finally:
        await r.aclose()
        server.stop()


async def test_closed_markets_past_the_retention_leave_the_book_and_the_store(store: Store) -> None:
    from streaming_helpers import Feed, now_ms

    feed = Feed(store)
    await feed.write(feed.image("old"), feed.image("open"), feed.image("recent"), feed.image("raced"))
    await feed.write(feed.header("old", status="CLOSED"), feed.header("recent", status="SETTLED"),
                     feed.header("raced", status="CLOSED"))
    now = now_ms()
    # "recent" closed just now; the others' last change is pretended 2 h old
    items = feed.book.prune_closed(now + 7_200_000, 3_600_000)
    assert sorted(mid for mid, _ in items) == ["old", "raced", "recent"]  # open markets never go
    assert feed.book.prune_closed(now, 3_600_000) == [] and feed.book.prune_closed(now, 0) == []
    # a change stored since the book decided wins: "raced" was written again at a higher seq
    stored = {m.market_id: m.seq for m in await store.load_all_markets()}
    raced = [(mid, seq) for mid, seq in items if mid == "raced"][0]
    other = Book()
    other.restore([m for m in await store.load_all_markets() if m.market_id == "raced"])
    d = other.apply(MarketUpdate(market_id="raced", source="t", image=False, source_ts=now, received_at=now + 1,
                                 header=MarketHeader(status="OPEN", sport="soccer", event_id="e1"), selections=[]))
    assert d is not None and d.seq == stored["raced"] + 1
    await store.apply([d], other.markets)
    dropped = await store.prune(items)
    assert sorted(dropped) == ["old", "recent"] and raced[1] == stored["raced"]
    left = {m.market_id: m for m in await store.load_all_markets()}
    assert sorted(left) == ["open", "raced"] and left["raced"].status == "OPEN"
    r = store.redis
    for key in ("of:{0}:seq", "of:{0}:owner", "of:{0}:pt"):
        assert not await r.hexists(key, "old")
    assert not await r.sismember("of:{0}:idx", "old") and not await r.exists("of:{0}:m:old")
    # an image of a forgotten market starts again with its seq continuing (never back in time)
    again = feed.book.apply(feed.image("old"))
    assert again is not None and again.seq == stored["old"] + 1


def _one_per_partition(partitions: int) -> list[str]:
    from feed.store import partition_of

    out: dict[int, str] = {}
    i = 0
    while len(out) < partitions:
        out.setdefault(partition_of(f"m{i}", partitions), f"m{i}")
        i += 1
    return [out[p] for p in range(partitions)]


async def test_a_batch_over_several_partitions_keeps_the_cursor_last(redis_url: str) -> None:
    """A batch touching every partition: all stored, the cursor with partition 0 (last); a
    partition answered PARTIAL (a redelivered delta) keeps only what is new, and an epoch change
    raises before the cursor moves."""
    s = await Store.open(redis_url, partitions=4)
    try:
        await s.redis.flushall()
        await s.reset_epoch()
        mids = _one_per_partition(4)
        book = Book()
        images = [book.apply(_update(mid, 2.0, image=True)) for mid in mids]
        res = await s.apply(images, book.markets, cursor=("t", "c1"))
        assert (res.kept, res.dropped, sorted(res.entries)) == (4, 0, [0, 1, 2, 3])
        assert await s.load_cursor("t") == "c1"
        # a batch redelivering partition 3's last delta beside new ones: kept what is new, dropped the rest
        again = book.apply(_update(mids[3], 2.2, ts=1002))
        await s.apply([again], book.markets)
        news = [book.apply(_update(mid, 2.4, ts=1003)) for mid in mids]
        res = await s.apply([again, *news], book.markets, cursor=("t", "c2"))
        assert (res.kept, res.dropped, sorted(res.entries)) == (4, 1, [0, 1, 2, 3])
        assert await s.load_cursor("t") == "c2"
        for mid in mids:
            m = await s.get_market(mid)
            assert m is not None and m.selections[0].price == 2.4
        rows = await s.log_range(3, "0-0")
        assert [d.seq for _, ds in rows for d in ds] == [1, 2, 3]  # seq 2 once
        # the epoch changes under the writer: EpochChanged, and the cursor stays where it was
        from feed.store import EPOCH_KEY, pepoch_key

        for key in (EPOCH_KEY, *(pepoch_key(p) for p in range(4))):
            await s.redis.set(key, "another-writer")
        more = [book.apply(_update(mid, 2.6, ts=1004)) for mid in mids]
        with pytest.raises(EpochChanged):
            await s.apply(more, book.markets, cursor=("t", "c3"))
        assert await s.load_cursor("t") == "c2"
    finally:
        await s.close()


async def test_the_log_tails_bare_connection_auths_selects_reports_errors_and_reconnects(tmp_path) -> None:
    """The tails' RESP connection (feed.store.RespConnection), against a real redis-server that
    wants a password: AUTH and SELECT from the URL, an error reply raised as ResponseError, a
    server gone raised (never a hang), and the next call connecting again."""
    import asyncio

    from redis.exceptions import ResponseError

    from feed.embedded_redis import EmbeddedRedis, cluster_node_port
    from feed.store import RespConnection

    port = cluster_node_port()
    import redis as sync_redis

    server = EmbeddedRedis(tmp_path / "r", appendonly=False, port=port)
    server.start()
    sync_redis.Redis(port=port).config_set("requirepass", "s3cret")  # (the embedded server's ping has no password)
    try:
        s = await Store.open(f"redis://:s3cret@127.0.0.1:{port}/3")
        tail = s.tail(0)
        assert isinstance(tail._conn, RespConnection)  # the hot path does not go through redis-py
        book = Book()
        await s.apply([book.apply(_update("m1", 2.0, image=True))], book.markets)
        entries, check = await tail.read("0-0", block_ms=100, count=10, check=True)
        assert [d.market_id for _, ds in entries for d in ds] == ["m1"] and check is not None
        assert check.epoch == s.epoch  # read from db 3, where the store writes
        conn = tail._conn
        await conn.send_packed_command(conn.pack_command("NOSUCHCOMMAND"))
        with pytest.raises(ResponseError):
            await conn.read_response()
        # the server goes away in the middle of a blocked read: an error, not a hang
        reading = asyncio.create_task(tail.read(entries[-1][0], block_ms=10_000, count=10))
        await asyncio.sleep(0.2)
        server.kill()
        with pytest.raises((ConnectionError, OSError)):
            await asyncio.wait_for(reading, 10)
        server.start()
        sync_redis.Redis(port=port).config_set("requirepass", "s3cret")
        book.apply(_update("m1", 2.2, ts=1002))
        await s.reset_epoch()
        await s.apply([book.apply(_update("m1", 2.4, ts=1003))], book.markets)
        got, _ = await asyncio.wait_for(tail.read("0-0", block_ms=100, count=10), 10)  # connects again
        assert got
        await tail.aclose()
        await s.close()
    finally:
        server.stop()


async def test_the_bare_connection_keeps_each_replys_own_deadline_with_one_timer(store: Store) -> None:
    """RespConnection.reply: a reply that comes after the connection's one timer fired early
    (for an earlier, shorter deadline) but before its own deadline is returned; a reply that
    does not come within its deadline raises TimeoutError at that deadline even when the
    pending timer was set further out by an earlier read."""
    import asyncio

    from feed.store import RespConnection

    pool = store.redis.connection_pool
    loop = asyncio.get_running_loop()
    conn = RespConnection.for_pool(pool, dict(pool.connection_kwargs))
    assert conn is not None
    try:
        await conn.send_packed_command(conn.pack_command("PING"))
        assert await conn.reply(0.2) == b"PONG"  # the timer: 0.2 s out, nothing awaited when it fires
        await conn.send_packed_command(conn.pack_command("BLPOP", "of:test:never", 1))  # nil after 1 s
        assert await conn.reply(10.0) is None  # the 0.2 s timer fired early and slept on: no timeout
    finally:
        await conn.disconnect()
    conn = RespConnection.for_pool(pool, dict(pool.connection_kwargs))
    assert conn is not None
    try:
        await conn.send_packed_command(conn.pack_command("PING"))
        assert await conn.reply(60.0) == b"PONG"  # the timer: 60 s out, still pending
        await conn.send_packed_command(conn.pack_command("BLPOP", "of:test:never", 0))  # never answers
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(30):  # a guard: without the 0.5 s deadline this fires after 30 s
                await conn.reply(0.5)
        assert loop.time() - t0 < 5, "the pending 60 s timer hid the 0.5 s deadline"
    finally:
        await conn.disconnect()


async def test_a_market_new_to_the_store_at_or_below_the_seq_floor_is_reimaged_above_it(store: Store) -> None:
    """A settled market pruned at seq 3, then re-created under the same id by a writer that no longer
    knows that seq (an ingest restarted, or one past its memory) at seq 1: clients still hold the
    old market (nodes never tell them of a prune) and would drop the new image and every delta up
    to seq 3, then apply seq 4 to the OLD market. The store keeps the partition's seq floor and
    refuses such a market; the writer's rebase re-images it above the floor (docs §69)."""
    from feed.store import SeqBelowFloor, floor_key

    a = Book()
    ds = [a.apply(_update("M", 2.0, image=True), stored_at=1), a.apply(_update("M", 2.2, ts=1001), stored_at=1)]
    closing = a.apply(MarketUpdate(market_id="M", source="t", image=False, source_ts=1002, received_at=1007,
                                   header=MarketHeader(sport="soccer", status="SETTLED"), selections=[]), stored_at=1)
    await store.apply([*ds, closing], a.markets)
    assert closing is not None and closing.seq == 3
    held = await store.get_market("M")  # what a client holds, and keeps after the prune
    assert await store.prune([("M", 3)]) == ["M"]
    assert await store.redis.get(floor_key(0)) == b"3" and await store.seq_floor() == 3
    head = await store.last_log_id(0)

    b = Book()  # the restarted writer: no memory of M
    again = [b.apply(_update("M", 5.0, image=True, ts=2000), stored_at=2),
             b.apply(_update("M", 5.2, ts=2001), stored_at=2)]
    assert [d.seq for d in again if d is not None] == [1, 2]
    with pytest.raises(SeqBelowFloor):  # without a rebase nothing of the partition is written
        await store.apply(again, b.markets)
    assert await store.get_market("M") is None and await store.last_log_id(0) == head
    res = await store.apply(again, b.markets, rebase=b.rebase)
    image = res.rebased["M"]
    assert (image.kind, image.seq, res.kept, res.dropped) == ("image", 4, 1, 0)
    assert b.markets["M"].seq == 4 and b.seq_floor == 3
    stored = await store.get_market("M")  # the snapshot carries the new seq and the whole batch
    assert stored is not None and stored.seq == 4 and stored.selections[0].price == 5.2 and stored.status == "OPEN"
    rows = await store.log_range(0, head)
    assert [[(d.kind, d.seq) for d in ds] for _, ds in rows] == [[("image", 4)]]
    nxt = b.apply(_update("M", 5.4, ts=2002), stored_at=3)
    assert nxt is not None and nxt.seq == 5 and (await store.apply([nxt], b.markets, rebase=b.rebase)).kept == 1

    # a client that held the old market applies what follows by its rule (drop seq <= held):
    # it ends with the store's book, not the old market's prices under the new header
    from feed.models import apply_delta

    client = held
    for _, entry in await store.log_range(0, head):
        for d in entry:
            if client is None or d.seq > client.seq:
                client = apply_delta(client, d)
    assert client == await store.get_market("M")

    # a market never seen in the partition starts above the floor too (a seq is only compared
    # within one market), and the floor is never lowered by a prune at a lower seq
    fresh = Book()
    n1 = fresh.apply(_update("N", 3.0, image=True), stored_at=4)
    res = await store.apply([n1], fresh.markets, rebase=fresh.rebase)
    n = await store.get_market("N")
    assert res.rebased["N"].seq == 4 and n is not None and n.seq == 4
    assert await store.prune([("N", 4)]) == ["N"] and await store.redis.get(floor_key(0)) == b"4"
    c = Book()
    rebased = []
    for mid in ("P", "Q"):
        res = await store.apply([c.apply(_update(mid, 2.0, image=True))], c.markets, rebase=c.rebase)
        rebased += list(res.rebased)
    # P was refused once; the book learnt the floor from it, so Q starts above it at once
    assert rebased == ["P"] and {mid: c.markets[mid].seq for mid in ("P", "Q")} == {"P": 5, "Q": 5}
    q = c.apply(_update("Q", 2.1, ts=1001))
    assert q is not None and (await store.apply([q], c.markets)).kept == 1
    assert await store.prune([("Q", 6)]) == ["Q"] and await store.redis.get(floor_key(0)) == b"6"
    assert await store.prune([("P", 5)]) == ["P"] and await store.redis.get(floor_key(0)) == b"6"  # never lowered
    restored = Book()  # a restart seeded with the store's floor needs no rebase
    restored.restore([], seq_floor=await store.seq_floor())
    p = restored.apply(_update("P", 2.0, image=True))
    assert p is not None and p.seq == 7 and not (await store.apply([p], restored.markets)).rebased
    # a stale prune (seq no longer stored) drops nothing and moves no floor
    assert await store.prune([("P", 1)]) == [] and await store.redis.get(floor_key(0)) == b"6"


async def test_the_seq_floor_keeps_each_partition_in_its_hash_slot_on_a_redis_cluster(tmp_path) -> None:
    """On a three-node Redis Cluster (partitions on different nodes) the prune and apply scripts
    touch each partition's floor in that partition's slot: a market re-created after a prune in
    every partition is re-imaged above its own partition's floor."""
    from cluster_helpers import start_local_cluster
    from feed.store import floor_key, partition_of

    servers: list[Any] = []
    try:
        s = await Store.open(start_local_cluster(tmp_path, servers), partitions=3, cluster=True)
        try:
            slot = s.redis.keyslot
            assert all(slot(floor_key(p)) == slot(f"of:{{{p}}}:seq") for p in range(3))
            assert len({slot(floor_key(p)) for p in range(3)}) == 3
            mids = _one_per_partition(3)
            a = Book()
            deltas = [a.apply(_update(mid, 2.0, image=True)) for mid in mids]
            deltas += [a.apply(_update(mid, 2.0 + i / 10, ts=1001)) for i, mid in enumerate(mids, 1)]
            await s.apply(deltas, a.markets)
            assert sorted(await s.prune([(mid, 2) for mid in mids[1:]])) == sorted(mids[1:])  # not partition 0
            assert [await s.redis.get(floor_key(p)) for p in range(3)] == [None, b"2", b"2"]
            assert await s.seq_floor() == 2
            b = Book()
            res = await s.apply([b.apply(_update(mid, 3.0, image=True, ts=2000)) for mid in mids[1:]],
                                b.markets, rebase=b.rebase)
            assert {mid: d.seq for mid, d in res.rebased.items()} == {mid: 3 for mid in mids[1:]}
            for mid in mids[1:]:
                m = await s.get_market(mid)
                assert m is not None and m.seq == 3 and partition_of(mid, 3) != 0
            # partition 0 pruned nothing: a market new there (known to a book that pruned nothing) is
            # not refused — its partition's floor, not another's, is the rule
            fresh = Book()
            n = fresh.apply(_update("n0", 2.0, image=True))
            assert partition_of("n0", 3) == 0
            res = await s.apply([n], fresh.markets)
            assert not res.rebased and res.kept == 1
        finally:
            await s.close()
    finally:
        for srv in servers:
            srv.stop()
