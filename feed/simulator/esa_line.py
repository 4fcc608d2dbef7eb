"""What every local Betfair stream server shares: one line protocol, one handshake.

Betfair's Exchange Stream API and its sports-data stream (cricket, races) speak
the same CRLF-delimited JSON over TCP: the server greets with ``{"op":
"connection","connectionId"}``, the client must authenticate (``{"op":
"authentication","appKey","session"}``) within a deadline, ``heartbeat``
requests are answered at any time, every other op needs an authenticated
connection, and a refusal is a ``status`` with ``statusCode: FAILURE``,
``errorCode``, ``errorMessage`` and ``connectionClosed: true``, after which
the server closes. :class:`EsaLineServer` is that part, shared by
:mod:`feed.simulator.esa_server` (``marketSubscription``) and
:mod:`feed.simulator.cricket_server` (``cricketSubscription``); each
subclass names its subscription op and handles it in ``_subscribe``.
:class:`LineConn` is one client connection's writing side (with the
malformed-line fault switch every simulator offers).
:class:`SportsDataServer` adds what the sports-data streams share (cricket's
``ccm``, :mod:`feed.simulator.race_server`'s ``rcm``): change lines with a
``clk`` each, heartbeats, the subscription's checks and first line, and the
fault switches.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import secrets
import time
from typing import Any, Generic, TypeVar

import orjson

from feed.simulator.betfair_api import Sessions

__all__ = ["EsaLineServer", "LineConn", "SportsConn", "SportsDataServer", "cancel_tasks", "decode_clk", "encode_clk",
           "now_ms", "serve_until_interrupted"]

logger = logging.getLogger(__name__)


def now_ms() -> int:
    """Wall clock, integer ms since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


def encode_clk(seq: int) -> str:
    """A simulator's ``clk`` token for position ``seq`` (opaque to clients, as Betfair's is)."""
    return base64.b64encode(seq.to_bytes(9, "big")).decode()


def decode_clk(clk: Any) -> int | None:
    """The position of a ``clk`` token made by :func:`encode_clk`, None for anything else."""
    if not isinstance(clk, str):
        return None
    try:
        raw = base64.b64decode(clk, validate=True)
    except ValueError:
        return None
    return int.from_bytes(raw, "big") if len(raw) == 9 else None


async def cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks``, wait for each to end, and empty the list."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()


