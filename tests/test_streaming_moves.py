"""A market that leaves a subscription's filter is sent as ``removed``; one that enters it as an image.

A change that moves a market out of what a subscription's filter selects (its competition, its
event — a provider event or a canonical ``ev:`` one, which the market's JSON does not carry —,
its market type, in play, its bookmaker) used to reach that subscription as the change's delta: the
client had to notice from the market's new fields that it left, and one that cannot judge the
filter (an ``ev:`` filter, a filter it does not implement) kept the market under the old filter,
confirmed by every heartbeat — another event's price read fresh. The server now says it: the
subscription gets ``removed`` carrying the tokens of the change that moved the market, on every
path (live, the replay ring, a Redis replay whether or not this node saw the move), and a market
that moves in still comes whole (an image). Hub and state without sockets, as
tests/test_streaming_hub.py does.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from feed.book import Book
from feed.models import DELTA_DECODER, Market, apply_delta
from feed.settings import Settings
from feed.store import StoredLink
from streaming.encoding import parse_stream_id
from streaming.hub import Hub
from streaming.state import Filter, NodeOptions, NodeState
from streaming_helpers import Feed, now_ms

PATHS = ["live", "ring", "redis", "redis_loaded_after"]


class _Log:
    """A store's delta log for Hub's Redis replay (log_range / first_log_id)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, list[Any]]] = []

    async def log_range(self, p: int, after: str, *, count: int | None = None) -> list[tuple[str, list[Any]]]:
        rows = [(eid, ds) for eid, ds in self.entries if parse_stream_id(eid) > parse_stream_id(after)]
        return rows[:count]

    async def first_log_id(self, p: int) -> str | None:
        return "1-0"


class _Node:
    """A one-partition node (its state, feed, book, log and hub); ``path`` says how a resume is
    served: from the ring (``live``, ``ring``) or from the log (``redis…``)."""

    def __init__(self, path: str, feed: Feed, *images: Any) -> None:
        ring = 0 if path.startswith("redis") else 10_000
        self.path = path
        self.st = NodeState(Settings(), 1, NodeOptions(replay_ring_entries=ring))
        self.book: Book = feed.book  # (the feed's headers start from the markets as they are)
        for u in images:
            self.book.apply(u)
        self.st.replace_partitions({0: ("1-0", list(self.book.markets.values()))}, "ep")
        self.log = _Log()
        self.hub = Hub(self.st, self.log, outbox_max_bytes=1 << 20)  # type: ignore[arg-type]
        self.n = 2
        #: entry id → (token before it, token after it)
        self.tokens: dict[str, tuple[str, str]] = {}

    def write(self, *updates: Any) -> None:
        """Apply ``updates`` as ONE log entry and dispatch it."""
        ds = [d for u in updates if (d := self.book.apply(u)) is not None]
        assert len(ds) == len(updates)
        eid = f"{self.n}-0"
        self.n += 1
        self.log.entries.append((eid, ds))
        before = self.st.token.decode()
        entry = self.st.apply_entry(0, eid, ds, now_ms())
        assert entry is not None
        self.tokens[eid] = (before, entry.token.decode())
        self.hub.dispatch(entry)

    def loaded_after(self) -> None:
        """As if the node loaded the partition after every entry so far (it never saw them applied)."""
        self.st.load_heads[0] = self.st.positions[0]


def _msgs(frames: list[bytes]) -> list[dict[str, Any]]:
    return [msgspec.json.decode(f) for f in frames]


def _apply(book: dict[str, Market], msgs: list[dict[str, Any]]) -> None:
    """A client that judges no filter: it drops what it is told is removed, nothing else."""
    for m in msgs:
        if m["type"] == "snapshot":
            book.clear()
            book.update({x["market_id"]: msgspec.convert(x, Market) for x in m["markets"]})
        elif m["type"] == "delta":
            d = DELTA_DECODER.decode(msgspec.json.encode(m))
            held = book.get(d.market_id)
            if held is None and d.kind != "image":
                continue  # a delta of a market it does not hold: ignored
            if held is None or d.kind == "image" or d.seq > held.seq:
                new = apply_delta(held, d)
                if new is not None:
                    book[d.market_id] = new
        elif m["type"] == "removed":
            book.pop(m["market_id"], None)


