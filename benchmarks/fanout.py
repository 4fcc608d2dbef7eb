"""Fan-out benchmark: provider → ingest → Redis → API node → N SSE + M WebSocket clients.

Everything runs for real on this machine, on 127.0.0.1 only: an embedded
redis-server, the API node (``create_app`` + ``StreamingServer``, as
``oddsfeed serve`` runs it) in its own process pinned to CPU 0, and — pinned
to CPU 1 — a feeder and a client process.

- **Feeder (open loop).** Update ``i`` is *scheduled* at ``t0 + ⌊i·1000/R⌋``
  ms and carries that time as the provider publish time (ESA ``pt`` →
  ``source_ts``); it is sent when due, whatever happened before, so a stall
  is charged to every update it delayed (no coordinated omission). oddsfeed:
  Betfair ESA ``mcm`` lines through ``feed.ingest.Ingest`` (normalise → book
  → batched atomic apply). Baseline: the same updates as JSON, PUBLISHed.
- **Clients.** Raw asyncio protocols (no client library overhead): HTTP/1.1
  SSE with chunked decoding, RFC 6455 WebSocket. Every delta is checked for
  its per-market ``seq`` (gap = lost, repeat = duplicated); lag = receipt
  wall clock − scheduled emit time, recorded in one HdrHistogram (µs) for
  the measurement window (warm-up excluded).
- **Server cost.** CPU seconds of the server process (psutil) over the window
  → delivered frames per CPU-second ("per core"); RSS per idle connection
  from the server's RSS before/after opening them.

Scenarios (defaults finish in a few minutes):

- ``lag``: R updates/s over E events × 2 markets, N SSE + M WS clients each on
  one event (DESIGN §10: 2k/s, 1k clients, ≈20k deliveries/s → p99 ≤ 25 ms,
  zero loss);
- ``firehose``: the same feed, K clients on everything (≈ R·K deliveries/s;
  frames/s per core, target ≥ 300k with coalescing, p99 ≤ 100 ms);
- both again against ``benchmarks/baselines/starlette_broadcaster.py``
  (Starlette + sse-starlette + broadcaster), and the ratio (target ≥ 5×);
- ``idle``: C idle connections (half SSE, half WS), RSS per connection
  (target ≤ 16 KB at 10k);
- a short profiled firehose run: where the server's time goes (cProfile,
  which slows it down — figures of that run are not reported).

Usage::

    python benchmarks/fanout.py                       # everything, defaults
    python benchmarks/fanout.py --only lag --duration 30
    python benchmarks/fanout.py --rate 2000 --events 100 --sse 500 --ws 500 --firehose-clients 100 --idle 10000

Diagnostics (environment): ``FANOUT_REDIS_CPU=0`` puts redis-server on the
server's core; ``FANOUT_GC_LOG=1`` logs the server's GC pauses over 5 ms;
``FANOUT_GC_OFF=1`` runs the server without the cyclic GC. Server stderr of
every run goes to ``$TMPDIR/fanout-server.log``.

Needs ``pip install -e .[bench]`` (hdrhistogram, psutil, sse-starlette, broadcaster).
Prints figures; never asserts on timings. Exit code 1 when a run lost or
duplicated deltas (a failed run, whatever its latency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import gc
import io
import json
import os
import pstats
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKETS_PER_EVENT = 2
SERVER_CPU = 0
LOAD_CPU = 1


def _pin(cpu: int) -> None:
    try:
        if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
            os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        pass


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def market_plan(events: int) -> list[tuple[str, str]]:
    """[(betfair market id, event id)] — oddsfeed ids get the ``bf:`` prefix."""
    return [(f"1.{e * 10 + k}", f"e{e}") for e in range(events) for k in range(MARKETS_PER_EVENT)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------------------------
# server processes


def cmd_server(args: argparse.Namespace) -> None:
    """The oddsfeed API node (what ``oddsfeed serve`` runs), optionally under cProfile."""
    import uvicorn

    from feed.settings import Settings
    from streaming.app import StreamingServer, create_app

    _pin(SERVER_CPU)
    _raise_nofile()
    if os.environ.get("FANOUT_GC_OFF"):  # diagnostics
        gc.disable()
    if os.environ.get("FANOUT_GC_LOG"):  # diagnostics: print collections slower than 5 ms
        starts: dict[str, float] = {}

        def gc_log(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                starts["t"] = time.perf_counter()
            elif (d := time.perf_counter() - starts.get("t", time.perf_counter())) > 0.005:
                print(f"gc gen{info['generation']} {d * 1000:.0f} ms collected {info['collected']}",
                      file=sys.stderr, flush=True)
        gc.callbacks.append(gc_log)
    settings = Settings(redis_url=args.redis_url, heartbeat_ms=5000, max_connections_per_ip=0,
                        log_maxlen=200_000)
    from streaming.state import NodeOptions
    app = create_app(settings, options=NodeOptions(tune_gc=not os.environ.get("FANOUT_GC_OFF")))
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", ws_max_size=64 * 1024,
                            lifespan="on", timeout_graceful_shutdown=2, backlog=16384)
    server = StreamingServer(config, app)
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        def dump(signum: int, frame: Any) -> None:  # SIGUSR1: uvicorn re-raises SIGTERM after shutdown
            prof.disable()
            prof.dump_stats(args.profile)
        signal.signal(signal.SIGUSR1, dump)
        prof.enable()
    asyncio.run(server.serve())


def cmd_baseline_server(args: argparse.Namespace) -> None:
    _pin(SERVER_CPU)
    _raise_nofile()
    import uvicorn

    from benchmarks.baselines.starlette_broadcaster import create_app

    uvicorn.run(create_app(args.redis_url), host="127.0.0.1", port=args.port, log_level="warning", backlog=16384,
                ws_per_message_deflate=False, timeout_graceful_shutdown=2)


# ---------------------------------------------------------------------------------------------
# feeder


def image_line(mid: str, event: str, pt: int, clk: str) -> bytes:
    return json.dumps({"op": "mcm", "clk": clk, "pt": pt, "mc": [{
        "id": mid, "img": True,
        "marketDefinition": {"eventId": event, "eventTypeId": "1", "marketType": "MATCH_ODDS", "status": "OPEN",
                             "inPlay": True, "bettingType": "ODDS", "numberOfWinners": 1, "version": 1,
                             "runners": [{"id": 1, "status": "ACTIVE", "sortPriority": 1},
                                         {"id": 2, "status": "ACTIVE", "sortPriority": 2}]},
        "rc": [{"id": 1, "batb": [[0, 2.0, 10]]}, {"id": 2, "batb": [[0, 3.0, 10]]}]}]}).encode()


def price_of(k: int) -> float:
    return round(1.01 + (k % 500) / 100, 2)


async def feeder(args: argparse.Namespace) -> dict[str, Any]:
    plan = market_plan(args.events)
    n_markets = len(plan)
    if args.mode == "ours":
        from feed.ingest import Ingest
        from feed.store import Store

        store = await Store.open(args.redis_url, log_maxlen=200_000)
        ingest = Ingest(store, source="bench")
        t = now_ms()  # the markets first (images, seq 1), before the schedule starts
        ingest.feed_lines([image_line(mid, ev, t, f"i{i}") for i, (mid, ev) in enumerate(plan)], t)
        await ingest.flush()
    else:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(args.redis_url)
    seqs = [1] * n_markets  # oddsfeed: the image is seq 1
    counts = [0] * n_markets
    t0 = args.t0
    rate = args.rate
    total = int(rate * args.seconds)
    i = 0
    cpu0 = time.process_time()
    max_behind = 0
    while i < total:
        now = now_ms()
        due = []
        while i < total and t0 + (i * 1000) // rate <= now:
            due.append(i)
            i += 1
        if due:
            max_behind = max(max_behind, now - (t0 + (due[0] * 1000) // rate))
            if args.mode == "ours":
                lines = []
                for j in due:
                    m = j % n_markets
                    counts[m] += 1
                    seqs[m] += 1
                    pt = t0 + (j * 1000) // rate
                    lines.append(b'{"op":"mcm","clk":"c%d","pt":%d,"mc":[{"id":"%s","rc":[{"id":1,"batb":[[0,%s,10]]}]}]}'
                                 % (j, pt, plan[m][0].encode(), repr(price_of(counts[m])).encode()))
                ingest.feed_lines(lines, now_ms())
                await ingest.flush()
            else:
                pipe = r.pipeline(transaction=False)
                for j in due:
                    m = j % n_markets
                    counts[m] += 1
                    seqs[m] += 1
                    pt = t0 + (j * 1000) // rate
                    p = price_of(counts[m])
                    msg = ('{"type":"delta","market_id":"bf:%s","seq":%d,"kind":"delta","source":"bench","source_ts":%d,'
                           '"received_at":%d,"stored_at":%d,"selections":[{"selection_id":"1","status":"ACTIVE",'
                           '"price":%s,"back":[[%s,10.0]],"lay":[]}]}' % (plan[m][0], seqs[m], pt, now, now_ms(), p, p))
                    pipe.publish(f"event:{plan[m][1]}", msg)
                    pipe.publish("all", msg)
                await pipe.execute()
        nxt = t0 + (i * 1000) // rate
        await asyncio.sleep(max(0.0, (nxt - now_ms()) / 1000))
    return {"updates": total, "final_seq": {f"bf:{mid}": seqs[k] for k, (mid, _) in enumerate(plan)},
            "cpu_s": time.process_time() - cpu0, "max_behind_ms": max_behind}


def cmd_feeder(args: argparse.Namespace) -> None:
    _pin(LOAD_CPU)
    out = asyncio.run(feeder(args))
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# clients

DELTA_RE = re.compile(rb'"market_id":"([^"]+)","seq":(\d+),"kind":"[a-z]+","source":"[^"]*","source_ts":(\d+)')


class Stats:
    def __init__(self, window: tuple[int, int]) -> None:
        from hdrh.histogram import HdrHistogram

        self.hist = HdrHistogram(1, 60_000_000, 3)
        self.window = window
        self.frames = 0
        self.deltas = 0
        self.in_window = 0
        self.lost = 0
        self.dup = 0
        self.conflated = 0
        self.snapshots = 0
        self.errors: list[str] = []
        self.closed = 0
        self.sample = 1  # record the lag of every n-th delta (firehose: the generator must not saturate)


class Client:
    """Per-market seq tracking for one connection."""

    __slots__ = ("stats", "last", "ready", "kind")

    def __init__(self, stats: Stats, kind: str) -> None:
        self.stats = stats
        self.last: dict[bytes, int] = {}
        self.ready = False
        self.kind = kind

    def on_message(self, body: bytes) -> None:
        st = self.stats
        st.frames += 1
        m = DELTA_RE.search(body)
        if m is None:
            if b'"type":"snapshot"' in body[:40]:
                st.snapshots += 1
                for mm in re.finditer(rb'"market_id":"([^"]+)","source":"[^"]*","seq":(\d+)', body):
                    self.last[mm.group(1)] = int(mm.group(2))
                self.ready = True
            elif b'"type":"ack"' in body[:40] or b'"type": "ack"' in body[:40]:
                self.ready = True
            elif b'"type":"error"' in body[:40]:
                st.errors.append(body[:200].decode(errors="replace"))
            return
        now_us = time.time_ns() // 1000
        mid, seq, pt = m.group(1), int(m.group(2)), int(m.group(3))
        st.deltas += 1
        last = self.last.get(mid)
        if last is not None:
            if seq <= last:
                st.dup += 1
                return
            if seq != last + 1:
                if b'"conflated":true' in body:
                    st.conflated += 1
                else:
                    st.lost += seq - last - 1
        self.last[mid] = seq
        if st.window[0] <= pt < st.window[1]:
            st.in_window += 1
            if st.in_window % st.sample == 0:
                st.hist.record_value(max(1, now_us - pt * 1000))


class SSEProtocol(asyncio.Protocol):
    def __init__(self, client: Client, path: bytes) -> None:
        self.client = client
        self.path = path
        self.head = True
        self.buf = b""
        self.sse = b""
        self.sep = b"\n\n"  # sse-starlette ends lines with CRLF

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if self.head:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            self.head = False
            self.client.ready = self.client.ready or b" 200 " in buf[:i]  # the baseline sends no snapshot
            buf = buf[i + 4:]
        out = []
        pos = 0
        n = len(buf)
        while True:  # chunked transfer coding
            j = buf.find(b"\r\n", pos)
            if j < 0:
                break
            size = int(buf[pos:j], 16)
            end = j + 2 + size
            if end + 2 > n:
                break
            out.append(buf[j + 2:end])
            pos = end + 2
        self.buf = buf[pos:]
        if not out:
            return
        sse = self.sse + b"".join(out)
        if self.sep == b"\n\n" and b"\r\n" in sse[:200]:
            self.sep = b"\r\n\r\n"
        events = sse.split(self.sep)
        self.sse = events.pop()
        on = self.client.on_message
        for ev in events:
            k = ev.find(b"data: ")
            if k >= 0:
                on(ev[k + 6:])

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.stats.closed += 1


class WSProtocol(asyncio.Protocol):
    def __init__(self, client: Client, path: bytes, subscribe: bytes) -> None:
        self.client = client
        self.path = path
        self.subscribe = subscribe
        self.head = True
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16))
        transport.write(b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"  # type: ignore[attr-defined]
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def _send(self, payload: bytes, opcode: int = 0x81) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes((opcode, 0x80 | n)) if n < 126 else bytes((opcode, 0xFE)) + n.to_bytes(2, "big")
        self.transport.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if self.head:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            self.head = False
            buf = buf[i + 4:]
            self._send(self.subscribe)
        pos = 0
        n = len(buf)
        on = self.client.on_message
        while n - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            hdr = 2
            if b1 == 126:
                if n - pos < 4:
                    break
                b1 = int.from_bytes(buf[pos + 2:pos + 4], "big")
                hdr = 4
            elif b1 == 127:
                if n - pos < 10:
                    break
                b1 = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hdr = 10
            end = pos + hdr + b1
            if end > n:
                break
            op = buf[pos] & 0x0F
            if op == 1:
                on(buf[pos + hdr:end])
            elif op == 9:  # ping → pong (servers close peers that do not answer)
                self._send(buf[pos + hdr:end], 0x8A)
            elif op == 8:
                self.client.stats.errors.append(f"ws close {int.from_bytes(buf[pos + hdr:pos + hdr + 2], 'big')}")
            pos = end
        self.buf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.stats.closed += 1


async def clients(args: argparse.Namespace) -> None:
    _pin(LOAD_CPU)
    _raise_nofile()
    gc.disable()
    loop = asyncio.get_running_loop()
    plan = market_plan(args.events)
    events = sorted({ev for _, ev in plan}, key=lambda e: int(e[1:]))
    stats = Stats((0, 0))
    conns: list[Client] = []
    transports = []
    ours = args.mode == "ours"

    def target(i: int) -> str | None:
        return None if args.filter == "all" else events[i % len(events)]

    async def open_one(i: int, kind: str) -> None:
        ev = target(i)
        c = Client(stats, kind)
        conns.append(c)
        if kind == "sse":
            if ours:
                path = b"/v1/stream" + (b"?event=bf:" + ev.encode() if ev else b"")
            else:
                path = b"/stream" + (b"?event=" + ev.encode() if ev else b"")
            if args.idle:
                path = b"/v1/stream?market=none" if ours else b"/stream?event=none"
            proto: asyncio.Protocol = SSEProtocol(c, path)
        else:
            flt = {} if ev is None else {"event": f"bf:{ev}" if ours else ev}
            if args.idle:
                flt = {"market": "none"} if ours else {"event": "none"}
            sub = json.dumps({"op": "subscribe", "id": 1, "filter": flt}).encode()
            proto = WSProtocol(c, b"/v1/ws" if ours else b"/ws", sub)
        for attempt in range(5):
            try:
                t, _ = await loop.create_connection(lambda: proto, "127.0.0.1", args.port)
                transports.append(t)
                return
            except OSError:
                await asyncio.sleep(0.2 * (attempt + 1))
        stats.errors.append("connect failed")

    kinds = ["sse"] * args.sse + ["ws"] * args.ws
    for start in range(0, len(kinds), 200):
        await asyncio.gather(*(open_one(i, k) for i, k in enumerate(kinds[start:start + 200], start)))
    deadline = time.monotonic() + 60
    while not all(c.ready for c in conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": sum(c.ready for c in conns), "of": len(conns)}), flush=True)
    cpu0 = time.process_time()
    # the main process sends the measurement window, then the final seqs
    line = await loop.run_in_executor(None, sys.stdin.readline)
    cmd = json.loads(line) if line.strip() else {}
    cpu_task: asyncio.Task[None] | None = None
    if "window" in cmd:
        stats.window = tuple(cmd["window"])
        stats.sample = args.sample

        async def window_cpu() -> None:  # the generator's own CPU share over the measured window
            await asyncio.sleep(max(0.0, (stats.window[0] - now_ms()) / 1000))
            c0, w0 = time.process_time(), time.monotonic()
            await asyncio.sleep(max(0.0, (stats.window[1] - now_ms()) / 1000))
            stats.window_cpu = (time.process_time() - c0) / max(1e-9, time.monotonic() - w0)
        cpu_task = asyncio.create_task(window_cpu())
    line = await loop.run_in_executor(None, sys.stdin.readline)
    cmd = json.loads(line) if line.strip() else {}
    if cpu_task is not None and not cpu_task.done():
        cpu_task.cancel()  # the window has ended: its figure is in (or the run was cut short)
    final: dict[str, int] = cmd.get("final_seq", {})
    if final and not args.idle:
        want = {k.encode(): v for k, v in final.items()}
        plan_ev = {f"bf:{mid}".encode(): ev for mid, ev in plan}
        drain_until = time.monotonic() + args.drain

        def behind() -> int:
            missing = 0
            for i, c in enumerate(conns):
                ev = target(i)
                for mid, seq in want.items():
                    if ev is None or plan_ev[mid] == ev:
                        missing += max(0, seq - c.last.get(mid, 0))
            return missing
        while behind() and time.monotonic() < drain_until:
            await asyncio.sleep(0.1)
        stats.lost += behind()  # never arrived within the drain time
    cpu = time.process_time() - cpu0
    for t in transports:
        t.close()
    summary = {"frames": stats.frames, "deltas": stats.deltas, "in_window": stats.in_window, "lost": stats.lost,
               "dup": stats.dup, "conflated": stats.conflated, "closed": stats.closed, "errors": stats.errors[:5],
               "n_errors": len(stats.errors), "cpu_s": cpu, "window_cpu": getattr(stats, "window_cpu", 0.0),
               "hist": stats.hist.encode().decode() if stats.hist.get_total_count() else ""}
    print(json.dumps(summary), flush=True)


def cmd_clients(args: argparse.Namespace) -> None:
    asyncio.run(clients(args))


# ---------------------------------------------------------------------------------------------
# orchestration


SERVER_LOG = Path(tempfile.gettempdir()) / "fanout-server.log"


def _spawn(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], cwd=str(ROOT), text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def _wait_port(port: int, proc: subprocess.Popen[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _readline(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(0.5):
            line = proc.stdout.readline()
            if line.strip().startswith("{"):
                return json.loads(line)
            if not line:
                break
    raise RuntimeError("no answer from child process")


class Redis:
    def __init__(self) -> None:
        from feed.embedded_redis import EmbeddedRedis

        self.dir = tempfile.mkdtemp(prefix="fanout-redis-")
        self.port = _free_port()
        self.server = EmbeddedRedis(self.dir, port=self.port, appendonly=False)

    def __enter__(self) -> str:
        url = self.server.start()
        cpu = int(os.environ.get("FANOUT_REDIS_CPU", LOAD_CPU))
        try:
            if self.server.process is not None and (os.cpu_count() or 1) > 1:
                os.sched_setaffinity(self.server.process.pid, {cpu})
        except OSError:
            pass
        return url

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def run_scenario(name: str, mode: str, args: argparse.Namespace, *, sse: int, ws: int, filter: str,
                 seconds: float, profile: str | None = None) -> dict[str, Any]:
    """One run: fresh Redis and server; returns figures."""
    import psutil

    with Redis() as url:
        port = _free_port()
        log = open(SERVER_LOG, "a")
        log.write(f"\n=== {name} / {mode} ===\n")
        log.flush()
        server = _spawn(["_server" if mode == "ours" else "_baseline", "--redis-url", url, "--port", str(port),
                         *(["--profile", profile] if profile else [])], stderr=log)
        try:
            common = ["--redis-url", url, "--events", str(args.events), "--mode", mode]
            _wait_port(port, server)
            time.sleep(0.5)
            sp = psutil.Process(server.pid)
            rss_before = sp.memory_info().rss
            cl = _spawn(["_clients", "--port", str(port), "--events", str(args.events), "--mode", mode,
                         "--sse", str(sse), "--ws", str(ws), "--filter", filter, "--drain", str(args.drain),
                         "--sample", str(args.firehose_sample if filter == "all" else 1),
                         *(["--idle"] if filter == "idle" else [])],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert cl.stdin is not None
            ready = _readline(cl, 180)
            if filter == "idle":
                time.sleep(3)
                idle_rss = sp.memory_info().rss
                cl.stdin.write("{}\n{}\n")
                cl.stdin.flush()
                _readline(cl, 60)
                cl.wait(30)
                n = ready["ready"]
                return {"name": name, "mode": mode, "connections": n, "connected": ready,
                        "rss_per_conn_kb": (idle_rss - rss_before) / max(1, n) / 1024,
                        "rss_mb": idle_rss / 2**20}
            # clients record lag only for updates scheduled inside [t0 + warm-up, t0 + warm-up + seconds)
            t0 = now_ms() + 500
            warm = int(args.warmup * 1000)
            window = (t0 + warm, t0 + warm + int(seconds * 1000))
            cl.stdin.write(json.dumps({"window": window}) + "\n")
            cl.stdin.flush()
            feeder = _spawn(["_feeder", *common, "--rate", str(args.rate), "--seconds",
                             str(args.warmup + seconds), "--t0", str(t0)], stdout=subprocess.PIPE)
            # server CPU over the measurement window
            time.sleep(max(0.0, (window[0] - now_ms()) / 1000))
            c0 = sp.cpu_times()
            w0 = time.monotonic()
            time.sleep(max(0.0, (window[1] - now_ms()) / 1000))
            c1 = sp.cpu_times()
            wall = time.monotonic() - w0
            fed = _readline(feeder, 60 + args.warmup + seconds)
            feeder.wait(30)
            assert cl.stdin is not None
            cl.stdin.write(json.dumps({"final_seq": fed["final_seq"]}) + "\n")
            cl.stdin.flush()
            res = _readline(cl, args.drain + 60)
            cl.wait(30)
            rss = sp.memory_info().rss
            hops = _hops(port) if mode == "ours" else {}
            if profile:
                server.send_signal(signal.SIGUSR1)
                for _ in range(100):
                    if os.path.exists(profile):
                        break
                    time.sleep(0.1)
                time.sleep(0.5)
        finally:
            _stop(server)
            log.close()
    from hdrh.histogram import HdrHistogram

    h = HdrHistogram(1, 60_000_000, 3)
    if res["hist"]:
        h.decode_and_add(res["hist"])
    server_cpu = (c1.user + c1.system) - (c0.user + c0.system)
    window_s = (window[1] - window[0]) / 1000
    return {
        "name": name, "mode": mode, "clients": sse + ws, "ready": ready, "updates_per_s": args.rate,
        "delivered_per_s": res["in_window"] / window_s, "frames": res["frames"],
        "p50_ms": h.get_value_at_percentile(50) / 1000, "p99_ms": h.get_value_at_percentile(99) / 1000,
        "p999_ms": h.get_value_at_percentile(99.9) / 1000, "max_ms": h.get_max_value() / 1000,
        "samples": h.get_total_count(), "lost": res["lost"], "dup": res["dup"], "conflated": res["conflated"],
        "closed": res["closed"], "errors": res["errors"], "server_cpu_s": server_cpu, "wall_s": wall,
        "server_cpu_frac": server_cpu / wall if wall else 0.0,
        "frames_per_cpu_s": res["in_window"] / server_cpu if server_cpu > 0 else 0.0,
        "cpu_us_per_frame": server_cpu / res["in_window"] * 1e6 if res["in_window"] else 0.0,
        "client_cpu_frac": res["window_cpu"], "lag_sampled_1_in": 1 if filter != "all" else args.firehose_sample,
        "feeder_max_behind_ms": fed["max_behind_ms"], "feeder_cpu_s": fed["cpu_s"],
        "rss_mb": rss / 2**20, "hops": hops,
    }


def _hops(port: int) -> dict[str, str]:
    """Per-hop latency (p50/p99 upper bucket bounds, ms) from the node's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "oddsfeed_hop_latency_seconds":
            continue
        for smp in fam.samples:
            if smp.name.endswith("_bucket"):
                buckets.setdefault(smp.labels["hop"], []).append((float(smp.labels["le"]), smp.value))
    out = {}
    for hop, bs in buckets.items():
        bs.sort()
        total = bs[-1][1]
        if not total:
            continue
        def q(f: float) -> str:
            for le, c in bs:
                if c >= f * total:
                    return "≤%gms" % (le * 1000) if le != float("inf") else ">30s"
            return "?"
        out[hop] = f"p50 {q(0.5)} p99 {q(0.99)}"
    return out