def serve_until_interrupted(sim: Any, banner: str, kind: str) -> None:
    """Run sports-data simulator ``sim`` until Ctrl-C (a ``python -m`` entry point): print
    ``banner … on HOST:PORT`` and the ``--source <kind>=…`` line that reaches it."""
    cfg = sim.config

    async def serve() -> None:
        await sim.start()
        print(f"{banner} on {cfg.host}:{sim.port}", flush=True)
        print(f"  --source {kind}={cfg.host}:{sim.port},app_key={cfg.app_key},session={cfg.session_token}",
              flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


class LineConn:
    """One client connection: CRLF-delimited JSON lines written to its transport.
    ``malformed``: that many bad lines (the subclass's ``MALFORMED``) go out
    before the next write (a fault switch)."""

    MALFORMED: tuple[bytes, ...] = (b"this is not json",)
    #: a refused connection is aborted (RST) rather than closed after its last line
    ABORT_ON_CLOSE = False

    __slots__ = ("authenticated", "closed", "connection_id", "last_send_ms", "malformed", "transport", "writer")

    def __init__(self, writer: asyncio.StreamWriter, connection_id: str) -> None:
        self.writer = writer
        self.transport = writer.transport
        self.connection_id = connection_id
        self.authenticated = False
        self.closed = False
        self.last_send_ms = 0
        self.malformed = 0

    def write(self, lines: list[bytes]) -> None:
        if self.closed:
            return
        if self.transport.is_closing():  # the peer went away (a client killed) before we noticed: uvloop
            self.closed = True           # raises on a write to a closed transport, which ended the ticker
            return
        if self.malformed:
            bad = self.MALFORMED
            lines = [bad[i % len(bad)] for i in range(self.malformed)] + lines
            self.malformed = 0
        self.transport.write(b"\r\n".join(lines) + b"\r\n")

    def close(self, abort: bool | None = None) -> None:
        if not self.closed:
            self.closed = True
            if self.ABORT_ON_CLOSE if abort is None else abort:
                self.transport.abort()
            else:
                self.transport.close()


C = TypeVar("C", bound=LineConn)


class EsaLineServer(Generic[C]):
    """The shared server side (see the module docstring). A subclass sets
    :attr:`subscription_op`, :attr:`label` and :attr:`conn_class`, has
    ``config.app_key`` / ``config.auth_timeout_s`` and ``sessions``, and
    implements :meth:`_subscribe`."""

    subscription_op = ""
    label = "esa simulator"
    conn_class: type[C]
    config: Any
    sessions: Sessions

    def _init_lines(self) -> None:
        """Call from ``__init__``: the connection registry and counters."""
        self._conns: set[C] = set()
        self._conn_seq = itertools.count(1)
        self.connections_accepted = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn_class(writer, f"sim-{next(self._conn_seq):03d}-{secrets.randbelow(10**12):012d}")
        self._conns.add(conn)
        self.connections_accepted += 1
        conn.write([orjson.dumps({"op": "connection", "connectionId": conn.connection_id})])
        deadline = loop.time() + self.config.auth_timeout_s
        try:
            while not conn.closed:
                try:
                    if conn.authenticated:
                        line = await reader.readline()
                    else:
                        async with asyncio.timeout_at(deadline):
                            line = await reader.readline()
                except TimeoutError:
                    self._fail(conn, None, "TIMEOUT", "Timed out trying to read message make sure to add \\r\\n")
                    break
                except (ValueError, ConnectionError):
                    break
                if not line:
                    break
                line = line.strip()
                if line:
                    self._request(conn, line)
        except asyncio.CancelledError:
            # loop shutdown; return quietly (3.11's start_server callback calls
            # task.exception() on cancelled handler tasks)
            pass
        finally:
            conn.close()
            self._conns.discard(conn)

    def _status_ok(self, conn: C, req_id: Any, **extra: Any) -> None:
        msg: dict[str, Any] = {"op": "status"}
        if req_id is not None:
            msg["id"] = req_id
        msg.update(statusCode="SUCCESS", connectionClosed=False, **extra)
        conn.write([orjson.dumps(msg)])

    def _fail(self, conn: C, req_id: Any, code: str, message: str) -> None:
        msg: dict[str, Any] = {"op": "status"}
        if req_id is not None:
            msg["id"] = req_id
        msg.update(statusCode="FAILURE", errorCode=code, errorMessage=message, connectionClosed=True,
                   connectionId=conn.connection_id)
        conn.write([orjson.dumps(msg)])
        conn.close()
        logger.info("%s: %s closed with %s", self.label, conn.connection_id, code)

    def _request(self, conn: C, line: bytes) -> None:
        try:
            req = orjson.loads(line)
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            self._fail(conn, None, "INVALID_INPUT", "Failed to unmarshal message")
            return
        op, req_id = req.get("op"), req.get("id")
        if op == "authentication":
            session = req.get("session")
            if not req.get("appKey"):
                self._fail(conn, req_id, "NO_APP_KEY", "AppKey is not provided")
            elif req["appKey"] != self.config.app_key:
                self._fail(conn, req_id, "INVALID_APP_KEY", "AppKey is not valid")
            elif code := self.sessions.check(session if isinstance(session, str) else None):
                self._fail(conn, req_id, code, "Session token is not provided" if code == "NO_SESSION"
                           else "Session token is not valid or has expired")
            else:
                conn.authenticated = True
                self._status_ok(conn, req_id, connectionsAvailable=9)
        elif op == "heartbeat":
            self._status_ok(conn, req_id)
        elif not conn.authenticated:
            self._fail(conn, req_id, "NOT_AUTHORIZED", "Connection is not authenticated")
        elif op == self.subscription_op:
            self._subscribe(conn, req)
        else:
            self._fail(conn, req_id, "INVALID_REQUEST", f"Unsupported op: {op}")

    def _subscribe(self, conn: C, req: dict[str, Any]) -> None:
        raise NotImplementedError


class SportsConn(LineConn):
    """A connection of a sports-data stream (cricket, races): its subscription id,
    whether it subscribed, and its heartbeat interval (ms)."""

    ABORT_ON_CLOSE = True
    __slots__ = ("heartbeat_ms", "sub_id", "subscribed")

    def __init__(self, writer: asyncio.StreamWriter, connection_id: str) -> None:
        super().__init__(writer, connection_id)
        self.subscribed = False
        self.sub_id: Any = None
        self.heartbeat_ms = 5000


S = TypeVar("S", bound=SportsConn)


class SportsDataServer(EsaLineServer[S]):
    """What Betfair's sports-data streams share (:mod:`feed.simulator.cricket_server`,
    :mod:`feed.simulator.race_server`): one change op (``ccm`` / ``rcm``) whose lines
    carry their entries under one key (``cc`` / ``rc``), a ``clk`` per change
    (:attr:`seq`), ``initialClk`` per server, heartbeats, the subscription's
    checks, and the fault switches ``drop_connections`` / ``set_degraded`` /
    ``inject_malformed``. A subclass sets :attr:`change_op` and
    :attr:`change_key`, calls :meth:`_init_sports` from ``__init__``, starts
    :meth:`_heartbeats` as a task in :attr:`_tasks`, and in ``_subscribe``
    calls :meth:`_accept` then :meth:`_reply`."""

    change_op = ""
    change_key = ""

    def _init_sports(self) -> None:
        """Call from ``__init__`` (after ``_init_lines``)."""
        self.subscriptions: Any = []
        self.messages_sent = 0
        self.initial_clk = base64.b64encode(secrets.token_bytes(21)).decode()
        self.seq = 0
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = asyncio.Event()
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._degraded = False
        self._malformed_next = 0

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        for conn in list(self._conns):
            conn.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    # -- fault switches ---------------------------------------------------------------

    def drop_connections(self) -> None:
        """Close every client socket now (the upstream goes on)."""
        for conn in list(self._conns):
            conn.close()

    def set_degraded(self, on: bool) -> None:
        """While on, every change line (heartbeats too) carries ``status: 503``."""
        self._degraded = on

    def inject_malformed(self, n: int = 1) -> None:
        """``n`` invalid lines before the next message of each subscribed connection."""
        targets = [c for c in self._conns if c.subscribed]
        if not targets:
            self._malformed_next += n
        for conn in targets:
            conn.malformed += n

    # -- the subscription ----------------------------------------------------------------

    def _accept(self, conn: S, req: dict[str, Any]) -> tuple[bool, int | None]:
        """Check a subscription (``heartbeatMs`` an int, clamped 500–30000; resume tokens
        this server issued and not ahead of it) and, when good, take it: the connection
        subscribed, pending malformed lines moved to it, ``status`` SUCCESS. Returns
        (accepted, the seq the tokens name — None for a subscription without them)."""
        self.subscriptions.append(req)
        req_id = req.get("id")
        hb = req.get("heartbeatMs", 5000)
        if not isinstance(hb, int) or isinstance(hb, bool):
            self._fail(conn, req_id, "INVALID_INPUT", "Invalid subscription")
            return False, None
        initial_clk, clk = req.get("initialClk"), req.get("clk")
        since: int | None = None
        if initial_clk and clk:
            since = decode_clk(clk)
            if initial_clk != self.initial_clk or since is None or since > self.seq:
                self._fail(conn, req_id, "INVALID_CLOCK", "Invalid clock")
                return False, None
        conn.sub_id, conn.heartbeat_ms, conn.subscribed = req_id, min(max(hb, 500), 30000), True
        if self._malformed_next:
            conn.malformed += self._malformed_next
            self._malformed_next = 0
        self._status_ok(conn, req_id)
        return True, since

    def _reply(self, conn: S, resume: bool, entries: list[Any]) -> None:
        """The subscription's first line: ``SUB_IMAGE`` (or ``RESUB_DELTA`` for a resume)
        with ``initialClk``, ``clk``, ``heartbeatMs`` and ``entries`` (none: no key)."""
        msg: dict[str, Any] = {"op": self.change_op, "id": conn.sub_id, "initialClk": self.initial_clk,
                               "clk": encode_clk(self.seq), "heartbeatMs": conn.heartbeat_ms}
        if self._degraded:
            msg["status"] = 503
        msg["pt"] = now_ms()
        msg["ct"] = "RESUB_DELTA" if resume else "SUB_IMAGE"
        if entries:
            msg[self.change_key] = entries
        conn.write([orjson.dumps(msg)])
        conn.last_send_ms = now_ms()
        self._started.set()

    # -- messages ------------------------------------------------------------------------

    def _broadcast(self, entries: list[Any]) -> None:
        """One change line carrying ``entries`` (a new ``clk``) to every subscriber."""
        self.seq += 1
        self.messages_sent += 1
        now = now_ms()
        clk = encode_clk(self.seq)
        body = orjson.dumps(entries)
        key = b',"%s":' % self.change_key.encode()
        for conn in list(self._conns):
            if not conn.subscribed or conn.closed:
                continue
            head = orjson.dumps({"op": self.change_op, "id": conn.sub_id, "clk": clk,
                                 **({"status": 503} if self._degraded else {}), "pt": now})
            conn.write([head[:-1] + key + body + b"}"])
            conn.last_send_ms = now

    async def _heartbeats(self) -> None:
        """``ct: HEARTBEAT`` (the current ``clk``) to a subscriber after its ``heartbeatMs``
        without a line; checked every ``config.tick_ms``."""
        tick_s = max(self.config.tick_ms, 1) / 1000
        while True:
            await asyncio.sleep(tick_s)
            now = now_ms()
            for conn in list(self._conns):
                if conn.subscribed and not conn.closed and now - conn.last_send_ms >= conn.heartbeat_ms:
                    msg: dict[str, Any] = {"op": self.change_op, "id": conn.sub_id, "clk": encode_clk(self.seq)}
                    if self._degraded:
                        msg["status"] = 503
                    msg["pt"] = now
                    msg["ct"] = "HEARTBEAT"
                    conn.write([orjson.dumps(msg)])
                    conn.last_send_ms = now
