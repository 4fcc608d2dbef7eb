"""The fast path's direct read (streaming.server.read_direct): the request heads the protocol reads
itself, without httptools. It must read only a strict subset of HTTP/1.1 and, on it, agree with
httptools byte for byte — a request read one way by this reader and another by the parser would be
a request-smuggling hole. Pure: no sockets (the served path is in test_price_check_fast_path)."""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.server import MAX_HEADER_BYTES, MAX_HEADER_LINE, MAX_HEADERS, read_direct


@dataclass
class Route:
    """A fast route as the protocol sees it (streaming.fastpath.SyncRoute's path and body limit)."""

    path: str
    max_body_bytes: int = 64
    def deadline_s(self) -> float:
        return 1.0

    def answer(self, headers: list[tuple[bytes, bytes]], query: bytes, body: bytes,
               client: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        raise AssertionError("not answered here")

    def timed_out(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        raise AssertionError("not answered here")


ROUTES = {b"/v1/price-check": Route("/v1/price-check"), b"/v1/price-check/batch": Route("/v1/price-check/batch")}
LIMITS = {"max_header_bytes": MAX_HEADER_BYTES, "max_headers": MAX_HEADERS, "max_header_line": MAX_HEADER_LINE}


def read(data: bytes, **limits: int):  # type: ignore[no-untyped-def]
    return read_direct(data, ROUTES, **{**LIMITS, **limits})


def post(head: bytes, body: bytes = b"{}") -> bytes:
    return b"POST /v1/price-check HTTP/1.1\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def test_a_plain_check_is_read_with_its_headers_as_uvicorn_gives_them() -> None:
    data = (b"POST /v1/price-check?api_key=k HTTP/1.1\r\nHost: x\r\nX-Trace-Id:  bet-42 \t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n")
    r = read(data)
    assert r is not None
    assert r.route is ROUTES[b"/v1/price-check"] and r.query == b"api_key=k" and r.body == b"{}"
    assert r.headers == [(b"host", b"x"), (b"x-trace-id", b"bet-42"), (b"content-type", b"application/json"),
                         (b"content-length", b"2")]
    assert r.keep_alive and r.rest == b"GET / HTTP/1.1\r\n"  # the next request: for the parser
    assert read(post(b"Connection: close\r\n")).keep_alive is False  # type: ignore[union-attr]
    assert read(post(b"Connection: Keep-Alive\r\n")).keep_alive is True  # type: ignore[union-attr]
    assert read(post(b"", body=b"")) is not None  # an empty body (the endpoint answers 422)


def test_a_body_still_to_come_is_counted() -> None:
    """httpx writes the head and the body apart: a whole head is read, the body's missing bytes counted."""
    data = post(b"Host: x\r\n", body=b'{"a": 1}')
    r = read(data[:-3])
    assert r is not None and r.body == b'{"a":' and r.missing == 3 and r.rest == b""
    r = read(data[:data.index(b"\r\n\r\n") + 4])
    assert r is not None and r.body == b"" and r.missing == 8


@pytest.mark.parametrize("data", [
    pytest.param(b"GET /v1/price-check HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", id="another method"),
    pytest.param(b"POST /v1/markets HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", id="another path"),
    pytest.param(b"POST /v1/price%2Dcheck HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", id="an encoded path"),
    pytest.param(b"POST /v1/price-check HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", id="HTTP/1.0"),
    pytest.param(b"POST /v1/price-check HTTP/1.1\r\nHost: x\r\n\r\n", id="no Content-Length"),
    pytest.param(post(b"Content-Length: 2\r\n"), id="two Content-Lengths"),
    pytest.param(b"POST /v1/price-check HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", id="a signed length"),
    pytest.param(b"POST /v1/price-check HTTP/1.1\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n{}",
                 id="a 5000-digit length (int() raised: the connection aborted, a traceback logged)"),
    pytest.param(post(b"Transfer-Encoding: chunked\r\n"), id="Transfer-Encoding"),
    pytest.param(post(b"Expect: 100-continue\r\n"), id="Expect"),
    pytest.param(post(b"Connection: Upgrade\r\nUpgrade: h2c\r\n"), id="an upgrade offer"),
    pytest.param(post(b"Connection: close, TE\r\n"), id="a Connection list"),
    pytest.param(post(b"Proxy-Connection: close\r\n"), id="Proxy-Connection (llhttp reads it as Connection)"),
    pytest.param(post(b"Host : x\r\n"), id="space before the colon"),
    pytest.param(post(b"Host: x\r\n folded\r\n"), id="obs-fold"),
    pytest.param(post(b"Host: x\n"), id="a bare LF"),
    pytest.param(post(b"Host: caf\xc3\xa9\r\n"), id="obs-text"),
    pytest.param(post(b"Host: a\x7fb\r\n"), id="DEL in a value"),
    pytest.param(post(b"Bad Name: x\r\n"), id="a space in a name"),
    pytest.param(post(b": x\r\n"), id="an empty name"),
    pytest.param(b"POST /v1/price-check HTTP/1.1\r\nContent-Length: 65\r\n\r\n" + b"x" * 65, id="over the body limit"),
    pytest.param(b"POST /v1/price-check HTTP/1.1\r\nHost: x\r\n", id="the head not all here"),
])
def test_anything_outside_the_subset_is_left_to_httptools(data: bytes) -> None:
    assert read(data) is None


def test_the_head_limits_leave_a_request_to_httptools_which_refuses_it() -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS))  # with Content-Length: one too many
    assert read(post(many)) is None and read(post(many[8:])) is not None
    line = b"X-Long: " + b"v" * (MAX_HEADER_LINE - 8) + b"\r\n"
    assert read(post(line)) is None
    assert read(post(b"X-Big: v\r\n"), max_header_bytes=40) is None


