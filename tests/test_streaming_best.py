"""One event, every book, on the wire (real Redis, real node, httpx and
websockets clients): canonical ``event=ev:…`` filters carry every book's
markets; ``view=best`` sends the best / fair snapshot, then only changes of
the best or fair price — a change that leaves them alone sends nothing, a
book whose source goes DOWN leaves the best price at once, a best that
moves to another market of its book is sent, a market group that leaves
the event (a relink, a line corrected) or an event that leaves the filter
comes as ``removed``; the REST view and the best-price check agree."""

from __future__ import annotations

import asyncio
import json

import httpx
from websockets.asyncio.client import ClientConnection, connect

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


def _total(mid: str, source: str, event: str, line: str, prices: tuple[float, float]) -> MarketUpdate:
    """An over/under market of ``line`` goals (decimal prices over, under)."""
    t = now_ms()
    sels = [Selection(selection_id=o, name=o.title(), price=p, outcome=o) for o, p in zip(("over", "under"), prices)]
    return MarketUpdate(market_id=mid, source=source, image=True,
                        header=MarketHeader(sport="soccer", event_id=event, event_name="Arsenal v Chelsea",
                                            bookmaker=source, status="OPEN", market_type="total",
                                            market_type_raw="totals", specifiers={"line": line},
                                            start_time=t + 3_600_000),
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


async def _next_best(rd: SSEReader, timeout_s: float = 10.0) -> dict:
    """The data of the next ``best`` event (heartbeats skipped) within ``timeout_s`` seconds
    (AssertionError when none comes: a change the stream did not send)."""
    async def read() -> dict:
        msg = await rd.next()
        while msg.event == "heartbeat":
            msg = await rd.next()
        assert msg.event == "best", msg
        return msg.data
    try:
        return await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"no best message within {timeout_s} s") from None


async def _ws_next(ws: ClientConnection, timeout_s: float = 10.0) -> dict:
    """The next WebSocket message, decoded, within ``timeout_s`` seconds (else AssertionError)."""
    try:
        return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
    except TimeoutError:
        raise AssertionError(f"no message within {timeout_s} s") from None


def _groups(msg: dict) -> dict[str, dict]:
    """market key -> market of a ``best`` message about one event (snapshot or change)."""
    (ev,) = msg["events"] if "events" in msg else [msg]
    return {m["market"]: m for m in ev["markets"]}


async def _linked(c: httpx.AsyncClient, event: str, books: list[str]) -> None:
    async def ok() -> bool:
        r = await c.get(f"/v1/events/{event}")
        return r.status_code == 200 and r.json()["event"]["bookmakers"] == books
    await eventually(ok, what=f"{event} has the books {books}")


async def test_best_stream_removes_a_market_group_that_leaves_the_event(store: Store, redis_url: str) -> None:
    """book_b alone offers ``total:line=3.5`` of ev:a:e: a line corrected by the book (a delta) and
    book_b relinked to its own event (no delta) each take the group out of ev:a:e, and the
    subscriber is told (``outcomes: []``, ``removed: true``) instead of keeping book_b's price."""
    feed = await _setup(store)
    await feed.write(_total("b:2", "book_b", "b:e", "3.5", (2.90, 1.45)))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        await _linked(c, "ev:a:e", ["book_a", "book_b"])
        async with c.stream("GET", "/v1/stream", params={"event": "ev:a:e", "view": "best"}) as resp:
            rd = SSEReader(resp)
            snap = await _next_best(rd)
            assert snap["snapshot"] is True and sorted(_groups(snap)) == ["match_result", "total:line=3.5"]
            # the book corrects its line: 3.5 leaves, 2.5 comes, in one message
            await feed.write(feed.header("b:2", source="book_b", specifiers={"line": "2.5"}))
            groups = _groups(await _next_best(rd))
            assert groups["total:line=3.5"] == {"market": "total:line=3.5", "market_type": "total",
                                                "specifiers": {"line": "3.5"}, "outcomes": [], "removed": True}
            assert [o["best"]["price"] for o in groups["total:line=2.5"]["outcomes"]] == [2.9, 1.45]
            assert "removed" not in groups["total:line=2.5"] and "match_result" not in groups

            # the linker finds b:e is another match: book_b leaves ev:a:e without a delta
            await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:b:e", 1.0, "self")},
                                   {})
            msg = await _next_best(rd)
            groups = _groups(msg)
            assert msg["event_id"] == "ev:a:e" and sorted(groups) == ["match_result", "total:line=2.5"]
            assert groups["total:line=2.5"]["removed"] is True and groups["total:line=2.5"]["outcomes"] == []
            assert _best({"markets": [groups["match_result"]]}, "home") == (2.1, "book_a")
            # REST agrees: the event has no total any more
            view = (await c.get("/v1/events/ev:a:e?view=best")).json()["view"]
            assert [v["market"] for v in view] == ["match_result"]
            # book_b's changes are another event's now: the next message is book_a's
            await feed.write(_price("b:2", "book_b", "over", 3.1))
            await feed.write(_price("a:1", "book_a", "home", 2.4))
            msg = await _next_best(rd)
            assert sorted(_groups(msg)) == ["match_result"] and _best(msg, "home") == (2.4, "book_a")


