// Event states (scores, period, clock) on the stream against a real `oddsfeed run --sim-push` (its
// push-format simulator serves the soccer and basketball matches in play with scores and a clock):
// they arrive over SSE and WebSocket keyed by the event ids the book's markets carry, the newest
// version is kept, they agree with GET /v1/events/{id}, the clock runs on locally, and they never
// move the resume token. And isEventStateStale follows the server's last word on a held state: its
// `event_state`'s `stale`, then each `status` of its source (`stale_events`).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { OddsClient, type EventStateMessage, type EventStateWithAge, type StatusMessage } from "../src/index.js";
import { MiniWebSocket } from "./helpers/miniws.js";
import { startServer, type Server } from "./helpers/server.js";

let server: Server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

interface EventDetailBody { states: (EventStateWithAge & { reversed: boolean })[] }

for (const transport of ["sse", "ws"] as const) {
  test(`${transport}: event states arrive for the book's events, newest kept, as REST serves them`, async () => {
    const taken: EventStateWithAge[] = [];
    const c = new OddsClient(server.url, {
      transport, WebSocket: MiniWebSocket, heartbeatMs: 1000, onEventState: (s) => taken.push(s),
    });
    try {
      await c.start().waitSynced(10_000);
      await c.waitFor(() => c.eventStates.size > 0, 30_000, "an event state");
      const eventIds = new Set([...c.markets.values()].map((m) => m.event_id));
      for (const id of c.eventStates.keys()) assert.ok(eventIds.has(id), `${id}: a state of an event the book holds`);
      assert.equal(c.stats.eventStates, taken.length);

      // a change arrives live (basketball points accrue with the clock; soccer goals, periods)
      const before = taken.length;
      await c.waitFor(() => taken.length > before, 30_000, "a live event state");
      const byEvent = new Map<string, number>();
      for (const s of taken) {
        const v = s.version ?? 0;
        assert.ok(v > (byEvent.get(s.event_id) ?? -1), `${s.event_id}: versions only go up (${v})`);
        byEvent.set(s.event_id, v);
      }

      // as REST serves it: the member's own state, at the same or a newer version
      const [id, es] = [...c.eventStates.entries()][0];
      const r = await fetch(`${server.url}/v1/events/${encodeURIComponent(id)}`, { signal: AbortSignal.timeout(5000) });
      assert.equal(r.status, 200);
      const own = ((await r.json()) as EventDetailBody).states.find((s) => s.event_id === id);
      assert.ok(own, `GET /v1/events/${id} lists its own state`);
      assert.ok((own.version ?? 0) >= (es.version ?? 0));
      if (own.version === es.version) assert.deepEqual(own.score, es.score);

      // the clock runs on locally; a stopped one stands
      const running = [...c.eventStates.values()].find((s) => s.clock?.running);
      if (running?.clock) {
        assert.equal(c.matchTimeS(running.event_id, running.clock.at + 1500), running.clock.seconds + 1.5);
        assert.ok((c.matchTimeS(running.event_id) ?? 0) >= running.clock.seconds);
      }
      assert.equal(c.matchTimeS("no:such-event"), undefined);
      assert.equal(c.isEventStateStale("no:such-event"), true);
      assert.equal(c.isEventStateStale(id), es.stale);

      // an older version changes nothing, and never moves the token
      const tokenNow = c.token;
      const older: EventStateMessage = { type: "event_state", event_state: { ...es, version: (es.version ?? 1) - 1,
        score: { home: 99, away: 99, periods: [] } }, sent_at: Date.now() };
      const n = taken.length;
      c.handleMessage(older);
      assert.notDeepEqual(c.eventStates.get(id)?.score, { home: 99, away: 99, periods: [] });
      assert.equal(taken.length, n);
      assert.equal(c.token, tokenNow);
    } finally {
      await c.close();
    }
  });
}

test("a snapshot starts the event states over; the states after it are the current ones", async () => {
  const c = new OddsClient(server.url, { transport: "ws", WebSocket: MiniWebSocket, heartbeatMs: 1000 });
  try {
    await c.start().waitSynced(10_000);
    await c.waitFor(() => c.eventStates.size > 0, 30_000, "an event state");
    c.handleMessage({ type: "snapshot", markets: [], as_of: Date.now() });
    assert.equal(c.eventStates.size, 0);
  } finally {
    await c.close();
  }
});

test("isEventStateStale follows the status messages' stale_events of the state's source", async () => {
  // the messages as the server sends them, fed through handleMessage (no stream: the rule itself)
  const c = new OddsClient("http://127.0.0.1:9");
  const status = (source: string, stale_events: string[] | undefined, state: StatusMessage["state"] = "DEGRADED"):
    StatusMessage => ({ type: "status", source, state, reason: "silent", stale_markets: [], turned_stale: [],
      turned_fresh: [], stale_events, as_of: Date.now() });
  const es: EventStateWithAge = { event_id: "p:e1", source: "p", status: "LIVE", in_play: true, version: 3,
    age_ms: 0, stale: false };
  try {
    c.handleMessage({ type: "snapshot", markets: [], as_of: Date.now() });
    c.handleMessage({ type: "event_state", event_state: es, sent_at: Date.now() });
    assert.equal(c.isEventStateStale("p:e1"), false);
    // its source DEGRADED and silent: the held state turned stale (no new state comes)
    c.handleMessage(status("p", ["p:e1"]));
    assert.equal(c.isEventStateStale("p:e1"), true);
    assert.equal(c.eventStates.get("p:e1")?.stale, false); // the flag is the status's, not a new state's
    c.handleMessage(status("q", [])); // another source's status says nothing of it
    assert.equal(c.isEventStateStale("p:e1"), true);
    // it confirms again: the next status lists it no more
    c.handleMessage(status("p", [], "UP"));
    assert.equal(c.isEventStateStale("p:e1"), false);
    // the same state resent (after a resume) says stale: its word is the latest
    c.handleMessage({ type: "event_state", event_state: { ...es, age_ms: 60_000, stale: true }, sent_at: Date.now() });
    assert.equal(c.isEventStateStale("p:e1"), true);
    c.handleMessage(status("p", []));
    assert.equal(c.isEventStateStale("p:e1"), false);
    // a server before stale_events: its statuses leave the flag as it was
    c.handleMessage({ type: "event_state", event_state: { ...es, stale: true }, sent_at: Date.now() });
    c.handleMessage(status("p", undefined, "UP"));
    assert.equal(c.isEventStateStale("p:e1"), true);
    c.handleMessage(status("p", []));
    assert.equal(c.isEventStateStale("p:e1"), false);
  } finally {
    await c.close();
  }
  assert.equal(c.isEventStateStale("p:e1"), true); // no live stream
});
