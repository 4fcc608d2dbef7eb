"""Streams that own their sockets (issue 11 item 1): once accepted, SSE and
WebSocket connections leave the ASGI path — no task per connection, the
HTTP server's per-request objects gone, the hub writing to the socket — and
the WebSocket protocol (websockets' sans-I/O protocol under our own asyncio
protocol) speaks RFC 6455 with real clients and raw frames: fragmented
messages, pings, the closing handshake. Plus the timer wheel they use."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
from typing import Any

import httpx
from websockets.asyncio.client import connect

from feed.store import Store
from streaming.sockets import SSE_DISCARD_MAX_BYTES, SSESocket, WebSocketStream
from streaming.timers import TimerWheel
from streaming_helpers import Feed, SSEReader, eventually, make_app, serve

TIMEOUT_S = 15.0


def _frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A masked client frame."""
    key = os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    head = bytes((first, 0x80 | n)) if n < 126 else bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class _Frames:
    """Reads server frames (unmasked) from a raw stream."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def next(self) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT_S)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, await self.reader.readexactly(n)

    async def message(self, pred: Any) -> dict[str, Any]:
        while True:
            op, data = await self.next()
            if op == 0x1:
                msg = json.loads(data)
                if pred(msg):
                    return msg


def _server_tasks() -> list[asyncio.Task[Any]]:
    """Tasks running the server's code (not the test's clients')."""
    out = []
    for t in asyncio.all_tasks():
        code = getattr(t.get_coro(), "cr_code", None)
        name = code.co_filename if code is not None else ""
        if "/streaming/" in name or "/uvicorn/" in name or "/starlette/" in name:
            out.append(t)
    return out


async def _ws_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _Frames]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer, _Frames(reader)


async def test_accepted_streams_have_no_task_and_no_asgi_objects(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        hub = app.state.node.hub
        # one of each first (the hub's shared timers and loops start with the first connection)
        async with c.stream("GET", "/v1/stream?market=m1") as r0, \
                connect(base.replace("http://", "ws://") + "/v1/ws") as w0:
            await w0.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"market": "m1"}}))
            await eventually(lambda: hub.subscriptions == 2)
            reader0 = SSEReader(r0)  # kept: a collected reader closes its response
            await reader0.until(lambda e: e.event == "snapshot")
            gc.collect()
            server_tasks_before = len(_server_tasks())
            n = 20
            streams = [c.stream("GET", "/v1/stream?market=m1") for _ in range(n)]
            responses = [await s.__aenter__() for s in streams]
            readers = [SSEReader(r) for r in responses]
            sockets = [await connect(base.replace("http://", "ws://") + "/v1/ws") for _ in range(n)]
            try:
                for ws in sockets:
                    await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"market": "m1"}}))
                await eventually(lambda: hub.subscriptions == 2 + 2 * n)
                for ws in sockets:
                    assert json.loads(await ws.recv())["type"] == "ack"
                    assert json.loads(await ws.recv())["type"] == "snapshot"
                for rd in readers:
                    await rd.until(lambda e: e.event == "snapshot")
                gc.collect()
                # no task per connection: the server's tasks (code in streaming/ or uvicorn/) did not grow
                assert len(_server_tasks()) == server_tasks_before, _server_tasks()
                sinks = [conn.sink for conn in hub.connections]
                assert sum(isinstance(s, SSESocket) for s in sinks) == n + 1
                assert sum(isinstance(s, WebSocketStream) for s in sinks) == n + 1
                assert all(conn.wakeup is None and conn.writer is None for conn in hub.connections)
                # uvicorn's per-request objects are gone: its HTTP protocol objects are freed
                from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
                alive = [o for o in gc.get_objects() if isinstance(o, HttpToolsProtocol)]
                assert len(alive) <= 1, alive  # at most the httpx client's current REST connection
                # and the streams still carry changes
                await feed.write(feed.price("m1", "1", 3.3))
                for ws in sockets:
                    msg = json.loads(await ws.recv())
                    assert msg["type"] == "delta" and msg["market_id"] == "m1"
                for rd in readers:
                    ev = await rd.until(lambda e: e.event == "delta")
                    assert ev.data["market_id"] == "m1"
            finally:
                for ws in sockets:
                    await ws.close()
                for s in streams:
                    await s.__aexit__(None, None, None)
        await eventually(lambda: not hub.connections)


