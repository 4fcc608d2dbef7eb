"""WebSocket transport: ``GET /v1/ws`` (JSON text frames).

Query: ``heartbeat_ms`` (100–300000, default ``settings.heartbeat_ms``).
``Origin`` must be in ``settings.allowed_origins`` when that is non-empty
(Starlette's CORS does not cover WebSockets); otherwise the handshake is
refused (403).

Client → server (one JSON object per text frame, at most 64 KiB)::

    {"op":"subscribe","id":1,"filter":{"sport":…,"competition":…,"event":…,"market":…,"in_play":…},
     "resume":"<token>"?, "conflate_ms":0?}
    {"op":"unsubscribe","id":2,"sub":1}
    {"op":"ping","id":3}

Server → client: ``{"type":"ack","id":1,"sub":1}`` (subscribe; then the
subscription's ``snapshot`` or ``resumed`` …), ``{"type":"ack","id":2,"sub":1}``
(unsubscribe), ``{"type":"pong","id":3}``, and every stream message of
:mod:`streaming.encoding` with ``"sub"`` first and, on the last message of
a log entry and on snapshots/heartbeats/status, ``"token"`` (the resume
token of that subscription). Filter values: strings (comma-separated lists
allowed) or lists of strings; ``in_play`` a bool.

A bad message (not JSON, not an object, unknown op, bad filter …) gets
``{"type":"error","code":"bad_request","message":"<what to fix>","id":…}``
and the connection stays open. A message over 64 KiB closes it (1009).
The writer task sends everything queued per wake-up back to back under one
deadline (``send_timeout_s``); a stuck client is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from streaming.encoding import ack_message, error_message, pong_message
from streaming.hub import Connection
from streaming.rest import node_of
from streaming.sse import parse_conflate_ms, parse_heartbeat_ms
from streaming.state import Filter, FilterError

if TYPE_CHECKING:
    from streaming.reader import Node

__all__ = ["websocket_endpoint"]

logger = logging.getLogger(__name__)

FILTER_FIELDS = ("sport", "competition", "event", "market", "in_play")
_DECODER = msgspec.json.Decoder()


async def websocket_endpoint(websocket: WebSocket) -> None:
    """``GET /v1/ws`` (see the module docstring)."""
    node = node_of(websocket)
    settings = node.settings
    allowed = settings.allowed_origins
    if allowed and websocket.headers.get("origin") not in allowed:
        logger.info("ws refused: origin %r not allowed", websocket.headers.get("origin"))
        await websocket.close(code=1008, reason="origin not allowed")
        return
    try:
        heartbeat_ms = parse_heartbeat_ms(websocket.query_params.get("heartbeat_ms"), settings.heartbeat_ms)
    except FilterError as exc:
        await websocket.accept()
        await websocket.send_text(error_message("bad_request", str(exc)).json.decode())
        await websocket.close(code=1008, reason="bad query")
        return
    await websocket.accept()
    client = websocket.client
    label = f"{client.host}:{client.port}" if client else "?"
    conn = node.hub.connect("ws", heartbeat_ms=heartbeat_ms, label=label)
    if conn.closed:
        await websocket.close(code=1001, reason="server shutting down")
        return
    writer = asyncio.create_task(_write_loop(conn, websocket, node.options.send_timeout_s), name=f"ws-writer {label}")
    reader = asyncio.create_task(_read_loop(conn, websocket, node), name=f"ws-reader {label}")
    try:
        done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        if reader in done and not writer.done():
            # client went away (or sent something too big): let the writer flush a final error, briefly
            try:
                await asyncio.wait_for(asyncio.shield(writer), 1.0)
            except (asyncio.TimeoutError, Exception):
                pass
    finally:
        for t in (writer, reader):
            t.cancel()
        await asyncio.gather(writer, reader, return_exceptions=True)
        node.hub.disconnect(conn)


async def _write_loop(conn: Connection, websocket: WebSocket, timeout_s: float) -> None:
    """Drain the outbox (one message per text frame, all queued ones back
    to back under one deadline) until the connection closes; then close."""
    try:
        while True:
            await conn.wait()
            frames = conn.take()
            if frames:
                async with asyncio.timeout(timeout_s):
                    for f in frames:
                        conn.sent_bytes += len(f)
                        await websocket.send({"type": "websocket.send", "text": f.decode()})
            elif conn.closed:
                break
        await websocket.close(code=conn.close_code, reason=conn.close_reason[:120])
    except TimeoutError:
        logger.warning("ws %s: write missed the %.1f s deadline; dropping the client", conn.label, timeout_s)
        conn.close(1008, "send deadline")
        try:
            await asyncio.wait_for(websocket.close(code=1008, reason="send deadline"), 1.0)
        except Exception:
            pass
    except (WebSocketDisconnect, RuntimeError, OSError):
        conn.close(1006, "connection lost")


async def _read_loop(conn: Connection, websocket: WebSocket, node: "Node") -> None:
    """Handle client messages until the client disconnects or the
    connection closes."""
    max_bytes = node.options.ws_max_message_bytes
    try:
        while not conn.closed:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                conn.close(1000, "client disconnected")
                return
            text = message.get("text")
            if text is None:
                data = message.get("bytes") or b""
                if len(data) > max_bytes:
                    _too_big(conn, len(data), max_bytes)
                    return
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    conn.send(error_message("bad_request", "send JSON text (UTF-8)"))
                    continue
            elif len(text) > max_bytes or len(text.encode()) > max_bytes:
                _too_big(conn, len(text.encode()), max_bytes)
                return
            await handle_message(conn, node, text)
    except (WebSocketDisconnect, RuntimeError, OSError):
        conn.close(1006, "connection lost")


def _too_big(conn: Connection, n: int, max_bytes: int) -> None:
    conn.close(1009, "message too big", error_message(
        "message_too_big", f"messages are limited to {max_bytes} bytes, got {n}"))


async def handle_message(conn: Connection, node: "Node", text: str) -> None:
    """One client message → ack/pong/error and hub calls."""
    try:
        obj: Any = _DECODER.decode(text)
    except msgspec.DecodeError as exc:
        conn.send(error_message("bad_request", f"message is not valid JSON ({exc}); send one JSON object "
                                               "like {\"op\":\"ping\",\"id\":1}"))
        return
    if not isinstance(obj, dict):
        conn.send(error_message("bad_request", "message must be a JSON object with an \"op\" field"))
        return
    mid = obj.get("id")
    if mid is not None and (isinstance(mid, bool) or not isinstance(mid, (int, str))):
        conn.send(error_message("bad_request", "\"id\" must be an integer or a string"))
        return
    op = obj.get("op")
    hub = node.hub
    if op == "ping":
        conn.send(pong_message(mid))
    elif op == "subscribe":
        filt = obj.get("filter", {})
        if filt is None:
            filt = {}
        if not isinstance(filt, dict):
            conn.send(error_message("bad_request", "\"filter\" must be an object with any of "
                                    + ", ".join(FILTER_FIELDS), id=mid))
            return
        unknown = sorted(set(filt) - set(FILTER_FIELDS))
        if unknown:
            conn.send(error_message("bad_request", f"unknown filter field(s) {', '.join(unknown)}; use "
                                    + ", ".join(FILTER_FIELDS), id=mid))
            return
        resume = obj.get("resume")
        if resume is not None and not isinstance(resume, str):
            conn.send(error_message("bad_request", "\"resume\" must be the token string of a previous message",
                                    id=mid))
            return
        try:
            f = Filter.parse(**filt)
            parse_conflate_ms(obj.get("conflate_ms"))
        except (FilterError, TypeError) as exc:
            conn.send(error_message("bad_request", str(exc), id=mid))
            return
        if len(conn.subs) >= node.options.max_subscriptions:
            conn.send(error_message("bad_request", f"at most {node.options.max_subscriptions} subscriptions per "
                                    "connection; unsubscribe one first", id=mid))
            return
        await hub.subscribe(conn, f, resume=resume or None, ack_id=mid)
    elif op == "unsubscribe":
        sub = obj.get("sub")
        if isinstance(sub, bool) or not isinstance(sub, int):
            conn.send(error_message("bad_request", "\"sub\" must be the integer id from the subscribe ack", id=mid))
            return
        if hub.unsubscribe(conn, sub):
            conn.send(ack_message(mid, sub))
        else:
            conn.send(error_message("bad_request", f"no subscription {sub} on this connection", id=mid))
    else:
        conn.send(error_message("bad_request", f"unknown op {op!r}; use subscribe, unsubscribe or ping", id=mid))