async def _run(node: _Node, f: Filter, moves: Any) -> tuple[list[dict[str, Any]], dict[str, Market]]:
    """Subscribe (WebSocket) with ``f``; make the ``moves`` live or while the client is away, then
    resume it along ``node.path``. Returns the stream messages after the snapshot / ``resumed``
    and the client's book at the end."""
    hub = node.hub
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, f)
    book: dict[str, Market] = {}
    start = _msgs(conn.take())
    assert [m["type"] for m in start] == ["ack", "snapshot"]
    _apply(book, start)
    if node.path == "live":
        moves()
        got = _msgs(conn.take())
    else:
        token = start[1]["token"]
        hub.disconnect(conn)
        moves()
        if node.path == "redis_loaded_after":
            node.loaded_after()
        conn = hub.connect("ws", heartbeat_ms=60_000)
        await hub.subscribe(conn, f, resume=token)
        got = _msgs(conn.take())
        assert [m["type"] for m in got[:2]] == ["ack", "resumed"] and got[1]["recovered"] is True, got[:3]
        got = got[2:]
    _apply(book, got)
    hub.disconnect(conn)
    return [m for m in got if m["type"] in ("delta", "removed")], book


def _said(msgs: list[dict[str, Any]]) -> list[tuple[str, str, str | None, str]]:
    return [(m["type"], m["market_id"], m.get("kind"), m["token"]) for m in msgs]


async def _resume_from(node: _Node, f: Filter, token: str) -> list[dict[str, Any]]:
    conn = node.hub.connect("ws", heartbeat_ms=60_000)
    await node.hub.subscribe(conn, f, resume=token)
    got = _msgs(conn.take())
    node.hub.disconnect(conn)
    assert [m["type"] for m in got[:2]] == ["ack", "resumed"] and got[1]["recovered"] is True, got[:3]
    return [m for m in got[2:] if m["type"] in ("delta", "removed")]


