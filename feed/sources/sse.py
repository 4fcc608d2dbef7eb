"""Push consumer over Server-Sent Events (httpx streaming), and an SSE parser.

:class:`SSEParser` turns ``text/event-stream`` bytes into events by the
WHATWG rules (HTML Living Standard, "Server-sent events", *interpreting an
event stream*):

- lines end with CRLF, LF or CR (a CR at the end of one chunk and an LF at
  the start of the next are one line end); a leading UTF-8 BOM is dropped;
- a blank line dispatches the event: ``data`` lines joined with LF (the last
  LF removed); nothing is dispatched when there was no ``data``; the event
  type defaults to ``message`` and resets after each dispatch;
- ``field: value`` with one optional space after the colon; a line without a
  colon is a field with an empty value; lines starting with ``:`` are
  comments; unknown fields are ignored;
- ``id`` sets the last event id (kept across events; a value containing NUL
  is ignored; an empty value clears it); ``retry`` with ASCII digits only
  sets the reconnection time (ms);
- an unterminated last event at end of stream is discarded.

The parser works on bytes (the data goes to the normaliser as raw bytes,
which judges the UTF-8 and the JSON).

:class:`PushSseClient` is :class:`feed.sources.push.PushClient` over
``GET <url>`` with ``Accept: text/event-stream``, the API key in
``X-Api-Key`` and the cursor in ``Last-Event-ID``; each event's ``data`` is
one push message. The server's ``retry`` is the floor of the reconnect
delay. ``run_push_sse_source(store, settings, spec)`` wires it to an
:class:`~feed.ingest.Ingest` (see :func:`feed.sources.push.run_push_source`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import httpx

from feed.errors import FatalSourceError, RetryableSourceError
from feed.ingest import Ingest
from feed.settings import Settings
from feed.sources.spec import SourceSpec
from feed.sources.push import PushClient, PushSource, Received, Receiver, _LinkLost, push_source, run_push_source
from feed.store import Store

__all__ = ["from_spec", "PushSseClient", "SSEError", "SSEEvent", "SSEParser", "run_push_sse_source"]

logger = logging.getLogger(__name__)

#: longest line or event the parser buffers, bytes
MAX_EVENT_BYTES = 16 << 20
_QUEUE_CHUNKS = 256


class SSEError(RetryableSourceError, ValueError):
    """The byte stream breaks the event-stream format (or our size limit)."""


class SSEEvent(NamedTuple):
    """One dispatched event. ``id``: the last event id at dispatch (None = none)."""

    event: str
    data: bytes
    id: str | None


class SSEParser:
    """Incremental ``text/event-stream`` parser (see the module docstring).

    ``feed(chunk)`` returns the events the chunk completed; ``last_event_id``
    and ``retry_ms`` hold the stream's state.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self._buf = b""
        self._skip_lf = False
        self._started = False
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        if not self._started:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._buf = buf
                return []
            self._started = True
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        events: list[SSEEvent] = []
        pos = 0
        n = len(buf)
        while pos < n:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else n)
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt < n:
                    if buf[nxt:nxt + 1] == b"\n":
                        nxt += 1
                else:
                    self._skip_lf = True  # a CR ends this chunk: an LF opening the next one belongs to it
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(buf[pos:end], events)
            pos = nxt
        self._buf = buf[pos:]
        if len(self._buf) > self.max_event_bytes:
            raise SSEError(f"line longer than {self.max_event_bytes} bytes")
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                data = b"\n".join(self._data)
                events.append(SSEEvent(self._event.decode("utf-8", "replace") or "message", data,
                                       self.last_event_id))
            self._event, self._data, self._size = b"", [], 0
            return
        if line[:1] == b":":
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._size += len(value) + 1
            if self._size > self.max_event_bytes:
                raise SSEError(f"event data longer than {self.max_event_bytes} bytes")
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id" and b"\x00" not in value:
            self.last_event_id = value.decode("utf-8", "replace") or None
        elif name == b"retry" and value.isdigit():
            self.retry_ms = int(value)


class PushSseClient(PushClient):
    """:class:`~feed.sources.push.PushClient` over SSE (httpx streaming)."""

    kind = "push-sse"

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Receiver]:
        assert self._http is not None
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self._headers()}
        if self._cursor:
            headers["Last-Event-ID"] = self._cursor
        logger.info("push %s: connecting to %s (%s)", self.name, self.url,
                    f"resuming after {self._cursor}" if self._cursor else "fresh")
        timeout = httpx.Timeout(self._connect_timeout_s, read=None)
        async with asyncio.timeout(self._connect_timeout_s):
            resp = await self._http.send(self._http.build_request("GET", self.url, headers=headers, timeout=timeout),
                                         stream=True)
        try:
            if resp.status_code in (401, 403):
                raise FatalSourceError(f"push {self.name}: the provider refused the api key "
                                       f"(http {resp.status_code})", code="unauthorized")
            if resp.status_code != 200:
                raise _LinkLost(f"http {resp.status_code}")
            ctype = resp.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                raise _LinkLost(f"not an event stream: content-type {ctype!r}")
            parser = SSEParser()
            queue: asyncio.Queue[tuple[list[SSEEvent], int] | BaseException | None] = asyncio.Queue(_QUEUE_CHUNKS)
            clock = self._clock_ms

            async def pump() -> None:
                try:
                    async for chunk in resp.aiter_bytes():
                        events = parser.feed(chunk)
                        if parser.retry_ms is not None:
                            self.retry_ms = parser.retry_ms
                        if events:
                            await queue.put((events, clock()))
                    await queue.put(None)
                except asyncio.CancelledError:
                    raise
                except (httpx.HTTPError, SSEError, OSError) as exc:
                    await queue.put(exc)

            reader = asyncio.create_task(pump(), name=f"sse-{self.name}")

            ended: list[BaseException | None] = []  # the end of the stream, once seen while draining

            def unpack(item: tuple[list[SSEEvent], int] | BaseException | None, out: Received) -> None:
                if item is None:
                    raise _LinkLost("stream ended by the provider")
                if isinstance(item, BaseException):
                    raise _LinkLost(f"stream broke: {item or type(item).__name__}")
                events, recv_ms = item
                out.extend((ev.data, recv_ms) for ev in events)

            async def recv(timeout_s: float) -> Received:
                if ended:
                    unpack(ended[0], [])
                try:
                    async with asyncio.timeout(timeout_s):
                        item = await queue.get()
                except TimeoutError:
                    return []
                out: Received = []
                unpack(item, out)
                while not queue.empty() and len(out) < 512:
                    nxt = queue.get_nowait()
                    if nxt is None or isinstance(nxt, BaseException):
                        ended.append(nxt)  # hand over what came first; the end shows on the next call
                        break
                    unpack(nxt, out)
                return out

            try:
                yield recv
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        finally:
            await resp.aclose()


async def run_push_sse_source(store: Store, settings: Settings, spec: SourceSpec, *,
                              on_client: Callable[[PushClient, Ingest], None] | None = None,
                              **client_overrides: Any) -> None:
    """``--source push-sse=http://host:port/push/sse,api_key=…``: ingest a push
    SSE stream until cancelled (see :func:`feed.sources.push.run_push_source`)."""
    await run_push_source(store, settings, spec, PushSseClient, on_client=on_client, **client_overrides)


def from_spec(spec: SourceSpec, settings: Settings) -> PushSource:
    """The registry's source factory for ``push-sse`` sources."""
    return push_source(spec, PushSseClient)
