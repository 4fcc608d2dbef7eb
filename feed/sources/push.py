"""Push consumers: the transport-neutral client shared by the WebSocket and SSE transports.

I/O only: this module reads push-format messages (``docs/push-format.md``)
off a WebSocket, keeps the stream in order and alive, and hands the raw
message bytes to the caller; the normaliser (:mod:`feed.normalise.push`)
decodes them. :class:`PushClient` holds everything both push transports
share (the SSE one is :class:`feed.sources.sse.PushSseClient`):

- **order**: data messages carry ``seq`` (per stream, +1 each). A message
  ahead of the next expected one is held back (at most ``reorder_window``
  messages, ``reorder_ms``) waiting for the missing ones, so a provider's
  reordering costs nothing; duplicates and late copies are handed over (the
  normaliser drops them by entry id). A ``ping`` carrying a ``seq`` beyond
  what arrived reveals a gap even on a quiet stream;
- **gaps**: a gap not filled within ``reorder_ms`` (or a full reorder
  buffer) → resync: the health turns ``DEGRADED`` / ``recovering``, the REST
  snapshot (``snapshot_url``) is fetched and handed over (it covers up to its
  ``seq``), held messages after it follow, then ``UP``. A snapshot a cache
  in front served (``Age``, RFC 9111 §5.1) is handed over as received that
  long (+ 1 s) before its arrival — a stream's message confirms the
  source's markets as of its receipt, and a snapshot need carry no
  ``emitted_at`` to bound that — alone, before the held messages it
  releases (live: they keep their arrival). Without a snapshot
  URL, or when the fetch fails, the client reconnects and resumes instead;
- **resume**: the cursor is the entry id of the newest message handed over
  (it advances only after ``on_messages`` returned); a reconnect sends it
  (WebSocket: ``resume_from`` in the subscribe message; SSE:
  ``Last-Event-ID``) so the provider replays what was missed, or sends a
  fresh ``snapshot`` when it no longer can;
- **liveness**: no message for ``heartbeat_late_factor`` × the ping interval
  → ``DEGRADED`` / ``heartbeat_late``; for ``heartbeat_dead_factor`` × →
  ``DOWN`` / ``heartbeat_missed``, the connection is dropped and the client
  reconnects. The interval is the provider's (``connected.ping_interval_ms``)
  or ``ping_interval_ms``;
- **reconnects** wait a full-jitter backoff (:mod:`feed.sources.backoff`),
  reset once a connection delivered data; ``DOWN`` / ``reconnecting``
  meanwhile. HTTP 401/403 is fatal (:class:`~feed.errors.FatalSourceError`,
  ``DOWN`` / ``unauthorized``), never retried.

Health goes to ``on_health(state, reason)`` on changes only.

:class:`PushSource` is a client (:class:`feed.sources.ws.PushWsClient`,
:class:`feed.sources.sse.PushSseClient`) as a
:class:`feed.sources.base.Source`: the pipeline's stored cursor of a
previous run is where the stream resumes. """

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidURI,
)

from feed.aio import raise_if_cancelled
from feed.errors import FatalSourceError
from feed.normalise.push import entry_key
from feed.redaction import register_secret
from feed.sources.backoff import Backoff, RepairPacer
from feed.sources.base import ClientSource, Sink
from feed.sources.http_limits import cache_age_ms
from feed.sources.session import HealthCallback, SessionClient
from feed.sources.spec import SourceSpec

if TYPE_CHECKING:
    from feed.ingest import Ingest
    from feed.settings import Settings
    from feed.store import Store

__all__ = ["PushClient", "PushSource", "Received", "Receiver", "client_options", "default_snapshot_url", "push_source",
           "run_push_source"]

logger = logging.getLogger(__name__)

#: ``(raw message, recv_ms)`` items read from the transport in one go
Received = list[tuple[bytes, int]]
Receiver = Callable[[float], Awaitable[Received]]



def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _LinkLost(Exception):
    """The connection ended or must be dropped (EOF, close frame, framing)."""


class _HeartbeatMissed(_LinkLost):
    """Nothing received for heartbeat_dead_factor × the ping interval."""


class _Envelope(msgspec.Struct, gc=False):
    """The routing fields of any push message; ``data`` is skipped unparsed."""

    type: str | None = None
    seq: int | None = None
    entry_id: str | None = None
    ping_interval_ms: int | None = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


