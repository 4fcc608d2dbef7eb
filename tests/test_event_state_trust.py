"""Trust of event states (scores, clock) and of the best stream on an API node — an audit's findings,
each against the real node (uvicorn on 127.0.0.1, the embedded Redis) and, where it is cheaper, the
unit that decides:

- F5: the linker changing only a canonical event's summary (its start moved) re-judges the best
  stream's books (§67's start-time net), not only REST;
- F3: a source's health record vouches for its event states only once the node's event-state tail has
  read the log as far as its head read after the record (§41, as for markets): a stalled tail makes
  the held score age into staleness, never read fresh;
- F6: the event-state keys going back under the same store epoch (an older snapshot restored) never
  make the node serve the older score as fresh: it keeps the newer one, marked stale;
- F4: The Odds API's scores are confirmed only by its ``/scores`` polls (``states_confirmed_at``), never
  by its odds polls: a failing ``/scores`` lets the held score turn stale while the odds go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from feed.ingest import Ingest
from feed.linker import CanonicalSummary
from feed.models import HEALTH_DECODER, Clock, EventState, MarketHeader, Score, Selection, SourceHealth
from feed.normalise.base import MarketUpdate
from feed.settings import Settings
from feed.store import _ES_KEYS, Store, StoredLink
from streaming.event_states import EventStates
from streaming.state import NodeOptions, NodeState
from tests.streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, serve

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

_IDS = {"home": "h", "draw": "d", "away": "a"}


def _sel(outcome: str, price: float) -> Selection:
    return Selection(selection_id=_IDS[outcome], name=outcome.title(), outcome=outcome, price=price,
                     back=[(price, 100.0)])


def _img(mid: str, source: str, event: str, prices: tuple[float, float, float], *, start: int | None = None,
         in_play: bool = False) -> MarketUpdate:
    t = now_ms()
    return MarketUpdate(
        market_id=mid, source=source, image=True,
        header=MarketHeader(sport="soccer", event_id=event, event_name="Arsenal v Chelsea",
                            competition="Premier League", bookmaker=source, in_play=in_play, status="OPEN", market_type="match_result",
                            name="Match Odds", start_time=start),
        selections=[_sel(o, p) for o, p in zip(("home", "draw", "away"), prices, strict=True)],
        source_ts=t, received_at=t + 1)


def _state(home: int, away: int, version: int, *, event: str = "a:e", source: str = "book_a") -> EventState:
    t = now_ms()
    return EventState(event_id=event, source=source, status="LIVE", in_play=True, period="2h",
                      clock=Clock(seconds=3000, running=True, at=t), score=Score(home=home, away=away),
                      source_ts=t, received_at=t, version=version)


class _Renewer:
    """The ingest of ``book_a`` alive: its health record (everything received is stored) renewed every
    200 ms, as its HealthPublisher does."""

    def __init__(self, store: Store) -> None:
        t = now_ms()
        self.store = store
        self.health = SourceHealth(source="book_a", kind="push", state="UP", last_message_at=t, updated_at=t,
                                   lease_ms=3000)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.health.updated_at = self.health.last_message_at = now_ms()
            await self.store.set_health(self.health)
            await asyncio.sleep(0.2)

    async def __aenter__(self) -> _Renewer:
        await self.store.set_health(self.health)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


# --- F5: the best stream follows a summary change ----------------------------------------------------------


async def test_the_best_stream_drops_a_book_whose_start_no_longer_fits_after_a_summary_change(
        store: Store, redis_url: str) -> None:
    """The linker moving only the canonical event's start (no market changes canonical event or
    orientation) changed nothing on the best stream: ``set_links`` reported no move and the best view
    was never refreshed, so it kept as best a book the start-time net (§67) now excludes, while REST
    (links version in its ETag) excluded it."""
    cid = "ev:a:e"
    start = now_ms() + 6 * 3_600_000
    day = 24 * 3_600_000

    async def link(at: int) -> None:
        summary = CanonicalSummary(event_id=cid, sport="soccer", name="Arsenal v Chelsea", home="Arsenal",
                                   away="Chelsea", start_time=at, members=["a:e", "b:e"])
        await store.save_links({"a:e": StoredLink(cid, 1.0, "self"), "b:e": StoredLink(cid, 1.0, "pinned")},
                               {cid: msgspec.json.encode(summary)})

    def home_best(markets: list[dict]) -> tuple[str | None, dict | None]:
        (o,) = [o for m in markets for o in m["outcomes"] if o["outcome"] == "home"]
        return (o.get("best") or {}).get("bookmaker"), o.get("excluded")

    feed = Feed(store)
    await link(start)
    await feed.write(_img("a:1", "book_a", "a:e", (2.10, 3.4, 3.6), start=start),
                     _img("b:1", "book_b", "b:e", (2.40, 3.3, 3.5), start=start))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def linked() -> bool:
            return len((await c.get("/v1/markets", params={"event": cid})).json()["markets"]) == 2
        await eventually(linked, what="both books linked")
        async with c.stream("GET", f"/v1/stream?view=best&event={cid}&heartbeat_ms=500") as resp:
            sse = SSEReader(resp)
            snap = (await sse.next()).data
            assert home_best(snap["events"][0]["markets"]) == ("book_b", None)
            # book_a moves the fixture a day (its own start now disagrees: excluded) ...
            await feed.write(feed.header("a:1", source="book_a", start_time=start + day))
            ev = await sse.until(lambda e: e.event == "best")
            assert home_best(ev.data["markets"]) == ("book_b", {"book_a": "start_time"})
            # ... then the linker's summary follows it (the anchor's book): only the summary changes
            await link(start + day)
            ev = await sse.until(lambda e: e.event == "best" and home_best(e.data["markets"])[0] == "book_a")
            assert home_best(ev.data["markets"]) == ("book_a", {"book_b": "start_time"})


# --- F3: a node vouches for event states only as far as it has read -----------------------------------------


def _node_state(settings: Settings | None = None) -> NodeState:
    return NodeState(settings or Settings(stale_in_play_ms=10_000), 1, NodeOptions())


def test_a_record_vouches_for_event_states_only_once_the_tail_reached_its_head() -> None:
    now = now_ms()
    st = _node_state()
    es = msgspec.structs.replace(_state(0, 0, 1), received_at=now - 8_000, source_ts=now - 8_000)
    held = EventStates()
    held.replace([es], "5-0")
    h = SourceHealth(source="book_a", state="UP", last_message_at=now - 100, updated_at=now)
    st.set_health([h], now=now)
    held.set_health([h], "7-0")  # a state written after the node's position: not read yet
    assert held.age_stale(es, st, now) == (8_000, False)  # its own receipt, not the record's confirmation
    assert held.age_stale(es, st, now + 2_500) == (10_500, True)
    held.apply("6-0", [])
    assert held.age_stale(es, st, now)[0] == 8_000  # still short of the head
    held.apply("7-0", [])  # the tail reached the head read after the record: it vouches now
    assert held.age_stale(es, st, now) == (100, False)
    held.set_health([h], "7-0")  # at the head: vouched at the refresh itself
    assert held.age_stale(es, st, now) == (100, False)


async def test_a_stalled_event_state_tail_turns_the_held_score_stale(store: Store, redis_url: str) -> None:
    """The node's event-state connection stalls while the ingest stores a goal and goes on confirming
    its source: the node served the old score as fresh (age ~0) for as long as the stall lasted."""
    feed = Feed(store)
    await feed.write(_img("m1", "book_a", "a:e", (2.0, 3.2, 4.0), in_play=True))
    await store.apply_event_states([_state(0, 0, 1)])
    app = make_app(redis_url, settings=Settings(stale_in_play_ms=1_500, heartbeat_ms=60_000))
    async with _Renewer(store), serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        node = app.state.node

        async def shown() -> dict:
            return dict((await c.get("/v1/events/a:e")).json()["state"])
        # (waited for: until the node's tail vouches for it, the state is as old as its write, and a
        # loaded machine may take the in-play 1.5 s to start the node)
        st = await eventually(lambda: _if(shown(), lambda s: not s["stale"]), what="the score served fresh")
        assert (st["score"]["home"], st["stale"]) == (0, False)
        tail = node.event_state_tail._tail
        real = tail.read_entries
        release, waiting = asyncio.Event(), asyncio.Event()

        async def stalled(*a: object, **k: object) -> object:  # a half-open connection: no answer
            waiting.set()
            await release.wait()
            return await real(*a, **k)
        tail.read_entries = stalled
        await asyncio.wait_for(waiting.wait(), 10)  # (the read in flight when the stall began returned first)
        await store.apply_event_states([_state(1, 0, 2)])  # GOAL, stored; the source stays confirmed
        t0 = time.monotonic()
        st = await eventually(lambda: _if(shown(), lambda s: s["stale"]), what="the unread state turned stale")
        assert st["score"]["home"] == 0 and st["age_ms"] > 1_500
        assert time.monotonic() - t0 < 8
        release.set()  # the tail reads again: the goal, fresh
        st = await eventually(lambda: _if(shown(), lambda s: s["score"]["home"] == 1 and not s["stale"]),
                              what="the goal read and served fresh")
        assert st["version"] == 2


async def _if(coro: Awaitable[T], pred: Callable[[T], object]) -> T | None:
    """``coro``'s value when ``pred`` holds for it, else None (for :func:`eventually`)."""
    value = await coro
    return value if pred(value) else None


