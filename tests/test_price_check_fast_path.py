"""Price checks answered in the HTTP protocol layer (streaming.fastpath), against real parts: uvicorn
with oddsfeed's protocol on 127.0.0.1, the embedded Redis, httpx and raw sockets.

The same requests go to a node with the fast path and to one without it (everything through
ASGI); the answers must be the same — status, body (times aside), headers — for a check, a
batch, bad bodies, unknown markets, missing and wrong credentials, a scope the key lacks and a
tenant's rate limit. Then what the fast path leaves to ASGI (chunked bodies, ``Expect``, an
encoded path, a request behind one still being answered) is still answered, and what it takes
on (pipelined requests, ``Connection: close``, HTTP/1.0, a body in pieces, a body that never
comes) behaves as HTTP and the endpoint say."""

from __future__ import annotations

import asyncio
import socket
import hashlib
import re
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from feed.models import MarketHeader, Selection
from feed.normalise.base import MarketUpdate
from feed.settings import Settings
from feed.store import Store
from streaming.fastpath import SyncRoute
from streaming_helpers import Feed, make_app, now_ms, serve

pytestmark = pytest.mark.timeout(120)

TENANTS = """
[tenant.acme]
keys = ["acme-key"]
price_checks_per_s = 0.05
price_check_burst = 2

[tenant.reader]
key_sha256 = ["{reader_sha}"]
scopes = ["read"]
"""

CHECK = {"market_id": "bf:1.1", "selection_id": "1", "side": "back", "price": 2.0}
#: fields of an answer that depend on when it was made
_TIMES = {"checked_at", "age_ms", "retry_after_ms"}


def _image(mid: str) -> MarketUpdate:
    t = now_ms()
    return MarketUpdate(
        market_id=mid, source="t", image=True,
        header=MarketHeader(sport="soccer", event_id="e1", event_name="E1", status="OPEN", market_type="MATCH_ODDS",
                            version=3),
        selections=[Selection(selection_id="1", name="Home", price=2.0, back=[(2.0, 10.0)], lay=[(2.04, 12.0)]),
                    Selection(selection_id="2", name="Away", price=3.5, back=[(3.5, 10.0)], lay=[(3.6, 8.0)])],
        source_ts=t, received_at=t + 1)


def _timeless(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k not in _TIMES}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"retry in \d+ ms", "retry in … ms", value)
    return value


def _routes(app: Any) -> dict[bytes, SyncRoute]:
    routes: dict[bytes, SyncRoute] = app.state.fast_routes
    return routes


def _settings(tmp_path: Path, *, fast: bool) -> Settings:
    path = tmp_path / f"tenants-{fast}.toml"
    path.write_text(TENANTS.replace("{reader_sha}", hashlib.sha256(b"reader-key").hexdigest()))
    return Settings(heartbeat_ms=60_000, tenants_file=str(path), api_keys=("plain-key",),
                    price_check_fast_path=fast)


