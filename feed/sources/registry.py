"""The source kinds oddsfeed can ingest: one registry entry each.

An entry names the kind (``--source KIND=…``), its protocol, what it does,
the options it accepts (anything else is an error naming the valid ones),
the options it needs, and its two factories, imported lazily (a kind's
dependencies load only when it is used):

- ``source = "module:function"``, ``(spec, settings) -> Source``: the I/O
  half (:class:`feed.sources.base.Source`);
- ``normaliser = "module:function"``, ``(spec, settings) -> Normaliser``:
  the pure half (:class:`feed.normalise.base.Normaliser`).

:class:`feed.pipeline.Pipeline` runs every kind the same way. The
``--source`` parser (:mod:`feed.sources.spec`), the dispatcher
(:func:`feed.supervisor.run_source`), the recorder and replay, the CLI
help and the README's table of kinds all read this one list.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feed.normalise.base import Normaliser
    from feed.settings import Settings
    from feed.sources.base import Source
    from feed.sources.spec import SourceSpec

SourceFactory = Callable[["SourceSpec", "Settings"], "Source"]
NormaliserFactory = Callable[["SourceSpec", "Settings"], "Normaliser"]

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
    ``("user", "api_key", "client_id")`` = some credential). source /
    normaliser: ``"module:function"`` of the two factories.
    """

    kind: str
    protocol: str
    summary: str
    options: frozenset[str]
    required: tuple[tuple[str, ...], ...]
    source: str
    normaliser: str

    def load_source(self) -> SourceFactory:
        """The source factory (imports its module)."""
        fn: Any = _load(self.source)
        return fn

    def load_normaliser(self) -> NormaliserFactory:
        """The normaliser factory (imports its module)."""
        fn: Any = _load(self.normaliser)
        return fn

    @property
    def accepted(self) -> frozenset[str]:
        return self.options | COMMON_OPTIONS


