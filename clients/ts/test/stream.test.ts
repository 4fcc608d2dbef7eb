// SSE and WebSocket subscriptions against a real `oddsfeed run`: the book equals GET /v1/markets
// at the same seqs, a resume after a forced disconnect loses nothing, a seq gap is detected and
// resynced, a refused filter is a typed error.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { OddsClient, StreamError, type DeltaMessage } from "../src/index.js";
import { assertBookMatchesRest, tracked } from "./helpers/book.js";
import { MiniWebSocket } from "./helpers/miniws.js";
import { sleep, startServer, type Server } from "./helpers/server.js";

let server: Server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

for (const transport of ["sse", "ws"] as const) {
  test(`${transport}: the book equals GET /v1/markets at the same seqs`, async () => {
    const t = tracked(server.url, { transport });
    try {
      await t.client.start().waitSynced(10_000);
      assert.equal(t.client.stats.snapshots, 1);
      // deltas flow: the book compared is built from many deltas on top of the snapshot
      await t.client.waitFor(() => t.client.stats.deltas >= 50, 10_000, "50 deltas applied");
      const n = await assertBookMatchesRest(t, {});
      assert.ok(n >= 5, `${n} markets compared`);
      assert.equal(t.client.stats.gaps, 0);
    } finally {
      await t.client.close();
    }
  });
}

test("ws with filters (sport, source, conflate_ms): the book equals the filtered GET /v1/markets", async () => {
  const t = tracked(server.url, { transport: "ws", sport: "soccer", source: "betfair", conflate_ms: 0, odds_format: "decimal" });
  try {
    await t.client.start().waitSynced(10_000);
    assert.ok([...t.client.markets.values()].every((m) => m.sport === "soccer"));
    await t.client.waitFor(() => t.client.stats.deltas >= 20, 10_000, "20 filtered deltas applied");
    await assertBookMatchesRest(t, { sport: "soccer", source: "betfair" }); // the server also runs the push source
  } finally {
    await t.client.close();
  }
});

test("sse with market_type and in_play filters subscribes and holds only matching markets", async () => {
  const t = tracked(server.url, { transport: "sse", market_type: "match_result", in_play: false, conflate_ms: 100 });
  try {
    await t.client.start().waitSynced(10_000);
    await sleep(1000);
    for (const m of t.client.markets.values()) {
      assert.equal(m.market_type, "match_result");
      assert.equal(m.in_play, false);
    }
    assert.equal(t.client.stats.gaps, 0, "conflated deltas may skip seqs without being gaps");
  } finally {
    await t.client.close();
  }
});

for (const transport of ["sse", "ws"] as const) {
  test(`${transport}: a resume after a forced disconnect replays the missed deltas (none lost)`, async () => {
    const applied: { at: number; received_at: number }[] = [];
    const t = tracked(server.url, { transport, backoff: () => 800 }); // disconnected for 800 ms
    const c = t.client;
    c.on((name, detail) => {
      if (name === "delta") applied.push({ at: Date.now(), received_at: (detail as DeltaMessage).received_at });
    });
    try {
      await c.start().waitSynced(10_000);
      await c.waitFor(() => c.token !== null && c.stats.deltas >= 10, 5000, "deltas flowing, a resume token");
      const droppedAt = Date.now();
      if (transport === "ws") MiniWebSocket.instances.at(-1)!.dropNetwork(); // the network goes away
      else c.reconnect();
      await c.waitFor(() => c.stats.reconnects === 1, 5000, "the drop noticed");
      await c.waitFor(() => c.stats.resumedRecovered === 1 && c.connected, 10_000, "a recovered resume");
      await sleep(500);
      assert.equal(c.stats.snapshots, 1, "the book was kept (no new snapshot)");
      assert.equal(c.stats.resumedLost, 0);
      assert.equal(c.stats.gaps, 0, "no seq skipped across the resume");
      // applied after the reconnect (≥ 800 ms after the drop), received by the server while disconnected
      const replayed = applied.filter((d) => d.at > droppedAt + 700 && d.received_at < droppedAt + 500);
      assert.ok(replayed.length > 0, "deltas stored while disconnected arrived after the resume");
      await assertBookMatchesRest(t, {});
    } finally {
      await c.close();
    }
  });
}

test("a delta with a skipped seq is detected, not applied, and resynced", async () => {
  const t = tracked(server.url, { transport: "sse" });
  const c = t.client;
  try {
    await c.start().waitSynced(10_000);
    const m = c.openMarkets()[0];
    assert.ok(m, "an open market");
    const tokenBefore = c.token;
    const sel = m.selections[0];
    const bogus: DeltaMessage = {
      type: "delta", market_id: m.market_id, seq: m.seq + 2, kind: "delta", source: m.source,
      source_ts: Date.now(), received_at: Date.now(), sent_at: Date.now(), age_ms: 0, stale: false,
      selections: [{ selection_id: sel.selection_id, price: 999, back: [[999, 1]] }],
    };
    const r = c.handleMessage(bogus, "token-of-the-gapped-delta");
    assert.equal(r, "gap");
    assert.equal(c.stats.gaps, 1);
    assert.equal(c.lastGap?.marketId, m.market_id);
    assert.notEqual(c.token, "token-of-the-gapped-delta", "the gapped delta's token is not kept");
    assert.equal(c.token, tokenBefore);
    assert.notEqual(c.markets.get(m.market_id)?.selections[0].price, 999, "the gapped delta was not applied");
    await c.waitFor(() => c.stats.resyncs === 1 && c.synced && c.connected, 10_000, "the resync");
    assert.equal(c.stats.resumedRecovered, 1, "resynced by resuming with the token held before the gap");
    await sleep(500);
    await assertBookMatchesRest(t, {});
  } finally {
    await c.close();
  }
});

test("a refused filter is a StreamError (no retry loop)", async () => {
  for (const transport of ["sse", "ws"] as const) {
    const c = new OddsClient(server.url, { transport, conflate_ms: 3, WebSocket: MiniWebSocket });
    try {
      const err = await c.start().waitSynced(10_000).then(() => null, (e) => e);
      assert.ok(err instanceof StreamError, `${transport}: ${err}`);
      if (transport === "sse") assert.equal(err.status, 400);
      assert.equal(err.code, "bad_request");
      assert.match(err.message, /conflate_ms/);
      assert.equal(c.stats.reconnects, 0);
    } finally {
      await c.close();
    }
  }
});
