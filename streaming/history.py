"""Price history endpoints (the history written by :mod:`feed.history`).

Times are integer ms since the Unix epoch (UTC); the time of a change is its
provider time (``source_ts``; a replay's times mapped onto now, as in the
snapshots). Invalid parameters get ``400 {"error":"bad_request","message":
"<what to fix>"}``. Read from Redis on each request (one ``XRANGE`` /
``XREVRANGE`` per 2,000 entries, bounded).

::

    GET /v1/markets/{market_id}/history?selection=&from=&to=&resolution=
        200 MarketHistory: the selections' tops (best back/lay price and size, ltp, price)
            over [from, to], one point per resolution-ms bucket (the bucket's last change),
            plus each selection's state at ``from`` (``start``: its last change before it).
            Defaults: to = now, from = to − 1 h, resolution = the span / 240 (≥ 1 ms);
            at most MAX_POINTS buckets; at most MAX_SCAN entries read (``truncated``).
        404 {"error":"unknown_market",…}: the market is neither served nor has history
    GET /v1/price-at?market=&selection=&side=back|lay|ltp|price&ts=
        200 PriceAt: the selection's top at ts — from its last change at or before ts
            (``change``: stream id, provider and received time, seq; ``age_ms`` = ts − its time)
        404 {"error":"no_price",…}: no change of that selection at or before ts in the
            retained history (or none within MAX_SCAN entries before ts)

Answer Structs (for the OpenAPI document): :class:`MarketHistory`,
:class:`SelectionHistory`, :class:`HistoryPoint`, :class:`PriceAt`,
:class:`HistoryChange`.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from feed.errors import StoreError
from feed.history import Top, decode_tops
from feed.models import Market
from feed.settings import Settings
from feed.validate import MAX_TIME_MS
from streaming.responses import json_error, json_response, node_of
from streaming.state import FilterError, now_ms
from streaming.tenants import grant_of

__all__ = ["HistoryChange", "HistoryPoint", "MarketHistory", "PriceAt", "SelectionHistory", "routes"]

#: most buckets per selection in one history answer
MAX_POINTS = 2000
#: most history entries one request reads
MAX_SCAN = 100_000
#: entries read per Redis call
CHUNK = 2000
#: default span of a history request without ``from``, ms
DEFAULT_SPAN_MS = 3_600_000
#: default number of buckets when ``resolution`` is not given
DEFAULT_BUCKETS = 240

Side = Literal["back", "lay", "ltp", "price"]
SIDES: tuple[str, ...] = ("back", "lay", "ltp", "price")


class HistoryPoint(msgspec.Struct, kw_only=True):
    """A selection's top of book after one change. t: start of its bucket
    (ms); at: the change's provider time (ms); seq: the market's seq after it."""

    t: int
    at: int
    seq: int
    back_price: float | None = None
    back_size: float | None = None
    lay_price: float | None = None
    lay_size: float | None = None
    ltp: float | None = None
    price: float | None = None


class SelectionHistory(msgspec.Struct, kw_only=True):
    """One selection's history: ``start`` (its top at ``from``: the last
    change before it, ``t`` = from; None when none is retained or within
    reach) and ``points`` (last change per bucket, oldest first)."""

    selection_id: str
    start: HistoryPoint | None
    points: list[HistoryPoint]


class MarketHistory(msgspec.Struct, kw_only=True):
    """Answer of ``GET /v1/markets/{id}/history``. entries: history entries
    read; truncated: MAX_SCAN was reached before ``to`` (points end early);
    oldest: provider time of the oldest retained entry (None: no history);
    retention_ms: the configured window."""

    market_id: str
    from_: int = msgspec.field(name="from")
    to: int
    resolution: int
    retention_ms: int
    oldest: int | None
    entries: int
    truncated: bool
    selections: list[SelectionHistory]


class HistoryChange(msgspec.Struct, kw_only=True):
    """One recorded change: its history stream id, provider time ``at``,
    ``received_at`` and the market's ``seq`` after it."""

    id: str
    at: int
    received_at: int
    seq: int


