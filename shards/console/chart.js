// chart.js: a small SVG line chart of one series over time, drawn with DOM calls
// (no library, nothing fetched): the line, the first and last time, the lowest
// and highest value, and a dot with its value on the latest point.

const NS = "http://www.w3.org/2000/svg";
const W = 600;
const H = 160;
const PAD = { left: 48, right: 12, top: 10, bottom: 22 };

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function short(n) {
  if (!Number.isFinite(n)) return "";
  const a = Math.abs(n);
  return a >= 1000 || Number.isInteger(n) ? String(Math.round(n * 10) / 10) : n.toPrecision(3);
}

function time(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit" });
}

/**
 * A line chart of `points` ([{t, v}], oldest first) titled `label`; returns an
 * <svg> element with `data-points` holding the number of points drawn.
 */
export function lineChart(label, points) {
  const pts = points.filter((p) => Number.isFinite(p.t) && Number.isFinite(p.v));
  const svg = el("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart",
    role: "img",
    "aria-label": `${label} over time, ${pts.length} readings`,
    "data-points": pts.length,
    "data-field": label,
    preserveAspectRatio: "none",
  });
  if (!pts.length) return svg;
  const t0 = pts[0].t;
  const t1 = pts[pts.length - 1].t;
  let lo = Math.min(...pts.map((p) => p.v));
  let hi = Math.max(...pts.map((p) => p.v));
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const x = (t) => PAD.left + (t1 === t0 ? (W - PAD.left - PAD.right) / 2 : ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right));
  const y = (v) => PAD.top + (1 - (v - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom);
  svg.append(
    el("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis" }),
    el("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis" }),
    el("text", { x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end", class: "tick" }, short(hi)),
    el("text", { x: PAD.left - 4, y: H - PAD.bottom, "text-anchor": "end", class: "tick" }, short(lo)),
    el("text", { x: PAD.left, y: H - 6, class: "tick" }, time(t0)),
    el("text", { x: W - PAD.right, y: H - 6, "text-anchor": "end", class: "tick" }, time(t1)),
    el("polyline", {
      class: "line",
      fill: "none",
      points: pts.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" "),
    }),
  );
  const last = pts[pts.length - 1];
  svg.append(
    el("circle", { cx: x(last.t), cy: y(last.v), r: 3.5, class: "dot" }),
    el(
      "text",
      { x: Math.min(x(last.t), W - PAD.right - 2), y: Math.max(y(last.v) - 6, PAD.top + 8), "text-anchor": "end", class: "last" },
      short(last.v),
    ),
  );
  return svg;
}
