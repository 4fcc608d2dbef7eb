"""Fan-out hub: subscriptions, a filter index, conflation, per-connection outboxes.

No Starlette/ASGI imports: transports (:mod:`streaming.sse`,
:mod:`streaming.ws`) create a :class:`Connection` and subscribe it. On
oddsfeed's own server the connection owns its socket
(:mod:`streaming.sockets`, a :class:`~streaming.transport.Sink`): no task
per connection; :meth:`Hub.flush` runs once per event-loop turn in which
something was queued and writes each ready connection's outbox in one go
(one body chunk for SSE, one socket write of complete frames for
WebSocket); flow control pauses a connection (its outbox grows against the
budget below) and one timer wheel holds the send deadlines. Elsewhere a
writer task per connection waits on :meth:`Connection.wait` and writes
whatever :meth:`Connection.take` returns in one go
(:func:`streaming.transport.write_loop`).

Policy (DESIGN §6, style §3.8):

- the reader hands each applied log entry to :meth:`Hub.dispatch` once; a
  delta only visits subscriptions indexed under its market id, event id,
  competition, sport or in-play flag (each subscription is indexed under
  the most selective condition it has; one without conditions is "wild"),
  and the filter decides;
- the hub never awaits a client and never creates a task or queue per
  subscriber: it appends pre-encoded bytes (encoded once per node, per
  transport variant) to the connection's outbox and wakes its writer;
- all of one entry's matching deltas go to a subscription together; only
  the last carries the advanced resume token (SSE ``id:``, WS ``"token"``;
  earlier WS messages carry the token from before the entry), so resuming
  from the last seen token never skips a delta;
- ``conflate_ms`` per subscription: changes are gathered per market and
  sent once per window (one timer per distinct window length, not per
  subscription): a market changed once goes as is; a market changed
  several times goes as ONE delta holding its latest state of everything
  that changed (``"conflated": true``). What a window (or a slow consumer's
  collapse, below) sends is the server's word as of the send: a market changed
  once whose ``stale`` as judged now differs from the one judged when the node
  applied the change (a ``status`` may have said so meanwhile, and the client
  takes the later word) goes as that merge, built now. A change that may move a
  status — a header (the market's status: suspended, closed, settled …), a
  selection's ``status``, an image — is not held to the window's
  end: that market's gathered changes go at once, merged, with tokens that skip
  nothing still held (:meth:`Hub._flush_markets`); the window goes on for the rest;
- slow consumers, byte budget per connection (``outbox_max_bytes``) on
  queued stream data: over it, (1) the outbox is collapsed by market
  (latest state wins, ``conflated: true``; a conflation window's pending
  changes of those markets go in the merge); (2) if that does not bring it
  under half the budget, queued stream data is dropped and the writer's
  next take starts with a fresh snapshot per subscription
  (``recovered: false``, ``reason: "slow_consumer"``) built at that
  moment; (3) going over again while that snapshot is still being written
  closes the connection with an ``error`` (code ``slow_consumer``; WS close
  code 4008). Memory stays bounded (budget + one snapshot per subscription
  + a bounded amount of control messages: a client that keeps sending but
  never reads is closed the same way);
- a market that newly matches a subscription (e.g. turns in-play under
  ``in_play=true``) is sent as an ``image`` delta; one that stops matching
  it (any key moved: sport, competition, event or canonical event, market
  type, in play, bookmaker; or its tenant's sight) is sent as ``removed``
  with the tokens of the change that moved it, never that change's delta —
  the client drops it without judging the filter itself (live, from the
  replay ring and from Redis alike: :meth:`streaming.state.PreparedDelta.message_for`,
  :class:`streaming.state.ReplayedDelta`; the per-frame cost is unchanged:
  ``removed`` is built once per delta, and only for a market whose keys moved);
- heartbeats every ``heartbeat_ms`` per connection (one timer per distinct
  interval; one encoded message per tick) with ``as_of``;
- event states (scores, clock: :mod:`streaming.event_states`) go out as
  ``event_state`` messages, keyed by provider event id, to every
  subscription whose filter matches a market the node holds of that event
  (candidate groups from the same index, then the filter): live from the
  EventStates listener (encoded once per change), after each snapshot and
  recovered resume (the current states of its events), and with a market
  that newly matches. They carry no resume token. Live ones are stream data
  (they count against the budget; a collapse keeps the latest per event, in
  its place among the control messages), the ones after a snapshot or resume
  control messages (one per event). A held state that turns stale or fresh
  without a new one is told in its source's ``status`` (``stale_events``: the
  stale states among those the subscription gets, :meth:`Hub._stale_events_seen`).

Resume (:meth:`Hub.subscribe` with a token): same epoch and every position
still covered → ``resumed {recovered: true}`` then the missed deltas in log
order (from the in-memory replay ring, else from Redis ``log_range``),
deduplicated against live deltas by per-partition floors; a position this
node has not reached yet is accepted only when that entry exists in Redis
(another node is ahead), then live deltas up to it are skipped; otherwise
``resumed {recovered: false}`` and a fresh snapshot. Never a partial replay.
``resumed`` carries ``as_of``, when it was queued for that resume (a send time,
built per resume: :func:`resumed`).
The log holds each change's filter keys after it, not before: a Redis replay
takes them before from the replay's own earlier changes, or from the moves the
hub saw this node apply (:meth:`Hub.moved_at`), so a delta that moves a market
out of (or into) the filter is sent as live (``removed``, or an image); where
they cannot be known the replay sends what any holder needs
(:class:`streaming.state.ReplayedDelta`: ``removed`` to a subscription the
market does not match after the move), or, for a tenant-restricted
subscription, is not recovered. A live ``status``
carries no resume token: a control message, it is kept ahead of the deltas a
slow consumer's collapse moves after it or its resync drops.
What changes a subscription's view without a log entry is handled too (the
section "what a resume cannot replay"): a recovered resume ends with every
visible source's current ``status``; a resume from before a relink of a
canonical event it filters on, or from before (or not known to be after) a
change of its tenant's allow-lists, is not recovered. A relink sends ``removed``
to a connected subscription whose canonical event lost a market.

Reconnect storms: a replay from the ring is a :class:`SharedReplay` per
(token, filter, odds format, transport variant, subscription id) — built by
the first resume, extended with the ring's newer entries by later ones, its
frames joined into blocks queued by reference in every connection's outbox
(SSE and our WebSocket frames; the transports write them without copying).
A thousand clients resuming from one token cost one replay's bytes, not a
thousand (bounded: :data:`REPLAY_CACHE_BYTES`), and no Redis read.
Transports admit new streams through :attr:`Hub.admission`
(:class:`Admission`, :data:`ADMIT_PER_TURN` per event-loop turn), so a storm
is set up in batches between which the open streams keep flowing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set as AbstractSet
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from feed.errors import StoreError
from feed.matching import CANONICAL_PREFIX
from feed.models import Delta, whole_change
from feed.store import Store, log_key
from streaming.bestview import BestView
from streaming.encoding import (
    Message, ResumeToken, StreamId, ack_message, decode_token, delta_message, encode_token, error_message,
    event_state_message, heartbeat_message, parse_stream_id, resumed_message, snapshot_message, status_message,
)
from streaming.latency import Histogram
from streaming.state import (
    DeltaInfo, Filter, MarketKeys, Newly, NodeState, PreparedEntry, ReplayedDelta, image_of, now_ms, removed_message,
)
from streaming.timers import TimerWheel
from streaming.transport import FRAMINGS, WS_FRAMES, Framing, Sink, framing_of

if TYPE_CHECKING:
    from feed.models import EventState, Market
    from streaming.event_states import EventStates
    from streaming.tenants import Principal

__all__ = ["ADMIT_PER_TURN", "Admission", "Connection", "Hub", "ReplayBlock", "SharedReplay", "StateMeta",
           "Subscription", "SLOW_CONSUMER_CODE"]

logger = logging.getLogger(__name__)


#: Most live entries buffered for one subscription while it replays from Redis.
PENDING_MAX = 50_000
#: WebSocket close code for a slow consumer (application range, like Centrifugo's 3008).
SLOW_CONSUMER_CODE = 4008
#: Queued control messages (snapshots, acks, pongs, errors …) allowed per connection,
#: as a multiple of the byte budget, before a client that does not read is closed.
CONTROL_BUDGET_FACTOR = 16

#: Meta marker of a heartbeat frame in an outbox (dropped when the outbox is collapsed).
HEARTBEAT = ("hb",)
#: New subscriptions admitted per event-loop turn (see Admission).
ADMIT_PER_TURN = 32
#: Shared replays kept (most recently used first to stay), and their bytes in all: the node's
#: memory for a reconnect storm, whatever the number of clients (each replay ≤ the byte budget).
REPLAY_CACHE_MAX = 256
REPLAY_CACHE_BYTES = 64 << 20
#: a shared replay unused for this long is dropped (a storm lasts seconds), s
REPLAY_CACHE_IDLE_S = 30.0
#: (credential, allow-lists) pairs whose first use the hub remembers (least recently used dropped:
#: a pair seen again after that is "first seen", which only costs its resumes a snapshot)
GRANTS_MAX = 10_000
#: canonical events whose last relink the hub remembers (older ones are folded into one floor)
RELINK_MARKS_MAX = 10_000
#: filter-key moves the hub remembers for Redis replays (Hub.moved_at; the oldest are forgotten)
MOVES_MAX = 50_000
#: per source, the status messages kept for distinct filters between two announcements
STATUS_FILTERS_MAX = 1024
#: a source status worked out at a resume (not announced since the node started) is used by
#: later resumes for this long, ms (a resume storm works it out once, not once per client)
WORKED_OUT_MS = 1000


def resumed(recovered: bool, token: bytes | None = None) -> Message:
    """The ``resumed`` message of one resume, ``as_of`` now (:func:`streaming.encoding.resumed_message`)."""
    return resumed_message(recovered=recovered, token=token, as_of=now_ms())


class Subscription:
    """One filter on one connection. ``id`` is unique per connection (WS ``"sub"``).

    conflate_ms: 0 = every change, else changes are merged per market per
    window; fmt: odds format (None = decimal).
    """

    __slots__ = ("id", "conn", "filter", "conflate_ms", "fmt", "replaying", "pending", "floor", "cpending", "view",
                 "group")

    def __init__(self, id: int, conn: "Connection", f: Filter, conflate_ms: int = 0, fmt: str | None = None,
                 view: str | None = None) -> None:
        self.id = id
        self.conn = conn
        self.filter = f
        self.conflate_ms = conflate_ms
        self.fmt = fmt
        #: None: the delta stream; "best": best / fair price changes (streaming.bestview)
        self.view = view
        #: True while a Redis replay is in flight; live entries wait in ``pending``.
        self.replaying = False
        self.pending: list[PreparedEntry] | None = None
        #: per-partition positions already delivered by a replay: live entries at or below are skipped.
        self.floor: tuple[StreamId, ...] | None = None
        #: conflation: market_id → changes gathered in the current window (None = nothing pending)
        self.cpending: dict[str, Merge] | None = None
        #: the dispatch group it belongs to (None: not indexed, e.g. view=best)
        self.group: Group | None = None

    def __repr__(self) -> str:
        return f"Subscription({self.id}, {self.filter})"


class Group:
    """Subscriptions that get the same frames for every entry: same filter,
    odds format, framing, conflation window, and subscription id where the
    framing carries it. The filter index holds groups, not subscriptions:
    dispatch picks each group's messages once, builds its frames once, and
    walks its subscriptions only to append them."""

    __slots__ = ("key", "filter", "conflate_ms", "subs")

    def __init__(self, key: tuple[object, ...], f: Filter, conflate_ms: int) -> None:
        self.key = key
        self.filter = f
        self.conflate_ms = conflate_ms
        #: its subscriptions, in the order they joined
        self.subs: dict[Subscription, None] = {}

    def __repr__(self) -> str:
        return f"Group({self.filter}, {len(self.subs)} subs)"


class Merge:
    """Changes of one market gathered for one subscription.

    token_before: the resume token from before the first gathered change;
    count: messages merged; msg: the last one (sent as is when count is 1).
    """

    __slots__ = ("token_before", "sel_ids", "header", "tv", "image", "count", "msg")

    def __init__(self, token_before: bytes | None) -> None:
        self.token_before = token_before
        self.sel_ids: set[str] = set()
        self.header = False
        self.tv = False
        self.image = False
        self.count = 0
        self.msg: Message | None = None

    def add(self, msg: Message) -> None:
        info: Any = msg.info
        self.count += 1
        self.msg = msg
        if info is None or info.is_image:
            self.image = True
        else:
            self.sel_ids.update(info.sel_ids)
            if info.has_header:
                self.header = True
            if info.has_tv:
                self.tv = True

    def fold(self, later: "Merge") -> None:
        """Take in ``later``: changes of the same market gathered after this merge's (a
        conflation window's, folded into a slow consumer's collapsed queue)."""
        self.count += later.count
        if later.msg is not None:
            self.msg = later.msg
        self.sel_ids |= later.sel_ids
        self.header = self.header or later.header
        self.tv = self.tv or later.tv
        self.image = self.image or later.image

    def key(self, market_id: str) -> tuple[object, ...]:
        if self.image:
            return (market_id, True)
        return (market_id, False, frozenset(self.sel_ids), self.header, self.tv)


class Admission:
    """Paces new subscriptions (a reconnect storm): at most ``per_turn`` pass per turn of
    the event loop, the others wait for the next turns in arrival order, so the reader and
    the writers of the streams already open run between batches instead of stalling behind
    a thousand setups in one turn. ``waited``: subscriptions that had to wait."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self.used = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.waited = 0
        self._scheduled = False

    async def enter(self) -> None:
        """Return when this subscription may proceed (at once while the turn has room)."""
        if self.per_turn <= 0:
            return
        if self.used < self.per_turn and not self.waiters:
            self.used += 1
            self._schedule()
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.waited += 1
        self._schedule()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # it was let in: pass the place on
                self.used -= 1
            raise

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        self.used = 0
        while self.waiters and self.used < self.per_turn:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.used += 1
        if self.waiters or self.used:
            self._schedule()


