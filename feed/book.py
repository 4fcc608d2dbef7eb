"""Per-market state machine: canonical updates → sequenced deltas.

The book holds the current canonical :class:`~feed.models.Market` of every
market an ingest process owns and turns each
:class:`~feed.normalise.base.MarketUpdate` into at most one
:class:`~feed.models.Delta`:

- **image vs delta**: an image replaces the market; a delta for a market the
  book has never seen is dropped (``no_image``) — a delta never creates a
  market;
- **dedupe**: selections equal to the current ones are left out; an update
  that changes nothing (a duplicate) yields no delta (``duplicate``);
- **out of order**: an update whose ``source_ts`` is older than the
  market's by more than ``reorder_tolerance_ms`` is dropped
  (``out_of_order``); images are always applied;
- **closed markets**: after CLOSED/SETTLED/CANCELLED only a changed
  definition (settlement, BSP, reopening) or an image is applied; price
  traffic is dropped (``closed``);
- **seq**: per market, strictly increasing, continued from the store after a
  restart (:meth:`Book.restore`).

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from feed.models import CLOSED_STATUSES, HEADER_FIELDS, Delta, Market, MarketHeader, Selection, merge_selections
from feed.normalise.base import MarketUpdate


class Book:
    """Canonical state of the markets one ingest process writes."""

    def __init__(self, *, reorder_tolerance_ms: int = 0) -> None:
        self.markets: dict[str, Market] = {}
        self.reorder_tolerance_ms = reorder_tolerance_ms
        self.dropped: Counter[str] = Counter()

    def restore(self, markets: list[Market]) -> None:
        """Seed the book from stored snapshots so ``seq`` continues."""
        for m in markets:
            self.markets[m.market_id] = m

    def apply(self, update: MarketUpdate, stored_at: int = 0) -> Delta | None:
        """Apply one update; return the delta to store, or None if dropped.

        stored_at: ms since the epoch at which the caller hands the delta to
        the store (stamped on the delta and the market).
        """
        current = self.markets.get(update.market_id)
        if update.image:
            return self._image(current, update, stored_at)
        if current is None:
            self.dropped["no_image"] += 1
            return None
        closed = current.status in CLOSED_STATUSES
        if closed and update.header is None:
            # After the close only a definition (settlement, BSP, reopening)
            # is news; price traffic is not (research/reliability.md B18).
            self.dropped["closed"] += 1
            return None
        if update.source_ts + self.reorder_tolerance_ms < current.source_ts:
            self.dropped["out_of_order"] += 1
            return None
        header = update.header
        if header is not None and _header_of(current) == header:
            header = None
        tv = update.traded_volume
        if header is not None or tv == current.traded_volume:
            tv = None
        selections = []
        if update.selections:
            existing = {s.selection_id: s for s in current.selections}
            changed = update.selections
            if closed and (header is None or header.status in CLOSED_STATUSES):
                # a definition after the close: take its runner facts, keep the
                # prices as they were at the close (never the dropped traffic)
                changed = [_definition_only(existing.get(s.selection_id), s) for s in changed]
            selections = [s for s in changed if existing.get(s.selection_id) != s]
        if header is None and tv is None and not selections:
            self.dropped["duplicate"] += 1
            return None
        seq = current.seq + 1
        changes: dict[str, object] = {
            "seq": seq,
            "source_ts": update.source_ts,
            "source_ts_original": update.source_ts_original,
            "received_at": update.received_at,
            "stored_at": stored_at,
        }
        if header is not None:
            for f in HEADER_FIELDS:
                changes[f] = getattr(header, f)
        elif tv is not None:
            changes["traded_volume"] = tv
        if selections:
            changes["selections"] = merge_selections(current.selections, selections)
        self.markets[update.market_id] = msgspec.structs.replace(current, **changes)
        return Delta(
            market_id=update.market_id,
            seq=seq,
            kind="delta",
            source=update.source,
            source_ts=update.source_ts,
            source_ts_original=update.source_ts_original,
            received_at=update.received_at,
            stored_at=stored_at,
            header=header,
            selections=selections,
            traded_volume=tv,
        )

    def _image(self, current: Market | None, update: MarketUpdate, stored_at: int) -> Delta | None:
        header = update.header or (_header_of(current) if current is not None else MarketHeader())
        seq = (current.seq if current is not None else 0) + 1
        market = Market(
            market_id=update.market_id,
            source=update.source,
            seq=seq,
            **{f: getattr(header, f) for f in HEADER_FIELDS},
            source_ts=update.source_ts,
            source_ts_original=update.source_ts_original,
            received_at=update.received_at,
            stored_at=stored_at,
            selections=list(update.selections),
        )
        if current is not None and _same_content(current, market):
            # A resent image identical to what we hold (e.g. after a resume):
            # nothing for clients to learn.
            self.dropped["duplicate"] += 1
            return None
        self.markets[update.market_id] = market
        return Delta(
            market_id=update.market_id,
            seq=seq,
            kind="image",
            source=update.source,
            source_ts=update.source_ts,
            source_ts_original=update.source_ts_original,
            received_at=update.received_at,
            stored_at=stored_at,
            market=market,
        )


_DEFINITION_FIELDS = ("name", "handicap", "status", "sort_priority", "adjustment_factor", "bsp")


def _definition_only(current: Selection | None, update: Selection) -> Selection:
    """``current`` with the definition fields of ``update`` (prices kept)."""
    if current is None:
        return msgspec.structs.replace(update, price=None, back=[], lay=[], ltp=None, traded_volume=None)
    return msgspec.structs.replace(current, **{f: getattr(update, f) for f in _DEFINITION_FIELDS})


def _header_of(market: Market) -> MarketHeader:
    return market.header()


_CONTENT_FIELDS = HEADER_FIELDS + ("selections",)


def _same_content(a: Market, b: Market) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _CONTENT_FIELDS)
