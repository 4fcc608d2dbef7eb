"""Recording any live source and replaying it: the replay ends at the snapshot
the live run stored (real simulators on 127.0.0.1, the real pipeline, the
embedded Redis), and the recording formats are what they claim to be."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import redis.asyncio as aioredis

from feed.models import Market
from feed.pipeline import Pipeline, run_spec
from feed.recorder import Recorder, read_recording, safe_options
from feed.settings import Settings
from feed.sources.base import Payload, Source
from feed.sources.recording import replay_recordings
from feed.sources.replay import read_messages
from feed.sources.spec import parse_source_spec
from feed.store import Store
from tests.poller_helpers import FAST
from tests.rabbitmq import rabbitmq_url  # noqa: F401 - the session fixture (uof)
from tests.streaming_helpers import cancel_and_wait, eventually

pytestmark = pytest.mark.timeout(120)


# --- the recorder itself ------------------------------------------------------------------


def test_oddsfeed_format_round_trips_bytes_channels_and_times_and_leaves_out_credentials(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, source="pn", kind="pinnacle",
                   options={"user": "demo", "password": "s3cret", "api_key": "k", "sports": "29", "prefix": "x"})
    payloads = [Payload(1_755_349_200_000, b'{"sportId":29}', "odds:29:snapshot"),
                Payload(1_755_349_200_500, b"\xff\xfe not utf-8", "fixtures:29:since"),
                Payload(1_755_349_200_700, b'{"last":5}', "odds:29:since", 31_250),  # a cache's answer: its age kept
                Payload(1_755_435_600_000, b"[]", "")]  # the next UTC day: a new file
    rec.write(payloads)
    rec.close()
    files = sorted((tmp_path / "pn").iterdir())
    assert [f.suffixes[-2:] for f in files] == [[".jsonl", ".gz"], [".jsonl", ".gz"]]
    text = b"".join(gzip.decompress(f.read_bytes()) for f in files)
    assert b"s3cret" not in text and b"demo" not in text
    back = [p for f in files for p in read_recording(f).payloads]
    assert back == payloads
    head = read_recording(files[0])
    assert (head.kind, head.source, head.options) == ("pinnacle", "pn", {"sports": "29", "prefix": "x"})
    assert safe_options({"session": "t", "app_key": "a", "heartbeat_ms": "1000"}) == {"heartbeat_ms": "1000"}


def test_a_format_1_recording_still_reads_and_a_line_of_too_many_fields_is_refused(tmp_path: Path) -> None:
    from feed.errors import ConfigError

    head = orjson.dumps({"oddsfeed_recording": 1, "kind": "pinnacle", "source": "pn", "options": {},
                         "started_at": 1_755_349_200_000})
    old = tmp_path / "old.jsonl"
    old.write_bytes(head + b"\n" + orjson.dumps([1_755_349_200_000, "odds:29:since", '{"last":5}']) + b"\n")
    assert read_recording(old).payloads == [Payload(1_755_349_200_000, b'{"last":5}', "odds:29:since", 0)]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(head + b"\n" + orjson.dumps([1_755_349_200_000, "", "{}", 5, 6]) + b"\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: unreadable recording line \(5 fields"):
        read_recording(bad)
    future = tmp_path / "future.jsonl"
    future.write_bytes(orjson.dumps({"oddsfeed_recording": 3, "kind": "pinnacle", "source": "pn"}) + b"\n")
    with pytest.raises(ConfigError, match="format 1 or 2"):
        read_recording(future)


def test_esa_recordings_are_betfair_historic_lines(tmp_path: Path) -> None:
    lines = [b'{"op":"mcm","id":2,"clk":"A","pt":1755349200000,"mc":[]}',
             b'{"op":"mcm","id":2,"clk":"B","pt":1755349201000,"ct":"HEARTBEAT"}']
    rec = Recorder(tmp_path, source="betfair", kind="esa")
    rec.write([Payload(1_755_349_200_010 + i, line) for i, line in enumerate(lines)])
    rec.close()
    (f,) = (tmp_path / "betfair").iterdir()
    assert f.name.endswith(".betfair.gz")
    assert gzip.decompress(f.read_bytes()).splitlines() == lines  # raw mcm lines, nothing else
    assert read_messages(f) == lines  # and the Betfair replay reads them


# --- live run → recording → replay = the same snapshot --------------------------------------


def view(m: Market) -> dict[str, Any]:
    """What a client sees of a market, without times and sequence numbers."""
    return {"status": m.status, "in_play": m.in_play, "name": m.name, "event": m.event_id,
            "suspend_reason": m.suspend_reason,
            "selections": sorted((s.selection_id, s.status, s.price, tuple(map(tuple, s.back)),
                                  tuple(map(tuple, s.lay)), s.ltp) for s in m.selections)}


async def snapshot(store: Store, source: str) -> dict[str, dict[str, Any]]:
    return {m.market_id: view(m) for m in await store.load_all_markets() if m.source == source}


async def states(store: Store, source: str) -> dict[str, dict[str, Any]]:
    """The source's event states (scores, clock, status) without their versions: a replay delivers in
    larger chunks, and an ingest stores the latest state per event of each chunk."""
    out = {}
    for es in await store.load_event_states(source):
        d = msgspec.to_builtins(es)
        del d["version"]
        out[es.event_id] = d
    return out


async def flush(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()


@contextlib.asynccontextmanager
async def esa_upstream() -> AsyncIterator[tuple[str, Callable[[], None]]]:
    from feed.simulator import Simulator, SimulatorConfig

    sim = Simulator(SimulatorConfig(seed=5, events=4, rate_per_s=600.0, time_scale=300.0, api_port=0))
    await sim.start()
    assert sim.api is not None
    try:  # the live Betfair path: login, stream, catalogue (recorded beside the stream, as flumine does)
        yield (f"esa=127.0.0.1:{sim.port},app_key=sim-app-key,username=sim-user,password=sim-password,"
               f"sso_url={sim.api.url},betting_url={sim.api.betting_url},name=rec-esa"), sim.freeze
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def http_upstream(kind: str) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    from feed.simulator.http_providers import HttpProviders, ProvidersConfig

    # a poll carries one delta per changed market: 6 events (two of them soccer, Pinnacle's sports=29) polled
    # every 50 ms store the 300 deltas in ~3 s (4 events polled every 100 ms: ~10 s)
    sim = HttpProviders(ProvidersConfig(seed=5, rate_per_s=600.0, time_scale=300.0, tick_ms=20, events=6))
    await sim.start()
    fast = f"{FAST},interval_s=0.05,live_interval_s=0.05"  # (a later option overrides FAST's)
    try:
        if kind == "pinnacle":
            text = f"pinnacle={sim.url},user=demo,password=demo,sports=29,fixtures_interval_s=0.3,{fast},name=rec-pn"
        else:
            text = f"theoddsapi={sim.url},api_key=demo,sport=upcoming,{fast},name=rec-toa"
        yield text, sim.freeze
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def push_upstream(kind: str) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    from feed.simulator.push_providers import PushSimConfig, PushSimulator

    sim = PushSimulator(PushSimConfig(seed=5, events=4, rate_per_s=600.0, time_scale=300.0, tick_ms=20,
                                      ping_interval_ms=400))
    await sim.start()
    try:
        url = sim.url("ws" if kind == "push-ws" else "sse")
        yield f"{kind}={url},api_key=sim-push-key,ping_interval_ms=400,name=rec-{kind}", sim.freeze
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def webhook_upstream() -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """The webhook pusher POSTs 1,500 signed deliveries (10 % duplicates, 5 % late) once the source listens."""
    import socket

    import httpx

    from feed.simulator.webhook_pusher import PusherConfig, WebhookPusher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = "rec-webhook"
    url = f"http://127.0.0.1:{port}/ingest/webhook/{name}"
    pusher = WebhookPusher(PusherConfig(url=url, secret="rec-secret", events=4, seed=5,
                                        duplicate_share=0.1, reorder_share=0.05))

    async def push() -> None:
        async with httpx.AsyncClient() as client:
            async def listening() -> bool:
                try:
                    await client.get(url)
                    return True
                except httpx.TransportError:
                    return False

            await eventually(listening, 30, "the webhook source listens")
        await pusher.push(pusher.generate(1500))

    task = asyncio.create_task(push())
    try:
        yield f"webhook=127.0.0.1:{port},secret=rec-secret,name={name}", lambda: None
    finally:
        await cancel_and_wait(task, "the source")


@contextlib.asynccontextmanager
async def uof_upstream(amqp_url: str) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    from feed.simulator.uof import UofSimConfig, UofSimulator

    sim = UofSimulator(UofSimConfig(amqp_url=amqp_url, seed=5, events=4, rate_per_s=600.0, tick_ms=20,
                                    alive_interval_s=0.2, live_after_s=0.8))
    await sim.start()
    try:
        yield (f"uof={amqp_url}?exchange=unifiedfeed,api={sim.api_url},token=sim-uof-token,max_inactivity_s=2,"
               "min_recovery_interval_s=0.3,backoff_initial_s=0.1,backoff_max_s=0.5,name=rec-uof"), sim.freeze
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def csv_upstream() -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """A synthetic Betfair data-scientists CSV: 120 match-odds markets = 360 steps, replayed at max speed."""
    import tempfile

    from tests.test_csv_source import synthetic_football

    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_football(Path(tmp) / "matches.csv", 120)
        yield f"betfair-csv={path},name=rec-csv", lambda: None


@contextlib.asynccontextmanager
async def cricket_upstream() -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """Betfair's sports-data stream (cricket scores): two synthetic T20 matches, a ball every 10 ms."""
    from feed.simulator.cricket_server import CricketSimConfig, CricketSimulator

    sim = CricketSimulator(CricketSimConfig(seed=5, matches=2, ball_ms=10))
    await sim.start()
    try:
        yield (f"betfair-cricket=127.0.0.1:{sim.port},app_key=sim-app-key,session=sim-session,heartbeat_ms=500,"
               "name=rec-cricket"), sim.freeze
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def race_upstream() -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """Betfair's sports-data stream (race progress, TPD): three synthetic races at 20×, a reading every
    250 ms of race time (a progress line every 12.5 ms of real time)."""
    from feed.simulator.race_server import RaceSimConfig, RaceSimulator

    sim = RaceSimulator(RaceSimConfig(seed=5, races=3, time_scale=20.0, distance_m=(1000.0, 1200.0),
                                      min_update_ms=10, tick_ms=5, race_gap_ms=100, update_ms=250))
    await sim.start()
    try:
        yield (f"betfair-race=127.0.0.1:{sim.port},app_key=sim-app-key,session=sim-session,heartbeat_ms=500,"
               "name=rec-race"), sim.freeze
    finally:
        await sim.stop()


