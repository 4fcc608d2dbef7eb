"""A local Betfair sports-data stream serving cricket scores (plain TCP, 127.0.0.1 by default).

Betfair serves race (TPD) and cricket data from its own endpoint,
``sports-data-stream-api.betfair.com``, with the Exchange Stream API's
protocol (CRLF-terminated compact JSON); this server speaks that protocol
for the cricket subscription, so :mod:`feed.sources.betfair_cricket` can be
exercised end to end over a real socket:

- on accept ``{"op":"connection","connectionId":"sim-…"}``; ``authentication``
  with the configured app key and a live session (the configured
  ``session_token`` or one issued by the simulated SSO when ``sessions`` is
  shared with an :class:`~feed.simulator.esa_server.Simulator`) → ``status``
  SUCCESS (else FAILURE NO_APP_KEY / INVALID_APP_KEY / NO_SESSION /
  INVALID_SESSION_INFORMATION and a close); nothing within
  ``auth_timeout_s`` → FAILURE TIMEOUT; ``heartbeat`` → SUCCESS; any op
  before authentication → NOT_AUTHORIZED; an op other than
  ``cricketSubscription`` → INVALID_REQUEST;
- ``cricketSubscription`` (``op`` and ``id``, as betfairlightweight sends it;
  ``heartbeatMs`` clamped 500–30000, default 5000) → ``status`` SUCCESS, then
  ``{"op":"ccm","id","initialClk","clk","heartbeatMs","pt","ct":"SUB_IMAGE"[,"cc"]}``
  with every match's current state (one ``cc`` entry per match, its latest
  ``fixtureInfo``, ``homeTeam``, ``awayTeam``, ``matchStats`` …; no ``cc``
  when there is no match), then one ``ccm`` per upstream change
  (``clk``, ``pt`` = the server's clock, ``cc`` = the entries as the upstream
  sent them: only the parts that changed), and ``ct: HEARTBEAT`` (``clk``,
  ``pt``) after ``heartbeatMs`` without a message;
- resubscribe with ``initialClk`` + ``clk`` → ``RESUB_DELTA`` carrying the
  current state of each match that changed after that ``clk`` (no ``cc``
  when none did); tokens this server did not issue, or ahead of it →
  FAILURE INVALID_CLOCK and a close.

Upstream: a recorded ``ccm`` stream (``replay``: files or folders, e.g.
``../shared/data/betfair-stream/flumine/sportsdata``), paced by its ``pt``
at ``speed`` (``None``: as fast as the clients read) like the market
replay, or, without one, a synthetic T20 match (``matches`` of them)
progressing ball by ball every ``ball_ms``, deterministic for a ``seed``.
The upstream starts with the first subscription (``start_on_subscribe``),
so a client sees the whole match.

Fault switches: :meth:`CricketSimulator.drop_connections`,
:meth:`~CricketSimulator.freeze`, :meth:`~CricketSimulator.set_degraded`,
:meth:`~CricketSimulator.inject_malformed`.

Run alone: ``python -m feed.simulator.cricket_server [--port 9446] [--replay PATH…] [--speed N|max]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from collections.abc import Iterator
from typing import Any

import msgspec
import orjson

from feed.simulator.betfair_api import Sessions
from feed.simulator.esa_line import SportsConn, SportsDataServer, serve_until_interrupted
from feed.simulator.esa_line import now_ms as _now_ms
from feed.sources.replay import read_messages, recording_files

__all__ = ["CricketSimConfig", "CricketSimulator", "synthetic_matches"]

logger = logging.getLogger(__name__)

_MALFORMED = (b'{"op":"ccm","id":1,"clk":"AAAA","pt":16576', b"this is not json")


class CricketSimConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Settings.

    host, port: where to listen (0 = ephemeral; read ``CricketSimulator.port``).
    app_key, session_token: the credentials accepted. replay: recorded ``ccm``
    files/folders (served instead of the synthetic match). speed: pacing
    multiplier over the recorded ``pt`` gaps (``None`` = as fast as clients
    read). seed / matches / ball_ms: the synthetic matches. start_on_subscribe:
    the upstream starts with the first subscription (else at ``start()``).
    auth_timeout_s: close a connection not authenticated by then (ESA: 15).
    tick_ms: heartbeat check interval.
    """

    host: str = "127.0.0.1"
    port: int = 0
    app_key: str = "sim-app-key"
    session_token: str = "sim-session"
    replay: tuple[str, ...] = ()
    speed: float | None = 1.0
    seed: int | None = None
    matches: int = 1
    ball_ms: int = 500
    start_on_subscribe: bool = True
    auth_timeout_s: float = 15.0
    tick_ms: int = 20


