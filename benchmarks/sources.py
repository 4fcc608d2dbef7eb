"""Sources against the local simulators: messages/s and emit → stored lag, per kind.

One function per source kind returns a dict of figures; :data:`KINDS` maps
each kind to its function and ``main`` prints them as one table. Part A
(HTTP pollers) provides ``pinnacle`` and ``theoddsapi``; the push consumers
(``push-ws``, ``push-sse``) come from :mod:`benchmarks.sources_push` when it
is present.

Poller runs (``bench_pinnacle`` / ``bench_theoddsapi``): an embedded
redis-server (or ``--redis-url``), the HTTP providers simulator
(:mod:`feed.simulator.http_providers`, synthetic model, ``--rate`` updates/s
over ``--events`` events) in a **child process** so it does not share this
process's core, and the real poller (httpx → normaliser → Ingest → Redis)
here, polling every ``--interval`` seconds (pre-match and in play alike).
After the source is UP and a warm-up, for ``--duration`` seconds:

- ``messages_per_s``: provider responses ingested per second (a poll is a
  message: one Odds API snapshot, one Pinnacle fixtures or odds answer);
- ``odds_per_s``: selection changes stored per second;
- ``lag_p50_ms`` / ``lag_p99_ms`` / ``lag_max_ms``: for every delta stored
  in the window, the wall clock when Redis acknowledged the apply minus the
  delta's ``source_ts`` (the simulator's change time: Pinnacle
  ``*UpdatedAt``, Odds API ``last_update``). Same host, same clock. For a
  poller this is dominated by the wait for the next poll (≈ interval / 2 on
  average, up to one interval), which is why the interval is printed.

Usage::

    python benchmarks/sources.py [--duration 5] [--interval 0.2] [--rate 3000] [--events 60] [--only pinnacle theoddsapi]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from feed.embedded_redis import EmbeddedRedis  # noqa: E402
from feed.models import Delta  # noqa: E402
from feed.settings import Settings  # noqa: E402
from feed.sources.poller import PollerSource, run_pinnacle_source, run_theoddsapi_source  # noqa: E402
from feed.sources.spec import parse_source_spec  # noqa: E402
from feed.store import Store  # noqa: E402

__all__ = ["KINDS", "bench_pinnacle", "bench_theoddsapi"]

_CHILD = """
import asyncio, sys
from feed.simulator.http_providers import ProvidersConfig, run_http_providers
cfg = ProvidersConfig(events={events}, rate_per_s={rate}, seed=7, time_scale=60.0, tick_ms=20)
asyncio.run(run_http_providers(cfg, ready=lambda sim: print(sim.port, flush=True)))
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    return float(values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))])


@contextlib.asynccontextmanager
async def _simulator(events: int, rate_per_s: float) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD.format(events=events, rate=rate_per_s), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        yield int(line)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _bench_poller(kind: str, spec_text: Callable[[int], str], *, duration_s: float, rate_per_s: float,
                        events: int, redis_url: str | None, warmup_s: float, interval_s: float) -> dict[str, Any]:
    runner = run_pinnacle_source if kind == "pinnacle" else run_theoddsapi_source
    with tempfile.TemporaryDirectory(prefix="oddsfeed-bench-") as tmp:
        redis = None
        if redis_url is None:
            redis = EmbeddedRedis(tmp, appendonly=False)
            redis.start()
            redis_url = redis.url
        store = await Store.open(redis_url)
        lags: list[int] = []
        measuring = False
        got: list[PollerSource] = []
        try:
            async with _simulator(events, rate_per_s) as port:
                spec = parse_source_spec(spec_text(port))
                task = asyncio.create_task(runner(store, Settings(), spec, on_source=got.append))
                try:
                    deadline = time.monotonic() + 20
                    while not (got and got[0].pipeline.ingest.health.state == "UP"):
                        if task.done():
                            task.result()
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{kind} poller did not come up")
                        await asyncio.sleep(0.05)
                    ingest = got[0].pipeline.ingest  # type: ignore[attr-defined]
                    flush = ingest.flush

                    async def timed_flush() -> list[Delta]:
                        deltas = await flush()
                        if measuring:
                            t = _now_ms()
                            lags.extend(t - d.source_ts for d in deltas if d.source_ts)
                        return deltas
                    ingest.flush = timed_flush  # type: ignore[method-assign]
                    await asyncio.sleep(warmup_s)
                    m0, o0, d0 = ingest.stats.messages, ingest.stats.runner_changes, ingest.stats.deltas
                    measuring = True
                    t0 = time.perf_counter()
                    await asyncio.sleep(duration_s)
                    measuring = False
                    dt = time.perf_counter() - t0
                    m1, o1, d1 = ingest.stats.messages, ingest.stats.runner_changes, ingest.stats.deltas
                    rejected = ingest.stats.rejected
                    requests = got[0].http.stats["requests"]
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        finally:
            await store.close()
            if redis is not None:
                redis.stop()
    lags.sort()
    return {
        "transport": kind,
        "duration_s": round(dt, 2),
        "interval_s": interval_s,
        "messages_per_s": round((m1 - m0) / dt, 1),
        "odds_per_s": round((o1 - o0) / dt),
        "deltas_per_s": round((d1 - d0) / dt),
        "deltas": len(lags),
        "lag_p50_ms": _pct(lags, 0.50),
        "lag_p99_ms": _pct(lags, 0.99),
        "lag_max_ms": float(lags[-1]) if lags else float("nan"),
        "rejected": rejected,
        "requests": requests,
    }


