"""Fault suite: a catalogue of faults against REAL processes on 127.0.0.1, one table row each.

The stack (``benchmarks/fault_harness.py``): an embedded redis-server
(append-only), a private RabbitMQ node (``tests/rabbitmq.py``; Debian's
``rabbitmq-server``, ``bash .ci/install-rabbitmq``), ``oddsfeed simulate
--providers --truth-log … --control-port … --uof-amqp-url … --webhook-url …``
(ESA, Pinnacle- and Odds-API-style HTTP, push over WebSocket and SSE, a
Unified-Odds-Feed producer publishing to the broker with its recovery API,
and a webhook pusher POSTing signed push-format deliveries; the truth log
records every upstream change), one ``oddsfeed ingest --source …`` per
source kind (esa, pinnacle, theoddsapi, push-ws, push-sse, uof, webhook) and
one ``oddsfeed serve``. Faults are real: ``kill -9``, ``SIGSTOP``, a wiped
data directory, a Redis Cluster master killed, the broker closing every
connection or restarted, and the simulators' own fault switches (flipped
over their control port).

Every row exists on every machine. A row that needs a part missing here
reads ``n/a`` (a miss) and says which: the ``uof`` rows and
``ingest_kill_uof`` without aio-pika or rabbitmq-server (the ``uof`` source
is then left out of the stack), ``ingest_clock_ahead`` without libfaketime.
A row over every source runs without the missing one and, whatever its
figures, reads ``PARTIAL`` (a miss too), saying what it ran without: such
a run never reports every row met. ``--list`` marks both kinds.

Every row runs the same way:

1. the stack is healed (dead processes restarted; rebuilt when it stays
   unhealthy) and must be ready with every source UP;
2. a raw SSE client and a WebSocket client (``streaming.client.OddsClient``,
   reconnecting with resume tokens) subscribe to everything, and the
   price-check prober starts (every ~50 ms: a random open market of the
   row's sources from the node's REST view, ``POST /v1/price-check`` for its
   current best back price, exactly);
3. a baseline (3 s), the fault, then up to ``--recover-timeout`` seconds for
   the system to recover, 2 s more of observation;
4. the upstream is frozen and, after a settle (up to ``--settle`` s), the
   node's markets are compared with the simulator's truth; then unfrozen.

Columns:

- ``recovered``: within ``--recover-timeout`` after the fault ended every
  process was running, ``/ready`` answered 200, the row's sources were UP in
  ``/v1/sources``, both clients were connected and had received a delta of
  each of those sources after the fault — and at the end no market differed
  from the truth (``differ`` 0) and both clients' books matched the node's
  (seq and status of every market). ``ttr``: seconds from the end of the fault
  (restart issued, SIGCONT sent, switch consumed) until the first of those
  held (``ingest_dead``: until its source read DOWN).
- ``lost``: deltas the clients never got and were not told about: the seqs
  missing in unflagged gaps, plus markets that arrived without their image
  (SSE + WS). ``dup``: deltas delivered again (seq ≤ the held one) outside the
  documented replay of one log entry right after ``resumed {recovered: true}``.
- ``SSE gaps`` / ``WS gaps``: seq jumps seen by each client, ``flagged/unflagged``:
  flagged = covered by a ``recovered: false`` / later snapshot, an
  ``image`` delta or ``conflated: true``.
- ``differ``: markets whose final node view (status class; best back/lay or
  price of active selections) differs from the upstream's truth after the
  settle; ``-`` when the node could not be read.
- ``wrong-fresh``: price checks answered ``OK`` whose freshness claim was
  false: the answer says the price was confirmed current ``age_ms`` before
  the check, yet the upstream had not offered it at any moment from
  ``age_ms + --allowance-ms`` (the feed lag granted) before the check until
  the check.

Targets: every row recovered, 0 lost, 0 dup, 0 unflagged gaps, 0
wrong-fresh (and the row's own checks, e.g. ``ingest_dead``: DOWN within the
health lease + 2 s and no ``OK`` after that; ``uof_producer_down``: the source
DEGRADED/``producer_down``, that producer's markets SUSPENDED or stale and no
``OK`` on them while it is down, then a recovery completed by its
``snapshot_complete``; ``uof_malformed`` / ``uof_poison_ts``: a recovery
requested after the quarantine). A row whose measurement saw
nothing (no deltas or price checks in the baseline, a switch with no
effect) is INVALID, which also fails. Exit status 1 when any selected row
misses (or was not run), 0 when all are met.

Usage::

    python benchmarks/faults.py                        # the whole catalogue (≤ 15 min on 2 cores)
    python benchmarks/faults.py --only redis_kill,ingest_kill_esa --json /tmp/faults.json
    python benchmarks/faults.py --list                 # the rows
    python benchmarks/faults.py --self-check           # show the measurements count what they claim

Only 127.0.0.1 is used. Each loop is bounded in count and time; the whole
run stops starting rows after ``--budget`` seconds (rows not run fail).
Logs of every process: the printed work directory (kept with ``--keep`` or
when a row failed).

Writes ``docs/bench/faults-recovery.png`` (``--png-dir`` elsewhere,
``--no-png`` not at all): per row run, the time to recover against the
target (``--recover-timeout``), missed rows marked; a run of some rows only
(``--only`` or the budget) says so in its title and names them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.fault_harness import (  # noqa: E402
    POLLERS,
    SOURCES,
    UNAVAILABLE,
    ClusterStack,
    Prober,
    SeqTracker,
    SimControl,
    Stack,
    UOF_UNAVAILABLE,  # noqa: F401 - re-exported: why the uof source cannot run here (None: it can)
    TrackedClient,
    Truth,
    diff_markets,
    judge_probes,
    now_ms,
)
from benchmarks import plots  # noqa: E402
from feed.embedded_redis import redis_server_binary  # noqa: E402
from feed.settings import Settings  # noqa: E402
from streaming.state import NodeOptions  # noqa: E402

#: provider times a poisoned message carries: year 2100, the epoch, negative, 2**63
POISON = [4_102_444_800_000, 0, -1, 2**63]
ALL = tuple(SOURCES)  # every source, uof included wherever it can run or not (a row says what it ran without)
PUSH = ("push-ws", "push-sse")


# -- the row context ----------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a row's fault function can use and report through."""

    stack: Stack
    control: SimControl
    http: httpx.AsyncClient
    clients: list[TrackedClient]
    scope: tuple[str, ...]
    recover_timeout_s: float = 20.0
    t_start: int = 0             # fault began (ms)
    t_end: int = 0               # fault ended (ms): the recovery clock starts here
    notes: list[str] = field(default_factory=list)
    checks: dict[str, tuple[Any, bool]] = field(default_factory=dict)  # row-specific: name -> (value, met)
    dead: dict[str, tuple[int, int]] = field(default_factory=dict)    # source -> window where OK is wrong
    ttr_override: float | None = None
    recovery: asyncio.Task[tuple[float | None, list[str]]] | None = None
    dead_label: str = "no OK after lease+2s"  # the row check judging OKs inside ``dead``

    def begin(self) -> None:
        self.t_start = now_ms()

    def end(self) -> None:
        """The fault is over: start the recovery clock and watch for recovery
        at once (the fault function may go on gathering evidence)."""
        if self.recovery is None:
            self.t_end = now_ms()
            self.recovery = asyncio.create_task(self._watch_recovery(), name="recovery")

    async def _watch_recovery(self) -> tuple[float | None, list[str]]:
        """(seconds from the fault's end until :func:`_problems` found none, or
        None after ``recover_timeout_s``; the last problems seen)."""
        problems: list[str] = []
        deadline = time.monotonic() + self.recover_timeout_s
        while time.monotonic() < deadline:
            problems = await _problems(self, self.t_end)
            if not problems:
                return (now_ms() - self.t_end) / 1000, []
            await asyncio.sleep(0.2)
        return None, problems

    async def stats(self) -> dict[str, Any]:
        return await self.control.call(None, "stats")  # type: ignore[no-any-return]

    async def sources(self) -> dict[str, dict[str, Any]]:
        return (await self.stack.health(self.http))["sources"]

    async def watch_states(self, seconds: float, sources: tuple[str, ...],
                           until: Callable[[], Awaitable[bool]] | None = None) -> dict[str, list[str]]:
        """States (``STATE/reason``) each source showed while polling for
        ``seconds`` (or until ``until()`` holds)."""
        seen: dict[str, list[str]] = {s: [] for s in sources}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            srcs = await self.sources()
            for s in sources:
                st = srcs.get(s, {})
                label = f"{st.get('state')}/{st.get('reason')}"
                if not seen[s] or seen[s][-1] != label:
                    seen[s].append(label)
            if until is not None and await until():
                break
            await asyncio.sleep(0.2)
        return seen

    async def rejected(self, sources: tuple[str, ...]) -> dict[str, dict[str, int]]:
        srcs = await self.sources()
        return {s: dict(srcs.get(s, {}).get("rejected_by_reason") or {}) for s in sources}


