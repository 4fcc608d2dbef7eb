"""streaming.client.OddsClient: what it holds can be trusted (audit of the Python client).

- F: a client that has lost its stream (silence detected, or reconnected but not yet resumed)
  read its pre-match markets as fresh for up to a minute: every market now reads stale until a
  resume (``recovered: true``) or a snapshot.
- I: an exception in a user callback ended the stream task silently (connected stayed True, the
  book froze and read fresh): it is logged and the stream goes on.
- A: ``event="ev:…"`` (a canonical event) dropped every market at its first delta: the client
  compared the markets' provider event ids with ``ev:…``; the server filters those.
- E: a value the client does not know (a newer server's market or event status, a message type
  with object fields) failed the decode, dropped the stream, and the resumed stream sent it
  again — forever: unknown enum values are kept as strings, unknown types are skipped.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import msgspec
import pytest

from feed.models import Market, SourceHealth
from feed.settings import Settings
from feed.sources.backoff import Backoff
from feed.store import StoredLink, Store
from streaming.client import OddsClient
from streaming_helpers import Feed, ScriptedSSEServer, eventually, make_app, now_ms, serve

TRANSPORTS = ["sse", "ws"]


def _url(base: str, transport: str) -> str:
    return base.replace("http://", "ws://") if transport == "ws" else base


def _same(a: dict[str, Market], b: dict[str, Market]) -> bool:
    return a.keys() == b.keys() and all(msgspec.to_builtins(a[k]) == msgspec.to_builtins(b[k]) for k in a)


def _frame(obj: dict[str, Any], eid: str | None = None) -> bytes:
    """One SSE frame of the server's wire format."""
    return (f"event: {obj['type']}\n" + (f"id: {eid}\n" if eid else "") + f"data: {json.dumps(obj)}\n\n").encode()


def _market(mid: str, *, in_play: bool = False, status: str = "OPEN", sel_status: str = "ACTIVE",
            seq: int = 1) -> dict[str, Any]:
    t = now_ms()
    return {"market_id": mid, "source": "fake", "seq": seq, "sport": "soccer", "status": status, "in_play": in_play,
            "event_id": "e1", "received_at": t, "source_ts": t, "age_ms": 0, "stale": False,
            "selections": [{"selection_id": "1", "status": sel_status, "price": 2.0, "back": [[2.0, 5.0]]}]}


def _snapshot(*markets: dict[str, Any]) -> dict[str, Any]:
    return {"type": "snapshot", "markets": list(markets), "as_of": now_ms()}


def _delta(mid: str, seq: int, price: float, **extra: Any) -> dict[str, Any]:
    t = now_ms()
    return {"type": "delta", "market_id": mid, "seq": seq, "kind": "delta", "source": "fake", "source_ts": t,
            "received_at": t, "selections": [{"selection_id": "1", "price": price, "back": [[price, 5.0]]}],
            "age_ms": 0, "stale": False, "sent_at": t, **extra}


# -- F: a client without a live stream vouches for nothing ----------------------------------------


async def test_a_silent_stream_makes_every_market_stale_until_it_resumes() -> None:
    hb_ms = 300
    silence_s = 3 * hb_ms / 1000 + 1.0  # the client counts a stream silent this long as dropped
    first = [_frame(_snapshot(_market("pre"), _market("live", in_play=True)), "t0"),
             _frame({"type": "heartbeat", "as_of": now_ms()})]
    async with ScriptedSSEServer([first]) as fake:
        # thresholds far away: only the lost stream can make these markets stale here
        client = OddsClient(fake.url, heartbeat_ms=hb_ms, stale_in_play_ms=120_000, stale_pre_match_ms=120_000,
                            backoff=Backoff(initial_s=0.2, max_s=0.2, rng=lambda: 1.0))
        try:
            await client.start()
            await client.wait_synced()
            assert not client.is_stale("pre") and not client.is_stale("live")
            # the server goes silent (the socket stays open): stale once the silence is noticed
            await eventually(lambda: client.is_stale("pre"), silence_s + 3, "the pre-match market stale")
            assert client.is_stale("live")
            # reconnected (connection 2 is silent too) but not resumed: still stale, the age still growing
            await eventually(lambda: client.stats.connects >= 2 and client.connected, 10, "a reconnect")
            assert client.is_stale("pre") and client.is_stale("live")
            age = client.age_ms("pre")
            assert age is not None and age >= 1_500
            await eventually(lambda: (client.age_ms("pre") or 0) > age, 5, "the age growing")
            # a resume that recovers clears it (the ages go on from the last confirmation) — from an
            # older server (no as_of on its resumed: no baseline for the stream's lag) once the first
            # heartbeat after it is read
            fake.next_script = [_frame({"type": "resumed", "recovered": True}, "t1")]
            await eventually(lambda: client.stats.resumed_recovered == 1, 15, "the resume")
            assert client.is_stale("pre") and client.is_stale("live") and (client.age_ms("pre") or 0) > age
            fake.streams[-1].write(_frame({"type": "heartbeat", "as_of": now_ms()}))
            await eventually(lambda: not client.is_stale("pre") and not client.is_stale("live"), 5,
                             "fresh again after the resume and its first heartbeat")
            assert fake.last_event_ids[-1] == "t0" and client.stats.resumed_recovered == 1
            # a server that stamps its resumed (as_of: its send time): fresh from the resumed on
            fake.next_script = [_frame({"type": "resumed", "recovered": True, "as_of": now_ms()}, "t2")]
            before = client.stats.heartbeats
            fake.streams[-1].close()
            await eventually(lambda: client.stats.resumed_recovered == 2, 15, "the second resume")
            assert not client.is_stale("pre") and not client.is_stale("live")
            assert client.stats.heartbeats == before and fake.last_event_ids[-1] == "t1"
        finally:
            await client.close()
        assert client.is_stale("pre")  # a closed client follows nothing