REGISTRY: dict[str, SourceKind] = {k.kind: k for k in (
    SourceKind(
        "esa", "Betfair Exchange Stream API (TCP/TLS)",
        "subscription, heartbeats (`heartbeat_ms=`, default 1000: quiet markets are confirmed every second and "
        "a half-open link is noticed after 2 s), `clk` resume (also after a restart), 503 = DEGRADED; login "
        "(interactive or certificate), keep-alive, a new login on session expiry; names from the Betting API's "
        "`listMarketCatalogue`",
        frozenset({"app_key", "session", "tls", "heartbeat_ms", "conflate_ms", "username", "password", "cert_file",
                   "key_file", "sso_url", "cert_sso_url", "betting_url", "keep_alive_s", "event_types", "countries",
                   "market_types", "catalogue"}),
        (("app_key",), ("session", "username")), "feed.sources.esa:from_spec", "feed.normalise.betfair:from_spec"),
    SourceKind(
        "betfair-cricket", "Betfair sports-data stream (TCP/TLS, `sports-data-stream-api.betfair.com`)",
        "live cricket scores: `cricketSubscription` → `ccm` lines → event states (status, innings, runs, "
        "wickets, balls) of the match's `bf:` event; the `esa` kind's login, heartbeats, `clk` resume and "
        "503 = DEGRADED; `betfair-cricket=betfair` is Betfair's endpoint",
        frozenset({"app_key", "session", "tls", "heartbeat_ms", "username", "password", "cert_file", "key_file",
                   "sso_url", "cert_sso_url", "keep_alive_s"}),
        (("app_key",), ("session", "username")), "feed.sources.betfair_cricket:from_spec",
        "feed.normalise.betfair:cricket_from_spec"),
    SourceKind(
        "betfair-race", "Betfair sports-data stream (TCP/TLS, `sports-data-stream-api.betfair.com`)",
        "live race progress (TPD): `raceSubscription` → `rcm` lines → race states (LIVE → ENDED at the "
        "`Finish` gate, running clock, leader's gate and distance to the finish, running order, each runner's "
        "distance) of event `bf:<race id>`, joined to the race's markets; the `esa` kind's login, heartbeats, "
        "`clk` resume and 503 = DEGRADED; `betfair-race=betfair` is Betfair's endpoint",
        frozenset({"app_key", "session", "tls", "heartbeat_ms", "username", "password", "cert_file", "key_file",
                   "sso_url", "cert_sso_url", "keep_alive_s"}),
        (("app_key",), ("session", "username")), "feed.sources.betfair_race:from_spec",
        "feed.normalise.betfair:race_from_spec"),
    SourceKind(
        "pinnacle", "Pinnacle Lines API polling",
        "fixtures + odds snapshot, then `since=<last>` deltas merged by period; live events keep their "
        "pre-match identity (`parentId`), every event of a group supplying the periods it offers (live first); a "
        "market past its period's cutoff is suspended (`past_cutoff`) by the next answer; only deltas confirm — a "
        "snapshot (cached by Pinnacle up to 60 s) counts as received 60 s before its request, and the first odds "
        "call after a restart is one; the cursor is stored with the data",
        HTTP_OPTIONS | POLL_OPTIONS | HTTP_AUTH_OPTIONS | {"odds_format", "sports", "fixtures_interval_s", "resync_s",
                                                          "settled", "settled_interval_s"},
        (("user", "api_key", "client_id"),), "feed.sources.poller:pinnacle_from_spec",
        "feed.normalise.pinnacle:from_spec"),
    SourceKind(
        "theoddsapi", "The Odds API v4 polling",
        "full snapshots diffed per bookmaker/market on `last_update`; a vanished bookmaker or market becomes "
        "SUSPENDED; `mode=conditional` uses ETag / If-None-Match",
        HTTP_OPTIONS | POLL_OPTIONS | HTTP_AUTH_OPTIONS | {"odds_format", "mode", "sport", "sports", "regions",
                                                          "markets", "bookmakers", "scores", "scores_linger_s",
                                                          "scores_days_from"},
        (("api_key", "client_id", "user"),), "feed.sources.poller:theoddsapi_from_spec",
        "feed.normalise.theoddsapi:from_spec"),
    SourceKind(
        "push-ws", "WebSocket push ([docs/push-format.md](docs/push-format.md), modelled on OpticOdds/OddsPapi)",
        "subscribe with `resume_from`, per-stream `seq` with reordering window, gap → REST snapshot resync, "
        "`locked` odds kept with their last price and marked SUSPENDED",
        PUSH_OPTIONS, (), "feed.sources.ws:from_spec", "feed.normalise.push:from_spec"),
    SourceKind(
        "push-sse", "SSE push (same format)",
        "`Last-Event-ID` resume, the same order/gap/liveness handling",
        PUSH_OPTIONS, (), "feed.sources.sse:from_spec", "feed.normalise.push:from_spec"),
    SourceKind(
        "webhook", "signed HTTP POSTs of push-format messages (our own server)",
        "`POST /ingest/webhook/<name>`, HMAC-SHA256 over `<timestamp>.<body>` (header, encoding, prefix "
        "configurable), timestamp window, idempotency keys, 2xx only once stored (503 + `Retry-After` while "
        "the store fails), deliveries in any order",
        frozenset({"secret", "secret_env", "signature_header", "signature_encoding", "signature_prefix",
                   "timestamp_header", "sign_timestamp", "window_s", "nonce_header", "nonce_max", "max_body_bytes",
                   "read_timeout_s", "retry_after_s", "stale_after_s", "prefix"}),
        (("secret", "secret_env"),), "feed.sources.webhook:from_spec", "feed.normalise.webhook:from_spec"),
    SourceKind(
        "uof", "AMQP (RabbitMQ) + REST recovery, Sportradar Unified Odds Feed style (XML)",
        "queue bound by UOF routing keys, ack after store; producer health from `alive` (down after "
        "`max_inactivity_s`=20 of silence or `subscribed=0`: its markets SUSPENDED and stale), recovery "
        "`initiate_request?after=<cursor>` until `snapshot_complete` (also after a restart); broker reconnect",
        frozenset({"exchange", "bindings", "queue", "api", "token", "producers", "node_id", "max_inactivity_s",
                   "min_recovery_interval_s", "max_recovery_s", "recovery_window_min", "prefetch",
                   "connect_timeout_s", "backoff_initial_s", "backoff_max_s", "prefix"}),
        (("api",),), "feed.sources.amqp:from_spec", "feed.normalise.uof:from_spec"),
    SourceKind(
        "betfair-csv", "Betfair Data Scientists' historic CSVs (a file or folder, replayed)",
        "match odds (football) and thoroughbred WIN/PLACE summaries; each market plays an image at the off "
        "(best back as `price`: the CSV has no sizes), in play at half-time / the off (BSP), then its result and "
        "SETTLED, in time order across markets; the CSV clock mapped onto now (`speed=`, default `max`; "
        "`keep_clock=1`), then DOWN `replay_finished` (`on_end=stop` ends the source)",
        frozenset({"speed", "keep_clock", "on_end"}), (), "feed.sources.csv_replay:from_spec",
        "feed.normalise.betfair_csv:from_spec"),
)}

KINDS: tuple[str, ...] = tuple(REGISTRY)


def _load(ref: str) -> object:
    """Import ``module:name``; a missing optional dependency is a ConfigError
    saying what to install (``pip install 'oddsfeed[amqp]'`` for ``uof``)."""
    from feed.errors import ConfigError

    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("feed"):
            extra = {"aio_pika": "amqp", "aiormq": "amqp"}.get(exc.name.split(".")[0])
            hint = f"pip install 'oddsfeed[{extra}]'" if extra else f"pip install {exc.name}"
            raise ConfigError(f"{module} needs the package {exc.name!r}, which is not installed: {hint}") from None
        raise


def kind_of(spec: SourceSpec) -> SourceKind:
    """The registry entry of ``spec`` (ConfigError for an unknown kind)."""
    from feed.errors import ConfigError

    entry = REGISTRY.get(spec.kind)
    if entry is None:
        raise ConfigError(f"unknown source kind {spec.kind!r}: use one of {', '.join(KINDS)}")
    return entry


def readme_table() -> str:
    """The README's table of kinds (``| kind | protocol | what it does |``)."""
    rows = ["| kind | protocol | what it does |", "|---|---|---|"]
    rows += [f"| `{k.kind}` | {k.protocol} | {k.summary} |" for k in REGISTRY.values()]
    return "\n".join(rows)
