"""Reader benchmark: what an API node pays to follow the delta log, before/after a change.

One embedded redis-server (unix socket), a writer process and a node process, all on this
machine:

- **Writer (open loop).** Tick ``i`` is due at ``t0 + i/R`` s; each tick is one
  ``Store.apply`` (the ingest's batched Lua apply, through ``feed.book.Book``) holding
  ``--deltas`` price changes in every partition, i.e. one log entry per partition per tick:
  ``R × P`` entries/s in all. Pinned to CPU 1 with redis-server.
- **Node.** ``streaming.reader.Node`` as an API process runs it (uvloop, ``tune_gc``), with no
  subscribers and no HTTP server, pinned to CPU 0: what it does is read, decode, apply, prepare
  each entry for the hub (its ``dispatch`` with nobody to send to). After a warm-up the window
  measures its process CPU time (``time.process_time``) and, from redis-server's
  ``INFO commandstats``, how many XREADs and guard reads (``XRANGE``) it made.
- **Before/after.** ``--before REV`` (default ``HEAD``) runs the node with
  ``streaming/reader.py`` as it is at that commit (``git show REV:streaming/reader.py`` into a
  temporary file, loaded beside the current modules); the current file is "after". Runs
  alternate before/after ``--rounds`` times so drift in the machine's load hits both.

Prints one line per run and a summary (median over rounds): node CPU µs per entry and per
read, reads per s, guard reads per s, and the machine's load average before/after. Never
asserts on timings.

Usage::

    python benchmarks/reader.py                                   # 4 partitions × 250 entries/s, 2 rounds
    python benchmarks/reader.py --partitions 8 --rate 250 --deltas 4 --seconds 20 --rounds 3
    python benchmarks/reader.py --before 0123abc                  # another baseline commit
    python benchmarks/reader.py --compare push --nodes 4          # the pushed log off/on, 4 API nodes

``--nodes N`` runs N node processes (all on CPU 0) following the same log; redis-server's own
CPU (``INFO cpu``) over the window is printed per entry written.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODE_CPU = 0
LOAD_CPU = 1


def _pin(cpu: int, pid: int = 0) -> None:
    try:
        if cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(pid, {cpu})
    except (AttributeError, OSError):  # not Linux, or not allowed: run unpinned
        pass


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of `oddsfeed serve`
        return asyncio.run(coro)
    return uvloop.run(coro)


def _markets(partitions: int, per_partition: int) -> list[list[str]]:
    from feed.store import partition_of

    out: list[list[str]] = [[] for _ in range(partitions)]
    i = 0
    while min(len(m) for m in out) < per_partition:
        mid = f"1.{200_000_000 + i}"
        p = partition_of(mid, partitions)
        if len(out[p]) < per_partition:
            out[p].append(mid)
        i += 1
    return out


# -- writer process ----------------------------------------------------------------------------


async def writer(args: argparse.Namespace) -> dict[str, Any]:
    from feed.book import Book
    from feed.models import MarketHeader, Selection
    from feed.normalise.base import MarketUpdate
    from feed.store import Store

    store = await Store.open(args.redis_url, partitions=args.partitions, log_maxlen=200_000,
                             push=bool(args.log_push))
    book = Book()
    parts = _markets(args.partitions, args.deltas)
    now = time.time_ns() // 1_000_000
    header = MarketHeader(sport="soccer", event_id="e1", event_name="Event e1", competition="c1", in_play=True,
                          status="OPEN", market_type="MATCH_ODDS")
    images = []
    for mids in parts:
        for mid in mids:
            images.append(MarketUpdate(market_id=mid, source="bench", image=True, header=header, selections=[
                Selection(selection_id=str(k), name=f"sel {k}", price=2.0 + k, back=[(2.0 + k, 10.0)])
                for k in range(3)], source_ts=now, received_at=now + 1))
    deltas = [d for u in images if (d := book.apply(u, now + 2, None)) is not None]
    await store.apply(deltas, book.markets)
    t0 = time.monotonic()
    i = entries = behind_max = 0
    try:
        while time.monotonic() - t0 < args.seconds:
            due = t0 + i / args.rate
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                behind_max = max(behind_max, int(-wait * 1000))
            now = time.time_ns() // 1_000_000
            batch = []
            for mids in parts:
                for j, mid in enumerate(mids):
                    price = 1.5 + ((i + j) % 200) / 100
                    u = MarketUpdate(market_id=mid, source="bench", image=False, header=None, selections=[
                        Selection(selection_id=str(i % 3), name=f"sel {i % 3}", price=price, back=[(price, 10.0)])],
                        source_ts=now, received_at=now + 1)
                    d = book.apply(u, now + 1, None)
                    if d is not None:
                        batch.append(d)
            res = await store.apply(batch, book.markets)
            entries += len(res.entries)
            i += 1
    finally:
        await store.close()
    return {"ticks": i, "entries": entries, "behind_max_ms": behind_max}


def cmd_writer(args: argparse.Namespace) -> None:
    _pin(LOAD_CPU)
    print(json.dumps(_run(writer(args))), flush=True)


# -- node process ------------------------------------------------------------------------------


def _load_reader(path: str | None) -> ModuleType:
    if not path:
        import streaming.reader

        return streaming.reader
    spec = importlib.util.spec_from_file_location("streaming._reader_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


async def _redis_cpu(r: Any) -> float:
    """redis-server's CPU seconds so far (user + system, ``INFO cpu``)."""
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _commandstats(r: Any) -> dict[str, int]:
    info = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def node(args: argparse.Namespace) -> dict[str, Any]:
    from feed.settings import Settings
    from feed.store import Store
    from streaming.state import NodeOptions

    mod = _load_reader(args.reader_file)
    store = await Store.open(args.redis_url, partitions=args.partitions, log_maxlen=200_000)
    stats = await Store.open(args.redis_url, partitions=args.partitions)  # INFO on a connection of its own
    n = mod.Node(Settings(partitions=args.partitions, log_push=bool(args.log_push)), store, options=NodeOptions(),
                 owns_store=True)
    await n.start()
    try:
        print("ready", flush=True)  # the parent starts the writer now
        await asyncio.sleep(args.warmup)
        e0 = sum(r.entries for r in n.readers)
        gc_s, gc_runs = _gc_meter()
        c0, w0, s0 = time.process_time(), time.monotonic(), await _commandstats(stats.redis)
        r0 = await _redis_cpu(stats.redis)
        await asyncio.sleep(args.seconds)
        cpu, wall, s1 = time.process_time() - c0, time.monotonic() - w0, await _commandstats(stats.redis)
        redis_cpu = await _redis_cpu(stats.redis) - r0
        gc.callbacks.clear()
        entries = sum(r.entries for r in n.readers) - e0
        errors = sum(r.errors for r in n.readers)
        reloads = n.reloads
    finally:
        await n.stop()
        await stats.close()
    calls = {k: s1.get(k, 0) - s0.get(k, 0) for k in ("xread", "xrange", "get")}
    return {"cpu_s": cpu, "wall_s": wall, "entries": entries, "errors": errors, "reloads": reloads,
            "redis_cpu_s": redis_cpu, "pushed": sum(getattr(r, "pushed", 0) for r in n.readers),
            "xread": calls["xread"], "xrange": calls["xrange"], "get": calls["get"],
            "gc_s": gc_s[0], "gc_runs": gc_runs}


