"""The Pinnacle poller end to end: HTTP providers simulator on 127.0.0.1 →
real poller (httpx) → Ingest → real Redis, with every fault switched on.

Behaviour asserted (research/reliability.md c1, c5): the final Redis
snapshot equals the simulator's truth, each market's deltas are sequenced
exactly once, no request went out before a Retry-After expired (server-side
timestamps), bad bodies are quarantined with their reason while ingestion
carries on, a restarted ingest resumes from the stored cursor, tokens are
refreshed once for many concurrent requests, and a DOWN → UP transition
shows up over SSE with stale markers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.normalise.pinnacle import PinnacleNormaliser
from feed.sources.base import Delivered, Payload
from feed.sources.http_auth import HmacSigner, Secret, TokenAuth
from feed.sources.http_limits import AuthError, cache_age_ms
from feed.sources.poller import (
    HttpOptions,
    HttpResult,
    PinnacleSource,
    PollerOptions,
    ProviderHttp,
)
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

SPORTS = "sports=29+33+4"


def spec(url: str, extra: str = "") -> str:
    return f"pinnacle={url},user=demo,password=demo,{SPORTS},fixtures_interval_s=0.3,{FAST}" + (f",{extra}" if extra else "")


async def test_pinnacle_faults_end_to_end(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        async with providers() as sim, poller("pinnacle", store, spec(sim.url)) as (src, task):
            assert isinstance(src, PinnacleSource)
            await eventually(lambda: src.pipeline.ingest.health.state == "UP", what="source UP")
            await eventually(lambda: stored(store, "pinnacle"), what="markets stored")
            # throttling and server errors
            sim.rate_limit(2, retry_after_s=1, provider="pinnacle")
            await wait_faults_consumed(sim)
            sim.server_error(2, provider="pinnacle")
            await wait_faults_consumed(sim)
            # a stalled reply and a trickled body, both beyond the 1 s deadline
            sim.stall(1, seconds=1.6, provider="pinnacle")
            await wait_faults_consumed(sim)
            sim.trickle(1, seconds=1.6, provider="pinnacle")
            await wait_faults_consumed(sim)
            # duplicate and out-of-order deltas (an old `last`)
            sim.duplicate(2)
            sim.replay_old(2)
            await wait_faults_consumed(sim)
            # bad bodies
            # (delta answers: a snapshot rejected whole is asked again only a minute later — its own
            # test is test_a_rejected_odds_snapshot_is_asked_again_a_minute_later…)
            for kind in ("truncated", "bad_price", "wrong_type"):
                sim.malformed(1, kind=kind, provider="pinnacle", snapshots=False)
                await wait_faults_consumed(sim)
            await asyncio.sleep(1.7)  # let the stalled/trickled handlers finish on the server side
            await eventually(lambda: src.pipeline.ingest.health.state == "UP", what="source UP again")
            markets = await converge(store, sim, "pinnacle", "pinnacle")
            assert not task.done()

            assert_retry_after_honoured(sim, "pinnacle")
            assert src.http.stats["deadline"] >= 2  # the stall and the trickle
            assert {"rate_limited", "upstream_5xx", "timeout"} <= set(src.failures)
            # the replayed old answers (and duplicates that carried data) were dropped whole
            assert src.stale_answers >= 2
            counts = (await store.quarantine_counts())["pinnacle"]
            assert counts == {"invalid_json": 1, "invalid_price": 1, "invalid_schema": 1}
            reasons = {q["reason"] for q in await store.quarantined()}
            assert reasons == {"invalid_json", "invalid_price", "invalid_schema"}
            await assert_log_sequenced(store, markets)
            # the model's in-play events went through the live event (parentId) and kept their ids
            live = [e for e in sim.pn_events.values() if e.live_status == 1]
            assert live and all(f"pn:{e.parent}:0:moneyline" in markets for e in live if e.period.ml is not None
                                and f"pn:{e.parent}:0:moneyline" in sim.pn_served)
            assert not any(mid.startswith(f"pn:{e.id}:") for e in live for mid in markets)
            assert any(m.in_play for m in markets.values())
            # health: UP with the cursor stored, lag measured
            health = {h.source: h for h in await store.sources()}["pinnacle"]
            assert health.state == "UP" and health.kind == "pinnacle" and health.cursor
            await eventually(lambda: _stored_odds_cursor(store, "29", sim.pn_last), what="cursor stored with the data")
            p50, p99 = src.pipeline.lag.percentiles()
            assert p50 is not None and p99 is not None and p50 <= p99
    finally:
        await store.close()


async def test_pinnacle_restart_resumes_from_the_stored_cursor(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        async with providers() as sim:
            async with poller("pinnacle", store, spec(sim.url)) as (src, _):
                await eventually(lambda: src.since("odds", 29) is not None and src.polls >= 6,
                                 what="a few polls")
            cursor = json.loads(await store.load_cursor("pinnacle") or "{}")
            # fixtures, odds and (once a settled answer was applied) settled: each endpoint's last per sport
            assert set(cursor) <= {"fixtures", "odds", "settled"} and cursor["odds"]["29"] > 0
            await asyncio.sleep(0.5)  # the providers move on while the ingest is down
            before = len(sim.requests)
            async with poller("pinnacle", store, spec(sim.url)) as (src2, _):
                def odds_calls(sport: str) -> list[dict[str, str]]:
                    return [r.query for r in list(sim.requests)[before:] if r.path == "/v2/odds"
                            and r.query["sportId"] == sport]

                await eventually(lambda: src2.polls >= 3 and all(len(odds_calls(s)) >= 2 for s in ("29", "33", "4")),
                                 what="polls after the restart")
                first = {}
                for r in list(sim.requests)[before:]:
                    if r.path in ("/v2/odds", "/v1/fixtures"):
                        first.setdefault((r.path, r.query["sportId"]), r.query)
                for r in list(sim.requests)[before:]:
                    if r.path == "/v1/fixtures/settled":
                        first.setdefault((r.path, r.query["sportId"]), r.query)
                for sport in ("29", "33", "4"):
                    # odds: a snapshot first (the restored markets' cutoffs are only in the odds), then
                    # deltas from a cursor no older than the stored one
                    calls = odds_calls(sport)
                    assert "since" not in calls[0] and int(calls[1]["since"]) >= cursor["odds"][sport]
                    if sport in cursor.get("settled", {}):  # results resume from their own cursor too
                        assert first[("/v1/fixtures/settled", sport)].get("since") == str(cursor["settled"][sport])
                    assert "since" not in first[("/v1/fixtures", sport)]  # names and parentId links re-read whole
                markets = await converge(store, sim, "pinnacle", "pinnacle")
                await assert_log_sequenced(store, markets)  # seq continued from the stored snapshots
    finally:
        await store.close()


async def test_pinnacle_tokens_refresh_once_and_requests_are_signed(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "hmac-secret-7f3a"
    store = await Store.open(redis_url)
    try:
        async with providers(require_token=True, hmac_secret=secret, client_secret="client-secret-91bd") as sim:
            creds = "client_id=sim-client,client_secret=client-secret-91bd,hmac_key_id=sim,hmac_secret=hmac-secret-7f3a"
            text = f"pinnacle={sim.url},{creds},{SPORTS},fixtures_interval_s=0.3,{FAST}"
            async with poller("pinnacle", store, text) as (src, _):
                await eventually(lambda: src.polls >= 3, what="signed, token-authenticated polls")
                assert sim.token_requests == 1
                sim.expire_tokens()  # every token revoked: the next request gets 401
                await eventually(lambda: sim.token_requests == 2 and src.polls >= 6, what="refresh after 401")
                assert src.http.stats["token_retries"] == 1
                assert src.pipeline.ingest.health.state == "UP"

            # many concurrent requests after a revocation share one refresh
            token = TokenAuth("/v1/token", "sim-client", Secret("client-secret-91bd"))
            http = ProviderHttp(sim.url, provider="pinnacle", options=HttpOptions(rate_per_s=1000, burst=100),
                                token=token, signer=HmacSigner("sim", Secret(secret)))
            try:
                await http.get("/v2/sports")
                sim.expire_tokens()
                n = sim.token_requests
                results = await asyncio.gather(*(http.get("/v1/fixtures", {"sportId": 29}) for _ in range(12)))
                assert {r.status for r in results} == {200}
                assert sim.token_requests == n + 1 and token.refreshes == 2
            finally:
                await http.aclose()

            # refreshed before expiry: a short-lived token never meets a 401
            async with providers(require_token=True, token_ttl_s=1.0) as sim2:
                token2 = TokenAuth("/v1/token", "sim-client", Secret("sim-secret"), refresh_margin_s=0.6)
                http2 = ProviderHttp(sim2.url, provider="pinnacle", options=HttpOptions(rate_per_s=1000, burst=100),
                                     token=token2)
                try:
                    for _ in range(3):
                        results = await asyncio.gather(*(http2.get("/v2/sports") for _ in range(8)))
                        assert {r.status for r in results} == {200}
                        await asyncio.sleep(0.5)
                    assert 2 <= sim2.token_requests <= 4  # one per expiry window, never one per request
                    assert http2.stats["token_retries"] == 0
                finally:
                    await http2.aclose()

            # a wrong signing secret is refused, typed and fatal
            bad = ProviderHttp(sim.url, provider="pinnacle", token=TokenAuth("/v1/token", "sim-client",
                               Secret("client-secret-91bd")), signer=HmacSigner("sim", Secret("wrong")))
            try:
                with pytest.raises(AuthError):
                    await bad.get("/v2/sports")
            finally:
                await bad.aclose()
    finally:
        await store.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for s in (secret, "client-secret-91bd"):
        assert s not in logged
    assert secret not in repr(src) and secret not in repr(src.http.signer)


async def test_pinnacle_down_then_up_is_visible_over_sse(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        async with providers() as sim, poller("pinnacle", store, spec(sim.url, "breaker_failures=2")) as (src, _):
            await eventually(lambda: src.pipeline.ingest.health.state == "UP", what="source UP")
            app = make_app(store=store)
            async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=None)) as http:
                await eventually(lambda: _markets(http, "pinnacle"), what="markets served")
                # (imaged by snapshots, they read stale until a delta confirms them)
                await eventually(lambda: _all_fresh(http, "pinnacle"), what="markets confirmed by a delta")
                async with http.stream("GET", "/v1/stream?heartbeat_ms=500") as resp:
                    sse = SSEReader(resp)
                    snap = await sse.until(lambda e: e.event == "snapshot")
                    ours = {m["market_id"] for m in snap.data["markets"] if m["source"] == "pinnacle"}
                    assert ours and not any(m["stale"] for m in snap.data["markets"] if m["source"] == "pinnacle")

                    sim.server_error(100_000, status=503, provider="pinnacle")  # the provider goes away
                    down = await sse.until(lambda e: e.event == "status" and e.data["source"] == "pinnacle"
                                           and e.data["state"] == "DOWN", timeout_s=15)
                    assert down.data["reason"] == "circuit_open"
                    assert set(down.data["stale_markets"]) >= ours - {m for m in ours if not m.startswith("pn:")}
                    listing = await _markets(http, "pinnacle")
                    assert listing and all(m["stale"] for m in listing)

                    sim.clear_faults()  # back: the half-open probe succeeds
                    up = await sse.until(lambda e: e.event == "status" and e.data["source"] == "pinnacle"
                                         and e.data["state"] == "UP", timeout_s=15)
                    assert up.data["stale_markets"] == []
                    await eventually(lambda: _all_fresh(http, "pinnacle"), what="markets fresh again")
            assert src.http.breaker.opens >= 1
    finally:
        await store.close()


async def _stored_odds_cursor(store: Store, sport: str, last: int) -> bool:
    return json.loads(await store.load_cursor("pinnacle") or "{}").get("odds", {}).get(sport) == last


async def _markets(http: httpx.AsyncClient, source: str) -> list[dict[str, object]]:
    r = await http.get("/v1/markets")
    return [m for m in r.json()["markets"] if m["source"] == source]


async def _all_fresh(http: httpx.AsyncClient, source: str) -> bool:
    listing = await _markets(http, source)
    return bool(listing) and not any(m["stale"] for m in listing)



async def test_pinnacle_all_sports_come_from_the_cached_sports_list(redis_url: str) -> None:
    store = await Store.open(redis_url)
    try:
        text = f"pinnacle={{url}},user=demo,password=demo,sports=all,fixtures_interval_s=0.3,{FAST}"
        async with providers() as sim, poller("pinnacle", store, text.format(url=sim.url)) as (src, _):
            await eventually(lambda: src.polls >= 9, what="polls of every sport")
            paths = [r for r in sim.requests if r.provider == "pinnacle"]
            assert sum(r.path == "/v2/sports" for r in paths) == 1  # loaded once, then cached
            assert {r.query["sportId"] for r in paths if r.path == "/v2/odds"} == {"29", "33", "4"}
    finally:
        await store.close()


async def _confirmations(src: object) -> list[tuple[int, int]]:
    """Once the Pinnacle source is UP and every sport past its snapshots (a snapshot confirms
    nothing: the next odds call is a delta), every odds confirmation it makes from now, as
    (confirmed as of, wall ms when confirmed)."""
    import time as _time

    assert isinstance(src, PinnacleSource)
    await eventually(lambda: src.pipeline.ingest.health.state == "UP", what="source UP")
    await eventually(lambda: set(src._odds_ok_at) == {"29", "33", "4"}, what="a delta of every sport")
    calls: list[tuple[int, int]] = []
    real = src.odds_confirmed

    def spy(key: str, at_ms: int) -> None:
        calls.append((at_ms, _time.time_ns() // 1_000_000))
        real(key, at_ms)
    src.odds_confirmed = spy  # type: ignore[method-assign]
    return calls


async def test_a_slow_answer_confirms_the_markets_as_of_its_request_not_its_arrival(redis_url: str) -> None:
    """An odds answer that takes 0.8 s reflects the provider at some moment between the request
    and its arrival: it may confirm the markets only as of the request. Confirming as of the
    arrival served old prices as fresh under load (the fault suite's wrong-fresh)."""
    store = await Store.open(redis_url)
    try:
        async with providers() as sim, poller("pinnacle", store, spec(sim.url)) as (src, _task):
            calls = await _confirmations(src)
            sim.trickle(1, seconds=0.8, provider="pinnacle", path="/v2/odds")  # (a fixtures body confirms nothing)
            await wait_faults_consumed(sim)
            await eventually(lambda: any(now - at >= 700 for at, now in calls), what="the slow answer's confirmation")
            assert all(at <= now for at, now in calls)
    finally:
        await store.close()


async def test_an_answer_a_cache_served_confirms_as_of_its_age_before_the_request(redis_url: str) -> None:
    """A cache in front of the provider (a CDN) serves an earlier answer again with ``Age``
    (RFC 9111 §5.1): the answer — here "nothing since" or the last delta — is that much older
    than its request. Confirming it as of the request served whatever changed meanwhile as fresh
    (the "repeated empty answer" README named a known limit: without ``Age`` it still is). Now it
    confirms as of the request less ``Age`` + 1 s; its data is delivered as arriving on arrival
    (the normaliser times period cutoffs and clock-skew bounds by it: an earlier time kept a
    market open past its cutoff, or read provider times as future) with its age beside it, by
    which the ingest stamps the changes it brings (tests/test_trust.py)."""
    store = await Store.open(redis_url)
    try:
        async with providers() as sim, poller("pinnacle", store, spec(sim.url)) as (src, _task):
            calls = await _confirmations(src)
            assert isinstance(src, PinnacleSource)
            read: dict[object, HttpResult] = {}  # task -> the cached answer it just read
            delivered: list[tuple[HttpResult, int, int]] = []  # (a cached answer, its receipt, its data's age)
            get, ingest_body = src.http.get, src.ingest_body

            async def spy_get(path: str, params: Mapping[str, Any] | None = None, *,
                              headers: Mapping[str, str] | None = None) -> HttpResult:
                res = await get(path, params, headers=headers)
                if res.age_ms:
                    read[asyncio.current_task()] = res
                return res

            async def spy_ingest(body: bytes, recv_ms: int, channel: str = "", age_ms: int = 0) -> Delivered:
                res = read.pop(asyncio.current_task(), None)  # (the same task delivers what it read)
                if res is not None:
                    delivered.append((res, recv_ms, age_ms))
                return await ingest_body(body, recv_ms, channel, age_ms)
            src.http.get = spy_get  # type: ignore[method-assign]
            src.ingest_body = spy_ingest  # type: ignore[method-assign]
            sim.freeze()  # nothing changes: every answer is "nothing since" — the one a cache repeats
            polls = src.polls
            await eventually(lambda: src.polls >= polls + 6, what="answers of a frozen provider")
            sim.cached(1, age_s=30)
            await wait_faults_consumed(sim)
            await eventually(lambda: any(now - at >= 31_000 for at, now in calls),
                             what="the cached answer's confirmation, 31 s before its request")
            assert all(at <= now for at, now in calls)
            assert len(delivered) == 1, delivered
            res, data_ms, data_age = delivered[0]
            assert res.age_ms == 31_000
            assert data_ms == res.recv_ms  # the normaliser reads it as arriving then (cutoffs, skew bounds)…
            assert data_age == res.recv_ms - res.asked_ms >= 31_000  # …and the ingest stamps its changes aged
            assert any(at == res.asked_ms <= res.recv_ms - 31_000 for at, _ in calls)  # what it confirms: aged
    finally:
        await store.close()


def test_http_result_ages_what_an_answer_confirms_and_the_changes_it_brings() -> None:
    """``HttpResult.asked_ms`` (what an answer confirms, and since §85 what its changes are stamped
    as of: ``data_age_ms`` before the read) is its request — its read less the round trip, rounded
    up — less its ``Age`` + 1 s when a cache served it; ``recv_ms`` (when the normalisers read it
    as arriving: cutoffs, skew bounds) is its read either way."""
    fresh = HttpResult(200, httpx.Headers({}), b"{}", 1_000_000, 250.2)
    cached = HttpResult(200, httpx.Headers({"Age": "30"}), b"{}", 1_000_000, 250.2)
    assert (fresh.age_ms, fresh.asked_ms, fresh.recv_ms, fresh.data_age_ms) == (0, 999_749, 1_000_000, 251)
    assert (cached.age_ms, cached.asked_ms, cached.recv_ms, cached.data_age_ms) == (31_000, 968_749, 1_000_000,
                                                                                     31_251)
    junk = HttpResult(304, httpx.Headers({"Age": "soon"}), b"", 1_000_000, 0.0)
    assert junk.asked_ms == 1_000_000  # no age can be read from it: taken as the origin's answer


@pytest.mark.parametrize(("age", "ms"), [(None, 0), ("0", 1000), ("5", 6000), ("5, 7", 8000), (" 12 ", 13000),
                                         ("-1", 0), ("abc", 0), ("1e3", 0), ("+5", 0), ("9" * 12, 86_401_000),
                                         ("0000000100", 101_000), ("5, 100", 101_000), ("007", 8000),
                                         ("abc, 5", 6000), ("9" * 5000, 86_401_000)])
def test_cache_age(age: str | None, ms: int) -> None:
    """``Age``: whole seconds (truncated: + 1 s) read whole (leading zeros and all), the largest
    valid member of a list, capped at a day (however many digits); a member that is not a
    non-negative integer is ignored, and with no valid member the answer says nothing (0)."""
    assert cache_age_ms(httpx.Headers({} if age is None else {"Age": age})) == ms


class _BookSink:
    """A sink that normalises into a Book as the ingest does (empty payloads skipped, a body the
    normaliser rejects whole counted and, while markets are held, reported lost, like
    feed.ingest.Ingest) and records what each confirmation vouched for and each health state."""

    source = "pinnacle"
    session = "s1"  # the ingest's upstream session, stamped on the markets

    def __init__(self) -> None:
        self.normaliser, self.book = PinnacleNormaliser("pinnacle"), Book()
        self.cursor: str | None = None
        self.confirmed: list[tuple[int, dict[str, tuple[str, str | None]]]] = []
        self.states: list[tuple[str, str | None]] = []

    async def deliver(self, payloads: list[Payload]) -> Delivered:
        stale = False
        rejected = 0
        for p in payloads:
            if not p.data.strip():
                continue
            try:
                batch = self.normaliser.feed(p.data, p.recv_ms, p.channel)
            except FeedDecodeError:
                rejected += 1
                continue
            for u in batch.updates:
                self.book.apply(u, stored_at=p.recv_ms, session=self.session)
            self.cursor = batch.cursor or self.cursor
            stale = stale or batch.stale
        return Delivered(stale=stale, rejected_messages=rejected, lost=bool(rejected and self.book.markets))

    def confirm(self, recv_ms: int) -> None:
        self.confirmed.append((recv_ms, {mid: (m.status, m.suspend_reason) for mid, m in self.book.markets.items()}))

    def set_state(self, state: str, reason: str | None) -> None:
        self.states.append((state, reason))


async def test_an_empty_odds_answer_suspends_what_is_past_its_cutoff_before_it_confirms() -> None:
    """An odds answer with nothing new confirmed the sport's markets without the normaliser hearing
    of it, so a market whose cutoff had passed read OPEN and fresh (Pinnacle: open only while the
    cutoff is ahead). It is now delivered as an empty delta first."""
    t0 = 1755349200000  # 13:00:00Z; the cutoff at 13:01
    fixtures = json.dumps({"sportId": 29, "last": 10, "league": [{"id": 1980, "name": "EPL", "events": [
        {"id": 1, "starts": "2025-08-16T13:01:00Z", "home": "Arsenal", "away": "Chelsea", "liveStatus": 0}]}]})
    odds = json.dumps({"sportId": 29, "last": 20, "leagues": [{"id": 1980, "events": [{"id": 1, "periods": [
        {"number": 0, "lineId": 5, "status": 1, "cutoff": "2025-08-16T13:01:00Z",
         "moneylineUpdatedAt": "2025-08-16T12:59:00Z", "moneyline": {"home": 2.1, "away": 3.6, "draw": 3.4}}]}]}]})
    answers = {"/v1/fixtures": [fixtures.encode()], "/v2/odds": [odds.encode(), b""]}
    now = [t0]

    def handle(request: httpx.Request) -> httpx.Response:
        queue = answers[request.url.path]
        return httpx.Response(200, content=queue.pop(0) if len(queue) > 1 else queue[0])

    http = ProviderHttp("http://pinnacle.test", provider="pinnacle", transport=httpx.MockTransport(handle),
                        clock_ms=lambda: now[0])
    src = PinnacleSource("pinnacle", http, PollerOptions(), sports=[29], fixtures_interval_s=1e9, resync_s=0,
                         settled_interval_s=None)
    sink = _BookSink()
    src._sink = sink  # type: ignore[assignment]  # (what run() sets)
    try:
        await src.poll("29")  # fixtures and odds snapshots (a snapshot confirms nothing)
        now[0] = t0 + 5_000
        await src.poll("29")  # since=20: the provider answers an empty body
        assert [c for _, c in sink.confirmed] == [{"pn:1:0:moneyline": ("OPEN", None)}]
        now[0] = t0 + 120_000  # a minute past the cutoff
        await src.poll("29")  # since=20: empty again
        assert src.since("odds", 29) == 20  # (no cursor moved)
        assert len(sink.confirmed) == 2  # the empty answer confirmed the sport …
        assert sink.confirmed[-1][1] == {"pn:1:0:moneyline": ("SUSPENDED", "past_cutoff")}  # … suspended first
    finally:
        await http.aclose()


# --- a restart: restored markets have no known cutoff until their period is sent again ------------

_T0 = 1755349200000  # 13:00:00Z; the cutoff at 13:01


def _fixtures(last: int) -> bytes:
    return json.dumps({"sportId": 29, "last": last, "league": [{"id": 1980, "name": "EPL", "events": [
        {"id": 1, "starts": "2025-08-16T13:01:00Z", "home": "Arsenal", "away": "Chelsea", "liveStatus": 0}]}]}).encode()


def _odds(last: int, cutoff: str = "2025-08-16T13:01:00Z") -> bytes:
    return json.dumps({"sportId": 29, "last": last, "leagues": [{"id": 1980, "events": [{"id": 1, "periods": [
        {"number": 0, "lineId": 5, "status": 1, "cutoff": cutoff,
         "moneylineUpdatedAt": "2025-08-16T12:59:00Z",
         "moneyline": {"home": 2.1, "away": 3.6, "draw": 3.4}}]}]}]}).encode()


class _Pinnacle:
    """A scripted Pinnacle: an odds snapshot call answers ``snapshots`` in turn (the last one
    repeated), a fixtures snapshot call ``fixtures`` likewise (default: ``_fixtures(10)``), a delta
    call an empty body (nothing new). ``calls`` records (path, since) of every request; ``now`` is
    the wall clock (ms) and ``mono`` the poller's monotonic clock (s)."""

    def __init__(self, snapshots: list[bytes], fixtures: list[bytes] | None = None) -> None:
        self.answers = {"/v2/odds": snapshots, "/v1/fixtures": fixtures or [_fixtures(10)]}
        self.calls: list[tuple[str, str | None]] = []
        self.now = [_T0]
        self.mono = [0.0]

    def handle(self, request: httpx.Request) -> httpx.Response:
        since = request.url.params.get("since")
        self.calls.append((request.url.path, since))
        if since is not None:
            return httpx.Response(200, content=b"")
        queue = self.answers[request.url.path]
        return httpx.Response(200, content=queue.pop(0) if len(queue) > 1 else queue[0])

    def source(self, sink: _BookSink, resync_s: float = 0) -> tuple[PinnacleSource, ProviderHttp]:
        http = ProviderHttp("http://pinnacle.test", provider="pinnacle", transport=httpx.MockTransport(self.handle),
                            clock_ms=lambda: self.now[0])
        src = PinnacleSource("pinnacle", http, PollerOptions(), sports=[29], fixtures_interval_s=1e9,
                             resync_s=resync_s, settled_interval_s=None, clock=lambda: self.mono[0])
        src._sink = sink  # type: ignore[assignment]  # (what run() sets)
        return src, http


async def _restarted(pn: _Pinnacle) -> tuple[_BookSink, int]:
    """Run a first process (snapshots at _T0: the market OPEN, cutoff 13:01) and return a second
    one's sink, restored from what the first stored (markets and cursor), and the stored odds cursor."""
    first = _BookSink()
    src, http = pn.source(first)
    try:
        await src.poll("29")  # the snapshots (they confirm nothing) …
        await src.poll("29")  # … and a delta (nothing new: it confirms)
    finally:
        await http.aclose()
    assert first.confirmed[-1][1] == {"pn:1:0:moneyline": ("OPEN", None)}
    stored_cursor = src.since("odds", 29)
    assert stored_cursor is not None
    second = _BookSink()
    second.book.restore(first.book.markets.values())
    second.normaliser.restore(first.book.markets.values(), first.cursor)
    second.cursor = first.cursor
    return second, stored_cursor


async def test_after_a_restart_the_first_odds_call_is_a_snapshot_so_a_restored_cutoff_is_known() -> None:
    """Gap: a restarted poller resumed odds with since=<stored cursor>; a restored OPEN market's
    period was never sent again (unchanged), its cutoff was unknown, and every delta poll confirmed
    it OPEN and fresh after its cutoff. The first odds call of a run is now a snapshot (one request,
    like the delta it replaces): the period comes back with its cutoff."""
    pn = _Pinnacle([_odds(20), _odds(30)])
    sink, stored = await _restarted(pn)
    pn.now[0] = _T0 + 120_000  # the restart came a minute after the cutoff
    pn.calls.clear()
    src, http = pn.source(sink)
    try:
        await src.poll("29")
        confirmed_first = list(sink.confirmed)
        pn.now[0] += 5_000
        pn.mono[0] += 5
        await src.poll("29")
        assert sink.confirmed and all(c == {"pn:1:0:moneyline": ("SUSPENDED", "past_cutoff")}
                                      for _, c in sink.confirmed)  # never vouched for OPEN past its cutoff
        assert confirmed_first == []  # the snapshot (up to a minute old) confirmed nothing; the delta did
        assert pn.calls == [("/v1/fixtures", None), ("/v2/odds", None), ("/v2/odds", "30")]
        assert src.since("odds", 29) == 30 > stored
    finally:
        await http.aclose()


async def test_a_cached_snapshot_older_than_the_resumed_cursor_is_asked_again_a_minute_later() -> None:
    """Pinnacle caches snapshot answers 60 s: right after a restart the snapshot may be older than
    the stored cursor (dropped as stale). No delta follows it (the markets' cutoffs are still
    unknown: nothing confirms them, they read stale) and the snapshot is asked again once the
    cache has moved on — at most one snapshot a minute (Pinnacle's historic snapshot limit)."""
    pn = _Pinnacle([_odds(20), _odds(15), _odds(40)])  # (the first process's, a cached older one, a fresh one)
    sink, _ = await _restarted(pn)
    pn.now[0] = _T0 + 120_000
    pn.calls.clear()
    src, http = pn.source(sink)
    try:
        await src.poll("29")
        assert pn.calls[-1] == ("/v2/odds", None) and src.stale_answers == 1 and src.since("odds", 29) == 20
        for _ in range(11):  # polls every 5 s for 55 s: no odds call, no confirmation
            pn.now[0] += 5_000
            pn.mono[0] += 5
            await src.poll("29")
        assert [c for c in pn.calls if c[0] == "/v2/odds"] == [("/v2/odds", None)]
        assert sink.confirmed == [] and sink.book.markets["pn:1:0:moneyline"].status == "OPEN"
        pn.now[0] += 5_000
        pn.mono[0] += 5  # 60 s after the stale snapshot was asked
        await src.poll("29")
        assert [c for c in pn.calls if c[0] == "/v2/odds"] == [("/v2/odds", None)] * 2
        assert src.since("odds", 29) == 40
        assert sink.book.markets["pn:1:0:moneyline"].suspend_reason == "past_cutoff"
        pn.mono[0] += 5
        await src.poll("29")
        assert pn.calls[-1] == ("/v2/odds", "40")
        assert sink.confirmed and all(c == {"pn:1:0:moneyline": ("SUSPENDED", "past_cutoff")}
                                      for _, c in sink.confirmed)
    finally:
        await http.aclose()


async def test_an_empty_answer_to_the_snapshot_after_a_restart_suspends_the_restored_markets() -> None:
    """An empty body answering a snapshot call says the sport offers nothing: delivered as an empty
    delta it left the restored markets OPEN with no known cutoff, and the next delta confirmed them.
    It is now an empty snapshot: they are SUSPENDED (``not_offered``) before anything confirms."""
    pn = _Pinnacle([_odds(20), b""])
    sink, _ = await _restarted(pn)
    pn.now[0] = _T0 + 10_000  # before the cutoff: only the snapshot can tell
    src, http = pn.source(sink)
    try:
        await src.poll("29")
        pn.now[0] += 5_000
        pn.mono[0] += 5
        await src.poll("29")
        assert sink.confirmed and all(c == {"pn:1:0:moneyline": ("SUSPENDED", "not_offered")}
                                      for _, c in sink.confirmed)
        assert sink.book.markets["pn:1:0:moneyline"].selections[0].price == 2.1  # prices kept
    finally:
        await http.aclose()


async def test_after_a_restart_no_odds_are_asked_before_a_fixtures_snapshot_newer_than_the_cursor() -> None:
    """Right after a restart the fixtures snapshot may come back older than the stored fixtures
    cursor (cached): dropped, the normaliser knows no fixture, and the odds snapshot would suspend
    (not_offered) and forget every restored market of an unknown event — confirmed so by the next
    delta while Pinnacle still offers them. The odds wait until a fixtures snapshot was applied
    (asked again a minute later: the cache has moved on)."""
    later = "2025-08-16T14:00:00Z"  # the cutoff: ahead all along
    pn = _Pinnacle([_odds(20, later), _odds(30, later)], fixtures=[_fixtures(10), _fixtures(5), _fixtures(12)])
    sink, _ = await _restarted(pn)
    seq = sink.book.markets["pn:1:0:moneyline"].seq
    pn.now[0] = _T0 + 5_000
    pn.calls.clear()
    src, http = pn.source(sink)
    try:
        for _ in range(14):  # a poll every 5 s for 70 s
            await src.poll("29")
            pn.now[0] += 5_000
            pn.mono[0] += 5
        assert sink.confirmed and all(c == {"pn:1:0:moneyline": ("OPEN", None)} for _, c in sink.confirmed)
        assert {s.selection_id: s.price for s in sink.book.markets["pn:1:0:moneyline"].selections} == {
            "home": 2.1, "away": 3.6, "draw": 3.4}
        assert sink.book.markets["pn:1:0:moneyline"].seq == seq  # never suspended meanwhile (nothing changed)
        snapshots = [c[0] for c in pn.calls if c[1] is None]
        assert snapshots[:3] == ["/v1/fixtures", "/v1/fixtures", "/v2/odds"]  # no odds before the 2nd fixtures
    finally:
        await http.aclose()


# --- snapshots are Pinnacle's cached answers (60 s): nothing of one reads fresher than it may be --------


def _node_reads(sink: _BookSink, now: int) -> tuple[int, bool]:
    """(age_ms, stale) of ``pn:1:0:moneyline`` on an API node (default limits: pre-match 60 s) at
    ``now`` (wall ms), its source UP and confirmed as of the sink's last confirmation (none: 0)."""
    from streaming.state import NodeState

    from feed.models import SourceHealth
    from feed.settings import Settings

    node = NodeState(Settings(), 1)
    node.replace_partitions({0: ("0-0", list(sink.book.markets.values()))}, "e")
    last = sink.confirmed[-1][0] if sink.confirmed else 0
    node.set_health([SourceHealth(source="pinnacle", kind="pinnacle", state="UP", session=sink.session,
                                  last_message_at=last, updated_at=now)], now=now)
    return node.age_stale(node.markets["pn:1:0:moneyline"], now)


async def test_a_market_imaged_by_the_first_snapshot_reads_stale_until_a_delta_confirms_it() -> None:
    """Gap: the initial odds snapshot confirmed the sport as of its request and stamped what it
    imaged as received then — but Pinnacle serves snapshot calls from a 60 s cache: a market read
    fresh at a price up to a minute old until the next delta. Now a snapshot confirms nothing and
    its updates count as of the request − 60 s (provider times still checked against the receipt:
    the moneyline changed 10 s before it, no clock_skew): stale until the delta confirms it."""
    later = "2025-08-16T14:00:00Z"  # the cutoff: ahead all along
    odds = json.loads(_odds(20, later))
    odds["leagues"][0]["events"][0]["periods"][0]["moneylineUpdatedAt"] = "2025-08-16T12:59:50Z"  # 10 s ago
    pn = _Pinnacle([json.dumps(odds).encode()])
    sink = _BookSink()
    src, http = pn.source(sink)
    try:
        await src.poll("29")  # fixtures and odds snapshots at 13:00:00
        m = sink.book.markets["pn:1:0:moneyline"]
        assert m.status == "OPEN" and m.source_ts == _T0 - 10_000  # applied, not refused as clock skew
        assert m.received_at <= _T0 - 60_000  # as of the request less the cache
        assert sink.confirmed == []  # the snapshot vouched for nothing
        age, stale = _node_reads(sink, _T0 + 1_000)
        assert stale and age >= 61_000  # never "1 s old"
        pn.now[0] += 5_000
        pn.mono[0] += 5
        await src.poll("29")  # a delta (since=20): nothing new since the snapshot's last — it confirms
        assert pn.calls[-1] == ("/v2/odds", "20") and len(sink.confirmed) == 1
        age, stale = _node_reads(sink, _T0 + 6_000)
        assert not stale and age == _T0 + 6_000 - sink.confirmed[-1][0] < 2_000  # as of the delta's request
    finally:
        await http.aclose()


async def test_an_hourly_resync_snapshot_older_than_the_cursor_is_asked_again_with_deltas_held() -> None:
    """Gap: at a 5 s delta rate the hourly (resync_s) odds snapshot is usually Pinnacle's cached
    answer, older than the cursor: dropped, the deltas went on (moving the cursor past the next
    cached answer) and the resync never took effect — a change the deltas missed stayed wrong. Now
    no fixtures or odds call follows a stale resync snapshot until it is asked again a minute
    later (the cache has moved on past the held cursor): applied, the missed price is corrected,
    and nothing confirms it before the next delta."""
    missed = json.loads(_odds(40, "2025-08-16T14:00:00Z"))
    missed["leagues"][0]["events"][0]["periods"][0]["moneyline"]["home"] = 2.3  # a change the deltas missed
    pn = _Pinnacle([_odds(20, "2025-08-16T14:00:00Z"), _odds(15, "2025-08-16T14:00:00Z"),
                    json.dumps(missed).encode()])
    sink = _BookSink()
    src, http = pn.source(sink, resync_s=3600)
    try:
        await src.poll("29")  # snapshots at 0 s
        pn.mono[0], pn.now[0] = 5, _T0 + 5_000
        await src.poll("29")  # a delta
        confirmed = len(sink.confirmed)
        pn.mono[0], pn.now[0] = 3600, _T0 + 3_600_000
        pn.calls.clear()
        await src.poll("29")  # the hourly resync: a cached snapshot (last 15 < 20), dropped
        assert pn.calls[-1] == ("/v2/odds", None) and src.since("odds", 29) == 20
        for _ in range(11):  # every 5 s for 55 s: deltas held, nothing confirmed
            pn.mono[0] += 5
            pn.now[0] += 5_000
            await src.poll("29")
        assert [c for c in pn.calls if c[0] == "/v2/odds"] == [("/v2/odds", None)]
        assert len(sink.confirmed) == confirmed
        pn.mono[0] += 5  # a minute after the stale one: asked again, newer than the cursor
        pn.now[0] += 5_000
        await src.poll("29")
        assert [c for c in pn.calls if c[0] == "/v2/odds"] == [("/v2/odds", None)] * 2
        assert src.since("odds", 29) == 40
        m = sink.book.markets["pn:1:0:moneyline"]
        assert m.selection("home") is not None and m.selection("home").price == 2.3  # type: ignore[union-attr]
        assert m.received_at <= pn.now[0] - 60_000 and len(sink.confirmed) == confirmed  # as of the cache
        pn.mono[0] += 5
        pn.now[0] += 5_000
        await src.poll("29")
        assert pn.calls[-1] == ("/v2/odds", "40") and len(sink.confirmed) == confirmed + 1
        pn.mono[0] += 5
        await src.poll("29")
        assert pn.calls[-1] == ("/v2/odds", "40")  # deltas go on; the next resync in an hour
    finally:
        await http.aclose()


async def test_a_resync_whose_snapshots_keep_coming_back_older_than_the_cursor_gives_up_after_a_bound() -> None:
    """The retries are bounded: PN_RESYNC_TRIES stale resync snapshots a minute apart, then deltas
    resume (until the next resync)."""
    from feed.sources.poller import PN_RESYNC_TRIES

    class StaleSnapshots(_BookSink):
        async def deliver(self, payloads: list[Payload]) -> Delivered:
            if self.book.markets and all(p.channel.startswith("odds:29:snapshot") for p in payloads):
                return Delivered(stale=True)  # (a resync's answer: always older than the cursor)
            return await super().deliver(payloads)

    pn = _Pinnacle([_odds(20, "2025-08-16T14:00:00Z")])
    sink = StaleSnapshots()
    src, http = pn.source(sink, resync_s=3600)
    try:
        await src.poll("29")
        pn.mono[0] = 3600
        pn.calls.clear()
        for _ in range(12 * PN_RESYNC_TRIES + 2):  # every 5 s
            await src.poll("29")
            pn.mono[0] += 5
        odds = [c[1] for c in pn.calls if c[0] == "/v2/odds"]
        # snapshots at 3600, 3660, 3720 s (deltas held between them), then a delta every 5 s
        assert odds == [None] * PN_RESYNC_TRIES + ["20"] * 13
    finally:
        await http.aclose()


@pytest.mark.parametrize("restarted", [False, True], ids=["first-start", "restart"])
async def test_a_rejected_fixtures_snapshot_is_asked_again_a_minute_later_with_the_source_degraded(
        restarted: bool) -> None:
    """Gap: a fixtures snapshot the normaliser rejected whole (a 200 with a malformed body) never
    imaged the fixtures, so every poll asked another fixtures snapshot (Pinnacle's snapshot limit:
    429s) and no odds call was ever made — the sport's markets stale for good, the source UP. Now it
    is asked again a minute later (each time it is rejected again: at most one a minute, never
    given up), no odds call meanwhile (nothing confirms a market of unknown fixtures), the source
    DEGRADED (bad_fixtures) until one applies; then the odds resume as designed."""
    from feed.sources.poller import PN_BAD_FIXTURES, PN_SNAPSHOT_CACHE_S

    later = "2025-08-16T14:00:00Z"  # the cutoff: ahead all along
    garbage = b'{"sportId":29,"last":11,"league":[{"id":1980,"ev'  # a 200 with a truncated body
    pn = _Pinnacle([_odds(20, later), _odds(30, later)],
                   fixtures=[_fixtures(10), garbage, garbage, _fixtures(12)] if restarted
                   else [garbage, garbage, _fixtures(12)])
    if restarted:
        sink, _ = await _restarted(pn)
        seq: int | None = sink.book.markets["pn:1:0:moneyline"].seq
    else:
        sink, seq = _BookSink(), None
    pn.calls.clear()
    src, http = pn.source(sink)
    assert PN_SNAPSHOT_CACHE_S == 60
    try:
        health: list[tuple[float, str, str | None]] = []
        for _ in range(24):  # a poll every 5 s for 2 minutes: the snapshot rejected at 0 s and at 60 s
            await src._poll_once("29")
            health.append((pn.mono[0], src.state, src.reason))
            pn.now[0] += 5_000
            pn.mono[0] += 5
        # one fixtures snapshot a minute, nothing else (no odds: the fixtures are unknown)
        assert pn.calls == [("/v1/fixtures", None)] * 2
        assert sink.confirmed == []  # the markets read stale (nothing vouched for them)
        assert all(h[1:] == ("DEGRADED", PN_BAD_FIXTURES) for h in health)
        assert sink.states and set(sink.states) == {("DEGRADED", PN_BAD_FIXTURES)}
        if seq is not None:  # the restored market left alone (no odds snapshot suspended it not_offered)
            m = sink.book.markets["pn:1:0:moneyline"]
            assert m.status == "OPEN" and m.seq == seq
        await src._poll_once("29")  # 120 s: the fixtures snapshot applies, then the odds snapshot
        assert pn.calls[2:] == [("/v1/fixtures", None), ("/v2/odds", None)]
        assert (src.state, src.reason) == ("UP", None) and sink.states[-1] == ("UP", None)
        assert sink.confirmed == [] and src.since("odds", 29) == (30 if restarted else 20)  # (it confirms nothing)
        pn.now[0] += 5_000
        pn.mono[0] += 5
        await src._poll_once("29")  # a delta: it confirms, as designed
        assert pn.calls[-1] == ("/v2/odds", "30" if restarted else "20")
        assert sink.confirmed and all(c == {"pn:1:0:moneyline": ("OPEN", None)} for _, c in sink.confirmed)
    finally:
        await http.aclose()


@pytest.mark.parametrize("when", ["image", "repair"])
async def test_a_rejected_odds_snapshot_is_asked_again_a_minute_later_with_the_source_degraded(when: str) -> None:
    """Gap: an odds snapshot the normaliser rejected whole (a 200 with a malformed body) — the
    first one of a run (the image) or the repair after a rejected delta — asked for a repair, so
    every poll (each 5 s) asked a fixtures and an odds snapshot again: Pinnacle's snapshot limit
    (429s), and likely the same cached answer. Now the rejected fixtures snapshot's rule: asked
    again a minute later (at most one a minute, never given up), no delta meanwhile (it would
    confirm the markets the snapshot was to image or repair: nothing vouches for them, they read
    stale), the source DEGRADED (bad_odds) until one is read; then deltas resume as designed."""
    from feed.sources.poller import PN_BAD_ODDS, PN_SNAPSHOT_CACHE_S

    later = "2025-08-16T14:00:00Z"  # the cutoff: ahead all along
    garbage = b'{"sportId":29,"last":21,"leagues":[{"id":1980,"ev'  # a 200 with a truncated body

    class Scripted(_Pinnacle):
        """Delta calls answer ``deltas`` in turn (the last one repeated)."""

        def __init__(self, snapshots: list[bytes], deltas: list[bytes]) -> None:
            super().__init__(snapshots)
            self.deltas = deltas

        def handle(self, request: httpx.Request) -> httpx.Response:
            since = request.url.params.get("since")
            if since is None:
                return super().handle(request)
            self.calls.append((request.url.path, since))
            return httpx.Response(200, content=self.deltas.pop(0) if len(self.deltas) > 1 else self.deltas[0])

    if when == "image":  # the run's first odds snapshot is rejected, twice
        pn = Scripted([garbage, garbage, _odds(20, later)], [b""])
    else:  # a delta is rejected (a repair follows), and the repair snapshot twice
        pn = Scripted([_odds(20, later), garbage, garbage, _odds(40, later)], [b"", garbage, b""])
    sink = _BookSink()
    src, http = pn.source(sink)
    assert PN_SNAPSHOT_CACHE_S == 60

    async def poll() -> None:
        await src._poll_once("29")
        pn.now[0] += 5_000
        pn.mono[0] += 5

    try:
        if when == "repair":
            for _ in range(3):  # 0 s: the snapshots; 5 s: a delta (it confirms); 10 s: a delta rejected
                await poll()
            assert pn.calls == [("/v1/fixtures", None), ("/v2/odds", None), ("/v2/odds", "20"), ("/v2/odds", "20")]
            assert len(sink.confirmed) == 1 and (src.state, src.reason) == ("UP", None)
            pn.calls.clear()
        confirmed = list(sink.confirmed)
        health: list[tuple[str, str | None]] = []
        for _ in range(24):  # a poll every 5 s for 2 minutes: the odds snapshot rejected at 0 s and at 60 s
            await poll()
            health.append((src.state, src.reason))
        # one repair a minute (a fixtures and an odds snapshot), nothing else: no delta
        assert pn.calls == [("/v1/fixtures", None), ("/v2/odds", None)] * 2
        assert sink.confirmed == confirmed  # nothing vouched for the markets: they read stale
        if when == "repair":
            age, stale = _node_reads(sink, pn.now[0])
            assert stale and age >= 120_000
        assert set(health) == {("DEGRADED", PN_BAD_ODDS)}
        assert sink.states[-1] == ("DEGRADED", PN_BAD_ODDS)
        await poll()  # 120 s: the snapshots are read, the odds applied
        assert pn.calls[4:] == [("/v1/fixtures", None), ("/v2/odds", None)]
        assert (src.state, src.reason) == ("UP", None) and sink.states[-1] == ("UP", None)
        assert sink.confirmed == confirmed  # (a snapshot confirms nothing)
        cursor = "20" if when == "image" else "40"
        assert src.since("odds", 29) == int(cursor)
        await poll()  # a delta: it confirms, as designed
        assert pn.calls[-1] == ("/v2/odds", cursor)
        assert len(sink.confirmed) == len(confirmed) + 1
        assert sink.confirmed[-1][1] == {"pn:1:0:moneyline": ("OPEN", None)}
    finally:
        await http.aclose()
