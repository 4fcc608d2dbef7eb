"""The Betfair Exchange Stream API (ESA) protocol, sans I/O.

:class:`EsaProtocol` is the whole client side of the ESA wire protocol with no
sockets, no asyncio and no clock: it is fed the bytes read from the
connection (:meth:`~EsaProtocol.receive_data`) and hands back typed events
(:meth:`~EsaProtocol.events_received`) and the bytes to write
(:meth:`~EsaProtocol.data_to_send`), the shape of ``websockets``'
``Protocol``. :class:`feed.sources.esa.EsaClient` is the asyncio glue around
it (connect, read, write, timeouts, backoff, health).

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

What the protocol owns:

- **Framing**: lines end with ``\\n`` (a preceding ``\\r`` is dropped); a
  line may arrive over any number of :meth:`~EsaProtocol.receive_data`
  calls. A line longer than ``max_line_bytes`` raises :class:`EsaFramingError`.
- **Handshake**: ``connection`` → authentication → ``status`` SUCCESS →
  ``marketSubscription`` (with the stored cursor, if any) → ``status``
  SUCCESS → the first ``mcm``. Request ids grow across connections.
- **Envelope decode only**: each line is decoded once here, into
  :class:`_Envelope` (``op``, ``id``, ``ct``, ``clk``, ``initialClk``,
  ``segmentType``, ``status``, …); the market changes (``mc``) are skipped by
  the decoder without being built, and the raw line is handed over for the
  normaliser, which decodes ``mc``. Lines that are not a JSON object are
  handed over as they are (the normaliser quarantines them).
- **Segmentation**: ``SEG_START`` … ``SEG_END`` lines are held and emitted
  together in one :class:`MarketChanges` at ``SEG_END``; a segment cut by
  the end of the connection, by an unsegmented message or by another
  ``SEG_START`` is dropped (:class:`SegmentDropped`), never delivered.
- **The resume cursor** ``(initialClk, clk)``, in one place: every delivery
  event carries the tokens its lines brought; the cursor advances only when
  the caller :meth:`~EsaProtocol.commit`\\ s the event, after it has handed
  the lines on, so a caller that persists the cursor with the data never
  skips data on resume. ``INVALID_CLOCK`` in answer to a resubscription
  clears it (and resubscribes for a full image if the connection stays open).

Events, in wire order (all in this module): :class:`Connected`,
:class:`Authenticated`, :class:`Subscribed`, :class:`StreamStatus` (first
``mcm`` of a connection and each change of the ``mcm`` ``status``),
:class:`MarketChanges` and :class:`Heartbeat` (the deliveries),
:class:`SegmentStarted`, :class:`SegmentDropped`, :class:`ResumeRejected`,
:class:`StatusFailure` and :class:`Ignored`.

Errors (drawn in the tree of :mod:`feed.errors`)::

    SourceError
     ├── RetryableSourceError
     │    └── EsaFramingError     the byte stream cannot be framed (line too long)
     ├── FatalSourceError
     └── EsaError                 a status FAILURE from the server; retried with backoff
          └── EsaFatalError       FATAL_ERROR_CODES: never retried (also a FatalSourceError)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from feed.errors import FatalSourceError, RetryableSourceError, SourceError

__all__ = [
    "CRICKET_STREAM",
    "DEFAULT_HEARTBEAT_MS",
    "FATAL_ERROR_CODES",
    "MARKET_STREAM",
    "MAX_LINE_BYTES",
    "SESSION_ERROR_CODES",
    "Authenticated",
    "Connected",
    "Delivery",
    "EsaError",
    "EsaFatalError",
    "EsaFramingError",
    "EsaProtocol",
    "Event",
    "Heartbeat",
    "Ignored",
    "MarketChanges",
    "Phase",
    "ResumeRejected",
    "SegmentDropped",
    "SegmentStarted",
    "StatusFailure",
    "StreamKind",
    "StreamStatus",
    "Subscribed",
]

#: ESA ``errorCode`` values that retrying cannot fix.
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

#: ESA ``errorCode`` values that say the session token is missing, invalid or
#: expired: fatal to a client holding a fixed token, a new login for one that
#: can log in (:class:`feed.sources.esa.EsaClient` with a ``login``).
SESSION_ERROR_CODES: frozenset[str] = frozenset({"NO_SESSION", "INVALID_SESSION_INFORMATION"})

#: A line longer than this (bytes) is a protocol violation.
MAX_LINE_BYTES = 256 << 20
#: Longest segment held (bytes, SEG_START … SEG_END together); past it the segment is dropped and
#: the connection ends (EsaFramingError, as for a line too long) — one never ended must not grow memory.
MAX_SEGMENT_BYTES = 512 << 20

#: The server's heartbeat interval (ms) when the subscription asks for none.
DEFAULT_HEARTBEAT_MS = 5000


@dataclass(slots=True, frozen=True)
class StreamKind:
    """Which subscription a protocol speaks: the request ``op``, the ``op`` of
    the change messages it answers with, and the ``errorCode`` s that, in
    answer to a subscription carrying ``initialClk``/``clk``, mean "not from
    there" (the cursor is dropped and a subscription without it follows,
    :class:`ResumeRejected`) rather than a failure."""

    subscribe_op: str
    change_op: str
    resume_rejected: frozenset[str] = frozenset({"INVALID_CLOCK"})


#: The Exchange Stream API's market stream (``stream-api.betfair.com``).
MARKET_STREAM = StreamKind("marketSubscription", "mcm")
#: The sports-data stream's cricket scores (``sports-data-stream-api.betfair.com``):
#: ``cricketSubscription`` → ``ccm`` lines with one ``cc`` entry per match.
#: Betfair documents no resume for it (betfairlightweight and flumine send
#: ``op`` and ``id`` only); a server that refuses the tokens as input
#: (``INVALID_INPUT``) is answered like ``INVALID_CLOCK``: a subscription
#: without them.
CRICKET_STREAM = StreamKind("cricketSubscription", "ccm", frozenset({"INVALID_CLOCK", "INVALID_INPUT"}))
#: The sports-data stream's race progress (Total Performance Data): ``raceSubscription``
#: → ``rcm`` lines with one ``rc`` entry per race. No documented resume either (betfairlightweight's
#: ``subscribe_to_races`` sends ``op`` and ``id`` only): tokens refused → a subscription without them.
RACE_STREAM = StreamKind("raceSubscription", "rcm", frozenset({"INVALID_CLOCK", "INVALID_INPUT"}))


# -- errors -----------------------------------------------------------------------------


class EsaError(SourceError):
    """The ESA server answered a request with ``statusCode: FAILURE``.

    Attributes:
        code: the ESA ``errorCode`` (``TIMEOUT``, ``INVALID_CLOCK``, …).
        message: the server's ``errorMessage`` (``""`` when it gave none).
        request: what failed: ``authentication``, ``subscription`` or ``stream``.
    """

    def __init__(self, code: str, message: str | None = None, *, request: str = "stream") -> None:
        super().__init__(message or "", code)
        self.code: str = code
        self.request = request
        self.args = (code, message)

    def __str__(self) -> str:
        text = f"esa {self.request} failed: {self.code}"
        if self.message:
            text += f" ({self.message})"
        return text


class EsaFatalError(EsaError, FatalSourceError):
    """An :class:`EsaError` whose code is in :data:`FATAL_ERROR_CODES`; also a
    :class:`~feed.errors.FatalSourceError`, so a supervisor does not restart it."""


class EsaFramingError(RetryableSourceError):
    """The received bytes cannot be framed into lines (a line is too long)."""


# -- events -----------------------------------------------------------------------------


class Event:
    """Base of everything :meth:`EsaProtocol.events_received` returns."""

    __slots__ = ()


@dataclass(slots=True, eq=False)
class Delivery(Event):
    """Lines to hand to the normaliser, and the cursor tokens they carry.

    Attributes:
        lines: raw lines, without ``\\r\\n``, in wire order.
        initial_clk, clk: the newest resume tokens among ``lines`` (``None``
            when they carry none); stored by :meth:`EsaProtocol.commit`.
        epoch: the protocol's cursor epoch when emitted; a cursor reset
            (``INVALID_CLOCK``) makes older deliveries commit nothing.
    """

    lines: list[bytes]
    initial_clk: str | None = None
    clk: str | None = None
    epoch: int = 0


@dataclass(slots=True, eq=False)
class MarketChanges(Delivery):
    """``mcm`` lines (and undecodable lines, left to the normaliser to reject).

    Consecutive unsegmented lines of one :meth:`EsaProtocol.receive_data`
    call come as one event; a completed segment (``SEG_START`` … ``SEG_END``)
    comes as one event with ``segmented=True``.
    """

    segmented: bool = False


@dataclass(slots=True, eq=False)
class Heartbeat(Delivery):
    """An ``mcm`` with ``ct: HEARTBEAT`` (one line; usually carries ``clk``)."""


@dataclass(slots=True, frozen=True)
class Connected(Event):
    """The server's ``connection`` message; the authentication is queued."""

    connection_id: str | None


