"""feed.sources.esa_protocol.EsaProtocol, sans I/O: bytes in, events and bytes out (no sockets)."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from conftest import BETFAIR_DATA, require_shared_data

from feed.sources import esa_protocol
from feed.sources.esa_protocol import (
    Authenticated,
    Connected,
    Delivery,
    EsaError,
    EsaFatalError,
    EsaFramingError,
    EsaProtocol,
    Event,
    Heartbeat,
    Ignored,
    MarketChanges,
    Phase,
    ResumeRejected,
    SegmentDropped,
    SegmentStarted,
    StatusFailure,
    StreamStatus,
    Subscribed,
)
from feed.sources.replay import read_messages, recording_files

MARKET_DATA_FILTER = {"fields": ["EX_BEST_OFFERS_DISP", "EX_MARKET_DEF"], "ladderLevels": 3}


def make(**overrides: Any) -> EsaProtocol:
    options: dict[str, Any] = {
        "app_key": "key",
        "session_token": "sess",
        "market_filter": {"marketIds": ["1.1"]},
        "market_data_filter": MARKET_DATA_FILTER,
        "heartbeat_ms": 500,
    }
    options.update(overrides)
    proto = EsaProtocol(**options)
    proto.connection_made()
    return proto


def line(**msg: Any) -> bytes:
    return orjson.dumps(msg) + b"\r\n"


def feed(proto: EsaProtocol, *msgs: bytes) -> list[Event]:
    proto.receive_data(b"".join(msgs))
    return proto.events_received()


def sent(proto: EsaProtocol) -> list[dict[str, Any]]:
    data = proto.data_to_send()
    assert data == b"" or data.endswith(b"\r\n")
    return [orjson.loads(x) for x in data.split(b"\r\n") if x]


CONNECTION = line(op="connection", connectionId="c-1")
AUTH_OK = line(op="status", id=1, statusCode="SUCCESS", connectionClosed=False)
SUB_OK = line(op="status", id=2, statusCode="SUCCESS", connectionClosed=False)


def image(clk: str = "AAA", initial_clk: str = "INIT", **extra: Any) -> bytes:
    return line(**{"op": "mcm", "id": 2, "initialClk": initial_clk, "clk": clk, "heartbeatMs": 500, "pt": 1,
                   "ct": "SUB_IMAGE", "mc": [{"id": "1.1", "img": True, "rc": [{"id": 7, "ltp": 2.0}]}], **extra})


def delta(clk: str, **extra: Any) -> bytes:
    return line(op="mcm", id=2, clk=clk, pt=2, mc=[{"id": "1.1", "rc": [{"id": 7, "ltp": 2.02}]}], **extra)


def handshake(proto: EsaProtocol) -> list[dict[str, Any]]:
    """Run connection → auth → subscription; returns the requests sent."""
    requests = []
    feed(proto, CONNECTION)
    requests += sent(proto)
    feed(proto, AUTH_OK)
    requests += sent(proto)
    feed(proto, SUB_OK)
    assert proto.phase is Phase.AWAIT_IMAGE
    return requests


def delivered(events: list[Event]) -> list[bytes]:
    return [x for e in events if isinstance(e, Delivery) for x in e.lines]


# -- handshake and subscription ---------------------------------------------------------


def test_handshake_bytes_and_events() -> None:
    proto = make(conflate_ms=0)
    assert proto.phase is Phase.AWAIT_CONNECTION and proto.data_to_send() == b""
    events = feed(proto, CONNECTION)
    assert events == [Connected("c-1")] and proto.phase is Phase.AUTHENTICATING
    assert proto.data_to_send() == b'{"op":"authentication","id":1,"appKey":"key","session":"sess"}\r\n'
    events = feed(proto, AUTH_OK)
    assert events == [Authenticated(1)] and proto.phase is Phase.SUBSCRIBING
    assert proto.data_to_send() == (
        b'{"op":"marketSubscription","id":2,"marketFilter":{"marketIds":["1.1"]},'
        b'"marketDataFilter":{"fields":["EX_BEST_OFFERS_DISP","EX_MARKET_DEF"],"ladderLevels":3},'
        b'"heartbeatMs":500,"conflateMs":0,"segmentationEnabled":true}\r\n'
    )
    assert feed(proto, SUB_OK) == [Subscribed(2, resumed=False)] and proto.phase is Phase.AWAIT_IMAGE
    events = feed(proto, image(heartbeatMs=1000))
    assert proto.phase is Phase.STREAMING and proto.heartbeat_ms == 1000  # the server's echo wins
    assert [type(e) for e in events] == [StreamStatus, MarketChanges] and events[0] == StreamStatus(None)
    assert proto.data_to_send() == b""


def test_subscription_without_and_with_clk() -> None:
    assert "clk" not in handshake(make())[1] and "conflateMs" not in handshake(make())[1]
    # one token alone is no cursor
    assert make(initial_clk="I", clk=None).cursor == (None, None)
    assert "initialClk" not in handshake(make(clk="C"))[1]
    proto = make(initial_clk="I", clk="C", segmentation=False)
    sub = handshake(proto)[1]
    assert sub["initialClk"] == "I" and sub["clk"] == "C" and sub["segmentationEnabled"] is False
    # the subscription after a reconnect carries the committed cursor, and request ids keep growing
    events = feed(proto, delta("C2"))
    proto.commit(next(e for e in events if isinstance(e, Delivery)))
    proto.connection_lost()
    proto.connection_made()
    reqs = handshake_ids(proto, auth_id=3, sub_id=4)
    assert [r["id"] for r in reqs] == [3, 4] and (reqs[1]["initialClk"], reqs[1]["clk"]) == ("I", "C2")


def handshake_ids(proto: EsaProtocol, auth_id: int, sub_id: int) -> list[dict[str, Any]]:
    requests = []
    feed(proto, CONNECTION)
    requests += sent(proto)
    feed(proto, line(op="status", id=auth_id, statusCode="SUCCESS", connectionClosed=False))
    requests += sent(proto)
    assert feed(proto, line(op="status", id=sub_id, statusCode="SUCCESS", connectionClosed=False)) == [
        Subscribed(sub_id, resumed=True)
    ]
    return requests


def test_status_for_another_request_or_phase_is_not_a_step() -> None:
    proto = make()
    feed(proto, CONNECTION)
    sent(proto)
    assert feed(proto, line(op="status", id=9, statusCode="SUCCESS")) == []
    assert proto.phase is Phase.AUTHENTICATING and proto.data_to_send() == b""
    assert feed(proto, line(op="ohlc", id=9)) == [Ignored("ohlc")]


# -- deliveries and the cursor ----------------------------------------------------------


def test_consecutive_lines_are_one_batch_and_the_cursor_moves_only_on_commit() -> None:
    proto = make()
    handshake(proto)
    events = feed(proto, image("A1"), delta("A2"), delta("A3"))
    changes = [e for e in events if isinstance(e, MarketChanges)]
    assert len(changes) == 1 and len(changes[0].lines) == 3 and not changes[0].segmented
    assert (changes[0].initial_clk, changes[0].clk) == ("INIT", "A3")
    assert changes[0].lines[1] == delta("A2")[:-2]  # raw bytes, without \r\n
    assert proto.cursor == (None, None)
    proto.commit(changes[0])
    assert proto.cursor == ("INIT", "A3")
    # a delta without clk leaves the cursor alone
    events = feed(proto, line(op="mcm", id=2, pt=3, mc=[]))
    proto.commit(events[0])  # type: ignore[arg-type]
    assert proto.cursor == ("INIT", "A3")


def test_segmented_image_is_one_delivery_with_clk_from_seg_end() -> None:
    proto = make()
    handshake(proto)
    start = line(op="mcm", id=2, initialClk="I1", pt=1, ct="SUB_IMAGE", segmentType="SEG_START", mc=[{"id": "1.1"}])
    middle = line(op="mcm", id=2, pt=1, ct="SUB_IMAGE", segmentType="SEG", mc=[{"id": "1.2"}])
    end = line(op="mcm", id=2, clk="K1", pt=1, ct="SUB_IMAGE", segmentType="SEG_END", mc=[{"id": "1.3"}])
    events = feed(proto, start, middle)
    assert [type(e) for e in events] == [StreamStatus, SegmentStarted] and proto.segment_open
    events = feed(proto, end, delta("K2"))
    assert [type(e) for e in events] == [MarketChanges, MarketChanges]
    seg, after = events
    assert isinstance(seg, MarketChanges) and seg.segmented and seg.lines == [start[:-2], middle[:-2], end[:-2]]
    assert (seg.initial_clk, seg.clk) == ("I1", "K1")
    assert isinstance(after, MarketChanges) and not after.segmented and after.clk == "K2"
    proto.commit(seg)
    assert proto.cursor == ("I1", "K1")


def test_a_segment_cut_by_the_connection_is_never_delivered() -> None:
    proto = make()
    handshake(proto)
    proto.commit(feed(proto, image("C0"))[-1])  # type: ignore[arg-type]
    start = line(op="mcm", id=2, pt=1, ct="RESUB_DELTA", segmentType="SEG_START", mc=[{"id": "1.1"}])
    middle = line(op="mcm", id=2, pt=1, ct="RESUB_DELTA", segmentType="SEG", mc=[{"id": "1.2"}])
    assert delivered(feed(proto, start, middle)) == []
    proto.receive_data(b'{"op":"mcm","id":2,"clk":"C9","segmentType":"SEG_E')  # SEG_END cut mid-line
    proto.connection_lost()
    assert proto.events_received() == [SegmentDropped("connection_lost", 2)]
    assert proto.cursor == ("INIT", "C0") and proto.phase is Phase.CLOSED
    assert feed(proto, delta("late")) == []  # nothing is taken after the connection is gone
    # the next connection starts clean: the tail of the cut line is not glued to its first line
    proto.connection_made()
    assert feed(proto, CONNECTION) == [Connected("c-1")]


def test_a_segment_interrupted_by_another_message_is_dropped() -> None:
    proto = make()
    handshake(proto)
    start = line(op="mcm", id=2, pt=1, segmentType="SEG_START", mc=[])
    events = feed(proto, start, delta("X"))
    assert SegmentDropped("unsegmented_message", 1) in events and delivered(events) == [delta("X")[:-2]]
    events = feed(proto, start, start)
    assert SegmentDropped("restarted", 1) in events and delivered(events) == []
    proto = make()
    handshake(proto)
    events = feed(proto, line(op="mcm", id=2, pt=1, segmentType="SEG_END", clk="Z", mc=[]))
    assert delivered(events) == [] and Ignored("mcm", "SEG_END without SEG_START") in events


# -- status, failures, 503, heartbeats ---------------------------------------------------


def test_status_503_and_recovery_are_stream_status_changes() -> None:
    proto = make()
    handshake(proto)
    down = line(op="mcm", id=2, status=503)
    events = feed(proto, image(), down, down, delta("B"), delta("C"))
    assert [e for e in events if isinstance(e, StreamStatus)] == [
        StreamStatus(None), StreamStatus(503), StreamStatus(None)
    ]
    assert len(delivered(events)) == 5  # the 503 lines are handed over too
    # a new connection reports the first status again
    proto.connection_lost()
    proto.connection_made()
    assert StreamStatus(None) in feed(proto, delta("D"))


@pytest.mark.parametrize(
    ("at", "code", "fatal", "what"),
    [
        ("auth", "NO_SESSION", True, "authentication"),
        ("auth", "INVALID_APP_KEY", True, "authentication"),
        ("sub", "SUBSCRIPTION_LIMIT_EXCEEDED", True, "subscription"),
        ("sub", "TOO_MANY_REQUESTS", False, "subscription"),
        ("stream", "TIMEOUT", False, "stream"),
    ],
)
def test_failures_close_the_protocol(at: str, code: str, fatal: bool, what: str) -> None:
    proto = make()
    feed(proto, CONNECTION)
    if at != "auth":
        feed(proto, AUTH_OK)
    if at == "stream":
        feed(proto, SUB_OK, image())
    sent(proto)
    rid = {"auth": 1, "sub": 2, "stream": None}[at]
    failure = line(op="status", id=rid, statusCode="FAILURE", errorCode=code, errorMessage="m",
                   connectionClosed=True)
    events = feed(proto, failure, delta("after"))
    assert events == [StatusFailure(code, "m", what, True, fatal)]
    assert proto.phase is Phase.CLOSED and proto.data_to_send() == b""
    err = events[0].error()  # type: ignore[attr-defined]
    assert type(err) is (EsaFatalError if fatal else EsaError) and err.code == code and err.request == what
    # no errorCode at all
    proto = make()
    assert feed(proto, line(op="status", statusCode="FAILURE")) == [
        StatusFailure("UNEXPECTED_ERROR", None, "stream", None, False)
    ]


def test_invalid_clock_clears_the_cursor_and_resubscribes_on_an_open_connection() -> None:
    proto = make(initial_clk="OLD-I", clk="OLD-C")
    reqs = handshake(proto)
    assert reqs[1]["clk"] == "OLD-C"
    # a delivery emitted before the rejection must not bring the rejected tokens back
    events = feed(proto, delta("STALE"),
                  line(op="status", id=2, statusCode="FAILURE", errorCode="INVALID_CLOCK", connectionClosed=False))
    assert events[-1] == ResumeRejected(resubscribed=True)
    assert proto.cursor == (None, None) and proto.phase is Phase.SUBSCRIBING
    resub = sent(proto)
    assert len(resub) == 1 and resub[0]["id"] == 3 and "clk" not in resub[0] and "initialClk" not in resub[0]
    proto.commit(events[1])  # type: ignore[arg-type]
    assert proto.cursor == (None, None)
    assert feed(proto, line(op="status", id=3, statusCode="SUCCESS")) == [Subscribed(3, resumed=False)]
    proto.commit(delivered_event(feed(proto, image("NEW"))))
    assert proto.cursor == ("INIT", "NEW")


def delivered_event(events: list[Event]) -> Delivery:
    return next(e for e in events if isinstance(e, Delivery))


def test_invalid_clock_with_the_connection_closed_asks_for_a_reconnect() -> None:
    proto = make(initial_clk="I", clk="C")
    handshake(proto)
    events = feed(proto, line(op="status", id=2, statusCode="FAILURE", errorCode="INVALID_CLOCK",
                              connectionClosed=True))
    assert events == [ResumeRejected(resubscribed=False)] and proto.phase is Phase.CLOSED
    assert proto.cursor == (None, None) and proto.data_to_send() == b""
    # without stored tokens INVALID_CLOCK is an ordinary failure
    proto = make()
    handshake(proto)
    events = feed(proto, line(op="status", id=2, statusCode="FAILURE", errorCode="INVALID_CLOCK",
                              connectionClosed=True))
    assert events == [StatusFailure("INVALID_CLOCK", None, "subscription", True, False)]


def test_heartbeats_are_deliveries_that_carry_clk() -> None:
    proto = make()
    handshake(proto)
    proto.commit(delivered_event(feed(proto, image("H0"))))
    events = feed(proto, line(op="mcm", id=2, clk="H1", pt=5, ct="HEARTBEAT"),
                  line(op="mcm", id=2, clk="H2", pt=6, ct="HEARTBEAT"))
    assert [type(e) for e in events] == [Heartbeat, Heartbeat]
    assert [e.clk for e in events] == ["H1", "H2"]  # type: ignore[attr-defined]
    for e in events:
        proto.commit(e)  # type: ignore[arg-type]
    assert proto.cursor == ("INIT", "H2")


# -- framing ------------------------------------------------------------------------------


def session_bytes() -> bytes:
    seg = [
        line(op="mcm", id=2, initialClk="I", pt=1, ct="SUB_IMAGE", segmentType="SEG_START", mc=[{"id": "1.1"}]),
        line(op="mcm", id=2, pt=1, ct="SUB_IMAGE", segmentType="SEG", mc=[{"id": "1.2"}]),
        line(op="mcm", id=2, clk="S", pt=1, ct="SUB_IMAGE", segmentType="SEG_END", mc=[{"id": "1.3"}]),
    ]
    return b"".join([CONNECTION, AUTH_OK, SUB_OK, *seg, delta("D1"), b"not json\r\n",
                     line(op="mcm", id=2, status=503), line(op="mcm", id=2, clk="H", ct="HEARTBEAT"),
                     delta("D2"), b"\n", b'{"op":"mcm","id":2,"clk":"LF"}\n'])


def run_split(data: bytes, cuts: list[int]) -> tuple[list[Any], bytes, tuple[str | None, str | None]]:
    proto = make()
    events: list[Any] = []
    out = b""
    prev = 0
    for cut in [*cuts, len(data)]:
        proto.receive_data(data[prev:cut])
        prev = cut
        out += proto.data_to_send()
        for e in proto.events_received():
            if isinstance(e, Delivery):
                proto.commit(e)
                events.extend(("line", x) for x in e.lines)  # batching depends on the split
            else:
                events.append(e)
    return events, out, proto.cursor


def test_partial_lines_across_receive_data_calls() -> None:
    data = session_bytes()
    whole = run_split(data, [])
    assert whole[2] == ("I", "LF")
    assert ("line", b"not json") in whole[0] and ("line", b'{"op":"mcm","id":2,"clk":"LF"}') in whole[0]
    assert run_split(data, list(range(1, len(data)))) == whole  # one byte at a time
    rng = random.Random(5)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        assert run_split(data, cuts) == whole
    # \r\n split between calls
    proto = make()
    proto.receive_data(CONNECTION[:-1])
    assert proto.events_received() == []
    proto.receive_data(b"\n")
    assert proto.events_received() == [Connected("c-1")]


def test_a_line_too_long_is_a_framing_error() -> None:
    proto = make(max_line_bytes=100)
    proto.receive_data(b"x" * 60)
    with pytest.raises(EsaFramingError):
        proto.receive_data(b"x" * 60)
    proto = make(max_line_bytes=100)
    with pytest.raises(EsaFramingError):
        proto.receive_data(CONNECTION + b"y" * 101)
    proto = make(max_line_bytes=100)
    proto.receive_data(b"z" * 100 + b"\r\n")  # exactly at the limit is fine (handed over as not JSON)
    assert delivered(proto.events_received()) == [b"z" * 100]


# -- every shared recording ---------------------------------------------------------------


def _recordings() -> list[str]:
    if not BETFAIR_DATA.is_dir():
        return ["<shared data missing>"]
    return [str(p.relative_to(BETFAIR_DATA)) for p in recording_files([BETFAIR_DATA])]


@pytest.mark.shared_data
@pytest.mark.parametrize("name", _recordings())
def test_every_shared_recording_goes_through_with_one_decode_per_line(name: str, monkeypatch) -> None:
    root = require_shared_data()
    messages = read_messages(root / name)
    if messages is None:
        pytest.skip(f"{name} is not an ESA recording")
    decodes = 0
    real = esa_protocol._decode_envelope

    def counting(raw: bytes) -> Any:
        nonlocal decodes
        decodes += 1
        return real(raw)

    monkeypatch.setattr(esa_protocol, "_decode_envelope", counting)

    # what the protocol should hand over, worked out independently
    expected: list[bytes] = []
    segment: list[bytes] | None = None
    initial_clk = clk = None
    for raw in messages:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):
            (segment if segment is not None else expected).append(raw)
            continue
        if msg.get("op") != "mcm":
            continue
        seg = msg.get("segmentType")
        if seg is None:
            expected.append(raw)
        elif seg == "SEG_START":
            segment = [raw]
        elif seg == "SEG_END" and segment is not None:
            expected.extend([*segment, raw])
            segment = None
        elif segment is not None:
            segment.append(raw)
        if seg in (None, "SEG_END"):
            initial_clk = msg.get("initialClk") or initial_clk
            clk = msg.get("clk") or clk

    data = b"".join(m + b"\r\n" for m in messages)
    rng = random.Random(len(data))
    proto = make()
    got: list[bytes] = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 1 << 16)
        proto.receive_data(data[pos:pos + step])
        pos += step
        for event in proto.events_received():
            if isinstance(event, StatusFailure):
                pytest.fail(f"{name}: unexpected failure {event}")
            if isinstance(event, Delivery):
                got.extend(event.lines)
                proto.commit(event)
    proto.connection_lost()
    assert got == expected, name
    assert decodes == len([m for m in messages if m]) == proto.messages_received
    if clk is not None:
        assert proto.cursor[1] == clk and (initial_clk is None or proto.cursor[0] == initial_clk)


def test_a_segment_that_never_ends_is_dropped_past_its_bound(monkeypatch: Any) -> None:
    """A SEG_START without its SEG_END held every line after it (found by the ingest audit); past
    the bound it is dropped and the connection ends (a framing error, as a line too long)."""
    import feed.sources.esa_protocol as esa_protocol

    monkeypatch.setattr(esa_protocol, "MAX_SEGMENT_BYTES", 2_000)
    proto = make()
    handshake(proto)
    start = line(op="mcm", id=2, pt=1, segmentType="SEG_START", mc=[])
    middle = line(op="mcm", id=2, pt=1, segmentType="SEG", mc=[{"id": "1.2", "rc": [{"id": 1, "atb": [[2.0, 1]]}] * 20}])
    with pytest.raises(EsaFramingError, match="segment longer"):  # its changes are lost: the connection ends
        feed(proto, start, *[middle] * 10)
    assert not proto.segment_open
