"""One pipeline for every kind of source: restore → normalise → book → store,
with health, lag percentiles, quarantine and recording.

A :class:`Pipeline` is the :class:`feed.sources.base.Sink` a source
delivers to. It owns the source's :class:`feed.ingest.Ingest` (normaliser,
book, ordered store writes with the resume cursor, backlog while Redis
fails, session and confirmation rules), its :class:`HealthPublisher` (the
health record with its lease, about once a second and at every state
change) and its :class:`LagWindow` (feed-lag p50/p99 in ``/v1/sources``),
and writes every payload to a :class:`feed.recorder.Recorder` when asked.

:func:`run_spec` builds a source and its normaliser from a ``--source``
spec through :data:`feed.sources.registry.REGISTRY` and runs them until
cancelled; it is what :func:`feed.supervisor.run_source` calls.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from feed.aio import raise_if_cancelled
from feed.book import Book
from feed.errors import ConfigError, FatalSourceError, StoreError
from feed.ingest import HealthPublisher, Ingest, ingest_options
from feed.linker import EventRegistrar
from feed.models import Delta, SourceState
from feed.normalise.base import Normaliser
from feed.sources.base import Delivered, Payload, Source
from feed.sources.lag import LagWindow

if TYPE_CHECKING:
    from feed.recorder import Recorder
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec
    from feed.store import Store

logger = logging.getLogger(__name__)

#: the provider flagged its data degraded (ESA ``status: 503``)
UPSTREAM_DEGRADED = "upstream_503"


class Pipeline:
    """The sink of one source (see the module docstring).

    store: where the source's markets, deltas, cursor and health go.
    name / kind: the source's name and registry kind. normaliser: the
    kind's normaliser. stale_after_ms: advertised in the health record (how
    long the source's markets stay fresh without news). confirms_by_messages:
    every delivery confirms the source's markets once stored (streams), or
    only :meth:`confirm` does (pollers). confirms_states_apart: the source's
    event states are confirmed only by :meth:`confirm_states` (The Odds API:
    its ``/scores`` calls), not with its markets. recorder: every delivered payload is
    written there first. time_map: a replay's mapping of provider times onto
    now (see :attr:`feed.ingest.Ingest.time_map`).
    """

    def __init__(self, store: Store, settings: Settings, *, name: str, kind: str, normaliser: Normaliser,
                 stale_after_ms: int | None = None, confirms_by_messages: bool = True,
                 confirms_states_apart: bool = False, rejected_messages_redelivered: bool = False,
                 recorder: Recorder | None = None, time_map: Callable[[int], int] | None = None,
                 lag_window_s: float = 60.0) -> None:
        self.normaliser = normaliser
        self.ingest = Ingest(store, source=name, normaliser=normaliser, book=Book(), kind=kind,
                             stale_after_ms=stale_after_ms or settings.stale_in_play_ms, **ingest_options(settings))
        self.ingest.confirm_by_messages = confirms_by_messages
        self.ingest.confirm_states_apart = confirms_states_apart
        self.ingest.rejected_messages_redelivered = rejected_messages_redelivered
        self.ingest.time_map = time_map
        self.lag = LagWindow(lag_window_s, histogram=self.ingest.metrics.lag_seconds)
        self.health = HealthPublisher(self.ingest, lag=self.lag)
        self.recorder = recorder
        self.events = EventRegistrar(name)
        self.ingest.on_stored = self._stored
        self._source: Source | None = None

    # -- Sink --------------------------------------------------------------------------

    @property
    def source(self) -> str:
        return self.ingest.source

    @property
    def cursor(self) -> str | None:
        return self.ingest.cursor

    async def deliver(self, payloads: Sequence[Payload]) -> Delivered:
        if self.recorder is not None:
            self.recorder.write(payloads)
        ingest = self.ingest
        out = ingest.feed(payloads)
        deltas = await ingest.flush()  # (what it stored went through _stored)
        if self.events.pending and ingest.store_ok:
            await self._register_events()  # (records a failed registration kept)
        out.deltas = len(deltas)
        out.stored = ingest.store_ok and not ingest.backlog and not ingest.pending
        if ingest.take_lost():
            out.lost = True
            if self._source is not None:
                self._source.request_repair()  # only a fresh image repairs a market whose change was lost
        h = ingest.health
        if ingest.degraded:
            if h.state == "UP":
                self.set_state("DEGRADED", UPSTREAM_DEGRADED)
        elif h.state == "DEGRADED" and h.reason == UPSTREAM_DEGRADED:
            self.set_state("UP", None)
        return out

    async def _stored(self, deltas: list[Delta]) -> None:
        """After every flush that stored something, whichever task flushed (a
        delivery, the health publisher, a drain): the feed lag of what was
        stored, and the event records of the markets whose header it set or
        changed, registered for the linker."""
        ingest = self.ingest
        self.lag.record_deltas(deltas)
        self.lag.record_states(ingest.take_stored_states())
        if deltas:
            self.events.note(deltas, ingest.book.markets)
        if self.events.pending and ingest.store_ok:
            await self._register_events()

    async def _register_events(self) -> None:
        try:  # a failure keeps them for the next flush or delivery
            await self.events.flush(self.ingest.store, self.ingest.clock_ms())
        except StoreError:
            self.ingest.metrics.redis_error("events")
        raise_if_cancelled()  # (redis-py may have swallowed a cancel of this task: feed.aio)

    def confirm(self, recv_ms: int, provider_ms: int | None = None) -> None:
        self.ingest.confirm(recv_ms, provider_ms)

    def confirm_states(self, recv_ms: int) -> None:
        """The upstream vouched for the source's event states at ``recv_ms`` (a source whose
        states come from calls of their own, ``confirms_states_apart``: every scores call
        answered): they read fresh as of then, once everything received before is stored."""
        self.ingest.confirm_states(recv_ms)

    def set_state(self, state: SourceState, reason: str | None) -> None:
        if state == "UP" and self.ingest.degraded:
            state, reason = "DEGRADED", UPSTREAM_DEGRADED
        if self.ingest.set_state(state, reason):
            self.health.wake()

    # -- running -----------------------------------------------------------------------

    async def restore(self) -> str | None:
        """Load the source's stored markets (seq continues), session and
        cursor, and hand them to the normaliser (the markets only when the
        stored session is continued: otherwise the source starts from a full
        image). Returns the cursor (None: start from a full image)."""
        ingest = self.ingest
        cursor = await ingest.restore()
        mine = [m for m in ingest.book.markets.values() if m.source == ingest.source] if ingest.resumed else []
        self.normaliser.restore(mine, cursor)
        if cursor is not None:
            logger.info("source %s resumes from its stored cursor", ingest.source)
        return cursor

    async def run(self, source: Source) -> None:
        """Restore, then run ``source`` until it returns, fails or is
        cancelled; the health record says DOWN / ``stopped`` afterwards
        (or keeps a fatal reason such as ``unauthorized``)."""
        self._source = source
        try:
            await self.restore()
        except BaseException:
            with contextlib.suppress(Exception):  # (the marks it took: a supervised retry takes new ones)
                await self.ingest.drop_marks()
            raise
        fatal = False
        try:
            async with self.health:
                await source.run(self)
        except (FatalSourceError, ConfigError):
            fatal = True  # the source's DOWN reason (e.g. ``unauthorized``) says why it stopped
            raise
        finally:
            source.stop()
            if not (fatal and self.ingest.health.state == "DOWN"):
                self.ingest.set_state("DOWN", "stopped")
            if self.recorder is not None:
                self.recorder.close()
            with contextlib.suppress(Exception):
                await self.ingest.publish_health()
            with contextlib.suppress(Exception):  # (best effort: a crash leaves them to the 2-day pruning)
                await self.ingest.drop_marks()


def build(store: Store, settings: Settings, spec: SourceSpec, *,
          recorder: Recorder | None = None) -> tuple[Source, Pipeline]:
    """The source and pipeline of a ``--source`` spec, from the registry
    (raises ConfigError for an unknown kind or bad options)."""
    from feed.sources.registry import kind_of

    entry = kind_of(spec)
    source = entry.load_source()(spec, settings)
    normaliser = entry.load_normaliser()(spec, settings)
    pipeline = Pipeline(store, settings, name=spec.name, kind=spec.kind, normaliser=normaliser,
                        stale_after_ms=source.stale_after_ms, confirms_by_messages=source.confirms_by_messages,
                        confirms_states_apart=getattr(source, "confirms_states_apart", False),
                        rejected_messages_redelivered=getattr(source, "rejected_messages_redelivered", False),
                        recorder=recorder)
    return source, pipeline


async def run_spec(store: Store, settings: Settings, spec: SourceSpec, *,
                   on_source: Callable[[Source, Pipeline], None] | None = None) -> None:
    """Run one ``--source`` until cancelled (raises on fatal errors).
    ``settings.record_dir`` set: every payload is recorded there.
    ``on_source(source, pipeline)`` is called before it runs (tests and
    benchmarks use it to reach the live objects)."""
    recorder = None
    if settings.record_dir:
        from feed.recorder import Recorder

        recorder = Recorder(settings.record_dir, source=spec.name, kind=spec.kind, options=spec.options)
    source, pipeline = build(store, settings, spec, recorder=recorder)
    if on_source is not None:
        on_source(source, pipeline)
    await pipeline.run(source)
