"""What a conflated (or slow-consumer collapsed) subscription is told must be the server's word as of
the send, and a status change must not wait for the window's end.

- A market changed once in a conflation window went out at the window's end as the queued message,
  whose ``stale`` / ``age_ms`` were judged when the node applied the change; a ``status`` that
  listed the market as stale had gone out at once, so the wire said ``status(stale)`` then
  ``delta(stale:false)``: the client takes the later word, and every heartbeat confirmed the
  market as fresh. The same for a slow consumer's collapse (control messages stay in place, the
  merged deltas follow them). Now such a change is judged again at the send and, when the verdict
  changed, sent as a merge built then (``Hub._merged_frames``).
- A suspension (a close, a settlement, a runner removed) inside a conflation window waited for the
  window's end — up to 120 s — while heartbeats confirmed the market as the client held it: open.
  Now it is sent at once, merged with what the window held of that market, with tokens that skip
  nothing still held (``Hub._flush_markets``).

Hub and state without sockets (as tests/test_streaming_moves.py), and one end-to-end stream.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from feed.models import SourceHealth
from feed.settings import Settings
from feed.store import Store
from streaming.hub import Hub
from streaming.state import Filter, NodeOptions, NodeState
from streaming_helpers import Feed, SSEReader, make_app, now_ms, serve

WINDOW_MS = 60_000  # never ends during a test: only the code under test sends


class _Node:
    """A one-partition node with markets ``mids`` of source ``t`` (UP), its hub (replay ring on)."""

    def __init__(self, *mids: str) -> None:
        self.feed = Feed(None)  # type: ignore[arg-type]
        self.st = NodeState(Settings(), 1, NodeOptions(replay_ring_entries=10_000))
        for mid in mids:
            self.feed.book.apply(self.feed.image(mid))
        self.st.replace_partitions({0: ("1-0", list(self.feed.book.markets.values()))}, "ep")
        self.health("UP")
        self.hub = Hub(self.st, None, outbox_max_bytes=1 << 20)
        self.n = 2
        #: entry id → (token before it, token after it)
        self.tokens: dict[str, tuple[str, str]] = {}

    def health(self, state: str) -> None:
        t = now_ms()
        self.st.set_health([SourceHealth(source="t", state=state, last_message_at=t, updated_at=t)])  # type: ignore[arg-type]

    def announce(self, state: str) -> None:
        """The source turns ``state``; the hub announces it (as the reader's health refresh does)."""
        before = set(self.st.stale_ids("t", now_ms()))
        self.health(state)
        stale = self.st.stale_ids("t", now_ms())
        self.hub.status("t", state, None, stale, sorted(set(stale) - before), sorted(before - set(stale)))

    def write(self, *updates: Any) -> str:
        """Apply ``updates`` as ONE log entry and dispatch it; its entry id."""
        ds = [d for u in updates if (d := self.feed.book.apply(u)) is not None]
        assert len(ds) == len(updates)
        eid = f"{self.n}-0"
        self.n += 1
        before = self.st.token.decode()
        entry = self.st.apply_entry(0, eid, ds, now_ms())
        assert entry is not None
        self.tokens[eid] = (before, entry.token.decode())
        self.hub.dispatch(entry)
        return eid


def _removed(feed: Feed, mid: str, sel: str) -> Any:
    """A change of runner ``sel`` of ``mid`` to REMOVED (its other fields as they are)."""
    held = next(s for s in feed.book.markets[mid].selections if s.selection_id == sel)
    return msgspec.structs.replace(feed.price(mid, sel, held.price or 2.0),
                                   selections=[msgspec.structs.replace(held, status="REMOVED")])


def _msgs(frames: list[bytes]) -> list[dict[str, Any]]:
    return [msgspec.json.decode(f) for f in frames]


def _said(msgs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(m["type"], m.get("market_id"), m.get("stale"), tuple(m.get("stale_markets") or ())) for m in msgs
            if m["type"] in ("delta", "status")]


async def test_a_conflated_single_change_is_judged_stale_as_of_the_send() -> None:
    """m1 changes once in the window (fresh then); its source goes DOWN and the status says m1 is
    stale; the window's end must not say ``stale:false`` after it. And back: a change applied while
    the source was DOWN, the source UP again (status: fresh) — the window says fresh. A change
    whose verdict did not move still goes as is (not a merge)."""
    node = _Node("m1", "m2")
    hub = node.hub
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter(), conflate_ms=WINDOW_MS)
    conn.take()
    node.write(node.feed.price("m1", "1", 2.2))
    node.announce("DOWN")
    hub.flush_conflated(WINDOW_MS)
    got = _msgs(conn.take())
    assert _said(got) == [("status", None, None, ("m1", "m2")), ("delta", "m1", True, ())], got
    assert node.st.age_stale(node.st.markets["m1"], now_ms())[1] is True
    delta = got[-1]
    assert delta["seq"] == node.st.markets["m1"].seq and delta["selections"][0]["price"] == 2.2

    node.write(node.feed.price("m2", "1", 3.3))  # applied while DOWN: stale
    node.announce("UP")  # … and confirmed again: the status says fresh
    hub.flush_conflated(WINDOW_MS)
    got = _msgs(conn.take())
    assert _said(got) == [("status", None, None, ()), ("delta", "m2", False, ())], got

    node.write(node.feed.price("m1", "2", 4.4))  # fresh then, fresh now: as is
    hub.flush_conflated(WINDOW_MS)
    (delta,) = _msgs(conn.take())
    assert delta["stale"] is False and "conflated" not in delta and delta["selections"] == [
        {"selection_id": "2", "price": 4.4, "back": [[4.4, 10.0]]}]
    hub.close_all()


