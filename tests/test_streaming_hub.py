"""Hub, state and encoding without sockets: tokens, filters, staleness, byte budgets."""

from __future__ import annotations

import msgspec
import pytest

from feed.book import Book
from feed.models import DELTA_DECODER, Market, SourceHealth, apply_delta
from feed.settings import Settings
from streaming.encoding import decode_token, encode_token, parse_stream_id, pong_message
from streaming.hub import SLOW_CONSUMER_CODE, Hub
from streaming.odds_format import convert_json, decimal_to_american, decimal_to_fractional
from streaming.state import Filter, FilterError, NodeOptions, NodeState, parse_stale_by_sport
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
    # the links version the token was issued under (a token without one: a node from before it)
    assert d.links_version is None
    v = decode_token(encode_token("abc123", ["1-0"], 7))
    assert v is not None and v.links_version == 7 and v.positions == ("1-0",)
    assert decode_token(encode_token("e", ["1-0"], -1)) == decode_token(encode_token("e", ["1-0"]))
    import base64
    for raw in (b"e|1-0|", b"e|1-0|x", b"e|1-0|-1", b"e|1-0|1|2", b"e|1-0|" + b"9" * 19):
        assert decode_token(base64.urlsafe_b64encode(raw).rstrip(b"=")) is None, raw


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
    book.apply(u, session="s1")
    m = book.markets["m1"]
    assert st.age_stale(m, now) == (20_000, True)  # no health record: received_at only
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=now - 1_000, session="s1")])
    assert st.age_stale(m, now) == (1_000, False)  # a source heartbeat confirms it
    st.set_health([SourceHealth(source="t", state="DEGRADED", last_message_at=now - 500, session="s1")])
    assert st.age_stale(m, now) == (500, False)
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=now - 500, session="s2")])
    assert st.age_stale(m, now) == (20_000, True)  # another upstream session's heartbeats do not count
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=now - 500, session="s1",
                                updated_at=now - 6_000, lease_ms=5_000)])
    assert st.age_stale(m, now) == (20_000, True)  # its ingest stopped renewing the lease
    st.set_health([SourceHealth(source="t", state="DOWN", last_message_at=now, session="s1")])
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


def _rebuild(frames: list[bytes], book: dict) -> list[dict]:
    """Apply WS frames (JSON payloads) to a local book; return the decoded messages."""
    out = []
    for raw in frames:
        msg = msgspec.json.decode(raw)
        out.append(msg)
        if msg["type"] == "snapshot":
            book.clear()
            book.update({m["market_id"]: msgspec.convert(m, Market) for m in msg["markets"]})
        elif msg["type"] == "delta":
            d = DELTA_DECODER.decode(raw)
            book[d.market_id] = apply_delta(book.get(d.market_id), d)
    return out


async def test_slow_ladder_collapse_then_snapshot_then_close_and_others_unaffected() -> None:
    st = _state()
    book = _load(st, 5)
    mids = ["m0", "m1", "m2", "m3", "m4"]
    hub = Hub(st, None, outbox_max_bytes=20_000)
    slow = hub.connect("ws", heartbeat_ms=60_000, label="slow")
    fast = hub.connect("sse", heartbeat_ms=60_000, label="fast")
    await hub.subscribe(slow, Filter())
    await hub.subscribe(fast, Filter.parse(market="m1"))
    local: dict = {}
    assert [m["type"] for m in _rebuild(slow.take(), local)] == ["ack", "snapshot"]
    assert b"event: snapshot" in fast.take()[0]
    got_fast = 0
    # 1. over budget: the queue is collapsed by market (latest state wins, flagged), never above budget
    for i in range(2, 80):
        hub.dispatch(_entry(st, book, i, mids, 2.0 + i / 100))
        got_fast += len(fast.take())  # the fast one drains every time
        assert slow.outbox_bytes <= slow.max_bytes
    assert got_fast == 78 and hub.collapses >= 1 and hub.slow_resyncs == 0 and not slow.closed
    msgs = _rebuild(slow.take(), local)
    assert any(m.get("conflated") for m in msgs)
    assert {k: v.seq for k, v in local.items()} == {k: v.seq for k, v in st.markets.items()}
    assert local == st.markets  # collapsed frames rebuild the exact book
    # tokens stay safe: the last message carries the node's position
    assert msgs[-1]["token"] == st.token.decode()

    # 2. a budget smaller than even the collapsed queue: a fresh snapshot replaces it
    slow.max_bytes = 1_500
    for i in range(80, 90):
        hub.dispatch(_entry(st, book, i, mids, 3.0 + i / 100))
        fast.take()
    assert hub.slow_resyncs == 1 and slow.resync_pending and slow.outbox_bytes == 0
    slow.send(pong_message(7))  # control messages still go through
    msgs = _rebuild(slow.take(), local)
    assert [m["type"] for m in msgs] == ["pong", "snapshot"]
    assert msgs[1]["reason"] == "slow_consumer" and msgs[1]["recovered"] is False
    assert local == st.markets
    # 3. while that snapshot is being written, over budget again: closed with a reason (4008)
    for i in range(90, 120):
        hub.dispatch(_entry(st, book, i, mids, 4.0 + i / 100))
        fast.take()
    assert slow.closed and slow.close_code == SLOW_CONSUMER_CODE and slow not in hub.connections
    assert hub.slow_closes == 1
    (last,) = [msgspec.json.decode(f) for f in slow.take()]
    assert last["type"] == "error" and last["code"] == "slow_consumer"
    assert not fast.closed
    hub.close_all()


