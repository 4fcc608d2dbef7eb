"""CPU per delta-log read round trip on the node's side: redis-py's path against a raw protocol.

What a partition reader paid per ``XREAD`` through redis-py's connection (``pack_command``,
``send_packed_command``, ``read_response``) against :class:`feed.store.RespConnection`, the bare
connection the log tails use now (an ``asyncio.Protocol`` feeding ``hiredis.Reader``, the command
packed once here); both under the tails' reply deadline — ``asyncio.timeout`` per read for redis-py's,
the connection's one lazy timer for the bare one (``RespConnection.reply``). Both read the same
one-entry log of an embedded redis-server over its Unix socket, ``--reads`` times after a warm-up,
on uvloop; the figure is this process's CPU (``time.process_time``) per round trip — what a node
would save per read, not the server's cost. Bounded: ``--reads`` round trips per path.

Usage::

    python benchmarks/xread_path.py [--reads 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from benchmarks import plots  # noqa: E402
from feed.embedded_redis import EmbeddedRedis  # noqa: E402
from feed.store import RespConnection, Store, _reply, log_key  # noqa: E402

WARMUP = 500


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
        conn = await tail._pool.get_connection()  # redis-py's connection, as the tails had it

        async def redis_py() -> None:
            await conn.send_packed_command(conn.pack_command(*cmd))
            await _reply(conn, 5.0)

        bare = RespConnection.for_pool(store.redis.connection_pool, dict(store.redis.connection_pool.connection_kwargs))
        assert bare is not None, "a plain unix:// store takes the bare connection"
        packed = bare.pack_command(*cmd)

        async def raw() -> None:
            await bare.send_packed_command(packed)  # the command packed once, as a tail could
            await _reply(bare, 5.0)

        out = []
        for fn in (redis_py, raw):
            for _ in range(WARMUP):
                await fn()
            c0 = time.process_time()
            for _ in range(reads):
                await fn()
            out.append((time.process_time() - c0) / reads * 1e6)
        await bare.disconnect()
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
          f"redis-py path {rp:.1f} µs, RespConnection {raw:.1f} µs ({raw / rp:.2f}×)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
