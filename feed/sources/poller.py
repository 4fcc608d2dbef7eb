"""HTTP pollers: Pinnacle (cursor mode) and The Odds API (snapshot-diff / conditional).

I/O only — decoding and diffing are the normalisers' job
(:mod:`feed.normalise.pinnacle`, :mod:`feed.normalise.theoddsapi`). Layers:

- :class:`ProviderHttp` — one ``httpx.AsyncClient`` per source (HTTP/2 when
  the server offers it, keep-alive, a bounded pool, connect/read/write/pool
  timeouts and a **total deadline per request** that also bounds a trickled
  body, a body-size cap). Before each request: the Retry-After gate (no
  request before a 429's ``Retry-After`` expired), the local quota guard,
  the token bucket and the circuit breaker. After it: quota headers, a 401
  with token auth → one shared refresh and one retry, and
  :func:`~feed.sources.http_limits.classify_response` → typed errors,
  logged with the provider's body (bounded, secrets redacted). An answer a
  cache in front served (an ``Age`` header, RFC 9111 §5.1) is as old as it
  says (+ 1 s, the header's truncation): what it *confirms* ("nothing
  changed", the markets current) counts as of that long before its request
  (:attr:`HttpResult.asked_ms`), and a Pinnacle odds or fixtures snapshot
  is stamped that much earlier too (``asked_before_ms``). The normalisers
  still read its data as arriving at :attr:`HttpResult.recv_ms` (they time
  period cutoffs and clock-skew bounds by it: an earlier time there would
  let a cached answer arriving after a cutoff keep the market open, or make
  a provider time look in the future), but the payload carries
  :attr:`HttpResult.data_age_ms`, and the ingest stamps the changes it
  brings as received that much earlier — as of the request, less the
  ``Age``: a cached (or slow) answer's prices read as old as they may be.
  The known limit: an ``Age`` that cannot be read, or a cache that sends
  none, is taken as the origin's answer.
- :class:`PollerSource` — the loop shared by every poller: a schedule per
  key (sport), cadence pre-match vs in-play (stretched by the quota
  governor), exponential backoff with full jitter after failures, and the
  source's health: UP; DEGRADED (``rate_limited``, ``quota_low``,
  ``upstream_5xx``, ``timeout``, …); DOWN (``circuit_open``,
  ``quota_exhausted``, a fatal code) — reported to the pipeline's sink
  (:class:`feed.sources.base.Sink`), which persists it with the lag
  percentiles.
- :class:`PinnacleSource` — **cursor** mode: ``/v1/fixtures`` and
  ``/v2/odds`` per sportId, a snapshot call (no ``since``) first, then
  ``since=<last>``; the normaliser advances the cursors and the pipeline
  stores them with the data they cover, so a restarted source resumes from
  them (the source reads its ``since`` back from ``sink.cursor``).
  Fixtures are re-read as a snapshot at start (names and ``parentId``
  links are not in the odds), and early when odds name an unknown event.
  Odds too: a sport's first odds call of a run is a snapshot even when a
  stored cursor would resume it (restored markets have no known cutoff
  until their period is sent again; the snapshot re-renders each with its
  cutoff or suspends it, at no more requests than the delta it replaces),
  asked only once a fixtures snapshot was applied (else it would suspend
  every market of an event whose fixture is unknown). No odds snapshot
  confirms anything (Pinnacle caches snapshot answers 60 s: its odds may be
  a minute old at the request): the next delta (``since`` = the snapshot's
  ``last``: every change since) does; the channel tells the normaliser how
  long before the receipt the snapshot was asked, and it stamps what the
  snapshot changed as of the request − the cache, so a market it imaged
  reads that old (stale) until then. A fixtures or odds snapshot of a
  resumed sport answered older than its cursor (a cached answer) is
  dropped, no fixtures or odds call follows, and it is asked again
  :data:`PN_SNAPSHOT_CACHE_S` later; the markets read stale meanwhile.
  A fixtures snapshot rejected whole by the normaliser (a malformed body)
  is likewise asked again :data:`PN_SNAPSHOT_CACHE_S` later (at most one a
  minute, for as long as it takes: Pinnacle's snapshot limit), no odds call
  before one applies (nothing confirms the sport's markets: they read
  stale) and the source reads DEGRADED (:data:`PN_BAD_FIXTURES`) until then.
  An odds snapshot rejected whole (the image, a resync or the repair after a
  rejected change) follows the same rule: asked again
  :data:`PN_SNAPSHOT_CACHE_S` later (it was asked at every poll), no fixtures
  or odds call meanwhile (a delta would confirm the markets it was to image
  or repair: they read stale), DEGRADED (:data:`PN_BAD_ODDS`) until one is read.
  Three stale answers in a row (``last`` going backwards), a rejected
  change (a repair) or ``resync_s`` → a fresh snapshot (a *resync*); one
  answered older than the cursor (at a 5 s delta rate the cached answer
  usually is) is dropped, and so that it takes effect no fixtures or odds
  call follows until it is asked again :data:`PN_SNAPSHOT_CACHE_S` later
  (the cache has moved past the held cursor by then), at most
  :data:`PN_RESYNC_TRIES` times in a row; the markets read stale
  meanwhile. Results: ``/v1/fixtures/settled`` per
  sportId every ``settled_interval_s`` (``since=<last>`` like the others;
  ``settled=false`` turns it off), after ``/v2/leagues`` (static, cached
  ``static_ttl_s``: which team is the home side) was delivered once.
  An empty (or 304) odds answer is delivered as an empty delta before it
  confirms the sport's markets, so the normaliser suspends those whose
  cutoff has passed by then.
- :class:`TheOddsApiSource` — **snapshot-diff** mode: ``/v4/sports/{sport}/odds``
  every ``interval_s`` (``live_interval_s`` while the sport has events in
  play); with ``mode=conditional`` it sends ``If-None-Match`` and a 304
  means nothing changed. ``sport=all`` polls the active sports from
  ``/v4/sports`` (static data, cached ``static_ttl_s``). Scores:
  ``/v4/sports/{key}/scores?daysFrom=1`` every ``live_interval_s`` for each
  sport key the normaliser asks for (``scores:<key>``: events in play),
  kept ``scores_linger_s`` after the last ask so a completion is seen
  (``scores=off`` turns it off); scores polls confirm no market, and only
  they confirm the event states (``SourceHealth.states_confirmed_at``: as of
  the oldest last successful scores poll over the polled sport keys; an odds
  poll never vouches for a score). Pinnacle's live scores come in its odds
  answers: they are confirmed with its markets.

Each answer is delivered as a :class:`~feed.sources.base.Payload` whose
channel says what it answers (Pinnacle ``odds:29:since``; The Odds API's
sport key), so a recording replays exactly. Registry factories:
:func:`pinnacle_from_spec`, :func:`theoddsapi_from_spec`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import httpx
import msgspec

from feed.aio import wait_event
from feed.errors import ConfigError, FatalSourceError, RetryableSourceError, SourceError
from feed.models import SourceState
from feed.normalise.pinnacle import SNAPSHOT_CACHE_MS as PN_SNAPSHOT_CACHE_MS
from feed.normalise.pinnacle import channel as pinnacle_channel
from feed.normalise.pinnacle import decode_cursor as pinnacle_cursor
from feed.settings import Settings
from feed.sources.backoff import Backoff
from feed.sources.base import Delivered, Payload, Sink
from feed.sources.http_auth import ApiKeyAuth, BasicAuth, HmacSigner, Secret, SigningTransport, TokenAuth
from feed.sources.http_limits import (
    BODY_LOG_MAX,
    CircuitBreaker,
    CircuitOpenError,
    QuotaExhaustedError,
    QuotaGovernor,
    RateLimitedError,
    SourceAuthError,
    TokenBucket,
    TransportFailure,
    UpstreamError,
    cache_age_ms,
    classify_response,
    parse_retry_after,
)
from feed.sources.spec import SourceSpec

__all__ = [
    "HttpOptions",
    "HttpResult",
    "PinnacleSource",
    "PollerOptions",
    "PollerSource",
    "ProviderHttp",
    "StaticCache",
    "TheOddsApiSource",
    "build_http",
    "pinnacle_from_spec",
    "theoddsapi_from_spec",
]

logger = logging.getLogger(__name__)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


# --- HTTP ------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpOptions:
    """Transport limits of one provider client (seconds, bytes, per second)."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    deadline_s: float = 15.0
    """Whole request, body included (a trickled body cannot outlast it)."""
    max_connections: int = 4
    max_keepalive: int = 4
    keepalive_expiry_s: float = 30.0
    max_body_bytes: int = 32 << 20
    rate_per_s: float = 5.0
    burst: float = 5.0
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    default_retry_after_s: float = 2.0
    quota_low_water: int = 100
    quota_reserve: int = 1
    quota_pause_s: float = 900.0
    http2: bool = True
    user_agent: str = "oddsfeed/0.1 (+https://github.com/oddsfeed)"


