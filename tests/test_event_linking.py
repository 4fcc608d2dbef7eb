"""Cross-provider event linking end to end: one synthetic model served by
every simulator (ESA + Betfair catalogue, Pinnacle, The Odds API, push over
WebSocket and SSE), each provider with its own spelling of the teams
(:mod:`feed.simulator.names`), five real sources into one real Redis, the
real linker — every model event must become one canonical event holding
each provider's record (100 % of the simulators' true links, 0 false
links), and the API must serve it with every provider's books."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from feed.linker import Linker
from feed.pipeline import run_spec
from feed.settings import Settings
from feed.simulator import Simulator, SimulatorConfig
from feed.simulator.http_providers import PINNACLE, TOA, HttpProviders, ProvidersConfig
from feed.simulator.links import betfair_event_id, true_records
from feed.simulator.market_model import MarketModel
from feed.simulator.push_providers import PushSimConfig, PushSimulator
from feed.sources.spec import parse_source_spec
from feed.store import Store
from tests.poller_helpers import FAST
from tests.streaming_helpers import Feed, SSEReader, eventually, make_app, serve

pytestmark = pytest.mark.timeout(90)

SEED = 7
#: racing is offered by Betfair and the push provider only
RACING = {"horse_racing", "greyhound_racing"}


@dataclass
class Upstreams:
    esa: Simulator
    http: HttpProviders
    push: PushSimulator
    model: MarketModel
    specs: list[str] = field(default_factory=list)

    def truth(self) -> dict[str, dict[str, str]]:
        """{model record: {source: record id}} for the model's events now."""
        return true_records(self.model, {
            "betfair": betfair_event_id,
            "pinnacle": lambda e, s: self.http.provider_event_id(PINNACLE, e, s),
            "theoddsapi": lambda e, s: self.http.provider_event_id(TOA, e, s),
            "push-ws": lambda e, s: self.push.provider_event_id(e, "pxw"),
            "push-sse": lambda e, s: self.push.provider_event_id(e, "pxs"),
        })


@asynccontextmanager
async def upstreams() -> AsyncIterator[Upstreams]:
    """The ESA simulator owns (and steps) the model; the HTTP and push
    simulators serve the same one. time_scale 2: nothing that is on at the
    start ends within the test, except a race or two."""
    esa = Simulator(SimulatorConfig(seed=SEED, events=12, rate_per_s=100.0, time_scale=2.0, api_port=0))
    await esa.start()
    assert esa.model is not None and esa.api is not None
    model = esa.model
    http = HttpProviders(ProvidersConfig(tick_ms=20), model=model)
    push = PushSimulator(PushSimConfig(tick_ms=20, ping_interval_ms=400), model=model)
    await http.start()
    await push.start()
    cfg = esa.config
    key = push.config.api_key
    specs = [
        f"esa=127.0.0.1:{esa.port},app_key={cfg.app_key},username={cfg.username},password={cfg.password},"
        f"sso_url={esa.api.url},betting_url={esa.api.betting_url},name=betfair",
        f"pinnacle={http.url},user=demo,password=demo,sports=29+33+4,fixtures_interval_s=0.3,{FAST},name=pinnacle",
        f"theoddsapi={http.url}/v4,api_key=demo,sport=upcoming,markets=h2h+totals,{FAST},name=theoddsapi",
        f"push-ws={push.url('ws')},api_key={key},ping_interval_ms=400,prefix=pxw,name=push-ws",
        f"push-sse={push.url('sse')},api_key={key},ping_interval_ms=400,prefix=pxs,name=push-sse",
    ]
    try:
        yield Upstreams(esa, http, push, model, specs)
    finally:
        await push.stop()
        await http.stop()
        await esa.stop()


