"""Prometheus metrics of an ingest process: ``GET /metrics`` on ``--metrics-port``.

The ingest already counts what matters per source (:class:`feed.ingest.IngestStats`:
messages, runner changes, market updates, stored deltas, rejects by reason;
the store failures of :class:`~feed.ingest.Ingest`; the health state). This
module reads those counters at scrape time — the hot path is unchanged — and
adds three per-source instruments recorded once per batch or delta: the
batch apply latency (:meth:`feed.ingest.Ingest.flush`), the feed lag
(``received_at − source_ts`` of every stored delta, recorded with the
pipeline's :class:`feed.sources.lag.LagWindow`) and Redis errors by
operation.

A source that is restarted (:func:`feed.supervisor.supervise`) gets a new
:class:`~feed.ingest.Ingest` with fresh counters; :class:`IngestMetrics`
keeps the counters of every Ingest of the process (weakly: once an Ingest is
gone its final counts are folded into the source's totals), so the exported
counters never go back. Families (times in seconds; label ``source`` = the
source name)::

    oddsfeed_ingest_messages_total{source}              counter  provider messages received
    oddsfeed_ingest_market_updates_total{source}        counter  market updates accepted for the book
    oddsfeed_ingest_runner_changes_total{source}        counter  runner (selection) changes in those updates
    oddsfeed_ingest_deltas_applied_total{source}        counter  deltas (market changes) written to Redis
    oddsfeed_ingest_rejected_total{source,reason}       counter  rejections (messages or single markets) by reason
    oddsfeed_ingest_redis_errors_total{source,op}       counter  failed Redis calls: op = store | health | events
    oddsfeed_ingest_batch_apply_seconds{source}         histogram one batched atomic apply (store.apply)
    oddsfeed_ingest_feed_lag_seconds{source}            histogram received_at − source_ts per stored delta
    oddsfeed_ingest_source_state{source,state}          gauge    1 for the current state (UP | DEGRADED | DOWN)
    oddsfeed_ingest_backlog{source}                     gauge    deltas waiting for the store
    oddsfeed_ingest_markets{source}                     gauge    markets in the source's book
    oddsfeed_build_info{version,revision}               gauge    1

**The server** (:class:`MetricsServer`) is a tiny asyncio HTTP/1.1 server on
the ingest's own event loop rather than prometheus-client's
``start_http_server`` thread: the collector then reads the ingest's counters,
dicts and histograms on the thread that mutates them, so a scrape is a
consistent snapshot with no locks and no "dictionary changed size during
iteration" races, and the server starts and stops with the process's event
loop (a busy port is an error at startup, like the API's). One request per
connection (``Connection: close``); ``GET``/``HEAD /metrics`` only; a request
head over 16 KiB or slower than 5 s is dropped. A scrape costs the loop the
time to render the text (well under a millisecond for a few sources).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from feed.errors import ConfigError
from streaming.latency import Histogram

if TYPE_CHECKING:
    from feed.ingest import Ingest, IngestStats

__all__ = ["APPLY_BUCKETS_S", "INGEST_METRICS", "IngestCollector", "IngestMetrics", "LAG_BUCKETS_S",
           "MetricsServer", "SourceMetrics", "make_registry", "serve_metrics"]

logger = logging.getLogger(__name__)

#: batch apply latency buckets, seconds (0.5 ms … 10 s)
APPLY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: feed lag buckets, seconds (5 ms … 10 min: pollers wait for their next poll)
LAG_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STATES = ("UP", "DEGRADED", "DOWN")


@dataclass
class SourceMetrics:
    """Everything of one source name that outlives its Ingest objects."""

    apply_seconds: Histogram = field(default_factory=lambda: Histogram(APPLY_BUCKETS_S))
    lag_seconds: Histogram = field(default_factory=lambda: Histogram(LAG_BUCKETS_S))
    redis_errors: dict[str, int] = field(default_factory=dict)
    # final counts of the source's Ingest objects that are gone
    messages: int = 0
    market_updates: int = 0
    runner_changes: int = 0
    deltas: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def redis_error(self, op: str) -> None:
        self.redis_errors[op] = self.redis_errors.get(op, 0) + 1

    def add(self, stats: IngestStats) -> None:
        self.messages += stats.messages
        self.market_updates += stats.market_updates
        self.runner_changes += stats.runner_changes
        self.deltas += stats.deltas
        for reason, n in stats.rejected_by_reason.items():
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + n


class IngestMetrics:
    """The ingest metrics of this process (one instance: :data:`INGEST_METRICS`)."""

    def __init__(self) -> None:
        self.sources: dict[str, SourceMetrics] = {}
        # (source, its stats, the Ingest) for every Ingest not yet folded into its SourceMetrics
        self._live: list[tuple[str, IngestStats, weakref.ref[Ingest]]] = []
        self._latest: dict[str, weakref.ref[Ingest]] = {}
        self._fold_at = 64

    def source(self, name: str) -> SourceMetrics:
        m = self.sources.get(name)
        if m is None:
            m = self.sources[name] = SourceMetrics()
        return m

    def register(self, ingest: Ingest) -> SourceMetrics:
        """Count ``ingest``'s stats under its source from now on (called by Ingest)."""
        if len(self._live) >= self._fold_at:  # amortised: a process making many Ingests (tests) stays linear
            self._fold()
            self._fold_at = max(64, 2 * len(self._live))
        ref = weakref.ref(ingest)
        self._live.append((ingest.source, ingest.stats, ref))
        self._latest[ingest.source] = ref
        return self.source(ingest.source)

    def _fold(self) -> None:
        """Fold the stats of Ingest objects that are gone (nothing can count into them any more)."""
        if any(ref() is None for _, _, ref in self._live):
            keep = []
            for name, stats, ref in self._live:
                if ref() is None:
                    self.source(name).add(stats)
                else:
                    keep.append((name, stats, ref))
            self._live = keep

    def totals(self) -> dict[str, SourceMetrics]:
        """Per source: the folded counts plus every live Ingest's (histograms shared)."""
        self._fold()
        out: dict[str, SourceMetrics] = {}
        for name, m in self.sources.items():
            t = out[name] = SourceMetrics(apply_seconds=m.apply_seconds, lag_seconds=m.lag_seconds,
                                          redis_errors=dict(m.redis_errors))
            t.messages, t.market_updates, t.runner_changes, t.deltas = (m.messages, m.market_updates,
                                                                       m.runner_changes, m.deltas)
            t.rejected_by_reason = dict(m.rejected_by_reason)
        for name, stats, _ in self._live:
            out[name].add(stats)
        return out

    def latest(self, name: str) -> Ingest | None:
        ref = self._latest.get(name)
        return ref() if ref is not None else None


