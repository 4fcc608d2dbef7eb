"""The ``webhook`` source end to end: a real uvicorn server on 127.0.0.1 (port 0)
run by the real pipeline (``feed.pipeline.run_spec``) writing into the
session's embedded redis-server, real httpx clients, and the webhook pusher
(``feed.simulator.webhook_pusher``) for the long run. The store-failure test
runs its own embedded Redis, which it stops and starts again."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from feed.book import Book
from feed.embedded_redis import EmbeddedRedis
from feed.errors import ConfigError
from feed.normalise.webhook import WebhookNormaliser
from feed.pipeline import Pipeline, run_spec
from feed.settings import Settings
from feed.simulator.push_providers import market_view
from feed.simulator.webhook_pusher import (
    Delivery,
    PusherConfig,
    PushReport,
    WebhookPusher,
)
from feed.sources.spec import parse_source_spec
from feed.sources.webhook import (
    NonceCache,
    WebhookSource,
    now_ms,
    parse_timestamp_ms,
    sign,
)
from feed.store import Store
from feed.supervisor import run_source
from tests.streaming_helpers import eventually

pytestmark = pytest.mark.timeout(60)

SECRET = "whsec-test-0123456789"
NAME = "webhook"


@dataclass
class Running:
    source: WebhookSource
    pipeline: Pipeline
    task: asyncio.Task[None]
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.source.url

    async def post(self, body: bytes, *, key: str | None = None, ts: str | None = None, sig: str | None = None,
                   drop: tuple[str, ...] = (), url: str | None = None, **extra: str) -> httpx.Response:
        """POST ``body`` signed as the default options expect (override any header)."""
        stamp = str(now_ms() // 1000) if ts is None else ts
        headers = {"X-Timestamp": stamp, "X-Idempotency-Key": key or uuid.uuid4().hex,
                   "X-Signature": sig if sig is not None else sign(SECRET.encode(), body, stamp),
                   "Content-Type": "application/json", **extra}
        for h in drop:
            headers.pop(h, None)
        return await self.client.post(url or self.url, content=body, headers=headers)


@contextlib.asynccontextmanager
async def running(store: Store, options: str = "", settings: Settings | None = None) -> AsyncIterator[Running]:
    spec = parse_source_spec(f"webhook=127.0.0.1:0,secret={SECRET}{options}")
    got: dict[str, Any] = {}
    task = asyncio.create_task(run_spec(store, settings or Settings(), spec,
                                        on_source=lambda s, p: got.update(source=s, pipeline=p)))
    await eventually(lambda: task.done() or ("source" in got and got["source"].listening.is_set()), 10,
                     "the webhook source to listen")
    if task.done():
        task.result()
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            yield Running(got["source"], got["pipeline"], task, client)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)


def odds(entry: int, price: float, *, ts: int | None = None, sel: str = "home", fixture: str = "f1",
         status: str | None = None, **fx: Any) -> bytes:
    """One push-format ``odds`` message for market ``px:<fixture>:match_odds``."""
    t = now_ms() if ts is None else ts
    fixture_obj: dict[str, Any] = {"id": fixture, "sport": "Soccer", "home": "A", "away": "B", **fx}
    if status is not None:
        fixture_obj["status"] = status
    return orjson.dumps({"type": "odds", "entry_id": f"{t}-{entry}", "emitted_at": t, "data": [
        {"fixture": fixture_obj, "market": {"id": "match_odds", "name": "Match Odds"},
         "selection": {"id": sel, "name": sel.title()}, "price": price, "timestamp": t, "sportsbook": "book1"}]})


async def prices(store: Store, market_id: str = "px:f1:match_odds") -> dict[str, float | None]:
    m = await store.get_market(market_id)
    return {} if m is None else {s.selection_id: s.price for s in m.selections}


async def log_length(store: Store) -> int:
    return len(await store.log_range(0, "0-0"))


# --- accepted deliveries --------------------------------------------------------------


async def test_valid_delivery_is_stored_and_acknowledged(store: Store) -> None:
    async with running(store) as w:
        async def up() -> bool:
            h = await store.get_health(NAME)
            return h is not None and h.state == "UP" and h.stale_after_ms == 60_000
        await eventually(up, 5, "the health record UP")
        r = await w.post(odds(1, 2.5))
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "duplicate": False, "deltas": 1, "rejected_parts": 0, "stale": False}
        assert await prices(store) == {"home": 2.5}  # 2xx only once stored
        m = await store.get_market("px:f1:match_odds")
        assert m is not None and m.source == NAME and m.event_name == "A v B" and m.session
        r = await w.post(odds(2, 2.6, sel="away"))
        assert r.status_code == 200 and await prices(store) == {"home": 2.5, "away": 2.6}


async def test_ms_timestamps_base64_signature_and_prefix(store: Store) -> None:
    async with running(store, ",signature_encoding=base64,signature_prefix=sha256=") as w:
        body = odds(1, 3.0)
        stamp = str(now_ms())  # ms are accepted too
        r = await w.post(body, ts=stamp, sig=sign(SECRET.encode(), body, stamp, encoding="base64", prefix="sha256="))
        assert r.status_code == 200, r.text
        r = await w.post(odds(2, 3.1), sig=sign(SECRET.encode(), body, stamp, encoding="hex", prefix="sha256="))
        assert r.status_code == 401 and r.json()["error"] == "bad_signature"
        assert "sha256=<base64 HMAC-SHA256 of <X-Timestamp>.<body>" in r.json()["detail"]


async def test_x_security_hash_style_signs_the_body_alone(store: Store) -> None:
    async with running(store, ",signature_header=X-Security-Hash,timestamp_header=none,nonce_header=none") as w:
        body = odds(1, 4.0)
        r = await w.client.post(w.url, content=body, headers={"X-Security-Hash": sign(SECRET.encode(), body)})
        assert r.status_code == 200, r.text
        assert await prices(store) == {"home": 4.0}
        r = await w.client.post(w.url, content=body, headers={"X-Security-Hash": sign(b"other-secret", body)})
        assert r.status_code == 401


# --- refused deliveries ----------------------------------------------------------------


async def test_bad_signature_is_401_and_applies_nothing(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    async with running(store) as w:
        body = odds(1, 2.5)
        stamp = str(now_ms() // 1000)
        good = sign(SECRET.encode(), body, stamp)
        for sig in (good[:-1] + ("0" if good[-1] != "0" else "1"),  # one digit off
                    sign(SECRET.encode(), body),                       # the body alone: the timestamp is signed
                    sign(SECRET.encode(), body + b" ", stamp),         # another body
                    "not-hex", ""):
            r = await w.post(body, ts=stamp, sig=sig)
            assert r.status_code in (400, 401), (sig, r.text)
            assert r.json()["error"] == ("missing_header" if sig == "" else "bad_signature")
        r = await w.post(body, ts=str(int(stamp) + 1), sig=good)  # the timestamp is part of what is signed
        assert r.status_code == 401
        assert await store.get_market("px:f1:match_odds") is None
        assert w.source.rejected[401] == 5
        assert SECRET not in caplog.text and good not in caplog.text


async def test_timestamp_outside_the_window_is_401(store: Store) -> None:
    async with running(store, ",window_s=60") as w:
        now_s = now_ms() // 1000
        for stamp in (now_s - 120, now_s + 120):
            r = await w.post(odds(1, 2.5), ts=str(stamp))
            assert r.status_code == 401, r.text
            body = r.json()
            assert body["error"] == "timestamp_outside_window" and "at most 60 s" in body["detail"]
        r = await w.post(odds(1, 2.5), ts=str(now_s - 50))
        assert r.status_code == 200
        assert await prices(store) == {"home": 2.5}


async def test_replayed_idempotency_key_is_acknowledged_without_reapplying(store: Store) -> None:
    async with running(store) as w:
        body = odds(1, 2.5)
        r = await w.post(body, key="k-1")
        assert r.status_code == 200 and r.json()["duplicate"] is False
        entries = await log_length(store)
        for _ in range(3):  # a replay — even re-signed with a fresh timestamp — is acknowledged, not applied
            r = await w.post(body, key="k-1")
            assert r.status_code == 200 and r.json() == {"ok": True, "duplicate": True}
        r = await w.post(odds(2, 9.0), key="k-1")  # the key decides, whatever the body
        assert r.json()["duplicate"] is True
        assert await log_length(store) == entries and await prices(store) == {"home": 2.5}
        assert w.source.duplicates == 4 and len(w.source.nonces) == 1
        # the same body under a new key (a provider's re-delivery): the entry id was applied, nothing changes
        r = await w.post(body, key="k-2")
        assert r.status_code == 200 and r.json()["stale"] is True and r.json()["deltas"] == 0
        assert await log_length(store) == entries


async def test_late_and_redelivered_bodies_never_move_a_market_back(store: Store) -> None:
    """What makes a re-applied or reordered delivery harmless: odds older than
    the one held are dropped, and a late copy cannot move a fixture back."""
    async with running(store) as w:
        t0 = now_ms() - 5_000
        first = odds(1, 2.0, ts=t0, status="not_started", is_live=False)
        second = odds(2, 3.0, ts=t0 + 1000, status="live", is_live=True)
        assert (await w.post(second)).status_code == 200
        assert (await w.post(first)).status_code == 200  # delivered late
        m = await store.get_market("px:f1:match_odds")
        assert m is not None and m.in_play is True and {s.selection_id: s.price for s in m.selections} == {"home": 3.0}
        late_status = orjson.dumps({"type": "fixture-status", "entry_id": f"{t0}-9", "emitted_at": t0,
                                    "data": {"id": "f1", "status": "not_started", "is_live": False,
                                             "timestamp": t0}})
        assert (await w.post(late_status)).status_code == 200
        entries = await log_length(store)
        assert (await w.post(first)).status_code == 200  # again, under another key
        assert (await w.post(second)).status_code == 200
        m = await store.get_market("px:f1:match_odds")
        assert m is not None and m.in_play is True and m.status == "OPEN" and m.selections[0].price == 3.0
        assert await log_length(store) == entries
        # a late odd of another selection still applies (it is news for that selection)
        assert (await w.post(odds(3, 5.0, ts=t0 + 500, sel="away"))).status_code == 200
        assert await prices(store) == {"home": 3.0, "away": 5.0}
        normaliser = w.pipeline.normaliser
        assert isinstance(normaliser, WebhookNormaliser)
        assert normaliser.dropped.get("duplicate", 0) >= 1 and normaliser.dropped.get("late_fixture_fields", 0) >= 1


async def test_oversized_body_is_413(store: Store) -> None:
    async with running(store, ",max_body_bytes=2000") as w:
        body = odds(1, 2.5)
        big = body + b" " * 2500
        r = await w.post(big)
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the read stops at the cap
            for _ in range(10):
                yield b" " * 500
        stamp = str(now_ms() // 1000)
        r = await w.client.post(w.url, content=chunks(), headers={
            "X-Timestamp": stamp, "X-Idempotency-Key": "k", "X-Signature": "00"})
        assert r.status_code == 413
        assert (await w.post(body)).status_code == 200


async def test_missing_or_bad_headers_are_400_naming_them(store: Store) -> None:
    async with running(store) as w:
        body = odds(1, 2.5)
        for header in ("X-Signature", "X-Timestamp", "X-Idempotency-Key"):
            r = await w.post(body, drop=(header,))
            assert r.status_code == 400, r.text
            assert r.json() == {"error": "missing_header", "detail": f"send the {header} header"}
        for bad in ("yesterday", "-5", "1e9"):
            r = await w.post(body, ts=bad)
            assert r.status_code == 400 and r.json()["error"] == "bad_timestamp"
        r = await w.post(body, key="k" * 300)
        assert r.status_code == 400 and r.json()["error"] == "bad_idempotency_key"
        r = await w.post(b"  ")
        assert r.status_code == 400 and r.json()["error"] == "empty_body"
        assert await store.get_market("px:f1:match_odds") is None


async def test_unknown_path_404_and_wrong_method_405(store: Store) -> None:
    async with running(store) as w:
        base = w.url.rsplit("/ingest/", 1)[0]
        for path in ("/", "/ingest/webhook/other", "/ingest/webhook/webhook/x", "/ingest"):
            r = await w.post(odds(1, 2.5), url=base + path)
            assert r.status_code == 404 and r.json()["error"] == "unknown_path", path
        r = await w.client.get(w.url)
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed" and r.headers["allow"] == "POST"


async def test_malformed_body_is_422_and_quarantined(store: Store) -> None:
    async with running(store) as w:
        for body in (b"this is not json", b'{"type":"gossip","entry_id":"1-1"}',
                     b'{"type":"snapshot","entry_id":"1-1","data":[]}'):
            r = await w.post(body, key="bad-1")
            assert r.status_code == 422 and r.json()["error"] == "rejected", body
        assert (await store.quarantine_counts()).get(NAME, {}).keys() >= {"invalid_json", "unknown_type",
                                                                          "unsupported_type"}
        assert len(w.source.nonces) == 0  # a rejected body's key is not remembered: a fixed body may reuse it
        assert (await w.post(odds(1, 2.5), key="bad-1")).status_code == 200
        # a market rejected alone: the rest applies (200, rejected_parts), the fixed re-delivery applies too
        t = now_ms()
        good = {"fixture": {"id": "f2"}, "market": {"id": "m"}, "selection": {"id": "s"}, "price": 2.0, "timestamp": t}
        bad = {"fixture": {"id": "f3"}, "market": {"id": "m"}, "selection": {"id": "s"}, "price": 0.5, "timestamp": t}
        msg = {"type": "odds", "entry_id": f"{t}-7", "data": [good, bad]}
        r = await w.post(orjson.dumps(msg))
        assert r.status_code == 200 and r.json()["rejected_parts"] == 1, r.text
        assert await prices(store, "px:f2:m") == {"s": 2.0} and await store.get_market("px:f3:m") is None
        msg["data"] = [good, {**bad, "price": 3.0}]
        assert (await w.post(orjson.dumps(msg))).json()["rejected_parts"] == 0
        assert await prices(store, "px:f3:m") == {"s": 3.0}
        assert (await store.quarantine_counts())[NAME]["invalid_price"] == 1


# --- health ----------------------------------------------------------------------------


async def test_quiet_provider_reads_degraded_then_up(store: Store) -> None:
    async with running(store, ",stale_after_s=0.4") as w:
        async def state() -> tuple[str, str | None] | None:
            h = await store.get_health(NAME)
            return None if h is None else (h.state, h.reason)
        assert (await w.post(odds(1, 2.5))).status_code == 200
        sent_at = now_ms()

        async def confirmed() -> bool:  # a delivery confirms the source's markets (once stored)
            h = await store.get_health(NAME)
            return h is not None and h.stale_after_ms == 400 and h.last_message_at >= sent_at - 1000
        await eventually(confirmed, 5, "the delivery to confirm the source")
        await eventually(lambda: _eq(state(), ("DEGRADED", "no_deliveries")), 10, "DEGRADED after 0.4 s")
        assert (await w.post(odds(2, 2.6))).status_code == 200
        await eventually(lambda: _eq(state(), ("UP", None)), 10, "UP again after a delivery")
    h = await store.get_health(NAME)
    assert h is not None and h.state == "DOWN"


async def _eq(value: Any, expected: Any) -> bool:
    return await value == expected


# --- the store fails -------------------------------------------------------------------


async def test_store_failure_answers_503_and_the_retry_is_accepted(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=True)
    server.start()
    store = await Store.open(server.url)
    try:
        async with running(store, ",retry_after_s=1") as w:
            assert (await w.post(odds(1, 2.5), key="a")).status_code == 200
            server.stop()  # a real fault: nothing listens on the socket any more
            body = odds(2, 2.6, sel="away")
            r = await w.post(body, key="b")
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "store_unavailable" and r.headers["retry-after"] == "1"
            assert len(w.source.nonces) == 1  # "b" is not remembered: the retry must be accepted
            r = await w.post(odds(3, 2.7, sel="draw"), key="c")
            assert r.status_code == 503
            pusher = WebhookPusher(PusherConfig(url=w.url, secret=SECRET, backoff_initial_s=0.1, backoff_max_s=0.5,
                                                retry_after_cap_s=0.3, max_attempts=100))
            report = PushReport()
            retry = asyncio.create_task(pusher.deliver(w.client, Delivery(body, "b", "x"), report))
            await eventually(lambda: report.answers[503] >= 2, 10, "the provider to retry after a 503")
            server.start()  # the store is back: the retry is accepted (and only then acknowledged)
            status, answer = await retry
            assert status == 200 and answer is not None and answer["duplicate"] is False, (status, answer)
            assert report.retries >= 2 and set(report.answers) == {200, 503}
            assert await prices(store) == {"home": 2.5, "away": 2.6, "draw": 2.7}  # in order, nothing lost
            r = await w.post(body, key="b")  # now it is remembered
            assert r.json()["duplicate"] is True
            assert w.source.unavailable >= 2
    finally:
        await store.close()
        server.stop()


async def test_restart_continues_the_source_session(store: Store) -> None:
    """A restarted source (run by the supervisor's ``run_source``) restores its
    markets and cursor: later odds are deltas of the stored markets, which stay
    confirmed, and a late copy of an old body still cannot move them back."""
    t0 = now_ms() - 3_000
    old = odds(1, 2.0, ts=t0)
    async with running(store) as w:
        assert (await w.post(old)).status_code == 200
        assert (await w.post(odds(2, 2.2, ts=t0 + 100))).status_code == 200
    before = await store.get_market("px:f1:match_odds")
    assert before is not None and before.session
    with socket.socket() as probe:  # a free port for a fixed-address spec
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = parse_source_spec(f"webhook=127.0.0.1:{port},secret={SECRET}")
    task = asyncio.create_task(run_source(store, Settings(), spec))
    try:
        url = f"http://127.0.0.1:{port}/ingest/webhook/{NAME}"
        async with httpx.AsyncClient(timeout=10) as client:
            async def post(body: bytes) -> int:
                stamp = str(now_ms() // 1000)
                r = await client.post(url, content=body, headers={
                    "X-Timestamp": stamp, "X-Idempotency-Key": uuid.uuid4().hex,
                    "X-Signature": sign(SECRET.encode(), body, stamp)})
                return r.status_code

            async def listening() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(url)).status_code == 405
                return False
            await eventually(listening, 10, "the restarted source to listen")
            assert await post(old) == 200  # late copy after the restart
            assert await post(odds(3, 4.0, ts=t0 + 200, sel="away")) == 200
        after = await store.get_market("px:f1:match_odds")
        assert after is not None and {s.selection_id: s.price for s in after.selections} == {"home": 2.2, "away": 4.0}
        assert after.session == before.session and after.seq == before.seq + 1  # a delta, same upstream session
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


# --- the long run ------------------------------------------------------------------------


async def test_thousand_deliveries_with_duplicates_and_reordering_equal_the_truth(store: Store) -> None:
    async with running(store, ",max_body_bytes=65536") as w:
        pusher = WebhookPusher(PusherConfig(url=w.url, secret=SECRET, seed=5, duplicate_share=0.10,
                                            reorder_share=0.05, bad_signature_share=0.01, expired_share=0.01,
                                            oversized_share=0.01, oversize_bytes=70_000), client=w.client)
        deliveries = pusher.generate(1000)
        assert len(deliveries) >= 1000
        report = await pusher.push(deliveries)
        assert report.failed == 0, report.failures
        assert report.acknowledged == report.messages == len(deliveries)
        assert report.duplicates_sent >= 60 and report.reordered >= 25, report
        # a replayed key is acknowledged as a duplicate; a new key re-delivers (dropped by entry id)
        assert report.duplicate_answers == (report.duplicates_sent + 1) // 2
        for kind, status in (("bad_signature", 401), ("expired", 401), ("oversized", 413)):
            assert report.fault_answers[(kind, status)] == report.faults[kind], report.fault_answers
        truth = pusher.truth()
        markets = [m for m in await store.load_all_markets() if m.source == NAME]
        assert all(m.session for m in markets)  # nothing was dropped as out of order: every market is confirmed
        stored = {m.market_id: market_view(m) for m in markets}
        assert stored.keys() == truth.keys()
        diff = {k: {"truth": truth[k], "stored": stored[k]} for k in truth if stored[k] != truth[k]}
        assert not diff, orjson.dumps(diff, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
        assert sum(s for k, s in report.answers.items() if 500 <= k) == 0


# --- units -------------------------------------------------------------------------------


def test_a_retried_older_delivery_without_times_never_moves_a_market_back() -> None:
    """Odds with neither ``timestamp`` nor ``emitted_at`` were timed at receipt, so an older
    delivery retried after a newer one (its first attempt answered 503) replaced the newer price
    and read fresh (found by the normaliser audit). Their entry id's ``<ms>`` is a provider time:
    it orders them (``n`` breaks a tie) and is their ``source_ts``."""
    now = now_ms()
    n, book = WebhookNormaliser(NAME), Book()

    def deliver(entry: str, price: float, recv: int, status: str = "live") -> Any:
        body = orjson.dumps({"type": "odds", "entry_id": entry, "data": [
            {"fixture": {"id": "f1", "sport": "Soccer", "home": "A", "away": "B", "status": status},
             "market": {"id": "match_odds"}, "selection": {"id": "home", "name": "A"}, "price": price}]})
        batch = n.feed(body, recv)
        for u in batch.updates:
            book.apply(u, recv)
        return batch

    deliver(f"{now - 9000}-1", 2.10, now - 8000)
    deliver(f"{now - 3000}-2", 2.50, now - 2900)
    # sent at now - 6000 (before entry 2), delivered now — carrying the fixture as it was then
    late = deliver(f"{now - 6000}-1", 1.95, now, status="not_started")
    m = book.markets["px:f1:match_odds"]
    assert (m.selection("home").price, m.in_play) == (2.50, True)  # type: ignore[union-attr]
    assert late.updates == [] and n.dropped == {"stale_odd": 1}
    assert deliver(f"{now - 3000}-1", 1.90, now).updates == []  # same <ms>, an earlier n
    m = book.markets["px:f1:match_odds"]
    assert (m.selection("home").price, m.source_ts, m.in_play) == (2.50, now - 3000, True)  # type: ignore[union-attr]
    assert deliver(f"{now - 3000}-3", 2.60, now).updates  # same <ms>, a later n: newer
    assert book.markets["px:f1:match_odds"].selection("home").price == 2.60  # type: ignore[union-attr]
    # an entry id's <ms> is checked like emitted_at: one far ahead of receipt rejects the odd's market
    ahead = deliver(f"{now + 3_600_000}-4", 9.0, now)
    assert [(e.reason, e.market_id) for e in ahead.rejected] == [("clock_skew", "px:f1:match_odds")]
    assert book.markets["px:f1:match_odds"].selection("home").price == 2.60  # type: ignore[union-attr]


def test_nonce_cache_evicts_by_age_and_caps_its_size() -> None:
    c = NonceCache(max_count=3)
    c.remember("a", 1_000, 0)
    c.remember("b", 2_000, 0)
    assert c.seen("a", 500) and c.seen("b", 500)
    assert not c.seen("a", 1_000) and len(c) == 1  # expired and gone
    for k in ("c", "d", "e"):
        c.remember(k, 10_000, 1_500)
    assert len(c) == 3 and not c.seen("b", 1_500) and c.evicted_early == 1


def test_timestamps_and_options() -> None:
    assert parse_timestamp_ms("1767000000") == 1_767_000_000_000
    assert parse_timestamp_ms("1767000000.5") == 1_767_000_000_500
    assert parse_timestamp_ms("1767000000123") == 1_767_000_000_123
    assert parse_timestamp_ms("1.7e9") is None and parse_timestamp_ms("") is None
    with pytest.raises(ConfigError, match="secret"):
        parse_source_spec("webhook=127.0.0.1:0")
    from feed.sources.webhook import from_spec
    with pytest.raises(ConfigError, match="signature_encoding"):
        from_spec(parse_source_spec(f"webhook=127.0.0.1:0,secret={SECRET},signature_encoding=rot13"), Settings())
    with pytest.raises(ConfigError, match="HOST:PORT"):
        from_spec(parse_source_spec(f"webhook=localhost,secret={SECRET}"), Settings())
    with pytest.raises(ConfigError, match="WH_SECRET_UNSET"):
        from_spec(parse_source_spec("webhook=127.0.0.1:0,secret_env=WH_SECRET_UNSET"), Settings())
    src = from_spec(parse_source_spec(f"webhook=http://127.0.0.1:8091,secret={SECRET},name=wh2"), Settings())
    assert src.path == "/ingest/webhook/wh2" and src.options.port == 8091 and src.confirms_by_messages
    assert SECRET not in repr(src.options)
    from feed.sources.registry import REGISTRY
    from feed.sources.webhook import WEBHOOK_OPTIONS
    assert REGISTRY["webhook"].options == WEBHOOK_OPTIONS


def test_a_delivered_handicap_without_its_line_is_rejected_and_its_fixed_redelivery_applies() -> None:
    """A webhook delivery is a push message: an Asian handicap without ``market.line`` would be
    filed on the level-ball line (found by the best-price audit); it is rejected alone
    (``missing_line``), its delivery not remembered, so the provider's fixed one applies."""
    now = now_ms()
    n, book = WebhookNormaliser(NAME), Book()

    def deliver(entry: str, market: dict[str, Any]) -> Any:
        body = orjson.dumps({"type": "odds", "entry_id": entry, "emitted_at": now - 1000, "data": [
            {"fixture": {"id": "f1", "sport": "Soccer", "home": "A", "away": "B"}, "market": market,
             "selection": {"id": sel, "name": name}, "price": price}
            for sel, name, price in (("a", "A -1.5", 3.3), ("b", "B +1.5", 1.33))]})
        batch = n.feed(body, now)
        for u in batch.updates:
            book.apply(u, now)
        return batch

    bad = deliver(f"{now - 1000}-1", {"id": "spread"})
    assert [(e.reason, e.market_id) for e in bad.rejected] == [("missing_line", "px:f1:spread")]
    assert bad.updates == [] and book.markets == {}
    fixed = deliver(f"{now - 1000}-1", {"id": "spread", "line": -1.5})
    assert fixed.rejected == [] and [u.market_id for u in fixed.updates] == ["px:f1:spread:-1.5"]
    assert book.markets["px:f1:spread:-1.5"].specifiers == {"line": "-1.5"}


def test_a_delivered_scores_item_takes_the_markets_in_play_and_a_late_one_never_moves_it_back() -> None:
    """A webhook ``scores`` delivery taking a fixture live left its markets pre-match (only odds and
    ``fixture-status`` moved ``in_play``; found by the in-play audit). It moves them as a
    ``fixture-status`` does, ordered by provider time: a delivery older than the in-play flag held
    (an overtaken scores item, a retried pre-match odd) never takes the markets back pre-match."""
    now = now_ms()
    n, book = WebhookNormaliser(NAME), Book()

    def deliver(body: dict[str, Any], recv: int = now) -> Any:
        batch = n.feed(orjson.dumps(body), recv)
        for u in batch.updates:
            book.apply(u, recv)
        return batch

    def odd(entry_ms: int, n_: int, price: float, live: bool | None) -> dict[str, Any]:
        fixture: dict[str, Any] = {"id": "f1", "sport": "Soccer", "home": "A", "away": "B"}
        if live is not None:
            fixture["is_live"] = live
        return {"type": "odds", "entry_id": f"{entry_ms}-{n_}", "data": [
            {"fixture": fixture, "market": {"id": "match_odds"}, "selection": {"id": "home", "name": "A"},
             "price": price}]}

    def scores(entry_ms: int, n_: int, **item: Any) -> dict[str, Any]:
        return {"type": "scores", "entry_id": f"{entry_ms}-{n_}", "data": [{"fixture_id": "f1", **item}]}

    deliver(odd(now - 60_000, 1, 2.10, False))
    batch = deliver(scores(now - 30_000, 2, status="live", is_live=True, score={"home": 0, "away": 0}))
    assert [(e.status, e.in_play) for e in batch.event_states] == [("LIVE", True)]
    assert [(u.market_id, u.header is not None and u.header.in_play) for u in batch.updates] == [
        ("px:f1:match_odds", True)]
    m = book.markets["px:f1:match_odds"]
    assert (m.in_play, m.source_ts) == (True, now - 30_000)
    # a pre-match odd sent before the scores item, delivered after it: its price, not its flag
    deliver(odd(now - 40_000, 3, 2.05, False))
    assert n.dropped == {"late_fixture_fields": 1}
    # an overtaken scores item saying not live: dropped (older than the fixture's state)
    assert deliver(scores(now - 35_000, 4, is_live=False)).updates == []
    m = book.markets["px:f1:match_odds"]
    assert (m.in_play, m.selection("home").price) == (True, 2.05)  # type: ignore[union-attr]
    # later odds without is_live keep it; a newer scores item ends it
    deliver(odd(now - 20_000, 5, 2.00, None))
    assert book.markets["px:f1:match_odds"].in_play is True
    batch = deliver(scores(now - 10_000, 6, status="ended", is_live=False))
    assert [u.header is not None and (u.header.in_play, u.header.status) for u in batch.updates] == [(False, "OPEN")]
    assert book.markets["px:f1:match_odds"].in_play is False


async def test_a_late_delivery_confirms_as_of_the_oldest_provider_time_it_carries(store: Store) -> None:
    """A webhook delivery confirms every market of its source; one arriving more than
    ODDSFEED_MAX_STREAM_LAG_MS after its provider time only as of that time + the bound (newer
    changes may be queued behind it). Its provider time was ``emitted_at`` alone, so a late retry
    without it — or re-stamped with a fresh one on every attempt — confirmed everything as of its
    arrival (review). It is the oldest credible time the delivery carries: ``min(emitted_at,
    entry id <ms>)``; a ``ping`` without ``emitted_at`` (no entry id either) and an exact
    re-delivery confirm nothing."""
    from feed.ingest import Ingest
    from feed.normalise.push import UNKNOWN_AGE_MS, PushNormaliser

    t = now_ms() - 120_000  # (every time below is in the past of the store's clock)
    ingest = Ingest(store, source="wh_lag", normaliser=WebhookNormaliser("wh_lag", prefix="wlag"), kind="webhook",
                    max_stream_lag_ms=500)
    ingest.confirm_by_messages = True

    def body(entry_ms: int, n: int, price: float, emitted: int | None = None) -> bytes:
        msg: dict[str, Any] = {"type": "odds", "entry_id": f"{entry_ms}-{n}", "data": [
            {"fixture": {"id": "f1", "sport": "Soccer", "home": "A", "away": "B"}, "market": {"id": "match_odds"},
             "selection": {"id": "home", "name": "A"}, "price": price}]}
        if emitted is not None:
            msg["emitted_at"] = emitted
        return orjson.dumps(msg)

    async def deliver(raw: bytes, recv: int) -> int:
        ingest.feed_lines([raw], recv)
        await ingest.flush()
        return ingest.health.last_message_at - t

    assert await deliver(body(t - 100, 1, 2.0), t) == 0  # on time, no emitted_at: as of its arrival
    # 5 s late without emitted_at: as of its entry's <ms> + 500 ms, not its arrival (+10 s)
    assert await deliver(body(t + 5_000, 2, 2.1), t + 10_000) == 5_500
    # a retry re-stamped with a fresh emitted_at, its entry 5 s old: the entry's time rules
    retried = body(t + 15_000, 3, 2.2, emitted=t + 20_000)
    assert await deliver(retried, t + 20_000) == 15_500
    m = await store.get_market("wlag:f1:match_odds")
    assert m is not None and m.selections[0].price == 2.2 and m.received_at == t + 20_000
    # emitted_at older than the entry's <ms>: the older one rules
    assert await deliver(body(t + 24_000, 4, 2.3, emitted=t + 23_000), t + 25_000) == 23_500
    assert ingest.stats.late_messages == 3
    # a ping without emitted_at is of unknown age: it confirms nothing; with a fresh one, as of it
    assert await deliver(b'{"type":"ping"}', t + 30_000) == 23_500
    assert await deliver(orjson.dumps({"type": "ping", "emitted_at": t + 30_900}), t + 31_000) == 31_000
    # an exact re-delivery (a retry of an applied entry) confirms nothing either
    assert await deliver(retried, t + 40_000) == 31_000

    # (the normaliser's figure, ms) an entry id far ahead of receipt is no credible time: emitted_at
    n = WebhookNormaliser("wh_lag2")
    assert n.feed(body(t + 3_600_000, 1, 2.0, emitted=t - 2_000), t).provider_ts == t - 2_000
    ahead = n.feed(body(t + 3_600_000, 2, 2.0), t)  # none at all: unknown age (its odd is rejected)
    assert ahead.provider_ts == UNKNOWN_AGE_MS and [e.reason for e in ahead.rejected] == ["clock_skew"]
    # a push stream keeps emitted_at: its entry id is an order key (a snapshot's may be old)
    assert PushNormaliser("push").feed(body(t - 9_000, 1, 2.0, emitted=t - 100), t).provider_ts == t - 100