class HttpResult(NamedTuple):
    """A successful reply (2xx or 304). recv_ms: wall ms when the body was read — when the
    normalisers read it as arriving (period cutoffs, clock-skew bounds); what it confirms and
    the changes it brings count as of :attr:`asked_ms` (:attr:`data_age_ms` before the read);
    elapsed_ms: from sending the request to reading the body."""

    status: int
    headers: httpx.Headers
    body: bytes
    recv_ms: int
    elapsed_ms: float

    @property
    def age_ms(self) -> int:
        """How long before it was sent a cache in front of the provider holds this answer, ms
        (:func:`cache_age_ms`; 0: the provider itself answered)."""
        return cache_age_ms(self.headers)

    @property
    def asked_ms(self) -> int:
        """Wall ms when the request was sent, less the answer's age in a cache
        (:attr:`age_ms`): what an answer that says "nothing changed" confirms. The provider
        answered at some moment between sending and reading, so confirming as of the read
        would claim up to the whole round trip of freshness the answer does not vouch for (a
        slow answer under load served old prices as fresh); a cache in front (``Age``) made it
        that much earlier still (its data: :attr:`data_age_ms`)."""
        return self.recv_ms - int(self.elapsed_ms + 0.999) - self.age_ms

    @property
    def data_age_ms(self) -> int:
        """How much older than :attr:`recv_ms` this answer's data may be, ms: back to
        :attr:`asked_ms` — the request (the provider made the answer at some moment between
        sending and reading: claiming the read would give its prices up to the whole round trip
        of freshness they may not have), less its age in a cache (``Age``). What the ingest
        stamps the changes it brings as received at (:attr:`feed.sources.base.Payload.age_ms`)."""
        return self.recv_ms - self.asked_ms


