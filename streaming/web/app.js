/* oddsfeed live odds board: plain JavaScript, EventSource, no build step.
 *
 * The book is rebuilt exactly as the Python client (streaming/client.py) and
 * feed.models.apply_delta do it:
 *   snapshot            → replaces the whole book
 *   delta kind "image"  → replaces the market
 *   delta kind "delta"  → skipped when seq <= the held seq; a seq past the held
 *                         seq + 1 (not "conflated") means a change was missed:
 *                         not applied, the stream restarts from a fresh
 *                         snapshot (stats.gaps / stats.resyncs); otherwise seq
 *                         and latency tags are taken, "header" replaces every
 *                         market-level field (else "traded_volume" updates the
 *                         market's volume) and each entry of "selections", in
 *                         order, replaces only the fields it carries of the
 *                         selection with that id (an absent field, e.g. an
 *                         unchanged "lay", is kept; "back": [] means nothing
 *                         offered); an id not held is appended, absent fields
 *                         at the defaults of feed.models.Selection
 *   resumed             → recovered:false is followed by a snapshot (replace)
 *   removed             → the market left what the stream sees (its filter — the server says it
 *                         for every key, a relink out of a canonical event included —, or the
 *                         credential's tenant's sight): dropped
 *   event_state         → the event's score, period, clock and status (keyed by the provider
 *                         event id the markets carry in event_id): kept unless a version at or
 *                         above it from the same source is held; a snapshot clears them (the
 *                         current states of its events follow it). Shown beside the event's
 *                         odds; a running clock is extrapolated in the page (seconds + (now −
 *                         at) / 1000, ticking once a second: the server sends no message per
 *                         second); marked stale as a market is: no live stream (the list's
 *                         scores come from it alone), its source DOWN, or the server's last
 *                         word on the state says stale — the event_state's own "stale", then
 *                         each status of its source ("stale_events": every event of that
 *                         source whose state is stale now; one not listed is fresh again).
 *                         A Betfair horse/greyhound race's state (race progress) is keyed by
 *                         the race, bf:<meeting event id>.<HHMM of its scheduled start, UTC>
 *                         (raceEventId, feed.taxonomy.race_event_id's rule), and shown on each
 *                         market of that race: a line under the market's head (status, running
 *                         time run on as the match clock is, the leader's last gate and metres
 *                         to go) and each runner's position (race.order, leader first) before
 *                         its name; marked stale as the score is. A market that leaves the
 *                         book (removed) takes with it the states of its event and its race that
 *                         no market left refers to (the server sends no more of them, nor lists
 *                         them in stale_events: held, they would read fresh for good); so does
 *                         one that stays but moves to another event or race (a delta's header,
 *                         or an image): the states it was shown with before the move.
 *
 * Ages and staleness are recomputed in the page like the Python client does:
 * a market is confirmed when a message about it arrives (minus the age the
 * server reported, minus the stream's lag) and by each heartbeat (minus the
 * stream's lag) while its source is not DOWN and the server has not flagged
 * it stale; stale = no live stream (not connected; or (re)opened and not yet
 * resumed (recovered) nor snapshotted, state.syncing: until then the book is
 * from before the gap, and the page does not say "live"; or lagging more than
 * the in-play limit behind the server), or source DOWN, or flagged by the
 * server (snapshot / delta / status), or older than 10 s in play / 60 s
 * pre-match (?stale_in_play_ms= / ?stale_pre_match_ms= change these; in
 * play = in_play, or start_time reached on this browser's clock).
 *
 * The stream's lag (state.streamLagMs): a page that cannot keep up reads
 * what the server sent a while ago. Heartbeats and snapshots carry the
 * server's send time (as_of), deltas and event states theirs (sent_at); per
 * connection the page keeps the least (performance.now() at receipt − send
 * time) seen — the clocks' offset plus the least transit — and a message's
 * lag is its own receipt − send time less that least one (a fixed clock skew
 * cancels out). A heartbeat confirms as of receipt − lag, a delta as of
 * receipt − lag − age_ms; the least offset starts over on every (re)opened
 * stream. Within one it never forgets, so a server clock that steps back
 * (NTP) or runs slower than the page's reads as a lag that never goes: when
 * LAG_RECONNECT_HEARTBEATS (3) heartbeats in a row arrive lagging more than
 * the in-play limit, the page closes the stream and, after the reconnect
 * backoff (retryMs, doubling up to 10 s), opens it again with its resume
 * token (state.stats.lagReconnects). The new stream measures the offset
 * afresh (a clock step or drift is cured; a real lag loses the browser's
 * backlog and the server resumes from its log); every price reads stale
 * until that stream is resumed (resumed recovered: true) or snapshotted
 * (state.resuming). A lag past the limit takes at least the limit's time on
 * a stream (while the server's clock runs forward): no fast loop. The reopen
 * waits a random spread of up to LAG_RECONNECT_SPREAD_MS on top of the backoff
 * (after a server clock step every page lags on the same heartbeat: they do
 * not all come back at once), and every reopen after an error is jittered.
 * A resumed stream: the deltas the server replays carry the sent_at they were
 * first sent with, so the oldest must not set the baseline (the lag it had
 * would read as none, its old price fresh). "resumed"'s as_of (the server's
 * send time, stamped per resume) is taken as a heartbeat's is: the resumed
 * stream's first message, it sets the baseline, and a replayed delta's lag is
 * its real age. After a resumed (recovered) without as_of (an older server) the
 * page takes no send time until the next heartbeat and reads every price stale
 * until then (state.awaitBeat); that heartbeat sets the baseline.
 * A delta the page cannot read (not JSON, or not applicable) is a
 * change missed of a market it cannot name: its resume token is not taken and
 * the stream starts over from a fresh snapshot, as on a seq gap.
 *
 * Query parameters of the page: sport=, in_play=true|false (initial filters),
 * api_key= (passed on to /v1 when the server requires one), event_refresh_ms=
 * (how often the event page re-reads its event; 5000).
 *
 * The event page (#/event/<id>: a canonical ev:… id, or a provider event id,
 * which the API resolves to its canonical event) shows every book of one
 * real match side by side. It computes nothing of its own — grouping, best,
 * best lay, fair price and exclusions are the server's (streaming/aggregate.py):
 *   GET /v1/events/<id>?view=best  → the header, the members and the grid:
 *                                    canonical markets × outcomes × books, each
 *                                    cell naming its market_id / selection_id;
 *                                    fetched on open, when a market, selection
 *                                    or canonical market not in the grid shows
 *                                    up, and every 5 s (members, server ages;
 *                                    a grid market the stream did not deliver,
 *                                    e.g. a book linked later, restarts it)
 *   /v1/stream?event=<ev:…>        → the book stream above, narrowed to the
 *                                    event: every book's price as it moves
 *                                    (same snapshot/delta rules, same flashes)
 *   /v1/stream?view=best&event=…   → best / best lay / fair / excluded books
 *                                    per outcome, sent when they change
 * Per canonical market the newer server answer (as_of) gives best / fair /
 * exclusions: the best stream's last message, or the last GET (the stream
 * says nothing when the linker re-links books). A change of the shown best
 * price or its book flashes the new best cell (flash-up / flash-down).
 * A market group the best stream says left the event (an entry with
 * removed: true — a relink, a corrected line, retention — or a best snapshot
 * that does not list it: a snapshot replaces everything held) leaves the page
 * at once, grid and fetched values alike; a GET read before that is not
 * shown for it (only a newer GET, or the stream sending it whole, brings it
 * back).
 * A cell's age is the server's (age_ms of the last message or fetch about its
 * market), ticking in the page; greyed cells are those the server left out of
 * best and fair (stale / suspended / closed / no price; the reason is the
 * cell's tooltip).
 * The header shows the score, period, running clock, red cards and a stale
 * marker (the list cards' rendering): the GET's "state" on load, then the
 * freshest not stale state among the event's members (the GET's "states",
 * kept current by the live event_state messages of the member provider
 * events), turned round to the canonical home/away as the GET says.
 */
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const API_KEY = params.get("api_key");
  const STALE_IN_PLAY_MS = Number(params.get("stale_in_play_ms")) || 10000;
  const STALE_PRE_MATCH_MS = Number(params.get("stale_pre_match_ms")) || 60000;
  const HEARTBEAT_MS = 1000;
  const SOURCES_POLL_MS = 3000;
  const FLASH_MS = 1500;
  // heartbeats in a row lagging past the in-play limit after which the stream is reopened (resumed)
  const LAG_RECONNECT_HEARTBEATS = 3;
  // a reopen for lagging waits a random delay in [0, this) ms on top of its backoff: after a server
  // clock step every page of the node lags on the same heartbeat (its prices read stale either way)
  const LAG_RECONNECT_SPREAD_MS = 2000;
  const CLOSED = new Set(["CLOSED", "SETTLED", "CANCELLED"]);
  const SUSPENDED = new Set(["SUSPENDED", "INACTIVE"]);

  const state = {
    authRequired: false,  // /v1 answered 401: the banner asks for an API key
    markets: new Map(),    // market_id → market (the wire JSON, without age_ms / stale)
    confirmed: new Map(),  // market_id → performance.now() of the last confirmation
    flagged: new Map(),    // market_id → the server said stale
    sources: new Map(),    // source → {state, reason}
    eventStates: new Map(), // provider event id → its latest event state (with age_ms / stale as sent)
    esFlagged: new Map(),  // provider event id → the server said its state is stale (event_state, then status)
    token: null,
    minOffset: null,       // this connection's least (performance.now() at receipt − server send time), ms
    streamLagMs: 0,        // the lag of the last message that carried a server send time (as_of / sent_at)
    lagBeats: 0,           // heartbeats in a row (this connection) read lagging more than the in-play limit
    resuming: false,       // reopened for lagging: nothing vouched for until resumed (recovered) or snapshotted
    syncing: false,        // the stream (re)opened, not yet resumed (recovered) nor snapshotted: the book is from
                           // before the gap (or empty), nothing vouched for until then
    awaitBeat: false,      // resumed (recovered) without as_of (an older server): no send time, not live, until a heartbeat
    snapshotOf: -1,        // the stream (streamGen) whose snapshot the book holds
    connected: false,
    filter: { sport: params.get("sport") || "all", play: playFromParam(params.get("in_play")) },
    stats: { snapshots: 0, deltas: 0, duplicates: 0, heartbeats: 0, statuses: 0, eventStates: 0, removed: 0,
             resumedRecovered: 0,
             resumedLost: 0, silences: 0, flashes: 0, renders: 0, errors: 0, skipped: 0, gaps: 0, resyncs: 0,
             lagReconnects: 0, lagMs: null },
  };

  function playFromParam(v) {
    if (v === "true" || v === "1") return "live";
    if (v === "false" || v === "0") return "upcoming";
    return "all";
  }

  function withKey(url) {
    if (!API_KEY) return url;
    return url + (url.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(API_KEY);
  }

  // -- the book (mirror of feed.models.apply_delta) --------------------------------

  /** A new selection's fields before a delta's entry is applied (feed.models.Selection's defaults). */
  function selectionDefaults() {
    return { selection_id: null, name: null, handicap: 0.0, status: "ACTIVE", price: null, back: [], lay: [],
             ltp: null, traded_volume: null, max_stake: null, sort_priority: null, adjustment_factor: null,
             bsp: null, price_raw: null, outcome: null };
  }

  /** Apply a delta's selection changes in order (feed.models.merge_selections): each
   *  replaces only the fields it carries; current is not modified. */
  function mergeSelections(current, changed) {
    const out = current.slice();
    const index = new Map(out.map((s, i) => [s.selection_id, i]));
    for (const c of changed) {
      const i = index.get(c.selection_id);
      if (i === undefined) {
        index.set(c.selection_id, out.length);
        out.push(Object.assign(selectionDefaults(), c));
      } else {
        out[i] = Object.assign({}, out[i], c);
      }
    }
    return out;
  }

  function stripAge(m) {
    const copy = Object.assign({}, m);
    delete copy.age_ms;
    delete copy.stale;
    return copy;
  }

  function applyDelta(market, d) {
    if (d.kind === "image") return stripAge(d.market);
    if (!market || d.seq <= market.seq) return market;
    const m = Object.assign({}, market, {
      seq: d.seq,
      source_ts: d.source_ts,
      received_at: d.received_at,
      stored_at: d.stored_at === undefined ? 0 : d.stored_at,
      source_ts_original: d.source_ts_original === undefined ? null : d.source_ts_original,
    });
    if (d.header) Object.assign(m, d.header);
    else if (d.traded_volume !== undefined && d.traded_volume !== null) m.traded_volume = d.traded_volume;
    if (d.selections && d.selections.length) m.selections = mergeSelections(m.selections || [], d.selections);
    return m;
  }

  // -- staleness ---------------------------------------------------------------------

  function ageMs(id, now) {
    const t = state.confirmed.get(id);
    return t === undefined ? null : Math.max(0, Math.round((now === undefined ? performance.now() : now) - t));
  }

  function sourceDown(source) {
    const s = state.sources.get(source);
    return !!s && s.state === "DOWN";
  }

  /** The lag (ms) of a message the server sent at `sent` (its clock, ms) and the page received at
   *  `now` (performance.now()): now − sent, less the least such difference on this connection. A
   *  message without a send time (an older server) leaves the lag as it was. */
  function noteSent(sent, now) {
    // (between a resumed without as_of and the next heartbeat: a replayed delta's sent_at is when it
    // was first sent, and as the baseline it would read the lag it had as none)
    if (typeof sent !== "number" || !isFinite(sent) || state.awaitBeat) return state.streamLagMs;
    const off = now - sent;
    if (state.minOffset === null || off < state.minOffset) state.minOffset = off;
    state.streamLagMs = off - state.minOffset;
    if (state.streamLagMs <= STALE_IN_PLAY_MS) state.lagBeats = 0;  // within the limit: the count starts over
    return state.streamLagMs;
  }

  function resetLag() {
    state.minOffset = null;
    state.streamLagMs = 0;
    state.lagBeats = 0;
    state.awaitBeat = false;
  }

  /** Following a live stream: connected, resumed (recovered) or snapshotted since it (re)opened
   *  (the book held across a reopen is from before the gap until then), its lag measurable (after
   *  an older server's resumed without as_of: from the next heartbeat on), and not lagging more
   *  than the in-play limit behind the server. */
  function streamLive() {
    return state.connected && !state.resuming && !state.syncing && !state.awaitBeat
      && state.streamLagMs <= STALE_IN_PLAY_MS;
  }

  function isStale(id, now) {
    const m = state.markets.get(id);
    const age = ageMs(id, now);
    if (!m || age === null) return true;
    if (!streamLive()) return true;  // nothing confirms a price while the stream is down or far behind
    if (sourceDown(m.source) || state.flagged.get(id)) return true;
    // in play, or its start time (ms since the epoch) has come though the provider has not said so yet
    const live = m.in_play || (m.start_time != null && m.start_time <= Date.now());
    return age > (live ? STALE_IN_PLAY_MS : STALE_PRE_MATCH_MS);
  }

  // -- messages ------------------------------------------------------------------------

  const dirty = new Set();
  let structureDirty = true;

  function onSnapshot(msg) {
    let now = performance.now();
    state.awaitBeat = false;  // a send time again
    now -= noteSent(msg.as_of, now);  // as of: the receipt, less the stream's lag
    state.markets.clear();
    state.confirmed.clear();
    state.flagged.clear();
    state.eventStates.clear();  // a fresh start: the current states of its events follow the snapshot
    state.esFlagged.clear();
    for (const raw of msg.markets) {
      state.markets.set(raw.market_id, stripAge(raw));
      state.confirmed.set(raw.market_id, now - (raw.age_ms || 0));
      state.flagged.set(raw.market_id, !!raw.stale);
      evSeen(raw, now);
    }
    state.stats.snapshots += 1;
    state.snapshotOf = streamGen;
    if (state.resuming || state.syncing) {  // the (re)opened stream starts over from this snapshot: live again
      state.resuming = state.syncing = false;
      if (state.connected) setConnected(true, "live");
    }
    structureDirty = true;
    schedule();
  }

  function onDelta(d) {
    let at = performance.now();
    at -= noteSent(d.sent_at, at);  // as of: the receipt, less the stream's lag
    const cur = state.markets.get(d.market_id);
    if (cur && d.seq <= cur.seq) {  // a duplicate (e.g. replayed around a resume)
      state.stats.duplicates += 1;
      return;
    }
    if (cur && d.kind === "delta" && !d.conflated && d.seq !== cur.seq + 1) {
      // a change was missed: this delta only says what changed since seq - 1, so applying it
      // would show a wrong price as fresh; start over from a fresh snapshot instead
      state.stats.gaps += 1;
      state.stats.resyncs += 1;
      restartStream();
      return;
    }
    const next = applyDelta(cur, d);
    if (!next) return;  // a delta never creates a market (the server sends an image first)
    state.stats.deltas += 1;
    state.stats.lagMs = Math.max(0, Date.now() - d.source_ts);
    lagWindow.push(state.stats.lagMs);
    if (lagWindow.length > 200) lagWindow.shift();
    rateWindow.push(performance.now());
    noteFlashes(cur, next);
    if (!cur || cur.in_play !== next.in_play || cur.event_id !== next.event_id || cur.sport !== next.sport
        || cur.status !== next.status && (CLOSED.has(cur.status) || CLOSED.has(next.status))) {
      structureDirty = true;
    }
    state.markets.set(d.market_id, next);
    state.confirmed.set(d.market_id, at - (d.age_ms || 0));
    state.flagged.set(d.market_id, !!d.stale);
    if (cur && (d.header || d.kind === "image") && (cur.event_id !== next.event_id || raceEventId(cur.event_id, cur.sport, cur.start_time)
        !== raceEventId(next.event_id, next.sport, next.start_time))) {
      // it moved to another event (or race) and stays in the book: the states it was shown with
      // may have no market left, and the server sends no more of them
      dropOrphanStates(cur);
      structureDirty = true;
    }
    evSeen(next, at, d.age_ms || 0);
    dirty.add(d.market_id);
    schedule();
  }

  /** An event's state (score, period, clock, status): the newest version per event is kept. */
  function onEventState(msg) {
    noteSent(msg.sent_at, performance.now());
    const es = msg.event_state;
    if (!es || !es.event_id) return;
    const held = state.eventStates.get(es.event_id);
    // its stale is the server's word as of sending, even on a state already held (resent after a resume)
    const wasStale = state.esFlagged.get(es.event_id);
    state.esFlagged.set(es.event_id, !!es.stale);
    if (held && held.source === es.source && (held.version || 0) >= (es.version || 0)) {
      if (wasStale !== !!es.stale) { renderScores(es.event_id); raceStateChanged(es.event_id); renderEventScore(); }
      return;
    }
    state.eventStates.set(es.event_id, es);
    state.stats.eventStates += 1;
    renderScores(es.event_id);
    raceStateChanged(es.event_id);
    if (route.event !== null && evNoteState(es, false)) renderEventScore();
  }

  /** The market left what the stream sees (its filter, a relink, the tenant's sight): drop it, and
   *  the states of its events no market left refers to (dropOrphanStates). */
  function onRemoved(msg) {
    const gone = state.markets.get(msg.market_id);
    if (!gone) return;
    state.markets.delete(msg.market_id);
    state.confirmed.delete(msg.market_id);
    state.flagged.delete(msg.market_id);
    dropOrphanStates(gone);
    state.stats.removed += 1;
    structureDirty = true;
    schedule();
  }

  /** A market left the book: drop the event states it was shown with — its event's (event_id) and
   *  its race's (raceEventId) — and their stale flags, unless a market left in the book refers to
   *  them. The server sends an event's state (and lists it in a status's stale_events) only to a
   *  stream holding one of its markets: a state kept after its last market would never be updated
   *  nor flagged again, and read fresh for good. (An event page's member states are the GET's: a
   *  member's flag stays while it is one.) */
  function dropOrphanStates(gone) {
    const eid = gone.event_id;
    if (eid === null || eid === undefined) return;
    const rid = raceEventId(eid, gone.sport, gone.start_time);
    const keys = new Set([eid, rid].filter((k) => k !== null && k !== undefined
      && (state.eventStates.has(k) || state.esFlagged.has(k))));
    if (!keys.size) return;
    for (const m of state.markets.values()) {
      if (m.event_id !== eid) continue;  // (a market refers to its event's state and its race's: same event_id)
      keys.delete(eid);
      if (rid !== null && rid !== undefined && keys.has(rid) && raceEventId(eid, m.sport, m.start_time) === rid) {
        keys.delete(rid);
      }
      if (!keys.size) return;
    }
    for (const k of keys) {
      state.eventStates.delete(k);
      if (!evp.memberStates.has(k)) state.esFlagged.delete(k);
    }
  }

  /** resumed: recovered → the book is kept and the missed deltas follow (live again after a reopen
   *  for lagging); not recovered → the snapshot that follows replaces the book. Its as_of (the
   *  server's send time for this resume) sets the resumed stream's baseline; without one (an older
   *  server) nothing is live until the next heartbeat (state.awaitBeat). */
  function onResumed(msg) {
    const stamped = typeof msg.as_of === "number" && isFinite(msg.as_of);
    if (stamped) state.awaitBeat = false;
    else if (msg.recovered) state.awaitBeat = true;
    noteSent(msg.as_of, performance.now());
    if (msg.recovered) {
      state.stats.resumedRecovered += 1;
      if (state.resuming || state.syncing) {  // the book is caught up from here on: live again
        state.resuming = state.syncing = false;
        if (state.connected) setConnected(true, "live");
      }
    } else {
      state.stats.resumedLost += 1;  // the snapshot that follows replaces the book
    }
  }

  function onHeartbeat(msg) {
    state.stats.heartbeats += 1;
    let now = performance.now();
    state.awaitBeat = false;  // a send time again (after an older server's resumed: the baseline)
    now -= noteSent(msg && msg.as_of, now);  // what the server vouched for then: the receipt less the lag
    if (msg && typeof msg.as_of === "number" && state.streamLagMs > STALE_IN_PLAY_MS) state.lagBeats += 1;
    if (state.resuming || state.syncing) return;  // (re)opened, not yet resumed: it confirms nothing
    // a conflated stream's window holds these markets' changes: the heartbeat does not vouch for them
    const behind = msg && Array.isArray(msg.held) ? new Set(msg.held) : null;
    for (const [id, m] of state.markets) {
      if (sourceDown(m.source) || state.flagged.get(id) || (behind && behind.has(id))) continue;
      if ((state.confirmed.get(id) || 0) < now) state.confirmed.set(id, now);
    }
  }

  function onStatus(msg) {
    state.stats.statuses += 1;
    state.sources.set(msg.source, { state: msg.state, reason: msg.reason });
    const stale = new Set(msg.stale_markets || []);
    for (const [id, m] of state.markets) {
      if (m.source === msg.source) {
        state.flagged.set(id, stale.has(id));
        dirty.add(id);
      }
    }
    if (msg.stale_events) {  // every event of the source whose state is stale now (a server before it sends none)
      const staleEvents = new Set(msg.stale_events);
      for (const states of [state.eventStates, evp.memberStates]) {
        for (const [id, es] of states) {
          if (es.source === msg.source) state.esFlagged.set(id, staleEvents.has(id));
        }
      }
    }
    renderBanner();
    renderScores();
    renderRaces();
    renderEventScore();
    schedule();
  }

  // -- flashes --------------------------------------------------------------------------

  const flashes = new Map();  // "mid|sid|side" → {dir: "up"|"down", at: performance.now()}

  function best(sel, side) {
    const ladder = side === "back" ? sel.back : sel.lay;
    if (ladder && ladder.length) return ladder[0][0];
    return side === "back" && sel.price !== undefined ? sel.price : null;
  }

  function noteFlashes(prev, next) {
    if (!prev || !next.selections) return;
    const before = new Map((prev.selections || []).map((s) => [s.selection_id, s]));
    const now = performance.now();
    for (const sel of next.selections) {
      const old = before.get(sel.selection_id);
      if (!old || old === sel) continue;
      for (const side of ["back", "lay"]) {
        const a = best(old, side), b = best(sel, side);
        if (a !== null && b !== null && a !== b) {
          flashes.set(next.market_id + "|" + sel.selection_id + "|" + side, { dir: b > a ? "up" : "down", at: now });
          state.stats.flashes += 1;
        }
      }
    }
  }

  // -- rendering -------------------------------------------------------------------------

  const board = document.getElementById("board");
  const banner = document.getElementById("banner");
  const connEl = document.getElementById("conn");
  const connText = document.getElementById("conn-text");
  const metaEl = document.getElementById("meta");
  const sportFilter = document.getElementById("sport-filter");
  const playFilter = document.getElementById("play-filter");

  const esc = (s) => String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  function sportName(s) {
    if (!s) return "Other";
    return s.replace(/_/g, " ").replace(/\b\w/g, (c) => c.toUpperCase());
  }

  function fmtPrice(p) {
    if (p === null || p === undefined) return "";
    return p >= 100 ? String(Math.round(p)) : p >= 10 ? String(+p.toFixed(1)) : String(+p.toFixed(2));
  }

  function fmtSize(s) {
    if (s === null || s === undefined) return "";
    if (s >= 1e6) return (s / 1e6).toFixed(1) + "m";
    if (s >= 1e3) return (s / 1e3).toFixed(s >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(s));
  }

  function fmtAgo(ms) {
    if (ms === null) return "";
    const s = Math.floor(ms / 1000);
    if (s < 1) return "just now";
    if (s < 60) return s + " s ago";
    const m = Math.floor(s / 60);
    return m < 60 ? m + " min ago" : Math.floor(m / 60) + " h ago";
  }

  function fmtStart(ms) {
    if (!ms) return "";
    const d = new Date(ms);
    const diff = ms - Date.now();
    const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (diff > 0 && diff < 3600e3) return "starts in " + Math.max(1, Math.round(diff / 60e3)) + " min · " + hm;
    const sameDay = new Date().toDateString() === d.toDateString();
    return (sameDay ? "" : d.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short" }) + " ") + hm;
  }

  // -- scores: the event state beside each event's odds -----------------------------------

  const PERIODS = { "1h": "1st half", "2h": "2nd half", ht: "Half time", et: "Extra time", et1: "Extra time 1",
                    et2: "Extra time 2", pen: "Penalties", ot: "Overtime", "break": "Break" };
  const FINAL_EVENT = new Set(["ENDED", "CLOSED"]);

  function periodLabel(p) {
    if (!p) return "";
    if (PERIODS[p]) return PERIODS[p];
    let m;
    if ((m = /^q(\d+)$/.exec(p))) return "Q" + m[1];
    if ((m = /^p(\d+)$/.exec(p))) return "P" + m[1];
    if ((m = /^ot(\d+)$/.exec(p))) return "OT" + m[1];
    if ((m = /^set(\d+)$/.exec(p))) return "Set " + m[1];
    if ((m = /^innings(\d+)$/.exec(p))) return "Innings " + m[1];
    return p.toUpperCase();
  }

  function mmss(sec) {
    const s = Math.max(0, Math.floor(sec));
    return String(Math.floor(s / 60)).padStart(2, "0") + ":" + String(s % 60).padStart(2, "0");
  }

  /** The match clock now: elapsed (or, for count-down sports, remaining in the period) as mm:ss,
   *  run on from the reading at clock.at while it runs. */
  function clockText(c, wallNow) {
    if (!c) return "";
    const run = c.running ? Math.max(0, wallNow - c.at) / 1000 : 0;
    if (c.remaining_s !== null && c.remaining_s !== undefined) return mmss(c.remaining_s - run);
    return mmss(c.seconds + run);
  }

  /** An event state's stale marker, by the markets' rule (isStale): its source DOWN; on the list, no
   *  live stream (its scores come from the stream alone; the event page re-reads its members' states
   *  every few seconds); else the server's last word on it — the stale of the last event_state (or
   *  GET) about it, or a later status of its source (listed in stale_events or not). */
  function stateStale(es) {
    if (sourceDown(es.source)) return true;
    if (route.event === null && !streamLive()) return true;
    const flagged = state.esFlagged.get(es.event_id);
    return flagged === undefined ? !!es.stale : flagged;
  }

  function scoreHtml(es, wallNow) {
    if (es.status === "NOT_STARTED" && !es.in_play) return "";  // nothing to show before the start
    const sc = es.score;
    const parts = [];
    if (sc) {
      const rc = es.red_cards || {};
      const card = (n) => (n ? '<span class="rc" title="red cards">' + n + "</span>" : "");
      parts.push('<b class="goals">' + card(rc.home) + esc(sc.home) + "\u2013" + esc(sc.away) + card(rc.away) + "</b>");
    }
    if (FINAL_EVENT.has(es.status)) {
      parts.push('<span class="period">Full time</span>');
    } else if (es.status && es.status !== "LIVE" && es.status !== "NOT_STARTED") {
      parts.push('<span class="period">' + esc(es.status.charAt(0) + es.status.slice(1).toLowerCase()) + "</span>");
    } else {
      if (es.period) parts.push('<span class="period">' + esc(periodLabel(es.period)) + "</span>");
      if (es.clock) {
        parts.push('<span class="clock' + (es.clock.running ? " running" : "") + '">'
          + clockText(es.clock, wallNow) + "</span>");
      }
    }
    if (!parts.length) return "";
    if (stateStale(es)) parts.push('<span class="badge stale">Stale</span>');
    return parts.join("");
  }

  function scoreClass(es) {
    return "score" + (es && stateStale(es) ? " stale" : "") + (es && !scoreHtml(es, Date.now()) ? " none" : "");
  }

  /** The score element of an event (filled by renderScores). */
  function scoreSlot(id) {
    const es = state.eventStates.get(id);
    return '<span class="' + (es ? scoreClass(es) : "score none") + '" data-event="' + esc(id) + '"'
      + ' title="score, period and match clock (stale: not confirmed recently or its source is down)">'
      + (es ? scoreHtml(es, Date.now()) : "") + "</span>";
  }

  /** Refresh the score of one event (or every shown one): a new state, the clock's tick, a source's status. */
  function renderScores(eventId) {
    const wallNow = Date.now();
    const els = eventId === undefined ? board.querySelectorAll(".score[data-event]")
      : board.querySelectorAll('.score[data-event="' + CSS.escape(eventId) + '"]');
    for (const el of els) fillScore(el, state.eventStates.get(el.dataset.event), wallNow);
  }

  /** Put event state es (or none) into a score element: its HTML, class and data-version
   *  (shared by the cards on the list and the event page's header). */
  function fillScore(el, es, wallNow, extraClass) {
    // a race's state (an event page of a race: its canonical event is the race) reads as its race line
    const html = es ? (es.race ? raceHtml(es, wallNow) : scoreHtml(es, wallNow)) : "";
    const cls = (es ? scoreClass(es) : "score none") + (extraClass ? " " + extraClass : "");
    if (el.innerHTML !== html) el.innerHTML = html;
    if (el.className !== cls) el.className = cls;
    if (es) el.dataset.version = String(es.version || 0); else delete el.dataset.version;
  }

  // -- races: a Betfair horse/greyhound race's progress beside its markets' odds -----------------

  const RACE_SPORTS = new Set(["horse_racing", "greyhound_racing"]);
  const RACE_ID = /^bf:.+\.\d{4}$/;

  /** The race event id a Betfair race market's state is keyed by (feed.taxonomy.race_event_id):
   *  its event (the meeting, bf:28587288) and the HHMM of its scheduled start in UTC
   *  (bf:28587288.1650); null for a market that is not a Betfair horse or greyhound race. */
  function raceEventId(eventId, sport, startTime) {
    if (!RACE_SPORTS.has(sport) || typeof startTime !== "number" || !isFinite(startTime)
        || typeof eventId !== "string" || !eventId.startsWith("bf:")) return null;
    const minute = ((Math.floor(startTime / 60000) % 1440) + 1440) % 1440;  // UTC, whatever the page's zone
    return eventId + "." + String(Math.floor(minute / 60)).padStart(2, "0") + String(minute % 60).padStart(2, "0");
  }

  const raceOf = (m) => raceEventId(m.event_id, m.sport, m.start_time);

  function ordinal(n) {
    const t = n % 100;
    return n + (t >= 11 && t <= 13 ? "th" : ["th", "st", "nd", "rd"][n % 10] || "th");
  }

  /** A race's line: status, running time (run on locally while it runs), the leader's last gate and
   *  metres to the finish, a stale marker; "" when there is nothing to show yet. */
  function raceHtml(es, wallNow) {
    const r = es.race || null;
    const status = es.status || "NOT_STARTED";
    if (status === "NOT_STARTED" && !es.in_play && !r) return "";
    const parts = ['<span class="rstatus ' + esc(status.toLowerCase()) + '">' + esc(status.replace(/_/g, " ")) + "</span>"];
    if (es.clock) {
      parts.push('<span class="clock' + (es.clock.running ? " running" : "") + '" title="running time">'
        + clockText(es.clock, wallNow) + "</span>");
    }
    const where = [];
    if (r && r.gate) where.push(r.gate);
    if (r && r.distance_m !== null && r.distance_m !== undefined && r.gate !== "Finish") {
      where.push(Math.round(r.distance_m) + " m to go");
    }
    if (where.length) {
      parts.push('<span class="gate" title="the leader\'s last gate and distance to the finish">'
        + esc(where.join(" \u00b7 ")) + "</span>");
    }
    if (stateStale(es)) parts.push('<span class="badge stale">Stale</span>');
    return parts.join("");
  }

  function raceClass(es) {
    return "race-line" + (es && stateStale(es) ? " stale" : "") + (es && raceHtml(es, Date.now()) ? "" : " none");
  }

  /** selection id → position (1 = leader) by the race's running (finally finishing) order. */
  function racePositions(es) {
    const out = new Map();
    const order = es && es.race && es.race.order;
    if (order) order.forEach((sid, i) => { if (!out.has(sid)) out.set(sid, i + 1); });
    return out;
  }

  /** A runner's position before its name (none when the race's order does not name it). */
  function posHtml(es, positions, selId) {
    const n = positions.get(selId);
    if (n === undefined) return "";
    return '<span class="pos' + (stateStale(es) ? " stale" : "") + (n === 1 ? " lead" : "") + '" data-pos="' + n + '" title="'
      + (FINAL_EVENT.has(es.status) ? "finishing order (the result is the market's settlement)" : "running order")
      + '">' + ordinal(n) + "</span>";
  }

  /** Put race state es (or none) into a race line: its HTML and class. */
  function fillRace(el, es, wallNow) {
    const html = es ? raceHtml(es, wallNow) : "";
    const cls = raceClass(es);
    if (el.innerHTML !== html) el.innerHTML = html;
    if (el.className !== cls) el.className = cls;
    if (es) el.dataset.version = String(es.version || 0); else delete el.dataset.version;
  }

  /** Once a second (and on a source's status): race clocks run; a change of staleness re-renders
   *  the market (its runners' positions are marked too). */
  function renderRaces() {
    const wallNow = Date.now();
    for (const el of board.querySelectorAll(".race-line[data-race]")) {
      const es = state.eventStates.get(el.dataset.race);
      const card = el.closest(".market");
      if (el.className !== raceClass(es) && card) renderMarket(card.dataset.marketId, performance.now());
      else fillRace(el, es, wallNow);
    }
  }

  /** A race's new state: re-render its markets (line and positions). */
  function raceStateChanged(raceId) {
    if (!RACE_ID.test(raceId)) return;
    for (const [id, m] of state.markets) if (raceOf(m) === raceId) dirty.add(id);
    schedule();
  }

  function visibleMarkets() {
    const f = state.filter;
    const out = [];
    for (const m of state.markets.values()) {
      if (CLOSED.has(m.status)) continue;
      if (f.sport !== "all" && m.sport !== f.sport) continue;
      if (f.play === "live" && !m.in_play) continue;
      if (f.play === "upcoming" && m.in_play) continue;
      out.push(m);
    }
    return out;
  }

  /** sport → [{event_id, name, in_play, start, markets: [...]}], events in-play first, then by start. */
  function layout(markets) {
    const sports = new Map();
    for (const m of markets) {
      const sport = m.sport || "other";
      if (!sports.has(sport)) sports.set(sport, new Map());
      const events = sports.get(sport);
      const key = m.event_id || m.market_id;
      if (!events.has(key)) events.set(key, { id: key, linked: !!m.event_id, name: m.event_name || m.name || key, in_play: false,
                                               start: m.start_time || 0, markets: [] });
      const ev = events.get(key);
      ev.markets.push(m);
      ev.in_play = ev.in_play || !!m.in_play;
      if (m.start_time && (!ev.start || m.start_time < ev.start)) ev.start = m.start_time;
    }
    const out = [];
    // sports with in-play events first, then the busiest, then by name
    const rank = (events) => [...events.values()].some((e) => e.in_play) ? 1 : 0;
    const order = [...sports].sort((a, b) => (rank(b[1]) - rank(a[1])) || (b[1].size - a[1].size)
                                             || sportName(a[0]).localeCompare(sportName(b[0])));
    for (const [sport, events] of order) {
      const list = [...events.values()];
      for (const ev of list) ev.markets.sort((a, b) => (a.market_type || "").localeCompare(b.market_type || "")
                                                       || a.market_id.localeCompare(b.market_id));
      list.sort((a, b) => (b.in_play - a.in_play) || (a.start - b.start) || a.name.localeCompare(b.name));
      out.push({ sport, events: list });
    }
    return out;
  }

  function signature(groups) {
    return groups.map((g) => g.sport + ":" + g.events.map((e) => e.id + (e.in_play ? "*" : "") + "("
      + e.markets.map((m) => m.market_id).join(",") + ")").join(";")).join("|");
  }

  function priceCell(m, sel, side, now) {
    const ladder = side === "back" ? sel.back : sel.lay;
    let price = null, size = null;
    if (ladder && ladder.length) { price = ladder[0][0]; size = ladder[0][1]; }
    else if (side === "back" && sel.price !== null && sel.price !== undefined) price = sel.price;
    const key = m.market_id + "|" + sel.selection_id + "|" + side;
    const fl = flashes.get(key);
    let cls = "price " + side, style = "";
    if (fl && now - fl.at < FLASH_MS) {
      cls += " flash-" + fl.dir;
      style = ' style="animation-delay:-' + Math.round(now - fl.at) + 'ms"';
    } else if (fl) {
      flashes.delete(key);
    }
    if (price === null) cls += " empty";
    return '<td class="' + cls + '" data-side="' + side + '" data-sel="' + esc(sel.selection_id) + '"' + style + ">"
      + '<span class="p">' + (price === null ? "–" : fmtPrice(price)) + "</span>"
      + '<span class="s">' + fmtSize(size) + "</span></td>";
  }

  // -- sparklines: each selection's best back over the last hour, from /v1/markets/{id}/history.
  // Fetched lazily for the markets the board renders (4 at a time, each at most once a minute).
  const SPARK_SPAN_MS = 3600000;
  const SPARK_TTL_MS = 60000;
  const SPARK_PARALLEL = 4;
  const sparks = new Map();   // market_id -> { at, pending, sels: Map(selection_id -> [price…]) }
  const sparkQueue = [];
  let sparkBusy = 0;

  function wantSpark(id) {
    const s = sparks.get(id);
    const t = Date.now();
    if (s && (s.pending || t - s.at < SPARK_TTL_MS)) return;
    sparks.set(id, { at: t, pending: true, sels: s ? s.sels : new Map() });
    sparkQueue.push(id);
    pumpSparks();
  }

  function pumpSparks() {
    while (sparkBusy < SPARK_PARALLEL && sparkQueue.length) {
      const id = sparkQueue.shift();
      sparkBusy++;
      loadSpark(id).finally(() => { sparkBusy--; pumpSparks(); });
    }
  }

  async function loadSpark(id) {
    const to = Date.now();
    const old = sparks.get(id);
    let sels = old ? old.sels : new Map();
    try {
      const r = await fetch(withKey("/v1/markets/" + encodeURIComponent(id) + "/history?from=" + (to - SPARK_SPAN_MS)
        + "&to=" + to + "&resolution=" + (SPARK_SPAN_MS / 60)), { cache: "no-store" });
      if (r.ok) {
        const h = await r.json();
        sels = new Map();
        for (const s of h.selections) {
          const pts = (s.start ? [s.start] : []).concat(s.points)
            .map((p) => (p.back_price !== null ? p.back_price : p.price)).filter((v) => v !== null);
          sels.set(s.selection_id, pts);
        }
      }
    } catch (e) { /* history is optional: keep what we had */ }
    sparks.set(id, { at: Date.now(), pending: false, sels });
    renderMarket(id, performance.now());
  }

  function sparkSvg(id, selId) {
    const s = sparks.get(id);
    const pts = s && s.sels.get(selId);
    if (!pts || pts.length < 2) return "";
    const W = 60, H = 14;
    let lo = Infinity, hi = -Infinity;
    for (const v of pts) { if (v < lo) lo = v; if (v > hi) hi = v; }
    const span = hi - lo || 1;
    const xy = pts.map((v, i) => (i * W / (pts.length - 1)).toFixed(1) + "," + (H - 1 - (v - lo) * (H - 2) / span).toFixed(1));
    const dir = pts[pts.length - 1] > pts[0] ? " up" : pts[pts.length - 1] < pts[0] ? " down" : "";
    return '<svg class="spark' + dir + '" viewBox="0 0 ' + W + " " + H + '" width="' + W + '" height="' + H
      + '" aria-hidden="true" data-from="' + pts[0] + '" data-to="' + pts[pts.length - 1] + '">'
      + '<polyline points="' + xy.join(" ") + '"/></svg>';
  }

  function marketInner(m, now) {
    const stale = isStale(m.market_id, now);
    const suspended = SUSPENDED.has(m.status);
    const badges = [];
    if (suspended) badges.push('<span class="badge suspended">' + (m.status === "INACTIVE" ? "Inactive" : "Suspended") + "</span>");
    if (stale) badges.push('<span class="badge stale" title="not confirmed recently or source down">Stale</span>');
    const sels = (m.selections || []).filter((s) => s.status !== "REMOVED" && s.status !== "HIDDEN")
      .slice().sort((a, b) => (a.sort_priority || 0) - (b.sort_priority || 0));
    const raceId = raceOf(m);
    const race = raceId === null ? undefined : state.eventStates.get(raceId);
    const positions = racePositions(race);
    const rows = sels.map((s) => '<tr class="sel' + (s.status !== "ACTIVE" ? " sel-off" : "") + '">'
      + '<th scope="row">' + posHtml(race, positions, s.selection_id) + esc(s.name || s.selection_id)
      + sparkSvg(m.market_id, s.selection_id) + "</th>"
      + priceCell(m, s, "back", now) + priceCell(m, s, "lay", now) + "</tr>").join("");
    wantSpark(m.market_id);
    const vol = m.traded_volume ? '<span class="matched">' + fmtSize(m.traded_volume) + " matched</span>" : "";
    return '<div class="market-head"><span class="market-name">' + esc(m.name || m.market_type) + "</span>"
      + badges.join("") + '<span class="spacer"></span>' + vol
      + '<span class="age" data-age="' + esc(m.market_id) + '">updated ' + fmtAgo(ageMs(m.market_id, now)) + "</span></div>"
      + (raceId === null ? "" : '<div class="' + raceClass(race) + '" data-race="' + esc(raceId) + '"'
         + ' title="the race: status, running time, the leader\'s last gate and distance to go (stale: not confirmed'
         + ' recently or its source is down)">' + (race ? raceHtml(race, Date.now()) : "") + "</div>")
      + '<table class="prices"><thead><tr><th></th><th class="back">Back</th><th class="lay">Lay</th></tr></thead>'
      + "<tbody>" + rows + "</tbody></table>";
  }

  function marketClass(m, now) {
    return "market" + (SUSPENDED.has(m.status) ? " suspended" : "") + (isStale(m.market_id, now) ? " stale" : "");
  }

  function renderAll() {
    const now = performance.now();
    const groups = layout(visibleMarkets());
    lastSignature = signature(groups);
    renderFilters();
    if (!groups.length) {
      board.innerHTML = '<p class="empty">' + (state.markets.size ? "No markets match these filters." :
        (state.stats.snapshots ? "No markets on the feed yet." : "Waiting for the feed…")) + "</p>";
      return;
    }
    const html = [];
    for (const g of groups) {
      html.push('<section class="sport" data-sport="' + esc(g.sport) + '"><h2>' + esc(sportName(g.sport))
        + ' <span class="count">' + g.events.length + '</span></h2><div class="events">');
      for (const ev of g.events) {
        html.push('<article class="event' + (ev.in_play ? " in-play" : "") + '">'
          + '<header class="event-head">' + (ev.in_play ? '<span class="live">In-play</span>' : "")
          + (ev.linked ? '<a class="event-name" href="#/event/' + esc(encodeURIComponent(ev.id))
             + '" title="every book side by side: best and fair price">' + esc(ev.name) + "</a>"
             : '<span class="event-name">' + esc(ev.name) + "</span>")
          + (ev.linked ? scoreSlot(ev.id) : "")
          + (ev.in_play ? "" : '<time class="start">' + esc(fmtStart(ev.start)) + "</time>")
          + (ev.linked ? '<a class="all-books" href="#/event/' + esc(encodeURIComponent(ev.id)) + '">all books ›</a>' : "")
          + "</header>"
          + '<div class="markets">');
        for (const m of ev.markets) {
          html.push('<div class="' + marketClass(m, now) + '" data-market-id="' + esc(m.market_id) + '">'
            + marketInner(m, now) + "</div>");
        }
        html.push("</div></article>");
      }
      html.push("</div></section>");
    }
    board.innerHTML = html.join("");
  }

  function renderMarket(id, now) {
    const m = state.markets.get(id);
    const el = board.querySelector('[data-market-id="' + CSS.escape(id) + '"]');
    if (!m || !el) return;
    el.className = marketClass(m, now);
    el.innerHTML = marketInner(m, now);
  }

  function renderFilters() {
    const counts = new Map();
    for (const m of state.markets.values()) {
      if (CLOSED.has(m.status)) continue;
      const s = m.sport || "other";
      counts.set(s, (counts.get(s) || 0) + 1);
    }
    const sports = [...counts.keys()].sort((a, b) => sportName(a).localeCompare(sportName(b)));
    const sig = sports.map((s) => s + counts.get(s)).join(",") + "/" + state.filter.sport;
    if (sig !== lastFilterSig) {
      lastFilterSig = sig;
      sportFilter.innerHTML = ['<button type="button" data-sport="all">All sports</button>']
        .concat(sports.map((s) => '<button type="button" data-sport="' + esc(s) + '">' + esc(sportName(s))
          + ' <span class="count">' + counts.get(s) + "</span></button>")).join("");
    }
    for (const b of sportFilter.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.sport === state.filter.sport));
    for (const b of playFilter.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.play === state.filter.play));
  }

  let lastSignature = "";
  let lastFilterSig = "";
  let scheduled = false;

  function schedule() {
    if (scheduled) return;
    scheduled = true;
    // rAF pauses in background tabs; a timer keeps a hidden board current too
    const run = () => { if (scheduled) { scheduled = false; flush(); } };
    requestAnimationFrame(run);
    setTimeout(run, 250);
  }

  function flush() {
    state.stats.renders += 1;
    const now = performance.now();
    if (route.event !== null) {
      structureDirty = false;
      dirty.clear();
      renderEvent(now);
      return;
    }
    if (!structureDirty) {
      const sig = signature(layout(visibleMarkets()));
      if (sig !== lastSignature) structureDirty = true;
    }
    if (structureDirty) {
      structureDirty = false;
      dirty.clear();
      renderAll();
      renderMeta();
      return;
    }
    for (const id of dirty) renderMarket(id, now);
    dirty.clear();
  }

  /** Once a second: ages tick, stale markers follow the clock, flashes expire, match clocks run. */
  function tick() {
    const now = performance.now();
    watchdog(now);
    if (route.event !== null) {
      tickEvent(now);
      renderBanner();
      renderMeta();
      return;
    }
    for (const el of board.querySelectorAll(".age[data-age]")) {
      const id = el.dataset.age;
      el.textContent = "updated " + fmtAgo(ageMs(id, now));
      const card = el.closest(".market");
      const m = state.markets.get(id);
      if (card && m) {
        const want = marketClass(m, now);
        if (card.className !== want) renderMarket(id, now);
      }
    }
    renderScores();
    renderRaces();
    renderBanner();
    renderMeta();
  }

  function renderBanner() {
    const down = [], degraded = [];
    for (const [name, s] of state.sources) {
      if (s.state === "DOWN") down.push([name, s]);
      else if (s.state === "DEGRADED") degraded.push([name, s]);
    }
    let html = "", kind = "";
    const why = (s) => (s.reason ? " (" + esc(s.reason.replace(/_/g, " ")) + ")" : "");
    if (state.authRequired) {
      kind = "auth";
      html = "<strong>This server needs an API key</strong>" + (API_KEY ? " — the one given was refused" : "")
        + ' <form id="auth-form"><input id="auth-key" type="password" autocomplete="off" placeholder="API key" '
        + 'aria-label="API key"> <button type="submit">Connect</button></form>';
    } else if (down.length) {
      kind = "down";
      html = down.map(([n, s]) => "<strong>Source " + esc(n) + " is DOWN</strong>" + why(s)).join(" · ")
        + " — its prices are not being confirmed and are marked stale.";
    } else if (state.resuming && state.stats.snapshots) {
      kind = "lagging";
      html = "<strong>This page fell behind the feed</strong> — reconnecting to catch up; its prices are marked"
        + " stale until the stream resumes.";
    } else if ((!state.connected || state.syncing) && state.stats.snapshots) {
      // (reopened but not yet resumed: its prices are still those from before the gap)
      kind = "offline";
      html = "<strong>Connection to the feed lost</strong> — reconnecting; prices shown may be out of date.";
    } else if (state.streamLagMs > STALE_IN_PLAY_MS && state.stats.snapshots) {
      kind = "lagging";
      html = "<strong>This page is " + Math.round(state.streamLagMs / 1000) + " s behind the feed</strong>"
        + " — its prices are marked stale until it catches up.";
    } else if (degraded.length) {
      kind = "degraded";
      html = degraded.map(([n, s]) => "<strong>Source " + esc(n) + " is degraded</strong>" + why(s)).join(" · ")
        + " — updates may be delayed.";
    }
    if (!kind) {
      if (!banner.hidden) { banner.hidden = true; banner.dataset.kind = ""; }
      return;
    }
    if (banner.innerHTML !== html) {
      banner.innerHTML = html;
      const form = document.getElementById("auth-form");
      if (form) {
        form.addEventListener("submit", (e) => {  // reload with ?api_key= (EventSource cannot send headers)
          e.preventDefault();
          const key = document.getElementById("auth-key").value.trim();
          if (!key) return;
          const u = new URL(window.location.href);
          u.searchParams.set("api_key", key);
          window.location.href = u.toString();
        });
      }
    }
    banner.dataset.kind = kind;
    banner.hidden = false;
  }

  const lagWindow = [];
  const rateWindow = [];

  function renderMeta() {
    const now = performance.now();
    while (rateWindow.length && now - rateWindow[0] > 5000) rateWindow.shift();
    const rate = rateWindow.length / 5;
    const sorted = lagWindow.slice().sort((a, b) => a - b);
    const p50 = sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
    const shown = route.event !== null ? state.markets.size : board.querySelectorAll(".market").length;
    metaEl.textContent = shown + " markets · " + (rate >= 10 ? Math.round(rate) : rate.toFixed(1)) + " updates/s"
      + (p50 === null ? "" : " · lag " + p50 + " ms");
  }

  function setConnected(on, text) {
    state.connected = on;
    connEl.dataset.state = on && !state.resuming && !state.syncing ? "live" : "connecting";
    connText.textContent = text;
    renderBanner();
  }

  // -- filters ----------------------------------------------------------------------------

  function setFilter(change) {
    Object.assign(state.filter, change);
    const q = new URLSearchParams(location.search);
    if (state.filter.sport === "all") q.delete("sport"); else q.set("sport", state.filter.sport);
    if (state.filter.play === "all") q.delete("in_play"); else q.set("in_play", state.filter.play === "live" ? "true" : "false");
    const qs = q.toString();
    history.replaceState(null, "", location.pathname + (qs ? "?" + qs : "") + location.hash);
    structureDirty = true;
    flush();
  }

  sportFilter.addEventListener("click", (e) => {
    const b = e.target.closest("button[data-sport]");
    if (b) setFilter({ sport: b.dataset.sport });
  });
  playFilter.addEventListener("click", (e) => {
    const b = e.target.closest("button[data-play]");
    if (b) setFilter({ play: b.dataset.play });
  });

  // -- connection -------------------------------------------------------------------------

  let es = null;
  let retryMs = 500;

  /** The delay before reopening the stream after an error: retryMs, jittered (a half of it, plus a
   *  random part of the other half: pages that lost the same server do not come back in step). */
  function retryDelay() {
    return retryMs / 2 + Math.random() * retryMs / 2;
  }
  let lastHeard = 0;  // performance.now() of the stream's last message (watchdog)
  let streamGen = 0;

  /** (Re)open the book stream for the current route: everything on the list,
   *  the canonical event's markets (every book) on an event page. */
  function restartStream() {
    streamGen += 1;
    if (es) { es.close(); es = null; }
    state.token = null;  // a token resumes one filter only
    state.markets.clear();
    state.confirmed.clear();
    state.flagged.clear();
    state.eventStates.clear();
    state.esFlagged.clear();
    flashes.clear();
    structureDirty = true;
    if (route.event !== null && !evp.cid) return;  // connected once the API named the canonical event
    connect();
  }

  /** A stream that goes silent (a half-open connection: no error, no close — EventSource
   *  would wait forever) is dropped after 3 heartbeats + 1 s and opened again, resuming with
   *  the last token; meanwhile every price reads stale (isStale). Called every second. */
  function watchdog(now) {
    if (!es || !state.connected || now - lastHeard <= 3 * HEARTBEAT_MS + 1000) return;
    state.stats.silences += 1;
    es.close();
    es = null;
    setConnected(false, "connection lost — reconnecting…");
    connect();
  }

  /** LAG_RECONNECT_HEARTBEATS heartbeats in a row lagged past the in-play limit: the least offset
   *  never forgets within a stream (a server clock stepped back or running slow reads as lag for
   *  good), so close it and, after the backoff, open it again with the resume token — measured
   *  afresh. Every price reads stale until the new stream is resumed or snapshotted. */
  function lagReconnect() {
    state.stats.lagReconnects += 1;
    // spread: after a server clock step every page lags on the same heartbeat (its prices stale either way)
    const delay = Math.round(retryDelay() + Math.random() * LAG_RECONNECT_SPREAD_MS);
    console.warn("oddsfeed: the stream lagged " + Math.round(state.streamLagMs / 1000) + " s behind the server for "
      + state.lagBeats + " heartbeats; reopening it (resuming) in " + delay + " ms");
    state.resuming = true;
    if (es) { es.close(); es = null; }
    setConnected(false, "behind the feed — reconnecting…");
    const gen = streamGen;
    setTimeout(() => { if (gen === streamGen && !es) connect(); }, delay);
    retryMs = Math.min(10000, retryMs * 2);  // (not reset by the reopened stream's open: see connect)
  }

  function connect() {
    const gen = streamGen;
    let url = "/v1/stream?heartbeat_ms=" + HEARTBEAT_MS;
    if (route.event !== null) url += "&event=" + encodeURIComponent(evp.cid);
    if (state.token) url += "&last_event_id=" + encodeURIComponent(state.token);
    resetLag();
    state.syncing = true;  // live again once the server resumes this stream or sends its snapshot
    es = new EventSource(withKey(url));
    const mine = es;
    const handle = (fn, isDelta) => (e) => {
      if (gen !== streamGen) { mine.close(); return; }
      lastHeard = performance.now();
      try {
        fn(JSON.parse(e.data));
      } catch (err) {
        state.stats.errors += 1;
        if (isDelta && gen === streamGen) {
          // a change missed, of a market it cannot even name: its token is not taken, and the stream
          // starts over from a fresh snapshot (as on a seq gap) rather than show that market fresh
          console.warn("oddsfeed: a delta the page cannot read; starting over from a fresh snapshot", err);
          state.stats.skipped += 1;
          state.stats.resyncs += 1;
          restartStream();
        }
        return;
      }
      if (e.lastEventId && gen === streamGen) state.token = e.lastEventId;  // (a resync restarted: not this stream's)
      if (state.lagBeats >= LAG_RECONNECT_HEARTBEATS && gen === streamGen && mine === es) lagReconnect();
    };
    es.addEventListener("open", () => {
      // (also when the EventSource reopens by itself: a new connection's clock offset is measured afresh)
      // (a stream reopened for lagging keeps its backoff: repeated lag reconnects wait longer and longer)
      // (and until the server resumes it or sends a snapshot, the book is from before the gap: not
      // live — the server's resumed or snapshot says it is caught up, not the open)
      if (gen === streamGen) {
        if (!state.resuming) retryMs = 500;
        lastHeard = performance.now();
        resetLag();
        state.syncing = true;
        setConnected(true, state.resuming || state.token ? "resuming…" : "connecting…");
      }
    });
    es.addEventListener("snapshot", handle(onSnapshot));
    es.addEventListener("delta", handle(onDelta, true));
    es.addEventListener("heartbeat", handle(onHeartbeat));
    es.addEventListener("status", handle(onStatus));
    es.addEventListener("event_state", handle(onEventState));  // no id: the resume token stays as it was
    es.addEventListener("removed", handle(onRemoved));
    es.addEventListener("resumed", handle(onResumed));
    es.addEventListener("error", (e) => {
      if (gen !== streamGen) { mine.close(); return; }
      if (e.data) {  // an "error" event sent by the server
        state.stats.errors += 1;
        return;
      }
      if (mine.readyState === EventSource.CLOSED) {
        // the browser gave up (e.g. a 503): reconnect ourselves, resuming with the last token
        setConnected(false, "reconnecting…");
        mine.close();
        setTimeout(() => { if (gen === streamGen) connect(); }, retryDelay());
        retryMs = Math.min(10000, retryMs * 2);
      } else {
        setConnected(false, "reconnecting…");  // EventSource retries by itself with Last-Event-ID
      }
    });
  }

  async function pollSources() {
    try {
      const r = await fetch(withKey("/v1/sources"), { cache: "no-store" });
      if (r.status === 401) {  // the server requires an API key: say so and ask for one
        if (!state.authRequired) {
          console.warn("oddsfeed: /v1 answered 401 — this server requires an API key (open the board with ?api_key=…)");
        }
        state.authRequired = true;
        renderBanner();
        return;
      }
      if (r.ok) {
        const body = await r.json();
        const seen = new Set();
        for (const s of body.sources) {
          seen.add(s.source);
          const before = state.sources.get(s.source);
          state.sources.set(s.source, { state: s.state, reason: s.reason });
          if (!before || before.state !== s.state) {
            for (const [id, m] of state.markets) if (m.source === s.source) dirty.add(id);
            schedule();
          }
        }
        for (const name of [...state.sources.keys()]) if (!seen.has(name)) state.sources.delete(name);
        renderBanner();
      }
    } catch (err) {
      /* the stream's own state shows connectivity */
    }
  }

  // -- the event page (#/event/<id>) ---------------------------------------------------------

  const evPage = document.getElementById("event-page");
  const filtersEl = document.getElementById("filters");
  const EVENT_REFRESH_MS = Number(params.get("event_refresh_ms")) || 5000;  // members, grid, server ages
  const REFETCH_GAP_MS = 1000;     // a grid change (new market / selection) re-reads at most this often
  const EXCLUDED_WHY = {
    stale: "stale: this book's price is too old or its feed is down",
    suspended: "suspended: this book is not taking bets on it",
    closed: "closed: the market is closed or the selection settled",
    no_price: "no price offered",
  };

  const route = { event: null };  // event: the id in #/event/<id>, or null on the list

  const evp = {
    gen: 0,                 // bumped on every route change: late answers of an old page are dropped
    cid: null,              // the canonical id (from the API)
    head: null,             // GET /v1/events/<id> → event (name, start, members, bookmakers …)
    views: [],              // its view: the grid (market → outcomes → books) and fallback values
    fairMethod: null,
    cells: new Set(),       // "market_id|selection_id" in the grid
    keys: new Set(),        // canonical market keys in the grid
    viewAsOf: 0,            // the server time (as_of, ms) of views
    best: new Map(),        // market key → {m: the best stream's market (best, best_lay, fair, excluded), asOf}
    gone: new Map(),        // market key → as_of (ms) the best stream said the group left: a view read then or
                            // before does not show it
    shownBest: new Map(),   // "key|outcome|back|lay" → the best price shown
    bestFlashes: new Map(), // "key|outcome|back|lay" → {dir, at}
    seen: new Map(),        // market id → performance.now() the server last vouched for it (age 0)
    error: null,
    fetching: false,
    again: false,
    lastFetch: 0,
    refetchTimer: null,
    retryTimer: null,
    rendered: null,         // the HTML last rendered: {top, keys, sections}
    missing: "",            // grid markets the book stream did not deliver, when it was last restarted for them
    bestEs: null,
    bestRetryMs: 500,
    restState: null,        // the GET's "state": the member state the API shows (canonical home/away)
    memberStates: new Map(),// member provider event id → its latest state (the GET's "states", then live)
    reversedOf: new Map(),  // member provider event id → it names the sides the other way round (the GET's)
    stats: { fetches: 0, bestMessages: 0, bestFlashes: 0, renders: 0 },
  };

  function parseRoute() {
    const m = /^#\/event\/(.+)$/.exec(location.hash);
    if (!m) return null;
    try { return decodeURIComponent(m[1]); } catch (err) { return m[1]; }
  }

  function onRoute() {
    const want = parseRoute();
    if (want === route.event || (want !== null && want === evp.cid && route.event !== null)) return;
    route.event = want;
    evp.gen += 1;
    closeBest();
    clearTimeout(evp.refetchTimer);
    clearTimeout(evp.retryTimer);
    Object.assign(evp, { cid: null, head: null, views: [], viewAsOf: 0, fairMethod: null, error: null, fetching: false,
                        again: false, lastFetch: 0, refetchTimer: null, retryTimer: null, rendered: null,
                        missing: "", restState: null });
    for (const k of ["cells", "keys", "best", "gone", "shownBest", "bestFlashes", "seen", "memberStates",
                     "reversedOf"]) {
      evp[k].clear();
    }
    const onEvent = want !== null && evPage !== null;
    if (!onEvent) route.event = null;
    if (evPage) evPage.hidden = !onEvent;
    board.hidden = onEvent;
    if (filtersEl) filtersEl.hidden = onEvent;
    document.title = "oddsfeed · " + (onEvent ? "event" : "live odds");
    restartStream();
    if (onEvent) {
      evPage.innerHTML = '<p class="empty">Loading the event…</p>';
      fetchEvent();
    } else {
      lastSignature = "";
      flush();
    }
  }

  /** The server vouched for market m (a snapshot / delta with its age_ms). */
  function evSeen(m, now, ageMsOverride) {
    if (route.event === null || !m) return;
    const age = ageMsOverride !== undefined ? ageMsOverride : (m.age_ms || 0);
    evp.seen.set(m.market_id, now - age);
    if (!evp.head || !m.market_type) return;
    // a market or selection with a canonical outcome the grid does not show yet: re-read the grid
    for (const sel of m.selections || []) {
      if (sel.outcome && !evp.cells.has(m.market_id + "|" + sel.selection_id)) { refetchSoon(); return; }
    }
  }

  function refetchSoon() {
    const wait = Math.max(0, evp.lastFetch + REFETCH_GAP_MS - performance.now());
    const gen = evp.gen;
    if (evp.refetchTimer) return;
    evp.refetchTimer = setTimeout(() => { evp.refetchTimer = null; if (gen === evp.gen) fetchEvent(); }, wait);
  }

  async function fetchEvent() {
    if (route.event === null) return;
    if (evp.fetching) { evp.again = true; return; }
    evp.fetching = true;
    evp.lastFetch = performance.now();
    const gen = evp.gen;
    const id = evp.cid || route.event;
    try {
      const r = await fetch(withKey("/v1/events/" + encodeURIComponent(id) + "?view=best"), { cache: "no-store" });
      if (gen !== evp.gen) return;
      if (r.status === 404) {
        evp.error = "No event " + id + " on this feed (yet).";
      } else if (!r.ok) {
        evp.error = "The event could not be loaded (HTTP " + r.status + "); retrying…";
      } else {
        const body = await r.json();
        if (gen !== evp.gen) return;
        evp.error = null;
        adoptEvent(body, performance.now());
      }
    } catch (err) {
      if (gen === evp.gen) evp.error = "The event could not be loaded; retrying…";
    } finally {
      if (gen === evp.gen) {
        evp.fetching = false;
        if (evp.again) { evp.again = false; refetchSoon(); }
        if (evp.error && !evp.head && !evp.retryTimer) {  // not there (yet): look again
          evp.retryTimer = setTimeout(() => { evp.retryTimer = null; if (gen === evp.gen) fetchEvent(); }, 3000);
        }
        schedule();
      }
    }
  }

  function adoptEvent(body, now) {
    evp.stats.fetches += 1;
    const first = !evp.cid;
    evp.head = body.event;
    evp.restState = body.state || null;
    for (const st of body.states || []) evp.reversedOf.set(st.event_id, !!st.reversed);
    for (const st of body.states || []) evNoteState(st, true);
    evp.viewAsOf = body.as_of || 0;
    evp.fairMethod = body.fair_method || null;
    // a removal older than this read is its word no more: a group it lists is back
    for (const [k, t] of evp.gone) if (t < evp.viewAsOf) evp.gone.delete(k);
    setViews(body.view || []);
    for (const v of evp.views) {
      for (const o of v.outcomes || []) {
        for (const b of o.books || []) {
          const at = now - (b.age_ms || 0);
          if (!(evp.seen.get(b.market_id) >= at)) evp.seen.set(b.market_id, at);
        }
      }
    }
    if (!first && evp.cid === evp.head.event_id && state.snapshotOf === streamGen) {
      const missing = [...new Set((evp.views || []).flatMap((v) => (v.outcomes || []).flatMap(
        (o) => (o.books || []).map((b) => b.market_id))))].filter((mid) => !state.markets.has(mid)).sort().join(",");
      if (missing && missing !== evp.missing) {  // once per set, so a market the stream never sends cannot loop
        evp.missing = missing;
        restartStream();
      }
    }
    if (first || evp.cid !== evp.head.event_id) {
      evp.cid = evp.head.event_id;
      if (route.event !== evp.cid) {  // a provider id was asked for: show the canonical one
        route.event = evp.cid;
        history.replaceState(null, "", location.pathname + location.search + "#/event/" + encodeURIComponent(evp.cid));
      }
      restartStream();
      openBest();
    }
  }

  /** The grid (and fallback values): a fetched view without the groups the best stream said
   *  left at or after the time it was read (evp.gone); its market keys and cells. */
  function setViews(views) {
    evp.views = views.filter((v) => !(evp.gone.get(v.market) >= evp.viewAsOf));
    evp.keys.clear();
    evp.cells.clear();
    for (const v of evp.views) {
      evp.keys.add(v.market);
      for (const o of v.outcomes || []) for (const b of o.books || []) evp.cells.add(b.market_id + "|" + b.selection_id);
    }
  }

  /** The best stream says market group `key` left the event as of `asOf` (server ms): it leaves
   *  the page now — its best values, its grid from the last read, its shown best and flashes. */
  function dropGroup(key, asOf) {
    if (!(evp.gone.get(key) >= asOf)) evp.gone.set(key, asOf);
    evp.best.delete(key);
    for (const m of [evp.shownBest, evp.bestFlashes]) {
      for (const k of [...m.keys()]) if (k.startsWith(key + "|")) m.delete(k);
    }
    if (evp.views.some((v) => v.market === key)) setViews(evp.views);
  }

  // the score: the member provider events' states (the GET's "states" on each read, live event_state
  // messages between them); shown is the freshest not stale one, as the API picks its "state" (not
  // stale first, then the newest provider time, then the version), turned round to the canonical sides

  function evMember(id) {
    return evp.reversedOf.has(id) || !!(evp.head && (evp.head.members || []).some((m) => m.event_id === id));
  }

  /** A member's state from the GET (fromRest) or the stream: kept unless a newer version from the same
   *  source is held (the same version from a later GET brings a fresher stale flag). */
  function evNoteState(es, fromRest) {
    if (!es || !es.event_id || (!fromRest && !evMember(es.event_id))) return false;
    const held = evp.memberStates.get(es.event_id);
    if (held && held.source === es.source && (held.version || 0) > (es.version || 0)) return false;
    evp.memberStates.set(es.event_id, es);
    if (fromRest) state.esFlagged.set(es.event_id, !!es.stale);  // the GET's word is the latest
    if (!evp.reversedOf.has(es.event_id)) refetchSoon();  // which way round it names the sides: the API knows
    return true;
  }

  /** es with the sides turned round (as streaming.event_states.turned): score, periods, red cards, innings. */
  function turnedState(es) {
    const sw = (o) => (o ? Object.assign({}, o, { home: o.away, away: o.home }) : o);
    const t = Object.assign({}, es, { red_cards: sw(es.red_cards) });
    if (es.score) {
      t.score = sw(es.score);
      if (es.score.periods) t.score.periods = es.score.periods.map(sw);
    }
    if (es.innings) {
      t.innings = es.innings.map((i) => Object.assign({}, i,
        { team: i.team === "home" ? "away" : i.team === "away" ? "home" : i.team }));
    }
    return t;
  }

  /** The state to show in the header (canonical home/away), or null. */
  function evShownState() {
    let best = null;
    let key = null;
    for (const [id, es] of evp.memberStates) {
      const rev = evp.reversedOf.get(id);
      if (rev === undefined) continue;  // not yet known which way round: until the next GET
      const ts = es.source_ts_original !== null && es.source_ts_original !== undefined
        ? es.source_ts_original : (es.source_ts || 0);
      const k = [stateStale(es) ? 0 : 1, ts, es.version || 0];
      if (!key || k[0] > key[0] || k[0] === key[0] && (k[1] > key[1] || k[1] === key[1] && k[2] > key[2])) {
        key = k;
        best = rev ? turnedState(es) : es;
      }
    }
    return best || evp.restState;
  }

  /** Refresh the header's score (the card's helpers): a new state, the clock's tick, a source's status. */
  function renderEventScore() {
    if (!evPage || route.event === null) return;
    const el = evPage.querySelector(".ev-head .score");
    if (!el) return;
    const es = evShownState();
    fillScore(el, es, Date.now(), "ev-score");
    if (es) el.dataset.member = es.event_id; else delete el.dataset.member;
  }

  // the best stream

  function openBest() {
    closeBest();
    const gen = evp.gen;
    const url = "/v1/stream?view=best&heartbeat_ms=" + HEARTBEAT_MS * 5 + "&event=" + encodeURIComponent(evp.cid);
    const src = evp.bestEs = new EventSource(withKey(url));
    src.addEventListener("open", () => { evp.bestRetryMs = 500; });
    src.addEventListener("best", (e) => {
      if (gen !== evp.gen) { src.close(); return; }
      let msg;
      try { msg = JSON.parse(e.data); } catch (err) { state.stats.errors += 1; return; }
      onBest(msg);
    });
    src.addEventListener("error", (e) => {
      if (gen !== evp.gen || e.data) return;
      // until the reconnect's snapshot: the fetched view's values (re-read every few seconds), not old ones
      evp.best.clear();
      schedule();
      if (src.readyState === EventSource.CLOSED) {  // the browser gave up: reopen (a new snapshot follows)
        src.close();
        setTimeout(() => { if (gen === evp.gen) openBest(); }, evp.bestRetryMs);
        evp.bestRetryMs = Math.min(10000, evp.bestRetryMs * 2);
      }
    });
  }

  function closeBest() {
    if (evp.bestEs) { evp.bestEs.close(); evp.bestEs = null; }
  }

  const sameBest = (a, b) => (!a && !b) || (!!a && !!b && a.price === b.price && a.market_id === b.market_id
                                            && a.selection_id === b.selection_id);

  function onBest(msg) {
    evp.stats.bestMessages += 1;
    const now = performance.now();
    const asOf = msg.as_of || 0;
    let markets;
    if (msg.snapshot) {
      const mine = (msg.events || []).find((e) => e.event_id === evp.cid);
      markets = (mine && mine.markets) || [];
      // a snapshot (on open, a reconnect or a resync of an open stream) replaces everything held:
      // a group it does not list has left the event
      const listed = new Set(markets.filter((m) => !m.removed).map((m) => m.market));
      for (const key of new Set([...evp.best.keys(), ...evp.keys])) if (!listed.has(key)) dropGroup(key, asOf);
      evp.best.clear();
    } else {
      if (msg.event_id !== evp.cid) return;
      markets = msg.markets || [];
    }
    for (const m of markets) {
      if (m.removed) { dropGroup(m.market, asOf); continue; }  // it left the event: not "no outcomes"
      if (!(evp.gone.get(m.market) > asOf)) evp.gone.delete(m.market);  // back, whole
      evp.best.set(m.market, { m, asOf });
      if (evp.head && !evp.keys.has(m.market)) refetchSoon();
    }
    schedule();
  }

  /** A change of the shown best (or best lay) price or its book flashes it: whichever
   *  answer brought it (the best stream, or a re-read that saw something the stream did not). */
  function noteBestFlash(key, side, shown, now) {
    const was = evp.shownBest.get(key + "|" + side);
    evp.shownBest.set(key + "|" + side, shown);
    if (was && shown && !sameBest(was, shown)) {
      evp.bestFlashes.set(key + "|" + side, { dir: shown.price < was.price ? "down" : "up", at: now });
      evp.stats.bestFlashes += 1;
    }
  }

  // rendering

  function fmtAge(ms) {
    if (ms === null || ms === undefined) return "";
    const s = Math.floor(ms / 1000);
    if (s < 1) return "now";
    if (s < 60) return s + " s";
    const m = Math.floor(s / 60);
    return m < 60 ? m + " min" : Math.floor(m / 60) + " h";
  }

  function cellAge(mid, now) {
    const t = evp.seen.get(mid);
    return t === undefined ? null : Math.max(0, now - t);
  }

  /** A book's live price of a grid cell: the book stream's market, else the fetched view. */
  function livePrice(bp) {
    const m = state.markets.get(bp.market_id);
    if (!m) return { price: bp.price, size: bp.size, lay: bp.lay, laySize: bp.lay_size };
    const s = (m.selections || []).find((x) => x.selection_id === bp.selection_id);
    if (!s) return { price: null, size: null, lay: null, laySize: null };
    const back = s.back && s.back.length ? s.back[0] : null;
    const lay = s.lay && s.lay.length ? s.lay[0] : null;
    return { price: back ? back[0] : (s.price === undefined ? null : s.price), size: back ? back[1] : null,
             lay: lay ? lay[0] : null, laySize: lay ? lay[1] : null };
  }

  /** best / best_lay / fair / excluded of one outcome: the best stream's, else the fetched view's. */
  function outcomeBest(v, o) {
    // the newer of the two server answers: the best stream's last message about this market, or the last re-read
    const bm = evp.best.get(v.market);
    const bo = bm && bm.asOf >= evp.viewAsOf && bm.m.outcomes.find((x) => x.outcome === o.outcome);
    if (bo) return { best: bo.best || null, best_lay: bo.best_lay || null, fair: bo.fair, excluded: bo.excluded || {} };
    const excluded = {};
    for (const b of o.books || []) if (b.excluded) excluded[b.bookmaker] = b.excluded;
    return { best: o.best || null, best_lay: o.best_lay || null, fair: o.fair, excluded };
  }

  function flashOf(map, key, now) {
    const fl = map.get(key);
    if (!fl) return null;
    if (now - fl.at >= FLASH_MS) { map.delete(key); return null; }
    return fl;
  }

  function flashAttrs(fl, now) {
    if (!fl) return { cls: "", attrs: "" };
    return { cls: " flash-" + fl.dir,
             attrs: ' data-flash-at="' + Math.round(fl.at) + '" style="animation-delay:-' + Math.round(now - fl.at) + 'ms"' };
  }

  function isLive(bp) {
    const m = state.markets.get(bp.market_id);
    return m ? !!m.in_play : false;
  }

  function marketTitle(v) {
    const specs = Object.entries(v.specifiers || {}).map(([k, x]) => (k === "line" ? x : k + " " + x)).join(" · ");
    const base = v.name || sportName(v.market_type);
    return specs && !base.includes(specs) ? base + " · " + specs : base;
  }

  function gridHtml(v, books, now) {
    const inGrid = new Set();
    for (const o of v.outcomes || []) for (const b of o.books || []) inGrid.add(b.bookmaker);
    const cols = books.filter((b) => inGrid.has(b));
    for (const b of inGrid) if (!cols.includes(b)) cols.push(b);
    const bests = (v.outcomes || []).map((o) => outcomeBest(v, o));
    const hasLay = bests.some((x) => x.best_lay) || (v.outcomes || []).some((o) => (o.books || []).some((b) => b.lay));
    const head = '<tr><th scope="col" class="oc">Outcome</th>'
      + cols.map((b) => '<th scope="col" class="bk" data-book="' + esc(b) + '">' + esc(b) + "</th>").join("")
      + '<th scope="col" class="bestcol">Best</th><th scope="col" class="faircol" title="'
      + esc("fair price: the margin removed (" + (v.fair_method || evp.fairMethod || "multiplicative") + "), averaged over the complete books")
      + '">Fair</th>' + (hasLay ? '<th scope="col" class="laycol">Best lay</th>' : "") + "</tr>";
    const rows = (v.outcomes || []).map((o, i) => {
      const ob = bests[i];
      const byBook = new Map((o.books || []).map((b) => [b.bookmaker, b]));
      noteBestFlash(v.market + "|" + o.outcome, "back", ob.best, now);
      noteBestFlash(v.market + "|" + o.outcome, "lay", ob.best_lay, now);
      const bestFl = flashOf(evp.bestFlashes, v.market + "|" + o.outcome + "|back", now);
      const layFl = flashOf(evp.bestFlashes, v.market + "|" + o.outcome + "|lay", now);
      const cells = cols.map((book) => {
        const bp = byBook.get(book);
        if (!bp) return '<td class="cell none" data-book="' + esc(book) + '">–</td>';
        const lp = livePrice(bp);
        const why = ob.excluded[book] || null;
        const isBest = !!ob.best && ob.best.market_id === bp.market_id && ob.best.selection_id === bp.selection_id;
        const isBestLay = !!ob.best_lay && ob.best_lay.market_id === bp.market_id
          && ob.best_lay.selection_id === bp.selection_id;
        // a change of the best price / book flashes the best cell; else the book's own price move does
        const fl = isBest && bestFl ? bestFl : flashOf(flashes, bp.market_id + "|" + bp.selection_id + "|back", now);
        const fa = flashAttrs(fl, now);
        let cls = "cell" + (isBest ? " best" : "") + (why ? " excluded ex-" + why : "") + (lp.price === null ? " empty" : "")
          + fa.cls;
        const title = why ? EXCLUDED_WHY[why] || why : (isBest ? "best price" : "");
        const age = cellAge(bp.market_id, now);
        return '<td class="' + cls + '" data-book="' + esc(book) + '" data-mid="' + esc(bp.market_id)
          + '" data-sel="' + esc(bp.selection_id) + '" data-price="' + (lp.price === null ? "" : lp.price) + '"'
          + (why ? ' data-excluded="' + esc(why) + '"' : "") + (title ? ' title="' + esc(title) + '"' : "") + fa.attrs + ">"
          + '<span class="p">' + (lp.price === null ? "–" : fmtPrice(lp.price)) + "</span>"
          + (lp.lay !== null ? '<span class="l' + (isBestLay ? " best-lay" : "") + '">lay ' + fmtPrice(lp.lay) + "</span>" : "")
          + '<span class="cage" data-mid="' + esc(bp.market_id) + '">' + fmtAge(age) + "</span></td>";
      }).join("");
      const bfa = flashAttrs(bestFl, now);
      const best = ob.best
        ? '<td class="bestcol' + bfa.cls + '" data-book="' + esc(ob.best.bookmaker) + '" data-price="' + ob.best.price + '"'
          + bfa.attrs + '><span class="p">' + fmtPrice(ob.best.price) + '</span><span class="bkname">'
          + esc(ob.best.bookmaker) + "</span></td>"
        : '<td class="bestcol empty">–</td>';
      const fair = '<td class="faircol" data-fair="' + (ob.fair === null || ob.fair === undefined ? "" : ob.fair) + '">'
        + (ob.fair === null || ob.fair === undefined ? "–" : '<span class="p">' + fmtPrice(ob.fair) + "</span>") + "</td>";
      let lay = "";
      if (hasLay) {
        const lfa = flashAttrs(layFl, now);
        lay = ob.best_lay
          ? '<td class="laycol' + lfa.cls + '" data-book="' + esc(ob.best_lay.bookmaker) + '" data-price="'
            + ob.best_lay.price + '"' + lfa.attrs + '><span class="p">' + fmtPrice(ob.best_lay.price)
            + '</span><span class="bkname">' + esc(ob.best_lay.bookmaker) + "</span></td>"
          : '<td class="laycol empty">–</td>';
      }
      return '<tr data-outcome="' + esc(o.outcome) + '"><th scope="row" class="oc">' + esc(o.name || o.outcome)
        + "</th>" + cells + best + fair + lay + "</tr>";
    }).join("");
    const excludedBooks = Object.entries(v.excluded_books || {});
    return '<section class="ev-market" data-market="' + esc(v.market) + '"><header class="ev-market-head">'
      + '<span class="market-name">' + esc(marketTitle(v)) + '</span><span class="key">' + esc(v.market) + "</span>"
      + (excludedBooks.length ? '<span class="spacer"></span><span class="muted">left out: '
        + excludedBooks.map(([b, r]) => esc(b) + " (" + esc(r.replace(/_/g, " ")) + ")").join(", ") + "</span>" : "")
      + '</header><div class="grid-wrap"><table class="grid"><thead>' + head + "</thead><tbody>" + rows
      + "</tbody></table></div></section>";
  }

  function renderEvent(now) {
    if (!evPage) return;
    evp.stats.renders += 1;
    const back = '<a class="back-link" href="#/">← all events</a>';
    if (!evp.head) {
      evPage.innerHTML = back + '<p class="empty">' + esc(evp.error || "Loading the event…") + "</p>";
      evp.rendered = null;
      return;
    }
    const h = evp.head;
    const live = h.in_play || [...state.markets.values()].some((m) => m.in_play);
    const members = (h.members || []).map((m) => {
      const pct = Math.round((m.confidence === undefined ? 1 : m.confidence) * 100);
      return '<li class="member" data-event="' + esc(m.event_id) + '" title="' + esc(m.event_name || m.event_id) + '">'
        + '<span class="books">' + esc((m.bookmakers || [m.source]).join(", ")) + "</span>"
        + '<span class="conf' + (pct < 90 ? " low" : "") + '">' + pct + "%</span>"
        + '<span class="how">' + esc(m.method === "self" ? "reference" : m.method) + " · " + esc(m.event_id) + "</span></li>";
    }).join("");
    const books = h.bookmakers || [];
    const sections = evp.views.map((v) => gridHtml(v, books, now));
    const top = back
      + '<article class="ev' + (live ? " in-play" : "") + '" data-event-id="' + esc(h.event_id) + '">'
      + '<header class="ev-head">' + (live ? '<span class="live">In-play</span>' : "")
      + '<h1 class="ev-name">' + esc(h.event_name || h.event_id) + "</h1>"
      + '<span class="score none ev-score" title="score, period and match clock (stale: not confirmed recently'
      + ' or its source is down)"></span>'  // filled by renderEventScore
      + '<span class="ev-sub">' + esc([sportName(h.sport), h.competition].filter(Boolean).join(" · ")) + "</span>"
      + (h.start_time ? '<time class="start" datetime="' + new Date(h.start_time).toISOString() + '">'
         + esc(fmtStart(h.start_time)) + "</time>" : "")
      + (evp.error ? '<span class="muted">' + esc(evp.error) + "</span>" : "")
      + "</header>"
      + '<div class="members"><span class="muted">Books matched to this event</span><ul>' + members + "</ul></div>";
    const keys = evp.views.map((v) => v.market).join("\n");
    const last = evp.rendered;
    if (last && last.top === top && last.keys === keys && evPage.querySelector(".ev-markets")) {
      // only the grids that changed are replaced (a hovered cell keeps its tooltip while others move)
      const els = evPage.querySelectorAll(".ev-markets > .ev-market");
      sections.forEach((html, i) => { if (html !== last.sections[i] && els[i]) els[i].outerHTML = html; });
    } else {
      evPage.innerHTML = top + '<div class="ev-markets">' + (sections.length ? sections.join("")
        : '<p class="empty">No markets of a known type on this event yet.</p>') + "</div></article>";
    }
    evp.rendered = { top, keys, sections };
    renderEventScore();
  }

  /** Once a second on the event page: ages tick, flashes end, the match clock runs. */
  function tickEvent(now) {
    if (!evPage || evPage.hidden) return;
    renderEventScore();  // the match clock runs
    for (const el of evPage.querySelectorAll(".cage[data-mid]")) {
      const t = fmtAge(cellAge(el.dataset.mid, now));
      if (el.textContent !== t) el.textContent = t;
    }
    for (const el of evPage.querySelectorAll("[data-flash-at]")) {
      if (now - Number(el.dataset.flashAt) >= FLASH_MS) {
        el.classList.remove("flash-up", "flash-down");
        el.removeAttribute("data-flash-at");
        el.style.animationDelay = "";
      }
    }
    if (evp.head && now - evp.lastFetch > EVENT_REFRESH_MS) fetchEvent();
  }

  // for tests and the curious: the page's book and its rules
  const HANDLERS = { snapshot: onSnapshot, delta: onDelta, heartbeat: onHeartbeat, status: onStatus,
                     event_state: onEventState, removed: onRemoved, resumed: onResumed };
  window.oddsBoard = { state, applyDelta, mergeSelections, ageMs, isStale, clockText, periodLabel, raceEventId,
    book: () => Object.fromEntries(state.markets),
    /** feed one stream message (as the server sends it) through the page's handlers */
    handle: (msg) => { const fn = HANDLERS[msg.type]; if (fn) fn(msg); },
    /** the event page: its grid, the best stream's values, counters */
    event: evp, route };

  renderFilters();
  window.addEventListener("hashchange", onRoute);
  if (parseRoute() !== null && evPage) onRoute();
  else connect();
  pollSources();
  setInterval(pollSources, SOURCES_POLL_MS);
  setInterval(tick, 1000);
})();
