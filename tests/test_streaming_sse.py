"""SSE end to end: real uvicorn on 127.0.0.1, real httpx streaming, real Redis."""

from __future__ import annotations

import asyncio

import httpx
import msgspec

from feed.models import SourceHealth
from feed.store import Store, log_key
from streaming.encoding import decode_token, encode_token
from streaming_helpers import (
    Feed, LocalBook, SSEReader, eventually, make_app, market_of, now_ms, sans_as_of, serve, sse_deltas,
)


async def _rest_market(c: httpx.AsyncClient, mid: str):
    r = await c.get(f"/v1/markets/{mid}")
    assert r.status_code == 200
    return market_of(r.content)


async def test_snapshot_then_deltas_rebuild_the_book(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"), feed.image("m3", sport="tennis", event="e3"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-store"
            assert resp.headers["x-accel-buffering"] == "no"
            sse = SSEReader(resp)
            snap = await sse.next()
            assert sse.retry == 2000
            assert snap.event == "snapshot" and snap.id is not None
            assert sorted(m["market_id"] for m in snap.data["markets"]) == ["m1", "m2", "m3"]
            assert all("age_ms" in m and m["stale"] is False for m in snap.data["markets"])
            assert "recovered" not in snap.data and snap.data["as_of"] <= now_ms()
            book = LocalBook()
            book.on(snap.data)

            # one log entry with three deltas, then single ones, a header change and a new market
            written = await feed.write(feed.price("m1", "1", 2.1), feed.price("m2", "2", 3.6),
                                       feed.price("m3", "1", 1.8))
            events = await sse_deltas(sse, 3)
            assert [e.id is None for e in events] == [True, True, False]  # only the entry's last carries the token
            assert [(e.data["market_id"], e.data["seq"]) for e in events] == [(d.market_id, d.seq) for d in written]
            for e in events:
                assert e.data["type"] == "delta" and e.data["sent_at"] >= e.data["stored_at"]
                assert e.data["age_ms"] >= 0 and e.data["stale"] is False
                book.on(e.data)
            more = []
            more += await feed.write(feed.header("m1", status="SUSPENDED"))
            more += await feed.write(feed.price("m2", "1", 2.5), feed.price("m2", "2", 4.0))
            more += await feed.write(feed.image("m4", event="e1"))
            more += await feed.write(feed.header("m1", status="OPEN"), feed.price("m1", "2", 3.0))
            events = await sse_deltas(sse, len(more))
            assert [(e.data["market_id"], e.data["seq"]) for e in events] == [(d.market_id, d.seq) for d in more]
            image = next(e for e in events if e.data["market_id"] == "m4")
            assert image.data["kind"] == "image" and image.data["market"]["stale"] is False
            for e in events:
                book.on(e.data)
            assert sse.last_id == events[-1].id
            for mid in ("m1", "m2", "m3", "m4"):
                rest = await _rest_market(c, mid)
                mine = book.markets[mid]
                assert (mine.selections, mine.status, mine.seq) == (rest.selections, rest.status, rest.seq)


async def test_filters_sport_market_in_play(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2", event="e2"), feed.image("m3", sport="tennis", event="e3"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream?sport=tennis") as r_sport, \
                c.stream("GET", "/v1/stream?market=m1,m2") as r_market, \
                c.stream("GET", "/v1/stream?in_play=true&sport=soccer") as r_live, \
                c.stream("GET", "/v1/stream?event=e2&in_play=false") as r_pre:
            tennis, markets, live, pre = (SSEReader(r) for r in (r_sport, r_market, r_live, r_pre))
            assert [m["market_id"] for m in (await tennis.next()).data["markets"]] == ["m3"]
            assert sorted(m["market_id"] for m in (await markets.next()).data["markets"]) == ["m1", "m2"]
            assert (await live.next()).data["markets"] == []
            assert [m["market_id"] for m in (await pre.next()).data["markets"]] == ["m2"]

            await feed.write(feed.price("m1", "1", 2.2))
            await feed.write(feed.price("m3", "1", 1.9))
            await feed.write(feed.header("m2", in_play=True))  # m2 turns in-play
            await feed.write(feed.price("m2", "1", 1.7))

            ev = (await sse_deltas(tennis, 1))[0]
            assert (ev.data["market_id"], ev.data["seq"]) == ("m3", 2)
            got = await sse_deltas(markets, 3)
            assert [(e.data["market_id"], e.data["seq"]) for e in got] == [("m1", 2), ("m2", 2), ("m2", 3)]
            # newly matching under in_play=true → the whole market as an image, then plain deltas
            first, second = await sse_deltas(live, 2)
            assert first.data["market_id"] == "m2" and first.data["kind"] == "image"
            assert first.data["market"]["in_play"] is True and first.data["seq"] == 2
            assert second.data["kind"] == "delta" and second.data["seq"] == 3
            book = LocalBook()
            book.on({"type": "snapshot", "markets": []})
            book.on(first.data)
            book.on(second.data)
            rest = await _rest_market(c, "m2")
            assert book.markets["m2"].selections == rest.selections and book.markets["m2"].in_play
            # in_play=false: the change that takes m2 out of its filter comes as ``removed`` (it was
            # that change's delta, the client to judge the filter itself: §72), with the change's
            # resume token (the id the other stream got with it), then nothing more of it
            leaving = await pre.until(lambda e: e.event != "heartbeat")
            assert leaving.event == "removed" and leaving.data == {"type": "removed", "market_id": "m2",
                                                                   "reason": "not_visible"}, leaving
            assert leaving.id == got[1].id  # (m2's seq 2: the move)
            await feed.write(feed.image("m5", event="e2"))
            (nxt,) = await sse_deltas(pre, 1)
            assert nxt.data["market_id"] == "m5"


async def test_heartbeats_carry_as_of_and_token(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/stream?heartbeat_ms=10")
        assert r.status_code == 400 and "heartbeat_ms" in r.json()["message"]
        async with c.stream("GET", "/v1/stream?heartbeat_ms=150") as resp:
            sse = SSEReader(resp)
            snap = await sse.next()
            h1 = await sse.next(2)
            h2 = await sse.next(2)
            assert h1.event == h2.event == "heartbeat"
            assert h1.data["type"] == "heartbeat" and h2.data["as_of"] > h1.data["as_of"] >= snap.data["as_of"]
            assert h1.id == snap.id  # nothing new: the same position


async def test_staleness_follows_source_health(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms()))
    await feed.write(feed.image("m1"), feed.image("m2", in_play=True))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            snap = await sse.next()
            assert [m["stale"] for m in snap.data["markets"]] == [False, False]

            await store.set_health(SourceHealth(source="t", state="DOWN", reason="heartbeat_missed",
                                                last_message_at=now_ms()))
            status = await sse.until(lambda e: e.event == "status")
            assert status.data["as_of"] >= snap.data["as_of"]
            assert status.data == {"type": "status", "source": "t", "state": "DOWN", "reason": "heartbeat_missed",
                                   "stale_markets": ["m1", "m2"], "turned_stale": ["m1", "m2"], "turned_fresh": [],
                                   "stale_events": [], "as_of": status.data["as_of"]}
            r = await c.get("/v1/markets/m1")
            assert r.json()["stale"] is True
            await feed.write(feed.price("m1", "1", 2.3))
            (d,) = await sse_deltas(sse, 1)
            assert d.data["stale"] is True

            await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms()))
            status = await sse.until(lambda e: e.event == "status")
            assert status.data["state"] == "UP" and status.data["stale_markets"] == []
            assert status.data["turned_fresh"] == ["m1", "m2"] and status.data["turned_stale"] == []
            assert (await c.get("/v1/markets/m1")).json()["stale"] is False
            await feed.write(feed.price("m1", "1", 2.4))
            (d,) = await sse_deltas(sse, 1)
            assert d.data["stale"] is False