Inject = Callable[[Ctx], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    scope: tuple[str, ...]
    inject: Inject
    kind: str = "main"  # main | cluster | storm
    requires: Callable[[], str | None] | None = None  # why the row cannot run here (a part missing), None: it can

    def unavailable(self) -> tuple[str | None, dict[str, str]]:
        """(why this row cannot run here at all, None when it can; the sources of its scope it
        runs without here, with why: :data:`fault_harness.UNAVAILABLE`)."""
        without = {s: UNAVAILABLE[s] for s in self.scope if s in UNAVAILABLE}
        why = self.requires() if self.requires is not None else None
        if why is None and without and len(without) == len(self.scope):
            why = "; ".join(f"{s} unavailable: {w}" for s, w in without.items())
        return why, without


# -- fault functions ----------------------------------------------------------------------------


async def redis_kill(ctx: Ctx) -> dict[str, Any]:
    pid = ctx.stack.redis_pid()
    ctx.begin()
    ctx.stack.kill_redis()
    await asyncio.sleep(2.0)
    ctx.stack.start_redis()
    return {"applied": True, "killed_pid": pid, "restarted_after_s": 2.0}


async def redis_empty(ctx: Ctx) -> dict[str, Any]:
    import redis as redis_py

    pid = ctx.stack.redis_pid()
    ctx.begin()
    ctx.stack.kill_redis()
    wiped = ctx.stack.wipe_redis_data()
    await asyncio.sleep(2.0)
    ctx.stack.start_redis()
    r = redis_py.Redis.from_url(ctx.stack.redis_url)
    try:
        keys = r.dbsize()
    finally:
        r.close()
    return {"applied": bool(wiped), "killed_pid": pid, "wiped": wiped, "keys_right_after_restart": keys}


async def redis_back_older(ctx: Ctx) -> dict[str, Any]:
    """The store goes back in time as a whole, in place: a snapshot of 3 s earlier loaded by the
    running server (``DEBUG RELOAD NOSAVE`` of an RDB saved then) — no restart, no connection closed,
    the same epoch: a backup restored in place, a lagging replica promoted behind a proxy. Every
    write of those 3 s is lost, quiet markets' included, while the sources go on confirming."""
    import redis as redis_py

    data_dir = ctx.stack.redis.data_dir
    r = redis_py.Redis.from_url(ctx.stack.redis_url)
    try:
        r.save()
        shutil.copy(data_dir / "dump.rdb", data_dir / "older.rdb")
        saved_keys = r.dbsize()
        await asyncio.sleep(3.0)
        ctx.begin()
        r.config_set("dbfilename", "older.rdb")
        try:
            r.execute_command("DEBUG", "RELOAD", "NOSAVE")
        finally:
            r.config_set("dbfilename", "dump.rdb")
        r.bgrewriteaof()  # (the append-only file follows the data again: a later restart loads this)
        keys = r.dbsize()
    finally:
        r.close()
    return {"applied": True, "went_back_s": 3.0, "keys_saved": saved_keys, "keys_after": keys}


async def redis_stop(ctx: Ctx) -> dict[str, Any]:
    pid = ctx.stack.redis_pid()
    ctx.begin()
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(10.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    return {"applied": True, "stopped_pid": pid, "stopped_s": 10.0}


def ingest_kill(source: str) -> Inject:
    async def inject(ctx: Ctx) -> dict[str, Any]:
        ctx.begin()
        pid = ctx.stack.managed.signal(f"ingest-{source}", signal.SIGKILL)
        await asyncio.sleep(1.0)
        ctx.stack.start_ingest(source)
        return {"applied": True, "killed_pid": pid, "restarted_after_s": 1.0}
    return inject


async def serve_kill(ctx: Ctx) -> dict[str, Any]:
    before = [c.tracker.resumed_ok + c.tracker.resumed_lost for c in ctx.clients]
    ctx.begin()
    pid = ctx.stack.managed.signal("serve", signal.SIGKILL)
    await asyncio.sleep(1.0)
    ctx.stack.start_serve()
    ctx.end()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # evidence: both clients came back through a resume
        if all(c.tracker.resumed_ok + c.tracker.resumed_lost > b for c, b in zip(ctx.clients, before, strict=True)):
            break
        await asyncio.sleep(0.2)
    resumes = {c.tracker.name: {"recovered": c.tracker.resumed_ok, "not_recovered": c.tracker.resumed_lost}
               for c in ctx.clients}
    ctx.notes.append("resumes " + ", ".join(f"{k} ok/lost {v['recovered']}/{v['not_recovered']}"
                                           for k, v in resumes.items()))
    return {"applied": True, "killed_pid": pid, "restarted_after_s": 1.0, "resumes": resumes}


async def ingest_dead(ctx: Ctx) -> dict[str, Any]:
    """Kill the ESA ingest and leave it dead: its source must read DOWN and
    price checks on its markets must stop answering OK within the lease + 2 s."""
    lease_ms = Settings().health_lease_ms
    grace_ms = lease_ms + 2000
    ctx.begin()
    pid = ctx.stack.managed.signal("ingest-esa", signal.SIGKILL)
    t_kill = now_ms()
    t_down = None
    reason = None
    observe_until = time.monotonic() + max(15.0, grace_ms / 1000 + 4)
    while time.monotonic() < observe_until:
        st = (await ctx.sources()).get("esa", {})
        if t_down is None and st.get("state") == "DOWN":
            t_down, reason = now_ms(), st.get("reason")
            observe_until = min(observe_until, time.monotonic() + max(3.0, (t_kill + grace_ms - now_ms()) / 1000 + 3))
        await asyncio.sleep(0.1)
    t_restart = now_ms()
    ctx.dead["esa"] = (t_kill + grace_ms, t_restart)
    down_s = (t_down - t_kill) / 1000 if t_down else None
    ctx.ttr_override = down_s
    ctx.checks["DOWN within lease+2s"] = (f"{down_s:.1f}s ({reason})" if down_s is not None else "never",
                                          down_s is not None and down_s * 1000 <= grace_ms)
    ctx.stack.start_ingest("esa")  # heal; the rest of the row checks it comes back
    ctx.notes.append(f"ingest restarted after {(t_restart - t_kill) / 1000:.1f} s dead")
    return {"applied": True, "killed_pid": pid, "down_after_s": down_s, "down_reason": reason,
            "grace_ms": grace_ms}


FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1")
CLOCK_AHEAD_S = 30


def _faketime_lib() -> str | None:
    return next((p for p in FAKETIME_LIBS if os.path.exists(p)), None)


def _needs_faketime() -> str | None:
    """Why ``ingest_clock_ahead`` cannot run here (None: it can)."""
    return None if _faketime_lib() is not None else "libfaketime not installed (apt-get install faketime)"


async def ingest_clock_ahead(ctx: Ctx) -> dict[str, Any]:
    """Restart the ESA ingest with its host clock 30 s ahead (libfaketime: its wall clock only,
    not the monotonic one), let it stream, then kill it and leave it dead. Every time it
    stamps — receipt, health record, lease — is 30 s in the node's future: measured against
    them, its dead source's prices read 0 ms old for 30 s plus the lease. Its source must read
    DOWN (``clock_skew``) within 5 s, and no price check of its markets may answer OK from then
    until it is restarted with a true clock."""
    lib = _faketime_lib()
    if lib is None:  # (the row's ``requires`` says so before the stack is touched)
        return {"applied": False, "not_available": _needs_faketime()}
    ctx.begin()
    ctx.stack.managed.signal("ingest-esa", signal.SIGKILL)
    ctx.stack.start_ingest("esa", env={"LD_PRELOAD": lib, "FAKETIME": f"+{CLOCK_AHEAD_S}s",
                                       "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    t_skewed = now_ms()
    t_down = None
    reason = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        st = (await ctx.sources()).get("esa", {})
        if st.get("state") == "DOWN" and st.get("reason") == "clock_skew":
            t_down, reason = now_ms(), st.get("reason")
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(3.0)  # the skewed ingest streams on: still DOWN, no OK
    pid = ctx.stack.managed.signal("ingest-esa", signal.SIGKILL)
    t_kill = now_ms()
    await asyncio.sleep(CLOCK_AHEAD_S / 3)  # its last records still read "in the future" here
    st = (await ctx.sources()).get("esa", {})
    t_restart = now_ms()
    # /v1/sources reads the health records from Redis at once; the node's own view (what price
    # checks use) reads them every health refresh (1 s): OK is wrong from its next read on
    grace_ms = NodeOptions().health_refresh_ms + 1000
    ctx.dead["esa"] = ((t_down if t_down is not None else t_skewed + 5000) + grace_ms, t_restart)
    down_s = (t_down - t_skewed) / 1000 if t_down is not None else None
    ctx.checks["DOWN (clock_skew) within 5 s"] = (f"{down_s:.1f}s" if down_s is not None else "never",
                                                  down_s is not None and down_s <= 5.0)
    ctx.checks["still DOWN after it died"] = (f"{st.get('state')}/{st.get('reason')}", st.get("state") == "DOWN")
    ctx.stack.start_ingest("esa")  # heal with a true clock; the rest of the row checks it comes back
    ctx.end()
    ctx.notes.append(f"ingest {CLOCK_AHEAD_S} s ahead for {(t_kill - t_skewed) / 1000:.1f} s, then dead "
                     f"{(t_restart - t_kill) / 1000:.1f} s")
    return {"applied": True, "killed_pid": pid, "down_after_s": down_s, "down_reason": reason}


def esa_switch(op: str, wait_s: float = 0.0, then: tuple[str, dict[str, Any]] | None = None,
               watch: bool = False, expect_reconnects: int = 0, **args: Any) -> Inject:
    async def inject(ctx: Ctx) -> dict[str, Any]:
        before = (await ctx.stats())["esa"]
        rej0 = await ctx.rejected(("esa",))
        ctx.begin()
        await ctx.control.call("esa", op, **args)
        states = await ctx.watch_states(wait_s, ("esa",)) if watch else None
        if not watch and wait_s:
            await asyncio.sleep(wait_s)
        if then is not None:
            await ctx.control.call("esa", then[0], **then[1])
        ctx.end()  # the fault is over; what follows only gathers evidence
        ev: dict[str, Any] = {"applied": True, "switch": op, "args": args}
        if states is not None:
            ev["states_seen"] = states
        if expect_reconnects:
            deadline = time.monotonic() + 15
            after = before
            while time.monotonic() < deadline:
                after = (await ctx.stats())["esa"]
                if after["connections_accepted"] - before["connections_accepted"] >= expect_reconnects:
                    break
                await asyncio.sleep(0.2)
            ev["reconnects"] = after["connections_accepted"] - before["connections_accepted"]
            ev["resubscribed_with_clk"] = after["resubscriptions"] - before["resubscriptions"]
            ev["applied"] = ev["reconnects"] >= expect_reconnects
            ctx.notes.append(f"ESA reconnects {ev['reconnects']} ({ev['resubscribed_with_clk']} with clk)")
        if op in ("inject_malformed", "poison_timestamps"):
            await asyncio.sleep(1.0)
            rej1 = await ctx.rejected(("esa",))
            ev["rejected_by_reason"] = {k: v - rej0["esa"].get(k, 0) for k, v in rej1["esa"].items()
                                        if v != rej0["esa"].get(k, 0)}
            ctx.notes.append(f"esa rejected {ev['rejected_by_reason'] or 'nothing'}")
        if states is not None:
            ctx.notes.append(f"esa states {' → '.join(states['esa'])}")
        return ev
    return inject


def http_switch(faults: list[tuple[str, dict[str, Any]]]) -> Inject:
    """Each fault once per provider of the row (a switch without ``provider``
    would be used up by whichever poller asks first)."""
    async def inject(ctx: Ctx) -> dict[str, Any]:
        before = (await ctx.stats())["http"]
        ctx.begin()
        for op, args in faults:
            if op in ("duplicate", "replay_old"):  # Pinnacle only
                await ctx.control.call("http", op, **args)
                continue
            for provider in ctx.scope:
                await ctx.control.call("http", op, **args, provider=provider)
        pending = None

        async def consumed() -> bool:
            nonlocal pending
            pending = (await ctx.stats())["http"]["pending_faults"]
            return not pending
        states = await ctx.watch_states(20, POLLERS, until=consumed)
        ctx.end()  # the last faulty answer went out
        after = (await ctx.stats())["http"]
        served = {k: v - before["status_counts"].get(k, 0) for k, v in after["status_counts"].items()
                  if v != before["status_counts"].get(k, 0)}
        ctx.notes.append("; ".join(f"{s} {' → '.join(v)}" for s, v in states.items()))
        if pending:
            ctx.notes.append(f"{pending} fault(s) never consumed (no requests?)")
            await ctx.control.call("http", "clear_faults")
        return {"applied": not pending, "faults": faults, "answers_during": served, "states_seen": states}
    return inject


def push_switch(op: str, wait_s: float = 0.0, **args: Any) -> Inject:
    async def inject(ctx: Ctx) -> dict[str, Any]:
        before = (await ctx.stats())["push"]
        rej0 = await ctx.rejected(PUSH)
        ctx.begin()
        result = await ctx.control.call("push", op, **args)
        if not wait_s:
            ctx.end()  # an instant switch: over at once
        states = await ctx.watch_states(max(wait_s, 2.0), PUSH)
        ctx.end()  # a stall: over after wait_s
        after = (await ctx.stats())["push"]
        rej1 = await ctx.rejected(PUSH)
        ev: dict[str, Any] = {"applied": True, "switch": op, "args": args, "result": result, "states_seen": states,
                              "reconnects": after["connections_accepted"] - before["connections_accepted"],
                              "snapshot_requests": after["snapshot_requests"] - before["snapshot_requests"],
                              "rejected_by_reason": {s: {k: v - rej0[s].get(k, 0) for k, v in rej1[s].items()
                                                         if v != rej0[s].get(k, 0)} for s in PUSH}}
        if op == "drop_connections":
            ev["applied"] = bool(result)
        ctx.notes.append(f"push reconnects {ev['reconnects']}, REST snapshots {ev['snapshot_requests']}; "
                         + "; ".join(f"{s} {' → '.join(v)}" for s, v in states.items()))
        if any(ev["rejected_by_reason"].values()):
            ctx.notes.append(f"rejected {ev['rejected_by_reason']}")
        return ev
    return inject


def push_switches(faults: list[tuple[str, dict[str, Any]]]) -> Inject:
    first, *rest = faults

    async def inject(ctx: Ctx) -> dict[str, Any]:
        for op, args in rest:
            await ctx.control.call("push", op, **args)
        return await push_switch(first[0], **first[1])(ctx)
    return inject


def _diff(before: dict[str, Any], after: dict[str, Any], key: str) -> Any:
    """after[key] - before[key] (per item for dicts of counts)."""
    a, b = after.get(key), before.get(key)
    if isinstance(a, dict):
        b = b or {}
        return {k: v - b.get(k, 0) for k, v in a.items() if v != b.get(k, 0)}
    return (a or 0) - (b or 0)


def sim_switches(target: str, faults: list[tuple[str, dict[str, Any]]],
                 expect: Callable[[dict[str, Any], dict[str, Any], dict[str, int]], tuple[bool, str]],
                 *, wait_s: float = 0.0, dead_on_down: bool = False, repair: bool = False) -> Inject:
    """The ``uof`` or ``webhook`` simulator's switches, all at once; the fault is over when
    every switch is used up (``pending_faults`` 0, at most 20 s) and ``wait_s`` has passed.
    ``expect(before, after, rejected)`` (the target's stats, what the source quarantined meanwhile
    by reason): (the switches took effect, a note).
    ``dead_on_down``: while the source reads DOWN (from its first DOWN plus the node's health
    refresh and 1 s, until it first reads anything else), no price check of its markets may
    answer OK.
    ``repair`` (``uof``): a message quarantined whole may have carried a change of unknown markets
    (a poisoned ``odds_change`` does), so the source must ask for a recovery — a row check: the
    simulator accepted at least one recovery request within 5 s of the switches used up."""
    source = target  # the source consuming this simulator has the target's name

    async def inject(ctx: Ctx) -> dict[str, Any]:
        before = (await ctx.stats())[target]
        rej0 = await ctx.rejected((source,))
        ctx.begin()
        t0 = time.monotonic()
        for op, args in faults:
            await ctx.control.call(target, op, **args)
        pending = None
        seen: list[str] = []
        t_down = t_up = None
        deadline = time.monotonic() + max(20.0, wait_s + 5)
        while time.monotonic() < deadline:
            st = (await ctx.sources()).get(source, {})
            label = f"{st.get('state')}/{st.get('reason')}"
            if not seen or seen[-1] != label:
                seen.append(label)
            if t_down is None and st.get("state") == "DOWN":
                t_down = now_ms()
            if t_down is not None and t_up is None and st.get("state") != "DOWN":
                # left DOWN (DEGRADED: a producer is back and its recovery re-images its markets —
                # an OK on them is the truth judge's to check, not this window's)
                t_up = now_ms()
            if ctx.recovery is None:
                pending = (await ctx.stats())[target]["pending_faults"]
                if not pending and time.monotonic() - t0 >= wait_s:
                    ctx.end()  # every switch used up: the fault is over
            if ctx.recovery is not None and (not dead_on_down or t_down is None or t_up is not None):
                break
            await asyncio.sleep(0.1)
        ctx.end()
        states = {source: seen}
        if dead_on_down:
            grace_ms = NodeOptions().health_refresh_ms + 1000
            if t_down is not None:
                ctx.dead[source] = (t_down + grace_ms, t_up or now_ms())
                ctx.dead_label = f"no OK on {source} markets while it read DOWN"
            ctx.checks[f"{source} read DOWN"] = (" → ".join(seen), t_down is not None)
        await asyncio.sleep(1.0)  # the last faulty message reaches the source
        after = (await ctx.stats())[target]
        rej1 = await ctx.rejected((source,))
        rejected = {k: v - rej0[source].get(k, 0) for k, v in rej1[source].items() if v != rej0[source].get(k, 0)}
        applied, note = expect(before, after, rejected)
        if repair:
            deadline = time.monotonic() + 4.0
            while _diff(before, after, "recovery_requests") < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                after = (await ctx.stats())[target]
            asked = _diff(before, after, "recovery_requests")
            ctx.checks["recovery requested after the quarantine"] = (f"{asked} accepted", asked >= 1)
        if dead_on_down and t_down is None:
            applied, note = False, f"{note}; {source} never read DOWN"
        ev: dict[str, Any] = {"applied": applied and not pending, "switches": faults, "states_seen": states,
                              "rejected_by_reason": rejected,
                              "sim": {k: _diff(before, after, k) for k in after
                                      if isinstance(after[k], int | dict)
                                      and k not in ("events_by_product", "recovery_accepted_ms")}}
        if pending:
            ctx.notes.append(f"{pending} fault(s) never used up")
            await ctx.control.call(target, "clear_faults")
        ctx.notes.append(f"{note}; {source} {' → '.join(states[source])}")
        if ev["rejected_by_reason"]:
            ctx.notes.append(f"{source} rejected {ev['rejected_by_reason']}")
        return ev
    return inject


def uof_producer_down(product: int, mode: str, seconds: float = 0.0, fail_recoveries: int = 0) -> Inject:
    """UOF producer ``product`` goes down (``silent``: no message, alives included, for ``seconds``,
    its changes lost; ``unsubscribed``: its next alive says ``subscribed="0"`` and its messages are
    lost until a recovery is requested), optionally with the next ``fail_recoveries`` recovery requests
    answered 500. Expected: the source DEGRADED/``producer_down``, that producer's markets SUSPENDED or
    stale (no price check OK on them from the node's next health refresh after it read DOWN until
    the source is UP again), then a recovery (``initiate_request?after=``) completed by its
    ``snapshot_complete``."""
    async def inject(ctx: Ctx) -> dict[str, Any]:
        before = (await ctx.stats())["uof"]
        events = list(before["events_by_product"].get(str(product), []))
        ctx.begin()
        if fail_recoveries:
            await ctx.control.call("uof", "fail_recovery", n=fail_recoveries)
        await ctx.control.call("uof", "producer_down", product=product, seconds=seconds, mode=mode)
        t_fault = time.monotonic()
        t_down: int | None = None
        sampled: tuple[int, int] | None = None
        seen: list[str] = []
        grace_ms = NodeOptions().health_refresh_ms + 1000
        deadline = t_fault + seconds + 25
        t_up = None
        while time.monotonic() < deadline:
            st = (await ctx.sources()).get("uof", {})
            label = f"{st.get('state')}/{st.get('reason')}"
            if not seen or seen[-1] != label:
                seen.append(label)
            if t_down is None and st.get("state") != "UP":
                t_down = now_ms()
            if (mode == "silent" and t_down is not None and sampled is None and now_ms() > t_down + grace_ms
                    and time.monotonic() < t_fault + seconds - 0.5):
                node = await ctx.stack.node_markets(ctx.http)
                mine = [m for mid, m in node.items() if any(mid.startswith(f"uof:{e}:") for e in events)
                        and m.get("status") not in ("SETTLED", "CLOSED", "CANCELLED")]
                fresh_open = [m["market_id"] for m in mine if m.get("status") == "OPEN" and not m.get("stale")]
                sampled = (len(fresh_open), len(mine))
            if time.monotonic() >= t_fault + seconds and ctx.recovery is None:
                ctx.end()  # the producer speaks again (silent) / at once (unsubscribed)
            if t_down is not None and st.get("state") == "UP":
                t_up = now_ms()
                break
            await asyncio.sleep(0.1)
        ctx.end()
        after = (await ctx.stats())["uof"]
        recovered = _diff(before, after, "recoveries_by_product").get(str(product), 0)
        failures = _diff(before, after, "recovery_failures")
        completed = _diff(before, after, "completed")
        accepted_ms = after.get("recovery_accepted_ms", {}).get(str(product))
        if t_down is not None:
            # until the recovery that worked was accepted: its odds_change re-image the markets one by one
            # (each then fresh from its own message), snapshot_complete ends it
            end = accepted_ms if accepted_ms and accepted_ms > t_down else (t_up or now_ms())
            for e in events:
                ctx.dead[f"uof:{e}:"] = (t_down + grace_ms, end)
            ctx.dead_label = "no OK on the producer's markets while it was down"
        if mode == "silent" or fail_recoveries:  # (subscribed=0 alone is recovered at once: too quick to poll)
            ctx.checks["source read producer_down"] = (" → ".join(seen),
                                                       any(x.endswith("/producer_down") for x in seen))
        ctx.checks[f"producer {product} recovered (recovery accepted, snapshot_complete)"] = (
            f"{recovered} accepted, {failures} answered 500, {completed} completed", recovered >= 1 and completed >= 1)
        if mode == "silent":
            ctx.checks["its markets SUSPENDED or stale while down"] = (
                f"{sampled[0]} of {sampled[1]} open and fresh" if sampled else "not sampled",
                sampled is not None and sampled[0] == 0 and sampled[1] > 0)
        if fail_recoveries:
            ctx.checks["recovery retried after the failures"] = (f"{failures} failed first",
                                                                  failures >= fail_recoveries)
        lost = _diff(before, after, "lost")
        ctx.notes.append(f"producer {product} {mode}: {lost} messages lost upstream; uof {' → '.join(seen)}")
        # evidence: the producer went silent (its messages lost upstream) or said subscribed="0", and the ingest
        # asked for its recovery (nothing else would)
        said_unsubscribed = _diff(before, after, "unsubscribed_alives")
        shown = lost > 0 if mode == "silent" else said_unsubscribed > 0
        return {"applied": recovered >= 1 and shown, "product": product, "unsubscribed_alives": said_unsubscribed,
                "mode": mode, "states_seen": seen, "recoveries": recovered, "recovery_failures": failures,
                "completed": completed, "lost_upstream": lost, "sampled_open_fresh": sampled}
    return inject


def uof_broker(action: str) -> Inject:
    """The broker closes every AMQP connection (``close``: ``rabbitmqctl close_all_connections``) or
    is stopped and started again on the same ports and data (``restart``): the simulator and the
    ingest both reconnect; the ingest recovers every producer (``after`` = its cursor)."""
    async def inject(ctx: Ctx) -> dict[str, Any]:
        stack = ctx.stack
        before = (await ctx.stats())["uof"]
        ctx.begin()
        if action == "close":
            out = await asyncio.to_thread(stack.rabbitmqctl, "close_all_connections", "oddsfeed fault suite")
            ctx.notes.append(f"rabbitmqctl: {' '.join(out.split())[:80]}")
        else:
            t = time.monotonic()
            await asyncio.to_thread(stack.stop_rabbit)
            await asyncio.to_thread(stack.start_rabbit)
            ctx.notes.append(f"broker down for {time.monotonic() - t:.1f} s")
        ctx.end()
        seen = await ctx.watch_states(2.0, ("uof",))
        deadline = time.monotonic() + 20
        after = before
        while time.monotonic() < deadline:
            after = (await ctx.stats())["uof"]
            rec = _diff(before, after, "recoveries_by_product")
            if after["reconnects"] > before["reconnects"] and all(rec.get(str(p), 0) for p in (1, 3)):
                break
            await asyncio.sleep(0.2)
        rec = _diff(before, after, "recoveries_by_product")
        ctx.notes.append(f"simulator reconnects {after['reconnects'] - before['reconnects']}, ingest recoveries "
                         f"{rec}; uof {' → '.join(seen['uof'])}")
        return {"applied": after["reconnects"] > before["reconnects"] and all(rec.get(str(p), 0) for p in (1, 3)),
                "action": action, "sim_reconnects": after["reconnects"] - before["reconnects"],
                "recoveries": rec, "states_seen": seen}
    return inject


def _grew(**at_least: int) -> Callable[[dict[str, Any], dict[str, Any], dict[str, int]], tuple[bool, str]]:
    """An ``expect`` for :func:`sim_switches`: each named counter of the simulator's stats grew by at
    least that much (``quarantined``: what the source rejected, all reasons); a note with the growths.
    Every bound is at least 1 (growing by at least 0 cannot fail: it would show nothing)."""
    if any(n < 1 for n in at_least.values()):
        raise ValueError(f"_grew bounds must be >= 1: {at_least}")

    def expect(before: dict[str, Any], after: dict[str, Any], rejected: dict[str, int]) -> tuple[bool, str]:
        grown = {k: sum(rejected.values()) if k == "quarantined" else _diff(before, after, k) for k in at_least}
        ok = all((sum(v.values()) if isinstance(v, dict) else v) >= at_least[k] for k, v in grown.items())
        return ok, ", ".join(f"{k} +{v}" for k, v in grown.items())
    return expect


def _webhook_refused(b: dict[str, Any], a: dict[str, Any], rejected: dict[str, int]) -> tuple[bool, str]:
    """The bad deliveries were all refused: every malformed one quarantined (answered 422 when
    rejected whole, 200 with ``rejected_parts`` when its one market was rejected alone or its type
    is unknown), bad signatures and the expired timestamp answered 401."""
    got = _diff(b, a, "fault_answers")
    by_kind: dict[str, dict[int, int]] = {}
    for k, n in got.items():
        kind, _, status = k.partition(":")
        by_kind.setdefault(kind, {})[int(status)] = n
    ok = (sum(by_kind.get("malformed", {}).values()) >= 7 and sum(rejected.values()) >= 7
          and by_kind.get("bad_signature") == {401: 2} and by_kind.get("expired") == {401: 1})
    return ok, f"answers to the bad deliveries {by_kind}"


async def storm(ctx: Ctx) -> dict[str, Any]:
    """A reconnect storm of 1,000 SSE clients resuming with a 2 s old token
    (``benchmarks/reconnect_storm.py``: ``follow_for_token`` + ``run_storm``;
    every 10th client checks its replay continues from the token's seqs)."""
    try:
        from benchmarks.reconnect_storm import follow_for_token, run_storm  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"applied": False, "not_available": f"benchmarks/reconnect_storm.py: {exc}"}
    token, seqs = await asyncio.wait_for(follow_for_token(ctx.stack.base_url), 30)
    await asyncio.sleep(2.0)
    ctx.begin()
    try:
        result = await asyncio.wait_for(run_storm(ctx.stack.base_url, token, n=1000, base_seqs=seqs), 240)
    except Exception as exc:  # noqa: BLE001 - the storm's own failure is a result
        return {"applied": False, "error": f"run_storm failed: {type(exc).__name__}: {exc}"}
    n = result.get("clients", 0)
    ctx.checks["storm: all recovered within its deadline"] = (
        (f"{result.get('within_deadline')}/{n} within {result.get('deadline_s')} s, "
         f"{result.get('not_recovered')} not recovered, {result.get('failed')} failed"),
        n == 1000 and result.get("within_deadline") == n and not result.get("failed")
        and not result.get("not_recovered"))
    ctx.checks["storm: replays gap- and duplicate-free"] = (
        f"{result.get('checked')} checked, {result.get('gaps')} gaps, {result.get('dups')} dups",
        bool(result.get("checked")) and not result.get("gaps") and not result.get("dups"))
    summary: dict[str, Any] = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    summary["resumed_ms"] = result.get("resumed_ms")
    ctx.notes.append(f"storm: {json.dumps(summary, default=str)[:400]}")
    return {"applied": n > 0, "storm": result}


async def cluster_master_kill(ctx: Ctx) -> dict[str, Any]:
    """Kill -9 the master serving partition 0's slot; its replica must take over."""
    stack = ctx.stack
    assert isinstance(stack, ClusterStack)
    victim = stack.master_of_slot_key("of:{0}:log")
    roles_before = stack.roles()
    ctx.begin()
    port = victim.port
    victim.kill()
    ctx.end()  # the fault is the kill: the failover is part of the recovery
    deadline = time.monotonic() + 20
    roles: dict[int, str] = {}
    while time.monotonic() < deadline:
        roles = stack.roles()
        masters = sum(1 for p, r in roles.items() if r == "master" and p != port)
        if masters == 3:
            break
        await asyncio.sleep(0.2)
    promoted = [p for p, r in roles.items() if r == "master" and roles_before.get(p) == "slave"]
    failover_s = (now_ms() - ctx.t_start) / 1000
    ctx.notes.append(f"killed master :{port}; promoted {promoted or 'none'} after {failover_s:.1f} s")
    return {"applied": bool(promoted), "killed_master_port": port, "promoted": promoted,
            "failover_s": failover_s, "roles_after": roles}


# -- the catalogue ------------------------------------------------------------------------------

ROWS: list[Row] = [
    Row("redis_kill", "redis-server kill -9, restarted 2 s later on the same data dir (AOF)", ALL, redis_kill),
    Row("redis_empty", "redis-server kill -9, data dir wiped, restarted empty 2 s later", ALL, redis_empty),
    Row("redis_back_older", "redis-server goes back 3 s in place (an RDB saved then, loaded by DEBUG RELOAD "
        "NOSAVE: no restart, no connection closed, same epoch)", ALL, redis_back_older),
    Row("redis_stop", "redis-server SIGSTOP for 10 s, then SIGCONT", ALL, redis_stop),
    *(Row(f"ingest_kill_{s.replace('-', '_')}", f"ingest of {s} kill -9, restarted 1 s later", (s,),
          ingest_kill(s)) for s in ALL),
    Row("serve_kill", "oddsfeed serve kill -9, restarted 1 s later (clients resume with their tokens)", ALL,
        serve_kill),
    Row("ingest_dead", "ingest of esa kill -9 and left dead (DOWN/ingest_gone expected, no OK); then restarted",
        ("esa",), ingest_dead),
    Row("ingest_clock_ahead", f"ingest of esa restarted with its clock {CLOCK_AHEAD_S} s ahead, then kill -9 "
        "(DOWN/clock_skew expected, no OK); then restarted with a true clock", ("esa",), ingest_clock_ahead,
        requires=_needs_faketime),
    Row("esa_drop", "ESA simulator drops the connection (reconnect, resume with clk)", ("esa",),
        esa_switch("drop_connections", expect_reconnects=1)),
    Row("esa_503", "ESA stream status 503 for 5 s (stay connected, DEGRADED)", ("esa",),
        esa_switch("set_degraded", wait_s=5.0, then=("set_degraded", {"on": False}), watch=True, on=True)),
    Row("esa_stall", "ESA connection silent for 8 s, no heartbeats (half-open)", ("esa",),
        esa_switch("stall", wait_s=8.0, watch=True, seconds=8.0)),
    Row("esa_malformed", "4 malformed lines on the ESA stream", ("esa",),
        esa_switch("inject_malformed", n=4)),
    Row("esa_segment_cut", "ESA resubscribe image cut before SEG_END, connection closed", ("esa",),
        esa_switch("drop_mid_segment", then=("drop_connections", {}), expect_reconnects=2, n=1)),
    Row("esa_poison_ts", f"4 ESA changes stamped pt = {POISON} (their prices are real)", ("esa",),
        esa_switch("poison_timestamps", values=POISON)),
    Row("http_429", "Pinnacle + Odds API: next 4 requests of each 429, Retry-After 2 s", POLLERS,
        http_switch([("rate_limit", {"n": 4, "retry_after_s": 2})])),
    Row("http_5xx", "Pinnacle + Odds API: next 4 requests of each 503", POLLERS,
        http_switch([("server_error", {"n": 4, "status": 503})])),
    Row("http_timeout", "Pinnacle + Odds API: next 2 requests of each answered after 4 s (deadline 3 s)",
        POLLERS,
        http_switch([("stall", {"n": 2, "seconds": 4.0})])),
    Row("http_trickle", "Pinnacle + Odds API: next 2 bodies of each trickled over 4 s (deadline 3 s)", POLLERS,
        http_switch([("trickle", {"n": 2, "seconds": 4.0})])),
    Row("http_malformed", "Pinnacle + Odds API: a truncated, a bad-price and a wrong-type body each", POLLERS,
        http_switch([("malformed", {"n": 1, "kind": "truncated"}), ("malformed", {"n": 1, "kind": "bad_price"}),
                     ("malformed", {"n": 1, "kind": "wrong_type"})])),
    Row("http_dup_replay", "Pinnacle: 2 odds answers repeated, 2 older answers (old `last`) replayed",
        ("pinnacle",), http_switch([("duplicate", {"n": 2}), ("replay_old", {"n": 2})])),
    Row("push_drop", "push simulator closes every stream (resume with entry id)", PUSH,
        push_switch("drop_connections")),
    Row("push_stall", "push streams silent for 8 s, no pings (half-open)", PUSH, push_switch("stall", wait_s=8.0,
                                                                                          seconds=8.0)),
    Row("push_dup_reorder", "push: 3 messages sent twice, 2 pairs swapped", PUSH,
        push_switches([("duplicate", {"n": 3}), ("reorder", {"n": 2})])),
    Row("push_gap", "push: 3 messages skipped (seq gap → REST snapshot resync)", PUSH, push_switch("skip", n=3)),
    Row("push_gap_snapshot_fail", "push: 2 messages skipped while the REST snapshot answers 503 twice", PUSH,
        push_switches([("skip", {"n": 2}), ("fail_snapshots", {"n": 2})])),
    Row("push_malformed", "push: 7 malformed bodies", PUSH, push_switch("inject_malformed", n=7)),
    Row("push_poison_ts", f"push: 4 odds messages stamped {POISON} (their odds are real)", PUSH,
        push_switch("poison_timestamps", values=POISON)),
    Row("uof_producer_down", "UOF: producer 1 silent for 8 s, alives included, its changes lost (down after "
        "max_inactivity_s 5 s; recovery after its next alive)", ("uof",), uof_producer_down(1, "silent", 8.0)),
    Row("uof_unsubscribed", "UOF: producer 3's alive says subscribed=0, its messages lost until a recovery is "
        "requested", ("uof",), uof_producer_down(3, "unsubscribed")),
    Row("uof_recovery_fail", "UOF: producer 1 unsubscribed while its next 2 recovery requests answer 500", ("uof",),
        uof_producer_down(1, "unsubscribed", fail_recoveries=2)),
    Row("uof_stall", "UOF: nothing published for 8 s, alives included (both producers down), then the backlog",
        ("uof",), sim_switches("uof", [("stall", {"seconds": 8.0})], _grew(stalled_flushes=20, published=1),
                               wait_s=8.0, dead_on_down=True)),
    Row("uof_stall_short", "UOF: nothing published for 3 s, alives included (shorter than max_inactivity_s: "
        "the producers stay up), then the backlog", ("uof",),
        sim_switches("uof", [("stall", {"seconds": 3.0})], _grew(stalled_flushes=20, published=1), wait_s=3.0)),
    Row("uof_connection_close", "UOF: the broker closes every AMQP connection (rabbitmqctl close_all_connections)",
        ("uof",), uof_broker("close")),
    Row("uof_broker_restart", "UOF: the RabbitMQ node stopped and started again (same ports and data)", ("uof",),
        uof_broker("restart")),
    Row("uof_dup_reorder", "UOF: 3 messages published twice, 2 pairs swapped", ("uof",),
        sim_switches("uof", [("duplicate", {"n": 3}), ("reorder", {"n": 2})],
                     _grew(duplicates_sent=3, reordered=2))),
    Row("uof_malformed", "UOF: 5 malformed bodies (cut XML, not XML, a DOCTYPE, unknown root, bad product)",
        ("uof",), sim_switches("uof", [("inject_malformed", {"n": 5})],
                               _grew(malformed_sent=5, quarantined=5), repair=True)),
    Row("uof_poison_ts", f"UOF: 4 odds_change stamped timestamp = {POISON} (their odds are real)", ("uof",),
        sim_switches("uof", [("poison_timestamps", {"values": POISON})],
                     _grew(poisoned_sent=4, quarantined=4), repair=True)),
    Row("webhook_dup_reorder", "webhook: 3 deliveries delivered again (same key, new key), 2 held back behind "
        "the next 3", ("webhook",),
        sim_switches("webhook", [("duplicate", {"n": 3}), ("reorder", {"n": 2, "distance": 3})],
                     _grew(duplicates_sent=3, duplicate_answers=1, reordered=2))),
    Row("webhook_malformed", "webhook: 7 malformed bodies (quarantined), 2 bad signatures and 1 expired "
        "timestamp (401)",
        ("webhook",),
        sim_switches("webhook", [("inject_malformed", {"n": 7}), ("bad_signatures", {"n": 2}),
                                 ("expired", {"n": 1})], _webhook_refused)),
    Row("storm", "1,000 SSE clients reconnect at once (benchmarks/reconnect_storm.run_storm)", ALL, storm,
        kind="storm"),
    Row("cluster_master_kill", "Redis Cluster (3 masters + 3 replicas): kill -9 partition 0's master; "
        "ingest (esa) and serve ride the failover", ("esa",), cluster_master_kill, kind="cluster"),
]


# -- running a row ------------------------------------------------------------------------------


@dataclass
class Env:
    args: argparse.Namespace
    work: Path
    main: Stack | None = None
    builds: int = 0
    dirty: str | None = None  # why the main stack cannot be trusted for the next row
    t0: float = field(default_factory=time.monotonic)

    async def build(self) -> Stack:
        if self.main is not None:
            self.main.stop()
        self.builds += 1
        a = self.args
        stack = Stack(self.work / f"stack{self.builds}", rate=a.rate, events=a.events, seed=a.seed,
                      time_scale=a.time_scale, poll_interval_s=a.poll_interval)
        self.main = stack
        await stack.start(ready_timeout_s=60)
        return stack

    async def heal(self) -> tuple[Stack, list[str]]:
        """The main stack, healthy: restart what died, rebuild when that is not enough."""
        notes: list[str] = []
        if self.main is None:
            return await self.build(), notes
        if self.dirty:
            notes.append(f"fresh stack for this row (the previous one ended with {self.dirty})")
            self.dirty = None
            return await self.build(), notes
        stack = self.main
        with contextlib.suppress(Exception):
            if stack.redis.process is not None:
                os.kill(stack.redis.process.pid, signal.SIGCONT)
        if stack.redis.process is None or stack.redis.process.poll() is not None:
            stack.start_redis()
            notes.append("redis restarted before the row")
        if stack.rabbit is not None and not stack.rabbit_alive():
            await asyncio.to_thread(stack.start_rabbit)
            notes.append("rabbitmq restarted before the row")
        dead = [n for n in stack.process_names() if not stack.managed.alive(n)]
        if "simulate" in dead:  # a new upstream would not continue the truth log: start over
            notes.append("fresh stack for this row (the simulator had exited)")
            return await self.build(), notes
        for name in dead:
            stack.managed.restart(name)
        if dead:
            notes.append(f"restarted before the row: {', '.join(dead)}")
        try:
            assert stack.control is not None
            await stack.control.call("*", "freeze", on=False)
            await stack.control.call("*", "clear_faults")  # http, uof, webhook
            await stack.control.call("esa", "set_degraded", on=False)
            await stack.wait_healthy(25)
        except Exception as exc:  # noqa: BLE001 - anything: start over
            notes.append(f"stack rebuilt before the row ({str(exc)[:160]})")
            stack = await self.build()
        return stack, notes


def _allowance(args: argparse.Namespace) -> dict[str, int]:
    return {p: args.allowance_ms for p in SOURCES.values()}


async def _problems(ctx: Ctx, t_end: int) -> list[str]:
    out = []
    st = ctx.stack
    for name in st.process_names():
        if not st.managed.alive(name):
            out.append(f"{name} exited ({st.managed.current[name].returncode})")
    h = await st.health(ctx.http)
    if h["error"]:
        out.append(f"node: {h['error'][:80]}")
    elif not h["ready"]:
        out.append("node not ready")
    for s in ctx.scope:
        src = h["sources"].get(s)
        if src is None:
            if not h["error"]:
                out.append(f"{s} missing from /v1/sources")
        elif src.get("state") != "UP":
            out.append(f"{s} {src.get('state')}/{src.get('reason')}")
    for c in ctx.clients:
        if not (c.connected and c.synced.is_set()):
            out.append(f"{c.tracker.name} client not connected")
            continue
        for s in ctx.scope:
            if c.tracker.last_delta_ms.get(SOURCES[s], 0) <= t_end:
                out.append(f"{c.tracker.name}: no {s} delta since the fault")
    return out


async def _compare(ctx: Ctx, settle_s: float) -> tuple[list[str] | None, list[str]]:
    """(node vs truth differences, client books vs node differences) after the settle."""
    st = ctx.stack
    prefixes = [SOURCES[s] for s in st.sources]
    deadline = time.monotonic() + settle_s
    diffs: list[str] | None = None
    client_diffs: list[str] = []
    while True:
        st.truth.poll()
        try:
            node = await st.node_markets(ctx.http)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            diffs, node = None, {}
            client_diffs = [f"node unreadable: {type(exc).__name__}"]
        else:
            diffs = diff_markets(st.truth, node, prefixes)
            client_diffs = []
            for c in ctx.clients:
                for mid, m in node.items():
                    if not mid.startswith(tuple(prefixes)):
                        continue
                    cm = c.markets.get(mid)
                    if cm is None or cm.seq != m["seq"] or cm.status != m["status"]:
                        client_diffs.append(f"{c.tracker.name} {mid}: seq {cm.seq if cm else None} "
                                            f"(node {m['seq']})")
        if (diffs == [] and not client_diffs) or time.monotonic() > deadline:
            return diffs, client_diffs
        await asyncio.sleep(0.5)


@dataclass
class Result:
    row: Row
    verdict: str = "not run"
    recovered: bool | None = None
    ttr_s: float | None = None
    lost: int | None = None
    dup: int | None = None
    gaps: dict[str, tuple[int, int]] = field(default_factory=dict)
    differ: int | None = None
    wrong_fresh: int | None = None
    notes: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    measured: str = ""
    ran_without: dict[str, str] = field(default_factory=dict)  # sources of the row's scope left out here: why

    def as_json(self) -> dict[str, Any]:
        return {"row": self.row.name, "fault": self.row.what, "scope": list(self.row.scope),
                "ran_without": self.ran_without, "verdict": self.verdict, "recovered": self.recovered,
                "time_to_recover_s": self.ttr_s,
                "lost": self.lost, "duplicated": self.dup,
                "gaps": {k: {"flagged": f, "unflagged": u} for k, (f, u) in self.gaps.items()},
                "markets_differing": self.differ, "wrong_fresh": self.wrong_fresh, "notes": self.notes,
                "elapsed_s": round(self.elapsed_s, 1), "detail": self.detail}


def verdict_of(invalid: bool, met: bool, ran_without: dict[str, str]) -> str:
    """A run row's verdict: ``INVALID`` (the measurement saw nothing), ``MISSED``, ``PARTIAL`` (every
    target met over what ran, but a source of its scope could not run here: not a pass) or ``met``."""
    if invalid:
        return "INVALID"
    if not met:
        return "MISSED"
    return "PARTIAL" if ran_without else "met"


async def run_row(env: Env, row: Row) -> Result:
    args = env.args
    res = Result(row)
    t_row = time.monotonic()
    cluster: ClusterStack | None = None
    clients: list[TrackedClient] = []
    prober: Prober | None = None
    ctx: Ctx | None = None
    why, without = row.unavailable()
    if why is not None:
        res.verdict = "n/a"
        res.notes.append(f"not run: {why}")
        return res
    scope = tuple(s for s in row.scope if s not in without)
    res.ran_without = without
    if without:
        res.notes.append(f"ran WITHOUT {', '.join(without)} ({'; '.join(without.values())}): PARTIAL at best")
    async with httpx.AsyncClient() as http:
        try:
            main, heal_notes = await env.heal()
            res.notes += heal_notes
            assert main.control is not None
            stack: Stack = main
            if row.kind == "cluster":
                cluster = ClusterStack(env.work / f"cluster-{row.name}", sim_ports={"esa": main.ports["esa"]},
                                       truth=main.truth)
                cluster.control = main.control
                await cluster.start(ready_timeout_s=60)
                stack = cluster
            ctx = Ctx(stack=stack, control=main.control, http=http, clients=clients, scope=scope,
                      recover_timeout_s=args.recover_timeout)
            for transport in ("sse", "ws"):
                clients.append(TrackedClient(stack.base_url, transport=transport, name=transport.upper()))
            for c in clients:
                await c.start()
            for c in clients:
                await c.wait_synced(15)
            prober = Prober(stack.base_url, [SOURCES[s] for s in scope], interval_s=args.probe_interval,
                            seed=args.seed)
            prober.start()
            stack.truth.poll()
            truth0 = stack.truth.records
            await asyncio.sleep(args.baseline)
            base_deltas = {c.tracker.name: c.tracker.deltas for c in clients}
            base_oks = sum(1 for p in prober.probes if p.reason == "OK")
            t_fault = now_ms()
            invalid = []
            if not all(base_deltas.values()):
                invalid.append(f"no deltas in the baseline ({base_deltas})")
            if not base_oks:
                invalid.append(f"no OK price check in the baseline ({dict(prober.errors)}, "
                               f"{[p.reason for p in prober.probes][-5:]})")
            # -- the fault --
            evidence = await row.inject(ctx)
            if not ctx.t_start:
                ctx.t_start = t_fault
            ctx.end()
            assert ctx.recovery is not None
            res.detail["evidence"] = evidence
            if evidence.get("not_available"):
                ctx.recovery.cancel()
                res.verdict = "n/a"
                res.notes.append(f"not available: {evidence['not_available']}")
                return res
            if not evidence.get("applied"):
                invalid.append(f"the fault had no visible effect: {json.dumps(evidence, default=str)[:200]}")
            # -- recovery (watched since the fault ended) --
            ttr, problems = await ctx.recovery
            await asyncio.sleep(args.post)
            # -- end state vs truth --
            await main.control.call("*", "freeze", on=True)
            try:
                await asyncio.sleep(0.3)
                diffs, client_diffs = await _compare(ctx, args.settle)
            finally:
                await main.control.call("*", "freeze", on=False)
            await prober.stop()
            stack.truth.poll()
            if stack.truth.records == truth0:
                invalid.append("the truth log did not move during the row")
            judged = judge_probes(prober.probes, stack.truth, _allowance(args), ctx.dead)
            base_wrong = judge_probes([p for p in prober.probes if p.checked_at < t_fault], stack.truth,
                                      _allowance(args))["wrong_fresh"]
            # -- figures --
            res.ttr_s = ctx.ttr_override if ctx.ttr_override is not None else ttr
            res.lost = sum(c.tracker.lost for c in clients)
            res.dup = sum(c.tracker.dups for c in clients)
            res.gaps = {c.tracker.name: (c.tracker.gaps_flagged, c.tracker.gaps_unflagged) for c in clients}
            res.differ = len(diffs) if diffs is not None else None
            res.wrong_fresh = judged["wrong_fresh"]
            if judged["ok_dead"] or ctx.dead:
                ctx.checks[ctx.dead_label] = (judged["ok_dead"], judged["ok_dead"] == 0)
            recovered = ttr is not None and res.differ == 0 and not client_diffs
            if row.name in ("ingest_dead", "ingest_clock_ahead"):
                recovered = all(ok for _, ok in ctx.checks.values()) and recovered
            res.recovered = recovered
            if ttr is None:
                res.notes.append(f"not recovered after {args.recover_timeout:g} s: {'; '.join(problems[:4])}")
            if diffs:
                res.notes.append(f"{len(diffs)} markets differ, e.g. {diffs[0]}")
            if client_diffs:
                res.notes.append(f"client books ≠ node: {len(client_diffs)}, e.g. {client_diffs[0]}")
            for c in clients:
                t = c.tracker
                if t.examples and (t.gaps_unflagged or t.dups):
                    res.notes.append(f"{t.name}: {t.examples[0]}")
            if judged["examples"]:
                worst = f"{judged['worst_ms']} ms" if judged["worst_ms"] is not None else "?"
                res.notes.append(f"wrong-fresh: worst {worst} after the upstream moved on; "
                                 f"e.g. {judged['examples'][0]}")
            if base_wrong:
                res.notes.append(f"{base_wrong} wrong-fresh already in the baseline (before the fault)")
            for name, (value, ok) in ctx.checks.items():
                res.notes.append(f"{name}: {value} [{'met' if ok else 'MISSED'}]")
            compared = sum(1 for mid, m in stack.truth.markets.items()
                           if mid.startswith(tuple(SOURCES[s] for s in stack.sources))
                           and m["status"] not in ("REMOVED", None))
            measured = {"deltas": {c.tracker.name: c.tracker.deltas for c in clients},
                        "price_checks": judged["probes"], "ok": judged["reasons"].get("OK", 0),
                        "truth_changes": stack.truth.records - truth0, "markets_compared": compared}
            res.measured = (f"Δ SSE/WS {'/'.join(str(v) for v in measured['deltas'].values())}, "
                            f"{measured['price_checks']} checks ({measured['ok']} OK), "
                            f"{measured['truth_changes']} truth changes, {compared} markets compared")
            res.notes = ctx.notes + res.notes
            res.detail.update({
                "measured": measured,
                "clients": {c.tracker.name: {**c.tracker.summary(), "reconnects": c.stats.reconnects,
                                             "disconnect_reasons": c.stats.disconnect_reasons[:5]} for c in clients},
                "price_checks": {**judged, "errors": dict(prober.errors), "baseline_wrong_fresh": base_wrong},
                "differing": (diffs or [])[:20], "client_vs_node": client_diffs[:20],
                "problems_at_timeout": problems if ttr is None else [],
                "checks": {k: {"value": v, "met": ok} for k, (v, ok) in ctx.checks.items()},
                "fault_window_ms": [ctx.t_start, ctx.t_end], "load_avg": os.getloadavg(),
                "processes_started": dict(stack.managed.starts),
            })
            if row.kind != "cluster" and (res.differ != 0 or ttr is None):
                env.dirty = (f"{res.differ} markets differing from the truth" if res.differ
                             else "an unrecovered stack")
            met = (recovered and res.lost == 0 and res.dup == 0 and res.wrong_fresh == 0
                   and all(u == 0 for _, u in res.gaps.values()) and all(ok for _, ok in ctx.checks.values()))
            res.verdict = verdict_of(bool(invalid), met, without)
            if invalid:
                res.notes = [f"INVALID: {'; '.join(invalid)}"] + res.notes
        except Exception as exc:  # noqa: BLE001 - a harness/stack failure is reported, not raised
            env.dirty = "a harness error"
            res.verdict = "ERROR"
            res.notes.append(f"harness: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            if ctx is not None and ctx.recovery is not None and not ctx.recovery.done():
                ctx.recovery.cancel()
            if prober is not None:
                await prober.stop()
            for c in clients:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.close(), 5)
            if cluster is not None:
                cluster.stop()
            res.elapsed_s = time.monotonic() - t_row
    return res


# -- output ---------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("oddsfeed", "uvicorn", "starlette", "websockets", "httpx", "redis", "msgspec", "orjson"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    with contextlib.suppress(Exception):
        v = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True, timeout=5,
                           check=False).stdout
        out["redis-server"] = v.split("v=")[1].split()[0] if "v=" in v else v.strip()[:40]
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5, check=False).stdout.splitlines()
        out["git"] = head + (f" + uncommitted changes in {len(dirty)} files" if dirty else "")
    return out


def _fmt_row(r: Result) -> str:
    def n(v: Any) -> str:
        return "-" if v is None else str(v)
    rec = "-" if r.recovered is None else "yes" if r.recovered else "NO"
    ttr = "-" if r.ttr_s is None else f"{r.ttr_s:.1f}"
    gaps = {k: f"{f}/{u}" for k, (f, u) in r.gaps.items()}
    return (f"{r.row.name:<24} {rec:>9} {ttr:>6} {n(r.lost):>5} {n(r.dup):>4} {gaps.get('SSE', '-'):>9} "
            f"{gaps.get('WS', '-'):>9} {n(r.differ):>6} {n(r.wrong_fresh):>11}  {r.verdict}")


HEADER = (f"{'row':<24} {'recovered':>9} {'ttr s':>6} {'lost':>5} {'dup':>4} {'SSE gaps':>9} {'WS gaps':>9} "
          f"{'differ':>6} {'wrong-fresh':>11}  result")


def print_table(results: list[Result]) -> None:
    print(HEADER)
    print("-" * len(HEADER))
    for r in results:
        print(_fmt_row(r))
    print("(gaps: flagged/unflagged; differ: markets ≠ upstream truth at the end; wrong-fresh: OK on a price "
          "the upstream had changed > allowance before the time the answer claims it was confirmed)")


def print_notes(results: list[Result]) -> None:
    for r in results:
        parts = ([f"measured {r.measured}"] if r.measured else []) + r.notes
        if parts:
            print(f"  {r.row.name}: " + " | ".join(parts))


# -- self-check ---------------------------------------------------------------------------------


def _check(name: str, got: Any, want: Any) -> tuple[str, bool, str]:
    return name, got == want, f"got {got}, expected {want}"


def self_check_tracker() -> list[tuple[str, bool, str]]:
    """SeqTracker on a scripted stream with known gaps, duplicates, resumes and resyncs."""
    t = SeqTracker(name="unit")
    t.on_snapshot([("bf:1", 1), ("bf:2", 5)], None)       # initial: no resync
    t.on_delta("bf:1", 2, "delta", False)                 # fine
    t.on_delta("bf:1", 2, "delta", False)                 # dup
    t.on_delta("bf:1", 5, "delta", False)                 # unflagged gap: 3, 4 pending
    t.on_delta("bf:2", 8, "image", False)                 # flagged (image)
    t.on_delta("bf:2", 10, "delta", True)                 # flagged (conflated)
    t.on_delta("bf:3", 4, "delta", False)                 # orphan: unflagged, its image pending
    t.on_resumed(True)
    t.on_delta("bf:1", 5, "delta", False)                 # replayed entry: not a dup
    t.on_delta("bf:1", 3, "delta", False)                 # a skipped seq after all: repaired
    t.on_delta("bf:1", 6, "delta", False)                 # new: the replay is over
    t.on_delta("bf:1", 6, "delta", False)                 # dup
    t.on_resumed(False)
    t.on_snapshot([("bf:1", 9), ("bf:2", 3)], False)      # resync: covers 4 (repaired), bf:1 jump flagged, bf:2 reset
    t.on_delta("bf:1", 10, "delta", False)
    return [_check("tracker unflagged gaps", t.gaps_unflagged, 2), _check("tracker flagged gaps", t.gaps_flagged, 3),
            _check("tracker dups / replayed", (t.dups, t.replayed), (2, 1)),
            _check("tracker repaired / lost (bf:3 never imaged)", (t.repaired, t.lost), (2, 1)),
            _check("tracker resets / resyncs / orphans", (t.resets, t.resyncs, t.orphans), (1, 1, 1))]


def self_check_truth(tmp: Path) -> list[tuple[str, bool, str]]:
    """Truth timelines, wrong-fresh judging and the end-state diff on a hand-written log."""
    from benchmarks.fault_harness import Probe

    path = tmp / "truth.jsonl"
    recs = [
        {"t_ms": 1000, "source": "esa", "market_id": "bf:1", "selection_id": "7", "back": 2.0, "lay": 2.02,
         "price": 2.0, "status": "OPEN", "sel_status": "ACTIVE"},
        {"t_ms": 5000, "source": "esa", "market_id": "bf:1", "selection_id": "7", "back": 2.1, "lay": 2.12,
         "price": 2.1, "status": "OPEN", "sel_status": "ACTIVE"},
        {"t_ms": 1000, "source": "push", "market_id": "px:9:match_odds", "selection_id": "3", "back": None,
         "lay": None, "price": 3.5, "status": "OPEN", "sel_status": "ACTIVE"},
        {"t_ms": 6000, "source": "push", "market_id": "px:9:match_odds", "selection_id": None, "back": None,
         "lay": None, "price": None, "status": "SUSPENDED", "sel_status": None},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:3]) + json.dumps(recs[3])[:20])  # a torn last line
    truth = Truth(path)
    n1 = truth.poll()
    with open(path, "a") as f:
        f.write(json.dumps(recs[3])[20:] + "\n")
    n2 = truth.poll()
    allow = {"bf:": 1000, "pxw:": 1000, "pxs:": 1000}

    def probe(t: int, mid: str, sid: str, price: float, reason: str = "OK", age_ms: int = 0) -> Probe:
        return Probe(checked_at=t, market_id=mid, selection_id=sid, price_h=round(price * 100), reason=reason,
                     age_ms=age_ms, source_state="UP", in_play=True)
    probes = [probe(5500, "bf:1", "7", 2.0),             # changed 500 ms before: within the allowance
              probe(7000, "bf:1", "7", 2.0),             # changed 2 s before: wrong-fresh
              probe(7000, "bf:1", "7", 2.1),             # current: fine
              probe(7000, "bf:1", "7", 2.0, age_ms=1500),  # claims confirmation at 5500: honest, fine
              probe(7000, "bf:1", "7", 2.0, "STALE"),    # not OK: fine
              probe(9000, "pxw:9:match_odds", "3", 3.5),  # suspended 3 s before: wrong-fresh
              probe(500, "bf:1", "7", 2.0),              # before the truth starts: unjudged
              probe(9000, "bf:1", "7", 2.1)]             # esa dead since 8000: ok_dead
    j = judge_probes(probes, truth, allow, {"esa": (8000, 10_000)})
    node: dict[str, dict[str, Any]] = {"bf:1": {"market_id": "bf:1", "status": "OPEN", "selections": [
                {"selection_id": "7", "back": [[2.1, 5]], "lay": [[2.14, 5]], "price": 2.1}]},
            "pxw:9:match_odds": {"market_id": "pxw:9:match_odds", "status": "SUSPENDED", "selections": []}}
    diffs = diff_markets(truth, node, ["bf:", "pxw:", "pxs:"])
    return [_check("truth: torn line read once whole", (n1, n2), (3, 1)),
            _check("truth: push aliased to both prefixes", sorted(m for m in truth.markets if m.startswith("px")),
                   ["pxs:9:match_odds", "pxw:9:match_odds"]),
            _check("wrong-fresh count", j["wrong_fresh"], 2), _check("unjudged count", j["unjudged"], 1),
            _check("ok after death", j["ok_dead"], 1),
            _check("diff: lay differs + pxs missing", [d.split(":")[0] + ":" + d.split(":")[1] for d in diffs],
                   ["bf:1/7", "pxs:9"])]


