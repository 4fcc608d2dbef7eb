"""Typed, frozen settings with units in the names; read once.

Precedence: command-line flag > environment variable ``ODDSFEED_<FIELD>``
(upper case) > default. Every field documents its default and unit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from feed.errors import ConfigError


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings shared by ``oddsfeed run | ingest | serve | simulate``."""

    redis_url: str | None = None
    """Redis/Valkey URL; None = start the embedded redis-server."""
    redis_cluster: bool = False
    """Treat ``redis_url`` as a Redis Cluster seed node."""
    data_dir: str = "./var"
    """Embedded Redis data directory (socket, append-only file)."""
    partitions: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Delta-log partitions P (fixed for the life of the data), at least 1."""
    log_maxlen: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    """Approximate log entries kept per partition (XADD MAXLEN ~), at least 1."""
    ladder_depth: int = 10
    """Price levels kept per side in canonical ladders."""
    host: str = "127.0.0.1"
    """API bind address."""
    port: int = 8000
    """API port."""
    heartbeat_ms: int = 5000
    """Stream heartbeat interval to clients (SSE/WS), ms."""
    stale_in_play_ms: int = 10_000
    """An in-play market is stale when not confirmed for this long, ms."""
    stale_pre_match_ms: int = 60_000
    """A pre-match market is stale when not confirmed for this long, ms."""
    outbox_max_bytes: int = 1 << 20
    """Byte budget per client connection before conflation/snapshot/close."""
    ingest_batch_max: int = 2000
    """Most provider messages per batched store apply."""
    api_keys: tuple[str, ...] = ()
    """API keys accepted on /v1 (empty = no auth)."""
    allowed_origins: tuple[str, ...] = ()
    """WebSocket Origin allow-list (empty = any; a request without Origin, i.e. not a browser, passes)."""
    stale_after_ms_by_sport: tuple[str, ...] = ()
    """Per-sport staleness ages overriding stale_*_ms: "soccer=8000", "tennis:in_play=5000",
    "horse_racing:pre_match=120000" (comma-separated in the environment), ms."""
    jwt_secrets: tuple[str, ...] = ()
    """HS256 secrets accepted for JWTs on /v1 (empty = no JWT; several = key rotation)."""
    tenants_file: str | None = None
    """TOML file of tenants: each one's API keys and JWT subjects, scopes, the sports / sources /
    bookmakers it may see and its limits (:mod:`streaming.tenants`); re-read within a second of a
    change (None = every accepted credential may do and see everything, without limits)."""
    jwt_audience: str | None = None
    """Required JWT ``aud`` (None = not checked)."""
    jwt_issuer: str | None = None
    """Required JWT ``iss`` (None = not checked)."""
    max_connections_per_ip: int = 1000
    """Open TCP connections allowed per client IP (0 = no cap); more get 429 and are closed."""
    request_header_timeout_ms: int = 10_000
    """A request's headers must arrive whole within this long (slowloris guard; 0 = off), ms."""
    price_check_max_age_in_play_ms: int = 5_000
    """Default max_age_ms of a price check on an in-play market, ms."""
    price_check_max_age_pre_match_ms: int = 30_000
    """Default max_age_ms of a price check on a pre-match market, ms."""
    price_check_deadline_ms: int = 250
    """A price-check request body must arrive within this long, ms."""
    price_check_fast_path: bool = True
    """Answer plain price checks in the HTTP protocol layer, without the ASGI stack
    (``streaming.fastpath``; same answers, less CPU); false sends them through ASGI."""
    max_future_skew_ms: int = 10_000
    """A provider time more than this far ahead of receipt is quarantined as ``clock_skew``, ms."""
    max_stream_lag_ms: int = 500
    """A streamed message received more than this long after its provider time (a backlog
    after a stall) counts as received at its provider time plus this, ms: its prices and the
    confirmation it brings are that old, not as fresh as their arrival (0 = off). So a stream's
    ``age_ms`` claims are exact to within this bound."""
    health_lease_ms: int = 5_000
    """A source's health record is good for this long after its ingest last renewed it
    (about once a second); then every node reads the source as DOWN (``ingest_gone``), ms."""
    settled_retention_ms: int = 3_600_000
    """A market closed, settled or cancelled is dropped this long after its last change: from the
    ingest's book and the store (by its ingest), from every API node's snapshots, lists and
    counts (0 = kept forever), ms. A later image of it starts again, its seq continuing."""
    ingest_backlog_max: int = 50_000
    """Deltas an ingest keeps while Redis is unreachable before it compacts them to one
    image per market (memory bound during a store outage)."""
    record_dir: str | None = None
    """Record what every source receives under this directory (``--record``;
    :mod:`feed.recorder`); None = no recording."""
    mappings: str | None = None
    """Event-link overrides (``mappings.yaml``: pin / forbid / aliases, see
    :class:`feed.matching.Overrides`), reloaded when the file changes; None = none."""
    match_tolerance_ms: int = 90 * 60_000
    """Largest gap between two providers' start times of one team event, ms."""
    fair_method: str = "multiplicative"
    """How the fair price removes the margin: ``multiplicative`` or ``power``
    (see :mod:`streaming.aggregate`)."""
    log_push: bool = True
    """The ingest PUBLISHes each delta-log entry beside its XADD and API nodes take new entries
    from these pushes (each applied only when it directly follows the node's position; the log
    is read after any gap) instead of a blocking XREAD per entry; off = neither (XREAD alone).
    Not on Redis Cluster."""
    history_retention_ms: int = 24 * 3_600_000
    """Price history (:mod:`feed.history`): every applied change of a selection's best back/lay
    and last traded price is kept this long per market in Redis (``of:{p}:h:<market>``), served
    by ``/v1/markets/{id}/history`` and ``/v1/price-at`` (0 = off), ms."""




_TUPLE_FIELDS = {"api_keys", "allowed_origins", "stale_after_ms_by_sport", "jwt_secrets"}


def from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``ODDSFEED_*`` environment variables plus ``overrides``
    (None values in overrides are ignored). Raises ConfigError."""
    if env is None:
        env = os.environ
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(Settings):
        raw = env.get(f"ODDSFEED_{field.name.upper()}")
        if raw is None:
            continue
        values[field.name] = tuple(x.strip() for x in raw.split(",") if x.strip()) if field.name in _TUPLE_FIELDS else raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from None