class PriceAt(msgspec.Struct, kw_only=True):
    """Answer of ``GET /v1/price-at``: the selection's ``side`` at ``ts`` —
    ``price`` and ``size`` (size None for ltp/price; price None when the side
    was empty) — from ``change``, its last change at or before ``ts``, made
    ``age_ms`` = ts − change.at before ``ts``; ``top``: its whole top then."""

    market_id: str
    selection_id: str
    side: Side
    ts: int
    price: float | None
    size: float | None
    age_ms: int
    change: HistoryChange
    top: HistoryPoint



def _int_param(q: object, name: str, *, default: int | None = None, minimum: int = 0,
               maximum: int = MAX_TIME_MS) -> int | None:
    """An integer query parameter in [minimum, maximum] (times: ms since the Unix epoch, before
    2100, as every provider time); raises FilterError saying what to fix."""
    raw = q.get(name)  # type: ignore[attr-defined]
    if raw is None or raw == "":
        return default
    try:
        if not raw.isascii():
            raise ValueError
        v = int(raw)
    except ValueError:
        raise FilterError(f"{name} must be an integer (ms{' since the Unix epoch, UTC' if name != 'resolution' else ''}), "
                       f"not {raw[:40]!r}") from None
    if v < minimum:
        raise FilterError(f"{name} must be ≥ {minimum}, not {v}")
    if v > maximum:
        what = "ms" if name == "resolution" else "ms since the Unix epoch: before 2100"
        raise FilterError(f"{name} must be ≤ {maximum} ({what}), not {str(v)[:40]}")
    return v


def _point(top: Top, t: int, at: int, seq: int) -> HistoryPoint:
    return HistoryPoint(t=t, at=at, seq=seq, back_price=top.bp, back_size=top.bs, lay_price=top.lp,
                        lay_size=top.ls, ltp=top.ltp, price=top.price)


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _retention(request: Request) -> int:
    settings: Settings | None = getattr(request.app.state, "settings", None)
    return settings.history_retention_ms if settings is not None else 0


def _may_see(request: Request, m: Market | None) -> bool:
    """Whether the request's tenant may see the history of market ``m`` (None: not held by
    this node — then only a credential that sees every market may ask, since what the market
    was cannot be checked)."""
    grant = grant_of(request)
    if not grant.restricted:
        return True
    return m is not None and grant.visible(m)


