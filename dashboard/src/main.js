// The operator console: signs in, lists the tenant's devices (search, filters, paging), shows a device
// (current values with units, charts over a chosen range, state, commands, credentials), the tenant's
// alerts pushed live (acknowledge), alert rules, dead letters, users and API keys.
// It talks to the API and the realtime endpoint on their own origins, as any external frontend would.
// The API is the page's origin unless ?api=https://api.example.com says otherwise. The realtime endpoint
// is ?ws=wss://rt.example.com/ws if given, else `realtime_url` of config.json next to the page (the API
// serves it from IOT_PUBLIC_REALTIME_URL), else ws(s)://<the page's host>:8001/ws.
// The view is in the URL (?view=devices&device=...&range=24h), so it can be shared and reloaded.
import "uplot/dist/uPlot.min.css";
import { Api } from "./api.js";
import { MetricChart } from "./chart.js";
import { Realtime } from "./realtime.js";
import { $, absoluteTime, formatValue, h, painted, relativeTime, unitOf } from "./util.js";

const startParams = new URLSearchParams(location.search);
const wsScheme = location.protocol === "https:" ? "wss:" : "ws:";
const realtimeUrl = findRealtimeUrl();

async function findRealtimeUrl() {
  if (startParams.get("ws")) return startParams.get("ws");
  let configured = null;
  try {
    const response = await fetch("config.json", { cache: "no-store", credentials: "omit" });
    if (response.ok) configured = (await response.json()).realtime_url ?? null;
    else console.warn(`config.json: ${response.status}; the realtime endpoint is guessed`);
  } catch (err) {
    console.warn(`config.json: ${err.message}; the realtime endpoint is guessed`);
  }
  if (!configured) return `${wsScheme}//${location.hostname}:8001/ws`;
  // A path (/ws behind an Ingress) is on the page's own host, over ws or wss as the page is http or https.
  const url = new URL(configured, location.href);
  if (url.protocol === "http:" || url.protocol === "https:") url.protocol = wsScheme;
  return url.href;
}

const api = new Api(startParams.get("api") || location.origin);
// Measured render times (ms from the data's arrival to the frame painted), read by the browser tests.
window.consoleTimings = {};

// ---------------------------------------------------------------------------------------------- URL state
const VIEWS = ["devices", "alerts", "rejects", "users", "keys"];
const RANGES = {
  "15m": { ms: 15 * 60e3, bucket: null },
  "1h": { ms: 3600e3, bucket: null },
  "24h": { ms: 86400e3, bucket: "5m" },
  "7d": { ms: 7 * 86400e3, bucket: "1h" },
  "30d": { ms: 30 * 86400e3, bucket: "2h" },
};
const BUCKETS = [
  ["1m", 60],
  ["5m", 300],
  ["10m", 600],
  ["15m", 900],
  ["30m", 1800],
  ["1h", 3600],
  ["2h", 7200],
  ["6h", 21600],
  ["12h", 43200],
  ["1d", 86400],
  ["7d", 604800],
];
const BUCKET_S = Object.fromEntries(BUCKETS);

function urlState() {
  const p = new URLSearchParams(location.search);
  return {
    view: VIEWS.includes(p.get("view")) ? p.get("view") : "devices",
    device: p.get("device") || null,
    range: p.get("range") in RANGES || p.get("range") === "custom" ? p.get("range") : "1h",
    from: p.get("from"),
    to: p.get("to"),
    q: p.get("q") || "",
    per: ["50", "100", "500"].includes(p.get("per")) ? p.get("per") : "50",
    status: p.get("status") || "",
    type: p.get("type") || "",
    tenant: p.get("tenant") || "",
  };
}

// Changes some keys of the URL (null removes one); other parameters (?api=, ?ws=) are kept.
function setUrl(changes, push = false) {
  const p = new URLSearchParams(location.search);
  for (const [key, value] of Object.entries(changes)) {
    if (value === null || value === undefined || value === "") p.delete(key);
    else p.set(key, value);
  }
  const url = `${location.pathname}?${p}`;
  if (url === `${location.pathname}${location.search}`) return;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

// ----------------------------------------------------------------------------------------------- session
let me = null;
let permissions = new Set();
let realtime = null;
const timers = [];

function can(permission) {
  return permissions.has(permission);
}

// Controls a role cannot use are removed from view (hidden), not merely disabled.
function applyPermissions() {
  for (const el of document.querySelectorAll("[data-needs]")) {
    if (!can(el.dataset.needs)) el.hidden = true;
    else if (el.tagName !== "SECTION") el.hidden = false;
  }
}

async function signedIn() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("logout").hidden = false;
  await loadIdentity();
  await startTenant();
  timers.push(setInterval(() => refreshDeviceTimes(), 15000));
  timers.push(setInterval(() => reloadDevicePage().catch(() => {}), 30000));
}

