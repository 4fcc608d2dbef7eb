"""A local Redis Cluster for tests: masters on loopback from the embedded redis-server."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from feed.embedded_redis import redis_server_binary, start_cluster_node


def start_local_cluster(data_root: Path, servers: list[Any], *, masters: int = 3) -> str:
    """Start ``masters`` cluster nodes under ``data_root`` (each appended to ``servers`` as it
    starts, so the caller's ``finally`` stops every one — ``server.stop()``), join them into one
    cluster without replicas and wait (≤ 30 s) until every node reports ``cluster_state:ok``.
    Returns a seed URL (``redis://127.0.0.1:<port>/0``). Skips the test when ``redis-cli`` is
    not beside ``redis-server``; fails when the cluster does not form."""
    cli = str(Path(redis_server_binary()).with_name("redis-cli"))
    if not os.path.exists(cli):
        pytest.skip("redis-cli not found beside redis-server")
    for _ in range(masters):
        servers.append(start_cluster_node(data_root, extra_args=("--cluster-node-timeout", "5000")))
    out = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
                          "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr[-500:]
    deadline = time.monotonic() + 30
    while not all("cluster_state:ok" in subprocess.run([cli, "-p", str(s.port), "cluster", "info"],
                                                       capture_output=True, text=True, timeout=10).stdout
                  for s in servers):
        assert time.monotonic() < deadline, "the cluster did not form within 30 s"
        time.sleep(0.1)
    return f"redis://127.0.0.1:{servers[0].port}/0"
