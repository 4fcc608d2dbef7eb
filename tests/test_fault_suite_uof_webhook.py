"""The fault suite's UOF and webhook pieces (benchmarks/faults.py rows ``uof_*`` / ``webhook_*``):
the simulators' truth logs follow their own state, their fault switches do what the control
port says, the UOF simulator survives a broker failure, and the harness judges ``uof:`` /
``wh:`` markets. No broker, no Redis: the UOF model is stepped directly and the webhook
pusher delivers to an in-process httpx transport."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.fault_harness import (
    SOURCES,
    Probe,
    Truth,
    diff_markets,
    judge_probes,
    source_of,
)
from feed.simulator.control import SWITCHES, ControlServer
from feed.simulator.push_providers import MALFORMED as PUSH_MALFORMED
from feed.simulator.uof import UofSimConfig, UofSimulator
from feed.simulator.webhook_pusher import PusherConfig, WebhookPusher
from feed.sources.webhook import sign

pytestmark = pytest.mark.timeout(60)

SECRET = "whsec-suite"


def uof_sim(tmp_path: Path, **kw: Any) -> UofSimulator:
    cfg = {"amqp_url": "amqp://127.0.0.1:9/", "events": 6, "rate_per_s": 200.0, "seed": 11, "live_after_s": 0.05,
           "truth_log": str(tmp_path / "truth.jsonl"), **kw}
    return UofSimulator(UofSimConfig(**cfg))


def read_truth(path: Path) -> Truth:
    truth = Truth(path, aliases={})
    truth.poll()
    return truth


def test_uof_truth_log_follows_the_model_silent_producer_included(tmp_path: Path) -> None:
    sim = uof_sim(tmp_path)
    for _ in range(10):
        sim.advance(20)
        time.sleep(0.03)  # events age: in play, then settled
    sim.producer_down(1, seconds=30.0)  # silent: its messages are lost, its model goes on
    lost0, published_truth = sim.lost, read_truth(tmp_path / "truth.jsonl").records
    for _ in range(10):
        sim.advance(20)
        time.sleep(0.03)
    assert sim.lost > lost0
    truth = read_truth(tmp_path / "truth.jsonl")
    assert truth.records > published_truth
    model = sim.truth()
    assert len(model) > 18
    for mid, m in model.items():
        tm = truth.markets[mid]
        assert tm["status"] == m["status"], mid
        for sid, sel in m["selections"].items():
            rec = tm["sels"][sid]
            assert rec["sel_status"] == sel["status"], (mid, sid)
            if sel["price"] is not None:
                assert rec["price"] == sel["price"], (mid, sid)
    statuses = {json.loads(line)["status"] for line in (tmp_path / "truth.jsonl").read_text().splitlines()}
    assert {"OPEN", "SUSPENDED", "SETTLED"} <= statuses


def test_uof_poison_timestamps_and_clear_faults(tmp_path: Path) -> None:
    sim = uof_sim(tmp_path, live_after_s=60.0)
    sim.poison_timestamps([0, 4_102_444_800_000])
    sim.duplicate(2)
    assert sim.pending_faults() == 4
    for _ in range(20):
        sim.advance(5)
    bodies = [b for _, b, _ in sim._outbox]
    assert any(b'timestamp="0"' in b for b in bodies) and any(b'timestamp="4102444800000"' in b for b in bodies)
    assert sim.poisoned_sent == 2
    sim.fail_recovery(1)
    sim.stall(10.0)
    sim.clear_faults()
    assert sim.pending_faults() == 0
    stats = sim.control_stats()
    assert stats["poisoned_sent"] == 2 and set(stats["events_by_product"]) == {"1", "3"}


class _FlakyExchange:
    """Publishes ``ok`` messages, then fails like a closed channel."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.keys: list[str] = []

    async def publish(self, message: Any, routing_key: str) -> None:
        if len(self.keys) >= self.ok:
            raise ConnectionError("channel closed by the broker")
        self.keys.append(routing_key)


async def test_uof_broker_failure_keeps_what_was_not_published(tmp_path: Path) -> None:
    sim = uof_sim(tmp_path)
    for i in range(5):
        sim._outbox.append((f"k{i}", f"<alive product=\"1\" timestamp=\"{i + 1}\" subscribed=\"1\"/>".encode(), False))
    flaky = _FlakyExchange(ok=2)
    sim._exchange = flaky  # type: ignore[assignment]
    await sim._flush()
    assert flaky.keys == ["k0", "k1"] and sim.published == 2
    assert [k for k, _, _ in sim._outbox] == ["k2", "k3", "k4"]  # kept, in order, for the next link
    assert sim._exchange is None and sim.control_stats()["connected"] is False
    good = _FlakyExchange(ok=100)
    sim._exchange = good  # type: ignore[assignment]
    await sim._flush()
    assert good.keys == ["k2", "k3", "k4"] and not sim._outbox