async def test_control_messages_are_bounded_too() -> None:
    st = _state()
    _load(st, 1)
    hub = Hub(st, None, outbox_max_bytes=1_000)
    conn = hub.connect("ws", heartbeat_ms=60_000)
    for i in range(10_000):  # a client that pings and never reads
        conn.send(pong_message(i))
        if conn.closed:
            break
    assert conn.closed and conn.close_code == SLOW_CONSUMER_CODE and i < 10_000
    hub.close_all()


def test_stale_after_ms_by_sport() -> None:
    st = _state(stale_in_play_ms=10_000, stale_pre_match_ms=60_000)
    st2 = NodeState(Settings(stale_after_ms_by_sport=("soccer=5000", "tennis:in_play=2000",
                                                      "tennis:pre_match=300000")), 1, NodeOptions())
    book = Book()
    now = now_ms()
    feed = Feed(None)  # type: ignore[arg-type]
    for mid, sport, in_play in (("s", "soccer", False), ("t1", "tennis", True), ("t2", "tennis", False),
                                ("g", "golf", True)):
        u = feed.image(mid, sport=sport, in_play=in_play)
        u.received_at = now - 7_000
        book.apply(u)
    m = book.markets
    assert st.age_stale(m["s"], now) == (7_000, False) and st2.age_stale(m["s"], now) == (7_000, True)
    assert st2.age_stale(m["t1"], now)[1] is True and st2.age_stale(m["t2"], now)[1] is False
    assert st2.age_stale(m["g"], now)[1] is False  # not listed: the in-play default (10 s)
    assert st2.stale_after_ms("tennis", False) == 300_000
    with pytest.raises(ValueError, match="sport"):
        parse_stale_by_sport(["soccer:live=5"])


def test_a_market_past_its_start_time_is_judged_by_the_in_play_limits() -> None:
    """A market whose event has started while its provider still says ``in_play: false`` (The Odds
    API until its next poll, Pinnacle until its next answer, a push provider until its scores message)
    was judged by the pre-match limit: 25 s old at kick-off + 20 s and still fresh. Its limit is the
    in-play one from its ``start_time`` on — it turns stale at the start with no new message (the
    health refresh re-judges at its ``now``: ``stale_ids``) — while ``in_play`` as served stays false."""
    st = _state(stale_in_play_ms=10_000, stale_pre_match_ms=60_000)
    now = now_ms()
    start = now + 5_000
    feed = Feed(None)  # type: ignore[arg-type]
    book = Book()
    for mid, start_time in (("ko", start), ("tbd", None)):
        u = feed.image(mid, start_time=start_time)
        u.received_at = now - 20_000
        book.apply(u)
    ko, tbd = book.markets["ko"], book.markets["tbd"]
    st.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    assert ko.in_play is False and ko.start_time == start
    assert st.age_stale(ko, start - 1) == (24_999, False)  # before the start: the pre-match limit (60 s)
    assert st.age_stale(ko, start) == (25_000, True)  # from the start on: the in-play limit (10 s)
    assert st.stale_ids("t", start - 1) == [] and st.stale_ids("t", start) == ["ko"]
    assert st.age_stale(tbd, start)[1] is False  # no start time known: its flag alone
    served = msgspec.json.decode(st.market_json(ko, start))
    assert (served["in_play"], served["stale"], served["start_time"]) == (False, True, start)
    # an in-play entry per sport applies from the start time on too
    st2 = NodeState(Settings(stale_after_ms_by_sport=("soccer:in_play=30000",)), 1, NodeOptions())
    assert st2.age_stale(ko, start)[1] is False and st2.age_stale(ko, start + 5_001)[1] is True


