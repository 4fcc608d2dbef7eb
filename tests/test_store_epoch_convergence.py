"""The store's epochs converge whatever was lost (docs/architecture.md §79, F4).

``of:epoch`` (what nodes compare, what resume tokens carry) and each partition's copy
``of:{p}:epoch`` (what the apply script checks) live in different hash slots: a Redis Cluster that
loses the shard holding ``of:epoch`` — or a plain Redis that loses that key alone — kept the
partitions' copies. ``Store.ensure_epoch`` then made a new random ``of:epoch`` and only SET NX the
partitions', so a restarted writer got EpochChanged on every apply for good (``reset_epoch`` never
converged) and nodes reloaded every partition about once a read interval. Now a lost ``of:epoch`` is
adopted from partitions that agree, a new epoch overwrites every partition's copy when they disagree
or one is missing, ``reset_epoch`` converges, and a running writer puts a lost ``of:epoch`` back.
Real redis-server (embedded) throughout; the Redis Cluster test starts three masters and skips when
``redis-cli`` is not beside the server. Each test fails without the fix.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from feed.embedded_redis import EmbeddedRedis, cluster_node_port
from feed.ingest import HealthPublisher, Ingest
from feed.settings import Settings
from feed.store import EPOCH_KEY, Store, partition_of, pepoch_key
from streaming.reader import Node
from streaming.state import NodeOptions
from cluster_helpers import start_local_cluster
from esa_lines import heartbeat, image, price
from streaming_helpers import eventually, now_ms

PARTITIONS = 3
WAIT_S = 20.0  # generous: a running writer's audit runs every 2 s


def one_per_partition(partitions: int) -> list[str]:
    """Betfair market numbers ("1.<n>") whose ids ("bf:1.<n>") fall in partitions 0 … partitions − 1."""
    out: dict[int, str] = {}
    n = 0
    while len(out) < partitions:
        n += 1
        out.setdefault(partition_of(f"bf:1.{n}", partitions), f"1.{n}")
    return [out[p] for p in range(partitions)]


async def feed(ing: Ingest, *lines: bytes) -> None:
    ing.feed_lines(list(lines), now_ms())
    await ing.flush()


async def epochs(store: Store) -> tuple[str | None, list[str | None]]:
    return await store.current_epoch(), await store.partition_epochs()


async def writer(url: str, source: str = "betfair", **kwargs: Any) -> tuple[Store, Ingest]:
    """A writer as the ingest starts one: the store opened, the book restored."""
    store = await Store.open(url, partitions=kwargs.pop("partitions", PARTITIONS), **kwargs)
    ing = Ingest(store, source=source)
    await ing.restore()
    return store, ing


async def test_a_lost_store_epoch_is_adopted_and_a_restarted_writer_writes_again(redis_url: str) -> None:
    """``of:epoch`` alone is deleted (what a Redis Cluster shard loss does to it) while every
    partition keeps its copy: the writer already running goes on, a restarted one adopts the
    partitions' epoch (clients keep their resume tokens) and writes at once; the epochs agree."""
    mids = one_per_partition(PARTITIONS)
    store, ing = await writer(redis_url)
    try:
        t = now_ms()
        await feed(ing, *(image(m, 2.0, pt=t) for m in mids))
        old = store.epoch
        await store.redis.delete(EPOCH_KEY)

        store2, ing2 = await writer(redis_url)  # the ingest restarted (a deploy, a crash)
        try:
            assert store2.epoch == old
            await feed(ing2, image(mids[1], 2.5, pt=now_ms()))
            assert ing2.store_ok and ing2.backlog == 0
            m = await store2.get_market(f"bf:{mids[1]}")
            assert m is not None and m.selections[0].back[0][0] == 2.5
            assert await epochs(store2) == (old, [old] * PARTITIONS)
            await feed(ing, price(mids[2], 2.6, pt=now_ms()))  # the first writer, still running, too
            assert ing.store_ok and ing.lost_writes == 0
        finally:
            await store2.close()
    finally:
        await store.close()


