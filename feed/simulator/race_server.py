"""A local Betfair sports-data stream serving horse-race progress, TPD (plain TCP, 127.0.0.1 by default).

Betfair's Total Performance Data — every runner of a race tracked by GPS —
comes from the sports-data endpoint (``sports-data-stream-api.betfair.com``)
that also serves cricket (:mod:`feed.simulator.cricket_server`), with the
Exchange Stream API's protocol (CRLF-terminated compact JSON). This server
speaks it for the race subscription (betfairlightweight ``RaceStream`` /
``RaceCache``, nautilus_trader ``adapters/betfair/parsing/rcm.py``), so
:mod:`feed.sources.betfair_race` can be exercised end to end over a real
socket:

- on accept ``{"op":"connection","connectionId":"sim-…"}``; ``authentication``
  with the configured app key and a live session (the configured
  ``session_token`` or one issued by the simulated SSO when ``sessions`` is
  shared with an :class:`~feed.simulator.esa_server.Simulator`) → ``status``
  SUCCESS (else FAILURE NO_APP_KEY / INVALID_APP_KEY / NO_SESSION /
  INVALID_SESSION_INFORMATION and a close); nothing within
  ``auth_timeout_s`` → FAILURE TIMEOUT; ``heartbeat`` → SUCCESS; any op
  before authentication → NOT_AUTHORIZED; an op other than
  ``raceSubscription`` → INVALID_REQUEST;
- ``raceSubscription`` (``op`` and ``id``, as betfairlightweight sends it;
  ``heartbeatMs`` clamped 500–30000, default 5000; no filter: every race)
  → ``status`` SUCCESS, then
  ``{"op":"rcm","id","initialClk","clk","heartbeatMs","pt","ct":"SUB_IMAGE"}``
  *without* ``rc`` (Betfair's first message after a subscribe carries no
  race changes), then one ``rcm`` per step of the races
  (``{"op":"rcm","id","clk","pt","rc":[…]}``, ``pt`` = the server's clock;
  races stepping together share one line, one ``rc`` entry each), and
  ``ct: HEARTBEAT`` (``clk``, ``pt``) after ``heartbeatMs`` without a message;
- an ``rc`` entry: ``id`` the race id ``<meeting eventId>.<HHMM of the
  race's scheduled start (marketTime), UTC>`` (``"28587288.1650"``), ``mid``
  its WIN market, and ``rpc`` and/or ``rrc``:

  - ``rpc`` (race progress, about once a second of race time):
    ``{"ft","g","st","rt","spd","prg","ord","J"}`` — ``ft`` feed time (ms,
    the sample's wall time), ``g`` the last gate the leader passed
    (``Start``, then the furlong gates counting down ``7f`` … ``1f``, then
    ``Finish``; a gate passed between two samples is skipped), ``st`` the
    leader's time over the last section between gates (s; 0 at ``Start``),
    ``rt`` running time since the off (s), ``spd`` leader speed (m/s),
    ``prg`` leader metres to the finish, ``ord`` selection ids in running
    order, leader first, ``J`` the jumps (``[{"J":1,"L":metres from the
    finish}, …]`` numbered from the start; ``[]`` on the flat);
  - ``rrc`` (runner readings, each runner about once a second of race time,
    a few runners per line): ``[{"ft","id","lat","long","spd","prg","sfq"}, …]``
    — selection id, GPS position, speed (m/s), metres to the finish,
    stride frequency (Hz);

- the end of a race: a runner's last ``rrc`` is its first at the line
  (``prg: 0``); after the leader has crossed, ``rrc`` go on (no ``rpc``)
  until the whole field has, then one final
  ``{"rpc":{"ft","g":"Finish","st","rt","spd","prg":0,"ord":[finishing
  order],"J"}}`` (``rt``/``spd``/``st``: the winner's time, speed at the
  line and last section) and nothing more for that race;
- resume: Betfair documents none for this stream (betfairlightweight sends
  ``op`` and ``id`` only). A subscription with ``initialClk`` + ``clk``
  this server issued is answered ``ct: RESUB_DELTA`` with the current state
  instead of the SUB_IMAGE: one ``rc`` entry per race still running with
  its latest ``rpc`` and the latest ``rrc`` of every runner read so far
  (no ``rc`` when no race runs), so a client that reconnects has the
  progress at once; tokens this server did not issue, or ahead of it →
  FAILURE INVALID_CLOCK and a close.

Upstream, either

- a :class:`~feed.simulator.market_model.MarketModel` (``model=``, the ESA
  simulator's: ``oddsfeed simulate --providers``): every Horse Racing
  (``"7"``) WIN market seen in play (``inPlay`` and OPEN: the model turns
  a race in play at the off) gets a race from that moment: race id from its
  definition's ``eventId`` and ``marketTime``, ``mid`` its id, runners its
  ACTIVE runners, the distance the market name states (``1m2f`` …, else
  drawn from ``distance_m``), jumps for its ``raceType`` Hurdle / Chase.
  Time runs at the model's ``time_scale``. The finishing order is drawn
  (Plackett–Luce) from the runners' ``adjustmentFactor`` — the model's win
  probabilities, fixed when the market was made — so the favourite wins as
  often as the market says. The model settles the race's market with the
  race's winner (``MarketModel.race_winner``), and a race is no longer than
  its winner can run before the model ends play
  (``MarketModel.play_end_ms``; the distance is cut to fit, 400 m at least),
  so the board's finishing order and the settlement agree.
- or, without a model, ``races`` synthetic races at meetings of their own
  (event ids ``28…``, a meeting's races scheduled 35 minutes apart), one
  after another: the first off at the first subscription
  (``start_on_subscribe``), each next ``race_gap_ms`` after the previous
  finished, at ``time_scale``.

Each race is planned whole at the off from a generator seeded with
``seed`` and its market id (the same seed: the same races, readings and
order): finishing times from the winner's average speed (15.6–17.4 m/s on
the flat, ~1 m/s less over jumps) plus gaps of a few tenths of a second,
a standing start (speed rising with a 1.2 s time constant) and a running
style per runner (front-runner or closer, ±1.2 % of the distance
mid-race), so the running order changes but ends in the drawn order;
positions on an oval track around the venue, in the runner's own lane.
Readings are sampled every ``update_ms`` of race time (at least
``min_update_ms`` of real time apart, so a large ``time_scale`` thins
them rather than floods).

Fault switches: :meth:`RaceSimulator.drop_connections`,
:meth:`~RaceSimulator.freeze`, :meth:`~RaceSimulator.set_degraded`,
:meth:`~RaceSimulator.inject_malformed`.

Run alone: ``python -m feed.simulator.race_server [--port 9447] [--races N] [--time-scale X] [--seed N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import re
from collections import OrderedDict, deque
from datetime import UTC, datetime
from typing import Any

import msgspec

from feed.simulator.betfair_api import Sessions
from feed.normalise.base import iso_to_ms
from feed.simulator.esa_line import SportsConn, SportsDataServer, serve_until_interrupted
from feed.simulator.esa_line import now_ms as _now_ms
from feed.simulator.market_model import MarketModel
from feed.simulator.wire import MarketBook

__all__ = ["FURLONG_M", "Race", "RaceCard", "RaceSimConfig", "RaceSimulator", "race_card", "race_id_of",
           "synthetic_races"]

logger = logging.getLogger(__name__)

_MALFORMED = (b'{"op":"rcm","id":1,"clk":"AAAA","pt":16576', b"this is not json")

#: one furlong in metres (the timing gates are a furlong apart)
FURLONG_M = 201.168
_ACCEL_S = 1.2  # time constant of a standing start, s
_STYLE = 0.012  # running style: at most this share of the distance ahead / behind mid-race
_RRC_PER_LINE = 4  # runner readings per line (a race's field is read in groups of this many)
_RACES_PER_MEETING = 6
_RESULTS_KEPT = 1000
#: an oval track: two straights and two bends, the finish at the end of the home straight (m)
_STRAIGHT_M, _TRACK_M = 550.0, 2200.0
_BEND_R = (_TRACK_M - 2 * _STRAIGHT_M) / (2 * math.pi)
_M_PER_DEG_LAT = 111_320.0
#: venue -> (lat, long) of the track's middle
_VENUES: dict[str, tuple[float, float]] = {
    "Kempton": (51.4189543, -0.4058491), "Ascot": (51.4137, -0.6766), "Newmarket": (52.2358, 0.3717),
    "Doncaster": (53.5166, -1.1098), "Leopardstown": (53.2644, -6.1914), "Curragh": (53.1617, -6.8197),
    "Flemington": (-37.7903, 144.9119), "Randwick": (-33.9094, 151.2300), "Longchamp": (48.8578, 2.2335),
}
_DEFAULT_VENUE = "Kempton"
#: a distance in a Betfair race name: "1m2f", "2m", "5f"
_NAMED_DISTANCE = re.compile(r"\b(?:([1-4])m(?:([1-7])f)?|([4-9])f)\b")


class RaceSimConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Settings.

    host, port: where to listen (0 = ephemeral; read ``RaceSimulator.port``).
    app_key, session_token: the credentials accepted. seed: the races' seed
    (``None`` = random). races: synthetic races (without a model).
    race_gap_ms: real ms from one synthetic race's finish to the next off.
    time_scale: synthetic races' speed-up over real time (a followed
    model's own ``time_scale`` replaces it). distance_m: ``(min, max)``
    metres a race's distance is drawn from (when the market name states
    none). update_ms: race-time ms between two readings of a runner (and
    two ``rpc`` of a race). min_update_ms: real ms at least between them.
    start_on_subscribe: the synthetic races start with the first
    subscription (else at ``start()``; a model is followed from ``start()``).
    auth_timeout_s: close a connection not authenticated by then (ESA: 15).
    tick_ms: pump interval (race steps, model scan, heartbeat checks).
    """

    host: str = "127.0.0.1"
    port: int = 0
    app_key: str = "sim-app-key"
    session_token: str = "sim-session"
    seed: int | None = None
    races: int = 3
    race_gap_ms: int = 5000
    time_scale: float = 1.0
    distance_m: tuple[float, float] = (1000.0, 3200.0)
    update_ms: int = 1000
    min_update_ms: int = 100
    start_on_subscribe: bool = True
    auth_timeout_s: float = 15.0
    tick_ms: int = 20