def test_stale_after_ms_by_sport_spells_the_sport_as_markets_do() -> None:
    """``Soccer:in_play=3000`` / ``soccer :in_play=3000`` were kept as sports no market carries
    (silently: the operator's tighter limit never applied); they read ``soccer``."""
    for entry in ("soccer:in_play=3000", "soccer :in_play=3000", "Soccer:in_play=3000", " SOCCER : In_Play = 3000",
                  "football:in_play=3000"):
        assert parse_stale_by_sport([entry]) == {("soccer", True): 3000}, entry
    assert parse_stale_by_sport(["Horse Racing=120000"]) == {("horse_racing", True): 120_000,
                                                             ("horse_racing", False): 120_000}
    now = now_ms()
    u = Feed(None).image("m", in_play=True)  # type: ignore[arg-type]
    u.received_at = now - 4_000
    book = Book()
    book.apply(u)
    st = NodeState(Settings(stale_after_ms_by_sport=("Soccer :in_play=3000",)), 1, NodeOptions())
    assert st.age_stale(book.markets["m"], now) == (4_000, True)
    for bad in (":in_play=3000", " :in_play=3000", "soccer:live=3000", "soccer=-1", "soccer"):
        with pytest.raises(ValueError, match="stale_after_ms_by_sport entry"):
            parse_stale_by_sport([bad])
    # a push provider's free-text sport is stored as markets spell it, so an entry applies to its
    # markets whichever spelling either side used (push stored "football" / "ice-hockey" as sent:
    # once entries were normalised, neither spelling of an entry reached those markets)
    from feed.normalise.push import PushNormaliser

    for sport, entry, stored in (("Football", "football:in_play=3000", "soccer"),
                                 ("football", "soccer:in_play=3000", "soccer"),
                                 ("Ice-Hockey", "ice_hockey:in_play=3000", "ice_hockey")):
        body = msgspec.json.encode({"type": "odds", "entry_id": f"{now}-1", "seq": 1, "data": [{
            "fixture": {"id": "f1", "sport": sport, "league": "L", "home": "A", "away": "B", "is_live": True},
            "market": {"id": "ml"}, "selection": {"id": "home", "name": "A"}, "price": 2.0, "timestamp": now}]})
        (u,) = PushNormaliser("px").feed(body, now).updates
        pm = Book().apply(u, stored_at=now)
        assert pm is not None and pm.market is not None and pm.market.sport == stored, sport
        m = msgspec.structs.replace(pm.market, received_at=now - 4_000)
        st = NodeState(Settings(stale_after_ms_by_sport=(entry,)), 1, NodeOptions())
        assert st.age_stale(m, now) == (4_000, True), (sport, entry)


def test_odds_formats() -> None:
    assert decimal_to_fractional(2.5) == "3/2" and decimal_to_fractional(2.0) == "1/1"
    assert decimal_to_fractional(1.91) == "91/100"
    assert decimal_to_american(2.5) == 150 and decimal_to_american(1.5) == -200 and decimal_to_american(2.0) == 100
    body = (b'{"type":"delta","selections":[{"selection_id":"1","price":2.5,"back":[[2.5,10.0]],'
            b'"lay":[],"ltp":null}],"sent_at":1}')
    conv = msgspec.json.decode(convert_json(body, "fractional"))
    assert conv["selections"][0]["price"] == "3/2" and conv["selections"][0]["back"] == [["3/2", 10.0]]
    assert conv["selections"][0]["ltp"] is None
    assert msgspec.json.decode(convert_json(body, "american"))["selections"][0]["back"] == [[150, 10.0]]
    hb = b'{"type":"heartbeat","as_of":1}'
    assert convert_json(hb, "american") is hb


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


