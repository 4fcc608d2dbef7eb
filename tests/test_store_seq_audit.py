"""The ingest compares the store's seqs with its book (docs/architecture.md §79, F2).

Redis that comes back *older* under the same epoch — restarted on an older append-only file, a
replica promoted before it had the last writes, a backup restored — loses a market's last
acknowledged write. The apply script only notices it for a market of a later batch; a market that
stays quiet was never checked, the ingest's heartbeats kept confirming it, and every node that
loaded the store afterwards served the lost price as fresh. Now the ingest reads the stored seqs of
its markets (one round trip) on a timer and at the first flush after a store failure, re-images every
market the store is behind on, and confirms nothing until it has; a lost-writes detection inside the
re-image pacing window is deferred, not dropped. Real redis-server (embedded) throughout; each test
fails without the fix.

Its review's findings: the audit covers event states too (a score the store lost is written again,
and ``states_confirmed_at`` vouches for nothing until the store is verified); the periodic audit
reads a bounded slice of the book, a rotation covering all of it within two rounds, and only an
audit after something happened to the store reads everything; an audit of everything that finds the
store clean ends the hold a lost-writes detection put on confirmations; a re-image's foreign count
is not dropped.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

import feed.ingest as ingest_module
from feed.embedded_redis import EmbeddedRedis
from feed.ingest import HealthPublisher, Ingest
from feed.models import EventState, Market, Score
from feed.normalise.base import NormalisedBatch
from feed.settings import Settings
from feed.store import (ES_PT_KEY, ES_STATE_KEY, ES_VERSION_KEY, Store, StoredMarks, connect, log_key, market_key,
                        pt_key, seq_key, writers_key)
from streaming.pricecheck import PriceCheckRequest, check as check_price
from streaming.reader import Node
from streaming.state import NodeOptions
from esa_lines import heartbeat, image, price
from streaming_helpers import eventually, now_ms

A, B = "bf:1.1", "bf:1.2"
WAIT_S = 20.0  # generous: the audit runs every 2 s, a deferred re-image waits up to 5 s


def back_of(m: Market | None) -> float | None:
    if m is None:
        return None
    for s in m.selections:
        if s.selection_id == "1":
            return s.back[0][0] if s.back else None
    return None


async def feed(ing: Ingest, *lines: bytes) -> None:
    t = now_ms()
    ing.feed_lines(list(lines), t)
    await ing.flush()


async def backup(r: aioredis.Redis, *mids: str) -> dict[str, tuple[bytes, bytes, bytes]]:
    """What a backup (or a lagging replica) holds of each market now: snapshot, seq, provider time."""
    out = {}
    for mid in mids:
        snap, seq, pt = await r.get(market_key(0, mid)), await r.hget(seq_key(0), mid), await r.hget(pt_key(0), mid)
        assert snap is not None and seq is not None and pt is not None
        out[mid] = (snap, seq, pt)
    return out


async def restore(r: aioredis.Redis, saved: dict[str, tuple[bytes, bytes, bytes]]) -> None:
    """Put the backup back in place, without any connection of the ingest noticing (no error, no epoch change)."""
    for mid, (snap, seq, pt) in saved.items():
        await r.set(market_key(0, mid), snap)
        await r.hset(seq_key(0), mid, seq)
        await r.hset(pt_key(0), mid, pt)


async def test_a_quiet_market_whose_last_write_redis_lost_on_an_older_aof_is_reimaged_and_not_confirmed_meanwhile(
        tmp_path: Path) -> None:
    """The audit's proof (p2): Redis restarted on an older append-only file (the same epoch is in
    it) loses market A's last write; A stays quiet while heartbeats and market B go on. The store
    gets A's book state back within a bounded wait, and neither the ingest nor the health record the
    nodes read confirms the source while the store holds the lost price; a node started afterwards
    serves the book's price, not the lost one."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True)
    server.start()
    aof = server.data_dir / "appendonly.aof"
    store = Store(connect(server.url, timeout_s=1.0))
    await store.ensure_epoch()
    ing = Ingest(store, source="betfair")
    ing.set_state("UP", None)
    reader: Store | None = None
    node: Node | None = None
    try:
        async with HealthPublisher(ing, interval_s=0.1):
            t = now_ms()
            await feed(ing, image("1.1", 2.0, pt=t), image("1.2", 3.0, pt=t))
            # (appendfsync everysec: the server has written the reply's data to the file before replying)
            await eventually(lambda: A.encode() in aof.read_bytes(), WAIT_S, "the images in the append-only file")
            shutil.copy(aof, server.data_dir / "older.aof")  # what an older AOF / a lagging replica holds
            await feed(ing, price("1.1", 2.2, pt=now_ms()))  # A moves to 2.2, then stays quiet
            assert ing.store_ok and ing.book.markets[A].seq == 2
            confirmed_before = ing.health.last_message_at

            server.kill()
            shutil.copy(server.data_dir / "older.aof", aof)
            server.start()  # back older, under the same epoch (of:epoch is in the older file)
            reader = Store(connect(server.url, timeout_s=1.0))
            m = await reader.get_market(A)
            assert m is not None and back_of(m) == 2.0 and m.seq == 1, "the older file lacks A's last write"

            async def feeder() -> None:  # the feed goes on: heartbeats, and B changes now and then; A is quiet
                for i in range(10_000):
                    t = now_ms()
                    lines = [heartbeat(pt=t)]
                    if i % 5 == 0:
                        lines.append(price("1.2", round(3.0 + (i % 50 + 1) / 100, 2), pt=t))
                    ing.feed_lines(lines, t)
                    await ing.flush()
                    await asyncio.sleep(0.05)

            feeding = asyncio.create_task(feeder())
            checks = 0

            async def store_caught_up() -> bool:
                nonlocal checks
                assert reader is not None
                # confirmations first, then the store: a confirmation made after the repair finds it stored
                ingest_confirmed = ing.health.last_message_at
                h = await reader.get_health("betfair")
                stored = await reader.get_market(A)
                book = ing.book.markets[A]
                checks += 1
                if stored is None or stored.seq < book.seq:
                    assert ingest_confirmed <= confirmed_before, "the ingest confirmed the source over a lost write"
                    assert h is None or h.last_message_at <= confirmed_before, \
                        "the health record vouches for the source while the store holds the lost price"
                    return False
                return back_of(stored) == back_of(book) == 2.2

            try:
                await eventually(store_caught_up, WAIT_S, "the store to hold A's book state again", interval_s=0.05)
            finally:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            assert ing.lost_writes >= 1 and checks >= 1
            await eventually(lambda: ing.health.last_message_at > confirmed_before, WAIT_S,
                             "the source confirmed again once the store holds the book")

            # a node that loads the store now serves the book's price
            node_store = await Store.open(server.url)
            node = Node(Settings(), node_store, options=NodeOptions(health_refresh_ms=100, read_block_ms=200,
                                                                    tune_gc=False), owns_store=True)
            await node.start()
            n = node
            await eventually(lambda: A in n.state.markets and back_of(n.state.markets[A]) == 2.2, WAIT_S,
                             "the node at A's book price")
            for at, want in ((2.2, "OK"), (2.0, "PRICE_CHANGED")):  # (the lost price, asked exactly: refused)
                req = PriceCheckRequest(market_id=A, selection_id="1", side="back", price=at, accept_better=False)
                assert check_price(node.state, req, now_ms()).reason == want, at
    finally:
        if node is not None:
            await node.stop()
        if reader is not None:
            await reader.close()
        await store.close()
        server.stop()