# -- races ------------------------------------------------------------------------------------------


def race_id_of(event_id: str, market_time: int | str) -> str:
    """Betfair's race id: ``<event id>.<HHMM>`` of the scheduled start
    ``market_time`` (ms since the epoch, or ISO-8601 as in a market
    definition: ``2021-07-30T16:50:00.000Z``; naive = UTC), in UTC."""
    ms = _ms_of(market_time) if isinstance(market_time, str) else market_time
    return f"{event_id}.{datetime.fromtimestamp(ms / 1000, UTC):%H%M}"


def _ms_of(iso: str) -> int:
    """An ISO-8601 market time as ms since the epoch; raises ValueError when it is not one."""
    ms = iso_to_ms(iso)
    if ms is None:
        raise ValueError(f"not an ISO-8601 time: {iso!r:.40}")
    return ms


class RaceCard(msgspec.Struct, kw_only=True, frozen=True):
    """A race before it runs: its meeting's ``event_id``, WIN ``market_id``
    and scheduled start ``market_time_ms`` (ms since the epoch), ``runners``
    (selection ids, in card order) with their win ``weights`` (any positive
    scale), ``distance_m``, ``race_type`` (``Flat`` / ``Hurdle`` /
    ``Chase``) and ``venue`` (sets the GPS positions; None: Kempton)."""

    event_id: str
    market_id: str
    market_time_ms: int
    runners: tuple[int, ...]
    weights: tuple[float, ...]
    distance_m: float
    race_type: str = "Flat"
    venue: str | None = None

    @property
    def race_id(self) -> str:
        return race_id_of(self.event_id, self.market_time_ms)


