"""Ingest: a settled market pruned, then re-created under the same id after an ingest restart,
continues above its old seq (docs/architecture.md §69) — a client that still holds the old market
(nodes never tell clients about a prune; they drop every delta whose seq is not above the one they
hold) ends with the new market's book, not new deltas applied on top of the old one."""

from __future__ import annotations

from typing import Any

import orjson

from feed.ingest import Ingest
from feed.models import Market, apply_delta
from feed.store import Store

NOW = 1_800_000_000_000  # 2027-01-15
HOUR = 3_600_000


def line(*mc: dict[str, Any], pt: int) -> bytes:
    return orjson.dumps({"op": "mcm", "id": 2, "clk": f"c{pt}", "pt": pt, "mc": list(mc)})


def definition(status: str = "OPEN") -> dict[str, Any]:
    return {"status": status, "inPlay": True, "betDelay": 0, "version": 1, "eventId": "30000",
            "eventTypeId": "1", "marketType": "MATCH_ODDS", "marketTime": "2027-01-15T12:00:00.000Z",
            "numberOfWinners": 1,
            "runners": [{"id": 1, "sortPriority": 1, "status": "ACTIVE"}, {"id": 2, "sortPriority": 2, "status": "ACTIVE"}]}


def image(market: str, back: float, *, pt: int) -> bytes:
    return line({"id": market, "img": True, "marketDefinition": definition(),
                 "rc": [{"id": 1, "atb": [[back, 10]], "atl": [[back + 0.1, 7]]},
                        {"id": 2, "atb": [[4.0, 3]], "atl": [[4.2, 8]]}]}, pt=pt)


def price(market: str, back: float, *, pt: int) -> bytes:
    return line({"id": market, "rc": [{"id": 1, "atb": [[back, 12]]}]}, pt=pt)


def closed(market: str, *, pt: int) -> bytes:
    return line({"id": market, "marketDefinition": definition("CLOSED")}, pt=pt)


async def settled_and_pruned(store: Store) -> tuple[Market, str]:
    """bf:1.1 imaged, priced, closed, then pruned past the retention by its ingest. Returns the
    market a client holds (and keeps) and the log head before anything re-creates it."""
    a = Ingest(store, source="betfair", settled_retention_ms=HOUR, clock_ms=lambda: NOW + 3 * HOUR)
    for raw, pt in ((image("1.1", 2.0, pt=NOW), NOW), (price("1.1", 2.2, pt=NOW + 1000), NOW + 1000),
                    (closed("1.1", pt=NOW + 2000), NOW + 2000)):
        a.feed_lines([raw], pt + 5)
        await a.flush()
    held = await store.get_market("bf:1.1")
    assert held is not None and held.seq == 3 and held.status == "CLOSED"
    assert await a.prune_closed() == 1 and await store.get_market("bf:1.1") is None
    return held, await store.last_log_id(0)


async def client_after(store: Store, held: Market, head: str) -> Market | None:
    """What a client holding ``held`` has after the log entries since ``head`` (its rule: drop
    every delta or image whose seq is not above the held one)."""
    m: Market | None = held
    for _, deltas in await store.log_range(0, head):
        for d in deltas:
            if m is None or d.seq > m.seq:
                m = apply_delta(m, d)
    return m


async def test_a_pruned_market_recreated_after_an_ingest_restart_starts_above_its_old_seq(store: Store) -> None:
    held, head = await settled_and_pruned(store)
    b = Ingest(store, source="betfair")  # the ingest restarted: restore seeds the book from the store
    await b.restore()
    b.feed_lines([image("1.1", 5.0, pt=NOW + 4 * HOUR)], NOW + 4 * HOUR + 5)
    written = await b.flush()
    assert [(d.kind, d.seq) for d in written] == [("image", 4)] and b.rebased == 0
    b.feed_lines([price("1.1", 5.2, pt=NOW + 4 * HOUR + 1000)], NOW + 4 * HOUR + 1005)
    assert [(d.kind, d.seq) for d in await b.flush()] == [("delta", 5)]
    stored = await store.get_market("bf:1.1")
    assert stored is not None and stored.seq == 5 and stored.status == "OPEN"
    assert stored.selections[0].back[0] == (5.2, 12)
    assert await client_after(store, held, head) == stored  # not 5.2's delta applied to the old book


async def test_an_ingest_that_forgot_a_pruned_market_reimages_it_above_the_stores_floor(store: Store) -> None:
    """The ingest that re-creates the market did not restore the floor (it restored before the
    prune, or another ingest pruned it): the store refuses seq 1, and the same flush writes one
    image of the market's current state above the floor in place of its deltas."""
    held, head = await settled_and_pruned(store)
    b = Ingest(store, source="betfair")  # no restore: its book knows nothing of bf:1.1 nor of the floor
    b.feed_lines([image("1.1", 5.0, pt=NOW + 4 * HOUR), price("1.1", 5.2, pt=NOW + 4 * HOUR + 500)],
                 NOW + 4 * HOUR + 505)
    written = await b.flush()
    assert [(d.kind, d.seq) for d in written] == [("image", 4)] and b.rebased == 1
    assert written[0].market is not None and written[0].market.selections[0].back[0] == (5.2, 12)
    assert b.book.markets["bf:1.1"].seq == 4 and b.book.seq_floor == 3
    rows = await store.log_range(0, head)
    assert [[(d.kind, d.seq) for d in ds] for _, ds in rows] == [[("image", 4)]]
    b.feed_lines([price("1.1", 5.4, pt=NOW + 4 * HOUR + 1000)], NOW + 4 * HOUR + 1005)
    assert [(d.kind, d.seq) for d in await b.flush()] == [("delta", 5)]
    b.feed_lines([image("1.2", 3.0, pt=NOW + 4 * HOUR + 1100)], NOW + 4 * HOUR + 1105)
    assert [(d.market_id, d.seq) for d in await b.flush()] == [("bf:1.2", 4)] and b.rebased == 1  # learnt
    stored = await store.get_market("bf:1.1")
    assert stored is not None and stored.seq == 5 and stored.selections[0].back[0] == (5.4, 12)
    assert await client_after(store, held, head) == stored
