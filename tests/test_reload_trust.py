"""A partition the node knows it must reload is never served as current
(trust audit of the price check, architecture §65).

- A reload of one partition was skipped when another partition's reload had
  bumped the state's generation meanwhile: the gap entry was behind the
  reader, never read again, and the market kept its old state — answering
  ``OK`` — until some later change happened to trip the check again.
- From the moment a reader finds a gap until the reload swaps the partition
  in, its markets read as fresh (the heartbeats went on vouching for them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from feed.models import Market, SourceHealth
from feed.settings import Settings
from feed.store import EPOCH_KEY, Store, partition_of
from streaming.pricecheck import PriceCheckRequest, check
from streaming.reader import Node
from streaming.state import NodeOptions, now_ms
from streaming_helpers import Feed, eventually

SESSION = "s1"


def _market_in(p: int, partitions: int = 2) -> str:
    return next(f"bf:1.{i}" for i in range(1000) if partition_of(f"bf:1.{i}", partitions) == p)


@asynccontextmanager
async def _node(redis_url: str) -> AsyncIterator[tuple[Store, Feed, Node, asyncio.Event]]:
    """A 2-partition store with one market per partition, a node on it, a heartbeat that keeps
    the source UP and confirming, and an Event that holds every reload's load until it is set."""
    store = await Store.open(redis_url, partitions=2)
    feed = Feed(store)
    feed.session = SESSION
    await feed.write(*(feed.image(_market_in(p), in_play=True) for p in (0, 1)))

    async def health() -> None:
        while True:
            now = now_ms()
            await store.set_health(SourceHealth(source="t", state="UP", last_message_at=now, updated_at=now,
                                                lease_ms=5000, session=SESSION))
            await asyncio.sleep(0.05)

    beat = asyncio.create_task(health())
    node = Node(Settings(), store, options=NodeOptions(health_refresh_ms=50, read_block_ms=200, tune_gc=False))
    await node.start()
    release = asyncio.Event()
    release.set()
    real_load = store.load_markets

    async def held_load(p: int) -> list[Market]:
        await asyncio.wait_for(release.wait(), 30)
        return await real_load(p)

    store.load_markets = held_load  # type: ignore[method-assign]
    try:
        yield store, feed, node, release
    finally:
        release.set()
        beat.cancel()
        await node.stop()
        await store.close()


async def _gap(feed: Feed, market_id: str) -> None:
    """The market's next change (seq + 1) never reaches the log; the one after it (a suspension)
    does — the node sees the seq jump."""
    feed.book.apply(feed.price(market_id, "1", 2.2), now_ms(), SESSION)
    d = feed.book.apply(feed.header(market_id, status="SUSPENDED"), now_ms(), SESSION)
    assert d is not None
    await feed.store.apply([d], feed.book.markets)


def _check(node: Node, market_id: str) -> str:
    req = PriceCheckRequest(market_id=market_id, selection_id="1", side="back", price=2.0)
    return check(node.state, req, now_ms()).reason


async def test_a_gap_in_one_partition_is_reloaded_while_another_partitions_reload_runs(redis_url: str) -> None:
    async with _node(redis_url) as (store, feed, node, release):
        a, b = _market_in(0), _market_in(1)
        await eventually(lambda: _check(node, a) == "OK" and _check(node, b) == "OK", what="both markets OK")
        release.clear()  # reloads now wait: partition 0's is in flight when partition 1's gap comes
        await _gap(feed, a)
        await eventually(lambda: 0 in node.state.rebuilding, what="partition 0 to be reloading")
        await _gap(feed, b)
        await eventually(lambda: 1 in node.state.rebuilding, what="partition 1's gap to be found")
        release.set()
        # both partitions come back with the suspension; before the fix partition 1's reload was
        # skipped (the generation had moved) and b stayed OPEN at seq 1, answering OK
        await eventually(lambda: node.state.markets[a].seq == 3 and node.state.markets[b].seq == 3,
                         what="both markets at the store's seq")
        assert _check(node, a) == "SUSPENDED" and _check(node, b) == "SUSPENDED"
        assert not node.state.rebuilding and node.loaded == [2, 2], node.loaded  # the start's load + one reload each


async def test_a_partition_waiting_for_its_reload_is_stale_not_current(redis_url: str) -> None:
    async with _node(redis_url) as (store, feed, node, release):
        a, b = _market_in(0), _market_in(1)
        await eventually(lambda: _check(node, a) == "OK", what="the market OK")
        release.clear()
        await _gap(feed, a)
        await eventually(lambda: 0 in node.state.rebuilding, what="the gap to be found")
        # the node holds seq 1 and knows a change is missing: not OK (it was, for the whole reload)
        req = PriceCheckRequest(market_id=a, selection_id="1", side="back", price=2.0)
        r = check(node.state, req, now_ms())
        assert r.reason == "STALE" and "being reloaded" in r.message and "seq gap" in r.message, r
        age, stale = node.state.age_stale(node.state.markets[a], now_ms())
        assert stale  # REST and stream markers say so too
        assert _check(node, b) == "OK"  # the other partition is not touched
        release.set()
        await eventually(lambda: _check(node, a) == "SUSPENDED", what="the reloaded suspension")
        assert not node.state.rebuilding


async def test_a_partial_reload_that_meets_a_new_store_epoch_reloads_every_partition(redis_url: str) -> None:
    """A reload of partition 0 alone under a new store epoch made the node take the new epoch for
    every partition: partition 1, still holding the old epoch's data, then passed its reader's
    epoch check — served as current although the store it came from is gone."""
    async with _node(redis_url) as (store, feed, node, release):
        old_epoch = node.state.epoch
        await store.redis.set(EPOCH_KEY, "a-new-epoch")  # what a wiped and re-seeded store looks like
        assert await store.current_epoch() == "a-new-epoch"
        before = list(node.loaded)
        await node.reload([0], "test", tuple(before))
        assert node.state.epoch == "a-new-epoch" != old_epoch
        assert node.loaded == [before[0] + 1, before[1] + 1]  # partition 1 was loaded from the new epoch too


async def test_a_skipped_reload_keeps_a_mark_made_after_the_load_that_made_it_skippable(redis_url: str) -> None:
    """An older reload-everything request skips partition 1 (loaded since it was asked); a newer
    problem marked partition 1 after that load, and its own reload is still to come: partition 1
    must stay stale meanwhile (the skip cleared every mark, so it read fresh — review, §65)."""
    async with _node(redis_url) as (store, feed, node, release):
        b = _market_in(1)
        await eventually(lambda: _check(node, b) == "OK", what="the market OK")
        asked_before = tuple(node.loaded)  # an older turn asks for everything from here
        await node.reload([1], "partition 1 reloaded meanwhile", tuple(node.loaded))
        node.state.mark_rebuilding([1], "a gap found after that reload", node.loaded)  # its reload comes later
        release.clear()  # partition 0's load takes a while
        loading = asyncio.Event()
        held = store.load_markets

        async def load(p: int) -> list[Market]:
            loading.set()
            return await held(p)

        store.load_markets = load  # type: ignore[method-assign]
        task = asyncio.create_task(node.reload(None, "the older request", asked_before))
        try:
            await asyncio.wait_for(loading.wait(), 10)  # the older reload is loading partition 0
            assert 1 in node.state.rebuilding and _check(node, b) == "STALE"
        finally:
            release.set()
            await task
        assert 1 in node.state.rebuilding  # still: its own reload has not run