async function loadIdentity() {
  const wanted = urlState().tenant;
  me = await api.me();
  permissions = new Set(me.permissions);
  $("role").textContent = me.kind === "api_key" ? `API key: ${me.scopes.join(", ")}` : me.role;
  $("role").title = me.platform_admin ? "platform admin" : "";
  if (me.platform_admin) {
    const tenants = await api.tenants();
    const select = $("tenant-switch");
    select.replaceChildren(...tenants.map((t) => h("option", { value: t.id }, t.name)));
    select.value = tenants.some((t) => t.id === wanted) ? wanted : me.tenant_id;
    $("tenant-switch-label").hidden = false;
    $("tenant-name").hidden = true;
    if (select.value !== me.tenant_id) api.tenantId = select.value;
  } else {
    $("tenant-name").textContent = me.tenant_name || `tenant ${me.tenant_id.slice(0, 8)}`;
  }
  applyPermissions();
}

// (Re)loads everything of the tenant acted in: a platform admin switching tenants lands here again.
async function startTenant() {
  realtime?.close();
  alerts.clear();
  selected = null;
  await Promise.all([showView(urlState().view), loadAlerts()]);
  let opened = 0;
  realtime = new Realtime(await realtimeUrl, () => api.realtimeToken(), {
    onState: showConnection,
    onEvent: handleEvent,
    onOpen: () => {
      // Alerts and status changes of every device, without their telemetry; everything of the chosen one.
      realtime.subscribe(["*"], { types: ["alert", "status"] });
      // `since` resumes readings only: alerts changed while the connection was down are read again.
      if (opened++) loadAlerts().catch(report);
      if (selected) realtime.subscribe([selected.id], { since: lastSeen?.ts });
    },
  });
  realtime.connect();
}

function showConnection(state, detail) {
  const el = $("connection");
  el.dataset.state = state;
  $("conn-dot").className = `dot ${state}`;
  $("retry").hidden = state !== "offline";
  if (state === "live") el.textContent = "Live";
  else if (state === "connecting") el.textContent = "Connecting…";
  else if (state === "reconnecting") el.textContent = `Realtime disconnected (${detail}); reconnecting`;
  else el.textContent = `Offline (${detail}); retrying`;
}

// ----------------------------------------------------------------------------------------------- views
async function showView(view) {
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  for (const link of $("nav").querySelectorAll("a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view === "devices") await showDevicesView();
  else if (view === "alerts") await loadRules();
  else if (view === "rejects") await loadRejects(true);
  else if (view === "users") await loadUsers();
  else if (view === "keys") await loadKeys();
}

for (const link of $("nav").querySelectorAll("a")) {
  link.addEventListener("click", (e) => {
    e.preventDefault();
    setUrl({ view: link.dataset.view }, true);
    showView(link.dataset.view).catch(report);
  });
}

window.addEventListener("popstate", () => {
  if (me) showView(urlState().view).catch(report);
});

function report(err) {
  console.warn(err);
  $("connection").title = err.message;
}

// ------------------------------------------------------------------------------------------ device list
const devices = new Map(); // id -> device (the page shown, plus the chosen one)
let pageCursors = [null]; // cursor of each page visited; the last is the current page's
let pageFilters = null;

let viewSeq = 0;

async function showDevicesView() {
  const seq = ++viewSeq;
  const state = urlState();
  $("device-q").value = state.q;
  $("device-status").value = state.status;
  $("device-type").value = state.type;
  $("device-per").value = state.per;
  const filters = JSON.stringify([state.q, state.status, state.type, state.per]);
  if (filters !== pageFilters) {
    pageFilters = filters;
    pageCursors = [null];
  }
  await reloadDevicePage();
  if (seq !== viewSeq) return; // superseded (another view, another tenant) while the page loaded
  const wanted = state.device || $("device-rows").rows[0]?.dataset.device || null;
  if (wanted && wanted !== selected?.id) await selectDevice(wanted, false);
  else if (wanted && rangeKey() !== loadedRange) await loadDevice(); // back to a view with another range
  else if (!wanted) showNoDevice();
}

async function reloadDevicePage() {
  const state = urlState();
  const page = await api.devicePage({
    q: state.q,
    status: state.status,
    type: state.type,
    cursor: pageCursors.at(-1),
    limit: Number(state.per),
  });
  const started = performance.now();
  renderDevices(page);
  await painted();
  const ms = performance.now() - started;
  window.consoleTimings.devices = { ms, rows: page.items.length };
  $("device-table").dataset.renderMs = ms.toFixed(1);
  return page;
}

function renderDevices(page) {
  const rows = page.items.map((device) => {
    devices.set(device.id, device);
    const label = device.name && device.name !== device.id ? device.name : device.id;
    const row = h(
      "tr",
      { dataset: { device: device.id }, tabIndex: 0, "aria-selected": String(device.id === selected?.id) },
      h(
        "td",
        {},
        h(
          "div",
          { class: "device-cell" },
          h("span", { class: `dot ${device.status}`, title: device.status }),
          h("span", { class: "sr-only" }, `${device.status}, `),
          h("span", { class: "device-name" }, label),
          label !== device.id ? h("span", { class: "muted device-id" }, device.id) : null,
        ),
      ),
      h("td", { class: "wide-only" }, device.type),
      h("td", { class: "last-seen", title: absoluteTime(device.last_seen), dataset: { ts: device.last_seen || "" } }, relativeTime(device.last_seen)),
    );
    row.addEventListener("click", () => selectDevice(device.id, true));
    row.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        selectDevice(device.id, true);
      } else if (e.key === "ArrowDown") row.nextElementSibling?.focus();
      else if (e.key === "ArrowUp") row.previousElementSibling?.focus();
    });
    return row;
  });
  $("device-rows").replaceChildren(...rows);
  $("device-table").dataset.count = String(rows.length);
  $("page-info").textContent = rows.length ? `Page ${pageCursors.length}` : "No device";
  $("prev-page").disabled = pageCursors.length <= 1;
  $("next-page").disabled = !page.has_more;
  $("next-page").dataset.cursor = page.next_cursor || "";
}

