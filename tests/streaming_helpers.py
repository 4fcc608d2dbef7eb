"""Helpers for end-to-end streaming tests: a real uvicorn server on
127.0.0.1 (port 0), an SSE event parser, and a feed writer (Book + Store.apply)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import httpx
import msgspec
import uvicorn
from starlette.applications import Starlette

from feed.book import Book
from feed.models import (
    DELTA_DECODER,
    MARKET_DECODER,
    Delta,
    Market,
    MarketHeader,
    Selection,
    apply_delta,
)
from feed.normalise.base import MarketUpdate
from feed.store import Store
from streaming.app import StreamingServer

TIMEOUT_S = 10.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """Run ``app`` in uvicorn on 127.0.0.1, an unused port; yield the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning",
                            ws_max_size=1 << 20, timeout_graceful_shutdown=5)
    server = StreamingServer(config, app)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + TIMEOUT_S
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited before it started")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT_S)


def sans_as_of(msg: dict[str, Any]) -> dict[str, Any]:
    """A ``resumed`` message without its ``as_of`` (the server's send time: checked here to be a
    recent integer ms), to compare the rest whole."""
    assert isinstance(msg.get("as_of"), int) and abs(now_ms() - msg["as_of"]) < 60_000, msg
    return {k: v for k, v in msg.items() if k != "as_of"}


class SSEEvent(NamedTuple):
    event: str
    id: str | None
    data: dict[str, Any]


class SSEReader:
    """Parses an httpx streaming response into events; ``last_id`` follows
    the WHATWG rule (an event without ``id:`` keeps the previous one)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.last_id: str | None = None
        self.retry: int | None = None

    async def next(self, timeout_s: float = TIMEOUT_S) -> SSEEvent:
        return await asyncio.wait_for(self._next(), timeout_s)

    async def _next(self) -> SSEEvent:
        event, data, eid = "message", [], None
        async for line in self.lines:
            if line == "":
                if data:
                    if eid is not None:
                        self.last_id = eid
                    return SSEEvent(event, eid, msgspec.json.decode("\n".join(data)))
                event, data, eid = "message", [], None
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                eid = value
            elif field == "retry":
                self.retry = int(value)
        raise EOFError("stream ended")

    async def until(self, pred: Any, timeout_s: float = TIMEOUT_S) -> SSEEvent:
        """The next event for which ``pred(event)`` holds (others are skipped)."""
        async def run() -> SSEEvent:
            while True:
                ev = await self._next()
                if pred(ev):
                    return ev
        return await asyncio.wait_for(run(), timeout_s)


class LocalBook:
    """A client-side book rebuilt from snapshot + delta messages with apply_delta."""

    def __init__(self) -> None:
        self.markets: dict[str, Market] = {}

    def on(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "snapshot":
            self.markets = {m["market_id"]: msgspec.convert(m, Market) for m in msg["markets"]}
        elif msg["type"] == "delta":
            d = DELTA_DECODER.decode(msgspec.json.encode(msg))
            new = apply_delta(self.markets.get(d.market_id), d)
            if new is not None:
                self.markets[d.market_id] = new
        elif msg["type"] == "removed":  # left what the credential's tenant may see
            self.markets.pop(msg["market_id"], None)


class Feed:
    """Writes realistic deltas: Book → Store.apply, timestamps = now."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.book = Book()
        self.session: str | None = None  # the upstream session stamped on what is written

    def _header(self, mid: str, **changes: Any) -> MarketHeader:
        m = self.book.markets.get(mid)
        base = m.header() if m is not None else MarketHeader()
        return msgspec.structs.replace(base, **changes)

    def image(self, mid: str, *, sport: str = "soccer", event: str = "e1", in_play: bool = False,
              prices: dict[str, float] | None = None, source: str = "t", **header: Any) -> MarketUpdate:
        prices = prices or {"1": 2.0, "2": 3.5}
        t = now_ms()
        return MarketUpdate(
            market_id=mid, source=source, image=True,
            header=MarketHeader(sport=sport, event_id=event, event_name=f"Event {event}", competition="c1",
                                in_play=in_play, status="OPEN", market_type="MATCH_ODDS", **header),
            selections=[Selection(selection_id=k, name=f"sel {k}", price=v, back=[(v, 10.0)])
                        for k, v in prices.items()],
            source_ts=t, received_at=t + 1,
        )

    def price(self, mid: str, sel: str, price: float, source: str = "t", *,
              received_at: int | None = None) -> MarketUpdate:
        t = now_ms() if received_at is None else received_at - 1
        return MarketUpdate(market_id=mid, source=source, image=False, header=None,
                            selections=[Selection(selection_id=sel, name=f"sel {sel}", price=price,
                                                  back=[(price, 10.0)])],
                            source_ts=t, received_at=t + 1)

    def header(self, mid: str, source: str = "t", **changes: Any) -> MarketUpdate:
        t = now_ms()
        return MarketUpdate(market_id=mid, source=source, image=False, header=self._header(mid, **changes),
                            selections=[], source_ts=t, received_at=t + 1)

    async def write(self, *updates: MarketUpdate) -> list[Delta]:
        """Apply updates through the Book and store them as one batch (one log entry per partition)."""
        stored_at = now_ms()
        deltas = [d for u in updates if (d := self.book.apply(u, stored_at, self.session)) is not None]
        await self.store.apply(deltas, self.book.markets)
        return deltas


