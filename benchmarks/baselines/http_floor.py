"""The Python floor of a price check: a bare ``asyncio.Protocol`` HTTP/1.1
server on the API node's event loop (``--loop``) that reads each ``POST``
(head up to the blank line, ``Content-Length`` body) and answers it with one
pre-built response, one ``transport.write`` per request.

Peer of the API node in ``benchmarks/price_check.py`` (issue 11's "API node
CPU per check ≤ 100 µs"): the same load generator sends it the same
requests, and its answer is a byte-for-byte copy of a real price-check answer
the node gave (status line, headers, body), so the two differ only by what
the node does per request — parse and check the head within limits, trace,
authenticate, decode the body, look the market up, judge the price, encode
the answer, keep the connection's deadlines. Nothing else: no limits, no
deadlines, no parsing beyond finding the body; a malformed request closes
the connection. The least a Python process can do per request/response on
this machine: read syscall, one protocol callback, write syscall.

Run: ``python -m benchmarks.baselines.http_floor --port N --answer FILE [--loop asyncio|uvloop]``
(FILE: the whole HTTP response to send, bytes; ``--loop``: the event loop, default uvloop when
installed, as the API node — ``benchmarks/price_check.py`` passes its own ``--loop``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path


class FloorHTTP(asyncio.Protocol):
    """One keep-alive connection: every whole request in the buffer gets ``answer``."""

    __slots__ = ("answer", "buf", "transport")

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        transport = self.transport
        assert transport is not None
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            i = buf.find(b"Content-Length: ", 0, end)
            if i < 0:
                transport.close()
                return
            j = buf.find(b"\r\n", i, end + 2)
            total = end + 4 + int(buf[i + 16:j])
            if len(buf) < total:
                break
            transport.write(self.answer)
            buf = buf[total:]
        self.buf = buf


async def serve(port: int, answer: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorHTTP(answer), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--answer", type=Path, required=True, help="file holding the whole HTTP response")
    p.add_argument("--loop", default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
                   choices=["asyncio", "uvloop"], help="event loop (default: uvloop when installed, as the API node)")
    a = p.parse_args()
    answer = a.answer.read_bytes()
    if a.loop == "uvloop":
        import uvloop

        uvloop.run(serve(a.port, answer))
    else:
        asyncio.run(serve(a.port, answer))


if __name__ == "__main__":
    main()
