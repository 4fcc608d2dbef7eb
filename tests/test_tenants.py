"""Tenants (streaming.tenants): scopes, visibility, per-tenant limits and the reloaded tenants file —
unit rules first, then end to end against a real server, embedded Redis and real clients (httpx, websockets)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from feed.errors import AuthError, ConfigError
from feed.settings import Settings
from feed.store import Store
from streaming.state import Filter
from streaming.tenants import ForbiddenError, LimitError, Principal, TenantSpec, Tenants, parse_tenants, scope_words
from streaming_helpers import Feed, SSEReader, eventually, make_app, serve
from test_streaming_security import SECRET, make_jwt

# -- the file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, fragment", [
    ("[tenant.a]\nkeyz = ['x']\n", "unknown field `keyz`"),
    ("[tenant.a]\nscopes = ['read', 'write']\n", "scopes ['write'] unknown"),
    ("[tenant.a]\nkeys = ['k']\n[tenant.b]\nkeys = ['k']\n", "one API key is listed by [tenant.a] and [tenant.b]"),
    ("[tenant.a]\nsubjects = ['s']\n[tenant.b]\nsubjects = ['s']\n", "subject 's' is listed by"),
    ("[default]\nkeys = ['k']\n", "[default] applies to credentials no tenant names"),
    ("[tenant.a]\nmax_connections = -1\n", ">= 0"),
    ("[tenant.a]\nprice_checks_per_s = 'fast'\n", "Expected `float"),
    ("[tenant.a\n", "not valid TOML"),
    ("[tenant.default]\n", "may not be named 'default'"),
    ("[tenants.a]\n", "unknown field `tenants`"),
])
def test_bad_tenants_files_say_what_to_fix(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tenants(text.encode(), "t.toml")
    assert fragment in str(info.value) and str(info.value).startswith("t.toml: ")


def test_restrict_narrows_a_filter_or_refuses_it() -> None:
    tenants = Tenants(None)
    tenants._install(parse_tenants(b"[tenant.a]\nkeys=['k']\nsports=['soccer','tennis']\nbookmakers=['b1']\n"),
                     b"", None)
    import hashlib

    g = tenants.for_key(hashlib.sha256(b"k").digest())
    assert g is not None and g.tenant == "a" and g.restricted
    f = g.restrict(Filter())
    assert f.sport == {"soccer", "tennis"} and f.bookmaker == {"b1"} and f.source is None
    assert g.restrict(Filter.parse(sport="soccer,golf")).sport == {"soccer"}  # what it may not see is dropped
    with pytest.raises(ForbiddenError, match="may not see sport golf; it may see sport soccer, tennis"):
        g.restrict(Filter.parse(sport="golf"))
    with pytest.raises(ForbiddenError, match="bookmaker"):
        g.restrict(Filter.parse(bookmaker="b2"))


def test_jwt_scope_claim_narrows_and_never_widens() -> None:
    tenants = Tenants(None)
    tenants._install(parse_tenants(b"[tenant.a]\nsubjects=['svc']\nscopes=['read','stream']\nsports=['soccer']\n"
                                   b"[default]\nscopes=['read']\n"), b"", None)
    g = tenants.for_jwt({"sub": "svc", "scope": "stream price_check sport:soccer sport:golf openid"})
    assert g.tenant == "a" and g.permissions == {"stream"}  # price_check is not the tenant's: not granted
    assert g.sports == {"soccer"}  # golf asked, not the tenant's
    assert tenants.for_jwt({"sub": "svc"}).permissions == {"read", "stream"}
    other = tenants.for_jwt({"sub": "someone", "scope": ["read", "source:betfair"]})
    assert other.tenant == "default" and other.permissions == {"read"} and other.sources == {"betfair"}
    with pytest.raises(ForbiddenError, match="may not use price checks"):
        other.require("price_check")
    assert scope_words("a b") == ["a", "b"] and scope_words(["a b", "c"]) == ["a", "b", "c"]
    with pytest.raises(AuthError, match="scope must be"):
        tenants.for_jwt({"sub": "svc", "scope": 7})


def test_price_check_token_bucket() -> None:
    p = Principal("tenant:a", "a", TenantSpec(price_checks_per_s=2.0, price_check_burst=3))
    t0 = p.refilled_at
    for _ in range(3):
        p.take_price_checks(1, t0)
    with pytest.raises(LimitError) as info:
        p.take_price_checks(1, t0)
    assert info.value.code == "rate_limited" and info.value.retry_after_s == pytest.approx(0.5)
    p.take_price_checks(1, t0 + 0.5)  # one token back after 1/rate s
    with pytest.raises(LimitError) as info:
        p.take_price_checks(4, t0 + 100)  # a batch over the burst can never pass
    assert info.value.retry_after_s is None and "split it" in str(info.value)
    p.take_price_checks(3, t0 + 100)  # refilled to the burst, not beyond
    with pytest.raises(LimitError):
        p.take_price_checks(1, t0 + 100)
    assert p.limited == {("a", "price_checks"): 3}


def test_connection_and_subscription_limits() -> None:
    p = Principal("tenant:a", "a", TenantSpec(max_connections=1, max_subscriptions=2))
    p.admit_connection(subscriptions=1)
    p.connections, p.subscriptions = 1, 1
    with pytest.raises(LimitError, match="1 of its 1 streams") as info:
        p.admit_connection()
    assert info.value.code == "too_many_connections"
    p.admit_subscription()
    p.subscriptions = 2
    with pytest.raises(LimitError) as info:
        p.admit_subscription()
    assert info.value.code == "too_many_subscriptions"
    Principal("x", "default", None).admit_connection(subscriptions=99)  # no spec: no limits


# -- end to end ------------------------------------------------------------------------------------

TENANTS = """
[default]
max_connections = 1