# -- I: a callback's exception is the callback's problem ------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_raising_callback_neither_ends_nor_freezes_the_stream(
        store: Store, redis_url: str, transport: str, caplog: pytest.LogCaptureFixture) -> None:
    from feed.models import EventState

    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms()))
    seen: list[tuple[str, float | None]] = []

    def on_update(mid: str, m: Market | None) -> None:
        # the book is already updated when the callback runs
        assert client.markets.get(mid) is m
        seen.append((mid, client.best(mid, "1")))
        if len(seen) == 1:
            raise KeyError("bug in user code")

    states: list[int] = []

    def on_event_state(es: Any) -> None:
        states.append(es.version)
        raise RuntimeError("another bug in user code")

    caplog.set_level(logging.ERROR, logger="streaming.client")
    async with serve(make_app(redis_url)) as base:
        client = OddsClient(_url(base, transport), heartbeat_ms=300, on_update=on_update,
                            on_event_state=on_event_state)
        try:
            await client.start()
            await eventually(lambda: client.synced.is_set(), 10, "the snapshot")
            for i in range(3):
                await feed.write(feed.price("m1", "1", round(2.2 + i / 10, 2)))
                await store.apply_event_states([EventState(event_id="e1", source="t", status="LIVE", in_play=True,
                                                           source_ts=now_ms(), received_at=now_ms(),
                                                           version=i + 1)])
            await feed.write(feed.price("m2", "2", 3.9))
            await eventually(lambda: _same(client.markets, feed.book.markets), 10, "the book caught up")
            await eventually(lambda: client.event_states.get("e1") is not None
                             and client.event_states["e1"].version == 3, 10, "the event states taken")
            assert ("m1", 2.4) in seen and states[-1] == 3
            assert client.connected and client.error is None and client.stats.reconnects == 0
            assert client._task is not None and not client._task.done()
            assert not client.is_stale("m1")
            assert client.stats.callback_errors == 1 + len(states)
            logged = [r.getMessage() for r in caplog.records if r.exc_info]
            assert any("on_update" in m for m in logged) and any("on_event_state" in m for m in logged)
        finally:
            await client.close()


# -- A: a canonical event filter --------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_canonical_event_filter_keeps_every_market_of_the_event(store: Store, redis_url: str,
                                                                       transport: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("a:1", event="a:e"), feed.image("b:1", event="b:e"), feed.image("c:1", event="c:e"))
    await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms()))
    await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.96, "fuzzy")},
                           {"ev:a:e": json.dumps({"event_id": "ev:a:e", "sport": "soccer", "name": "A v B",
                                                  "home": "A", "away": "B", "members": ["a:e", "b:e"]}).encode()})
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        async def linked() -> bool:
            return (await http.get("/v1/markets", params={"event": "ev:a:e"})).json()["count"] == 2
        await eventually(linked, 10, "the node serving the link")
        gone: list[str] = []
        client = OddsClient(_url(base, transport), event="ev:a:e", heartbeat_ms=500,
                            on_update=lambda mid, m: gone.append(mid) if m is None else None)
        try:
            await client.start()
            await eventually(lambda: client.synced.is_set(), 10, "the snapshot")
            assert sorted(client.markets) == ["a:1", "b:1"]
            await feed.write(feed.price("a:1", "1", 2.2))
            await feed.write(feed.price("a:1", "1", 2.4), feed.price("b:1", "2", 3.9), feed.price("c:1", "1", 5.0))
            want = {k: v for k, v in feed.book.markets.items() if k != "c:1"}
            await eventually(lambda: _same(client.markets, want), 10, "both markets of the event current")
            assert client.best("a:1", "1") == 2.4 and client.best("b:1", "2") == 3.9
            assert gone == [] and client.stats.deltas >= 3
        finally:
            await client.close()
    # a provider event id is still checked locally: a market that moves to another event is dropped
    client = OddsClient("http://127.0.0.1:9", event="e1")
    try:
        client._on_message(json.dumps(_snapshot(_market("m1"))).encode(), time.monotonic(), "t0")
        moved = {**_delta("m1", 2, 2.1), "header": {"event_id": "e2", "sport": "soccer", "status": "OPEN"}}
        client._on_message(json.dumps(moved).encode(), time.monotonic(), "t1")
        assert "m1" not in client.markets
    finally:
        await client.close()




# -- kick-off: an event that has started is judged in play before its provider says so ------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_market_turns_stale_at_its_start_time_with_no_new_message(store: Store, redis_url: str,
                                                                          transport: str) -> None:
    """A market its provider still calls pre-match (``in_play: false``: The Odds API until its next
    poll, Pinnacle until its next answer) was judged by the pre-match limit after its event had
    started. From its ``start_time`` on the in-play limit applies: a market fresh before the start
    whose age then exceeds the in-play limit is streamed stale at the start — a ``status`` lists it,
    no message about the market itself — and REST and the price check agree; ``in_play`` as served
    stays the provider's. (The client's own limits are far off: only the server's word makes it stale.)"""
    settings = Settings(heartbeat_ms=300, stale_in_play_ms=1_500, stale_pre_match_ms=60_000)
    feed = Feed(store)
    await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now_ms()))
    await feed.write(feed.image("other"))
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as http:
        client = OddsClient(_url(base, transport), heartbeat_ms=300, stale_in_play_ms=120_000,
                            stale_pre_match_ms=120_000)
        try:
            await client.start()
            await eventually(lambda: client.synced.is_set(), 10, "the snapshot")
            start = now_ms() + 3_000  # kick-off in 3 s; the provider will not say so (no message follows)
            await feed.write(feed.image("ko", start_time=start))
            await eventually(lambda: "ko" in client.markets, 10, "the market streamed")
            deltas = client.stats.deltas
            assert not client.is_stale("ko") and now_ms() < start  # before the start: pre-match (60 s)
            before = (await http.post("/v1/price-check", json={"market_id": "ko", "selection_id": "1",
                                                                 "side": "back", "price": 2.0})).json()
            assert (before["reason"], before["max_age_ms"]) == ("OK", 30_000), before
            await eventually(lambda: client.is_stale("ko"), 15, "the market flagged stale at its start")
            flagged_at = now_ms()
            assert start <= flagged_at < start + 10_000
            assert client.stats.deltas == deltas  # no message about the market: the server's status said so
            assert not client.is_stale("other")  # a market without a start time keeps its pre-match limit
            served = (await http.get("/v1/markets/ko")).json()
            assert (served["stale"], served["in_play"], served["start_time"]) == (True, False, start), served
            r = (await http.post("/v1/price-check", json={"market_id": "ko", "selection_id": "1", "side": "back",
                                                          "price": 2.0})).json()
            assert (r["reason"], r["max_age_ms"], r["in_play"]) == ("STALE", 1_500, False), r
        finally:
            await client.close()


