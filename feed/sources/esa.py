"""Betfair Exchange Stream API (ESA) client over asyncio TCP, optionally TLS.

I/O only: the protocol itself (framing, handshake, segmentation, the ``clk``
resume cursor, the request lines) is :class:`feed.sources.esa_protocol.EsaProtocol`,
sans I/O; this module connects, reads, feeds it the bytes, writes what it
has to send, and acts on its events: hands ``mcm`` lines to the caller,
times out the handshake and missed heartbeats, reconnects with backoff and
reports health. It never decodes the market changes (``mc``); the
normaliser does. The wire format is drawn in :mod:`feed.sources.esa_protocol`.

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
  byte, ``("DOWN", "reconnecting")`` on any other lost connection,
  ``("DOWN", "session_expired")`` while logging in again after
  ``NO_SESSION`` / ``INVALID_SESSION_INFORMATION`` (a client with a
  ``login``; without one those codes are fatal), and
  ``("DOWN", "<error code in lower case>")`` before a fatal error is raised
  (``unauthorized`` when a new login was refused).

Errors (defined in :mod:`feed.sources.esa_protocol`, re-exported here; drawn
in the tree of :mod:`feed.errors`)::

    SourceError
     └── EsaError            a status FAILURE from the server; retried with backoff
          └── EsaFatalError  FATAL_ERROR_CODES: never retried, raised from run();
                             also a FatalSourceError (the supervisor does not restart it)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from feed.aio import wait_event
from feed.errors import ConfigError
from feed.sources.backoff import Backoff, RepairPacer
from feed.sources.betfair_api import BetfairApiError, CatalogueFetcher
from feed.sources.esa_protocol import (
    FATAL_ERROR_CODES,
    MARKET_STREAM,
    MAX_LINE_BYTES,
    SESSION_ERROR_CODES,
    Authenticated,
    Connected,
    Delivery,
    EsaError,
    EsaFatalError,
    EsaFramingError,
    EsaProtocol,
    Event,
    Ignored,
    Phase,
    ResumeRejected,
    SegmentDropped,
    SegmentStarted,
    StatusFailure,
    StreamKind,
    StreamStatus,
    Subscribed,
)
from feed.sources.base import ClientSource, Payload, Sink
from feed.sources.http_limits import SourceAuthError
from feed.sources.session import HealthCallback, SessionClient

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.betfair_api import BetfairLogin, BettingApi
    from feed.sources.spec import SourceSpec

__all__ = [
    "FATAL_ERROR_CODES",
    "MAX_LINE_BYTES",
    "EsaClient",
    "EsaError",
    "EsaFatalError",
    "default_market_data_filter",
    "default_market_filter",
]

logger = logging.getLogger(__name__)

#: Bytes asked from the socket per read.
READ_SIZE = 1 << 20


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


class _LinkLost(Exception):
    """The connection ended without a status from the server (EOF, framing)."""


class _HeartbeatMissed(_LinkLost):
    """No byte for 2 × heartbeatMs."""


class _ReconnectNow(Exception):
    """The server rejected our resume tokens and closed: reconnect fresh, no delay."""


class _CallbackFailed(Exception):
    """``on_lines`` raised; the original exception is the ``__cause__``."""


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class EsaClient(SessionClient):
    """One ESA subscription (markets, or cricket scores), kept alive across disconnects.

    Args:
        host, port: the stream endpoint (``stream-api.betfair.com``, 443).
        app_key, session_token: credentials; never logged.
        market_filter: ESA ``marketFilter`` (``marketIds``, ``eventTypeIds``, …).
        market_data_filter: ESA ``marketDataFilter`` (``fields``, ``ladderLevels``).
        heartbeat_ms: requested heartbeat interval in ms (server clamps 500–30000).
        conflate_ms: requested conflation window in ms; ``None`` leaves it out.
        segmentation: request ``segmentationEnabled``.
            (``None`` for any of these four leaves it out of the subscription.)
        stream: which subscription
            (:data:`~feed.sources.esa_protocol.MARKET_STREAM`, or
            :data:`~feed.sources.esa_protocol.CRICKET_STREAM` on the
            sports-data endpoint: ``on_lines`` then gets ``ccm`` lines).
        ssl: TLS context, or ``None`` for plain TCP (the local simulator).
        initial_clk, clk: resume tokens from a previous run (both or neither).
        on_lines: ``await on_lines(lines, recv_ms)`` with raw mcm lines.
        on_health: ``on_health(state, reason)`` on health changes.
        name: label for logs (source name).
        connect_timeout_s: limit for TCP/TLS connect and for the whole
            handshake, in seconds.
        clock_ms: wall clock in integer ms since the Unix epoch.
        backoff_initial_s, backoff_max_s: reconnect delays (full jitter), seconds.
        image_first_s, image_max_s: pacing of the full images that repair
            rejected changes (:meth:`request_image`, :class:`RepairPacer`), seconds.
        login: where the session token comes from
            (:class:`feed.sources.betfair_api.BetfairLogin`); each connection
            authenticates with its current token, and ``NO_SESSION`` /
            ``INVALID_SESSION_INFORMATION`` make it log in again and
            reconnect (resuming with ``clk``) instead of failing.
            ``session_token`` is then ignored.

    ``run()`` is meant to be awaited once; ``stop()`` ends it.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        app_key: str,
        session_token: str,
        market_filter: dict[str, Any] | None = None,
        market_data_filter: dict[str, Any] | None = None,
        heartbeat_ms: int | None = 5000,
        conflate_ms: int | None = None,
        segmentation: bool | None = True,
        stream: StreamKind = MARKET_STREAM,
        ssl: _ssl.SSLContext | None = None,
        initial_clk: str | None = None,
        clk: str | None = None,
        on_lines: Callable[[list[bytes], int], Awaitable[None]],
        on_health: HealthCallback = lambda state, reason: None,
        name: str = "betfair",
        connect_timeout_s: float = 10.0,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        image_first_s: float = 1.0,
        image_max_s: float = 30.0,
        login: BetfairLogin | None = None,
    ) -> None:
        self._host = host
        self._login = login
        self._token_used: str | None = None  # the session token of the current connection
        self._relogins_in_row = 0
        self._port = port
        self._protocol = EsaProtocol(
            app_key=app_key,
            session_token=session_token,
            market_filter=market_filter,
            market_data_filter=market_data_filter,
            heartbeat_ms=heartbeat_ms,
            conflate_ms=conflate_ms,
            segmentation=segmentation,
            initial_clk=initial_clk,
            clk=clk,
            stream=stream,
        )
        self._ssl = ssl
        self._on_lines = on_lines
        super().__init__(on_health)
        self._name = name
        self._connect_timeout_s = connect_timeout_s
        self._clock_ms = clock_ms
        self._backoff = Backoff(initial_s=backoff_initial_s, max_s=backoff_max_s)
        self._image_wanted = False
        self._image_pacer = RepairPacer(first_s=image_first_s, max_s=image_max_s)

        self._connection_id: str | None = None
        self._reconnects = 0
        self._handshake_deadline = 0.0  # loop.time() by which the handshake must be done

    def __repr__(self) -> str:
        return f"<EsaClient {self._name} {self._host}:{self._port}>"

    def request_image(self) -> None:
        """Ask for a fresh full image of the subscription: after the current
        delivery the client drops its ``clk`` cursor and resubscribes (ESA
        cannot re-image one market). Used when a market's change had to be
        rejected: only an image repairs it. Paced by a
        :class:`~feed.sources.backoff.RepairPacer`: the first image after a
        quiet minute is taken at once, the next ``image_first_s`` (1 s) after
        it, then 2 s, 4 s … up to ``image_max_s`` (30 s), so a provider that
        keeps sending bad data does not make us reconnect in a loop. A request
        inside the gap waits for it to pass (the next delivery after it,
        heartbeats included), never dropped — its market stays stale until
        then."""
        self._image_wanted = True

    # -- public state -------------------------------------------------------

    @property
    def cursor(self) -> tuple[str | None, str | None]:
        """``(initialClk, clk)`` as last stored (after ``on_lines`` returned)."""
        return self._protocol.cursor

    @property
    def connection_id(self) -> str | None:
        """The server's ``connectionId`` of the current (or last) connection."""
        return self._connection_id

    @property
    def messages_received(self) -> int:
        """Lines received since construction (every op, heartbeats included)."""
        return self._protocol.messages_received

    @property
    def reconnects(self) -> int:
        """Connection attempts after the first one."""
        return self._reconnects

    @property
    def heartbeat_ms(self) -> int:
        """The heartbeat interval in force, ms: the server's echo, else the request."""
        return self._protocol.heartbeat_ms

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
            relogin = False
            self._session_task = asyncio.create_task(self._session(), name=f"esa-{self._name}")
            try:
                await self._session_task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._stopping and (current is None or current.cancelling() == 0):
                    break
                raise
            except EsaFatalError as exc:
                if exc.code not in SESSION_ERROR_CODES or self._login is None \
                        or not self._login.credentials.can_login:
                    self._set_health("DOWN", exc.code.lower())
                    logger.error("esa %s: %s; giving up", self._name, exc)
                    raise
                reason, relogin = "session_expired", True
                why = str(exc)
            except SourceAuthError as exc:
                self._set_health("DOWN", "unauthorized")
                logger.error("esa %s: %s; giving up", self._name, exc)
                raise
            except _CallbackFailed as exc:
                assert exc.__cause__ is not None
                raise exc.__cause__
            except _ReconnectNow as exc:
                delay = 0.0
                why = str(exc) or "resume tokens rejected"
            except _HeartbeatMissed as exc:
                reason = "heartbeat_missed"
                why = str(exc)
            except (EsaError, BetfairApiError, _LinkLost, OSError, TimeoutError, EOFError) as exc:
                why = str(exc) or type(exc).__name__
            finally:
                self._session_task = None
            if self._stopping:
                break
            self._set_health("DOWN", reason)
            if relogin:
                delay = await self._relogin()
            if delay is None:
                delay = self._backoff.next_delay()
            logger.info("esa %s: connection lost (%s); reconnecting in %.2f s", self._name, why, delay)
            if delay > 0:
                await wait_event(self._stop_event, delay)
        logger.info("esa %s: stopped", self._name)

    async def _relogin(self) -> float | None:
        """Log in again after a session error on the stream; the delay before
        reconnecting (0 the first time in a row, else the backoff's).

        Raises:
            SourceAuthError: the login was refused for good.
        """
        assert self._login is not None
        self._relogins_in_row += 1
        logger.info("esa %s: session no longer valid; logging in again", self._name)
        try:
            await self._login.relogin(self._token_used)
        except SourceAuthError as exc:
            self._set_health("DOWN", "unauthorized")
            logger.error("esa %s: %s; giving up", self._name, exc)
            raise
        except BetfairApiError as exc:
            logger.warning("esa %s: %s", self._name, exc)
            return None
        return 0.0 if self._relogins_in_row == 1 else None

    # -- one connection -----------------------------------------------------

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        if self._login is not None:
            self._token_used = await self._login.token()
            self._protocol.set_session_token(self._token_used)
        logger.info("esa %s: connecting to %s:%s", self._name, self._host, self._port)
        async with asyncio.timeout(self._connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
                limit=READ_SIZE,
            )
        protocol = self._protocol
        protocol.connection_made()
        self._handshake_deadline = loop.time() + self._connect_timeout_s
        try:
            while True:
                chunk = await self._read(loop, reader)
                recv_ms = self._clock_ms()
                try:
                    protocol.receive_data(chunk)
                except EsaFramingError as exc:
                    raise _LinkLost(str(exc)) from None
                out = protocol.data_to_send()
                if out:
                    writer.write(out)
                await self._handle(protocol.events_received(), recv_ms, loop)
        finally:
            protocol.connection_lost()
            self._log_dropped(protocol.events_received())
            writer.close()

    async def _read(self, loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader) -> bytes:
        """One chunk, within the deadline of the current phase.

        Raises:
            _LinkLost: EOF, or the handshake took longer than ``connect_timeout_s``.
            _HeartbeatMissed: streaming and nothing for 2 × heartbeatMs.
        """
        phase = self._protocol.phase
        if phase < Phase.AWAIT_IMAGE:
            timeout_s = self._handshake_deadline - loop.time()
            if timeout_s <= 0:
                raise _LinkLost("handshake timed out")
        elif phase == Phase.AWAIT_IMAGE:
            timeout_s = max(2 * self.heartbeat_ms / 1000, self._connect_timeout_s)
        else:
            timeout_s = 2 * self.heartbeat_ms / 1000
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await reader.read(READ_SIZE)
        except TimeoutError:
            if phase == Phase.STREAMING:
                raise _HeartbeatMissed(f"no data for {timeout_s:.1f} s") from None
            raise _LinkLost("handshake timed out") from None
        if not chunk:
            raise _LinkLost("connection closed by server")
        return chunk

    async def _handle(self, events: list[Event], recv_ms: int, loop: asyncio.AbstractEventLoop) -> None:
        """Act on one chunk's events in order; consecutive deliveries go to
        ``on_lines`` in one call, before any handshake or status event."""
        pending: list[Delivery] = []
        for event in events:
            if isinstance(event, Delivery):
                pending.append(event)
            elif isinstance(event, StreamStatus):
                if event.status == 503:
                    self._set_health("DEGRADED", "upstream_503")
                else:
                    self._set_health("UP", None)
            elif isinstance(event, (SegmentStarted, SegmentDropped, Ignored)):
                self._log_dropped((event,))
            else:
                if pending:
                    await self._deliver(pending, recv_ms)
                    pending = []
                self._act(event, loop)
        if pending:
            await self._deliver(pending, recv_ms)

    def _act(self, event: Event, loop: asyncio.AbstractEventLoop) -> None:
        """Handshake and status events (deliveries already handed over)."""
        if isinstance(event, Connected):
            self._connection_id = event.connection_id
            logger.info(
                "esa %s: connected to %s:%s, connectionId %s", self._name, self._host, self._port, event.connection_id
            )
        elif isinstance(event, Subscribed):
            self._backoff.reset()
            self._relogins_in_row = 0
            logger.info(
                "esa %s: subscribed (id %d, %s)",
                self._name,
                event.request_id,
                "resuming from stored clk" if event.resumed else "full image",
            )
        elif isinstance(event, ResumeRejected):
            logger.warning(
                "esa %s: resume tokens rejected (INVALID_CLOCK); subscribing for a full image", self._name
            )
            if not event.resubscribed:
                raise _ReconnectNow()
            self._handshake_deadline = loop.time() + self._connect_timeout_s
        elif isinstance(event, StatusFailure):
            raise event.error()
        elif isinstance(event, Authenticated):
            pass

    def _log_dropped(self, events: tuple[Event, ...] | list[Event]) -> None:
        for event in events:
            if isinstance(event, SegmentDropped):
                logger.warning(
                    "esa %s: segment of %d lines dropped (%s)", self._name, event.lines, event.reason.replace("_", " ")
                )
            elif isinstance(event, Ignored):
                if event.reason is not None:
                    logger.warning("esa %s: %s; ignored", self._name, event.reason)
                elif logger.isEnabledFor(logging.DEBUG):
                    logger.debug("esa %s: ignored message with op %r", self._name, event.op)

    async def _deliver(self, deliveries: list[Delivery], recv_ms: int) -> None:
        """Hand the deliveries' lines to ``on_lines`` in one call, then commit
        their cursor tokens to the protocol."""
        if len(deliveries) == 1:
            batch = deliveries[0].lines
        else:
            batch = [line for delivery in deliveries for line in delivery.lines]
        if batch:
            try:
                await self._on_lines(batch, recv_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise _CallbackFailed() from exc
        for delivery in deliveries:
            self._protocol.commit(delivery)
        if self._image_wanted and self._image_pacer.due(now := time.monotonic()):
            self._image_wanted = False
            self._image_pacer.take(now)
            self._protocol.forget_cursor()
            raise _ReconnectNow("a full image was requested (a market's change was rejected)")


# -- as a Source of the pipeline ---------------------------------------------------------


class EsaSource(ClientSource):
    """One ESA subscription as a :class:`feed.sources.base.Source`.

    It subscribes with the sink's stored ``initialClk``/``clk`` (a restart
    resumes with RESUB_DELTA; when the upstream no longer knows that point
    it sends a SUB_IMAGE, which opens a new upstream session) and delivers
    every batch of ``mcm`` lines. A rejected change asks for a new image
    (:meth:`EsaClient.request_image`: at once, then paced 1 s, 2 s … 30 s apart). ``client_args``:
    :class:`EsaClient` keyword arguments besides the callbacks and cursor.

    With a ``login`` (:class:`feed.sources.betfair_api.BetfairLogin`) the
    source logs in, keeps the session alive while it runs and logs in again
    when the stream or the Betting API says the session is gone. With a
    ``catalogue`` (:class:`feed.sources.betfair_api.BettingApi`) it fetches
    the names the stream lacks (:class:`~feed.sources.betfair_api.CatalogueFetcher`,
    ``catalogue_args`` its options) and delivers each entry as a payload
    ``{"op": "marketCatalogue", …}``; the stream's prices never wait for it.
    A catalogue payload carries the receive time of the stream's last
    delivery (not its own): names are not news from the stream, and must
    not confirm the stream's markets beyond what the stream itself did.
    """

    def __init__(self, name: str, *, on_client: Callable[[EsaClient], None] | None = None,
                 login: BetfairLogin | None = None, catalogue: BettingApi | None = None,
                 catalogue_args: dict[str, Any] | None = None, **client_args: Any) -> None:
        super().__init__(name)
        self.client_args = client_args
        self.on_client = on_client
        self.login = login
        self.catalogue = catalogue
        self.catalogue_args = catalogue_args or {}
        self.client: EsaClient | None = None
        self.fetcher: CatalogueFetcher | None = None
        self._stream_recv_ms = 0

    async def run(self, sink: Sink) -> None:
        from feed.normalise.betfair import decode_cursor

        cursor = decode_cursor(sink.cursor)
        deliver = self.deliverer(sink)
        fetcher = None
        if self.catalogue is not None:
            async def deliver_catalogue(entries: list[bytes]) -> None:
                await sink.deliver([Payload(self._stream_recv_ms, e) for e in entries])

            fetcher = self.fetcher = CatalogueFetcher(self.catalogue, deliver_catalogue, name=self.name,
                                                      **self.catalogue_args)

        async def on_lines(lines: list[bytes], recv_ms: int) -> None:
            self._stream_recv_ms = recv_ms
            await deliver(lines, recv_ms)
            if fetcher is not None:
                fetcher.observe_lines(lines)

        client = self.client = EsaClient(on_lines=on_lines, on_health=sink.set_state, name=self.name,
                                         initial_clk=cursor.initial_clk, clk=cursor.clk, login=self.login,
                                         **self.client_args)
        if self.on_client is not None:
            self.on_client(client)
        helpers: list[asyncio.Task[None]] = []
        if self.login is not None:
            helpers.append(asyncio.create_task(self.login.run_keep_alive(), name=f"betfair-keepalive-{self.name}"))
        if fetcher is not None:
            helpers.append(asyncio.create_task(fetcher.run(), name=f"betfair-catalogue-{self.name}"))
        try:
            await self.run_client(client)
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(BaseException):
                    await task
            if self.catalogue is not None:
                await self.catalogue.aclose()
            if self.login is not None:
                await self.login.aclose()

    def request_repair(self) -> None:
        if self.client is not None:
            self.client.request_image()


def endpoint(spec: SourceSpec) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of an ``esa=[tls://|tcp://]HOST:PORT`` spec (or ``betfair-cricket=…``)
    (``tls=true`` also turns TLS on); ConfigError otherwise."""
    url = spec.url
    tls = spec.get("tls", "false") in ("1", "true", "yes")
    for prefix, is_tls in (("tls://", True), ("ssl://", True), ("tcp://", False)):
        if url.startswith(prefix):
            url, tls = url[len(prefix):], is_tls or tls
    host, sep, port = url.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"source {spec.name}: {spec.kind} needs HOST:PORT, not {spec.url!r}")
    return host or "127.0.0.1", int(port), tls


def _flag(spec: SourceSpec, key: str, default: bool) -> bool:
    raw = spec.get(key)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"source {spec.name}: {key} must be true or false, not {raw!r}")


def market_filter_of(spec: SourceSpec) -> dict[str, Any]:
    """The ESA ``marketFilter`` of a spec: ``event_types=1+7`` →
    ``eventTypeIds``, ``countries=GB+IE`` → ``countryCodes``,
    ``market_types=MATCH_ODDS+WIN`` → ``marketTypes`` (``+``-separated;
    none given: every market)."""
    out = default_market_filter()
    for option, key in (("event_types", "eventTypeIds"), ("countries", "countryCodes"),
                        ("market_types", "marketTypes")):
        raw = spec.get(option)
        if raw:
            values = [v.strip() for v in raw.split("+") if v.strip()]
            if not values:
                raise ConfigError(f"source {spec.name}: {option} names nothing")
            out[key] = values
    return out


def login_of(spec: SourceSpec, host: str) -> tuple[BetfairLogin, str | None]:
    """The Betfair login of a spec streaming from ``host`` and the Betting
    API URL (``None``: no catalogue): ``app_key=…`` with ``session=…`` (a
    token obtained elsewhere) or ``username=…,password=…`` (login; with
    ``cert_file=…,key_file=…`` the certificate login)
    ``[,sso_url=…][,cert_sso_url=…][,betting_url=…][,keep_alive_s=900]``.
    The SSO and Betting API URLs default to Betfair's hosts only when the
    stream is Betfair's (``*.betfair.com``); for any other stream (the local
    simulator) keep-alives and the catalogue are off unless ``sso_url`` /
    ``betting_url`` are given, and a login needs ``sso_url``. Shared by the
    ``esa`` and ``betfair-cricket`` kinds (one account, one app key).
    Raises ConfigError for missing or contradictory options."""
    from feed.sources.betfair_api import (
        BETTING_URL,
        CERT_SSO_URL,
        SSO_URL,
        BetfairLogin,
        Credentials,
    )

    app_key, session = spec.get("app_key"), spec.get("session")
    username, password = spec.get("username"), spec.get("password")
    cert_file, key_file = spec.get("cert_file"), spec.get("key_file")
    if not app_key:
        raise ConfigError(f"source {spec.name}: {spec.kind} needs app_key=")
    if not session and not (username and password):
        raise ConfigError(f"source {spec.name}: {spec.kind} needs session= or username= and password=")
    if bool(cert_file) != bool(key_file):
        raise ConfigError(f"source {spec.name}: cert_file= and key_file= go together")
    if cert_file and not (username and password):
        raise ConfigError(f"source {spec.name}: the certificate login needs username= and password= too")
    # Betfair's own HTTP hosts are the defaults only for Betfair's stream: a
    # stream elsewhere (the local simulator) never makes us call the Internet
    betfair = host.endswith(".betfair.com")
    sso_url = spec.get("sso_url") or (SSO_URL if betfair else None)
    cert_sso_url = spec.get("cert_sso_url") or (CERT_SSO_URL if betfair else sso_url)
    betting_url = spec.get("betting_url") or (BETTING_URL if betfair else None)
    if username and not (cert_sso_url if cert_file else sso_url):
        raise ConfigError(f"source {spec.name}: logging in to a stream at {host} needs "
                          f"{'cert_sso_url' if cert_file else 'sso_url'}= (Betfair's hosts are the default only "
                          "for streams at *.betfair.com)")
    keep_alive_s = spec.get_float("keep_alive_s", 900.0)
    if keep_alive_s < 0:
        raise ConfigError(f"source {spec.name}: keep_alive_s must be >= 0 (0 = off)")
    login = BetfairLogin(
        Credentials(app_key=app_key, username=username, password=password, cert_file=cert_file,
                    key_file=key_file, session=session),
        sso_url=sso_url or SSO_URL, cert_sso_url=cert_sso_url or CERT_SSO_URL,
        keep_alive_s=keep_alive_s if sso_url else 0.0, name=spec.name)
    return login, betting_url


def from_spec(spec: SourceSpec, settings: Settings) -> EsaSource:
    """The registry's source factory: ``esa=HOST:PORT,app_key=…`` with the
    login options of :func:`login_of`
    ``[,event_types=1+7][,countries=GB+IE][,market_types=MATCH_ODDS+WIN]
    [,catalogue=true][,tls=true][,heartbeat_ms=1000][,conflate_ms=…]``.
    Raises ConfigError for missing or contradictory options."""
    from feed.sources.betfair_api import BettingApi

    host, port, tls = endpoint(spec)
    login, betting_url = login_of(spec, host)
    catalogue = None
    if _flag(spec, "catalogue", True) and betting_url:
        catalogue = BettingApi(login, url=betting_url)
    return EsaSource(spec.name, host=host, port=port, app_key=login.credentials.app_key,
                     session_token=spec.get("session") or "",
                     ssl=_ssl.create_default_context() if tls else None,
                     market_filter=market_filter_of(spec), market_data_filter=default_market_data_filter(),
                     heartbeat_ms=int(spec.get_float("heartbeat_ms", 1000)),
                     conflate_ms=int(spec.get_float("conflate_ms", 0)) or None,
                     login=login, catalogue=catalogue)
