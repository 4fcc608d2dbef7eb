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
import {
  LAG_RECONNECT_SPREAD_MS, OddsClient, keyType, marketKey, type MarketWithAge, type ServerMessage,
} from "../src/index.js";

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
    staleInPlayMs: 10_000, stalePreMatchMs: 60_000, backoff: (a) => { delays.push(a); return 10; }, random: () => 0 });
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
    f.push(1, [[{ type: "resumed", recovered: true, as_of: Date.now() + step }, "t1"],
      [{ type: "heartbeat", as_of: Date.now() + step }]]);
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

/** A delta of market `id` to `price` at `seq`, sent at `sentAt` (the server's clock). */
function priceDelta(id: string, seq: number, price: number, sentAt: number): ServerMessage {
  return { type: "delta", market_id: id, seq, kind: "delta", source: "s1", source_ts: sentAt, received_at: sentAt,
    sent_at: sentAt, age_ms: 0, stale: false, selections: [{ selection_id: "1", price, back: [[price, 5.0]] }] };
}

/** A client whose first connection went live (a snapshot of "live" in play and "pre", a
 * heartbeat), then reconnected: the second connection open, nothing on it yet. */
async function reconnectedClient(): Promise<{ f: ReturnType<typeof openFetch>; c: OddsClient }> {
  const f = openFetch([[[{ type: "snapshot", as_of: Date.now(), markets: [mk("live", true), mk("pre", false)] }, "t0"],
    [{ type: "heartbeat", as_of: Date.now() }]]]);
  const c = new OddsClient("http://127.0.0.1:9", { transport: "sse", fetch: f.fetch, heartbeatMs: 60_000,
    staleInPlayMs: 2_000, stalePreMatchMs: 60_000, backoff: () => 10 });
  c.start();
  await c.waitFor(() => c.live, 5_000, "the first connection live");
  assert.equal(c.isStale("live"), false);
  c.reconnect();
  await c.waitFor(() => c.stats.connects === 2 && c.connected, 5_000, "the reconnect");
  return { f, c };
}

test("a resumed stream: resumed's as_of sets the baseline, replayed deltas count their age (6 s old: stale)", async () => {
  // A genuinely slow client resumes: the replayed deltas carry the sent_at they were first sent
  // with. The oldest was the new connection's first timed message, so the lag it had became the
  // baseline and read as 0: replayed prices older than the limit read fresh.
  const { f, c } = await reconnectedClient();
  try {
    const t = Date.now();
    f.push(1, [[{ type: "resumed", recovered: true, as_of: t }, "t1"], [priceDelta("live", 2, 2.2, t - 6_000), "t2"],
      [priceDelta("pre", 2, 3.2, t - 5_900), "t3"]]);
    await c.waitFor(() => c.best("pre", "1") === 3.2, 5_000, "the replay");
    assert.equal(c.stats.resumedRecovered, 1);
    assert.ok(c.streamLagMs >= 5_900, `lag ${c.streamLagMs}`);
    assert.ok(c.ageMs("live")! >= 6_000 && c.ageMs("pre")! >= 5_900, `ages ${c.ageMs("live")} ${c.ageMs("pre")}`);
    assert.equal(c.isStale("live"), true, "a replayed price 6 s old read fresh");
    assert.equal(c.isStale("pre"), true);
    // caught up: a heartbeat sent now → lag 0, the book confirmed
    f.push(1, [[{ type: "heartbeat", as_of: Date.now() }]]);
    await c.waitFor(() => c.stats.heartbeats === 2, 5_000, "the heartbeat");
    assert.ok(c.streamLagMs < 1_000, `lag ${c.streamLagMs}`);
    assert.equal(c.isStale("live"), false);
  } finally {
    await c.close();
  }
});

test("a resumed without as_of (an older server): stale until the first heartbeat after it, no replayed delta as the baseline", async () => {
  const { f, c } = await reconnectedClient();
  try {
    const t = Date.now();
    f.push(1, [[{ type: "resumed", recovered: true } as ServerMessage, "t1"], [priceDelta("live", 2, 2.2, t - 6_000), "t2"],
      [priceDelta("pre", 2, 3.2, t - 5_900), "t3"]]);
    await c.waitFor(() => c.best("pre", "1") === 3.2, 5_000, "the replay");
    assert.equal(c.stats.resumedRecovered, 1);
    assert.equal(c.live, false);
    assert.equal(c.isStale("live"), true, "the replay set the baseline: read fresh before any heartbeat");
    assert.equal(c.isStale("pre"), true);
    f.push(1, [[{ type: "heartbeat", as_of: Date.now() }]]);
    await c.waitFor(() => c.stats.heartbeats === 2, 5_000, "the heartbeat");
    assert.equal(c.live, true);
    assert.ok(c.streamLagMs < 1_000, `lag ${c.streamLagMs}`);
    assert.equal(c.isStale("live"), false);
    assert.equal(c.isStale("pre"), false);
  } finally {
    await c.close();
  }
});

