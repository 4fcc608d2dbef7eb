"""Event state over REST, against a real API (uvicorn on 127.0.0.1, the embedded Redis) fed by the real
ingest: ``GET /v1/events/{id}`` gives the event's ``state`` (score, clock, status, with ``age_ms`` and
``stale``) and every member's ``states``; ``GET /v1/events`` gives each event its ``state``; a state
written while the node runs reaches it (the node follows ``of:{es}:log``); ETags follow the states;
a linked member named the other way round is turned round; every answer matches the OpenAPI document.
"""

from __future__ import annotations

import httpx
import msgspec
import pytest

from feed.ingest import Ingest
from feed.models import Clock, EventState, MarketHeader, Score, Selection, SourceHealth, TeamCounts
from feed.normalise.base import MarketUpdate, NormalisedBatch
from feed.sources.base import Payload
from feed.sources.replay import Replay
from feed.store import Store, StoredLink
from streaming.event_states import pick, turned
from streaming.openapi import openapi_document
from tests.conftest import require_shared_data
from tests.streaming_helpers import eventually, make_app, now_ms, serve
from tests.test_event_state import CCM, EVENT, MATCH_ODDS, _Scripted
from tests.test_openapi import Schemas

pytestmark = pytest.mark.timeout(120)


def _market(mid: str, event: str, home: str, away: str) -> MarketUpdate:
    t = now_ms()
    return MarketUpdate(market_id=mid, source="live", image=True, received_at=t, source_ts=t,
                        header=MarketHeader(event_id=event, sport="soccer", event_name=f"{home} v {away}",
                                            market_type="match_result", start_time=1_800_000_000_000, in_play=True),
                        selections=[Selection(selection_id="home", name=home, price=2.0, outcome="home"),
                                    Selection(selection_id="away", name=away, price=3.0, outcome="away")])


def _live(event: str, home: int, away: int, ts: int) -> EventState:
    return EventState(event_id=event, source="live", status="LIVE", in_play=True, period="2h",
                      clock=Clock(seconds=3000, running=True, at=ts), score=Score(home=home, away=away),
                      red_cards=TeamCounts(home=1, away=0), source_ts=ts, received_at=ts)


async def test_event_state_over_rest(store: Store, redis_url: str) -> None:
    data = require_shared_data()
    await Replay([data / MATCH_ODDS, data / CCM], Ingest(store, source="replay"), speed=None).run()
    schemas = Schemas(openapi_document())
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get(f"/v1/events/{EVENT}")
        assert r.status_code == 200
        schemas.response("get", "/v1/events/{event_id}", r)
        body = r.json()
        st = body["state"]
        assert (st["event_id"], st["status"], st["score"]["home"], st["score"]["away"]) == (EVENT, "CLOSED", 163, 111)
        assert [(i["team"], i["runs"], i["wickets"], i["balls"]) for i in st["innings"]] == \
            [("home", 163, 7, 120), ("away", 111, 10, 118)]
        assert isinstance(st["age_ms"], int) and st["stale"] is True  # the replay finished: its source is DOWN
        assert [(s["event_id"], s["reversed"]) for s in body["states"]] == [(EVENT, False)]
        listing = (await c.get("/v1/events")).json()
        (ev,) = [e for e in listing["events"] if EVENT in e["members"]]
        assert ev["state"]["score"] == st["score"]
        schemas.response("get", "/v1/events", await c.get("/v1/events"))
        etag = r.headers["etag"]
        assert (await c.get(f"/v1/events/{EVENT}", headers={"If-None-Match": etag})).status_code == 304

        # a live source: its states reach the running node through the event-state log
        t = now_ms()
        batches = [NormalisedBatch(op="x", updates=[_market("lv:1", "lv:e1", "Arsenal", "Chelsea")],
                                   event_states=[_live("lv:e1", 1, 0, t)]),
                   NormalisedBatch(op="x", event_states=[_live("lv:e1", 2, 0, t + 1)])]
        ingest = Ingest(store, source="live", normaliser=_Scripted(batches))
        ingest.set_state("UP", None)
        ingest.feed([Payload(t, b"1")])
        await ingest.flush()
        await ingest.publish_health()

        async def live_state() -> dict | None:
            r = await c.get("/v1/events/lv:e1")
            return r.json()["state"] if r.status_code == 200 else None
        st = await eventually(live_state, 10, "the live state served")
        assert (st["status"], st["in_play"], st["period"], st["score"]["home"], st["stale"]) == ("LIVE", True, "2h", 1,
                                                                                                 False)
        assert st["clock"] == {"seconds": 3000, "running": True, "at": t, "remaining_s": None, "stoppage_s": None}
        r1 = await c.get("/v1/events/lv:e1")
        ingest.feed([Payload(t + 1, b"1")])  # a goal
        await ingest.flush()

        async def second_goal() -> bool:
            r = await c.get("/v1/events/lv:e1", headers={"If-None-Match": r1.headers["etag"]})
            return r.status_code == 200 and r.json()["state"]["score"]["home"] == 2
        await eventually(second_goal, 10, "the goal served under a new ETag")
        schemas.response("get", "/v1/events/{event_id}", await c.get("/v1/events/lv:e1"))

        # the source goes DOWN: its state reads stale
        ingest.set_state("DOWN", "stopped")
        await ingest.publish_health()

        async def stale() -> bool:
            return (await c.get("/v1/events/lv:e1")).json()["state"]["stale"] is True
        await eventually(stale, 10, "stale once the source is DOWN")