UPSTREAMS: dict[str, Callable[..., contextlib.AbstractAsyncContextManager[tuple[str, Callable[[], None]]]]] = {
    "esa": esa_upstream,
    "pinnacle": lambda: http_upstream("pinnacle"),
    "theoddsapi": lambda: http_upstream("theoddsapi"),
    "push-ws": lambda: push_upstream("push-ws"),
    "push-sse": lambda: push_upstream("push-sse"),
    "webhook": webhook_upstream,
    "uof": uof_upstream,
    "betfair-csv": csv_upstream,
    "betfair-cricket": cricket_upstream,
    "betfair-race": race_upstream,
}


async def record_live(store: Store, spec_text: str, freeze: Callable[[], None], out: Path) -> tuple[str, int]:
    """Run the source with ``--record out`` until it stored a lively stretch,
    freeze the upstream, wait until the stored snapshot stands still, stop.
    Returns (source name, payloads recorded)."""
    spec = parse_source_spec(spec_text)
    got: list[tuple[Source, Pipeline]] = []
    task = asyncio.create_task(run_spec(store, Settings(record_dir=str(out)), spec,
                                        on_source=lambda s, p: got.append((s, p))))
    try:
        await eventually(lambda: got and (got[0][1].ingest.stats.deltas >= 300
                                          or got[0][1].ingest.stats.event_states >= 100) or task.done(), 60,
                         "300 deltas (or 100 states of a scores-only source) stored")
        assert not task.done(), task.exception()
        freeze()
        pipeline = got[0][1]
        last: dict[str, Any] = {}

        async def still() -> bool:
            now = (await snapshot(store, spec.name), await states(store, spec.name))
            same = now == last.get("snap") and not pipeline.ingest.pending and not pipeline.ingest.backlog
            last["snap"] = now
            return same

        # still = unchanged over 1 s (twice every cadence left after the freeze: polls every 0.05-0.3 s,
        # pings / heartbeats / alives every 0.2-0.5 s — a margin for a loaded machine) with nothing
        # pending in the ingest
        await eventually(still, 60, "the stored snapshot stands still", interval_s=1.0)
        # every kind reports its feed-lag percentiles in its health record (/v1/sources)
        await eventually(lambda: _has_lag(store, spec.name), 10, "lag percentiles in the health record")
    finally:
        await cancel_and_wait(task, "the source")
    assert got[0][1].recorder is not None
    return spec.name, got[0][1].recorder.payloads


