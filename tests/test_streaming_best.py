"""One event, every book, on the wire (real Redis, real node, httpx and
websockets clients): canonical ``event=ev:…`` filters carry every book's
markets; ``view=best`` sends the best / fair snapshot, then only changes of
the best or fair price — a change that leaves them alone sends nothing, a
book whose source goes DOWN leaves the best price at once; the REST view
and the best-price check agree."""

from __future__ import annotations

import json

import httpx
from websockets.asyncio.client import connect

from feed.models import MarketHeader, Selection, SourceHealth
from feed.normalise.base import MarketUpdate
from feed.store import Store, StoredLink
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, serve


def _market(mid: str, source: str, event: str, prices: tuple[float, float, float]) -> MarketUpdate:
    t = now_ms()
    sels = [Selection(selection_id=o, name=o.title(), price=p, outcome=o)
            for o, p in zip(("home", "draw", "away"), prices)]
    return MarketUpdate(market_id=mid, source=source, image=True,
                        header=MarketHeader(sport="soccer", event_id=event, event_name="Arsenal v Chelsea",
                                            bookmaker=source, status="OPEN", market_type="match_result",
                                            market_type_raw="h2h", start_time=t + 3_600_000),
                        selections=sels, source_ts=t, received_at=t + 1)


def _price(mid: str, source: str, outcome: str, price: float) -> MarketUpdate:
    t = now_ms()
    return MarketUpdate(market_id=mid, source=source, image=False, header=None,
                        selections=[Selection(selection_id=outcome, name=outcome.title(), price=price,
                                              outcome=outcome)], source_ts=t, received_at=t + 1)


async def _setup(store: Store) -> Feed:
    feed = Feed(store)
    await feed.write(_market("a:1", "book_a", "a:e", (2.10, 3.40, 3.60)),
                     _market("b:1", "book_b", "b:e", (2.20, 3.30, 3.50)))
    for source in ("book_a", "book_b"):
        await store.set_health(SourceHealth(source=source, kind="push", state="UP", last_message_at=now_ms(),
                                            updated_at=now_ms(), lease_ms=600_000, stale_after_ms=600_000))
    await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.96, "fuzzy")},
                           {"ev:a:e": json.dumps({"event_id": "ev:a:e", "sport": "soccer", "name": "Arsenal v Chelsea",
                                                  "home": "Arsenal", "away": "Chelsea",
                                                  "members": ["a:e", "b:e"]}).encode()})
    return feed


def _best(msg: dict, outcome: str) -> tuple[float, str]:
    (ev,) = msg["events"] if "events" in msg else [msg]
    (mkt,) = ev["markets"]
    o = next(o for o in mkt["outcomes"] if o["outcome"] == outcome)
    return o["best"]["price"], o["best"]["bookmaker"]