class ProviderHttp:
    """The HTTP side of one poller (see the module docstring).

    base_url: the provider root (``http://127.0.0.1:9555`` or ``…/v4``);
    provider: a name for logs and errors. Credentials: ``api_key``,
    ``basic``, ``token``, ``signer`` (any combination). ``transport``:
    inject an httpx transport (tests). ``stats`` counts requests by status.
    """

    def __init__(self, base_url: str, *, provider: str, options: HttpOptions | None = None,
                 api_key: ApiKeyAuth | None = None, basic: BasicAuth | None = None, token: TokenAuth | None = None,
                 signer: HmacSigner | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic, clock_ms: Callable[[], int] = _wall_ms) -> None:
        self.options = o = options or HttpOptions()
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.basic = basic
        self.token = token
        self.signer = signer
        self._clock = clock
        self._clock_ms = clock_ms
        limits = httpx.Limits(max_connections=o.max_connections, max_keepalive_connections=o.max_keepalive,
                              keepalive_expiry=o.keepalive_expiry_s)
        inner = transport or httpx.AsyncHTTPTransport(http2=o.http2, limits=limits, retries=0)
        headers = {"User-Agent": o.user_agent, "Accept": "application/json", "Accept-Encoding": "gzip"}
        if api_key is not None and api_key.header:
            headers[api_key.header] = api_key.key.reveal()
        if basic is not None:
            headers["Authorization"] = basic.header_value()
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, follow_redirects=False,
            timeout=httpx.Timeout(o.read_timeout_s, connect=o.connect_timeout_s, pool=o.deadline_s),
            transport=SigningTransport(inner, query_key=api_key, signer=signer))
        self.bucket = TokenBucket(o.rate_per_s, o.burst, clock=clock)
        self.breaker = CircuitBreaker(o.breaker_failures, o.breaker_reset_s, clock=clock)
        self.quota = QuotaGovernor(low_water=o.quota_low_water, reserve=o.quota_reserve, pause_s=o.quota_pause_s)
        self.not_before = 0.0  # monotonic: no request before this (Retry-After)
        self._quota_probe_at: float | None = None
        self.stats: Counter[str] = Counter()
        self._secrets = [s for s in self._secret_values() if s]

    def __repr__(self) -> str:
        return f"ProviderHttp({self.provider!r}, {self.base_url!r})"

    def _secret_values(self) -> list[str]:
        out = []
        if self.api_key is not None:
            out.append(self.api_key.key.reveal())
        if self.basic is not None:
            out += [self.basic.password.reveal(), self.basic.header_value().split(" ", 1)[1]]
        if self.token is not None:
            out.append(self.token.client_secret.reveal())
        if self.signer is not None:
            out.append(self.signer.secret.reveal())
        return out

    def redact(self, text: str) -> str:
        """``text`` with every credential this client holds replaced by ``***``."""
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "***")
        return text

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- gates ----------------------------------------------------------------

    def _quota_gate(self) -> None:
        """Stop before the quota is spent; one probe per ``quota_pause_s``."""
        q = self.quota
        if not q.blocked():
            self._quota_probe_at = None
            return
        now = self._clock()
        if self._quota_probe_at is None or now < self._quota_probe_at:
            if self._quota_probe_at is None:
                self._quota_probe_at = now + q.pause_s
            raise QuotaExhaustedError(
                f"{self.provider} quota nearly spent ({q.remaining:g} left, reserve {q.reserve}): pausing",
                "quota_reserve", retry_after_s=self._quota_probe_at - now, provider=self.provider)
        self._quota_probe_at = now + q.pause_s  # this request is the probe

    async def _wait_gates(self) -> None:
        for _ in range(10_000):
            wait = self.not_before - self._clock()
            if wait <= 0:
                break
            self.stats["retry_after_waits"] += 1
            await asyncio.sleep(wait)
        await self.bucket.acquire()
        # the bucket may have slept: re-check the Retry-After gate set meanwhile by another request
        while (wait := self.not_before - self._clock()) > 0:
            await asyncio.sleep(wait)

    # -- requests ---------------------------------------------------------------

    async def get(self, path: str, params: Mapping[str, Any] | None = None, *,
                  headers: Mapping[str, str] | None = None) -> HttpResult:
        """GET ``path``: an :class:`HttpResult` for 2xx/304, else a typed error
        (:mod:`feed.sources.http_limits`)."""
        self._quota_gate()
        await self._wait_gates()
        self.breaker.before_request()
        result: HttpResult | None = None
        try:
            for attempt in (0, 1):
                hdrs = dict(headers or {})
                used = None
                if self.token is not None:
                    used = await self.token.token(self.client)
                    hdrs["Authorization"] = f"Bearer {used.reveal()}"
                result = await self._send(path, params, hdrs)
                if result.status == 401 and self.token is not None and attempt == 0:
                    self.stats["token_retries"] += 1
                    await self.token.refresh(self.client, stale=used)
                    continue
                break
        except (TransportFailure, UpstreamError):
            self.breaker.record_failure()
            raise
        except SourceAuthError:
            self.breaker.release_probe()
            raise
        assert result is not None
        self.quota.observe(result.headers)
        err = classify_response(self.provider, path, result.status, result.headers, result.body,
                                default_retry_after_s=self.options.default_retry_after_s,
                                quota_retry_s=self.options.quota_pause_s)
        if err is None:
            self.breaker.record_success()
            return result
        retry_after = getattr(err, "retry_after_s", None)
        if retry_after is None and result.status == 503:
            retry_after = parse_retry_after(result.headers.get("retry-after"))
        if retry_after:
            self.not_before = max(self.not_before, self._clock() + retry_after)
        if isinstance(err, UpstreamError):
            self.breaker.record_failure()
        else:  # the provider answered sensibly: it is up
            self.breaker.record_success()
        body = self.redact(result.body[:BODY_LOG_MAX].decode("utf-8", "replace"))
        log = logger.error if isinstance(err, FatalSourceError) else logger.warning
        log("%s GET %s -> %d %s (%s); body: %s", self.provider, path, result.status, type(err).__name__,
            err.code, body)
        raise err

    async def _send(self, path: str, params: Mapping[str, Any] | None, headers: dict[str, str]) -> HttpResult:
        o = self.options
        t0 = time.perf_counter()
        self.stats["requests"] += 1
        try:
            async with asyncio.timeout(o.deadline_s):
                async with self.client.stream("GET", path, params=params, headers=headers) as resp:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > o.max_body_bytes:
                            raise TransportFailure(f"{self.provider} {path}: body larger than {o.max_body_bytes} bytes",
                                                   "body_too_large", provider=self.provider, path=path)
                        chunks.append(chunk)
                    body = b"".join(chunks)
        except TimeoutError:
            self.stats["deadline"] += 1
            raise TransportFailure(f"{self.provider} {path}: no complete reply within {o.deadline_s:g}s",
                                   "deadline", provider=self.provider, path=path) from None
        except httpx.TimeoutException as exc:
            self.stats["timeout"] += 1
            raise TransportFailure(f"{self.provider} {path}: {type(exc).__name__}", "timeout",
                                   provider=self.provider, path=path) from None
        except httpx.HTTPError as exc:
            self.stats["transport_error"] += 1
            code = "connect" if isinstance(exc, httpx.ConnectError) else "reset"
            raise TransportFailure(f"{self.provider} {path}: {type(exc).__name__}: {self.redact(str(exc))[:200]}",
                                   code, provider=self.provider, path=path) from None
        except ValueError as exc:  # a header or URL httpx cannot encode (UnicodeEncodeError: a provider's value)
            self.stats["transport_error"] += 1
            raise TransportFailure(f"{self.provider} {path}: request not sendable: {type(exc).__name__}",
                                   "bad_request", provider=self.provider, path=path) from None
        self.stats[f"status_{resp.status_code}"] += 1
        return HttpResult(resp.status_code, resp.headers, body, self._clock_ms(), (time.perf_counter() - t0) * 1000)


# --- static data -------------------------------------------------------------------


class StaticCache:
    """Slow-changing reference data (sports, leagues) kept ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: dict[str, tuple[float, Any]] = {}
        self.loads = 0

    def put(self, key: str, value: Any) -> None:
        """Hold ``value`` for ``key`` as if just loaded."""
        self._items[key] = (self._clock(), value)

    async def get(self, key: str, loader: Callable[[], Awaitable[Any]]) -> Any:
        hit = self._items.get(key)
        now = self._clock()
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        try:
            value = await loader()
        except RetryableSourceError:
            if hit is not None:  # serve the old copy while the provider is unhappy
                return hit[1]
            raise
        self.loads += 1
        self._items[key] = (now, value)
        return value


# --- the loop ------------------------------------------------------------------------


@dataclass(frozen=True)
class PollerOptions:
    """Cadence and recovery of one poller (seconds)."""

    interval_s: float = 60.0
    """Poll interval while a key (sport) has nothing in play."""
    live_interval_s: float = 40.0
    """Poll interval while it has events in play."""
    min_interval_s: float = 0.0
    """Floor of every interval: the provider's own refresh (polling faster only spends quota)."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    health_every_s: float = 1.0
    static_ttl_s: float = 3600.0
    lag_window_s: float = 60.0


