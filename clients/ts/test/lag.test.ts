// What a late stream vouches for, and the local market_type filter — pure, no server.
//
// A consumer slower than the feed leaves a backlog in socket buffers: every message then arrives
// seconds after the server sent it. The client took a heartbeat as confirming every market at its
// receipt (and a delta's age_ms as of receipt), so a book 14 s behind read fresh. Now a
// confirmation counts as of receipt − the stream's lag (receipt − send time, less the least such
// difference seen on the connection: a fixed clock skew cancels), and a stream lagging more than
// the in-play limit is not live.
import assert from "node:assert/strict";
import { test } from "node:test";
import { OddsClient, keyType, marketKey, type MarketWithAge, type ServerMessage } from "../src/index.js";

const T = 1_800_000_000_000; // the server's wall clock at the snapshot (ms since the epoch)

function mk(id: string, in_play: boolean, extra: Partial<MarketWithAge> = {}): MarketWithAge {
  return { market_id: id, source: "s1", seq: 1, sport: "soccer", in_play, age_ms: 0, stale: false,
    selections: [{ selection_id: "1", price: 2.0, back: [[2.0, 5.0]], lay: [] }], ...extra } as MarketWithAge;
}

test("heartbeats delivered later and later: ages count the lag, a stream lagging past the in-play limit is not live", () => {
  let now = 50_000; // the monotonic receipt clock (ms)
  const opts = { now: () => now, wallNow: () => T, staleInPlayMs: 10_000, stalePreMatchMs: 60_000 };
  const c = new OddsClient("http://127.0.0.1:9", opts);
  const onTime = new OddsClient("http://127.0.0.1:9", opts); // the control: the same stream, on time
  const skew = 3_600_000; // the server's clock reads an hour ahead of ours: cancels out
  const snap: ServerMessage = { type: "snapshot", as_of: T + skew, markets: [mk("live", true), mk("pre", false)] };
  c.handleMessage(snap, "t0");
  onTime.handleMessage(snap, "t0");
  const lags: number[] = [];
  for (let k = 1; k <= 20; k++) {
    now += 1_000; // a second of receipt…
    c.handleMessage({ type: "heartbeat", as_of: T + skew + k * 300 }); // …and only 0.3 s of the server's
    onTime.handleMessage({ type: "heartbeat", as_of: T + skew + k * 1_000 });
    lags.push(c.streamLagMs);
  }
  assert.equal(onTime.isStale("live"), false);
  assert.equal(onTime.isStale("pre"), false);
  assert.equal(onTime.ageMs("live"), 0);
  assert.ok(c.ageMs("live")! >= 14_000, `confirmed as of 14 s before the last receipt (age ${c.ageMs("live")})`);
  assert.equal(c.isStale("live"), true, "an in-play market 14 s behind the server reads stale");
  assert.equal(c.isStale("pre"), true, "a stream lagging more than the in-play limit is not live");
  assert.equal(c.live, false);
  assert.equal(lags[4], 3_500);
  assert.equal(lags[19], 14_000);
  assert.equal(onTime.streamLagMs, 0);
  // a delta delivered late: its age is the server's age_ms plus the lag
  now += 1_000;
  c.handleMessage({ type: "delta", market_id: "live", seq: 2, kind: "delta", source: "s1", source_ts: T, received_at: T,
    sent_at: T + skew + 6_100, age_ms: 100, stale: false,
    selections: [{ selection_id: "1", price: 2.2, back: [[2.2, 5.0]] }] }, "t1");
  assert.equal(c.best("live", "1"), 2.2);
  assert.equal(c.streamLagMs, 14_900);
  assert.equal(c.ageMs("live"), 15_000);
  assert.equal(c.isStale("live"), true);
  // caught up: a heartbeat as early as the fastest delivery → no lag, fresh again
  c.handleMessage({ type: "heartbeat", as_of: T + skew + 21_000 });
  assert.equal(c.streamLagMs, 0);
  assert.equal(c.live, true);
  assert.equal(c.isStale("live"), false);
  assert.equal(c.isStale("pre"), false);
});

/** A fetch serving /v1/stream from scripts (connection i plays scripts[i](), then ends) and
 *  nothing else (404). */
