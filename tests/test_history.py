"""Price history (issue 12 item 4): written after each batched apply, trimmed by the retention
window, served by /v1/markets/{id}/history and /v1/price-at; a replay of a real recording fills
it; a failing history write never loses a price. Real redis-server (embedded), real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import require_shared_data
from feed.history import decode_tops, top_of
from feed.ingest import Ingest
from feed.settings import Settings
from feed.sources.replay import recording_files
from feed.store import Store, history_key
from feed.supervisor import run_replay
from streaming_helpers import eventually, make_app, now_ms, serve

NOW = 1_800_000_000_000  # 2027-01-15 08:00 UTC: provider times of the hand-made messages
HOUR = 3_600_000


def line(*mc: dict[str, Any], pt: int) -> bytes:
    return orjson.dumps({"op": "mcm", "id": 2, "clk": f"c{pt}", "pt": pt, "mc": list(mc)})


def image(market: str, back: float, *, pt: int) -> bytes:
    md = {"status": "OPEN", "inPlay": True, "betDelay": 0, "version": 1, "eventId": "30000",
          "eventTypeId": "1", "marketType": "MATCH_ODDS", "marketTime": "2027-01-15T12:00:00.000Z",
          "numberOfWinners": 1,
          "runners": [{"id": 1, "sortPriority": 1, "status": "ACTIVE"}, {"id": 2, "sortPriority": 2, "status": "ACTIVE"}]}
    return line({"id": market, "img": True, "marketDefinition": md,
                 "rc": [{"id": 1, "atb": [[back, 10]], "atl": [[back + 0.1, 7]]},
                        {"id": 2, "atb": [[4.0, 3]], "atl": [[4.2, 8]]}]}, pt=pt)


def price(market: str, back: float, *, pt: int, size: float = 12) -> bytes:
    return line({"id": market, "rc": [{"id": 1, "atb": [[back, size]]}]}, pt=pt)


async def history(store: Store, mid: str) -> list[tuple[int, int, list[Any]]]:
    """(id ms, seq, tops) of every entry of a market's history."""
    rows = await store.history_range(mid, "-", "+", count=100_000)
    return [(int(i.split("-")[0]), int(f[b"q"]), decode_tops(f[b"d"])) for i, f in rows]


async def ingest_with(store: Store, *messages: tuple[bytes, int], retention_ms: int = 24 * HOUR) -> Ingest:
    """An ingest (history on) fed ``(line, recv ms)`` pairs, one flush (one batched apply) each."""
    ingest = Ingest(store, source="betfair", history_retention_ms=retention_ms)
    for raw, recv in messages:
        ingest.feed_lines([raw], recv)
        await ingest.flush()
    return ingest


async def test_history_written_on_apply_images_and_deltas(store: Store) -> None:
    ingest = await ingest_with(store, (image("1.1", 2.0, pt=NOW), NOW + 5), (price("1.1", 2.2, pt=NOW + 1000), NOW + 1005))
    h = await eventually(lambda: _at_least(store, "bf:1.1", 2), what="two history entries")
    (t0, q0, tops0), (t1, q1, tops1) = h
    assert (t0, q0, t1, q1) == (NOW, 1, NOW + 1000, 2)
    # the image: every selection's top; the delta: only the selection that moved, its lay kept
    assert [(t.selection_id, t.bp, t.bs, t.lp, t.ls) for t in tops0] == [("1", 2.0, 10, 2.1, 7), ("2", 4.0, 3, 4.2, 8)]
    assert [(t.selection_id, t.bp, t.bs, t.lp, t.ls) for t in tops1] == [("1", 2.2, 12, 2.1, 7)]
    # several deltas in one batch: one entry each, in one write; an unchanged re-image adds nothing
    ingest.feed_lines([price("1.1", 2.3, pt=NOW + 2000), price("1.1", 2.4, pt=NOW + 2500)], NOW + 2505)
    await ingest.flush()
    ingest.feed_lines([image("1.2", 3.0, pt=NOW + 2600)], NOW + 2605)
    await ingest.flush()
    h = await eventually(lambda: _at_least(store, "bf:1.1", 4), what="four history entries")
    assert [(t, q, tops[0].bp) for t, q, tops in h[2:]] == [(NOW + 2000, 3, 2.3), (NOW + 2500, 4, 2.4)]
    assert len(await eventually(lambda: _at_least(store, "bf:1.2", 1))) == 1
    assert ingest.history.failures == 0 and ingest.history.written == 5
    assert 0 < await store.redis.pttl(history_key(0, "bf:1.1")) <= 24 * HOUR


