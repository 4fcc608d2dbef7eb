// What the client vouches for, against a real `oddsfeed run`: while it follows no live stream —
// found silent, dropped, reconnected but not yet resumed, closed — every market reads stale and
// heartbeats confirm nothing; a callback that throws never ends or stalls the stream.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { OddsClient } from "../src/index.js";
import { assertBookMatchesRest, tracked } from "./helpers/book.js";
import { sleep, startServer, type Server } from "./helpers/server.js";
import { StreamTap } from "./helpers/tap.js";

let server: Server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

// (the server takes 100 ms and up; at 500 the silence is found after 2.5 s instead of 4 s, and the
// live stream — deltas every few ms, a heartbeat otherwise — is never near silent)
const HEARTBEAT_MS = 500;
const SILENCE_MS = 3 * HEARTBEAT_MS + 1000; // the client's rule: silent that long → dropped

for (const transport of ["sse", "ws"] as const) {
  test(`${transport}: no live stream (silent, dropped, reconnected but not resumed, closed) → every market stale`, async () => {
    const tap = new StreamTap();
    const c = new OddsClient(server.url, {
      transport, heartbeatMs: HEARTBEAT_MS, fetch: tap.fetch, WebSocket: tap.WebSocket, backoff: () => 100,
    });
    // a pre-match market the live stream vouches for (its 60 s threshold is far off: only the
    // stream's state can make it stale within this test)
    const freshPreMatch = (): string | undefined =>
      c.openMarkets().find((m) => !m.in_play && !c.isStale(m.market_id))?.market_id;
    const allStale = (): boolean => [...c.markets.keys()].every((id) => c.isStale(id));
    /** reconnected (held: nothing the server sends arrives), not resumed: stale, heartbeats confirm nothing */
    const assertStaleUntilResumed = async (id: string, what: string): Promise<void> => {
      await c.waitFor(() => c.connected && tap.opened === opened + 1, 5000, `${what}: reconnected`);
      opened = tap.opened;
      assert.ok(allStale(), `${what}: reconnected, not resumed yet: every market stale`);
      const age = c.ageMs(id)!;
      c.handleMessage({ type: "heartbeat", as_of: Date.now() }); // as the stream would deliver one
      assert.ok(c.ageMs(id)! >= age, `${what}: a heartbeat before the resume confirms nothing (${c.ageMs(id)} < ${age})`);
      assert.equal(c.isStale(id), true);
      const resumes = c.stats.resumedRecovered + c.stats.snapshots;
      tap.release(); // the held messages arrive: resumed {recovered: true} (or a snapshot), then what followed
      await c.waitFor(() => !c.isStale(id), 5000, `${what}: fresh once resumed`);
      assert.ok(c.stats.resumedRecovered + c.stats.snapshots > resumes, `${what}: a resume or a snapshot made it fresh`);
    };
    let opened = 0;
    try {
      await c.start().waitSynced(10_000);
      await c.waitFor(() => freshPreMatch() !== undefined, 10_000, "a fresh pre-match market");
      const id = freshPreMatch()!;
      opened = tap.opened;

      // 1. silent: the server keeps sending, nothing arrives (a half-open link)
      tap.hold = true; // …and the reconnection's messages are held back (step 2)
      tap.silence();
      await sleep(300); // what was already on its way is taken
      const silentAt = performance.now();
      const ageAtSilence = c.ageMs(id)!;
      assert.equal(c.isStale(id), false, "fresh while not yet found silent");
      await c.waitFor(() => c.isStale(id), SILENCE_MS + 1500, "stale once the stream is found silent");
      assert.ok(allStale(), "every market stale once the stream is found silent");
      assert.ok(c.ageMs(id)! >= ageAtSilence + (performance.now() - silentAt) - 50, "its age kept growing");

      // 2. reconnected, not yet resumed: still stale; resumed: fresh
      await assertStaleUntilResumed(id, "after silence");
      assert.equal(c.stats.reconnects, 1);

      // 3. dropped (reconnect(): as after a network drop): stale at once, until resumed
      tap.hold = true;
      c.reconnect();
      assert.ok(allStale(), "every market stale the moment the stream drops");
      await assertStaleUntilResumed(id, "after a drop");
      assert.equal(c.stats.reconnects, 2);

      // 4. closed: nothing is vouched for any more
      await c.close();
      assert.ok(c.markets.size > 0 && allStale(), "every market stale after close()");
    } finally {
      tap.release();
      await c.close();
    }
  });
}

for (const transport of ["sse", "ws"] as const) {
  test(`${transport}: callbacks that throw are counted and reported; the stream goes on, later deltas applied`, async () => {
    const reported = new Map<string, number>();
    const t = tracked(server.url, {
      transport,
      onUpdate: () => { throw new Error("a bug in onUpdate"); },
      onEventState: () => { throw new Error("a bug in onEventState"); },
      onCallbackError: (name) => reported.set(name, (reported.get(name) ?? 0) + 1),
    });
    const c = t.client;
    c.on((name) => { if (name === "delta") throw new Error("a bug in a listener"); });
    try {
      await c.start().waitSynced(10_000);
      const held = c.markets.size;
      assert.ok(held > 0);
      const deltasAtSync = c.stats.deltas;
      await c.waitFor(() => c.stats.deltas > deltasAtSync + 20, 10_000, "deltas applied after onUpdate threw");
      assert.equal(c.stats.reconnects, 0, `the stream never ended: ${c.stats.disconnectReasons.slice(0, 3).join("; ")}`);
      await c.waitFor(() => c.stats.eventStates > 0, 10_000, "an event state");
      await assertBookMatchesRest(t, {}); // every change applied, in order, across the throws
      assert.equal(c.stats.reconnects, 0, `the stream never ended: ${c.stats.disconnectReasons.slice(0, 3).join("; ")}`);
      assert.equal(c.stats.snapshots, 1);
      assert.equal(c.stats.gaps, 0);
      assert.ok(c.connected && c.error === null);
      assert.ok((reported.get("onUpdate") ?? 0) >= held, "each market of the snapshot went to onUpdate, each error reported");
      assert.ok((reported.get("onEventState") ?? 0) > 0, "onEventState's error reported");
      assert.ok((reported.get("listener:delta") ?? 0) > 0, "a listener's error reported");
      const total = [...reported.values()].reduce((a, b) => a + b, 0);
      assert.equal(c.stats.callbackErrors, total, "each error counted once and reported once");
    } finally {
      await c.close();
    }
  });
}