function refreshDeviceTimes() {
  for (const cell of $("device-rows").querySelectorAll("td.last-seen")) cell.textContent = relativeTime(cell.dataset.ts || null);
  if (selected) showDeviceMeta();
  if (!$("view-alerts").hidden) renderAlerts();
}

$("next-page").addEventListener("click", () => {
  pageCursors.push($("next-page").dataset.cursor);
  reloadDevicePage().catch(report);
});
$("prev-page").addEventListener("click", () => {
  if (pageCursors.length > 1) pageCursors.pop();
  reloadDevicePage().catch(report);
});

let filterTimer = null;
function filtersChanged() {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    setUrl({
      q: $("device-q").value.trim(),
      status: $("device-status").value,
      type: $("device-type").value.trim(),
      per: $("device-per").value === "50" ? null : $("device-per").value,
    });
    const state = urlState();
    pageFilters = JSON.stringify([state.q, state.status, state.type, state.per]);
    pageCursors = [null];
    reloadDevicePage().catch(report);
  }, 250);
}
$("device-q").addEventListener("input", filtersChanged);
$("device-type").addEventListener("input", filtersChanged);
$("device-status").addEventListener("change", filtersChanged);
$("device-per").addEventListener("change", filtersChanged);
$("device-filters").addEventListener("submit", (e) => e.preventDefault());

// ---------------------------------------------------------------------------------------- device view
let selected = null; // the chosen device
// The newest `ts` seen of the chosen device, as received (microseconds kept): on reconnect the
// subscription resumes after it, so readings published while the connection was down are not lost.
let lastSeen = null;
const charts = new Map(); // metric -> MetricChart
const current = new Map(); // metric -> {value, ts}
let baseline = new Map(); // metric -> the first value of the range (the trend's reference)
let range = null; // {fromMs, toMs, live, bucket}
let loadSeq = 0;
let loadedRange = null; // rangeKey() of what is shown

function rangeKey() {
  const state = urlState();
  return JSON.stringify([state.range, state.from, state.to]);
}

function showNoDevice() {
  selected = null;
  $("device-title").textContent = "Devices";
  $("device-meta").textContent = "";
  $("device-empty").hidden = false;
  $("device-body").hidden = true;
}

async function selectDevice(id, push) {
  if (realtime && selected && selected.id !== id) realtime.unsubscribe([selected.id]);
  setUrl({ device: id, view: "devices" }, push);
  for (const row of $("device-rows").rows) row.setAttribute("aria-selected", String(row.dataset.device === id));
  selected = devices.get(id) || (await api.device(id));
  devices.set(id, selected);
  lastSeen = null;
  $("device-empty").hidden = true;
  $("device-body").hidden = false;
  $("device-title").textContent = selected.name && selected.name !== id ? `${selected.name}` : id;
  showDeviceMeta();
  $("commands").replaceChildren();
  $("cred-secret").textContent = "";
  $("credentials").hidden = true;
  $("state").hidden = true;
  state = null;
  await loadDevice();
  loadCommands(id).catch(report);
  loadState(id).catch(report);
  loadCredentials(id).catch(report);
  if (realtime) realtime.subscribe([id]);
}

function showDeviceMeta() {
  const d = selected;
  const meta = $("device-meta");
  meta.replaceChildren(
    h("span", { class: `dot ${d.status}` }),
    ` ${d.status} · ${d.id} · type ${d.type} · last seen `,
    h("time", { datetime: d.last_seen || "", title: absoluteTime(d.last_seen) }, relativeTime(d.last_seen)),
  );
}

