"""Reconnect storms: many clients resuming from the same token share ONE replay built from
the ring (no per-client work or copies beyond references), later ones extend it, a slow
consumer's queue holding it still collapses exactly, and new streams are admitted a batch
per event-loop turn. The full-size storm is ``benchmarks/reconnect_storm.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec
import pytest

from feed.book import Book
from feed.models import DELTA_DECODER, Market, apply_delta
from feed.settings import Settings
from feed.store import Store
from streaming.hub import Admission, Hub, ReplayBlock
from streaming.state import Filter, NodeOptions, NodeState
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, serve

pytestmark = pytest.mark.timeout(60)


def _load(st: NodeState, mids: list[str]) -> Book:
    feed = Feed(None)  # type: ignore[arg-type]
    book = Book()
    for i, mid in enumerate(mids):
        book.apply(feed.image(mid, sport="soccer" if i % 2 == 0 else "tennis", event=f"e{i % 3}"))
    st.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    return book


def _entry(st: NodeState, book: Book, entry_no: int, mids: list[str], price: float) -> Any:
    feed = Feed(None)  # type: ignore[arg-type]
    ds = [book.apply(feed.price(mid, "1", price)) for mid in mids]
    return st.apply_entry(0, f"{entry_no}-0", [d for d in ds if d is not None], now_ms())


def _sse_events(data: bytes) -> list[tuple[str, dict[str, Any], bytes]]:
    """(event, decoded data, raw data) of every SSE event in ``data``."""
    out = []
    for ev in data.split(b"\n\n"):
        if not ev:
            continue
        kind, raw = "message", b""
        for line in ev.split(b"\n"):
            name, _, value = line.partition(b": ")
            if name == b"event":
                kind = value.decode()
            elif name == b"data":
                raw = value
        out.append((kind, msgspec.json.decode(raw), raw))
    return out


def _rebuild(data: bytes, book: dict[str, Market]) -> list[str]:
    kinds = []
    for kind, _, raw in _sse_events(data):
        kinds.append(kind)
        if kind == "delta":
            d = DELTA_DECODER.decode(raw)
            book[d.market_id] = apply_delta(book.get(d.market_id), d)  # type: ignore[assignment]
    return kinds


async def test_resumes_from_one_token_share_one_replay_by_reference() -> None:
    st = NodeState(Settings(), 1, NodeOptions())
    mids = [f"m{i}" for i in range(6)]
    book = _load(st, mids)
    token0 = st.token.decode()
    at_token = dict(st.markets)
    for i in range(2, 60):
        _entry(st, book, i, mids[: 1 + i % 6], 2.0 + i / 100)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    conns = [hub.connect("sse", heartbeat_ms=60_000, label=f"c{i}") for i in range(200)]
    for c in conns:
        await hub.subscribe(c, Filter(), resume=token0)
    assert hub.resumes["recovered"] == 200
    assert (hub.replay_builds, hub.replay_shares, hub.replay_extends) == (1, 199, 0)
    first = conns[0].outbox
    assert len(first) == 2 and isinstance(conns[0].meta[1], ReplayBlock)  # resumed + ONE block of frames
    for c in conns[1:]:
        # the replay: the same objects (its `resumed` is each resume's own: its as_of is when it was queued)
        assert len(c.outbox) == len(first) and all(a is b for a, b in zip(c.outbox[1:], first[1:]))
        assert c.outbox[0].startswith(b"event: resumed\n")
    local = dict(at_token)
    assert _rebuild(b"".join(first), local)[0] == "resumed"
    assert local == st.markets  # the replay is exactly what was missed
    # later resumes from the same token: the shared replay is extended, never rebuilt or copied
    for i in range(60, 63):
        _entry(st, book, i, mids[:2], 3.0 + i / 100)
    late = hub.connect("sse", heartbeat_ms=60_000, label="late")
    await hub.subscribe(late, Filter(), resume=token0)
    assert (hub.replay_builds, hub.replay_extends) == (1, 1)
    assert late.outbox[1] is first[1] and len(late.outbox) == 3
    local = dict(at_token)
    _rebuild(b"".join(late.outbox), local)
    assert local == st.markets
    # a different filter is a replay of its own; one of them, again shared
    tennis = [hub.connect("sse", heartbeat_ms=60_000) for _ in range(3)]
    for c in tennis:
        await hub.subscribe(c, Filter.parse(sport="tennis"), resume=token0)
    assert hub.replay_builds == 2 and tennis[1].outbox[1] is tennis[0].outbox[1]
    local = {k: v for k, v in at_token.items() if v.sport == "tennis"}
    _rebuild(b"".join(tennis[2].outbox), local)
    assert local == {k: v for k, v in st.markets.items() if v.sport == "tennis"}
    # a replay over the byte budget is refused once, and the refusal is shared too
    small = Hub(st, None, outbox_max_bytes=2_000)
    for _ in range(3):
        c = small.connect("sse", heartbeat_ms=60_000)
        await small.subscribe(c, Filter(), resume=token0)
        kinds = [k for k, _, _ in _sse_events(b"".join(c.take()))]
        assert kinds == ["resumed", "snapshot"]
    assert small.resumes == {"recovered": 0, "not_recovered": 3} and small.replay_builds == 1
    hub.close_all()
    small.close_all()


async def test_a_slow_consumer_holding_a_shared_replay_collapses_exactly() -> None:
    st = NodeState(Settings(), 1, NodeOptions())
    mids = [f"m{i}" for i in range(4)]
    book = _load(st, mids)
    token0 = st.token.decode()
    at_token = dict(st.markets)
    for i in range(2, 40):
        _entry(st, book, i, mids, 2.0 + i / 100)
    hub = Hub(st, None, outbox_max_bytes=80_000)
    other = hub.connect("sse", heartbeat_ms=60_000)
    slow = hub.connect("sse", heartbeat_ms=60_000)
    for c in (other, slow):
        await hub.subscribe(c, Filter(), resume=token0)
    shared = other.outbox[1]
    replay_bytes = slow.outbox_bytes
    assert 0 < replay_bytes < 80_000 and slow.outbox[1] is shared
    other.take()
    i = 40
    while not hub.collapses:  # live deltas pile up behind the replay until the budget is hit
        hub.dispatch(_entry(st, book, i, mids, 3.0 + i / 100))
        other.take()
        i += 1
    assert not any(isinstance(m, ReplayBlock) for m in slow.meta)  # unpacked into merged frames
    local = dict(at_token)
    _rebuild(b"".join(slow.take()), local)
    assert local == st.markets
    assert other.outbox == [] and shared  # the shared block itself was never touched
    hub.close_all()


async def test_sse_clients_resuming_together_get_their_missed_deltas_from_one_replay(
        store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(*[feed.image(f"m{i}", event=f"e{i % 2}") for i in range(4)])
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream") as resp:
            sse = SSEReader(resp)
            snap = await sse.next()
            token = sse.last_id
        assert snap.event == "snapshot" and token
        missed = []
        for k in range(20):
            missed += await feed.write(feed.price(f"m{k % 4}", "1", 2.0 + k / 100), feed.price("m0", "2", 3.0 + k / 100))
        node = app.state.node

        async def caught_up() -> bool:
            return node.state.positions[0] != "0-0" and len(node.state.ring.entries) >= 20
        await eventually(caught_up, what="the node's ring holding the missed entries")

        async def resume() -> list[tuple[str, int]]:
            async with httpx.AsyncClient(base_url=base, timeout=10) as cc:
                async with cc.stream("GET", "/v1/stream", headers={"Last-Event-ID": token}) as r:
                    s = SSEReader(r)
                    ev = await s.next()
                    assert ev.event == "resumed" and ev.data["recovered"] is True
                    got = []
                    while len(got) < len(missed):
                        ev = await s.next()
                        if ev.event == "delta":
                            got.append((ev.data["market_id"], ev.data["seq"]))
                    return got

        results = await asyncio.gather(*(resume() for _ in range(40)))
        want = [(d.market_id, d.seq) for d in missed]
        assert all(r == want for r in results)
        hub = node.hub
        assert hub.replay_builds == 1 and hub.replay_shares + hub.replay_extends == 39


async def test_admission_lets_a_bounded_batch_through_per_loop_turn() -> None:
    loop = asyncio.get_running_loop()
    turn = 0
    running = True

    def tick() -> None:
        nonlocal turn
        turn += 1
        if running:
            loop.call_soon(tick)
    loop.call_soon(tick)
    adm = Admission(per_turn=16)
    entered: list[tuple[int, int]] = []

    async def client(i: int) -> None:
        await adm.enter()
        entered.append((i, turn))

    await asyncio.gather(*(client(i) for i in range(200)))
    running = False
    per_turn: dict[int, int] = {}
    for _, t in entered:
        per_turn[t] = per_turn.get(t, 0) + 1
    assert len(entered) == 200 and max(per_turn.values()) <= 16
    assert [i for i, _ in entered] == list(range(200))  # in arrival order
    assert adm.waited > 0
    # a cancelled waiter does not block the others
    blocked = Admission(per_turn=1)
    await blocked.enter()
    t1 = asyncio.create_task(blocked.enter())
    t2 = asyncio.create_task(blocked.enter())
    await asyncio.sleep(0)
    t1.cancel()
    await asyncio.wait_for(t2, 5)
