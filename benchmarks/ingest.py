"""Ingest throughput: recorded Betfair streams → Redis at max speed, against
betfairlightweight parsing the same files in the same run.

Prints runner changes per second for

- ``oddsfeed``: the whole ingest path (normalise → book → batched atomic
  apply into a real embedded redis-server), wall clock and per CPU-second of
  this process (redis-server runs on the other core);
- ``oddsfeed normalise only``: BetfairNormaliser alone;
- ``betfairlightweight``: ``StreamListener(lightweight=True)`` fed the same
  lines (what most Python users run), caches updated and market books built.

Usage::

    python benchmarks/ingest.py [--data ../shared/data/betfair-stream] [--repeat 3] [--profile]

Targets (DESIGN §10, issue 11): ≥ 100k runner changes/s per core; ingest → Redis
≥ 2× betfairlightweight's parse of the same files per CPU-second (both
timed with ``time.process_time``; redis-server's own CPU is printed beside).
Prints each target with its figure and met / not met, the machine's load
before and after, and writes ``docs/bench/ingest-rate.png`` (runner
changes/s per path, best of the repeats; ``--png-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from feed.embedded_redis import EmbeddedRedis  # noqa: E402
from feed.validate import MAX_TIME_MS  # noqa: E402
from feed.errors import FeedDecodeError  # noqa: E402
from feed.ingest import Ingest, tune_gc  # noqa: E402
from feed.normalise.betfair import BetfairNormaliser  # noqa: E402
from feed.sources.replay import Replay, read_messages, recording_files  # noqa: E402
from feed.store import Store  # noqa: E402
from benchmarks import plots  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "betfair-stream"


def load(data: Path) -> list[list[bytes]]:
    files = [read_messages(f) for f in recording_files([data])]
    return [f for f in files if f]


def bench_normalise(recordings: list[list[bytes]]) -> tuple[int, float]:
    rc = 0
    t0 = time.process_time()
    for lines in recordings:
        n = BetfairNormaliser("bench")
        for raw in lines:
            try:
                rc += n.feed(raw, MAX_TIME_MS).runner_changes
            except FeedDecodeError:
                pass
    return rc, time.process_time() - t0


def bench_bflw(recordings: list[list[bytes]]) -> tuple[int, float]:
    from betfairlightweight.streaming import StreamListener

    logging.getLogger("betfairlightweight").setLevel(logging.CRITICAL)
    class Sink:
        """Stands in for the output queue: counts the market books built."""

        books = 0

        def put(self, output: list) -> None:
            Sink.books += len(output)

    texts = [[raw.decode() for raw in lines] for lines in recordings]
    t0 = time.process_time()
    for lines in texts:
        listener = StreamListener(output_queue=Sink(), max_latency=None, lightweight=True, update_clk=False)  # type: ignore[arg-type]
        listener.register_stream(0, "marketSubscription")
        for line in lines:
            try:
                listener.on_data(line)
            except Exception:  # betfairlightweight raises on lines without pt etc.
                pass
    return Sink.books, time.process_time() - t0


async def bench_oddsfeed(paths: list[Path], url: str, profile: bool) -> tuple[int, float, float, str]:
    store = await Store.open(url)
    await store.redis.flushall()
    await store.ensure_epoch()
    ingest = Ingest(store, source="bench")
    replay = Replay(paths, ingest, speed=None)
    # read and decompress outside the timed part (both contenders get lines in memory)
    cached = {p: read_messages(p) for p in replay.files}
    import feed.sources.replay as replay_mod

    original = replay_mod.read_messages
    replay_mod.read_messages = lambda p: cached[p]  # type: ignore[assignment]
    prof = cProfile.Profile() if profile else None
    try:
        c0 = time.process_time()
        if prof:
            prof.enable()
        summary = await replay.run()
        if prof:
            prof.disable()
        cpu = time.process_time() - c0
    finally:
        replay_mod.read_messages = original
        await store.close()
    text = ""
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(20)
        text = buf.getvalue()
    return summary.runner_changes, summary.elapsed_s, cpu, text


def redis_cpu_s(server: EmbeddedRedis) -> float:
    import psutil

    if server.process is None:
        return float("nan")
    t = psutil.Process(server.process.pid).cpu_times()
    return float(t.user + t.system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print where the ingest time goes")
    parser.add_argument("--png-dir", type=Path, default=None, help="where ingest-rate.png goes (default docs/bench/)")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no recordings at {args.data} (needs ../shared/data)", file=sys.stderr)
        return 2
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be 1..10")
    logging.basicConfig(level=logging.ERROR)
    load_before = os.getloadavg()
    print(plots.header("ingest benchmark"), flush=True)
    recordings = load(args.data)
    paths = [args.data]
    tune_gc()
    results: dict[str, list[float]] = {"oddsfeed": [], "oddsfeed_cpu": [], "normalise": [], "bflw": [], "redis_cpu": []}
    rc_total = 0
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, appendonly=True) as server:
        for i in range(args.repeat):
            r0 = redis_cpu_s(server)
            rc, wall, cpu, prof = asyncio.run(bench_oddsfeed(paths, server.url, args.profile and i == 0))
            results["redis_cpu"].append((redis_cpu_s(server) - r0) / wall)
            rc_total = rc
            results["oddsfeed"].append(rc / wall)
            results["oddsfeed_cpu"].append(rc / cpu)
            if prof:
                print(prof)
            rc_n, t_n = bench_normalise(recordings)
            results["normalise"].append(rc_n / t_n)
            _, t_b = bench_bflw(recordings)
            results["bflw"].append(rc_n / t_b)
    load_after = os.getloadavg()
    best = {k: max(v) for k, v in results.items()}
    print(f"recordings: {len(recordings)} files, {sum(map(len, recordings)):,} messages, {rc_total:,} runner changes; "
          f"best of {args.repeat}")
    print(f"  oddsfeed ingest → redis (wall):        {best['oddsfeed']:>10,.0f} runner changes/s "
          f"(redis-server meanwhile: {min(results['redis_cpu']) * 100:.0f}–{max(results['redis_cpu']) * 100:.0f}% "
          "of a core)")
    print(f"  oddsfeed ingest → redis (per CPU-s):   {best['oddsfeed_cpu']:>10,.0f} runner changes/s")
    print(f"  oddsfeed normalise only (per CPU-s):   {best['normalise']:>10,.0f} runner changes/s")
    print(f"  betfairlightweight (per CPU-s):        {best['bflw']:>10,.0f} runner changes/s  (lightweight=True)")
    ratio = best["oddsfeed_cpu"] / best["bflw"]
    print("\n=== targets (figure, target, met / not met; betfairlightweight in the same run) ===")
    print(f"  [{'met' if ratio >= 2 else 'NOT MET'}] ingest → Redis ≥ 2× betfairlightweight per CPU-second: "
          f"{ratio:.2f}× ({best['oddsfeed_cpu']:,.0f} vs {best['bflw']:,.0f}; the normaliser alone "
          f"{best['normalise'] / best['bflw']:.2f}×; wall clock {best['oddsfeed'] / best['bflw']:.2f}×)")
    print(f"  [{'met' if best['oddsfeed_cpu'] >= 100_000 else 'NOT MET'}] ≥ 100k runner changes/s per core: "
          f"{best['oddsfeed_cpu']:,.0f} per CPU-second of the ingest process, {best['oddsfeed']:,.0f} wall clock")
    print(f"\nmachine: {os.cpu_count()} CPUs; load average before {load_before[0]:.2f} / {load_before[1]:.2f} / "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (1/5/15 min)")
    if not args.no_png:
        plt = plots.pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        labels = ["ingest → Redis\n(wall)", "ingest → Redis\n(per CPU-s)", "normaliser\nalone", "betfair-\nlightweight"]
        values = [best["oddsfeed"] / 1000, best["oddsfeed_cpu"] / 1000, best["normalise"] / 1000, best["bflw"] / 1000]
        plots.bar_axes(ax, labels, values, f"ingest: {rc_total:,} runner changes from {len(recordings)} recordings, "
                       f"best of {args.repeat}", "thousand runner changes / s",
                       notes=["", f"{ratio:.2f}× bflw", f"{best['normalise'] / best['bflw']:.2f}× bflw", ""],
                       target=2 * best["bflw"] / 1000, target_label="target: 2× betfairlightweight")
        fig.suptitle(f"{os.cpu_count()} CPUs, load avg {load_before[0]:.2f} → {load_after[0]:.2f}", fontsize=8)
        path = plots.save(fig, "ingest-rate", args.png_dir)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
