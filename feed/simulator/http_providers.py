"""Local HTTP odds providers: a Pinnacle-style and a The-Odds-API-style API.

A Starlette app (served by uvicorn on 127.0.0.1) driven by the same
synthetic :class:`~feed.simulator.market_model.MarketModel` as the ESA
simulator — the same events, markets and prices, projected into each
provider's shape (``research/upstream.md`` §3–4), with each provider's
spelling of the teams and players (:mod:`feed.simulator.names`: "Manchester
United", "Bayer 04 Leverkusen", "Novak Djokovic" …). Which provider event
is which model event: :meth:`HttpProviders.provider_event_id`
(:mod:`feed.simulator.links`).

Pinnacle (HTTP Basic ``user``/``password``, or ``X-API-Key``, or a Bearer token):

- ``GET /v1/fixtures?sportId=&since=`` — ``{sportId, last, league:[{id, name,
  events:[{id, parentId?, starts, home, away, liveStatus, resultingUnit}]}]}``;
- ``GET /v2/odds?sportId=&since=&oddsFormat=Decimal|American`` — ``{sportId,
  last, leagues:[{id, events:[{id, periods:[{number, lineId, status, cutoff,
  moneyline, totals, *UpdatedAt}]}]}]}``; without ``since`` the whole
  sport, with it only the periods changed after it;
- ``GET /v2/sports``; ``GET /v2/leagues?sportId=`` (``homeTeamType``: the
  NBA league says ``Team2``, the others ``Team1``);
- live scores: a live soccer event of ``/v2/odds`` carries ``homeScore``,
  ``awayScore``, ``homeRedCards``, ``awayRedCards`` (the model's goals and
  cards; a change of them puts the event in the next delta);
- ``GET /v1/fixtures/settled?sportId=&since=`` — ``{sportId, last,
  leagues:[{id, events:[{id, periods:[{number, status: 1, settlementId,
  settledAt, team1Score, team2Score}]}]}]}``: once the model settles an
  event, its pre-match event (and its live one) is settled — soccer periods
  0 and 1 (1st half), basketball 0, 1–2 (halves) and 3–6 (quarters),
  tennis period 0 in sets (2–0 or 2–1 to the winner); team1 is the home
  side except in the NBA league (``homeTeamType`` Team2).

Pre-match events (soccer → sportId 29, tennis → 33, basketball → 4) keep the
model's event id; when the model turns an event in play, a **live event**
(id + :data:`LIVE_ID_OFFSET`, ``parentId`` = the pre-match id,
``liveStatus`` 1) appears and carries the odds while the pre-match period
goes offline (status 2). A suspended model market → period status 2; a
settled one stays offline; a removed one leaves the snapshots. ``*UpdatedAt``
is the simulator's change time (when a tick saw the model change), so lag
can be measured. ``cutoff`` is set hours after the start: the simulator
takes markets offline itself (so a test's freeze never races a cutoff).

The Odds API (``apiKey`` query parameter, ``X-API-Key``, or a Bearer token):

- ``GET /v4/sports`` (free) and ``GET /v4/sports/{sport}/odds?regions=&markets=&
  oddsFormat=&dateFormat=`` (``{sport}`` a key or ``upcoming``), cost =
  markets × regions, quota headers ``x-requests-remaining`` / ``-used`` /
  ``-last``; ``OUT_OF_USAGE_CREDITS`` (HTTP 401) when spent. The odds
  endpoint sends an ``ETag`` and answers ``If-None-Match`` with 304 (free)
  — the poller's conditional mode. Each model event is offered by
  ``config.bookmakers`` (book 0 at the model's best back price, the others
  shaded) with h2h (and totals 2.5 for soccer); a suspended market is simply
  absent. ``last_update`` (ISO with milliseconds) = the change time.
  ``GET /v4/sports/{sport}/scores?daysFrom=&dateFormat=`` — every event of
  the sport: ``scores`` (``[{name, score}]``, text) once it started (soccer
  and basketball: the model's score; others null), ``completed`` once the
  model ended play, ``last_update`` = when the score last changed; cost 1,
  2 with ``daysFrom``; an ``ETag`` / 304 like the odds.

Both: ``POST /v1/token`` (JSON or form ``client_id``/``client_secret``) →
``{access_token, token_type, expires_in}``; with ``hmac_secret`` set every
request must be signed (:func:`feed.sources.http_auth.verify_signature`,
``hmac.compare_digest``, a timestamp window and nonces).

Fault switches (:class:`HttpProviders` methods, per provider or both):
:meth:`~HttpProviders.rate_limit` (429 + Retry-After, the provider's body),
:meth:`~HttpProviders.server_error`, :meth:`~HttpProviders.error_code`,
:meth:`~HttpProviders.expire_tokens`, :meth:`~HttpProviders.stall` (reply
after the client's deadline), :meth:`~HttpProviders.trickle` (a slow body),
:meth:`~HttpProviders.duplicate` and :meth:`~HttpProviders.replay_old`
(Pinnacle odds: the last answer again / an older ``last``),
:meth:`~HttpProviders.cached` (the last answer again from a cache in front, with ``Age``),
:meth:`~HttpProviders.malformed`, :meth:`~HttpProviders.drop_bookmaker`,
:meth:`~HttpProviders.set_quota`, :meth:`~HttpProviders.freeze`.

Ground truth: with ``truth_log`` set, every change of what either provider
would answer is appended to that file (:mod:`feed.simulator.truth`), in
canonical ids (``pn:<event>:0:moneyline`` …, ``toa:<id>:<bookmaker>:h2h`` …).

For tests: :meth:`~HttpProviders.truth` (per provider, in canonical terms,
for every market the provider has served), ``requests`` (server-side log
with monotonic timestamps), ``early_requests`` (requests that arrived
before a Retry-After expired), ``token_requests``, ``cut_answers`` (per
provider: answers the client did not read whole — a stalled or trickled
answer it gave up on at its deadline; they never count as served).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from feed.asgi_server import LocalServer
from feed.normalise.base import iso_to_ms
from feed.odds import decimal_to_american
from feed.simulator.market_model import MarketModel, iso_ms
from feed.simulator.names import provider_name
from feed.simulator.pacing import tick_forever
from feed.simulator.truth import TruthLog, open_truth_log
from feed.sources.http_auth import NonceCache, verify_signature

__all__ = ["LIVE_ID_OFFSET", "HttpProviders", "ProvidersConfig", "run_http_providers"]

logger = logging.getLogger(__name__)

LIVE_ID_OFFSET = 500_000_000
PINNACLE, TOA = "pinnacle", "theoddsapi"

#: model eventTypeId -> Pinnacle sportId
_PN_SPORTS = {"1": 29, "2": 33, "7522": 4}
_PN_SPORT_NAMES = {29: "Soccer", 33: "Tennis", 4: "Basketball"}
#: leagues whose home side is Team2 (/v2/leagues homeTeamType), as US leagues list the away team first
_PN_TEAM2_HOME = frozenset({487})
_PN_LEAGUES = {"GB": (1980, "England - Premier League"), "ES": (2196, "Spain - La Liga"),
               "DE": (1842, "Germany - Bundesliga"), "IT": (2436, "Italy - Serie A")}
#: (eventTypeId, country) -> (sport key, title)
_TOA_SOCCER = {"GB": ("soccer_epl", "EPL"), "ES": ("soccer_spain_la_liga", "La Liga - Spain"),
               "DE": ("soccer_germany_bundesliga", "Bundesliga - Germany"), "IT": ("soccer_italy_serie_a", "Serie A - Italy")}
_TOA_SPORTS = [("soccer_epl", "Soccer", "EPL"), ("soccer_spain_la_liga", "Soccer", "La Liga - Spain"),
               ("soccer_germany_bundesliga", "Soccer", "Bundesliga - Germany"),
               ("soccer_italy_serie_a", "Soccer", "Serie A - Italy"), ("tennis_atp", "Tennis", "ATP"),
               ("basketball_nba", "Basketball", "NBA")]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ProvidersConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Settings of the HTTP providers simulator.

    host/port: where to listen (port 0 = any free one). events / rate_per_s
    / seed / time_scale: the synthetic model (when the simulator owns it).
    tick_ms: model step and projection interval. Credentials: ``user`` /
    ``password`` (Pinnacle Basic), ``api_key`` (both), ``client_id`` /
    ``client_secret`` (token endpoint), ``token_ttl_s``, ``require_token``
    (data endpoints accept only Bearer tokens), ``hmac_key_id`` /
    ``hmac_secret`` (when set, requests must be signed). quota: Odds API
    credits. bookmakers: Odds API bookmaker keys. etag: ETag/304 on the Odds
    API odds endpoint. truth_log: append every change of the providers'
    offers to this file (:mod:`feed.simulator.truth`; None = off).
    """

    host: str = "127.0.0.1"
    port: int = 0
    events: int = 12
    rate_per_s: float = 50.0
    seed: int | None = None
    time_scale: float = 60.0
    tick_ms: int = 50
    user: str = "demo"
    password: str = "demo"
    api_key: str = "demo"
    client_id: str = "sim-client"
    client_secret: str = "sim-secret"
    token_ttl_s: float = 3600.0
    require_token: bool = False
    hmac_key_id: str = "sim"
    hmac_secret: str | None = None
    quota: int = 1_000_000
    bookmakers: tuple[str, ...] = ("simbook_a", "simbook_b")
    etag: bool = True
    truth_log: str | None = None


