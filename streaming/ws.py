"""WebSocket transport: ``GET /v1/ws`` (JSON text frames).

Query: ``heartbeat_ms`` (100–300000, default ``settings.heartbeat_ms``),
``odds_format`` (default for every subscription of the connection).
``Origin`` must be in ``settings.allowed_origins`` when that is non-empty
and the request has one (Starlette's CORS does not cover WebSockets; a
request without Origin is not from a browser and passes); otherwise the
handshake is refused (403). Tenants (:mod:`streaming.tenants`): a
connection over the tenant's ``max_connections`` is refused with ``429
{"error":"too_many_connections"}``; each subscription's filter is narrowed to
what the credential may see (``error {code:"forbidden"}`` when nothing it
asked for is visible) and counts against ``max_subscriptions`` (``error
{code:"too_many_subscriptions"}``); when the tenant's entry changes the
connection gets ``error {code:"tenant_changed"}`` and a 1012 close (reconnect).

Client → server (one JSON object per text frame, at most
``ws_max_message_bytes``, 64 KiB)::

    {"op":"subscribe","id":1,"filter":{"sport":…,"competition":…,"event":…,"market":…,"market_type":…,
     "in_play":…,"source":…,"bookmaker":…}, "resume":"<token>"?, "conflate_ms":0?, "odds_format":"decimal"|"fractional"|"american"?,
     "view":"deltas"|"best"?}
    {"op":"unsubscribe","id":2,"sub":1}
    {"op":"ping","id":3}

Server → client: ``{"type":"ack","id":1,"sub":1}`` (subscribe; then the
subscription's ``snapshot`` or ``resumed`` …), ``{"type":"ack","id":2,"sub":1}``
(unsubscribe), ``{"type":"pong","id":3}``, and every stream message of
:mod:`streaming.encoding` with ``"sub"`` first and ``"token"`` (the resume
token of that subscription: on a delta that is not the last of its log
entry, the token from before the entry). Filter values: strings
(comma-separated lists allowed) or lists of strings; ``in_play`` a bool.

Client messages are decoded with a typed decoder (:class:`ClientOp`), never
into untyped objects: unknown fields are refused, and JSON nested deeper
than the types allow is refused at the first level that does not fit (a
``RecursionError`` from the parser is caught too). A bad message (not JSON,
not UTF-8, not an object, unknown op or field, wrong type, bad filter,
nested ``[[[[…]]]]`` anywhere …) gets
``{"type":"error","code":"bad_request","message":"<what to fix>","id":…}``
(``id`` when it could be read) and the connection stays open. A message over
the limit closes it (1009). A message the server fails to handle (a bug)
gets ``error {code: "internal_error"}`` and a close frame (1011), never a
silent drop.
Close codes: 1001 server shutting down, 1008 policy (origin, auth, send
deadline), 1009 message too big, 1011 keepalive ping timeout (no pong within
``ws_ping_timeout_s``) or an internal error, 4008 slow consumer (after an ``error`` with code
``slow_consumer``).

Writes: on oddsfeed's own server the connection leaves the ASGI path once
accepted (:mod:`streaming.sockets`): every message is a pre-built WebSocket
frame (built once per node), all frames queued per loop turn go out in ONE
socket write, and there is no task per connection (client messages are
handled in order by a task that exists only while messages wait). On any
other ASGI server a writer and a reader task per connection send one
``websocket.send`` per message. Either way a client whose socket stays
blocked longer than ``send_timeout_s`` is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from streaming.auth import deny_websocket
from streaming.encoding import ack_message, error_message, pong_message
from streaming.hub import Connection
from streaming.responses import node_of
from streaming.queryparams import query_check
from streaming.sockets import WS_ATTACH, WebSocketStream
from streaming.sse import parse_conflate_ms, parse_format, parse_heartbeat_ms, parse_view
from streaming.state import Filter, FilterError
from streaming.tenants import ANONYMOUS, ForbiddenError, Grant, LimitError, grant_of
from streaming.transport import WS_FRAMES, WS_PAYLOADS, write_loop

if TYPE_CHECKING:
    from streaming.reader import Node

__all__ = ["ClientOp", "FilterSpec", "Ping", "Subscribe", "Unsubscribe", "decode_op", "handle_message",
           "websocket_endpoint"]

logger = logging.getLogger(__name__)

FILTER_FIELDS = ("sport", "competition", "event", "market", "market_type", "in_play", "source", "bookmaker")


class _WebSocketApp:
    """``GET /v1/ws`` as a raw ASGI app (the scope's extensions say whether the
    server hands the socket over: :data:`streaming.sockets.WS_ATTACH`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _session(WebSocket(scope, receive, send))


websocket_endpoint = _WebSocketApp()


async def _session(websocket: WebSocket) -> None:
    """One WebSocket connection (see the module docstring)."""
    node = node_of(websocket)
    await node.hub.admission.enter()  # a reconnect storm is set up a batch per loop turn
    settings = node.settings
    allowed = settings.allowed_origins
    origin = websocket.headers.get("origin")
    if allowed and origin is not None and origin not in allowed:
        logger.info("ws refused: origin %r not allowed", origin)
        await websocket.close(code=1008, reason="origin not allowed")
        return
    try:
        problem = query_check().problem("GET", "/v1/ws", websocket.scope.get("query_string", b""))
        if problem is not None:
            raise FilterError(problem)
        heartbeat_ms = parse_heartbeat_ms(websocket.query_params.get("heartbeat_ms"), settings.heartbeat_ms)
        fmt = parse_format(websocket.query_params.get("odds_format"))
    except FilterError as exc:
        await websocket.accept()
        await websocket.send_text(error_message("bad_request", str(exc)).json.decode())
        await websocket.close(code=1008, reason="bad query")
        return
    grant = grant_of(websocket)
    if node.tenants is not None:
        current = node.tenants.current(grant)  # the file may have changed (or been pruned) during admission
        if current is None:
            await deny_websocket(websocket.scope, websocket.send, 503, "tenant_changed",
                                 "this credential's tenant configuration changed while the connection was set up; "
                                 "reconnect")
            return
        grant = current
    principal = grant.principal
    if principal is not None:
        try:
            principal.admit_connection()
        except LimitError as exc:
            await deny_websocket(websocket.scope, websocket.send, 429, exc.code, str(exc))
            return
    try:
        await websocket.accept()
    except BaseException:
        if principal is not None:
            principal.release()
        raise
    client = websocket.client
    label = f"{client.host}:{client.port}" if client else "?"
    sock: WebSocketStream | None = (websocket.scope.get("extensions", {}).get(WS_ATTACH) or {}).get("socket")
    conn = node.hub.connect(WS_FRAMES if sock is not None else WS_PAYLOADS, heartbeat_ms=heartbeat_ms, label=label,
                            ip=client.host if client else None, sink=sock, principal=principal)
    if conn.closed:
        await websocket.close(code=1001, reason="server shutting down")
        return
    if sock is not None:  # the connection leaves the ASGI path: the hub writes to the socket
        handler = _Messages(conn, node, fmt, grant)
        try:
            sock.attach(conn, handler.message)
        except RuntimeError:  # the socket closed between accept and attach: the connection ends here
            logger.info("ws %s: closed before it could be attached", label)
            node.hub.disconnect(conn)
        except Exception:  # a bug: the client must not be left half-attached
            logger.exception("ws %s: attaching the socket failed; closing it", label)
            node.hub.disconnect(conn)
            sock.abort()
        return
    writer = asyncio.create_task(
        write_loop(conn, _WSWriter(websocket), node.options.send_timeout_s, "connection",
                   (WebSocketDisconnect, RuntimeError, OSError)), name=f"ws-writer {label}")
    reader = asyncio.create_task(_read_loop(conn, websocket, node, fmt, grant), name=f"ws-reader {label}")
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


class _WSWriter:
    """The WebSocket side of :func:`streaming.transport.write_loop` on an ASGI
    server that does not hand the socket over: one ``websocket.send`` per
    message, under the hub's send deadline."""

    __slots__ = ("websocket",)

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def write(self, frames: list[bytes]) -> None:
        for f in frames:
            await self.websocket.send({"type": "websocket.send", "text": f.decode()})

    async def finish(self, conn: Connection) -> None:
        await self.websocket.close(code=conn.close_code, reason=conn.close_reason[:120])

    async def last_words(self, conn: Connection) -> None:
        await asyncio.wait_for(self.websocket.close(code=conn.close_code, reason=conn.close_reason[:120]), 1.0)


class _Messages:
    """Client messages of an attached connection (:mod:`streaming.sockets`),
    handed over one at a time, in order."""

    __slots__ = ("conn", "node", "fmt", "grant")

    def __init__(self, conn: Connection, node: "Node", fmt: str | None, grant: Grant = ANONYMOUS) -> None:
        self.conn = conn
        self.node = node
        self.fmt = fmt
        self.grant = grant

    async def message(self, data: bytes, is_text: bool) -> None:
        text = _text(self.conn, data, self.node.options.ws_max_message_bytes)
        if text is not None:
            await _handle(self.conn, self.node, text, self.fmt, self.grant)


def _text(conn: Connection, data: bytes, max_bytes: int) -> str | None:
    """One client message's text, or None when it was answered instead: over
    ``max_bytes`` (an error and a 1009 close: the connection is closed) or not
    UTF-8 (an error; the connection stays)."""
    if len(data) > max_bytes:
        _too_big(conn, len(data), max_bytes)
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        conn.send(error_message("bad_request", "send JSON text (UTF-8)"))
        return None


async def _handle(conn: Connection, node: "Node", text: str, fmt: str | None, grant: Grant = ANONYMOUS) -> bool:
    """One client message; False when it closed the connection (a bug: 1011)."""
    try:
        await handle_message(conn, node, text, fmt, grant)
    except Exception:  # a bug, not the client's fault: say so and close with a close frame
        logger.exception("ws %s: handling a client message failed", conn.label)
        conn.close(1011, "internal error", error_message(
            "internal_error", "the server failed to handle that message; reconnect"))
        return False
    return True


async def _read_loop(conn: Connection, websocket: WebSocket, node: "Node", fmt: str | None = None,
                     grant: Grant = ANONYMOUS) -> None:
    """Handle client messages until the client disconnects or the
    connection closes. While the client leaves more control messages
    unread than its byte budget, its next message is not read (it cannot
    make the server queue without bound)."""
    max_bytes = node.options.ws_max_message_bytes
    try:
        while not conn.closed:
            drained = conn.drained
            assert drained is not None  # a writer-task connection
            while conn.control_bytes > conn.max_bytes and not conn.closed:
                drained.clear()
                await drained.wait()
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                conn.close(1000, "client disconnected")
                return
            raw = message.get("text")
            text = _text(conn, raw.encode() if raw is not None else message.get("bytes") or b"", max_bytes)
            if text is None:
                if conn.closed:
                    return
                continue
            if not await _handle(conn, node, text, fmt, grant):
                return
    except (WebSocketDisconnect, RuntimeError, OSError):
        conn.close(1006, "connection lost")


def _too_big(conn: Connection, n: int, max_bytes: int) -> None:
    conn.close(1009, "message too big", error_message(
        "message_too_big", f"messages are limited to {max_bytes} bytes, got {n}"))


class _Op(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """A client → server message: a tagged union on ``op``, decoded with a typed
    decoder (never into untyped Python objects, so no client can make the server
    recurse: nesting is refused at the first level that does not fit these types).
    Unknown fields are refused (our own API: a typo should not pass silently)."""

    id: int | str | None = None


FilterValue = str | list[str] | bool | int | float | None


class FilterSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A subscription's filter as sent (checked by :meth:`streaming.state.Filter.parse`)."""

    sport: FilterValue = None
    competition: FilterValue = None
    event: FilterValue = None
    market: FilterValue = None
    market_type: FilterValue = None
    in_play: FilterValue = None
    source: FilterValue = None
    bookmaker: FilterValue = None


class Subscribe(_Op, tag="subscribe"):
    """``{"op":"subscribe","id","filter"?,"resume"?,"conflate_ms"?,"odds_format"?,"view"?}``."""

    filter: FilterSpec | None = None
    resume: str | None = None
    conflate_ms: int | float | str | None = None
    odds_format: str | None | msgspec.UnsetType = msgspec.UNSET
    view: str | None = None


class Unsubscribe(_Op, tag="unsubscribe"):
    """``{"op":"unsubscribe","id","sub"}``."""

    sub: int | None = None


class Ping(_Op, tag="ping"):
    """``{"op":"ping","id"}``."""


ClientOp = Subscribe | Unsubscribe | Ping
OPS = ("subscribe", "unsubscribe", "ping")


class _IdOnly(msgspec.Struct):
    id: int | str | None = None


_OP_DECODER: msgspec.json.Decoder[ClientOp] = msgspec.json.Decoder(ClientOp)
_ID_DECODER = msgspec.json.Decoder(_IdOnly)
_OP_FIELDS = ", ".join(dict.fromkeys(("op", *Subscribe.__struct_fields__, *Unsubscribe.__struct_fields__)))
assert tuple(FilterSpec.__struct_fields__) == FILTER_FIELDS
_EXAMPLE = '{"op":"subscribe","id":1,"filter":{"sport":"soccer"}}'
#: what to fix, by the JSON path msgspec names in a validation error
_FIELD_HINTS = {
    "$": "message must be a JSON object with an \"op\" field, like " + _EXAMPLE,
    "$.op": "\"op\" must be a string: subscribe, unsubscribe or ping",
    "$.id": "\"id\" must be an integer or a string",
    "$.filter": "\"filter\" must be an object with any of " + ", ".join(FILTER_FIELDS)
                + " (values: strings, lists of strings, or a bool for in_play)",
    "$.resume": "\"resume\" must be the token string of a previous message",
    "$.conflate_ms": "conflate_ms must be an integer number of milliseconds",
    "$.odds_format": "odds_format must be decimal, fractional or american",
    "$.sub": "\"sub\" must be the integer id from the subscribe ack",
    "$.view": "view must be deltas or best",
}


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's validation error as what the client should fix."""
    text = str(exc)
    if text.startswith("Invalid value") and text.endswith("- at `$.op`"):
        value = text[len("Invalid value "):].partition(" - at")[0]
        return f"unknown op {value}; use {', '.join(OPS[:-1])} or {OPS[-1]}"
    if text.startswith("Object contains unknown field"):
        field = text.split("`")[1] if "`" in text else "?"
        where = text.partition(" - at `")[2].rstrip("`")
        if where == "$.filter":
            return f"unknown filter field(s) {field}; use " + ", ".join(FILTER_FIELDS)
        return f"unknown field {field!r}; a message has only {_OP_FIELDS}"
    path = text.partition(" - at `")[2].rstrip("`") or "$"
    top = path if path == "$" else "$." + path[2:].replace("[", ".").split(".")[0]
    hint = _FIELD_HINTS.get(top)
    return f"{hint} ({text})" if hint else text


def decode_op(text: str | bytes) -> ClientOp | tuple[str, int | str | None]:
    """One client message → ClientOp, or (what to fix, the message's id if it has a readable one).

    Never raises: invalid JSON, invalid UTF-8, wrong types and nesting too deep for any parser
    (RecursionError) all come back as a message for an ``error {code: "bad_request"}``."""
    try:
        return _OP_DECODER.decode(text)
    except msgspec.ValidationError as exc:
        why = _explain(exc)
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: invalid UTF-8
        return (f"message is not valid JSON ({exc}); send one JSON object like "
                "{\"op\":\"ping\",\"id\":1}", None)
    except RecursionError:
        return ("message nests too deeply; send one flat JSON object like " + _EXAMPLE, None)
    try:
        mid = _ID_DECODER.decode(text).id
    except (msgspec.DecodeError, ValueError, RecursionError):
        mid = None
    return why, mid


async def handle_message(conn: Connection, node: "Node", text: str, fmt: str | None = None,
                         grant: Grant = ANONYMOUS) -> None:
    """One client message → ack/pong/error and hub calls; ``grant``: what the connection's
    credential may see and its tenant's limits (:mod:`streaming.tenants`)."""
    op = decode_op(text)
    if isinstance(op, tuple):
        why, mid = op
        conn.send(error_message("bad_request", why, id=mid))
        return
    mid = op.id
    hub = node.hub
    if isinstance(op, Ping):
        conn.send(pong_message(mid))
    elif isinstance(op, Subscribe):
        spec = op.filter or FilterSpec()
        try:
            f = Filter.parse(**msgspec.structs.asdict(spec))
            conflate_ms = parse_conflate_ms(op.conflate_ms, node.options.max_conflate_ms)
            sub_fmt = fmt if op.odds_format is msgspec.UNSET else parse_format(op.odds_format)
            view = parse_view(op.view)
        except (FilterError, TypeError) as exc:
            conn.send(error_message("bad_request", str(exc), id=mid))
            return
        if len(conn.subs) >= node.options.max_subscriptions:
            conn.send(error_message("bad_request", f"at most {node.options.max_subscriptions} subscriptions per "
                                    "connection; unsubscribe one first", id=mid))
            return
        try:
            f = grant.restrict(f)
            if conn.principal is not None:
                conn.principal.admit_subscription()
        except ForbiddenError as exc:
            conn.send(error_message("forbidden", str(exc), id=mid))
            return
        except LimitError as exc:
            conn.send(error_message(exc.code, str(exc), id=mid))
            return
        await hub.subscribe(conn, f, resume=op.resume or None, ack_id=mid, conflate_ms=conflate_ms, fmt=sub_fmt,
                            view=view)
    else:
        sub = op.sub
        if sub is None:
            conn.send(error_message("bad_request", "\"sub\" must be the integer id from the subscribe ack", id=mid))
            return
        if hub.unsubscribe(conn, sub):
            conn.send(ack_message(mid, sub))
        else:
            conn.send(error_message("bad_request", f"no subscription {sub} on this connection", id=mid))
