// What the page knows: the last snapshot with ticks applied, its own list of events (kept across
// reconnects), the nodes seen failing, and which parts of the page need drawing again.
const MAX_POINTS = 300;
const MAX_EVENTS = 500;

export const store = {
  snap: null,
  events: [], // oldest first, the page's own list
  seen: new Set(), // keys of events already in the list
  failed: new Set(), // node names a failed event named (until a replan)
  sawFailed: false,
  instance: null,
  tps: [], // {t, tps} of ticks with tps > 0
  alert: null,
  reorder: false, // an event came in before the newest: the list is drawn again whole
  dirty: new Set(),
};

let draw = () => {};
let frame = 0;

// Every change marks parts dirty; one animation frame draws them all.
export function onDraw(fn) {
  draw = fn;
}

export function mark(...parts) {
  for (const p of parts) store.dirty.add(p);
  if (!frame)
    frame = requestAnimationFrame(() => {
      frame = 0;
      const parts = new Set(store.dirty);
      store.dirty.clear();
      draw(parts);
    });
}

const ALL = ["header", "ring", "nodes", "plots", "events", "alert", "chat"];

export function applyState(snap) {
  const old = store.instance;
  if (old && snap.instance !== old) {
    if (store.sawFailed)
      addEvent({
        t: Date.now() / 1000,
        kind: "replan",
        text: `the cluster was planned again: ${snap.nodes.length} nodes`,
        node: null,
        client: true,
      });
    store.sawFailed = false;
    store.failed.clear();
  }
  store.instance = snap.instance;
  snap.series = (snap.series || []).slice(-MAX_POINTS);
  snap.ttft = snap.ttft || [];
  store.snap = snap;
  mergeTps(snap.series);
  for (const e of snap.events || []) addEvent(e);
  mark(...ALL);
}

function mergeTps(series) {
  const first = series.length ? series[0].t : Infinity;
  const kept = store.tps.filter((p) => p.t < first);
  const fresh = series.filter((x) => x.tps > 0).map((x) => ({ t: x.t, tps: x.tps }));
  store.tps = kept.concat(fresh).slice(-MAX_POINTS);
}

export function applyTick(tick) {
  const snap = store.snap;
  if (!snap) return;
  snap.live = tick;
  snap.series.push(tick);
  if (snap.series.length > MAX_POINTS) snap.series.splice(0, snap.series.length - MAX_POINTS);
  if (tick.tps > 0) {
    store.tps.push({ t: tick.t, tps: tick.tps });
    if (store.tps.length > MAX_POINTS) store.tps.shift();
  }
  // a server that sends answers' ttft in the tick (not in the contract): take them
  if (Array.isArray(tick.ttft)) addTtft(tick.ttft);
  const changed = { ring: false };
  for (const node of snap.nodes) {
    const n = tick.nodes?.[node.name];
    if (!n) continue;
    if (n.state && n.state !== node.state) changed.ring = true;
    Object.assign(node, n);
  }
  mark("header", "nodes", "plots", ...(changed.ring ? ["ring"] : []));
}

export function addTtft(list) {
  const snap = store.snap;
  const last = snap.ttft.length ? snap.ttft[snap.ttft.length - 1].t : -Infinity;
  for (const x of list) if (x.t > last) snap.ttft.push(x);
  if (snap.ttft.length > MAX_POINTS) snap.ttft.splice(0, snap.ttft.length - MAX_POINTS);
  mark("plots", "header");
}

const keyOf = (e) => `${e.t}|${e.kind}|${e.text}`;

// A failed event names its node in event.node, or else somewhere in its text.
function failedNode(e) {
  if (e.node) return e.node;
  const names = (store.snap?.nodes || []).map((n) => n.name).sort((a, b) => b.length - a.length);
  return names.find((name) => e.text?.includes(name)) ?? null;
}

export function addEvent(e) {
  const k = keyOf(e);
  if (store.seen.has(k)) return;
  store.seen.add(k);
  // kept in time order: an event older than the newest is put in its place (and the list redrawn)
  let i = store.events.length;
  while (i > 0 && store.events[i - 1].t > e.t) i--;
  if (i < store.events.length) store.reorder = true;
  store.events.splice(i, 0, e);
  if (store.events.length > MAX_EVENTS) store.seen.delete(keyOf(store.events.shift()));
  if (e.kind === "failed") {
    const name = failedNode(e);
    if (name) store.failed.add(name);
    store.sawFailed = true;
    store.alert = name && !e.text.includes(name) ? `${name}: ${e.text}` : e.text;
    mark("alert", "ring", "nodes");
  } else if (e.kind === "replan") {
    store.failed.clear();
    if (!e.client) store.sawFailed = false;
    store.alert = null;
    mark("alert", "ring", "nodes");
  }
  mark("events");
}

// A node's state as the page shows it: failed once an event said so.
export const stateOf = (node) => (store.failed.has(node.name) ? "failed" : node.state);
