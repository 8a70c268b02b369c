// One metric's chart (uPlot): history (raw points or buckets) plus live readings at the right edge.
// A silence longer than a few sampling steps is drawn as a gap (a null point), never bridged.
import uPlot from "uplot";
import { absoluteTime, formatValue, h } from "./util.js";

const STROKE = "#0550ae";
const FILL = "rgba(5, 80, 174, 0.08)";

export class MetricChart {
  // `range`: {fromMs, toMs, live}; `stepS`: the bucket width or the typical interval between readings.
  constructor(parent, metric, unit, range) {
    this.metric = metric;
    this.unit = unit;
    this.range = range;
    this.stepS = 1;
    this.xs = [];
    this.ys = [];
    this.points = 0;
    this.readout = h("span", { class: "readout", "aria-live": "off" });
    this.holder = h(
      "figure",
      { dataset: { metric, points: "0" } },
      h("figcaption", {}, h("span", { class: "metric-name" }, metric + (unit ? ` (${unit})` : "")), this.readout),
    );
    parent.append(this.holder);
    const chart = this;
    const opts = {
      width: this.width(),
      height: 170,
      legend: { show: false },
      cursor: { drag: { x: false, y: false }, points: { size: 7 } },
      scales: {
        x: { time: true, range: () => [chart.range.fromMs / 1000, chart.range.live ? Date.now() / 1000 : chart.range.toMs / 1000] },
      },
      axes: [
        { stroke: "#57606a", grid: { stroke: "#eaeef2" }, ticks: { stroke: "#d0d7de" }, space: 80 },
        { stroke: "#57606a", grid: { stroke: "#eaeef2" }, ticks: { stroke: "#d0d7de" }, size: 60 },
      ],
      series: [{}, { label: metric, stroke: STROKE, fill: FILL, width: 1.5, spanGaps: false, points: { show: false } }],
      hooks: { setCursor: [(u) => chart.showReadout(u.cursor.idx)] },
    };
    this.plot = new uPlot(opts, [[], []], this.holder);
  }

  width() {
    return Math.max(240, Math.floor(this.holder.parentElement?.clientWidth || 600) - 2);
  }

  resize() {
    this.plot.setSize({ width: this.width(), height: 170 });
  }

  // Oldest first: [[ms, value], ...]; gaps longer than 3 steps become nulls.
  setHistory(points, stepS) {
    this.stepS = stepS;
    const xs = [];
    const ys = [];
    let last = null;
    for (const [ms, value] of points) {
      const x = ms / 1000;
      if (last !== null && x <= last) continue;
      if (last !== null && x - last > 3 * stepS) {
        xs.push((last + x) / 2);
        ys.push(null);
      }
      xs.push(x);
      ys.push(value);
      last = x;
    }
    this.xs = xs;
    this.ys = ys;
    this.points = ys.filter((v) => v !== null).length;
    this.redraw();
  }

  // A live reading: appended at the right edge (an older one, a redelivery or a snapshot, is skipped).
  add(ms, value) {
    if (typeof value !== "number") return false;
    const x = ms / 1000;
    const last = this.xs.length ? this.xs[this.xs.length - 1] : null;
    if (last !== null && x <= last) return false;
    if (last !== null && x - last > 3 * Math.max(this.stepS, 5)) {
      this.xs.push((last + x) / 2);
      this.ys.push(null);
    }
    this.xs.push(x);
    this.ys.push(value);
    this.points += 1;
    // Keep the window: what scrolled out on the left is dropped.
    const from = this.range.fromMs / 1000;
    let drop = 0;
    while (drop < this.xs.length - 1 && this.xs[drop] < from) drop += 1;
    if (drop) {
      this.points -= this.ys.slice(0, drop).filter((v) => v !== null).length;
      this.xs.splice(0, drop);
      this.ys.splice(0, drop);
    }
    this.redraw();
    return true;
  }

  redraw() {
    this.plot.setData([this.xs, this.ys]);
    this.holder.dataset.points = String(this.points);
    this.holder.dataset.gaps = String(this.ys.length - this.points);
    this.showReadout(null);
  }

  showReadout(idx) {
    let i = idx;
    if (i === null || i === undefined || this.ys[i] === null || this.ys[i] === undefined) {
      i = this.ys.length - 1;
      while (i >= 0 && this.ys[i] === null) i -= 1;
      if (i < 0) {
        this.readout.textContent = "no data in this range";
        return;
      }
    }
    const unit = this.unit ? ` ${this.unit}` : "";
    this.readout.textContent = `${formatValue(this.ys[i])}${unit} at ${absoluteTime(this.xs[i] * 1000)}`;
  }

  destroy() {
    this.plot.destroy();
    this.holder.remove();
  }
}
