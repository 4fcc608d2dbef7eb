"""The board's event page in a real headless Chromium (the CDP client and
browser fixture of test_board_browser.py) against a real API node on
loopback: four books of one canonical event written through the real store
(Book → Store.apply) and linked with Store.save_links.

Checks: the list links each provider event to its page, which resolves to
the canonical event; the page shows the event, its members with their match
confidence, every book's price per canonical market and outcome with its
age, the best price highlighted with its book, the fair price and the best
lay; a suspended book is greyed with the reason as tooltip; a price change
that makes another book the best highlights and flashes the new best cell
(for about a second); the in-play badge follows the books; a book linked
while the page is open joins the grid and its prices stream live.
A market group that leaves the event (its only book relinked to its own
event: the best stream's removal; or a resync snapshot of the open best
stream that no longer lists it) leaves the page at once, without waiting
for the page's re-read of the event.
The header shows the event's score (the GET's state on load, then live
event_state messages of its members: the freshest not stale one, turned
round for a member naming the sides the other way round), period, a running
clock, red cards and a stale marker.

Set ODDSFEED_SCREENSHOT_DIR to keep a screenshot of the page.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import msgspec
from streaming_helpers import Feed, eventually, make_app, now_ms, serve
from test_board_browser import browser, require_chromium

from feed.linker import CanonicalSummary
from feed.models import (
    Clock,
    EventState,
    MarketHeader,
    MarketStatus,
    Score,
    Selection,
    SourceHealth,
    TeamCounts,
)
from feed.normalise.base import MarketUpdate
from feed.settings import Settings
from feed.store import Store, StoredLink

CID = "ev:a:e1"
START = now_ms() + 3 * 3600_000
#: book → (provider event, link confidence, link method)
MEMBERS = {"book_a": ("a:e1", 1.0, "self"), "book_b": ("b:e1", 0.93, "fuzzy"),
           "exch": ("x:e1", 0.88, "fuzzy"), "book_s": ("s:e1", 0.97, "fuzzy")}
#: a book linked to the event while the page is open
LATE = {"book_c": ("c:e1", 0.91, "fuzzy")}
#: books that alone offer a market group, and are relinked to an event of their own while the page is open
LONERS = {"book_d": ("d:e1", 0.90, "fuzzy"), "book_e": ("e:e1", 0.89, "fuzzy")}
SEL_IDS = {"home": "h", "draw": "d", "away": "a", "over": "o", "under": "u"}


def _sel(outcome: str, price: float, lay: float | None = None) -> Selection:
    return Selection(selection_id=SEL_IDS[outcome], name=outcome.title(), outcome=outcome, price=price,
                     back=[(price, 100.0)], lay=[(lay, 50.0)] if lay is not None else [])


def _image(mid: str, book: str, sels: list[Selection], *, mtype: str = "match_result",
           specs: dict[str, str] | None = None, status: MarketStatus = "OPEN") -> MarketUpdate:
    t = now_ms()
    return MarketUpdate(
        market_id=mid, source=book, image=True,
        header=MarketHeader(sport="soccer", event_id=(MEMBERS | LATE | LONERS)[book][0], event_name="Arsenal v Chelsea",
                            competition="Premier League", bookmaker=book, in_play=False, status=status,
                            market_type=mtype, specifiers=specs, name="Match Odds" if mtype == "match_result"
                            else "Over/Under 2.5 Goals", start_time=START),
        selections=sels, source_ts=t, received_at=t + 1)


def _price(mid: str, book: str, outcome: str, price: float) -> MarketUpdate:
    t = now_ms()
    return MarketUpdate(market_id=mid, source=book, image=False, header=None, selections=[_sel(outcome, price)],
                        source_ts=t, received_at=t + 1)


def _q(market: str, outcome: str, what: str) -> str:
    """JS: the element ``what`` of one outcome row of one canonical market grid."""
    sel = f'#event-page [data-market="{market}"] tr[data-outcome="{outcome}"] {what}'
    return f"document.querySelector({json.dumps(sel)})"


def _fmt(p: float) -> str:
    """The page's fmtPrice for prices under 10."""
    return f"{p:.2f}".rstrip("0").rstrip(".")


