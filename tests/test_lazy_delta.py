"""A node with no stream connection applies log entries without encoding their messages
(streaming.encoding.LazyDeltaMessage): what a resume later reads from the replay ring must be
byte for byte what an encoding node would have sent, and the ring's byte bound must hold."""

from __future__ import annotations

import math

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feed.book import Book
from feed.models import Delta, MarketHeader, SelectionChange
from streaming.encoding import LazyDeltaMessage, Message, delta_message
from feed.settings import Settings
from streaming.reader import NodeOptions
from streaming.state import NodeState
from streaming_helpers import Feed, now_ms

_FLOATS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(
    [-2.2250738585072014e-308, 1.7976931348623157e308, 1.01, 1000.0, 5e-324, -0.0]))
_TEXT = st.text(max_size=12)  # control characters and non-ASCII included: JSON escapes
_LADDER = st.lists(st.tuples(_FLOATS, _FLOATS), max_size=10)
_UNSET = st.just(msgspec.UNSET)


@st.composite
def _changes(draw: st.DrawFn) -> SelectionChange:
    def field(strategy: st.SearchStrategy) -> object:
        return draw(st.one_of(_UNSET, strategy))

    return SelectionChange(
        selection_id=draw(_TEXT), name=field(st.one_of(st.none(), _TEXT)), handicap=field(_FLOATS),
        status=field(st.sampled_from(["ACTIVE", "SUSPENDED", "REMOVED", "WINNER", "LOSER", "PLACED", "VOID",
                                      "HIDDEN"])),
        price=field(st.one_of(st.none(), _FLOATS)), back=field(_LADDER), lay=field(_LADDER),
        ltp=field(st.one_of(st.none(), _FLOATS)), traded_volume=field(st.one_of(st.none(), _FLOATS)),
        max_stake=field(st.one_of(st.none(), _FLOATS)),
        sort_priority=field(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1))),
        adjustment_factor=field(st.one_of(st.none(), _FLOATS)), bsp=field(st.one_of(st.none(), _FLOATS)),
        price_raw=field(st.one_of(st.none(), _TEXT)), outcome=field(st.one_of(st.none(), _TEXT)),
        void_factor=field(st.one_of(st.none(), _FLOATS)), dead_heat_factor=field(st.one_of(st.none(), _FLOATS)))


_INTS = st.integers(-2**63, 2**63 - 1)


