// OddsClient: a live local book of the markets matching a filter (SSE or WebSocket), with the
// README's seq-gap rule, resume tokens, per-market age/staleness and the price check.
// The TypeScript counterpart of streaming/client.py.
import { Book, normaliseMarket, type ApplyResult, type BookMarket, type Delta } from "./book.js";
import {
  DroppedError,
  HttpError,
  OddsTimeoutError,
  OddsfeedError,
  PriceCheckError,
  SeqGapError,
  StreamError,
} from "./errors.js";
import type {
  BatchResult,
  DeltaMessage,
  EventStateMessage,
  EventStateWithAge,
  MarketList,
  MarketWithAge,
  PriceCheckRequest,
  PriceCheckResult,
  ServerMessage,
  SnapshotMessage,
  SourceList,
  StatusMessage,
} from "./schema.js";
import { SseParser } from "./sse.js";

export type Transport = "sse" | "ws";
export type OddsFormat = "decimal" | "fractional" | "american";

/** The part of the WebSocket API the client uses (the browser's, Node ≥ 22's global, or any
 *  implementation with the same shape). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;
export type FetchLike = typeof fetch;

export interface OddsClientOptions {
  /** "sse" (GET /v1/stream) or "ws" (GET /v1/ws); default by the URL's scheme (ws:// → ws). */
  transport?: Transport;
  sport?: string | string[];
  competition?: string | string[];
  /** provider event ids or canonical `ev:…` ids */
  event?: string | string[];
  market?: string | string[];
  /** canonical market types (`total`) or market keys (`total:line=2.5`) */
  market_type?: string | string[];
  in_play?: boolean;
  /** source names (as in /v1/sources) */
  source?: string | string[];
  /** bookmakers (a market without one never matches) */
  bookmaker?: string | string[];
  /** prices converted by the server; the book then holds the converted values (the generated
   *  types describe decimal odds) */
  odds_format?: OddsFormat;
  /** 0 (every change) or 10–120000: one conflated delta per market per window */
  conflate_ms?: number;
  /** heartbeat asked of the server (SSE; WS uses the query); a stream silent for 3× + 1 s is dropped. Default 2000. */
  heartbeatMs?: number;
  /** sent as X-API-Key (SSE, REST) or ?api_key= (WebSocket: browsers cannot set its headers) */
  apiKey?: string;
  /** local staleness thresholds, ms (defaults match the server's: 10000 / 60000); the in-play one
   *  applies from a market's `start_time` on even while its `in_play` is false */
  staleInPlayMs?: number;
  stalePreMatchMs?: number;
  /** reconnect backoff: full jitter between 0 and min(max, initial·2^attempt) */
  reconnectInitialMs?: number;
  reconnectMaxMs?: number;
  /** replaces the backoff: the delay (ms) before reconnect attempt `attempt` (0-based) */
  backoff?: (attempt: number) => number;
  /** uniform random numbers in [0, 1) (default Math.random): the backoff's jitter and a lag
   *  reconnect's spread ({@link LAG_RECONNECT_SPREAD_MS}); tests inject a fixed one */
  random?: () => number;
  priceCheckTimeoutMs?: number;
  connectTimeoutMs?: number;
  /** injectable platform pieces (default: globalThis.fetch / globalThis.WebSocket) */
  fetch?: FetchLike;
  WebSocket?: WebSocketConstructor;
  /** monotonic clock in ms (default performance.now) */
  now?: () => number;
  /** wall clock, ms since the epoch (default Date.now): compared with a market's `start_time` */
  wallNow?: () => number;
  /** called after each change of the book (undefined = the market left the book) */
  onUpdate?: (marketId: string, market: BookMarket | undefined) => void;
  /** called with each event state taken into {@link OddsClient.eventStates} (score, clock, period, status) */
  onEventState?: (state: EventStateWithAge) => void;
  /** called with an error a callback (`onUpdate`, `onEventState`, a listener added by `on`)
   *  threw, after it is counted in `stats.callbackErrors`; the stream goes on whatever it does.
   *  Default: `console.error`. `name`: "onUpdate", "onEventState" or "listener:<event>". */
  onCallbackError?: (name: string, error: unknown) => void;
}

export interface ClientStats {
  connects: number;
  reconnects: number;
  snapshots: number;
  deltas: number;
  duplicates: number;
  heartbeats: number;
  statuses: number;
  /** event states taken (event_state messages not older than the one held) */
  eventStates: number;
  resumedRecovered: number;
  resumedLost: number;
  gaps: number;
  resyncs: number;
  errors: number;
  /** connections dropped because {@link LAG_RECONNECT_HEARTBEATS} heartbeats in a row read
   *  lagging more than `staleInPlayMs` (each then reconnects with the backoff and resumes) */
  lagReconnects: number;
  /** exceptions thrown by callbacks (onUpdate, onEventState, listeners added by `on`): reported
   *  (option onCallbackError, default console.error) and otherwise ignored — the stream goes on */
  callbackErrors: number;
  /** wall-clock receipt − source_ts of the last delta (meaningful when clocks agree) */
  lagMs: number | null;
  lastError: string | null;
  disconnectReasons: string[];
}

export interface SourceState {
  source: string;
  state: "UP" | "DEGRADED" | "DOWN";
  reason: string | null;
}

export type ClientEventName = "connected" | "disconnected" | "snapshot" | "delta" | "event_state" | "resumed" | "status"
  | "gap" | "error";
export type ClientListener = (name: ClientEventName, detail: unknown) => void;

/** One leg of a price check (the PriceCheckRequest schema). */
export type PriceCheckLeg = PriceCheckRequest;

/** the filters GET /v1/markets takes (README "REST") */
const REST_FILTERS = new Set(["sport", "competition", "event", "market", "in_play"]);

const FATAL_STATUSES = new Set([400, 401, 403, 404, 405, 422]);

/** Heartbeats in a row arriving lagging more than `staleInPlayMs` ({@link OddsClient.streamLagMs})
 *  after which the client drops the connection and reconnects with its resume token (after the
 *  backoff): the lag estimate's least offset never forgets within a connection, so a server clock
 *  stepped back (or running slow) would otherwise read as lagging until the connection drops. */
export const LAG_RECONNECT_HEARTBEATS = 3;

/** A lag reconnect waits, on top of its backoff, a uniformly random delay in [0, this) ms: after a
 *  server clock step every client of the node sees its third lagging heartbeat on the same tick,
 *  and would otherwise reconnect together (its markets read stale either way: the stream is not
 *  live). */
export const LAG_RECONNECT_SPREAD_MS = 2000;

function csv(v: string | string[] | undefined): string | undefined {
  if (v === undefined) return undefined;
  return Array.isArray(v) ? v.join(",") : v;
}

function asSet(v: string | string[] | undefined): Set<string> | undefined {
  if (v === undefined) return undefined;
  const items = (Array.isArray(v) ? v : v.split(",")).map((x) => x.trim()).filter(Boolean);
  return items.length ? new Set(items) : undefined;
}

const defaultNow = (): number => performance.now();

/** The sports whose Betfair markets are races with their own state (race progress). */
const RACE_SPORTS = new Set(["horse_racing", "greyhound_racing"]);

