"""An async Python client for the oddsfeed stream and the price check.

::

    async with OddsClient("http://127.0.0.1:8000", sport="Soccer") as odds:   # ws://… → WebSocket
        market = odds.markets["bf:1.23"]                  # a feed.models.Market, kept current
        odds.age_ms("bf:1.23"), odds.is_stale("bf:1.23")
        r = await odds.price_check("bf:1.23", "47972", "back", 2.5)

Transport: ``transport="sse"`` (``GET /v1/stream``) or ``"ws"`` (``GET
/v1/ws``); by default ``ws://``/``wss://`` URLs use the WebSocket and
``http://``/``https://`` ones SSE. The REST calls (price check, sources)
go to the same host over HTTP(S).

The book: the first ``snapshot`` replaces it, each ``delta`` is applied with
:func:`feed.models.apply_delta` (``kind: image`` replaces the market; a delta
with ``seq`` ≤ the held one is a duplicate and changes nothing; otherwise each
entry of ``selections`` carries only the fields of that selection that
changed — a ladder side whole, or absent when it did not move — and replaces
just those), and a ``removed`` message drops the market: the server sends
it for a market that leaves the filter (a change of its sport, competition,
event or canonical ``ev:`` event, market type, in play, bookmaker; a relink;
its tenant's sight), live and on a resume, with the resume token of the
change that moved it — the client need not judge the filter itself (its
local check, below, stays as a second line). Because a
delta is a change against the previous one, it is only ever applied to the
market at ``seq - 1``: hence the gap rule below.

Seq gaps (the rule every client should follow): per market, a ``kind:
"delta"`` message must carry ``seq`` = the held ``seq`` + 1. One with a
higher ``seq`` means a change was missed, and applying it would leave the
book wrong with nothing to show for it — so it is *not* applied (nor is its
resume token taken) and the client resyncs: it reconnects at once with the
token it held before the gap (the server replays what followed, ``resumed
{recovered: true}``), and if the replay gaps again before any snapshot, it
reconnects without a token and takes a fresh snapshot (which replaces the
book). Exceptions: a ``kind: "image"`` replaces the market whatever its
``seq`` (a newer one; an older image is ignored), and a ``"conflated":
true`` delta stands for several changes (it carries the latest state of
everything they changed: every field of each selection they touched), so it
may skip seqs. A delta for a market
the book does not hold is ignored (the server sends an image first).
``stats.gaps`` counts the gaps seen, ``stats.resyncs`` the resyncs they
caused (each a reconnect). After a drop the client reconnects
with jittered backoff and resumes with the last resume token (SSE
``Last-Event-ID``, WS ``"resume"``): ``resumed {recovered: true}`` → the
missed deltas follow and the book is kept; ``recovered: false`` → the fresh
snapshot that follows replaces the book. A stream silent for 3 × the
heartbeat interval counts as dropped.

Ages and staleness are recomputed locally on every call, on the local
monotonic clock (so wall-clock skew between hosts does not matter): each
market is "confirmed" when a message about it arrives (as of its receipt
minus the stream's lag, below, minus the ``age_ms`` the server reported,
which counts from ``received_at`` or the source's last message) and by
every heartbeat (as of its receipt minus the stream's lag) while its source
is not DOWN, the server has not flagged it stale and no change of it was
missed (below). ``age_ms(id)`` = now − that confirmation; ``is_stale(id)`` =
the client is not following a live stream, or its source is DOWN
(``status`` messages, and ``GET /v1/sources`` on connect), or the server
flagged it stale (in a snapshot, delta or ``status``), or a change of it
was missed, or its age exceeds ``stale_in_play_ms`` / ``stale_pre_match_ms``
(in-play: ``in_play``, or ``start_time`` reached on this host's wall clock).
Not following a live stream: from the moment the stream drops or is found
silent until a reconnect resumes it (``resumed {recovered: true}``) or a
snapshot replaces the book, and while the stream lags more than
``stale_in_play_ms`` — every market reads stale meanwhile, and ages
keep growing from the last confirmation (a reconnected stream confirms
nothing before it is resumed); likewise after a fatal error or ``close()``.

The stream's lag (``stream_lag_ms``): how late this client reads what the
server sends — a consumer slower than the feed leaves a backlog in socket
buffers that no server budget sees, and every message then arrives late.
Each ``heartbeat`` and ``snapshot`` carries the server's send time
``as_of``, each ``delta`` and ``event_state`` its ``sent_at`` (server wall
clock, ms; a ``status``'s ``as_of`` is when its news was worked out, not a
send time, and is not used). Per connection the client keeps the least
``receipt − send time`` seen (receipt on the local monotonic clock, in ms):
the clock offset between the hosts plus the least transit time. The lag of
a message is its own ``receipt − send time`` minus that least one (so a
fixed clock skew cancels out; the lag is measured against the fastest
delivery seen, typically the snapshot or resume at connect), and
``stream_lag_ms`` is the lag of the last message that carried a send time.
A heartbeat confirms as of receipt − lag, a delta or snapshot market as of
receipt − lag − ``age_ms``. The least offset starts over on every
connection (a new connection may take another path). The least offset
never forgets within a connection, so a server wall clock that steps back
(an NTP step) or runs slower than this host's monotonic clock reads as a
lag that never goes away: when :data:`LAG_RECONNECT_HEARTBEATS` (3)
heartbeats in a row arrive lagging more than ``stale_in_play_ms``, the
client drops the connection and reconnects with its resume token after the
usual backoff plus a random spread of up to :data:`LAG_RECONNECT_SPREAD_MS`
(after a server clock step every client of the node lags on the same
heartbeat: they do not all come back at once) (``stats.lag_reconnects``; the
reason is in ``stats.disconnect_reasons``). The new connection measures the offset
afresh (a clock step or drift is cured), and a real lag loses the kernel
backlog: the server resumes from its log. Every market reads stale from the
drop until the resumed stream is live again, as after any drop; and as the
offset is measured afresh on each connection, a lag past the limit takes at
least ``stale_in_play_ms`` of a connection (while the server's clock runs
forward) — with the backoff between, the reconnects cannot loop fast. This
host's own wall clock plays no part (receipts are on the monotonic clock).

A resumed stream: the deltas the server replays carry the ``sent_at`` they
were first sent with (a genuinely slow client resumes seconds behind), so
the oldest of them must not set the baseline — the lag it had would read as
none and its old price as fresh. ``resumed`` carries the server's send time
``as_of`` (stamped per resume), taken as a heartbeat's is: the first message
of the resumed stream, it sets the baseline, and a replayed delta's lag is
its real age (past ``stale_in_play_ms`` the stream is not live: every market
stale until it catches up). After a ``resumed {recovered: true}`` without
``as_of`` (an older server) the client takes no send time until the next
heartbeat, and reads the stream as not live (every market and event state
stale) until that heartbeat, whose ``as_of`` then sets the baseline and
confirms the book.

A WebSocket the client leaves of its own accord (a gap, a lag, silence,
``reconnect()``, ``close()``) is aborted, not closed with a handshake: the
server's close frame would wait behind the backlog the client no longer
reads (websockets' close timeout, 10 s), the reconnect held back meanwhile.

A missed change: a delta the client cannot read (below) is not applied;
its market reads stale — whatever later ``status`` messages say (the
server does not know the client skipped it) and however many heartbeats
follow — until a snapshot or an image (``kind: "image"``) of that market
replaces it.

Callbacks (``on_update``, ``on_event_state``) run synchronously after the
book (or ``event_states``) is updated; an exception one raises is logged
(``logger.exception``, naming the callback), counted in
``stats.callback_errors`` and otherwise ignored: the stream goes on.

A newer server: the wire types (feed.models) type their enums as closed
Literals; a value the client does not know (a market status ``PRE_OPEN``,
an event status ``HALF_TIME`` …) is kept as a plain string (the message is
decoded again with a type that admits any string there, see
``_lenient_struct``), and a message of a type it does not know is skipped
(logged once per type; its resume token is kept). A message of a known type
that does not decode even so is skipped too (a delta's market then reads
stale until a snapshot or an image of it: a missed change, above);
``stats.skipped`` counts both.
Content never drops the stream (the resumed stream would send the same
message again): only bytes that are not JSON count as a broken stream.

Event states (scores, clock, period, status; the README's "Event state"):
every ``event_state`` message updates ``event_states[event_id]`` (the
provider event id the markets carry in ``event_id``; a horse or greyhound
race's own id ``bf:<meeting>.<HHMM>`` for its race progress:
:meth:`OddsClient.state_of_market` finds either) unless it holds a
``version`` at or below the one held from the same source; a ``snapshot``
clears them (the current states of its events follow it, and after a
``resumed {recovered: true}`` too). :meth:`OddsClient.match_time_s` runs a
running clock on locally (``seconds + (now − at) / 1000``: the server sends
no message per second), :meth:`OddsClient.event_state_stale` says whether a
state is stale: the client is not following a live stream (as for markets),
or its source is DOWN, or the server's last word on it says stale — the
``stale`` of each ``event_state`` message about the event, then each
``status`` of its source (``stale_events`` lists every event of that source
whose state is stale now: one not listed is fresh again; a server that sends
no ``stale_events`` leaves the flag as it was). A market that leaves the book
(``removed``, or the local filter) takes with it the states of its event and
its race that no market left in the book refers to, and their flags: the
server sends no more of them nor lists them in ``stale_events``, so held they
would read fresh for good. So does a market that stays in the book but moves
to another event or race (a delta's ``header``, or an image): the states it
was shown with before the move. ``on_event_state`` is called
with each state taken. ``event_state`` messages carry no resume token.

The price check (:meth:`OddsClient.price_check`, :meth:`price_check_batch`)
is one POST under a total deadline (``price_check_timeout_s``); the only
retry is one resend when a kept-alive connection turns out to have been
closed by the server (the check has no side effects). Anything else — a
timeout, a 4xx/5xx — raises :class:`PriceCheckError` at once: the bet
service decides whether to try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import msgspec
import websockets
from websockets.asyncio.client import connect as ws_connect

from feed.errors import OddsfeedError
from feed.models import CLOSED_STATUSES, Delta, EventState, Market, apply_delta
from feed.taxonomy import race_event_id
from feed.sources.backoff import Backoff
from streaming.pricecheck import BatchResult, PriceCheckRequest, PriceCheckResult
from streaming.state import live_for_limits

__all__ = ["LAG_RECONNECT_HEARTBEATS", "LAG_RECONNECT_SPREAD_MS", "ClientStats", "OddsClient", "PriceCheckError", "ServedEventState", "SourceStatus", "StreamError"]

logger = logging.getLogger(__name__)

Transport = Literal["sse", "ws"]

#: Heartbeats in a row that arrive lagging more than ``stale_in_play_ms`` (``stream_lag_ms``) after
#: which the client drops the connection and reconnects with its resume token: the lag estimate's
#: least offset never forgets within a connection, so a server clock stepped back (or running slow)
#: would read as lagging until the connection happens to drop (see the module docstring).
LAG_RECONNECT_HEARTBEATS = 3

#: A lag reconnect waits, on top of its backoff, a uniformly random delay in [0, this) ms: after a
#: server clock step every client of the node sees its third lagging heartbeat on the same tick, and
#: would otherwise reconnect together (its markets read stale either way: the stream is not live).
LAG_RECONNECT_SPREAD_MS = 2000


class StreamError(OddsfeedError):
    """The server refused the stream for a reason retrying will not fix
    (bad filter, missing API key …); ``status``/``code`` say which."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class PriceCheckError(OddsfeedError):
    """A price check the server did not answer with a result: ``status``
    (HTTP, or None for a transport error/timeout), ``code`` (``error`` of
    the JSON body) and the server's ``message``; ``retry_after_s``: for a
    ``429 rate_limited`` (the tenant's price checks per second), seconds until
    a retry can pass (from the body's ``retry_after_ms``), else None."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass
class SourceStatus:
    """What the client knows about one source: state UP/DEGRADED/DOWN and the reason."""

    source: str
    state: str
    reason: str | None = None


@dataclass
class ClientStats:
    """Counters since construction. ``lag_ms``: wall-clock receipt − ``source_ts``
    of the last delta (end-to-end lag, meaningful when clocks are in sync).
    ``skipped``: messages not applied because the client cannot read them (an
    unknown ``type``, or content that does not decode even leniently).
    ``callback_errors``: exceptions raised by ``on_update`` / ``on_event_state``
    (logged; the stream goes on). ``lag_reconnects``: connections dropped because
    :data:`LAG_RECONNECT_HEARTBEATS` heartbeats in a row read lagging more than
    ``stale_in_play_ms`` (each then reconnects and resumes, as after a drop)."""

    connects: int = 0
    reconnects: int = 0
    snapshots: int = 0
    deltas: int = 0
    duplicates: int = 0
    heartbeats: int = 0
    statuses: int = 0
    event_states: int = 0
    resumed_recovered: int = 0
    resumed_lost: int = 0
    gaps: int = 0
    resyncs: int = 0
    errors: int = 0
    skipped: int = 0
    callback_errors: int = 0
    lag_reconnects: int = 0
    lag_ms: int | None = None
    last_error: str | None = None
    disconnect_reasons: list[str] = field(default_factory=list)


class ServedEventState(EventState, frozen=True, kw_only=True, gc=False):
    """An event's state as the stream serves it: :class:`feed.models.EventState`
    plus ``age_ms`` and ``stale`` at the time it was sent."""

    age_ms: int = 0
    stale: bool = False


# -- wire views (decoded once per message; unknown fields are skipped) ----------


class _Envelope(msgspec.Struct):
    type: str = ""
    sub: int | None = None
    token: str | None = None
    as_of: int | None = None
    sent_at: int | None = None
    age_ms: int | None = None
    stale: bool | None = None
    recovered: bool | None = None
    reason: str | None = None
    source: str | None = None
    source_ts: int | None = None
    state: str | None = None
    stale_markets: list[str] | None = None
    stale_events: list[str] | None = None
    code: str | None = None
    message: str | None = None
    id: int | str | None = None
    market_id: str | None = None
    conflated: bool = False
    held: list[str] | None = None


class _MarketAge(msgspec.Struct):
    market_id: str
    age_ms: int = 0
    stale: bool = False


class _SnapshotAges(msgspec.Struct):
    markets: list[_MarketAge]


class _SnapshotMarkets(msgspec.Struct):
    markets: list[Market]


class _EventStateMessage(msgspec.Struct):
    event_state: ServedEventState


class _Source(msgspec.Struct):
    source: str
    state: str = "UP"
    reason: str | None = None


class _Sources(msgspec.Struct):
    sources: list[_Source]


class _Head(msgspec.Struct):
    """What is read of a message whose envelope does not decode (a type this client does not know,
    with fields of other shapes): its type and its resume token, whatever their shapes."""

    type: Any = None
    token: Any = None


class _SnapshotRaw(msgspec.Struct):
    markets: list[msgspec.Raw]


#: Message types this client knows (others are skipped: a server newer than the client).
_KNOWN_TYPES = frozenset({"delta", "heartbeat", "snapshot", "status", "event_state", "removed", "resumed",
                          "error", "ack", "pong"})


# -- lenient decoding: a newer server's enum values ---------------------------------------------
#
# feed.models types its enums as closed Literals (MarketStatus, EventStatus, DeltaKind …), so a value
# a newer server added ("PRE_OPEN", "HALF_TIME") fails the strict decode. Such a message is decoded
# again with a lenient twin of its type: a subclass (built here, from the annotations) whose
# string-Literal fields admit any str. What it decodes *is* a Market / Delta / ServedEventState
# (isinstance holds, apply_delta and msgspec.structs.replace keep it), holding the unknown value as
# a plain string; the strict decoders stay the fast path.

_S = TypeVar("_S")


def _lenient_type(tp: Any, memo: dict[type, type]) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        args = get_args(tp)
        return str if args and all(isinstance(a, str) for a in args) else tp
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _lenient_struct(tp, memo)
    if origin is Union or origin is types.UnionType:
        args = tuple(_lenient_type(a, memo) for a in get_args(tp))
        return tp if args == get_args(tp) else Union[args]
    if origin in (list, tuple, dict, set, frozenset):
        args = tuple(a if a is Ellipsis else _lenient_type(a, memo) for a in get_args(tp))
        return tp if args == get_args(tp) else origin[args]
    return tp


def _lenient_struct(cls: type, memo: dict[type, type]) -> type:
    """``cls``, or a subclass of it whose fields (nested ones included) take any str where ``cls``
    takes a string Literal."""
    if cls in memo:
        return memo[cls]
    memo[cls] = cls  # a recursive reference decodes strictly (none in the wire types)
    overrides: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(cls):
        t = _lenient_type(f.type, memo)
        if t == f.type:
            continue
        if f.default is not msgspec.NODEFAULT:
            overrides.append((f.name, t, msgspec.field(default=f.default, name=f.encode_name)))
        elif f.default_factory is not msgspec.NODEFAULT:
            overrides.append((f.name, t, msgspec.field(default_factory=f.default_factory, name=f.encode_name)))
        else:
            overrides.append((f.name, t, msgspec.field(name=f.encode_name)))
    if overrides:
        cfg = getattr(cls, "__struct_config__")
        memo[cls] = msgspec.defstruct(cls.__name__, overrides, bases=(cls,), module=__name__, kw_only=True,
                                      frozen=cfg.frozen, gc=cfg.gc, omit_defaults=cfg.omit_defaults)
    return memo[cls]


def _lenient_decoder(cls: type[_S]) -> msgspec.json.Decoder[_S]:
    """A decoder of ``cls`` that keeps unknown enum values as plain strings."""
    return msgspec.json.Decoder(_lenient_struct(cls, {}))


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_HEAD = msgspec.json.Decoder(_Head)
_SNAP_AGES = msgspec.json.Decoder(_SnapshotAges)
_SNAP_MARKETS = msgspec.json.Decoder(_SnapshotMarkets)
_SNAP_RAW = msgspec.json.Decoder(_SnapshotRaw)
_MARKET = msgspec.json.Decoder(Market)
_MARKET_LENIENT = _lenient_decoder(Market)
_MARKET_AGE = msgspec.json.Decoder(_MarketAge)
_DELTA = msgspec.json.Decoder(Delta)
_DELTA_LENIENT = _lenient_decoder(Delta)
_EVENT_STATE = msgspec.json.Decoder(_EventStateMessage)
_EVENT_STATE_LENIENT = _lenient_decoder(_EventStateMessage)
_SOURCES = msgspec.json.Decoder(_Sources)
_RESULT = msgspec.json.Decoder(PriceCheckResult)
_BATCH = msgspec.json.Decoder(BatchResult)
_ENCODER = msgspec.json.Encoder()

#: HTTP statuses of a stream request that retrying will not fix.
_FATAL_STATUSES = frozenset({400, 401, 403, 404, 405, 422})


class _Dropped(Exception):
    """The stream ended or went silent: reconnect."""


class _SeqGap(_Dropped):
    """A market's delta skipped a ``seq``: resync (reconnect at once, see the module docstring)."""


