"""Reconnect delays (capped exponential growth with full jitter) and the pacing of repairs.

Every source that reconnects (ESA socket, WebSocket and SSE consumers, pollers
after a failure) waits ``backoff()`` seconds between attempts, so a fleet of
clients that lost the same upstream does not reconnect in lock step.

Attempt ``n`` (0-based) waits a uniformly random delay in
``[0, min(max_s, initial_s * factor ** n))`` seconds ("full jitter", as in the
AWS architecture note and the websockets client, which also starts with a
random delay). Units are seconds throughout. :class:`RepairPacer` spaces
repairs that cost the upstream something (an ESA resubscription for a full
image) without making the first one wait.

>>> delays = backoff(initial_s=1.0, factor=2.0, max_s=8.0, rng=lambda: 1.0)
>>> [next(delays) for _ in range(5)]
[1.0, 2.0, 4.0, 8.0, 8.0]
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["Backoff", "RepairPacer", "backoff"]


def backoff(
    initial_s: float = 0.5,
    factor: float = 2.0,
    max_s: float = 30.0,
    rng: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Yield reconnect delays in seconds, forever.

    Args:
        initial_s: upper bound of the first delay, in seconds (> 0).
        factor: growth of the upper bound per attempt (>= 1).
        max_s: cap on the upper bound, in seconds.
        rng: uniform random source in ``[0, 1)``; inject a fixed one in tests.

    Yields:
        ``rng() * min(max_s, initial_s * factor ** attempt)``.
    """
    if initial_s <= 0 or factor < 1 or max_s <= 0:
        raise ValueError("backoff needs initial_s > 0, factor >= 1 and max_s > 0")
    cap = min(initial_s, max_s)
    while True:
        yield rng() * cap
        cap = min(max_s, cap * factor)


class Backoff:
    """A resettable :func:`backoff` sequence.

    ``next_delay()`` returns the next delay in seconds; ``reset()`` starts over
    from ``initial_s`` (call it after a connection proved healthy, e.g. a
    successful subscription). ``attempts`` counts delays handed out since the
    last reset.
    """

    __slots__ = ("_factor", "_gen", "_initial_s", "_max_s", "_rng", "attempts")

    def __init__(
        self,
        initial_s: float = 0.5,
        factor: float = 2.0,
        max_s: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._initial_s = initial_s
        self._factor = factor
        self._max_s = max_s
        self._rng = rng
        self._gen = backoff(initial_s, factor, max_s, rng)
        self.attempts = 0

    def next_delay(self) -> float:
        """The next delay in seconds."""
        self.attempts += 1
        return next(self._gen)

    def reset(self) -> None:
        """Start the sequence again from ``initial_s``."""
        if not self.attempts:  # nothing handed out since the last reset (the usual case: per read)
            return
        self._gen = backoff(self._initial_s, self._factor, self._max_s, self._rng)
        self.attempts = 0


class RepairPacer:
    """Spaces repairs that cost the upstream a round of work — an ESA
    resubscription for a full image, say — without making the first one wait.

    The first repair after a quiet spell may go at once; the next one
    ``first_s`` after it, then 2×, 4× … that gap, up to ``max_s``;
    ``quiet_s`` (default: 60 s, or 2 × ``max_s`` when longer) without a repair
    start the sequence over. So an isolated
    rejected change is repaired within a second, and a provider that keeps
    sending bad data gets one repair per ``max_s`` instead of a reconnect
    loop. Times are seconds on a monotonic clock (``time.monotonic()``).

    >>> p = RepairPacer(first_s=1.0, max_s=4.0, quiet_s=60.0)
    >>> p.due(0.0); p.take(0.0); p.due(0.5), p.due(1.0)
    True
    (False, True)
    >>> p.take(1.0); p.take(3.0); p.take(7.0); p.due(10.9), p.due(11.0)
    (False, True)
    >>> p.take(11.0); p.due(71.0)   # a quiet minute: at once again
    True
    """

    __slots__ = ("_first_s", "_gap_s", "_last", "_max_s", "_quiet_s")

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0, quiet_s: float | None = None) -> None:
        if quiet_s is None:
            quiet_s = max(60.0, 2 * max_s)  # (a quiet spell is longer than the longest gap)
        if first_s <= 0 or max_s < first_s or quiet_s < max_s:
            raise ValueError("RepairPacer needs 0 < first_s <= max_s <= quiet_s")
        self._first_s = first_s
        self._max_s = max_s
        self._quiet_s = quiet_s
        self._gap_s = 0.0
        self._last = -1e18

    def due(self, now: float) -> bool:
        """Whether a repair may be taken at ``now``."""
        return now - self._last >= self._gap_s  # (the gap never exceeds max_s ≤ quiet_s)

    def take(self, now: float) -> None:
        """Record a repair taken at ``now``: the next one waits the next gap."""
        if now - self._last >= self._quiet_s:
            self._gap_s = self._first_s
        else:
            self._gap_s = min(self._max_s, self._gap_s * 2)
        self._last = now
