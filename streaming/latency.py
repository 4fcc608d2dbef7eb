"""Per-hop latency histograms of one API node, without Prometheus or Starlette.

:mod:`streaming.reader` and the hub record into :class:`Histogram` on their
hot paths; :mod:`streaming.metrics` turns them into Prometheus families at
scrape time. Kept apart from :mod:`streaming.metrics` so the reader does not
import the metrics endpoint (which reads the reader's ``Node``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["BUCKETS_S", "HOPS", "Histogram", "PRICE_CHECK_BUCKETS_S"]

#: Latency buckets, seconds (1 ms … 30 s).
BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HOPS = ("provider_to_received", "received_to_stored", "stored_to_read", "queued_to_sent")

#: Price-check handling buckets, seconds (0.1 ms … 1 s): a check takes well under a millisecond.
PRICE_CHECK_BUCKETS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                            0.1, 0.25, 1.0)


class Histogram:
    """A fixed-bucket histogram (seconds) without locks; ``observe`` ≈ a bisect."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float] = BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value_s: float) -> None:
        self.counts[bisect_left(self.bounds, value_s)] += 1
        self.sum += value_s
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        acc = 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append((repr(float(b)), float(acc)))
        out.append(("+Inf", float(self.count)))
        return out
