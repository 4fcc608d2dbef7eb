"""Reconnect storm: N SSE clients resume at once with a token a few seconds old.

DESIGN §10: "reconnect storm, 1k clients — all resumed (``recovered: true``)
within 2 s, none partial, node memory bounded". research/reliability.md F20:
served from the node's history, not from Redis or the provider.

Everything runs for real on 127.0.0.1 only, started with the helpers of
``benchmarks/fanout.py`` (imported, not copied): an embedded redis-server,
the API node (``create_app`` + ``StreamingServer`` as ``oddsfeed serve``
runs it) in its own process pinned to CPU 0, and the open-loop feeder
(Betfair ESA lines through ``feed.ingest.Ingest``) on CPU 1. This process
(CPU 1) then:

1. lets the feed run (``--warmup`` s), opens one SSE stream and follows it
   for a second: the resume token and every market's ``seq`` as of it;
2. waits ``--age`` s (3 s) while the feed goes on;
3. opens N SSE connections at once (``--clients``, 1000; by default client i
   follows event i mod E, DESIGN's 1k-clients shape), each with
   ``Last-Event-ID: <token>``, and times each one to its ``resumed`` event;
   every ``--check-every``-th client also follows its replay and checks each
   market's ``seq`` continues exactly from the token (none partial, no gap,
   no duplicate);
4. as the floor, opens N plain SSE connections at once (no token, an empty
   filter: a tiny snapshot) and times each one to its first event — what
   merely accepting N connections costs this node on this machine.

Printed: clients ``recovered: true`` / false / failed; time to ``resumed``
p50/p90/p99/max and how many within ``--deadline`` (2 s); the floor's
percentiles; the node's RSS before, at its peak during, and after the storm,
and the peak growth per client. Exit status 1 when a client was not
recovered, got a gap, or missed the deadline.

Also printed: the delivery lag of ``--bystanders`` streams opened before the
storm (what the storm costs clients that did not drop), and the node's CPU.

Writes ``docs/bench/reconnect-storm-resumed.png`` (``--png-dir`` elsewhere,
``--no-png`` not at all): per round, the distribution (CDF) of the time to
``resumed`` over all clients, the floor's time to first event and the deadline.

Usage::

    python benchmarks/reconnect_storm.py              # 1000 clients each on one event, 2000 updates/s, 3 s old token
    python benchmarks/reconnect_storm.py --rounds 3   # three storms in a row
    python benchmarks/reconnect_storm.py --filter all --rate 100   # every client on every market (firehose)

Diagnostics: ``--profile FILE`` records the node with py-spy during the
first storm; ``--asyncio`` runs the node on asyncio's loop instead of
uvloop; ``STORM_ADMIT_PER_TURN=n`` sets the hub's admission pacing (0 = off).

``run_storm(base_url, token, n=1000, …) -> dict`` is the storm alone, for
other harnesses (``benchmarks/faults.py``) that start their own node.
Bounded: every wait has a deadline; nothing listens beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import fanout  # noqa: E402  (the node, Redis and feeder helpers)
from benchmarks import plots  # noqa: E402

__all__ = ["StormClient", "follow_for_token", "main", "run_floor", "run_storm"]

_DELTA = re.compile(rb'"market_id":"([^"]+)","seq":(\d+),"kind":"([a-z]+)"')
_SOURCE_TS = re.compile(rb'"source_ts":(\d+)')
_SNAP_MARKET = re.compile(rb'"market_id":"([^"]+)","source":"[^"]*","seq":(\d+)')


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


@dataclass
class StormClient(asyncio.Protocol):
    """One raw HTTP/1.1 SSE client (chunked decoding; no client library in the way).

    path: request target; last_event_id: sent as ``Last-Event-ID`` (None = none);
    base_seqs: market → seq as of the token (checking clients verify the replay
    continues exactly from it; None = do not check); t0: the storm's start
    (``time.monotonic()``).
    """

    path: bytes
    last_event_id: str | None
    t0: float
    base_seqs: dict[str, int] | None = None
    status: int | None = None
    headers_s: float | None = None
    first_event_s: float | None = None
    resumed_s: float | None = None
    recovered: bool | None = None
    first_event: str | None = None
    gaps: int = 0
    dups: int = 0
    deltas: int = 0
    bytes: int = 0
    error: str | None = None
    closed: bool = False
    lags: list[int] | None = None  # a bystander records each delta's lag (receipt − source_ts, ms) here
    last_id: str | None = None
    at_id: bool = False  # the last event processed carried an id: (last_id, seqs) describe one point
    seqs: dict[str, int] = field(default_factory=dict)
    transport: Any = None
    _buf: bytes = b""
    _left: int = 0  # bytes left in the current chunk (< 0: its CRLF)
    _sse: bytes = b""
    _head: bool = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        lei = b"Last-Event-ID: " + self.last_event_id.encode() + b"\r\n" if self.last_event_id else b""
        transport.write(b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"  # type: ignore[attr-defined]
                        + lei + b"\r\n")

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.resumed_s is not None and self.base_seqs is None and self.first_event_s is not None:
            return  # done measuring and not checking: drain cheaply
        buf = self._buf + data
        if self._head:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self._buf = buf
                return
            self._head = False
            self.headers_s = time.monotonic() - self.t0
            try:
                self.status = int(buf[9:12])
            except ValueError:
                self.status = -1
            if self.status != 200:
                self.error = buf[:200].decode(errors="replace")
            buf = buf[i + 4:]
        out = []
        pos, n = 0, len(buf)
        while pos < n:  # chunked transfer coding, decoded as it arrives (a big chunk is parsed in parts)
            if self._left > 0:
                take = min(self._left, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._left = -2  # the CRLF after the chunk's data
                continue
            if self._left < 0:
                skip = min(-self._left, n - pos)
                pos += skip
                self._left += skip
                continue
            j = buf.find(b"\r\n", pos)
            if j < 0:
                break
            try:
                self._left = int(buf[pos:j], 16)
            except ValueError:
                self.error = "bad chunk"
                break
            pos = j + 2
            if self._left == 0:
                break  # the last chunk: the stream ended
        self._buf = buf[pos:]
        if out:
            self._events(self._sse + b"".join(out))

    def _events(self, sse: bytes) -> None:
        events = sse.split(b"\n\n")
        self._sse = events.pop()
        now = time.monotonic() - self.t0
        for ev in events:
            if ev.startswith(b"retry:"):
                continue
            kind = ev[7:ev.find(b"\n")] if ev.startswith(b"event: ") else b"message"
            if self.first_event_s is None:
                self.first_event_s = now
                self.first_event = kind.decode()
            k = ev.find(b"\nid: ")
            self.at_id = k >= 0
            if k >= 0:
                self.last_id = ev[k + 5:ev.find(b"\n", k + 5)].decode()
            if self.lags is not None and kind == b"delta":
                m = _SOURCE_TS.search(ev)
                if m is not None:
                    self.lags.append(time.time_ns() // 1_000_000 - int(m.group(1)))
            if kind == b"resumed":
                self.resumed_s = now
                self.recovered = b'"recovered":true' in ev
            elif kind == b"delta" and self.base_seqs is not None and self.recovered:
                m = _DELTA.search(ev)
                if m is None:
                    continue
                self.deltas += 1
                mid, seq = m.group(1).decode(), int(m.group(2))
                last = self.seqs.get(mid, self.base_seqs.get(mid))
                if last is not None:
                    if seq <= last:
                        self.dups += 1
                        continue
                    if seq != last + 1 and m.group(3) == b"delta" and b'"conflated":true' not in ev:
                        self.gaps += 1
                self.seqs[mid] = seq
            elif kind == b"snapshot" and self.base_seqs is not None:
                for mm in _SNAP_MARKET.finditer(ev):
                    self.seqs[mm.group(1).decode()] = int(mm.group(2))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def _host_port(base_url: str) -> tuple[str, int]:
    rest = base_url.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _open(clients: list[StormClient], host: str, port: int, errors: list[str]) -> None:
    loop = asyncio.get_running_loop()

    async def one(c: StormClient) -> None:
        for attempt in range(3):
            try:
                await loop.create_connection(lambda: c, host, port)
                return
            except OSError as exc:
                if attempt == 2:
                    c.error = f"connect: {exc}"
                    errors.append(c.error)
                await asyncio.sleep(0.05 * (attempt + 1))
    await asyncio.gather(*(one(c) for c in clients))


async def follow_for_token(base_url: str, *, query: str = "", follow_s: float = 1.0,
                           timeout_s: float = 20.0) -> tuple[str, dict[str, int]]:
    """Open one SSE stream and follow it for ``follow_s`` seconds (then to the next event
    with an ``id:``): (resume token, market → seq as of that token). Raises TimeoutError."""
    host, port = _host_port(base_url)
    c = StormClient(b"/v1/stream" + (b"?" + query.encode() if query else b""), None, time.monotonic(), {})
    c.recovered = True  # a plain stream: check every delta against the snapshot
    await _open([c], host, port, [])
    deadline = time.monotonic() + timeout_s
    start = time.monotonic()
    try:
        while True:
            if time.monotonic() > deadline or c.closed or c.error:
                raise TimeoutError(f"no resume token from {base_url}: {c.error or 'stream ended'}")
            if time.monotonic() - start >= follow_s and c.last_id and c.at_id and not c._sse:
                c.transport.pause_reading()  # freeze here: last_id and seqs describe the same point
                return c.last_id, dict(c.seqs)
            await asyncio.sleep(0.005)
    finally:
        if c.transport is not None:
            c.transport.close()


async def run_storm(base_url: str, token: str, n: int = 1000, *, query: str | Sequence[str] = "",
                    deadline_s: float = 2.0,
                    timeout_s: float = 30.0, base_seqs: dict[str, int] | None = None, check_every: int = 10,
                    settle_s: float = 1.0, node_pid: int | None = None,
                    times_out: list[float] | None = None) -> dict[str, Any]:
    """Open ``n`` SSE connections to ``base_url`` at once, each resuming from ``token``
    (``Last-Event-ID``), and measure.

    query: the stream's query string (filters), or a list of them (client i uses
    ``query[i % len(query)]``); deadline_s: the
    target (time to ``resumed``); timeout_s: give up on a client after this long;
    base_seqs: market → seq as of ``token`` — then every ``check_every``-th client checks
    its replay continues exactly from it (gaps, duplicates); settle_s: after the last
    ``resumed``, how long checking clients keep reading the replay; node_pid: the node's
    process on this machine, to report its CPU share during the storm and the settle time
    (``node_cpu_storm`` / ``node_cpu_settled``; needs psutil).

    Returns {"clients", "recovered", "not_recovered", "failed" (no ``resumed`` in time,
    HTTP status ≠ 200 or a connect error), "within_deadline", "deadline_s",
    "resumed_ms" / "headers_ms": {p50, p90, p99, max}, "statuses": {status: count}, "checked",
    "gaps", "dups", "replayed_deltas" (checked clients), "errors": [first five],
    "wall_s", "client_cpu_frac" (this process's CPU share until the last ``resumed``: near 1,
    the times include the clients' own delay)}. Times are from the moment the connections were
    started. ``times_out``, when given, is extended with every client's time to ``resumed`` (ms).
    """
    fanout._raise_nofile()  # n sockets at once
    host, port = _host_port(base_url)
    queries = [query] if isinstance(query, str) else list(query)
    paths = [b"/v1/stream" + (b"?" + q.encode() if q else b"") for q in queries]
    node = None
    if node_pid is not None:
        import psutil

        node = psutil.Process(node_pid)
        n0 = node.cpu_times()
    t0 = time.monotonic()
    cpu0 = time.process_time()
    clients = [StormClient(paths[i % len(paths)], token, t0,
                           base_seqs if (base_seqs is not None and i % check_every == 0) else None)
               for i in range(n)]
    errors: list[str] = []
    await _open(clients, host, port, errors)
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        if all(c.resumed_s is not None or c.error or c.closed for c in clients):
            break
        await asyncio.sleep(0.01)
    storm_s = time.monotonic() - t0
    client_cpu = (time.process_time() - cpu0) / max(1e-9, storm_s)
    node_storm = node_settled = None
    if node is not None:
        n1 = node.cpu_times()
        node_storm = (n1.user + n1.system - n0.user - n0.system) / max(1e-9, storm_s)
    s0 = time.monotonic()
    settle = s0 + settle_s
    while time.monotonic() < min(settle, deadline):
        await asyncio.sleep(0.05)
    if node is not None:
        n2 = node.cpu_times()
        node_settled = (n2.user + n2.system - n1.user - n1.system) / max(1e-9, time.monotonic() - s0)
    wall = time.monotonic() - t0
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    times = [c.resumed_s * 1000 for c in clients if c.resumed_s is not None]
    if times_out is not None:
        times_out.extend(times)
    heads = [c.headers_s * 1000 for c in clients if c.headers_s is not None]
    statuses: dict[str, int] = {}
    for c in clients:
        statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
        if c.error and len(errors) < 5:
            errors.append(c.error)
    checked = [c for c in clients if c.base_seqs is not None]
    return {
        "clients": n,
        "recovered": sum(1 for c in clients if c.recovered is True),
        "not_recovered": sum(1 for c in clients if c.recovered is False),
        "failed": sum(1 for c in clients if c.recovered is None),
        "within_deadline": sum(1 for c in clients if c.recovered and c.resumed_s is not None
                               and c.resumed_s <= deadline_s),
        "deadline_s": deadline_s,
        "resumed_ms": {"p50": _pct(times, 50), "p90": _pct(times, 90), "p99": _pct(times, 99),
                       "max": max(times) if times else float("nan")},
        "headers_ms": {"p50": _pct(heads, 50), "p90": _pct(heads, 90), "p99": _pct(heads, 99),
                       "max": max(heads) if heads else float("nan")},
        "statuses": statuses,
        "checked": len(checked),
        "gaps": sum(c.gaps for c in checked),
        "dups": sum(c.dups for c in checked),
        "replayed_deltas": sum(c.deltas for c in checked),
        "bytes_per_client": sum(c.bytes for c in clients) / max(1, n),
        "errors": errors[:5],
        "wall_s": wall,
        "client_cpu_frac": client_cpu,
        "node_cpu_storm": node_storm,
        "node_cpu_settled": node_settled,
    }


async def run_floor(base_url: str, n: int = 1000, *, timeout_s: float = 30.0,
                    times_out: list[float] | None = None) -> dict[str, Any]:
    """N plain SSE connections at once (no token; a filter matching nothing, so a tiny
    snapshot): time to the first event, ms — what accepting N streams costs the node
    (``times_out``, when given, is extended with every client's)."""
    host, port = _host_port(base_url)
    t0 = time.monotonic()
    clients = [StormClient(b"/v1/stream?market=__storm_floor__", None, t0) for _ in range(n)]
    errors: list[str] = []
    await _open(clients, host, port, errors)
    deadline = t0 + timeout_s
    while time.monotonic() < deadline and not all(c.first_event_s is not None or c.error or c.closed
                                                  for c in clients):
        await asyncio.sleep(0.01)
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    times = [c.first_event_s * 1000 for c in clients if c.first_event_s is not None]
    if times_out is not None:
        times_out.extend(times)
    return {"clients": n, "answered": len(times),
            "first_event_ms": {"p50": _pct(times, 50), "p90": _pct(times, 90), "p99": _pct(times, 99),
                               "max": max(times) if times else float("nan")}, "errors": errors[:5]}


class _RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread; ``peak`` since the last reset."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def reset(self) -> None:
        self.peak = self.rss()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, self.rss())
            except Exception:  # the process ended
                return

    def __enter__(self) -> "_RssSampler":
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def _ms(d: dict[str, float]) -> str:
    return " ".join(f"{k} {v:,.0f}" for k, v in d.items()) + " ms"


async def _round(args: argparse.Namespace, base: str, server_pid: int, query: str | list[str],
                 spy: Any, series: dict[str, list[float]]) -> dict[str, Any]:
    """One storm (and its floor); every client's time (ms) goes into ``series["resumed"]`` /
    ``series["floor"]`` (for the PNG; not in the returned figures)."""
    token, seqs = await follow_for_token(base)  # one token serves every filter: it is the node's position
    print(f"token taken ({len(seqs)} markets); waiting {args.age:g} s while the feed goes on …", flush=True)
    host, port = _host_port(base)
    queries = [query] if isinstance(query, str) else query
    by = [StormClient(b"/v1/stream" + (b"?" + q.encode() if q else b""), None, time.monotonic())
          for q in (queries * args.bystanders)[:args.bystanders]]
    await _open(by, host, port, [])
    calm_s = min(1.0, args.age / 2)
    await asyncio.sleep(args.age - calm_s)
    calm: list[int] = []
    for c in by:
        c.lags = calm
    await asyncio.sleep(calm_s)  # the token is now args.age old
    during: list[int] = []
    for c in by:
        c.lags = during
    MB = 2 ** 20
    with _RssSampler(server_pid) as rss:
        before = rss.rss()
        rss.reset()
        print(f"storm: {args.clients} SSE clients resuming at once (node RSS {before / MB:,.0f} MB) …", flush=True)
        storm = await run_storm(base, token, args.clients, query=query, deadline_s=args.deadline,
                                base_seqs=seqs, check_every=args.check_every, node_pid=server_pid,
                                times_out=series["resumed"])
        for c in by:
            c.lags = None
            if c.transport is not None:
                c.transport.close()
        peak = rss.peak
        await asyncio.sleep(1.0)
        gc.collect()
        after = rss.rss()
    if spy is not None:
        await asyncio.to_thread(spy.wait, 30)
    floor = await run_floor(base, args.clients, times_out=series["floor"]) if not args.no_floor else None
    def lag(v: list[int]) -> dict[str, float]:
        return {"p50": _pct(v, 50), "p99": _pct(v, 99), "max": max(v) if v else float("nan"), "n": len(v)}
    return {"storm": storm, "floor": floor, "bystanders": args.bystanders, "lag_calm_ms": lag(calm),
            "lag_storm_ms": lag(during), "rss_before_mb": before / MB, "rss_peak_mb": peak / MB,
            "rss_after_mb": after / MB, "rss_peak_growth_kb_per_client": (peak - before) / 1024 / args.clients}


async def _drive(args: argparse.Namespace, port: int, server_pid: int,
                 series: list[dict[str, list[float]]]) -> list[dict[str, Any]]:
    base = f"http://127.0.0.1:{port}"
    query: str | list[str] = (["event=bf:e%d" % e for e in range(args.events)] if args.filter == "event" else "")
    await asyncio.sleep(args.warmup)
    out = []
    for r in range(args.rounds):
        spy = None
        if args.profile and r == 0:  # attached before the token is taken: attaching pauses the node
            import subprocess

            spy = subprocess.Popen(["py-spy", "record", "--pid", str(server_pid), "--rate", "200", "--format",
                                    "raw", "--output", args.profile, "--duration", str(int(args.age + 10)),
                                    "--nonblocking", *(["--native"] if os.environ.get("STORM_PYSPY_NATIVE") else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)
        series.append({"resumed": [], "floor": []})
        res = await _round(args, base, server_pid, query, spy, series[-1])
        _report(res, r + 1, args.rounds)
        out.append(res)
        await asyncio.sleep(1.0)
    return out


def _report(res: dict[str, Any], r: int, rounds: int) -> None:
    s, f = res["storm"], res["floor"]
    print(f"\n[round {r}/{rounds}] resumed: {s['recovered']} recovered:true, {s['not_recovered']} recovered:false, "
          f"{s['failed']} failed (of {s['clients']}; HTTP statuses {s['statuses']})")
    print(f"time to resumed: {_ms(s['resumed_ms'])}; within {s['deadline_s']:g} s: {s['within_deadline']} "
          f"(time to the response headers: {_ms(s['headers_ms'])})")
    if s.get("node_cpu_storm") is not None:
        print(f"node CPU: {s['node_cpu_storm'] * 100:.0f}% of a core until the last resumed, "
              f"{s['node_cpu_settled'] * 100:.0f}% in the second after (all {s['clients']} streams live)")
    if s["client_cpu_frac"] > 0.7:
        print(f"  (the clients used {s['client_cpu_frac'] * 100:.0f}% of their core until the last resumed: "
              "their times include their own delay)")
    print(f"replay check ({s['checked']} clients, {s['replayed_deltas']:,} deltas): gaps {s['gaps']}, "
          f"duplicates {s['dups']}; {s['bytes_per_client'] / 1024:,.0f} KiB received per client")
    if res["bystanders"]:
        c, d = res["lag_calm_ms"], res["lag_storm_ms"]
        print(f"{res['bystanders']} bystanders (streams open before the storm), delivery lag: just before "
              f"p50 {c['p50']:,.0f} p99 {c['p99']:,.0f} max {c['max']:,.0f} ms; during the storm p50 {d['p50']:,.0f} "
              f"p99 {d['p99']:,.0f} max {d['max']:,.0f} ms ({d['n']} deltas)")
    if f is not None:
        print(f"floor ({f['clients']} plain connections at once, time to first event): {_ms(f['first_event_ms'])} "
              f"({f['answered']} answered)")
    print(f"node RSS: before {res['rss_before_mb']:,.0f} MB, peak {res['rss_peak_mb']:,.0f} MB, after "
          f"{res['rss_after_mb']:,.0f} MB (peak growth {res['rss_peak_growth_kb_per_client']:,.1f} KiB per client)",
          flush=True)
    if s["errors"]:
        print(f"errors (first): {s['errors']}")


def write_png(args: argparse.Namespace, series: list[dict[str, list[float]]], res: list[dict[str, Any]],
              load0: tuple[float, ...], load1: tuple[float, ...]) -> Path:
    """The time to ``resumed`` per round as an empirical CDF (every client; x log), the
    floor's time to first event dashed, the deadline as a vertical line."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (s, r) in enumerate(zip(series, res)):
        st = r["storm"]
        for key, style, label in (("resumed", "-", f"round {i + 1}: resumed ({st['recovered']}/{st['clients']} "
                                   f"recovered, {st['within_deadline']} within {st['deadline_s']:g} s)"),
                                  ("floor", ":", f"round {i + 1}: floor, plain connect → first event")):
            v = sorted(s[key])
            if not v:
                continue
            n = st["clients"]  # the fraction is of all clients: one that never resumed keeps the line below 1
            ax.step([max(x, 0.1) for x in v], [(k + 1) / n for k in range(len(v))], where="post", linestyle=style,
                    color=f"C{i}", label=label)
    ax.axvline(args.deadline * 1000, color="k", linestyle="--", linewidth=1,
               label=f"target: all within {args.deadline:g} s")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("ms since the storm's connections were started (log)")
    ax.set_ylabel("fraction of clients")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    shape = "each on one event" if args.filter == "event" else "each on every market"
    ax.set_title(f"reconnect storm: {args.clients} SSE clients ({shape}) resume with a {args.age:g} s old token,\n"
                 f"feed {args.rate} updates/s, {args.rounds} round(s)", fontsize=9)
    fig.suptitle(f"{os.cpu_count()} CPUs, load avg {load0[0]:.2f} → {load1[0]:.2f}", fontsize=8)
    return plots.save(fig, "reconnect-storm-resumed", args.png_dir)


def _spawn_node(redis_url: str, port: int, log: Any, *, uvloop: bool) -> Any:
    """The node as ``benchmarks/fanout.py _server`` starts it, on uvloop like ``oddsfeed serve``."""
    import subprocess

    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_node", "--redis-url", redis_url,
                             "--port", str(port), *([] if uvloop else ["--asyncio"])], cwd=str(ROOT), text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=log)


def _node(argv: list[str]) -> None:
    if os.environ.get("STORM_ADMIT_PER_TURN"):  # diagnostics: the hub's admission pacing (0 = off)
        import streaming.hub

        streaming.hub.ADMIT_PER_TURN = int(os.environ["STORM_ADMIT_PER_TURN"])
    asyncio_loop = "--asyncio" in argv
    argv = [a for a in argv if a != "--asyncio"]
    if asyncio_loop:  # fanout's server runs `oddsfeed serve` itself, on uvloop unless told otherwise
        os.environ["FANOUT_SERVER_LOOP"] = "asyncio"
    fanout._sub(["_server", *argv])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="SSE clients in the storm (default 1000)")
    p.add_argument("--rate", type=int, default=2000, help="feed updates per second (default 2000)")
    p.add_argument("--events", type=int, default=100, help=f"events, {fanout.MARKETS_PER_EVENT} markets each")
    p.add_argument("--filter", choices=["event", "all"], default="event",
                   help="event: client i follows event i %% E (DESIGN's 1k-clients scenario, default); "
                        "all: every client on every market (firehose)")
    p.add_argument("--age", type=float, default=3.0, help="age of the token at the storm, s (default 3)")
    p.add_argument("--warmup", type=float, default=2.0, help="feed time before the token is taken, s")
    p.add_argument("--deadline", type=float, default=2.0, help="target time to resumed, s (default 2)")
    p.add_argument("--check-every", type=int, default=10, help="every n-th client checks its replay's seqs")
    p.add_argument("--bystanders", type=int, default=100, help="streams open before the storm whose delivery "
                   "lag is measured through it (default 100)")
    p.add_argument("--rounds", type=int, default=1, help="storms in a row, each with a fresh token (default 1)")
    p.add_argument("--no-floor", action="store_true", help="skip the plain-connection floor")
    p.add_argument("--asyncio", action="store_true", help="run the node on asyncio's loop, not uvloop "
                   "(oddsfeed serve uses uvloop)")
    p.add_argument("--profile", metavar="FILE", help="record the node with py-spy during the first storm (raw "
                   "collapsed stacks to FILE; needs py-spy)")
    p.add_argument("--png-dir", type=Path, default=None,
                   help="where reconnect-storm-resumed.png goes (default docs/bench/)")
    p.add_argument("--no-png", action="store_true")
    args = p.parse_args()
    fanout._pin(fanout.LOAD_CPU)
    fanout._raise_nofile()
    shape = "each on one event" if args.filter == "event" else "each on every market"
    print(f"reconnect storm: {args.clients} SSE clients ({shape}), token {args.age:g} s old, feed {args.rate} "
          f"updates/s over {args.events} events × {fanout.MARKETS_PER_EVENT} markets; node on CPU "
          f"{fanout.SERVER_CPU} ({'asyncio' if args.asyncio else 'uvloop'}), redis + feeder + clients on CPU "
          f"{fanout.LOAD_CPU}; python {sys.version.split()[0]}", flush=True)
    load0 = os.getloadavg()
    series: list[dict[str, list[float]]] = []
    print(f"command: {' '.join(sys.argv)}; load average before: {os.getloadavg()[0]:.2f} "
          "(other work on this 2-core machine skews the times)", flush=True)
    feed_s = args.warmup + args.rounds * (args.age + 40) + 30
    with fanout.Redis() as redis:
        url = redis.url
        port = fanout._free_port()
        log = open(fanout.SERVER_LOG, "a")
        log.write("\n=== reconnect storm ===\n")
        log.flush()
        server = _spawn_node(url, port, log, uvloop=not args.asyncio)
        feeder = None
        try:
            fanout._wait_port(port, server)
            feeder = fanout._spawn(["_feeder", "--redis-url", url, "--events", str(args.events), "--mode", "oddsfeed",
                                    "--rate", str(args.rate), "--seconds", str(feed_s),
                                    "--t0", str(fanout.now_ms() + 200)], stdout=open(os.devnull, "w"))
            res = asyncio.run(asyncio.wait_for(_drive(args, port, server.pid, series),
                                               args.warmup + args.rounds * (args.age + 120)))
        finally:
            if feeder is not None:
                fanout._stop(feeder)
            fanout._stop(server)
            log.close()
    ok = all(r["storm"]["recovered"] == args.clients and r["storm"]["within_deadline"] == args.clients
             and not r["storm"]["gaps"] for r in res)
    worst = max(r["storm"]["resumed_ms"]["max"] for r in res)
    peak = max(r["rss_peak_mb"] - r["rss_before_mb"] for r in res)
    print(f"\n[{'met' if ok else 'NOT MET'}] all {args.clients} recovered:true within {args.deadline:g} s, none "
          f"partial, in {args.rounds} round(s) (slowest resumed after {worst:,.0f} ms; node RSS peak growth "
          f"{peak:,.0f} MB)")
    print("\nraw:", json.dumps(res, default=str))
    load1 = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs; load average before {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, "
          f"after {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} (1/5/15 min)")
    if not args.no_png and res:
        print(f"wrote {write_png(args, series, res, load0, load1)}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_node":
        _node(sys.argv[2:])
    else:
        sys.exit(main())
