"""Push consumer over WebSocket (``websockets`` asyncio client).

The transport-neutral client (order, gaps and resync, resume, liveness,
reconnects) is :class:`feed.sources.push.PushClient`; this module adds the
WebSocket transport. Wire: connect (API key in ``X-Api-Key``), send
``{"type":"subscribe","resume_from":"<entry id>"|null}``, then read JSON text
frames (push format: ``docs/push-format.md``).
"""


from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidStatus,
)

from feed.errors import FatalSourceError
from feed.ingest import Ingest
from feed.settings import Settings
from feed.sources.spec import SourceSpec
from feed.sources.push import PushClient, PushSource, Received, Receiver, _LinkLost, push_source, run_push_source
from feed.store import Store

__all__ = ["from_spec", "PushWsClient", "run_push_ws_source"]

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 << 20
_DRAIN_MAX = 512


class PushWsClient(PushClient):
    """:class:`PushClient` over a WebSocket (``websockets`` asyncio client)."""

    kind = "push-ws"

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_message_bytes = max_message_bytes

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Receiver]:
        logger.info("push %s: connecting to %s", self.name, self.url)
        try:
            ws = await connect(self.url, additional_headers=self._headers(), open_timeout=self._connect_timeout_s,
                               max_size=self._max_message_bytes, proxy=None, compression=None,
                               close_timeout=2)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise FatalSourceError(f"push {self.name}: the provider refused the api key (http {status})",
                                       code="unauthorized") from None
            raise _LinkLost(f"handshake refused: http {status}") from None
        async with ws:
            await ws.send(orjson.dumps({"type": "subscribe", "resume_from": self._cursor}).decode())
            logger.info("push %s: subscribed (%s)", self.name,
                        f"resuming after {self._cursor}" if self._cursor else "fresh")
            clock = self._clock_ms

            async def recv(timeout_s: float) -> Received:
                try:
                    async with asyncio.timeout(timeout_s):
                        first = await ws.recv(decode=False)
                except TimeoutError:
                    return []
                except ConnectionClosed as exc:
                    raise _LinkLost(f"closed by the provider ({exc.rcvd.code if exc.rcvd else 'no close frame'})") \
                        from None
                recv_ms = clock()
                out: Received = [(_as_bytes(first), recv_ms)]
                while len(out) < _DRAIN_MAX:  # what is already queued, without waiting
                    try:
                        async with asyncio.timeout(0):
                            more = await ws.recv(decode=False)
                    except (TimeoutError, ConnectionClosed):
                        break
                    out.append((_as_bytes(more), recv_ms))
                return out

            yield recv


def _as_bytes(message: str | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.encode()


async def run_push_ws_source(store: Store, settings: Settings, spec: SourceSpec, *,
                             on_client: Callable[[PushClient, Ingest], None] | None = None,
                             **client_overrides: Any) -> None:
    """``--source push-ws=ws://host:port/push/ws,api_key=…``: ingest a push
    WebSocket until cancelled (see :func:`run_push_source`)."""
    await run_push_source(store, settings, spec, PushWsClient, on_client=on_client, **client_overrides)


def from_spec(spec: SourceSpec, settings: Settings) -> PushSource:
    """The registry's source factory for ``push-ws`` sources."""
    return push_source(spec, PushWsClient)
