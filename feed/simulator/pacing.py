"""The simulators' clock: a fixed tick and a rate of synthetic updates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def tick_forever(tick_ms: int, rate_per_s: float, on_tick: Callable[[int, int], None]) -> None:
    """Every ``tick_ms``, call ``on_tick(now_ms, n)`` where ``n`` is the number
    of model updates owed at ``rate_per_s`` since the last tick (fractions
    carry over; a stall longer than 1 s is not caught up). Runs until
    cancelled. ``now_ms``: wall clock, ms since the Unix epoch."""
    loop = asyncio.get_running_loop()
    tick_s = max(tick_ms, 1) / 1000
    last = loop.time()
    owed = 0.0
    while True:
        await asyncio.sleep(tick_s)
        now = loop.time()
        elapsed, last = min(now - last, 1.0), now
        owed += rate_per_s * elapsed
        n = int(owed)
        owed -= n
        on_tick(time.time_ns() // 1_000_000, n)
