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
from feed.models import DELTA_DECODER, MARKET_DECODER, SourceHealth, apply_delta
from feed.settings import Settings
from feed.store import Store, log_key
from streaming.encoding import encode_token
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, sans_as_of, serve

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
            t0 = now_ms()
            client = await (SSEClient(c) if transport == "sse" else WSClient(base)).open(token)
            try:
                resumed = await client.next()
                t1 = now_ms()
                assert resumed["type"] == "resumed" and resumed["recovered"] is case.recovered, resumed
                assert t0 <= resumed["as_of"] <= t1, (t0, resumed, t1)  # queued for this resume
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
async def test_resumed_carries_the_time_it_was_sent(redis_url: str, transport: str, ring: int) -> None:
    """Clients measure their stream's lag from (receipt − server send time), the least per
    connection. After a resume from the ring the first timed message was the oldest replayed delta,
    whose ``sent_at`` is when it was applied: the lag a slow client had when it dropped became the
    new connection's baseline (read as none), and old prices read fresh. ``resumed`` now carries
    ``as_of``: when the server queued it for this resume — from the ring and from Redis, SSE and WS."""
    store = await Store.open(redis_url)
    try:
        feed = Feed(store)
        app = make_app(store=store, replay_ring_entries=ring)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
            ids = await _write_entries(store, feed, 4)
            await _caught_up(c, ids[-1])
            await asyncio.sleep(0.3)  # the client is away: the missed deltas were sent before it comes back
            token = encode_token(store.epoch, [ids[1]]).decode()
            t0 = now_ms()
            client = await (SSEClient(c) if transport == "sse" else WSClient(base)).open(token)
            try:
                resumed = await client.next()
                t1 = now_ms()
                assert resumed["type"] == "resumed" and resumed["recovered"] is True, resumed
                assert type(resumed["as_of"]) is int and t0 <= resumed["as_of"] <= t1, (t0, resumed, t1)
                replayed = [await client.next() for _ in range(2)]
                assert [m["type"] for m in replayed] == ["delta", "delta"], replayed
                if ring:  # (the reason: a ring replay's deltas keep the time they were first sent)
                    assert all(m["sent_at"] < t0 - 200 for m in replayed), (t0, replayed)
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
            gate, waiting = asyncio.Event(), asyncio.Event()
            real = reader._read

            async def gated(*args: Any, **kwargs: Any) -> Any:
                waiting.set()
                await gate.wait()
                return await real(*args, **kwargs)
            reader._read = gated  # this node falls behind …
            await asyncio.wait_for(waiting.wait(), TIMEOUT_S)  # (its read in flight ended: the next one waits)
            ahead = await feed.write(feed.price("m1", "1", 5.5))  # … another node already sent this one
            token = encode_token(store.epoch, [await store.last_log_id(0)]).decode()
            client = await SSEClient(c).open(token)
            try:
                assert sans_as_of(await client.next()) == {"type": "resumed", "recovered": True}
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


