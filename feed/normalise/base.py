"""What every normaliser returns: canonical market updates, no I/O.

A normaliser is an object with ``feed(raw: bytes, recv_ms: int, channel="")
-> NormalisedBatch`` and ``restore(markets, cursor)`` (the
:class:`Normaliser` protocol, one for every provider); ``feed`` raises
:class:`feed.errors.FeedDecodeError` — and nothing else, whatever the bytes —
for a message rejected whole (bad JSON, wrong envelope; it has then applied
nothing). A market (or event) of a multi-market message that fails its
checks is rejected alone: reported in ``NormalisedBatch.rejected`` (reason,
``market_id`` when known), not applied to the normaliser's cache, while the
rest of the message is returned in ``updates``. Every update a normaliser
returns satisfies :func:`feed.validate.validate_update` for its receive time
(normalisers check the same bounds before they absorb a change). Times are
integer ms since the Unix epoch (UTC).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from feed.errors import ConfigError, FeedDecodeError
from feed.models import EventState, Market, MarketHeader, Selection
from feed.validate import MAX_TIME_MS, MIN_TIME_MS


if TYPE_CHECKING:
    from feed.sources.spec import SourceSpec

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
    """The result of one provider message, in provider-neutral terms.

    op: the message's type in the provider's terms (``mcm``, ``odds``,
    ``snapshot``, ``odds_change``; for logs and tests). provider_ts: the
    provider's publish time of the message (ms), when it has one.
    updates: canonical market updates in message order. runner_changes: how
    many selection changes the message held. cursor: the source's opaque
    resume cursor after this message, when it advanced (stored with the data
    it covers; the source of the same provider reads it back). heartbeat: the
    message was a keep-alive. degraded: True when the provider flags its data
    degraded (Betfair ``status: 503``), False when it says it is healthy
    again, None when the message says nothing about it.
    """

    op: str
    provider_ts: int | None = None
    updates: list[MarketUpdate] = msgspec.field(default_factory=list)
    runner_changes: int = 0
    cursor: str | None = None
    heartbeat: bool = False
    full_image: bool = False
    """This message starts a full image of everything the subscription
    covers (ESA ``SUB_IMAGE``, a push ``snapshot``): the ingest opens a new
    upstream session, and markets the image leaves out stop being confirmed
    by the source's heartbeats."""
    degraded: bool | None = None
    rejected: list[FeedDecodeError] = msgspec.field(default_factory=list)
    """Markets (or events) of this message rejected alone, each with its
    ``market_id`` when known; the rest of the message is in ``updates``."""
    unconfirm: list[str] = msgspec.field(default_factory=list)
    """Market ids whose confirmation the provider withdrew (a UOF producer
    went down): they read stale until their next image."""
    stale: bool = False
    """The message answered older than what the normaliser already applied
    (a late poll answer, an out-of-order UOF message) and was dropped."""
    requests: list[str] = msgspec.field(default_factory=list)
    """What the normaliser asks its source to fetch (source-specific words:
    Pinnacle ``fixtures`` for odds of an unknown event)."""
    in_play: bool | None = None
    """Whether the message's scope has events in play (None: it does not
    say); pollers poll faster while it does."""
    event_states: list[EventState] = msgspec.field(default_factory=list)
    """Event states (score, clock, period, status) the message changed, one
    whole :class:`~feed.models.EventState` per event (``version`` 0: the
    ingest numbers them). A normaliser emits a state only when it differs
    from the last it emitted for that event, and never absorbs one that
    fails :func:`feed.validate.check_event_state` (reported in ``rejected``
    with its ``event_id`` instead, the rest of the message applying)."""


class Normaliser(Protocol):
    """What every provider normaliser offers (pure: no I/O, no clock reads)."""

    source: str
    max_future_skew_ms: int
    #: its messages carry the provider's publish time of a live stream (``provider_ts``): a
    #: message arriving much later than it is a backlog (see ``Ingest.max_stream_lag_ms``)
    live_provider_times: bool
    """How far ahead of receipt a provider time may be, ms (``feed.validate``);
    the ingest sets it to its own bound."""

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Decode one provider message (``channel``: what it answers, see
        :class:`feed.sources.base.Payload`); raise FeedDecodeError to reject
        it whole (having applied nothing of it)."""
        ...

    def restore(self, markets: Iterable[Market], cursor: str | None) -> None:
        """Resume after a restart: the source's stored markets (so a later
        delta applies to them, or a vanished one is suspended) and its stored
        cursor (None: the source starts from a full image)."""
        ...


#: per-event caches of a normaliser (last states, merge state) keep at most this many events
EVENT_CACHE_MAX = 20_000


def remember(cache: dict[Any, Any], key: object, value: object, cap: int = EVENT_CACHE_MAX) -> None:
    """``cache[key] = value``, the key moved to the newest end; past ``cap``
    entries the oldest half is forgotten (events long over: at worst a state
    is emitted again, which the ingest skips as saying nothing new)."""
    cache.pop(key, None)
    cache[key] = value
    if len(cache) > cap:
        for old in list(cache)[: len(cache) // 2]:
            del cache[old]


def iso_to_ms(value: str | float | None) -> int | None:
    """ISO-8601 text (``2025-08-16T14:00:00Z``, fractions and offsets allowed;
    no offset = UTC) or unix seconds (int or float) → int ms since the epoch.

    Returns None when the value is absent (None) or unreadable (text that is
    not ISO-8601, or a value of another type). A readable time outside
    1970-01-01 … 2100-01-01 UTC, or a number that is not finite (``1e308``
    seconds, NaN) raises ``FeedDecodeError("invalid_time")`` with empty
    ``raw`` (the normaliser fills in its bytes): never OverflowError.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        ms = value * 1000
        if not MIN_TIME_MS <= ms <= MAX_TIME_MS:  # also NaN and ±inf
            raise FeedDecodeError("invalid_time", f"time {value!r} (unix seconds) is not within 1970..2100")
        return int(ms)
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        ms = int(dt.timestamp() * 1000)
    except (OverflowError, ValueError):  # year 1 / 9999 with an offset
        ms = -1
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        raise FeedDecodeError("invalid_time", f"time {value[:40]!r} is not within 1970..2100")
    return ms


def odds_format_of(spec: SourceSpec) -> Literal["decimal", "american"]:
    """The ``odds_format=decimal|american`` option of a source spec (default
    decimal); ConfigError naming the valid values otherwise."""
    fmt = spec.get("odds_format", "decimal") or "decimal"
    if fmt not in ("decimal", "american"):
        raise ConfigError(f"source {spec.name}: odds_format must be decimal or american, not {fmt!r}")
    return "american" if fmt == "american" else "decimal"