@dataclass
class Score:
    """Pairwise link quality: a true pair = two registered records of one
    model event; a predicted pair = two records in one canonical event."""

    true_pairs: set[frozenset[str]]
    predicted: set[frozenset[str]]
    split: list[str]  # model events whose records are in more than one canonical event
    merged: list[str]  # canonical events holding records of two model events
    missing: list[str]  # current model events some provider has not registered yet
    unknown: list[str]  # registered records no simulator served

    @property
    def precision(self) -> float:
        return len(self.true_pairs & self.predicted) / len(self.predicted) if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return len(self.true_pairs & self.predicted) / len(self.true_pairs) if self.true_pairs else 1.0

    def perfect(self) -> bool:
        return not (self.split or self.merged or self.missing or self.unknown) and bool(self.true_pairs)

    def report(self) -> str:
        return (f"precision={self.precision:.3f} recall={self.recall:.3f} "
                f"({len(self.true_pairs)} true pairs, {len(self.predicted)} linked pairs)\n"
                f"split: {self.split}\nmerged: {self.merged}\nmissing: {self.missing}\nunknown: {self.unknown}")


def score(owner: dict[str, str], current: dict[str, dict[str, str]], links: dict[str, str],
          names: dict[str, str]) -> Score:
    """``owner``: record id → model record (every record any simulator has
    served so far); ``current``: the model's events now; ``links``: record
    id → canonical id as stored; ``names``: record id → event name (for the
    report)."""
    by_model: dict[str, set[str]] = defaultdict(set)
    by_canon: dict[str, set[str]] = defaultdict(set)
    unknown = []
    for rid, cid in links.items():
        by_canon[cid].add(rid)
        if rid in owner:
            by_model[owner[rid]].add(rid)
        else:
            unknown.append(rid)
    true_pairs = {frozenset(p) for recs in by_model.values() for p in itertools.combinations(sorted(recs), 2)}
    predicted = {frozenset(p) for recs in by_canon.values() for p in itertools.combinations(sorted(recs), 2)}
    split = [f"{mk}: " + ", ".join(f"{r} ({names.get(r)}) → {links[r]}" for r in sorted(recs))
             for mk, recs in sorted(by_model.items()) if len({links[r] for r in recs}) > 1]
    merged = [f"{cid}: " + ", ".join(f"{r} ({names.get(r)}) of {owner.get(r)}" for r in sorted(recs))
              for cid, recs in sorted(by_canon.items()) if len({owner.get(r) for r in recs}) > 1]
    missing = [f"{mk}: no {sorted(set(srcs) - {s for s, r in srcs.items() if r in links})}"
               for mk, srcs in sorted(current.items()) if any(r not in links for r in srcs.values())]
    return Score(true_pairs, predicted, split, merged, missing, unknown)


async def test_every_simulated_event_is_one_canonical_event_with_every_providers_books(
        store: Store, redis_url: str) -> None:
    async with upstreams() as up:
        owner: dict[str, str] = {}

        def note_truth() -> dict[str, dict[str, str]]:
            now = up.truth()
            for mk, srcs in now.items():
                for rid in srcs.values():
                    owner[rid] = mk
            return now

        note_truth()
        sources = [asyncio.create_task(run_spec(store, Settings(), parse_source_spec(text)), name=text.split("=")[0])
                   for text in up.specs]
        linker = Linker(store, interval_s=0.1)
        last: dict[str, Score] = {}

        async def linked() -> bool:
            for t in sources:
                if t.done():  # a source that stopped: fail now with its error
                    raise AssertionError(f"source {t.get_name()} stopped: {t.exception()!r}")
            current = note_truth()
            await linker.step()
            _, stored, _ = await store.load_links()
            names = {rid: r.name for rid, r in linker.matcher.records.items() if r.name}
            last["score"] = s = score(owner, current, {rid: link.c for rid, link in stored.items()}, names)
            return s.perfect()

        try:
            try:
                await eventually(linked, 45, "every model event linked across the five sources", interval_s=0.2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{last['score'].report()}\n{_catalogue_report(up, linker)}") from None
            s = last["score"]
            assert s.precision == 1.0 and s.recall == 1.0, s.report()
            # at least the sports every provider offers, and every source in one canonical event
            current = up.truth()
            full = [mk for mk, srcs in current.items() if len(srcs) == 5]
            assert full, f"no model event every provider offers: {current}"

            # the API node: one soccer match with every provider's books
            _, stored, canon = await store.load_links()
            soccer = next(stored[srcs["betfair"]].c for mk, srcs in sorted(current.items())
                          if len(srcs) == 5 and _sport(canon, stored[srcs["betfair"]].c) == "soccer")
            async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, trust_env=False) as client:
                view = await eventually(lambda: _match_result(client, soccer), 20,
                                        f"GET /v1/events/{soccer} with >= 4 books in match_result")
            books = {b["bookmaker"] for o in view["outcomes"] for b in o["books"]}
            assert len(books) >= 4, books
            for o in view["outcomes"]:
                assert o.get("best") and o["best"]["price"] > 1, o
                assert o.get("fair") and o["fair"] > 1, o
            print(f"\nevent linking: {s.report()}\n{soccer}: books {sorted(books)}")
        finally:
            for t in sources:
                t.cancel()
            await asyncio.gather(*sources, return_exceptions=True)


