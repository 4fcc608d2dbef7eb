"""Event state (issue 12 item 3): the model, its bounds, the real Betfair ``ccm`` cricket recording,
the store's ordering rules, the ingest path (versions, rejections alone) and replay.

Real parts only: the embedded redis-server, the real normaliser on the real recordings
(``../shared/data``; those tests skip with a message when it is absent).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import orjson
import pytest

from feed.errors import FeedDecodeError
from feed.ingest import Ingest
from feed.models import (
    Clock,
    EventState,
    Innings,
    PeriodScore,
    Score,
    Selection,
    SelectionChange,
    TeamCounts,
    apply_selection_change,
    selection_change,
)
from feed.normalise.base import MarketUpdate, NormalisedBatch
from feed.normalise.betfair import BetfairNormaliser, overs_to_balls
from feed.recorder import Recorder
from feed.sources.base import Payload
from feed.sources.replay import Replay, read_messages
from feed.store import ES_LOG_KEY, Store
from feed.validate import validate_event_state, validate_update
from tests.conftest import require_shared_data

CCM = "flumine/sportsdata/1.200806927"  # Betfair's cricket score stream of Netherlands v Papua New Guinea
MATCH_ODDS = "flumine/1.200806927"  # the same match's MATCH_ODDS market
EVENT = "bf:31573045"
T0 = 1_718_000_000_000


def state(event_id: str = "px:f1", *, source: str = "s", ts: int = T0, **kw: object) -> EventState:
    return EventState(event_id=event_id, source=source, source_ts=ts, received_at=ts, **kw)  # type: ignore[arg-type]


# --- the model --------------------------------------------------------------------------------------------


def test_results_travel_through_the_selection_change_path() -> None:
    assert SelectionChange.__struct_fields__ == Selection.__struct_fields__
    old = Selection(selection_id="1", status="ACTIVE", price=2.0)
    new = msgspec.structs.replace(old, status="WINNER", void_factor=0.5, dead_heat_factor=0.5)
    change = selection_change(old, new)
    assert change is not None and change.void_factor == 0.5 and change.dead_heat_factor == 0.5
    assert "price" not in msgspec.to_builtins(change)  # only what changed
    assert apply_selection_change(old, change) == new


def test_validate_event_state_bounds() -> None:
    good = state(status="LIVE", in_play=True, period="2h",
                 clock=Clock(seconds=3120, running=True, at=T0, stoppage_s=60),
                 score=Score(home=1, away=0, periods=[PeriodScore(period="1h", home=1, away=0)]),
                 red_cards=TeamCounts(home=0, away=1),
                 innings=[Innings(number=1, team="home", runs=163, wickets=7, balls=120)])
    validate_event_state(good, T0)
    bad = {
        "invalid_number": [msgspec.structs.replace(good, score=Score(home=-1, away=0)),
                           msgspec.structs.replace(good, red_cards=TeamCounts(home=99, away=0)),
                           msgspec.structs.replace(good, clock=Clock(seconds=-5, running=True, at=T0)),
                           msgspec.structs.replace(good, innings=[Innings(number=1, runs=10, wickets=12)])],
        "invalid_schema": [msgspec.structs.replace(good, period="2nd Half"),
                           msgspec.structs.replace(good, score=Score(home=True, away=0)),  # a bool is no score
                           msgspec.structs.replace(good, status="HALFTIME")],
        "clock_skew": [msgspec.structs.replace(good, source_ts=T0 + 3_600_000),
                       msgspec.structs.replace(good, clock=Clock(seconds=1, running=True, at=T0 + 3_600_000))],
    }
    for reason, states in bad.items():
        for es in states:
            with pytest.raises(FeedDecodeError) as info:
                validate_event_state(es, T0)
            assert (info.value.reason, info.value.event_id) == (reason, "px:f1"), es


def test_validate_update_bounds_the_settlement_factors() -> None:
    def update(**sel: object) -> MarketUpdate:
        return MarketUpdate(market_id="px:f1:m", source="s", image=True, header=None, source_ts=T0, received_at=T0,
                            selections=[Selection(selection_id="a", **sel)])  # type: ignore[arg-type]

    validate_update(update(status="WINNER", void_factor=0.5, dead_heat_factor=1.0), T0)
    validate_update(update(status="VOID", void_factor=0.0), T0)
    for sel in ({"void_factor": 1.5}, {"void_factor": -0.1}, {"dead_heat_factor": 0.0}, {"dead_heat_factor": 2.0}):
        with pytest.raises(FeedDecodeError) as info:
            validate_update(update(**sel), T0)
        assert info.value.reason == "invalid_number", sel


# --- Betfair ccm: the real cricket recording ---------------------------------------------------------


def test_overs_notation() -> None:
    assert [overs_to_balls(x) for x in ("0.0", "19.4", "20", None)] == [0, 118, 120, 0]
    for bad in ("19.6", "x", "1.23", "-1"):
        with pytest.raises(FeedDecodeError):
            overs_to_balls(bad)


def _ccm_lines() -> list[bytes]:
    data = require_shared_data()
    lines = read_messages(data / CCM)
    assert lines is not None
    return lines


def test_betfair_ccm_recording_becomes_the_match_state() -> None:
    lines = _ccm_lines()
    n = BetfairNormaliser("bf")
    states: list[EventState] = []
    for raw in lines:
        batch = n.feed(raw, 1_657_560_000_000)
        assert not batch.rejected and not batch.updates
        states += batch.event_states
    ours = [s for s in states if s.event_id == EVENT]
    # the match went pre-match → in running (innings 1, innings 2) → finished → closed, in that order
    order = ["NOT_STARTED", "LIVE", "ENDED", "CLOSED"]
    assert [order.index(s.status) for s in ours] == sorted(order.index(s.status) for s in ours)
    assert {s.status for s in ours} == set(order)
    assert {s.period for s in ours if s.in_play} >= {"innings1", "innings2"}
    times = [s.source_ts for s in ours]
    assert times == sorted(times) and times[-1] == 1_657_550_505_957  # source_ts = the line's pt
    final = ours[-1]
    assert (final.status, final.in_play, final.period) == ("CLOSED", False, None)
    # Netherlands (home) 163/7 in 20 overs, Papua New Guinea (away) 111 all out in 19.4
    assert final.score == Score(home=163, away=111, periods=[PeriodScore(period="innings1", home=163, away=0),
                                                             PeriodScore(period="innings2", home=0, away=111)])
    assert final.innings == [Innings(number=1, team="home", runs=163, wickets=7, balls=120),
                             Innings(number=2, team="away", runs=111, wickets=10, balls=118)]
    # every state emitted says something new, and every one is within the model's bounds
    for a, b in zip(ours, ours[1:]):
        assert not b.same_content(a)
    for s in states:
        validate_event_state(s, 1_657_560_000_000)
    # the stream also covered another match (England Women v South Africa Women), in play
    other = [s for s in states if s.event_id == "bf:31563715"]
    assert other and other[-1].status == "LIVE" and other[-1].score is not None


def test_a_bad_cricket_entry_is_rejected_alone() -> None:
    lines = _ccm_lines()
    n = BetfairNormaliser("bf")
    two = next(raw for raw in lines if raw.count(b'"eventId"') == 2)  # one line, two events
    msg = orjson.loads(two)
    msg["cc"][1]["matchStats"] = {"currentInnings": 1, "inningsStats": [
        {"inningsNum": 1, "battingTeam": "x", "inningsRuns": 10, "inningsOvers": "7.9", "inningsWickets": 1}]}
    batch = n.feed(orjson.dumps(msg), 1_657_560_000_000)
    assert [(e.reason, e.event_id) for e in batch.rejected] == [("invalid_schema", "bf:31563715")]
    assert [s.event_id for s in batch.event_states] == [EVENT]  # the other event of the line applies
    assert "31563715" not in n.cricket  # and the rejected one left nothing in the cache
    msg["cc"][1] = {"marketId": "1.2"}  # no eventId: rejected, unnamed
    msg["cc"][0]["fixtureInfo"]["fixtureStatus"] = "FINISHED"
    batch = n.feed(orjson.dumps(msg), 1_657_560_000_000)
    assert [(e.reason, e.event_id) for e in batch.rejected] == [("invalid_schema", None)]
    assert [s.status for s in batch.event_states] == ["ENDED"]


# --- the store --------------------------------------------------------------------------------------------


async def test_store_keeps_the_newest_version_and_provider_time(store: Store) -> None:
    a1 = state("pn:1", source="pn", ts=T0, status="LIVE", score=Score(home=0, away=0), version=1)
    a2 = msgspec.structs.replace(a1, score=Score(home=1, away=0), source_ts=T0 + 10, version=2)
    res = await store.apply_event_states([a1, a2])
    assert (res.kept, res.dropped, res.foreign) == (2, 0, 0) and res.entry
    assert (await store.get_event_states(["pn:1"]))["pn:1"] == a2
    # an older version, the same version again, and a newer version with an older provider time: all dropped
    older_pt = msgspec.structs.replace(a2, score=Score(home=5, away=5), source_ts=T0 + 5, version=3)
    res = await store.apply_event_states([a1, a2, older_pt])
    assert (res.kept, res.dropped, res.entry) == (0, 3, "")
    assert (await store.get_event_states(["pn:1"]))["pn:1"] == a2
    # another source's state of the same event id is foreign
    res = await store.apply_event_states([msgspec.structs.replace(a2, source="other", version=9,
                                                                  source_ts=T0 + 99)])
    assert (res.kept, res.foreign) == (0, 1)
    # the log holds each kept state once, in order; a replay's original clock rules the provider time
    log = await store.read_event_state_log("0-0")
    assert [[s.version for s in states] for _, states in log] == [[1, 2]]
    replayed = msgspec.structs.replace(a2, source_ts=T0 + 10_000, source_ts_original=T0 + 1, version=4)
    assert (await store.apply_event_states([replayed])).dropped == 1  # its own clock is older than T0 + 10
    assert await store.load_event_states("pn") == [a2] and await store.load_event_states("x") == []
    # one undecodable record (a newer writer's schema, a hand edit) is skipped, never hides the rest
    await store.redis.hset("of:{es}:state", "pn:bad", b'{"event_id":"pn:bad","version":"x"}')
    assert await store.load_event_states("pn") == [a2]
    await store.redis.hdel("of:{es}:state", "pn:bad")
    # pruning takes only the version named
    assert await store.prune_event_states([("pn:1", 1)]) == []
    assert await store.prune_event_states([("pn:1", 2)]) == ["pn:1"]
    assert await store.get_event_states(["pn:1"]) == {}
    first, last = await store.event_state_log_bounds()
    assert first is not None and last != "0-0" and await store.redis.xlen(ES_LOG_KEY) == 1


# --- the ingest ---------------------------------------------------------------------------------------------


class _Scripted:
    """A normaliser handing out prepared batches (one per payload), to drive the ingest exactly."""

    def __init__(self, batches: list[NormalisedBatch]) -> None:
        self.source = "scripted"
        self.max_future_skew_ms = 30_000
        self.batches = batches

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        return self.batches.pop(0)

    def restore(self, markets: object, cursor: str | None) -> None:
        pass


async def test_ingest_versions_orders_and_rejects_states_alone(store: Store) -> None:
    from feed.models import MarketHeader

    live = state("px:e1", source="x", ts=T0, status="LIVE", in_play=True, score=Score(home=0, away=0))
    goal = msgspec.structs.replace(live, score=Score(home=1, away=0), source_ts=T0 + 100)
    bad = msgspec.structs.replace(live, event_id="px:e2", score=Score(home=-3, away=0))
    market = MarketUpdate(market_id="px:e2:m", source="scripted", image=True,
                          header=MarketHeader(event_id="px:e2", sport="soccer"),
                          selections=[Selection(selection_id="a", price=2.0)], source_ts=T0, received_at=T0)
    batches = [
        NormalisedBatch(op="x", event_states=[live, bad], updates=[market], cursor="c1"),
        NormalisedBatch(op="x", event_states=[live]),  # nothing new: skipped
        NormalisedBatch(op="x", event_states=[goal]),
        NormalisedBatch(op="x", event_states=[msgspec.structs.replace(live, source_ts=T0 + 50)]),  # older: dropped
    ]
    ingest = Ingest(store, source="scripted", normaliser=_Scripted(batches), clock_ms=lambda: T0 + 200)
    out = ingest.feed([Payload(T0 + 200, b"1")])
    assert out.rejected_parts == 1  # the bad state alone; the market and the good state apply
    await ingest.flush()
    stored = await store.get_event_states(["px:e1", "px:e2"])
    assert list(stored) == ["px:e1"] and stored["px:e1"].version == 1 and stored["px:e1"].source == "scripted"
    assert [m.market_id for m in await store.load_all_markets()] == ["px:e2:m"]
    assert await store.load_cursor("scripted") == "c1"  # written after the states it covers
    assert ingest.stats.rejected_by_reason == {"invalid_number": 1}
    (q,) = await store.quarantined()
    assert q["reason"] == "invalid_number" and "px:e2" in q["detail"]
    for _ in range(3):
        ingest.feed([Payload(T0 + 300, b"1")])
        await ingest.flush()
    es = (await store.get_event_states(["px:e1"]))["px:e1"]
    assert (es.version, es.score) == (2, Score(home=1, away=0))
    assert ingest.stats.event_states == 2 and ingest.stats.event_states_dropped == 1
    # a restarted ingest continues the versions from the store
    again = Ingest(store, source="scripted", normaliser=_Scripted([
        NormalisedBatch(op="x", event_states=[msgspec.structs.replace(goal, score=Score(home=2, away=0),
                                                                      source_ts=T0 + 400)])]))
    await again.restore()
    again.feed([Payload(T0 + 500, b"1")])
    await again.flush()
    assert (await store.get_event_states(["px:e1"]))["px:e1"].version == 3


async def test_states_wait_for_the_store_and_go_once_it_answers(store: Store) -> None:
    from feed.errors import StoreError

    es = state("px:e1", source="scripted", status="LIVE", score=Score(home=1, away=1))
    ingest = Ingest(store, source="scripted", normaliser=_Scripted([NormalisedBatch(op="x", event_states=[es])]))
    real = store.apply_event_states
    calls = 0

    async def failing(states: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        raise StoreError("redis write failed: simulated")

    store.apply_event_states = failing  # type: ignore[method-assign]
    ingest.feed([Payload(T0 + 1, b"1")])
    await ingest.flush()
    assert calls == 1 and not ingest.store_ok and ingest.backlog == 1
    store.apply_event_states = real  # type: ignore[method-assign]
    ingest._retry_at = 0.0
    await ingest.flush()
    assert ingest.store_ok and ingest.backlog == 0
    assert (await store.get_event_states(["px:e1"]))["px:e1"].version == 1


# --- replay and recording ---------------------------------------------------------------------------------


async def test_replay_of_the_real_recordings_stores_the_cricket_state(store: Store) -> None:
    data = require_shared_data()
    ingest = Ingest(store, source="replay")
    await Replay([data / MATCH_ODDS, data / CCM], ingest, speed=None, chunk_lines=500).run()
    states = await store.get_event_states([EVENT])
    final = states[EVENT]
    assert final.status == "CLOSED" and final.score is not None and (final.score.home, final.score.away) == (163, 111)
    assert final.source_ts_original == 1_657_550_505_957  # the recording's clock, mapped onto now
    assert final.source_ts > final.source_ts_original
    markets = [m for m in await store.load_all_markets() if m.event_id == EVENT]
    assert markets and markets[0].status == "SETTLED"  # the match's market and its state, one event id
    # a flush stores the latest state per event (each is whole): versions rise, the last logged is the final
    logged = [s for _, ss in await store.read_event_state_log("0-0") for s in ss if s.event_id == EVENT]
    versions = [s.version for s in logged]
    assert versions == sorted(set(versions)) and logged[-1] == final


async def test_recorded_ccm_lines_replay_as_betfair_historic_lines(store: Store, tmp_path: Path) -> None:
    lines = _ccm_lines()[:400]
    rec = Recorder(tmp_path, source="betfair", kind="esa")
    rec.write([Payload(1_657_540_000_000 + i, raw) for i, raw in enumerate(lines)])
    rec.close()
    (f,) = (tmp_path / "betfair").iterdir()
    assert read_messages(f) == lines  # the ccm lines as they were, nothing else
    ingest = Ingest(store, source="betfair")
    await Replay([f], ingest, speed=None, map_clock=False).run()
    n = BetfairNormaliser("betfair")
    want = [s for raw in lines for s in n.feed(raw, 1_657_560_000_000).event_states if s.event_id == EVENT][-1]
    got = (await store.get_event_states([EVENT]))[EVENT]
    assert got.same_content(want) and got.source_ts == want.source_ts


def test_normaliser_event_caches_are_bounded() -> None:
    from feed.normalise.base import remember

    cache: dict[str, int] = {}
    for i in range(25):
        remember(cache, f"e{i}", i, cap=10)
    assert len(cache) <= 10 and "e24" in cache and "e0" not in cache
    remember(cache, "e20", -1, cap=10)  # touched: the newest again
    assert list(cache)[-1] == "e20"
