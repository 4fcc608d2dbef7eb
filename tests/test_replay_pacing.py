"""A paced replay of ESA recordings (``feed.sources.replay.Replay`` with a
speed): a recording's clock that jumps is not waited on, and files played
side by side each map their own clock onto now."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from feed.ingest import Ingest, now_ms
from feed.models import Market
from feed.sources.replay import Replay
from feed.store import Store

DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS


def image_line(mid: str, pt: int) -> bytes:
    """A Betfair ESA ``mcm`` with a market image (two runners)."""
    return json.dumps({"op": "mcm", "clk": f"c{pt}", "pt": pt, "mc": [{
        "id": mid, "img": True,
        "marketDefinition": {"eventId": "30001", "eventTypeId": "1", "marketType": "MATCH_ODDS",
                             "status": "OPEN", "inPlay": False, "bettingType": "ODDS", "numberOfWinners": 1,
                             "version": 1, "marketTime": "2030-01-01T12:00:00.000Z",
                             "runners": [{"id": 1, "status": "ACTIVE", "sortPriority": 1},
                                         {"id": 2, "status": "ACTIVE", "sortPriority": 2}]},
        "rc": [{"id": 1, "batb": [[0, 2.0, 10]]}, {"id": 2, "batb": [[0, 3.0, 10]]}]}]}).encode()


def price_line(mid: str, price: float, pt: int) -> bytes:
    return json.dumps({"op": "mcm", "clk": f"c{pt}", "pt": pt,
                       "mc": [{"id": mid, "rc": [{"id": 1, "batb": [[0, price, 10]]}]}]}).encode()


def back(m: Market) -> float | None:
    sel = m.selection("1")
    return sel.price if sel is not None else None


async def test_an_absurd_pt_is_not_waited_on(store: Store, tmp_path: Path) -> None:
    """One line stamped a year ahead among lines 100 ms apart: not waited on
    (the replay used to wait the year) and rejected as ``clock_skew``, as live;
    the lines after it are applied (not dropped as older than it) and the
    market's time maps onto now."""
    pt = 1_700_000_000_000
    path = tmp_path / "1.201"
    path.write_bytes(b"\n".join([image_line("1.201", pt), price_line("1.201", 2.2, pt + 100),
                                 price_line("1.201", 2.4, pt + YEAR_MS), price_line("1.201", 2.6, pt + 200),
                                 price_line("1.201", 2.8, pt + 300)]) + b"\n")
    ingest = Ingest(store, source="paced")
    t0 = now_ms()
    summary = await asyncio.wait_for(Replay([path], ingest, speed=1.0).run(), 60)
    assert summary.messages == 5 and summary.rejected_by_reason == {"clock_skew": 1}
    m = await store.get_market("bf:1.201")
    assert m is not None and back(m) == 2.8
    assert t0 <= m.source_ts <= now_ms() + 1000  # mapped onto the replay's own time


async def test_a_jump_of_the_recording_clock_is_not_waited_on(store: Store, tmp_path: Path) -> None:
    """The recording's clock jumps a day ahead and goes on from there (more
    than ``max_gap_ms``): not waited on; the lines after the jump are applied
    and map onto now. A last line alone a day ahead is one absurd pt: not
    waited on either, and rejected as it would be live."""
    pt = 1_700_000_000_000
    path = tmp_path / "1.202"
    path.write_bytes(b"\n".join([image_line("1.202", pt), price_line("1.202", 2.2, pt + 50),
                                 price_line("1.202", 2.4, pt + DAY_MS), price_line("1.202", 2.6, pt + DAY_MS + 100),
                                 price_line("1.202", 9.0, pt + 2 * DAY_MS)]) + b"\n")
    ingest = Ingest(store, source="paced")
    t0 = now_ms()
    summary = await asyncio.wait_for(Replay([path], ingest, speed=1.0).run(), 60)
    assert summary.rejected_by_reason == {"clock_skew": 1}
    m = await store.get_market("bf:1.202")
    assert m is not None and back(m) == 2.6
    assert t0 <= m.source_ts <= now_ms() + 1000


async def test_files_replayed_side_by_side_each_map_their_own_clock(store: Store, tmp_path: Path) -> None:
    """Two recordings from days apart, paced together: each file's times map
    onto now by its own first pt. (One shared mapping put the older file's
    markets days in the past — stale — or the newer one's days ahead — every
    line rejected as clock skew.)"""
    old, new = 1_700_000_000_000, 1_700_000_000_000 + 3 * DAY_MS
    a, b = tmp_path / "a" / "1.301", tmp_path / "b" / "1.302"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_bytes(b"\n".join([image_line("1.301", old), price_line("1.301", 2.2, old + 150)]) + b"\n")
    b.write_bytes(b"\n".join([image_line("1.302", new), price_line("1.302", 2.6, new + 150)]) + b"\n")
    ingest = Ingest(store, source="paced")
    t0 = now_ms()
    summary = await asyncio.wait_for(Replay([a, b], ingest, speed=1.0).run(), 60)
    assert summary.rejected == 0, summary.rejected_by_reason
    ma, mb = await store.get_market("bf:1.301"), await store.get_market("bf:1.302")
    assert ma is not None and mb is not None
    assert (back(ma), back(mb)) == (2.2, 2.6)
    for m in (ma, mb):
        assert t0 <= m.source_ts <= now_ms() + 1000, (m.market_id, m.source_ts - t0)
