"""Price-check latency over HTTP at a fixed request rate, with a plain Redis
GET round trip measured the same way in the same run as a floor.

Processes (all on 127.0.0.1):

- redis-server (the embedded one, Unix socket unless ``--redis-tcp``);
- ``oddsfeed simulate`` (Betfair ESA protocol, ``--sim-rate`` updates/s) and
  ``oddsfeed ingest --esa`` writing it to Redis, so prices move during the run;
- ``oddsfeed serve``: ONE API node (uvicorn; ``--http``/``--loop`` pick the
  HTTP parser and event loop, default what ``oddsfeed serve`` uses);
- this process: the load generator. Open loop: request i is due at
  ``t0 + i / rate`` whatever happened to earlier ones, sent on a free
  keep-alive connection of a pool (one request in flight per connection,
  connections used round robin);
  raw asyncio sockets and a minimal HTTP/1.1 parser, so the generator costs
  little CPU. Bounded: ``--seconds`` (after ``--warmup-s``) at ``--rate``.

Latency = send → last byte of the response, per request, in an
HdrHistogram (µs). "from schedule" = due time → response (includes any
wait for a free connection and the generator's own ~1 ms timer granularity;
coordinated-omission safe). The Redis floor sends ``GET <snapshot key>`` on
its own pool at the same rate, to the same Redis the API node reads. The
Python HTTP floor (``benchmarks/baselines/http_floor.py``: a bare
``asyncio.Protocol`` on the same event loop answering every request with a
byte-for-byte copy of one of the node's answers) gets the same requests at the
same rate: its CPU per request is printed beside the node's — what a Python
process pays per request/response on this machine before any work of ours.

Usage::

    python benchmarks/price_check.py [--rate 2000] [--seconds 10] [--warmup-s 2] [--connections 32]
                                     [--http auto|h11|httptools] [--loop auto|asyncio|uvloop] [--no-fast-path]

Targets (DESIGN §10, issue 11), printed with figure and met / not met:
price check over HTTP p99 ≤ 2 ms at 2k req/s; p99 ≤ 3× the Redis GET p99 of
the same run; API node CPU per check ≤ 100 µs. Also prints the machine's
load before/after and writes ``docs/bench/price-check-latency.png``
(latency CDF, price check and Redis GET; ``--png-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import importlib.util
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from hdrh.histogram import HdrHistogram  # noqa: E402

from feed.embedded_redis import EmbeddedRedis  # noqa: E402
from feed.store import market_key  # noqa: E402
from benchmarks import plots  # noqa: E402

TARGET_P99_MS = 2.0
TARGET_X_REDIS = 3.0
TARGET_CPU_US = 100.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), seconds."""
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (Linux /proc), seconds: user space (Python, uvicorn, the
    check) and kernel (socket reads/writes, epoll; on loopback a send also pays for much of
    the receiving side's TCP work)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tck, int(fields[12]) / tck
    except (OSError, IndexError, ValueError):
        return float("nan"), float("nan")


# -- load generator ------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.service = HdrHistogram(1, 60_000_000, 3)    # µs, send → response
        self.scheduled = HdrHistogram(1, 60_000_000, 3)  # µs, due → response
        self.count = 0
        self.errors = 0
        self.late_sends = 0  # requests that waited for a free connection
        self.reasons: Counter[str] = Counter()
        self.error_kinds: Counter[str] = Counter()


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request in flight. ``parse`` turns the
    buffer into (consumed bytes, result) or None when incomplete; a
    connection lost with a request in flight reports ``on_lost``."""

    def __init__(self, parse: Callable[[bytearray], tuple[int, Any] | None], on_done: Callable[["_Conn", Any], None],
                 on_lost: Callable[["_Conn", Exception | None], None]) -> None:
        self.parse = parse
        self.on_done = on_done
        self.on_lost = on_lost
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent_ns = 0
        self.due_ns = 0
        self.in_flight = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        got = self.parse(self.buf)
        if got is not None:
            n, result = got
            del self.buf[:n]
            self.in_flight = False
            self.on_done(self, result)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.on_lost(self, exc)

    def send(self, payload: bytes, due_ns: int) -> None:
        self.due_ns = due_ns
        self.sent_ns = time.perf_counter_ns()
        self.in_flight = True
        assert self.transport is not None
        self.transport.write(payload)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


def parse_http(buf: bytearray) -> tuple[int, Any] | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    i = head.find(b"content-length:")
    if i < 0:
        raise RuntimeError(f"response without content-length: {head[:200]!r}")
    j = head.find(b"\r\n", i)
    length = int(head[i + 15:j if j >= 0 else None])
    total = end + 4 + length
    if len(buf) < total:
        return None
    status = int(head[9:12])
    return total, (status, bytes(buf[end + 4:total]))


def parse_resp(buf: bytearray) -> tuple[int, Any] | None:
    """One RESP bulk-string reply ($<n>\\r\\n<data>\\r\\n or $-1\\r\\n)."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    if buf[:1] != b"$":
        raise RuntimeError(f"unexpected redis reply {bytes(buf[:80])!r}")
    n = int(buf[1:end])
    if n < 0:
        return end + 2, None
    total = end + 2 + n + 2
    if len(buf) < total:
        return None
    return total, bytes(buf[end + 2:end + 2 + n])


Connect = Callable[[Callable[[_Conn, Any], None], Callable[[_Conn, Exception | None], None]], Any]


async def open_loop(name: str, connect: Connect, payloads: list[bytes], rate: float, n: int, stats: Stats | None,
                    classify: Callable[[Any], str | None]) -> None:
    """Send ``n`` requests at ``rate``/s, open loop; record into ``stats`` (None = warm-up)."""
    free: deque[_Conn] = deque()  # FIFO: every connection stays busy (no idle keep-alive timeouts)
    conns: list[_Conn] = []
    backlog: deque[tuple[bytes, int]] = deque()
    done = asyncio.get_running_loop().create_future()
    finished = 0
    reconnects: set[asyncio.Task[None]] = set()

    def finish() -> None:
        nonlocal finished
        finished += 1
        if finished == n and not done.done():
            done.set_result(None)

    def next_for(conn: _Conn) -> None:
        if backlog:
            payload, due = backlog.popleft()
            conn.send(payload, due)
        else:
            free.append(conn)

    def on_done(conn: _Conn, result: Any) -> None:
        now = time.perf_counter_ns()
        if stats is not None:
            stats.count += 1
            stats.service.record_value(max(1, (now - conn.sent_ns) // 1000))
            stats.scheduled.record_value(max(1, (now - conn.due_ns) // 1000))
            why = classify(result)
            if why is None:
                stats.errors += 1
                stats.error_kinds[describe(result)] += 1
            else:
                stats.reasons[why] += 1
        finish()
        next_for(conn)

    async def replace() -> None:
        try:
            conn = await connect(on_done, on_lost)
        except OSError:
            return
        conns.append(conn)
        next_for(conn)

    def on_lost(conn: _Conn, exc: Exception | None) -> None:
        if conn in free:
            free.remove(conn)
        if conn.in_flight:
            conn.in_flight = False
            if stats is not None:
                stats.errors += 1
                stats.error_kinds[f"connection lost ({exc or 'closed by server'})"] += 1
            finish()
        if not done.done():
            t = asyncio.get_running_loop().create_task(replace())
            reconnects.add(t)
            t.add_done_callback(reconnects.discard)

    for _ in range(args.connections):
        conns.append(await connect(on_done, on_lost))
    free.extend(conns)
    interval_ns = int(1e9 / rate)
    t0 = time.perf_counter_ns() + 20_000_000
    for i in range(n):
        due = t0 + i * interval_ns
        delay = (due - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        payload = payloads[i % len(payloads)]
        if free:
            free.popleft().send(payload, due)
        else:
            if stats is not None:
                stats.late_sends += 1
            backlog.append((payload, due))
    try:
        await asyncio.wait_for(done, timeout=30)
    except asyncio.TimeoutError:
        print(f"  {name}: {n - finished} requests unanswered after 30 s", file=sys.stderr)
    for c in conns:
        c.close()


def http_payloads(host: str, port: int, legs: list[dict[str, Any]]) -> list[bytes]:
    out = []
    for leg in legs:
        body = json.dumps(leg, separators=(",", ":")).encode()
        out.append(b"POST /v1/price-check HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body))
    return out


def resp_payloads(keys: list[str]) -> list[bytes]:
    return [b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k.encode()), k.encode()) for k in keys]


def classify_http(result: Any) -> str | None:
    status, body = result
    if status != 200:
        return None
    i = body.find(b'"reason":"')
    return body[i + 10:body.find(b'"', i + 10)].decode() if i >= 0 else None


def describe(result: Any) -> str:
    if isinstance(result, tuple):
        status, body = result
        return f"{status} {body[:120].decode(errors='replace')}"
    return repr(result)[:120]


async def raw_answer(host: str, port: int, payload: bytes) -> bytes:
    """The whole HTTP response (head and body, bytes as sent) to one request."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        buf = bytearray()
        while (got := parse_http(buf)) is None:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                raise RuntimeError("the API node closed the connection before answering")
            buf += data
        return bytes(buf[:got[0]])
    finally:
        writer.close()


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Until a TCP connection to 127.0.0.1:``port`` opens (``proc`` exiting first: SystemExit)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the process for port {port} exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise SystemExit(f"nothing listening on port {port} after {timeout_s:g} s")


def classify_redis(result: Any) -> str | None:
    return "hit" if result is not None else "miss"


# -- processes -------------------------------------------------------------------------


class Procs:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        self.logs[name] = log
        f = open(log, "wb")
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        f.close()
        self.procs.append((name, p))
        return p

    def stop(self) -> None:
        """SIGTERM each, newest first, waiting for one before the next (the
        ingest stops while its simulator is still there)."""
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                tail = self.logs[name].read_text(errors="replace")[-1500:]
                print(f"  {name} did not stop on SIGTERM within 15 s; killing it. Its log ends:\n{tail}",
                      file=sys.stderr)
                p.kill()
                p.wait(5)


def percentiles(h: HdrHistogram) -> dict[str, float]:
    return {p: h.get_value_at_percentile(q) / 1000 for p, q in
            (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))} | {"max": h.get_max_value() / 1000}


def line(label: str, s: Stats, seconds: float) -> str:
    sv, sc = percentiles(s.service), percentiles(s.scheduled)
    return (f"  {label:<22} n={s.count:>6}  {s.count / seconds:>7.0f}/s  errors={s.errors}  "
            f"p50={sv['p50']:.3f}  p90={sv['p90']:.3f}  p99={sv['p99']:.3f}  p99.9={sv['p99.9']:.3f}  "
            f"max={sv['max']:.3f} ms\n"
            f"  {'  from schedule':<22} {'':>24}  p50={sc['p50']:.3f}  p90={sc['p90']:.3f}  p99={sc['p99']:.3f}  "
            f"p99.9={sc['p99.9']:.3f}  max={sc['max']:.3f} ms  (waited for a connection: {s.late_sends})")


async def main_async() -> int:
    load_before = os.getloadavg()
    print(plots.header("price check benchmark"), flush=True)
    work = Path(tempfile.mkdtemp(prefix="oddsfeed-bench-pc-"))
    redis = EmbeddedRedis(work / "redis", appendonly=False, port=free_port() if args.redis_tcp else None)
    url = redis.start()
    procs = Procs()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sim_port, api_port = free_port(), free_port()
    py = sys.executable
    try:
        procs.start("simulate", [py, "-m", "feed", "simulate", "--port", str(sim_port), "--events", str(args.events),
                                 "--rate", str(args.sim_rate), "--seed", "5"], env, work / "simulate.log")
        await asyncio.sleep(1.0)
        procs.start("ingest", [py, "-m", "feed", "ingest", "--redis-url", url, "--esa", f"127.0.0.1:{sim_port}",
                               "--app-key", "sim-app-key", "--session", "sim-session"], env, work / "ingest.log")
        serve_env = dict(env)
        if args.no_fast_path:  # every check through ASGI (streaming.fastpath off)
            serve_env["ODDSFEED_PRICE_CHECK_FAST_PATH"] = "false"
        serve_cmd = [py, "-c", SERVE_SNIPPET, url, str(api_port), args.http, args.loop, "1" if args.tune_gc else "0"]
        api = procs.start("serve", serve_cmd, serve_env, work / "serve.log")
        base = f"http://127.0.0.1:{api_port}"
        markets: list[dict[str, Any]] = []
        async with httpx.AsyncClient(base_url=base, timeout=2) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/ready")).status_code == 200:
                        markets = [m for m in (await http.get("/v1/markets")).json()["markets"]
                                   if m["status"] == "OPEN" and m["selections"]]
                        if len(markets) >= 4:
                            break
                if api.poll() is not None:
                    raise SystemExit(f"serve exited: {(work / 'serve.log').read_text()[-2000:]}")
                await asyncio.sleep(0.25)
            else:
                raise SystemExit(f"no open markets served within 60 s (logs in {work})")
            impl = (await http.get("/health")).headers.get("server", "?")
        rng = random.Random(1)
        legs = []
        for m in markets:
            for s in m["selections"]:
                if s["back"]:
                    legs.append({"market_id": m["market_id"], "selection_id": s["selection_id"], "side": "back",
                                 "price": s["back"][0][0]})
                if s["lay"]:
                    legs.append({"market_id": m["market_id"], "selection_id": s["selection_id"], "side": "lay",
                                 "price": s["lay"][0][0]})
        rng.shuffle(legs)
        payloads = http_payloads("127.0.0.1", api_port, legs)
        keys = [market_key(0, m["market_id"]) for m in markets]  # partitions = 1 (the default)
        rpayloads = resp_payloads(keys)
        loop = asyncio.get_running_loop()

        async def http_conn(on_done: Any, on_lost: Any) -> _Conn:
            _, proto = await loop.create_connection(lambda: _Conn(parse_http, on_done, on_lost), "127.0.0.1",
                                                    api_port)
            return proto

        async def redis_conn(on_done: Any, on_lost: Any) -> _Conn:
            if url.startswith("unix://"):
                _, proto = await loop.create_unix_connection(lambda: _Conn(parse_resp, on_done, on_lost), url[7:])
            else:
                host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
                _, proto = await loop.create_connection(lambda: _Conn(parse_resp, on_done, on_lost), host, int(port))
            return proto

        n = int(args.rate * args.seconds)
        warm = int(args.rate * args.warmup_s)
        print(f"price check over HTTP: {args.rate:g} req/s open loop for {args.seconds:g} s "
              f"(+{args.warmup_s:g} s warm-up), {args.connections} keep-alive connections, "
              f"{len(markets)} markets / {len(legs)} legs, simulator {args.sim_rate:g} updates/s")
        print(f"machine: {os.cpu_count()} cores (load average {os.getloadavg()[0]:.2f}), "
              f"Python {platform.python_version()}, server header {impl!r}, "
              f"uvicorn http={args.http} loop={args.loop}, tune_gc={args.tune_gc}, redis {url.split(':')[0]}, "
              f"fast path {'off' if args.no_fast_path else 'on'}")
        await open_loop("warm-up", http_conn, payloads, args.rate, warm, None, classify_http)
        pc = Stats()
        split0, t0 = cpu_split(api.pid), time.perf_counter()
        await open_loop("price check", http_conn, payloads, args.rate, n, pc, classify_http)
        split1 = cpu_split(api.pid)
        pc_wall = time.perf_counter() - t0
        pc_user, pc_sys = split1[0] - split0[0], split1[1] - split0[1]
        pc_cpu = pc_user + pc_sys
        await open_loop("redis warm-up", redis_conn, rpayloads, args.rate, warm, None, classify_redis)
        rd = Stats()
        idle_cpu0, t1 = cpu_seconds(api.pid), time.perf_counter()
        await open_loop("redis GET", redis_conn, rpayloads, args.rate, n, rd, classify_redis)
        rd_wall = time.perf_counter() - t1
        # the node's own background work (partition reader, health poller) on the same feed, measured
        # while it serves nothing (during the Redis GET run): what a check costs beyond it is the request path
        idle_rate = (cpu_seconds(api.pid) - idle_cpu0) / rd_wall
        # the Python floor of a request/response (benchmarks/baselines/http_floor.py): the same requests
        # answered with a copy of one of the node's own answers, bytes for bytes, by a bare protocol
        answer_file = work / "floor-answer.http"
        answer_file.write_bytes(await raw_answer("127.0.0.1", api_port, payloads[0]))
        floor_port = free_port()
        # (on the node's event loop: the floor follows --loop, and says so below)
        floor_proc = procs.start("http floor", [py, "-m", "benchmarks.baselines.http_floor", "--port", str(floor_port),
                                                "--answer", str(answer_file), "--loop", args.loop],
                                 env, work / "http_floor.log")
        await wait_listening(floor_port, floor_proc)

        async def floor_conn(on_done: Any, on_lost: Any) -> _Conn:
            _, proto = await loop.create_connection(lambda: _Conn(parse_http, on_done, on_lost), "127.0.0.1",
                                                    floor_port)
            return proto

        await open_loop("floor warm-up", floor_conn, payloads, args.rate, warm, None, classify_http)
        fl = Stats()
        fl_cpu0, t2 = cpu_seconds(floor_proc.pid), time.perf_counter()
        await open_loop("http floor", floor_conn, payloads, args.rate, n, fl, classify_http)
        fl_wall = time.perf_counter() - t2
        fl_cpu = cpu_seconds(floor_proc.pid) - fl_cpu0

        print()
        print(line("POST /v1/price-check", pc, pc_wall))
        print(line("redis GET (floor)", rd, rd_wall))
        print(line("Python HTTP floor", fl, fl_wall))
        print(f"  answers: {dict(pc.reasons.most_common())}")
        if pc.error_kinds or rd.error_kinds:
            print(f"  errors: {dict(pc.error_kinds.most_common(5))} {dict(rd.error_kinds.most_common(5))}")
        print(f"  API node CPU: {pc_cpu:.2f} s over {pc_wall:.1f} s = {pc_cpu / pc_wall * 100:.0f}% of one core, "
              f"{pc_cpu / max(1, pc.count) * 1e6:.0f} µs per request (incl. its reader/health tasks): "
              f"user {pc_user / max(1, pc.count) * 1e6:.0f} µs + kernel {pc_sys / max(1, pc.count) * 1e6:.0f} µs")
        bg_us = idle_rate * pc_wall / max(1, pc.count) * 1e6
        print(f"    of which background: {idle_rate * 100:.1f}% of one core while serving nothing (reader/health on the "
              f"same feed, measured during the Redis GET run) = {bg_us:.0f} µs per request at this rate; "
              f"the price-check path: {pc_cpu / max(1, pc.count) * 1e6 - bg_us:.0f} µs per request "
              "(HTTP parsing, routing, the check, kernel socket work)")
        fl_us = fl_cpu / max(1, fl.count) * 1e6
        path_us = pc_cpu / max(1, pc.count) * 1e6 - bg_us
        print(f"  Python HTTP floor (benchmarks/baselines/http_floor.py: bare asyncio.Protocol on {args.loop}, the "
              f"same requests, a copy of the node's answer): {fl_us:.0f} µs per request — the price-check path is "
              f"{path_us / fl_us if fl_us else float('inf'):.2f}× it, {path_us - fl_us:.0f} µs of the node's own work "
              "per check")
        p99 = percentiles(pc.service)["p99"]
        floor = percentiles(rd.service)["p99"]
        verdict = "MET" if p99 <= TARGET_P99_MS and pc.errors == 0 else "MISSED"
        cpu_us = pc_cpu / max(1, pc.count) * 1e6
        x_redis = p99 / floor if floor else float("inf")
        load_after = os.getloadavg()
        print("\n=== targets (figure, target, met / not met; Redis GET of the same run) ===")
        print(f"  [{'met' if verdict == 'MET' else 'NOT MET'}] p99 ≤ {TARGET_P99_MS:g} ms at {args.rate:g} req/s: "
              f"p99 {p99:.3f} ms, {pc.errors} errors (Redis GET p99 {floor:.3f} ms)")
        print(f"  [{'met' if x_redis <= TARGET_X_REDIS else 'NOT MET'}] p99 ≤ {TARGET_X_REDIS:g}× a Redis GET: "
              f"{x_redis:.1f}× ({p99:.3f} vs {floor:.3f} ms)")
        print(f"  [{'met' if cpu_us <= TARGET_CPU_US else 'NOT MET'}] API node CPU per check ≤ {TARGET_CPU_US:g} µs: "
              f"{cpu_us:.0f} µs ({pc_cpu / pc_wall * 100:.0f}% of one core at {pc.count / pc_wall:,.0f} req/s, "
              f"incl. the node's reader and health tasks; the Python HTTP floor of the same run {fl_us:.0f} µs)")
        print(f"\nmachine: {os.cpu_count()} CPUs; load average before {load_before[0]:.2f} / {load_before[1]:.2f} / "
              f"{load_before[2]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (1/5/15 min)")
        if not args.no_png:
            plt = plots.pyplot()
            fig, ax = plt.subplots(figsize=(6.5, 4))
            plots.cdf_axes(ax, [("POST /v1/price-check", pc.service), ("price check, from schedule", pc.scheduled),
                                ("Redis GET", rd.service)],
                           f"price check at {args.rate:g} req/s open loop, {args.connections} connections",
                           ylabel="latency, ms (log)")
            ax.axhline(TARGET_P99_MS, color="k", linestyle="--", linewidth=1)
            fig.suptitle(f"{os.cpu_count()} CPUs, load avg {load_before[0]:.2f} → {load_after[0]:.2f}; "
                         f"API node {cpu_us:.0f} µs CPU per check", fontsize=8)
            print(f"wrote {plots.save(fig, 'price-check-latency', args.png_dir)}")
        if os.environ.get("BENCH_GC_LOG"):  # diagnostics: GC pauses > 2 ms in the API node
            print((work / "serve.log").read_text()[-3000:])
        if verdict == "MISSED":
            load = os.getloadavg()[0]
            print(f"  why: the API node used {pc_cpu / max(1, pc.count) * 1e6:.0f} µs of CPU per request "
                  f"({pc_cpu / pc_wall * 100:.0f}% of one core at this rate; the endpoint itself - body, decode, check, "
                  "encode - is ~8 µs hot, the rest is uvicorn's protocol and send path, the connection guard, "
                  "Starlette's middleware and routing, the node's background work and the socket syscalls; each "
                  "request also wakes an idle process, with cold caches), and it shares "
                  f"{os.cpu_count()} cores with this load generator, redis-server, the ingest and the simulator.")
            if floor > 0.5 or load > 1.5:
                print(f"  the machine was busy: load average {load:.2f} on {os.cpu_count()} cores, and the plain "
                      f"redis GET floor alone had p99 {floor:.3f} ms; rerun when it is quiet")
            if args.http != "httptools" or args.loop != "uvloop" or not args.tune_gc:
                print("  faster variant: --http httptools --loop uvloop --tune-gc (needs httptools and uvloop, "
                      "e.g. pip install --target DIR httptools uvloop and --pythonpath DIR)")
        return 0
    finally:
        procs.stop()
        redis.stop()
        if args.keep:
            print(f"logs and data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


SERVE_SNIPPET = r"""
import asyncio, sys
import uvicorn
from feed.settings import from_env
from feed.store import Store
from streaming.app import StreamingServer, create_app

async def main(url, port, http, loop_name, tune):
    settings = from_env(redis_url=url)
    store = await Store.open(url)
    app = create_app(settings, store=store)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning",
                            access_log=False, http=http, loop="none", timeout_graceful_shutdown=3)
    server = StreamingServer(config, app)
    if tune:
        from feed.ingest import tune_gc

        async def tune_when_loaded():
            while not getattr(app.state, "node", None) or not app.state.node.state.loaded:
                await asyncio.sleep(0.05)
            tune_gc()  # collect, freeze the loaded state, raise the thresholds
        asyncio.get_running_loop().create_task(tune_when_loaded())
    try:
        await server.serve()
    finally:
        await store.close()

import gc, os, time
if os.environ.get("BENCH_GC_LOG"):
    _t = {}
    def _cb(phase, info):
        if phase == "start":
            _t["t"] = time.perf_counter()
        else:
            ms = (time.perf_counter() - _t["t"]) * 1000
            if ms > 2:
                print(f"gc gen{info['generation']} {ms:.1f} ms collected={info['collected']}", flush=True)
    gc.callbacks.append(_cb)
url, port, http, loop_name, tune = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
if loop_name == "uvloop":
    import uvloop
    uvloop.run(main(url, port, http, loop_name, tune))
else:
    asyncio.run(main(url, port, http, loop_name, tune))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=2000, help="requests per second (default 2000)")
    p.add_argument("--seconds", type=float, default=10, help="measured seconds (default 10)")
    p.add_argument("--warmup-s", type=float, default=2, help="warm-up seconds (default 2)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    p.add_argument("--events", type=int, default=12, help="simulator events (default 12)")
    p.add_argument("--sim-rate", type=float, default=200, help="simulator updates per second (default 200)")
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"], help="uvicorn HTTP parser")
    p.add_argument("--loop", default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
                   choices=["asyncio", "uvloop"], help="API node event loop (default: uvloop when installed, as oddsfeed serve)")
    p.add_argument("--pythonpath", help="extra sys.path entry for the API node (e.g. where httptools/uvloop are)")
    p.add_argument("--tune-gc", action="store_true",
                   help="in the API node: feed.ingest.tune_gc() once the state is loaded (freeze + higher thresholds)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, redis data)")
    p.add_argument("--no-fast-path", action="store_true",
                   help="serve every check through ASGI (ODDSFEED_PRICE_CHECK_FAST_PATH=false): the before of "
                        "streaming.fastpath")
    p.add_argument("--redis-tcp", action="store_true", help="run redis on loopback TCP instead of a Unix socket")
    p.add_argument("--png-dir", type=Path, default=None, help="where the PNG goes (default docs/bench/)")
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    if a.rate <= 0 or a.seconds <= 0 or a.seconds > 120 or a.rate > 20_000:
        p.error("--rate must be in (0, 20000] and --seconds in (0, 120]")
    return a


if __name__ == "__main__":
    args = parse_args()
    raise SystemExit(asyncio.run(main_async()))