def _catalogue_report(up: Upstreams, linker: Linker) -> str:
    """For a failure: each unnamed Betfair record's markets and what the
    Betting API simulator was asked and answered of them (names come only
    from its catalogue)."""
    api = up.esa.api
    assert api is not None
    calls = list(api.catalogue_requests)
    lines = [f"betfair catalogue calls: {len(calls)}, answers {sorted({c.answer for c in calls})}"]
    for rid, rec in sorted(linker.matcher.records.items()):
        if rec.source != "betfair" or rec.name:
            continue
        eid = rid.removeprefix("bf:").split("/")[0]
        for mid, mb in sorted(up.model.books.items()):
            md = mb.definition or {}
            if str(md.get("eventId")) != eid:
                continue
            asked = [(round(c.at, 2), c.answer, mid in c.returned) for c in calls if mid in c.ids]
            lines.append(f"{rid} market {mid} ({md.get('status')}, v{md.get('version')}): asked {asked}")
    return "\n".join(lines)


def _sport(canon: dict[str, bytes], cid: str) -> str | None:
    import msgspec

    raw = canon.get(cid)
    return msgspec.json.decode(raw).get("sport") if raw is not None else None


async def _match_result(client: httpx.AsyncClient, cid: str) -> dict[str, Any] | None:
    r = await client.get(f"/v1/events/{cid}")
    if r.status_code != 200:
        return None
    for v in r.json()["view"]:
        if v["market_type"] == "match_result":
            books = {b["bookmaker"] for o in v["outcomes"] for b in o["books"] if b.get("excluded") is None}
            if len(books) >= 4 and all(o.get("best") and o.get("fair") for o in v["outcomes"]):
                return dict(v)
    return None


# -- a relink on open streams and resumes (streaming.hub.Hub.relinked) ----------------------------


def _canon(cid: str, members: list[str]) -> bytes:
    import json

    return json.dumps({"event_id": cid, "sport": "soccer", "name": "A v B", "home": "A", "away": "B",
                       "members": members}).encode()


async def _linked_together(store: Store, feed: Feed) -> None:
    """Markets a:1 (event a:e) and b:1 (event b:e), both linked to canonical event ev:a:e."""
    from feed.store import StoredLink

    await feed.write(feed.image("a:1", event="a:e"), feed.image("b:1", event="b:e"))
    await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.96, "fuzzy")},
                           {"ev:a:e": _canon("ev:a:e", ["a:e", "b:e"])})


async def _split(store: Store) -> None:
    """The linker changes its mind: b:e is its own canonical event."""
    from feed.store import StoredLink

    await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:b:e", 1.0, "self")},
                           {"ev:a:e": _canon("ev:a:e", ["a:e"]), "ev:b:e": _canon("ev:b:e", ["b:e"])})


async def _event_count(c: httpx.AsyncClient, cid: str) -> int:
    return int((await c.get("/v1/markets", params={"event": cid})).json()["count"])


async def _token_on_both(c: httpx.AsyncClient, feed: Feed, params: dict[str, str]) -> str:
    """Stream ``params`` (a canonical event holding a:1 and b:1): the snapshot has both; a
    change of a:1 gives the resume token returned."""
    await eventually(_both_linked(c), what="both markets in ev:a:e")
    async with c.stream("GET", "/v1/stream", params=params) as resp:
        sse = SSEReader(resp)
        assert sorted(m["market_id"] for m in (await sse.next()).data["markets"]) == ["a:1", "b:1"]
        await feed.write(feed.price("a:1", "1", 2.2))
        token = (await sse.until(lambda e: e.event == "delta")).id
    assert token
    return token


