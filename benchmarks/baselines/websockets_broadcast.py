"""Peer: the `websockets` library's own fan-out, ``websockets.broadcast()``.

A ``websockets.asyncio.server.serve`` server (no compression, default
keepalive) on uvloop; updates come from Redis through the floor's
:class:`~benchmarks.baselines.floor.PubSubReader` (same ingest cost as the
floor), each one passed once to ``broadcast()`` for the connections of its
event plus those on everything. WebSocket only: ``/ws``, first message
``{"op":"subscribe","filter":{"event":"<id>"}}`` → ``{"type":"ack"}``.

No backpressure (as documented for ``broadcast()``: slow clients are dropped
by the keepalive), no resume, no snapshot.

Run: ``python -m benchmarks.baselines.websockets_broadcast --redis-url URL --port N``
"""

from __future__ import annotations

import argparse
import json

from websockets.asyncio.server import ServerConnection, broadcast, serve

from benchmarks.baselines.floor import open_reader


async def run(redis_url: str, port: int, host: str = "127.0.0.1") -> None:
    by_event: dict[str, set[ServerConnection]] = {}
    everything: set[ServerConnection] = set()

    def on_batch(batch: list[tuple[bytes, bytes]]) -> None:
        for event, payload in batch:
            conns = by_event.get(event.decode())
            broadcast(everything.union(conns) if conns else everything, payload, text=True)

    async def handler(ws: ServerConnection) -> None:
        msg = json.loads(await ws.recv())
        event = (msg.get("filter") or {}).get("event") or ""
        group = by_event.setdefault(event, set()) if event else everything
        await ws.send(json.dumps({"type": "ack", "id": msg.get("id")}))
        group.add(ws)
        try:
            await ws.wait_closed()
        finally:
            group.discard(ws)

    await open_reader(redis_url, on_batch)
    async with serve(handler, host, port, compression=None, backlog=16384, max_size=64 * 1024) as server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    import uvloop

    uvloop.run(run(args.redis_url, args.port))


if __name__ == "__main__":
    main()