#: the process's ingest metrics
INGEST_METRICS = IngestMetrics()


class IngestCollector(Collector):
    """Reads :class:`IngestMetrics` at scrape time (families: module docstring)."""

    def __init__(self, metrics: IngestMetrics | None = None) -> None:
        self.metrics = metrics or INGEST_METRICS

    def collect(self) -> Iterator[Metric]:
        from feed import buildinfo

        totals = self.metrics.totals()
        names = sorted(totals)
        info = GaugeMetricFamily("oddsfeed_build_info", "oddsfeed version and source revision",
                                 labels=["version", "revision"])
        info.add_metric([buildinfo.version(), buildinfo.revision() or ""], 1.0)
        yield info

        def counter(metric: str, doc: str, attr: str) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=["source"])
            for n in names:
                c.add_metric([n], float(getattr(totals[n], attr)))
            return c

        yield counter("oddsfeed_ingest_messages", "Provider messages received", "messages")
        yield counter("oddsfeed_ingest_market_updates", "Market updates accepted for the book", "market_updates")
        yield counter("oddsfeed_ingest_runner_changes", "Runner (selection) changes in accepted updates",
                      "runner_changes")
        yield counter("oddsfeed_ingest_deltas_applied", "Deltas (market changes) written to Redis", "deltas")
        rej = CounterMetricFamily("oddsfeed_ingest_rejected", "Rejected messages or markets by reason",
                                  labels=["source", "reason"])
        errs = CounterMetricFamily("oddsfeed_ingest_redis_errors", "Failed Redis calls by operation",
                                   labels=["source", "op"])
        apply = HistogramMetricFamily("oddsfeed_ingest_batch_apply_seconds", "Batched atomic store apply",
                                      labels=["source"])
        lag = HistogramMetricFamily("oddsfeed_ingest_feed_lag_seconds",
                                    "received_at - source_ts of stored deltas", labels=["source"])
        state = GaugeMetricFamily("oddsfeed_ingest_source_state", "1 for the source's current state",
                                  labels=["source", "state"])
        backlog = GaugeMetricFamily("oddsfeed_ingest_backlog", "Deltas waiting for the store", labels=["source"])
        markets = GaugeMetricFamily("oddsfeed_ingest_markets", "Markets in the source's book", labels=["source"])
        for n in names:
            t = totals[n]
            for reason, k in sorted(t.rejected_by_reason.items()):
                rej.add_metric([n, reason], float(k))
            for op in sorted({"store", "health", *t.redis_errors}):
                errs.add_metric([n, op], float(t.redis_errors.get(op, 0)))
            apply.add_metric([n], t.apply_seconds.buckets(), t.apply_seconds.sum)
            lag.add_metric([n], t.lag_seconds.buckets(), t.lag_seconds.sum)
            ingest = self.metrics.latest(n)
            current = "DOWN"
            if ingest is not None:
                current = ingest.health.state if ingest.store_ok else "DOWN"
                backlog.add_metric([n], float(ingest.backlog))
                markets.add_metric([n], float(len(ingest.book.markets)))
            for s in STATES:
                state.add_metric([n, s], 1.0 if s == current else 0.0)
        yield rej
        yield errs
        yield apply
        yield lag
        yield state
        yield backlog
        yield markets