@st.composite
def _deltas(draw: st.DrawFn) -> Delta:
    header = draw(st.one_of(st.none(), st.builds(
        MarketHeader, sport=_TEXT, event_id=_TEXT, event_name=_TEXT, market_type=_TEXT, status=st.just("OPEN"))))
    return Delta(market_id=draw(_TEXT), seq=draw(st.integers(0, 2**63 - 1)), kind="delta", source=draw(_TEXT),
                 source_ts=draw(_INTS), received_at=draw(_INTS), stored_at=draw(_INTS),
                 source_ts_original=draw(st.one_of(st.none(), _INTS)), session=draw(st.one_of(st.none(), _TEXT)),
                 header=header, selections=draw(st.lists(_changes(), max_size=4)),
                 traded_volume=draw(st.one_of(st.none(), _FLOATS)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=_deltas(), age=st.integers(0, 2**40), stale=st.booleans(), sent_at=_INTS,
       token=st.one_of(st.none(), st.binary(min_size=1, max_size=40)))
def test_a_lazy_delta_message_is_the_eager_one_byte_for_byte_and_its_size_hint_bounds_it(
        d: Delta, age: int, stale: bool, sent_at: int, token: bytes | None) -> None:
    eager = delta_message(d, market_json=None, age_ms=age, stale=stale, sent_at=sent_at, token=token,
                          prev_token=b"p")
    lazy = LazyDeltaMessage(d, age_ms=age, stale=stale, sent_at=sent_at, token=token, prev_token=b"p")
    hint = lazy.size_hint()
    assert hint >= len(eager.json)  # the ring's byte bound never undercounts an unencoded message
    # every view of it, from the first read on (the first read encodes)
    assert lazy.sse(True) == eager.sse(True)
    assert lazy.json == eager.json
    assert lazy.ws_frame(3, True) == eager.ws_frame(3, True)
    assert lazy.ws(None) == eager.ws(None)
    assert lazy.size_hint() == len(eager.json)
    assert (lazy.type, lazy.token, lazy.prev_token) == (eager.type, eager.token, eager.prev_token)
    assert math.isfinite(hint)


def _node(n: int) -> tuple[NodeState, Book]:
    st_ = NodeState(Settings(), 1, NodeOptions())
    feed = Feed(None)  # type: ignore[arg-type]
    book = Book()
    for i in range(n):
        book.apply(feed.image(f"m{i}"))
    st_.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    return st_, book


def test_a_node_with_no_connection_prepares_the_same_entries_without_encoding_them() -> None:
    """Two nodes apply the same entries, one encoding (a stream connected), one not: the ring
    holds the same messages — a resume replays the same bytes — and the lazy one has encoded
    nothing until read. A delta that moves the market (a header) is encoded either way."""
    eager_node, book = _node(3)
    lazy_node, _ = _node(3)
    feed = Feed(None)  # type: ignore[arg-type]
    now = now_ms()
    entries = []
    for i in range(30):
        d = book.apply(feed.price(f"m{i % 3}", "1", 2.5 + i / 100))
        assert d is not None
        entries.append([d])
    moved = book.apply(feed.image("m1", event="e-moved", prices={"1": 9.0, "2": 1.2}))  # keys move: the image is needed now
    assert moved is not None
    entries.append([moved])
    for n, ds in enumerate(entries, start=2):
        a = eager_node.apply_entry(0, f"{n}-0", ds, now, True)
        b = lazy_node.apply_entry(0, f"{n}-0", ds, now, False)
        assert a is not None and b is not None
        for pa, pb in zip(a.deltas, b.deltas, strict=True):
            assert type(pa.msg) is Message
            if pb.prev is None and not pb.is_image:
                assert type(pb.msg) is LazyDeltaMessage
                assert pb.msg._delta is not None  # not encoded (yet)
            else:  # an image, or the market moved (it may newly match a filter): encoded at once
                assert type(pb.msg) is Message
            assert (pb.keys, pb.prev) == (pa.keys, pa.prev)
        assert b.nbytes >= a.nbytes  # the hint bounds what the eager node counted
    assert b.deltas[0].prev is not None  # (the last entry moved m1 to another event)
    ring_a = [pd.msg for e in eager_node.ring.entries for pd in e.deltas]
    ring_b = [pd.msg for e in lazy_node.ring.entries for pd in e.deltas]
    assert [m.sse(True) for m in ring_b] == [m.sse(True) for m in ring_a]
    def info(m: Message) -> tuple:
        i = m.info
        return (i.market_id, i.sel_ids, i.has_header, i.has_tv, i.is_image, i.removed)  # type: ignore[attr-defined]

    assert [info(m) for m in ring_b] == [info(m) for m in ring_a]


def test_the_size_hint_bounds_a_delta_with_every_field_at_its_longest() -> None:
    """Every selection field present, every number at its longest, 20 selections of 10 + 10
    levels, strings of escaped characters: the hint still bounds the encoded message (it missed
    ``outcome`` and undercounted a full selection by 52 bytes — found in review)."""
    f, i = -2.2250738585072014e-308, -(2 ** 63)
    for text, levels in (("", 0), ("x" * 40, 0), ("\x01é", 10)):  # (ASCII: 1 byte; a control character: 6)
        sels = [SelectionChange(selection_id=text, name=text, handicap=f, status="SUSPENDED", price=f,
                                back=[(f, f)] * levels, lay=[(f, f)] * levels, ltp=f, traded_volume=f, max_stake=f,
                                sort_priority=i, adjustment_factor=f, bsp=f, price_raw=text, outcome=text,
                                void_factor=f, dead_heat_factor=f) for _ in range(20)]
        _hint_bounds(text, sels, f, i)


def _hint_bounds(text: str, sels: list[SelectionChange], f: float, i: int) -> None:
    for selections in ([], sels[:1], sels):
        d = Delta(market_id=text, seq=2 ** 63 - 1, kind="delta", source=text, source_ts=i, received_at=i,
                  stored_at=i, source_ts_original=i, session=text, selections=selections, traded_volume=f)
        lazy = LazyDeltaMessage(d, age_ms=i, stale=False, sent_at=i, token=None)
        hint = lazy.size_hint()
        assert hint >= len(lazy.json), (len(selections), hint, len(lazy.json))