async def test_a_running_writer_puts_a_lost_store_epoch_back(redis_url: str) -> None:
    """Without any restart: the writer's store audit finds ``of:epoch`` gone (nodes reload every
    partition until it is back) and restores it from the partitions, re-imaging nothing."""
    mids = one_per_partition(PARTITIONS)
    store, ing = await writer(redis_url)
    try:
        async with HealthPublisher(ing, interval_s=0.1):
            await feed(ing, *(image(m, 2.0, pt=now_ms()) for m in mids))
            old = store.epoch
            entries = [len(await store.log_range(p, "0-0")) for p in range(PARTITIONS)]
            await store.redis.delete(EPOCH_KEY)

            async def restored() -> bool:
                await feed(ing, heartbeat(pt=now_ms()))
                return await store.current_epoch() == old

            await eventually(restored, WAIT_S, "the writer to put of:epoch back", interval_s=0.1)
            assert await store.partition_epochs() == [old] * PARTITIONS
            assert [len(await store.log_range(p, "0-0")) for p in range(PARTITIONS)] == entries  # nothing re-imaged
    finally:
        await store.close()


@pytest.mark.parametrize("loss", ["epoch_lost_partitions_disagree", "partition_epoch_missing"])
async def test_partition_epochs_that_disagree_or_are_missing_make_a_new_epoch_everywhere(
        redis_url: str, loss: str) -> None:
    """A partition's copy is missing (its shard lost its data, maybe the data with it) or the copies
    disagree: no epoch can be trusted, so a new one overwrites every copy; the writer that held the
    old epoch gets EpochChanged once, adopts it and re-images every market, and writes again."""
    mids = one_per_partition(PARTITIONS)
    store, ing = await writer(redis_url)
    try:
        await feed(ing, *(image(m, 2.0, pt=now_ms()) for m in mids))
        old = store.epoch
        if loss == "epoch_lost_partitions_disagree":
            await store.redis.delete(EPOCH_KEY)
            await store.redis.set(pepoch_key(1), "another")
        else:
            await store.redis.delete(pepoch_key(2))
        opener = await Store.open(redis_url, partitions=PARTITIONS)
        try:
            new = opener.epoch
            assert new not in (old, "another")
            assert await epochs(opener) == (new, [new] * PARTITIONS)
        finally:
            await opener.close()
        await feed(ing, price(mids[0], 2.5, pt=now_ms()))
        assert ing.store_ok and store.epoch == new
        for p, mid in enumerate(mids):  # every market re-imaged under the new epoch
            deltas = [d for _, ds in await store.log_range(p, "0-0") for d in ds if d.market_id == f"bf:{mid}"]
            assert deltas[-1].kind == "image" and deltas[-1].seq == ing.book.markets[f"bf:{mid}"].seq
        m = await store.get_market(f"bf:{mids[0]}")
        assert m is not None and m.selections[0].back[0][0] == 2.5
    finally:
        await store.close()


async def test_reset_epoch_converges_when_the_partitions_kept_an_older_epoch(redis_url: str) -> None:
    """What the old ``ensure_epoch`` left behind (a new ``of:epoch`` taken by a restarted writer, the
    partitions still on the old one): the writer's EpochChanged → ``reset_epoch`` → apply now
    succeeds instead of failing forever."""
    mids = one_per_partition(PARTITIONS)
    store, ing = await writer(redis_url)
    try:
        await feed(ing, *(image(m, 2.0, pt=now_ms()) for m in mids))
        await store.redis.set(EPOCH_KEY, "newer")
        store.epoch = "newer"  # (what the old Store.open of a restarted writer held)
        await feed(ing, price(mids[2], 2.5, pt=now_ms()))
        assert ing.store_ok and ing.backlog == 0 and store.epoch == "newer"
        assert await epochs(store) == ("newer", ["newer"] * PARTITIONS)
    finally:
        await store.close()


async def test_concurrent_openers_settle_on_one_epoch(redis_url: str) -> None:
    """Several processes opening the store at once — on an empty store, and on one whose
    ``of:epoch`` is lost with partition copies that disagree — all end with one same epoch."""
    for setup in ("empty", "disagree"):
        r = aioredis.Redis.from_url(redis_url)
        await r.flushall()
        if setup == "disagree":
            for p in range(4):
                await r.set(pepoch_key(p), f"e{p % 2}")
        await r.aclose()
        stores = [Store(aioredis.Redis.from_url(redis_url), partitions=4) for _ in range(6)]
        try:
            got = await asyncio.gather(*(s.ensure_epoch() for s in stores))
            assert len(set(got)) == 1, (setup, got)
            assert await epochs(stores[0]) == (got[0], [got[0]] * 4), setup
            if setup == "disagree":
                assert got[0] not in ("e0", "e1")
        finally:
            for s in stores:
                await s.close()