@pytest.mark.parametrize("path", PATHS)
async def test_a_market_that_changes_competition_is_removed_from_a_competition_stream(path: str) -> None:
    """Filtered on competition c1: m1 moves to c2 (then changes again), m3 moves from c2 into c1,
    and one entry moves m2 out while m3 changes. The client judges no filter (it only drops what it
    is told is removed): it ends with exactly the node's c1 markets. ``removed`` carries the tokens
    of the change that moved the market — the entry's own when it is the entry's last message for
    the subscription, the token before the entry otherwise — and a resume from it replays what
    followed, not the move again."""
    feed = Feed(None)  # type: ignore[arg-type]
    node = _Node(path, feed, feed.image("m1"), feed.image("m2"), feed.image("m3"))
    node.write(feed.header("m3", competition="c2"))
    f = Filter.parse(competition="c1")

    def moves() -> None:
        node.write(feed.header("m1", competition="c2"))  # 3-0: out
        node.write(feed.price("m1", "1", 7.5))  # 4-0: nothing for c1
        node.write(feed.header("m3", competition="c1"))  # 5-0: in, whole
        node.write(feed.header("m2", competition="c3"), feed.price("m3", "1", 4.5))  # 6-0: out, and a delta
    msgs, book = await _run(node, f, moves)
    t = node.tokens
    assert _said(msgs) == [
        ("removed", "m1", None, t["3-0"][1]),
        ("delta", "m3", "image", t["5-0"][1]),
        ("removed", "m2", None, t["6-0"][0]),  # (not the entry's last: the token before it)
        ("delta", "m3", "delta", t["6-0"][1]),
    ]
    assert all(m["reason"] == "not_visible" and set(m) == {"sub", "type", "market_id", "reason", "token"}
               for m in msgs if m["type"] == "removed")  # nothing of its new state
    assert book == {mid: m for mid, m in node.st.markets.items() if m.competition == "c1"}
    assert sorted(book) == ["m3"]
    # a resume from the removed's token: what followed the move, exactly
    after = await _resume_from(node, f, t["3-0"][1])
    assert _said(after) == _said(msgs)[1:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", ["event_id", "race_start"])
async def test_a_market_moved_to_another_canonical_event_is_removed_from_an_ev_stream(path: str, how: str) -> None:
    """Filtered on a canonical event (``ev:…``): a change of a market's header links it to another
    canonical event — its provider event corrected (a:e, linked to ev:A, becomes c:e, linked to
    ev:C), or a race's start time corrected (a Betfair race is its meeting's event id and its start:
    ``ev:bf:1/<start>``). The market's JSON carries no canonical id (for the race, not even another
    event id): only the server can tell the client it left, and now it does, with ``removed``, live
    and on a resume from the ring or from Redis; a market moved into the event comes as an image."""
    feed = Feed(None)  # type: ignore[arg-type]
    s1, s2 = 1_900_000_000_000, 1_900_000_600_000
    if how == "event_id":
        images = (feed.image("x1", event="a:e"), feed.image("x2", event="a:e"), feed.image("y1", event="c:e"))
        cid = "ev:A"
    else:
        images = tuple(feed.image(mid, sport="horse_racing", event="bf:1", start_time=st)
                       for mid, st in (("x1", s1), ("x2", s1), ("y1", s2)))
        cid = f"ev:bf:1/{s1}"
    node = _Node(path, feed, *images)
    if how == "event_id":
        node.st.set_links(1, {"a:e": StoredLink("ev:A", 1.0, "self"), "c:e": StoredLink("ev:C", 1.0, "self")}, {})
    assert sorted(m.market_id for m in node.st.matching(Filter.parse(event=cid))) == ["x1", "x2"]
    f = Filter.parse(event=cid)

    def moves() -> None:
        if how == "event_id":
            node.write(feed.header("x1", event_id="c:e"))  # out of ev:A
            node.write(feed.price("x1", "1", 7.5))
            node.write(feed.header("y1", event_id="a:e"))  # into ev:A
        else:
            node.write(feed.header("x1", start_time=s2))  # another race of the same meeting
            node.write(feed.price("x1", "1", 7.5))
            node.write(feed.header("y1", start_time=s1))
    msgs, book = await _run(node, f, moves)
    t = node.tokens
    assert _said(msgs) == [("removed", "x1", None, t["2-0"][1]), ("delta", "y1", "image", t["4-0"][1])]
    assert sorted(book) == ["x2", "y1"]
    assert book == {m.market_id: m for m in node.st.matching(f)}


@pytest.mark.parametrize("path", ["live", "ring"])
@pytest.mark.parametrize("key", ["in_play", "market_type", "bookmaker", "sport"])
async def test_a_market_that_leaves_any_key_of_the_filter_is_removed(path: str, key: str) -> None:
    """Every key a change moves: in play, market type, bookmaker (filters the Python client does
    not implement locally), sport. (A Redis replay cannot judge ``in_play`` and is not recovered.)"""
    feed = Feed(None)  # type: ignore[arg-type]
    node = _Node(path, feed, feed.image("m1", bookmaker="b1"), feed.image("m2", bookmaker="b1"))
    f, change = {
        "in_play": (Filter.parse(in_play=False), {"in_play": True}),
        "market_type": (Filter.parse(market_type="MATCH_ODDS"), {"market_type": "OVER_UNDER_25"}),
        "bookmaker": (Filter.parse(bookmaker="b1"), {"bookmaker": "b2"}),
        "sport": (Filter.parse(sport="soccer"), {"sport": "tennis"}),
    }[key]
    assert sorted(m.market_id for m in node.st.matching(f)) == ["m1", "m2"]
    msgs, book = await _run(node, f, lambda: (node.write(feed.header("m1", **change)),
                                                node.write(feed.price("m1", "1", 7.5))))
    assert _said(msgs) == [("removed", "m1", None, node.tokens["2-0"][1])]
    assert sorted(book) == ["m2"]


async def test_a_conflated_or_collapsed_market_that_left_the_filter_is_removed() -> None:
    """A change of m1 gathered in a conflation window, then m1 leaves competition c1: the window's
    one message for m1 is ``removed`` (not a merge of the two as a delta); the same for a slow
    consumer's collapsed queue."""
    feed = Feed(None)  # type: ignore[arg-type]
    node = _Node("live", feed, feed.image("m1"), feed.image("m2"))
    hub = node.hub
    f = Filter.parse(competition="c1")
    conflated = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conflated, f, conflate_ms=60_000)
    slow = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(slow, f)
    conflated.take()
    slow.take()
    node.write(feed.price("m1", "1", 2.2))
    node.write(feed.header("m1", competition="c2"))
    node.write(feed.price("m2", "1", 3.3))
    hub.flush_conflated(60_000)
    hub.collapse(slow)
    for conn in (conflated, slow):
        msgs = [m for m in _msgs(conn.take()) if m["type"] in ("delta", "removed")]
        assert [(m["type"], m["market_id"]) for m in msgs] == [("removed", "m1"), ("delta", "m2")], conn
    hub.close_all()