async def test_dispatch_builds_frames_once_per_group_of_alike_subscriptions() -> None:
    st = _state()
    book = _load(st, 3)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    alike = [hub.connect("sse", heartbeat_ms=60_000) for _ in range(3)]
    other_fmt = hub.connect("sse", heartbeat_ms=60_000)
    ws = [hub.connect("ws", heartbeat_ms=60_000, ws_raw=True) for _ in range(2)]
    for c in alike:
        await hub.subscribe(c, Filter.parse(market="m1,m2"))
    await hub.subscribe(other_fmt, Filter.parse(market="m1,m2"), fmt="fractional")
    for c in ws:
        await hub.subscribe(c, Filter.parse(market="m1,m2"))
    assert len(hub._groups) == 3  # SSE decimal, SSE fractional, WebSocket sub 1
    for c in (*alike, other_fmt, *ws):
        c.take()
    hub.dispatch(_entry(st, book, 2, ["m1", "m2", "m0"], 2.5))
    got = [c.take() for c in alike]
    assert len(got[0]) == 2 and all(g[0] is got[0][0] and g[1] is got[0][1] for g in got)  # shared, not copied
    frac = other_fmt.take()
    assert len(frac) == 2 and frac[0] is not got[0][0] and b'"price":"3/2"' in frac[0]
    w = [c.take() for c in ws]
    assert w[0][0] is w[1][0] and b'"sub":1' in w[0][0]
    # leaving: the group goes when its last subscription does; the others keep getting deltas
    for c in alike[:2]:
        hub.disconnect(c)
    assert len(hub._groups) == 3
    hub.disconnect(alike[2])
    assert len(hub._groups) == 2 and not any(hub._by_market.get(k) and any(
        g.key[1] is None and g.key[2].name == "sse" for g in hub._by_market[k]) for k in ("m1", "m2"))
    hub.dispatch(_entry(st, book, 3, ["m1"], 2.6))
    assert len(other_fmt.take()) == 1 and all(len(c.take()) == 1 for c in ws)
    hub.close_all()


async def test_a_snapshot_still_queued_at_a_slow_consumer_resync_never_lands_after_the_fresh_one() -> None:
    """The first snapshot of a subscription is still queued (the client has not read it) when the
    connection goes over budget and is resynced: the fresh snapshot must come after it, or the
    client's book would go back to the older one (and read it as current)."""
    st = _state()
    book = _load(st, 5)
    mids = ["m0", "m1", "m2", "m3", "m4"]
    hub = Hub(st, None, outbox_max_bytes=1_500)
    slow = hub.connect("ws", heartbeat_ms=60_000, label="slow")
    await hub.subscribe(slow, Filter())  # ack + snapshot queued, not taken
    for i in range(2, 40):
        hub.dispatch(_entry(st, book, i, mids, 2.0 + i / 100))
    assert hub.slow_resyncs == 1 and not slow.closed
    local: dict = {}
    msgs = _rebuild(slow.take(), local)
    snaps = [m for m in msgs if m["type"] == "snapshot"]
    assert len(snaps) == 2 and snaps[-1].get("reason") == "slow_consumer"
    assert local == st.markets  # the book ends at the node's state, not the first snapshot's
    hub.close_all()


