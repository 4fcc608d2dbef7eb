"""Source kinds ``esa``, ``webhook`` and ``uof`` for ``benchmarks/sources.py``.

Each run is bounded and local (127.0.0.1 only): an embedded redis-server
(or ``redis_url``), the kind's simulator in a **child process** (so it does
not share this process's core), and the real source run by
:func:`feed.pipeline.run_spec` from a ``--source`` spec here (source →
normaliser → book → Redis). Once the source is UP and a warm-up has passed,
for ``duration_s`` seconds:

- ``messages_per_s``: payloads the pipeline ingested per second (an ESA
  line, a webhook body, an AMQP message — ``alive`` included);
- ``odds_per_s`` / ``deltas_per_s``: selection changes / deltas stored per second;
- ``lag_p50_ms`` / ``lag_p99_ms`` / ``lag_max_ms``: for every delta stored in
  the window, the wall clock when Redis acknowledged the write minus the
  delta's ``source_ts`` (the simulator's change time: ESA ``pt``, the push
  odd's ``timestamp``, the UOF message ``timestamp``). Same host, same clock;
- ``pipe_p50_ms`` / ``pipe_p99_ms``: the pipeline's own
  ``pipeline.lag.percentiles()`` — what ``/v1/sources`` shows as
  ``lag_p50_ms`` / ``lag_p99_ms`` — over the same window (a fresh
  :class:`~feed.sources.lag.LagWindow` is put in at the start of the
  measurement, for the pipeline and its health publisher alike, so warm-up
  samples do not count). It is *received* − ``source_ts``, so it is below
  the stored − ``source_ts`` figure by the normalise-and-store time.

Per kind:

- ``esa``: :class:`feed.simulator.Simulator` (synthetic model, ``rate_per_s``
  updates/s over ``events`` events, no conflation) in a child process; the
  spec is ``esa=127.0.0.1:PORT,app_key=sim-app-key,session=sim-session``.
- ``webhook``: the source listens here (``webhook=127.0.0.1:0,secret=…``);
  the child process runs :class:`feed.simulator.webhook_pusher.WebhookPusher`
  paced at ``rate_per_s`` model updates/s (one delivery per changed odd by
  default), with ``webhook_senders`` concurrent HTTP senders taking from a
  bounded queue (the source applies one delivery at a time anyway). When the
  source cannot keep up the queue fills, the pusher sheds the excess offered
  load (counted as ``shed``), and the lag shows the queueing — the notes give
  what was generated, acknowledged and shed.
- ``uof``: a private RabbitMQ node started with ``tests/rabbitmq.py``'s
  :class:`RabbitNode` (free ports, its own directories; stopped at the end),
  :class:`feed.simulator.uof.UofSimulator` (publishing UOF XML, serving the
  recovery API) in a child process, and ``feed.sources.amqp`` consuming.
  The broker (``beam.smp``) is a third busy process on the machine, so this
  row shares cores more than the others. When the AMQP/UOF modules, aio-pika
  or ``rabbitmq-server`` are missing, the row says ``skipped: <reason>``.

Every loop is bounded: waits for readiness have deadlines, the children stop
on SIGINT/SIGTERM and in any case after ``child_max_s`` seconds, and the
pusher also after a maximum count of messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["bench_esa", "bench_uof", "bench_webhook", "KINDS_MORE"]

READY_TIMEOUT_S = 30.0
WEBHOOK_SECRET = "bench-webhook-secret-0123456789"
UOF_TOKEN = "sim-uof-token"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def proc_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid`` (None: this one), from /proc."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_pct(before: float | None, after: float | None, dt: float) -> float:
    """CPU use between two :func:`proc_cpu_s` readings, % of one core (nan: unknown)."""
    if before is None or after is None or dt <= 0:
        return float("nan")
    return round(100 * (after - before) / dt)


def _pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    return float(values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))])


# -- children ------------------------------------------------------------------------------

#: run by every child: ``main(stop)`` until stop is set (SIGINT / SIGTERM) or ``max_s`` passes
_CHILD_PRELUDE = """
import asyncio, json, signal, sys, time
sys.path.insert(0, {root!r})
MAX_S = {max_s!r}

def run(main):
    async def wrapper():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, stop.set)
        loop.call_later(MAX_S, stop.set)
        out = await main(stop)
        print(json.dumps(out or {{}}), flush=True)
    asyncio.run(wrapper())
"""

_ESA_CHILD = """
from feed.simulator import Simulator, SimulatorConfig

