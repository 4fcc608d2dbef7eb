"""Helpers for the poller integration tests: the HTTP providers simulator on
127.0.0.1, a real poller → Ingest → real Redis, and comparisons with the
simulator's truth. Every wait is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from feed.models import Market
from feed.settings import Settings
from feed.simulator.http_providers import HttpProviders, ProvidersConfig
from feed.pipeline import Pipeline, run_spec
from feed.sources.poller import PollerSource
from feed.sources.spec import parse_source_spec
from feed.store import Store
from tests.streaming_helpers import cancel_and_wait, eventually as _eventually

WAIT_S = 20.0

#: fast cadence and quick recovery for tests (seconds)
FAST = ("interval_s=0.1,live_interval_s=0.1,min_interval_s=0,rate_per_s=100,burst=20,deadline_s=1,connect_timeout_s=1,"
        "read_timeout_s=1,backoff_initial_s=0.05,backoff_max_s=0.3,breaker_failures=4,breaker_reset_s=0.3,"
        "health_every_s=0.1")


@asynccontextmanager
async def providers(**config: Any) -> AsyncIterator[HttpProviders]:
    cfg = {"seed": 11, "rate_per_s": 120.0, "time_scale": 240.0, "tick_ms": 20, "events": 10, **config}
    sim = HttpProviders(ProvidersConfig(**cfg))
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@asynccontextmanager
async def poller(kind: str, store: Store, spec: str, *, settings: Settings | None = None) -> AsyncIterator[
        tuple[PollerSource, asyncio.Task[None]]]:
    """Run a poller from a ``--source`` spec through the pipeline; yield (source, task),
    the source's ``pipeline`` attribute set to its pipeline (for the tests' eyes only)."""
    got: list[PollerSource] = []
    parsed = parse_source_spec(spec)
    assert parsed.kind == kind

    def hook(source: Any, pipeline: Pipeline) -> None:
        source.pipeline = pipeline
        got.append(source)

    task = asyncio.create_task(run_spec(store, settings or Settings(), parsed, on_source=hook))
    for _ in range(200):
        if got or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    try:
        yield got[0], task
    finally:
        await cancel_and_wait(task, "the poller")


async def eventually(pred: Callable[[], Any], timeout_s: float = WAIT_S, what: str = "condition", *,
                     interval_s: float = 0.05) -> Any:
    """:func:`tests.streaming_helpers.eventually` with the pollers' longer default wait."""
    return await _eventually(pred, timeout_s, what, interval_s=interval_s)


async def wait_faults_consumed(sim: HttpProviders, timeout_s: float = WAIT_S) -> None:
    await eventually(lambda: sim.pending_faults() == 0, timeout_s, what="faults consumed")


def diff_with_truth(markets: dict[str, Market], truth: dict[str, dict[str, Any]]) -> list[str]:
    """Differences between stored markets of one source and the provider's truth."""
    out = []
    for mid in sorted(set(truth) | set(markets)):
        t, m = truth.get(mid), markets.get(mid)
        if t is None:
            out.append(f"{mid}: stored but never served")
            continue
        if m is None:
            out.append(f"{mid}: served but not stored")
            continue
        if m.status != t["status"]:
            out.append(f"{mid}: status {m.status} != {t['status']}")
        if t["status"] == "OPEN":
            prices = {s.selection_id: s.price for s in m.selections}
            if prices != t["prices"]:
                out.append(f"{mid}: prices {prices} != {t['prices']}")
            if m.in_play != t["in_play"]:
                out.append(f"{mid}: in_play {m.in_play} != {t['in_play']}")
    return out


async def stored(store: Store, source: str) -> dict[str, Market]:
    return {m.market_id: m for m in await store.load_all_markets() if m.source == source}


async def converge(store: Store, sim: HttpProviders, provider: str, source: str, timeout_s: float = WAIT_S,
                   sports: set[Any] | None = None) -> dict[str, Market]:
    """Freeze the simulator, then wait until it has served every change (of
    ``sports``) and Redis holds exactly its truth."""
    sim.freeze()
    last: list[str] = ["nothing served yet"]

    async def same() -> bool:
        nonlocal last
        if not sim.served_all(provider, sports):
            return False
        markets = await stored(store, source)
        last = diff_with_truth(markets, sim.truth(provider))
        return not last and bool(markets)

    try:
        await eventually(same, timeout_s, interval_s=0.1, what="redis == simulator truth")
    except AssertionError:
        raise AssertionError("redis differs from the simulator's truth:\n" + "\n".join(last[:30])) from None
    return await stored(store, source)


async def assert_log_sequenced(store: Store, markets: dict[str, Market]) -> None:
    """Every market's deltas in the log are seq 1..N exactly once (nothing
    duplicated, nothing skipped), N = the stored snapshot's seq."""
    seqs: dict[str, list[int]] = {}
    for _, deltas in await store.log_range(0, "0-0"):
        for d in deltas:
            if d.market_id in markets:
                seqs.setdefault(d.market_id, []).append(d.seq)
    for mid, m in markets.items():
        assert seqs.get(mid) == list(range(1, m.seq + 1)), (mid, seqs.get(mid)[:20] if seqs.get(mid) else None, m.seq)


def assert_retry_after_honoured(sim: HttpProviders, provider: str) -> None:
    """Server-side: after each 429, the next request came no sooner than its Retry-After."""
    assert sim.retry_afters, "no 429 was served"
    assert not sim.early_requests, [(r.path, r.at) for r in sim.early_requests]
    reqs = [r for r in sim.requests if r.provider == provider]
    for at, seconds, prov in sim.retry_afters:
        if prov != provider:
            continue
        later = [r.at for r in reqs if r.at > at]
        if later:
            assert later[0] - at >= seconds - 0.01, (later[0] - at, seconds)