async def _link(store: Store, members: dict[str, tuple[str, float, str]], reversed_: frozenset[str] = frozenset(),
                apart: dict[str, tuple[str, float, str]] | None = None) -> None:
    """Link ``members`` to CID; the events of ``apart`` each to a canonical event of its own."""
    links = {ev: StoredLink(CID, p, m, ev in reversed_) for ev, p, m in members.values()}
    links |= {ev: StoredLink(f"ev:{ev}", 1.0, "self") for ev, _, _ in (apart or {}).values()}
    summary = CanonicalSummary(event_id=CID, sport="soccer", name="Arsenal v Chelsea", home="Arsenal",
                               away="Chelsea", competition="Premier League", start_time=START,
                               members=sorted(links))
    await store.save_links(links, {CID: msgspec.json.encode(summary)})


async def _setup(store: Store, reversed_: frozenset[str] = frozenset()) -> Feed:
    await _link(store, MEMBERS, reversed_)
    feed = Feed(store)
    await feed.write(
        _image("a:1", "book_a", [_sel("home", 2.10), _sel("draw", 3.40), _sel("away", 3.60)]),
        _image("b:1", "book_b", [_sel("home", 2.20), _sel("draw", 3.30), _sel("away", 3.50)]),
        _image("x:1", "exch", [_sel("home", 2.05, 2.08), _sel("draw", 3.45, 3.5), _sel("away", 3.70, 3.75)]),
        # better than everyone on home, but suspended: greyed, left out of best and fair
        _image("s:1", "book_s", [_sel("home", 2.50), _sel("draw", 3.20), _sel("away", 3.40)], status="SUSPENDED"),
        _image("a:2", "book_a", [_sel("over", 1.90), _sel("under", 1.95)], mtype="total", specs={"line": "2.5"}),
        _image("b:2", "book_b", [_sel("over", 2.00), _sel("under", 1.80)], mtype="total", specs={"line": "2.5"}),
    )
    return feed


