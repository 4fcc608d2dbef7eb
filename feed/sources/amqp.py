"""AMQP source in the Sportradar Unified Odds Feed (UOF) style: RabbitMQ + REST recovery.

I/O only (:mod:`feed.sources.base`): it connects to the broker with
``aio-pika``, binds a queue to the feed's topic exchange by UOF routing keys,
hands every message body to the pipeline as
``Payload(recv_ms, body, channel=<routing key>)`` (the normaliser,
:mod:`feed.normalise.uof`, decodes it) and acknowledges a message only once
:meth:`Sink.deliver` says everything up to it is stored (``stored=True``); a
delivery the store could not take yet is rejected back to the queue
(``nack``, requeue) after a short backoff, so nothing is lost when the store
fails — the requeued copies are dropped by the normaliser as duplicates, the
pipeline's backlog writes the originals.

``--source`` form (options are the registry's)::

    uof=amqp://USER:PASS@HOST:5672/VHOST?exchange=unifiedfeed,api=https://api.betradar.com,token=$UOF_TOKEN
       [,producers=1+3][,bindings=#][,queue=NAME][,node_id=N][,max_inactivity_s=20]
       [,min_recovery_interval_s=30][,max_recovery_s=1200][,recovery_window_min=4320][,prefetch=1000]
       [,connect_timeout_s=10][,backoff_initial_s=0.5][,backoff_max_s=30][,prefix=uof]

``exchange`` may also be given as an option (default ``unifiedfeed``, as
UOF). ``bindings``: routing-key patterns joined by ``+`` (default ``#``;
UOF's ``hi.pre.-.*.*.*.*.*`` / ``*.*.live.*.*.*.*.*`` style selects
interests; keys ``-.-.-.alive.#`` and ``-.-.-.snapshot_complete.#`` are
always bound). ``queue``: a named durable queue (survives our restarts);
default a server-named exclusive queue, as the UOF SDKs use. ``api``: the
REST base URL for recovery; ``token``: sent as ``x-access-token``.

Producer health (the UOF SDKs' ``RecoveryManager``; research/upstream.md §6):
each producer of ``producers`` (ids; 1 = LiveOdds ``liveodds``, 3 = Ctrl
``pre``, …) is ``down``, ``recovering`` or ``up``. Messages of any other
producer (the root element's ``product``, :func:`~feed.normalise.uof.peek_product`)
— ``alive``, ``snapshot_complete``, odds — are ignored, as the SDKs drop
those of a disabled producer: acknowledged, never delivered (nor recorded),
counted per producer in :attr:`AmqpSource.ignored` and logged once per
producer. Such a producer is never tracked nor recovered, so it cannot keep
the source DOWN or stop its confirmations, and nothing of it is stored or
confirmed (no health of ours vouches for its markets).

- At start (and after every reconnect: an exclusive queue loses what was
  published meanwhile) every producer is down and a recovery is requested:
  ``POST {api}/v1/{product}/recovery/initiate_request?after=<ms>&request_id=<n>``
  with ``after`` = the stored cursor's timestamp for that producer
  (:func:`feed.normalise.uof.decode_cursor`), or no ``after`` (a full
  recovery) when there is none or it is older than the producer's
  recovery window (``recovery_window_min``, UOF default 4320 = 72 h, less
  10 minutes, as the SDK). The provider replays the producer's odds
  (``odds_change`` for every market) and ends with ``snapshot_complete``
  carrying that ``request_id``: only then is the producer up.
- An up producer goes down when no ``alive`` arrived for
  ``max_inactivity_s`` (default 20, the SDKs' default; ``alive_violation``)
  or an ``alive`` says ``subscribed="0"`` (``subscribed_0``), or the
  connection drops (``connection_down``). The source then delivers the
  synthetic payload :data:`~feed.normalise.uof.PRODUCER_DOWN` (recorded like
  any payload, so a replay reproduces it): the normaliser suspends every
  market of that producer and withdraws their confirmation. The next
  ``alive`` of a silent producer triggers its recovery (``subscribed=0``
  at once); requests are at least ``min_recovery_interval_s`` apart per
  producer (SDK default 30 s) and re-sent when one does not complete within
  ``max_recovery_s`` (SDK default 1200 s). Before each request the source
  delivers :data:`~feed.normalise.uof.RECOVERY_REQUESTED` (product,
  request id, after).
- A repair (:meth:`AmqpSource.request_repair`: the pipeline lost a change)
  recovers every up producer, whose odds re-image its markets. It too keeps
  the ``min_recovery_interval_s`` per producer: one asked for sooner after
  the producer's last request is deferred, not dropped — the producer stays
  up and the watchdog requests it as soon as the interval has passed.
- Source state (``Sink.set_state``; what SSE shows as ``status``): ``UP``
  while every producer is up; ``DEGRADED`` while some are, ``DOWN`` while
  none is; reason ``producer_down`` while any producer is down, else
  ``recovering``; ``DOWN``/``reconnecting`` while the broker is away.

Confirmation: ``confirms_by_messages`` is False. A message confirms only
the markets it changes (their ``received_at``); quiet markets are confirmed
by ``alive`` messages, but only while *every* producer is up, and as of the
*oldest* latest ``alive`` among them (``Sink.confirm``): the pipeline
confirms a source's markets as a whole, and an ``alive`` of producer 3 says
nothing about producer 1's markets. While a producer is down the source
confirms nothing (the down producer's markets are unconfirmed anyway; the
others age honestly until it is back).

Reconnects: the broker going away ends the connection; the source retries
with full-jitter backoff (``backoff_initial_s`` … ``backoff_max_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from feed.errors import ConfigError
from feed.models import SourceState
from feed.normalise.uof import (
    PRODUCER_DOWN,
    RECOVERY_REQUESTED,
    decode_cursor,
    peek_control,
    peek_product,
    producer_down_payload,
    recovery_requested_payload,
)
from feed.sources.backoff import Backoff
from feed.sources.base import Payload, Sink

if TYPE_CHECKING:
    import aio_pika
    import httpx

    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = ["AMQP_OPTIONS", "AmqpOptions", "AmqpSource", "PRODUCT_PATHS", "from_spec"]

logger = logging.getLogger(__name__)

#: UOF producer id -> its path in the REST API (``/v1/{path}/recovery/…``)
PRODUCT_PATHS: dict[int, str] = {1: "liveodds", 3: "pre", 4: "betpal", 5: "premium_cricket", 6: "vf", 7: "wns",
                                 8: "vbl", 9: "vto", 10: "vdr", 11: "vhc", 12: "vti", 14: "cashout", 15: "vbi",
                                 16: "vci", 17: "vs"}

#: the options of the ``uof`` kind (for the registry)
AMQP_OPTIONS: frozenset[str] = frozenset({
    "exchange", "bindings", "queue", "api", "token", "producers", "node_id", "max_inactivity_s",
    "min_recovery_interval_s", "max_recovery_s", "recovery_window_min", "prefetch", "connect_timeout_s",
    "backoff_initial_s", "backoff_max_s", "prefix",
})

_CONTROL_KEYS = ("-.-.-.alive.#", "-.-.-.snapshot_complete.#")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class AmqpOptions:
    """Settings of one AMQP source (see the module docstring; seconds unless said)."""

    url: str
    api: str
    token: str | None = None
    exchange: str = "unifiedfeed"
    bindings: tuple[str, ...] = ("#",)
    queue: str | None = None
    producers: tuple[int, ...] = (1, 3)
    node_id: int | None = None
    max_inactivity_s: float = 20.0
    min_recovery_interval_s: float = 30.0
    max_recovery_s: float = 1200.0
    recovery_window_min: float = 4320.0
    prefetch: int = 1000
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass
class _Producer:
    product: int
    state: str = "down"  # down | recovering | up
    reason: str = "starting"
    want_recovery: bool = True  # (while up: a repair deferred by min_recovery_interval_s; see request_repair)
    request_id: int | None = None
    requested_at: float = -1e18  # monotonic s of the last request
    last_alive: float = 0.0  # monotonic s of the last alive received (or of the link's start)
    last_alive_ts: int = 0  # its provider timestamp, ms
    last_alive_recv: int = 0  # its receive time, ms
    history: list[tuple[int, int | None]] = field(default_factory=list)  # (request id, after) per request


class _Item:
    __slots__ = ("channel", "message", "payload")

    def __init__(self, payload: Payload | None, message: Any = None, channel: Any = None) -> None:
        """payload None: a message to acknowledge in order without delivering it (ignored)."""
        self.payload = payload
        self.message = message
        self.channel = channel


class AmqpSource:
    """The UOF AMQP source (see the module docstring).

    Attributes for tests and metrics: :attr:`producers` (per producer:
    ``state``, ``reason``, ``history`` of ``(request_id, after)``),
    :attr:`recoveries` (every request made: ``(product, request_id,
    after)``), :attr:`connections`, :attr:`acked`, :attr:`requeued`,
    :attr:`ignored` (messages of producers not in ``producers``, per
    producer id).
    """

    name: str
    confirms_by_messages: bool = False
    stale_after_ms: int | None = None

    def __init__(self, name: str, options: AmqpOptions, *, stale_after_ms: int | None = None) -> None:
        self.name = name
        self.options = options
        self.stale_after_ms = stale_after_ms
        self.producers: dict[int, _Producer] = {p: _Producer(p) for p in options.producers}
        self.recoveries: list[tuple[int, int, int | None]] = []
        self.connections = 0
        self.acked = 0
        self.requeued = 0
        self.ignored: dict[int, int] = {}
        self._items: asyncio.Queue[_Item] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._sink: Sink | None = None
        self._channel: Any = None  # the open aio-pika channel (None while disconnected)
        self._connected = False
        self._next_request = now_ms()
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state: tuple[SourceState, str | None] | None = None
        self._fatal: BaseException | None = None

    # -- Source ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def request_repair(self) -> None:
        """A change was lost: recover every up producer (its odds re-image
        every market), at most once per ``min_recovery_interval_s`` each: a
        producer whose last request is younger keeps the repair pending
        (``want_recovery`` while up) and the watchdog requests it once the
        interval has passed."""
        for p in self.producers.values():
            if p.state == "up":
                p.want_recovery = True
                self._maybe_recover(p, force_state=True)

    async def run(self, sink: Sink) -> None:
        """Consume until stopped or cancelled (see the module docstring).
        Raises FatalSourceError when the recovery API refuses the token."""
        import httpx

        self._sink = sink
        self._stop.clear()
        self._publish_state()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=self.options.connect_timeout_s))
        worker = asyncio.create_task(self._worker(sink), name=f"{self.name}-deliver")
        watchdog = asyncio.create_task(self._watchdog(), name=f"{self.name}-watchdog")
        link = asyncio.create_task(self._connect_loop(), name=f"{self.name}-link")
        try:
            # the link loop returns when stopped; the worker and the watchdog never return: if one
            # fails, the source fails (the supervisor restarts it, restored from the store)
            await asyncio.wait({worker, watchdog, link}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (link, worker, watchdog, *self._tasks):
                t.cancel()
            await asyncio.gather(link, worker, watchdog, *self._tasks, return_exceptions=True)
            await self._http.aclose()
            self._http = None
        if self._fatal is not None:
            raise self._fatal
        for t in (link, worker, watchdog):
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    # -- connection ------------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        import aio_pika

        opts = self.options
        backoff = Backoff(initial_s=opts.backoff_initial_s, max_s=opts.backoff_max_s)
        while not self._stop.is_set() and self._fatal is None:
            connection: aio_pika.abc.AbstractConnection | None = None
            try:
                async with asyncio.timeout(opts.connect_timeout_s):
                    connection = await aio_pika.connect(opts.url)
                    channel = await connection.channel()
                    await channel.set_qos(prefetch_count=opts.prefetch)
                    exchange = await channel.get_exchange(opts.exchange, ensure=True)
                    if opts.queue:
                        queue = await channel.declare_queue(opts.queue, durable=True)
                    else:
                        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
                    for key in dict.fromkeys((*opts.bindings, *_CONTROL_KEYS)):
                        await queue.bind(exchange, routing_key=key)
                    await queue.consume(self._on_message(channel))
                self.connections += 1
                self._channel, self._connected = channel, True
                backoff.reset()
                logger.info("source %s: consuming %s (exchange %s)", self.name, queue.name, opts.exchange)
                linked = time.monotonic()
                for p in self.producers.values():  # whatever was published while we were away: recover it
                    p.want_recovery = True
                    p.last_alive = max(p.last_alive, linked)  # silence is counted from the link's start
                self._publish_state()
                while not self._stop.is_set() and self._fatal is None:
                    if connection.is_closed or channel.is_closed:
                        raise ConnectionError("the broker closed the connection")
                    await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - aiormq / aio-pika raise many kinds: every one is a lost link
                if self._stop.is_set():
                    break
                delay = backoff.next_delay()
                logger.warning("source %s: broker link lost (%s: %s); reconnecting in %.1f s", self.name,
                               type(exc).__name__, exc, delay)
            finally:
                self._channel, self._connected = None, False
                if connection is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(2):  # (not wait_for: on 3.11 it can drop a cancel — feed.aio)
                            await connection.close()
            if self._stop.is_set() or self._fatal is not None:
                break
            for p in self.producers.values():
                self._down(p, "connection_down")
            self._publish_state()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    def _on_message(self, channel: Any) -> Any:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            recv = now_ms()
            key = message.routing_key or ""
            body = message.body
            product = peek_product(body)
            if product is not None and product not in self.producers:
                self._ignore(product)
                self._items.put_nowait(_Item(None, message, channel))  # acknowledged in order, not delivered
                return
            parts = key.split(".")
            if len(parts) > 3 and parts[3] == "alive":
                ctl = peek_control(body)
                p = self.producers.get(ctl.product) if ctl is not None else None
                if ctl is not None and p is not None:
                    p.last_alive = time.monotonic()
                    p.last_alive_recv = recv
                    p.last_alive_ts = max(p.last_alive_ts, ctl.timestamp)
            self._items.put_nowait(_Item(Payload(recv, body, key), message, channel))
        return on_message

    def _ignore(self, product: int) -> None:
        """Count a message of a producer not in ``producers`` (logged once per producer)."""
        n = self.ignored.get(product, 0)
        if n == 0:
            logger.info("source %s: ignoring the messages of producer %d (not in producers=%s)", self.name,
                        product, "+".join(str(p) for p in self.options.producers))
        self.ignored[product] = n + 1

    # -- delivery --------------------------------------------------------------------------------

    async def _worker(self, sink: Sink) -> None:
        backoff = Backoff(initial_s=0.2, max_s=5.0)
        while True:
            items = [await self._items.get()]
            while len(items) < 500:
                try:
                    items.append(self._items.get_nowait())
                except asyncio.QueueEmpty:
                    break
            # (ignored messages only: an empty delivery still says whether everything before is stored)
            done = await sink.deliver([i.payload for i in items if i.payload is not None])
            last = next((i for i in reversed(items) if i.message is not None), None)
            if done.stored:
                backoff.reset()
                if last is not None and last.channel is self._channel and self._channel is not None:
                    with contextlib.suppress(Exception):
                        await last.message.ack(multiple=True)
                        self.acked += sum(1 for i in items if i.message is not None)
            else:  # not stored yet: the broker keeps them (a crash now loses nothing); copies come back as duplicates
                await asyncio.sleep(backoff.next_delay())
                if last is not None and last.channel is self._channel and self._channel is not None:
                    with contextlib.suppress(Exception):
                        await last.message.nack(multiple=True, requeue=True)
                        self.requeued += sum(1 for i in items if i.message is not None)
            for item in items:
                if item.payload is not None and not item.payload.channel.startswith("oddsfeed."):
                    self._after_delivery(item.payload)
            for req in done.requests:
                product = req.removeprefix("recovery:")
                p = self.producers.get(int(product)) if product.isdigit() and len(product) < 8 else None
                if p is not None:
                    if p.state == "up":
                        self._down(p, "subscribed_0")
                    if p.state == "down":
                        p.want_recovery = True
            self._publish_state()

    def _after_delivery(self, payload: Payload) -> None:
        """The producer machine's view of a delivered (stored) message."""
        parts = payload.channel.split(".")
        op = parts[3] if len(parts) > 3 else ""
        if op not in ("alive", "snapshot_complete"):
            return
        ctl = peek_control(payload.data)
        p = self.producers.get(ctl.product) if ctl is not None else None
        if ctl is None or p is None:  # (another producer's, which the peek at receipt did not read: ignored)
            if ctl is not None:
                self._ignore(ctl.product)
            return
        if ctl.op == "alive":
            if not ctl.subscribed:
                if p.state != "down":
                    self._down(p, "subscribed_0")
                p.want_recovery = True
                self._maybe_recover(p)
            elif p.state == "down" and not p.want_recovery:
                p.want_recovery = True  # a silent producer is back: recover what it sent meanwhile
                self._maybe_recover(p)
            elif p.state == "up":
                self._confirm()
        elif ctl.op == "snapshot_complete" and p.state == "recovering" and ctl.request_id == p.request_id:
            p.state, p.reason = "up", "recovered"
            logger.info("source %s: producer %d recovered (request %d)", self.name, p.product, ctl.request_id)
            self._publish_state()

    def _confirm(self) -> None:
        ps = self.producers.values()
        if self._sink is not None and all(p.state == "up" and p.last_alive_recv for p in ps):
            # (as of the oldest receipt, and no later than the oldest alive's own timestamp plus the
            # stream-lag bound: an alive held back in a backlog vouches for nothing newer than itself)
            self._sink.confirm(min(p.last_alive_recv for p in ps), min(p.last_alive_ts for p in ps))

    # -- producer machine ---------------------------------------------------------------------------

    def _down(self, p: _Producer, reason: str) -> None:
        """``p`` goes down: deliver the synthetic producer_down payload (the
        normaliser suspends and unconfirms its markets)."""
        was = p.state
        p.state, p.reason = "down", reason
        p.want_recovery = reason in ("connection_down", "subscribed_0")
        if was != "down":
            ts = p.last_alive_ts or now_ms()
            self._items.put_nowait(_Item(Payload(now_ms(), producer_down_payload(p.product, ts, reason),
                                                 PRODUCER_DOWN)))
            logger.warning("source %s: producer %d down (%s)", self.name, p.product, reason)
        self._publish_state()

    def _maybe_recover(self, p: _Producer, *, force_state: bool = False) -> None:
        """Request ``p``'s recovery now if it wants one, the link is up and
        the last request is at least ``min_recovery_interval_s`` old (else it
        stays wanted: the watchdog retries). A recovering producer never
        requests; an up one only with ``force_state`` (a repair)."""
        if not p.want_recovery or not self._connected or self._http is None or self._fatal is not None:
            return
        if p.state == "recovering" or p.state == "up" and not force_state:
            return
        now = time.monotonic()
        if now - p.requested_at < self.options.min_recovery_interval_s:
            return
        p.want_recovery = False
        p.requested_at = now
        self._next_request += 1
        request_id = self._next_request
        after = self._after(p.product)
        p.state, p.request_id = "recovering", request_id
        p.history.append((request_id, after))
        self.recoveries.append((p.product, request_id, after))
        self._items.put_nowait(_Item(Payload(now_ms(), recovery_requested_payload(
            p.product, p.last_alive_ts or now_ms(), request_id, after), RECOVERY_REQUESTED)))
        task = asyncio.create_task(self._post_recovery(p, request_id, after), name=f"{self.name}-recovery")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._publish_state()

    def _after(self, product: int) -> int | None:
        """The ``after`` of a recovery: the cursor's timestamp for
        ``product``, None (full recovery) when absent or older than the
        recovery window less 10 minutes."""
        sink = self._sink
        after = decode_cursor(sink.cursor if sink is not None else None).get(product)
        if after is None:
            return None
        window_ms = int(self.options.recovery_window_min * 60_000) - 600_000
        return after if now_ms() - after <= window_ms else None

    async def _post_recovery(self, p: _Producer, request_id: int, after: int | None) -> None:
        import httpx

        opts = self.options
        path = PRODUCT_PATHS.get(p.product, str(p.product))
        params: dict[str, Any] = {"request_id": request_id}
        if after is not None:
            params["after"] = after
        if opts.node_id is not None:
            params["node_id"] = opts.node_id
        url = f"{opts.api.rstrip('/')}/v1/{path}/recovery/initiate_request"
        headers = {"x-access-token": opts.token} if opts.token else {}
        assert self._http is not None
        try:
            r = await self._http.post(url, params=params, headers=headers)
        except httpx.HTTPError as exc:
            logger.warning("source %s: recovery request for producer %d failed (%s); retrying", self.name,
                           p.product, type(exc).__name__)
            self._recovery_failed(p, request_id)
            return
        if r.status_code in (401, 403):
            from feed.sources.http_limits import SourceAuthError

            self._fatal = SourceAuthError("the recovery API refused the token", provider="uof", path=url,
                                          status=r.status_code)
            if self._sink is not None:
                self._sink.set_state("DOWN", "unauthorized")
            self.stop()
            return
        if r.status_code >= 300:
            logger.warning("source %s: recovery request for producer %d answered %d; retrying", self.name,
                           p.product, r.status_code)
            self._recovery_failed(p, request_id)
            return
        logger.info("source %s: recovery of producer %d requested (request %d, after %s)", self.name, p.product,
                    request_id, after)

    def _recovery_failed(self, p: _Producer, request_id: int) -> None:
        if p.request_id == request_id and p.state == "recovering":
            p.state, p.reason, p.want_recovery = "down", "recovery_failed", True
            self._publish_state()

    async def _watchdog(self) -> None:
        opts = self.options
        tick = max(0.05, min(0.5, opts.max_inactivity_s / 20))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for p in list(self.producers.values()):
                if p.state in ("up", "recovering") and now - p.last_alive > opts.max_inactivity_s:
                    self._down(p, "alive_violation")
                elif p.state == "recovering" and now - p.requested_at > opts.max_recovery_s:
                    p.state, p.reason, p.want_recovery = "down", "recovery_timeout", True
                # an up producer wants a recovery only for a repair deferred by min_recovery_interval_s
                # (request_repair; every other want_recovery is set on a down producer): make it now
                self._maybe_recover(p, force_state=p.state == "up")
            self._publish_state()

    def _publish_state(self) -> None:
        sink = self._sink
        if sink is None:
            return
        ps = list(self.producers.values())
        state: SourceState
        if not self._connected:
            state, reason = "DOWN", "reconnecting" if self.connections else "connecting"
        elif all(p.state == "up" for p in ps):
            state, reason = "UP", None
        else:
            state = "DEGRADED" if any(p.state == "up" for p in ps) else "DOWN"
            reason = "producer_down" if any(p.state == "down" for p in ps) else "recovering"
        if (state, reason) != self._state:
            self._state = (state, reason)
            sink.set_state(state, reason)


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The broker URL without our query keys, and those keys."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    rest = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in AMQP_OPTIONS:
            ours[k] = v
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


