"""``view=best`` subscriptions: only changes of the best and fair price.

A subscriber (SSE ``GET /v1/stream?view=best&event=ev:…``, WebSocket
``{"op":"subscribe","view":"best",…}``) receives, per canonical event
matching its filter, the aggregated markets of :mod:`streaming.aggregate`
— but only what a betting frontend's "best odds" column needs::

    {"type":"best","snapshot":true,"events":[{"event_id":"ev:…","event_name",…,
      "markets":[{"market":"total:line=2.5","market_type","specifiers",
                  "outcomes":[{"outcome":"over","best":{price,bookmaker,market_id,selection_id,age_ms,size},
                               "best_lay":{…}|null,"fair":2.04|null,"books":n,"excluded":{"book_b":"stale"}}],
                  "fair_method":"multiplicative"}]}],"as_of":ms}
    {"type":"best","event_id":"ev:…","markets":[<only the markets whose best / fair changed>],"as_of":ms}
    {"market":"total:line=3.5","market_type":"total","specifiers":{"line":"3.5"},"outcomes":[],"removed":true}

First a snapshot of every matching event, then a ``best`` message per
event whenever a change of any book moves a best price or where it is
(its book, market or selection), a best lay or a fair price — or a book
turns stale or suspended (it leaves the best price; the ``status``
machinery notices staleness without a delta and calls
:meth:`BestView.refresh`). Price moves that leave best and fair as they
were send nothing. A market group the subscriber was sent that leaves the
event (its last book left: a relink, a market dropped after retention, a
market of another type; or the whole event no longer matches the filter)
comes once as the third form above, ``outcomes: []`` and ``removed: true``,
in that event's ``best`` message: drop it; nothing of it follows unless it
comes back (then whole, as a changed market). A snapshot replaces
everything held (a group it does not list is gone). ``event`` filters
take canonical ids; ``sport``, ``competition``, ``in_play`` and
``market_type`` apply as on the delta stream; ``source`` and ``bookmaker`` choose the books aggregated (as
``/v1/events?view=best`` does; a tenant's filter is narrowed to its books,
:mod:`streaming.tenants`). No resume token: a reconnecting subscriber gets a new snapshot.

Prices are in the subscription's ``odds_format`` (:mod:`streaming.odds_format`): each outcome's
``best.price``, ``best_lay.price`` and ``fair`` — on every path (the snapshot, a change, the
hub's resync snapshots: all built here), converted once per format per message
(:meth:`streaming.encoding.Message.formatted`; subscribers sent the same body share it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec

from feed.taxonomy import key_type
from streaming.aggregate import MarketView, event_facts, key_specifiers, market_views
from streaming.encoding import Message
from streaming.state import Filter, NodeState, PreparedEntry, now_ms

if TYPE_CHECKING:
    from streaming.hub import Subscription

__all__ = ["BestView", "VIEWS"]

#: values of the ``view`` subscription parameter (None: the delta stream)
VIEWS = ("best",)

_ENCODER = msgspec.json.Encoder()

#: where a best (or best lay) is: (price, bookmaker, market_id, selection_id), all None without one
Where = tuple[float | None, str | None, str | None, str | None]
#: per outcome: (outcome, best, best lay, fair, excluded books sorted) — a change of any sends the market
Signature = tuple[tuple[str, Where, Where, float | None, tuple[tuple[str, str], ...]], ...]


class _BestOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    outcome: str
    name: str | None = None
    best: object = None
    best_lay: object = None
    fair: float | None = None
    books: int = 0
    excluded: dict[str, str] = {}


class _BestMarket(msgspec.Struct, kw_only=True, omit_defaults=True):
    market: str
    market_type: str
    specifiers: dict[str, str] = {}
    name: str | None = None
    outcomes: list[_BestOutcome] = []
    fair_method: str | None = None


class _RemovedMarket(msgspec.Struct, kw_only=True):
    """A market group that left the event (every field encoded: ``outcomes`` is ``[]``)."""

    market: str
    market_type: str
    specifiers: dict[str, str]
    outcomes: list[_BestOutcome]
    removed: bool = True


def _slim(v: MarketView) -> _BestMarket:
    outs = []
    for o in v.outcomes:
        excluded = {b.bookmaker: b.excluded for b in o.books if b.excluded is not None}
        outs.append(_BestOutcome(outcome=o.outcome, name=o.name, best=o.best, best_lay=o.best_lay, fair=o.fair,
                                 books=len(o.books), excluded=excluded))
    return _BestMarket(market=v.market, market_type=v.market_type, specifiers=v.specifiers, name=v.name,
                       outcomes=outs, fair_method=v.fair_method)


def _where(b: object) -> Where:
    """A best price's (price, bookmaker, market_id, selection_id): a bet is placed on that
    market and selection, so a best that moves to another market of the same book at the
    same price is a change."""
    return (getattr(b, "price", None), getattr(b, "bookmaker", None), getattr(b, "market_id", None),
            getattr(b, "selection_id", None))


def _signature(m: _BestMarket) -> Signature:
    return tuple((o.outcome, _where(o.best), _where(o.best_lay), o.fair, tuple(sorted(o.excluded.items())))
                 for o in m.outcomes)


class BestView:
    """The ``view=best`` subscriptions of one hub (see the module docstring).

    state: the node state; fair_method: the de-vig method of the fair price.
    """

    def __init__(self, state: NodeState, fair_method: str = "multiplicative") -> None:
        self.state = state
        self.fair_method = fair_method
        self.subs: set["Subscription"] = set()
        #: per subscription: canonical id -> market key -> what it was last sent of that group
        #: (a group it holds; an event with none is not listed)
        self._sent: dict["Subscription", dict[str, dict[str, Signature]]] = {}
        self.messages = 0

    # -- subscriptions ---------------------------------------------------------------------------

    def add(self, sub: "Subscription") -> None:
        """Register ``sub`` and queue its snapshot."""
        self.subs.add(sub)
        sub.conn.send(self.snapshot_message(sub), sub)

    def snapshot_message(self, sub: "Subscription") -> Message:
        """A ``best`` snapshot of every event matching ``sub``, in its odds format (what it has
        been sent starts again from here)."""
        self._sent[sub] = {}
        now = now_ms()
        events = []
        for cid in sorted(self._events_of(sub.filter)):
            body = self._event_body(sub, cid, now, only_changed=False)
            if body is not None:
                events.append(body)
        self.messages += 1
        msg = Message(b"best", _ENCODER.encode({"type": "best", "snapshot": True, "events": events, "as_of": now}))
        return msg.formatted(sub.fmt)

    def discard(self, sub: "Subscription") -> None:
        self.subs.discard(sub)
        self._sent.pop(sub, None)

    # -- changes ---------------------------------------------------------------------------------

    def on_entry(self, entry: PreparedEntry) -> None:
        """A log entry was applied: send the best changes it made."""
        touched = {pd.keys[4] for pd in entry.deltas if pd.keys[4] is not None}
        touched |= {pd.prev[4] for pd in entry.deltas if pd.prev is not None and pd.prev[4] is not None}
        if touched:
            self._send({c for c in touched if c is not None})

    def refresh(self) -> None:
        """Source health or staleness changed, the linker moved books, closed markets were
        dropped: look again at every event a subscriber matches or holds something of (an
        event that left, or left its filter, gets its groups removed)."""
        events: set[str] = set()
        for sub in self.subs:
            events |= self._events_of(sub.filter)
            events.update(self._sent.get(sub, ()))
        if events:
            self._send(events)

    def _send(self, events: Iterable[str]) -> None:
        now = now_ms()
        views: dict[tuple[str, frozenset[str] | None, frozenset[str] | None], list[_BestMarket]] = {}
        # subscribers sent the same body share its message, so its odds-format variants
        # (Message.formatted) are built once per format, not once per subscriber
        sent: dict[bytes, Message] = {}
        for sub in list(self.subs):
            if sub.conn.closed:
                continue
            f = sub.filter
            held = self._sent.get(sub, {})
            for cid in sorted(events):
                if not self._wants(f, cid):
                    if cid not in held:
                        continue
                    body = self._event_body(sub, cid, now, only_changed=True, views=[])  # it left: remove all
                else:
                    key = (cid, f.source, f.bookmaker)
                    if key not in views:
                        views[key] = self._views(cid, now, f)
                    body = self._event_body(sub, cid, now, only_changed=True, views=views[key])
                if body is not None:
                    raw = _ENCODER.encode({"type": "best", **body, "as_of": now})
                    msg = sent.get(raw)
                    if msg is None:
                        msg = sent[raw] = Message(b"best", raw)
                    sub.conn.send(msg.formatted(sub.fmt), sub)
                    self.messages += 1

    # -- internals -------------------------------------------------------------------------------

    def _views(self, cid: str, now: int, f: Filter) -> list[_BestMarket]:
        """The event's aggregated markets over the books ``f`` takes (its ``source`` /
        ``bookmaker``, as ``/v1/events?view=best``; a tenant's filter is narrowed to its books)."""
        st = self.state
        markets = [m for mid in sorted(st.by_canonical.get(cid, ())) if (m := st.markets.get(mid)) is not None
                   and (f.source is None or m.source in f.source)
                   and (f.bookmaker is None or m.bookmaker in f.bookmaker)]
        return [_slim(v) for v in market_views(st, markets, now, method=self.fair_method)]

    def _events_of(self, f: Filter) -> set[str]:
        st = self.state
        if f.event is not None:
            out = {e for e in f.event if e in st.by_canonical}
            for e in f.event:  # a provider event id: its canonical event
                for mid in st.by_event.get(e, ()):
                    m = st.markets.get(mid)
                    if m is not None and (c := st.canonical_of(m)) is not None:
                        out.add(c)
            return {c for c in out if self._wants(f, c)}
        return {c for c in st.by_canonical if self._wants(f, c)}

    def _wants(self, f: Filter, cid: str) -> bool:
        """Whether an event passes a filter: one of its markets does (the
        market_type condition is applied per market in :meth:`_event_body`)."""
        st = self.state
        g = msgspec.structs.replace(f, market_type=None, market=None)
        for mid in st.by_canonical.get(cid, ()):
            m = st.markets.get(mid)
            if m is not None and g.match(mid, st.keys_of(m)):
                return True
        return False

    def _event_body(self, sub: "Subscription", cid: str, now: int, *, only_changed: bool,
                    views: list[_BestMarket] | None = None) -> dict[str, object] | None:
        """The ``best`` body of event ``cid`` for ``sub`` (``event_id``, ``event_name``,
        ``start_time`` ms, ``in_play``, ``markets``) from ``views`` (its aggregated markets; None:
        computed now; ``[]``: it has none for ``sub``), recording what ``sub`` now holds.
        only_changed: only the markets whose signature differs from the one last sent, and
        a removal (``outcomes: []``, ``removed: true``) of each group last sent that is not
        among them any more; None when there is neither."""
        st = self.state
        if views is None:
            views = self._views(cid, now, sub.filter)
        types = sub.filter.market_type
        subs_sent = self._sent.setdefault(sub, {})
        was = subs_sent.pop(cid, {})
        sent: dict[str, Signature] = {}  # market group key → the signature last sent
        out: list[_BestMarket | _RemovedMarket] = []
        for v in views:
            if types is not None and v.market not in types and v.market_type not in types:
                continue
            sig = _signature(v)
            old = was.get(v.market)
            sent[v.market] = sig
            if only_changed and old == sig:
                continue
            out.append(v)
        if only_changed:  # the groups it holds that left the event: removed, in order with the rest
            out.extend(_RemovedMarket(market=k, market_type=key_type(k), specifiers=key_specifiers(k), outcomes=[])
                       for k in sorted(was) if k not in sent)
        if sent:
            subs_sent[cid] = sent
        if only_changed and not out:
            return None
        f = sub.filter
        ms = [m for mid in st.by_canonical.get(cid, ()) if (m := st.markets.get(mid)) is not None
              and not f.hides(st.keys_of(m))]  # a tenant's event facts come from its books only, as on REST
        facts = event_facts(st, cid, ms)
        return {"event_id": cid, "event_name": facts["event_name"], "start_time": facts["start_time"],
                "in_play": facts["in_play"],
                "markets": out}
