// Race progress (Betfair horse/greyhound races): the race id rule of feed.taxonomy.race_event_id
// and OddsClient.stateOfMarket (the race's state when there is one, else the event's), fed with
// messages through the apply API — pure, no server (`oddsfeed run` serves no race progress).
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  OddsClient, raceEventId, type EventStateWithAge, type MarketWithAge, type ServerMessage,
} from "../src/index.js";

test("raceEventId: the meeting's event id and the HHMM of the scheduled start in UTC", () => {
  // the values feed.taxonomy.race_event_id gives for the same inputs
  assert.equal(raceEventId("bf:28587288", "horse_racing", 1714582200000), "bf:28587288.1650"); // 2024-05-01T16:50Z
  assert.equal(raceEventId("bf:28587288", "horse_racing", 1714607999000), "bf:28587288.2359"); // 23:59:59Z
  assert.equal(raceEventId("bf:28587288", "greyhound_racing", 1711843500000), "bf:28587288.0005"); // 00:05Z
  assert.equal(raceEventId("bf:1", "horse_racing", 0), "bf:1.0000");
  assert.equal(raceEventId("bf:1", "horse_racing", Date.UTC(2024, 0, 1, 9, 7, 30, 500)), "bf:1.0907", "seconds dropped");
  // not a Betfair race
  assert.equal(raceEventId("bf:1", "soccer", 0), undefined);
  assert.equal(raceEventId("pn:1", "horse_racing", 0), undefined);
  assert.equal(raceEventId("bf:1", "horse_racing", null), undefined);
  assert.equal(raceEventId(null, "horse_racing", 0), undefined);
  assert.equal(raceEventId("bf:1", null, 0), undefined);
});

const START = Date.UTC(2024, 4, 1, 16, 50); // the race's scheduled start: bf:28587288.1650
const NOW = START + 60_000;

function mkt(market_id: string, event_id: string, sport: string, start_time: number | null): MarketWithAge {
  return {
    market_id, event_id, sport, start_time, source: "betfair", seq: 1, status: "OPEN", in_play: true,
    source_ts: NOW, received_at: NOW, selections: [{ selection_id: "7390417", price: 2.5 }, { selection_id: "7390418", price: 4 }],
    age_ms: 0, stale: false,
  } as MarketWithAge;
}

function state(event_id: string, extra: Partial<EventStateWithAge> = {}): ServerMessage {
  return {
    type: "event_state", sent_at: NOW,
    event_state: { event_id, source: "betfair", status: "LIVE", in_play: true, version: 1, source_ts: NOW,
      received_at: NOW, age_ms: 5, stale: false, ...extra },
  };
}

test("stateOfMarket: a race market's race state, else its event's; other markets their event's", () => {
  const c = new OddsClient("http://127.0.0.1:1"); // never started: messages go through the apply API
  c.handleMessage({
    type: "snapshot", as_of: NOW, markets: [
      mkt("bf:1.173853449", "bf:28587288", "horse_racing", START), // WIN market of the 16:50
      mkt("bf:1.173853450", "bf:28587288", "horse_racing", START), // PLACE market of the same race
      mkt("bf:1.173853500", "bf:28587288", "horse_racing", START + 30 * 60_000), // the 17:20, no progress yet
      mkt("bf:1.200000001", "bf:31573045", "soccer", START),
    ],
  });
  assert.equal(c.stateOfMarket("bf:1.173853449"), undefined, "no state yet");
  assert.equal(c.stateOfMarket("bf:no-such-market"), undefined);

  c.handleMessage(state("bf:31573045", { score: { home: 1, away: 0, periods: [] } }));
  c.handleMessage(state("bf:28587288", { status: "LIVE" })); // the meeting's own state, if a provider sends one
  c.handleMessage(state("bf:28587288.1650", {
    clock: { seconds: 41, running: true, at: NOW - 1000 },
    race: {
      race_id: "28587288.1650", market_id: "bf:1.173853449", gate: "4f", distance_m: 805.2, leader_speed_mps: 16.9,
      sectional_s: 12.4, order: ["7390418", "7390417"],
      runners: [{ selection_id: "7390418", distance_m: 805.2, speed_mps: 16.9, at: NOW - 1000 },
        { selection_id: "7390417", distance_m: 809.0, speed_mps: 16.7, at: NOW - 1000 }],
    },
  }));

  const race = c.stateOfMarket("bf:1.173853449");
  assert.equal(race?.event_id, "bf:28587288.1650");
  assert.equal(race?.race?.gate, "4f");
  assert.deepEqual(race?.race?.order, ["7390418", "7390417"]);
  assert.equal(c.stateOfMarket("bf:1.173853450")?.event_id, "bf:28587288.1650", "every market of the race");
  assert.equal(c.stateOfMarket("bf:1.173853500")?.event_id, "bf:28587288", "another race of the meeting: not this race's");
  assert.deepEqual(c.stateOfMarket("bf:1.200000001")?.score, { home: 1, away: 0, periods: [] });

  // the race's running time runs on locally; staleness as for any state
  assert.equal(c.matchTimeS(race!.event_id, NOW + 500), 41 + 1.5);
  assert.equal(c.isEventStateStale(race!.event_id), false);

  // a newer version replaces it (the finish); an older one changes nothing
  c.handleMessage(state("bf:28587288.1650", {
    version: 3, status: "ENDED", in_play: false, clock: { seconds: 71, running: false, at: NOW + 30_000 },
    race: { race_id: "28587288.1650", gate: "Finish", distance_m: 0, order: ["7390417", "7390418"] },
  }));
  c.handleMessage(state("bf:28587288.1650", { version: 2, race: { race_id: "28587288.1650", gate: "2f" } }));
  const ended = c.stateOfMarket("bf:1.173853449");
  assert.equal(ended?.status, "ENDED");
  assert.equal(ended?.race?.gate, "Finish");
  assert.equal(c.matchTimeS("bf:28587288.1650", NOW + 99_000), 71, "a stopped clock stands");

  // a snapshot starts the states over: the race market falls back to nothing
  c.handleMessage({ type: "snapshot", as_of: NOW, markets: [mkt("bf:1.173853449", "bf:28587288", "horse_racing", START)] });
  assert.equal(c.stateOfMarket("bf:1.173853449"), undefined);
});

test("stateOfMarket: a race market without a start time or outside Betfair uses its event's state", () => {
  const c = new OddsClient("http://127.0.0.1:1");
  c.handleMessage({
    type: "snapshot", as_of: NOW, markets: [
      mkt("bf:1.9", "bf:28587288", "horse_racing", null),
      mkt("pn:9", "pn:777", "horse_racing", START),
    ],
  });
  c.handleMessage(state("bf:28587288"));
  c.handleMessage(state("pn:777", { source: "pinnacle" }));
  c.handleMessage(state("pn:777.1650", { source: "pinnacle" })); // not a race id: never looked up
  assert.equal(c.stateOfMarket("bf:1.9")?.event_id, "bf:28587288");
  assert.equal(c.stateOfMarket("pn:9")?.event_id, "pn:777");
});
