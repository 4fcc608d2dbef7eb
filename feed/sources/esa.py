"""Betfair Exchange Stream API (ESA) client over asyncio TCP, optionally TLS.

I/O only: this module frames the socket into lines, runs the protocol
handshake and the resume bookkeeping, and hands raw ``mcm`` lines to the
caller. It never decodes the market changes (``mc``); the normaliser does.

Wire (one compact JSON object per line, each terminated by ``\\r\\n``)::

    server  {"op":"connection","connectionId":"002-051134157842-432409"}
    client  {"op":"authentication","id":1,"appKey":"…","session":"…"}
    server  {"op":"status","id":1,"statusCode":"SUCCESS","connectionClosed":false}
    client  {"op":"marketSubscription","id":2,"marketFilter":{…},"marketDataFilter":{…},
             "heartbeatMs":5000,"segmentationEnabled":true[,"conflateMs":0][,"initialClk":"…","clk":"…"]}
    server  {"op":"status","id":2,"statusCode":"SUCCESS","connectionClosed":false}
    server  {"op":"mcm","id":2,"initialClk":"…","clk":"…","conflateMs":0,"heartbeatMs":5000,
             "pt":1627622269330,"ct":"SUB_IMAGE","mc":[…]}
    server  {"op":"mcm","id":2,"clk":"…","pt":1627622274806,"mc":[…]}          (deltas)
    server  {"op":"mcm","id":2,"clk":"…","pt":…,"ct":"HEARTBEAT"}               (idle)

Behaviour (see :class:`EsaClient`):

- ``on_lines(lines, recv_ms)`` receives the raw bytes of ``mcm`` lines (no
  ``\\r\\n``), possibly several per call, in wire order; ``recv_ms`` is
  ``clock_ms()`` (integer ms since the Unix epoch) when the socket chunk that
  completed them was read. Lines that are not valid JSON are handed over too
  (the normaliser quarantines them).
- Segmented messages (``segmentType`` SEG_START … SEG_END) are held back and
  handed over together at SEG_END; a disconnect mid-segment discards them.
- The resume cursor (``initialClk``, ``clk``) advances only after
  ``on_lines`` returned for the lines that carried it, so a caller that
  persists the cursor together with the data never skips data on resume.
- Health goes to ``on_health(state, reason)``, called on changes only:
  ``("UP", None)`` on the first mcm after (re)subscribing or after a 503,
  ``("DEGRADED", "upstream_503")`` while mcm carry ``status: 503`` (stays
  connected), ``("DOWN", "heartbeat_missed")`` after 2 × heartbeatMs without a
  byte, ``("DOWN", "reconnecting")`` on any other lost connection, and
  ``("DOWN", "<error code in lower case>")`` before a fatal error is raised.

Error tree (to move to ``feed/errors.py``)::

    EsaError                 a status FAILURE from the server; retried with backoff
     └── EsaFatalError       FATAL_ERROR_CODES: never retried, raised from run()
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson

from feed.aio import wait_event
from feed.sources.backoff import Backoff
from feed.sources.session import SessionClient

__all__ = [
    "FATAL_ERROR_CODES",
    "EsaClient",
    "EsaError",
    "EsaFatalError",
    "default_market_data_filter",
    "default_market_filter",
]

logger = logging.getLogger(__name__)

#: ESA ``errorCode`` values that retrying cannot fix: raised from ``run()``.
FATAL_ERROR_CODES: frozenset[str] = frozenset(
    {
        "NO_APP_KEY",
        "INVALID_APP_KEY",
        "NO_SESSION",
        "INVALID_SESSION_INFORMATION",
        "NOT_AUTHORIZED",
        "INVALID_INPUT",
        "INVALID_REQUEST",
        "SUBSCRIPTION_LIMIT_EXCEEDED",
    }
)

#: Bytes asked from the socket per read.
READ_SIZE = 1 << 20
#: A line longer than this (bytes) is a protocol violation: reconnect.
MAX_LINE_BYTES = 256 << 20


def default_market_filter() -> dict[str, Any]:
    """The ESA ``marketFilter`` used by default: every market (no criteria)."""
    return {}


def default_market_data_filter() -> dict[str, Any]:
    """The ESA ``marketDataFilter`` used by default.

    Best offers with virtual (cross-matched) prices 10 levels deep, traded
    ladder, traded volume, last traded price and the market definition.
    """
    return {
        "fields": ["EX_BEST_OFFERS_DISP", "EX_TRADED", "EX_TRADED_VOL", "EX_LTP", "EX_MARKET_DEF"],
        "ladderLevels": 10,
    }


class EsaError(Exception):
    """The ESA server answered a request with ``statusCode: FAILURE``.

    Attributes:
        code: the ESA ``errorCode`` (``TIMEOUT``, ``INVALID_CLOCK``, …).
        message: the server's ``errorMessage``, if any.
        request: what failed: ``authentication``, ``subscription`` or ``stream``.
    """

    def __init__(self, code: str, message: str | None = None, *, request: str = "stream") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.request = request

    def __str__(self) -> str:
        text = f"esa {self.request} failed: {self.code}"
        if self.message:
            text += f" ({self.message})"
        return text


class EsaFatalError(EsaError):
    """An :class:`EsaError` whose code is in :data:`FATAL_ERROR_CODES`."""


class _LinkLost(Exception):
    """The connection ended without a status from the server (EOF, framing)."""


class _HeartbeatMissed(_LinkLost):
    """No byte for 2 × heartbeatMs."""


class _ReconnectNow(Exception):
    """The server rejected our resume tokens and closed: reconnect fresh, no delay."""


class _CallbackFailed(Exception):
    """``on_lines`` raised; the original exception is the ``__cause__``."""


class _Envelope(msgspec.Struct, rename="camel", gc=False):
    """The protocol fields of any ESA message; ``mc`` is skipped unparsed."""

    op: str | None = None
    id: int | None = None
    ct: str | None = None
    clk: str | None = None
    initial_clk: str | None = None
    segment_type: str | None = None
    status: int | None = None
    status_code: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    connection_closed: bool | None = None
    connection_id: str | None = None
    heartbeat_ms: int | None = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode

# handshake phases
_AWAIT_CONNECTION, _AUTHENTICATING, _SUBSCRIBING, _AWAIT_IMAGE, _STREAMING = range(5)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class EsaClient(SessionClient):
    """One ESA market subscription, kept alive across disconnects.

    Args:
        host, port: the stream endpoint (``stream-api.betfair.com``, 443).
        app_key, session_token: credentials; never logged.
        market_filter: ESA ``marketFilter`` (``marketIds``, ``eventTypeIds``, …).
        market_data_filter: ESA ``marketDataFilter`` (``fields``, ``ladderLevels``).
        heartbeat_ms: requested heartbeat interval in ms (server clamps 500–30000).
        conflate_ms: requested conflation window in ms; ``None`` leaves it out.
        segmentation: request ``segmentationEnabled``.
        ssl: TLS context, or ``None`` for plain TCP (the local simulator).
        initial_clk, clk: resume tokens from a previous run (both or neither).
        on_lines: ``await on_lines(lines, recv_ms)`` with raw mcm lines.
        on_health: ``on_health(state, reason)`` on health changes.
        name: label for logs (source name).
        connect_timeout_s: limit for TCP/TLS connect and for the whole
            handshake, in seconds.
        clock_ms: wall clock in integer ms since the Unix epoch.
        backoff_initial_s, backoff_max_s: reconnect delays (full jitter), seconds.

    ``run()`` is meant to be awaited once; ``stop()`` ends it.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        app_key: str,
        session_token: str,
        market_filter: dict[str, Any],
        market_data_filter: dict[str, Any],
        heartbeat_ms: int = 5000,
        conflate_ms: int | None = None,
        segmentation: bool = True,
        ssl: _ssl.SSLContext | None = None,
        initial_clk: str | None = None,
        clk: str | None = None,
        on_lines: Callable[[list[bytes], int], Awaitable[None]],
        on_health: Callable[[str, str | None], None] = lambda state, reason: None,
        name: str = "betfair",
        connect_timeout_s: float = 10.0,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._host = host
        self._port = port
        self._app_key = app_key
        self._session_token = session_token
        self._market_filter = market_filter
        self._market_data_filter = market_data_filter
        self._heartbeat_ms = heartbeat_ms
        self._conflate_ms = conflate_ms
        self._segmentation = segmentation
        self._ssl = ssl
        self._initial_clk = initial_clk if initial_clk and clk else None
        self._clk = clk if initial_clk and clk else None
        self._on_lines = on_lines
        super().__init__(on_health)
        self._name = name
        self._connect_timeout_s = connect_timeout_s
        self._clock_ms = clock_ms
        self._backoff = Backoff(initial_s=backoff_initial_s, max_s=backoff_max_s)

        self._next_request_id = 0
        self._connection_id: str | None = None
        self._messages_received = 0
        self._reconnects = 0
        self._server_heartbeat_ms: int | None = None
        self._debug = logger.isEnabledFor(logging.DEBUG)

    def __repr__(self) -> str:
        return f"<EsaClient {self._name} {self._host}:{self._port}>"

    # -- public state -------------------------------------------------------

    @property
    def cursor(self) -> tuple[str | None, str | None]:
        """``(initialClk, clk)`` as last stored (after ``on_lines`` returned)."""
        return self._initial_clk, self._clk

    @property
    def connection_id(self) -> str | None:
        """The server's ``connectionId`` of the current (or last) connection."""
        return self._connection_id

    @property
    def messages_received(self) -> int:
        """Lines received since construction (every op, heartbeats included)."""
        return self._messages_received

    @property
    def reconnects(self) -> int:
        """Connection attempts after the first one."""
        return self._reconnects

    @property
    def heartbeat_ms(self) -> int:
        """The heartbeat interval in force: the server's echo, else the request."""
        return self._server_heartbeat_ms or self._heartbeat_ms

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        """Connect, authenticate, subscribe and stream until :meth:`stop`.

        Reconnects with jittered exponential backoff (reset after each
        successful subscription) on socket errors, EOF, missed heartbeats and
        retryable ESA errors, resuming with the stored cursor.

        Raises:
            EsaFatalError: the server rejected the credentials or the request.
            Exception: whatever ``on_lines`` raised, unchanged.
        """
        first = True
        while not self._stopping:
            if not first:
                self._reconnects += 1
            first = False
            delay: float | None = None
            reason = "reconnecting"
            self._session_task = asyncio.create_task(self._session(), name=f"esa-{self._name}")
            try:
                await self._session_task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._stopping and (current is None or current.cancelling() == 0):
                    break
                raise
            except EsaFatalError as exc:
                self._set_health("DOWN", exc.code.lower())
                logger.error("esa %s: %s; giving up", self._name, exc)
                raise
            except _CallbackFailed as exc:
                assert exc.__cause__ is not None
                raise exc.__cause__
            except _ReconnectNow:
                delay = 0.0
                why = "resume tokens rejected"
            except _HeartbeatMissed as exc:
                reason = "heartbeat_missed"
                why = str(exc)
            except (EsaError, _LinkLost, OSError, TimeoutError, EOFError) as exc:
                why = str(exc) or type(exc).__name__
            finally:
                self._session_task = None
            if self._stopping:
                break
            self._set_health("DOWN", reason)
            if delay is None:
                delay = self._backoff.next_delay()
            logger.info("esa %s: connection lost (%s); reconnecting in %.2f s", self._name, why, delay)
            if delay > 0:
                await wait_event(self._stop_event, delay)
        logger.info("esa %s: stopped", self._name)

    # -- one connection -----------------------------------------------------

    def _request_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id


    def _subscription(self, request_id: int) -> bytes:
        msg: dict[str, Any] = {
            "op": "marketSubscription",
            "id": request_id,
            "marketFilter": self._market_filter,
            "marketDataFilter": self._market_data_filter,
            "heartbeatMs": self._heartbeat_ms,
        }
        if self._conflate_ms is not None:
            msg["conflateMs"] = self._conflate_ms
        msg["segmentationEnabled"] = self._segmentation
        if self._initial_clk and self._clk:
            msg["initialClk"] = self._initial_clk
            msg["clk"] = self._clk
        return orjson.dumps(msg) + b"\r\n"

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        logger.info("esa %s: connecting to %s:%s", self._name, self._host, self._port)
        async with asyncio.timeout(self._connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
                limit=READ_SIZE,
            )
        try:
            await self._stream(loop, reader, writer)
        finally:
            writer.close()

    async def _stream(
        self,
        loop: asyncio.AbstractEventLoop,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        phase = _AWAIT_CONNECTION
        handshake_deadline = loop.time() + self._connect_timeout_s
        auth_id = sub_id = -1
        sent_tokens = False
        self._server_heartbeat_ms = None
        pending: list[bytes] = []  # pieces of an unterminated line
        pending_len = 0
        segment: list[bytes] | None = None  # lines of an open segment
        segment_initial_clk: str | None = None

        while True:
            # -- read one chunk, with the deadline of the current phase
            if phase < _AWAIT_IMAGE:
                timeout_s = handshake_deadline - loop.time()
                if timeout_s <= 0:
                    raise _LinkLost("handshake timed out")
            elif phase == _AWAIT_IMAGE:
                timeout_s = max(2 * self.heartbeat_ms / 1000, self._connect_timeout_s)
            else:
                timeout_s = 2 * self.heartbeat_ms / 1000
            try:
                async with asyncio.timeout(timeout_s):
                    chunk = await reader.read(READ_SIZE)
            except TimeoutError:
                if phase == _STREAMING:
                    raise _HeartbeatMissed(f"no data for {timeout_s:.1f} s") from None
                raise _LinkLost("handshake timed out") from None
            if not chunk:
                raise _LinkLost("connection closed by server")
            recv_ms = self._clock_ms()

            # -- frame into lines
            if b"\n" not in chunk:
                pending.append(chunk)
                pending_len += len(chunk)
                if pending_len > MAX_LINE_BYTES:
                    raise _LinkLost(f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if pending:
                pending.append(chunk)
                data = b"".join(pending)
                pending.clear()
            else:
                data = chunk
            lines = data.split(b"\n")
            tail = lines.pop()
            pending_len = len(tail)
            if tail:
                pending.append(tail)

            # -- dispatch
            batch: list[bytes] = []
            new_initial_clk: str | None = None
            new_clk: str | None = None
            for raw in lines:
                if raw[-1:] == b"\r":
                    raw = raw[:-1]
                if not raw:
                    continue
                self._messages_received += 1
                try:
                    env = _decode_envelope(raw)
                except msgspec.DecodeError:
                    # not JSON or not an object: the normaliser quarantines it
                    (segment if segment is not None else batch).append(raw)
                    continue
                op = env.op
                if op == "mcm":
                    if phase != _STREAMING:
                        phase = _STREAMING
                        if env.heartbeat_ms:
                            self._server_heartbeat_ms = env.heartbeat_ms
                    if env.status == 503:
                        self._set_health("DEGRADED", "upstream_503")
                    else:
                        self._set_health("UP", None)
                    seg_type = env.segment_type
                    if seg_type is None:
                        if segment is not None:
                            logger.warning("esa %s: unsegmented message inside a segment; segment dropped", self._name)
                            segment = None
                        batch.append(raw)
                        if env.initial_clk:
                            new_initial_clk = env.initial_clk
                        if env.clk:
                            new_clk = env.clk
                    elif seg_type == "SEG_START":
                        if segment is not None:
                            logger.warning("esa %s: segment restarted before its end; partial dropped", self._name)
                        segment = [raw]
                        segment_initial_clk = env.initial_clk
                    elif segment is None:
                        logger.warning("esa %s: %s without SEG_START; ignored", self._name, seg_type)
                    elif seg_type == "SEG_END":
                        segment.append(raw)
                        batch.extend(segment)
                        segment = None
                        if segment_initial_clk or env.initial_clk:
                            new_initial_clk = env.initial_clk or segment_initial_clk
                        if env.clk:
                            new_clk = env.clk
                    else:
                        segment.append(raw)
                elif op == "status":
                    # hand over what came before, in order, then act on the status
                    await self._deliver(batch, recv_ms, new_initial_clk, new_clk)
                    batch = []
                    new_initial_clk = new_clk = None
                    if env.status_code == "FAILURE":
                        code = env.error_code or "UNEXPECTED_ERROR"
                        request = (
                            "authentication" if env.id == auth_id else "subscription" if env.id == sub_id else "stream"
                        )
                        if code in FATAL_ERROR_CODES:
                            raise EsaFatalError(code, env.error_message, request=request)
                        if code == "INVALID_CLOCK" and sent_tokens:
                            logger.warning(
                                "esa %s: resume tokens rejected (INVALID_CLOCK); subscribing for a full image",
                                self._name,
                            )
                            self._initial_clk = self._clk = None
                            if env.connection_closed is False:
                                sub_id = self._request_id()
                                sent_tokens = False
                                phase = _SUBSCRIBING
                                handshake_deadline = loop.time() + self._connect_timeout_s
                                writer.write(self._subscription(sub_id))
                                continue
                            raise _ReconnectNow()
                        raise EsaError(code, env.error_message, request=request)
                    if env.id == auth_id and phase == _AUTHENTICATING:
                        phase = _SUBSCRIBING
                        sub_id = self._request_id()
                        sent_tokens = bool(self._initial_clk and self._clk)
                        writer.write(self._subscription(sub_id))
                    elif env.id == sub_id and phase == _SUBSCRIBING:
                        phase = _AWAIT_IMAGE
                        self._backoff.reset()
                        logger.info(
                            "esa %s: subscribed (id %d, %s)",
                            self._name,
                            sub_id,
                            "resuming from stored clk" if sent_tokens else "full image",
                        )
                elif op == "connection":
                    self._connection_id = env.connection_id
                    logger.info(
                        "esa %s: connected to %s:%s, connectionId %s",
                        self._name,
                        self._host,
                        self._port,
                        env.connection_id,
                    )
                    if phase == _AWAIT_CONNECTION:
                        phase = _AUTHENTICATING
                        auth_id = self._request_id()
                        writer.write(
                            orjson.dumps(
                                {
                                    "op": "authentication",
                                    "id": auth_id,
                                    "appKey": self._app_key,
                                    "session": self._session_token,
                                }
                            )
                            + b"\r\n"
                        )
                elif self._debug:
                    logger.debug("esa %s: ignored message with op %r", self._name, op)
            await self._deliver(batch, recv_ms, new_initial_clk, new_clk)

    async def _deliver(
        self,
        batch: list[bytes],
        recv_ms: int,
        initial_clk: str | None,
        clk: str | None,
    ) -> None:
        """Hand ``batch`` to ``on_lines``, then advance the stored cursor."""
        if batch:
            try:
                await self._on_lines(batch, recv_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise _CallbackFailed() from exc
        if initial_clk:
            self._initial_clk = initial_clk
        if clk:
            self._clk = clk
