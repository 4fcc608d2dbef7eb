"""The push simulator on its own, and the scenarios ``test_push_ws.py`` and
``test_push_sse.py`` run against it with the real consumers.

Everything is real: the simulator is a Starlette app in uvicorn on
127.0.0.1 (port 0) driven by the synthetic MarketModel; the consumer is
``run_push_ws_source`` / ``run_push_sse_source`` writing through Ingest into
the session's real redis-server; the streaming API (when used) is
``streaming.app.create_app`` in uvicorn; clients are real websockets / httpx.
"""

from __future__ import annotations

import asyncio
import time
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets

from feed.errors import FatalSourceError
from feed.ingest import Ingest
from feed.models import Market, apply_delta
from feed.normalise.push import PushNormaliser, entry_key
from feed.settings import Settings
from feed.simulator.push_providers import (
    MALFORMED,
    PushSimConfig,
    PushSimulator,
    market_view,
)
from feed.sources.push import PushClient
from feed.sources.spec import parse_source_spec
from feed.sources.sse import run_push_sse_source
from feed.sources.ws import run_push_ws_source
from feed.store import Store
from tests.streaming_helpers import SSEReader, eventually, make_app, serve

pytestmark = pytest.mark.timeout(60)

KEY = "sim-push-key"
#: a lively model: lifecycles at 600× (suspensions, in-play, settlements every few seconds)
SIM = {"seed": 7, "events": 6, "rate_per_s": 120.0, "time_scale": 600.0, "tick_ms": 20, "ping_interval_ms": 400}
RUNNERS = {"push-ws": run_push_ws_source, "push-sse": run_push_sse_source}
TRANSPORT = {"push-ws": "ws", "push-sse": "sse"}


async def wait_for(pred: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition") -> None:
    """:func:`tests.streaming_helpers.eventually` with the push scenarios' default wait."""
    await eventually(pred, timeout_s, what)


@contextlib.asynccontextmanager
async def push_sim(**overrides: Any) -> AsyncIterator[PushSimulator]:
    sim = PushSimulator(PushSimConfig(**{**SIM, **overrides}))
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@dataclass
class Consumer:
    """A running ``run_push_*_source`` and what it exposes."""

    kind: str
    task: asyncio.Task[None]
    client: PushClient
    ingest: Ingest
    health: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def normaliser(self) -> PushNormaliser:
        assert isinstance(self.ingest.normaliser, PushNormaliser)
        return self.ingest.normaliser

    def up(self) -> bool:
        return self.client.health == ("UP", None)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)


async def start_consumer(store: Store, sim: PushSimulator, kind: str, *, key: str = KEY, extra: str = "") -> Consumer:
    spec = parse_source_spec(f"{kind}={sim.url(TRANSPORT[kind])},api_key={key},backoff_initial_s=0.05,"
                             f"backoff_max_s=0.3,reorder_ms=300,ping_interval_ms=400{extra}")
    ready: dict[str, Any] = {}
    health: list[tuple[str, str | None]] = []

    def on_client(client: PushClient, ingest: Ingest) -> None:
        ready["client"], ready["ingest"] = client, ingest
        inner = client._on_health

        def record(state: str, reason: str | None) -> None:
            health.append((state, reason))
            inner(state, reason)
        client._on_health = record

    task = asyncio.create_task(RUNNERS[kind](store, Settings(), spec, on_client=on_client))
    await wait_for(lambda: "client" in ready or task.done(), 10, "the consumer to start")
    if "client" not in ready:
        task.result()
    return Consumer(kind, task, ready["client"], ready["ingest"], health)


async def stored_view(store: Store, source: str) -> dict[str, Any]:
    return {m.market_id: market_view(m) for m in await store.load_all_markets() if m.source == source}


async def converge(store: Store, sim: PushSimulator, consumer: Consumer) -> dict[str, Any]:
    """Freeze the model; the stored markets must come to equal the simulator's truth."""
    sim.freeze()
    truth = sim.truth()
    last: dict[str, Any] = {}

    async def same() -> bool:
        nonlocal last
        last = await stored_view(store, consumer.kind)
        return last == truth
    try:
        await wait_for(same, 15, "the stored markets to equal the simulator's truth")
    except pytest.fail.Exception:
        missing = sorted(set(truth) - set(last))
        extra = sorted(set(last) - set(truth))
        diff = [k for k in truth if k in last and last[k] != truth[k]][:1]
        detail = {k: {"truth": truth[k], "stored": last[k]} for k in diff}
        pytest.fail(f"stored != truth: missing {missing}, extra {extra}, first difference {detail}")
    return truth