async def test_a_backup_restored_in_place_without_any_error_is_found_by_the_periodic_audit(redis_url: str) -> None:
    """No connection breaks and no batch touches the market (a backup restored in place, a replica
    promoted behind a proxy): only the timer finds it — within a few audit intervals the store holds
    the book's state again."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="betfair")
    ing.set_state("UP", None)
    try:
        async with HealthPublisher(ing, interval_s=0.1):
            t = now_ms()
            await feed(ing, image("1.1", 2.0, pt=t), image("1.2", 3.0, pt=t))
            saved = await backup(r, A)
            await feed(ing, price("1.1", 2.2, pt=now_ms()))
            await restore(r, saved)
            assert back_of(await store.get_market(A)) == 2.0

            async def caught_up() -> bool:
                await feed(ing, heartbeat(pt=now_ms()))
                m = await store.get_market(A)
                return m is not None and m.seq == ing.book.markets[A].seq and back_of(m) == 2.2

            await eventually(caught_up, WAIT_S, "the periodic audit to re-image A", interval_s=0.1)
            assert ing.lost_writes == 1
            b = await store.get_market(B)  # B was never behind: not re-imaged
            assert b is not None and b.seq == 1
    finally:
        await r.aclose()
        await store.close()


async def _two_markets_detections_only(redis_url: str) -> tuple[Store, aioredis.Redis, Ingest]:
    """A store, a plain client and an ingest holding markets 1.1 (2.0) and 1.2 (3.0) whose audit
    runs only on detections (its timer an hour away)."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="betfair")
    ing.audit_every_s = 3600.0  # (only detections drive the audit here)
    t = now_ms()
    await feed(ing, image("1.1", 2.0, pt=t), image("1.2", 3.0, pt=t))
    return store, r, ing


async def test_lost_writes_found_within_the_pacing_window_are_deferred_not_dropped(redis_url: str) -> None:
    """Two lost-writes detections 5 s apart at most: the second used to be ignored, leaving the
    quiet market behind for good. Now the audit re-images the quiet market at once, nothing is
    confirmed until the deferred re-image of every market is done, and it is done when the window
    ends."""
    store, r, ing = await _two_markets_detections_only(redis_url)
    try:
        first = await backup(r, A, B)
        await feed(ing, price("1.1", 2.1, pt=now_ms()), price("1.2", 3.1, pt=now_ms()))
        await restore(r, first)
        await feed(ing, price("1.1", 2.2, pt=now_ms()))  # only A changes: the script finds A behind
        assert ing.lost_writes == 1  # re-imaged at once: every market
        for mid, want in ((A, 2.2), (B, 3.1)):
            m = await store.get_market(mid)
            assert m is not None and m.seq == ing.book.markets[mid].seq and back_of(m) == want

        second = await backup(r, A, B)  # within 5 s of that re-image, Redis goes back again
        await feed(ing, price("1.1", 2.3, pt=now_ms()), price("1.2", 3.2, pt=now_ms()))
        await restore(r, second)
        confirmed = ing.health.last_message_at
        await feed(ing, price("1.1", 2.4, pt=now_ms()))
        assert ing.lost_writes >= 2, "the second detection was dropped"
        # the quiet market B is re-imaged at once (the audit), A's change itself is stored
        quiet = await store.get_market(B)
        assert quiet is not None and quiet.seq == ing.book.markets[B].seq and back_of(quiet) == 3.2
        busy = await store.get_market(A)
        assert busy is not None and back_of(busy) == 2.4
        # … and nothing is confirmed until the deferred re-image of every market is done
        assert ing.health.last_message_at == confirmed
        a_seq = ing.book.markets[A].seq

        async def reimaged() -> bool:
            await feed(ing, heartbeat(pt=now_ms()))
            if ing.book.markets[A].seq == a_seq:
                assert ing.health.last_message_at == confirmed, "confirmed before the deferred re-image"
                return False
            return True

        await eventually(reimaged, WAIT_S, "the deferred re-image", interval_s=0.1)
        assert ing.health.last_message_at > confirmed
        images = [(d.market_id, d.seq) for _, ds in await store.log_range(0, "0-0") for d in ds if d.kind == "image"]
        assert (A, ing.book.markets[A].seq) in images and (B, ing.book.markets[B].seq) in images
    finally:
        await r.aclose()
        await store.close()