def _draw_distance(rng: random.Random, bounds: tuple[float, float]) -> float:
    """A distance in ``bounds``, to the half furlong (as races are run)."""
    half = FURLONG_M / 2
    lo, hi = sorted(bounds)
    first = max(math.ceil(lo / half), 1)
    return round(rng.randint(first, max(math.floor(hi / half), first)) * half, 1)


def _named_distance(name: Any) -> float | None:
    """The distance a race name states (``"R3 1m2f Hcap"`` → 2414.0 m), None without one."""
    if not isinstance(name, str) or (m := _NAMED_DISTANCE.search(name)) is None:
        return None
    furlongs = int(m[1]) * 8 + int(m[2] or 0) if m[1] else int(m[3])
    return round(furlongs * FURLONG_M, 1)


def race_card(book: MarketBook, *, seed: int | None = None,
              distance_m: tuple[float, float] = (1000.0, 3200.0)) -> RaceCard | None:
    """The race of a Horse Racing WIN market (None: another market, or no
    ACTIVE runner): event id and marketTime from its definition, its ACTIVE
    runners (by ``sortPriority``) weighted by ``adjustmentFactor`` (the
    win probability in %; else by the best back price's, else equally), the
    distance its name states (else drawn from ``distance_m``, seeded with
    ``seed`` and the market id), ``raceType`` and ``venue``."""
    md = book.definition
    if not md or md.get("eventTypeId") != "7" or md.get("marketType") != "WIN":
        return None
    event_id, market_time = md.get("eventId"), md.get("marketTime")
    if not event_id or not isinstance(market_time, str):
        return None
    active = sorted((r for r in md.get("runners") or ()
                     if isinstance(r, dict) and r.get("status") == "ACTIVE" and isinstance(r.get("id"), int)),
                    key=lambda r: r.get("sortPriority", 0))
    if not active:
        return None
    weights = []
    for r in active:
        w = r.get("adjustmentFactor")
        if not isinstance(w, int | float) or w <= 0:
            rb = book.runners.get((r["id"], None))
            back = rb.back() if rb is not None else []
            w = 100 / back[0][0] if back and back[0][0] > 1 else 1.0
        weights.append(max(float(w), 0.01))
    distance = _named_distance(md.get("name"))
    if distance is None:
        distance = _draw_distance(random.Random(None if seed is None else f"oddsfeed-race-card:{seed}:{book.market_id}"),
                                  distance_m)
    ms = _ms_of(market_time)
    return RaceCard(event_id=str(event_id), market_id=book.market_id, market_time_ms=ms,
                    runners=tuple(int(r["id"]) for r in active), weights=tuple(weights), distance_m=distance,
                    race_type=str(md.get("raceType") or "Flat"), venue=md.get("venue"))


