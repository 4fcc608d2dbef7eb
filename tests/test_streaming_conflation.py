"""Per-subscription conflation (``conflate_ms``) and odds formats at the edge, end to end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from websockets.asyncio.client import connect

from feed.models import MARKET_DECODER
from feed.store import Store
from streaming_helpers import Feed, LocalBook, SSEReader, make_app, sans_as_of, serve

TIMEOUT_S = 10.0


async def _ws_next(ws: Any, pred: Any = lambda m: True) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] != "heartbeat" and pred(msg):
                return msg
    return await asyncio.wait_for(run(), TIMEOUT_S)


async def test_sse_conflation_merges_changes_per_market(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1", prices={"1": 2.0, "2": 3.0, "3": 4.0}), feed.image("m2"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        async with c.stream("GET", "/v1/stream?conflate_ms=1000") as resp:
            sse = SSEReader(resp)
            snap = await sse.next()
            book = LocalBook()
            book.on(snap.data)
            n = 30
            for i in range(n):  # 30 changes of m1 (two selections) and one header change, well inside a window
                await feed.write(feed.price("m1", "1" if i % 2 else "2", 2.0 + i / 100))
            await feed.write(feed.header("m1", status="SUSPENDED"))
            await feed.write(feed.price("m2", "1", 7.7))  # m2 changes once: sent as is
            got: list[Any] = []
            while not got or book.markets["m1"].seq != feed.book.markets["m1"].seq \
                    or book.markets["m2"].seq != feed.book.markets["m2"].seq:
                ev = await sse.next(TIMEOUT_S)
                if ev.event == "heartbeat":
                    continue
                assert ev.event == "delta" and ev.id is not None  # every conflated message carries a token
                got.append(ev)
                book.on(ev.data)
            m1 = [e for e in got if e.data["market_id"] == "m1"]
            m2 = [e for e in got if e.data["market_id"] == "m2"]
            assert len(m1) < n and any(e.data.get("conflated") for e in m1)
            merged = next(e for e in m1 if e.data.get("conflated"))
            assert {s["selection_id"] for s in merged.data["selections"]} <= {"1", "2"}
            assert len(m2) == 1 and "conflated" not in m2[0].data
            for mid in ("m1", "m2"):
                rest = MARKET_DECODER.decode((await c.get(f"/v1/markets/{mid}")).content)
                mine = book.markets[mid]
                assert (mine.selections, mine.status, mine.seq) == (rest.selections, rest.status, rest.seq)
            last_token = sse.last_id
        # resuming from a conflated message's token misses nothing and repeats nothing
        more = await feed.write(feed.price("m2", "2", 8.8))
        async with c.stream("GET", "/v1/stream", headers={"Last-Event-ID": last_token}) as resp:
            sse = SSEReader(resp)
            assert sans_as_of((await sse.next()).data) == {"type": "resumed", "recovered": True}
            nxt = await sse.until(lambda e: e.event == "delta")
            assert (nxt.data["market_id"], nxt.data["seq"]) == (more[0].market_id, more[0].seq)


async def test_ws_subscriptions_choose_their_own_window(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    async with serve(make_app(redis_url)) as base, connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"market": "m1"}}))
        await ws.send(json.dumps({"op": "subscribe", "id": 2, "filter": {"market": "m1"}, "conflate_ms": 800}))
        for _ in range(4):  # ack, snapshot × 2
            await _ws_next(ws)
        written = []
        for i in range(10):
            written += await feed.write(feed.price("m1", "1", 3.0 + i / 10))
        every = [await _ws_next(ws, lambda m: m["sub"] == 1 and m["type"] == "delta") for _ in range(10)]
        assert [m["seq"] for m in every] == [d.seq for d in written]
        assert not any(m.get("conflated") for m in every)
        # the writes may straddle window boundaries (more of them the longer a loaded machine takes to
        # write), and a window holding one change sends it as is: read sub 2 up to the last write
        merged = [await _ws_next(ws, lambda m: m["sub"] == 2)]
        while merged[-1]["seq"] < written[-1].seq:
            merged.append(await _ws_next(ws, lambda m: m["sub"] == 2))
        assert all(m["type"] == "delta" and m["token"] for m in merged)
        assert merged[-1]["seq"] == written[-1].seq and merged[-1]["selections"][0]["price"] == 3.9
        assert len(merged) < len(written) and any(m.get("conflated") is True for m in merged)
        await ws.send(json.dumps({"op": "subscribe", "id": 3, "filter": {}, "conflate_ms": 5}))
        err = await _ws_next(ws, lambda m: m["type"] == "error")
        assert err["code"] == "bad_request" and "conflate_ms" in err["message"] and err["id"] == 3


async def test_odds_format_at_the_edge(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1", prices={"1": 2.5, "2": 1.5}))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        async with c.stream("GET", "/v1/stream?odds_format=fractional") as r_frac, \
                c.stream("GET", "/v1/stream") as r_dec:
            frac, dec = SSEReader(r_frac), SSEReader(r_dec)
            snap = (await frac.next()).data
            sels = {s["selection_id"]: s for s in snap["markets"][0]["selections"]}
            assert sels["1"]["price"] == "3/2" and sels["1"]["back"] == [["3/2", 10.0]] and sels["2"]["price"] == "1/2"
            assert (await dec.next()).data["markets"][0]["selections"][0]["price"] == 2.5
            await feed.write(feed.price("m1", "1", 3.0))
            d = await frac.until(lambda e: e.event == "delta")
            assert d.data["selections"][0]["price"] == "2/1"
            assert (await dec.until(lambda e: e.event == "delta")).data["selections"][0]["price"] == 3.0
        async with connect(base.replace("http://", "ws://") + "/v1/ws?odds_format=american") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}}))
            await ws.send(json.dumps({"op": "subscribe", "id": 2, "filter": {}, "odds_format": "decimal"}))
            s1 = await _ws_next(ws, lambda m: m["type"] == "snapshot" and m["sub"] == 1)
            s2 = await _ws_next(ws, lambda m: m["type"] == "snapshot" and m["sub"] == 2)
            assert {s["price"] for s in s1["markets"][0]["selections"]} == {200, -200}
            assert {s["price"] for s in s2["markets"][0]["selections"]} == {3.0, 1.5}