def make_registry(metrics: IngestMetrics | None = None) -> CollectorRegistry:
    """A registry with the ingest collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(metrics))
    return registry


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for the metrics server, or ConfigError naming the busy address."""
    from feed.aio import listening_socket

    return listening_socket(host, port, 64, error=ConfigError, what="metrics port",
                            busy="stop the other process or pick another with --metrics-port (0 = off)")


_HEAD_MAX = 16 * 1024
_HEAD_TIMEOUT_S = 5.0


class MetricsServer:
    """``GET /metrics`` on an asyncio server (see the module docstring for why)."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry | None = None) -> None:
        self.sock = sock
        self.registry = registry if registry is not None else make_registry()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self.sock, limit=_HEAD_MAX)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split()
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if path != b"/metrics":
                status, body, ctype = b"404 Not Found", b"not found: the ingest serves GET /metrics\n", b"text/plain"
            elif method not in (b"GET", b"HEAD"):
                status, body, ctype = b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain"
            else:
                status, ctype = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
                body = generate_latest(self.registry)
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                         + b"\r\nContent-Length: %d\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n" % len(body)
                         + (b"" if method == b"HEAD" else body))
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(writer.drain(), _HEAD_TIMEOUT_S)
        except Exception:  # a scrape must never take the ingest down
            logger.exception("metrics request failed")
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serve_metrics(host: str, port: int, *, sock: socket.socket | None = None) -> AsyncIterator[MetricsServer]:
    """Serve the ingest metrics on ``host:port`` (or an already bound ``sock``) while inside."""
    server = MetricsServer(sock if sock is not None else bind(host, port))
    await server.start()
    h, p = server.address
    print(f"oddsfeed ingest metrics on http://{h}:{p}/metrics", flush=True)
    try:
        yield server
    finally:
        await server.close()
