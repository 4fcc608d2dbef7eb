"""The aggregated view: one canonical event, every book's price per
canonical market and outcome, the best price and a fair price (pure: reads
:class:`~streaming.state.NodeState`, no I/O). Times are integer ms since
the Unix epoch (UTC); prices are decimal odds.

Books: every market of the canonical event (all its linked provider events)
with a canonical market type. Markets are grouped by canonical market key
(:func:`feed.taxonomy.market_key`, e.g. ``total:line=2.5``); a market whose
lines are per selection (a Betfair Asian handicap market: one market, every
line) joins the group of each selection's line (the home side's handicap).
Within a group selections are aligned by their canonical ``outcome``.

Per book and outcome: ``price`` (best back, or the bookmaker's offered
price), ``lay`` (exchanges: best lay), sizes, the market's own ``age_ms`` /
``stale``, and ``excluded`` — why the price is not used for the best or
fair price: ``stale`` (too old, source down, or a lost change), ``suspended``
(market or selection suspended / inactive), ``closed`` (closed, settled,
removed), ``start_time`` (the market starts more than ``ODDSFEED_MATCH_TOLERANCE_MS``
from its canonical event: a link that no longer fits, :func:`start_disagrees`), ``no_price``
(nothing offered).

**Best price**: the highest back price over the books not excluded (ties:
the fresher, then the bookmaker's name); **best lay**: the lowest lay price
over exchanges not excluded. Each names its book, market, selection and age.

**Fair price** (the margin removed): for each book not excluded that prices
every outcome of the group (a complete book: all of the type's outcomes —
home/draw/away, over/under …; for ``win``, every active runner it lists),
the implied probabilities ``1/price`` are de-vigged, then averaged over
those books; fair price = 1 / average probability. Methods
(``settings.fair_method``):

- ``multiplicative`` (default): ``p_i = (1/o_i) / Σ_j 1/o_j`` — the margin
  removed in proportion to each outcome's implied probability (the
  "normalisation" or "basic" method);
- ``power``: ``p_i = (1/o_i)^k`` with ``k`` solving ``Σ p_i = 1`` — takes more
  margin from longshots (favourite–longshot bias); S. R. Clarke, S. Kovalchik
  and M. Ingram, "Adjusting bookmaker's odds to allow for overround",
  *American Journal of Sports Science* 5(6):45–49, 2017.

Each book's ``margin`` (overround − 1) is reported with the group. Groups of
``place``, ``correct_score`` and unmapped (``raw:``) types get no fair price
(their outcome sets do not sum to one event).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from feed.matching import record_id
from feed.models import CLOSED_STATUSES, Market, Selection
from feed.taxonomy import LINE_TYPES, MARKET_TYPES, is_unmapped, key_type, line_text, market_key, parse_market_key
from streaming.state import NodeState

__all__ = [
    "BestPrice", "BookPrice", "EventView", "FAIR_METHODS", "MarketView", "OutcomeView", "devig", "event_facts",
    "event_view",
    "group_markets", "market_views",
]

FAIR_METHODS = ("multiplicative", "power")

_SUSPENDED = frozenset({"SUSPENDED", "INACTIVE"})
_SETTLED_SEL = frozenset({"WINNER", "LOSER", "PLACED", "VOID", "REMOVED", "HIDDEN"})


class BookPrice(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One book's price of one outcome."""

    bookmaker: str
    source: str
    market_id: str
    selection_id: str
    price: float | None = None
    size: float | None = None
    lay: float | None = None
    lay_size: float | None = None
    age_ms: int = 0
    stale: bool = False
    status: str = "ACTIVE"
    excluded: str | None = None


class BestPrice(msgspec.Struct, kw_only=True):
    """The best price of one side of one outcome and where it is."""

    price: float
    bookmaker: str
    market_id: str
    selection_id: str
    age_ms: int
    size: float | None = None


class OutcomeView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One outcome across books."""

    outcome: str
    name: str | None = None
    best: BestPrice | None = None
    best_lay: BestPrice | None = None
    fair: float | None = None
    books: list[BookPrice] = []


class MarketView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One canonical market of an event across books."""

    market: str
    market_type: str
    specifiers: dict[str, str] = {}
    name: str | None = None
    outcomes: list[OutcomeView] = []
    fair_method: str | None = None
    fair_books: list[str] = []
    margins: dict[str, float] = {}
    excluded_books: dict[str, str] = {}