async def _has_lag(store: Store, name: str) -> bool:
    h = await store.get_health(name)
    return h is not None and h.lag_p50_ms is not None and h.lag_p99_ms is not None


@pytest.mark.parametrize("kind", list(UPSTREAMS))
async def test_a_recorded_session_replays_to_the_live_snapshot(store: Store, redis_url: str, tmp_path: Path,
                                                               kind: str, request: pytest.FixtureRequest) -> None:
    from feed.sources.registry import REGISTRY

    assert set(UPSTREAMS) == set(REGISTRY), "every source kind needs a record → replay check"
    args = [request.getfixturevalue("rabbitmq_url")] if kind == "uof" else []  # (skips without RabbitMQ)
    async with UPSTREAMS[kind](*args) as (spec_text, freeze):
        name, recorded = await record_live(store, spec_text, freeze, tmp_path)
    live = await snapshot(store, name)
    live_states = await states(store, name)
    assert recorded > 0 and (len(live) > 0 or kind in ("betfair-cricket", "betfair-race"))  # (states only)
    if kind in ("pinnacle", "theoddsapi", "push-ws", "push-sse", "uof", "betfair-cricket",
                "betfair-race"):  # providers of scores / race progress
        assert live_states, f"{kind}: no event state recorded"
    files = list((tmp_path / name).iterdir())
    assert files and all(f.name.endswith(".gz") for f in files), files  # compressed when closed
    await flush(redis_url)
    assert await snapshot(store, name) == {}
    if kind == "esa":  # the Betfair historic format: the Betfair replay (clock mapped onto now)
        from feed.supervisor import run_replay

        await run_replay(store, Settings(), files, speed=None, name=name)
    else:
        done = await replay_recordings(store, Settings(), [tmp_path], speed=None)
        assert done.sources == {name: recorded}
    replayed = await snapshot(store, name)
    assert replayed == live
    assert await states(store, name) == live_states  # the scores channels too (Pinnacle, /scores, push, UOF)


