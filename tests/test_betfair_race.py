"""Live race progress (Betfair TPD, the sports-data stream's ``rcm`` lines): the normaliser's race
states (pure); a race's state on a real API node (uvicorn on 127.0.0.1, the embedded Redis):
joined to its race's markets — the meeting's markets with the race's scheduled start — on SSE,
REST and in the Python client, and not to the meeting's other races; and the ``betfair-race``
source against the local sports-data stream (``feed.simulator.race_server``) over a real socket,
through the registry, the pipeline and the embedded Redis."""

from __future__ import annotations

import time
from typing import Any

import httpx
import msgspec
import orjson
import pytest

from feed.models import EventState, SourceHealth
from feed.normalise.betfair import BetfairNormaliser, decode_cursor
from feed.simulator.race_server import RaceSimConfig, RaceSimulator
from feed.store import Store
from feed.taxonomy import race_event_id
from streaming.client import OddsClient
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, running_source, serve, started

pytestmark = pytest.mark.timeout(90)

RACE = "28587288.1650"
MARKET = "1.173853449"
TIMEOUT_S = 10.0


def rcm(pt: int, *changes: dict[str, Any], clk: str | None = None, **envelope: Any) -> bytes:
    msg: dict[str, Any] = {"op": "rcm", "id": 2, "pt": pt, **envelope}
    if clk is not None:
        msg["clk"] = clk
    if changes:
        msg["rc"] = list(changes)
    return orjson.dumps(msg)


def rpc(ft: int, *, g: str = "4f", prg: float = 804.7, rt: float = 45.6, order: tuple[int, ...] = (11, 22, 33),
        **extra: Any) -> dict[str, Any]:
    return {"ft": ft, "g": g, "st": 12.31, "rt": rt, "spd": 16.9, "prg": prg, "ord": list(order), "J": [], **extra}


def rrc(ft: int, sel: int, prg: float, spd: float = 16.5) -> dict[str, Any]:
    return {"ft": ft, "id": sel, "lat": 51.41, "long": -0.40, "spd": spd, "prg": prg, "sfq": 2.3}