async def check_log_rebuilds_the_snapshots(store: Store, source: str) -> None:
    """Folding the delta log from the start gives exactly the stored snapshots:
    nothing in the log is lost, duplicated or out of order."""
    rebuilt: dict[str, Market] = {}
    for _, deltas in await store.log_range(0, "0"):
        for d in deltas:
            if d.source != source:
                continue
            prev = rebuilt.get(d.market_id)
            assert prev is None or d.seq == prev.seq + 1, (d.market_id, d.seq, prev.seq)
            new = apply_delta(prev, d)
            assert new is not None
            rebuilt[d.market_id] = new
    stored = {m.market_id: m for m in await store.load_all_markets() if m.source == source}
    assert set(rebuilt) == set(stored)
    for mid, m in stored.items():
        assert market_view(rebuilt[mid]) == market_view(m) and rebuilt[mid].seq == m.seq, mid


# -- scenarios (run by test_push_ws.py and test_push_sse.py) ------------------------------------------


async def scenario_faults(store: Store, kind: str) -> None:
    """Drop, duplicates, reordering, gaps (resync, and resume when the snapshot
    fails), bad bodies: the stored markets end equal to the truth."""
    async with push_sim() as sim:
        c = await start_consumer(store, sim, kind)
        try:
            await wait_for(lambda: c.up() and c.ingest.stats.market_updates > 20, what="data flowing")

            # dropped connection → reconnect and resume from the cursor
            before = len(sim.resume_requests)
            assert sim.resume_requests[0] == (TRANSPORT[kind], None)
            assert sim.drop_connections() == 1
            await wait_for(lambda: len(sim.resume_requests) > before and c.up(), what="the resume")
            transport, cursor = sim.resume_requests[before]
            assert transport == TRANSPORT[kind] and cursor is not None and entry_key(cursor) is not None
            assert sim.resumed >= 1  # served from the history, not a fresh snapshot
            assert ("DOWN", "reconnecting") in c.health

            # duplicates → dropped by entry id
            dup0, norm0 = c.client.duplicates, c.normaliser.dropped.get("duplicate", 0)
            sim.duplicate(3)
            await wait_for(lambda: c.client.duplicates >= dup0 + 3, what="duplicates")
            await wait_for(lambda: c.normaliser.dropped.get("duplicate", 0) >= norm0 + 3, what="duplicates dropped")

            # reordered pairs → put back in order
            re0 = c.client.reordered
            sim.reorder(3)
            await wait_for(lambda: c.client.reordered >= re0 + 3, what="reordered messages")

            # a sequence gap → resync from the REST snapshot, marked recovering
            snaps, resyncs = sim.snapshot_requests, c.client.resyncs
            sim.skip(2)
            await wait_for(lambda: c.client.resyncs > resyncs and sim.snapshot_requests > snaps and c.up(),
                           what="a resync")
            i = c.health.index(("DEGRADED", "recovering"))
            assert ("UP", None) in c.health[i:]

            # a gap while the snapshot endpoint fails → reconnect and resume instead
            reconnects, requests = c.client.reconnects, len(sim.resume_requests)
            sim.fail_snapshots(1)
            sim.skip(1)
            await wait_for(lambda: c.client.reconnects > reconnects and c.up(), what="the fallback resume")
            assert sim.resume_requests[requests][1] is not None

            # bad bodies → quarantined with their reason, ingestion goes on
            rejected = c.ingest.stats.rejected
            sim.inject_malformed(len(MALFORMED))
            await wait_for(lambda: c.ingest.stats.rejected >= rejected + len(MALFORMED), what="rejections")
            assert c.ingest.stats.rejected_by_reason == Counter(reason for _, reason in MALFORMED)
            updates = c.ingest.stats.market_updates
            await wait_for(lambda: c.ingest.stats.market_updates > updates, what="ingestion after bad bodies")

            await converge(store, sim, c)
            quarantined = [q for q in await store.quarantined(50) if q["source"] == kind]
            assert Counter(q["reason"] for q in quarantined) == Counter(reason for _, reason in MALFORMED)
            assert {q["raw"] for q in quarantined} == {raw for raw, _ in MALFORMED}
            await check_log_rebuilds_the_snapshots(store, kind)
            # every kind of market state went through: suspended (locked) and settled
            statuses = {m["status"] for m in sim.truth().values()}
            assert "OPEN" in statuses
            assert c.ingest.book.dropped.get("no_image", 0) == 0
        finally:
            await c.stop()


