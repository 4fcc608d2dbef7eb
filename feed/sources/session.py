"""What every long-lived upstream client shares: health reporting and stopping.

:class:`SessionClient` holds the ``on_health(state, reason)`` callback
(called on changes only), the last reported health, and the stop machinery:
:meth:`stop` sets a flag and an event (a backoff wait returns at once) and
cancels the current session task. The ESA client
(:mod:`feed.sources.esa`) and the push clients (:mod:`feed.sources.push`)
build their reconnect loops on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from feed.models import SourceState

HealthCallback = Callable[[SourceState, str | None], None]


class SessionClient:
    """Base of a client that runs sessions until :meth:`stop`."""

    def __init__(self, on_health: HealthCallback) -> None:
        self._on_health = on_health
        self._health: tuple[SourceState, str | None] | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._session_task: asyncio.Task[None] | None = None

    @property
    def health(self) -> tuple[SourceState, str | None] | None:
        """The last ``(state, reason)`` reported to ``on_health``."""
        return self._health

    def stop(self) -> None:
        """Ask ``run()`` to return; closes the connection. Idempotent."""
        self._stopping = True
        self._stop_event.set()
        if self._session_task is not None:
            self._session_task.cancel()

    def _set_health(self, state: SourceState, reason: str | None) -> None:
        if self._health != (state, reason):
            self._health = (state, reason)
            self._on_health(state, reason)
