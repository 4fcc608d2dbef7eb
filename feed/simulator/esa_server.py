"""A local Betfair Exchange Stream API server (plain TCP, 127.0.0.1 by default).

It speaks the real ESA protocol (CRLF-terminated compact JSON) so the
production client (:mod:`feed.sources.esa`) can be exercised end to end:

- on accept: ``{"op":"connection","connectionId":"sim-…"}``;
- ``authentication`` with the configured app key and a live session (the
  configured ``session_token`` or one the simulated SSO issued, see
  :mod:`feed.simulator.betfair_api`) → ``status`` SUCCESS, else FAILURE
  (NO_APP_KEY, INVALID_APP_KEY, NO_SESSION when none is given,
  INVALID_SESSION_INFORMATION when it is unknown or expired) with
  ``connectionClosed: true`` and a close;
  nothing within ``auth_timeout_s`` → FAILURE TIMEOUT and a close;
- ``marketSubscription``: ``marketFilter`` (marketIds, eventTypeIds, eventIds,
  marketTypes, countryCodes, venues, bettingTypes, bspMarket,
  turnInPlayEnabled), ``marketDataFilter`` (fields → columns, ladderLevels
  1–10), ``heartbeatMs`` (clamped 500–30000), ``conflateMs`` (0–120000),
  ``segmentationEnabled``; answer ``SUB_IMAGE`` (``initialClk``, ``clk``,
  ``conflateMs``, ``heartbeatMs``, every market ``img: true``), then deltas
  with ``clk`` and ``pt`` (the server's wall clock in ms when the message was
  emitted) and ``HEARTBEAT`` when idle for heartbeatMs;
- resubscribe with ``initialClk`` + ``clk`` → ``RESUB_DELTA`` carrying every
  subscribed market whole (``img: true``; allowed by the protocol for markets
  that cannot be patched); tokens this server never issued → FAILURE
  INVALID_CLOCK and a close;
- images (``SUB_IMAGE``/``RESUB_DELTA``) with more than ``segment_markets``
  markets are split into ``SEG_START``/``SEG``/``SEG_END`` when segmentation
  is on; ``clk`` rides on ``SEG_END`` only;
- market definitions go out as the live stream sends them: without the
  names only historic files carry (``name``, ``eventName``, runner
  ``name``); those come from ``listMarketCatalogue`` of the Betting API,
  served with the identity SSO on ``api_port`` (:mod:`feed.simulator.betfair_api`).

Fault switches (for tests and demos): :meth:`Simulator.set_degraded`,
:meth:`~Simulator.drop_connections`, :meth:`~Simulator.stall`,
:meth:`~Simulator.inject_malformed`, :meth:`~Simulator.drop_mid_segment`,
:meth:`~Simulator.poison_timestamps`, :meth:`~Simulator.freeze`,
:meth:`~Simulator.expire_sessions`, :meth:`~Simulator.fail_catalogue`.

Ground truth: with ``truth_log`` set, every change the synthetic model makes
is appended to that file (:mod:`feed.simulator.truth`).

Upstream: the synthetic :class:`~feed.simulator.market_model.MarketModel`, or
recorded files (``replay``) paced by their ``pt`` / ``speed`` and re-served as
this server's own deltas (``pt`` = now, own ``clk`` and ``id``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import secrets
import ssl as _ssl
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import orjson

from feed.simulator.esa_line import EsaLineServer, LineConn, cancel_tasks
from feed.simulator.esa_line import decode_clk as _decode_clk
from feed.simulator.esa_line import encode_clk as _encode_clk
from feed.simulator.esa_line import now_ms as _now_ms
from feed.simulator.betfair_api import BetfairApi, Sessions
from feed.simulator.market_model import MarketModel
from feed.simulator.pacing import tick_forever
from feed.simulator.recorded import merged_messages
from feed.simulator.truth import open_truth_log, record_exchange_market
from feed.simulator.wire import (
    FieldSpec,
    MarketBook,
    MarketDirty,
    apply_recorded,
    diff_runner,
    image_runner,
    market_matches,
    merge_dirty,
    project_runner,
    truth_of,
)

__all__ = ["Simulator", "SimulatorConfig", "run_simulator"]

logger = logging.getLogger(__name__)

#: a connection whose unsent bytes exceed this is held back (its changes merge: ``con: true``)
HIGH_WATER_BYTES = 4 << 20
_MAX_STREAMS = 1024

_MALFORMED: tuple[bytes, ...] = (
    b'{"op":"mcm","id":1,"clk":"AAAA","pt":16276222',
    b"this is not json",
    b'{"op":"mcm","mc":[{"id":"1.1","rc":[}]}',
    b'\x00\xff{"op":',
)


class SimulatorConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Simulator settings.

    host, port: where to listen (port 0 = ephemeral; read ``Simulator.port``).
    app_key, session_token: the credentials the server accepts.
    events: synthetic events kept alive. rate_per_s: synthetic price/size/trade
    updates per second (total). seed: model seed (``None`` = random).
    replay: recorded files/folders (.bz2/.gz/plain); when given they are served
    instead of the synthetic model. speed: replay pacing multiplier over the
    recorded ``pt`` gaps; ``None`` = as fast as the clients read.
    time_scale: synthetic lifecycle speed-up (60 ⇒ a 90-minute match in 90 s).
    truth_log: append every upstream change to this file
    (:mod:`feed.simulator.truth`; None = off).
    auth_timeout_s: close a connection not authenticated after this many
    seconds (ESA: 15). segment_markets: markets per segment. tick_ms: pump
    interval in ms (model steps, conflation and heartbeat checks).
    api_port: where to serve the identity SSO and the Betting API
    (:mod:`feed.simulator.betfair_api`; None = not served, 0 = any free
    port). username / password: what the SSO accepts. session_ttl_s: a
    session issued by the SSO expires this many seconds after its login or
    last keep-alive (None: never; ``session_token`` never expires by time).
    max_weight: heaviest listMarketCatalogue call accepted (Betfair: 200).
    cert_tls: ``(server cert, server key, client CA)`` PEM paths: also serve
    the certificate login over TLS requiring a client certificate.
    """

    host: str = "127.0.0.1"
    port: int = 0
    app_key: str = "sim-app-key"
    session_token: str = "sim-session"
    events: int = 12
    rate_per_s: float = 50.0
    seed: int | None = None
    replay: tuple[str, ...] = ()
    speed: float | None = 1.0
    time_scale: float = 60.0
    auth_timeout_s: float = 15.0
    segment_markets: int = 5
    tick_ms: int = 10
    truth_log: str | None = None
    api_port: int | None = None
    username: str = "sim-user"
    password: str = "sim-password"
    session_ttl_s: float | None = None
    max_weight: int = 200
    cert_tls: tuple[str, str, str] | None = None