async def test_a_slow_consumers_collapse_does_not_put_a_fresh_delta_after_a_stale_status() -> None:
    """A slow consumer: m1's change (fresh when applied) is queued, then a status says m1 is stale;
    the collapse keeps the status in place and appends the merged deltas — m1's must say stale."""
    node = _Node("m1", "m2")
    hub = node.hub
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter())
    conn.take()
    node.write(node.feed.price("m1", "1", 2.2))
    for i in range(5):
        node.write(node.feed.price("m2", "1", 3.0 + i / 100))
    node.announce("DOWN")
    hub.collapse(conn)
    got = _msgs(conn.take())
    assert _said(got) == [("status", None, None, ("m1", "m2")), ("delta", "m1", True, ()),
                          ("delta", "m2", True, ())], got
    hub.close_all()


async def test_a_status_change_in_a_conflation_window_is_sent_at_once() -> None:
    """m2's price change waits for the window; m1's suspension goes at once — carrying the token
    from before m2's held change, so a resume from it replays that change —, so does m3's runner
    removed (with m3's own earlier price change of the window merged in); a suspension with a held
    change after it in the same entry carries the token before that entry; with nothing held, the
    entry's token. The window's end sends the rest."""
    node = _Node("m1", "m2", "m3", "m4")
    hub, feed, t = node.hub, node.feed, node.tokens
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter(), conflate_ms=WINDOW_MS)
    conn.take()
    e_m2 = node.write(feed.price("m2", "1", 2.2))
    node.write(feed.price("m3", "1", 5.5))
    assert conn.take() == []  # price changes wait
    node.write(feed.header("m1", status="SUSPENDED", suspend_reason="goal"))
    (m1,) = _msgs(conn.take())
    assert (m1["type"], m1["market_id"], m1["header"]["status"]) == ("delta", "m1", "SUSPENDED")
    assert m1["token"] == t[e_m2][0]  # m2's change is still held: from before it
    node.write(_removed(feed, "m3", "2"))
    (m3,) = _msgs(conn.take())
    assert m3["market_id"] == "m3" and m3["conflated"] is True and m3["token"] == t[e_m2][0]
    assert {s["selection_id"]: (s["status"], s["price"]) for s in m3["selections"]} == {
        "1": ("ACTIVE", 5.5), "2": ("REMOVED", 3.5)}
    e_mix = node.write(feed.header("m4", status="CLOSED"), feed.price("m1", "1", 9.9))
    (m4,) = _msgs(conn.take())
    assert (m4["market_id"], m4["header"]["status"], m4["token"]) == ("m4", "CLOSED", t[e_m2][0])
    hub.flush_conflated(WINDOW_MS)
    rest = _msgs(conn.take())
    assert [(m["market_id"], m["token"]) for m in rest] == [("m2", t[e_mix][0]), ("m1", t[e_mix][1])]
    # a resume from the suspension's token replays the held change it stood before
    again = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(again, Filter(), resume=m1["token"])
    replay = _msgs(again.take())
    assert replay[1]["type"] == "resumed" and replay[1]["recovered"] is True
    assert ("m2", 2.2) in [(m["market_id"], m["selections"][0].get("price")) for m in replay
                           if m["type"] == "delta" and m.get("selections")]

    # nothing held: the entry's own token; a later price change waits again
    e_m2b = node.write(feed.header("m2", status="SUSPENDED"))
    (m2,) = _msgs(conn.take())
    assert (m2["market_id"], m2["token"]) == ("m2", t[e_m2b][1])
    e_after = node.write(feed.header("m2", status="OPEN"), feed.price("m3", "1", 6.0))
    (m2,) = _msgs(conn.take())
    assert (m2["market_id"], m2["header"]["status"], m2["token"]) == ("m2", "OPEN", t[e_after][0])
    hub.close_all()


