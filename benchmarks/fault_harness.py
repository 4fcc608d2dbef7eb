"""Building blocks of the fault suite (``benchmarks/faults.py``).

Everything talks to real processes on 127.0.0.1:

- :class:`Stack`: an embedded ``redis-server`` (append-only, started and
  killed by us), a private RabbitMQ node (``tests/rabbitmq.py``'s
  :class:`RabbitNode`: free ports, its own directories; for the ``uof``
  source, restartable and able to close every AMQP connection),
  ``oddsfeed simulate --providers`` with ``--truth-log`` and
  ``--control-port`` (plus ``--uof-amqp-url`` and ``--webhook-url``: the UOF
  producer and the webhook pusher), one ``oddsfeed ingest --source …``
  process per source kind and one ``oddsfeed serve``; every process can be
  killed (``kill -9``), stopped (``SIGSTOP``/``SIGCONT``) and restarted with
  the same arguments. A source that cannot run here (:data:`UNAVAILABLE`:
  ``uof`` without aio-pika or ``rabbitmq-server``) is left out of the stack;
  the suite's rows say so.
  :class:`ClusterStack`: a 3-master / 3-replica Redis Cluster (the same
  redis-server binary) with one ingest and one serve on it.
- :class:`SimControl`: the simulator's fault switches over its control port.
- :class:`Truth`: the simulator's truth log, tailed, as per-selection
  timelines (what the upstream offered, and since when) and a final state.
- :class:`SeqTracker` / :class:`TrackedClient`: a stream consumer
  (:class:`streaming.client.OddsClient`: SSE or WebSocket, reconnects with
  resume tokens) whose every message also goes through a per-market ``seq``
  bookkeeper counting gaps (flagged by a resync or not), lost and duplicated
  deltas, resumes and resyncs.
- :class:`Prober`: every ~50 ms picks an open market of the node's REST view
  and asks ``POST /v1/price-check`` whether that selection's current best
  back price (exactly, ``accept_better: false``) is good; the answers are
  judged afterwards against :class:`Truth` (:func:`judge_probes`).

Nothing here asserts; the suite decides what a row's figures mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import msgspec  # noqa: E402

from benchmarks.price_check import Procs, free_port  # noqa: E402
from feed.embedded_redis import EmbeddedRedis, redis_server_binary, start_cluster_node  # noqa: E402
from streaming.client import OddsClient  # noqa: E402

__all__ = [
    "AVAILABLE",
    "SOURCES",
    "UNAVAILABLE",
    "UOF_UNAVAILABLE",
    "ClusterStack",
    "Probe",
    "Prober",
    "SeqTracker",
    "SimControl",
    "Stack",
    "TrackedClient",
    "Truth",
    "diff_markets",
    "judge_probes",
    "now_ms",
    "offered_of",
    "status_class",
]

#: source name -> market id prefix, every source of the suite whether or not it can run here (see
#: :data:`AVAILABLE`). Two push consumers of one provider need their own prefixes; the webhook source
#: (push-format messages too) gets ``wh``
SOURCES: dict[str, str] = {"esa": "bf:", "pinnacle": "pn:", "theoddsapi": "toa:", "push-ws": "pxw:",
                           "push-sse": "pxs:", "uof": "uof:", "webhook": "wh:"}
#: truth-log prefix -> the prefixes oddsfeed gives those markets here
TRUTH_ALIASES: dict[str, tuple[str, ...]] = {"px:": ("pxw:", "pxs:")}
POLLERS = ("pinnacle", "theoddsapi")
UOF_TOKEN = "sim-uof-token"
WEBHOOK_SECRET = "sim-webhook-secret"


def uof_unavailable() -> str | None:
    """Why the ``uof`` source cannot run here (None: it can): aio-pika, the UOF modules or
    Debian's ``rabbitmq-server`` (``bash .ci/install-rabbitmq``) missing."""
    import importlib

    for module in ("aio_pika", "feed.sources.amqp", "feed.normalise.uof", "feed.simulator.uof", "tests.rabbitmq"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure means: not ready
            return f"{module} not importable ({type(exc).__name__}: {exc})"
    from tests.rabbitmq import server_binary

    if server_binary() is None:
        return "rabbitmq-server not installed (bash .ci/install-rabbitmq, as root)"
    return None


UOF_UNAVAILABLE = uof_unavailable()
#: source name -> why it cannot run here (a part missing); the suite's rows that need it say so
UNAVAILABLE: dict[str, str] = {} if UOF_UNAVAILABLE is None else {"uof": UOF_UNAVAILABLE}
#: the sources a :class:`Stack` runs by default: every one of :data:`SOURCES` that can run here
AVAILABLE: tuple[str, ...] = tuple(s for s in SOURCES if s not in UNAVAILABLE)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def hundredths(price: float) -> int:
    return round(price * 100)


def source_of(market_id: str) -> str | None:
    for name, prefix in SOURCES.items():
        if market_id.startswith(prefix):
            return name
    return None


def status_class(status: str | None) -> str:
    """Market status → ``open`` / ``suspended`` / ``closed`` / ``gone`` / ``unknown``."""
    if status == "OPEN":
        return "open"
    if status in ("SUSPENDED", "INACTIVE"):
        return "suspended"
    if status in ("CLOSED", "SETTLED", "CANCELLED"):
        return "closed"
    if status == "REMOVED":
        return "gone"
    return "unknown"


def offered_of(sel: dict[str, Any]) -> float | None:
    """The price a back price check compares: best back, else the bookmaker's price."""
    back = sel.get("back") or []
    if back:
        return float(back[0][0])
    price = sel.get("price")
    return float(price) if price is not None else None


# -- truth -----------------------------------------------------------------------------------


class Truth:
    """The simulator's truth log (:mod:`feed.simulator.truth`), read incrementally.

    ``timelines[(market, selection)]``: ``[(t_ms, available)]`` where
    ``available`` is the offered price in hundredths while the market is OPEN
    and the selection ACTIVE, else None — every change in order, two in one
    millisecond included (the first was offered too: a node that shows it
    for a moment is right). ``markets[market]``: the latest
    ``{"status", "t_ms", "sels": {selection: record}}``.
    """

    def __init__(self, path: str | Path, aliases: dict[str, tuple[str, ...]] | None = None) -> None:
        self.path = Path(path)
        self.aliases = TRUTH_ALIASES if aliases is None else aliases
        self.timelines: dict[tuple[str, str], list[tuple[int, int | None]]] = {}
        self.markets: dict[str, dict[str, Any]] = {}
        self.records = 0
        self.last_t = 0
        self._offset = 0
        self._tail = b""

    def poll(self) -> int:
        """Read what was appended since the last call; how many records."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        data = self._tail + data
        *lines, self._tail = data.split(b"\n")
        n = 0
        for line in lines:
            if line.strip():
                self.add(json.loads(line))
                n += 1
        return n

    def add(self, rec: dict[str, Any]) -> None:
        mid = rec["market_id"]
        for alias_from, alias_to in self.aliases.items():
            if mid.startswith(alias_from):
                for prefix in alias_to:
                    self._add_one({**rec, "market_id": prefix + mid[len(alias_from):]})
                return
        self._add_one(rec)

    def _add_one(self, rec: dict[str, Any]) -> None:
        self.records += 1
        t, mid, sid = rec["t_ms"], rec["market_id"], rec["selection_id"]
        self.last_t = max(self.last_t, t)
        m = self.markets.setdefault(mid, {"status": None, "t_ms": t, "sels": {}})
        m["status"], m["t_ms"] = rec["status"], t
        if sid is None:  # market-level: the status applies to every selection
            for s in m["sels"]:
                self._append(mid, s, t)
            return
        m["sels"][sid] = rec
        self._append(mid, sid, t)

    def _append(self, mid: str, sid: str, t: int) -> None:
        m = self.markets[mid]
        rec = m["sels"][sid]
        price = rec["back"] if rec["back"] is not None else rec["price"]
        avail = (hundredths(price) if m["status"] == "OPEN" and rec.get("sel_status") in (None, "ACTIVE")
                 and price is not None else None)
        tl = self.timelines.setdefault((mid, sid), [])
        if not tl or tl[-1][1] != avail:
            tl.append((t, avail))

    def offered_within(self, mid: str, sid: str, price_h: int, t_from: int, t_to: int) -> bool | None:
        """Whether the upstream offered ``price_h`` at any time in
        [``t_from``, ``t_to``] (ms: a value that held in the millisecond
        ``t_from`` counts, even one replaced within it); None when the truth
        does not reach back to ``t_from``."""
        tl = self.timelines.get((mid, sid))
        if not tl or tl[0][0] > t_from:
            return None
        for k in range(len(tl) - 1, -1, -1):  # every change up to t_to, then the value in force before t_from
            t, avail = tl[k]
            if t <= t_to and avail == price_h:
                return True
            if t < t_from:
                return False
        return False

    def offered_until(self, mid: str, sid: str, price_h: int, t: int) -> int | None:
        """When the upstream last stopped offering ``price_h`` before ``t``
        (ms); None if it never offered it (as far as the truth goes)."""
        tl = self.timelines.get((mid, sid)) or []
        until = None
        for k, (tt, avail) in enumerate(tl):
            if tt > t:
                break
            if avail == price_h and k + 1 < len(tl) and tl[k + 1][0] <= t:
                until = tl[k + 1][0]
        return until


def diff_markets(truth: Truth, node: dict[str, dict[str, Any]], prefixes: Iterable[str]) -> list[str]:
    """Markets (with those ``prefixes``) whose node view differs from the
    upstream's current state: missing, another status class, or (open
    markets) another best back / best lay / price on an active selection.
    One line per market, saying what differs."""
    out = []
    prefixes = tuple(prefixes)
    for mid, tm in sorted(truth.markets.items()):
        if not mid.startswith(prefixes):
            continue
        want = status_class(tm["status"])
        if want in ("gone", "unknown"):
            continue
        nm = node.get(mid)
        if nm is None:
            if want != "closed":
                out.append(f"{mid}: missing (upstream {tm['status']})")
            continue
        have = status_class(nm.get("status"))
        if have != want:
            why = f" ({nm['suspend_reason']})" if nm.get("suspend_reason") else ""
            out.append(f"{mid}: status {nm.get('status')}{why}, upstream {tm['status']}")
            continue
        if want != "open":
            continue
        sels = {s["selection_id"]: s for s in nm.get("selections") or []}
        for sid, rec in sorted(tm["sels"].items()):
            if rec.get("sel_status") not in (None, "ACTIVE"):
                continue
            ns = sels.get(sid)
            if ns is None:
                out.append(f"{mid}/{sid}: selection missing")
                break
            if rec["back"] is not None or rec["lay"] is not None:  # exchange: both sides of the book
                back = (ns.get("back") or [[None]])[0][0]
                lay = (ns.get("lay") or [[None]])[0][0]
                if back != rec["back"] or lay != rec["lay"]:
                    out.append(f"{mid}/{sid}: back/lay {back}/{lay}, upstream {rec['back']}/{rec['lay']}")
                    break
            elif offered_of(ns) != rec["price"]:
                out.append(f"{mid}/{sid}: price {offered_of(ns)}, upstream {rec['price']}")
                break
    return out


# -- simulator control ------------------------------------------------------------------------


class SimControl:
    """Client of ``oddsfeed simulate --control-port`` (:mod:`feed.simulator.control`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def call(self, target: str | None, op: str, timeout_s: float = 5.0, **args: Any) -> Any:
        """Run one switch; its result. Raises RuntimeError with the simulator's message."""
        req: dict[str, Any] = {"op": op, "args": args}
        if target is not None:
            req["target"] = target
        async with self._lock:
            for attempt in (1, 2):
                try:
                    if self._rw is None:
                        self._rw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), timeout_s)
                    reader, writer = self._rw
                    writer.write(json.dumps(req).encode() + b"\n")
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), timeout_s)
                    if not line:
                        raise ConnectionError("control port closed the connection")
                    break
                except (OSError, TimeoutError):
                    await self.close()
                    if attempt == 2:
                        raise
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"simulator refused {target}.{op}: {answer.get('error')}")
        return answer.get("result")

    async def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