@dataclass(slots=True, frozen=True)
class Authenticated(Event):
    """The authentication succeeded; the subscription is queued."""

    request_id: int


@dataclass(slots=True, frozen=True)
class Subscribed(Event):
    """The subscription succeeded; ``resumed`` when it carried stored tokens."""

    request_id: int
    resumed: bool


@dataclass(slots=True, frozen=True)
class StreamStatus(Event):
    """The ``status`` of ``mcm`` messages: ``503`` while the upstream is
    degraded, ``None`` when healthy. Emitted on the first ``mcm`` of a
    connection and whenever it changes."""

    status: int | None


@dataclass(slots=True, frozen=True)
class SegmentStarted(Event):
    """A ``SEG_START`` arrived: lines are held until ``SEG_END``."""


@dataclass(slots=True, frozen=True)
class SegmentDropped(Event):
    """An open segment was abandoned and its lines will never be delivered.

    Attributes:
        reason: ``connection_lost``, ``unsegmented_message`` or ``restarted``.
        lines: how many lines were dropped.
    """

    reason: str
    lines: int


@dataclass(slots=True, frozen=True)
class ResumeRejected(Event):
    """``INVALID_CLOCK`` in answer to a subscription with stored tokens; the
    cursor was cleared. ``resubscribed``: the connection stays open and a
    subscription for a full image is queued; otherwise the caller should
    reconnect at once (the next subscription carries no tokens)."""

    resubscribed: bool