class StateMeta:
    """Meta of a live ``event_state`` frame in an outbox: stream data (it counts
    against the byte budget), of subscription ``sid`` and provider event
    ``event_id``; collapsing a slow consumer's queue keeps only the latest
    frame per (subscription, event)."""

    __slots__ = ("sid", "event_id")

    def __init__(self, sid: int, event_id: str) -> None:
        self.sid = sid
        self.event_id = event_id


class Announced:
    """A source's status as the hub last announced it (:meth:`Hub.status`), or as worked out at a
    recovered resume for a source not announced since the node started: what a resumed
    subscription is told (:meth:`Hub.send_statuses`). ``stale``: the source's stale markets;
    ``stale_events``: its stale event states; ``msgs``: the ``status`` message per filter, built
    once (no token)."""

    __slots__ = ("state", "reason", "stale", "stale_events", "as_of", "worked_out", "msgs")

    def __init__(self, state: str, reason: str | None, stale: Iterable[str], as_of: int,
                 worked_out: bool = False, stale_events: Iterable[str] = ()) -> None:
        self.state = state
        self.reason = reason
        self.stale = frozenset(stale)
        self.stale_events = frozenset(stale_events)
        self.as_of = as_of
        #: worked out at a resume, not announced: used for :data:`WORKED_OUT_MS` only
        self.worked_out = worked_out
        self.msgs: dict[Filter, Message] = {}


class ReplayBlock:
    """Meta of an outbox item that is several replayed frames joined into one bytes object
    (shared by every connection resuming alike): ``metas`` are the frames' own metas, which
    collapsing a slow consumer's queue unpacks."""

    __slots__ = ("metas",)

    def __init__(self, metas: list[Any]) -> None:
        self.metas = metas


class SharedReplay:
    """The replay of one (token, filter, odds format, transport variant, subscription id)
    from the ring, shared by every subscription that resumes with them (a reconnect storm:
    all clients resume from about the same token).

    blocks: the frames, joined into blocks of bytes (one per extension), queued by
    reference; metas: a :class:`ReplayBlock` per block; nbytes: their size; upto: the ring's
    ``appended`` count the replay is complete up to; too_big: over the byte budget (the
    resume is not recovered); used_at: loop time of its last use. (Not the ``resumed`` message:
    each resume gets its own, stamped when it is queued — :func:`resumed`.)

    The hub keeps at most :data:`REPLAY_CACHE_MAX` of them and :data:`REPLAY_CACHE_BYTES`
    in all (least recently used dropped first), none unused for
    :data:`REPLAY_CACHE_IDLE_S`, none from before the ring was last reset.
    """

    __slots__ = ("blocks", "metas", "nbytes", "upto", "too_big", "used_at")

    def __init__(self, upto: int) -> None:
        self.blocks: list[bytes] = []
        self.metas: list[ReplayBlock] = []
        self.nbytes = 0
        self.upto = upto
        self.too_big = False
        self.used_at = 0.0


