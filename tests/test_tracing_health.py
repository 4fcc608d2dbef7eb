"""Tracing and health (issue 12 item 6), on real servers on loopback.

- ``X-Trace-Id`` on every answer of the API node: echoed when well-formed,
  taken from a W3C ``traceparent``, generated otherwise (a malformed one is
  never echoed); on REST answers, errors (body shape unchanged), 401s and on
  an SSE stream's head.
- ``--log-format json``: one JSON object per line, carrying the trace id of
  the request a line was logged for; secrets still redacted.
- ``GET /health``: status, version, revision, started_at, uptime_s, now.
- ``Deprecation`` / ``Sunset`` / ``Link`` headers from the registry.
- ``oddsfeed ingest --metrics-port``: a real ingest process against the ESA
  and push simulators serves Prometheus metrics that count what flowed.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import sys
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from feed import buildinfo, redaction
from feed.settings import Settings
from streaming.tracing import DEPRECATIONS, TRACE_ID_MAX, Deprecation
from tests.streaming_helpers import Feed, SSEReader, eventually, make_app, serve
from tests.test_push_harness import push_sim

ROOT = Path(__file__).resolve().parents[1]
HEX32 = re.compile(r"[0-9a-f]{32}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- trace ids -------------------------------------------------------------------------


async def test_trace_id_is_echoed_taken_from_traceparent_or_generated(redis_url: str) -> None:
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/markets", headers={"X-Trace-Id": "req-42_ABC"})
        assert r.status_code == 200 and r.headers["x-trace-id"] == "req-42_ABC"
        longest = "a" * TRACE_ID_MAX
        assert (await c.get("/health", headers={"X-Trace-Id": longest})).headers["x-trace-id"] == longest

        generated = {(await c.get("/v1/markets")).headers["x-trace-id"] for _ in range(3)}
        assert len(generated) == 3 and all(HEX32.fullmatch(t) for t in generated)

        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        assert (await c.get("/health", headers={"traceparent": tp})).headers["x-trace-id"] == \
            "4bf92f3577b34da6a3ce929d0e0e4736"
        both = await c.get("/health", headers={"traceparent": tp, "X-Trace-Id": "mine"})
        assert both.headers["x-trace-id"] == "mine"

        for bad in ("has space", "semi;colon", "a" * (TRACE_ID_MAX + 1), "<script>", "ünï"):
            r = await c.get("/health", headers={b"X-Trace-Id": bad.encode("utf-8")})
            assert r.status_code == 200
            assert HEX32.fullmatch(r.headers["x-trace-id"]), (bad, r.headers["x-trace-id"])
        for bad_tp in ("00-00000000000000000000000000000000-00f067aa0ba902b7-01",   # all-zero trace id
                       "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   # version ff
                       "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",   # upper case
                       "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",   # all-zero parent id
                       "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # v00 has 4 fields
                       "garbage"):
            r = await c.get("/health", headers={"traceparent": bad_tp})
            assert HEX32.fullmatch(r.headers["x-trace-id"]) and r.headers["x-trace-id"] != "4bf92f3577b34da6a3ce929d0e0e4736"

        # errors: the header, and the body keeps its shape
        r = await c.get("/v1/markets/nope", headers={"X-Trace-Id": "err-1"})
        assert r.status_code == 404 and r.headers["x-trace-id"] == "err-1"
        assert set(r.json()) == {"error", "message"} and r.json()["error"] == "unknown_market"
        r = await c.get("/v1/markets", params={"in_play": "perhaps"}, headers={"X-Trace-Id": "err-2"})
        assert r.status_code == 400 and r.headers["x-trace-id"] == "err-2" and r.json()["error"] == "bad_request"
        r = await c.get("/no/such/route", headers={"X-Trace-Id": "err-3"})
        assert r.status_code == 404 and r.headers["x-trace-id"] == "err-3"
        # a 304 and the metrics carry it too
        r1 = await c.get("/v1/markets")
        r2 = await c.get("/v1/markets", headers={"If-None-Match": r1.headers["etag"], "X-Trace-Id": "cached"})
        assert r2.status_code == 304 and r2.headers["x-trace-id"] == "cached"
        assert (await c.get("/metrics", headers={"X-Trace-Id": "scrape"})).headers["x-trace-id"] == "scrape"


async def test_trace_id_on_the_head_of_an_sse_stream_and_on_401(store, redis_url: str) -> None:
    feed = Feed(store)
    await feed.write(feed.image("m1"))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async with c.stream("GET", "/v1/stream", headers={"X-Trace-Id": "sse-trace-1"}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-trace-id"] == "sse-trace-1"
            ev = await SSEReader(resp).next()  # the stream itself is untouched
            assert ev.event == "snapshot" and [m["market_id"] for m in ev.data["markets"]] == ["m1"]
        async with c.stream("GET", "/v1/stream") as resp:
            assert HEX32.fullmatch(resp.headers["x-trace-id"])
            assert (await SSEReader(resp).next()).event == "snapshot"

    app = make_app(redis_url, settings=Settings(api_keys=("k-0123456789",), heartbeat_ms=60_000))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/markets", headers={"X-Trace-Id": "no-key"})
        assert r.status_code == 401 and r.headers["x-trace-id"] == "no-key"
        r = await c.get("/v1/markets", headers={"X-Api-Key": "k-0123456789", "X-Trace-Id": "with-key"})
        assert r.status_code == 200 and r.headers["x-trace-id"] == "with-key"


async def test_an_unhandled_error_answers_500_with_the_trace_id() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from streaming.tracing import TraceMiddleware

    async def broken(request: object) -> None:
        raise RuntimeError("broken handler")

    app = Starlette(routes=[Route("/broken", broken)], middleware=[Middleware(TraceMiddleware)])
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/broken", headers={"X-Trace-Id": "t-500"})
        assert r.status_code == 500 and r.headers["x-trace-id"] == "t-500"
        assert r.text == "Internal Server Error"  # Starlette's own error body


# --- JSON logs -------------------------------------------------------------------------


async def test_json_log_lines_carry_the_request_trace_id(store, redis_url: str) -> None:
    from feed.cli import setup_logging

    root = logging.getLogger()
    level = root.level
    buf = io.StringIO()
    handler = setup_logging(False, stream=buf, log_format="json")
    redaction.register_secret("json-log-s3cret-value")
    try:
        feed = Feed(store)
        await feed.write(feed.image("m1"))
        async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            async with c.stream("GET", "/v1/stream", headers={"X-Trace-Id": "log-trace-7"}) as resp:
                await SSEReader(resp).next()

                def connect_line() -> dict | None:
                    for line in buf.getvalue().splitlines():
                        rec = json.loads(line)
                        if rec["logger"] == "streaming.hub" and rec["message"].startswith("connect sse"):
                            return rec
                    return None
                rec = await eventually(connect_line, what="the hub's connect line")
        assert rec["trace_id"] == "log-trace-7" and rec["level"] == "INFO"
        logging.getLogger("feed.test").warning("token json-log-s3cret-value for %s", "x",
                                               extra={"source": "betfair", "market": "bf:1.2"})
        try:
            raise ValueError("boom json-log-s3cret-value")
        except ValueError:
            logging.getLogger("feed.test").exception("failed")
        lines = buf.getvalue().splitlines()
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        for r in records:
            assert {"ts", "level", "logger", "message"} <= r.keys()
            ts = datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
            assert abs(ts.timestamp() - time.time()) < 120
        mine = [r for r in records if r["logger"] == "feed.test"]
        assert mine[0]["message"] == "token *** for x" and mine[0]["source"] == "betfair"
        assert mine[0]["market"] == "bf:1.2" and "trace_id" not in mine[0]  # outside any request
        assert mine[1]["level"] == "ERROR" and "ValueError: boom ***" in mine[1]["exc"]
        assert "json-log-s3cret-value" not in buf.getvalue()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        redaction.uninstall()


# --- /health ---------------------------------------------------------------------------


async def test_health_reports_version_revision_and_times(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = time.time_ns() // 1_000_000
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/health")
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        h = r.json()
        assert set(h) == {"status", "version", "revision", "started_at", "uptime_s", "now"}
        assert h["status"] == "ok" and h["version"] == metadata.version("oddsfeed")
        assert h["revision"] is None or re.fullmatch(r"[0-9a-zA-Z._-]{1,64}", h["revision"])
        if (ROOT / ".git").exists() and "ODDSFEED_REVISION" not in os.environ:
            assert re.fullmatch(r"[0-9a-f]{40}", h["revision"])
        assert type(h["started_at"]) is int and type(h["now"]) is int
        assert before <= h["started_at"] <= h["now"] <= time.time_ns() // 1_000_000
        assert isinstance(h["uptime_s"], (int, float)) and 0 <= h["uptime_s"] < 60
        h2 = await eventually(lambda: _later_health(c, h["now"]), what="a later /health")
        assert h2["started_at"] == h["started_at"] and h2["uptime_s"] >= h["uptime_s"]

    monkeypatch.setenv("ODDSFEED_REVISION", "v1.2.3-abc")
    buildinfo.revision.cache_clear()
    try:
        async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            assert (await c.get("/health")).json()["revision"] == "v1.2.3-abc"
        monkeypatch.setenv("ODDSFEED_REVISION", "not a revision; rm -rf")
        buildinfo.revision.cache_clear()
        async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            assert (await c.get("/health")).json()["revision"] is None
    finally:
        monkeypatch.delenv("ODDSFEED_REVISION")
        buildinfo.revision.cache_clear()


async def _later_health(c: httpx.AsyncClient, now: int) -> dict | None:
    h = (await c.get("/health")).json()
    return h if h["now"] > now else None


# --- deprecation headers ----------------------------------------------------------------


async def test_deprecation_and_sunset_headers_from_the_registry(redis_url: str) -> None:
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/markets")
        assert not {"deprecation", "sunset", "x-deprecated-fields"} & r.headers.keys()  # empty by default
        field = DEPRECATIONS.add(Deprecation("/v1/markets*", field="selections[].price_raw", deprecation="2027-01-01",
                                             sunset="2027-07-01", link="https://example.com/changelog#price-raw"))
        endpoint = DEPRECATIONS.add(Deprecation("/v1/sports", deprecation="2026-06-01T12:00:00+00:00"))
        try:
            for path in ("/v1/markets", "/v1/markets/nope"):
                r = await c.get(path, headers={"X-Trace-Id": "dep"})
                assert r.headers["x-trace-id"] == "dep"
                assert r.headers["deprecation"] == "@%d" % datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp()
                assert parsedate_to_datetime(r.headers["sunset"]) == datetime(2027, 7, 1, tzinfo=timezone.utc)
                assert r.headers["sunset"] == "Thu, 01 Jul 2027 00:00:00 GMT"
                assert r.headers["link"] == '<https://example.com/changelog#price-raw>; rel="deprecation"; type="text/html"'
                assert r.headers["x-deprecated-fields"] == "selections[].price_raw"
            assert (await c.get("/v1/markets/nope")).json()["error"] == "unknown_market"  # body untouched
            r = await c.get("/v1/sports")
            assert r.headers["deprecation"] == "@%d" % datetime(2026, 6, 1, 12, tzinfo=timezone.utc).timestamp()
            assert not {"sunset", "link", "x-deprecated-fields"} & r.headers.keys()
            r = await c.get("/v1/events")
            assert "deprecation" not in r.headers
        finally:
            DEPRECATIONS.remove(field)
            DEPRECATIONS.remove(endpoint)
        assert "deprecation" not in (await c.get("/v1/markets")).headers
    with pytest.raises(ValueError):
        Deprecation("/v1/x", deprecation="2027-07-01", sunset="2027-01-01")
    with pytest.raises(ValueError):
        Deprecation("v1/x", deprecation="2027-01-01")


# --- the ingest's /metrics ------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_ingest_process_serves_metrics(redis_url: str, make_sim, tmp_path: Path) -> None:
    """A real ``oddsfeed ingest`` (ESA + push-ws, JSON logs) against the simulators: its
    /metrics counts messages, runner changes, applied deltas, batch latency and feed lag
    per source, with each source's state."""
    esa = await make_sim(rate_per_s=100.0, events=4)
    port = _free_port()
    log = tmp_path / "ingest.log"
    async with push_sim() as push:
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "feed", "ingest", "--redis-url", redis_url, "--log-format", "json",
                "--metrics-port", str(port),
                "--source", f"esa=127.0.0.1:{esa.port},app_key={esa.config.app_key},session={esa.config.session_token}",
                "--source", f"push-ws={push.url('ws')},api_key={push.config.api_key}",
                cwd=ROOT, stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                async with httpx.AsyncClient(timeout=5) as c:
                    async def scrape() -> dict | None:
                        if proc.returncode is not None:
                            raise AssertionError(f"ingest exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                        try:
                            r = await c.get(f"http://127.0.0.1:{port}/metrics")
                        except httpx.HTTPError:
                            return None
                        m = _samples(r.text)
                        ok = all(m.get((name, (("source", src),)), 0) > 0
                                 for src in ("esa", "push-ws")
                                 for name in ("oddsfeed_ingest_messages_total", "oddsfeed_ingest_runner_changes_total",
                                              "oddsfeed_ingest_deltas_applied_total",
                                              "oddsfeed_ingest_batch_apply_seconds_count",
                                              "oddsfeed_ingest_feed_lag_seconds_count"))
                        up = all(m.get(("oddsfeed_ingest_source_state", (("source", src), ("state", "UP")))) == 1
                                 for src in ("esa", "push-ws"))
                        return m if ok and up else None

                    m = await eventually(scrape, 30, "ingest metrics with counts for both sources")
                    r = await c.get(f"http://127.0.0.1:{port}/metrics")
                    assert r.headers["content-type"].startswith("text/plain")
                    assert (await c.get(f"http://127.0.0.1:{port}/nope")).status_code == 404
                    assert (await c.post(f"http://127.0.0.1:{port}/metrics")).status_code == 405
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 20)
    for src in ("esa", "push-ws"):
        assert m[("oddsfeed_ingest_source_state", (("source", src), ("state", "DOWN")))] == 0
        assert m[("oddsfeed_ingest_redis_errors_total", (("op", "store"), ("source", src)))] == 0
        assert m[("oddsfeed_ingest_batch_apply_seconds_bucket", (("le", "+Inf"), ("source", src)))] > 0
        assert m[("oddsfeed_ingest_feed_lag_seconds_sum", (("source", src),))] >= 0
        assert m[("oddsfeed_ingest_markets", (("source", src),))] > 0
    assert any(k[0] == "oddsfeed_build_info" and dict(k[1])["version"] == metadata.version("oddsfeed") for k in m)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert push.config.api_key not in text  # secret options redacted in JSON lines too
    logs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert logs and all({"ts", "level", "logger", "message"} <= r.keys() for r in logs)
    assert any(r["logger"] == "feed.sources.esa" and "subscribed" in r["message"] for r in logs), text[-3000:]


def test_a_busy_metrics_port_is_one_line(tmp_path: Path) -> None:
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "feed", "ingest", "--metrics-port", str(port), "--replay",
                              str(ROOT / "README.md"), "--data-dir", str(tmp_path / "var")],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert f"metrics port {port} on 127.0.0.1 is already in use" in res.stderr and "Traceback" not in res.stderr


async def test_ingest_counters_survive_a_source_restart(store) -> None:
    """A restarted source gets a new Ingest with fresh stats; the exported counters never go back."""
    import gc

    from feed.ingest import Ingest
    from feed.metrics import INGEST_METRICS

    first = Ingest(store, source="restarting")
    first.stats.messages, first.stats.rejected_by_reason["invalid_json"] = 5, 2
    assert INGEST_METRICS.totals()["restarting"].messages == 5
    del first
    gc.collect()
    second = Ingest(store, source="restarting")
    second.stats.messages, second.stats.rejected_by_reason["invalid_json"] = 3, 1
    t = INGEST_METRICS.totals()["restarting"]
    assert t.messages == 8 and t.rejected_by_reason == {"invalid_json": 3}
    assert INGEST_METRICS.latest("restarting") is second
