"""streaming.client.OddsClient on real parts (uvicorn, Redis, SSE and WebSocket):
the book it keeps, resume after a drop, recovered:false, ages and staleness,
filters, the price-check wrapper, fatal errors."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import msgspec
import pytest

from feed.models import MARKET_DECODER, Market, SourceHealth
from feed.normalise.base import MarketUpdate
from feed.settings import Settings
from feed.sources.backoff import Backoff
from feed.store import Store
from streaming.client import OddsClient, PriceCheckError, StreamError
from streaming.pricecheck import PriceCheckRequest
from streaming_helpers import Feed, ScriptedSSEServer, make_app, now_ms, serve

TRANSPORTS = ["sse", "ws"]


def _url(base: str, transport: str) -> str:
    return base.replace("http://", "ws://") if transport == "ws" else base


async def _rest_book(base: str) -> dict[str, Market]:
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        listing = (await c.get("/v1/markets")).json()["markets"]
        return {m["market_id"]: MARKET_DECODER.decode(msgspec.json.encode(m)) for m in listing}


def _same(a: dict[str, Market], b: dict[str, Market]) -> bool:
    return a.keys() == b.keys() and all(msgspec.to_builtins(a[k]) == msgspec.to_builtins(b[k]) for k in a)


def _tv(mid: str, volume: float) -> MarketUpdate:
    """A change of the market's traded volume only (travels as ``traded_volume``)."""
    t = now_ms()
    return MarketUpdate(market_id=mid, source="t", image=False, header=None, selections=[], source_ts=t,
                        received_at=t + 1, traded_volume=volume)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_book_follows_snapshot_and_deltas(store: Store, redis_url: str, transport: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"), feed.image("m3", sport="tennis", event="e3"))
    updates: list[tuple[str, bool]] = []
    async with serve(make_app(redis_url)) as base:
        async with OddsClient(_url(base, transport), heartbeat_ms=500,
                              on_update=lambda mid, m: updates.append((mid, m is not None))) as client:
            assert client.transport == transport and client.stats.snapshots == 1
            assert sorted(client.markets) == ["m1", "m2", "m3"]
            await feed.write(feed.price("m1", "1", 2.1), feed.price("m2", "2", 3.6))
            await feed.write(feed.header("m1", status="SUSPENDED", version=2))
            await feed.write(feed.image("m4", event="e1"))                      # a new market: image
            await feed.write(feed.price("m3", "3", 7.0))                        # a new selection
            await feed.write(feed.header("m1", status="OPEN"), feed.price("m1", "2", 3.0))
            await feed.write(_tv("m2", 1234.5))                               # traded_volume only
            await client.wait_until(lambda c: _same(c.markets, feed.book.markets))  # what was written
            assert _same(client.markets, await _rest_book(base))                    # = what REST serves
            assert client.markets["m1"].status == "OPEN" and client.markets["m1"].version == 2
            assert client.markets["m2"].traded_volume == 1234.5
            assert [s.selection_id for s in client.markets["m3"].selections] == ["1", "2", "3"]
            assert client.stats.deltas >= 7 and client.stats.duplicates == 0
            assert ("m4", True) in updates
            assert client.best("m1", "2") == 3.0 and client.best("m1", "1", "lay") is None
            for mid in client.markets:
                age = client.age_ms(mid)
                assert age is not None and 0 <= age < 10_000 and not client.is_stale(mid)
            assert client.stats.lag_ms is not None and client.stats.lag_ms >= 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_after_a_drop_gets_exactly_the_missed_deltas(store: Store, redis_url: str,
                                                                   transport: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    async with serve(make_app(redis_url)) as base:
        client = OddsClient(_url(base, transport), heartbeat_ms=500,
                            backoff=Backoff(initial_s=0.5, max_s=0.5, rng=lambda: 1.0))
        try:
            await client.start()
            await client.wait_synced()
            await feed.write(feed.price("m1", "1", 2.2))
            await client.wait_until(lambda c: c.markets["m1"].seq == 2)
            token = client.token
            client.reconnect()                      # the connection drops …
            await client.wait_until(lambda c: not c.connected)
            for i in range(5):                      # … changes happen meanwhile …
                await feed.write(feed.price("m2", "1", 2.0 + (i + 1) / 50))
            await client.wait_until(lambda c: c.connected and _same(c.markets, feed.book.markets))  # … caught up
            assert client.stats.resumed_recovered == 1 and client.stats.resumed_lost == 0
            assert client.stats.snapshots == 1 and client.stats.reconnects == 1
            assert client.token != token
            assert client.markets["m2"].seq == 6
        finally:
            await client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_recovered_false_replaces_the_book(store: Store, redis_url: str, transport: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    async with serve(make_app(redis_url)) as base:
        client = OddsClient(_url(base, transport), heartbeat_ms=500,
                            backoff=Backoff(initial_s=1.5, max_s=1.5, rng=lambda: 1.0))
        try:
            await client.start()
            await client.wait_synced()
            client.reconnect()
            await client.wait_until(lambda c: not c.connected)
            # while it is away, Redis loses everything: new epoch, other markets
            await store.redis.flushall()
            await store.reset_epoch()
            feed2 = Feed(store)
            await feed2.write(feed2.image("m3", sport="tennis", event="e3"))
            await client.wait_until(lambda c: c.connected and sorted(c.markets) == ["m3"])
            assert client.stats.resumed_lost == 1 and client.stats.snapshots == 2
            assert _same(client.markets, feed2.book.markets)
        finally:
            await client.close()


async def test_a_live_resync_snapshot_replaces_the_book(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    async with serve(make_app(redis_url)) as base, OddsClient(base, heartbeat_ms=500) as client:
        await store.redis.flushall()
        await store.reset_epoch()
        feed2 = Feed(store)
        await feed2.write(feed2.image("m9"))
        await client.wait_until(lambda c: sorted(c.markets) == ["m9"])
        assert client.stats.snapshots == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ages_heartbeats_and_staleness(store: Store, redis_url: str, transport: str) -> None:
    feed = Feed(store)
    await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms()))
    await feed.write(feed.image("m1"), feed.image("m2", in_play=True))
    async with serve(make_app(redis_url)) as base:
        async with OddsClient(_url(base, transport), heartbeat_ms=200, stale_in_play_ms=60_000) as client:
            assert client.sources["t"].state == "UP"  # from GET /v1/sources on connect
            # quiet markets: heartbeats keep confirming them while the source is UP
            hb = client.stats.heartbeats
            await client.wait_until(lambda c: c.stats.heartbeats >= hb + 3)
            assert client.age_ms("m1") is not None and client.age_ms("m1") < 2_000  # type: ignore[operator]
            assert not client.is_stale("m1") and not client.is_stale("m2")
            # the source goes DOWN: a status message marks its markets stale and ages grow
            await store.set_health(SourceHealth(source="t", state="DOWN", reason="heartbeat_missed",
                                                last_message_at=now_ms()))
            await client.wait_until(lambda c: c.sources["t"].state == "DOWN")
            assert client.is_stale("m1") and client.is_stale("m2")
            assert client.sources["t"].reason == "heartbeat_missed"
            before = client.age_ms("m1")
            hb = client.stats.heartbeats
            await client.wait_until(lambda c: c.stats.heartbeats >= hb + 3)
            assert client.age_ms("m1") > before  # type: ignore[operator]  # heartbeats no longer confirm it
            # back UP: not stale any more
            await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms()))
            await client.wait_until(lambda c: c.sources["t"].state == "UP")
            await client.wait_until(lambda c: not c.is_stale("m1") and not c.is_stale("m2"))
            assert client.age_ms("nope") is None and client.is_stale("nope")


