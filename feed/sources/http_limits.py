"""Limits and errors of HTTP pollers: what to send when, and what a reply means.

- :class:`TokenBucket` — a client-side rate limit (``rate_per_s``,
  ``burst``): a request takes a token or waits for one;
- :func:`parse_retry_after` — ``Retry-After`` as delta-seconds or an
  HTTP-date;
- :class:`QuotaGovernor` — reads ``x-requests-remaining`` / ``-used`` /
  ``-last`` (The Odds API) and stretches the poll interval as the quota runs
  low, stopping before it is exhausted;
- :class:`CircuitBreaker` — open after ``failure_threshold`` consecutive
  failures, one half-open probe after ``reset_timeout_s``;
- :func:`classify_response` — HTTP status + provider error code in the JSON
  body → a typed error (retryable or fatal), so a caller handles *kinds*.

Error tree (extends :mod:`feed.errors`)::

    RetryableSourceError
     ├── UpstreamError          5xx, unexpected statuses; ``status``, ``body``
     ├── TransportFailure       connect / read / deadline / reset / body too large
     ├── RateLimitedError       429, TOO_MANY_REQUESTS, EXCEEDED_FREQ_LIMIT; ``retry_after_s``
     ├── QuotaExhaustedError    OUT_OF_USAGE_CREDITS, or the local quota guard; ``retry_after_s``
     └── CircuitOpenError       the breaker refuses; ``retry_in_s``
    FatalSourceError
     ├── SourceAuthError        INVALID_KEY, MISSING_KEY, DEACTIVATED_KEY, 401/403 after a refresh
     │                          (also a feed.errors.AuthError, re-exported here)
     └── RequestRejectedError   the request itself is wrong (INVALID_MARKET, unknown sport, 4xx)

Every error carries ``provider``, ``code`` (the provider's error code, or
``http_<status>``) and ``path`` (never the query string: it may hold a key).
Messages are lowercase facts without a final period.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from feed.errors import AuthError, FatalSourceError, RetryableSourceError, SourceError

__all__ = [
    "AuthError",
    "CircuitBreaker",
    "CircuitOpenError",
    "QuotaExhaustedError",
    "QuotaGovernor",
    "RateLimitedError",
    "RequestRejectedError",
    "SourceAuthError",
    "TokenBucket",
    "TransportFailure",
    "UpstreamError",
    "classify_response",
    "parse_retry_after",
]

BODY_LOG_MAX = 2000

#: provider error codes that mean "slow down" (retry after a while)
RATE_LIMIT_CODES = frozenset({"TOO_MANY_REQUESTS", "EXCEEDED_FREQ_LIMIT", "RATE_LIMITED"})
#: codes that mean the account's quota is spent
QUOTA_CODES = frozenset({"OUT_OF_USAGE_CREDITS"})
#: codes about credentials (a token source refreshes once before giving up)
AUTH_CODES = frozenset({"MISSING_KEY", "INVALID_KEY", "DEACTIVATED_KEY", "INVALID_CREDENTIALS", "UNAUTHORIZED",
                        "INVALID_TOKEN", "TOKEN_EXPIRED", "INVALID_SIGNATURE", "FORBIDDEN"})
#: codes that say the request is wrong (retrying the same request cannot help)
REJECTED_CODES = frozenset({
    "MISSING_REGION", "INVALID_REGION", "INVALID_BOOKMAKERS", "INVALID_MARKET", "INVALID_MARKET_COMBO",
    "INVALID_EVENT_ID", "INVALID_EVENT_IDS", "EVENT_NOT_FOUND", "HISTORICAL_UNAVAILABLE_ON_FREE_USAGE_PLAN",
    "INVALID_COMMENCE_TIME_FROM", "INVALID_COMMENCE_TIME_TO", "INVALID_COMMENCE_TIME_RANGE",
    "INVALID_ODDS_FORMAT", "INVALID_DATE_FORMAT", "UNKNOWN_SPORT", "INVALID_SPORT", "INVALID_REQUEST",
})


class _HttpErrorMixin:
    provider: str
    path: str
    status: int | None
    body: bytes

    def _init(self, provider: str, path: str, status: int | None, body: bytes) -> None:
        self.provider = provider
        self.path = path
        self.status = status
        self.body = body[:BODY_LOG_MAX]


class UpstreamError(_HttpErrorMixin, RetryableSourceError):
    """A server-side failure (5xx) or an unexpected status; worth a retry."""

    def __init__(self, message: str, code: str | None = None, *, provider: str = "", path: str = "",
                 status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message, code)
        self._init(provider, path, status, body)


class TransportFailure(_HttpErrorMixin, RetryableSourceError):
    """The request did not complete: connect error, reset, read timeout,
    whole-request deadline, oversized body. ``code``: ``timeout``,
    ``deadline``, ``connect``, ``reset``, ``body_too_large``, …"""

    def __init__(self, message: str, code: str | None = None, *, provider: str = "", path: str = "") -> None:
        super().__init__(message, code)
        self._init(provider, path, None, b"")


class RateLimitedError(_HttpErrorMixin, RetryableSourceError):
    """The provider asked us to slow down; no request before ``retry_after_s``."""

    def __init__(self, message: str, code: str | None = None, *, retry_after_s: float, provider: str = "",
                 path: str = "", status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s
        self._init(provider, path, status, body)


class QuotaExhaustedError(_HttpErrorMixin, RetryableSourceError):
    """The request quota is spent (or about to be): wait ``retry_after_s``."""

    def __init__(self, message: str, code: str | None = None, *, retry_after_s: float, provider: str = "",
                 path: str = "", status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s
        self._init(provider, path, status, body)


class CircuitOpenError(RetryableSourceError):
    """The circuit breaker is open: no request for ``retry_in_s`` seconds."""

    def __init__(self, message: str, *, retry_in_s: float) -> None:
        super().__init__(message, "circuit_open")
        self.retry_in_s = retry_in_s


class SourceAuthError(_HttpErrorMixin, FatalSourceError, AuthError):
    """Credentials refused (after one token refresh where tokens are used)."""

    def __init__(self, message: str, code: str | None = None, *, provider: str = "", path: str = "",
                 status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message, code)
        self._init(provider, path, status, body)


class RequestRejectedError(_HttpErrorMixin, FatalSourceError):
    """The provider refused the request itself (bad market, region, sport …)."""

    def __init__(self, message: str, code: str | None = None, *, provider: str = "", path: str = "",
                 status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message, code)
        self._init(provider, path, status, body)


# --- Retry-After ---------------------------------------------------------------


#: an ``Age`` above this (s) is taken as this: a day-old answer confirms nothing a poller could use anyway
MAX_AGE_S = 86_400


def cache_age_ms(headers: Mapping[str, str]) -> int:
    """How old an answer a cache served is, ms, by its ``Age`` header (RFC 9111 §5.1: whole
    seconds since the origin made or validated it): ``(Age + 1) × 1000`` — the age is truncated
    to the second, so the answer may be up to a second older — capped at :data:`MAX_AGE_S`; 0
    without an ``Age`` (the origin answered this request).

    The value is read whole, never cut: surrounding spaces stripped, leading zeros allowed
    (``0000000100`` is 100 s); a member of more than 6 significant digits is taken as
    :data:`MAX_AGE_S` (no ``int()`` of a huge string). A list (``5, 100``, or several ``Age``
    fields joined) uses its *largest* valid member: the oldest the answer may be, the
    conservative reading. A member that is not a non-negative ASCII integer (``-1``, ``+5``,
    ``1e3``, empty) is ignored; when no member is valid the result is 0, as without the header:
    no age can be read from it, so the answer is taken as the origin's — the same known limit
    as a cache in front that sends no ``Age`` at all."""
    raw = headers.get("age")
    if raw is None:
        return 0
    age_s: int | None = None
    for member in raw.split(","):
        value = member.strip(" \t")
        if not value.isascii() or not value.isdigit():
            continue  # not a non-negative integer: nothing to read
        digits = value.lstrip("0")
        secs = MAX_AGE_S if len(digits) > 6 else min(int(digits or "0"), MAX_AGE_S)
        age_s = secs if age_s is None else max(age_s, secs)
    return 0 if age_s is None else (age_s + 1) * 1000


def parse_retry_after(value: str | None, *, now_s: float | None = None, default_s: float | None = None,
                      max_s: float = 3600.0) -> float | None:
    """``Retry-After`` in seconds (>= 0, capped at ``max_s``): delta-seconds
    (``"2"``, tolerated ``"1.5"``) or an HTTP-date; ``default_s`` when
    absent or unreadable."""
    if value is None:
        return default_s
    text = value.strip()
    try:
        secs = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return default_s
        if when is None:
            return default_s
        secs = when.timestamp() - (time.time() if now_s is None else now_s)
    if not math.isfinite(secs):
        return default_s
    return min(max(secs, 0.0), max_s)


# --- token bucket --------------------------------------------------------------


class TokenBucket:
    """``rate_per_s`` tokens per second, at most ``burst`` saved up.

    ``await acquire()`` takes one token, sleeping until one is available;
    concurrent callers are served in order. ``clock``: monotonic seconds.
    """

    def __init__(self, rate_per_s: float, burst: float = 1.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("token bucket needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now

    def wait_s(self) -> float:
        """Seconds until a token is available (0 if one is)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate_per_s

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                wait = self.wait_s()
                if wait <= 0:
                    self._tokens -= 1
                    return
                await asyncio.sleep(wait)


