"""feed.sources.esa.EsaClient against the local ESA simulator (real sockets, 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from feed.simulator import Simulator, SimulatorConfig, default_market_data_filter
from feed.sources.esa import EsaClient, EsaError, EsaFatalError

pytestmark = pytest.mark.timeout(20)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- a tiny ESA cache, independent of the simulator's code ---------------------------


class Book:
    """Rebuilds markets from raw mcm lines (the ESA delta rules, nothing else)."""

    def __init__(self) -> None:
        self.markets: dict[str, dict[str, Any]] = {}

    def apply(self, line: bytes) -> None:
        msg = orjson.loads(line)
        if msg.get("ct") == "SUB_IMAGE" and msg.get("segmentType") in (None, "SEG_START"):
            self.markets.clear()
        for mc in msg.get("mc") or ():
            if mc.get("img") or mc["id"] not in self.markets:
                self.markets[mc["id"]] = {"md": None, "tv": None, "runners": {}}
            m = self.markets[mc["id"]]
            if "marketDefinition" in mc:
                m["md"] = mc["marketDefinition"]
            if "tv" in mc:
                m["tv"] = mc["tv"]
            for rc in mc.get("rc") or ():
                r = m["runners"].setdefault(rc["id"], {"bdatb": {}, "bdatl": {}, "ltp": None, "tv": None})
                for side in ("bdatb", "bdatl"):
                    for level, price, size in rc.get(side, ()):
                        if size == 0:
                            r[side].pop(level, None)
                        else:
                            r[side][level] = [price, size]
                for key in ("ltp", "tv"):
                    if key in rc:
                        r[key] = rc[key]

    def view(self) -> dict[str, Any]:
        """Same shape as ``Simulator.truth()`` (ladders cut to 10 levels)."""
        out = {}
        for market_id, m in self.markets.items():
            md = m["md"] or {}
            runners = {}
            for rd in md.get("runners", ()):
                r = m["runners"].get(rd["id"], {"bdatb": {}, "bdatl": {}, "ltp": None, "tv": None})
                runners[str(rd["id"])] = {
                    "back": [r["bdatb"][lv] for lv in sorted(r["bdatb"])],
                    "lay": [r["bdatl"][lv] for lv in sorted(r["bdatl"])],
                    "ltp": r["ltp"],
                    "tv": r["tv"],
                    "status": rd["status"],
                }
            out[market_id] = {"status": md.get("status"), "in_play": md.get("inPlay", False),
                              "version": md.get("version"), "runners": runners}
        return out


def truth_view(sim: Simulator) -> dict[str, Any]:
    truth = sim.truth()
    for m in truth.values():
        for r in m["runners"].values():
            r["back"], r["lay"] = r["back"][:10], r["lay"][:10]
    return truth


# -- harness ----------------------------------------------------------------------------


class Recorder:
    """Collects what the client hands over."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.lines: list[bytes] = []
        self.health: list[tuple[str, str | None]] = []
        self.cursor_at_health: list[tuple[str | None, str | None]] = []
        self.book = Book()
        self.malformed: list[bytes] = []
        self.client: EsaClient | None = None
        self.cursor_violations: list[str] = []

    async def on_lines(self, lines: list[bytes], recv_ms: int) -> None:
        assert abs(recv_ms - now_ms()) < 5000
        self.calls.append(list(lines))
        self.lines.extend(lines)
        last_clk = None
        for line in lines:
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.malformed.append(line)
                continue
            self.book.apply(line)
            if msg.get("segmentType") in (None, "SEG_END") and msg.get("clk"):
                last_clk = msg["clk"]
        # the cursor must not advance before on_lines returned
        if self.client is not None and last_clk is not None and self.client.cursor[1] == last_clk:
            self.cursor_violations.append(last_clk)
        await asyncio.sleep(0)

    def on_health(self, state: str, reason: str | None) -> None:
        self.health.append((state, reason))
        if self.client is not None:
            self.cursor_at_health.append(self.client.cursor)

    def messages(self, **match: Any) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if all(msg.get(k) == v for k, v in match.items()):
                out.append(msg)
        return out

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(0.01)


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., tuple[EsaClient, Recorder, asyncio.Task[None]]]]:
    running: list[tuple[EsaClient, asyncio.Task[None]]] = []

    def make(port: int, **overrides: Any) -> tuple[EsaClient, Recorder, asyncio.Task[None]]:
        rec = Recorder()
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "app_key": "sim-app-key",
            "session_token": "sim-session",
            "market_filter": {},
            "market_data_filter": default_market_data_filter(),
            "heartbeat_ms": 500,
            "on_lines": rec.on_lines,
            "on_health": rec.on_health,
            "connect_timeout_s": 3.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
        }
        options.update(overrides)
        client = EsaClient(**options)
        rec.client = client
        task = asyncio.create_task(client.run())
        running.append((client, task))
        return client, rec, task

    yield make
    for client, task in running:
        client.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)