async def test_a_suspension_that_moves_a_market_out_of_a_conflated_filter_is_sent_at_once() -> None:
    """A pre-match filter (``in_play=false``) with a window: at the off the provider suspends the
    market and turns it in play in one change, which moves it out of the filter — a ``removed``.
    It waited for the window's end (§76's left item) while the client held the market open and
    pre-match; now a ``removed`` a change made goes at once (a price change of another market still
    waits). (A relink's ``removed`` — no change of the market, no token — still waits: not exercised here.)"""
    node = _Node("m1", "m2")
    hub, feed, t = node.hub, node.feed, node.tokens
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter(in_play=False), conflate_ms=WINDOW_MS)
    conn.take()
    e_m2 = node.write(feed.price("m2", "1", 2.2))
    node.write(feed.header("m1", status="SUSPENDED", in_play=True))
    (gone,) = _msgs(conn.take())
    assert (gone["type"], gone["market_id"]) == ("removed", "m1")
    assert gone["token"] == t[e_m2][0]  # m2's change is still held: from before it
    hub.flush_conflated(WINDOW_MS)
    assert [(m["type"], m["market_id"]) for m in _msgs(conn.take())] == [("delta", "m2")]
    hub.close_all()


async def test_a_suspension_reaches_a_conflated_stream_well_before_the_window_ends(store: Store,
                                                                                  redis_url: str) -> None:
    """End to end (ingest → Redis → node → SSE): a 60 s window; the suspension arrives within
    seconds, the held price change of another market does not."""
    feed = Feed(store)
    await feed.write(feed.image("m1"), feed.image("m2"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=20) as c:
        async with c.stream("GET", f"/v1/stream?conflate_ms={WINDOW_MS}") as resp:
            sse = SSEReader(resp)
            assert (await sse.next()).event == "snapshot"
            await feed.write(feed.price("m2", "1", 2.5))
            await feed.write(feed.header("m1", status="SUSPENDED"))
            ev = await sse.until(lambda e: e.event == "delta", 10)  # (the window is 60 s)
            assert (ev.data["market_id"], ev.data["header"]["status"]) == ("m1", "SUSPENDED")


async def test_a_suspension_to_many_conflated_subscriptions_is_merged_once(monkeypatch: Any) -> None:
    """A hot flush (a status change in a conflation window) per subscription walked the whole
    window and built the merged message again for every subscription: 300 subscriptions over
    2,000 held markets took ~90 ms of the event loop per suspension (review). The merge is
    built once per entry, shared by every subscription it goes to."""
    node = _Node(*[f"m{i}" for i in range(50)])
    hub, feed = node.hub, node.feed
    conns = []
    for _ in range(20):
        conn = hub.connect("ws", heartbeat_ms=60_000)
        await hub.subscribe(conn, Filter(), conflate_ms=WINDOW_MS)
        conn.take()
        conns.append(conn)
    for i in range(1, 50):
        node.write(feed.price(f"m{i}", "1", 2.2))  # held by every window
    node.write(feed.price("m0", "1", 5.5))
    built = 0
    real = Hub._merged_message

    def counting(self: Hub, *args: Any, **kwargs: Any) -> Any:
        nonlocal built
        built += 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Hub, "_merged_message", counting)
    node.write(feed.header("m0", status="SUSPENDED"))
    for conn in conns:
        (m0,) = _msgs(conn.take())
        assert (m0["market_id"], m0["header"]["status"]) == ("m0", "SUSPENDED")
    assert built == 1


async def test_a_conflated_heartbeat_names_the_markets_its_window_holds() -> None:
    """A conflated subscription's heartbeat said "everything up to as_of is sent" while its window
    held m1's change: clients confirmed m1 at the price they held — behind by up to the window,
    fresh. The heartbeat now lists the held markets (``held``); with nothing held, none."""
    node = _Node("m1", "m2")
    hub, feed = node.hub, node.feed
    conflated = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conflated, Filter(), conflate_ms=WINDOW_MS)
    live = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(live, Filter())
    conflated.take()
    live.take()
    node.write(feed.price("m1", "1", 2.2))
    live.take()
    hub.heartbeat([conflated, live])
    (beat,) = _msgs(conflated.take())
    assert beat["type"] == "heartbeat" and beat["held"] == ["m1"]
    (beat,) = _msgs(live.take())
    assert beat["type"] == "heartbeat" and "held" not in beat
    hub.flush_conflated(WINDOW_MS)
    conflated.take()
    hub.heartbeat([conflated])
    (beat,) = _msgs(conflated.take())
    assert "held" not in beat