class _Stream:
    """A subscription's clock, shared by the connections that resume it."""

    __slots__ = ("initial_clk", "seq")

    def __init__(self) -> None:
        self.initial_clk = base64.b64encode(secrets.token_bytes(21)).decode()
        self.seq = 0


class _Sub:
    __slots__ = ("conflate_ms", "heartbeat_ms", "id", "market_filter", "segmentation", "spec")

    def __init__(self, req_id: Any, market_filter: dict[str, Any], spec: FieldSpec,
                 heartbeat_ms: int, conflate_ms: int, segmentation: bool) -> None:
        self.id = req_id
        self.market_filter = market_filter
        self.spec = spec
        self.heartbeat_ms = heartbeat_ms
        self.conflate_ms = conflate_ms
        self.segmentation = segmentation


class _View:
    """What one connection was last sent of one market."""

    __slots__ = ("def_seq", "runners", "tv")

    def __init__(self, def_seq: int, tv: float | None) -> None:
        self.def_seq = def_seq
        self.tv = tv
        self.runners: dict[Any, dict[str, Any]] = {}


class _Conn(LineConn):
    MALFORMED = _MALFORMED
    __slots__ = ("clk", "held", "last_flush_ms", "pending", "stalled_until_ms", "stream", "sub", "views")

    def __init__(self, writer: asyncio.StreamWriter, connection_id: str) -> None:
        super().__init__(writer, connection_id)
        self.sub: _Sub | None = None
        self.stream: _Stream | None = None
        self.clk = ""
        self.views: dict[str, _View] = {}
        self.pending: dict[str, MarketDirty] = {}
        self.held = False
        self.last_flush_ms = 0
        self.stalled_until_ms = 0


