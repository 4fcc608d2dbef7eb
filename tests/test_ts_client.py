"""The TypeScript client (clients/ts) against a real ``oddsfeed run``.

Wraps the package's own tests: ``npm ci`` (package-lock.json is committed; needs the npm
registry), ``npm run build`` (tsc), then ``npm test`` (Node's built-in test runner on the compiled
tests) with ``ODDSFEED_URL`` pointing at an ``oddsfeed run`` started here on a free loopback port.
Also checks that regenerating ``src/schema.ts`` from this checkout's OpenAPI document gives the
committed file. Skips with a message when ``node``/``npm`` are missing or Node is older than 20
(``.ci/run`` installs Debian's nodejs + npm when it can).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "clients" / "ts"


def _node_or_skip() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("needs node and npm (Node.js >= 20) on PATH for the TypeScript client tests; "
                    "install with: sudo apt-get install -y nodejs npm (.ci/run does it as root)")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    m = re.match(r"v(\d+)\.", out)
    if not m or int(m.group(1)) < 20:
        pytest.skip(f"needs Node.js >= 20 for the TypeScript client tests, found {out or 'unknown'}")
    return node, npm


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=PKG, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        out = "".join(x if isinstance(x, str) else (x or b"").decode(errors="replace") for x in (exc.stdout, exc.stderr))
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s:\n{out[-5000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_generated_types_match_the_openapi_document() -> None:
    node, _ = _node_or_skip()
    env = {**os.environ, "ODDSFEED_PYTHON": sys.executable}
    r = _run([node, "scripts/gen-types.mjs", "--check", "src/schema.ts"], 60, env)
    assert r.returncode == 0, f"src/schema.ts is stale: run `npm run gen` in clients/ts\n{r.stdout}{r.stderr}"


@pytest.fixture(scope="module")
def built() -> str:
    _, npm = _node_or_skip()
    install = ["ci"] if (PKG / "package-lock.json").is_file() else ["install"]
    r = _run([npm, *install, "--no-audit", "--no-fund"], 600)
    assert r.returncode == 0, f"npm {install[0]} failed (needs the npm registry):\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    r = _run([npm, "run", "build"], 300)
    assert r.returncode == 0, f"npm run build (tsc) failed:\n{r.stdout[-5000:]}{r.stderr[-3000:]}"
    return npm


@pytest.fixture
def oddsfeed_url(tmp_path: Path, request: pytest.FixtureRequest):
    """An ``oddsfeed run`` on a free loopback port, started before ``built``: the server boots
    (~3 s of imports and startup) while npm ci and tsc run."""
    _node_or_skip()  # (skip before starting anything)
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "feed", "run", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(tmp_path / "var"), "--metrics-port", "0", "--sim-rate", "100", "--sim-seed", "11",
         "--sim-push"],  # the push simulator's matches carry scores: the client's event-state tests need them
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        request.getfixturevalue("built")  # (module-scoped: built once, while this server boots)
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and not ready and proc.poll() is None:
            try:
                markets = httpx.get(f"{base}/v1/markets", timeout=2).json()["markets"]
                ready = any(m["status"] == "OPEN" for m in markets)
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if not ready:
                time.sleep(0.2)
        if not ready:
            proc.kill()
            out, _ = proc.communicate(timeout=20)
            pytest.fail(f"oddsfeed run served no open markets within 60 s:\n{out[-3000:]}")
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


@pytest.mark.timeout(900)
def test_typescript_client_against_oddsfeed_run(oddsfeed_url: str, request: pytest.FixtureRequest) -> None:
    built: str = request.getfixturevalue("built")  # (set up by oddsfeed_url, before its readiness wait)
    env = {**os.environ, "ODDSFEED_URL": oddsfeed_url}
    r = _run([built, "test"], 600, env)
    out = r.stdout + r.stderr
    summary = dict(re.findall(r"^# (tests|pass|fail|cancelled|skipped) (\d+)$", out, re.MULTILINE))
    assert r.returncode == 0, f"npm test failed ({summary}):\n{out[-8000:]}"
    assert summary.get("fail") == "0" and summary.get("cancelled") == "0", out[-8000:]
    assert int(summary.get("pass", "0")) >= 15, f"fewer Node tests ran than expected: {summary}"
