"""The Python floor of fan-out: bare ``asyncio.Protocol`` connections, each
update framed once, ``transport.write`` of every connection's pending frames
once per Redis read (≈ one flush per loop turn), on uvloop.

Peer of ``oddsfeed serve`` in ``benchmarks/fanout.py`` (issue 11): the same
feeder publishes each update (JSON with ``market_id``, ``seq``,
``source_ts``, padded to oddsfeed's delta size) to ``event:<id>`` and
``all`` in Redis; this server reads ``event:*`` through one pub/sub
connection (also a bare protocol, RESP parsed by ``hiredis.Reader``) and
relays:

- ``GET /stream?event=<id>`` (SSE over chunked HTTP/1.1; no ``event`` =
  everything);
- ``GET /ws`` (RFC 6455 handshake, first client message ``{"op":
  "subscribe","filter":{"event":"<id>"}}`` → ``{"type":"ack"}``, then every
  update as an unmasked text frame).

Nothing else: no auth, no resume, no snapshot, no backpressure (a client that
does not read grows its transport buffer), no pings — the least a Python
process can do per delivered frame. :class:`PubSubReader` is shared with the
``websockets.broadcast()`` peer so both pay the same ingest cost.

Run: ``python -m benchmarks.baselines.floor --redis-url URL --port N``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import hiredis

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
            b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n")


def ws_frame(payload: bytes, opcode: int = 0x81) -> bytes:
    """One unmasked server frame (FIN + opcode)."""
    n = len(payload)
    if n < 126:
        return bytes((opcode, n)) + payload
    if n < 65536:
        return bytes((opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((opcode, 127)) + n.to_bytes(8, "big") + payload


def sse_chunk(payload: bytes) -> bytes:
    """``data: …`` SSE event in one HTTP/1.1 chunk."""
    ev = b"data: " + payload + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(ev), ev)


class PubSubReader(asyncio.Protocol):
    """``PSUBSCRIBE event:*`` on one Redis connection; calls ``on_batch`` with
    ``[(event_id, payload)]`` once per read (every message the read held)."""

    def __init__(self, on_batch: Callable[[list[tuple[bytes, bytes]]], None]) -> None:
        self.reader = hiredis.Reader()
        self.on_batch = on_batch
        self.subscribed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$7\r\nevent:*\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        batch = []
        gets = self.reader.gets
        while (msg := gets()) is not False:
            if msg[0] == b"pmessage":
                batch.append((msg[2][6:], msg[3]))  # channel "event:<id>"
            elif msg[0] == b"psubscribe" and not self.subscribed.done():
                self.subscribed.set_result(None)
        if batch:
            self.on_batch(batch)


async def open_reader(redis_url: str, on_batch: Callable[[list[tuple[bytes, bytes]]], None]) -> PubSubReader:
    u = urlsplit(redis_url)
    loop = asyncio.get_running_loop()
    if u.scheme == "unix":
        _, proto = await loop.create_unix_connection(lambda: PubSubReader(on_batch), u.path)
    else:
        _, proto = await loop.create_connection(lambda: PubSubReader(on_batch), u.hostname or "127.0.0.1",
                                                u.port or 6379)
    await asyncio.wait_for(proto.subscribed, 10)
    return proto


class Conn(asyncio.Protocol):
    """One client connection: HTTP request → SSE or WebSocket, then frames."""

    __slots__ = ("hub", "transport", "buf", "ws", "event", "out")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buf = b""
        self.ws = False
        self.event: bytes | None = None
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if self.event is None and not self.ws:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf[-65536:]
                return
            head, buf = buf[:i], buf[i + 4:]
            target = head.split(b" ", 2)[1]
            path, _, query = target.partition(b"?")
            if path == b"/ws":
                key = b""
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"sec-websocket-key":
                        key = value.strip()
                accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
                self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                self.ws = True
            else:
                event = parse_qs(query.decode()).get("event", [""])[0]
                self.transport.write(SSE_HEAD)
                self.hub.add(self, event.encode())
        if self.ws and self.event is None:  # the subscribe message (one masked text frame)
            if len(buf) < 6:
                self.buf = buf
                return
            n = buf[1] & 0x7F
            off = 2
            if n == 126:
                n, off = int.from_bytes(buf[2:4], "big"), 4
            if len(buf) < off + 4 + n:
                self.buf = buf
                return
            mask = buf[off:off + 4]
            payload = bytes(b ^ mask[k % 4] for k, b in enumerate(buf[off + 4:off + 4 + n]))
            msg = json.loads(payload)
            wanted: str = (msg.get("filter") or {}).get("event") or ""
            self.transport.write(ws_frame(json.dumps({"type": "ack", "id": msg.get("id")}).encode()))
            self.hub.add(self, wanted.encode())
            buf = buf[off + 4 + n:]
        self.buf = b""  # later client frames (pongs, close) are ignored: the floor only writes

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.remove(self)


class Hub:
    """event id → connections (``b""`` = everything); frames built once per update."""

    def __init__(self) -> None:
        self.by_event: dict[bytes, set[Conn]] = {}
        self.everything: set[Conn] = set()

    def add(self, conn: Conn, event: bytes) -> None:
        conn.event = event
        (self.by_event.setdefault(event, set()) if event else self.everything).add(conn)

    def remove(self, conn: Conn) -> None:
        if conn.event is not None:
            (self.by_event.get(conn.event, set()) if conn.event else self.everything).discard(conn)

    def on_batch(self, batch: list[tuple[bytes, bytes]]) -> None:
        dirty: set[Conn] = set()
        everything = self.everything
        for event, payload in batch:
            sse = ws = b""
            for group in (self.by_event.get(event, ()), everything):
                for c in group:
                    if c.ws:
                        c.out.append(ws or (ws := ws_frame(payload)))
                    else:
                        c.out.append(sse or (sse := sse_chunk(payload)))
                    dirty.add(c)
        for c in dirty:  # one write per connection per read
            out = c.out
            c.transport.write(out[0] if len(out) == 1 else b"".join(out))
            c.out = []


async def serve(redis_url: str, port: int, host: str = "127.0.0.1") -> None:
    hub = Hub()
    await open_reader(redis_url, hub.on_batch)
    server = await asyncio.get_running_loop().create_server(lambda: Conn(hub), host, port, backlog=16384)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    import uvloop

    uvloop.run(serve(args.redis_url, args.port))


if __name__ == "__main__":
    main()