async def test_the_audit_leaves_alone_what_it_cannot_or_need_not_write(redis_url: str) -> None:
    """No loop: a market another source owns (our writes of it are dropped as foreign), and one a
    second writer of our source took further in provider time, are not 'behind' — audited at every
    flush, nothing is re-imaged."""
    store = await Store.open(redis_url)
    other = Ingest(store, source="other")
    ing = Ingest(store, source="betfair")
    ing.audit_every_s = 0.0
    ing.audit_soon()  # every flush audits
    try:
        t = now_ms()
        await feed(other, image("1.1", 2.0, pt=t))  # A belongs to "other"
        await feed(ing, image("1.1", 5.0, pt=t + 1), image("1.2", 3.0, pt=t + 1))
        await feed(ing, price("1.1", 5.5, pt=t + 2))
        # a second writer of our source moved B further (higher provider time) at a lower seq
        twin = Ingest(store, source="betfair")
        await feed(twin, image("1.2", 3.0, pt=t + 1), price("1.2", 3.3, pt=now_ms() + 1000))
        await feed(ing, price("1.2", 3.1, pt=t + 3), price("1.2", 3.2, pt=t + 4))  # dropped: older
        b = await store.get_market(B)
        assert b is not None and back_of(b) == 3.3 and b.seq < ing.book.markets[B].seq  # behind in seq, not in time
        a = await store.get_market(A)
        assert a is not None and a.seq < ing.book.markets[A].seq  # behind in seq, another source's
        entries = len(await store.log_range(0, "0-0"))
        for _ in range(5):
            await feed(ing, heartbeat(pt=now_ms()))
        assert ing.audits >= 5 and ing.lost_writes == 0
        assert len(await store.log_range(0, "0-0")) == entries, "the audit re-imaged a market it cannot write"
        a = await store.get_market(A)
        assert a is not None and a.source == "other" and back_of(a) == 2.0
    finally:
        await store.close()


EV = "px:f1"
ES_HASHES = (ES_STATE_KEY, ES_VERSION_KEY, ES_PT_KEY)


class _Scores:
    """A normaliser of lines ``b"score <home>"`` (the state of event EV) and ``b"ping"`` (a heartbeat)."""

    live_provider_times = False

    def __init__(self) -> None:
        self.source = "scores"
        self.max_future_skew_ms = 30_000

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        if raw == b"ping":
            return NormalisedBatch(op="ping", heartbeat=True)
        home = int(raw.split()[1])
        return NormalisedBatch(op="scores", event_states=[EventState(
            event_id=EV, source=self.source, status="LIVE", in_play=True, period="2h",
            score=Score(home=home, away=0), source_ts=recv_ms, received_at=recv_ms)])

    def restore(self, markets: object, cursor: str | None) -> None:
        pass


async def stored_state(store: Store) -> EventState | None:
    return (await store.get_event_states([EV])).get(EV)


async def test_an_event_state_whose_last_write_redis_lost_is_written_again_and_a_node_serves_it(
        redis_url: str) -> None:
    """§79 for a score (review finding 1): a backup restored in place takes the event's last
    state (a goal) back; the event stays quiet, the source keeps talking. The periodic audit
    compares the stored event states with the held ones and writes the goal again (next version:
    a node that kept the lost state as lost takes it); a node that loads the store afterwards
    serves the goal, not the score before it."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="scores", normaliser=_Scores())  # type: ignore[arg-type]
    ing.set_state("UP", None)
    node: Node | None = None
    try:
        async with HealthPublisher(ing, interval_s=0.1):
            await feed(ing, b"score 0")
            saved = [await r.hget(k, EV) for k in ES_HASHES]
            await feed(ing, b"score 1")  # the goal
            held = ing.event_states[EV]
            assert held.score == Score(home=1, away=0)
            for k, v in zip(ES_HASHES, saved, strict=True):  # the backup restored: the goal lost
                await r.hset(k, EV, v)
            lost = await stored_state(store)
            assert lost is not None and lost.score == Score(home=0, away=0)

            async def written_again() -> bool:
                await feed(ing, b"ping")
                es = await stored_state(store)
                return es is not None and es.score == held.score and es.version > held.version

            await eventually(written_again, WAIT_S, "the audit to write the lost score again", interval_s=0.1)
            assert ing.lost_state_writes == 1

            node = Node(Settings(), await Store.open(redis_url),
                        options=NodeOptions(health_refresh_ms=100, read_block_ms=200, tune_gc=False), owns_store=True)
            await node.start()
            n = node

            def served() -> bool:
                es = n.event_states.get(EV)
                return es is not None and es.score == held.score

            await eventually(served, WAIT_S, "the node to serve the goal")
    finally:
        if node is not None:
            await node.stop()
        await r.aclose()
        await store.close()


async def test_states_are_not_confirmed_until_the_audit_after_a_store_incident_and_lost_ones_are_rewritten(
        redis_url: str) -> None:
    """Review finding 1's other half: a source whose states are confirmed apart (a scores poll)
    must not advance ``states_confirmed_at`` while the store is unverified (after an error or a
    reconnect — the health publisher calls ``audit_soon`` then): the store may have come back
    older. The next flush's audit of everything writes the lost state again, then confirms."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="scores", normaliser=_Scores())  # type: ignore[arg-type]
    ing.confirm_states_apart = True
    ing.audit_every_s = 3600.0  # (only the incident drives the audit here)
    try:
        await feed(ing, b"score 0")
        saved = [await r.hget(k, EV) for k in ES_HASHES]
        await feed(ing, b"score 1")
        t1 = now_ms()
        ing.confirm_states(t1)
        assert ing.health.states_confirmed_at == t1
        for k, v in zip(ES_HASHES, saved, strict=True):  # Redis back older
            await r.hset(k, EV, v)
        ing.audit_soon()  # an error or a reconnect was seen: the store may be behind
        t2 = t1 + 100
        ing.confirm_states(t2)
        assert ing.health.states_confirmed_at == t1, "states confirmed while the store is unverified"
        await ing.flush()  # the audit of everything: the lost state written again, then confirmed
        es = await stored_state(store)
        assert es is not None and es.score == Score(home=1, away=0)
        assert ing.health.states_confirmed_at == t2
    finally:
        await r.aclose()
        await store.close()


