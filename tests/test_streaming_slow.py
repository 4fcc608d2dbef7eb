"""Slow consumers end to end: clients that stop reading (raw sockets with a tiny
receive buffer) among clients that read; the readers keep getting every
change, the slow ones are collapsed, resynced and finally closed with the
documented reason, and no connection's queue ever exceeds its budget.
Dead peers: a WebSocket client that never answers pings is closed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

import httpx
from websockets.asyncio.client import connect

from feed.models import MARKET_DECODER
from feed.settings import Settings
from feed.store import Store
from streaming.hub import SLOW_CONSUMER_CODE
from streaming_helpers import Feed, LocalBook, SSEReader, eventually, make_app, serve

TIMEOUT_S = 15.0
PRICES = {str(i): 2.0 + i / 10 for i in range(40)}  # a big market (~5 KB per image)


def _masked(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _raw_client(port: int, request: bytes, first_frame: bytes | None = None) -> socket.socket:
    """A blocking socket with a tiny receive buffer that sends ``request`` and then never reads."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    if first_frame is not None:
        await asyncio.sleep(0.2)
        s.sendall(first_frame)
    return s


def _read_all(s: socket.socket, limit_s: float = 10.0) -> bytes:
    s.settimeout(limit_s)
    chunks = []
    try:
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            chunks.append(b)
    except OSError:
        pass
    return b"".join(chunks)


async def test_non_reading_clients_do_not_delay_the_others(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    big = [f"big{i}" for i in range(8)]
    small = ["s1", "s2"]
    await feed.write(*(feed.image(mid, prices=PRICES) for mid in big), *(feed.image(mid) for mid in small))
    budget = 64 * 1024
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, outbox_max_bytes=budget))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        hub = app.state.node.hub
        port = int(base.rsplit(":", 1)[1])
        key = base64.b64encode(os.urandom(16))
        # two clients subscribed to everything that never read (receive buffer 4 KiB)
        slow_ws = await _raw_client(port, b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                                    b"\r\nSec-WebSocket-Version: 13\r\n\r\n",
                                    _masked(b'{"op":"subscribe","id":1,"filter":{}}'))
        slow_sse = await _raw_client(port, b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: hub.subscriptions == 2)

        # three that read, on the small markets
        async with c.stream("GET", "/v1/stream?market=s1") as r1, c.stream("GET", "/v1/stream?market=s1,s2") as r2, \
                connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"market": small}}))
            readers = [SSEReader(r1), SSEReader(r2)]
            seen: list[list[dict[str, Any]]] = [[], [], []]
            stop = asyncio.Event()

            async def read_sse(i: int) -> None:
                # until cancelled below (a read that timed out would end the reader's line iterator for
                # good, and a pause of the writer on a loaded machine left the rest of its deltas unread)
                while True:
                    ev = await readers[i].next(TIMEOUT_S)
                    seen[i].append(ev.data)

            async def read_ws() -> None:
                while not stop.is_set():
                    try:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                    except asyncio.TimeoutError:
                        continue
                    seen[2].append(msg)

            async def read_once_closed(s: socket.socket) -> bytes:
                # a dropped client's last words wait for it only a grace period (then the socket
                # is aborted): read each slow socket as soon as the hub has let it go, not after
                # the loop below (which may take longer than the grace on a loaded machine)
                label = f":{s.getsockname()[1]}"
                await eventually(lambda: not any(c.label.endswith(label) for c in hub.connections), 2 * TIMEOUT_S)
                return await asyncio.to_thread(_read_all, s)

            slow_reads = [asyncio.create_task(read_once_closed(s)) for s in (slow_sse, slow_ws)]
            tasks = [asyncio.create_task(read_sse(0)), asyncio.create_task(read_sse(1)),
                     asyncio.create_task(read_ws())]
            peak = 0
            try:
                for i in range(150):  # ~35 KB per write, ~5 MB in all: far more than the slow sockets hold
                    prices = {k: v + (i + 1) / 100 for k, v in PRICES.items()}
                    await feed.write(*(feed.image(mid, prices=prices) for mid in big),
                                     feed.price(small[i % 2], "1", 3 + i / 100))
                    peak = max([peak, *(conn.outbox_bytes for conn in hub.connections)])
                    await asyncio.sleep(0.005)

                def caught_up() -> bool:
                    last = [m for m in seen[1] if m["type"] == "delta"]
                    return bool(last) and last[-1]["seq"] == feed.book.markets[small[1]].seq and \
                        sum(m["type"] == "delta" for m in seen[2]) == 150
                await eventually(caught_up, TIMEOUT_S)
            finally:
                stop.set()
                tasks[0].cancel()
                tasks[1].cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            assert peak <= budget  # memory per connection stays bounded
            for msgs, wanted in ((seen[0], ["s1"]), (seen[1], small), (seen[2], small)):
                types = [m["type"] for m in msgs if m["type"] not in ("ack", "heartbeat")]
                assert types[0] == "snapshot" and set(types[1:]) == {"delta"}  # never resynced
                book = LocalBook()
                for m in msgs:
                    book.on(m)
                for mid in wanted:  # every change, in order, nothing conflated
                    seqs = [m["seq"] for m in msgs if m["type"] == "delta" and m["market_id"] == mid]
                    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) == 75
                    assert not any(m.get("conflated") for m in msgs)
                    rest = MARKET_DECODER.decode((await c.get(f"/v1/markets/{mid}")).content)
                    assert (book.markets[mid].seq, book.markets[mid].selections) == (rest.seq, rest.selections)
            # the slow ones were collapsed, then resynced with a snapshot, then closed — and only they
            assert hub.collapses >= 1 and hub.slow_resyncs >= 1

        await eventually(lambda: hub.slow_closes == 2, TIMEOUT_S)
        sse_data, ws_data = await asyncio.gather(*slow_reads)
        assert b"event: error" in sse_data and b'"code":"slow_consumer"' in sse_data
        assert b'"code":"slow_consumer"' in ws_data
        close = ws_data[ws_data.rindex(b"\x88"):]  # the close frame: code 4008
        assert int.from_bytes(close[2:4], "big") == SLOW_CONSUMER_CODE
        metrics = (await c.get("/metrics")).text
        assert 'oddsfeed_slow_consumer_total{action="close"} 2.0' in metrics
        for s in (slow_sse, slow_ws):
            s.close()


