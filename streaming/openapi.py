"""The OpenAPI 3.1 document of the API (``GET /openapi.json``) and its docs page (``GET /docs``).

:func:`openapi_document` is pure (no I/O, no clock): it builds the document
from the msgspec types that define what is sent and received, with
``msgspec.json.schema_components`` (JSON Schema 2020-12, the dialect of
OpenAPI 3.1), every schema under ``components.schemas``:

- requests: :class:`~streaming.pricecheck.PriceCheckRequest`,
  :class:`~streaming.pricecheck.BatchRequest`; WebSocket client messages
  :data:`streaming.ws.ClientOp` (``subscribe`` / ``unsubscribe`` / ``ping``);
- responses built from Structs: :class:`~streaming.pricecheck.PriceCheckResult`,
  :class:`~streaming.pricecheck.BatchResult`, the aggregated view
  (:class:`~streaming.aggregate.MarketView` …);
- responses and stream messages built by hand (dicts or byte concatenation
  in :mod:`streaming.rest`, :mod:`streaming.encoding`): described by the
  Structs below, which are never used to encode anything — they state the
  shape exactly, and ``tests/test_openapi.py`` validates real answers and
  real stream messages against the document (with unknown keys refused), so
  a change on the wire that the schema does not follow fails there.

Shapes (``<market>`` = :class:`MarketWithAge`: the Market JSON of
:mod:`feed.models` plus ``age_ms`` and ``stale``)::

    GET /v1/markets           200 MarketList {"markets":[<market>…],"count","as_of"}
    GET /v1/markets/{id}      200 MarketWithAge | 404 Error
    GET /v1/events            200 EventList {"events":[EventSummary…],"count","as_of"}
    GET /v1/events/{id}       200 EventDetail {"event":EventHead,"view":[MarketView…],"fair_method",
                                               "markets"?:[<market>…],"as_of"} | 404 Error
    GET /v1/sports            200 SportList   GET /v1/sources   200 SourceList | 503 Error
    POST /v1/price-check      PriceCheckRequest → 200 PriceCheckResult | 408/413/422/503 Error
    POST /v1/price-check/batch BatchRequest → 200 BatchResult | 408/413/422/503 Error
    GET /health 200 Health    GET /ready 200|503 Ready    GET /metrics 200 text/plain (Prometheus)
    GET /v1/stream            text/event-stream: StreamMessage events (described, not a JSON body)
    GET /v1/ws                WebSocket: ClientOp in, StreamMessage | Ack | Pong out
    Error = {"error": code, "message": what to fix}   (every 4xx/5xx JSON answer)

Auth: ``components.securitySchemes`` always declares the credentials of
:mod:`streaming.auth` (``X-API-Key``, ``Authorization: Bearer`` — API key or
HS256 JWT —, ``?api_key=``, ``?access_token=``). With ``auth=True`` (keys or
JWT secrets or a tenants file configured) every ``/v1/*`` operation requires one
of them and documents the 401 and 403 (and the 429s of the tenant limits,
:mod:`streaming.tenants`, on streams and price checks); otherwise they are
declared but not required.
``/openapi.json``, ``/docs``, ``/health``, ``/ready`` and ``/metrics`` are
always public.

:func:`routes` serves the document (encoded once per app) and a Swagger UI
page whose JavaScript and CSS come from this server (the
``openapi-ui-bundles`` package ships Swagger UI 5, which renders OpenAPI 3.1;
no CDN, and Swagger UI's online validator is switched off).
"""

from __future__ import annotations

import html
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from feed.models import Delta, EventState, Market, SourceHealth, SourceState
from streaming.aggregate import MarketView
from streaming.history import MarketHistory, PriceAt
from streaming.pricecheck import MAX_BODY_BYTES, MAX_LEGS, BatchRequest, BatchResult, PriceCheckRequest, PriceCheckResult
from streaming.state import MARKET_STATUSES
from streaming.ws import ClientOp

__all__ = ["DOCS_ASSETS", "StreamMessage", "openapi_document", "routes"]

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{name}"