function currentRange() {
  const state = urlState();
  const now = Date.now();
  if (state.range === "custom" && state.from && state.to) {
    const fromMs = Date.parse(state.from);
    const toMs = Date.parse(state.to);
    if (Number.isFinite(fromMs) && Number.isFinite(toMs) && toMs > fromMs) {
      const spanS = (toMs - fromMs) / 1000;
      const bucket = spanS <= 3600 ? null : BUCKETS.find(([, s]) => spanS / s <= 1000)?.[0] || "7d";
      return { name: "custom", fromMs, toMs, live: toMs >= now, bucket };
    }
  }
  const name = state.range in RANGES ? state.range : "1h";
  return { name, fromMs: now - RANGES[name].ms, toMs: now, live: true, bucket: RANGES[name].bucket };
}

function showRangePicker(r) {
  for (const button of $("range").querySelectorAll("button")) button.setAttribute("aria-pressed", String(button.dataset.range === r.name));
  $("custom-range").hidden = r.name !== "custom";
  $("device").dataset.range = r.name;
  $("device").dataset.bucket = r.bucket || "raw";
}

// History of the chosen device over the range, then live readings keep it going at the right edge.
async function loadDevice() {
  const seq = loadSeq + 1;
  try {
    await loadHistory();
  } finally {
    if (seq === loadSeq && pending) {
      // It failed: live readings go on at the right edge of whatever is shown.
      const meanwhile = pending;
      pending = null;
      delete $("charts").dataset.loading;
      for (const [metric, ts, value] of meanwhile) addReading(metric, ts, value);
    }
  }
}

async function loadHistory() {
  const seq = ++loadSeq;
  const device = selected;
  loadedRange = rangeKey();
  range = currentRange();
  showRangePicker(range);
  for (const chart of charts.values()) chart.destroy();
  charts.clear();
  current.clear();
  baseline = new Map();
  $("metrics").replaceChildren();
  $("charts").dataset.loading = "true";
  pending = [];
  const latest = await api.latest(device.id);
  if (seq !== loadSeq) return;
  for (const [metric, point] of Object.entries(latest.metrics)) current.set(metric, point);
  const knownMetrics = new Set(current.keys());
  if (!knownMetrics.size && range.bucket) {
    // No latest value cached: the metrics are found in the newest readings of the range.
    for (const item of await api.raw(device.id, new Date(range.fromMs), new Date(range.toMs + 1000), 500)) knownMetrics.add(item.metric);
    if (seq !== loadSeq) return;
  }
  const from = new Date(range.fromMs);
  const to = new Date(range.live ? Date.now() + 1000 : range.toMs);
  const series = new Map(); // metric -> [[ms, value]] oldest first
  let stepS = 1;
  let arrived;
  if (!range.bucket) {
    const items = await api.raw(device.id, from, to);
    arrived = performance.now();
    for (let i = items.length - 1; i >= 0; i--) {
      const { metric, ts, value } = items[i];
      if (typeof value !== "number") continue;
      if (!series.has(metric)) series.set(metric, []);
      series.get(metric).push([Date.parse(ts), value]);
    }
    stepS = typicalStep(series);
  } else {
    stepS = BUCKET_S[range.bucket];
    // One metric per request; one after the other (the API bounds concurrent telemetry reads).
    for (const metric of [...knownMetrics].filter((m) => typeof (current.get(m)?.value ?? 0) === "number").sort()) {
      const points = await api.buckets(device.id, metric, range.bucket, from, to);
      if (seq !== loadSeq) return;
      series.set(
        metric,
        points.filter((p) => typeof p.avg === "number").map((p) => [Date.parse(p.ts), p.avg]),
      );
    }
    arrived = performance.now();
  }
  if (seq !== loadSeq) return;
  const metrics = [...new Set([...current.keys(), ...series.keys()])].sort();
  let total = 0;
  for (const metric of metrics) {
    const points = series.get(metric) || [];
    total += points.length;
    if (points.length) baseline.set(metric, points[0][1]);
    if (typeof current.get(metric)?.value === "number" || points.length) {
      const chart = new MetricChart($("charts"), metric, unitOf(device, metric), range);
      chart.setHistory(points, stepS);
      charts.set(metric, chart);
    }
    showMetric(metric);
  }
  // What came live meanwhile goes after the history (older or equal readings are skipped).
  const meanwhile = pending;
  pending = null;
  for (const [metric, ts, value] of meanwhile) addReading(metric, ts, value);
  await painted();
  const ms = performance.now() - arrived;
  window.consoleTimings.chart = { ms, points: total, range: range.name, bucket: range.bucket || "raw" };
  $("charts").dataset.renderMs = ms.toFixed(1);
  delete $("charts").dataset.loading;
}

// The median interval between readings (seconds), so gaps are told from the normal rhythm.
function typicalStep(series) {
  const deltas = [];
  for (const points of series.values()) {
    for (let i = 1; i < points.length && deltas.length < 2000; i++) deltas.push((points[i][0] - points[i - 1][0]) / 1000);
  }
  if (!deltas.length) return 5;
  deltas.sort((a, b) => a - b);
  return Math.max(deltas[Math.floor(deltas.length / 2)], 1);
}