class EventView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A canonical event with its books (see the module docstring)."""

    event_id: str
    name: str | None = None
    sport: str | None = None
    competition: str | None = None
    start_time: int | None = None
    in_play: bool = False
    home: str | None = None
    away: str | None = None
    members: list[dict[str, object]] = []
    bookmakers: list[str] = []
    markets: list[MarketView] = []
    as_of: int = 0


# -- de-vig ----------------------------------------------------------------------------------


def devig(prices: Sequence[float], method: str = "multiplicative") -> list[float]:
    """Fair probabilities of a complete book's decimal ``prices`` (one per
    outcome, each > 1): they sum to 1. Raises ValueError for an unknown
    method or fewer than two prices."""
    if len(prices) < 2:
        raise ValueError("a book needs two outcomes or more to remove its margin")
    implied = [1.0 / p for p in prices]
    if method == "multiplicative":
        total = sum(implied)
        return [q / total for q in implied]
    if method == "power":
        # Σ q_i^k = 1: f(k) falls as k grows (every q_i < 1); bisect on k
        lo, hi = 0.01, 1.0
        while sum(q ** hi for q in implied) > 1.0:
            hi *= 2
            if hi > 1e4:
                break
        while sum(q ** lo for q in implied) < 1.0 and lo > 1e-6:
            lo /= 2
        for _ in range(80):
            mid = (lo + hi) / 2
            if sum(q ** mid for q in implied) > 1.0:
                lo = mid
            else:
                hi = mid
        k = (lo + hi) / 2
        out = [q ** k for q in implied]
        total = sum(out)
        return [q / total for q in out]
    raise ValueError(f"unknown fair-price method {method!r}; use one of {', '.join(FAIR_METHODS)}")


# -- grouping --------------------------------------------------------------------------------


def _line_of(m: Market, sel: Selection) -> str | None:
    """The home side's line a per-selection-line market's selection belongs to."""
    if sel.outcome == "away":
        return line_text(-sel.handicap)
    return line_text(sel.handicap)


_FLIP = {"home": "away", "away": "home", "home_draw": "draw_away", "draw_away": "home_draw"}


def _flip_outcome(outcome: str | None, market_type: str) -> str | None:
    if outcome is None:
        return None
    if market_type == "correct_score" and "-" in outcome:
        a, _, b = outcome.partition("-")
        return f"{b}-{a}"
    return _FLIP.get(outcome, outcome)


def turned(m: Market) -> tuple[dict[str, str], list[Selection]]:
    """Market ``m`` of an event that names the sides the other way round
    from its canonical event, seen from the canonical sides: home ↔ away
    outcomes (and double chance, correct score), the handicap line and the
    team of a team total turned round. Selection ids and prices stay the
    provider's."""
    t = m.market_type or ""
    specs = dict(m.specifiers or {})
    if "team" in specs:
        specs["team"] = _FLIP.get(specs["team"], specs["team"])
    if t in ("handicap", "handicap_3way") and "line" in specs:
        try:
            specs["line"] = line_text(-float(specs["line"]))
        except ValueError:
            pass
    sels = [msgspec.structs.replace(s, outcome=_flip_outcome(s.outcome, t)) for s in m.selections]
    return specs, sels


def group_markets(markets: Iterable[Market], reversed_of: Callable[[Market], bool] | None = None
                  ) -> dict[str, list[tuple[Market, list[Selection]]]]:
    """Canonical market key (:func:`feed.taxonomy.market_key` with the
    market's sport) → [(market, its selections in that group)], for markets
    with a canonical type; markets with per-selection lines are split by
    line; ``reversed_of(m)``: ``m``'s event names the sides the other way
    round from the canonical event (see :func:`turned`)."""
    out: dict[str, list[tuple[Market, list[Selection]]]] = {}
    for m in markets:
        t = m.market_type
        if t is None:
            continue
        if reversed_of is not None and reversed_of(m):
            specs, selections = turned(m)
        else:
            specs, selections = m.specifiers or {}, m.selections
        if t in LINE_TYPES and "line" not in specs:
            per: dict[str, list[Selection]] = {}
            for sel in selections:
                ln = _line_of(m, sel)
                if ln is not None:
                    per.setdefault(ln, []).append(sel)
            for ln, sels in per.items():
                out.setdefault(market_key(t, {**specs, "line": ln}, m.sport), []).append((m, sels))
            continue
        out.setdefault(market_key(t, specs, m.sport), []).append((m, list(selections)))
    return out


