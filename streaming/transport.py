"""The transport seam of the hub: how a connection's messages become bytes.

The hub (:mod:`streaming.hub`) never branches on a transport's name: a
:class:`~streaming.hub.Connection` holds a :class:`Framing` and asks it for
the bytes of each message — like centrifuge's ``Transport`` — and the
transport module that owns the socket (:mod:`streaming.sse`,
:mod:`streaming.ws`) writes those bytes. A new transport is one module and
one :class:`Framing`.

A framing says:

- ``name``: the transport's name (logs and metrics labels only);
- ``acks``: the client protocol acknowledges each subscription
  (``{"type":"ack","id","sub"}``) — a subscription id travels with every
  message (``per_sub``), so frames differ per subscription;
- ``shared``: frames are complete wire units (an SSE event, a WebSocket
  frame) that many connections can share by reference (a replay built
  once for a reconnect storm);
- :meth:`Framing.frame` / :meth:`Framing.frame_with`: one message's bytes,
  with the resume token (cached per message) or an explicit one.

A connection that owns its socket (:mod:`streaming.sockets`) is given to
the hub as a :class:`Sink`: the hub writes its frames itself, once per
loop turn (:meth:`streaming.hub.Hub.flush`), with no task. Otherwise (an
ASGI server that cannot hand the socket over) a :class:`Writer` says what
the transport does with the bytes and one :func:`write_loop` task per
connection drains its outbox through it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from streaming.encoding import Message, ws_frame

if TYPE_CHECKING:
    from streaming.hub import Connection

__all__ = ["FRAMINGS", "Framing", "SSE", "Sink", "WS_FRAMES", "WS_PAYLOADS", "Writer", "framing_of", "write_loop"]


class Framing:
    """The bytes of messages on one transport (see the module docstring)."""

    __slots__ = ("name", "acks", "per_sub", "shared")

    def __init__(self, name: str, *, acks: bool, per_sub: bool, shared: bool) -> None:
        self.name = name
        self.acks = acks
        self.per_sub = per_sub
        self.shared = shared

    def frame(self, msg: Message, sub_id: int | None, with_token: bool = False) -> bytes:
        """The bytes of ``msg`` (for subscription ``sub_id``; ``with_token``: carry the resume token)."""
        raise NotImplementedError

    def frame_with(self, msg: Message, sub_id: int | None, token: bytes | None) -> bytes:
        """Like :meth:`frame` with an explicit token (not cached: merged messages)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Framing({self.name})"


class _SSE(Framing):
    """Server-Sent Events: ``event: <type>\\nid: <token>\\ndata: <json>\\n\\n`` (no subscription id)."""

    __slots__ = ()

    def frame(self, msg: Message, sub_id: int | None, with_token: bool = False) -> bytes:
        return msg.sse(with_token)

    def frame_with(self, msg: Message, sub_id: int | None, token: bytes | None) -> bytes:
        return msg.sse_with(token)


class _WSFrames(Framing):
    """Complete WebSocket text frames (``{"sub":n,…,"token"}``), built once per node and subscription id."""

    __slots__ = ()

    def frame(self, msg: Message, sub_id: int | None, with_token: bool = False) -> bytes:
        return msg.ws_frame(sub_id, with_token)

    def frame_with(self, msg: Message, sub_id: int | None, token: bytes | None) -> bytes:
        return ws_frame(msg.ws_with(sub_id, token))


class _WSPayloads(Framing):
    """WebSocket message payloads (UTF-8 JSON), for a server that frames them itself."""

    __slots__ = ()

    def frame(self, msg: Message, sub_id: int | None, with_token: bool = False) -> bytes:
        return msg.ws(sub_id, with_token)

    def frame_with(self, msg: Message, sub_id: int | None, token: bytes | None) -> bytes:
        return msg.ws_with(sub_id, token)


SSE: Framing = _SSE("sse", acks=False, per_sub=False, shared=True)
WS_FRAMES: Framing = _WSFrames("ws", acks=True, per_sub=True, shared=True)
WS_PAYLOADS: Framing = _WSPayloads("ws", acks=True, per_sub=True, shared=False)

