"""Bet-placement price check: ``POST /v1/price-check`` and ``/v1/price-check/batch``.

Answered from the node's current state (:class:`~streaming.state.NodeState`,
kept current by the partition readers): no Redis round trip per request, no
retry loop, nothing to wait for but the request body, which must arrive
within a hard deadline. All legs of a batch are checked against the same
state in one synchronous pass (no await between legs), so a multiple is
judged on one consistent view. Times are integer ms since the Unix epoch.

::

    POST /v1/price-check
      {"market_id": str, "selection_id": str, "side": "back"|"lay", "price": 1.01–1000 (≤ 4 dp),
       "max_age_ms"?: int ≥ 0, "accept_better"?: bool = true, "version"?: int}
      200 <answer>

    POST /v1/price-check   (against the best price across books, no bookmaker)
      {"event": "ev:…", "market": "total:line=2.5", "outcome": "over", "side", "price", "max_age_ms"?,
       "accept_better"?}
      200 <answer> + {"event", "market", "outcome", "bookmaker", "books": [{bookmaker, market_id,
                      selection_id, reason, current_price, age_ms}…]}   (see check_best)

    POST /v1/price-check/batch
      {"legs": [<request>, …]}   (1–50 legs, either form)
      200 {"accepted": bool (every leg accepted), "legs": [<answer>…], "checked_at": ms}

    <answer> = {"accepted", "reason", "message", "market_id", "selection_id", "side",
                "requested_price", "current_price", "price_field", "available_size",
                "age_ms", "max_age_ms", "market_status", "selection_status", "in_play",
                "version", "seq", "source", "source_state", "checked_at"}

    422 {"error":"invalid_request","message":"<what to fix>"}     bad body
    413 {"error":"payload_too_large",…}   408 {"error":"deadline_exceeded",…}
    503 {"error":"not_ready",…}           (the node has not loaded its state yet)
    429 {"error":"rate_limited","message":…,"retry_after_ms":n} + Retry-After (whole seconds)
                                          (the tenant's price_checks_per_s; a batch leg counts one)
    422 {"error":"batch_over_burst",…}   (a batch larger than the tenant's burst: split it)

With tenants (:mod:`streaming.tenants`) a market the credential may not see is
``UNKNOWN_MARKET``, and a best-price check considers only the books it may see.

``current_price`` is the price the check compared (``price_field`` says
which: ``best_back`` = ``back[0]``, ``best_lay`` = ``lay[0]``, ``price`` = a
bookmaker's offered price when there is no back ladder), null when nothing
is offered or the market/selection is unknown; ``available_size`` is the
size at that price; ``age_ms`` is the market's age (see
:mod:`streaming.state`) at ``checked_at``.

Reasons, checked in this order (the first that applies is the answer):

1. ``UNKNOWN_MARKET``    no such market on this node;
2. ``UNKNOWN_SELECTION`` no such selection in the market, or it was
   removed (status REMOVED/HIDDEN);
3. ``MARKET_CLOSED``     market CLOSED/SETTLED/CANCELLED, or the selection
   is settled (WINNER/LOSER/PLACED/VOID) — permanent, retrying won't help;
4. ``SOURCE_DOWN``       the market's source is DOWN (nothing confirms the
   price);
5. ``STALE``             ``age_ms > max_age_ms``, an update of the market
                         was rejected (not trusted until re-imaged), or this node is not
   receiving updates (a partition reader lost Redis). Default ``max_age_ms``:
   ``settings.price_check_max_age_in_play_ms`` (5 s) for in-play markets
   — in play, or past their ``start_time`` though the provider has not
   said so yet (:func:`streaming.state.live_for_limits`) —
   ``…_pre_match_ms`` (30 s) otherwise;
6. ``SUSPENDED``         market SUSPENDED/INACTIVE or selection SUSPENDED;
7. ``VERSION_CHANGED``   ``version`` was given and the market's definition
   version differs;
8. ``PRICE_CHANGED``     back: best back < requested (≠ when
   ``accept_better`` is false); lay: best lay > requested (≠ when not
   ``accept_better``); or nothing is offered on that side;
9. ``OK``.

Identity first (nothing else can be said), then permanent states, then
whether the data can be trusted (a stale "suspended" may already be lifted,
so freshness is reported before it), then the market's own state, then the
price. DEGRADED sources are not rejected; ``source_state`` reports them.

Prices are compared exactly as decimals, never rounded in the bettor's
favour: both sides are turned into integer ten-thousandths (4 decimal places:
Betfair's ladder has 2, Pinnacle quotes 3, American and fractional odds are
stored with 4, rounded against the bettor — ``-105`` is ``1.9523``), so
``2.1`` vs ``2.10`` is equal, float noise like ``2.0999999999999996``
(within 1e-10 of a 4-place value) never flips an answer, and ``1.9523``
does not match a request at ``1.95``.
A requested price may have at most 4 decimal places (422 otherwise). An
offered price is taken as stored; one with more than 4 places (a provider's
decimal odds are stored as sent) is rounded against the bettor — down for
back, up for lay — and ``current_price`` is that compared value, so it can be
requested as it is. ``current_price`` is the book's own price otherwise
(``1.9523``, not ``1.95``).
"""