async def test_the_client_judges_a_market_past_its_start_time_by_its_in_play_limit() -> None:
    """The client's own limits: a market past its ``start_time`` is judged by ``stale_in_play_ms``
    though ``in_play`` is false (as the server judges it); it turns stale at the start, locally."""
    client = OddsClient("http://127.0.0.1:9", stale_in_play_ms=5_000, stale_pre_match_ms=60_000)
    try:
        t = now_ms()
        aged = {"age_ms": 7_000}
        snap = _snapshot(_market("ko") | aged | {"start_time": t - 1_000},
                         _market("later") | aged | {"start_time": t + 60_000},
                         _market("soon") | aged | {"start_time": t + 1_500},
                         _market("tbd") | aged)
        client._on_message(json.dumps(snap).encode(), time.monotonic(), "t0")
        assert client.markets["ko"].in_play is False
        assert client.is_stale("ko")  # 7 s > the in-play 5 s (the pre-match 60 s would say fresh)
        assert not client.is_stale("later") and not client.is_stale("tbd")
        assert not client.is_stale("soon")
        await eventually(lambda: client.is_stale("soon"), 10, "stale once its start time has come")
        assert now_ms() >= t + 1_500
        assert not client.is_stale("later") and not client.is_stale("tbd")
    finally:
        await client.close()


# -- E: values a newer server sends ---------------------------------------------------------------


_SCENARIOS: dict[str, list[dict[str, Any]]] = {
    # a market status and a selection status this client does not know, in a snapshot and a delta's header
    "market_status": [_snapshot(_market("m1", status="PRE_OPEN", sel_status="RESERVE"), _market("m2")),
                      {**_delta("m1", 2, 2.1), "header": {"event_id": "e1", "sport": "soccer", "status": "PRE_OPEN",
                                                          "in_play": False}}],
    # an event status it does not know
    "event_status": [_snapshot(_market("m1"), _market("m2")),
                     {"type": "event_state", "sent_at": now_ms(), "event_state": {
                         "event_id": "e1", "source": "fake", "status": "HALF_TIME", "in_play": True, "version": 1,
                         "innings": [{"number": 1, "team": "neutral"}], "received_at": now_ms(),
                         "source_ts": now_ms(), "age_ms": 0, "stale": False}},
                     _delta("m1", 2, 2.1)],
    # a message type it does not know, whose fields have shapes the envelope does not expect
    "unknown_type": [_snapshot(_market("m1"), _market("m2")),
                     {"type": "notice", "state": {"phase": 2}, "id": [1, 2], "stale": "maybe"},
                     {"type": "bulletin", "text": "hello"},
                     _delta("m1", 2, 2.1)],
}


@pytest.mark.parametrize("scenario", list(_SCENARIOS))
async def test_values_the_client_does_not_know_neither_stop_nor_loop_the_stream(scenario: str) -> None:
    msgs = _SCENARIOS[scenario]
    frames = [_frame(m, f"t{i}" if m["type"] != "event_state" else None) for i, m in enumerate(msgs)]
    async with ScriptedSSEServer([frames]) as fake:
        client = OddsClient(fake.url, heartbeat_ms=60_000, backoff=Backoff(initial_s=0.2, max_s=0.2, rng=lambda: 1.0))
        try:
            await client.start()
            await eventually(lambda: client.markets.get("m1") is not None and client.markets["m1"].seq == 2, 10,
                             "synced, and the delta after the odd message applied")
            # later deltas go on applying on the same connection
            fake.streams[0].write(_frame(_delta("m1", 3, 2.3), "t98") + _frame(_delta("m2", 2, 3.3), "t99"))
            await eventually(lambda: client.best("m1", "1") == 2.3 and client.best("m2", "1") == 3.3, 10,
                             "later deltas applied")
            assert client.synced.is_set() and client.connected
            assert len(fake.last_event_ids) == 1 and client.stats.reconnects == 0 and client.error is None
            assert client.token == "t99" and not client.is_stale("m1")
            m1 = client.markets["m1"]
            assert isinstance(m1, Market)
            if scenario == "market_status":
                assert m1.status == "PRE_OPEN" and m1.selections[0].status == "RESERVE"
                assert [m.market_id for m in client.open_markets()] == ["m2"]
                assert [m.market_id for m in client.live_markets()] == ["m1", "m2"]
            elif scenario == "event_status":
                es = client.event_states["e1"]
                assert es.status == "HALF_TIME" and es.innings[0].team == "neutral"
            else:
                assert client.stats.skipped == 2
        finally:
            await client.close()