async def main(stop):
    sim = Simulator(SimulatorConfig(events={events}, rate_per_s={rate}, seed=7, time_scale=60.0, tick_ms=10))
    await sim.start()
    print(sim.port, flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()
    return {{}}

run(main)
"""

_UOF_CHILD = """
from feed.simulator.uof import UofSimConfig, UofSimulator

async def main(stop):
    sim = UofSimulator(UofSimConfig(amqp_url={amqp_url!r}, token={token!r}, events={events}, rate_per_s={rate},
                                    seed=7, tick_ms=5, alive_interval_s=1.0, live_after_s=2.0))
    await sim.start()
    print(sim.port, flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()
    return {{"published": sim.published, "recoveries": len(sim.recovery_requests)}}

run(main)
"""

_WEBHOOK_CHILD = """
import httpx
from feed.simulator.webhook_pusher import PusherConfig, PushReport, WebhookPusher

RATE, SENDERS, MAX_MESSAGES, TICK_S = {rate!r}, {senders!r}, {max_messages!r}, 0.01

async def main(stop):
    pusher = WebhookPusher(PusherConfig(url={url!r}, secret={secret!r}, events={events}, seed=7, time_scale=60.0,
                                        rate_per_s=RATE, odds_per_message={odds_per_message}, timeout_s=5.0,
                                        max_attempts=3))
    report = PushReport()
    queue = asyncio.Queue(maxsize=max(100, int(RATE)))  # at most about a second of backlog
    counts = {{"generated": 0, "shed": 0, "offered_updates": 0}}
    initial = pusher.generate(0)  # the initial state of every market
    print(len(initial), flush=True)

    async def produce():
        for d in initial:
            if stop.is_set():
                return
            await queue.put(d)
            counts["generated"] += 1
        budget, last = 0.0, time.monotonic()
        while not stop.is_set() and counts["generated"] < MAX_MESSAGES:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            budget += RATE * (now - last)
            last = now
            k = int(budget)
            if k < 1:
                continue
            budget -= k
            counts["offered_updates"] += k
            for d in pusher.generate(1, updates_per_tick=k):
                if queue.full():  # the receiver is behind by a second: shed (a bounded provider queue)
                    counts["shed"] += 1
                    continue
                queue.put_nowait(d)
                counts["generated"] += 1
        stop.set()

    async def send(client):
        while not stop.is_set():
            try:
                d = await asyncio.wait_for(queue.get(), 0.2)
            except TimeoutError:
                continue
            report.messages += 1
            status, _ = await pusher.deliver(client, d, report)
            if 200 <= status < 300:
                report.acknowledged += 1
            else:
                report.failed += 1

    limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
    async with httpx.AsyncClient(limits=limits, timeout=5.0) as client:
        tasks = [asyncio.create_task(produce())] + [asyncio.create_task(send(client)) for _ in range(SENDERS)]
        await stop.wait()
        await asyncio.wait(tasks, timeout=10)
        for t in tasks:
            t.cancel()
    return {{**counts, "sent": report.messages, "acknowledged": report.acknowledged, "failed": report.failed,
             "retries": report.retries, "answers": {{str(k): v for k, v in report.answers.items()}}}}

run(main)
"""


class Child:
    """A simulator in a child process: ``first_line`` is what it printed once
    ready; :meth:`stop` (SIGINT, bounded waits, then SIGKILL) returns the JSON
    summary it prints on exit (``{}`` if none)."""

    def __init__(self, proc: asyncio.subprocess.Process, first_line: str) -> None:
        self.proc = proc
        self.first_line = first_line

    async def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            assert self.proc.stdout is not None
            rest = await asyncio.wait_for(self.proc.stdout.read(), 15)
            for line in reversed(rest.decode(errors="replace").splitlines()):
                if line.startswith("{"):
                    out = json.loads(line)
                    break
            await asyncio.wait_for(self.proc.wait(), 5)
        except (TimeoutError, ValueError):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
        return out


@contextlib.asynccontextmanager
async def child(code: str, *, max_s: float, what: str, env: dict[str, str] | None = None) -> AsyncIterator[Child]:
    """Run ``code`` (after :data:`_CHILD_PRELUDE`) in ``python -c``; yields once it printed its first line."""
    source = _CHILD_PRELUDE.format(root=str(ROOT), max_s=max_s) + code
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", source, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
    except TimeoutError:
        line = b""
    if not line.strip():
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        err = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what} did not start: {err[-1] if err else 'no output'}")
    # drain stderr in the background so a chatty child never blocks on a full pipe
    drain = asyncio.create_task(proc.stderr.read())
    c = Child(proc, line.decode().strip())
    try:
        yield c
    finally:
        if proc.returncode is None:
            await c.stop()
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await drain


# -- the harness ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def redis_store(redis_url: str | None) -> AsyncIterator[Any]:
    """A :class:`feed.store.Store` on an embedded redis-server (or ``redis_url``)."""
    from feed.embedded_redis import EmbeddedRedis
    from feed.store import Store

    with tempfile.TemporaryDirectory(prefix="oddsfeed-bench-") as tmp:
        redis = None
        if redis_url is None:
            redis = EmbeddedRedis(tmp, appendonly=False)
            redis.start()
            redis_url = redis.url
        try:
            store = await Store.open(redis_url)
            try:
                yield store
            finally:
                await store.close()
        finally:
            if redis is not None:
                redis.stop()


class Running:
    """A source run by :func:`feed.pipeline.run_spec` in a task, with the stored-lag probe."""

    def __init__(self, kind: str, task: asyncio.Task[None], source: Any, pipeline: Any) -> None:
        self.kind = kind
        self.task = task
        self.source = source
        self.pipeline = pipeline
        self.lags: list[int] = []
        self.measuring = False
        ingest = pipeline.ingest
        flush = ingest.flush

        async def timed_flush() -> Any:  # the pipeline calls ingest.flush() after feeding each delivery
            deltas = await flush()
            if self.measuring:
                t = _now_ms()
                self.lags.extend(t - d.source_ts for d in deltas if d.source_ts)  # as LagWindow.record_deltas
            return deltas
        ingest.flush = timed_flush

    async def until(self, ready: Callable[[], bool], what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.task.done():
                self.task.result()
                raise RuntimeError(f"{self.kind} source ended before {what}")
            if time.monotonic() > deadline:
                h = self.pipeline.ingest.health
                raise RuntimeError(f"{self.kind}: no {what} within {timeout_s:g} s (state {h.state}/{h.reason})")
            await asyncio.sleep(0.05)

    def up(self) -> bool:
        return bool(self.pipeline.ingest.health.state == "UP")

    async def measure(self, *, duration_s: float, warmup_s: float, sim_pid: int | None = None,
                      counters: dict[str, Callable[[], int]] | None = None) -> dict[str, Any]:
        """Warm up, then measure for ``duration_s`` (the figures of the module docstring;
        ``cpu_pct`` / ``sim_cpu_pct``: CPU used by this process / the simulator's
        process ``sim_pid`` over the window, % of one core; ``<name>_per_s``: how
        fast each of ``counters`` moved over the window)."""
        counters = counters or {}
        from feed.sources.lag import LagWindow

        pipeline = self.pipeline
        ingest = pipeline.ingest
        await asyncio.sleep(warmup_s)
        fresh = LagWindow(pipeline.lag.window_s)
        pipeline.lag = fresh
        if getattr(pipeline, "health", None) is not None:
            pipeline.health.lag = fresh
        s = ingest.stats
        m0, o0, d0 = s.messages, s.runner_changes, s.deltas
        k0 = {name: read() for name, read in counters.items()}
        c0, sc0 = proc_cpu_s(None), proc_cpu_s(sim_pid) if sim_pid else None
        self.measuring = True
        t0 = time.perf_counter()
        await asyncio.sleep(duration_s)
        self.measuring = False
        dt = time.perf_counter() - t0
        c1, sc1 = proc_cpu_s(None), proc_cpu_s(sim_pid) if sim_pid else None
        m1, o1, d1 = s.messages, s.runner_changes, s.deltas
        k1 = {name: read() for name, read in counters.items()}
        p50, p99 = pipeline.lag.percentiles()
        lags = sorted(self.lags)
        if self.task.done():
            self.task.result()
        return {
            "transport": self.kind,
            "duration_s": round(dt, 2),
            "messages_per_s": round((m1 - m0) / dt, 1 if m1 - m0 < 100 * dt else None),
            "odds_per_s": round((o1 - o0) / dt),
            "deltas_per_s": round((d1 - d0) / dt),
            "deltas": len(lags),
            "lag_p50_ms": _pct(lags, 0.50),
            "lag_p99_ms": _pct(lags, 0.99),
            "lag_max_ms": float(lags[-1]) if lags else float("nan"),
            "pipe_p50_ms": float("nan") if p50 is None else float(p50),
            "pipe_p99_ms": float("nan") if p99 is None else float(p99),
            "pipe_negative": pipeline.lag.negative,
            "rejected": s.rejected,
            "state": f"{ingest.health.state}" + (f"/{ingest.health.reason}" if ingest.health.reason else ""),
            "load1": round(os.getloadavg()[0], 2),
            "cpu_pct": cpu_pct(c0, c1, dt),
            "sim_cpu_pct": cpu_pct(sc0, sc1, dt),
            **{f"{name}_per_s": round((k1[name] - k0[name]) / dt) for name in counters},
        }


@contextlib.asynccontextmanager
async def running(kind: str, store: Any, spec_text: str) -> AsyncIterator[Running]:
    """Run the spec through :func:`feed.pipeline.run_spec`; cancel (bounded) at the end."""
    from feed.pipeline import run_spec
    from feed.settings import Settings
    from feed.sources.spec import parse_source_spec

    spec = parse_source_spec(spec_text)
    got: dict[str, Any] = {}
    task = asyncio.create_task(run_spec(store, Settings(), spec,
                                        on_source=lambda source, pipeline: got.update(s=source, p=pipeline)))
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "p" not in got:
            if task.done():
                task.result()
                raise RuntimeError(f"{kind} source ended before it started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} source did not start")
            await asyncio.sleep(0.01)
        yield Running(kind, task, got["s"], got["p"])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 15)


def _run(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- esa -----------------------------------------------------------------------------------


async def _esa(*, duration_s: float, rate_per_s: float, events: int, redis_url: str | None,
               warmup_s: float) -> dict[str, Any]:
    child_max_s = duration_s + warmup_s + 2 * READY_TIMEOUT_S
    async with redis_store(redis_url) as store, \
            child(_ESA_CHILD.format(events=events, rate=rate_per_s), max_s=child_max_s, what="ESA simulator") as sim:
        port = int(sim.first_line)
        async with running("esa", store, f"esa=127.0.0.1:{port},app_key=sim-app-key,session=sim-session") as run:
            await run.until(run.up, "UP")
            r = await run.measure(duration_s=duration_s, warmup_s=warmup_s, sim_pid=sim.proc.pid)
            client = getattr(run.source, "client", None)
            heartbeat = getattr(client, "heartbeat_ms", None)
    r["notes"] = f"model {rate_per_s:g} updates/s, no conflation" + (f", heartbeat {heartbeat} ms" if heartbeat else "")
    return r


def bench_esa(*, duration_s: float = 5.0, rate_per_s: float = 3000.0, events: int = 60, redis_url: str | None = None,
              warmup_s: float = 1.0) -> dict[str, Any]:
    """The ESA client (``esa=…``) vs :class:`feed.simulator.Simulator` in a child process."""
    return _run(_esa(duration_s=duration_s, rate_per_s=rate_per_s, events=events, redis_url=redis_url,
                     warmup_s=warmup_s))


# -- webhook -------------------------------------------------------------------------------


async def _webhook(*, duration_s: float, rate_per_s: float, events: int, redis_url: str | None, warmup_s: float,
                   senders: int, odds_per_message: int) -> dict[str, Any]:
    child_max_s = duration_s + warmup_s + 2 * READY_TIMEOUT_S
    max_messages = int(rate_per_s * child_max_s) + 100_000  # the initial state plus the paced load, at most
    async with redis_store(redis_url) as store, \
            running("webhook", store, f"webhook=127.0.0.1:0,secret={WEBHOOK_SECRET}") as run:
        await run.until(lambda: run.source.listening.is_set(), "listening")
        code = _WEBHOOK_CHILD.format(url=run.source.url, secret=WEBHOOK_SECRET, events=events, rate=rate_per_s,
                                     senders=senders, max_messages=max_messages, odds_per_message=odds_per_message)
        async with child(code, max_s=child_max_s, what="webhook pusher") as pusher:
            initial = int(pusher.first_line)
            await run.until(lambda: run.up() and run.source.accepted >= initial,
                            f"the initial state ({initial} deliveries) acknowledged")
            r = await run.measure(duration_s=duration_s, warmup_s=warmup_s, sim_pid=pusher.proc.pid)
            report = await pusher.stop()
        accepted, duplicates, rejected = run.source.accepted, run.source.duplicates, dict(run.source.rejected)
    r["notes"] = (f"{senders} senders, {odds_per_message} odd/msg; pusher: {report.get('generated', '?')} generated, "
                  f"{report.get('acknowledged', '?')} acked, {report.get('shed', '?')} shed, "
                  f"{report.get('failed', '?')} failed; source: {accepted} accepted, {duplicates} dup"
                  + (f", refused {rejected}" if rejected else ""))
    r["pusher"] = report
    return r


def bench_webhook(*, duration_s: float = 5.0, rate_per_s: float = 500.0, events: int = 60,
                  redis_url: str | None = None, warmup_s: float = 1.0, senders: int = 4,
                  odds_per_message: int = 1) -> dict[str, Any]:
    """The webhook source (listening here) vs the webhook pusher in a child process."""
    return _run(_webhook(duration_s=duration_s, rate_per_s=rate_per_s, events=events, redis_url=redis_url,
                         warmup_s=warmup_s, senders=senders, odds_per_message=odds_per_message))


# -- uof -----------------------------------------------------------------------------------


def uof_unavailable() -> str | None:
    """Why the ``uof`` row cannot run here (None: it can)."""
    import importlib

    for module in ("aio_pika", "feed.sources.amqp", "feed.normalise.uof", "feed.simulator.uof", "tests.rabbitmq"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure means: not ready
            return f"{module} not importable ({type(exc).__name__}: {exc})"
    from feed.sources.registry import REGISTRY

    if "uof" not in REGISTRY:
        return "no 'uof' kind in feed.sources.registry"
    from tests.rabbitmq import server_binary

    if server_binary() is None:
        return "rabbitmq-server not installed (bash .ci/install-rabbitmq, as root)"
    return None


async def _uof(*, duration_s: float, rate_per_s: float, events: int, redis_url: str | None, warmup_s: float,
               amqp_url: str) -> dict[str, Any]:
    child_max_s = duration_s + warmup_s + 3 * READY_TIMEOUT_S
    code = _UOF_CHILD.format(amqp_url=amqp_url, token=UOF_TOKEN, events=events, rate=rate_per_s)
    async with redis_store(redis_url) as store, child(code, max_s=child_max_s, what="UOF simulator") as sim:
        api = f"http://127.0.0.1:{int(sim.first_line)}"
        spec = f"uof={amqp_url}?exchange=unifiedfeed,api={api},token={UOF_TOKEN},min_recovery_interval_s=1"
        async with running("uof", store, spec) as run:
            await run.until(run.up, "UP (both producers recovered)")
            r = await run.measure(duration_s=duration_s, warmup_s=warmup_s, sim_pid=sim.proc.pid)
            acked, requeued = run.source.acked, run.source.requeued
        summary = await sim.stop()
    r["notes"] = (f"model {rate_per_s:g} changes/s; sim published {summary.get('published', '?')}, "
                  f"recoveries {summary.get('recoveries', '?')}; source acked {acked}, requeued {requeued}")
    return r


def bench_uof(*, duration_s: float = 5.0, rate_per_s: float = 500.0, events: int = 60, redis_url: str | None = None,
              warmup_s: float = 1.0, amqp_url: str | None = None) -> dict[str, Any]:
    """The UOF AMQP source vs the UOF simulator (child process) through a private
    RabbitMQ node (or ``amqp_url``); ``{"transport": "uof", "skipped": reason}``
    when the pieces are not there."""
    reason = uof_unavailable()
    if reason is not None:
        return {"transport": "uof", "skipped": reason}
    if amqp_url is not None:
        return _run(_uof(duration_s=duration_s, rate_per_s=rate_per_s, events=events, redis_url=redis_url,
                         warmup_s=warmup_s, amqp_url=amqp_url))
    from tests.rabbitmq import RabbitNode, server_binary

    binary = server_binary()
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="oddsfeed-bench-rmq-") as tmp:
        node = RabbitNode(Path(tmp), binary)
        node.start()  # bounded: raises after tests.rabbitmq.STARTUP_S
        try:
            return _run(_uof(duration_s=duration_s, rate_per_s=rate_per_s, events=events, redis_url=redis_url,
                             warmup_s=warmup_s, amqp_url=node.url))
        finally:
            node.stop()


#: the kinds of this module (``benchmarks/sources.py`` adds them to its ``KINDS``)
KINDS_MORE: dict[str, Callable[..., dict[str, Any]]] = {"esa": bench_esa, "webhook": bench_webhook, "uof": bench_uof}
