"""The TypeScript client (clients/ts) against a real ``oddsfeed run``.

Wraps the package's own tests: ``npm ci`` (package-lock.json is committed; needs the npm
registry), ``npm run build`` (tsc), then ``npm test`` (Node's built-in test runner on the compiled
tests) with ``ODDSFEED_URL`` pointing at an ``oddsfeed run`` started here on a free loopback port.
Also checks that regenerating ``src/schema.ts`` from this checkout's OpenAPI document gives the
committed file. Skips with a message when ``node``/``npm`` are missing or Node is older than 20
(``.ci/run`` installs Debian's nodejs + npm when it can).
"""

from __future__ import annotations

import json
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


# -- the client's own rules, offline: compiled with the package's tsc, no server, no npm registry ------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/ts compiled (src and test) into a temporary directory with the package's own tsc
    (clients/ts/node_modules: skips without it — ``npm ci`` there)."""
    node, _ = _node_or_skip()
    tsc = PKG / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.is_file():
        pytest.skip("needs clients/ts/node_modules (run `npm ci` in clients/ts)")
    out = tmp_path_factory.mktemp("ts-client")
    r = _run([node, str(tsc), "-p", "tsconfig.json", "--outDir", str(out)], 300)
    assert r.returncode == 0, f"tsc failed:\n{r.stdout[-5000:]}{r.stderr[-3000:]}"
    (out / "package.json").write_text('{"type": "module"}\n')
    return out


@pytest.mark.timeout(180)
def test_typescript_client_rules_without_a_server(compiled: Path) -> None:
    """The Node tests that need no server: the book's delta and seq rules, kick-off staleness, race
    states, and a late stream (ages count the stream's lag; lagging past the in-play limit is not
    live; the clock offset measured afresh per connection) and the local market_type filter."""
    node, _ = _node_or_skip()
    files = [str(compiled / "test" / f"{name}.test.js") for name in ("lag", "kickoff", "book", "race")]
    r = _run([node, "--test", "--test-concurrency=1", *files], 120)
    out = r.stdout + r.stderr
    summary = dict(re.findall(r"^# (tests|pass|fail|cancelled|skipped) (\d+)$", out, re.MULTILINE))
    assert r.returncode == 0 and summary.get("fail") == "0", out[-8000:]
    assert int(summary.get("pass", "0")) >= 4, summary


def test_typescript_market_key_is_the_taxonomy_market_key(compiled: Path) -> None:
    """The TS client filters its book by ``market_type`` as the server does: on the market key of
    feed.taxonomy.market_key (or its type). Its port gives the same key for every shape of input."""
    from feed.taxonomy import market_key

    node, _ = _node_or_skip()
    cases: list[tuple[str | None, dict[str, str] | None, str | None]] = [
        ("match_result", None, "soccer"), ("match_result", {}, "soccer"), (None, None, None), ("", {"line": "1"}, None),
        ("total", {"line": "2.5"}, "soccer"), ("total", {"line": "2.5", "period": "rt"}, "soccer"),
        ("total", {"line": "2.5", "period": "ot"}, "soccer"), ("total", {"period": "ot", "line": "210.5"}, "basketball"),
        ("total", {"period": "rt", "line": "210.5"}, "basketball"), ("moneyline", {"period": "ot_pen"}, "ice_hockey"),
        ("match_result", {"period": "rt"}, "basketball"), ("handicap", {"line": "-0.25", "period": "1h"}, "soccer"),
        ("team_total", {"team": "home", "line": "1.5", "unit": "goals"}, "soccer"),
        ("win", {"places": "3", "ew_fraction": "1/4", "extra": "x"}, "horse_racing"), ("total", {"line": ""}, "soccer"),
        ("raw:uof_8", {"goalnr": "1", "sport_key": "x", "a": "2"}, "soccer"), ("raw:x", {"sport_key": "y"}, None),
        ("total", {"period": "rt", "line": "2.5"}, None), ("draw_no_bet", {"period": "rt"}, "tennis"),
    ]
    script = ("import { marketKey, keyType } from %s;\n"
              "const cases = JSON.parse(process.argv[1]);\n"
              "console.log(JSON.stringify(cases.map(([t, s, sp]) => { const k = marketKey(t, s, sp); return [k, keyType(k)]; })));"
              ) % json.dumps((compiled / "src" / "index.js").as_uri())
    r = subprocess.run([node, "--input-type=module", "-e", script, json.dumps(cases)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    from feed.taxonomy import key_type

    want = [[market_key(t, s, sp), key_type(market_key(t, s, sp))] for t, s, sp in cases]
    assert json.loads(r.stdout) == want