// The metric's card: current value, unit, trend since the start of the range.
function showMetric(metric) {
  const point = current.get(metric);
  let card = $("metrics").querySelector(`[data-metric="${CSS.escape(metric)}"]`);
  if (!card) {
    card = h(
      "div",
      { class: "metric", dataset: { metric } },
      h("span", { class: "metric-label" }, metric),
      h("span", { class: "metric-value" }),
      h("span", { class: "metric-trend" }),
    );
    $("metrics").append(card);
  }
  const unit = unitOf(selected, metric);
  const valueEl = card.querySelector(".metric-value");
  if (!point) {
    valueEl.textContent = "–";
    return;
  }
  valueEl.replaceChildren(formatValue(point.value), unit ? h("span", { class: "unit" }, ` ${unit}`) : "");
  card.dataset.value = String(point.value);
  card.title = `at ${absoluteTime(point.ts)}`;
  const base = baseline.get(metric);
  const trend = card.querySelector(".metric-trend");
  if (typeof point.value === "number" && typeof base === "number") {
    const diff = point.value - base;
    const arrow = Math.abs(diff) < 1e-9 ? "→" : diff > 0 ? "↑" : "↓";
    const sign = diff > 0 ? "+" : diff < 0 ? "−" : "±";
    trend.textContent = `${arrow} ${sign}${formatValue(Math.abs(diff))} over ${range.name}`;
    trend.dataset.direction = diff > 0 ? "up" : diff < 0 ? "down" : "flat";
  } else trend.textContent = "";
}

let pending = null; // live readings that arrive while the history loads: [metric, ts, value]

function addReading(metric, ts, value) {
  const known = current.get(metric);
  if (!known || Date.parse(ts) >= Date.parse(known.ts)) current.set(metric, { value, ts });
  if (pending) {
    pending.push([metric, ts, value]);
    return;
  }
  if (range?.live && typeof value === "number") {
    let chart = charts.get(metric);
    if (!chart) {
      chart = new MetricChart($("charts"), metric, unitOf(selected, metric), range);
      chart.setHistory([], 5);
      charts.set(metric, chart);
    }
    chart.range.fromMs = Date.now() - (RANGES[range.name]?.ms ?? range.toMs - range.fromMs);
    chart.add(Date.parse(ts), value);
  }
  showMetric(metric);
}

$("range").addEventListener("click", (e) => {
  const button = e.target.closest("button[data-range]");
  if (!button) return;
  if (button.dataset.range === "custom") {
    const r = currentRange();
    $("range-from").value = toLocalInput(r.fromMs);
    $("range-to").value = toLocalInput(r.toMs);
    $("custom-range").hidden = false;
    $("range-from").focus();
    return;
  }
  setUrl({ range: button.dataset.range, from: null, to: null }, true);
  loadDevice().catch(report);
});

$("custom-range").addEventListener("submit", (e) => {
  e.preventDefault();
  const from = new Date($("range-from").value);
  const to = new Date($("range-to").value);
  if (!(to > from)) return;
  setUrl({ range: "custom", from: from.toISOString(), to: to.toISOString() }, true);
  loadDevice().catch(report);
});

function toLocalInput(ms) {
  const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60e3);
  return d.toISOString().slice(0, 16);
}

new ResizeObserver(() => {
  for (const chart of charts.values()) chart.resize();
}).observe($("charts"));

// ----------------------------------------------------------------------------------------- state panel
let state = null; // the chosen device's state, as the API or the last `state` event gave it

async function loadState(id) {
  const next = await api.state(id);
  if (!next || selected?.id !== id) return;
  $("state").hidden = false;
  $("state-message").textContent = "";
  showState(next);
}

// Desired vs reported, one row per top-level key; keys in the delta are highlighted. A state older than
// the one shown (a snapshot after a live event) is ignored.
function showState(next) {
  if (!next || next.device_id !== selected?.id || (state && next.version < state.version)) return;
  state = next;
  $("state").hidden = false;
  $("state-version").textContent = `version ${next.version}`;
  const keys = [...new Set([...Object.keys(next.desired || {}), ...Object.keys(next.reported || {})])].sort();
  const delta = next.delta || {};
  $("state-rows").replaceChildren(
    ...keys.map((key) =>
      h(
        "tr",
        { dataset: { key }, class: key in delta ? "delta" : "", title: key in delta ? "not applied yet: reported differs from desired" : undefined },
        h("th", { scope: "row" }, key, key in delta ? h("span", { class: "badge warn" }, "pending") : ""),
        h("td", {}, key in (next.desired || {}) ? JSON.stringify(next.desired[key]) : ""),
        h("td", {}, key in (next.reported || {}) ? JSON.stringify(next.reported[key]) : ""),
      ),
    ),
  );
  $("state").dataset.version = String(next.version);
  $("state").dataset.delta = String(Object.keys(delta).length);
}

