"""The Odds API poller end to end: HTTP providers simulator on 127.0.0.1 →
real poller (httpx) → Ingest → real Redis, with every fault switched on.

Behaviour asserted: the final Redis snapshot equals the simulator's truth
(a vanished bookmaker's markets are suspended, not kept), deltas are
sequenced exactly once, Retry-After is honoured (server-side timestamps),
the quota headers slow the poller before the quota is spent, ETags make
unchanged polls free (conditional mode), bad bodies are quarantined with
their reason while ingestion continues, fatal provider codes stop the source
with a typed error and a logged body (without the key), and DOWN → UP shows
over SSE with stale markers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import httpx
import pytest

from feed.sources.http_limits import AuthError
from feed.sources.poller import TheOddsApiSource
from feed.store import Store
from tests.poller_helpers import (
    FAST,
    assert_log_sequenced,
    assert_retry_after_honoured,
    converge,
    eventually,
    poller,
    providers,
    stored,
    wait_faults_consumed,
)
from tests.streaming_helpers import SSEReader, make_app, serve


def spec(url: str, extra: str = "") -> str:
    return (f"theoddsapi={url}/v4,api_key=demo,sport=upcoming,markets=h2h+totals,{FAST}"
            + (f",{extra}" if extra else ""))


async def test_theoddsapi_faults_end_to_end(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        async with providers() as sim, poller("theoddsapi", store, spec(sim.url)) as (src, task):
            assert isinstance(src, TheOddsApiSource)
            await eventually(lambda: src.pipeline.ingest.health.state == "UP", what="source UP")
            await eventually(lambda: stored(store, "theoddsapi"), what="markets stored")
            sim.rate_limit(2, retry_after_s=1, provider="theoddsapi")
            await wait_faults_consumed(sim)
            sim.server_error(2, status=502, provider="theoddsapi")
            await wait_faults_consumed(sim)
            sim.stall(1, seconds=1.6, provider="theoddsapi")
            await wait_faults_consumed(sim)
            sim.trickle(1, seconds=1.6, provider="theoddsapi")
            await wait_faults_consumed(sim)
            for kind in ("truncated", "bad_price", "wrong_type"):
                sim.malformed(1, kind=kind, provider="theoddsapi")
                await wait_faults_consumed(sim)
            # a bookmaker vanishes: its markets are suspended, not silently kept
            sim.drop_bookmaker("simbook_b")
            dropped = await eventually(lambda: _suspended(store, "simbook_b"), what="simbook_b suspended")
            assert all(m.suspend_reason == "not_offered" for m in dropped)
            sim.drop_bookmaker("simbook_b", dropped=False)  # … and comes back as fresh images
            # the stalled and the trickled answer (1.6 s each) were both cut at the 1 s deadline
            await eventually(lambda: src.http.stats["deadline"] >= 2, what="both slow answers cut at the deadline")
            await eventually(lambda: src.pipeline.ingest.health.state == "UP", what="source UP again")
            markets = await converge(store, sim, "theoddsapi", "theoddsapi")
            assert not task.done()
            assert {m.bookmaker for m in markets.values()} == {"simbook_a", "simbook_b"}

            assert_retry_after_honoured(sim, "theoddsapi")
            assert src.http.stats["deadline"] >= 2
            assert {"rate_limited", "upstream_5xx", "timeout"} <= set(src.failures)
            counts = (await store.quarantine_counts())["theoddsapi"]
            assert counts == {"invalid_json": 1, "invalid_price": 1, "invalid_schema": 1}
            await assert_log_sequenced(store, markets)
            assert any(m.in_play for m in markets.values())
            health = {h.source: h for h in await store.sources()}["theoddsapi"]
            assert health.state == "UP" and health.kind == "theoddsapi"
            assert src.pipeline.lag.percentiles()[0] is not None
            # the poller goes on polling: compare between polls, not with a request in flight
            await eventually(lambda: src.http.quota.used is not None
                             and src.http.quota.remaining == sim.quota_remaining,
                             what="the poller's quota view equal to the provider's, between polls")
    finally:
        await store.close()


async def test_an_answer_the_client_cut_short_is_not_served() -> None:
    """The simulator's truth holds only answers a client read whole. A trickled
    answer the client gives up on (its deadline) must not count as served: a
    market offered only while the poller saw nothing but cut answers would
    otherwise read "served but not stored" for ever (Starlette runs a
    StreamingResponse's background task even after the client disconnected)."""
    params = {"apiKey": "demo", "regions": "eu", "markets": "h2h,totals"}
    async with providers() as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as http:
        sim.freeze()
        sim.trickle(1, seconds=30, provider="theoddsapi")
        async with http.stream("GET", "/v4/sports/upcoming/odds", params=params) as resp:
            assert resp.status_code == 200
            await anext(resp.aiter_raw())  # the first piece … then the client gives up (closes the connection)
        await eventually(lambda: not _answering(sim), what="the simulator done with the cut answer")
        assert sim.truth("theoddsapi") == {}
        assert sim.cut_answers["theoddsapi"] == 1
        # a trickled answer read whole is served
        sim.trickle(1, seconds=0.2, provider="theoddsapi")
        resp2 = await http.get("/v4/sports/upcoming/odds", params=params)
        assert resp2.status_code == 200
        await eventually(lambda: not _answering(sim), what="the simulator done with the whole answer")
        body = resp2.json()
        read = {f"toa:{ev['id']}:{bm['key']}:{m['key']}" + (":2.5" if m["key"] == "totals" else "")
                for ev in body for bm in ev["bookmakers"] for m in bm["markets"]}
        truth = sim.truth("theoddsapi")
        assert read and set(truth) == read and all(t["status"] == "OPEN" for t in truth.values())
        assert sim.cut_answers["theoddsapi"] == 1


def _answering(sim: object) -> int:
    """Requests the simulator's uvicorn is still handling (background tasks included)."""
    return len(sim._server.server.server_state.tasks)  # type: ignore[attr-defined]


async def _suspended(store: Store, bookmaker: str) -> list[object]:
    """The bookmaker's markets once every one is SUSPENDED while another
    bookmaker's are open (so a snapshot that suspended everything — the
    bad_price fault's body lists one fake event — does not count)."""
    all_ms = (await stored(store, "theoddsapi")).values()
    ms = [m for m in all_ms if m.bookmaker == bookmaker]
    others_open = any(m.status == "OPEN" for m in all_ms if m.bookmaker != bookmaker)
    return ms if ms and others_open and all(m.status == "SUSPENDED" for m in ms) else []


async def test_conditional_mode_uses_etags(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        async with providers() as sim, poller("theoddsapi", store, spec(sim.url, "mode=conditional,sport=soccer_epl+tennis_atp+basketball_nba")) as (src, _):
            await eventually(lambda: src.polls >= 6, what="polls")
            markets = await converge(store, sim, "theoddsapi", "theoddsapi",
                                     sports={"soccer_epl", "tennis_atp", "basketball_nba"})
            polls = src.polls
            await eventually(lambda: src.polls >= polls + 3, what="one more round")  # each sport's last 200 is in
            used = sim.quota_used
            polls = src.polls
            await eventually(lambda: src.polls >= polls + 6, what="polls while frozen")
            assert src.not_modified >= 6  # frozen providers: every poll is a 304 …
            assert sim.quota_used == used  # … and costs nothing
            assert await stored(store, "theoddsapi") == markets  # … and changes nothing
            assert src.pipeline.ingest.health.state == "UP"
            sim.freeze(False)
            await eventually(lambda: sim.quota_used > used, what="fresh bodies after the thaw")
    finally:
        await store.close()


async def test_quota_headers_slow_the_poller_before_exhaustion(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        async with providers(quota=24) as sim, poller(
                "theoddsapi", store, spec(sim.url, "sport=soccer_epl,quota_low_water=20,quota_reserve=4,quota_pause_s=30")) as (src, _):
            await eventually(lambda: src.pipeline.ingest.health.reason == "quota_exhausted", timeout_s=20,
                             what="the poller pausing on its quota reserve")
            stamps = [r.at for r in sim.requests if r.path.endswith("/odds")]
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert gaps[-1] > 2 * min(gaps)  # the interval stretched as the quota ran low (x3.3 at the end)
            assert sim.quota_remaining >= 2  # stopped before the reserve (2 credits per call) was spent
            assert sim.status_counts["theoddsapi:401"] == 0  # never hit OUT_OF_USAGE_CREDITS
            assert src.pipeline.ingest.health.state == "DOWN"
            n = len(stamps)
            await asyncio.sleep(0.5)
            assert len([r for r in sim.requests if r.path.endswith("/odds")]) == n  # paused
    finally:
        await store.close()


async def test_fatal_provider_codes_stop_the_source(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = "k3y-8c1f-secret"
    store = await Store.open(redis_url)
    try:
        async with providers(api_key=key) as sim:
            text = spec(sim.url).replace("api_key=demo", f"api_key={key}")
            async with poller("theoddsapi", store, text) as (src, task):
                await eventually(lambda: src.polls >= 2, what="polls")
                sim.error_code("INVALID_KEY", status=401, provider="theoddsapi")
                with pytest.raises(AuthError) as info:
                    await asyncio.wait_for(asyncio.shield(task), 10)
            assert info.value.code == "INVALID_KEY" and b"INVALID_KEY" in info.value.body
            health = {h.source: h for h in await store.sources()}["theoddsapi"]
            assert health.state == "DOWN" and health.reason == "invalid_key"
            # usage credits spent: retryable, the source is DOWN and waits (no busy loop)
            async with poller("theoddsapi", store, text.replace("name=", "") + ",name=toa2") as (src2, task2):
                await eventually(lambda: src2.polls >= 1, what="polls")
                sim.set_quota(0)
                await eventually(lambda: src2.pipeline.ingest.health.reason == "quota_exhausted", what="quota_exhausted")
                assert not task2.done()
    finally:
        await store.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "simulated INVALID_KEY" in logged  # the provider's body is logged …
    assert key not in logged  # … the key never is (not even in httpx's request lines)
    assert key not in str(info.value) and key not in repr(src.http) and key not in repr(src)


async def test_theoddsapi_down_then_up_is_visible_over_sse(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        async with providers() as sim, poller("theoddsapi", store, spec(sim.url, "breaker_failures=2")) as (src, _):
            await eventually(lambda: src.pipeline.ingest.health.state == "UP", what="source UP")
            app = make_app(store=store)
            async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=None)) as http:
                await eventually(lambda: _markets(http), what="markets served")
                async with http.stream("GET", "/v1/stream?heartbeat_ms=500") as resp:
                    sse = SSEReader(resp)
                    snap = await sse.until(lambda e: e.event == "snapshot")
                    ours = {m["market_id"] for m in snap.data["markets"] if m["source"] == "theoddsapi"}
                    assert ours
                    sim.stall(100_000, seconds=1.5, provider="theoddsapi")  # a blackholed provider: deadlines fire
                    down = await sse.until(lambda e: e.event == "status" and e.data["source"] == "theoddsapi"
                                           and e.data["state"] == "DOWN", timeout_s=20)
                    assert down.data["reason"] == "circuit_open"
                    assert set(down.data["stale_markets"]) >= ours
                    assert all(m["stale"] for m in await _markets(http))
                    sim.clear_faults()
                    up = await sse.until(lambda e: e.event == "status" and e.data["source"] == "theoddsapi"
                                         and e.data["state"] == "UP", timeout_s=20)
                    assert up.data["stale_markets"] == []
            assert src.failures["timeout"] >= 2
    finally:
        await store.close()


async def _markets(http: httpx.AsyncClient) -> list[dict[str, object]]:
    r = await http.get("/v1/markets")
    return [m for m in r.json()["markets"] if m["source"] == "theoddsapi"]


async def test_all_sports_from_the_cached_list_and_the_interval_floor(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        # generous request deadlines: a poll that times out on a busy machine is retried after
        # the backoff, not the floor, and the floor is what this test measures
        floor = ("sport=all,interval_s=0.05,live_interval_s=0.05,min_interval_s=0.4,deadline_s=15,read_timeout_s=15,"
                 "connect_timeout_s=15")
        async with providers() as sim, poller("theoddsapi", store, spec(sim.url, floor)) as (src, _):
            await eventually(lambda: src.polls >= 14, what="polls of every sport")
            assert not src.failures, src.failures
            paths = [r.path for r in sim.requests]
            assert paths.count("/v4/sports") == 1  # static data: one load, then the cached copy
            polled = {p.split("/")[3] for p in paths if p.endswith("/odds")}
            assert polled == {"soccer_epl", "soccer_spain_la_liga", "soccer_germany_bundesliga",
                              "soccer_italy_serie_a", "tennis_atp", "basketball_nba"}
            for sport in ("soccer_epl", "tennis_atp"):
                stamps = [r.at for r in sim.requests if r.path == f"/v4/sports/{sport}/odds"]
                assert len(stamps) >= 2
                assert min(b - a for a, b in itertools.pairwise(stamps)) >= 0.38  # never faster than the floor

            async def every_offered_sport_stored() -> bool:  # the model goes on: a sport may just have opened
                have = {m.specifiers["sport_key"] for m in (await stored(store, "theoddsapi")).values()
                        if m.specifiers}
                return have >= {"soccer_epl", "tennis_atp", "basketball_nba"} & {
                    e.sport_key for e in sim.toa_events.values() if e.markets}
            await eventually(every_offered_sport_stored, what="every offered sport stored")
    finally:
        await store.close()


async def test_theoddsapi_tokens_refresh_once_for_many_requests(redis_url: str) -> None:
    from feed.sources.http_auth import Secret, TokenAuth
    from feed.sources.poller import HttpOptions, ProviderHttp

    store = await Store.open(redis_url)
    try:
        async with providers(require_token=True) as sim:
            text = spec(sim.url).replace("api_key=demo", "client_id=sim-client,client_secret=sim-secret")
            async with poller("theoddsapi", store, text) as (src, _):
                await eventually(lambda: src.polls >= 3, what="token-authenticated polls")
                assert sim.token_requests == 1
                sim.expire_tokens()
                await eventually(lambda: sim.token_requests == 2 and src.polls >= 6, what="one refresh after 401")
                assert src.pipeline.ingest.health.state == "UP"
            token = TokenAuth(f"{sim.url}/v1/token", "sim-client", Secret("sim-secret"))
            http = ProviderHttp(f"{sim.url}/v4", provider="theoddsapi", token=token,
                                options=HttpOptions(rate_per_s=1000, burst=100))
            try:
                n = sim.token_requests
                results = await asyncio.gather(*(http.get("/sports") for _ in range(10)))  # no token yet: one fetch
                assert {r.status for r in results} == {200} and sim.token_requests == n + 1
                sim.expire_tokens()
                results = await asyncio.gather(*(http.get("/sports") for _ in range(10)))  # all 401: one refresh
                assert {r.status for r in results} == {200} and sim.token_requests == n + 2
            finally:
                await http.aclose()
    finally:
        await store.close()
