"""Feed-lag percentiles of one source over a sliding window (HdrHistogram).

Lag = ``received_at − source_ts`` (ms) of every delta (and event state) a source stored: how
long after the provider's change time we read it. For a poller it includes
the wait for the next poll; for a push source only the transport.

:class:`LagWindow` keeps two HdrHistograms (1 ms … 1 h, 3 significant
digits) and rotates them every ``window_s / 2`` seconds, so the percentiles
cover between half a window and a whole window of recent samples.
Negative lags (provider clock ahead of ours) are counted separately and
not folded into the histogram (``research/reliability.md`` B17).
:func:`apply_to_health` writes the percentiles into
:class:`feed.models.SourceHealth` (``lag_p50_ms``, ``lag_p99_ms``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from hdrh.histogram import HdrHistogram

from feed.models import Delta, EventState, SourceHealth

__all__ = ["LagWindow", "apply_to_health"]

_LOWEST, _HIGHEST, _DIGITS = 1, 3_600_000, 3



class Observer(Protocol):
    def observe(self, value_s: float) -> None: ...


class LagWindow:
    """Recent lag samples in ms. ``clock``: monotonic seconds. ``histogram``: every
    non-negative sample is also observed there, in seconds (the cumulative Prometheus
    histogram of :mod:`feed.metrics`)."""

    def __init__(self, window_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 histogram: Observer | None = None) -> None:
        self.window_s = window_s
        self.histogram = histogram
        self._clock = clock
        self._current = HdrHistogram(_LOWEST, _HIGHEST, _DIGITS)
        self._previous = HdrHistogram(_LOWEST, _HIGHEST, _DIGITS)
        self._rotated_at = clock()
        self.negative = 0
        self.total = 0

    def _rotate(self) -> None:
        now = self._clock()
        if now - self._rotated_at >= self.window_s / 2:
            self._previous, self._current = self._current, self._previous
            self._current.reset()
            if now - self._rotated_at >= self.window_s:  # a long quiet spell: both are old
                self._previous.reset()
            self._rotated_at = now

    def record(self, lag_ms: int) -> None:
        """One sample (ms); negative ones are only counted."""
        self._rotate()
        self.total += 1
        if lag_ms < 0:
            self.negative += 1
            return
        self._current.record_value(min(lag_ms, _HIGHEST))
        if self.histogram is not None:
            self.histogram.observe(lag_ms / 1000)

    def record_deltas(self, deltas: Iterable[Delta]) -> None:
        """Samples from stored deltas (``received_at − source_ts``)."""
        for d in deltas:
            if d.source_ts:
                self.record(d.received_at - d.source_ts)

    def record_states(self, states: Iterable[EventState]) -> None:
        """Samples from stored event states (``received_at − source_ts``)."""
        for es in states:
            if es.source_ts:
                self.record(es.received_at - es.source_ts)

    def percentiles(self) -> tuple[int | None, int | None]:
        """(p50, p99) in ms over the window, (None, None) without samples."""
        self._rotate()
        merged = HdrHistogram(_LOWEST, _HIGHEST, _DIGITS)
        merged.add(self._current)
        merged.add(self._previous)
        if merged.get_total_count() == 0:
            return None, None
        return int(merged.get_value_at_percentile(50)), int(merged.get_value_at_percentile(99))

    def count(self) -> int:
        """Samples in the window (negative ones excluded)."""
        self._rotate()
        return int(self._current.get_total_count() + self._previous.get_total_count())


def apply_to_health(health: SourceHealth, lag: LagWindow) -> None:
    """Set ``lag_p50_ms`` / ``lag_p99_ms`` on ``health``."""
    health.lag_p50_ms, health.lag_p99_ms = lag.percentiles()