class PollerSource:
    """The loop shared by pollers, a :class:`feed.sources.base.Source`.
    Subclasses implement :meth:`start` (static data), :meth:`keys`,
    :meth:`poll` (one poll of one key) and :meth:`interval`. ``run(sink)``
    returns only when stopped; fatal errors raise. A poll confirms the
    source's markets only through :meth:`odds_confirmed`."""

    kind = "poller"
    confirms_by_messages = False
    #: the source's event states are confirmed only by :meth:`Pipeline.confirm_states
    #: <feed.pipeline.Pipeline.confirm_states>` (their own calls), not with its markets
    confirms_states_apart = False

    def __init__(self, name: str, http: ProviderHttp, options: PollerOptions, *,
                 clock: Callable[[], float] = time.monotonic, stale_after_ms: int | None = None) -> None:
        self.name = name
        self.http = http
        self.options = options
        self.stale_after_ms = stale_after_ms
        self._clock = clock
        self._sink: Sink | None = None
        self.state: SourceState = "DOWN"
        self.reason: str | None = "starting"
        self.static = StaticCache(options.static_ttl_s, clock=clock)
        self.backoff = Backoff(options.backoff_initial_s, 2.0, options.backoff_max_s)
        self.polls = 0
        self.failures: Counter[str] = Counter()
        self.last_error: SourceError | None = None
        self._stop = asyncio.Event()
        self._odds_ok_at: dict[str, int] = {}

    @property
    def sink(self) -> Sink:
        """The pipeline this source delivers to (set by :meth:`run`)."""
        if self._sink is None:
            raise RuntimeError(f"{self.name}: not running")
        return self._sink

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.http.base_url!r})"

    # -- to implement ------------------------------------------------------------

    async def start(self) -> None:
        """Load static data before the first poll."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    async def poll(self, key: str) -> None:
        raise NotImplementedError

    def interval(self, key: str) -> float:
        return self.options.interval_s

    # -- shared ---------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def request_repair(self) -> None:
        """Pollers repair from their own answers (see the subclasses)."""

    def _set_state(self, state: SourceState, reason: str | None) -> None:
        self.state, self.reason = state, reason
        if self._sink is not None:
            self._sink.set_state(state, reason)

    async def ingest_body(self, body: bytes, recv_ms: int, channel: str = "", age_ms: int = 0) -> Delivered:
        """Deliver one answer (``channel``: what it answers; ``age_ms``: how much older than
        ``recv_ms`` its data may be, :attr:`HttpResult.data_age_ms`) to the pipeline."""
        return await self.sink.deliver([Payload(recv_ms, body, channel, age_ms)])

    def confirm_keys(self) -> list[str]:
        """The keys whose odds polls confirm the source's markets (default: every key)."""
        return self.keys()

    def odds_confirmed(self, key: str, recv_ms: int) -> None:
        """An odds poll of ``key`` succeeded (new data stored, or 304 / nothing
        new) for a request sent at ``recv_ms`` (:attr:`HttpResult.asked_ms`). The source's markets are
        confirmed as of the *oldest* last successful odds poll over its
        keys: a fixtures call, or one sport's poll while another's keep
        failing (429, 5xx, timeouts), confirms nothing."""
        self._odds_ok_at[key] = recv_ms
        times = [self._odds_ok_at.get(k) for k in self.confirm_keys()]
        if times and None not in times:
            self.sink.confirm(min(t for t in times if t is not None))

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await wait_event(self._stop, seconds)

    async def run(self, sink: Sink) -> None:
        """Poll until :meth:`stop` (or cancellation); raise a fatal error."""
        self._sink = sink
        self._set_state("DOWN", "starting")
        o = self.options
        if min(o.interval_s, o.live_interval_s) < o.min_interval_s:
            logger.warning("%s: poll intervals below %.3gs (the provider's refresh) are raised to it; "
                           "set min_interval_s to change the floor", self.name, o.min_interval_s)
        await self.start()
        due: dict[str, float] = {}
        try:
            while not self._stop.is_set():
                keys = self.keys()
                if not keys:
                    await self._sleep(self.options.interval_s)
                    continue
                for k in list(due):
                    if k not in keys:
                        del due[k]
                for k in keys:
                    due.setdefault(k, 0.0)
                key = min(due, key=due.__getitem__)
                await self._sleep(due[key] - self._clock())
                if self._stop.is_set():
                    break
                due[key] = self._clock() + await self._poll_once(key)
        finally:
            if self.state != "DOWN":
                self._set_state("DOWN", "stopped")
            await self.http.aclose()

    async def _poll_once(self, key: str) -> float:
        """One poll; returns the delay before this key is polled again."""
        http = self.http
        try:
            await self.poll(key)
        except RateLimitedError as exc:
            self._fail(exc, "DEGRADED", "rate_limited")
            return max(exc.retry_after_s, self.interval(key) * 0.1)
        except QuotaExhaustedError as exc:
            self._fail(exc, "DOWN", "quota_exhausted")
            return exc.retry_after_s
        except CircuitOpenError as exc:
            self._set_state("DOWN", "circuit_open")
            return exc.retry_in_s
        except FatalSourceError as exc:
            self._fail(exc, "DOWN", (exc.code or "fatal").lower())
            raise
        except RetryableSourceError as exc:
            reason = _reason_of(exc)
            state: SourceState = "DOWN" if http.breaker.state == "open" else "DEGRADED"
            self._fail(exc, state, "circuit_open" if state == "DOWN" else reason, kind=reason)
            return self.backoff.next_delay()
        self.polls += 1
        self.backoff.reset()
        if http.quota.low:
            self._set_state("DEGRADED", "quota_low")
        else:
            self._set_state("UP", None)
        return max(self.options.min_interval_s, self.interval(key) * http.quota.interval_factor())

    def _fail(self, exc: SourceError, state: SourceState, reason: str, kind: str | None = None) -> None:
        """Count a failure (by ``kind``, default ``reason``) and set the health."""
        self.failures[kind or reason] += 1
        self.last_error = exc
        if state == "DEGRADED" and self.state == "DOWN" and self.reason not in ("starting", "stopped"):
            state = "DOWN"  # stay down until a poll succeeds
        self._set_state(state, reason)
        logger.info("%s: %s (%s); next attempt after backoff", self.name, self.http.redact(str(exc)), reason)


def _reason_of(exc: RetryableSourceError) -> str:
    if isinstance(exc, UpstreamError):
        status = exc.status or 0
        return "upstream_5xx" if status >= 500 else f"upstream_{status}"
    if isinstance(exc, TransportFailure):
        return {"deadline": "timeout", "timeout": "timeout", "connect": "unreachable"}.get(exc.code or "", "transport_error")
    return (exc.code or "error").lower()


# --- Pinnacle ----------------------------------------------------------------------------