def _ints(text: str, what: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", "+").split("+") if x)
    except ValueError:
        raise ConfigError(f"source {name}: {what} takes ids joined by +, not {text!r}") from None


def from_spec(spec: SourceSpec, settings: Settings) -> AmqpSource:
    """The registry's source factory for ``uof`` (see the module docstring
    for the options). Raises ConfigError for a bad URL or option."""
    import importlib.util

    if importlib.util.find_spec("aio_pika") is None:  # an optional dependency: say what to install
        raise ConfigError(f"source {spec.name}: uof needs aio-pika: pip install 'oddsfeed[amqp]'")
    url, query = _split_url(spec.url)
    if urlsplit(url).scheme not in ("amqp", "amqps"):
        raise ConfigError(f"source {spec.name}: uof needs an amqp:// or amqps:// URL, not {spec.url.split('@')[-1]!r}")

    def opt(key: str, default: str | None = None) -> str | None:
        v = spec.get(key)
        return v if v is not None else query.get(key, default)

    def num(key: str, default: float) -> float:
        raw = opt(key)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"source {spec.name}: {key} must be a number, not {raw!r}") from None

    api = opt("api")
    if not api:
        raise ConfigError(f"source {spec.name}: uof needs api= (the recovery REST base URL)")
    node = opt("node_id")
    options = AmqpOptions(
        url=url, api=api, token=opt("token"), exchange=opt("exchange") or "unifiedfeed",
        bindings=tuple(b for b in (opt("bindings") or "#").split("+") if b),
        queue=opt("queue") or None,
        producers=_ints(opt("producers") or "1+3", "producers", spec.name),
        node_id=int(num("node_id", 0)) if node else None,
        max_inactivity_s=num("max_inactivity_s", 20.0),
        min_recovery_interval_s=num("min_recovery_interval_s", 30.0),
        max_recovery_s=num("max_recovery_s", 1200.0),
        recovery_window_min=num("recovery_window_min", 4320.0),
        prefetch=int(num("prefetch", 1000)),
        connect_timeout_s=num("connect_timeout_s", 10.0),
        backoff_initial_s=num("backoff_initial_s", 0.5),
        backoff_max_s=num("backoff_max_s", 30.0),
    )
    if options.max_inactivity_s <= 0 or options.prefetch <= 0 or not options.producers:
        raise ConfigError(f"source {spec.name}: max_inactivity_s and prefetch must be > 0, producers not empty")
    # a producer is declared down after max_inactivity_s of silence: markets stay fresh at most that long
    return AmqpSource(spec.name, options, stale_after_ms=int(options.max_inactivity_s * 1000))