def _both_linked(c: httpx.AsyncClient) -> Any:
    async def both() -> bool:
        return await _event_count(c, "ev:a:e") == 2
    return both


@pytest.mark.parametrize("transport", ["sse", "ws_conflated"])
async def test_a_market_relinked_out_of_a_canonical_event_is_removed_from_its_streams(
        store: Store, redis_url: str, transport: str) -> None:
    """b:1 leaves ev:a:e because the linker re-linked its event (no delta of its own): a stream
    filtered on ev:a:e gets ``removed`` for it and nothing of it after (it held the old price as
    fresh for ever). Conflated: the move lands in the window that gathered a b:1 change, and the
    window's one message for b:1 is ``removed``, not a merged delta."""
    import json

    from websockets.asyncio.client import connect

    feed = Feed(store)
    await _linked_together(store, feed)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        await eventually(_both_linked(c), what="both markets in ev:a:e")
        if transport == "sse":
            async with c.stream("GET", "/v1/stream", params={"event": "ev:a:e"}) as resp:
                sse = SSEReader(resp)
                snap = await sse.next()
                assert sorted(m["market_id"] for m in snap.data["markets"]) == ["a:1", "b:1"]
                await _split(store)
                ev = await sse.until(lambda e: e.event != "heartbeat", timeout_s=20)
                assert ev.event == "removed" and ev.data["market_id"] == "b:1", ev
                await feed.write(feed.price("b:1", "1", 7.7))
                await feed.write(feed.price("a:1", "1", 2.2))
                ev = await sse.until(lambda e: e.event != "heartbeat")
                assert ev.event == "delta" and ev.data["market_id"] == "a:1", ev  # b:1's delta never came
            return
        async with connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
            async def recv() -> dict[str, Any]:
                while (m := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] == "heartbeat":
                    pass
                return dict(m)
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"event": "ev:a:e"}, "conflate_ms": 1000}))
            assert (await recv())["type"] == "ack"
            assert sorted(m["market_id"] for m in (await recv())["markets"]) == ["a:1", "b:1"]
            await feed.write(feed.price("a:1", "1", 2.1))
            assert (await recv())["market_id"] == "a:1"  # a window was just sent: the next starts now
            await feed.write(feed.price("b:1", "1", 7.7))  # gathered …
            await _split(store)                             # … and b:1 leaves in the same window
            await eventually(lambda: _event_count(c, "ev:b:e"), what="the relink applied")
            await feed.write(feed.price("b:1", "1", 9.9))
            await feed.write(feed.price("a:1", "1", 2.3))
            got = [await recv()]
            while not (got[-1]["type"] == "delta" and got[-1]["market_id"] == "a:1"):
                got.append(await recv())
            about_b = [m for m in got if m.get("market_id") == "b:1"]
            assert about_b and about_b[-1]["type"] == "removed", got
            assert "9.9" not in json.dumps(got), got


async def test_a_resume_from_before_a_relink_is_not_recovered(store: Store, redis_url: str) -> None:
    """The client was away while b:1 left ev:a:e: its resume is not recovered (the replay holds no
    trace of the move and it holds b:1) — a fresh snapshot without b:1; a token issued after the
    move resumes as before."""
    feed = Feed(store)
    await _linked_together(store, feed)
    params = {"event": "ev:a:e"}
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        token = await _token_on_both(c, feed, params)
        await _split(store)

        async def moved() -> bool:
            return await _event_count(c, "ev:a:e") == 1
        await eventually(moved, what="the relink applied")
        await feed.write(feed.price("a:1", "1", 2.4))
        async with c.stream("GET", "/v1/stream", params=params, headers={"Last-Event-ID": token}) as resp:
            sse = SSEReader(resp)
            ev = await sse.next()
            assert ev.event == "resumed" and ev.data["recovered"] is False, ev
            snap = await sse.next()
            assert snap.event == "snapshot" and [m["market_id"] for m in snap.data["markets"]] == ["a:1"]
            await feed.write(feed.price("a:1", "1", 2.6))
            token = (await sse.until(lambda e: e.event == "delta")).id
        await feed.write(feed.price("a:1", "1", 2.8))
        async with c.stream("GET", "/v1/stream", params=params, headers={"Last-Event-ID": token}) as resp:
            sse = SSEReader(resp)
            ev = await sse.next()
            assert ev.event == "resumed" and ev.data["recovered"] is True, ev
            ev = await sse.until(lambda e: e.event != "heartbeat")
            assert ev.event == "delta" and ev.data["market_id"] == "a:1" and ev.data["selections"][0]["price"] == 2.8



