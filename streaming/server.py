"""uvicorn's HTTP protocol with the connection limits it lacks, and the seam where streams leave it.

:func:`install` (called by :class:`streaming.app.StreamingServer` before
the server loads its config) swaps uvicorn's HTTP protocol class for a
subclass — and its WebSocket protocol for oddsfeed's own
(:class:`streaming.sockets.WebSocketStream`) — that add, per TCP connection:

- **a whole-request header deadline** (slowloris): from the moment a
  connection opens, or a response ends on a kept-alive connection, the
  next request's headers must arrive complete within
  ``settings.request_header_timeout_ms``; otherwise the server answers
  ``408`` and closes with a lingering close, as for 431 below (an idle
  kept-alive connection, where no byte of a next request arrived, is closed
  without a 408). uvicorn has no such deadline (its keep-alive timeout is
  cancelled by the first byte). The timer is stopped when the request
  reaches the app (headers complete) or the connection upgrades to a
  WebSocket. (The request *body* is not covered.)
- **request head limits** (httptools, the default parser): the request
  line plus every header line, ``\r\n`` included, at most
  :data:`MAX_HEADER_BYTES` (32 KiB) in all; at most :data:`MAX_HEADERS`
  (100) header fields; one header line (``name: value``) at most
  :data:`MAX_HEADER_LINE` (8190) bytes — the same per-line and under the
  per-request-count limits as the ``websockets`` handshake parser (8192
  bytes with CRLF, 128 headers), so a WebSocket handshake is refused here
  first, the same way. Over any of them: ``431 Request Header Fields Too
  Large`` (a request target over :data:`MAX_HEADER_LINE`: ``414 URI Too
  Long``) with a JSON body saying which limit, then a lingering close: the
  write side is shut (FIN after the answer), further bytes are read and
  dropped — at most :data:`DISCARD_MAX_BYTES` or :data:`FINAL_GRACE_S` —
  so the client can read the answer instead of a reset, then the
  connection is closed. The bytes are counted *before* they reach the
  parser, so nothing past the cap is ever buffered (httptools keeps a
  header's value whole until it ends): the most a request head can hold in
  memory is the cap plus one socket read (≤ 256 KiB): a request head that
  starts inside the read that ended the previous request (pipelining, or a
  body's last bytes) is counted from the next read. With ``--http h11`` the same
  byte cap is handed to h11 (``h11_max_incomplete_event_size``), which
  answers 400.
- **a per-IP connection cap** (``settings.max_connections_per_ip``, 0 = no
  cap): one more connection from that IP gets ``429`` with
  ``Retry-After`` and is closed before any parsing. WebSocket connections
  keep their slot after the upgrade.
- **TCP keepalive** (idle 30 s, interval 10 s, 3 probes) so a peer that
  vanished without a FIN is found even when nothing is being written.
- **a last word to a stuck client**: an HTTP response may end with
  ``{"type": "oddsfeed.http.final", "body": b"…"}`` (scope extension of the
  same name): the body is written as the final chunk *without waiting for
  flow control* (a client that stopped reading would block it forever),
  the connection is closed, and aborted if it has not drained after
  ``FINAL_GRACE_S``.
- **the detach seam** (httptools): an HTTP response that has sent its head
  and at least one chunk of a chunked body may call the scope extension
  ``"oddsfeed.http.detach"``'s ``"detach"(sock)``: the socket leaves the
  HTTP server (``transport.set_protocol(sock)``, the response counts as
  complete for uvicorn, the per-IP slot and the place in the server's
  connection set go with it), and ``sock.attached(transport, release,
  connections, write_paused)`` is called; ``release()`` gives the per-IP
  slot back when the socket closes. The SSE stream uses it
  (:class:`streaming.sockets.SSESocket`): from then on the hub writes to the
  socket directly. Returns False (nothing changed) when the response cannot
  be detached.

- **the fast path** (httptools): a request for one of ``guard.fast_routes``
  (``POST /v1/price-check[/batch]``, :mod:`streaming.fastpath`) that needs
  nothing of HTTP but a ``Content-Length`` body is answered by the protocol
  itself when the body is complete: the route's ``answer(headers, query,
  body, client)`` (the same tracing, authentication and endpoint code as the
  ASGI path) and one ``transport.write`` of head and body, no request cycle,
  task or middleware. The body has the route's deadline (408 and a
  lingering close). After the answer the header deadline is armed for the
  next request, and it also closes a connection that stays idle (after
  ``request_header_timeout_ms``, where an ASGI answer arms uvicorn's 5 s
  keep-alive timer as well). Anything else (chunked, ``Expect``, an upgrade, a
  request behind one still being answered, a client not reading) goes
  through ASGI as before.

  The *direct read*: a read that starts at a request boundary and holds the
  whole head of a fast-route request in a strict subset of HTTP/1.1
  (:func:`read_direct`: ``POST <path> HTTP/1.1``, CRLF line ends, token
  header names, visible-ASCII values, one ``Content-Length``, no
  ``Transfer-Encoding`` / ``Expect`` / ``Upgrade``, ``Connection`` absent or
  ``keep-alive`` / ``close``, within the head limits) is read without
  handing it to httptools at all — its body from the same read or the next
  ones (within the route's deadline: else the 408 above), then the same
  route, answer and bookkeeping, minus the parser's eight Python callbacks
  and uvicorn's per-request ASGI scope (~40 % of the fast path's CPU).
  Anything outside that subset (or a head split across reads) goes to
  httptools as before, which then applies every limit and answers every
  error: on the subset, httptools and this reading agree byte for byte, so
  no request can mean one thing to one and another to the other. Pipelined
  requests in the same read are read one after the other.

WebSocket connections are served by :class:`streaming.sockets.WebSocketStream`
(installed as uvicorn's ``ws`` protocol class; ``websockets``' sans-I/O
protocol for the handshake, frames and keepalive pings — ``ws_ping_interval``
/ ``ws_ping_timeout``: a peer that does not answer a ping in time is closed
with 1011), which holds the per-IP slot the HTTP protocol had. No
permessage-deflate: frames are built once per node and shared; compression
would be per connection (3× the memory, 2× the CPU per frame, see
research/fanout.md).
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import re
import socket
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

from uvicorn.config import HTTP_PROTOCOLS, Config
from uvicorn.importer import import_from_string

from streaming.sockets import FINAL_GRACE_S, WebSocketStream, finish_transport

__all__ = ["DISCARD_MAX_BYTES", "FINAL_GRACE_S", "DirectRequest", "Guard", "HTTP_DETACH", "HTTP_FINAL", "MAX_HEADERS",
           "MAX_HEADER_BYTES", "MAX_HEADER_LINE", "install", "read_direct", "stream_ws"]

logger = logging.getLogger(__name__)

#: an ``Upgrade: h2c`` header line (the CRLF before it included), ignored — see data_received
_H2C_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*h2c[ \t]*(?=\r\n)", re.IGNORECASE)
#: the start of such a line, as far as one read may cut it (held back until the next read)
_H2C_PREFIX = re.compile(rb"\r(\n(u(p(g(r(a(d(e(:[ \t]{0,8}(h(2(c[ \t]{0,8}\r?)?)?)?)?)?)?)?)?)?)?)?)?", re.IGNORECASE)

HTTP_FINAL = "oddsfeed.http.final"
HTTP_DETACH = "oddsfeed.http.detach"

#: request line + header lines (CRLFs included) of one request, bytes
MAX_HEADER_BYTES = 32 * 1024
#: header fields in one request
MAX_HEADERS = 100
#: one header line ``name: value`` (without CRLF), and the request target, bytes
MAX_HEADER_LINE = 8190
#: after refusing a request head, bytes still read and dropped (lingering close) before the reset
DISCARD_MAX_BYTES = 1 << 20


def _refusal(status: bytes, code: str, message: str) -> bytes:
    body = b'{"error":"%s","message":"%s"}' % (code.encode(), message.encode())
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


_431_BYTES = _refusal(b"431 Request Header Fields Too Large", "header_too_large",
                      f"the request line and headers exceed {MAX_HEADER_BYTES} bytes in all; send less "
                      "(credentials, cookies) in headers")
_431_COUNT = _refusal(b"431 Request Header Fields Too Large", "too_many_headers",
                      f"more than {MAX_HEADERS} header fields; send fewer")
_431_LINE = _refusal(b"431 Request Header Fields Too Large", "header_too_large",
                     f"a header line is longer than {MAX_HEADER_LINE} bytes; shorten it")
_414 = _refusal(b"414 URI Too Long", "uri_too_long",
                f"the request target is longer than {MAX_HEADER_LINE} bytes; use fewer or shorter query values")


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a request head over a limit."""


