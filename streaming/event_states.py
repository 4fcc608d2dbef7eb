"""Event states (scores, clock, period, status) on an API node: held in memory, kept current from Redis.

:class:`EventStates` holds the latest :class:`~feed.models.EventState` of
every provider event the store has (``of:{es}:state``), and
:class:`EventStateTail` keeps it current: it loads the hash, then follows
the event-state log (``of:{es}:log``) with ``XREAD BLOCK``, applying each
state only when its ``version`` is above the one held (a state is whole:
no order within an entry matters, a duplicate changes nothing). When the
entry the node stopped at is gone (the log was trimmed past it, or the store
was wiped and a new log begun) or the log went back, it reloads the hash. Listeners (:attr:`EventStates.listeners`) are called
with the states that changed — the seam the stream fan-out uses.

Staleness (as markets have it, see the README's "Staleness"): ``age_ms`` =
now − the later of the state's ``received_at`` and its source's states
confirmation while the source is UP or DEGRADED (a source still talking
confirms the state it last gave): ``SourceHealth.states_confirmed_at`` —
``last_message_at`` for a source whose messages carry its states, the last
successful scores calls for The Odds API — counted only once this node has
read the event-state log as far as its head read right after that health
record (:meth:`EventStates.set_health`; docs/architecture.md §41: a node
vouches only for what it has read); ``stale`` = the source is DOWN (or its
lease ran out), the store lost the held state (it went back in time:
:attr:`EventStates.lost`, :meth:`EventStates.replace`), the ingest marked the
state lost (``EventState.lost``: a later state of the event was rejected
alone — the provider moved on from it; until a newer good version arrives), or the state is not
final (ENDED, CLOSED, CANCELLED, ABANDONED: a final score does not age) and
``age_ms`` exceeds the in-play or pre-match limit (or the source's own
``stale_after_ms`` when longer). Times are integer ms since the Unix epoch (UTC). A held state turns stale (or
fresh again) without a new state: each health refresh the node works out
the stale states per source (:meth:`EventStates.stale_ids`) and announces a
change as a ``status`` message's ``stale_events``, as it does stale markets.

Canonical events: a canonical event (``ev:…``) may have several member
provider events with a state each; :func:`pick` chooses the one to show
(not stale first, then the newest provider time), and :func:`turned` turns a
member's state round (home ↔ away) when the linker found that member naming
the sides the other way round from the canonical event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import msgspec
from redis.exceptions import RedisError

from feed.errors import StoreError
from feed.models import (
    ENCODER,
    FINAL_EVENT_STATUSES,
    EventState,
    PeriodScore,
    Score,
    SourceHealth,
    TeamCounts,
    states_confirmed_at,
)
from feed.sources.backoff import Backoff
from streaming.encoding import StreamId, parse_stream_id
from streaming.state import live_for_limits

if TYPE_CHECKING:
    from feed.store import Store
    from streaming.state import NodeState

__all__ = ["EventStateTail", "EventStates", "pick", "turned"]

logger = logging.getLogger(__name__)

Listener = Callable[[list[EventState]], None]

#: most health records waiting for the tail to reach their event-state log head
_WAITING_MAX = 256


class EventStates:
    """The node's event states by provider event id (see the module docstring).

    position: the id of the last ``of:{es}:log`` entry applied ("0-0": none).
    epoch: the store epoch read with the last load (``of:epoch``).
    lost: event id → the version of the held state the store no longer has (it went back
    under the same epoch, :meth:`replace`): that state reads stale until a newer one comes.
    """

    def __init__(self) -> None:
        self.states: dict[str, EventState] = {}
        self.position = "0-0"
        self.loaded = False
        self.reloads = 0
        self.epoch: str | None = None
        self.lost: dict[str, int] = {}
        #: called with the states that changed (after each log entry, and after a reload: all of them)
        self.listeners: list[Listener] = []
        self._json: dict[str, bytes] = {}
        #: per source, the states confirmation (``SourceHealth.states_confirmed_at``) of the newest
        #: health record whose event-state log head this node has read up to (:meth:`set_health`)
        self._vouched: dict[str, int] = {}
        #: health records waiting for the tail to reach the log head read after them: (head, source, confirmation)
        self._waiting: list[tuple[StreamId, str, int]] = []

    def get(self, event_id: str) -> EventState | None:
        return self.states.get(event_id)

    def replace(self, states: Iterable[EventState], position: str, epoch: str | None = None) -> None:
        """Everything, as loaded from the store, read at log ``position``, under store ``epoch``.

        The store going back (an older snapshot restored, a failover that lost the last writes)
        under the same epoch: a held state whose version is above the loaded one of its event
        (same source) is *kept*, marked lost (:attr:`lost`) — it reads stale until a state of a
        higher version arrives (or a later load finds the store holding its version again).
        Why not take the store's older state: it is a score the node has already served as
        superseded — fresh over REST it would be the wrong score reading fresh, and on the
        streams it would go backwards (clients keep the highest version and ignore it, so REST
        and streams would disagree). The kept one is the last the node knows, and says it can no
        longer be vouched for. A state the store no longer holds at all is dropped (nothing is
        served for it). The first load, or a changed epoch (a wiped store: versions start over),
        takes the store's states whole."""
        loaded = {es.event_id: es for es in states}
        lost: dict[str, int] = {}
        if self.loaded and epoch == self.epoch:
            for eid, es in loaded.items():
                held = self.states.get(eid)
                if held is not None and held.source == es.source and held.version > es.version:
                    loaded[eid] = held
                    lost[eid] = held.version
            if lost:
                logger.warning("event-state store went back under the same epoch: %d states older than held "
                               "(kept, read stale until a newer version arrives)", len(lost))
        self.states = loaded
        self.lost = lost
        self._json.clear()
        self.position = position
        self.epoch = epoch
        self.loaded = True
        self._reach()
        self._notify(list(self.states.values()))

    def apply(self, entry_id: str, states: Iterable[EventState]) -> list[EventState]:
        """Apply one log entry: each state newer (``version``) than the one
        held; returns the states that changed."""
        changed = []
        held = self.states
        lost = self.lost
        for es in states:
            old = held.get(es.event_id)
            if old is not None and old.version >= es.version and old.source == es.source:
                continue
            held[es.event_id] = es
            self._json.pop(es.event_id, None)
            if lost:
                lost.pop(es.event_id, None)
            changed.append(es)
        self.position = entry_id
        if self._waiting:
            self._reach()
        if changed:
            self._notify(changed)
        return changed

    def drop(self, event_ids: Iterable[str]) -> None:
        for eid in event_ids:
            self.states.pop(eid, None)
            self._json.pop(eid, None)
            self.lost.pop(eid, None)

    def set_health(self, sources: Iterable[SourceHealth], head: str | None) -> None:
        """The source health records just read, and ``head``: the newest ``of:{es}:log`` entry
        id read *after* them (:meth:`feed.store.Store.event_state_log_head`). A record's states
        confirmation counts for its source's states only once this node's :attr:`position` has
        reached ``head`` (§41, as :meth:`streaming.state.NodeState.set_health` for markets):
        until then they keep the confirmation of the last record reached, so a stalled tail
        makes them age, never read fresh on a score the node has not read. None: vouch at once
        (the caller holds every write already: tests, tools)."""
        sources = list(sources)
        names = {h.source for h in sources}
        for name in [n for n in self._vouched if n not in names]:
            del self._vouched[name]
        if head is None:
            self._vouched = {h.source: states_confirmed_at(h) for h in sources}
            return
        for name in names:
            self._vouched.setdefault(name, 0)
        hid = parse_stream_id(head)
        waiting = self._waiting
        waiting.extend((hid, h.source, states_confirmed_at(h)) for h in sources)
        if len(waiting) > _WAITING_MAX:  # a tail that cannot keep up: keep the newest (conservative)
            del waiting[:len(waiting) - _WAITING_MAX]
        self._reach()

    def _reach(self) -> None:
        """Vouch for the waiting records whose log head the tail has reached."""
        waiting = self._waiting
        if not waiting:
            return
        pos = parse_stream_id(self.position)
        vouched = self._vouched
        keep = []
        for item in waiting:
            head, source, at = item
            if head <= pos:
                if source in vouched and at > vouched[source]:
                    vouched[source] = at
            else:
                keep.append(item)
        self._waiting = keep

    def prune(self, now: int, retention_ms: int) -> list[str]:
        """Forget final states older than ``retention_ms`` and states unchanged
        for :data:`feed.ingest.EVENT_STATE_IDLE_MS` (as the ingest drops them
        from the store); ``retention_ms`` 0 keeps final states. Returns the ids."""
        from feed.ingest import EVENT_STATE_IDLE_MS

        gone = [eid for eid, es in self.states.items()
                if (retention_ms > 0 and es.status in FINAL_EVENT_STATUSES and now - es.received_at > retention_ms)
                or now - es.received_at > EVENT_STATE_IDLE_MS]
        self.drop(gone)
        return gone

    def _notify(self, changed: list[EventState]) -> None:
        for listener in self.listeners:
            try:
                listener(changed)
            except Exception:  # a listener's bug must not stop the tail
                logger.exception("event-state listener failed")

    # -- staleness and JSON ------------------------------------------------------------------

    def age_stale(self, es: EventState, node: NodeState, now: int) -> tuple[int, bool]:
        """(age_ms, stale) of ``es`` at ``now`` (see the module docstring)."""
        h = node.source_health(es.source, now)
        last, down = node.changed_at(es.source, es.received_at, es.source_ts, h, now)
        down = (down or (h is not None and h.state == "DOWN") or es.lost is True
                or (bool(self.lost) and es.event_id in self.lost))
        if h is not None and not down:
            # the source's states confirmation, as far as this node has read the log it covers
            confirmed = min(states_confirmed_at(h), self._vouched.get(es.source, 0))
            if confirmed > last:
                last = confirmed
        age = max(0, now - last)
        if down:
            return age, True
        if es.status in FINAL_EVENT_STATUSES:
            return age, False
        live = es.in_play or EventStates._started(es, node, now)
        limit = node.stale_after_ms(None, live)
        if h is not None and h.stale_after_ms > limit:
            limit = h.stale_after_ms
        return age, age > limit

    @staticmethod
    def _started(es: EventState, node: NodeState, now: int) -> bool:
        """Whether ``es``'s event has started by its markets' ``start_time`` (ms since the epoch)
        though the state does not say in play yet: it is judged by the in-play limits, as its
        markets are (:func:`streaming.state.live_for_limits`)."""
        if es.status != "NOT_STARTED":
            return False
        markets = node.markets
        for mid in node.state_markets(es.event_id):
            m = markets.get(mid)
            if m is not None and m.start_time is not None:
                return live_for_limits(m, now)
        return False

    def stale_ids(self, node: NodeState, now: int, source: str | None = None) -> dict[str, list[str]]:
        """The held states stale at ``now`` (:meth:`age_stale`): source → their event ids, sorted
        (only ``source``'s when given). What ``status`` messages carry as ``stale_events``."""
        out: dict[str, list[str]] = {}
        age_stale = self.age_stale
        for eid, es in self.states.items():
            if (source is None or es.source == source) and age_stale(es, node, now)[1]:
                out.setdefault(es.source, []).append(eid)
        for ids in out.values():
            ids.sort()
        return out

    def json(self, es: EventState, node: NodeState, now: int) -> bytes:
        """The state's JSON with ``age_ms`` and ``stale`` appended (the
        encoding of a held state is cached until it changes)."""
        raw = self._json.get(es.event_id) if self.states.get(es.event_id) is es else None
        if raw is None:
            raw = ENCODER.encode(es)
            if self.states.get(es.event_id) is es:
                self._json[es.event_id] = raw
        age, stale = self.age_stale(es, node, now)
        return b'%s,"age_ms":%d,"stale":%s}' % (raw[:-1], age, b"true" if stale else b"false")


