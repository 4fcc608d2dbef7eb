"""Price history: every applied change of a selection's top of book, kept for a window.

One Redis stream per market, ``of:{p}:h:<market_id>`` (the market's hash tag;
:func:`feed.store.history_key`). An entry is one applied delta (image or
delta) that moved the top of at least one selection; it holds, for each
selection whose top moved, a :class:`Top` — best back (price, size), best lay
(price, size), last traded price and the bookmaker ``price`` — and the
delta's provider time ``t`` (``source_ts``: a replay's times mapped onto now,
as in the snapshots), received time ``r`` and ``seq``. The entry id is the
provider time (kept non-decreasing per market), so a time range is an id
range. Entries older than ``history_retention_ms`` before the newest are
trimmed (``XADD MINID ~``) and a market's stream expires
``history_retention_ms`` after its last write.

:class:`HistoryWriter` is fed by the ingest after each successful batched
apply, with the markets the store says it applied (a dropped or foreign
market's deltas are not history). It works out the tops (it keeps the last
top of every selection it has seen) and hands the batch to a background task
that writes it in one pipelined call (one script call per partition);
batches queued meanwhile are merged into the next write. History is
best-effort, prices are not: a failing or slow history write never fails,
blocks or delays the apply — it is counted (``failures``, ``entries_lost``),
logged, and the entries are dropped; past ``queue_max_entries`` waiting
entries the oldest batch is dropped (``entries_lost``).

After an ingest restart the writer knows no tops yet: the first change of a
market that is not an image records only the fields the change carries
(the others read ``None``) unless it is the market's last change in its
batch (then the stored market gives the whole top).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping

import msgspec

from feed.errors import StoreError
from feed.models import UNSET, Delta, Market, Selection, SelectionChange
from feed.store import HistoryEntry, Store

logger = logging.getLogger(__name__)

__all__ = ["HistoryWriter", "Top", "TOPS_DECODER", "decode_tops", "top_of"]


class Top(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One selection's top of book after a change (JSON array, in this order).

    bp/bs: best back price/size; lp/ls: best lay price/size (None when the
    side is empty); ltp: last traded price; price: the offered (bookmaker)
    or best back price of :class:`feed.models.Selection`.
    """

    selection_id: str
    bp: float | None = None
    bs: float | None = None
    lp: float | None = None
    ls: float | None = None
    ltp: float | None = None
    price: float | None = None


TOPS_DECODER = msgspec.json.Decoder(list[Top])
_ENCODER = msgspec.json.Encoder()


def decode_tops(payload: bytes) -> list[Top]:
    """The tops of one history entry's ``d`` field."""
    return TOPS_DECODER.decode(payload)


def top_of(sel: Selection) -> Top:
    """The top of book of a selection."""
    b = sel.back[0] if sel.back else None
    lay = sel.lay[0] if sel.lay else None
    return Top(sel.selection_id, b[0] if b else None, b[1] if b else None,
               lay[0] if lay else None, lay[1] if lay else None, sel.ltp, sel.price)


def _changed(cur: Top | None, c: SelectionChange) -> Top:
    """``cur`` (None: unknown) with the fields ``c`` changes."""
    t = cur or Top(c.selection_id)
    bp, bs, lp, ls, ltp, price = t.bp, t.bs, t.lp, t.ls, t.ltp, t.price
    if c.back is not UNSET:
        bp, bs = (c.back[0][0], c.back[0][1]) if c.back else (None, None)
    if c.lay is not UNSET:
        lp, ls = (c.lay[0][0], c.lay[0][1]) if c.lay else (None, None)
    if c.ltp is not UNSET:
        ltp = c.ltp
    if c.price is not UNSET:
        price = c.price
    return Top(c.selection_id, bp, bs, lp, ls, ltp, price)