def step_model(sim: Simulator, updates: int) -> None:
    assert sim.model is not None
    sim.model.step(now_ms(), updates)


# -- tests ------------------------------------------------------------------------------


async def test_client_subscribes_gets_image_then_deltas_and_rebuilds_the_truth(make_sim, make_client) -> None:
    sim = await make_sim()
    client, rec, _ = make_client(sim.port)
    await rec.wait_for(lambda: rec.health == [("UP", None)] and rec.book.markets)

    assert client.connection_id is not None and client.connection_id.startswith("sim-")
    first = orjson.loads(rec.lines[0])
    assert first["op"] == "mcm" and first["ct"] == "SUB_IMAGE" and first["initialClk"]
    assert first["heartbeatMs"] == 500 and first["conflateMs"] == 0
    image_markets = [mc for msg in rec.messages(ct="SUB_IMAGE") for mc in msg["mc"]]
    assert {mc["id"] for mc in image_markets} == set(sim.truth())
    assert all(mc["img"] is True and "marketDefinition" in mc for mc in image_markets)
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))

    for _ in range(5):
        step_model(sim, 200)
        await asyncio.sleep(0.05)
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))
    deltas = [m for m in rec.messages(op="mcm") if "ct" not in m]
    assert len(deltas) >= 5
    assert all(not mc.get("img") for m in deltas for mc in m["mc"] if mc["id"] in {i["id"] for i in image_markets})
    assert client.cursor[0] == first["initialClk"]
    assert client.cursor[1] == rec.messages(op="mcm")[-1]["clk"]
    assert rec.cursor_violations == []
    assert client.reconnects == 0 and client.messages_received >= len(rec.lines)
    assert sim.subscriptions[0]["marketDataFilter"] == default_market_data_filter()
    assert "initialClk" not in sim.subscriptions[0] and "conflateMs" not in sim.subscriptions[0]


async def test_subscription_message_carries_conflation_only_when_asked(make_sim, make_client) -> None:
    sim = await make_sim(rate_per_s=300.0)
    _, rec, _ = make_client(sim.port, conflate_ms=250, segmentation=False,
                            market_filter={"eventTypeIds": ["1", "2"]})
    await rec.wait_for(lambda: len(rec.messages(op="mcm")) >= 5)
    sub = sim.subscriptions[0]
    assert list(sub) == ["op", "id", "marketFilter", "marketDataFilter", "heartbeatMs", "conflateMs",
                         "segmentationEnabled"]
    assert sub["conflateMs"] == 250 and sub["segmentationEnabled"] is False
    deltas = [m for m in rec.messages(op="mcm") if "ct" not in m]
    gaps = [b["pt"] - a["pt"] for a, b in zip(deltas, deltas[1:], strict=False)]
    assert gaps and min(gaps) >= 240
    assert any(mc.get("con") for m in deltas for mc in m["mc"])
    assert all(mc["marketDefinition"]["eventTypeId"] in ("1", "2")
               for m in rec.messages(ct="SUB_IMAGE") for mc in m["mc"])


@pytest.mark.parametrize(
    ("overrides", "code"),
    [({"app_key": "wrong"}, "INVALID_APP_KEY"), ({"session_token": "stale"}, "INVALID_SESSION_INFORMATION")],
)
async def test_authentication_failure_is_fatal_and_not_retried(make_sim, make_client, overrides, code) -> None:
    sim = await make_sim()
    client, rec, task = make_client(sim.port, **overrides)
    with pytest.raises(EsaFatalError) as info:
        await asyncio.wait_for(task, 5)
    assert info.value.code == code
    assert str(info.value).startswith(f"esa authentication failed: {code}")
    assert rec.health[-1] == ("DOWN", code.lower())
    assert client.reconnects == 0 and sim.connections_accepted == 1
    assert rec.lines == []