# (name, path, json body or raw bytes, headers)
REQUESTS: list[tuple[str, str, Any, dict[str, str]]] = [
    ("ok", "/v1/price-check", CHECK, {"x-api-key": "plain-key"}),
    ("price changed", "/v1/price-check", {**CHECK, "price": 2.5}, {"x-api-key": "plain-key"}),
    ("unknown market", "/v1/price-check", {**CHECK, "market_id": "bf:9"}, {"x-api-key": "plain-key"}),
    ("batch", "/v1/price-check/batch", {"legs": [CHECK, {**CHECK, "selection_id": "2", "price": 3.5}]},
     {"x-api-key": "plain-key"}),
    ("bad json", "/v1/price-check", b'{"market_id": ', {"x-api-key": "plain-key"}),
    ("int id", "/v1/price-check", {**CHECK, "selection_id": 1}, {"x-api-key": "plain-key"}),
    ("four decimals", "/v1/price-check", {**CHECK, "price": 1.9999, "accept_better": False},
     {"x-api-key": "plain-key"}),
    ("five decimals", "/v1/price-check", {**CHECK, "price": 2.00005}, {"x-api-key": "plain-key"}),
    ("no credential", "/v1/price-check", CHECK, {}),
    ("unknown key", "/v1/price-check", CHECK, {"authorization": "Bearer nope"}),
    ("key in the query", "/v1/price-check?api_key=plain-key", CHECK, {}),
    ("unknown query parameter", "/v1/price-check?market_id=bf:1", CHECK, {"x-api-key": "plain-key"}),
    ("key twice in the query", "/v1/price-check?api_key=plain-key&api_key=plain-key", CHECK, {}),
    ("no credential, unknown parameter", "/v1/price-check?x=1", CHECK, {}),
    ("scope lacking", "/v1/price-check", CHECK, {"x-api-key": "reader-key"}),
    ("trace id given", "/v1/price-check", CHECK, {"x-api-key": "plain-key", "x-trace-id": "bet-42"}),
    ("rate limited 1", "/v1/price-check", CHECK, {"x-api-key": "acme-key"}),
    ("rate limited 2", "/v1/price-check", CHECK, {"x-api-key": "acme-key"}),
    ("rate limited 3", "/v1/price-check", CHECK, {"x-api-key": "acme-key"}),
    ("batch over the burst", "/v1/price-check/batch", {"legs": [CHECK] * 3}, {"x-api-key": "acme-key"}),
]


async def _answers(store: Store, redis_url: str, tmp_path: Path, *, fast: bool) -> tuple[list[Any], int]:
    app = make_app(redis_url, settings=_settings(tmp_path, fast=fast))
    out = []
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        for name, path, body, headers in REQUESTS:
            content = body if isinstance(body, bytes) else msgspec.json.encode(body)
            r = await c.post(path, content=content, headers={"content-type": "application/json", **headers})
            # (values that depend on the moment: the date, the trace id, the wait, the body's length
            # with its ages in it — their presence is compared)
            kept = sorted((k, v if k not in ("date", "x-trace-id", "retry-after", "content-length") else "…")
                          for k, v in r.headers.items())
            trace = r.headers.get("x-trace-id")
            out.append((name, r.status_code, _timeless(r.json()) if r.content.startswith(b"{") else r.content,
                        kept, trace if name == "trace id given" else bool(trace)))
    return out, sum(r.requests for r in _routes(app).values())


async def test_the_fast_path_answers_as_the_asgi_path_does(store: Store, redis_url: str, tmp_path: Path) -> None:
    await Feed(store).write(_image("bf:1.1"))
    slow, slow_taken = await _answers(store, redis_url, tmp_path, fast=False)
    fast, fast_taken = await _answers(store, redis_url, tmp_path, fast=True)
    assert slow_taken == 0 and fast_taken == len(REQUESTS)  # each node took the path it was set to
    for a, b in zip(slow, fast, strict=True):
        assert a == b, (a, b)
    got = {name: (status, body) for name, status, body, _, _ in fast}
    # and the answers are the endpoint's and the middleware's, not just equal
    assert got["ok"][0] == 200 and got["ok"][1]["reason"] == "OK"
    assert got["price changed"][1]["reason"] == "PRICE_CHANGED" and got["unknown market"][1]["reason"] == \
        "UNKNOWN_MARKET"
    assert got["batch"][1]["accepted"] is True and len(got["batch"][1]["legs"]) == 2
    assert got["bad json"][0] == 422 and "not valid JSON" in got["bad json"][1]["message"]
    assert got["int id"][0] == 200  # an integer selection id is taken as its string
    assert got["four decimals"][0] == 200 and got["four decimals"][1]["reason"] == "PRICE_CHANGED"
    assert got["four decimals"][1]["message"] == "best_back is 2, requested 1.9999"
    assert got["five decimals"][0] == 422 and "more than 4 decimal places" in got["five decimals"][1]["message"]
    assert got["no credential"][0] == 401 and got["unknown key"][0] == 401
    assert got["key in the query"][0] == 200
    assert got["unknown query parameter"][0] == 400 and "unknown query parameter 'market_id'" in \
        got["unknown query parameter"][1]["message"]  # (it was ignored: a check read as if the query mattered)
    assert got["key twice in the query"][0] == 400 and "more than once" in got["key twice in the query"][1]["message"]
    assert got["no credential, unknown parameter"][0] == 401  # authentication answers first
    assert got["scope lacking"] == (403, {"error": "forbidden", "message": got["scope lacking"][1]["message"]})
    assert [got[f"rate limited {i}"][0] for i in (1, 2, 3)] == [200, 200, 429]
    assert got["rate limited 3"][1]["error"] == "rate_limited" and "retry in" in got["rate limited 3"][1]["message"]
    assert got["batch over the burst"][0] == 422 and got["batch over the burst"][1]["error"] == "batch_over_burst"
    trace = {name: t for name, *_, t in fast}
    assert trace["trace id given"] == "bet-42" and all(t for t in trace.values())
    headers = {name: dict(h) for name, _, _, h, _ in fast}
    assert headers["no credential"]["www-authenticate"] == 'Bearer realm="oddsfeed"'
    assert headers["ok"]["cache-control"] == "no-store" and headers["rate limited 3"]["retry-after"] == "…"