async def test_websocket_frames_pings_and_closing_handshake(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url)
    async with serve(app) as base:
        hub = app.state.node.hub
        port = int(base.rsplit(":", 1)[1])
        reader, writer, frames = await _ws_raw(port)
        # a subscribe sent in three fragments is one message
        msg = b'{"op":"subscribe","id":7,"filter":{"market":"m1"}}'
        writer.write(_frame(msg[:10], 0x1, fin=False) + _frame(msg[10:30], 0x0, fin=False)
                     + _frame(msg[30:], 0x0, fin=True))
        ack = await frames.message(lambda m: True)
        assert ack == {"type": "ack", "id": 7, "sub": 1}
        assert (await frames.message(lambda m: True))["type"] == "snapshot"
        # a ping frame gets a pong with the same payload
        writer.write(_frame(b"abcd", 0x9))
        op, data = await frames.next()
        assert (op, data) == (0xA, b"abcd")
        # while idle the connection holds no frame parser; a message after that still works
        await eventually(lambda: all(isinstance(c.sink, WebSocketStream) and c.sink.proto is None
                                     for c in hub.connections))
        writer.write(_frame(b'{"op":"ping","id":8}'))
        assert await frames.message(lambda m: True) == {"type": "pong", "id": 8}
        # a binary message that is not UTF-8: an error, the connection stays
        writer.write(_frame(b"\xff\xfe", 0x2))
        err = await frames.message(lambda m: True)
        assert err["type"] == "error" and err["code"] == "bad_request" and "UTF-8" in err["message"]
        # the client closes: the server echoes the close frame and lets the connection go
        writer.write(_frame((1000).to_bytes(2, "big") + b"bye", 0x8))
        op, data = await frames.next()
        assert op == 0x8 and int.from_bytes(data[:2], "big") == 1000
        assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""  # then the TCP close
        await eventually(lambda: not hub.connections and hub.subscriptions == 0)
        writer.close()


async def test_websocket_protocol_errors_close_with_their_code(store: Store, redis_url: str) -> None:
    app = make_app(redis_url)
    async with serve(app) as base:
        hub = app.state.node.hub
        port = int(base.rsplit(":", 1)[1])
        reader, writer, frames = await _ws_raw(port)
        await eventually(lambda: len(hub.connections) == 1)
        writer.write(bytes((0x81, 0x05)) + b"hello")  # an unmasked client frame: a protocol error
        op, data = await frames.next()
        assert op == 0x8 and int.from_bytes(data[:2], "big") == 1002
        assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
        await eventually(lambda: not hub.connections)
        writer.close()


async def test_bytes_sent_on_an_sse_stream_are_dropped_then_the_stream_is_closed(store: Store,
                                                                                redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url)
    async with serve(app) as base:
        hub = app.state.node.hub
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/stream?market=m1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"event: snapshot"), TIMEOUT_S)
        writer.write(b"x" * 1000)  # a little is read and dropped: the stream goes on
        await writer.drain()
        await feed.write(feed.price("m1", "1", 3.3))
        await asyncio.wait_for(reader.readuntil(b"event: delta"), TIMEOUT_S)
        writer.write(b"x" * (SSE_DISCARD_MAX_BYTES + 1))  # too much: closed
        await writer.drain()
        await eventually(lambda: not hub.connections)
        writer.close()


async def test_timer_wheel_runs_each_timer_once_never_early_and_survives_a_failing_callback() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(resolution_s=0.02)
    ran: list[tuple[str, float]] = []
    start = loop.time()

    def note(name: str) -> None:
        ran.append((name, loop.time() - start))

    def boom(_: object) -> None:
        raise RuntimeError("a bug in one callback")

    wheel.call_later(0.15, note, "late")
    wheel.call_later(0.05, note, "early")
    wheel.call_later(0.05, boom, None)
    wheel.call_later(0.0, note, "now")
    assert wheel.pending == 4
    await eventually(lambda: len(ran) == 3, 5)
    assert [name for name, _ in ran] == ["now", "early", "late"]
    due = {"now": 0.0, "early": 0.05, "late": 0.15}
    for name, at in ran:
        assert at >= due[name] - 1e-3  # never before it is due
    assert wheel.pending == 0
    # a timer added from a callback runs too
    wheel.call_later(0.01, lambda _: wheel.call_later(0.01, note, "chained"), None)
    await eventually(lambda: len(ran) == 4, 5)
    assert ran[-1][0] == "chained"


async def _serve_plain(app: Any, **config: Any) -> tuple[Any, asyncio.Task[None], str]:
    import uvicorn

    from streaming.app import StreamingServer

    cfg = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning",
                         timeout_graceful_shutdown=5, **{k: v for k, v in config.items() if k != "ours"})
    server = StreamingServer(cfg, app) if config.get("ours") else uvicorn.Server(cfg)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done())
    assert not task.done()
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"http://127.0.0.1:{port}"