# -- shapes of hand-built answers (documentation only: never used to encode) -----------------


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer of the HTTP API (4xx, 5xx): a code and what to fix."""

    error: str
    message: str
    retry_after_ms: int | msgspec.UnsetType = msgspec.UNSET
    """``rate_limited`` only: ms until a retry can pass (the ``Retry-After`` header in whole seconds)."""


class MarketWithAge(Market, frozen=True, kw_only=True, gc=False):
    """A market as served: the Market of feed.models plus its age and staleness (see the README's
    "Staleness")."""

    age_ms: int
    stale: bool


class MarketList(msgspec.Struct, kw_only=True):
    """``GET /v1/markets``: the matching markets, sorted by market_id."""

    markets: list[MarketWithAge]
    count: int
    as_of: int


class EventStateWithAge(EventState, frozen=True, kw_only=True, gc=False):
    """An event's state as served: the EventState of feed.models (status, period, clock, score, red
    cards, cricket innings, a horse race's progress keyed by the race ``bf:<meeting>.<HHMM>``;
    ``version`` per event, increasing) plus its age and staleness
    (``streaming.event_states``: stale when its source is DOWN, or when not final and older than the
    in-play / pre-match limit)."""

    age_ms: int
    stale: bool


class EventStateOfMember(EventStateWithAge, frozen=True, kw_only=True, gc=False):
    """One member provider event's own state; ``reversed``: it names the sides the other way round
    from the canonical event (its home is the canonical away)."""

    reversed: bool


class EventSummary(msgspec.Struct, kw_only=True):
    """One canonical event (every book's markets of one real event)."""

    event_id: str
    event_name: str | None
    sport: str | None
    competition: str | None
    start_time: int | None
    in_play: bool
    markets: int
    members: list[str]
    bookmakers: list[str]
    view: list[MarketView] | UnsetType = UNSET
    state: EventStateWithAge | UnsetType = UNSET


class EventList(msgspec.Struct, kw_only=True):
    """``GET /v1/events``; each event has ``view`` (aggregated markets) only with ``view=best``, and
    ``state`` (score, clock, status) when one of its provider events has one."""

    events: list[EventSummary]
    count: int
    as_of: int


class EventMember(msgspec.Struct, kw_only=True):
    """One provider event linked to a canonical event."""

    event_id: str
    source: str
    event_name: str | None
    confidence: float
    method: str
    bookmakers: list[str]


class EventHead(msgspec.Struct, kw_only=True):
    """A canonical event with its linked provider events."""

    event_id: str
    event_name: str | None
    sport: str | None
    competition: str | None
    start_time: int | None
    in_play: bool
    home: str | None
    away: str | None
    members: list[EventMember]
    bookmakers: list[str]


class EventDetail(msgspec.Struct, kw_only=True):
    """``GET /v1/events/{event_id}``: ``markets`` (every book's) is left out with ``view=best``."""

    event: EventHead
    view: list[MarketView]
    fair_method: Literal["multiplicative", "power"]
    markets: list[MarketWithAge] | UnsetType = UNSET
    state: EventStateWithAge | None
    """the state to show (a member's: not stale first, then the newest), turned round to the canonical
    event's home / away; null when no member has one"""
    states: list[EventStateOfMember]
    as_of: int


class SportCount(msgspec.Struct, kw_only=True):
    sport: str
    events: int
    markets: int
    in_play_markets: int


class SportList(msgspec.Struct, kw_only=True):
    """``GET /v1/sports`` (events = canonical events)."""

    sports: list[SportCount]
    as_of: int


class SourceStatus(SourceHealth, kw_only=True):
    """A source's health record (effective now: DOWN ``ingest_gone`` once its lease ran out) with
    counts from this node."""

    rejected_by_reason: dict[str, int]
    markets: int
    stale_markets: int
    unmapped_markets: int
    unmapped_types: dict[str, int]
    age_ms: int | None


class SourceList(msgspec.Struct, kw_only=True):
    """``GET /v1/sources``."""

    sources: list[SourceStatus]
    as_of: int


class Health(msgspec.Struct, kw_only=True):
    """``GET /health``: the process is alive. ``version``: the installed package; ``revision``:
    ``ODDSFEED_REVISION``, else the git commit of the source checkout, else null; ``started_at``
    / ``now``: ms since the epoch; ``uptime_s``: seconds (ms precision)."""

    status: Literal["ok"]
    version: str
    revision: str | None
    started_at: int
    uptime_s: float
    now: int


class PartitionState(msgspec.Struct, kw_only=True):
    partition: int
    position: str
    connected: bool
    behind: bool
    lag_ms: int
    last_entry_at: int | None
    errors: int
    last_error: str | None


class Ready(msgspec.Struct, kw_only=True):
    """``GET /ready``: 200 when every partition reader is connected and caught up, else 503."""

    ready: bool
    reason: str
    epoch: str | None
    markets: int
    connections: int
    partitions: list[PartitionState]


# -- stream messages (SSE event data; WebSocket text frames) ---------------------------------
#
# On a WebSocket every stream message also carries "sub" (first) and "token" (the resume token):
# the optional fields below. SSE sends neither (its resume token is the event's "id:").


class SnapshotMessage(msgspec.Struct, tag_field="type", tag="snapshot", kw_only=True):
    """Every matching market; ``recovered`` after a resume that could not be served from the log."""

    sub: int | UnsetType = UNSET
    markets: list[MarketWithAge]
    as_of: int
    recovered: bool | UnsetType = UNSET
    reason: str | UnsetType = UNSET
    token: str | UnsetType = UNSET


class DeltaMessage(Delta, tag_field="type", tag="delta", frozen=True, kw_only=True, omit_defaults=True):
    """One change of one market (the Delta of feed.models; apply with ``feed.models.apply_delta``):
    ``kind: image`` carries the whole ``market``; ``kind: delta`` the changed ``header``,
    ``traded_volume`` and per changed selection only its changed fields. ``conflated``: stands for
    several deltas and carries every field of each selection it touches."""

    sub: int | UnsetType = UNSET
    market: MarketWithAge | None = None
    conflated: bool | UnsetType = UNSET
    sent_at: int
    age_ms: int
    stale: bool
    token: str | UnsetType = UNSET


class HeartbeatMessage(msgspec.Struct, tag_field="type", tag="heartbeat", kw_only=True):
    """Sent every ``heartbeat_ms`` while nothing else is: everything up to ``as_of`` has been
    sent — except, on a conflated subscription, the changes of the markets in ``held`` (its
    window holds them until it ends): do not take the heartbeat as confirming those."""

    sub: int | UnsetType = UNSET
    as_of: int
    token: str | UnsetType = UNSET
    held: list[str] | UnsetType = UNSET


class StatusMessage(msgspec.Struct, tag_field="type", tag="status", kw_only=True):
    """A source's health changed, or its markets or event states turned stale / fresh.
    ``stale_markets`` / ``stale_events``: every market / event (provider event id) of the
    source whose market / event state is stale now, as the subscription sees them (one not
    listed is fresh). This server always sends ``stale_events``; a server before it did not
    (then leave the event states' flags as they were)."""

    sub: int | UnsetType = UNSET
    source: str
    state: SourceState
    reason: str | None
    stale_markets: list[str]
    turned_stale: list[str]
    turned_fresh: list[str]
    stale_events: list[str] | UnsetType = UNSET
    as_of: int | UnsetType = UNSET
    token: str | UnsetType = UNSET


class ResumedMessage(msgspec.Struct, tag_field="type", tag="resumed", kw_only=True):
    """Answer to a resume token: ``recovered`` true = the missed deltas follow; false = a fresh
    snapshot follows. ``as_of``: when the server queued this message for this resume (ms since
    the epoch) — a send time, as a heartbeat's ``as_of`` is (the replayed deltas that follow may
    carry the ``sent_at`` of when each was first sent: no send time of this stream)."""

    sub: int | UnsetType = UNSET
    recovered: bool
    as_of: int
    token: str | UnsetType = UNSET


class RemovedMessage(msgspec.Struct, tag_field="type", tag="removed", kw_only=True):
    """A market left what this subscription sees (``reason: not_visible``): a change moved it
    out of the filter, a relink out of the canonical event filtered on, or it left what the
    credential's tenant may see (:mod:`streaming.tenants`). Drop it from the book; nothing of
    its new state is sent."""

    sub: int | UnsetType = UNSET
    market_id: str
    reason: Literal["not_visible"]
    token: str | UnsetType = UNSET


class EventStateMessage(msgspec.Struct, tag_field="type", tag="event_state", kw_only=True):
    """An event's state (score, clock, period, status) changed — or, after a ``snapshot`` or a
    ``resumed {recovered: true}``, the current state of each event among the subscription's markets.
    Keyed by the provider event id its markets carry in ``event_id``; sent to a subscription whose
    filter matches at least one of that event's markets. Whole and versioned: keep the highest
    ``version`` (a fresh ``snapshot`` starts over: the states that follow it are the current ones).
    Never carries a resume token (SSE: no ``id:``): resending a state is harmless."""

    sub: int | UnsetType = UNSET
    event_state: EventStateWithAge
    sent_at: int


class ErrorMessage(msgspec.Struct, tag_field="type", tag="error", kw_only=True):
    """An error on a stream (``slow_consumer``, ``bad_request`` …); ``id`` names the WebSocket
    client message it answers."""

    sub: int | UnsetType = UNSET
    code: str
    message: str
    id: int | str | UnsetType = UNSET


class AckMessage(msgspec.Struct, tag_field="type", tag="ack", kw_only=True):
    """WebSocket: a subscribe (``sub`` = the new subscription's id) or unsubscribe was done."""

    id: int | str | None
    sub: int | UnsetType = UNSET


class PongMessage(msgspec.Struct, tag_field="type", tag="pong", kw_only=True):
    """WebSocket: the answer to ``{"op":"ping"}``."""

    id: int | str | None


StreamMessage = (SnapshotMessage | DeltaMessage | HeartbeatMessage | StatusMessage | ResumedMessage | RemovedMessage
                 | EventStateMessage | ErrorMessage)
ServerMessage = StreamMessage | AckMessage | PongMessage


# -- the document ----------------------------------------------------------------------------

_COMPONENT_TYPES: tuple[Any, ...] = (
    ErrorBody, MarketList, MarketWithAge, EventList, EventDetail, SportList, SourceList, Health, Ready,
    PriceCheckRequest, BatchRequest, PriceCheckResult, BatchResult, MarketHistory, PriceAt,
    StreamMessage, ServerMessage, ClientOp,
)
_UNION_NAMES = {"StreamMessage": StreamMessage, "ServerMessage": ServerMessage, "ClientOp": ClientOp}

_SECURITY_SCHEMES = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                     "description": "an API key of ODDSFEED_API_KEYS"},
    "Bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "API key or HS256 JWT",
               "description": "`Authorization: Bearer <API key or JWT>`; a JWT must be HS256, carry `exp` "
                              "(and `aud` / `iss` when configured), 30 s leeway"},
    "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": "api_key",
                    "description": "the API key in the query (for EventSource, which cannot set headers)"},
    "AccessTokenQuery": {"type": "apiKey", "in": "query", "name": "access_token",
                         "description": "a JWT in the query (for EventSource)"},
}
_SECURITY: list[dict[str, list[str]]] = [{name: []} for name in _SECURITY_SCHEMES]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _json(name_or_schema: str | dict[str, Any], description: str,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    schema = _ref(name_or_schema) if isinstance(name_or_schema, str) else name_or_schema
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorBody", description + ' — `{"error": code, "message": what to fix}`')


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


_LIST = " (comma-separated list)"
_BOOL = {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]}
_P_SPORT = _q("sport", "sports" + _LIST)
_P_COMPETITION = _q("competition", "competitions" + _LIST)
_P_EVENT = _q("event", "provider event ids or canonical ids `ev:…` (every book's markets of that event)" + _LIST)
_P_MARKET = _q("market", "market ids" + _LIST)
_P_MARKET_TYPE = _q("market_type", "canonical market types (`total`) or market keys (`total:line=2.5`)" + _LIST)
_P_IN_PLAY = _q("in_play", "only in-play (true) or pre-match (false) markets", _BOOL)
_P_SOURCE = _q("source", "ingest source names, as in /v1/sources" + _LIST)
_P_BOOKMAKER = _q("bookmaker", "bookmakers (a market's `bookmaker`; one without never matches)" + _LIST)
_P_STATUS = _q("status", "market statuses" + _LIST + ", case-insensitive",
               {"type": "string", "examples": [",".join(MARKET_STATUSES[:2])]})
