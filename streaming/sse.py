"""Server-Sent Events transport: ``GET /v1/stream``.

Query: ``sport``, ``competition``, ``event`` (provider or canonical ``ev:…``
ids), ``market``, ``market_type`` (canonical types or market keys),
``source`` (ingest source names), ``bookmaker``
(comma-separated lists allowed), ``in_play`` (true/false), ``view``
(``deltas``, default, or ``best``: :mod:`streaming.bestview`), ``heartbeat_ms`` (100–300000,
default ``settings.heartbeat_ms``), ``last_event_id`` (resume token; the
``Last-Event-ID`` header wins), ``conflate_ms`` (0 = every change, default;
10–``max_conflate_ms``: changes merged per market per window, flagged
``"conflated": true``), ``odds_format`` (``decimal`` default,
``fractional``, ``american``). Invalid values →
``400 {"error":"bad_request","message":…}``. Tenants (:mod:`streaming.tenants`):
the filter is narrowed to what the credential may see (``403
{"error":"forbidden"}`` when nothing it asked for is visible), and a stream
over the tenant's ``max_connections`` / ``max_subscriptions`` gets ``429
{"error":"too_many_connections" | "too_many_subscriptions"}``.

A new stream first passes the hub's admission (a reconnect storm is set up a
batch per event-loop turn, see :class:`streaming.hub.Admission`).

Response: ``200 text/event-stream`` with ``Cache-Control: no-store`` and
``X-Accel-Buffering: no``; first ``retry: 2000``, then ``snapshot`` (or, when
resuming, ``resumed`` and the missed ``delta`` events or a fresh snapshot)
and the ``event_state`` of each event among its markets, then ``delta`` /
``event_state`` / ``status`` / ``heartbeat`` events as they happen (message
bodies in :mod:`streaming.encoding`). ``id:`` is the resume token; only the
last event of one log entry carries it, never an ``event_state``. On oddsfeed's own server the stream
leaves the ASGI path once the head is written (:mod:`streaming.sockets`,
``oddsfeed.http.detach``): no task per connection; the hub writes everything
queued per loop turn as one chunk — joined into one buffer up to 16 KiB, frames
by reference above that (a replay after a reconnect storm, shared by many
connections, is never copied per connection); a client whose socket stays blocked longer than
``send_timeout_s`` is dropped. On another ASGI server one writer task per
connection does the same through ``send``. A slow consumer that
cannot be helped (see :mod:`streaming.hub`) gets
``event: error`` ``{"code":"slow_consumer",…}`` and the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from streaming.hub import Connection
from streaming.bestview import VIEWS
from streaming.transport import SSE, write_loop
from streaming.odds_format import parse_odds_format
from streaming.responses import json_error, node_of
from streaming.encoding import error_message
from streaming.server import HTTP_DETACH, HTTP_FINAL
from streaming.sockets import SSESocket
from streaming.state import Filter, FilterError
from streaming.tenants import ForbiddenError, Grant, LimitError, Principal, grant_of

if TYPE_CHECKING:
    from streaming.reader import Node

__all__ = ["SSEStream", "parse_heartbeat_ms", "stream"]

logger = logging.getLogger(__name__)

RETRY_MS = 2000
HEARTBEAT_MIN_MS = 100
HEARTBEAT_MAX_MS = 300_000

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


def parse_heartbeat_ms(value: str | None, default: int) -> int:
    """``heartbeat_ms`` query value (ms) or ``default``. Raises FilterError."""
    if value is None or value == "":
        return default
    try:
        ms = int(value)
    except ValueError:
        raise FilterError(f"heartbeat_ms must be an integer number of milliseconds, not {value!r}") from None
    if not HEARTBEAT_MIN_MS <= ms <= HEARTBEAT_MAX_MS:
        raise FilterError(f"heartbeat_ms must be between {HEARTBEAT_MIN_MS} and {HEARTBEAT_MAX_MS}, not {ms}")
    return ms


CONFLATE_MIN_MS = 10


def parse_view(value: object) -> str | None:
    """``view``: absent / ``deltas`` (the delta stream) or ``best`` (best /
    fair price changes, :mod:`streaming.bestview`). Raises FilterError."""
    if value is None or value == "" or value == "deltas":
        return None
    if value in VIEWS:
        return str(value)
    raise FilterError(f"view must be deltas or {' or '.join(VIEWS)}, not {value!r}")


def parse_conflate_ms(value: object, max_ms: int = 120_000) -> int:
    """``conflate_ms``: 0 (every change) or CONFLATE_MIN_MS…``max_ms``. Raises FilterError."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise FilterError("conflate_ms must be an integer number of milliseconds")
    try:
        if not isinstance(value, (int, float, str, bytes)):
            raise TypeError
        ms = int(value)
    except (TypeError, ValueError):
        raise FilterError(f"conflate_ms must be an integer number of milliseconds, not {value!r}") from None
    if isinstance(value, float) and value != ms:
        raise FilterError(f"conflate_ms must be an integer number of milliseconds, not {value!r}")
    if ms == 0:
        return 0
    if not CONFLATE_MIN_MS <= ms <= max_ms:
        raise FilterError(f"conflate_ms must be 0 (every change) or between {CONFLATE_MIN_MS} and {max_ms}, not {ms}")
    return ms


def parse_format(value: object) -> str | None:
    """``odds_format`` → None (decimal), "fractional" or "american". Raises FilterError."""
    try:
        return parse_odds_format(value)
    except ValueError as exc:
        raise FilterError(str(exc)) from None


