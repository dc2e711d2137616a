// One card per node: rank, what it holds, memory, weights, wired limit, bytes sent per token,
// heartbeat age, state, load progress while it loads, and the fetch from the Hub or push from
// the launcher it is receiving (agents' dashboard).
import { h, bytes, secs, has, known } from "./dom.js";
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

// In expert mode every rank runs every layer: what sets it apart is its routed experts.
function holds(n) {
  if (n.experts) return `experts ${ranges(n.experts)} (${n.experts.length}) of every layer`;
  if (n.layers) return `layers ${n.layers[0]}–${n.layers[1]}`;
  if (n.ranks?.length) return `ranks ${n.ranks.join(", ")}`;
  return null;
}

// "used 120 GB of 170 GB usable" (or "of 192 GB total" when the usable share is not known)
function memory(n) {
  const of = has(n.memory_usable)
    ? `${bytes(n.memory_usable)} usable`
    : known(n.memory_total, (m) => `${bytes(m)} total`);
  if (!has(n.memory_used)) return of;
  return `used ${bytes(n.memory_used)}${of ? ` of ${of}` : ""}`;
}

const row = (label, value, extra = null) =>
  has(value) ? [h("dt", { text: label }), h("dd", {}, value, extra)] : null;

function meter(n) {
  const top = n.memory_usable ?? n.memory_total;
  if (!top || !has(n.memory_used)) return null;
  const value = Math.min(n.memory_used, top);
  return h("meter", { min: 0, max: top, value, high: top * 0.9, title: "memory used" });
}

function load(n) {
  if (!n.load) return null;
  const { done, total, rate, eta } = n.load;
  const pct = total ? Math.round((100 * done) / total) : 0;
  const said = `load ${pct}% (${bytes(done)} of ${bytes(total)}) · ${bytes(rate)}/s, ${secs(eta)} left`;
  return h(
    "div",
    { class: "load" },
    h("progress", { max: total || 1, value: done || 0, "aria-label": `loading ${n.name}` }),
    h("span", { text: said }),
  );
}

// "fetch org/repo 12.3 of 60.1 GB · 1.1 GB/s · 44 s left"; a push's size is known only once
// its file is whole, so its bar has no end (an indeterminate <progress>) until then.
// "12.3 of 60.1 GB" (the unit said once when both have it), "800 MB of 1.2 GB"
function share(done, total) {
  const [a, b] = [bytes(done), bytes(total)];
  const unit = b.split(" ")[1];
  return a.endsWith(` ${unit}`) ? `${a.split(" ")[0]} of ${b}` : `${a} of ${b}`;
}

export function transferText(t) {
  const of = has(t.total) ? share(t.done, t.total) : bytes(t.done);
  const parts = [`${t.kind} ${t.what} ${of}`];
  if (t.rate) parts.push(`${bytes(t.rate)}/s`);
  if (has(t.eta)) parts.push(`${secs(t.eta)} left`);
  return parts.join(" · ");
}

function transfer(n) {
  const t = n.transfer;
  if (!t) return null;
  const bar = has(t.total)
    ? { max: t.total || 1, value: Math.min(t.done || 0, t.total || 1) }
    : {}; // no value: indeterminate
  return h(
    "div",
    { class: "transfer", "data-kind": t.kind },
    h("progress", { ...bar, "aria-label": `${t.kind} to ${n.name}` }),
    h("span", { text: transferText(t) }),
  );
}

function card(n) {
  const state = stateOf(n);
  const rank = has(n.rank) ? `rank ${n.rank}` : "agent, no rank";
  return h(
    "article",
    { class: "node", "data-node": n.name, "data-state": state },
    h("header", {}, h("h3", { text: n.name }), h("span", { class: "state", text: state })),
    h("p", { class: "sub", text: [rank, n.chip, n.address].filter(Boolean).join(" · ") }),
    h(
      "dl",
      {},
      row("holds", holds(n)),
      row("memory", memory(n), meter(n)),
      row("weights", known(n.weights, (w) => `${bytes(w)} held`)),
      row("wired limit", n.wired_limit ? bytes(n.wired_limit) : null),
      row("sent", known(n.bytes_per_token, (b) => `${bytes(b)}/token`)),
      row("heartbeat", known(n.heartbeat_age, (a) => `beat ${secs(a)} ago`)),
    ),
    load(n),
    transfer(n),
  );
}

export function drawNodes(root, snap) {
  const nodes = [...snap.nodes].sort(
    (a, b) => (a.rank ?? 1e9) - (b.rank ?? 1e9) || a.name.localeCompare(b.name),
  );
  root.replaceChildren(...nodes.map(card));
}