async def scenario_stall(store: Store, kind: str) -> None:
    """A stalled provider: DEGRADED (heartbeat_late) then DOWN (heartbeat_missed),
    every market stale over the streaming API's SSE, then UP and fresh again."""
    async with push_sim() as sim:
        c = await start_consumer(store, sim, kind)
        try:
            await wait_for(lambda: c.up() and c.ingest.stats.market_updates > 10, what="data flowing")
            async with serve(make_app(store=store)) as base, \
                    httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as http, \
                    http.stream("GET", "/v1/stream?heartbeat_ms=500") as resp:
                sse = SSEReader(resp)
                snap = await sse.next()
                assert snap.event == "snapshot"
                ours = sorted(m["market_id"] for m in snap.data["markets"] if m["source"] == kind)
                assert ours and not any(m["stale"] for m in snap.data["markets"] if m["source"] == kind)
                statuses: list[dict[str, Any]] = []

                async def collect() -> None:
                    while True:
                        ev = await sse.next(30)
                        if ev.event == "status" and ev.data["source"] == kind:
                            statuses.append(ev.data)
                collector = asyncio.create_task(collect())
                try:
                    sim.stall(3.0, include_new=True)
                    await wait_for(lambda: any(s["state"] == "DOWN" for s in statuses), 10, "a DOWN status")
                    down = next(s for s in statuses if s["state"] == "DOWN")
                    assert down["reason"] == "heartbeat_missed"
                    stored_ids = sorted(m.market_id for m in await store.load_all_markets() if m.source == kind)
                    assert down["stale_markets"] == stored_ids
                    r = await http.get(f"/v1/markets/{ours[0]}")
                    assert r.json()["stale"] is True
                    await wait_for(lambda: statuses[-1]["state"] == "UP", 15, "an UP status")
                    assert statuses[-1]["stale_markets"] == []
                    r = await http.get(f"/v1/markets/{ours[0]}")
                    assert r.json()["stale"] is False
                finally:
                    collector.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await collector
                states = [(s["state"], s["reason"]) for s in statuses]
                late, missed = states.index(("DEGRADED", "heartbeat_late")), states.index(("DOWN", "heartbeat_missed"))
                assert late < missed < len(states) - 1 and states[-1] == ("UP", None)
            h = c.health
            assert h.index(("DEGRADED", "heartbeat_late")) < h.index(("DOWN", "heartbeat_missed"))
            assert h[-1] == ("UP", None)
            await converge(store, sim, c)
        finally:
            await c.stop()


async def scenario_restart(store: Store, kind: str) -> None:
    """A restarted ingest resumes from the cursor stored with its data."""
    async with push_sim() as sim:
        first = await start_consumer(store, sim, kind)
        await wait_for(lambda: first.up() and first.ingest.stats.market_updates > 20, what="data flowing")
        await first.stop()
        stored = await store.load_cursor(kind)
        assert stored is not None and stored == first.ingest.cursor
        await asyncio.sleep(0.3)  # the provider moves on meanwhile
        seen, resumed = len(sim.resume_requests), sim.resumed
        second = await start_consumer(store, sim, kind)
        try:
            await wait_for(lambda: len(sim.resume_requests) > seen and second.up(), what="the second connection")
            assert sim.resume_requests[seen] == (TRANSPORT[kind], stored)
            assert sim.resumed == resumed + 1  # replayed from the history
            assert second.ingest.book.dropped.get("no_image", 0) == 0
            await converge(store, sim, second)
            await check_log_rebuilds_the_snapshots(store, kind)
        finally:
            await second.stop()


async def scenario_bad_key(store: Store, kind: str) -> None:
    async with push_sim() as sim:
        c = await start_consumer(store, sim, kind, key="wrong")
        with pytest.raises(FatalSourceError) as info:
            await asyncio.wait_for(c.task, 10)
        assert info.value.code == "unauthorized"
        assert ("DOWN", "unauthorized") in c.health
        (h,) = [s for s in await store.sources() if s.source == kind]
        assert (h.state, h.reason) == ("DOWN", "unauthorized")


# -- the simulator on its own --------------------------------------------------------------------


async def _ws_messages(ws: Any, n: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(n)]