def market_of(body: bytes) -> Market:
    return MARKET_DECODER.decode(body)


async def eventually(pred: Any, timeout_s: float = TIMEOUT_S, what: str = "condition", *,
                     interval_s: float = 0.02) -> Any:
    """Poll a sync or async predicate until it is truthy and return its value;
    fail the test with ``what`` after ``timeout_s`` (bounded). Shared by every
    test module that waits for something."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def cancel_and_wait(task: asyncio.Task[Any], what: str = "the task", timeout_s: float = 30.0) -> None:
    """Cancel ``task`` and wait for it to end (its error, if any, is dropped: the test has
    asserted what it needed); fail with every task's stack when it does not end within
    ``timeout_s`` — a cancel swallowed or a close that hangs is then named, instead of the test
    hanging until pytest-timeout prints only the event loop's select."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        if not task.cancelled():
            task.exception()  # (retrieved: no "exception never retrieved" warning)
        return
    import io

    buf = io.StringIO()
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task():
            print(f"--- {t.get_name()}", file=buf)
            t.print_stack(limit=12, file=buf)
    raise AssertionError(f"{what} did not end within {timeout_s:g} s of its cancel; the tasks:\n"
                         f"{buf.getvalue()[-12_000:]}")


def make_app(redis_url: str | None = None, *, store: Store | None = None, heartbeat_ms: int = 60_000,
             settings: Any = None, **options: Any) -> Starlette:
    """create_app with test-friendly timings (fast health refresh, short blocks)."""
    from feed.settings import Settings
    from streaming.app import create_app
    from streaming.state import NodeOptions

    opts = {"health_refresh_ms": 100, "read_block_ms": 200, **options}
    return create_app(settings or Settings(heartbeat_ms=heartbeat_ms), store=store, redis_url=redis_url,
                      options=NodeOptions(**opts))


async def sse_deltas(sse: SSEReader, n: int, timeout_s: float = TIMEOUT_S) -> list[SSEEvent]:
    """The next ``n`` delta events (heartbeats skipped; anything else fails)."""
    out: list[SSEEvent] = []

    async def run() -> None:
        while len(out) < n:
            ev = await sse._next()
            if ev.event == "heartbeat":
                continue
            assert ev.event == "delta", ev
            out.append(ev)
    await asyncio.wait_for(run(), timeout_s)
    return out


@asynccontextmanager
async def started(server: Any) -> AsyncIterator[Any]:
    """``await server.start()``, yield it, ``await server.stop()`` (any simulator)."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def running_source(store: Store, text: str, settings: Any = None) -> AsyncIterator[tuple[Any, Any]]:
    """Run the ``--source`` spec ``text`` through the registry and the real pipeline into ``store``
    until the block ends; yield (source, pipeline). Fails when the source cannot be built or its run
    ends before the block does."""
    from feed.pipeline import run_spec
    from feed.settings import Settings
    from feed.sources.spec import parse_source_spec

    got: list[tuple[Any, Any]] = []
    task = asyncio.create_task(run_spec(store, settings or Settings(), parse_source_spec(text),
                                        on_source=lambda s, p: got.append((s, p))))
    try:
        await eventually(lambda: got or task.done(), 20, "the source built")
        assert got, task.exception()
        yield got[0]
        assert not task.done(), task.exception()
    finally:
        await cancel_and_wait(task, "the source")


class ScriptedSSEServer:
    """A loopback HTTP server speaking oddsfeed's SSE wire format from scripts (the provider's
    side is ours here: a client test needs exact frames): stream connection i plays
    ``scripts[i]`` (SSE frames; none past the list) and then stays open, silent, until the client
    goes away. Records each stream request's Last-Event-ID, its arrival time and its writer."""

    def __init__(self, scripts: list[list[bytes]]) -> None:
        self.scripts = scripts
        self.last_event_ids: list[str | None] = []
        #: when each stream request's connection was accepted (``time.time()``, s; the clock of a log
        #: record's ``created``), in the order of :attr:`last_event_ids` — exact, unlike a poll's
        #: ``time.time()`` after noticing it (which may run late on a loaded machine)
        self.arrived_at: list[float] = []
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.streams: list[asyncio.StreamWriter] = []  # the stream connections', in order
        #: when set, the next stream connection plays this instead (then it is cleared)
        self.next_script: list[bytes] | None = None

    async def __aenter__(self) -> "ScriptedSSEServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = time.time()
        self.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"GET /v1/stream"):
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        lei = None
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"last-event-id:"):
                lei = line.split(b":", 1)[1].strip().decode()
        self.last_event_ids.append(lei)
        self.arrived_at.append(accepted)
        self.streams.append(writer)
        n = len(self.last_event_ids)
        script = self.scripts[n - 1] if n <= len(self.scripts) else []
        if self.next_script is not None:
            script, self.next_script = self.next_script, None
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
                     b"connection: close\r\n\r\nretry: 2000\n\n")
        for frame in script:
            writer.write(frame)
        with contextlib.suppress(Exception):
            await writer.drain()
            await reader.read()  # silent until the client goes away