async def test_the_periodic_audit_reads_a_bounded_slice_and_covers_the_book_in_two_rotations(redis_url: str) -> None:
    """Review finding 2: the timer's audit (every 2 s, under the flush lock: every price write
    waits) read every market of the book. Now each reads at most a slice (``audit_slice`` here 10
    of 60 markets), the slices go round the book, and a write lost without any error or reconnect is
    found within two rotations; an audit after an incident still reads everything."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="betfair")
    ing.audit_every_s = 0.0  # every flush runs the periodic audit
    ing.audit_slice = 10
    asked: list[list[str]] = []
    read = store.stored_marks

    async def spy(market_ids: Iterable[str], *args: Any, **kwargs: Any) -> StoredMarks:
        ids = list(market_ids)
        asked.append(ids)
        return await read(ids, *args, **kwargs)

    store.stored_marks = spy  # type: ignore[method-assign]
    try:
        t = now_ms()
        await feed(ing, *(image(f"1.{i}", 2.0, pt=t) for i in range(60)))
        X = "bf:1.37"
        ing.audit_soon()
        asked.clear()
        await feed(ing, heartbeat(pt=now_ms()))
        assert len(asked) == 1 and len(asked[0]) == 60, "an audit after an incident reads everything"
        saved = await backup(r, X)
        await feed(ing, price("1.37", 2.2, pt=now_ms()))
        await restore(r, saved)
        asked.clear()
        for _ in range(2 * 6):  # two rotations of 60 / 10
            await feed(ing, heartbeat(pt=now_ms()))
            m = await store.get_market(X)
            if m is not None and m.seq == ing.book.markets[X].seq:
                break
        assert asked and max(len(ids) for ids in asked) <= 10, f"a periodic audit read {max(map(len, asked))}"
        m = await store.get_market(X)
        assert m is not None and back_of(m) == 2.2 and m.seq == ing.book.markets[X].seq, \
            "the lost write not found within two rotations"
        assert ing.lost_writes == 1
        asked.clear()
        for _ in range(6):
            await feed(ing, heartbeat(pt=now_ms()))
        assert {mid for ids in asked for mid in ids} == set(ing.book.markets), "a rotation left markets out"
    finally:
        await r.aclose()
        await store.close()


async def test_a_clean_audit_after_a_deferred_detection_lets_confirmations_resume(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 3: a lost-writes detection inside the re-image pacing window held every
    confirmation until the deferred re-image of every market (up to REIMAGE_EVERY_S), even when
    the audit run at once found the store holding the whole book. Now that clean audit ends the
    hold; the deferred re-image still runs when the window ends."""
    monkeypatch.setattr(ingest_module, "REIMAGE_EVERY_S", 120.0)  # (the window cannot end during the test)
    store, r, ing = await _two_markets_detections_only(redis_url)
    try:
        first = await backup(r, A)
        await feed(ing, price("1.1", 2.1, pt=now_ms()))
        await restore(r, first)
        await feed(ing, price("1.1", 2.2, pt=now_ms()))  # found: every market re-imaged at once
        assert ing.lost_writes == 1
        b_seq = ing.book.markets[B].seq
        second = await backup(r, A)  # within the window Redis goes back again, for A only
        await feed(ing, price("1.1", 2.3, pt=now_ms()))
        await restore(r, second)
        confirmed = ing.health.last_message_at
        later = max(now_ms(), confirmed) + 50
        ing.feed_lines([price("1.1", 2.4, pt=later)], later)  # A's batch repairs A; B was never behind
        await ing.flush()
        assert ing.lost_writes == 2
        a = await store.get_market(A)
        assert a is not None and back_of(a) == 2.4 and a.seq == ing.book.markets[A].seq
        assert ing.book.markets[B].seq == b_seq, "the re-image of every market is deferred"
        assert ing.health.last_message_at == later, "held back although the store was found holding the book"
    finally:
        await r.aclose()
        await store.close()


