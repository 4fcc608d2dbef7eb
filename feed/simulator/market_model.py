"""Synthetic exchange markets across several sports, for demos and tests.

:class:`MarketModel` keeps ``events`` sporting events alive forever. Each one
runs the Betfair lifecycle on the *wall clock* (all times are integer ms since
the Unix epoch), sped up by ``time_scale`` (60 ⇒ a 90-minute match takes 90
real seconds):

    pre-match (OPEN) → at the off: SUSPENDED → in-play (OPEN, inPlay, betDelay > 0)
    → brief suspensions (goals …) → end: SUSPENDED → settled: CLOSED with
    runners WINNER/LOSER → removed a little later, and a fresh event replaces it.

Greyhound races do not turn in play (suspended at the off, then settled).

Sports and markets: Soccer ("1": MATCH_ODDS + OVER_UNDER_25), Tennis ("2":
MATCH_ODDS), Horse Racing ("7": WIN), Greyhound Racing ("4339": WIN) and
Basketball ("7522": MATCH_ODDS, named "Moneyline" as Betfair does).

Prices: every runner has a probability; the best back price is the tick at or
below ``1 / (p · 1.01)`` (so the back book sums to ~101–105 %), the best lay
one tick above, ten levels each side with random sizes. Updates are a mix of
size changes, random-walk price moves (wider in play) and trades (which move
``ltp``, ``trd`` and ``tv``). Everything random comes from one seeded
``random.Random``: the same seed and the same ``step`` calls give the same
markets.

Definitions keep ``name``, ``eventName`` and runner ``name`` as Betfair's
historic files do; the ESA server strips them from the live stream (the live
stream has no names) and :mod:`feed.simulator.betfair_api` serves them, with
the competition (:meth:`MarketModel.competition_of`), through
``listMarketCatalogue``.

Event state (:meth:`MarketModel.event_state`): soccer and basketball events
keep a score, a period and a match clock that the HTTP, push and UOF-style
providers serve the way each real provider does. Soccer: the goals are the
model's goal incidents (they move the prices), red cards come with some of
them; 1st half for 47 model minutes of play (45 + 2 stoppage), 15 minutes
half time, then the 2nd half from 45:00 until the end. Basketball: four
12-minute quarters spread over the time in play, points accruing with
the clock towards quarter totals drawn when the event is made; the winner
settled is the side ahead at the end. Everything state-only is drawn from a
second generator seeded from ``seed``, so the price stream of a seed is the
same as without event states.

The model only mutates :class:`~feed.simulator.wire.MarketBook` objects and
records :class:`~feed.simulator.wire.MarketDirty` marks; turning them into ESA
messages is the server's job.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from collections.abc import Callable
from typing import Any

from feed.simulator.ladder import TICKS, tick_index
from feed.simulator.wire import MarketBook, MarketDirty, RunnerBook, num, truth_of

__all__ = ["SPORTS", "MarketModel", "ModelState", "iso_ms"]

#: eventTypeId -> sport name
SPORTS: dict[str, str] = {
    "1": "Soccer",
    "2": "Tennis",
    "7": "Horse Racing",
    "4339": "Greyhound Racing",
    "7522": "Basketball",
}

# sport mix of new events (eventTypeId, weight)
_SPORT_WEIGHTS = (("1", 4), ("2", 2), ("7", 2), ("4339", 1), ("7522", 1))
_INITIAL_ROTATION = ("1", "7", "2", "4339", "7522", "1", "7", "2", "1")

DEPTH = 10  # ladder levels per side
MARGIN = 0.01  # back-side margin before snapping

PRE, AT_OFF, IN_PLAY, ENDED, CLOSED = "PRE", "AT_OFF", "IN_PLAY", "ENDED", "CLOSED"

_SOCCER = {
    "GB": ["Arsenal", "Chelsea", "Liverpool", "Everton", "Man City", "Man Utd", "Tottenham", "Newcastle",
           "Aston Villa", "West Ham", "Brighton", "Wolves", "Fulham", "Brentford", "Leeds", "Burnley"],
    "ES": ["Real Madrid", "Barcelona", "Atletico Madrid", "Sevilla", "Valencia", "Villarreal", "Real Betis",
           "Athletic Bilbao", "Real Sociedad", "Celta Vigo"],
    "DE": ["Bayern Munich", "Dortmund", "RB Leipzig", "Leverkusen", "Frankfurt", "Wolfsburg", "Freiburg",
           "Stuttgart", "Union Berlin", "Mainz"],
    "IT": ["Inter", "AC Milan", "Juventus", "Napoli", "Roma", "Lazio", "Atalanta", "Fiorentina", "Torino",
           "Bologna"],
}
_TZ = {"GB": "Europe/London", "ES": "Europe/Madrid", "DE": "Europe/Berlin", "IT": "Europe/Rome",
       "IE": "Europe/Dublin", "AU": "Australia/Sydney", "US": "America/New_York", "FR": "Europe/Paris"}
_TENNIS = ["Djokovic", "Alcaraz", "Sinner", "Medvedev", "Zverev", "Rublev", "Ruud", "Fritz", "De Minaur",
           "Tsitsipas", "Hurkacz", "Rune", "Swiatek", "Sabalenka", "Gauff", "Rybakina", "Pegula", "Jabeur",
           "Ostapenko", "Zheng"]
_TENNIS_TOURS = [("GB", "Queens"), ("FR", "Paris"), ("US", "Cincinnati"), ("AU", "Brisbane"),
                 ("DE", "Halle"), ("ES", "Madrid")]
_BASKETBALL = ["Boston Celtics", "LA Lakers", "Golden State Warriors", "Miami Heat", "Denver Nuggets",
               "Milwaukee Bucks", "Phoenix Suns", "Dallas Mavericks", "Chicago Bulls", "New York Knicks",
               "Cleveland Cavaliers", "Minnesota Timberwolves"]
_HORSE_VENUES = [("GB", "Kempton"), ("GB", "Ascot"), ("GB", "Newmarket"), ("GB", "Doncaster"),
                 ("IE", "Leopardstown"), ("IE", "Curragh"), ("AU", "Flemington"), ("AU", "Randwick"),
                 ("FR", "Longchamp")]
_DOG_VENUES = [("GB", "Romford"), ("GB", "Towcester"), ("GB", "Hove"), ("GB", "Monmore"), ("IE", "Shelbourne Park")]
_NAME_A = ["Golden", "Silver", "Midnight", "Royal", "Lucky", "Swift", "Bold", "Silent", "Wild", "Northern",
           "Brave", "Desert", "Ocean", "Iron", "Velvet", "Crimson", "Misty", "Starlit", "Rapid", "Noble"]
_NAME_B = ["Arrow", "Dancer", "Storm", "Spirit", "Legend", "Comet", "Echo", "Harbour", "Whisper", "Thunder",
           "Falcon", "Mirage", "Rocket", "Sovereign", "Flame", "Breeze", "Rebel", "Voyager", "Jewel", "Knight"]
_HORSE_RACES = ["5f Mdn Stks", "6f Hcap", "7f Nov Stks", "1m Hcap", "1m2f Hcap", "1m4f Stks", "2m Hcap Hrd",
                "2m4f Chs", "3m Hcap Chs"]
_DOG_GRADES = ["A1", "A2", "A3", "A4", "A5", "A6", "D2", "S1", "OR"]

#: competitions (Betfair id, name) by sport and country / tour; racing has none
_SOCCER_LEAGUES = {"GB": ("10932509", "English Premier League"), "ES": ("117", "Spanish La Liga"),
                   "DE": ("59", "German Bundesliga"), "IT": ("81", "Italian Serie A")}
_TENNIS_COMPETITIONS = {tour: (str(12_500_000 + i), f"ATP {tour}") for i, (_, tour) in enumerate(_TENNIS_TOURS)}
_NBA = ("10547864", "NBA")

#: well-known Betfair selection ids
_FIXED_IDS = {"The Draw": 58805, "Under 2.5 Goals": 47972, "Over 2.5 Goals": 47973}


def iso_ms(ms: int) -> str:
    """``ms`` since the epoch as Betfair writes times: ``2021-07-30T05:44:00.000Z``."""
    dt = datetime.fromtimestamp(ms // 1000, UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class _Market:
    """Model-side market: the book plus its probabilities and ladder anchors."""

    __slots__ = ("book", "event", "market_type", "name", "back_idx", "lay_idx", "probs", "runner_ids",
                 "runner_names", "status", "winners", "liquidity", "removed_ids", "adjustment")

    def __init__(self, event: _Event, market_id: str, market_type: str, name: str,
                 runner_ids: list[int], runner_names: list[str], probs: list[float], liquidity: float) -> None:
        self.event = event
        self.book = MarketBook(market_id)
        self.market_type = market_type
        self.name = name
        self.runner_ids = runner_ids
        self.runner_names = runner_names
        self.probs = probs  # aligned with runner_ids; 0 for removed runners
        self.back_idx = [0] * len(runner_ids)
        self.lay_idx = [0] * len(runner_ids)
        self.status = "OPEN"
        self.winners: set[int] = set()
        self.removed_ids: dict[int, str] = {}  # id -> removalDate
        self.liquidity = liquidity
        # racing: the reduction factor (%) a removal would apply, fixed at creation
        self.adjustment = [num(p * 100) for p in probs] if event.sport in ("7", "4339") else None
        for sid in runner_ids:
            self.book.runner(sid)


#: soccer timeline in model seconds of play: 1st half (45:00 + 2 min stoppage), half time, 2nd half
_SOCCER_1H_S, _SOCCER_HT_S = 47 * 60, 15 * 60
#: basketball: regulation game clock (4 × 12 min), seconds
_QUARTER_S = 12 * 60


@dataclass(frozen=True)
class ModelState:
    """What the model says of one event's state at its current time.

    phase: ``pre`` (not started), ``live`` (in play), ``ended`` (play over,
    not settled), ``closed`` (settled). period: ``1h`` / ``ht`` / ``2h``,
    ``q1``–``q4``, None outside play. clock_s: elapsed match time in
    seconds (None before play); running: the clock runs; remaining_s:
    seconds left in the quarter (basketball); stoppage_s: stoppage time
    played (soccer, 1st half). home / away: the score; periods: per period
    ``(period, home, away)``; red_cards: ``(home, away)`` (soccer), None
    otherwise. at_ms: the model time the state refers to (ms).
    """

    sport: str
    phase: str
    period: str | None
    clock_s: int | None
    running: bool
    remaining_s: int | None
    stoppage_s: int | None
    home: int
    away: int
    periods: tuple[tuple[str, int, int], ...]
    red_cards: tuple[int, int] | None
    at_ms: int

    def key(self) -> tuple[object, ...]:
        """Everything but the running clock's reading (a provider sends a
        state when this changes, and the clock with it)."""
        return (self.phase, self.period, self.running, self.home, self.away, self.periods, self.red_cards,
                self.clock_s if not self.running else None)


class _Event:
    __slots__ = ("event_id", "sport", "name", "country", "venue", "timezone", "start_ms", "end_ms",
                 "phase", "next_ms", "markets", "score", "in_play_delay", "turn_in_play", "suspended_until",
                 "next_incident_ms", "competition", "play_ms", "goals", "red_cards", "quarters", "play_end_ms")

    def __init__(self, event_id: str, sport: str, name: str, country: str, venue: str | None) -> None:
        self.event_id = event_id
        self.sport = sport
        self.name = name
        self.country = country
        self.venue = venue
        self.timezone = _TZ.get(country, "GMT")
        self.start_ms = 0
        self.end_ms = 0
        self.phase = PRE
        self.next_ms = 0
        self.markets: list[_Market] = []
        self.score = [0, 0]
        self.in_play_delay = 0
        self.turn_in_play = True
        self.suspended_until = 0
        self.next_incident_ms = 0
        self.competition: tuple[str, str] | None = None  # (id, name) as Betfair's catalogue gives it
        self.play_ms = 0  # wall ms play started (0: not yet)
        self.play_end_ms = 0  # wall ms play ended (0: not yet)
        self.goals: list[tuple[int, int]] = []  # (side 0 home / 1 away, model seconds of play)
        self.red_cards = [0, 0]
        self.quarters: list[tuple[int, int]] = []  # basketball: (home, away) points per quarter


class MarketModel:
    """Synthetic markets (see the module docstring).

    Args:
        events: how many live (not yet removed) events to keep.
        seed: seed of the model's ``random.Random`` (``None``: random).
        time_scale: lifecycle speed-up over real time (60 ⇒ one model minute
            per real second).
        now_ms: wall clock at creation, ms since the epoch (default: now).

    Use: ``step(now_ms, updates)`` advances lifecycles to ``now_ms`` and applies
    ``updates`` random price/size/trade changes; ``drain()`` returns and
    clears the marks of everything touched since the last drain; ``books``
    holds the current :class:`MarketBook` of every market.
    """

    def __init__(self, *, events: int = 12, seed: int | None = None, time_scale: float = 60.0,
                 now_ms: int | None = None) -> None:
        if events < 1:
            raise ValueError("events must be >= 1")
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.rng = random.Random(seed)
        #: draws of the event states only (scores, cards): the price stream of a seed stays as it was
        self.state_rng = random.Random(None if seed is None else f"oddsfeed-state:{seed}")
        self.time_scale = time_scale
        #: at settlement, the winner a race was run with (a race simulator following this model:
        #: :mod:`feed.simulator.race_server`): market id -> selection id, None = draw one
        self.race_winner: Callable[[str], int | None] | None = None
        self.target_events = events
        self.books: dict[str, MarketBook] = {}
        self._markets: dict[str, _Market] = {}
        self._events: list[_Event] = []
        self._event_by_id: dict[str, _Event] = {}
        self._dirty: dict[str, MarketDirty] = {}
        self._ids: dict[str, int] = dict(_FIXED_IDS)
        self._used_ids: set[int] = set(_FIXED_IDS.values())
        self._next_market = 230_000_000 + self.rng.randrange(1_000_000)
        self._next_event = 33_000_000 + self.rng.randrange(1_000_000)
        self.now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        for i in range(events):
            # stagger: about a third start in play, the rest over the next half hour (model time)
            if i % 3 == 0:
                offset_s = -self.rng.uniform(60, 1800)
            else:
                offset_s = self.rng.uniform(60, 1800)
            # every sport is represented from the start, then the weighted mix
            sport = _INITIAL_ROTATION[i] if i < len(_INITIAL_ROTATION) else None
            self._new_event(self.now_ms, offset_s, sport)

    # -- time ----------------------------------------------------------------

    def _wall(self, model_s: float) -> int:
        """Model seconds -> real ms."""
        return int(model_s * 1000 / self.time_scale)

    # -- public ---------------------------------------------------------------

    def step(self, now_ms: int, updates: int = 0) -> None:
        """Advance lifecycles to ``now_ms`` and apply ``updates`` random changes."""
        self.now_ms = now_ms
        for ev in list(self._events):
            guard = 0
            while ev.next_ms <= now_ms and guard < 16:
                guard += 1
                self._transition(ev, now_ms)
            if ev.phase == IN_PLAY and ev.next_incident_ms and ev.next_incident_ms <= now_ms:
                self._incident(ev, now_ms)
            if ev.suspended_until and ev.suspended_until <= now_ms and ev.phase == IN_PLAY:
                ev.suspended_until = 0
                for m in ev.markets:
                    self._rebuild_all(m, fresh=True)
                    self._set_status(m, "OPEN")
        while len(self._events) < self.target_events:
            self._new_event(now_ms, self.rng.uniform(300, 2400))
        if updates <= 0:
            return
        live = [m for m in self._markets.values() if m.status == "OPEN"]
        if not live:
            return
        weights = [3.0 if m.event.phase == IN_PLAY else 1.0 for m in live]
        for m in self.rng.choices(live, weights, k=updates):
            self._random_update(m)

    def play_end_ms(self, market_id: str) -> int | None:
        """When the event of ``market_id`` ends play (wall clock, ms since the
        epoch), while it is in play; None otherwise."""
        m = self._markets.get(market_id)
        if m is None or m.event.phase != IN_PLAY:
            return None
        return m.event.next_ms

    def event_state(self, event_id: str) -> ModelState | None:
        """The state of event ``event_id`` now (see :class:`ModelState`);
        None for an unknown event or a sport without one (tennis, racing)."""
        ev = self._event_by_id.get(event_id)
        if ev is None or ev.sport not in ("1", "7522"):
            return None
        now = self.now_ms
        if ev.play_ms == 0:
            return ModelState(sport=ev.sport, phase="pre", period=None, clock_s=None, running=False,
                              remaining_s=None, stoppage_s=None, home=0, away=0, periods=(),
                              red_cards=(0, 0) if ev.sport == "1" else None, at_ms=now)
        end = ev.play_end_ms or now
        played_s = max(0.0, (min(now, end) - ev.play_ms) * self.time_scale / 1000)
        phase = "live" if ev.play_end_ms == 0 else "closed" if ev.phase == CLOSED else "ended"
        if ev.sport == "1":
            return self._soccer_state(ev, played_s, phase, now)
        return self._basketball_state(ev, played_s, phase, now)

    def _soccer_state(self, ev: _Event, e: float, phase: str, now: int) -> ModelState:
        live = phase == "live"
        if e < _SOCCER_1H_S:
            period, clock, stoppage, running = "1h", int(e), max(0, int(e) - 45 * 60) or None, live
        elif e < _SOCCER_1H_S + _SOCCER_HT_S:
            period, clock, stoppage, running = "ht", 45 * 60, None, False
        else:
            period, clock, stoppage, running = "2h", 45 * 60 + int(e - _SOCCER_1H_S - _SOCCER_HT_S), None, live
        first = [0, 0]
        second = [0, 0]
        for side, at in ev.goals:
            (first if at < _SOCCER_1H_S + _SOCCER_HT_S // 2 else second)[side] += 1
        periods = [("1h", first[0], first[1])]
        if period == "2h" or not live:
            periods.append(("2h", second[0], second[1]))
        return ModelState(sport=ev.sport, phase=phase, period=period if live else None, clock_s=clock,
                          running=running, remaining_s=None, stoppage_s=stoppage if live else None,
                          home=ev.score[0], away=ev.score[1], periods=tuple(periods),
                          red_cards=(ev.red_cards[0], ev.red_cards[1]), at_ms=now)

    def _basketball_state(self, ev: _Event, e: float, phase: str, now: int) -> ModelState:
        live = phase == "live"
        span_s = max(1.0, (ev.end_ms - ev.play_ms) * self.time_scale / 1000) if ev.end_ms > ev.play_ms else 1.0
        f = 1.0 if not live else min(max(e / span_s, 0.0), 0.9999)
        q = min(int(f * 4), 3)
        fq = f * 4 - q
        home = away = 0
        periods = []
        for i, (h, a) in enumerate(ev.quarters):
            if i < q or not live:
                ph, pa = h, a
            elif i == q:
                ph, pa = int(h * fq), int(a * fq)
            else:
                break
            periods.append((f"q{i + 1}", ph, pa))
            home += ph
            away += pa
        clock = int((q + fq) * _QUARTER_S) if live else 4 * _QUARTER_S
        return ModelState(sport=ev.sport, phase=phase, period=f"q{q + 1}" if live else None, clock_s=clock,
                          running=live, remaining_s=int((1 - fq) * _QUARTER_S) if live else None, stoppage_s=None,
                          home=home, away=away, periods=tuple(periods), red_cards=None, at_ms=now)

    def event_ids(self) -> list[str]:
        """Ids of the events the model holds (not yet removed)."""
        return [ev.event_id for ev in self._events]

    def competition_of(self, market_id: str) -> tuple[str, str] | None:
        """``(id, name)`` of the competition of ``market_id``'s event (None:
        racing, or an unknown market): what Betfair's catalogue names and the
        stream never carries."""
        m = self._markets.get(market_id)
        return m.event.competition if m is not None else None

    def drain(self) -> dict[str, MarketDirty]:
        """Marks of every market touched since the last call (then cleared)."""
        dirty, self._dirty = self._dirty, {}
        return dirty

    def truth(self) -> dict[str, Any]:
        """Current state, see :func:`feed.simulator.wire.truth_of`."""
        return truth_of(self.books)

    # -- marks ------------------------------------------------------------------

    def _mark(self, m: _Market) -> MarketDirty:
        d = self._dirty.get(m.book.market_id)
        if d is None:
            d = self._dirty[m.book.market_id] = MarketDirty()
        return d

    # -- creation ---------------------------------------------------------------

    def _selection_id(self, name: str) -> int:
        sid = self._ids.get(name)
        if sid is None:
            while True:
                sid = self.rng.randrange(100_000, 60_000_000)
                if sid not in self._used_ids:
                    break
            self._ids[name] = sid
            self._used_ids.add(sid)
        return sid

    def _market_id(self) -> str:
        self._next_market += self.rng.randint(1, 40)
        return f"1.{self._next_market}"

    def _event_id(self) -> str:
        self._next_event += self.rng.randint(1, 400)
        return str(self._next_event)

    def _names(self, n: int) -> list[str]:
        """``n`` distinct runner names (so selection ids are distinct within a market)."""
        pairs = self.rng.sample(range(len(_NAME_A) * len(_NAME_B)), n)
        return [f"{_NAME_A[k // len(_NAME_B)]} {_NAME_B[k % len(_NAME_B)]}" for k in pairs]

    def _new_event(self, now_ms: int, start_in_model_s: float, sport: str | None = None) -> None:
        rng = self.rng
        if sport is None:
            sport = rng.choices([s for s, _ in _SPORT_WEIGHTS], [w for _, w in _SPORT_WEIGHTS])[0]
        start_ms = now_ms + self._wall(start_in_model_s)
        start_ms -= start_ms % 1000
        day = datetime.fromtimestamp(start_ms // 1000, UTC)
        specs: list[tuple[str, str, list[str], list[float], float]] = []
        if sport == "1":
            country = rng.choice(list(_SOCCER))
            home, away = rng.sample(_SOCCER[country], 2)
            ev = _Event(self._event_id(), sport, f"{home} v {away}", country, None)
            ev.competition = _SOCCER_LEAGUES[country]
            strength = rng.gauss(0.25, 0.5)  # home advantage in log-odds
            ph = 1 / (1 + math.exp(-strength))
            draw = rng.uniform(0.22, 0.3)
            specs.append(("MATCH_ODDS", "Match Odds", [home, away, "The Draw"],
                          [ph * (1 - draw), (1 - ph) * (1 - draw), draw], 800.0))
            over = rng.uniform(0.4, 0.62)
            specs.append(("OVER_UNDER_25", "Over/Under 2.5 Goals", ["Under 2.5 Goals", "Over 2.5 Goals"],
                          [1 - over, over], 300.0))
            duration_s, ev.in_play_delay = rng.uniform(105, 115) * 60, 5
        elif sport == "2":
            country, tour = rng.choice(_TENNIS_TOURS)
            a, b = rng.sample(_TENNIS, 2)
            ev = _Event(self._event_id(), sport, f"{a} v {b}", country, None)
            ev.competition = _TENNIS_COMPETITIONS[tour]
            pa = 1 / (1 + math.exp(-rng.gauss(0, 1.2)))
            specs.append(("MATCH_ODDS", "Match Odds", [a, b], [pa, 1 - pa], 300.0))
            duration_s, ev.in_play_delay = rng.uniform(80, 180) * 60, 3
        elif sport == "7":
            country, venue = rng.choice(_HORSE_VENUES)
            ev = _Event(self._event_id(), sport, f"{venue} {_ordinal(day.day)} {day:%b}", country, venue)
            n = rng.randint(5, 12)
            names = self._names(n)
            probs = [rng.lognormvariate(0, 0.9) for _ in range(n)]
            specs.append(("WIN", f"R{rng.randint(1, 9)} {rng.choice(_HORSE_RACES)}", names, probs, 150.0))
            duration_s, ev.in_play_delay = rng.uniform(60, 300), 1
        elif sport == "4339":
            country, venue = rng.choice(_DOG_VENUES)
            ev = _Event(self._event_id(), sport, f"{venue} {_ordinal(day.day)} {day:%b}", country, venue)
            names = [f"{i + 1}. {name}" for i, name in enumerate(self._names(6))]
            probs = [rng.lognormvariate(0, 0.5) for _ in range(6)]
            specs.append(("WIN", f"{rng.choice(_DOG_GRADES)} {rng.choice([400, 450, 480, 500])}m", names, probs, 30.0))
            duration_s, ev.in_play_delay = rng.uniform(28, 35), 0
            ev.turn_in_play = False
        else:
            home, away = rng.sample(_BASKETBALL, 2)
            ev = _Event(self._event_id(), sport, f"{away} @ {home}", "US", None)
            ev.competition = _NBA
            ph = 1 / (1 + math.exp(-rng.gauss(0.2, 0.9)))
            specs.append(("MATCH_ODDS", "Moneyline", [away, home], [1 - ph, ph], 400.0))
            duration_s, ev.in_play_delay = rng.uniform(140, 160) * 60, 5
        ev.start_ms = start_ms
        ev.end_ms = start_ms + self._wall(duration_s)
        if sport == "7522":  # quarter totals, drawn from the state generator (the prices' is untouched)
            srng = self.state_rng
            ev.quarters = [(srng.randint(20, 34), srng.randint(20, 34)) for _ in range(4)]
            if sum(h for h, _ in ev.quarters) == sum(a for _, a in ev.quarters):
                last_h, last_a = ev.quarters[3]
                ev.quarters[3] = (last_h + 2, last_a)  # no ties: the home side wins by two
        for market_type, name, runner_names, probs, liquidity in specs:
            total = sum(probs)
            ids = [self._selection_id(rn) for rn in runner_names]
            m = _Market(ev, self._market_id(), market_type, name, ids, runner_names,
                        [p / total for p in probs], liquidity)
            ev.markets.append(m)
            self._markets[m.book.market_id] = m
            self.books[m.book.market_id] = m.book
            self._publish_definition(m, new=True)
            self._rebuild_all(m, fresh=True)
            for i in range(len(ids)):  # some history: a few trades each
                for _ in range(rng.randint(1, 3)):
                    self._trade(m, i)
            self._mark(m).image = True
        self._events.append(ev)
        self._event_by_id[ev.event_id] = ev
        if start_ms <= now_ms:
            # already under way: jump straight in play (or to the off for greyhounds)
            if ev.turn_in_play:
                ev.phase = AT_OFF
                ev.next_ms = now_ms
            else:
                ev.phase = PRE
                ev.next_ms = now_ms
        else:
            ev.phase = PRE
            ev.next_ms = start_ms
            self._maybe_non_runner(ev, now_ms)

    def _maybe_non_runner(self, ev: _Event, now_ms: int) -> None:
        if ev.sport != "7" or self.rng.random() > 0.3:
            return
        m = ev.markets[0]
        i = self.rng.randrange(len(m.runner_ids))
        sid = m.runner_ids[i]
        m.removed_ids[sid] = iso_ms(now_ms - now_ms % 1000)
        m.probs[i] = 0.0
        total = sum(m.probs)
        m.probs = [p / total for p in m.probs]
        rb = m.book.runners[(sid, None)]
        rb.atb.clear()
        rb.atl.clear()
        self._mark(m).runners.add((sid, None))
        self._publish_definition(m)
        self._rebuild_all(m)

    # -- definition ---------------------------------------------------------------

    def _publish_definition(self, m: _Market, new: bool = False) -> None:
        ev = m.event
        old = m.book.definition
        if old:
            version = old["version"] + self.rng.randint(1, 5000)
        else:
            version = self.rng.randrange(1_000_000_000, 4_000_000_000)
        runners = []
        for sort, (sid, name) in enumerate(zip(m.runner_ids, m.runner_names, strict=True), start=1):
            r: dict[str, Any] = {}
            if m.adjustment is not None:
                r["adjustmentFactor"] = m.adjustment[sort - 1]
            if sid in m.removed_ids:
                r["status"] = "REMOVED"
            elif m.status == "CLOSED":
                r["status"] = "WINNER" if sid in m.winners else "LOSER"
            else:
                r["status"] = "ACTIVE"
            r["sortPriority"] = sort
            if sid in m.removed_ids:
                r["removalDate"] = m.removed_ids[sid]
            r["id"] = sid
            r["name"] = name
            runners.append(r)
        in_play = ev.phase in (IN_PLAY, ENDED, CLOSED) and ev.turn_in_play and ev.start_ms <= self.now_ms
        md: dict[str, Any] = {
            "bspMarket": ev.sport in ("7", "4339"),
            "turnInPlayEnabled": ev.turn_in_play,
            "persistenceEnabled": ev.turn_in_play,
            "marketBaseRate": 5,
            "eventId": ev.event_id,
            "eventTypeId": ev.sport,
            "numberOfWinners": 1,
            "bettingType": "ODDS",
            "marketType": m.market_type,
            "marketTime": iso_ms(ev.start_ms),
            "suspendTime": iso_ms(ev.start_ms),
        }
        if m.status == "CLOSED":
            md["settledTime"] = iso_ms(self.now_ms - self.now_ms % 1000)
        md["bspReconciled"] = ev.sport in ("7", "4339") and ev.phase != PRE
        md["complete"] = True
        md["inPlay"] = in_play
        md["crossMatching"] = m.status == "OPEN" and not in_play
        md["runnersVoidable"] = False
        md["numberOfActiveRunners"] = 0 if m.status == "CLOSED" else sum(
            1 for sid in m.runner_ids if sid not in m.removed_ids)
        md["betDelay"] = ev.in_play_delay if in_play else 0
        md["status"] = m.status
        md["runners"] = runners
        md["regulators"] = ["MR_INT"]
        if ev.venue:
            md["venue"] = ev.venue
        md["countryCode"] = ev.country
        md["discountAllowed"] = True
        md["timezone"] = ev.timezone
        md["openDate"] = iso_ms(ev.start_ms)
        md["version"] = version
        if ev.sport == "7":
            md["raceType"] = "Hurdle" if "Hrd" in m.name else "Chase" if "Chs" in m.name else "Flat"
        md["priceLadderDefinition"] = {"type": "CLASSIC"}
        md["name"] = m.name
        md["eventName"] = ev.name
        m.book.set_definition(md)
        self._mark(m).definition = True

    def _set_status(self, m: _Market, status: str) -> None:
        if m.status != status or status == "CLOSED":
            m.status = status
            self._publish_definition(m)

    # -- lifecycle ------------------------------------------------------------------

    def _transition(self, ev: _Event, now_ms: int) -> None:
        rng = self.rng
        if ev.phase == PRE:
            # the off: suspend; turn in play shortly after (or run the race blind)
            ev.phase = AT_OFF
            for m in ev.markets:
                self._set_status(m, "SUSPENDED")
            if ev.turn_in_play:
                ev.next_ms = now_ms + self._wall(rng.uniform(20, 60))
            else:
                ev.next_ms = max(ev.end_ms, now_ms + 1)
                ev.phase = ENDED
        elif ev.phase == AT_OFF:
            ev.phase = IN_PLAY
            ev.play_ms = now_ms
            ev.next_ms = max(ev.end_ms, now_ms + 1)
            ev.next_incident_ms = now_ms + self._incident_gap(ev)
            for m in ev.markets:
                m.status = "OPEN"
                self._publish_definition(m)  # inPlay: true, betDelay > 0
                self._rebuild_all(m, fresh=True)  # unmatched bets lapse at the off
        elif ev.phase == IN_PLAY:
            ev.phase = ENDED
            ev.play_end_ms = now_ms
            ev.next_incident_ms = 0
            ev.next_ms = now_ms + self._wall(rng.uniform(30, 120))
            for m in ev.markets:
                self._set_status(m, "SUSPENDED")
        elif ev.phase == ENDED:
            ev.phase = CLOSED
            ev.next_ms = now_ms + self._wall(rng.uniform(120, 300))
            for m in ev.markets:
                self._settle(m)
        else:  # CLOSED for a while: remove, a new event takes its place
            ev.next_ms = 2**62
            self._events.remove(ev)
            self._event_by_id.pop(ev.event_id, None)
            for m in ev.markets:
                del self._markets[m.book.market_id]
                del self.books[m.book.market_id]
                self._mark(m).removed = True

    def _settle(self, m: _Market) -> None:
        ev = m.event
        if ev.sport == "1" and m.market_type == "MATCH_ODDS":
            h, a = ev.score
            winner = m.runner_ids[0 if h > a else 1 if a > h else 2]
        elif ev.sport == "1":
            winner = m.runner_ids[1 if sum(ev.score) > 2 else 0]
        else:
            winner = self.rng.choices(m.runner_ids, m.probs)[0]
            ran = self.race_winner(m.book.market_id) if self.race_winner is not None and ev.sport == "7" else None
            if ran is not None and ran in m.runner_ids:  # drawn anyway: the price stream of a seed stays the same
                winner = ran
            if ev.sport == "7522" and ev.quarters:  # the side ahead at the end (runners: away, home)
                home = sum(h for h, _ in ev.quarters)
                away = sum(a for _, a in ev.quarters)
                winner = m.runner_ids[1] if home > away else m.runner_ids[0]
        m.winners = {winner}
        for rb in m.book.runners.values():
            if rb.atb or rb.atl:
                rb.atb.clear()
                rb.atl.clear()
                self._mark(m).runners.add(rb.key)
        self._set_status(m, "CLOSED")

    def _incident_gap(self, ev: _Event) -> int:
        # mean model seconds between incidents that suspend the market
        mean_s = {"1": 2100.0, "2": 3000.0, "7522": 2400.0}.get(ev.sport)
        if mean_s is None:
            return 0
        return self._wall(self.rng.expovariate(1 / mean_s)) + 1

    def _incident(self, ev: _Event, now_ms: int) -> None:
        rng = self.rng
        ev.next_incident_ms = now_ms + self._incident_gap(ev)
        if ev.suspended_until:
            return
        if ev.sport == "1":  # a goal
            side = 0 if rng.random() < ev.markets[0].probs[0] / (ev.markets[0].probs[0] + ev.markets[0].probs[1]) else 1
            ev.score[side] += 1
            if ev.play_ms:
                ev.goals.append((side, int((now_ms - ev.play_ms) * self.time_scale / 1000)))
            if self.state_rng.random() < 0.15:  # a red card with it now and then (state generator)
                ev.red_cards[self.state_rng.randrange(2)] += 1
            mo = ev.markets[0]
            mo.probs[side] *= 2.2
            mo.probs[2] *= 0.8 if ev.score[0] != ev.score[1] else 1.6
            self._normalise(mo)
            ou = ev.markets[1]
            if sum(ev.score) > 2:
                ou.probs = [0.005, 0.995]
            else:
                ou.probs[1] *= 1.8
                self._normalise(ou)
        for m in ev.markets:
            self._set_status(m, "SUSPENDED")
        ev.suspended_until = now_ms + self._wall(rng.uniform(30, 90))

    # -- prices ---------------------------------------------------------------------

    @staticmethod
    def _normalise(m: _Market) -> None:
        total = sum(m.probs)
        m.probs = [min(max(p / total, 0.001), 0.995) if p > 0 else 0.0 for p in m.probs]

    def _target_back_idx(self, p: float) -> int:
        price = 1.0 / (p * (1 + MARGIN))
        return min(tick_index(price), len(TICKS) - 2)

    def _size(self, m: _Market, level: int) -> float:
        return num(max(2.0, self.rng.lognormvariate(math.log(m.liquidity / (1 + level)), 1.0)))

    def _rebuild(self, m: _Market, i: int, fresh: bool = False) -> None:
        """Rebuild runner ``i``'s ladders around ``back_idx``/``lay_idx``."""
        rb: RunnerBook = m.book.runners[(m.runner_ids[i], None)]
        old_b, old_l = ({}, {}) if fresh else (rb.atb, rb.atl)
        bi, li = m.back_idx[i], m.lay_idx[i]
        atb: dict[float, float] = {}
        for lv in range(DEPTH):
            if bi - lv < 0:
                break
            p = TICKS[bi - lv]
            atb[p] = old_b.get(p) or self._size(m, lv)
        atl: dict[float, float] = {}
        for lv in range(DEPTH):
            if li + lv >= len(TICKS):
                break
            p = TICKS[li + lv]
            atl[p] = old_l.get(p) or self._size(m, lv)
        if atb != rb.atb or atl != rb.atl:
            rb.atb, rb.atl = atb, atl
            self._mark(m).runners.add(rb.key)

    def _rebuild_all(self, m: _Market, fresh: bool = False) -> None:
        for i, sid in enumerate(m.runner_ids):
            if sid in m.removed_ids or m.probs[i] <= 0:
                continue
            target = self._target_back_idx(m.probs[i])
            if fresh or target != m.back_idx[i] or m.lay_idx[i] != target + 1:
                m.back_idx[i] = target
                m.lay_idx[i] = target + 1
                self._rebuild(m, i, fresh)

    def _random_update(self, m: _Market) -> None:
        rng = self.rng
        active = [i for i, sid in enumerate(m.runner_ids) if sid not in m.removed_ids and m.probs[i] > 0]
        if not active:
            return
        i = rng.choice(active)
        r = rng.random()
        if r < 0.55:
            self._size_change(m, i)
        elif r < 0.85:
            self._price_move(m, i)
        else:
            self._trade(m, i)

    def _size_change(self, m: _Market, i: int) -> None:
        rb = m.book.runners[(m.runner_ids[i], None)]
        side = rb.atb if self.rng.random() < 0.5 else rb.atl
        if not side:
            return
        prices = sorted(side, reverse=side is rb.atb)
        level = min(int(self.rng.expovariate(0.6)), len(prices) - 1)
        side[prices[level]] = self._size(m, level)
        self._mark(m).runners.add(rb.key)

    def _price_move(self, m: _Market, i: int) -> None:
        ev = m.event
        sigma = 0.08 if ev.phase == IN_PLAY else 0.03
        p = m.probs[i]
        logit = math.log(p / (1 - p)) + self.rng.gauss(0, sigma)
        if ev.phase == IN_PLAY and ev.sport == "1":
            # time decay: the draw / under firm up while the score stands
            if m.market_type == "MATCH_ODDS":
                h, a = ev.score
                leader = 2 if h == a else 0 if h > a else 1
                if i == leader:
                    logit += 0.02
            elif i == 0 and sum(ev.score) < 3:
                logit += 0.02
        m.probs[i] = 1 / (1 + math.exp(-logit))
        self._normalise(m)
        self._rebuild_all(m)

    def _trade(self, m: _Market, i: int) -> None:
        rng = self.rng
        rb = m.book.runners[(m.runner_ids[i], None)]
        back_side = rng.random() < 0.5
        side = rb.atb if back_side else rb.atl
        if not side:
            return
        price = max(side) if back_side else min(side)
        avail = side[price]
        amount = num(min(avail, max(2.0, rng.lognormvariate(math.log(m.liquidity / 8), 1.0))))
        rb.trd[price] = num(rb.trd.get(price, 0) + amount)
        rb.tv = num((rb.tv or 0) + amount)
        rb.ltp = price
        m.book.tv = num((m.book.tv or 0) + amount)
        left = num(avail - amount)
        if left >= 2:
            side[price] = left
        else:
            # level taken out: the best price moves one tick away from the spread
            del side[price]
            if back_side:
                m.back_idx[i] = max(m.back_idx[i] - 1, 0)
            else:
                m.lay_idx[i] = min(m.lay_idx[i] + 1, len(TICKS) - 1)
            self._rebuild(m, i)
        d = self._mark(m)
        d.runners.add(rb.key)
        d.tv = True