@dataclass(slots=True, frozen=True)
class StatusFailure(Event):
    """A ``status`` with ``statusCode: FAILURE``; the protocol is closed.

    Attributes:
        code: ``errorCode`` (``UNEXPECTED_ERROR`` if absent).
        message: ``errorMessage``.
        request: ``authentication``, ``subscription`` or ``stream``.
        connection_closed: the server's ``connectionClosed``.
        fatal: ``code`` is in :data:`FATAL_ERROR_CODES`.
    """

    code: str
    message: str | None
    request: str
    connection_closed: bool | None
    fatal: bool

    def error(self) -> EsaError:
        """The exception to raise: :class:`EsaFatalError` or :class:`EsaError`."""
        cls = EsaFatalError if self.fatal else EsaError
        return cls(self.code, self.message, request=self.request)


@dataclass(slots=True, frozen=True)
class Ignored(Event):
    """A line the protocol did not act on: an ``op`` the client has no use
    for (``reason`` None), or an out-of-place segment piece (``reason`` says
    which)."""

    op: str | None
    reason: str | None = None


# -- the protocol -----------------------------------------------------------------------


class Phase(enum.IntEnum):
    """Where a connection is in the handshake (ordered)."""

    AWAIT_CONNECTION = 0
    AUTHENTICATING = 1
    SUBSCRIBING = 2
    AWAIT_IMAGE = 3
    STREAMING = 4
    CLOSED = 5


class _Envelope(msgspec.Struct, rename="camel", gc=False):
    """The protocol fields of any ESA message; ``mc`` and the rest are skipped
    by the decoder (validated as JSON, never built)."""

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
_DecodeError = msgspec.DecodeError
_NO_STATUS = object()  # "no mcm seen yet on this connection"