async def test_source_heartbeat_confirms_a_quiet_market(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    feed.session = "s0"  # an earlier upstream session imaged both markets
    for mid in ("m1", "m2"):
        up = feed.image(mid, in_play=True)
        up.received_at = now_ms() - 60_000  # quiet for a minute (in-play stale after 10 s)
        up.source_ts = up.received_at - 1
        await feed.write(up)
    feed.session = "s1"  # the current one imaged m1 again
    again = feed.image("m1", in_play=True)
    again.received_at = now_ms() - 60_000
    again.source_ts = again.received_at - 1
    await feed.write(again)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        m = (await c.get("/v1/markets/m1")).json()
        assert m["stale"] is True and m["age_ms"] >= 60_000  # no health record: received_at only
        await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms(), session="s1"))

        async def fresh() -> bool:
            return (await c.get("/v1/markets/m1")).json()["stale"] is False
        await eventually(fresh)
        assert int((await c.get("/v1/markets/m1")).headers["x-data-age-ms"]) < 5_000
        # m2 was never imaged or updated by the source's current session: its heartbeats do not confirm it
        m2 = (await c.get("/v1/markets/m2")).json()
        assert m2["stale"] is True and m2["age_ms"] >= 60_000


async def _token_after(c: httpx.AsyncClient, feed: Feed, writes: int) -> tuple[str, list]:
    """Connect, read the snapshot, have ``writes`` batches written and read; return the last token seen."""
    async with c.stream("GET", "/v1/stream") as resp:
        sse = SSEReader(resp)
        await sse.next()
        written = []
        for i in range(writes):
            written += await feed.write(feed.price("m1", "1", 2.0 + i / 100), feed.price("m2", "1", 3.0 + i / 100))
        await sse_deltas(sse, len(written))
        assert sse.last_id is not None
        return sse.last_id, written


