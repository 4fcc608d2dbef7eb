"""Push consumer over SSE (feed.sources.sse) against the push simulator, and
the SSE parser on the WHATWG rules. End-to-end scenarios: tests/test_push_harness.py."""

from __future__ import annotations

import pytest

from feed.sources.sse import SSEError, SSEEvent, SSEParser

pytestmark = pytest.mark.timeout(60)


# -- the parser ------------------------------------------------------------------------------------


def parse(*chunks: bytes) -> tuple[list[SSEEvent], SSEParser]:
    p = SSEParser()
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(p.feed(c))
    return out, p


def test_fields_data_lines_ids_and_comments() -> None:
    events, p = parse(b": hello\nretry: 250\nevent: odds\nid: 1-1\ndata: {\"a\":\ndata:  1}\n\n"
                      b"data: x\n\n")
    assert events == [SSEEvent("odds", b'{"a":\n 1}', "1-1"), SSEEvent("message", b"x", "1-1")]
    assert p.retry_ms == 250 and p.last_event_id == "1-1"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(eol: bytes) -> None:
    events, _ = parse(b"event: a" + eol + b"data: 1" + eol + eol + b"data: 2" + eol + eol)
    assert [(e.event, e.data) for e in events] == [("a", b"1"), ("message", b"2")]


def test_split_anywhere_including_between_cr_and_lf() -> None:
    stream = b"\xef\xbb\xbfid: 7\r\ndata: abc\r\ndata: def\r\n\r\nevent: e\r\ndata: z\r\n\r\n"
    whole, _ = parse(stream)
    assert whole == [SSEEvent("message", b"abc\ndef", "7"), SSEEvent("e", b"z", "7")]
    for cut in range(1, len(stream)):
        assert parse(stream[:cut], stream[cut:])[0] == whole, cut
    assert parse(*[bytes([b]) for b in stream])[0] == whole


def test_edge_rules() -> None:
    events, p = parse(b"data\n\n"            # no colon: field with an empty value
                      b"data:nospace\n\n"    # no space after the colon
                      b"event: x\n\n"        # no data: nothing dispatched, type reset
                      b"data: after\n\n"
                      b"id: bad\x00id\ndata: y\n\n"  # NUL in id: ignored
                      b"retry: 1s\n"          # not digits: ignored
                      b"unknown: field\n"
                      b"id\ndata: z\n\n"     # empty id clears it
                      b"data: unterminated")  # never dispatched
    assert [(e.event, e.data, e.id) for e in events] == [
        ("message", b"", None), ("message", b"nospace", None), ("message", b"after", None),
        ("message", b"y", None), ("message", b"z", None)]
    assert p.retry_ms is None


def test_oversized_events_are_refused() -> None:
    p = SSEParser(max_event_bytes=64)
    with pytest.raises(SSEError):
        p.feed(b"data: " + b"x" * 100)
    p = SSEParser(max_event_bytes=64)
    with pytest.raises(SSEError):
        p.feed(b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n")
