"""One timer wheel for the deadlines of many connections.

Send deadlines, WebSocket keepalive pings and pong deadlines, and close
grace periods are due per connection, by the ten thousand. A
``loop.call_later`` each costs a ``TimerHandle`` in the event loop's heap
(``O(log n)`` per insert and per pop, and a cancelled handle stays there
until it is due); a task per connection costs kilobytes. The wheel keeps
them in slots of :attr:`TimerWheel.resolution_s` (default 0.1 s) and arms
ONE loop timer, for the earliest non-empty slot: adding a timer is a list
append, and a due slot runs its callbacks in one go.

Timers are coarse: a callback runs between its due time and one resolution
later, never earlier. There is no cancel: a callback checks whether it is
still wanted (each caller passes what it needs to tell, e.g. a
generation number), which costs nothing for the common case (the timer
was not needed) beyond the list entry.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from typing import Any

__all__ = ["TimerWheel"]

logger = logging.getLogger(__name__)


class TimerWheel:
    """Coarse one-shot timers: ``call_later(delay_s, fn, arg)`` runs ``fn(arg)``
    between ``delay_s`` and ``delay_s + resolution_s`` from now (seconds, loop time).

    A callback that raises is logged and does not stop the others.
    """

    __slots__ = ("resolution_s", "_slots", "_ticks", "_handle", "_armed_tick", "_loop", "pending")

    def __init__(self, resolution_s: float = 0.1) -> None:
        if resolution_s <= 0:
            raise ValueError("resolution_s must be positive")
        self.resolution_s = resolution_s
        self._slots: dict[int, list[tuple[Callable[[Any], object], Any]]] = {}
        self._ticks: list[int] = []  # heap of the slots' ticks
        self._handle: asyncio.TimerHandle | None = None
        self._armed_tick = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        #: timers queued and not yet run
        self.pending = 0

    def call_later(self, delay_s: float, fn: Callable[[Any], object], arg: Any) -> None:
        """Run ``fn(arg)`` about ``delay_s`` seconds from now (see the class docstring)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        tick = math.ceil((loop.time() + max(0.0, delay_s)) / self.resolution_s)
        slot = self._slots.get(tick)
        if slot is None:
            slot = self._slots[tick] = []
            heapq.heappush(self._ticks, tick)
        slot.append((fn, arg))
        self.pending += 1
        if self._handle is None or tick < self._armed_tick:
            self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._ticks:
            return
        tick = self._ticks[0]
        self._armed_tick = tick
        self._handle = loop.call_at(tick * self.resolution_s, self._run)

    def _run(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        now_tick = math.floor(loop.time() / self.resolution_s)
        ticks = self._ticks
        while ticks and ticks[0] <= now_tick:
            slot = self._slots.pop(heapq.heappop(ticks))
            self.pending -= len(slot)
            for fn, arg in slot:
                try:
                    fn(arg)
                except Exception:  # one bad callback must not stop the others
                    logger.exception("timer callback %r failed", fn)
        self._arm(loop)