_FAST = "min_interval_s=0,rate_per_s=1000,burst=100,deadline_s=5,health_every_s=1"


def bench_pinnacle(*, duration_s: float = 5.0, interval_s: float = 0.2, rate_per_s: float = 3000.0, events: int = 60,
                   redis_url: str | None = None, warmup_s: float = 1.0) -> dict[str, Any]:
    """Pinnacle poller (cursor mode: fixtures + odds since ``last``) vs the simulator."""
    def spec(port: int) -> str:
        return (f"pinnacle=http://127.0.0.1:{port},user=demo,password=demo,sports=29+33+4,"
                f"interval_s={interval_s},live_interval_s={interval_s},fixtures_interval_s=5,{_FAST}")
    return asyncio.run(_bench_poller("pinnacle", spec, duration_s=duration_s, rate_per_s=rate_per_s, events=events,
                                     redis_url=redis_url, warmup_s=warmup_s, interval_s=interval_s))


def bench_theoddsapi(*, duration_s: float = 5.0, interval_s: float = 0.2, rate_per_s: float = 3000.0, events: int = 60,
                     redis_url: str | None = None, warmup_s: float = 1.0) -> dict[str, Any]:
    """The Odds API poller (snapshot-diff of ``/sports/upcoming/odds``) vs the simulator."""
    def spec(port: int) -> str:
        return (f"theoddsapi=http://127.0.0.1:{port}/v4,api_key=demo,sport=upcoming,markets=h2h+totals,"
                f"interval_s={interval_s},live_interval_s={interval_s},{_FAST}")
    return asyncio.run(_bench_poller("theoddsapi", spec, duration_s=duration_s, rate_per_s=rate_per_s, events=events,
                                     redis_url=redis_url, warmup_s=warmup_s, interval_s=interval_s))


def _push_kinds() -> dict[str, Callable[..., dict[str, Any]]]:
    try:
        from benchmarks.sources_push import bench_push_sse, bench_push_ws
    except ImportError:
        try:
            from sources_push import bench_push_sse, bench_push_ws  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return {}
    return {"push-ws": bench_push_ws, "push-sse": bench_push_sse}


#: source kind -> benchmark function (keyword args: duration_s, rate_per_s, events, redis_url, …)
KINDS: dict[str, Callable[..., dict[str, Any]]] = {"pinnacle": bench_pinnacle, "theoddsapi": bench_theoddsapi,
                                                   **_push_kinds()}

_HEADER = (f"{'kind':<11} {'msgs/s':>9} {'odds/s':>9} {'deltas':>8} {'lag p50':>9} {'lag p99':>9} "
           f"{'lag max':>9} {'rejected':>8}  notes")


def format_row(r: dict[str, Any]) -> str:
    notes = f"poll every {r['interval_s']:g} s, {r['requests']} requests" if "interval_s" in r else ""
    return (f"{r['transport']:<11} {r['messages_per_s']:>9,} {r['odds_per_s']:>9,} {r['deltas']:>8,} "
            f"{r['lag_p50_ms']:>7.0f}ms {r['lag_p99_ms']:>7.0f}ms {r['lag_max_ms']:>7.0f}ms {r.get('rejected', 0):>8}  {notes}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per kind (default 5)")
    p.add_argument("--interval", type=float, default=0.2, help="poll interval of the pollers, s (default 0.2)")
    p.add_argument("--rate", type=float, default=3000.0, help="model updates per second (default 3000)")
    p.add_argument("--events", type=int, default=60, help="synthetic events (default 60)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    p.add_argument("--only", nargs="+", choices=sorted(KINDS), default=None, help="kinds to run (default all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"sources vs the local simulators: {args.rate:g} model updates/s, {args.events} events, "
          f"{args.duration:g} s measured per kind; lag = Redis apply acknowledged − provider change time", flush=True)
    print(_HEADER, flush=True)
    for kind in args.only or list(KINDS):
        opts: dict[str, Any] = {"duration_s": args.duration, "rate_per_s": args.rate, "events": args.events,
                                "redis_url": args.redis_url}
        if kind in ("pinnacle", "theoddsapi"):
            opts["interval_s"] = args.interval
        print(format_row(KINDS[kind](**opts)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