class Connection:
    """One client connection: its subscriptions and its outbox of encoded frames.

    framing: how its messages become bytes (:mod:`streaming.transport`:
    SSE events, complete WebSocket frames, or WebSocket payloads); the hub
    asks it and never looks at the transport's name.

    ``outbox`` holds frames in order and ``meta`` says what each is: None
    for a control message (snapshot, ack, pong, error, resumed, status, and
    the event states that follow a snapshot or a resume), :data:`HEARTBEAT`,
    a :class:`StateMeta` for a live event state, a :class:`ReplayBlock`, or
    ``(subscription id, message, token_before)`` for a delta (frames and
    metas may be shared by alike subscriptions: never mutated). ``outbox_bytes`` counts queued stream data (deltas, heartbeats)
    against ``max_bytes``; ``control_bytes`` counts the rest. See the module
    docstring for what happens over budget.
    """

    __slots__ = ("hub", "framing", "label", "ip", "heartbeat_ms", "max_bytes", "subs", "outbox", "meta",
                 "outbox_bytes", "control_bytes", "wakeup", "drained", "closed", "close_code", "close_reason",
                 "_next_sub", "sent_frames", "sent_bytes", "resync_pending", "snapshot_in_flight",
                 "queued_at", "writer", "in_send", "interrupted", "send_started", "deadline_missed",
                 "sink", "ready", "paused", "pause_gen", "finished", "principal", "reserved_subs", "__weakref__")

    def __init__(self, hub: "Hub", framing: Framing, *, heartbeat_ms: int, max_bytes: int, label: str = "",
                 ip: str | None = None, sink: "Sink | None" = None, principal: "Principal | None" = None) -> None:
        self.hub = hub
        #: the tenant whose limits this connection and its subscriptions count against (None: no limits)
        self.principal = principal
        #: subscriptions the principal reserved for it (an SSE stream's one) not yet made
        self.reserved_subs = 0
        self.framing = framing
        self.label = label
        self.ip = ip
        self.heartbeat_ms = heartbeat_ms
        self.max_bytes = max_bytes
        self.subs: dict[int, Subscription] = {}
        self.outbox: list[bytes] = []
        self.meta: list[Any] = []
        self.outbox_bytes = 0
        self.control_bytes = 0
        #: the socket this connection writes to directly (None: a writer task drains the outbox)
        self.sink = sink
        #: writer-task connections only (a sink connection has no task and no Event)
        self.wakeup: asyncio.Event | None = asyncio.Event() if sink is None else None
        self.drained: asyncio.Event | None = asyncio.Event() if sink is None else None
        #: sink connections: queued in the hub's flush of this loop turn / the socket is over its
        #: write buffer's high-water mark (flow control) since pause number ``pause_gen`` /
        #: the stream was ended (last frame written)
        self.ready = False
        self.paused = False
        self.pause_gen = 0
        self.finished = False
        self.closed = False
        self.close_code = 1000
        self.close_reason = ""
        self._next_sub = 0
        self.sent_frames = 0
        self.sent_bytes = 0
        #: over budget: the next take() starts with fresh snapshots; stream data is dropped until then
        self.resync_pending = False
        #: take() handed out such snapshots and the writer has not come back for more yet
        self.snapshot_in_flight = False
        #: loop time when the outbox last went from empty to non-empty (for the send-delay histogram)
        self.queued_at = 0.0
        #: the writer task, set by the transport; in_send: it is inside a write (which may block on a
        #: client that stopped reading); interrupted: the hub cancelled that write to close the client
        self.writer: asyncio.Task[Any] | None = None
        self.in_send = False
        self.interrupted = False
        #: loop time the current write started; deadline_missed: the hub's watchdog interrupted it
        self.send_started = 0.0
        self.deadline_missed = False

    # -- framing --------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The transport's name (logs, metrics)."""
        return self.framing.name

    @property
    def ws_raw(self) -> bool:
        """Frames are complete WebSocket frames (our own server), not payloads."""
        return self.framing is WS_FRAMES

    def frame(self, msg: Message, sub: Subscription | None, with_token: bool = False) -> bytes:
        """The bytes of ``msg`` on this connection's transport (with ``sub``'s id where it travels)."""
        return self.framing.frame(msg, sub.id if sub is not None else None, with_token)

    def frame_with(self, msg: Message, sub: Subscription | None, token: bytes | None) -> bytes:
        """Like :meth:`frame` with an explicit token (not cached: conflated/collapsed messages)."""
        return self.framing.frame_with(msg, sub.id if sub is not None else None, token)

    def send(self, msg: Message, sub: Subscription | None = None, with_token: bool = False) -> None:
        """Queue one control message or snapshot (ack, pong, error, resumed,
        snapshot, status), outside the stream byte budget."""
        if self.closed:
            return
        self._control(self.frame(msg, sub, with_token))

    def send_raw(self, frame: bytes) -> None:
        if not self.closed:
            self._control(frame)

    def _control(self, frame: bytes) -> None:
        if not self.outbox:
            self.queued_at = self.hub.loop_time()
        self.outbox.append(frame)
        self.meta.append(None)
        self.control_bytes += len(frame)
        if self.control_bytes > self.max_bytes * CONTROL_BUDGET_FACTOR:
            self.hub.evict(self, "more control messages queued than allowed (the client does not read)")
            return
        self._wake()

    # -- outbox ---------------------------------------------------------------

    def push(self, frames: list[bytes], metas: list[Any], nbytes: int) -> None:
        """Queue stream data and wake the writer; over budget → :meth:`Hub.overflow`."""
        if self.closed or self.resync_pending:
            return
        if not self.outbox:
            self.queued_at = self.hub.loop_time()
        self.outbox.extend(frames)
        self.meta.extend(metas)
        self.outbox_bytes += nbytes
        if self.outbox_bytes > self.max_bytes:
            self.hub.overflow(self)
        self._wake()

    def push_held(self, frames: list[bytes], metas: list[Any], nbytes: int) -> bool:
        """:meth:`push` without :meth:`Hub.overflow`: True when the connection is now over its
        budget (the caller runs the overflow once what it is queueing is all queued — a
        dispatch, after every group got the entry)."""
        if self.closed or self.resync_pending:
            return False
        if not self.outbox:
            self.queued_at = self.hub.loop_time()
        self.outbox.extend(frames)
        self.meta.extend(metas)
        self.outbox_bytes += nbytes
        self._wake()
        return self.outbox_bytes > self.max_bytes

    def push1(self, frame: bytes, meta: Any) -> None:
        """:meth:`push` of one frame (the common case)."""
        if self.closed or self.resync_pending:
            return
        if not self.outbox:
            self.queued_at = self.hub.loop_time()
        self.outbox.append(frame)
        self.meta.append(meta)
        self.outbox_bytes += len(frame)
        if self.outbox_bytes > self.max_bytes:
            self.hub.overflow(self)
        self._wake()

    def take(self) -> list[bytes]:
        """Everything queued, oldest first (the writer sends it in one go);
        after an overflow, the fresh snapshots come last: the control messages
        kept ahead of them may include an older snapshot not yet written, which
        must not land after the fresh one (the client's book would go back)."""
        self.snapshot_in_flight = False
        out = self.outbox
        if self.resync_pending and not self.closed:
            self.resync_pending = False
            self.snapshot_in_flight = True
            out = out + self.hub.resync_frames(self)
        if out:
            self.outbox = []
            self.meta = []
            self.outbox_bytes = 0
            self.control_bytes = 0
            self.sent_frames += len(out)
            self.hub.frames_out += len(out)
        if self.drained is not None:
            self.drained.set()
        elif self.sink is not None:
            self.sink.drained()
        return out

    def _wake(self) -> None:
        """Something to write (or the connection closed): wake the writer task, or queue
        this connection for the hub's flush at the end of this loop turn."""
        if self.wakeup is not None:
            self.wakeup.set()
        elif not self.ready:
            self.ready = True
            self.hub.ready(self)

    # -- flow control of a sink connection (called by its socket) ----------------------------

    def pause(self) -> None:
        """The socket's write buffer went over its high-water mark: stop writing;
        queued data accumulates against the byte budget (the slow-consumer
        ladder), and the send deadline starts (:meth:`Hub.check_deadline`)."""
        if self.paused:
            return
        self.paused = True
        self.in_send = True
        self.pause_gen += 1
        hub = self.hub
        self.send_started = hub.loop_time()
        hub.timers.call_later(hub.send_timeout_s, hub.check_deadline, (self, self.pause_gen))

    def resume(self) -> None:
        """The socket's write buffer drained below its low-water mark: write what is queued."""
        if not self.paused:
            return
        self.paused = False
        self.in_send = False
        self.snapshot_in_flight = False  # what was handed out has been written
        if self.outbox or self.closed or self.resync_pending:
            self._wake()

    def lost(self) -> None:
        """The socket is gone (reset, closed by the client): close without writing."""
        self.finished = True
        self.close(1006, "connection lost")

    async def wait(self) -> None:
        """Until there is something to write or the connection closed (the
        writer calls it after each write, so a resync snapshot handed out by
        the previous take() has been written)."""
        self.snapshot_in_flight = False
        if self.outbox or self.closed or self.resync_pending:
            return
        assert self.wakeup is not None, "a sink connection has no writer task"
        await self.wakeup.wait()
        self.wakeup.clear()

    def write_interrupted(self, what: str, timeout_s: float) -> None:
        """In the writer, after the hub interrupted a write blocked on this
        client (a missed deadline or an eviction): absorb that cancellation
        and, for a missed deadline, close with ``send_deadline``."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if self.deadline_missed:
            self.close_missed_deadline(what, timeout_s)

    def close_missed_deadline(self, what: str, timeout_s: float) -> None:
        """A write to this client has been blocked longer than ``timeout_s``: close
        with 1008 and an ``error`` {code ``send_deadline``} (``what``: "stream", "connection")."""
        self.deadline_missed = True
        self.hub.deadlines_missed += 1
        logger.warning("%s %s: write missed the %.1f s deadline; dropping the client", self.framing.name, self.label,
                       timeout_s)
        self.close(1008, "send deadline", error_message(
            "send_deadline", f"a write to this {what} took longer than {timeout_s:g} s"))

    def close(self, code: int = 1000, reason: str = "", error: Message | None = None) -> None:
        """Stop queuing; the writer flushes what is queued (after ``error``,
        if given, replaces it) and ends the connection."""
        if self.closed:
            return
        if error is not None:
            self.outbox = [self.frame(error, None)]
            self.meta = [None]
            self.outbox_bytes = 0
            self.control_bytes = len(self.outbox[0])
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        if self.drained is not None:
            self.drained.set()
        self._wake()
        self.hub.disconnect(self)

    def next_sub_id(self) -> int:
        self._next_sub += 1
        return self._next_sub

    def __repr__(self) -> str:
        return f"Connection({self.framing.name}, {self.label}, subs={len(self.subs)}, outbox={self.outbox_bytes})"


class Hub:
    """Subscriptions of every connection of this node and the fan-out of
    prepared entries to them.

    state: the node state (markets, positions, token, staleness); store:
    used for resumes older than the replay ring (None = ring only);
    outbox_max_bytes: byte budget per connection; replay_max_entries: most
    log entries one resume may read from Redis; admit_per_turn: new
    subscriptions admitted per event-loop turn (:class:`Admission`; None =
    :data:`ADMIT_PER_TURN`, 0 = no pacing).

    event_states: the node's event states (:class:`streaming.event_states.EventStates`,
    whose listener :meth:`event_states_changed` is), None = no ``event_state``
    messages.

    Counters (read by :mod:`streaming.metrics`): ``frames_out``,
    ``overflows``, ``collapses``, ``collapsed_frames``, ``slow_resyncs``,
    ``slow_closes``, ``conflated``, ``resumes`` ({outcome: n}), ``resyncs``;
    shared replays: ``replay_builds``, ``replay_extends``, ``replay_shares``;
    ``admission.waited`` (streams that waited for a later loop turn);
    ``event_state_frames`` (event_state messages queued).
    """

    def __init__(self, state: NodeState, store: Store | None, *, outbox_max_bytes: int,
                 replay_max_entries: int = 10_000, send_timeout_s: float = 5.0,
                 admit_per_turn: int | None = None, event_states: "EventStates | None" = None) -> None:
        self.state = state
        self.event_states = event_states
        self.event_state_frames = 0
        self.send_timeout_s = send_timeout_s
        self._watchdog: asyncio.Task[None] | None = None
        self.store = store
        self.outbox_max_bytes = outbox_max_bytes
        self.replay_max_entries = replay_max_entries
        self.connections: set[Connection] = set()
        self._by_market: dict[str, set[Group]] = {}
        self._by_event: dict[str, set[Group]] = {}
        self._by_competition: dict[str, set[Group]] = {}
        self._by_sport: dict[str, set[Group]] = {}
        self._by_in_play: dict[bool, set[Group]] = {True: set(), False: set()}
        self._wild: set[Group] = set()
        self._groups: dict[tuple[object, ...], Group] = {}
        self._buckets: dict[int, set[Connection]] = {}
        self._hb_tasks: dict[int, asyncio.Task[None]] = {}
        self._conflating: dict[int, set[Subscription]] = {}
        self._dirty: dict[int, set[Subscription]] = {}
        self._cf_tasks: dict[int, asyncio.Task[None]] = {}
        self.closing = False
        self.subscriptions = 0
        # counters (exported by streaming.metrics)
        self.frames_out = 0
        self.overflows = 0
        self.collapses = 0
        self.collapsed_frames = 0
        self.slow_resyncs = 0
        self.slow_closes = 0
        self.conflated = 0
        self.resyncs = 0
        self.resumes: dict[str, int] = {"recovered": 0, "not_recovered": 0}
        #: shared replays from the ring (see SharedReplay): built, extended, reused
        self._replays: dict[tuple[object, ...], SharedReplay] = {}
        self._replays_gen = -1
        self._replay_bytes = 0
        self.replay_builds = 0
        self.replay_extends = 0
        self.replay_shares = 0
        self.admission = Admission(ADMIT_PER_TURN if admit_per_turn is None else admit_per_turn)
        self.connects: dict[str, int] = {name: 0 for name in FRAMINGS}
        #: histogram of send delays (seconds: queued → written), set by the node (streaming.reader)
        self.send_delay: Histogram | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: view=best subscriptions (not in the delta index)
        self.best = BestView(state)
        #: sink connections with something to write this loop turn (see flush)
        self._ready: list[Connection] = []
        self._flush_scheduled = False
        #: deadlines, keepalive pings and close grace periods of sink connections
        self.timers = TimerWheel()
        #: send deadlines missed (sink and writer-task connections)
        self.deadlines_missed = 0
        # What a resume replays is the log; these change what a subscription sees without a log
        # entry, so the hub remembers them to answer a resume correctly (see subscribe):
        #: source → its status as last announced (sent again after a recovered resume)
        self._announced: dict[str, Announced] = {}
        #: canonical event id → the node's positions when a relink last moved a market into or out
        #: of it; older marks are folded into ``_relink_floor`` (applies to every canonical id)
        self._relinks: dict[str, tuple[StreamId, ...]] = {}
        self._relink_floor: tuple[StreamId, ...] | None = None
        #: (credential, allow-lists) → the node's positions when it first served them (see _grant_since)
        self._grants: dict[tuple[str, object], tuple[StreamId, ...]] = {}
        #: the node's positions when the tenants file last changed (:meth:`tenants_changed`)
        self._grants_changed: tuple[StreamId, ...] | None = None
        #: while set (:meth:`_overflows_held`): connections gone over budget, collapsed at the end
        self._held_overflows: dict[Connection, None] | None = None
        #: the markets whose filter keys an entry this node applied moved (:meth:`moved_at`: the
        #: log holds a change's keys after it, a Redis replay needs them before it too):
        #: (partition, entry key, market id) → its keys before, oldest first; per partition, the
        #: newest entry key of a move forgotten (past MOVES_MAX), or the position when recording began
        self._moves: OrderedDict[tuple[int, StreamId, str], MarketKeys] = OrderedDict()  # (popitem: O(1) eviction)
        self._moves_floor: list[StreamId] = [parse_stream_id(x) for x in state.positions]
        self._moves_epoch = state.epoch

    @property
    def resumes_recovered(self) -> int:
        return self.resumes["recovered"]

    @property
    def resumes_failed(self) -> int:
        return self.resumes["not_recovered"]

    def loop_time(self) -> float:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    # -- connections ----------------------------------------------------------

    def connect(self, framing: Framing | str, *, heartbeat_ms: int, label: str = "", ws_raw: bool = False,
                ip: str | None = None, sink: Sink | None = None, principal: "Principal | None" = None,
                reserved_subs: int = 0) -> Connection:
        """A new connection framed by ``framing`` (or a transport name's
        default framing, see :func:`streaming.transport.framing_of`),
        registered for heartbeats every ``heartbeat_ms``.

        sink: the socket the hub writes to directly (:class:`streaming.transport.Sink`:
        no writer task; :meth:`flush` writes each ready connection once per
        loop turn); None: the transport runs :func:`streaming.transport.write_loop`.
        principal: the tenant it counts against (:mod:`streaming.tenants`; the caller
        checked its limits), released by :meth:`disconnect`."""
        framing = framing_of(framing, ws_raw)
        kind = framing.name
        conn = Connection(self, framing, heartbeat_ms=heartbeat_ms, max_bytes=self.outbox_max_bytes, label=label,
                          ip=ip, sink=sink, principal=principal)
        if self.closing:
            conn.closed = True
            conn.close_code, conn.close_reason = 1001, "server shutting down"
            if principal is not None:
                principal.release(reserved_subs)
            return conn
        self.connections.add(conn)
        if principal is not None:  # its admit_connection() counted it (and reserved_subs)
            principal.conns.add(conn)
            conn.reserved_subs = reserved_subs
        self.connects[kind] = self.connects.get(kind, 0) + 1
        if sink is None and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.get_running_loop().create_task(self._deadline_loop(), name="send-deadlines")
        bucket = self._buckets.setdefault(heartbeat_ms, set())
        bucket.add(conn)
        if heartbeat_ms not in self._hb_tasks:
            self._hb_tasks[heartbeat_ms] = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(heartbeat_ms), name=f"heartbeat-{heartbeat_ms}ms")
        logger.info("connect %s %s (heartbeat %d ms)", kind, label, heartbeat_ms)
        return conn

    def disconnect(self, conn: Connection) -> None:
        """Forget ``conn`` and its subscriptions (idempotent)."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        for sub in list(conn.subs.values()):
            self._remove(sub)
        conn.subs.clear()
        p = conn.principal
        if p is not None:
            p.connections -= 1
            p.subscriptions -= conn.reserved_subs
            conn.reserved_subs = 0
            p.conns.discard(conn)
        bucket = self._buckets.get(conn.heartbeat_ms)
        if bucket is not None:
            bucket.discard(conn)
        if not conn.closed:
            conn.closed = True
            conn._wake()
        logger.info("disconnect %s %s%s", conn.kind, conn.label,
                    f" ({conn.close_reason})" if conn.close_reason else "")

    # -- direct writes (sink connections) -------------------------------------

    def ready(self, conn: Connection) -> None:
        """``conn`` has something to write: flush it at the end of this loop turn
        (one flush for every connection made ready in the turn)."""
        self._ready.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every ready, unpaused sink connection's outbox in ONE write
        (joined into one buffer up to 16 KiB, else ``transport.writelines`` of the
        frames by reference: :mod:`streaming.sockets`) and end the
        closed ones. A paused connection is skipped: it is made ready again when
        its socket resumes (:meth:`Connection.resume`). Each write's delay since
        its outbox filled goes to :attr:`send_delay`."""
        self._flush_scheduled = False
        ready = self._ready
        self._ready = []
        hist = self.send_delay
        if hist is not None:
            now = self.loop_time()
            bounds, counts = hist.bounds, hist.counts
        delays = 0.0
        writes = 0
        frames_out = 0
        for conn in ready:
            conn.ready = False
            if conn.paused or conn.finished:
                continue
            sink = conn.sink
            assert sink is not None
            try:
                queued_at = conn.queued_at
                if conn.resync_pending or conn.snapshot_in_flight:
                    frames = conn.take()
                else:  # Connection.take() inlined: the common case, once per connection per turn
                    frames = conn.outbox
                    if frames:
                        conn.outbox = []
                        conn.meta = []
                        conn.outbox_bytes = 0
                        conn.control_bytes = 0
                        conn.sent_frames += len(frames)
                        frames_out += len(frames)
                    sink.drained()
                if frames:
                    n = sum(map(len, frames))
                    conn.sent_bytes += n
                    sink.write(frames, n)  # may pause the connection (flow control) at once
                    if not conn.paused:
                        conn.snapshot_in_flight = False  # written (into the socket's buffer)
                    if hist is not None:
                        d = now - queued_at
                        counts[bisect_left(bounds, d)] += 1
                        delays += d
                        writes += 1
                if conn.closed and not conn.paused and not conn.outbox and not conn.finished:
                    conn.finished = True
                    sink.finish(conn)
            except Exception:  # one socket's failure must not strand the connections after it
                logger.exception("writing to %s %s failed; closing it", conn.kind, conn.label)
                conn.lost()
                with contextlib.suppress(Exception):
                    sink.abort()  # (a transport whose write raised cannot be trusted to finish cleanly)
        self.frames_out += frames_out
        if writes:
            assert hist is not None
            hist.sum += delays
            hist.count += writes

    def check_deadline(self, arg: tuple[Connection, int]) -> None:
        """Timer: a sink connection still paused since pause ``gen`` after
        ``send_timeout_s`` missed its send deadline: closed with ``send_deadline``
        (its last words written past flow control)."""
        conn, gen = arg
        if not conn.paused or conn.pause_gen != gen or conn.finished or conn.interrupted:
            return
        conn.close_missed_deadline("connection" if conn.framing.acks else "stream", self.send_timeout_s)
        interrupt(conn)

    def close_all(self, reason: str = "server shutting down") -> None:
        """Close every connection (shutdown); new connections are refused."""
        self.closing = True
        for conn in list(self.connections):
            conn.close(1001, reason)
        for task in (*self._hb_tasks.values(), *self._cf_tasks.values(),
                     *([self._watchdog] if self._watchdog is not None else [])):
            task.cancel()
        self._hb_tasks.clear()
        self._cf_tasks.clear()

    # -- index ----------------------------------------------------------------

    def _index_sets(self, f: Filter) -> list[set[Group]]:
        if f.market is not None:
            return [self._by_market.setdefault(k, set()) for k in f.market]
        if f.event is not None:
            return [self._by_event.setdefault(k, set()) for k in f.event]
        if f.competition is not None:
            return [self._by_competition.setdefault(k, set()) for k in f.competition]
        if f.sport is not None:
            return [self._by_sport.setdefault(k, set()) for k in f.sport]
        if f.in_play is not None:
            return [self._by_in_play[f.in_play]]
        return [self._wild]

    def _index(self, sub: Subscription) -> None:
        framing = sub.conn.framing
        key = (sub.filter, sub.fmt, framing, sub.id if framing.per_sub else 0, sub.conflate_ms)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = Group(key, sub.filter, sub.conflate_ms)
            for s in self._index_sets(sub.filter):
                s.add(g)
        g.subs[sub] = None
        sub.group = g

    def _unindex(self, sub: Subscription) -> None:
        g = sub.group
        if g is None:
            return
        sub.group = None
        g.subs.pop(sub, None)
        if g.subs:
            return
        del self._groups[g.key]
        f = g.filter
        for index, keys in ((self._by_market, f.market), (self._by_event, f.event),
                            (self._by_competition, f.competition), (self._by_sport, f.sport)):
            if keys is None:
                continue
            for k in keys:
                s = index.get(k)
                if s is not None:
                    s.discard(g)
                    if not s:
                        del index[k]
            return
        if f.in_play is not None:
            self._by_in_play[f.in_play].discard(g)
            return
        self._wild.discard(g)

    def _remove(self, sub: Subscription) -> None:
        p = sub.conn.principal
        if p is not None:
            p.subscriptions -= 1
        if sub.view is not None:
            self.best.discard(sub)
            self.subscriptions -= 1
            return
        self._unindex(sub)
        self.subscriptions -= 1
        if sub.conflate_ms:
            subs = self._conflating.get(sub.conflate_ms)
            if subs is not None:
                subs.discard(sub)
            dirty = self._dirty.get(sub.conflate_ms)
            if dirty is not None:
                dirty.discard(sub)
        sub.replaying = False
        sub.pending = None
        sub.cpending = None

    # -- subscriptions --------------------------------------------------------

    async def subscribe(self, conn: Connection, f: Filter, *, resume: str | None = None,
                        ack_id: int | str | None = None, conflate_ms: int = 0,
                        fmt: str | None = None, view: str | None = None) -> Subscription:
        """Add a subscription and queue what it starts with.

        WebSocket: ``ack {id, sub}`` first. No ``resume``: a ``snapshot`` of
        the matching markets. With ``resume``: ``resumed`` and either the
        missed deltas (recovered) or a fresh snapshot (``recovered: false``).
        ``view="best"``: best / fair price changes instead of deltas
        (:mod:`streaming.bestview`; no resume, no conflation).
        """
        sub = Subscription(conn.next_sub_id(), conn, f, conflate_ms if view is None else 0, fmt, view)
        if conn.closed:
            return sub
        conn.subs[sub.id] = sub
        self.subscriptions += 1
        if conn.principal is not None:
            if conn.reserved_subs:
                conn.reserved_subs -= 1
            else:
                conn.principal.subscriptions += 1
        if view is not None:
            if conn.framing.acks:
                conn.send(ack_message(ack_id, sub.id))
            logger.info("subscribe %s %s sub=%d view=%s filter=%s", conn.kind, conn.label, sub.id, view, f)
            self.best.add(sub)
            return sub
        self._index(sub)
        if conflate_ms:
            self._conflating.setdefault(conflate_ms, set()).add(sub)
            if conflate_ms not in self._cf_tasks:
                self._cf_tasks[conflate_ms] = asyncio.get_running_loop().create_task(
                    self._conflate_loop(conflate_ms), name=f"conflate-{conflate_ms}ms")
        if conn.framing.acks:
            conn.send(ack_message(ack_id, sub.id))
        logger.info("subscribe %s %s sub=%d filter=%s conflate_ms=%d resume=%s", conn.kind, conn.label, sub.id, f,
                    conflate_ms, bool(resume))
        granted = self._grant_since(sub)
        if resume is None:
            self.send_snapshot(sub)
            return sub
        tok = decode_token(resume)
        st = self.state
        if tok is None or tok.epoch != st.epoch or len(tok.keys) != st.partitions:
            self._not_recovered(sub, "token from another epoch or malformed")
            return sub
        positions = [parse_stream_id(p) for p in st.positions]
        ahead = [p for p, (k, pos) in enumerate(zip(tok.keys, positions)) if k > pos]
        if ahead:
            # another node was ahead of this one: fine if those entries exist in Redis
            if not await self._positions_exist(tok, ahead):
                if sub.id in conn.subs and not conn.closed:
                    self._not_recovered(sub, "position not in the log")
                return sub
            if sub.id not in conn.subs or conn.closed:
                return sub
        why = self._resume_void(sub, tok, granted)
        if why is not None:
            self._not_recovered(sub, why)
            return sub
        if st.ring.covers(tok.keys):
            self._replay_from_ring(sub, tok)
        elif f.in_play is not None or self.store is None:
            # in_play cannot be judged for past deltas read back from Redis
            self._not_recovered(sub, "outside the replay window")
        else:
            await self._replay_from_redis(sub, tok)
        return sub

    async def _positions_exist(self, tok: ResumeToken, partitions: list[int]) -> bool:
        if self.store is None:
            return False
        try:
            for p in partitions:
                pos = tok.positions[p]
                rows = await self.store.redis.xrange(log_key(p), min=pos, max=pos, count=1)
                if not rows:
                    return False
        except (RedisError, OSError, StoreError) as exc:
            logger.warning("resume check against redis failed: %s", exc)
            return False
        return True

    # -- what a resume cannot replay ------------------------------------------------
    #
    # A resume replays log entries. Three things change what a subscription sees without one:
    # a source's status (sent again after every recovered resume: send_statuses), a relink of
    # canonical events and a change of the credential's allow-lists. For the last two the
    # client may hold a market it no longer sees (or miss one it now sees), and the resume path
    # cannot know which: a resume from a token issued before such a change is not recovered —
    # ``resumed {recovered: false}`` and a fresh snapshot under the filter as it is now.

    def _positions(self) -> tuple[StreamId, ...]:
        return tuple(parse_stream_id(p) for p in self.state.positions)

    def _grant_since(self, sub: Subscription) -> tuple[StreamId, ...] | None:
        """For a subscription of a restricted credential (its filter carries the tenant's
        allow-lists, :attr:`Filter.visible`): the node's positions when it first served this
        credential with these allow-lists — recorded now when it has not (first seen since the
        node started, or the allow-lists changed), for what a token from before was issued
        under is not known here. None for a credential that sees every market (nothing it
        holds can be hidden from it)."""
        v = sub.filter.visible
        if v is None or sub.view is not None:
            return None
        p = sub.conn.principal
        key = (p.identity if p is not None else "", v)
        grants = self._grants
        since = grants.pop(key, None)
        if since is None:
            since = self._positions()
        grants[key] = since  # (most recently used last)
        while len(grants) > GRANTS_MAX:
            del grants[next(iter(grants))]
        return since

    def _resume_void(self, sub: Subscription, tok: ResumeToken, granted: tuple[StreamId, ...] | None) -> str | None:
        """Why a resume from ``tok`` must not be recovered although the log could replay it
        (None: it may be): what the subscription sees changed after the token without a log
        entry. ``granted``: :meth:`_grant_since` of the subscription."""
        if granted is not None:
            if not _after(tok.keys, granted):
                return "the credential's allow-lists when the token was issued are not known to be these"
            if self._grants_changed is not None and not _after(tok.keys, self._grants_changed):
                return "a tenant entry changed after the token was issued"
        return self._relinked_after(sub.filter, tok)

    def _relinked_after(self, f: Filter, tok: ResumeToken) -> str | None:
        """Why a resume of filter ``f`` from ``tok`` is not recovered: a canonical event it
        filters on gained or lost a market (a relink) after the token — after its positions
        (this node's relink), or after the links it was issued under (a relink the issuing
        node had not adopted yet: nodes adopt the linker's links each on its own, so another
        node may have issued a token past this node's relink without it: a token issued under
        another links version than this node's is not recovered on a canonical event — every
        canonical id starts with ``ev:``, :data:`feed.matching.CANONICAL_PREFIX`)."""
        if f.event is None:
            return None
        floor = self._relink_floor
        issued_under = tok.links_version
        current = self.state.links_version
        for e in f.event:
            if not e.startswith(CANONICAL_PREFIX):
                continue  # (a provider event id: no relink moves its markets)
            at = _later(self._relinks.get(e), floor) if floor is not None else self._relinks.get(e)
            if at is not None and not _after(tok.keys, at):
                return f"canonical event {e} was re-linked after the token was issued"
            if issued_under is not None and issued_under != current:
                # issued under other links than this node's: what that node's relinks sent the client,
                # or this node's relink that moved nothing it held then (a market it has since), is not
                # known here — older or newer, the client's event may differ from this node's
                return (f"the token was issued under links version {issued_under}, this node serves "
                        f"{current}: canonical event {e} may differ")
        return None

    def unsubscribe(self, conn: Connection, sub_id: int) -> bool:
        """Remove a subscription; False when ``sub_id`` is unknown."""
        sub = conn.subs.pop(sub_id, None)
        if sub is None:
            return False
        self._remove(sub)
        return True

    # -- snapshots ------------------------------------------------------------

    def snapshot_message(self, f: Filter, *, recovered: bool | None = None, reason: str | None = None,
                         events: dict[str, None] | None = None) -> Message:
        """A ``snapshot`` of the markets matching ``f``, as of now, carrying the node's token;
        ``events`` (when given) gets the provider event ids of those markets, in order."""
        st = self.state
        now = now_ms()
        if events is None:
            markets: Iterable[bytes] = (st.market_json(m, now) for m in st.matching(f))
        else:
            def markets_and_events() -> Iterable[bytes]:
                for m in st.matching(f):
                    for eid in st.state_events(m):  # its event's, and its race's
                        events[eid] = None
                    yield st.market_json(m, now)
            markets = markets_and_events()
        return snapshot_message(markets, as_of=now, token=st.token, recovered=recovered, reason=reason)

    def send_snapshot(self, sub: Subscription, *, recovered: bool | None = None, reason: str | None = None) -> None:
        """Queue a snapshot for ``sub``, then the current state of every event among its markets."""
        events: dict[str, None] | None = {} if self._has_states() else None
        msg = self.snapshot_message(sub.filter, recovered=recovered, reason=reason, events=events).formatted(sub.fmt)
        sub.conn.send(msg, sub, True)
        if events:
            self.send_states(sub, events)

    def _not_recovered(self, sub: Subscription, why: str = "") -> None:
        self.resumes["not_recovered"] += 1
        logger.info("resume of %s sub=%d not recovered: %s", sub.conn.label, sub.id, why)
        sub.replaying = False
        sub.pending = None
        sub.conn.send(resumed(False), sub)
        self.send_snapshot(sub, recovered=False)

    # -- resume ---------------------------------------------------------------

    def _replay_frames(self, sub: Subscription, entry: PreparedEntry, frames: list[bytes], metas: list[Any]) -> int:
        conn, f, fmt = sub.conn, sub.filter, sub.fmt
        msgs = [m for pd in entry.deltas if (m := pd.message_for(f)) is not None]
        if not msgs:
            return 0
        n = 0
        last = len(msgs) - 1
        for i, m in enumerate(msgs):
            fr = conn.frame(m if fmt is None else m.formatted(fmt), sub, i == last)
            frames.append(fr)
            metas.append((sub.id, m, entry.prev_token))
            n += len(fr)
        return n

    def _replay_from_ring(self, sub: Subscription, tok: ResumeToken) -> None:
        conn = sub.conn
        if conn.framing.shared:
            self._replay_shared(sub, tok)
            return
        frames: list[bytes] = []
        metas: list[Any] = []
        n = 0
        for entry in self.state.ring.since(tok.keys):
            n += self._replay_frames(sub, entry, frames, metas)
            if n > conn.max_bytes:
                self._not_recovered(sub, "more to replay than the byte budget")
                return
        self._set_floor(sub, tok.keys)
        self.resumes["recovered"] += 1
        conn.send(resumed(True, tok_bytes(tok)), sub, True)
        if frames:
            conn.push(frames, metas, n)
        self.send_states(sub, self._events_of(sub.filter))
        self.send_statuses(sub)

    def _replay_shared(self, sub: Subscription, tok: ResumeToken) -> None:
        """Resume ``sub`` from the ring with the :class:`SharedReplay` of its token, filter,
        odds format and transport variant: built by the first such resume, extended with
        newer ring entries by later ones, and queued by reference (never copied per client)."""
        conn, ring = sub.conn, self.state.ring
        now = self.loop_time()
        if self._replays_gen != ring.generation:  # the ring was reset: every cached replay is void
            self._replays.clear()
            self._replay_bytes = 0
            self._replays_gen = ring.generation
        key = (tok.keys, sub.filter, sub.fmt, conn.framing, sub.id)  # (metas name the subscription id)
        rep = self._replays.get(key)
        if rep is not None and rep.upto < ring.appended and not rep.too_big:
            self._replay_bytes -= rep.nbytes
            if not self._extend_replay(rep, sub, tok, ring.after(rep.upto)):
                rep = None  # entries left the ring since: rebuild
            else:
                self._replay_bytes += rep.nbytes
                self.replay_extends += 1
        if rep is None:
            self._replays.pop(key, None)
            rep = SharedReplay(ring.appended)
            rep.used_at = now
            self._extend_replay(rep, sub, tok, None)
            self._replays[key] = rep
            self._replay_bytes += rep.nbytes
            self.replay_builds += 1
            while self._replays:
                oldest = self._replays[next(iter(self._replays))]
                if (len(self._replays) <= REPLAY_CACHE_MAX and self._replay_bytes <= REPLAY_CACHE_BYTES
                        and oldest.used_at >= now - REPLAY_CACHE_IDLE_S) or oldest is rep:
                    break
                del self._replays[next(iter(self._replays))]
                self._replay_bytes -= oldest.nbytes
        else:
            self.replay_shares += 1
            self._replays[key] = self._replays.pop(key)  # most recently used last
        rep.used_at = now
        if rep.too_big:
            self._not_recovered(sub, "more to replay than the byte budget")
            return
        self._set_floor(sub, tok.keys)
        self.resumes["recovered"] += 1
        conn.send(resumed(True, tok_bytes(tok)), sub, True)  # (its own as_of: never shared)
        if rep.blocks:
            conn.push(rep.blocks, rep.metas, rep.nbytes)
        self.send_states(sub, self._events_of(sub.filter))
        self.send_statuses(sub)

    def _extend_replay(self, rep: "SharedReplay", sub: Subscription, tok: ResumeToken,
                       entries: list[PreparedEntry] | None) -> bool:
        """Add the frames of ``entries`` (None: of every ring entry after the token) to ``rep``
        as one more block. False when ``entries`` is None because they left the ring."""
        ring = self.state.ring
        if entries is None and rep.blocks:
            return False
        source = ring.since(tok.keys) if entries is None else (e for e in entries if e.key > tok.keys[e.partition])
        frames: list[bytes] = []
        metas: list[Any] = []
        n = 0
        for entry in source:
            n += self._replay_frames(sub, entry, frames, metas)
            if rep.nbytes + n > self.outbox_max_bytes:
                rep.too_big = True
                break
        rep.upto = ring.appended
        if frames and not rep.too_big:
            rep.blocks.append(frames[0] if len(frames) == 1 else b"".join(frames))
            rep.metas.append(ReplayBlock(metas))
            rep.nbytes += n
        return True

    def _set_floor(self, sub: Subscription, keys: tuple[StreamId, ...]) -> None:
        positions = [parse_stream_id(p) for p in self.state.positions]
        sub.floor = keys if any(k > p for k, p in zip(keys, positions)) else None

    async def _replay_from_redis(self, sub: Subscription, tok: ResumeToken) -> None:
        assert self.store is not None
        st, store, conn = self.state, self.store, sub.conn
        sub.replaying = True
        sub.pending = []
        gen = st.generation
        limit = self.replay_max_entries
        try:
            rows: dict[int, list[tuple[str, list[Delta]]]] = {}
            for p in range(st.partitions):
                rows[p] = await store.log_range(p, tok.positions[p], count=limit + 1)
            firsts = [await store.first_log_id(p) for p in range(st.partitions)]
        except (RedisError, OSError, StoreError) as exc:
            logger.warning("resume of %s sub=%d from redis failed: %s", conn.label, sub.id, exc)
            if sub.replaying and not conn.closed:
                self._not_recovered(sub, "redis unavailable")
            return
        if not sub.replaying or conn.closed or sub.id not in conn.subs:
            return  # resynced, unsubscribed or closed meanwhile
        if st.generation != gen or tok.epoch != st.epoch:
            self._not_recovered(sub, "node state reloaded meanwhile")
            return
        why = self._relinked_after(sub.filter, tok)  # (relinked() skipped it while it replayed)
        if why is not None:
            self._not_recovered(sub, why)
            return
        positions = [parse_stream_id(p) for p in st.positions]
        merged: list[tuple[StreamId, int, str, list[Delta]]] = []
        for p in range(st.partitions):
            first = firsts[p]
            if first is not None and parse_stream_id(first) > tok.keys[p]:
                self._not_recovered(sub, "position trimmed from the log")
                return
            if len(rows[p]) > limit:
                self._not_recovered(sub, "more to replay than replay_max_entries")
                return
            for entry_id, deltas in rows[p]:
                key = parse_stream_id(entry_id)
                if key <= positions[p]:  # newer ones arrive live (pending or later)
                    merged.append((key, p, entry_id, deltas))
        merged.sort(key=lambda r: r[0])
        running = list(tok.positions)
        floor = list(tok.keys)
        now = now_ms()
        frames: list[bytes] = []
        metas: list[Any] = []
        n = 0
        # the keys of the markets the replay re-keys, as of the token: a delta that moves one out
        # of (or into) the filter is sent as live (ReplayedDelta)
        held = st.replay_held(((p, entry_id, deltas) for _, p, entry_id, deltas in merged), self.moved_at)
        restricted = sub.filter.visible is not None
        for key, p, entry_id, deltas in merged:
            before = running[p]
            running[p] = entry_id
            floor[p] = max(floor[p], key)
            entry = st.prepare_replay(p, entry_id, deltas, running, now, before, held, self.moved_at)
            if restricted and any(type(pd) is ReplayedDelta and pd.unsure(sub.filter) for pd in entry.deltas):
                # a market whose keys before the change are not known may have been hidden from its
                # tenant then (its changes must not go out) or visible (its removal must)
                self._not_recovered(sub, "a market's keys moved before this node can vouch for them")
                return
            n += self._replay_frames(sub, entry, frames, metas)
            if n > conn.max_bytes:
                self._not_recovered(sub, "more to replay than the byte budget")
                return
        pending = sub.pending or []
        sub.replaying = False
        sub.pending = None
        sub.floor = tuple(floor)
        self.resumes["recovered"] += 1
        conn.send(resumed(True, tok_bytes(tok)), sub, True)
        with self._overflows_held():  # (a collapse merges from the markets as they are: after the live entries)
            if frames:
                conn.push(frames, metas, n)
            for entry in pending:
                self._deliver_entry(sub, entry)
        self._set_floor(sub, sub.floor)
        self.send_states(sub, self._events_of(sub.filter))  # live states were skipped while it replayed
        self.send_statuses(sub)

    # -- fan-out --------------------------------------------------------------

    def dispatch(self, entry: PreparedEntry) -> None:
        """Send one applied log entry to every matching subscription (called
        by the reader once per entry; never awaits)."""
        if entry.newly is not None:  # (per entry: markets new to the node or whose keys moved)
            self._note_moves(entry)
        if not self.connections:
            return
        if self.best.subs:
            try:
                self.best.on_entry(entry)
            except Exception:  # the best view's failure must not hold back the entry's deltas
                for conn in {sub.conn for sub in self.best.subs}:
                    self._close_failed(conn, "the best view")  # they reconnect to a fresh best view
        by_market, by_event, by_comp = self._by_market, self._by_event, self._by_competition
        by_sport, by_in_play, wild = self._by_sport, self._by_in_play, self._wild
        per_group: dict[Group, list[Message]] = {}
        for pd in entry.deltas:
            groups: list[set[Group]] = []
            s = by_market.get(pd.market_id)
            if s:
                groups.append(s)
            sport, event_id, comp, in_play, canonical, _, _, _ = pd.keys
            if event_id is not None and (s := by_event.get(event_id)):
                groups.append(s)
            if canonical is not None and (s := by_event.get(canonical)):
                groups.append(s)
            if comp is not None and (s := by_comp.get(comp)):
                groups.append(s)
            if sport is not None and (s := by_sport.get(sport)):
                groups.append(s)
            s = by_in_play[in_play]
            if s:
                groups.append(s)
            prev = pd.prev
            if prev is not None:
                psport, pevent, pcomp, pin, pcanonical, _, _, _ = prev
                if pevent is not None and pevent != event_id and (s := by_event.get(pevent)):
                    groups.append(s)
                if pcanonical is not None and pcanonical != canonical and (s := by_event.get(pcanonical)):
                    groups.append(s)
                if pcomp is not None and pcomp != comp and (s := by_comp.get(pcomp)):
                    groups.append(s)
                if psport is not None and psport != sport and (s := by_sport.get(psport)):
                    groups.append(s)
                if pin != in_play and (s := by_in_play[pin]):
                    groups.append(s)
            if wild:
                groups.append(wild)
            per_filter: dict[Filter, Message | None] = {}  # one message_for per distinct filter
            for gs in groups:
                for g in gs:
                    f = g.filter
                    if f in per_filter:
                        msg = per_filter[f]
                    else:
                        msg = per_filter[f] = pd.message_for(f)
                    if msg is None:
                        continue
                    lst = per_group.get(g)
                    if lst is None:
                        per_group[g] = [msg]
                    elif lst[-1] is not msg:
                        lst.append(msg)
        p, key, tb = entry.partition, entry.key, entry.prev_token
        now = -1.0
        # connections over their budget: collapsed once every group has been given this entry — a
        # collapse merges from the markets as they are now, so a subscription of the connection
        # still waiting for this entry's delta would get it after a merge that carries its seq
        over: list[Connection] | None = None
        # a conflated status change's merged messages and verdicts: built once per entry, not per subscription
        hot_cache: dict[tuple[object, ...], Message | None] | None = None
        hot_judged: dict[str, bool] | None = None
        for g, msgs in per_group.items():
            built = False
            hot: list[str] | None = None  # (conflated groups: the markets whose change goes at once)
            # a copy: a push may close a connection (eviction), which leaves its group
            for sub in tuple(g.subs):
                if sub.replaying:
                    pend = sub.pending
                    if pend is not None and (not pend or pend[-1] is not entry):
                        if len(pend) >= PENDING_MAX:
                            self._not_recovered(sub, "too many live entries while replaying")
                        else:
                            pend.append(entry)
                    continue
                floor = sub.floor
                if floor is not None and key <= floor[p]:
                    continue
                conn = sub.conn
                if conn.closed or conn.resync_pending:
                    continue
                if g.conflate_ms:
                    self._gather(sub, msgs, tb)
                    if hot is None:
                        hot = must_send_now(msgs)
                    if hot:  # a status change: not held to the window's end
                        if hot_cache is None:
                            hot_cache, hot_judged = {}, {}
                        out = self._flush_markets(sub, hot, entry.token, hot_cache, hot_judged)
                        if out is not None and conn.push_held(*out):
                            if over is None:
                                over = [conn]
                            else:
                                over.append(conn)
                    continue
                if not built:  # the group's frames, built once
                    frames, metas, nbytes = self._frames(sub, msgs, tb)
                    built = True
                # Connection.push inlined (once per subscription per entry: the fan-out's inner loop)
                outbox = conn.outbox
                if not outbox:
                    if now < 0:
                        now = self.loop_time()
                    conn.queued_at = now
                outbox.extend(frames)
                conn.meta.extend(metas)
                conn.outbox_bytes += nbytes
                if conn.outbox_bytes > conn.max_bytes:
                    if over is None:
                        over = [conn]
                    else:
                        over.append(conn)
                if conn.wakeup is not None:
                    conn.wakeup.set()
                elif not conn.ready:
                    conn.ready = True
                    self.ready(conn)
        if over is not None:
            self._overflow_all(over)
        if entry.newly is not None and per_group and self._has_states():
            # (per entry, not per delta: markets new to the node or whose keys moved)
            self._states_for_newly(entry, entry.newly, per_group)

    def _note_moves(self, entry: PreparedEntry) -> None:
        """Remember the markets whose filter keys ``entry`` moved, with their keys before the
        entry (:meth:`moved_at`). One entry may change a market more than once (the store batches
        a market's deltas): its first change's keys before are the ones before the entry — a
        later change's are what an earlier change of the entry set (c1 → c2 → c3 is c1 before,
        not c2), and a replay takes those from the entry itself."""
        st = self.state
        moves = self._moves
        if st.epoch != self._moves_epoch:  # the store was reset: positions start again
            moves.clear()
            self._moves_floor = [(0, 0)] * st.partitions
            self._moves_epoch = st.epoch
        p, key = entry.partition, entry.key
        first: set[str] = set()
        for mid, _, before in entry.newly or ():
            if mid in first:  # a later change of the market in this entry
                continue
            first.add(mid)
            if before is not None:  # (None: new to the node — nothing held before the entry)
                moves[(p, key, mid)] = before
        if len(moves) > MOVES_MAX:
            floor = self._moves_floor
            while len(moves) > MOVES_MAX:
                old, _ = moves.popitem(last=False)  # (a dict's next(iter()) after deletes scans the holes)
                if old[1] > floor[old[0]]:
                    floor[old[0]] = old[1]

    def moved_at(self, p: int, key: StreamId, market_id: str) -> tuple[bool, MarketKeys | None]:
        """For a Redis replay (:meth:`NodeState.prepare_replay`): whether this node applied log
        entry ``key`` of partition ``p`` itself — after its last load of the partition, within
        what the hub remembers — and, if so, ``market_id``'s filter keys before that entry when
        it moved them (None: it did not move them)."""
        st = self.state
        same = st.epoch == self._moves_epoch
        if key <= parse_stream_id(st.load_heads[p]) or (same and key <= self._moves_floor[p]):
            return False, None
        return True, (self._moves.get((p, key, market_id)) if same else None)

    def _frames(self, sub: Subscription, msgs: list[Message], token_before: bytes | None
                ) -> tuple[list[bytes], list[Any], int]:
        """(frames, metas, bytes) of one entry's messages for ``sub`` (the last carries the token)."""
        conn, fmt, sid = sub.conn, sub.fmt, sub.id
        if len(msgs) == 1:
            m = msgs[0]
            fr = conn.frame(m if fmt is None else m.formatted(fmt), sub, True)
            return [fr], [(sid, m, token_before)], len(fr)
        frames = []
        metas = []
        n = 0
        last = len(msgs) - 1
        for i, m in enumerate(msgs):
            fr = conn.frame(m if fmt is None else m.formatted(fmt), sub, i == last)
            frames.append(fr)
            metas.append((sid, m, token_before))
            n += len(fr)
        return frames, metas, n

    def _deliver(self, sub: Subscription, msgs: list[Message], token_before: bytes | None,
                 token_after: bytes | None) -> None:
        """Queue ``msgs`` (one log entry's, or a relink's) for ``sub``: ``token_before`` / ``token_after``
        the resume tokens from before and after them."""
        conn = sub.conn
        if conn.closed or conn.resync_pending:
            return
        if sub.conflate_ms:
            self._gather(sub, msgs, token_before)
            hot = must_send_now(msgs)
            if hot:  # a status change: not held to the window's end
                out = self._flush_markets(sub, hot, token_after)
                if out is not None:
                    conn.push(*out)
            return
        conn.push(*self._frames(sub, msgs, token_before))

    def _deliver_entry(self, sub: Subscription, entry: PreparedEntry) -> None:
        floor = sub.floor
        if floor is not None and entry.key <= floor[entry.partition]:
            return
        msgs = [m for pd in entry.deltas if (m := pd.message_for(sub.filter)) is not None]
        if msgs:
            self._deliver(sub, msgs, entry.prev_token, entry.token)

    # -- event states -----------------------------------------------------------
    #
    # An ``event_state`` message goes to a subscription whose filter matches at least one market
    # the node holds of that provider event (a market hidden from a tenant never counts, nor does a
    # state of a source it may not see). Live changes come from EventStates' listener; after a
    # snapshot or a recovered resume the current states of the events among its markets follow;
    # a market that newly matches (an image) brings its event's state. No resume token: a state is
    # whole and versioned. view=best subscriptions get none (their messages are per canonical
    # event; GET /v1/events/{id} gives its state).

    def _has_states(self) -> bool:
        held = self.event_states
        return held is not None and bool(held.states)

    def event_states_changed(self, changed: list["EventState"]) -> None:
        """EventStates listener: queue each changed state, encoded once, for every subscription
        that sees one of its event's markets (stream data: a slow consumer's collapse keeps
        the latest per event)."""
        if not self.connections or self.event_states is None:
            return
        now = now_ms()
        for es in changed:
            try:
                self._fan_out_state(es, now)
            except Exception:  # the other states of the batch still go out (they are not sent again)
                logger.exception("sending the state of event %s failed", es.event_id)

    def _event_markets(self, event_id: str) -> list[tuple[str, MarketKeys]]:
        st = self.state
        mids = st.state_markets(event_id)  # a provider event's markets, or a race's
        if not mids:
            return []
        return [(mid, st.keys_of(m)) for mid in mids if (m := st.markets.get(mid)) is not None]

    def _state_candidates(self, markets: list[tuple[str, MarketKeys]]) -> set[Group]:
        """The groups indexed under any of ``markets``' ids, events (provider and canonical),
        competitions, sports or in-play flags, and the wild ones."""
        ids, events, comps, sports, plays = set(), set(), set(), set(), set()
        for mid, keys in markets:
            ids.add(mid)
            sport, eid, comp, in_play, canonical = keys[:5]
            events.add(eid)
            events.add(canonical)
            comps.add(comp)
            sports.add(sport)
            plays.add(in_play)
        out: set[Group] = set(self._wild)
        for index, keys_ in ((self._by_market, ids), (self._by_event, events), (self._by_competition, comps),
                             (self._by_sport, sports)):
            for k in keys_:
                if k is not None and (s := index.get(k)):
                    out |= s
        for flag in plays:
            out |= self._by_in_play[flag]
        return out

    @staticmethod
    def _sees_state(f: Filter, es: "EventState", markets: Iterable[tuple[str, MarketKeys]]) -> bool:
        """Whether filter ``f`` gets ``es``: it matches a market of the event that is not hidden
        from its tenant, and the state's source is one the tenant may see."""
        v = f.visible
        if v is not None and v[1] is not None and es.source not in v[1]:
            return False
        for mid, keys in markets:
            if f.match(mid, keys) and not f.hides(keys):
                return True
        return False

    def _state_message(self, es: "EventState", now: int) -> Message:
        held = self.event_states
        assert held is not None
        return event_state_message(held.json(es, self.state, now), sent_at=now)

    def _fan_out_state(self, es: "EventState", now: int) -> None:
        markets = self._event_markets(es.event_id)
        if not markets:
            return
        msg: Message | None = None
        seen: dict[Filter, bool] = {}
        for g in self._state_candidates(markets):
            f = g.filter
            ok = seen.get(f)
            if ok is None:
                ok = seen[f] = self._sees_state(f, es, markets)
            if not ok:
                continue
            if msg is None:
                msg = self._state_message(es, now)
            for sub in tuple(g.subs):
                if sub.replaying:  # the end of its replay sends the current states
                    continue
                conn = sub.conn
                if conn.closed or conn.resync_pending:  # the resync snapshot brings them
                    continue
                conn.push1(conn.frame(msg, sub), StateMeta(sub.id, es.event_id))
                self.event_state_frames += 1

    def _states_for_newly(self, entry: PreparedEntry, newly: list[Newly], per_group: dict[Group, list[Message]]
                          ) -> None:
        """After an entry: a group that got a market it did not match before (new to the node,
        or its keys moved) gets the market's event state too (it may have come before the
        market: the state log and the delta log are read apart)."""
        held = self.event_states
        assert held is not None
        states = held.states
        st = self.state
        cands = []
        for mid, keys, prev in newly:
            if keys[1] is None:
                continue
            m = st.markets.get(mid)
            for eid in (st.state_events(m) if m is not None else (keys[1],)):  # its event's, its race's
                if (es := states.get(eid)) is not None:
                    cands.append((mid, keys, prev, es))
        if not cands:
            return
        now = now_ms()
        msgs: dict[str, Message] = {}
        per_filter: dict[Filter, list[str]] = {}
        p, key = entry.partition, entry.key
        for g in per_group:
            f = g.filter
            eids = per_filter.get(f)
            if eids is None:
                eids = per_filter[f] = []
                v = f.visible
                sources = v[1] if v is not None else None
                for mid, keys, prev, es in cands:
                    eid = es.event_id
                    if eid in eids or not f.match(mid, keys) or f.hides(keys):
                        continue
                    if prev is not None and prev[1] == keys[1] and f.match(mid, prev) and not f.hides(prev):
                        continue  # it had this market of the event before: it has the state
                    if sources is not None and es.source not in sources:
                        continue  # a source the tenant may not see
                    eids.append(eid)
            if not eids:
                continue
            for sub in tuple(g.subs):
                if sub.replaying:
                    continue
                floor = sub.floor
                if floor is not None and key <= floor[p]:
                    continue
                conn = sub.conn
                if conn.closed or conn.resync_pending:
                    continue
                for eid in eids:
                    msg = msgs.get(eid)
                    if msg is None:
                        msg = msgs[eid] = self._state_message(states[eid], now)
                    conn.push1(conn.frame(msg, sub), StateMeta(sub.id, eid))
                    self.event_state_frames += 1

    def _state_frames(self, sub: Subscription, event_ids: Iterable[str], now: int) -> list[bytes]:
        """The frames of the current states of ``event_ids`` for ``sub`` (those with a state whose
        source its tenant may see)."""
        held = self.event_states
        if held is None or not held.states:
            return []
        v = sub.filter.visible
        sources = v[1] if v is not None else None
        conn = sub.conn
        out = []
        for eid in event_ids:
            es = held.states.get(eid)
            if es is None or (sources is not None and es.source not in sources):
                continue
            out.append(conn.frame(self._state_message(es, now), sub))
        self.event_state_frames += len(out)
        return out

    def send_states(self, sub: Subscription, event_ids: Iterable[str]) -> None:
        """Queue the current states of ``event_ids`` for ``sub`` as control messages (after a
        snapshot or a resume: one per event, so bounded like the snapshot itself)."""
        conn = sub.conn
        if conn.closed:
            return
        frames = self._state_frames(sub, event_ids, now_ms())
        if not frames:
            return
        _queue_control(conn, frames)

    def _events_of(self, f: Filter) -> list[str]:
        """The provider events with a state among the markets matching ``f`` (not hidden from its tenant)."""
        held = self.event_states
        if held is None or not held.states:
            return []
        st = self.state
        if f.market is not None or f.event is not None:  # indexed: few markets
            seen: dict[str, None] = {}
            for m in st.matching(f):
                for eid in st.state_events(m):
                    if eid in held.states:
                        seen[eid] = None
            return list(seen)
        out = []
        for eid in held.states:
            for mid in st.state_markets(eid):
                held_m = st.markets.get(mid)
                if held_m is not None and f.match(mid, keys := st.keys_of(held_m)) and not f.hides(keys):
                    out.append(eid)
                    break
        return out

    # -- conflation -----------------------------------------------------------

    def _gather(self, sub: Subscription, msgs: list[Message], token_before: bytes | None) -> None:
        cp = sub.cpending
        if cp is None:
            cp = sub.cpending = {}
            self._dirty.setdefault(sub.conflate_ms, set()).add(sub)
        for m in msgs:
            info = m.info
            assert isinstance(info, DeltaInfo)  # every delta message carries one (DeltaInfo's docstring)
            mid = info.market_id
            mg = cp.get(mid)
            if mg is None:
                mg = cp[mid] = Merge(token_before)
            mg.add(m)

    def _flush_markets(self, sub: Subscription, mids: list[str], token_after: bytes | None,
                       cache: dict[tuple[object, ...], Message | None] | None = None,
                       judged: dict[str, bool] | None = None) -> tuple[list[bytes], list[Any], int] | None:
        """Take markets ``mids`` out of ``sub``'s conflation window and return their frames (the
        caller queues them): a change that must not wait for the window's end (:func:`must_send_now`:
        a suspension, a close, a settlement, a runner removed — held for up to ``conflate_ms``
        while every heartbeat confirmed the market as the client holds it, open). Each market is
        merged as the window's end would merge it (:meth:`_merged_frames`: what it gathered, as one
        message, judged as of now). Tokens: a frame carries the token from before the earliest change
        not sent yet when it arrives — a market still held (from before the first of them: the
        window goes on) or a later one of ``mids`` — else ``token_after`` (the token after what was
        gathered), so a resume from any of them misses nothing. None: nothing to send. ``cache`` /
        ``judged``: shared by the subscriptions of one dispatch (:meth:`_merged_frames`)."""
        cp = sub.cpending
        if not cp:
            return None
        hot = set(mids)
        # (first-change order) the window usually holds markets from before the hot ones: then every
        # hot one takes the first held market's token — found without walking the whole window
        first_mid, first = next(iter(cp.items()))
        if first_mid in hot:
            items = list(cp.items())
            cold = next((i for i, (mid, _) in enumerate(items) if mid not in hot), None)
        else:
            items = [(mid, mg) for mid in mids if (mg := cp.get(mid)) is not None]
            cold = -1
        frames: list[bytes] = []
        metas: list[Any] = []
        n = 0
        now = now_ms()
        if cache is None:
            cache = {}
        if judged is None:
            judged = {}
        try:
            for i, (mid, mg) in enumerate(items):
                if mid not in hot:
                    continue
                if cold == -1:
                    token = first.token_before
                elif cold is not None and cold < i:
                    token = items[cold][1].token_before
                elif i + 1 < len(items):
                    token = items[i + 1][1].token_before
                else:
                    token = token_after
                n += self._merged_frames(sub, [(mid, mg)], token, cache, now, frames, metas, judged)
            for mid in hot:
                cp.pop(mid, None)
        except Exception:
            # what it gathered is gone: close it (it resumes with its token and is replayed the
            # changes) rather than let it sit on an open market that is suspended
            self._close_failed(sub.conn, "conflated flush")
            return None
        return (frames, metas, n) if frames else None

    def safe_token(self, sub: Subscription) -> bytes:
        """The token a heartbeat for ``sub`` may carry: the node's,
        unless changes are still gathered for it (then the one before them)."""
        cp = sub.cpending
        if cp:
            tok = next(iter(cp.values())).token_before
            if tok is not None:
                return tok
        return self.state.token

    def _merged_message(self, market_id: str, mg: Merge, now: int) -> Message | None:
        """ONE delta with the market's latest state of everything ``mg`` gathered:
        the whole header when any gathered delta changed it, and every field of
        each selection any of them touched (their changes may differ in which
        fields they carry, so the merge sends them all: applying it to the book
        from before the first gathered delta gives the latest state)."""
        st = self.state
        m = st.markets.get(market_id)
        if m is None:
            return None
        age, stale = st.age_stale(m, now)
        if mg.image:
            info = DeltaInfo(market_id, (), False, False, True)
            return delta_message(image_of(m), market_json=st.market_json(m, now), age_ms=age, stale=stale,
                                 sent_at=now, token=None, conflated=True, info=info)
        ids = mg.sel_ids
        d = Delta(market_id=market_id, seq=m.seq, kind="delta", source=m.source, source_ts=m.source_ts,
                  received_at=m.received_at, stored_at=m.stored_at, source_ts_original=m.source_ts_original,
                  session=m.session, header=m.header() if mg.header else None,
                  traded_volume=m.traded_volume if (mg.tv and not mg.header) else None,
                  selections=[whole_change(s) for s in m.selections if s.selection_id in ids])
        info = DeltaInfo(market_id, tuple(ids), mg.header, mg.tv, False)
        return delta_message(d, market_json=None, age_ms=age, stale=stale, sent_at=now, token=None,
                             conflated=True, info=info)

    def _merged_frames(self, sub: Subscription, merges: list[tuple[str, Merge]], last_token: bytes | None,
                       cache: dict[tuple[object, ...], Message | None], now: int,
                       frames: list[bytes], metas: list[Any], judged: dict[str, bool]) -> int:
        """Frames for ``merges`` (in first-change order): market i carries the
        token from before market i+1's first change, the last ``last_token``,
        so a resume from any of them misses nothing. ``cache``: the merged messages built
        (per merge key), ``judged``: the markets' ``stale`` at ``now`` (per market), both shared
        by the subscriptions of one flush."""
        conn, fmt = sub.conn, sub.fmt
        n = 0
        st = self.state
        for i, (mid, mg) in enumerate(merges):
            token = merges[i + 1][1].token_before if i + 1 < len(merges) else last_token
            cur = st.markets.get(mid)
            if (mg.msg is not None and getattr(mg.msg.info, "removed", False)) or (  # (its last word: it left)
                    sub.filter.visible is not None and (cur is None or sub.filter.hides(st.keys_of(cur)))):
                msg: Message | None = removed_message(mid, None, None)
            elif mg.count == 1 and mg.msg is not None and (cur is None or _stale_at(
                    st, mid, cur, now, judged) == says_stale(mg.msg)):
                # one change, sent as is — while its ``stale`` (judged when the node applied it) is
                # still the server's word now: a ``status`` may have said the market turned stale (or
                # fresh) since, and the client takes the later word, this message, then every
                # heartbeat confirms it. Otherwise it is sent as the merge below (as of now).
                msg = mg.msg
            else:
                k = mg.key(mid)
                if k in cache:
                    msg = cache[k]
                else:
                    msg = cache[k] = self._merged_message(mid, mg, now)
                if msg is None:
                    continue
                self.conflated += 1
            assert msg is not None
            fr = conn.frame_with(msg if fmt is None else msg.formatted(fmt), sub, token)
            frames.append(fr)
            metas.append((sub.id, msg, mg.token_before))
            n += len(fr)
        return n

    def flush_conflated(self, conflate_ms: int) -> None:
        """Send what every subscription of window ``conflate_ms`` gathered."""
        dirty = self._dirty.pop(conflate_ms, None)
        if not dirty:
            return
        now = now_ms()
        cache: dict[tuple[object, ...], Message | None] = {}
        judged: dict[str, bool] = {}
        token = self.state.token
        for sub in dirty:
            cp = sub.cpending
            sub.cpending = None
            conn = sub.conn
            if not cp or conn.closed or conn.resync_pending or sub.id not in conn.subs:
                continue
            frames: list[bytes] = []
            metas: list[Any] = []
            try:
                n = self._merged_frames(sub, list(cp.items()), token, cache, now, frames, metas, judged)
                if frames:
                    conn.push(frames, metas, n)
            except Exception:
                # what it gathered is gone: close it (it resumes with its token and is replayed the
                # changes) rather than let it, or the subscriptions after it, sit on old prices
                self._close_failed(conn, "conflated flush")

    async def _conflate_loop(self, conflate_ms: int) -> None:
        try:
            while not self.closing:
                await asyncio.sleep(conflate_ms / 1000)
                try:
                    self.flush_conflated(conflate_ms)
                except Exception:  # a bug must not stop every conflated subscription
                    logger.exception("conflation flush (%d ms) failed", conflate_ms)
                if not self._conflating.get(conflate_ms):
                    break
        finally:
            if self._cf_tasks.get(conflate_ms) is asyncio.current_task():
                del self._cf_tasks[conflate_ms]
            if not self._conflating.get(conflate_ms):
                self._conflating.pop(conflate_ms, None)

    # -- resync and slow consumers --------------------------------------------

    @staticmethod
    def _close_failed(conn: Connection, what: str) -> None:
        """``what`` failed for ``conn`` (a bug, or a socket in a state nobody foresaw): log it
        and close that connection alone — it resumes with its token and is replayed what it
        missed — so the loop over the other connections goes on. Call from an ``except``."""
        logger.exception("%s to %s %s failed; closing it", what, conn.kind, conn.label)
        conn.close(1011, "internal error")

    def resync(self, reason: str) -> None:
        """After the node reloaded its state (log trimmed past it, epoch
        changed, Redis flushed): every subscription gets a fresh snapshot
        flagged ``recovered: false``."""
        logger.warning("resync of %d connections: %s", len(self.connections), reason)
        self.resyncs += 1
        for conn in list(self.connections):
            try:
                # queued deltas belong to the old state: the snapshot replaces them
                keep = [(f, m) for f, m in zip(conn.outbox, conn.meta) if m is None]
                conn.outbox = [f for f, _ in keep]
                conn.meta = [None] * len(keep)
                conn.outbox_bytes = 0
                for sub in list(conn.subs.values()):
                    if sub.view is not None:
                        conn.send(self.best.snapshot_message(sub), sub)
                        continue
                    if sub.replaying:  # a resume in flight ends unrecovered
                        conn.send(resumed(False), sub)
                    sub.replaying = False
                    sub.pending = None
                    sub.floor = None
                    sub.cpending = None
                    self.send_snapshot(sub, recovered=False, reason="resync")
            except Exception:  # a client that cannot be resynced is closed (it resumes), never left behind
                self._close_failed(conn, "resync")

    def _overflow_all(self, conns: Iterable[Connection]) -> None:
        """:meth:`overflow` for each of ``conns`` still over its budget (a connection may be
        listed more than once; one may have been closed or resynced meanwhile)."""
        for conn in conns:
            if not conn.closed and not conn.resync_pending and conn.outbox_bytes > conn.max_bytes:
                try:
                    self.overflow(conn)
                except Exception:  # one connection's failure must not leave the others over budget
                    self._close_failed(conn, "slow-consumer handling")

    @contextlib.contextmanager
    def _overflows_held(self) -> Iterator[None]:
        """Hold back :meth:`overflow` while a batch of deltas is queued for several
        subscriptions (or a replay and the live entries after it for one), and run it
        for the connections still over budget at the end: a collapse in between would
        merge from markets the batch has not finished queueing."""
        if self._held_overflows is not None:  # nested: the outer hold runs them
            yield
            return
        held: dict[Connection, None] = {}
        self._held_overflows = held
        try:
            yield
        finally:
            self._held_overflows = None
            if held:
                self._overflow_all(list(held))

    def overflow(self, conn: Connection) -> None:
        """``conn`` went over its byte budget: collapse its outbox by market;
        if that is not enough, drop its queued stream data and resync it
        with fresh snapshots when its writer is ready; if it is still
        writing the previous resync snapshot, close it."""
        held = self._held_overflows
        if held is not None:
            held[conn] = None
            return
        self.overflows += 1
        if not any(s.replaying for s in conn.subs.values()):
            self.collapse(conn)
            if conn.outbox_bytes <= conn.max_bytes // 2:
                return
        if conn.snapshot_in_flight:
            self.evict(conn, f"more than {conn.max_bytes} bytes queued while a snapshot was still being written; "
                             "read faster or subscribe to fewer markets")
            return
        self.slow_resyncs += 1
        keep = [f for f, m in zip(conn.outbox, conn.meta) if m is None]
        conn.outbox = keep
        conn.meta = [None] * len(keep)
        conn.outbox_bytes = 0
        conn.resync_pending = True
        for sub in conn.subs.values():
            sub.replaying = False
            sub.pending = None
            sub.floor = None
            sub.cpending = None
        conn._wake()
        logger.info("slow consumer %s: outbox over %d bytes after collapsing, resyncing with a snapshot",
                    conn.label, conn.max_bytes)

    def evict(self, conn: Connection, message: str) -> None:
        """Close a slow consumer with an ``error`` (code ``slow_consumer``, WS 4008).

        A writer blocked on the client is interrupted so that it can write
        the error and close at once (see :func:`streaming.server`'s final writes)."""
        if conn.closed:
            return
        self.slow_closes += 1
        logger.warning("closing slow consumer %s: %s", conn.label, message)
        conn.close(SLOW_CONSUMER_CODE, "slow consumer", error_message("slow_consumer", message))
        interrupt(conn)

    def collapse(self, conn: Connection) -> None:
        """Replace the queued deltas of each (subscription, market) by one
        message with the market's latest state (``conflated: true``);
        heartbeats are dropped, control messages kept in order; of the live
        event states only the latest per (subscription, event) is kept, in its
        place among the control messages (its ``stale`` and a ``status``'s
        ``stale_events`` are the server's word as of sending: the later one must
        stay later; the merged deltas follow — a state does not depend on them;
        no control message carries a token ahead of them: a ``status`` carries none).
        A merge is built from the market as the node holds it now, so it also takes
        in that market's changes the subscription's conflation window still holds
        (sent now, not later with a seq the merge already carries), and the callers
        that queue one entry for several subscriptions (or a replay and the live
        entries held meanwhile) collapse only once all of it is queued."""
        self.collapses += 1
        before = len(conn.outbox)
        frames: list[bytes] = []
        metas: list[Any] = []
        groups: dict[Subscription, dict[str, Merge]] = {}
        last_state: dict[tuple[int, str], int] = {}  # queued in version order: the later one wins
        for i, m in enumerate(conn.meta):
            if type(m) is StateMeta:
                last_state[(m.sid, m.event_id)] = i
        n_states = 0
        for i, (f, m) in enumerate(zip(conn.outbox, conn.meta)):
            if m is None:
                frames.append(f)
                metas.append(None)
                continue
            if m is HEARTBEAT:
                continue
            if type(m) is StateMeta:
                if last_state[(m.sid, m.event_id)] == i and m.sid in conn.subs:
                    frames.append(f)
                    metas.append(m)
                    n_states += len(f)
                continue
            for sid, msg, tb in (m.metas if isinstance(m, ReplayBlock) else (m,)):
                sub = conn.subs.get(sid)
                if sub is None:
                    continue
                g = groups.get(sub)
                if g is None:
                    g = groups[sub] = {}
                mid = msg.info.market_id
                mg = g.get(mid)
                if mg is None:
                    mg = g[mid] = Merge(tb)
                mg.add(msg)
        now = now_ms()
        cache: dict[tuple[object, ...], Message | None] = {}
        judged: dict[str, bool] = {}
        n = n_states
        for sub, g in groups.items():
            if sub.id not in conn.subs:
                continue
            cp = sub.cpending
            if cp:
                # a merge is built from the market as the node holds it now, which includes the
                # changes this subscription's conflation window still holds: they go in the merge
                # (sent now), else the window's message would come later with a seq the merge
                # already carries and every client would drop it as a duplicate
                for mid, mg in g.items():
                    later = cp.pop(mid, None)
                    if later is not None:
                        mg.fold(later)
            if cp:  # still gathering other markets for this sub: stay before those changes
                last = self.safe_token(sub)
            else:
                last = self.state.token
            n += self._merged_frames(sub, list(g.items()), last, cache, now, frames, metas, judged)
        conn.outbox = frames
        conn.meta = metas
        conn.outbox_bytes = n
        self.collapsed_frames += max(0, before - len(frames))
        logger.info("slow consumer %s: collapsed %d queued frames to %d", conn.label, before, len(frames))

    def resync_frames(self, conn: Connection) -> list[bytes]:
        """Fresh snapshots (``recovered: false``, ``reason: "slow_consumer"``)
        for every subscription of ``conn``, built now, each followed by the
        current states of the events among its markets."""
        out = []
        states = self._has_states()
        for sub in conn.subs.values():
            if sub.view is not None:
                out.append(conn.frame(self.best.snapshot_message(sub), sub))
                continue
            events: dict[str, None] | None = {} if states else None
            msg = self.snapshot_message(sub.filter, recovered=False, reason="slow_consumer",
                                        events=events).formatted(sub.fmt)
            out.append(conn.frame(msg, sub, True))
            if events:
                out.extend(self._state_frames(sub, events, now_ms()))
        return out

    # -- status ---------------------------------------------------------------

    def started(self) -> None:
        """The node loaded its state from the store (at start): links it adopted while it was
        down moved nothing it knows of, so a resume of a subscription filtered on a canonical
        event from a token issued before now is not recovered (:meth:`_relinked_after`)."""
        self._relink_floor = _later(self._relink_floor, self._positions())

    def tenants_changed(self) -> None:
        """The tenants file changed (any entry, with or without open streams): a restricted
        credential's resume from a token issued before now is not recovered — what it may see
        then is not known to be what it may see now (:meth:`_resume_void`)."""
        self._grants_changed = self._positions()

    def relinked(self, moved_from: Mapping[str, tuple[str | None, bool]]) -> None:
        """The linker moved markets to another canonical event (called right after
        :meth:`NodeState.set_links`): a subscription filtered by canonical event that matches
        one of them now gets it as an ``image`` (as a market that newly matches does); one
        that matched it before the move and does not now gets ``removed`` (in order with its
        deltas: conflation and a slow consumer's collapse keep it as the market's last
        message), and nothing of it after; ``view=best`` subscriptions get the changed best
        prices, and a ``removed`` market of each group they hold that left its event
        (:meth:`streaming.bestview.BestView.refresh`; a failure there closes their connections:
        they reconnect to a fresh snapshot rather than keep another match's price). A resume
        from a token issued before the move, of a subscription filtered on a canonical event
        the move changed, is not recovered (:meth:`_relinked_after`)."""
        st = self.state
        now = now_ms()
        # (market id, market, keys now, keys before the move)
        moved: list[tuple[str, Market, MarketKeys, MarketKeys]] = []
        touched: set[str] = set()
        for mid, (was, _) in moved_from.items():
            m = st.markets.get(mid)
            if m is None:
                continue
            keys = st.keys_of(m)
            prev: MarketKeys = (keys[0], keys[1], keys[2], keys[3], was, keys[5], keys[6], keys[7])
            if was is not None:
                touched.add(was)
            if keys[4] is not None:
                touched.add(keys[4])
            moved.append((mid, m, keys, prev))
        at = self._positions()
        for cid in touched:
            self._relinks.pop(cid, None)
            self._relinks[cid] = at
        while len(self._relinks) > RELINK_MARKS_MAX:
            self._relink_floor = _later(self._relink_floor, self._relinks.pop(next(iter(self._relinks))))
        images: dict[str, Message] = {}
        removals: dict[str, Message] = {}
        states = self._has_states()
        # the relink's messages go with the token from before it (old positions' links): a collapse or
        # a conflation window that holds one hands out no token naming the new links ahead of it
        before = st.links_token_before
        for conn in list(self.connections):
            try:
                for sub in list(conn.subs.values()):
                    f = sub.filter
                    if sub.view is not None or sub.replaying or f.event is None or conn.closed:
                        continue
                    events: dict[str, None] = {}
                    for mid, m, keys, prev in moved:
                        if not f.match(mid, keys):
                            if f.match(mid, prev):  # it held the market before the move
                                gone = removals.get(mid)
                                if gone is None:
                                    gone = removals[mid] = removed_message(mid, None, None)
                                self._deliver(sub, [gone], before, st.token)
                            continue
                        msg = images.get(mid)
                        if msg is None:
                            age, stale = st.age_stale(m, now)
                            # no token: a relink is no log entry, and the token after it names the new
                            # links — a client must not hold it before it got every message of the relink
                            # (its next heartbeat brings it, queued behind them)
                            msg = images[mid] = delta_message(image_of(m), market_json=st.market_json(m, now),
                                                              age_ms=age, stale=stale, sent_at=now, token=None,
                                                              prev_token=None,
                                                              info=DeltaInfo(mid, (), False, False, True))
                        # in order with the market's deltas and a `removed` of a move out before it
                        # (conflation and a slow consumer's collapse merge them: the last word wins)
                        self._deliver(sub, [msg], before, st.token)
                        if states:
                            for eid in st.state_events(m):
                                events[eid] = None
                    if events:  # the events it newly matches: their states too
                        self.send_states(sub, events)
            except Exception:  # a client that cannot be told of the move is closed (it resumes unrecovered)
                self._close_failed(conn, "relink")
        if self.best.subs:
            try:
                self.best.refresh()
            except Exception:  # what they hold may be another match's price: they reconnect to a fresh one
                for conn in {sub.conn for sub in self.best.subs}:
                    self._close_failed(conn, "the best view")

    def status(self, source: str, state: str, reason: str | None, stale_ids: list[str],
               turned_stale: Iterable[str] = (), turned_fresh: Iterable[str] = (), *,
               stale_events: Iterable[str] = ()) -> None:
        """Announce a source health change (or a change of its stale
        markets or stale event states) to every subscription: ``stale_markets``
        lists the stale markets of ``source`` that match the subscription,
        ``turned_stale`` / ``turned_fresh`` those that changed since the last
        status, ``stale_events`` the events whose state (from ``source``) is stale and
        reaches the subscription (:meth:`_stale_events_seen`). No resume token: it never moves a
        client's resume position."""
        stale = set(stale_ids)
        went_stale, went_fresh = set(turned_stale), set(turned_fresh)
        now = now_ms()
        announced = self._announced[source] = Announced(state, reason, stale, now, stale_events=stale_events)
        stale_states = announced.stale_events  # (what a resume is told: send_statuses)
        cache: dict[Filter, Message] = {}  # encoded once per distinct filter (no token: framed per subscription id)

        if self.best.subs:  # a book turned stale or fresh: best prices may move without a delta
            try:
                self.best.refresh()
            except Exception:  # the best view's failure must not hold back everyone's status
                logger.exception("refreshing the best view failed")
        for conn in list(self.connections):
            try:
                for sub in list(conn.subs.values()):
                    if sub.replaying or sub.view is not None:
                        continue
                    f = sub.filter
                    if f.visible is not None and f.visible[1] is not None and source not in f.visible[1]:
                        continue  # a source the tenant may not see
                    msg = cache.get(f)
                    if msg is None:
                        msg = cache[f] = status_message(
                            source=source, state=state, reason=reason, stale_markets=self._stale_seen(f, stale),
                            turned_stale=self._stale_seen(f, went_stale), turned_fresh=self._stale_seen(f, went_fresh),
                            as_of=now,
                            stale_events=self._stale_events_seen(f, stale_states), token=None)
                    # no resume token (as after a resume, send_statuses): a status is a control
                    # message, kept when a slow consumer's queued deltas are dropped or merged after
                    # it — a token on it would stand ahead of deltas not delivered yet, and a client
                    # resuming from it would never be sent them
                    conn.send_raw(conn.frame(msg, sub))
            except Exception:  # a client that cannot be told its source's health is closed (it resumes)
                self._close_failed(conn, "status")

    def send_statuses(self, sub: Subscription) -> None:
        """After a recovered resume (queued after the replayed deltas): the current status of
        every source its tenant may see — the ``status`` message a change sends, with
        ``stale_markets`` and ``stale_events`` as the subscription sees them and no ``turned_*``
        (nothing turned since the last one) — since the status changes of its time away are not
        in the log. No resume token (like the event states after a resume): it never moves the
        client's position. "Current" is the last announced status (:meth:`status`; the node
        announces every change of a source's state, stale markets or stale event states within a
        health refresh), or, for a source not announced since the node started, its status
        worked out now."""
        conn = sub.conn
        if conn.closed or sub.view is not None:
            return
        st = self.state
        f = sub.filter
        v = f.visible
        allowed = v[1] if v is not None else None
        now = now_ms()
        frames = []
        for name in sorted(st.health):
            if allowed is not None and name not in allowed:
                continue  # a source the tenant may not see
            a = self._announced.get(name)
            if a is None or (a.worked_out and now - a.as_of > WORKED_OUT_MS):
                h = st.source_health(name, now)
                if h is None:
                    continue
                held = self.event_states
                stale_events = held.stale_ids(st, now, name).get(name, ()) if held is not None else ()
                a = self._announced[name] = Announced(h.state, h.reason, st.stale_ids(name, now), now,
                                                      worked_out=True, stale_events=stale_events)
            msg = a.msgs.get(f)
            if msg is None:
                if len(a.msgs) >= STATUS_FILTERS_MAX:
                    a.msgs.clear()
                msg = a.msgs[f] = status_message(source=name, state=a.state, reason=a.reason,
                                                 stale_markets=self._stale_seen(f, a.stale), as_of=a.as_of,
                                                 stale_events=self._stale_events_seen(f, a.stale_events),
                                                 token=None)
            frames.append(conn.frame(msg, sub))
        if not frames:
            return
        _queue_control(conn, frames)

    def _stale_seen(self, f: Filter, stale: AbstractSet[str]) -> list[str]:
        """The markets among ``stale`` that filter ``f`` matches, sorted (through the index when
        ``f`` names markets or events: a resume storm of one-event subscriptions stays cheap)."""
        st = self.state
        if f.market is not None or f.event is not None:
            out = [m.market_id for m in st.matching(f) if m.market_id in stale]
        else:
            out = [mid for mid in stale if (m := st.markets.get(mid)) is not None and f.match(mid, st.keys_of(m))]
        out.sort()
        return out

    def _stale_events_seen(self, f: Filter, stale: frozenset[str]) -> list[str]:
        """The events among ``stale`` (stale event states of one source) whose state filter ``f``
        gets — the rule of the ``event_state`` messages (:meth:`_sees_state`: a market of the event
        it matches and its tenant may see) — sorted (through the index when ``f`` names markets or
        events, as :meth:`_stale_seen`)."""
        held = self.event_states
        if not stale or held is None:
            return []
        states = held.states
        candidates = self._events_of(f) if f.market is not None or f.event is not None else stale
        return sorted(eid for eid in candidates if eid in stale and (es := states.get(eid)) is not None
                      and self._sees_state(f, es, self._event_markets(eid)))

    # -- send deadlines -------------------------------------------------------

    async def _deadline_loop(self) -> None:
        """Every ~deadline/4: interrupt writes that have been blocked on their client longer
        than ``send_timeout_s`` (one watchdog for all connections instead of a timer per write;
        timers per write cost CPU and, by the hundred thousand in the loop's heap, latency)."""
        period = max(0.05, min(1.0, self.send_timeout_s / 4))
        while not self.closing and self.connections:
            await asyncio.sleep(period)
            limit = self.loop_time() - self.send_timeout_s
            for conn in list(self.connections):
                if conn.sink is None and conn.in_send and conn.send_started < limit and not conn.interrupted:
                    conn.deadline_missed = True
                    interrupt(conn)

    # -- heartbeats -----------------------------------------------------------

    async def _heartbeat_loop(self, interval_ms: int) -> None:
        """Every ``interval_ms``: one heartbeat message, queued for every
        connection of that interval (skipping subscriptions mid-replay)."""
        try:
            while not self.closing:
                await asyncio.sleep(interval_ms / 1000)
                conns = self._buckets.get(interval_ms)
                if not conns:
                    break
                try:
                    self.heartbeat(conns)
                except Exception:  # a bug must not end the heartbeats of everyone on this interval
                    logger.exception("heartbeat (every %d ms) failed", interval_ms)
        finally:
            if self._hb_tasks.get(interval_ms) is asyncio.current_task():
                del self._hb_tasks[interval_ms]
            if not self._buckets.get(interval_ms):
                self._buckets.pop(interval_ms, None)

    def heartbeat(self, conns: Iterable[Connection]) -> None:
        """Queue one heartbeat (``as_of`` = now) for each subscription of ``conns``. A conflated
        subscription with changes in its window gets the token from before them and ``held``: the
        markets whose changes are held (the heartbeat vouches for everything else; what the client
        holds of those may be behind by up to the window)."""
        now = now_ms()
        msg = heartbeat_message(as_of=now, token=self.state.token)
        for conn in list(conns):
            if conn.closed or conn.resync_pending:
                continue
            try:
                # a copy: a push over the budget may evict the connection, which clears its subs
                for s in tuple(conn.subs.values()):
                    if conn.closed or conn.resync_pending:
                        break
                    if s.replaying:
                        continue
                    if s.cpending:
                        tok = self.safe_token(s)
                        fr = conn.frame_with(heartbeat_message(as_of=now, token=tok, held=s.cpending), s, tok)
                    else:
                        fr = conn.frame(msg, s, True)
                    conn.push1(fr, HEARTBEAT)
            except Exception:  # one connection's failure must not cost the others their heartbeat
                self._close_failed(conn, "heartbeat")