class Simulator(EsaLineServer[_Conn]):
    """The local ESA upstream. ``await start()``, use ``port``, ``await stop()``.

    ``ssl``: a server-side TLS context to serve TLS like the real endpoint
    (``None``: plain TCP).

    Attributes for tests: ``subscriptions`` (the last 1000
    ``marketSubscription`` requests received, decoded, in order),
    ``connections_accepted``, ``replay_done`` (set when a replay ran out),
    ``books`` (market id → :class:`~feed.simulator.wire.MarketBook`),
    ``model`` (the synthetic model, ``None`` in replay mode).
    """

    subscription_op = "marketSubscription"
    label = "esa simulator"
    conn_class = _Conn

    def __init__(self, config: SimulatorConfig | None = None, *, ssl: _ssl.SSLContext | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._init_lines()
        self._ssl = ssl
        self.port = 0
        self.subscriptions: deque[dict[str, Any]] = deque(maxlen=1000)
        self.replay_done = asyncio.Event()
        self.model: MarketModel | None = None
        self._truth = open_truth_log(self.config.truth_log) if self.config.truth_log else None
        if self.config.replay:
            self.books: dict[str, MarketBook] = {}
        else:
            self.model = MarketModel(events=self.config.events, seed=self.config.seed,
                                     time_scale=self.config.time_scale, now_ms=_now_ms())
            self.books = self.model.books
            self.model.drain()  # the initial state goes out as images
            if self._truth is not None:
                now = _now_ms()
                for mb in self.books.values():
                    record_exchange_market(self._truth, now, mb)
                self._truth.flush()
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._degraded = False
        self._cut_segments = 0
        self._malformed_next = 0
        self._frozen = False
        self._poison: deque[int] = deque()
        self._poison_heartbeats: deque[int] = deque()
        self._wire_defs: dict[str, tuple[int, dict[str, Any]]] = {}  # market id -> (def_seq, live definition)
        cfg = self.config
        self.sessions = Sessions(cfg.session_ttl_s, fixed=(cfg.session_token,))
        self.api: BetfairApi | None = None
        if cfg.api_port is not None:
            self.api = BetfairApi(self.books, self.sessions, model=self.model, app_key=cfg.app_key,
                                  username=cfg.username, password=cfg.password, max_weight=cfg.max_weight,
                                  host=cfg.host, port=cfg.api_port, cert_tls=cfg.cert_tls)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Listen and start the pump (and the replay, if configured)."""
        cfg = self.config
        self._server = await asyncio.start_server(self._handle, cfg.host, cfg.port, limit=1 << 20, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.api is not None:
            await self.api.start()
        self._tasks.append(asyncio.create_task(self._ticker(), name="esa-sim-ticker"))
        if cfg.replay:
            self._tasks.append(asyncio.create_task(self._replay(), name="esa-sim-replay"))
            mode = f"replay of {len(cfg.replay)} path(s) at speed {cfg.speed or 'max'}"
        else:
            mode = f"{cfg.events} synthetic events, {cfg.rate_per_s:g} updates/s, time x{cfg.time_scale:g}"
        logger.info("esa simulator listening on %s:%d%s (%s)", cfg.host, self.port,
                    " with TLS" if self._ssl is not None else "", mode)

    async def stop(self) -> None:
        """Stop the pump, close every connection and the listener."""
        await cancel_tasks(self._tasks)
        for conn in list(self._conns):
            conn.close(abort=True)
        if self.api is not None:
            await self.api.stop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        logger.info("esa simulator on port %d stopped", self.port)

    # -- fault switches --------------------------------------------------------

    def set_degraded(self, on: bool) -> None:
        """While on, every mcm (heartbeats included) carries ``status: 503``."""
        self._degraded = on

    def drop_connections(self) -> None:
        """Close every client socket now."""
        for conn in list(self._conns):
            conn.close(abort=True)

    def stall(self, seconds: float) -> None:
        """The connections open now send nothing (not even heartbeats) for ``seconds``.

        Changes keep accumulating and go out merged afterwards. New connections
        are served normally (a half-open link, not a dead server).
        """
        until = _now_ms() + int(seconds * 1000)
        for conn in self._conns:
            conn.stalled_until_ms = until

    def inject_malformed(self, n: int = 1) -> None:
        """Send ``n`` invalid JSON lines before the next real message of each
        subscribed connection (or of the next one to subscribe)."""
        targets = [c for c in self._conns if c.sub is not None]
        if not targets:
            self._malformed_next += n
        for conn in targets:
            conn.malformed += n

    def drop_mid_segment(self, n: int = 1) -> None:
        """The next ``n`` segmented images are cut: all segments but the last
        (SEG_END) are sent, then the connection is closed."""
        self._cut_segments += n

    def poison_timestamps(self, values: list[int], *, heartbeats: bool = False) -> None:
        """The next ``len(values)`` change messages (or, with ``heartbeats``,
        heartbeats) carry these ``pt`` values instead of the clock (e.g. year
        2100, 0, negative, 2**63); their content is real."""
        (self._poison_heartbeats if heartbeats else self._poison).extend(int(v) for v in values)

    def freeze(self, on: bool = True) -> None:
        """Stop (or restart) the synthetic model: no changes while frozen
        (lifecycle included); heartbeats go on."""
        self._frozen = on

    def expire_sessions(self, notify: str | None = None) -> int:
        """Every session (the configured ``session_token`` too) ends now, as
        after Betfair's expiry: new authentications and Betting API calls
        with them fail. ``notify`` (``NO_SESSION`` /
        ``INVALID_SESSION_INFORMATION``): also send open streams a status
        FAILURE with that code and close them. Returns how many sessions ended."""
        n = self.sessions.expire_all()
        if notify:
            for conn in list(self._conns):
                if conn.authenticated and not conn.closed:
                    self._fail(conn, None, notify, "Session is no longer valid")
        return n

    def fail_catalogue(self, n: int = 1, code: str | int = "TOO_MANY_REQUESTS") -> None:
        """The next ``n`` Betting API calls fail with ``code`` (an
        APINGException code, or an HTTP status such as 503); needs ``api_port``."""
        if self.api is None:
            raise RuntimeError("the Betting API is not served (api_port is None)")
        self.api.fail_catalogue(n, code)

    def truth(self) -> dict[str, Any]:
        """Current state of every market, see :func:`feed.simulator.wire.truth_of`."""
        return truth_of(self.books)

    # -- connections -------------------------------------------------------------

    def _subscribe(self, conn: _Conn, req: dict[str, Any]) -> None:
        self.subscriptions.append(req)
        req_id = req.get("id")
        market_filter = req.get("marketFilter") or {}
        mdf = req.get("marketDataFilter")
        hb, cf = req.get("heartbeatMs", 5000), req.get("conflateMs", 0)
        if (not isinstance(market_filter, dict) or (mdf is not None and not isinstance(mdf, dict))
                or not isinstance(hb, int) or not isinstance(cf, int | None)):
            self._fail(conn, req_id, "INVALID_INPUT", "Invalid subscription")
            return
        initial_clk, clk = req.get("initialClk"), req.get("clk")
        resume = bool(initial_clk and clk)
        if resume:
            key = initial_clk if isinstance(initial_clk, str) else ""  # "" names no stream
            stream = self._streams.get(key)
            seq = _decode_clk(clk)
            if stream is None or seq is None or seq > stream.seq:
                self._fail(conn, req_id, "INVALID_CLOCK", "Invalid clock")
                return
            self._streams.move_to_end(key)
        else:
            stream = _Stream()
            self._streams[stream.initial_clk] = stream
            while len(self._streams) > _MAX_STREAMS:
                self._streams.popitem(last=False)
        sub = _Sub(req_id, market_filter, FieldSpec(mdf), min(max(hb, 500), 30000),
                   min(max(cf or 0, 0), 120000), bool(req.get("segmentationEnabled", True)))
        conn.sub, conn.stream = sub, stream
        conn.views, conn.pending, conn.held = {}, {}, False
        if self._malformed_next:
            conn.malformed += self._malformed_next
            self._malformed_next = 0
        self._status_ok(conn, req_id)
        now = _now_ms()
        mc = [self._image_market(conn, mb) for mb in self.books.values() if market_matches(mb, market_filter)]
        self._emit(conn, mc, now, ct="RESUB_DELTA" if resume else "SUB_IMAGE", header=True)
        conn.last_flush_ms = now
        logger.info("esa simulator: %s subscribed (%d markets, %s)", conn.connection_id, len(mc),
                    "resumed" if resume else "new")

    # -- messages ----------------------------------------------------------------

    def _image_market(self, conn: _Conn, mb: MarketBook) -> dict[str, Any]:
        assert conn.sub is not None
        spec = conn.sub.spec
        view = conn.views[mb.market_id] = _View(mb.def_seq, mb.tv)
        entry: dict[str, Any] = {"id": mb.market_id}
        if spec.definition and mb.definition is not None:
            entry["marketDefinition"] = self._wire_definition(mb)
        rc = []
        for key, rb in mb.runners.items():
            proj = view.runners[key] = project_runner(rb, spec)
            rc.append(image_runner(rb, proj))
        entry["rc"] = rc
        entry["img"] = True
        if spec.market_tv and mb.tv is not None:
            entry["tv"] = mb.tv
        return entry

    def _wire_definition(self, mb: MarketBook) -> dict[str, Any]:
        """``mb``'s definition as the live stream sends it: without ``name``,
        ``eventName`` and runner ``name`` (historic-file fields; the live
        client gets them from listMarketCatalogue). Built once per version."""
        md = mb.definition
        assert md is not None
        cached = self._wire_defs.get(mb.market_id)
        if cached is not None and cached[0] == mb.def_seq:
            return cached[1]
        live = {k: v for k, v in md.items() if k not in ("name", "eventName")}
        runners = md.get("runners")
        if isinstance(runners, list):
            live["runners"] = [{k: v for k, v in r.items() if k != "name"} if isinstance(r, dict) else r
                               for r in runners]
        self._wire_defs[mb.market_id] = (mb.def_seq, live)
        return live

    def _delta_market(self, conn: _Conn, mb: MarketBook, mark: MarketDirty) -> dict[str, Any] | None:
        assert conn.sub is not None
        spec = conn.sub.spec
        view = conn.views[mb.market_id]
        entry: dict[str, Any] = {"id": mb.market_id}
        if mark.definition and view.def_seq != mb.def_seq:
            view.def_seq = mb.def_seq
            if spec.definition and mb.definition is not None:
                entry["marketDefinition"] = self._wire_definition(mb)
        rc = []
        for key in mark.runners:
            rb = mb.runners.get(key)
            if rb is None:
                continue
            proj = project_runner(rb, spec)
            change = diff_runner(rb, view.runners.get(key), proj)
            view.runners[key] = proj
            if change is not None:
                rc.append(change)
        if rc:
            entry["rc"] = rc
        if mark.tv and spec.market_tv and mb.tv != view.tv and mb.tv is not None:
            entry["tv"] = mb.tv
        view.tv = mb.tv
        if len(entry) == 1:
            return None
        if mark.count > 1 and (conn.sub.conflate_ms or conn.held):
            entry["con"] = True
        return entry

    def _emit(self, conn: _Conn, mc: list[dict[str, Any]], now_ms: int, *, ct: str | None = None,
              header: bool = False) -> None:
        """Send ``mc`` as one logical mcm (an image is segmented when large)."""
        sub, stream = conn.sub, conn.stream
        assert sub is not None and stream is not None
        size = self.config.segment_markets
        if header and sub.segmentation and len(mc) > size:  # big images only
            parts = [mc[i:i + size] for i in range(0, len(mc), size)]
        else:
            parts = [mc]
        stream.seq += 1
        conn.clk = _encode_clk(stream.seq)
        last = len(parts) - 1
        pt = self._poison.popleft() if self._poison and not header else _now_ms()  # the emit stamp: as late as possible
        lines = []
        for k, part in enumerate(parts):
            msg: dict[str, Any] = {"op": "mcm", "id": sub.id}
            if header and k == 0:
                msg["initialClk"] = stream.initial_clk
            if k == last:
                msg["clk"] = conn.clk
            if header and k == 0:
                msg["conflateMs"] = sub.conflate_ms
                msg["heartbeatMs"] = sub.heartbeat_ms
            if self._degraded:
                msg["status"] = 503
            msg["pt"] = pt
            if ct is not None:
                msg["ct"] = ct
            if last:
                msg["segmentType"] = "SEG_START" if k == 0 else "SEG_END" if k == last else "SEG"
            msg["mc"] = part
            lines.append(orjson.dumps(msg))
        if last and self._cut_segments > 0:
            self._cut_segments -= 1
            conn.write(lines[:-1])
            conn.close()
            logger.info("esa simulator: %s cut after %d of %d segments", conn.connection_id, last, last + 1)
            return
        conn.write(lines)
        conn.last_send_ms = now_ms

    def _heartbeat(self, conn: _Conn, now_ms: int) -> None:
        assert conn.sub is not None
        msg: dict[str, Any] = {"op": "mcm", "id": conn.sub.id, "clk": conn.clk}
        if self._degraded:
            msg["status"] = 503
        msg["pt"] = self._poison_heartbeats.popleft() if self._poison_heartbeats else _now_ms()
        msg["ct"] = "HEARTBEAT"
        conn.write([orjson.dumps(msg)])
        conn.last_send_ms = now_ms

    def _flush(self, conn: _Conn, now_ms: int) -> None:
        pending, conn.pending = conn.pending, {}
        assert conn.sub is not None
        mc = []
        for market_id, mark in pending.items():
            mb = self.books.get(market_id)
            if mb is None or mark.removed:
                conn.views.pop(market_id, None)
                continue
            if market_id not in conn.views or mark.image:
                if market_matches(mb, conn.sub.market_filter):
                    mc.append(self._image_market(conn, mb))
                continue
            entry = self._delta_market(conn, mb, mark)
            if entry is not None:
                mc.append(entry)
        conn.held = False
        conn.last_flush_ms = now_ms
        if mc:
            self._emit(conn, mc, now_ms)

    def _publish(self, marks: dict[str, MarketDirty]) -> None:
        if not marks:
            return
        for market_id, mark in marks.items():
            if mark.removed:
                self._wire_defs.pop(market_id, None)
        if self._truth is not None:
            self._record_truth(marks)
        for conn in self._conns:
            if conn.sub is not None and not conn.closed:
                merge_dirty(conn.pending, marks)

    def _service(self, now_ms: int) -> None:
        """Flush due changes and send due heartbeats on every connection."""
        for conn in list(self._conns):
            sub = conn.sub
            if sub is None or conn.closed or conn.stalled_until_ms > now_ms:
                if conn.pending:
                    conn.held = True
                continue
            backed_up = conn.transport.get_write_buffer_size() > HIGH_WATER_BYTES
            if conn.pending:
                if backed_up:
                    conn.held = True
                elif not sub.conflate_ms or now_ms - conn.last_flush_ms >= sub.conflate_ms:
                    self._flush(conn, now_ms)
            if not backed_up and now_ms - conn.last_send_ms >= sub.heartbeat_ms:
                self._heartbeat(conn, now_ms)

    def _record_truth(self, marks: dict[str, MarketDirty]) -> None:
        log = self._truth
        assert log is not None
        now = _now_ms()
        for market_id, mark in marks.items():
            mb = self.books.get(market_id)
            if mb is None or mark.removed:
                log.record(now, "esa", "bf:" + market_id, None, status="REMOVED")
            elif mark.image or mark.definition:
                record_exchange_market(log, now, mb)
            else:
                record_exchange_market(log, now, mb, mark.runners)
        log.flush()

    # -- upstreams ----------------------------------------------------------------

    async def _ticker(self) -> None:
        await tick_forever(self.config.tick_ms, self.config.rate_per_s, self._tick)

    def _tick(self, now_ms: int, n: int) -> None:
        if self.model is not None and not self._frozen:
            self.model.step(now_ms, n)
            self._publish(self.model.drain())
        self._service(now_ms)

    async def _replay(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        messages = merged_messages(cfg.replay)
        first_pt: int | None = None
        t0 = 0.0
        count = 0
        try:
            while True:
                batch = await asyncio.to_thread(_take, messages, 512)
                if not batch:
                    break
                for pt, msg in batch:
                    if cfg.speed is not None:
                        if first_pt is None:
                            first_pt, t0 = pt, loop.time()
                        delay = t0 + (pt - first_pt) / 1000 / cfg.speed - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    self._publish(apply_recorded(self.books, msg))
                    self._service(_now_ms())
                    count += 1
                    if cfg.speed is None and count % 64 == 0:
                        await self._drain_clients()
            logger.info("esa simulator: replay finished (%d messages, %d markets)", count, len(self.books))
        finally:
            self.replay_done.set()

    async def _drain_clients(self) -> None:
        """Let slow readers catch up (bounded to ~1 s), so max-speed replays keep every line."""
        await asyncio.sleep(0)
        for _ in range(1000):
            if all(c.transport.get_write_buffer_size() <= HIGH_WATER_BYTES // 4 for c in self._conns):
                return
            await asyncio.sleep(0.001)


def _take(it: Iterator[Any], n: int) -> list[Any]:
    return list(itertools.islice(it, n))


async def run_simulator(config: SimulatorConfig, *, ready: Callable[[int], None] | None = None,
                        started: Callable[[Simulator], None] | None = None) -> None:
    """Run a :class:`Simulator` until cancelled; ``ready(port)`` and
    ``started(simulator)`` once listening."""
    sim = Simulator(config)
    await sim.start()
    try:
        if ready is not None:
            ready(sim.port)
        if started is not None:
            started(sim)
        await asyncio.Event().wait()
    finally:
        await sim.stop()