class PinnacleSource(PollerSource):
    """Pinnacle Lines API in cursor mode (see the module docstring).

    sports: sportIds to poll, or None for every sport ``/v2/sports`` lists
    with offerings (static data, cached ``static_ttl_s``).
    fixtures_interval_s: fixture deltas at most this often (sooner when odds
    name an unknown event). resync_s: a full snapshot this often (0: never;
    one answered older than the cursor is asked again a minute later, the
    deltas held meanwhile: module docstring).
    """

    kind = "pinnacle"

    def __init__(self, name: str, http: ProviderHttp, options: PollerOptions, *, sports: list[int] | None,
                 odds_format: Literal["decimal", "american"] = "decimal", fixtures_interval_s: float = 60.0,
                 resync_s: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 stale_after_ms: int | None = None, settled_interval_s: float | None = 60.0) -> None:
        super().__init__(name, http, options, clock=clock, stale_after_ms=stale_after_ms)
        self.sports = sports
        self.odds_format = odds_format
        self.fixtures_interval_s = fixtures_interval_s
        self.resync_s = resync_s
        #: seconds between settled polls of a sport (None: results are not polled)
        self.settled_interval_s = settled_interval_s
        self._settled_at: dict[int, float] = {}
        self._fixtures_at: dict[int, float] = {}
        self._snapshot_at: dict[int, float] = {}
        self._stale_streak: dict[int, int] = {}
        self._repair: set[int] = set()  # sports whose next odds poll is a snapshot (a change was rejected)
        #: (endpoint, sportId) a snapshot answer imaged in this run: until then each call of it is a
        #: snapshot (a resumed cursor's markets have no known cutoff) and no odds are asked before the
        #: fixtures are imaged; ``_stale_image_at``: when (clock s) the last such snapshot was asked that
        #: came back older than the cursor (the sport's next fixtures or odds call waits PN_SNAPSHOT_CACHE_S)
        self._imaged: set[tuple[str, int]] = set()
        self._stale_image_at: dict[int, float] = {}
        #: sportIds whose fixtures snapshot (the image) was last rejected whole by the normaliser (a
        #: malformed body): asked again PN_SNAPSHOT_CACHE_S later (``_stale_image_at`` holds when it
        #: was asked), no odds call before one applies; the source reads DEGRADED (PN_BAD_FIXTURES)
        self._bad_fixtures: set[int] = set()
        #: sportIds whose last odds snapshot (the image, or a resync / repair) was rejected whole by the
        #: normaliser: the same rule — asked again PN_SNAPSHOT_CACHE_S later (``_stale_image_at``), no
        #: fixtures or odds call meanwhile (a delta would confirm markets the snapshot was to repair),
        #: the source DEGRADED (PN_BAD_ODDS)
        self._bad_odds: set[int] = set()
        #: sportId -> (when (clock s) its last resync odds snapshot was asked — hourly, a repair, a
        #: cursor going backwards — that came back older than the cursor, how many did in a row):
        #: no fixtures or odds call until it is asked again PN_SNAPSHOT_CACHE_S later (at most
        #: PN_RESYNC_TRIES in all)
        self._resync_retry: dict[int, tuple[float, int]] = {}
        self._live: dict[int, bool] = {}  # sportId -> the last fixtures/odds answer had events in play
        self._active: list[str] = []
        self.requests: Counter[str] = Counter()
        self.stale_answers = 0

    def since(self, endpoint: Literal["fixtures", "odds", "settled"], sport: int) -> int | None:
        """The ``since`` to send next (None: a snapshot), from the cursor the
        pipeline stored with the data it covers."""
        cursor = self._sink.cursor if self._sink is not None else None
        return pinnacle_cursor(cursor).of(endpoint).get(str(sport))

    def keys(self) -> list[str]:
        if self.sports is None:
            return self._active or ["__sports__"]
        return [str(s) for s in self.sports]

    async def _sports(self) -> list[str]:
        async def load() -> list[str]:
            res = await self.http.get("/v2/sports")
            try:
                reply = msgspec.json.decode(res.body, type=_PnSports)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise UpstreamError(f"{self.name}: unreadable /v2/sports reply: {exc}", "bad_sports",
                                    provider=self.http.provider, path="/v2/sports", status=res.status) from None
            return [str(s.id) for s in reply.sports if s.hasOfferings]

        return await self.static.get("sports", load)

    def interval(self, key: str) -> float:
        if key == "__sports__":
            return self.options.interval_s
        live = self._live.get(int(key), False)
        return self.options.live_interval_s if live else self.options.interval_s

    async def poll(self, key: str) -> None:
        if self.sports is None:
            self._active = await self._sports()
            if key not in self._active:
                return
        sport = int(key)
        now = self._clock()
        resync = bool(self.resync_s) and now - self._snapshot_at.setdefault(sport, now) >= self.resync_s
        if sport in self._repair:
            self._repair.discard(sport)
            resync = True  # an event's change was rejected: a snapshot re-images what was lost
        if self._stale_streak.get(sport, 0) >= 3:
            logger.warning("%s: odds cursor for sport %d keeps going backwards; taking a snapshot", self.name, sport)
            resync = True
        first = ("fixtures", sport) not in self._imaged
        stale_at = self._stale_image_at.get(sport)
        retry = self._resync_retry.get(sport)
        if retry is not None and now - retry[0] >= PN_SNAPSHOT_CACHE_S:
            resync = True  # the resync snapshot again: the cache has moved on past the held cursor
        if sport in self._bad_odds:
            resync = True  # the odds snapshot was rejected whole: only a snapshot repairs (never a delta)
        got = Delivered()
        if (first or ("odds", sport) not in self._imaged or sport in self._bad_odds) and stale_at is not None \
                and now - stale_at < PN_SNAPSHOT_CACHE_S:
            # a snapshot came back older than the resumed cursor (Pinnacle caches snapshot answers): no
            # delta meanwhile (it would move the cursor past the next snapshot again, and confirm markets
            # whose cutoff is unknown); the sport's markets read stale until the next snapshot. Or the
            # fixtures snapshot was rejected whole (a malformed body): asked again no sooner (the same
            # cached answer, and Pinnacle's snapshot limit), no odds before a fixtures snapshot applies.
            # Or the odds snapshot was (an image, a resync or a repair): likewise, and no delta meanwhile
            pass
        elif retry is not None and now - retry[0] < PN_SNAPSHOT_CACHE_S:
            # a resync snapshot came back older than the cursor (a cached answer) and was dropped:
            # deltas wait (each would move the cursor past the next cached snapshot again, and the
            # resync would never take effect); unconfirmed meanwhile, the sport's markets age
            pass
        else:
            if first or resync or now - self._fixtures_at[sport] >= self.fixtures_interval_s:
                await self._fetch("fixtures", sport, snapshot=first or resync)
            if ("fixtures", sport) in self._imaged:  # (else an odds snapshot would suspend every market
                # of an event whose fixture is unknown: the fixtures snapshot is asked again first)
                got = await self._fetch("odds", sport, snapshot=resync or ("odds", sport) not in self._imaged
                                        or self.since("odds", sport) is None)
        if "fixtures" in got.requests:  # odds of events whose fixture is unknown yet
            await self._fetch("fixtures", sport, snapshot=False)
        every = self.settled_interval_s
        if every is not None and self._clock() - self._settled_at.get(sport, float("-inf")) >= every:
            await self._leagues(sport)
            self._settled_at[sport] = self._clock()
            await self._fetch("settled", sport, snapshot=self.since("settled", sport) is None)

    def _set_state(self, state: SourceState, reason: str | None) -> None:
        # a sport polled whose fixtures snapshot was rejected (its odds held, its markets unconfirmed):
        # not UP — a poll that succeeded otherwise says DEGRADED and why
        if state == "UP" and (self._bad_fixtures or self._bad_odds):
            polled = {int(k) for k in self.keys() if k.isdigit()}
            if not self._bad_fixtures.isdisjoint(polled):
                state, reason = "DEGRADED", PN_BAD_FIXTURES
            elif not self._bad_odds.isdisjoint(polled):
                state, reason = "DEGRADED", PN_BAD_ODDS
        super()._set_state(state, reason)

    async def _leagues(self, sport: int) -> None:
        """Deliver ``/v2/leagues`` of ``sport`` once per ``static_ttl_s`` (which
        team is the home side, for the settled scores). A provider without it
        is logged once and the settled scores read team1 as home."""
        async def load() -> bool:
            res = await self.http.get("/v2/leagues", {"sportId": sport})
            await self.ingest_body(res.body, res.recv_ms, pinnacle_channel("leagues", sport, snapshot=True),
                                   res.data_age_ms)
            return True

        try:
            await self.static.get(f"leagues:{sport}", load)
        except SourceError as exc:
            if isinstance(exc, SourceAuthError):
                raise
            self._settled_at[sport] = self._clock()
            if self.failures["leagues"] == 0:
                logger.warning("%s: no /v2/leagues for sport %d (%s); settled scores read team1 as home",
                               self.name, sport, self.http.redact(str(exc)))
            self.failures["leagues"] += 1
            self.static.put(f"leagues:{sport}", False)  # not asked again before static_ttl_s

    async def _fetch(self, endpoint: Literal["fixtures", "odds", "settled"], sport: int, *,
                     snapshot: bool) -> Delivered:
        since = None if snapshot else self.since(endpoint, sport)
        params: dict[str, Any] = {"sportId": sport}
        if since is not None:
            params["since"] = since
        if endpoint == "odds":
            params["oddsFormat"] = "American" if self.odds_format == "american" else "Decimal"
        path = {"fixtures": "/v1/fixtures", "odds": "/v2/odds", "settled": "/v1/fixtures/settled"}[endpoint]
        self.requests[endpoint] += 1
        image = since is None and endpoint != "settled" and (endpoint, sport) not in self._imaged
        # a snapshot answer may be Pinnacle's cached one, up to a minute old at its request: it
        # confirms nothing (the next delta, since=its last, brings every change since and does), and
        # the normaliser stamps what it changes as of the request less the cache (the channel says
        # how long before the receipt the request was sent)
        resync = since is None and endpoint == "odds" and not image
        asked = self._clock()
        res = await self.http.get(path, params)
        now = self._clock()
        channel = pinnacle_channel(endpoint, sport, snapshot=since is None,
                                   asked_before_ms=min(res.recv_ms - res.asked_ms, 999_999_999)
                                   if since is None and endpoint != "settled" else 0)
        if endpoint == "fixtures":
            self._fixtures_at[sport] = now
        if since is None and endpoint == "odds":
            self._snapshot_at[sport] = now
            self._stale_streak[sport] = 0
        if res.status == 304 or not res.body.strip():
            if since is None and endpoint == "odds":
                self._bad_odds.discard(sport)  # (an answer: the sport offers nothing)
            if image:
                self._imaged.add((endpoint, sport))
                if endpoint == "fixtures":
                    self._bad_fixtures.discard(sport)
            if resync:
                self._resync_retry.pop(sport, None)
            if endpoint == "odds":
                # "nothing changed" is still an answer as of now: the normaliser hears it (an empty
                # delta, no cursor) so a market whose cutoff has passed is suspended before this
                # answer confirms the sport's markets (it would otherwise read fresh and OPEN); to a
                # snapshot call it says the sport offers nothing (an empty snapshot: its markets
                # are suspended, not_offered)
                await self.ingest_body(_PN_NOTHING_NEW % sport, res.recv_ms, channel, res.data_age_ms)
                if since is not None:
                    self.odds_confirmed(str(sport), res.asked_ms)
            return Delivered()
        got = await self.ingest_body(res.body, res.recv_ms, channel, res.data_age_ms)
        if endpoint == "settled":
            return got
        if image:
            if got.stale:
                self._stale_image_at[sport] = asked
            elif not got.rejected_messages:  # (events rejected alone: unconfirmed, and _repair re-images them)
                self._imaged.add((endpoint, sport))
                if endpoint == "fixtures":
                    self._bad_fixtures.discard(sport)
            elif endpoint == "fixtures":
                # rejected whole (a malformed body): nothing applied, the fixtures are still unknown, so
                # no odds call may follow (an odds snapshot would suspend every market of an unknown
                # event; a delta would confirm them). Asking it again at every poll would only hammer
                # Pinnacle's snapshot limit (and likely meet the same cached answer): it is asked again
                # PN_SNAPSHOT_CACHE_S later, the source DEGRADED meanwhile (the markets read stale)
                self._stale_image_at[sport] = asked
                if sport not in self._bad_fixtures:
                    logger.warning("%s: the fixtures snapshot of sport %d was rejected; its odds wait for one "
                                   "that applies (asked again in %gs)", self.name, sport, PN_SNAPSHOT_CACHE_S)
                self._bad_fixtures.add(sport)
        elif resync:
            tries = self._resync_retry.get(sport, (0.0, 0))[1] + 1
            if got.stale and tries < PN_RESYNC_TRIES:
                self._resync_retry[sport] = (asked, tries)
            else:
                if got.stale:
                    logger.warning("%s: %d resync snapshots of sport %d in a row were older than the cursor; "
                                   "resuming deltas without it", self.name, tries, sport)
                self._resync_retry.pop(sport, None)
        if got.in_play is not None:
            self._live[sport] = got.in_play
        if since is None and endpoint == "odds" and got.rejected_messages:
            # an odds snapshot rejected whole (a malformed body): nothing applied, so what it was to
            # image or repair is not; asked again at every poll it would hammer Pinnacle's snapshot
            # limit (and likely meet the same cached answer) — as a rejected fixtures snapshot: asked
            # again PN_SNAPSHOT_CACHE_S later, no delta meanwhile (it would confirm the markets it
            # was to repair: they read stale), the source DEGRADED (PN_BAD_ODDS)
            self._stale_image_at[sport] = asked
            if sport not in self._bad_odds:
                logger.warning("%s: the odds snapshot of sport %d was rejected; no odds delta before one "
                               "applies (asked again in %gs)", self.name, sport, PN_SNAPSHOT_CACHE_S)
            self._bad_odds.add(sport)
        elif since is None and endpoint == "odds":
            self._bad_odds.discard(sport)  # read (applied, or older than the cursor: the stale rules hold)
        rejected = bool(got.rejected_messages or got.rejected_parts)
        if got.lost or (rejected and endpoint == "odds"):
            # a rejected part may have carried changes the advanced cursor now skips (or markets
            # whose change is lost): the next poll of the sport is a snapshot that re-images them
            self._repair.add(sport)
        if endpoint == "odds":
            if got.stale:
                self.stale_answers += 1
                self._stale_streak[sport] = self._stale_streak.get(sport, 0) + 1
            else:
                self._stale_streak[sport] = 0
                if not rejected and since is not None:  # (a rejected part, or a snapshot: nothing)
                    self.odds_confirmed(str(sport), res.asked_ms)
        return got


