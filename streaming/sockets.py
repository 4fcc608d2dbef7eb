"""Streams that own their sockets: SSE and WebSocket connections off the ASGI path.

A stream request is authenticated and accepted on the ASGI path (Starlette
routing, :mod:`streaming.auth`, the query checks of :mod:`streaming.sse` /
:mod:`streaming.ws`). Then the connection leaves it: the socket's asyncio
protocol becomes a slotted object of this module that the hub writes to
directly (:class:`streaming.transport.Sink`) — no task, no asyncio Event, no
ASGI message per write, no per-connection objects of the HTTP server left.
The hub appends pre-built frames to the connection's outbox, and one flush
per event-loop turn (:meth:`streaming.hub.Hub.flush`) writes each ready
connection's frames in one write: joined into one buffer up to
:data:`JOIN_MAX_BYTES`, else with ``transport.writelines`` (by reference). Flow
control is the transport's own: ``pause_writing`` / ``resume_writing``
pause and resume the connection (:meth:`~streaming.hub.Connection.pause`),
and while it is paused its outbox grows against the byte budget and the
slow-consumer ladder of :mod:`streaming.hub` applies unchanged. Deadlines
(send deadline, WebSocket keepalive ping and pong, close grace) come from
the hub's one :class:`~streaming.timers.TimerWheel`.

- :class:`SSESocket` — after ``200 text/event-stream`` and its first chunk
  were written by the HTTP server, :mod:`streaming.server`'s detach seam
  (``oddsfeed.http.detach``) hands it the transport
  (``transport.set_protocol``). It frames each write as one chunk of the
  chunked body; ends with the last chunk (``0\\r\\n\\r\\n``) and a close.
  Bytes a client sends on an SSE connection are read and dropped (at most
  :data:`SSE_DISCARD_MAX_BYTES`, then the connection is closed).
- :class:`WebSocketStream` — the server's WebSocket protocol (given to
  uvicorn as its ``ws`` protocol class by :func:`streaming.server.install`):
  ``websockets``' sans-I/O :class:`~websockets.server.ServerProtocol` for the
  opening handshake, frames, pings, pongs and the closing handshake. The
  handshake runs the ASGI app as any ASGI WebSocket server would
  (``websocket.connect`` / ``accept`` / ``close`` → 403 / ``send``, and the
  ``websocket.http.response`` extension), so authentication and the Origin
  check stay in the app. An app that wants the socket attaches it
  (:meth:`WebSocketStream.attach`, offered as the ASGI scope extension
  :data:`WS_ATTACH`): from then on the hub writes complete frames built once
  per node, client messages go to the app's handler in order (a task only
  while messages are waiting), and keepalive pings are sent every
  ``ws_ping_interval`` — no pong within ``ws_ping_timeout`` closes with
  1011. While a client leaves more control messages unread than its byte
  budget, or :data:`WS_INBOX_MAX` of its messages wait, its socket is not
  read (TCP backpressure).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import os
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, Protocol, Side, State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from streaming.hub import Connection

__all__ = ["CLOSE_TIMEOUT_S", "FINAL_GRACE_S", "SSESocket", "SSE_DISCARD_MAX_BYTES", "WS_ATTACH", "WS_INBOX_MAX",
           "WebSocketStream", "finish_transport"]

logger = logging.getLogger(__name__)

#: ASGI scope extension of :class:`WebSocketStream`: ``{"socket": <the WebSocketStream>}``
WS_ATTACH = "oddsfeed.ws.attach"
#: seconds a closed connection may take to drain its last bytes before it is aborted
FINAL_GRACE_S = 2.0
#: seconds the server waits for the client's close frame after sending its own
CLOSE_TIMEOUT_S = 5.0
#: bytes a client may send on an SSE connection (dropped) before it is closed
SSE_DISCARD_MAX_BYTES = 64 * 1024
#: client messages waiting to be handled before the socket stops being read
WS_INBOX_MAX = 16
#: a write of at most this many bytes is joined into one buffer (one ``write``: for uvloop ~6 %
#: cheaper than a ``writev`` of the frames, measured); a bigger one (a snapshot) goes by reference
JOIN_MAX_BYTES = 16 * 1024

_WS_LOGGER = logging.getLogger("websockets.server")


def finish_transport(loop: asyncio.AbstractEventLoop, transport: Any) -> None:
    """Close ``transport``; abort it if its buffer has not drained within :data:`FINAL_GRACE_S`."""
    transport.close()

    def abort() -> None:
        try:
            if transport.get_write_buffer_size():
                transport.abort()
        except Exception:  # already gone
            pass
    loop.call_later(FINAL_GRACE_S, abort)


class SSESocket(asyncio.Protocol):
    """The socket of one SSE stream after the response head (see the module docstring).

    Made by :mod:`streaming.sse` and handed to the server's detach seam, which
    calls :meth:`attached`. ``release``: called once when the socket closes
    (the server's per-IP slot); ``connections``: the server's set of open
    connections (graceful shutdown waits for it to empty).
    """

    __slots__ = ("transport", "conn", "release", "connections", "discarded", "loop")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn: "Connection | None" = None
        self.release: Callable[[], None] | None = None
        self.connections: set[Any] | None = None
        self.discarded = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def attached(self, transport: asyncio.Transport, release: Callable[[], None] | None,
                 connections: set[Any] | None, write_paused: bool) -> None:
        """The server gave this object the socket (``transport.set_protocol(self)`` done)."""
        self.transport = transport
        self.release = release
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        if connections is not None:
            connections.add(self)
        conn = self.conn
        if conn is not None and write_paused:
            conn.pause()
        try:
            transport.resume_reading()  # the HTTP server may have paused it for the request
        except (AttributeError, RuntimeError):  # pragma: no cover - closing transport
            pass

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.discarded += len(data)
        if self.discarded > SSE_DISCARD_MAX_BYTES and self.transport is not None:
            logger.info("closing SSE stream %s: the client sent %d bytes on it", self._label(), self.discarded)
            self.transport.abort()

    def eof_received(self) -> None:
        return None  # the client closed its side: it is gone (the transport closes)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connections is not None:
            self.connections.discard(self)
            self.connections = None
        release, self.release = self.release, None
        if release is not None:
            release()
        conn = self.conn
        if conn is not None:
            conn.lost()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume()

    def shutdown(self) -> None:
        """The HTTP server shuts down: end the stream (normally done before, by the hub)."""
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.close(1001, "server shutting down")
        elif conn is None and self.transport is not None:
            self.transport.close()

    # -- Sink ---------------------------------------------------------------------------------

    def write(self, frames: list[bytes], nbytes: int) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if nbytes <= JOIN_MAX_BYTES:  # one buffer: cheaper for uvloop than a writev of several
            t.write(b"%x\r\n%s\r\n" % (nbytes, b"".join(frames)))
        else:
            t.writelines([b"%x\r\n" % nbytes, *frames, b"\r\n"])  # one chunk, frames by reference

    def finish(self, conn: "Connection") -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(b"0\r\n\r\n")
        assert self.loop is not None
        finish_transport(self.loop, t)

    def last_words(self, conn: "Connection", frames: list[bytes]) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        body = b"".join(frames)
        t.write((b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n")
        assert self.loop is not None
        finish_transport(self.loop, t)

    def drained(self) -> None:
        pass

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _label(self) -> str:
        return self.conn.label if self.conn is not None else "?"

    def __repr__(self) -> str:
        return f"SSESocket({self._label()})"


def _status_phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


class WebSocketStream(asyncio.Protocol):
    """One WebSocket connection (see the module docstring). uvicorn's
    WebSocket protocol interface: ``(config, server_state, app_state)``;
    :func:`streaming.server.install` makes a subclass that holds the
    server's :class:`~streaming.server.Guard` (per-IP slot).

    Before :meth:`attach` it is an ASGI WebSocket server (handshake phase);
    after, the hub's :class:`~streaming.transport.Sink`.
    """

    __slots__ = (
        "config", "app", "app_state", "connections", "tasks", "default_headers", "loop", "transport", "proto",
        "ip", "counted", "client", "server", "scope", "queue", "writable", "request", "response", "accepted",
        "close_sent", "initial_response", "conn", "handler", "inbox", "worker", "fragments", "frag_text",
        "read_paused", "ping_payload", "ping_sent_at", "closed_tcp",
    )

    #: the server's per-IP accounting (set by streaming.server.install's subclass)
    guard: Any = None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover - uvicorn loads it first
        self.config = config
        self.app = config.loaded_app
        self.app_state = app_state
        self.connections: set[Any] = server_state.connections
        self.tasks: set[asyncio.Task[Any]] = server_state.tasks
        self.default_headers: list[tuple[bytes, bytes]] = server_state.default_headers
        self.loop = _loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        #: the handshake's ServerProtocol, then (after the 101) a plain Protocol in the OPEN state,
        #: None while an attached connection is idle (:meth:`_idle`)
        self.proto: Any = ServerProtocol(max_size=config.ws_max_size, logger=_WS_LOGGER)
        self.ip: str | None = None
        self.counted = False
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        # handshake phase (dropped on attach)
        self.scope: dict[str, Any] | None = None
        self.queue: asyncio.Queue[dict[str, Any]] | None = asyncio.Queue()
        self.writable: asyncio.Event | None = asyncio.Event()
        self.writable.set()
        self.request: Request | None = None
        self.response: Response | None = None
        self.accepted = False
        self.close_sent = False
        self.initial_response: tuple[int, list[tuple[str, str]], bytes] | None = None
        # attached phase
        self.conn: "Connection | None" = None
        self.handler: Callable[[bytes, bool], Awaitable[None]] | None = None
        self.inbox: collections.deque[tuple[bytes, bool]] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.fragments: list[bytes] | None = None
        self.frag_text = False
        self.read_paused = False
        self.ping_payload: bytes | None = None
        self.ping_sent_at = 0.0
        self.closed_tcp = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (tuple, list)) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
            self.ip = self.client[0]
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, (tuple, list)) and len(sock) >= 2:
            self.server = (str(sock[0]), int(sock[1]))
        guard = self.guard
        if guard is not None and self.ip is not None:
            guard.per_ip[self.ip] = guard.per_ip.get(self.ip, 0) + 1  # the HTTP protocol's slot, taken over
            self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_tcp = True
        self.connections.discard(self)
        if self.counted:
            self.counted = False
            self.guard.release(self.ip)
        if self.queue is not None:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        if self.writable is not None:
            self.writable.set()
        conn = self.conn
        if conn is not None:
            conn.lost()
        if self.worker is not None:
            self.worker.cancel()

    def eof_received(self) -> None:
        self._proto().receive_eof()
        self._write_out()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause()
        elif self.writable is not None:
            self.writable.clear()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume()
        elif self.writable is not None:
            self.writable.set()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: 1001 to an open connection, 500 to a handshake in progress."""
        conn = self.conn
        if conn is not None:
            if not conn.closed:
                conn.close(1001, "server shutting down")
            return
        if self.accepted and not self.close_sent:
            self._send_close(1012, "service restart")
            return
        if not self.accepted and self.request is not None and not self.close_sent:
            self._reject(500, "Internal Server Error")
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        proto = self._proto()
        proto.receive_data(data)
        if not self.accepted and proto.handshake_exc is not None and self.request is None:
            # the handshake request could not be parsed: websockets queued a 4xx or only an EOF
            out = b"".join(proto.data_to_send())
            if not out:
                out = proto.reject(400, "Failed to open a WebSocket connection: invalid request.\n").serialize()
            self.close_sent = True
            self.transport.write(out)
            self.transport.close()
            return
        for event in proto.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):
                self._connect(event)
        self._write_out()
        if proto.parser_exc is not None:  # websockets failed the connection (1002, 1007, 1009 …)
            sent = proto.close_sent
            code = sent.code if sent is not None else 1002
            self.close_sent = True
            conn = self.conn
            if conn is not None and not conn.closed:
                conn.finished = True
                conn.close(code, "protocol error")
            elif self.queue is not None:
                self.queue.put_nowait({"type": "websocket.disconnect", "code": code})
            self._close_tcp()
            return
        self._idle()

    # -- handshake phase: the ASGI app decides --------------------------------------------------

    def _connect(self, request: Request) -> None:
        self.request = request
        response = self.response = self.proto.accept(request)
        if response.status_code != 101:  # not a valid WebSocket handshake
            self.close_sent = True
            self.proto.send_response(response)
            self._write_out()
            self.transport.close()
            return
        headers = [(k.encode("ascii"), v.encode("latin-1")) for k, v in request.headers.raw_items()]
        raw_path, _, query = request.path.partition("?")
        subprotocols: list[str] = []
        for header in request.headers.get_all("Sec-WebSocket-Protocol"):
            subprotocols.extend(token.strip() for token in header.split(","))
        root = self.config.root_path
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if self.transport.get_extra_info("sslcontext") else "ws",
            "server": self.server,
            "client": self.client,
            "root_path": root,
            "path": root + unquote(raw_path),
            "raw_path": root.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query.encode("ascii"),
            "headers": headers,
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}, WS_ATTACH: {"socket": self}},
        }
        assert self.queue is not None
        self.queue.put_nowait({"type": "websocket.connect"})
        task = self.loop.create_task(self._run_asgi())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_asgi(self) -> None:
        assert self.scope is not None
        try:
            result = await self.app(self.scope, self._receive, self._send)
        except _Disconnected:
            pass
        except BaseException:
            logger.exception("WebSocket %s: exception in the ASGI application", self.scope.get("path"))
            if not self.accepted and not self.close_sent:
                self._reject(500, "Internal Server Error")
        else:
            if result is not None:
                logger.error("ASGI callable should return None, returned %r", result)
            if not self.accepted and not self.close_sent and self.initial_response is None:
                logger.error("ASGI callable returned without completing the WebSocket handshake")
                self._reject(500, "Internal Server Error")
        if self.conn is None and not self.transport.is_closing():  # not attached: the app is done with it
            if self.accepted and not self.close_sent:
                self._send_close(1000, "")
            else:
                self.transport.close()
        self.scope = None

    async def _receive(self) -> dict[str, Any]:
        queue = self.queue
        if queue is None:  # attached: the app reads through its handler
            raise RuntimeError("this WebSocket is attached; messages go to its handler")
        message = await queue.get()
        if self.read_paused and queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def _send(self, message: Any) -> None:
        writable = self.writable
        if writable is not None and not writable.is_set():
            await writable.wait()
        if self.closed_tcp:
            raise _Disconnected()
        kind = message["type"]
        if not self.accepted and self.initial_response is None and not self.close_sent:
            if kind == "websocket.accept":
                headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                           for k, v in (*self.default_headers, *message.get("headers", []))]
                if message.get("subprotocol"):
                    headers.append(("Sec-WebSocket-Protocol", message["subprotocol"]))
                assert self.response is not None
                del self.response.headers["Date"]
                self.response.headers.update(headers)
                if not self.transport.is_closing():
                    self.accepted = True
                    self.proto.send_response(self.response)
                    self._write_out()
                    self._open()
                self.response = None  # the handshake's objects are not kept per connection
            elif kind == "websocket.close":
                self._reject(403, "")
                assert self.queue is not None
                self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
            elif kind == "websocket.http.response.start":
                status = message["status"]
                if not 100 <= status < 600:
                    raise RuntimeError(f"invalid HTTP status code {status!r} in response")
                self.initial_response = (status, [(k.decode("latin-1"), v.decode("latin-1"))
                                                  for k, v in message.get("headers", [])], b"")
            else:
                raise RuntimeError("expected websocket.accept, websocket.close or websocket.http.response.start, "
                                   f"not {kind!r}")
        elif self.initial_response is not None and not self.close_sent:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"expected websocket.http.response.body, not {kind!r}")
            status, headers, body = self.initial_response
            body += message.get("body", b"")
            self.initial_response = (status, headers, body)
            if not message.get("more_body", False):
                h = Headers(headers)
                h.setdefault("Date", email.utils.formatdate(usegmt=True))
                h.setdefault("Connection", "close")
                h.setdefault("Content-Length", str(len(body)))
                h.setdefault("Content-Type", "text/plain; charset=utf-8")
                self.proto.send_response(Response(status, _status_phrase(status), h, body))
                self.close_sent = True
                self._write_out()
                self.transport.close()
        elif not self.close_sent:
            try:
                if kind == "websocket.send":
                    data = message.get("bytes")
                    if data is not None:
                        self.proto.send_binary(data)
                    else:
                        self.proto.send_text(message.get("text", "").encode())
                    self._write_out()
                elif kind == "websocket.close":
                    self._send_close(message.get("code", 1000), message.get("reason") or "")
                else:
                    raise RuntimeError(f"expected websocket.send or websocket.close, not {kind!r}")
            except InvalidState:
                raise _Disconnected() from None
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} after the WebSocket closed")

    def _proto(self) -> Any:
        """The frame protocol; an attached connection drops it while idle (see :meth:`_idle`)."""
        proto = self.proto
        if proto is None:
            proto = self.proto = Protocol(Side.SERVER, state=State.OPEN, max_size=self.config.ws_max_size,
                                          logger=_WS_LOGGER)
        return proto

    def _idle(self) -> None:
        """An attached connection with no partial frame or message and nothing to
        write drops its frame protocol (≈1 KB: parser generator, reader,
        buffers); the next bytes make a new one in the same (OPEN) state."""
        proto = self.proto
        if (proto is not None and self.conn is not None and self.fragments is None and proto.state is State.OPEN
                and not proto.reader.buffer and getattr(proto, "current_size", None) is None and not proto.writes):
            parser = getattr(proto, "parser", None)
            if parser is not None:
                parser.close()
            self.proto = None

    def _open(self) -> None:
        """After the 101: frames are parsed by a plain ``websockets`` protocol in
        the OPEN state (the handshake protocol's parser would keep the request
        and its headers for the life of the connection)."""
        handshake = self.proto
        proto: Any = Protocol(Side.SERVER, state=State.OPEN, max_size=self.config.ws_max_size, logger=_WS_LOGGER)
        self.proto = proto
        leftover = handshake.reader.buffer  # bytes a client sent before it saw the 101
        parser = getattr(handshake, "parser", None)
        if parser is not None:  # its generator frame refers back to it: free it now, not at a GC pass
            parser.close()
        if leftover:
            self.data_received(bytes(leftover))

    def _reject(self, status: int, body: str) -> None:
        self.close_sent = True
        self.proto.send_response(self.proto.reject(status, body))
        self._write_out()
        self.transport.close()

    # -- attached: the hub's sink ---------------------------------------------------------------

    def attach(self, conn: "Connection", handler: Callable[[bytes, bool], Awaitable[None]]) -> None:
        """Hand the accepted socket to ``conn`` (created by the hub with this
        object as its sink): the hub writes its frames; ``handler(data, is_text)``
        is awaited for each client message, in order. Raises RuntimeError if
        the handshake was not accepted."""
        if not self.accepted or self.close_sent:
            raise RuntimeError("attach() needs an accepted, open WebSocket")
        self.conn = conn
        self.handler = handler
        self.request = self.response = None
        waiting = self.queue
        self.queue = None
        paused = self.writable is not None and not self.writable.is_set()
        self.writable = None
        if waiting is not None:  # messages that arrived before the app attached
            while not waiting.empty():
                m = waiting.get_nowait()
                if m["type"] == "websocket.receive":
                    text = m.get("text")
                    self._deliver(text.encode() if text is not None else m.get("bytes") or b"", text is not None)
        if paused:
            conn.pause()
        if self.closed_tcp:
            conn.lost()
            return
        self._schedule_ping()

    def write(self, frames: list[bytes], nbytes: int) -> None:
        t = self.transport
        if self.close_sent or t.is_closing():
            return
        if len(frames) == 1:
            t.write(frames[0])
        elif nbytes <= JOIN_MAX_BYTES:  # one buffer: cheaper for uvloop than a writev of several
            t.write(b"".join(frames))
        else:
            t.writelines(frames)  # complete frames, by reference

    def finish(self, conn: "Connection") -> None:
        if not self.close_sent and not self.transport.is_closing():
            self._send_close(conn.close_code, conn.close_reason[:120])

    def last_words(self, conn: "Connection", frames: list[bytes]) -> None:
        t = self.transport
        if self.close_sent or t.is_closing():
            return
        self.close_sent = True
        try:
            self._proto().send_close(conn.close_code, conn.close_reason[:120])
        except Exception:  # InvalidState/ProtocolError: write what we have and end
            pass
        t.writelines([*frames, *(d for d in self._proto().data_to_send() if d)])  # past flow control
        finish_transport(self.loop, t)

    def drained(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.inbox and self.worker is None and conn.control_bytes <= conn.max_bytes:
            self.worker = self.loop.create_task(self._work())
        self._maybe_resume_reading()

    def abort(self) -> None:
        self.transport.abort()

    # -- client messages (attached) ------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if frame.fin:
                self._message(bytes(frame.data), op is Opcode.TEXT)
            else:
                self.fragments = [bytes(frame.data)]
                self.frag_text = op is Opcode.TEXT
        elif op is Opcode.CONT:
            if self.fragments is None:  # pragma: no cover - websockets refuses it first
                return
            self.fragments.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self.fragments)
                self.fragments = None
                self._message(data, self.frag_text)
        elif op is Opcode.PONG:
            if self.ping_payload is not None and bytes(frame.data) == self.ping_payload:
                self.ping_payload = None
                rtt = self.loop.time() - self.ping_sent_at
                interval = self.config.ws_ping_interval
                if interval and self.config.ws_ping_timeout is not None and self.conn is not None:
                    self.conn.hub.timers.call_later(max(0.0, interval - rtt), WebSocketStream._ping_due, self)
        elif op is Opcode.CLOSE:
            rcvd = self._proto().close_rcvd
            code = rcvd.code if rcvd is not None else 1005
            reason = rcvd.reason if rcvd is not None else ""
            if self.queue is not None:
                self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            conn = self.conn
            if conn is not None:
                conn.finished = True  # nothing more is written after the closing handshake
                conn.close(1000, "client disconnected")
            self.close_sent = True  # websockets echoed the close frame (written below)
        # PING: websockets queued the pong (written by data_received)

    def _message(self, data: bytes, is_text: bool) -> None:
        if self.conn is None:
            if self.close_sent or self.queue is None:
                return
            if is_text:
                try:
                    self.queue.put_nowait({"type": "websocket.receive", "text": data.decode()})
                except UnicodeDecodeError:
                    self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
            else:
                self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
            if not self.read_paused:  # one message at a time until the app reads it
                self.read_paused = True
                self.transport.pause_reading()
            return
        self._deliver(data, is_text)

    def _deliver(self, data: bytes, is_text: bool) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = collections.deque()
        inbox.append((data, is_text))
        if len(inbox) >= WS_INBOX_MAX:
            self._pause_reading()
        if self.worker is None and conn.control_bytes <= conn.max_bytes:
            self.worker = self.loop.create_task(self._work())

    async def _work(self) -> None:
        """Handle waiting client messages in order; stop while the client leaves
        more control messages unread than its byte budget (resumed by drained())."""
        conn = self.conn
        inbox = self.inbox
        handler = self.handler
        assert conn is not None and inbox is not None and handler is not None
        try:
            while inbox and not conn.closed:
                if conn.control_bytes > conn.max_bytes:
                    self._pause_reading()
                    return
                data, is_text = inbox.popleft()
                await handler(data, is_text)
        finally:
            self.worker = None
            if conn.closed:
                inbox.clear()
            if not inbox and self.inbox is inbox:
                self.inbox = None  # an idle connection holds no deque
            self._maybe_resume_reading()

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        conn = self.conn
        if (self.read_paused and conn is not None and conn.control_bytes <= conn.max_bytes
                and len(self.inbox or ()) < WS_INBOX_MAX and not self.transport.is_closing()):
            self.read_paused = False
            self.transport.resume_reading()

    # -- keepalive and closing ------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        interval = self.config.ws_ping_interval
        if interval and interval > 0 and self.conn is not None:
            self.conn.hub.timers.call_later(interval, WebSocketStream._ping_due, self)

    def _ping_due(self) -> None:
        conn = self.conn
        if conn is None or conn.finished or self.close_sent or self.transport.is_closing():
            return
        payload = os.urandom(4)
        self.ping_payload = payload
        self.ping_sent_at = self.loop.time()
        try:
            self._proto().send_ping(payload)
            self._write_out()
        except InvalidState:
            return
        except Exception:  # a write that raised: the socket is in a state nobody foresaw — close it
            logger.exception("ws %s: keepalive ping failed; closing", conn.label)
            self.ping_payload = None
            conn.finished = True
            conn.close(1011, "internal error")
            self.abort()
            return
        self._idle()
        timeout = self.config.ws_ping_timeout
        if timeout is not None:
            conn.hub.timers.call_later(timeout, WebSocketStream._pong_due, (self, payload))
        else:
            self._schedule_ping()

    @staticmethod
    def _pong_due(arg: "tuple[WebSocketStream, bytes]") -> None:
        self, payload = arg
        conn = self.conn
        if self.ping_payload is not payload or conn is None or conn.finished or self.transport.is_closing():
            return
        logger.info("ws %s: no pong within %.1f s; closing (1011)", conn.label, self.config.ws_ping_timeout)
        self.ping_payload = None
        conn.finished = True
        conn.close(1011, "keepalive ping timeout")
        self.close_sent = True
        try:
            self._proto().fail(1011, "keepalive ping timeout")
        except Exception:  # pragma: no cover - already closing
            pass
        self._write_out()
        finish_transport(self.loop, self.transport)

    def _send_close(self, code: int, reason: str) -> None:
        self.close_sent = True
        try:
            self._proto().send_close(code, reason)
        except InvalidState:  # the client closed first
            return
        self._write_out()
        if self.read_paused:  # read the client's close frame
            self.read_paused = False
            self.transport.resume_reading()
        if self.conn is not None:
            self.conn.hub.timers.call_later(CLOSE_TIMEOUT_S, WebSocketStream._close_due, self)
        else:
            self.loop.call_later(CLOSE_TIMEOUT_S, WebSocketStream._close_due, self)

    def _close_due(self) -> None:
        if not self.closed_tcp:
            finish_transport(self.loop, self.transport)

    def _write_out(self) -> None:
        out = self._proto().data_to_send()
        if not out:
            return
        t = self.transport
        if t.is_closing():
            return
        data = [d for d in out if d != SEND_EOF]  # SEND_EOF (b""): websockets asks for the end of the stream
        if data:
            t.writelines(data)
        if len(data) < len(out):
            self._close_tcp()

    def _close_tcp(self) -> None:
        t = self.transport
        if not t.is_closing():
            finish_transport(self.loop, t)

    def __repr__(self) -> str:
        return f"WebSocketStream({self.client})"


class _Disconnected(Exception):
    """The client went away while the app was sending (handshake phase)."""
