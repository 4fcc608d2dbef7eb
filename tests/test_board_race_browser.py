"""Race progress on the board in a real headless Chromium (the CDP client and browser
fixture of test_board_browser.py), end to end: markets and a race's event state written
through the real store → API node → SSE → page.

A Betfair horse race's state is keyed by the race (``bf:<meeting>.<HHMM of the scheduled
start, UTC>``, feed.taxonomy.race_event_id), not the meeting its markets carry. Checks: every
market of the race shows the race line (status, running time ticking in the page, the leader's
last gate and metres to go) and each runner's position by the running order; another race of
the same meeting and a soccer market show none; the finish updates it (ENDED, Finish, the
finishing order); the race state's source DOWN marks line and positions stale; the page's race
id rule agrees with the Python one.
"""

from __future__ import annotations

import json

import msgspec
from streaming_helpers import Feed, make_app, now_ms, serve
from test_board_browser import ARTIFACTS, browser, require_chromium

from feed.models import Clock, EventState, RaceProgress, RaceRunner, SourceHealth
from feed.settings import Settings
from feed.store import Store
from feed.taxonomy import race_event_id

MEETING = "bf:28587288"
RUNNERS = {"7390417": 3.0, "7390418": 2.5, "7390419": 6.0}


def _market(mid: str) -> str:
    return f"document.querySelector('[data-market-id=\"{mid}\"]')"


def _pos(mid: str, sel: str) -> str:
    """The position shown for runner ``sel`` of market ``mid`` ('' when none)."""
    return (f"(() => {{ const c = {_market(mid)} && {_market(mid)}.querySelector('.price.back[data-sel=\"{sel}\"]');"
            f" const p = c && c.closest('tr').querySelector('.pos'); return p ? p.textContent : ''; }})()")