class _RecordingSink:
    """A socket side (streaming.transport.Sink) that keeps what it is given; ``broken``: every
    write raises, as a transport in a state nobody foresaw would."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.written: list[bytes] = []
        self.finished = False
        self.aborted = False

    def write(self, frames: list[bytes], nbytes: int) -> None:
        if self.broken:
            raise RuntimeError("transport in a state nobody foresaw")
        assert nbytes == sum(map(len, frames))
        self.written.extend(frames)

    def finish(self, conn: object) -> None:
        self.finished = True

    def last_words(self, conn: object, frames: list[bytes]) -> None:
        self.finished = True

    def drained(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


async def test_a_socket_that_fails_to_write_is_closed_alone_and_the_others_still_get_their_frames(caplog) -> None:
    st = _state()
    book = _load(st, 3)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    sinks = [_RecordingSink(), _RecordingSink(broken=True), _RecordingSink()]
    conns = [hub.connect("sse", heartbeat_ms=60_000, sink=s) for s in sinks]  # type: ignore[arg-type]
    for c in conns:
        await hub.subscribe(c, Filter.parse(market="m1"))
    hub.flush()  # the acks and snapshots: the broken socket fails here already
    assert conns[1].closed and conns[1] not in hub.connections and sinks[1].aborted
    assert "failed; closing it" in caplog.text
    before = [len(s.written) for s in sinks]
    hub.dispatch(_entry(st, book, 2, ["m1"], 2.5))
    hub.flush()
    assert [len(s.written) - b for s, b in zip(sinks, before)] == [1, 0, 1]  # nobody stranded behind it
    assert b'"price":2.5' in sinks[0].written[-1] and sinks[2].written[-1] is sinks[0].written[-1]
    assert not conns[0].closed and not conns[2].closed
    hub.close_all()


async def test_a_heartbeat_that_evicts_a_slow_consumer_still_reaches_every_other_connection() -> None:
    """A heartbeat pushed over a client's budget while its resync snapshot is still being written
    evicts it, which clears its subscriptions mid-loop: the other connections of the interval must
    still get their heartbeat (before, the loop raised and the interval's heartbeat task died)."""
    st = _state()
    book = _load(st, 3)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    slow = hub.connect("sse", heartbeat_ms=60_000)
    ok = hub.connect("sse", heartbeat_ms=60_000)
    for c in (slow, ok):
        await hub.subscribe(c, Filter.parse(market="m1"))
        await hub.subscribe(c, Filter.parse(market="m2"))
        c.take()
    hub.dispatch(_entry(st, book, 2, ["m1", "m2"], 2.5))
    ok.take()
    slow.max_bytes = slow.outbox_bytes + 40  # the next heartbeat crosses it; collapsing cannot help
    slow.snapshot_in_flight = True  # its resync snapshot is still being written: over budget = evicted
    hub.heartbeat([slow, ok])
    assert slow.closed and slow.close_code == SLOW_CONSUMER_CODE
    got = ok.take()
    assert len(got) == 2 and all(b"heartbeat" in f for f in got)  # one per subscription
    hub.close_all()


async def test_a_best_view_that_fails_on_an_entry_still_lets_its_deltas_through(caplog) -> None:
    """The best view runs first in dispatch: its failure must not cost the delta subscribers the
    entry (it did: the whole fan-out of that entry was aborted). Its own subscribers are closed
    (they reconnect to a fresh best view)."""
    st = _state()
    book = _load(st, 3)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    sinks = [_RecordingSink(), _RecordingSink()]
    deltas, best = [hub.connect("sse", heartbeat_ms=60_000, sink=s) for s in sinks]  # type: ignore[arg-type]
    await hub.subscribe(deltas, Filter.parse(market="m1"))
    await hub.subscribe(best, Filter.parse(market="m1"), view="best")
    hub.flush()

    def broken(entry: object) -> None:
        raise RuntimeError("a bug in the best view")
    hub.best.on_entry = broken  # type: ignore[method-assign]
    before = len(sinks[0].written)
    hub.dispatch(_entry(st, book, 2, ["m1"], 2.5))
    hub.flush()
    assert len(sinks[0].written) == before + 1 and b'"price":2.5' in sinks[0].written[-1]
    assert not deltas.closed
    assert best.closed and best not in hub.connections
    assert "the best view" in caplog.text
    hub.close_all()


def test_a_market_type_filter_takes_raw_types_with_their_specifiers_and_keys_by_sport() -> None:
    """``market_type=raw:uof_412`` matches every line of that unmapped market (its key carries its
    specifiers: ``raw:uof_412:total=5.5`` — the type was taken as ``raw``); a soccer regular-time
    total keys as the full-time total, an ice hockey one does not (the sport decides)."""
    from streaming.state import keys_of

    raw = Market(market_id="uof:m1", source="uof", event_id="uof:e1", sport="ice_hockey", market_type="raw:uof_412",
                 specifiers={"total": "5.5"})
    assert Filter.parse(market_type="raw:uof_412").match(raw.market_id, keys_of(raw))
    assert Filter.parse(market_type="raw:uof_412:total=5.5").match(raw.market_id, keys_of(raw))
    assert not Filter.parse(market_type="raw:uof_8").match(raw.market_id, keys_of(raw))
    rt = {"period": "rt", "line": "2.5"}
    soccer = Market(market_id="uof:m2", source="uof", event_id="uof:e2", sport="soccer", market_type="total", specifiers=rt)
    hockey = Market(market_id="uof:m3", source="uof", event_id="uof:e3", sport="ice_hockey", market_type="total", specifiers=rt)
    full_time = Filter.parse(market_type="total:line=2.5")
    assert full_time.match(soccer.market_id, keys_of(soccer))
    assert not full_time.match(hockey.market_id, keys_of(hockey))


def _books_per_sub(frames: list[bytes], books: dict[int, dict]) -> list[dict]:
    """Apply WS frames to one local book per subscription id (``sub``), as a client does: an image
    replaces, a delta whose seq is not above the held one is a duplicate and is dropped."""
    out = []
    for raw in frames:
        msg = msgspec.json.decode(raw)
        out.append(msg)
        book = books.setdefault(msg.get("sub", 0), {})
        if msg["type"] == "snapshot":
            book.clear()
            book.update({m["market_id"]: msgspec.convert(m, Market) for m in msg["markets"]})
        elif msg["type"] == "delta":
            d = DELTA_DECODER.decode(raw)
            held = book.get(d.market_id)
            if held is None or d.seq > held.seq:
                book[d.market_id] = apply_delta(held, d)
    return out


def _change(st: NodeState, book: Book, entry_no: int, mid: str, sel: str, price: float):
    feed = Feed(None)  # type: ignore[arg-type]
    d = book.apply(feed.price(mid, sel, price))
    assert d is not None
    return st.apply_entry(0, f"{entry_no}-0", [d], now_ms())


async def test_a_collapse_during_dispatch_waits_for_every_subscription_of_the_connection() -> None:
    """One WebSocket connection, two subscriptions ({market: m1} and {}), a client that stops
    reading. The entry that takes the connection over its budget reaches the first subscription's
    group first; collapsing right then merged the second subscription's queued m1 deltas from m1 as
    the node holds it — with this entry's seq — and the second subscription's own delta of the entry
    came after it, a duplicate every client drops: its change (selection 2) was lost, the market
    read fresh. The collapse now runs once every group has been given the entry."""
    st = _state()
    book = _load(st, 2)  # m0: filler, m1
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    conn = hub.connect("ws", heartbeat_ms=60_000)
    narrow = await hub.subscribe(conn, Filter.parse(market="m1"))
    wide = await hub.subscribe(conn, Filter())
    books: dict[int, dict] = {}
    _books_per_sub(conn.take(), books)
    n = 2
    for i in range(8):  # changes of m1 selection 1 queued for both: merged by a collapse
        hub.dispatch(_change(st, book, n, "m1", "1", 2.1 + i / 100))
        n += 1
    conn.max_bytes = conn.outbox_bytes + 100  # the next delta crosses the budget
    hub.dispatch(_change(st, book, n, "m1", "2", 9.9))  # the change that was lost
    assert hub.collapses == 1 and hub.slow_resyncs == 0 and not conn.closed
    msgs = _books_per_sub(conn.take(), books)
    assert any(m.get("conflated") for m in msgs)
    for sub in (narrow, wide):
        held = books[sub.id]["m1"]
        assert held.seq == st.markets["m1"].seq
        assert held == st.markets["m1"], sub  # selection 2 at 9.9, as the node (REST) has it
    assert books[wide.id] == st.markets
    hub.close_all()


async def test_a_collapse_takes_in_what_the_conflation_window_still_holds() -> None:
    """A conflated subscription (``conflate_ms``) whose client stops reading: a heartbeat takes it
    over its budget while the window still holds a change of m1. The collapse merged the queued m1
    messages from m1 as the node holds it (that change's seq) with only their own selections; the
    window then sent the change as is, with the same seq: a duplicate every client drops, selection
    2 lost and fresh. The collapse now takes the window's changes of the markets it merges."""
    st = _state()
    book = _load(st, 2)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    conn = hub.connect("ws", heartbeat_ms=60_000)
    sub = await hub.subscribe(conn, Filter.parse(market="m1"), conflate_ms=60_000)
    books: dict[int, dict] = {}
    _books_per_sub(conn.take(), books)
    for n in range(2, 8):  # windows of one change of selection 1 each: queued (the client does not read)
        hub.dispatch(_change(st, book, n, "m1", "1", 2.0 + n / 100))
        hub.flush_conflated(60_000)
    hub.dispatch(_change(st, book, 8, "m1", "2", 9.9))  # gathered in the next window
    assert sub.cpending and "m1" in sub.cpending
    conn.max_bytes = conn.outbox_bytes + 40  # the next heartbeat crosses the budget
    hub.heartbeat([conn])
    assert hub.collapses == 1 and hub.slow_resyncs == 0 and not conn.closed
    hub.flush_conflated(60_000)  # the window's end
    conn.max_bytes = 1 << 20
    _books_per_sub(conn.take(), books)
    assert books[sub.id]["m1"] == st.markets["m1"]  # selection 2 at 9.9
    # the next change follows in order (nothing claimed a seq it does not carry)
    hub.dispatch(_change(st, book, 9, "m1", "1", 2.3))
    hub.flush_conflated(60_000)
    msgs = _books_per_sub(conn.take(), books)
    assert [m["seq"] for m in msgs if m["type"] == "delta"] == [st.markets["m1"].seq]
    assert books[sub.id]["m1"] == st.markets["m1"]
    hub.close_all()


class _Log:
    """A store's delta log for Hub's Redis replay (log_range / first_log_id); ``while_read``
    runs once inside the first read (a live entry arriving while the replay reads)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, list]] = []
        self.while_read: object = None

    async def log_range(self, p: int, after: str, *, count: int | None = None) -> list[tuple[str, list]]:
        rows = [(eid, ds) for eid, ds in self.entries if parse_stream_id(eid) > parse_stream_id(after)]
        cb, self.while_read = self.while_read, None
        if callable(cb):
            cb()
        return rows[:count]

    async def first_log_id(self, p: int) -> str | None:
        return "1-0"


def _redis_resume_node(*mids: str) -> tuple[NodeState, Feed, Book, "_Log", Hub]:
    """A one-partition node holding images of ``mids`` that serves every resume from its log
    (no replay ring), its feed's book, the log and the hub."""
    st = NodeState(Settings(), 1, NodeOptions(replay_ring_entries=0))
    feed = Feed(None)  # type: ignore[arg-type]
    book = Book()
    for mid in mids:
        book.apply(feed.image(mid))
    st.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    log = _Log()
    return st, feed, book, log, Hub(st, log, outbox_max_bytes=1 << 20)  # type: ignore[arg-type]


async def test_a_collapse_after_a_redis_replay_waits_for_the_live_entries_held_meanwhile() -> None:
    """A subscription resumes from Redis on a connection whose other subscription has deltas
    queued (its client is not reading); an entry changing m1 arrives while the log is read (held
    for the replay). The replay's frames take the connection over budget: collapsing before the held
    entry was queued merged the replayed m1 deltas from m1 as the node holds it — the held entry's
    seq — and the held delta came after it, a duplicate every client drops (selection 2 lost, read
    fresh). The collapse now runs after the held entries."""
    st, feed, book, log, hub = _redis_resume_node("m0", "m1")

    def write(n: int, mid: str, sel: str, price: float) -> None:
        d = book.apply(feed.price(mid, sel, price))
        assert d is not None
        log.entries.append((f"{n}-0", [d]))
        entry = st.apply_entry(0, f"{n}-0", [d], now_ms())
        assert entry is not None
        hub.dispatch(entry)

    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, Filter.parse(market="m0"))
    books: dict[int, dict] = {2: {"m1": st.markets["m1"]}}  # (what the resuming client holds)
    _books_per_sub(conn.take(), books)  # ack and snapshot of the first subscription
    token = st.token.decode()  # the resuming client's position: before every m1 change below
    n = 2
    for i in range(6):  # m1 changes the resuming client missed
        write(n, "m1", "1", 2.01 + i / 100)
        n += 1
    for i in range(20):  # the other subscription's queue (its client does not read)
        write(n, "m0", "1", 3.0 + i / 100)
        n += 1
    conn.max_bytes = conn.outbox_bytes + 1_000  # the replay fits the budget, not on top of that queue
    log.while_read = lambda: write(n, "m1", "2", 9.9)
    resumed = await hub.subscribe(conn, Filter.parse(market="m1"), resume=token)
    assert resumed.id == 2 and hub.resumes == {"recovered": 1, "not_recovered": 0}
    assert hub.collapses >= 1 and hub.slow_resyncs == 0 and not conn.closed
    msgs = _books_per_sub(conn.take(), books)
    assert any(m.get("conflated") for m in msgs)
    assert books[2]["m1"] == st.markets["m1"]  # selection 2 at 9.9
    assert books[1]["m0"] == st.markets["m0"]
    hub.close_all()


