"""Resume and gap handling, SSE and WebSocket, end to end (real uvicorn, real Redis).

The resume matrix copies centrifuge's ``clientRecoverTests`` (empty stream,
from a position, limited, position already gone, position not existing
yet, same position, empty position, epoch changed): every case asserts
``recovered`` and the exact deltas replayed, then that the next live delta
follows without a duplicate. Gaps while connected: kill -9 of a Redis
without persistence (restarts empty → ``recovered: false`` snapshots) and
of one with append-only persistence (data survives → no resync, no gap).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from feed.embedded_redis import EmbeddedRedis
from feed.models import SourceHealth
from feed.settings import Settings
from feed.store import Store, log_key
from streaming.encoding import encode_token
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, serve

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Case:
    name: str
    entries: int            # log entries written while the node runs (entry 0 = the images)
    since: Any              # index of the entry the token points at, "zero" (0-0), "future"
    recovered: bool
    replayed: int = 0       # deltas expected after ``resumed``
    ring: int = 10_000      # replay_ring_entries (0 = always from Redis)
    trim_to: int | None = None
    replay_max: int = 10_000
    other_epoch: bool = False


CASES = [
    Case("empty_stream", 0, "zero", True, 0),
    Case("empty_stream_redis", 0, "zero", True, 0, ring=0),
    Case("from_position", 10, 7, True, 2),
    Case("from_position_redis", 10, 7, True, 2, ring=0),
    Case("from_position_limited", 10, 4, False, ring=0, replay_max=2),
    Case("from_position_that_already_gone", 20, 7, False, ring=0, trim_to=10),
    Case("from_position_out_of_ring_but_in_redis", 20, 7, True, 12, ring=5),
    Case("from_position_out_of_ring_and_trimmed", 20, 7, False, ring=5, trim_to=10),
    Case("from_position_that_not_exist_yet", 20, "future", False),
    Case("from_position_that_not_exist_yet_redis", 20, "future", False, ring=0),
    Case("same_position_no_pubs_expected", 7, 6, True, 0),
    Case("same_position_no_pubs_expected_redis", 7, 6, True, 0, ring=0),
    Case("same_position_in_trimmed_log", 7, 6, True, 0, ring=0, trim_to=1),
    Case("empty_position_recover_expected", 4, "zero", True, 5),
    Case("epoch_changed", 10, 7, False, other_epoch=True),
]


async def _write_entries(store: Store, feed: Feed, n: int) -> list[str]:
    """Entry 0: images of m1, m2; then one price change per entry. Returns the log ids."""
    ids = []
    for i in range(n):
        if i == 0:
            await feed.write(feed.image("m1"), feed.image("m2"))
        else:
            await feed.write(feed.price("m1" if i % 2 else "m2", "1", 2.0 + i / 100))
        ids.append(await store.last_log_id(0))
    return ids


async def _caught_up(c: httpx.AsyncClient, position: str) -> None:
    async def ok() -> bool:
        return (await c.get("/ready")).json()["partitions"][0]["position"] == position
    await eventually(ok)


class SSEClient:
    def __init__(self, c: httpx.AsyncClient) -> None:
        self.c = c

    async def open(self, token: str) -> Any:
        self.cm = self.c.stream("GET", "/v1/stream", headers={"Last-Event-ID": token})
        resp = await self.cm.__aenter__()
        self.sse = SSEReader(resp)
        return self

    async def next(self) -> dict[str, Any]:
        while True:
            ev = await self.sse.next(TIMEOUT_S)
            if ev.event != "heartbeat":
                return ev.data

    async def close(self) -> None:
        await self.cm.__aexit__(None, None, None)


class WSClient:
    def __init__(self, base: str) -> None:
        self.url = base.replace("http://", "ws://") + "/v1/ws"

    async def open(self, token: str) -> Any:
        self.ws = await connect(self.url)
        await self.ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}, "resume": token}))
        ack = await self.next()
        assert ack["type"] == "ack" and ack["sub"] == 1
        return self

    async def next(self) -> dict[str, Any]:
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT_S))
            if msg["type"] != "heartbeat":
                return msg

    async def close(self) -> None:
        await self.ws.close()


@pytest.mark.parametrize("transport", ["sse", "ws"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_resume_matrix(redis_url: str, case: Case, transport: str) -> None:
    store = await Store.open(redis_url)
    try:
        feed = Feed(store)
        app = make_app(store=store, replay_ring_entries=case.ring, replay_max_entries=case.replay_max)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
            ids = await _write_entries(store, feed, case.entries)
            await _caught_up(c, ids[-1] if ids else "0-0")
            if case.trim_to is not None:
                await store.redis.xtrim(log_key(0), maxlen=case.trim_to, approximate=False)
            if case.since == "zero":
                pos = "0-0"
            elif case.since == "future":
                ms, seq = ids[-1].split("-")
                pos = f"{int(ms) + 100_000}-0"
            else:
                pos = ids[case.since]
            token = encode_token("another-epoch" if case.other_epoch else store.epoch, [pos]).decode()
            client = await (SSEClient(c) if transport == "sse" else WSClient(base)).open(token)
            try:
                resumed = await client.next()
                assert resumed["type"] == "resumed" and resumed["recovered"] is case.recovered, resumed
                if case.recovered:
                    got = [await client.next() for _ in range(case.replayed)]
                    assert all(m["type"] == "delta" for m in got), got
                    first = 0 if case.since == "zero" else case.since + 1
                    want = [(("m1" if i % 2 else "m2") if i else None) for i in range(first, case.entries)]
                    got_ids = [m["market_id"] for m in got]
                    if want and want[0] is None:  # the image entry (two deltas) when replaying from 0-0
                        assert got_ids[:2] == ["m1", "m2"] and got[0]["kind"] == "image"
                        got_ids, want = got_ids[2:], want[1:]
                    assert got_ids == want
                    seqs = [(m["market_id"], m["seq"]) for m in got]
                    assert len(set(seqs)) == len(seqs)  # no duplicate
                else:
                    snap = await client.next()
                    assert snap["type"] == "snapshot" and snap["recovered"] is False
                    assert sorted(m["market_id"] for m in snap["markets"]) == sorted(feed.book.markets)
                # the next live change follows, nothing repeated or missing in between
                live = await feed.write(feed.image("m9") if not feed.book.markets else feed.price("m1", "2", 9.9))
                nxt = await client.next()
                assert nxt["type"] == "delta" and (nxt["market_id"], nxt["seq"]) == (live[0].market_id, live[0].seq)
            finally:
                await client.close()
    finally:
        await store.close()


@pytest.mark.parametrize("ring", [10_000, 0], ids=["ring", "redis"])
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_recovered_resume_ends_with_each_sources_current_status(redis_url: str, transport: str,
                                                                         ring: int) -> None:
    """The source went DOWN while the client was away: the ``status`` saying its markets are stale
    went to the streams open then, and the log the resume replays does not hold it. The recovered
    resume sends the missed deltas and then the source's current status (it kept showing the
    markets fresh while the server said stale)."""
    store = await Store.open(redis_url)
    try:
        feed = Feed(store)
        lease = 600_000

        def health(state: str, reason: str | None = None) -> SourceHealth:
            return SourceHealth(source="t", kind="push", state=state, reason=reason, last_message_at=now_ms(),
                                updated_at=now_ms(), lease_ms=lease)
        await store.set_health(health("UP"))
        app = make_app(store=store, replay_ring_entries=ring)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
            ids = await _write_entries(store, feed, 3)
            await _caught_up(c, ids[-1])
            token = encode_token(store.epoch, [ids[1]]).decode()  # the client had entry 1, then dropped
            async with c.stream("GET", "/v1/stream") as resp:  # a client that stayed: told at once
                watcher = SSEReader(resp)
                assert (await watcher.next()).event == "snapshot"
                await store.set_health(health("DOWN", "upstream_gone"))
                st = await watcher.until(lambda e: e.event == "status")
                assert st.data["state"] == "DOWN" and st.data["stale_markets"] == ["m1", "m2"]
            client = await (SSEClient(c) if transport == "sse" else WSClient(base)).open(token)
            try:
                resumed = await client.next()
                assert resumed["type"] == "resumed" and resumed["recovered"] is True, resumed
                replayed = await client.next()
                assert replayed["type"] == "delta" and replayed["market_id"] == "m2"  # entry 2
                status = await client.next()
                assert status["type"] == "status", status
                assert (status["source"], status["state"], status["reason"]) == ("t", "DOWN", "upstream_gone")
                assert status["stale_markets"] == ["m1", "m2"] and status["turned_stale"] == []
                assert "token" not in status  # it does not move the client's resume position
                live = await feed.write(feed.price("m1", "2", 9.9))
                nxt = await client.next()
                assert nxt["type"] == "delta" and (nxt["market_id"], nxt["seq"]) == ("m1", live[0].seq)
            finally:
                await client.close()
    finally:
        await store.close()


async def test_resume_on_a_node_that_lags_behind(redis_url: str) -> None:
    """A token from a node that is ahead: recovered once this node has the entry in Redis,
    and live deltas up to the token's position are not sent twice."""
    store = await Store.open(redis_url)
    try:
        feed = Feed(store)
        app = make_app(store=store)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
            ids = await _write_entries(store, feed, 3)
            await _caught_up(c, ids[-1])
            reader = app.state.node.readers[0]
            gate = asyncio.Event()
            real = reader._read

            async def gated(*args: Any, **kwargs: Any) -> Any:
                await gate.wait()
                return await real(*args, **kwargs)
            reader._read = gated  # this node falls behind …
            await asyncio.sleep(0.5)
            ahead = await feed.write(feed.price("m1", "1", 5.5))  # … another node already sent this one
            token = encode_token(store.epoch, [await store.last_log_id(0)]).decode()
            client = await SSEClient(c).open(token)
            try:
                assert (await client.next()) == {"type": "resumed", "recovered": True}
                gate.set()
                live = await feed.write(feed.price("m2", "1", 6.6))
                nxt = await client.next()
                assert (nxt["market_id"], nxt["seq"]) == (live[0].market_id, live[0].seq), (nxt, ahead)
            finally:
                await client.close()
    finally:
        await store.close()


