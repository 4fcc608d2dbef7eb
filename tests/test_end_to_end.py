"""The whole path on real parts: recordings or the simulator → ingest → Redis → API → clients.

- An SSE client and a WebSocket client connected during a replay each rebuild,
  from snapshot + deltas, exactly the book that ``GET /v1/markets/{id}`` returns.
- Bad lines in a replay are quarantined with their reason and counted in
  ``/v1/sources``, and the replay carries on.
- ``oddsfeed run`` (a real subprocess, fresh data directory) serves markets
  whose prices change live, fed by the simulator over a real socket, named
  the live Betfair way (login → stream → listMarketCatalogue → names).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import websockets

from feed.ingest import Ingest
from feed.models import Market
from feed.sources.replay import Replay
from feed.store import Store
from tests.conftest import require_shared_data
from tests.streaming_helpers import LocalBook, SSEReader, make_app, serve

ROOT = Path(__file__).resolve().parents[1]

RECORDINGS = [
    "betfair_parser/1.185781277.bz2",   # raw capture: batb/batl + atb/atl, removed runners, in-play, settled
    "betfair_parser/1.242971311.bz2",   # 200 soccer markets incl. Asian handicap selections
    "flumine/1.197931750",              # bdatb/bdatl + atb/atl greyhounds
    "fixtures/RECORDED-1.173718164",    # one truncated (malformed) line
]


def _comparable(m: Market) -> dict[str, object]:
    """Everything a client must agree on (the latency tags included)."""
    return msgspec.to_builtins(m)


async def _sse_client(base: str, book: LocalBook, done: asyncio.Event, synced: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as client:
        async with client.stream("GET", f"{base}/v1/stream?heartbeat_ms=500") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            reader = SSEReader(resp)
            while not done.is_set():
                # (no short timeout to look at ``done`` between events: a read that timed out ends the
                # reader's line iterator for good; the heartbeats, every 500 ms, bring it round)
                ev = await reader.next(timeout_s=30.0)
                if ev.event in ("snapshot", "delta"):
                    book.on(ev.data)
                    if ev.event == "snapshot":
                        synced.set()


async def _ws_client(base: str, book: LocalBook, done: asyncio.Event, synced: asyncio.Event) -> None:
    url = base.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {}}))
        while not done.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 1.0)
            except asyncio.TimeoutError:
                continue
            msg = json.loads(raw)
            if msg["type"] in ("snapshot", "delta"):
                book.on(msg)
                if msg["type"] == "snapshot":
                    synced.set()


async def test_clients_connected_during_a_replay_rebuild_the_rest_book(redis_url: str) -> None:
    data = require_shared_data()
    store = await Store.open(redis_url)
    try:
        app = make_app(store=store)
        async with serve(app) as base:
            sse_book, ws_book = LocalBook(), LocalBook()
            done = asyncio.Event()
            synced = [asyncio.Event(), asyncio.Event()]
            clients = [asyncio.create_task(_sse_client(base, sse_book, done, synced[0])),
                       asyncio.create_task(_ws_client(base, ws_book, done, synced[1]))]
            # both connected (snapshot of an empty store) before the replay starts
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in synced)), 30)
            ingest = Ingest(store, source="replay")
            summary = await Replay([data / r for r in RECORDINGS], ingest, speed=None, chunk_lines=200).run()
            assert summary.runner_changes > 30_000
            async with httpx.AsyncClient(base_url=base) as http:
                listing = (await http.get("/v1/markets")).json()["markets"]
                assert len(listing) == len(ingest.book.markets) > 200
                expected = {}
                for m in listing:
                    r = await http.get(f"/v1/markets/{m['market_id']}")
                    assert r.status_code == 200
                    expected[m["market_id"]] = msgspec.convert(r.json(), Market)
                # the API serves exactly what the ingest wrote
                assert {k: _comparable(v) for k, v in expected.items()} == \
                       {k: _comparable(v) for k, v in ingest.book.markets.items()}

                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if all(b.markets.get(k) is not None and b.markets[k].seq == v.seq
                           for b in (sse_book, ws_book) for k, v in expected.items()):
                        break
                    await asyncio.sleep(0.05)
            done.set()
            await asyncio.gather(*clients)
            for name, book in (("sse", sse_book), ("ws", ws_book)):
                assert set(book.markets) == set(expected), name
                for mid, want in expected.items():
                    assert _comparable(book.markets[mid]) == _comparable(want), (name, mid)
    finally:
        await store.close()


async def test_bad_lines_are_quarantined_and_counted(redis_url: str, tmp_path: Path) -> None:
    data = require_shared_data()
    good = (data / "fixtures" / "RECORDED-1.173718164").read_bytes().splitlines()[:3]
    bad = [b'{"op":"mcm","pt":1,"mc":[{"id":"1.173718164","rc":[{"id":1,"atb":[[0.5,2]]}]}]}',
           b"\xff\xfe not json",
           b'{"op":"mcm","pt":1,"mc":[{"id":"9.999","rc":[{"id":1,"ltp":2.0}]}]}']
    path = tmp_path / "mixed"
    path.write_bytes(b"\n".join([good[0], bad[0], good[1], bad[1], bad[2], good[2]]) + b"\n")
    store = await Store.open(redis_url)
    try:
        app = make_app(store=store)
        async with serve(app) as base:
            ingest = Ingest(store, source="mixed")
            summary = await Replay([path], ingest, speed=None).run()
            assert summary.messages == 6 and summary.rejected == 3
            assert summary.rejected_by_reason == {"invalid_price": 1, "invalid_json": 1, "unknown_market": 1}
            quarantined = await store.quarantined()
            assert [q["reason"] for q in reversed(quarantined)] == ["invalid_price", "invalid_json", "unknown_market"]
            assert quarantined[1]["raw"] == bad[1]
            async with httpx.AsyncClient(base_url=base) as http:
                sources = {s["source"]: s for s in (await http.get("/v1/sources")).json()["sources"]}
                assert sources["mixed"]["rejected"] == 3
                assert sources["mixed"]["rejected_by_reason"] == summary.rejected_by_reason
                market = (await http.get("/v1/markets/bf:1.173718164")).json()
                assert market["seq"] >= 1  # the good lines around the bad ones were applied
    finally:
        await store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_oddsfeed_run_serves_live_prices_from_the_simulator(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "feed", "run", "--port", str(port), "--data-dir", str(tmp_path / "var"),
         "--sim-rate", "200", "--sim-seed", "7"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        first: dict[str, dict] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not first:
            try:
                markets = httpx.get(f"{base}/v1/markets", timeout=2).json()["markets"]
                first = {m["market_id"]: m for m in markets if m["status"] == "OPEN"}
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert first, "no open markets served within 30 s"
        assert {m["source"] for m in first.values()} == {"betfair"}
        named: list[dict] = []
        while time.monotonic() < deadline + 10 and not named:  # names come from the catalogue, not the stream
            markets = httpx.get(f"{base}/v1/markets", timeout=2).json()["markets"]
            live = [m for m in markets if m["status"] == "OPEN"]
            if live and all(m["event_name"] and m["name"] and all(s["name"] for s in m["selections"]) for m in live):
                named = live
            else:
                time.sleep(0.2)
        assert named, "open markets not named by the catalogue within 10 s"
        moved_by = time.monotonic() + 3
        while True:  # (polled: done as soon as a price moved, at most 3 s as before)
            later = {m["market_id"]: m for m in httpx.get(f"{base}/v1/markets", timeout=2).json()["markets"]}
            moved = [mid for mid, m in first.items()
                     if mid in later and later[mid]["seq"] > m["seq"]
                     and [s["back"] for s in later[mid]["selections"]] != [s["back"] for s in m["selections"]]]
            if moved or time.monotonic() > moved_by:
                break
            time.sleep(0.1)
        assert moved, "no market's prices changed in 3 s"
        for m in later.values():
            assert m["age_ms"] >= 0 and m["stale"] is False
            assert m["received_at"] >= m["source_ts"] - 5  # the simulator stamps pt at emit
        sources = httpx.get(f"{base}/v1/sources", timeout=2).json()["sources"]
        assert sources[0]["state"] == "UP"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"oddsfeed run did not stop on SIGTERM:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def _wait_listening(proc: subprocess.Popen[str], ports: tuple[int, ...], timeout_s: float = 30.0) -> None:
    """Until every port accepts a connection on 127.0.0.1 (bounded; fails if ``proc`` exits)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(ports)
    while waiting:
        if proc.poll() is not None:
            pytest.fail(f"the simulator exited ({proc.returncode}):\n{proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, f"ports {waiting} not listening within {timeout_s:g} s"
        try:
            with socket.create_connection(("127.0.0.1", waiting[0]), timeout=1):
                waiting.pop(0)
        except OSError:
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"process did not stop on SIGTERM:\n{out[-3000:]}")
    return out