#: What an empty (or 304) odds answer of a sport is delivered as: a delta (or, answering a snapshot
#: call, a snapshot) with no events and no ``last`` (the cursor stays), so the normaliser sees the
#: answer's receipt time.
_PN_NOTHING_NEW = b'{"sportId":%d,"leagues":[]}'

#: Seconds Pinnacle caches a snapshot answer (its FAQ: ``/odds`` and ``/fixtures`` snapshot calls are
#: cached 60 s; snapshot odds are delayed up to a minute), and its historic snapshot limit (one a
#: minute per sport): while a resumed sport waits for its odds image, or a resync for a snapshot
#: newer than the cursor, snapshots are asked at most this often, so the next one is newer than the
#: cursor the last one came back older than (no delta moved it meanwhile).
PN_SNAPSHOT_CACHE_S = PN_SNAPSHOT_CACHE_MS / 1000

#: The health reason (DEGRADED) while a sport's fixtures snapshot was rejected whole (a malformed body)
#: and none has applied since: its odds are not asked, its markets read stale; asked again
#: PN_SNAPSHOT_CACHE_S later (like ``bad_sports``: an unreadable ``/v2/sports`` reply).
PN_BAD_FIXTURES = "bad_fixtures"

#: The health reason (DEGRADED) while a sport's last odds snapshot (its image, a resync or a repair) was
#: rejected whole: no odds delta is asked (the sport's markets read stale), the snapshot is asked again
#: PN_SNAPSHOT_CACHE_S later — the rule of PN_BAD_FIXTURES.
PN_BAD_ODDS = "bad_odds"

#: Resync odds snapshots of a sport (``resync_s``, a repair, a cursor going backwards) asked at most
#: in a row while each comes back older than the cursor (deltas wait between them); then deltas
#: resume without it (the normaliser takes the third one anyway: ``OLD_SNAPSHOTS_TO_RESET``).
PN_RESYNC_TRIES = 3


class _PnSport(msgspec.Struct, kw_only=True):
    id: int
    hasOfferings: bool = True


