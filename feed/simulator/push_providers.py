"""A local push-odds provider: the generic JSON push format over WebSocket and SSE.

Serves ``docs/push-format.md`` from a synthetic
:class:`~feed.simulator.market_model.MarketModel` — its own, or (``model=``)
the ESA simulator's, shared with the HTTP providers, so that every provider
offers the same events — on a Starlette app run by uvicorn on 127.0.0.1:

- ``WS /push/ws`` — the client sends ``{"type":"subscribe","resume_from":
  "<entry id>"|null}``; the server answers ``connected``, then either the
  missed entries (resume inside the history) or a fresh ``snapshot``, then
  live messages, and ``ping`` when idle for ``ping_interval_ms``;
- ``GET /push/sse`` — the same stream as ``text/event-stream``: ``event:`` =
  message type, ``id:`` = entry id, ``data:`` = the JSON (a snapshot spans
  several ``data:`` lines), a ``retry:`` hint and a comment line on open;
  resumes from ``Last-Event-ID`` (or ``?last_event_id=``);
- ``GET /push/snapshot`` — the REST snapshot (one ``snapshot`` message: every
  market, with the ``seq`` / ``entry_id`` it covers) for gap resyncs.

Every route needs the API key (``X-Api-Key``, ``Authorization: Bearer`` or
``?api_key=``): HTTP 401, WebSocket handshake refused (403) otherwise.

Mapping from the model (a Betfair-shaped :class:`MarketBook` per market):
event → fixture ``<eventId>`` (sport, league = the model's competition or
the race's venue, home/away or name, start time,
``is_live`` = ``inPlay``, status ``not_started`` / ``live`` / ``settled``);
participants as this provider spells them (:mod:`feed.simulator.names`:
"Man United", "Atl. Madrid", tennis "Djokovic N." …) and, for team sports,
the start time as its fixture list has it: on the 5-minute grid (racing
keeps the exact off);
market → ``match_odds`` / ``win`` / ``over_under`` with ``line`` 2.5;
runner → selection ``<selectionId>``; price = best back price (decimal, or
null when none); a SUSPENDED market → its odds go out as ``locked-odds``
(last price kept); REMOVED / WINNER / LOSER runners → odd ``status``
``removed`` / ``won`` / ``lost``. Each odd's ``timestamp`` and the
envelope's ``emitted_at`` are the server's wall clock (ms) when the change
was emitted, for lag measurement.

Scores: soccer and basketball fixtures in play (the model's
:meth:`~feed.simulator.market_model.MarketModel.event_state`) go out as
``scores`` messages whenever their period, score, red cards or clock state
(running / stopped) change — the clock's ``seconds`` as of emission, never
once a second — then ``ended`` and ``settled``; every ``snapshot`` carries
the current ``scores`` too. :meth:`PushSimulator.state_truth` is what the
stream has conveyed of them.

Fault switches (for tests, per run): :meth:`PushSimulator.drop_connections`,
:meth:`~PushSimulator.stall`, :meth:`~PushSimulator.duplicate`,
:meth:`~PushSimulator.reorder`, :meth:`~PushSimulator.skip` (sequence gap:
messages not sent, seq jumps), :meth:`~PushSimulator.inject_malformed`,
:meth:`~PushSimulator.fail_snapshots`, :meth:`~PushSimulator.freeze`,
:meth:`~PushSimulator.poison_timestamps`.

Ground truth: with ``truth_log`` set, every odd the stream conveys is also
appended to that file (:mod:`feed.simulator.truth`, ``px:`` ids).

:meth:`PushSimulator.truth` is the state the stream has conveyed, in
canonical terms (compare with :func:`market_view` of stored markets).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from feed.taxonomy import generic_market
from feed.asgi_server import LocalServer
from feed.models import Market
from feed.simulator.market_model import MarketModel
from feed.simulator.names import PUSH, provider_event_name, provider_name
from feed.simulator.pacing import tick_forever
from feed.simulator.truth import TruthLog, open_truth_log
from feed.simulator.wire import MarketBook

__all__ = ["PushSimConfig", "PushSimulator", "market_view", "run_push_providers"]

logger = logging.getLogger(__name__)

_SPORTS = {"1": "soccer", "2": "tennis", "7": "horse_racing", "4339": "greyhound_racing", "7522": "basketball"}
_RUNNER_STATUS = {"ACTIVE": "active", "REMOVED": "removed", "WINNER": "won", "LOSER": "lost", "PLACED": "placed"}
_CANONICAL_SELECTION = {"active": "ACTIVE", "removed": "REMOVED", "won": "WINNER", "lost": "LOSER",
                        "placed": "PLACED", "void": "VOID"}
_RACING = frozenset({"7", "4339"})
#: team events are listed at their scheduled time on this grid, ms
START_GRID_MS = 5 * 60_000

#: bodies sent by :meth:`PushSimulator.inject_malformed`, with the reason the normaliser must give
MALFORMED: tuple[tuple[bytes, str], ...] = (
    (b'{"type":"odds","entry_id":"1-1","seq":', "invalid_json"),
    (b"this is not json", "invalid_json"),
    ((b'{"type":"odds","entry_id":"1-0","data":[{"fixture":{"id":"f0"},"market":{"id":"m"},'
      b'"selection":{"id":"s"},"price":0.5}]}'), "invalid_price"),
    ((b'{"type":"odds","entry_id":"1-0","data":[{"fixture":{"id":"f0"},"market":{"id":"m"},'
      b'"selection":{"id":"s"},"price":"2.5"}]}'), "invalid_price"),
    ((b'{"type":"odds","entry_id":"1-0","data":[{"fixture":{"id":"f0"},"market":{"id":"m"},'
      b'"selection":{"id":"s"},"price":true}]}'), "invalid_price"),
    (b'{"type":"odds","entry_id":"1-0","data":[{"market":{"id":"m"},"selection":{"id":"s"},"price":2.0}]}',
     "invalid_schema"),
    (b'{"type":"gossip","entry_id":"1-0"}', "unknown_type"),
)


class PushSimConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Push simulator settings.

    host, port: where to listen (port 0 = any free port; read
    ``PushSimulator.port``). api_key: the key every route requires.
    events / rate_per_s / seed / time_scale: the synthetic model (as the
    ESA simulator). tick_ms: pump interval, ms. ping_interval_ms: a ``ping``
    after this long without a message, ms. history: entries kept for resume.
    odds_per_message: most odds in one ``odds`` message (``1`` = one message
    per changed odd). max_outbox: a connection with more unsent entries is
    dropped (it resumes from the history). truth_log: append every odd the
    stream conveys to this file (:mod:`feed.simulator.truth`; None = off).
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = "sim-push-key"
    events: int = 12
    rate_per_s: float = 50.0
    seed: int | None = None
    time_scale: float = 60.0
    tick_ms: int = 20
    ping_interval_ms: int = 5000
    history: int = 10_000
    odds_per_message: int = 200
    max_outbox: int = 50_000
    truth_log: str | None = None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Entry:
    """One message of the stream: seq 0 = not part of the sequence."""

    __slots__ = ("body", "entry_id", "seq", "type")

    def __init__(self, type_: str, body: bytes, seq: int = 0, entry_id: str | None = None) -> None:
        self.type = type_
        self.body = body
        self.seq = seq
        self.entry_id = entry_id


class _Fixture(msgspec.Struct, kw_only=True):
    id: str
    sport: str
    league: str | None
    home: str | None
    away: str | None
    name: str
    start_time: int
    is_live: bool
    status: str


class _Odd(msgspec.Struct, kw_only=True):
    name: str | None
    price: float | None
    status: str
    locked: bool
    ts: int = 0

    def key(self) -> tuple[Any, ...]:
        return (self.name, self.price, self.status, self.locked)


class _Market:
    __slots__ = ("fixture", "line", "market_key", "market_status", "name", "odds")

    def __init__(self) -> None:
        self.fixture: _Fixture | None = None
        self.market_key = ""
        self.line: float | None = None
        self.name: str | None = None
        self.market_status = "OPEN"
        self.odds: dict[str, _Odd] = {}


class _Conn:
    __slots__ = ("closed", "dup", "held", "kind", "last_send", "malformed", "n", "outbox", "reorder", "skip",
                 "stalled_until", "wake")

    def __init__(self, kind: str, n: int) -> None:
        self.kind = kind
        self.n = n
        self.outbox: deque[_Entry] = deque()
        self.wake = asyncio.Event()
        self.closed = False
        self.stalled_until = 0.0
        self.dup = 0
        self.reorder = 0
        self.skip = 0
        self.malformed = 0
        self.held: _Entry | None = None
        self.last_send = time.monotonic()

    def push(self, entry: _Entry) -> None:
        self.outbox.append(entry)
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


def _iso_to_ms(text: str | None) -> int:
    if not text:
        return 0
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def _fixture_of(md: dict[str, Any], competition: str | None = None) -> _Fixture:
    """The fixture of a model market; league = ``competition`` (the model's
    competition name), else the venue (racing), else the country code."""
    sport = md.get("eventTypeId", "")
    name = provider_event_name(PUSH, sport, md.get("eventName") or "")
    home = away = None
    if " v " in name:
        home, away = name.split(" v ", 1)
    elif " @ " in name:
        away, home = name.split(" @ ", 1)
    in_play = bool(md.get("inPlay"))
    status = "settled" if md.get("status") == "CLOSED" else "live" if in_play else "not_started"
    start = _iso_to_ms(md.get("marketTime"))
    if sport not in _RACING:
        start -= start % START_GRID_MS
    return _Fixture(id=str(md.get("eventId")), sport=_SPORTS.get(sport, f"sport_{sport}"),
                    league=competition or md.get("venue") or md.get("countryCode"), home=home, away=away, name=name,
                    start_time=start, is_live=in_play, status=status)


def _market_key(md: dict[str, Any]) -> tuple[str, float | None]:
    mt = str(md.get("marketType") or "market")
    if mt.startswith("OVER_UNDER_") and mt[11:].isdigit():
        digits = mt[11:]
        return "over_under", float(f"{digits[:-1] or '0'}.{digits[-1]}")
    return mt.lower(), None


def canonical_market_id(fixture_id: str, market_key: str, line: float | None) -> str:
    base = f"px:{fixture_id}:{market_key}"
    return base if line is None else f"{base}:{line:g}"


def market_view(m: Market) -> dict[str, Any]:
    """What the push stream conveys of a stored canonical market (same shape as
    :meth:`PushSimulator.truth` values)."""
    return {
        "event_id": m.event_id, "sport": m.sport, "competition": m.competition, "event_name": m.event_name,
        "name": m.name, "market_type": m.market_type, "specifiers": m.specifiers, "status": m.status,
        "suspend_reason": m.suspend_reason, "in_play": m.in_play, "start_time": m.start_time,
        "bookmaker": m.bookmaker,
        "selections": {s.selection_id: {"name": s.name, "price": s.price, "status": s.status} for s in m.selections},
    }


class PushSimulator:
    """The local push provider. ``await start()``, use ``port`` / ``url(...)``,
    ``await stop()``.

    Attributes for tests: ``resume_requests`` (``(kind, cursor)`` per
    connection: ``"ws"`` with the ``resume_from`` it sent, ``"sse"`` with
    its ``Last-Event-ID``; None when absent), ``snapshot_requests`` (REST
    snapshot calls), ``connections_accepted``, ``resumed`` / ``fresh``
    (connections served from the history / with a snapshot), ``seq`` (last
    sequence number), ``model``.

    model: serve an existing :class:`MarketModel` (e.g. the ESA simulator's,
    which steps it and takes its change marks: this one then compares every
    market with what it has conveyed, each tick); None = own one from
    ``config`` (stepped here, its marks drained here).
    """

    def __init__(self, config: PushSimConfig | None = None, *, model: MarketModel | None = None) -> None:
        self.config = cfg = config or PushSimConfig()
        self.owns_model = model is None
        self.model = model or MarketModel(events=cfg.events, seed=cfg.seed, time_scale=cfg.time_scale,
                                          now_ms=now_ms())
        self.port = 0
        self.seq = 0
        self._base_ms = now_ms()
        self.last_entry_id = f"{self._base_ms}-0"
        self.history: deque[_Entry] = deque(maxlen=cfg.history)
        self.markets: dict[str, _Market] = {}  # canonical market id -> what the stream conveyed
        self.fixtures: dict[str, _Fixture] = {}
        self.resume_requests: list[tuple[str, str | None]] = []
        self.snapshot_requests = 0
        self.connections_accepted = 0
        self.resumed = 0
        self.fresh = 0
        self.frozen = False
        self._conns: set[_Conn] = set()
        self._conn_seq = itertools.count(1)
        self._next: dict[str, int] = {"dup": 0, "reorder": 0, "skip": 0, "malformed": 0}
        self._fail_snapshots = 0
        self._stall_new_until = 0.0
        self._server: LocalServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._truth: TruthLog | None = open_truth_log(cfg.truth_log) if cfg.truth_log else None
        self._poison: deque[int] = deque()
        #: per fixture: the last state item conveyed (scores) and its key (what makes a new one)
        self.scores: dict[str, dict[str, Any]] = {}
        self._score_keys: dict[str, tuple[object, ...]] = {}
        # the initial state is served as snapshots, not as stream entries
        if self.owns_model:
            self.model.drain()
        for mb in self.model.books.values():
            self._project(mb, self._base_ms)
        if self._truth is not None:
            self._truth.flush()
        self.app = Starlette(routes=[
            WebSocketRoute("/push/ws", self._ws_endpoint),
            Route("/push/sse", _AsgiEndpoint(self._sse_app), methods=["GET"]),
            Route("/push/snapshot", self._snapshot_endpoint, methods=["GET"]),
        ])

    # -- lifecycle -------------------------------------------------------------

    @staticmethod
    def provider_event_id(model_event_id: str, prefix: str = "px") -> str:
        """The event id model event ``model_event_id`` has in a push source
        whose normaliser namespaces ids with ``prefix`` (``<prefix>:<fixture
        id>``; every sport is offered)."""
        return f"{prefix}:{model_event_id}"

    def url(self, kind: str) -> str:
        """``ws``: the WebSocket URL; ``sse``: the SSE URL; ``snapshot``: the REST snapshot."""
        host = self.config.host
        return {"ws": f"ws://{host}:{self.port}/push/ws", "sse": f"http://{host}:{self.port}/push/sse",
                "snapshot": f"http://{host}:{self.port}/push/snapshot"}[kind]

    async def start(self) -> None:
        """Listen (uvicorn) and start the pump."""
        cfg = self.config
        self._server = LocalServer(self.app, cfg.host, cfg.port, name="push-sim-server", ws_max_size=1 << 20,
                                   ws="websockets-sansio")
        await self._server.start()
        self.port = self._server.port
        self._tasks.append(asyncio.create_task(self._ticker(), name="push-sim-ticker"))
        logger.info("push simulator on %s:%d (%d synthetic events, %g updates/s, ping %d ms)", cfg.host, self.port,
                    cfg.events, cfg.rate_per_s, cfg.ping_interval_ms)

    async def stop(self) -> None:
        """Close every stream, stop the pump and the server."""
        for conn in list(self._conns):
            conn.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            await self._server.stop()
            self._server = None
        logger.info("push simulator on port %d stopped", self.port)

    # -- fault switches ------------------------------------------------------------

    def _targets(self, key: str, n: int) -> None:
        conns = [c for c in self._conns if not c.closed]
        if not conns:
            self._next[key] += n
        for c in conns:
            setattr(c, key, getattr(c, key) + n)

    def drop_connections(self) -> int:
        """Close every open stream now (WebSocket close 1012, SSE response ended); how many."""
        conns = [c for c in self._conns if not c.closed]
        for c in conns:
            c.close()
        return len(conns)

    def stall(self, seconds: float, *, include_new: bool = False) -> None:
        """Open streams send nothing, not even pings, for ``seconds`` (a half-open
        link); what piles up goes out afterwards. New connections are served
        normally, unless ``include_new`` (the whole provider hangs)."""
        until = time.monotonic() + seconds
        for c in self._conns:
            c.stalled_until = until
        if include_new:
            self._stall_new_until = until

    def duplicate(self, n: int = 1) -> None:
        """The next ``n`` data messages of each open stream are sent twice."""
        self._targets("dup", n)

    def reorder(self, n: int = 1) -> None:
        """The next ``n`` pairs of data messages of each open stream are swapped."""
        self._targets("reorder", n)

    def skip(self, n: int = 1) -> None:
        """The next ``n`` data messages of each open stream are not sent (a sequence gap)."""
        self._targets("skip", n)

    def inject_malformed(self, n: int = 1) -> None:
        """Send ``n`` bad bodies (cycling through :data:`MALFORMED`) before the next message."""
        self._targets("malformed", n)

    def fail_snapshots(self, n: int = 1) -> None:
        """The next ``n`` REST snapshot calls answer 503."""
        self._fail_snapshots += n

    def freeze(self, on: bool = True) -> None:
        """Stop (or restart) the model: no changes while frozen, pings go on."""
        self.frozen = on

    def poison_timestamps(self, values: list[int]) -> None:
        """The next ``len(values)`` odds messages carry these times (``emitted_at``
        and every odd's ``timestamp``; e.g. year 2100, 0, negative, 2**63)
        instead of the clock; their odds are real."""
        self._poison.extend(int(v) for v in values)

    def open_connections(self) -> int:
        return sum(1 for c in self._conns if not c.closed)

    # -- truth ----------------------------------------------------------------------

    @staticmethod
    def _canonical_type(m: Any, fx: Any) -> dict[str, Any]:
        """The market's type and specifiers in the canonical taxonomy (docs/taxonomy.md:
        push market ids by name, a two-way name with a Draw selection is a match result)."""
        draw = any((o.name or "").strip().lower() in ("draw", "the draw", "x") for o in m.odds.values())
        kind, specs = generic_market(m.market_key, has_draw=draw if m.odds else None, sport=fx.sport)
        if m.line is not None:
            specs["line"] = f"{m.line:g}"
        return {"market_type": kind, "specifiers": specs or None}

    def truth(self) -> dict[str, Any]:
        """Every market the stream has conveyed, in canonical terms:
        ``{market_id: market_view-shaped dict}``."""
        out: dict[str, Any] = {}
        for mid, m in self.markets.items():
            assert m.fixture is not None
            fx = self.fixtures[m.fixture.id]
            out[mid] = {
                "event_id": f"px:{fx.id}", "sport": fx.sport, "competition": fx.league, "event_name": fx.name,
                "name": m.name, **self._canonical_type(m, fx),
                "status": m.market_status,
                "suspend_reason": "locked" if m.market_status == "SUSPENDED" else None,
                "in_play": fx.is_live, "start_time": fx.start_time, "bookmaker": "simbook",
                "selections": {sid: {"name": o.name, "price": o.price,
                                     "status": "SUSPENDED" if o.locked and o.status == "active"
                                     else _CANONICAL_SELECTION[o.status]}
                               for sid, o in m.odds.items()},
            }
        return out

    # -- model → push messages ---------------------------------------------------

    def _project(self, mb: MarketBook, ts: int) -> tuple[str, list[tuple[str, _Odd]], bool, bool]:
        """Update the projection of ``mb``; (market id, changed odds, fixture status changed, new)."""
        md = mb.definition or {}
        comp = self.model.competition_of(mb.market_id)
        fx = _fixture_of(md, comp[1] if comp is not None else None)
        sport = md.get("eventTypeId", "")
        key, line = _market_key(md)
        mid = canonical_market_id(fx.id, key, line)
        m = self.markets.get(mid)
        new = m is None
        if m is None:
            m = self.markets[mid] = _Market()
            m.market_key, m.line = key, line
        m.name = md.get("name")
        old_fx = self.fixtures.get(fx.id)
        fixture_changed = old_fx is not None and (old_fx.status, old_fx.is_live) != (fx.status, fx.is_live)
        self.fixtures[fx.id] = fx
        m.fixture = fx
        status = md.get("status", "OPEN")
        locked = status == "SUSPENDED"
        m.market_status = "SETTLED" if status == "CLOSED" else status
        changed: list[tuple[str, _Odd]] = []
        for r in md.get("runners", ()):
            sid = str(r["id"])
            rb = mb.runners.get((r["id"], None))
            back = rb.back() if rb is not None else []
            name = r.get("name")
            odd = _Odd(name=provider_name(PUSH, sport, name) if name else name,
                       price=float(back[0][0]) if back else None,
                       status=_RUNNER_STATUS.get(r.get("status", "ACTIVE"), "active"), locked=locked, ts=ts)
            old = m.odds.get(sid)
            if old is None or old.key() != odd.key() or new:
                m.odds[sid] = odd
                changed.append((sid, odd))
        if self._truth is not None:
            for sid, odd in changed:
                sel = "SUSPENDED" if odd.locked and odd.status == "active" else _CANONICAL_SELECTION[odd.status]
                self._truth.record(ts, "push", mid, sid, status=m.market_status, sel_status=sel, price=odd.price)
        return mid, changed, fixture_changed, new

    def _odd_json(self, mid: str, sid: str, odd: _Odd, *, snapshot: bool = False) -> dict[str, Any]:
        m = self.markets[mid]
        assert m.fixture is not None
        fx = self.fixtures[m.fixture.id]
        market: dict[str, Any] = {"id": m.market_key, "name": m.name}
        if m.line is not None:
            market["line"] = m.line
        out: dict[str, Any] = {
            "fixture": {"id": fx.id, "sport": fx.sport, "league": fx.league, "home": fx.home, "away": fx.away,
                        "name": fx.name, "start_time": fx.start_time, "is_live": fx.is_live, "status": fx.status},
            "market": market,
            "selection": {"id": sid, "name": odd.name},
            "price": odd.price,
            "is_live": fx.is_live,
            "timestamp": odd.ts,
            "sportsbook": "simbook",
        }
        if odd.status != "active":
            out["status"] = odd.status
        if snapshot:
            out["locked"] = odd.locked
        return out

    def _append(self, type_: str, payload: dict[str, Any], ts: int) -> None:
        self.seq += 1
        entry_id = f"{ts}-{self.seq}"
        stamp = ts
        if self._poison and type_ in ("odds", "locked-odds"):
            stamp = self._poison.popleft()
            payload = {**payload, "data": [{**o, "timestamp": stamp} for o in payload["data"]]}
        body = orjson.dumps({"type": type_, "entry_id": entry_id, "seq": self.seq, "emitted_at": stamp, **payload})
        entry = _Entry(type_, body, self.seq, entry_id)
        self.last_entry_id = entry_id
        self.history.append(entry)
        limit = self.config.max_outbox
        for c in self._conns:
            if c.closed:
                continue
            if len(c.outbox) >= limit:
                logger.info("push simulator: connection %d is %d entries behind; dropped", c.n, len(c.outbox))
                c.close()
                continue
            c.push(entry)

    def publish(self, ts: int | None = None) -> None:
        """Turn the model's changes into stream messages (the pump calls this):
        the marked markets of an own model, every market of a shared one."""
        ts = now_ms() if ts is None else ts
        if self.owns_model:
            marks = self.model.drain()
            books = [mb for market_id, mark in marks.items()
                     if not mark.removed and (mb := self.model.books.get(market_id)) is not None]
        else:  # the owner drains the marks: compare each market with what was conveyed
            books = list(self.model.books.values())
        if not books:
            return
        unlocked: list[dict[str, Any]] = []
        locked: list[dict[str, Any]] = []
        fixtures: dict[str, _Fixture] = {}
        for mb in books:
            if mb.definition is None:
                continue
            mid, changed, fixture_changed, _ = self._project(mb, ts)
            for sid, odd in changed:
                (locked if odd.locked else unlocked).append(self._odd_json(mid, sid, odd))
            if fixture_changed:
                fx = self.markets[mid].fixture
                assert fx is not None
                fixtures[fx.id] = fx
        if self._truth is not None:
            self._truth.flush()
        size = max(self.config.odds_per_message, 1)
        for type_, odds in (("odds", unlocked), ("locked-odds", locked)):
            for i in range(0, len(odds), size):
                self._append(type_, {"data": odds[i:i + size]}, ts)
        for fx in fixtures.values():
            self._append("fixture-status", {"data": {"id": fx.id, "status": fx.status, "is_live": fx.is_live,
                                                     "start_time": fx.start_time, "timestamp": ts}}, ts)
        self._publish_scores(ts)

    def _publish_scores(self, ts: int) -> None:
        """One ``scores`` message with every fixture whose state changed."""
        items = []
        for eid in self.model.event_ids():
            if eid not in self.fixtures:
                continue
            st = self.model.event_state(eid)
            if st is None or st.phase == "pre":
                continue
            key = st.key()
            if self._score_keys.get(eid) == key:
                continue
            self._score_keys[eid] = key
            item: dict[str, Any] = {"fixture_id": eid,
                                    "status": {"live": "live", "ended": "ended", "closed": "settled"}[st.phase],
                                    "is_live": st.phase == "live", "period": st.period,
                                    "score": {"home": st.home, "away": st.away,
                                              "periods": [{"period": p, "home": h, "away": a}
                                                          for p, h, a in st.periods]},
                                    "timestamp": ts}
            if st.clock_s is not None:
                item["clock"] = {"seconds": st.clock_s, "running": st.running,
                                 "remaining_seconds": st.remaining_s, "stoppage_seconds": st.stoppage_s}
            if st.red_cards is not None:
                item["red_cards"] = {"home": st.red_cards[0], "away": st.red_cards[1]}
            self.scores[eid] = item
            items.append(item)
        if items:
            self._append("scores", {"data": items}, ts)

    def state_truth(self) -> dict[str, dict[str, Any]]:
        """The fixture states the stream has conveyed, canonically:
        ``{"px:<fixture>": {"status", "home", "away", "period", "red_cards"}}``."""
        status = {"live": "LIVE", "ended": "ENDED", "settled": "CLOSED"}
        return {f"px:{fid}": {"status": status[it["status"]], "home": it["score"]["home"],
                              "away": it["score"]["away"], "period": it["period"],
                              "red_cards": (it["red_cards"]["home"], it["red_cards"]["away"])
                              if "red_cards" in it else None}
                for fid, it in self.scores.items()}

    def snapshot_body(self) -> bytes:
        """One ``snapshot`` message of every market (odds on their own lines)."""
        head = orjson.dumps({"type": "snapshot", "entry_id": self.last_entry_id, "seq": self.seq,
                             "emitted_at": now_ms()})
        odds = [orjson.dumps(self._odd_json(mid, sid, odd, snapshot=True))
                for mid, m in self.markets.items() for sid, odd in m.odds.items()]
        scores = orjson.dumps(list(self.scores.values()))
        return head[:-1] + b',"scores":' + scores + b',"data":[\n' + b",\n".join(odds) + b"\n]}"

    async def _ticker(self) -> None:
        await tick_forever(self.config.tick_ms, self.config.rate_per_s, self._tick)

    def _tick(self, ts: int, n: int) -> None:
        if self.frozen:
            return
        if self.owns_model:
            self.model.step(ts, n)
        self.publish(ts)

    # -- connections ---------------------------------------------------------------

    def _authorised(self, headers: Headers, query: QueryParams) -> bool:
        key = headers.get("x-api-key")
        auth = headers.get("authorization")
        if key is None and auth and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        if key is None:
            key = query.get("api_key")
        return key is not None and hmac.compare_digest(key.encode(), self.config.api_key.encode())

    def _find(self, cursor: str) -> int | None:
        """Index in the history of the entry after which to resume; -1 = from the start."""
        if cursor == self.last_entry_id and not self.history:
            return -1
        for i in range(len(self.history) - 1, -1, -1):
            if self.history[i].entry_id == cursor:
                return i
        return None

    def _register(self, kind: str, cursor: str | None) -> _Conn:
        """Open a stream: its first entries (connected, then the missed entries
        or a snapshot) are queued in the same step as it starts receiving live
        ones, so nothing falls between the two."""
        conn = _Conn(kind, next(self._conn_seq))
        self.connections_accepted += 1
        self.resume_requests.append((kind, cursor))
        idx = self._find(cursor) if cursor else None
        hello = {"type": "connected", "ping_interval_ms": self.config.ping_interval_ms, "resumed": idx is not None,
                 "emitted_at": now_ms()}
        conn.outbox.append(_Entry("connected", orjson.dumps(hello)))
        if idx is not None:
            self.resumed += 1
            conn.outbox.extend(itertools.islice(self.history, idx + 1, None))
        else:
            self.fresh += 1
            conn.outbox.append(_Entry("snapshot", self.snapshot_body(), 0, self.last_entry_id))
        for key, n in self._next.items():
            if n:
                setattr(conn, key, n)
                self._next[key] = 0
        conn.stalled_until = self._stall_new_until
        conn.wake.set()
        self._conns.add(conn)
        logger.info("push simulator: %s connection %d (%s)", kind, conn.n,
                    f"resumed after {cursor}" if idx is not None else
                    f"unknown cursor {cursor}: snapshot" if cursor else "snapshot")
        return conn

    def _frames(self, conn: _Conn, entries: list[_Entry]) -> list[_Entry]:
        """Apply the connection's fault switches to what is about to be sent."""
        out: list[_Entry] = []
        if conn.malformed:
            out.extend(_Entry("odds", MALFORMED[i % len(MALFORMED)][0]) for i in range(conn.malformed))
            conn.malformed = 0
        for e in entries:
            if e.seq == 0:
                out.append(e)
                continue
            if conn.skip:
                conn.skip -= 1
                continue
            if conn.held is not None:
                out.append(e)
                out.append(conn.held)
                conn.held = None
                conn.reorder -= 1
                continue
            if conn.reorder:
                conn.held = e
                continue
            out.append(e)
            if conn.dup:
                conn.dup -= 1
                out.append(e)
        return out

    async def _serve(self, conn: _Conn, send: Callable[[list[_Entry]], Any]) -> None:
        """Send the connection's entries as they come, pings when idle, until it closes."""
        interval_s = self.config.ping_interval_ms / 1000
        try:
            while not conn.closed:
                idle = time.monotonic() - conn.last_send
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(interval_s - idle, 0.001)):
                        await conn.wake.wait()
                if conn.closed:
                    break
                now = time.monotonic()
                if conn.stalled_until > now:
                    await asyncio.sleep(min(conn.stalled_until - now, 0.05))
                    continue
                conn.wake.clear()
                entries = list(conn.outbox)
                conn.outbox.clear()
                frames = self._frames(conn, entries)
                if not frames and conn.held is not None and now - conn.last_send >= interval_s:
                    frames, conn.held = [conn.held], None  # nothing to swap with: let it go
                if not frames and now - conn.last_send >= interval_s:
                    frames = [_Entry("ping", orjson.dumps({"type": "ping", "seq": self.seq,
                                                           "emitted_at": now_ms()}))]
                if frames:
                    await send(frames)
                    conn.last_send = time.monotonic()
        finally:
            conn.closed = True
            self._conns.discard(conn)

    async def _ws_endpoint(self, websocket: WebSocket) -> None:
        if not self._authorised(websocket.headers, websocket.query_params):
            await websocket.close(code=1008)  # before accept: the handshake is refused (403)
            return
        await websocket.accept()
        try:
            async with asyncio.timeout(10):
                first = await websocket.receive_text()
            req = orjson.loads(first)
        except (TimeoutError, WebSocketDisconnect, orjson.JSONDecodeError):
            with contextlib.suppress(Exception):
                await websocket.close(code=1002)
            return
        if not isinstance(req, dict) or req.get("type") != "subscribe":
            await websocket.close(code=1002, reason="expected a subscribe message")
            return
        resume = req.get("resume_from")
        conn = self._register("ws", resume if isinstance(resume, str) and resume else None)

        async def send(frames: list[_Entry]) -> None:
            for f in frames:
                await websocket.send_text(f.body.decode())

        async def read() -> None:  # notice the client leaving
            with contextlib.suppress(Exception):
                while True:
                    msg = await websocket.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
            conn.close()

        reader = asyncio.create_task(read())
        try:
            await self._serve(conn, send)
        except Exception:  # the client went away mid-send
            pass
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            with contextlib.suppress(Exception):
                await websocket.close(code=1012, reason="stream closed by the provider")

    async def _sse_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, query = Headers(scope=scope), QueryParams(scope.get("query_string", b"").decode("latin-1"))
        if not self._authorised(headers, query):
            await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
            return
        cursor = headers.get("last-event-id") or query.get("last_event_id") or None
        conn = self._register("sse", cursor)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no")]})

        async def write(frames: list[_Entry]) -> None:
            await send({"type": "http.response.body", "body": b"".join(_sse_frame(f) for f in frames),
                        "more_body": True})

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    break
            conn.close()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.body", "body": b"retry: 500\n: odds stream\n\n", "more_body": True})
            await self._serve(conn, write)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # the client went away mid-send
            pass
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def _snapshot_endpoint(self, request: Request) -> Response:
        if not self._authorised(request.headers, request.query_params):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        self.snapshot_requests += 1
        if self._fail_snapshots:
            self._fail_snapshots -= 1
            return JSONResponse({"error": "snapshot unavailable"}, status_code=503)
        return Response(self.snapshot_body(), media_type="application/json")