async def test_a_reimage_after_lost_writes_counts_the_changes_another_source_owns(redis_url: str) -> None:
    """Nit: the re-image's apply result was merged into the flush's without its foreign count, so
    a re-imaged market another source owns went uncounted (and unlogged)."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    other = Ingest(store, source="other")
    ing = Ingest(store, source="betfair")
    ing.audit_every_s = 3600.0
    try:
        t = now_ms()
        await feed(other, image("1.1", 2.0, pt=t))  # A belongs to "other"
        await feed(ing, image("1.1", 5.0, pt=t + 1), image("1.2", 3.0, pt=t + 1))
        assert ing.stats.foreign == 1
        saved = await backup(r, B)
        await feed(ing, price("1.2", 3.1, pt=now_ms()))
        await restore(r, saved)
        await feed(ing, price("1.2", 3.2, pt=now_ms()))  # B found behind: every market re-imaged, A's image foreign
        assert ing.lost_writes == 1
        assert ing.stats.foreign == 2
    finally:
        await r.aclose()
        await store.close()


async def backup_all(r: aioredis.Redis) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the database as it is now (``DUMP`` and its TTL): a backup, or what a lagging replica holds."""
    out = {}
    for key in await r.keys("*"):
        value = await r.dump(key)
        if value is not None:
            out[key] = (value, max(0, await r.pttl(key)))
    return out


async def restore_all(r: aioredis.Redis, saved: dict[bytes, tuple[bytes, int]]) -> None:
    """The database back to ``saved`` as a whole — the delta logs, the epoch, every hash — in place, at
    once (one MULTI: nothing sees it half restored, as a real rollback of a slot), through a connection
    of its own: no connection of the ingest breaks or sees an error."""
    pipe = r.pipeline(transaction=True)
    for key in await r.keys("*"):
        if key not in saved:
            pipe.delete(key)
    for key, (value, ttl) in saved.items():
        pipe.restore(key, ttl, value, replace=True)
    await pipe.execute()


async def _sixty_markets_in_slices(redis_url: str) -> tuple[Store, aioredis.Redis, Ingest]:
    """A store, a plain client and an ingest holding markets 1.0–1.59 at 2.0 whose every flush runs the
    periodic audit, a slice of 10 markets (from the book's first: 1.59 comes round in the sixth) — after
    the audit of everything the first one is (the timer's first audit is due 2 s after start)."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="betfair")
    ing.audit_every_s = 0.0
    ing.audit_slice = 10
    t = now_ms()
    await feed(ing, *(image(f"1.{i}", 2.0, pt=t) for i in range(60)))
    ing.audit_soon()
    await feed(ing, heartbeat(pt=now_ms()))
    return store, r, ing


async def holds_book(store: Store, ing: Ingest, mid: str, back: float) -> bool:
    """Whether the store holds market ``mid`` at the book's seq, best back ``back``."""
    m = await store.get_market(mid)
    return m is not None and m.seq == ing.book.markets[mid].seq and back_of(m) == back

async def test_a_whole_store_gone_back_in_place_is_found_by_the_next_periodic_audit(redis_url: str) -> None:
    """§81: Redis back older as a whole — every key, the delta log included — without any error or
    reconnect the ingest sees (a backup restored in place, a replica promoted behind a proxy). The
    periodic audit reads a slice of the book (here 10 of 60 markets), so the lost market (the book's
    last) came round only in the sixth audit — 10 s at the default interval here, ~40 s on a big
    book — read as fresh meanwhile. The log's newest entry is older than one the ingest wrote: the
    first periodic audit after it sees that and compares everything at once; the audits after it are
    slices again (the store as compared is the new baseline)."""
    store, r, ing = await _sixty_markets_in_slices(redis_url)
    X = "bf:1.59"
    try:
        saved = await backup_all(r)
        await feed(ing, price("1.59", 2.2, pt=now_ms()))  # (its flush's slice: markets 1.0–1.9)
        await restore_all(r, saved)
        lost = await store.get_market(X)
        assert lost is not None and back_of(lost) == 2.0, "the restored store lacks X's last write"

        await feed(ing, heartbeat(pt=now_ms()))  # ONE flush: its cursor write or its slice's read finds it
        assert await holds_book(store, ing, X, 2.2), "the lost write not found by the first periodic audit after the store went back"
        assert ing.store_went_back == 1 and ing.lost_writes == 1
        await feed(ing, heartbeat(pt=now_ms()))
        assert ing._recheck_at is not None  # (the recheck a beat later: not yet)

        before = ing.audits
        await feed(ing, heartbeat(pt=now_ms()))
        assert ing.audits - before == 1 and ing.store_went_back == 1, "a full audit again with nothing lost since"
    finally:
        await r.aclose()
        await store.close()