_408_BODY = b'{"error":"request_timeout","message":"the request headers did not arrive in time; send them whole"}'
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(_408_BODY), _408_BODY))
_429_BODY = b'{"error":"too_many_connections","message":"too many open connections from your address"}'
_429 = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_429_BODY), _429_BODY))


#: the request heads :func:`read_direct` reads: ``POST <target> HTTP/1.1`` then header lines, each a
#: token name, ``:``, optional spaces/tabs, a value of visible ASCII runs separated by spaces/tabs,
#: optional spaces/tabs (RFC 9110 §5.1/§5.5 without obs-text or obs-fold), CRLF between lines.
#: Possessive quantifiers throughout: the spaces around a value could be taken by the run before it
#: or after it, and a head failing late made the engine retry every split of every line —
#: exponential time on a few hundred bytes any client can send (found by review: 183 bytes froze a
#: node for 53 s). Possessive, every part matches one way: linear.
_DIRECT_HEAD = re.compile(rb"POST /[!-~]*+ HTTP/1\.1(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[ \t]*+"
                          rb"(?:[!-~]++(?:[ \t]++[!-~]++)*+)?+[ \t]*+)*+")


class DirectRequest(NamedTuple):
    """A request :func:`read_direct` read: its route, headers (lowercase names, values without
    surrounding spaces/tabs — as uvicorn gives them to ASGI), raw query, body (so far), whether
    the connection stays open, the bytes after it in the read (a pipelined next request) and how
    many bytes of its body are still to come (0: the request is whole; clients such as httpx
    write the head and the body apart)."""

    route: FastRoute
    headers: list[tuple[bytes, bytes]]
    query: bytes
    body: bytes
    keep_alive: bool
    rest: bytes
    missing: int = 0


