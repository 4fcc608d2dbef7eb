"""Security and limits end to end: API keys and HS256 JWTs on /v1 (SSE, REST,
WebSocket), the WebSocket Origin allow-list, the per-IP connection cap, the
whole-request header deadline (slowloris), bad client messages."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import sys
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from feed.settings import Settings
from feed.store import Store
from streaming.auth import AuthError, verify_jwt
from streaming_helpers import Feed, SSEReader, eventually, make_app, serve

SECRET = "s3cret-for-tests"


def make_jwt(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    if alg == "none":
        return f"{head}.{body}."
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_verify_jwt_rules() -> None:
    now = time.time()
    good = {"sub": "u1", "exp": now + 60, "aud": "odds", "iss": "me"}
    assert verify_jwt(make_jwt(good), (SECRET,), audience="odds", issuer="me")["sub"] == "u1"
    assert verify_jwt(make_jwt(good, "old"), ("new", "old"))["sub"] == "u1"  # key rotation
    bad = [
        (make_jwt({**good, "exp": now - 120}), "expired"),
        (make_jwt(good, "wrong"), "signature"),
        (make_jwt(good, alg="none"), "HS256"),
        (make_jwt(good, alg="HS512"), "HS256"),
        (make_jwt({"sub": "u1"}), "exp"),
        (make_jwt({**good, "nbf": now + 600}), "nbf"),
        ("a.b", "JWT"),
        ("!!.??.**", "JWT"),
    ]
    for token, fragment in bad:
        with pytest.raises(AuthError, match=fragment):
            verify_jwt(token, (SECRET,))
    with pytest.raises(AuthError, match="audience"):
        verify_jwt(make_jwt(good), (SECRET,), audience="other")
    with pytest.raises(AuthError, match="issuer"):
        verify_jwt(make_jwt(good), (SECRET,), issuer="other")


def make_raw_jwt(header: bytes, claims: bytes, secret: str = SECRET) -> str:
    """A token over raw header/claims bytes (not necessarily valid JSON), signed HS256."""
    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head, body = b64(header), b64(claims)
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


_HS256 = b'{"alg":"HS256","typ":"JWT"}'
_DEEP = b"[" * 3000 + b"]" * 3000


def hostile_jwts() -> list[tuple[str, str]]:
    """(token, what it tries) — each correctly signed with SECRET, so only the content is wrong."""
    exp = str(int(time.time()) + 600).encode()
    return [
        (make_raw_jwt(b'{"alg":"HS256","x":' + _DEEP + b"}", b'{"exp":' + exp + b"}"), "nested header"),
        (make_raw_jwt(_DEEP, b'{"exp":' + exp + b"}"), "header is a nested array"),
        (make_raw_jwt(_HS256, b'{"exp":' + exp + b',"x":' + _DEEP + b"}"), "nested claims"),
        (make_raw_jwt(_HS256, _DEEP), "claims are a nested array"),
        (make_raw_jwt(_HS256, b'{"exp":NaN}'), "exp NaN"),
        (make_raw_jwt(_HS256, b'{"exp":Infinity}'), "exp Infinity"),
        (make_raw_jwt(_HS256, b'{"exp":-Infinity}'), "exp -Infinity"),
        (make_raw_jwt(_HS256, b'{"exp":1e400}'), "exp overflows to inf"),
        (make_raw_jwt(_HS256, b'{"exp":"' + exp + b'"}'), "exp as a string"),
        (make_raw_jwt(_HS256, b'{"exp":true}'), "exp as a bool"),
        (make_raw_jwt(_HS256, b'{"exp":' + exp + b',"nbf":NaN}'), "nbf NaN"),
        (make_raw_jwt(_HS256, b'{"exp":' + exp + b',"iat":"soon"}'), "iat as a string"),
        (make_raw_jwt(_HS256, b'{"exp":' + exp + b',"aud":{"a":1}}'), "aud an object"),
        (make_raw_jwt(b'{"alg":"HS256"', b'{"exp":' + exp + b"}"), "truncated header"),
        (make_raw_jwt(_HS256, b"\xff\xfe"), "claims not UTF-8"),
        (make_raw_jwt(_HS256, b"[]"), "claims not an object"),
        (make_raw_jwt(b'{"alg":"none"}', b'{"exp":' + exp + b"}"), "alg none, signed anyway"),
    ]


def test_hostile_jwts_are_refused_with_auth_error() -> None:
    for token, what in hostile_jwts():
        with pytest.raises(AuthError):
            verify_jwt(token, (SECRET,))
            pytest.fail(f"accepted: {what}")


def test_verify_jwt_has_no_hand_written_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification is PyJWT's whether or not ``import jwt`` would work at call time: a missing
    PyJWT must fail at import (it is a dependency), never fall back to weaker hand-written code."""
    monkeypatch.setitem(sys.modules, "jwt", None)  # import jwt → ImportError from here on
    for token, what in hostile_jwts():
        try:
            verify_jwt(token, (SECRET,))
        except AuthError:
            continue
        except Exception as exc:  # the old fallback: RecursionError → a 500
            pytest.fail(f"{what}: {type(exc).__name__} instead of AuthError")
        pytest.fail(f"accepted: {what}")