# --- provider state ------------------------------------------------------------------


@dataclass
class _PnPeriod:
    status: int = 2
    line_id: int = 0
    ml: dict[str, float] | None = None
    ml_ts: int = 0
    totals: list[tuple[float, float, float]] = field(default_factory=list)
    tot_ts: int = 0
    version: int = 0
    offered: set[str] = field(default_factory=set)  # canonical market ids ever offered here


@dataclass
class _PnEvent:
    id: int
    parent: int | None
    sport: int
    league: tuple[int, str]
    home: str
    away: str
    starts_ms: int
    live_status: int
    fixture_version: int
    period: _PnPeriod = field(default_factory=_PnPeriod)
    removed: bool = False
    scores: tuple[int, int, int, int] | None = None  # live soccer: home, away, home red cards, away red cards
    score_version: int = 0


@dataclass
class _PnSettled:
    """One settled event of ``/v1/fixtures/settled``: periods (number, team1, team2)."""

    version: int
    league: int
    event_id: int
    periods: list[tuple[int, int, int]]
    settlement_id: int
    settled_ms: int


@dataclass
class _ToaMarket:
    outcomes: tuple[tuple[str, float, float | None], ...]  # (name, decimal price, point)
    last_update_ms: int


@dataclass
class _ToaEvent:
    id: str
    sport_key: str
    title: str
    home: str
    away: str
    commence_ms: int
    markets: dict[tuple[str, str], _ToaMarket] = field(default_factory=dict)  # (bookmaker, key) -> market
    score: tuple[int, int] | None = None  # once started (soccer, basketball)
    score_ms: int = 0  # when the score last changed
    completed: bool = False
    started: bool = False


@dataclass
class RequestRecord:
    """One request as the server saw it (``at``: monotonic seconds)."""

    at: float
    provider: str
    path: str
    query: dict[str, str]
    status: int = 0


@dataclass
class _Fault:
    kind: str
    provider: str | None
    left: int
    arg: Any = None