# --- quota ---------------------------------------------------------------------


class QuotaGovernor:
    """Slows a poller before its request quota runs out (The Odds API headers).

    ``observe(headers)`` reads ``x-requests-remaining``, ``x-requests-used``
    and ``x-requests-last`` (the cost of the last call). Then:

    - ``remaining > low_water``: ``interval_factor()`` is 1;
    - below ``low_water`` the factor grows as ``low_water / remaining``
      (capped at ``max_factor``): the poll interval stretches so the quota
      lasts longer;
    - when another call could leave fewer than ``reserve`` requests
      (``remaining - last < reserve``), :meth:`blocked` is True: the poller
      stops and retries after ``pause_s`` (the quota may have been reset).
    """

    def __init__(self, *, low_water: int = 100, reserve: int = 1, max_factor: float = 60.0,
                 pause_s: float = 900.0) -> None:
        self.low_water = low_water
        self.reserve = reserve
        self.max_factor = max_factor
        self.pause_s = pause_s
        self.remaining: float | None = None
        self.used: float | None = None
        self.last_cost: float | None = None

    def observe(self, headers: Mapping[str, str]) -> None:
        def num(name: str) -> float | None:
            v = headers.get(name)
            if v is None:
                return None
            try:
                x = float(v)
            except ValueError:
                return None
            return x if math.isfinite(x) else None

        remaining = num("x-requests-remaining")
        if remaining is not None:
            self.remaining = remaining
        used = num("x-requests-used")
        if used is not None:
            self.used = used
        last = num("x-requests-last")
        if last is not None:
            self.last_cost = last

    @property
    def low(self) -> bool:
        return self.remaining is not None and self.remaining <= self.low_water

    def blocked(self) -> bool:
        if self.remaining is None:
            return False
        cost = self.last_cost if self.last_cost is not None else 1.0
        return self.remaining - cost < self.reserve

    def interval_factor(self) -> float:
        if self.remaining is None or self.remaining > self.low_water:
            return 1.0
        return min(self.max_factor, self.low_water / max(self.remaining, 1.0))