async def _exchange(host: str, port: int, data: bytes, answers: int = 1, *,
                    wait_close: bool = True) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Write ``data`` on a fresh connection; read ``answers`` responses (head, body) and whether
    the server closed the connection after them (``wait_close`` False: not asked, False)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        out = []
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            while head.startswith(b"HTTP/1.1 1"):  # 100 Continue (Expect)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            out.append((head, await asyncio.wait_for(reader.readexactly(length), 10)))
        if not wait_close:
            return out, False
        try:
            closed = await asyncio.wait_for(reader.read(1), 1.0) == b""
        except TimeoutError:
            closed = False
        return out, closed
    finally:
        writer.close()


def _post(path: bytes, body: bytes, *, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST " + path + b" HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def test_a_request_in_one_read_is_read_directly_and_answered_as_through_asgi(
        store: Store, redis_url: str, tmp_path: Path) -> None:
    """Most clients send a small POST in one write: its head is read by the protocol itself
    (streaming.server.read_direct), never by httptools. Every request above, sent so, gets the
    answer the ASGI path gives; the fast node read each directly, the other none."""
    out: dict[bool, list[Any]] = {}
    direct: dict[bool, int] = {}
    for fast in (False, True):
        await Feed(store).write(_image("bf:1.1"))  # (fresh for each node's checks)
        app = make_app(redis_url, settings=_settings(tmp_path, fast=fast))
        async with serve(app) as base:
            host, port = base.removeprefix("http://").split(":")
            answers = []
            for name, path, body, headers in REQUESTS:
                content = body if isinstance(body, bytes) else msgspec.json.encode(body)
                extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
                (head, answer), = (await _exchange(host, int(port), _post(path.encode(), content, extra=extra),
                                                   wait_close=False))[0]
                lines = head.decode().lower().split("\r\n")
                kept = sorted(line.split(":", 1)[0] if line.split(":", 1)[0] in ("date", "x-trace-id", "retry-after",
                              "content-length") else line for line in lines[1:] if line)
                answers.append((name, lines[0], _timeless(msgspec.json.decode(answer)) if answer.startswith(b"{")
                                else answer, kept))
            out[fast] = answers
            direct[fast] = app.state.http_guard.direct_reads
    assert direct == {False: 0, True: len(REQUESTS)}
    for a, b in zip(out[False], out[True], strict=True):
        assert a == b, (a, b)
    assert out[True][0][2]["reason"] == "OK"


async def test_a_body_written_apart_from_its_head_is_read_directly(store: Store, redis_url: str) -> None:
    """httpx (and other clients) write a request's head and body apart: the head is read directly,
    the body in the next reads, and a next request in the body's read is read after it."""
    await Feed(store).write(_image("bf:1.1"))
    # a body deadline the 50 ms gaps below cannot come near on a loaded machine (the default 250 ms
    # left a loop that overslept its two gaps ~150 ms)
    app = make_app(redis_url, settings=Settings(heartbeat_ms=60_000, price_check_deadline_ms=5_000))
    body = msgspec.json.encode(CHECK)
    request = _post(b"/v1/price-check", body)
    head_end = request.index(b"\r\n\r\n") + 4
    async with serve(app) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # the head; the body in two writes, the second carrying the next request whole
            for part in (request[:head_end], request[head_end:head_end + 5], request[head_end + 5:] + request):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.05)  # separate reads on the server's side
            for _ in range(2):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                answer = msgspec.json.decode(await asyncio.wait_for(reader.readexactly(length), 10))
                assert head.startswith(b"HTTP/1.1 200") and answer["reason"] == "OK", (head, answer)
        finally:
            writer.close()
        assert app.state.http_guard.direct_reads == 2
        assert _routes(app)[b"/v1/price-check"].requests == 2
        # and through httpx itself
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            r = await c.post("/v1/price-check", json=CHECK)
        assert r.status_code == 200 and r.json()["reason"] == "OK"
        assert app.state.http_guard.direct_reads == 3