def start_disagrees(state: NodeState, m: Market) -> bool:
    """Market ``m`` starts more than ``ODDSFEED_MATCH_TOLERANCE_MS`` away from its canonical
    event (its anchor's start): a link that no longer fits — a rescheduled or wrongly linked
    fixture, a return match — must not lend its prices to this event. Unknown either way: False
    (a fuzzy link needs both start times, feed.matching)."""
    if m.start_time is None or not state.canon:
        return False
    cid = state.canonical_of(m)
    summary = state.canon.get(cid) if cid is not None else None
    start = summary.start_time if summary is not None else None
    return start is not None and abs(m.start_time - start) > state.settings.match_tolerance_ms


def _exclusion(m: Market, sel: Selection, stale: bool, price: float | None, start_off: bool = False) -> str | None:
    if m.status in CLOSED_STATUSES or sel.status in _SETTLED_SEL:
        return "closed"
    if start_off:
        return "start_time"
    if stale:
        return "stale"
    if m.status in _SUSPENDED or sel.status == "SUSPENDED":
        return "suspended"
    if price is None:
        return "no_price"
    return None


def _better(a: BestPrice | None, price: float, age: int, book: str, lower: bool) -> bool:
    if a is None:
        return True
    if price != a.price:
        return price < a.price if lower else price > a.price
    return (age, book) < (a.age_ms, a.bookmaker)


def key_specifiers(key: str) -> dict[str, str]:
    """The specifiers a canonical market key names: a raw market's all, a mapped market's key
    specifiers; ``{}`` when a provider's value holds a separator (the key still names the group)."""
    try:
        return parse_market_key(key)[1]
    except ValueError:
        return {}


def market_views(state: NodeState, markets: Iterable[Market], now: int, *, method: str = "multiplicative",
                 keys: set[str] | None = None) -> list[MarketView]:
    """The aggregated markets (see the module docstring), ordered by key;
    ``keys``: only these canonical market keys (or types)."""
    views: list[MarketView] = []
    ages: dict[str, tuple[int, bool]] = {}
    for key, members in sorted(group_markets(markets, state.reversed_of).items()):
        mtype = key_type(key)
        if keys is not None and key not in keys and mtype not in keys:
            continue
        first = members[0][0]
        specs = key_specifiers(key)
        outcomes: dict[str, OutcomeView] = {}
        per_book: dict[str, dict[str, float]] = {}  # usable back prices per book and outcome
        excluded_books: dict[str, str] = {}
        partial: set[str] = set()  # books with some outcome excluded
        for m, sels in members:
            if m.market_id not in ages:
                ages[m.market_id] = state.age_stale(m, now)
            age, stale = ages[m.market_id]
            start_off = start_disagrees(state, m)
            book = m.bookmaker or m.source
            usable: dict[str, float] = {}
            reasons = set()
            for sel in sels:
                if sel.outcome is None:
                    continue
                price, size = (sel.back[0] if sel.back else (sel.price, None))
                lay, lay_size = (sel.lay[0] if sel.lay else (None, None))
                why = _exclusion(m, sel, stale, price, start_off)
                ov = outcomes.get(sel.outcome)
                if ov is None:
                    ov = outcomes[sel.outcome] = OutcomeView(outcome=sel.outcome, name=sel.name)
                ov.books.append(BookPrice(bookmaker=book, source=m.source, market_id=m.market_id,
                                          selection_id=sel.selection_id, price=price, size=size, lay=lay,
                                          lay_size=lay_size, age_ms=age, stale=stale, status=sel.status,
                                          excluded=why))
                if why is not None:
                    reasons.add(why)
                    continue
                assert price is not None  # no_price is an exclusion
                usable[sel.outcome] = price
                if _better(ov.best, price, age, book, lower=False):
                    ov.best = BestPrice(price=price, bookmaker=book, market_id=m.market_id,
                                        selection_id=sel.selection_id, age_ms=age, size=size)
                if lay is not None and _better(ov.best_lay, lay, age, book, lower=True):
                    ov.best_lay = BestPrice(price=lay, bookmaker=book, market_id=m.market_id,
                                            selection_id=sel.selection_id, age_ms=age, size=lay_size)
            if usable:
                per_book.setdefault(book, {}).update(usable)
                if reasons:
                    partial.add(book)
            elif reasons:
                excluded_books[book] = sorted(reasons)[0]
        view = MarketView(market=key, market_type=mtype, specifiers=specs, name=first.name,
                          excluded_books=excluded_books)
        _fair(view, outcomes, per_book, partial, mtype, method)
        order = MARKET_TYPES.get(mtype) or ()
        view.outcomes = sorted(outcomes.values(), key=lambda o: (order.index(o.outcome) if o.outcome in order
                                                                 else len(order), o.outcome))
        for ov in view.outcomes:
            ov.books.sort(key=lambda b: (b.excluded is not None, -(b.price or 0.0), b.bookmaker))
        views.append(view)
    return views