# --- F6: the store going back never makes an older score fresh ----------------------------------------------


def test_a_reload_under_the_same_epoch_keeps_the_newer_state_marked_stale() -> None:
    now = now_ms()
    st = _node_state()
    h = SourceHealth(source="book_a", state="UP", last_message_at=now, updated_at=now)
    st.set_health([h], now=now)
    held = EventStates()
    held.set_health([h], None)
    v1, v2, v3 = _state(0, 0, 1), _state(1, 0, 2), _state(2, 0, 3)
    other = _state(0, 0, 4, event="c:e")
    held.replace([v1, other], "5-0", "ep")
    held.apply("6-0", [v2])
    assert held.age_stale(held.states["a:e"], st, now)[1] is False
    held.replace([v1], "5-0", "ep")  # the store went back: v1 again, and c:e gone
    assert held.states["a:e"] is v2 and held.lost == {"a:e": 2} and "c:e" not in held.states
    assert held.age_stale(v2, st, now)[1] is True  # the store lost it: not vouched for
    held.apply("6-1", [msgspec.structs.replace(v1, version=2)])  # a version not above the held one: ignored
    assert held.states["a:e"] is v2 and held.age_stale(v2, st, now)[1] is True
    held.apply("7-0", [v3])  # a newer version: fresh again
    assert held.states["a:e"] is v3 and not held.lost and held.age_stale(v3, st, now)[1] is False
    held.replace([v1], "5-0", "ep2")  # a new store epoch (wiped, versions start over): taken whole
    assert held.states["a:e"] is v1 and not held.lost