/**
 * The race event id a Betfair racing market belongs to: its event (the meeting, `bf:28587288`)
 * and the HHMM of its scheduled start **in UTC** (`bf:28587288.1650`), as Betfair's race ids are
 * formed (feed.taxonomy.race_event_id). Undefined for a market that is not a Betfair horse or
 * greyhound race (another sport, an event id not starting `bf:`, no start time).
 *
 * ```ts
 * raceEventId("bf:28587288", "horse_racing", Date.UTC(2024, 4, 1, 16, 50)); // "bf:28587288.1650"
 * ```
 *
 * @param eventId the market's `event_id` (the meeting)
 * @param sport the market's `sport` (`horse_racing` or `greyhound_racing`)
 * @param startTime the market's `start_time`, ms since the epoch
 */
export function raceEventId(eventId: string | null | undefined, sport: string | null | undefined,
  startTime: number | null | undefined): string | undefined {
  if (sport == null || !RACE_SPORTS.has(sport) || startTime == null || !Number.isFinite(startTime)
    || eventId == null || !eventId.startsWith("bf:")) return undefined;
  const minute = ((Math.floor(startTime / 60_000) % 1440) + 1440) % 1440; // UTC, whatever the local zone
  const hh = String(Math.floor(minute / 60)).padStart(2, "0");
  const mm = String(minute % 60).padStart(2, "0");
  return `${eventId}.${hh}${mm}`;
}

/** The market key specifiers, in key order (feed.taxonomy.KEY_SPECIFIERS). */
const KEY_SPECIFIERS = ["period", "unit", "team", "line", "places", "ew_fraction"] as const;
const RAW = "raw:";
/** specifiers a normaliser adds for itself: never in a key (feed.taxonomy._PRIVATE) */
const PRIVATE_SPECIFIERS = new Set(["sport_key"]);
/** market types with a draw: full time is regular time in every sport (feed.taxonomy._DRAW_TYPES) */
const DRAW_TYPES = new Set(["match_result", "handicap_3way", "double_chance", "draw_no_bet", "correct_score"]);
/** the time scopes a `period` may name (feed.taxonomy._SCOPES) */
const SCOPES = new Set(["rt", "ot", "ot_pen"]);
/** sport → the scope its result covers (feed.taxonomy._FULL_TIME) */
const FULL_TIME: Record<string, string> = {
  ...Object.fromEntries(["soccer", "futsal", "handball", "rugby", "rugby_union", "rugby_league", "tennis",
    "table_tennis", "volleyball", "badminton", "darts", "snooker", "mma", "boxing"].map((s) => [s, "rt"])),
  ...Object.fromEntries(["basketball", "american_football", "baseball", "cricket"].map((s) => [s, "ot"])),
  ice_hockey: "ot_pen",
};

/**
 * The canonical market key of a market, as the server's `market_type` filter reads it
 * (feed.taxonomy.market_key): its type plus its key specifiers in a fixed order — `match_result`,
 * `total:line=2.5`, `handicap:period=1h|line=-0.25`; a `raw:` type plus every specifier but the
 * private ones, by name. A `period` that is the sport's full time is left out.
 */
export function marketKey(marketType: string | null | undefined, specifiers: Record<string, string> | null | undefined,
  sport?: string | null): string {
  const t = marketType || "raw:unknown";
  if (!specifiers || Object.keys(specifiers).length === 0) return t;
  let parts: string[];
  if (t.startsWith(RAW)) {
    parts = Object.keys(specifiers).filter((k) => !PRIVATE_SPECIFIERS.has(k))
      .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)).map((k) => `${k}=${specifiers[k]}`);
  } else {
    const period = specifiers.period;
    const full = DRAW_TYPES.has(t) ? "rt" : FULL_TIME[sport ?? ""];
    const drop = period !== undefined && SCOPES.has(period) && period === full;
    parts = KEY_SPECIFIERS.filter((k) => specifiers[k] && !(drop && k === "period")).map((k) => `${k}=${specifiers[k]}`);
  }
  return parts.length ? `${t}:${parts.join("|")}` : t;
}

/** The market type of a market key (feed.taxonomy.key_type): `total:line=2.5` → `total`,
 *  `raw:uof_8:goalnr=1` → `raw:uof_8`. */
export function keyType(key: string): string {
  if (key.startsWith(RAW)) return RAW + key.slice(RAW.length).split(":")[0];
  return key.split(":")[0];
}

/**
 * A live, local copy of the markets matching a filter, plus the price check.
 *
 * ```ts
 * const odds = new OddsClient("http://127.0.0.1:8000", { sport: "soccer" });
 * await odds.start().waitSynced(10_000);
 * ```
 *
 * The book: the first `snapshot` replaces it, each `delta` goes through {@link Book.apply}
 * (feed.models.apply_delta's rule; a gap is never applied), and `removed` drops the market: the
 * server sends it for a market that leaves the filter (a change of its sport, competition, event or
 * canonical `ev:` event, market type, in play, bookmaker; a relink; its tenant's sight), live and
 * on a resume, with the resume token of the change that moved it — the client need not judge the
 * filter itself (its local check stays as a second line). A gap resyncs at once: reconnect with
 * the token held before the gap (the server replays what followed); if that gaps again before a
 * snapshot, reconnect without a token (a fresh snapshot replaces the book). After a drop the
 * client reconnects with jittered backoff and resumes with its token (SSE `Last-Event-ID`,
 * WS `"resume"`): `resumed {recovered: true}` keeps the book; `false` → the next snapshot
 * replaces it.
 *
 * What it vouches for: while no live stream is followed — from the moment the stream drops, is
 * found silent (3 × `heartbeatMs` + 1 s), gaps or is refused, until a reconnect resumes it
 * (`resumed {recovered: true}`) or a snapshot replaces the book; while the stream lags more than
 * `staleInPlayMs` behind the server; after a fatal error or {@link OddsClient.close} —
 * {@link OddsClient.isStale} is true for every market, and heartbeats confirm nothing (ages keep
 * growing from the last confirmation). See {@link OddsClient.live}.
 *
 * The stream's lag ({@link OddsClient.streamLagMs}): a consumer slower than the feed leaves a
 * backlog in socket buffers, and every message then arrives late. Heartbeats and snapshots carry
 * the server's send time `as_of`, deltas and event states `sent_at` (a status's `as_of` is when
 * its news was worked out: not used). Per connection the client keeps the least
 * `receipt − send time` seen (receipt on the monotonic clock `now`, ms): the hosts' clock offset
 * plus the least transit. A message's lag is its own `receipt − send time` minus that least one (a
 * fixed clock skew cancels out), and a heartbeat confirms as of receipt − lag, a delta or snapshot
 * market as of receipt − lag − `age_ms`. The least offset starts over on every connection; within
 * one it never forgets, so a server clock that steps back (NTP) or runs slower than `now` reads as
 * a lag that never goes: when {@link LAG_RECONNECT_HEARTBEATS} (3) heartbeats in a row arrive
 * lagging more than `staleInPlayMs`, the client drops the connection and reconnects after the usual
 * backoff plus a random spread of up to {@link LAG_RECONNECT_SPREAD_MS} (after a server clock step
 * every client of the node lags on the same heartbeat) with its resume token
 * (`stats.lagReconnects`). The new connection measures the offset afresh (a clock step or drift is
 * cured; a real lag loses the kernel backlog and the server resumes from its log), and every
 * market reads stale until the resumed stream is live. A lag past
 * the limit takes at least `staleInPlayMs` of a connection (while the server's clock runs
 * forward), and the backoff comes between: no fast loop. The local wall clock plays no part.
 *
 * A resumed stream: the deltas the server replays carry the `sent_at` they were first sent with
 * (a genuinely slow client resumes seconds behind), so the oldest must not set the baseline (the
 * lag it had would read as none, its old price fresh). `resumed`'s `as_of` (the server's send
 * time, stamped per resume) is taken as a heartbeat's is: the first message of the resumed stream,
 * it sets the baseline and a replayed delta's lag is its real age (past `staleInPlayMs`: not live,
 * every market stale until the stream catches up). After a `resumed {recovered: true}` without
 * `as_of` (an older server) the client takes no send time until the next heartbeat and reads the
 * stream as not live until then; that heartbeat's `as_of` sets the baseline and confirms the book.
 *
 * Callbacks (`onUpdate`, `onEventState`, listeners added by {@link OddsClient.on}) run
 * synchronously once the book (or `eventStates`) is updated; an exception one throws is counted
 * (`stats.callbackErrors`), reported (option `onCallbackError`, default `console.error`) and
 * otherwise ignored: it never ends or stalls the stream.
 *
 * Event states (scores, clock, period, status): each `event_state` message updates
 * {@link OddsClient.eventStates} (by the provider event id markets carry in `event_id`) unless a
 * version at or above it from the same source is held; a snapshot clears them (the current
 * states of its events follow it, and a recovered resume). A Betfair horse or greyhound race's
 * progress is keyed by the race (`bf:<meeting>.<HHMM>`, {@link raceEventId}), not its meeting:
 * {@link OddsClient.stateOfMarket} finds either. {@link OddsClient.matchTimeS} runs a
 * running clock on locally (`seconds + (now − at) / 1000`: no message per second).
 * {@link OddsClient.isEventStateStale} follows the server's last word on each state (an
 * `event_state`'s `stale`, then each `status`'s `stale_events` of its source). A market that
 * leaves the book (`removed`, or the local filter) takes with it the states of its event and its
 * race that no market left in the book refers to (and their flags): the server sends no more of
 * them nor lists them in `stale_events`, so held they would read fresh for good. So does a market
 * that stays in the book but moves to another event or race (a delta's `header`, or an image): the
 * states it was shown with before the move.
 */