# -- processes --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


class _Managed:
    """Start / kill / restart named processes with fixed arguments (logs per start)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs = Procs()
        self.argv: dict[str, list[str]] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.current: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.argv[name] = argv
        if env is not None:
            self.envs[name] = env
        self.starts[name] += 1
        p = self.procs.start(name, argv, {**_env(), **self.envs.get(name, {})},
                             self.work / f"{name}.{self.starts[name]}.log")
        self.current[name] = p
        return p

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        return self.start(name, self.argv[name])

    def alive(self, name: str) -> bool:
        p = self.current.get(name)
        return p is not None and p.poll() is None

    def signal(self, name: str, sig: int) -> int:
        """Send ``sig``; the pid (raises when the process is not running)."""
        p = self.current[name]
        if p.poll() is not None:
            raise RuntimeError(f"{name} is not running (exit {p.returncode})")
        os.kill(p.pid, sig)
        if sig == signal.SIGKILL:
            p.wait(5)
        return p.pid

    def log_tail(self, name: str, n: int = 600) -> str:
        path = self.work / f"{name}.{self.starts[name]}.log"
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        for p in self.current.values():  # a stopped process cannot take SIGTERM
            with contextlib.suppress(OSError):
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
        self.procs.stop()


class Stack:
    """redis-server + ``oddsfeed simulate --providers`` + one ingest per source + ``oddsfeed serve``.

    ``sources``: which ingests to run (names of :data:`SOURCES`; default :data:`AVAILABLE`).
    """

    def __init__(self, work: Path, *, sources: Iterable[str] = AVAILABLE, rate: float = 50.0, events: int = 12,
                 seed: int = 7, time_scale: float = 1.0, poll_interval_s: float = 1.0) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sources = tuple(sources)
        self.rate, self.events, self.seed, self.time_scale = rate, events, seed, time_scale
        self.poll_interval_s = poll_interval_s
        self.managed = _Managed(work)
        self.redis = EmbeddedRedis(work / "redis", appendonly=True)
        self.redis_url = ""
        self.truth_path = work / "truth.jsonl"
        self.ports: dict[str, int] = {}
        self.control: SimControl | None = None
        self.truth = Truth(self.truth_path)
        self.rabbit: Any = None  # tests.rabbitmq.RabbitNode, when "uof" is among the sources

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def source_spec(self, name: str) -> str:
        p = self.ports
        fast = (f"min_interval_s=0,interval_s={self.poll_interval_s:g},live_interval_s={self.poll_interval_s:g},"
                "deadline_s=3")
        if name == "esa":
            return f"esa=127.0.0.1:{p['esa']},app_key=sim-app-key,session=sim-session"
        if name == "pinnacle":
            return (f"pinnacle=http://127.0.0.1:{p['http']},user=demo,password=demo,sports=29+33+4,"
                    f"fixtures_interval_s=5,{fast}")
        if name == "theoddsapi":
            return f"theoddsapi=http://127.0.0.1:{p['http']}/v4,api_key=demo,sport=upcoming,markets=h2h+totals,{fast}"
        if name == "push-ws":
            return f"push-ws=ws://127.0.0.1:{p['push']}/push/ws,api_key=sim-push-key,prefix=pxw"
        if name == "push-sse":
            return f"push-sse=http://127.0.0.1:{p['push']}/push/sse,api_key=sim-push-key,prefix=pxs"
        if name == "uof":
            # alives every 1 s: a producer silent for 5 s is down; recoveries at most 1 s apart; the broker
            # link retried within 2 s (UOF SDK defaults: 20 s, 30 s, and the source's 30 s)
            return (f"uof={self.amqp_url}?exchange=unifiedfeed,api=http://127.0.0.1:{p['uof_api']},"
                    f"token={UOF_TOKEN},producers=1+3,max_inactivity_s=5,min_recovery_interval_s=1,"
                    "backoff_initial_s=0.2,backoff_max_s=2,connect_timeout_s=5")
        if name == "webhook":
            return f"webhook=127.0.0.1:{p['webhook']},secret={WEBHOOK_SECRET},prefix=wh"
        raise ValueError(f"unknown source {name!r}")

    def store_args(self) -> list[str]:
        return ["--redis-url", self.redis_url]

    def start_redis(self) -> None:
        self.redis_url = self.redis.start()  # from the main thread: it dies with us, not with a worker thread

    @property
    def amqp_url(self) -> str:
        assert self.rabbit is not None
        return str(self.rabbit.url)

    def start_rabbit(self) -> None:
        """Start the private RabbitMQ node (the first time: new ports and directories; later: the
        same ones, its durable exchange kept). Bounded: raises after tests.rabbitmq.STARTUP_S."""
        if self.rabbit is None:
            from tests.rabbitmq import RabbitNode, server_binary

            binary = server_binary()
            if binary is None:
                raise RuntimeError(f"uof: {UOF_UNAVAILABLE or 'rabbitmq-server not installed'}")
            (self.work / "rabbitmq").mkdir(exist_ok=True)
            self.rabbit = RabbitNode(self.work / "rabbitmq", binary)
            self.rabbit.name = f"oddsfeed-faults-{os.getpid()}-{self.work.name}@localhost"
        self.rabbit.start()

    def stop_rabbit(self) -> None:
        if self.rabbit is not None:
            self.rabbit.stop()

    def rabbit_alive(self) -> bool:
        srv = self.rabbit._server if self.rabbit is not None else None
        return srv is not None and srv.poll() is None

    def rabbitmqctl(self, *args: str, timeout_s: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <node> …`` against the private node (its cookie, its epmd port)."""
        assert self.rabbit is not None
        ctl = Path(self.rabbit.binary).with_name("rabbitmqctl")
        out = subprocess.run([str(ctl), "-n", self.rabbit.name, *args], env=self.rabbit.env(), capture_output=True,
                             text=True, timeout=timeout_s, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: exit {out.returncode}: {out.stderr[-300:]}")
        return out.stdout

    async def start(self, *, ready_timeout_s: float = 60.0) -> None:
        py = sys.executable
        self.start_redis()
        self.ports = {k: free_port() for k in ("esa", "http", "push", "control", "api", "uof_api", "webhook")}
        p = self.ports
        extra: list[str] = []
        if "uof" in self.sources:
            await asyncio.to_thread(self.start_rabbit)
            extra += ["--uof-amqp-url", self.amqp_url, "--uof-port", str(p["uof_api"])]
        if "webhook" in self.sources:
            extra += ["--webhook-url", f"http://127.0.0.1:{p['webhook']}/ingest/webhook/webhook",
                      "--webhook-secret", WEBHOOK_SECRET, "--webhook-prefix", "wh"]
        self.managed.start("simulate", [py, "-m", "feed", "simulate", "--providers", "--host", "127.0.0.1",
                                        "--port", str(p["esa"]),
                                        "--providers-port", str(p["http"]), "--push-port", str(p["push"]),
                                        "--control-port", str(p["control"]), "--truth-log", str(self.truth_path),
                                        "--rate", str(self.rate), "--events", str(self.events),
                                        "--seed", str(self.seed), "--time-scale", str(self.time_scale), *extra])
        self.control = SimControl(p["control"])
        await self._until(lambda: self._ping_control(), 30, "the simulator's control port")
        for name in self.sources:
            self.start_ingest(name)
        self.start_serve()
        await self.wait_healthy(ready_timeout_s)

    def start_ingest(self, name: str, env: dict[str, str] | None = None) -> None:
        """Start (or restart) the ingest of ``name``; ``env``: extra environment for this
        start only (a later restart without it runs in the plain environment)."""
        self.managed.start(f"ingest-{name}", [sys.executable, "-m", "feed", "ingest", *self.store_args(),
                                              "--source", self.source_spec(name)], env=env or {})

    def start_serve(self) -> None:
        # every client of the suite (the storm's 1,000 included) comes from 127.0.0.1: no per-IP cap
        self.managed.start("serve", [sys.executable, "-m", "feed", "serve", *self.store_args(),
                                     "--host", "127.0.0.1", "--port", str(self.ports["api"])],
                           env={"ODDSFEED_MAX_CONNECTIONS_PER_IP": "0"})

    def process_names(self) -> list[str]:
        return ["simulate", *(f"ingest-{s}" for s in self.sources), "serve"]

    async def _ping_control(self) -> bool:
        assert self.control is not None
        try:
            await self.control.call(None, "ping", timeout_s=1.0)
            return True
        except (OSError, TimeoutError, RuntimeError):
            return False

    async def _until(self, pred: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await pred():
                return
            dead = [n for n in self.managed.current if not self.managed.alive(n)]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while waiting for {what}: {self.managed.log_tail(dead[0])}")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")

    async def health(self, http: httpx.AsyncClient) -> dict[str, Any]:
        """``{"ready": bool, "sources": {name: {state, reason, markets}}, "error": str|None}``."""
        out: dict[str, Any] = {"ready": False, "sources": {}, "error": None}
        try:
            r = await http.get(f"{self.base_url}/ready", timeout=1.0)
            out["ready"] = r.status_code == 200
            r = await http.get(f"{self.base_url}/v1/sources", timeout=1.0)
            if r.status_code == 200:
                out["sources"] = {s["source"]: s for s in r.json()["sources"]}
            else:
                out["error"] = f"/v1/sources {r.status_code}"
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out

    def healthy(self, h: dict[str, Any], sources: Iterable[str] | None = None) -> bool:
        srcs = h["sources"]
        return h["ready"] and all(srcs.get(s, {}).get("state") == "UP" and srcs.get(s, {}).get("markets", 0) > 0
                                  for s in (self.sources if sources is None else sources))

    async def wait_healthy(self, timeout_s: float) -> None:
        async with httpx.AsyncClient() as http:
            last: dict[str, Any] = {}

            async def ok() -> bool:
                nonlocal last
                last = await self.health(http)
                return self.healthy(last)
            try:
                await self._until(ok, timeout_s, "every source UP with markets and the node ready")
            except RuntimeError as exc:
                states = {k: (v.get("state"), v.get("reason"), v.get("markets"))
                          for k, v in last.get("sources", {}).items()}
                raise RuntimeError(f"{exc} (ready={last.get('ready')}, sources={states}, "
                                   f"error={last.get('error')})") from None

    async def node_markets(self, http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
        r = await http.get(f"{self.base_url}/v1/markets", timeout=3.0)
        r.raise_for_status()
        return {m["market_id"]: m for m in r.json()["markets"]}

    def stop(self) -> None:
        self.managed.stop()
        with contextlib.suppress(Exception):
            if self.redis.process is not None:
                os.kill(self.redis.process.pid, signal.SIGCONT)
        self.redis.stop()
        with contextlib.suppress(Exception):
            self.stop_rabbit()

    # -- redis faults --

    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid

    def kill_redis(self) -> None:
        self.redis.kill()

    def wipe_redis_data(self) -> list[str]:
        gone = []
        for f in self.redis.data_dir.iterdir():
            if f.name.startswith(("appendonly", "dump")) or f.name == "appendonlydir":
                if f.is_dir():
                    for g in f.iterdir():
                        g.unlink()
                    f.rmdir()
                else:
                    f.unlink()
                gone.append(f.name)
        return gone


class ClusterStack(Stack):
    """A Redis Cluster (3 masters, 1 replica each; ``cluster-node-timeout``
    ``node_timeout_ms``) with one ESA ingest (``--redis-cluster``,
    ``--partitions``) on an existing simulator, and one ``oddsfeed serve``."""

    def __init__(self, work: Path, *, sim_ports: dict[str, int], truth: Truth, partitions: int = 3,
                 node_timeout_ms: int = 2000) -> None:
        super().__init__(work, sources=("esa",))
        self.sim_ports = sim_ports
        self.truth = truth
        self.partitions = partitions
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []
        self.cli = str(Path(redis_server_binary()).with_name("redis-cli"))

    def store_args(self) -> list[str]:
        return ["--redis-url", self.redis_url, "--redis-cluster", "--partitions", str(self.partitions)]

    def redis_cli(self, port: int | None, *args: str, timeout_s: float = 10.0) -> str:
        out = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout_s,
                             check=False)
        return out.stdout + out.stderr

    def start_redis(self) -> None:
        for _ in range(6):
            self.nodes.append(start_cluster_node(self.work, appendonly=True,
                                                 extra_args=("--cluster-node-timeout", str(self.node_timeout_ms))))
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = subprocess.run([self.cli, "--cluster", "create", *addrs, "--cluster-replicas", "1", "--cluster-yes"],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-400:]} {out.stderr[-400:]}")
        deadline = time.monotonic() + 30
        while True:
            infos = [self.redis_cli(n.port, "cluster", "info") for n in self.nodes]
            links = [self.redis_cli(n.port, "info", "replication") for n in self.nodes]
            replicas_up = sum("master_link_status:up" in x for x in links)
            if all("cluster_state:ok" in i for i in infos) and replicas_up == 3:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within 30 s ({replicas_up} replicas linked)")
            time.sleep(0.2)
        self.redis_url = f"redis://127.0.0.1:{self.nodes[0].port}/0"

    async def start(self, *, ready_timeout_s: float = 60.0) -> None:
        self.start_redis()
        self.ports = {**self.sim_ports, "api": free_port()}
        self.start_ingest("esa")
        self.start_serve()
        await self.wait_healthy(ready_timeout_s)

    def process_names(self) -> list[str]:
        return ["ingest-esa", "serve"]

    def roles(self) -> dict[int, str]:
        """port -> ``master`` / ``slave`` / ``fail`` per CLUSTER NODES of a live node."""
        for n in self.nodes:
            if n.process is None:
                continue
            out = self.redis_cli(n.port, "cluster", "nodes")
            roles = {}
            for line in out.splitlines():
                parts = line.split()
                if len(parts) < 3:
                    continue
                port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                flags = parts[2].split(",")
                roles[port] = "fail" if "fail" in flags else "master" if "master" in flags else "slave"
            if roles:
                return roles
        return {}

    def master_of_slot_key(self, key: str) -> EmbeddedRedis:
        """The node serving ``key``'s slot now (a master)."""
        slot = int(self.redis_cli(self.nodes[0].port, "cluster", "keyslot", key).strip())
        for n in self.nodes:
            if n.process is None:
                continue
            for line in self.redis_cli(n.port, "cluster", "nodes").splitlines():
                parts = line.split()
                if "master" not in parts[2].split(",") or "fail" in parts[2].split(","):
                    continue
                for rng in parts[8:]:
                    lo, _, hi = rng.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                        return next(m for m in self.nodes if m.port == port)
            break
        raise RuntimeError(f"no master found for {key}")

    def stop(self) -> None:
        self.managed.stop()
        for n in self.nodes:
            n.stop()