def default_snapshot_url(stream_url: str) -> str:
    """The REST snapshot beside a stream URL: ``ws://h/push/ws`` →
    ``http://h/push/snapshot`` (last path segment replaced, ws → http)."""
    parts = urlsplit(stream_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rsplit("/", 1)[0] + "/snapshot"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class PushClient(SessionClient):
    """One push stream kept alive, in order and resumable (see the module docstring).

    Args:
        url: the stream URL.
        api_key: sent as ``X-Api-Key`` (never logged); None = none.
        snapshot_url: the REST snapshot for gap resyncs; None = resume instead.
        cursor: entry id to resume after (a previous run's stored cursor).
        on_messages: ``await on_messages(raw_messages, recv_ms)``, in order.
        on_health: ``on_health(state, reason)`` on changes.
        name: label for logs (the source name).
        ping_interval_ms: expected keep-alive interval until the provider says.
        heartbeat_late_factor, heartbeat_dead_factor: silence thresholds, in
            ping intervals (DEGRADED / DOWN + reconnect).
        reorder_window: most messages held back behind a gap.
        reorder_ms: how long a gap may stay open before a resync, ms.
        connect_timeout_s: connect + handshake limit, seconds.
        snapshot_timeout_s: whole-request limit of a snapshot fetch, seconds.
        backoff_initial_s, backoff_max_s: reconnect delays (full jitter), seconds.
        clock_ms: wall clock, integer ms since the Unix epoch.
        http: an httpx client to use for snapshots (default: one of our own).
    """

    kind = "push"

    def __init__(
        self,
        *,
        url: str,
        on_messages: Callable[[list[bytes], int], Awaitable[None]],
        on_health: HealthCallback = lambda state, reason: None,
        api_key: str | None = None,
        snapshot_url: str | None = None,
        cursor: str | None = None,
        name: str = "push",
        ping_interval_ms: int = 5000,
        heartbeat_late_factor: float = 1.5,
        heartbeat_dead_factor: float = 2.5,
        reorder_window: int = 256,
        reorder_ms: int = 500,
        connect_timeout_s: float = 10.0,
        snapshot_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not 1 <= heartbeat_late_factor < heartbeat_dead_factor:
            raise ValueError("need 1 <= heartbeat_late_factor < heartbeat_dead_factor")
        self.url = url
        self.snapshot_url = snapshot_url
        self._api_key = api_key
        register_secret(api_key)  # never in a log line, whoever logs the request (websockets at DEBUG)
        self._on_messages = on_messages
        super().__init__(on_health)
        self.name = name
        self._ping_interval_ms = ping_interval_ms
        self._late_factor = heartbeat_late_factor
        self._dead_factor = heartbeat_dead_factor
        self._reorder_window = reorder_window
        self._reorder_s = reorder_ms / 1000
        self._connect_timeout_s = connect_timeout_s
        self._snapshot_timeout_s = snapshot_timeout_s
        self._backoff = Backoff(initial_s=backoff_initial_s, max_s=backoff_max_s)
        self._backoff_max_s = backoff_max_s
        self._clock_ms = clock_ms
        self._http = http
        self._own_http = http is None

        self._cursor = cursor if cursor and entry_key(cursor) is not None else None
        self._server_interval_ms: int | None = None
        self._last_seq: int | None = None
        self._seen_seq: int | None = None
        self._held: dict[int, tuple[bytes, str | None]] = {}
        self._gap_since: float | None = None
        self._out: list[bytes] = []
        self._out_entry: str | None = None

        self.messages_received = 0
        self.duplicates = 0
        self.reordered = 0
        self.resyncs = 0
        self._repair = False
        #: spaces repair snapshots (a market that stays invalid must not cost a snapshot per batch)
        self._repair_pacer = RepairPacer(first_s=1.0, max_s=30.0)
        self.reconnects = 0
        self.retry_ms: int | None = None  # an SSE server's reconnection hint

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url}>"

    # -- public state -------------------------------------------------------

    @property
    def cursor(self) -> str | None:
        """Entry id of the newest message handed over (after ``on_messages`` returned)."""
        return self._cursor

    @property
    def last_seq(self) -> int | None:
        """The sequence number the stream is known to be complete up to."""
        return self._last_seq

    @property
    def ping_interval_ms(self) -> int:
        """The keep-alive interval in force: the provider's, else the configured one."""
        return self._server_interval_ms or self._ping_interval_ms

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        """Connect, stream and reconnect until :meth:`stop`.

        Raises:
            FatalSourceError: the provider refused the credentials (401/403).
            Exception: whatever ``on_messages`` raised, unchanged.
        """
        if self._http is None:
            self._http = httpx.AsyncClient(trust_env=False, timeout=self._snapshot_timeout_s)
        try:
            await self._run()
        finally:
            if self._own_http and self._http is not None:
                await self._http.aclose()
                self._http = None

    async def _run(self) -> None:
        first = True
        while not self._stopping:
            raise_if_cancelled()
            if not first:
                self.reconnects += 1
            first = False
            reason = "reconnecting"
            self._session_task = asyncio.create_task(self._session(), name=f"push-{self.name}")
            try:
                await self._session_task
                why = "session ended"
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._stopping and (current is None or current.cancelling() == 0):
                    break
                raise
            except FatalSourceError as exc:
                self._set_health("DOWN", exc.code or "fatal")
                logger.error("push %s: %s; giving up", self.name, exc)
                raise
            except _HeartbeatMissed as exc:
                reason, why = "heartbeat_missed", str(exc)
            except (_LinkLost, OSError, TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI,
                    httpx.HTTPError) as exc:
                why = str(exc) or type(exc).__name__
            finally:
                self._session_task = None
            if self._stopping:
                break
            raise_if_cancelled()  # a cancel may have been swallowed, or replaced by an error while closing
            self._set_health("DOWN", reason)
            delay = self._backoff.next_delay()
            if self.retry_ms is not None:  # the server's hint, never beyond our own longest wait
                delay = max(delay, min(self.retry_ms / 1000, self._backoff_max_s))
            logger.info("push %s: connection lost (%s); reconnecting in %.2f s", self.name, why, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_event.wait()
        logger.info("push %s: stopped", self.name)

    # -- one connection -----------------------------------------------------

    def _open(self) -> contextlib.AbstractAsyncContextManager[Receiver]:
        """Connect; yield ``recv(timeout_s)`` → received items ([] on timeout),
        raising _LinkLost when the stream ends."""
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        return {"X-Api-Key": self._api_key} if self._api_key else {}

    async def _session(self) -> None:
        # what the old connection left undelivered or held behind a gap is not
        # covered by the cursor: the resume replays it
        self._held.clear()
        self._out, self._out_entry = [], None
        self._gap_since = None
        self._seen_seq = self._last_seq
        async with self._open() as recv:
            loop = asyncio.get_running_loop()
            last_rx = loop.time()
            delivered = False
            while True:
                now = loop.time()
                interval_s = self.ping_interval_ms / 1000
                late_at = last_rx + interval_s * self._late_factor
                dead_at = last_rx + interval_s * self._dead_factor
                wake_at = late_at if now < late_at else dead_at
                if self._gap_since is not None:
                    wake_at = min(wake_at, self._gap_since + self._reorder_s)
                batch = await recv(max(wake_at - now, 0.005))
                raise_if_cancelled()
                now = loop.time()
                if batch:
                    last_rx = now
                    for raw, _ in batch:
                        self._handle(raw, now)
                    await self._deliver(batch[0][1])
                    self._set_health("UP", None)
                    if not delivered:
                        delivered = True
                        self._backoff.reset()
                    if (self._repair and self.snapshot_url is not None and self._gap_since is None
                            and self._repair_pacer.due(now)):
                        self._repair = False  # a market's change was rejected: the snapshot re-images it
                        self._repair_pacer.take(now)  # (the first at once, then 1, 2, 4 … 30 s apart)
                        await self._resync()
                        last_rx = loop.time()
                        continue
                if self._gap_since is not None and (now - self._gap_since >= self._reorder_s
                                                    or len(self._held) > self._reorder_window):
                    await self._resync()
                    last_rx = loop.time()
                    continue
                silent_s = now - last_rx
                if silent_s >= interval_s * self._dead_factor:
                    raise _HeartbeatMissed(f"no message for {silent_s:.1f} s")
                if silent_s >= interval_s * self._late_factor and self._health == ("UP", None):
                    self._set_health("DEGRADED", "heartbeat_late")

    def _handle(self, raw: bytes, now: float) -> None:
        """Route one message: sequence it, hold it back, or pass it on."""
        self.messages_received += 1
        try:
            env = _decode_envelope(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._out.append(raw)  # not ours to judge: the normaliser quarantines it
            return
        kind, seq = env.type, env.seq
        if kind == "connected":
            if env.ping_interval_ms and env.ping_interval_ms > 0:
                self._server_interval_ms = env.ping_interval_ms
            self._out.append(raw)
        elif kind == "ping":
            self._out.append(raw)
            if seq is not None:
                self._saw(seq, now)
        elif kind == "snapshot":
            self._out.append(raw)
            self._note_entry(env.entry_id)
            if seq is not None:
                self._covered(seq, now)
        elif seq is None or self._last_seq is None:
            self._out.append(raw)
            self._note_entry(env.entry_id)
            if seq is not None:
                self._last_seq = seq
                self._saw(seq, now)
        elif seq <= self._last_seq:
            self.duplicates += 1
            self._out.append(raw)  # the normaliser drops it by entry id, and counts it
        elif seq == self._last_seq + 1:
            self._out.append(raw)
            self._note_entry(env.entry_id)
            self._last_seq = seq
            self._saw(seq, now)
            self._release()
        elif seq in self._held:
            self.duplicates += 1
        else:
            self._held[seq] = (raw, env.entry_id)
            self._saw(seq, now)

    def _saw(self, seq: int, now: float) -> None:
        if self._seen_seq is None or seq > self._seen_seq:
            self._seen_seq = seq
        if self._last_seq is not None and self._seen_seq > self._last_seq:
            if self._gap_since is None:
                self._gap_since = now
        else:
            self._gap_since = None

    def _release(self) -> None:
        """Hand over held messages that are now next in line."""
        held = self._held
        while held and self._last_seq is not None and self._last_seq + 1 in held:
            self._last_seq += 1
            raw, entry = held.pop(self._last_seq)
            self.reordered += 1
            self._out.append(raw)
            self._note_entry(entry)
        if self._last_seq is not None and (self._seen_seq is None or self._seen_seq <= self._last_seq):
            self._gap_since = None

    def _covered(self, seq: int, now: float) -> None:
        """A snapshot covers the stream up to ``seq``: drop what it covers,
        release what follows it, and note a gap that remains."""
        self._last_seq = seq
        for s in [s for s in self._held if s <= seq]:
            del self._held[s]
        # from here on only what is held counts as seen (a restarted provider may count from 0 again)
        self._seen_seq = max(seq, *self._held) if self._held else seq
        self._gap_since = None
        self._release()
        if self._seen_seq > self._last_seq:
            self._gap_since = now

    def _note_entry(self, entry: str | None) -> None:
        if entry is None:
            return
        key = entry_key(entry)
        if key is None:
            return
        best = self._out_entry or self._cursor
        if best is None or (entry_key(best) or (0, 0)) < key:
            self._out_entry = entry

    async def _deliver(self, recv_ms: int) -> None:
        """Hand ``_out`` over, then advance the cursor."""
        out, self._out = self._out, []
        entry, self._out_entry = self._out_entry, None
        if out:
            await self._on_messages(out, recv_ms)
            raise_if_cancelled()
        if entry is not None:
            self._cursor = entry

    def request_repair(self) -> None:
        """Ask for a REST snapshot after the current batch (paced: the first at
        once, then 1, 2, 4 … 30 s apart while more are asked for): the caller rejected
        a market's change, and only a fresh image can repair it (no-op
        without a snapshot URL: the market then stays stale until the
        stream re-images it)."""
        self._repair = True

    async def _resync(self) -> None:
        """Close a gap from the REST snapshot (or reconnect when there is none)."""
        if self.snapshot_url is None:
            raise _LinkLost(f"sequence gap after {self._last_seq} and no snapshot url: resuming")
        await self._deliver(self._clock_ms())
        self.resyncs += 1
        self._set_health("DEGRADED", "recovering")
        logger.info("push %s: gap after seq %s (seen %s); resyncing from the snapshot", self.name,
                    self._last_seq, self._seen_seq)
        assert self._http is not None
        try:
            async with asyncio.timeout(self._snapshot_timeout_s):
                resp = await self._http.get(self.snapshot_url, headers=self._headers())
                body = resp.content
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _LinkLost(f"snapshot resync failed: {exc or type(exc).__name__}") from None
        if resp.status_code in (401, 403):
            raise FatalSourceError(f"push {self.name}: snapshot refused the api key (http {resp.status_code})",
                                   code="unauthorized")
        if resp.status_code != 200:
            raise _LinkLost(f"snapshot resync failed: http {resp.status_code}")
        try:
            env = _decode_envelope(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            env = _Envelope()
        if env.type != "snapshot" or env.seq is None:
            raise _LinkLost("snapshot resync failed: the body is not a snapshot with a seq")
        recv_ms = self._clock_ms()
        self._out.append(body)
        self._note_entry(env.entry_id)
        age_ms = cache_age_ms(resp.headers)
        if age_ms:
            # a cache in front served it (Age): the snapshot counts as received that much earlier,
            # as that is also what it confirms (Ingest.feed confirms a stream's markets as of a
            # message's receipt, at most its emitted_at + max_stream_lag_ms when it has one: a
            # snapshot may have none, and the bound may be off). Delivered alone: the held messages
            # it releases are live and keep their arrival (an earlier time would make their
            # emitted_at look in the future: clock_skew)
            await self._deliver(recv_ms - age_ms)
        self._covered(env.seq, asyncio.get_running_loop().time())
        await self._deliver(recv_ms)
        self._set_health("UP", None)




# -- wiring: client → ingest → store, with health ------------------------------------------


def client_options(spec: SourceSpec) -> dict[str, Any]:
    """:class:`PushClient` keyword arguments from ``--source`` options:
    ``api_key``, ``snapshot_url`` (``none`` = no resync endpoint; default
    beside the stream, see :func:`default_snapshot_url`), ``ping_interval_ms``,
    ``reorder_ms``, ``connect_timeout_s``, ``backoff_initial_s``, ``backoff_max_s``."""
    snap = spec.get("snapshot_url")
    opts: dict[str, Any] = {
        "url": spec.url,
        "api_key": spec.get("api_key"),
        "snapshot_url": None if snap == "none" else snap or default_snapshot_url(spec.url),
        "name": spec.name,
        "ping_interval_ms": int(spec.get_float("ping_interval_ms", 5000)),
        "reorder_ms": int(spec.get_float("reorder_ms", 500)),
        "connect_timeout_s": spec.get_float("connect_timeout_s", 10.0),
        "backoff_initial_s": spec.get_float("backoff_initial_s", 0.5),
        "backoff_max_s": spec.get_float("backoff_max_s", 30.0),
    }
    return opts


class PushSource(ClientSource):
    """A push stream as a :class:`feed.sources.base.Source`: a
    ``client_cls`` (:class:`feed.sources.ws.PushWsClient`,
    :class:`feed.sources.sse.PushSseClient`) resuming after the sink's
    cursor and delivering every batch of messages to the sink. A rejected
    change asks the client for a REST snapshot (:meth:`request_repair`).

    options: :func:`client_options` keyword arguments (with overrides).
    on_client: called with the client and the sink before it runs.
    """

    def __init__(self, name: str, client_cls: type[PushClient], options: dict[str, Any], *,
                 on_client: Callable[[PushClient, Sink], None] | None = None) -> None:
        super().__init__(name)
        self.client_cls = client_cls
        self.options = options
        self.on_client = on_client
        self.client: PushClient | None = None

    async def run(self, sink: Sink) -> None:
        client = self.client = self.client_cls(cursor=sink.cursor, on_messages=self.deliverer(sink),
                                               on_health=sink.set_state, **self.options)
        if self.on_client is not None:
            self.on_client(client, sink)
        await self.run_client(client)

    def request_repair(self) -> None:
        if self.client is not None:
            self.client.request_repair()


def push_source(spec: SourceSpec, client_cls: type[PushClient], *,
                on_client: Callable[[PushClient, Sink], None] | None = None, **client_overrides: Any) -> PushSource:
    """The :class:`PushSource` of a ``--source push-ws=…`` / ``push-sse=…`` spec."""
    return PushSource(spec.name, client_cls, {**client_options(spec), **client_overrides}, on_client=on_client)


async def run_push_source(store: Store, settings: Settings, spec: SourceSpec, client_cls: type[PushClient], *,
                          on_client: Callable[[PushClient, Ingest], None] | None = None,
                          **client_overrides: Any) -> None:
    """Ingest one push stream until cancelled (raises on fatal errors),
    through :class:`feed.pipeline.Pipeline` like every source: the stored
    markets and cursor are loaded first (the stream resumes after the
    cursor). ``on_client(client, ingest)`` is called before the client runs
    (tests and benchmarks use it); ``client_overrides`` override
    :func:`client_options`."""
    from feed.normalise.push import from_spec as normaliser_from_spec
    from feed.pipeline import Pipeline

    pipeline: Pipeline | None = None

    def hook(client: PushClient, sink: Sink) -> None:
        if on_client is not None and pipeline is not None:
            on_client(client, pipeline.ingest)

    source = push_source(spec, client_cls, on_client=hook, **client_overrides)
    pipeline = Pipeline(store, settings, name=spec.name, kind=spec.kind,
                        normaliser=normaliser_from_spec(spec, settings))
    await pipeline.run(source)