async def test_board_shows_a_race_beside_its_markets_odds(redis_url: str, store: Store) -> None:
    require_chromium()
    t0 = now_ms()
    start = (t0 // 60_000 - 2) * 60_000  # the race went off two minutes ago
    race = race_event_id(MEETING, "horse_racing", start)
    assert race is not None
    feed = Feed(store)
    await feed.write(
        feed.image("bf:1.5", sport="horse_racing", event=MEETING, in_play=True, prices=RUNNERS, start_time=start,
                   name="WIN"),
        feed.image("bf:1.6", sport="horse_racing", event=MEETING, in_play=True, prices=RUNNERS, start_time=start,
                   name="PLACE"),
        # the meeting's next race: no progress yet
        feed.image("bf:1.7", sport="horse_racing", event=MEETING, prices=RUNNERS, start_time=start + 30 * 60_000,
                   name="WIN"),
        feed.image("bf:1.9", event="bf:e9", in_play=True),
    )

    async def health(state: str) -> None:
        t = now_ms()
        await store.set_health(SourceHealth(source="race", kind="esa", state=state,  # type: ignore[arg-type]
                                            last_message_at=t, updated_at=t, lease_ms=600_000,
                                            stale_after_ms=600_000))

    def progress(version: int, *, ended: bool) -> EventState:
        t = now_ms()
        order = ["7390417", "7390418", "7390419"] if ended else ["7390418", "7390417", "7390419"]
        rp = RaceProgress(
            race_id=race.removeprefix("bf:"), market_id="bf:1.5", gate="Finish" if ended else "4f",
            distance_m=0.0 if ended else 805.2, leader_speed_mps=16.9, sectional_s=12.4, order=order,
            runners=[RaceRunner(selection_id=s, distance_m=0.0 if ended else 805.2 + 3 * i, speed_mps=16.5, at=t)
                     for i, s in enumerate(order)])
        return EventState(event_id=race, source="race", status="ENDED" if ended else "LIVE", in_play=not ended,
                          clock=Clock(seconds=71, running=False, at=t) if ended
                          else Clock(seconds=41, running=True, at=t),
                          race=rp, source_ts=t, received_at=t, version=version)

    await health("UP")
    running = progress(1, ended=False)
    await store.apply_event_states([running])
    app = make_app(redis_url, settings=Settings(heartbeat_ms=1000))
    line = f"{_market('bf:1.5')}.querySelector('.race-line')"
    async with serve(app) as base, browser(base + "/") as page:
        # the page's race id rule is feed.taxonomy.race_event_id
        cases = [[MEETING, "horse_racing", start], ["bf:1", "greyhound_racing", 1711843500000],
                 ["bf:1", "horse_racing", 1714607999000], ["bf:1", "soccer", start], ["pn:1", "horse_racing", start]]
        await page.until("!!window.oddsBoard", "the board")
        got = await page.js(f"{json.dumps(cases)}.map((c) => oddsBoard.raceEventId(...c))")
        assert got == [race_event_id(*c) for c in cases]  # type: ignore[arg-type]

        # in running: status, running time, the leader's gate and distance to go; positions by the order
        await page.until(f"{_market('bf:1.5')} && {line} && {line}.textContent.includes('LIVE') "
                         f"&& {line}.textContent.includes('4f \u00b7 805 m to go')", "the race line")
        assert await page.js(f"{line}.dataset.race") == race
        assert await page.js(_pos("bf:1.5", "7390418")) == "1st"
        assert await page.js(_pos("bf:1.5", "7390417")) == "2nd"
        assert await page.js(_pos("bf:1.5", "7390419")) == "3rd"
        assert await page.js(f"{_market('bf:1.6')}.querySelector('.race-line').textContent.includes('805 m to go')")
        assert await page.js(_pos("bf:1.6", "7390418")) == "1st"
        clock = await page.js(f"{line}.querySelector('.clock.running').textContent")
        # 41 s run on from the reading: no more than the time since it (the browser's start is not
        # counted on: on a loaded machine it may take longer than the 9 s "00:4x" lasts)
        minutes, seconds = map(int, clock.split(":"))
        assert 41 <= 60 * minutes + seconds <= 41 + (now_ms() - running.clock.at) / 1000 + 1, clock
        await page.until(f"{line}.querySelector('.clock').textContent !== {json.dumps(clock)}",
                         "the running time ticking in the page")
        assert await page.js(f"{line}.classList.contains('stale')") is False
        # another race of the meeting, a soccer market: no race line, no positions
        assert await page.js(f"{_market('bf:1.7')}.querySelector('.race-line').classList.contains('none')")
        assert await page.js(_pos("bf:1.7", "7390418")) == ""
        assert await page.js(f"{_market('bf:1.9')}.querySelector('.race-line')") is None
        assert await page.js(f"{_market('bf:1.9')}.querySelectorAll('.pos').length") == 0
        await page.screenshot(ARTIFACTS / "board-race.png")

        # the finish: ENDED, the final time, the finishing order
        await store.apply_event_states([progress(2, ended=True)])
        await page.until(f"{line}.textContent.includes('ENDED') && {line}.textContent.includes('Finish') "
                         f"&& {line}.textContent.includes('01:11')", "the race ended")
        assert "m to go" not in await page.js(f"{line}.textContent")
        await page.until(f"{_pos('bf:1.5', '7390417')} === '1st' && {_pos('bf:1.5', '7390418')} === '2nd'",
                         "the finishing order")

        # its source DOWN: the race line and the positions marked stale
        await health("DOWN")
        await page.until(f"{line}.classList.contains('stale') && {line}.querySelector('.badge.stale') !== null "
                         f"&& {_market('bf:1.5')}.querySelectorAll('.pos.stale').length === 3",
                         "the race marked stale while its source is DOWN")

        # the race's event page (a race id names the race's canonical event): its header reads the race
        await health("UP")
        await page.js(f"location.hash = '#/event/' + encodeURIComponent({json.dumps(race)})")
        head = "document.querySelector('.ev-head .score')"
        await page.until(f"{head} && {head}.textContent.includes('ENDED') && {head}.textContent.includes('Finish') "
                         f"&& {head}.textContent.includes('01:11')", "the race on its event page")
        assert await page.js(f"{head}.dataset.member") == race
        await store.apply_event_states([msgspec.structs.replace(progress(3, ended=False), race=msgspec.structs.replace(
            progress(3, ended=False).race, gate="2f", distance_m=402.0))])
        await page.until(f"{head}.textContent.includes('2f \u00b7 402 m to go')", "the event page following the race")
        assert page.errors() == [], page.errors()