class HttpProviders:
    """The simulator. ``await start()``, use ``url``, ``await stop()``.

    model: share an existing :class:`MarketModel` (e.g. the ESA simulator's:
    it steps it; this one only projects it); None = own one from ``config``.
    """

    def __init__(self, config: ProvidersConfig | None = None, *, model: MarketModel | None = None) -> None:
        self.config = cfg = config or ProvidersConfig()
        self.owns_model = model is None
        self.model = model or MarketModel(events=cfg.events, seed=cfg.seed, time_scale=cfg.time_scale, now_ms=_now_ms())
        self.port = 0
        self.frozen = False
        # Pinnacle
        self.pn_last = 1_000_000
        self.pn_events: dict[int, _PnEvent] = {}
        self.pn_history: dict[int, deque[tuple[int, bytes, int]]] = {}
        self.pn_served: set[str] = set()
        #: settled events per sportId, and the settled base events whose settlement a client has read
        self.pn_settled: dict[int, list[_PnSettled]] = {}
        self.pn_settled_bases: dict[int, int] = {}  # base event -> sportId (settled in the model)
        self.pn_settled_served: set[int] = set()
        self._pn_settled_served_last: dict[int, int] = {}
        self._settlement_id = 7_000_000
        # The Odds API
        self.toa_events: dict[str, _ToaEvent] = {}
        self.toa_served: dict[str, dict[str, Any]] = {}
        #: The Odds API scores a client has read: toa event id -> (completed, home, away)
        self.toa_scores_served: dict[str, tuple[bool, int | None, int | None]] = {}
        self.quota_remaining = cfg.quota
        self.quota_used = 0
        self.dropped_bookmakers: set[str] = set()
        # auth
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.token_requests = 0
        self.nonces = NonceCache()
        # faults and logs
        self._faults: list[_Fault] = []
        self.requests: deque[RequestRecord] = deque(maxlen=100_000)
        self.status_counts: Counter[str] = Counter()
        self.not_before: dict[str, float] = {}
        self.retry_afters: list[tuple[float, float, str]] = []  # (at, seconds, provider)
        self.early_requests: list[RequestRecord] = []
        self.cut_answers: Counter[str] = Counter()  # provider -> answers the client gave up on before the end
        self.projected_at_ms = 0
        self.ticks = 0
        self._pn_served_last: dict[int, int] = {}
        self._truth: TruthLog | None = open_truth_log(cfg.truth_log) if cfg.truth_log else None
        self._truth_pn: dict[int, set[str]] = {}  # base event -> Pinnacle market ids logged as offered
        self._server: LocalServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.app = self._build_app()
        self._project(_now_ms())

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @staticmethod
    def provider_event_id(provider: str, model_event_id: str, sport: str) -> str | None:
        """The event id ``provider`` (``pinnacle`` / ``theoddsapi``) serves model
        event ``model_event_id`` under, as the normaliser namespaces it
        (``pn:<id>`` — the pre-match id, which a live event's markets keep —,
        ``toa:<md5 id>``); None when the provider does not offer ``sport``
        (the model's eventTypeId: soccer, tennis and basketball only)."""
        if sport not in _PN_SPORTS:
            return None
        if provider == PINNACLE:
            return f"pn:{model_event_id}"
        if provider == TOA:
            return f"toa:{_toa_id(model_event_id)}"
        raise ValueError(f"unknown provider {provider!r}; valid: {PINNACLE}, {TOA}")

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._server = LocalServer(self.app, cfg.host, cfg.port, name="http-providers", timeout_keep_alive=30)
        await self._server.start()
        self.port = self._server.port
        self._ticker = asyncio.create_task(self._tick_forever(), name="http-providers-ticker")
        logger.info("http providers simulator on %s (Pinnacle /v1/fixtures /v2/odds, The Odds API /v4)", self.url)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._server is not None:
            await self._server.stop()
            self._server = None

    async def _tick_forever(self) -> None:
        await tick_forever(self.config.tick_ms, self.config.rate_per_s, self._tick)

    def _tick(self, now_ms: int, n: int) -> None:
        if self.frozen:
            return
        if self.owns_model:
            self.model.step(now_ms, n)
            self.model.drain()
        self._project(now_ms)

    # -- fault switches --------------------------------------------------------------

    def _add(self, kind: str, provider: str | None, n: int, arg: Any = None) -> None:
        self._faults.append(_Fault(kind, provider, n, arg))

    def rate_limit(self, n: int = 1, retry_after_s: int = 1, provider: str | None = None) -> None:
        """The next ``n`` data requests get 429 with ``Retry-After: retry_after_s``."""
        self._add("429", provider, n, retry_after_s)

    def server_error(self, n: int = 1, status: int = 503, provider: str | None = None) -> None:
        """The next ``n`` data requests get ``status`` (5xx)."""
        self._add("5xx", provider, n, status)

    def error_code(self, code: str, n: int = 1, status: int = 401, provider: str | None = None) -> None:
        """The next ``n`` data requests get ``status`` with the provider's error body carrying ``code``."""
        self._add("code", provider, n, (code, status))

    def stall(self, n: int = 1, seconds: float = 3.0, provider: str | None = None) -> None:
        """The next ``n`` data requests are answered only after ``seconds``."""
        self._add("stall", provider, n, seconds)

    def trickle(self, n: int = 1, seconds: float = 3.0, provider: str | None = None, path: str | None = None) -> None:
        """The next ``n`` bodies (of requests to ``path`` only, when given — e.g. ``/v2/odds``)
        are sent in small pieces spread over ``seconds``."""
        self._add("trickle", provider, n, (seconds, path))

    def malformed(self, n: int = 1, kind: str = "truncated", provider: str | None = None, *,
                  snapshots: bool = True) -> None:
        """The next ``n`` data bodies are bad: ``truncated`` (invalid JSON),
        ``bad_price`` (a price of 0.5), ``wrong_type`` (a field of the wrong type).
        Odds and fixtures answers only (never settled results, leagues or scores);
        ``snapshots`` False: only answers to a request with a ``since`` cursor (a
        Pinnacle snapshot rejected whole is asked again only a minute later)."""
        self._add("malformed", provider, n, (kind, snapshots))

    def duplicate(self, n: int = 1) -> None:
        """The next ``n`` Pinnacle odds replies repeat the previous reply of that sport."""
        self._add("duplicate", PINNACLE, n)

    def replay_old(self, n: int = 1) -> None:
        """The next ``n`` Pinnacle odds replies are an older reply (an old ``last``)."""
        self._add("replay_old", PINNACLE, n)

    def cached(self, n: int = 1, age_s: int | None = None) -> None:
        """The next ``n`` Pinnacle odds replies come from a cache in front of the provider: the
        previous reply of that sport again, with ``Age`` (RFC 9111 §5.1) — the whole seconds since
        it was made, or ``age_s`` (a cache that has held it that long)."""
        self._add("cached", PINNACLE, n, age_s)

    def expire_tokens(self) -> None:
        """Every issued token is now invalid (401 until the client gets a new one)."""
        self.tokens.clear()

    def drop_bookmaker(self, key: str, dropped: bool = True) -> None:
        """The Odds API stops (or resumes) listing bookmaker ``key``."""
        if dropped:
            self.dropped_bookmakers.add(key)
        else:
            self.dropped_bookmakers.discard(key)
        if self._truth is not None:
            now = _now_ms()
            for ev in self.toa_events.values():
                for (bk, k), m in ev.markets.items():
                    if bk == key:
                        self._truth_toa(ev, bk, k, None if dropped else m, now)
            self._truth.flush()

    def set_quota(self, remaining: int) -> None:
        self.quota_remaining = remaining

    def freeze(self, on: bool = True) -> None:
        """Stop (or restart) the model and the projections: the providers keep
        serving the state they have."""
        if not on:
            self.frozen = False
            return
        self._project(_now_ms())
        self.frozen = True

    def clear_faults(self) -> None:
        self._faults.clear()

    def pending_faults(self) -> int:
        return sum(f.left for f in self._faults)

    def _take(self, provider: str, kinds: tuple[str, ...], accept: Callable[[_Fault], bool] | None = None) -> _Fault | None:
        for f in self._faults:
            if f.left > 0 and f.kind in kinds and f.provider in (None, provider) and (accept is None or accept(f)):
                f.left -= 1
                if f.left == 0:
                    self._faults.remove(f)
                return f
        return None

    # -- projection: model -> provider state --------------------------------------------

    def _project(self, now_ms: int) -> None:
        self.ticks += 1
        self.projected_at_ms = now_ms
        by_event: dict[str, list[Any]] = {}
        for mb in self.model.books.values():
            md = mb.definition
            if md is None or md.get("eventTypeId") not in _PN_SPORTS:
                continue
            by_event.setdefault(md["eventId"], []).append(mb)
        for eid, books in by_event.items():
            self._project_pinnacle(eid, books, now_ms)
            self._project_toa(eid, books, now_ms)
            self._project_state(eid, books, now_ms)
        live_ids = {int(e) for e in by_event}
        for ev in self.pn_events.values():
            base = ev.parent or ev.id
            if not ev.removed and base not in live_ids:
                ev.removed = True
                self._pn_set_period(ev, 2, ev.period.ml, ev.period.totals, now_ms)
                self.pn_last += 1
                ev.fixture_version = self.pn_last
        current = {_toa_id(e) for e in by_event}
        for tid, tev in self.toa_events.items():
            if tid not in current and tev.started and not tev.completed:
                tev.completed = True  # the model dropped it: play is long over
                tev.score_ms = now_ms
            if tev.markets and tid not in current:
                if self._truth is not None:
                    for bk, k in tev.markets:
                        self._truth_toa(tev, bk, k, None, now_ms)
                tev.markets.clear()
        if self._truth is not None:
            self._truth.flush()

    @staticmethod
    def _names(books: list[Any]) -> tuple[Any, Any, str, str]:
        mo = next((b for b in books if b.definition["marketType"] == "MATCH_ODDS"), None)
        ou = next((b for b in books if b.definition["marketType"] == "OVER_UNDER_25"), None)
        ref = mo or books[0]
        runners = ref.definition["runners"]
        names = [r.get("name") or str(r["id"]) for r in runners]
        if ref.definition["eventTypeId"] == "7522":  # "Away @ Home": runners [away, home]
            home, away = names[1], names[0]
        else:
            home, away = names[0], names[1]
        return mo, ou, home, away

    @staticmethod
    def _best_backs(mb: Any) -> list[float] | None:
        """Best back price of each runner in definition order, or None if any is missing."""
        md = mb.definition
        if md is None or md.get("status") != "OPEN":
            return None
        out = []
        for r in md["runners"]:
            rb = mb.runners.get((r["id"], None))
            if rb is None or not rb.atb:
                return None
            out.append(float(max(rb.atb)))
        return out

    def _project_pinnacle(self, eid: str, books: list[Any], now_ms: int) -> None:
        mo, ou, home, away = self._names(books)
        md = books[0].definition
        home, away = provider_name(PINNACLE, md["eventTypeId"], home), provider_name(PINNACLE, md["eventTypeId"], away)
        sport = _PN_SPORTS[md["eventTypeId"]]
        if sport == 29:
            league = _PN_LEAGUES.get(md.get("countryCode", ""), (1977, "International - Friendlies"))
        elif sport == 33:
            league = (3000, "ATP")
        else:
            league = (487, "NBA")
        starts = iso_to_ms(md.get("marketTime")) or now_ms
        pid = int(eid)
        parent = self.pn_events.get(pid)
        if parent is None:
            self.pn_last += 1
            parent = self.pn_events[pid] = _PnEvent(
                id=pid, parent=None, sport=sport, league=league, home=home, away=away, starts_ms=starts,
                live_status=2 if md.get("turnInPlayEnabled", True) else 0, fixture_version=self.pn_last)
        in_play = any(b.definition.get("inPlay") for b in books)
        active = parent
        if in_play:
            cid = pid + LIVE_ID_OFFSET
            child = self.pn_events.get(cid)
            if child is None:
                self.pn_last += 1
                child = self.pn_events[cid] = _PnEvent(
                    id=cid, parent=pid, sport=sport, league=league, home=home, away=away, starts_ms=starts,
                    live_status=1, fixture_version=self.pn_last)
            active = child
            if parent.period.status != 2:
                self._pn_set_period(parent, 2, parent.period.ml, parent.period.totals, now_ms)
        ml = None
        if mo is not None:
            prices = self._best_backs(mo)
            if prices is not None:
                if sport == 29 and len(prices) == 3:
                    ml = {"home": prices[0], "away": prices[1], "draw": prices[2]}
                elif sport == 4 and len(prices) == 2:
                    ml = {"home": prices[1], "away": prices[0]}
                elif len(prices) == 2:
                    ml = {"home": prices[0], "away": prices[1]}
        totals: list[tuple[float, float, float]] = []
        if ou is not None:
            prices = self._best_backs(ou)
            if prices is not None and len(prices) == 2:  # runners: Under, Over
                totals = [(2.5, prices[1], prices[0])]
        status = 1 if any(b.definition.get("status") == "OPEN" for b in books) else 2
        if status == 2:  # offline: keep the last lines on show, as the provider does
            ml, totals = active.period.ml, active.period.totals
        self._pn_set_period(active, status, ml, totals, now_ms)

    def _pn_set_period(self, ev: _PnEvent, status: int, ml: dict[str, float] | None,
                       totals: list[tuple[float, float, float]], now_ms: int) -> None:
        p = ev.period
        status_changed = p.status != status
        ml_changed = p.ml != ml
        tot_changed = p.totals != totals
        if not (status_changed or ml_changed or tot_changed):
            return
        self.pn_last += 1
        p.version = self.pn_last
        p.line_id = 3_000_000_000 + self.pn_last
        p.status = status
        if ml_changed or status_changed:
            p.ml_ts = now_ms
        if tot_changed or status_changed:
            p.tot_ts = now_ms
        p.ml = dict(ml) if ml is not None else None
        p.totals = list(totals)
        base = ev.parent or ev.id
        if p.ml:
            p.offered.add(f"pn:{base}:0:moneyline")
        for pts, _, _ in p.totals:
            p.offered.add(f"pn:{base}:0:total:{pts:g}")
        if self._truth is not None:
            self._truth_pn_period(ev, now_ms)

    def _project_toa(self, eid: str, books: list[Any], now_ms: int) -> None:
        mo, ou, home, away = self._names(books)
        md = books[0].definition
        et = md["eventTypeId"]
        home, away = provider_name(TOA, et, home), provider_name(TOA, et, away)
        if et == "1":
            key, title = _TOA_SOCCER.get(md.get("countryCode", ""), ("soccer_epl", "EPL"))
        elif et == "2":
            key, title = "tennis_atp", "ATP"
        else:
            key, title = "basketball_nba", "NBA"
        tid = _toa_id(eid)
        ev = self.toa_events.get(tid)
        if ev is None:
            ev = self.toa_events[tid] = _ToaEvent(id=tid, sport_key=key, title=title, home=home, away=away,
                                                  commence_ms=iso_to_ms(md.get("marketTime")) or now_ms)
        wanted: dict[tuple[str, str], tuple[tuple[str, float, float | None], ...]] = {}
        for i, bk in enumerate(self.config.bookmakers):
            if mo is not None and (prices := self._best_backs(mo)) is not None:
                names = [provider_name(TOA, et, r.get("name") or str(r["id"])) for r in mo.definition["runners"]]
                outs: tuple[tuple[str, float, float | None], ...]
                if et == "1":
                    outs = ((home, prices[0], None), (away, prices[1], None), ("Draw", prices[2], None))
                elif et == "7522":
                    outs = ((names[1], prices[1], None), (names[0], prices[0], None))
                else:
                    outs = ((names[0], prices[0], None), (names[1], prices[1], None))
                wanted[(bk, "h2h")] = tuple((n, _shade(p, i), pt) for n, p, pt in outs)
            if ou is not None and (prices := self._best_backs(ou)) is not None:
                wanted[(bk, "totals")] = (("Over", _shade(prices[1], i), 2.5), ("Under", _shade(prices[0], i), 2.5))
        for k in list(ev.markets):
            if k not in wanted:
                if self._truth is not None and k[0] not in self.dropped_bookmakers:
                    self._truth_toa(ev, k[0], k[1], None, now_ms)
                del ev.markets[k]
        for k, outs in wanted.items():
            cur = ev.markets.get(k)
            if cur is None or cur.outcomes != outs:
                ev.markets[k] = _ToaMarket(outs, now_ms)
                if self._truth is not None and k[0] not in self.dropped_bookmakers:
                    self._truth_toa(ev, k[0], k[1], ev.markets[k], now_ms)

    def _project_state(self, eid: str, books: list[Any], now_ms: int) -> None:
        """Scores and settlement of one model event, in each provider's terms."""
        md = books[0].definition
        state = self.model.event_state(eid)
        pid = int(eid)
        # Pinnacle: live soccer scores on the live event
        live = self.pn_events.get(pid + LIVE_ID_OFFSET)
        if state is not None and live is not None and md["eventTypeId"] == "1" and state.phase == "live":
            red = state.red_cards or (0, 0)
            scores = (state.home, state.away, red[0], red[1])
            if live.scores != scores:
                live.scores = scores
                self.pn_last += 1
                live.score_version = self.pn_last
        # The Odds API: the score once started, completed when play is over
        tev = self.toa_events.get(_toa_id(eid))
        if tev is not None:
            started = any(b.definition.get("inPlay") for b in books) or (state is not None and state.phase != "pre")
            score = (state.home, state.away) if state is not None and state.phase != "pre" else None
            done = state is not None and state.phase in ("ended", "closed") or all(
                b.definition.get("status") == "CLOSED" for b in books)
            if started and (score != tev.score or done != tev.completed or not tev.started):
                tev.started, tev.score, tev.completed, tev.score_ms = True, score, done, now_ms
        # Pinnacle: settle the event once every market of it is settled
        if pid in self.pn_settled_bases or not all(b.definition.get("status") == "CLOSED" for b in books):
            return
        parent = self.pn_events.get(pid)
        if parent is None:
            return
        periods = self._settled_periods(md, books, state)
        if periods is None:
            return
        self.pn_settled_bases[pid] = parent.sport
        for ev in (parent, self.pn_events.get(pid + LIVE_ID_OFFSET)):
            if ev is None:
                continue
            self.pn_last += 1
            self._settlement_id += 1
            swap = ev.league[0] in _PN_TEAM2_HOME
            rows = [(n, a if swap else h, h if swap else a) for n, h, a in periods]
            self.pn_settled.setdefault(ev.sport, []).append(_PnSettled(
                version=self.pn_last, league=ev.league[0], event_id=ev.id, periods=rows,
                settlement_id=self._settlement_id, settled_ms=now_ms))

    @staticmethod
    def _settled_periods(md: dict[str, Any], books: list[Any], state: Any) -> list[tuple[int, int, int]] | None:
        """(period number, home, away) of a settled model event in Pinnacle's numbering; None: cannot say."""
        sport = md["eventTypeId"]
        if state is not None and sport == "1":
            first = next((p for p in state.periods if p[0] == "1h"), ("1h", 0, 0))
            return [(0, state.home, state.away), (1, first[1], first[2])]
        if state is not None and sport == "7522":
            q = {p[0]: (p[1], p[2]) for p in state.periods}
            quarters = [q.get(f"q{i}", (0, 0)) for i in range(1, 5)]
            out = [(0, state.home, state.away),
                   (1, quarters[0][0] + quarters[1][0], quarters[0][1] + quarters[1][1]),
                   (2, quarters[2][0] + quarters[3][0], quarters[2][1] + quarters[3][1])]
            return out + [(3 + i, h, a) for i, (h, a) in enumerate(quarters)]
        if sport == "2":  # tennis: sets to the winner, 2-0 or 2-1 (by the event id, reproducible)
            mo = next((b for b in books if b.definition["marketType"] == "MATCH_ODDS"), None)
            if mo is None:
                return None
            runners = mo.definition["runners"]
            won = [r.get("status") == "WINNER" for r in runners]
            if not any(won):
                return None
            lose = 1 if int(md["eventId"]) % 3 == 0 else 0
            return [(0, 2, lose) if won[0] else (0, lose, 2)]
        return None

    # -- truth log ---------------------------------------------------------------------------

    def _truth_pn_period(self, ev: _PnEvent, now_ms: int) -> None:
        """Log what the Pinnacle answer now says of ``ev``'s markets, when
        ``ev`` is the one that carries them (the live event once there is one)."""
        log = self._truth
        assert log is not None
        base = ev.parent or ev.id
        if ev.live_status != 1 and (base + LIVE_ID_OFFSET) in self.pn_events:
            return  # the pre-match event went offline behind its live one
        p = ev.period
        status = "OPEN" if p.status == 1 else "SUSPENDED"
        now: dict[str, dict[str, float]] = {}
        if p.ml:
            now[f"pn:{base}:0:moneyline"] = dict(p.ml)
        for pts, over, under in p.totals:
            now[f"pn:{base}:0:total:{pts:g}"] = {"over": over, "under": under}
        logged = self._truth_pn.setdefault(base, set())
        for mid in sorted(logged - now.keys()):  # offered before, gone now: the client suspends it
            log.record(now_ms, PINNACLE, mid, None, status="SUSPENDED")
        for mid, prices in now.items():
            for sid, price in prices.items():
                log.record(now_ms, PINNACLE, mid, sid, status=status, sel_status="ACTIVE", price=price)
        logged.update(now)

    def _truth_toa(self, ev: _ToaEvent, bk: str, key: str, m: _ToaMarket | None, now_ms: int) -> None:
        """Log one Odds API market: its outcomes, or (``m`` None) that it is no longer listed."""
        log = self._truth
        assert log is not None
        mid = f"toa:{ev.id}:{bk}:{key}" + (":2.5" if key == "totals" else "")
        if m is None:
            log.record(now_ms, TOA, mid, None, status="SUSPENDED")
            return
        for name, price, _ in m.outcomes:
            sid = "home" if name == ev.home else "away" if name == ev.away else name.lower()
            log.record(now_ms, TOA, mid, sid, status="OPEN", sel_status="ACTIVE", price=price)

    # -- rendering: provider state -> wire ------------------------------------------------

    def _pn_fixtures_body(self, sport: int, since: int | None) -> dict[str, Any]:
        leagues: dict[int, dict[str, Any]] = {}
        for ev in self.pn_events.values():
            if ev.sport != sport or ev.removed or (since is not None and ev.fixture_version <= since):
                continue
            lg = leagues.setdefault(ev.league[0], {"id": ev.league[0], "name": ev.league[1], "events": []})
            item: dict[str, Any] = {"id": ev.id}
            if ev.parent is not None:
                item["parentId"] = ev.parent
            item.update(starts=iso_ms(ev.starts_ms), home=ev.home, away=ev.away, rotNum=str(ev.id % 10000),
                        liveStatus=ev.live_status, status="O", parlayRestriction=2, altTeaser=False,
                        resultingUnit="Regular", version=ev.fixture_version)
            lg["events"].append(item)
        return {"sportId": sport, "last": self.pn_last, "league": list(leagues.values())}

    def _pn_odds_body(self, sport: int, since: int | None, american: bool) -> tuple[dict[str, Any], set[str]]:
        leagues: dict[int, dict[str, Any]] = {}
        served: set[str] = set()
        for ev in self.pn_events.values():
            p = ev.period
            if ev.sport != sport or not p.version:
                continue
            if since is None and ev.removed:
                continue
            if since is not None and p.version <= since and ev.score_version <= since:
                continue
            price = (lambda x: decimal_to_american(x)) if american else (lambda x: x)
            period: dict[str, Any] = {
                "lineId": p.line_id, "number": 0, "cutoff": iso_ms(ev.starts_ms + 6 * 3600_000 if ev.parent is None
                                                                   else ev.starts_ms + 12 * 3600_000),
                "status": p.status, "maxSpread": 1000, "maxMoneyline": 500, "maxTotal": 1000,
            }
            if p.ml_ts:
                period["moneylineUpdatedAt"] = iso_ms(p.ml_ts)
            if p.tot_ts:
                period["totalUpdatedAt"] = iso_ms(p.tot_ts)
            if p.ml is not None:
                period["moneyline"] = {k: price(v) for k, v in p.ml.items()}
            period["totals"] = [{"points": pts, "over": price(o), "under": price(u)} for pts, o, u in p.totals]
            lg = leagues.setdefault(ev.league[0], {"id": ev.league[0], "events": []})
            item: dict[str, Any] = {"id": ev.id, "periods": [period]}
            if ev.scores is not None and not ev.removed:
                item.update(homeScore=float(ev.scores[0]), awayScore=float(ev.scores[1]),
                            homeRedCards=ev.scores[2], awayRedCards=ev.scores[3])
            lg["events"].append(item)
            base = ev.parent or ev.id
            if p.ml is not None:
                served.add(f"pn:{base}:0:moneyline")
            for pts, _, _ in p.totals:
                served.add(f"pn:{base}:0:total:{pts:g}")
        return {"sportId": sport, "last": self.pn_last, "leagues": list(leagues.values())}, served

    def _pn_settled_body(self, sport: int, since: int | None) -> tuple[dict[str, Any], set[int]]:
        leagues: dict[int, dict[str, Any]] = {}
        bases: set[int] = set()
        for st in self.pn_settled.get(sport, ()):
            if since is not None and st.version <= since:
                continue
            periods = [{"number": n, "status": 1, "settlementId": st.settlement_id, "settledAt": iso_ms(st.settled_ms),
                        "team1Score": t1, "team2Score": t2} for n, t1, t2 in st.periods]
            leagues.setdefault(st.league, {"id": st.league, "events": []})["events"].append(
                {"id": st.event_id, "periods": periods})
            ev = self.pn_events.get(st.event_id)
            bases.add(ev.parent or ev.id if ev is not None else st.event_id)
        return {"sportId": sport, "last": self.pn_last, "leagues": list(leagues.values())}, bases

    def _toa_scores_body(self, sport: str) -> tuple[list[Any], dict[str, tuple[bool, int | None, int | None]]]:
        out: list[Any] = []
        seen: dict[str, tuple[bool, int | None, int | None]] = {}
        for ev in self.toa_events.values():
            if ev.sport_key != sport:
                continue
            item: dict[str, Any] = {"id": ev.id, "sport_key": ev.sport_key, "sport_title": ev.title,
                                    "commence_time": iso_ms(ev.commence_ms)[:19] + "Z", "completed": ev.completed,
                                    "home_team": ev.home, "away_team": ev.away, "scores": None, "last_update": None}
            if ev.started and ev.score is not None:
                item["scores"] = [{"name": ev.home, "score": str(ev.score[0])},
                                  {"name": ev.away, "score": str(ev.score[1])}]
                item["last_update"] = iso_ms(ev.score_ms)[:19] + "Z"
            if ev.started:
                seen[ev.id] = (ev.completed, *(ev.score if ev.score is not None else (None, None)))
            out.append(item)
        return out, seen

    def score_truth(self, provider: str) -> dict[str, dict[str, Any]]:
        """Event states a client that read every answer now holds, in canonical
        ids: Pinnacle ``pn:<base>`` → {"status": "CLOSED", "home", "away"} for
        every settled event served (home/away as the model scored them); The
        Odds API ``toa:<id>`` → {"status": "LIVE"|"ENDED", "home", "away"} for
        every started event whose scores were served."""
        out: dict[str, dict[str, Any]] = {}
        if provider == TOA:
            for tid, (done, h, a) in self.toa_scores_served.items():
                if h is not None:
                    out[f"toa:{tid}"] = {"status": "ENDED" if done else "LIVE", "home": h, "away": a}
            return out
        for sport, rows in self.pn_settled.items():
            for st in rows:
                ev = self.pn_events.get(st.event_id)
                if ev is None or ev.parent is not None:
                    continue
                base = ev.id
                if base not in self.pn_settled_served:
                    continue
                n0 = next(r for r in st.periods if r[0] == 0)
                swap = st.league in _PN_TEAM2_HOME
                h, a = (n0[2], n0[1]) if swap else (n0[1], n0[2])
                out[f"pn:{base}"] = {"status": "CLOSED", "home": h, "away": a}
        return out

    def _toa_body(self, sport: str, markets: set[str], american: bool, now_ms: int) -> tuple[list[Any], dict[str, Any], set[str]]:
        out = []
        rendered: dict[str, Any] = {}
        for ev in self.toa_events.values():
            if sport != "upcoming" and ev.sport_key != sport:
                continue
            bms: dict[str, list[dict[str, Any]]] = {}
            for (bk, key), m in ev.markets.items():
                if key not in markets or bk in self.dropped_bookmakers:
                    continue
                outs = []
                for name, p, pt in m.outcomes:
                    o: dict[str, Any] = {"name": name, "price": decimal_to_american(p) if american else p}
                    if pt is not None:
                        o["point"] = pt
                    outs.append(o)
                bms.setdefault(bk, []).append({"key": key, "last_update": iso_ms(m.last_update_ms), "outcomes": outs,
                                               "_ts": m.last_update_ms})
                mid = f"toa:{ev.id}:{bk}:{key}" + (":2.5" if key == "totals" else "")
                sels = {}
                for name, p, _ in m.outcomes:
                    sid = "home" if name == ev.home else "away" if name == ev.away else name.lower()
                    sels[sid] = p
                rendered[mid] = {"status": "OPEN", "in_play": ev.commence_ms <= now_ms, "prices": sels}
            if not bms:
                continue
            bookmakers = []
            for bk, ms in bms.items():
                last = max(m.pop("_ts") for m in ms)
                bookmakers.append({"key": bk, "title": bk.replace("_", " ").title(), "last_update": iso_ms(last),
                                   "markets": ms})
            out.append({"id": ev.id, "sport_key": ev.sport_key, "sport_title": ev.title,
                        "commence_time": iso_ms(ev.commence_ms)[:19] + "Z", "home_team": ev.home, "away_team": ev.away,
                        "bookmakers": bookmakers})
        scope = {ev.sport_key for ev in self.toa_events.values()} if sport == "upcoming" else {sport}
        return out, rendered, scope

    # -- truth ------------------------------------------------------------------------------

    def truth(self, provider: str) -> dict[str, dict[str, Any]]:
        """Every market the provider has served, in canonical terms:
        ``{market_id: {"status": "OPEN"|"SUSPENDED", "in_play": bool,
        "prices": {selection_id: decimal}}}`` — as a client that read every
        answer would now hold it (a line no longer offered is SUSPENDED)."""
        if provider == TOA:
            return {k: {**v, "prices": dict(v["prices"])} for k, v in self.toa_served.items()}
        out: dict[str, dict[str, Any]] = {}
        groups: dict[int, list[_PnEvent]] = {}
        for ev in self.pn_events.values():
            groups.setdefault(ev.parent or ev.id, []).append(ev)
        for base, evs in groups.items():
            live = [e for e in evs if e.live_status == 1]
            auth = live[0] if live else next(e for e in evs if e.id == base)
            p = auth.period
            now: dict[str, dict[str, Any]] = {}
            status = "OPEN" if p.status == 1 else "SUSPENDED"
            if p.ml is not None and p.version:
                now[f"pn:{base}:0:moneyline"] = {"status": status, "in_play": auth.live_status == 1,
                                                 "prices": dict(p.ml)}
            for pts, o, u in p.totals:
                now[f"pn:{base}:0:total:{pts:g}"] = {"status": status, "in_play": auth.live_status == 1,
                                                     "prices": {"over": o, "under": u}}
            offered = set().union(*(e.period.offered for e in evs))
            for mid in offered:
                if mid not in self.pn_served:
                    continue
                if base in self.pn_settled_served and mid.split(":")[2] == "0":
                    out[mid] = {"status": "SETTLED", "in_play": None, "prices": None}
                    continue
                out[mid] = now.get(mid) or {"status": "SUSPENDED", "in_play": None, "prices": None}
        return out

    def served_all(self, provider: str, sports: set[Any] | None = None) -> bool:
        """True when every change the provider holds (for ``sports``: Pinnacle
        sportIds or Odds API sport keys; None = all) has been served."""
        if provider == TOA:
            current = self._toa_body("upcoming", {"h2h", "totals", "spreads"}, False, _now_ms())[1]
            return all(k in self.toa_served and self.toa_served[k]["prices"] == v["prices"]
                       and self.toa_served[k]["status"] == "OPEN" for k, v in current.items()
                       if sports is None or _toa_scope(k, self.toa_events) in sports)
        return all(max(ev.period.version, ev.score_version) <= self._pn_served_last.get(ev.sport, 0)
                   for ev in self.pn_events.values() if (sports is None or ev.sport in sports) and ev.period.version) \
            and all(st.version <= self._pn_settled_served_last.get(sport, 0)
                    for sport, rows in self.pn_settled.items() if sports is None or sport in sports for st in rows)

    # -- HTTP -----------------------------------------------------------------------------------

    def _build_app(self) -> Starlette:
        routes = [
            Route("/v1/token", self._token, methods=["POST"]),
            Route("/v1/fixtures", self._pn_fixtures, methods=["GET"]),
            Route("/v2/odds", self._pn_odds, methods=["GET"]),
            Route("/v2/sports", self._pn_sports, methods=["GET"]),
            Route("/v2/leagues", self._pn_leagues, methods=["GET"]),
            Route("/v1/fixtures/settled", self._pn_settled_endpoint, methods=["GET"]),
            Route("/v4/sports/{sport}/scores", self._toa_scores, methods=["GET"]),
            Route("/v4/sports", self._toa_sports, methods=["GET"]),
            Route("/v4/sports/{sport}/odds", self._toa_odds, methods=["GET"]),
            Route("/health", lambda r: _json({"status": "ok"}), methods=["GET"]),
        ]
        return Starlette(routes=routes)

    def _error(self, provider: str, status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> Response:
        if provider == TOA:
            body = {"message": message, "error_code": code,
                    "details_url": f"https://the-odds-api.com/liveapi/guides/v4/api-error-codes.html#{code.lower()}"}
        else:
            body = {"code": code, "message": message}
        return _json(body, status, headers)

    async def _check(self, request: Request, provider: str) -> Response | None:
        """Log the request; signature, credentials, faults. A response to send
        instead of the data, or None."""
        cfg = self.config
        now = time.monotonic()
        rec = RequestRecord(now, provider, request.url.path, dict(request.query_params))
        self.requests.append(rec)
        request.state.rec = rec
        nb = self.not_before.get(provider, 0.0)
        if now < nb:
            self.early_requests.append(rec)
            logger.warning("sim %s: request %s arrived %.3fs before Retry-After expired", provider, rec.path, nb - now)
        if cfg.hmac_secret is not None:
            body = await request.body()
            target = request.scope.get("raw_path", request.url.path.encode())
            qs = request.scope.get("query_string", b"")
            if qs:
                target = target + b"?" + qs
            why = verify_signature({cfg.hmac_key_id: cfg.hmac_secret.encode()}, request.headers, request.method,
                                   target, body, now_ms=_now_ms(), nonces=self.nonces)
            if why is not None:
                rec.status = 401
                return self._error(provider, 401, "INVALID_SIGNATURE", f"request signature rejected: {why}")
        denied = self._authorise(request, provider)
        if denied is not None:
            rec.status = denied.status_code
            return denied
        fault = self._take(provider, ("429", "5xx", "code"))
        if fault is not None:
            if fault.kind == "429":
                ra = int(fault.arg)
                self.not_before[provider] = time.monotonic() + ra
                self.retry_afters.append((time.monotonic(), float(ra), provider))
                rec.status = 429
                code = "TOO_MANY_REQUESTS" if provider == PINNACLE else "EXCEEDED_FREQ_LIMIT"
                return self._error(provider, 429, code, "Too many requests, slow down", {"Retry-After": str(ra)})
            if fault.kind == "5xx":
                rec.status = int(fault.arg)
                return self._error(provider, int(fault.arg), "INTERNAL_ERROR", "upstream unavailable")
            code, status = fault.arg
            rec.status = status
            return self._error(provider, status, code, f"simulated {code}")
        return None

    def _authorise(self, request: Request, provider: str) -> Response | None:
        cfg = self.config
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            expiry = self.tokens.get(auth[7:].strip())
            if expiry is None or expiry < time.monotonic():
                return self._error(provider, 401, "INVALID_TOKEN", "access token is invalid or expired")
            return None
        if cfg.require_token:
            return self._error(provider, 401, "UNAUTHORIZED", "a Bearer token is required")
        key = request.headers.get("x-api-key")
        if provider == TOA:
            key = key or request.query_params.get("apiKey")
            if not key:
                return self._error(provider, 401, "MISSING_KEY", "API key is missing")
            if not hmac.compare_digest(key.encode(), cfg.api_key.encode()):
                return self._error(provider, 401, "INVALID_KEY", "API key is not valid")
            return None
        if key is not None:
            ok = hmac.compare_digest(key.encode(), cfg.api_key.encode())
        elif auth[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            ok = (hmac.compare_digest(user.encode(), cfg.user.encode())
                  and hmac.compare_digest(password.encode(), cfg.password.encode()))
        else:
            ok = False
        return None if ok else self._error(provider, 401, "INVALID_CREDENTIALS", "invalid credentials")

    async def _deliver(self, provider: str, request: Request, payload: bytes, status: int = 200,
                       headers: dict[str, str] | None = None, on_sent: Callable[[], None] | None = None) -> Response:
        """Send a data body, applying the stall / trickle / malformed faults.

        ``on_sent`` (what makes the answer count as served: the truth) runs on
        the event loop once the whole body went out to a client still
        connected — never for an answer the client gave up on (a stall or a
        trickle past its deadline): a client cannot hold what it never read."""
        rec: RequestRecord | None = getattr(request.state, "rec", None)
        path = request.url.path
        if status == 200 and not (path in ("/v1/fixtures/settled", "/v2/leagues") or path.endswith("/scores")):
            # (results and scores bodies are never made malformed: the fault is about the odds path)
            fixtures = path == "/v1/fixtures"  # no prices in fixtures: a bad price waits for odds
            delta = "since" in request.query_params
            bad = self._take(provider, ("malformed",),
                             lambda f: not (fixtures and f.arg[0] == "bad_price") and (f.arg[1] or delta))
            if bad is not None:
                payload = self._malformed_body(provider, payload, bad.arg[0], request)
                on_sent = None
        stall = self._take(provider, ("stall",))
        if stall is not None:
            await asyncio.sleep(float(stall.arg))
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.05):  # (not wait_for: on 3.11 it can drop a cancel — feed.aio)
                    gone = await request.is_disconnected()
                if gone:
                    on_sent = None  # the client gave up: this answer was never read
                    self.cut_answers[provider] += 1
        if rec is not None:
            rec.status = status
        self.status_counts[f"{provider}:{status}"] += 1
        trickle = (self._take(provider, ("trickle",), lambda f: f.arg[1] in (None, path)) if status == 200
                   else None)
        if trickle is not None:
            # not a BackgroundTask: Starlette runs a StreamingResponse's background even after the
            # client disconnected, which would count an answer cut at the client's deadline as served
            return StreamingResponse(self._trickled(provider, request, payload, float(trickle.arg[0]), on_sent),
                                     status_code=status, media_type="application/json", headers=headers)
        # an async callable: run on the loop, in send order (a sync one would go to a worker thread)
        task = BackgroundTask(_call, on_sent) if on_sent is not None else None
        return Response(payload, status_code=status, media_type="application/json", headers=headers, background=task)

    async def _trickled(self, provider: str, request: Request, payload: bytes, seconds: float,
                        on_sent: Callable[[], None] | None) -> AsyncIterator[bytes]:
        """``payload`` in small pieces spread over ``seconds``; ``on_sent`` only
        when the last piece went out and the client is still there (a client
        that cut the answer short closes the connection: the stream is then
        cancelled, or the check below sees it)."""
        pieces = 20
        step = max(1, len(payload) // pieces)
        chunks = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
        pause = seconds / len(chunks)
        whole = False
        try:
            for chunk in chunks:
                yield chunk
                await asyncio.sleep(pause)
            whole = not await request.is_disconnected()
        finally:
            if not whole:
                self.cut_answers[provider] += 1
        if whole and on_sent is not None:
            on_sent()

    def _malformed_body(self, provider: str, payload: bytes, kind: str, request: Request) -> bytes:
        if kind == "truncated":
            return payload[: max(1, len(payload) // 2)]
        if provider == PINNACLE:
            sport = int(request.query_params.get("sportId", "29"))
            self.pn_last += 1  # a "new" answer, so that a client would apply it
            if kind == "bad_price":
                return orjson.dumps({"sportId": sport, "last": self.pn_last, "leagues": [{"id": 1, "events": [
                    {"id": 1, "periods": [{"number": 0, "status": 1, "moneyline": {"home": 0.5, "away": 2.0}}]}]}]})
            return orjson.dumps({"sportId": "soccer", "last": self.pn_last, "leagues": []})
        if kind == "bad_price":
            return orjson.dumps([{"id": "deadbeef", "sport_key": "soccer_epl", "commence_time": "2030-01-01T00:00:00Z",
                                  "home_team": "A", "away_team": "B", "bookmakers": [{"key": "simbook_a", "markets": [
                                      {"key": "h2h", "outcomes": [{"name": "A", "price": 0.5},
                                                                  {"name": "B", "price": 2.0}]}]}]}])
        return orjson.dumps({"data": "not an array of events"})

    # -- endpoints ---------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        cfg = self.config
        self.token_requests += 1
        self.requests.append(RequestRecord(time.monotonic(), "token", request.url.path, {}))
        if cfg.hmac_secret is not None:
            body = await request.body()
            target = request.scope.get("raw_path", b"/v1/token")
            why = verify_signature({cfg.hmac_key_id: cfg.hmac_secret.encode()}, request.headers, "POST", target,
                                   body, now_ms=_now_ms(), nonces=self.nonces)
            if why is not None:
                return _json({"error": "invalid_request", "error_description": f"signature: {why}"}, 401)
        try:
            if request.headers.get("content-type", "").startswith("application/json"):
                data = msgspec.json.decode(await request.body(), type=dict[str, Any])
            else:
                data = dict(await request.form())
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            return _json({"error": "invalid_request"}, 400)
        cid, secret = str(data.get("client_id", "")), str(data.get("client_secret", ""))
        if not (hmac.compare_digest(cid.encode(), cfg.client_id.encode())
                and hmac.compare_digest(secret.encode(), cfg.client_secret.encode())):
            return _json({"error": "invalid_client"}, 401)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.monotonic() + cfg.token_ttl_s
        return _json({"access_token": token, "token_type": "Bearer", "expires_in": cfg.token_ttl_s})

    async def _pn_sports(self, request: Request) -> Response:
        denied = await self._check(request, PINNACLE)
        if denied is not None:
            return denied
        return _json({"sports": [{"id": i, "name": n, "hasOfferings": True} for i, n in _PN_SPORT_NAMES.items()]})

    async def _pn_leagues(self, request: Request) -> Response:
        denied = await self._check(request, PINNACLE)
        if denied is not None:
            return denied
        try:
            sport = int(request.query_params.get("sportId", ""))
        except ValueError:
            return self._error(PINNACLE, 400, "INVALID_REQUEST", "sportId must be an integer")
        if sport == 29:
            rows = [(lid, name) for lid, name in _PN_LEAGUES.values()] + [(1977, "International - Friendlies")]
        else:
            rows = [(3000, "ATP")] if sport == 33 else [(487, "NBA")] if sport == 4 else []
        return _json({"leagues": [{"id": lid, "name": name, "homeTeamType": "Team2" if lid in _PN_TEAM2_HOME else "Team1",
                                   "hasOfferings": True} for lid, name in rows]})

    async def _pn_settled_endpoint(self, request: Request) -> Response:
        denied = await self._check(request, PINNACLE)
        if denied is not None:
            return denied
        parsed = self._pn_params(request)
        if isinstance(parsed, Response):
            return parsed
        sport, since = parsed
        body, bases = self._pn_settled_body(sport, since)
        last = body["last"]

        def sent() -> None:
            self.pn_settled_served.update(bases)
            self._pn_settled_served_last[sport] = max(self._pn_settled_served_last.get(sport, 0), last)

        return await self._deliver(PINNACLE, request, orjson.dumps(body), on_sent=sent)

    async def _toa_scores(self, request: Request) -> Response:
        denied = await self._check(request, TOA)
        if denied is not None:
            return denied
        sport = request.path_params["sport"]
        if sport not in {k for k, _, _ in _TOA_SPORTS}:
            return self._error(TOA, 404, "UNKNOWN_SPORT", f"unknown sport {sport}")
        body, seen = self._toa_scores_body(sport)

        def sent() -> None:
            self.toa_scores_served.update(seen)

        return await self._toa_billed(request, orjson.dumps(body), 2 if request.query_params.get("daysFrom") else 1,
                                      sent)

    def _pn_params(self, request: Request) -> tuple[int, int | None] | Response:
        try:
            sport = int(request.query_params.get("sportId", ""))
            since_text = request.query_params.get("since")
            since = int(since_text) if since_text else None
        except ValueError:
            return self._error(PINNACLE, 400, "INVALID_REQUEST", "sportId and since must be integers")
        if since is not None and since <= 1:
            return self._error(PINNACLE, 400, "INVALID_REQUEST", "since must not be 0 or 1")
        return sport, since

    async def _pn_fixtures(self, request: Request) -> Response:
        denied = await self._check(request, PINNACLE)
        if denied is not None:
            return denied
        parsed = self._pn_params(request)
        if isinstance(parsed, Response):
            return parsed
        sport, since = parsed
        return await self._deliver(PINNACLE, request, orjson.dumps(self._pn_fixtures_body(sport, since)))

    async def _pn_odds(self, request: Request) -> Response:
        denied = await self._check(request, PINNACLE)
        if denied is not None:
            return denied
        parsed = self._pn_params(request)
        if isinstance(parsed, Response):
            return parsed
        sport, since = parsed
        american = request.query_params.get("oddsFormat", "Decimal").lower() == "american"
        history = self.pn_history.setdefault(sport, deque(maxlen=20))
        replay = self._take(PINNACLE, ("duplicate", "replay_old", "cached"))
        if replay is not None and history:
            _, old, made_ms = history[-1] if replay.kind != "replay_old" else history[0]
            if replay.kind == "cached":
                age_s = replay.arg if replay.arg is not None else max(0, _now_ms() - made_ms) // 1000
                return await self._deliver(PINNACLE, request, old, headers={"age": str(age_s)})
            return await self._deliver(PINNACLE, request, old)
        body, served = self._pn_odds_body(sport, since, american)
        payload = orjson.dumps(body)
        history.append((body["last"], payload, _now_ms()))
        last = body["last"]

        def sent() -> None:
            self.pn_served.update(served)
            self._pn_served_last[sport] = max(self._pn_served_last.get(sport, 0), last)

        return await self._deliver(PINNACLE, request, payload, on_sent=sent)

    def _quota_headers(self, cost: int) -> dict[str, str]:
        return {"x-requests-remaining": str(self.quota_remaining), "x-requests-used": str(self.quota_used),
                "x-requests-last": str(cost)}

    async def _toa_sports(self, request: Request) -> Response:
        denied = await self._check(request, TOA)
        if denied is not None:
            return denied
        body = [{"key": k, "group": g, "title": t, "description": t, "active": True, "has_outrights": False}
                for k, g, t in _TOA_SPORTS]
        return _json(body, headers=self._quota_headers(0))

    async def _toa_odds(self, request: Request) -> Response:
        denied = await self._check(request, TOA)
        if denied is not None:
            return denied
        sport = request.path_params["sport"]
        if sport != "upcoming" and sport not in {k for k, _, _ in _TOA_SPORTS}:
            return self._error(TOA, 404, "UNKNOWN_SPORT", f"unknown sport {sport}")
        q = request.query_params
        markets = {m for m in (q.get("markets") or "h2h").split(",") if m}
        bad = markets - {"h2h", "spreads", "totals"}
        if bad:
            return self._error(TOA, 422, "INVALID_MARKET", f"markets not supported: {','.join(sorted(bad))}")
        regions = [r for r in (q.get("regions") or "").split(",") if r]
        if not regions and not q.get("bookmakers"):
            return self._error(TOA, 422, "MISSING_REGION", "regions or bookmakers is required")
        american = (q.get("oddsFormat") or "decimal").lower() == "american"
        now_ms = _now_ms()
        events, rendered, scope = self._toa_body(sport, markets, american, now_ms)
        def sent() -> None:
            for mid, r in rendered.items():
                self.toa_served[mid] = r
            for mid, r in self.toa_served.items():
                if mid not in rendered and r["status"] == "OPEN" and _toa_scope(mid, self.toa_events) in scope:
                    r["status"] = "SUSPENDED"

        return await self._toa_billed(request, orjson.dumps(events), max(1, len(markets)) * max(1, len(regions)),
                                      sent)

    async def _toa_billed(self, request: Request, payload: bytes, cost: int, sent: Callable[[], None]) -> Response:
        """An Odds API answer as the real one bills it: ``304`` (free) when ``If-None-Match`` names
        the payload's ETag, ``401 OUT_OF_USAGE_CREDITS`` when ``cost`` exceeds the quota left, else
        the payload with the quota headers (and its ETag); ``sent`` runs once it was written."""
        etag = '"' + hashlib.sha1(payload).hexdigest() + '"'
        if self.config.etag and request.headers.get("if-none-match") == etag:
            return await self._deliver(TOA, request, b"", 304, {**self._quota_headers(0), "ETag": etag})
        if self.quota_remaining < cost:
            return self._error(TOA, 401, "OUT_OF_USAGE_CREDITS", "Usage quota has been reached",
                               self._quota_headers(0))
        self.quota_remaining -= cost
        self.quota_used += cost
        headers = self._quota_headers(cost)
        if self.config.etag:
            headers["ETag"] = etag
        return await self._deliver(TOA, request, payload, headers=headers, on_sent=sent)


def _toa_scope(market_id: str, events: dict[str, _ToaEvent]) -> str | None:
    ev = events.get(market_id.split(":")[1])
    return ev.sport_key if ev is not None else None


def _toa_id(eid: str) -> str:
    return hashlib.md5(f"oddsfeed-sim:{eid}".encode()).hexdigest()


def _shade(price: float, book: int) -> float:
    """Book 0 offers the model's price; each further book a little less value."""
    if book == 0:
        return price
    return max(1.01, round(1 + (price - 1) * (1 - 0.03 * book), 2))


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _call(fn: Callable[[], None]) -> None:
    fn()


async def run_http_providers(config: ProvidersConfig, *, model: MarketModel | None = None,
                             ready: Callable[[HttpProviders], None] | None = None) -> None:
    """Serve the HTTP providers until cancelled; ``ready(sim)`` once listening."""
    sim = HttpProviders(config, model=model)
    await sim.start()
    try:
        if ready is not None:
            ready(sim)
        await asyncio.Event().wait()
    finally:
        await sim.stop()