class _BlockedExchange:
    """A broker blocking its publishers (a memory or disk alarm): publishes ``ok`` messages, then
    the next publish never completes."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.keys: list[str] = []
        self.hung = 0

    async def publish(self, message: Any, routing_key: str) -> None:
        if len(self.keys) >= self.ok:
            self.hung += 1
            await asyncio.Event().wait()
        self.keys.append(routing_key)


async def test_uof_blocked_broker_times_out_like_a_lost_link(tmp_path: Path) -> None:
    """A publish the broker never confirms ends after publish_timeout_s: the message and the rest
    stay queued in order, the link is dropped (reconnect), and the publish lock is free again, so
    alives and the link loop are not held by the broker."""
    sim = uof_sim(tmp_path, publish_timeout_s=0.2)
    for i in range(4):
        sim._outbox.append((f"k{i}", f"<alive product=\"1\" timestamp=\"{i + 1}\" subscribed=\"1\"/>".encode(), False))
    blocked = _BlockedExchange(ok=1)
    sim._exchange = blocked  # type: ignore[assignment]
    t0 = time.monotonic()
    await asyncio.wait_for(sim._flush(), 3)
    assert time.monotonic() - t0 < 1.5
    assert blocked.keys == ["k0"] and blocked.hung == 1 and sim.published == 1
    assert [k for k, _, _ in sim._outbox] == ["k1", "k2", "k3"]
    assert sim._exchange is None and not sim._publish_lock.locked()
    good = _FlakyExchange(ok=100)
    sim._exchange = good  # type: ignore[assignment]
    await sim._flush()
    assert good.keys == ["k1", "k2", "k3"] and not sim._outbox


class _SlowExchange:
    """A broker confirming every publish, each after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.keys: list[str] = []

    async def publish(self, message: Any, routing_key: str) -> None:
        await asyncio.sleep(self.delay_s)
        self.keys.append(routing_key)


async def test_uof_flush_of_a_slow_broker_is_bounded(tmp_path: Path) -> None:
    """A broker confirming slowly (each publish within the timeout): one flush stops starting
    publishes after publish_timeout_s and leaves the rest queued, in order, the link kept."""
    sim = uof_sim(tmp_path, publish_timeout_s=0.3)
    for i in range(20):
        sim._outbox.append((f"k{i}", b"<alive/>", False))
    slow = _SlowExchange(0.1)
    sim._exchange = slow  # type: ignore[assignment]
    t0 = time.monotonic()
    await sim._flush()
    assert time.monotonic() - t0 < 1.0
    assert 2 <= len(slow.keys) < 20 and sim._exchange is slow
    assert slow.keys + [k for k, _, _ in sim._outbox] == [f"k{i}" for i in range(20)]


