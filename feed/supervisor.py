"""Runs sources: wires a source's I/O to its ingest pipeline and health.

``run_esa_source`` keeps one Betfair ESA subscription alive and ingests it;
``run_replay`` feeds recordings. Both persist the source's health (UP /
DEGRADED / DOWN with a reason, last message time, counters, cursor) about
once a second and at every transition.

``run_source(store, settings, spec)`` dispatches a parsed ``--source`` spec
(:mod:`feed.sources.spec`) to its runner: ``esa`` → :func:`run_esa_source`,
``pinnacle`` / ``theoddsapi`` → the HTTP pollers
(:mod:`feed.sources.poller`), ``push-ws`` / ``push-sse`` → the push
consumers (:mod:`feed.sources.ws`, :mod:`feed.sources.sse`).
``run_sources`` runs several under one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from feed.book import Book
from feed.errors import ConfigError, FatalSourceError, OddsfeedError
from feed.ingest import HealthPublisher, Ingest, ingest_options, now_ms
from feed.models import SourceState
from feed.normalise.betfair import BetfairNormaliser, decode_cursor
from feed.sources.backoff import Backoff
from feed.settings import Settings
from feed.sources.esa import EsaClient, default_market_data_filter, default_market_filter
from feed.sources.registry import REGISTRY
from feed.sources.replay import Replay, ReplaySummary
from feed.sources.spec import SourceSpec
from feed.store import Store

logger = logging.getLogger(__name__)

async def run_esa_source(store: Store, settings: Settings, *, host: str, port: int, app_key: str,
                         session_token: str, name: str = "betfair", ssl: _ssl.SSLContext | None = None,
                         market_filter: dict[str, Any] | None = None,
                         market_data_filter: dict[str, Any] | None = None,
                         conflate_ms: int | None = None, heartbeat_ms: int = 1000,
                         on_client: Callable[[EsaClient], None] | None = None) -> None:
    """Ingest one ESA subscription until cancelled (raises on fatal errors).

    A restarted process continues each market's ``seq`` from the stored
    snapshots and subscribes with the stored ``initialClk``/``clk``
    (RESUB_DELTA: only what changed meanwhile); when the upstream no longer
    knows that point it sends a SUB_IMAGE, which opens a new upstream
    session. Within the process a reconnect resumes the same way.
    """
    ingest = Ingest(store, source=name, normaliser=BetfairNormaliser(name, ladder_depth=settings.ladder_depth),
                    book=Book(), stale_after_ms=settings.stale_in_play_ms, **ingest_options(settings))
    cursor = decode_cursor(await ingest.restore())
    if cursor.initial_clk and cursor.clk:
        logger.info("source %s resumes from its stored cursor (initialClk/clk)", name)
    health = HealthPublisher(ingest)

    async def on_lines(lines: list[bytes], recv_ms: int) -> None:
        ingest.feed_lines(lines, recv_ms)
        await ingest.flush()
        if ingest.take_lost():
            client.request_image()  # a market's change was rejected: only a new image repairs it
        state: SourceState = "DEGRADED" if ingest.degraded else "UP"
        reason = "upstream_503" if ingest.degraded else None
        if ingest.health.state != "DOWN" and ingest.set_state(state, reason):
            health.wake()

    def on_health(state: SourceState, reason: str | None) -> None:
        if ingest.set_state(state, reason):
            health.wake()

    client = EsaClient(
        host=host, port=port, app_key=app_key, session_token=session_token,
        market_filter=market_filter or default_market_filter(),
        market_data_filter=market_data_filter or default_market_data_filter(),
        heartbeat_ms=heartbeat_ms, conflate_ms=conflate_ms, ssl=ssl,
        on_lines=on_lines, on_health=on_health, name=name,
        initial_clk=cursor.initial_clk, clk=cursor.clk,
    )
    if on_client is not None:
        on_client(client)
    try:
        async with health:
            await client.run()
    finally:
        client.stop()
        ingest.set_state("DOWN", "stopped")
        with contextlib.suppress(Exception):
            await ingest.publish_health()


async def run_replay(store: Store, settings: Settings, paths: list[str | Path], *, speed: float | None,
                     name: str = "replay", map_clock: bool = True,
                     progress: Callable[[Ingest, int, int], None] | None = None) -> ReplaySummary:
    """Replay recordings into the store; return the summary."""
    ingest = Ingest(store, source=name, normaliser=BetfairNormaliser(name, ladder_depth=settings.ladder_depth),
                    stale_after_ms=settings.stale_in_play_ms, kind="replay", **ingest_options(settings))
    await ingest.restore()
    replay = Replay(paths, ingest, speed=speed, map_clock=map_clock, chunk_lines=settings.ingest_batch_max,
                    progress=progress)
    async with HealthPublisher(ingest):
        return await replay.run()


# --- --source dispatch ------------------------------------------------------------


def _esa_endpoint(spec: SourceSpec) -> tuple[str, int, bool]:
    url = spec.url
    tls = spec.get("tls", "false") in ("1", "true", "yes")
    for prefix, is_tls in (("tls://", True), ("ssl://", True), ("tcp://", False)):
        if url.startswith(prefix):
            url, tls = url[len(prefix):], is_tls or tls
    host, sep, port = url.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"source {spec.name}: esa needs HOST:PORT, not {spec.url!r}")
    return host or "127.0.0.1", int(port), tls


async def run_esa_spec(store: Store, settings: Settings, spec: SourceSpec) -> None:
    """``esa=HOST:PORT,app_key=…,session=…[,tls=true][,heartbeat_ms=1000][,conflate_ms=…]``:
    :func:`run_esa_source` from a ``--source`` spec."""
    import ssl

    host, port, tls = _esa_endpoint(spec)
    app_key, session = spec.get("app_key"), spec.get("session")
    if not app_key or not session:
        raise ConfigError(f"source {spec.name}: esa needs app_key= and session=")
    await run_esa_source(store, settings, host=host, port=port, app_key=app_key, session_token=session,
                         name=spec.name, ssl=ssl.create_default_context() if tls else None,
                         heartbeat_ms=int(spec.get_float("heartbeat_ms", 1000)),
                         conflate_ms=int(spec.get_float("conflate_ms", 0)) or None)


async def run_source(store: Store, settings: Settings, spec: SourceSpec) -> None:
    """Run one ``--source`` until cancelled (raises on fatal errors): the
    runner its kind names in :mod:`feed.sources.registry`."""
    entry = REGISTRY.get(spec.kind)
    if entry is None:
        raise ConfigError(f"unknown source kind {spec.kind!r}")
    await entry.load()(store, settings, spec)


#: Errors a restart cannot fix: the source ends (its health says why), the others go on.
FATAL_ERRORS: tuple[type[BaseException], ...] = (FatalSourceError, ConfigError)


async def supervise(name: str, run: Callable[[], Awaitable[None]], *, store: Store | None = None,
                    backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
    """Run ``run()`` (one source) until cancelled, restarting it with
    full-jitter backoff when it fails; a fatal error (bad credentials, bad
    configuration) ends it and is raised. Every restart restores the
    source from the store (its cursor, markets and session). ``store``: the
    source's health is marked DOWN / ``crashed`` there while it waits."""
    delays = Backoff(initial_s=backoff_initial_s, max_s=backoff_max_s)
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except FATAL_ERRORS:
            raise
        except Exception as exc:
            if asyncio.get_running_loop().time() - started > 60:
                delays.reset()  # it ran fine for a while: this is a new failure
            delay = delays.next_delay()
            logger.error("source %s failed (%s: %s); restarting in %.1f s", name, type(exc).__name__, exc, delay,
                         exc_info=not isinstance(exc, OddsfeedError))
            if store is not None:
                with contextlib.suppress(Exception):
                    h = await store.get_health(name)
                    if h is not None:
                        h.state, h.reason, h.updated_at = "DOWN", "crashed", now_ms()
                        await store.set_health(h)
            await asyncio.sleep(delay)


async def run_sources(store: Store, settings: Settings, specs: list[SourceSpec]) -> None:
    """Run several sources together until cancelled, each isolated: a
    source that fails is restarted with backoff (:func:`supervise`) and
    never stops the others; one that fails fatally ends alone (logged, its
    health DOWN). Raises the fatal errors (in an ExceptionGroup) only when
    every source has ended that way."""
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"two sources share the name {sorted(dupes)[0]!r}: give one a name= option")
    failures: list[Exception] = []

    async def one(spec: SourceSpec) -> None:
        try:
            await supervise(spec.name, lambda: run_source(store, settings, spec), store=store)
        except FATAL_ERRORS as exc:
            logger.error("source %s stopped: %s", spec.name, exc)
            failures.append(exc)  # type: ignore[arg-type]

    async with asyncio.TaskGroup() as tg:
        for spec in specs:
            tg.create_task(one(spec), name=f"source-{spec.name}")
    if failures:
        raise ExceptionGroup("every source failed", failures)