def _stale_at(st: NodeState, mid: str, m: "Market", now: int, judged: dict[str, bool]) -> bool:
    """``stale`` of market ``m`` at ``now``, judged once per market per flush (``judged``)."""
    stale = judged.get(mid)
    if stale is None:
        stale = judged[mid] = st.age_stale(m, now)[1]
    return stale


def says_stale(msg: Message) -> bool:
    """The ``stale`` a ``delta`` message carries (its last field, :func:`streaming.encoding.delta_message`)."""
    return msg.json.endswith(b'"stale":true}')


def must_send_now(msgs: list[Message]) -> list[str]:
    """The markets among ``msgs`` (one entry's messages for a conflated subscription) whose change
    must not wait for the conflation window's end (:meth:`Hub._flush_markets`): a status may have
    changed — a header (the book sends one only when a field of it changed: the market's status,
    in play, …), a selection's ``status`` (a selection change carries only its changed fields),
    an image (the whole market) — and a ``removed`` a change made (only a header change moves a
    market's keys: at the off a provider suspends a market and turns it in play in one change,
    which takes it out of a pre-match filter; it waited for the window while the client held it
    open). The rest wait — a relink's ``removed`` too (no change of the market, no log entry: no
    token): the window keeps it as the market's last word (a market relinked out and back within
    the window is one image)."""
    out: list[str] = []
    for m in msgs:
        info: Any = m.info
        if info is None:
            continue
        if (info.is_image or info.has_header or (info.sel_ids and b'"status":' in m.json)
                or (info.removed and m.token is not None)):
            if info.market_id not in out:
                out.append(info.market_id)
    return out


