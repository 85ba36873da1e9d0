// The live page: a signed-in user's balance, referral network and live events.
//
// It follows the same protocol as every other client (protocol/live.py):
// load the balance over HTTP (it says which stream offset it includes), then
// open /v1/live from that offset, so nothing is lost or counted twice in
// between. Events at or below the applied offset are duplicates and skipped.
// Money stays integer micro-units; it becomes text only when displayed.
"use strict";

const RECONNECT_DELAY_MS_MIN = 100;
const RECONNECT_DELAY_MS_MAX = 15_000;
const GRAPH_RELOAD_DELAY_MS = 500; // coalesces a burst of referral.joined events into one reload
const FEED_ITEMS_MAX = 200; // the page keeps this many events on screen
const GRAPH_RADIUS = 300; // matches the SVG viewBox
const TOKEN_SIGNATURE_BYTES = 64; // PASETO v4.public: payload || Ed25519 signature
// Close codes after which reconnecting with the same token cannot help (protocol/live.py CloseCode).
const FATAL_CLOSE_CODES = new Set([4000, 4001, 4004, 4404]);
const TOKEN_EXPIRED = 4003;
// Where this page's API answers: the page is <API>/live, and a region other
// than the home one serves the whole API under its own prefix (/regions/<name>).
const API_BASE = location.pathname.replace(/\/live\/?$/, "");

const state = {
  token: null,
  userId: null,
  epoch: null,
  offset: 0, // the last stream offset applied to what is on screen
  balances: new Map(), // currency -> {pending_micros, approved_micros, paid_micros}
  socket: null,
  reconnectAttempts: 0,
  reloadedAfterReset: false,
  freshMembers: new Set(),
  graphReload: null,
};

const $ = (id) => document.getElementById(id);

// --- money -------------------------------------------------------------------

function formatMicros(micros) {
  // Integer arithmetic only: micro-units are exact below 2^53.
  const sign = micros < 0 ? "−" : "";
  const abs = Math.abs(micros);
  const whole = Math.floor(abs / 1_000_000).toLocaleString("en-US");
  const fraction = String(abs % 1_000_000).padStart(6, "0").replace(/0+$/, "").padEnd(2, "0");
  return `${sign}${whole}.${fraction}`;
}

function signedMicros(micros) {
  return (micros > 0 ? "+" : "") + formatMicros(micros);
}

// --- sign-in -----------------------------------------------------------------

function tokenSubject(token) {
  // The claims of a v4.public token are readable by design; the server verifies the signature.
  if (!token.startsWith("v4.public.")) throw new Error("not a v4.public token");
  const b64 = token.slice("v4.public.".length).split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
  const bytes = Uint8Array.from(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0));
  if (bytes.length <= TOKEN_SIGNATURE_BYTES) throw new Error("token too short");
  const claims = JSON.parse(new TextDecoder().decode(bytes.subarray(0, bytes.length - TOKEN_SIGNATURE_BYTES)));
  if (typeof claims.sub !== "string") throw new Error("token has no subject");
  return claims.sub;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function setStatus(status, text) {
  $("status").dataset.state = status;
  $("status").textContent = text;
}

function signIn(token) {
  let userId;
  try {
    userId = tokenSubject(token.trim());
  } catch (err) {
    showError(`That token cannot be read: ${err.message}`);
    return;
  }
  Object.assign(state, { token: token.trim(), userId, epoch: null, offset: 0, reconnectAttempts: 0 });
  sessionStorage.setItem("dd-live-token", state.token);
  $("error").hidden = true;
  start().catch((err) => showError(err.message));
}

function signOut(message) {
  if (state.socket) state.socket.close(1000);
  state.socket = null;
  state.token = null;
  sessionStorage.removeItem("dd-live-token");
  $("dashboard").hidden = true;
  $("signin").hidden = false;
  setStatus("closed", "signed out");
  showError(message);
}

// --- HTTP --------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super(`${status} ${problem.title || ""}: ${problem.detail || ""}`);
    this.status = status;
  }
}

