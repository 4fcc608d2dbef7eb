"""The HTTP layer of the pollers: limits, errors, auth, deadlines, lag.

Pure pieces (Retry-After, classification, breaker, quota, signatures, lag
window) are tested directly; the transport behaviour (keep-alive pool, the
total deadline against a trickled body, the body cap, the query key kept out
of httpx's logs) against the HTTP providers simulator on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from feed.errors import ConfigError, FatalSourceError, RetryableSourceError
from feed.sources.http_auth import (
    ApiKeyAuth,
    BasicAuth,
    HmacSigner,
    NonceCache,
    Secret,
    TokenAuth,
    sign,
    verify_signature,
)
from feed.sources.http_limits import (
    AuthError,
    CircuitBreaker,
    CircuitOpenError,
    QuotaExhaustedError,
    QuotaGovernor,
    RateLimitedError,
    RequestRejectedError,
    TokenBucket,
    TransportFailure,
    UpstreamError,
    classify_response,
    parse_retry_after,
)
from feed.sources.lag import LagWindow
from feed.sources.poller import HttpOptions, ProviderHttp, StaticCache, build_http
from feed.sources.spec import parse_source_spec
from feed.sources.esa import endpoint as _esa_endpoint
from tests.poller_helpers import providers


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- Retry-After and classification -------------------------------------------------


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("999999") == 3600.0
    assert parse_retry_after(None, default_s=2.0) == 2.0
    assert parse_retry_after("soon", default_s=5.0) == 5.0
    when = datetime.now(UTC) + timedelta(seconds=30)
    got = parse_retry_after(format_datetime(when, usegmt=True))
    assert got is not None and 28 <= got <= 31


@pytest.mark.parametrize(("status", "headers", "body", "kind", "code"), [
    (429, {"retry-after": "7"}, b'{"code":"TOO_MANY_REQUESTS","message":"slow"}', RateLimitedError, "TOO_MANY_REQUESTS"),
    (429, {}, b"", RateLimitedError, "http_429"),
    (200, {}, b'{"code":"TOO_MANY_REQUESTS"}', RateLimitedError, "TOO_MANY_REQUESTS"),
    (429, {}, b'{"message":"x","error_code":"EXCEEDED_FREQ_LIMIT"}', RateLimitedError, "EXCEEDED_FREQ_LIMIT"),
    (401, {}, b'{"message":"spent","error_code":"OUT_OF_USAGE_CREDITS"}', QuotaExhaustedError, "OUT_OF_USAGE_CREDITS"),
    (401, {}, b'{"message":"bad","error_code":"INVALID_KEY"}', AuthError, "INVALID_KEY"),
    (401, {}, b'{"error_code":"MISSING_KEY"}', AuthError, "MISSING_KEY"),
    (401, {}, b'{"message":"x","error_code":"DEACTIVATED_KEY"}', AuthError, "DEACTIVATED_KEY"),
    (403, {}, b"forbidden", AuthError, "http_403"),
    (422, {}, b'{"message":"x","error_code":"INVALID_MARKET"}', RequestRejectedError, "INVALID_MARKET"),
    (404, {}, b"not found", RequestRejectedError, "http_404"),
    (503, {}, b"<html>down</html>", UpstreamError, "http_503"),
    (500, {}, b'{"code":"INTERNAL_ERROR"}', UpstreamError, "INTERNAL_ERROR"),
    (408, {}, b"", UpstreamError, "http_408"),
])
def test_classify_response(status: int, headers: dict[str, str], body: bytes, kind: type, code: str) -> None:
    err = classify_response("p", "/v2/odds", status, headers, body)
    assert isinstance(err, kind) and err.code == code
    assert isinstance(err, RetryableSourceError) != isinstance(err, FatalSourceError)
    if status == 429 and headers:
        assert err.retry_after_s == 7.0  # type: ignore[attr-defined]
    assert "apiKey" not in str(err)


def test_successes_are_not_errors() -> None:
    assert classify_response("p", "/x", 200, {}, b'{"sportId":29,"last":5,"leagues":[]}') is None
    assert classify_response("p", "/x", 200, {}, b"[]") is None
    assert classify_response("p", "/x", 304, {}, b"") is None
    assert classify_response("p", "/x", 200, {}, b'{"code": 5}') is None  # not a string code


# --- breaker, bucket, quota ----------------------------------------------------------------


def test_circuit_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 10.0, clock=clock)
    for _ in range(2):
        b.before_request()
        b.record_failure()
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open" and b.opens == 1
    with pytest.raises(CircuitOpenError) as info:
        b.before_request()
    assert 9.9 <= info.value.retry_in_s <= 10.0
    clock.t += 10.0
    b.before_request()  # the probe
    assert b.state == "half_open"
    with pytest.raises(CircuitOpenError):
        b.before_request()  # only one probe at a time
    b.record_failure()  # probe failed: open again, a fresh wait
    assert b.state == "open" and b.opens == 2
    clock.t += 10.0
    b.before_request()
    b.record_success()
    assert b.state == "closed" and b.failures == 0
    b.before_request()


async def test_token_bucket_spaces_requests() -> None:
    bucket = TokenBucket(20.0, burst=2)
    t0 = time.monotonic()
    for _ in range(6):
        await bucket.acquire()
    assert time.monotonic() - t0 >= 0.18  # 2 from the burst, then 4 at 20/s
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_quota_governor() -> None:
    q = QuotaGovernor(low_water=100, reserve=5)
    assert q.interval_factor() == 1.0 and not q.blocked()
    q.observe({"x-requests-remaining": "450", "x-requests-used": "50", "x-requests-last": "3"})
    assert (q.remaining, q.used, q.last_cost) == (450, 50, 3) and q.interval_factor() == 1.0
    q.observe({"x-requests-remaining": "50"})
    assert q.low and q.interval_factor() == 2.0
    q.observe({"x-requests-remaining": "7"})
    assert q.blocked()  # 7 - 3 < 5
    q.observe({"x-requests-remaining": "nan-ish"})
    assert q.remaining == 7


# --- auth ---------------------------------------------------------------------------------------


def test_secrets_never_show() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and s.reveal() == "hunter2"
    for obj in (ApiKeyAuth("hunter2", query_param="apiKey"), BasicAuth("me", "hunter2"),
                TokenAuth("/v1/token", "cid", "hunter2"), HmacSigner("k", "hunter2")):
        assert "hunter2" not in repr(obj)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(s)


def test_signatures() -> None:
    secret = b"s3cret"
    now = 1_700_000_000_000
    headers = {"x-signature-key": "k1", "x-signature-timestamp": str(now), "x-signature-nonce": "n1",
               "x-signature": sign(secret, now, "n1", "GET", b"/v2/odds?sportId=29", b"")}
    keys = {"k1": secret}
    nonces = NonceCache()
    assert verify_signature(keys, headers, "GET", b"/v2/odds?sportId=29", b"", now_ms=now + 5, nonces=nonces) is None
    assert verify_signature(keys, headers, "GET", b"/v2/odds?sportId=29", b"", now_ms=now + 6, nonces=nonces) == "replayed"
    assert verify_signature(keys, headers, "GET", b"/v2/odds?sportId=4", b"", now_ms=now) == "bad_signature"
    assert verify_signature(keys, headers, "POST", b"/v2/odds?sportId=29", b"x", now_ms=now) == "bad_signature"
    assert verify_signature(keys, headers, "GET", b"/v2/odds?sportId=29", b"", now_ms=now + 60_000) == "expired"
    assert verify_signature({"k2": secret}, headers, "GET", b"/v2/odds?sportId=29", b"", now_ms=now) == "unknown_key"
    assert verify_signature(keys, {}, "GET", b"/", b"", now_ms=now) == "missing_signature"
    signed = HmacSigner("k1", "s3cret", clock_ms=lambda: now).headers("POST", b"/v1/token", b'{"a":1}')
    assert verify_signature(keys, {k.lower(): v for k, v in signed.items()}, "POST", b"/v1/token", b'{"a":1}',
                            now_ms=now) is None


# --- transport against the simulator ------------------------------------------------------------


async def test_keep_alive_pool_deadline_body_cap_and_hidden_query_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with providers(api_key="q-key-5e8b") as sim:
        http = ProviderHttp(f"{sim.url}/v4", provider="theoddsapi",
                            options=HttpOptions(deadline_s=0.6, read_timeout_s=0.5, rate_per_s=1000, burst=100),
                            api_key=ApiKeyAuth(Secret("q-key-5e8b"), query_param="apiKey"))
        try:
            for _ in range(8):
                res = await http.get("/sports")
                assert res.status == 200 and res.headers["x-requests-last"] == "0"
            pool = http.client._transport.inner._pool  # type: ignore[attr-defined]
            assert len(pool.connections) == 1 and pool._http2  # one kept-alive connection, HTTP/2 offered
            # a trickled body: every piece arrives within the read timeout, the whole takes 2 s
            sim.trickle(1, seconds=2.0, provider="theoddsapi")
            t0 = time.monotonic()
            with pytest.raises(TransportFailure) as info:
                await http.get("/sports/upcoming/odds", {"regions": "eu", "markets": "h2h"})
            assert info.value.code == "deadline" and time.monotonic() - t0 < 1.5
            # a stalled reply
            sim.stall(1, seconds=1.0, provider="theoddsapi")
            with pytest.raises(TransportFailure):
                await http.get("/sports/upcoming/odds", {"regions": "eu", "markets": "h2h"})
        finally:
            await http.aclose()
        small = ProviderHttp(f"{sim.url}/v4", provider="theoddsapi", options=HttpOptions(max_body_bytes=200),
                             api_key=ApiKeyAuth(Secret("q-key-5e8b"), query_param="apiKey"))
        try:
            with pytest.raises(TransportFailure) as info2:
                await small.get("/sports/upcoming/odds", {"regions": "eu", "markets": "h2h"})
            assert info2.value.code == "body_too_large"
        finally:
            await small.aclose()
        assert sim.requests[0].query["apiKey"] == "q-key-5e8b"  # the key was sent …
    lines = [r.getMessage() for r in caplog.records]
    assert any("HTTP Request: GET" in line and "/v4/sports" in line for line in lines)
    assert not any("q-key-5e8b" in line for line in lines)  # … and never logged


async def test_retry_after_gate_and_unreachable_provider() -> None:
    async with providers() as sim:
        http = ProviderHttp(sim.url, provider="pinnacle", basic=BasicAuth("demo", "demo"),
                            options=HttpOptions(rate_per_s=1000, burst=100))
        try:
            sim.rate_limit(1, retry_after_s=1, provider="pinnacle")
            t0 = time.monotonic()  # (before the 429: its Retry-After counts from its arrival, after this)
            with pytest.raises(RateLimitedError) as info:
                await http.get("/v2/sports")
            assert info.value.retry_after_s == 1.0
            res = await http.get("/v2/sports")  # waits out the Retry-After first
            assert res.status == 200 and time.monotonic() - t0 >= 0.9
            assert not sim.early_requests
        finally:
            await http.aclose()
        port = sim.port
    http = ProviderHttp(f"http://127.0.0.1:{port}", provider="pinnacle",
                        options=HttpOptions(breaker_failures=2, breaker_reset_s=30, connect_timeout_s=1))
    try:
        for _ in range(2):
            with pytest.raises(TransportFailure) as info2:
                await http.get("/v2/sports")
            assert info2.value.code == "connect"
        with pytest.raises(CircuitOpenError):
            await http.get("/v2/sports")  # no request at all while open
    finally:
        await http.aclose()


# --- static cache, lag, spec options ------------------------------------------------------------


async def test_static_cache_ttl_and_stale_copy_on_errors() -> None:
    clock = Clock()
    cache = StaticCache(60.0, clock=clock)
    calls = 0

    async def load() -> list[str]:
        nonlocal calls
        calls += 1
        return [f"v{calls}"]

    assert await cache.get("sports", load) == ["v1"]
    clock.t += 30
    assert await cache.get("sports", load) == ["v1"] and calls == 1
    clock.t += 31
    assert await cache.get("sports", load) == ["v2"]

    async def failing() -> list[str]:
        raise UpstreamError("down", "http_503")

    clock.t += 61
    assert await cache.get("sports", failing) == ["v2"]  # the old copy while the provider is unhappy


def test_lag_window() -> None:
    clock = Clock()
    lag = LagWindow(10.0, clock=clock)
    assert lag.percentiles() == (None, None)
    for v in range(1, 101):
        lag.record(v)
    lag.record(-5)
    p50, p99 = lag.percentiles()
    assert p50 is not None and p99 is not None and 49 <= p50 <= 51 and 98 <= p99 <= 100
    assert lag.negative == 1 and lag.count() == 100
    clock.t += 6
    lag.record(1000)
    assert lag.count() == 101  # the older half is still in the window
    clock.t += 6
    assert lag.count() == 1 and lag.percentiles()[0] == 1000  # the first samples aged out
    clock.t += 30
    assert lag.percentiles() == (None, None)


def test_build_http_from_spec_options() -> None:
    spec = parse_source_spec("theoddsapi=http://127.0.0.1:1/v4,api_key=k,deadline_s=2.5,max_connections=2,"
                             "http2=false,client_id=c,client_secret=s,hmac_secret=h")
    http = build_http(spec, base_url=spec.url, provider="theoddsapi", api_key_query="apiKey")
    assert http.options.deadline_s == 2.5 and http.options.max_connections == 2 and http.options.http2 is False
    assert http.api_key is not None and http.api_key.query_param == "apiKey"
    assert http.token is not None and http.token.token_url == "http://127.0.0.1:1/v1/token"
    assert http.signer is not None
    with pytest.raises(ConfigError, match="max_connections must be a whole number"):
        build_http(parse_source_spec("pinnacle=http://x,user=u,max_connections=many"), base_url="http://x",
                   provider="p")
    asyncio.run(http.aclose())


def test_esa_spec_endpoint() -> None:
    assert _esa_endpoint(parse_source_spec("esa=127.0.0.1:9444,app_key=a,session=s")) == ("127.0.0.1", 9444, False)
    assert _esa_endpoint(parse_source_spec("esa=tls://stream.example:443,app_key=a,session=s")) == ("stream.example", 443, True)
    with pytest.raises(ConfigError):
        _esa_endpoint(parse_source_spec("esa=nowhere,app_key=a,session=s"))


def test_cli_takes_several_sources() -> None:
    from feed.cli import build_parser

    args = build_parser().parse_args(["run", "--source", "pinnacle=http://127.0.0.1:9555,user=demo,password=demo",
                                      "--source", "theoddsapi=http://127.0.0.1:9555/v4,api_key=demo,name=toa"])
    assert [(s.kind, s.name) for s in args.source] == [("pinnacle", "pinnacle"), ("theoddsapi", "toa")]
    args = build_parser().parse_args(["ingest", "--source", "esa=127.0.0.1:9444,app_key=a,session=s"])
    assert args.source[0].kind == "esa"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--source", "ftp=nope"])
    args = build_parser().parse_args(["simulate", "--providers", "--providers-port", "0"])
    assert args.providers and args.providers_port == 0


async def test_a_header_httpx_cannot_send_is_a_transport_failure_not_a_crash() -> None:
    """A provider's non-ASCII ETag, sent back as If-None-Match, raised UnicodeEncodeError out of
    the poll: the source crashed on every second poll (found by the ingest audit)."""
    import httpx

    http = ProviderHttp("http://provider.test", provider="theoddsapi",
                        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"{}")))
    try:
        with pytest.raises(TransportFailure):
            await http.get("/odds", headers={"If-None-Match": '"\u00e9t\u00e9"'})
    finally:
        await http.aclose()
