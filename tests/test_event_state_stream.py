"""Event states on the streams (``event_state`` messages), against a real API node (uvicorn on
127.0.0.1, the embedded Redis) fed through the real store: markets by Book → Store.apply, states by
Store.apply_event_states (what the ingest writes), read by the node's own event-state tail.

Checks, over SSE and WebSocket: a snapshot is followed by the state of each event among its markets
(and only those); a change is sent live, keyed by the provider event id; filters by sport and by
event keep other events' states out; the messages carry no resume token (SSE: no ``id:``, the
client's position stays put); a recovered resume sends the current states again; a tenant never
gets the state of an event whose markets it may not see (nor of a source it may not see); a market
that newly matches a subscription brings its event's state; a slow consumer's collapsed queue keeps
the latest state per event (in its place among the status messages); a held state that turns stale
(its source DEGRADED and silent) or fresh again without a new state is announced in the source's
``status`` (``stale_events``, as each subscription sees it, and again after a recovered resume); the
Python client keeps them (``event_states``, ``match_time_s``, ``on_event_state``,
``event_state_stale`` following those statuses). Every wait is ``eventually`` or a bounded read.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect

from feed.models import Clock, EventState, Score, SourceHealth
from feed.settings import Settings
from feed.store import Store
from streaming.client import OddsClient, ServedEventState
from streaming.event_states import EventStates
from streaming.hub import Hub, StateMeta
from streaming.state import Filter, NodeOptions, NodeState
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, serve

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 10.0


def _state(event: str, version: int, home: int = 0, away: int = 0, *, source: str = "t", running: bool = True,
           seconds: int = 600, at: int | None = None) -> EventState:
    t = now_ms() if at is None else at
    return EventState(event_id=event, source=source, status="LIVE", in_play=True, period="1h",
                      clock=Clock(seconds=seconds, running=running, at=t), score=Score(home=home, away=away),
                      source_ts=t + version, received_at=t + version, version=version)


async def _health(store: Store, source: str = "t", state: str = "UP") -> None:
    t = now_ms()
    await store.set_health(SourceHealth(source=source, kind="push", state=state,  # type: ignore[arg-type]
                                        reason=None if state == "UP" else "stopped", last_message_at=t, updated_at=t,
                                        lease_ms=600_000, stale_after_ms=600_000))


async def _seed(store: Store) -> Feed:
    """m1, m2 of soccer event e1; m3 of tennis event e2; m4 of soccer event e3. States: e1 v1, e2 v1."""
    feed = Feed(store)
    await feed.write(feed.image("m1", sport="soccer", event="e1", in_play=True),
                     feed.image("m2", sport="soccer", event="e1", in_play=True),
                     feed.image("m3", sport="tennis", event="e2", in_play=True),
                     feed.image("m4", sport="soccer", event="e3"))
    await _health(store)
    await store.apply_event_states([_state("e1", 1), _state("e2", 1)])
    return feed


async def _node_has(app: Any, event: str, version: int) -> None:
    await eventually(lambda: (es := app.state.node.event_states.get(event)) is not None and es.version >= version,
                     TIMEOUT_S, f"the node holding {event} v{version}")


class WSReader:
    """The messages of one WebSocket connection, per subscription."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def next(self, pred: Any = lambda m: True, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            while True:
                msg = json.loads(await self.ws.recv())
                self.seen.append(msg)
                if msg["type"] != "heartbeat" and pred(msg):
                    return msg
        return await asyncio.wait_for(run(), timeout_s)


def _not_heartbeat(ev: Any) -> bool:
    return ev.event != "heartbeat"


# -- SSE ------------------------------------------------------------------------------------------


