"""Runs sources, each isolated and restarted with backoff.

``run_source(store, settings, spec)`` runs a parsed ``--source`` spec
(:mod:`feed.sources.spec`) through :func:`feed.pipeline.run_spec` (the
registry names its source and normaliser); :func:`supervise` restarts one
source when it fails; ``run_sources`` runs several under one TaskGroup.
``run_esa_source`` (an ESA subscription from keyword arguments) and
``run_replay`` (Betfair recordings) are the same pipeline for the CLI's
``--esa`` / ``--replay`` and for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from feed.errors import ConfigError, FatalSourceError, OddsfeedError
from feed.ingest import Ingest, now_ms
from feed.normalise.betfair import BetfairNormaliser
from feed.pipeline import Pipeline, run_spec
from feed.settings import Settings
from feed.sources.backoff import Backoff
from feed.sources.esa import EsaClient, EsaSource, default_market_data_filter, default_market_filter
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
    """Ingest one ESA subscription until cancelled (raises on fatal errors):
    an :class:`~feed.sources.esa.EsaSource` through the
    :class:`~feed.pipeline.Pipeline`. A restarted process continues each
    market's ``seq`` from the stored snapshots and subscribes with the
    stored ``initialClk``/``clk``."""
    source = EsaSource(name, host=host, port=port, app_key=app_key, session_token=session_token, ssl=ssl,
                       market_filter=market_filter or default_market_filter(),
                       market_data_filter=market_data_filter or default_market_data_filter(),
                       heartbeat_ms=heartbeat_ms, conflate_ms=conflate_ms, on_client=on_client)
    pipeline = Pipeline(store, settings, name=name, kind="esa",
                        normaliser=BetfairNormaliser(name, ladder_depth=settings.ladder_depth))
    await pipeline.run(source)


async def run_replay(store: Store, settings: Settings, paths: list[str | Path], *, speed: float | None,
                     name: str = "replay", map_clock: bool = True,
                     progress: Callable[[Ingest, int, int], None] | None = None) -> ReplaySummary:
    """Replay Betfair recordings into the store; return the summary."""
    pipeline = Pipeline(store, settings, name=name, kind="replay",
                        normaliser=BetfairNormaliser(name, ladder_depth=settings.ladder_depth))
    await pipeline.restore()
    replay = Replay(paths, pipeline.ingest, speed=speed, map_clock=map_clock, chunk_lines=settings.ingest_batch_max,
                    progress=progress)
    async with pipeline.health:
        return await replay.run()


async def run_source(store: Store, settings: Settings, spec: SourceSpec) -> None:
    """Run one ``--source`` until cancelled (raises on fatal errors): the
    source and normaliser its kind names in :mod:`feed.sources.registry`,
    through :func:`feed.pipeline.run_spec`."""
    await run_spec(store, settings, spec)


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
