"""Security and limits end to end: API keys and HS256 JWTs on /v1 (SSE, REST,
WebSocket), the WebSocket Origin allow-list, the per-IP connection cap, the
whole-request header deadline (slowloris), bad client messages."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
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
        assert info.value.response.status_code == 403
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
