"""Baseline: a live-odds stream as a Python user would write it with the
usual libraries — Starlette + sse-starlette + broadcaster (Redis pub/sub).

The feeder PUBLISHes each update (JSON with market_id, seq, source_ts and the
changed selection) to ``event:<event_id>`` and to ``all``; the app relays:

- ``GET /stream?event=<id>`` (SSE, sse-starlette's ``EventSourceResponse``),
  no ``event`` = everything;
- ``GET /ws`` (WebSocket): the first client message ``{"op":"subscribe",
  "filter":{"event":"<id>"}}``, then every update as a text frame.

No resume, no snapshot, no conflation, no slow-consumer policy (broadcaster
queues are unbounded): the simplest correct relay. Install with
``pip install sse-starlette broadcaster`` (the ``bench`` extra).

Run: ``python -m benchmarks.baselines.starlette_broadcaster --redis-url URL --port N``
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from broadcaster import Broadcast
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


def create_app(redis_url: str) -> Starlette:
    broadcast = Broadcast(redis_url)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broadcast.connect()
        # Workaround (broadcaster 0.3.1 with redis-py ≥ 7): its listener task enters
        # ``pubsub.listen()`` before the first SUBSCRIBE has completed, finds no subscription,
        # returns and waits for a "ready" event that only the *next* subscribe sets — so the
        # first subscriber never gets a message. Keep one channel subscribed, then wake it.
        backend = broadcast._backend
        await backend.subscribe("__keepalive__")
        await asyncio.sleep(0.05)
        backend._ready.set()  # type: ignore[attr-defined]
        yield
        await broadcast.disconnect()

    # Workaround 2: two first subscriptions to one channel at the same time race in
    # ``Broadcast.subscribe`` (both see no subscriber, the second replaces the first's queue,
    # which then never gets a message and raises KeyError on exit). Serialise entering it.
    lock = asyncio.Lock()

    @asynccontextmanager
    async def subscribe(channel: str) -> AsyncIterator[Any]:
        cm = broadcast.subscribe(channel=channel)
        async with lock:
            subscriber = await cm.__aenter__()
        try:
            yield subscriber
        finally:
            await cm.__aexit__(None, None, None)

    async def stream(request: Request) -> EventSourceResponse:
        event = request.query_params.get("event")
        channel = f"event:{event}" if event else "all"

        async def events() -> AsyncIterator[dict[str, str]]:
            async with subscribe(channel) as subscriber:
                async for ev in subscriber:
                    yield {"event": "delta", "data": ev.message}

        return EventSourceResponse(events())

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            msg = json.loads(await websocket.receive_text())
            event = (msg.get("filter") or {}).get("event")
            channel = f"event:{event}" if event else "all"
            async with subscribe(channel) as subscriber:
                await websocket.send_text(json.dumps({"type": "ack", "id": msg.get("id")}))
                async for ev in subscriber:
                    await websocket.send_text(ev.message)
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[Route("/stream", stream), WebSocketRoute("/ws", ws)], lifespan=lifespan)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(create_app(args.redis_url), host="127.0.0.1", port=args.port, log_level="warning",
                backlog=16384, ws_per_message_deflate=False)


if __name__ == "__main__":
    main()
