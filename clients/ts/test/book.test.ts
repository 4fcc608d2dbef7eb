// The delta rule of feed.models.apply_delta, the seq rule of the README and the SSE parser —
// pure, no server.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Book, SseParser, applyDelta, normaliseMarket, type BookMarket, type Delta, type MarketWithAge } from "../src/index.js";

const SEL = {
  selection_id: "47972", name: "Home", status: "ACTIVE" as const, price: 2.02,
  back: [[2.02, 120.5], [2.0, 80.0]] as [number, number][], lay: [[2.04, 95.0]] as [number, number][], ltp: 2.02,
  traded_volume: 10.0,
};

function market(seq = 5): BookMarket {
  return normaliseMarket({
    market_id: "bf:1.1", source: "betfair", seq, sport: "soccer", status: "OPEN", in_play: true, version: 3,
    traded_volume: 100, source_ts: 1000, received_at: 1001, stored_at: 1002, session: "s1",
    selections: [SEL, { selection_id: "2", price: 3.5, back: [[3.5, 10]], lay: [] }], age_ms: 5, stale: false,
  } as MarketWithAge);
}

const tags = (seq: number): Delta => ({ market_id: "bf:1.1", seq, kind: "delta", source: "betfair", source_ts: 2000, received_at: 2001 });

test("absent fields are kept; present ones replace (null and [] included); ladders come whole", () => {
  const m = market();
  const n = applyDelta(m, { ...tags(6), selections: [{ selection_id: "47972", back: [[2.0, 80.0]], price: 2.0 }] })!;
  const s = n.selections[0];
  assert.deepEqual(s.back, [[2.0, 80.0]]);
  assert.equal(s.price, 2.0);
  assert.deepEqual(s.lay, [[2.04, 95.0]]); // unchanged
  assert.equal(s.ltp, 2.02);
  assert.equal(s.status, "ACTIVE");
  const n2 = applyDelta(n, { ...tags(7), selections: [{ selection_id: "47972", back: [], ltp: null }] })!;
  assert.deepEqual(n2.selections[0].back, []);
  assert.equal(n2.selections[0].ltp, null);
  assert.deepEqual(n2.selections[0].lay, [[2.04, 95.0]]);
  assert.deepEqual(m.selections[0].back, SEL.back, "the input market is not modified");
});

test("latency tags are taken, absent ones at their defaults; header replaces every market field", () => {
  const n = applyDelta(market(), { ...tags(6), header: { status: "SUSPENDED", in_play: true } })!;
  assert.equal(n.seq, 6);
  assert.equal(n.source_ts, 2000);
  assert.equal(n.received_at, 2001);
  assert.equal(n.stored_at, 0);
  assert.equal(n.session, null);
  assert.equal(n.status, "SUSPENDED");
  assert.equal(n.sport, null, "a header field absent takes its default (the header is whole)");
  assert.equal(n.version, 0);
  assert.equal(n.traded_volume, null);
  assert.equal(n.selections.length, 2);
});

test("traded_volume alone moves the volume; a header wins over it", () => {
  const n = applyDelta(market(), { ...tags(6), traded_volume: 150 })!;
  assert.equal(n.traded_volume, 150);
  assert.equal(n.sport, "soccer");
  const h = applyDelta(market(), { ...tags(6), traded_volume: 150, header: { traded_volume: 120 } })!;
  assert.equal(h.traded_volume, 120);
});

test("a new selection is appended, built from its fields with defaults; order kept", () => {
  const n = applyDelta(market(), { ...tags(6), selections: [{ selection_id: "9", price: 7 }, { selection_id: "2", price: 3.4 }] })!;
  assert.deepEqual(n.selections.map((s) => s.selection_id), ["47972", "2", "9"]);
  const s = n.selections[2];
  assert.equal(s.price, 7);
  assert.equal(s.status, "ACTIVE");
  assert.equal(s.handicap, 0);
  assert.deepEqual(s.back, []);
  assert.equal(n.selections[1].price, 3.4);
});

test("image replaces; stale seq and unknown market leave things as they were", () => {
  const m = market();
  assert.equal(applyDelta(m, { ...tags(5), price: 1 } as Delta), m);
  assert.equal(applyDelta(undefined, tags(6)), undefined);
  const img = applyDelta(m, { ...tags(3), kind: "image", market: { market_id: "bf:1.1", source: "betfair", seq: 3, age_ms: 1, stale: false } })!;
  assert.equal(img.seq, 3);
  assert.deepEqual(img.selections, []);
  assert.ok(!("age_ms" in img));
});

test("Book: seq rule — next applies, duplicate ignored, gap not applied, conflated may skip, older image ignored", () => {
  const b = new Book();
  b.replace([{ ...market(5), age_ms: 0, stale: false } as MarketWithAge]);
  assert.equal(b.apply(tags(6)), "applied");
  assert.equal(b.apply(tags(6)), "duplicate");
  assert.equal(b.apply({ ...tags(8), selections: [{ selection_id: "2", price: 9 }] }), "gap");
  assert.equal(b.get("bf:1.1")!.seq, 6);
  assert.equal(b.get("bf:1.1")!.selections[1].price, 3.5, "a gapped delta is never applied");
  assert.equal(b.apply({ ...tags(9), conflated: true }), "applied");
  assert.equal(b.apply({ ...tags(4), kind: "image", market: { market_id: "bf:1.1", source: "betfair", seq: 4, age_ms: 0, stale: false } }), "duplicate");
  assert.equal(b.apply({ ...tags(12), kind: "image", market: { market_id: "bf:1.1", source: "betfair", seq: 12, age_ms: 0, stale: false } }), "applied");
  assert.equal(b.apply({ ...tags(1), market_id: "other" }), "unknown");
});

test("SseParser: fields, ids carried per event, comments, CRLF and split chunks", () => {
  const p = new SseParser();
  const evs = [
    ...p.push(": hi\r\nretry: 2000\r\n\r\nevent: snapshot\nid: T1\nda"),
    ...p.push("ta: {\"a\":1}\n\nevent: delta\ndata: x\ndata: y\r"),
    ...p.push("\n\r\n"),
  ];
  assert.deepEqual(evs, [
    { event: "snapshot", data: "{\"a\":1}", id: "T1" },
    { event: "delta", data: "x\ny", id: undefined },
  ]);
});
