"""The live odds board in a real headless Chromium, driven over the DevTools
protocol (a websockets client, no Selenium), against the whole service:
simulator (Betfair ESA over a real socket) → ingest → Redis → API → page.

Checks in the page: prices update and flash; the page's book equals the API's
(same rebuild rules as the Python client); filters work; "updated N s ago"
ticks; when the simulator stops, the ESA client marks the source DOWN and the
page shows the DOWN banner and stale markers; both clear when it returns.
Screenshots go to tests/artifacts/ (the README's docs/board.png, with scores,
is made by tests/board_screenshot.py against ``oddsfeed run --sim-push``).

Needs /usr/bin/chromium (Debian packages chromium + chromium-driver;
.ci/install-browser installs them); skipped with a message otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

import msgspec

from feed.book import Book
from feed.models import ENCODER, HEADER_FIELDS, Market, MarketHeader, Selection, apply_delta
from feed.normalise.base import MarketUpdate
from feed.settings import Settings
from feed.simulator.esa_server import Simulator, SimulatorConfig
from feed.store import Store
from feed.supervisor import run_esa_source
from streaming_helpers import make_app, serve

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
WAIT_S = 30.0


def _chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        path = c if os.path.isabs(c) and os.access(c, os.X_OK) else shutil.which(c)
        if path:
            return path
    return None


def require_chromium() -> str:
    """The Chromium binary, or skip the test saying how to install it."""
    path = _chromium()
    if path is None:
        pytest.skip("needs Chromium (/usr/bin/chromium): apt-get install chromium chromium-driver, "
                    "or run .ci/install-browser as root")
    return path


#: the board's elements, as index.html has them, for app.js loaded into a blank page
_BOARD_DOM = ("<div id=board></div><div id=banner></div><div id=conn></div><span id=conn-text></span>"
              "<div id=meta></div><div id=sport-filter></div><div id=play-filter></div>")


async def load_board(page: Any, event_source: str = "class { addEventListener() {} close() {} }") -> None:
    """Load the board's app.js into a blank page with its elements, a stub
    ``EventSource`` (``event_source``: a JS class expression) and a ``fetch``
    that never answers: the page's logic runs, no request leaves it."""
    await page.until("document.readyState === 'complete'", "a blank page")
    js = (ROOT / "streaming" / "web" / "app.js").read_text()
    await page.js(f"document.body.innerHTML = {json.dumps(_BOARD_DOM)}; window.EventSource = {event_source}; "
                  "window.fetch = () => new Promise(() => {}); 0")
    await page.js(js + "\n0")


class CDP:
    """A minimal Chrome DevTools Protocol client over one browser WebSocket
    (flattened target sessions)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self.pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(RuntimeError(f"CDP error: {msg['error']}"))
                    else:
                        fut.set_result(msg.get("result", {}))
            else:
                self.events.append(msg)
                del self.events[:-500]

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
                   timeout_s: float = 20.0) -> dict[str, Any]:
        mid = next(self.ids)
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[mid] = fut
        await self.ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout_s)  # type: ignore[no-any-return]

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader
        await self.ws.close()


class Page:
    def __init__(self, cdp: CDP, session: str) -> None:
        self.cdp = cdp
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.send(method, params, session=self.session)

    async def js(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True})
        if "exceptionDetails" in r:
            raise AssertionError(f"page JS failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expression: str, what: str, timeout_s: float = WAIT_S) -> Any:
        """Poll a JS expression until truthy (bounded); returns its value."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.js(expression)
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {what} (last value {last!r})")

    async def screenshot(self, *paths: Path) -> None:
        r = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
        data = base64.b64decode(r["data"])
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

    def errors(self) -> list[dict[str, Any]]:
        out = []
        for e in self.cdp.events:
            if e.get("sessionId") != self.session:
                continue
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(e["params"])
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error":
                out.append(e["params"])
        return out