def synthetic_races(seed: int | None, races: int, now_ms: int,
                    distance_m: tuple[float, float] = (1000.0, 3200.0)) -> list[RaceCard]:
    """``races`` race cards at meetings of their own (six races a meeting,
    35 minutes apart, the first at the next whole five minutes after
    ``now_ms``): 6–14 runners with lognormal weights, distances drawn from
    ``distance_m`` (a race of 3000 m or more is a hurdle half the time).
    Deterministic for a ``seed``."""
    rng = random.Random(seed)
    cards: list[RaceCard] = []
    used: set[str] = set()
    event_id, venue, first_ms = "", _DEFAULT_VENUE, 0
    for i in range(max(races, 0)):
        if i % _RACES_PER_MEETING == 0:
            while (event_id := str(28_000_000 + rng.randrange(1_000_000))) in used:
                pass
            used.add(event_id)
            venue = rng.choice(sorted(_VENUES))
            first_ms = now_ms - now_ms % 300_000 + 300_000
        while (market_id := f"1.1{rng.randrange(10**8):08d}") in used:
            pass
        used.add(market_id)
        n = rng.randint(6, 14)
        distance = _draw_distance(rng, distance_m)
        cards.append(RaceCard(
            event_id=event_id, market_id=market_id,
            market_time_ms=first_ms + (i % _RACES_PER_MEETING) * 35 * 60_000,
            runners=tuple(rng.sample(range(100_000, 60_000_000), n)),
            weights=tuple(round(rng.lognormvariate(0, 0.9), 4) for _ in range(n)),
            distance_m=distance, race_type="Hurdle" if distance >= 3000 and rng.random() < 0.5 else "Flat",
            venue=venue))
    return cards


class _Runner:
    """One runner's plan: finishing time ``finish_s``, standing-start shape
    ``k`` / ``norm``, running ``style`` (-1 closer … 1 front-runner), lane
    (m out from the rail) and stride length (m)."""

    __slots__ = ("finish_s", "index", "k", "lane_m", "norm", "sid", "stride_m", "style")

    def __init__(self, sid: int, index: int, finish_s: float, style: float, lane_m: float, stride_m: float) -> None:
        self.sid, self.index, self.finish_s = sid, index, finish_s
        self.style, self.lane_m, self.stride_m = style, lane_m, stride_m
        self.k = _ACCEL_S / finish_s
        self.norm = 1 - self.k * (1 - math.exp(-1 / self.k))


