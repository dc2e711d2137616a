// One card per node: rank, what it holds, memory, weights, wired limit, bytes sent per token,
// heartbeat age, state, and load progress while it loads.
import { h, bytes, secs } from "./dom.js";
import { stateOf } from "./store.js";

// [0,1,2,3,8,10,11] -> "0–3, 8, 10–11"
export function ranges(xs) {
  const v = [...xs].sort((a, b) => a - b);
  const out = [];
  for (let i = 0; i < v.length; ) {
    let j = i;
    while (j + 1 < v.length && v[j + 1] === v[j] + 1) j++;
    out.push(j > i ? `${v[i]}–${v[j]}` : `${v[i]}`);
    i = j + 1;
  }
  return out.join(", ");
}

function holds(n) {
  if (n.layers) return `layers ${n.layers[0]}–${n.layers[1]}`;
  if (n.experts) return `experts ${ranges(n.experts)} (${n.experts.length})`;
  if (n.ranks?.length) return `ranks ${n.ranks.join(", ")}`;
  return null;
}

function memory(n) {
  const of =
    n.memory_usable !== null && n.memory_usable !== undefined
      ? `${bytes(n.memory_usable)} usable`
      : n.memory_total !== null && n.memory_total !== undefined
        ? `${bytes(n.memory_total)} total`
        : null;
  if (n.memory_used === null || n.memory_used === undefined) return of ? `${of}` : null;
  return `used ${bytes(n.memory_used)}${of ? ` of ${of}` : ""}`;
}

const row = (label, value, extra = null) =>
  value === null || value === undefined ? null : [h("dt", { text: label }), h("dd", {}, value, extra)];

function card(n) {
  const state = stateOf(n);
  const top = n.memory_usable ?? n.memory_total;
  const meter =
    top && n.memory_used !== null && n.memory_used !== undefined
      ? h("meter", { min: 0, max: top, value: Math.min(n.memory_used, top), high: top * 0.9, title: "memory used" })
      : null;
  const rankLine = [
    n.rank !== null && n.rank !== undefined ? `rank ${n.rank}` : "agent, no rank",
    n.chip,
    n.address,
  ].filter(Boolean);
  let load = null;
  if (n.load) {
    const { done, total, rate, eta } = n.load;
    const pct = total ? Math.round((100 * done) / total) : 0;
    load = h(
      "div",
      { class: "load" },
      h("progress", { max: total || 1, value: done || 0, "aria-label": `loading ${n.name}` }),
      h("span", {
        text: `load ${pct}% (${bytes(done)} of ${bytes(total)}) · ${bytes(rate)}/s, ${secs(eta)} left`,
      }),
    );
  }
  const beat =
    n.heartbeat_age !== null && n.heartbeat_age !== undefined ? `beat ${secs(n.heartbeat_age)} ago` : null;
  return h(
    "article",
    { class: "node", "data-node": n.name, "data-state": state },
    h("header", {}, h("h3", { text: n.name }), h("span", { class: "state", text: state })),
    h("p", { class: "sub", text: rankLine.join(" · ") }),
    h(
      "dl",
      {},
      row("holds", holds(n)),
      row("memory", memory(n), meter),
      row("weights", n.weights !== null && n.weights !== undefined ? `${bytes(n.weights)} held` : null),
      row("wired limit", n.wired_limit ? bytes(n.wired_limit) : null),
      row("sent", n.bytes_per_token !== null && n.bytes_per_token !== undefined ? `${bytes(n.bytes_per_token)}/token` : null),
      row("heartbeat", beat),
    ),
    load,
  );
}

export function drawNodes(root, snap) {
  const nodes = [...snap.nodes].sort(
    (a, b) => (a.rank ?? 1e9) - (b.rank ?? 1e9) || a.name.localeCompare(b.name),
  );
  root.replaceChildren(...nodes.map(card));
}