async def _at_least(store: Store, mid: str, n: int) -> list[Any] | None:
    h = await history(store, mid)
    return h if len(h) >= n else None


async def test_history_trimmed_by_retention_window(store: Store) -> None:
    retention = 10_000
    ingest = Ingest(store, source="betfair", history_retention_ms=retention)
    ingest.feed_lines([image("1.1", 2.0, pt=NOW)], NOW + 5)
    await ingest.flush()
    # 400 changes 10 ms apart (4 s), then one 60 s later: everything before NOW + 60 s − 10 s goes,
    # to within one stream node (XADD MINID ~ trims whole nodes of ≤ 100 entries)
    for i in range(1, 401):
        ingest.feed_lines([price("1.1", round(2.0 + i * 0.01, 2), pt=NOW + 10 * i)], NOW + 10 * i + 5)
        await ingest.flush()
    assert await eventually(lambda: _at_least(store, "bf:1.1", 401), what="401 entries")
    ingest.feed_lines([price("1.1", 9.0, pt=NOW + 60_000)], NOW + 60_005)
    await ingest.flush()

    async def trimmed() -> list[Any] | None:
        h = await history(store, "bf:1.1")
        return h if h and h[-1][0] == NOW + 60_000 else None
    h = await eventually(trimmed, what="the late entry")
    old = [t for t, _, _ in h if t < NOW + 60_000 - retention]
    assert len(old) < 100, f"{len(old)} entries older than the window are left"
    assert h[0][0] > NOW + 3000  # the oldest nodes are gone
    assert 0 < await store.redis.pttl(history_key(0, "bf:1.1")) <= retention  # a quiet market's history expires


async def test_history_off_writes_nothing(store: Store) -> None:
    ingest = await ingest_with(store, (image("1.1", 2.0, pt=NOW), NOW + 5), retention_ms=0)
    assert await ingest.history.idle() and await history(store, "bf:1.1") == []
    assert await store.get_market("bf:1.1") is not None