async def test_a_resume_on_another_node_after_a_relink_while_no_node_served_it_is_not_recovered(
        store: Store, redis_url: str) -> None:
    """The linker split b:e out of ev:a:e while the client's node was gone; the next node adopted
    the links before serving anyone, so it saw no relink: the resume was recovered, no `removed`
    came for b:1 and none of its changes — its old price, confirmed by every heartbeat (review,
    §66). A node now takes no resume of a canonical-event filter from before it started."""
    feed = Feed(store)
    await _linked_together(store, feed)
    params = {"event": "ev:a:e"}
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        token = await _token_on_both(c, feed, params)
    await _split(store)  # no node serves the client meanwhile
    await feed.write(feed.price("b:1", "1", 7.7), feed.price("a:1", "1", 2.4))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        async def split_seen() -> bool:
            return await _event_count(c, "ev:a:e") == 1
        await eventually(split_seen, what="the new node holds the new links")
        async with c.stream("GET", "/v1/stream", params=params, headers={"Last-Event-ID": token}) as resp:
            sse = SSEReader(resp)
            resumed = await sse.next()
            assert resumed.event == "resumed" and resumed.data["recovered"] is False, resumed
            snap = await sse.until(lambda e: e.event == "snapshot")
            assert [m["market_id"] for m in snap.data["markets"]] == ["a:1"]


async def test_a_market_relinked_out_and_back_within_a_conflation_window_stays_held(
        store: Store, redis_url: str) -> None:
    """Out and back within one window: the move-out `removed` went through conflation, the
    move-back image straight out — the client got the image, then `removed`, and dropped a
    market its event holds (review, §66). Both now go in order: the last word wins."""
    import contextlib
    import json

    from websockets.asyncio.client import connect

    from feed.store import StoredLink

    feed = Feed(store)
    await _linked_together(store, feed)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        await eventually(_both_linked(c), what="both linked")
        async with connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
            async def recv(timeout_s: float = 20) -> dict[str, Any]:
                while (m := json.loads(await asyncio.wait_for(ws.recv(), timeout_s)))["type"] == "heartbeat":
                    pass
                return dict(m)
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "filter": {"event": "ev:a:e"}, "conflate_ms": 1500}))
            assert (await recv())["type"] == "ack"
            assert sorted(m["market_id"] for m in (await recv())["markets"]) == ["a:1", "b:1"]
            await _split(store)
            async def split_seen() -> bool:
                return await _event_count(c, "ev:b:e") == 1
            await eventually(split_seen, what="the split applied")
            await store.save_links({"a:e": StoredLink("ev:a:e", 1.0, "self"),
                                    "b:e": StoredLink("ev:a:e", 0.96, "fuzzy")},
                                   {"ev:a:e": _canon("ev:a:e", ["a:e", "b:e"])})
            await eventually(_both_linked(c), what="linked back")
            held = {"a:1", "b:1"}
            # one window holds both moves (the image alone), or a window's tick fell between the
            # node adopting the split and the link back (its `removed`, then the image): either
            # way in order — the market's last word is its image, and nothing after it takes it away
            words = [await recv(10)]
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    words.append(await recv(2.5))  # (> the window: a later word would have come)
            for m in words:
                if m["type"] == "removed":
                    held.discard(m["market_id"])
                elif m["type"] == "delta" and m["kind"] == "image":
                    held.add(m["market_id"])
            b1 = [(m["type"], m.get("kind")) for m in words if m.get("market_id") == "b:1"]
            assert b1 in ([("delta", "image")], [("removed", None), ("delta", "image")]), words
            assert held == {"a:1", "b:1"}