def _sse_frames(frames: list[bytes]) -> list[tuple[str | None, dict[str, Any]]]:
    """(id or None, data) of each SSE event in ``frames`` (comments and retry lines skipped)."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    for block in b"".join(frames).split(b"\n\n"):
        eid, data = None, []
        for line in block.decode().split("\n"):
            if line.startswith("id: "):
                eid = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append((eid, json.loads("\n".join(data))))
    return out


@pytest.mark.parametrize("ladder", ["collapse", "resync"])
async def test_a_status_queued_for_a_slow_consumer_never_moves_its_resume_position_past_undelivered_deltas(
        ladder: str) -> None:
    """A change of m1 is queued for a client that is not reading, then a ``status`` (its source
    degraded). The client goes over its budget: a collapse moves the merged deltas after the
    control messages, a resync drops them for a snapshot — the status is kept ahead of them. It
    carried a resume token issued after the m1 change; a client whose stream broke right after the
    status resumed from it, ``recovered: true``, and never got the change (m1 at its old price,
    fresh). A live status carries no token now (as the statuses after a resume), so the client
    resumes from before the change and is replayed it."""
    from feed.book import Book
    from streaming.hub import Hub
    from streaming.state import Filter, NodeState

    st = NodeState(Settings(), 1)
    feed = Feed(None)  # type: ignore[arg-type]
    book = Book()
    for mid in ("m0", "m1", "m2"):
        book.apply(feed.image(mid))
    st.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    n = 2

    def write(mid: str, sel: str, price: float) -> None:
        nonlocal n
        d = book.apply(feed.price(mid, sel, price))
        assert d is not None
        entry = st.apply_entry(0, f"{n}-0", [d], now_ms())
        assert entry is not None
        n += 1
        hub.dispatch(entry)

    conn = hub.connect("sse", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter())
    ((token, snap),) = _sse_frames(conn.take())
    local = {m["market_id"]: m for m in snap["markets"]}
    write("m1", "1", 5.0)  # queued, not read
    hub.status("t", "DEGRADED", "upstream_503", [])
    assert conn.outbox and b"event: status" in conn.outbox[-1]
    conn.max_bytes = conn.outbox_bytes + 2_000
    price = 3.0
    while hub.collapses == 0 if ladder == "collapse" else not conn.resync_pending:
        price = round(price + 0.01, 2)
        write("m2" if ladder == "collapse" else f"m{n % 2 * 2}", "1", price)  # other markets only
        if ladder == "resync":
            conn.max_bytes = 600  # collapsing cannot bring it under half the budget
    events = _sse_frames(conn.take())
    # the client reads up to the status and its stream breaks there
    upto = next(i for i, (_, m) in enumerate(events) if m["type"] == "status")
    for eid, m in events[:upto + 1]:
        token = eid if eid is not None else token  # (the WHATWG rule: an event without id keeps the last)
        if m["type"] == "delta":
            local[m["market_id"]] = m
    again = hub.connect("sse", heartbeat_ms=60_000)
    await hub.subscribe(again, Filter(), resume=token)
    got = _sse_frames(again.take())
    assert sans_as_of(got[0][1]) == {"type": "resumed", "recovered": True}
    m1 = [m for _, m in got if m["type"] == "delta" and m["market_id"] == "m1"]
    assert m1 and m1[-1]["seq"] == st.markets["m1"].seq  # the change is replayed
    assert m1[-1]["selections"][0]["price"] == 5.0
    assert events[upto][0] is None  # the status moves no resume position
    hub.close_all()


@pytest.mark.parametrize("when", ["while_serving", "before_the_node_started"])
async def test_a_resume_from_redis_sends_the_moves_out_of_and_into_the_filter(redis_url: str, when: str) -> None:
    """A client filtered on competition c1 is away while m1 moves to competition c2 (and changes
    again) and m3 moves from c2 into c1, and for longer than the replay ring holds. Resumed from
    Redis, the replayed deltas were prepared with each change's keys after it only: the delta that
    took m1 out of the filter was not sent (recovered: true, the client kept m1 frozen and fresh)
    and m3's move in came as a delta of a market the client never held (ignored: m3 missing). As
    live and from the ring, the move out now reaches the client as ``removed`` (it drops m1 without
    judging the filter) and the move in brings m3 whole — also when the node started after the
    moves (it never saw them applied)."""
    store = await Store.open(redis_url)
    try:
        feed = Feed(store)
        await feed.write(feed.image("m1"), feed.image("m3"), feed.image("other"))
        await feed.write(feed.header("m3", competition="c2"))  # (Feed's images are all of c1)
        token = encode_token(store.epoch, [await store.last_log_id(0)]).decode()
        held = {mid: m for mid, m in feed.book.markets.items() if m.competition == "c1"}  # what the client holds

        async def moves() -> None:
            await feed.write(feed.header("m1", competition="c2"))  # m1 leaves the client's filter
            await feed.write(feed.price("m1", "1", 7.5))
            await feed.write(feed.price("m3", "1", 4.5))
            await feed.write(feed.header("m3", competition="c1"))  # m3 comes in
            await feed.write(feed.price("m3", "2", 8.5))
            for i in range(4):  # more entries than the ring holds
                await feed.write(feed.price("other", "1", 2.1 + i / 10))
        if when == "before_the_node_started":
            await moves()
        app = make_app(store=store, replay_ring_entries=2)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
            if when == "while_serving":
                await moves()
            await _caught_up(c, await store.last_log_id(0))
            async with c.stream("GET", "/v1/stream?competition=c1", headers={"Last-Event-ID": token}) as resp:
                sse = SSEReader(resp)
                first = await sse.next()
                assert sans_as_of(first.data) == {"type": "resumed", "recovered": True}, first
                book = dict(held)
                live = await feed.write(feed.price("other", "2", 9.9))
                while True:
                    ev = (await sse.next()).data
                    if ev["type"] == "removed":
                        book.pop(ev["market_id"], None)
                    if ev["type"] != "delta":
                        continue
                    d = DELTA_DECODER.decode(json.dumps(ev).encode())
                    cur = book.get(d.market_id)
                    if cur is None or d.kind == "image" or d.seq > cur.seq:  # (a client skips what it holds)
                        new = apply_delta(cur, d)
                        if new is not None:
                            book[d.market_id] = new
                    # the server says a move out of the filter (``removed``, never the delta that moved
                    # the market): the client judges no filter itself (it dropped a market that left c1
                    # here before the server said so, §72)
                    assert d.market_id not in book or book[d.market_id].competition == "c1", ev
                    if (d.market_id, d.seq) == ("other", live[0].seq):
                        break
            rest = {m["market_id"]: MARKET_DECODER.decode(json.dumps(m).encode())
                    for m in (await c.get("/v1/markets", params={"competition": "c1"})).json()["markets"]}
            assert sorted(book) == ["m3", "other"] == sorted(rest)
            node = app.state.node.state.markets
            assert book == {mid: node[mid] for mid in book}  # the server's (REST) book, field for field
            hub = app.state.node.hub
            assert hub.resumes["recovered"] == 1
            # (the node knew the keys before each move it applied; one started after them did not)
            assert {k[2] for k in hub._moves} == ({"m1", "m3"} if when == "while_serving" else set())
    finally:
        await store.close()


async def test_a_resume_from_redis_of_an_unfiltered_subscription_is_exactly_the_missed_deltas(redis_url: str) -> None:
    """A node started after markets' keys moved cannot know their keys before; a subscription
    whose filter selects on no key a change moves matched them before exactly as it does now: it
    gets the missed deltas as they were, not the market's current image ahead of them (which
    repeated the last delta's seq — the fault suite's serve_kill row counted a duplicate)."""
    store = await Store.open(redis_url)
    try:
        feed = Feed(store)
        await feed.write(feed.image("m1"), feed.image("other"))
        token = encode_token(store.epoch, [await store.last_log_id(0)]).decode()
        await feed.write(feed.header("m1", competition="c2"))
        await feed.write(feed.price("m1", "1", 7.5))
        await feed.write(feed.header("m1", market_type="MONEY_LINE"))
        for i in range(4):  # more entries than the ring holds
            await feed.write(feed.price("other", "1", 2.1 + i / 10))
        app = make_app(store=store, replay_ring_entries=2)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
            await _caught_up(c, await store.last_log_id(0))
            async with c.stream("GET", "/v1/stream", headers={"Last-Event-ID": token}) as resp:
                sse = SSEReader(resp)
                assert sans_as_of((await sse.next()).data) == {"type": "resumed", "recovered": True}
                live = await feed.write(feed.price("other", "2", 9.9))
                got = []
                while True:
                    ev = (await sse.next()).data
                    if ev["type"] in ("delta", "removed"):
                        got.append((ev["market_id"], ev.get("seq"), ev.get("kind")))
                    if ev["type"] == "delta" and (ev["market_id"], ev["seq"]) == ("other", live[0].seq):
                        break
        assert [g for g in got if g[0] == "m1"] == [("m1", 2, "delta"), ("m1", 3, "delta"), ("m1", 4, "delta")]
        assert [g[1] for g in got if g[0] == "other"] == [2, 3, 4, 5, 6]
    finally:
        await store.close()