async def test_event_page_shows_every_book_best_and_fair_and_flashes_a_new_best(redis_url: str) -> None:
    require_chromium()
    store = await Store.open(redis_url)
    try:
        feed = await _setup(store)
        app = make_app(redis_url, settings=Settings(heartbeat_ms=1000))
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http, \
                browser(base + "/?event_refresh_ms=1000") as page:
            # -- the list links each provider event to its page; the page resolves the canonical event
            link = json.dumps('a.event-name[href="#/event/b%3Ae1"]')
            await page.until(f"document.querySelector({link}) !== null", "the event's link on the list")
            await page.js(f"document.querySelector({link}).click()")
            await page.until(f"location.hash === '#/event/' + encodeURIComponent({json.dumps(CID)})",
                             "the canonical event in the address")
            await page.until("oddsBoard.event.stats.bestMessages >= 1 && oddsBoard.state.stats.snapshots >= 1 "
                             "&& document.querySelectorAll('#event-page td.cell[data-mid]').length === 16",
                             "every book's cell on the event page")
            assert await page.js("document.getElementById('board').hidden") is True
            assert await page.js("document.querySelector('.ev-name').textContent") == "Arsenal v Chelsea"
            assert await page.js("document.querySelector('.ev-head time.start').textContent") != ""
            assert await page.js("document.querySelector('.ev .live')") is None  # pre-match: no in-play badge
            members = await page.js("[...document.querySelectorAll('.member')].map(e => "
                                    "[e.dataset.event, e.querySelector('.books').textContent, "
                                    "e.querySelector('.conf').textContent])")
            assert sorted(members) == sorted([ev, book, f"{round(p * 100)}%"] for book, (ev, p, _) in MEMBERS.items())

            # -- every book's price, with its age
            api = (await http.get(f"/v1/events/{CID}?view=best")).json()
            views = {v["market"]: v for v in api["view"]}
            assert set(views) == {"match_result", "total:line=2.5"}
            for key, v in views.items():
                for o in v["outcomes"]:
                    for b in o["books"]:
                        cell = _q(key, o["outcome"], f'td.cell[data-book="{b["bookmaker"]}"]')
                        got = await page.js(f"[{cell}.dataset.price, {cell}.querySelector('.p').textContent, "
                                            f"{cell}.querySelector('.cage').textContent]")
                        assert got[0] == str(b["price"]).removesuffix(".0") and got[1] == _fmt(b["price"]), (key, b)
                        assert got[2] == "now" or got[2].endswith(" s"), got
            # -- best highlighted with its book, best lay, fair
            home = next(o for o in views["match_result"]["outcomes"] if o["outcome"] == "home")
            assert (home["best"]["bookmaker"], home["best"]["price"]) == ("book_b", 2.2)
            best_cells = await page.js("[...document.querySelectorAll('#event-page [data-market=\"match_result\"] "
                                       "tr[data-outcome=home] td.cell.best')].map(e => e.dataset.book)")
            assert best_cells == ["book_b"]
            assert await page.js(f"{_q('match_result', 'home', 'td.bestcol')}.textContent") == "2.2book_b"
            assert await page.js(f"{_q('match_result', 'home', 'td.laycol')}.dataset.book") == "exch"
            assert await page.js(f"{_q('match_result', 'home', 'td.laycol .p')}.textContent") == "2.08"
            fair = await page.js(f"[{_q('match_result', 'home', 'td.faircol')}.dataset.fair, "
                                 f"{_q('match_result', 'home', 'td.faircol')}.textContent]")
            assert fair == [str(home["fair"]), _fmt(home["fair"])]
            for o in views["match_result"]["outcomes"]:  # one best cell per outcome, on the API's best book
                assert await page.js(f"{_q('match_result', o['outcome'], 'td.cell.best')}.dataset.book") \
                    == o["best"]["bookmaker"]
            # -- the suspended book: greyed, the reason as tooltip, never the best
            susp = _q("match_result", "home", 'td.cell[data-book="book_s"]')
            assert await page.js(f"[{susp}.classList.contains('excluded'), {susp}.dataset.excluded, {susp}.title]") \
                == [True, "suspended", "suspended: this book is not taking bets on it"]
            assert await page.js("document.querySelectorAll('#event-page .flash-up, #event-page .flash-down')"
                                 ".length") == 0
            await _screenshot(page, "oddsfeed-event-page.png")

            # -- book_b drops its home price: book_a's unchanged 2.10 is now the best; that cell flashes
            flashes = await page.js("oddsBoard.event.stats.bestFlashes")
            await feed.write(_price("b:1", "book_b", "home", 2.00))
            a_cell = _q("match_result", "home", 'td.cell[data-book="book_a"]')
            # (the best column's flash is seen with the cell's: a flash lasts 1.5 s, which a loaded machine
            # may spend between two reads of the page)
            await page.until(f"{a_cell}.classList.contains('best') && {a_cell}.classList.contains('flash-down') "
                             f"&& {_q('match_result', 'home', 'td.bestcol')}.classList.contains('flash-down')",
                             "the new best cell (book_a) highlighted and flashing, and the best column")
            assert await page.js(f"{_q('match_result', 'home', 'td.bestcol')}.textContent") == "2.1book_a"
            assert await page.js(f"{_q('match_result', 'home', 'td.cell.best')}.dataset.book") == "book_a"
            assert await page.js(f"{_q('match_result', 'home', 'td.cell[data-book=book_b]')}.dataset.price") == "2"
            assert await page.js("oddsBoard.event.stats.bestFlashes") == flashes + 1
            new_fair = next(o for o in (await http.get(f"/v1/events/{CID}?view=best")).json()["view"][0]["outcomes"]
                            if o["outcome"] == "home")["fair"]
            assert new_fair != home["fair"]
            await page.until(f"{_q('match_result', 'home', 'td.faircol')}.dataset.fair === {json.dumps(str(new_fair))}",
                             "the new fair price")
            await _screenshot(page, "oddsfeed-event-page-flash.png")
            # the flash is over after about a second; the highlight stays (the bound: a wait, not a speed target)
            await page.until(f"!{a_cell}.classList.contains('flash-down')", "the flash to end", timeout_s=10.0)
            assert await page.js(f"{a_cell}.classList.contains('best')")
            # ages tick
            await page.until("[...document.querySelectorAll('#event-page .cage')].some(e => /^[1-9]\\d* s$/"
                             ".test(e.textContent))", "cell ages ticking")

            # -- a book goes in play: the in-play badge
            await feed.write(feed.header("a:1", source="book_a", in_play=True))
            await page.until("document.querySelector('.ev .live') !== null", "the in-play badge")

            # -- a book linked while the page is open: it joins the grid (the periodic re-read), the book
            #    stream restarts to carry it, and its 2.30 is the new best home price
            await feed.write(_image("c:1", "book_c", [_sel("home", 2.30), _sel("draw", 3.30), _sel("away", 3.30)]))
            await _link(store, MEMBERS | LATE)
            c_cell = _q("match_result", "home", 'td.cell[data-book="book_c"]')
            await page.until(f"{c_cell} !== null && {c_cell}.classList.contains('best') "
                             "&& oddsBoard.state.markets.has('c:1')", "the late book in the grid and the stream")
            assert await page.js("[...document.querySelectorAll('.member')].some(e => e.dataset.event === 'c:e1')")
            await feed.write(_price("c:1", "book_c", "home", 2.40))
            await page.until(f"{c_cell}.dataset.price === '2.4' && "
                             f"{_q('match_result', 'home', 'td.bestcol')}.textContent === '2.4book_c'",
                             "the late book's price live")

            # -- back to the list
            await page.js("document.querySelector('.back-link').click()")
            await page.until("!document.getElementById('board').hidden && "
                             "document.querySelectorAll('#board .event').length === 5", "the list again")
            assert page.errors() == [], page.errors()
    finally:
        await store.close()