[tenant.acme]
keys = ["acme-key"]
subjects = ["acme-svc"]
sports = ["soccer"]
max_connections = 2
max_subscriptions = 3
price_checks_per_s = 0.05
price_check_burst = 2

[tenant.reader]
key_sha256 = ["{reader_sha}"]
scopes = ["read"]
"""


def _write(path: Path, text: str) -> None:
    """Replace the file (a new mtime and, with the padding, never the same size as before)."""
    pad = "#" * (int(time.monotonic_ns()) % 97)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n" + pad + "\n")
    os.replace(tmp, path)


def _tenants_text(**replace: str) -> str:
    import hashlib

    text = TENANTS.replace("{reader_sha}", hashlib.sha256(b"reader-key").hexdigest())
    for a, b in replace.items():
        text = text.replace(a, b)
    return text


async def _markets(c: httpx.AsyncClient, key: str, **params: Any) -> tuple[int, Any]:
    r = await c.get("/v1/markets", headers={"X-API-Key": key}, params=params)
    return r.status_code, r.json()


async def _feed(store: Store) -> Feed:
    feed = Feed(store)
    await feed.write(feed.image("1.soc", sport="soccer", event="e1", bookmaker="b1"),
                     feed.image("1.ten", sport="tennis", event="e2", bookmaker="b1"))
    return feed


async def test_tenant_scopes_and_visibility_end_to_end(store: Store, redis_url: str, tmp_path: Path) -> None:
    feed = await _feed(store)
    path = tmp_path / "tenants.toml"
    _write(path, _tenants_text())
    settings = Settings(heartbeat_ms=60_000, tenants_file=str(path), api_keys=("plain-key",), jwt_secrets=(SECRET,))
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        # what each sees: acme only soccer; an unnamed key ([default] has no lists) everything
        status, body = await _markets(c, "acme-key")
        assert status == 200 and [m["market_id"] for m in body["markets"]] == ["1.soc"]
        status, body = await _markets(c, "plain-key")
        assert [m["market_id"] for m in body["markets"]] == ["1.soc", "1.ten"]
        status, body = await _markets(c, "acme-key", sport="tennis")
        assert status == 403 and body["error"] == "forbidden" and "may see sport soccer" in body["message"]
        assert (await _markets(c, "acme-key", sport="tennis,soccer"))[1]["count"] == 1
        r = await c.get("/v1/markets/1.ten", headers={"X-API-Key": "acme-key"})
        assert r.status_code == 404 and r.json()["error"] == "unknown_market"
        assert (await c.get("/v1/markets/1.ten", headers={"X-API-Key": "reader-key"})).status_code == 200
        sports = (await c.get("/v1/sports", headers={"X-API-Key": "acme-key"})).json()["sports"]
        assert [s["sport"] for s in sports] == ["soccer"]
        events = (await c.get("/v1/events", headers={"X-API-Key": "acme-key"})).json()["events"]
        assert [e["sport"] for e in events] == ["soccer"]
        # a price check of a market the tenant may not see is a check of an unknown market
        r = await c.post("/v1/price-check", headers={"X-API-Key": "acme-key"},
                         json={"market_id": "1.ten", "selection_id": "1", "side": "back", "price": 2.0})
        assert r.status_code == 200 and r.json()["reason"] == "UNKNOWN_MARKET"
        # scopes: the reader tenant may read but not stream or check prices
        r = await c.get("/v1/stream", headers={"X-API-Key": "reader-key"})
        assert r.status_code == 403 and "scope stream" in r.json()["message"]
        r = await c.post("/v1/price-check", headers={"X-API-Key": "reader-key"},
                         json={"market_id": "1.soc", "selection_id": "1", "side": "back", "price": 2.0})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        ws = base.replace("http://", "ws://") + "/v1/ws"
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws, additional_headers={"X-API-Key": "reader-key"}):
                pass
        assert info.value.response.status_code == 403
        assert json.loads(info.value.response.body)["error"] == "forbidden"
        # a JWT of acme's subject whose scope claim asks for read only
        token = make_jwt({"sub": "acme-svc", "scope": "read", "exp": time.time() + 60})
        r = await c.get("/v1/markets", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["count"] == 1
        assert (await c.get("/v1/stream", params={"access_token": token})).status_code == 403
        # the SSE stream of acme: the snapshot and then only what it may see
        async with c.stream("GET", "/v1/stream", headers={"X-API-Key": "acme-key"}) as resp:
            sse = SSEReader(resp)
            snap = await sse.next()
            assert snap.event == "snapshot" and [m["market_id"] for m in snap.data["markets"]] == ["1.soc"]
            await feed.write(feed.price("1.ten", "1", 2.5))
            await feed.write(feed.price("1.soc", "1", 2.2))
            ev = await sse.until(lambda e: e.event == "delta")
            assert ev.data["market_id"] == "1.soc"  # the tennis delta was written first and never sent
        # WebSocket: a subscription for a sport it may not see gets an error, the connection stays
        async with connect(ws, additional_headers={"X-API-Key": "acme-key"}) as conn:
            await conn.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"sport": "tennis"}}))
            err = json.loads(await conn.recv())
            assert err["type"] == "error" and err["code"] == "forbidden" and err["id"] == 1
            await conn.send(json.dumps({"op": "subscribe", "id": 2}))
            assert json.loads(await conn.recv()) == {"type": "ack", "id": 2, "sub": 1}
            snap_msg = json.loads(await conn.recv())
            assert [m["market_id"] for m in snap_msg["markets"]] == ["1.soc"]


async def test_tenant_limits_end_to_end(store: Store, redis_url: str, tmp_path: Path) -> None:
    await _feed(store)
    path = tmp_path / "tenants.toml"
    _write(path, _tenants_text())
    settings = Settings(heartbeat_ms=60_000, tenants_file=str(path), api_keys=("plain-key",))
    acme = {"X-API-Key": "acme-key"}
    app = make_app(redis_url, settings=settings)
    async with serve(app) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c1, httpx.AsyncClient(base_url=base, timeout=10) as c2, \
            httpx.AsyncClient(base_url=base, timeout=10) as c3:
        ws = base.replace("http://", "ws://") + "/v1/ws"
        # price checks: a bucket of 2, refilled one per 20 s
        check = {"market_id": "1.soc", "selection_id": "1", "side": "back", "price": 2.0}
        for _ in range(2):
            assert (await c1.post("/v1/price-check", headers=acme, json=check)).status_code == 200
        r = await c1.post("/v1/price-check", headers=acme, json=check)
        assert r.status_code == 429 and r.json()["error"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 20 and 0 < r.json()["retry_after_ms"] <= 20_000
        r = await c1.post("/v1/price-check/batch", headers=acme, json={"legs": [check] * 3})
        assert r.status_code == 422 and r.json()["error"] == "batch_over_burst"
        assert "exceeds tenant acme's burst of 2" in r.json()["message"]
        assert "retry-after" not in r.headers
        # the Python client says when to retry
        from streaming.client import OddsClient, PriceCheckError

        client = OddsClient(base, api_key="acme-key")
        try:
            with pytest.raises(PriceCheckError) as pc:
                await client.price_check("1.soc", "1", "back", 2.0)
            assert pc.value.status == 429 and pc.value.code == "rate_limited"
            assert pc.value.retry_after_s is not None and 0 < pc.value.retry_after_s <= 20
        finally:
            await client.close()
        # another tenant's bucket is its own
        assert (await c1.post("/v1/price-check", headers={"X-API-Key": "plain-key"}, json=check)).status_code == 200
        # connections: acme may hold 2 streams, and 3 subscriptions over them
        async with c1.stream("GET", "/v1/stream", headers=acme) as r1:
            assert r1.status_code == 200
            sse1 = SSEReader(r1)  # kept: a dropped reader's generator is finalised and closes the response
            assert (await sse1.next()).event == "snapshot"
            async with connect(ws, additional_headers=acme) as conn:
                for i in (1, 2):
                    await conn.send(json.dumps({"op": "subscribe", "id": i}))
                    assert json.loads(await conn.recv())["type"] == "ack"
                    assert json.loads(await conn.recv())["type"] == "snapshot"
                await conn.send(json.dumps({"op": "subscribe", "id": 3}))
                err = json.loads(await conn.recv())
                assert err["code"] == "too_many_subscriptions" and "3 of its 3" in err["message"]
                r = await c2.get("/v1/stream", headers=acme)
                assert r.status_code == 429 and r.json()["error"] == "too_many_connections"
                with pytest.raises(InvalidStatus) as info:
                    async with connect(ws, additional_headers=acme):
                        pass
                assert info.value.response.status_code == 429
                assert json.loads(info.value.response.body)["error"] == "too_many_connections"
                # an unnamed key is limited on its own ([default]: one stream), not by acme's count
                async with c3.stream("GET", "/v1/stream", headers={"X-API-Key": "plain-key"}) as r3:
                    assert r3.status_code == 200
                    r = await c2.get("/v1/stream", headers={"X-API-Key": "plain-key"})
                    assert r.status_code == 429
                await conn.send(json.dumps({"op": "unsubscribe", "id": 4, "sub": 1}))
                assert json.loads(await conn.recv())["type"] == "ack"
                await conn.send(json.dumps({"op": "subscribe", "id": 5}))
                assert json.loads(await conn.recv())["type"] == "ack"
        # the slots come back when the streams close
        async def reopened() -> bool:
            async with c2.stream("GET", "/v1/stream", headers=acme) as r:
                return r.status_code == 200
        await eventually(reopened, what="acme's streams released")
        metrics = (await c1.get("/metrics")).text
        assert 'oddsfeed_tenant_limited_total{limit="price_checks",tenant="acme"} 3.0' in metrics
        assert 'oddsfeed_tenant_limited_total{limit="connections",tenant="acme"} 2.0' in metrics
        assert 'oddsfeed_tenant_limited_total{limit="subscriptions",tenant="acme"} 1.0' in metrics


async def test_tenants_file_reload(store: Store, redis_url: str, tmp_path: Path) -> None:
    feed = await _feed(store)
    path = tmp_path / "tenants.toml"
    _write(path, _tenants_text())
    settings = Settings(heartbeat_ms=60_000, tenants_file=str(path))
    acme = {"X-API-Key": "acme-key"}
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c, httpx.AsyncClient(base_url=base, timeout=10) as c2:
        async with c2.stream("GET", "/v1/stream", headers=acme) as resp:
            sse = SSEReader(resp)
            assert (await sse.next()).event == "snapshot"
            # acme now sees tennis instead of soccer: its open stream is told and ended, new requests see tennis
            _write(path, _tenants_text(**{'sports = ["soccer"]': 'sports = ["tennis"]'}))
            ev = await sse.until(lambda e: e.event == "error", timeout_s=30)
            assert ev.data["code"] == "tenant_changed"
            with pytest.raises(EOFError):
                await sse.next(timeout_s=30)

        async def sees_tennis() -> bool:
            status, body = await _markets(c, "acme-key")
            return status == 200 and [m["market_id"] for m in body["markets"]] == ["1.ten"]
        await eventually(sees_tennis, timeout_s=30, what="the reloaded tenants file in force")
        # a file that does not parse: logged, counted, the previous one stays in force
        _write(path, "[tenant.acme\n")

        async def counted() -> bool:
            return 'oddsfeed_tenants_reloads_total{result="error"} 1.0' in (await c.get("/metrics")).text
        await eventually(counted, timeout_s=30, what="the bad file counted")
        assert await sees_tennis()
        # a key removed from the file is refused at once
        _write(path, _tenants_text(**{'keys = ["acme-key"]': 'keys = ["acme-key-2"]'}))

        async def revoked() -> bool:
            return (await _markets(c, "acme-key"))[0] == 401
        await eventually(revoked, timeout_s=30, what="the removed key refused")
        assert (await _markets(c, "acme-key-2"))[1]["count"] == 1
        del feed


async def test_tenants_file_errors_at_startup(tmp_path: Path) -> None:
    from streaming.app import create_app

    bad = tmp_path / "bad.toml"
    bad.write_text("[tenant.a]\nscopes = ['all']\n")
    with pytest.raises(ConfigError, match="scopes"):
        create_app(Settings(tenants_file=str(bad), api_keys=("k",)))
    with pytest.raises(ConfigError, match="No such file"):
        create_app(Settings(tenants_file=str(tmp_path / "missing.toml"), api_keys=("k",)))
    nokeys = tmp_path / "nokeys.toml"
    nokeys.write_text("[default]\nmax_connections = 5\n")
    with pytest.raises(ConfigError, match="no request could be accepted"):
        create_app(Settings(tenants_file=str(nokeys)))


def test_cli_rejects_a_bad_tenants_file_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text("[tenant.a]\nmax_connections = 'many'\n")
    r = subprocess.run([sys.executable, "-m", "feed", "serve", "--redis-url", "redis://127.0.0.1:1/0",
                        "--tenants", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--tenants" in r.stderr and "max_connections" in r.stderr


def test_the_example_tenants_file_is_valid() -> None:
    from streaming.tenants import load_tenants_file

    parsed, _ = load_tenants_file(str(Path(__file__).parent.parent / "deploy" / "tenants.example.toml"))
    assert set(parsed.tenant) == {"frontend", "placement"} and parsed.default is not None
    assert parsed.tenant["placement"].scopes == ["price_check", "read"]


# -- review findings (each failed before its fix) ------------------------------------------------

SOCCER_ONLY = '[tenant.acme]\nkeys = ["acme-key"]\nsports = ["soccer"]\n'


def _soccer_only(path: Path, extra: str = "") -> Settings:
    _write(path, SOCCER_ONLY + extra)
    return Settings(heartbeat_ms=60_000, tenants_file=str(path), api_keys=("plain-key",))


async def test_a_market_leaving_the_tenants_sight_is_removed_not_sent(store: Store, redis_url: str,
                                                                      tmp_path: Path) -> None:
    import msgspec

    from feed.models import Selection

    feed = await _feed(store)
    settings = _soccer_only(tmp_path / "t.toml")
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c, httpx.AsyncClient(base_url=base, timeout=10) as c2:
        async with c.stream("GET", "/v1/stream", headers={"X-API-Key": "acme-key"}) as resp, \
                c2.stream("GET", "/v1/stream", headers={"X-API-Key": "plain-key"}, params={"sport": "soccer"}) as r2:
            sse, sse2 = SSEReader(resp), SSEReader(r2)
            await sse.next()
            await sse2.next()
            move = msgspec.structs.replace(feed.header("1.soc", sport="tennis"), selections=[
                Selection(selection_id="1", name="sel 1", price=7.7, back=[(7.7, 10.0)])])
            await feed.write(move)
            ev = await sse.until(lambda e: e.event != "heartbeat")
            assert ev.event == "removed" and ev.data == {"type": "removed", "market_id": "1.soc",
                                                         "reason": "not_visible"}
            ev2 = await sse2.until(lambda e: e.event != "heartbeat")
            # a plain filter the market left gets removed too (architecture §72: it was the delta, the
            # client left to judge the filter)
            assert ev2.event == "removed" and ev2.data["market_id"] == "1.soc"


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_the_python_client_drops_a_market_its_tenant_no_longer_sees(store: Store, redis_url: str,
                                                                          tmp_path: Path, transport: str) -> None:
    from streaming.client import OddsClient

    feed = await _feed(store)
    settings = _soccer_only(tmp_path / "t.toml")
    async with serve(make_app(redis_url, settings=settings)) as base:
        url = base if transport == "sse" else base.replace("http://", "ws://")
        client = OddsClient(url, api_key="acme-key", heartbeat_ms=500)
        await client.start()
        try:
            await eventually(lambda: set(client.markets) == {"1.soc"}, what="acme's book")
            await feed.write(feed.header("1.soc", sport="tennis"))
            await eventually(lambda: not client.markets, what="the market gone from acme's book")
        finally:
            await client.close()


async def test_a_conflated_stream_never_merges_a_hidden_markets_later_prices(store: Store, redis_url: str,
                                                                             tmp_path: Path) -> None:
    feed = await _feed(store)
    settings = _soccer_only(tmp_path / "t.toml")
    async with serve(make_app(redis_url, settings=settings)) as base:
        async with connect(base.replace("http://", "ws://") + "/v1/ws",
                           additional_headers={"X-API-Key": "acme-key"}) as conn:
            await conn.send(json.dumps({"op": "subscribe", "id": 1, "conflate_ms": 1500}))
            assert json.loads(await conn.recv())["type"] == "ack"
            assert json.loads(await conn.recv())["type"] == "snapshot"
            await feed.write(feed.price("1.soc", "1", 2.2))
            await feed.write(feed.header("1.soc", sport="tennis"))
            await feed.write(feed.price("1.soc", "1", 9.9))
            while (m := json.loads(await asyncio.wait_for(conn.recv(), 10)))["type"] == "heartbeat":
                pass
            assert m["type"] == "removed" and m["market_id"] == "1.soc" and "9.9" not in json.dumps(m)


async def test_status_of_a_source_the_tenant_may_not_see_is_not_sent(store: Store, redis_url: str,
                                                                     tmp_path: Path) -> None:
    from feed.models import SourceHealth
    from streaming_helpers import now_ms

    await _feed(store)
    settings = _soccer_only(tmp_path / "t.toml", 'sources = ["t"]\n')
    lease = 600_000
    await store.set_health(SourceHealth(source="secret", kind="push", state="UP", last_message_at=now_ms(),
                                        updated_at=now_ms(), lease_ms=lease))
    await store.set_health(SourceHealth(source="t", kind="push", state="UP", last_message_at=now_ms(),
                                        updated_at=now_ms(), lease_ms=lease))
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream", headers={"X-API-Key": "acme-key"}) as resp:
            sse = SSEReader(resp)
            assert (await sse.next()).event == "snapshot"
            await store.set_health(SourceHealth(source="secret", kind="push", state="DOWN", reason="contract",
                                                last_message_at=now_ms(), updated_at=now_ms(), lease_ms=lease))
            await store.set_health(SourceHealth(source="t", kind="push", state="DOWN", reason="x",
                                                last_message_at=now_ms(), updated_at=now_ms(), lease_ms=lease))
            st = await sse.until(lambda e: e.event == "status")
            assert st.data["source"] == "t"  # the hidden source's (announced first, if at all) never came


async def test_a_reload_that_moves_a_key_into_a_tenant_closes_its_stream(store: Store, redis_url: str,
                                                                         tmp_path: Path) -> None:
    await _feed(store)
    path = tmp_path / "t.toml"
    settings = _soccer_only(path)
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream", headers={"X-API-Key": "plain-key"}) as resp:
            sse = SSEReader(resp)
            assert len((await sse.next()).data["markets"]) == 2
            _write(path, SOCCER_ONLY + '[tenant.partner]\nkeys = ["plain-key"]\nsports = ["soccer"]\n')
            ev = await sse.until(lambda e: e.event == "error", timeout_s=30)
            assert ev.data["code"] == "tenant_changed"


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_resume_after_the_tenant_was_narrowed_is_not_recovered(store: Store, redis_url: str,
                                                                       tmp_path: Path, transport: str) -> None:
    """acme loses tennis: its streams are closed (tenant_changed) and its clients resume with their
    tokens. The log holds no trace of the change, so a recovered resume left the tennis market in
    their books for ever: the resume is not recovered — a fresh snapshot under the new entry. A
    token issued under the new entry resumes as before."""
    feed = await _feed(store)
    path = tmp_path / "t.toml"
    _write(path, SOCCER_ONLY.replace('["soccer"]', '["soccer", "tennis"]'))
    settings = Settings(heartbeat_ms=60_000, tenants_file=str(path))
    acme = {"X-API-Key": "acme-key"}
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:

        @asynccontextmanager
        async def opened(token: str | None) -> AsyncIterator[tuple[Any, Any]]:
            """(next message, the token of the last message read) of a new stream resuming from ``token``."""
            if transport == "sse":
                headers = {**acme, **({"Last-Event-ID": token} if token else {})}
                async with c.stream("GET", "/v1/stream", headers=headers) as resp:
                    sse = SSEReader(resp)

                    async def next_sse() -> dict[str, Any]:
                        return dict((await sse.until(lambda e: e.event != "heartbeat", timeout_s=30)).data)
                    yield next_sse, lambda: sse.last_id
                return
            async with connect(base.replace("http://", "ws://") + "/v1/ws", additional_headers=acme) as conn:
                last: list[str | None] = [None]

                async def next_ws() -> dict[str, Any]:
                    while True:
                        try:
                            m = json.loads(await asyncio.wait_for(conn.recv(), 30))
                        except ConnectionClosed:
                            raise EOFError("closed") from None
                        last[0] = m.get("token") or last[0]
                        if m["type"] not in ("heartbeat", "ack"):
                            return dict(m)
                await conn.send(json.dumps({"op": "subscribe", "id": 1, **({"resume": token} if token else {})}))
                yield next_ws, lambda: last[0]

        async with opened(None) as (nxt, token_of):
            snap = await nxt()
            assert sorted(m["market_id"] for m in snap["markets"]) == ["1.soc", "1.ten"]
            token = token_of()
            _write(path, SOCCER_ONLY)  # acme no longer sees tennis
            err = await nxt()
            assert err["type"] == "error" and err["code"] == "tenant_changed"
            with pytest.raises(EOFError):
                await nxt()
        assert token
        async with opened(token) as (nxt, token_of):
            resumed = await nxt()
            assert resumed["type"] == "resumed" and resumed["recovered"] is False, resumed
            snap = await nxt()
            assert snap["type"] == "snapshot" and [m["market_id"] for m in snap["markets"]] == ["1.soc"]
            await feed.write(feed.price("1.soc", "1", 2.2))
            assert (await nxt())["market_id"] == "1.soc"
            token = token_of()
        await feed.write(feed.price("1.ten", "1", 4.4), feed.price("1.soc", "1", 2.4))
        async with opened(token) as (nxt, token_of):
            resumed = await nxt()
            assert resumed["type"] == "resumed" and resumed["recovered"] is True, resumed
            got = await nxt()
            assert got["type"] == "delta" and got["market_id"] == "1.soc" and got["selections"][0]["price"] == 2.4


async def test_a_restricted_credentials_token_the_node_cannot_vouch_for_is_not_recovered(
        store: Store, redis_url: str, tmp_path: Path) -> None:
    """A node that has not served acme's allow-lists since it started (it restarted, or another
    node issued the token) cannot tell what acme saw when the token was issued — its entry may have
    changed meanwhile — so acme's resume gets a snapshot; a credential that sees every market
    (nothing it holds can have been hidden from it) resumes as before."""
    from streaming.encoding import encode_token

    feed = await _feed(store)
    before = await store.last_log_id(0)
    await feed.write(feed.price("1.soc", "1", 2.1))
    token = encode_token(store.epoch, [before]).decode()
    async with serve(make_app(redis_url, settings=_soccer_only(tmp_path / "t.toml"))) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        for key, recovered in (("acme-key", False), ("plain-key", True)):
            async with c.stream("GET", "/v1/stream", headers={"X-API-Key": key, "Last-Event-ID": token}) as resp:
                sse = SSEReader(resp)
                ev = await sse.next()
                assert ev.event == "resumed" and ev.data["recovered"] is recovered, (key, ev)
                ev = await sse.until(lambda e: e.event != "heartbeat")
                if recovered:
                    assert ev.event == "delta" and ev.data["selections"][0]["price"] == 2.1
                else:
                    assert ev.event == "snapshot" and [m["market_id"] for m in ev.data["markets"]] == ["1.soc"]


@pytest.mark.parametrize("edit", ["key", "limit"])
async def test_a_new_key_or_limit_keeps_the_tenants_streams(store: Store, redis_url: str, tmp_path: Path,
                                                            edit: str) -> None:
    feed = await _feed(store)
    path = tmp_path / "t.toml"
    settings = _soccer_only(path)
    app = make_app(redis_url, settings=settings)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream", headers={"X-API-Key": "acme-key"}) as resp:
            sse = SSEReader(resp)
            assert (await sse.next()).event == "snapshot"
            if edit == "key":  # a key rotation starts by adding the new key
                _write(path, SOCCER_ONLY.replace('["acme-key"]', '["acme-key", "acme-key-2"]'))
            else:
                _write(path, SOCCER_ONLY + "price_checks_per_s = 100\nmax_connections = 50\n")

            async def in_force() -> bool:
                return app.state.node.tenants.reloads["ok"] == 1
            await eventually(in_force, timeout_s=30, what="the edited file in force")
            await feed.write(feed.price("1.soc", "1", 2.4))
            ev = await sse.until(lambda e: e.event != "heartbeat")
            assert ev.event == "delta" and ev.data["market_id"] == "1.soc"  # not an error and a close


async def test_limits_hold_when_the_asgi_servers_send_suspends(store: Store, redis_url: str,
                                                               tmp_path: Path) -> None:
    """Check and count in one step: an ASGI server whose send() yields (any server that writes
    through an awaitable) must not let six concurrent streams past a limit of one."""
    from contextlib import asynccontextmanager

    import uvicorn

    await _feed(store)
    settings = _soccer_only(tmp_path / "t.toml", "max_connections = 1\n")
    app = make_app(redis_url, settings=settings)

    async def yielding(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await app(scope, receive, send)

        async def ysend(message: Any) -> None:
            await asyncio.sleep(0)
            await send(message)
        await app(scope, receive, ysend)

    @asynccontextmanager
    async def serve_plain() -> Any:
        server = uvicorn.Server(uvicorn.Config(yielding, host="127.0.0.1", port=0, lifespan="on",
                                               log_level="warning", timeout_graceful_shutdown=5))
        task = asyncio.create_task(server.serve())
        await eventually(lambda: server.started or task.done(), what="uvicorn started")
        try:
            yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30)

    async with serve_plain() as base:
        ws = base.replace("http://", "ws://") + "/v1/ws"

        async def one() -> Any:
            try:
                return await connect(ws, additional_headers={"X-API-Key": "acme-key"})
            except InvalidStatus as exc:
                return exc.response.status_code
        out = await asyncio.gather(*(one() for _ in range(6)))
        opened = [c for c in out if not isinstance(c, int)]
        try:
            assert len(opened) == 1 and sorted(c for c in out if isinstance(c, int)) == [429] * 5
        finally:
            for conn in opened:
                await conn.close()
        p = app.state.node.tenants.principals["tenant:acme"]
        await eventually(lambda: p.connections == 0 and p.subscriptions == 0, what="the counts back to zero")


async def test_a_hidden_event_answers_like_an_unknown_one(store: Store, redis_url: str, tmp_path: Path) -> None:
    await _feed(store)
    settings = _soccer_only(tmp_path / "t.toml")
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        acme = {"X-API-Key": "acme-key"}
        events = (await c.get("/v1/events", headers={"X-API-Key": "plain-key"})).json()["events"]
        hidden = next(e["event_id"] for e in events if e["sport"] == "tennis")
        r1 = await c.get(f"/v1/events/{hidden}", headers=acme)
        r2 = await c.get("/v1/events/ev:nothing-like-it", headers=acme)
        r3 = await c.get("/v1/events/e2", headers=acme)  # the hidden event's provider id
        assert r1.status_code == r2.status_code == r3.status_code == 404
        assert r1.json()["message"].replace(hidden, "X") == r2.json()["message"].replace("ev:nothing-like-it", "X")


async def test_a_tenant_entry_reverted_while_its_client_is_away_voids_its_resume(store: Store, redis_url: str,
                                                                                  tmp_path: Path) -> None:
    """A → B (the stream closed, resumed unrecovered under B: tennis now held) → back to A while
    the client is away (no stream open: nothing closed, nothing marked). The resume with B's
    token was recovered against the old (acme, A) grant: the client kept 1.ten, hidden and
    frozen (review, §66). Any change of the file now voids restricted credentials' older tokens."""
    feed = await _feed(store)
    path = tmp_path / "tenants.toml"
    _write(path, SOCCER_ONLY)
    wide = SOCCER_ONLY.replace('["soccer"]', '["soccer", "tennis"]')
    acme = {"X-API-Key": "acme-key"}
    settings = Settings(heartbeat_ms=60_000, tenants_file=str(path))
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def count() -> int:
            return int((await c.get("/v1/markets", headers=acme)).json()["count"])

        async with c.stream("GET", "/v1/stream", headers=acme) as resp:
            sse = SSEReader(resp)
            assert [m["market_id"] for m in (await sse.next()).data["markets"]] == ["1.soc"]
            await feed.write(feed.price("1.soc", "1", 2.1))
            token = (await sse.until(lambda e: e.event == "delta")).id
        _write(path, wide)
        await eventually(lambda: _is(count, 2), what="B in force")
        async with c.stream("GET", "/v1/stream", headers={**acme, "Last-Event-ID": token}) as resp:
            sse = SSEReader(resp)
            assert (await sse.next()).data["recovered"] is False
            snap = await sse.until(lambda e: e.event == "snapshot")
            assert sorted(m["market_id"] for m in snap.data["markets"]) == ["1.soc", "1.ten"]
            await feed.write(feed.price("1.soc", "1", 2.2))
            token = (await sse.until(lambda e: e.event == "delta")).id  # a token issued under B
        _write(path, SOCCER_ONLY)  # reverted while acme's client is away
        await eventually(lambda: _is(count, 1), what="A in force again")
        await feed.write(feed.price("1.ten", "1", 9.9), feed.price("1.soc", "1", 2.4))
        async with c.stream("GET", "/v1/stream", headers={**acme, "Last-Event-ID": token}) as resp:
            sse = SSEReader(resp)
            resumed = await sse.next()
            assert resumed.event == "resumed" and resumed.data["recovered"] is False, resumed.data
            snap = await sse.until(lambda e: e.event == "snapshot")
            assert [m["market_id"] for m in snap.data["markets"]] == ["1.soc"]


