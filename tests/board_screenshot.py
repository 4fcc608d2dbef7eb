"""The README's board screenshot (docs/board.png): a real ``python3 -m feed run --sim-push`` (the
Betfair-protocol simulator, plus the same matches in the push format, whose soccer and basketball in
play carry scores and a match clock) on a free loopback port, its board opened in headless Chromium
(the DevTools client of tests/test_board_browser.py), a screenshot once scores, running clocks and
price sparklines show.

    python3 tests/board_screenshot.py --out docs/board.png [--warmup-s 300] [--time-scale 12] [--sport soccer]

``--warmup-s``: how long the feed runs before the board opens (the sparklines show the last hour of
each selection's best back, one point a minute: a longer run draws more of it); ``--time-scale``:
the simulator's lifecycle speed-up (``--sim-time-scale``; 60 plays a soccer match in under two
minutes, too short for a sparkline to show a shape).

Every wait is bounded; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_board_browser import _chromium, browser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _shoot(base: str, out: Path, sport: str | None, width: int, height: int, settle_s: float) -> None:
    url = base + "/" + (f"?sport={sport}" if sport else "")
    async with browser(url) as page:
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        await page.until("window.oddsBoard && document.querySelectorAll('.market').length > 0", "markets on the board", 60)
        await page.until("document.querySelectorAll('.score:not(.none) .goals').length >= 2", "scores on the board", 90)
        await page.until("document.querySelectorAll('.score .clock.running').length >= 1", "a running clock", 90)
        await page.until("document.querySelectorAll('svg.spark').length >= 6", "price sparklines", 90)
        await asyncio.sleep(settle_s)  # let a few prices move (flashes) before the picture
        await page.until("document.querySelectorAll('.score:not(.none) .goals').length >= 2", "scores still shown", 30)
        await page.screenshot(out)
        shown = await page.js("JSON.stringify([...document.querySelectorAll('.score:not(.none)')]"
                              ".slice(0, 6).map(e => e.textContent))")
        print(f"wrote {out} ({out.stat().st_size:,} bytes); scores shown: {json.loads(shown)}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "board.png")
    p.add_argument("--sport", help="the board's sport filter (default: every sport)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument("--warmup-s", type=float, default=0.0)
    p.add_argument("--time-scale", type=float, default=60.0)
    args = p.parse_args()
    if _chromium() is None:
        print("needs Chromium (/usr/bin/chromium)", file=sys.stderr)
        return 2
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="oddsfeed-shot-") as tmp:
        cmd = [sys.executable, "-m", "feed", "run", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(Path(tmp) / "var"), "--metrics-port", "0", "--sim-push",
               "--sim-rate", "60", "--sim-seed", str(args.seed), "--sim-time-scale", str(args.time_scale)]
        print("server:", " ".join(cmd[1:]), flush=True)
        log = open(Path(tmp) / "run.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/v1/markets", timeout=2).json()["markets"]:
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    log.flush()
                    print((Path(tmp) / "run.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)
            time.sleep(args.warmup_s)  # price history accrues (the sparklines)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            asyncio.run(_shoot(base, args.out, args.sport, args.width, args.height, args.settle_s))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
