"""Dispatch benchmark: the hub's CPU per delivered frame, this tree against another commit.

In one process, no sockets: a node state with E events × 2 markets, C subscriptions
(half SSE, half WebSocket frames; each on one event, as in the fan-out benchmark's
lag shape) on connections whose socket is a null sink, and N one-delta log entries
(price changes round the markets). Times ``Hub.dispatch`` alone
(``time.perf_counter`` around each call; the outboxes are drained every 50 entries,
outside the timing). ``--before REV`` runs the same in a child process on
``git archive REV`` (its ``streaming``/``feed`` packages) so both trees are measured
on the same machine, alternately, ``--rounds`` times.

Usage::

    python benchmarks/dispatch.py                       # this tree vs HEAD~1, 3 rounds
    python benchmarks/dispatch.py --before c96b4bb --subs 1000 --events 100 --entries 4000

Prints µs per entry and per delivered frame for each run and the median; never
asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class NullSink:
    """A socket that takes every write (the hub's Sink protocol)."""

    def write(self, frames: list[bytes], nbytes: int) -> None:
        pass

    def finish(self, conn: Any) -> None:
        pass

    def last_words(self, conn: Any, frames: list[bytes]) -> None:
        pass

    def drained(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def measure(subs: int, events: int, entries: int) -> dict[str, float]:
    from feed.book import Book
    from feed.settings import Settings
    from streaming.hub import Hub
    from streaming.state import Filter, NodeOptions, NodeState
    from streaming.transport import SSE, WS_FRAMES

    sys.path.insert(0, str(ROOT / "tests"))
    from streaming_helpers import Feed  # the tests' update builder (images and price changes)

    feed = Feed(None)  # type: ignore[arg-type]

    def image(mid: str, event: str) -> Any:
        return feed.image(mid, event=event)

    def price(mid: str, p: float) -> Any:
        return feed.price(mid, "1", p)

    st = NodeState(Settings(), 1, NodeOptions())
    book = Book()
    mids = [f"m{e}_{k}" for e in range(events) for k in range(2)]
    for e in range(events):
        for k in range(2):
            book.apply(image(f"m{e}_{k}", f"e{e}"))
    st.replace_partitions({0: ("1-0", list(book.markets.values()))}, "ep")
    hub = Hub(st, None, outbox_max_bytes=1 << 22)
    for i in range(subs):
        conn = hub.connect(SSE if i % 2 else WS_FRAMES, heartbeat_ms=600_000, sink=NullSink())  # type: ignore[arg-type]
        await hub.subscribe(conn, Filter.parse(event=f"e{i % events}"))
    deltas = []
    for j in range(entries):
        d = book.apply(price(mids[j % len(mids)], 2.0 + (j % 997) / 100))
        if d is not None:
            deltas.append(d)
    gc.collect()
    spent = 0.0
    frames = 0
    for j, d in enumerate(deltas):
        e = st.apply_entry(0, f"{j + 2}-0", [d], int(time.time() * 1000))
        t0 = time.perf_counter()
        hub.dispatch(e)
        spent += time.perf_counter() - t0
        if j % 50 == 49:
            for c in hub.connections:
                frames += len(c.take())
    for c in hub.connections:
        frames += len(c.take())
    hub.close_all()
    return {"us_per_entry": spent / len(deltas) * 1e6, "us_per_frame": spent / max(1, frames) * 1e6,
            "frames": frames, "entries": len(deltas)}


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(asyncio.run(measure(args.subs, args.events, args.entries))))


def _run(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_child", "--subs", str(args.subs),
                          "--events", str(args.events), "--entries", str(args.entries)],
                         env=env, cwd=tree, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="compare", choices=["compare", "_child"])
    p.add_argument("--before", default="HEAD~1", help="commit to compare with (default HEAD~1)")
    p.add_argument("--subs", type=int, default=1000)
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--entries", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.mode == "_child":
        _child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True)
        arc = Path(tmp) / "before.tar"
        arc.write_bytes(archive.stdout)
        with tarfile.open(arc) as t:
            t.extractall(before, filter="data")
        print(f"dispatch: {args.subs} subscriptions (half SSE, half WS) on {args.events} events × 2 markets, "
              f"{args.entries} one-delta entries; load {os.getloadavg()[0]:.2f}", flush=True)
        res: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for name, tree in (("before", before), ("after", ROOT)):
                fig = _run(tree, args)
                res[name].append(fig["us_per_frame"])
                print(f"  round {r + 1} {name:<6} ({args.before if name == 'before' else 'this tree'}): "
                      f"{fig['us_per_entry']:.1f} µs/entry, {fig['us_per_frame']:.2f} µs per delivered frame "
                      f"({fig['frames']:,} frames)", flush=True)
        b, a = statistics.median(res["before"]), statistics.median(res["after"])
        print(f"median µs of dispatch per delivered frame: before {b:.2f}, after {a:.2f} ({(a - b) / b:+.0%}); "
              f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
