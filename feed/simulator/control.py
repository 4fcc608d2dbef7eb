"""Remote fault switches for a simulator process (``oddsfeed simulate --control-port``).

The simulators' fault switches are methods; a harness in another process
flips them over this small control port: TCP on 127.0.0.1 only, one JSON
object per line in, one per line out::

    → {"target": "esa", "op": "drop_connections"}
    ← {"ok": true, "result": null}
    → {"target": "http", "op": "rate_limit", "args": {"n": 3, "retry_after_s": 2}}
    → {"target": "push", "op": "skip", "args": {"n": 2}}
    → {"target": "*", "op": "freeze", "args": {"on": true}}     (every simulator that has it)
    → {"op": "stats"}                                          (counters, for evidence)
    ← {"ok": false, "error": "…what was wrong…"}

Targets: ``esa`` (:class:`~feed.simulator.esa_server.Simulator`), ``http``
(:class:`~feed.simulator.http_providers.HttpProviders`), ``push``
(:class:`~feed.simulator.push_providers.PushSimulator`), ``uof``
(:class:`~feed.simulator.uof.UofSimulator`, with ``--uof-amqp-url``) and
``webhook`` (:class:`~feed.simulator.webhook_pusher.WebhookPusher` in live
mode, with ``--webhook-url``). Only the fault switches listed in
:data:`SWITCHES` can be called::

    → {"target": "uof", "op": "producer_down", "args": {"product": 1, "seconds": 8}}
    → {"target": "webhook", "op": "duplicate", "args": {"n": 3}}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

__all__ = ["SWITCHES", "ControlServer"]

logger = logging.getLogger(__name__)

#: target -> the methods a client may call
SWITCHES: dict[str, frozenset[str]] = {
    "esa": frozenset({"set_degraded", "drop_connections", "stall", "inject_malformed", "drop_mid_segment",
                      "poison_timestamps", "freeze", "expire_sessions", "fail_catalogue"}),
    "http": frozenset({"rate_limit", "server_error", "error_code", "stall", "trickle", "malformed", "duplicate",
                       "replay_old", "expire_tokens", "drop_bookmaker", "set_quota", "freeze", "clear_faults",
                       "pending_faults"}),
    "push": frozenset({"drop_connections", "stall", "duplicate", "reorder", "skip", "inject_malformed",
                       "fail_snapshots", "freeze", "poison_timestamps", "open_connections"}),
    "uof": frozenset({"stall", "duplicate", "reorder", "inject_malformed", "producer_down", "fail_recovery",
                      "poison_timestamps", "freeze", "clear_faults", "pending_faults"}),
    "webhook": frozenset({"duplicate", "reorder", "inject_malformed", "bad_signatures", "expired", "stall",
                          "poison_timestamps", "freeze", "clear_faults", "pending_faults"}),
}


class ControlServer:
    """Serves :data:`SWITCHES` of ``targets`` (``{"esa": sim, …}``) on
    127.0.0.1:``port`` (0 = any free port; read ``port`` after :meth:`start`)."""

    def __init__(self, targets: dict[str, Any], port: int = 0) -> None:
        self.targets = {k: v for k, v in targets.items() if v is not None}
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("simulator control port on 127.0.0.1:%d", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def stats(self) -> dict[str, Any]:
        """Counters of every simulator (evidence that a switch took effect)."""
        out: dict[str, Any] = {}
        esa = self.targets.get("esa")
        if esa is not None:
            out["esa"] = {"connections_accepted": esa.connections_accepted, "subscriptions": len(esa.subscriptions),
                          "resubscriptions": sum(1 for s in esa.subscriptions if s.get("clk")),
                          "open_connections": len(esa._conns)}
        http = self.targets.get("http")
        if http is not None:
            out["http"] = {"status_counts": dict(http.status_counts), "requests": len(http.requests),
                           "pending_faults": http.pending_faults(), "early_requests": len(http.early_requests)}
        push = self.targets.get("push")
        if push is not None:
            out["push"] = {"connections_accepted": push.connections_accepted, "resumed": push.resumed,
                           "fresh": push.fresh, "snapshot_requests": push.snapshot_requests, "seq": push.seq,
                           "open_connections": push.open_connections()}
        for name in ("uof", "webhook"):
            sim = self.targets.get(name)
            if sim is not None:
                out[name] = sim.control_stats()
        return out

    def call(self, req: Any) -> dict[str, Any]:
        """Execute one request (a decoded JSON object); the answer to send."""
        if not isinstance(req, dict):
            return {"ok": False, "error": "send a JSON object per line"}
        op, target, args = req.get("op"), req.get("target"), req.get("args") or {}
        if not isinstance(op, str) or not isinstance(target, str | None):
            return {"ok": False, "error": 'send {"target": "esa"|"http"|"push"|"uof"|"webhook"|"*", "op": "<switch>", '
                                          '"args": {…}}'}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object of keyword arguments"}
        if op == "ping":
            return {"ok": True, "result": sorted(self.targets)}
        if op == "stats":
            return {"ok": True, "result": self.stats()}
        if target is None:
            return {"ok": False, "error": f"{op} needs a target: one of {sorted(self.targets)} or '*'"}
        names = sorted(self.targets) if target == "*" else [target]
        results: dict[str, Any] = {}
        for name in names:
            sim = self.targets.get(name)
            if sim is None:
                return {"ok": False, "error": f"unknown target {name!r}: use one of {sorted(self.targets)} or '*'"}
            if op not in SWITCHES.get(name, ()):
                if target == "*":
                    continue
                return {"ok": False, "error": f"{name} has no switch {op!r}: use one of {sorted(SWITCHES[name])}"}
            try:
                results[name] = getattr(sim, op)(**args)
            except TypeError as exc:
                return {"ok": False, "error": f"{name}.{op}: {exc}"}
        logger.info("simulator control: %s %s %s", target, op, args)
        return {"ok": True, "result": results if target == "*" else results.get(target)}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    answer = self.call(orjson.loads(line))
                except orjson.JSONDecodeError:
                    answer = {"ok": False, "error": "not JSON"}
                writer.write(orjson.dumps(answer, default=str) + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