async def test_a_linker_relink_out_of_an_ev_stream_is_removed_and_a_resume_from_before_it_is_not_recovered() -> None:
    """The linker's relink (no log entry): a connected ``ev:`` subscription gets ``removed`` for the
    market it lost and an image of the one it gained; a resume from a token before the relink —
    the ring's or Redis' replay holds no trace of it — is not recovered: its snapshot is the event
    as it is now. (Unchanged by the move contract: the relink path already said it.)"""
    for path in ("ring", "redis"):
        feed = Feed(None)  # type: ignore[arg-type]
        node = _Node(path, feed, feed.image("x1", event="a:e"), feed.image("b1", event="b:e"), feed.image("z1", event="z:e"))
        node.st.set_links(1, {"a:e": StoredLink("ev:A", 1.0, "self"), "b:e": StoredLink("ev:A", 0.9, "fuzzy"),
                              "z:e": StoredLink("ev:Z", 1.0, "self")}, {})
        f = Filter.parse(event="ev:A")
        hub = node.hub
        conn = hub.connect("ws", heartbeat_ms=60_000)
        await hub.subscribe(conn, f)
        token = _msgs(conn.take())[1]["token"]
        moved = node.st.set_links(2, {"a:e": StoredLink("ev:A", 1.0, "self"), "b:e": StoredLink("ev:B", 1.0, "self"),
                                      "z:e": StoredLink("ev:A", 0.9, "fuzzy")}, {})
        hub.relinked(moved)
        got = [m for m in _msgs(conn.take()) if m["type"] in ("delta", "removed")]
        assert [(m["type"], m["market_id"], m.get("kind")) for m in got] == [
            ("removed", "b1", None), ("delta", "z1", "image")]
        hub.disconnect(conn)
        node.write(feed.price("x1", "1", 2.4))
        conn = hub.connect("ws", heartbeat_ms=60_000)
        await hub.subscribe(conn, f, resume=token)
        again = _msgs(conn.take())
        assert [m["type"] for m in again[:3]] == ["ack", "resumed", "snapshot"] and again[1]["recovered"] is False
        assert sorted(m["market_id"] for m in again[2]["markets"]) == ["x1", "z1"]
        hub.close_all()


@pytest.mark.parametrize("path", ["ring", "redis"])
async def test_a_token_from_a_node_that_had_not_adopted_a_relink_yet_is_not_recovered_on_one_that_had(
        path: str) -> None:
    """Nodes adopt the linker's links each on its own, at different log positions. Node B adopts a
    relink (b1 leaves ev:A) before node A does; entries follow; a client of A subscribed to ev:A
    takes a token past B's relink and resumes on B. B's mark is by its own positions, so the
    token reads as issued after the relink — and the client, which A never sent the ``removed``,
    kept b1 under ev:A, confirmed fresh by B's heartbeats. Tokens now carry the links version
    their node served under: B does not resume a token issued under links older than its
    relink of that event as recovered."""
    a, b, feed, both = _two_nodes(path, ("x1", "a:e"), ("b1", "b:e"))
    for node in (a, b):
        node.st.set_links(1, _V1, {})
    both(feed.price("x1", "1", 2.2))
    b.hub.relinked(b.st.set_links(2, _V2, {}))  # B adopts the relink (b1 leaves ev:A); A not yet
    both(feed.price("x1", "1", 2.3))
    f = Filter.parse(event="ev:A")
    conn = a.hub.connect("ws", heartbeat_ms=60_000)
    await a.hub.subscribe(conn, f)
    start = _msgs(conn.take())
    assert sorted(m["market_id"] for m in start[1]["markets"]) == ["b1", "x1"]  # A: b1 still in ev:A
    both(feed.price("x1", "1", 2.4))
    token = _msgs(conn.take())[-1]["token"]  # past B's relink, issued under links version 1
    a.hub.disconnect(conn)
    both(feed.price("x1", "1", 2.5))
    conn = b.hub.connect("ws", heartbeat_ms=60_000)
    await b.hub.subscribe(conn, f, resume=token)
    again = _msgs(conn.take())
    assert [m["type"] for m in again[:3]] == ["ack", "resumed", "snapshot"] and again[1]["recovered"] is False
    assert [m["market_id"] for m in again[2]["markets"]] == ["x1"]
    # a token B issued itself (under version 2) resumes on B as recovered
    both(feed.price("x1", "1", 2.6))
    token = _msgs(conn.take())[-1]["token"]
    b.hub.disconnect(conn)
    both(feed.price("x1", "1", 2.7))
    conn = b.hub.connect("ws", heartbeat_ms=60_000)
    await b.hub.subscribe(conn, f, resume=token)
    again = _msgs(conn.take())
    assert [m["type"] for m in again[:2]] == ["ack", "resumed"] and again[1]["recovered"] is True
    assert [(m["type"], m["market_id"]) for m in again[2:] if m["type"] == "delta"] == [("delta", "x1")]
    a.hub.close_all()
    b.hub.close_all()


