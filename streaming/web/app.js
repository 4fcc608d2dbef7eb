/* oddsfeed live odds board: plain JavaScript, EventSource, no build step.
 *
 * The book is rebuilt exactly as the Python client (streaming/client.py) and
 * feed.models.apply_delta do it:
 *   snapshot            → replaces the whole book
 *   delta kind "image"  → replaces the market
 *   delta kind "delta"  → skipped when seq <= the held seq; otherwise seq and
 *                         latency tags are taken, "header" replaces every
 *                         market-level field (else "traded_volume" updates the
 *                         market's volume) and each entry of "selections"
 *                         replaces the selection with that id (new ids appended)
 *   resumed             → recovered:false is followed by a snapshot (replace)
 *
 * Ages and staleness are recomputed in the page like the Python client does:
 * a market is confirmed when a message about it arrives (minus the age the
 * server reported) and by each heartbeat while its source is not DOWN and
 * the server has not flagged it stale; stale = source DOWN, or flagged by the
 * server (snapshot / delta / status), or older than 10 s in play / 60 s
 * pre-match (?stale_in_play_ms= / ?stale_pre_match_ms= change these).
 *
 * Query parameters of the page: sport=, in_play=true|false (initial filters),
 * api_key= (passed on to /v1 when the server requires one).
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
  const CLOSED = new Set(["CLOSED", "SETTLED", "CANCELLED"]);
  const SUSPENDED = new Set(["SUSPENDED", "INACTIVE"]);

  const state = {
    markets: new Map(),    // market_id → market (the wire JSON, without age_ms / stale)
    confirmed: new Map(),  // market_id → performance.now() of the last confirmation
    flagged: new Map(),    // market_id → the server said stale
    sources: new Map(),    // source → {state, reason}
    token: null,
    connected: false,
    filter: { sport: params.get("sport") || "all", play: playFromParam(params.get("in_play")) },
    stats: { snapshots: 0, deltas: 0, duplicates: 0, heartbeats: 0, statuses: 0, resumedRecovered: 0,
             resumedLost: 0, flashes: 0, renders: 0, errors: 0, lagMs: null },
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

  function mergeSelections(current, changed) {
    const byId = new Map(changed.map((s) => [s.selection_id, s]));
    const out = current.map((s) => {
      const c = byId.get(s.selection_id);
      if (c === undefined) return s;
      byId.delete(s.selection_id);
      return c;
    });
    for (const s of byId.values()) out.push(s);
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

  function isStale(id, now) {
    const m = state.markets.get(id);
    const age = ageMs(id, now);
    if (!m || age === null) return true;
    if (sourceDown(m.source) || state.flagged.get(id)) return true;
    return age > (m.in_play ? STALE_IN_PLAY_MS : STALE_PRE_MATCH_MS);
  }

  // -- messages ------------------------------------------------------------------------

  const dirty = new Set();
  let structureDirty = true;

  function onSnapshot(msg) {
    const now = performance.now();
    state.markets.clear();
    state.confirmed.clear();
    state.flagged.clear();
    for (const raw of msg.markets) {
      state.markets.set(raw.market_id, stripAge(raw));
      state.confirmed.set(raw.market_id, now - (raw.age_ms || 0));
      state.flagged.set(raw.market_id, !!raw.stale);
    }
    state.stats.snapshots += 1;
    structureDirty = true;
    schedule();
  }

  function onDelta(d) {
    const cur = state.markets.get(d.market_id);
    if (cur && d.seq <= cur.seq) {  // a duplicate (e.g. replayed around a resume)
      state.stats.duplicates += 1;
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
    state.confirmed.set(d.market_id, performance.now() - (d.age_ms || 0));
    state.flagged.set(d.market_id, !!d.stale);
    dirty.add(d.market_id);
    schedule();
  }

  function onHeartbeat() {
    state.stats.heartbeats += 1;
    const now = performance.now();
    for (const [id, m] of state.markets) {
      if (sourceDown(m.source) || state.flagged.get(id)) continue;
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
    renderBanner();
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
      if (!events.has(key)) events.set(key, { id: key, name: m.event_name || m.name || key, in_play: false,
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

  function marketInner(m, now) {
    const stale = isStale(m.market_id, now);
    const suspended = SUSPENDED.has(m.status);
    const badges = [];
    if (suspended) badges.push('<span class="badge suspended">' + (m.status === "INACTIVE" ? "Inactive" : "Suspended") + "</span>");
    if (stale) badges.push('<span class="badge stale" title="not confirmed recently or source down">Stale</span>');
    const sels = (m.selections || []).filter((s) => s.status !== "REMOVED" && s.status !== "HIDDEN")
      .slice().sort((a, b) => (a.sort_priority || 0) - (b.sort_priority || 0));
    const rows = sels.map((s) => '<tr class="sel' + (s.status !== "ACTIVE" ? " sel-off" : "") + '">'
      + '<th scope="row">' + esc(s.name || s.selection_id) + "</th>"
      + priceCell(m, s, "back", now) + priceCell(m, s, "lay", now) + "</tr>").join("");
    const vol = m.traded_volume ? '<span class="matched">' + fmtSize(m.traded_volume) + " matched</span>" : "";
    return '<div class="market-head"><span class="market-name">' + esc(m.name || m.market_type) + "</span>"
      + badges.join("") + '<span class="spacer"></span>' + vol
      + '<span class="age" data-age="' + esc(m.market_id) + '">updated ' + fmtAgo(ageMs(m.market_id, now)) + "</span></div>"
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
          + '<span class="event-name">' + esc(ev.name) + "</span>"
          + (ev.in_play ? "" : '<time class="start">' + esc(fmtStart(ev.start)) + "</time>") + "</header>"
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

  /** Once a second: ages tick, stale markers follow the clock, flashes expire. */
  function tick() {
    const now = performance.now();
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
    if (down.length) {
      kind = "down";
      html = down.map(([n, s]) => "<strong>Source " + esc(n) + " is DOWN</strong>" + why(s)).join(" · ")
        + " — its prices are not being confirmed and are marked stale.";
    } else if (!state.connected && state.stats.snapshots) {
      kind = "offline";
      html = "<strong>Connection to the feed lost</strong> — reconnecting; prices shown may be out of date.";
    } else if (degraded.length) {
      kind = "degraded";
      html = degraded.map(([n, s]) => "<strong>Source " + esc(n) + " is degraded</strong>" + why(s)).join(" · ")
        + " — updates may be delayed.";
    }
    if (!kind) {
      if (!banner.hidden) { banner.hidden = true; banner.dataset.kind = ""; }
      return;
    }
    if (banner.innerHTML !== html) banner.innerHTML = html;
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
    const shown = board.querySelectorAll(".market").length;
    metaEl.textContent = shown + " markets · " + (rate >= 10 ? Math.round(rate) : rate.toFixed(1)) + " updates/s"
      + (p50 === null ? "" : " · lag " + p50 + " ms");
  }

  function setConnected(on, text) {
    state.connected = on;
    connEl.dataset.state = on ? "live" : "connecting";
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
    history.replaceState(null, "", location.pathname + (qs ? "?" + qs : ""));
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

  function connect() {
    let url = "/v1/stream?heartbeat_ms=" + HEARTBEAT_MS;
    if (state.token) url += "&last_event_id=" + encodeURIComponent(state.token);
    es = new EventSource(withKey(url));
    const handle = (fn) => (e) => {
      if (e.lastEventId) state.token = e.lastEventId;
      let msg;
      try { msg = JSON.parse(e.data); } catch (err) { state.stats.errors += 1; return; }
      fn(msg);
    };
    es.addEventListener("open", () => { retryMs = 500; setConnected(true, "live"); });
    es.addEventListener("snapshot", handle(onSnapshot));
    es.addEventListener("delta", handle(onDelta));
    es.addEventListener("heartbeat", handle(onHeartbeat));
    es.addEventListener("status", handle(onStatus));
    es.addEventListener("resumed", handle((msg) => {
      if (msg.recovered) state.stats.resumedRecovered += 1;
      else state.stats.resumedLost += 1;  // the snapshot that follows replaces the book
    }));
    es.addEventListener("error", (e) => {
      if (e.data) {  // an "error" event sent by the server
        state.stats.errors += 1;
        return;
      }
      if (es.readyState === EventSource.CLOSED) {
        // the browser gave up (e.g. a 503): reconnect ourselves, resuming with the last token
        setConnected(false, "reconnecting…");
        es.close();
        setTimeout(connect, retryMs);
        retryMs = Math.min(10000, retryMs * 2);
      } else {
        setConnected(false, "reconnecting…");  // EventSource retries by itself with Last-Event-ID
      }
    });
  }

  async function pollSources() {
    try {
      const r = await fetch(withKey("/v1/sources"), { cache: "no-store" });
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

  // for tests and the curious: the page's book and its rules
  const HANDLERS = { snapshot: onSnapshot, delta: onDelta, heartbeat: onHeartbeat, status: onStatus };
  window.oddsBoard = { state, applyDelta, mergeSelections, ageMs, isStale,
    book: () => Object.fromEntries(state.markets),
    /** feed one stream message (as the server sends it) through the page's handlers */
    handle: (msg) => { const fn = HANDLERS[msg.type]; if (fn) fn(msg); } };

  renderFilters();
  connect();
  pollSources();
  setInterval(pollSources, SOURCES_POLL_MS);
  setInterval(tick, 1000);
})();