async def test_sse_snapshot_then_states_live_changes_filters_and_no_resume_token(store: Store, redis_url: str) -> None:
    feed = await _seed(store)
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        await _node_has(app, "e2", 1)
        async with c.stream("GET", "/v1/stream?sport=soccer") as r1, c.stream("GET", "/v1/stream?event=e2") as r2:
            soccer, tennis = SSEReader(r1), SSEReader(r2)
            snap = await soccer.next()
            assert snap.event == "snapshot" and {m["market_id"] for m in snap.data["markets"]} == {"m1", "m2", "m4"}
            token = soccer.last_id
            assert token is not None
            st = await soccer.next()  # the state of each event among the snapshot's markets: e1 only (e3 has none)
            assert st.event == "event_state" and st.id is None and soccer.last_id == token
            es = st.data["event_state"]
            assert (st.data["type"], es["event_id"], es["version"], es["score"], es["stale"]) == \
                ("event_state", "e1", 1, {"home": 0, "away": 0, "periods": []}, False)
            assert isinstance(es["age_ms"], int) and isinstance(st.data["sent_at"], int)
            assert es["clock"]["running"] is True and es["clock"]["seconds"] == 600
            snap2 = await tennis.next()
            assert [m["market_id"] for m in snap2.data["markets"]] == ["m3"]
            st2 = await tennis.next()
            assert st2.event == "event_state" and st2.data["event_state"]["event_id"] == "e2"

            # live: the tennis state is written first, and never reaches the soccer stream
            await store.apply_event_states([_state("e2", 2, 1, 0)])
            await store.apply_event_states([_state("e1", 2, 1, 0)])
            goal = await soccer.until(_not_heartbeat)
            assert goal.event == "event_state" and goal.id is None
            assert (goal.data["event_state"]["event_id"], goal.data["event_state"]["version"],
                    goal.data["event_state"]["score"]["home"]) == ("e1", 2, 1)
            other = await tennis.until(_not_heartbeat)
            assert (other.data["event_state"]["event_id"], other.data["event_state"]["version"]) == ("e2", 2)
            assert soccer.last_id == token, "an event_state does not move the resume position"
            # a delta still moves it, and the stream after the state is the ordinary one
            await feed.write(feed.price("m1", "1", 2.5))
            d = await soccer.until(_not_heartbeat)
            assert d.event == "delta" and d.id is not None and soccer.last_id == d.id != token
            # e3 gets its first state: the soccer stream has its market (m4)
            await store.apply_event_states([_state("e3", 1)])
            e3 = await soccer.until(_not_heartbeat)
            assert e3.event == "event_state" and e3.data["event_state"]["event_id"] == "e3"


async def test_sse_resume_recovered_resends_the_current_states(store: Store, redis_url: str) -> None:
    feed = await _seed(store)
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        await _node_has(app, "e1", 1)
        async with c.stream("GET", "/v1/stream?sport=soccer") as r:
            sse = SSEReader(r)
            assert (await sse.next()).event == "snapshot"
            assert (await sse.next()).data["event_state"]["version"] == 1
            token = sse.last_id
        # while away: a goal and a price
        await store.apply_event_states([_state("e1", 2, 0, 1)])
        await _node_has(app, "e1", 2)
        (d,) = await feed.write(feed.price("m2", "1", 3.3))
        # the node has read the price (else the resume has nothing to replay and it comes live, after the state)
        await eventually(lambda: app.state.node.state.markets["m2"].seq >= d.seq, TIMEOUT_S, "the node holding the price")
        async with c.stream("GET", "/v1/stream?sport=soccer", headers={"Last-Event-ID": token}) as r:
            sse = SSEReader(r)
            resumed = await sse.next()
            assert resumed.event == "resumed" and resumed.data["recovered"] is True
            missed = await sse.next()
            assert missed.event == "delta" and missed.data["market_id"] == "m2"
            state = await sse.next()
            assert state.event == "event_state" and state.id is None
            assert (state.data["event_state"]["event_id"], state.data["event_state"]["version"],
                    state.data["event_state"]["score"]["away"]) == ("e1", 2, 1)
            assert sse.last_id == missed.id


# -- WebSocket ------------------------------------------------------------------------------------