class _Receiver:
    """A webhook receiver in miniature: signature, window, idempotency key, JSON."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.entries: list[str] = []
        self.answers: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        stamp = request.headers["X-Timestamp"]
        status, answer = 200, {"ok": True, "duplicate": False}
        if request.headers["X-Signature"] != sign(SECRET.encode(), body, stamp):
            status, answer = 401, {"error": "bad_signature"}
        elif abs(time.time() - int(stamp)) > 300:
            status, answer = 401, {"error": "timestamp_outside_window"}
        else:
            try:
                msg = json.loads(body)
            except ValueError:
                status, answer = 422, {"error": "rejected"}
            else:
                key = request.headers["X-Idempotency-Key"]
                if key in self.keys:
                    answer["duplicate"] = True
                else:
                    self.keys.add(key)
                    self.entries.append(str(msg.get("entry_id")))
        self.answers.append(status)
        return httpx.Response(status, json=answer)


async def test_webhook_pusher_live_mode_switches_and_truth(tmp_path: Path) -> None:
    receiver = _Receiver()
    client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    pusher = WebhookPusher(PusherConfig(url="http://receiver/ingest/webhook/webhook", secret=SECRET, events=4, seed=3,
                                        time_scale=600.0, rate_per_s=200.0, odds_per_message=2, history=10_000,
                                        tick_ms=20, truth_log=str(tmp_path / "truth.jsonl"), prefix="wh"),
                           client=client)
    await pusher.start()
    try:
        deadline = time.monotonic() + 10
        while pusher.report.acknowledged < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        pusher.duplicate(2)
        pusher.reorder(1, distance=2)
        pusher.inject_malformed(2)
        pusher.bad_signatures(1)
        pusher.expired(1)
        while pusher.pending_faults() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pusher.pending_faults() == 0
        pusher.freeze(True)
        while pusher.control_stats()["queued"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.7)  # (a held delivery goes once the queue is quiet)
    finally:
        await pusher.stop()
        await client.aclose()
    stats = pusher.control_stats()
    assert stats["duplicates_sent"] == 2 and stats["duplicate_answers"] == 1  # one with the same key, one new
    assert stats["reordered"] == 1 and stats["failed"] == 0 and stats["held"] == 0
    assert stats["fault_answers"] == {"malformed:422": 2, "bad_signature:401": 1, "expired:401": 1}
    assert PUSH_MALFORMED[0][1] == "invalid_json"
    order = [int(e.split("-")[1]) for e in receiver.entries]
    assert sorted(order) != order  # one delivery came late
    truth = read_truth(tmp_path / "truth.jsonl")
    sent = pusher.truth()
    assert sent and all(mid.startswith("px:") for mid in sent)
    for mid, m in sent.items():
        for sid, sel in m["selections"].items():
            rec = truth.markets["wh:" + mid[3:]]["sels"][sid]
            assert rec["price"] == sel["price"] and rec["sel_status"] == sel["status"], (mid, sid)
    assert {json.loads(line)["source"] for line in (tmp_path / "truth.jsonl").read_text().splitlines()} == {"webhook"}


def test_control_port_serves_uof_and_webhook(tmp_path: Path) -> None:
    sim = uof_sim(tmp_path)
    pusher = WebhookPusher(PusherConfig(url="http://127.0.0.1:9/", secret=SECRET, events=2, history=1000))
    control = ControlServer({"uof": sim, "webhook": pusher})
    assert control.call({"target": "uof", "op": "producer_down", "args": {"product": 1, "seconds": 5}})["ok"]
    assert control.call({"target": "webhook", "op": "duplicate", "args": {"n": 2}})["ok"]
    refused = control.call({"target": "uof", "op": "advance", "args": {"n": 1}})
    assert not refused["ok"] and "no switch" in refused["error"]
    stats = control.call({"op": "stats"})["result"]
    assert stats["uof"]["pending_faults"] == 1 and stats["webhook"]["pending_faults"] == 2
    assert control.call({"target": "*", "op": "clear_faults"})["ok"]
    assert sim.pending_faults() == 0 and pusher.pending_faults() == 0
    for target, cls in (("uof", UofSimulator), ("webhook", WebhookPusher)):
        assert all(callable(getattr(cls, op, None)) for op in SWITCHES[target])


def test_harness_judges_uof_and_webhook_markets(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"

    def rec(t: int, mid: str, sid: str, price: float, status: str = "OPEN", sel: str = "ACTIVE") -> str:
        return json.dumps({"t_ms": t, "source": "x", "market_id": mid, "selection_id": sid, "back": None,
                           "lay": None, "price": price, "status": status, "sel_status": sel}) + "\n"
    a, b = "uof:sr:match:7:1", "uof:sr:match:8:1"
    path.write_text(rec(1000, a, "1", 2.0) + rec(1000, b, "1", 3.0) + rec(2000, b, "1", 3.0, "SUSPENDED")
                    + rec(1000, "wh:f:win", "9", 1.5))
    truth = read_truth(path)
    node = {a: {"status": "SUSPENDED", "suspend_reason": "producer_down", "selections": []},
            b: {"status": "SUSPENDED", "selections": []},
            "wh:f:win": {"status": "OPEN", "selections": [{"selection_id": "9", "price": 1.6}]}}
    assert [d.split(": ")[0] for d in diff_markets(truth, node, ["uof:", "wh:"])] == [a, "wh:f:win/9"]
    assert source_of(a) == "uof"  # whether or not the uof source can run here
    assert source_of("wh:f:win") == "webhook"
    probes = [Probe(3000, a, "1", 200, "OK", 0, "DEGRADED", False), Probe(3000, b, "1", 300, "OK", 0, "UP", False)]
    j = judge_probes(probes, truth, {"uof:": 500}, {"uof:sr:match:7:": (2500, 4000)})
    assert (j["ok_dead"], j["wrong_fresh"]) == (1, 1)  # a inside its producer's dead window; b suspended since 2000


class _ScriptedRng:
    """random() / choice() of a UofSimulator step, scripted (choice: the first item)."""

    def __init__(self, r: float) -> None:
        self.r = r

    def random(self) -> float:
        return self.r

    def choice(self, seq: Any) -> Any:
        return list(seq)[0]

    def gauss(self, mu: float, sigma: float) -> float:
        return 0.0


def test_uof_rollback_during_a_bet_stop_sends_every_market_it_reopens(tmp_path: Path) -> None:
    """A rollback_bet_cancel ends the event's bet stop: the odds_change after it carries every market
    it reopens (the model offers them again; before, only the rolled-back market went out and the
    others stayed suspended at the consumer while the truth said OPEN)."""
    sim = uof_sim(tmp_path, live_after_s=600.0)
    ev = next(iter(sim.events.values()))
    stopped, cancelled = ev.markets[0], ev.markets[1]
    ev.bet_stop = True
    for m in ev.markets:
        m.code, m.reason = -1, "bet_stop"
    cancelled.code, cancelled.reason, cancelled.pre_cancel = -4, "bet_cancel", (-1, "bet_stop")
    sim._outbox.clear()
    sim.rng = _ScriptedRng(0.16)  # type: ignore[assignment]  # the rollback branch of _step
    sim._step()
    bodies = [b.decode() for _, b, _ in sim._outbox]
    assert bodies[0].startswith("<rollback_bet_cancel")
    odds = bodies[1]
    assert odds.startswith("<odds_change")
    assert f'<market id="{stopped.market_id}" status="1">' in odds
    assert f'<market id="{cancelled.market_id}" specifiers="{cancelled.spec}" status="1">' in odds
    assert all(m.code == 1 for m in ev.markets)


def test_every_row_exists_and_one_needing_a_missing_part_is_a_miss(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without rabbitmq-server (or aio-pika) every row still exists: the uof ones (ingest_kill_uof
    included) read n/a saying why, without a stack; the rows over every source run without uof and
    cannot read met (PARTIAL). Likewise ingest_clock_ahead without libfaketime."""
    import benchmarks.fault_harness as harness
    import benchmarks.faults as faults

    monkeypatch.setitem(harness.UNAVAILABLE, "uof", "rabbitmq-server not installed (test)")
    monkeypatch.setattr(faults, "FAKETIME_LIBS", ())
    names = [r.name for r in faults.ROWS]
    assert len(names) == len(set(names)) == 47 and "ingest_kill_uof" in names and "redis_back_older" in names
    assert "uof" in SOURCES and "uof" in faults.ALL
    rows = {r.name: r for r in faults.ROWS}
    for name in ("ingest_kill_uof", "uof_malformed", "uof_connection_close"):
        why, _ = rows[name].unavailable()
        assert why is not None and "rabbitmq-server not installed (test)" in why
    assert rows["ingest_clock_ahead"].unavailable()[0] == "libfaketime not installed (apt-get install faketime)"
    for name in ("redis_kill", "serve_kill", "storm"):
        assert rows[name].unavailable() == (None, {"uof": "rabbitmq-server not installed (test)"})
    assert rows["esa_drop"].unavailable() == (None, {})
    assert faults.verdict_of(False, True, {"uof": "x"}) == "PARTIAL"
    assert faults.verdict_of(False, True, {}) == "met"
    assert faults.verdict_of(False, False, {"uof": "x"}) == "MISSED"
    args = faults.parse_args(["--no-png"])
    res = asyncio.run(asyncio.wait_for(faults.run_row(faults.Env(args, tmp_path), rows["ingest_kill_uof"]), 5))
    assert res.verdict == "n/a" and "rabbitmq-server not installed (test)" in res.notes[0]
    assert not list(tmp_path.iterdir())  # no stack was built
    listing = faults._unavailable_lines()
    assert listing[0].startswith("NOT EVERY ROW CAN BE MET HERE") and "uof unavailable" in listing[1]