async function api(path) {
  const response = await fetch(API_BASE + path, { headers: { Authorization: `Bearer ${state.token}` } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

async function loadBalance() {
  const view = await api(`/v1/users/${encodeURIComponent(state.userId)}/balance`);
  state.balances = new Map(view.balances.map((b) => [b.currency, {
    pending_micros: b.pending_micros, approved_micros: b.approved_micros, paid_micros: b.paid_micros,
  }]));
  state.epoch = view.stream.epoch;
  state.offset = view.stream.offset;
  renderBalances();
}

async function loadNetwork() {
  const view = await api(`/v1/users/${encodeURIComponent(state.userId)}/network?depth=7`);
  renderGraph(view);
}

function scheduleGraphReload() {
  if (state.graphReload !== null) return;
  state.graphReload = setTimeout(() => {
    state.graphReload = null;
    loadNetwork().catch((err) => showError(`network: ${err.message}`));
  }, GRAPH_RELOAD_DELAY_MS);
}

// --- rendering ---------------------------------------------------------------

function renderBalances() {
  const body = $("balances").tBodies[0];
  body.replaceChildren();
  for (const [currency, b] of [...state.balances].sort()) {
    const row = body.insertRow();
    row.dataset.currency = currency;
    const earned = b.pending_micros + b.approved_micros + b.paid_micros;
    for (const [field, text] of [["currency", currency], ["pending", formatMicros(b.pending_micros)],
      ["approved", formatMicros(b.approved_micros)], ["paid", formatMicros(b.paid_micros)],
      ["earned", formatMicros(earned)]]) {
      const cell = row.insertCell();
      cell.dataset.field = field;
      cell.textContent = text;
    }
  }
  $("stream-position").textContent = `${state.epoch}:${state.offset}`;
}

function renderGraph(view) {
  // Radial tree: the user in the centre, level n on ring n, each subtree
  // given an angle in proportion to its size, so a viral branch gets room.
  const svgNs = "http://www.w3.org/2000/svg";
  const svg = $("graph");
  const root = view.stats.user_id;
  const children = new Map();
  for (const edge of view.edges) {
    if (!children.has(edge.referrer_id)) children.set(edge.referrer_id, []);
    children.get(edge.referrer_id).push(edge.user_id);
  }
  const sizes = new Map();
  const size = (node) => {
    let total = 1;
    for (const child of children.get(node) || []) total += size(child);
    sizes.set(node, total);
    return total;
  };
  size(root);
  const depth = Math.max(1, ...view.nodes.map((n) => n.level));
  const ring = GRAPH_RADIUS * 0.95 / depth;
  const position = new Map();
  const place = (node, from, to, level) => {
    const angle = (from + to) / 2;
    position.set(node, [Math.cos(angle) * ring * level, Math.sin(angle) * ring * level]);
    let start = from;
    const span = to - from;
    for (const child of children.get(node) || []) {
      const share = span * sizes.get(child) / (sizes.get(node) - 1);
      place(child, start, start + share, level + 1);
      start += share;
    }
  };
  place(root, 0, 2 * Math.PI, 0);

  const parts = [];
  for (const edge of view.edges) {
    const [x1, y1] = position.get(edge.referrer_id);
    const [x2, y2] = position.get(edge.user_id);
    const line = document.createElementNS(svgNs, "line");
    for (const [k, v] of Object.entries({ x1, y1, x2, y2 })) line.setAttribute(k, v.toFixed(1));
    parts.push(line);
  }
  for (const node of view.nodes) {
    const [x, y] = position.get(node.user_id);
    const circle = document.createElementNS(svgNs, "circle");
    circle.setAttribute("cx", x.toFixed(1));
    circle.setAttribute("cy", y.toFixed(1));
    circle.setAttribute("r", node.level === 0 ? 9 : Math.max(2.5, 6 - node.level * 0.5));
    circle.dataset.user = node.user_id;
    circle.dataset.level = node.level;
    if (node.level === 0) circle.classList.add("root");
    if (state.freshMembers.has(node.user_id)) circle.classList.add("fresh");
    const title = document.createElementNS(svgNs, "title");
    title.textContent = `${node.user_id} (level ${node.level})`;
    circle.append(title);
    parts.push(circle);
  }
  svg.replaceChildren(...parts);
  renderStats(view.stats);
  const members = view.nodes.length - 1;
  $("network-summary").textContent = `${view.stats.network_size} members, ${view.stats.direct_referrals} direct` +
    (view.truncated ? ` (showing ${members})` : "");
}

function renderStats(stats) {
  const rows = [
    ["direct referrals", stats.direct_referrals.toLocaleString("en-US")],
    ["network size", stats.network_size.toLocaleString("en-US")],
    ["members by level", stats.size_by_level.join(" · ")],
    ["depth", String(stats.depth)],
    ["viral coefficient", stats.viral_coefficient.toFixed(2)],
  ];
  $("stats").replaceChildren(...rows.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.stat = term;
    return [dt, dd];
  }));
}

function describe(event) {
  switch (event.type) {
    case "commission.earned":
      return `${signedMicros(event.amount_micros)} ${event.currency}: level ${event.level} ` +
        `(${event.rate_bp / 100} %) of purchase ${event.transaction_id}`;
    case "commission.approved":
      return `${formatMicros(event.amount_micros)} ${event.currency} approved (${event.entries} entries)`;
    case "commission.paid":
      return `${formatMicros(event.amount_micros)} ${event.currency} paid in payout ${event.payout_id}`;
    case "commission.reversed":
      return `${signedMicros(event.amount_micros)} ${event.currency}: level ${event.level} ${event.kind} ` +
        `of purchase ${event.transaction_id}`;
    case "referral.joined":
      return `${event.member_id} joined your network at level ${event.level}`;
    case "network.milestone":
      return `your network reached ${event.network_size.toLocaleString("en-US")} members`;
    case "balance.changed":
      return `${event.currency} pending ${signedMicros(event.pending_delta_micros)}, approved ` +
        `${signedMicros(event.approved_delta_micros)}, paid ${signedMicros(event.paid_delta_micros)}`;
    default:
      return JSON.stringify(event); // a newer server's event: shown as it is
  }
}

function appendToFeed(pub) {
  const item = document.createElement("li");
  item.dataset.kind = pub.event.type;
  item.dataset.offset = pub.offset;
  const offset = document.createElement("span");
  offset.className = "offset";
  offset.textContent = `#${pub.offset}`;
  const kind = document.createElement("span");
  kind.className = "kind";
  kind.textContent = pub.event.type;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = describe(pub.event);
  item.append(offset, kind, text);
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > FEED_ITEMS_MAX) feed.lastElementChild.remove();
}