async def test_open_markets_are_the_bettable_ones() -> None:
    client = OddsClient("http://127.0.0.1:9")
    try:
        t = now_ms()
        snap = {"type": "snapshot", "as_of": t, "markets": [
            {"market_id": mid, "source": "s", "status": status, "received_at": t, "age_ms": 0, "stale": False}
            for mid, status in (("a", "OPEN"), ("b", "SUSPENDED"), ("c", "CLOSED"), ("d", "INACTIVE"),
                                ("e", "SETTLED"), ("f", "OPEN"))]}
        client._on_message(msgspec.json.encode(snap), time.monotonic(), "tok")
        assert [m.market_id for m in client.open_markets()] == ["a", "f"]
        assert [m.market_id for m in client.live_markets()] == ["a", "b", "d", "f"]
    finally:
        await client.close()


async def test_local_thresholds_make_a_quiet_market_stale() -> None:
    client = OddsClient("http://127.0.0.1:9", stale_in_play_ms=50)
    try:
        t = now_ms()
        snap = {"type": "snapshot", "as_of": t, "markets": [
            {"market_id": "m", "source": "s", "in_play": True, "received_at": t, "age_ms": 0, "stale": False},
            {"market_id": "p", "source": "s", "in_play": False, "received_at": t, "age_ms": 0, "stale": False}]}
        client._on_message(msgspec.json.encode(snap), time.monotonic(), "tok")
        assert client.token == "tok" and not client.is_stale("m")
        await asyncio.sleep(0.1)
        assert client.is_stale("m") and not client.is_stale("p") and client.age_ms("m") >= 100  # type: ignore[operator]
    finally:
        await client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_filter_drops_markets_that_stop_matching(store: Store, redis_url: str, transport: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"), feed.image("t1", sport="tennis", event="e3"))
    async with serve(make_app(redis_url)) as base:
        async with OddsClient(_url(base, transport), sport="soccer", in_play=False) as client:
            assert sorted(client.markets) == ["m1", "m2"]
            await feed.write(feed.header("m1", in_play=True))
            await client.wait_until(lambda c: sorted(c.markets) == ["m2"])
            await feed.write(feed.header("m1", in_play=False))   # matches again: arrives as an image
            await client.wait_until(lambda c: sorted(c.markets) == ["m1", "m2"])


@pytest.mark.parametrize("path", ["live", "resume_from_redis"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_market_that_leaves_a_canonical_event_filter_is_dropped_on_the_servers_word(
        store: Store, redis_url: str, transport: str, path: str) -> None:
    """A client filtered on a canonical event (``ev:…``) cannot judge the filter itself: the market
    JSON carries no canonical id. A race's start time is corrected: the market now belongs to
    another race of the meeting (``ev:bf:1/<start>``), its event id unchanged. The server said
    nothing the client could act on (it sent the change's delta) and the client kept the market
    under the old race, confirmed by every heartbeat; now the server sends ``removed`` and the
    client drops it — live, and on a resume from Redis while the client was away."""
    s1, s2 = 1_900_000_000_000, 1_900_000_600_000
    feed = Feed(store)
    await feed.write(*(feed.image(mid, sport="horse_racing", event="bf:1", start_time=s1) for mid in ("x1", "x2")))
    app = make_app(redis_url, replay_ring_entries=0 if path == "resume_from_redis" else 10_000)
    async with serve(app) as base:
        client = OddsClient(_url(base, transport), event=f"ev:bf:1/{s1}", heartbeat_ms=500,
                            backoff=Backoff(initial_s=0.5, max_s=0.5, rng=lambda: 1.0))
        try:
            await client.start()
            await client.wait_synced()
            assert sorted(client.markets) == ["x1", "x2"]
            await feed.write(feed.price("x2", "1", 2.2))  # (a token past the node's start)
            await client.wait_until(lambda c: c.markets["x2"].seq == 2)
            if path == "resume_from_redis":
                client.reconnect()
                await client.wait_until(lambda c: not c.connected)
            await feed.write(feed.header("x1", start_time=s2))  # another race of the meeting
            await feed.write(feed.price("x1", "1", 7.5), feed.price("x2", "1", 2.4))
            await client.wait_until(lambda c: c.connected and "x2" in c.markets and c.markets["x2"].seq == 3)
            assert sorted(client.markets) == ["x2"]
            assert client.stats.snapshots == 1  # (no snapshot replaced the book: the server said it)
            if path == "resume_from_redis":
                assert client.stats.resumed_recovered == 1 and client.stats.resumed_lost == 0
        finally:
            await client.close()


async def test_price_check_wrapper(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1", prices={"1": 2.0, "2": 3.5}), feed.image("m2", prices={"1": 4.0}))
    async with serve(make_app(redis_url)) as base, OddsClient(base) as client:
        r = await client.price_check("m1", "1", "back", 2.0)
        assert r.accepted and r.reason == "OK" and r.current_price == 2.0 and r.age_ms is not None
        r = await client.price_check("m1", "1", "back", 2.1, accept_better=False)
        assert not r.accepted and r.reason == "PRICE_CHANGED" and r.current_price == 2.0
        r = await client.price_check("m1", "1", "back", 2.0, version=99)
        assert r.reason == "VERSION_CHANGED"
        b = await client.price_check_batch([
            PriceCheckRequest(market_id="m1", selection_id="2", side="back", price=3.5),
            {"market_id": "m2", "selection_id": "1", "side": "back", "price": 4.0, "max_age_ms": 60_000}])
        assert b.accepted and [leg.reason for leg in b.legs] == ["OK", "OK"]
        with pytest.raises(PriceCheckError) as err:
            await client.price_check("m1", "1", "back", 2.12345)
        assert err.value.status == 422 and err.value.code == "invalid_request"
        assert "4 decimal places" in str(err.value)
    dead = OddsClient("http://127.0.0.1:9", price_check_timeout_s=0.5)
    try:
        with pytest.raises(PriceCheckError):
            await dead.price_check("m1", "1", "back", 2.0)
    finally:
        await dead.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refused_stream_is_a_clear_error(store: Store, redis_url: str, transport: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, api_keys=("s3cret",)))
    async with serve(app) as base:
        client = OddsClient(_url(base, transport))
        try:
            await client.start()
            with pytest.raises(StreamError):
                await client.wait_synced()
        finally:
            await client.close()
        async with OddsClient(_url(base, transport), api_key="s3cret") as ok:
            assert sorted(ok.markets) == ["m1"]
            assert (await ok.price_check("m1", "1", "back", 2.0)).accepted


def test_transport_is_chosen_by_url_or_flag() -> None:
    async def make(url: str, **kw: Any) -> tuple[str, str, str]:
        c = OddsClient(url, **kw)
        await c.close()
        return c.transport, c.http_url, c.ws_url

    assert asyncio.run(make("http://h:1")) == ("sse", "http://h:1", "ws://h:1/v1/ws")
    assert asyncio.run(make("wss://h:1/x")) == ("ws", "https://h:1", "wss://h:1/v1/ws")
    assert asyncio.run(make("http://h:1", transport="ws"))[0] == "ws"
    with pytest.raises(ValueError):
        OddsClient("ftp://h")



@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_server_side_close_is_a_drop_not_a_crash(store: Store, redis_url: str, transport: str) -> None:
    """The server ends the stream (shutdown: SSE end / WebSocket close 1001): the client records the
    drop with the close reason and reconnects — its task does not die."""
    from streaming.app import begin_shutdown

    feed = Feed(store)
    await feed.write(feed.image("m1"))
    app = make_app(redis_url)
    async with serve(app) as base:
        client = OddsClient(_url(base, transport), heartbeat_ms=500,
                            backoff=Backoff(initial_s=0.2, max_s=0.2, rng=lambda: 1.0))
        try:
            await client.start()
            await client.wait_synced()
            begin_shutdown(app)
            await client.wait_until(lambda c: c.stats.reconnects >= 1)
            assert client.error is None
            assert client._task is not None and not client._task.done()
            if transport == "ws":
                assert "1001" in (client.stats.disconnect_reasons[0] if client.stats.disconnect_reasons else "")
        finally:
            await client.close()


# -- seq gaps -------------------------------------------------------------------------------------


def _crafted_gap(app: Any, mid: str, jump: int, price: float) -> None:
    """Dispatch, through the node's hub, a delta for ``mid`` whose seq skips ``jump - 1`` values
    (never applied to the node's state or stored: only the clients see it)."""
    from feed.models import Delta, Selection, whole_change
    from streaming.encoding import delta_message
    from streaming.state import PreparedDelta, PreparedEntry, keys_of

    node = app.state.node
    st = node.state
    m = st.markets[mid]
    t = now_ms()
    d = Delta(market_id=mid, seq=m.seq + jump, kind="delta", source=m.source, source_ts=t, received_at=t,
              stored_at=t, selections=[whole_change(Selection(selection_id="1", name="sel 1", price=price,
                                                          back=[(price, 1.0)]))])
    msg = delta_message(d, market_json=None, age_ms=0, stale=False, sent_at=t, token=st.token,
                        prev_token=st.token)
    node.hub.dispatch(PreparedEntry(0, st.positions[0], st.token, [PreparedDelta(mid, keys_of(m), None, msg, None, d)],
                                    st.token))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_seq_gap_is_not_applied_and_the_client_resyncs(store: Store, redis_url: str, transport: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    app = make_app(redis_url)
    async with serve(app) as base:
        async with OddsClient(_url(base, transport), heartbeat_ms=500, backoff=Backoff(initial_s=5, max_s=5)) as client:
            await feed.write(feed.price("m1", "1", 2.1))
            await client.wait_until(lambda c: _same(c.markets, feed.book.markets))
            connects = client.stats.connects
            _crafted_gap(app, "m1", jump=3, price=9.99)   # seq held + 3: two changes "missed"
            await client.wait_until(lambda c: c.stats.resyncs == 1 and c.synced.is_set(), 20)
            assert client.best("m1", "1") == 2.1            # the gapped delta was never applied
            await feed.write(feed.price("m1", "1", 2.2), feed.price("m2", "2", 3.7))  # real changes go on
            await client.wait_until(lambda c: _same(c.markets, feed.book.markets))
            assert _same(client.markets, await _rest_book(base))
            s = client.stats
            assert (s.gaps, s.resyncs, s.resumed_recovered, s.snapshots) == (1, 1, 1, 1)  # resumed, no snapshot
            assert s.connects == connects + 1
            # the resync was immediate, not after the 5 s reconnect backoff
            assert client.stats.reconnects == 1


async def test_gap_rules_duplicates_images_conflated_and_the_snapshot_fallback() -> None:
    """Against a fake server speaking our wire format: a duplicate is ignored, an image with a
    higher seq replaces, a conflated delta may skip seqs, a plain delta that skips one is a gap →
    resume with the token from before it; the same gap again → a fresh snapshot (no token)."""
    from feed.models import ENCODER, Delta, Market, Selection, whole_change
    from streaming.encoding import delta_message, market_with_age, resumed_message, snapshot_message

    def market(mid: str, seq: int, price: float) -> Market:
        return Market(market_id=mid, source="fake", seq=seq, sport="soccer", status="OPEN", event_id="e1",
                      selections=[Selection(selection_id="1", name="one", price=price, back=[(price, 5.0)])])

    def snap(*ms: Market, recovered: bool | None = None) -> bytes:
        return snapshot_message([market_with_age(ENCODER.encode(m), 0, False) for m in ms], as_of=now_ms(),
                                token=b"t0", recovered=recovered).sse(True)

    def delta(mid: str, seq: int, price: float, token: bytes | None, *, conflated: bool = False) -> bytes:
        t = now_ms()
        d = Delta(market_id=mid, seq=seq, kind="delta", source="fake", source_ts=t, received_at=t,
                  selections=[whole_change(Selection(selection_id="1", name="one", price=price, back=[(price, 5.0)]))])
        return delta_message(d, market_json=None, age_ms=0, stale=False, sent_at=t, token=token,
                             conflated=conflated).sse(token is not None)

    def image(m: Market, token: bytes) -> bytes:
        t = now_ms()
        d = Delta(market_id=m.market_id, seq=m.seq, kind="image", source="fake", source_ts=t, received_at=t, market=m)
        return delta_message(d, market_json=market_with_age(ENCODER.encode(m), 0, False), age_ms=0, stale=False,
                             sent_at=t, token=token).sse(True)

    first = [snap(market("m1", 1, 2.0), market("m2", 1, 3.0)),
             delta("m1", 2, 2.1, b"t1"),
             delta("m1", 2, 2.1, None),                      # duplicate: ignored
             image(market("m2", 5, 3.5), b"t2"),             # image: replaces whatever the jump
             delta("m2", 8, 3.8, b"t3", conflated=True),     # conflated: stands for 6..8
             delta("m1", 4, 2.4, b"t4")]                     # gap (3 missing): not applied
    second = [resumed_message(recovered=True, token=b"t3").sse(True),
              delta("m1", 4, 2.4, b"t4")]                    # the replay gaps again
    third = [snap(market("m1", 4, 2.4), market("m2", 8, 3.8), recovered=None),
             delta("m1", 5, 2.5, b"t5")]
    async with ScriptedSSEServer([first, second, third]) as fake:
        async with OddsClient(fake.url, heartbeat_ms=60_000, backoff=Backoff(initial_s=5, max_s=5)) as client:
            await client.wait_until(lambda c: c.markets.get("m1") is not None and c.markets["m1"].seq == 5, 10)
            assert {m: client.markets[m].seq for m in client.markets} == {"m1": 5, "m2": 8}
            assert client.best("m1", "1") == 2.5 and client.best("m2", "1") == 3.8
            s = client.stats
            assert (s.gaps, s.resyncs, s.resumed_recovered, s.snapshots, s.duplicates) == (2, 2, 1, 2, 1)
            assert fake.last_event_ids == [None, "t3", None]
