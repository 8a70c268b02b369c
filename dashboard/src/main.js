// The dashboard: signs in, lists devices, charts a device live, shows alerts, sends commands, shows and
// edits a device's state (desired vs reported, the delta highlighted).
// It talks to the API and the realtime endpoint on their own origins, as any external frontend would.
// The API is the page's origin unless ?api=https://api.example.com says otherwise. The realtime endpoint
// is ?ws=wss://rt.example.com/ws if given, else `realtime_url` of config.json next to the page (the API
// serves it from IOT_PUBLIC_REALTIME_URL), else ws(s)://<the page's host>:8001/ws.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { Api } from "./api.js";
import { Realtime } from "./realtime.js";

const params = new URLSearchParams(location.search);
const wsScheme = location.protocol === "https:" ? "wss:" : "ws:";
const realtimeUrl = findRealtimeUrl();

async function findRealtimeUrl() {
  if (params.get("ws")) return params.get("ws");
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

const HISTORY_MS = 60 * 60 * 1000;
const MAX_POINTS = 3600;

const $ = (id) => document.getElementById(id);
const api = new Api(params.get("api") || location.origin);
let realtime = null;
let selected = null;
// The newest `ts` seen of the selected device, as received (microseconds kept): on reconnect the
// subscription resumes after it, so readings published while the connection was down are not lost.
let lastSeen = null;
let state = null; // the chosen device's state, as the API or the last `state` event gave it
const charts = new Map(); // metric -> {plot, xs, ys}
const devices = new Map(); // id -> device
const alerts = new Map(); // id -> alert

function setStatus(text) {
  $("connection").textContent = text;
}

function fmtTime(value) {
  return value ? new Date(value).toLocaleTimeString() : "never";
}

async function signedIn() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  await refreshDevices();
  await refreshAlerts();
  realtime = new Realtime(await realtimeUrl, () => api.realtimeToken(), {
    onState: setStatus,
    onEvent: handleEvent,
    onOpen: () => {
      if (selected) realtime.subscribe([selected], undefined, lastSeen?.ts);
    },
  });
  realtime.connect();
  setInterval(() => refreshDevices().catch((err) => setStatus(`Device list: ${err.message}`)), 15000);
  setInterval(() => refreshAlerts().catch((err) => setStatus(`Alerts: ${err.message}`)), 3000);
}

async function refreshDevices() {
  const list = await api.devices();
  devices.clear();
  const rows = $("device-rows");
  rows.replaceChildren();
  for (const device of list) {
    devices.set(device.id, device);
    const row = document.createElement("tr");
    row.dataset.device = device.id;
    row.tabIndex = 0;
    row.setAttribute("aria-selected", String(device.id === selected));
    row.innerHTML = `<td></td><td class="status-${device.status}"></td><td></td>`;
    row.cells[0].textContent = device.name && device.name !== device.id ? `${device.name} (${device.id})` : device.id;
    row.cells[1].textContent = device.status;
    row.cells[2].textContent = fmtTime(device.last_seen);
    row.addEventListener("click", () => selectDevice(device.id));
    row.addEventListener("keydown", (e) => e.key === "Enter" && selectDevice(device.id));
    rows.append(row);
  }
}

// The latest alerts of every device (open ones first) come from the API every few seconds; those of the
// chosen device are also pushed over the WebSocket the moment they open or resolve.
async function refreshAlerts() {
  const recent = await api.recentAlerts();
  alerts.clear();
  for (const alert of recent) alerts.set(alert.id, alert);
  renderAlerts();
}

function renderAlerts() {
  const list = $("alert-list");
  list.replaceChildren();
  const sorted = [...alerts.values()].sort(
    (a, b) => (a.state === "open" ? 0 : 1) - (b.state === "open" ? 0 : 1) || b.opened_at.localeCompare(a.opened_at),
  );
  for (const alert of sorted.slice(0, 20)) {
    const item = document.createElement("li");
    item.className = `${alert.severity} ${alert.state}`;
    item.dataset.alert = alert.id;
    item.dataset.state = alert.state;
    const when = new Date(alert.opened_at).toLocaleTimeString();
    item.textContent = `${when} ${alert.severity}: ${alert.device_id} ${alert.metric} = ${alert.value} ${alert.message || ""}`;
    if (alert.state !== "open") item.textContent += " (resolved)";
    list.append(item);
  }
}

async function selectDevice(id) {
  if (realtime && selected) realtime.unsubscribe([selected]);
  selected = id;
  lastSeen = null;
  for (const row of $("device-rows").rows) row.setAttribute("aria-selected", String(row.dataset.device === id));
  $("device-title").textContent = `Device ${id}`;
  $("command-form").hidden = false;
  $("commands").replaceChildren();
  for (const chart of charts.values()) chart.plot.destroy();
  charts.clear();
  $("charts").replaceChildren();
  const now = Date.now();
  const points = await api.history(id, new Date(now - HISTORY_MS), new Date(now));
  for (const point of points) addPoint(point.metric, Date.parse(point.ts), point.value);
  state = null;
  $("state").hidden = false;
  $("state-message").textContent = "";
  showState(await api.state(id));
  if (realtime) realtime.subscribe([id]);
}

