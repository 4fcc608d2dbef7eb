"""OpenAPI 3.1 (``/openapi.json``, ``/docs``) against a real server: the document is valid OpenAPI
3.1 (openapi-spec-validator), names every route of the app, and every real answer — each GET
endpoint, the price-check POSTs, 4xx errors, 304, 401 — and real stream messages (SSE snapshot,
delta, heartbeat, status, resumed; WebSocket ack, pong, error and subscription messages) validate
against the documented schemas with jsonschema (draft 2020-12, ``$ref`` into components) with
every object schema *closed* (``additionalProperties: false`` added here): a key the server sends
that the document does not name fails. /docs loads only files this server serves."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi
from starlette.routing import Mount, Route, WebSocketRoute
from websockets.asyncio.client import connect

from feed.models import Clock, EventState, MarketHeader, Score, Selection, SourceHealth, TeamCounts
from feed.normalise.base import MarketUpdate
from feed.settings import Settings
from feed.store import Store, StoredLink
from streaming.openapi import openapi_document
from streaming_helpers import Feed, SSEReader, eventually, make_app, now_ms, serve


def _closed(node: Any) -> Any:
    """A copy of a schema tree in which every object schema with ``properties`` refuses other keys."""
    if isinstance(node, list):
        return [_closed(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Schemas:
    """Validates instances against parts of one OpenAPI document (2020-12, refs into components)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components = _closed(doc["components"])

    def check(self, schema: dict[str, Any], instance: Any, what: str) -> None:
        root = {"$schema": "https://json-schema.org/draft/2020-12/schema", **_closed(schema),
                "components": self.components}
        jsonschema.Draft202012Validator.check_schema(root)
        errors = sorted(jsonschema.Draft202012Validator(root).iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{what}: {errors[0].message} at {list(errors[0].absolute_path)}"

    def component(self, name: str, instance: Any, what: str = "") -> None:
        self.check({"$ref": f"#/components/schemas/{name}"}, instance, what or name)

    def fails(self, name: str, instance: Any) -> bool:
        root = {"$ref": f"#/components/schemas/{name}", "components": self.components}
        return not jsonschema.Draft202012Validator(root).is_valid(instance)

    def response(self, method: str, path: str, r: httpx.Response) -> None:
        """``r`` is documented for ``method path``: its status, media type, headers and body."""
        op = self.doc["paths"][path][method]
        doc = op["responses"].get(str(r.status_code))
        assert doc is not None, f"{method.upper()} {path}: status {r.status_code} is not documented"
        for header in doc.get("headers", {}):
            assert header.lower() in r.headers, f"{method.upper()} {path}: header {header} missing"
        content = doc.get("content")
        if content is None:
            assert r.content == b"", f"{method.upper()} {path} {r.status_code}: undocumented body"
            return
        media = r.headers["content-type"].split(";")[0].strip()
        assert media in content, f"{method.upper()} {path} {r.status_code}: {media} not in {list(content)}"
        body = r.json() if media == "application/json" else r.text
        self.check(content[media]["schema"], body, f"{method.upper()} {path} {r.status_code}")


def _template(route: Route | WebSocketRoute) -> str:
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)


def _market(mid: str, source: str, event: str, prices: tuple[float, float, float]) -> MarketUpdate:
    t = now_ms()
    sels = [Selection(selection_id=o, name=o.title(), price=p, back=[(p, 50.0), (p - 0.05, 80.0)],
                      lay=[(p + 0.02, 40.0)], outcome=o) for o, p in zip(("home", "draw", "away"), prices)]
    return MarketUpdate(market_id=mid, source=source, image=True,
                        header=MarketHeader(sport="soccer", event_id=event, event_name="Arsenal v Chelsea",
                                            bookmaker=source, status="OPEN", market_type="match_result",
                                            market_type_raw="h2h", start_time=t + 3_600_000,
                                            specifiers={}),
                        selections=sels, source_ts=t, received_at=t + 1)