async def test_a_paced_replay_keeps_the_recorded_gaps(store: Store, tmp_path: Path) -> None:
    """``speed=20``: 1 s of recorded time takes ~50 ms; the replay keeps the order and the recorded receive times."""
    rec = Recorder(tmp_path, source="px", kind="push-ws", options={"prefix": "px"})
    base = 1_755_349_200_000
    odds = [orjson.dumps({"type": "odds", "seq": i, "entry_id": f"{base + i * 1000}-0", "data": [
        {"fixture": {"id": "f1", "sport": "Soccer", "league": "L", "home": "A", "away": "B",
                     "start_time": "2025-08-16T19:00:00Z"},
         "market": {"id": "ml", "name": "Match odds"}, "selection": {"id": "home", "name": "A"},
         "price": 2.0 + i / 10, "timestamp": (base + i * 1000) / 1000}]}) for i in range(1, 6)]
    rec.write([Payload(base + i * 1000, raw) for i, raw in enumerate(odds, start=1)])
    rec.close()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    done = await replay_recordings(store, Settings(), [tmp_path], speed=20.0)
    elapsed = loop.time() - t0
    assert done.sources == {"px": 5}
    assert elapsed >= 4 / 20 * 0.9  # 4 s of recorded gaps at 20×
    (m,) = [m for m in await store.load_all_markets() if m.source == "px"]
    assert m.selections[0].price == pytest.approx(2.5) and m.received_at == base + 5000


async def test_record_refuses_an_unwritable_directory(tmp_path: Path) -> None:
    from feed.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot record"):
        Recorder(blocker, source="s", kind="push-ws")