#: the default framing of each transport name (tests and tools that connect by name)
FRAMINGS: dict[str, Framing] = {"sse": SSE, "ws": WS_PAYLOADS}


def framing_of(kind: "str | Framing", ws_raw: bool = False) -> Framing:
    """A framing, or the default one of a transport name (``ws_raw``: WebSocket frames, not payloads).
    Raises ValueError for an unknown name."""
    if isinstance(kind, Framing):
        return kind
    if kind == "ws" and ws_raw:
        return WS_FRAMES
    try:
        return FRAMINGS[kind]
    except KeyError:
        raise ValueError(f"unknown transport {kind!r}; known: {', '.join(FRAMINGS)}") from None


# -- the socket side --------------------------------------------------------------------------------


class Sink(Protocol):
    """A socket the hub writes to directly (a stream that owns its socket,
    :mod:`streaming.sockets`): no task and no Event per connection. The hub
    calls :meth:`write` from its flush (once per loop turn, only while the
    socket is not paused); the socket reports flow control with
    :meth:`Connection.pause` / :meth:`Connection.resume` and its end with
    :meth:`Connection.lost`."""

    def write(self, frames: list[bytes], nbytes: int) -> None:
        """Write ``frames`` (``nbytes`` in all) now, in one go: a small write joined into one
        buffer, a big one by reference (``transport.writelines``)."""

    def finish(self, conn: "Connection") -> None:
        """The connection closed and everything queued was written: end the
        stream (final chunk, close frame) and close the socket."""

    def last_words(self, conn: "Connection", frames: list[bytes]) -> None:
        """The client stopped reading (missed deadline, eviction): write
        ``frames`` (the ``error``) and the end of the stream past flow control,
        close, and abort if it has not drained within a grace period."""

    def drained(self) -> None:
        """The outbox was taken: the socket may read client messages again."""

    def abort(self) -> None:
        """Drop the socket at once (nothing more is written): after a failure that leaves
        the stream in an unknown state."""


# -- the write loop --------------------------------------------------------------------------------


class Writer(Protocol):
    """What a transport does with a connection's bytes (the socket side of the seam)."""

    async def write(self, frames: list[bytes]) -> None:
        """Write ``frames`` in one go, after flow control (may block on the client)."""

    async def finish(self, conn: "Connection") -> None:
        """The connection closed normally: end the stream (final chunk, close frame)."""

    async def last_words(self, conn: "Connection") -> None:
        """A write was interrupted (missed deadline, eviction): write what is
        queued (the ``error``) and end the stream past flow control."""


async def write_loop(conn: "Connection", writer: Writer, timeout_s: float, what: str,
                     lost: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Drain ``conn``'s outbox through ``writer`` until the connection
    closes: everything queued per wake-up goes out in ONE write under the
    hub's send deadline (its watchdog interrupts a write blocked longer than
    ``timeout_s``; then :meth:`Writer.last_words`). ``lost``: the exceptions
    that mean the client is gone (the connection is closed 1006). ``what``
    names the stream in the deadline error ("stream", "connection")."""
    hub = conn.hub
    conn.writer = asyncio.current_task()
    try:
        while True:
            await conn.wait()
            queued_at = conn.queued_at
            frames = conn.take()
            if frames:
                conn.in_send = True
                conn.send_started = hub.loop_time()
                try:
                    for f in frames:
                        conn.sent_bytes += len(f)
                    await writer.write(frames)  # by reference: frames shared by many connections are not copied
                finally:
                    conn.in_send = False
                del frames  # nothing of this write stays referenced while the writer waits
                if hub.send_delay is not None:
                    hub.send_delay.observe(hub.loop_time() - queued_at)
            elif conn.closed:
                break
        await writer.finish(conn)
    except asyncio.CancelledError:
        if not conn.interrupted:
            raise
        conn.write_interrupted(what, timeout_s)
        try:
            await writer.last_words(conn)
        except Exception:  # the client is gone or stuck: nothing more to do
            pass
    except lost:
        conn.close(1006, "connection lost")