async def _seed(store: Store) -> Feed:
    feed = Feed(store)
    await feed.write(_market("a:1", "book_a", "a:e", (2.10, 3.40, 3.60)),
                     _market("b:1", "book_b", "b:e", (2.20, 3.30, 3.50)),
                     feed.image("bf:1.1", event="bf:e1", in_play=True))
    for source in ("book_a", "book_b", "t"):
        await store.set_health(SourceHealth(source=source, kind="push", state="UP", last_message_at=now_ms(),
                                            updated_at=now_ms(), lease_ms=600_000, stale_after_ms=600_000,
                                            lag_p50_ms=3, lag_p99_ms=9, cursor="c1"))
    from feed.history import Top, _ENCODER

    t0 = now_ms() - 60_000  # two recorded changes of a:1's selection 1, as an ingest writes them
    await store.write_history({"a:1": [(t0, t0 + 5, 1, _ENCODER.encode([Top("1", 2.08, 40.0, 2.14, 12.0, None, 2.08)])),
                                       (t0 + 30_000, t0 + 30_005, 2,
                                        _ENCODER.encode([Top("1", 2.10, 55.0, None, None, 2.1, 2.10)]))]},
                              3_600_000)
    await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.96, "fuzzy")},
                           {"ev:a:e": json.dumps({"event_id": "ev:a:e", "sport": "soccer", "name": "Arsenal v Chelsea",
                                                  "home": "Arsenal", "away": "Chelsea",
                                                  "members": ["a:e", "b:e"]}).encode()})
    return feed


async def _ready(c: httpx.AsyncClient) -> None:
    async def linked() -> bool:
        r = await c.get("/v1/events/ev:a:e")
        return r.status_code == 200 and r.json()["event"]["bookmakers"] == ["book_a", "book_b"] \
            and (await c.get("/ready")).status_code == 200
    await eventually(linked, what="the node loaded markets and links")


