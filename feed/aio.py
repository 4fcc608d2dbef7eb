"""Small asyncio helpers shared by sources and the API.

Python 3.11's ``asyncio.wait_for`` can turn an outside cancellation that
lands as its timeout fires into a ``TimeoutError`` (CPython gh-86296); a
loop that ignores its timeouts then swallows the cancellation and never
stops. These helpers use ``asyncio.timeout``, which tells the two apart.
"""

from __future__ import annotations

import asyncio
import errno
import socket


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` seconds pass; True if it
    was set. A cancellation of the caller always propagates."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11, ``asyncio.wait_for`` returns the result when the awaited
    operation completes in the same loop iteration as the cancel, dropping
    the CancelledError; redis-py's asyncio client wraps command sends in it,
    so cancelling a task that writes to Redis can be silently ignored (the
    task's ``cancelling()`` count stays raised). Call this after an await
    that may have swallowed one.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def listening_socket(host: str, port: int, backlog: int, *, busy: str, error: type[Exception],
                     what: str = "port") -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` (IPv6 when the host
    has a ``:``). Raises ``error`` ("<what> <port> on <host> is already in use:
    <busy>", ``busy`` saying what to do) when the address is in use, or with
    the OS's reason otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise error(f"{what} {port} on {host} is already in use: {busy}") from None
        raise error(f"cannot listen on {host}:{port}{'' if what == 'port' else f' ({what})'}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