def _fmt(r: dict[str, Any]) -> str:
    if "connections" in r:
        return (f"  {r['name']:<22} {r['mode']:<9} {r['connections']:>6} idle connections: "
                f"{r['rss_per_conn_kb']:.1f} KB RSS each (server RSS {r['rss_mb']:.0f} MB)")
    return (f"  {r['name']:<22} {r['mode']:<9} clients {r['clients']:>5}  delivered {r['delivered_per_s']:>9,.0f}/s  "
            f"lag p50 {r['p50_ms']:>8.1f} p99 {r['p99_ms']:>8.1f} p99.9 {r['p999_ms']:>8.1f} max {r['max_ms']:>8.1f} ms  "
            f"lost {r['lost']} dup {r['dup']} conflated {r['conflated']}  server CPU {r['server_cpu_frac'] * 100:.0f}% "
            f"= {r['cpu_us_per_frame']:.1f} µs/frame ({r['frames_per_cpu_s']:,.0f} frames/CPU-s)  "
            f"RSS {r['rss_mb']:.0f} MB  load-gen CPU {r['client_cpu_frac'] * 100:.0f}%"
            f"{' (generator-bound: lag not valid)' if r['client_cpu_frac'] > 0.7 else ''}  "
            f"feeder max behind {r['feeder_max_behind_ms']} ms"
            + ("\n      hops (whole run, incl. warm-up): " + "; ".join(f"{k} {v}" for k, v in r["hops"].items())
               if r.get("hops") else ""))