class _Lagging(_Dropped):
    """:data:`LAG_RECONNECT_HEARTBEATS` heartbeats in a row lagged more than ``stale_in_play_ms``:
    reconnect (with the backoff) and resume, measuring the clock offset afresh."""


def _csv(v: str | Sequence[str] | None) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return ",".join(v)


def _as_set(v: str | Sequence[str] | None) -> frozenset[str] | None:
    if v is None:
        return None
    items = [x.strip() for x in (v.split(",") if isinstance(v, str) else v)]
    items = [x for x in items if x]
    return frozenset(items) if items else None


class OddsClient:
    """A live, local copy of the markets matching a filter, plus the price check.

    url: the server (``http[s]://host:port`` or ``ws[s]://host:port``; a
    path, if given, is ignored). transport: "sse" | "ws" (default by scheme).
    sport / competition / event / market: a value, a comma-separated string
    or a list; in_play: True/False/None. A market that leaves the filter is
    dropped on the server's word (``removed``: it says so for every key, a
    canonical event ``event="ev:…"`` included, live and on a resume); the book
    is also filtered locally as a second line (a delta whose market no longer
    matches drops it), except by a canonical event (several provider events,
    not in the market's JSON). heartbeat_ms: heartbeat interval asked of the server (a stream
    silent for 3× that is dropped).
    api_key: sent as ``X-API-Key``. stale_in_play_ms / stale_pre_match_ms:
    local staleness thresholds, ms (defaults match the server's; the in-play one
    applies from a market's ``start_time`` on even while ``in_play`` is false).
    reconnect_initial_s / reconnect_max_s: backoff bounds (full jitter).
    price_check_timeout_s: total deadline of one price-check call.
    on_update: called as ``on_update(market_id, market_or_None)`` after
    each change of the book (None = removed), synchronously. on_event_state:
    called as ``on_event_state(state)`` with each event state taken (a
    :class:`ServedEventState`), synchronously. Both run once the book is
    updated; an exception they raise is logged and counted
    (``stats.callback_errors``), never the end of the stream. backoff: a
    :class:`~feed.sources.backoff.Backoff` to use instead of one built from
    the reconnect bounds (tests inject a deterministic one). rng: the uniform
    ``[0, 1)`` source of a lag reconnect's spread (:data:`LAG_RECONNECT_SPREAD_MS`
    on top of the backoff; tests inject a fixed one).
    """

    def __init__(self, url: str, *, transport: Transport | None = None,
                 sport: str | Sequence[str] | None = None, competition: str | Sequence[str] | None = None,
                 event: str | Sequence[str] | None = None, market: str | Sequence[str] | None = None,
                 in_play: bool | None = None, heartbeat_ms: int = 2000, api_key: str | None = None,
                 stale_in_play_ms: int = 10_000, stale_pre_match_ms: int = 60_000,
                 reconnect_initial_s: float = 0.1, reconnect_max_s: float = 5.0,
                 price_check_timeout_s: float = 1.0, connect_timeout_s: float = 5.0,
                 on_update: Callable[[str, Market | None], None] | None = None,
                 on_event_state: Callable[[ServedEventState], None] | None = None,
                 backoff: Backoff | None = None, rng: Callable[[], float] = random.random) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https", "ws", "wss"):
            raise ValueError(f"url must start with http://, https://, ws:// or wss://, not {url!r}")
        if transport is None:
            transport = "ws" if scheme in ("ws", "wss") else "sse"
        if transport not in ("sse", "ws"):
            raise ValueError(f"transport must be 'sse' or 'ws', not {transport!r}")
        secure = scheme in ("https", "wss")
        self.transport: Transport = transport
        self.http_url = urlunsplit(("https" if secure else "http", parts.netloc, "", "", ""))
        self.ws_url = urlunsplit(("wss" if secure else "ws", parts.netloc, "/v1/ws", "", ""))
        self.filter: dict[str, Any] = {k: v for k, v in (
            ("sport", _csv(sport)), ("competition", _csv(competition)), ("event", _csv(event)),
            ("market", _csv(market)), ("in_play", in_play)) if v is not None}
        self._f_sport, self._f_comp = _as_set(sport), _as_set(competition)
        ev = _as_set(event)
        # canonical ev:… ids name several provider events (the markets carry provider ids in
        # event_id): the server filters those, not the client (as the TS client does); a market
        # that leaves such an event comes as ``removed``
        self._f_event = ev if ev is not None and not any(e.startswith("ev:") for e in ev) else None
        self._f_market = _as_set(market)
        self._f_in_play = in_play
        self.heartbeat_ms = heartbeat_ms
        self.api_key = api_key
        self.stale_in_play_ms = stale_in_play_ms
        self.stale_pre_match_ms = stale_pre_match_ms
        self.price_check_timeout_s = price_check_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.on_update = on_update
        self.on_event_state = on_event_state

        #: market_id → Market: the book, kept current.
        self.markets: dict[str, Market] = {}
        #: provider event id → its latest state (``event_state`` messages; see the module docstring).
        self.event_states: dict[str, ServedEventState] = {}
        #: source → SourceStatus (from ``GET /v1/sources`` on connect and ``status`` messages).
        self.sources: dict[str, SourceStatus] = {}
        #: the last resume token received (opaque).
        self.token: str | None = None
        self.connected = False
        self.stats = ClientStats()
        #: set once the book holds a snapshot (cleared while a dropped stream reconnects).
        self.synced = asyncio.Event()
        #: bumped after every applied message; see :meth:`wait_until`.
        self.changes = 0
        self.error: BaseException | None = None

        #: consecutive gap resyncs since the last snapshot: the second one drops the token (fresh snapshot)
        self._gap_resumes = 0
        self._gap_market: str | None = None
        self._confirmed: dict[str, float] = {}   # market_id → monotonic s of the last confirmation
        #: the book is being kept current: set by a snapshot or ``resumed {recovered: true}``, cleared
        #: when the stream drops or goes silent (every market reads stale until it is set again)
        self._live = False
        self._logged: set[str] = set()           # keys of the warnings logged once
        self._flagged: dict[str, bool] = {}      # market_id → the server said stale
        #: markets a delta of which was skipped (unreadable): stale until a snapshot or an image of
        #: them — a ``status`` (the server's stale list knows nothing of the skip) does not clear it
        self._missed: set[str] = set()
        #: this connection's least (monotonic receipt − server send time), ms: None until a message
        #: with a send time arrives; reset on every connection (see the module docstring)
        self._min_offset_ms: float | None = None
        self._lag_ms = 0.0                        # the lag of the last message with a send time
        #: heartbeats in a row (on this connection) read lagging more than ``stale_in_play_ms``
        self._lag_beats = 0
        #: a ``resumed {recovered: true}`` without ``as_of`` (an older server) came, and no heartbeat
        #: since: no send time is taken (the replay's deltas carry old ones) and the stream is not live
        self._await_beat = False
        #: event id → the server's last word on its state: the ``stale`` of an ``event_state``
        #: message, then each ``status`` of its source (``stale_events``)
        self._es_flagged: dict[str, bool] = {}
        self._backoff = backoff or Backoff(initial_s=reconnect_initial_s, max_s=reconnect_max_s)
        self._rng = rng
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._kick: asyncio.Event = asyncio.Event()
        headers = {"X-API-Key": api_key} if api_key else {}
        self._headers = headers
        self._http = httpx.AsyncClient(base_url=self.http_url, headers=headers,
                                       timeout=httpx.Timeout(price_check_timeout_s),
                                       # idle connections expire before uvicorn's 5 s keep-alive closes them
                                       limits=httpx.Limits(max_keepalive_connections=8, keepalive_expiry=4.0))

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> "OddsClient":
        await self.start()
        await self.wait_synced()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start following the stream in the background (returns at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"oddsclient-{self.transport}")

    async def close(self) -> None:
        """Stop the stream and close connections. Idempotent."""
        self._closing = True
        self._kick.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.connected = self._live = False
        await self._http.aclose()

    def reconnect(self) -> None:
        """Drop the current stream now (the client reconnects and resumes, as after a network drop)."""
        self._kick.set()

    async def wait_synced(self, timeout_s: float = 10.0) -> None:
        """Until the book holds a snapshot. Raises the stream's fatal error,
        or TimeoutError."""
        await self.wait_until(lambda c: c.synced.is_set(), timeout_s)

    async def wait_until(self, pred: Callable[["OddsClient"], bool], timeout_s: float = 10.0) -> None:
        """Until ``pred(client)`` holds (checked after every applied message).
        Raises the stream's fatal error, or TimeoutError."""
        async def run() -> None:
            async with self._changed:
                while True:
                    if self.error is not None:
                        raise self.error
                    if pred(self):
                        return
                    await self._changed.wait()
        async with asyncio.timeout(timeout_s):  # (raises TimeoutError; never drops a cancel — feed.aio)
            await run()

    # -- queries ----------------------------------------------------------------

    def age_ms(self, market_id: str) -> int | None:
        """Milliseconds since the market was last confirmed current (None if unknown)."""
        t = self._confirmed.get(market_id)
        if t is None:
            return None
        return max(0, int((time.monotonic() - t) * 1000))

    @property
    def stream_lag_ms(self) -> int:
        """How late this client reads the stream: the lag of the last message that
        carried a server send time (``as_of`` of a heartbeat or snapshot, ``sent_at``
        of a delta or event state), against the fastest delivery seen on this
        connection (see the module docstring). 0 before any such message. Past
        ``stale_in_play_ms`` for :data:`LAG_RECONNECT_HEARTBEATS` heartbeats in a row the
        client reconnects and resumes (a server clock step or drift is measured afresh)."""
        return int(self._lag_ms)

    def _following(self) -> bool:
        """Following a live stream: resumed or snapshotted on this connection, its lag
        measurable (from an older server's ``resumed`` without ``as_of``: not before the next
        heartbeat), and not lagging more than ``stale_in_play_ms`` behind the server."""
        return self._live and not self._await_beat and self._lag_ms <= self.stale_in_play_ms

    def is_stale(self, market_id: str) -> bool:
        """True when the client is not following a live stream (dropped, silent
        for 3 × the heartbeat, reconnecting and not yet resumed or re-snapshotted,
        closed, or lagging more than ``stale_in_play_ms`` behind the server:
        :attr:`stream_lag_ms`), the market's source is DOWN, the server flagged it
        stale, a change of it was missed (a delta skipped: until a snapshot or an
        image of it), or its age exceeds the in-play / pre-match threshold (unknown
        → True). The in-play threshold (``stale_in_play_ms``) applies once the market
        is in play or its ``start_time`` (ms since the epoch) is at or before this
        host's wall clock — an event that has started before its provider said so,
        as the server judges it."""
        m = self.markets.get(market_id)
        age = self.age_ms(market_id)
        if m is None or age is None or not self._following():
            return True
        src = self.sources.get(m.source)
        if src is not None and src.state == "DOWN":
            return True
        if self._flagged.get(market_id) or market_id in self._missed:
            return True
        live = live_for_limits(m, time.time_ns() // 1_000_000)  # the server's rule, on this host's clock
        return age > (self.stale_in_play_ms if live else self.stale_pre_match_ms)

    def match_time_s(self, event_id: str, now_ms: int | None = None) -> float | None:
        """The event's match time in seconds now: its clock's ``seconds``, plus
        ``(now − at) / 1000`` while the clock runs (``now_ms``: wall clock, ms
        since the epoch; default now). None without a state or a clock."""
        es = self.event_states.get(event_id)
        clock = es.clock if es is not None else None
        if clock is None:
            return None
        if not clock.running:
            return float(clock.seconds)
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        return clock.seconds + max(0, now - clock.at) / 1000

    def state_of_market(self, market_id: str) -> ServedEventState | None:
        """The state to show beside a market of the local book: its race's
        (a Betfair horse or greyhound race: ``bf:<meeting>.<HHMM>``, from the
        market's event and scheduled start, :func:`feed.taxonomy.race_event_id`)
        when there is one, else its event's; None without either."""
        m = self.markets.get(market_id)
        if m is None or m.event_id is None:
            return None
        race = race_event_id(m.event_id, m.sport, m.start_time)
        es = self.event_states.get(race) if race is not None else None
        return es if es is not None else self.event_states.get(m.event_id)

    def event_state_stale(self, event_id: str) -> bool:
        """True when the event's state is stale: the client is not following a live
        stream (see :meth:`is_stale`: a lagging stream counts as not live), its source
        is DOWN now, or the server's last word on it says stale — the ``stale`` of the
        last ``event_state`` message about it, or a later ``status`` of its source
        (listed in ``stale_events``: stale; not listed: fresh again). Unknown event → True."""
        es = self.event_states.get(event_id)
        if es is None or not self._following():
            return True
        src = self.sources.get(es.source)
        if src is not None and src.state == "DOWN":
            return True
        return self._es_flagged.get(event_id, es.stale)

    def best(self, market_id: str, selection_id: str, side: Literal["back", "lay"] = "back") -> float | None:
        """Best back (or lay) price of a selection in the local book, or None."""
        m = self.markets.get(market_id)
        sel = m.selection(selection_id) if m is not None else None
        if sel is None:
            return None
        ladder = sel.back if side == "back" else sel.lay
        if ladder:
            return ladder[0][0]
        return sel.price if side == "back" else None

    # -- price check --------------------------------------------------------------

    async def price_check(self, market_id: str, selection_id: str, side: Literal["back", "lay"], price: float, *,
                          max_age_ms: int | None = None, accept_better: bool = True,
                          version: int | None = None) -> PriceCheckResult:
        """``POST /v1/price-check``: the server's answer (accepted, reason,
        current_price, age_ms …). Raises PriceCheckError on a non-200 answer,
        a timeout (``price_check_timeout_s``) or a transport error."""
        req = PriceCheckRequest(market_id=market_id, selection_id=selection_id, side=side, price=price,
                                max_age_ms=max_age_ms, accept_better=accept_better, version=version)
        body = await self._post("/v1/price-check", _ENCODER.encode(_omit_none(req)))
        return _RESULT.decode(body)

    async def price_check_batch(self, legs: Sequence[PriceCheckRequest | Mapping[str, Any]]) -> BatchResult:
        """``POST /v1/price-check/batch``: every leg of a multiple in one call;
        ``result.accepted`` only when all legs are. Legs are
        PriceCheckRequest or dicts with the same fields."""
        out = [_omit_none(leg) if isinstance(leg, PriceCheckRequest) else dict(leg) for leg in legs]
        body = await self._post("/v1/price-check/batch", _ENCODER.encode({"legs": out}))
        return _BATCH.decode(body)

    async def _post(self, path: str, body: bytes) -> bytes:
        # A price check has no side effects, so a kept-alive connection the server closed just as we
        # reused it is retried once on a fresh one — inside the same total deadline, never more.
        headers = {"Content-Type": "application/json"}
        try:
            async with asyncio.timeout(self.price_check_timeout_s):
                try:
                    r = await self._http.post(path, content=body, headers=headers)
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                    r = await self._http.post(path, content=body, headers=headers)
        except TimeoutError:
            raise PriceCheckError(f"no answer within {self.price_check_timeout_s:.3f} s") from None
        except httpx.HTTPError as exc:
            raise PriceCheckError(f"price check failed: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            code = message = None
            retry_after_s: float | None = None
            with contextlib.suppress(Exception):
                j = r.json()
                code, message = j.get("error"), j.get("message")
                if isinstance(j.get("retry_after_ms"), int):
                    retry_after_s = j["retry_after_ms"] / 1000
            raise PriceCheckError(f"{r.status_code} {code}: {message or r.text[:200]}", status=r.status_code,
                                  code=code, retry_after_s=retry_after_s)
        return r.content

    # -- stream -------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            self._kick.clear()
            reason = "stream ended"
            gap = lagging = False
            conn = asyncio.create_task(self._connect_once(), name="oddsclient-stream")
            kick = asyncio.create_task(self._kick.wait(), name="oddsclient-kick")
            try:
                done, _ = await asyncio.wait({conn, kick}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                kick.cancel()
                if not conn.done():
                    conn.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await conn
            if conn not in done:
                reason = "reconnect requested"
            else:
                try:
                    conn.result()
                except StreamError as exc:
                    logger.error("oddsclient: %s", exc)
                    self.connected = self._live = False
                    self.error = exc
                    self.stats.last_error = str(exc)
                    await self._notify()
                    return
                except _SeqGap as exc:
                    reason = str(exc)
                    gap = True
                except _Lagging as exc:
                    reason = str(exc)
                    lagging = True
                except _Dropped as exc:
                    reason = str(exc)
                except TimeoutError:
                    reason = f"no message for {self._silence_s():.1f} s"
                except (httpx.HTTPError, websockets.exceptions.WebSocketException, OSError,
                        msgspec.DecodeError, EOFError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
            self.connected = self._live = False  # every market reads stale until resumed / a snapshot
            if self._closing:
                return
            self.synced.clear()
            await self._notify()
            self.stats.reconnects += 1
            self.stats.last_error = reason
            if len(self.stats.disconnect_reasons) < 100:
                self.stats.disconnect_reasons.append(reason)
            if gap:
                self.stats.resyncs += 1
                self._gap_resumes += 1
                if self._gap_resumes > 1:  # resuming did not fill it: start again from a snapshot
                    self.token = None
                logger.warning("oddsclient: %s; resyncing %s", reason,
                               "with the resume token" if self.token else "from a fresh snapshot")
                if self._gap_resumes <= 2:
                    continue  # at once: the stream itself is fine
                # gaps even after a fresh snapshot: the server is in trouble, back off
            delay = self._backoff.next_delay()
            if lagging:  # spread: after a server clock step every client lags on the same heartbeat
                delay += self._rng() * LAG_RECONNECT_SPREAD_MS / 1000
            logger.info("oddsclient: stream dropped (%s); reconnecting in %.2f s", reason, delay)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        await self._refresh_sources()
        self.stats.connects += 1
        # a new connection: its clock offset and lag are measured afresh (another path, maybe another node)
        self._min_offset_ms = None
        self._lag_ms = 0.0
        self._lag_beats = 0
        self._await_beat = False
        if self.transport == "sse":
            await self._run_sse()
        else:
            await self._run_ws()

    def _silence_s(self) -> float:
        return 3 * self.heartbeat_ms / 1000 + 1.0

    async def _refresh_sources(self) -> None:
        """Best effort: the sources' current state (status messages only announce changes)."""
        try:
            r = await self._http.get("/v1/sources", timeout=self.connect_timeout_s)
            if r.status_code == 200:
                for s in _SOURCES.decode(r.content).sources:
                    self.sources[s.source] = SourceStatus(s.source, s.state, s.reason)
        except (httpx.HTTPError, msgspec.DecodeError, OSError):
            pass

    async def _run_sse(self) -> None:
        q = {k: ("true" if v is True else "false" if v is False else v) for k, v in self.filter.items()}
        q["heartbeat_ms"] = str(self.heartbeat_ms)
        headers = {"Accept": "text/event-stream", **self._headers}
        if self.token:
            headers["Last-Event-ID"] = self.token
        timeout = httpx.Timeout(self.connect_timeout_s, read=None)
        async with httpx.AsyncClient(timeout=timeout) as http:
            async with http.stream("GET", f"{self.http_url}/v1/stream?{urlencode(q)}", headers=headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:500]
                    code = None
                    with contextlib.suppress(Exception):
                        code = json.loads(text).get("error")
                    msg = f"GET /v1/stream answered {resp.status_code}: {text}"
                    if resp.status_code in _FATAL_STATUSES:
                        raise StreamError(msg, status=resp.status_code, code=code)
                    raise _Dropped(msg)
                self.connected = True
                await self._notify()
                buf = b""
                loop = asyncio.get_running_loop()
                silence = self._silence_s()
                async with asyncio.timeout(silence) as deadline:
                    async for chunk in resp.aiter_raw():
                        deadline.reschedule(loop.time() + silence)
                        buf += chunk
                        if b"\n\n" not in buf and b"\r\n\r\n" not in buf:
                            continue
                        if b"\r" in buf:
                            buf = buf.replace(b"\r\n", b"\n")
                        *events, buf = buf.split(b"\n\n")
                        now = time.monotonic()
                        for ev in events:
                            data, eid = self._parse_sse(ev)
                            if data is not None:
                                self._on_message(data, now, eid)
                                self._check_lag()
                        await self._notify()
                raise _Dropped("server closed the stream")

    @staticmethod
    def _parse_sse(raw: bytes) -> tuple[bytes | None, str | None]:
        data: list[bytes] = []
        eid: str | None = None
        for line in raw.split(b"\n"):
            if not line or line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"id":
                eid = value.decode()
        return (b"\n".join(data) if data else None), eid

    async def _run_ws(self) -> None:
        url = f"{self.ws_url}?heartbeat_ms={self.heartbeat_ms}"
        headers = self._headers or None
        try:
            ws = await ws_connect(url, additional_headers=headers, open_timeout=self.connect_timeout_s,
                                  max_size=None, ping_interval=20, ping_timeout=20)
        except websockets.exceptions.InvalidStatus as exc:
            status = exc.response.status_code
            if status in _FATAL_STATUSES:
                raise StreamError(f"GET /v1/ws answered {status}", status=status) from exc
            raise
        async with ws:
            try:
                sub: dict[str, Any] = {"op": "subscribe", "id": 1, "filter": self.filter}
                if self.token:
                    sub["resume"] = self.token
                await ws.send(json.dumps(sub))
                self.connected = True
                await self._notify()
                loop = asyncio.get_running_loop()
                silence = self._silence_s()
                with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                    async with asyncio.timeout(silence) as deadline:
                        async for raw in ws:
                            deadline.reschedule(loop.time() + silence)
                            data = raw.encode() if isinstance(raw, str) else raw
                            self._on_message(data, time.monotonic(), None)
                            self._check_lag()
                            await self._notify()
            except BaseException:
                # the client leaves of its own accord (a gap, a lag, silence, a fatal error,
                # reconnect(), close()): the TCP connection is aborted. A closing handshake would
                # wait for the server's close frame — behind the backlog this client no longer
                # reads, or never (a silent peer) — for websockets' close_timeout (10 s), the
                # client still `connected` and its reconnect held back
                ws.transport.abort()
                raise
            rcvd = ws.protocol.close_rcvd
            why = f"{rcvd.code} {rcvd.reason}".strip() if rcvd is not None else "no close frame"
            if rcvd is not None and rcvd.code == 1008 and "api key" in rcvd.reason:
                raise StreamError(f"websocket closed: {why}", code="unauthorized")
            raise _Dropped(f"websocket closed ({why})")

    async def _notify(self) -> None:
        self.changes += 1
        async with self._changed:
            self._changed.notify_all()

    # -- messages -------------------------------------------------------------------
    #
    # Content never drops the stream: a resumed stream would send the same message again and the
    # client would reconnect forever. Unknown enum values are kept as strings (lenient decoding), a
    # message of an unknown type is skipped, and one that does not decode even leniently is skipped
    # too (a delta's market then reads stale, see _skip). Only bytes that are not JSON at all count
    # as a broken stream (msgspec.DecodeError: reconnect).

    def _on_message(self, data: bytes, now: float, sse_id: str | None) -> None:
        try:
            env = _ENVELOPE.decode(data)
        except msgspec.ValidationError as exc:  # JSON, but its fields are not what the envelope says
            self._on_unknown(data, sse_id, str(exc))
            return
        t = env.type
        if t not in _KNOWN_TYPES:
            self._on_unknown(data, sse_id, None)
            return
        token = sse_id if sse_id is not None else env.token
        if t in ("delta", "event_state"):
            now -= self._note_sent(env.sent_at, now) / 1000  # as of: receipt − the stream's lag
        elif t in ("heartbeat", "snapshot", "resumed"):
            if t != "resumed" or env.as_of is not None:
                # a heartbeat or a snapshot is a send time again; so is a resumed stream's first
                # message when the server stamps it (its replayed deltas keep their old sent_at)
                self._await_beat = False
            elif env.recovered:  # (an older server) no baseline before the first heartbeat: not live
                self._await_beat = True
            now -= self._note_sent(env.as_of, now) / 1000
        try:
            if t == "delta":
                self._on_delta(data, env, now)  # raises _SeqGap before the token moves past the gap
            elif t == "heartbeat":
                self.stats.heartbeats += 1
                if env.as_of is not None and self._lag_ms > self.stale_in_play_ms:
                    self._lag_beats += 1  # (a message read within the limit starts the count over)
                self._on_heartbeat(now, env.held)
            elif t == "snapshot":
                self._on_snapshot(data, env, now)
            elif t == "status":
                self._on_status(env)
            elif t == "event_state":
                self._on_event_state(data)
            elif t == "removed":  # it left what the subscription sees: its filter, a relink, the tenant's sight
                self._forget(env.market_id)
            elif t == "resumed":
                if env.recovered:
                    self.stats.resumed_recovered += 1
                    self._live = True
                    self.synced.set()  # the book is kept; the missed deltas follow
                else:
                    self.stats.resumed_lost += 1  # the snapshot that follows replaces the book
            elif t == "error":
                self.stats.errors += 1
                if env.id == 1 and env.code == "bad_request":
                    raise StreamError(f"subscribe refused: {env.message}", code=env.code)
                logger.warning("oddsclient: server error %s: %s", env.code, env.message)
            # ack, pong: nothing to do
        except msgspec.ValidationError as exc:
            self._skip(t, str(exc), env.market_id if t == "delta" else None)
            return  # nor is its token taken
        if token is not None:
            self.token = token

    def _note_sent(self, sent_ms: int | None, now: float) -> float:
        """The lag (ms) of a message the server sent at ``sent_ms`` (its wall clock) and this client
        received at ``now`` (monotonic s): ``now − sent`` minus the least such difference seen on
        this connection (the hosts' clock offset cancels out). A message without a send time (an
        older server) leaves the lag as it was; so does every message between a ``resumed`` without
        ``as_of`` and the next heartbeat (``_await_beat``: a replayed delta's ``sent_at`` is when it
        was first sent, and as the baseline it would read the lag it had as none)."""
        if sent_ms is None or self._await_beat:
            return self._lag_ms
        off = now * 1000 - sent_ms
        if self._min_offset_ms is None or off < self._min_offset_ms:
            self._min_offset_ms = off
        self._lag_ms = off - self._min_offset_ms
        if self._lag_ms <= self.stale_in_play_ms:
            self._lag_beats = 0
        return self._lag_ms

    def _check_lag(self) -> None:
        """After each message of the stream: :data:`LAG_RECONNECT_HEARTBEATS` heartbeats in a row
        lagging more than ``stale_in_play_ms`` drop the connection (raises _Lagging: ``_run``
        reconnects after the backoff and resumes with the token; every market reads stale until the
        resumed stream is live). The new connection measures the clock offset afresh."""
        if self._lag_beats >= LAG_RECONNECT_HEARTBEATS:
            self.stats.lag_reconnects += 1
            raise _Lagging(f"stream lagging {self._lag_ms / 1000:.1f} s behind the server for "
                           f"{self._lag_beats} heartbeats in a row (past stale_in_play_ms)")

    def _on_unknown(self, data: bytes, sse_id: str | None, why: str | None) -> None:
        """A message this client cannot read as one it knows: skipped (logged once per type); its
        resume token is kept (the position after it: a resume need not replay what would be skipped
        again). A known type whose envelope fields have other shapes is a malformed message (_skip)."""
        try:
            head = _HEAD.decode(data)
        except msgspec.ValidationError as exc:  # not even an object
            self._skip("?", str(exc), None)
            return
        t = head.type if isinstance(head.type, str) else repr(head.type)
        if t in _KNOWN_TYPES:
            self._skip(t, why or "malformed", None)
            return
        self.stats.skipped += 1
        self._log_once(f"type:{t}", logging.WARNING,
                       "oddsclient: skipping messages of type %r, which this client does not know", t)
        token = sse_id if sse_id is not None else head.token
        if isinstance(token, str):
            self.token = token

    def _skip(self, t: str, why: str, market_id: str | None) -> None:
        """A message of a known type that does not decode even leniently: not applied, its token not
        taken. A delta's market (when held) reads stale until a snapshot or an image of it replaces
        it: the client knows it missed a change of it (``_missed``: no ``status`` clears that, the
        server knows nothing of the skip; no heartbeat confirms it)."""
        self.stats.skipped += 1
        if market_id is not None and market_id in self.markets:
            self._missed.add(market_id)
        self._log_once(f"bad:{t}:{why}", logging.WARNING,
                       "oddsclient: skipping a %s message this client cannot read: %s", t, why)

    def _log_once(self, key: str, level: int, msg: str, *args: object) -> None:
        if key in self._logged or len(self._logged) >= 1000:
            return
        self._logged.add(key)
        logger.log(level, msg, *args)

    def _decode(self, strict: msgspec.json.Decoder[_S], lenient: msgspec.json.Decoder[_S], data: bytes,
                what: str) -> _S:
        """``data`` decoded strictly or, failing that, leniently (unknown enum values kept as strings;
        logged once per value and place). Raises msgspec.ValidationError when even that fails."""
        try:
            return strict.decode(data)
        except msgspec.ValidationError as exc:
            out = lenient.decode(data)
            self._log_once(f"lenient:{what}:{exc}", logging.INFO,
                           "oddsclient: a %s carries a value this client does not know (%s): kept as a string",
                           what, exc)
            return out

    def _callback(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        """Call a user callback: an exception it raises is logged and counted, never the stream's
        end (the book is updated before any callback runs)."""
        try:
            fn(*args)
        except Exception:
            self.stats.callback_errors += 1
            logger.exception("oddsclient: the %s callback raised; the book is updated and the stream goes on",
                             name)

    def _snapshot_markets(self, data: bytes) -> tuple[list[Market], dict[str, _MarketAge]]:
        try:
            markets = _SNAP_MARKETS.decode(data).markets
            return markets, {a.market_id: a for a in _SNAP_AGES.decode(data).markets}
        except msgspec.ValidationError:
            pass
        # market by market: unknown enum values kept, a market that cannot be read left out (logged)
        out: list[Market] = []
        ages: dict[str, _MarketAge] = {}
        for raw in _SNAP_RAW.decode(data).markets:
            try:
                m = self._decode(_MARKET, _MARKET_LENIENT, raw, "snapshot market")
            except msgspec.ValidationError as exc:
                self.stats.skipped += 1
                self._log_once(f"bad:snapshot:{exc}", logging.WARNING,
                               "oddsclient: leaving out a snapshot market this client cannot read: %s", exc)
                continue
            out.append(m)
            with contextlib.suppress(msgspec.ValidationError):
                ages[m.market_id] = _MARKET_AGE.decode(raw)
        return out, ages

    def _on_snapshot(self, data: bytes, env: _Envelope, now: float) -> None:
        markets, ages = self._snapshot_markets(data)
        old = self.markets
        self.markets = {}
        self._confirmed.clear()
        self._flagged.clear()
        self._missed.clear()
        # a fresh snapshot starts over (after a wiped store, versions restart): the current states follow it
        self.event_states.clear()
        self._es_flagged.clear()
        for m in markets:
            a = ages.get(m.market_id)
            self.markets[m.market_id] = m
            self._confirmed[m.market_id] = now - (a.age_ms if a else 0) / 1000
            self._flagged[m.market_id] = bool(a and a.stale)
        self.stats.snapshots += 1
        self._gap_resumes = 0
        self._live = True
        self.synced.set()
        self._backoff.reset()
        if self.on_update is not None:
            for mid in old.keys() - self.markets.keys():
                self._callback("on_update", self.on_update, mid, None)
            for mid, m in self.markets.items():
                self._callback("on_update", self.on_update, mid, m)

    def _on_delta(self, data: bytes, env: _Envelope, now: float) -> None:
        """Apply one delta message (the seq rules are in the module docstring). Raises _SeqGap."""
        d = self._decode(_DELTA, _DELTA_LENIENT, data, "delta")
        mid = d.market_id
        cur = self.markets.get(mid)
        if cur is not None:
            if d.seq <= cur.seq:
                self.stats.duplicates += 1
                return
            if d.seq != cur.seq + 1 and d.kind != "image" and not env.conflated:
                self.stats.gaps += 1
                self._gap_market = mid
                raise _SeqGap(f"seq gap on market {mid}: held {cur.seq}, got {d.seq}")
            if self._gap_resumes and mid == self._gap_market:
                self._gap_resumes = 0  # the gapped market flows in order again after the resume
        new = apply_delta(cur, d)
        if new is None:
            return  # a delta for a market we never saw: the server sends an image first
        self.stats.deltas += 1
        self.stats.lag_ms = max(0, time.time_ns() // 1_000_000 - d.source_ts)
        if not self._matches(new):  # (a second line: the server sends ``removed``, not this delta)
            self._forget(mid)
            return
        self.markets[mid] = new
        self._confirmed[mid] = now - (env.age_ms or 0) / 1000
        self._flagged[mid] = bool(env.stale)
        if d.kind == "image":
            self._missed.discard(mid)  # the whole market again: nothing of it is missing any more
        if cur is not None and (d.header is not None or d.kind == "image") and _state_keys(cur) != _state_keys(new):
            # it moved to another event (or race) and stays in the book: the states it was shown
            # with may have no market left, and the server sends no more of them
            self._drop_orphan_states(cur)
        if self.on_update is not None:
            self._callback("on_update", self.on_update, mid, new)

    def _on_event_state(self, data: bytes) -> None:
        """Take an event state unless one with a higher or equal version from the same source is held."""
        es = self._decode(_EVENT_STATE, _EVENT_STATE_LENIENT, data, "event_state").event_state
        held = self.event_states.get(es.event_id)
        # its ``stale`` is the server's word as of sending, even on a state already held (resent
        # after a resume) — only the same source's state is skipped, so the flag is about the held one
        self._es_flagged[es.event_id] = es.stale
        if held is not None and held.version >= es.version and held.source == es.source:
            return
        self.event_states[es.event_id] = es
        self.stats.event_states += 1
        if self.on_event_state is not None:
            self._callback("on_event_state", self.on_event_state, es)

    def _forget(self, mid: str | None) -> None:
        """Drop market ``mid`` from the book (``on_update(mid, None)`` when it was held), and the
        states of its events no market left in the book refers to (:meth:`_drop_orphan_states`)."""
        if mid is None:
            return
        cur = self.markets.pop(mid, None)
        self._confirmed.pop(mid, None)
        self._flagged.pop(mid, None)
        self._missed.discard(mid)
        if cur is not None:
            self._drop_orphan_states(cur)
        if self.on_update is not None and cur is not None:
            self._callback("on_update", self.on_update, mid, None)

    def _drop_orphan_states(self, gone: Market) -> None:
        """A market left the book (or moved to another event or race: ``gone`` is it as it was
        before): drop the event states it was shown with — its event's
        (``event_id``) and its race's (:func:`feed.taxonomy.race_event_id`), as
        :meth:`state_of_market` looks them up — and their stale flags, unless a market left in the
        book refers to them. The server sends an event's state (and lists it in a ``status``'s
        ``stale_events``) only to a subscription holding one of its markets: a state kept after
        its last market would never be updated nor flagged again, and read fresh for good."""
        eid = gone.event_id
        if eid is None:
            return
        rid = race_event_id(eid, gone.sport, gone.start_time)
        keys = {k for k in (eid, rid) if k is not None and (k in self.event_states or k in self._es_flagged)}
        if not keys:
            return
        for m in self.markets.values():
            if m.event_id != eid:  # (a market refers to its event's state and to its race's: same event_id)
                continue
            keys.discard(eid)
            if rid is not None and rid in keys and race_event_id(eid, m.sport, m.start_time) == rid:
                keys.discard(rid)
            if not keys:
                return
        for k in keys:
            self.event_states.pop(k, None)
            self._es_flagged.pop(k, None)

    def _on_heartbeat(self, now: float, held: list[str] | None = None) -> None:
        if not self._live:
            return  # a reconnected stream not yet resumed confirms nothing
        down = {s for s, st in self.sources.items() if st.state == "DOWN"}
        confirmed, flagged, missed = self._confirmed, self._flagged, self._missed
        behind = set(held) if held else ()  # (a conflation window holds their changes: not vouched for)
        for mid, m in self.markets.items():
            if m.source in down or flagged.get(mid) or mid in missed or mid in behind:
                continue
            if confirmed.get(mid, 0.0) < now:
                confirmed[mid] = now

    def _on_status(self, env: _Envelope) -> None:
        self.stats.statuses += 1
        if env.source is None or env.state is None:
            return
        self.sources[env.source] = SourceStatus(env.source, env.state, env.reason)
        stale = set(env.stale_markets or ())
        for mid, m in self.markets.items():
            if m.source == env.source:
                self._flagged[mid] = mid in stale
        if env.stale_events is not None:  # (a server before stale_events leaves the flags as they were)
            stale_events = set(env.stale_events)
            for eid, es in self.event_states.items():
                if es.source == env.source:
                    self._es_flagged[eid] = eid in stale_events

    def _matches(self, m: Market) -> bool:
        if self._f_market is not None and m.market_id not in self._f_market:
            return False
        if self._f_event is not None and m.event_id not in self._f_event:
            return False
        if self._f_sport is not None and m.sport not in self._f_sport:
            return False
        if self._f_comp is not None and m.competition not in self._f_comp:
            return False
        return self._f_in_play is None or m.in_play == self._f_in_play

    # -- convenience --------------------------------------------------------------

    def open_markets(self) -> list[Market]:
        """Markets open for betting (status ``OPEN``: not suspended, inactive,
        closed, settled or cancelled), by market id. See :meth:`live_markets`
        for every market not yet closed."""
        return sorted((m for m in self.markets.values() if m.status == "OPEN"), key=lambda m: m.market_id)

    def live_markets(self) -> list[Market]:
        """Markets not closed, settled or cancelled (suspended ones included), by market id."""
        return sorted((m for m in self.markets.values() if m.status not in CLOSED_STATUSES),
                      key=lambda m: m.market_id)


def _state_keys(m: Market) -> tuple[str | None, str | None]:
    """The event states a market is shown with (:meth:`OddsClient.state_of_market`): its event's
    (``event_id``) and its race's (:func:`feed.taxonomy.race_event_id`)."""
    return m.event_id, race_event_id(m.event_id, m.sport, m.start_time)


def _omit_none(req: PriceCheckRequest) -> dict[str, Any]:
    return {f: v for f in req.__struct_fields__ if (v := getattr(req, f)) is not None}