def test_document_is_valid_openapi_31_both_ways() -> None:
    for auth in (False, True):
        doc = openapi_document(auth=auth, version="1.2.3")
        validate_openapi(doc)  # raises OpenAPIValidationError
        assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == "1.2.3"
        assert json.loads(json.dumps(doc)) == doc  # plain JSON, nothing Python-only
        schemes = doc["components"]["securitySchemes"]
        assert schemes["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                           "description": schemes["ApiKeyHeader"]["description"]}
        assert {(s["type"], s.get("in"), s.get("name"), s.get("scheme")) for s in schemes.values()} == {
            ("apiKey", "header", "X-API-Key", None), ("http", None, None, "bearer"),
            ("apiKey", "query", "api_key", None), ("apiKey", "query", "access_token", None)}
        for path, item in doc["paths"].items():
            for op in item.values():
                if path.startswith("/v1/"):
                    assert ("security" in op) == auth and ("401" in op["responses"]) == auth, path
                else:
                    assert op["security"] == [], path  # public whatever the configuration
        names = doc["components"]["schemas"]
        for name in ("SnapshotMessage", "DeltaMessage", "StatusMessage", "HeartbeatMessage", "ResumedMessage",
                     "ErrorMessage", "AckMessage", "PongMessage", "Subscribe", "Unsubscribe", "Ping", "ClientOp",
                     "StreamMessage", "ServerMessage", "ErrorBody"):
            assert name in names, name


async def test_every_rest_answer_matches_the_document(store: Store, redis_url: str) -> None:
    await _seed(store)
    app = make_app(redis_url)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/openapi.json")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        doc = r.json()
        validate_openapi(doc)
        assert doc["openapi"].startswith("3.1")
        s = Schemas(doc)
        # the document names exactly the app's routes (the board's "/" mount and the /v1 catch-all
        # that answers what no route does — JSON 404 / 405 / 426 — aside)
        routes = {_template(rt) for rt in app.routes if isinstance(rt, (Route, WebSocketRoute))
                  and not isinstance(rt, Mount) and "{name}" not in rt.path and rt.path != "/v1/{rest:path}"}
        assert set(doc["paths"]) == routes
        await _ready(c)

        seen: set[tuple[str, str, int]] = set()

        async def get(path: str, url: str, status: int, **kw: Any) -> httpx.Response:
            r = await c.get(url, **kw)
            assert r.status_code == status, (url, r.status_code, r.text[:300])
            s.response("get", path, r)
            seen.add(("get", path, status))
            return r

        r = await get("/v1/markets", "/v1/markets", 200)
        assert r.json()["count"] == 3
        s.component("MarketWithAge", r.json()["markets"][0])
        await get("/v1/markets", "/v1/markets", 304, headers={"If-None-Match": r.headers["etag"]})
        await get("/v1/markets", "/v1/markets?sport=soccer&in_play=false&status=open,suspended", 200)
        await get("/v1/markets", "/v1/markets?in_play=maybe", 400)
        await get("/v1/markets/{market_id}", "/v1/markets/a:1", 200)
        await get("/v1/markets/{market_id}", "/v1/markets/bf:1.1", 200)
        r = await get("/v1/markets/{market_id}", "/v1/markets/nope", 404)
        assert r.json()["error"] == "unknown_market"
        r = await get("/v1/events", "/v1/events", 200)
        assert {e["event_id"] for e in r.json()["events"]} == {"ev:a:e", "ev:bf:e1"}
        r = await get("/v1/events", "/v1/events?view=best&market_type=match_result", 200)
        assert any(e.get("view") for e in r.json()["events"])
        await get("/v1/events", "/v1/events?view=bogus", 400)
        r = await get("/v1/events/{event_id}", "/v1/events/ev:a:e", 200)
        body = r.json()
        assert body["view"][0]["outcomes"][0]["best"] and body["markets"] and body["event"]["members"]
        r = await get("/v1/events/{event_id}", "/v1/events/b:e?view=best", 200)
        assert "markets" not in r.json()
        await get("/v1/events/{event_id}", "/v1/events/nope", 404)
        await get("/v1/events/{event_id}", "/v1/events/ev:a:e?view=bogus", 400)
        r = await get("/v1/markets/{market_id}/history", "/v1/markets/a:1/history", 200)
        assert r.json()["entries"] == 2
        await get("/v1/markets/{market_id}/history", "/v1/markets/a:1/history?from=soon", 400)
        await get("/v1/markets/{market_id}/history", "/v1/markets/nope/history", 404)
        r = await get("/v1/price-at", f"/v1/price-at?market=a:1&selection=1&side=back&ts={now_ms()}", 200)
        assert r.json()["price"] == 2.10
        await get("/v1/price-at", "/v1/price-at?market=a:1&selection=1&side=both&ts=1", 400)
        await get("/v1/price-at", "/v1/price-at?market=a:1&selection=1&side=back&ts=1000", 404)
        await get("/v1/sports", "/v1/sports", 200)
        r = await get("/v1/sources", "/v1/sources", 200)
        assert {x["source"] for x in r.json()["sources"]} == {"book_a", "book_b", "t"}
        await get("/health", "/health", 200)
        r = await get("/ready", "/ready", 200)
        assert r.json()["ready"] is True and r.json()["partitions"]
        r = await get("/metrics", "/metrics", 200)
        assert "oddsfeed_markets" in r.text
        await get("/openapi.json", "/openapi.json", 200)
        await get("/docs", "/docs", 200)
        await get("/v1/stream", "/v1/stream?heartbeat_ms=5", 400)  # the stream's 400 (200 is a stream: below)

        # every documented GET endpoint but the streams was called, 200 and every documented 4xx
        gets = {p for p, item in doc["paths"].items() if "get" in item} - {"/v1/stream", "/v1/ws"}
        assert gets == {p for m, p, st in seen if st == 200}
        for p in gets:
            for code in doc["paths"][p]["get"]["responses"]:
                if code.startswith("4"):
                    assert ("get", p, int(code)) in seen, (p, code)

        # price check: the requests sent validate against the documented request bodies, the answers
        # against the documented responses; a body the server refuses fails the schema too
        async def post(path: str, body: Any, status: int) -> dict[str, Any]:
            r = await c.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            s.response("post", path, r)
            return r.json()

        book = {"market_id": "a:1", "selection_id": "home", "side": "back", "price": 2.1, "max_age_ms": 60_000}
        best = {"event": "ev:a:e", "market": "match_result", "outcome": "home", "side": "back", "price": 2.12}
        lay = {"market_id": "bf:1.1", "selection_id": "1", "side": "lay", "price": 2.5, "accept_better": False}
        unknown = {"market_id": "zz:1", "selection_id": "1", "side": "back", "price": 3.0}
        for leg in (book, best, lay, unknown):
            s.component("PriceCheckRequest", leg)
        answer = await post("/v1/price-check", book, 200)
        assert answer["reason"] == "OK" and answer["accepted"] is True
        answer = await post("/v1/price-check", best, 200)
        assert answer["bookmaker"] == "book_b" and len(answer["books"]) == 2
        assert (await post("/v1/price-check", lay, 200))["reason"] == "PRICE_CHANGED"
        assert (await post("/v1/price-check", unknown, 200))["reason"] == "UNKNOWN_MARKET"
        batch = {"legs": [book, best, lay]}
        s.component("BatchRequest", batch)
        answer = await post("/v1/price-check/batch", batch, 200)
        assert answer["accepted"] is False and len(answer["legs"]) == 3
        for bad in ({**book, "price": 0.5}, {**book, "colour": "red"}, {"side": "back"}):
            assert (await post("/v1/price-check", bad, 422))["error"] == "invalid_request"
        for bad in ({**book, "price": 0.5}, {**book, "colour": "red"}):
            assert s.fails("PriceCheckRequest", bad)
        bad_batches: list[dict[str, Any]] = [{"legs": []}, {"legs": [book] * 51}, {"legs": [book], "x": 1}]
        for bad_batch in bad_batches:
            assert s.fails("BatchRequest", bad_batch)
            assert (await post("/v1/price-check/batch", bad_batch, 422))["error"] == "invalid_request"
        r = await c.post("/v1/price-check", content=b"x" * (70 << 10), headers={"content-type": "application/json"})
        assert r.status_code == 413
        s.response("post", "/v1/price-check", r)


async def test_public_with_auth_on_and_401_documented(store: Store, redis_url: str) -> None:
    await _seed(store)
    settings = Settings(heartbeat_ms=60_000, api_keys=("k1",))
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/openapi.json")  # no credential: public
        assert r.status_code == 200
        doc = r.json()
        validate_openapi(doc)
        s = Schemas(doc)
        assert doc["paths"]["/v1/markets"]["get"]["security"]
        for url in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/health"):
            assert (await c.get(url)).status_code == 200, url
        r = await c.get("/v1/markets")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        s.response("get", "/v1/markets", r)
        r = await c.post("/v1/price-check", json={"market_id": "a:1", "selection_id": "home", "side": "back",
                                                  "price": 2.1})
        assert r.status_code == 401
        s.response("post", "/v1/price-check", r)
        credentials: list[dict[str, Any]] = [{"headers": {"X-API-Key": "k1"}},
                                             {"headers": {"Authorization": "Bearer k1"}}, {"params": {"api_key": "k1"}}]
        for kw in credentials:
            r = await c.get("/v1/sports", **kw)
            assert r.status_code == 200, kw
            s.response("get", "/v1/sports", r)


async def test_docs_page_loads_only_local_assets(store: Store, redis_url: str) -> None:
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert not re.search(r"https?://", page), "the docs page must not load anything from elsewhere"
        assert "/openapi.json" in page and "validatorUrl: null" in page
        refs = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert len(refs) >= 3
        for ref in refs:
            assert ref.startswith("/"), ref
            a = await c.get(ref)
            assert a.status_code == 200 and len(a.content) > 500, ref
            if ref.endswith(".js"):
                assert a.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in a.content
            elif ref.endswith(".css"):
                assert a.headers["content-type"].startswith("text/css")
                assert not re.search(rb"@import|url\(\s*['\"]?https?:", a.content)
        assert (await c.get("/docs/assets/index.html")).status_code == 404  # only the files the page needs
        assert (await c.get("/docs/assets/..%2Fswagger-ui.css")).status_code == 404


async def test_stream_messages_match_the_document(store: Store, redis_url: str) -> None:
    feed = await _seed(store)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        s = Schemas((await c.get("/openapi.json")).json())
        await _ready(c)

        def check(msg: dict[str, Any], what: str) -> None:
            s.component("StreamMessage", msg, what)
            s.component(_component_of(msg), msg, what)

        seen: set[str] = set()
        async with c.stream("GET", "/v1/stream?sport=soccer&heartbeat_ms=300") as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            assert "200" in s.doc["paths"]["/v1/stream"]["get"]["responses"]
            sse = SSEReader(resp)
            snap = await sse.next()
            assert snap.event == "snapshot" and len(snap.data["markets"]) == 3
            check(snap.data, "snapshot")
            await feed.write(feed.price("bf:1.1", "1", 2.5))
            await feed.write(feed.image("bf:9.9", event="bf:e9"))
            await feed.write(feed.header("bf:1.1", status="SUSPENDED", suspend_reason="goal"))
            kinds: set[str] = set()
            while kinds != {"delta", "image", "header"} or "heartbeat" not in seen:
                ev = await sse.next()
                assert ev.event == ev.data["type"]
                check(ev.data, ev.event)
                seen.add(ev.event)
                if ev.event == "delta":
                    kinds.add(ev.data["kind"])
                    if ev.data["kind"] == "delta":
                        kinds.add("header" if "header" in ev.data else "delta")
            token = sse.last_id
            t = now_ms()
            await store.apply_event_states([EventState(
                event_id="bf:e1", source="t", status="LIVE", in_play=True, period="2h",
                clock=Clock(seconds=3000, running=True, at=t), score=Score(home=1, away=0),
                red_cards=TeamCounts(home=0, away=1), source_ts=t, received_at=t, version=1)])
            state = await sse.until(lambda e: e.event == "event_state")
            check(state.data, "event_state")
            assert state.id is None and sse.last_id == token
            await store.set_health(SourceHealth(source="t", kind="push", state="DOWN", reason="heartbeat_missed",
                                                last_message_at=now_ms(), updated_at=now_ms(), lease_ms=600_000))
            status = await sse.until(lambda e: e.event == "status")
            check(status.data, "status")
            assert status.data["state"] == "DOWN"
        async with c.stream("GET", f"/v1/stream?sport=soccer&last_event_id={token}") as resp:
            sse = SSEReader(resp)
            resumed = await sse.next()
            assert resumed.event == "resumed"
            check(resumed.data, "resumed")

        ws_url = base.replace("http://", "ws://") + "/v1/ws"
        ops = [{"op": "subscribe", "id": 1, "filter": {"sport": "soccer", "in_play": True}, "conflate_ms": 0},
               {"op": "ping", "id": "p"}, {"op": "unsubscribe", "id": 3, "sub": 1}]
        for op in ops:
            s.component("ClientOp", op)
        bad = {"op": "subscribe", "id": 4, "filtre": {}}
        assert s.fails("ClientOp", bad) and s.fails("ClientOp", {"op": "jump"})
        async with connect(ws_url) as ws:
            async def recv() -> dict[str, Any]:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                s.component("ServerMessage", msg, msg.get("type", "?"))
                s.component(_component_of(msg), msg, msg["type"])
                return msg

            await ws.send(json.dumps(ops[0]))
            ack = await recv()
            assert ack == {"type": "ack", "id": 1, "sub": 1}
            first = await recv()
            assert first["type"] == "snapshot" and first["sub"] == 1 and "token" in first
            state_msg = await recv()  # bf:e1's state, after the snapshot of its in-play market
            assert state_msg["type"] == "event_state" and state_msg["sub"] == 1 and "token" not in state_msg
            await feed.write(feed.price("bf:1.1", "2", 4.2))
            delta = await recv()
            while delta["type"] != "delta":
                delta = await recv()
            assert delta["sub"] == 1 and "token" in delta
            await ws.send(json.dumps(ops[1]))
            pong = await recv()
            while pong["type"] != "pong":
                pong = await recv()
            assert pong == {"type": "pong", "id": "p"}
            await ws.send(json.dumps(bad))
            err = await recv()
            while err["type"] != "error":
                err = await recv()
            assert err["code"] == "bad_request" and err["id"] == 4
            await ws.send(json.dumps(ops[2]))
            ack = await recv()
            while ack["type"] != "ack":
                ack = await recv()
            assert ack["id"] == 3


def _component_of(msg: dict[str, Any]) -> str:
    """The schema of a stream message by its type: ``event_state`` → ``EventStateMessage``."""
    return "".join(part.title() for part in msg["type"].split("_")) + "Message"


def test_closed_schemas_catch_undocumented_keys() -> None:
    """The check itself: an answer with a key the document does not name fails."""
    s = Schemas(openapi_document())
    health = {"status": "ok", "version": "1", "revision": None, "started_at": 1, "uptime_s": 0.5, "now": 2}
    s.component("Health", health)
    with pytest.raises(AssertionError):
        s.component("Health", {**health, "extra": 1})
    with pytest.raises(AssertionError):
        s.component("HeartbeatMessage", {"type": "heartbeat", "as_of": 1, "surprise": True})
    assert copy.deepcopy(s.doc) == s.doc