async def test_canonical_event_filter_rest_view_and_best_stream(store: Store, redis_url: str) -> None:
    feed = await _setup(store)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def linked() -> bool:
            r = await c.get("/v1/events/ev:a:e")
            return r.status_code == 200 and r.json()["event"]["bookmakers"] == ["book_a", "book_b"]
        await eventually(linked, what="the node loaded the links")
        ev = (await c.get("/v1/events/b:e?view=best")).json()  # a provider id answers with its canonical event
        assert ev["event"]["event_id"] == "ev:a:e" and "markets" not in ev
        (view,) = ev["view"]
        assert view["market"] == "match_result" and view["fair_books"] == ["book_a", "book_b"]
        assert [(o["outcome"], o["best"]["price"], o["best"]["bookmaker"]) for o in view["outcomes"]] == [
            ("home", 2.2, "book_b"), ("draw", 3.4, "book_a"), ("away", 3.6, "book_a")]
        listed = (await c.get("/v1/events?view=best&market_type=match_result")).json()["events"]
        assert [(e["event_id"], e["members"]) for e in listed] == [("ev:a:e", ["a:e", "b:e"])]
        r = await c.get("/v1/events?market_type=total:points=2.5")
        assert r.status_code == 400 and "specifiers" in r.json()["message"]

        # the delta stream of the canonical event carries both books
        async with c.stream("GET", "/v1/stream", params={"event": "ev:a:e"}) as resp:
            rd = SSEReader(resp)
            snap = await rd.next()
            assert snap.event == "snapshot" and sorted(m["market_id"] for m in snap.data["markets"]) == ["a:1", "b:1"]

        async with c.stream("GET", "/v1/stream", params={"event": "ev:a:e", "view": "best"}) as resp:
            rd = SSEReader(resp)
            first = await rd.next()
            assert first.event == "best" and first.data["snapshot"] is True and _best(first.data, "home") == (2.2, "book_b")
            await feed.write(feed.header("b:1", source="book_b", name="Match Odds"))  # best and fair unmoved: nothing sent
            await feed.write(_price("a:1", "book_a", "home", 2.50))   # a new best home price
            msg = await rd.next()
            while msg.event == "heartbeat":
                msg = await rd.next()
            assert msg.event == "best" and "snapshot" not in msg.data
            assert _best(msg.data, "home") == (2.5, "book_a")
            # book_a's source goes DOWN: its prices leave the best price without any delta
            await store.set_health(SourceHealth(source="book_a", kind="push", state="DOWN", reason="heartbeat_missed",
                                                last_message_at=now_ms(), updated_at=now_ms(), lease_ms=600_000))
            msg = await rd.next()
            while msg.event != "best":
                msg = await rd.next()
            assert _best(msg.data, "home") == (2.2, "book_b")
            home = next(o for o in msg.data["markets"][0]["outcomes"] if o["outcome"] == "home")
            assert home["excluded"] == {"book_a": "stale"}

        # the best-price check agrees: book_a is down, book_b's 2.2 is the best current home price
        r = (await c.post("/v1/price-check", json={"event": "ev:a:e", "market": "match_result", "outcome": "home",
                                                   "side": "back", "price": 2.2})).json()
        assert (r["accepted"], r["reason"], r["bookmaker"], r["current_price"]) == (True, "OK", "book_b", 2.2)
        assert {b["bookmaker"]: b["reason"] for b in r["books"]} == {"book_b": "OK", "book_a": "SOURCE_DOWN"}
        bad = await c.post("/v1/price-check", json={"event": "ev:a:e", "market": "match_result", "side": "back",
                                                    "price": 2.2})
        assert bad.status_code == 422 and "outcome" in bad.json()["message"]


async def test_websocket_best_view_with_a_market_type_filter(store: Store, redis_url: str) -> None:
    feed = await _setup(store)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def linked() -> bool:
            r = await c.get("/v1/events/ev:a:e")
            return r.status_code == 200 and len(r.json()["event"]["bookmakers"]) == 2
        await eventually(linked, what="the node loaded the links")
        async with connect(base.replace("http", "ws", 1) + "/v1/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "view": "best",
                                      "filter": {"event": "ev:a:e", "market_type": "match_result"}}))
            ack = json.loads(await ws.recv())
            assert ack["type"] == "ack" and ack["sub"] == 1
            snap = json.loads(await ws.recv())
            assert snap["type"] == "best" and snap["sub"] == 1 and _best(snap, "away") == (3.6, "book_a")
            await feed.write(_price("b:1", "book_b", "away", 3.9))
            msg = json.loads(await ws.recv())
            assert msg["type"] == "best" and _best(msg, "away") == (3.9, "book_b")
            await ws.send(json.dumps({"op": "subscribe", "id": 2, "view": "sideways"}))
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and "view must be" in err["message"]


async def test_a_book_linked_later_reaches_canonical_subscribers_as_an_image(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(_market("a:1", "book_a", "a:e", (2.10, 3.40, 3.60)),
                     _market("b:1", "book_b", "b:e", (2.20, 3.30, 3.50)))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream", params={"event": "ev:a:e"}) as resp:
            rd = SSEReader(resp)
            snap = await rd.next()
            assert [m["market_id"] for m in snap.data["markets"]] == ["a:1"]  # not linked yet: its own event
            await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"),
                                    "b:e": StoredLink("ev:a:e", 0.95, "fuzzy")}, {})
            msg = await rd.next()
            while msg.event == "heartbeat":
                msg = await rd.next()
            assert msg.event == "delta" and msg.data["kind"] == "image" and msg.data["market_id"] == "b:1"
            assert msg.data["market"]["selections"][0]["price"] == 2.2
            await feed.write(_price("b:1", "book_b", "home", 2.3))  # and its changes follow
            msg = await rd.next()
            while msg.event == "heartbeat":
                msg = await rd.next()
            assert msg.data["market_id"] == "b:1" and msg.data["selections"][0]["price"] == 2.3
