"""Query parameters an endpoint does not take are refused with a 400 that names
them (they were ignored: ``/v1/markets?evnt=e1``, a typo, answered with every
market, and ``?event=a&event=b`` kept only ``b``)."""

from __future__ import annotations

import json

import httpx
from websockets.asyncio.client import connect

from feed.settings import Settings
from feed.store import Store
from streaming.openapi import openapi_document
from streaming.queryparams import CREDENTIAL_PARAMS, query_check
from streaming_helpers import Feed, SSEReader, make_app, serve


async def test_unknown_and_repeated_query_parameters_get_a_400_naming_them(store: Store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("bf:1.1", event="bf:e1"), feed.image("bf:1.2", event="bf:e2"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/markets?evnt=bf:e1")
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
        msg = r.json()["message"]
        assert "unknown query parameter 'evnt'" in msg and "event" in msg and "GET /v1/markets" in msg
        r = await c.get("/v1/markets?event=bf:e1&event=bf:e2")
        assert r.status_code == 400 and "'event' given more than once" in r.json()["message"]
        assert "comma-separated" in r.json()["message"]
        # what the endpoints take still works, credentials included (authentication is off here)
        r = await c.get("/v1/markets?event=bf:e1,bf:e2&api_key=k")
        assert r.status_code == 200 and r.json()["count"] == 2
        assert (await c.get("/v1/markets?event=bf:e1")).json()["count"] == 1
        assert (await c.get("/v1/markets/bf:1.1/history?from=0")).status_code == 200
        r = await c.get("/v1/markets/bf:1.1/history?sport=soccer")  # the longer template wins
        assert r.status_code == 400 and "from, resolution, selection, to" in r.json()["message"]
        r = await c.get("/v1/markets/bf:1.1?view=best")
        assert r.status_code == 400 and "takes no parameters" in r.json()["message"]
        assert (await c.head("/v1/sports?x=1")).status_code == 400
        assert (await c.get("/v1/nothing?x=1")).status_code == 404  # not a documented path: the router's answer
        assert (await c.get("/?sport=soccer")).status_code == 200  # the board's own query is not the API's
        r = await c.get("/v1/stream?evnt=bf:e1")  # the stream is refused before it starts
        assert r.status_code == 400 and "unknown query parameter 'evnt'" in r.json()["message"]
        async with c.stream("GET", "/v1/stream?event=bf:e1&heartbeat_ms=1000&conflate_ms=0") as s:
            snap = await SSEReader(s).until(lambda e: e.event == "snapshot")
            assert [m["market_id"] for m in snap.data["markets"]] == ["bf:1.1"]
        ws_base = base.replace("http://", "ws://")
        async with connect(ws_base + "/v1/ws?heartbeat=1000") as ws:  # heartbeat_ms misspelt
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and err["code"] == "bad_request" and "'heartbeat'" in err["message"]
        async with connect(ws_base + "/v1/ws?heartbeat_ms=1000") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"event": ["bf:e1"]}}))
            assert json.loads(await ws.recv())["type"] == "ack"


async def test_credentials_are_checked_before_the_query(redis_url: str) -> None:
    settings = Settings(heartbeat_ms=60_000, api_keys=("k1",))
    async with serve(make_app(redis_url, settings=settings)) as base, \
            httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (await c.get("/v1/markets?evnt=1")).status_code == 401
        assert (await c.get("/v1/markets?evnt=1&api_key=k1")).status_code == 400
        assert (await c.get("/v1/markets?access_token=k1")).status_code == 200


def test_the_check_takes_exactly_what_the_openapi_document_lists() -> None:
    doc = openapi_document(auth=True)
    check = query_check()
    for path, ops in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        concrete = path.replace("{market_id}", "bf:1.2").replace("{event_id}", "ev:bf:e1")
        for method, op in ops.items():
            documented = {p["name"] for p in op.get("parameters", ()) if p["in"] == "query"}
            assert check.allowed(method.upper(), concrete) == frozenset(documented) | CREDENTIAL_PARAMS, \
                (method, path)
