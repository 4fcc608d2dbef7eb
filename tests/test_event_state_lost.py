"""An event state rejected alone marks the held state lost (docs/architecture.md §55, §76's "Left").

A market whose change a normaliser rejects alone reads stale until re-imaged; an event state
rejected alone (a negative score: ``FeedDecodeError`` with ``event_id``) must not leave the
state held before read fresh while the source's other messages (heartbeats, odds) confirm it —
the provider has moved on from it. The ingest writes the held state again with the next version
and ``EventState.lost``; every node reads it stale (final or not) until a good state, written
without the mark, replaces it.

Real parts: the embedded redis-server, the real store, the real push normaliser and API node
(uvicorn on 127.0.0.1) with its own event-state tail. Every wait is ``eventually`` or a bounded read.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

from feed.errors import FeedDecodeError
from feed.ingest import Ingest
from feed.models import ENCODER, EVENT_STATE_DECODER, Clock, EventState, Score, SourceHealth
from feed.normalise.base import NormalisedBatch
from feed.normalise.push import PushNormaliser
from feed.settings import Settings
from feed.sources.base import Payload
from feed.store import ES_STATE_KEY, Store
from streaming.event_states import EventStates
from streaming.state import NodeOptions, NodeState
import test_event_state
from streaming_helpers import SSEReader, eventually, make_app, now_ms, serve

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 10.0


class _Scripted(test_event_state._Scripted):
    """A normaliser handing out prepared batches (one per payload), to drive the ingest exactly."""

    live_provider_times = False


def _live(t: int, home: int, away: int, *, event: str = "px:f1") -> EventState:
    return EventState(event_id=event, source="scripted", status="LIVE", in_play=True, period="2h",
                      clock=Clock(seconds=3000, running=True, at=t), score=Score(home=home, away=away),
                      source_ts=t, received_at=t)


def _bad(event: str = "px:f1") -> FeedDecodeError:
    return FeedDecodeError("invalid_number", f"home score -1 of event {event} is not an int 0..", b"{}",
                           event_id=event)


async def _raw_state(store: Store, event: str) -> bytes:
    raw = await store.redis.hget(ES_STATE_KEY, event)
    assert raw is not None
    return bytes(raw)


async def test_a_state_rejected_alone_marks_the_held_state_lost_until_a_good_one(store: Store) -> None:
    """The ingest: the held (stored) state is written again, version + 1, marked lost; a second
    rejection writes nothing more; a good state — even one saying what the marked one said —
    clears the mark with the next version. A state waiting for the flush is marked in place, and a
    rejection after a good state of the same message wins (it may be the later word)."""
    t = now_ms()
    batches = [
        NormalisedBatch(op="scores", event_states=[_live(t, 1, 0), _live(t, 0, 0, event="px:f2")]),
        NormalisedBatch(op="scores", rejected=[_bad()]),  # f1's next score fails its bounds
        NormalisedBatch(op="ping", heartbeat=True),  # the source goes on talking
        NormalisedBatch(op="scores", rejected=[_bad()]),  # again: already marked, nothing to write
        NormalisedBatch(op="scores", event_states=[_live(t + 10, 1, 0)]),  # good again, same score
        # f2: a good state and a rejected one of f2 in one message, then a rejected one alone
        NormalisedBatch(op="scores", event_states=[_live(t + 20, 1, 0, event="px:f2")], rejected=[_bad("px:f2")]),
    ]
    ingest = Ingest(store, source="scripted", normaliser=_Scripted(batches))
    ingest.feed([Payload(t, b"1")])
    await ingest.flush()
    first = await _raw_state(store, "px:f1")
    assert b'"lost"' not in first  # an unmarked state's record is as it was
    assert EVENT_STATE_DECODER.decode(first).version == 1
    assert len(ingest.take_stored_states()) == 2

    ingest.feed([Payload(t + 1, b"2"), Payload(t + 2, b"3")])
    await ingest.flush()
    es = (await store.get_event_states(["px:f1"]))["px:f1"]
    assert (es.version, es.lost, es.score, es.source_ts) == (2, True, Score(home=1, away=0), t)
    assert b'"lost":true' in await _raw_state(store, "px:f1")
    assert ingest.lost_states == 1 and ingest.event_states["px:f1"].lost is True
    assert ingest.take_stored_states() == []  # written again, not received: no feed-lag sample

    ingest.feed([Payload(t + 3, b"4")])
    await ingest.flush()
    assert (await store.get_event_states(["px:f1"]))["px:f1"].version == 2  # not written again

    ingest.feed([Payload(t + 12, b"5")])
    await ingest.flush()
    es = (await store.get_event_states(["px:f1"]))["px:f1"]
    assert (es.version, es.lost, es.score) == (3, msgspec.UNSET, Score(home=1, away=0))
    assert b'"lost"' not in await _raw_state(store, "px:f1")

    ingest.feed([Payload(t + 22, b"6")])
    await ingest.flush()
    es = (await store.get_event_states(["px:f2"]))["px:f2"]
    assert (es.version, es.lost, es.score) == (2, True, Score(home=1, away=0))  # pending, marked in place
    # a restarted ingest continues from the marked state
    again = Ingest(store, source="scripted", normaliser=_Scripted([
        NormalisedBatch(op="scores", event_states=[_live(t + 30, 2, 0, event="px:f2")])]))
    await again.restore()
    again.feed([Payload(t + 32, b"7")])
    await again.flush()
    es = (await store.get_event_states(["px:f2"]))["px:f2"]
    assert (es.version, es.lost, es.score) == (3, msgspec.UNSET, Score(home=2, away=0))


def test_a_state_marked_lost_reads_stale_on_the_node_final_or_not() -> None:
    """The node: a marked state is stale whatever confirms its source (a final one too, which
    otherwise never ages); the same state unmarked is fresh."""
    t = now_ms()
    st = NodeState(Settings(), 1, NodeOptions())
    h = SourceHealth(source="scripted", kind="push", state="UP", last_message_at=t, updated_at=t, lease_ms=600_000,
                     states_confirmed_at=t)
    st.set_health([h], now=t)
    held = EventStates()
    held.set_health([h], None)
    live = msgspec.structs.replace(_live(t, 1, 0), version=1)
    final = msgspec.structs.replace(live, status="ENDED", in_play=False, received_at=t - 86_400_000, version=2)
    for es in (live, final):
        assert held.age_stale(es, st, t + 1)[1] is False
        lost = msgspec.structs.replace(es, lost=True, version=es.version + 1)
        assert held.age_stale(lost, st, t + 1)[1] is True
        body = json.loads(held.json(lost, st, t + 1))
        assert (body["stale"], body["lost"]) == (True, True)
        assert "lost" not in json.loads(held.json(es, st, t + 1))
    assert ENCODER.encode(live).count(b"lost") == 0


# -- end to end: the push normaliser, the store and a node ------------------------------------------------


class _Push:
    """A push source's messages into a real Ingest (the push normaliser), stored and its health
    published as its pipeline and HealthPublisher do."""

    def __init__(self, store: Store) -> None:
        self.ingest = Ingest(store, source="px", normaliser=PushNormaliser("px"), kind="push", stale_after_ms=10_000)
        self.ingest.set_state("UP", None)
        self.n = 0

    async def send(self, type_: str, **body: Any) -> None:
        self.n += 1
        t = now_ms()
        msg = {"type": type_, "emitted_at": t, **body}
        if type_ != "ping":
            msg.update(entry_id=f"{t}-{self.n}", seq=self.n)
        self.ingest.feed([Payload(t, json.dumps(msg).encode())])
        await self.ingest.flush()
        await self.ingest.publish_health()

    async def score(self, home: int, away: int) -> None:
        await self.send("scores", data=[{"fixture_id": "f1", "status": "live", "period": "2H",
                                         "score": {"home": home, "away": away}}])


def _state_of_f1(ev: Any) -> bool:
    return ev.event == "event_state" and ev.data["event_state"]["event_id"] == "px:f1"


async def test_the_node_serves_the_score_stale_after_a_rejected_update_while_heartbeats_go_on(
        store: Store, redis_url: str) -> None:
    """A push fixture in play, 1-0, served fresh. The next ``scores`` item says -1: the normaliser
    rejects it alone; the source keeps sending pings (its health confirms). The node sends the
    state again stale (``lost``), and a subscriber arriving after the pings gets it stale; a good
    score (2-0) is served fresh."""
    src = _Push(store)
    await src.send("odds", data=[{"fixture": {"id": "f1", "sport": "soccer", "home": "A", "away": "B",
                                              "is_live": True},
                                  "market": {"id": "ml", "name": "Moneyline"},
                                  "selection": {"id": sel, "name": sel.title()}, "price": price}
                                 for sel, price in (("home", 2.0), ("away", 3.0))])
    await src.score(1, 0)
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        node = app.state.node
        await eventually(lambda: (es := node.event_states.get("px:f1")) is not None and es.version == 1,
                         TIMEOUT_S, "the node holding px:f1 v1")
        async with c.stream("GET", "/v1/stream?sport=soccer") as r:
            sse = SSEReader(r)
            assert (await sse.next()).event == "snapshot"
            ev = await sse.until(_state_of_f1)
            assert (ev.data["event_state"]["version"], ev.data["event_state"]["stale"]) == (1, False)

            await src.score(-1, 0)  # rejected alone
            assert src.ingest.stats.rejected_by_reason.get("invalid_number") == 1
            ev = await sse.until(_state_of_f1)
            es = ev.data["event_state"]
            assert (es["version"], es["stale"], es["lost"], es["score"]["home"]) == (2, True, True, 1)
            for _ in range(3):  # heartbeats confirm the source: the marked state stays stale
                await src.send("ping")
            confirmed = src.ingest.health.states_confirmed_at or 0
            await eventually(lambda: (h := node.state.source_health("px", now_ms())) is not None
                             and (h.states_confirmed_at or 0) >= confirmed, TIMEOUT_S, "the pings' confirmation")
            async with c.stream("GET", "/v1/stream?sport=soccer") as r2:
                late = SSEReader(r2)
                assert (await late.next()).event == "snapshot"
                ev = await late.until(_state_of_f1)
                assert (ev.data["event_state"]["version"], ev.data["event_state"]["stale"]) == (2, True)

            await src.score(2, 0)
            ev = await sse.until(_state_of_f1)
            es = ev.data["event_state"]
            assert (es["version"], es["stale"], es["score"]["home"]) == (3, False, 2) and "lost" not in es
