// A client whose every market state is recorded by seq, and the check "the book equals
// GET /v1/markets at the same seqs".
import assert from "node:assert/strict";
import { OddsClient, type BookMarket, type OddsClientOptions } from "../../src/index.js";
import { MiniWebSocket } from "./miniws.js";

export interface Tracked {
  client: OddsClient;
  /** market_id → seq → the market as the book held it at that seq (JSON) */
  history: Map<string, Map<number, string>>;
}

export function tracked(url: string, options: OddsClientOptions = {}): Tracked {
  const history = new Map<string, Map<number, string>>();
  const client = new OddsClient(url, {
    heartbeatMs: 1000, WebSocket: MiniWebSocket, reconnectInitialMs: 50, reconnectMaxMs: 500, ...options,
    onUpdate: (id: string, m: BookMarket | undefined) => {
      if (!m) return;
      let h = history.get(id);
      if (!h) history.set(id, (h = new Map()));
      h.set(m.seq, JSON.stringify(m));
      options.onUpdate?.(id, m);
    },
  });
  return { client, history };
}

/** Fetch GET /v1/markets (with `query`), wait (bounded) until the book has reached every listed
 *  market's seq, and assert that the book held exactly the served market at that seq. Returns
 *  the number of markets compared. */
export async function assertBookMatchesRest(t: Tracked, query: Record<string, string>, timeoutMs = 20_000): Promise<number> {
  const { client, history } = t;
  const before = new Set(client.markets.keys());
  const listing = await client.fetchMarkets(query);
  assert.ok(listing.markets.length > 0, "the server lists markets");
  await client.waitFor(() => listing.markets.every((m) => (client.markets.get(m.market_id)?.seq ?? -1) >= (m.seq ?? 0)),
    timeoutMs, "the book reaching the listed seqs");
  for (const served of listing.markets) {
    const held = history.get(served.market_id)?.get(served.seq ?? 0);
    assert.ok(held !== undefined, `the book never held ${served.market_id} at seq ${served.seq}`);
    assert.deepEqual(JSON.parse(held), JSON.parse(JSON.stringify(OddsClient.asBookMarket(served))),
      `${served.market_id} at seq ${served.seq}`);
  }
  const listed = new Set(listing.markets.map((m) => m.market_id));
  for (const id of before) assert.ok(listed.has(id), `the book holds ${id}, which the server does not list`);
  return listing.markets.length;
}
