// A market whose event has started while its provider still says `in_play: false` (The Odds API
// until its next poll, Pinnacle until its next answer, a push provider until its scores message) is
// judged by the in-play threshold from its `start_time` on, as the server judges it. Injected
// clocks: `now` (monotonic, ages) and `wallNow` (ms since the epoch, compared with start_time).
import assert from "node:assert/strict";
import { test } from "node:test";
import { OddsClient, type MarketWithAge } from "../src/index.js";

const T = 1_800_000_000_000; // the wall clock at the snapshot, ms since the epoch

function mk(id: string, start_time: number | null, age_ms: number, in_play = false): MarketWithAge {
  return { market_id: id, source: "s1", seq: 1, sport: "soccer", in_play, start_time, age_ms, stale: false,
    selections: [] } as MarketWithAge;
}

test("a market past its start_time reads stale by the in-play threshold, though in_play is false", () => {
  let now = 1_000;
  let wall = T;
  const c = new OddsClient("http://127.0.0.1:9", {
    now: () => now, wallNow: () => wall, staleInPlayMs: 5_000, stalePreMatchMs: 60_000,
  });
  c.handleMessage({ type: "snapshot", as_of: T, markets: [
    mk("ko", T - 1_000, 7_000), mk("later", T + 60_000, 7_000), mk("soon", T + 1_500, 7_000),
    mk("tbd", null, 7_000), mk("live", null, 4_000, true),
  ] }, "t0");
  assert.equal(c.markets.get("ko")?.in_play, false, "in_play stays the provider's");
  assert.equal(c.isStale("ko"), true, "started: 7 s > the in-play 5 s (the pre-match 60 s would say fresh)");
  assert.equal(c.isStale("later"), false, "not started: the pre-match threshold");
  assert.equal(c.isStale("tbd"), false, "start unknown: its in_play flag alone");
  assert.equal(c.isStale("soon"), false, "before its start: the pre-match threshold");
  assert.equal(c.isStale("live"), false);
  // 1.5 s later, no message: "soon" has started and is 8.5 s old
  now += 1_500;
  wall += 1_500;
  assert.equal(c.isStale("soon"), true, "stale at its start time with no new message");
  assert.equal(c.isStale("later"), false);
  assert.equal(c.isStale("tbd"), false);
  assert.equal(c.isStale("live"), true, "in play: 5.5 s > 5 s");
  // a heartbeat confirms it again: fresh while its (in-play) age stays under 5 s
  c.handleMessage({ type: "heartbeat", as_of: wall });
  assert.equal(c.isStale("soon"), false);
  now += 5_001;
  wall += 5_001;
  assert.equal(c.isStale("soon"), true, "5.001 s unconfirmed after its start");
  assert.equal(c.isStale("tbd"), false, "pre-match: 5 s is nothing");
});

test("the wall clock defaults to Date.now()", () => {
  const c = new OddsClient("http://127.0.0.1:9", { staleInPlayMs: 5_000, stalePreMatchMs: 60_000 });
  const t = Date.now();
  c.handleMessage({ type: "snapshot", as_of: t, markets: [mk("ko", t - 1_000, 7_000), mk("later", t + 600_000, 7_000)] },
    "t0");
  assert.equal(c.isStale("ko"), true);
  assert.equal(c.isStale("later"), false);
});
