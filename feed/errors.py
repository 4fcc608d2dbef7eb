"""One exception tree for oddsfeed.

::

    OddsfeedError
     ├── FeedDecodeError          provider bytes rejected (bad JSON, wrong types, invalid price …)
     ├── SequenceError            a change that cannot be applied in order
     ├── StoreError               Redis unreachable, script failure
     │    └── EmbeddedRedisError  the embedded redis-server could not start
     ├── SourceError              an upstream source failed
     │    ├── RetryableSourceError
     │    └── FatalSourceError    never retried (bad credentials, bad subscription)
     └── ConfigError              bad settings or command-line values

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
    message is rejected).
    """

    def __init__(self, reason: str, detail: str = "", raw: bytes = b"", *, market_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.raw = raw
        self.market_id = market_id
        super().__init__(reason, detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class SequenceError(OddsfeedError):
    """A change arrived that cannot be applied (delta before image, gap)."""


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
