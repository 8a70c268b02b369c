// Small DOM and formatting helpers shared by the views.
export const $ = (id) => document.getElementById(id);

// An element with attributes/properties and children (strings become text nodes: never HTML).
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key in el && key !== "list") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const rtf = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
const STEPS = [
  [60, "second"],
  [3600, "minute"],
  [86400, "hour"],
  [604800, "day"],
  [2629800, "week"],
  [31557600, "month"],
  [Infinity, "year"],
];
const DIVISORS = { second: 1, minute: 60, hour: 3600, day: 86400, week: 604800, month: 2629800, year: 31557600 };

export function relativeTime(value, now = Date.now()) {
  if (!value) return "never";
  const seconds = (Date.parse(value) - now) / 1000;
  const abs = Math.abs(seconds);
  if (abs < 5) return "just now";
  for (const [limit, unit] of STEPS) {
    if (abs < limit) return rtf.format(Math.round(seconds / DIVISORS[unit]), unit);
  }
  return "";
}

export function absoluteTime(value) {
  return value ? new Date(value).toLocaleString() : "";
}

export function formatValue(value) {
  if (typeof value !== "number") return String(value);
  const abs = Math.abs(value);
  const digits = abs >= 1000 ? 0 : abs >= 100 ? 1 : 2;
  return value.toLocaleString(undefined, { maximumFractionDigits: digits });
}

// The unit of a metric: the device's `attributes.units[metric]` (or `attributes.unit` for a one-metric
// device), else "".
export function unitOf(device, metric) {
  const attrs = device?.attributes || {};
  if (attrs.units && typeof attrs.units === "object" && typeof attrs.units[metric] === "string") return attrs.units[metric];
  if (typeof attrs[`${metric}_unit`] === "string") return attrs[`${metric}_unit`];
  return "";
}

// Resolves after the browser has painted what was just put in the DOM.
export function painted() {
  return new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
}