async def test_every_route_needs_the_api_key() -> None:
    async with push_sim() as sim, httpx.AsyncClient(trust_env=False, timeout=5) as http:
        assert (await http.get(sim.url("snapshot"))).status_code == 401
        assert (await http.get(sim.url("snapshot"), headers={"X-Api-Key": "nope"})).status_code == 401
        assert (await http.get(sim.url("sse"), headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await http.get(sim.url("snapshot"), params={"api_key": KEY})).status_code == 200
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(sim.url("ws"), proxy=None):
                pass
        assert info.value.response.status_code == 403


async def test_snapshot_normalises_to_the_truth() -> None:
    async with push_sim() as sim, httpx.AsyncClient(trust_env=False, timeout=5) as http:
        await asyncio.sleep(0.5)
        sim.freeze()
        body = (await http.get(sim.url("snapshot"), headers={"X-Api-Key": KEY})).content
        assert body.count(b"\n") > 5  # one odd per line: SSE sends it as multi-line data
        n = PushNormaliser("push")
        batch = n.feed(body, time.time_ns() // 1_000_000)  # received now: provider times are not in the future
        assert batch.op == "snapshot" and batch.cursor == sim.last_entry_id
        from feed.book import Book
        book = Book()
        for u in batch.updates:
            book.apply(u)
        assert {k: market_view(m) for k, m in book.markets.items()} == sim.truth()


async def test_resume_inside_the_history_replays_and_outside_it_sends_a_snapshot() -> None:
    async with push_sim(history=50) as sim:
        async with websockets.connect(sim.url("ws"), additional_headers={"X-Api-Key": KEY}, proxy=None) as ws:
            await ws.send(json.dumps({"type": "subscribe"}))
            hello, snap = await _ws_messages(ws, 2)
            assert (hello["type"], hello["resumed"], snap["type"]) == ("connected", False, "snapshot")
            msgs = [m for m in await _ws_messages(ws, 6) if m["type"] != "ping"]
            await wait_for(lambda: sim.seq >= msgs[-1]["seq"] + 3, what="more entries")
            # held there: the history (50 entries, ~1.5 s of this model) still holds mark when the resume
            # comes, however long a loaded machine takes to close this connection and open the next
            sim.freeze()
        mark = msgs[0]
        async with websockets.connect(sim.url("ws"), additional_headers={"X-Api-Key": KEY}, proxy=None) as ws:
            await ws.send(json.dumps({"type": "subscribe", "resume_from": mark["entry_id"]}))
            hello, nxt = await _ws_messages(ws, 2)
            assert hello["resumed"] is True and nxt["seq"] == mark["seq"] + 1
        sim.freeze(False)
        await wait_for(lambda: sim.seq > mark["seq"] + 60, what="the history to roll over")
        async with websockets.connect(sim.url("ws"), additional_headers={"X-Api-Key": KEY}, proxy=None) as ws:
            await ws.send(json.dumps({"type": "subscribe", "resume_from": mark["entry_id"]}))
            hello, snap = await _ws_messages(ws, 2)
            assert hello["resumed"] is False and snap["type"] == "snapshot"
        assert [k for k, _ in sim.resume_requests] == ["ws", "ws", "ws"]
        assert sim.resume_requests[1][1] == mark["entry_id"]


async def _quiet(sim: PushSimulator, ws: Any) -> int:
    """Freeze the model and read until the stream idles (a ping); the last seq."""
    sim.freeze()
    while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "ping":
        pass
    return sim.seq


async def _next_data(ws: Any) -> dict[str, Any]:
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if m["type"] != "ping":
            return m


async def test_fault_switches_shape_the_raw_stream() -> None:
    async with push_sim() as sim:
        async with websockets.connect(sim.url("ws"), additional_headers={"X-Api-Key": KEY}, proxy=None) as ws:
            await ws.send(json.dumps({"type": "subscribe"}))
            await _ws_messages(ws, 2)
            base = await _quiet(sim, ws)
            sim.skip(2)
            sim.freeze(False)
            assert (await _next_data(ws))["seq"] == base + 3
            base = await _quiet(sim, ws)
            sim.duplicate(1)
            sim.freeze(False)
            a, b, c = await _next_data(ws), await _next_data(ws), await _next_data(ws)
            assert a == b and a["seq"] == base + 1 and c["seq"] == base + 2
            base = await _quiet(sim, ws)
            sim.reorder(1)
            sim.freeze(False)
            a, b = await _next_data(ws), await _next_data(ws)
            assert (a["seq"], b["seq"]) == (base + 2, base + 1)
            await _quiet(sim, ws)
            sim.inject_malformed(2)
            sim.freeze(False)
            raw = [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)]
            assert raw == [MALFORMED[0][0].decode(), MALFORMED[1][0].decode()]
            m = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert m["type"] in ("ping", "odds", "locked-odds", "fixture-status")
            last = await _quiet(sim, ws)
            m = json.loads(await asyncio.wait_for(ws.recv(), 5))  # idle: a ping with the stream's last seq
            assert m == {"type": "ping", "seq": last, "emitted_at": m["emitted_at"]}


# -- the end-to-end scenarios, once per transport --------------------------------------------------

TRANSPORTS = ["push-ws", "push-sse"]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_faults_end_with_redis_equal_to_the_truth(store: Store, kind: str) -> None:
    await scenario_faults(store, kind)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_stall_goes_degraded_then_down_with_stale_markers_then_up(store: Store, kind: str) -> None:
    await scenario_stall(store, kind)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_restarted_ingest_resumes_from_the_stored_cursor(store: Store, kind: str) -> None:
    await scenario_restart(store, kind)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_refused_api_key_is_fatal(store: Store, kind: str) -> None:
    await scenario_bad_key(store, kind)