def turned(es: EventState) -> EventState:
    """``es`` with the sides turned round: home ↔ away in the score, its
    periods, the red cards and the innings' batting teams."""
    score = es.score
    if score is not None:
        score = Score(home=score.away, away=score.home,
                      periods=[PeriodScore(period=p.period, home=p.away, away=p.home) for p in score.periods])
    cards = TeamCounts(home=es.red_cards.away, away=es.red_cards.home) if es.red_cards is not None else None
    innings = [msgspec.structs.replace(i, team="away" if i.team == "home" else "home" if i.team == "away" else None)
               for i in es.innings]
    return msgspec.structs.replace(es, score=score, red_cards=cards, innings=innings)


def pick(states: Iterable[tuple[EventState, bool]]) -> EventState | None:
    """The state to show for a canonical event among its members' ``(state,
    stale)``: not stale first, then the newest provider time (then the
    highest version)."""
    best: tuple[bool, int, int] | None = None
    chosen = None
    for es, stale in states:
        key = (not stale, es.provider_ts, es.version)
        if best is None or key > best:
            best, chosen = key, es
    return chosen


class EventStateTail:
    """Loads the node's :class:`EventStates` and follows ``of:{es}:log``
    (one task per node; see the module docstring). ``block_ms``: how long
    one read waits; errors back off (0.2 s … 5 s) and reload."""

    def __init__(self, store: Store, states: EventStates, *, block_ms: int = 1000, retention_ms: int = 0,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.store = store
        self.states = states
        self.block_ms = block_ms
        #: final states are forgotten this long after their last change (ODDSFEED_SETTLED_RETENTION_MS)
        self.retention_ms = retention_ms
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._pruned_at = 0
        self.errors = 0
        self.last_error: str | None = None
        self._backoff = Backoff(initial_s=0.2, factor=2.0, max_s=5.0)
        #: the log is read on a connection of its own (a cancelled blocking read drops it, never a
        #: pooled one: redis-py's XREAD BLOCK on the shared pool could hold the node's stop)
        self._tail = store.event_state_tail()

    async def load(self) -> None:
        """Load every state; the log position is read first (a state written
        meanwhile is in the hash and comes again from the log: harmless)."""
        epoch = await self.store.current_epoch()
        _, last = await self.store.event_state_log_bounds()
        states = await self.store.load_event_states()
        self.states.replace(states, last, epoch)

    async def run(self) -> None:
        """Follow the log until cancelled."""
        try:
            await self._run()
        finally:
            # bounded: closing a connection waits for the peer's close, which a half-open link
            # never sends (seen once holding a node's stop for the test's 120 s)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._tail.aclose()

    async def _run(self) -> None:
        need_load = not self.states.loaded
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # a cancel an awaited call took in and returned from (redis-py's did, now and then: the
                # node's stop then waited on this task for good) still ends the tail
                raise asyncio.CancelledError
            try:
                if need_load:
                    await self.load()
                    self.states.reloads += 1
                    need_load = False
                pos = self.states.position
                try:
                    entries = await self._tail.read_entries(pos, block_ms=self.block_ms, count=500)
                except (RedisError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise StoreError(f"redis read of the event-state log failed: {exc}") from None
                if entries and pos != "0-0" and not await self.store.event_state_log_has(pos):
                    # the entry the node stopped at is gone (trimmed past, or the store was wiped and a
                    # new log begun): what lay between may be lost — take everything afresh
                    logger.warning("event-state log entry %s is gone: reloading", pos)
                    need_load = True
                    continue
                for entry_id, states in entries:
                    self.states.apply(entry_id, states)
                if not entries:  # caught up: is the log still the one the node follows?
                    need_load = await self._lost()
                self._backoff.reset()
                now = self._clock_ms()
                if now - self._pruned_at >= 30_000:
                    self._pruned_at = now
                    self.states.prune(now, self.retention_ms)
            except asyncio.CancelledError:
                raise
            except (StoreError, OSError) as exc:
                self.errors += 1
                self.last_error = str(exc)
                delay = self._backoff.next_delay()
                logger.warning("event-state log read failed (%s); retry in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                need_load = True
            except Exception as exc:  # a bug or an undecodable stored state: never end the task
                self.errors += 1
                self.last_error = f"internal error: {type(exc).__name__}: {exc}"
                delay = self._backoff.next_delay()
                logger.exception("event-state tail failed; reloading in %.2f s", delay)
                await asyncio.sleep(delay)
                need_load = True

    async def _lost(self) -> bool:
        """After a read that found nothing new (the node is caught up): True
        when the log is not the one the node followed any more — its newest
        entry is behind the node's position (a wiped store, a reset log) or
        its oldest is past it (trimmed or replaced whole): reload."""
        pos = self.states.position
        if pos == "0-0":
            return False
        first, last = await self.store.event_state_log_bounds()
        if parse_stream_id(last) < parse_stream_id(pos):
            logger.warning("event-state log went back (%s < %s): reloading", last, pos)
            return True
        if first is not None and parse_stream_id(first) > parse_stream_id(pos):
            logger.warning("event-state log moved past %s (oldest %s): reloading", pos, first)
            return True
        return False if last == pos else not await self.store.event_state_log_has(pos)
