"""feed.simulator: tick ladder, synthetic market model, and the ESA server on a raw socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from feed.simulator import MarketModel, TICKS, snap, tick_index
from feed.simulator.market_model import iso_ms
from feed.sources.esa import EsaClient, default_market_data_filter

pytestmark = pytest.mark.timeout(20)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "betfair-stream"
T0 = 1_700_000_000_000  # a fixed wall clock for model tests (ms)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- tick ladder ------------------------------------------------------------------------


def test_tick_ladder_has_the_betfair_bands() -> None:
    assert len(TICKS) == 350 and TICKS[0] == 1.01 and TICKS[-1] == 1000
    steps = {(1.01, 2): 0.01, (2, 3): 0.02, (3, 4): 0.05, (4, 6): 0.1, (6, 10): 0.2, (10, 20): 0.5,
             (20, 30): 1, (30, 50): 2, (50, 100): 5, (100, 1000): 10}
    for (lo, hi), step in steps.items():
        band = [p for p in TICKS if lo <= p <= hi]
        assert all(round(b - a, 2) == step for a, b in zip(band, band[1:], strict=False)), (lo, hi)
    assert all(type(p) is int for p in TICKS if p == int(p))  # "2", not "2.0", on the wire


@pytest.mark.parametrize(
    ("price", "mode", "expected"),
    [(2.011, "nearest", 2.02), (2.009, "nearest", 2.0), (2.011, "down", 2.0), (2.001, "up", 2.02),
     (15.3, "nearest", 15.5), (15.3, "down", 15), (3.33, "nearest", 3.35), (0.5, "nearest", 1.01),
     (5000, "nearest", 1000), (104, "nearest", 100), (106, "nearest", 110), (7.0, "nearest", 7)],
)
def test_snap_to_the_ladder(price: float, mode: str, expected: float) -> None:
    assert snap(price, mode) == expected


def test_tick_index_round_trips() -> None:
    assert all(tick_index(p) == i for i, p in enumerate(TICKS))
    assert TICKS[tick_index(2.013)] == 2.0


# -- market model -----------------------------------------------------------------------


def run_model(model: MarketModel, seconds: int, step_ms: int = 1000, updates: int = 20,
              observe: Callable[[MarketModel], None] | None = None) -> None:
    t = model.now_ms
    for _ in range(seconds * 1000 // step_ms):
        t += step_ms
        model.step(t, updates)
        if observe is not None:
            observe(model)


def test_model_prices_sit_on_the_ladder_with_a_sane_overround() -> None:
    model = MarketModel(events=12, seed=4, time_scale=60.0, now_ms=T0)
    run_model(model, 5, step_ms=100, updates=50)
    ticks = set(TICKS)
    open_books = 0
    for mb in model.books.values():
        md = mb.definition
        assert md is not None
        for rb in mb.runners.values():
            assert set(rb.atb) <= ticks and set(rb.atl) <= ticks and set(rb.trd) <= ticks
            assert all(s > 0 and round(s, 2) == s for s in [*rb.atb.values(), *rb.atl.values()])
            if rb.atb and rb.atl:
                assert max(rb.atb) < min(rb.atl)
        active = [rb for rb in mb.runners.values() if rb.atb]
        if md["status"] == "OPEN" and not md["inPlay"] and len(active) == md["numberOfActiveRunners"]:
            open_books += 1
            overround = sum(1 / max(rb.atb) for rb in active)
            assert 1.0 <= overround <= 1.08, (md["marketType"], overround)
    assert open_books >= 3


def test_model_lifecycle_reaches_in_play_and_settles_then_replaces_events() -> None:
    model = MarketModel(events=8, seed=5, time_scale=600.0, now_ms=T0)
    initial = set(model.books)
    seen: dict[str, list[dict[str, Any]]] = {}

    def observe(m: MarketModel) -> None:
        for market_id, mb in m.books.items():
            history = seen.setdefault(market_id, [])
            if not history or history[-1] is not mb.definition:
                history.append(mb.definition)

    observe(model)
    run_model(model, 300, step_ms=100, updates=5, observe=observe)  # 50 model hours
    defs = [md for history in seen.values() for md in history]
    in_play_open = [md for md in defs if md["inPlay"] and md["status"] == "OPEN"]
    assert in_play_open and all(md["betDelay"] > 0 for md in in_play_open)
    assert {md["eventTypeId"] for md in in_play_open} >= {"1", "2", "7"}
    assert any(md["inPlay"] and md["status"] == "SUSPENDED" for md in defs)
    closed = [md for md in defs if md["status"] == "CLOSED"]
    assert closed
    for md in closed:
        statuses = [r["status"] for r in md["runners"] if r["status"] != "REMOVED"]
        assert statuses.count("WINNER") == 1 and set(statuses) == {"WINNER", "LOSER"}
        assert md["settledTime"].endswith("Z") and md["numberOfActiveRunners"] == 0
    assert not any(md["inPlay"] for md in defs if md["eventTypeId"] == "4339")  # dogs never turn in play
    for history in seen.values():
        versions = [md["version"] for md in history]
        assert versions == sorted(set(versions))  # bumped on every definition change
    assert set(seen) - initial  # settled events were replaced by new ones
    assert len(model._events) == 8


def test_model_definitions_have_the_real_shape() -> None:
    real = orjson.loads((SHARED / "fixtures" / "streaming_mcm_SUB_IMAGE.json").read_bytes()) \
        if (SHARED / "fixtures").exists() else None
    model = MarketModel(events=12, seed=6, now_ms=T0)
    sports = set()
    for mb in model.books.values():
        md = mb.definition
        assert md is not None
        sports.add((md["eventTypeId"], md["marketType"]))
        assert isinstance(md["eventId"], str) and isinstance(md["version"], int)
        assert md["bettingType"] == "ODDS" and md["status"] in ("OPEN", "SUSPENDED", "CLOSED")
        assert len(md["marketTime"]) == 24 and md["marketTime"].endswith(".000Z")
        for r in md["runners"]:
            assert isinstance(r["id"], int) and r["status"] in ("ACTIVE", "REMOVED") and r["name"]
        if real is not None:  # every key we write exists in real definitions, or is a documented extra
            real_keys = set(real["mc"][0]["marketDefinition"])
            assert set(md) - real_keys <= {"name", "eventName", "priceLadderDefinition", "raceType", "venue",
                                           "settledTime"}
    assert {s for s, _ in sports} == {"1", "2", "7", "4339", "7522"}
    assert ("1", "OVER_UNDER_25") in sports and ("7", "WIN") in sports
    assert iso_ms(1627622640000) == "2021-07-30T05:24:00.000Z"


def test_model_is_deterministic_for_a_seed() -> None:
    a = MarketModel(events=6, seed=9, time_scale=600.0, now_ms=T0)
    b = MarketModel(events=6, seed=9, time_scale=600.0, now_ms=T0)
    run_model(a, 30, updates=40)
    run_model(b, 30, updates=40)
    assert a.truth() == b.truth()
    c = MarketModel(events=6, seed=10, time_scale=600.0, now_ms=T0)
    assert c.truth() != a.truth()


# -- the ESA server over a raw socket -------------------------------------------------------


class Raw:
    """A hand-driven ESA client: sends dicts, reads raw CRLF lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lines: list[bytes] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(orjson.dumps(msg) + b"\r\n")

    async def recv_raw(self, timeout_s: float = 10.0) -> bytes:
        line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout_s)
        self.lines.append(line)
        return line

    async def recv(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return orjson.loads(await self.recv_raw(timeout_s))

    async def login(self, app_key: str = "sim-app-key", session: str = "sim-session") -> dict[str, Any]:
        assert (await self.recv())["op"] == "connection"
        self.send({"op": "authentication", "id": 1, "appKey": app_key, "session": session})
        return await self.recv()

    async def subscribe(self, **fields: Any) -> list[dict[str, Any]]:
        """Subscribe; return the status and the whole first mcm (all segments)."""
        msg = {"op": "marketSubscription", "id": 2, "marketFilter": {},
               "marketDataFilter": default_market_data_filter(), "heartbeatMs": 5000}
        msg.update(fields)
        self.send(msg)
        status = await self.recv()
        out = [status]
        if status["statusCode"] != "SUCCESS":
            return out
        while True:
            m = await self.recv()
            out.append(m)
            if m.get("segmentType") in (None, "SEG_END"):
                return out

    async def until_heartbeat(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Skip messages up to the next HEARTBEAT and return it."""
        async with asyncio.timeout(timeout_s):
            while (m := await self.recv()).get("ct") != "HEARTBEAT":
                pass
        return m

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Any]]:
    clients: list[Raw] = []

    async def connect(port: int) -> Raw:
        client = Raw(*await asyncio.open_connection("127.0.0.1", port))
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def markets_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [mc for m in messages if m.get("op") == "mcm" for mc in m.get("mc", ())]


async def test_handshake_bytes_match_the_real_protocol(make_sim, raw) -> None:
    sim = await make_sim()
    c = await raw(sim.port)
    line = await c.recv_raw()
    assert line.startswith(b'{"op":"connection","connectionId":"sim-') and line.endswith(b'"}\r\n')
    c.send({"op": "authentication", "id": 1, "appKey": "sim-app-key", "session": "sim-session"})
    assert await c.recv_raw() == (
        b'{"op":"status","id":1,"statusCode":"SUCCESS","connectionClosed":false,"connectionsAvailable":9}\r\n')
    c.send({"op": "marketSubscription", "id": 2, "marketFilter": {}, "segmentationEnabled": False,
            "marketDataFilter": default_market_data_filter(), "heartbeatMs": 5000})
    assert await c.recv_raw() == b'{"op":"status","id":2,"statusCode":"SUCCESS","connectionClosed":false}\r\n'
    image_line = await c.recv_raw()
    assert image_line.endswith(b"]}\r\n") and image_line.count(b"\r\n") == 1
    assert b'": ' not in image_line and b'":{ ' not in image_line  # compact JSON
    image = orjson.loads(image_line)
    assert list(image) == ["op", "id", "initialClk", "clk", "conflateMs", "heartbeatMs", "pt", "ct", "mc"]
    if (SHARED / "fixtures").exists():  # same envelope as a recorded Betfair SUB_IMAGE
        real = orjson.loads((SHARED / "fixtures" / "streaming_mcm_SUB_IMAGE.json").read_bytes())
        assert list(image) == list(real)
    assert image["id"] == 2 and image["ct"] == "SUB_IMAGE" and abs(image["pt"] - now_ms()) < 2000
    mcs = image["mc"]
    assert {mc["id"] for mc in mcs} == set(sim.truth())
    assert all(list(mc)[:2] == ["id", "marketDefinition"] and mc["img"] is True for mc in mcs)
    for mc in mcs:
        for rc in mc["rc"]:
            assert set(rc) <= {"bdatb", "bdatl", "trd", "ltp", "tv", "id"}
            assert list(rc)[-1] == "id"
            assert all(len(lv) == 3 and 0 <= lv[0] < 10 for lv in rc.get("bdatb", []))


@pytest.mark.parametrize(
    ("app_key", "session", "code"),
    [("nope", "sim-session", "INVALID_APP_KEY"), ("", "sim-session", "NO_APP_KEY"),
     ("sim-app-key", "nope", "INVALID_SESSION_INFORMATION"), ("sim-app-key", "", "NO_SESSION")],
)
async def test_bad_credentials_fail_and_close(make_sim, raw, app_key, session, code) -> None:
    sim = await make_sim()
    c = await raw(sim.port)
    status = await c.login(app_key, session)
    assert status["statusCode"] == "FAILURE" and status["errorCode"] == code
    assert status["connectionClosed"] is True and status["id"] == 1
    assert await c.reader.read() == b""


async def test_subscribing_before_authenticating_is_refused(make_sim, raw) -> None:
    sim = await make_sim()
    c = await raw(sim.port)
    await c.recv()
    c.send({"op": "marketSubscription", "id": 5, "marketFilter": {}})
    status = await c.recv()
    assert (status["id"], status["errorCode"], status["connectionClosed"]) == (5, "NOT_AUTHORIZED", True)


async def test_silent_client_times_out(make_sim, raw) -> None:
    sim = await make_sim(auth_timeout_s=0.3)
    c = await raw(sim.port)
    await c.recv()
    status = await c.recv()
    assert status["errorCode"] == "TIMEOUT" and status["connectionClosed"] is True
    assert await c.reader.read() == b""


@pytest.mark.parametrize(
    ("market_filter", "check"),
    [
        ({"eventTypeIds": ["1"]}, lambda md: md["eventTypeId"] == "1"),
        ({"eventTypeIds": ["7", "4339"], "marketTypes": ["WIN"]}, lambda md: md["marketType"] == "WIN"),
        ({"marketTypes": ["OVER_UNDER_25"]}, lambda md: md["marketType"] == "OVER_UNDER_25"),
        ({"countryCodes": ["GB"]}, lambda md: md["countryCode"] == "GB"),
    ],
)
async def test_market_filter_is_honoured(make_sim, raw, market_filter, check) -> None:
    sim = await make_sim(events=16)
    c = await raw(sim.port)
    await c.login()
    msgs = await c.subscribe(marketFilter=market_filter)
    got = markets_of(msgs)
    expected = {mid for mid, mb in sim.books.items() if check(mb.definition)}
    assert expected and {mc["id"] for mc in got} == expected


async def test_market_ids_and_event_ids_filters(make_sim, raw) -> None:
    sim = await make_sim()
    market_id, mb = next(iter(sim.books.items()))
    event_id = mb.definition["eventId"]
    c1 = await raw(sim.port)
    await c1.login()
    assert [mc["id"] for mc in markets_of(await c1.subscribe(marketFilter={"marketIds": [market_id]}))] == [market_id]
    c2 = await raw(sim.port)
    await c2.login()
    got = {mc["id"] for mc in markets_of(await c2.subscribe(marketFilter={"eventIds": [event_id]}))}
    assert got == {mid for mid, b in sim.books.items() if b.definition["eventId"] == event_id}
    # only the subscribed market gets deltas
    assert sim.model is not None
    sim.model.step(now_ms(), 500)
    deltas = [await c1.recv()]
    while True:
        try:
            deltas.append(await c1.recv(timeout_s=0.5))
        except TimeoutError:
            break
    assert {mc["id"] for mc in markets_of(deltas)} == {market_id}


async def test_market_data_filter_selects_columns_and_levels(make_sim, raw) -> None:
    sim = await make_sim()
    sim.freeze()  # the images are compared with the truth read after them: nothing may change in between
    c = await raw(sim.port)
    await c.login()
    msgs = await c.subscribe(marketDataFilter={"fields": ["EX_ALL_OFFERS"]})
    for mc in markets_of(msgs):
        assert "marketDefinition" not in mc and "tv" not in mc
        assert all(set(rc) <= {"atb", "atl", "id"} for rc in mc["rc"])
    c2 = await raw(sim.port)
    await c2.login()
    msgs = await c2.subscribe(marketDataFilter={"fields": ["EX_BEST_OFFERS", "EX_LTP"], "ladderLevels": 3})
    truth = sim.truth()
    for mc in markets_of(msgs):
        for rc in mc["rc"]:
            assert set(rc) <= {"batb", "batl", "ltp", "id"}
            back = truth[mc["id"]]["runners"][str(rc["id"])]["back"][:3]
            assert [[p, s] for _, p, s in sorted(rc.get("batb", []))] == back
            assert [lv for lv, _, _ in rc.get("batb", [])] == list(range(len(back)))


async def test_heartbeat_interval_is_clamped_and_echoed(make_sim, raw) -> None:
    sim = await make_sim()
    c = await raw(sim.port)
    await c.login()
    image = (await c.subscribe(heartbeatMs=100, conflateMs=None, segmentationEnabled=False))[-1]
    assert image["heartbeatMs"] == 500 and image["conflateMs"] == 0
    last = image
    while (m := await c.recv()).get("ct") != "HEARTBEAT":  # lifecycle deltas may come first
        last = m
    # the server's send times (pt), not when this reader got round to the lines: on a loaded machine
    # it may read the last line late, and the heartbeat seemed to come sooner than 500 ms after it
    assert m["clk"] == last["clk"] and 400 <= m["pt"] - last["pt"] < 1000, (last, m)


async def test_large_messages_are_segmented_with_clk_on_seg_end(make_sim, raw) -> None:
    sim = await make_sim(events=12)
    c = await raw(sim.port)
    await c.login()
    msgs = (await c.subscribe(segmentationEnabled=True))[1:]
    assert len(msgs) == -(-len(sim.books) // 5) >= 3
    assert [m["segmentType"] for m in msgs] == ["SEG_START"] + ["SEG"] * (len(msgs) - 2) + ["SEG_END"]
    assert "initialClk" in msgs[0] and "heartbeatMs" in msgs[0]
    assert all("clk" not in m for m in msgs[:-1]) and msgs[-1]["clk"]
    assert all(m["ct"] == "SUB_IMAGE" and len(m["mc"]) <= 5 for m in msgs)


async def test_resubscribe_with_tokens_gets_resub_delta_and_bad_tokens_invalid_clock(make_sim, raw) -> None:
    sim = await make_sim()
    c1 = await raw(sim.port)
    await c1.login()
    image = (await c1.subscribe(segmentationEnabled=False))[-1]
    c1.close()
    c2 = await raw(sim.port)
    await c2.login()
    resub = (await c2.subscribe(segmentationEnabled=False, initialClk=image["initialClk"], clk=image["clk"]))[-1]
    assert resub["ct"] == "RESUB_DELTA" and resub["initialClk"] == image["initialClk"]
    assert resub["clk"] != image["clk"]
    assert {mc["id"] for mc in resub["mc"]} == set(sim.books) and all(mc["img"] for mc in resub["mc"])
    c3 = await raw(sim.port)
    await c3.login()
    status = (await c3.subscribe(initialClk=image["initialClk"], clk="AAAAAAAAAAB/"))[0]
    assert status["errorCode"] == "INVALID_CLOCK" and status["connectionClosed"] is True


async def test_deltas_follow_the_esa_rules_and_conflation_merges(make_sim, raw) -> None:
    sim = await make_sim(rate_per_s=400.0, time_scale=60.0)
    c = await raw(sim.port)
    await c.login()
    await c.subscribe(conflateMs=300, segmentationEnabled=False,
                      marketDataFilter={"fields": ["EX_ALL_OFFERS", "EX_BEST_OFFERS", "EX_TRADED", "EX_LTP",
                                                   "EX_TRADED_VOL", "EX_MARKET_DEF"], "ladderLevels": 10})
    deltas = []
    async with asyncio.timeout(5):
        while len(deltas) < 4:
            m = await c.recv()
            if "mc" in m:
                deltas.append(m)
    gaps = [b["pt"] - a["pt"] for a, b in zip(deltas, deltas[1:], strict=False)]
    assert min(gaps) >= 290
    assert any(mc.get("con") is True for mc in markets_of(deltas))
    for mc in markets_of(deltas):
        assert list(mc)[0] == "id"
        if mc.get("img"):
            assert "marketDefinition" in mc
        for rc in mc.get("rc", ()):
            for side in ("atb", "atl", "trd"):
                assert all(len(ps) == 2 and ps[1] >= 0 for ps in rc.get(side, ()))
            for side in ("batb", "batl"):
                assert all(len(lv) == 3 and (lv[2] > 0 or lv[1:] == [0, 0]) for lv in rc.get(side, ()))


async def test_fault_switches_degrade_stall_and_malformed(make_sim, raw) -> None:
    sim = await make_sim()
    c = await raw(sim.port)
    await c.login()
    await c.subscribe(heartbeatMs=500)
    await c.until_heartbeat()
    sim.set_degraded(True)
    beat = await c.recv()
    assert beat["status"] == 503 and list(beat) == ["op", "id", "clk", "status", "pt", "ct"]
    sim.set_degraded(False)
    sim.inject_malformed(2)
    bad = [await c.recv_raw() for _ in range(2)]
    for line in bad:
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(line)
    assert "status" not in orjson.loads(await c.recv_raw())
    sim.stall(1.2)
    with pytest.raises(TimeoutError):
        await c.recv(timeout_s=0.9)
    assert (await c.recv())["ct"] == "HEARTBEAT"
    sim.drop_connections()
    assert await asyncio.wait_for(c.reader.read(), 10) == b""


async def test_betfairlightweight_rebuilds_the_same_books(make_sim, raw) -> None:
    """The stream is real enough for the reference consumer library."""
    streaming = pytest.importorskip("betfairlightweight.streaming")
    sim = await make_sim(rate_per_s=0.0)
    listener = streaming.StreamListener(max_latency=None, lightweight=True)
    listener.register_stream(2, "marketSubscription")
    c = await raw(sim.port)
    await c.login()
    fields = ["EX_ALL_OFFERS", "EX_TRADED", "EX_TRADED_VOL", "EX_LTP", "EX_MARKET_DEF"]
    for m in await c.subscribe(marketDataFilter={"fields": fields}, heartbeatMs=500):
        listener.on_data(orjson.dumps(m).decode())
    assert sim.model is not None
    for _ in range(10):
        sim.model.step(now_ms(), 100)
        await asyncio.sleep(0.02)
    while True:  # until a heartbeat: everything before it has been read
        m = await c.recv()
        listener.on_data(orjson.dumps(m).decode())
        if m.get("ct") == "HEARTBEAT":
            break
    truth = sim.truth()
    books = listener.stream.snap()
    assert {b["marketId"] for b in books} == set(truth)
    for b in books:
        t = truth[b["marketId"]]
        assert b["status"] == t["status"] and b["inplay"] == t["in_play"]
        for r in b["runners"]:
            tr = t["runners"][str(r["selectionId"])]
            assert [[x["price"], x["size"]] for x in r["ex"]["availableToBack"]] == tr["back"]
            assert [[x["price"], x["size"]] for x in r["ex"]["availableToLay"]] == tr["lay"]
            assert r["lastPriceTraded"] == tr["ltp"] and r["status"] == tr["status"]


# -- recorded-file mode -------------------------------------------------------------------------


@pytest.mark.shared_data
async def test_replay_serves_recorded_files_as_our_own_stream(make_sim) -> None:
    files = [SHARED / "flumine" / "1.197931750", SHARED / "flumine" / "1.197931751"]
    if not all(f.exists() for f in files):
        pytest.skip(f"recorded files not found under {SHARED}")
    sim = await make_sim(replay=tuple(map(str, files)), speed=None)
    lines: list[bytes] = []

    async def on_lines(batch: list[bytes], recv_ms: int) -> None:
        lines.extend(batch)

    client = EsaClient(host="127.0.0.1", port=sim.port, app_key="sim-app-key", session_token="sim-session",
                       market_filter={}, market_data_filter={"fields": ["EX_ALL_OFFERS", "EX_TRADED",
                                                                          "EX_TRADED_VOL", "EX_LTP",
                                                                          "EX_MARKET_DEF"]},
                       heartbeat_ms=500, on_lines=on_lines)
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(sim.replay_done.wait(), 10)
        async with asyncio.timeout(5):  # wait for a heartbeat after the end of the replay
            while not lines or orjson.loads(lines[-1]).get("ct") != "HEARTBEAT":
                await asyncio.sleep(0.02)
    finally:
        client.stop()
        await task
    msgs = [orjson.loads(line) for line in lines]
    assert all(abs(m["pt"] - now_ms()) < 15_000 for m in msgs)  # pt rewritten to now
    assert all(m["id"] == sim.subscriptions[0]["id"] for m in msgs)
    # rebuild with a plain cache and compare with the recording's final state
    state: dict[str, dict[Any, dict[str, Any]]] = {}
    status: dict[str, str] = {}
    for mc in markets_of(msgs):
        runners = state.setdefault(mc["id"], {})
        if mc.get("img"):
            runners.clear()
        if "marketDefinition" in mc:
            status[mc["id"]] = mc["marketDefinition"]["status"]
        for rc in mc.get("rc", ()):
            r = runners.setdefault(rc["id"], {"atb": {}, "atl": {}, "ltp": None})
            for side in ("atb", "atl"):
                for p, s in rc.get(side, ()):
                    if s == 0:
                        r[side].pop(p, None)
                    else:
                        r[side][p] = s
            r["ltp"] = rc.get("ltp", r["ltp"])
    truth = sim.truth()
    assert set(state) == set(truth) == {"1.197931750", "1.197931751"}
    for market_id, runners in state.items():
        assert status[market_id] == truth[market_id]["status"]
        for sid, r in runners.items():
            tr = truth[market_id]["runners"][str(sid)]
            assert sorted(r["atb"].items(), reverse=True) == [tuple(x) for x in tr["back"]]
            assert sorted(r["atl"].items()) == [tuple(x) for x in tr["lay"]]
            assert r["ltp"] == tr["ltp"]
    # and the recording's own last definition says the same
    last_status = {}
    for path in files:
        for raw_line in path.read_bytes().splitlines():
            msg = orjson.loads(raw_line)
            for mc in msg.get("mc", ()):
                if "marketDefinition" in mc:
                    last_status[mc["id"]] = mc["marketDefinition"]["status"]
    assert last_status == status


@pytest.mark.shared_data
async def test_replay_paces_by_publish_time(make_sim, raw) -> None:
    path = SHARED / "betfair_parser" / "1.164917629.bz2"
    if not path.exists():
        pytest.skip(f"recorded file not found: {path}")
    sim = await make_sim(replay=(str(path),), speed=250.0)
    c = await raw(sim.port)
    await c.login()
    await c.subscribe(segmentationEnabled=False)
    t0 = time.monotonic()
    await asyncio.wait_for(sim.replay_done.wait(), 15)
    elapsed = time.monotonic() - t0
    from feed.simulator.recorded import read_messages
    pts = [pt for pt, _ in read_messages(path)]
    expected = (pts[-1] - pts[0]) / 1000 / 250.0  # ~1.5 s
    assert expected * 0.7 < elapsed + 0.5 and elapsed < expected * 1.5 + 1.0


def test_a_line_write_to_a_peer_gone_before_it_was_noticed_is_dropped_under_uvloop() -> None:
    """The simulators run on uvloop, whose transports raise on a write once closed (asyncio's only
    log). A fault row killed a client between its connection closing and the simulator noticing:
    the ESA ticker's next write raised and ended the ticker — every later subscription got no data
    at all (a fault-suite row missed on it). A write to a closing transport is now dropped and the
    connection marked closed."""
    uvloop = pytest.importorskip("uvloop")
    from feed.simulator.esa_line import LineConn

    async def main() -> tuple[bool, bool]:
        accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put(writer)
        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _r, client = await asyncio.open_connection("127.0.0.1", port)
        writer = await asyncio.wait_for(accepted.get(), 10)
        conn = LineConn(writer, "sim-test")
        conn.write([b'{"op":"heartbeat"}'])  # a live peer: written
        writer.transport.close()
        await asyncio.sleep(0)  # (the close completes: uvloop's handle is gone)
        conn.write([b'{"op":"heartbeat"}'])  # raised RuntimeError before
        client.close()
        server.close()
        await server.wait_closed()
        return conn.closed, True

    closed, ran = uvloop.run(main())
    assert ran and closed
