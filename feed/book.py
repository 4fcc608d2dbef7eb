"""Per-market state machine: canonical updates → sequenced deltas.

The book holds the current canonical :class:`~feed.models.Market` of every
market an ingest process owns and turns each
:class:`~feed.normalise.base.MarketUpdate` into at most one
:class:`~feed.models.Delta`:

- **image vs delta**: an image replaces the market; a delta for a market the
  book has never seen is dropped (``no_image``) — a delta never creates a
  market;
- **only what changed**: a delta carries, per selection that changed, only
  its changed fields (:func:`feed.models.selection_change`: a ladder side
  whole when any level of it moved, absent when none did); selections equal
  to the current ones are left out; an update that changes nothing (a
  duplicate) yields no delta (``duplicate``);
- **never back in time**: an update (image or delta) whose provider time
  (``source_ts_original`` when set — a replay's own clock — else
  ``source_ts``) is older than the market's by more than
  ``reorder_tolerance_ms`` is dropped (``out_of_order``): a restarted replay
  or a second writer can never move a market back to older provider data.
  Within one stream the provider's own sequence (ESA ``clk``, push
  ``seq``/entry id) orders updates; provider times are bounded before they
  get here (``feed.validate``: at most a few seconds in the future), so a
  poisoned time cannot freeze a market;
- **closed markets**: after CLOSED/SETTLED/CANCELLED only a changed
  definition (settlement, BSP, reopening), a runner's changed definition
  fields (its result: WINNER / LOSER / VOID …, prices kept as at the close)
  or an image is applied; price traffic is dropped (``closed``);
- **seq**: per market, strictly increasing, continued from the store after a
  restart (:meth:`Book.restore`), and never back in time for a market id even
  across a prune and a restart (docs/architecture.md §69): a market new to
  the book starts above :attr:`Book.seq_floor` — the highest seq the book
  pruned, raised to the store's seq floor at restore — and when the store
  still refuses one (``FLOOR``: it was pruned at a higher seq elsewhere)
  :meth:`Book.rebase` re-images it above the store's floor;
- **confirmation session**: each market carries the upstream session that
  last imaged or updated it (``Market.session``). An unchanged image from a
  new session yields a delta that only moves ``session`` (the market is
  confirmed by the new upstream); :meth:`Book.unconfirm` clears it when an
  update of the market had to be rejected or dropped (a change of it is
  lost), and only the market's next image sets it again: later deltas do
  not repair what was lost, so the market reads stale until then.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import msgspec

from feed.models import (
    CLOSED_STATUSES, HEADER_FIELDS, Delta, Market, MarketHeader, Selection, SelectionChange, selection_change,
)
from feed.normalise.base import MarketUpdate


class _State:
    """The mutable state of one market; the Market Struct is built lazily."""

    __slots__ = ("market_id", "source", "seq", "header", "tv", "sels", "source_ts", "source_ts_original",
                 "received_at", "stored_at", "session", "market")

    def __init__(self, m: Market) -> None:
        self.market_id = m.market_id
        self.source = m.source
        self.seq = m.seq
        self.header = m.header()
        self.tv = m.traded_volume
        self.sels: dict[str, Selection] = {s.selection_id: s for s in m.selections}
        self.source_ts = m.source_ts
        self.source_ts_original = m.source_ts_original
        self.received_at = m.received_at
        self.stored_at = m.stored_at
        self.session = m.session
        self.market: Market | None = m

    @property
    def provider_ts(self) -> int:
        o = self.source_ts_original
        return self.source_ts if o is None else o

    def materialise(self) -> Market:
        m = self.market
        if m is None:
            h = self.header
            m = self.market = Market(
                market_id=self.market_id, source=self.source, seq=self.seq,
                **{f: getattr(h, f) for f in HEADER_FIELDS if f != "traded_volume"},
                traded_volume=self.tv,
                source_ts=self.source_ts, source_ts_original=self.source_ts_original,
                received_at=self.received_at, stored_at=self.stored_at, session=self.session,
                selections=list(self.sels.values()),
            )
        return m


class MarketsView(Mapping[str, Market]):
    """Read-only mapping market_id → current :class:`Market` of a book
    (each Market is built once per change, on first access)."""

    __slots__ = ("_states",)

    def __init__(self, states: dict[str, _State]) -> None:
        self._states = states

    def __getitem__(self, market_id: str) -> Market:
        return self._states[market_id].materialise()

    def __contains__(self, market_id: object) -> bool:
        return market_id in self._states

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)


class Book:
    """Canonical state of the markets one ingest process writes.

    ``markets`` is a read-only mapping market_id → Market; the book keeps
    mutable per-market state and builds a Market only when one is read
    (once per batch for the store), not at every update.

    Seq floor: a market id's seq never goes backwards, across a prune and a
    restart (clients keep a pruned market and drop what is not above it).
    A market new to the book starts at :attr:`seq_floor` + 1; the floor is
    the highest seq this book pruned (:meth:`prune_closed`), the store's
    floor given to :meth:`restore`, or one learnt from :meth:`rebase` — one
    integer, so it is never forgotten (it replaces a bounded per-market map).
    """

    def __init__(self, *, reorder_tolerance_ms: int = 0) -> None:
        self._states: dict[str, _State] = {}
        self.markets = MarketsView(self._states)
        self.reorder_tolerance_ms = reorder_tolerance_ms
        self.dropped: Counter[str] = Counter()
        #: why the last :meth:`apply` returned None (a key of ``dropped``)
        self.last_drop: str | None = None
        #: every market new to the book starts above this seq: the highest seq of a market pruned
        #: here or in the store (:meth:`prune_closed`, :meth:`restore`, :meth:`rebase`)
        self.seq_floor = 0

    def prune_closed(self, now_ms: int, retention_ms: int) -> list[tuple[str, int]]:
        """Forget the markets closed, settled or cancelled whose last change
        (``received_at``, ms since the epoch) is more than ``retention_ms`` old;
        return ``(market_id, seq)`` of each (the store drops them only at that
        seq). The book's :attr:`seq_floor` rises to their seqs: a later image
        of one (or of any market new to the book) starts above them."""
        out: list[tuple[str, int]] = []
        if retention_ms <= 0:
            return out
        limit = now_ms - retention_ms
        for mid, st in list(self._states.items()):
            if st.header.status in CLOSED_STATUSES and st.received_at < limit:
                del self._states[mid]
                out.append((mid, st.seq))
                if st.seq > self.seq_floor:
                    self.seq_floor = st.seq
        return out

    def restore(self, markets: Iterable[Market], *, seq_floor: int = 0) -> None:
        """Seed the book from stored snapshots so ``seq`` continues; a market
        new to the book starts above ``seq_floor`` (the store's:
        :meth:`feed.store.Store.seq_floor`), so one pruned before a restart is
        re-created above the seq clients may still hold."""
        for m in markets:
            self._states[m.market_id] = _State(m)
        if seq_floor > self.seq_floor:
            self.seq_floor = seq_floor

    def rebase(self, market_id: str, floor: int) -> Delta | None:
        """The store refused ``market_id`` as new at or below its partition's
        seq floor ``floor`` (it was pruned at a higher seq, and a client may
        still hold it): move the market to a seq above ``floor`` and return
        its current state as one image at that seq, to be stored in place of
        every delta of it not yet stored. Markets new to the book start above
        ``floor`` from now on. None when the book does not hold the market."""
        if floor > self.seq_floor:
            self.seq_floor = floor
        st = self._states.get(market_id)
        if st is None:
            return None
        m = msgspec.structs.replace(st.materialise(), seq=max(st.seq, floor) + 1)
        self._states[market_id] = _State(m)
        return image_delta(m)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.last_drop = reason

    def apply(self, update: MarketUpdate, stored_at: int = 0, session: str | None = None) -> Delta | None:
        """Apply one update; return the delta to store, or None if dropped
        (the reason is then in :attr:`last_drop`).

        stored_at: ms since the epoch at which the caller hands the delta to
        the store (stamped on the delta and the market). session: the
        source's current upstream session, stamped on the market.
        """
        st = self._states.get(update.market_id)
        if st is not None:
            upt = update.source_ts if update.source_ts_original is None else update.source_ts_original
            if upt + self.reorder_tolerance_ms < st.provider_ts:
                self._drop("out_of_order")
                return None
        if update.image:
            return self._image(st, update, stored_at, session)
        if st is None:
            self._drop("no_image")
            return None
        closed = st.header.status in CLOSED_STATUSES
        if closed and update.header is None and not any(
                _definition_only(st.sels.get(s.selection_id), s) != st.sels.get(s.selection_id)
                for s in update.selections):
            # After the close only a definition (settlement, BSP, reopening) or a
            # runner's result (WINNER / LOSER / VOID, sent one runner at a time by
            # some providers) is news; price traffic is not (research/reliability.md B18).
            self._drop("closed")
            return None
        header = update.header
        tv = update.traded_volume
        if header is not None and header == msgspec.structs.replace(st.header, traded_volume=header.traded_volume):
            # a resent definition: only the volume can be news
            tv = header.traded_volume
            header = None
        if header is not None or tv == st.tv:
            tv = None
        sels = st.sels
        selections: list[SelectionChange] = []
        if update.selections:
            changed = update.selections
            if closed and (header is None or header.status in CLOSED_STATUSES):
                # a definition after the close: take its runner facts, keep the
                # prices as they were at the close (never the dropped traffic)
                changed = [_definition_only(sels.get(s.selection_id), s) for s in changed]
            for s in changed:
                sid = s.selection_id
                c = selection_change(sels.get(sid), s)
                if c is not None:
                    # diffed against the running state: a selection given twice yields two
                    # changes, applied in order (apply_delta)
                    selections.append(c)
                    sels[sid] = s
        if header is None and tv is None and not selections:
            self._drop("duplicate")
            return None
        seq = st.seq + 1
        st.seq = seq
        st.source_ts = update.source_ts
        st.source_ts_original = update.source_ts_original
        st.received_at = update.received_at
        st.stored_at = stored_at
        if st.session is not None:  # an unconfirmed market waits for an image (a change of it was lost)
            st.session = session
        st.market = None
        if header is not None:
            st.header = header
            st.tv = header.traded_volume
        elif tv is not None:
            st.tv = tv
        return Delta(
            market_id=update.market_id,
            seq=seq,
            kind="delta",
            source=update.source,
            source_ts=update.source_ts,
            source_ts_original=update.source_ts_original,
            received_at=update.received_at,
            stored_at=stored_at,
            session=st.session,
            header=header,
            selections=selections,
            traded_volume=tv,
        )

    def _image(self, st: _State | None, update: MarketUpdate, stored_at: int, session: str | None) -> Delta | None:
        header = update.header or (st.header if st is not None else MarketHeader())
        seq = (st.seq if st is not None else self.seq_floor) + 1
        market = Market(
            market_id=update.market_id,
            source=update.source,
            seq=seq,
            **{f: getattr(header, f) for f in HEADER_FIELDS},
            source_ts=update.source_ts,
            source_ts_original=update.source_ts_original,
            received_at=update.received_at,
            stored_at=stored_at,
            session=session,
            selections=list(update.selections),
        )
        if st is not None and _same_content(st.materialise(), market):
            # A resent image identical to what we hold (e.g. after a resume):
            # nothing for clients to learn — but a new upstream session
            # confirms the market, and that is news for staleness.
            if st.session != session:
                return self._set_session(st, session, stored_at)
            self._drop("duplicate")
            return None
        self._states[update.market_id] = _State(market)
        return Delta(
            market_id=update.market_id,
            seq=seq,
            kind="image",
            source=update.source,
            source_ts=update.source_ts,
            source_ts_original=update.source_ts_original,
            received_at=update.received_at,
            stored_at=stored_at,
            session=session,
            market=market,
        )

    def unconfirm(self, market_id: str, stored_at: int) -> Delta | None:
        """An update of ``market_id`` was rejected or dropped: the market may
        now differ from the provider's, so its source's heartbeats must stop
        confirming it. Returns a delta without changes that clears
        ``session`` (None when the market is unknown or already unconfirmed)."""
        st = self._states.get(market_id)
        if st is None or st.session is None:
            return None
        return self._set_session(st, None, stored_at)

    def _set_session(self, st: _State, session: str | None, stored_at: int) -> Delta:
        """A delta that only moves the market's session (latency tags kept:
        nothing about its prices changed)."""
        st.seq += 1
        st.session = session
        st.stored_at = stored_at
        st.market = None
        return Delta(market_id=st.market_id, seq=st.seq, kind="delta", source=st.source, source_ts=st.source_ts,
                     source_ts_original=st.source_ts_original, received_at=st.received_at, stored_at=stored_at,
                     session=session)

    def reimage_all(self, stored_at: int) -> list[Delta]:
        """Every market as a new image (next seq): for a store that lost its data
        (:meth:`reimage` of every market the book holds)."""
        return self.reimage(list(self._states), stored_at)

    def reimage(self, market_ids: Iterable[str], stored_at: int) -> list[Delta]:
        """The markets ``market_ids`` each as a new image at its next seq, stamped
        ``stored_at`` (ms since the Unix epoch), the book moved to that seq: for a
        store that lost writes of them. Ids the book does not hold are skipped
        (never raises for one)."""
        states = self._states
        out = []
        for mid in market_ids:
            st = states.get(mid)
            if st is None:
                continue
            m = msgspec.structs.replace(st.materialise(), seq=st.seq + 1, stored_at=stored_at)
            states[mid] = _State(m)
            out.append(image_delta(m))
        return out

    def mark(self, market_id: str) -> tuple[int, str, int] | None:
        """What a store must hold of ``market_id`` to be up to date with the
        book: (seq, owning source, provider time in ms since the Unix epoch —
        ``source_ts_original`` when set, else ``source_ts``); None when the
        book does not hold it. Cheap: no Market is built."""
        st = self._states.get(market_id)
        return None if st is None else (st.seq, st.source, st.provider_ts)


def image_delta(m: Market) -> Delta:
    """``m`` as an image delta at its own seq and latency tags."""
    return Delta(market_id=m.market_id, seq=m.seq, kind="image", source=m.source, source_ts=m.source_ts,
                 received_at=m.received_at, stored_at=m.stored_at, source_ts_original=m.source_ts_original,
                 session=m.session, market=m)


_DEFINITION_FIELDS = ("name", "handicap", "status", "sort_priority", "adjustment_factor", "bsp", "outcome",
                      "void_factor", "dead_heat_factor")


def _definition_only(current: Selection | None, update: Selection) -> Selection:
    """``current`` with the definition fields of ``update`` (prices kept)."""
    if current is None:
        return msgspec.structs.replace(update, price=None, back=[], lay=[], ltp=None, traded_volume=None)
    return msgspec.structs.replace(current, **{f: getattr(update, f) for f in _DEFINITION_FIELDS})


_CONTENT_FIELDS = HEADER_FIELDS + ("selections",)


def _same_content(a: Market, b: Market) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _CONTENT_FIELDS)