async def test_what_the_fast_path_takes_and_what_it_leaves_to_asgi(store: Store, redis_url: str) -> None:
    await Feed(store).write(_image("bf:1.1"))
    app = make_app(redis_url)
    route = _routes(app)[b"/v1/price-check"]
    body = msgspec.json.encode(CHECK)
    async with serve(app) as base:
        host, port = base.removeprefix("http://").split(":")
        p = int(port)

        async def taken(data: bytes, answers: int = 1) -> tuple[int, list[tuple[bytes, bytes]], bool]:
            before = route.requests
            got, closed = await _exchange(host, p, data, answers)
            for head, answer in got:
                assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
                assert msgspec.json.decode(answer)["reason"] == "OK", answer
                assert b"\r\nx-trace-id: " in head.lower() and b"\r\ndate: " in head.lower()
            return route.requests - before, got, closed

        # three pipelined checks in one write: three answers, in order, the connection kept
        n, got, closed = await taken(_post(b"/v1/price-check", body) * 3, answers=3)
        assert n == 3 and not closed
        # a thousand in one write (read one after the other in a loop: recursion overflowed the stack)
        n, got, closed = await taken(_post(b"/v1/price-check", body) * 1000, answers=1000)
        assert n == 1000 and not closed
        # Connection: close and HTTP/1.0 are honoured: the answer says so and the server closes
        n, got, closed = await taken(_post(b"/v1/price-check", body, extra=b"Connection: close\r\n"))
        assert n == 1 and closed and b"connection: close" in got[0][0].lower()
        n, got, closed = await taken(_post(b"/v1/price-check", body, version=b"1.0"))
        assert n == 1 and closed
        # left to ASGI, answered the same: Expect: 100-continue, a percent-encoded path, a chunked body
        n, got, _ = await taken(_post(b"/v1/price-check", body, extra=b"Expect: 100-continue\r\n"))
        assert n == 0 and got[0][0].startswith(b"HTTP/1.1 200")
        n, got, _ = await taken(_post(b"/v1/price%2Dcheck", body))
        assert n == 0
        chunked = (b"POST /v1/price-check HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        n, got, _ = await taken(chunked)
        assert n == 0
        # a check pipelined behind a request still being answered through ASGI waits its turn there
        n, got, _ = await taken(chunked + _post(b"/v1/price-check", body), answers=2)
        assert n == 0


async def test_a_fast_path_body_that_never_comes_gets_the_endpoints_408(redis_url: str) -> None:
    settings = Settings(heartbeat_ms=60_000, price_check_deadline_ms=300)
    app = make_app(redis_url, settings=settings)
    route = _routes(app)[b"/v1/price-check"]
    async with serve(app) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /v1/price-check HTTP/1.1\r\nHost: x\r\nX-Trace-Id: slow-1\r\n"
                         b"Content-Length: 100\r\n\r\n{\"market_id\":")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 408"), head
            assert b"x-trace-id: slow-1" in head.lower() and b"connection: close" in head.lower()
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            answer = msgspec.json.decode(await reader.readexactly(length))
            assert answer == {"error": "deadline_exceeded", "message": "the request body did not arrive within 300 ms"}
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after the answer
        finally:
            writer.close()
        assert route.requests == 0  # never answered as a check


