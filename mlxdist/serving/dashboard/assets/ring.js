// The cluster drawn as an SVG: nodes as boxes round a circle in ring order, a line for each pair
// of ring neighbours and for each cable, labelled with the cable's generation and RDMA, or dashed
// and labelled with the backend where no cable is known (a local cluster).
import { s, bytes, has } from "./dom.js";
import { stateOf } from "./store.js";

const BH = 74;
let W = 640; // the drawing's width follows the element's, so its text stays readable
let BW = 172;

// the text cut to n characters (a fraction rounds down), with an ellipsis where cut
const cut = (t, n) => (t && t.length > n ? `${t.slice(0, Math.floor(n) - 1)}…` : t || "");
const pair = (a, b) => (a < b ? `${a}\n${b}` : `${b}\n${a}`);

function order(snap) {
  const byName = new Map(snap.nodes.map((n) => [n.name, n]));
  const ring = (snap.ring || []).filter((name) => byName.has(name));
  const rest = snap.nodes
    .filter((n) => !ring.includes(n.name))
    .sort((a, b) => (a.rank ?? 1e9) - (b.rank ?? 1e9) || a.name.localeCompare(b.name));
  return [...ring.map((name) => byName.get(name)), ...rest];
}

// Points round a circle (the first at the top), stretched to fill the drawing's box.
function place(n) {
  const pts = Array.from({ length: n }, (_, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / n;
    return [Math.cos(a), Math.sin(a)];
  });
  if (n === 2) pts.splice(0, 2, [-1, 0], [1, 0]);
  const rows = n <= 3 ? 3 : Math.ceil(n / 2) + 2; // enough height that labels and boxes keep apart
  const H = n <= 2 ? BH + 40 : Math.round(Math.max(rows * (BH + 12), Math.min(W * 0.62, 420)));
  const span = (k) => [Math.min(...pts.map((p) => p[k])), Math.max(...pts.map((p) => p[k]))];
  const fit = ([lo, hi], a, b, v) => (hi > lo ? a + ((b - a) * (v - lo)) / (hi - lo) : (a + b) / 2);
  const [xs, ys] = [span(0), span(1)];
  const m = 6;
  return {
    H,
    at: (i) => [
      fit(xs, BW / 2 + m, W - BW / 2 - m, pts[i][0]),
      fit(ys, BH / 2 + m, H - BH / 2 - m, pts[i][1]),
    ],
  };
}

function backendLabel(plan) {
  if (!plan?.backend) return plan?.link || "link";
  return plan.backend === "ring" ? "ring (TCP)" : plan.backend;
}

function links(snap, nodes) {
  const cables = new Map();
  for (const c of snap.cables || []) cables.set(pair(c.a, c.b), c);
  const out = [];
  const done = new Set();
  const ring = (snap.ring || []).filter((name) => nodes.some((n) => n.name === name));
  const hops = ring.length === 2 ? 1 : ring.length > 2 ? ring.length : 0;
  for (let i = 0; i < hops; i++) {
    const a = ring[i];
    const b = ring[(i + 1) % ring.length];
    const k = pair(a, b);
    if (done.has(k)) continue;
    done.add(k);
    const c = cables.get(k);
    out.push(c ? { a, b, cable: c } : { a, b, dashed: true, label: backendLabel(snap.plan) });
  }
  for (const [k, c] of cables) if (!done.has(k)) out.push({ a: c.a, b: c.b, cable: c });
  for (const l of out)
    if (l.cable) l.label = `${l.cable.generation || "cable"}${l.cable.rdma ? " · RDMA" : ""}`;
  return out;
}

export function drawRing(svg, snap) {
  W = Math.round(Math.min(640, Math.max(320, svg.parentElement.clientWidth - 26)));
  BW = Math.min(172, Math.round(W * 0.38));
  const nodes = order(snap);
  const { H, at } = place(Math.max(nodes.length, 1));
  const pos = new Map(nodes.map((n, i) => [n.name, at(i)]));
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const kids = [];
  for (const l of links(snap, nodes)) {
    const [x1, y1] = pos.get(l.a) || [];
    const [x2, y2] = pos.get(l.b) || [];
    if (x1 === undefined || x2 === undefined) continue;
    const cls = `link${l.dashed ? " dashed" : ""}${l.cable?.rdma ? " rdma" : ""}`;
    // a slanted link's label goes on its outer side, where the circle leaves room
    const [mx, my] = [(x1 + x2) / 2, (y1 + y2) / 2];
    const flat = Math.abs(y2 - y1) < Math.abs(x2 - x1) * 0.3;
    const side = flat || Math.abs(mx - W / 2) < 2 ? 0 : mx < W / 2 ? -1 : 1;
    const anchor = ["end", "middle", "start"][side + 1];
    const label = W < 480 ? l.label.replace(/Thunderbolt (\d)/, "TB$1") : l.label;
    kids.push(
      s(
        "g",
        { class: cls, "data-link": `${l.a} ${l.b}` },
        label !== l.label && s("title", {}, l.label), // the whole label, where it is cut short
        s("line", { x1, y1, x2, y2 }),
        s("text", { x: mx + 6 * side, y: flat ? my - 6 : my + 4, "text-anchor": anchor }, label),
      ),
    );
  }
  for (const n of nodes) {
    const [x, y] = pos.get(n.name);
    const state = stateOf(n);
    const mem = n.memory_total ?? n.memory_usable;
    const line3 = [mem ? bytes(mem) : null, has(n.rank) ? `rank ${n.rank}` : null];
    const failed = state === "failed" || state === "gone";
    kids.push(
      s(
        "g",
        { class: `box ${failed ? "failed" : ""}`, "data-node": n.name, "data-state": state },
        s("title", {}, `${n.name}: ${state}`),
        s("rect", { x: x - BW / 2, y: y - BH / 2, width: BW, height: BH, rx: 8 }),
        s("text", { x, y: y - 18, "text-anchor": "middle", class: "name" }, cut(n.name, BW / 8)),
        s("text", { x, y: y - 2, "text-anchor": "middle" }, cut(n.chip || "", BW / 6.6)),
        s("text", { x, y: y + 14, "text-anchor": "middle" }, line3.filter(Boolean).join(" · ")),
        s("text", { x, y: y + 29, "text-anchor": "middle", class: "st" }, state),
      ),
    );
  }
  svg.replaceChildren(...kids);
  svg.setAttribute(
    "aria-label",
    `${nodes.length} nodes: ${nodes.map((n) => `${n.name} ${stateOf(n)}`).join(", ")}`,
  );
}
