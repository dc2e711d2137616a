// The two small time-series plots (decode tok/s per tick that decoded, ttft per answer) and the
// figures beside them. Each plot's data-points says how many points it drew.
import { $, h, s, num } from "./dom.js";

const X0 = 34;
const X1 = 312;
const Y0 = 10;
const Y1 = 94;

// A round top for the axis: 1, 2 or 5 times a power of ten, at or above the largest value.
function top(max) {
  if (!(max > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(max));
  return [1, 2, 5, 10].map((m) => m * p).find((v) => v >= max);
}

// points: [{t, v}]; a gap longer than `gap` seconds starts a new line.
export function plot(svg, points, { gap = Infinity, digits = 1, unit = "" } = {}) {
  const n = points.length;
  const ymax = top(Math.max(0, ...points.map((p) => p.v)));
  const x = (i) => (n < 2 ? X1 : X0 + ((X1 - X0) * i) / (n - 1));
  const y = (v) => Y1 - ((Y1 - Y0) * v) / ymax;
  let d = "";
  points.forEach((p, i) => {
    const jump = i === 0 || p.t - points[i - 1].t > gap;
    d += `${jump ? "M" : "L"}${x(i).toFixed(1)},${y(p.v).toFixed(1)}`;
  });
  const kids = [
    s("line", { class: "axis", x1: X0, y1: Y1, x2: X1, y2: Y1 }),
    s("line", { class: "grid", x1: X0, y1: Y0, x2: X1, y2: Y0 }),
    s("text", { class: "tick", x: X0 - 4, y: Y0 + 4, "text-anchor": "end" }, `${+ymax.toPrecision(2)}`),
    s("text", { class: "tick", x: X0 - 4, y: Y1 + 4, "text-anchor": "end" }, "0"),
  ];
  if (n) {
    const last = points[n - 1];
    kids.push(s("path", { class: "line", d }));
    kids.push(s("circle", { class: "dot", cx: x(n - 1), cy: y(last.v), r: 3 }));
    kids.push(
      s(
        "text",
        { class: "last", x: X1, y: Y1 + 14, "text-anchor": "end" },
        `last ${num(last.v, digits)}${unit}`,
      ),
    );
    kids.push(s("text", { class: "tick", x: X0, y: Y1 + 14 }, `${n} points`));
  } else {
    const at = { class: "tick", x: (X0 + X1) / 2, y: (Y0 + Y1) / 2, "text-anchor": "middle" };
    kids.push(s("text", at, "no data yet"));
  }
  svg.replaceChildren(...kids);
  svg.setAttribute("data-points", String(n));
}

const pair = (label, value) => [h("dt", { text: label }), h("dd", { text: value })];

function figures(snap) {
  const t = snap.live || {};
  const out = [
    pair("running", `${t.running ?? 0}`),
    pair("waiting", `${t.waiting ?? 0}`),
    pair("answers", `${t.answers ?? 0}`),
    pair("tokens", `${t.tokens ?? 0}`),
  ];
  const pc = t.prefix_cache;
  if (pc) {
    const rate = pc.lookups ? ` (${Math.round((100 * pc.hits) / pc.lookups)}%)` : "";
    out.push(pair("prefix cache", `${pc.hits} hits of ${pc.lookups} lookups${rate}`));
  }
  if (t.acceptance !== null && t.acceptance !== undefined)
    out.push(pair("speculative accepted", `${Math.round(100 * t.acceptance)}%`));
  return out;
}

export function drawPlots(snap, tps) {
  plot($("#plot-tps"), tps.map((p) => ({ t: p.t, v: p.tps })), { gap: 3 });
  const ttft = (snap.ttft || []).slice(-300).map((p) => ({ t: p.t, v: p.ttft }));
  plot($("#plot-ttft"), ttft, { digits: 2, unit: " s" });
  $("#figures").replaceChildren(...figures(snap).flat());
}
