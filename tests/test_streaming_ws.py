"""WebSocket end to end: real uvicorn, real websockets client, real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from feed.models import MARKET_DECODER
from feed.settings import Settings
from feed.store import Store
from streaming_helpers import Feed, LocalBook, make_app, sans_as_of, serve

TIMEOUT_S = 10.0


def ws_url(base: str, path: str = "/v1/ws") -> str:
    return base.replace("http://", "ws://") + path


async def recv(ws: ClientConnection, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def recv_until(ws: ClientConnection, pred: Any, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        while True:
            msg = json.loads(await ws.recv())
            if pred(msg):
                return msg
    return await asyncio.wait_for(run(), timeout_s)


async def deltas(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    out = []
    while len(out) < n:
        msg = await recv(ws)
        if msg["type"] == "heartbeat":
            continue
        assert msg["type"] == "delta", msg
        out.append(msg)
    return out


async def test_subscribe_snapshot_deltas_and_many_subscriptions(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"), feed.image("m3", sport="tennis", event="e3"))
    async with serve(make_app(redis_url)) as base, connect(ws_url(base)) as ws, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"sport": "soccer"}}))
        assert await recv(ws) == {"type": "ack", "id": 1, "sub": 1}
        snap = await recv(ws)
        assert snap["type"] == "snapshot" and snap["sub"] == 1 and snap["token"]
        assert sorted(m["market_id"] for m in snap["markets"]) == ["m1", "m2"]
        await ws.send(json.dumps({"op": "subscribe", "id": "b", "filter": {"market": ["m3", "m1"]}}))
        assert await recv(ws) == {"type": "ack", "id": "b", "sub": 2}
        snap2 = await recv(ws)
        assert snap2["sub"] == 2 and sorted(m["market_id"] for m in snap2["markets"]) == ["m1", "m3"]
        book = LocalBook()
        book.on(snap)

        written = await feed.write(feed.price("m1", "1", 2.2), feed.price("m2", "2", 3.9), feed.price("m3", "1", 1.5))
        got = await deltas(ws, 4)
        by_sub: dict[int, list[tuple[str, int]]] = {}
        for msg in got:
            by_sub.setdefault(msg["sub"], []).append((msg["market_id"], msg["seq"]))
        assert by_sub == {1: [("m1", 2), ("m2", 2)], 2: [("m1", 2), ("m3", 2)]}
        # every message carries a token; one that is not the last of its log entry carries the
        # token from before the entry (resuming from it replays the whole entry), the last the new one
        sub1 = [m for m in got if m["sub"] == 1]
        assert sub1[0]["token"] == snap["token"] and sub1[1]["token"] != snap["token"]
        for msg in got:
            if msg["sub"] == 1:
                book.on(msg)

        await ws.send(json.dumps({"op": "unsubscribe", "id": 5, "sub": 2}))
        assert await recv(ws) == {"type": "ack", "id": 5, "sub": 2}
        await ws.send(json.dumps({"op": "ping", "id": 6}))
        assert await recv(ws) == {"type": "pong", "id": 6}
        more = await feed.write(feed.header("m1", status="SUSPENDED"), feed.price("m3", "1", 1.6))
        more += await feed.write(feed.price("m2", "1", 2.8))
        got = await deltas(ws, 2)
        assert [(m["sub"], m["market_id"]) for m in got] == [(1, "m1"), (1, "m2")]
        for msg in got:
            book.on(msg)
        for mid in ("m1", "m2"):
            rest = MARKET_DECODER.decode((await c.get(f"/v1/markets/{mid}")).content)
            mine = book.markets[mid]
            assert (mine.selections, mine.status, mine.seq) == (rest.selections, rest.status, rest.seq)
        assert written and more


async def test_bad_messages_get_errors_and_the_connection_stays_usable(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    async with serve(make_app(redis_url)) as base, connect(ws_url(base)) as ws:
        cases = [
            ("not json", "not valid JSON"),
            ("[1, 2]", "JSON object"),
            (json.dumps({"op": "fly", "id": 1}), "unknown op"),
            (json.dumps({"op": "subscribe", "id": 2, "filter": {"colour": "red"}}), "unknown filter field"),
            (json.dumps({"op": "subscribe", "id": 3, "filter": {"in_play": "maybe"}}), "in_play must be true or false"),
            (json.dumps({"op": "subscribe", "id": 4, "filter": {"sport": 5}}), "sport must be"),
            (json.dumps({"op": "subscribe", "id": 5, "filter": "soccer"}), "filter"),
            (json.dumps({"op": "subscribe", "id": 6, "conflate_ms": -1}), "conflate_ms"),
            (json.dumps({"op": "unsubscribe", "id": 7, "sub": 99}), "no subscription 99"),
            (json.dumps({"op": "unsubscribe", "id": 8}), "\"sub\" must be"),
            (json.dumps({"op": "ping", "id": {"x": 1}}), "\"id\" must be"),
        ]
        for text, fragment in cases:
            await ws.send(text)
            msg = await recv(ws)
            assert msg["type"] == "error" and msg["code"] == "bad_request", msg
            assert fragment in msg["message"], (fragment, msg)
        await ws.send(json.dumps({"op": "subscribe", "id": 9, "filter": {"in_play": False}}))
        assert (await recv(ws))["type"] == "ack"
        assert [m["market_id"] for m in (await recv(ws))["markets"]] == ["m1"]
        # too big closes the connection with 1009 after an error message
        await ws.send(json.dumps({"op": "ping", "id": 10, "pad": "x" * (70 * 1024)}))
        msg = await recv_until(ws, lambda m: m["type"] == "error")
        assert msg["code"] == "message_too_big"
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), TIMEOUT_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_deeply_nested_messages_get_bad_request_and_the_connection_stays_open(
        store: Store, redis_url: str) -> None:
    """JSON nested deeper than any parser recurses (within the 64 KiB message limit) is a bad
    request like any other: an error naming the problem, and the connection keeps working."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    depth = 30_000  # 60 KB: under the message limit, far over any recursion limit
    deep = "[" * depth + "]" * depth
    obj = "{\"a\":" * (depth // 6) + "1" + "}" * (depth // 6)
    cases = [
        deep,
        obj,
        '{"op":"subscribe","id":1,"filter":' + deep + "}",
        '{"op":"subscribe","id":2,"filter":{"sport":' + deep + "}}",
        '{"op":"subscribe","id":3,"filter":{"sport":"soccer","x":' + obj + "}}",
        '{"op":"ping","id":4,"extra":' + deep + "}",
        '{"op":"ping","id":' + deep + "}",
        '{"op":"subscribe","id":5,"resume":' + obj + "}",
        '{"op":' + deep + "}",
    ]
    async with serve(make_app(redis_url)) as base, connect(ws_url(base)) as ws:
        for i, text in enumerate(cases):
            assert len(text.encode()) < 64 * 1024
            await ws.send(text)
            msg = await recv(ws)
            assert msg["type"] == "error" and msg["code"] == "bad_request", (i, msg)
            assert msg["message"], i
            await ws.send(json.dumps({"op": "ping", "id": 100 + i}))
            assert await recv(ws) == {"type": "pong", "id": 100 + i}, i
        await ws.send(json.dumps({"op": "subscribe", "id": 9, "filter": {"sport": "soccer"}}))
        assert await recv(ws) == {"type": "ack", "id": 9, "sub": 1}
        assert [m["market_id"] for m in (await recv(ws))["markets"]] == ["m1"]


async def test_ws_resume_and_heartbeats(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    async with serve(make_app(redis_url)) as base:
        async with connect(ws_url(base, "/v1/ws?heartbeat_ms=150")) as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}}))
            await recv(ws)
            snap = await recv(ws)
            hb = await recv(ws)
            assert hb["type"] == "heartbeat" and hb["sub"] == 1 and hb["as_of"] >= snap["as_of"]
            assert hb["token"] == snap["token"]
            await feed.write(feed.price("m1", "1", 2.1), feed.price("m2", "1", 3.1))
            got = await deltas(ws, 2)
            token = got[-1]["token"]
        missed = await feed.write(feed.price("m1", "1", 2.2), feed.price("m2", "1", 3.2))
        missed += await feed.write(feed.price("m2", "2", 4.4))
        async with connect(ws_url(base)) as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"market": "m2"}, "resume": token}))
            assert await recv(ws) == {"type": "ack", "id": 1, "sub": 1}
            resumed = await recv(ws)
            assert resumed["type"] == "resumed" and resumed["recovered"] is True and resumed["sub"] == 1
            got = await deltas(ws, 2)
            assert [(m["market_id"], m["seq"]) for m in got] == [(d.market_id, d.seq) for d in missed
                                                                 if d.market_id == "m2"]
            # a garbage token: not an error, a fresh snapshot
            await ws.send(json.dumps({"op": "subscribe", "id": 2, "filter": {}, "resume": "garbage"}))
            assert (await recv(ws))["type"] == "ack"
            assert sans_as_of(await recv(ws)) == {"sub": 2, "type": "resumed", "recovered": False}
            snap = await recv(ws)
            assert snap["type"] == "snapshot" and snap["recovered"] is False and snap["sub"] == 2


