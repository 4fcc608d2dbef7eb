"""REST endpoints: markets, events, sports, sources, health, readiness.

Everything but ``/v1/sources`` is served from node state (no Redis round
trip per request). Markets carry ``age_ms`` and ``stale`` (see
:mod:`streaming.state`); times are integer ms since the Unix epoch (UTC).

Responses of the data endpoints set ``X-Data-Age-Ms`` (the market's age, or
for a list the largest age among the listed markets, 0 when empty) and an
``ETag`` (a hash of the epoch and every listed market's id, seq, stored time
and stale flag); a matching ``If-None-Match`` gets ``304``. Invalid query values get
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
        200 {"event":<event>,"markets":[<market>…],"state":<state>|null,"states":[<state>…],"as_of":ms}
        | 404 {"error":"unknown_event",…}
        <state> = the EventState JSON of feed.models (score, clock, period, status) plus "age_ms" and
        "stale" (streaming.event_states); "state" is the member event's state to show (not stale first,
        then the newest), turned round to the canonical event's home/away; "states" holds every member's
        own, each with "reversed" (its sides are the other way round), and the race states of its
        markets (Betfair racing: event_id bf:<race id>, with "race": progress; a race's canonical
        event — the linker keys racing events by meeting and start time — shows its race's state
        as "state" when no member event has one). A race id (bf:28587288.1650) is accepted as
        {event_id}: the race's canonical event. The list gives each event its "state" when one of
        its members (or its race) has one.
    GET /v1/sports
        200 {"sports":[{"sport","events":n,"markets":n,"in_play_markets":n}…],"as_of":ms}
    GET /v1/sources
        200 {"sources":[{<SourceHealth fields>,"rejected_by_reason":{reason:n},"markets":n,
                         "stale_markets":n,"age_ms":int}…],"as_of":ms}   (503 when redis fails)
    GET /health   200 {"status":"ok","version":str,"revision":str|null,"started_at":ms,"uptime_s":float,"now":ms}
                  (version: the installed package; revision: ODDSFEED_REVISION, else the git commit of the
                  source checkout, else null — both read once when the app is built, as is started_at)
    GET /ready    200 {"ready":true,"reason":"ok",…} | 503 {"ready":false,"reason":…,…}
                  (not ready: a reader disconnected from Redis, stalled, or behind the log by more
                  than ready_max_lag_ms; "partitions" gives position, lag_ms, errors, last_error)

``<market>`` is the Market JSON of :mod:`feed.models` plus ``age_ms`` and ``stale``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any
import msgspec
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from feed.errors import StoreError
from feed.models import ENCODER, EventState, Market
from streaming.responses import json_error, json_response, node_of
from feed.taxonomy import is_unmapped, key_type, market_key
from streaming.aggregate import event_facts, event_view, market_views
from streaming.event_states import pick, turned
from streaming.state import MARKET_STATUSES, Filter, FilterError, NodeState, market_types, now_ms, parse_bool
from streaming.tenants import ForbiddenError, grant_of

if TYPE_CHECKING:
    from streaming.reader import Node

__all__ = ["json_error", "json_response", "node_of", "routes"]

def _etag(state: NodeState, markets: Sequence[Market], stale: Sequence[bool], extra: str = "") -> str:
    """The ETag of a response listing ``markets``: the epoch, ``extra``, and per market its id,
    seq, when it was stored and its stale flag. (The stored time too: a store that went back
    under the same epoch — an older snapshot restored — and an ingest going on from there writes
    the same seqs with other prices; by seq alone a revalidating client kept the old price.)"""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{state.epoch}|{extra}".encode())
    for m, s in zip(markets, stale):
        h.update(b"%s:%d:%d:%d;" % (m.market_id.encode(), m.seq, m.stored_at, s))
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
                         market=q.get("market"), in_play=q.get("in_play"), market_type=q.get("market_type"),
                         source=q.get("source"), bookmaker=q.get("bookmaker"))
        statuses = _status_set(q.get("status"))
        f = grant_of(request).restrict(f)
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    except ForbiddenError as exc:
        return json_error(403, "forbidden", str(exc))
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
    if m is None or not grant_of(request).visible(m):  # a market a tenant may not see is not there for it
        return json_error(404, "unknown_market", f"no market {market_id!r} on this feed")
    return _markets_response(request, state, [m], (b"", b""))


def _event_of(state: NodeState, canonical_id: str, markets: list[Market]) -> dict[str, object] | None:
    """The summary of one canonical event from its markets (every book's)."""
    if not markets:
        return None
    members = sorted({m.event_id for m in markets if m.event_id is not None})
    return {
        "event_id": canonical_id,
        **event_facts(state, canonical_id, markets),
        "markets": len(markets),
        "members": members,
        "bookmakers": sorted({m.bookmaker or m.source for m in markets}),
    }


def _etag_headers(request: Request, state: NodeState, markets: list[Market], extra: str) -> tuple[dict[str, str], bool]:
    now = now_ms()
    ages = [state.age_stale(m, now) for m in markets]
    etag = _etag(state, markets, [s for _, s in ages], f"{extra}|{state.links_version}")
    headers = {"ETag": etag, "X-Data-Age-Ms": str(max((a for a, _ in ages), default=0)),
               "Cache-Control": "no-cache"}
    return headers, _not_modified(request, etag)


def _types(value: str | None) -> set[str] | None:
    """``market_type=`` of the events endpoints (see :func:`streaming.state.market_types`)."""
    types = market_types(value)
    return set(types) if types is not None else None


def _view_param(value: str | None) -> str | None:
    if value in (None, "", "summary", "best"):
        return value or None
    raise FilterError(f"view must be summary or best, not {value!r}")


def _event_states(node: Node, markets: Iterable[Market], now: int,
                  sources: frozenset[str] | None = None) -> tuple[bytes, list[bytes], str]:
    """The event states of a canonical event's member events (one per
    provider event of ``markets``) and of its races (Betfair racing: one per
    race with a state, ``bf:<race id>``): (the state to show — a member
    event's, else its race's — turned round to the canonical event's sides,
    as JSON or ``b"null"``; every member's and race's own state as JSON with
    ``"reversed"``; an ETag part naming their versions and staleness). ``sources``: the
    tenant's allowed sources (None: all) — a state of another source is left out, as streams do."""
    st = node.state
    held = node.event_states
    members: list[tuple[EventState, bool, bool]] = []
    races: list[tuple[EventState, bool, bool]] = []
    seen: set[str] = set()
    for m in markets:
        eid = m.event_id
        if eid is None:
            continue
        for i, sid in enumerate(st.state_events(m)):  # the event's state, then its race's (racing)
            if sid in seen:
                continue
            seen.add(sid)
            es = held.get(sid)
            if es is not None and (sources is None or es.source in sources):  # (a tenant's sources: as streams)
                (races if i else members).append((es, held.age_stale(es, st, now)[1], st.reversed_of(m)))
    if not members and not races:
        return b"null", [], ""
    # a race's canonical event (the linker keys racing events by meeting and start) shows its race's
    # state when no member event has one of its own
    shown_from = members or races
    chosen = pick((es, stale) for es, stale, _ in shown_from)
    rev = next(r for es, _, r in shown_from if es is chosen)
    assert chosen is not None
    shown = held.json(turned(chosen) if rev else chosen, st, now)
    everyone = members + races
    own = [held.json(es, st, now)[:-1] + (b',"reversed":true}' if r else b',"reversed":false}')
           for es, _, r in sorted(everyone, key=lambda x: x[0].event_id)]
    tag = ";".join(f"{es.event_id}:{es.version}:{es.received_at}:{int(stale)}" for es, stale, _ in everyone)
    return shown, own, tag


async def list_events(request: Request) -> Response:
    """``GET /v1/events?sport=&competition=&in_play=&market_type=&source=&bookmaker=&view=``:
    canonical events (one real-world event, every book — or only the books
    of the given sources / bookmakers); ``view=best`` adds each event's
    aggregated markets (best / fair price per outcome over those books, see
    :mod:`streaming.aggregate`), limited to ``market_type`` when given."""
    q = request.query_params
    try:
        f = Filter.parse(sport=q.get("sport"), competition=q.get("competition"), source=q.get("source"),
                         bookmaker=q.get("bookmaker"))  # source / bookmaker: the books taken into account
        in_play = parse_bool("in_play", q.get("in_play"))
        types = _types(q.get("market_type"))
        view = _view_param(q.get("view"))
        grant = grant_of(request)
        f = grant.restrict(f)
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    except ForbiddenError as exc:
        return json_error(403, "forbidden", str(exc))
    node = node_of(request)
    state = node.state
    now = now_ms()
    events = []
    included: list[Market] = []
    tags: list[str] = []
    for cid in sorted(state.by_canonical):
        ms = sorted((m for mid in state.by_canonical[cid] if (m := state.markets.get(mid)) is not None
                     and f.match_market(m, cid)), key=lambda m: m.market_id)
        ev = _event_of(state, cid, ms)
        if ev is None or (in_play is not None and ev["in_play"] != in_play):
            continue
        if view == "best":
            ev["view"] = market_views(state, ms, now, method=node.settings.fair_method, keys=types)
        shown, _, tag = _event_states(node, ms, now, grant.sources)
        if tag:
            ev["state"] = msgspec.Raw(shown)
            tags.append(tag)
        events.append(ev)
        included.extend(ms)
    headers, not_modified = _etag_headers(request, state, included,
                                          f"events|{view}|{sorted(types or ())}|{sorted(f.source or ())}|{sorted(f.bookmaker or ())}"
                                          f"|{'|'.join(tags)}")
    if not_modified:
        return Response(status_code=304, headers=headers)
    return json_response({"events": events, "count": len(events), "as_of": now}, headers=headers)


async def get_event(request: Request) -> Response:
    """``GET /v1/events/{event_id}?market_type=&view=``: one canonical event
    (``ev:…``, or a provider event id: its canonical event) with every
    book's markets (``markets``, omitted with ``view=best``) and the
    aggregated view (``view``: per canonical market and outcome every book's
    price with its age, best, best lay and fair price)."""
    event_id = request.path_params["event_id"]
    q = request.query_params
    try:
        types = _types(q.get("market_type"))
        view = _view_param(q.get("view"))
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    node = node_of(request)
    state = node.state
    grant = grant_of(request)
    visible = grant.visible if grant.restricted else None
    cid = event_id
    unknown = f"no event {event_id!r} on this feed (give a canonical id ev:… or a provider event id)"
    if event_id not in state.by_canonical:
        # a market of the provider event the tenant may see (an aggregator's event has several books)
        m0 = next((m for mid in state.state_markets(event_id) if (m := state.markets.get(mid)) is not None
                   and (visible is None or visible(m))), None)
        if m0 is None:
            return json_error(404, "unknown_event", unknown)
        cid = state.canonical_of(m0) or event_id
    now = now_ms()
    agg = event_view(state, cid, now, method=node.settings.fair_method, keys=types, visible=visible)
    ms = sorted((m for mid in state.by_canonical.get(cid, ()) if (m := state.markets.get(mid)) is not None
                 and (visible is None or visible(m))), key=lambda m: m.market_id)
    shown, own, tag = _event_states(node, ms, now, grant.sources)
    if types is not None:
        ms = [m for m in ms if (k := market_key(m.market_type, m.specifiers, m.sport)) in types or key_type(k) in types]
    if agg is None:  # the same answer as an id never seen: a hidden event does not exist for the tenant
        return json_error(404, "unknown_event", unknown)
    headers, not_modified = _etag_headers(request, state, ms, f"event|{cid}|{view}|{sorted(types or ())}|{tag}")
    if not_modified:
        return Response(status_code=304, headers=headers)
    head = ENCODER.encode({"event_id": agg.event_id, "event_name": agg.name, "sport": agg.sport,
                           "competition": agg.competition, "start_time": agg.start_time, "in_play": agg.in_play,
                           "home": agg.home, "away": agg.away, "members": agg.members,
                           "bookmakers": agg.bookmakers})
    fair = node.settings.fair_method.encode()
    body = b'{"event":' + head + b',"view":' + ENCODER.encode(agg.markets) + b',"fair_method":"' + fair + b'"'
    if view != "best":
        body += b',"markets":[' + b",".join(state.market_json(m, now) for m in ms) + b"]"
    body += b',"state":' + shown + b',"states":[' + b",".join(own) + b"]"
    body += b',"as_of":%d}' % now
    return json_response(body, headers=headers)


async def list_sports(request: Request) -> Response:
    state = node_of(request).state
    grant = grant_of(request)
    out = []
    included: list[Market] = []
    for sport in sorted(state.by_sport):
        ms = sorted((m for mid in state.by_sport[sport] if (m := state.markets.get(mid)) is not None
                     and grant.visible(m)), key=lambda m: m.market_id)
        if not ms:
            continue
        out.append({"sport": sport, "events": len({c for m in ms if (c := state.canonical_of(m)) is not None}),
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
    grant = grant_of(request)
    now = now_ms()
    out = []
    for h in sources:
        if grant.sources is not None and h.source not in grant.sources:
            continue
        h = state.effective(h, now)
        d = msgspec.structs.asdict(h)
        ids: Collection[str] = state.by_source.get(h.source, ())
        if grant.restricted:  # counts over what the tenant may see
            ids = [mid for mid in ids if (m := state.markets.get(mid)) is not None and grant.visible(m)]
        d["rejected_by_reason"] = rejected.get(h.source, {})
        d["markets"] = len(ids)
        d["stale_markets"] = sum(1 for mid in ids if (m := state.markets.get(mid)) is not None
                                 and state.age_stale(m, now)[1])
        # markets whose type the taxonomy does not know: passed through as raw:<type>, counted here
        unmapped: dict[str, int] = {}
        for mid in ids:
            m = state.markets.get(mid)
            if m is not None and is_unmapped(m.market_type):
                key = m.market_type or "raw:unknown"
                unmapped[key] = unmapped.get(key, 0) + 1
        d["unmapped_markets"] = sum(unmapped.values())
        d["unmapped_types"] = dict(sorted(unmapped.items(), key=lambda kv: (-kv[1], kv[0]))[:50])
        d["age_ms"] = max(0, now - h.last_message_at) if h.last_message_at else None
        out.append(d)
    return json_response({"sources": out, "as_of": now}, headers={"Cache-Control": "no-store"})


def health_endpoint() -> Callable[[Request], Awaitable[Response]]:
    """``GET /health`` of one app: the version and revision (:mod:`feed.buildinfo`) are read
    and ``started_at`` taken now, once — never per request; ``uptime_s`` is measured on the
    monotonic clock (seconds, ms precision)."""
    from feed import buildinfo

    version, revision = buildinfo.version(), buildinfo.revision()
    started_at, started = now_ms(), time.monotonic()

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "version": version, "revision": revision, "started_at": started_at,
                              "uptime_s": round(time.monotonic() - started, 3), "now": now_ms()},
                             headers={"Cache-Control": "no-store"})
    return health


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
        Route("/health", health_endpoint(), methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]


async def v1_fallback(request: Request) -> Response:
    """What no ``/v1`` route answered: 405 with the methods the path takes (``Allow``), 426 for
    ``/v1/ws`` asked without a WebSocket upgrade, else 404 — each ``{"error","message"}``, as
    every other ``/v1`` answer (before, the board's static files answered them: a plain-text
    404, or a 405 claiming ``Allow: GET, HEAD``)."""
    path = request.url.path
    if path == "/v1/ws":
        resp = json_error(426, "upgrade_required",
                          "/v1/ws is a WebSocket endpoint: connect with a WebSocket client (Upgrade: websocket)")
        resp.headers["upgrade"] = "websocket"
        return resp
    allowed: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and not isinstance(route.endpoint, _V1Fallback) and route.methods \
                and route.path_regex.match(path):
            allowed |= route.methods
    if allowed:
        methods = ", ".join(sorted(allowed))
        resp = json_error(405, "method_not_allowed", f"{request.method} is not allowed on {path[:100]}; use {methods}")
        resp.headers["allow"] = methods
        return resp
    return json_error(404, "not_found", f"no endpoint {path[:100]!r}; the API is listed at /docs and /openapi.json")


class _V1Fallback:
    """:func:`v1_fallback` as an ASGI app: a route of it takes every method (TRACE, CONNECT,
    PROPFIND … too — a function endpoint's route takes only the methods listed)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        response = await v1_fallback(Request(scope, receive))
        await response(scope, receive, send)


def fallback_routes() -> list[BaseRoute]:
    """The ``/v1`` catch-all (:func:`v1_fallback`): after every other route, before the board's files."""
    return [Route("/v1/{rest:path}", _V1Fallback())]