@pytest.mark.parametrize("node", ["applied_the_move", "loaded_after_the_move"])
async def test_a_redis_resume_of_a_restricted_credential_removes_a_market_that_left_its_sight(node: str) -> None:
    """A tenant sees soccer only; while its client is away m1 turns tennis (then changes again).
    Resumed from Redis, the move must reach it as live — ``removed``, never the tennis market's
    deltas. A node that applied the move knows m1 was soccer before it; one that loaded the
    partition after the move cannot tell whether the client held m1, or may see its changes: that
    resume is not recovered (a snapshot under the allow-lists) rather than guessed."""
    st, feed, book, log, hub = _redis_resume_node("m1", "m2")
    n = 2

    def write(u: object) -> None:
        nonlocal n
        d = book.apply(u)  # type: ignore[arg-type]
        assert d is not None
        log.entries.append((f"{n}-0", [d]))
        entry = st.apply_entry(0, f"{n}-0", [d], now_ms())
        assert entry is not None
        hub.dispatch(entry)
        n += 1

    soccer = frozenset({"soccer"})
    f = Filter(sport=soccer, visible=(soccer, None, None))
    first = hub.connect("sse", heartbeat_ms=60_000)
    await hub.subscribe(first, f)  # (the node has served this credential since before the token)
    hub.disconnect(first)
    write(feed.price("m2", "1", 2.5))
    token = st.token.decode()
    write(feed.header("m1", sport="tennis"))  # out of the tenant's sight
    write(feed.price("m1", "1", 7.5))
    write(feed.price("m2", "1", 2.6))
    if node == "loaded_after_the_move":
        st.load_heads[0] = st.positions[0]
    conn = hub.connect("ws", heartbeat_ms=60_000)
    await hub.subscribe(conn, f, resume=token)
    msgs = [msgspec.json.decode(fr) for fr in conn.take()]
    types = [m["type"] for m in msgs]
    if node == "applied_the_move":
        assert hub.resumes == {"recovered": 1, "not_recovered": 0}
        assert [(m["type"], m["market_id"]) for m in msgs if m["type"] in ("delta", "removed")] == [
            ("removed", "m1"), ("delta", "m2")]
        assert b"tennis" not in b"".join(msgspec.json.encode(m) for m in msgs)
    else:
        assert hub.resumes == {"recovered": 0, "not_recovered": 1}
        assert types[:3] == ["ack", "resumed", "snapshot"] and msgs[1]["recovered"] is False
        assert [m["market_id"] for m in msgs[2]["markets"]] == ["m2"]
    hub.close_all()