/** A client filtered on competition c1, with market and race-market builders (event bf:100's races
 *  start at t1 = 17:00 UTC: race ids .1700 / .1730), for the event-state tests below. */
function stateClient() {
  const now = 1_000;
  const c = new OddsClient("http://127.0.0.1:9", { now: () => now, wallNow: () => T, competition: "c1" });
  const t1 = 1_900_000_000_000 - (1_900_000_000_000 % 3_600_000);
  const m = (id: string, event: string, extra: Partial<MarketWithAge> = {}): MarketWithAge =>
    mk(id, true, { event_id: event, competition: "c1", ...extra });
  const race = (id: string, start: number, seq = 1): MarketWithAge =>
    m(id, "bf:100", { sport: "horse_racing", start_time: start, seq });
  return { c, t1, m, race };
}

test("an event state leaves with the last market that refers to it (event id and race id)", () => {
  const { c, t1, m, race } = stateClient();
  c.handleMessage({ type: "snapshot", as_of: T, markets: [m("a1", "e1"), m("a2", "e1"), m("b1", "e2"),
    race("r1", t1), race("r2", t1 + 1_800_000)] }, "t0");
  for (const id of ["e1", "e2", "bf:100", "bf:100.1700", "bf:100.1730"]) {
    c.handleMessage({ type: "event_state", sent_at: T, event_state: { event_id: id, source: "s1", status: "LIVE",
      in_play: true, version: 1, source_ts: T, received_at: T, age_ms: 0, stale: false } } as ServerMessage);
  }
  const status = { type: "status", source: "s1", state: "UP", reason: null, stale_markets: [], stale_events: [],
    as_of: T } as unknown as ServerMessage;
  c.handleMessage(status);
  assert.equal(c.stateOfMarket("r1")?.event_id, "bf:100.1700");
  const removed = (id: string): ServerMessage => ({ type: "removed", market_id: id, reason: "not_visible" });
  c.handleMessage(removed("a1"), "t1"); // a2 still shows e1's state
  assert.equal(c.isEventStateStale("e1"), false);
  c.handleMessage(removed("a2"), "t2"); // the last one: the state goes (the server says no more of it)
  assert.equal(c.eventStates.has("e1"), false);
  assert.equal(c.isEventStateStale("e1"), true);
  c.handleMessage(removed("r1"), "t3"); // its race's state goes; the meeting's and r2's race's stay
  assert.equal(c.eventStates.has("bf:100.1700"), false);
  assert.equal(c.isEventStateStale("bf:100"), false);
  assert.equal(c.isEventStateStale("bf:100.1730"), false);
  // leaving the local filter (a delta moving its competition, and its event) drops the state of the
  // event it was shown with too
  c.handleMessage({ type: "delta", market_id: "b1", seq: 2, kind: "delta", source: "s1", source_ts: T, received_at: T,
    sent_at: T, age_ms: 0, stale: false, header: { competition: "c2", sport: "soccer", event_id: "e3", in_play: true,
      status: "OPEN" } } as ServerMessage, "t4");
  assert.equal(c.markets.has("b1"), false);
  assert.equal(c.eventStates.has("e2"), false);
  assert.equal(c.isEventStateStale("e2"), true);
  c.handleMessage(status);
  assert.deepEqual([...c.eventStates.keys()].sort(), ["bf:100", "bf:100.1730"]);
});