# -- stream consumers -----------------------------------------------------------------------


class _Env(msgspec.Struct):
    type: str = ""
    market_id: str | None = None
    seq: int | None = None
    kind: str | None = None
    recovered: bool | None = None
    conflated: bool | None = None
    reason: str | None = None


class _SnapMarket(msgspec.Struct):
    market_id: str
    seq: int = 0


class _Snap(msgspec.Struct):
    markets: list[_SnapMarket] = []
    recovered: bool | None = None


_ENV = msgspec.json.Decoder(_Env)
_SNAP = msgspec.json.Decoder(_Snap)


@dataclass
class SeqTracker:
    """Per-market ``seq`` bookkeeping of one stream consumer (pure: fed message by message).

    - gap: a delta whose seq jumps past held + 1. *Flagged* when the stream
      said so — the delta is an ``image`` (the market is replaced whole) or
      ``conflated: true`` — or when a later snapshot (a ``recovered: false``
      resync, or any snapshot: it replaces the book) jumps it; *unflagged*
      otherwise. A delta for a market never imaged (``orphans``) is an
      unflagged gap too (its image is what is missing).
    - the seqs an unflagged gap skipped stay *pending* until they arrive
      after all (a resume replay) or a snapshot / image of that market at or
      past them covers them (``repaired``); ``lost`` = those still pending.
    - dup: a seq ≤ the held one that fills nothing. Right after ``resumed
      {recovered: true}`` the server replays the whole log entry the token
      points into, so repeats up to the first new delta are ``replayed``
      (documented; clients dedupe by seq), not dups.
    - ``resets``: a snapshot holding a *lower* seq than held (a new epoch).
    """

    name: str = ""
    last: dict[str, int] = field(default_factory=dict)
    pending: dict[str, set[int]] = field(default_factory=dict)  # market -> skipped seqs (0 = its image)
    messages: int = 0
    deltas: int = 0
    snapshots: int = 0
    gaps_flagged: int = 0
    gaps_unflagged: int = 0
    repaired: int = 0
    dups: int = 0
    replayed: int = 0
    orphans: int = 0
    resets: int = 0
    resyncs: int = 0
    image_resyncs: int = 0
    resumed_ok: int = 0
    resumed_lost: int = 0
    undecodable: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    last_delta_ms: dict[str, int] = field(default_factory=dict)  # source prefix -> wall ms
    examples: list[str] = field(default_factory=list)
    _replaying: bool = False

    @property
    def lost(self) -> int:
        return sum(len(v) for v in self.pending.values())

    def _example(self, text: str) -> None:
        if len(self.examples) < 8:
            self.examples.append(text)

    def _cover(self, mid: str, seq: int) -> None:
        miss = self.pending.get(mid)
        if miss:
            done = {s for s in miss if s <= seq}
            self.repaired += len(done)
            miss -= done
            if not miss:
                del self.pending[mid]

    def on_message(self, data: bytes, t_ms: int | None = None) -> None:
        self.messages += 1
        try:
            env = _ENV.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.undecodable += 1
            return
        if env.type == "delta" and env.market_id is not None and env.seq is not None:
            self.on_delta(env.market_id, env.seq, env.kind or "delta", bool(env.conflated), t_ms)
        elif env.type == "snapshot":
            snap = _SNAP.decode(data)
            self.on_snapshot([(m.market_id, m.seq) for m in snap.markets], snap.recovered)
        elif env.type == "resumed":
            self.on_resumed(bool(env.recovered))
        elif env.type == "status":
            self.statuses[f"{env.reason}"] += 1

    def on_resumed(self, recovered: bool) -> None:
        if recovered:
            self.resumed_ok += 1
            self._replaying = True
        else:
            self.resumed_lost += 1

    def on_snapshot(self, markets: list[tuple[str, int]], recovered: bool | None) -> None:
        self.snapshots += 1
        self._replaying = False
        if self.snapshots > 1 or self.last:
            self.resyncs += 1
        for mid, seq in markets:
            held = self.last.get(mid)
            if held is not None:
                if seq > held:
                    self.gaps_flagged += 1
                elif seq < held:
                    self.resets += 1
            self._cover(mid, seq)
        self.last = {mid: seq for mid, seq in markets}

    def on_delta(self, mid: str, seq: int, kind: str, conflated: bool, t_ms: int | None = None) -> None:
        self.deltas += 1
        prefix = mid.split(":", 1)[0] + ":"
        self.last_delta_ms[prefix] = now_ms() if t_ms is None else t_ms
        held = self.last.get(mid)
        if held is None:
            if kind == "image":
                self._cover(mid, seq)
            else:
                self.orphans += 1
                self.gaps_unflagged += 1
                self.pending.setdefault(mid, set()).add(0)
                self._example(f"{mid}: delta seq {seq} for a market never imaged")
            self.last[mid] = seq
            return
        if seq <= held:
            miss = self.pending.get(mid)
            if miss and seq in miss:  # a skipped seq arriving after all (resume replay)
                miss.discard(seq)
                self.repaired += 1
                if not miss:
                    del self.pending[mid]
            elif self._replaying:
                self.replayed += 1
            else:
                self.dups += 1
                self._example(f"{mid}: seq {seq} again (held {held}, {kind})")
            return
        self._replaying = False
        if kind == "image":
            self._cover(mid, seq)
        if seq > held + 1:
            if kind == "image" or conflated:
                self.gaps_flagged += 1
                self.image_resyncs += kind == "image"
            else:
                self.gaps_unflagged += 1
                self.pending.setdefault(mid, set()).update(range(held + 1, seq))
                self._example(f"{mid}: seq {held} -> {seq} ({kind}), unflagged")
        self.last[mid] = seq

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k not in ("last", "name", "pending")}
        out["lost"] = self.lost
        out["statuses"] = dict(self.statuses)
        return out