@contextlib.asynccontextmanager
async def browser(url: str) -> AsyncIterator[Page]:
    exe = _chromium()
    assert exe is not None
    with tempfile.TemporaryDirectory(prefix="oddsfeed-chromium-") as profile:
        log = open(Path(profile) / "chromium.log", "wb")
        proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "--window-size=1280,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        cdp: CDP | None = None
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + WAIT_S
            while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (Path(profile) / "chromium.log").read_text(errors="replace")[-2000:]
                    raise AssertionError(f"chromium did not start (exit {proc.poll()}):\n{tail}")
                await asyncio.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            ws = await websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=WAIT_S)
            cdp = CDP(ws)
            target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            page = Page(cdp, session)
            await page.send("Runtime.enable")
            await page.send("Page.enable")
            await page.send("Emulation.setDeviceMetricsOverride",
                            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            await page.send("Page.navigate", {"url": url})
            yield page
        finally:
            if cdp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(cdp.send("Browser.close"), 5)
                await cdp.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # helpers of the browser we started (own session)
            log.close()


def _strip(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in ("age_ms", "stale")}


async def _ingest(store: Store, port: int) -> None:
    await run_esa_source(store, Settings(), host="127.0.0.1", port=port, app_key="sim-app-key",
                         session_token="sim-session", heartbeat_ms=500)


async def test_board_shows_live_prices_stale_markers_and_the_down_banner(redis_url: str) -> None:
    require_chromium()
    store = await Store.open(redis_url)
    sim_config = SimulatorConfig(events=10, rate_per_s=60, seed=11)
    sim = Simulator(sim_config)
    await sim.start()
    ingest = asyncio.create_task(_ingest(store, sim.port))
    try:
        app = make_app(redis_url, settings=Settings(heartbeat_ms=1000))
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http, \
                browser(base + "/") as page:
            # -- the board fills and prices move
            await page.until("window.oddsBoard && oddsBoard.state.stats.snapshots >= 1 "
                             "&& document.querySelectorAll('.market').length > 0", "markets on the board")
            assert await page.js("document.querySelectorAll('.sport').length") >= 2
            assert await page.js("document.getElementById('banner').hidden") is True
            before = await page.js("[...document.querySelectorAll('.price .p')].map(e => e.textContent).join()")
            d0 = await page.js("oddsBoard.state.stats.deltas")
            await page.until(f"oddsBoard.state.stats.deltas > {d0} + 20", "deltas applied in the page")
            await page.until(f"[...document.querySelectorAll('.price .p')].map(e => e.textContent).join() "
                             f"!== {json.dumps(before)}", "a displayed price changed")
            await page.until("document.querySelectorAll('.flash-up, .flash-down').length > 0", "a price flash")
            assert await page.js("document.querySelectorAll('.market .age').length") > 0

            # -- the page's book is the API's book (markets at the same seq are identical)
            compared = 0
            for _ in range(20):
                book = await page.js("JSON.stringify(oddsBoard.book())")
                rest = {m["market_id"]: _strip(m) for m in (await http.get("/v1/markets")).json()["markets"]}
                page_book = json.loads(book)
                assert set(page_book) == set(rest) or len(set(page_book) ^ set(rest)) <= 2
                same_seq = [mid for mid in rest if mid in page_book and page_book[mid]["seq"] == rest[mid]["seq"]]
                for mid in same_seq:
                    assert page_book[mid] == rest[mid], mid
                compared += len(same_seq)
                if compared >= 10:
                    break
                await asyncio.sleep(0.2)
            assert compared >= 10, "too few markets caught at the same seq to compare"

            # -- filters: in-play / upcoming / one sport
            await page.js("document.querySelector('#play-filter [data-play=live]').click()")
            assert await page.js("document.querySelectorAll('.event:not(.in-play)').length") == 0
            await page.js("document.querySelector('#play-filter [data-play=upcoming]').click()")
            assert await page.js("document.querySelectorAll('.event.in-play').length") == 0
            assert "in_play=false" in await page.js("location.search")
            await page.js("document.querySelector('#play-filter [data-play=all]').click()")
            sport = await page.js("document.querySelector('#sport-filter [data-sport]:not([data-sport=all])')"
                                  ".dataset.sport")
            await page.js(f"document.querySelector('#sport-filter [data-sport=\"{sport}\"]').click()")
            assert await page.js("[...document.querySelectorAll('.sport')].map(s => s.dataset.sport)") == [sport]
            await page.js("document.querySelector('#sport-filter [data-sport=all]').click()")
            await page.until("document.querySelectorAll('.sport').length >= 2", "all sports again")

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(ARTIFACTS / "board.png")

            # -- the source stops: DOWN banner, every market stale, ages tick
            await sim.stop()
            await page.until("!document.getElementById('banner').hidden && "
                             "document.getElementById('banner').textContent.includes('DOWN')", "the DOWN banner")
            await page.until("document.querySelectorAll('.market').length > 0 && "
                             "document.querySelectorAll('.market:not(.stale)').length === 0",
                             "every market marked stale")
            assert await page.js("document.querySelectorAll('.badge.stale').length") > 0
            await page.until("[...document.querySelectorAll('.market .age')].some(e => /\\d+ s ago/.test(e.textContent))",
                             "ages ticking ('updated N s ago')")
            await page.screenshot(ARTIFACTS / "board-down.png")

            # -- it returns (same port): banner and stale markers clear
            sim = Simulator(SimulatorConfig(port=sim.port, events=sim_config.events,
                                            rate_per_s=sim_config.rate_per_s, seed=sim_config.seed))
            await sim.start()
            await page.until("document.getElementById('banner').hidden", "the banner to clear")
            await page.until("document.querySelectorAll('.market').length > 0 && "
                             "document.querySelectorAll('.market.stale').length === 0", "stale markers to clear")
            d1 = await page.js("oddsBoard.state.stats.deltas")
            await page.until(f"oddsBoard.state.stats.deltas > {d1}", "prices moving again")

            # -- a suspended market is marked (a header delta fed through the page's own handler; conflated,
            # so its seq may jump ahead of the live ones, which the page then ignores as duplicates)
            mid = await page.js("document.querySelector('.market:not(.suspended)').dataset.marketId")
            market = await page.js(f"oddsBoard.state.markets.get({json.dumps(mid)})")
            header = {k: market[k] for k in HEADER_FIELDS} | {"status": "SUSPENDED"}
            await page.js(f"oddsBoard.handle({json.dumps({'type': 'delta', 'market_id': mid, 'kind': 'delta', 'seq': market['seq'] + 10**6, 'source': market['source'], 'source_ts': 1, 'received_at': 1, 'header': header, 'conflated': True, 'age_ms': 0, 'stale': False})})")
            sel = json.dumps(f'[data-market-id="{mid}"]')
            await page.until(f"document.querySelector({sel}).classList.contains('suspended') && "
                             f"document.querySelector({sel}).querySelector('.badge.suspended') !== null",
                             "the suspended marker")
            assert page.errors() == [], page.errors()

    finally:
        ingest.cancel()
        await asyncio.gather(ingest, return_exceptions=True)
        await sim.stop()
        await store.close()


async def test_page_rebuilds_the_book_exactly_like_apply_delta() -> None:
    """The same message sequence through the page's applyDelta and through
    feed.models.apply_delta gives the same market (image, header, traded
    volume, new selections, selection changes carrying only some fields — an
    unchanged lay absent, an emptied back ``[]`` — and a duplicate)."""
    require_chromium()
    book = Book()
    t = 1_800_000_000_000

    def upd(image: bool, header: MarketHeader | None, sels: list[Selection], tv: float | None = None) -> MarketUpdate:
        return MarketUpdate(market_id="bf:1.5", source="betfair", image=image, header=header, selections=sels,
                            source_ts=t, received_at=t + 2, traded_volume=tv)

    h = MarketHeader(sport="soccer", event_id="bf:9", event_name="A v B", name="Match Odds", status="OPEN",
                     in_play=False, version=1, traded_volume=10.0)
    s1 = Selection(selection_id="1", name="A", price=2.0, back=[(2.0, 5.0), (1.98, 7.0)], lay=[(2.02, 3.0)])
    s2 = Selection(selection_id="2", name="B", price=3.5, back=[(3.5, 1.0)], lay=[])
    updates = [
        upd(True, h, [s1, s2]),
        upd(False, None, [msgspec.structs.replace(s1, back=[(2.02, 1.5)], price=2.02, ltp=2.0, traded_volume=4.5)]),
        upd(False, None, [], tv=55.5),
        upd(False, msgspec.structs.replace(h, status="SUSPENDED", in_play=True, version=2, traded_volume=56.0), []),
        upd(False, None, [Selection(selection_id="3", name="Draw", price=3.3, back=[(3.3, 2.0)], lay=[(3.35, 1.0)])]),
        upd(False, msgspec.structs.replace(h, status="OPEN", in_play=True, version=2, traded_volume=60.0),
            [msgspec.structs.replace(s2, status="SUSPENDED", back=[], price=None)]),
    ]
    deltas = [d for i, u in enumerate(updates) if (d := book.apply(u, stored_at=t + 3 + i)) is not None]
    assert len(deltas) == len(updates)
    wire = [json.loads(ENCODER.encode(d)) | {"type": "delta", "age_ms": 0, "stale": False, "sent_at": t + 9}
            for d in deltas]
    wire.insert(3, wire[1])  # a duplicate (seq ≤ held) changes nothing
    want: Market | None = None
    for d in deltas:
        want = apply_delta(want, d)
    assert want is not None
    async with browser("about:blank") as page:
        await load_board(page, "class { addEventListener() {} }")
        got = await page.js(f"(() => {{ let m; for (const d of {json.dumps(wire)}) "
                            f"m = oddsBoard.applyDelta(m, d); return m; }})()")
    assert got == json.loads(ENCODER.encode(want))


async def test_page_resyncs_on_a_seq_gap_instead_of_applying_the_delta() -> None:
    """A delta only says what changed since ``seq - 1``: one that skips a seq
    (not ``conflated``) is not applied — the page counts the gap and restarts
    its stream for a fresh snapshot; a conflated delta may skip seqs. An
    entry without ``lay`` keeps the lay."""
    require_chromium()
    t = 1_800_000_000_000
    m = Market(market_id="bf:1.5", source="betfair", seq=4, sport="soccer", status="OPEN",
               selections=[Selection(selection_id="1", name="A", price=2.0, back=[(2.0, 5.0)], lay=[(2.02, 3.0)])])
    snap = {"type": "snapshot", "markets": [json.loads(ENCODER.encode(m)) | {"age_ms": 0, "stale": False}],
            "as_of": t}

    def delta(seq: int, price: float, **extra: Any) -> dict[str, Any]:
        return {"type": "delta", "market_id": "bf:1.5", "seq": seq, "kind": "delta", "source": "betfair",
                "source_ts": t, "received_at": t, "stored_at": t, "sent_at": t, "age_ms": 0, "stale": False,
                "selections": [{"selection_id": "1", "price": price, "back": [[price, 1.0]]}], **extra}

    async with browser("about:blank") as page:
        await page.js("window.opened = 0")
        await load_board(page, "class { constructor() { window.opened += 1; } addEventListener() {} close() {} }")
        opened = await page.js("window.opened")
        sel = "oddsBoard.book()['bf:1.5'] && oddsBoard.book()['bf:1.5'].selections[0]"
        await page.js(f"oddsBoard.handle({json.dumps(snap)}); oddsBoard.handle({json.dumps(delta(5, 2.02))}); 0")
        assert await page.js(f"[{sel}.price, {sel}.lay, oddsBoard.state.stats.gaps]") == [2.02, [[2.02, 3.0]], 0]
        await page.js(f"oddsBoard.handle({json.dumps(delta(7, 2.1))}); 0")  # seq 6 is missing
        assert await page.js("[oddsBoard.state.stats.gaps, oddsBoard.state.stats.resyncs, "
                             "Object.keys(oddsBoard.book()).length, window.opened]") == [1, 1, 0, opened + 1]
        await page.js(f"oddsBoard.handle({json.dumps(snap)}); "
                      f"oddsBoard.handle({json.dumps(delta(9, 2.2, conflated=True))}); 0")
        assert await page.js(f"[{sel}.price, {sel}.lay, oddsBoard.book()['bf:1.5'].seq, oddsBoard.state.stats.gaps]"
                             ) == [2.2, [[2.02, 3.0]], 9, 1]


async def test_the_board_judges_a_market_past_its_start_time_by_the_in_play_limit() -> None:
    """A market whose event has started while its provider still says ``in_play: false`` (The Odds
    API until its next poll, Pinnacle until its next answer) read fresh on the board for up to the
    pre-match minute: from its ``start_time`` on the page judges it by the in-play limit (10 s), as
    the server does, and marks it stale at the start with no new message. The page's wall clock is
    moved (``Date.now``) within one evaluation: no timer of the page runs in between."""
    require_chromium()

    def market(mid: str, start_time: int | None, age_ms: int) -> dict[str, Any]:
        m = Market(market_id=mid, source="betfair", seq=1, sport="soccer", status="OPEN", in_play=False,
                   start_time=start_time, selections=[Selection(selection_id="1", name="A", price=2.0,
                                                                back=[(2.0, 5.0)])])
        return json.loads(ENCODER.encode(m)) | {"age_ms": age_ms, "stale": False}

    async with browser("about:blank") as page:
        await load_board(page)
        got = await page.js("""(() => {
          const t = Date.now(), realNow = Date.now;
          const m = (id, start, age) => Object.assign({}, %s, {market_id: id, start_time: start, age_ms: age});
          oddsBoard.state.connected = true;  // (as the stream's open event sets it)
          oddsBoard.handle({type: "snapshot", as_of: t, markets: [
            m("ko", t - 1000, 15000), m("later", t + 600000, 15000), m("soon", t + 1500, 15000),
            m("tbd", null, 15000)]});
          const ids = ["ko", "later", "soon", "tbd"];
          const before = ids.map((id) => oddsBoard.isStale(id));
          const inPlay = oddsBoard.state.markets.get("ko").in_play;
          Date.now = () => realNow() + 2000;  // the start of "soon" has come (2 s on, no message)
          try {
            return {before, inPlay, after: ids.map((id) => oddsBoard.isStale(id))};
          } finally {
            Date.now = realNow;
          }
        })()""" % json.dumps(market("x", None, 0)))
        # started 15 s ago > the in-play 10 s: stale (the pre-match 60 s would say fresh); not started, or
        # no start time known: the pre-match limit; "soon" turns stale at its start
        assert got == {"before": [True, False, False, False], "inPlay": False,
                       "after": [True, False, True, False]}, got
        assert page.errors() == [], page.errors()


async def test_the_board_asks_for_an_api_key_when_the_server_needs_one(redis_url: str, store: Store) -> None:
    require_chromium()
    from streaming_helpers import Feed

    feed = Feed(store)
    await feed.write(feed.image("bf:1.9"))
    key = "board-test-key-0123456789"
    app = make_app(redis_url, settings=Settings(heartbeat_ms=1000, api_keys=(key,)))
    async with serve(app) as base, browser(base + "/") as page:
        await page.until("!!document.getElementById('auth-form') "
                         "&& document.getElementById('banner').dataset.kind === 'auth'", "the API-key prompt")
        text = await page.js("document.getElementById('banner').textContent")
        assert "needs an API key" in text
        await page.js(f"document.getElementById('auth-key').value = {json.dumps(key)}; "
                      "setTimeout(() => document.getElementById('auth-form').requestSubmit(), 50); true")
        deadline = time.monotonic() + WAIT_S
        while True:  # the page navigates (reload with ?api_key=): an evaluation may hit the old document
            with contextlib.suppress(RuntimeError, AssertionError):
                if await page.js("location.search.includes('api_key=') && !!window.oddsBoard "
                                 "&& oddsBoard.state.stats.snapshots >= 1"):
                    break
            assert time.monotonic() < deadline, "the board did not connect with the key"
            await asyncio.sleep(0.1)
        await page.until("!!document.getElementById('banner') && (document.getElementById('banner').hidden "
                         "|| document.getElementById('banner').dataset.kind !== 'auth')", "the prompt gone")


async def test_board_shows_the_score_beside_the_odds_and_drops_a_removed_market(redis_url: str, store: Store,
                                                                                tmp_path: Path) -> None:
    """Event states on the board, end to end (store → node → SSE → page): the score, period and a
    running clock (ticking in the page) beside the event's odds; a goal updates it; an event without
    a state shows none; a status listing it in stale_events marks it stale (the next one not listing it
    clears that), and so does its source DOWN. And a market that leaves the tenant's sight
    (the server's ``removed`` message) leaves the board."""
    require_chromium()
    from feed.models import Clock, EventState, Score, SourceHealth, TeamCounts
    from streaming_helpers import Feed, now_ms

    feed = Feed(store)
    await feed.write(feed.image("bf:1.1", event="bf:e1", in_play=True), feed.image("bf:1.2", event="bf:e2"))

    async def health(state: str) -> None:
        t = now_ms()
        await store.set_health(SourceHealth(source="t", kind="push", state=state,  # type: ignore[arg-type]
                                            last_message_at=t, updated_at=t, lease_ms=600_000,
                                            stale_after_ms=600_000))

    def live(version: int, home: int, red: int = 0) -> EventState:
        t = now_ms()
        return EventState(event_id="bf:e1", source="t", status="LIVE", in_play=True, period="2h",
                          clock=Clock(seconds=3000, running=True, at=t), score=Score(home=home, away=1),
                          red_cards=TeamCounts(home=0, away=red), source_ts=t, received_at=t, version=version)

    await health("UP")
    await store.apply_event_states([live(1, 0)])
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tenant.acme]\nkeys = ["acme-key"]\nsports = ["soccer"]\n')
    app = make_app(redis_url, settings=Settings(heartbeat_ms=1000, tenants_file=str(tenants)))
    score = "document.querySelector('.score[data-event=\"bf:e1\"]')"
    async with serve(app) as base, browser(base + "/?api_key=acme-key") as page:
        await page.until(f"{score} && {score}.textContent.includes('0\u20131') "
                         f"&& {score}.textContent.includes('2nd half')", "the score beside the odds")
        assert await page.js(f"{score}.closest('.event').querySelectorAll('.market').length") == 1
        first = await page.js(f"{score}.querySelector('.clock.running').textContent")
        assert first.startswith("50:")  # 3000 s run on from the reading
        await page.until(f"{score}.querySelector('.clock').textContent !== {json.dumps(first)}",
                         "the match clock ticking in the page")
        assert await page.js("document.querySelector('.score[data-event=\"bf:e2\"]').classList.contains('none')")
        await store.apply_event_states([live(2, 1, red=1)])  # a goal, and a red card
        await page.until(f"{score}.dataset.version === '2' && {score}.textContent.includes('1\u20131') "
                         f"&& {score}.querySelectorAll('.rc').length === 1", "the goal on the board")
        assert await page.js(f"{score}.classList.contains('stale')") is False
        # a status whose stale_events lists the event (its state turned stale with no new state, e.g. its
        # source silent): marked stale; the next status that does not list it clears the marker
        status = {"type": "status", "source": "t", "state": "UP", "reason": None, "stale_markets": [],
                  "turned_stale": [], "turned_fresh": [], "stale_events": ["bf:e1"], "as_of": now_ms()}
        await page.js(f"oddsBoard.handle({json.dumps(status)}); 0")
        await page.until(f"{score}.classList.contains('stale') && {score}.querySelector('.badge.stale') !== null",
                         "the score marked stale by the status")
        await page.js(f"oddsBoard.handle({json.dumps(status | {'stale_events': []})}); 0")
        await page.until(f"!{score}.classList.contains('stale')", "the marker cleared by the next status")
        await health("DOWN")
        await page.until(f"{score}.classList.contains('stale') && {score}.querySelector('.badge.stale') !== null",
                         "the score marked stale while its source is DOWN")
        await page.screenshot(ARTIFACTS / "board-score.png")
        # the market of bf:e2 moves out of acme's sight (soccer only): removed from the board
        await feed.write(feed.header("bf:1.2", sport="tennis"))
        await page.until("oddsBoard.state.stats.removed === 1 "
                         "&& !document.querySelector('[data-market-id=\"bf:1.2\"]')", "the removed market gone")
        assert page.errors() == [], page.errors()