async def _resume(c: httpx.AsyncClient, token: str, n_deltas: int):
    """Resume with ``token`` (Last-Event-ID); (resumed event, the n deltas or [the snapshot])."""
    async with c.stream("GET", "/v1/stream", headers={"Last-Event-ID": token}) as resp:
        sse = SSEReader(resp)
        resumed = await sse.next()
        assert resumed.event == "resumed"
        if not resumed.data["recovered"]:
            return resumed, [await sse.next()]
        return resumed, await sse_deltas(sse, n_deltas)


async def test_resume_same_position_and_older_position(store: Store, redis_url: str) -> None:
    for ring in (10_000, 0):  # from the in-memory ring, then from Redis
        await store.redis.flushall()
        await store.reset_epoch()
        feed = Feed(store)
        await feed.write(feed.image("m1"), feed.image("m2"))
        async with serve(make_app(redis_url, replay_ring_entries=ring)) as base, \
                httpx.AsyncClient(base_url=base, timeout=10) as c:
            token, _ = await _token_after(c, feed, 2)
            # same position: recovered, nothing replayed; the next thing is the next live delta
            async with c.stream("GET", "/v1/stream", headers={"Last-Event-ID": token}) as resp:
                sse = SSEReader(resp)
                assert sans_as_of((await sse.next()).data) == {"type": "resumed", "recovered": True}
                live = await feed.write(feed.price("m2", "2", 9.0))
                (d,) = await sse_deltas(sse, 1)
                assert (d.data["market_id"], d.data["seq"]) == (live[0].market_id, live[0].seq)
                token = sse.last_id
            # older position: exactly the missed deltas, in order (?last_event_id= this time)
            missed = []
            for i in range(3):
                missed += await feed.write(feed.price("m1", "2", 5.0 + i), feed.price("m2", "1", 6.0 + i))
            missed += await feed.write(feed.header("m1", status="SUSPENDED"))
            async with c.stream("GET", f"/v1/stream?last_event_id={token}") as resp:
                sse = SSEReader(resp)
                assert sans_as_of((await sse.next()).data) == {"type": "resumed", "recovered": True}
                got = await sse_deltas(sse, len(missed))
                assert [(e.data["market_id"], e.data["seq"]) for e in got] == [(d.market_id, d.seq) for d in missed]
                assert [e.id is None for e in got] == [True, False] * 3 + [False]
                # nothing duplicated afterwards: the next delta is new
                nxt = await feed.write(feed.price("m1", "1", 7.7))
                (d,) = await sse_deltas(sse, 1)
                assert d.data["seq"] == nxt[0].seq


