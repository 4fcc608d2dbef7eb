"""Prometheus metrics of one API node: ``GET /metrics``.

Hot paths only bump plain integers (hub counters) or call
:meth:`Histogram.observe` (a bisect into fixed buckets, no lock: the node is
single-threaded); a custom collector turns them into Prometheus families at
scrape time, so ``prometheus-client`` costs nothing per delivered frame.
Each app has its own registry (several apps may live in one process, e.g.
in tests).

Families (all times in seconds)::

    oddsfeed_connections{transport}              gauge    open SSE / WebSocket connections
    oddsfeed_connections_total{transport}        counter  connections accepted
    oddsfeed_subscriptions                       gauge    subscriptions (an SSE stream is one)
    oddsfeed_outbox_bytes                        gauge    stream bytes queued, all connections
    oddsfeed_outbox_max_connection_bytes         gauge    largest queue of one connection
    oddsfeed_frames_sent_total                   counter  frames handed to the transports
    oddsfeed_conflated_total                     counter  messages that merged several deltas
    oddsfeed_slow_consumer_total{action}         counter  overflow | collapse | snapshot | close
    oddsfeed_collapsed_frames_total              counter  queued frames removed by collapsing
    oddsfeed_event_state_messages_total          counter  event_state messages queued (scores, clock: per subscription)
    oddsfeed_resumes_total{outcome}              counter  recovered | not_recovered
    oddsfeed_resyncs_total                       counter  node-wide resyncs (epoch change, trim, restart)
    oddsfeed_reader_connected{partition}         gauge    1 when the partition reader's last Redis call worked
    oddsfeed_reader_lag_seconds{partition}       gauge    newest log entry in Redis − the node's position
    oddsfeed_reader_entries_total{partition}     counter  log entries read
    oddsfeed_reader_errors_total{partition}      counter  Redis errors (each followed by a backoff)
    oddsfeed_reader_reads_total{partition}       counter  XREADs of the delta log
    oddsfeed_reader_checks_total{partition}      counter  epoch / oldest-id checks (on a timer or when a read looks off)
    oddsfeed_reader_reloads_total                counter  state reloads from Redis
    oddsfeed_markets                             gauge    markets held by the node
    oddsfeed_markets_stale                       gauge    markets served as stale now
    oddsfeed_price_checks_total{reason}          counter  price checks answered (a batch counts each leg)
    oddsfeed_price_check_seconds                 histogram handling per request (body read → answer sent)
    oddsfeed_ready                               gauge    1 when /ready says ready
    oddsfeed_tenant_limited_total{tenant,limit}  counter  refusals by a tenant limit: connections |
                                                          subscriptions | price_checks (streaming.tenants)
    oddsfeed_tenant_connections{tenant}          gauge    open streams per tenant ("default": unnamed keys/subjects)
    oddsfeed_tenants_reloads_total{result}       counter  tenants file reloads: ok | error (old file kept)
    oddsfeed_hop_latency_seconds{hop}            histogram per delta, once per node:
        provider_to_received (received_at − source_ts), received_to_stored (stored_at − received_at),
        stored_to_read (node read − stored_at); per connection write: queued_to_sent (first frame
        queued → written)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from streaming.state import now_ms
from streaming.transport import FRAMINGS
from streaming.latency import BUCKETS_S, HOPS, Histogram

if TYPE_CHECKING:
    from streaming.reader import Node

__all__ = ["BUCKETS_S", "HOPS", "Histogram", "NodeCollector", "make_registry", "metrics_endpoint"]

class NodeCollector(Collector):
    """Reads a :class:`~streaming.reader.Node` at scrape time."""

    def __init__(self, node: "Node") -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        hub = node.hub
        conns = list(hub.connections)
        g = GaugeMetricFamily("oddsfeed_connections", "Open streaming connections", labels=["transport"])
        counts = {name: 0 for name in FRAMINGS}
        for conn in conns:
            counts[conn.framing.name] = counts.get(conn.framing.name, 0) + 1
        for kind, n in sorted(counts.items()):
            g.add_metric([kind], float(n))
        yield g
        c = CounterMetricFamily("oddsfeed_connections", "Streaming connections accepted", labels=["transport"])
        for kind, n in sorted(hub.connects.items()):
            c.add_metric([kind], float(n))
        yield c
        yield GaugeMetricFamily("oddsfeed_subscriptions", "Subscriptions", value=float(hub.subscriptions))
        yield GaugeMetricFamily("oddsfeed_outbox_bytes", "Stream bytes queued for clients",
                                value=float(sum(c.outbox_bytes for c in conns)))
        yield GaugeMetricFamily("oddsfeed_outbox_max_connection_bytes", "Largest stream queue of one connection",
                                value=float(max((c.outbox_bytes for c in conns), default=0)))
        yield CounterMetricFamily("oddsfeed_frames_sent", "Frames handed to transports", value=float(hub.frames_out))
        yield CounterMetricFamily("oddsfeed_conflated", "Messages that merged several deltas of a market",
                                  value=float(hub.conflated))
        slow = CounterMetricFamily("oddsfeed_slow_consumer", "Slow-consumer actions", labels=["action"])
        for action, n in (("overflow", hub.overflows), ("collapse", hub.collapses),
                          ("snapshot", hub.slow_resyncs), ("close", hub.slow_closes)):
            slow.add_metric([action], float(n))
        yield slow
        yield CounterMetricFamily("oddsfeed_collapsed_frames", "Queued frames removed by collapsing",
                                  value=float(hub.collapsed_frames))
        yield CounterMetricFamily("oddsfeed_event_state_messages", "event_state messages queued to subscriptions",
                                  value=float(hub.event_state_frames))
        res = CounterMetricFamily("oddsfeed_resumes", "Resume attempts by outcome", labels=["outcome"])
        for outcome, n in sorted(hub.resumes.items()):
            res.add_metric([outcome], float(n))
        yield res
        yield CounterMetricFamily("oddsfeed_resyncs", "Node-wide resyncs", value=float(hub.resyncs))
        connected = GaugeMetricFamily("oddsfeed_reader_connected", "Reader's last Redis call worked",
                                      labels=["partition"])
        lag = GaugeMetricFamily("oddsfeed_reader_lag_seconds", "Newest log entry in Redis minus the node's position",
                                labels=["partition"])
        entries = CounterMetricFamily("oddsfeed_reader_entries", "Log entries read", labels=["partition"])
        errors = CounterMetricFamily("oddsfeed_reader_errors", "Reader Redis errors", labels=["partition"])
        reads = CounterMetricFamily("oddsfeed_reader_reads", "XREADs of the delta log", labels=["partition"])
        checks = CounterMetricFamily("oddsfeed_reader_checks", "Epoch / oldest-id checks", labels=["partition"])
        pushed = CounterMetricFamily("oddsfeed_reader_pushed_entries",
                                     "Log entries taken from the pushed log (no read round trip)", labels=["partition"])
        gaps = CounterMetricFamily("oddsfeed_reader_push_gaps",
                                   "Pushed-log gaps (a message missed or the subscription lost; the log was read)",
                                   labels=["partition"])
        for r in node.readers:
            label = [str(r.partition)]
            connected.add_metric(label, 1.0 if r.connected else 0.0)
            lag.add_metric(label, r.lag_ms / 1000)
            entries.add_metric(label, float(r.entries))
            errors.add_metric(label, float(r.errors))
            reads.add_metric(label, float(r.reads))
            checks.add_metric(label, float(r.checks))
            pushed.add_metric(label, float(r.pushed))
            gaps.add_metric(label, float(r.push_gaps))
        yield connected
        yield lag
        yield entries
        yield errors
        yield reads
        yield checks
        yield pushed
        yield gaps
        yield CounterMetricFamily("oddsfeed_reader_reloads", "State reloads from Redis", value=float(node.reloads))
        yield GaugeMetricFamily("oddsfeed_markets", "Markets held by the node", value=float(len(node.state.markets)))
        st = node.state
        now = now_ms()
        stale = sum(1 for m in list(st.markets.values()) if st.age_stale(m, now)[1])
        yield GaugeMetricFamily("oddsfeed_markets_stale", "Markets the node serves as stale now", value=float(stale))
        pc = CounterMetricFamily("oddsfeed_price_checks", "Price checks answered, by reason (a batch counts each leg)",
                                 labels=["reason"])
        for reason, n in sorted(node.price_checks.items()):
            pc.add_metric([reason], float(n))
        yield pc
        hist = node.price_check_latency
        ph = HistogramMetricFamily("oddsfeed_price_check_seconds",
                                   "Price-check handling per request, from its body read to its answer sent")
        ph.add_metric([], hist.buckets(), hist.sum)
        yield ph
        yield GaugeMetricFamily("oddsfeed_ready", "1 when /ready says ready", value=1.0 if node.readiness()[0] else 0.0)
        tenants = node.tenants
        limited = CounterMetricFamily("oddsfeed_tenant_limited", "Requests refused by a tenant limit",
                                      labels=["tenant", "limit"])
        streams = GaugeMetricFamily("oddsfeed_tenant_connections", "Open streams per tenant", labels=["tenant"])
        reloads = CounterMetricFamily("oddsfeed_tenants_reloads", "Tenants file reloads by result", labels=["result"])
        if tenants is not None:
            for (tenant, limit), n in sorted(tenants.limited.items()):
                limited.add_metric([tenant, limit], float(n))
            open_by: dict[str, int] = {}
            for p in list(tenants.principals.values()):
                open_by[p.tenant] = open_by.get(p.tenant, 0) + p.connections
            for tenant, n in sorted(open_by.items()):
                streams.add_metric([tenant], float(n))
            for result, n in sorted(tenants.reloads.items()):
                reloads.add_metric([result], float(n))
        yield limited
        yield streams
        yield reloads
        h = HistogramMetricFamily("oddsfeed_hop_latency_seconds", "Latency per hop", labels=["hop"])
        for hop, hist in node.hops.items():
            h.add_metric([hop], hist.buckets(), hist.sum)
        yield h


def make_registry(node: "Node") -> CollectorRegistry:
    """A registry with the node's collector (one per app)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics`` in the Prometheus text format."""
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = make_registry(request.app.state.node)
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8",
                    headers={"Cache-Control": "no-store"})