def _fair(view: MarketView, outcomes: dict[str, OutcomeView], per_book: dict[str, dict[str, float]],
          partial: set[str], mtype: str, method: str) -> None:
    if is_unmapped(mtype) or mtype in ("place", "correct_score") or (mtype not in MARKET_TYPES
                                                                     and not mtype.startswith("player_")):
        return
    fixed = MARKET_TYPES.get(mtype)
    need: set[str] | None = set(fixed) if fixed else None
    if mtype.startswith("player_"):
        need = {"over", "under"}
    sums: dict[str, float] = {}
    books: list[str] = []
    for book, prices in sorted(per_book.items()):
        if need is None:  # win: the runners this book prices (every one of its runners usable)
            if len(prices) < 2 or book in partial:
                continue
            wanted = sorted(prices)
        else:
            if not need <= set(prices):
                continue
            wanted = sorted(need)
        probs = devig([prices[o] for o in wanted], method)
        view.margins[book] = round(sum(1.0 / prices[o] for o in wanted) - 1.0, 4)
        books.append(book)
        for o, p in zip(wanted, probs):
            sums[o] = sums.get(o, 0.0) + p
    if not books:
        return
    if need is None:  # win: average over the books that price each runner
        counts: dict[str, int] = {}
        for book in books:
            for o in per_book[book]:
                counts[o] = counts.get(o, 0) + 1
        for o, total in sums.items():
            if o in outcomes:
                outcomes[o].fair = round(counts[o] / total, 3)
    else:
        for o, total in sums.items():
            if o in outcomes and total > 0:
                outcomes[o].fair = round(len(books) / total, 3)
    view.fair_method = method
    view.fair_books = books


def event_facts(state: NodeState, canonical_id: str, markets: Sequence[Market]) -> dict[str, Any]:
    """``event_name``, ``sport``, ``competition``, ``start_time`` (ms) and
    ``in_play`` of a canonical event: the linker's summary where it has
    them, else the first of its markets (by id) that does — one answer for
    REST, the aggregated view and the ``view=best`` stream."""
    summary = state.canon.get(canonical_id)
    ms = sorted(markets, key=lambda m: m.market_id)

    def pick(attr: str) -> Any:
        v = getattr(summary, attr if attr != "event_name" else "name") if summary is not None else None
        return v if v is not None and v != "" else next((getattr(m, attr) for m in ms if getattr(m, attr)), None)

    starts = [m.start_time for m in ms if m.start_time is not None]
    start = summary.start_time if summary is not None and summary.start_time is not None else min(starts, default=None)
    return {"event_name": pick("event_name"), "sport": pick("sport"), "competition": pick("competition"),
            "start_time": start, "in_play": any(m.in_play for m in ms)}


def event_view(state: NodeState, canonical_id: str, now: int, *, method: str = "multiplicative",
               keys: set[str] | None = None, visible: Callable[[Market], bool] | None = None) -> EventView | None:
    """The aggregated view of ``canonical_id`` (None when no market of it is held); ``visible``:
    only the markets it passes (a tenant's books, :mod:`streaming.tenants`)."""
    ids = state.by_canonical.get(canonical_id)
    markets = [m for mid in sorted(ids) if (m := state.markets.get(mid)) is not None
               and (visible is None or visible(m))] if ids else []
    if not markets:
        return None
    summary = state.canon.get(canonical_id)
    members: dict[str, dict[str, object]] = {}
    for m in markets:
        if m.event_id is None:
            continue
        rid = record_id(m.event_id, m.sport, m.start_time)
        if rid in members:
            books = members[rid]["bookmakers"]
            assert isinstance(books, list)
            if (m.bookmaker or m.source) not in books:
                books.append(m.bookmaker or m.source)
            continue
        link = state.links.get(rid)
        members[rid] = {"event_id": rid, "source": m.source, "event_name": m.event_name,
                        "confidence": link.p if link is not None else 1.0,
                        "method": link.m if link is not None else "self", "bookmakers": [m.bookmaker or m.source]}
    facts = event_facts(state, canonical_id, markets)
    return EventView(
        event_id=canonical_id,
        name=facts["event_name"],
        sport=facts["sport"],
        competition=facts["competition"],
        start_time=facts["start_time"],
        in_play=facts["in_play"],
        home=summary.home if summary is not None else None,
        away=summary.away if summary is not None else None,
        members=sorted(members.values(), key=lambda x: str(x["event_id"])),
        bookmakers=sorted({m.bookmaker or m.source for m in markets}),
        markets=market_views(state, markets, now, method=method, keys=keys),
        as_of=now,
    )