def _two_nodes(path: str, *markets: tuple[str, str]) -> tuple[_Node, _Node, Feed, Any]:
    """Nodes A and B on one log (each market id → its provider event), and ``both(*updates)``:
    one log entry, applied by both."""
    feed = Feed(None)  # type: ignore[arg-type]
    a = _Node(path, feed, *(feed.image(mid, event=ev) for mid, ev in markets))
    other = Feed(None)  # type: ignore[arg-type]
    b = _Node(path, other, *(other.image(mid, event=ev) for mid, ev in markets))

    def both(*updates: Any) -> None:
        a.write(*updates)
        eid, ds = a.log.entries[-1]
        b.log.entries.append((eid, ds))
        entry = b.st.apply_entry(0, eid, ds, now_ms())
        assert entry is not None
        b.hub.dispatch(entry)
    return a, b, feed, both


_V1 = {"a:e": StoredLink("ev:A", 1.0, "self"), "b:e": StoredLink("ev:A", 0.9, "fuzzy")}
_V2 = {"a:e": StoredLink("ev:A", 1.0, "self"), "b:e": StoredLink("ev:B", 1.0, "self")}


@pytest.mark.parametrize("path", ["ring", "redis"])
@pytest.mark.parametrize("held_by", ["collapse", "conflation"])
async def test_no_token_names_new_links_ahead_of_the_relinks_removed(path: str, held_by: str) -> None:
    """A adopts a relink (b1 leaves ev:A) while its client's messages are held — a slow consumer's
    collapse, or a conflation window. The tokens handed out ahead of b1's ``removed`` (the frame
    before it in the collapse; the heartbeat while the window holds it) named the NEW links, so a
    client that got them and not the ``removed`` resumed on B (which adopted the same relink at
    an earlier position) recovered, and kept b1 under ev:A, fresh. The relink's messages now go
    with the token from before it."""
    a, b, feed, both = _two_nodes(path, ("x1", "a:e"), ("b1", "b:e"))
    for node in (a, b):
        node.st.set_links(1, _V1, {})
    f = Filter.parse(event="ev:A")
    conn = a.hub.connect("ws", heartbeat_ms=60_000)
    if held_by == "collapse":
        await a.hub.subscribe(conn, f)
        conn.take()
    b.hub.relinked(b.st.set_links(2, _V2, {}))  # B adopts first (an earlier log position)
    both(feed.price("x1", "1", 2.3))  # (collapse: a frame ahead of the removed)
    if held_by == "conflation":
        await a.hub.subscribe(conn, f, conflate_ms=60_000)
        conn.take()
    a.hub.relinked(a.st.set_links(2, _V2, {}))  # b1's removed queued after x1's change, or held by the window
    if held_by == "collapse":
        a.hub.collapse(conn)
        token = _msgs(conn.take())[0]["token"]  # the client got the first frame, then the link dropped
    else:
        a.hub.heartbeat([conn])
        token = [m for m in _msgs(conn.take()) if m["type"] == "heartbeat"][-1]["token"]
    a.hub.disconnect(conn)
    conn = b.hub.connect("ws", heartbeat_ms=60_000)
    await b.hub.subscribe(conn, f, resume=token)
    again = _msgs(conn.take())
    held = {"x1", "b1"}
    _drop = [m["market_id"] for m in again if m["type"] == "removed"]
    snap = [m for m in again if m["type"] == "snapshot"]
    if snap:
        held = {m["market_id"] for m in snap[-1]["markets"]}
    held -= set(_drop)
    assert held == {"x1"}, again
    a.hub.close_all()
    b.hub.close_all()


