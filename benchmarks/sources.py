"""Sources against the local simulators: messages/s and emit → stored lag, per kind.

One function per source kind returns a dict of figures; :data:`KINDS` maps
each kind to its function and ``main`` prints them as one table, with the
command line and the machine's load (``os.getloadavg``) before and after
and the 1-minute load at the end of each row's window. Kinds: the HTTP
pollers ``pinnacle`` and ``theoddsapi`` (here), the push consumers
``push-ws`` / ``push-sse`` (:mod:`benchmarks.sources_push`), and ``esa``,
``webhook``, ``uof`` (:mod:`benchmarks.sources_more`, which also holds the
shared harness).

Every kind runs the same way: an embedded redis-server (or ``--redis-url``),
the kind's simulator in a **child process** so it does not share this
process's core (for ``webhook`` the child is the pusher, the source being
the HTTP server here; for ``uof`` a private RabbitMQ node runs as well), and
the real source run by :func:`feed.pipeline.run_spec` from its ``--source``
spec here (source → normaliser → book → Redis). After the source is UP and
a warm-up, for ``--duration`` seconds:

- ``msgs/s``: payloads ingested per second (a poll answer, a push message,
  an ESA line, a webhook body, an AMQP message);
- ``odds/s``: selection changes stored per second; ``deltas``: deltas stored;
- ``lag p50/p99/max``: for every delta stored in the window, the wall clock
  when Redis acknowledged the apply minus the delta's ``source_ts`` (the
  simulator's change time: Pinnacle ``*UpdatedAt``, Odds API
  ``last_update``, push / webhook odd ``timestamp``, ESA ``pt``, UOF message
  ``timestamp``). Same host, same clock. For a poller this is dominated by
  the wait for the next poll (≈ interval / 2 on average, up to one
  interval), which is why the interval is printed;
- ``pipe p50/p99``: the pipeline's own ``pipeline.lag.percentiles()`` (what
  ``/v1/sources`` shows as ``lag_p50_ms`` / ``lag_p99_ms``) over the same
  window — a fresh ``LagWindow`` is put in at the start of the window — and
  ``neg``: its samples with a provider time ahead of the receive time (not
  in its percentiles). It is *received* − ``source_ts``, so below the stored
  figure by the normalise-and-store time;
- ``cpu`` / ``sim``: CPU used over the window by this process / the
  simulator's child process, % of one core; ``load``: 1-minute load average
  at the end of the window.

Rates: ``--rate`` model updates/s drives the pollers', push and ESA
simulators. ``webhook`` has ``--webhook-rate`` (default 500): one delivery is
one HTTP request and this pusher (httpx, one process) tops out at a few
hundred to ~1000 requests/s here, so at ``--rate`` the row measures the
pusher's queue, not the source (try ``--webhook-rate 3000``: the queue fills
and the notes count the shed messages). ``uof`` has ``--uof-rate`` (default
500): UOF message timestamps are strictly increasing ms, so near or above
1000 changes/s they run ahead of the clock and the lag means nothing.

A kind whose run fails prints ``failed: <error>`` (exit status 1) and the
others still run; ``uof`` prints ``skipped: <reason>`` when the AMQP/UOF
modules, aio-pika or ``rabbitmq-server`` are not there.

Writes ``docs/bench/sources-rate-lag.png`` (``--png-dir`` elsewhere,
``--no-png`` not at all): per kind, messages/s and lag p50 / p99 as bars.

Usage::

    python benchmarks/sources.py [--duration 5] [--interval 0.2] [--rate 3000] [--events 60]
        [--webhook-rate 500] [--webhook-senders 4] [--uof-rate 500] [--only KIND …]
        [--png-dir DIR] [--no-png]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks.sources_more import (  # noqa: E402
        KINDS_MORE,
        READY_TIMEOUT_S,
        child,
        redis_store,
        running,
    )
except ImportError:
    from sources_more import KINDS_MORE, READY_TIMEOUT_S, child, redis_store, running  # type: ignore[no-redef]  # noqa: E402
try:
    from benchmarks import plots  # noqa: E402
except ImportError:
    import plots  # type: ignore[no-redef]  # noqa: E402

__all__ = ["KINDS", "bench_pinnacle", "bench_theoddsapi", "format_row", "main"]

_CHILD = """
from feed.simulator.http_providers import ProvidersConfig, run_http_providers

