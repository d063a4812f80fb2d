// marketflow dashboard: one WebSocket to /stream (ticks, bbo, status) plus polls of /health
// and /api/messages. Everything comes from the daemon that served this page; nothing else is
// loaded. Text from the wire (symbols, venues, FIX messages) is only ever set as textContent.
"use strict";

(() => {
  const WINDOW_MS = 5 * 60 * 1000; // the price charts show the last five minutes
  const MAX_POINTS = 3000; // per exchange and pair: 10 Hz x 5 min
  const HEALTH_EVERY_MS = 2000;
  const FIX_EVERY_MS = 3000;
  const FIX_ROWS = 15;
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const TOKEN_KEY = "marketflow.controlToken"; // sessionStorage: this tab only
  const COLOURS = ["#4fc3f7", "#ffb74d", "#ba68c8", "#81c784", "#f06292", "#fff176", "#90a4ae"];

  const $ = (id) => document.getElementById(id);
  const state = {
    ticks: new Map(), // symbol -> Map(exchange -> {price, prev, at})
    history: new Map(), // symbol -> Map(exchange -> [[at, price], ...])
    bbo: new Map(), // symbol -> {doc, at}
    status: new Map(), // venue -> {state, since_ms}
    health: null,
    mode: null,
    fix: null, // {messages} or {off: reason}
  };
  let modeSwitches = 0; // a /health answer asked before the last switch shows the old mode
  const colourOf = new Map(); // exchange -> colour, stable for the page's life
  const dirty = new Set();
  let frameQueued = false;

  // -- helpers ------------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function cell(row, text, className) {
    const td = el("td", className, text);
    row.appendChild(td);
    return td;
  }

  function fmtPrice(p) {
    if (p === null || p === undefined) return "—";
    const digits = p >= 1000 ? 2 : p >= 1 ? 4 : 6;
    return p.toFixed(digits);
  }

  function fmtAge(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
    return ms < 10000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms / 1000) + " s";
  }

  function fmtClock(ms) {
    return new Date(ms).toISOString().slice(11, 23);
  }

  function colour(exchange) {
    if (!colourOf.has(exchange)) colourOf.set(exchange, COLOURS[colourOf.size % COLOURS.length]);
    return colourOf.get(exchange);
  }

  function touch(what) {
    dirty.add(what);
    if (!frameQueued) {
      frameQueued = true;
      requestAnimationFrame(render);
    }
  }

  function notice(text) {
    const p = $("notice");
    p.textContent = text || "";
    p.hidden = !text;
  }

  // -- the stream ---------------------------------------------------------------------------

  const stream = { ws: null, attempt: 0, retryAt: 0, timer: null };

  function setStream(kind, text) {
    const badge = $("stream-state");
    badge.dataset.state = kind;
    badge.textContent = text;
  }

  function connect() {
    clearTimeout(stream.timer);
    setStream("connecting", "stream: connecting");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/stream");
    stream.ws = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify({ op: "subscribe", channels: ["ticks", "bbo", "status"] }));
    };
    ws.onmessage = (event) => {
      if (stream.attempt !== 0 || $("stream-state").dataset.state !== "live") {
        stream.attempt = 0;
        setStream("live", "stream: live");
      }
      onMessage(JSON.parse(event.data));
    };
    ws.onclose = () => {
      if (stream.ws !== ws) return;
      stream.ws = null;
      // exponential backoff with jitter: a restarting daemon is not hit by every tab at once
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** stream.attempt);
      const delay = Math.round(base * (0.5 + Math.random() / 2));
      stream.attempt += 1;
      stream.retryAt = Date.now() + delay;
      stream.timer = setTimeout(connect, delay);
      showRetry();
    };
  }

  function showRetry() {
    if (stream.ws !== null) return;
    const secs = Math.max(0, Math.ceil((stream.retryAt - Date.now()) / 1000));
    setStream("down", `stream down, reconnecting in ${secs} s (attempt ${stream.attempt})`);
  }

  function onMessage(msg) {
    if (msg.type === "error") {
      notice("stream: " + msg.error);
      return;
    }
    if (msg.type !== "snapshot" && msg.type !== "update") return;
    const whole = msg.type === "snapshot";
    const data = msg.data || {};
    if (msg.channel === "ticks") onTicks(data);
    else if (msg.channel === "bbo") onBbo(data, whole);
    else if (msg.channel === "status") onStatus(data, whole);
  }

  function onTicks(data) {
    const now = Date.now();
    for (const [symbol, payload] of Object.entries(data)) {
      if (!state.ticks.has(symbol)) {
        state.ticks.set(symbol, new Map());
        state.history.set(symbol, new Map());
      }
      const latest = state.ticks.get(symbol);
      const hist = state.history.get(symbol);
      for (const [exchange, tick] of Object.entries(payload.prices || {})) {
        const held = latest.get(exchange);
        if (held && held.price === tick.price && held.ts === tick.timestamp_ms) continue;
        latest.set(exchange, { price: tick.price, prev: held ? held.price : null,
                               ts: tick.timestamp_ms, at: now });
        if (!hist.has(exchange)) hist.set(exchange, []);
        const points = hist.get(exchange);
        points.push([now, tick.price]);
        while (points.length > MAX_POINTS || (points.length && points[0][0] < now - WINDOW_MS)) {
          points.shift();
        }
      }
    }
    touch("prices");
  }

  function onBbo(data, whole) {
    if (whole) state.bbo.clear();
    const now = Date.now();
    for (const [symbol, doc] of Object.entries(data)) {
      const held = state.bbo.get(symbol);
      if (held && doc.seq < held.doc.seq) continue; // an older view never replaces a newer
      state.bbo.set(symbol, { doc, at: now });
    }
    touch("bbo");
  }

  function onStatus(data, whole) {
    if (whole) state.status.clear();
    for (const [venue, doc] of Object.entries(data)) {
      state.status.set(venue, { state: doc.state, since_ms: doc.since_ms });
    }
    touch("feeds");
    touch("prices");
  }

  // -- polls --------------------------------------------------------------------------------

  async function getJson(path) {
    const response = await fetch(path, { cache: "no-store" });
    const body = await response.json();
    return { status: response.status, body };
  }

  async function pollHealth() {
    const switches = modeSwitches;
    try {
      const { body } = await getJson("/health");
      state.health = body;
      if (body.mode && switches === modeSwitches) setMode(body.mode);
      const badge = $("health-state");
      badge.dataset.state = body.status === "ok" ? "ok" : "degraded";
      badge.textContent = "health: " + body.status;
    } catch (err) {
      const badge = $("health-state");
      badge.dataset.state = "unreachable";
      badge.textContent = "health: unreachable";
    }
    touch("feeds");
    setTimeout(pollHealth, HEALTH_EVERY_MS);
  }

  async function pollFix() {
    try {
      const { status, body } = await getJson(`/api/messages?limit=${FIX_ROWS}`);
      state.fix = status === 200 ? { messages: body.messages }
        : { off: status === 404 ? "capture is off" : body.error || "HTTP " + status };
    } catch (err) {
      state.fix = { off: "unreachable" };
    }
    touch("fix");
    setTimeout(pollFix, FIX_EVERY_MS);
  }

  // -- the mode -----------------------------------------------------------------------------

  function setMode(mode) {
    state.mode = mode;
    const shown = $("mode");
    shown.textContent = mode;
    shown.dataset.mode = mode;
    for (const id of ["mode-live", "mode-test"]) {
      const button = $(id);
      button.setAttribute("aria-pressed", String(button.dataset.mode === mode));
    }
  }

  function setSwitching(on) {
    $("mode-live").disabled = on;
    $("mode-test").disabled = on;
  }

  async function switchMode(mode) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    setSwitching(true);
    try {
      const response = await fetch("/mode/" + encodeURIComponent(mode), { method: "POST", headers });
      const body = await response.json();
      if (response.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        askToken(mode, token ? "that token was refused" : body.error);
        return;
      }
      if (!response.ok) {
        notice(`switch to ${mode} failed: ${body.error}`);
        return;
      }
      notice("");
      modeSwitches += 1;
      setMode(body.mode);
    } catch (err) {
      notice(`switch to ${mode} failed: the daemon is unreachable`);
    } finally {
      setSwitching(false);
    }
  }

  function askToken(mode, why) {
    const form = $("token-form");
    form.dataset.mode = mode;
    $("token-mode").textContent = mode;
    form.hidden = false;
    notice(why ? "control token needed: " + why : "");
    $("token-input").focus();
  }

  function wireControls() {
    for (const id of ["mode-live", "mode-test"]) {
      $(id).addEventListener("click", (e) => switchMode(e.currentTarget.dataset.mode));
    }
    const form = $("token-form");
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("token-input");
      const token = input.value.trim();
      input.value = "";
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      form.hidden = true;
      switchMode(form.dataset.mode);
    });
    $("token-cancel").addEventListener("click", () => {
      form.hidden = true;
      $("token-input").value = "";
      notice("");
    });
  }

  // -- rendering ----------------------------------------------------------------------------

  function render() {
    frameQueued = false;
    if (dirty.has("prices")) renderPrices();
    if (dirty.has("bbo")) renderBbo();
    if (dirty.has("feeds")) renderFeeds();
    if (dirty.has("fix")) renderFix();
    dirty.clear();
  }

  const cards = new Map(); // symbol -> {root, tbody, canvas}

  function card(symbol) {
    let c = cards.get(symbol);
    if (c) return c;
    const root = el("div", "card");
    root.dataset.symbol = symbol;
    root.appendChild(el("h3", null, symbol));
    const table = el("table");
    const tbody = el("tbody");
    table.appendChild(tbody);
    root.appendChild(table);
    const canvas = el("canvas");
    canvas.setAttribute("aria-label", `${symbol} price, last five minutes`);
    root.appendChild(canvas);
    c = { root, tbody, canvas };
    cards.set(symbol, c);
    const holder = $("prices");
    holder.querySelector(".empty")?.remove();
    const after = [...cards.keys()].sort().find((s) => s > symbol);
    holder.insertBefore(root, after ? cards.get(after).root : null);
    return c;
  }

  function renderPrices() {
    const now = Date.now();
    for (const [symbol, latest] of state.ticks) {
      const c = card(symbol);
      const rows = [];
      for (const exchange of [...latest.keys()].sort()) {
        const t = latest.get(exchange);
        const tr = el("tr");
        tr.dataset.exchange = exchange;
        const venue = state.status.get(exchange);
        if (venue && venue.state !== "up") tr.dataset.state = venue.state;
        const name = cell(tr, exchange);
        const swatch = el("span", "swatch");
        swatch.style.background = colour(exchange);
        name.prepend(swatch);
        const move = t.prev === null || t.prev === t.price ? "" : t.price > t.prev ? "up" : "down";
        cell(tr, fmtPrice(t.price), "num price " + move);
        cell(tr, fmtAge(now - t.at), "num age");
        const mark = cell(tr, "");
        if (venue && venue.state !== "up") mark.appendChild(el("span", "state", venue.state));
        rows.push(tr);
      }
      c.tbody.replaceChildren(...rows);
      drawChart(c.canvas, state.history.get(symbol), now);
    }
  }

  function drawChart(canvas, hist, now) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
    if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    let lo = Infinity;
    let hi = -Infinity;
    for (const points of hist.values()) {
      for (const [, p] of points) {
        if (p < lo) lo = p;
        if (p > hi) hi = p;
      }
    }
    if (lo === Infinity) return;
    if (hi === lo) {
      hi += Math.abs(hi) * 1e-4 || 1;
      lo -= Math.abs(lo) * 1e-4 || 1;
    }
    // the time axis grows with what the page has seen, from one minute up to WINDOW_MS
    let oldest = now;
    for (const points of hist.values()) if (points.length) oldest = Math.min(oldest, points[0][0]);
    const span = Math.min(WINDOW_MS, Math.max(60000, now - oldest));
    const pad = 12;
    const x = (at) => ((at - (now - span)) / span) * w;
    const y = (p) => pad + (1 - (p - lo) / (hi - lo)) * (h - 2 * pad);
    g.strokeStyle = "#263040";
    g.lineWidth = 1;
    g.strokeRect(0.5, 0.5, w - 1, h - 1);
    g.fillStyle = "#7d8a9c";
    g.font = "10px sans-serif";
    g.fillText(fmtPrice(hi), 4, 10);
    g.fillText(fmtPrice(lo), 4, h - 3);
    const label = span >= 120000 ? `-${Math.round(span / 60000)} min` : `-${Math.round(span / 1000)} s`;
    g.fillText(label, w - g.measureText(label).width - 4, h - 3);
    g.lineWidth = 1.5;
    for (const [exchange, points] of hist) {
      if (!points.length) continue;
      g.strokeStyle = colour(exchange);
      g.beginPath();
      points.forEach(([at, p], i) => (i ? g.lineTo(x(at), y(p)) : g.moveTo(x(at), y(p))));
      g.lineTo(w, y(points[points.length - 1][1])); // the price holds until it changes
      g.stroke();
    }
  }

  function renderBbo() {
    const tbody = $("bbo").tBodies[0];
    const now = Date.now();
    const rows = [];
    for (const symbol of [...state.bbo.keys()].sort()) {
      const { doc, at } = state.bbo.get(symbol);
      const tr = el("tr");
      tr.dataset.symbol = symbol;
      tr.dataset.crossed = String(Boolean(doc.crossed));
      tr.dataset.locked = String(Boolean(doc.locked));
      cell(tr, symbol);
      for (const side of [doc.bid, doc.ask]) {
        const size = side && side.size !== null && side.size !== undefined ? ` × ${side.size}` : "";
        cell(tr, side ? fmtPrice(side.price) + size : "—", "num");
        const age = side ? ` (${fmtAge(side.age_ms + (now - at))})` : "";
        cell(tr, side ? side.exchange + age : "—");
      }
      cell(tr, fmtPrice(doc.spread), "num");
      cell(tr, fmtPrice(doc.mid), "num");
      const marks = cell(tr, "");
      if (doc.crossed) marks.appendChild(el("span", "mark crossed", "CROSSED"));
      if (doc.locked) marks.appendChild(el("span", "mark locked", "LOCKED"));
      cell(tr, (doc.venues || []).join(", "));
      const dropped = cell(tr, "", "dropped");
      tr.dataset.dropped = (doc.dropped || []).map((d) => d.exchange).join(",");
      for (const d of doc.dropped || []) {
        const mark = el("span", "mark " + (d.reason === "down" ? "down" : "stale"),
                        `${d.exchange} ${d.reason}`);
        mark.dataset.venue = d.exchange;
        mark.title = "last update " + (d.last_update || "never");
        dropped.appendChild(mark);
      }
      rows.push(tr);
    }
    if (rows.length) tbody.replaceChildren(...rows);
  }

  function venueState(name, feed) {
    const streamed = state.status.get(name);
    if (streamed) return streamed.state;
    if (!feed) return "unknown";
    return !feed.connected ? "down" : feed.stale ? "stale" : "up";
  }

  function renderFeeds() {
    const tbody = $("feeds").tBodies[0];
    const health = state.health || {};
    const feeds = health.exchanges || {};
    const names = [...new Set([...Object.keys(feeds), ...state.status.keys()])].sort();
    const rows = names.map((name) => {
      const f = feeds[name];
      const tr = el("tr");
      tr.dataset.venue = name;
      tr.dataset.state = venueState(name, f);
      cell(tr, name);
      cell(tr, "").appendChild(el("span", "state", tr.dataset.state));
      if (!f) {
        const td = cell(tr, "not running in this mode");
        td.colSpan = 8;
        return tr;
      }
      cell(tr, f.protocol);
      cell(tr, f.connected ? "yes" : "no");
      cell(tr, f.last_tick_age_s === null ? "—" : fmtAge(f.last_tick_age_s * 1000), "num");
      cell(tr, f.clock_skew_s === null ? "—" : fmtAge(f.clock_skew_s * 1000), "num");
      cell(tr, f.reconnects, "num");
      cell(tr, f.rejected, "num");
      cell(tr, f.ticks, "num");
      cell(tr, f.last_error || "", "raw").title = f.last_error || "";
      return tr;
    });
    if (rows.length) tbody.replaceChildren(...rows);
    const pipe = health.pipeline || {};
    const lag = pipe.tick_to_cache_ms || {};
    const parts = [];
    if (lag.p50_ms !== undefined) parts.push(`tick→cache p50 ${lag.p50_ms} ms, p99 ${lag.p99_ms} ms`);
    if (health.loop_lag) parts.push(`loop lag max ${health.loop_lag.max_ms} ms`);
    if (health.queues) parts.push(`fan-in queue ${health.queues.fanin}`);
    $("pipeline").textContent = parts.join(" · ");
  }

  function renderFix() {
    const tbody = $("fix").tBodies[0];
    const fix = state.fix;
    $("fix-state").textContent = fix && fix.off ? fix.off : "";
    if (!fix || !fix.messages) return;
    const rows = fix.messages.map((m) => {
      const tr = el("tr");
      tr.dataset.id = m.id;
      cell(tr, m.id, "num");
      cell(tr, fmtClock(m.received_ms));
      cell(tr, m.msg_type_name ? `${m.msg_type} ${m.msg_type_name}` : m.msg_type || "?");
      cell(tr, `${m.sender || "?"} → ${m.target || "?"}`);
      cell(tr, m.seq_num === null ? "—" : m.seq_num, "num");
      cell(tr, m.symbol || "");
      cell(tr, m.raw, "raw").title = m.raw;
      return tr;
    });
    if (rows.length) tbody.replaceChildren(...rows);
    else tbody.replaceChildren(emptyRow(7, "none captured"));
  }

  function emptyRow(span, text) {
    const tr = el("tr", "empty");
    const td = cell(tr, text);
    td.colSpan = span;
    return tr;
  }

  // -- start --------------------------------------------------------------------------------

  $("window-min").textContent = String(WINDOW_MS / 60000);
  wireControls();
  connect();
  pollHealth();
  pollFix();
  setInterval(() => {
    showRetry(); // the reconnect countdown
    touch("prices"); // ages and the chart's time axis move on without new ticks
    touch("bbo");
  }, 1000);
})();