class SSEStream(Response):
    """The event stream of one client as a raw ASGI response."""

    def __init__(self, node: "Node", f: Filter, *, heartbeat_ms: int, resume: str | None, label: str,
                 conflate_ms: int = 0, fmt: str | None = None, ip: str | None = None, view: str | None = None,
                 principal: Principal | None = None, grant: "Grant | None" = None) -> None:
        self.node = node
        self.principal = principal
        self.grant = grant
        self.filter = f
        self.heartbeat_ms = heartbeat_ms
        self.resume = resume
        self.label = label
        self.conflate_ms = conflate_ms
        self.view = view
        self.fmt = fmt
        self.ip = ip
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        node = self.node
        hub = node.hub
        await hub.admission.enter()  # a reconnect storm is set up a batch per loop turn
        if self.grant is not None and node.tenants is not None:
            grant = node.tenants.current(self.grant)  # the file may have changed (or been pruned) meanwhile
            if grant is None:
                await json_error(503, "tenant_changed", "this credential's tenant configuration changed while "
                                 "the stream was set up; reconnect")(scope, receive, send)
                return
            self.principal = grant.principal
        principal = self.principal
        if principal is not None:  # checked and counted in one step (no await between)
            try:
                principal.admit_connection(subscriptions=1)
            except LimitError as exc:
                await json_error(429, exc.code, str(exc))(scope, receive, send)
                return
        ext = scope.get("extensions") or {}
        detach = (ext.get(HTTP_DETACH) or {}).get("detach")
        sock = SSESocket() if detach is not None else None
        conn = hub.connect(SSE, heartbeat_ms=self.heartbeat_ms, label=self.label, ip=self.ip, sink=sock,
                           principal=principal, reserved_subs=1 if principal is not None else 0)
        if conn.closed:
            await json_error(503, "shutting_down", "the server is shutting down; retry on another node")(
                scope, receive, send)
            return
        if sock is not None and detach is not None:
            await self._detached(conn, sock, detach, send)
            return
        watcher = asyncio.create_task(_watch_disconnect(receive, conn), name=f"sse-disconnect {self.label}")
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"retry: %d\n\n" % RETRY_MS, "more_body": True})
            await hub.subscribe(conn, self.filter, resume=self.resume, conflate_ms=self.conflate_ms, fmt=self.fmt,
                                view=self.view)
            writer = _SSEWriter(send, HTTP_FINAL in ext)
            await write_loop(conn, writer, node.options.send_timeout_s, "stream")
        except OSError:
            conn.close(1006, "connection lost")
        finally:
            watcher.cancel()
            hub.disconnect(conn)

    async def _detached(self, conn: Connection, sock: SSESocket, detach: Callable[[SSESocket], bool],
                        send: Send) -> None:
        """The stream on its own socket (:mod:`streaming.sockets`): the HTTP server
        writes the head and the first chunk, then hands the socket over; the hub
        writes everything after that, with no task for this connection."""
        hub = self.node.hub
        sock.conn = conn
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"retry: %d\n\n" % RETRY_MS, "more_body": True})
        except OSError:
            hub.disconnect(conn)
            return
        if not detach(sock):  # the client went away meanwhile
            conn.close(1006, "connection lost")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        try:
            await hub.subscribe(conn, self.filter, resume=self.resume, conflate_ms=self.conflate_ms, fmt=self.fmt,
                                view=self.view)
        except Exception:  # a bug or a store failure: say so on the stream, never a silent hang
            logger.exception("sse %s: setting up the stream failed", self.label)
            conn.close(1011, "internal error", error_message(
                "internal_error", "the server failed to set up this stream; reconnect"))


async def _watch_disconnect(receive: Receive, conn: Connection) -> None:
    """Close ``conn`` when the client goes away (bounded by the disconnect)."""
    while not conn.closed:
        message = await receive()
        if message["type"] == "http.disconnect":
            conn.close(1000, "client disconnected")
            return


class _SSEWriter:
    """The SSE side of :func:`streaming.transport.write_loop` on an ASGI server
    that cannot detach the socket: frames go out as one body chunk per write;
    ``final``: the server takes a last chunk past flow control
    (``oddsfeed.http.final``) for a client the hub drops."""

    __slots__ = ("send", "final")

    def __init__(self, send: Send, final: bool) -> None:
        self.send = send
        self.final = final

    async def write(self, frames: list[bytes]) -> None:
        await self.send({"type": "http.response.body", "body": frames[0] if len(frames) == 1
                         else b"".join(frames), "more_body": True})

    async def finish(self, conn: Connection) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def last_words(self, conn: Connection) -> None:
        if self.final:
            await self.send({"type": HTTP_FINAL, "body": b"".join(conn.take())})


async def stream(request: Request) -> Response:
    """``GET /v1/stream`` (see the module docstring)."""
    node = node_of(request)
    q = request.query_params
    try:
        f = Filter.parse(sport=q.get("sport"), competition=q.get("competition"), event=q.get("event"),
                         market=q.get("market"), in_play=q.get("in_play"), market_type=q.get("market_type"),
                         source=q.get("source"), bookmaker=q.get("bookmaker"))
        view = parse_view(q.get("view"))
        heartbeat_ms = parse_heartbeat_ms(q.get("heartbeat_ms"), node.settings.heartbeat_ms)
        conflate_ms = parse_conflate_ms(q.get("conflate_ms"), node.options.max_conflate_ms)
        fmt = parse_format(q.get("odds_format"))
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    grant = grant_of(request)
    try:
        f = grant.restrict(f)
    except ForbiddenError as exc:
        return json_error(403, "forbidden", str(exc))
    resume = request.headers.get("last-event-id") or q.get("last_event_id") or None
    client = request.client
    label = f"{client.host}:{client.port}" if client else "?"
    return SSEStream(node, f, heartbeat_ms=heartbeat_ms, resume=resume, label=label, conflate_ms=conflate_ms,
                     fmt=fmt, ip=client.host if client else None, view=view, principal=grant.principal,
                     grant=grant)