async def test_history_and_price_at_endpoints(store: Store, redis_url: str) -> None:
    await ingest_with(store, (image("1.1", 2.0, pt=NOW), NOW + 5), (price("1.1", 2.2, pt=NOW + 1000), NOW + 1005),
                      (price("1.1", 2.4, pt=NOW + 3000, size=5), NOW + 3005))
    await eventually(lambda: _at_least(store, "bf:1.1", 3), what="history")
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        await eventually(lambda: _served(c, "bf:1.1"), what="the market on the node")

        async def at(ts: int, side: str = "back", sel: str = "1") -> httpx.Response:
            return await c.get("/v1/price-at", params={"market": "bf:1.1", "selection": sel, "side": side, "ts": ts})

        r = await at(NOW + 1000)  # exactly at a change
        assert r.status_code == 200, r.text
        b = r.json()
        assert (b["price"], b["size"], b["age_ms"]) == (2.2, 12, 0)
        assert b["change"]["at"] == NOW + 1000 and b["change"]["seq"] == 2 and b["change"]["received_at"] == NOW + 1005
        assert b["change"]["id"].startswith(f"{NOW + 1000}-")
        b = (await at(NOW + 2999)).json()  # between changes: the earlier one, 1999 ms old
        assert (b["price"], b["size"], b["age_ms"], b["change"]["seq"]) == (2.2, 12, 1999, 2)
        b = (await at(NOW + 2999, side="lay")).json()
        assert (b["price"], b["size"]) == (2.1, 7)
        b = (await at(NOW + 10_000, sel="2")).json()  # selection 2 never moved after the image
        assert (b["price"], b["age_ms"], b["change"]["seq"]) == (4.0, 10_000, 1)
        r = await at(NOW - 1)  # before the first change
        assert r.status_code == 404 and r.json()["error"] == "no_price"
        assert f"starts at {NOW}" in r.json()["message"]
        r = await c.get("/v1/price-at", params={"market": "bf:9.9", "selection": "1", "ts": NOW})
        assert r.status_code == 404 and "no price history of market 'bf:9.9'" in r.json()["message"]

        r = await c.get("/v1/markets/bf:1.1/history", params={"from": NOW, "to": NOW + 3999, "resolution": 2000})
        assert r.status_code == 200, r.text
        h = r.json()
        assert (h["from"], h["to"], h["resolution"], h["entries"], h["truncated"], h["oldest"]) == \
            (NOW, NOW + 3999, 2000, 3, False, NOW)
        s1, s2 = h["selections"]
        assert s1["start"] is None and s2["selection_id"] == "2"
        # last change per bucket: [NOW, NOW+2000) → 2.2 (at NOW+1000), [NOW+2000, NOW+4000) → 2.4
        assert [(p["t"], p["at"], p["back_price"], p["back_size"], p["lay_price"]) for p in s1["points"]] == \
            [(NOW, NOW + 1000, 2.2, 12, 2.1), (NOW + 2000, NOW + 3000, 2.4, 5, 2.1)]
        assert [(p["t"], p["back_price"]) for p in s2["points"]] == [(NOW, 4.0)]
        # one selection; a window starting between changes carries the state at `from`
        h = (await c.get("/v1/markets/bf:1.1/history",
                         params={"selection": "1", "from": NOW + 1500, "to": NOW + 3500})).json()
        [s1] = h["selections"]
        assert s1["start"]["back_price"] == 2.2 and s1["start"]["at"] == NOW + 1000 and s1["start"]["t"] == NOW + 1500
        assert [p["back_price"] for p in s1["points"]] == [2.4]
        # a served market without history in the window: 200, no points; unknown market: 404
        assert (await c.get("/v1/markets/bf:1.1/history", params={"from": 0, "to": 1000})).json()["selections"] == []
        r = await c.get("/v1/markets/bf:9.9/history")
        assert r.status_code == 404 and r.json()["error"] == "unknown_market"
        assert (await c.get("/v1/markets/bf:1.1")).json()["market_id"] == "bf:1.1"  # the market route still answers
        # as the board's sparklines ask: the id URL-encoded, the last hour in 60 buckets
        r = await c.get("/v1/markets/bf%3A1.1/history", params={"from": NOW - HOUR + 4000, "to": NOW + 4000,
                                                                 "resolution": HOUR // 60})
        assert r.status_code == 200 and [p["back_price"] for p in r.json()["selections"][0]["points"]] == [2.4]


async def _served(c: httpx.AsyncClient, mid: str) -> bool:
    return (await c.get(f"/v1/markets/{mid}")).status_code == 200


@pytest.mark.parametrize(("path", "params", "says"), [
    ("/v1/markets/bf:1.1/history", {"from": "yesterday"}, "from must be an integer (ms since the Unix epoch, UTC)"),
    ("/v1/markets/bf:1.1/history", {"to": "1.5"}, "to must be an integer"),
    ("/v1/markets/bf:1.1/history", {"from": 2000, "to": 1000}, "from (2000) must not be after to (1000)"),
    ("/v1/markets/bf:1.1/history", {"from": 0, "to": 1000, "resolution": 0}, "resolution must be ≥ 1"),
    ("/v1/markets/bf:1.1/history", {"from": 0, "to": HOUR, "resolution": 1000}, "use resolution ≥ 1801"),
    ("/v1/markets/bf:1.1/history", {"from": -5}, "from must be ≥ 0"),
    ("/v1/price-at", {"market": "bf:1.1", "selection": "1"}, "missing ts"),
    ("/v1/price-at", {"ts": NOW}, "missing market, selection"),
    ("/v1/price-at", {"market": "bf:1.1", "selection": "1", "ts": NOW, "side": "middle"},
     "side must be one of back, lay, ltp, price"),
    ("/v1/price-at", {"market": "bf:1.1", "selection": "1", "ts": "now"}, "ts must be an integer"),
    # past 2^64 Redis refused them as stream ids and the answer was 503 store_unavailable (API probe)
    ("/v1/price-at", {"market": "bf:1.1", "selection": "1", "ts": str(2**64)}, "ts must be ≤ 4102444800000"),
    ("/v1/markets/bf:1.1/history", {"to": str(2**64)}, "to must be ≤ 4102444800000"),
    ("/v1/price-at", {"market": "bf:1.1", "selection": "1", "ts": "\u0661\u0662\u0663"}, "ts must be an integer"),
])
async def test_bad_parameters_say_what_to_fix(store: Store, redis_url: str, path: str, params: dict[str, Any],
                                             says: str) -> None:
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get(path, params=params)
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
        assert says in r.json()["message"], r.json()["message"]


async def test_history_write_failure_does_not_lose_the_price(store: Store) -> None:
    # a real Redis error on the history write: the market's history key holds a string (WRONGTYPE)
    await store.redis.set(history_key(0, "bf:1.1"), "not a stream")
    ingest = Ingest(store, source="betfair", history_retention_ms=HOUR)
    ingest.feed_lines([image("1.1", 2.0, pt=NOW)], NOW + 5)
    written = await ingest.flush()
    assert [d.seq for d in written] == [1] and ingest.store_ok
    m = await store.get_market("bf:1.1")
    assert m is not None and m.selections[0].back[0] == (2.0, 10)
    await eventually(lambda: ingest.history.failures == 1, what="the failed history write counted")
    assert ingest.history.entries_lost == 1 and "WRONGTYPE" in (ingest.history.last_error or "")
    # prices keep flowing; the history resumes once its key is writable again
    await store.redis.delete(history_key(0, "bf:1.1"))
    ingest.feed_lines([price("1.1", 2.2, pt=NOW + 1000)], NOW + 1005)
    assert [d.seq for d in await ingest.flush()] == [2]
    h = await eventually(lambda: _at_least(store, "bf:1.1", 1), what="history after the failure")
    assert [(t, q, tops[0].bp, tops[0].lp) for t, q, tops in h] == [(NOW + 1000, 2, 2.2, 2.1)]
    m = await store.get_market("bf:1.1")
    assert m is not None and m.seq == 2 and m.selections[0].back[0] == (2.2, 12)


async def test_history_write_hanging_does_not_hold_the_apply(store: Store) -> None:
    import asyncio

    ingest = Ingest(store, source="betfair", history_retention_ms=HOUR)
    ingest.history.write_timeout_s = 0.2
    never = asyncio.Event()

    async def hang(*_: Any) -> int:
        await never.wait()
        return 0
    setattr(ingest.history, "store", type("Hung", (), {"write_history": staticmethod(hang)})())  # noqa: B010
    for i in range(3):  # each flush returns at once although every history write hangs
        ingest.feed_lines([price("1.1", 2.0 + i / 10, pt=NOW + i) if i else image("1.1", 2.0, pt=NOW)], NOW + 5 + i)
        async with asyncio.timeout(10.0):  # (a hang would never end; 10 s: generous under load)
            assert len(await ingest.flush()) == 1
    assert (await store.get_market("bf:1.1")).seq == 3  # type: ignore[union-attr]
    await eventually(lambda: ingest.history.failures >= 1, what="the hung history write given up")
    assert await ingest.history.idle(2.0)


async def test_replay_of_a_real_recording_fills_history(store: Store, redis_url: str) -> None:
    data = require_shared_data()
    path = data / "betfair_parser" / "1.242971311.bz2"
    if not path.is_file():
        files = [p for p in recording_files([data]) if p.suffix == ".bz2"]
        if not files:
            pytest.skip(f"no .bz2 Betfair recording under {data}")
        path = Path(files[0])
    summary = await run_replay(store, Settings(history_retention_ms=24 * HOUR), [path], speed=None)
    assert summary.deltas > 0
    markets = await store.load_all_markets()
    assert markets
    checked = 0
    for m in markets:
        h = await history(store, m.market_id)
        assert h, f"no history of {m.market_id}"
        last: dict[str, Any] = {}
        for _, _, tops in h:
            for t in tops:
                last[t.selection_id] = t
        assert h[-1][1] <= m.seq
        for sel in m.selections:  # the history's last top of every selection is the stored one
            if sel.selection_id in last:
                assert last[sel.selection_id] == top_of(sel), (m.market_id, sel.selection_id)
                checked += 1
    assert checked
    m = max(markets, key=lambda x: len(x.selections))
    recorded = {t.selection_id for _, _, tops in await history(store, m.market_id) for t in tops}
    sel = next(s for s in m.selections if s.selection_id in recorded)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        await eventually(lambda: _served(c, m.market_id), what="the replayed market on the node")
        r = await c.get("/v1/price-at", params={"market": m.market_id, "selection": sel.selection_id,
                                                 "ts": now_ms() + 1000})
        assert r.status_code == 200, r.text
        want = sel.back[0] if sel.back else (None, None)
        assert (r.json()["price"], r.json()["size"]) == (want[0], want[1])
        h = (await c.get(f"/v1/markets/{m.market_id}/history",
                         params={"selection": sel.selection_id, "from": now_ms() - HOUR, "to": now_ms() + 1000})).json()
        assert h["entries"] > 0 and h["selections"][0]["points"][-1]["back_price"] == want[0]


async def test_memory_per_market_hour(store: Store) -> None:
    """An hour of one market (3 runners) at one applied change per second, each moving one or two
    runners' tops, written as the ingest writes it; reports MEMORY USAGE (README, price history)."""
    from feed.history import Top, _ENCODER

    rows = []
    for i in range(3600):
        moved = [Top(str(i % 3 + 1), round(2.0 + (i % 50) / 100, 2), 100.0 + i % 700, round(2.02 + (i % 50) / 100, 2),
                     55.5 + i % 300, round(2.01 + (i % 50) / 100, 2), None)]
        if i % 2:
            moved.append(Top(str((i + 1) % 3 + 1), 3.5, 20.0 + i % 90, 3.55, 12.0, 3.5, None))
        rows.append((NOW + i * 1000, NOW + i * 1000 + 40, i + 1, _ENCODER.encode(moved)))
    for i in range(0, len(rows), 500):  # as batches of the ingest would
        await store.write_history({"bf:1.1": rows[i:i + 500]}, 2 * HOUR)
    used = await store.history_bytes("bf:1.1")
    assert used is not None
    print(f"\nprice history: 3600 changes (1/s, 1.5 runners each) of one market = {used:,} bytes "
          f"({used / 3600:.0f} B/change)")
    assert used < 3600 * 200  # well under 200 B per change


async def test_board_draws_a_sparkline_per_selection(store: Store, redis_url: str) -> None:
    from test_board_browser import _chromium, browser

    if _chromium() is None:
        pytest.skip("needs chromium (Debian package chromium) for the board's sparklines")
    t = now_ms() - 60_000  # within the board's last hour
    await ingest_with(store, (image("1.1", 2.0, pt=t), t + 5), (price("1.1", 2.2, pt=t + 1000), t + 1005),
                      (price("1.1", 2.6, pt=t + 30_000), t + 30_005))
    await eventually(lambda: _at_least(store, "bf:1.1", 3), what="history")
    async with serve(make_app(redis_url)) as base, browser(base + "/") as page:
        n = await page.until("document.querySelectorAll('[data-market-id=\"bf:1.1\"] svg.spark').length",
                             "a sparkline on the market's rows")
        assert n == 1  # selection 2 never moved: one point, no line
        assert await page.js("document.querySelector('svg.spark').classList.contains('up')")
        assert await page.js("document.querySelector('svg.spark').dataset.to") == "2.6"
        assert not page.errors()