$("state-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  let patch;
  try {
    patch = JSON.parse(new FormData(e.target).get("patch") || "{}");
  } catch {
    $("state-message").textContent = "Not JSON";
    return;
  }
  try {
    showState(await api.patchDesired(selected.id, patch, state ? state.version : 0));
    $("state-message").textContent = "Applied";
  } catch (err) {
    if (err.status === 412) {
      $("state-message").textContent = "The state changed meanwhile: reloaded, check and apply again";
      showState(await api.state(selected.id));
    } else {
      $("state-message").textContent = err.message;
    }
  }
});

// -------------------------------------------------------------------------------------------- commands
// A command only moves forward; the answer to the POST can arrive after the device's answer was pushed.
const COMMAND_STEP = { queued: 0, pending: 0, sent: 1, acked: 2, failed: 2, expired: 2 };

async function loadCommands(id) {
  const items = await api.commands(id);
  if (selected?.id !== id) return;
  for (const command of items.reverse()) showCommand(command);
}

function showCommand(command) {
  let item = $("commands").querySelector(`li[data-command="${CSS.escape(command.id)}"]`);
  if (!item) {
    item = h("li", { dataset: { command: command.id } });
    $("commands").prepend(item);
    while ($("commands").children.length > 10) $("commands").lastElementChild.remove();
  } else if ((COMMAND_STEP[item.dataset.state] ?? -1) > (COMMAND_STEP[command.state] ?? -1)) {
    return;
  }
  item.dataset.state = command.state;
  const outcome = command.error
    ? `: ${command.error}`
    : command.result !== null && command.result !== undefined
      ? `: ${JSON.stringify(command.result)}`
      : "";
  item.replaceChildren(
    h("span", { class: `badge cmd-${command.state}` }, command.state),
    " ",
    h("code", {}, command.name),
    command.params && Object.keys(command.params).length ? h("span", { class: "muted" }, ` ${JSON.stringify(command.params)}`) : "",
    h("span", { class: "result" }, outcome),
    command.updated_at ? h("span", { class: "muted when" }, ` ${relativeTime(command.updated_at)}`) : "",
  );
}

$("command-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  let params;
  try {
    params = JSON.parse(form.get("params") || "{}");
  } catch {
    showCommand({ id: "invalid", name: form.get("name"), state: "invalid", error: "parameters are not JSON" });
    return;
  }
  try {
    showCommand(await api.sendCommand(selected.id, form.get("name"), params));
  } catch (err) {
    showCommand({ id: "error", name: form.get("name"), state: "error", error: err.message });
  }
});

// ------------------------------------------------------------------------------------------ credentials
async function loadCredentials(id) {
  if (!can("write")) return;
  const cred = await api.credentials(id).catch(() => null);
  if (selected?.id !== id) return;
  $("credentials").hidden = !cred;
  if (cred) showCredentials(cred);
}

function showCredentials(cred) {
  $("cred-state").textContent = cred.active
    ? `Active (user ${cred.username}${cred.rotated_at ? `, rotated ${relativeTime(cred.rotated_at)}` : ""})`
    : `Revoked ${relativeTime(cred.revoked_at)}`;
  $("credentials").dataset.active = String(cred.active);
}

$("cred-rotate").addEventListener("click", async () => {
  try {
    const secret = await api.rotateCredentials(selected.id);
    $("cred-secret").textContent = `New secret (shown once): ${secret.password}`;
    showCredentials(await api.credentials(selected.id));
  } catch (err) {
    $("cred-secret").textContent = err.message;
  }
});

$("cred-revoke").addEventListener("click", async () => {
  if (!confirm(`Revoke the MQTT credentials of ${selected.id}? The device is disconnected.`)) return;
  try {
    await api.revokeCredentials(selected.id);
    $("cred-secret").textContent = "Revoked";
    showCredentials(await api.credentials(selected.id));
  } catch (err) {
    $("cred-secret").textContent = err.message;
  }
});

// ---------------------------------------------------------------------------------------------- alerts
const alerts = new Map(); // id -> alert

async function loadAlerts() {
  const [open, recent] = await Promise.all([api.alerts({ state: "open", limit: 100 }), api.alerts({ limit: 50 })]);
  for (const alert of [...recent.items, ...open.items]) alerts.set(alert.id, alert);
  renderAlerts();
}