_P_VIEW_EVENTS = _q("view", "`best`: add the aggregated markets (best / fair price per outcome)",
                    {"type": "string", "enum": ["summary", "best"]})
_P_IF_NONE_MATCH = {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
                    "description": "an ETag of an earlier answer: 304 while nothing listed changed"}
_P_HEARTBEAT = _q("heartbeat_ms", "heartbeat interval, ms (default ODDSFEED_HEARTBEAT_MS)",
                  {"type": "integer", "minimum": 100, "maximum": 300000})
_P_ODDS_FORMAT = _q("odds_format", "price format of the messages: every selection price of the delta stream; "
                                    "with `view=best` each outcome's `best.price`, `best_lay.price` and `fair`",
                    {"type": "string", "enum": ["decimal", "fractional", "american"], "default": "decimal"})
_P_CONFLATE = _q("conflate_ms", "0 (every change, default) or 10–120000: the latest state per market within "
                                "the window, merged into one delta flagged `conflated`", {"type": "integer"})

_DATA_HEADERS = {
    "ETag": {"description": "hash of the epoch and every listed market's id, seq and stale flag",
             "schema": {"type": "string"}},
    "X-Data-Age-Ms": {"description": "the (largest) age of the listed markets, ms; 0 when none",
                      "schema": {"type": "integer"}},
}
_304 = {"description": "Not Modified (the `If-None-Match` ETag still matches)", "headers": _DATA_HEADERS}
_400 = _error("Bad Request: a query value is invalid (`bad_request`)")