class TrackedClient(OddsClient):
    """:class:`~streaming.client.OddsClient` whose every message also feeds a :class:`SeqTracker`."""

    def __init__(self, url: str, *, transport: str, name: str, **kw: Any) -> None:
        kw = {"reconnect_initial_s": 0.1, "reconnect_max_s": 2.0, "heartbeat_ms": 1000, **kw}
        super().__init__(url, transport=transport, **kw)  # type: ignore[arg-type]
        self.tracker = SeqTracker(name=name)

    def _on_message(self, data: bytes, now: float, sse_id: str | None) -> None:
        self.tracker.on_message(data)
        super()._on_message(data, now, sse_id)


# -- price-check prober -----------------------------------------------------------------------


@dataclass
class Probe:
    checked_at: int
    market_id: str
    selection_id: str
    price_h: int
    reason: str
    age_ms: int | None
    source_state: str | None
    in_play: bool | None


class Prober:
    """Every ``interval_s``: a random open market (with one of ``prefixes``)
    of the node's list (refreshed every 2 s), its current view, and a price
    check of one active selection's best back price, exactly
    (``accept_better: false``). Bounded by ``max_probes`` and :meth:`stop`."""

    def __init__(self, base_url: str, prefixes: Iterable[str], *, interval_s: float = 0.05, seed: int = 1,
                 max_probes: int = 20_000) -> None:
        self.base_url = base_url
        self.prefixes = tuple(prefixes)
        self.interval_s = interval_s
        self.max_probes = max_probes
        self.rng = random.Random(seed)
        self.probes: list[Probe] = []
        self.errors: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prober")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        listing: list[str] = []
        next_list = 0.0
        async with httpx.AsyncClient(base_url=self.base_url, timeout=1.0) as http:
            n = 0
            while not self._stop.is_set() and n < self.max_probes:
                t0 = loop.time()
                n += 1
                try:
                    if t0 >= next_list or not listing:
                        r = await http.get("/v1/markets")
                        r.raise_for_status()
                        listing = [m["market_id"] for m in r.json()["markets"]
                                   if m["market_id"].startswith(self.prefixes) and m["status"] == "OPEN"]
                        next_list = t0 + 2.0
                    if listing:
                        await self._probe(http, self.rng.choice(listing))
                    else:
                        self.errors["no open market listed"] += 1
                except httpx.HTTPStatusError as exc:
                    self.errors[f"HTTP {exc.response.status_code}"] += 1
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    self.errors[type(exc).__name__] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, t0 + self.interval_s - loop.time()))

    async def _probe(self, http: httpx.AsyncClient, mid: str) -> None:
        r = await http.get(f"/v1/markets/{mid}")
        if r.status_code == 404:
            self.errors["market gone"] += 1
            return
        r.raise_for_status()
        m = r.json()
        sels = [s for s in m.get("selections") or [] if s.get("status") == "ACTIVE" and offered_of(s) is not None]
        if m.get("status") != "OPEN" or not sels:
            self.errors["no active priced selection"] += 1
            return
        s = self.rng.choice(sels)
        price = offered_of(s)
        assert price is not None
        r = await http.post("/v1/price-check", json={"market_id": mid, "selection_id": s["selection_id"],
                                                      "side": "back", "price": price, "accept_better": False})
        r.raise_for_status()
        a = r.json()
        self.probes.append(Probe(checked_at=a["checked_at"], market_id=mid, selection_id=s["selection_id"],
                                 price_h=hundredths(price), reason=a["reason"], age_ms=a.get("age_ms"),
                                 source_state=a.get("source_state"), in_play=a.get("in_play")))