async def test_origin_allow_list(store: Store, redis_url: str) -> None:
    settings = Settings(heartbeat_ms=60_000, allowed_origins=("http://good.example",))
    async with serve(make_app(redis_url, settings=settings)) as base:
        with pytest.raises(Exception) as info:
            async with connect(ws_url(base), origin="http://evil.example"):  # type: ignore[arg-type]
                pass
        assert "403" in str(info.value)
        async with connect(ws_url(base), origin="http://good.example") as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"op": "ping", "id": 1}))
            assert await recv(ws) == {"type": "pong", "id": 1}


async def test_shutdown_closes_streams_promptly(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    async with serve(make_app(redis_url)) as base:
        ws = await connect(ws_url(base))
        await ws.send(json.dumps({"op": "subscribe", "id": 1}))
        await recv(ws)
        await recv(ws)
    # the server is gone: the client saw a close (1001 going away or 1012 restart)
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), TIMEOUT_S)
    assert info.value.rcvd is not None and info.value.rcvd.code in (1001, 1012)


def test_client_messages_decode_into_typed_ops() -> None:
    from streaming.ws import FilterSpec, Ping, Subscribe, Unsubscribe, decode_op

    op = decode_op('{"op":"subscribe","id":1,"filter":{"event":"ev:a","market_type":"total"},"view":"best"}')
    assert isinstance(op, Subscribe) and op.view == "best"
    assert op.filter == FilterSpec(event="ev:a", market_type="total")
    assert decode_op('{"op":"unsubscribe","id":"x","sub":3}') == Unsubscribe(id="x", sub=3)
    assert decode_op('{"op":"ping"}') == Ping()
    assert decode_op('{"op":"fly","id":7}') == ("unknown op 'fly'; use subscribe, unsubscribe or ping", 7)
    why, mid = decode_op('{"op":"ping","id":2,"sub":1}')  # type: ignore[misc]
    assert mid == 2 and "unknown field 'sub'" in why
