"""CPU per delta-log read round trip on the node's side: redis-py's path against a raw protocol.

What a partition reader pays per ``XREAD`` (``feed.store.LogTail.read``: redis-py's connection,
``pack_command``, ``send_packed_command``, ``read_response`` under ``asyncio.timeout``) against the
least a Python client can do (an ``asyncio.Protocol`` feeding ``hiredis.Reader``, the command packed
once, one ``transport.write``, a future per reply and a timer as the deadline). Both read the same
one-entry log of an embedded redis-server over its Unix socket, ``--reads`` times after a warm-up,
on uvloop; the figure is this process's CPU (``time.process_time``) per round trip — what a node
would save per read, not the server's cost. Bounded: ``--reads`` round trips per path.

Usage::

    python benchmarks/xread_path.py [--reads 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hiredis  # noqa: E402
import uvloop  # noqa: E402

from benchmarks import plots  # noqa: E402
from feed.embedded_redis import EmbeddedRedis  # noqa: E402
from feed.store import Store, _reply, log_key  # noqa: E402

WARMUP = 500


class _Raw(asyncio.Protocol):
    """A minimal RESP client: replies parsed by hiredis, one outstanding request."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.fut: asyncio.Future[Any] | None = None
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # (uvloop's transports are not asyncio.Transport subclasses)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        reply = self.reader.gets()
        if reply is not False and self.fut is not None and not self.fut.done():
            self.fut.set_result(reply)


def _pack(*args: object) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def _main(reads: int) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(prefix="oddsfeed-xread-"))
    redis = EmbeddedRedis(work / "redis", appendonly=False)
    url = redis.start()
    try:
        store = await Store.open(url)
        key = log_key(0)
        await store.redis.xadd(key, {"d": b"[]"}, id="1-0")
        cmd = ("XREAD", "COUNT", 1000, "BLOCK", 1000, "STREAMS", key, "0-0")  # an entry is there: no wait
        tail = store.tail(0)
        assert tail._pool is not None
        conn = await tail._pool.get_connection()

        async def redis_py() -> None:
            await conn.send_packed_command(conn.pack_command(*cmd))
            await _reply(conn, 5.0)

        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_unix_connection(_Raw, url.removeprefix("unix://"))
        packed = _pack(*cmd)

        async def raw() -> None:
            proto.fut = loop.create_future()
            transport.write(packed)
            deadline = loop.call_later(5.0, lambda: None)
            try:
                await proto.fut
            finally:
                deadline.cancel()

        out = []
        for fn in (redis_py, raw):
            for _ in range(WARMUP):
                await fn()
            c0 = time.process_time()
            for _ in range(reads):
                await fn()
            out.append((time.process_time() - c0) / reads * 1e6)
        transport.close()
        await tail.aclose()
        await store.close()
        return out[0], out[1]
    finally:
        redis.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reads", type=int, default=20_000, help="round trips per path (default 20000)")
    args = p.parse_args()
    print(plots.header("xread path benchmark"), flush=True)
    rp, raw = uvloop.run(_main(max(1000, min(args.reads, 1_000_000))))
    print(f"CPU per XREAD round trip (this process, {args.reads} reads each, uvloop, unix socket): "
          f"redis-py path {rp:.1f} µs, raw protocol + hiredis {raw:.1f} µs ({raw / rp:.2f}×)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
