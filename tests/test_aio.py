"""``feed.aio``: waits that never drop a cancel — and no ``asyncio.wait_for`` where a dropped
cancel would keep a loop running (Python 3.11: it returns the result, or raises TimeoutError,
when the cancel lands in the same loop turn as the awaited thing finishing — CPython gh-86296 —
and a loop that carries on then never stops: a source's or simulator's teardown waits forever)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from feed.aio import wait_event

ROOT = Path(__file__).resolve().parents[1]

#: the one-shot waits left on ``asyncio.wait_for`` (each ends its task or connection whatever it
#: returns): path -> how many
ALLOWED = {
    "feed/metrics.py": 3,  # stop: wait_closed; one scrape connection's head read and drain
    "feed/simulator/esa_line.py": 1,  # stop: wait_closed
    "feed/simulator/esa_server.py": 1,  # stop: wait_closed
    "feed/simulator/control.py": 1,  # stop: wait_closed
    "feed/simulator/uof.py": 1,  # start: the first broker connection
    "streaming/ws.py": 2,  # one connection's last words: the writer's final flush, the close
}


async def test_a_cancel_with_a_wake_in_the_same_loop_turn_stops_a_wait_event_loop() -> None:
    wake = asyncio.Event()
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            turns += 1
            await wait_event(wake, 60)
            wake.clear()

    task = asyncio.create_task(loop())
    for _ in range(3):
        await asyncio.sleep(0)
    wake.set()
    task.cancel()  # (same turn as the wake)
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done and task.cancelled(), f"the loop went on after its cancel ({turns} turns)"


def test_no_wait_for_where_a_dropped_cancel_could_keep_a_loop_running() -> None:
    found: dict[str, int] = {}
    for path in sorted([*ROOT.glob("feed/**/*.py"), *ROOT.glob("streaming/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "feed/aio.py":
            continue
        text = path.read_text()
        n = len(re.findall(r"\basyncio\.wait_for\(", text)) + len(re.findall(r"from asyncio import[^\n]*\bwait_for\b", text))
        if n:
            found[rel] = n
    assert found == ALLOWED, ("use feed.aio.wait_event or `async with asyncio.timeout(...)` instead of "
                              f"asyncio.wait_for (or list a one-shot use in ALLOWED): {found}")