async def _is(count: Any, n: int) -> bool:
    return bool(await count() == n)


async def test_rest_leaves_out_an_event_state_of_a_source_the_tenant_may_not_see(store: Store, redis_url: str,
                                                                                 tmp_path: Path) -> None:
    """A tenant limited to source ``t`` sees event e1's markets (from ``t``); e1's score comes
    from another source, ``scores``. The streams never send it that state (the hub checks its
    source); REST's event endpoints showed it."""
    from feed.models import EventState, Score
    from streaming_helpers import eventually, now_ms

    await _feed(store)
    t = now_ms()
    await store.apply_event_states([EventState(event_id="e1", source="scores", status="LIVE", in_play=True,
                                               score=Score(home=2, away=1), source_ts=t, received_at=t, version=1)])
    settings = _soccer_only(tmp_path / "t.toml", 'sources = ["t"]\n')
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def state_seen(key: str) -> Any:
            r = await c.get("/v1/events/e1", headers={"X-API-Key": key})
            return r if r.status_code == 200 and r.json()["state"] is not None else None
        plain = await eventually(lambda: state_seen("plain-key"), what="the score served to an unrestricted key")
        assert plain.json()["state"]["score"]["home"] == 2
        r = await c.get("/v1/events/e1", headers={"X-API-Key": "acme-key"})
        assert r.status_code == 200 and r.json()["state"] is None and r.json()["states"] == []
        events = (await c.get("/v1/events", headers={"X-API-Key": "acme-key"})).json()["events"]
        assert [e["event_id"] for e in events] and all("state" not in e for e in events)
        everyone = (await c.get("/v1/events", headers={"X-API-Key": "plain-key"})).json()["events"]
        assert any("state" in e for e in everyone)