def _verdict(label: str, ok: bool, detail: str) -> str:
    return f"  [{'met' if ok else 'NOT MET'}] {label}: {detail}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=2000, help="updates per second (default 2000)")
    p.add_argument("--events", type=int, default=100, help=f"events, {MARKETS_PER_EVENT} markets each (default 100)")
    p.add_argument("--sse", type=int, default=500, help="SSE clients in the lag scenario (default 500)")
    p.add_argument("--ws", type=int, default=500, help="WebSocket clients in the lag scenario (default 500)")
    p.add_argument("--firehose-clients", type=int, default=100, help="clients on everything (default 100)")
    p.add_argument("--idle", type=int, default=10_000, help="idle connections for the memory figure (default 10000)")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per run (default 15)")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds, not measured (default 3)")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for late deltas (default 10)")
    p.add_argument("--only", choices=["lag", "firehose", "idle", "baseline", "profile"], action="append",
                   help="run only these parts (repeatable)")
    p.add_argument("--firehose-sample", type=int, default=10,
                   help="firehose: record the lag of every n-th delta (all are checked for loss; default 10)")
    p.add_argument("--profile-scenario", choices=["lag", "firehose"], default="firehose",
                   help="which scenario the profiled run repeats (default firehose)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    parts = set(args.only or ["lag", "firehose", "idle", "baseline", "profile"])
    if args.no_baseline:
        parts.discard("baseline")
    if args.no_profile:
        parts.discard("profile")
    _pin(LOAD_CPU)
    import hdrh  # noqa: F401  (fail early)

    print(f"fan-out benchmark: {args.rate} updates/s over {args.events} events × {MARKETS_PER_EVENT} markets; "
          f"server on CPU {SERVER_CPU}, redis + feeder + clients on CPU {LOAD_CPU}; python {sys.version.split()[0]}",
          flush=True)
    print(f"command: {' '.join(sys.argv)}; load average before: {os.getloadavg()[0]:.2f} "
          "(other work on this 2-core machine skews latency)", flush=True)
    results: dict[str, dict[str, Any]] = {}
    half_f = args.firehose_clients // 2
    runs = []
    if "lag" in parts:
        runs.append(("lag", "ours", dict(sse=args.sse, ws=args.ws, filter="event")))
    if "firehose" in parts:
        runs.append(("firehose", "ours", dict(sse=half_f, ws=args.firehose_clients - half_f, filter="all")))
    if "baseline" in parts:
        runs.append(("lag", "baseline", dict(sse=args.sse, ws=args.ws, filter="event")))
        runs.append(("firehose", "baseline", dict(sse=half_f, ws=args.firehose_clients - half_f, filter="all")))
    if "idle" in parts:
        runs.append(("idle", "ours", dict(sse=args.idle // 2, ws=args.idle - args.idle // 2, filter="idle")))
    failed = False
    for name, mode, kw in runs:
        print(f"\nrunning {name} against {mode} …", flush=True)
        try:
            r = run_scenario(name, mode, args, seconds=args.duration, **kw)  # type: ignore[arg-type]
        except Exception as exc:  # a baseline that falls over is a result too
            print(f"  {name}/{mode} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        results[f"{name}/{mode}"] = r
        print(_fmt(r), flush=True)
        if r.get("errors"):
            print(f"  client errors (first): {r['errors']}")
        if name != "idle" and (r["lost"] or r["dup"]):
            failed = failed or mode == "ours"
    prof_out = None
    if "profile" in parts:
        prof_file = tempfile.mktemp(suffix=".prof")
        print(f"\nprofiling the server during a short {args.profile_scenario} run (cProfile slows it: figures not reported) …",
              flush=True)
        try:
            if args.profile_scenario == "lag":
                kw = dict(sse=args.sse, ws=args.ws, filter="event")
            else:
                kw = dict(sse=half_f, ws=args.firehose_clients - half_f, filter="all")
            run_scenario("profile", "ours", args, seconds=min(8.0, args.duration), profile=prof_file,
                         **kw)  # type: ignore[arg-type]
            s = io.StringIO()
            stats = pstats.Stats(prof_file, stream=s)
            stats.sort_stats("tottime").print_stats(22)
            prof_out = s.getvalue()
        except Exception as exc:
            print(f"  profile run failed: {exc}")

    print("\n=== summary (DESIGN §10 targets) ===")
    lag = results.get("lag/ours")
    if lag:
        print(_verdict("2k updates/s to 1k clients: p99 ≤ 25 ms, zero loss", lag["p99_ms"] <= 25 and not lag["lost"]
                       and not lag["dup"], f"p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms, "
                       f"p99.9 {lag['p999_ms']:.1f} ms, lost {lag['lost']}, dup {lag['dup']}"))
        print(_verdict("   p50 ≤ 5 ms", lag["p50_ms"] <= 5, f"{lag['p50_ms']:.1f} ms"))
    fh = results.get("firehose/ours")
    if fh:
        print(_verdict("firehose p99 ≤ 100 ms, zero loss", fh["p99_ms"] <= 100 and not fh["lost"],
                       f"p99 {fh['p99_ms']:.1f} ms, lost {fh['lost']}, delivered {fh['delivered_per_s']:,.0f}/s"))
        print(_verdict("≥ 300k delivered frames/s per core", fh["frames_per_cpu_s"] >= 300_000,
                       f"{fh['frames_per_cpu_s']:,.0f} frames per server CPU-second ({fh['cpu_us_per_frame']:.2f} µs "
                       f"each; the server used {fh['server_cpu_frac'] * 100:.0f}% of its core for "
                       f"{fh['delivered_per_s']:,.0f} frames/s)"))
    for name in ("lag", "firehose"):
        ours, base = results.get(f"{name}/ours"), results.get(f"{name}/baseline")
        if ours and base and not base["delivered_per_s"]:
            print(f"  [INVALID] ≥ 5× baseline ({name}): the baseline delivered nothing (see {SERVER_LOG})")
        elif ours and base:
            eff = ours["frames_per_cpu_s"] / base["frames_per_cpu_s"] if base["frames_per_cpu_s"] else float("inf")
            thr = ours["delivered_per_s"] / base["delivered_per_s"] if base["delivered_per_s"] else float("inf")
            print(_verdict(f"≥ 5× baseline ({name})", eff >= 5,
                           f"frames per CPU-second {eff:.1f}×, delivered/s {thr:.1f}×; baseline p99 "
                           f"{base['p99_ms']:.0f} ms, lost {base['lost']}, dup {base['dup']}"))
    idle = results.get("idle/ours")
    if idle:
        print(_verdict(f"≤ 16 KB per idle connection at {idle['connections']}", idle["rss_per_conn_kb"] <= 16,
                       f"{idle['rss_per_conn_kb']:.1f} KB (server RSS; kernel socket buffers not included)"))
    if prof_out:
        print(f"\n=== where the server's time goes ({args.profile_scenario}, cProfile, top by own time) ===")
        print("\n".join(prof_out.splitlines()[:40]))
    print(f"\nserver stderr (both servers, all runs): {SERVER_LOG}")
    print("\nraw:", json.dumps(results, default=str))
    return 1 if failed else 0


def _sub(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--redis-url")
    p.add_argument("--port", type=int)
    p.add_argument("--profile")
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--mode", default="ours")
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--t0", type=int, default=0)
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--sse", type=int, default=0)
    p.add_argument("--ws", type=int, default=0)
    p.add_argument("--filter", default="event")
    p.add_argument("--idle", action="store_true")
    p.add_argument("--drain", type=float, default=10)
    p.add_argument("--sample", type=int, default=1)
    a = p.parse_args(argv)
    {"_server": cmd_server, "_baseline": cmd_baseline_server, "_feeder": cmd_feeder,
     "_clients": cmd_clients}[a.cmd](a)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        _sub(sys.argv[1:])
    else:
        sys.exit(main())
