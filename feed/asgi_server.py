"""An ASGI app served by uvicorn on a socket of our own, inside a running loop.

Used by the simulators (HTTP providers, push, UOF recovery API) and the
webhook source. :class:`LocalServer` binds the address itself (port 0 = any
free one; ``port`` is set after :meth:`LocalServer.start`), never touches
the process's signal handlers, and starts within a bounded wait or raises.

The socket is created with ``IPPROTO_TCP``: asyncio sets ``TCP_NODELAY`` on
accepted connections only when the listening socket says it is TCP, and
without it every answer written in two parts (headers, body) waits ~40 ms
for the peer's delayed ACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

__all__ = ["LocalServer", "QuietServer", "tcp_listener"]


class QuietServer(uvicorn.Server):
    """uvicorn that leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def tcp_listener(host: str, port: int, *, backlog: int = 256) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (IPv6 when the
    host has a colon; ``SO_REUSEADDR``; ``TCP_NODELAY`` for what it accepts).
    Raises OSError (address in use, cannot assign)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class LocalServer:
    """``app`` on ``host:port`` (see the module docstring).

    config: extra :class:`uvicorn.Config` keyword arguments (``ws=``,
    ``timeout_keep_alive=`` …); access log off, log level warning, no
    lifespan, 1 s graceful shutdown unless given. name: the serving task's
    name (logs). start_timeout_s: :meth:`start` raises RuntimeError when
    uvicorn has not started by then.
    """

    def __init__(self, app: Any, host: str, port: int = 0, *, name: str = "asgi", backlog: int = 256,
                 start_timeout_s: float = 5.0, **config: Any) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self.backlog = backlog
        self.start_timeout_s = start_timeout_s
        self.config = {"lifespan": "off", "log_level": "warning", "access_log": False,
                       "timeout_graceful_shutdown": 1, **config}
        self.server: QuietServer | None = None
        self.task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> None:
        """Bind and serve; returns once uvicorn accepts connections. Raises
        OSError (bind) or RuntimeError (did not start in time)."""
        sock = self._sock = tcp_listener(self.host, self.port, backlog=self.backlog)
        self.port = sock.getsockname()[1]
        server = self.server = QuietServer(uvicorn.Config(self.app, **self.config))
        task = self.task = asyncio.create_task(server.serve(sockets=[sock]), name=self.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"{self.name}: the server ended before listening")
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"{self.name}: the server did not start within {self.start_timeout_s} s")
            await asyncio.sleep(0.01)

    @property
    def serving(self) -> bool:
        """Started and not ended."""
        return self.server is not None and self.server.started and self.task is not None and not self.task.done()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ask uvicorn to exit, wait up to ``timeout_s`` (then cancel), close the socket. Idempotent."""
        server, task, sock = self.server, self.task, self._sock
        self.server = self.task = self._sock = None
        if server is not None:
            server.should_exit = True
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait({task}, timeout=timeout_s)  # (not wait_for: it can drop a cancel — feed.aio)
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if sock is not None:
            sock.close()