async def test_ws_snapshot_states_filters_live_and_resume(store: Store, redis_url: str) -> None:
    feed = await _seed(store)
    app = make_app(redis_url)
    async with serve(app) as base:
        await _node_has(app, "e2", 1)
        url = base.replace("http://", "ws://") + "/v1/ws"
        async with connect(url) as ws:
            r = WSReader(ws)
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"sport": "soccer"}}))
            assert await r.next() == {"type": "ack", "id": 1, "sub": 1}
            snap = await r.next()
            assert snap["type"] == "snapshot" and snap["sub"] == 1
            token = snap["token"]
            st = await r.next()
            assert st["type"] == "event_state" and st["sub"] == 1 and "token" not in st
            assert list(st) == ["sub", "type", "event_state", "sent_at"]
            assert st["event_state"]["event_id"] == "e1"
            await ws.send(json.dumps({"op": "subscribe", "id": 2, "filter": {"event": "e2"}}))
            await r.next(lambda m: m["type"] == "ack")
            snap2 = await r.next()
            assert snap2["sub"] == 2 and [m["market_id"] for m in snap2["markets"]] == ["m3"]
            st2 = await r.next()
            assert (st2["type"], st2["sub"], st2["event_state"]["event_id"]) == ("event_state", 2, "e2")
            # live: each goes to the subscription that sees its event, and only there
            await store.apply_event_states([_state("e2", 2, 0, 1)])
            got = await r.next()
            assert (got["type"], got["sub"], got["event_state"]["event_id"], got["event_state"]["version"]) == \
                ("event_state", 2, "e2", 2)
            await store.apply_event_states([_state("e1", 2, 2, 0)])
            got = await r.next()
            assert (got["type"], got["sub"], got["event_state"]["event_id"], got["event_state"]["version"]) == \
                ("event_state", 1, "e1", 2)
            assert "token" not in got
        # resume sub 1 from its snapshot's token: recovered, the missed delta, then the current state
        await store.apply_event_states([_state("e1", 3, 3, 0)])
        await _node_has(app, "e1", 3)
        (d,) = await feed.write(feed.price("m1", "1", 2.7))
        await eventually(lambda: app.state.node.state.markets["m1"].seq >= d.seq, TIMEOUT_S, "the node holding the price")
        async with connect(url) as ws:
            r = WSReader(ws)
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"sport": "soccer"}, "resume": token}))
            await r.next(lambda m: m["type"] == "ack")
            resumed = await r.next()
            assert resumed["type"] == "resumed" and resumed["recovered"] is True
            delta = await r.next()
            assert delta["type"] == "delta" and delta["market_id"] == "m1" and "token" in delta
            state = await r.next()
            assert (state["type"], state["event_state"]["event_id"], state["event_state"]["version"]) == \
                ("event_state", "e1", 3)


async def test_a_market_that_newly_matches_brings_its_events_state(store: Store, redis_url: str) -> None:
    """Under ``in_play=true``: the event's state comes while its markets are pre-match (not sent:
    nothing of it matches yet); when they turn in play, their images and then the state follow. And a
    state that reaches the node before its event's first market comes with that market's image."""
    feed = Feed(store)
    await feed.write(feed.image("p1", sport="soccer", event="e7", in_play=False))
    await _health(store)
    app = make_app(redis_url)
    async with serve(app) as base:
        url = base.replace("http://", "ws://") + "/v1/ws"
        async with connect(url) as ws:
            r = WSReader(ws)
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"in_play": True}}))
            await r.next(lambda m: m["type"] == "ack")
            assert (await r.next())["markets"] == []
            await store.apply_event_states([_state("e7", 1)])
            await _node_has(app, "e7", 1)
            await feed.write(feed.header("p1", in_play=True))
            image = await r.next()
            assert image["type"] == "delta" and image["kind"] == "image" and image["market_id"] == "p1"
            state = await r.next()
            assert (state["type"], state["event_state"]["event_id"]) == ("event_state", "e7")
            # a state first, its event's first market after
            await store.apply_event_states([_state("e8", 1)])
            await _node_has(app, "e8", 1)
            await feed.write(feed.image("p2", sport="soccer", event="e8", in_play=True))
            image = await r.next()
            assert image["type"] == "delta" and image["market_id"] == "p2"
            state = await r.next()
            assert (state["type"], state["event_state"]["event_id"]) == ("event_state", "e8")


# -- tenants --------------------------------------------------------------------------------------

TENANTS = """
[tenant.acme]
keys = ["acme-key"]
sports = ["soccer"]

[tenant.bolt]
keys = ["bolt-key"]
sources = ["t"]
"""