function renderAlerts() {
  const sorted = [...alerts.values()].sort(
    (a, b) => (a.state === "open" ? 0 : 1) - (b.state === "open" ? 0 : 1) || b.opened_at.localeCompare(a.opened_at),
  );
  const openCount = sorted.filter((a) => a.state === "open").length;
  $("open-alerts").hidden = openCount === 0;
  $("open-alerts").textContent = String(openCount);
  $("open-alerts").setAttribute("aria-label", `${openCount} open`);
  $("alert-list").replaceChildren(
    ...sorted.slice(0, 100).map((alert) => {
      const acked = Boolean(alert.acked_at);
      return h(
        "li",
        { class: `alert ${alert.severity} ${alert.state}`, dataset: { alert: alert.id, state: alert.state, acked: String(acked) } },
        h(
          "div",
          { class: "alert-head" },
          h("span", { class: `badge sev-${alert.severity}` }, alert.severity),
          h("strong", {}, alert.message || `${alert.metric} ${alert.value}`),
        ),
        h(
          "div",
          { class: "alert-body" },
          h("a", { href: `?view=devices&device=${encodeURIComponent(alert.device_id)}`, onclick: (e) => openDevice(e, alert.device_id) }, alert.device_id),
          ` ${alert.metric} = ${formatValue(alert.value)} (threshold ${formatValue(alert.threshold)}) · opened `,
          h("time", { datetime: alert.opened_at, title: absoluteTime(alert.opened_at) }, relativeTime(alert.opened_at)),
          alert.state !== "open" ? ` · resolved ${relativeTime(alert.resolved_at)}` : "",
          acked ? ` · acknowledged ${relativeTime(alert.acked_at)}${alert.acked_by ? ` by ${alert.acked_by}` : ""}` : "",
          acked && alert.ack_note ? h("q", { class: "ack-note" }, alert.ack_note) : "",
        ),
        !acked && can("operate")
          ? h(
              "div",
              { class: "alert-ack" },
              h("input", { type: "text", class: "ack-note-input", maxlength: "500", placeholder: "Note (optional)", "aria-label": `Note for acknowledging alert ${alert.metric} on ${alert.device_id}` }),
              h("button", { type: "button", class: "small", onclick: (e) => ackAlert(alert.id, e.currentTarget.previousElementSibling.value.trim()), "aria-label": `Acknowledge alert ${alert.metric} on ${alert.device_id}` }, "Acknowledge"),
            )
          : null,
      );
    }),
  );
}

function openDevice(e, id) {
  e.preventDefault();
  setUrl({ view: "devices", device: id }, true);
  showView("devices").catch(report);
}

async function ackAlert(id, note) {
  try {
    const alert = await api.ackAlert(id, note || undefined);
    alerts.set(alert.id, { ...alerts.get(alert.id), ...alert });
    renderAlerts();
  } catch (err) {
    report(err);
  }
}

async function loadRules() {
  const rules = await api.rules();
  $("rule-rows").replaceChildren(
    ...rules.map((rule) => {
      // Without the write permission the state is shown, not a control that would be refused.
      const toggle = !can("write")
        ? h("span", {}, rule.enabled ? "enabled" : "disabled")
        : h("input", {
        type: "checkbox",
        checked: rule.enabled,
        "aria-label": `Rule ${rule.name} enabled`,
        onchange: async (e) => {
          try {
            await api.setRuleEnabled(rule.id, e.target.checked);
          } catch (err) {
            e.target.checked = !e.target.checked;
            report(err);
          }
        },
      });
      return h(
        "tr",
        { dataset: { rule: rule.id } },
        h("td", {}, rule.name, h("span", { class: `badge sev-${rule.severity}` }, rule.severity)),
        h("td", {}, `${rule.device_id || `type ${rule.device_type}`}: ${rule.metric} ${rule.op} ${rule.threshold}`),
        h("td", {}, toggle),
      );
    }),
  );
}

// ---------------------------------------------------------------------------------------- dead letters
let rejectCursor = null;

async function loadRejects(fresh) {
  const form = new FormData($("reject-filters"));
  if (fresh) rejectCursor = null;
  const page = await api.rejects({ device_id: form.get("device_id").trim(), reason: form.get("reason"), cursor: rejectCursor });
  const rows = page.items.map((r) =>
    h(
      "tr",
      { dataset: { reject: String(r.id), reason: r.reason } },
      h("td", { title: absoluteTime(r.received_at) }, relativeTime(r.received_at)),
      h("td", {}, r.device_id || h("span", { class: "muted" }, "(none)")),
      h("td", { title: r.detail || "" }, h("code", {}, r.reason), r.detail ? h("div", { class: "muted small-text" }, r.detail) : ""),
      h("td", { class: "payload" }, h("code", {}, preview(r.payload)), h("span", { class: "muted" }, ` ${r.payload_size} B`)),
    ),
  );
  if (fresh) $("reject-rows").replaceChildren(...rows);
  else $("reject-rows").append(...rows);
  if (fresh && !rows.length) $("reject-rows").append(h("tr", {}, h("td", { colSpan: 4, class: "muted" }, "No dead letter matches.")));
  rejectCursor = page.next_cursor;
  $("rejects-more").hidden = !page.has_more;
}

function preview(payload) {
  const text = String(payload ?? "");
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}

$("reject-filters").addEventListener("submit", (e) => {
  e.preventDefault();
  loadRejects(true).catch(report);
});
$("rejects-more").addEventListener("click", () => loadRejects(false).catch(report));