function showVideoProgress(frame) {
  // One line per job, updated in place: progress is not part of the stream.
  let item = document.querySelector(`#feed li[data-job="${CSS.escape(frame.job_id)}"]`);
  if (item === null) {
    item = document.createElement("li");
    item.dataset.kind = "video";
    item.dataset.job = frame.job_id;
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = "video";
    const text = document.createElement("span");
    text.className = "text";
    item.append(document.createElement("span"), kind, text);
    item.firstChild.className = "offset";
    $("feed").prepend(item);
  }
  item.dataset.status = frame.status;
  item.querySelector(".text").textContent =
    `video ${frame.job_id}: ${frame.status} ${Math.round(frame.progress * 100)} %`;
}

// --- the live stream -----------------------------------------------------------

function apply(pub) {
  if (pub.epoch !== state.epoch || pub.offset <= state.offset) return; // already on screen
  const event = pub.event;
  if (event.type === "balance.changed") {
    const b = state.balances.get(event.currency) || { pending_micros: 0, approved_micros: 0, paid_micros: 0 };
    b.pending_micros += event.pending_delta_micros;
    b.approved_micros += event.approved_delta_micros;
    b.paid_micros += event.paid_delta_micros;
    state.balances.set(event.currency, b);
  } else if (event.type === "referral.joined") {
    state.freshMembers.add(event.member_id);
    scheduleGraphReload();
  }
  state.offset = pub.offset;
  renderBalances();
  appendToFeed(pub);
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}${API_BASE}/v1/live`);
  state.socket = socket;
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: "connect", token: state.token, offset: state.offset, epoch: state.epoch }));
  };
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (frame.type === "ping") {
      socket.send('{"type":"pong"}');
    } else if (frame.type === "connected") {
      state.reconnectAttempts = 0;
      if (frame.recovered) {
        state.reloadedAfterReset = false;
        setStatus("live", "live");
      } else if (!state.reloadedAfterReset) {
        // The stream could not be resumed (history gone, or a new epoch):
        // reload over HTTP, then subscribe again from what was loaded.
        state.reloadedAfterReset = true;
        socket.onclose = null;
        socket.close(1000);
        setStatus("reconnecting", "reloading");
        reloadThenConnect();
      } else {
        // Reloaded once already: take the stream from where the server stands.
        state.epoch = frame.epoch;
        state.offset = Math.max(state.offset, frame.offset);
        setStatus("live", "live");
      }
    } else if (frame.type === "pub") {
      apply(frame);
    } else if (frame.type === "video") {
      showVideoProgress(frame);
    }
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (FATAL_CLOSE_CODES.has(event.code)) {
      signOut(`The live connection was refused (${event.code}): ${event.reason}`);
    } else if (event.code === TOKEN_EXPIRED) {
      signOut(`Your session has ended (${event.reason}): sign in with a new token.`);
    } else {
      const delay = Math.min(RECONNECT_DELAY_MS_MAX, RECONNECT_DELAY_MS_MIN * 2 ** state.reconnectAttempts);
      state.reconnectAttempts += 1;
      setStatus("reconnecting", `reconnecting (${event.code})`);
      setTimeout(connect, delay * (0.5 + Math.random() / 2));
    }
  };
}

function reloadThenConnect() {
  Promise.all([loadBalance(), loadNetwork()]).then(connect, (err) => {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) signOut(err.message);
    else {
      showError(err.message);
      setTimeout(reloadThenConnect, RECONNECT_DELAY_MS_MAX);
    }
  });
}

async function start() {
  $("signin").hidden = true;
  $("dashboard").hidden = false;
  $("user-id").textContent = state.userId;
  $("feed").replaceChildren();
  setStatus("reconnecting", "loading");
  try {
    await Promise.all([loadBalance(), loadNetwork()]);
  } catch (err) {
    signOut(err.message);
    return;
  }
  connect();
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token-input").value);
  });
  // A link may carry the token in its fragment, which browsers never send to servers.
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) history.replaceState(null, "", location.pathname);
  const token = fromLink || sessionStorage.getItem("dd-live-token");
  if (token) signIn(token);
});
