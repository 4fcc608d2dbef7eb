"""Render-and-diff for bookmaker feeds (Pinnacle, The Odds API, …).

Bookmaker providers describe each market whole (a Pinnacle period, an Odds
API bookmaker market) rather than as exchange-style ladder deltas. Their
normalisers *render* the provider state into canonical markets and hand
each rendering to a :class:`MarketDiffer`, which remembers what it emitted
last and turns the rendering into at most one
:class:`~feed.normalise.base.MarketUpdate`:

- first sight of a market → an image;
- afterwards → a delta carrying the header when any market-level field
  changed and the selections whose state changed; nothing when nothing did;
- :meth:`MarketDiffer.suspend` → the market's header with status SUSPENDED
  and a reason (a market the provider stopped offering), prices kept.

``source_ts`` never goes backwards for a market (the book drops older
updates as out of order). Also here: the small helpers both normalisers
share (ISO times, display names, line formatting, price conversion to
``FeedDecodeError("invalid_price")``). Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import msgspec

from feed.errors import FeedDecodeError
from feed.models import Market, MarketHeader, Selection, SelectionStatus
from feed.normalise.base import MarketUpdate, iso_to_ms
from feed.odds import PriceError, to_decimal

__all__ = [
    "MarketDiffer",
    "Rendered",
    "display_name",
    "fmt_line",
    "iso_to_ms",
    "make_selection",
    "price_to_decimal",
]

_CONTROL = re.compile("[\u0000-\u001f\u007f-\u009f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
NAME_MAX = 200


def display_name(text: str | None) -> str | None:
    """A provider display name made safe: NFC, no control / zero-width /
    bidi-override characters, trimmed, at most 200 characters."""
    if text is None:
        return None
    clean = _CONTROL.sub("", unicodedata.normalize("NFC", text)).strip()
    return clean[:NAME_MAX] or None


def fmt_line(x: float) -> str:
    """A handicap / total as it appears in ids and specifiers: ``-0.25``,
    ``2.5``, ``-1``, ``0`` (never ``-0``)."""
    if x == 0:
        return "0"
    return f"{x:g}"


def price_to_decimal(value: object, odds_format: str, where: str, raw: bytes) -> float:
    """A provider price in ``odds_format`` → validated decimal, or
    ``FeedDecodeError("invalid_price", …)`` naming ``where``."""
    try:
        return to_decimal(value, odds_format)
    except PriceError as exc:
        raise FeedDecodeError("invalid_price", f"{exc} at {where}", raw) from None


def make_selection(selection_id: str, name: str | None, price: float | None, *, raw_price: object = None,
                   odds_format: str = "decimal", handicap: float = 0.0, max_stake: float | None = None,
                   status: SelectionStatus = "ACTIVE", outcome: str | None = None) -> Selection:
    """A bookmaker selection: ``price`` is the offered decimal price (no
    ``back``/``lay`` ladders: those are exchange depth); the provider's raw price is kept in
    ``price_raw`` when the price was converted from another format; ``outcome`` is the
    canonical outcome key (:mod:`feed.taxonomy`)."""
    price_raw = None
    if odds_format != "decimal" and raw_price is not None:
        price_raw = f"{raw_price:g}" if isinstance(raw_price, float) else str(raw_price)
    return Selection(
        selection_id=selection_id, name=name, handicap=handicap, status=status,
        price=price, max_stake=max_stake, price_raw=price_raw, outcome=outcome,
    )


class Rendered(msgspec.Struct, kw_only=True, gc=False):
    """One market as the provider currently describes it."""

    market_id: str
    header: MarketHeader
    selections: list[Selection]
    source_ts: int
    header_ts: int | None = None
    """When the header's fields last changed, if the provider says (Pinnacle:
    the period's newest change, which gave it a new lineId); a delta whose
    header changed is stamped with the later of this and ``source_ts``."""


class _Emitted:
    __slots__ = ("header", "selections", "source_ts")

    def __init__(self, header: MarketHeader, selections: list[Selection], source_ts: int) -> None:
        self.header = header
        self.selections = {s.selection_id: s for s in selections}
        self.source_ts = source_ts


class MarketDiffer:
    """What was last emitted per market, and the diff against a new rendering.

    ``source``: the source name stamped on updates.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.emitted: dict[str, _Emitted] = {}

    def __contains__(self, market_id: str) -> bool:
        return market_id in self.emitted

    def header(self, market_id: str) -> MarketHeader | None:
        e = self.emitted.get(market_id)
        return e.header if e is not None else None

    def seed(self, markets: Iterable[Market]) -> None:
        """Remember stored markets (after a restart) as emitted."""
        for m in markets:
            self.emitted[m.market_id] = _Emitted(m.header(), list(m.selections), m.source_ts)

    def forget(self, market_id: str) -> None:
        self.emitted.pop(market_id, None)

    def emit(self, r: Rendered, recv_ms: int) -> MarketUpdate | None:
        """The update turning the last emitted state into ``r`` (None: no change)."""
        prev = self.emitted.get(r.market_id)
        if prev is None:
            self.emitted[r.market_id] = _Emitted(r.header, r.selections, r.source_ts)
            return MarketUpdate(market_id=r.market_id, source=self.source, image=True, header=r.header,
                                selections=list(r.selections), source_ts=r.source_ts, received_at=recv_ms)
        header = r.header if r.header != prev.header else None
        changed = [s for s in r.selections if prev.selections.get(s.selection_id) != s]
        seen = {s.selection_id for s in r.selections}
        for sid, old in prev.selections.items():  # a selection the provider dropped: suspended, price kept
            if sid not in seen and old.status != "SUSPENDED":
                changed.append(msgspec.structs.replace(old, status="SUSPENDED"))
        if header is None and not changed:
            return None
        source_ts = max(r.source_ts, prev.source_ts)
        if header is not None and r.header_ts is not None:
            source_ts = max(source_ts, r.header_ts)
        if header is not None:
            prev.header = header
        for s in changed:
            prev.selections[s.selection_id] = s
        prev.source_ts = source_ts
        return MarketUpdate(market_id=r.market_id, source=self.source, image=False, header=header,
                            selections=changed, source_ts=source_ts, received_at=recv_ms)

    def update_header(self, market_id: str, header: MarketHeader, recv_ms: int) -> MarketUpdate | None:
        """Replace an emitted market's header (e.g. renamed teams), prices
        untouched; None when unknown or unchanged."""
        prev = self.emitted.get(market_id)
        if prev is None or prev.header == header:
            return None
        prev.header = header
        return MarketUpdate(market_id=market_id, source=self.source, image=False, header=header,
                            selections=[], source_ts=prev.source_ts, received_at=recv_ms)

    def suspend(self, market_id: str, reason: str, source_ts: int | None, recv_ms: int) -> MarketUpdate | None:
        """Mark an emitted market SUSPENDED with ``reason`` (None when it is
        unknown or already suspended for that reason). source_ts: the
        provider's time of the change, ms; None when the provider gave none
        (the market vanished from a snapshot): the market's provider time is
        then kept, so the provider's next image of it — stamped with its own,
        possibly older, time — is never refused as going back in time."""
        prev = self.emitted.get(market_id)
        if prev is None:
            return None
        h = prev.header
        if h.status == "SUSPENDED" and h.suspend_reason == reason:
            return None
        prev.header = msgspec.structs.replace(h, status="SUSPENDED", suspend_reason=reason)
        if source_ts is not None:
            prev.source_ts = max(prev.source_ts, source_ts)
        return MarketUpdate(market_id=market_id, source=self.source, image=False, header=prev.header,
                            selections=[], source_ts=prev.source_ts, received_at=recv_ms)
