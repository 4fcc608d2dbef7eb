"""REST end to end: markets/events/sports/sources, ETag/304, 400/404, /health, /ready."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from feed.embedded_redis import EmbeddedRedis
from feed.models import SourceHealth
from feed.settings import Settings
from feed.store import Store
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, serve


async def _seed(store: Store) -> Feed:
    feed = Feed(store)
    await feed.write(feed.image("bf:1.1", event="bf:e1", in_play=True),
                     feed.image("bf:1.2", event="bf:e1"),
                     feed.image("bf:1.3", sport="tennis", event="bf:e2"))
    await feed.write(feed.header("bf:1.2", status="SUSPENDED"))
    return feed


async def test_markets_events_sports(store: Store, redis_url: str) -> None:
    await _seed(store)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/markets")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert [m["market_id"] for m in body["markets"]] == ["bf:1.1", "bf:1.2", "bf:1.3"]
        assert body["count"] == 3 and body["as_of"] <= now_ms()
        assert all(isinstance(m["age_ms"], int) and m["stale"] is False for m in body["markets"])
        assert 0 <= int(r.headers["x-data-age-ms"]) < 10_000
        q = lambda **p: c.get("/v1/markets", params=p)  # noqa: E731
        assert [m["market_id"] for m in (await q(sport="tennis")).json()["markets"]] == ["bf:1.3"]
        assert [m["market_id"] for m in (await q(in_play="true")).json()["markets"]] == ["bf:1.1"]
        assert [m["market_id"] for m in (await q(status="suspended")).json()["markets"]] == ["bf:1.2"]
        assert [m["market_id"] for m in (await q(event="bf:e1", in_play="0")).json()["markets"]] == ["bf:1.2"]
        assert [m["market_id"] for m in (await q(sport="tennis,soccer", status="OPEN")).json()["markets"]] == \
            ["bf:1.1", "bf:1.3"]

        m = (await c.get("/v1/markets/bf:1.2")).json()
        assert m["market_id"] == "bf:1.2" and m["status"] == "SUSPENDED" and m["seq"] == 2
        assert m["selections"][0]["selection_id"] == "1" and "age_ms" in m and m["stale"] is False

        ev = (await c.get("/v1/events")).json()
        # unlinked provider events are canonical events of their own: ev:<provider event id>
        assert [(e["event_id"], e["markets"], e["in_play"], e["sport"], e["members"]) for e in ev["events"]] == \
            [("ev:bf:e1", 2, True, "soccer", ["bf:e1"]), ("ev:bf:e2", 1, False, "tennis", ["bf:e2"])]
        assert ev["events"][0]["event_name"] == "Event bf:e1" and ev["events"][0]["competition"] == "c1"
        assert [e["event_id"] for e in (await c.get("/v1/events?in_play=false")).json()["events"]] == ["ev:bf:e2"]
        for ref in ("bf:e1", "ev:bf:e1"):  # a provider event id answers with its canonical event
            one = (await c.get(f"/v1/events/{ref}")).json()
            assert one["event"]["event_id"] == "ev:bf:e1"
            assert [x["market_id"] for x in one["markets"]] == ["bf:1.1", "bf:1.2"]
        sports = (await c.get("/v1/sports")).json()["sports"]
        assert sports == [{"sport": "soccer", "events": 1, "markets": 2, "in_play_markets": 1},
                          {"sport": "tennis", "events": 1, "markets": 1, "in_play_markets": 0}]


async def test_errors_404_400(store: Store, redis_url: str) -> None:
    await _seed(store)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/markets/nope")
        assert r.status_code == 404 and r.json()["error"] == "unknown_market" and "nope" in r.json()["message"]
        r = await c.get("/v1/events/nope")
        assert r.status_code == 404 and r.json()["error"] == "unknown_event"
        for url, fragment in [("/v1/markets?in_play=maybe", "in_play must be true or false"),
                              ("/v1/markets?status=OPEN,BOGUS", "status must be one or more of"),
                              ("/v1/events?in_play=2", "in_play"),
                              ("/v1/stream?heartbeat_ms=abc", "heartbeat_ms must be an integer"),
                              ("/v1/stream?conflate_ms=5", "conflate_ms"),
                              ("/v1/stream?odds_format=roman", "odds_format"),
                              ("/v1/stream?in_play=x", "in_play")]:
            r = await c.get(url)
            assert r.status_code == 400, url
            assert r.json()["error"] == "bad_request" and fragment in r.json()["message"], (url, r.json())


async def test_etag_304_and_change(store: Store, redis_url: str) -> None:
    feed = await _seed(store)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        for url in ("/v1/markets", "/v1/markets/bf:1.1", "/v1/events", "/v1/events/bf:e1", "/v1/sports"):
            r = await c.get(url)
            etag = r.headers["etag"]
            r2 = await c.get(url, headers={"If-None-Match": etag})
            assert r2.status_code == 304 and r2.content == b"" and r2.headers["etag"] == etag, url
            assert (await c.get(url, headers={"If-None-Match": f'W/{etag}, "x"'})).status_code == 304
        etag = (await c.get("/v1/markets/bf:1.1")).headers["etag"]
        await feed.write(feed.price("bf:1.1", "1", 2.5))

        async def changed() -> bool:
            r = await c.get("/v1/markets/bf:1.1", headers={"If-None-Match": etag})
            return r.status_code == 200 and r.json()["seq"] == 2
        await eventually(changed)


async def test_an_etag_cached_before_the_store_went_back_is_not_revalidated(store: Store, redis_url: str) -> None:
    """Redis restarts from an older snapshot under the same epoch and the ingest goes on from
    there: it writes the same seqs again, with other prices. The node reloads; a client that
    cached the old lineage's body got 304 for its ETag (epoch, id, seq, stale — all equal) and
    kept the old price, fresh. The ETag names when the market was stored too."""
    import redis.asyncio as aioredis

    feed = Feed(store)
    await feed.write(feed.image("m1", prices={"1": 2.0, "2": 3.5}))
    await feed.write(feed.price("m1", "1", 2.02))
    r = aioredis.Redis.from_url(redis_url)
    dump = {k: (await r.dump(k), await r.pttl(k)) for k in await r.keys("*")}  # the snapshot at seq 2
    try:
        async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            await feed.write(feed.price("m1", "1", 2.06))
            await feed.write(feed.price("m1", "1", 2.50))  # seq 4, price 2.50

            async def at(seq: int) -> httpx.Response | None:
                got = await c.get("/v1/markets/m1")
                return got if got.json()["seq"] == seq else None
            cached = await eventually(lambda: at(4), what="seq 4 served")
            etag = cached.headers["etag"]
            await r.flushall()
            for k, (v, ttl) in dump.items():
                await r.restore(k, max(ttl, 0), v)
            again = Feed(store)  # the ingest restarted from the restored store
            again.book.restore(await store.load_all_markets(), seq_floor=await store.seq_floor())
            await again.write(again.price("m1", "1", 1.80))
            await again.write(again.price("m1", "1", 1.60))  # seq 4 again, price 1.60

            async def reloaded() -> bool:
                return (await c.get("/v1/markets/m1")).json()["selections"][0]["price"] == 1.60
            await eventually(reloaded, what="the node serves the new lineage")
            revalidated = await c.get("/v1/markets/m1", headers={"If-None-Match": etag})
            assert revalidated.status_code == 200, "304: the client would keep the old lineage's price 2.50"
            assert revalidated.json()["seq"] == 4 and revalidated.json()["selections"][0]["price"] == 1.60
    finally:
        await r.aclose()


async def test_sources_health_and_ready(store: Store, redis_url: str) -> None:
    await _seed(store)
    await store.set_health(SourceHealth(source="t", state="DEGRADED", reason="upstream_503",
                                        last_message_at=now_ms(), cursor="clk-9", messages=12))
    await store.quarantine("t", "invalid_json", "bad", b"{", now_ms())
    await store.quarantine("t", "invalid_json", "bad", b"{", now_ms())
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        (src,) = (await c.get("/v1/sources")).json()["sources"]
        assert src["source"] == "t" and src["state"] == "DEGRADED" and src["reason"] == "upstream_503"
        assert src["cursor"] == "clk-9" and src["messages"] == 12 and src["markets"] == 3
        assert src["rejected_by_reason"] == {"invalid_json": 2} and src["stale_markets"] == 0
        assert (await c.get("/health")).json()["status"] == "ok"
        r = await c.get("/ready")
        assert r.status_code == 200 and r.json()["ready"] is True and r.json()["partitions"][0]["connected"]


async def test_ready_follows_redis_and_a_restart_resyncs(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=False)
    url = server.start()
    try:
        store = await Store.open(url)
        feed = Feed(store)
        await feed.write(feed.image("m1"))
        app = make_app(url, settings=Settings(heartbeat_ms=60_000, redis_url=url))
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            assert (await c.get("/ready")).status_code == 200
            async with c.stream("GET", "/v1/stream") as resp:
                sse = SSEReader(resp)
                assert [m["market_id"] for m in (await sse.next()).data["markets"]] == ["m1"]
                server.stop()  # Redis goes away

                async def not_ready() -> bool:
                    r = await c.get("/ready")
                    return r.status_code == 503 and "not connected" in r.json()["reason"]
                await eventually(not_ready)
                # still serving from node state meanwhile
                assert (await c.get("/v1/markets/m1")).status_code == 200
                assert (await c.get("/v1/sources")).status_code == 503
                server.start()  # back, but empty: a new store, a new epoch

                async def ready() -> bool:
                    return (await c.get("/ready")).status_code == 200
                await eventually(ready)
                snap = await sse.until(lambda e: e.event == "snapshot")
                assert snap.data["recovered"] is False and snap.data["markets"] == []
                await store.reset_epoch()
                feed2 = Feed(store)
                await feed2.write(feed2.image("m2"))
                snap = await sse.until(lambda e: e.event == "snapshot" and e.data["markets"])
                assert [m["market_id"] for m in snap.data["markets"]] == ["m2"]
        await store.close()
    finally:
        server.stop()


async def test_api_keys(store: Store, redis_url: str) -> None:
    await _seed(store)
    settings = Settings(heartbeat_ms=60_000, api_keys=("k1",))
    async with serve(make_app(redis_url, settings=settings)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (await c.get("/v1/markets")).status_code == 401
        assert (await c.get("/v1/markets", headers={"X-API-Key": "k1"})).status_code == 200
        assert (await c.get("/v1/markets", headers={"Authorization": "Bearer k1"})).status_code == 200
        assert (await c.get("/v1/markets?api_key=k1")).status_code == 200
        assert (await c.get("/v1/markets?api_key=k2")).status_code == 401
        assert (await c.get("/health")).status_code == 200


async def test_closed_markets_past_the_retention_leave_the_node_and_the_store(store: Store, redis_url: str,
                                                                             monkeypatch) -> None:
    import streaming.reader
    from feed.ingest import Ingest

    monkeypatch.setattr(streaming.reader, "PRUNE_EVERY_MS", 50)
    feed = Feed(store)
    await feed.write(feed.image("bf:open"), feed.image("bf:done", event="e2"))
    await feed.write(feed.header("bf:done", status="SETTLED"))
    retention = 1_000
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, settled_retention_ms=retention))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        ids = [m["market_id"] for m in (await c.get("/v1/markets")).json()["markets"]]
        assert sorted(ids) == ["bf:done", "bf:open"]  # within the retention: still served

        async def gone() -> bool:
            return (await c.get("/v1/markets/bf:done")).status_code == 404
        await eventually(gone, 15, "the settled market dropped by the node")
        assert [m["market_id"] for m in (await c.get("/v1/markets")).json()["markets"]] == ["bf:open"]
        sports = (await c.get("/v1/sports")).json()["sports"]
        assert sports == [{"sport": "soccer", "events": 1, "markets": 1, "in_play_markets": 0}]
        check = (await c.post("/v1/price-check", json={"market_id": "bf:done", "selection_id": "1",
                                                       "side": "back", "price": 2.0})).json()
        assert check["accepted"] is False and check["reason"] == "UNKNOWN_MARKET"
        async with c.stream("GET", "/v1/stream") as r:
            snap = await SSEReader(r).until(lambda e: e.event == "snapshot")
            assert [m["market_id"] for m in snap.data["markets"]] == ["bf:open"]

        # the ingest that wrote it drops it from the store by the same rule
        ingest = Ingest(store, source="t", book=feed.book, settled_retention_ms=retention,
                        clock_ms=lambda: now_ms() + 5_000)
        assert await ingest.prune_closed() == 1
        assert [m.market_id for m in await store.load_all_markets()] == ["bf:open"]


async def test_a_market_the_node_dropped_and_a_delta_reopens_is_served_again(store: Store, redis_url: str,
                                                                              monkeypatch) -> None:
    """The node drops a settled market past the retention before its ingest does; the provider then
    reopens it with a delta (not an image), which the store applies to the market it still holds.
    The node must not skip that delta (it knows no such market): it reloads the partition and
    serves the reopened market like every other node."""
    import streaming.reader

    monkeypatch.setattr(streaming.reader, "PRUNE_EVERY_MS", 50)
    feed = Feed(store)
    await feed.write(feed.image("bf:open"), feed.image("bf:back", event="e2"))
    await feed.write(feed.header("bf:back", status="SETTLED"))
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, settled_retention_ms=1_000))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def gone() -> bool:
            return (await c.get("/v1/markets/bf:back")).status_code == 404
        await eventually(gone, 15, "the settled market dropped by the node")
        assert sorted(m.market_id for m in await store.load_all_markets()) == ["bf:back", "bf:open"]  # the store has it
        await feed.write(feed.header("bf:back", status="OPEN"))  # reopened (a settlement rolled back)
        await feed.write(feed.price("bf:back", "1", 2.6))

        async def served() -> object:
            r = await c.get("/v1/markets/bf:back")
            return r.status_code == 200 and r.json()["status"] == "OPEN" and r.json()["selections"][0]["price"] == 2.6
        await eventually(served, 15, "the reopened market served again")
        check = (await c.post("/v1/price-check", json={"market_id": "bf:back", "selection_id": "1",
                                                       "side": "back", "price": 2.6})).json()
        assert check["reason"] == "OK", check


async def test_filters_by_source_and_bookmaker_on_rest_sse_and_ws(store: Store, redis_url: str) -> None:
    import json

    from websockets.asyncio.client import connect

    feed = Feed(store)
    await feed.write(feed.image("bf:1", source="esa", bookmaker="betfair"),
                     feed.image("pn:1", source="pinnacle", bookmaker="pinnacle"),
                     feed.image("toa:1", source="theoddsapi", bookmaker="bet365"),
                     feed.image("toa:2", source="theoddsapi", bookmaker="unibet"),
                     feed.image("x:1", source="push"))  # no bookmaker
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def ids(query: str) -> list[str]:
            r = await c.get("/v1/markets?" + query)
            assert r.status_code == 200, r.text
            return [m["market_id"] for m in r.json()["markets"]]

        assert await ids("source=theoddsapi") == ["toa:1", "toa:2"]
        assert await ids("bookmaker=bet365,pinnacle") == ["pn:1", "toa:1"]
        assert await ids("source=theoddsapi&bookmaker=unibet") == ["toa:2"]
        assert await ids("bookmaker=nobody") == []
        r = await c.get("/v1/markets?bookmaker=" + "x" * 300)
        assert r.status_code == 400 and "bookmaker" in r.json()["message"]
        every = (await c.get("/v1/events")).json()["events"]
        only = (await c.get("/v1/events?bookmaker=betfair")).json()["events"]
        assert only and all(e["bookmakers"] == ["betfair"] for e in only) and len(every) >= len(only)
        async with c.stream("GET", "/v1/stream?source=pinnacle,push") as r:
            snap = await SSEReader(r).until(lambda e: e.event == "snapshot")
            assert sorted(m["market_id"] for m in snap.data["markets"]) == ["pn:1", "x:1"]
        async with connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"bookmaker": ["bet365"]}}))
            assert json.loads(await ws.recv())["type"] == "ack"
            snap = json.loads(await ws.recv())
            assert [m["market_id"] for m in snap["markets"]] == ["toa:1"]
            await feed.write(feed.price("toa:2", "1", 4.0, source="theoddsapi"),
                             feed.price("toa:1", "1", 5.0, source="theoddsapi"))
            delta = json.loads(await ws.recv())
            assert delta["type"] == "delta" and delta["market_id"] == "toa:1"  # toa:2 (unibet) never comes


async def test_wrong_methods_and_unknown_v1_paths_get_json_answers(redis_url: str) -> None:
    """They fell through to the board's static files: a plain-text 404, or a 405 claiming
    ``Allow: GET, HEAD`` for the POST-only price check (API probe)."""
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        for method in ("GET", "PUT", "DELETE"):
            r = await c.request(method, "/v1/price-check")
            assert r.status_code == 405 and r.headers["allow"] == "POST", (method, r.status_code, r.text)
            assert r.json()["error"] == "method_not_allowed" and "use POST" in r.json()["message"]
        r = await c.post("/v1/markets")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        r = await c.get("/v1/ws")
        assert r.status_code == 426 and r.json()["error"] == "upgrade_required" and r.headers["upgrade"] == "websocket"
        for path in ("/v1/nothing", "/v1/price-check/batch/more"):
            r = await c.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", (path, r.text)
        assert (await c.get("/v1/markets/not-there")).json()["error"] == "unknown_market"  # the route's own 404 stays
        r = await c.get("/")  # the board is still served
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]


async def test_the_v1_catch_all_takes_every_method_and_never_touches_a_body(redis_url: str) -> None:
    """Review of the API fixes: TRACE / PROPFIND fell through to the board's files (a function
    route takes only the methods listed); and the h2c strip must only ever look at a head — a body
    holding "\\r\\nUpgrade: h2c" kept whole (it lost those bytes, and the framing of the connection)."""
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        for method in ("TRACE", "PROPFIND"):
            r = await c.request(method, "/v1/price-check")
            assert r.status_code == 405 and r.headers["allow"] == "POST", (method, r.status_code, r.text)
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            body = b'{"market_id":"m\r\nUpgrade: h2c\r\n","selection_id":"1","side":"back","price":2.0}'  # raw CR LF
            one = (b"POST /v1/price-check HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
            writer.write(one + one)  # two pipelined: both answered, the second's framing intact
            answers = []
            for _ in range(2):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                n = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                answers.append((head.split(b" ", 2)[1], json.loads(await asyncio.wait_for(reader.readexactly(n), 10))))
        finally:
            writer.close()
        for status, answer in answers:  # (raw control characters in a JSON string: refused, but read whole)
            assert status == b"422" and "invalid character (byte 15)" in answer["message"], answer  # the CR, in place
