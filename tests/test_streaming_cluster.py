"""Scale-out: several API nodes on one Redis, and on a Redis Cluster (three
masters on loopback started here from the same redis-server binary), with
three partitions. The ingest side is the real one (``feed.ingest.Ingest`` on
Betfair ESA lines, ``Store.open(url, partitions=3, cluster=…)``). Clients on
any node receive the same deltas in the same order per partition (so per
market), and a resume token from one node resumes on another."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from feed.embedded_redis import redis_server_binary, start_cluster_node
from feed.ingest import Ingest
from feed.settings import Settings
from feed.store import Store, partition_of
from streaming_helpers import SSEReader, eventually, make_app, sans_as_of, serve

TIMEOUT_S = 15.0
PARTITIONS = 3


def image_line(mid: str, event: str, pt: int, clk: str) -> bytes:
    """A Betfair ESA ``mcm`` with a market image (two runners)."""
    return json.dumps({"op": "mcm", "clk": clk, "pt": pt, "mc": [{
        "id": mid, "img": True,
        "marketDefinition": {"eventId": event, "eventTypeId": "1", "marketType": "MATCH_ODDS", "status": "OPEN",
                             "inPlay": False, "bettingType": "ODDS", "numberOfWinners": 1, "version": 1,
                             "runners": [{"id": 1, "status": "ACTIVE", "sortPriority": 1},
                                         {"id": 2, "status": "ACTIVE", "sortPriority": 2}]},
        "rc": [{"id": 1, "batb": [[0, 2.0, 10]]}, {"id": 2, "batb": [[0, 3.0, 10]]}]}]}).encode()


def price_line(mid: str, sel: int, price: float, pt: int, clk: str) -> bytes:
    return json.dumps({"op": "mcm", "clk": clk, "pt": pt,
                       "mc": [{"id": mid, "rc": [{"id": sel, "batb": [[0, price, 10]]}]}]}).encode()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three cluster-enabled redis-servers joined with ``redis-cli --cluster create``; yields a seed URL."""
    base = tmp_path_factory.mktemp("cluster")
    servers = []
    try:
        for _ in range(3):
            servers.append(start_cluster_node(base, extra_args=("--cluster-node-timeout", "5000")))
        cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        if not os.path.exists(cli):
            pytest.skip("redis-cli not found beside redis-server")
        addrs = [f"127.0.0.1:{s.port}" for s in servers]
        out = subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-500:] + out.stderr[-500:]
        deadline = time.monotonic() + 30
        while True:
            infos = [subprocess.run([cli, "-p", str(s.port), "cluster", "info"], capture_output=True, text=True,
                                    timeout=10).stdout for s in servers]
            if all("cluster_state:ok" in i for i in infos):
                break
            assert time.monotonic() < deadline, infos
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{servers[0].port}/0"
    finally:
        for s in servers:
            s.stop()


async def _scale_out(url: str, cluster: bool) -> None:
    if not cluster:
        import redis
        r = redis.Redis.from_url(url)
        r.flushall()
        r.close()
    store = await Store.open(url, partitions=PARTITIONS, cluster=cluster)
    try:
        ingest = Ingest(store, source="bf")
        clk = 0
        now = int(time.time() * 1000)
        mids = [f"1.{i}" for i in range(12)]
        ingest.feed_lines([image_line(mid, f"e{i % 3}", now, f"c{i}") for i, mid in enumerate(mids)], now)
        await ingest.flush()
        assert {partition_of(f"bf:{m}", PARTITIONS) for m in mids} == set(range(PARTITIONS))
        settings = Settings(heartbeat_ms=60_000, partitions=PARTITIONS, redis_url=url, redis_cluster=cluster)
        app_a, app_b = make_app(url, settings=settings), make_app(url, settings=settings)
        async with serve(app_a) as base_a, serve(app_b) as base_b, \
                httpx.AsyncClient(base_url=base_a, timeout=TIMEOUT_S) as ca, \
                httpx.AsyncClient(base_url=base_b, timeout=TIMEOUT_S) as cb:
            for c in (ca, cb):
                r = await c.get("/ready")
                assert r.status_code == 200 and len(r.json()["partitions"]) == PARTITIONS, r.json()
            got: list[list[dict[str, Any]]] = [[], [], []]
            async with ca.stream("GET", "/v1/stream") as ra, cb.stream("GET", "/v1/stream") as rb, \
                    connect(base_b.replace("http://", "ws://") + "/v1/ws") as ws:
                await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}}))
                sse_a, sse_b = SSEReader(ra), SSEReader(rb)
                for sse in (sse_a, sse_b):
                    snap = await sse.next()
                    assert len(snap.data["markets"]) == len(mids)
                while json.loads(await ws.recv())["type"] != "snapshot":
                    pass
                n = 0
                for batch in range(20):
                    lines = []
                    for k in range(6):
                        n += 1
                        clk += 1
                        lines.append(price_line(mids[(batch * 7 + k * 5) % len(mids)], 1 + k % 2,
                                                round(2.0 + n / 100, 2), now + n, f"d{clk}"))
                    t = int(time.time() * 1000)
                    ingest.feed_lines(lines, t)
                    await ingest.flush()
                token_a = None

                async def read_sse(sse: SSEReader, out: list[dict[str, Any]]) -> None:
                    while len(out) < n:
                        ev = await sse.next(TIMEOUT_S)
                        if ev.event == "delta":
                            out.append(ev.data)

                async def read_ws(out: list[dict[str, Any]]) -> None:
                    while len(out) < n:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                        if msg["type"] == "delta":
                            out.append(msg)
                await asyncio.gather(read_sse(sse_a, got[0]), read_sse(sse_b, got[1]), read_ws(got[2]))
                token_a = sse_a.last_id
            # the same deltas, in the same order within each partition (hence within each market)
            per_part = []
            for msgs in got:
                parts: dict[int, list[tuple[str, int]]] = {}
                for m in msgs:
                    parts.setdefault(partition_of(m["market_id"], PARTITIONS), []).append((m["market_id"], m["seq"]))
                per_part.append(parts)
            assert per_part[0] == per_part[1] == per_part[2]
            assert sum(len(v) for v in per_part[0].values()) == n
            for seqs in per_part[0].values():
                by_market: dict[str, list[int]] = {}
                for mid, seq in seqs:
                    by_market.setdefault(mid, []).append(seq)
                assert all(s == list(range(s[0], s[0] + len(s))) for s in by_market.values())
            # a token from node A resumes on node B
            clk += 1
            t = int(time.time() * 1000)
            ingest.feed_lines([price_line(mids[0], 2, 9.5, t, f"d{clk}")], t)
            written = await ingest.flush()

            async def caught_up() -> bool:
                r = (await cb.get(f"/v1/markets/bf:{mids[0]}")).json()
                return r["seq"] == written[0].seq
            await eventually(caught_up)
            assert token_a is not None
            async with cb.stream("GET", "/v1/stream", headers={"Last-Event-ID": token_a}) as rb2:
                sse = SSEReader(rb2)
                assert sans_as_of((await sse.next()).data) == {"type": "resumed", "recovered": True}
                ev = await sse.until(lambda e: e.event == "delta")
                assert (ev.data["market_id"], ev.data["seq"]) == (written[0].market_id, written[0].seq)
    finally:
        await store.close()


async def test_two_nodes_on_one_redis(redis_url: str) -> None:
    await _scale_out(redis_url, cluster=False)


async def test_two_nodes_on_a_redis_cluster(redis_cluster: str) -> None:
    await _scale_out(redis_cluster, cluster=True)
