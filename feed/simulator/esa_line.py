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
malformed-line fault switch both simulators offer).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import secrets
import time
from typing import Any, Generic, TypeVar

import orjson

from feed.simulator.betfair_api import Sessions

__all__ = ["EsaLineServer", "LineConn", "decode_clk", "encode_clk", "now_ms"]

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