class _AsgiEndpoint:
    """Wraps a raw ASGI callable so Starlette's Route passes it through as an app."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _sse_frame(e: _Entry) -> bytes:
    """``event:`` / ``id:`` / one ``data:`` line per line of the body, blank line."""
    parts = [b"event: ", e.type.encode(), b"\n"]
    if e.entry_id is not None and e.seq or e.type == "snapshot":
        parts += [b"id: ", (e.entry_id or "").encode(), b"\n"]
    for line in e.body.split(b"\n"):
        parts += [b"data: ", line, b"\n"]
    parts.append(b"\n")
    return b"".join(parts)


async def run_push_providers(config: PushSimConfig, *, ready: Callable[[int], None] | None = None,
                             model: MarketModel | None = None) -> None:
    """Run a :class:`PushSimulator` until cancelled; ``ready(port)`` once listening
    (as :func:`feed.simulator.esa_server.run_simulator`). The streams are then
    ``ws://<host>:<port>/push/ws`` and ``http://<host>:<port>/push/sse``, the
    snapshot ``http://<host>:<port>/push/snapshot``. ``model``: serve that
    model (see :class:`PushSimulator`)."""
    sim = PushSimulator(config, model=model)
    await sim.start()
    try:
        if ready is not None:
            ready(sim.port)
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m feed.simulator.push_providers``: run the push simulator until
    interrupted; prints ``push simulator on 127.0.0.1:<port>`` when listening."""
    import argparse

    p = argparse.ArgumentParser(description="local push-odds provider (WebSocket, SSE, REST snapshot)")
    d = PushSimConfig()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0 = any free port")
    p.add_argument("--api-key", default=d.api_key)
    p.add_argument("--events", type=int, default=d.events)
    p.add_argument("--rate", type=float, default=d.rate_per_s, help="model updates per second")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--time-scale", type=float, default=d.time_scale)
    p.add_argument("--tick-ms", type=int, default=d.tick_ms)
    p.add_argument("--ping-interval-ms", type=int, default=d.ping_interval_ms)
    p.add_argument("--odds-per-message", type=int, default=d.odds_per_message)
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("push simulator listening on %s (not loopback)", args.host)
    config = PushSimConfig(host=args.host, port=args.port, api_key=args.api_key, events=args.events,
                           rate_per_s=args.rate, seed=args.seed, time_scale=args.time_scale, tick_ms=args.tick_ms,
                           ping_interval_ms=args.ping_interval_ms, odds_per_message=args.odds_per_message)
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_push_providers(config, ready=lambda port: print(
            f"push simulator on {config.host}:{port}", flush=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