class _PnSports(msgspec.Struct, kw_only=True):
    sports: list[_PnSport] = []


# --- The Odds API ------------------------------------------------------------------------


class _Sport(msgspec.Struct, kw_only=True):
    key: str
    active: bool = True
    has_outrights: bool = False


class TheOddsApiSource(PollerSource):
    """The Odds API v4 in snapshot-diff (or conditional) mode.

    sports: sport keys, ``["all"]`` (active sports from ``/sports``, cached)
    or ``["upcoming"]``. regions / markets / bookmakers: the query
    parameters. conditional: send ``If-None-Match`` (304 = unchanged).
    """

    kind = "theoddsapi"
    confirms_states_apart = True  # (its scores come from /scores, never from the odds polls)

    def __init__(self, name: str, http: ProviderHttp, options: PollerOptions, *, sports: list[str],
                 odds_format: Literal["decimal", "american"] = "decimal", regions: str = "eu",
                 markets: str = "h2h,spreads,totals", bookmakers: str | None = None, conditional: bool = False,
                 clock: Callable[[], float] = time.monotonic, stale_after_ms: int | None = None,
                 scores: bool = True, scores_linger_s: float = 600.0, scores_days_from: int = 1) -> None:
        super().__init__(name, http, options, clock=clock, stale_after_ms=stale_after_ms)
        #: poll /scores for the sport keys the normaliser asks for (events in play)
        self.scores = scores
        self.scores_linger_s = scores_linger_s
        self.scores_days_from = scores_days_from
        #: sport key -> monotonic time until which its scores are polled
        self._scores_until: dict[str, float] = {}
        self.scores_polls = 0
        #: scores key -> when (ms, :attr:`HttpResult.asked_ms`) its last successful scores poll was sent
        self._scores_ok_at: dict[str, int] = {}
        self.sports = sports
        self.odds_format = odds_format
        self.regions = regions
        self.markets = markets
        self.bookmakers = bookmakers
        self.conditional = conditional
        self.etags: dict[str, str] = {}
        self.not_modified = 0
        self._live: dict[str, bool] = {}  # sport key -> the last answer had events in play
        self._active: list[str] = []

    async def _sports(self) -> list[str]:
        async def load() -> list[str]:
            res = await self.http.get("/sports")
            try:
                sports = msgspec.json.decode(res.body, type=list[_Sport])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise UpstreamError(f"{self.name}: unreadable /sports reply: {exc}", "bad_sports",
                                    provider=self.http.provider, path="/sports", status=res.status) from None
            return [s.key for s in sports if s.active and not s.has_outrights]

        return await self.static.get("sports", load)

    def keys(self) -> list[str]:
        now = self._clock()
        scores = [f"scores:{k}" for k, until in self._scores_until.items() if until > now]
        return self.confirm_keys() + scores

    def confirm_keys(self) -> list[str]:
        if self.sports == ["all"]:
            return self._active or ["__sports__"]
        return self.sports

    def interval(self, key: str) -> float:
        if key.startswith("scores:"):
            return self.options.live_interval_s
        live = self._live.get(key, False)
        return self.options.live_interval_s if live else self.options.interval_s

    def _want_scores(self, requests: frozenset[str]) -> None:
        if not self.scores:
            return
        until = self._clock() + self.scores_linger_s
        for r in requests:
            if r.startswith("scores:") and r[7:]:
                self._scores_until[r[7:]] = until

    async def _poll_scores(self, sport_key: str) -> None:
        params: dict[str, Any] = {"dateFormat": "iso"}
        if self.scores_days_from:
            params["daysFrom"] = self.scores_days_from
        key = f"scores:{sport_key}"
        headers = {"If-None-Match": self.etags[key]} if self.conditional and key in self.etags else {}
        res = await self.http.get(f"/sports/{sport_key}/scores", params, headers=headers)
        self.scores_polls += 1
        if res.status == 304 or not res.body.strip():
            self.not_modified += res.status == 304
            self.scores_confirmed(key, res.asked_ms)
            return
        etag = res.headers.get("etag")
        if etag and self.conditional and etag.isascii():  # (httpx cannot send a non-ASCII one back)
            self.etags[key] = etag
        got = await self.ingest_body(res.body, res.recv_ms, key, res.data_age_ms)
        if got.rejected_messages or got.rejected_parts:
            self.etags.pop(key, None)
        else:  # a rejected answer (or a state rejected alone: it may be behind) confirms no score
            self.scores_confirmed(key, res.asked_ms)
        self._want_scores(got.requests)

    def scores_confirmed(self, key: str, asked_ms: int) -> None:
        """A scores poll of ``key`` (``scores:<sport key>``) succeeded for a request sent at
        ``asked_ms``: the source's event states are confirmed as of the *oldest* last successful
        scores poll over the scores keys polled now (as :meth:`odds_confirmed` does the markets);
        one sport's scores failing confirms none. An odds poll never confirms a score, so while no
        sport's scores are polled (nothing in play) the held states age from the last confirmation."""
        self._scores_ok_at[key] = asked_ms
        times = [self._scores_ok_at.get(k) for k in self.keys() if k.startswith("scores:")]
        if times and None not in times:
            confirm = getattr(self.sink, "confirm_states", None)  # (a sink without it: the pipeline's has)
            if confirm is not None:
                confirm(min(t for t in times if t is not None))

    async def poll(self, key: str) -> None:
        if key.startswith("scores:"):
            await self._poll_scores(key[7:])
            return
        if self.sports == ["all"]:
            self._active = await self._sports()
            if key == "__sports__" or key not in self._active:
                return
        params: dict[str, Any] = {"regions": self.regions, "markets": self.markets, "dateFormat": "iso",
                                  "oddsFormat": self.odds_format}
        if self.bookmakers:
            params["bookmakers"] = self.bookmakers
            del params["regions"]
        headers = {}
        if self.conditional and key in self.etags:
            headers["If-None-Match"] = self.etags[key]
        res = await self.http.get(f"/sports/{key}/odds", params, headers=headers)
        if res.status == 304 or not res.body.strip():
            self.not_modified += res.status == 304
            self.odds_confirmed(key, res.asked_ms)
            return
        etag = res.headers.get("etag")
        if etag and self.conditional and etag.isascii():  # (httpx cannot send a non-ASCII one back)
            self.etags[key] = etag
        got = await self.ingest_body(res.body, res.recv_ms, key, res.data_age_ms)
        self._want_scores(got.requests)
        # (a rejected market is re-imaged by the next snapshot: the normaliser forgot it)
        if got.in_play is not None:
            self._live[key] = got.in_play
        if got.rejected_messages or got.rejected_parts:
            self.etags.pop(key, None)  # a rejected body must be fetched whole next time
        if not got.rejected_messages:  # a rejected answer confirms nothing
            self.odds_confirmed(key, res.asked_ms)


# --- building from a --source spec -------------------------------------------------------

_HTTP_FIELDS = {f for f in HttpOptions.__dataclass_fields__}
_POLL_FIELDS = {f for f in PollerOptions.__dataclass_fields__}


def _typed(spec: SourceSpec, key: str, default: Any) -> Any:
    raw = spec.get(key)
    if raw is None:
        return default
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"source {spec.name}: {key} must be true or false, not {raw!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"source {spec.name}: {key} must be a whole number, not {raw!r}") from None
    if isinstance(default, float):
        return spec.get_float(key, default)
    return raw