def judge_probes(probes: list[Probe], truth: Truth, allowance_ms: dict[str, int],
                 dead: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Price-check answers against the truth.

    wrong_fresh: ``OK`` whose own freshness claim was false — the answer
    says the price was confirmed current ``age_ms`` before ``checked_at``,
    yet the upstream had not offered that price at any moment of
    [checked_at − age_ms − allowance, checked_at] (``allowance_ms`` per
    market id prefix: the feed lag we grant). unjudged: the truth does not
    reach back that far.
    ok_dead: ``OK`` on a market of a source inside ``dead[source]`` = (from,
    to) ms: its ingest was dead (past a grace) — nothing confirms those prices.
    A key of ``dead`` that is not a source name is a market id prefix (e.g.
    the events of a UOF producer that was down: ``uof:sr:match:1001:``).
    """
    out: dict[str, Any] = {"probes": len(probes), "reasons": Counter(p.reason for p in probes), "wrong_fresh": 0,
                           "unjudged": 0, "ok_dead": 0, "worst_ms": None, "examples": []}
    for p in probes:
        if p.reason != "OK":
            continue
        src = source_of(p.market_id)
        window = None
        if dead:
            window = dead.get(src) if src is not None else None
            if window is None:
                window = next((w for k, w in dead.items() if k not in SOURCES and p.market_id.startswith(k)), None)
        if window is not None and window[0] <= p.checked_at < window[1]:
            out["ok_dead"] += 1
            if len(out["examples"]) < 5:
                out["examples"].append(f"{p.market_id}/{p.selection_id} OK at {p.price_h / 100:g} while its source "
                                       f"was dead ({p.checked_at - window[0]} ms into the window, age_ms "
                                       f"{p.age_ms}, source {p.source_state})")
        prefix = p.market_id.split(":", 1)[0] + ":"
        allow = allowance_ms.get(prefix, 1000)
        claimed = p.checked_at - (p.age_ms or 0)
        verdict = truth.offered_within(p.market_id, p.selection_id, p.price_h, claimed - allow, p.checked_at)
        if verdict is None:
            out["unjudged"] += 1
        elif not verdict:
            out["wrong_fresh"] += 1
            until = truth.offered_until(p.market_id, p.selection_id, p.price_h, p.checked_at)
            if until is not None and (out["worst_ms"] is None or p.checked_at - until > out["worst_ms"]):
                out["worst_ms"] = p.checked_at - until
            if len(out["examples"]) < 5:
                gone = f"{p.checked_at - until} ms" if until is not None else "ever (in the truth log)"
                out["examples"].append(
                    f"{p.market_id}/{p.selection_id} OK at {p.price_h / 100:g} (checked_at {p.checked_at}, "
                    f"age_ms {p.age_ms}, allowance {allow} ms, source {p.source_state}); the upstream had "
                    f"not offered it for {gone}")
    out["reasons"] = dict(out["reasons"])
    return out