async def market_history(request: Request) -> Response:
    market_id: str = request.path_params["market_id"]
    q = request.query_params
    selection = q.get("selection") or None
    try:
        to = _int_param(q, "to", default=now_ms())
        assert to is not None
        start = _int_param(q, "from", default=max(0, to - DEFAULT_SPAN_MS))
        assert start is not None
        if start > to:
            raise FilterError(f"from ({start}) must not be after to ({to})")
        span = to - start + 1
        res = _int_param(q, "resolution", default=max(1, -(-span // DEFAULT_BUCKETS)), minimum=1)
        assert res is not None
        buckets = -(-span // res)
        if buckets > MAX_POINTS:
            raise FilterError(f"from..to / resolution gives {buckets} points; at most {MAX_POINTS}: use "
                           f"resolution ≥ {-(-span // MAX_POINTS)} or a shorter from..to")
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    store = node_of(request).store
    held = node_of(request).state.markets.get(market_id)
    known = held is not None
    if not _may_see(request, held):
        return json_error(404, "unknown_market", f"no market {market_id!r} on this feed")
    try:
        oldest_rows = await store.history_range(market_id, "-", "+", count=1)
        if not oldest_rows and not known:
            return json_error(404, "unknown_market", f"no market {market_id!r} on this feed and no price history of it")
        before = await store.history_range(market_id, f"({start}-0", "-", count=CHUNK, reverse=True) if start > 0 else []
        starts: dict[str, HistoryPoint] = {}
        for eid, f in before:  # newest first: the first top seen of a selection is its state at `from`
            for top in decode_tops(f[b"d"]):
                if top.selection_id not in starts and (selection is None or top.selection_id == selection):
                    starts[top.selection_id] = _point(top, start, _ms(eid), int(f[b"q"]))
            if selection is not None and selection in starts:
                break
        points: dict[str, dict[int, HistoryPoint]] = {}
        scanned = 0
        truncated = False
        lo = f"{start}-0"
        while True:
            rows = await store.history_range(market_id, lo, str(to), count=CHUNK)
            for eid, f in rows:
                at = _ms(eid)
                b = start + (at - start) // res * res
                seq = int(f[b"q"])
                for top in decode_tops(f[b"d"]):
                    if selection is None or top.selection_id == selection:
                        points.setdefault(top.selection_id, {})[b] = _point(top, b, at, seq)
            scanned += len(rows)
            if len(rows) < CHUNK:
                break
            if scanned >= MAX_SCAN:
                truncated = True
                break
            lo = f"({rows[-1][0]}"
    except StoreError as exc:
        return json_error(503, "store_unavailable", f"price history unavailable: {exc}")
    ids = sorted(set(points) | set(starts))
    body = MarketHistory(
        market_id=market_id, from_=start, to=to, resolution=res, retention_ms=_retention(request),
        oldest=_ms(oldest_rows[0][0]) if oldest_rows else None, entries=scanned, truncated=truncated,
        selections=[SelectionHistory(selection_id=s, start=starts.get(s),
                                     points=[p for _, p in sorted(points.get(s, {}).items())]) for s in ids])
    return json_response(body, headers={"Cache-Control": "no-store"})


async def price_at(request: Request) -> Response:
    q = request.query_params
    try:
        market_id = q.get("market") or ""
        selection = q.get("selection") or ""
        missing = [n for n, v in (("market", market_id), ("selection", selection), ("ts", q.get("ts"))) if not v]
        if missing:
            raise FilterError(f"missing {', '.join(missing)}: give market=<market id>&selection=<selection id>"
                           f"&side=back|lay|ltp|price&ts=<ms since the Unix epoch, UTC>")
        side = (q.get("side") or "back").lower()
        if side not in SIDES:
            raise FilterError(f"side must be one of {', '.join(SIDES)}, not {side[:20]!r}")
        ts = _int_param(q, "ts")
        assert ts is not None
    except FilterError as exc:
        return json_error(400, "bad_request", str(exc))
    if not _may_see(request, node_of(request).state.markets.get(market_id)):
        return json_error(404, "no_price", f"no price history of market {market_id!r}")
    store = node_of(request).store
    hi = str(ts)
    scanned = 0
    try:
        while scanned < MAX_SCAN:
            rows = await store.history_range(market_id, hi, "-", count=CHUNK, reverse=True)
            for eid, f in rows:
                for top in decode_tops(f[b"d"]):
                    if top.selection_id != selection:
                        continue
                    at = _ms(eid)
                    price, size = {"back": (top.bp, top.bs), "lay": (top.lp, top.ls),
                                   "ltp": (top.ltp, None), "price": (top.price, None)}[side]
                    seq = int(f[b"q"])
                    change = HistoryChange(id=eid, at=at, received_at=int(f[b"r"]), seq=seq)
                    return json_response(PriceAt(market_id=market_id, selection_id=selection,
                                                 side=side,  # type: ignore[arg-type]
                                                 ts=ts, price=price, size=size, age_ms=ts - at, change=change,
                                                 top=_point(top, at, at, seq)),
                                         headers={"Cache-Control": "no-store"})
            scanned += len(rows)
            if len(rows) < CHUNK:
                break
            hi = f"({rows[-1][0]}"
        oldest = await store.history_range(market_id, "-", "+", count=1)
    except StoreError as exc:
        return json_error(503, "store_unavailable", f"price history unavailable: {exc}")
    if not oldest:
        msg = f"no price history of market {market_id!r}"
    elif _ms(oldest[0][0]) > ts:
        msg = (f"no change of selection {selection!r} of market {market_id!r} at or before ts={ts}: "
               f"its history starts at {_ms(oldest[0][0])}")
    else:
        msg = f"no change of selection {selection!r} of market {market_id!r} at or before ts={ts} in its history"
    return json_error(404, "no_price", msg)


def routes() -> list[BaseRoute]:
    """The routes above; they must come before ``/v1/markets/{market_id:path}`` (streaming.rest)."""
    return [
        Route("/v1/markets/{market_id:path}/history", market_history, methods=["GET"]),
        Route("/v1/price-at", price_at, methods=["GET"]),
    ]