def self_check_uof_webhook(tmp: Path) -> list[tuple[str, bool, str]]:
    """The judges on UOF (``uof:`` ids, SETTLED / INACTIVE / SUSPENDED outcomes) and webhook (``wh:``)
    truth lines: a producer_down suspension or a lagging price differs, a settled market the node
    still lists does not, an OK inside a producer's dead window (a market id prefix) is counted."""
    from benchmarks.fault_harness import Probe, source_of

    path = tmp / "truth-uof.jsonl"

    def rec(t: int, mid: str, sid: str, price: float, status: str = "OPEN", sel: str = "ACTIVE",
            source: str = "uof") -> dict[str, Any]:
        return {"t_ms": t, "source": source, "market_id": mid, "selection_id": sid, "back": None, "lay": None,
                "price": price, "status": status, "sel_status": sel}
    a, b, c = "uof:sr:match:1001:1", "uof:sr:match:1001:18:total=2.5", "uof:sr:match:1002:1"
    recs = [rec(1000, a, "1", 2.0), rec(1000, a, "2", 3.4), rec(1000, a, "3", 4.1, sel="SUSPENDED"),
            rec(1000, b, "12", 1.9), rec(1000, b, "13", 1.95),
            rec(1000, c, "1", 1.5), rec(3000, c, "1", 1.5, "SETTLED", "WINNER"),
            rec(1000, "wh:f1:win", "7", 2.5, source="webhook"), rec(4000, "wh:f1:win", "7", 2.6, source="webhook")]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    truth = Truth(path)
    truth.poll()

    def sel(sid: str, price: float, status: str = "ACTIVE") -> dict[str, Any]:
        return {"selection_id": sid, "price": price, "status": status, "back": [], "lay": []}
    node: dict[str, dict[str, Any]] = {
        a: {"market_id": a, "status": "OPEN", "selections": [sel("1", 2.0), sel("2", 3.4), sel("3", 9.9, "SUSPENDED")]},
        b: {"market_id": b, "status": "SUSPENDED", "suspend_reason": "producer_down",
            "selections": [sel("12", 1.9), sel("13", 1.95)]},
        c: {"market_id": c, "status": "SETTLED", "selections": [sel("1", 1.5, "WINNER")]},
        "wh:f1:win": {"market_id": "wh:f1:win", "status": "OPEN", "selections": [sel("7", 2.5)]}}
    diffs = diff_markets(truth, node, ["uof:", "wh:"])

    def probe(t: int, mid: str, sid: str, price: float) -> Probe:
        return Probe(checked_at=t, market_id=mid, selection_id=sid, price_h=round(price * 100), reason="OK",
                     age_ms=0, source_state="DEGRADED", in_play=False)
    j = judge_probes([probe(5000, a, "1", 2.0), probe(5000, c, "1", 1.5), probe(5000, "wh:f1:win", "7", 2.5)],
                     truth, {"uof:": 500, "wh:": 500}, {"uof:sr:match:1001:": (4000, 6000)})
    return [_check("uof/wh: producer_down suspension and a lagging webhook price differ, the rest not",
                   sorted(d.split(": ")[0].split("/")[0] for d in diffs), [b, "wh:f1:win"]),
            _check("uof/wh: sources of the ids", (source_of(a), source_of("wh:f1:win")), ("uof", "webhook")),
            _check("uof/wh: OK in a producer's dead window / on a settled market / an old webhook price",
                   (j["ok_dead"], j["wrong_fresh"]), (1, 2))]


