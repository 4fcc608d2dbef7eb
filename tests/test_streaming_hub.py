"""Hub, state and encoding without sockets: tokens, filters, staleness, byte budgets."""

from __future__ import annotations

import msgspec
import pytest

from feed.book import Book
from feed.models import DELTA_DECODER, SourceHealth, apply_delta
from feed.settings import Settings
from streaming.encoding import decode_token, encode_token, parse_stream_id, pong_message
from streaming.hub import Hub
from streaming.state import Filter, FilterError, NodeOptions, NodeState
from streaming_helpers import Feed, now_ms


def test_token_roundtrip_and_garbage() -> None:
    tok = encode_token("abc123", ["1-0", "1700000000000-5"])
    assert b"=" not in tok and b"+" not in tok and b"/" not in tok
    d = decode_token(tok.decode())
    assert d is not None and d.epoch == "abc123" and d.positions == ("1-0", "1700000000000-5")
    assert d.keys == ((1, 0), (1700000000000, 5))
    for bad in ("", "***", "YWJj", encode_token("e", ["x-1"]).decode(), encode_token("", ["1-0"]).decode(),
                "é", "A" * 10_000):
        assert decode_token(bad) is None, bad
    assert parse_stream_id("12-3") == (12, 3)
    with pytest.raises(ValueError):
        parse_stream_id("12")


def test_filter_parse() -> None:
    f = Filter.parse(sport="soccer, tennis", market=["m1"], in_play="TRUE")
    assert f.sport == frozenset({"soccer", "tennis"}) and f.market == frozenset({"m1"}) and f.in_play is True
    assert Filter.parse(sport="", in_play=None) == Filter()
    for kwargs, fragment in [({"in_play": "maybe"}, "in_play"), ({"sport": 3}, "sport"),
                             ({"event": ["a", 1]}, "event"), ({"market": ",".join(["x"] * 1001)}, "at most")]:
        with pytest.raises(FilterError, match=fragment):
            Filter.parse(**kwargs)


def _state(**settings: int) -> NodeState:
    return NodeState(Settings(**settings), 1, NodeOptions())


def test_staleness_rules() -> None:
    st = _state(stale_in_play_ms=10_000, stale_pre_match_ms=60_000)
    book = Book()
    now = now_ms()
    feed = Feed(None)  # type: ignore[arg-type]
    u = feed.image("m1", in_play=True)
    u.received_at = now - 20_000
    book.apply(u)
    m = book.markets["m1"]
    assert st.age_stale(m, now) == (20_000, True)  # no health record: received_at only
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=now - 1_000)])
    assert st.age_stale(m, now) == (1_000, False)  # a source heartbeat confirms it
    st.set_health([SourceHealth(source="t", state="DEGRADED", last_message_at=now - 500)])
    assert st.age_stale(m, now) == (500, False)
    st.set_health([SourceHealth(source="t", state="DOWN", last_message_at=now)])
    assert st.age_stale(m, now) == (20_000, True)  # DOWN: stale, and heartbeats do not count
    pre = msgspec.structs.replace(m, in_play=False)
    st.set_health([])
    assert st.age_stale(pre, now) == (20_000, False)  # pre-match allows 60 s


def _load(st: NodeState, n: int) -> Book:
    feed = Feed(None)  # type: ignore[arg-type]
    book = Book()
    deltas = [book.apply(feed.image(f"m{i}")) for i in range(n)]
    st.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    assert all(d is not None for d in deltas)
    return book


def _entry(st: NodeState, book: Book, entry_no: int, mids: list[str], price: float):
    feed = Feed(None)  # type: ignore[arg-type]
    ds = [book.apply(feed.price(mid, "1", price)) for mid in mids]
    return st.apply_entry(0, f"{entry_no}-0", [d for d in ds if d is not None], now_ms())


async def test_slow_connection_is_resynced_then_closed_and_never_delays_others() -> None:
    st = _state()
    book = _load(st, 5)
    hub = Hub(st, None, outbox_max_bytes=20_000)
    slow = hub.connect("ws", heartbeat_ms=60_000, label="slow")
    fast = hub.connect("sse", heartbeat_ms=60_000, label="fast")
    await hub.subscribe(slow, Filter())
    await hub.subscribe(fast, Filter.parse(market="m1"))
    assert [msgspec.json.decode(f)["type"] for f in slow.take()] == ["ack", "snapshot"]
    assert b"event: snapshot" in fast.take()[0]
    got_fast = 0
    for i in range(2, 60):
        hub.dispatch(_entry(st, book, i, ["m0", "m1", "m2", "m3", "m4"], 2.0 + i / 100))
        got_fast += len(fast.take())  # the fast one drains every time
        assert slow.outbox_bytes <= slow.max_bytes
    assert got_fast == 58 and hub.overflows == 1 and slow.resync_pending
    slow.send(pong_message(7))  # control messages still go through
    frames = [msgspec.json.decode(f) for f in slow.take()]
    assert [f["type"] for f in frames] == ["snapshot", "pong"]
    assert frames[0]["reason"] == "slow_consumer" and frames[0]["recovered"] is False
    assert {m["market_id"]: m["seq"] for m in frames[0]["markets"]} == {k: v.seq for k, v in st.markets.items()}
    # while that snapshot is being written, another budget's worth arrives: closed with a reason
    for i in range(60, 120):
        hub.dispatch(_entry(st, book, i, ["m0", "m1", "m2", "m3", "m4"], 3.0 + i / 100))
        fast.take()
    assert slow.closed and slow.close_code == 1008 and slow not in hub.connections
    (last,) = [msgspec.json.decode(f) for f in slow.take()]
    assert last["type"] == "error" and last["code"] == "slow_consumer"
    assert not fast.closed
    hub.close_all()


async def test_encoded_delta_rebuilds_with_apply_delta() -> None:
    st = _state()
    book = _load(st, 2)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter())
    conn.take()
    local = dict(st.markets)
    hub.dispatch(_entry(st, book, 5, ["m0", "m1"], 4.2))
    for raw in conn.take():
        msg = msgspec.json.decode(raw)
        assert msg["type"] == "delta" and msg["sub"] == 1
        d = DELTA_DECODER.decode(raw)
        local[d.market_id] = apply_delta(local[d.market_id], d)
    assert local == st.markets
    hub.close_all()