// Desired vs reported, one row per top-level key; keys in the delta are highlighted. A state older than
// the one shown (a snapshot after a live event) is ignored.
function showState(next) {
  if (!next || next.device_id !== selected || (state && next.version < state.version)) return;
  state = next;
  $("state-version").textContent = `version ${next.version}`;
  const rows = $("state-rows");
  rows.replaceChildren();
  const keys = [...new Set([...Object.keys(next.desired), ...Object.keys(next.reported)])].sort();
  for (const key of keys) {
    const row = document.createElement("tr");
    row.dataset.key = key;
    row.className = key in next.delta ? "delta" : "";
    row.innerHTML = "<th scope='row'></th><td></td><td></td>";
    row.cells[0].textContent = key;
    row.cells[1].textContent = key in next.desired ? JSON.stringify(next.desired[key]) : "";
    row.cells[2].textContent = key in next.reported ? JSON.stringify(next.reported[key]) : "";
    if (key in next.delta) row.title = "not applied yet: reported differs from desired";
    rows.append(row);
  }
  $("state").dataset.version = String(next.version);
  $("state").dataset.delta = String(Object.keys(next.delta).length);
}

function chartFor(metric) {
  let chart = charts.get(metric);
  if (chart) return chart;
  const holder = document.createElement("figure");
  holder.dataset.metric = metric;
  const caption = document.createElement("figcaption");
  caption.textContent = metric;
  holder.append(caption);
  $("charts").append(holder);
  const width = Math.max(300, $("charts").clientWidth - 20);
  const plot = new uPlot(
    { width, height: 160, series: [{}, { label: metric, stroke: "#0969da" }], axes: [{}, { size: 70 }], legend: { show: true } },
    [[], []],
    holder,
  );
  chart = { plot, xs: [], ys: [], holder };
  charts.set(metric, chart);
  return chart;
}

function addPoint(metric, ms, value) {
  if (typeof value !== "number") return;
  const chart = chartFor(metric);
  // uPlot needs increasing x: a point not newer than the last one (a redelivery, a snapshot) is skipped.
  if (chart.xs.length && ms / 1000 <= chart.xs[chart.xs.length - 1]) return;
  chart.xs.push(ms / 1000);
  chart.ys.push(value);
  if (chart.xs.length > MAX_POINTS) {
    chart.xs.shift();
    chart.ys.shift();
  }
  chart.plot.setData([chart.xs, chart.ys]);
  chart.holder.dataset.points = String(chart.xs.length);
}

function seen(ts) {
  const ms = Date.parse(ts);
  // Equal milliseconds: the longer string carries more digits (the same instant or a later one).
  if (!lastSeen || ms > lastSeen.ms || (ms === lastSeen.ms && ts > lastSeen.ts)) lastSeen = { ts, ms };
}

function handleEvent(event) {
  if (event.type === "telemetry" && event.device_id === selected) {
    for (const [metric, value] of Object.entries(event.metrics)) addPoint(metric, Date.parse(event.ts), value);
    seen(event.ts);
    if (event.backfill) {
      const holder = $("charts");
      holder.dataset.backfilled = String(Number(holder.dataset.backfilled || 0) + 1);
    }
  } else if (event.type === "latest" && event.device_id === selected) {
    for (const [metric, latest] of Object.entries(event.metrics)) {
      addPoint(metric, Date.parse(latest.ts), latest.value);
      if (!lastSeen) seen(latest.ts); // an anchor until the first live reading
    }
    if (event.state) showState({ device_id: event.device_id, ...event.state });
  } else if (event.type === "state") {
    showState(event);
  } else if (event.type === "alert") {
    alerts.set(event.id, event);
    renderAlerts();
  } else if (event.type === "status") {
    const device = devices.get(event.device_id);
    if (device) {
      device.status = event.status;
      const row = $("device-rows").querySelector(`tr[data-device="${CSS.escape(event.device_id)}"]`);
      if (row) {
        row.cells[1].textContent = event.status;
        row.cells[1].className = `status-${event.status}`;
      }
    }
  } else if (event.type === "command" && event.device_id === selected) {
    showCommand(event);
  }
}

// A command only moves forward; the answer to the POST can arrive after the device's answer was pushed.
const COMMAND_STEP = { queued: 0, pending: 0, sent: 1, acked: 2, failed: 2, expired: 2 };

function showCommand(command) {
  let item = $("commands").querySelector(`li[data-command="${CSS.escape(command.id)}"]`);
  if (!item) {
    item = document.createElement("li");
    item.dataset.command = command.id;
    $("commands").prepend(item);
  } else if ((COMMAND_STEP[item.dataset.state] ?? -1) > (COMMAND_STEP[command.state] ?? -1)) {
    return;
  }
  item.dataset.state = command.state;
  item.textContent = `${command.name}: ${command.state}`;
}

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

$("command-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  let params;
  try {
    params = JSON.parse(form.get("params") || "{}");
  } catch {
    showCommand({ id: "invalid", name: form.get("name"), state: "invalid parameters (not JSON)" });
    return;
  }
  try {
    showCommand(await api.sendCommand(selected, form.get("name"), params));
  } catch (err) {
    showCommand({ id: "error", name: form.get("name"), state: err.message });
  }
});

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
    showState(await api.patchDesired(selected, patch, state ? state.version : 0));
    $("state-message").textContent = "Applied";
  } catch (err) {
    if (err.status === 412) {
      $("state-message").textContent = "The state changed meanwhile: reloaded, check and apply again";
      showState(await api.state(selected));
    } else {
      $("state-message").textContent = err.message;
    }
  }
});

$("logout").addEventListener("click", async () => {
  await api.logout();
  location.reload();
});
