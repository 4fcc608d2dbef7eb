"""A local Unified-Odds-Feed producer: UOF XML on a RabbitMQ topic exchange, plus the recovery API.

Publishes to a real broker (``amqp_url``; the exchange, ``unifiedfeed`` by
default, is declared as a durable topic exchange) with UOF routing keys
``<priority>.<pre>.<live>.<type>.<sport>.<urn>.<event>.<node>`` (e.g.
``hi.-.live.odds_change.1.sr:match.1001.-``; ``-.-.-.alive.-.-.-.-``;
``-.-.-.snapshot_complete.-.-.-.-``), from a seeded synthetic model of
``events`` soccer events spread over ``producers`` (1 = LiveOdds: events
go in play; 3 = Ctrl: pre-match only):

- every ``alive_interval_s`` each producer sends ``alive`` (``subscribed="1"``),
  and so does each of ``alive_only`` (producers of the account with nothing
  on offer: no events, and the recovery API answers 404 for them);
- each tick makes about ``rate_per_s × tick`` changes: ``odds_change``
  (random-walk odds of one market, sometimes an outcome turned inactive, a
  market deactivated, or the whole event going in play), ``bet_stop`` (every
  market of the event suspended; the next ``odds_change`` of the event
  re-opens them all), ``bet_cancel`` (one market; sometimes followed by
  ``rollback_bet_cancel`` and the market's ``odds_change``), the event's end
  (``bet_stop`` then ``bet_settlement`` of each market: it leaves the model
  and a fresh event replaces it, announced by ``fixture_change``);
- ``POST /v1/{product}/recovery/initiate_request?after=&request_id=[&node_id=]``
  (HTTP on 127.0.0.1, Starlette + uvicorn; ``x-access-token`` required, 403
  otherwise) answers 202 and then publishes, for every event of that
  producer, ``fixture_change`` and one ``odds_change`` carrying the
  ``request_id`` with every market still open (a ``bet_stop`` follows for
  an event in bet stop), and — the stateful part, since ``after`` (all
  without it) — each market settled or cancelled since then (its
  ``odds_change`` with status -3/-4, then its ``bet_settlement`` /
  ``bet_cancel``); then ``snapshot_complete`` with the ``request_id``.

Event state: every ``odds_change`` carries the event's
``<sport_event_status>`` — ``status`` 0 / 1, ``match_status`` (6 1st half,
31 half time, 7 2nd half; one real second is one match minute),
``home_score`` / ``away_score`` (goals drawn now and then while in play),
``<clock match_time="MM:SS" stopped>``, ``<period_scores>`` and
``<statistics><red_cards>``; after an event's settlements an
``odds_change`` without markets says ``status="4"`` (closed) with the final
score (:meth:`UofSimulator.state_truth`). A handicap market (``hcp=-1``)
is now and then settled as a push: both outcomes ``void_factor="1"``.
State-only draws come from a second generator seeded from ``seed``.

Message ``timestamp`` s are the wall clock (ms), strictly increasing.

Ground truth: :meth:`UofSimulator.truth` is every market the model ever
offered, in canonical terms (compare with :func:`market_view` of stored
markets): it moves with the model whether or not a message conveyed the
change (a silent producer's changes reach the consumer by recovery only).

Fault switches (for tests; the control port would list them): :meth:`stall`
(nothing published, alives included, for a while; then everything queued
goes out), :meth:`duplicate`, :meth:`reorder` (pairs of data messages
swapped), :meth:`inject_malformed` (bad bodies, with the reason the
normaliser must give, :data:`MALFORMED`), :meth:`producer_down`
(``mode="silent"``: the producer sends nothing, alives included, and its
changes are lost; ``mode="unsubscribed"``: its next alive says
``subscribed="0"`` and its messages are lost until a recovery is requested),
:meth:`fail_recovery` (the next recovery requests answer 500),
:meth:`poison_timestamps` (the next ``odds_change`` s carry these
timestamps instead of the clock; their odds are real), :meth:`freeze` (no
model changes; alives go on), :meth:`clear_faults`. ``oddsfeed simulate
--uof-amqp-url`` serves them on its control port (target ``uof``;
:meth:`control_stats` is the evidence it reports).

Broker: the simulator publishes with publisher confirms, one flush at a
time (messages leave in the order they were made: an ``alive`` never
overtakes the data queued before it). When the broker closes the
connection (``rabbitmqctl close_all_connections``, a broker restart) what
was not published stays queued and the simulator reconnects every
``reconnect_s`` (the exchange is declared again); it never exits for it.
A broker that blocks its publishers (a memory or disk alarm) is a lost link
too: a publish unconfirmed after ``publish_timeout_s`` keeps it and what
follows queued, the connection is dropped and made again (that message may
reach the broker twice: at least once, as the UOF feed promises). One
flush holds the publish lock for at most about twice
``publish_timeout_s`` (it stops starting publishes after that and leaves
the rest for the next flush), so alives and the link loop never wait on
the broker for longer.

Truth log: with ``truth_log`` (:mod:`feed.simulator.truth`), every change
of a market's view (status, an outcome's odds or status) is appended when
the model makes it, one line per outcome, ``source`` ``uof``, the canonical
ids (``<prefix>:sr:match:N:<market>[:<specifiers>]``) — a silent
producer's changes too (the upstream offers them; its consumer sees them
only after a recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from feed.asgi_server import LocalServer
from feed.models import Market
from feed.simulator.truth import TruthLog, open_truth_log

if TYPE_CHECKING:
    import aio_pika

__all__ = ["MALFORMED", "UofSimConfig", "UofSimulator", "market_view"]

logger = logging.getLogger(__name__)

#: bodies sent by :meth:`UofSimulator.inject_malformed`, with the reason the normaliser must give
MALFORMED: tuple[tuple[bytes, str], ...] = (
    (b'<odds_change product="1" event_id="sr:match:1" timestamp="1"><odds><market id="1"', "invalid_xml"),
    (b"this is not xml", "invalid_xml"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><alive product="1" timestamp="1" subscribed="1"/>',
     "invalid_xml"),
    (b'<gossip product="1" timestamp="1"/>', "unknown_type"),
    (b'<odds_change product="x" event_id="sr:match:1" timestamp="1"/>', "invalid_schema"),
)

_PATHS = {1: "liveodds", 3: "pre", 4: "betpal"}
_PRODUCTS = {v: k for k, v in _PATHS.items()}
#: market id -> (specifiers, outcome ids)
_MARKETS: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("1", None, ("1", "2", "3")),
    ("18", "total=2.5", ("12", "13")),
    ("16", "hcp=-1", ("1714", "1715")),
)
_STATUS = {1: "OPEN", -1: "SUSPENDED", 0: "INACTIVE", -3: "SETTLED", -4: "CANCELLED"}


class UofSimConfig(msgspec.Struct, kw_only=True, frozen=True):
    """UOF simulator settings.

    amqp_url / exchange: the broker and topic exchange to publish to.
    host / port: the recovery API (port 0 = any free port; read
    ``UofSimulator.port``). token: the ``x-access-token`` it requires.
    events: events alive at once; producers: producer ids (events are
    spread over them); seed: the model's random seed; rate_per_s: changes
    per second; tick_ms: pump interval, ms; alive_interval_s: seconds
    between a producer's alives (UOF: 10); live_after_s: seconds before a
    live producer's event goes in play; prefix: the canonical id prefix of
    :meth:`UofSimulator.truth` (the consumer's ``prefix=``); alive_only:
    producer ids that send only ``alive`` (no events; not recoverable).
    Producer ids with a recovery path here: 1 ``liveodds``, 3 ``pre``,
    4 ``betpal``. truth_log: append every change of the model to this file
    (:mod:`feed.simulator.truth`; None = off). reconnect_s: pause between
    attempts to reconnect to the broker. max_outbox: messages kept queued
    while the broker is away (the oldest are dropped, counted in ``lost``).
    publish_timeout_s: longest wait for one publish (its confirm included);
    a publish that takes longer counts as a lost link (connects: at least 10 s).
    """

    amqp_url: str
    exchange: str = "unifiedfeed"
    host: str = "127.0.0.1"
    port: int = 0
    token: str = "sim-uof-token"
    events: int = 6
    producers: tuple[int, ...] = (1, 3)
    seed: int | None = None
    rate_per_s: float = 40.0
    tick_ms: int = 50
    alive_interval_s: float = 1.0
    live_after_s: float = 2.0
    prefix: str = "uof"
    alive_only: tuple[int, ...] = ()
    truth_log: str | None = None
    reconnect_s: float = 0.5
    max_outbox: int = 50_000
    publish_timeout_s: float = 5.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_RESULTS = frozenset({"WINNER", "LOSER", "VOID", "PLACED"})


def _price(price: float | None, status: str) -> float | None:
    """A resulted selection's price is not compared: a late odds_change of
    a market already settled or cancelled (reordered behind the settlement)
    is rightly dropped, and the book keeps a closed market's prices."""
    return None if status in _RESULTS else price


def market_view(m: Market) -> dict[str, Any]:
    """What the feed conveys of a stored canonical market (same shape as
    :meth:`UofSimulator.truth` values; resulted selections without price)."""
    return {"status": m.status, "suspend_reason": m.suspend_reason,
            "in_play": None if m.status in ("SETTLED", "CANCELLED") else m.in_play,  # (see _SimMarket.view)
            "start_time": m.start_time,
            "selections": {s.selection_id: {"price": _price(s.price, s.status), "status": s.status,
                                            "void_factor": s.void_factor}
                           for s in m.selections}}


class _SimMarket:
    __slots__ = ("closed_at", "code", "event", "in_play", "market_id", "mid", "odds", "active", "pre_cancel",
                 "probs", "reason", "results", "spec")

    def __init__(self, event: _SimEvent, market_id: str, spec: str | None, outcomes: tuple[str, ...],
                 rng: random.Random, prefix: str) -> None:
        self.event = event
        self.market_id = market_id
        self.spec = spec
        self.mid = f"{prefix}:{event.event_id}:{market_id}" + (f":{spec}" if spec else "")
        self.code = 1
        self.reason: str | None = None
        raw = [rng.uniform(0.5, 2.0) for _ in outcomes]
        self.probs = {o: r / sum(raw) for o, r in zip(outcomes, raw, strict=True)}
        self.odds: dict[str, float] = {}
        self.active: dict[str, int] = {o: 1 for o in outcomes}
        self.results: dict[str, str] | None = None
        self.closed_at = 0
        self.in_play = False
        self.pre_cancel: tuple[int, str | None] | None = None
        self.reprice()

    def reprice(self) -> None:
        for o, p in self.probs.items():
            self.odds[o] = min(1000.0, max(1.01, round(0.95 / p, 2)))

    @property
    def closed(self) -> bool:
        return self.code in (-3, -4)

    def view(self) -> dict[str, Any]:
        sels: dict[str, Any] = {}
        for o, price in self.odds.items():
            if self.code == -4:
                st = "VOID"
            elif self.results is not None:
                st = self.results[o]
            else:
                st = "SUSPENDED" if self.active[o] == 0 else "ACTIVE"
            sels[o] = {"price": _price(price, st), "status": st,
                       "void_factor": 1.0 if st == "VOID" and self.code == -3 else None}
        # (in_play of a closed market: not conveyed — a market cancelled or settled while its consumer
        # was away comes back by recovery as its bet_cancel / bet_settlement, which carry no event status)
        return {"status": _STATUS[self.code], "suspend_reason": self.reason,
                "in_play": None if self.closed else self.in_play,
                "start_time": self.event.start_time, "selections": sels}


class _SimEvent:
    __slots__ = ("born", "bet_stop", "closed", "event_id", "goals", "in_play", "live_at", "markets", "product",
                 "red", "start_time")

    def __init__(self, event_id: str, product: int, start_time: int, born: float) -> None:
        self.event_id = event_id
        self.product = product
        self.start_time = start_time
        self.born = born
        self.in_play = False
        self.bet_stop = False
        self.markets: list[_SimMarket] = []
        self.live_at = 0.0  # monotonic time play started
        self.goals: list[tuple[int, int]] = []  # (side 0 home / 1 away, match second)
        self.red = [0, 0]
        self.closed = False

    def match_s(self, now: float) -> int:
        """Match seconds played (one real second = one match minute)."""
        return int((now - self.live_at) * 3600) if self.in_play else 0

    def score(self) -> tuple[int, int]:
        return (sum(1 for side, _ in self.goals if side == 0), sum(1 for side, _ in self.goals if side == 1))




class UofSimulator:
    """The local UOF producer. ``await start()``, use ``api_url`` / ``port``,
    ``await stop()``.

    Attributes for tests: ``recovery_requests`` (``(product, after,
    request_id)`` per accepted request), ``completed`` (``(product,
    request_id)`` per ``snapshot_complete`` published), ``published`` (messages sent),
    ``duplicates_sent``, ``reordered``, ``malformed_sent``, ``lost`` (messages
    a down producer did not send), ``alives_sent`` (per producer id, alives
    published).
    """

    def __init__(self, config: UofSimConfig) -> None:
        self.config = cfg = config
        self.rng = random.Random(cfg.seed)
        #: state-only draws (goals, cards, pushes): the odds stream of a seed stays as it was
        self.state_rng = random.Random(None if cfg.seed is None else f"oddsfeed-state:{cfg.seed}")
        #: the last <sport_event_status> sent per event: (status, home, away)
        self.states: dict[str, tuple[str, int, int]] = {}
        self.port = 0
        self.events: dict[str, _SimEvent] = {}
        self.markets: dict[str, _SimMarket] = {}  # every market ever offered, by canonical id
        self.recovery_requests: list[tuple[int, int | None, int]] = []
        self.completed: list[tuple[int, int]] = []  # (product, request id) of each snapshot_complete published
        self.published = 0
        self.duplicates_sent = 0
        self.reordered = 0
        self.malformed_sent = 0
        self.lost = 0
        self.alives_sent: dict[int, int] = {}
        self.recovery_failures = 0  # recovery requests answered 500 (fail_recovery)
        self.recovery_accepted_ms: dict[int, int] = {}  # product -> wall ms of its last accepted recovery request
        self.poisoned_sent = 0
        self.reconnects = 0  # broker connections made after the first
        self.stalled_flushes = 0  # flushes held back by a stall (stall)
        self.unsubscribed_alives = 0  # alives sent with subscribed="0" (producer_down mode="unsubscribed")
        self.frozen = False
        self._poison: deque[int] = deque()
        self._publish_lock = asyncio.Lock()
        self._truth: TruthLog | None = open_truth_log(cfg.truth_log) if cfg.truth_log else None
        self._logged: dict[str, tuple[Any, ...]] = {}  # market id -> its view as last logged
        self._truth_dirty: list[_SimMarket] = []  # markets of events that left or joined the model since the last log
        self._stepped: _SimEvent | None = None  # the event the last model change was made to
        self._next_event = 1000
        self._last_ts = 0
        self._outbox: deque[tuple[str, bytes, bool]] = deque()  # (routing key, body, data message)
        self._stalled_until = 0.0
        self._dup = 0
        self._reorder = 0
        self._malformed = 0
        self._fail_recovery = 0
        self._silent_until: dict[int, float] = {}
        self._unsubscribed: set[int] = set()  # alive subscribed=0 sent / to send; messages lost until recovery
        self._unsub_pending: set[int] = set()
        self._held: tuple[str, bytes, bool] | None = None
        self._budget = 0.0
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._server: LocalServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        t0 = time.monotonic()
        for i in range(cfg.events):
            self._new_event(cfg.producers[i % len(cfg.producers)], t0, announce=False)
        self._log_truth()
        self.app = Starlette(routes=[
            Route("/v1/{product}/recovery/initiate_request", self._recovery_endpoint, methods=["POST"]),
        ])

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Connect to the broker, declare the exchange, serve the API, start the pump."""
        cfg = self.config
        await asyncio.wait_for(self._connect(), max(10.0, cfg.publish_timeout_s))
        self._server = LocalServer(self.app, cfg.host, cfg.port, name="uof-sim-api")
        await self._server.start()
        self.port = self._server.port
        self._tasks.append(asyncio.create_task(self._pump(), name="uof-sim-pump"))
        self._tasks.append(asyncio.create_task(self._alives(), name="uof-sim-alive"))
        self._tasks.append(asyncio.create_task(self._link(), name="uof-sim-link"))
        logger.info("UOF simulator: exchange %s, recovery API on %s:%d, %d events", cfg.exchange, cfg.host,
                    self.port, cfg.events)

    async def _connect(self) -> None:
        import aio_pika

        cfg = self.config
        connection = await aio_pika.connect(cfg.amqp_url)
        try:
            channel = await connection.channel()
            self._exchange = await channel.declare_exchange(cfg.exchange, aio_pika.ExchangeType.TOPIC,
                                                            durable=True)
        except BaseException:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):  # (not wait_for: on 3.11 it can drop a cancel — feed.aio)
                    await connection.close()
            raise
        self._connection = connection

    async def _disconnected(self, exc: BaseException) -> None:
        """The broker link failed: drop it (:meth:`_link` makes a new one)."""
        if self._exchange is None:
            return
        logger.warning("UOF simulator: broker link lost (%s: %s); reconnecting", type(exc).__name__, exc)
        self._exchange = None
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await connection.close()

    async def _link(self) -> None:
        """Reconnect to the broker whenever the link is gone (every ``reconnect_s``)."""
        while True:
            await asyncio.sleep(self.config.reconnect_s)
            conn = self._connection
            if self._exchange is not None and conn is not None and not conn.is_closed:
                continue
            async with self._publish_lock:
                if self._exchange is not None and conn is not None and conn.is_closed:
                    await self._disconnected(ConnectionError("the broker closed the connection"))
                if self._exchange is None:
                    try:
                        async with asyncio.timeout(max(10.0, self.config.publish_timeout_s)):
                            await self._connect()
                    except Exception as exc:  # noqa: BLE001 - any failure: try again later
                        logger.info("UOF simulator: broker not reachable yet (%s)", type(exc).__name__)
                        continue
                    self.reconnects += 1
                    logger.info("UOF simulator: reconnected to the broker")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._connection.close()
            self._connection = None

    # -- fault switches ----------------------------------------------------------------------------

    def stall(self, seconds: float) -> None:
        """Publish nothing (alives included) for ``seconds``; what piles up goes out afterwards."""
        self._stalled_until = time.monotonic() + seconds

    def duplicate(self, n: int = 1) -> None:
        """The next ``n`` data messages are published twice."""
        self._dup += n

    def reorder(self, n: int = 1) -> None:
        """The next ``n`` pairs of data messages are published swapped."""
        self._reorder += n

    def inject_malformed(self, n: int = 1) -> None:
        """Publish ``n`` bad bodies (cycling through :data:`MALFORMED`) with the next messages."""
        self._malformed += n

    def producer_down(self, product: int, seconds: float = 0.0, mode: str = "silent") -> None:
        """``silent``: ``product`` sends nothing for ``seconds`` (its changes are
        lost); ``unsubscribed``: its next alive says ``subscribed="0"`` and its
        messages are lost until a recovery of it is requested."""
        if mode == "silent":
            self._silent_until[product] = time.monotonic() + seconds
        elif mode == "unsubscribed":
            self._unsub_pending.add(product)
            self._unsubscribed.add(product)
        else:
            raise ValueError(f"mode {mode!r}: use silent or unsubscribed")

    def fail_recovery(self, n: int = 1) -> None:
        """The next ``n`` recovery requests answer 500."""
        self._fail_recovery += n

    def poison_timestamps(self, values: list[int]) -> None:
        """The next ``len(values)`` live ``odds_change`` messages carry these
        ``timestamp`` s (e.g. year 2100, 0, negative, 2**63) instead of the
        clock; their odds are real (the model moved)."""
        self._poison.extend(int(v) for v in values)

    def clear_faults(self) -> None:
        """Cancel every pending fault switch (a stall, duplicates, swaps, bad
        bodies, failing recoveries, poisoned times, silent producers); an
        unsubscribed producer stays so until its recovery."""
        self._stalled_until = 0.0
        self._dup = self._reorder = self._malformed = self._fail_recovery = 0
        self._poison.clear()
        self._silent_until.clear()

    def pending_faults(self) -> int:
        """Fault switches not used up yet (counts, plus 1 per stall or silent producer in force)."""
        now = time.monotonic()
        return (self._dup + self._reorder + self._malformed + self._fail_recovery + len(self._poison)
                + (now < self._stalled_until) + sum(1 for t in self._silent_until.values() if now < t))

    def control_stats(self) -> dict[str, Any]:
        """Counters for a harness (the control port's ``stats``): evidence a switch took effect."""
        by_product: dict[str, list[str]] = {}
        for ev in self.events.values():
            by_product.setdefault(str(ev.product), []).append(ev.event_id)
        return {"published": self.published, "recovery_requests": len(self.recovery_requests),
                "recoveries_by_product": {str(p): sum(1 for r in self.recovery_requests if r[0] == p)
                                          for p in self.config.producers},
                "recovery_failures": self.recovery_failures, "completed": len(self.completed),
                "recovery_accepted_ms": {str(k): v for k, v in self.recovery_accepted_ms.items()},
                "alives_sent": {str(k): v for k, v in self.alives_sent.items()}, "lost": self.lost,
                "duplicates_sent": self.duplicates_sent, "reordered": self.reordered,
                "malformed_sent": self.malformed_sent, "poisoned_sent": self.poisoned_sent,
                "connected": self._exchange is not None, "reconnects": self.reconnects,
                "stalled_flushes": self.stalled_flushes, "unsubscribed_alives": self.unsubscribed_alives,
                "outbox": len(self._outbox), "pending_faults": self.pending_faults(),
                "unsubscribed": sorted(self._unsubscribed), "events_by_product": by_product}

    def freeze(self, on: bool = True) -> None:
        """Stop (or resume) model changes; alives and recoveries go on."""
        self.frozen = on

    # -- truth -----------------------------------------------------------------------------------

    def truth(self, products: Collection[int] | None = None) -> dict[str, dict[str, Any]]:
        """Every market the model offered, in canonical terms (see :func:`market_view`);
        with ``products``, only those of these producers' events."""
        return {mid: m.view() for mid, m in self.markets.items() if products is None or m.event.product in products}

    def state_truth(self) -> dict[str, dict[str, Any]]:
        """The event states the feed has conveyed, canonically:
        ``{"uof:<event_id>": {"status", "home", "away"}}``."""
        return {f"{self.config.prefix}:{eid}": {"status": st, "home": h, "away": a}
                for eid, (st, h, a) in self.states.items()}

    def silent(self, product: int) -> bool:
        return time.monotonic() < self._silent_until.get(product, 0.0) or product in self._unsubscribed

    def _log_truth(self, events: Collection[_SimEvent] | None = None) -> None:
        """Append the markets whose view changed since the last call to the truth log (every
        outcome of such a market, at the wall clock now): those of ``events`` (None: every
        event) and of the events that left the model or joined it meanwhile."""
        log = self._truth
        if log is None:
            return
        t = now_ms()
        evs = self.events.values() if events is None else events
        markets = [*self._truth_dirty, *(m for ev in evs for m in ev.markets)]
        self._truth_dirty.clear()
        source = self.config.prefix
        for m in markets:
            view = m.view()
            sels = view["selections"]
            key = (view["status"], tuple((o, m.odds[o], s["status"]) for o, s in sels.items()))
            if self._logged.get(m.mid) == key:
                continue
            self._logged[m.mid] = key
            for o, s in sels.items():
                log.record(t, source, m.mid, o, status=view["status"], sel_status=s["status"], price=m.odds[o])
        log.flush()

    def advance(self, n: int) -> None:
        """``n`` model changes (what the pump does each tick), each logged to the truth log
        as it is made (a market may change twice in a tick: each change is a message)."""
        for _ in range(n):
            self._step()
            if self._truth is not None and self._stepped is not None:
                self._log_truth((self._stepped,))

    # -- model -------------------------------------------------------------------------------------

    def _ts(self) -> int:
        self._last_ts = max(now_ms(), self._last_ts + 1)
        return self._last_ts

    def _new_event(self, product: int, now: float, *, announce: bool = True) -> _SimEvent:
        self._next_event += 1
        ev = _SimEvent(f"sr:match:{self._next_event}", product, now_ms() // 60_000 * 60_000 + 3_600_000, now)
        for market_id, spec, outcomes in _MARKETS:
            m = _SimMarket(ev, market_id, spec, outcomes, self.rng, self.config.prefix)
            ev.markets.append(m)
            self.markets[m.mid] = m
        self.events[ev.event_id] = ev
        if self._truth is not None:
            self._truth_dirty.extend(ev.markets)
        if announce:
            self._send_fixture(ev)
            self._send_odds(ev, ev.markets)
        return ev

    def _step(self) -> None:
        rng = self.rng
        ev = rng.choice(list(self.events.values()))
        self._stepped = ev
        now = time.monotonic()
        open_markets = [m for m in ev.markets if not m.closed]
        r = rng.random()
        if ev.in_play and not ev.closed and self.state_rng.random() < 0.06:  # a goal (and now and then a red card)
            ev.goals.append((self.state_rng.randrange(2), ev.match_s(now)))
            if self.state_rng.random() < 0.2:
                ev.red[self.state_rng.randrange(2)] += 1
        if ev.product == 1 and not ev.in_play and now - ev.born > self.config.live_after_s:
            ev.in_play = True
            ev.live_at = now
            for m in open_markets:
                m.in_play = True
            self._reopen(ev)
            self._send_odds(ev, open_markets)
        elif r < 0.08 and not ev.bet_stop:
            ev.bet_stop = True
            for m in open_markets:
                m.code, m.reason = -1, "bet_stop"
            self._send(ev, "bet_stop", f'<bet_stop product="{ev.product}" event_id="{ev.event_id}" '
                                       f'timestamp="{self._ts()}" groups="all"/>')
        elif r < 0.12 and now - ev.born > self.config.live_after_s * 2:
            self._settle(ev)
        elif r < 0.15 and open_markets and (ev.in_play or ev.product != 1):  # (in_play never changes after)
            m = rng.choice(open_markets)
            m.pre_cancel = (m.code, m.reason)
            m.code, m.reason, m.closed_at = -4, "bet_cancel", 0
            ts = self._ts()
            m.closed_at = ts
            self._send(ev, "bet_cancel", f'<bet_cancel product="{ev.product}" event_id="{ev.event_id}" '
                                         f'timestamp="{ts}">{self._market_tag(m, outcomes=False)}</bet_cancel>',
                       priority="lo")
        elif r < 0.17:
            cancelled = [m for m in ev.markets if m.code == -4 and m.pre_cancel is not None]
            if cancelled:
                m = rng.choice(cancelled)
                m.code, m.reason = 1, None
                m.pre_cancel, m.closed_at = None, 0
                m.in_play = ev.in_play
                self._send(ev, "rollback_bet_cancel",
                           f'<rollback_bet_cancel product="{ev.product}" event_id="{ev.event_id}" '
                           f'timestamp="{self._ts()}">{self._market_tag(m, outcomes=False)}</rollback_bet_cancel>',
                           priority="lo")
                # the event's bet stop ends with it: every market it reopens goes out too (else the
                # consumer would hold them suspended while the model offers them)
                reopened = self._reopen(ev)
                self._send_odds(ev, {**reopened, m.mid: m})
        elif open_markets:
            m = rng.choice(open_markets)
            reopened = self._reopen(ev)
            for o in m.probs:
                m.probs[o] *= math.exp(rng.gauss(0, 0.08))
            total = sum(m.probs.values())
            for o in m.probs:
                m.probs[o] /= total
            m.reprice()
            roll = rng.random()
            if roll < 0.05:
                m.code, m.reason = 0, None  # deactivated
            elif roll < 0.15:
                o = rng.choice(list(m.active))
                m.active[o] = 1 - m.active[o]
                if m.code == 0:
                    m.code = 1
            elif m.code == 0:
                m.code = 1
            self._send_odds(ev, reopened | {m.mid: m} if reopened else [m])

    def _reopen(self, ev: _SimEvent) -> dict[str, _SimMarket]:
        """The event's bet stop ends: its suspended markets reopen (sent in the next odds_change)."""
        out: dict[str, _SimMarket] = {}
        if ev.bet_stop:
            ev.bet_stop = False
            for m in ev.markets:
                if m.code == -1:
                    m.code, m.reason = 1, None
                    out[m.mid] = m
        return out

    def _settle(self, ev: _SimEvent) -> None:
        ts = self._ts()
        self._send(ev, "bet_stop", f'<bet_stop product="{ev.product}" event_id="{ev.event_id}" timestamp="{ts}" '
                                   f'groups="all"/>')
        for m in ev.markets:
            if m.closed:
                continue
            winner = self.rng.choice(list(m.probs))
            m.results = {o: "WINNER" if o == winner else "LOSER" for o in m.probs}
            if m.spec == "hcp=-1" and self.state_rng.random() < 0.3:  # won by exactly one goal: a push
                m.results = {o: "VOID" for o in m.probs}
            m.code, m.reason = -3, None
            m.closed_at = self._ts()
            self._send_settlement(m, m.closed_at)
        ev.closed = True
        self._send_final(ev)
        if self._truth is not None:
            self._truth_dirty.extend(ev.markets)
        del self.events[ev.event_id]
        self._new_event(ev.product, time.monotonic())

    # -- messages ----------------------------------------------------------------------------------

    def _market_tag(self, m: _SimMarket, *, outcomes: bool = True, code: int | None = None) -> str:
        spec = f' specifiers="{m.spec}"' if m.spec else ""
        status = f' status="{m.code if code is None else code}"' if outcomes else ""
        if not outcomes:
            return f'<market id="{m.market_id}"{spec}/>'
        outs = "".join(f'<outcome id="{o}" odds="{m.odds[o]}" active="{m.active[o]}"/>' for o in m.odds)
        return f'<market id="{m.market_id}"{spec}{status}>{outs}</market>'

    def _ses(self, ev: _SimEvent, status: int | None = None) -> str:
        """The event's ``<sport_event_status>`` now (``status`` 4: closed, the final score)."""
        h, a = ev.score()
        st = status if status is not None else 1 if ev.in_play else 0
        if st != 1:
            match_status = 100 if st in (3, 4) else 0
            inner = ""
        else:
            sec = ev.match_s(time.monotonic())
            if sec < 45 * 60:
                match_status, clock, stopped = 6, sec, False
            elif sec < 60 * 60:
                match_status, clock, stopped = 31, 45 * 60, True
            else:  # the clock stops at 95:00 until the match is settled (else a match left in play reads
                # hours, past the feed's clock bound, and each of its states is quarantined)
                clock = 45 * 60 + sec - 60 * 60
                match_status, clock, stopped = 7, min(clock, 95 * 60), clock >= 95 * 60
            h1 = sum(1 for side, t in ev.goals if side == 0 and t < 45 * 60)
            a1 = sum(1 for side, t in ev.goals if side == 1 and t < 45 * 60)
            periods = f'<period_score type="regular_period" number="1" match_status_code="6" home_score="{h1}" ' \
                      f'away_score="{a1}"/>'
            if match_status == 7:
                periods += (f'<period_score type="regular_period" number="2" match_status_code="7" '
                            f'home_score="{h - h1}" away_score="{a - a1}"/>')
            inner = (f'<clock match_time="{clock // 60}:{clock % 60:02d}" stopped="{str(stopped).lower()}"/>'
                     f'<period_scores>{periods}</period_scores>'
                     f'<statistics><red_cards home="{ev.red[0]}" away="{ev.red[1]}"/></statistics>')
        if st == 1 or st in (3, 4):
            self.states[ev.event_id] = ({1: "LIVE", 3: "ENDED", 4: "CLOSED"}[st], h, a)
        scores = f' home_score="{h}" away_score="{a}"' if st in (1, 3, 4) else ""
        return f'<sport_event_status status="{st}" match_status="{match_status}"{scores}>{inner}</sport_event_status>'

    def _send_final(self, ev: _SimEvent, recovery: bool = False) -> None:
        """After an event's settlements: an odds_change without markets, the event closed."""
        self._send(ev, "odds_change", f'<odds_change product="{ev.product}" event_id="{ev.event_id}" '
                                      f'timestamp="{self._ts()}">{self._ses(ev, 4)}</odds_change>', recovery=recovery)

    def _send_odds(self, ev: _SimEvent, markets: Any, request_id: int | None = None) -> None:
        ms = list(markets.values()) if isinstance(markets, dict) else list(markets)
        req = f' request_id="{request_id}"' if request_id is not None else ""
        ts = self._ts()
        if self._poison and request_id is None and not self.silent(ev.product):
            ts = self._poison.popleft()
            self.poisoned_sent += 1
        body = (f'<odds_change product="{ev.product}" event_id="{ev.event_id}" timestamp="{ts}"{req}>'
                f'{self._ses(ev)}'
                f'<odds>{"".join(self._market_tag(m) for m in ms)}</odds></odds_change>')
        self._send(ev, "odds_change", body, recovery=request_id is not None)

    def _send_fixture(self, ev: _SimEvent, recovery: bool = False) -> None:
        self._send(ev, "fixture_change", f'<fixture_change product="{ev.product}" event_id="{ev.event_id}" '
                                         f'timestamp="{self._ts()}" start_time="{ev.start_time}" change_type="1"/>',
                   recovery=recovery)

    def _send_settlement(self, m: _SimMarket, ts: int, recovery: bool = False) -> None:
        ev = m.event
        assert m.results is not None
        outs = "".join(f'<outcome id="{o}" result="{1 if r == "WINNER" else 0}"'
                       + (' void_factor="1"' if r == "VOID" else "") + "/>" for o, r in m.results.items())
        spec = f' specifiers="{m.spec}"' if m.spec else ""
        self._send(ev, "bet_settlement", f'<bet_settlement product="{ev.product}" event_id="{ev.event_id}" '
                                         f'timestamp="{ts}" certainty="2"><outcomes><market id="{m.market_id}"'
                                         f'{spec}>{outs}</market></outcomes></bet_settlement>',
                   priority="lo", recovery=recovery)

    def _send(self, ev: _SimEvent, kind: str, body: str, *, priority: str = "hi", recovery: bool = False) -> None:
        if not recovery and self.silent(ev.product):
            self.lost += 1
            return
        interest = "-.live" if ev.product == 1 else "pre.-"
        urn, _, number = ev.event_id.rpartition(":")
        key = f"{priority}.{interest}.{kind}.1.{urn}.{number}.-"
        self._outbox.append((key, body.encode(), True))

    def _recover(self, product: int, after: int | None, request_id: int) -> None:
        """Queue the answer to a recovery request (see the module docstring)."""
        self._unsubscribed.discard(product)
        for ev in self.events.values():
            if ev.product != product:
                continue
            self._send_fixture(ev, recovery=True)
            open_markets = [m for m in ev.markets if not m.closed]
            if open_markets:
                self._send_odds(ev, open_markets, request_id)
            if ev.bet_stop:
                self._send(ev, "bet_stop", f'<bet_stop product="{ev.product}" event_id="{ev.event_id}" '
                                           f'timestamp="{self._ts()}" groups="all"/>', recovery=True)
        finals: dict[str, _SimEvent] = {}  # closed events replayed: their final state follows
        for m in self.markets.values():  # stateful messages since `after`
            if m.event.product != product or not m.closed or (after is not None and m.closed_at <= after):
                continue
            ev = m.event
            req = f' request_id="{request_id}"'
            # an event with no open market left says whether it was in play (nothing else of it follows)
            ses = ("" if any(not x.closed for x in ev.markets)
                   else f'<sport_event_status status="{1 if m.in_play else 0}" match_status="0"/>')
            if ev.closed:
                finals[ev.event_id] = ev
            self._send(ev, "odds_change", f'<odds_change product="{product}" event_id="{ev.event_id}" '
                                          f'timestamp="{self._ts()}"{req}>{ses}<odds>{self._market_tag(m)}</odds>'
                                          f'</odds_change>', recovery=True)
            if m.code == -3:
                self._send_settlement(m, self._ts(), recovery=True)
            else:
                self._send(ev, "bet_cancel", f'<bet_cancel product="{product}" event_id="{ev.event_id}" '
                                             f'timestamp="{self._ts()}">{self._market_tag(m, outcomes=False)}'
                                             f'</bet_cancel>', priority="lo", recovery=True)
        for ev in finals.values():
            self._send_final(ev, recovery=True)
        self._outbox.append(("-.-.-.snapshot_complete.-.-.-.-",
                             f'<snapshot_complete product="{product}" request_id="{request_id}" '
                             f'timestamp="{self._ts()}"/>'.encode(), False))

    async def _recovery_endpoint(self, request: Request) -> Response:
        token = request.headers.get("x-access-token", "")
        if not hmac.compare_digest(token.encode(), self.config.token.encode()):
            return Response('<response response_code="FORBIDDEN"/>', 403, media_type="application/xml")
        product = _PRODUCTS.get(request.path_params["product"])
        if product is None or product not in self.config.producers:
            return Response('<response response_code="NOT_FOUND"/>', 404, media_type="application/xml")
        try:
            request_id = int(request.query_params["request_id"])
            after_text = request.query_params.get("after")
            after = int(after_text) if after_text is not None else None
        except (KeyError, ValueError):
            return Response('<response response_code="BAD_REQUEST"/>', 400, media_type="application/xml")
        if self._fail_recovery > 0:
            self._fail_recovery -= 1
            self.recovery_failures += 1
            return Response('<response response_code="SERVICE_UNAVAILABLE"/>', 500, media_type="application/xml")
        self.recovery_requests.append((product, after, request_id))
        self.recovery_accepted_ms[product] = now_ms()
        self._recover(product, after, request_id)
        return Response(f'<response response_code="ACCEPTED"><action>Request {request_id} for recovery of '
                        f'{_PATHS[product]} accepted</action></response>', 202, media_type="application/xml")

    # -- pump ----------------------------------------------------------------------------------------

    async def _pump(self) -> None:
        cfg = self.config
        tick = cfg.tick_ms / 1000
        while True:
            await asyncio.sleep(tick)
            if not self.frozen:
                self._budget += cfg.rate_per_s * tick
                n = int(self._budget)
                self._budget -= n
                self.advance(n)
            await self._flush()

    async def _alives(self) -> None:
        cfg = self.config
        while True:
            for p in (*cfg.producers, *cfg.alive_only):
                if time.monotonic() < self._silent_until.get(p, 0.0):
                    continue
                subscribed = 0 if p in self._unsub_pending else 1
                self._unsub_pending.discard(p)
                self.unsubscribed_alives += 1 - subscribed
                self._outbox.append(("-.-.-.alive.-.-.-.-", f'<alive product="{p}" timestamp="{self._ts()}" '
                                                            f'subscribed="{subscribed}"/>'.encode(), False))
            await self._flush()
            await asyncio.sleep(cfg.alive_interval_s)

    async def _flush(self) -> None:
        """Publish what is queued, in order (one flush at a time: the pump's and the
        alives' never interleave). A broker failure keeps what was not published; so
        does a publish not confirmed within ``publish_timeout_s`` (a blocked broker),
        which also drops the link. Bounded: no publish starts after
        ``publish_timeout_s`` of flushing (the rest waits for the next flush)."""
        async with self._publish_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        if time.monotonic() < self._stalled_until or self._exchange is None:
            self.stalled_flushes += self._exchange is not None
            self._trim_outbox()
            return
        import aio_pika

        while self._malformed > 0:
            body, _ = MALFORMED[self.malformed_sent % len(MALFORMED)]
            self._malformed -= 1
            self.malformed_sent += 1
            self._outbox.appendleft(("hi.-.live.odds_change.1.sr:match.1.-", body, False))
        out: list[tuple[str, bytes]] = []
        while self._outbox:
            key, body, data = self._outbox.popleft()
            if data and self._reorder > 0 and self._held is None:
                self._held = (key, body, data)
                continue
            out.append((key, body))
            if data and self._held is not None:
                out.append(self._held[:2])
                self._held = None
                self._reorder -= 1
                self.reordered += 1
            if data and self._dup > 0:
                self._dup -= 1
                self.duplicates_sent += 1
                out.append((key, body))
        if self._held is not None and (self.frozen or not self._reorder):  # nothing left to swap it with
            out.append(self._held[:2])
            self._held = None
        exchange = self._exchange
        timeout_s = self.config.publish_timeout_s
        stop_at = time.monotonic() + timeout_s
        for i, (key, body) in enumerate(out):
            if i and time.monotonic() > stop_at:  # a slow broker: let the alives and the link loop in
                self._outbox.extendleft((k, b, False) for k, b in reversed(out[i:]))
                return
            try:
                async with asyncio.timeout(timeout_s):  # (not wait_for: it can drop a cancel — feed.aio)
                    await exchange.publish(aio_pika.Message(body, content_type="text/xml",
                                                            headers={"timestamp_in_ms": now_ms()}), routing_key=key)
            except Exception as exc:  # noqa: BLE001 - aiormq / aio-pika raise many kinds: the link is gone
                if isinstance(exc, TimeoutError):  # a blocked broker (memory / disk alarm) holds publishes
                    exc = TimeoutError(f"publish not confirmed within {timeout_s:g} s (a blocked broker?)")
                self._outbox.extendleft((k, b, False) for k, b in reversed(out[i:]))
                await self._disconnected(exc)
                return
            self.published += 1
            if key.startswith("-.-.-.snapshot_complete."):
                m = re.search(rb'product="(\d+)" request_id="(\d+)"', body)
                if m:
                    self.completed.append((int(m.group(1)), int(m.group(2))))
            elif key.startswith("-.-.-.alive."):
                m = re.search(rb'product="(\d+)"', body)
                if m:
                    self.alives_sent[int(m.group(1))] = self.alives_sent.get(int(m.group(1)), 0) + 1

    def _trim_outbox(self) -> None:
        """While nothing can be published: keep at most ``max_outbox`` messages (the oldest go, as lost)."""
        extra = len(self._outbox) - self.config.max_outbox
        for _ in range(max(0, extra)):
            self._outbox.popleft()
            self.lost += 1