async def test_a_reversed_member_is_turned_round(store: Store, redis_url: str) -> None:
    """Two books of one match, the second naming the sides the other way round (a reversed link): the
    event's ``state`` is in the canonical event's orientation, each member's ``states`` entry its own."""
    t = now_ms()
    a = EventState(event_id="pa:1", source="live", status="LIVE", in_play=True, score=Score(home=2, away=1),
                   red_cards=TeamCounts(home=0, away=1), source_ts=t - 5000, received_at=t - 5000)
    b = msgspec.structs.replace(a, event_id="pb:1", score=Score(home=1, away=2), red_cards=TeamCounts(home=1, away=0),
                                source_ts=t, received_at=t)
    batches = [NormalisedBatch(op="x", updates=[_market("pa:1:m", "pa:1", "Arsenal", "Chelsea"),
                                                _market("pb:1:m", "pb:1", "Chelsea", "Arsenal")],
                               event_states=[a, b])]
    ingest = Ingest(store, source="live", normaliser=_Scripted(batches))
    ingest.set_state("UP", None)
    ingest.feed([Payload(t, b"1")])
    await ingest.flush()
    await ingest.publish_health()
    from feed.matching import record_id

    ra, rb = record_id("pa:1", "soccer", 1_800_000_000_000), record_id("pb:1", "soccer", 1_800_000_000_000)
    await store.save_links({ra: StoredLink(c="ev:m", p=1.0, m="pinned"), rb: StoredLink(c="ev:m", p=0.9, m="fuzzy",
                                                                                       r=True)}, {})
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def linked() -> dict | None:
            r = await c.get("/v1/events/ev:m")
            return r.json() if r.status_code == 200 and len(r.json()["states"]) == 2 else None
        body = await eventually(linked, 10, "the linked event with both members' states")
        # the newest (pb:1) is shown, turned round to the canonical sides: Arsenal 2, Chelsea 1
        assert body["state"]["event_id"] == "pb:1"
        assert (body["state"]["score"]["home"], body["state"]["score"]["away"]) == (2, 1)
        assert body["state"]["red_cards"] == {"home": 0, "away": 1}
        own = {s["event_id"]: (s["score"]["home"], s["score"]["away"], s["reversed"]) for s in body["states"]}
        assert own == {"pa:1": (2, 1, False), "pb:1": (1, 2, True)}


def test_pick_and_turn() -> None:
    a = EventState(event_id="a", source="s", source_ts=2, score=Score(home=3, away=1))
    b = EventState(event_id="b", source="s", source_ts=5)
    assert pick([(a, False), (b, True)]) is a  # not stale first
    assert pick([(a, False), (b, False)]) is b  # then the newest
    assert pick([]) is None
    assert turned(a).score == Score(home=1, away=3)
    assert turned(turned(a)) == a


async def test_the_node_reloads_when_the_store_is_wiped(store: Store, redis_url: str) -> None:
    t = now_ms()
    ingest = Ingest(store, source="live", normaliser=_Scripted([
        NormalisedBatch(op="x", updates=[_market("lv:1", "lv:e1", "A", "B")], event_states=[_live("lv:e1", 1, 1, t)])]))
    ingest.feed([Payload(t, b"1")])
    await ingest.flush()
    await store.set_health(SourceHealth(source="live", state="UP", last_message_at=t, updated_at=t))
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        node = app.state.node
        assert node.event_states.get("lv:e1") is not None
        await store.redis.flushall()
        await store.ensure_epoch()
        fresh = _live("lv:e9", 0, 0, t + 10)
        again = Ingest(store, source="live", normaliser=_Scripted([NormalisedBatch(
            op="x", updates=[_market("lv:9", "lv:e9", "C", "D")], event_states=[fresh])]))
        again.feed([Payload(t + 10, b"1")])
        await again.flush()
        await eventually(lambda: node.event_states.get("lv:e9") is not None and node.event_states.get("lv:e1") is None,
                         10, "the node reloaded the wiped store's states")
        assert node.event_states.reloads >= 1
        assert (await c.get("/v1/events/lv:e9")).json()["state"]["event_id"] == "lv:e9"
