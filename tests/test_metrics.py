"""``GET /metrics``: Prometheus text with connections, subscriptions, outbox
bytes, slow-consumer and conflation counts, resume outcomes, reader state and
lag, per-hop latency histograms."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from feed.store import Store
from streaming.encoding import encode_token
from streaming_helpers import Feed, SSEReader, eventually, make_app, serve


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_follow_activity(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = _samples(r.text)
        assert m[("oddsfeed_connections", (("transport", "sse"),))] == 0
        assert m[("oddsfeed_reader_connected", (("partition", "0"),))] == 1
        assert m[("oddsfeed_ready", ())] == 1 and m[("oddsfeed_markets", ())] == 2
        async with c.stream("GET", "/v1/stream?conflate_ms=50") as resp, \
                connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
            sse = SSEReader(resp)
            await sse.next()
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}}))
            await ws.send(json.dumps({"op": "subscribe", "id": 2, "filter": {"market": "m1"},
                                      "resume": encode_token("old-epoch", ["1-0"]).decode()}))
            for _ in range(5):  # ack, snapshot, ack, resumed, snapshot
                await ws.recv()
            for i in range(5):
                await feed.write(feed.price("m1", "1", 2.1 + i / 10))
            await sse.until(lambda e: e.event == "delta" and e.data.get("conflated"))

            async def counted() -> bool:
                s = _samples((await c.get("/metrics")).text)
                return s[("oddsfeed_reader_entries_total", (("partition", "0"),))] >= 5 and \
                    s[("oddsfeed_frames_sent_total", ())] >= 8
            await eventually(counted)
            m = _samples((await c.get("/metrics")).text)
            assert m[("oddsfeed_connections", (("transport", "sse"),))] == 1
            assert m[("oddsfeed_connections", (("transport", "ws"),))] == 1
            assert m[("oddsfeed_subscriptions", ())] == 3
            assert m[("oddsfeed_conflated_total", ())] >= 1
            assert m[("oddsfeed_resumes_total", (("outcome", "not_recovered"),))] == 1
            assert m[("oddsfeed_reader_lag_seconds", (("partition", "0"),))] >= 0
            for hop in ("provider_to_received", "received_to_stored", "stored_to_read", "queued_to_sent"):
                assert m[("oddsfeed_hop_latency_seconds_count", (("hop", hop),))] > 0, hop
            assert ("oddsfeed_slow_consumer_total", (("action", "close"),)) in m
            assert ("oddsfeed_outbox_bytes", ()) in m
        r = await c.get("/ready")
        assert r.json()["partitions"][0]["lag_ms"] >= 0


async def test_price_checks_and_stale_markets_are_counted(store: Store, redis_url: str) -> None:
    from feed.settings import Settings
    from streaming_helpers import now_ms

    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    old = feed.image("m3")
    old.received_at = old.source_ts = now_ms() - 600_000  # 10 min old, pre-match threshold 60 s: stale
    await feed.write(old)
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        for body in ({"market_id": "m1", "selection_id": "1", "side": "back", "price": 2.0},
                     {"market_id": "m1", "selection_id": "1", "side": "back", "price": 900.0},
                     {"market_id": "nope", "selection_id": "1", "side": "back", "price": 2.0}):
            assert (await c.post("/v1/price-check", json=body)).status_code == 200
        legs = [{"market_id": "m2", "selection_id": "1", "side": "back", "price": 2.0}] * 2
        assert (await c.post("/v1/price-check/batch", json={"legs": legs})).status_code == 200
        fams = {f.name: f for f in text_string_to_metric_families((await c.get("/metrics")).text)}
        reasons = {s.labels["reason"]: s.value for s in fams["oddsfeed_price_checks"].samples
                   if s.name.endswith("_total")}
        assert reasons.get("OK", 0) >= 3 and reasons.get("PRICE_CHANGED") == 1 and reasons.get("UNKNOWN_MARKET") == 1
        count = [s.value for s in fams["oddsfeed_price_check_seconds"].samples if s.name.endswith("_count")]
        assert count == [4.0]  # requests, not legs
        stale = [s.value for s in fams["oddsfeed_markets_stale"].samples]
        held = [s.value for s in fams["oddsfeed_markets"].samples]
        assert stale == [1.0] and held == [3.0]