async def _kill_and_restart(tmp_path: Path, appendonly: bool) -> tuple[list[dict[str, Any]], Any]:
    server = EmbeddedRedis(tmp_path / "r", appendonly=appendonly)
    url = server.start()
    try:
        store = await Store.open(url)
        feed = Feed(store)
        await feed.write(feed.image("m1"), feed.image("m2"))
        app = make_app(url, settings=Settings(heartbeat_ms=60_000, redis_url=url), read_block_ms=100)
        seen: list[dict[str, Any]] = []
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
            async with connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
                await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}}))

                async def until(pred: Any) -> dict[str, Any]:
                    while True:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                        seen.append(msg)
                        if pred(msg):
                            return msg
                await until(lambda m: m["type"] == "snapshot")
                await feed.write(feed.price("m1", "1", 2.5))
                await until(lambda m: m["type"] == "delta")
                await asyncio.sleep(1.2 if appendonly else 0)  # appendfsync everysec (a process crash loses nothing anyway)
                server.kill()  # kill -9

                async def not_ready() -> bool:
                    return (await c.get("/ready")).status_code == 503
                await eventually(not_ready)
                metrics = (await c.get("/metrics")).text
                assert 'oddsfeed_reader_connected{partition="0"} 0.0' in metrics
                server.start()

                async def ready() -> bool:
                    return (await c.get("/ready")).status_code == 200
                await eventually(ready)
                await store.close()
                store = await Store.open(url)  # the ingest reconnects (a new epoch when Redis came back empty)
                feed2 = Feed(store)
                feed2.book = feed.book
                if appendonly:
                    written = await feed2.write(feed2.price("m2", "1", 3.3))
                    last = await until(lambda m: m["type"] == "delta" and m["market_id"] == written[0].market_id)
                    assert last["seq"] == written[0].seq
                else:  # the ingest re-sends its markets under the new epoch: clients get them as a snapshot
                    feed2.book = type(feed.book)()
                    await feed2.write(feed2.image("m3"))
                    snap = await until(lambda m: m["type"] == "snapshot" and m["markets"])
                    assert [m["market_id"] for m in snap["markets"]] == ["m3"]
            await store.close()
            return seen, app.state.node
    finally:
        server.stop()


async def test_redis_killed_without_persistence_resyncs_clients(tmp_path: Path) -> None:
    seen, node = await _kill_and_restart(tmp_path, appendonly=False)
    snaps = [m for m in seen if m["type"] == "snapshot"]
    # the first snapshot, then at least one recovered:false resync (empty Redis, then the new epoch)
    assert len(snaps) >= 2 and all(s["recovered"] is False for s in snaps[1:])
    assert node.reloads >= 1 and node.hub.resyncs >= 1


async def test_redis_killed_with_aof_keeps_streaming_without_a_gap(tmp_path: Path) -> None:
    seen, node = await _kill_and_restart(tmp_path, appendonly=True)
    assert [m["type"] for m in seen if m["type"] != "heartbeat"] == ["ack", "snapshot", "delta", "delta"]
    assert node.reloads == 0 and node.hub.resyncs == 0
    assert node.readers[0].errors >= 1