async def test_a_tenant_never_gets_the_state_of_an_event_it_cannot_see(store: Store, redis_url: str,
                                                                        tmp_path: Path) -> None:
    feed = await _seed(store)
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    settings = Settings(heartbeat_ms=60_000, tenants_file=str(path))
    app = make_app(redis_url, settings=settings)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        await _node_has(app, "e2", 1)
        async with c.stream("GET", "/v1/stream", headers={"X-API-Key": "acme-key"}) as r1, \
                c.stream("GET", "/v1/stream", headers={"X-API-Key": "bolt-key"}) as r2:
            acme, bolt = SSEReader(r1), SSEReader(r2)
            snap = await acme.next()
            assert {m["market_id"] for m in snap.data["markets"]} == {"m1", "m2", "m4"}  # no tennis
            first = await acme.next()
            assert first.event == "event_state" and first.data["event_state"]["event_id"] == "e1"
            snap = await bolt.next()
            assert len(snap.data["markets"]) == 4
            states = {(await bolt.next()).data["event_state"]["event_id"] for _ in range(2)}
            assert states == {"e1", "e2"}
            # the tennis event's state is written first: acme never gets it
            await store.apply_event_states([_state("e2", 2, 1, 1)])
            await store.apply_event_states([_state("e1", 2, 1, 0)])
            ev = await acme.until(_not_heartbeat)
            assert (ev.event, ev.data["event_state"]["event_id"]) == ("event_state", "e1")
            # e1's markets move out of acme's sight: removed, and e1's later states never reach acme
            await feed.write(feed.header("m1", sport="tennis"), feed.header("m2", sport="tennis"))
            gone = {(await acme.until(_not_heartbeat)).data["market_id"] for _ in range(2)}
            assert gone == {"m1", "m2"}
            await store.apply_event_states([_state("e1", 3, 2, 0)])
            await _node_has(app, "e1", 3)
            # a state of a source bolt may not see, for an event whose markets it sees (e3: source t)
            await store.apply_event_states([_state("e3", 1, source="elsewhere")])
            await _node_has(app, "e3", 1)
            await feed.write(feed.price("m4", "1", 4.4))  # a marker after both

            async def until_marker(sse: SSEReader) -> list[tuple[str, str | None]]:
                seen = []
                while True:
                    ev = await sse.until(_not_heartbeat)
                    if ev.event == "delta" and ev.data["market_id"] == "m4":
                        return seen
                    seen.append((ev.event, ev.data.get("event_state", {}).get("event_id")))
            assert await until_marker(acme) == [("event_state", "e3")]  # not e1 (v3) any more
            seen = await until_marker(bolt)
            assert ("event_state", "e3") not in seen and ("event_state", "e1") in seen, seen


# -- a held state turning stale / fresh: status stale_events ----------------------------------------


async def _confirms(store: Store, state: str = "UP", silent_ms: int = 0) -> None:
    """Source ``t``'s health, its last message ``silent_ms`` ago; its stale limit 30 s."""
    t = now_ms()
    await store.set_health(SourceHealth(source="t", kind="push", state=state,  # type: ignore[arg-type]
                                        reason=None if state == "UP" else "silent", last_message_at=t - silent_ms,
                                        updated_at=t, lease_ms=600_000, stale_after_ms=30_000))


async def _seed_quiet(store: Store) -> None:
    """m1 (soccer, e1) and m3 (tennis, e2), in play; the states of e1 and e2 received two minutes
    ago: fresh only while their source confirms them (its last message)."""
    feed = Feed(store)
    await feed.write(feed.image("m1", sport="soccer", event="e1", in_play=True),
                     feed.image("m3", sport="tennis", event="e2", in_play=True))
    await _confirms(store)
    old = now_ms() - 120_000
    await store.apply_event_states([_state("e1", 1, at=old), _state("e2", 1, at=old)])


def _status_of_t(ev: Any) -> bool:
    return ev.event == "status" and ev.data["source"] == "t"