async def test_an_event_state_log_gone_back_in_place_is_found_by_the_next_periodic_audit(redis_url: str) -> None:
    """§81 for event states: the event-state log ending before an entry the ingest wrote tells the
    periodic audit that the store went back as a whole; the lost state (a goal) is written again at
    once."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="scores", normaliser=_Scores())  # type: ignore[arg-type]
    ing.audit_every_s = 0.0
    try:
        await feed(ing, b"score 0")
        ing.audit_soon()
        await feed(ing, b"ping")
        saved = await backup_all(r)
        await feed(ing, b"score 1")  # the goal
        await restore_all(r, saved)
        lost = await stored_state(store)
        assert lost is not None and lost.score == Score(home=0, away=0)
        await feed(ing, b"ping")
        assert ing.store_went_back == 1, "the event-state log gone back was not seen"
        es = await stored_state(store)
        assert es is not None and es.score == Score(home=1, away=0)
    finally:
        await r.aclose()
        await store.close()


async def test_no_health_record_vouches_for_a_store_gone_back_as_a_whole(redis_url: str) -> None:
    """§81: between a store going back in place and the audit that finds it, the ingest's health
    publisher went on writing records whose ``last_message_at`` vouched for every market of the
    source as the store now held them — the lost price read fresh on every node (up to one audit
    interval; with the periodic audit off here, for good). The publisher reads the logs' heads
    before each record: a log ending before an entry the ingest wrote makes it compare and repair
    everything first. While the store holds the lost price no record in it vouches past the
    confirmation the restored record itself carried."""
    store = await Store.open(redis_url)
    reader = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="betfair")
    ing.set_state("UP", None)
    ing.audit_every_s = 3600.0  # (no periodic audit: only the publisher's check can find it)
    try:
        async with HealthPublisher(ing, interval_s=0.1):
            t = now_ms()
            await feed(ing, image("1.1", 2.0, pt=t), image("1.2", 3.0, pt=t))
            ing.audit_soon()
            await feed(ing, heartbeat(pt=now_ms()))  # (the audit of everything: the next periodic one an hour away)
            async def recorded() -> bool:
                h = await reader.get_health("betfair")
                return h is not None and h.last_message_at > 0

            await eventually(recorded, WAIT_S, "a health record vouching for the source")
            saved = await backup_all(r)
            await feed(ing, price("1.1", 2.2, pt=now_ms()))
            await restore_all(r, saved)
            restored = await reader.get_health("betfair")
            assert restored is not None
            vouched_before = restored.last_message_at
            assert back_of(await store.get_market(A)) == 2.0, "the restored store lacks A's last write"

            async def caught_up() -> bool:
                await feed(ing, heartbeat(pt=now_ms()))  # the source goes on confirming; A stays quiet
                h = await reader.get_health("betfair")
                stored = await reader.get_market(A)
                if stored is None or stored.seq < ing.book.markets[A].seq:
                    assert h is None or h.last_message_at <= vouched_before, \
                        "a health record vouches for the source while the store holds A's lost price"
                    return False
                return back_of(stored) == 2.2

            await eventually(caught_up, WAIT_S, "the store to hold A's book state again", interval_s=0.05)
            assert ing.store_went_back >= 1 and ing.lost_writes == 1
    finally:
        await r.aclose()
        await reader.close()
        await store.close()



async def test_a_store_gone_back_before_a_restarted_ingest_wrote_anything_is_found_at_once(redis_url: str) -> None:
    """§81's writer marks began with an ingest's first write in a partition: a restarted ingest that
    restored the book and had not written yet (a quiet partition: for long) had no mark to compare,
    and a store that went back meanwhile to before the restart — losing a write of the previous run
    — served the lost price as its health records confirmed the source, until a periodic audit's
    slice came round. A restored ingest now takes the logs' heads as its marks."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    first = Ingest(store, source="betfair")
    try:
        t = now_ms()
        await feed(first, image("1.1", 2.0, pt=t), image("1.2", 3.0, pt=t))
        saved = await backup_all(r)
        await feed(first, price("1.1", 2.2, pt=now_ms()))  # the previous run's last write
        again = Ingest(store, source="betfair")  # the restart: the book as stored, 1.1 at 2.2
        again.audit_every_s = 3600.0  # (no periodic audit: only the marks can find it)
        await again.restore()
        assert back_of(again.book.markets[A]) == 2.2
        assert not await again.check_store_marks()  # (no false alarm: nothing went back yet)
        await restore_all(r, saved)  # the store goes back to before the restart: 1.1's 2.2 lost
        assert back_of(await store.get_market(A)) == 2.0
        assert await again.check_store_marks(), "the restarted ingest did not see the store go back"
        await again.flush()  # compares everything before confirming anything: 1.1 written again
        assert back_of(await store.get_market(A)) == 2.2 and again.lost_writes == 1
        await feed(again, price("1.2", 3.3, pt=now_ms()))  # its own first write after it: no alarm
        assert not await again.check_store_marks() and again.store_went_back == 1
        # a store that lost everything (FLUSHALL) did not "go back": the flush re-images under a new epoch
        await r.flushall()
        assert not await again.check_store_marks() and again.store_went_back == 1 and again.audit_due
        await again.flush()
        assert back_of(await store.get_market(A)) == 2.2
        # a clean stop drops the ingest's marks (a restart takes new ones: they do not pile up)
        assert await r.hexists(writers_key(0), again._writer)
        await again.drop_marks()
        assert not await r.hexists(writers_key(0), again._writer)
    finally:
        await r.aclose()
        await store.close()


async def test_a_store_gone_back_is_found_though_other_writes_came_after_it(redis_url: str) -> None:
    """Review of §81: the first version compared the delta log's newest entry with the newest the
    ingest had written — and any entry added after the rollback (another source's, a tool's, or this
    ingest's own write to another market) is newer, so the loss went unseen and the lost quiet
    market read fresh until its slice came round. Each writer now keeps its own mark beside the log
    (the id of the newest entry it added, written by the same script): another writer cannot move
    it, and the ingest's own next write returns the mark it replaced. Both ways are found here at the
    first audit, which then compares everything (slices of 10 of 60 markets: the lost one, the book's
    last, came round only in the sixth)."""
    store, r, ing = await _sixty_markets_in_slices(redis_url)
    X = "bf:1.59"
    try:

        # 1. another writer's entry after the rollback (it moves the log's head past the ingest's)
        saved = await backup_all(r)
        await feed(ing, price("1.59", 2.2, pt=now_ms()))
        await restore_all(r, saved)
        await r.xadd(log_key(0), {"d": "[]"})
        await feed(ing, heartbeat(pt=now_ms()))
        assert await holds_book(store, ing, X, 2.2), "a rollback hidden by another writer's entry"
        assert ing.store_went_back == 1

        # 2. the ingest's own write to another market after the rollback, in the same flush
        saved = await backup_all(r)
        await feed(ing, price("1.59", 2.4, pt=now_ms()))
        await restore_all(r, saved)
        await feed(ing, price("1.3", 2.6, pt=now_ms()))  # (its flush's own audit would read only a slice)
        assert await holds_book(store, ing, X, 2.4), "a rollback hidden by the ingest's own next write"
        assert ing.store_went_back == 2
    finally:
        await r.aclose()
        await store.close()


