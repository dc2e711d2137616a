// The dashboard: asks for the key when the server wants one, reads the snapshot and the live
// feed, and draws each part of the page at most once per animation frame.
import { authed, key } from "./api.js";
import { $, median, num } from "./dom.js";
import { store, mark, onDraw, applyState, applyTick, addEvent, addTtft } from "./store.js";
import { startLive } from "./live.js";
import { drawRing } from "./ring.js";
import { drawNodes } from "./nodes.js";
import { drawPlots } from "./plot.js";
import { drawEvents } from "./events.js";
import { initChat, chatFor, lastAnswerTps } from "./chat.js";

let stopLive = null;
let retry = 1;

function askKey(refused) {
  stopLive?.();
  stopLive = null;
  $("#app").hidden = true;
  $("#key-error").hidden = !refused;
  const dlg = $("#key-dialog");
  if (!dlg.open) dlg.showModal();
  $("#key-input").focus();
}

async function load() {
  let res;
  try {
    res = await authed("/mlxdist/state");
  } catch {
    res = null;
  }
  if (res?.status === 401) {
    const refused = key.get() !== "";
    key.clear();
    askKey(refused);
    return;
  }
  let snap = null;
  try {
    snap = res?.ok ? await res.json() : null;
  } catch {
    snap = null; // cut off, or not JSON: as good as no answer
  }
  if (!snap) {
    // not a refused key: the page's frame shows, with the reason in its badge
    $("#app").hidden = false;
    const why = res ? `${res.status} ${res.statusText}`.trim() : "server unreachable";
    conn(`disconnected (${why}), retrying in ${retry} s`, "down");
    setTimeout(load, retry * 1000);
    retry = Math.min(retry * 2, 5);
    return;
  }
  retry = 1;
  const dlg = $("#key-dialog");
  if (dlg.open) dlg.close();
  $("#app").hidden = false;
  applyState(snap);
  stopLive?.();
  stopLive = startLive({
    onEvent,
    onUp: () => conn("live", "up"),
    onDown: (s, why) => conn(`disconnected, retrying in ${s} s (${why})`, "down"),
    onAuth: () => askKey(key.get() !== ""),
  });
}

function conn(text, cls) {
  const el = $("#conn");
  el.textContent = text;
  el.dataset.conn = cls;
}

let answers = null;
let ttftAsked = 0;

function onEvent(type, body) {
  if (type === "state") applyState(body);
  else if (type === "event") addEvent(body);
  else if (type === "tick") {
    applyTick(body);
    // ticks carry no ttft: when answers grow, read them from a snapshot (at most every 3 s)
    if (answers !== null && body.answers > answers && !Array.isArray(body.ttft)) refreshTtft();
    answers = body.answers;
  }
}

let ttftTimer = 0;

function refreshTtft() {
  if (ttftTimer) return;
  const wait = Math.max(0, ttftAsked + 3000 - Date.now());
  ttftTimer = setTimeout(async () => {
    ttftTimer = 0;
    ttftAsked = Date.now();
    try {
      const res = await authed("/mlxdist/state");
      if (res.ok) addTtft((await res.json()).ttft || []);
    } catch {
      // the live feed says when the server is gone
    }
  }, wait);
}

// The measured speed: the median of the last ticks that decoded, or the last answer's.
function measured() {
  const recent = store.tps.slice(-20).map((p) => p.tps);
  if (recent.length) return median(recent);
  const tt = store.snap?.ttft;
  return tt?.length ? tt[tt.length - 1].tps : lastAnswerTps();
}

function drawHeader() {
  const snap = store.snap;
  const model = snap.model;
  $("#model").textContent = model
    ? `${model.name}${model.model_type ? ` (${model.model_type})` : ""}`
    : snap.kind === "agents"
      ? "agents, no model running"
      : "no model";
  const plan = snap.plan;
  const parts = [];
  if (plan) {
    parts.push(plan.parallel);
    if (plan.backend) parts.push(plan.backend);
    if (plan.split) parts.push(`split ${plan.split.join(",")}`);
    if (plan.link) parts.push(plan.link);
  }
  parts.push(`${snap.nodes.length} nodes`);
  if (model?.context) parts.push(`context ${model.context}`);
  $("#plan").textContent = parts.join(" · ");
  const m = snap.kind === "agents" ? null : measured();
  const speed = [];
  if (plan?.predicted_tps) speed.push(`predicted ${num(plan.predicted_tps)} tok/s`);
  if (m !== null && m !== undefined) speed.push(`measured ${num(m)} tok/s`);
  $("#speed").textContent = speed.join(" · ");
}

function drawAlert() {
  $("#alert").hidden = !store.alert;
  $("#alert-text").textContent = store.alert || "";
}

onDraw((parts) => {
  if (!store.snap) return;
  if (parts.has("header")) drawHeader();
  if (parts.has("alert")) drawAlert();
  if (parts.has("ring")) drawRing($("#ring"), store.snap);
  if (parts.has("nodes")) drawNodes($("#nodes"), store.snap);
  if (parts.has("plots")) drawPlots(store.snap, store.tps);
  if (parts.has("events")) {
    drawEvents($("#events"), store.events, store.reorder);
    store.reorder = false;
  }
  if (parts.has("chat")) chatFor(store.snap);
});

function init() {
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const k = $("#key-input").value.trim();
    if (!k) return;
    key.set(k);
    $("#key-input").value = "";
    load();
  });
  // the dialog stays until a key is taken
  $("#key-dialog").addEventListener("cancel", (e) => e.preventDefault());
  $("#alert-close").addEventListener("click", () => {
    store.alert = null;
    mark("alert");
  });
  // the ring drawing is laid out for its width: draw it again when that changes
  let width = 0;
  new ResizeObserver(([e]) => {
    const w = Math.round(e.contentRect.width);
    if (w !== width) {
      width = w;
      mark("ring");
    }
  }).observe($(".ring-card"));
  initChat({ onAnswer: () => mark("header"), onAuth: () => askKey(true) });
  load();
}

init();