class Race:
    """One race, planned whole at the off (see the module docstring).

    card: what is run. seed: with the market id, seeds everything random
    (``None``: random). off_ms: wall clock of the off (ms since the epoch).
    time_scale: race seconds per real second. update_s: race seconds between
    two readings of a runner (and two ``rpc``).

    :meth:`step` gives the next ``rc`` entry, due at :attr:`next_ms`;
    :attr:`done` after the final one. :attr:`result`: the finishing order
    (decided at the off); :meth:`state`: the latest ``rpc`` and ``rrc``
    of every runner (what a RESUB_DELTA carries).
    """

    def __init__(self, card: RaceCard, *, seed: int | None, off_ms: int, time_scale: float = 1.0,
                 update_s: float = 1.0) -> None:
        if not card.runners or len(card.weights) != len(card.runners):
            raise ValueError(f"race {card.race_id}: runners and weights must be non-empty and aligned")
        rng = self._rng = random.Random(None if seed is None else f"oddsfeed-race:{seed}:{card.market_id}")
        self.card = card
        self.race_id = card.race_id
        self.off_ms = off_ms
        self.time_scale = time_scale
        self.distance_m = d = card.distance_m
        n = len(card.runners)
        self.groups = math.ceil(n / _RRC_PER_LINE)
        self.step_s = update_s / self.groups
        self.k = 0
        self.done = False
        jumps = card.race_type in ("Hurdle", "Chase")
        # the result: Plackett-Luce on the weights, then finishing times a few tenths of a second apart
        pool = list(zip(card.runners, card.weights, strict=True))
        self.result: list[int] = []
        while pool:
            pick = rng.choices(range(len(pool)), [w for _, w in pool])[0]
            self.result.append(pool.pop(pick)[0])
        t = d / (rng.uniform(15.6, 17.4) - (0.9 if jumps else 0.0)) + _ACCEL_S
        finish: dict[int, float] = {}
        for sid in self.result:
            finish[sid] = t
            t += 0.02 + min(rng.expovariate(1 / 0.3), 2.5)
        self.runners = [_Runner(sid, i, finish[sid], rng.uniform(-1, 1), rng.uniform(1.0, 12.0),
                                rng.uniform(6.9, 7.6)) for i, sid in enumerate(card.runners)]
        self.winner_s = finish[self.result[0]]
        # the gates: Start, the furlong poles, Finish; when the leader passed each
        poles = [(f"{f}f", f * FURLONG_M) for f in range(int(d // FURLONG_M), 0, -1) if f * FURLONG_M < d - 1]
        self.gates: list[tuple[str, float]] = [("Start", 0.0)]
        self.gates += [(name, self._leader_time(d - to_go)) for name, to_go in poles]
        self.gates.append(("Finish", self.winner_s))
        self.jumps: list[dict[str, Any]] = []
        if jumps:
            spacing = 400.0 if card.race_type == "Hurdle" else 270.0
            marks = []
            to_go = 190.0
            while to_go < d - 250:
                marks.append(to_go)
                to_go += spacing
            if not marks:  # a jumps race cut short (to end before the model ends play) still has a jump
                marks.append(round(d / 2, 1))
            self.jumps = [{"J": j, "L": round(x, 1)} for j, x in enumerate(reversed(marks), start=1)]
        lat, lon = _VENUES.get(card.venue or "", _VENUES[_DEFAULT_VENUE])
        self._origin = (lat, lon, math.cos(math.radians(lat)))
        self._heading = rng.uniform(0, 2 * math.pi)
        self._crossed: set[int] = set()
        self.latest_rpc: dict[str, Any] | None = None
        self.latest_rrc: dict[int, dict[str, Any]] = {}

    # -- the plan ---------------------------------------------------------------------

    def _covered(self, r: _Runner, t: float) -> float:
        """Metres ``r`` has run at race time ``t`` (past the line after its finish)."""
        if t <= 0:
            return 0.0
        if t >= r.finish_s:
            return self.distance_m + self._speed(r, r.finish_s) * (t - r.finish_s)
        x = t / r.finish_s
        g = (x - r.k * (1 - math.exp(-x / r.k))) / r.norm
        return self.distance_m * (g + _STYLE * r.style * (1 - math.cos(2 * math.pi * x)) / 2)

    def _speed(self, r: _Runner, t: float) -> float:
        """``r``'s speed at race time ``t``, m/s (its speed at the line after it)."""
        if t <= 0:
            return 0.0
        x = min(t / r.finish_s, 1.0)
        dg = (1 - math.exp(-x / r.k)) / r.norm
        return self.distance_m * (dg + _STYLE * r.style * math.pi * math.sin(2 * math.pi * x)) / r.finish_s

    def _leader_time(self, covered: float) -> float:
        """When the first runner has run ``covered`` metres (bisection; each runner's run is monotonic)."""
        best = math.inf
        for r in self.runners:
            lo, hi = 0.0, r.finish_s
            if hi >= best:
                if self._covered(r, best) < covered:
                    continue
                hi = best
            for _ in range(32):
                mid = (lo + hi) / 2
                if self._covered(r, mid) < covered:
                    lo = mid
                else:
                    hi = mid
            best = min(best, hi)
        return best

    def _position(self, covered: float, lane_m: float) -> tuple[float, float]:
        """(lat, long) ``covered`` metres into the race, ``lane_m`` out from the rail."""
        q = (_STRAIGHT_M - (self.distance_m - covered)) % _TRACK_M  # from the start of the home straight
        s, r_bend, r = _STRAIGHT_M, _BEND_R, _BEND_R + lane_m
        if q < s:
            x, y = q - s, -lane_m
        elif q < s + math.pi * r_bend:
            a = (q - s) / r_bend
            x, y = r * math.sin(a), r_bend - r * math.cos(a)
        elif q < 2 * s + math.pi * r_bend:
            x, y = -(q - s - math.pi * r_bend), 2 * r_bend + lane_m
        else:
            a = (q - 2 * s - math.pi * r_bend) / r_bend
            x, y = -s - r * math.sin(a), r_bend + r * math.cos(a)
        h = self._heading
        east, north = x * math.cos(h) - y * math.sin(h), x * math.sin(h) + y * math.cos(h)
        lat, lon, cos_lat = self._origin
        return round(lat + north / _M_PER_DEG_LAT, 7), round(lon + east / (_M_PER_DEG_LAT * cos_lat), 7)

    # -- the stream ----------------------------------------------------------------------

    @property
    def next_ms(self) -> float:
        """Wall clock (ms) the next :meth:`step` is due."""
        return self.off_ms + self.k * self.step_s * 1000 / self.time_scale

    def shift(self, ms: int) -> None:
        """Move the race ``ms`` later (the time it was held)."""
        self.off_ms += ms

    def step(self) -> dict[str, Any] | None:
        """The next ``rc`` entry (None when this step has nothing to say):
        the ``rpc`` every ``groups`` steps until the leader finished, one
        group's ``rrc`` at each step, the final ``rpc`` when the last
        runner has crossed the line (then :attr:`done`)."""
        if self.done:
            return None
        rng = self._rng
        t = self.k * self.step_s
        group = self.k % self.groups
        self.k += 1
        ft = self.off_ms + round(t * 1000 / self.time_scale)
        rrc = []
        for r in self.runners:
            if r.index % self.groups != group or r.sid in self._crossed:
                continue
            covered = self._covered(r, t)
            to_go = self.distance_m - covered
            if to_go <= 0:
                self._crossed.add(r.sid)
            spd = self._speed(r, t)
            lat, lon = self._position(covered, r.lane_m)
            reading = {"ft": ft, "id": r.sid, "lat": lat, "long": lon,
                       "spd": round(max(spd + rng.gauss(0, 0.12), 0.0), 2) if spd > 0 else 0.0,
                       "prg": max(round(to_go, 1), 0.1) if to_go > 0 else 0,
                       "sfq": round(spd / r.stride_m, 2)}
            self.latest_rrc[r.sid] = reading
            rrc.append(reading)
        rpc: dict[str, Any] | None = None
        if len(self._crossed) == len(self.runners):
            rpc = self._final(ft)
            self.done = True
        elif group == 0 and t < self.winner_s:
            rpc = self._progress(t, ft)
        if rpc is None and not rrc:
            return None
        entry: dict[str, Any] = {"id": self.race_id, "mid": self.card.market_id}
        if rpc is not None:
            self.latest_rpc = entry["rpc"] = rpc
        if rrc:
            entry["rrc"] = rrc
        return entry

    def _progress(self, t: float, ft: int) -> dict[str, Any]:
        covered = {r.sid: self._covered(r, t) for r in self.runners}
        ranked = sorted(self.runners, key=lambda r: (-covered[r.sid], r.index))
        leader = ranked[0]
        passed = max(i for i, (_, at) in enumerate(self.gates[:-1]) if at <= t)
        to_go = self.distance_m - covered[leader.sid]
        spd = self._speed(leader, t)
        return {"ft": ft, "g": self.gates[passed][0], "st": self._sectional(passed), "rt": round(t, 2),
                "spd": round(max(spd + self._rng.gauss(0, 0.12), 0.0), 2) if spd > 0 else 0.0,
                "prg": max(round(to_go, 1), 0.1), "ord": [r.sid for r in ranked], "J": self.jumps}

    def _final(self, ft: int) -> dict[str, Any]:
        winner = next(r for r in self.runners if r.sid == self.result[0])
        return {"ft": ft, "g": "Finish", "st": self._sectional(len(self.gates) - 1), "rt": round(self.winner_s, 2),
                "spd": round(self._speed(winner, winner.finish_s), 2), "prg": 0, "ord": list(self.result),
                "J": self.jumps}

    def _sectional(self, gate: int) -> float:
        return round(self.gates[gate][1] - self.gates[gate - 1][1], 2) if gate > 0 else 0.0

    def state(self) -> dict[str, Any]:
        """``rc`` entry of the race's current state: its latest ``rpc`` and
        every runner's latest ``rrc`` (card order)."""
        entry: dict[str, Any] = {"id": self.race_id, "mid": self.card.market_id}
        if self.latest_rpc is not None:
            entry["rpc"] = self.latest_rpc
        rrc = [self.latest_rrc[sid] for sid in self.card.runners if sid in self.latest_rrc]
        if rrc:
            entry["rrc"] = rrc
        return entry


# -- the server --------------------------------------------------------------------------------------


class _Conn(SportsConn):
    MALFORMED = _MALFORMED
    __slots__ = ()


class RaceSimulator(SportsDataServer[_Conn]):
    """The local sports-data (race progress) stream. ``await start()``, use ``port``, ``await stop()``.

    sessions: the session registry to accept (share an ESA simulator's, whose
    SSO issues them); default: the configured ``session_token`` only.
    model: follow this :class:`~feed.simulator.market_model.MarketModel`'s
    in-play horse races (the ESA simulator's ``model``; it is stepped by its
    owner, only read here); None: ``config.races`` synthetic races.

    For tests: ``subscriptions`` (the last 1000 ``raceSubscription``
    requests received, decoded), ``connections_accepted``, ``cards`` (the
    synthetic races, in running order; empty with a model), ``running``
    (race id → :class:`Race`, what a RESUB_DELTA carries), ``results``
    (race id → finishing order, the last 1000 races), ``messages_sent``
    (race lines published), ``done`` (set when the synthetic races are
    over; never with a model).
    """

    subscription_op = "raceSubscription"
    change_op, change_key = "rcm", "rc"
    label = "race simulator"
    conn_class = _Conn

    def __init__(self, config: RaceSimConfig | None = None, *, sessions: Sessions | None = None,
                 model: MarketModel | None = None) -> None:
        self.config = cfg = config or RaceSimConfig()
        if cfg.time_scale <= 0 or cfg.update_ms <= 0 or cfg.min_update_ms <= 0:
            raise ValueError("time_scale, update_ms and min_update_ms must be > 0")
        self._init_lines()
        self._init_sports()
        self.sessions = sessions or Sessions(None, fixed=(cfg.session_token,))
        self.model = model
        if model is not None:  # the model settles a race's market with the winner the race was run with
            model.race_winner = self._winner_of
        self.time_scale = model.time_scale if model is not None else cfg.time_scale
        #: race seconds between two readings of a runner
        self.update_s = max(cfg.update_ms, cfg.min_update_ms * self.time_scale) / 1000
        self.port = 0
        self.subscriptions: deque[dict[str, Any]] = deque(maxlen=1000)
        self.cards = [] if model is not None else synthetic_races(cfg.seed, cfg.races, _now_ms(), cfg.distance_m)
        self.running: dict[str, Race] = {}
        self.results: OrderedDict[str, list[int]] = OrderedDict()
        self.done = asyncio.Event()
        self._seen: set[str] = set()  # market ids whose race went off
        self._by_market: OrderedDict[str, Race] = OrderedDict()  # market id -> its race (the latest kept)
        self._next_off_ms = 0
        self._frozen_at: int | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._server = await asyncio.start_server(self._handle, cfg.host, cfg.port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._heartbeats(), name="race-sim-heartbeats"))
        self._tasks.append(asyncio.create_task(self._upstream(), name="race-sim-upstream"))
        if not cfg.start_on_subscribe or self.model is not None:
            self._started.set()
        mode = (f"following the model's horse races, time x{self.time_scale:g}" if self.model is not None
                else f"{len(self.cards)} synthetic race(s), time x{self.time_scale:g}")
        logger.info("race simulator (sports-data stream) listening on %s:%d (%s)", cfg.host, self.port, mode)

    # -- fault switches ---------------------------------------------------------------

    def freeze(self, on: bool = True) -> None:
        """Hold the races (no messages, race time stands still; heartbeats go
        on) or let them go on from where they stood. A followed model is not
        held: a race going in play meanwhile starts when thawed if its
        market is still open."""
        if on and self._frozen_at is None:
            self._frozen_at = _now_ms()
            self._thawed.clear()
        elif not on and self._frozen_at is not None:
            held = _now_ms() - self._frozen_at
            self._frozen_at = None
            for race in self.running.values():
                race.shift(held)
            self._next_off_ms += held
            self._thawed.set()

    # -- connections -----------------------------------------------------------------------

    def _subscribe(self, conn: _Conn, req: dict[str, Any]) -> None:
        ok, since = self._accept(conn, req)
        if not ok:
            return
        resume = since is not None
        states = [race.state() for race in self.running.values()] if resume else []
        self._reply(conn, resume, states)
        logger.info("race simulator: %s subscribed (%s, %d race(s) sent)", conn.connection_id,
                    "resumed" if resume else "new", len(states))

    # -- messages ------------------------------------------------------------------------------

    def _publish(self, rc: list[dict[str, Any]]) -> None:
        """One rcm with ``rc`` to every subscriber."""
        if rc:
            self._broadcast(rc)

    # -- upstreams -------------------------------------------------------------------------------

    async def _upstream(self) -> None:
        await self._started.wait()
        tick_s = max(self.config.tick_ms, 1) / 1000
        pending = deque(self.cards)
        try:
            while self.model is not None or pending or self.running:
                await self._thawed.wait()
                now = _now_ms()
                if self.model is not None:
                    self._follow_model(now)
                elif pending and not self.running and now >= self._next_off_ms:
                    self._go(pending.popleft(), now)
                self._advance(now)
                await asyncio.sleep(tick_s)
            logger.info("race simulator: synthetic races finished (%d messages)", self.messages_sent)
        finally:
            if self.model is None:
                self.done.set()

    def _follow_model(self, now: int) -> None:
        """A race for every horse-racing WIN market newly seen in play."""
        assert self.model is not None
        books = self.model.books
        for market_id, mb in books.items():
            md = mb.definition
            if (market_id in self._seen or not md or md.get("eventTypeId") != "7" or not md.get("inPlay")
                    or md.get("status") != "OPEN"):
                continue
            self._seen.add(market_id)
            card = race_card(mb, seed=self.config.seed, distance_m=self.config.distance_m)
            if card is not None:
                self._go(card, now)
        if len(self._seen) > 4 * len(books) + 64:  # markets gone from the model are never seen again
            self._seen.intersection_update(books)

    def _winner_of(self, market_id: str) -> int | None:
        """The winner of the race run for ``market_id`` (decided at its off), None when none was."""
        race = self._by_market.get(market_id)
        return race.result[0] if race is not None else None

    def _go(self, card: RaceCard, now: int) -> None:
        end = self.model.play_end_ms(card.market_id) if self.model is not None else None
        if end is not None:
            # run a distance the winner covers before the model ends play (at a slow 15 m/s), so the
            # race is over before its market is suspended and settled with the race's winner
            room_m = ((end - now) / 1000 * self.time_scale - _ACCEL_S - 3.0) * 15.0
            if room_m < card.distance_m:
                card = msgspec.structs.replace(card, distance_m=round(max(400.0, room_m), 1))
        race = Race(card, seed=self.config.seed, off_ms=now, time_scale=self.time_scale, update_s=self.update_s)
        self.running[race.race_id] = race
        self._by_market[card.market_id] = race
        while len(self._by_market) > _RESULTS_KEPT:
            self._by_market.popitem(last=False)
        logger.info("race simulator: race %s (market %s, %d runners, %.0f m %s) off", race.race_id,
                    card.market_id, len(card.runners), card.distance_m, card.race_type)

    def _advance(self, now: int) -> None:
        """Every step of the running races due by ``now``, one rcm per round
        (a race late by several steps catches up one line per step)."""
        for _ in range(256):
            due = [race for race in self.running.values() if race.next_ms <= now]
            if not due:
                return
            rc = [entry for race in due if (entry := race.step()) is not None]
            self._publish(rc)
            for race in due:
                if race.done:
                    del self.running[race.race_id]
                    self.results[race.race_id] = race.result
                    while len(self.results) > _RESULTS_KEPT:
                        self.results.popitem(last=False)
                    self._next_off_ms = now + self.config.race_gap_ms
                    logger.info("race simulator: race %s finished in %.1f s, won by %d", race.race_id,
                                race.winner_s, race.result[0])


def main(argv: list[str] | None = None) -> None:
    """``python -m feed.simulator.race_server``: serve until interrupted."""
    d = RaceSimConfig()
    parser = argparse.ArgumentParser(prog="python -m feed.simulator.race_server",
                                     description="a local Betfair sports-data stream serving horse-race progress "
                                                 "(TPD)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9447)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--races", type=int, default=d.races, help=f"synthetic races (default {d.races})")
    parser.add_argument("--race-gap-ms", type=int, default=d.race_gap_ms,
                        help=f"real ms between a race's finish and the next off (default {d.race_gap_ms})")
    parser.add_argument("--time-scale", type=float, default=d.time_scale, help="race time speed-up (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = RaceSimConfig(host=args.host, port=args.port, seed=args.seed, races=args.races,
                           race_gap_ms=args.race_gap_ms, time_scale=args.time_scale)

    serve_until_interrupted(RaceSimulator(config), "race simulator (Betfair sports-data stream, race progress)", "betfair-race")


if __name__ == "__main__":
    main()