class _Conn(SportsConn):
    MALFORMED = _MALFORMED
    __slots__ = ()


class CricketSimulator(SportsDataServer[_Conn]):
    """The local sports-data (cricket) stream. ``await start()``, use ``port``, ``await stop()``.

    sessions: the session registry to accept (share an ESA simulator's, whose
    SSO issues them); default: the configured ``session_token`` only.

    For tests: ``subscriptions`` (every ``cricketSubscription`` received,
    decoded), ``connections_accepted``, ``matches`` (event id → the merged
    ``cc`` entry of each match, what a SUB_IMAGE carries), ``messages_sent``
    (upstream changes published), ``done`` (set when the upstream ran out).
    """

    subscription_op = "cricketSubscription"
    change_op, change_key = "ccm", "cc"
    label = "cricket simulator"
    conn_class = _Conn

    def __init__(self, config: CricketSimConfig | None = None, *, sessions: Sessions | None = None) -> None:
        self.config = config or CricketSimConfig()
        self._init_lines()
        self.sessions = sessions or Sessions(None, fixed=(self.config.session_token,))
        self._init_sports()
        self.port = 0
        self.matches: dict[str, dict[str, Any]] = {}
        self.done = asyncio.Event()
        self._changed_at: dict[str, int] = {}  # event id -> seq of its last change
        self._frozen = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.replay:
            recording_files(cfg.replay)  # FileNotFoundError now, not in the task
        self._server = await asyncio.start_server(self._handle, cfg.host, cfg.port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._heartbeats(), name="cricket-sim-heartbeats"))
        self._tasks.append(asyncio.create_task(self._upstream(), name="cricket-sim-upstream"))
        if not cfg.start_on_subscribe:
            self._started.set()
        mode = (f"replay of {len(cfg.replay)} path(s) at speed {cfg.speed or 'max'}" if cfg.replay
                else f"{cfg.matches} synthetic T20 match(es), a ball every {cfg.ball_ms} ms")
        logger.info("cricket simulator (sports-data stream) listening on %s:%d (%s)", cfg.host, self.port, mode)

    # -- fault switches ---------------------------------------------------------------

    def freeze(self, on: bool = True) -> None:
        """Hold the upstream (no changes; heartbeats go on) or let it go."""
        self._frozen = on
        if on:
            self._thawed.clear()
        else:
            self._thawed.set()

    # -- connections -----------------------------------------------------------------------

    def _subscribe(self, conn: _Conn, req: dict[str, Any]) -> None:
        ok, since = self._accept(conn, req)
        if not ok:
            return
        changed = [eid for eid in self.matches if since is None or self._changed_at.get(eid, 0) > since]
        self._reply(conn, since is not None, [self.matches[eid] for eid in changed])
        logger.info("cricket simulator: %s subscribed (%s, %d match(es) sent)", conn.connection_id,
                    "new" if since is None else "resumed", len(changed))

    # -- messages ------------------------------------------------------------------------------

    def publish(self, cc: list[dict[str, Any]]) -> None:
        """One upstream change: ``cc`` entries (each ``eventId`` + the parts
        that changed) merged into the matches and sent to every subscriber."""
        if not cc:
            return
        for entry in cc:
            eid = str(entry.get("eventId"))
            merged = self.matches.setdefault(eid, {})
            merged.update(entry)  # a part present replaces that part (betfairlightweight's cache does the same)
            self._changed_at[eid] = self.seq + 1  # the clk of the line below
        self._broadcast(cc)

    # -- upstreams -------------------------------------------------------------------------------

    async def _upstream(self) -> None:
        await self._started.wait()
        try:
            if self.config.replay:
                await self._replay()
            else:
                await self._synthetic()
        finally:
            self.done.set()

    async def _replay(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        first_pt: int | None = None
        t0 = 0.0
        count = 0
        for pt, cc in recorded_changes(cfg.replay):
            await self._thawed.wait()
            if cfg.speed is not None:
                if first_pt is None:
                    first_pt, t0 = pt, loop.time()
                delay = t0 + (pt - first_pt) / 1000 / cfg.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.publish(cc)
            count += 1
            if cfg.speed is None and count % 32 == 0:
                await self._drain_clients()
        logger.info("cricket simulator: replay finished (%d messages, %d matches)", count, len(self.matches))

    async def _synthetic(self) -> None:
        for cc in synthetic_matches(self.config.seed, self.config.matches, _now_ms()):
            await self._thawed.wait()
            await asyncio.sleep(self.config.ball_ms / 1000)
            await self._thawed.wait()
            self.publish(cc)
        logger.info("cricket simulator: synthetic matches finished (%d messages)", self.messages_sent)

    async def _drain_clients(self) -> None:
        """Let slow readers catch up (bounded to ~1 s), so max-speed replays keep every line."""
        await asyncio.sleep(0)
        for _ in range(1000):
            if all(c.transport.get_write_buffer_size() <= 1 << 20 for c in self._conns):
                return
            await asyncio.sleep(0.001)


def recorded_changes(paths: tuple[str, ...] | list[str]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(pt, cc)`` of each ``ccm`` line with a ``cc`` list in the recordings
    (files in order; other ops and unreadable lines skipped)."""
    for path in recording_files(paths):
        pt = 0
        for raw in read_messages(path) or ():
            try:
                msg = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(msg, dict) or msg.get("op") != "ccm" or not isinstance(msg.get("cc"), list):
                continue
            if isinstance(msg.get("pt"), int):
                pt = msg["pt"]
            yield pt, msg["cc"]


# -- the synthetic match --------------------------------------------------------------------------

_TEAMS = ("Netherlands", "Papua New Guinea", "Scotland", "Namibia", "Ireland", "Nepal", "Oman", "Canada",
          "Kenya", "Uganda", "Hong Kong", "United Arab Emirates")
_RUNS = (0, 1, 2, 3, 4, 6)
_RUN_WEIGHTS = (34, 38, 9, 1, 12, 6)
_WICKET_P = 0.05
_BALLS = 120  # a T20 innings: 20 overs


def _overs(balls: int) -> str:
    return f"{balls // 6}.{balls % 6}"


def synthetic_matches(seed: int | None, matches: int, now_ms: int) -> Iterator[list[dict[str, Any]]]:
    """The ``cc`` entries of ``matches`` T20 matches played ball by ball (all
    matches advance together, one ``ccm`` per step): pre-match fixture, in
    running with ``matchStats`` after every ball (``BALL_IN_PROGRESS`` then
    ``MATCH_STABLE`` as Betfair alternates them), innings break, the chase
    (ends when the target is passed), ``FINISHED`` / ``MATCH_COMPLETE``, then
    ``EVENT_CLOSED``. Field names and shapes are the real stream's;
    deterministic for a ``seed``."""
    rng = random.Random(seed)
    games = []
    teams = list(_TEAMS)
    rng.shuffle(teams)
    for i in range(max(matches, 1)):
        home, away = teams[(2 * i) % len(teams)], teams[(2 * i + 1) % len(teams)]
        event_id = str(32_000_000 + rng.randrange(1_000_000))
        games.append(_Game(rng, event_id, f"1.2{rng.randrange(10**8):08d}", home, away, now_ms))
    while True:
        cc = [entry for g in games if (entry := g.step()) is not None]
        if not cc:
            return
        yield cc


class _Game:
    """One synthetic T20 match; :meth:`step` gives its next ``cc`` entry (None when over)."""

    def __init__(self, rng: random.Random, event_id: str, market_id: str, home: str, away: str,
                 now_ms: int) -> None:
        self.rng = rng
        self.event_id, self.market_id = event_id, market_id
        self.home, self.away = home, away
        self.start_ms = now_ms + 60_000
        bat_first = home if rng.random() < 0.5 else away
        self.order = (bat_first, away if bat_first == home else home)
        self.toss = f"{bat_first} won the toss and have elected to bat first"
        self.innings: list[dict[str, Any]] = [{"inningsNum": n, "inningsRuns": 0, "inningsOvers": "0.0", "inningsWickets": 0}
                        for n in (1, 2, 3, 4)]
        self.current = 0  # 0 = not started
        self.balls = 0
        self.phase = "pre"
        self.pause = 2  # steps before the start / between innings
        self.stable = True

    def _fixture(self, status: str, event_status: str) -> dict[str, Any]:
        return {"homeTeam": self.home, "awayTeam": self.away, "expectedStartTime": self.start_ms,
                "fixtureStatus": status,
                "eventDescription": f"{self.home} v {self.away}, T20", "maxOvers": 20, "eventStatus": event_status}

    def _entry(self, **parts: Any) -> dict[str, Any]:
        return {"eventId": self.event_id, "marketId": self.market_id, **parts}

    def _stats(self) -> dict[str, Any]:
        return {"currentInnings": self.current, "tossResult": self.toss,
                "inningsStats": [dict(inn) for inn in self.innings]}

    def _open_innings(self, n: int) -> None:
        self.current, self.balls = n, 0
        bat, bowl = self.order[n - 1], self.order[2 - n]
        self.innings[n - 1].update(battingTeam=bat, bowlingTeam=bowl)

    def step(self) -> dict[str, Any] | None:
        if self.phase == "pre":
            if self.pause == 2:
                self.pause -= 1
                return self._entry(fixtureInfo=self._fixture("PRE_MATCH", "MATCH_SCHEDULED"),
                                   homeTeam={"name": self.home, "selectionId": 200_000 + int(self.event_id) % 1000},
                                   awayTeam={"name": self.away, "selectionId": 300_000 + int(self.event_id) % 1000})
            self.phase = "play"
            self._open_innings(1)
            return self._entry(fixtureInfo=self._fixture("IN_RUNNING", "MATCH_STABLE"), matchStats=self._stats())
        if self.phase == "break":
            self.phase = "play"
            self._open_innings(2)
            return self._entry(fixtureInfo=self._fixture("IN_RUNNING", "MATCH_STABLE"), matchStats=self._stats())
        if self.phase == "finished":
            self.phase = "closed"
            return self._entry(fixtureInfo=self._fixture("FINISHED", "EVENT_CLOSED"))
        if self.phase == "closed":
            return None
        inn = self.innings[self.current - 1]
        if self.rng.random() < _WICKET_P:
            inn["inningsWickets"] += 1
        else:
            inn["inningsRuns"] += self.rng.choices(_RUNS, _RUN_WEIGHTS)[0]
        self.balls += 1
        inn["inningsOvers"] = _overs(self.balls)
        self.stable = not self.stable
        over = self.balls >= _BALLS or inn["inningsWickets"] >= 10
        chased = self.current == 2 and inn["inningsRuns"] > self.innings[0]["inningsRuns"]
        if self.current == 1 and over:
            self.phase = "break"
        elif self.current == 2 and (over or chased):
            self.phase = "finished"
            return self._entry(fixtureInfo=self._fixture("FINISHED", "MATCH_COMPLETE"), matchStats=self._stats())
        return self._entry(fixtureInfo=self._fixture("IN_RUNNING", "MATCH_STABLE" if self.stable
                                                     else "BALL_IN_PROGRESS"), matchStats=self._stats())


def main(argv: list[str] | None = None) -> None:
    """``python -m feed.simulator.cricket_server``: serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m feed.simulator.cricket_server",
                                     description="a local Betfair sports-data stream serving cricket scores")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9446)
    parser.add_argument("--replay", nargs="+", metavar="PATH", help="recorded ccm files/folders (default: synthetic)")
    parser.add_argument("--speed", default="1", help="recorded pacing multiplier, or 'max'")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--matches", type=int, default=1)
    parser.add_argument("--ball-ms", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = CricketSimConfig(host=args.host, port=args.port, replay=tuple(args.replay or ()),
                              speed=None if args.speed == "max" else float(args.speed), seed=args.seed,
                              matches=args.matches, ball_ms=args.ball_ms)

    serve_until_interrupted(CricketSimulator(config), "cricket simulator (Betfair sports-data stream)", "betfair-cricket")


if __name__ == "__main__":
    main()