async def test_event_state_keys_going_back_keep_the_newer_score_stale(store: Store, redis_url: str) -> None:
    """An older Redis snapshot restored under the same epoch: the node reloaded the store's states whole
    and served the older score (version 1) fresh over REST while clients held version 2."""
    feed = Feed(store)
    await feed.write(_img("m1", "book_a", "a:e", (2.0, 3.2, 4.0), in_play=True))
    await store.apply_event_states([_state(0, 0, 1)])
    r = aioredis.Redis.from_url(redis_url)
    snapshot = {k: await r.dump(k) for k in _ES_KEYS}  # an RDB taken now: 0-0, version 1
    app = make_app(redis_url)
    try:
        async with _Renewer(store), serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            node = app.state.node

            async def shown() -> dict:
                return dict((await c.get("/v1/events/a:e")).json()["state"])
            await store.apply_event_states([_state(1, 0, 2)])  # GOAL, read by the node
            await eventually(lambda: _if(shown(), lambda s: s["version"] == 2 and not s["stale"]), what="1-0 served")
            reloads = node.event_states.reloads
            for k, v in snapshot.items():  # Redis goes back to before the goal (same epoch)
                if v is not None:
                    await r.restore(k, 0, v, replace=True)
            await eventually(lambda: node.event_states.reloads > reloads, what="the node reloaded the states")
            st = await shown()
            assert (st["score"]["home"], st["version"], st["stale"]) == (1, 2, True)
            # the ingest's next change (it still holds version 2): version 3, fresh
            await store.apply_event_states([_state(2, 0, 3)])
            st = await eventually(lambda: _if(shown(), lambda s: s["version"] == 3), what="version 3 served")
            assert (st["score"]["home"], st["stale"]) == (2, False)
    finally:
        await r.aclose()


# --- F4: The Odds API's scores are confirmed by its scores polls ---------------------------------------------