async def test_a_delta_that_cannot_be_read_is_skipped_and_its_market_reads_stale() -> None:
    client = OddsClient("http://127.0.0.1:9")
    try:
        client._on_message(json.dumps(_snapshot(_market("m1"), _market("m2"))).encode(), time.monotonic(), "t0")
        bad = _delta("m1", 2, 2.1)
        bad["selections"][0]["price"] = "two point one"  # not a price, whatever the server's version
        client._on_message(json.dumps(bad).encode(), time.monotonic(), "t1")
        assert client.stats.skipped == 1 and client.token == "t0"  # not applied, its token not taken
        assert client.markets["m1"].seq == 1 and client.is_stale("m1") and not client.is_stale("m2")
        client._on_message(json.dumps(_delta("m2", 2, 3.1)).encode(), time.monotonic(), "t2")
        assert client.best("m2", "1") == 3.1 and client.token == "t2"
    finally:
        await client.close()


# -- a lagging stream: a consumer slower than the feed reads what the server sent seconds ago --------


def _hb(as_of: int) -> bytes:
    return json.dumps({"type": "heartbeat", "as_of": as_of}).encode()


async def test_a_stream_delivered_late_reads_stale_and_ages_count_the_lag() -> None:
    """A consumer slower than the feed leaves a backlog in socket buffers: each heartbeat arrives
    later after its ``as_of``. The client took a heartbeat as confirming every market at its
    *receipt* (and a delta's ``age_ms`` as of receipt), so a book 14 s behind the server read fresh.
    Now a confirmation counts as of receipt − the stream's lag (its receipt − send time, less the
    least such difference seen on the connection: a fixed clock skew cancels), and a stream lagging
    more than the in-play limit is not live: every market reads stale."""
    client = OddsClient("http://127.0.0.1:9", stale_in_play_ms=10_000, stale_pre_match_ms=60_000)
    on_time = OddsClient("http://127.0.0.1:9", stale_in_play_ms=10_000, stale_pre_match_ms=60_000)
    try:
        # the receipt clock (monotonic s) is injected: 21 s of messages, the last ones received now
        m0 = time.monotonic() - 21
        s0 = now_ms() + 3_600_000  # the server's clock: an hour ahead of this host's (a skew that cancels)
        snap = json.dumps(_snapshot(_market("live", in_play=True), _market("pre")) | {"as_of": s0}).encode()
        client._on_message(snap, m0, "t0")
        on_time._on_message(snap, m0, "t0")
        lags = []
        for k in range(1, 21):
            # every second of receipt the server's send times advance by 0.3 s: 0.7 s more behind each time
            client._on_message(_hb(s0 + k * 300), m0 + k, None)
            on_time._on_message(_hb(s0 + k * 1_000), m0 + k, None)  # (the control: delivered on time)
            lags.append(getattr(client, "stream_lag_ms", None))
        assert not on_time.is_stale("live") and not on_time.is_stale("pre")
        age = client.age_ms("live")
        assert age is not None and age >= 14_000, age  # confirmed as of 14 s before the last receipt
        assert client.is_stale("live"), "an in-play market 14 s behind the server reads stale"
        assert client.is_stale("pre"), "a stream lagging more than the in-play limit is not live"
        assert lags[4] == 3_500 and lags[-1] == 14_000 and on_time.stream_lag_ms == 0, lags
        # a delta delivered late: its age is the server's age_ms plus the lag
        late = _delta("live", 2, 2.2) | {"sent_at": s0 + 6_100, "age_ms": 100}
        client._on_message(json.dumps(late).encode(), m0 + 21, "t1")
        assert client.best("live", "1") == 2.2 and client.stream_lag_ms == 14_900
        assert (client.age_ms("live") or 0) >= 15_000 and client.is_stale("live")
        # caught up: a heartbeat as early as the fastest delivery → the lag is gone, fresh again
        client._on_message(_hb(s0 + 21_000), m0 + 21, None)
        assert client.stream_lag_ms == 0
        assert not client.is_stale("live") and not client.is_stale("pre")
    finally:
        await client.close()
        await on_time.close()


async def test_a_fixed_clock_skew_is_no_lag_and_the_estimate_starts_over_on_each_connection() -> None:
    """The clock offset is measured per connection: a stream that reconnects to a server whose
    clock reads 30 s earlier (another node) is not 30 s behind."""
    hb_ms = 300
    first = [_frame(_snapshot(_market("live", in_play=True)) | {"as_of": now_ms()}, "t0"),
             _frame({"type": "heartbeat", "as_of": now_ms()})]
    async with ScriptedSSEServer([first]) as fake:
        client = OddsClient(fake.url, heartbeat_ms=hb_ms, stale_in_play_ms=10_000,
                            backoff=Backoff(initial_s=0.2, max_s=0.2, rng=lambda: 1.0))
        try:
            await client.start()
            await client.wait_synced()
            assert not client.is_stale("live")
            skew = -30_000  # the next node's clock: 30 s behind this one's
            fake.next_script = [_frame(_snapshot(_market("live", in_play=True)) | {"as_of": now_ms() + skew}, "t1"),
                                _frame({"type": "heartbeat", "as_of": now_ms() + skew})]
            fake.streams[0].close()  # the first connection ends: the client reconnects
            await eventually(lambda: client.stats.snapshots == 2 and client.stats.heartbeats >= 2, 10,
                             "the second connection's snapshot and heartbeat")
            assert not client.is_stale("live")
            assert client.stream_lag_ms < 1_000, client.stream_lag_ms
        finally:
            await client.close()