export class OddsClient {
  readonly transport: Transport;
  readonly httpUrl: string;
  readonly wsUrl: string;
  /** the book (market_id → market), kept current */
  readonly book = new Book();
  /** source → state (GET /v1/sources on connect, then `status` messages) */
  readonly sources = new Map<string, SourceState>();
  /** provider event id → its latest state (`event_state` messages), with `age_ms` / `stale` as sent
   *  (a race's state under its race id `bf:<meeting>.<HHMM>`: {@link OddsClient.stateOfMarket}) */
  readonly eventStates = new Map<string, EventStateWithAge>();
  /** the last resume token kept (opaque) */
  token: string | null = null;
  connected = false;
  synced = false;
  /** the fatal error that stopped the client, if any */
  error: OddsfeedError | null = null;
  /** the last seq gap seen */
  lastGap: SeqGapError | null = null;
  readonly stats: ClientStats = {
    connects: 0, reconnects: 0, snapshots: 0, deltas: 0, duplicates: 0, heartbeats: 0, statuses: 0, eventStates: 0,
    resumedRecovered: 0, resumedLost: 0, gaps: 0, resyncs: 0, errors: 0, lagReconnects: 0, callbackErrors: 0, lagMs: null,
    lastError: null,
    disconnectReasons: [],
  };

  private readonly opts: OddsClientOptions;
  private readonly fetchImpl: FetchLike;
  private readonly now: () => number;
  private readonly wallNow: () => number;
  private readonly confirmed = new Map<string, number>();
  private readonly flagged = new Map<string, boolean>();
  /** event id → the server's last word on its state: the `stale` of an `event_state` message, then
   *  each `status` of its source (`stale_events`) */
  private readonly esFlagged = new Map<string, boolean>();
  private readonly listeners = new Set<ClientListener>();
  private readonly waiters = new Set<() => void>();
  private readonly fSport?: Set<string>;
  private readonly fComp?: Set<string>;
  private readonly fEvent?: Set<string>;
  private readonly fMarket?: Set<string>;
  private readonly fSource?: Set<string>;
  private readonly fBook?: Set<string>;
  private readonly fMarketType?: Set<string>;
  /** this connection's least (receipt − server send time), ms; null until a message with one */
  private minOffset: number | null = null;
  /** the lag of the last message that carried a send time, ms */
  private lag = 0;
  /** heartbeats in a row (on this connection) read lagging more than `staleInPlayMs` */
  private lagBeats = 0;
  /** a `resumed {recovered: true}` without `as_of` (an older server) came and no heartbeat since:
   *  no send time is taken (the replay's deltas carry old ones) and the stream is not live */
  private awaitBeat = false;
  /** the drop {@link OddsClient.checkLag} decided on the current connection (its reconnect waits
   *  the spread too) */
  private lagDrop: DroppedError | null = null;
  /** following a live stream: set by a snapshot or a recovered resume, cleared the moment the
   *  stream ends (dropped, found silent, a gap, a fatal error, close) */
  private following = false;
  private gapResumes = 0;
  private gapMarket: string | null = null;
  private attempt = 0;
  private closing = false;
  private running: Promise<void> | null = null;
  private current: AbortController | null = null;
  private sleepCancel: (() => void) | null = null;

  constructor(url: string, options: OddsClientOptions = {}) {
    const u = new URL(url);
    const scheme = u.protocol.replace(":", "").toLowerCase();
    if (!["http", "https", "ws", "wss"].includes(scheme)) {
      throw new TypeError(`url must start with http://, https://, ws:// or wss://, not ${JSON.stringify(url)}`);
    }
    const secure = scheme === "https" || scheme === "wss";
    this.transport = options.transport ?? (scheme.startsWith("ws") ? "ws" : "sse");
    if (this.transport !== "sse" && this.transport !== "ws") {
      throw new TypeError(`transport must be "sse" or "ws", not ${JSON.stringify(this.transport)}`);
    }
    this.httpUrl = `${secure ? "https" : "http"}://${u.host}`;
    this.wsUrl = `${secure ? "wss" : "ws"}://${u.host}/v1/ws`;
    this.opts = options;
    const f = options.fetch ?? (globalThis.fetch as FetchLike | undefined);
    if (!f) throw new TypeError("no fetch: pass options.fetch");
    this.fetchImpl = f;
    this.now = options.now ?? defaultNow;
    this.wallNow = options.wallNow ?? ((): number => Date.now());
    this.fSport = asSet(options.sport);
    this.fComp = asSet(options.competition);
    const ev = asSet(options.event);
    // canonical ev:… ids name several provider events: the server filters those, not the client (a
    // market that leaves such an event comes as `removed`)
    this.fEvent = ev && ![...ev].some((e) => e.startsWith("ev:")) ? ev : undefined;
    this.fMarket = asSet(options.market);
    this.fSource = asSet(options.source);
    this.fBook = asSet(options.bookmaker);
    this.fMarketType = asSet(options.market_type);
  }

