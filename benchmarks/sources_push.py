"""Push consumers against the local push simulator: throughput and emit → stored lag.

For each transport (WebSocket, SSE) a bounded run starts an embedded
redis-server (or uses ``--redis-url``), the push simulator on 127.0.0.1 in a
child process (synthetic model, ``odds_per_message`` odds per message; its own
process so it does not share the consumer's core) and the real consumer run
by :func:`feed.pipeline.run_spec` from its ``push-ws=…`` / ``push-sse=…``
spec (client → push normaliser → book → Redis) in this one, waits until the
source is UP, then (after a warm-up) measures for ``duration_s`` with the
harness of :mod:`benchmarks.sources_more`:

- ``messages_per_s``: push messages the consumer ingested per second
  (``sequenced_per_s``: how far the stream's ``seq`` moved; equal when the
  consumer keeps up);
- ``odds_per_s``: odds (selection changes) per second;
- ``lag_p50_ms`` / ``lag_p99_ms`` / ``lag_max_ms``: for every delta written in
  the window, Redis apply returned (wall clock) − the odd's ``timestamp``
  (the simulator's wall clock when it emitted the change). Same host, same
  clock: no skew;
- ``pipe_p50_ms`` / ``pipe_p99_ms``: the pipeline's own lag percentiles
  (``pipeline.lag.percentiles()``, what ``/v1/sources`` shows; received −
  ``timestamp``) over the same window;
- ``cpu_pct`` / ``sim_cpu_pct``: CPU of this process / the simulator over
  the window, % of one core; ``load1``: the 1-minute load average.

Usage::

    python benchmarks/sources_push.py [--duration 5] [--rate 3000] [--events 60] [--odds-per-message 1] [--only ws|sse]

``bench_push_ws()`` / ``bench_push_sse()`` return the figures as a dict
(``benchmarks/sources.py`` imports them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks.sources_more import READY_TIMEOUT_S, child, redis_store, running  # noqa: E402
except ImportError:
    from sources_more import READY_TIMEOUT_S, child, redis_store, running  # type: ignore[no-redef]  # noqa: E402

__all__ = ["bench_push_sse", "bench_push_ws"]

API_KEY = "bench-push-key"
_PATHS = {"push-ws": "ws://127.0.0.1:%d/push/ws", "push-sse": "http://127.0.0.1:%d/push/sse"}


_CHILD = """
from feed.simulator.push_providers import PushSimConfig, run_push_providers

async def main(stop):
    cfg = PushSimConfig(host="127.0.0.1", port=0, api_key={api_key!r}, events={events}, rate_per_s={rate},
                        seed=1, time_scale=60.0, tick_ms=5, ping_interval_ms=5000, odds_per_message={opm})
    task = asyncio.create_task(run_push_providers(cfg, ready=lambda port: print(port, flush=True)))
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return {{}}

run(main)
"""


async def _bench(kind: str, *, duration_s: float, rate_per_s: float, events: int, odds_per_message: int,
                 redis_url: str | None, warmup_s: float) -> dict[str, Any]:
    code = _CHILD.format(api_key=API_KEY, events=events, rate=rate_per_s, opm=odds_per_message)
    async with redis_store(redis_url) as store, \
            child(code, max_s=duration_s + warmup_s + 2 * READY_TIMEOUT_S, what="push simulator") as sim:
        port = int(sim.first_line)
        spec = f"{kind}={_PATHS[kind] % port},api_key={API_KEY},name=bench-{kind}-{port}"
        async with running(kind, store, spec) as run:
            def up() -> bool:
                client = getattr(run.source, "client", None)
                return run.up() and client is not None and client.health == ("UP", None)
            await run.until(up, "UP")
            client = run.source.client
            r = await run.measure(duration_s=duration_s, warmup_s=warmup_s, sim_pid=sim.proc.pid,
                                  counters={"sequenced": lambda: client.last_seq or 0})
    r["notes"] = f"stream {r['sequenced_per_s']:,} seq/s, {odds_per_message} odd(s)/msg"
    return r


def bench_push_ws(*, duration_s: float = 5.0, rate_per_s: float = 3000.0, events: int = 60,
                  odds_per_message: int = 1, redis_url: str | None = None, warmup_s: float = 1.0) -> dict[str, Any]:
    """WebSocket consumer vs the simulator for ``duration_s``; returns the figures
    (messages/s, odds/s, emit → stored lag p50/p99/max in ms)."""
    return asyncio.run(_bench("push-ws", duration_s=duration_s, rate_per_s=rate_per_s, events=events,
                              odds_per_message=odds_per_message, redis_url=redis_url, warmup_s=warmup_s))


def bench_push_sse(*, duration_s: float = 5.0, rate_per_s: float = 3000.0, events: int = 60,
                   odds_per_message: int = 1, redis_url: str | None = None, warmup_s: float = 1.0) -> dict[str, Any]:
    """SSE consumer vs the simulator for ``duration_s``; same figures as :func:`bench_push_ws`."""
    return asyncio.run(_bench("push-sse", duration_s=duration_s, rate_per_s=rate_per_s, events=events,
                              odds_per_message=odds_per_message, redis_url=redis_url, warmup_s=warmup_s))


def format_result(r: dict[str, Any]) -> str:
    return (f"{r['transport']:<9} {r['messages_per_s']:>8,} msg/s (stream {r['sequenced_per_s']:,}/s)  "
            f"{r['odds_per_s']:>8,} odds/s  lag emit→stored p50 {r['lag_p50_ms']:.0f} ms  "
            f"p99 {r['lag_p99_ms']:.0f} ms  max {r['lag_max_ms']:.0f} ms  "
            f"pipeline lag p50 {r['pipe_p50_ms']:.0f} ms p99 {r['pipe_p99_ms']:.0f} ms  "
            f"({r['deltas']:,} deltas, {r['duration_s']} s; cpu {r['cpu_pct']}%, sim {r['sim_cpu_pct']}%, "
            f"load {r['load1']:.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per transport (default 5)")
    p.add_argument("--rate", type=float, default=3000.0, help="model updates per second (default 3000)")
    p.add_argument("--events", type=int, default=60, help="synthetic events (default 60)")
    p.add_argument("--odds-per-message", type=int, default=1, help="odds per push message (default 1)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    p.add_argument("--only", choices=("ws", "sse"), default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the embedded Redis and the simulator stop
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    opts = {"duration_s": args.duration, "rate_per_s": args.rate, "events": args.events,
            "odds_per_message": args.odds_per_message, "redis_url": args.redis_url}
    cmd = [Path(sys.executable).name, *sys.argv] if argv is None else ["benchmarks/sources_push.py", *argv]
    print(f"command: {shlex.join(cmd)}; load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}", flush=True)
    print(f"push consumers vs the local simulator: {args.rate:g} model updates/s, {args.events} events, "
          f"{args.odds_per_message} odd(s) per message, {args.duration:g} s each", flush=True)
    try:
        if args.only in (None, "ws"):
            print(format_result(bench_push_ws(**opts)), flush=True)
        if args.only in (None, "sse"):
            print(format_result(bench_push_sse(**opts)), flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
