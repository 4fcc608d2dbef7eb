// The book: markets rebuilt from snapshot + deltas, exactly as feed.models.apply_delta does.
import {
  SCHEMA_DEFAULTS,
  type DeltaMessage,
  type MarketHeader,
  type MarketWithAge,
  type Selection,
  type SelectionChange,
} from "./schema.js";

type Full<T> = { [K in keyof T]-?: T[K] };

/** A selection as held in the book: every field present (absent ones at their schema defaults). */
export type BookSelection = Full<Selection>;

/** A market as held in the book: the served market without `age_ms`/`stale` (those are
 *  tracked per market by the client: {@link OddsClient.ageMs}, {@link OddsClient.isStale}),
 *  every field present. */
export type BookMarket = Full<Omit<MarketWithAge, "age_ms" | "stale" | "selections">> & {
  selections: BookSelection[];
};

/** What a delta carries (a decoded `delta` message; extra keys are ignored). */
export type Delta = Pick<DeltaMessage, "market_id" | "seq" | "kind" | "source" | "source_ts" | "received_at">
  & Partial<Pick<DeltaMessage, "stored_at" | "source_ts_original" | "session" | "market" | "header" | "selections"
    | "traded_volume" | "conflated">>;

/** The market-level fields a `header` replaces (feed.models.HEADER_FIELDS, from the schema). */
export const HEADER_FIELDS = Object.keys(SCHEMA_DEFAULTS.MarketHeader) as (keyof MarketHeader)[];
/** The fields of a selection other than its id (those a SelectionChange may carry). */
export const SELECTION_FIELDS = Object.keys(SCHEMA_DEFAULTS.Selection) as (keyof Omit<Selection, "selection_id">)[];

const own = (o: object, k: string): boolean => Object.prototype.hasOwnProperty.call(o, k);

function dflt(v: unknown): unknown {
  return Array.isArray(v) ? [] : v && typeof v === "object" ? { ...(v as object) } : v;
}

function fill<T extends object>(obj: Record<string, unknown>, defaults: Record<string, unknown>): T {
  const out: Record<string, unknown> = { ...obj };
  for (const [k, v] of Object.entries(defaults)) {
    if (!own(out, k) || out[k] === undefined) out[k] = dflt(v);
  }
  return out as T;
}

/** A selection from the fields present in `change` (absent ones at Selection's defaults). */
export function normaliseSelection(s: Selection | SelectionChange): BookSelection {
  return fill<BookSelection>(s as unknown as Record<string, unknown>, SCHEMA_DEFAULTS.Selection);
}

/** A served market (snapshot entry, image, REST answer) as a book market: `age_ms`/`stale`
 *  removed, absent fields at their schema defaults. */
export function normaliseMarket(m: MarketWithAge | BookMarket): BookMarket {
  const { age_ms: _a, stale: _s, ...rest } = m as MarketWithAge;
  const out = fill<BookMarket>(rest as unknown as Record<string, unknown>, SCHEMA_DEFAULTS.MarketWithAge);
  delete (out as Record<string, unknown>).age_ms;
  delete (out as Record<string, unknown>).stale;
  out.selections = (rest.selections ?? []).map(normaliseSelection);
  return out;
}

/** `current` with the fields present in `change` replaced, the others kept (a field present
 *  with `null` or `[]` replaces; only an *absent* key means "unchanged"); a new selection
 *  built from `change` when `current` is undefined (feed.models.apply_selection_change). */
export function applySelectionChange(current: BookSelection | undefined, change: SelectionChange): BookSelection {
  if (current === undefined) return normaliseSelection(change);
  const out: Record<string, unknown> = { ...current };
  const c = change as unknown as Record<string, unknown>;
  for (const f of SELECTION_FIELDS) {
    if (own(c, f) && c[f] !== undefined) out[f] = c[f];
  }
  return out as BookSelection;
}

/** Each change applied in order to the selection with its id; a change for an id not held
 *  appends a new selection; existing order kept; `current` not modified (merge_selections). */