class EsaProtocol:
    """Client side of one ESA subscription, across connections.

    Args:
        app_key, session_token: credentials (sent, never kept in events).
        market_filter: ESA ``marketFilter`` (``None`` leaves it out).
        market_data_filter: ESA ``marketDataFilter`` (``None`` leaves it out).
        heartbeat_ms: requested heartbeat interval, ms; ``None`` leaves it
            out (the server's default, :data:`DEFAULT_HEARTBEAT_MS`, applies).
        conflate_ms: requested conflation window, ms; ``None`` leaves it out.
        segmentation: request ``segmentationEnabled``; ``None`` leaves it out.
        initial_clk, clk: stored resume tokens (both or neither; one alone
            is ignored).
        max_line_bytes: longest acceptable line, bytes.
        stream: the subscription spoken (:data:`MARKET_STREAM`, the default,
            or :data:`CRICKET_STREAM`); its change ``op`` is what
            :class:`MarketChanges` / :class:`Heartbeat` carry. Everything else
            (handshake, framing, segments, ``clk`` cursor, status codes) is
            the same on both endpoints.

    Use: :meth:`connection_made` when a connection opens, then
    :meth:`receive_data` for each chunk read, write :meth:`data_to_send`,
    act on :meth:`events_received` (and :meth:`commit` each
    :class:`Delivery` once its lines are handed on), and
    :meth:`connection_lost` when it ends. The object is reused for the next
    connection and keeps the cursor and the request-id counter.
    """

    def __init__(
        self,
        *,
        app_key: str,
        session_token: str,
        market_filter: dict[str, Any] | None = None,
        market_data_filter: dict[str, Any] | None = None,
        heartbeat_ms: int | None = 5000,
        conflate_ms: int | None = None,
        segmentation: bool | None = True,
        initial_clk: str | None = None,
        clk: str | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        stream: StreamKind | None = None,
    ) -> None:
        self._app_key = app_key
        self._session_token = session_token
        self._stream = stream or MARKET_STREAM
        self._change_op = self._stream.change_op
        self._market_filter = market_filter
        self._market_data_filter = market_data_filter
        self._heartbeat_ms = heartbeat_ms
        self._conflate_ms = conflate_ms
        self._segmentation = segmentation
        self._max_line_bytes = max_line_bytes
        # the resume cursor: the one place it lives
        self._initial_clk = initial_clk if initial_clk and clk else None
        self._clk = clk if initial_clk and clk else None
        self._epoch = 0
        self._next_request_id = 0
        self._messages_received = 0
        # per connection (reset by connection_made)
        self._phase = Phase.CLOSED
        self._auth_id = -1
        self._sub_id = -1
        self._sent_tokens = False
        self._server_heartbeat_ms: int | None = None
        self._stream_status: object = _NO_STATUS
        self._pending: list[bytes] = []  # pieces of an unterminated line
        self._pending_len = 0
        self._segment: list[bytes] | None = None
        self._segment_bytes = 0
        self._segment_initial_clk: str | None = None
        self._events: list[Event] = []
        self._out: list[bytes] = []

    # -- state ------------------------------------------------------------------------

    @property
    def cursor(self) -> tuple[str | None, str | None]:
        """``(initialClk, clk)`` as last committed; ``(None, None)`` when none."""
        return self._initial_clk, self._clk

    @property
    def phase(self) -> Phase:
        """The handshake phase of the current connection (``CLOSED`` between)."""
        return self._phase

    @property
    def heartbeat_ms(self) -> int:
        """The heartbeat interval in force, ms: the server's echo, else the request."""
        return self._server_heartbeat_ms or self._heartbeat_ms or DEFAULT_HEARTBEAT_MS

    @property
    def messages_received(self) -> int:
        """Non-empty lines received since construction (all connections, every op)."""
        return self._messages_received

    @property
    def segment_open(self) -> bool:
        """A segment has started and not yet ended."""
        return self._segment is not None

    # -- connection lifecycle ---------------------------------------------------------

    def connection_made(self) -> None:
        """A new connection is open: forget the last one's buffers and phase."""
        self._phase = Phase.AWAIT_CONNECTION
        self._auth_id = self._sub_id = -1
        self._sent_tokens = False
        self._server_heartbeat_ms = None
        self._stream_status = _NO_STATUS
        self._pending.clear()
        self._pending_len = 0
        self._segment = None
        self._segment_initial_clk = None
        self._out.clear()

    def connection_lost(self) -> None:
        """The connection ended (EOF, error, timeout): an open segment is
        dropped (:class:`SegmentDropped`), unsent and unframed bytes are
        discarded. Idempotent."""
        self._drop_segment("connection_lost")
        self._phase = Phase.CLOSED
        self._pending.clear()
        self._pending_len = 0
        self._out.clear()

    # -- I/O boundary -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the connection (any split; may end mid-line).

        Raises:
            EsaFramingError: a line exceeds ``max_line_bytes``.
        """
        if self._phase is Phase.CLOSED or not data:
            return
        if b"\n" not in data:
            self._pending.append(data)
            self._pending_len += len(data)
            if self._pending_len > self._max_line_bytes:
                raise EsaFramingError(f"line longer than {self._max_line_bytes} bytes")
            return
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending.clear()
        lines = data.split(b"\n")
        tail = lines.pop()
        self._pending_len = len(tail)
        if tail:
            self._pending.append(tail)
        # The common line (an unsegmented, non-heartbeat mcm while streaming
        # healthy, no segment open) takes the inlined fast path: one envelope
        # decode and an append to the open MarketChanges; anything else goes
        # through _line. Both give the same events.
        decode = _decode_envelope
        events = self._events
        current: MarketChanges | None = None  # the open batch, if the last event
        fast = self._fast_path_open()
        count = 0
        for raw in lines:
            if raw[-1:] == b"\r":
                raw = raw[:-1]
            if not raw:
                continue
            count += 1
            try:
                env = decode(raw)
            except _DecodeError:
                env = None
            if (
                fast
                and env is not None
                and env.op == self._change_op
                and env.segment_type is None
                and env.status is None
                and env.ct != "HEARTBEAT"
            ):
                if current is None:
                    self._deliver(raw, env.initial_clk, env.clk)
                    current = events[-1]  # type: ignore[assignment]
                else:
                    current.lines.append(raw)
                    if env.initial_clk:
                        current.initial_clk = env.initial_clk
                    if env.clk:
                        current.clk = env.clk
                continue
            self._line(raw, env)
            current = None
            if self._phase is Phase.CLOSED:
                break
            fast = self._fast_path_open()
        self._messages_received += count
        if self._pending_len > self._max_line_bytes:
            raise EsaFramingError(f"line longer than {self._max_line_bytes} bytes")

    def events_received(self) -> list[Event]:
        """Events since the last call, in wire order."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write since the last call (``b""`` when none)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def set_session_token(self, session_token: str) -> None:
        """Authenticate the next connections with ``session_token`` (a new
        login after ``NO_SESSION`` / ``INVALID_SESSION_INFORMATION``)."""
        self._session_token = session_token

    def forget_cursor(self) -> None:
        """Drop the ``initialClk``/``clk`` cursor: the next subscription asks
        for a full image (``SUB_IMAGE``); deliveries emitted before this can
        no longer bring the old tokens back."""
        self._initial_clk = self._clk = None
        self._epoch += 1

    def commit(self, delivery: Delivery) -> None:
        """``delivery``'s lines were handed on: advance the cursor to its
        tokens (unless the cursor was reset after it was emitted)."""
        if delivery.epoch != self._epoch:
            return
        if delivery.initial_clk:
            self._initial_clk = delivery.initial_clk
        if delivery.clk:
            self._clk = delivery.clk

    # -- requests ---------------------------------------------------------------------

    def _request_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id

    def authentication(self, request_id: int) -> bytes:
        """The ``authentication`` request line (with ``\\r\\n``)."""
        return orjson.dumps(
            {"op": "authentication", "id": request_id, "appKey": self._app_key, "session": self._session_token}
        ) + b"\r\n"

    def subscription(self, request_id: int) -> bytes:
        """The subscription request line (with ``\\r\\n``): ``marketSubscription``
        or the stream kind's op, with the options that were given (``None``
        leaves a field out), carrying ``initialClk``/``clk`` when a cursor is
        stored."""
        msg: dict[str, Any] = {"op": self._stream.subscribe_op, "id": request_id}
        if self._market_filter is not None:
            msg["marketFilter"] = self._market_filter
        if self._market_data_filter is not None:
            msg["marketDataFilter"] = self._market_data_filter
        if self._heartbeat_ms is not None:
            msg["heartbeatMs"] = self._heartbeat_ms
        if self._conflate_ms is not None:
            msg["conflateMs"] = self._conflate_ms
        if self._segmentation is not None:
            msg["segmentationEnabled"] = self._segmentation
        if self._initial_clk and self._clk:
            msg["initialClk"] = self._initial_clk
            msg["clk"] = self._clk
        return orjson.dumps(msg) + b"\r\n"

    def _subscribe(self) -> None:
        self._sub_id = self._request_id()
        self._sent_tokens = bool(self._initial_clk and self._clk)
        self._phase = Phase.SUBSCRIBING
        self._out.append(self.subscription(self._sub_id))

    # -- dispatch ---------------------------------------------------------------------

    def _deliver(self, line: bytes, initial_clk: str | None, clk: str | None) -> None:
        """Append one unsegmented line to the open MarketChanges event, or open one."""
        events = self._events
        last = events[-1] if events else None
        if type(last) is MarketChanges and not last.segmented:
            last.lines.append(line)
            if initial_clk:
                last.initial_clk = initial_clk
            if clk:
                last.clk = clk
        else:
            events.append(MarketChanges([line], initial_clk, clk, self._epoch))

    def _drop_segment(self, reason: str) -> None:
        if self._segment is not None:
            self._events.append(SegmentDropped(reason, len(self._segment)))
            self._segment = None
            self._segment_initial_clk = None

    def _fast_path_open(self) -> bool:
        return self._phase is Phase.STREAMING and self._stream_status is None and self._segment is None

    def _line(self, raw: bytes, env: _Envelope | None) -> None:
        """Dispatch one line; ``env`` is its envelope, ``None`` if undecodable."""
        if env is None:
            # not JSON or not an object: the normaliser quarantines it
            if self._segment is not None:
                self._segment_append(raw)
            else:
                self._deliver(raw, None, None)
            return
        op = env.op
        if op == self._change_op:
            self._mcm(raw, env)
        elif op == "status":
            self._status(env)
        elif op == "connection":
            self._events.append(Connected(env.connection_id))
            if self._phase is Phase.AWAIT_CONNECTION:
                self._phase = Phase.AUTHENTICATING
                self._auth_id = self._request_id()
                self._out.append(self.authentication(self._auth_id))
        else:
            self._events.append(Ignored(op))

    def _mcm(self, raw: bytes, env: _Envelope) -> None:
        if self._phase is not Phase.STREAMING:
            self._phase = Phase.STREAMING
            if env.heartbeat_ms:
                self._server_heartbeat_ms = env.heartbeat_ms
        status = env.status if env.status == 503 else None
        if status != self._stream_status:
            self._stream_status = status
            self._events.append(StreamStatus(status))
        seg_type = env.segment_type
        if seg_type is None:
            self._drop_segment("unsegmented_message")
            if env.ct == "HEARTBEAT":
                self._events.append(Heartbeat([raw], env.initial_clk, env.clk, self._epoch))
            else:
                self._deliver(raw, env.initial_clk, env.clk)
        elif seg_type == "SEG_START":
            self._drop_segment("restarted")
            self._events.append(SegmentStarted())
            self._segment = [raw]
            self._segment_bytes = len(raw)
            self._segment_initial_clk = env.initial_clk
        elif self._segment is None:
            self._events.append(Ignored(op=env.op, reason=f"{seg_type} without SEG_START"))
        elif seg_type == "SEG_END":
            self._segment_append(raw)
            self._events.append(MarketChanges(self._segment, env.initial_clk or self._segment_initial_clk,
                                              env.clk, self._epoch, True))
            self._segment = None
            self._segment_initial_clk = None
        else:
            self._segment_append(raw)

    def _segment_append(self, raw: bytes) -> None:
        """Hold one more line of the open segment. Past ``MAX_SEGMENT_BYTES`` (a
        SEG_START without its SEG_END must not grow without bound) the segment is
        dropped and EsaFramingError raised, as for a line too long: its changes are
        lost, so the connection ends (health DOWN: the markets read stale, not fresh)
        and the client reconnects."""
        assert self._segment is not None
        self._segment.append(raw)
        self._segment_bytes += len(raw)
        if self._segment_bytes > MAX_SEGMENT_BYTES:
            self._drop_segment("too_large")
            raise EsaFramingError(f"segment longer than {MAX_SEGMENT_BYTES} bytes")

    def _status(self, env: _Envelope) -> None:
        if env.status_code == "FAILURE":
            code = env.error_code or "UNEXPECTED_ERROR"
            if code in self._stream.resume_rejected and self._sent_tokens:
                self._initial_clk = self._clk = None
                self._epoch += 1
                if env.connection_closed is False:
                    self._events.append(ResumeRejected(True))
                    self._subscribe()
                    return
                self._events.append(ResumeRejected(False))
                self._phase = Phase.CLOSED
                return
            request = (
                "authentication" if env.id == self._auth_id
                else "subscription" if env.id == self._sub_id
                else "stream"
            )
            self._events.append(
                StatusFailure(code, env.error_message, request, env.connection_closed, code in FATAL_ERROR_CODES)
            )
            self._phase = Phase.CLOSED
            return
        if env.id == self._auth_id and self._phase is Phase.AUTHENTICATING:
            self._events.append(Authenticated(self._auth_id))
            self._subscribe()
        elif env.id == self._sub_id and self._phase is Phase.SUBSCRIBING:
            self._phase = Phase.AWAIT_IMAGE
            self._events.append(Subscribed(self._sub_id, self._sent_tokens))