async def test_a_skipped_delta_keeps_its_market_stale_whatever_a_status_says() -> None:
    """A delta the client cannot read is skipped and its market marked stale (a change missed). The
    next ``status`` of its source reset that mark from the server's stale list — which knows
    nothing of the skip — and heartbeats then confirmed the market at the old price. The mark is
    kept apart from the server's flags: only a snapshot or an image of the market clears it."""
    client = OddsClient("http://127.0.0.1:9")
    try:
        client._on_message(json.dumps(_snapshot(_market("m1"), _market("m2"))).encode(), time.monotonic(), "t0")
        bad = _delta("m1", 2, 5.0)
        bad["selections"][0]["back"] = [{"price": 5.0, "size": 10.0}]  # a shape this client cannot read
        client._on_message(json.dumps(bad).encode(), time.monotonic(), "t1")
        assert client.stats.skipped == 1 and client.is_stale("m1")
        status = {"type": "status", "source": "fake", "state": "UP", "reason": None, "stale_markets": [],
                  "as_of": now_ms()}
        client._on_message(json.dumps(status).encode(), time.monotonic(), None)
        client._on_message(_hb(now_ms()), time.monotonic(), None)
        assert client.is_stale("m1"), "a status and a heartbeat do not make a missed change fresh"
        assert not client.is_stale("m2")
        # a conflated delta carries only what it stands for: not the missed change
        client._on_message(json.dumps(_delta("m1", 3, 2.4, conflated=True)).encode(), time.monotonic(), "t2")
        assert client.best("m1", "1") == 2.4 and client.is_stale("m1")
        # an image of the market replaces it whole: fresh again
        img = {**_delta("m1", 4, 5.0), "kind": "image", "market": _market("m1", seq=4)}
        del img["selections"]
        client._on_message(json.dumps(img).encode(), time.monotonic(), "t3")
        assert client.markets["m1"].seq == 4 and not client.is_stale("m1")
        # and a snapshot clears every mark
        client._on_message(json.dumps(bad | {"seq": 5}).encode(), time.monotonic(), "t4")
        assert client.is_stale("m1")
        client._on_message(json.dumps(_snapshot(_market("m1", seq=5), _market("m2"))).encode(), time.monotonic(), "t5")
        assert not client.is_stale("m1")
    finally:
        await client.close()


async def test_a_server_clock_stepped_back_reconnects_after_3_lagging_heartbeats_and_resumes_live() -> None:
    """The least offset never forgets within a connection: a server whose wall clock steps back 15 s
    (an NTP step) — or runs slower than this host's monotonic clock — read as 15 s behind for as long
    as the connection lasted, every market stale (a healthy stream: an outage). Now 3 heartbeats in a
    row lagging past the in-play limit drop the connection; the client reconnects after its backoff
    with its resume token, reads every market stale until the resumed stream is live, and measures
    the offset afresh (the stepped clock is no lag). A heartbeat within the limit starts the count over."""
    hb_ms = 300
    t = now_ms()
    step = -15_000  # the server's clock, stepped back after the snapshot

    def hb(lagging: bool, k: int) -> bytes:
        return _frame({"type": "heartbeat", "as_of": t + k + (step if lagging else 0)})

    first = [_frame(_snapshot(_market("live", in_play=True), _market("pre")) | {"as_of": t}, "t0"),
             hb(True, 1), hb(True, 2), hb(False, 3),  # two lagging, then one in time: the count starts over
             hb(True, 4), hb(True, 5), hb(True, 6)]   # three in a row: reconnect
    backoff = Backoff(initial_s=0.2, max_s=0.2, rng=lambda: 1.0)
    async with ScriptedSSEServer([first, []]) as fake:  # (connection 2: open, nothing sent)
        client = OddsClient(fake.url, heartbeat_ms=hb_ms, stale_in_play_ms=10_000, stale_pre_match_ms=60_000,
                            backoff=backoff)
        try:
            await client.start()
            await eventually(lambda: client.stats.connects >= 2 and client.connected, 10, "a reconnect")
            assert "lagging" in client.stats.disconnect_reasons[0], client.stats.disconnect_reasons
            assert client.stats.lag_reconnects == 1 and client.stats.heartbeats == 6, client.stats
            assert backoff.attempts == 1, "the reconnect waited the backoff"
            assert fake.last_event_ids == [None, "t0"], "resumed with its token"
            # reconnected, not resumed: nothing vouched for, both markets stale (never fresher than before)
            assert client.is_stale("live") and client.is_stale("pre") and client.stream_lag_ms == 0
            # the next connection resumes (the server's clock still stepped back): live again
            fake.next_script = [_frame({"type": "resumed", "recovered": True}, "t1"),
                                _frame({"type": "heartbeat", "as_of": now_ms() + step})]
            await eventually(lambda: client.stats.resumed_recovered == 1 and client.stats.heartbeats >= 7, 15,
                             "the resumed stream")
            assert fake.last_event_ids[-1] == "t0"
            assert client.stream_lag_ms < 1_000, client.stream_lag_ms
            assert not client.is_stale("live") and not client.is_stale("pre")
            assert client.stats.lag_reconnects == 1
        finally:
            await client.close()


# -- a resumed stream's replay, orphaned event states, the WebSocket's drop, lag reconnects' spread ------