async def test_heartbeats_arrive_when_idle_and_the_echoed_interval_is_used(make_sim, make_client) -> None:
    sim = await make_sim()
    client, rec, _ = make_client(sim.port, heartbeat_ms=100)  # the server clamps to 500
    await rec.wait_for(lambda: len(rec.messages(ct="HEARTBEAT")) >= 3, timeout_s=4)
    assert client.heartbeat_ms == 500
    beats = rec.messages(ct="HEARTBEAT")
    assert list(beats[0]) == ["op", "id", "clk", "pt", "ct"]
    assert all(400 <= b["pt"] - a["pt"] <= 900 for a, b in zip(beats, beats[1:], strict=False))
    assert rec.health == [("UP", None)] and client.reconnects == 0
    assert client.cursor[1] == beats[-1]["clk"]


async def test_status_503_degrades_without_disconnecting_then_recovers(make_sim, make_client) -> None:
    sim = await make_sim(rate_per_s=100.0)
    client, rec, _ = make_client(sim.port)
    await rec.wait_for(lambda: rec.health == [("UP", None)])
    connection_id = client.connection_id
    sim.set_degraded(True)
    await rec.wait_for(lambda: rec.health[-1] == ("DEGRADED", "upstream_503"))
    await asyncio.sleep(0.3)
    assert rec.messages(status=503)
    sim.set_degraded(False)
    await rec.wait_for(lambda: rec.health[-1] == ("UP", None))
    assert rec.health == [("UP", None), ("DEGRADED", "upstream_503"), ("UP", None)]
    assert client.reconnects == 0 and client.connection_id == connection_id


async def test_stall_is_a_dead_link_then_resume_with_resub_delta(make_sim, make_client) -> None:
    sim = await make_sim()
    client, rec, _ = make_client(sim.port)
    await rec.wait_for(lambda: rec.health == [("UP", None)] and rec.book.view() == truth_view(sim))
    step_model(sim, 100)
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))

    sim.stall(5.0)
    await asyncio.sleep(0.05)
    step_model(sim, 300)  # changes the client misses while the link is dead
    await rec.wait_for(lambda: ("DOWN", "heartbeat_missed") in rec.health, timeout_s=3)
    cursor_when_down = rec.cursor_at_health[rec.health.index(("DOWN", "heartbeat_missed"))]
    await rec.wait_for(lambda: rec.health[-1] == ("UP", None) and client.reconnects >= 1)

    resub = sim.subscriptions[-1]
    assert (resub["initialClk"], resub["clk"]) == cursor_when_down
    assert {k: v for k, v in resub.items() if k not in ("id", "initialClk", "clk")} == {
        k: v for k, v in sim.subscriptions[0].items() if k != "id"}
    resubs = rec.messages(ct="RESUB_DELTA")
    assert resubs and resubs[0]["initialClk"] == cursor_when_down[0]
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))
    assert rec.cursor_violations == []


async def test_drop_connections_reconnects_and_resumes(make_sim, make_client) -> None:
    sim = await make_sim()
    client, rec, _ = make_client(sim.port)
    # UP comes with the first message, the cursor once its delivery is handed over: wait for both
    await rec.wait_for(lambda: rec.health == [("UP", None)] and client.cursor[0] is not None)
    first_connection = client.connection_id
    cursor = client.cursor
    sim.drop_connections()
    step_model(sim, 200)
    await rec.wait_for(lambda: ("DOWN", "reconnecting") in rec.health)
    await rec.wait_for(lambda: rec.health[-1] == ("UP", None) and client.reconnects >= 1)
    assert client.connection_id != first_connection
    assert sim.subscriptions[-1]["initialClk"] == cursor[0] and sim.subscriptions[-1]["clk"]
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))


