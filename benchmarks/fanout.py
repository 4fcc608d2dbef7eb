"""Fan-out benchmark: oddsfeed against the Python floor and two peers, in one run.

Everything runs for real on this machine, on 127.0.0.1 only. Per run: a
fresh embedded redis-server, ONE server process pinned to CPU 0, and —
pinned to CPU 1 — an open-loop feeder and one client process. Servers
(each on uvloop, as ``oddsfeed serve`` runs):

- ``oddsfeed``: ``oddsfeed serve`` itself (``feed.cli.main(["serve", …])``:
  uvloop, uvicorn + the streaming app, settings from ``ODDSFEED_*``);
- ``floor``: ``benchmarks/baselines/floor.py`` — bare ``asyncio.Protocol``,
  each update framed once, one ``transport.write`` per connection per Redis
  read;
- ``websockets``: ``benchmarks/baselines/websockets_broadcast.py`` —
  ``websockets.broadcast()`` per update (WebSocket clients only);
- ``starlette``: ``benchmarks/baselines/starlette_broadcaster.py`` —
  Starlette + sse-starlette + broadcaster, written plainly.

- **Feeder (open loop).** Update ``i`` is *scheduled* at ``t0 + ⌊i·1000/R⌋``
  ms and carries that time as the provider publish time; it is sent when
  due, whatever happened before, so a stall is charged to every update it
  delayed (no coordinated omission). oddsfeed: Betfair ESA ``mcm`` lines
  through ``feed.ingest.Ingest`` (normalise → book → batched atomic apply:
  the full ingest path is inside the measured lag). Peers: the same updates
  as JSON PUBLISHed to ``event:<id>`` and ``all``, padded so a frame on the
  wire has oddsfeed's size (measured in the oddsfeed run).
- **Clients.** Raw asyncio protocols on uvloop: HTTP/1.1 SSE (chunked) and
  RFC 6455 WebSocket. Every delta is checked for its per-market ``seq`` (gap
  = lost, repeat = duplicated); lag = receipt wall clock − scheduled emit
  time, in one HdrHistogram (µs) for the measurement window (warm-up
  excluded; firehose: every n-th delta's lag, all checked). Deltas are found
  with one regex pass per read, not per frame, so the client keeps up with
  the firehose and its lag measures the server.
- **Costs over the window.** CPU seconds (psutil) of the server, the client
  process, the feeder and redis-server, and the busy share of each core
  (other work on the machine shows there); µs of server CPU per delivered
  frame; frames per write = delivered frames ÷ the server's write syscalls
  (``syscw`` of /proc/PID/io: uvloop writes with write/writev); RSS per idle
  connection from the server's RSS before/after opening them.

Shapes (issue 11): ``lag`` — R updates/s over E events × 2 markets, N
clients each on one event (2k/s, 100 events, 1,000 clients: 20 frames/s per
client, 20k frames/s); ``firehose`` — K clients on everything (100 × 2,000
frames/s); ``idle`` — C idle connections (half SSE, half WS; the websockets
peer: all WS). The summary prints each target of issue 11 with the figure,
met / not met, and the floor and peers of the same run. ``--rounds R`` runs
every (shape, server) R times, round-robin, so a drift in the machine's speed
hits every server alike: each round prints its same-run ratios; the summary
shows per (shape, server) the round with the median µs per frame (lost and
duplicated: the worst round's) and judges the ratio targets on the median of
the rounds' own ratios. An optional
``--profile`` run repeats a short firehose under cProfile (figures of that
run not reported).

Usage::

    python benchmarks/fanout.py                          # everything, ~4 min
    python benchmarks/fanout.py --only lag --peers oddsfeed,floor --duration 20
    python benchmarks/fanout.py --only lag --only firehose --peers oddsfeed,floor,starlette --rounds 3
    python benchmarks/fanout.py --rate 2000 --events 100 --clients 1000 --firehose-clients 100 --idle 10000

Writes ``docs/bench/fanout-lag-cdf.png`` (lag CDF per scenario, one line per
server) and ``docs/bench/fanout-cost.png`` (µs per frame and KB per idle
connection per server); ``--json FILE`` keeps the raw figures and
histograms. Diagnostics (environment): ``FANOUT_REDIS_CPU=0`` puts
redis-server on the server's core; ``FANOUT_GC_LOG=1`` logs oddsfeed's GC
pauses over 5 ms; ``FANOUT_SERVER_LOOP=asyncio`` runs oddsfeed on the stdlib
loop (``oddsfeed serve`` uses uvloop). Server stderr of every run goes to
``$TMPDIR/fanout-server.log``.

Needs ``pip install -e .[bench]``. Prints figures; never asserts on timings.
Exit code 1 when an oddsfeed run lost or duplicated deltas (a failed run,
whatever its latency).
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import plots  # noqa: E402

MARKETS_PER_EVENT = 2
SERVER_CPU = 0
LOAD_CPU = 1
PEERS = ("oddsfeed", "floor", "websockets", "starlette")
PEER_MODULE = {"floor": "benchmarks.baselines.floor", "websockets": "benchmarks.baselines.websockets_broadcast",
               "starlette": "benchmarks.baselines.starlette_broadcaster"}
DEFAULT_PAYLOAD = 520  # bytes of JSON per delta when no oddsfeed run measured it (issue 11: 524-byte WS frames)


def _pin(cpu: int, pid: int = 0) -> None:
    try:
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(pid, {cpu})
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
    return int(port)


def _uvloop_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------------------------
# server processes


def cmd_server(args: argparse.Namespace) -> None:
    """``oddsfeed serve`` itself (same function, same event loop), optionally under cProfile."""
    from feed.cli import main as oddsfeed_main

    _pin(SERVER_CPU)
    _raise_nofile()
    if os.environ.get("FANOUT_GC_LOG"):  # diagnostics: print collections slower than 5 ms
        starts: dict[str, float] = {}

        def gc_log(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                starts["t"] = time.perf_counter()
            elif (d := time.perf_counter() - starts.get("t", time.perf_counter())) > 0.005:
                print(f"gc gen{info['generation']} {d * 1000:.0f} ms collected {info['collected']}",
                      file=sys.stderr, flush=True)
        gc.callbacks.append(gc_log)
    # the node's settings for a bench (environment, as a deployment sets them): one client IP holds
    # every connection, and the log keeps the whole run
    os.environ.setdefault("ODDSFEED_MAX_CONNECTIONS_PER_IP", "0")
    os.environ.setdefault("ODDSFEED_LOG_MAXLEN", "200000")
    os.environ.setdefault("ODDSFEED_HEARTBEAT_MS", "5000")
    if os.environ.get("FANOUT_SERVER_LOOP") == "asyncio":  # diagnostics: the stdlib loop instead of uvloop
        import feed.cli

        feed.cli._run = asyncio.run  # type: ignore[assignment]
    argv = ["serve", "--redis-url", args.redis_url, "--host", "127.0.0.1", "--port", str(args.port)]
    if not args.profile:
        sys.exit(oddsfeed_main(argv))
    prof = cProfile.Profile()
    prof.enable()
    try:
        code = oddsfeed_main(argv)
    finally:
        prof.disable()
        prof.dump_stats(args.profile)
    sys.exit(code)


def cmd_peer_server(args: argparse.Namespace) -> None:
    _pin(SERVER_CPU)
    _raise_nofile()
    if args.peer == "starlette":
        import uvicorn

        from benchmarks.baselines.starlette_broadcaster import create_app

        # uvicorn.run picks uvloop and httptools when installed (loop="auto"), as oddsfeed serve does
        uvicorn.run(create_app(args.redis_url), host="127.0.0.1", port=args.port, log_level="warning",
                    backlog=16384, ws_per_message_deflate=False, timeout_graceful_shutdown=2)
    elif args.peer == "floor":
        from benchmarks.baselines.floor import serve

        _uvloop_run(serve(args.redis_url, args.port))
    else:
        from benchmarks.baselines.websockets_broadcast import run

        _uvloop_run(run(args.redis_url, args.port))


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
    ours = args.mode in ("oddsfeed", "ours")
    if ours:
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
            if ours:
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
                           '"price":%s,"back":[[%s,10.0]],"lay":[]}]' % (plan[m][0], seqs[m], pt, now, now_ms(), p, p))
                    pad = args.payload_bytes - len(msg) - 10
                    msg += (',"pad":"%s"}' % ("x" * pad)) if pad > 0 else "}"
                    pipe.publish(f"event:{plan[m][1]}", msg)
                    pipe.publish("all", msg)
                await pipe.execute()
        nxt = t0 + (i * 1000) // rate
        await asyncio.sleep(max(0.0, (nxt - now_ms()) / 1000))
    return {"updates": total, "final_seq": {f"bf:{mid}": seqs[k] for k, (mid, _) in enumerate(plan)},
            "cpu_s": time.process_time() - cpu0, "max_behind_ms": max_behind}


def cmd_feeder(args: argparse.Namespace) -> None:
    _pin(LOAD_CPU)
    print(json.dumps(asyncio.run(feeder(args))), flush=True)


# ---------------------------------------------------------------------------------------------
# clients

# the three fields a delta is checked by; the terminator keeps a read that ends inside the digits unmatched
DELTA_RE = re.compile(rb'"market_id":"([^"]+)","seq":(\d+),"kind":"[a-z]+","source":"[^"]*","source_ts":(\d+)[,}]')
SNAP_RE = re.compile(rb'"market_id":"([^"]+)","source":"[^"]*","seq":(\d+)')


class Stats:
    def __init__(self) -> None:
        from hdrh.histogram import HdrHistogram

        self.hist = HdrHistogram(1, 60_000_000, 3)
        self.window = (0, 0)
        self.frames = 0
        self.deltas = 0
        self.in_window = 0
        self.lost = 0
        self.dup = 0
        self.conflated = 0
        self.snapshots = 0
        self.errors: list[str] = []
        self.closed = 0
        self.sample = 1  # record the lag of every n-th delta in the window
        self.reads = 0  # data_received calls in the window
        self.bytes = 0  # bytes received in the window
        self.win_frames = 0  # frames those reads held


class Client:
    """Per-market seq tracking for one connection."""

    __slots__ = ("stats", "last", "ready", "kind")

    def __init__(self, stats: Stats, kind: str) -> None:
        self.stats = stats
        self.last: dict[bytes, int] = {}
        self.ready = False
        self.kind = kind

    def on_deltas(self, buf: bytes, start: int, end: int, texts: int) -> None:
        """Every delta in ``buf[start:end]`` (whole frames only); ``texts`` = how many text
        frames/events that range holds — more than deltas found → the slow path for the others."""
        st = self.stats
        now_us = time.time_ns() // 1000
        w0, w1 = st.window
        if w0 <= now_us // 1000 < w1:
            st.reads += 1
            st.bytes += end - start
            st.win_frames += texts
        last = self.last
        n = 0
        for m in DELTA_RE.finditer(buf, start, end):
            n += 1
            mid, seq = m.group(1), int(m.group(2))
            prev = last.get(mid)
            if prev is not None and seq != prev + 1:
                if seq <= prev:
                    st.dup += 1
                    continue
                nxt = buf.find(b'{"type":"', m.end(), end)
                if buf.find(b'"conflated":true', m.end(), end if nxt < 0 else nxt) >= 0:
                    st.conflated += 1
                else:
                    st.lost += seq - prev - 1
            last[mid] = seq
            pt = int(m.group(3))
            if w0 <= pt < w1:
                st.in_window += 1
                if st.in_window % st.sample == 0:
                    st.hist.record_value(max(1, now_us - pt * 1000))
        st.frames += texts
        st.deltas += n
        if n != texts:
            self.on_other(buf[start:end])

    def on_other(self, region: bytes) -> None:
        """Snapshots, acks, errors (rare: on connect, resyncs, heartbeats)."""
        st = self.stats
        if b'"type":"snapshot"' in region:
            st.snapshots += 1
            for mm in SNAP_RE.finditer(region):
                self.last[mm.group(1)] = int(mm.group(2))
            self.ready = True
        if b'"type":"ack"' in region or b'"type": "ack"' in region:
            self.ready = True
        k = region.find(b'"type":"error"')
        if k >= 0:
            st.errors.append(region[max(0, k - 2):k + 200].decode(errors="replace"))


class SSEProtocol(asyncio.Protocol):
    """HTTP/1.1 SSE reader: deltas found in whole events, chunk headers left in place
    (they sit between events, never inside one)."""

    def __init__(self, client: Client, path: bytes, sep: bytes) -> None:
        self.client = client
        self.path = path
        self.head = True
        self.buf = b""
        self.sep = sep  # sse-starlette ends lines with CRLF

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.head:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            self.head = False
            if b" 200 " in buf[:i]:
                self.client.ready = self.client.ready or not self.client.stats.expect_snapshot  # type: ignore[attr-defined]
            else:
                self.client.stats.errors.append(buf[:i].decode(errors="replace")[:200])
            buf = buf[i + 4:]
        end = buf.rfind(self.sep)
        if end < 0:
            self.buf = buf
            return
        end += len(self.sep)
        self.client.on_deltas(buf, 0, end, buf.count(b"data:", 0, end))
        self.buf = buf[end:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.stats.closed += 1


class WSProtocol(asyncio.Protocol):
    """RFC 6455 client: frames walked for their boundaries and control frames,
    deltas found in one pass over the whole frames of a read."""

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
        buf = self.buf + data if self.buf else data
        if self.head:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            self.head = False
            if b" 101 " not in buf[:i]:
                self.client.stats.errors.append(buf[:i].decode(errors="replace")[:200])
            buf = buf[i + 4:]
            self._send(self.subscribe)
        pos = 0
        n = len(buf)
        texts = 0
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
                texts += 1
            elif op == 9:  # ping → pong (servers close peers that do not answer)
                self._send(buf[pos + hdr:end], 0x8A)
            elif op == 8:
                self.client.stats.errors.append(f"ws close {int.from_bytes(buf[pos + hdr:pos + hdr + 2], 'big')}")
            pos = end
        if texts:
            self.client.on_deltas(buf, 0, pos, texts)
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
    stats = Stats()
    ours = args.mode == "oddsfeed"
    stats.expect_snapshot = ours  # type: ignore[attr-defined]  # oddsfeed's streams start with a snapshot
    conns: list[Client] = []
    transports = []

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
            proto: asyncio.Protocol = SSEProtocol(c, path, b"\r\n\r\n" if args.mode == "starlette" else b"\n\n")
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
    print(json.dumps({"ready": sum(c.ready for c in conns), "of": len(conns), "errors": stats.errors[:3]}), flush=True)
    # the main process sends the measurement window, then the final seqs
    line = await loop.run_in_executor(None, sys.stdin.readline)
    cmd = json.loads(line) if line.strip() else {}
    if "window" in cmd:
        w0, w1 = cmd["window"]
        stats.window = (int(w0), int(w1))
        stats.sample = args.sample
    line = await loop.run_in_executor(None, sys.stdin.readline)
    cmd = json.loads(line) if line.strip() else {}
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
    for t in transports:
        t.close()
    summary = {"frames": stats.frames, "deltas": stats.deltas, "in_window": stats.in_window, "lost": stats.lost,
               "dup": stats.dup, "conflated": stats.conflated, "closed": stats.closed, "errors": stats.errors[:5],
               "n_errors": len(stats.errors), "reads": stats.reads, "bytes": stats.bytes, "win_frames": stats.win_frames,
               "hist": stats.hist.encode().decode() if stats.hist.get_total_count() else ""}
    print(json.dumps(summary), flush=True)


def cmd_clients(args: argparse.Namespace) -> None:
    _uvloop_run(clients(args))


# ---------------------------------------------------------------------------------------------
# orchestration


SERVER_LOG = Path(tempfile.gettempdir()) / "fanout-server.log"


def _spawn(argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], cwd=str(ROOT), text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


def _wait_port(port: int, proc: subprocess.Popen[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (see {SERVER_LOG})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 15) -> None:
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
                return dict(json.loads(line))
            if not line:
                break
    raise RuntimeError("no answer from child process")


class Redis:
    def __init__(self) -> None:
        from feed.embedded_redis import EmbeddedRedis

        self.dir = tempfile.mkdtemp(prefix="fanout-redis-")
        self.port = _free_port()
        self.server = EmbeddedRedis(self.dir, port=self.port, appendonly=False)
        self.pid = 0

    def __enter__(self) -> Redis:
        self.url = self.server.start()
        if self.server.process is not None:
            self.pid = self.server.process.pid
            _pin(int(os.environ.get("FANOUT_REDIS_CPU", LOAD_CPU)), self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def _syscw(pid: int) -> int:
    """Write-type syscalls of a process so far (/proc/PID/io; -1 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("syscw:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


class Meter:
    """CPU seconds of some processes, the busy share of each core, and the server's write syscalls."""

    def __init__(self, procs: dict[str, Any], server_pid: int) -> None:
        self.procs = procs
        self.server_pid = server_pid

    def read(self) -> dict[str, Any]:
        import psutil

        cpu = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                cpu[name] = t.user + t.system
            except psutil.Error:
                cpu[name] = float("nan")
        cores = [(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0),
                  sum(t)) for t in psutil.cpu_times(percpu=True)]
        return {"cpu": cpu, "cores": cores, "syscw": _syscw(self.server_pid), "t": time.monotonic()}

    @staticmethod
    def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = b["t"] - a["t"]
        out: dict[str, Any] = {"wall_s": wall}
        for name in a["cpu"]:
            out[f"{name}_cpu_s"] = b["cpu"][name] - a["cpu"][name]
        out["core_busy"] = [(bb[0] - aa[0]) / max(1e-9, bb[1] - aa[1]) for aa, bb in zip(a["cores"], b["cores"])]
        out["server_writes"] = b["syscw"] - a["syscw"] if a["syscw"] >= 0 and b["syscw"] >= 0 else -1
        return out


def run_scenario(name: str, peer: str, args: argparse.Namespace, *, sse: int, ws: int, filter: str,
                 seconds: float, profile: str | None = None) -> dict[str, Any]:
    """One run: fresh Redis and server; returns figures."""
    import psutil
    from hdrh.histogram import HdrHistogram

    with Redis() as redis:
        url = redis.url
        port = _free_port()
        log = open(SERVER_LOG, "a")
        log.write(f"\n=== {name} / {peer} ===\n")
        log.flush()
        if peer == "oddsfeed":
            env = {"ODDSFEED_MAX_CONNECTIONS_PER_IP": "0", "ODDSFEED_LOG_MAXLEN": "200000",
                   "ODDSFEED_HEARTBEAT_MS": "5000"}
            server = _spawn(["_server", "--redis-url", url, "--port", str(port),
                             *(["--profile", profile] if profile else [])], env=env, stderr=log, stdout=log)
        else:
            server = _spawn(["_peer", "--peer", peer, "--redis-url", url, "--port", str(port)], stderr=log, stdout=log)
        feeder = cl = None
        try:
            common = ["--redis-url", url, "--events", str(args.events), "--mode", peer]
            _wait_port(port, server)
            time.sleep(0.5)
            sp = psutil.Process(server.pid)
            rss_before = sp.memory_info().rss
            cl = _spawn(["_clients", "--port", str(port), "--events", str(args.events), "--mode", peer,
                         "--sse", str(sse), "--ws", str(ws), "--filter", filter, "--drain", str(args.drain),
                         "--sample", str(args.firehose_sample if filter == "all" else 1),
                         *(["--idle"] if filter == "idle" else [])],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert cl.stdin is not None
            ready = _readline(cl, 180)
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode} (see {SERVER_LOG})")
            if ready["ready"] < ready["of"]:
                print(f"  only {ready['ready']} of {ready['of']} clients ready: {ready['errors']}", flush=True)
            if filter == "idle":
                time.sleep(3)
                idle_rss = sp.memory_info().rss
                cl.stdin.write("{}\n{}\n")
                cl.stdin.flush()
                _readline(cl, 60)
                cl.wait(30)
                n = ready["ready"]
                return {"name": name, "peer": peer, "connections": n, "connected": ready,
                        "rss_per_conn_kb": (idle_rss - rss_before) / max(1, n) / 1024,
                        "rss_mb": idle_rss / 2**20, "rss_before_mb": rss_before / 2**20}
            # clients record lag only for updates scheduled inside [t0 + warm-up, t0 + warm-up + seconds)
            t0 = now_ms() + 500
            warm = int(args.warmup * 1000)
            window = (t0 + warm, t0 + warm + int(seconds * 1000))
            cl.stdin.write(json.dumps({"window": window}) + "\n")
            cl.stdin.flush()
            feeder = _spawn(["_feeder", *common, "--rate", str(args.rate), "--seconds", str(args.warmup + seconds),
                             "--t0", str(t0), "--payload-bytes", str(args.payload_bytes)], stdout=subprocess.PIPE)
            procs = {"server": sp, "clients": psutil.Process(cl.pid), "feeder": psutil.Process(feeder.pid)}
            if redis.pid:
                procs["redis"] = psutil.Process(redis.pid)
            meter = Meter(procs, server.pid)
            time.sleep(max(0.0, (window[0] - now_ms()) / 1000))
            m0 = meter.read()
            time.sleep(max(0.0, (window[1] - now_ms()) / 1000))
            m1 = meter.read()
            costs = Meter.diff(m0, m1)
            fed = _readline(feeder, 60 + args.warmup + seconds)
            feeder.wait(30)
            cl.stdin.write(json.dumps({"final_seq": fed["final_seq"]}) + "\n")
            cl.stdin.flush()
            res = _readline(cl, args.drain + 60)
            cl.wait(30)
            rss = sp.memory_info().rss
            hops = _hops(port) if peer == "oddsfeed" else {}
        finally:
            for p in (feeder, cl):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait(5)
            _stop(server)
            log.close()
    h = HdrHistogram(1, 60_000_000, 3)
    if res["hist"]:
        h.decode_and_add(res["hist"])
    wall = costs["wall_s"]
    server_cpu = costs["server_cpu_s"]
    frames = res["in_window"]
    writes = costs["server_writes"]
    return {
        "name": name, "peer": peer, "clients": sse + ws, "sse": sse, "ws": ws, "ready": ready,
        "updates_per_s": args.rate, "delivered_per_s": frames / seconds, "frames": res["frames"],
        "p50_ms": h.get_value_at_percentile(50) / 1000, "p99_ms": h.get_value_at_percentile(99) / 1000,
        "p999_ms": h.get_value_at_percentile(99.9) / 1000, "max_ms": h.get_max_value() / 1000,
        "samples": h.get_total_count(), "lost": res["lost"], "dup": res["dup"], "conflated": res["conflated"],
        "closed": res["closed"], "errors": res["errors"], "server_cpu_s": server_cpu, "wall_s": wall,
        "server_cpu_frac": server_cpu / wall if wall else 0.0,
        "frames_per_cpu_s": frames / server_cpu if server_cpu > 0 else 0.0,
        "cpu_us_per_frame": server_cpu / frames * 1e6 if frames else 0.0,
        "server_writes": writes, "frames_per_write": frames / writes if writes > 0 else 0.0,
        "frames_per_client_read": res["win_frames"] / res["reads"] if res["reads"] else 0.0,
        "wire_bytes_per_frame": res["bytes"] / res["win_frames"] if res["win_frames"] else 0.0,
        "client_cpu_frac": costs["clients_cpu_s"] / wall if wall else 0.0,
        "feeder_cpu_frac": costs["feeder_cpu_s"] / wall if wall else 0.0,
        "redis_cpu_frac": costs.get("redis_cpu_s", 0.0) / wall if wall else 0.0,
        "core_busy": costs["core_busy"], "lag_sampled_1_in": 1 if filter != "all" else args.firehose_sample,
        "feeder_max_behind_ms": fed["max_behind_ms"], "payload_bytes": args.payload_bytes if peer != "oddsfeed" else 0,
        "rss_mb": rss / 2**20, "hops": hops, "hist": res["hist"],
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
        return (f"  {r['name']:<9} {r['peer']:<10} {r['connections']:>6} idle connections: "
                f"{r['rss_per_conn_kb']:.1f} KB RSS each (server RSS {r['rss_before_mb']:.0f} → {r['rss_mb']:.0f} MB)")
    busy = " / ".join(f"{b * 100:.0f}%" for b in r["core_busy"])
    flags = []
    if r["client_cpu_frac"] > 0.7:
        flags.append("client process over 70% of a core: lag may be the generator's")
    if len(r["core_busy"]) > LOAD_CPU and r["core_busy"][LOAD_CPU] > 0.95:
        flags.append(f"CPU {LOAD_CPU} saturated: lag not valid")
    return (f"  {r['name']:<9} {r['peer']:<10} {r['sse']:>4} SSE + {r['ws']:>4} WS  delivered {r['delivered_per_s']:>9,.0f} "
            f"frames/s  lag p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} p99.9 {r['p999_ms']:.1f} max {r['max_ms']:.1f} ms "
            f"(n={r['samples']:,})  lost {r['lost']} dup {r['dup']} conflated {r['conflated']}\n"
            f"            server: CPU {r['server_cpu_frac'] * 100:.0f}% = {r['cpu_us_per_frame']:.2f} µs/frame "
            f"({r['frames_per_cpu_s']:,.0f} frames/CPU-s), {r['frames_per_write']:.1f} frames/write "
            f"({r['server_writes']:,} writes), RSS {r['rss_mb']:.0f} MB; {r['wire_bytes_per_frame']:.0f} B/frame on "
            f"the wire, {r['frames_per_client_read']:.1f} frames per client read\n"
            f"            load: clients {r['client_cpu_frac'] * 100:.0f}%, feeder {r['feeder_cpu_frac'] * 100:.0f}%, "
            f"redis {r['redis_cpu_frac'] * 100:.0f}% of a core; cores busy {busy}; feeder max behind "
            f"{r['feeder_max_behind_ms']} ms" + (f"  [{'; '.join(flags)}]" if flags else "")
            + ("\n            hops (whole run, incl. warm-up): " + "; ".join(f"{k} {v}" for k, v in r["hops"].items())
               if r.get("hops") else ""))


def _verdict(target: str, ok: bool | None, figure: str, peers: str, peers_label: str = "same run") -> str:
    mark = "n/a" if ok is None else ("met" if ok else "NOT MET")
    return f"  [{mark}] {target}\n        figure: {figure}\n        {peers_label}: {peers}"


def _peer_costs(results: dict[str, dict[str, Any]], shape: str, skip: str = "oddsfeed") -> str:
    parts = []
    for peer in PEERS:
        r = results.get(f"{shape}/{peer}")
        if r and peer != skip:
            parts.append(f"{peer} {r['cpu_us_per_frame']:.2f} µs/frame at {r['frames_per_write']:.1f} frames/write "
                         f"(p99 {r['p99_ms']:.1f} ms, lost {r['lost']})")
    return "; ".join(parts) or "no peer ran"


RATIOS = (("lag_floor", "one event per client: oddsfeed ÷ floor, µs per frame"),
          ("firehose_floor", "firehose: oddsfeed ÷ floor, µs per frame"),
          ("lag_starlette", "one event per client: oddsfeed ÷ Starlette, frames per CPU-s"))


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The same-run ratios behind the issue's relative targets (those whose servers ran)."""
    out: dict[str, float] = {}
    for shape in ("lag", "firehose"):
        ours, floor = results.get(f"{shape}/oddsfeed"), results.get(f"{shape}/floor")
        if ours and floor and ours["cpu_us_per_frame"] and floor["cpu_us_per_frame"]:  # (0: nothing delivered)
            out[f"{shape}_floor"] = ours["cpu_us_per_frame"] / floor["cpu_us_per_frame"]
    ours, base = results.get("lag/oddsfeed"), results.get("lag/starlette")
    if ours and base and ours["frames_per_cpu_s"] and base["frames_per_cpu_s"]:
        out["lag_starlette"] = ours["frames_per_cpu_s"] / base["frames_per_cpu_s"]
    return out


def _ratios_line(r: dict[str, float]) -> str:
    return "; ".join(f"{label} {r[key]:.2f}×" for key, label in RATIOS if key in r) or "no pair of servers ran"


def median_results(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per (shape, server): the whole result of the round whose µs per frame (idle: KB per
    connection) is the median (the lower middle one of an even count; a round that delivered
    nothing counts as the worst), with lost and duplicated taken from the worst round."""
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(k for r in rounds for k in r):
        got = [r[key] for r in rounds if key in r]
        metric = "rss_per_conn_kb" if key.startswith("idle/") else "cpu_us_per_frame"
        got.sort(key=lambda x: x.get(metric) or float("inf"))
        med = dict(got[(len(got) - 1) // 2])
        for worst in ("lost", "dup"):
            if worst in med:
                med[worst] = max(x.get(worst, 0) for x in got)
        med["rounds"] = len(got)
        out[key] = med
    return out


def summary(results: dict[str, dict[str, Any]], per_round: list[dict[str, float]] | None = None) -> list[str]:
    """The issue's targets against ``results``; with ``per_round`` (several rounds), the ratio
    targets are judged on the median of the rounds' same-run ratios."""
    head = "floor and peers of this run" if per_round is None else f"median of {len(per_round)} rounds"
    plabel = "same run" if per_round is None else "peers (each its median round)"
    out = ["", f"=== issue 11 targets (figure, target, met / not met, {head}) ==="]
    med: dict[str, float] = {}
    spread: dict[str, str] = {}
    if per_round:
        for key, _ in RATIOS:
            xs = [r[key] for r in per_round if key in r]
            if xs:
                med[key] = statistics.median(xs)
                spread[key] = f" (rounds: {', '.join(f'{x:.2f}×' for x in xs)})"
    for shape, label in (("lag", "one event per client (≈20 frames/s each)"), ("firehose", "firehose")):
        ours, floor = results.get(f"{shape}/oddsfeed"), results.get(f"{shape}/floor")
        if ours and floor and floor["cpu_us_per_frame"]:
            x = med.get(f"{shape}_floor", ours["cpu_us_per_frame"] / floor["cpu_us_per_frame"])
            out.append(_verdict(f"µs per delivered frame ≤ 1.5× the floor, {label}",
                                x <= 1.5 if ours["cpu_us_per_frame"] else None,
                                f"oddsfeed {ours['cpu_us_per_frame']:.2f} µs/frame at {ours['frames_per_write']:.1f} "
                                f"frames/write = {x:.2f}× the floor{spread.get(f'{shape}_floor', '')}",
                                _peer_costs(results, shape), plabel))
    ours, base = results.get("lag/oddsfeed"), results.get("lag/starlette")
    if ours and base and ours["frames_per_cpu_s"]:
        x = ours["frames_per_cpu_s"] / base["frames_per_cpu_s"] if base["frames_per_cpu_s"] else float("inf")
        x = med.get("lag_starlette", x)
        out.append(_verdict("≥ 2× the Starlette baseline (frames per CPU-second), one event per client", x >= 2,
                            f"{x:.2f}× ({ours['frames_per_cpu_s']:,.0f} vs {base['frames_per_cpu_s']:,.0f} frames/CPU-s)"
                            f"{spread.get('lag_starlette', '')}",
                            _peer_costs(results, "lag"), plabel))
    idle = results.get("idle/oddsfeed")
    if idle:
        peers = "; ".join(f"{p} {results[f'idle/{p}']['rss_per_conn_kb']:.1f} KB"
                          for p in PEERS if p != "oddsfeed" and f"idle/{p}" in results) or "no peer ran"
        out.append(_verdict(f"RSS per idle connection at {idle['connections']:,} connections ≤ 4 KB",
                            idle["rss_per_conn_kb"] <= 4, f"{idle['rss_per_conn_kb']:.1f} KB (server RSS; kernel "
                            "socket memory not included)", peers, plabel))
    lag = results.get("lag/oddsfeed")
    if lag:
        ok = lag["p50_ms"] <= 5 and lag["p99_ms"] <= 25 and not lag["lost"] and not lag["dup"]
        peers = "; ".join(f"{p} p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms, lost {r['lost']}, dup {r['dup']}"
                          for p in PEERS if p != "oddsfeed" and (r := results.get(f"lag/{p}")))
        out.append(_verdict(f"{lag['updates_per_s']:,} updates/s to {lag['clients']:,} clients: p50 ≤ 5 ms, p99 ≤ 25 ms "
                            "emit → client, zero lost or duplicated (full ingest path: ESA lines → ingest → Redis → node)",
                            ok, f"p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms, p99.9 {lag['p999_ms']:.1f} ms, "
                            f"lost {lag['lost']}, dup {lag['dup']}", peers or "no peer ran", plabel))
    fh = results.get("firehose/oddsfeed")
    if fh:
        peers = "; ".join(f"{p} p99 {r['p99_ms']:.1f} ms, lost {r['lost']}"
                          for p in PEERS if p != "oddsfeed" and (r := results.get(f"firehose/{p}")))
        out.append(_verdict("firehose: p99 ≤ 100 ms, zero loss (DESIGN §10)", fh["p99_ms"] <= 100 and not fh["lost"]
                            and not fh["dup"], f"p99 {fh['p99_ms']:.1f} ms, lost {fh['lost']}, dup {fh['dup']}, "
                            f"{fh['delivered_per_s']:,.0f} frames/s", peers or "no peer ran", plabel))
    return out


def write_pngs(results: dict[str, dict[str, Any]], out_dir: Path | None, note: str) -> list[Path]:
    from hdrh.histogram import HdrHistogram

    plt = plots.pyplot()
    paths = []
    shapes = [s for s in ("lag", "firehose") if any(f"{s}/{p}" in results for p in PEERS)]
    if shapes:
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            lines = []
            for peer in PEERS:
                r = results.get(f"{shape}/{peer}")
                h = None
                if r and r.get("hist"):
                    h = HdrHistogram(1, 60_000_000, 3)
                    h.decode_and_add(r["hist"])
                lines.append((peer, h))
            r0 = next(results[f"{shape}/{p}"] for p in PEERS if f"{shape}/{p}" in results)
            title = (f"{shape}: {r0['updates_per_s']:,} updates/s, {r0['clients']:,} clients"
                     + (" on everything" if shape == "firehose" else " each on one event"))
            plots.cdf_axes(ax, lines, title, ylabel="emit → client lag, ms (log)")
        fig.suptitle(f"fan-out lag CDF — {note}", fontsize=8)
        paths.append(plots.save(fig, "fanout-lag-cdf", out_dir))
    panels = [(s, f"µs of server CPU per frame — {s}") for s in shapes]
    if any(f"idle/{p}" in results for p in PEERS):
        panels.append(("idle", "KB RSS per idle connection"))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
        for ax, (shape, title) in zip(axes[0], panels):
            rs = [results[f"{shape}/{p}"] for p in PEERS if f"{shape}/{p}" in results]
            if shape == "idle":
                plots.bar_axes(ax, [r["peer"] for r in rs], [r["rss_per_conn_kb"] for r in rs],
                               f"{title} ({rs[0]['connections']:,} conns)", "KB", target=4.0, target_label="target 4 KB",
                               colors=[f"C{PEERS.index(r['peer'])}" for r in rs])
            else:
                floor = results.get(f"{shape}/floor")
                plots.bar_axes(ax, [r["peer"] for r in rs], [r["cpu_us_per_frame"] for r in rs], title, "µs / frame",
                               notes=[f"{r['frames_per_write']:.1f} fr/write" for r in rs],
                               target=1.5 * floor["cpu_us_per_frame"] if floor else None,
                               target_label="target: 1.5× floor", colors=[f"C{PEERS.index(r['peer'])}" for r in rs])
        fig.suptitle(f"fan-out cost per peer — {note}", fontsize=8)
        paths.append(plots.save(fig, "fanout-cost", out_dir))
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=2000, help="updates per second (default 2000)")
    p.add_argument("--events", type=int, default=100, help=f"events, {MARKETS_PER_EVENT} markets each (default 100)")
    p.add_argument("--clients", type=int, default=1000,
                   help="clients in the one-event-per-client shape, half SSE half WS (default 1000)")
    p.add_argument("--firehose-clients", type=int, default=100, help="clients on everything (default 100)")
    p.add_argument("--idle", type=int, default=10_000, help="idle connections for the memory figure (default 10000)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10, at most 60)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds, not measured (default 2)")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for late deltas (default 10)")
    p.add_argument("--only", choices=["lag", "firehose", "idle"], action="append",
                   help="run only these shapes (repeatable)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"servers to run, comma-separated (default {','.join(PEERS)})")
    p.add_argument("--firehose-sample", type=int, default=10,
                   help="firehose: record the lag of every n-th delta (all are checked for loss; default 10)")
    p.add_argument("--payload-bytes", type=int, default=0,
                   help="peers' JSON bytes per update (default: oddsfeed's wire size measured in this run, "
                        f"else {DEFAULT_PAYLOAD})")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every (shape, server) this many times, round-robin; medians reported (default 1, at most 5)")
    p.add_argument("--profile", action="store_true", help="also a short profiled oddsfeed firehose run (cProfile)")
    p.add_argument("--png-dir", type=Path, default=None, help="where the PNGs go (default docs/bench/)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--json", type=Path, help="write the raw figures (with base64 HdrHistograms) here")
    args = p.parse_args()
    if not (0 < args.duration <= 60 and 0 < args.rate <= 20_000 and args.idle <= 20_000 and args.drain <= 60
            and 1 <= args.rounds <= 5):
        p.error("bounded runs only: --duration ≤ 60, --rate ≤ 20000, --idle ≤ 20000, --drain ≤ 60, --rounds 1–5")
    peers = [x for x in args.peers.split(",") if x]
    if unknown := set(peers) - set(PEERS):
        p.error(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    peers = [x for x in PEERS if x in peers]  # oddsfeed first: its frame size sizes the peers' payloads
    parts = set(args.only or ["lag", "firehose", "idle"])
    _pin(LOAD_CPU)
    import hdrh  # noqa: F401  (fail early)
    import psutil  # noqa: F401

    load_before = os.getloadavg()
    print(plots.header("fan-out benchmark"), flush=True)
    print(f"  {args.rate} updates/s over {args.events} events × {MARKETS_PER_EVENT} markets; servers on CPU {SERVER_CPU}, "
          f"redis + feeder + clients on CPU {LOAD_CPU}; {args.duration:g} s measured after {args.warmup:g} s warm-up "
          f"per run; servers: {', '.join(peers)}", flush=True)
    rounds: list[dict[str, dict[str, Any]]] = [{} for _ in range(args.rounds)]
    runs = []
    for shape in ("lag", "firehose", "idle"):
        if shape not in parts:
            continue
        total = {"lag": args.clients, "firehose": args.firehose_clients, "idle": args.idle}[shape]
        flt = {"lag": "event", "firehose": "all", "idle": "idle"}[shape]
        for peer in peers:
            half = 0 if peer == "websockets" else total // 2  # websockets.broadcast(): WebSocket only
            runs.append((shape, peer, dict(sse=half, ws=total - half, filter=flt)))
    failed = False
    sized = args.payload_bytes > 0  # given on the command line: kept
    args.payload_bytes = args.payload_bytes or DEFAULT_PAYLOAD
    for k, results in enumerate(rounds):
        if args.rounds > 1:
            print(f"\n=== round {k + 1}/{args.rounds} ===", flush=True)
        for name, peer, kw in runs:
            print(f"\nrunning {name} against {peer} …", flush=True)
            try:
                r = run_scenario(name, peer, args, seconds=args.duration, sse=int(kw["sse"]), ws=int(kw["ws"]),
                                 filter=str(kw["filter"]))
            except Exception as exc:  # a peer that falls over is a result too
                print(f"  {name}/{peer} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            results[f"{name}/{peer}"] = r
            print(_fmt(r), flush=True)
            if r.get("errors"):
                print(f"  client errors (first): {r['errors']}")
            if name != "idle" and (r["lost"] or r["dup"]):
                failed = failed or peer == "oddsfeed"
            if peer == "oddsfeed" and name != "idle" and not sized and r["wire_bytes_per_frame"]:
                # peers' JSON sized so their frames on the wire match oddsfeed's (SSE/WS framing ≈ 10 B)
                args.payload_bytes = max(200, round(r["wire_bytes_per_frame"]) - 10)
                sized = True
                print(f"  peers' updates padded to {args.payload_bytes} B of JSON (oddsfeed: "
                      f"{r['wire_bytes_per_frame']:.0f} B per frame on the wire)", flush=True)
        if args.rounds > 1:
            print(f"  round {k + 1} same-run ratios: {_ratios_line(ratios(results))}", flush=True)
    results = median_results(rounds)
    per_round = [ratios(r) for r in rounds]
    prof_out = None
    if args.profile and "oddsfeed" in peers:
        prof_file = tempfile.mktemp(suffix=".prof")
        print("\nprofiling oddsfeed during a short firehose run (cProfile slows it: figures not reported) …", flush=True)
        try:
            half = args.firehose_clients // 2
            run_scenario("profile", "oddsfeed", args, seconds=min(8.0, args.duration), profile=prof_file,
                         sse=half, ws=args.firehose_clients - half, filter="all")
            s = io.StringIO()
            pstats.Stats(prof_file, stream=s).sort_stats("tottime").print_stats(22)
            prof_out = s.getvalue()
        except Exception as exc:
            print(f"  profile run failed: {exc}")
    load_after = os.getloadavg()
    note = (f"{os.cpu_count()} CPUs, load avg {load_before[0]:.2f} before → {load_after[0]:.2f} after; "
            f"{args.rate:,} updates/s, {args.duration:g} s per run")
    for line in summary(results, per_round if args.rounds > 1 else None):
        print(line)
    print(f"\nmachine: {os.cpu_count()} CPUs; load average before {load_before[0]:.2f} / {load_before[1]:.2f} / "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (1/5/15 min)")
    if prof_out:
        print("\n=== where oddsfeed's time goes (firehose, cProfile, top by own time) ===")
        print("\n".join(prof_out.splitlines()[:40]))
    if not args.no_png and results:
        for path in write_pngs(results, args.png_dir, note):
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"server stderr (all runs): {SERVER_LOG}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "rounds": rounds if args.rounds > 1 else None,
                                         "ratios_per_round": per_round, "load_before": load_before,
                                         "load_after": load_after, "cpus": os.cpu_count(), "argv": sys.argv},
                                        default=str))
        print(f"raw figures: {args.json}")
    return 1 if failed else 0


def _sub(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--redis-url")
    p.add_argument("--port", type=int)
    p.add_argument("--profile")
    p.add_argument("--peer")
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--mode", default="oddsfeed")
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--t0", type=int, default=0)
    p.add_argument("--payload-bytes", type=int, default=DEFAULT_PAYLOAD)
    p.add_argument("--sse", type=int, default=0)
    p.add_argument("--ws", type=int, default=0)
    p.add_argument("--filter", default="event")
    p.add_argument("--idle", action="store_true")
    p.add_argument("--drain", type=float, default=10)
    p.add_argument("--sample", type=int, default=1)
    a = p.parse_args(argv)
    {"_server": cmd_server, "_peer": cmd_peer_server, "_feeder": cmd_feeder, "_clients": cmd_clients}[a.cmd](a)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        _sub(sys.argv[1:])
    else:
        sys.exit(main())