async def test_event_page_drops_a_market_group_that_leaves_the_event(redis_url: str) -> None:
    """book_d alone offers total 3.5 and book_e alone total 4.5 of the event. book_d is relinked to an
    event of its own: the best stream removes total 3.5 (``outcomes: []``, ``removed: true``) and the
    page drops that grid at once — not book_d's old prices until its next re-read of the event (set
    to a minute here). Then book_e leaves while the best stream's message about it is lost, and a
    resync snapshot of the open stream, which no longer lists total 4.5, takes it off the page."""
    require_chromium()
    store = await Store.open(redis_url)
    try:
        feed = await _setup(store)
        await feed.write(
            _image("d:3", "book_d", [_sel("over", 2.60), _sel("under", 1.50)], mtype="total", specs={"line": "3.5"}),
            _image("e:4", "book_e", [_sel("over", 3.90), _sel("under", 1.25)], mtype="total", specs={"line": "4.5"}),
        )
        await _link(store, MEMBERS | LONERS)
        app = make_app(redis_url, settings=Settings(heartbeat_ms=1000))
        grid = "document.querySelector('#event-page [data-market=\"{}\"]')"
        g35, g45 = grid.format("total:line=3.5"), grid.format("total:line=4.5")
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http, \
                browser(base + "/?event_refresh_ms=60000#/event/" + CID) as page:
            await page.until(f"window.oddsBoard && oddsBoard.event.stats.bestMessages >= 1 "
                             f"&& {_q('total:line=3.5', 'over', 'td.bestcol')}?.textContent === '2.6book_d' "
                             f"&& {_q('total:line=4.5', 'over', 'td.bestcol')}?.textContent === '3.9book_e'",
                             "both lone groups with their best prices")
            views = {v["market"] for v in (await http.get(f"/v1/events/{CID}?view=best")).json()["view"]}
            assert views == {"match_result", "total:line=2.5", "total:line=3.5", "total:line=4.5"}
            fetches = await page.js("oddsBoard.event.stats.fetches")

            # -- book_d is another match: total 3.5 leaves the event (the best stream's removal)
            await _link(store, MEMBERS | {"book_e": LONERS["book_e"]}, apart={"book_d": LONERS["book_d"]})
            await page.until(f"{g35} === null && !oddsBoard.event.best.has('total:line=3.5') "
                             "&& !oddsBoard.event.views.some(v => v.market === 'total:line=3.5')",
                             "the vanished group off the page (and out of the fetched view)", timeout_s=15)
            views = {v["market"] for v in (await http.get(f"/v1/events/{CID}?view=best")).json()["view"]}
            assert views == {"match_result", "total:line=2.5", "total:line=4.5"}
            # the rest stays, current: the other groups, book_s still greyed as suspended (not the best)
            assert await page.js(f"{g45} !== null && {grid.format('total:line=2.5')} !== null")
            susp = _q("match_result", "home", 'td.cell[data-book="book_s"]')
            assert await page.js(f"[{susp}.classList.contains('excluded'), {susp}.dataset.excluded]") \
                == [True, "suspended"]
            assert await page.js("document.querySelectorAll('#event-page td.cell.best[data-book=book_d]').length") == 0

            # -- book_e leaves too, but the best stream's word on it is lost (as if dropped on the way); a
            #    resync snapshot of the open stream (the hub's slow-consumer path) does not list total 4.5
            hub = app.state.node.hub
            (sub,) = hub.best.subs
            lost = hub.best._send
            hub.best._send = lambda events: None  # type: ignore[method-assign]
            try:
                await _link(store, MEMBERS, apart=LONERS)
                await eventually(lambda: "total:line=4.5" not in {
                    v.market for v in hub.best._views(CID, now_ms(), sub.filter)}, 10, "book_e relinked on the node")
            finally:
                hub.best._send = lost  # type: ignore[method-assign]
            assert await page.js(f"{g45} !== null")  # nothing said yet: the page still shows it
            messages = await page.js("oddsBoard.event.stats.bestMessages")
            sub.conn.resync_pending = True
            sub.conn._wake()
            await page.until(f"oddsBoard.event.stats.bestMessages > {messages} && {g45} === null "
                             "&& !oddsBoard.event.best.has('total:line=4.5')",
                             "the group the resync snapshot does not list off the page", timeout_s=15)
            assert await page.js("[...document.querySelectorAll('#event-page .ev-market')].map(e => e.dataset.market)") \
                == ["match_result", "total:line=2.5"]
            assert await page.js(f"[{susp}.classList.contains('excluded'), {susp}.dataset.excluded]") \
                == [True, "suspended"]
            # all of it without the page's periodic re-read of the event
            assert await page.js("oddsBoard.event.stats.fetches") == fetches
            assert page.errors() == [], page.errors()
    finally:
        await store.close()


