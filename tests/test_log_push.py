"""The pushed delta log (``feed.store.LogPush``): every log entry is also PUBLISHed by the apply
script, and a reader takes it from there — without a read round trip — only while each entry
directly follows the reader's position in the reader's epoch. Each test makes a push go missing,
arrive from elsewhere or the subscription die, and fails if a change is skipped or taken out of
order; against a real Redis (the embedded one)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec
import redis.asyncio as aioredis

from feed.models import Delta
from feed.settings import Settings
from feed.store import LogTail, Store, log_key, push_channel
from streaming_helpers import Feed, SSEReader, eventually, make_app, serve

TIMEOUT_S = 15.0
DELTAS = msgspec.json.Decoder(list[Delta])


def _ids(entries: list[tuple[str, list[Delta]]]) -> list[str]:
    return [entry_id for entry_id, _ in entries]


async def _log_ids(store: Store) -> list[str]:
    return [(i.decode() if isinstance(i, bytes) else i) for i, _ in await store.redis.xrange(log_key(0))]


async def _read_until(tail: LogTail, after: str, want: int, store: Store,
                      block_ms: int = 200) -> list[tuple[str, list[Delta]]]:
    """Read (as the node does, with the store's epoch) until ``want`` entries came after ``after``."""
    out: list[tuple[str, list[Delta]]] = []
    pos = after

    async def run() -> None:
        nonlocal pos
        while len(out) < want:
            got, _ = await tail.read(pos, block_ms=block_ms, count=1000, epoch=store.epoch)
            out.extend(got)
            if got:
                pos = got[-1][0]
    await asyncio.wait_for(run(), TIMEOUT_S)
    return out


async def _subscribed(tail: LogTail, store: Store) -> str:
    """Position at the log's head, with the tail subscribed (its first read subscribes)."""
    pos = await store.last_log_id(0)
    got, _ = await tail.read(pos, block_ms=50, count=1000, epoch=store.epoch)
    assert got == []
    assert tail._push is not None and tail._push.live
    return pos


async def test_the_apply_script_publishes_each_entry_with_the_previous_id(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    sub = aioredis.Redis.from_url(redis_url).pubsub()
    await sub.subscribe(push_channel(0))
    try:
        assert (await sub.get_message(timeout=5))["type"] == "subscribe"
        first = await feed.write(feed.price("m1", "1", 2.5))
        await feed.write(feed.price("m1", "1", 2.6))
        msgs = []
        while len(msgs) < 2:
            m = await sub.get_message(timeout=5)
            assert m is not None, "no push within 5 s"
            msgs.append(m["data"])
    finally:
        await sub.aclose()
    ids = await _log_ids(store)
    parsed = [m.split(b" ", 3) for m in msgs]
    assert [p[0].decode() for p in parsed] == [store.epoch] * 2
    assert [p[2].decode() for p in parsed] == ids[-2:]
    assert [p[1].decode() for p in parsed] == ids[-3:-1]  # each names the entry before it
    assert DELTAS.decode(parsed[0][3]) == first


async def test_pushed_entries_are_taken_without_reading_the_log(store: Store) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    tail = store.tail(0)
    try:
        pos = await _subscribed(tail, store)
        xreads0 = await _xreads(store)
        written = [(await feed.write(feed.price("m1", "1", 2.01 + i / 100)))[0] for i in range(20)]
        got = await _read_until(tail, pos, 20, store)
        xreads = await _xreads(store) - xreads0
    finally:
        await tail.aclose()
    assert _ids(got) == (await _log_ids(store))[-20:]
    assert [d.seq for _, ds in got for d in ds] == [d.seq for d in written]
    assert tail.pushed == 20 and tail.push_gaps == 0
    assert xreads == 0, f"{xreads} XREADs for entries that were all pushed"


async def _xreads(store: Store) -> int:
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


async def test_an_entry_whose_push_went_missing_is_read_from_the_log_in_order(store: Store) -> None:
    """Entry B is logged without a push (its message lost); C's push names B as its previous
    entry, so a reader at A must not take C: it reads B and C from the log."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    silent = Store(store.redis)
    silent.epoch, silent.push = store.epoch, False  # the same store, writing without the push
    tail = store.tail(0)
    try:
        pos = await _subscribed(tail, store)
        await feed.write(feed.price("m1", "1", 2.1))  # A: pushed
        feed.store = silent
        await feed.write(feed.price("m1", "1", 2.2))  # B: logged, never pushed
        feed.store = store
        await feed.write(feed.price("m1", "1", 2.3))  # C: pushed
        got = await _read_until(tail, pos, 3, store)
    finally:
        await tail.aclose()
    assert _ids(got) == (await _log_ids(store))[-3:]
    assert [ds[0].selections[0].price for _, ds in got] == [2.1, 2.2, 2.3]
    assert tail.push_gaps >= 1


async def test_a_last_entry_whose_push_went_missing_is_read_once_the_pushes_go_quiet(store: Store) -> None:
    """No later push reveals the gap: the read that waited ``block_ms`` for a push reads the log."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    silent = Store(store.redis)
    silent.epoch, silent.push = store.epoch, False
    tail = store.tail(0)
    try:
        pos = await _subscribed(tail, store)
        feed.store = silent
        (d,) = await feed.write(feed.price("m1", "1", 2.2))
        got = await _read_until(tail, pos, 1, store, block_ms=100)
    finally:
        await tail.aclose()
    assert [ds[0].seq for _, ds in got] == [d.seq]
    assert tail.pushed == 0


async def test_a_push_from_another_epoch_or_out_of_chain_or_garbled_is_never_taken(store: Store,
                                                                                   redis_url: str) -> None:
    """Forged messages first in the buffer: one of another store (epoch) that does continue the
    reader's position, one of ours that does not, one that is not a message of ours at all —
    none is taken, none fails the read, and the real entry after them still comes."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    tail = store.tail(0)
    r = aioredis.Redis.from_url(redis_url)
    try:
        pos = await _subscribed(tail, store)
        body = b'[{"market_id":"m1","seq":99,"kind":"delta","source":"t","source_ts":1,"received_at":1}]'
        for forged in (b"other-epoch %s 9999999999999-0 %s" % (pos.encode(), body),
                       b"%s 1-1 9999999999999-1 %s" % (store.epoch.encode(), body),
                       b"garbage"):
            assert await r.publish(push_channel(0), forged) == 1
            await eventually(lambda: tail._push.entries, TIMEOUT_S, "the forged message to arrive")
            got, _ = await tail.read(pos, block_ms=300, count=1000, epoch=store.epoch)
            assert got == [], got
        gaps = tail.push_gaps
        (d,) = await feed.write(feed.price("m1", "1", 2.5))
        got = await _read_until(tail, pos, 1, store)
    finally:
        await r.aclose()
        await tail.aclose()
    assert gaps == 3
    assert _ids(got) == (await _log_ids(store))[-1:] and got[0][1] == [d]


async def test_an_entry_another_writer_logged_breaks_the_chain(store: Store) -> None:
    """The previous id of a push is read from the log itself, so an entry added by anything
    else (an older ingest during an upgrade, a tool) between two pushes is not skipped."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    tail = store.tail(0)
    try:
        pos = await _subscribed(tail, store)
        (a,) = await feed.write(feed.price("m1", "1", 2.1))
        other = msgspec.structs.replace(a, seq=a.seq + 1)
        await store.redis.xadd(log_key(0), {"d": msgspec.json.encode([other])})  # no push
        feed.book.apply(feed.price("m1", "1", 2.15))  # (the book's seq moves past the other writer's)
        await feed.write(feed.price("m1", "1", 2.2))
        got = await _read_until(tail, pos, 3, store)
    finally:
        await tail.aclose()
    assert _ids(got) == (await _log_ids(store))[-3:]
    assert got[1][1] == [other]
    assert tail.push_gaps >= 1


async def test_a_subscription_that_delivers_nothing_is_dropped_and_reads_block_on_the_log(
        store: Store, monkeypatch: Any) -> None:
    """A half-open link (the connection looks up, no message comes): the read that waited
    ``block_ms`` finds the entries in the log, drops the subscription and blocks on the log
    until the retry — entries are late by at most one ``block_ms``, once, not every time."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    tail = store.tail(0)
    try:
        pos = await _subscribed(tail, store)
        dead = tail._push
        assert dead is not None
        monkeypatch.setattr(dead, "data_received", lambda data: None)  # the link went silent
        got: list[tuple[str, list[Delta]]] = []
        for i in range(5):
            await feed.write(feed.price("m1", "1", 2.01 + i / 100))
        got += await _read_until(tail, pos, 5, store, block_ms=200)
        assert tail._push is None and tail.push_gaps == 1  # dropped, with a backoff before the retry
        assert not dead.live
        xreads0 = await _xreads(store)
        for i in range(5):  # meanwhile every read is an XREAD BLOCK on the log
            await feed.write(feed.price("m1", "1", 3.01 + i / 100))
            got += await _read_until(tail, got[-1][0], 1, store, block_ms=200)
        assert await _xreads(store) - xreads0 >= 5
    finally:
        await tail.aclose()
    assert _ids(got) == (await _log_ids(store))[-10:]


async def test_a_writer_refused_publish_still_writes_and_readers_still_read(store: Store, redis_url: str) -> None:
    """An ACL that forbids PUBLISH must not fail the ingest's writes (the script's PUBLISH is a
    pcall after the XADD); readers find the entries in the log."""
    admin = aioredis.Redis.from_url(redis_url)
    await admin.execute_command("ACL", "SETUSER", "nopub", "on", ">pw", "~*", "+@all", "-publish")
    writer = await Store.open(redis_url + ("&" if "?" in redis_url else "?") + "username=nopub&password=pw")
    assert await writer.redis.acl_whoami() in ("nopub", b"nopub")
    try:
        feed = Feed(writer)
        await feed.write(feed.image("m1"))
        tail = store.tail(0)
        try:
            pos = await _subscribed(tail, store)
            written = []
            for i in range(3):
                written += await feed.write(feed.price("m1", "1", 2.01 + i / 100))
            got = await _read_until(tail, pos, 3, store)
        finally:
            await tail.aclose()
        assert [ds[0] for _, ds in got] == written
        assert tail.pushed == 0
    finally:
        await writer.close()
        await admin.execute_command("ACL", "DELUSER", "nopub")
        await admin.aclose()


async def test_a_killed_subscription_loses_nothing_and_is_taken_up_again(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    tail = store.tail(0)
    r = aioredis.Redis.from_url(redis_url)
    try:
        pos = await _subscribed(tail, store)
        await feed.write(feed.price("m1", "1", 2.1))
        got = await _read_until(tail, pos, 1, store)
        assert await r.client_kill_filter(_type="pubsub") >= 1
        await eventually(lambda: not tail._push.live, TIMEOUT_S, "the tail to see its subscription gone")
        for i in range(5):  # written while nobody is subscribed
            await feed.write(feed.price("m1", "1", 2.2 + i / 100))
        got += await _read_until(tail, got[-1][0], 5, store)
        pushed_before = tail.pushed
        for i in range(5):  # after the tail subscribed again
            await feed.write(feed.price("m1", "1", 3.0 + i / 100))
        got += await _read_until(tail, got[-1][0], 5, store)
    finally:
        await r.aclose()
        await tail.aclose()
    assert _ids(got) == (await _log_ids(store))[-11:]
    assert tail.pushed > pushed_before, "the tail did not subscribe again"


async def test_a_node_streams_every_change_from_pushes_and_without_them(store: Store, redis_url: str) -> None:
    """End to end through an SSE client: every seq once, in order, with the pushed log on (entries
    taken from pushes) and off (``ODDSFEED_LOG_PUSH=0``: no entry from a push)."""
    for push in (True, False):
        feed = Feed(store)
        await feed.write(feed.image(f"m{push}"))
        app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, log_push=push))
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            async with c.stream("GET", "/v1/stream", params={"market": f"m{push}"}) as resp:
                sse = SSEReader(resp)
                seen: list[int] = []

                async def collect(n: int) -> None:
                    while len(seen) < n:
                        ev = await sse.next(TIMEOUT_S)
                        if ev.event == "delta":
                            seen.append(ev.data["seq"])
                first = await sse.next(TIMEOUT_S)
                assert first.event == "snapshot"
                written: list[Any] = []
                for i in range(30):
                    written += await feed.write(feed.price(f"m{push}", "1", 2.01 + i / 100))
                await asyncio.wait_for(collect(30), TIMEOUT_S)
                reader = app.state.node.readers[0]
                pushed = reader.pushed
        assert seen == [d.seq for d in written]
        if push:
            assert pushed > 0
        else:
            assert pushed == 0


async def test_a_pushed_entry_the_log_does_not_hold_is_undone_by_the_next_check(store: Store, redis_url: str) -> None:
    """A push carries the store's epoch and the log's head as its previous id — both readable by
    any client — so one PUBLISH (no key written) was taken by every node: an invented price, and
    with an id far ahead of the log, a position past every real entry. XREAD from there returns
    nothing and no guard looked at the log's head: the market stayed at the invented price,
    read as fresh, for good. The guards now read the log's newest id too; a node past it
    reloads the partition from the store."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    (real,) = await feed.write(feed.price("m1", "1", 2.2))
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000))
    r = aioredis.from_url(redis_url)
    async with serve(app) as _base:
        node = app.state.node
        await eventually(lambda: node.readers[0].pushed or node.readers[0]._tail._push is not None, TIMEOUT_S,
                         "the node subscribed to the pushed log")
        await eventually(lambda: node.state.markets["m1"].seq == real.seq, TIMEOUT_S, "the node at the real price")
        reloads = node.reloads
        head = (await r.xrevrange(log_key(0), count=1))[0][0].decode()
        forged = msgspec.structs.replace(real, seq=real.seq + 1, selections=[
            msgspec.structs.replace(real.selections[0], price=9.9, back=[(9.9, 500.0)])])
        msg = b"%s %s 99999999999999-0 %s" % (store.epoch.encode(), head.encode(), msgspec.json.encode([forged]))
        assert await r.publish(push_channel(0), msg) == 1
        # the node may take it — and then must let it go again: back at the store's price and position
        await eventually(lambda: node.reloads > reloads or node.state.positions[0] == "99999999999999-0",
                         TIMEOUT_S, "the forged push reached the node")
        await eventually(lambda: node.state.positions[0] == head and node.state.markets["m1"].seq == real.seq,
                         TIMEOUT_S, "the node back at the log's head and the stored price")
        assert node.state.markets["m1"].selections[0].price == 2.2
        (later,) = await feed.write(feed.price("m1", "1", 2.4))  # and it follows the real log again
        await eventually(lambda: node.state.markets["m1"].seq == later.seq, TIMEOUT_S, "the next real change")
    await r.aclose()


async def test_pushes_beyond_the_buffer_bound_are_dropped_and_read_from_the_log(store: Store) -> None:
    """A reader that does not take its pushes (busy reloading, say) holds a bounded buffer:
    past the bound it is dropped as a gap, and nothing is lost."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    tail = store.tail(0)
    try:
        pos = await _subscribed(tail, store)
        assert tail._push is not None
        tail._push.MAX_ENTRIES = 5
        for i in range(12):
            await feed.write(feed.price("m1", "1", 2.01 + i / 100))
        await eventually(lambda: tail._push.overflow, TIMEOUT_S, "the buffer to overflow")
        got = await _read_until(tail, pos, 12, store)
    finally:
        await tail.aclose()
    assert _ids(got) == (await _log_ids(store))[-12:]
    assert [ds[0].selections[0].price for _, ds in got] == [2.01 + i / 100 for i in range(12)]
    assert tail.push_gaps >= 1