async def test_a_held_state_turning_stale_and_fresh_is_announced_in_status(store: Store, redis_url: str) -> None:
    """A state the client holds turns stale without a new state (its source DEGRADED and silent
    past its stale limit): the source's ``status`` lists it in ``stale_events`` — for the
    subscription that gets the event's states only (tennis: e2, soccer: e1) — a recovered resume
    is told again, and the next status once the source confirms again lists it no more."""
    await _seed_quiet(store)
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        await _node_has(app, "e2", 1)
        async with c.stream("GET", "/v1/stream?sport=soccer") as r1, c.stream("GET", "/v1/stream?sport=tennis") as r2:
            soccer, tennis = SSEReader(r1), SSEReader(r2)
            assert (await soccer.next()).event == "snapshot"
            st = await soccer.until(lambda ev: ev.event == "event_state")
            assert (st.data["event_state"]["event_id"], st.data["event_state"]["stale"]) == ("e1", False)
            token = soccer.last_id
            await _confirms(store, "DEGRADED", silent_ms=120_000)
            said = await soccer.until(lambda ev: _status_of_t(ev) and ev.data.get("stale_events"), 20)
            assert (said.data["state"], said.data["stale_events"]) == ("DEGRADED", ["e1"])
            said = await tennis.until(lambda ev: _status_of_t(ev) and ev.data.get("stale_events"), 20)
            assert said.data["stale_events"] == ["e2"]
        # a recovered resume is told the current status: e1 still stale
        async with c.stream("GET", "/v1/stream?sport=soccer", headers={"Last-Event-ID": token}) as r:
            sse = SSEReader(r)
            resumed = await sse.next()
            assert resumed.event == "resumed" and resumed.data["recovered"] is True
            said = await sse.until(_status_of_t, 20)
            assert said.data["stale_events"] == ["e1"] and said.id is None
            # the source confirms again: fresh, announced
            await _confirms(store, "UP")
            said = await sse.until(lambda ev: _status_of_t(ev) and ev.data["state"] == "UP", 20)
            assert said.data["stale_events"] == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_the_python_client_follows_stale_events(store: Store, redis_url: str, transport: str) -> None:
    """``event_state_stale`` turns true when a status lists the held state in ``stale_events`` (no
    new state comes: the state's own ``stale`` stays false) and false again when the next does not;
    and true while the client follows no live stream."""
    await _seed_quiet(store)
    app = make_app(redis_url)
    async with serve(app) as base:
        await _node_has(app, "e1", 1)
        url = base if transport == "sse" else base.replace("http://", "ws://")
        client = OddsClient(url, sport="soccer", heartbeat_ms=500)
        await client.start()
        try:
            await eventually(lambda: "e1" in client.event_states, TIMEOUT_S, "e1's state in the client")
            assert client.event_state_stale("e1") is False
            await _confirms(store, "DEGRADED", silent_ms=120_000)
            await eventually(lambda: client.event_state_stale("e1"), 20, "e1 stale by its source's status")
            assert client.event_states["e1"].stale is False and client.event_states["e1"].version == 1
            assert client.sources["t"].state == "DEGRADED"
            await _confirms(store, "UP")
            await eventually(lambda: not client.event_state_stale("e1"), 20, "e1 fresh again by the next status")
        finally:
            await client.close()
        assert client.event_state_stale("e1")  # no live stream


# -- slow consumers -------------------------------------------------------------------------------

PRICES = {str(i): 2.0 + i / 10 for i in range(40)}  # a big market (~5 KB per image)


def _collapse_hub() -> tuple[Hub, NodeState, EventStates, Feed]:
    from feed.book import Book

    st = NodeState(Settings(), 1, NodeOptions())
    feed = Feed(None)  # type: ignore[arg-type]
    book = Book()
    for d in [book.apply(feed.image(f"m{i}", event=f"e{i % 2}")) for i in range(4)]:
        assert d is not None
    st.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    held = EventStates()
    hub = Hub(st, None, outbox_max_bytes=1 << 20, event_states=held)
    held.listeners.append(hub.event_states_changed)
    return hub, st, held, feed