def _state(event_id: str, source: str, version: int, home: int, away: int, *, period: str = "1h",
           seconds: int = 600, red: tuple[int, int] = (0, 0), ts: int | None = None) -> EventState:
    t = now_ms() if ts is None else ts
    return EventState(event_id=event_id, source=source, status="LIVE", in_play=True, period=period,
                      clock=Clock(seconds=seconds, running=True, at=t), score=Score(home=home, away=away),
                      red_cards=TeamCounts(home=red[0], away=red[1]), source_ts=t, received_at=t, version=version)


async def test_event_page_shows_the_score_and_keeps_it_current(redis_url: str) -> None:
    """The header's score, period, running clock, red cards and stale marker: the GET's state on load,
    then live event_state messages of the members (the freshest not stale one; exch names the sides
    the other way round, so its state is shown turned round, as the API's "state")."""
    require_chromium()
    store = await Store.open(redis_url)

    async def health(source: str, state: str) -> None:
        t = now_ms()
        await store.set_health(SourceHealth(source=source, kind="push", state=state,  # type: ignore[arg-type]
                                            last_message_at=t, updated_at=t, lease_ms=600_000,
                                            stale_after_ms=600_000))

    try:
        await _setup(store, frozenset({"x:e1"}))
        for book in ("book_b", "exch"):
            await health(book, "UP")
        await store.apply_event_states([_state("b:e1", "book_b", 1, 1, 0)])
        app = make_app(redis_url, settings=Settings(heartbeat_ms=1000))
        score = "document.querySelector('#event-page .ev-head .score')"
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http, \
                browser(base + "/?event_refresh_ms=1000#/event/" + CID) as page:
            # -- on load: the GET's state
            api = (await http.get(f"/v1/events/{CID}")).json()
            assert api["state"]["event_id"] == "b:e1" and api["state"]["score"]["home"] == 1
            await page.until(f"{score} && {score}.textContent.includes('1\u20130') "
                             f"&& {score}.textContent.includes('1st half')", "the score in the event's header")
            assert await page.js(f"[{score}.dataset.member, {score}.dataset.version, "
                                 f"{score}.classList.contains('stale'), {score}.classList.contains('none')]") \
                == ["b:e1", "1", False, False]
            first = await page.js(f"{score}.querySelector('.clock.running').textContent")
            assert first.startswith("10:")  # 600 s run on from the reading
            await page.until(f"{score}.querySelector('.clock').textContent !== {json.dumps(first)}",
                             "the match clock ticking in the header")
            assert await page.js(f"{score}.querySelectorAll('.rc').length") == 0

            # -- live: a goal and a red card
            await store.apply_event_states([_state("b:e1", "book_b", 2, 2, 0, red=(0, 1))])
            await page.until(f"{score}.dataset.version === '2' && {score}.textContent.includes('2\u20130') "
                             f"&& {score}.querySelectorAll('.rc').length === 1", "the goal in the header")
            assert await page.js("oddsBoard.state.stats.eventStates") >= 1  # it came on the stream

            # -- a fresher state of another member, which names the sides the other way round: turned
            await store.apply_event_states([_state("x:e1", "exch", 1, 0, 3, period="2h", seconds=3000,
                                                   red=(1, 0), ts=now_ms() + 1000)])
            await page.until(f"{score}.dataset.member === 'x:e1' && {score}.textContent.includes('3\u20130') "
                             f"&& {score}.textContent.includes('2nd half')", "the fresher member's state, turned")
            api = (await http.get(f"/v1/events/{CID}")).json()
            assert (api["state"]["event_id"], api["state"]["score"]["home"], api["state"]["score"]["away"]) \
                == ("x:e1", 3, 0)
            # its red card (exch's home) is the canonical away's: after the score
            assert await page.js(f"{score}.querySelector('.goals').innerHTML.endsWith('<span class=\"rc\" "
                                 f"title=\"red cards\">1</span>')")
            await _screenshot(page, "oddsfeed-event-page-score.png")

            # -- exch DOWN: its state is stale, the other member's (not stale) is shown
            await health("exch", "DOWN")
            await page.until(f"{score}.dataset.member === 'b:e1' && {score}.textContent.includes('2\u20130') "
                             f"&& !{score}.classList.contains('stale')", "the not stale member's state")
            # -- both DOWN: the freshest, marked stale
            await health("book_b", "DOWN")
            await page.until(f"{score}.dataset.member === 'x:e1' && {score}.classList.contains('stale') "
                             f"&& {score}.querySelector('.badge.stale') !== null", "the score marked stale")
            assert page.errors() == [], page.errors()
    finally:
        await store.close()


async def _screenshot(page: Any, name: str) -> None:
    folder = os.environ.get("ODDSFEED_SCREENSHOT_DIR")
    if folder:
        await page.screenshot(Path(folder) / name)
