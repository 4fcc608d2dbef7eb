"""The source kinds oddsfeed can ingest: one registry entry each.

An entry names the kind (``--source KIND=…``), its protocol, what it does,
the options it accepts (anything else is an error naming the valid ones),
the options it needs, and the coroutine that runs one source of that kind
(imported lazily, so a kind's dependencies load only when it is used). The
``--source`` parser (:mod:`feed.sources.spec`), the dispatcher
(:func:`feed.supervisor.run_source`), the CLI help and the README's table of
kinds all read this one list.

A runner is ``async def run(store, settings, spec) -> None``: it ingests
until cancelled and raises on fatal errors (see :mod:`feed.supervisor`).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec
    from feed.store import Store

Runner = Callable[["Store", "Settings", "SourceSpec"], Awaitable[None]]

#: options every kind takes
COMMON_OPTIONS: frozenset[str] = frozenset({"name"})

#: HTTP client and polling-loop options shared by the pollers (the fields of
#: ``feed.sources.poller.HttpOptions`` / ``PollerOptions``; kept equal by a test)
HTTP_OPTIONS: frozenset[str] = frozenset({
    "breaker_failures", "breaker_reset_s", "burst", "connect_timeout_s", "deadline_s", "default_retry_after_s",
    "http2", "keepalive_expiry_s", "max_body_bytes", "max_connections", "max_keepalive", "quota_low_water",
    "quota_pause_s", "quota_reserve", "rate_per_s", "read_timeout_s", "user_agent",
})
POLL_OPTIONS: frozenset[str] = frozenset({
    "backoff_initial_s", "backoff_max_s", "health_every_s", "interval_s", "lag_window_s", "live_interval_s",
    "min_interval_s", "static_ttl_s",
})
#: credentials a poller understands (``feed.sources.poller.build_http``)
HTTP_AUTH_OPTIONS: frozenset[str] = frozenset({
    "api_key", "api_key_in", "api_key_param", "api_key_header", "user", "password", "client_id", "client_secret",
    "token_url", "token_refresh_margin_s", "hmac_key_id", "hmac_secret",
})
PUSH_OPTIONS: frozenset[str] = frozenset({
    "api_key", "snapshot_url", "ping_interval_ms", "reorder_ms", "connect_timeout_s", "backoff_initial_s",
    "backoff_max_s", "prefix",
})


@dataclass(frozen=True)
class SourceKind:
    """One kind of source.

    kind: the ``--source`` keyword. protocol / summary: for the help and the
    README. options: accepted option keys (besides ``name``). required:
    groups of options of which at least one each must be given (e.g.
    ``("user", "api_key", "client_id")`` = some credential). runner:
    ``"module:function"`` of the coroutine that runs it.
    """

    kind: str
    protocol: str
    summary: str
    options: frozenset[str]
    required: tuple[tuple[str, ...], ...]
    runner: str

    def load(self) -> Runner:
        """The runner coroutine function (imports its module)."""
        module, _, func = self.runner.partition(":")
        fn: Any = getattr(importlib.import_module(module), func)
        return fn

    @property
    def accepted(self) -> frozenset[str]:
        return self.options | COMMON_OPTIONS


REGISTRY: dict[str, SourceKind] = {k.kind: k for k in (
    SourceKind(
        "esa", "Betfair Exchange Stream API (TCP/TLS)",
        "subscription, heartbeats (`heartbeat_ms=`, default 1000: quiet markets are confirmed every second and "
        "a half-open link is noticed after 2 s), `clk` resume (also after a restart), 503 = DEGRADED",
        frozenset({"app_key", "session", "tls", "heartbeat_ms", "conflate_ms"}),
        (("app_key",), ("session",)), "feed.supervisor:run_esa_spec"),
    SourceKind(
        "pinnacle", "Pinnacle Lines API polling",
        "fixtures + odds snapshot, then `since=<last>` deltas merged by period; live events keep their "
        "pre-match identity (`parentId`); the cursor is stored with the data",
        HTTP_OPTIONS | POLL_OPTIONS | HTTP_AUTH_OPTIONS | {"odds_format", "sports", "fixtures_interval_s", "resync_s"},
        (("user", "api_key", "client_id"),), "feed.sources.poller:run_pinnacle_source"),
    SourceKind(
        "theoddsapi", "The Odds API v4 polling",
        "full snapshots diffed per bookmaker/market on `last_update`; a vanished bookmaker or market becomes "
        "SUSPENDED; `mode=conditional` uses ETag / If-None-Match",
        HTTP_OPTIONS | POLL_OPTIONS | HTTP_AUTH_OPTIONS | {"odds_format", "mode", "sport", "sports", "regions",
                                                          "markets", "bookmakers"},
        (("api_key", "client_id", "user"),), "feed.sources.poller:run_theoddsapi_source"),
    SourceKind(
        "push-ws", "WebSocket push ([docs/push-format.md](docs/push-format.md), modelled on OpticOdds/OddsPapi)",
        "subscribe with `resume_from`, per-stream `seq` with reordering window, gap → REST snapshot resync, "
        "`locked` odds kept with their last price and marked SUSPENDED",
        PUSH_OPTIONS, (), "feed.sources.ws:run_push_ws_source"),
    SourceKind(
        "push-sse", "SSE push (same format)",
        "`Last-Event-ID` resume, the same order/gap/liveness handling",
        PUSH_OPTIONS, (), "feed.sources.sse:run_push_sse_source"),
)}

KINDS: tuple[str, ...] = tuple(REGISTRY)


def readme_table() -> str:
    """The README's table of kinds (``| kind | protocol | what it does |``)."""
    rows = ["| kind | protocol | what it does |", "|---|---|---|"]
    rows += [f"| `{k.kind}` | {k.protocol} | {k.summary} |" for k in REGISTRY.values()]
    return "\n".join(rows)
