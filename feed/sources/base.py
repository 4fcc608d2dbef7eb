"""The seam between a source (I/O) and the pipeline (everything else).

A **source** connects, authenticates, reads and hands what it received to
the pipeline as :class:`Payload` s — raw bytes, the receive time and a
*channel* naming what the bytes answer (a poller's endpoint, an AMQP
routing key; empty for a single-stream source). It never decodes odds,
never touches the book or the store. A **normaliser** (``feed.normalise``)
turns one payload into canonical market updates with no I/O. The
**pipeline** (:class:`feed.pipeline.Pipeline`) owns everything between:
restore, normalise → validate → book → store (with the source's resume
cursor), health with its lease, lag percentiles, quarantine and recording.

::

    provider ──bytes──▶ Source.run(sink) ──Payload──▶ Sink.deliver()
                          ▲     │                        │ normaliser.feed(data, recv_ms, channel)
          request_repair()│     │set_state / confirm     │ validate → Book → Store.apply (+ cursor)
                          └─────┴────────────────────────┘ health · lag · quarantine · recorder

A kind of source is one entry of :data:`feed.sources.registry.REGISTRY`:
``(source factory, normaliser factory, option schema)``. Adding a provider
is two modules (its source and its normaliser) and that one entry
(docs/architecture.md §37 walks through one).

Times are integer ms since the Unix epoch (UTC).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from feed.models import SourceState

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec


class Payload(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One thing a source received, as received.

    recv_ms: when it was read (ms since the epoch, the source's wall clock).
    data: the raw bytes (one ESA line, one HTTP body, one AMQP message body,
    one webhook body). channel: what the bytes answer, for normalisers that
    need it (Pinnacle ``odds:29:snapshot``, The Odds API's sport key, an AMQP
    routing key); ``""`` for single-stream sources. age_ms: how much older
    than ``recv_ms`` the data may be (ms, ≥ 0): a poller's answer a cache in
    front served (HTTP ``Age``) — the ingest stamps what it changes as
    received that much earlier, so its prices read as old as they are; 0 for
    everything the provider itself sent. A recording keeps all four, so a
    replay normalises exactly what the live run did.
    """

    recv_ms: int
    data: bytes
    channel: str = ""
    age_ms: int = 0


class Delivered(msgspec.Struct, kw_only=True, gc=False):
    """What the pipeline made of one :meth:`Sink.deliver` call.

    stored: everything delivered so far is in the store (False while the
    store fails: the changes wait, in order, in the pipeline's backlog — a
    webhook must not acknowledge them yet). deltas: deltas written now.
    rejected_messages: payloads rejected whole (nothing of them applied).
    rejected_parts: markets or events rejected alone. lost: a change was
    rejected alone, so a market is unconfirmed until re-imaged (the pipeline
    has called :meth:`Source.request_repair`). stale: a payload answered
    older than what was already applied (the normaliser dropped it).
    requests: what the normaliser asked the source to fetch (e.g. Pinnacle
    ``fixtures`` for odds of an unknown event, UOF ``recovery:<producer>``).
    in_play: whether the payload's scope has events in play (None: it does
    not say); pollers poll faster while it does.
    """

    stored: bool = True
    deltas: int = 0
    rejected_messages: int = 0
    rejected_parts: int = 0
    lost: bool = False
    stale: bool = False
    requests: frozenset[str] = frozenset()
    in_play: bool | None = None


class Sink(Protocol):
    """What the pipeline offers a running source."""

    @property
    def source(self) -> str:
        """The source's name (``--source …,name=``)."""
        ...

    @property
    def cursor(self) -> str | None:
        """The resume cursor restored from the store (None: start from a
        full image), then as advanced by the normaliser. Opaque to the
        pipeline; a source reads it with its normaliser module's decoder."""
        ...

    async def deliver(self, payloads: Sequence[Payload]) -> Delivered:
        """Normalise, validate, sequence and store ``payloads`` (in order).
        Never raises for a provider's bytes (a bad payload or market is
        quarantined); returns once stored, or once queued for the store
        when it fails (``Delivered.stored`` False)."""
        ...

    def confirm(self, recv_ms: int, provider_ms: int | None = None) -> None:
        """The upstream vouched for all its data at ``recv_ms`` without a
        payload (a poll answered 304 / nothing new, an AMQP ``alive``): the
        source's markets read fresh as of then, once everything received
        before is stored. ``provider_ms``: the provider's own time of it (an
        ``alive``'s timestamp, ms since the Unix epoch) — one received more than
        ``ODDSFEED_MAX_STREAM_LAG_MS`` after it (held back in a backlog) vouches
        only as of that time plus the bound. Streams need not call it — each
        delivery confirms — unless :attr:`Source.confirms_by_messages` is False."""
        ...

    def set_state(self, state: SourceState, reason: str | None) -> None:
        """Report the link's state (``UP`` / ``DEGRADED`` / ``DOWN`` with a
        snake_case reason); published at once when it changed."""
        ...


class Source(Protocol):
    """A source: I/O only (see the module docstring).

    ``run(sink)`` reads until cancelled or :meth:`stop`; it raises
    :class:`feed.errors.FatalSourceError` (or ``AuthError`` /
    ``ConfigError``) for what a restart cannot fix and any other exception
    for what it may (the supervisor restarts the source with backoff, and
    the pipeline restores it from the store).
    """

    name: str
    #: True: every delivery vouches for all the source's markets once stored
    #: (a stream with heartbeats); False: the source calls :meth:`Sink.confirm`
    confirms_by_messages: bool
    # (optional) rejected_messages_redelivered: bool — True when the provider delivers a message
    # rejected whole again (a webhook answered 422), so its rejection loses no change; default
    # False: the pipeline asks for a fresh image and stops confirming (feed.ingest.Ingest._rejected_whole)
    #: how long the source's data stays fresh without news, ms (None: the
    #: service default for in-play markets)
    stale_after_ms: int | None

    async def run(self, sink: Sink) -> None: ...

    def request_repair(self) -> None:
        """A change was lost (rejected alone): fetch a fresh image of what
        the source covers when the upstream offers one (rate-limited by the
        source); a no-op where none exists."""
        ...

    def stop(self) -> None: ...


class SourceFactory(Protocol):
    def __call__(self, spec: SourceSpec, settings: Settings) -> Source: ...


class _Client(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


class ClientSource:
    """Base of sources that wrap a stream client with ``run()`` / ``stop()``
    and callbacks (:class:`feed.sources.esa.EsaSource`,
    :class:`feed.sources.push.PushSource`): every delivery of lines is one
    :meth:`Sink.deliver`, and stopping stops the client."""

    confirms_by_messages = True
    stale_after_ms: int | None = None

    def __init__(self, name: str) -> None:
        self.name = name
        self._client: _Client | None = None
        self._stopped = False

    @staticmethod
    def deliverer(sink: Sink) -> Callable[[list[bytes], int], Awaitable[None]]:
        """``on_lines(lines, recv_ms)`` for a client: one delivery per batch."""
        async def deliver(lines: list[bytes], recv_ms: int) -> None:
            await sink.deliver([Payload(recv_ms, raw) for raw in lines])

        return deliver

    async def run_client(self, client: _Client) -> None:
        """Run ``client`` until it returns (or :meth:`stop`)."""
        self._client = client
        if self._stopped:
            return
        try:
            await client.run()
        finally:
            client.stop()

    def stop(self) -> None:
        self._stopped = True
        if self._client is not None:
            self._client.stop()