@pytest.mark.parametrize("stamped", [True, False], ids=["as_of", "older_server"])
async def test_a_resumed_streams_as_of_is_its_baseline_and_replayed_deltas_count_their_age(stamped: bool) -> None:
    """A genuinely slow client reconnects for lagging and resumes: the server replays what it
    missed, each delta with the ``sent_at`` it was first sent with (here 6 s ago). The first timed
    message of the new connection was the oldest replayed delta, so the lag it had became the
    baseline and read as 0: the replayed prices, older than the in-play limit, read fresh. Now
    ``resumed``'s ``as_of`` (the server's send time, stamped per resume) sets the baseline: the
    replayed deltas lag 6 s, read stale, and their ages count it. From an older server (``resumed``
    without ``as_of``) no replayed delta sets the baseline: every market reads stale from the
    ``resumed`` until the first heartbeat after it, which sets it and confirms the book."""
    limit = 2_000
    first = [_frame(_snapshot(_market("live", in_play=True), _market("pre")), "t0"),
             _frame({"type": "heartbeat", "as_of": now_ms()})]
    async with ScriptedSSEServer([first]) as fake:
        client = OddsClient(fake.url, heartbeat_ms=60_000, stale_in_play_ms=limit, stale_pre_match_ms=60_000,
                            backoff=Backoff(initial_s=0.05, max_s=0.05, rng=lambda: 1.0))
        try:
            await client.start()
            await client.wait_synced()
            assert not client.is_stale("live") and not client.is_stale("pre")
            t = now_ms()
            resumed = {"type": "resumed", "recovered": True} | ({"as_of": t} if stamped else {})
            fake.next_script = [_frame(resumed, "t1"),
                                _frame(_delta("live", 2, 2.2) | {"sent_at": t - 6_000}, "t2"),
                                _frame(_delta("pre", 2, 3.2) | {"sent_at": t - 5_900}, "t3")]
            fake.streams[0].close()  # the connection ends: the client reconnects and resumes
            await client.wait_until(lambda c: c.best("pre", "1") == 3.2, 10)
            assert client.stats.resumed_recovered == 1
            if stamped:
                assert client.stream_lag_ms >= 5_900, client.stream_lag_ms
                assert (client.age_ms("live") or 0) >= 6_000 and (client.age_ms("pre") or 0) >= 5_900, \
                    (client.age_ms("live"), client.age_ms("pre"))
            assert client.is_stale("live") and client.is_stale("pre"), "a replay 6 s old read fresh"
            # caught up: a heartbeat sent now confirms the book
            fake.streams[-1].write(_frame({"type": "heartbeat", "as_of": now_ms()}))
            await client.wait_until(lambda c: c.stats.heartbeats == 2, 10)
            assert client.stream_lag_ms < 1_000, client.stream_lag_ms
            assert not client.is_stale("live") and not client.is_stale("pre")
        finally:
            await client.close()


def _es(event_id: str, version: int = 1, *, source: str = "fake", stale: bool = False) -> dict[str, Any]:
    t = now_ms()
    return {"type": "event_state", "sent_at": t, "event_state": {
        "event_id": event_id, "source": source, "status": "LIVE", "in_play": True, "period": "1h",
        "score": {"home": 1, "away": 0}, "source_ts": t, "received_at": t, "version": version,
        "age_ms": 0, "stale": stale}}


async def test_an_event_state_leaves_with_the_last_market_that_refers_to_it() -> None:
    """An event's state stayed in the client, reading fresh, after its last market left the
    filter: the server sends that event's state only to a subscription holding one of its markets,
    and leaves it out of ``stale_events`` — ``event_state_stale()`` was False for good. A market
    dropped (``removed``, or leaving the local filter) now takes with it the states of its event
    and its race that no market left refers to."""
    t1 = 1_900_000_000_000 - (1_900_000_000_000 % 3_600_000)  # 2030-03-17 17:00 UTC: race ids .1700 / .1730
    client = OddsClient("http://127.0.0.1:9", competition="c1")
    try:
        def race(mid: str, start: int) -> dict[str, Any]:
            return _market(mid) | {"sport": "horse_racing", "event_id": "bf:100", "start_time": start,
                                   "competition": "c1"}
        snap = _snapshot(_market("a1") | {"competition": "c1"}, _market("a2") | {"competition": "c1"},
                         _market("b1") | {"event_id": "e2", "competition": "c1"},
                         race("r1", t1), race("r2", t1 + 1_800_000))
        now = time.monotonic()
        client._on_message(json.dumps(snap).encode(), now, "t0")
        for eid in ("e1", "e2", "bf:100", "bf:100.1700", "bf:100.1730"):
            client._on_message(json.dumps(_es(eid)).encode(), now, None)
        assert client.state_of_market("r1").event_id == "bf:100.1700"  # type: ignore[union-attr]
        status = {"type": "status", "source": "fake", "state": "UP", "stale_markets": [], "stale_events": [],
                  "as_of": now_ms()}
        client._on_message(json.dumps(status).encode(), now, None)
        assert not any(client.event_state_stale(e) for e in ("e1", "e2", "bf:100", "bf:100.1700"))
        # one of e1's two markets leaves: e1's state stays (a2 still shows it)
        client._on_message(json.dumps({"type": "removed", "market_id": "a1", "reason": "not_visible"}).encode(), now, "t1")
        assert "e1" in client.event_states and not client.event_state_stale("e1")
        # the last one leaves: so does the state, which reads stale (unknown)
        client._on_message(json.dumps({"type": "removed", "market_id": "a2", "reason": "not_visible"}).encode(), now, "t2")
        assert "e1" not in client.event_states and client.event_state_stale("e1")
        # a race's market leaves: its race's state goes, the meeting's (r2 refers to it) and r2's race stay
        client._on_message(json.dumps({"type": "removed", "market_id": "r1", "reason": "not_visible"}).encode(), now, "t3")
        assert "bf:100.1700" not in client.event_states and client.event_state_stale("bf:100.1700")
        assert not client.event_state_stale("bf:100") and not client.event_state_stale("bf:100.1730")
        # leaving the local filter (a delta moving its competition, and its event) drops the state of
        # the event it was shown with too
        moved = _delta("b1", 2, 2.5) | {"header": {"competition": "c2", "sport": "soccer", "event_id": "e3",
                                                   "in_play": False, "status": "OPEN"}}
        client._on_message(json.dumps(moved).encode(), now, "t4")
        assert "b1" not in client.markets
        assert "e2" not in client.event_states and client.event_state_stale("e2")
        # and a later status of the source cannot bring a flag back for a state not held
        client._on_message(json.dumps(status).encode(), now, None)
        assert client.event_state_stale("e1") and client.event_state_stale("e2")
        assert sorted(client.event_states) == ["bf:100", "bf:100.1730"]
    finally:
        await client.close()