@pytest.mark.parametrize("path", ["ring", "redis"])
@pytest.mark.parametrize("case", ["nothing_moved_here", "newer_token"])
async def test_a_token_issued_under_other_links_is_not_resumed_recovered_on_an_ev_filter(path: str, case: str) -> None:
    """Tokens under another links version than the node's: (a) B's relink of b:e moved nothing it
    held, so it marked nothing; b2 of b:e then came, and A (still on the old links) sent it to an
    ev:A client — resumed on B, recovered, the client kept b2 under ev:A; (b) a token under NEWER
    links than B's: B sent none of the market A's relink brought in while its heartbeats confirmed
    it. Either way the client's canonical event may differ from the node's: not recovered."""
    if case == "nothing_moved_here":
        a, b, feed, both = _two_nodes(path, ("x1", "a:e"))
        for node in (a, b):
            node.st.set_links(1, _V1, {})
            node.hub.started()
        b.hub.relinked(b.st.set_links(2, _V2, {}))  # (b holds no market of b:e: nothing moves)
        f = Filter.parse(event="ev:A")
        conn = a.hub.connect("ws", heartbeat_ms=60_000)
        await a.hub.subscribe(conn, f)
        conn.take()
        both(feed.image("b2", event="b:e"))
        both(feed.price("x1", "1", 2.3))
        got = _msgs(conn.take())
        assert {m["market_id"] for m in got if m["type"] == "delta"} == {"b2", "x1"}  # A: b2 in ev:A
    else:
        a, b, feed, both = _two_nodes(path, ("x1", "a:e"), ("b1", "b:e"))
        a.st.set_links(1, _V2, {})
        b.st.set_links(1, _V2, {})
        a.hub.relinked(a.st.set_links(2, _V1, {}))  # A: b1 joins ev:A; B not yet
        f = Filter.parse(event="ev:A")
        conn = a.hub.connect("ws", heartbeat_ms=60_000)
        await a.hub.subscribe(conn, f)
        assert sorted(m["market_id"] for m in _msgs(conn.take())[1]["markets"]) == ["b1", "x1"]
        both(feed.price("x1", "1", 2.3))
        got = _msgs(conn.take())
    token = got[-1]["token"]
    a.hub.disconnect(conn)
    both(feed.price("x1", "1", 2.4))
    conn = b.hub.connect("ws", heartbeat_ms=60_000)
    await b.hub.subscribe(conn, f, resume=token)
    again = _msgs(conn.take())
    assert [m["type"] for m in again[:3]] == ["ack", "resumed", "snapshot"] and again[1]["recovered"] is False, again
    assert [m["market_id"] for m in again[2]["markets"]] == ["x1"]
    a.hub.close_all()
    b.hub.close_all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seq", [("c2", "c3"), ("c2", "c1"), ("c3", "c2")])
async def test_a_market_moved_twice_by_one_entry(path: str, seq: tuple[str, str]) -> None:
    """The store batches a market's deltas: ONE log entry may move a market twice. Filtered on c1,
    one entry moves m1 c1 → c2 → c3 (out), c1 → c2 → c1 (out and back: ``removed`` then the market
    whole, never ``removed`` then a plain delta the client ignores) or c1 → c3 → c2, while m3 moves
    in (c2 → c1) and changes again. Every path says what live dispatch says. A Redis replay used
    to take the keys before m1's SECOND change (c2, what the hub remembered last) as its keys before
    the entry — c2 → c2, then c2 → c3: no ``removed``, and the client kept m1 under c1 (its old
    price, fresh by every heartbeat, ``recovered:true``); and, with those keys right, to take them
    again as the second change's keys before (c1 → c1: a plain delta after the ``removed``)."""
    feed = Feed(None)  # type: ignore[arg-type]
    node = _Node(path, feed, feed.image("m1"), feed.image("m2"), feed.image("m3"))
    node.write(feed.header("m3", competition="c2"))
    f = Filter.parse(competition="c1")

    def moves() -> None:
        node.write(feed.header("m1", competition=seq[0]), feed.header("m1", competition=seq[1]),  # 3-0
                   feed.header("m3", competition="c1"), feed.header("m3", competition="c1", status="SUSPENDED"))
        node.write(feed.price("m1", "1", 9.9), feed.price("m3", "1", 9.9))  # 4-0
    msgs, book = await _run(node, f, moves)
    t = node.tokens
    back = seq[1] == "c1"
    assert _said(msgs) == [
        ("removed", "m1", None, t["3-0"][0]),
        *([("delta", "m1", "image", t["3-0"][0])] if back else []),
        ("delta", "m3", "image", t["3-0"][0]),
        ("delta", "m3", "delta", t["3-0"][1]),
        *([("delta", "m1", "delta", t["4-0"][0])] if back else []),
        ("delta", "m3", "delta", t["4-0"][1]),
    ]
    assert book == {mid: m for mid, m in node.st.markets.items() if m.competition == "c1"}
    assert sorted(book) == (["m1", "m2", "m3"] if back else ["m2", "m3"])