def test_oddsfeed_run_ingests_several_sources_at_once(tmp_path: Path) -> None:
    """``oddsfeed simulate --providers`` + ``oddsfeed run --source …`` ×4, as README shows:
    every source UP in /v1/sources with its own markets, served together."""
    esa, http, push, api, bf, cricket, race = (_free_port() for _ in range(7))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sim = subprocess.Popen(
        [sys.executable, "-m", "feed", "simulate", "--providers", "--port", str(esa), "--providers-port", str(http),
         "--push-port", str(push), "--api-port", str(bf), "--cricket-port", str(cricket), "--race-port", str(race), "--rate", "200",
         "--seed", "3"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fast = "min_interval_s=0,interval_s=1,live_interval_s=1"
    run = None
    try:
        _wait_listening(sim, (esa, http, push, bf, cricket, race))  # (was a blind 2 s sleep)
        run = subprocess.Popen(
            [sys.executable, "-m", "feed", "run", "--port", str(api), "--data-dir", str(tmp_path / "var"),
             "--source", f"esa=127.0.0.1:{esa},app_key=sim-app-key,username=sim-user,password=sim-password,"
                         f"sso_url=http://127.0.0.1:{bf},betting_url=http://127.0.0.1:{bf}/exchange/betting",
             "--source", f"pinnacle=http://127.0.0.1:{http},user=demo,password=demo,sports=29+33+4,{fast}",
             "--source", f"theoddsapi=http://127.0.0.1:{http}/v4,api_key=demo,sport=upcoming,markets=h2h+totals,{fast}",
             "--source", f"push-sse=http://127.0.0.1:{push}/push/sse,api_key=sim-push-key",
             "--source", f"betfair-cricket=127.0.0.1:{cricket},app_key=sim-app-key,username=sim-user,"
                         f"password=sim-password,sso_url=http://127.0.0.1:{bf}",
             "--source", f"betfair-race=127.0.0.1:{race},app_key=sim-app-key,username=sim-user,"
                         f"password=sim-password,sso_url=http://127.0.0.1:{bf}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        want = {"esa", "pinnacle", "theoddsapi", "push-sse"}
        sources: dict[str, dict] = {}
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                body = httpx.get(f"http://127.0.0.1:{api}/v1/sources", timeout=2).json()
                sources = {s["source"]: s for s in body["sources"]}
                if set(sources) >= want and all(sources[n]["state"] == "UP" and sources[n]["markets"] > 0 for n in want):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert set(sources) >= want, sources
        for name in want:
            assert sources[name]["state"] == "UP" and sources[name]["markets"] > 0, sources[name]
        markets = httpx.get(f"http://127.0.0.1:{api}/v1/markets", timeout=2).json()["markets"]
        prefixes = {m["market_id"].split(":")[0] for m in markets}
        assert {"bf", "pn", "toa", "px"} <= prefixes, prefixes
        # the live cricket scores and race progress of `simulate --providers`, logged in with the ESA
        # simulator's SSO
        deadline = time.monotonic() + 30
        data: dict[str, dict] = {}
        while time.monotonic() < deadline:
            got = {s["source"]: s for s in httpx.get(f"http://127.0.0.1:{api}/v1/sources", timeout=2)
                   .json()["sources"]}
            data = {k: got[k] for k in ("betfair-cricket", "betfair-race") if k in got}
            if len(data) == 2 and all(s["state"] == "UP" and s.get("last_message_at") for s in data.values()):
                break
            time.sleep(0.2)
        for kind in ("betfair-cricket", "betfair-race"):
            assert kind in data and data[kind]["state"] == "UP", data
    finally:
        if run is not None:
            out = _stop(run)
            assert run.returncode == 0 and "Traceback" not in out, out[-3000:]
        _stop(sim)