async def test_the_collapse_keeps_the_latest_state_per_event() -> None:
    """Without sockets: live states are stream data; collapsing the queue keeps one per
    (subscription, event), the latest, in its place: before a ``status`` queued after it (whose
    ``stale_events`` is the later word on its staleness); control messages stay."""
    hub, st, held, _ = _collapse_hub()
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter())
    await hub.subscribe(conn, Filter.parse(event="e1"))
    conn.take()
    for v in range(1, 30):
        held.apply(f"{v}-0", [_state("e0", v), _state("e1", v)])
    assert conn.control_bytes == 0 and conn.outbox_bytes > 0  # counted as stream data, not control
    # sub 1 sees e0 and e1, sub 2 only e1: 29 versions each
    assert sum(type(m) is StateMeta for m in conn.meta) == 29 * 3
    # then both states turn stale (announced by the node's health refresh): each subscription is told
    # of the events whose states it gets
    hub.status("t", "DEGRADED", "silent", [], stale_events=["e0", "e1"])
    hub.collapse(conn)
    metas = [m for m in conn.meta if type(m) is StateMeta]
    assert sorted((m.sid, m.event_id) for m in metas) == [(1, "e0"), (1, "e1"), (2, "e1")]
    msgs = [msgspec.json.decode(f) for f in conn.take()]
    states = [m for m in msgs if m["type"] == "event_state"]
    assert {(m["sub"], m["event_state"]["event_id"], m["event_state"]["version"]) for m in states} == \
        {(1, "e0", 29), (1, "e1", 29), (2, "e1", 29)}
    assert [(m["sub"], m["stale_events"]) for m in msgs if m["type"] == "status"] == [(1, ["e0", "e1"]), (2, ["e1"])]
    # the collapse kept the order: the (not stale) states first, the status that says stale last
    assert [m["type"] for m in msgs] == ["event_state"] * 3 + ["status"] * 2
    # a slow-consumer resync snapshot is followed by the current states
    conn.resync_pending = True
    types = [(m["type"], m.get("sub")) for m in (msgspec.json.decode(f) for f in conn.take())]
    assert types == [("snapshot", 1), ("event_state", 1), ("event_state", 1), ("snapshot", 2), ("event_state", 2)]
    hub.close_all()


def _reader(s: socket.socket, buf: bytearray, stop: threading.Event) -> None:
    s.settimeout(0.2)
    while not stop.is_set():
        try:
            b = s.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            return
        if not b:
            return
        buf.extend(b)