async def test_hostile_jwts_get_401_and_ws_refusal_never_500(store: Store, redis_url: str) -> None:
    settings = Settings(heartbeat_ms=60_000, jwt_secrets=("other-secret-first", SECRET))
    good = make_jwt({"sub": "u1", "exp": time.time() + 60})
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (await c.get("/v1/markets", headers={"Authorization": f"Bearer {good}"})).status_code == 200
        ws = base.replace("http://", "ws://") + "/v1/ws"
        for token, what in hostile_jwts():
            for how in ("header", "query"):
                if how == "header":
                    r = await c.get("/v1/markets", headers={"Authorization": f"Bearer {token}"})
                else:
                    r = await c.get("/v1/markets", params={"access_token": token})
                assert r.status_code == 401, (what, how, r.status_code, r.text[:300])
                assert r.json()["error"] == "unauthorized" and token not in r.text, what
            with pytest.raises(InvalidStatus) as info:
                async with connect(ws, additional_headers={"Authorization": f"Bearer {token}"}):
                    pass
            # the handshake gets the HTTP answer, with its body (it was an empty 403: API probe)
            assert info.value.response.status_code == 401, what
            assert json.loads(info.value.response.body)["error"] == "unauthorized", what


async def test_jwt_and_api_keys_guard_v1(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    settings = Settings(heartbeat_ms=60_000, api_keys=("k1",), jwt_secrets=(SECRET,), jwt_audience="odds")
    token = make_jwt({"sub": "u1", "exp": time.time() + 60, "aud": "odds"})
    expired = make_jwt({"sub": "u1", "exp": time.time() - 120, "aud": "odds"})
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        for headers, params, status in [
            ({}, {}, 401),
            ({"Authorization": f"Bearer {token}"}, {}, 200),
            ({}, {"access_token": token}, 200),
            ({"X-API-Key": "k1"}, {}, 200),
            ({"Authorization": f"Bearer {expired}"}, {}, 401),
            ({"Authorization": "Bearer nope"}, {}, 401),
            ({}, {"api_key": "k2"}, 401),
        ]:
            r = await c.get("/v1/markets", headers=headers, params=params)
            assert r.status_code == status, (headers, params, r.text)
            if status == 401:
                assert r.json()["error"] == "unauthorized" and token not in r.text
        assert (await c.get("/health")).status_code == 200 and (await c.get("/metrics")).status_code == 200
        r = await c.get("/v1/stream", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401 and "expired" in r.json()["message"]
        async with c.stream("GET", f"/v1/stream?access_token={token}") as resp:
            assert resp.status_code == 200
            assert (await SSEReader(resp).next()).event == "snapshot"
        ws = base.replace("http://", "ws://") + "/v1/ws"
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws):
                pass
        assert info.value.response.status_code == 401
        assert "send an API key" in json.loads(info.value.response.body)["message"]
        async with connect(ws, additional_headers={"Authorization": f"Bearer {token}"}) as conn:
            await conn.send(json.dumps({"op": "ping", "id": 1}))
            assert json.loads(await conn.recv()) == {"type": "pong", "id": 1}


async def test_origin_allow_list_and_missing_origin(store: Store, redis_url: str) -> None:
    settings = Settings(heartbeat_ms=60_000, allowed_origins=("https://board.example",))
    async with serve(make_app(redis_url, settings=settings)) as base:
        ws = base.replace("http://", "ws://") + "/v1/ws"
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403
        for origin in ("https://board.example", None):  # no Origin: not a browser, allowed
            async with connect(ws, origin=origin) as conn:  # type: ignore[arg-type]
                await conn.send(json.dumps({"op": "ping", "id": 2}))
                assert json.loads(await conn.recv())["type"] == "pong"


async def test_per_ip_connection_cap(store: Store, redis_url: str) -> None:
    settings = Settings(heartbeat_ms=60_000, max_connections_per_ip=3)
    app = make_app(redis_url, settings=settings)
    async with serve(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c1, \
                httpx.AsyncClient(base_url=base, timeout=10) as c2, \
                connect(base.replace("http://", "ws://") + "/v1/ws") as _ws:
            async with c1.stream("GET", "/v1/stream") as r1, c2.stream("GET", "/v1/stream") as r2:
                assert r1.status_code == r2.status_code == 200
                async with httpx.AsyncClient(base_url=base, timeout=10) as c3:
                    r = await c3.get("/v1/markets")
                    assert r.status_code == 429 and r.json()["error"] == "too_many_connections"
                    assert r.headers["retry-after"] == "5"
                with pytest.raises(InvalidStatus) as info:
                    async with connect(base.replace("http://", "ws://") + "/v1/ws"):
                        pass
                assert info.value.response.status_code == 429
        # slots are given back when connections close
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            async def ok() -> bool:
                return (await c.get("/health")).status_code == 200
            await eventually(ok)


def _trickle(port: int, interval_s: float, limit_s: float) -> tuple[float, bytes]:
    """Send a request's header one byte every ``interval_s``; (seconds until the server closed, what it sent)."""
    request = b"GET /v1/markets HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(interval_s)
    start = time.monotonic()
    received = b""
    try:
        for byte in request:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                received += chunk
            except TimeoutError:
                pass
            if time.monotonic() - start > limit_s:
                break
    finally:
        s.close()
    return time.monotonic() - start, received


async def test_slowloris_is_cut_at_the_header_deadline(store: Store, redis_url: str) -> None:
    settings = Settings(heartbeat_ms=60_000, request_header_timeout_ms=700)
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        port = int(base.rsplit(":", 1)[1])
        elapsed, received = await asyncio.to_thread(_trickle, port, 0.1, 20.0)
        assert received.startswith(b"HTTP/1.1 408") and b"request_timeout" in received
        assert elapsed < 15.0  # closed at the deadline, long before the trickle would have finished (~21 s)
        # a normal request on a kept-alive connection is not affected; nor is a long stream
        for _ in range(3):
            assert (await c.get("/health")).status_code == 200
        async with c.stream("GET", "/v1/stream?heartbeat_ms=200") as resp:
            sse = SSEReader(resp)
            await sse.next()
            for _ in range(5):  # 1 s of heartbeats, past the header deadline
                assert (await sse.next()).event == "heartbeat"


# -- request head limits (431) --------------------------------------------------------------


def _rss_bytes() -> int:
    """This process's resident set size (Linux /proc), bytes; 0 when unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _send_head(port: int, head: bytes, *, filler: int = 0, timeout_s: float = 20.0) -> tuple[bytes, int]:
    """Send ``head`` (then ``filler`` more bytes of one header value, 64 KiB at a time, then the
    blank line) on a raw socket and read the answer until the server closes.
    Returns (answer, bytes the kernel accepted before the server stopped us)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout_s)
    sent = 0
    try:
        try:
            s.sendall(head)
            sent += len(head)
            chunk = b"a" * 65536
            while sent - len(head) < filler:
                s.sendall(chunk)
                sent += len(chunk)
            s.sendall(b"\r\n\r\n")
        except OSError:  # the server refused and closed: read its answer
            pass
        answer = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer and b'"}' in answer and answer.startswith(b"HTTP/1.1 4"):
                    break
        except OSError:
            pass
        return answer, sent
    finally:
        s.close()


async def test_huge_request_headers_get_431_without_being_buffered(store: Store, redis_url: str) -> None:
    """Eight connections each sending a 16 MiB header value: every one gets 431 (not 200 after
    buffering it all) and the node's memory does not grow by what they sent."""
    from streaming.server import MAX_HEADER_BYTES

    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        port = int(base.rsplit(":", 1)[1])
        head = b"GET /v1/markets HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        rss0 = peak = _rss_bytes()
        blasts = [asyncio.create_task(asyncio.to_thread(_send_head, port, head, filler=16 << 20)) for _ in range(8)]
        while not all(b.done() for b in blasts):
            await asyncio.sleep(0.02)
            peak = max(peak, _rss_bytes())
        for b in blasts:
            answer, _ = b.result()
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert b'"error":"header_too_large"' in answer and str(MAX_HEADER_BYTES).encode() in answer
        if rss0:
            assert peak - rss0 < 24 << 20, f"RSS grew by {(peak - rss0) >> 20} MiB while refusing 8 x 16 MiB"
        assert (await c.get("/v1/markets")).status_code == 200  # still serving


async def test_header_count_line_and_target_limits(store: Store, redis_url: str) -> None:
    from streaming.server import MAX_HEADER_LINE, MAX_HEADERS

    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        port = int(base.rsplit(":", 1)[1])

        async def ask(*lines: bytes) -> bytes:
            answer, _ = await asyncio.to_thread(_send_head, port, b"\r\n".join(lines))
            return answer

        fields = [b"X-H%d: v" % i for i in range(MAX_HEADERS)]
        answer = await ask(b"GET /v1/markets HTTP/1.1", b"Host: x", *fields)  # one too many
        assert answer.startswith(b"HTTP/1.1 431 ") and b"too_many_headers" in answer, answer[:200]
        answer = await ask(b"GET /health HTTP/1.1", b"Host: x", b"Connection: close", *fields[:-2])  # exactly
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        answer = await ask(b"GET /v1/markets HTTP/1.1", b"Host: x", b"X-Long: " + b"v" * (MAX_HEADER_LINE - 7))
        assert answer.startswith(b"HTTP/1.1 431 ") and b"header line" in answer, answer[:200]
        answer = await ask(b"GET /health HTTP/1.1", b"Host: x", b"Connection: close",
                           b"X-Long: " + b"v" * (MAX_HEADER_LINE - 8))  # exactly the longest line
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        answer = await ask(b"GET /v1/markets?q=" + b"q" * MAX_HEADER_LINE + b" HTTP/1.1", b"Host: x")
        assert answer.startswith(b"HTTP/1.1 414 ") and b"uri_too_long" in answer, answer[:200]
        # many headers of ordinary size, 24 KiB in all, are fine
        r = await c.get("/v1/markets", headers={f"X-Pad-{i}": "p" * 500 for i in range(48)})
        assert r.status_code == 200
        # a WebSocket handshake with too many headers is refused the same way, before websockets sees it
        with pytest.raises(InvalidStatus) as info:
            async with connect(base.replace("http://", "ws://") + "/v1/ws",
                               additional_headers={f"X-H{i}": "v" for i in range(MAX_HEADERS + 5)}):
                pass
        assert info.value.response.status_code == 431
        # a kept-alive connection serving many requests is never mistaken for one long head
        for _ in range(20):
            assert (await c.get("/v1/markets", headers={"X-Pad": "p" * 4000})).status_code == 200
        big = "x" * (256 * 1024)  # a body is not a head
        r = await c.post("/v1/price-check", content=json.dumps({"pad": big}),
                         headers={"content-type": "application/json"})
        assert r.status_code in (400, 413, 422), r.text[:200]
        assert (await c.get("/v1/markets")).status_code == 200


def test_a_jwt_refusal_says_which_claim_is_wrong_and_how() -> None:
    """It said "invalid token: InvalidSubjectError" (a class name), and "exp, nbf and iat must be
    numbers of seconds" whatever claim was wrong (API probe)."""
    import time

    import jwt as pyjwt

    from feed.errors import AuthError
    from streaming.auth import verify_jwt

    secret = "s" * 32
    cases = [({"exp": time.time() + 100, "sub": 5}, "invalid token: Subject must be a string"),
             ({"exp": "4000000000"}, "exp must be a number of seconds"),
             ({"exp": time.time() + 100, "nbf": "1"}, "nbf must be a number of seconds")]
    for claims, says in cases:
        with pytest.raises(AuthError) as info:
            verify_jwt(pyjwt.encode(claims, secret, algorithm="HS256"), (secret,))
        assert says in str(info.value), (claims, str(info.value))
        assert "exp, nbf and iat" not in str(info.value)