async def test_resume_from_a_partially_received_entry_misses_nothing(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"), feed.image("m3"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            await sse.next()
            before = sse.last_id
            entry = await feed.write(feed.price("m1", "1", 2.5), feed.price("m2", "1", 2.6),
                                     feed.price("m3", "1", 2.7))
            first = await sse.next()  # the connection drops after the first event of the entry
            assert first.id is None and sse.last_id == before
        resumed, got = await _resume(c, sse.last_id, 3)
        assert resumed.data["recovered"] is True
        assert [(e.data["market_id"], e.data["seq"]) for e in got] == [(d.market_id, d.seq) for d in entry]


async def test_resume_after_trim_is_not_recovered(redis_url: str) -> None:
    store = await Store.open(redis_url, log_maxlen=5)
    try:
        feed = Feed(store)
        await feed.write(feed.image("m1"), feed.image("m2"))
        async with serve(make_app(store=store, replay_ring_entries=0)) as base, \
                httpx.AsyncClient(base_url=base, timeout=10) as c:
            token, _ = await _token_after(c, feed, 1)
            for i in range(20):
                await feed.write(feed.price("m1", "1", 3.0 + i / 10))
            last = await store.last_log_id(0)

            async def caught_up() -> bool:
                return (await c.get("/ready")).json()["partitions"][0]["position"] == last
            await eventually(caught_up)
            await store.redis.xtrim(log_key(0), maxlen=2, approximate=False)
            resumed, (snap,) = await _resume(c, token, 0)
            assert sans_as_of(resumed.data) == {"type": "resumed", "recovered": False}
            assert snap.event == "snapshot" and snap.data["recovered"] is False
            m1 = next(m for m in snap.data["markets"] if m["market_id"] == "m1")
            assert m1["seq"] == feed.book.markets["m1"].seq
    finally:
        await store.close()


async def test_resume_with_other_epoch_or_garbage_is_not_recovered(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        token, _ = await _token_after(c, feed, 1)
        tok = decode_token(token)
        assert tok is not None and tok.epoch == store.epoch
        other = encode_token("not-the-epoch", tok.positions).decode()
        for bad in (other, "!!!garbage", encode_token(store.epoch, ["x"]).decode()):
            resumed, (snap,) = await _resume(c, bad, 0)
            assert resumed.data["recovered"] is False and snap.event == "snapshot"
            assert [m["market_id"] for m in snap.data["markets"]] == ["m1"]


async def test_epoch_change_resyncs_live_clients(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            old = (await sse.next()).id
            # Redis loses everything; the ingest adopts a new epoch and re-sends images
            await store.redis.flushall()
            await store.reset_epoch()
            feed2 = Feed(store)
            await feed2.write(feed2.image("m9"))
            snap = await sse.until(lambda e: e.event == "snapshot" and
                                   [m["market_id"] for m in e.data["markets"]] == ["m9"])
            assert snap.data["recovered"] is False
            assert decode_token(snap.id).epoch == store.epoch != decode_token(old).epoch
        resumed, (snap,) = await _resume(c, old, 0)
        assert resumed.data["recovered"] is False
        assert [m["market_id"] for m in snap.data["markets"]] == ["m9"]
        assert msgspec.json.decode((await c.get("/v1/markets/m1")).content)["error"] == "unknown_market"


async def test_reader_trimmed_past_resyncs_clients(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        reader = app.state.node.readers[0]
        gate, waiting = asyncio.Event(), asyncio.Event()
        real = reader._read

        async def gated(*args, **kwargs):
            waiting.set()
            await gate.wait()
            return await real(*args, **kwargs)
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            await sse.next()
            reader._read = gated  # the node falls behind …
            await asyncio.wait_for(waiting.wait(), 10)  # (its read in flight ended: the next one waits)
            for i in range(10):
                await feed.write(feed.price("m1", "1", 2.0 + i / 10))
            await store.redis.xtrim(log_key(0), maxlen=1, approximate=False)  # … and the log moves past it
            gate.set()
            snap = await sse.until(lambda e: e.event == "snapshot")
            assert snap.data["recovered"] is False and snap.data["reason"] == "resync"
            assert snap.data["markets"][0]["seq"] == feed.book.markets["m1"].seq
        assert app.state.node.reloads == 1
