"""What every normaliser returns: canonical market updates, no I/O.

A normaliser is an object with ``feed(raw: bytes, recv_ms: int, pt_map=None)
-> NormalisedBatch`` (the :class:`Normaliser` protocol) that raises
:class:`feed.errors.FeedDecodeError` for a rejected message (and then has
applied nothing). Times are integer ms since the Unix epoch (UTC).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import msgspec

from feed.models import MarketHeader, Selection


class MarketUpdate(msgspec.Struct, kw_only=True, gc=False):
    """One provider change of one market, in canonical terms.

    image: True when it replaces the market (``selections`` then holds every
    selection and ``header`` the whole header). header: the market-level
    fields when any changed, else None. traded_volume: the market's total
    matched when it changed (also inside ``header`` when that is set). selections: full current state of
    each changed selection. source_ts / source_ts_original / received_at:
    latency tags in ms. conflated: the provider merged changes (Betfair
    ``con``).
    """

    market_id: str
    source: str
    image: bool
    header: MarketHeader | None
    selections: list[Selection]
    source_ts: int
    received_at: int
    source_ts_original: int | None = None
    conflated: bool = False
    traded_volume: float | None = None


class NormalisedBatch(msgspec.Struct, kw_only=True, gc=False):
    """The result of one provider message.

    op / ct / clk / initial_clk / status / segment / heartbeat_ms: the
    provider envelope (Betfair names; None where absent). pt: provider
    publish time (ms). updates: canonical market updates in message order.
    runner_changes: how many runner (selection) changes the message held.
    cursor: the source's opaque resume cursor after this message, when it
    advanced (stored with the data it covers). heartbeat: the message was a
    keep-alive. degraded: True when the provider flags its data degraded
    (Betfair ``status: 503``), False when it says it is healthy again, None
    when the message says nothing about it.
    """

    op: str
    ct: str | None = None
    clk: str | None = None
    initial_clk: str | None = None
    pt: int | None = None
    status: int | None = None
    segment: str | None = None
    heartbeat_ms: int | None = None
    updates: list[MarketUpdate] = msgspec.field(default_factory=list)
    runner_changes: int = 0
    cursor: str | None = None
    heartbeat: bool = False
    degraded: bool | None = None


class Normaliser(Protocol):
    """What every provider normaliser offers (pure: no I/O, no clock reads)."""

    source: str

    def feed(self, raw: bytes, recv_ms: int, pt_map: Callable[[int], int] | None = None) -> NormalisedBatch:
        """Decode one provider message; raise FeedDecodeError to reject it whole."""
        ...


def iso_to_ms(value: str | float | None) -> int | None:
    """ISO-8601 text (``2025-08-16T14:00:00Z``, fractions allowed) or unix
    seconds → ms since the epoch; None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value * 1000)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)