class _SilencingProxy:
    """A TCP relay on 127.0.0.1 in front of the API that can go silent: while frozen it holds
    every connection open and passes nothing on to the browser (a half-open link: no error, no
    close — what a NAT or a dead host looks like to the page)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gated: bool) -> None:
        try:
            while data := await reader.read(65536):
                if gated:
                    await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pipe(c_reader, u_writer, False), self._pipe(u_reader, c_writer, True))

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.flowing.set()
        assert self.server is not None
        self.server.close()


async def test_a_silent_stream_is_noticed_marked_stale_and_reopened(redis_url: str, store: Store) -> None:
    """A half-open connection raises nothing in the page: EventSource waited forever, the page
    said "live" and its prices aged only into the 10 s / 60 s thresholds (client audit,
    architecture §65). Now a stream silent for 3 heartbeats + 1 s is dropped and reopened, and
    meanwhile every price reads stale with the "connection lost" banner."""
    require_chromium()
    from feed.models import SourceHealth
    from streaming_helpers import Feed, now_ms

    feed = Feed(store)
    await feed.write(feed.image("bf:1.1", event="bf:e1"))  # pre-match: fresh for 60 s on its own
    t = now_ms()
    await store.set_health(SourceHealth(source="t", kind="push", state="UP", last_message_at=t, updated_at=t,
                                        lease_ms=600_000))
    app = make_app(redis_url, settings=Settings(heartbeat_ms=1000))
    proxy = _SilencingProxy(0)
    async with serve(app) as base:
        proxy.upstream_port = int(base.rsplit(":", 1)[1])
        async with proxy as port, browser(f"http://127.0.0.1:{port}/") as page:
            await page.until("window.oddsBoard && oddsBoard.state.connected && oddsBoard.state.markets.size === 1 "
                             "&& !oddsBoard.isStale('bf:1.1')", "the board live with a fresh price")
            proxy.flowing.clear()  # the link goes silent
            await page.until("!oddsBoard.state.connected && oddsBoard.state.stats.silences >= 1 "
                             "&& oddsBoard.isStale('bf:1.1') "
                             "&& document.querySelector('[data-market-id=\"bf:1.1\"]').classList.contains('stale')",
                             "the silence noticed and the price marked stale", timeout_s=20)
            assert "Connection to the feed lost" in await page.js("document.body.textContent")
            proxy.flowing.set()
            await page.until("oddsBoard.state.connected && !oddsBoard.isStale('bf:1.1')",
                             "the stream reopened and the price fresh again", timeout_s=20)
            assert page.errors() == [], page.errors()


def _board_market(mid: str, in_play: bool) -> dict[str, Any]:
    m = Market(market_id=mid, source="betfair", seq=1, sport="soccer", status="OPEN", in_play=in_play,
               selections=[Selection(selection_id="1", name="A", price=2.0, back=[(2.0, 5.0)])])
    return json.loads(ENCODER.encode(m)) | {"age_ms": 0, "stale": False}


async def test_a_page_that_falls_behind_the_stream_marks_its_prices_stale() -> None:
    """A page slower than the feed reads what the server sent seconds ago: each heartbeat arrives
    later after its ``as_of``. The page took a heartbeat as confirming every market at its receipt,
    so a book 14 s behind read fresh. Now a confirmation counts as of receipt − the stream's lag
    (receipt − send time, less the least such difference on the connection), and a stream lagging
    more than the in-play limit is not live: every market reads stale, until it catches up."""
    require_chromium()
    async with browser("about:blank") as page:
        await load_board(page)
        got = await page.js("""(() => {
          const b = oddsBoard, ids = ["live", "pre"];
          b.state.connected = true;  // (as the stream's open event sets it)
          const t = Date.now() + 3600000;  // the server's clock: an hour ahead of the page's (cancels out)
          window.p0 = performance.now(); window.t0 = t;
          b.handle({type: "snapshot", as_of: t, markets: [%s, %s]});
          const before = ids.map((id) => b.isStale(id));
          // heartbeats arriving now that the server sent further and further back: the backlog grows
          for (let k = 1; k <= 20; k++) b.handle({type: "heartbeat", as_of: t - k * 700});
          return {before, stale: ids.map((id) => b.isStale(id)), lag: b.state.streamLagMs};
        })()""" % (json.dumps(_board_market("live", True)), json.dumps(_board_market("pre", False))))
        assert got["before"] == [False, False], got
        assert got["stale"] == [True, True], got  # 14 s behind the server: not live, every market stale
        assert 14_000 <= got["lag"] < 14_500, got  # (and the time the loop took)
        await page.until("document.getElementById('banner').dataset.kind === 'lagging'", "the lagging banner")
        # caught up: a heartbeat as early as the fastest delivery
        got = await page.js("""(() => {
          oddsBoard.handle({type: "heartbeat", as_of: window.t0 + Math.ceil(performance.now() - window.p0)});
          return {stale: ["live", "pre"].map((id) => oddsBoard.isStale(id)), lag: oddsBoard.state.streamLagMs};
        })()""")
        assert got["stale"] == [False, False] and got["lag"] < 50, got
        await page.until("document.getElementById('banner').hidden", "the banner gone")
        assert page.errors() == [], page.errors()


async def test_a_delta_the_page_cannot_read_starts_the_stream_over() -> None:
    """A delta the page cannot read (not JSON, or not applicable) was dropped with its resume token
    taken: the change it carried was lost and the market read fresh, confirmed by every heartbeat.
    Now its token is not taken and the page starts over from a fresh snapshot, as on a seq gap."""
    require_chromium()
    stub = ("class { constructor() { window.opened += 1; window.lastES = this; this.l = {}; } "
            "addEventListener(t, f) { this.l[t] = f; } close() {} "
            "emit(t, data, id) { this.l[t]({data, lastEventId: id || ''}); } }")
    snap = {"type": "snapshot", "as_of": now_ms_js(), "markets": [_board_market("m1", True)]}
    async with browser("about:blank") as page:
        await page.js("window.opened = 0")
        await load_board(page, stub)
        for bad in ('{"type":"delta","market_id":"m1",', json.dumps(
                {"type": "delta", "market_id": "m1", "seq": 2, "kind": "delta", "source": "betfair", "source_ts": 1,
                 "received_at": 1, "sent_at": now_ms_js(), "age_ms": 0, "stale": False, "selections": [None]})):
            got = await page.js("""(() => {
              const es = window.lastES, opened = window.opened;
              es.l.open();
              es.emit("snapshot", %s, "t0");
              const fresh = !oddsBoard.isStale("m1");
              es.emit("delta", %s, "t1");
              return {fresh, token: oddsBoard.state.token, restarted: window.opened - opened,
                      held: oddsBoard.state.markets.has("m1"), resyncs: oddsBoard.state.stats.resyncs};
            })()""" % (json.dumps(json.dumps(snap)), json.dumps(bad)))
            assert got["fresh"] and got["token"] != "t1" and got["restarted"] == 1 and not got["held"], got
        assert page.errors() == [], page.errors()


def now_ms_js() -> int:
    return time.time_ns() // 1_000_000


async def test_a_server_clock_stepped_back_reopens_the_stream_after_3_lagging_heartbeats() -> None:
    """The least offset never forgets within a stream: a server whose wall clock steps back 15 s (an
    NTP step) — or runs slower than the page's — read as 15 s behind for as long as the stream
    lasted, every price stale (a healthy stream: an outage). Now 3 heartbeats in a row lagging past
    the in-play limit close the stream; after the reconnect backoff the page opens it again with its
    resume token, reads every price stale until that stream is resumed, and measures the offset
    afresh (the stepped clock is no lag). A heartbeat within the limit starts the count over."""
    require_chromium()
    stub = ("class { constructor(url) { window.opened += 1; window.urls.push(url); window.lastES = this; "
            "this.l = {}; } addEventListener(t, f) { this.l[t] = f; } close() { this.closed = true; } "
            "emit(t, data, id) { this.l[t]({data, lastEventId: id || ''}); } }")
    t = now_ms_js()
    step = -15_000  # the server's clock, stepped back after the snapshot
    snap = {"type": "snapshot", "as_of": t, "markets": [_board_market("live", True), _board_market("pre", False)]}
    beats = [{"type": "heartbeat", "as_of": t + k + (0 if k == 3 else step)} for k in range(1, 7)]  # the 3rd in time
    async with browser("about:blank") as page:
        await page.js("window.opened = 0; window.urls = []")
        await load_board(page, stub)
        got = await page.js("""(() => {
          const es = window.lastES, b = oddsBoard, ids = ["live", "pre"];
          es.l.open();
          es.emit("snapshot", %s, "t0");
          const before = ids.map((id) => b.isStale(id));
          const counts = [];
          for (const hb of %s) { es.emit("heartbeat", JSON.stringify(hb)); counts.push(b.state.stats.lagReconnects); }
          return {before, counts, closed: !!es.closed, connected: b.state.connected, opened: window.opened,
                  stale: ids.map((id) => b.isStale(id))};
        })()""" % (json.dumps(json.dumps(snap)), json.dumps(beats)))
        assert got["before"] == [False, False], got
        assert got["closed"] and not got["connected"] and got["stale"] == [True, True], got
        assert got["counts"] == [0, 0, 0, 0, 0, 1], got  # two, one in time (starts over), then three in a row
        opened = got["opened"]
        await page.until("document.getElementById('banner').dataset.kind === 'lagging'", "the lagging banner")
        # reopened after the backoff (250–500 ms) and a random spread (under 2 s), resuming with the token
        # (a wait, not a speed target: the page's timers may run late on a loaded machine)
        await page.until(f"window.opened === {opened + 1}", "the stream reopened", timeout_s=15)
        assert "last_event_id=t0" in await page.js("window.urls[window.urls.length - 1]")
        got = await page.js("""(() => {
          const es = window.lastES, b = oddsBoard, ids = ["live", "pre"];
          es.l.open();  // open, not yet resumed: nothing vouched for (never fresher than before)
          es.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now() + %d}));
          const opened = ids.map((id) => b.isStale(id));
          es.emit("resumed", JSON.stringify({type: "resumed", recovered: true}), "t1");
          es.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now() + %d}));
          return {opened, resumed: ids.map((id) => b.isStale(id)), lag: b.state.streamLagMs,
                  lagReconnects: b.state.stats.lagReconnects, connected: b.state.connected};
        })()""" % (step, step))
        assert got["opened"] == [True, True], got
        assert got["resumed"] == [False, False] and got["lag"] < 1_000 and got["lagReconnects"] == 1, got
        await page.until("document.getElementById('banner').hidden", "the banner gone")
        assert page.errors() == [], page.errors()


_RECORDING_STUB = ("class { constructor(url) { window.opened += 1; window.urls.push(url); window.lastES = this; "
                   "this.l = {}; } addEventListener(t, f) { this.l[t] = f; } close() { this.closed = true; } "
                   "emit(t, data, id) { this.l[t]({data, lastEventId: id || ''}); } }")


@pytest.mark.parametrize("stamped", [True, False], ids=["as_of", "older_server"])
async def test_a_resumed_streams_as_of_sets_the_baseline_and_a_replay_counts_its_age(stamped: bool) -> None:
    """A page that resumes (its EventSource reopened, or the page reopened it for lagging) gets the
    deltas it missed replayed with the ``sent_at`` each was first sent with. The oldest was the new
    stream's first timed message: the lag it had became the baseline and read as 0, and replayed
    prices older than the in-play limit read fresh. ``resumed``'s ``as_of`` now sets the baseline:
    a replay 12 s old (the limit: 10 s) lags 12 s, its prices stale, their ages counting it. From an
    older server (``resumed`` without ``as_of``) the page reads every price stale until the next
    heartbeat."""
    require_chromium()
    snap = {"type": "snapshot", "as_of": now_ms_js(),
            "markets": [_board_market("live", True), _board_market("pre", False)]}
    async with browser("about:blank") as page:
        await page.js("window.opened = 0; window.urls = []")
        await load_board(page, _RECORDING_STUB)
        got = await page.js("""(() => {
          const es = window.lastES, b = oddsBoard, ids = ["live", "pre"], stamped = %s;
          es.l.open();
          es.emit("snapshot", %s, "t0");
          es.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now()}));
          const before = ids.map((id) => b.isStale(id));
          es.l.open();  // the EventSource reopened (Last-Event-ID: t0): the offset measured afresh
          const t = Date.now();
          es.emit("resumed", JSON.stringify(stamped ? {type: "resumed", recovered: true, as_of: t}
                                                    : {type: "resumed", recovered: true}), "t1");
          const d = (id, p, sent) => JSON.stringify({type: "delta", market_id: id, seq: 2, kind: "delta",
            source: "betfair", source_ts: sent, received_at: sent, sent_at: sent, age_ms: 0, stale: false,
            selections: [{selection_id: "1", price: p, back: [[p, 5.0]]}]});
          es.emit("delta", d("live", 2.2, t - 12000), "t2");
          es.emit("delta", d("pre", 3.2, t - 11900), "t3");
          const replayed = {stale: ids.map((id) => b.isStale(id)), ages: ids.map((id) => b.ageMs(id)),
                            lag: b.state.streamLagMs, price: b.state.markets.get("pre").selections[0].price};
          es.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now()}));
          return {before, replayed, caught: ids.map((id) => b.isStale(id)), lag: b.state.streamLagMs};
        })()""" % ("true" if stamped else "false", json.dumps(json.dumps(snap))))
        assert got["before"] == [False, False], got
        assert got["replayed"]["price"] == 3.2 and got["replayed"]["stale"] == [True, True], (stamped, got)
        if stamped:
            assert got["replayed"]["lag"] >= 11_900 and got["replayed"]["ages"][0] >= 12_000 \
                and got["replayed"]["ages"][1] >= 11_900, got
        assert got["caught"] == [False, False] and got["lag"] < 1_000, (stamped, got)
        assert page.errors() == [], page.errors()


async def test_an_event_state_leaves_with_the_last_market_that_refers_to_it() -> None:
    """An event's state stayed in the page, reading fresh, after its last market was removed: the
    server sends that event's state only to a stream holding one of its markets and leaves it out of
    ``stale_events``. A removed market now takes with it the states of its event and its race that
    no market left refers to (and their flags)."""
    require_chromium()
    t1 = 1_900_000_000_000 - (1_900_000_000_000 % 3_600_000)  # 17:00 UTC: race ids .1700 / .1730

    def m(mid: str, event: str, **extra: Any) -> dict[str, Any]:
        return _board_market(mid, True) | {"event_id": event, **extra}

    markets = [m("a1", "e1"), m("a2", "e1"), m("r1", "bf:100", sport="horse_racing", start_time=t1),
               m("r2", "bf:100", sport="horse_racing", start_time=t1 + 1_800_000)]
    states = [{"type": "event_state", "sent_at": now_ms_js(), "event_state": {
        "event_id": e, "source": "betfair", "status": "LIVE", "in_play": True, "version": 1, "age_ms": 0,
        "stale": False}} for e in ("e1", "bf:100", "bf:100.1700", "bf:100.1730")]
    async with browser("about:blank") as page:
        await load_board(page)
        got = await page.js("""(() => {
          const b = oddsBoard, s = b.state, out = [];
          s.connected = true;
          b.handle({type: "snapshot", as_of: Date.now(), markets: %s});
          for (const st of %s) b.handle(st);
          b.handle({type: "status", source: "betfair", state: "UP", stale_markets: [], stale_events: [], as_of: Date.now()});
          const held = () => [...s.eventStates.keys()].sort().join(",") + "|" + [...s.esFlagged.keys()].sort().join(",");
          for (const id of ["a1", "a2", "r1"]) { b.handle({type: "removed", market_id: id, reason: "not_visible"}); out.push(held()); }
          return out;
        })()""" % (json.dumps(markets), json.dumps(states)))
        assert got == [
            "bf:100,bf:100.1700,bf:100.1730,e1|bf:100,bf:100.1700,bf:100.1730,e1",  # a2 still shows e1's state
            "bf:100,bf:100.1700,bf:100.1730|bf:100,bf:100.1700,bf:100.1730",        # e1's last market: gone
            "bf:100,bf:100.1730|bf:100,bf:100.1730",                                # r1's race; the meeting stays
        ], got
        # a market that stays but moves to another event or race (a delta's header, an image) left the
        # state it was shown with, no market referring to it, reading fresh for good: it goes too
        moving = [m("a1", "e1"), m("b1", "e2"), m("r1", "bf:100", sport="horse_racing", start_time=t1),
                  m("r3", "bf:100", sport="horse_racing", start_time=t1 + 1_800_000)]
        states += [states[0] | {"event_state": states[0]["event_state"] | {"event_id": "e2"}}]
        got = await page.js("""(() => {
          const b = oddsBoard, s = b.state, out = [], markets = %s;
          b.handle({type: "snapshot", as_of: Date.now(), markets});
          for (const st of %s) b.handle(st);
          const held = () => [...s.eventStates.keys()].sort().join(",") + "|" + [...s.esFlagged.keys()].sort().join(",");
          const image = (mk, seq) => ({type: "delta", market_id: mk.market_id, seq, kind: "image", source: "betfair",
            source_ts: Date.now(), received_at: Date.now(), sent_at: Date.now(), age_ms: 0, stale: false,
            market: Object.assign({}, mk, {seq})});
          out.push(held());
          b.handle({type: "delta", market_id: "a1", seq: 2, kind: "delta", source: "betfair", source_ts: Date.now(),
                    received_at: Date.now(), sent_at: Date.now(), age_ms: 0, stale: false,
                    header: Object.assign({}, markets[0], {event_id: "e2"})});  // to b1's event
          out.push(held());
          b.handle(image(Object.assign({}, markets[2], {start_time: %d + 3600000}), 2));  // r1 to 18:00
          out.push(held());
          b.handle(image(Object.assign({}, markets[3], {start_time: %d + 1830000}), 2));  // r3 to 17:30:30: same race
          out.push(held());
          b.handle(image(Object.assign({}, markets[3], {start_time: %d + 1860000}), 3));  // r3 to 17:31
          out.push(held());
          return out;
        })()""" % (json.dumps(moving), json.dumps(states), t1, t1, t1))
        assert got == [
            "bf:100,bf:100.1700,bf:100.1730,e1,e2|bf:100,bf:100.1700,bf:100.1730,e1,e2",
            "bf:100,bf:100.1700,bf:100.1730,e2|bf:100,bf:100.1700,bf:100.1730,e2",  # a1 left e1: its last market
            "bf:100,bf:100.1730,e2|bf:100,bf:100.1730,e2",                          # r1 left its race; the meeting stays
            "bf:100,bf:100.1730,e2|bf:100,bf:100.1730,e2",                          # the same race: nothing goes
            "bf:100,e2|bf:100,e2",                                                  # r3, the race's last market, left it
        ], got
        assert page.errors() == [], page.errors()


async def test_the_board_jitters_its_reopens_and_spreads_a_lag_reopen() -> None:
    """The board reopened its stream after exactly retryMs (500 ms, doubling) — after a server clock
    step every page of the node saw its third lagging heartbeat on the same tick and came back
    together. Now a reopen after an error waits retryMs jittered (half of it plus a random part of
    the other half), and a lag reopen a random spread of up to 2 s on top."""
    require_chromium()
    t = now_ms_js()
    snap = {"type": "snapshot", "as_of": t, "markets": [_board_market("live", True)]}
    beats = [{"type": "heartbeat", "as_of": t + k - 15_000} for k in range(1, 4)]
    async with browser("about:blank") as page:
        await page.js("window.opened = 0; window.urls = []; window.delays = []; window.rand = 0;"
                      "Math.random = () => window.rand; const st = window.setTimeout;"
                      "window.setTimeout = (f, ms, ...a) => { if (String(f).includes('connect()')) "
                      "window.delays.push(ms); return st(f, ms, ...a); }; 0")
        await load_board(page, _RECORDING_STUB)
        lag = """((r) => {
          window.rand = r;
          const es = window.lastES;
          es.l.open();
          es.emit("snapshot", %s, "t0");
          for (const hb of %s) es.emit("heartbeat", JSON.stringify(hb));
          return oddsBoard.state.stats.lagReconnects;
        })""" % (json.dumps(json.dumps(snap)), json.dumps(beats))
        assert await page.js(f"{lag}(0)") == 1
        await page.until("window.opened === 2", "the first lag reopen", timeout_s=15)  # (a wait: 250 ms here)
        assert await page.js(f"{lag}(0.5)") == 2
        await page.until("window.opened === 3", "the second lag reopen", timeout_s=15)  # (1750 ms here)
        # an error the browser gives up on (a 503; the stub reads as CLOSED): the page reopens by itself
        await page.js("window.rand = 0.5; window.lastES.l.error({}); 0")
        delays = await page.js("window.delays")
        # retryMs 500: 250 + 0; then 1000 (doubled): 500 + 250 + 0.5 × 2000; then 2000: 1000 + 500
        assert delays == [250, 1750, 1500], delays
        assert page.errors() == [], page.errors()


async def test_a_reopened_stream_is_not_live_until_the_server_resumes_it() -> None:
    """When the page's EventSource reopened (by itself after a drop, or by the page), the page said
    "live" and vouched for its prices from the ``open`` event on — yet until the server's
    ``resumed`` (or a snapshot) the book is the one from before the gap, and what was missed is
    still to come. Now, with the server's answer held back, the page is not live (the "connecting"
    marker, the "connection lost" banner, every price stale, heartbeats confirming nothing) until
    ``resumed {recovered: true}`` — or, after ``recovered: false``, the snapshot."""
    require_chromium()
    snap = {"type": "snapshot", "as_of": now_ms_js(), "markets": [_board_market("live", True), _board_market("pre", False)]}
    probe = """(() => {
      const conn = document.getElementById("conn"), banner = document.getElementById("banner");
      return {stale: ["live", "pre"].map((id) => oddsBoard.isStale(id)), dot: conn.dataset.state,
              text: document.getElementById("conn-text").textContent, banner: banner.hidden ? "" : banner.dataset.kind};
    })()"""
    async with browser("about:blank") as page:
        await page.js("window.opened = 0; window.urls = []")
        await load_board(page, _RECORDING_STUB)
        await page.js("""(() => {
          const es = window.lastES;
          es.l.open();
          es.emit("snapshot", %s, "t0");
          es.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now()}));
          return 0;
        })()""" % json.dumps(json.dumps(snap)))
        got = await page.js(probe)
        assert got == {"stale": [False, False], "dot": "live", "text": "live", "banner": ""}, got
        for recovered in (True, False):
            # the connection drops and the EventSource reopens by itself (Last-Event-ID): the server's
            # answer is held back
            await page.js("""(() => {
              const es = window.lastES;
              es.readyState = 0;  // CONNECTING: the browser retries by itself
              es.l.error({});
              es.l.open();
              return 0;
            })()""")
            held = await page.js(probe)
            assert held["stale"] == [True, True] and held["dot"] == "connecting" and held["text"] != "live" \
                and held["banner"] == "offline", (recovered, held)
            # still not live after the page's ticks (ages, markers) and a heartbeat: nothing vouched for
            await page.until("(() => { const cards = [...document.querySelectorAll('.market[data-market-id]')]; "
                             "return cards.length === 2 && cards.every((el) => el.classList.contains('stale')); })()",
                             "the prices marked stale while the reopened stream is not yet resumed", timeout_s=5)
            await page.until('oddsBoard.ageMs("pre") >= 20', "the price aged 20 ms (a heartbeat would reset it)",
                             timeout_s=5)
            ages = await page.js("""(() => {
              const before = oddsBoard.ageMs("pre");
              window.lastES.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now()}));
              return [before, oddsBoard.ageMs("pre")];
            })()""")
            assert ages[1] >= ages[0] >= 20, ages  # the heartbeat confirmed nothing (the age goes on)
            assert await page.js(probe) == held, (recovered, await page.js(probe))
            if recovered:
                await page.js("""(() => {
                  window.lastES.emit("resumed", JSON.stringify({type: "resumed", recovered: true, as_of: Date.now()}), "t1");
                  return 0;
                })()""")
            else:
                got = await page.js("""(() => {
                  window.lastES.emit("resumed", JSON.stringify({type: "resumed", recovered: false, as_of: Date.now()}), "t2");
                  return %s;
                })()""" % probe)
                assert got == held, got  # the snapshot that follows replaces the book: not live before it
                await page.js("""(() => {
                  window.lastES.emit("snapshot", JSON.stringify(Object.assign(%s, {as_of: Date.now()})), "t3");
                  return 0;
                })()""" % json.dumps(snap))
            got = await page.js(probe)
            assert got == {"stale": [False, False], "dot": "live", "text": "live", "banner": ""}, (recovered, got)
        # a conflated stream's heartbeat lists the markets its window holds: it does not confirm them
        ages = await page.js("""(async () => {
          window.lastES.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now()}));
          await new Promise((r) => setTimeout(r, 60));
          window.lastES.emit("heartbeat", JSON.stringify({type: "heartbeat", as_of: Date.now(), held: ["pre"]}));
          return [oddsBoard.ageMs("live"), oddsBoard.ageMs("pre")];
        })()""")
        assert ages[1] >= 50 and ages[0] < ages[1], ages
        assert await page.js("window.opened") == 1  # the same EventSource, reopened by itself
        assert page.errors() == [], page.errors()