def read_direct(data: bytes, routes: Mapping[bytes, FastRoute], *, max_header_bytes: int, max_headers: int,
                max_header_line: int) -> DirectRequest | None:
    """The request at the start of ``data`` when its head is whole, for one of ``routes``, in the
    strict subset of HTTP/1.1 the protocol reads itself (see the module docstring, *direct read*),
    within the head limits (its body may be still to come: ``missing``); None otherwise
    (httptools reads it). Pure: no I/O."""
    if not data.startswith(b"POST /"):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_header_bytes:
        return None
    space = data.find(b" ", 5, min(end, max_header_line + 5))
    if space < 0:
        return None
    path, _, query = data[5:space].partition(b"?")
    route = routes.get(path)  # (before the head is checked: other requests cost no more than a find)
    if route is None:
        return None
    head = data[:end]
    if _DIRECT_HEAD.fullmatch(head) is None:
        return None
    lines = head.split(b"\r\n")
    if len(lines) - 1 > max_headers:
        return None
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    keep_alive = True
    for i in range(1, len(lines)):
        line = lines[i]
        if len(line) + 1 > max_header_line:  # (name + ": " + value, as on_header counts it, is at most this)
            return None
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:  # (int() refuses > 4300 digits: a raise)
                return None
            length = int(value)
        elif name == b"connection":
            token = value.lower()
            if token == b"close":
                keep_alive = False
            elif token != b"keep-alive":
                return None
        elif name in (b"transfer-encoding", b"expect", b"upgrade", b"proxy-connection"):
            return None  # (llhttp reads Proxy-Connection as Connection: left to it)
        headers.append((name, value))
    if not 0 <= length <= route.max_body_bytes:
        return None
    start = end + 4
    stop = start + length
    if len(data) < stop:
        return DirectRequest(route, headers, query, data[start:], keep_alive, b"", stop - len(data))
    return DirectRequest(route, headers, query, data[start:stop], keep_alive, data[stop:])


class Guard:
    """Limits shared by every connection of one server.

    header_timeout_s: whole-request header deadline (0 = off);
    max_per_ip: open connections per client IP (0 = no cap);
    max_header_bytes / max_headers / max_header_line: request head limits
    (see the module docstring; bytes, fields, bytes); fast_routes: the
    requests the protocol answers itself (see the module docstring).
    Counters: ``header_timeouts``, ``ip_rejections``, ``header_rejections``,
    ``direct_reads`` (fast-route requests read without httptools).
    """

    def __init__(self, *, header_timeout_s: float, max_per_ip: int, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_headers: int = MAX_HEADERS, max_header_line: int = MAX_HEADER_LINE,
                 fast_routes: Mapping[bytes, FastRoute] | None = None) -> None:
        #: raw path -> the route the protocol answers itself (httptools; see "the fast path" above)
        self.fast_routes = dict(fast_routes) if fast_routes else None
        self.header_timeout_s = header_timeout_s
        self.max_per_ip = max_per_ip
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_header_line = max_header_line
        self.per_ip: dict[str, int] = {}
        self.header_timeouts = 0
        self.ip_rejections = 0
        self.header_rejections = 0
        self.direct_reads = 0

    def acquire(self, ip: str | None) -> bool:
        if ip is None:
            return True
        n = self.per_ip.get(ip, 0)
        if self.max_per_ip and n >= self.max_per_ip:
            self.ip_rejections += 1
            return False
        self.per_ip[ip] = n + 1
        return True

    def release(self, ip: str | None) -> None:
        if ip is None:
            return
        n = self.per_ip.get(ip, 0) - 1
        if n <= 0:
            self.per_ip.pop(ip, None)
        else:
            self.per_ip[ip] = n