def test_two_changes_in_one_millisecond_both_count_as_offered(tmp_path: Path) -> None:
    # The UOF simulator can publish two odds changes of one outcome in one millisecond; the truth
    # kept only the second, so a node that showed the first for a moment was judged wrong-and-fresh
    # (uof_stall's unexplained baseline answer at 7.55, 2026-12-05)
    def rec(t: int, price: float) -> dict[str, Any]:
        return {"t_ms": t, "source": "uof", "market_id": "uof:sr:match:1111:1", "selection_id": "3", "back": None,
                "lay": None, "price": price, "status": "OPEN", "sel_status": "ACTIVE"}
    path = tmp_path / "truth.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [rec(1000, 6.6), rec(2000, 7.55), rec(2000, 7.0)]))
    truth = read_truth(path)

    def probe(t: int, price: float) -> Probe:
        return Probe(checked_at=t, market_id="uof:sr:match:1111:1", selection_id="3", price_h=round(price * 100),
                     reason="OK", age_ms=10, source_state="UP", in_play=True)
    # 7.55 held within 2000: shown within the allowance after it, fine; long after it, wrong-and-fresh
    j = judge_probes([probe(2500, 7.55), probe(2900, 7.0), probe(5000, 7.55)], truth, {"uof:": 1000})
    assert j["wrong_fresh"] == 1, j
    assert j["worst_ms"] == 3000 and "not offered it for 3000 ms" in j["examples"][0], j
    assert truth.offered_within("uof:sr:match:1111:1", "3", 755, 2000, 2000) is True
    assert truth.offered_within("uof:sr:match:1111:1", "3", 755, 2001, 4000) is False