test("a market that moves to another event or race takes the states left without a market with it", () => {
  // A market that stayed in the filter but moved (a delta's header, or an image, with another
  // event_id or another start: another race) left its old event's state in the client: no market
  // referred to it, the server sent no more of it nor listed it in stale_events, and it read fresh
  // for good. The move now drops the states it was shown with that no market left refers to.
  const { c, t1, m, race } = stateClient();
  const image = (mkt: MarketWithAge): ServerMessage => ({ type: "delta", market_id: mkt.market_id, seq: mkt.seq,
    kind: "image", source: "s1", source_ts: T, received_at: T, sent_at: T, age_ms: 0, stale: false,
    market: mkt } as ServerMessage);
  c.handleMessage({ type: "snapshot", as_of: T, markets: [m("a1", "e1"), m("b1", "e2"),
    race("r1", t1), race("r2", t1 + 1_800_000), race("r3", t1 + 1_800_000)] }, "t0");
  for (const id of ["e1", "e2", "bf:100", "bf:100.1700", "bf:100.1730"]) {
    c.handleMessage({ type: "event_state", sent_at: T, event_state: { event_id: id, source: "s1", status: "LIVE",
      in_play: true, version: 1, source_ts: T, received_at: T, age_ms: 0, stale: false } } as ServerMessage);
  }
  const held = (): string => [...c.eventStates.keys()].sort().join(",");
  // a header moving a1 to e2 (b1's event): e1 has no market left and goes, e2 stays
  c.handleMessage({ type: "delta", market_id: "a1", seq: 2, kind: "delta", source: "s1", source_ts: T, received_at: T,
    sent_at: T, age_ms: 0, stale: false, header: { competition: "c1", sport: "soccer", event_id: "e2", in_play: true,
      status: "OPEN" } } as ServerMessage, "t1");
  assert.equal(c.markets.get("a1")?.event_id, "e2");
  assert.equal(c.eventStates.has("e1"), false, "the state of the event a1 left is held, with no market showing it");
  assert.equal(c.isEventStateStale("e1"), true);
  assert.equal(c.isEventStateStale("e2"), false);
  // an image moving r1's start by an hour: its race (.1700) goes, the meeting (same event) stays
  c.handleMessage(image(race("r1", t1 + 3_600_000, 2)), "t2");
  assert.equal(held(), "bf:100,bf:100.1730,e2");
  // an image moving r2 to another meeting: r3 still shows the race .1730 and the meeting
  c.handleMessage(image({ ...race("r2", t1 + 1_800_000, 2), event_id: "bf:200" }), "t3");
  assert.equal(held(), "bf:100,bf:100.1730,e2");
  // a new start within the same minute (17:30:30) is the same race: nothing goes
  c.handleMessage(image(race("r3", t1 + 1_830_000, 2)), "t4");
  assert.equal(held(), "bf:100,bf:100.1730,e2");
  // r3, the race's last market, moved to 17:31: the race .1730 goes, the meeting stays
  c.handleMessage(image(race("r3", t1 + 1_860_000, 3)), "t5");
  assert.equal(held(), "bf:100,e2");
  assert.equal(c.isEventStateStale("bf:100.1730"), true);
  assert.equal(c.isEventStateStale("bf:100"), false);
});

test("a lag reconnect waits a random spread on top of its backoff", async () => {
  // After a server clock step every client sees its third lagging heartbeat on the same tick: with a
  // backoff of a few ms they would all come back together.
  for (const r of [0, 0.25]) {
    const t = Date.now();
    const f = openFetch([[[{ type: "snapshot", as_of: t, markets: [mk("live", true)] }, "t0"],
      ...[1, 2, 3].map((k): [ServerMessage] => [{ type: "heartbeat", as_of: t + k - 15_000 }])]]);
    const c = new OddsClient("http://127.0.0.1:9", { transport: "sse", fetch: f.fetch, heartbeatMs: 60_000,
      staleInPlayMs: 10_000, backoff: () => 10, random: () => r });
    try {
      c.start();
      await c.waitFor(() => c.stats.lagReconnects === 1, 5_000, "the lag reconnect");
      const decided = performance.now();
      await c.waitFor(() => c.stats.connects === 2, 5_000, "the reconnect");
      const waited = performance.now() - decided;
      const want = 10 + r * LAG_RECONNECT_SPREAD_MS;
      assert.ok(waited >= want - 15 && waited < want + 400, `random ${r}: waited ${waited} ms, want ${want}`);
    } finally {
      await c.close();
    }
  }
});

test("a conflated stream's heartbeat does not confirm the markets its window holds (held)", () => {
  let now = 50_000;
  const c = new OddsClient("http://127.0.0.1:9", { now: () => now, wallNow: () => T, staleInPlayMs: 1_500 });
  c.handleMessage({ type: "snapshot", as_of: T, markets: [mk("m1", true), mk("m2", true)] }, "t0");
  now += 5_000;
  c.handleMessage({ type: "heartbeat", as_of: T + 5_000, held: ["m1"] } as ServerMessage, "t1");
  assert.equal(c.isStale("m2"), false);
  assert.equal(c.ageMs("m1"), 5_000);
  assert.equal(c.isStale("m1"), true, "a market whose change the window holds was confirmed by the heartbeat");
});