async def test_stored_cursor_from_a_previous_run_resumes(make_sim, make_client) -> None:
    sim = await make_sim()
    first, rec1, task1 = make_client(sim.port)
    await rec1.wait_for(lambda: rec1.health == [("UP", None)])
    await rec1.wait_for(lambda: all(first.cursor))  # the image's clk is committed once delivered (UP comes first)
    first.stop()
    await asyncio.wait_for(task1, 5)
    initial_clk, clk = first.cursor
    assert initial_clk and clk

    second, rec2, _ = make_client(sim.port, initial_clk=initial_clk, clk=clk)
    await rec2.wait_for(lambda: rec2.health == [("UP", None)])
    assert sim.subscriptions[-1]["initialClk"] == initial_clk and sim.subscriptions[-1]["clk"] == clk
    assert orjson.loads(rec2.lines[0])["ct"] == "RESUB_DELTA"
    assert second.reconnects == 0


async def test_invalid_clock_drops_the_tokens_and_takes_a_fresh_image(make_sim, make_client) -> None:
    sim = await make_sim()
    client, rec, _ = make_client(sim.port, initial_clk="bm90LWEtcmVhbC1jbGs=", clk="AAAAAAAAAAAF")
    await rec.wait_for(lambda: rec.health and rec.health[-1] == ("UP", None))
    assert len(sim.subscriptions) == 2
    assert sim.subscriptions[0]["initialClk"] == "bm90LWEtcmVhbC1jbGs="
    assert "initialClk" not in sim.subscriptions[1] and "clk" not in sim.subscriptions[1]
    assert orjson.loads(rec.lines[0])["ct"] == "SUB_IMAGE"
    assert client.reconnects == 1
    assert client.cursor[0] != "bm90LWEtcmVhbC1jbGs="
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))


async def test_malformed_lines_are_handed_over_and_the_stream_goes_on(make_sim, make_client) -> None:
    sim = await make_sim()
    client, rec, _ = make_client(sim.port)
    await rec.wait_for(lambda: rec.health == [("UP", None)])
    sim.inject_malformed(3)
    step_model(sim, 50)
    await rec.wait_for(lambda: len(rec.malformed) == 3)
    beats = len(rec.messages(ct="HEARTBEAT"))
    await rec.wait_for(lambda: len(rec.messages(ct="HEARTBEAT")) > beats)
    assert rec.health == [("UP", None)] and client.reconnects == 0
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))


async def test_a_segment_cut_by_a_disconnect_is_never_handed_over(make_sim, make_client) -> None:
    sim = await make_sim(segment_markets=3)
    sim.drop_mid_segment(1)  # the first image loses its SEG_END and the connection
    client, rec, _ = make_client(sim.port)
    await rec.wait_for(lambda: rec.health and rec.health[-1] == ("UP", None) and client.reconnects == 1)
    await rec.wait_for(lambda: rec.book.view() == truth_view(sim))

    for call in rec.calls:  # whole segments only, START..END inside one hand-over
        kinds = [orjson.loads(line).get("segmentType") for line in call]
        open_segment = False
        for kind in kinds:
            if kind == "SEG_START":
                assert not open_segment
                open_segment = True
            elif kind in ("SEG", "SEG_END"):
                assert open_segment
                open_segment = kind != "SEG_END"
        assert not open_segment
    starts = rec.messages(ct="SUB_IMAGE", segmentType="SEG_START")
    assert len(starts) == 1  # the cut image never reached on_lines
    assert len(sim.subscriptions) == 2 and "clk" not in sim.subscriptions[1]


async def test_connection_refused_retries_with_backoff_until_stopped() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    rec = Recorder()
    client = EsaClient(host="127.0.0.1", port=port, app_key="k", session_token="s", market_filter={},
                       market_data_filter=default_market_data_filter(), on_lines=rec.on_lines,
                       on_health=rec.on_health, backoff_initial_s=0.02, backoff_max_s=0.05)
    task = asyncio.create_task(client.run())
    await rec.wait_for(lambda: client.reconnects >= 3)
    assert rec.health == [("DOWN", "reconnecting")]
    client.stop()
    await asyncio.wait_for(task, 10)
    assert task.result() is None


async def test_errors_raised_by_on_lines_propagate(make_sim) -> None:
    sim = await make_sim()

    async def on_lines(lines: list[bytes], recv_ms: int) -> None:
        raise OSError("downstream broke")

    client = EsaClient(host="127.0.0.1", port=sim.port, app_key="sim-app-key", session_token="sim-session",
                       market_filter={}, market_data_filter=default_market_data_filter(), on_lines=on_lines)
    with pytest.raises(OSError, match="downstream broke"):
        await asyncio.wait_for(client.run(), 5)
    assert client.reconnects == 0