function scriptedFetch(scripts: (() => ServerMessage[])[]): { fetch: typeof fetch; streams: number } {
  const out = {
    streams: 0,
    fetch: (async (input: string | URL | Request): Promise<Response> => {
      const url = String(input instanceof Request ? input.url : input);
      if (!url.includes("/v1/stream")) return new Response("{}", { status: 404 });
      const script: (() => ServerMessage[]) | undefined = scripts[out.streams++];
      const ends = script !== undefined; // the connection ends: the client reconnects (past the scripts: stays open)
      const text = script ? script().map((m, i) => `event: ${m.type}\nid: c${out.streams}-${i}\ndata: ${JSON.stringify(m)}\n\n`).join("") : "";
      const body = new ReadableStream<Uint8Array>({
        start(ctl) {
          ctl.enqueue(new TextEncoder().encode(text));
          if (ends) ctl.close();
        },
      });
      return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
    }) as typeof fetch,
  };
  return out;
}

test("the clock offset is measured afresh on each connection (another node's clock is no lag)", async () => {
  const f = scriptedFetch([
    () => [{ type: "snapshot", as_of: Date.now(), markets: [mk("live", true)] }, { type: "heartbeat", as_of: Date.now() }],
    // the next connection reaches a node whose clock reads 30 s earlier
    () => [{ type: "snapshot", as_of: Date.now() - 30_000, markets: [mk("live", true)] },
      { type: "heartbeat", as_of: Date.now() - 30_000 }],
  ]);
  const c = new OddsClient("http://127.0.0.1:9", { transport: "sse", fetch: f.fetch, backoff: () => 10, heartbeatMs: 60_000 });
  try {
    c.start();
    await c.waitFor(() => c.stats.snapshots >= 2 && c.stats.heartbeats >= 2, 5_000, "the second connection's messages");
    assert.equal(c.isStale("live"), false);
    assert.ok(c.streamLagMs < 1_000, `lag ${c.streamLagMs}`);
  } finally {
    await c.close();
  }
});

test("market_type filter: a market whose type or key leaves the filter leaves the book; heartbeats confirm it no more", () => {
  let now = 1_000;
  const c = new OddsClient("http://127.0.0.1:9", { now: () => now, market_type: "match_result,total:line=2.5" });
  const t = (over: Partial<MarketWithAge>): MarketWithAge => mk(over.market_id!, true, over);
  c.handleMessage({ type: "snapshot", as_of: now, markets: [
    t({ market_id: "ml", market_type: "match_result" }),
    t({ market_id: "tot", market_type: "total", specifiers: { line: "2.5", period: "rt" } }),
  ] }, "t0");
  assert.deepEqual([...c.markets.keys()].sort(), ["ml", "tot"]);
  const delta = (id: string, seq: number, header: Record<string, unknown>): ServerMessage => ({
    type: "delta", market_id: id, seq, kind: "delta", source: "s1", source_ts: 1, received_at: 1, sent_at: now, age_ms: 0,
    stale: false, header: { sport: "soccer", in_play: true, status: "OPEN", ...header } });
  // the type moves (Pinnacle's moneyline without its draw price): out of the filter
  c.handleMessage(delta("ml", 2, { market_type: "moneyline" }), "t1");
  // the line moves: the key leaves the filter
  c.handleMessage(delta("tot", 2, { market_type: "total", specifiers: { line: "3.5" } }), "t2");
  assert.deepEqual([...c.markets.keys()], [], "both left the book");
  now += 20_000;
  c.handleMessage({ type: "heartbeat", as_of: now });
  assert.equal(c.isStale("ml"), true);
  assert.equal(c.ageMs("ml"), undefined);
});

test("marketKey / keyType: the server's market keys", () => {
  assert.equal(marketKey("total", { line: "2.5", period: "rt" }, "soccer"), "total:line=2.5");
  assert.equal(marketKey("total", { line: "2.5", period: "1h" }, "soccer"), "total:period=1h|line=2.5");
  assert.equal(marketKey("match_result", null, "soccer"), "match_result");
  assert.equal(marketKey(null, null), "raw:unknown");
  assert.equal(marketKey("raw:uof_8", { goalnr: "1", sport_key: "x" }), "raw:uof_8:goalnr=1");
  assert.equal(keyType("total:line=2.5"), "total");
  assert.equal(keyType("raw:uof_8:goalnr=1"), "raw:uof_8");
});

