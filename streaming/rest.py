"""REST endpoints: markets, events, sports, sources, health, readiness.

Everything but ``/v1/sources`` is served from node state (no Redis round
trip per request). Markets carry ``age_ms`` and ``stale`` (see
:mod:`streaming.state`); times are integer ms since the Unix epoch (UTC).

Responses of the data endpoints set ``X-Data-Age-Ms`` (the market's age, or
for a list the largest age among the listed markets, 0 when empty) and an
``ETag`` (a hash of the epoch and every listed market's id, seq and stale
flag); a matching ``If-None-Match`` gets ``304``. Invalid query values get
``400 {"error":"bad_request","message":"<what to fix>"}``.

::

    GET /v1/markets?sport=&competition=&event=&market=&in_play=&status=
        200 {"markets":[<market>…],"count":n,"as_of":ms}        sorted by market_id
    GET /v1/markets/{market_id}
        200 <market>  |  404 {"error":"unknown_market","message":…}
    GET /v1/events?sport=&competition=&in_play=
        200 {"events":[<event>…],"count":n,"as_of":ms}
        <event> = {"event_id","event_name","sport","competition","start_time","in_play","markets":n}
    GET /v1/events/{event_id}
        200 {"event":<event>,"markets":[<market>…],"as_of":ms} | 404 {"error":"unknown_event",…}
    GET /v1/sports
        200 {"sports":[{"sport","events":n,"markets":n,"in_play_markets":n}…],"as_of":ms}
    GET /v1/sources
        200 {"sources":[{<SourceHealth fields>,"rejected_by_reason":{reason:n},"markets":n,
                         "stale_markets":n,"age_ms":int}…],"as_of":ms}   (503 when redis fails)
    GET /health   200 {"status":"ok"}
    GET /ready    200 {"ready":true,"reason":"ok",…} | 503 {"ready":false,"reason":…,…}
                  (not ready: a reader disconnected from Redis, stalled, or behind the log by more
                  than ready_max_lag_ms; "partitions" gives position, lag_ms, errors, last_error)

``<market>`` is the Market JSON of :mod:`feed.models` plus ``age_ms`` and ``stale``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
import msgspec
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from feed.errors import StoreError
from feed.models import ENCODER, Market, effective_health
from streaming.responses import json_error, json_response, node_of
from streaming.state import MARKET_STATUSES, Filter, FilterError, NodeState, now_ms, parse_bool

__all__ = ["json_error", "json_response", "node_of", "routes"]

def _etag(state: NodeState, markets: Sequence[Market], stale: Sequence[bool], extra: str = "") -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{state.epoch}|{extra}".encode())
    for m, s in zip(markets, stale):
        h.update(b"%s:%d:%d;" % (m.market_id.encode(), m.seq, s))
    return f'"{h.hexdigest()}"'


def _not_modified(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == "*" or tag == etag:
            return True
    return False


def _markets_response(request: Request, state: NodeState, markets: list[Market], wrap: tuple[bytes, bytes],
                      extra: str = "") -> Response:
    """Render markets (with age/stale) inside ``wrap`` = (prefix, suffix) bytes."""
    headers, not_modified = _etag_headers(request, state, markets, extra)
    if not_modified:
        return Response(status_code=304, headers=headers)
    now = now_ms()
    body = wrap[0] + b",".join(state.market_json(m, now) for m in markets) + wrap[1]
    return json_response(body, headers=headers)


def _status_set(value: str | None) -> frozenset[str] | None:
    if not value:
        return None
    items = frozenset(x.strip().upper() for x in value.split(",") if x.strip())
    bad = sorted(items - set(MARKET_STATUSES))
    if bad:
        raise FilterError(f"status must be one or more of {', '.join(MARKET_STATUSES)} (comma-separated), "
                          f"not {', '.join(bad)}")
    return items or None


async def list_markets(request: Request) -> Response:
    q = request.query_params
    try:
        f = Filter.parse(sport=q.get("sport"), competition=q.get("competition"), event=q.get("event"),
                         market=q.get("market"), in_play=q.get("in_play"))
        statuses = _status_set(q.get("status"))
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    state = node_of(request).state
    markets = [m for m in state.matching(f) if statuses is None or m.status in statuses]
    markets.sort(key=lambda m: m.market_id)
    now = now_ms()
    return _markets_response(request, state, markets,
                             (b'{"markets":[', b'],"count":%d,"as_of":%d}' % (len(markets), now)))


async def get_market(request: Request) -> Response:
    market_id = request.path_params["market_id"]
    state = node_of(request).state
    m = state.markets.get(market_id)
    if m is None:
        return json_error(404, "unknown_market", f"no market {market_id!r} on this feed")
    return _markets_response(request, state, [m], (b"", b""))


def _event_of(markets: Iterable[Market]) -> dict[str, object] | None:
    ms = list(markets)
    if not ms:
        return None
    first = min(ms, key=lambda m: m.market_id)
    return {
        "event_id": first.event_id,
        "event_name": next((m.event_name for m in ms if m.event_name), None),
        "sport": first.sport,
        "competition": next((m.competition for m in ms if m.competition), None),
        "start_time": min((m.start_time for m in ms if m.start_time is not None), default=None),
        "in_play": any(m.in_play for m in ms),
        "markets": len(ms),
    }


def _etag_headers(request: Request, state: NodeState, markets: list[Market], extra: str) -> tuple[dict[str, str], bool]:
    now = now_ms()
    ages = [state.age_stale(m, now) for m in markets]
    etag = _etag(state, markets, [s for _, s in ages], extra)
    headers = {"ETag": etag, "X-Data-Age-Ms": str(max((a for a, _ in ages), default=0)),
               "Cache-Control": "no-cache"}
    return headers, _not_modified(request, etag)


async def list_events(request: Request) -> Response:
    q = request.query_params
    try:
        f = Filter.parse(sport=q.get("sport"), competition=q.get("competition"))
        in_play = parse_bool("in_play", q.get("in_play"))
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    state = node_of(request).state
    events = []
    included: list[Market] = []
    for event_id in sorted(state.by_event):
        ms = [m for mid in state.by_event[event_id] if (m := state.markets.get(mid)) is not None]
        ms = [m for m in ms if f.match_market(m)]
        ev = _event_of(ms)
        if ev is None or (in_play is not None and ev["in_play"] != in_play):
            continue
        events.append(ev)
        included.extend(sorted(ms, key=lambda m: m.market_id))
    headers, not_modified = _etag_headers(request, state, included, "events")
    if not_modified:
        return Response(status_code=304, headers=headers)
    return json_response({"events": events, "count": len(events), "as_of": now_ms()}, headers=headers)


async def get_event(request: Request) -> Response:
    event_id = request.path_params["event_id"]
    state = node_of(request).state
    ms = sorted((m for mid in state.by_event.get(event_id, ()) if (m := state.markets.get(mid)) is not None),
                key=lambda m: m.market_id)
    ev = _event_of(ms)
    if ev is None:
        return json_error(404, "unknown_event", f"no event {event_id!r} on this feed")
    now = now_ms()
    return _markets_response(request, state, ms,
                             (b'{"event":' + ENCODER.encode(ev) + b',"markets":[', b'],"as_of":%d}' % now),
                             extra="event")


async def list_sports(request: Request) -> Response:
    state = node_of(request).state
    out = []
    included: list[Market] = []
    for sport in sorted(state.by_sport):
        ms = sorted((m for mid in state.by_sport[sport] if (m := state.markets.get(mid)) is not None),
                    key=lambda m: m.market_id)
        out.append({"sport": sport, "events": len({m.event_id for m in ms if m.event_id is not None}),
                    "markets": len(ms), "in_play_markets": sum(1 for m in ms if m.in_play)})
        included.extend(ms)
    headers, not_modified = _etag_headers(request, state, included, "sports")
    if not_modified:
        return Response(status_code=304, headers=headers)
    return json_response({"sports": out, "as_of": now_ms()}, headers=headers)


async def list_sources(request: Request) -> Response:
    node = node_of(request)
    try:
        sources = await node.store.sources()
        rejected = await node.store.quarantine_counts()
    except (RedisError, OSError, StoreError) as exc:
        return json_error(503, "store_unavailable", f"cannot read source health from redis: {exc}")
    state = node.state
    now = now_ms()
    out = []
    for h in sources:
        h = effective_health(h, now)
        d = msgspec.structs.asdict(h)
        ids = state.by_source.get(h.source, ())
        d["rejected_by_reason"] = rejected.get(h.source, {})
        d["markets"] = len(ids)
        d["stale_markets"] = sum(1 for mid in ids if (m := state.markets.get(mid)) is not None
                                 and state.age_stale(m, now)[1])
        d["age_ms"] = max(0, now - h.last_message_at) if h.last_message_at else None
        out.append(d)
    return json_response({"sources": out, "as_of": now}, headers={"Cache-Control": "no-store"})


async def health(request: Request) -> Response:
    return json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def ready(request: Request) -> Response:
    node = node_of(request)
    ok, reason = node.readiness()
    body = {
        "ready": ok,
        "reason": reason,
        "epoch": node.state.epoch,
        "markets": len(node.state.markets),
        "connections": len(node.hub.connections),
        "partitions": [{"partition": r.partition, "position": node.state.positions[r.partition],
                        "connected": r.connected, "behind": r.behind, "lag_ms": r.lag_ms,
                        "last_entry_at": r.last_entry_at, "errors": r.errors,
                        "last_error": r.last_error} for r in node.readers],
    }
    return json_response(body, 200 if ok else 503, headers={"Cache-Control": "no-store"})


def routes() -> list[BaseRoute]:
    """The routes above; ``POST /v1/price-check`` is :func:`streaming.pricecheck.routes`."""

    return [
        Route("/v1/markets", list_markets, methods=["GET"]),
        Route("/v1/markets/{market_id:path}", get_market, methods=["GET"]),
        Route("/v1/events", list_events, methods=["GET"]),
        Route("/v1/events/{event_id:path}", get_event, methods=["GET"]),
        Route("/v1/sports", list_sports, methods=["GET"]),
        Route("/v1/sources", list_sources, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]