async def test_an_event_state_leaves_with_a_market_that_moves_to_another_event(store: Store, redis_url: str) -> None:
    """A market that stays in the filter but moves to another event (a delta whose ``header``
    carries another ``event_id``) left its old event's state in the client: no market referred to
    it any more, the server sent no more of it nor listed it in ``stale_events``, and
    ``event_state_stale()`` read False for good. The move now takes with it the states of the old
    event that no market left refers to."""
    from feed.models import EventState, Score

    def state(event: str) -> EventState:
        t = now_ms()
        return EventState(event_id=event, source="t", status="LIVE", in_play=True, period="1h",
                          score=Score(home=1, away=0), source_ts=t, received_at=t, version=1)

    feed = Feed(store)
    await feed.write(feed.image("m1", event="e1", in_play=True), feed.image("m2", event="e2", in_play=True))
    t = now_ms()
    await store.set_health(SourceHealth(source="t", kind="push", state="UP", last_message_at=t, updated_at=t,
                                        lease_ms=600_000, stale_after_ms=600_000))
    await store.apply_event_states([state("e1"), state("e2")])
    async with serve(make_app(redis_url)) as base:
        async with OddsClient(base, sport="soccer", heartbeat_ms=500) as client:
            await eventually(lambda: {"e1", "e2"} <= client.event_states.keys(), 10, "both events' states")
            assert not client.event_state_stale("e1") and not client.event_state_stale("e2")
            await feed.write(feed.header("m1", event_id="e2"))  # still soccer: it stays in the book
            await client.wait_until(lambda c: c.markets["m1"].event_id == "e2", 10)
            assert "e1" not in client.event_states and client.event_state_stale("e1"), \
                "the state of the event m1 left read fresh with no market referring to it"
            assert "e2" in client.event_states and not client.event_state_stale("e2")  # m1 and m2 show it
            assert client.state_of_market("m1") is client.event_states["e2"]


async def test_an_image_or_header_that_moves_a_race_market_drops_the_states_left_without_a_market() -> None:
    """As for a move by ``header``: an image (``kind: "image"``) whose market carries another event
    or another start (another race, ``bf:<meeting>.<HHMM>``) takes with it the states the market was
    shown with that no market left refers to — and only those."""
    t1 = 1_900_000_000_000 - (1_900_000_000_000 % 3_600_000)  # 2030-03-17 17:00 UTC: race ids .1700 / .1730
    client = OddsClient("http://127.0.0.1:9", competition="c1")
    try:
        def race(mid: str, start: int, event: str = "bf:100", seq: int = 1) -> dict[str, Any]:
            return _market(mid, seq=seq) | {"sport": "horse_racing", "event_id": event, "start_time": start,
                                            "competition": "c1"}

        def image(m: dict[str, Any]) -> bytes:
            t = now_ms()
            return json.dumps({"type": "delta", "market_id": m["market_id"], "seq": m["seq"], "kind": "image",
                               "source": "fake", "source_ts": t, "received_at": t, "market": m, "age_ms": 0,
                               "stale": False, "sent_at": t}).encode()

        now = time.monotonic()
        snap = _snapshot(_market("a1") | {"competition": "c1"}, _market("b1") | {"event_id": "e2", "competition": "c1"},
                         race("r1", t1), race("r2", t1 + 1_800_000), race("r3", t1 + 1_800_000))
        client._on_message(json.dumps(snap).encode(), now, "t0")
        for eid in ("e1", "e2", "bf:100", "bf:100.1700", "bf:100.1730"):
            client._on_message(json.dumps(_es(eid)).encode(), now, None)
        held = ["bf:100", "bf:100.1700", "bf:100.1730", "e1", "e2"]
        assert sorted(client.event_states) == held
        # an image moving a1 to e2 (b1's event): e1 has no market left, e2 stays
        client._on_message(image(_market("a1", seq=2) | {"event_id": "e2", "competition": "c1"}), now, "t1")
        assert client.markets["a1"].event_id == "e2"
        assert "e1" not in client.event_states and client.event_state_stale("e1")
        assert not client.event_state_stale("e2")
        # an image moving r1's start by an hour: its race (.1700) goes, the meeting (same event) stays
        client._on_message(image(race("r1", t1 + 3_600_000, seq=2)), now, "t2")
        assert "bf:100.1700" not in client.event_states and client.event_state_stale("bf:100.1700")
        assert not client.event_state_stale("bf:100")
        # a header moving r2 to another meeting: r3 still shows the race .1730 and the meeting bf:100
        header = {"competition": "c1", "sport": "horse_racing", "event_id": "bf:200", "start_time": t1 + 1_800_000,
                  "in_play": False, "status": "OPEN"}
        client._on_message(json.dumps(_delta("r2", 2, 2.5) | {"header": header}).encode(), now, "t3")
        assert client.markets["r2"].event_id == "bf:200"
        assert not client.event_state_stale("bf:100.1730") and not client.event_state_stale("bf:100")
        # a new start within the same minute (17:30:30) is the same race: nothing goes
        client._on_message(image(race("r3", t1 + 1_830_000, seq=2)), now, "t4")
        assert sorted(client.event_states) == ["bf:100", "bf:100.1730", "e2"]
        # r3, the race's last market, moved to 17:31: the race .1730 goes, the meeting stays
        client._on_message(image(race("r3", t1 + 1_860_000, seq=3)), now, "t5")
        assert sorted(client.event_states) == ["bf:100", "e2"]
    finally:
        await client.close()