async def test_a_slow_consumer_keeps_the_latest_state(store: Store, redis_url: str) -> None:
    """An SSE client that stops reading (raw socket, 4 KiB receive buffer) while big markets change
    and an event's score changes 60 times: its queue is collapsed (never over the budget, never
    closed), and when it reads again it gets the latest state — fewer messages, none lost."""
    feed = Feed(store)
    big = [f"big{i}" for i in range(4)]
    await feed.write(*(feed.image(mid, prices=PRICES, event="ebig") for mid in big),
                     feed.image("s1", sport="soccer", event="e1", in_play=True))
    await _health(store)
    await store.apply_event_states([_state("e1", 1)])
    budget = 64 * 1024
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, outbox_max_bytes=budget), send_timeout_s=60.0)
    async with serve(app) as base:
        hub = app.state.node.hub
        await _node_has(app, "e1", 1)
        port = int(base.rsplit(":", 1)[1])
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: hub.subscriptions == 1, TIMEOUT_S, "the slow stream subscribed")
        (conn,) = hub.connections
        versions = 60
        peak = 0
        for i in range(300):  # ~20 KB per write, ~6 MB in all: far more than the socket buffers hold
            prices = {k: v + (i + 1) / 100 for k, v in PRICES.items()}
            await feed.write(*(feed.image(mid, prices=prices, event="ebig") for mid in big))
            if i % 5 == 4:
                await store.apply_event_states([_state("e1", i // 5 + 2, home=i // 5 + 1)])
            peak = max(peak, conn.outbox_bytes)
            await asyncio.sleep(0.002)
        last = versions + 1
        await _node_has(app, "e1", last)
        assert hub.collapses >= 1, "the slow consumer's queue was collapsed"
        assert peak <= budget and not conn.closed and hub.slow_closes == 0
        assert conn.control_bytes < budget  # live states are not control messages (unbounded there)
        buf = bytearray()
        stop = threading.Event()
        reading = threading.Thread(target=_reader, args=(s, buf, stop), daemon=True)
        reading.start()
        pattern = re.compile(rb"event: event_state\ndata: (\{.*?\})\n\n")
        try:
            def latest() -> bool:
                got = [json.loads(m)["event_state"] for m in pattern.findall(bytes(buf))]
                return any(g["event_id"] == "e1" and g["version"] == last for g in got)
            await eventually(latest, 30, "the latest state read by the slow consumer")
            states = [json.loads(m)["event_state"] for m in pattern.findall(bytes(buf))]
        finally:
            stop.set()
            await asyncio.to_thread(reading.join, 5)
            s.close()
        e1 = [g["version"] for g in states if g["event_id"] == "e1"]
        assert e1 == sorted(e1) and e1[-1] == last
        assert len(e1) < last, f"collapsed states arrive as the latest only ({len(e1)} of {last} versions)"
        assert b"event: error" not in buf


# -- the Python client ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_the_python_client_keeps_event_states(store: Store, redis_url: str, transport: str) -> None:
    await _seed(store)
    app = make_app(redis_url)
    async with serve(app) as base:
        await _node_has(app, "e2", 1)
        taken: list[ServedEventState] = []
        url = base if transport == "sse" else base.replace("http://", "ws://")
        client = OddsClient(url, sport="soccer", heartbeat_ms=500, on_event_state=taken.append)
        await client.start()
        try:
            await eventually(lambda: "e1" in client.event_states, TIMEOUT_S, "e1's state in the client")
            assert set(client.event_states) == {"e1"}  # e2 is tennis
            es = client.event_states["e1"]
            assert (es.version, es.stale, taken[-1].event_id) == (1, False, "e1")
            assert client.match_time_s("e1", es.clock.at + 2_500) == 602.5  # type: ignore[union-attr]
            assert client.match_time_s("e1") >= 600  # type: ignore[operator]
            assert client.match_time_s("e3") is None and client.event_state_stale("e3")
            token = client.token
            at = now_ms()
            await store.apply_event_states([_state("e1", 2, 1, 0, running=False, seconds=2700, at=at)])
            await eventually(lambda: client.event_states["e1"].version == 2, TIMEOUT_S, "the goal")
            assert client.match_time_s("e1", at + 60_000) == 2700.0  # a stopped clock does not run
            assert client.token == token  # no resume token on event_state
            # an older version changes nothing
            old = msgspec.json.encode({"type": "event_state", "event_state": _state("e1", 1), "sent_at": at})
            client._on_message(old, time.monotonic(), None)
            assert client.event_states["e1"].version == 2 and len(taken) == 2
            # its source goes DOWN: the state reads stale
            await _health(store, state="DOWN")
            await eventually(lambda: client.event_state_stale("e1"), TIMEOUT_S, "stale once its source is DOWN")
        finally:
            await client.close()


def test_a_state_not_started_past_its_events_start_is_judged_by_the_in_play_limit() -> None:
    """A NOT_STARTED state 25 s old at kick-off + 20 s read fresh by the pre-match limit (60 s)
    while its event's markets were already judged in play (their start_time came): the state
    follows them (in-play limit 10 s). Before the start it keeps the pre-match limit; a final
    state never ages."""
    from feed.models import Market

    now = int(time.time() * 1000)
    h = SourceHealth(source="px", state="UP", updated_at=now, last_message_at=0)
    for start, stale in ((now - 20_000, True), (now + 600_000, False)):
        m = Market(market_id="px:f1:ml", source="px", event_id="px:f1", sport="soccer", start_time=start,
                   received_at=now - 25_000)
        st = NodeState(Settings(stale_in_play_ms=10_000, stale_pre_match_ms=60_000), 1, NodeOptions())
        st.replace_partitions({0: ("0-0", [m])}, "e")
        st.set_health([h], now=now)
        es = EventState(event_id="px:f1", source="px", status="NOT_STARTED", received_at=now - 25_000)
        assert EventStates().age_stale(es, st, now) == (25_000, stale), start - now
        final = msgspec.structs.replace(es, status="CLOSED")
        assert EventStates().age_stale(final, st, now)[1] is False
