"""The CLI: compose commands exist, user-fixable errors are one line, replay ingest end to end."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from feed.cli import build_parser
from tests.conftest import require_shared_data

ROOT = Path(__file__).resolve().parents[1]


def _oddsfeed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "feed", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_every_compose_command_parses() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "simulate", "ingest"} <= services.keys()
    serve_nodes = [s for s in services.values() if s.get("command", [None])[0] == "serve"]
    assert len(serve_nodes) >= 2
    parser = build_parser()
    checked = 0
    for name, svc in services.items():
        if name == "redis":
            continue
        args = parser.parse_args(svc["command"])  # raises SystemExit on an unknown command/flag
        assert args.command in {"run", "ingest", "serve", "simulate"}
        checked += 1
    assert checked == len(services) - 1


def test_unknown_flag_is_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--no-such-flag"])


def test_bad_speed_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "--replay", "x", "--speed", "0"])


def test_unreachable_redis_is_one_line() -> None:
    res = _oddsfeed("ingest", "--replay", str(ROOT / "README.md"), "--redis-url", "redis://127.0.0.1:1/0", timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("oddsfeed: error: cannot reach redis at redis://127.0.0.1:1/0")
    assert "Traceback" not in res.stderr


def test_busy_port_is_one_line(redis_url: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _oddsfeed("serve", "--redis-url", redis_url, "--port", str(port), timeout=60)
    assert res.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args, says", [
    (["serve", "--redis-url", "notaurl"], "argument --redis-url: a Redis URL starts with redis://, rediss:// or unix://"),
    (["serve", "--port", "99999"], "argument --port: a port is a number from 0 to 65535, not 99999"),
    (["run", "--partitions", "0"], "argument --partitions: must be at least 1, not 0"),
    (["run", "--sim-events", "0"], "argument --sim-events: must be at least 1, not 0"),
    (["run", "--sim-rate", "-5"], "argument --sim-rate: must be a number > 0"),
    (["simulate", "--port", "-1"], "argument --port: a port is a number from 0 to 65535, not -1"),
])
def test_bad_values_are_one_line_errors(args: list[str], says: str) -> None:
    res = _oddsfeed(*args, timeout=60)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr


def test_simulate_with_a_missing_recording_exits() -> None:
    res = _oddsfeed("simulate", "--replay", "/no/such/file", "--port", "0", "--api-port", "0", timeout=60)
    assert res.returncode == 2
    assert "no such recording file or folder: /no/such/file" in res.stderr and "Traceback" not in res.stderr


def test_two_runs_do_not_share_one_data_directory(tmp_path: Path) -> None:
    from feed.cli import UsageError, _run_lock

    fd = _run_lock(tmp_path)  # this process is "the first run"
    try:
        with pytest.raises(UsageError, match="another `oddsfeed run`"):
            _run_lock(tmp_path)
        res = _oddsfeed("run", "--data-dir", str(tmp_path), "--port", "0", timeout=60)
        assert res.returncode == 2
        last = res.stderr.strip().splitlines()[-1]
        assert "another `oddsfeed run`" in last and str(tmp_path.resolve()) in last and "--data-dir" in last
        assert not (tmp_path / "redis.sock").exists()  # it stopped before touching the embedded Redis
    finally:
        import os

        os.close(fd)
    os.close(_run_lock(tmp_path))  # free again once the first one is gone


def test_missing_recording_is_one_line(redis_url: str) -> None:
    res = _oddsfeed("ingest", "--replay", "/no/such/file", "--redis-url", redis_url, timeout=60)
    assert res.returncode == 2
    assert "no such recording file or folder: /no/such/file" in res.stderr


def test_ingest_replay_max_speed_summary(tmp_path: Path) -> None:
    data = require_shared_data()
    res = _oddsfeed("ingest", "--replay", str(data), "--speed", "max", "--data-dir", str(tmp_path / "var"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "replay finished:" in out
    counts = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    assert int(counts["messages"]) > 80_000
    assert int(counts["runner changes"]) > 150_000
    # the shared data holds one truncated line (RECORDED-1.173718164) and one RESUB_DELTA whose 43
    # markets were never imaged: 41 carry no definition (rejected one by one), 2 are built from theirs
    assert counts["rejected"].startswith("42 (invalid_json=1, unknown_market=41")
    assert "runner changes/s" in counts["elapsed"]
    # the embedded server was stopped cleanly and kept its append-only file
    assert any((tmp_path / "var").glob("appendonly*"))


def test_record_without_a_live_source_is_a_usage_error(tmp_path: Path) -> None:
    res = _oddsfeed("record", "--out", str(tmp_path), "--redis-url", "redis://127.0.0.1:1/0", timeout=60)
    assert res.returncode == 2 and "record needs --esa HOST:PORT or --source SPEC" in res.stderr
    res = _oddsfeed("record", "--replay", "x", "--out", str(tmp_path), timeout=60)
    assert res.returncode == 2 and "not --replay" in res.stderr


def test_sim_push_goes_with_the_built_in_simulator_only() -> None:
    res = _oddsfeed("run", "--sim-push", "--replay", "x", "--redis-url", "redis://127.0.0.1:1/0", "--metrics-port", "0",
                    timeout=60)
    assert res.returncode == 2 and "--sim-push adds a source to the built-in simulator" in res.stderr
    assert "Traceback" not in res.stderr


def test_ingest_replays_an_oddsfeed_recording(tmp_path: Path, redis_url: str) -> None:
    from feed.recorder import Recorder
    from feed.sources.base import Payload

    rec = Recorder(tmp_path / "rec", source="toa", kind="theoddsapi", options={"api_key": "secret"})
    body = (Path(__file__).parent / "fixtures" / "theoddsapi" / "01_snapshot.json").read_bytes()
    rec.write([Payload(1755349200000, body, "soccer_epl")])
    rec.close()
    res = _oddsfeed("ingest", "--replay", str(tmp_path / "rec"), "--speed", "max", "--redis-url", redis_url,
                    timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "replay of oddsfeed recordings finished:" in res.stdout and "toa: 1 payloads" in res.stdout