async def test_a_peer_that_never_answers_pings_is_closed(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url, ws_ping_interval_s=0.2, ws_ping_timeout_s=0.3)
    async with serve(app) as base:
        hub = app.state.node.hub
        port = int(base.rsplit(":", 1)[1])
        s = await _raw_client(port, b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                    b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) +
                                    b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await eventually(lambda: len(hub.connections) == 1)
        await eventually(lambda: len(hub.connections) == 0, TIMEOUT_S)  # no pong: closed (1011)
        data = await asyncio.to_thread(_read_all, s, 5.0)
        assert b"101 Switching Protocols" in data and b"\x88" in data
        s.close()


async def test_ws_writes_are_coalesced_frames(store: Store, redis_url: str) -> None:
    """On our server every WebSocket connection uses pre-built frames, one socket write per wake-up."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url)
    async with serve(app) as base, connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}}))
        assert json.loads(await ws.recv())["type"] == "ack"
        (conn,) = app.state.node.hub.connections
        assert conn.ws_raw
        await feed.write(*(feed.price("m1", "1", 2.0 + i / 100) for i in range(1, 6)))
        snap = json.loads(await ws.recv())
        msgs = [json.loads(await ws.recv()) for _ in range(5)]
        assert snap["type"] == "snapshot" and [m["type"] for m in msgs] == ["delta"] * 5


async def test_a_write_blocked_past_the_deadline_drops_the_client(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    big = [f"big{i}" for i in range(8)]
    await feed.write(*(feed.image(mid, prices=PRICES) for mid in big))
    # a budget too large to matter: only the send deadline (0.5 s) can end this client
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, outbox_max_bytes=64 << 20), send_timeout_s=0.5)
    async with serve(app) as base:
        hub = app.state.node.hub
        port = int(base.rsplit(":", 1)[1])
        s = await _raw_client(port, b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: hub.subscriptions == 1)
        for i in range(200):
            prices = {k: v + (i + 1) / 100 for k, v in PRICES.items()}
            await feed.write(*(feed.image(mid, prices=prices) for mid in big))  # ~40 KB a write, 8 MB in all
            if not hub.connections:
                break
        await eventually(lambda: not hub.connections, TIMEOUT_S)
        data = await asyncio.to_thread(_read_all, s)
        assert b'"code":"send_deadline"' in data and hub.slow_closes == 0
        s.close()