def test_a_record_without_states_confirmed_at_decodes_and_confirms_with_its_messages() -> None:
    now = now_ms()
    old = HEALTH_DECODER.decode(msgspec.json.encode({"source": "book_a", "state": "UP", "last_message_at": now,
                                                     "updated_at": now}))
    assert old.states_confirmed_at is None
    es = msgspec.structs.replace(_state(0, 0, 1), received_at=now - 30_000, source_ts=now - 30_000)
    st = _node_state()
    held = EventStates()
    for h, want in ((old, (0, False)),  # an older ingest's record: its messages confirm its states
                    (msgspec.structs.replace(old, states_confirmed_at=now - 20_000), (20_000, True)),
                    (msgspec.structs.replace(old, states_confirmed_at=0), (30_000, True))):
        st.set_health([h], now=now)
        held.set_health([h], None)
        assert held.age_stale(es, st, now) == want, h


async def test_the_ingest_confirms_states_apart_only_through_confirm_states(store: Store) -> None:
    streamed = Ingest(store, source="s1")
    streamed.confirm(1_000)
    assert (streamed.health.last_message_at, streamed.health.states_confirmed_at) == (1_000, 1_000)
    polled = Ingest(store, source="s2")
    polled.confirm_by_messages = False
    polled.confirm_states_apart = True
    polled.confirm(1_000)  # an odds poll: the markets only
    assert (polled.health.last_message_at, polled.health.states_confirmed_at) == (1_000, 0)
    polled.confirm_states(900)  # a scores poll
    assert (polled.health.last_message_at, polled.health.states_confirmed_at) == (1_000, 900)
    await polled.flush()  # (nothing to write: a flush confirms what was fed, no later)
    assert polled.health.states_confirmed_at == 900


async def test_failing_scores_polls_let_the_held_score_turn_stale_while_odds_polls_succeed(redis_url: str) -> None:
    """Real poller + simulator: The Odds API's ``/scores`` answers 200 with a body the normaliser rejects
    whole while ``/odds`` answers; the odds polls advanced ``last_message_at``, which confirmed the frozen
    score — it read fresh for as long as the odds polls succeeded."""
    from tests.poller_helpers import FAST, poller, providers

    settings = Settings(stale_in_play_ms=1_500)
    store = await Store.open(redis_url)
    try:
        async with providers(time_scale=240.0) as sim, poller(
                "theoddsapi", store, f"theoddsapi={sim.url},api_key=demo,sport=upcoming,{FAST}",
                settings=settings) as (src, _task), \
                serve(make_app(redis_url, settings=settings)) as base, \
                httpx.AsyncClient(base_url=base, timeout=10) as c:
            async def live_fresh() -> str | None:
                states = await store.load_event_states("theoddsapi")
                for es in states:
                    if es.status == "LIVE":
                        r = await c.get(f"/v1/events/{es.event_id}")
                        if r.status_code == 200 and not r.json()["state"]["stale"]:
                            return es.event_id
                return None
            eid = await eventually(live_fresh, 60, "a live score served fresh (its scores polls confirm it)")

            def broken(sport: str) -> tuple[object, dict]:
                return {"message": "scores temporarily unavailable"}, {}  # 200, rejected whole
            sim._toa_scores_body = broken  # type: ignore[method-assign]

            async def state() -> dict:
                return dict((await c.get(f"/v1/events/{eid}")).json()["state"])
            st = await eventually(lambda: _if(state(), lambda s: s["stale"]), 15, "the frozen score turned stale")
            assert st["age_ms"] > 1_500

            async def toa() -> dict:
                return next(s for s in (await c.get("/v1/sources")).json()["sources"] if s["source"] == "theoddsapi")
            confirmed = (await toa())["states_confirmed_at"]
            h = await eventually(lambda: _if(toa(), lambda h: h["last_message_at"] > confirmed + 1_000),
                                 what="the odds polls confirming the markets on")
            assert (h["state"], h["states_confirmed_at"]) == ("UP", confirmed), h  # the scores: not since
            markets = [m for m in (await c.get("/v1/markets", params={"source": "theoddsapi"})).json()["markets"]
                       if m["status"] == "OPEN"]
            assert markets and any(not m["stale"] for m in markets)  # the markets stay confirmed
    finally:
        await store.close()