async def test_an_eviction_policy_is_warned_about_and_a_refused_config_is_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An eviction policy can evict ``of:epoch``, snapshots or the log: opening the store says so.
    A Redis that refuses CONFIG (a managed one; here an ACL user without it) opens silently."""
    server = EmbeddedRedis(tmp_path / "redis", port=cluster_node_port(), appendonly=False)
    server.start()
    try:
        admin = redis.Redis(port=server.port)
        caplog.set_level(logging.WARNING, logger="feed.store")
        s = await Store.open(server.url)
        assert await s.warn_if_evicting() is None  # noeviction: nothing said
        await s.close()
        assert "maxmemory-policy" not in caplog.text
        admin.config_set("maxmemory-policy", "allkeys-lru")
        s = await Store.open(server.url)
        await s.close()
        assert "maxmemory-policy is allkeys-lru" in caplog.text
        caplog.clear()
        admin.config_set("maxmemory-policy", "volatile-lru")  # (evicts only keys with a TTL: none of ours)
        s = await Store.open(server.url)
        await s.close()
        assert "maxmemory-policy" not in caplog.text
        admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-config")
        s = await Store.open(f"redis://limited:pw@127.0.0.1:{server.port}/0")
        try:
            assert s.epoch and await s.warn_if_evicting() is None
        finally:
            await s.close()
        assert "maxmemory-policy" not in caplog.text
        admin.close()
    finally:
        server.stop()


def _owner_port(port: int, key: str) -> int:
    """The port of the cluster master serving ``key``'s slot."""
    r = redis.Redis(port=port)
    try:
        slot = r.execute_command("CLUSTER KEYSLOT", key)
        for lo, hi, master, *_ in r.execute_command("CLUSTER SLOTS"):
            if lo <= slot <= hi:
                return int(master[1])
    finally:
        r.close()
    raise AssertionError(f"no master serves {key}")


async def test_on_a_redis_cluster_a_lost_epoch_shard_converges(tmp_path: Path) -> None:
    """The audit's shape (p4): three masters; FLUSHALL on the one holding ``of:epoch`` (a shard lost
    its data) while ``of:{0}:epoch`` lives on another. The running writer puts the epoch back, so
    the node stops reloading and holds the old epoch again; a restarted writer adopts it and writes."""
    servers: list[Any] = []
    stores: list[Store] = []
    node: Node | None = None
    try:
        url = start_local_cluster(tmp_path, servers)
        store, ing = await writer(url, partitions=1, cluster=True)
        stores.append(store)
        ing.set_state("UP", None)
        node = Node(Settings(), await Store.open(url, cluster=True), owns_store=True,
                    options=NodeOptions(health_refresh_ms=100, read_block_ms=200, tune_gc=False))
        await node.start()
        n = node
        async with HealthPublisher(ing, interval_s=0.1):
            await feed(ing, image("1.1", 2.0, pt=now_ms()))
            await eventually(lambda: "bf:1.1" in n.state.markets, WAIT_S, "the node to hold the market")
            old = store.epoch
            lost = _owner_port(servers[0].port, EPOCH_KEY)
            assert lost != _owner_port(servers[0].port, pepoch_key(0))
            redis.Redis(port=lost).flushall()  # one shard of the cluster loses its data

            async def settled() -> bool:
                await feed(ing, heartbeat(pt=now_ms()))
                return await store.current_epoch() == old and n.state.epoch == old

            await eventually(settled, WAIT_S, "of:epoch back and the node on it", interval_s=0.1)
            reloads = n.reloads
            for _ in range(10):  # the node's checks pass again: no more reloads
                await feed(ing, heartbeat(pt=now_ms()))
                await asyncio.sleep(0.1)
            assert n.reloads == reloads and n.state.epoch == old

            store2, ing2 = await writer(url, source="betfair2", partitions=1, cluster=True)  # a restarted ingest
            stores.append(store2)
            assert store2.epoch == old
            await feed(ing2, image("2.1", 5.0, pt=now_ms()))
            assert ing2.store_ok and ing2.backlog == 0
            await eventually(lambda: "bf:2.1" in n.state.markets, WAIT_S, "the node to hold the new market")
        assert await store.warn_if_evicting() is None  # (every master's CONFIG reply read: noeviction)
    finally:
        if node is not None:
            await node.stop()
        for s in stores:
            await s.close()
        for srv in servers:
            srv.stop()