from __future__ import annotations

import asyncio
import math
import time
import types
from collections.abc import Callable, Generator
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from feed.models import CLOSED_STATUSES, Market, Selection, SourceHealth, lost_change
from feed.settings import Settings
from streaming.responses import JSON, json_error, json_response
from streaming.state import NodeState, live_for_limits, now_ms
from streaming.tenants import SCOPE_KEY, Grant, LimitError

if TYPE_CHECKING:
    from streaming.reader import Node

__all__ = [
    "BatchRequest", "BatchResult", "PriceCheckEndpoint", "PriceCheckRequest", "PriceCheckResult", "REASONS", "check",
    "check_batch", "price_to_ten_thousandths", "routes",
]

Side = Literal["back", "lay"]
Reason = Literal["OK", "PRICE_CHANGED", "VERSION_CHANGED", "SUSPENDED", "MARKET_CLOSED", "STALE", "SOURCE_DOWN",
                 "UNKNOWN_MARKET", "UNKNOWN_SELECTION"]

#: Every reason, in precedence order (OK last).
REASONS: tuple[str, ...] = ("UNKNOWN_MARKET", "UNKNOWN_SELECTION", "MARKET_CLOSED", "SOURCE_DOWN", "STALE",
                            "SUSPENDED", "VERSION_CHANGED", "PRICE_CHANGED", "OK")

MAX_LEGS = 50
#: Largest accepted body (a 50-leg batch is ~10 KiB).
MAX_BODY_BYTES = 64 << 10

_ID = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_INT_ID = Annotated[int, msgspec.Meta(ge=0)]
_PRICE = Annotated[float, msgspec.Meta(ge=1.01, le=1000)]
_AGE = Annotated[int, msgspec.Meta(ge=0, le=86_400_000)]

_SUSPENDED_MARKET = frozenset({"SUSPENDED", "INACTIVE"})
_SETTLED_SELECTION = frozenset({"WINNER", "LOSER", "PLACED", "VOID"})
_GONE_SELECTION = frozenset({"REMOVED", "HIDDEN"})


class PriceCheckRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One price check (one leg). ``price``: decimal odds 1.01–1000 with at
    most 4 decimal places; ``max_age_ms``: oldest acceptable data (default
    by in-play / pre-match); ``accept_better``: a better price than asked
    is accepted; ``version``: the market definition version the price was
    shown with (optional)."""

    side: Side
    price: _PRICE
    market_id: _ID | None = None
    #: a string; a JSON integer is taken as its decimal digits (Betfair's selection ids are numbers)
    selection_id: _ID | _INT_ID | None = None
    event: _ID | None = None
    market: _ID | None = None
    outcome: _ID | None = None
    max_age_ms: _AGE | None = None
    accept_better: bool = True
    version: int | None = None

    def __post_init__(self) -> None:
        if type(self.selection_id) is int:
            msgspec.structs.force_setattr(self, "selection_id", str(self.selection_id))

    def shape_error(self) -> str | None:
        """What is wrong with the choice of identity fields, or None: give
        ``market_id`` + ``selection_id`` (one book) or ``event`` +
        ``market`` + ``outcome`` (the best book)."""
        book = self.market_id is not None or self.selection_id is not None
        best = self.event is not None or self.market is not None or self.outcome is not None
        if book and best:
            return ("give either market_id + selection_id (one book's price) or event + market + outcome "
                    "(the best price across books), not both")
        if book:
            if self.market_id is None or self.selection_id is None:
                return "market_id and selection_id go together"
            return None
        if self.event is None or self.market is None or self.outcome is None:
            return ("give market_id + selection_id, or event (a canonical event id ev:…) + market (a canonical "
                    "market key such as match_result or total:line=2.5) + outcome (home, draw, over …)")
        if self.version is not None:
            return "version applies to one book's market: give market_id + selection_id with it"
        return None


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """All legs of a multiple, checked together."""

    legs: Annotated[list[PriceCheckRequest], msgspec.Meta(min_length=1, max_length=MAX_LEGS)]


class BookCheck(msgspec.Struct, kw_only=True, frozen=True):
    """One book considered by a best-price check: its answer in short."""

    bookmaker: str
    market_id: str
    selection_id: str
    reason: str
    current_price: float | None = None
    age_ms: int | None = None


class PriceCheckResult(msgspec.Struct, kw_only=True, frozen=True):
    """The answer for one leg (see the module docstring)."""

    accepted: bool
    reason: str
    message: str
    market_id: str | None
    selection_id: str | None
    side: Side
    requested_price: float
    current_price: float | None = None
    price_field: str | None = None
    available_size: float | None = None
    age_ms: int | None = None
    max_age_ms: int | None = None
    market_status: str | None = None
    selection_status: str | None = None
    in_play: bool | None = None
    version: int | None = None
    seq: int | None = None
    source: str | None = None
    source_state: str | None = None
    checked_at: int = 0
    event: str | None = None
    market: str | None = None
    outcome: str | None = None
    bookmaker: str | None = None
    books: list[BookCheck] | None = None


class BatchResult(msgspec.Struct, kw_only=True, frozen=True):
    """``accepted`` is true only when every leg is accepted."""

    accepted: bool
    legs: list[PriceCheckResult]
    checked_at: int


_REQUEST_DECODER = msgspec.json.Decoder(PriceCheckRequest)
_BATCH_DECODER = msgspec.json.Decoder(BatchRequest)
_ENCODER = msgspec.json.Encoder()

#: prices are compared as integers in ten-thousandths (4 decimal places)
PRICE_UNITS = 10_000
_TEN_THOUSANDTH = Decimal("0.0001")


def price_to_ten_thousandths(price: float) -> int | None:
    """Decimal odds → integer ten-thousandths, exactly: ``2.1`` → 21000, ``1.9091`` → 19091;
    None when the price has more than 4 decimal places. Float noise within 1e-10 of a
    4-place value is that value (``0.7 * 3`` → 21000). For every 4-place price 1.0001–1000,
    ``price * 10000`` is within 1e-9 of the integer, so no Decimal is built here."""
    x = price * 10_000.0
    r = round(x)
    return r if abs(x - r) < 1e-6 else None


def _units(price: float, up: bool) -> int:
    """``price`` in ten-thousandths, one with more than 4 decimal places rounded up or down
    (on its shortest decimal form, ``repr``, never on the binary float)."""
    units = price_to_ten_thousandths(price)
    if units is not None:
        return units
    return int(Decimal(repr(price)).quantize(_TEN_THOUSANDTH, rounding=ROUND_CEILING if up else ROUND_FLOOR)
               * PRICE_UNITS)


#: _show's texts by units (prices repeat: a ladder has a few hundred); cleared when it holds
#: _SHOWN_MAX, so a caller sending ever new prices keeps it bounded
_SHOWN: dict[int, str] = {}
_SHOWN_MAX = 4096


def _show(units: int) -> str:
    """Ten-thousandths as the shortest decimal: 19091 → ``1.9091``, 21000 → ``2.1``, 20000 → ``2``."""
    text = _SHOWN.get(units)
    if text is None:
        whole, frac = divmod(units, PRICE_UNITS)
        text = f"{whole}.{frac:04d}".rstrip("0") if frac else str(whole)
        if len(_SHOWN) >= _SHOWN_MAX:
            _SHOWN.clear()
        _SHOWN[units] = text
    return text


def _best(sel: Selection, side: str) -> tuple[float | None, float | None, str | None]:
    """(price, size, field) of the best offer on ``side``."""
    if side == "back":
        if sel.back:
            p, s = sel.back[0]
            return p, s, "best_back"
        if sel.price is not None:
            return sel.price, None, "price"
        return None, None, None
    if sel.lay:
        p, s = sel.lay[0]
        return p, s, "best_lay"
    return None, None, None


def default_max_age_ms(settings: Settings, in_play: bool) -> int:
    """The default ``max_age_ms`` for an in-play or pre-match market, ms
    (``settings.price_check_max_age_in_play_ms`` / ``…_pre_match_ms``). ``in_play``: whether the
    market is judged by the in-play limits (:func:`streaming.state.live_for_limits`: in play, or
    its ``start_time`` has come), not its ``in_play`` flag alone."""
    return settings.price_check_max_age_in_play_ms if in_play else settings.price_check_max_age_pre_match_ms


#: how far each answer is from an accepted price, best first: a best-price check answers
#: with the book whose answer ranks first (then the better price, the fresher data)
_RANK = {r: i for i, r in enumerate(("OK", "PRICE_CHANGED", "VERSION_CHANGED", "SUSPENDED", "STALE", "SOURCE_DOWN",
                                     "MARKET_CLOSED", "UNKNOWN_SELECTION", "UNKNOWN_MARKET"))}


def check(state: NodeState, req: PriceCheckRequest, now: int, *, feed_problem: str | None = None,
          visible: Callable[[Market], bool] | None = None) -> PriceCheckResult:
    """Check one leg against ``state`` at ``now`` (pure apart from reading
    state). ``feed_problem``: why this node is not receiving updates, if it
    is not (then the answer is at best ``STALE``). A leg naming ``event`` +
    ``market`` + ``outcome`` is checked against every book of that
    canonical market (:func:`check_best`). ``visible``: the markets the
    caller may see (a tenant's, :mod:`streaming.tenants`); others are unknown
    to it."""
    if req.market_id is None or req.selection_id is None:
        return check_best(state, req, now, feed_problem=feed_problem, visible=visible)
    return _check_book(state, req, req.market_id, str(req.selection_id), now, feed_problem=feed_problem,
                       visible=visible)


def check_best(state: NodeState, req: PriceCheckRequest, now: int, *,
               feed_problem: str | None = None, visible: Callable[[Market], bool] | None = None) -> PriceCheckResult:
    """A best-price check: the canonical market ``req.market`` of canonical
    event ``req.event`` (a provider event id is taken as its canonical
    event), outcome ``req.outcome``. Every book's selection of that outcome
    is checked as a one-book check would; the answer is the book whose
    answer is best — ``OK`` before ``PRICE_CHANGED`` before ``SUSPENDED``,
    ``STALE`` … — and among equals the better price, then the fresher data.
    So it is ``OK`` when the best current non-stale price is at least the
    requested one (back; at most, lay), names that book (``bookmaker``,
    ``market_id``, ``selection_id``) and lists every book considered with
    its own reason (``books``): stale or suspended books never make it OK.
    ``UNKNOWN_MARKET`` when no book holds the event's market,
    ``UNKNOWN_SELECTION`` when none prices the outcome."""
    from streaming.aggregate import group_markets, start_disagrees

    assert req.event is not None and req.market is not None and req.outcome is not None
    base: dict[str, Any] = {"market_id": None, "selection_id": None, "side": req.side, "requested_price": req.price,
                            "checked_at": now, "event": req.event, "market": req.market, "outcome": req.outcome}
    cid = req.event
    if cid not in state.by_canonical and (ids := state.by_event.get(cid)):
        first = state.markets.get(next(iter(ids)))
        cid = (state.canonical_of(first) if first is not None else None) or cid
    markets = [m for mid in sorted(state.by_canonical.get(cid, ())) if (m := state.markets.get(mid)) is not None
               and (visible is None or visible(m))]
    if not markets:
        return PriceCheckResult(accepted=False, reason="UNKNOWN_MARKET", message=f"no event {req.event!r} on this feed",
                                **base)
    # a book whose market starts far from the event's start is not this event (a link that no
    # longer fits): its price is never an answer
    kept = [m for m in markets if not start_disagrees(state, m)]
    if not kept:
        return PriceCheckResult(accepted=False, reason="UNKNOWN_MARKET",
                                message=f"no book of event {cid} starts at its start time", **base)
    markets = kept
    group = group_markets(markets, state.reversed_of).get(req.market)
    if not group:
        return PriceCheckResult(accepted=False, reason="UNKNOWN_MARKET",
                                message=f"no book offers market {req.market!r} of event {cid}", **base)
    answers: list[tuple[tuple[int, float, int, str], PriceCheckResult, str]] = []
    for m, sels in group:
        for sel in sels:
            if sel.outcome != req.outcome:
                continue
            r = _check_book(state, req, m.market_id, sel.selection_id, now, feed_problem=feed_problem)
            cur = r.current_price if r.current_price is not None else 0.0
            better = -cur if req.side == "back" else (cur if r.current_price is not None else 1e9)
            book = m.bookmaker or m.source
            answers.append(((_RANK.get(r.reason, 99), better, r.age_ms or 0, book), r, book))
    if not answers:
        return PriceCheckResult(accepted=False, reason="UNKNOWN_SELECTION",
                                message=f"no book of event {cid} prices outcome {req.outcome!r} of {req.market}",
                                **base)
    answers.sort(key=lambda a: a[0])
    _, best, book = answers[0]
    books = [BookCheck(bookmaker=b, market_id=r.market_id or "", selection_id=r.selection_id or "", reason=r.reason,
                       current_price=r.current_price, age_ms=r.age_ms) for _, r, b in answers]
    others = [b for b in books[1:] if b.reason in ("STALE", "SUSPENDED", "SOURCE_DOWN")]
    note = (f"; not considered: {', '.join(f'{b.bookmaker} ({b.reason.lower()})' for b in others)}"
            if others else "")
    return msgspec.structs.replace(best, event=cid, market=req.market, outcome=req.outcome, bookmaker=book,
                                   books=books, message=f"{book}: {best.message}{note}")


def _check_book(state: NodeState, req: PriceCheckRequest, market_id: str, selection_id: str, now: int, *,
                feed_problem: str | None = None, visible: Callable[[Market], bool] | None = None) -> PriceCheckResult:
    # the hot path of every check: one PriceCheckResult built with plain keywords (no dicts, no
    # closure, no **kwargs); the reasons are judged in order by _judge
    m: Market | None = state.markets.get(market_id)
    if m is None or (visible is not None and not visible(m)):
        return PriceCheckResult(accepted=False, reason="UNKNOWN_MARKET", message=f"no market {market_id!r} on this feed",
                                market_id=market_id, selection_id=selection_id, side=req.side,
                                requested_price=req.price, checked_at=now)
    age, _ = state.age_stale(m, now)
    if feed_problem is None and state.rebuilding:
        why = state.rebuilding_reason(market_id)
        if why is not None:  # this node knows the market may miss a change until its reload
            feed_problem = f"its partition is being reloaded from the store: {why}"
    if feed_problem is None and age == 0:  # (an age of 0: fresh, or stamped in this node's future)
        feed_problem = state.stamp_problem(m, now)
    health = state.source_health(m.source, now)
    source_state = health.state if health is not None else None
    max_age = req.max_age_ms
    if max_age is None:  # the default, never above the age at which this node streams the market as stale
        live = live_for_limits(m, now)  # in play, or past its start_time though the provider has not said so yet
        max_age = min(default_max_age_ms(state.settings, live), state.stale_after_ms(m.sport, live))
    sel = m.selection(selection_id)
    if sel is None:
        reason = "UNKNOWN_SELECTION"
        message = f"market {m.market_id} has no selection {selection_id!r}"
        cur = size = None
        field = sel_status = None
    else:
        cur, size, field = _best(sel, req.side)
        sel_status = sel.status
        reason, message, cur = _judge(m, sel, req, cur, field, age, max_age, health, feed_problem)
    return PriceCheckResult(accepted=reason == "OK", reason=reason, message=message, market_id=market_id,
                            selection_id=selection_id, side=req.side, requested_price=req.price, current_price=cur,
                            price_field=field, available_size=size, age_ms=age, max_age_ms=max_age,
                            market_status=m.status, selection_status=sel_status, in_play=m.in_play, version=m.version,
                            seq=m.seq, source=m.source, source_state=source_state, checked_at=now)


def _judge(m: Market, sel: Selection, req: PriceCheckRequest, cur: float | None, field: str | None, age: int,
           max_age: int, health: SourceHealth | None, feed_problem: str | None) -> tuple[str, str, float | None]:
    """(reason, message, current_price) of one book's selection, the reasons in the order of
    the module docstring; ``current_price`` is the compared price (exact, in ten-thousandths)
    once the price itself is judged."""
    status = sel.status
    if status in _GONE_SELECTION:
        return "UNKNOWN_SELECTION", f"selection {sel.selection_id} was removed from market {m.market_id}", cur
    if m.status in CLOSED_STATUSES:
        return "MARKET_CLOSED", f"market {m.market_id} is {m.status.lower()}", cur
    if status in _SETTLED_SELECTION:
        return "MARKET_CLOSED", f"selection {sel.selection_id} is settled ({status.lower()})", cur
    if health is not None and health.state == "DOWN":
        why = f" ({health.reason})" if health.reason else ""
        return "SOURCE_DOWN", f"source {m.source} is down{why}; its prices are not confirmed", cur
    if feed_problem is not None:
        return "STALE", f"this node is not receiving updates ({feed_problem})", cur
    if lost_change(m, health):
        return ("STALE", f"an update of market {m.market_id} was rejected; its prices are not trusted "
                         "until the source re-images it", cur)
    if age > max_age:
        return "STALE", f"market data is {age} ms old, older than max_age_ms {max_age}", cur
    if m.status in _SUSPENDED_MARKET:
        why = f" ({m.suspend_reason})" if m.suspend_reason else ""
        return "SUSPENDED", f"market {m.market_id} is {m.status.lower()}{why}", cur
    if status == "SUSPENDED":
        return "SUSPENDED", f"selection {sel.selection_id} is suspended", cur
    if req.version is not None and req.version != m.version:
        return "VERSION_CHANGED", f"market definition version is {m.version}, not {req.version}", cur
    if cur is None:
        return "PRICE_CHANGED", f"no {req.side} price is offered on selection {sel.selection_id}", cur
    back = req.side == "back"
    have = _units(cur, not back)  # more than 4 places: rounded against the bettor (down back, up lay)
    want = price_to_ten_thousandths(req.price)
    if want is None:  # more than 4 places: only from a direct caller (HTTP answers 422). Never equal; rounded
        # like the offered price, so `have > want` (back) / `have < want` (lay) stays exact
        want, same, asked = _units(req.price, not back), False, repr(req.price)
    else:
        same, asked = have == want, _show(want)
    if back:
        ok = same or (req.accept_better and have > want)
    else:
        ok = same or (req.accept_better and have < want)
    if ok:
        return "OK", f"{field} {_show(have)} {'matches' if same else 'is better than'} {asked}", have / PRICE_UNITS
    return "PRICE_CHANGED", f"{field} is {_show(have)}, requested {asked}", have / PRICE_UNITS


def check_batch(state: NodeState, legs: list[PriceCheckRequest], now: int, *,
                feed_problem: str | None = None, visible: Callable[[Market], bool] | None = None) -> BatchResult:
    """Check every leg against the same state at the same ``now`` (``visible``: as :func:`check`)."""
    out = [check(state, leg, now, feed_problem=feed_problem, visible=visible) for leg in legs]
    return BatchResult(accepted=all(r.accepted for r in out), legs=out, checked_at=now)


# -- HTTP ----------------------------------------------------------------------
#
# Both endpoints are raw ASGI apps (no Starlette Request/Response on the hot path): every
# check pays for uvicorn and Starlette's routing anyway, so the endpoint itself reads the
# body straight from ``receive``, decodes it with the typed msgspec decoder, checks, encodes
# the answer with one reused Encoder and sends it with prebuilt headers. Errors (422, 413,
# 408, 503) are rare and use the shared json_error Response.


class _BodyError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Disconnected(Exception):
    """The client went away before its body arrived: nobody to answer."""


@types.coroutine
def _resume(coro: Any, waiting: Any) -> Generator[Any, Any, Any]:
    """Await the rest of ``coro``, whose first step already ran and yielded ``waiting`` (what a
    coroutine hands its task: the future it waits for). Like ``yield from``: the task waits on
    what ``coro`` yields; values sent and exceptions thrown in (a cancellation: the deadline)
    are passed on to ``coro``."""
    while True:
        try:
            value = yield waiting
        except BaseException as exc:
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = coro.send(value)
            except StopIteration as done:
                return done.value


async def _receive(receive: Receive, deadline: float) -> Message:
    """``await receive()`` under ``deadline`` (loop time). The deadline's timer is armed only
    when ``receive`` has to wait: a body that arrived with the request head (nearly every
    price check) is taken without scheduling and cancelling a timer. Raises TimeoutError."""
    aw = receive()
    step = getattr(aw, "send", None)
    if step is not None:  # a coroutine (uvicorn's, Starlette's wrappers): run its first step now
        try:
            waiting = step(None)
        except StopIteration as done:
            return done.value
        async with asyncio.timeout_at(deadline):
            return await _resume(aw, waiting)
    async with asyncio.timeout_at(deadline):
        return await aw


async def _read_body(scope: Scope, receive: Receive, deadline_s: float) -> bytes:
    """The request body: at most MAX_BODY_BYTES (413, also when Content-Length says more),
    all of it within ``deadline_s`` (408). Raises _BodyError, or _Disconnected."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > MAX_BODY_BYTES:
                raise _BodyError(413, "payload_too_large", f"the body is limited to {MAX_BODY_BYTES} bytes")
            break
    deadline = asyncio.get_running_loop().time() + deadline_s
    chunks: list[bytes] = []
    n = 0
    try:
        while True:
            message = await _receive(receive, deadline)
            if message["type"] != "http.request":
                if message["type"] == "http.disconnect":
                    raise _Disconnected()
                continue
            chunk = message.get("body", b"")
            if chunk:
                n += len(chunk)
                if n > MAX_BODY_BYTES:
                    raise _BodyError(413, "payload_too_large", f"the body is limited to {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except TimeoutError:
        raise _BodyError(408, "deadline_exceeded",
                         f"the request body did not arrive within {deadline_s * 1000:.0f} ms") from None
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


_SHAPE = ('send {"market_id": str, "selection_id": str, "side": "back"|"lay", "price": 1.01-1000, '
          '"max_age_ms"?: int, "accept_better"?: bool, "version"?: int} (one book), or {"event": "ev:…", '
          '"market": "total:line=2.5", "outcome": "over", "side", "price", …} (the best book)')


#: the fields whose values are ids (strings: a number there gets the hint to quote it)
_ID_PATHS = ("`$.market_id`", "`$.selection_id`", "`$.event`", "`$.market`", "`$.outcome`", "].market_id`",
             "].selection_id`", "].event`", "].market`", "].outcome`")


def _invalid(exc: msgspec.MsgspecError, batch: bool) -> Response:
    text = str(exc)
    if "unknown field `legs`" in text and not batch:
        text += " (a batch goes to POST /v1/price-check/batch)"
    elif "unknown field" in text and batch and " - at " not in text:  # (a field of the body itself)
        text += " (one check goes to POST /v1/price-check; here send {\"legs\": [...]})"
    elif "unknown field" in text:
        text += " (remove it)"
    elif ("got `int`" in text or "got `float`" in text) and any(p in text for p in _ID_PATHS):
        text += " (ids are strings: quote it, e.g. \"1.234567\")"
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        text = f"body is not valid JSON ({text})"
    shape = 'send {"legs": [<leg>, …]} with 1-%d legs, each: %s' % (MAX_LEGS, _SHAPE[5:]) if batch else _SHAPE
    return json_error(422, "invalid_request", f"{text}; {shape}")


def _validate_prices(legs: list[PriceCheckRequest], batch: bool) -> Response | None:
    for i, leg in enumerate(legs):
        shape = leg.shape_error()
        if shape is not None:
            return json_error(422, "invalid_request", shape + (f" - at `$.legs[{i}]`" if batch else "") + "; "
                              + (_SHAPE if not batch else 'send {"legs": [<leg>, …]}, each leg ' + _SHAPE[5:]))
        if price_to_ten_thousandths(leg.price) is None:
            where = f"$.legs[{i}].price" if batch else "$.price"
            return json_error(422, "invalid_request",
                              f"price {leg.price!r} has more than 4 decimal places - at `{where}`; "
                              "send decimal odds as quoted (e.g. 2.12 or 1.9091)")
    return None


def _rate_limited(exc: LimitError) -> Response:
    """429 for a tenant's price-check limit: ``Retry-After`` in whole seconds (rounded up, HTTP's
    unit) and ``retry_after_ms`` in the body; 422 for a batch larger than the burst, without
    either (no wait makes it pass)."""
    body: dict[str, object] = {"error": exc.code, "message": str(exc)}
    headers = {"Cache-Control": "no-store"}
    if exc.retry_after_s is not None:
        body["retry_after_ms"] = math.ceil(exc.retry_after_s * 1000)
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    # a batch over the burst: no retry can pass (422, so retrying clients do not loop)
    return json_response(body, 422 if exc.code == "batch_over_burst" else 429, headers=headers)


def _feed_problem(node: "Node") -> str | None:
    for r in node.readers:
        if not r.connected:
            return f"partition {r.partition} reader: {r.last_error or 'not connected to redis'}"
    return None


_CACHE_CONTROL = (b"cache-control", b"no-store")
_CONTENT_TYPE = (b"content-type", JSON.encode())


#: an answer as (status, headers, body): what both the ASGI endpoint and the protocol-layer fast
#: path (:mod:`streaming.fastpath`) send
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def answer_of(response: Response) -> Answer:
    """A Starlette response as (status, raw headers, body)."""
    return response.status_code, list(response.raw_headers), bytes(response.body)


async def send_answer(send: Send, answer: Answer) -> None:
    """Send ``answer`` on an ASGI ``send``."""
    status, headers, body = answer
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: 503: the node has not loaded its state yet (both paths answer it)
NOT_READY = answer_of(json_error(503, "not_ready", "this node has not loaded the markets yet; retry shortly"))


class PriceCheckEndpoint:
    """``POST /v1/price-check`` (``batch=False``) or ``POST /v1/price-check/batch``, a raw ASGI
    app (see the note above). Answers, in order: 503 before the node has loaded; 413 / 408
    while reading the body; 422 for a body that does not decode or validate; else 200 with
    the answer, ``Cache-Control: no-store``. :meth:`answer` is the part after the body has
    arrived, synchronous: the fast path (:mod:`streaming.fastpath`) calls it too."""

    def __init__(self, *, batch: bool) -> None:
        self.batch = batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        node: Node = scope["app"].state.node
        if not node.state.loaded:
            await send_answer(send, NOT_READY)
            return
        deadline_s = node.settings.price_check_deadline_ms / 1000
        try:
            body = await _read_body(scope, receive, deadline_s)
        except _BodyError as exc:
            await send_answer(send, answer_of(json_error(exc.status, exc.code, exc.message)))
            return
        except _Disconnected:
            return
        await send_answer(send, self.answer(node, scope.get(SCOPE_KEY), body))

    @staticmethod
    def too_large() -> Answer:
        """413: the body is over :data:`MAX_BODY_BYTES` (the fast path's answer when it is)."""
        return answer_of(json_error(413, "payload_too_large", f"the body is limited to {MAX_BODY_BYTES} bytes"))

    @staticmethod
    def timed_out(deadline_ms: int) -> Answer:
        """408: the body did not arrive within ``deadline_ms`` (the price-check deadline)."""
        return answer_of(json_error(408, "deadline_exceeded",
                                    f"the request body did not arrive within {deadline_ms} ms"))

    def answer(self, node: Node, grant: Grant | None, body: bytes) -> Answer:
        """The answer to a whole request ``body`` from a caller with ``grant`` (None:
        authentication is off): 503 before the node has loaded, 422 for a body that does not
        decode or validate, 429/422 over the tenant's limit, else 200 with the check's result.
        Synchronous: every leg is judged on the same state."""
        if not node.state.loaded:
            return NOT_READY
        result: PriceCheckResult | BatchResult
        try:
            if self.batch:
                legs = _BATCH_DECODER.decode(body).legs
            else:
                legs = [_REQUEST_DECODER.decode(body)]
        except msgspec.MsgspecError as exc:
            return answer_of(_invalid(exc, self.batch))
        bad = _validate_prices(legs, self.batch)
        if bad is not None:
            return answer_of(bad)
        visible = None
        if grant is not None:
            if grant.principal is not None:
                try:
                    grant.principal.take_price_checks(len(legs))
                except LimitError as exc:
                    return answer_of(_rate_limited(exc))
            if grant.restricted:
                visible = grant.visible
        t0 = time.perf_counter()
        counts = node.price_checks
        if self.batch:
            result = check_batch(node.state, legs, now_ms(), feed_problem=_feed_problem(node), visible=visible)
            for leg in result.legs:
                counts[leg.reason] = counts.get(leg.reason, 0) + 1
        else:
            result = check(node.state, legs[0], now_ms(), feed_problem=_feed_problem(node), visible=visible)
            counts[result.reason] = counts.get(result.reason, 0) + 1
        answer = _ENCODER.encode(result)
        node.price_check_latency.observe(time.perf_counter() - t0)
        return 200, [_CACHE_CONTROL, (b"content-length", b"%d" % len(answer)), _CONTENT_TYPE], answer


def routes() -> list[BaseRoute]:
    """The price-check routes (mounted by :func:`streaming.app.create_app` beside :func:`streaming.rest.routes`)."""
    return [
        Route("/v1/price-check", PriceCheckEndpoint(batch=False), methods=["POST"], name="price_check"),
        Route("/v1/price-check/batch", PriceCheckEndpoint(batch=True), methods=["POST"], name="price_check_batch"),
    ]
