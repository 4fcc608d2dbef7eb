"""Push consumers against the local push simulator: throughput and emit → stored lag.

For each transport (WebSocket, SSE) a bounded run starts an embedded
redis-server (or uses ``--redis-url``), the push simulator on 127.0.0.1 in a
child process (synthetic model, ``odds_per_message`` odds per message; its own
process so it does not share the consumer's core) and the real consumer
(``run_push_ws_source`` / ``run_push_sse_source`` → Ingest → Redis) in this
one, waits until the source is UP, then measures for ``duration_s``:

- ``messages_per_s``: push messages the consumer ingested per second
  (``sequenced_per_s``: how far the stream's ``seq`` moved; equal when the
  consumer keeps up);
- ``odds_per_s``: odds (selection changes) per second;
- ``lag_p50_ms`` / ``lag_p99_ms`` / ``lag_max_ms``: for every delta written in
  the window, Redis apply returned (wall clock) − the odd's ``timestamp``
  (the simulator's wall clock when it emitted the change). Same host, same
  clock: no skew.

Usage::

    python benchmarks/sources_push.py [--duration 5] [--rate 3000] [--events 60] [--odds-per-message 1]

``bench_push_ws()`` / ``bench_push_sse()`` return the figures as a dict
(``benchmarks/sources.py`` imports them).
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from feed.embedded_redis import EmbeddedRedis  # noqa: E402
from feed.ingest import Ingest  # noqa: E402
from feed.models import Delta  # noqa: E402
from feed.settings import Settings  # noqa: E402
from feed.sources.spec import parse_source_spec  # noqa: E402
from feed.sources.sse import run_push_sse_source  # noqa: E402
from feed.sources.push import PushClient  # noqa: E402
from feed.sources.ws import run_push_ws_source  # noqa: E402
from feed.store import Store  # noqa: E402

__all__ = ["bench_push_sse", "bench_push_ws"]

API_KEY = "bench-push-key"
_RUNNERS = {"push-ws": (run_push_ws_source, "ws"), "push-sse": (run_push_sse_source, "sse")}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Simulator:
    """The push simulator in a child process (so it runs on the other core)."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _start_simulator(*, events: int, rate_per_s: float, odds_per_message: int) -> _Simulator:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feed.simulator.push_providers", "--port", "0", "--api-key", API_KEY,
        "--events", str(events), "--rate", str(rate_per_s), "--seed", "1", "--time-scale", "60", "--tick-ms", "5",
        "--ping-interval-ms", "5000", "--odds-per-message", str(odds_per_message),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("push simulator did not start") from None
    if not line.startswith(b"push simulator on "):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"push simulator did not start: {line!r}")
    return _Simulator(proc, int(line.rsplit(b":", 1)[1]))


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


async def _bench(kind: str, *, duration_s: float, rate_per_s: float, events: int, odds_per_message: int,
                 redis_url: str | None, warmup_s: float) -> dict[str, Any]:
    runner, transport = _RUNNERS[kind]
    with tempfile.TemporaryDirectory(prefix="oddsfeed-bench-") as tmp:
        redis = None
        if redis_url is None:
            redis = EmbeddedRedis(tmp, appendonly=False)
            redis.start()
            redis_url = redis.url
        store = await Store.open(redis_url)
        sim = await _start_simulator(events=events, rate_per_s=rate_per_s, odds_per_message=odds_per_message)
        port = sim.port
        name = f"bench-{kind}-{port}"
        path = {"ws": "ws://127.0.0.1:%d/push/ws", "sse": "http://127.0.0.1:%d/push/sse"}[transport] % port
        spec = parse_source_spec(f"{kind}={path},api_key={API_KEY},name={name}")
        lags: list[int] = []
        measuring = False
        got: dict[str, Any] = {}

        def on_client(client: PushClient, ingest: Ingest) -> None:
            got["client"], got["ingest"] = client, ingest
            flush = ingest.flush

            async def timed_flush() -> list[Delta]:
                deltas = await flush()
                if measuring:
                    t = _now_ms()
                    lags.extend(t - d.source_ts for d in deltas if d.kind == "delta")
                return deltas
            ingest.flush = timed_flush  # type: ignore[method-assign]

        task = asyncio.create_task(runner(store, Settings(), spec, on_client=on_client))
        try:
            deadline = time.monotonic() + 15
            while not ("client" in got and got["client"].health == ("UP", None)):
                if task.done():
                    task.result()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} consumer did not come up")
                await asyncio.sleep(0.05)
            await asyncio.sleep(warmup_s)
            ingest: Ingest = got["ingest"]
            client: PushClient = got["client"]
            m0, o0, e0 = ingest.stats.messages, ingest.stats.runner_changes, client.last_seq or 0
            measuring = True
            t0 = time.perf_counter()
            await asyncio.sleep(duration_s)
            measuring = False
            dt = time.perf_counter() - t0
            m1, o1, e1 = ingest.stats.messages, ingest.stats.runner_changes, client.last_seq or 0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await sim.stop()
            await store.close()
            if redis is not None:
                redis.stop()
    lags.sort()
    return {
        "transport": kind,
        "duration_s": round(dt, 2),
        "messages_per_s": round((m1 - m0) / dt),
        "sequenced_per_s": round((e1 - e0) / dt),
        "odds_per_s": round((o1 - o0) / dt),
        "deltas": len(lags),
        "lag_p50_ms": _percentile(lags, 0.50),
        "lag_p99_ms": _percentile(lags, 0.99),
        "lag_max_ms": float(lags[-1]) if lags else float("nan"),
        "rejected": ingest.stats.rejected,
    }


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
            f"p99 {r['lag_p99_ms']:.0f} ms  max {r['lag_max_ms']:.0f} ms  ({r['deltas']:,} deltas, {r['duration_s']} s)")


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