async def test_streams_on_servers_that_do_not_hand_the_socket_over(store: Store, redis_url: str) -> None:
    """h11 on our server (SSE cannot detach) and plain uvicorn (neither can): the writer-task path
    serves the same stream, and the hub's connections have no sink."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    for config in ({"ours": True, "http": "h11"}, {"ours": False}):
        app = make_app(redis_url)
        server, task, base = await _serve_plain(app, **config)
        try:
            hub = app.state.node.hub
            async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c, \
                    c.stream("GET", "/v1/stream?market=m1") as r, \
                    connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
                sse = SSEReader(r)
                await sse.until(lambda e: e.event == "snapshot")
                await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"market": "m1"}}))
                assert json.loads(await ws.recv())["type"] == "ack"
                assert json.loads(await ws.recv())["type"] == "snapshot"
                sinks = {conn.framing.name: conn.sink for conn in hub.connections}
                assert sinks["sse"] is None, config  # SSE: the writer task
                assert (sinks["ws"] is None) == (not config["ours"]), config
                price = 4.4 if config["ours"] else 5.5
                await feed.write(feed.price("m1", "1", price))
                ev = await sse.until(lambda e: e.event == "delta")
                assert ev.data["selections"][0]["price"] == price
                msg = json.loads(await ws.recv())
                assert msg["type"] == "delta" and msg["selections"][0]["price"] == price
                await ws.send(b"\xff")  # not UTF-8: an error, the connection stays
                assert json.loads(await ws.recv())["code"] == "bad_request"
                await ws.send(json.dumps({"op": "ping", "id": 2}))
                assert json.loads(await ws.recv()) == {"type": "pong", "id": 2}
            await eventually(lambda: not hub.connections)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, TIMEOUT_S)


async def test_a_keepalive_ping_whose_write_fails_closes_the_connection(store: Store, redis_url: str,
                                                                         caplog: Any, monkeypatch: Any) -> None:
    """Before, a ping whose write raised ended that socket's pings (the timer wheel logged it)
    and left the connection open and never checked again."""
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url, ws_ping_interval_s=0.2, ws_ping_timeout_s=10.0)
    async with serve(app) as base:
        hub = app.state.node.hub
        reader, writer, frames = await _ws_raw(int(base.rsplit(":", 1)[1]))
        writer.write(_frame(b'{"op":"subscribe","id":1,"filter":{"market":"m1"}}'))
        assert (await frames.message(lambda m: True))["type"] == "ack"
        (conn,) = hub.connections
        sock = conn.sink
        assert isinstance(sock, WebSocketStream)

        def broken(self: WebSocketStream) -> None:
            raise RuntimeError("transport in a state nobody foresaw")
        monkeypatch.setattr(type(sock), "_write_out", broken)  # the idle connection's next write is a ping
        await eventually(lambda: not hub.connections, TIMEOUT_S, "the connection to be closed")
        assert await _ended(reader)  # and the TCP connection ends
        assert "keepalive ping failed" in caplog.text
        writer.close()


async def _ended(reader: asyncio.StreamReader) -> bool:
    """True once the server ended the TCP connection (EOF or reset); fails the test after TIMEOUT_S."""
    try:
        while await asyncio.wait_for(reader.read(65536), TIMEOUT_S):
            pass
    except ConnectionResetError:
        pass
    return True


async def test_a_websocket_that_cannot_be_attached_leaves_no_connection_behind(store: Store, redis_url: str,
                                                                               monkeypatch: Any) -> None:
    """attach() raising — the socket closed at accept (RuntimeError), or a bug (anything else):
    the hub forgets the connection (before, it stayed counted and subscribed to nothing
    forever), and after a bug the client's socket is closed, not left half-attached."""
    for error in (RuntimeError("attach() needs an accepted, open WebSocket"), KeyError("a bug")):
        def failing(self: WebSocketStream, conn: Any, handler: Any, error: Exception = error) -> None:
            raise error
        monkeypatch.setattr(WebSocketStream, "attach", failing)
        app = make_app(redis_url)
        async with serve(app) as base:
            hub = app.state.node.hub
            reader, writer, _ = await _ws_raw(int(base.rsplit(":", 1)[1]))
            await eventually(lambda: sum(hub.connects.values()) >= 1, TIMEOUT_S, "the hub to take the connection")
            await eventually(lambda: not hub.connections, TIMEOUT_S, "the hub to forget the connection")
            if isinstance(error, KeyError):
                assert await _ended(reader)
            writer.close()