/** A fetch serving /v1/stream: connection i sends `first[i]` (SSE frames `[message, id?]`) and stays
 *  open; `push(i, …)` sends more on connection i later. Records each connection's Last-Event-ID. */
function openFetch(first: [ServerMessage, string?][][]): {
  fetch: typeof fetch; lastEventIds: (string | null)[]; push: (i: number, msgs: [ServerMessage, string?][]) => void;
} {
  const ctls: ReadableStreamDefaultController<Uint8Array>[] = [];
  const frames = (msgs: [ServerMessage, string?][]): Uint8Array => new TextEncoder().encode(msgs.map(([m, id]) =>
    `event: ${m.type}\n${id ? `id: ${id}\n` : ""}data: ${JSON.stringify(m)}\n\n`).join(""));
  const out = {
    lastEventIds: [] as (string | null)[],
    push: (i: number, msgs: [ServerMessage, string?][]): void => ctls[i].enqueue(frames(msgs)),
    fetch: (async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
      const url = String(input instanceof Request ? input.url : input);
      if (!url.includes("/v1/stream")) return new Response("{}", { status: 404 });
      const i = out.lastEventIds.length;
      out.lastEventIds.push((init?.headers as Record<string, string> | undefined)?.["Last-Event-ID"] ?? null);
      const body = new ReadableStream<Uint8Array>({
        start(ctl) {
          ctls[i] = ctl;
          if (first[i]?.length) ctl.enqueue(frames(first[i]));
        },
      });
      return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
    }) as typeof fetch,
  };
  return out;
}

test("a server clock stepped back: 3 heartbeats in a row lagging past the limit reconnect with the token, stale until resumed", async () => {
  // The least offset never forgets within a connection: a server whose wall clock steps back 15 s
  // (an NTP step) or runs slow read as lagging — every market stale — until the connection dropped.
  const t = Date.now();
  const step = -15_000;
  const hb = (lagging: boolean, k: number): [ServerMessage] => [{ type: "heartbeat", as_of: t + k + (lagging ? step : 0) }];
  const f = openFetch([[
    [{ type: "snapshot", as_of: t, markets: [mk("live", true), mk("pre", false)] }, "t0"],
    hb(true, 1), hb(true, 2), hb(false, 3), // two lagging, one in time: the count starts over
    hb(true, 4), hb(true, 5), hb(true, 6), // three in a row: reconnect
  ]]);
  const delays: number[] = [];
  const c = new OddsClient("http://127.0.0.1:9", { transport: "sse", fetch: f.fetch, heartbeatMs: 60_000,
    staleInPlayMs: 10_000, stalePreMatchMs: 60_000, backoff: (a) => { delays.push(a); return 10; } });
  try {
    c.start();
    await c.waitFor(() => c.stats.connects >= 2 && c.connected, 5_000, "a reconnect");
    assert.match(c.stats.disconnectReasons[0] ?? "", /lagging/);
    assert.equal(c.stats.lagReconnects, 1);
    assert.equal(c.stats.heartbeats, 6);
    assert.deepEqual(delays, [0], "the reconnect waited the backoff");
    assert.deepEqual(f.lastEventIds, [null, "t0"], "resumed with its token");
    // reconnected, not resumed: nothing vouched for (never fresher than before)
    assert.equal(c.live, false);
    assert.equal(c.isStale("live"), true);
    assert.equal(c.isStale("pre"), true);
    assert.equal(c.streamLagMs, 0);
    // the resume (the server's clock still stepped back): live again, the offset measured afresh
    f.push(1, [[{ type: "resumed", recovered: true }, "t1"], [{ type: "heartbeat", as_of: Date.now() + step }]]);
    await c.waitFor(() => c.stats.resumedRecovered === 1 && c.stats.heartbeats >= 7, 5_000, "the resumed stream");
    assert.ok(c.streamLagMs < 1_000, `lag ${c.streamLagMs}`);
    assert.equal(c.live, true);
    assert.equal(c.isStale("live"), false);
    assert.equal(c.isStale("pre"), false);
    assert.equal(c.stats.lagReconnects, 1);
    assert.equal(c.stats.connects, 2);
  } finally {
    await c.close();
  }
});