def _peer_ip(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return None  # unix socket


def _keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            opt = getattr(socket, name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError:  # pragma: no cover - platform dependent
        pass


def guarded_http(base: type[Any], guard: Guard) -> type[Any]:
    """``base`` (uvicorn's h11 or httptools protocol) with the header deadline, the head limits
    (httptools) and the per-IP cap."""

    class GuardedHTTP(base):
        _guard = guard
        #: httptools: the head limits are ours (h11 is given the byte cap itself, see install())
        _limit_head = hasattr(base, "on_headers_complete")
        #: uvicorn's ASGI app (set by the base class; the base is typed Any, so declared here)
        app: Any

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._ip: str | None = None
            self._counted = False
            self._deadline: asyncio.TimerHandle | None = None
            self._deadline_at: float | None = None  # loop time the head deadline is due (None: not armed)
            self._partial = False
            # request head accounting (bytes counted before the parser sees them)
            self._in_head = True      # waiting for / inside a request head
            self._head_bytes = 0      # bytes of the current head read so far
            self._head_tail = b""     # its last 3 bytes (a CRLFCRLF split across reads)
            self._held = b""          # a head's last bytes that may begin an h2c offer (data_received)
            self._head_fields = 0     # header fields parsed so far
            self._head_restarted = False  # a head began inside the current read
            self._refusal: bytes | None = None  # the answer, once a limit was hit
            self._discarding = 0      # > 0: refused; bytes dropped since (lingering close)
            self._detached = False    # the socket went to a stream (oddsfeed.http.detach)
            # the fast path (httptools only): the request being read, its body, its deadline
            self._fast_routes = self._guard.fast_routes if self._limit_head else None
            self._fast: _FastRequest | None = None
            self._boundary = True  # the parser is between requests, holding no bytes (the direct read)
            self._direct_missing = 0  # > 0: body bytes still to come of a request read directly (in _fast)
            self._fast_timer: asyncio.TimerHandle | None = None
            inner = self.app
            proto = self

            async def app(scope: Any, receive: Any, send: Any) -> None:
                proto._disarm()
                try:
                    if scope["type"] == "http":
                        ext = scope.get("extensions")
                        if ext is None:
                            ext = scope["extensions"] = {}
                        ext[HTTP_FINAL] = {}
                        cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle
                        if cycle is not None and hasattr(cycle, "chunked_encoding"):
                            def detach(sock: Any) -> bool:
                                return proto._detach(cycle, sock)
                            ext[HTTP_DETACH] = {"detach": detach}

                        async def guarded_send(message: Any) -> None:
                            kind = message["type"]
                            if kind == HTTP_FINAL:
                                proto._final(message.get("body", b""))
                                return
                            await send(message)
                        try:
                            await inner(scope, receive, guarded_send)
                        finally:
                            # the detach closure refers to uvicorn's request cycle, which holds this
                            # scope: drop it so the request's objects go by reference counting, not
                            # by a later GC pass (~15 objects a request, ~10 ms young collections
                            # at 2k requests/s)
                            ext.pop(HTTP_DETACH, None)
                    else:
                        await inner(scope, receive, send)
                finally:
                    proto._arm()

            self.app = app

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._ip = _peer_ip(transport)
            if not self._guard.acquire(self._ip):
                logger.warning("refusing a connection from %s: more than %d open", self._ip, self._guard.max_per_ip)
                transport.write(_429)
                transport.close()
                return
            self._counted = True
            _keepalive(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._drop_deadline()
            self._fast = None
            if self._fast_timer is not None:
                self._fast_timer.cancel()
                self._fast_timer = None
            if self._counted:
                self._counted = False
                self._guard.release(self._ip)
            super().connection_lost(exc)

        def _detach(self, cycle: Any, sock: Any) -> bool:
            """The ``oddsfeed.http.detach`` seam (see the module docstring): hand the
            socket of a started, chunked response to ``sock`` (an asyncio protocol
            with ``attached(transport, release, connections, write_paused)``)."""
            transport = self.transport
            current: Any = getattr(self, "cycle", None)
            if (self._detached or cycle is None or cycle is not current or not cycle.response_started
                    or not cycle.chunked_encoding or cycle.response_complete or cycle.disconnected
                    or transport is None or transport.is_closing()):
                return False
            cycle.response_complete = True  # the app may return; uvicorn writes nothing more
            self._detached = True
            self._drop_deadline()
            connections = getattr(self, "connections", None)
            if connections is not None:
                connections.discard(self)  # the socket's new protocol takes its place
            release = None
            if self._counted:  # the per-IP slot goes with the socket
                self._counted = False
                release = functools.partial(self._guard.release, self._ip)
            flow = getattr(self, "flow", None)
            transport.set_protocol(sock)
            sock.attached(transport, release, connections, bool(flow is not None and flow.write_paused))
            self._forget()
            return True

        def handle_websocket_upgrade(self, *args: Any, **kwargs: Any) -> None:
            self._drop_deadline()
            if self._counted:  # the WebSocket protocol takes the slot over
                self._counted = False
                self._guard.release(self._ip)
            super().handle_websocket_upgrade(*args, **kwargs)
            self._forget()

        def _forget(self) -> None:
            """The socket went to another protocol: break this object's reference cycles
            (parser ↔ protocol, app closure ↔ protocol, protocol ↔ request cycle) so that
            it is freed now, not by a later GC pass — an idle stream should not keep the
            request's objects alive."""
            self.parser = None
            self.app = None
            self.cycle = None
            self.scope = None
            self.headers = None

        def _final(self, body: bytes) -> None:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            transport.write((b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n")
            cycle = getattr(self, "cycle", None)
            if cycle is not None:
                cycle.response_complete = True  # the app may return: nothing more to send
            finish_transport(self.loop, transport)

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                self._discard(len(data))
                return
            if self._fast_routes is not None:
                data = self._read_directly(data)
                if not data:
                    return
            if self._limit_head and self._in_head:
                if self._held:  # the start of a header line that may be an h2c offer (below)
                    data, self._held = self._held + data, b""
                if b"pgrade" in data:
                    # an HTTP/2 cleartext upgrade offer (curl --http2, Java clients): RFC 9113 §3.1
                    # lets a server ignore it and answer in HTTP/1.1 — and must, here: the parser
                    # would take the request's body for the new protocol's bytes, and uvicorn drops
                    # them. Only in the head (this read starts one): a body's bytes are never touched.
                    # (httptools only: h11 reads the body anyway.)
                    end = data.find(b"\r\n\r\n")
                    m = _H2C_UPGRADE.search(data, 0, len(data) if end < 0 else end + 2)
                    if m is not None:
                        data = data[:m.start()] + data[m.end():]
                if b"\r\n\r\n" not in self._head_tail + data:
                    # the head goes on in the next read: a last line that may still become that
                    # offer is held back until the read that completes it (a few bytes at most).
                    # Never bytes that end the head with what the parser already has (its last
                    # bytes: _head_tail) — a head whose final LF came alone would wait forever
                    cut = data.rfind(b"\r\n")
                    if data.endswith(b"\r") and not (cut >= 0 and _H2C_PREFIX.fullmatch(data, cut)):
                        cut = len(data) - 1  # a CR whose LF may start such a line
                    if cut >= 0 and _H2C_PREFIX.fullmatch(data, cut):
                        data, self._held = data[:cut], data[cut:]
                        if not data:
                            self._partial = True
                            return
            self._partial = True  # part of a request has arrived since the timer was armed
            if not self._limit_head:
                super().data_received(data)
                return
            if self._in_head:
                room = self._guard.max_header_bytes - self._head_bytes
                if len(data) > room:
                    window = self._head_tail + data[:room]
                    if b"\r\n\r\n" not in window and b"\n\n" not in window:
                        self._refuse(_431_BYTES)  # never handed to the parser
                        return
            before = self._head_bytes
            self._head_restarted = False
            super().data_received(data)
            fast = self._fast
            if fast is not None and self._fast_timer is None:  # a fast-path body still to come
                self._fast_timer = self.loop.call_at(fast.deadline, self._fast_timed_out)
            if self._in_head and not self._discarding:  # a head goes on in the next read
                if self._head_restarted:  # it began inside this read, after a message ended (its
                    # start in the read is unknown): count from the next read — the read is bounded
                    self._head_bytes = 0
                    self._head_tail = data[-3:]
                else:
                    self._head_bytes = before + len(data)
                    self._head_tail = (self._head_tail + data)[-3:]

        # parser callbacks (httptools; h11 has its own byte cap): the head of the next request
        # starts when the previous message is complete and ends with on_headers_complete
        def on_message_begin(self) -> None:
            self._boundary = False
            self._head_fields = 0
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self._boundary = True
            self._in_head = True
            self._head_restarted = True
            self._head_bytes = 0
            self._head_tail = b""
            fast = self._fast
            if fast is not None:
                self._fast = None
                self._answer_fast(fast)
                return
            super().on_message_complete()

        def on_url(self, url: bytes) -> None:
            if len(getattr(self, "url", b"")) + len(url) > self._guard.max_header_line:
                self._refusal = _414
                raise _HeadRefused()
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            g = self._guard
            self._head_fields += 1
            if self._head_fields > g.max_headers:
                self._refusal = _431_COUNT
                raise _HeadRefused()
            if len(name) + len(value) + 2 > g.max_header_line:
                self._refusal = _431_LINE
                raise _HeadRefused()
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._fast_routes is not None and self._take_fast():
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            fast = self._fast
            if fast is not None:
                fast.body.append(body)
                return
            super().on_body(body)

        # -- the fast path: requests answered here, without ASGI ----------------------------

        def _take_fast(self) -> bool:
            """Whether the request whose head just ended is one the protocol answers itself
            (see the module docstring); if so its body is collected by on_body and it is
            answered by on_message_complete."""
            parser: Any = self.parser
            headers: Any = self.headers
            if parser.get_method() != b"POST" or parser.should_upgrade():
                return False
            if self._busy():  # an earlier request still being answered, a client not reading, or
                return False  # uvicorn's own 503 counting applies
            assert self._fast_routes is not None
            path, _, query = self.url.partition(b"?")
            route = self._fast_routes.get(path)
            if route is None:
                return False
            length = -1
            for name, value in headers:
                if name == b"content-length":
                    if not value.isdigit() or length >= 0:
                        return False
                    length = int(value)
                elif name in (b"transfer-encoding", b"expect"):
                    return False
            if not 0 <= length <= route.max_body_bytes:
                return False
            self._disarm()  # the head is complete: its deadline stops; the body has the route's own
            keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
            # the body's deadline is armed by data_received only if the body is not complete within
            # the read that ended the head (nearly every check: no timer to make and cancel)
            self._fast = _FastRequest(route, headers, query, keep_alive, self.loop.time() + route.deadline_s())
            return True

        def _busy(self) -> bool:
            """Whether the connection cannot answer a request here now: one still being answered
            through ASGI (or queued behind it), a client not reading, uvicorn's concurrency limit."""
            cycle = self.cycle
            return ((cycle is not None and not cycle.response_complete) or bool(self.pipeline)
                    or self.flow.write_paused or getattr(self, "limit_concurrency", None) is not None)

        def _read_directly(self, data: bytes) -> bytes:
            """Answer the fast-route requests at the start of ``data`` without httptools (the
            *direct read*, see the module docstring) — the rest of a body read directly, then
            each whole request, one after the other (a loop: a read may hold hundreds of
            pipelined checks); what is left is for httptools (b"": nothing, or the connection
            closed after a ``Connection: close`` answer)."""
            g = self._guard
            routes = self._fast_routes
            assert routes is not None
            while data:
                missing = self._direct_missing
                if missing:  # more of the body of a request whose head was read directly
                    fast = self._fast
                    assert fast is not None
                    if len(data) < missing:
                        fast.body.append(data)
                        self._direct_missing = missing - len(data)
                        return b""
                    fast.body.append(data[:missing])
                    self._direct_missing = 0
                    self._fast = None
                    if not self._answer_fast(fast):
                        return b""
                    data = data[missing:]
                    continue
                if not self._boundary or self._held or self._fast is not None or self._detached or self._busy():
                    return data
                req = read_direct(data, routes, max_header_bytes=g.max_header_bytes, max_headers=g.max_headers,
                                  max_header_line=g.max_header_line)
                if req is None:
                    return data
                g.direct_reads += 1
                self._unset_keepalive_if_required()
                self._disarm()
                if req.missing:  # the body comes in the next reads, within the route's deadline
                    self._partial = True
                    fast = self._fast = _FastRequest(req.route, req.headers, req.query, req.keep_alive,
                                                     self.loop.time() + req.route.deadline_s())
                    fast.body.append(req.body)
                    self._direct_missing = req.missing
                    self._fast_timer = self.loop.call_at(fast.deadline, self._fast_timed_out)
                    return b""
                if not self._write_answer(req.route.answer(req.headers, req.query, req.body, self._ip),
                                          req.keep_alive):
                    return b""
                data = req.rest
            return b""

        def _answer_fast(self, req: _FastRequest) -> bool:
            """Answer a fast-path request whose body is whole; whether the connection stays open."""
            if self._fast_timer is not None:
                self._fast_timer.cancel()
                self._fast_timer = None
            body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
            return self._write_answer(req.route.answer(req.headers, req.query, body, self._ip), req.keep_alive)

        def _write_answer(self, answer: tuple[int, list[tuple[bytes, bytes]], bytes], keep_alive: bool) -> bool:
            """Write a fast-path ``answer`` in one write, then close (not ``keep_alive``) or wait for
            the next request; whether the connection stays open."""
            transport = self.transport
            if transport is None or transport.is_closing():
                return False
            transport.write(self._response(answer, close=not keep_alive))
            if not keep_alive:
                transport.close()
                return False
            if self._guard.header_timeout_s > 0:
                # the next request's head deadline (as after an ASGI answer) also closes the
                # connection when it stays idle: no keep-alive timer of uvicorn's beside it
                self.server_state.total_requests += 1
                self.flow.resume_reading()
                self._arm()
            else:
                self.on_response_complete()  # uvicorn's bookkeeping and keep-alive timer
            return True

        def _fast_timed_out(self) -> None:
            """The body of a fast-path request did not arrive in time: the endpoint's 408,
            then a lingering close (the rest of the body may still be on its way)."""
            self._fast_timer = None
            req, self._fast = self._fast, None
            self._direct_missing = 0
            if req is None:
                return
            logger.info("closing %s: the body of POST %s did not arrive in time", self._ip, req.route.path)
            self._refuse(self._response(req.route.timed_out(req.headers), close=True), count=False)

        def _response(self, answer: tuple[int, list[tuple[bytes, bytes]], bytes], *, close: bool) -> bytes:
            """A whole HTTP/1.1 response: status line, the server's default headers (``date``,
            ``server``) and the answer's, ``connection: close`` when ``close``, then the body."""
            status, headers, body = answer
            head = [_response_head(status, self.server_state.default_headers)]
            for name, value in headers:
                head += (name, b": ", value, b"\r\n")
            if close:
                head.append(b"connection: close\r\n")
            head += (b"\r\n", body)
            return b"".join(head)

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a parser error
            if self._refusal is not None:  # ours: a limit, raised from a callback above
                self._refuse(self._refusal)
                return
            super().send_400_response(msg)

        def _refuse(self, answer: bytes, *, count: bool = True) -> None:
            """Answer ``answer`` (431/414/408), then a lingering close (see the module docstring):
            the client reads the answer instead of a reset caused by what it was still sending."""
            transport = self.transport
            self._drop_deadline()
            if count:
                self._guard.header_rejections += 1
                logger.info("refusing a request from %s: %s", self._ip, answer.split(b"\r\n", 1)[0].decode())
            self._discarding = 1
            if transport is None or transport.is_closing():
                return
            transport.write(answer)
            try:
                if transport.can_write_eof():
                    transport.write_eof()
            except (OSError, RuntimeError):
                pass
            self.loop.call_later(FINAL_GRACE_S, self._close_refused)

        def _discard(self, n: int) -> None:
            self._discarding += n
            if self._discarding > DISCARD_MAX_BYTES:
                self._close_refused()

        def _close_refused(self) -> None:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if transport.get_write_buffer_size():
                transport.abort()  # the client is not even reading the answer
            else:
                transport.close()

        def _arm(self) -> None:
            """Start the head deadline (unless one is running). One timer per connection:
            disarming only clears the due time, and a timer that fires after the deadline
            was armed again re-aims itself at the new due time — no timer is made and
            cancelled per request (~2 µs each; issue 11's price-check CPU budget)."""
            if self._detached:
                return
            self._partial = False
            timeout = self._guard.header_timeout_s
            if timeout <= 0 or self._deadline_at is not None:
                return
            transport = getattr(self, "transport", None)
            if transport is None or transport.is_closing():
                return
            due = self._deadline_at = self.loop.time() + timeout
            if self._deadline is None:
                self._deadline = self.loop.call_at(due, self._header_timeout)

        def _disarm(self) -> None:
            """Stop the head deadline: the timer, if any, stays and finds nothing due."""
            self._deadline_at = None

        def _drop_deadline(self) -> None:
            """Stop the head deadline for good (the connection closes or leaves the protocol)."""
            self._deadline_at = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _header_timeout(self) -> None:
            self._deadline = None
            due = self._deadline_at
            if due is None:
                return  # disarmed since (the head arrived); _arm starts a timer again
            if due > self.loop.time():  # disarmed and armed again since: wait for that deadline
                self._deadline = self.loop.call_at(due, self._header_timeout)
                return
            self._deadline_at = None
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if not self._partial:
                # an idle kept-alive connection: close it quietly — a 408 here would be read
                # by a client that reuses the pooled connection as the answer to its next request
                transport.close()
                return
            self._guard.header_timeouts += 1
            logger.info("closing %s: request headers not complete within %.1f s", self._ip,
                        self._guard.header_timeout_s)
            self._refuse(_408, count=False)

    GuardedHTTP.__name__ = GuardedHTTP.__qualname__ = f"Guarded{base.__name__}"
    return GuardedHTTP


class FastRoute(Protocol):
    """What the protocol needs of a route it answers itself (:class:`streaming.fastpath.SyncRoute`)."""

    path: str
    max_body_bytes: int

    def deadline_s(self) -> float: ...

    def answer(self, headers: list[tuple[bytes, bytes]], query: bytes, body: bytes,
               client: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]: ...

    def timed_out(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]: ...


class _FastRequest:
    """A request the protocol is reading for a fast route: its head's parts and body chunks."""

    __slots__ = ("body", "deadline", "headers", "keep_alive", "query", "route")

    def __init__(self, route: FastRoute, headers: list[tuple[bytes, bytes]], query: bytes, keep_alive: bool,
                 deadline: float) -> None:
        self.route = route
        self.deadline = deadline  # loop time by which the body must have arrived
        self.headers = headers
        self.query = query
        self.keep_alive = keep_alive
        self.body: list[bytes] = []


_STATUS_LINES: dict[int, bytes] = {}
#: (the server's default headers, {status: status line + those headers}): uvicorn replaces its
#: default headers list (``date``) once a second, so the head is rendered once a second per status
_HEADS: tuple[list[tuple[bytes, bytes]] | None, dict[int, bytes]] = (None, {})


def _response_head(status: int, defaults: list[tuple[bytes, bytes]]) -> bytes:
    """The status line and the server's ``defaults`` headers of a response."""
    global _HEADS
    if _HEADS[0] is not defaults:
        _HEADS = (defaults, {})
    head = _HEADS[1].get(status)
    if head is None:
        head = _HEADS[1][status] = _status_line(status) + b"".join(b"%s: %s\r\n" % hv for hv in defaults)
    return head


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())
    return line


def stream_ws(guard: Guard) -> type[WebSocketStream]:
    """oddsfeed's WebSocket protocol (:class:`streaming.sockets.WebSocketStream`) holding ``guard``'s per-IP slot."""

    class GuardedWebSocketStream(WebSocketStream):
        __slots__ = ()

    GuardedWebSocketStream.guard = guard
    return GuardedWebSocketStream


def install(config: Config, guard: Guard) -> None:
    """Swap ``config``'s protocol classes for the wrapped ones (before ``config.load()``)."""
    if config.loaded:
        raise RuntimeError("install() must run before the uvicorn config is loaded")
    http = config.http
    base_http = import_from_string(HTTP_PROTOCOLS.get(http, http)) if isinstance(http, str) else http
    if getattr(config, "http2", False):
        logger.warning("HTTP/2 configured: the header deadline and per-IP cap are not installed")
    else:
        config.http = guarded_http(base_http, guard)
        if not hasattr(base_http, "on_headers_complete"):  # h11: its own cap on an incomplete head (→ 400)
            config.h11_max_incomplete_event_size = guard.max_header_bytes
    ws = config.ws
    if isinstance(ws, str) and ws in ("auto", "websockets", "websockets-sansio"):
        config.ws_per_message_deflate = False
        config.ws = stream_ws(guard)