@pytest.mark.parametrize("finder", ["heartbeat", "own write"])
async def test_a_restore_still_under_way_is_found_by_the_recheck(redis_url: str, finder: str) -> None:
    """Reviews of §81: an audit of everything that finds the marks gone back takes the store as it
    then is for its baseline — a restore still under way key by key (the marks and the log first,
    the markets' keys after) then took a market back with nothing left to notice it; and a rollback
    the ingest's own write found (the mark the script returned) scheduled no recheck at all (that
    write had moved the mark: the audit after it read nothing gone back). Any detection now
    schedules one more audit of everything a beat later (``RECHECK_AFTER_S``); the periodic audit
    is off here."""
    store, r, ing = await _sixty_markets_in_slices(redis_url)
    X = "bf:1.59"
    try:
        saved = await backup_all(r)
        await feed(ing, price("1.59", 2.2, pt=now_ms()))
        first = {k: v for k, v in saved.items() if k in (b"of:{0}:writers", log_key(0).encode())}
        assert len(first) == 2
        await restore_all_keys(r, first)  # the marks and the log first …
        ing.audit_every_s = 3600.0  # (after the next audit, no periodic one)
        await feed(ing, heartbeat(pt=now_ms()) if finder == "heartbeat" else price("1.3", 2.6, pt=now_ms()))
        assert ing.store_went_back == 1 and ing.lost_writes == 0  # found; nothing behind yet
        await restore_all_keys(r, {k: v for k, v in saved.items() if k not in first})  # … the markets after

        async def repaired() -> bool:
            await feed(ing, heartbeat(pt=now_ms()))
            return await holds_book(store, ing, X, 2.2)

        await eventually(repaired, WAIT_S, "the recheck to find the market the restore took back", interval_s=0.1)
        if finder == "heartbeat":
            assert ing.lost_writes == 1
        else:  # (the second step took the write that found it back too: 1.3 repaired with 1.59)
            assert ing.lost_writes == 2 and await holds_book(store, ing, "bf:1.3", 2.6)
    finally:
        await r.aclose()
        await store.close()


async def restore_all_keys(r: aioredis.Redis, saved: dict[bytes, tuple[bytes, int]]) -> None:
    """These keys back to ``saved`` (one MULTI), the others left as they are: a restore tool's step."""
    pipe = r.pipeline(transaction=True)
    for key, (value, ttl) in saved.items():
        pipe.restore(key, ttl, value, replace=True)
    await pipe.execute()