def _split(value: str) -> list[str]:
    return [v for v in value.replace(";", "+").split("+") if v]


def build_http(spec: SourceSpec, *, base_url: str, provider: str, defaults: HttpOptions | None = None,
               api_key_query: str | None = None, transport: httpx.AsyncBaseTransport | None = None) -> ProviderHttp:
    """A :class:`ProviderHttp` from a spec's options (see :func:`pinnacle_from_spec`)."""
    d = defaults or HttpOptions()
    opts = HttpOptions(**{f: _typed(spec, f, getattr(d, f)) for f in _HTTP_FIELDS})
    api_key = None
    if spec.get("api_key"):
        where = spec.get("api_key_in", "query" if api_key_query else "header")
        if where == "query":
            api_key = ApiKeyAuth(Secret(spec.get("api_key") or ""), query_param=spec.get("api_key_param", api_key_query or "apiKey"))
        else:
            api_key = ApiKeyAuth(Secret(spec.get("api_key") or ""), header=spec.get("api_key_header", "X-API-Key"))
    basic = None
    if spec.get("user") is not None:
        basic = BasicAuth(spec.get("user") or "", Secret(spec.get("password") or ""))
    token = None
    if spec.get("client_id") is not None:
        token = TokenAuth(spec.get("token_url", _token_url(base_url)) or "", spec.get("client_id") or "",
                          Secret(spec.get("client_secret") or ""),
                          refresh_margin_s=spec.get_float("token_refresh_margin_s", 30.0))
    signer = None
    if spec.get("hmac_secret") is not None:
        signer = HmacSigner(spec.get("hmac_key_id", "oddsfeed") or "oddsfeed", Secret(spec.get("hmac_secret") or ""))
    return ProviderHttp(base_url, provider=provider, options=opts, api_key=api_key, basic=basic, token=token,
                        signer=signer, transport=transport)


def _token_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}/v1/token"



def _odds_format(spec: SourceSpec) -> Literal["decimal", "american"]:
    """The ``odds_format=`` option of an HTTP poller (default decimal). Raises ConfigError."""
    value = spec.get("odds_format", "decimal")
    if value == "decimal":
        return "decimal"
    if value == "american":
        return "american"
    raise ConfigError(f"source {spec.name}: odds_format must be decimal or american")

def _poller_options(spec: SourceSpec, defaults: PollerOptions) -> PollerOptions:
    return PollerOptions(**{f: _typed(spec, f, getattr(defaults, f)) for f in _POLL_FIELDS})


def _stale_after_ms(settings: Settings, opts: PollerOptions, http: HttpOptions) -> int:
    cadence = max(opts.live_interval_s, opts.min_interval_s)
    return max(settings.stale_in_play_ms, int((2.5 * cadence + http.deadline_s) * 1000))


def pinnacle_from_spec(spec: SourceSpec, settings: Settings) -> PinnacleSource:
    """The registry's source factory for ``pinnacle``: a Pinnacle-style Lines API.

    Spec options: ``sports=29+4`` (sportIds, default 29; ``all`` = every sport
    ``/v2/sports`` lists with offerings), ``odds_format=
    decimal|american``, credentials (``user``/``password`` → Basic,
    ``api_key`` → ``X-API-Key`` header, ``client_id``/``client_secret``/
    ``token_url`` → tokens, ``hmac_key_id``/``hmac_secret`` → signing),
    cadence (``interval_s`` 60, ``live_interval_s`` 5, ``min_interval_s`` 5 —
    the historic delta limit —, ``fixtures_interval_s`` 60, ``resync_s`` 3600) and every :class:`HttpOptions` /
    :class:`PollerOptions` field by name (``deadline_s=2``, ``rate_per_s=1`` …).
    """
    odds_format = _odds_format(spec)
    sports_text = spec.get("sports", "29") or "29"
    try:
        sports = None if sports_text == "all" else [int(s) for s in _split(sports_text)]
    except ValueError:
        raise ConfigError(f"source {spec.name}: sports must be sportIds like 29+4, or all") from None
    http = build_http(spec, base_url=spec.url, provider=spec.name, defaults=HttpOptions(rate_per_s=2.0, burst=4))
    opts = _poller_options(spec, PollerOptions(interval_s=60.0, live_interval_s=5.0, min_interval_s=5.0))
    settled = _typed(spec, "settled", True)
    return PinnacleSource(spec.name, http, opts, sports=sports, odds_format=odds_format,
                          fixtures_interval_s=spec.get_float("fixtures_interval_s", 60.0),
                          resync_s=spec.get_float("resync_s", 3600.0),
                          stale_after_ms=_stale_after_ms(settings, opts, http.options),
                          settled_interval_s=spec.get_float("settled_interval_s", 60.0) if settled else None)


def theoddsapi_from_spec(spec: SourceSpec, settings: Settings) -> TheOddsApiSource:
    """The registry's source factory for ``theoddsapi``: The Odds API v4 (or the simulator's copy of it).

    Spec options: ``sport=soccer_epl+basketball_nba`` (or ``all``, or
    ``upcoming``, the default), ``regions=eu``, ``markets=h2h+spreads+totals``,
    ``bookmakers=``, ``odds_format=decimal|american``, ``mode=snapshot|
    conditional``, ``api_key`` (query ``apiKey`` by default; ``api_key_in=
    header``), token / HMAC options as for Pinnacle, ``interval_s`` 60,
    ``live_interval_s`` 40 (the provider's refresh of featured markets: polling
    faster wastes quota), ``min_interval_s`` 20 (the fastest refresh, exchanges
    in play; ``0`` for a local simulator), ``quota_low_water``, ``quota_reserve`` and the other
    :class:`HttpOptions` / :class:`PollerOptions` fields.
    """
    odds_format = _odds_format(spec)
    mode = spec.get("mode", "snapshot")
    if mode not in ("snapshot", "conditional"):
        raise ConfigError(f"source {spec.name}: mode must be snapshot or conditional")
    base = spec.url.rstrip("/")
    if not urlsplit(base).path.endswith("/v4"):
        base += "/v4"
    http = build_http(spec, base_url=base, provider=spec.name, api_key_query="apiKey",
                      defaults=HttpOptions(rate_per_s=5.0, burst=5))
    opts = _poller_options(spec, PollerOptions(interval_s=60.0, live_interval_s=40.0, min_interval_s=20.0))
    sports = _split(spec.get("sport", spec.get("sports", "upcoming")) or "upcoming")
    scores = spec.get("scores", "live") or "live"
    if scores not in ("live", "off"):
        raise ConfigError(f"source {spec.name}: scores must be live or off, not {scores!r}")
    return TheOddsApiSource(spec.name, http, opts, sports=sports, odds_format=odds_format,
                            regions=spec.get("regions", "eu") or "eu",
                            markets=",".join(_split(spec.get("markets", "h2h+spreads+totals") or "h2h")),
                            bookmakers=",".join(_split(spec.get("bookmakers", "") or "")) or None,
                            conditional=mode == "conditional",
                            stale_after_ms=_stale_after_ms(settings, opts, http.options),
                            scores=scores == "live", scores_linger_s=spec.get_float("scores_linger_s", 600.0),
                            scores_days_from=_typed(spec, "scores_days_from", 1))