def interrupt(conn: Connection) -> None:
    """Cancel the write ``conn``'s writer is blocked in (it then writes its last words and closes).
    A sink connection blocked by flow control writes its last words (what is
    queued: the error) past flow control now and ends."""
    sink = conn.sink
    if sink is not None:
        if conn.paused and not conn.finished and not conn.interrupted:
            conn.interrupted = True
            conn.finished = True
            try:
                sink.last_words(conn, conn.take())
            except Exception:  # never leave the socket open and silent
                logger.exception("last words to %s %s failed; aborting it", conn.kind, conn.label)
                with contextlib.suppress(Exception):
                    sink.abort()
        return
    w = conn.writer
    if conn.in_send and w is not None and not w.done() and not conn.interrupted:
        conn.interrupted = True
        w.cancel()


def tok_bytes(tok: ResumeToken) -> bytes:
    """The token as the client sent it (re-encoded canonically)."""
    return encode_token(tok.epoch, tok.positions, tok.links_version)


def _after(keys: Sequence[StreamId], since: Sequence[StreamId]) -> bool:
    """Whether a resume token at ``keys`` was issued after the node stood at ``since``: at or past
    it in every partition and past it in one (a token equal to ``since`` may be from before it)."""
    return (len(keys) == len(since) and all(k >= s for k, s in zip(keys, since))
            and any(k > s for k, s in zip(keys, since)))


def _later(a: tuple[StreamId, ...] | None, b: tuple[StreamId, ...]) -> tuple[StreamId, ...]:
    """Per partition, the later of ``a`` (None: none) and ``b``."""
    if a is None or len(a) != len(b):
        return b
    return tuple(max(x, y) for x, y in zip(a, b))


def _queue_control(conn: Connection, frames: list[bytes]) -> None:
    """Queue control frames built for ``conn`` (states, statuses): one outbox item when its
    framing takes complete wire units, else one per frame."""
    if conn.framing.shared:
        conn.send_raw(frames[0] if len(frames) == 1 else b"".join(frames))
    else:
        for fr in frames:
            conn.send_raw(fr)