class HistoryWriter:
    """Writes one ingest's price history (see the module docstring).

    retention_ms: the window (0 = off: :meth:`record` does nothing).
    """

    def __init__(self, store: Store, retention_ms: int, *, queue_max_entries: int = 200_000,
                 write_timeout_s: float = 2.0) -> None:
        self.store = store
        self.retention_ms = retention_ms
        self.queue_max_entries = queue_max_entries
        self.write_timeout_s = write_timeout_s
        #: market id -> (seq of the last change seen, selection id -> top)
        self._tops: dict[str, tuple[int, dict[str, Top]]] = {}
        self._queue: deque[dict[str, list[HistoryEntry]]] = deque()
        self._queued = 0
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._logged_at = 0.0
        #: history entries written / lost (a failed write or a full queue); failed writes
        self.written = 0
        self.entries_lost = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return self.retention_ms > 0

    def entries_for(self, deltas: Iterable[Delta], markets: Mapping[str, Market],
                    applied: set[str]) -> dict[str, list[HistoryEntry]]:
        """The history entries of ``deltas`` (in order) of the markets in
        ``applied``; updates the writer's tops. Pure CPU, no I/O."""
        out: dict[str, list[HistoryEntry]] = {}
        tops_by_market = self._tops
        encode = _ENCODER.encode
        for d in deltas:
            mid = d.market_id
            if mid not in applied:
                continue
            held = tops_by_market.get(mid)
            if held is not None and d.seq <= held[0]:
                continue  # already recorded (a retried, partly applied batch)
            tops = held[1] if held is not None else None
            moved: list[Top] = []
            if d.kind == "image" and d.market is not None:
                new: dict[str, Top] = {}
                for sel in d.market.selections:
                    t = new[sel.selection_id] = top_of(sel)
                    if tops is None or tops.get(sel.selection_id) != t:
                        moved.append(t)
                tops = new
            elif d.selections:
                if tops is None:
                    m = markets.get(mid)
                    if m is not None and m.seq == d.seq:  # the stored market is this change's result
                        tops = {s.selection_id: top_of(s) for s in m.selections}
                        moved = [tops[c.selection_id] for c in d.selections if c.selection_id in tops]
                        tops_by_market[mid] = (d.seq, tops)
                        if moved:
                            out.setdefault(mid, []).append((d.source_ts, d.received_at, d.seq, encode(moved)))
                        continue
                    tops = {}
                for c in d.selections:
                    cur = tops.get(c.selection_id)
                    t = _changed(cur, c)
                    if t != cur:
                        tops[c.selection_id] = t
                        moved.append(t)
            elif tops is None:
                tops = {}
            tops_by_market[mid] = (d.seq, tops)
            if moved:
                out.setdefault(mid, []).append((d.source_ts, d.received_at, d.seq, encode(moved)))
        if len(tops_by_market) > 2 * len(markets) + 1000:  # forget markets the book dropped
            for mid in [m for m in tops_by_market if m not in markets]:
                del tops_by_market[mid]
        return out

    def record(self, deltas: Iterable[Delta], markets: Mapping[str, Market], applied: set[str]) -> int:
        """Queue the history of one successful apply (see :meth:`entries_for`)
        for the background writer; returns the entries queued. Never raises,
        never waits."""
        if not self.enabled or not applied:
            return 0
        try:
            batch = self.entries_for(deltas, markets, applied)
        except Exception:  # a bug here must not touch the apply path
            logger.exception("price history: could not work out the entries of a batch")
            self.failures += 1
            return 0
        n = sum(len(v) for v in batch.values())
        if not n:
            return 0
        self._queue.append(batch)
        self._queued += n
        while self._queued > self.queue_max_entries and len(self._queue) > 1:
            old = self._queue.popleft()
            lost = sum(len(v) for v in old.values())
            self._queued -= lost
            self.entries_lost += lost
            self._complain(f"history write queue over {self.queue_max_entries} entries: dropped {lost}")
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="price-history")
        return n

    async def _run(self) -> None:
        try:
            while self._queue:
                merged: dict[str, list[HistoryEntry]] = {}
                while self._queue:
                    for mid, rows in self._queue.popleft().items():
                        merged.setdefault(mid, []).extend(rows)
                n = self._queued
                self._queued = 0
                try:
                    async with asyncio.timeout(self.write_timeout_s):
                        self.written += await self.store.write_history(merged, self.retention_ms)
                except (StoreError, TimeoutError, OSError) as exc:
                    self.failures += 1
                    self.entries_lost += n
                    self.last_error = str(exc) or type(exc).__name__
                    self._complain(f"history write failed ({self.last_error}): {n} entries dropped "
                                   f"(prices are stored; {self.failures} failures so far)")
        finally:
            if not self._queue:
                self._idle.set()

    def _complain(self, message: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= 10.0:  # at most one warning per 10 s
            self._logged_at = now
            logger.warning("price history: %s", message)

    async def idle(self, timeout_s: float = 5.0) -> bool:
        """Wait (at most ``timeout_s``) until every queued entry is written or
        dropped; True when it is."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