def _fake_messages() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The scripted stream: a snapshot, then a duplicate, an image jump, a
    conflated jump, a delta for a market never imaged and, last, an
    unflagged gap; and the final snapshot every later connection gets."""
    def market(mid: str, seq: int) -> dict[str, Any]:
        return {"market_id": mid, "source": "esa", "seq": seq, "status": "OPEN", "selections": []}

    def delta(mid: str, seq: int, kind: str = "delta", **extra: Any) -> dict[str, Any]:
        d = {"type": "delta", "market_id": mid, "seq": seq, "kind": kind, "source": "esa", "source_ts": 1,
             "received_at": 1, "stored_at": 1, "age_ms": 0, "stale": False, "selections": [], **extra}
        if kind == "image":
            d["market"] = market(mid, seq)
        return d
    first = [{"type": "snapshot", "markets": [market("bf:1", 1), market("bf:2", 5)], "as_of": 1},
             delta("bf:1", 2), delta("bf:1", 2), delta("bf:2", 8, "image"), delta("bf:2", 10, conflated=True),
             delta("bf:3", 4), delta("bf:1", 5)]
    final = {"type": "snapshot", "markets": [market("bf:1", 5), market("bf:2", 10), market("bf:3", 4)], "as_of": 2}
    return first, final


async def _fake_stream_server(transport: str, on_reconnect: Callable[[], None]) -> tuple[Any, int, list[str | None]]:
    """A scripted /v1/stream (SSE) or /v1/ws (WebSocket): the first connection
    gets :func:`_fake_messages`; every later one ``resumed {recovered: false}``
    (if it brought a token) and the final snapshot. Returns (server, port,
    the tokens each connection brought); ``on_reconnect()`` runs when the
    second connection arrives."""
    first, final = _fake_messages()
    tokens: list[str | None] = []

    def script(tok: str | None) -> list[dict[str, Any]]:
        tokens.append(tok)
        if len(tokens) == 1:
            return first
        if len(tokens) == 2:
            on_reconnect()
        return ([{"type": "resumed", "recovered": False}] if tok else []) + [{**final, "recovered": False}]

    if transport == "sse":
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                if " /v1/stream" not in head.split("\r\n", 1)[0]:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    return
                tok = next((h.split(":", 1)[1].strip() for h in head.split("\r\n")
                            if h.lower().startswith("last-event-id:")), None)
                msgs = script(tok)
                n = len(tokens)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
                for i, msg in enumerate(msgs):
                    writer.write(f"event: {msg['type']}\nid: tok{n}-{i}\ndata: {json.dumps(msg)}\n\n".encode())
                await writer.drain()
                await asyncio.sleep(0.3 if n == 1 else 10)
            with contextlib.suppress(asyncio.CancelledError):
                writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1], tokens
    from websockets.asyncio.server import serve

    async def ws_handler(ws: Any) -> None:
        with contextlib.suppress(Exception):
            sub = json.loads(await ws.recv())
            msgs = script(sub.get("resume"))
            n = len(tokens)
            await ws.send(json.dumps({"type": "ack", "id": 1, "sub": 1}))
            for i, msg in enumerate(msgs):
                await ws.send(json.dumps({**msg, "sub": 1, "token": f"tok{n}-{i}"}))
            await asyncio.sleep(0.3 if n == 1 else 10)
    ws_server = await serve(ws_handler, "127.0.0.1", 0)
    return ws_server, next(iter(ws_server.sockets)).getsockname()[1], tokens


def _note_lost(into: dict[str, Any], holder: list[TrackedClient]) -> None:
    into["lost"] = holder[0].tracker.lost


async def self_check_live() -> list[tuple[str, bool, str]]:
    """The real consumer (TrackedClient = OddsClient + SeqTracker) against a
    scripted SSE and WebSocket server: the injected gap, duplicate, image and
    conflated jumps and orphan are counted; the gap's missing seqs count as
    lost until the resync snapshot covers them."""
    out = []
    for transport in ("sse", "ws"):
        at_reconnect: dict[str, Any] = {}
        holder: list[TrackedClient] = []
        server, port, tokens = await _fake_stream_server(
            transport, functools.partial(_note_lost, at_reconnect, holder))
        client = TrackedClient(f"http://127.0.0.1:{port}", transport=transport, name=transport,
                               reconnect_initial_s=0.01, reconnect_max_s=0.05)
        holder.append(client)
        try:
            await client.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and client.tracker.snapshots < 2:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
        finally:
            await client.close()
            server.close()
        t = client.tracker
        out += [_check(f"{transport}: unflagged gaps (gap + orphan), flagged (image, conflated)",
                       (t.gaps_unflagged, t.gaps_flagged), (2, 2)),
                _check(f"{transport}: dups, orphans", (t.dups, t.orphans), (1, 1)),
                _check(f"{transport}: lost before the resync (2 seqs + 1 image)", at_reconnect.get("lost"), 3),
                _check(f"{transport}: after the resync snapshot: lost, repaired, resyncs",
                       (t.lost, t.repaired, t.resyncs), (0, 3, 1)),
                _check(f"{transport}: came back with a resume token", bool(tokens[1:2] and tokens[1]), True)]
    return out


async def self_check_simulators(tmp: Path) -> list[tuple[str, bool, str]]:
    """The simulators' truth log against their own state: ESA books, push projection, Pinnacle answers,
    the UOF model (stepped without a broker: the truth log is written as the model changes) and the
    webhook pusher's projection (live mode on the ESA model, ``wh:`` ids); and every switch the
    control port lists is a method of its simulator."""
    from feed.simulator.control import SWITCHES
    from feed.simulator.esa_server import Simulator, SimulatorConfig
    from feed.simulator.http_providers import HttpProviders, ProvidersConfig
    from feed.simulator.push_providers import PushSimConfig, PushSimulator
    from feed.simulator.truth import open_truth_log
    from feed.simulator.uof import UofSimConfig, UofSimulator
    from feed.simulator.webhook_pusher import PusherConfig, WebhookPusher

    path = tmp / "sim-truth.jsonl"
    esa = Simulator(SimulatorConfig(events=6, rate_per_s=200, seed=3, time_scale=60, truth_log=str(path)))
    http = HttpProviders(ProvidersConfig(seed=3, truth_log=str(path)), model=esa.model)
    push = PushSimulator(PushSimConfig(events=6, rate_per_s=200, seed=3, time_scale=60, truth_log=str(path)))
    uof = UofSimulator(UofSimConfig(amqp_url="amqp://127.0.0.1:9/", events=6, rate_per_s=200, seed=3,
                                    live_after_s=0.05, truth_log=str(path)))
    with socket.socket() as closed:  # a port nobody listens on: every delivery fails at once (not measured here)
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/ingest/webhook/webhook"
    hook = WebhookPusher(PusherConfig(url=dead_url, secret="s", max_attempts=1, odds_per_message=3, history=10_000,
                                      truth_log=str(path), prefix="wh", tick_ms=20), model=esa.model)
    await esa.start()
    await http.start()
    await push.start()
    await hook.start()
    try:
        for _ in range(15):  # the UOF model: events in play, bet stops, cancellations, settlements
            uof.advance(20)
            await asyncio.sleep(0.1)
        esa.freeze(True)
        http.freeze(True)
        push.freeze(True)
        await asyncio.sleep(0.2)
        hook.freeze(True)
        await asyncio.sleep(0.1)
    finally:
        await hook.stop()
        await push.stop()
        await http.stop()
        await esa.stop()
    open_truth_log(path).flush()
    truth = Truth(path, aliases={})
    truth.poll()
    bad = []
    for mid, m in esa.truth().items():
        for sid, r in m["runners"].items():
            rec = truth.markets.get(f"bf:{mid}", {}).get("sels", {}).get(sid)
            want = r["back"][0][0] if r["back"] else None
            if rec is None or rec["back"] != want or rec["status"] != m["status"]:
                bad.append(f"bf:{mid}/{sid}")
    for mid, m in push.truth().items():
        for sid, s in m["selections"].items():
            rec = truth.markets.get(mid, {}).get("sels", {}).get(sid)
            if rec is None or rec["price"] != s["price"]:
                bad.append(f"{mid}/{sid}")
    pn_now = {}
    for ev in http.pn_events.values():  # what a fresh full Pinnacle answer would say
        if ev.live_status == 1 or (ev.id + 500_000_000) not in http.pn_events:
            base = ev.parent or ev.id
            if ev.period.ml:
                pn_now[f"pn:{base}:0:moneyline"] = ev.period.ml
    for mid, ml in pn_now.items():
        got = {sid: r["price"] for sid, r in truth.markets.get(mid, {}).get("sels", {}).items()}
        if got != ml:
            bad.append(f"{mid}: {got} vs {ml}")
    uof_truth = uof.truth()
    uof_bad = []
    for mid, m in uof_truth.items():
        tm = truth.markets.get(mid)
        for sid, sel in m["selections"].items():
            rec = (tm or {}).get("sels", {}).get(sid)
            if (rec is None or tm is None or tm["status"] != m["status"] or rec["sel_status"] != sel["status"]
                    or (sel["price"] is not None and rec["price"] != sel["price"])):
                uof_bad.append(f"{mid}/{sid}: {rec} vs {m['status']} {sel}")
    uof_statuses = {r["status"] for r in map(json.loads, path.read_text().splitlines())
                    if r["market_id"].startswith("uof:")}  # every status the log went through
    hook_bad = []
    hook_truth = hook.truth()
    for mid, m in hook_truth.items():
        for sid, sel in m["selections"].items():
            rec = truth.markets.get("wh:" + mid.removeprefix("px:"), {}).get("sels", {}).get(sid)
            if rec is None or rec["price"] != sel["price"] or rec["sel_status"] != sel["status"]:
                hook_bad.append(f"{mid}/{sid}")
    classes = {"esa": Simulator, "http": HttpProviders, "push": PushSimulator, "uof": UofSimulator,
               "webhook": WebhookPusher}
    missing = [f"{t}.{op}" for t, ops in SWITCHES.items() for op in ops if not callable(getattr(classes[t], op, None))]
    kinds = {r.split(":")[0] for r in truth.markets}
    return [_check("truth log covers every simulator", sorted(kinds), ["bf", "pn", "px", "toa", "uof", "wh"]),
            ("truth log = simulators' own state (ESA books, push projection, Pinnacle lines)", not bad,
             f"{len(bad)} differ, e.g. {bad[:3]}"),
            ("UOF truth log = the UOF model (status, outcome status, odds of every market ever offered)",
             not uof_bad and len(uof_truth) > 18, f"{len(uof_bad)} of {len(uof_truth)} differ, e.g. {uof_bad[:2]}"),
            ("UOF truth log went through open, suspended, settled and cancelled markets",
             {"OPEN", "SUSPENDED", "SETTLED", "CANCELLED"} <= uof_statuses, f"only {sorted(uof_statuses)}"),
            ("webhook truth log (wh: ids) = the pusher's projection (live mode on the ESA model)",
             not hook_bad and bool(hook_truth), f"{len(hook_bad)} of {len(hook_truth)} differ, e.g. {hook_bad[:3]}"),
            ("every control-port switch is a method of its simulator", not missing, f"missing {missing}")]


def run_self_check() -> int:
    logging.basicConfig(level=logging.ERROR)  # the client's "resyncing" warnings are the point here
    tmp = Path(tempfile.mkdtemp(prefix="oddsfeed-faults-selfcheck-"))
    checks = self_check_tracker() + self_check_truth(tmp) + self_check_uof_webhook(tmp)
    checks += asyncio.run(self_check_live())
    checks += asyncio.run(self_check_simulators(tmp))
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + ("" if ok else f": {detail}"))
    failed = sum(not ok for _, ok, _ in checks)
    print(f"self-check: {len(checks) - failed}/{len(checks)} passed")
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


# -- main ---------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, rows: list[Row]) -> int:
    work = Path(tempfile.mkdtemp(prefix="oddsfeed-faults-"))
    logging.basicConfig(level=logging.INFO, filename=work / "harness.log",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = Env(args, work)
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: every process we started is stopped
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results: list[Result] = []
    load0 = os.getloadavg()
    print(f"work directory (process logs, truth logs): {work}", flush=True)
    for line in _unavailable_lines():
        print(line, flush=True)
    try:
        for row in rows:
            if time.monotonic() - env.t0 > args.budget:
                r = Result(row, verdict="not run", notes=[f"time budget of {args.budget:g} s used up"])
            else:
                print(f"… {row.name}: {row.what}", flush=True)
                r = await run_row(env, row)
            results.append(r)
            print(_fmt_row(r) + f"   ({r.elapsed_s:.0f} s)", flush=True)
    finally:
        if env.main is not None:
            env.main.stop()
    elapsed = time.monotonic() - env.t0
    failed = [r for r in results if r.verdict != "met"]
    print()
    print("=== fault suite ===")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    v = _versions()
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    load1 = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}; load average before "
          f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, after {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; "
          f"elapsed {elapsed:.0f} s")
    print(f"settings: simulator {args.rate:g} updates/s, {args.events} events, time scale {args.time_scale:g}, "
          f"seed {args.seed}; pollers every {args.poll_interval:g} s; price check every "
          f"{args.probe_interval * 1000:.0f} ms; feed-lag allowance {args.allowance_ms} ms; recovery timeout {args.recover_timeout:g} s")
    print()
    print_table(results)
    print()
    print("notes:")
    print_notes(results)
    print()
    for line in _unavailable_lines():
        print(line)
    print(f"{len(results) - len(failed)}/{len(results)} rows met their targets"
          + (f"; missed: {', '.join(r.row.name + '(' + r.verdict + ')' for r in failed)}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": [sys.executable, *sys.argv], "versions": v,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load0,
                        "load_after": load1},
            "settings": {k: val for k, val in vars(args).items() if k not in ("json",)},
            "elapsed_s": round(elapsed, 1), "work_dir": str(work), "unavailable": UNAVAILABLE,
            "rows": [r.as_json() for r in results], "met": len(results) - len(failed), "failed": len(failed),
        }, indent=1, default=str))
        print(f"JSON summary: {args.json}")
    if not args.no_png and results:
        path = write_png(results, args, v.get("git", "?"), load0, load1)
        print(f"wrote {path}")
    if failed or args.keep:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def write_png(results: list[Result], args: argparse.Namespace, git: str, load0: tuple[float, float, float],
              load1: tuple[float, float, float]) -> Path:
    """Horizontal bars, one per row in run order: time to recover (s) against the
    ``--recover-timeout`` target; a row that missed (or was not run, invalid, an
    error) is red and says its verdict; a row with no time to recover gets an
    empty bar and says why. A partial run names its rows in the title."""
    plt = plots.pyplot()
    target = args.recover_timeout
    n = len(results)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * n))
    ys = list(range(n))[::-1]  # first row at the top
    values = [r.ttr_s if r.ttr_s is not None else 0.0 for r in results]
    colors = ["C2" if r.verdict == "met" else "C3" for r in results]
    ax.barh(ys, values, color=colors, height=0.7)
    ax.set_yticks(ys, [r.row.name for r in results], fontsize=8)
    for y, r, v in zip(ys, results, values):
        ttr = "no recovery" if r.ttr_s is None and r.recovered is False else "-" if r.ttr_s is None \
            else f"{r.ttr_s:.1f} s"
        text = ttr if r.verdict == "met" else f"{ttr}  {r.verdict}"
        ax.annotate(text, (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                    color="k" if r.verdict == "met" else "C3", fontweight="normal" if r.verdict == "met" else "bold")
    ax.axvline(target, color="k", linestyle="--", linewidth=1, label=f"target: recovered within {target:g} s")
    ax.set_xlim(0, target * 1.3)
    ax.set_xlabel("time to recover after the fault ended, s (ingest_dead: until its source read DOWN)")
    ax.legend(fontsize=8, loc="lower right")
    met = sum(1 for r in results if r.verdict == "met")
    names = [r.row.name for r in results]
    partial = set(names) != {r.name for r in ROWS}
    title = f"fault suite: {met}/{n} rows met every target (red: missed)"
    if partial:
        title += f"\nPARTIAL RUN: {n} of {len(ROWS)} rows: " + ", ".join(names[:8]) + (" …" if n > 8 else "")
    ax.set_title(title, fontsize=9)
    fig.suptitle(f"{os.cpu_count()} CPUs, load avg {load0[0]:.2f} → {load1[0]:.2f}; git {git}", fontsize=8)
    return plots.save(fig, "faults-recovery", args.png_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--only", help="comma-separated rows to run (see --list)")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--self-check", action="store_true", help="check the measurements themselves and exit")
    p.add_argument("--json", metavar="PATH", help="write a JSON summary here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) even when all rows pass")
    p.add_argument("--rate", type=float, default=50.0, help="simulator updates per second (default 50)")
    p.add_argument("--events", type=int, default=12, help="simulator events (default 12)")
    p.add_argument("--seed", type=int, default=7, help="simulator seed (default 7)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulator lifecycle speed-up (default 1: statuses change rarely; prices at --rate)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="pollers' interval, s (default 1)")
    p.add_argument("--probe-interval", type=float, default=0.05, help="price check every … s (default 0.05)")
    p.add_argument("--allowance-ms", type=int, default=500,
                   help="feed lag granted: an OK is wrong-fresh when the upstream had changed the price more than "
                        "this long before the time the answer claims it was confirmed (checked_at - age_ms); "
                        "default 500")
    p.add_argument("--baseline", type=float, default=3.0, help="seconds observed before the fault (default 3)")
    p.add_argument("--post", type=float, default=2.0, help="seconds observed after recovery (default 2)")
    p.add_argument("--recover-timeout", type=float, default=20.0, help="seconds allowed to recover (default 20)")
    p.add_argument("--settle", type=float, default=6.0,
                   help="seconds the frozen upstream is given to converge before the end-state diff (default 6)")
    p.add_argument("--budget", type=float, default=780.0,
                   help="no row starts after this many seconds (default 780; rows not run fail)")
    p.add_argument("--png-dir", type=Path, default=None, help="where faults-recovery.png goes (default docs/bench/)")
    p.add_argument("--no-png", action="store_true")
    return p.parse_args(argv)


def _availability_note(row: Row) -> str:
    """What ``--list`` adds to a row that cannot run fully here ("" when it can)."""
    why, without = row.unavailable()
    if why is not None:
        return f"\n{'':<24} -> n/a here (a miss): {why}"
    if without:
        return f"\n{'':<24} -> runs WITHOUT {', '.join(without)} here: PARTIAL at best (a miss)"
    return ""


def _unavailable_lines() -> list[str]:
    """A summary of the rows that cannot be met here ([] when every row can)."""
    na = [r.name for r in ROWS if r.unavailable()[0] is not None]
    partial = [r.name for r in ROWS if r.unavailable()[0] is None and r.unavailable()[1]]
    if not na and not partial:
        return []
    out = [f"NOT EVERY ROW CAN BE MET HERE: {len(na)} n/a, {len(partial)} partial of {len(ROWS)} rows"]
    out += [f"  {s} unavailable: {why}" for s, why in UNAVAILABLE.items()]
    out += [f"  {r.name}: {r.unavailable()[0]}" for r in ROWS if r.requires is not None and r.unavailable()[0]]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for r in ROWS:
            print(f"{r.name:<24} [{', '.join(r.scope)}] {r.what}{_availability_note(r)}")
        for line in _unavailable_lines():
            print(line)
        return 0
    if args.self_check:
        return run_self_check()
    rows = ROWS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        names = {r.name: r for r in ROWS}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            print(f"faults.py: unknown row(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
            return 2
        rows = [names[w] for w in wanted]
    try:
        return asyncio.run(main_async(args, rows))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