async def main(stop):
    cfg = ProvidersConfig(events={events}, rate_per_s={rate}, seed=7, time_scale=60.0, tick_ms=20)
    task = asyncio.create_task(run_http_providers(cfg, ready=lambda sim: print(sim.port, flush=True)))
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return {{}}

run(main)
"""


async def _bench_poller(kind: str, spec_text: Callable[[int], str], *, duration_s: float, rate_per_s: float,
                        events: int, redis_url: str | None, warmup_s: float, interval_s: float) -> dict[str, Any]:
    child_max_s = duration_s + warmup_s + 2 * READY_TIMEOUT_S
    async with redis_store(redis_url) as store, \
            child(_CHILD.format(events=events, rate=rate_per_s), max_s=child_max_s, what="HTTP providers") as sim:
        async with running(kind, store, spec_text(int(sim.first_line))) as run:
            await run.until(run.up, "UP")
            r = await run.measure(duration_s=duration_s, warmup_s=warmup_s, sim_pid=sim.proc.pid)
            requests = run.source.http.stats["requests"]
    r["notes"] = f"poll every {interval_s:g} s, {requests} requests"
    return r


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
                                                   **_push_kinds(), **KINDS_MORE}

_HEADER = (f"{'kind':<10} {'msgs/s':>8} {'odds/s':>7} {'deltas':>7} {'lag p50':>8} {'p99':>7} {'max':>7} "
           f"{'pipe p50':>8} {'p99':>7} {'neg':>5} {'rej':>4} {'cpu':>4} {'sim':>4} {'load':>5}  notes")


def _ms(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{v:.0f}ms"


def format_row(r: dict[str, Any]) -> str:
    """One line of the table (a ``skipped`` / ``failed`` row says why)."""
    kind = r["transport"]
    if "skipped" in r:
        return f"{kind:<10} skipped: {r['skipped']}"
    if "failed" in r:
        return f"{kind:<10} failed: {r['failed']}"

    def pct(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.0f}%"
    return (f"{kind:<10} {r['messages_per_s']:>8,} {r['odds_per_s']:>7,} {r['deltas']:>7,} "
            f"{_ms(r['lag_p50_ms']):>8} {_ms(r['lag_p99_ms']):>7} {_ms(r['lag_max_ms']):>7} "
            f"{_ms(r.get('pipe_p50_ms')):>8} {_ms(r.get('pipe_p99_ms')):>7} {r.get('pipe_negative', 0):>5} "
            f"{r.get('rejected', 0):>4} {pct(r.get('cpu_pct')):>4} {pct(r.get('sim_cpu_pct')):>4} "
            f"{r.get('load1', float('nan')):>5.2f}  {r.get('notes', '')}")


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(*os.getloadavg())


def write_png(rows: list[dict[str, Any]], args: argparse.Namespace, load0: tuple[float, ...],
              load1: tuple[float, ...]) -> Path:
    """Two panels, a bar per kind measured: messages/s, and lag p50 / p99 (ms, log)."""
    plt = plots.pyplot()
    done = [r for r in rows if "skipped" not in r and "failed" not in r]
    missing = [f"{r['transport']} ({'skipped' if 'skipped' in r else 'failed'})" for r in rows if r not in done]
    labels = [r["transport"] for r in done]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    plots.bar_axes(ax1, labels, [float(r["messages_per_s"]) for r in done],
                   "payloads ingested per second", "messages / s",
                   notes=[f"{r['odds_per_s']:,}\nodds/s" for r in done])
    ax1.set_yscale("log")
    ax1.set_ylabel("messages / s (log)")

    def ms(v: Any) -> float:
        return float("nan") if v is None or v != v else max(float(v), 0.5)
    x = range(len(done))
    w = 0.38
    p50 = [ms(r["lag_p50_ms"]) for r in done]
    p99 = [ms(r["lag_p99_ms"]) for r in done]
    b50 = ax2.bar([i - w / 2 for i in x], p50, w, color="C0", label="lag p50")
    b99 = ax2.bar([i + w / 2 for i in x], p99, w, color="C3", label="lag p99")
    for bars, vals in ((b50, p50), (b99, p99)):
        for b, v in zip(bars, vals):
            if v == v:
                ax2.annotate(f"{v:.0f}" if v >= 1 else "<1", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                             va="bottom", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xticks(list(x), labels, fontsize=8, rotation=15)
    ax2.set_ylabel("ms (log)")
    ax2.set_title("lag: Redis apply acknowledged − provider change time", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.margins(y=0.2)
    sub = (f"{args.rate:g} model updates/s (webhook {args.webhook_rate:g}, uof {args.uof_rate:g}), {args.events} "
           f"events, {args.duration:g} s per kind, pollers every {args.interval:g} s")
    if missing:
        sub += "; not measured: " + ", ".join(missing)
    fig.suptitle(f"sources vs the local simulators: {sub}\n{os.cpu_count()} CPUs, load avg {load0[0]:.2f} → "
                 f"{load1[0]:.2f}", fontsize=8)
    return plots.save(fig, "sources-rate-lag", args.png_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per kind (default 5)")
    p.add_argument("--interval", type=float, default=0.2, help="poll interval of the pollers, s (default 0.2)")
    p.add_argument("--rate", type=float, default=3000.0, help="model updates per second (default 3000)")
    p.add_argument("--events", type=int, default=60, help="synthetic events (default 60)")
    p.add_argument("--webhook-rate", type=float, default=500.0,
                   help="model updates per second of the webhook pusher (default 500; see the docstring)")
    p.add_argument("--webhook-senders", type=int, default=4, help="concurrent webhook senders (default 4)")
    p.add_argument("--uof-rate", type=float, default=500.0,
                   help="changes per second of the UOF simulator (default 500; see the docstring)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    p.add_argument("--only", nargs="+", choices=sorted(KINDS), default=None, help="kinds to run (default all)")
    p.add_argument("--png-dir", type=Path, default=None, help="where sources-rate-lag.png goes (default docs/bench/)")
    p.add_argument("--no-png", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cmd = [Path(sys.executable).name, *sys.argv] if argv is None else ["benchmarks/sources.py", *argv]
    print(f"command: {shlex.join(cmd)}", flush=True)
    print(f"host: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; at start: {_load()}", flush=True)
    print(f"sources vs the local simulators: {args.rate:g} model updates/s (webhook {args.webhook_rate:g}, "
          f"uof {args.uof_rate:g}), {args.events} events, {args.duration:g} s measured per kind; "
          f"lag = Redis apply acknowledged − provider change time; pipe = pipeline.lag (received − provider time)",
          flush=True)
    print(_HEADER, flush=True)
    load0 = os.getloadavg()
    rows: list[dict[str, Any]] = []
    failed = False
    for kind in args.only or list(KINDS):
        opts: dict[str, Any] = {"duration_s": args.duration, "rate_per_s": args.rate, "events": args.events,
                                "redis_url": args.redis_url}
        if kind in ("pinnacle", "theoddsapi"):
            opts["interval_s"] = args.interval
        elif kind == "webhook":
            opts.update(rate_per_s=args.webhook_rate, senders=args.webhook_senders)
        elif kind == "uof":
            opts["rate_per_s"] = args.uof_rate
        try:
            row = KINDS[kind](**opts)
        except KeyboardInterrupt:
            print(f"{kind:<10} interrupted", flush=True)
            return 130
        except Exception as exc:  # noqa: BLE001 - one kind failing must not hide the others
            failed = True
            row = {"transport": kind, "failed": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        print(format_row(row), flush=True)
        rows.append(row)
    print(f"at end: {_load()}", flush=True)
    if not args.no_png and rows:
        print(f"wrote {write_png(rows, args, load0, os.getloadavg())}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
