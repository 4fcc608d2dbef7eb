"""Event state from every provider: each normaliser on its provider's real protocol (hand-written
bodies in the provider's shape, and the simulators speaking it over real sockets), and each source end
to end — simulator → real source → pipeline → embedded Redis — ending equal to what the provider said.

Pinnacle: live scores on ``/v2/odds`` events, ``/v1/fixtures/settled`` results (moneyline, spreads with
Asian quarter lines, totals, pushes, cancellations, team1/team2 from ``/v2/leagues``). The Odds API:
``/v4/sports/{sport}/scores``. Push format: ``scores`` messages, ``fixture-status``, snapshot ``scores``,
odd ``void_factor`` / ``dead_heat_factor``. UOF: ``sport_event_status`` in ``odds_change``,
``bet_settlement`` factors (with a private RabbitMQ node; skips without ``rabbitmq-server``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from feed.models import EventState, Market, PeriodScore, Score, TeamCounts
from feed.normalise.pinnacle import PinnacleNormaliser, channel, line_result, selection_result
from feed.normalise.push import PushNormaliser
from feed.normalise.theoddsapi import TheOddsApiNormaliser
from feed.normalise.uof import UofNormaliser, clock_seconds
from feed.pipeline import Pipeline, run_spec
from feed.settings import Settings
from feed.sources.spec import parse_source_spec
from feed.store import Store
from tests.poller_helpers import FAST, converge, eventually, poller, providers
from tests.rabbitmq import rabbitmq_url  # noqa: F401 - the session fixture (uof)
from tests.streaming_helpers import cancel_and_wait

pytestmark = pytest.mark.timeout(180)

T0 = 1_718_000_000_000
ISO0 = "2024-06-10T06:13:20Z"  # T0


async def states_of(store: Store, source: str) -> dict[str, EventState]:
    return {es.event_id: es for es in await store.load_event_states(source)}


# --- Pinnacle: results -------------------------------------------------------------------------------


def test_line_results() -> None:
    assert line_result(1) == ("WINNER", None) and line_result(-2) == ("LOSER", None)
    assert line_result(0) == ("VOID", 1.0)  # a push: the stake back
    assert line_result(0.25) == ("WINNER", 0.5)  # half won, half pushed
    assert line_result(-0.25) == ("LOSER", 0.5)  # half lost, half pushed
    assert line_result(0.75) == ("WINNER", None) and line_result(-0.75) == ("LOSER", None)
    assert line_result(0.5) == ("WINNER", None)
    # 2-1: home -0.25 wins whole, home -1 pushes, home -1.25 loses half; over 3 pushes, over 2.75 half wins
    assert selection_result("spread", "home", "-0.25", 2, 1, False) == ("WINNER", None)
    assert selection_result("spread", "home", "-1", 2, 1, False) == ("VOID", 1.0)
    assert selection_result("spread", "away", "-1.25", 2, 1, False) == ("WINNER", 0.5)
    assert selection_result("spread", "home", "-1.25", 2, 1, False) == ("LOSER", 0.5)
    assert selection_result("total", "over", "3", 2, 1, False) == ("VOID", 1.0)
    assert selection_result("total", "over", "2.75", 2, 1, False) == ("WINNER", 0.5)
    assert selection_result("total", "under", "2.75", 2, 1, False) == ("LOSER", 0.5)
    assert selection_result("moneyline", "draw", None, 1, 1, True) == ("WINNER", None)
    assert selection_result("moneyline", "home", None, 1, 1, True) == ("LOSER", None)  # 3-way: a draw loses
    assert selection_result("moneyline", "home", None, 1, 1, False) == ("VOID", 1.0)  # 2-way tie: void


def _pn_feed(n: PinnacleNormaliser, endpoint: str, body: dict[str, Any], recv_ms: int, *,
             snapshot: bool = False) -> Any:
    return n.feed(orjson.dumps(body), recv_ms, channel(endpoint, body.get("sportId", 29), snapshot=snapshot))


def _pn_match(n: PinnacleNormaliser, league: int = 1980, sport: int = 29) -> None:
    """Pre-match event 100, live event 200 (parent 100), odds: moneyline, spread -0.25 and -1, total 2.75."""
    fixtures = {"sportId": sport, "last": 10, "league": [{"id": league, "name": "L", "events": [
        {"id": 100, "starts": ISO0, "home": "Arsenal", "away": "Chelsea", "liveStatus": 2},
        {"id": 200, "parentId": 100, "starts": ISO0, "home": "Arsenal", "away": "Chelsea", "liveStatus": 1}]}]}
    _pn_feed(n, "fixtures", fixtures, T0, snapshot=True)
    odds = {"sportId": sport, "last": 20, "leagues": [{"id": league, "events": [
        {"id": 200, "homeScore": 1.0, "awayScore": 0.0, "homeRedCards": 0, "awayRedCards": 1, "periods": [
            {"number": 0, "status": 1, "lineId": 5, "moneylineUpdatedAt": ISO0,
             "moneyline": {"home": 1.5, "draw": 4.0, "away": 6.0},
             "spreads": [{"hdp": -0.25, "home": 1.9, "away": 1.9}, {"hdp": -1.0, "home": 2.5, "away": 1.5}],
             "totals": [{"points": 2.75, "over": 1.8, "under": 2.0}]}]}]}]}
    return _pn_feed(n, "odds", odds, T0 + 10, snapshot=True)


def test_pinnacle_live_scores_and_a_bad_score_alone() -> None:
    n = PinnacleNormaliser("pn")
    batch = _pn_match(n)
    (es,) = batch.event_states
    assert (es.event_id, es.status, es.in_play) == ("pn:100", "LIVE", True)  # the parent id, as the markets
    assert es.score == Score(home=1, away=0) and es.red_cards == TeamCounts(home=0, away=1)
    assert es.source_ts == T0  # the event's newest *UpdatedAt
    assert {u.market_id for u in batch.updates} >= {"pn:100:0:moneyline", "pn:100:0:spread:-0.25"}
    bad = {"sportId": 29, "last": 21, "leagues": [{"id": 1980, "events": [
        {"id": 200, "homeScore": 1.5, "awayScore": 0.0, "periods": [
            {"number": 0, "status": 1, "lineId": 6, "moneylineUpdatedAt": "2024-06-10T06:13:21Z",
             "moneyline": {"home": 1.4, "draw": 4.2, "away": 6.5}}]}]}]}
    batch = _pn_feed(n, "odds", bad, T0 + 2000)
    assert [(e.reason, e.event_id) for e in batch.rejected] == [("invalid_number", "pn:100")]
    assert batch.event_states == [] and "pn:100:0:moneyline" in {u.market_id for u in batch.updates}


def test_pinnacle_settlement_results_every_market_of_the_period() -> None:
    n = PinnacleNormaliser("pn")
    _pn_match(n)
    settled = {"sportId": 29, "last": 30, "leagues": [{"id": 1980, "events": [{"id": 200, "periods": [
        {"number": 0, "status": 1, "settlementId": 7, "settledAt": "2024-06-10T08:00:00Z",
         "team1Score": 2, "team2Score": 1},
        {"number": 1, "status": 1, "settlementId": 8, "settledAt": "2024-06-10T07:00:00Z",
         "team1Score": 1, "team2Score": 0}]}]}]}
    batch = _pn_feed(n, "settled", settled, T0 + 7_300_000)
    got = {u.market_id: (u.header.status if u.header else None,
                         {s.selection_id: (s.status, s.void_factor) for s in u.selections}) for u in batch.updates}
    assert got["pn:100:0:moneyline"] == ("SETTLED", {"home": ("WINNER", None), "draw": ("LOSER", None),
                                                     "away": ("LOSER", None)})
    assert got["pn:100:0:spread:-0.25"] == ("SETTLED", {"home": ("WINNER", None), "away": ("LOSER", None)})
    assert got["pn:100:0:spread:-1"] == ("SETTLED", {"home": ("VOID", 1.0), "away": ("VOID", 1.0)})
    assert got["pn:100:0:total:2.75"] == ("SETTLED", {"over": ("WINNER", 0.5), "under": ("LOSER", 0.5)})
    (es,) = batch.event_states
    assert (es.status, es.in_play) == ("CLOSED", False)
    assert es.score == Score(home=2, away=1, periods=[PeriodScore(period="1h", home=1, away=0)])
    assert es.red_cards == TeamCounts(home=0, away=1)  # kept from the live feed
    assert batch.cursor is not None and '"settled":{"29":30}' in batch.cursor
    # the settlement again (a replayed answer): nothing; later odds never reopen a settled market
    assert _pn_feed(n, "settled", settled, T0 + 7_400_000).updates == []
    odds = {"sportId": 29, "last": 40, "leagues": [{"id": 1980, "events": [{"id": 200, "periods": [
        {"number": 0, "status": 2, "lineId": 9, "moneylineUpdatedAt": "2024-06-10T08:30:00Z",
         "moneyline": {"home": 1.1, "draw": 9.0, "away": 20.0}}]}]}]}
    assert _pn_feed(n, "odds", odds, T0 + 8_300_000).updates == []


def test_pinnacle_team2_home_leagues_and_cancellations() -> None:
    n = PinnacleNormaliser("pn")
    n.feed(orjson.dumps({"leagues": [{"id": 487, "name": "NBA", "homeTeamType": "Team2"}]}), T0,
           channel("leagues", 4, snapshot=True))
    _pn_match(n, league=487, sport=4)
    settled = {"sportId": 4, "last": 30, "leagues": [{"id": 487, "events": [{"id": 100, "periods": [
        {"number": 0, "status": 1, "settlementId": 7, "settledAt": ISO0, "team1Score": 99, "team2Score": 104},
        {"number": 3, "status": 3, "settlementId": 9, "settledAt": ISO0}]}]}]}
    batch = _pn_feed(n, "settled", settled, T0 + 100)
    (es,) = batch.event_states
    assert es.score is not None and (es.score.home, es.score.away) == (104, 99)  # team2 is the home side
    ml = next(u for u in batch.updates if u.market_id == "pn:100:0:moneyline")
    assert {s.selection_id: s.status for s in ml.selections} == {"home": "WINNER", "draw": "LOSER", "away": "LOSER"}
    # a cancelled period: its markets CANCELLED, every selection void (none here: no period-3 lines)
    cancel = {"sportId": 4, "last": 31, "leagues": [{"id": 487, "events": [{"id": 100, "periods": [
        {"number": 0, "status": 4, "settlementId": 11, "settledAt": ISO0}]}]}]}
    batch = _pn_feed(n, "settled", cancel, T0 + 200)
    ml = next(u for u in batch.updates if u.market_id == "pn:100:0:moneyline")
    assert ml.header is not None and ml.header.status == "CANCELLED"
    assert {(s.status, s.void_factor) for s in ml.selections} == {("VOID", 1.0)}
    assert batch.event_states[0].status == "CANCELLED"
    bad = {"sportId": 4, "last": 32, "leagues": [{"id": 487, "events": [
        {"id": 300, "periods": [{"number": 0, "status": 1, "settlementId": 12, "team1Score": -1, "team2Score": 2}]},
        {"id": "x"}]}]}
    batch = _pn_feed(n, "settled", bad, T0 + 300)
    assert sorted((e.reason, e.event_id) for e in batch.rejected) == [("invalid_number", "pn:300"),
                                                                     ("invalid_schema", None)]


async def test_pinnacle_scores_and_results_end_to_end(redis_url: str) -> None:
    """A fast simulator (2400×): live scores reach the store while matches run; every settlement a
    client read ends as a CLOSED state with the model's final score, and the period's markets SETTLED
    with results that agree with it (moneyline winner = the side ahead)."""
    from feed.simulator.http_providers import PINNACLE

    store = await Store.open(redis_url)
    try:
        async with providers(time_scale=2400.0) as sim, poller(
                "pinnacle", store, f"pinnacle={sim.url},user=demo,password=demo,sports=29+33+4,"
                f"fixtures_interval_s=0.3,settled_interval_s=0.2,{FAST}") as (src, _task):
            await eventually(lambda: len(sim.pn_settled_served) >= 3, 60, "three settlements read")
            markets = await converge(store, sim, PINNACLE, "pinnacle", timeout_s=30)
            truth = sim.score_truth(PINNACLE)
            stored = await states_of(store, "pinnacle")
            assert truth
            for eid, want in truth.items():
                es = stored.get(eid)
                assert es is not None, eid
                assert es.status == "CLOSED" and es.score is not None, (eid, es)
                assert (es.score.home, es.score.away) == (want["home"], want["away"]), (eid, es.score, want)
                ml = markets.get(f"{eid}:0:moneyline")
                if ml is not None:
                    assert ml.status == "SETTLED"
                    winners = {s.selection_id for s in ml.selections if s.status == "WINNER"}
                    side = "home" if want["home"] > want["away"] else "away" if want["away"] > want["home"] else "draw"
                    assert winners == {side}, (eid, want, ml.selections)
            # live scores (with red cards) went through the log while matches were on
            logged = [s for _, ss in await store.read_event_state_log("0-0") for s in ss if s.source == "pinnacle"]
            assert any(s.status == "LIVE" and s.score is not None and s.red_cards is not None for s in logged)
            assert "/v2/leagues" in {r.path for r in sim.requests}
    finally:
        await store.close()


# --- The Odds API: /scores -----------------------------------------------------------------------------------


def test_theoddsapi_scores_body() -> None:
    n = TheOddsApiNormaliser("toa")
    body = [
        {"id": "aaa", "sport_key": "soccer_epl", "commence_time": ISO0, "completed": False, "home_team": "A",
         "away_team": "B", "scores": [{"name": "B", "score": "1"}, {"name": "A", "score": "2"}],
         "last_update": ISO0},
        {"id": "bbb", "sport_key": "soccer_epl", "commence_time": ISO0, "completed": True, "home_team": "C",
         "away_team": "D", "scores": [{"name": "C", "score": "0"}, {"name": "D", "score": "0"}],
         "last_update": ISO0},
        {"id": "ccc", "sport_key": "soccer_epl", "commence_time": "2030-01-01T00:00:00Z", "completed": False,
         "home_team": "E", "away_team": "F", "scores": None, "last_update": None},
        {"id": "ddd", "sport_key": "soccer_epl", "completed": False, "home_team": "G", "away_team": "H",
         "scores": [{"name": "G", "score": "two"}, {"name": "H", "score": "1"}]},
    ]
    batch = n.feed(orjson.dumps(body), T0 + 1000, "scores:soccer_epl")
    got = {s.event_id: (s.status, s.in_play, s.score) for s in batch.event_states}
    assert got == {"toa:aaa": ("LIVE", True, Score(home=2, away=1)), "toa:bbb": ("ENDED", False, Score(home=0, away=0))}
    assert [(e.reason, e.event_id) for e in batch.rejected] == [("invalid_number", "toa:ddd")]
    assert batch.requests == ["scores:soccer_epl"]  # an event still in play: more scores wanted
    assert n.feed(orjson.dumps(body), T0 + 2000, "scores:soccer_epl").event_states == []  # nothing new
    cricket = [{"id": "eee", "sport_key": "cricket_t20", "completed": False, "home_team": "Netherlands",
                "away_team": "PNG", "scores": [{"name": "Netherlands", "score": "163/7"}]}]
    batch = n.feed(orjson.dumps(cricket), T0, "scores:cricket_t20")
    assert [e.reason for e in batch.rejected] == ["invalid_schema"]  # one side missing
    with pytest.raises(Exception):
        n.feed(orjson.dumps(body), T0, "scores:basketball_nba")  # another sport's scores: rejected whole
    cricket[0]["scores"] = [{"name": "Netherlands", "score": "163/7"}, {"name": "PNG", "score": "111"}]
    (es,) = n.feed(orjson.dumps(cricket), T0, "scores:cricket_t20").event_states
    assert es.score == Score(home=163, away=111)


async def test_theoddsapi_scores_end_to_end(redis_url: str) -> None:
    """The poller asks for /scores of the sports with events in play (and keeps asking until they
    complete); the stored states end equal to every score it read."""
    from feed.simulator.http_providers import TOA

    store = await Store.open(redis_url)
    try:
        async with providers(time_scale=2400.0) as sim, poller(
                "theoddsapi", store, f"theoddsapi={sim.url},api_key=demo,sport=upcoming,{FAST}") as (src, _task):
            await eventually(lambda: sum(1 for done, _, _ in sim.toa_scores_served.values() if done) >= 2, 60,
                             "two completed scores read")
            assert any("/scores" in r.path and r.query.get("daysFrom") == "1" for r in sim.requests)
            sim.freeze()
            await asyncio.sleep(0.5)  # the polls in flight answer

            async def same() -> bool:
                truth = sim.score_truth(TOA)
                stored = await states_of(store, "theoddsapi")
                return bool(truth) and all(
                    eid in stored and stored[eid].status == want["status"] and stored[eid].score is not None
                    and (stored[eid].score.home, stored[eid].score.away) == (want["home"], want["away"])
                    for eid, want in truth.items())
            await eventually(same, 20, "stored scores == the scores served")
    finally:
        await store.close()


# --- push format: scores -------------------------------------------------------------------------------------


def _push(type_: str, n: int, **body: Any) -> bytes:
    return orjson.dumps({"type": type_, "entry_id": f"{T0 + n}-{n}", "seq": n, "emitted_at": T0 + 10 * n, **body})


def test_push_scores_messages() -> None:
    n = PushNormaliser("px")
    item = {"fixture_id": "f1", "status": "live", "period": "2H",
            "clock": {"seconds": 3120, "running": True, "stoppage_seconds": 60},
            "score": {"home": 1, "away": 0, "periods": [{"period": "1h", "home": 1, "away": 0}]},
            "red_cards": {"home": 0, "away": 1}, "timestamp": (T0 + 5) / 1000}
    bad = {"fixture_id": "f2", "status": "live", "score": {"home": -1, "away": 0}}
    batch = n.feed(_push("scores", 1, data=[item, bad, {"no": "id"}]), T0 + 10)
    (es,) = batch.event_states
    assert (es.event_id, es.status, es.in_play, es.period) == ("px:f1", "LIVE", True, "2h")
    assert es.clock is not None and (es.clock.seconds, es.clock.running, es.clock.at, es.clock.stoppage_s) == \
        (3120, True, T0 + 5, 60)
    assert es.score == Score(home=1, away=0, periods=[PeriodScore(period="1h", home=1, away=0)])
    assert es.red_cards == TeamCounts(home=0, away=1)
    assert sorted((e.reason, e.event_id) for e in batch.rejected) == [("invalid_number", "px:f2"),
                                                                     ("invalid_schema", None)]
    assert batch.cursor == f"{T0 + 1}-1"
    # a goal: only the score changes (absent fields keep theirs); a fixture-status ends it
    batch = n.feed(_push("scores", 2, data=[{"fixture_id": "f1", "score": {"home": 2, "away": 0}}]), T0 + 20)
    (es,) = batch.event_states
    assert es.score == Score(home=2, away=0) and es.period == "2h" and es.clock is not None
    batch = n.feed(_push("fixture-status", 3, data={"id": "f1", "status": "settled", "is_live": False}), T0 + 30)
    (es,) = batch.event_states
    assert (es.status, es.in_play, es.score) == ("CLOSED", False, Score(home=2, away=0))
    # a snapshot carries the states too
    snap = n.feed(_push("snapshot", 3, data=[], scores=[{"fixture_id": "f9", "status": "live",
                                                         "score": {"home": 0, "away": 3}}]), T0 + 40)
    assert [(s.event_id, s.score) for s in snap.event_states] == [("px:f9", Score(home=0, away=3))]


def test_push_odds_carry_the_settlement_factors() -> None:
    n = PushNormaliser("px")
    odd = {"fixture": {"id": "r1", "sport": "Horse Racing", "name": "R1"}, "market": {"id": "place"},
           "selection": {"id": "h1"}, "price": 3.0, "status": "placed", "dead_heat_factor": 0.5}
    void = {**odd, "selection": {"id": "h2"}, "status": "void", "void_factor": 1, "dead_heat_factor": None}
    batch = n.feed(_push("odds", 1, data=[odd, void]), T0 + 10)
    (u,) = batch.updates
    assert {s.selection_id: (s.status, s.void_factor, s.dead_heat_factor) for s in u.selections} == \
        {"h1": ("PLACED", None, 0.5), "h2": ("VOID", 1.0, None)}
    batch = n.feed(_push("odds", 2, data=[{**odd, "dead_heat_factor": 0}]), T0 + 20)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("invalid_number", "px:r1:place")]


@contextlib.asynccontextmanager
async def running(store: Store, spec_text: str) -> AsyncIterator[Pipeline]:
    spec = parse_source_spec(spec_text)
    got: list[Pipeline] = []
    task = asyncio.create_task(run_spec(store, Settings(), spec, on_source=lambda s, p: got.append(p)))
    try:
        await eventually(lambda: got or task.done(), 20, "the source to start")
        if task.done():
            task.result()
        yield got[0]
    finally:
        await cancel_and_wait(task, "the source")


async def test_push_scores_end_to_end(store: Store) -> None:
    """push-ws against the push simulator (soccer and basketball in play at 2400×): the stored states end
    equal to what the stream conveyed."""
    from feed.simulator.push_providers import PushSimConfig, PushSimulator

    sim = PushSimulator(PushSimConfig(seed=7, events=10, rate_per_s=100.0, time_scale=2400.0, tick_ms=20,
                                      ping_interval_ms=500))
    await sim.start()
    try:
        async with running(store, f"push-ws={sim.url('ws')},api_key=sim-push-key,ping_interval_ms=500"):
            await eventually(lambda: sum(1 for t in sim.state_truth().values() if t["status"] == "CLOSED") >= 2,
                             60, "two matches closed on the stream")
            sim.freeze()

            async def same() -> bool:
                stored = await states_of(store, "push-ws")
                truth = sim.state_truth()
                for eid, want in truth.items():
                    es = stored.get(eid)
                    if es is None or es.score is None:
                        return False
                    got = {"status": es.status, "home": es.score.home, "away": es.score.away, "period": es.period,
                           "red_cards": (es.red_cards.home, es.red_cards.away) if es.red_cards else None}
                    if got != want:
                        return False
                return bool(truth)
            await eventually(same, 20, "stored states == the stream's")
            stored = await states_of(store, "push-ws")
            assert any(s.clock is not None and s.clock.seconds > 0 for s in stored.values())
    finally:
        await sim.stop()


# --- UOF: sport_event_status, bet_settlement factors ----------------------------------------------------


def test_uof_times() -> None:
    assert [clock_seconds(x) for x in ("23:10", "45", "0:05", None)] == [1390, 2700, 5, None]
    with pytest.raises(Exception):
        clock_seconds("x:1")


def test_uof_settlement_factors() -> None:
    n = UofNormaliser("uof")
    key = "hi.-.live.odds_change.1.sr:match.5.-"
    n.feed(b'<odds_change product="1" event_id="sr:match:5" timestamp="1718000000000"><odds>'
           b'<market id="18" specifiers="total=2.25"><outcome id="12" odds="1.9" active="1"/>'
           b'<outcome id="13" odds="1.9" active="1"/></market></odds></odds_change>', T0 + 1, key)
    batch = n.feed(b'<bet_settlement product="1" event_id="sr:match:5" timestamp="1718000000500" certainty="2">'
                   b'<outcomes><market id="18" specifiers="total=2.25"><outcome id="12" result="1" void_factor="0.5"/>'
                   b'<outcome id="13" result="0" void_factor="0.5"/></market></outcomes></bet_settlement>',
                   T0 + 600, key)
    (u,) = batch.updates
    assert {s.selection_id: (s.status, s.void_factor) for s in u.selections} == {"12": ("WINNER", 0.5),
                                                                                 "13": ("LOSER", 0.5)}
    batch = n.feed(b'<bet_settlement product="1" event_id="sr:match:5" timestamp="1718000000600" certainty="2">'
                   b'<outcomes><market id="18" specifiers="total=2.25"><outcome id="12" result="1" '
                   b'dead_heat_factor="0.5"/></market></outcomes></bet_settlement>', T0 + 700, key)
    assert [(s.status, s.dead_heat_factor) for s in batch.updates[0].selections] == [("WINNER", 0.5)]


def test_uof_simulator_bodies_carry_the_event_state() -> None:
    """The UOF simulator's own messages (no broker needed: its outbox), fed to the normaliser: every
    state it said ends stored as it said it, and a handicap push settles VOID with void_factor 1."""
    from feed.simulator.uof import UofSimConfig, UofSimulator, market_view

    sim = UofSimulator(UofSimConfig(amqp_url="amqp://unused", seed=3, events=6, live_after_s=0.0))
    n = UofNormaliser("uof")
    states: dict[str, EventState] = {}
    now = T0
    for _ in range(4000):
        sim._step()
        while sim._outbox:
            key, body, _ = sim._outbox.popleft()
            now = max(now + 1, int(body.split(b'timestamp="')[1].split(b'"')[0]) + 1)
            batch = n.feed(body, now, key)
            assert not batch.rejected, batch.rejected
            for es in batch.event_states:
                states[es.event_id] = es
    truth = sim.state_truth()
    assert sum(1 for t in truth.values() if t["status"] == "CLOSED") >= 3
    for eid, want in truth.items():
        es = states[eid]
        assert es.score is not None and (es.status, es.score.home, es.score.away) == \
            (want["status"], want["home"], want["away"]), (eid, es, want)
    live = [s for s in states.values() if s.status == "LIVE"]
    assert all(s.clock is not None and s.period in ("1h", "ht", "2h") for s in live)
    # stored markets as the normaliser holds them == the simulator's truth, pushes included
    views = {mid: market_view(_as_market(m)) for mid, m in n.markets.items()}
    voids = [mid for mid, v in sim.truth().items() if any(s["status"] == "VOID" and s["void_factor"] == 1.0
                                                          for s in v["selections"].values())]
    assert voids and all(views[mid]["selections"] == sim.truth()[mid]["selections"] for mid in voids)


def _as_market(m: Any) -> Market:
    return Market(market_id=m.market_id, source="uof", status=m.status, suspend_reason=m.reason,
                  in_play=m.event.in_play, start_time=m.event.start_time, selections=list(m.sels.values()))


async def test_uof_event_state_end_to_end(store: Store, rabbitmq_url: str) -> None:  # noqa: F811
    """A real broker: the UOF source stores each event's state as the simulator last said it."""
    from feed.simulator.uof import UofSimConfig, UofSimulator

    sim = UofSimulator(UofSimConfig(amqp_url=rabbitmq_url, seed=5, events=4, rate_per_s=60.0, tick_ms=50,
                                    alive_interval_s=0.2, live_after_s=0.5))
    await sim.start()
    try:
        spec = (f"uof={rabbitmq_url}?exchange=unifiedfeed,api={sim.api_url},token=sim-uof-token,"
                "max_inactivity_s=1,min_recovery_interval_s=0.3,backoff_initial_s=0.1,backoff_max_s=0.5")
        async with running(store, spec):
            await eventually(lambda: sum(1 for t in sim.state_truth().values() if t["status"] == "CLOSED") >= 2,
                             60, "two matches closed")
            sim.freeze()

            async def same() -> bool:
                stored = await states_of(store, "uof")
                truth = sim.state_truth()
                return bool(truth) and all(
                    (es := stored.get(eid)) is not None and es.score is not None
                    and (es.status, es.score.home, es.score.away) == (w["status"], w["home"], w["away"])
                    for eid, w in truth.items())
            await eventually(same, 20, "stored states == the simulator's")
    finally:
        await sim.stop()