async def test_an_h2c_upgrade_offer_is_ignored_and_the_body_still_read(store: Store, redis_url: str) -> None:
    """curl --http2 and Java HTTP clients offer ``Upgrade: h2c`` on a plain-HTTP POST. The parser
    took the body for the new protocol's bytes and uvicorn dropped them: a valid price check got
    422 "body is not valid JSON (truncated)" (found by probing the API; uvicorn #2722). The offer
    is ignored now (RFC 9113 §3.1 allows it) and the check answered in HTTP/1.1."""
    await Feed(store).write(_image("bf:1.1"))
    app = make_app(redis_url)
    body = msgspec.json.encode(CHECK)
    offer = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    async with serve(app) as base:
        host, port = base.removeprefix("http://").split(":")
        for path in (b"/v1/price-check", b"/v1/price%2Dcheck"):  # the fast path and the ASGI path
            got, _ = await _exchange(host, int(port), _post(path, body, extra=offer))
            (head, answer), = got
            assert head.startswith(b"HTTP/1.1 200"), (head, answer)
            assert msgspec.json.decode(answer)["reason"] == "OK"


async def test_an_h2c_upgrade_offer_split_across_reads_is_ignored_too(store: Store, redis_url: str) -> None:
    """The offer's header line cut by the network anywhere (between CR and LF, inside the name,
    after the colon, inside "h2c"): still seen and ignored, the body still read. (The strip
    looked at one read at a time: a cut line reached the parser and the check got 422.)"""
    await Feed(store).write(_image("bf:1.1"))
    app = make_app(redis_url)
    body = msgspec.json.encode(CHECK)
    request = _post(b"/v1/price-check", body, extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n")
    line = request.index(b"\r\nUpgrade")
    async with serve(app) as base:
        host, port = base.removeprefix("http://").split(":")
        for cut in (line, line + 1, line + 2, line + 5, line + 10, line + 11, line + 13, line + 14, line + 15):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writer.write(request[:cut])
                await writer.drain()
                await asyncio.sleep(0.05)  # two reads on the server's side (were they one, nothing is proven)
                writer.write(request[cut:])
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                answer = await asyncio.wait_for(reader.readexactly(length), 10)
                assert head.startswith(b"HTTP/1.1 200"), (cut - line, head, answer)
                assert msgspec.json.decode(answer)["reason"] == "OK"
            finally:
                writer.close()


async def test_a_head_whose_last_bytes_come_alone_is_answered(store: Store, redis_url: str) -> None:
    """A GET whose final LF comes alone in a read, and one sent a byte at a time: answered at once.
    (The h2c hold-back held a last CR, then took the lone LF for the start of an offer line and
    held it too: with no body to follow, the head never completed — the request waited for the
    header deadline.)"""
    await Feed(store).write(_image("bf:1.1"))
    app = make_app(redis_url)
    request = b"GET /v1/markets/bf:1.1 HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n"
    end = len(request)
    async with serve(app) as base:
        host, port = base.removeprefix("http://").split(":")
        for pieces in ([request[:end - 1], request[end - 1:]],  # "…\r\n\r" then "\n"
                       [request[:end - 2], request[end - 2:end - 1], request[end - 1:]],
                       [request[:end - 24], *(request[i:i + 1] for i in range(end - 24, end))]):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.02)  # separate reads on the server's side (one read proves nothing)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the header deadline is 10 s
                assert head.startswith(b"HTTP/1.1 200"), (len(pieces), head)
            finally:
                writer.close()