class _DeafWebSocketServer:
    """A loopback WebSocket server (the handshake and unmasked text frames by hand) that plays
    ``script`` (JSON messages) on its first connection and then never answers again — not even a
    close frame, as a server whose close frame sits behind a backlog the client no longer reads.
    Records the time of each WebSocket connection; anything else (GET /v1/sources) is a 404."""

    def __init__(self, script: list[dict[str, Any]]) -> None:
        self.script = script
        self.opened: list[float] = []
        self.writers: list[Any] = []

    async def __aenter__(self) -> "_DeafWebSocketServer":
        import asyncio

        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for w in self.writers:
            w.close()

    @staticmethod
    def _text(obj: dict[str, Any]) -> bytes:
        data = json.dumps(obj).encode()
        n = len(data)
        head = bytes([0x81, n]) if n < 126 else bytes([0x81, 126]) + n.to_bytes(2, "big") if n < 65536 \
            else bytes([0x81, 127]) + n.to_bytes(8, "big")
        return head + data

    async def _handle(self, reader: Any, writer: Any) -> None:
        import base64
        import contextlib
        import hashlib

        self.writers.append(writer)
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next((ln.split(":", 1)[1].strip() for ln in head.split("\r\n")
                    if ln.lower().startswith("sec-websocket-key:")), None)
        if key is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            writer.close()
            return
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.opened.append(time.monotonic())
        if len(self.opened) == 1:
            for obj in self.script:
                writer.write(self._text(obj))
        with contextlib.suppress(Exception):
            await writer.drain()
            while await reader.read(65536):  # read, never answer (no close frame)
                pass


@pytest.mark.parametrize("why", ["lag", "gap"])
async def test_a_websocket_the_client_drops_itself_reconnects_at_once(why: str) -> None:
    """Over WebSocket a drop the client decides itself (3 lagging heartbeats, a seq gap) went
    through websockets' closing handshake: it waited for the server's close frame — behind the
    backlog the client no longer reads — until close_timeout, 10 s, ``connected`` True all the
    while and the reconnect held back. Now the transport is aborted and the reconnect follows."""
    t = now_ms()
    script: list[dict[str, Any]] = [_snapshot(_market("live", in_play=True)) | {"as_of": t}]
    if why == "lag":
        script += [{"type": "heartbeat", "as_of": t - 15_000 + k} for k in range(3)]  # a clock stepped back 15 s
    else:
        script += [_delta("live", 3, 2.2)]  # seq 1 held: a gap, resynced at once
    async with _DeafWebSocketServer(script) as server:
        client = OddsClient(server.url, heartbeat_ms=2_000, stale_in_play_ms=10_000, rng=lambda: 0.0,
                            backoff=Backoff(initial_s=0.05, max_s=0.05, rng=lambda: 1.0))
        try:
            await client.start()
            await eventually(lambda: client.stats.lag_reconnects == 1 or client.stats.gaps == 1, 10, "the decision")
            decided = time.monotonic()
            # the closing handshake would hold the reconnect for close_timeout (10 s); the backoff is 50 ms
            # (the bound leaves a loaded machine its time and still tells the two apart)
            await eventually(lambda: len(server.opened) >= 2, 8, "the reconnect")
            assert server.opened[1] - decided < 5.0, server.opened[1] - decided
            assert client.stats.disconnect_reasons[0].startswith("stream lagging" if why == "lag" else "seq gap")
        finally:
            await client.close()


async def test_a_lag_reconnect_waits_a_random_spread_on_top_of_its_backoff(caplog: pytest.LogCaptureFixture) -> None:
    """After a server clock step every client of a node sees its third lagging heartbeat on the same
    tick; with a backoff of a few tens of ms they all came back together. A lag reconnect now waits
    a uniformly random spread of up to LAG_RECONNECT_SPREAD_MS on top of its backoff."""
    from streaming.client import LAG_RECONNECT_SPREAD_MS

    t = now_ms()
    first = [_frame(_snapshot(_market("live", in_play=True)) | {"as_of": t}, "t0")]
    first += [_frame({"type": "heartbeat", "as_of": t - 15_000 + k}) for k in range(3)]
    for r in (0.0, 0.25):
        async with ScriptedSSEServer([first, []]) as fake:
            client = OddsClient(fake.url, heartbeat_ms=60_000, stale_in_play_ms=10_000, rng=lambda: r,
                                backoff=Backoff(initial_s=0.05, max_s=0.05, rng=lambda: 1.0))
            try:
                caplog.clear()
                with caplog.at_level(logging.INFO, logger="streaming.client"):
                    await client.start()
                    await eventually(lambda: client.stats.lag_reconnects == 1, 10, "the lag reconnect")
                    await eventually(lambda: len(fake.last_event_ids) >= 2, 10, "the reconnect")
                # both ends exact (a poll noticing either may run late on a loaded machine, and a late
                # poll could make a reconnect without the spread look spread): from the decision (its
                # log line's own time) to the reconnect's arrival (the server's clock as it accepted it)
                decided = next(rec.created for rec in caplog.records if "reconnecting in" in rec.getMessage())
                waited = fake.arrived_at[1] - decided
                want = 0.05 + r * LAG_RECONNECT_SPREAD_MS / 1000
                assert f"reconnecting in {want:.2f} s" in caplog.text, caplog.text
                # (never early; late only by a loaded loop's scheduling: a generous upper bound)
                assert want - 0.05 <= waited < want + 2.0, (r, waited)
            finally:
                await client.close()


async def test_a_heartbeat_does_not_confirm_the_markets_a_conflation_window_holds() -> None:
    """A conflated stream's heartbeat lists the markets whose changes its window still holds: the
    client confirms the others and lets those age (what it holds of them may be behind)."""
    client = OddsClient("http://127.0.0.1:9", stale_in_play_ms=1_500)
    try:
        now = time.monotonic()
        snap = _snapshot(_market("m1", in_play=True), _market("m2", in_play=True)) | {"as_of": now_ms() - 5_000}
        client._on_message(json.dumps(snap).encode(), now - 5.0, "t0")  # (5 s ago)
        beat = {"type": "heartbeat", "as_of": now_ms(), "held": ["m1"]}
        client._on_message(json.dumps(beat).encode(), now, "t1")
        assert client.age_ms("m2") is not None and client.age_ms("m1") is not None
        assert not client.is_stale("m2")
        assert client.is_stale("m1"), "a held market was confirmed by the heartbeat"
    finally:
        await client.close()