def change(*, race: str = RACE, mid: str | None = MARKET, progress: dict[str, Any] | None = None,
           runners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": race}
    if mid is not None:
        out["mid"] = mid
    if progress is not None:
        out["rpc"] = progress
    if runners is not None:
        out["rrc"] = runners
    return out


# -- the normaliser ---------------------------------------------------------------------------------


def test_race_id_of_a_market_is_the_meeting_and_its_start_in_utc() -> None:
    # betfairlightweight's recorded race stream: race 30050924.1750 for market 1.173853449, the
    # leader finishing at 2020-10-06 17:54:00 UTC after 157 s: the HHMM is UTC (BST would be 18:50)
    start = 1602006600_000  # 2020-10-06T17:50:00Z
    assert race_event_id("bf:30050924", "horse_racing", start) == "bf:30050924.1750"
    assert race_event_id("bf:30050924", "greyhound_racing", start + 59_999) == "bf:30050924.1750"
    assert race_event_id("bf:30050924", "soccer", start) is None
    assert race_event_id("pn:30050924", "horse_racing", start) is None
    assert race_event_id("bf:30050924", "horse_racing", None) is None


def test_progress_becomes_a_live_race_state_then_ended_at_the_finish() -> None:
    n = BetfairNormaliser("bf-race", cursor_op="rcm")
    t = now_ms() - 60_000
    # readings alone emit nothing: they ride with the next progress
    b0 = n.feed(rcm(t, change(runners=[rrc(t, 11, 810.0), rrc(t, 22, 812.5, 16.0)]), clk="c1"), t + 5)
    assert b0.event_states == [] and b0.rejected == []
    b1 = n.feed(rcm(t + 100, change(progress=rpc(t + 50), runners=[rrc(t + 90, 33, 815.0)]), clk="c2"), t + 105)
    assert [s.event_id for s in b1.event_states] == [f"bf:{RACE}"]
    s1 = b1.event_states[0]
    assert (s1.source, s1.status, s1.in_play, s1.source_ts, s1.received_at) == ("bf-race", "LIVE", True, t + 100,
                                                                                 t + 105)
    assert s1.clock is not None and (s1.clock.seconds, s1.clock.running, s1.clock.at) == (45, True, t + 50)
    race = s1.race
    assert race is not None
    assert (race.race_id, race.market_id, race.gate, race.distance_m, race.leader_speed_mps, race.sectional_s) == \
        (RACE, f"bf:{MARKET}", "4f", 804.7, 16.9, 12.31)
    assert race.order == ["11", "22", "33"]
    assert [(r.selection_id, r.distance_m, r.speed_mps, r.at) for r in race.runners] == \
        [("11", 810.0, 16.5, t), ("22", 812.5, 16.0, t), ("33", 815.0, 16.5, t + 90)]
    assert decode_cursor(b1.cursor).clk == "c2"  # a betfair-race source's cursor follows the rcm stream
    # the same progress again says nothing new
    assert n.feed(rcm(t + 200, change(progress=rpc(t + 50))), t + 205).event_states == []
    # the finish: ENDED, out of play, the clock stopped at the running time
    end = n.feed(rcm(t + 300, change(progress=rpc(t + 250, g="Finish", prg=0, rt=101.2, order=(22, 11, 33)))),
                 t + 305).event_states
    assert len(end) == 1 and (end[0].status, end[0].in_play) == ("ENDED", False)
    assert end[0].clock is not None and (end[0].clock.seconds, end[0].clock.running) == (101, False)
    assert end[0].race is not None and end[0].race.order == ["22", "11", "33"] and end[0].race.distance_m == 0


def test_older_progress_and_readings_cannot_take_a_race_back() -> None:
    n = BetfairNormaliser("bf-race")
    t = now_ms() - 60_000
    n.feed(rcm(t, change(progress=rpc(t + 1000, prg=500.0), runners=[rrc(t + 1000, 11, 500.0)])), t)
    # a reordered line: progress and a reading from before the ones held
    late = n.feed(rcm(t + 10, change(progress=rpc(t + 500, prg=700.0), runners=[rrc(t + 500, 11, 700.0)])), t + 10)
    assert late.event_states == [] and late.rejected == []
    nxt = n.feed(rcm(t + 20, change(progress=rpc(t + 2000, prg=480.0))), t + 20).event_states
    assert nxt[0].race is not None and nxt[0].race.distance_m == 480.0
    assert [(r.selection_id, r.distance_m) for r in nxt[0].race.runners] == [("11", 500.0)]
    assert n.cursor_op == "mcm" and nxt  # a recording's cursor stays the market stream's


@pytest.mark.parametrize(("bad", "reason"), [
    ({"progress": rpc(0, prg=-5.0)}, "invalid_number"),
    ({"progress": rpc(0, spd=250.0)}, "invalid_number"),
    ({"progress": rpc(0, rt=1e300)}, "invalid_number"),
    ({"progress": rpc(0, order=(11, 11))}, "invalid_schema"),
    ({"progress": {"ft": "soon"}}, "invalid_schema"),
    ({"runners": [{"id": 11, "prg": 20_000.0, "ft": 0}]}, "invalid_number"),
    ({"runners": [{"id": 11, "prg": 100.0, "ft": 4102444800001}]}, "clock_skew"),
])
def test_a_bad_race_change_is_rejected_alone(bad: dict[str, Any], reason: str) -> None:
    n = BetfairNormaliser("bf-race")
    t = now_ms() - 60_000
    good = n.feed(rcm(t, change(progress=rpc(t))), t).event_states
    assert len(good) == 1
    if "progress" in bad and bad["progress"].get("ft") == 0:
        bad["progress"]["ft"] = t + 10
    for r in bad.get("runners", ()):
        if r["ft"] == 0:
            r["ft"] = t + 10
    other = "28587288.1720"
    b = n.feed(rcm(t + 20, change(mid=None, **bad), change(race=other, mid="1.2", progress=rpc(t + 10))), t + 20)
    assert [(e.reason, e.event_id) for e in b.rejected] == [(reason, f"bf:{RACE}")]
    assert [s.event_id for s in b.event_states] == [f"bf:{other}"]  # the message's other race applies
    # the race rejected is as it was: its next good progress builds on the good state, not the bad
    after = n.feed(rcm(t + 30, change(progress=rpc(t + 30, prg=700.0))), t + 30)
    assert after.rejected == [] and after.event_states[0].race is not None
    assert after.event_states[0].race.runners == [] and after.event_states[0].race.market_id == f"bf:{MARKET}"


def test_an_rcm_envelope_that_is_not_a_race_message_is_rejected_whole() -> None:
    n = BetfairNormaliser("bf-race", cursor_op="rcm")
    with pytest.raises(Exception) as info:
        n.feed(b'{"op":"rcm","pt":1,"rc":{"id":"x"}}', now_ms())
    assert getattr(info.value, "reason", None) == "invalid_schema"


# -- on an API node ------------------------------------------------------------------------------------


async def _health(store: Store, source: str) -> None:
    t = now_ms()
    await store.set_health(SourceHealth(source=source, kind="esa", state="UP", reason=None, last_message_at=t,
                                        updated_at=t, lease_ms=600_000, stale_after_ms=600_000))


def _start_ms(hhmm: str) -> int:
    """Today's (UTC) time HH:MM as ms since the epoch."""
    day = int(time.time()) // 86_400 * 86_400
    return (day + int(hhmm[:2]) * 3600 + int(hhmm[2:]) * 60) * 1000


async def test_a_race_state_reaches_its_races_markets_on_sse_rest_and_the_client(store: Store,
                                                                                redis_url: str) -> None:
    feed = Feed(store)
    meeting = "bf:28587288"
    # the 16:50 race's WIN and PLACE markets, and the 17:20 race's WIN market, of one meeting
    await feed.write(feed.image("bf:1.1", sport="horse_racing", event=meeting, in_play=True, source="bf",
                                start_time=_start_ms("1650")),
                     feed.image("bf:1.2", sport="horse_racing", event=meeting, in_play=True, source="bf",
                                start_time=_start_ms("1650")),
                     feed.image("bf:1.3", sport="horse_racing", event=meeting, source="bf",
                                start_time=_start_ms("1720")))
    await _health(store, "bf")
    await _health(store, "bf-race")
    n = BetfairNormaliser("bf-race", cursor_op="rcm")
    t = now_ms() - 1000
    states = n.feed(rcm(t, change(mid="1.1", progress=rpc(t), runners=[rrc(t, 11, 805.0)])), t).event_states
    assert [s.event_id for s in states] == [f"bf:{RACE}"]
    await store.apply_event_states([msgspec.structs.replace(states[0], version=1)])  # the ingest numbers them
    app = make_app(redis_url, heartbeat_ms=300)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        node = app.state.node
        await eventually(lambda: node.event_states.get(f"bf:{RACE}") is not None, TIMEOUT_S, "the node's race state")
        # SSE: a subscriber of the race's PLACE market gets the race's state after its snapshot
        async with c.stream("GET", "/v1/stream?market=bf:1.2") as r, c.stream("GET", "/v1/stream?market=bf:1.3") as r3:
            place, later = SSEReader(r), SSEReader(r3)
            data = (lambda ev: ev.event != "heartbeat")
            assert (await place.until(data)).event == "snapshot"
            st = await place.until(data)
            assert st.event == "event_state"
            es = st.data["event_state"]
            assert (es["event_id"], es["status"], es["race"]["race_id"], es["race"]["market_id"]) == \
                (f"bf:{RACE}", "LIVE", RACE, "bf:1.1")
            assert es["race"]["runners"] == [{"selection_id": "11", "distance_m": 805.0, "speed_mps": 16.5, "at": t}]
            assert (await later.until(data)).event == "snapshot"
            # a live change of the race goes to its market's subscriber, not to the 17:20 race's
            more = n.feed(rcm(t + 500, change(progress=rpc(t + 500, g="3f", prg=600.0))), t + 500).event_states
            await store.apply_event_states([msgspec.structs.replace(more[0], version=2)])
            live = await place.until(lambda ev: ev.event == "event_state")
            assert live.data["event_state"]["race"]["gate"] == "3f"
            # the 17:20 race's subscriber: nothing but heartbeats (the race's state is not its race's)
            for _ in range(3):  # past the live change (sent before these heartbeats were due)
                hb = await later.next()
                assert hb.event == "heartbeat", hb
        # REST: the race id names the race's canonical event (the linker keys racing events by
        # meeting and start time), whose state is the race's; the 17:20 race's event has none
        body = (await c.get(f"/v1/events/bf:{RACE}")).json()
        assert sorted(m["market_id"] for m in body["markets"]) == ["bf:1.1", "bf:1.2"]
        assert [s["event_id"] for s in body["states"]] == [f"bf:{RACE}"]
        assert body["state"]["event_id"] == f"bf:{RACE}" and body["state"]["race"]["gate"] == "3f"
        assert body["state"]["stale"] is False and body["states"][0]["reversed"] is False
        listed = {e["event_id"]: e for e in (await c.get("/v1/events?sport=horse_racing")).json()["events"]}
        assert len(listed) == 2
        race_ev = body["event"]["event_id"]
        assert listed[race_ev]["state"]["race"]["gate"] == "3f"
        assert [e.get("state") for k, e in listed.items() if k != race_ev] == [None]
        # the Python client: state_of_market finds the race's state for both of its markets only
        got: list[EventState] = []
        client = OddsClient(base, market=["bf:1.1", "bf:1.2", "bf:1.3"], on_event_state=got.append)
        await client.start()
        try:
            await eventually(lambda: client.state_of_market("bf:1.2") is not None, TIMEOUT_S, "the client's race state")
            s1, s2 = client.state_of_market("bf:1.1"), client.state_of_market("bf:1.2")
            assert s1 is s2 and s1 is not None and s1.race is not None and s1.race.gate == "3f"
            assert client.state_of_market("bf:1.3") is None
            assert [s.event_id for s in got] == [f"bf:{RACE}"]
        finally:
            await client.close()


# -- the betfair-race source against the local sports-data stream ----------------------------------------


async def test_the_betfair_race_source_stores_each_race_to_its_finish_through_a_cut_and_bad_lines(
        store: Store) -> None:
    """``betfair-race`` through the registry and the pipeline: each race of the simulator is stored
    as a live state, then ENDED with the finishing order the simulator ran; the stream cut mid-race
    resumes (RESUB_DELTA) and the race still ends right; malformed lines are quarantined."""
    # (at 40×: a race of 1,000-1,200 m runs ~1.7 s, a progress line every 25 ms of real time — dozens per
    # race —, and the cut, right after the first race is stored live, is mid-race)
    config = RaceSimConfig(seed=11, races=2, time_scale=40.0, distance_m=(1000.0, 1200.0), min_update_ms=10,
                           tick_ms=5, race_gap_ms=200)
    async with started(RaceSimulator(config)) as sim, \
            running_source(store, f"betfair-race=127.0.0.1:{sim.port},name=bf-race,app_key=sim-app-key,"
                                  "session=sim-session,heartbeat_ms=500"):
        first = f"bf:{sim.cards[0].race_id}"

        async def live() -> bool:
            es = (await store.get_event_states([first])).get(first)
            return es is not None and es.status == "LIVE" and es.race is not None and bool(es.race.runners)

        await eventually(live, 20, "the first race stored live")
        sim.drop_connections()
        await eventually(lambda: sim.connections_accepted >= 2, 20, "a reconnect")
        sim.inject_malformed(1)
        for card in sim.cards:
            eid = f"bf:{card.race_id}"

            async def ended(eid: str = eid) -> bool:
                es = (await store.get_event_states([eid])).get(eid)
                return es is not None and es.status == "ENDED"

            await eventually(ended, 30, f"race {card.race_id} stored ENDED")
            es = (await store.get_event_states([eid]))[eid]
            assert es.race is not None and es.race.gate == "Finish" and es.race.distance_m == 0
            assert es.race.order == [str(x) for x in sim.results[card.race_id]]  # the order the simulator ran
            assert es.race.market_id == f"bf:{card.market_id}" and es.source == "bf-race" and not es.in_play
            assert es.clock is not None and not es.clock.running
            versions = [s.version for _, ss in await store.read_event_state_log("0-0") for s in ss
                        if s.event_id == eid]
            assert versions == sorted(set(versions)) and len(versions) >= 3  # one per progress, in order

        async def quarantined() -> bool:
            return sum((await store.quarantine_counts()).get("bf-race", {}).values()) >= 1

        await eventually(quarantined, 20, "the malformed line quarantined")