def test_error_strings_are_lowercase_facts() -> None:
    assert str(EsaFatalError("INVALID_APP_KEY", request="authentication")) == (
        "esa authentication failed: INVALID_APP_KEY")
    err = EsaError("TOO_MANY_REQUESTS", "slow down", request="subscription")
    assert (err.code, err.message) == ("TOO_MANY_REQUESTS", "slow down")
    assert str(err) == "esa subscription failed: TOO_MANY_REQUESTS (slow down)"
    assert not isinstance(err, EsaFatalError)


async def test_lifecycle_is_logged_without_secrets(make_sim, make_client, caplog) -> None:
    caplog.set_level("DEBUG", logger="feed.sources.esa")
    sim = await make_sim()
    client, rec, _ = make_client(sim.port)
    await rec.wait_for(lambda: rec.health == [("UP", None)])
    sim.drop_connections()
    await rec.wait_for(lambda: rec.health[-1] == ("UP", None) and client.reconnects == 1)
    text = caplog.text
    assert client.connection_id in text and "subscribed" in text and "reconnecting in" in text
    assert "sim-app-key" not in text and "sim-session" not in text and "sim-app-key" not in repr(client)
    esa_records = [r for r in caplog.records if r.name == "feed.sources.esa"]
    assert len(esa_records) < 20  # lifecycle only, never one line per message


# -- scripted servers: protocol corners the simulator does not produce -----------------


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Any]]:
    """``await scripted(answer)`` starts a server on 127.0.0.1 calling
    ``answer(request: dict, count: int) -> list[dict]`` for each client line;
    returns ``(port, requests, connections)``."""
    servers: list[asyncio.Server] = []

    async def start(answer: Callable[[dict[str, Any], int], list[dict[str, Any]]]) -> tuple[int, list, list]:
        requests: list[dict[str, Any]] = []
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(len(connections) + 1)
            writer.write(b'{"op":"connection","connectionId":"scripted"}\r\n')
            try:
                while line := await reader.readline():
                    req = orjson.loads(line)
                    requests.append(req)
                    for msg in answer(req, len(requests)):
                        writer.write(orjson.dumps(msg) + b"\r\n")
                        if msg.get("connectionClosed"):
                            writer.close()
                            return
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1], requests, connections

    yield start
    for server in servers:
        server.close()


def ok(req: dict[str, Any]) -> dict[str, Any]:
    return {"op": "status", "id": req["id"], "statusCode": "SUCCESS", "connectionClosed": False}


def fail(req: dict[str, Any], code: str, closed: bool) -> dict[str, Any]:
    return {"op": "status", "id": req["id"], "statusCode": "FAILURE", "errorCode": code,
            "errorMessage": "scripted", "connectionClosed": closed}


def image(req: dict[str, Any]) -> dict[str, Any]:
    return {"op": "mcm", "id": req["id"], "initialClk": "SU5JVA==", "clk": "AAAB", "conflateMs": 0,
            "heartbeatMs": 500, "pt": now_ms(), "ct": "SUB_IMAGE", "mc": []}


async def test_invalid_clock_on_an_open_connection_resubscribes_in_place(scripted, make_client) -> None:
    def answer(req: dict[str, Any], n: int) -> list[dict[str, Any]]:
        if req["op"] == "authentication":
            return [ok(req)]
        if "clk" in req:
            return [fail(req, "INVALID_CLOCK", closed=False)]
        return [ok(req), image(req)]

    port, requests, connections = await scripted(answer)
    client, rec, _ = make_client(port, initial_clk="b2xk", clk="b2xk")
    await rec.wait_for(lambda: rec.health == [("UP", None)])
    subs = [r for r in requests if r["op"] == "marketSubscription"]
    assert [("clk" in s) for s in subs] == [True, False]
    assert subs[0]["id"] != subs[1]["id"]
    assert connections == [1] and client.reconnects == 0
    assert client.cursor == ("SU5JVA==", "AAAB")