@pytest.mark.timeout(60)
def test_a_head_built_to_make_the_reader_backtrack_is_refused_at_once() -> None:
    """Spaces around a header value could be taken before or after it: a head failing late made
    the regex retry every split of every line — 183 bytes froze a node's event loop for 53 s, any
    client could send them (found by review). Now every part matches one way: these heads (each
    would take the old pattern longer than the universe has) are refused in linear time."""
    lines = b"".join(b"\r\nX:" + b" " * 20 for _ in range(40))
    assert read(b"POST /v1/price-check HTTP/1.1" + lines + b"\r\nY: \x01\r\n\r\n") is None
    assert read(b"POST /v1/price-check HTTP/1.1\r\nX: a" + b" " * 8000 + b"\x01\r\n\r\n") is None
    words = b"\r\nX:" + b" a" * 3000 + b" "
    assert read(b"POST /v1/price-check HTTP/1.1" + words * 4 + b"\r\n\x01\r\n\r\n") is None


# -- agreement with httptools, on whatever this reader takes --------------------------------------


@dataclass
class Parsed:
    """What httptools (as uvicorn calls it) makes of the first request of some bytes."""

    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    keep_alive: bool = False
    method: bytes = b""
    version: str = ""
    parser: object = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.rstrip(b" \t")))  # as uvicorn's on_header

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if not self.complete:
            p = self.parser
            self.complete, self.keep_alive = True, p.should_keep_alive()  # type: ignore[attr-defined]
            self.method, self.version = p.get_method(), p.get_http_version()  # type: ignore[attr-defined]


def httptools_parse(data: bytes) -> Parsed:
    got = Parsed()
    parser = httptools.HttpRequestParser(got)
    got.parser = parser
    parser.feed_data(data)
    return got


_NAMES = ["Host", "Content-Type", "X-Trace-Id", "Authorization", "connection", "Connection", "Upgrade",
          "Transfer-Encoding", "Expect", "content-length", "Content-Length", "Proxy-Connection", "X-A",
          "Bad Name", "", "X:Y", "X\x01"]
_CLEAN = st.text(alphabet=st.sampled_from(list("abcAB09-_,:;/=") + [" ", "\t"]), max_size=12)
_ODD = st.text(alphabet=st.sampled_from(list("ab ,:\t") + ["\x7f", "\x80", "é", "\r", "\n", "\x00"]), max_size=6)


@st.composite
def mostly(draw: st.DrawFn, clean: st.SearchStrategy, odd: st.SearchStrategy) -> bytes:
    """``clean`` most of the time, ``odd`` at times: most requests are near the subset's edge, not far off."""
    return draw(odd) if draw(st.integers(0, 15)) == 0 else draw(clean)  # type: ignore[no-any-return]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(mostly(st.just(b"POST"), st.sampled_from([b"GET", b"post", b"POST "])))
    target = draw(mostly(st.sampled_from([b"/v1/price-check", b"/v1/price-check/batch", b"/v1/price-check?api_key=k"]),
                         st.sampled_from([b"/v1/price%2Dcheck", b"/v1/price-check?", b"/v1/price-check#x", b"/x",
                                          b"/v1/price-check?a b", b"*"])))
    version = draw(mostly(st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 "])))
    body = draw(st.binary(max_size=80))
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(mostly(st.sampled_from(_NAMES[:13]), st.sampled_from(_NAMES[13:]))).encode("latin-1")
        value = draw(mostly(_CLEAN, _ODD)).encode("utf-8")
        if name.lower() in (b"connection", b"proxy-connection"):
            value = draw(st.sampled_from([b"close", b"keep-alive", b"Close", b" close ", b"upgrade", b"close, te",
                                          value]))
        sep = draw(mostly(st.sampled_from([b": ", b":", b":\t", b":  "]), st.sampled_from([b" :", b"\t:", b""])))
        end = draw(mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r\n ", b"\r\n\t", b"\r"])))
        lines.append(name + sep + value + end)
    length = draw(mostly(st.just("right"), st.sampled_from(["none", "short", "long", "twice", "bad", "space"])))
    cl = {"right": b"%d" % len(body), "short": b"%d" % max(len(body) - 1, 0), "long": b"%d" % (len(body) + 1),
          "twice": b"%d\r\nContent-Length: %d" % (len(body), len(body)), "bad": b"0x1",
          "space": b"%d %d" % (len(body), len(body))}.get(length)
    if cl is not None:
        lines.insert(draw(st.integers(0, len(lines))), b"Content-Length: " + cl + b"\r\n")
    data = method + b" " + target + b" " + version + b"\r\n" + b"".join(lines) + b"\r\n" + body
    return data + draw(st.sampled_from([b"", b"", b"POST /v1/price-check HTTP/1.1\r\n", b"\r\n", b"x"]))


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_what_the_direct_read_takes_httptools_reads_the_same(data: bytes) -> None:
    r = read(data)
    if r is None:
        return
    used = data[:len(data) - len(r.rest)]
    if r.missing:  # the body is still to come: httptools has the same head and body so far …
        part = httptools_parse(used)
        assert not part.complete and part.headers == r.headers and part.body == r.body
        used += bytes(r.missing)  # … and the request ends where this reader counts
        r = r._replace(body=r.body + bytes(r.missing))
    got = httptools_parse(used)  # raises on anything httptools would refuse: never taken here
    assert got.complete and got.method == b"POST" and got.version == "1.1"
    path, _, query = got.url.partition(b"?")
    assert ROUTES[path] is r.route and query == r.query
    assert got.headers == r.headers and got.body == r.body and got.keep_alive == r.keep_alive
    # the request ends exactly where this reader says: one byte less is not a whole request
    assert not httptools_parse(used[:-1]).complete