def _wire_messages(frames: list[bytes], raw_ws: bool) -> list[dict]:
    """The JSON messages in an outbox's frames: SSE events' data, or complete (unmasked) WebSocket
    text frames' payloads."""
    data = b"".join(frames)
    out: list[dict] = []
    if not raw_ws:
        for block in data.split(b"\n\n"):
            lines = [ln[6:] for ln in block.split(b"\n") if ln.startswith(b"data: ")]
            if lines:
                out.append(msgspec.json.decode(b"\n".join(lines)))
        return out
    i = 0
    while i < len(data):
        n, i = data[i + 1] & 0x7F, i + 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        out.append(msgspec.json.decode(data[i:i + n]))
        i += n
    return out


@pytest.mark.parametrize("transport", ["sse", "ws_frames"])
async def test_resumes_that_share_a_ring_replay_each_get_the_time_their_own_resumed_was_sent(transport: str) -> None:
    """A reconnect storm's resumes from one token share one replay from the ring (its frames queued
    by reference). ``resumed`` carries ``as_of`` — when it was queued for THAT resume, a send time
    clients measure their lag from — so it is never the shared replay's: each resume gets its own,
    after the replayed deltas' ``sent_at`` (when they were first sent)."""
    import asyncio
    st = _state()
    book = _load(st, 2)
    hub = Hub(st, None, outbox_max_bytes=1 << 20)
    raw = transport == "ws_frames"
    token = st.token.decode()
    for n in (2, 3):
        hub.dispatch(_entry(st, book, n, ["m0", "m1"], 2.0 + n / 10))
    got = []
    for _ in range(2):
        await asyncio.sleep(0.005)  # (the two resumes a few ms apart)
        t0 = now_ms()
        conn = hub.connect("ws", heartbeat_ms=60_000, ws_raw=True) if raw else hub.connect("sse", heartbeat_ms=60_000)
        await hub.subscribe(conn, Filter(), resume=token)
        t1 = now_ms()
        msgs = [m for m in _wire_messages(conn.take(), raw) if m["type"] != "ack"]
        assert msgs[0]["type"] == "resumed" and msgs[0]["recovered"] is True, msgs[0]
        assert type(msgs[0].get("as_of")) is int and t0 <= msgs[0]["as_of"] <= t1, (t0, msgs[0], t1)
        deltas = [m for m in msgs if m["type"] == "delta"]
        assert len(deltas) == 4 and all(d["sent_at"] <= msgs[0]["as_of"] for d in deltas)
        got.append((msgs[0]["as_of"], deltas))
    assert hub.replay_builds == 1 and hub.replay_shares == 1  # the replay was shared …
    assert got[0][1] == got[1][1]
    assert got[1][0] > got[0][0]  # … the resumed was not
    hub.close_all()
