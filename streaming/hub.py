"""Fan-out hub: subscriptions, a filter index, per-connection outboxes.

No Starlette/ASGI imports: transports (:mod:`streaming.sse`,
:mod:`streaming.ws`) create a :class:`Connection`, subscribe it, and run ONE
writer task per connection that waits on :meth:`Connection.wait` and writes
whatever :meth:`Connection.take` returns in one go (coalesced).

Policy (DESIGN §6, style §3.8):

- the reader hands each applied log entry to :meth:`Hub.dispatch` once; a
  delta only visits subscriptions indexed under its market id, event id or
  sport (or subscriptions with none of these), and the filter (incl.
  ``in_play``, evaluated against node state) decides;
- the hub never awaits a client: it appends pre-encoded bytes to the
  connection's outbox and wakes its writer;
- all of one entry's matching deltas go to a subscription in one append,
  and only the last carries the advanced resume token (SSE ``id:``, WS
  ``"token"``), so resuming from the last seen token never skips a delta;
- byte budget per connection (``outbox_max_bytes``) on queued stream data:
  over it, the queued data is dropped and the writer's next take starts
  with a fresh snapshot per subscription (``recovered: false``,
  ``reason: "slow_consumer"``), built from the state at that moment; going
  over again while that snapshot is still being written closes the
  connection with an ``error`` (code ``slow_consumer``). Memory stays
  bounded (budget + one snapshot per subscription); see :class:`Connection`;
- a market that newly matches a subscription (e.g. turns in-play under
  ``in_play=true``) is sent as an ``image`` delta;
- heartbeats every ``heartbeat_ms`` per connection (one timer per distinct
  interval; one encoded message per tick).

Resume (:meth:`Hub.subscribe` with a token): same epoch and every position
still covered → ``resumed {recovered: true}`` then the missed deltas in log
order (from the in-memory replay ring, else from Redis ``log_range``),
deduplicated against live deltas by per-partition floors; otherwise
``resumed {recovered: false}`` and a fresh snapshot. Never a partial replay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Literal

from redis.exceptions import RedisError

from feed.errors import StoreError
from feed.store import Store
from streaming.encoding import (
    Message, ResumeToken, StreamId, ack_message, decode_token, encode_token, error_message, heartbeat_message,
    parse_stream_id, resumed_message, snapshot_message, status_message,
)
from streaming.state import Filter, NodeState, PreparedEntry, now_ms

__all__ = ["Connection", "Hub", "Subscription"]

logger = logging.getLogger(__name__)

Kind = Literal["sse", "ws"]

#: Most live entries buffered for one subscription while it replays from Redis.
PENDING_MAX = 50_000


class Subscription:
    """One filter on one connection. ``id`` is unique per connection (WS ``"sub"``)."""

    __slots__ = ("id", "conn", "filter", "conflate_ms", "replaying", "pending", "floor")

    def __init__(self, id: int, conn: "Connection", f: Filter, conflate_ms: int = 0) -> None:
        self.id = id
        self.conn = conn
        self.filter = f
        self.conflate_ms = conflate_ms
        #: True while a Redis replay is in flight; live entries wait in ``pending``.
        self.replaying = False
        self.pending: list[PreparedEntry] | None = None
        #: per-partition positions already delivered by a replay: live entries at or below are skipped.
        self.floor: tuple[StreamId, ...] | None = None

    def __repr__(self) -> str:
        return f"Subscription({self.id}, {self.filter})"


class Connection:
    """One client connection: its subscriptions and its outbox of encoded frames.

    kind: "sse" (frames are SSE events) or "ws" (frames are UTF-8 JSON
    messages, one per WebSocket text frame).

    Byte budget (``max_bytes``) on the queued stream data: a push that would
    exceed it empties the outbox and marks the connection for a resync — the
    hub builds one fresh snapshot per subscription when the writer next
    takes the outbox (so a slow client costs one snapshot per write, built
    from the state at that moment), and stream data pushed meanwhile is
    dropped (the snapshot covers it). Going over budget again while that
    snapshot is still being written closes the connection with an
    ``error`` (code ``slow_consumer``). Snapshots and control messages
    (ack, pong, error) are queued regardless of the budget.
    """

    __slots__ = ("hub", "kind", "label", "heartbeat_ms", "max_bytes", "subs", "outbox", "outbox_bytes",
                 "wakeup", "closed", "close_code", "close_reason", "_next_sub", "sent_frames", "sent_bytes",
                 "resync_pending", "snapshot_in_flight")

    def __init__(self, hub: "Hub", kind: Kind, *, heartbeat_ms: int, max_bytes: int, label: str = "") -> None:
        self.hub = hub
        self.kind = kind
        self.label = label
        self.heartbeat_ms = heartbeat_ms
        self.max_bytes = max_bytes
        self.subs: dict[int, Subscription] = {}
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
        self.wakeup = asyncio.Event()
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

    # -- framing --------------------------------------------------------------

    def frame(self, msg: Message, sub: Subscription | None, with_token: bool = False) -> bytes:
        """The bytes of ``msg`` for this transport (SSE event or WS JSON with ``sub``)."""
        if self.kind == "sse":
            return msg.sse(with_token)
        return msg.ws(sub.id if sub is not None else None, with_token)

    def send(self, msg: Message, sub: Subscription | None = None, with_token: bool = False) -> None:
        """Queue one control message or snapshot (ack, pong, error, resumed,
        snapshot, status), outside the byte budget."""
        if self.closed:
            return
        self._append([self.frame(msg, sub, with_token)])

    # -- outbox ---------------------------------------------------------------

    def push(self, frames: list[bytes]) -> None:
        """Queue stream data (all frames or, over budget, none) and wake the writer."""
        if self.closed or self.resync_pending or not frames:
            return
        n = 0
        for f in frames:
            n += len(f)
        if self.outbox_bytes + n > self.max_bytes:
            self.hub.overflow(self)
            return
        self.outbox.extend(frames)
        self.outbox_bytes += n
        self.wakeup.set()

    def _append(self, frames: list[bytes]) -> None:
        self.outbox.extend(frames)
        self.outbox_bytes += sum(len(f) for f in frames)
        self.wakeup.set()

    def take(self) -> list[bytes]:
        """Everything queued, oldest first (the writer sends it in one go);
        after an overflow, fresh snapshots come first."""
        self.snapshot_in_flight = False
        out = self.outbox
        if self.resync_pending and not self.closed:
            self.resync_pending = False
            self.snapshot_in_flight = True
            out = self.hub.resync_frames(self) + out
        if out:
            self.outbox = []
            self.outbox_bytes = 0
            self.sent_frames += len(out)
        return out

    async def wait(self) -> None:
        """Until there is something to write or the connection closed (the
        writer calls it after each write, so a resync snapshot handed out by
        the previous take() has been written)."""
        self.snapshot_in_flight = False
        if self.outbox or self.closed or self.resync_pending:
            return
        await self.wakeup.wait()
        self.wakeup.clear()

    def close(self, code: int = 1000, reason: str = "", error: Message | None = None) -> None:
        """Stop queuing; the writer flushes what is queued (after ``error``,
        if given, replaces it) and ends the connection."""
        if self.closed:
            return
        if error is not None:
            self.outbox = [self.frame(error, None)]
            self.outbox_bytes = len(self.outbox[0])
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        self.wakeup.set()
        self.hub.disconnect(self)

    def next_sub_id(self) -> int:
        self._next_sub += 1
        return self._next_sub

    def __repr__(self) -> str:
        return f"Connection({self.kind}, {self.label}, subs={len(self.subs)}, outbox={self.outbox_bytes})"


class Hub:
    """Subscriptions of every connection of this node and the fan-out of
    prepared entries to them.

    state: the node state (markets, positions, token, staleness); store:
    used for resumes older than the replay ring (None = ring only);
    outbox_max_bytes: byte budget per connection; replay_max_entries: most
    log entries one resume may read from Redis.
    """

    def __init__(self, state: NodeState, store: Store | None, *, outbox_max_bytes: int,
                 replay_max_entries: int = 10_000) -> None:
        self.state = state
        self.store = store
        self.outbox_max_bytes = outbox_max_bytes
        self.replay_max_entries = replay_max_entries
        self.connections: set[Connection] = set()
        self._by_market: dict[str, set[Subscription]] = {}
        self._by_event: dict[str, set[Subscription]] = {}
        self._by_sport: dict[str, set[Subscription]] = {}
        self._wild: set[Subscription] = set()
        self._buckets: dict[int, set[Connection]] = {}
        self._hb_tasks: dict[int, asyncio.Task[None]] = {}
        self.closing = False
        # counters (for /metrics later)
        self.overflows = 0
        self.slow_closes = 0
        self.resumes_recovered = 0
        self.resumes_failed = 0

    # -- connections ----------------------------------------------------------

    def connect(self, kind: Kind, *, heartbeat_ms: int, label: str = "") -> Connection:
        """A new connection, registered for heartbeats every ``heartbeat_ms``."""
        conn = Connection(self, kind, heartbeat_ms=heartbeat_ms, max_bytes=self.outbox_max_bytes, label=label)
        if self.closing:
            conn.closed = True
            conn.close_code, conn.close_reason = 1001, "server shutting down"
            return conn
        self.connections.add(conn)
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
            self._unindex(sub)
        conn.subs.clear()
        bucket = self._buckets.get(conn.heartbeat_ms)
        if bucket is not None:
            bucket.discard(conn)
        if not conn.closed:
            conn.closed = True
            conn.wakeup.set()
        logger.info("disconnect %s %s%s", conn.kind, conn.label,
                    f" ({conn.close_reason})" if conn.close_reason else "")

    def close_all(self, reason: str = "server shutting down") -> None:
        """Close every connection (shutdown); new connections are refused."""
        self.closing = True
        for conn in list(self.connections):
            conn.close(1001, reason)
        for task in self._hb_tasks.values():
            task.cancel()
        self._hb_tasks.clear()

    # -- index ----------------------------------------------------------------

    def _index_sets(self, f: Filter) -> Iterable[set[Subscription]]:
        if f.market is not None:
            return [self._by_market.setdefault(k, set()) for k in f.market]
        if f.event is not None:
            return [self._by_event.setdefault(k, set()) for k in f.event]
        if f.sport is not None:
            return [self._by_sport.setdefault(k, set()) for k in f.sport]
        return [self._wild]

    def _index(self, sub: Subscription) -> None:
        for s in self._index_sets(sub.filter):
            s.add(sub)

    def _unindex(self, sub: Subscription) -> None:
        f = sub.filter
        for index, keys in ((self._by_market, f.market), (self._by_event, f.event), (self._by_sport, f.sport)):
            if keys is None:
                continue
            for k in keys:
                s = index.get(k)
                if s is not None:
                    s.discard(sub)
                    if not s:
                        del index[k]
            return
        self._wild.discard(sub)

    # -- subscriptions --------------------------------------------------------

    async def subscribe(self, conn: Connection, f: Filter, *, resume: str | None = None,
                        ack_id: int | str | None = None, conflate_ms: int = 0) -> Subscription:
        """Add a subscription and queue what it starts with.

        WebSocket: ``ack {id, sub}`` first. No ``resume``: a ``snapshot`` of
        the matching markets. With ``resume``: ``resumed`` and either the
        missed deltas (recovered) or a fresh snapshot (``recovered: false``).
        """
        sub = Subscription(conn.next_sub_id(), conn, f, conflate_ms)
        if conn.closed:
            return sub
        conn.subs[sub.id] = sub
        self._index(sub)
        if conn.kind == "ws":
            conn.send(ack_message(ack_id, sub.id))
        logger.info("subscribe %s %s sub=%d filter=%s resume=%s", conn.kind, conn.label, sub.id, f,
                    bool(resume))
        if resume is None:
            self.send_snapshot(sub)
            return sub
        tok = decode_token(resume)
        st = self.state
        if tok is None or tok.epoch != st.epoch or len(tok.keys) != st.partitions:
            self._not_recovered(sub)
        elif st.ring.covers(tok.keys):
            self._replay_from_ring(sub, tok)
        elif f.in_play is not None or self.store is None:
            # in_play cannot be judged for past deltas read back from Redis
            self._not_recovered(sub)
        else:
            await self._replay_from_redis(sub, tok)
        return sub

    def unsubscribe(self, conn: Connection, sub_id: int) -> bool:
        """Remove a subscription; False when ``sub_id`` is unknown."""
        sub = conn.subs.pop(sub_id, None)
        if sub is None:
            return False
        self._unindex(sub)
        sub.replaying = False
        sub.pending = None
        return True

    # -- snapshots ------------------------------------------------------------

    def snapshot_message(self, f: Filter, *, recovered: bool | None = None, reason: str | None = None) -> Message:
        """A ``snapshot`` of the markets matching ``f``, as of now, carrying the node's token."""
        st = self.state
        now = now_ms()
        return snapshot_message((st.market_json(m, now) for m in st.matching(f)), as_of=now, token=st.token,
                                recovered=recovered, reason=reason)

    def send_snapshot(self, sub: Subscription, *, recovered: bool | None = None, reason: str | None = None) -> None:
        sub.conn.send(self.snapshot_message(sub.filter, recovered=recovered, reason=reason), sub, True)

    def _not_recovered(self, sub: Subscription) -> None:
        self.resumes_failed += 1
        sub.replaying = False
        sub.pending = None
        sub.conn.send(resumed_message(recovered=False), sub)
        self.send_snapshot(sub, recovered=False)

    # -- resume ---------------------------------------------------------------

    def _replay_from_ring(self, sub: Subscription, tok: ResumeToken) -> None:
        conn, f = sub.conn, sub.filter
        frames: list[bytes] = []
        n = 0
        for entry in self.state.ring.since(tok.keys):
            msgs = [m for pd in entry.deltas if (m := pd.message_for(f)) is not None]
            if not msgs:
                continue
            for m in msgs[:-1]:
                frames.append(conn.frame(m, sub, False))
                n += len(frames[-1])
            frames.append(conn.frame(msgs[-1], sub, True))
            n += len(frames[-1])
            if n > conn.max_bytes:
                self._not_recovered(sub)
                return
        self._set_floor(sub, tok.keys)
        self.resumes_recovered += 1
        conn.send(resumed_message(recovered=True, token=tok_bytes(tok)), sub, True)
        conn.push(frames)

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
            rows: dict[int, list[tuple[str, list]]] = {}
            for p in range(st.partitions):
                rows[p] = await store.log_range(p, tok.positions[p], count=limit + 1)
            firsts = [await store.first_log_id(p) for p in range(st.partitions)]
        except (RedisError, OSError, StoreError) as exc:
            logger.warning("resume of %s sub=%d from redis failed: %s", conn.label, sub.id, exc)
            if sub.replaying and not conn.closed:
                self._not_recovered(sub)
            return
        if not sub.replaying or conn.closed or sub.id not in conn.subs:
            return  # resynced, unsubscribed or closed meanwhile
        if st.generation != gen or tok.epoch != st.epoch:
            self._not_recovered(sub)
            return
        positions = [parse_stream_id(p) for p in st.positions]
        merged: list[tuple[StreamId, int, str, list]] = []
        for p in range(st.partitions):
            first = firsts[p]
            if first is not None and parse_stream_id(first) > tok.keys[p]:
                self._not_recovered(sub)  # trimmed after the token's position
                return
            if len(rows[p]) > limit:
                self._not_recovered(sub)  # too much to replay
                return
            for entry_id, deltas in rows[p]:
                key = parse_stream_id(entry_id)
                if key <= positions[p]:  # newer ones arrive live (pending or later)
                    merged.append((key, p, entry_id, deltas))
        merged.sort(key=lambda r: r[0])
        running = list(tok.positions)
        floor = list(tok.keys)
        now = now_ms()
        f = sub.filter
        frames: list[bytes] = []
        n = 0
        for key, p, entry_id, deltas in merged:
            running[p] = entry_id
            floor[p] = max(floor[p], key)
            entry = st.prepare_replay(p, entry_id, deltas, running, now)
            msgs = [m for pd in entry.deltas if (m := pd.message_for(f)) is not None]
            if not msgs:
                continue
            for m in msgs[:-1]:
                frames.append(conn.frame(m, sub, False))
                n += len(frames[-1])
            frames.append(conn.frame(msgs[-1], sub, True))
            n += len(frames[-1])
            if n > conn.max_bytes:
                self._not_recovered(sub)
                return
        pending = sub.pending or []
        sub.replaying = False
        sub.pending = None
        sub.floor = tuple(floor)
        self.resumes_recovered += 1
        conn.send(resumed_message(recovered=True, token=tok_bytes(tok)), sub, True)
        conn.push(frames)
        for entry in pending:
            self._deliver_entry(sub, entry)
        self._set_floor(sub, sub.floor)

    # -- fan-out --------------------------------------------------------------

    def dispatch(self, entry: PreparedEntry) -> None:
        """Send one applied log entry to every matching subscription (called
        by the reader once per entry; never awaits)."""
        if not self.connections:
            return
        by_market, by_event, by_sport, wild = self._by_market, self._by_event, self._by_sport, self._wild
        per_sub: dict[Subscription, list[Message]] = {}
        for pd in entry.deltas:
            groups: list[set[Subscription]] = []
            s = by_market.get(pd.market_id)
            if s:
                groups.append(s)
            sport, event_id = pd.keys[0], pd.keys[1]
            if event_id is not None and (s := by_event.get(event_id)):
                groups.append(s)
            if sport is not None and (s := by_sport.get(sport)):
                groups.append(s)
            if pd.prev is not None:
                psport, pevent = pd.prev[0], pd.prev[1]
                if pevent is not None and pevent != event_id and (s := by_event.get(pevent)):
                    groups.append(s)
                if psport is not None and psport != sport and (s := by_sport.get(psport)):
                    groups.append(s)
            if wild:
                groups.append(wild)
            for group in groups:
                for sub in group:
                    if sub.replaying:
                        pend = sub.pending
                        if pend is not None and (not pend or pend[-1] is not entry):
                            if len(pend) >= PENDING_MAX:
                                self._not_recovered(sub)
                            else:
                                pend.append(entry)
                        continue
                    msg = pd.message_for(sub.filter)
                    if msg is None:
                        continue
                    lst = per_sub.get(sub)
                    if lst is None:
                        per_sub[sub] = [msg]
                    elif lst[-1] is not msg:
                        lst.append(msg)
        p, key = entry.partition, entry.key
        for sub, msgs in per_sub.items():
            floor = sub.floor
            if floor is not None and key <= floor[p]:
                continue
            conn = sub.conn
            if len(msgs) == 1:
                conn.push([conn.frame(msgs[0], sub, True)])
            else:
                frames = [conn.frame(m, sub, False) for m in msgs[:-1]]
                frames.append(conn.frame(msgs[-1], sub, True))
                conn.push(frames)

    def _deliver_entry(self, sub: Subscription, entry: PreparedEntry) -> None:
        floor = sub.floor
        if floor is not None and entry.key <= floor[entry.partition]:
            return
        msgs = [m for pd in entry.deltas if (m := pd.message_for(sub.filter)) is not None]
        if not msgs:
            return
        conn = sub.conn
        frames = [conn.frame(m, sub, False) for m in msgs[:-1]]
        frames.append(conn.frame(msgs[-1], sub, True))
        conn.push(frames)

    def resync(self, reason: str) -> None:
        """After the node reloaded its state (log trimmed past it, epoch
        changed, Redis flushed): every subscription gets a fresh snapshot
        flagged ``recovered: false``."""
        logger.warning("resync of %d connections: %s", len(self.connections), reason)
        for conn in list(self.connections):
            for sub in list(conn.subs.values()):
                if sub.replaying:  # a resume in flight ends unrecovered
                    conn.send(resumed_message(recovered=False), sub)
                sub.replaying = False
                sub.pending = None
                sub.floor = None
                self.send_snapshot(sub, recovered=False, reason="resync")

    def overflow(self, conn: Connection) -> None:
        """``conn`` went over its byte budget: drop its queued stream data and
        resync it with fresh snapshots when its writer is ready; if it is
        still writing the previous resync snapshot, close it instead."""
        self.overflows += 1
        if conn.snapshot_in_flight:
            self.slow_closes += 1
            logger.warning("closing slow consumer %s: over %d bytes again while still writing a snapshot",
                           conn.label, conn.max_bytes)
            conn.close(1008, "slow consumer", error_message(
                "slow_consumer", f"more than {conn.max_bytes} bytes queued while a snapshot was still being "
                                 "written; read faster or subscribe to fewer markets"))
            return
        # keep control messages (ack, pong, error): they are small and answer the client
        keep = [f for f in conn.outbox if not _is_stream_frame(f, conn.kind)]
        conn.outbox = []
        conn.outbox_bytes = 0
        conn.resync_pending = True
        for sub in conn.subs.values():
            sub.replaying = False
            sub.pending = None
            sub.floor = None
        if keep:
            conn._append(keep)
        conn.wakeup.set()
        logger.info("slow consumer %s: outbox over %d bytes, resyncing with a snapshot", conn.label, conn.max_bytes)

    def resync_frames(self, conn: Connection) -> list[bytes]:
        """Fresh snapshots (``recovered: false``, ``reason: "slow_consumer"``)
        for every subscription of ``conn``, built now."""
        return [conn.frame(self.snapshot_message(sub.filter, recovered=False, reason="slow_consumer"), sub, True)
                for sub in conn.subs.values()]

    def status(self, source: str, state: str, reason: str | None, stale_ids: list[str]) -> None:
        """Announce a source health change (or a change of its stale
        markets) to every subscription: ``stale_markets`` lists the stale
        markets of ``source`` that match the subscription."""
        st = self.state
        stale = set(stale_ids)
        cache: dict[Filter, Message] = {}
        for conn in list(self.connections):
            for sub in list(conn.subs.values()):
                if sub.replaying:
                    continue
                msg = cache.get(sub.filter)
                if msg is None:
                    f = sub.filter
                    ids = sorted(mid for mid in stale if (m := st.markets.get(mid)) is not None and f.match_market(m))
                    msg = cache[f] = status_message(source=source, state=state, reason=reason, stale_markets=ids,
                                                    token=st.token)
                conn.send(msg, sub, True)

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
                msg = heartbeat_message(as_of=now_ms(), token=self.state.token)
                for conn in list(conns):
                    subs = [s for s in conn.subs.values() if not s.replaying]
                    if not subs:
                        continue
                    if conn.kind == "sse":
                        conn.push([msg.sse(True)])
                    else:
                        conn.push([msg.ws(s.id, True) for s in subs])
        finally:
            if self._hb_tasks.get(interval_ms) is asyncio.current_task():
                del self._hb_tasks[interval_ms]
            if not self._buckets.get(interval_ms):
                self._buckets.pop(interval_ms, None)


def tok_bytes(tok: ResumeToken) -> bytes:
    """The token as the client sent it (re-encoded canonically)."""
    return encode_token(tok.epoch, tok.positions)


_CONTROL_SSE = (b"event: ack", b"event: pong", b"event: error")
_CONTROL_WS = (b'{"type":"ack"', b'{"type":"pong"', b'{"type":"error"')


def _is_stream_frame(frame: bytes, kind: Kind) -> bool:
    return not frame.startswith(_CONTROL_SSE if kind == "sse" else _CONTROL_WS)