def _get(summary: str, description: str, responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None,
         tags: list[str] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "description": description, "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if tags:
        op["tags"] = tags
    return op


def _stream_description() -> str:
    names = ", ".join(f"`{n}` (`{n.title().replace('_', '')}Message`)"
                      for n in ("snapshot", "delta", "status", "heartbeat", "resumed", "removed", "event_state",
                                "error"))
    return (
        "Server-Sent Events (`Cache-Control: no-store`, `X-Accel-Buffering: no`). First `retry: 2000`, then a "
        "`snapshot` (or, when resuming, `resumed` and the missed `delta` events or a fresh snapshot) and the "
        "`event_state` of each event among its markets, then `delta` / `event_state` / `status` / `heartbeat` "
        "events as they happen. Each event's name is its `type`, its `data:` "
        f"one JSON object: {names} — all in the union `StreamMessage` (`view=best` sends `best` events "
        "instead of deltas, see the README). `id:` is the opaque resume token (never on `event_state`): reconnect with "
        "`Last-Event-ID` or `?last_event_id=`. A slow consumer that cannot be helped gets an `error` event "
        "with code `slow_consumer` and the stream ends.")


def _ws_description() -> str:
    return (
        "WebSocket (`Upgrade: websocket`), JSON text frames, many subscriptions per connection. Client → "
        "server: one `ClientOp` per frame (`subscribe`, `unsubscribe`, `ping`; at most 64 KiB, unknown fields "
        "refused). Server → client: `ServerMessage` — `ack` / `pong` answering a client message (by `id`), "
        "and every `StreamMessage` of the subscription with `sub` (its id) and `token` (its resume token; "
        "`event_state` has none). "
        "A bad client message gets `error {code: bad_request}` and the connection stays open. Close codes: "
        "1001 shutting down, 1008 policy (origin, credential), 1009 message too big, 1011 ping timeout or "
        "internal error, 4008 slow consumer. A missing or bad credential refuses the handshake with HTTP 401 (a "
        "tenant's scope: 403), with the `{error, message}` body as every /v1 refusal.")


def _paths(auth: bool) -> dict[str, dict[str, Any]]:
    data = {"200": None, "304": _304}
    markets_ok = _json("MarketList", "the matching markets, sorted by market_id", _DATA_HEADERS)
    paths: dict[str, dict[str, Any]] = {
        "/v1/markets": {"get": _get(
            "List markets", "Every market matching the filters, with `age_ms` and `stale`.",
            {**data, "200": markets_ok, "400": _400},
            [_P_SPORT, _P_COMPETITION, _P_EVENT, _P_MARKET, _P_MARKET_TYPE, _P_IN_PLAY, _P_SOURCE, _P_BOOKMAKER,
             _P_STATUS, _P_IF_NONE_MATCH],
            ["markets"])},
        "/v1/markets/{market_id}": {"get": _get(
            "One market", "One book's market with `age_ms` and `stale`.",
            {**data, "200": _json("MarketWithAge", "the market", _DATA_HEADERS),
             "404": _error("Not Found: no such market (`unknown_market`)")},
            [_path("market_id", "a market id, e.g. `bf:1.206064380` (may contain `/`)"), _P_IF_NONE_MATCH],
            ["markets"])},
        "/v1/markets/{market_id}/history": {"get": _get(
            "Price history of a market", "Each selection's top of book (best back / lay with sizes, last "
            "traded, price) over time: the last change per `resolution` bucket from `from` to `to`, and its "
            "top at `from` (`start`). Kept for ODDSFEED_HISTORY_RETENTION_MS (times: ms since the Unix epoch).",
            {"200": _json("MarketHistory", "the history"),
             "400": _400,
             "404": _error("Not Found: neither a served market nor one with history (`unknown_market`)"),
             "503": _error("Service Unavailable: the history cannot be read now (`store_unavailable`)")},
            [_path("market_id", "a market id"), _q("selection", "selection ids" + _LIST),
             _q("from", "start, ms since the Unix epoch (default: an hour before `to`)", {"type": "integer"}),
             _q("to", "end, ms since the Unix epoch (default: now)", {"type": "integer"}),
             _q("resolution", "bucket width, ms (default: (to − from) / 240)", {"type": "integer"})],
            ["history"])},
        "/v1/price-at": {"get": _get(
            "The price at a time", "A selection's `side` as it stood at `ts` (the last change at or before "
            "it) — for disputes: what was the price when the bet was placed.",
            {"200": _json("PriceAt", "the price and the change it comes from"),
             "400": _400,
             "404": _error("Not Found: no change of that selection at or before `ts` is retained (`no_price`)"),
             "503": _error("Service Unavailable: the history cannot be read now (`store_unavailable`)")},
            [{**_q("market", "the market id"), "required": True}, {**_q("selection", "the selection id"),
                                                                   "required": True},
             {**_q("side", "which price", {"type": "string", "enum": ["back", "lay", "ltp", "price"]}),
              "required": True},
             {**_q("ts", "the time, ms since the Unix epoch", {"type": "integer"}), "required": True}],
            ["history"])},
        "/v1/events": {"get": _get(
            "List canonical events", "Canonical events (one real event, every book); `view=best` adds each "
            "event's aggregated markets, limited to `market_type` when given.",
            {**data, "200": _json("EventList", "the events, sorted by event_id", _DATA_HEADERS), "400": _400},
            [_P_SPORT, _P_COMPETITION, _P_IN_PLAY, _P_MARKET_TYPE, _P_SOURCE, _P_BOOKMAKER, _P_VIEW_EVENTS,
             _P_IF_NONE_MATCH],
            ["events"])},
        "/v1/events/{event_id}": {"get": _get(
            "One canonical event", "A canonical event (`ev:…`, or a provider event id: its canonical event) "
            "with the aggregated view (best, best lay and fair price per outcome) and every book's markets "
            "(left out with `view=best`).",
            {**data, "200": _json("EventDetail", "the event", _DATA_HEADERS), "400": _400,
             "404": _error("Not Found: no such event (`unknown_event`)")},
            [_path("event_id", "a canonical event id `ev:…` or a provider event id"), _P_MARKET_TYPE,
             _P_VIEW_EVENTS, _P_IF_NONE_MATCH],
            ["events"])},
        "/v1/sports": {"get": _get(
            "Sports", "Per sport: canonical events, markets, in-play markets.",
            {**data, "200": _json("SportList", "the sports", _DATA_HEADERS)}, [_P_IF_NONE_MATCH], ["markets"])},
        "/v1/sources": {"get": _get(
            "Source health", "Per source: state, reason, last message, cursor, counts, ingest lag, rejected "
            "and unmapped markets.",
            {"200": _json("SourceList", "every source"),
             "503": _error("Service Unavailable: Redis cannot be read (`store_unavailable`)")},
            None, ["sources"])},
        "/v1/price-check": {"post": {
            "summary": "Is this price still current?",
            "description": "Checks one price against the node's in-memory state. Give `market_id` + "
                           "`selection_id` (one book) or `event` + `market` + `outcome` (the best book; the "
                           "answer then names it and lists every book in `books`). `price`: decimal odds "
                           "with at most 4 decimal places, compared exactly with the book's own price (more "
                           "places: 422). Reasons, first match wins: UNKNOWN_MARKET, "
                           "UNKNOWN_SELECTION, MARKET_CLOSED, SOURCE_DOWN, STALE, SUSPENDED, VERSION_CHANGED, "
                           "PRICE_CHANGED, OK.",
            "tags": ["price check"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PriceCheckRequest")}}},
            "responses": _price_check_responses("PriceCheckResult", "the answer"),
        }},
        "/v1/price-check/batch": {"post": {
            "summary": "Check every leg of a multiple",
            "description": f"1–{MAX_LEGS} legs (either form), checked against one consistent view; "
                           "`accepted` only when every leg is.",
            "tags": ["price check"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("BatchRequest")}}},
            "responses": _price_check_responses("BatchResult", "the answer per leg"),
        }},
        "/v1/stream": {"get": _get(
            "Server-Sent Events stream", _stream_description(),
            {"200": {"description": "an event stream (`text/event-stream`); each event's data is a "
                                    "`StreamMessage`",
                     "content": {"text/event-stream": {"schema": {
                         "type": "string",
                         "description": "`event: <type>\\n[id: <resume token>\\n]data: <StreamMessage JSON>\\n\\n`"
                     }}}},
             "400": _400,
             "503": _error("Service Unavailable: the server is shutting down (`shutting_down`)")},
            [_P_SPORT, _P_COMPETITION, _P_EVENT, _P_MARKET, _P_MARKET_TYPE, _P_IN_PLAY, _P_SOURCE, _P_BOOKMAKER,
             _q("view", "`deltas` (default) or `best` (best / fair price changes only)",
                {"type": "string", "enum": ["deltas", "best"]}),
             _P_HEARTBEAT, _q("last_event_id", "resume token (the `Last-Event-ID` header wins)"),
             {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
              "description": "resume token (EventSource sends it on reconnect)"},
             _P_CONFLATE, _P_ODDS_FORMAT],
            ["streams"])},
        "/v1/ws": {"get": _get(
            "WebSocket stream", _ws_description(),
            {"101": {"description": "Switching Protocols: the WebSocket is open; client messages are "
                                    "`ClientOp`, server messages `ServerMessage`"},
             "403": {"description": "the handshake was refused (origin not allowed)"}},
            [_P_HEARTBEAT, _P_ODDS_FORMAT], ["streams"])},
        "/health": {"get": _get("Liveness", "The process is alive.", {"200": _json("Health", "alive")},
                                None, ["operations"])},
        "/ready": {"get": _get(
            "Readiness", "200 when every partition reader is connected and caught up, else 503 with the reason.",
            {"200": _json("Ready", "ready"), "503": _json("Ready", "not ready (`ready: false`, `reason`)")},
            None, ["operations"])},
        "/metrics": {"get": _get(
            "Prometheus metrics", "Connections, subscriptions, outbox bytes, conflation, resume outcomes, reader "
            "lag and errors, per-hop latency histograms.",
            {"200": {"description": "Prometheus text exposition format 0.0.4",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            None, ["operations"])},
        "/openapi.json": {"get": _get(
            "This document", "The OpenAPI 3.1 document (public, also when auth is on).",
            {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
            None, ["operations"])},
        "/docs": {"get": _get(
            "API docs page", "Swagger UI for this document, served from this server (public).",
            {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            None, ["operations"])},
    }
    for path, item in paths.items():
        for op in item.values():
            if path.startswith("/v1/"):
                if auth:
                    op["security"] = _SECURITY
                    op["responses"]["401"] = _error("Unauthorized: a missing or bad credential (`unauthorized`)")
                    op["responses"]["403"] = _error(
                        "Forbidden: the credential's tenant may not use this endpoint (its scopes), or may see "
                        "none of the sports / sources / bookmakers asked for (`forbidden`; the message says "
                        "what it may use)")
                    if path in ("/v1/stream", "/v1/ws"):
                        op["responses"]["429"] = _error(
                            "Too Many Requests: the tenant's streams (`too_many_connections`) or subscriptions "
                            "(`too_many_subscriptions`) on this node are at its limit")
                    elif path.startswith("/v1/price-check"):
                        op["responses"]["429"] = {
                            **_error("Too Many Requests: over the tenant's price checks per second (`rate_limited`; "
                                     "the body's `retry_after_ms` says when one can pass; a batch larger than "
                                     "the burst never can: 422 `batch_over_burst`)"),
                            "headers": {"Retry-After": {"description": "seconds until a retry can pass (rounded up)",
                                                        "schema": {"type": "integer", "minimum": 1}}}}
            else:
                op["security"] = []
    return paths


def _price_check_responses(ok: str, description: str) -> dict[str, Any]:
    return {
        "200": _json(ok, description),
        "408": _error("Request Timeout: the body did not arrive within the deadline (`deadline_exceeded`)"),
        "413": _error(f"Payload Too Large: over {MAX_BODY_BYTES} bytes (`payload_too_large`)"),
        "422": _error("Unprocessable Content: the body does not decode or validate (`invalid_request`); the "
                      "message names the field and what to send. With tenants also a batch larger than the "
                      "tenant's price-check burst (`batch_over_burst`: split it)"),
        "503": _error("Service Unavailable: the node has not loaded its state yet (`not_ready`)"),
    }


def _strict_structs(types: tuple[Any, ...]) -> set[str]:
    """Names of the Structs among ``types`` (and inside them) that refuse unknown fields
    (``forbid_unknown_fields``): their schemas get ``additionalProperties: false``, as the
    server answers such a body with 422 / ``bad_request``."""
    out: set[str] = set()
    seen: set[type] = set()

    def walk(t: Any) -> None:
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            if t.forbid_unknown_fields:
                out.add(t.cls.__name__)
            for f in t.fields:
                walk(f.type)
            return
        for attr in ("type", "item_type", "key_type", "value_type"):
            if (inner := getattr(t, attr, None)) is not None and isinstance(inner, msgspec.inspect.Type):
                walk(inner)
        for inner in getattr(t, "types", None) or getattr(t, "item_types", None) or ():
            walk(inner)

    for info in msgspec.inspect.multi_type_info(types):
        walk(info)
    return out


def query_parameters() -> dict[str, dict[str, frozenset[str]]]:
    """Path template → method → the query parameter names the operation
    documents (credentials aside): what :mod:`streaming.queryparams` lets through."""
    return {path: {m: frozenset(p["name"] for p in op.get("parameters", ()) if p["in"] == "query")
                   for m, op in ops.items()}
            for path, ops in _paths(True).items() if path.startswith("/v1/")}


def openapi_document(*, auth: bool = False, version: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-able dict; pure). ``auth``: credentials are configured,
    so ``/v1/*`` operations require one (see the module docstring). ``version``: the API's
    version (default: the installed oddsfeed package's)."""
    if version is None:
        try:
            version = metadata.version("oddsfeed")
        except metadata.PackageNotFoundError:
            version = "0"
    (*_, stream, server, client), schemas = msgspec.json.schema_components(_COMPONENT_TYPES, ref_template=REF)
    for name in _strict_structs(_COMPONENT_TYPES):
        schemas[name]["additionalProperties"] = False
    for name, schema in (("StreamMessage", stream), ("ServerMessage", server), ("ClientOp", client)):
        schemas[name] = {"title": name, **schema}
    schemas["ServerMessage"]["description"] = ("WebSocket server → client: a StreamMessage of a subscription "
                                               "(with `sub` and `token`), an ack or a pong")
    schemas["StreamMessage"]["description"] = "A stream message: the `data` of an SSE event, a WebSocket frame"
    schemas["ClientOp"]["description"] = "WebSocket client → server message, tagged by `op`"
    auth_note = ("Credentials are **required** on every `/v1/*` endpoint of this server" if auth else
                 "This server has no credentials configured: the security schemes below apply when "
                 "`ODDSFEED_API_KEYS` or `ODDSFEED_JWT_SECRETS` are set, and then cover every `/v1/*` endpoint")
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "oddsfeed API",
            "version": version,
            "description": (
                "Live odds: REST snapshots, the bet-placement price check, and snapshot-then-deltas streams over "
                "Server-Sent Events (`/v1/stream`) and WebSocket (`/v1/ws`), whose messages are documented as "
                "`StreamMessage`, `ServerMessage` and `ClientOp` under components.schemas. All times are integer "
                "ms since the Unix epoch (UTC); prices are decimal odds. Every error answer is "
                f'`{{"error": code, "message": what to fix}}`. {auth_note}. `/openapi.json`, `/docs`, `/health`, '
                "`/ready` and `/metrics` are public."),
        },
        "tags": [{"name": n} for n in ("markets", "events", "sources", "price check", "streams", "operations")],
        "paths": _paths(auth),
        "components": {"schemas": dict(sorted(schemas.items())), "securitySchemes": _SECURITY_SCHEMES},
    }


# -- HTTP --------------------------------------------------------------------------------------


def _assets_dir() -> Path | None:
    try:
        from openapi_ui_bundles import swagger_ui
    except ImportError:  # pragma: no cover - a dependency; /docs says what is missing
        return None
    return Path(swagger_ui.static_path)


#: the Swagger UI files /docs loads (served from /docs/assets/<name>), by media type
DOCS_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="{root}/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="{root}/docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{root}/docs/assets/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "{root}/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  validatorUrl: null, presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
  persistAuthorization: true}});
</script>
</body>
</html>
"""


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json`` (built and encoded once per app)."""
    state = request.app.state
    body: bytes | None = getattr(state, "openapi_json", None)
    if body is None:
        settings = getattr(state, "settings", None)
        auth = bool(settings is not None and (settings.api_keys or settings.jwt_secrets or settings.tenants_file))
        body = state.openapi_json = msgspec.json.encode(openapi_document(auth=auth))
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


async def docs_page(request: Request) -> Response:
    """``GET /docs``: Swagger UI for ``/openapi.json``; every file it loads is served here."""
    root = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
    return HTMLResponse(_PAGE.format(title="oddsfeed API", root=root), headers={"Cache-Control": "no-cache"})


async def docs_asset(request: Request) -> Response:
    """``GET /docs/assets/{name}``: one of :data:`DOCS_ASSETS` from the openapi-ui-bundles package."""
    name = request.path_params["name"]
    media = DOCS_ASSETS.get(name)
    folder = _assets_dir()
    if media is None or folder is None or not (folder / name).is_file():
        return Response(msgspec.json.encode({"error": "not_found", "message": f"no docs asset {name!r}"}),
                        status_code=404, media_type="application/json")
    return FileResponse(folder / name, media_type=media, headers={"Cache-Control": "public, max-age=86400"})


def routes() -> list[BaseRoute]:
    """``GET /openapi.json``, ``GET /docs`` and its assets (all public: outside ``/v1/``)."""
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_page, methods=["GET"]),
        Route("/docs/assets/{name}", docs_asset, methods=["GET"]),
    ]