async def test_retryable_failures_reconnect_with_backoff(scripted, make_client) -> None:
    def answer(req: dict[str, Any], n: int) -> list[dict[str, Any]]:
        if req["op"] == "authentication":
            return [ok(req)]
        if n < 6:
            return [fail(req, "TOO_MANY_REQUESTS", closed=True)]
        return [ok(req), image(req)]

    port, requests, connections = await scripted(answer)
    client, rec, _ = make_client(port)
    await rec.wait_for(lambda: rec.health and rec.health[-1] == ("UP", None))
    assert len(connections) == 3 and client.reconnects == 2
    assert rec.health == [("DOWN", "reconnecting"), ("UP", None)]


@pytest.mark.parametrize("code", ["SUBSCRIPTION_LIMIT_EXCEEDED", "INVALID_INPUT", "NOT_AUTHORIZED"])
async def test_fatal_subscription_failures_are_raised(scripted, make_client, code) -> None:
    def answer(req: dict[str, Any], n: int) -> list[dict[str, Any]]:
        if req["op"] == "authentication":
            return [ok(req)]
        return [fail(req, code, closed=code != "SUBSCRIPTION_LIMIT_EXCEEDED")]

    port, _, connections = await scripted(answer)
    client, rec, task = make_client(port)
    with pytest.raises(EsaFatalError) as info:
        await asyncio.wait_for(task, 5)
    assert info.value.code == code and info.value.request == "subscription"
    assert connections == [1] and rec.health == [("DOWN", code.lower())]


async def test_a_stream_trickled_byte_by_byte_goes_through_the_protocol(make_client) -> None:
    """Lines split across reads, a segmented image, a 503, a heartbeat and an
    unknown op: the glue hands over whole lines, the segment in one call, and
    stores the cursor the protocol tracked."""

    def mcm(**msg: Any) -> dict[str, Any]:
        return {"op": "mcm", "id": 2, "pt": now_ms(), **msg}

    stream = [
        mcm(initialClk="I1", ct="SUB_IMAGE", heartbeatMs=500, segmentType="SEG_START", mc=[]),
        mcm(ct="SUB_IMAGE", segmentType="SEG", mc=[]),
        mcm(ct="SUB_IMAGE", segmentType="SEG_END", clk="C1", mc=[]),
        {"op": "ohlc", "id": 2},
        mcm(status=503),
        mcm(clk="C2", mc=[]),
        mcm(clk="C3", ct="HEARTBEAT"),
    ]
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def trickle(data: bytes) -> None:
            for i in range(0, len(data), 7):
                writer.write(data[i:i + 7])
                await writer.drain()
                await asyncio.sleep(0)

        try:
            await trickle(b'{"op":"connection","connectionId":"trickle"}\r\n')
            auth = orjson.loads(await reader.readline())
            await trickle(orjson.dumps(ok(auth)) + b"\r\n")
            sub = orjson.loads(await reader.readline())
            await trickle(orjson.dumps(ok(sub)) + b"\r\n")
            await trickle(b"".join(orjson.dumps(m) + b"\r\n" for m in stream))
            await done.wait()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        client, rec, _ = make_client(server.sockets[0].getsockname()[1])
        await rec.wait_for(lambda: client.cursor == ("I1", "C3"))
        assert [orjson.loads(x) for x in rec.lines] == [m for m in stream if m["op"] == "mcm"]
        assert any(len(call) >= 3 for call in rec.calls if b"SEG_START" in call[0])
        assert rec.health == [("UP", None), ("DEGRADED", "upstream_503"), ("UP", None)]
        assert client.connection_id == "trickle" and client.messages_received == len(stream) + 3
        assert rec.cursor_violations == []
    finally:
        done.set()
        server.close()


async def test_tls_connection_to_the_simulator(make_client, tmp_path) -> None:
    import ssl

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.create_default_context(cafile=str(cert_file))

    sim = Simulator(SimulatorConfig(seed=2, rate_per_s=0.0, time_scale=1.0), ssl=server_ctx)
    await sim.start()
    try:
        client, rec, _ = make_client(sim.port, ssl=client_ctx)
        await rec.wait_for(lambda: rec.health == [("UP", None)] and rec.book.view() == truth_view(sim))
        assert client.reconnects == 0
    finally:
        await sim.stop()