# --- circuit breaker -------------------------------------------------------------


class CircuitBreaker:
    """Closed → open after ``failure_threshold`` consecutive failures → after
    ``reset_timeout_s`` one half-open probe: success closes, failure re-opens.

    ``before_request()`` raises :class:`CircuitOpenError` while open (and
    while the probe is out); ``record_success()`` / ``record_failure()``
    report outcomes. ``state``: ``closed`` / ``open`` / ``half_open``.
    """

    def __init__(self, failure_threshold: int = 5, reset_timeout_s: float = 30.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or reset_timeout_s <= 0:
            raise ValueError("circuit breaker needs failure_threshold >= 1 and reset_timeout_s > 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.opens = 0

    def before_request(self) -> None:
        if self.state == "closed":
            return
        now = self._clock()
        if self.state == "open":
            left = self.opened_at + self.reset_timeout_s - now
            if left > 0:
                raise CircuitOpenError(f"circuit open for another {left:.2f}s", retry_in_s=left)
            self.state = "half_open"  # this caller is the probe
            return
        raise CircuitOpenError("circuit half-open: a probe request is in flight", retry_in_s=self.reset_timeout_s / 4)

    def record_success(self) -> None:
        self.state = "closed"
        self.failures = 0

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.failure_threshold:
            if self.state != "open":
                self.opens += 1
            self.state = "open"
            self.opened_at = self._clock()

    def release_probe(self) -> None:
        """The half-open probe ended without a verdict (e.g. rate limited):
        let the next request probe again."""
        if self.state == "half_open":
            self.state = "open"
            self.opened_at = self._clock() - self.reset_timeout_s


# --- classification ------------------------------------------------------------


class _ErrorBody(msgspec.Struct, kw_only=True):
    code: str | None = None
    error_code: str | None = None
    message: str | None = None


def error_code_of(body: bytes) -> tuple[str | None, str | None]:
    """(code, message) from a JSON error object (Pinnacle ``code``, The Odds
    API ``error_code``); (None, None) for anything else."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None, None
    try:
        err = msgspec.json.decode(body, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError, ValueError):
        return None, None
    code = err.error_code or err.code
    return (code.strip().upper() if isinstance(code, str) and code.strip() else None), err.message


def classify_response(provider: str, path: str, status: int, headers: Mapping[str, str], body: bytes, *,
                      default_retry_after_s: float = 2.0, quota_retry_s: float = 900.0) -> SourceError | None:
    """The typed error a reply stands for, or None when it is a success.

    A 2xx whose body is a JSON error object (``{"code": …}`` or
    ``{"error_code": …}``) counts as that error. 304 is a success.
    """
    # error objects are small: a large 2xx body is data, not worth a second decode
    look = status >= 400 or (body[:1] == b"{" and len(body) <= 4096)
    code, message = error_code_of(body) if look else (None, None)
    if status < 400 and code is None:
        return None
    text = (message or "").strip()[:200]
    kw: dict[str, Any] = {"provider": provider, "path": path, "status": status, "body": body}
    where = f"{provider} {path}"
    if status == 429 or code in RATE_LIMIT_CODES:
        ra = parse_retry_after(headers.get("retry-after"), default_s=default_retry_after_s)
        assert ra is not None
        return RateLimitedError(f"{where} rate limited ({status}){': ' + text if text else ''}",
                                code or "http_429", retry_after_s=ra, **kw)
    if code in QUOTA_CODES:
        ra = parse_retry_after(headers.get("retry-after"), default_s=quota_retry_s, max_s=86400.0)
        assert ra is not None
        return QuotaExhaustedError(f"{where} usage quota exhausted", code, retry_after_s=ra, **kw)
    if code in AUTH_CODES or status in (401, 403):
        return SourceAuthError(f"{where} refused the credentials ({status})", code or f"http_{status}", **kw)
    if code in REJECTED_CODES:
        return RequestRejectedError(f"{where} rejected the request ({status}){': ' + text if text else ''}", code, **kw)
    if status >= 500 or status in (408, 425):
        return UpstreamError(f"{where} answered {status}", code or f"http_{status}", **kw)
    if 400 <= status < 500:
        return RequestRejectedError(f"{where} rejected the request ({status}){': ' + text if text else ''}",
                                    code or f"http_{status}", **kw)
    return UpstreamError(f"{where} answered {status} with error {code}", code, **kw)
