"""Reconnect delays: capped exponential growth with full jitter.

Every source that reconnects (ESA socket, WebSocket and SSE consumers, pollers
after a failure) waits ``backoff()`` seconds between attempts, so a fleet of
clients that lost the same upstream does not reconnect in lock step.

Attempt ``n`` (0-based) waits a uniformly random delay in
``[0, min(max_s, initial_s * factor ** n))`` seconds ("full jitter", as in the
AWS architecture note and the websockets client, which also starts with a
random delay). Units are seconds throughout.

>>> delays = backoff(initial_s=1.0, factor=2.0, max_s=8.0, rng=lambda: 1.0)
>>> [next(delays) for _ in range(5)]
[1.0, 2.0, 4.0, 8.0, 8.0]
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["Backoff", "backoff"]


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
        self._gen = backoff(self._initial_s, self._factor, self._max_s, self._rng)
        self.attempts = 0