// --------------------------------------------------------------------------------------- users and keys
async function loadUsers() {
  const users = await api.users();
  $("user-rows").replaceChildren(
    ...users.map((u) =>
      h("tr", { dataset: { user: u.id } }, h("td", {}, u.email), h("td", {}, u.role + (u.platform_admin ? " (platform admin)" : "")), h("td", {}, u.disabled ? "disabled" : "active")),
    ),
  );
}

$("user-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  try {
    await api.createUser(form.get("email"), form.get("password"), form.get("role"));
    $("user-message").textContent = `Added ${form.get("email")}`;
    e.target.reset();
    await loadUsers();
  } catch (err) {
    $("user-message").textContent = err.message;
  }
});

async function loadKeys() {
  const keys = await api.apiKeys();
  $("key-rows").replaceChildren(
    ...keys.map((k) =>
      h(
        "tr",
        { dataset: { key: k.id } },
        h("td", {}, k.name, h("span", { class: "muted" }, ` ${k.prefix}…`)),
        h("td", {}, k.scopes.join(", ")),
        h("td", {}, k.revoked_at ? `revoked ${relativeTime(k.revoked_at)}` : relativeTime(k.last_used_at)),
        h(
          "td",
          {},
          k.revoked_at
            ? ""
            : h("button", { type: "button", class: "small danger", "aria-label": `Revoke key ${k.name}`, onclick: () => revokeKey(k) }, "Revoke"),
        ),
      ),
    ),
  );
}

async function revokeKey(key) {
  if (!confirm(`Revoke the API key ${key.name}? It stops working at once.`)) return;
  await api.revokeKey(key.id).catch(report);
  await loadKeys();
}

$("key-create").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  try {
    const created = await api.createKey(form.get("name"), [form.get("scope")]);
    $("key-secret").textContent = `New key (shown once): ${created.key}`;
    e.target.reset();
    await loadKeys();
  } catch (err) {
    $("key-secret").textContent = err.message;
  }
});

// ---------------------------------------------------------------------------------------------- events
function seen(ts) {
  const ms = Date.parse(ts);
  // Equal milliseconds: the longer string carries more digits (the same instant or a later one).
  if (!lastSeen || ms > lastSeen.ms || (ms === lastSeen.ms && ts > lastSeen.ts)) lastSeen = { ts, ms };
}

function handleEvent(event) {
  if (event.type === "telemetry" && event.device_id === selected?.id) {
    for (const [metric, value] of Object.entries(event.metrics)) addReading(metric, event.ts, value);
    seen(event.ts);
    selected.last_seen = event.ts;
    if (event.backfill) {
      const holder = $("charts");
      holder.dataset.backfilled = String(Number(holder.dataset.backfilled || 0) + 1);
    }
  } else if (event.type === "latest" && event.device_id === selected?.id) {
    for (const [metric, latest] of Object.entries(event.metrics)) {
      addReading(metric, latest.ts, latest.value);
      if (!lastSeen) seen(latest.ts); // an anchor until the first live reading
    }
    if (event.state) showState({ device_id: event.device_id, ...event.state });
  } else if (event.type === "state") {
    showState(event);
  } else if (event.type === "alert") {
    alerts.set(event.id, { ...alerts.get(event.id), ...event });
    renderAlerts();
  } else if (event.type === "status") {
    const device = devices.get(event.device_id);
    if (device) device.status = event.status;
    const dot = $("device-rows").querySelector(`tr[data-device="${CSS.escape(event.device_id)}"] .dot`);
    if (dot) {
      dot.className = `dot ${event.status}`;
      dot.title = event.status;
      dot.nextElementSibling.textContent = `${event.status}, `;
    }
    if (selected?.id === event.device_id) showDeviceMeta();
  } else if (event.type === "command" && event.device_id === selected?.id) {
    showCommand(event);
  }
}

// ---------------------------------------------------------------------------------------------- sign in
$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  try {
    await api.login(form.get("email"), form.get("password"));
    $("login-error").textContent = "";
    await signedIn();
  } catch (err) {
    $("login-error").textContent = err.message;
  }
});

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  api.useKey(new FormData(e.target).get("key"));
  try {
    await signedIn();
  } catch (err) {
    $("login-error").textContent = err.message;
  }
});

$("tenant-switch").addEventListener("change", async () => {
  const id = $("tenant-switch").value;
  api.tenantId = id === me.tenant_id ? null : id;
  setUrl({ tenant: api.tenantId, device: null, q: null, status: null, type: null }, true);
  pageFilters = null;
  devices.clear();
  await startTenant().catch(report);
});

$("retry").addEventListener("click", () => realtime?.retryNow());

$("logout").addEventListener("click", async () => {
  for (const timer of timers) clearInterval(timer);
  realtime?.close();
  await api.logout().catch(() => {});
  location.reload();
});