async def test_websocket_best_view_removes_an_event_that_leaves_the_filter(store: Store, redis_url: str) -> None:
    """A subscriber of the provider event ``b:e`` got its canonical event ev:a:e (both books); once
    b:e is relinked to its own event, every group of ev:a:e is removed and ev:b:e's come."""
    feed = await _setup(store)
    await feed.write(_total("b:2", "book_b", "b:e", "3.5", (2.90, 1.45)))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        await _linked(c, "ev:a:e", ["book_a", "book_b"])
        async with connect(base.replace("http", "ws", 1) + "/v1/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "view": "best", "filter": {"event": "b:e"}}))
            assert json.loads(await ws.recv())["type"] == "ack"
            snap = json.loads(await ws.recv())
            assert [e["event_id"] for e in snap["events"]] == ["ev:a:e"]
            assert sorted(_groups(snap)) == ["match_result", "total:line=3.5"]
            await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:b:e", 1.0, "self")},
                                   {})
            got: dict[str, dict] = {}
            while len(got) < 2:
                msg = await _ws_next(ws)
                if msg["type"] == "best":
                    assert msg["event_id"] not in got
                    got[msg["event_id"]] = _groups(msg)
            gone = got["ev:a:e"]
            assert sorted(gone) == ["match_result", "total:line=3.5"]
            assert all(m["removed"] is True and m["outcomes"] == [] for m in gone.values())
            now = got["ev:b:e"]
            assert sorted(now) == ["match_result", "total:line=3.5"] and not any("removed" in m for m in now.values())
            assert _best({"markets": [now["match_result"]]}, "home") == (2.2, "book_b")
            await feed.write(_price("a:1", "book_a", "home", 2.6))  # ev:a:e is not its event any more
            await feed.write(_price("b:1", "book_b", "home", 2.3))
            msg = await _ws_next(ws)
            assert msg["event_id"] == "ev:b:e" and _best(msg, "home") == (2.3, "book_b")


async def test_best_stream_sends_a_best_that_moves_to_another_market_at_the_same_price(
        store: Store, redis_url: str) -> None:
    """book_b lists the match twice (b:3 older, b:1 newer) at the same home price: the fresher
    market holds the best. When b:3 becomes the fresher one, the best's ``market_id`` (where a
    bet goes) changes at the same price and book — and is sent."""
    feed = Feed(store)
    await feed.write(_market("b:3", "book_b", "b:e", (2.20, 3.10, 3.20)))
    await asyncio.sleep(0.01)
    await feed.write(_market("a:1", "book_a", "a:e", (2.10, 3.40, 3.60)),
                     _market("b:1", "book_b", "b:e", (2.20, 3.30, 3.50)))
    for source in ("book_a", "book_b"):
        await store.set_health(SourceHealth(source=source, kind="push", state="UP", last_message_at=now_ms(),
                                            updated_at=now_ms(), lease_ms=600_000, stale_after_ms=600_000))
    await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.96, "fuzzy")}, {})
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        await _linked(c, "ev:a:e", ["book_a", "book_b"])
        async with c.stream("GET", "/v1/stream", params={"event": "ev:a:e", "view": "best"}) as resp:
            rd = SSEReader(resp)
            snap = await _next_best(rd)
            home = next(o for o in _groups(snap)["match_result"]["outcomes"] if o["outcome"] == "home")
            assert (home["best"]["price"], home["best"]["bookmaker"], home["best"]["market_id"]) == (2.2, "book_b", "b:1")
            await asyncio.sleep(0.01)
            await feed.write(feed.header("b:3", source="book_b", name="Match Odds"))  # b:3 is the fresher now
            msg = await _next_best(rd)
            home = next(o for o in _groups(msg)["match_result"]["outcomes"] if o["outcome"] == "home")
            assert (home["best"]["price"], home["best"]["bookmaker"], home["best"]["market_id"]) == (2.2, "book_b", "b:3")
            check = (await c.post("/v1/price-check", json={"event": "ev:a:e", "market": "match_result",
                                                            "outcome": "home", "side": "back", "price": 2.2})).json()
            assert (check["reason"], check["market_id"]) == ("OK", "b:3")