def _gc_meter() -> tuple[list[float], list[int]]:
    """From now: time spent in the cyclic GC (s, in a one-item list) and collections per generation."""
    spent, runs = [0.0], [0, 0, 0]
    started: list[float] = []

    def cb(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            spent[0] += time.perf_counter() - started.pop()
            runs[info["generation"]] += 1
    gc.callbacks.append(cb)
    return spent, runs


def cmd_node(args: argparse.Namespace) -> None:
    _pin(NODE_CPU)
    print(json.dumps(_run(node(args))), flush=True)


# -- driver ------------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, label: str, reader_file: str | None, log_push: bool = True) -> dict[str, Any]:
    common = ["--redis-url", args.redis_url, "--partitions", str(args.partitions), "--log-push", str(int(log_push))]
    node_cmd = [sys.executable, __file__, "node", *common, "--seconds", str(args.seconds),
                "--warmup", str(args.warmup)]
    if reader_file:
        node_cmd += ["--reader-file", reader_file]
    subprocess.run([sys.executable, "-c", "import redis; redis.Redis.from_url(" + repr(args.redis_url)
                    + ").flushall()"], check=True)
    nprocs = [subprocess.Popen(node_cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(args.nodes)]
    for nproc in nprocs:
        assert nproc.stdout is not None
        # each node loads an empty store, then the writer starts (its images are the first entries)
        line = nproc.stdout.readline().strip()
        if line != "ready":
            for q in nprocs:
                q.kill()
            raise RuntimeError(f"node did not start: {line!r}")
    wproc = subprocess.Popen([sys.executable, __file__, "writer", *common, "--rate", str(args.rate),
                              "--deltas", str(args.deltas), "--seconds", str(args.seconds + args.warmup + 1)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    outs = [nproc.communicate(timeout=args.seconds + args.warmup + 60)[0] for nproc in nprocs]
    wout, _ = wproc.communicate(timeout=60)
    nodes = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    nout = outs[0]
    res = json.loads(nout.strip().splitlines()[-1])
    res["writer"] = json.loads(wout.strip().splitlines()[-1])
    res["label"] = label
    e = max(1, res["entries"])
    res["nodes"] = len(nodes)
    res["node_us_per_entry_all"] = [n["cpu_s"] / max(1, n["entries"]) * 1e6 for n in nodes]
    res["redis_us_per_entry"] = res["redis_cpu_s"] / e * 1e6  # every node reads every entry: per entry written
    res["redis_cpu_pct"] = 100 * res["redis_cpu_s"] / res["wall_s"]
    res["us_per_entry"] = res["cpu_s"] / e * 1e6
    res["us_per_read"] = res["cpu_s"] / max(1, res["xread"]) * 1e6
    res["cpu_pct"] = 100 * res["cpu_s"] / res["wall_s"]
    res["reads_per_s"] = res["xread"] / res["wall_s"]
    res["guards_per_s"] = res["xrange"] / res["wall_s"]
    res["entries_per_read"] = res["entries"] / max(1, res["xread"])
    print(f"  {label:6s} entries {res['entries']:7d} ({res['entries'] / res['wall_s']:7.0f}/s)  "
          f"XREAD {res['reads_per_s']:7.0f}/s ({res['entries_per_read']:.2f} entries/read)  "
          f"guard reads {res['guards_per_s']:6.1f}/s  node CPU {res['cpu_pct']:5.1f} %  "
          f"{res['us_per_entry']:6.1f} µs/entry  {res['us_per_read']:6.1f} µs/read  "
          f"errors {res['errors']} reloads {res['reloads']}  writer behind ≤ {res['writer']['behind_max_ms']} ms",
          flush=True)
    print(f"         redis-server CPU {res['redis_cpu_pct']:5.1f} % = {res['redis_us_per_entry']:6.1f} µs per entry "
          f"written ({res['nodes']} node(s)); entries from pushes {res['pushed']}; node CPU per entry, each node: "
          + " / ".join(f"{x:.1f}" for x in res["node_us_per_entry_all"]) + " µs", flush=True)
    if "gc_s" in res:
        print(f"         cyclic GC: {res['gc_s'] / e * 1e6:5.1f} µs/entry ({100 * res['gc_s'] / max(res['cpu_s'], 1e-9):.0f} % "
              f"of the node's CPU), collections gen0/1/2 {res['gc_runs'][0]}/{res['gc_runs'][1]}/{res['gc_runs'][2]}",
              flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    for name in ("writer", "node"):
        sp = sub.add_parser(name)
        sp.add_argument("--redis-url", required=True)
        sp.add_argument("--partitions", type=int, default=4)
        sp.add_argument("--seconds", type=float, default=10.0)
        sp.add_argument("--rate", type=float, default=250.0)
        sp.add_argument("--deltas", type=int, default=2)
        sp.add_argument("--warmup", type=float, default=2.0)
        sp.add_argument("--reader-file", default=None)
        sp.add_argument("--log-push", type=int, default=1)
    p.add_argument("--partitions", type=int, default=4, help="partitions (one reader each); default 4")
    p.add_argument("--rate", type=float, default=250.0,
                   help="writer ticks per second = log entries per second per partition; default 250")
    p.add_argument("--deltas", type=int, default=2, help="deltas per log entry; default 2")
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per run, s; default 10")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up before the window, s; default 2")
    p.add_argument("--rounds", type=int, default=2, help="before/after pairs; default 2")
    p.add_argument("--before", default="HEAD", help="commit whose streaming/reader.py is 'before'; default HEAD")
    p.add_argument("--redis-url", default=None, help="an existing Redis (flushed!); default: an embedded one")
    p.add_argument("--nodes", type=int, default=1, help="API node processes following the log; default 1")
    p.add_argument("--compare", choices=["reader", "push"], default="reader",
                   help="reader: --before's streaming/reader.py against the working tree (default); push: the "
                        "working tree with the pushed log off (XREAD alone) against on (ODDSFEED_LOG_PUSH)")
    args = p.parse_args()
    if args.cmd == "writer":
        cmd_writer(args)
        return 0
    if args.cmd == "node":
        cmd_node(args)
        return 0

    before_src = subprocess.run(["git", "show", f"{args.before}:streaming/reader.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    tmp = tempfile.TemporaryDirectory(prefix="reader-bench-")
    before_file = os.path.join(tmp.name, "reader_before.py")
    Path(before_file).write_text(before_src)
    server = None
    if args.redis_url is None:
        from feed.embedded_redis import EmbeddedRedis

        server = EmbeddedRedis(Path(tmp.name) / "redis", appendonly=False)
        args.redis_url = server.start()
        if server.process is not None:
            _pin(LOAD_CPU, server.process.pid)
    load0 = os.getloadavg()
    print(f"command: {' '.join(sys.argv)}; before = {args.before}:streaming/reader.py, after = working tree; "
          f"{args.partitions} partitions × {args.rate:g} entries/s × {args.deltas} deltas/entry; "
          f"{os.cpu_count()} CPUs; load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            if args.compare == "push":
                runs.append(one_run(args, "before", None, log_push=False))
                runs.append(one_run(args, "after", None, log_push=True))
            else:
                runs.append(one_run(args, "before", before_file))
                runs.append(one_run(args, "after", None))
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    summary = {}
    for label in ("before", "after"):
        rs = [r for r in runs if r["label"] == label]
        summary[label] = {k: statistics.median(r[k] for r in rs)
                          for k in ("us_per_entry", "us_per_read", "cpu_pct", "reads_per_s", "guards_per_s",
                                    "entries_per_read", "redis_us_per_entry", "redis_cpu_pct")}
        s = summary[label]
        print(f"{label:6s} (median of {len(rs)}): {s['us_per_entry']:.1f} µs node CPU per entry, "
              f"{s['us_per_read']:.1f} µs per read, node CPU {s['cpu_pct']:.1f} % of a core, "
              f"{s['reads_per_s']:.0f} reads/s ({s['entries_per_read']:.2f} entries/read), "
              f"{s['guards_per_s']:.1f} guard reads/s; redis-server {s['redis_us_per_entry']:.1f} µs per entry "
              f"written ({s['redis_cpu_pct']:.1f} % of a core)")
    b, a = summary["before"], summary["after"]
    print(f"after/before: node CPU per entry × {a['us_per_entry'] / b['us_per_entry']:.2f}, "
          f"redis-server CPU per entry × {a['redis_us_per_entry'] / max(1e-9, b['redis_us_per_entry']):.2f}, "
          f"guard reads per s × {a['guards_per_s'] / max(1e-9, b['guards_per_s']):.3f}"
          + ("  (before = pushed log off, after = on)" if args.compare == "push" else ""))
    return 1 if any(r["errors"] or r["reloads"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
