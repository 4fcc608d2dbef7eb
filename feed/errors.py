"""One exception tree for oddsfeed.

Every error oddsfeed raises on purpose derives from :class:`OddsfeedError`,
so ``except OddsfeedError`` catches all of them. The bases are defined here;
a leaf that carries module-specific context is defined beside the code that
raises it (its module in brackets). ``tests/test_errors.py`` checks that every
public exception class of ``feed`` and ``streaming`` is drawn here and derives
from :class:`OddsfeedError`::

    OddsfeedError
     ├── ConfigError                    bad settings or command-line values
     │    └── UsageError                a command-line problem                      [feed.cli]
     ├── FeedDecodeError                provider bytes rejected (bad JSON, types, price …)
     ├── PriceError *                   a price not valid in its format             [feed.odds]
     ├── StoreError                     Redis unreachable, script failure
     │    ├── EmbeddedRedisError        the embedded redis-server could not start
     │    ├── EpochChanged              Redis lost the writer's epoch: re-send images  [feed.store]
     │    └── SeqBelowFloor             a market would restart at or below its seq floor [feed.store]
     ├── SourceError                    an upstream source failed; ``code`` = provider's code
     │    ├── RetryableSourceError      worth a reconnect / retry with backoff
     │    │    ├── UpstreamError        HTTP 5xx or an unexpected status            [feed.sources.http_limits]
     │    │    ├── TransportFailure     connect / read / deadline / reset / too big [feed.sources.http_limits]
     │    │    ├── RateLimitedError     429, rate-limit codes; ``retry_after_s``    [feed.sources.http_limits]
     │    │    ├── QuotaExhaustedError  quota spent; ``retry_after_s``              [feed.sources.http_limits]
     │    │    ├── CircuitOpenError     the circuit breaker refuses; ``retry_in_s`` [feed.sources.http_limits]
     │    │    ├── SSEError *           an event stream breaks the SSE format       [feed.sources.sse]
     │    │    ├── BetfairApiError      a Betfair SSO / Betting API call failed     [feed.sources.betfair_api]
     │    │    └── EsaFramingError      ESA bytes that cannot be split into lines   [feed.sources.esa_protocol]
     │    ├── FatalSourceError          never retried (bad credentials, bad subscription)
     │    │    ├── SourceAuthError †    a provider refused our credentials          [feed.sources.http_limits]
     │    │    └── RequestRejectedError the request itself is wrong (market, sport) [feed.sources.http_limits]
     │    └── EsaError                  the Betfair ESA server answered FAILURE     [feed.sources.esa_protocol]
     │         └── EsaFatalError ‡      … with a code no retry can fix              [feed.sources.esa_protocol]
     ├── AuthError                      a credential was refused: an API client's key or JWT
     │    │                             (raised by streaming.auth) or, as SourceAuthError, ours
     │    └── ForbiddenError            a valid credential asked for what its tenant may not
     │                                  do or see (HTTP 403)                         [streaming.tenants]
     ├── LimitError                     a tenant limit was reached (HTTP 429); ``retry_after_s``  [streaming.tenants]
     ├── FilterError *                  a stream / REST query value the client must fix  [streaming.state]
     ├── StreamError                    the API refused an OddsClient stream        [streaming.client]
     └── PriceCheckError                a price check the API did not answer        [streaming.client]

    *  also a ValueError (callers that catch ValueError keep working)
    †  also an AuthError: ``except AuthError`` catches every refused credential
    ‡  also a FatalSourceError

Not in the tree, on purpose:

- private control-flow signals that never leave their module (``_LinkLost``,
  ``_HeartbeatMissed``, ``_ReconnectNow``, ``_CallbackFailed``, ``_Rejected``,
  ``_BodyError``, ``_Dropped``, ``_SeqGap``, ``_HeadRefused``);
- programming errors — a constructor given an impossible argument
  (``Backoff(initial_s=0)``, ``ReplaySource(speed=-1)`` …) raises the builtin
  ``ValueError``/``TypeError``, as the standard library does.

Messages are lowercase facts without a final period; context lives in
attributes and ``__str__`` derives from them.
"""

from __future__ import annotations


class OddsfeedError(Exception):
    """Base class of every error raised by oddsfeed."""


class FeedDecodeError(OddsfeedError):
    """A provider message was rejected.

    Attributes: ``reason`` (a short machine-friendly code such as
    ``invalid_json``, ``invalid_schema``, ``invalid_price``,
    ``unknown_market``, ``clock_skew``), ``detail`` (human text), ``raw``
    (the offending bytes, possibly truncated by the caller before
    logging/quarantine), ``market_id`` (the canonical id of the one market
    rejected when the rest of the message applies; None when the whole
    message is rejected), ``event_id`` (the provider event id of the one
    event state rejected — see :class:`feed.models.EventState` — when the
    rest of the message applies).
    """

    def __init__(self, reason: str, detail: str = "", raw: bytes = b"", *, market_id: str | None = None,
                 event_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.raw = raw
        self.market_id = market_id
        self.event_id = event_id
        super().__init__(reason, detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class StoreError(OddsfeedError):
    """Redis could not be reached or refused a write."""


class EmbeddedRedisError(StoreError):
    """The embedded redis-server could not be started."""


class SourceError(OddsfeedError):
    """An upstream source failed. ``code`` is the provider's error code."""

    def __init__(self, message: str, code: str | None = None) -> None:
        self.code = code
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message}: {self.code}" if self.code else self.message


class RetryableSourceError(SourceError):
    """A source failure worth a reconnect with backoff."""


class FatalSourceError(SourceError):
    """A source failure that a retry cannot fix (credentials, subscription)."""


class ConfigError(OddsfeedError):
    """A setting or command-line value is invalid."""


class AuthError(OddsfeedError):
    """A credential was refused; ``str()`` says why and never contains the
    credential. :mod:`streaming.auth` raises it for API clients;
    :class:`feed.sources.http_limits.SourceAuthError` (also a
    :class:`FatalSourceError`) when a provider refuses ours."""