  // -- lifecycle ------------------------------------------------------------------------------

  /** Start following the stream in the background (returns this at once). */
  start(): this {
    if (!this.running && !this.closing) this.running = this.run();
    return this;
  }

  /** Stop the stream; idempotent. Resolves once the stream task has ended. */
  async close(): Promise<void> {
    this.closing = true;
    this.following = false; // every market reads stale from now on
    this.current?.abort(new DroppedError("client closed"));
    this.sleepCancel?.();
    await this.running;
    this.connected = false;
    this.notify();
  }

  /** Drop the current connection now (the client reconnects and resumes, as after a network drop). */
  reconnect(): void {
    this.current?.abort(new DroppedError("reconnect requested"));
  }

  /** Resolves once the book holds a snapshot (or a recovered resume); rejects with the fatal
   *  error that stopped the client, or OddsTimeoutError after `timeoutMs`. */
  waitSynced(timeoutMs = 10_000): Promise<void> {
    return this.waitFor(() => this.synced, timeoutMs, "synced");
  }

  /** Resolves when `predicate()` holds (checked now and after every change); rejects with the
   *  client's fatal error or OddsTimeoutError after `timeoutMs`. */
  waitFor(predicate: () => boolean, timeoutMs: number, what = "condition"): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const check = (): void => {
        let ok = false;
        try { ok = predicate(); } catch (e) { done(); reject(e); return; }
        if (ok) { done(); resolve(); }
        else if (this.error) { done(); reject(this.error); }
      };
      const timer = setTimeout(() => {
        done();
        reject(new OddsTimeoutError(`${what} not reached within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (): void => { clearTimeout(timer); this.waiters.delete(check); };
      this.waiters.add(check);
      check();
    });
  }

  /** Listen to client events (connected, disconnected, snapshot, delta, resumed, status, gap, error). */
  on(listener: ClientListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  // -- the book -------------------------------------------------------------------------------

  /** True while the client follows a live stream: since a snapshot or a recovered resume
   *  (`resumed {recovered: true}`) on the current connection, and not lagging more than
   *  `staleInPlayMs` behind the server ({@link OddsClient.streamLagMs}). False from the moment the
   *  stream drops, is found silent, gaps or is refused, while reconnecting (also once reconnected,
   *  until resumed or re-snapshotted), while it lags that much, and after a fatal error or
   *  {@link OddsClient.close}: every market then reads stale ({@link OddsClient.isStale}) and
   *  heartbeats confirm nothing (a lagging stream's confirm as of receipt − lag). */
  get live(): boolean {
    return this.following && !this.awaitBeat && this.lag <= this.staleInPlayMs();
  }

  /** How late this client reads the stream, ms: the lag of the last message that carried a server
   *  send time (`as_of` of a heartbeat or snapshot, `sent_at` of a delta or event state) — its
   *  receipt − send time, less the least such difference seen on this connection (so a fixed clock
   *  skew between the hosts cancels out). 0 before any such message; measured afresh on every
   *  connection. Past `staleInPlayMs` for {@link LAG_RECONNECT_HEARTBEATS} heartbeats in a row the
   *  client reconnects and resumes (a server clock step or drift is then measured afresh). */
  get streamLagMs(): number {
    return Math.round(this.lag);
  }

  get markets(): Map<string, BookMarket> {
    return this.book.markets;
  }

  /** Milliseconds since the market was last confirmed current: the server's `age_ms` plus the
   *  stream's lag at receipt ({@link OddsClient.streamLagMs}), plus the local (monotonic) time
   *  since; heartbeats confirm (as of their receipt − the lag) markets not flagged stale whose
   *  source is not DOWN, and only while a stream is followed: without one the age keeps growing.
   *  Undefined for a market not held. */
  ageMs(marketId: string): number | undefined {
    const t = this.confirmed.get(marketId);
    if (t === undefined) return undefined;
    return Math.max(0, Math.round(this.now() - t));
  }

  /** True when the client follows no live stream ({@link OddsClient.live} false: dropped, found
   *  silent, reconnecting and not yet resumed or re-snapshotted, lagging more than `staleInPlayMs`
   *  behind the server, fatally errored, closed), the
   *  market's source is DOWN, the server flagged it stale (snapshot, delta, status), or its age
   *  exceeds the in-play / pre-match threshold (unknown market → true). The in-play threshold
   *  (`staleInPlayMs`) applies once the market is in play or its `start_time` (ms since the epoch)
   *  is at or before the wall clock (`wallNow`) — an event that has started before its provider
   *  said so, as the server judges it. */
  isStale(marketId: string): boolean {
    const m = this.book.get(marketId);
    const age = this.ageMs(marketId);
    if (m === undefined || age === undefined || !this.live) return true;
    if (this.sources.get(m.source)?.state === "DOWN") return true;
    if (this.flagged.get(marketId)) return true;
    // in play, or its start time has come though the provider has not said so yet (the server's rule)
    const live = m.in_play || (m.start_time != null && m.start_time <= this.wallNow());
    return age > (live ? this.opts.staleInPlayMs ?? 10_000 : this.opts.stalePreMatchMs ?? 60_000);
  }

  /** The event's match time in seconds: its clock's `seconds`, plus `(nowMs − at) / 1000` while
   *  the clock runs (`nowMs`: wall clock, ms since the epoch; default Date.now()). Undefined
   *  without a state or a clock. */
  matchTimeS(eventId: string, nowMs: number = Date.now()): number | undefined {
    const clock = this.eventStates.get(eventId)?.clock;
    if (!clock) return undefined;
    if (!clock.running) return clock.seconds;
    return clock.seconds + Math.max(0, nowMs - clock.at) / 1000;
  }

  /** The state to show beside a market of the book: its race's (a Betfair horse or greyhound
   *  race: `bf:<meeting>.<HHMM>`, from the market's event and scheduled start,
   *  {@link raceEventId}) when there is one, else its event's; undefined without either (or for a
   *  market not held). Its `event_id` is the key for {@link OddsClient.matchTimeS} and
   *  {@link OddsClient.isEventStateStale}; a race's progress is in `race` (gate, leader's
   *  distance to the finish, running `order`, runners). */
  stateOfMarket(marketId: string): EventStateWithAge | undefined {
    const m = this.book.get(marketId);
    if (!m || m.event_id === null || m.event_id === undefined) return undefined;
    const race = raceEventId(m.event_id, m.sport, m.start_time);
    const es = race !== undefined ? this.eventStates.get(race) : undefined;
    return es ?? this.eventStates.get(m.event_id);
  }

  /** True when the event's state is stale: the client follows no live stream
   *  ({@link OddsClient.live} false, as for {@link OddsClient.isStale}), its source is DOWN now, or
   *  the server's last word on it says stale — the `stale` of the last `event_state` message about
   *  it, or a later `status` of its source (listed in `stale_events`: stale; not listed: fresh
   *  again). An event without a state → true. */
  isEventStateStale(eventId: string): boolean {
    const es = this.eventStates.get(eventId);
    if (!es || !this.live) return true;
    if (this.sources.get(es.source)?.state === "DOWN") return true;
    return this.esFlagged.get(eventId) ?? Boolean(es.stale);
  }

  /** Best back (or lay) price of a selection in the local book, or null. */
  best(marketId: string, selectionId: string, side: "back" | "lay" = "back"): number | null {
    const sel = this.book.get(marketId)?.selections.find((s) => s.selection_id === selectionId);
    if (!sel) return null;
    const ladder = side === "back" ? sel.back : sel.lay;
    if (ladder.length) return ladder[0][0];
    return side === "back" ? sel.price : null;
  }

  /** Markets open for betting (status OPEN), by market id. */
  openMarkets(): BookMarket[] {
    return [...this.book.markets.values()].filter((m) => m.status === "OPEN")
      .sort((a, b) => (a.market_id < b.market_id ? -1 : a.market_id > b.market_id ? 1 : 0));
  }

  /**
   * Process one server message as if it had arrived on the stream (`token`: its SSE `id:`;
   * WebSocket messages carry their own `token`). The apply API: the stream calls it for every
   * message, and tests or custom transports may call it directly. For a delta it returns what the
   * book did; a `"gap"` is not applied, its token is not kept, and the client resyncs (the
   * current connection is dropped and resumed with the token held before the gap).
   */
  handleMessage(msg: ServerMessage, token?: string | null): ApplyResult | undefined {
    const tok = token ?? (msg as { token?: string }).token ?? null;
    // as of: the receipt, less the stream's lag (what the server sent that long ago arrives now)
    let at = this.now();
    if (msg.type === "delta" || msg.type === "event_state") at -= this.noteSent(msg.sent_at, at);
    else if (msg.type === "heartbeat" || msg.type === "snapshot" || msg.type === "resumed") {
      // (an older server's resumed has no as_of, whatever the generated type says)
      const asOf = (msg as { as_of?: number | null }).as_of;
      const stamped = typeof asOf === "number" && Number.isFinite(asOf);
      // a heartbeat or a snapshot is a send time again; so is a resumed stream's first message when
      // the server stamps it (its replayed deltas keep their old sent_at)
      if (msg.type !== "resumed" || stamped) this.awaitBeat = false;
      else if (msg.recovered) this.awaitBeat = true; // no baseline before the next heartbeat: not live
      at -= this.noteSent(asOf, at);
    }
    if (msg.type === "delta") {
      const r = this.onDelta(msg, at);
      if (r !== "gap" && tok !== null) this.token = tok;
      this.notify();
      return r;
    }
    if (tok !== null) this.token = tok;
    switch (msg.type) {
      case "heartbeat":
        this.stats.heartbeats++;
        this.onHeartbeat(at, msg.held);
        this.checkLag(msg.as_of);
        break;
      case "snapshot":
        this.onSnapshot(msg, at);
        break;
      case "status":
        this.onStatus(msg);
        break;
      case "removed": // it left what the subscription sees: its filter, a relink, the tenant's sight
        this.forget(msg.market_id);
        break;
      case "event_state":
        this.onEventState(msg);
        break;
      case "resumed":
        if (msg.recovered) {
          this.stats.resumedRecovered++;
          this.synced = true; // the book is kept; the missed deltas follow
          if (!this.closing && !this.error) this.following = true;
        } else {
          this.stats.resumedLost++; // the snapshot that follows replaces the book
        }
        this.emit("resumed", msg);
        break;
      case "error":
        this.stats.errors++;
        this.emit("error", msg);
        if (msg.id === 1 && msg.code === "bad_request") {
          this.current?.abort(new StreamError(`subscribe refused: ${msg.message}`, undefined, msg.code));
        }
        break;
      default:
        break; // ack, pong
    }
    this.notify();
    return undefined;
  }

  /** The lag (ms) of a message the server sent at `sent` (its wall clock, ms) and received at `now`
   *  (monotonic ms): `now − sent` less the least such difference seen on this connection. A message
   *  without a send time (an older server) leaves the lag as it was; so does every message between a
   *  `resumed` without `as_of` and the next heartbeat (a replayed delta's `sent_at` is when it was
   *  first sent: as the baseline it would read the lag it had as none). */
  private noteSent(sent: number | undefined | null, now: number): number {
    if (typeof sent !== "number" || !Number.isFinite(sent) || this.awaitBeat) return this.lag;
    const off = now - sent;
    if (this.minOffset === null || off < this.minOffset) this.minOffset = off;
    this.lag = off - this.minOffset;
    if (this.lag <= this.staleInPlayMs()) this.lagBeats = 0; // within the limit: the count starts over
    return this.lag;
  }

  private staleInPlayMs(): number {
    return this.opts.staleInPlayMs ?? 10_000;
  }

  /** After a heartbeat: {@link LAG_RECONNECT_HEARTBEATS} in a row lagging more than `staleInPlayMs`
   *  drop the current connection (the client reconnects after the backoff and resumes with its
   *  token; the new connection measures the clock offset afresh). Without a running stream (the
   *  apply API called directly) only the count moves. */
  private checkLag(asOf: number | undefined | null): void {
    if (typeof asOf !== "number" || !Number.isFinite(asOf) || this.lag <= this.staleInPlayMs()) return;
    this.lagBeats++;
    if (this.lagBeats < LAG_RECONNECT_HEARTBEATS || !this.current || this.current.signal.aborted) return;
    this.stats.lagReconnects++;
    this.lagDrop = new DroppedError(`stream lagging ${(this.lag / 1000).toFixed(1)} s behind the server for `
      + `${this.lagBeats} heartbeats in a row (past staleInPlayMs)`);
    this.current.abort(this.lagDrop);
  }

  private onSnapshot(msg: SnapshotMessage, now: number): void {
    const old = new Set(this.book.markets.keys());
    this.book.replace(msg.markets);
    this.confirmed.clear();
    this.flagged.clear();
    this.eventStates.clear(); // a fresh start (versions restart after a wiped store): the current states follow
    this.esFlagged.clear();
    for (const m of msg.markets) {
      this.confirmed.set(m.market_id, now - (m.age_ms ?? 0));
      this.flagged.set(m.market_id, Boolean(m.stale));
    }
    this.stats.snapshots++;
    this.gapResumes = 0;
    this.synced = true;
    if (!this.closing && !this.error) this.following = true;
    this.attempt = 0;
    this.emit("snapshot", msg);
    const cb = this.opts.onUpdate;
    if (cb) {
      for (const id of old) if (!this.book.markets.has(id)) this.callback("onUpdate", cb, id, undefined);
      for (const [id, m] of this.book.markets) this.callback("onUpdate", cb, id, m);
    }
  }

  private onDelta(msg: DeltaMessage, at: number): ApplyResult {
    const id = msg.market_id;
    const cur = this.book.get(id);
    const r = this.book.apply(msg as Delta);
    if (r === "duplicate") {
      this.stats.duplicates++;
      return r;
    }
    if (r === "gap") {
      this.stats.gaps++;
      this.gapMarket = id;
      this.lastGap = new SeqGapError(id, cur!.seq, msg.seq);
      this.emit("gap", this.lastGap);
      this.current?.abort(this.lastGap);
      if (!this.current && this.running) this.pendingGap = this.lastGap; // between connections: resync on the next
      return r;
    }
    if (r === "unknown") return r;
    if (this.gapResumes && id === this.gapMarket) this.gapResumes = 0; // it flows in order again
    this.stats.deltas++;
    this.stats.lagMs = Math.max(0, Date.now() - msg.source_ts);
    const m = this.book.get(id)!;
    const cb = this.opts.onUpdate;
    if (!this.matches(m)) { // (a second line: the server sends `removed`, not this delta)
      this.forget(id, cur !== undefined, cur);
      return r;
    }
    this.confirmed.set(id, at - (msg.age_ms ?? 0));
    this.flagged.set(id, Boolean(msg.stale));
    if (cur !== undefined && (msg.header != null || msg.kind === "image") && (cur.event_id !== m.event_id
        || raceEventId(cur.event_id, cur.sport, cur.start_time) !== raceEventId(m.event_id, m.sport, m.start_time))) {
      // it moved to another event (or race) and stays in the book: the states it was shown with
      // may have no market left, and the server sends no more of them
      this.dropOrphanStates(cur);
    }
    this.emit("delta", msg);
    if (cb) this.callback("onUpdate", cb, id, m);
    return r;
  }

  private onEventState(msg: EventStateMessage): void {
    const es = msg.event_state;
    const held = this.eventStates.get(es.event_id);
    // its `stale` is the server's word as of sending, even on a state already held (resent after a
    // resume): only the same source's state is skipped, so the flag is about the held one
    this.esFlagged.set(es.event_id, Boolean(es.stale));
    if (held && held.source === es.source && (held.version ?? 0) >= (es.version ?? 0)) return;
    this.eventStates.set(es.event_id, es);
    this.stats.eventStates++;
    this.emit("event_state", es);
    const cb = this.opts.onEventState;
    if (cb) this.callback("onEventState", cb, es);
  }

  /** Drop market `id` from the book (`onUpdate(id, undefined)` when it was held and `notify`), and
   *  the states of the events it was shown with (`shown`: the market as it was before the delta
   *  that moved it out, if any) that no market left refers to. */
  private forget(id: string, notify = true, shown: BookMarket | undefined = this.book.get(id)): void {
    const held = this.book.markets.delete(id);
    this.confirmed.delete(id);
    this.flagged.delete(id);
    if (shown) this.dropOrphanStates(shown);
    const cb = this.opts.onUpdate;
    if (cb && held && notify) this.callback("onUpdate", cb, id, undefined);
  }

  /** A market left the book (or moved to another event or race: `gone` is it as it was before):
   *  drop the event states it was shown with — its event's (`event_id`)
   *  and its race's ({@link raceEventId}), as {@link OddsClient.stateOfMarket} looks them up — and
   *  their stale flags, unless a market left in the book refers to them. The server sends an
   *  event's state (and lists it in a status's `stale_events`) only to a subscription holding one of
   *  its markets: a state kept after its last market would never be updated nor flagged again, and
   *  read fresh for good. */
  private dropOrphanStates(gone: BookMarket): void {
    const eid = gone.event_id;
    if (eid === null || eid === undefined) return;
    const rid = raceEventId(eid, gone.sport, gone.start_time);
    const keys = new Set([eid, rid].filter((k): k is string =>
      k !== undefined && (this.eventStates.has(k) || this.esFlagged.has(k))));
    if (!keys.size) return;
    for (const m of this.book.markets.values()) {
      if (m.event_id !== eid) continue; // (a market refers to its event's state and its race's: same event_id)
      keys.delete(eid);
      if (rid !== undefined && keys.has(rid) && raceEventId(eid, m.sport, m.start_time) === rid) keys.delete(rid);
      if (!keys.size) return;
    }
    for (const k of keys) {
      this.eventStates.delete(k);
      this.esFlagged.delete(k);
    }
  }

  private pendingGap: SeqGapError | null = null;

  private onHeartbeat(now: number, held?: string[]): void {
    if (!this.following) return; // a reconnected stream not yet resumed (or none) confirms nothing
    // a conflated subscription's window holds these markets' changes: the heartbeat does not vouch for them
    const behind = held && held.length ? new Set(held) : undefined;
    for (const [id, m] of this.book.markets) {
      if (this.sources.get(m.source)?.state === "DOWN" || this.flagged.get(id) || behind?.has(id)) continue;
      if ((this.confirmed.get(id) ?? 0) < now) this.confirmed.set(id, now);
    }
  }

  private onStatus(msg: StatusMessage): void {
    this.stats.statuses++;
    this.sources.set(msg.source, { source: msg.source, state: msg.state, reason: msg.reason ?? null });
    const stale = new Set(msg.stale_markets ?? []);
    for (const [id, m] of this.book.markets) {
      if (m.source === msg.source) this.flagged.set(id, stale.has(id));
    }
    // every event of the source whose state is stale now: one not listed is fresh again (a server
    // before `stale_events` sends none: the flags stay as they were)
    if (msg.stale_events !== undefined) {
      const set = new Set(msg.stale_events);
      for (const [id, es] of this.eventStates) {
        if (es.source === msg.source) this.esFlagged.set(id, set.has(id));
      }
    }
    this.emit("status", msg);
  }

  private matches(m: BookMarket): boolean {
    if (this.fMarket && !this.fMarket.has(m.market_id)) return false;
    if (this.fEvent && !(m.event_id !== null && this.fEvent.has(m.event_id))) return false;
    if (this.fSport && !(m.sport !== null && this.fSport.has(m.sport))) return false;
    if (this.fComp && !(m.competition !== null && this.fComp.has(m.competition))) return false;
    if (this.fSource && !this.fSource.has(m.source)) return false;
    if (this.fBook && !(m.bookmaker !== null && this.fBook.has(m.bookmaker))) return false;
    if (this.fMarketType) { // a canonical market key (`total:line=2.5`) or its type (`total`): the server's rule
      const key = marketKey(m.market_type, m.specifiers, m.sport);
      if (!this.fMarketType.has(key) && !this.fMarketType.has(keyType(key))) return false;
    }
    return this.opts.in_play === undefined || m.in_play === this.opts.in_play;
  }

  private emit(name: ClientEventName, detail: unknown): void {
    for (const l of this.listeners) this.callback(`listener:${name}`, l, name, detail);
  }

  /** Call a user callback: an exception it throws is counted and reported, never the stream's
   *  end (the book is updated before any callback runs). */
  private callback<A extends unknown[]>(name: string, fn: (...args: A) => void, ...args: A): void {
    try {
      fn(...args);
    } catch (e) {
      this.stats.callbackErrors++;
      try {
        if (this.opts.onCallbackError) this.opts.onCallbackError(name, e);
        else console.error(`oddsfeed client: the ${name} callback threw; the book is updated and the stream goes on:`, e);
      } catch { /* the reporter's own error: nothing more to do */ }
    }
  }

  private notify(): void {
    for (const w of [...this.waiters]) w();
  }

  // -- the stream -----------------------------------------------------------------------------

  private async run(): Promise<void> {
    while (!this.closing) {
      const ctl = new AbortController();
      this.current = ctl;
      // a new connection (another path, maybe another node): its clock offset and lag measured afresh
      this.minOffset = null;
      this.lag = 0;
      this.lagBeats = 0;
      this.awaitBeat = false;
      this.lagDrop = null;
      // the moment the connection is given up (silence, gap, reconnect(), close) nothing is vouched for
      ctl.signal.addEventListener("abort", () => { this.following = false; }, { once: true });
      if (this.pendingGap) { ctl.abort(this.pendingGap); this.pendingGap = null; }
      let failure: unknown = null;
      try {
        await this.connectOnce(ctl);
        failure = new DroppedError("server closed the stream");
      } catch (e) {
        failure = e;
      }
      if (ctl.signal.aborted) failure = ctl.signal.reason;
      this.current = null;
      this.connected = this.following = false; // every market reads stale until resumed / a snapshot
      if (this.closing) break;
      if (failure instanceof StreamError) {
        this.error = failure;
        this.stats.lastError = failure.message;
        this.emit("error", failure);
        this.emit("disconnected", failure.message);
        this.notify();
        return;
      }
      const reason = failure instanceof Error ? `${failure.name}: ${failure.message}` : String(failure);
      this.synced = false;
      this.stats.reconnects++;
      this.stats.lastError = reason;
      if (this.stats.disconnectReasons.length < 100) this.stats.disconnectReasons.push(reason);
      this.emit("disconnected", reason);
      this.notify();
      if (failure instanceof SeqGapError) {
        this.stats.resyncs++;
        this.gapResumes++;
        if (this.gapResumes > 1) this.token = null; // resuming did not fill it: a fresh snapshot
        if (this.gapResumes <= 2) continue; // at once: the stream itself is fine
      }
      let delay = this.nextDelay();
      // spread: after a server clock step every client lags on the same heartbeat (stale either way)
      if (failure !== null && failure === this.lagDrop) delay += this.random() * LAG_RECONNECT_SPREAD_MS;
      await this.sleep(delay);
    }
  }

  private nextDelay(): number {
    const a = this.attempt++;
    if (this.opts.backoff) return this.opts.backoff(a);
    const initial = this.opts.reconnectInitialMs ?? 100;
    const max = this.opts.reconnectMaxMs ?? 5000;
    return this.random() * Math.min(max, initial * 2 ** Math.min(a, 30));
  }

  private random(): number {
    return (this.opts.random ?? Math.random)();
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => { this.sleepCancel = null; resolve(); }, ms);
      this.sleepCancel = () => { clearTimeout(t); this.sleepCancel = null; resolve(); };
    });
  }

  private silenceMs(): number {
    return 3 * (this.opts.heartbeatMs ?? 2000) + 1000;
  }

  private async connectOnce(ctl: AbortController): Promise<void> {
    await this.refreshSources(ctl.signal);
    if (ctl.signal.aborted) throw ctl.signal.reason;
    this.stats.connects++;
    if (this.transport === "sse") await this.runSse(ctl);
    else await this.runWs(ctl);
  }

  /** Best effort: the sources' current state (status messages only announce changes). */
  private async refreshSources(signal: AbortSignal): Promise<void> {
    try {
      const r = await this.fetchImpl(`${this.httpUrl}/v1/sources`, {
        headers: this.headers(), signal: AbortSignal.any([signal, AbortSignal.timeout(this.opts.connectTimeoutMs ?? 5000)]),
      });
      if (r.ok) {
        const body = (await r.json()) as SourceList;
        for (const s of body.sources) this.sources.set(s.source, { source: s.source, state: s.state ?? "UP", reason: s.reason ?? null });
      } else {
        await r.body?.cancel();
      }
    } catch { /* best effort */ }
  }

  private headers(): Record<string, string> {
    return this.opts.apiKey ? { "X-API-Key": this.opts.apiKey } : {};
  }

  /** The filter as the server takes it (WS subscribe `filter`). */
  filterSpec(): Record<string, string | boolean> {
    const o = this.opts;
    const out: Record<string, string | boolean> = {};
    for (const [k, v] of [["sport", csv(o.sport)], ["competition", csv(o.competition)], ["event", csv(o.event)],
      ["market", csv(o.market)], ["market_type", csv(o.market_type)], ["source", csv(o.source)],
      ["bookmaker", csv(o.bookmaker)]] as const) {
      if (v !== undefined) out[k] = v;
    }
    if (o.in_play !== undefined) out.in_play = o.in_play;
    return out;
  }

  private async runSse(ctl: AbortController): Promise<void> {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(this.filterSpec())) q.set(k, String(v));
    q.set("heartbeat_ms", String(this.opts.heartbeatMs ?? 2000));
    if (this.opts.conflate_ms !== undefined) q.set("conflate_ms", String(this.opts.conflate_ms));
    if (this.opts.odds_format !== undefined) q.set("odds_format", this.opts.odds_format);
    const headers: Record<string, string> = { Accept: "text/event-stream", ...this.headers() };
    if (this.token) headers["Last-Event-ID"] = this.token;
    const connectTimer = setTimeout(() => ctl.abort(new DroppedError(
      `no answer within ${this.opts.connectTimeoutMs ?? 5000} ms`)), this.opts.connectTimeoutMs ?? 5000);
    let resp: Response;
    try {
      resp = await this.fetchImpl(`${this.httpUrl}/v1/stream?${q}`, { headers, signal: ctl.signal });
    } finally {
      clearTimeout(connectTimer);
    }
    if (resp.status !== 200 || !resp.body) {
      const text = (await resp.text().catch(() => "")).slice(0, 500);
      let code: string | undefined;
      try { code = JSON.parse(text).error; } catch { /* not JSON */ }
      const msg = `GET /v1/stream answered ${resp.status}: ${text}`;
      if (FATAL_STATUSES.has(resp.status)) throw new StreamError(msg, resp.status, code);
      throw new DroppedError(msg);
    }
    this.connected = true;
    this.emit("connected", "sse");
    this.notify();
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    const silence = this.silenceMs();
    let timer = setTimeout(() => ctl.abort(new DroppedError(`no message for ${silence} ms`)), silence);
    const onAbort = (): void => { reader.cancel(ctl.signal.reason).catch(() => undefined); };
    ctl.signal.addEventListener("abort", onAbort, { once: true });
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || ctl.signal.aborted) break;
        clearTimeout(timer);
        timer = setTimeout(() => ctl.abort(new DroppedError(`no message for ${silence} ms`)), silence);
        for (const ev of parser.push(decoder.decode(value, { stream: true }))) {
          if (ctl.signal.aborted) break;
          if (ev.data === "") { if (ev.id !== undefined) this.token = ev.id; continue; }
          this.handleMessage(JSON.parse(ev.data) as ServerMessage, ev.id);
        }
        if (ctl.signal.aborted) break;
      }
    } finally {
      clearTimeout(timer);
      ctl.signal.removeEventListener("abort", onAbort);
    }
    if (ctl.signal.aborted) throw ctl.signal.reason;
    throw new DroppedError("server closed the stream");
  }

  private runWs(ctl: AbortController): Promise<void> {
    const Ctor = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      return Promise.reject(new StreamError("no WebSocket implementation: pass options.WebSocket (Node < 22)"));
    }
    const q = new URLSearchParams({ heartbeat_ms: String(this.opts.heartbeatMs ?? 2000) });
    if (this.opts.apiKey) q.set("api_key", this.opts.apiKey);
    return new Promise<void>((resolve, reject) => {
      let ws: WebSocketLike;
      try {
        ws = new Ctor(`${this.wsUrl}?${q}`);
      } catch (e) {
        reject(e);
        return;
      }
      const silence = this.silenceMs();
      const connectMs = this.opts.connectTimeoutMs ?? 5000;
      let timer = setTimeout(() => ctl.abort(new DroppedError(`no WebSocket open within ${connectMs} ms`)), connectMs);
      let settled = false;
      const finish = (err: unknown): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ctl.signal.removeEventListener("abort", onAbort);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try { ws.close(1000); } catch { /* already closed */ }
        reject(err);
      };
      const onAbort = (): void => finish(ctl.signal.reason);
      ctl.signal.addEventListener("abort", onAbort, { once: true });
      if (ctl.signal.aborted) { onAbort(); return; }
      const rearm = (): void => {
        clearTimeout(timer);
        timer = setTimeout(() => ctl.abort(new DroppedError(`no message for ${silence} ms`)), silence);
      };
      ws.onopen = () => {
        const sub: Record<string, unknown> = { op: "subscribe", id: 1, filter: this.filterSpec() };
        if (this.token) sub.resume = this.token;
        if (this.opts.conflate_ms !== undefined) sub.conflate_ms = this.opts.conflate_ms;
        if (this.opts.odds_format !== undefined) sub.odds_format = this.opts.odds_format;
        ws.send(JSON.stringify(sub));
        this.connected = true;
        this.emit("connected", "ws");
        this.notify();
        rearm();
      };
      ws.onmessage = (ev) => {
        if (settled) return;
        rearm();
        const d = ev.data;
        const text = typeof d === "string" ? d : new TextDecoder().decode(d as ArrayBuffer | Uint8Array);
        try {
          this.handleMessage(JSON.parse(text) as ServerMessage);
        } catch (e) {
          ctl.abort(e);
        }
      };
      ws.onerror = () => { /* the close event follows */ };
      ws.onclose = (ev) => {
        const why = `${ev.code} ${ev.reason ?? ""}`.trim();
        if (ev.code === 1008) finish(new StreamError(`websocket closed: ${why}`, undefined, "unauthorized"));
        else finish(new DroppedError(`websocket closed (${why})`));
      };
    }).then(() => undefined, (e) => { throw e; });
  }

  // -- REST -----------------------------------------------------------------------------------

  private async getJson<T>(path: string, timeoutMs: number): Promise<T> {
    let r: Response;
    try {
      r = await this.fetchImpl(`${this.httpUrl}${path}`, { headers: this.headers(), signal: AbortSignal.timeout(timeoutMs) });
    } catch (e) {
      if ((e as Error)?.name === "TimeoutError") throw new OddsTimeoutError(`GET ${path}: no answer within ${timeoutMs} ms`);
      throw new HttpError(`GET ${path} failed: ${(e as Error)?.message ?? e}`);
    }
    const text = await r.text();
    if (r.status !== 200) {
      let code: string | undefined;
      let message = text.slice(0, 200);
      try { const j = JSON.parse(text); code = j.error; message = j.message ?? message; } catch { /* not JSON */ }
      throw new HttpError(`GET ${path} answered ${r.status} ${code ?? ""}: ${message}`, r.status, code);
    }
    return JSON.parse(text) as T;
  }

  /** GET /v1/markets with this client's filter (those of its filters REST takes: sport,
   *  competition, event, market, in_play) or `query`: the served markets. */
  async fetchMarkets(query?: Record<string, string>, timeoutMs = 5000): Promise<MarketList> {
    const q = new URLSearchParams(query ?? Object.fromEntries(
      Object.entries(this.filterSpec()).filter(([k]) => REST_FILTERS.has(k)).map(([k, v]) => [k, String(v)])));
    return this.getJson<MarketList>(`/v1/markets${q.size ? `?${q}` : ""}`, timeoutMs);
  }

  /** GET /v1/markets/{id}; HttpError (404 unknown_market) when unknown. */
  fetchMarket(marketId: string, timeoutMs = 5000): Promise<MarketWithAge> {
    return this.getJson<MarketWithAge>(`/v1/markets/${encodeURIComponent(marketId)}`, timeoutMs);
  }

  /** A served market as the book holds it (age_ms/stale dropped, defaults filled). */
  static asBookMarket(m: MarketWithAge): BookMarket {
    return normaliseMarket(m);
  }

  // -- price check ----------------------------------------------------------------------------

  /** POST /v1/price-check: the server's answer (accepted, reason: OK | PRICE_CHANGED | STALE …).
   *  Throws PriceCheckError on a non-200 answer, a timeout (`priceCheckTimeoutMs`) or a transport
   *  error. */
  async priceCheck(marketId: string, selectionId: string, side: "back" | "lay", price: number,
    extra: Partial<Pick<PriceCheckRequest, "max_age_ms" | "accept_better" | "version">> = {}): Promise<PriceCheckResult> {
    const body = omitUndefined({ market_id: marketId, selection_id: selectionId, side, price, ...extra });
    return (await this.post("/v1/price-check", body)) as PriceCheckResult;
  }

  /** POST /v1/price-check with any leg (also the best-price form: event, market, outcome). */
  async priceCheckLeg(leg: PriceCheckLeg): Promise<PriceCheckResult> {
    return (await this.post("/v1/price-check", omitUndefined(leg))) as PriceCheckResult;
  }

  /** POST /v1/price-check/batch: every leg of a multiple against one consistent view;
   *  `accepted` only when all legs are. */
  async priceCheckBatch(legs: PriceCheckLeg[]): Promise<BatchResult> {
    return (await this.post("/v1/price-check/batch", { legs: legs.map(omitUndefined) })) as BatchResult;
  }

  private async post(path: string, body: unknown): Promise<unknown> {
    // No side effects: a connection the server closed as it was reused is retried once, inside
    // the same total deadline; anything else is the caller's decision.
    const timeoutMs = this.opts.priceCheckTimeoutMs ?? 1000;
    const signal = AbortSignal.timeout(timeoutMs);
    const init: RequestInit = {
      method: "POST", body: JSON.stringify(body), signal,
      headers: { "Content-Type": "application/json", ...this.headers() },
    };
    let r: Response;
    try {
      try {
        r = await this.fetchImpl(`${this.httpUrl}${path}`, init);
      } catch (e) {
        if (signal.aborted || (e as Error)?.name !== "TypeError") throw e;
        r = await this.fetchImpl(`${this.httpUrl}${path}`, init);
      }
      const text = await r.text();
      if (r.status !== 200) {
        let code: string | undefined;
        let message: string | undefined;
        let retryAfterMs: number | undefined;
        try {
          const j = JSON.parse(text);
          code = j.error; message = j.message;
          if (typeof j.retry_after_ms === "number") retryAfterMs = j.retry_after_ms;
        } catch { /* not JSON */ }
        throw new PriceCheckError(`${r.status} ${code ?? ""}: ${message ?? text.slice(0, 200)}`, r.status, code, message,
                                  retryAfterMs);
      }
      return JSON.parse(text);
    } catch (e) {
      if (e instanceof PriceCheckError) throw e;
      if (signal.aborted) throw new PriceCheckError(`no answer within ${timeoutMs} ms`, undefined, "timeout");
      throw new PriceCheckError(`price check failed: ${(e as Error)?.message ?? e}`, undefined, "network");
    }
  }
}

function omitUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined && v !== null)) as T;
}