async def test_a_write_that_landed_without_its_reply_is_adopted_as_the_ingests_own(redis_url: str) -> None:
    """Second review of §81: a write that landed while its reply was lost left the ingest's memory
    at the entry before it (the retry is dropped as stored: no new entry), so a rollback to just
    before the landed write matched what it remembered and went unseen. A mark newer than the
    ingest remembers is its own landed write: adopted."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    ing = Ingest(store, source="betfair")
    ing.audit_every_s = 3600.0
    try:
        t = now_ms()
        await feed(ing, image("1.1", 2.0, pt=t), image("1.2", 3.0, pt=t))
        saved = await backup_all(r)
        real = store._apply

        async def landed_then_lost(*args: Any, **kwargs: Any) -> Any:
            await real(*args, **kwargs)
            raise RedisConnectionError("the reply was lost")

        store._apply = landed_then_lost  # type: ignore[method-assign]
        await feed(ing, price("1.1", 2.2, pt=now_ms()))  # lands; the ingest sees an error
        store._apply = real  # type: ignore[method-assign]
        assert not ing.store_ok

        async def written() -> bool:  # the retry (dropped as stored) and the audit after the error
            await feed(ing, heartbeat(pt=now_ms()))
            return ing.store_ok and not ing.audit_due

        await eventually(written, WAIT_S, "the retry after the lost reply", interval_s=0.1)
        await restore_all(r, saved)  # the store goes back to before the landed write
        assert await ing.check_store_marks(), "a rollback past the write whose reply was lost went unseen"
        await feed(ing, heartbeat(pt=now_ms()))
        assert await holds_book(store, ing, A, 2.2)
    finally:
        await r.aclose()
        await store.close()


async def test_two_ingests_of_one_source_keep_marks_of_their_own(redis_url: str) -> None:
    """Second review of §81: the mark was keyed by source, so two ingests of one source (an
    upgrade's overlap) shared it, and after a rollback one's write moved it past the other's lost
    entry. Each running ingest has its own mark."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    a, b = Ingest(store, source="betfair"), Ingest(store, source="betfair")
    for ing in (a, b):
        ing.audit_every_s = 3600.0
    try:
        t = now_ms()
        await feed(a, image("1.1", 2.0, pt=t))
        await feed(b, image("1.2", 3.0, pt=t))
        saved = await backup_all(r)
        await feed(b, price("1.2", 3.3, pt=now_ms()))  # b's write: lost by the rollback below
        await restore_all(r, saved)
        await feed(a, price("1.1", 2.4, pt=now_ms()))  # a writes after the rollback
        assert await b.check_store_marks(), "b's lost write hidden by a's"
        await feed(b, heartbeat(pt=now_ms()))
        assert await holds_book(store, b, B, 3.3)
        assert len(await r.hkeys("of:{0}:writers")) == 2
    finally:
        await r.aclose()
        await store.close()


async def test_marks_never_cry_wolf_and_never_raise(redis_url: str) -> None:
    """Second review of §81: an event-state flush whose states all cancel out wrote nothing and
    read as "mark missing" (a warning and an audit of everything); a FLUSHALL (a new epoch) was
    also reported as gone back once per partition; a mark that is not text raised out of the
    flush (UnicodeDecodeError). None now."""
    r = aioredis.Redis.from_url(redis_url)
    store = await Store.open(redis_url)
    try:
        # states that cancel out within one flush (A -> B -> A): nothing written, nothing gone back
        scores = Ingest(store, source="scores", normaliser=_Scores())  # type: ignore[arg-type]
        await feed(scores, b"score 0")
        scores.feed_lines([b"score 1", b"score 0"], now_ms())
        await scores.flush()
        assert scores.store_went_back == 0
        # a mark that is not text reads as missing: the store is audited, nothing raises
        one = Ingest(store, source="betfair")
        await feed(one, image("1.1", 2.0, pt=now_ms()))
        for field in await r.hkeys("of:{0}:writers"):
            await r.hset("of:{0}:writers", field, b"\xff\xfe-1")
        assert await one.check_store_marks()
        await feed(one, price("1.1", 2.3, pt=now_ms()))
        assert one.store_ok and await holds_book(store, one, A, 2.3)
    finally:
        await store.close()
    await r.flushall()
    many = await Store.open(redis_url, partitions=8)
    try:
        # a new epoch (FLUSHALL) over 8 partitions: the epoch's own path, not "gone back" per partition
        ing = Ingest(many, source="betfair")
        t = now_ms()
        await feed(ing, *(image(f"1.{i}", 2.0, pt=t) for i in range(40)))
        assert len(ing._wrote) > 1
        await r.flushall()
        await feed(ing, price("1.1", 2.2, pt=now_ms()))
        assert ing.store_went_back == 0
    finally:
        await many.close()
        await r.flushall()
        await r.aclose()


async def test_marks_of_writers_gone_are_pruned_and_a_moved_one_is_kept(redis_url: str) -> None:
    """Each running ingest keeps its own mark, so restarts leave marks behind: the health
    publisher drops those older than ``WRITER_MARK_KEEP_MS`` (a mark its writer moved meanwhile
    stays)."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    try:
        ing = Ingest(store, source="betfair")
        await feed(ing, image("1.1", 2.0, pt=now_ms()))
        await r.hset("of:{0}:writers", mapping={"gone#1": "1000-0", "junk#2": "x"})
        await r.hset("of:{es}:writers", "gone#3", "1000-0")
        assert await store.prune_writer_marks(now_ms() - 60_000) == 3
        assert [f.decode() for f in await r.hkeys("of:{0}:writers")] == [ing._writer]
        assert await store.prune_writer_marks(now_ms() + 60_000) == 1  # (everything older: the live one too)
        assert not await ing.check_store_marks() or ing.audit_due  # (a quiet writer whose mark went audits)
    finally:
        await r.aclose()
        await store.close()


async def test_a_restore_takes_no_mark_the_pruning_would_drop(redis_url: str) -> None:
    """§88's review: a mark taken from a log whose newest entry is older than the pruning keeps would
    be dropped by any ingest's pruning within 30 s, and its writer would then cry "went back" (two
    full audits) though nothing did: none is taken from such a log."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    try:
        await feed(Ingest(store, source="betfair"), image("1.1", 2.0, pt=now_ms()))
        marks, state = await store.adopt_writer_marks("late#1", [0], states=True, newer_than_ms=now_ms() + 60_000)
        assert marks == {0: ""} and state == "" and not await r.hexists(writers_key(0), "late#1")
        marks, _ = await store.adopt_writer_marks("late#1", [0], newer_than_ms=now_ms() - 60_000)
        assert marks[0] and (await r.hget(writers_key(0), "late#1")).decode() == marks[0]
    finally:
        await r.aclose()
        await store.close()


async def test_marks_a_restored_ingest_cannot_move_are_not_kept_and_a_flush_of_all_is_no_alarm_to_any(
        redis_url: str) -> None:
    """§88's second review: (1) marks taken where the source holds nothing never move, are pruned after
    two days and their writer would then cry "went back" — a restored ingest keeps marks only where
    it holds markets (and on the event-state log only when it holds states); (2) two ingests of one
    process share a Store, whose epoch the first to see a FLUSHALL adopts for both — the second then
    read its own marks against the new epoch and cried "went back"; each compares its own."""
    store = await Store.open(redis_url)
    r = aioredis.Redis.from_url(redis_url)
    try:
        await feed(Ingest(store, source="betfair"), image("1.1", 2.0, pt=now_ms()))
        empty = Ingest(store, source="quiet")  # a source with nothing stored yet
        await empty.restore()
        assert not await r.hexists(writers_key(0), empty._writer)
        assert not await r.hexists("of:{es}:writers", empty._writer)
        a, b = Ingest(store, source="betfair"), Ingest(store, source="other")
        await a.restore()
        assert await r.hexists(writers_key(0), a._writer)  # (it holds 1.1 there)
        await feed(b, image("2.1", 3.0, pt=now_ms()))
        await r.flushall()
        await feed(a, image("1.1", 2.2, pt=now_ms()))  # the first to write adopts the new epoch for the Store
        assert not await b.check_store_marks() and b.store_went_back == 0
        await feed(b, image("2.2", 3.1, pt=now_ms()))  # (another market)
        await b.flush()  # the audit its write asked for: 2.1, lost with the FLUSHALL, written again
        assert b.store_went_back == 0 and a.store_went_back == 0
        assert back_of(await store.get_market("bf:2.1")) == 3.0 and back_of(await store.get_market(A)) == 2.2
    finally:
        await r.aclose()
        await store.close()
