"""A private RabbitMQ node for the AMQP integration tests.

:func:`rabbitmq_url` (a session-scoped pytest fixture; import it into a test
module) starts Debian's ``rabbitmq-server`` (``.ci/install-rabbitmq``
installs it) on free ports, with its own node name, Mnesia and log
directories, Erlang cookie (``HOME``), plugins file and ``epmd`` port in a
temporary directory, so it never touches a system node. Everything it
listens on is on 127.0.0.1: AMQP, ``epmd`` and the Erlang distribution
ports (the node's and rabbitmqctl's). It waits — a
bounded poll of the AMQP handshake, not a blind sleep — until the broker
answers, yields ``amqp://guest:guest@127.0.0.1:<port>/``, and stops the node
and its ``epmd`` at the end of the session. Without ``rabbitmq-server`` the
tests that use it skip, saying how to install it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: where Debian's package puts the start script (the /usr/sbin wrapper switches to the rabbitmq user)
_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server")
STARTUP_S = 60.0


def server_binary() -> str | None:
    """The rabbitmq-server start script, or None when it is not installed."""
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("rabbitmq-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_amqp(port: int) -> bool:
    """The broker answers the AMQP 0-9-1 protocol header with Connection.Start (a method frame)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(1.0)
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1)[:1] == b"\x01"
    except OSError:
        return False


#: Erlang distribution (the node's and each CLI tool's) on loopback only (the default is every interface)
LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


def _with_loopback_dist(args: str) -> str:
    return f"{args} {LOOPBACK_DIST}".strip()


class RabbitNode:
    """One private node (see the module docstring). ``start()`` / ``stop()``; ``url``."""

    def __init__(self, base: Path, binary: str) -> None:
        self.base = base
        self.binary = binary
        self.port = _free_port()
        self.dist_port = _free_port()
        self.epmd_port = _free_port()
        self.name = f"oddsfeed-test-{os.getpid()}@localhost"
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self.log = base / "server.out"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        b = self.base
        (b / "enabled_plugins").write_text("[].\n")
        return {
            **os.environ,
            "HOME": str(b),  # the Erlang cookie goes here
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_PID_FILE": str(b / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq"),  # absent: defaults
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_LOGS": "-",
            # nothing of the node beyond loopback: epmd (also one an Erlang tool would start itself),
            # the node's distribution listener and the one of each rabbitmqctl run (its own Erlang node)
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _with_loopback_dist(os.environ.get(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "")),
            "RABBITMQ_CTL_ERL_ARGS": _with_loopback_dist(os.environ.get("RABBITMQ_CTL_ERL_ARGS", "")),
        }

    def start(self) -> None:
        env = self.env()
        epmd = shutil.which("epmd") or "epmd"
        self._epmd = subprocess.Popen([epmd, "-address", "127.0.0.1", "-port", str(self.epmd_port)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        with open(self.log, "wb") as out:
            self._server = subprocess.Popen([self.binary], env=env, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=self.base, start_new_session=True)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                break
            if _answers_amqp(self.port):
                return
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"rabbitmq-server did not answer on port {self.port} within {STARTUP_S:g} s:\n{tail}")

    def stop(self) -> None:
        for proc in (self._server, self._epmd):
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the script, beam.smp and its children
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._server = self._epmd = None


@pytest.fixture(scope="session")
def rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's private RabbitMQ node (skips without rabbitmq-server)."""
    binary = server_binary()
    if binary is None:
        pytest.skip("needs Debian's rabbitmq-server (install it with: bash .ci/install-rabbitmq, as root)")
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"), binary)
    node.start()
    try:
        yield node.url
    finally:
        node.stop()