export function mergeSelections(current: BookSelection[], changed: SelectionChange[]): BookSelection[] {
  const out = current.slice();
  const index = new Map<string, number>();
  out.forEach((s, i) => index.set(s.selection_id, i));
  for (const c of changed) {
    const i = index.get(c.selection_id);
    if (i === undefined) {
      index.set(c.selection_id, out.length);
      out.push(applySelectionChange(undefined, c));
    } else {
      out[i] = applySelectionChange(out[i], c);
    }
  }
  return out;
}

/**
 * `delta` applied to `market` — the port of `feed.models.apply_delta` (pure; returns a new
 * object, never modifies `market`):
 *
 * - `kind: "image"` → the image's market (replaces);
 * - no market held, or `delta.seq <= market.seq` (duplicate / out of order) → `market` as is
 *   (a delta never creates a market);
 * - otherwise the latency tags (`seq`, `source_ts`, `received_at`, `stored_at`,
 *   `source_ts_original`, `session`) are taken; `header`, when present, replaces every
 *   market-level field (else a non-null `traded_volume` replaces the market's volume); each
 *   entry of `selections` is applied in order ({@link mergeSelections}).
 *
 * Seq order is the caller's job (a delta whose seq is not `market.seq + 1` means a change was
 * missed, unless it is conflated): {@link Book.apply} checks it.
 */
export function applyDelta(market: BookMarket | undefined, delta: Delta): BookMarket | undefined {
  if (delta.kind === "image") return delta.market ? normaliseMarket(delta.market) : market;
  if (market === undefined || delta.seq <= market.seq) return market;
  const out: BookMarket = {
    ...market,
    seq: delta.seq,
    source_ts: delta.source_ts,
    received_at: delta.received_at,
    stored_at: delta.stored_at ?? 0,
    source_ts_original: delta.source_ts_original ?? null,
    session: delta.session ?? null,
  };
  const o = out as unknown as Record<string, unknown>;
  if (delta.header != null) {
    const h = delta.header as Record<string, unknown>;
    const defaults = SCHEMA_DEFAULTS.MarketHeader as Record<string, unknown>;
    for (const f of HEADER_FIELDS) o[f] = own(h, f) && h[f] !== undefined ? h[f] : dflt(defaults[f]);
  } else if (delta.traded_volume != null) {
    out.traded_volume = delta.traded_volume;
  }
  if (delta.selections && delta.selections.length) out.selections = mergeSelections(market.selections, delta.selections);
  return out;
}

/** The outcome of {@link Book.apply}. */
export type ApplyResult =
  | "applied"     // the market changed (or was imaged)
  | "duplicate"   // seq ≤ the held one (or an older image): nothing changed
  | "unknown"     // a delta for a market the book does not hold: ignored (the server images first)
  | "gap";        // seq > held + 1 on a non-conflated delta: NOT applied, resync

/** A book of markets with the seq rule of the README ("Seq gaps"): per market a `kind: "delta"`
 *  must carry `seq` = held + 1; lower or equal is a duplicate, higher is a gap (not applied);
 *  an image replaces the market when newer; a conflated delta may skip seqs. */
export class Book {
  readonly markets = new Map<string, BookMarket>();

  /** Replace everything with a snapshot's markets. */
  replace(markets: Iterable<MarketWithAge | BookMarket>): void {
    this.markets.clear();
    for (const m of markets) {
      const n = normaliseMarket(m);
      this.markets.set(n.market_id, n);
    }
  }

  /** Apply one delta under the seq rule; the book changes only on "applied". */
  apply(delta: Delta): ApplyResult {
    const cur = this.markets.get(delta.market_id);
    if (delta.kind === "image") {
      if (cur !== undefined && delta.seq <= cur.seq) return "duplicate";
      const next = applyDelta(cur, delta);
      if (next === undefined) return "unknown";
      this.markets.set(delta.market_id, next);
      return "applied";
    }
    if (cur === undefined) return "unknown";
    if (delta.seq <= cur.seq) return "duplicate";
    if (delta.seq !== cur.seq + 1 && !delta.conflated) return "gap";
    this.markets.set(delta.market_id, applyDelta(cur, delta)!);
    return "applied";
  }

  get(marketId: string): BookMarket | undefined {
    return this.markets.get(marketId);
  }
}
