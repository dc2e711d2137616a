// The chat: streamed answers from /v1/chat/completions, the reasoning folded apart, a line of
// figures after each answer, a stop button, and the conversation kept in the browser per model.
import { $, h, num } from "./dom.js";
import { authed, errorText, key, readSSE } from "./api.js";

let model = null;
// {role: "user", content} | {role: "assistant", content, reasoning, rtokens, tps, figures, error}
let turns = [];
let busy = null; // the AbortController of the answer streaming
let hooks = {};
let current = null; // the turn streaming

const storeKey = () => `mlxdist.chat.${model}`;
// Behind a key the conversation lives as long as the key does (the tab's sessionStorage): on a
// shared machine the next user of the browser finds neither. An open server's is kept.
const store = () => (key.get() ? sessionStorage : localStorage);

function save() {
  try {
    if (turns.length) store().setItem(storeKey(), JSON.stringify(turns));
    else store().removeItem(storeKey());
  } catch {
    // storage full or refused: the chat goes on without it
  }
}

function restore() {
  try {
    const t = JSON.parse(store().getItem(storeKey()) || "[]");
    if (!Array.isArray(t)) return [];
    // an answer the page left while it streamed: say so
    for (const turn of t)
      if (turn.role === "assistant" && !turn.figures && !turn.error)
        turn.error = turn.content
          ? "cut short: the page was left while it streamed"
          : "no answer: the page was left before it came";
    return t;
  } catch {
    return [];
  }
}

// The past turns the model is sent: answers' text only, and only turns that got an answer.
function history() {
  const out = [];
  for (let i = 0; i + 1 < turns.length; i += 2) {
    const [q, a] = [turns[i], turns[i + 1]];
    if (q.role === "user" && a.role === "assistant" && a.content)
      out.push({ role: "user", content: q.content }, { role: "assistant", content: a.content });
  }
  return out;
}

function questionEl(turn) {
  return h("div", { class: "question" }, h("p", { text: turn.content }));
}

// An answer's element, and a function that brings it up to date with its turn.
function answerEl(turn) {
  const summary = h("summary");
  const rtext = h("div", { class: "reasoning-text" });
  const details = h("details", { class: "reasoning", hidden: true }, summary, rtext);
  const text = h("div", { class: "answer-text" });
  const error = h("p", { class: "answer-error", role: "alert", hidden: true });
  const figures = h("p", { class: "answer-figures", hidden: true });
  const el = h("div", { class: "answer" }, details, text, error, figures);
  const update = () => {
    if (turn.reasoning) {
      details.hidden = false;
      summary.textContent = `reasoning (${turn.rtokens} tokens)`;
      rtext.textContent = turn.reasoning;
    }
    text.textContent = turn.content;
    error.hidden = !turn.error;
    error.textContent = turn.error || "";
    figures.hidden = !turn.figures;
    figures.textContent = turn.figures || "";
    el.classList.toggle("streaming", turn === current);
  };
  update();
  return { el, update };
}

function drawAll() {
  const log = $("#chat-log");
  log.replaceChildren(
    ...turns.map((t) => (t.role === "user" ? questionEl(t) : answerEl(t).el)),
  );
  log.scrollTop = log.scrollHeight;
}

export function lastAnswerTps() {
  for (let i = turns.length - 1; i >= 0; i--) if (turns[i].tps) return turns[i].tps;
  return null;
}

function setBusy(ctl) {
  busy = ctl;
  $("#chat-stop").disabled = !ctl;
  $("#chat-send").disabled = !!ctl;
}

function maxTokens() {
  const n = parseInt($("#chat-max").value, 10);
  return Number.isFinite(n) && n > 0 ? n : 256;
}

async function send() {
  const input = $("#chat-input");
  const text = input.value.trim();
  if (busy || !model || !text) return;
  input.value = "";
  const messages = [...history(), { role: "user", content: text }];
  const q = { role: "user", content: text };
  const turn = { role: "assistant", content: "", reasoning: "", rtokens: 0 };
  turns.push(q, turn);
  current = turn;
  save();
  const log = $("#chat-log");
  const { el, update } = answerEl(turn);
  log.append(questionEl(q), el);
  log.scrollTop = log.scrollHeight;
  let frame = 0;
  const redraw = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      update();
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
  };
  const ctl = new AbortController();
  setBusy(ctl);
  const t0 = performance.now();
  let first = null;
  let finish = null;
  let usage = null;
  let pieces = 0;
  try {
    const res = await authed("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({
        model,
        messages,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: maxTokens(),
      }),
      signal: ctl.signal,
    });
    if (!res.ok) {
      turn.error = res.status === 401 ? "the API key was refused" : await errorText(res);
      if (res.status === 401) hooks.onAuth?.();
    } else {
      await readSSE(res, (_type, data) => {
        if (data === "[DONE]") return;
        let c;
        try {
          c = JSON.parse(data);
        } catch {
          return;
        }
        if (c.error) turn.error = c.error.message || JSON.stringify(c.error);
        if (c.usage) usage = c.usage;
        const ch = c.choices?.[0];
        if (!ch) return redraw();
        const d = ch.delta || {};
        if (d.reasoning_content) {
          turn.reasoning += d.reasoning_content;
          turn.rtokens++;
        }
        if (d.content) turn.content += d.content;
        if (d.reasoning_content || d.content) {
          first ??= performance.now();
          pieces++;
        }
        if (ch.finish_reason) finish = ch.finish_reason;
        redraw();
      });
    }
  } catch (e) {
    if (ctl.signal.aborted) finish = "stopped";
    else turn.error = `network error: ${e.message || e}`;
  }
  const end = performance.now();
  current = null;
  setBusy(null);
  if (first !== null) {
    const tokens = usage?.completion_tokens ?? pieces;
    const rt = usage?.completion_tokens_details?.reasoning_tokens;
    if (rt !== undefined && rt !== null) turn.rtokens = rt;
    const measured = tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null;
    const tps = usage?.decode_tokens_per_second || measured;
    turn.tps = tps;
    turn.figures = [
      `TTFT ${num((first - t0) / 1000, 2)} s`,
      tps ? `${num(tps)} tok/s` : null,
      `${tokens} tokens`,
      `finish ${finish ?? "?"}`,
    ]
      .filter(Boolean)
      .join(" · ");
  } else if (!turn.error)
    turn.error =
      finish === "stopped" ? "stopped before the first token" : `no text came (finish ${finish ?? "?"})`;
  cancelAnimationFrame(frame);
  update();
  save();
  hooks.onAnswer?.();
  $("#chat-input").focus();
}

function stop() {
  busy?.abort();
}

function newChat() {
  stop();
  turns = [];
  save();
  drawAll();
  $("#chat-input").focus();
}

export function chatFor(snap) {
  const show = snap.kind !== "agents" && !!snap.model;
  $("#chat").hidden = !show;
  if (!show) {
    stop();
    return;
  }
  if (snap.model.name === model) return;
  stop();
  model = snap.model.name;
  turns = restore();
  drawAll();
}

export function initChat(h) {
  hooks = h;
  $("#chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("#chat-stop").addEventListener("click", stop);
  $("#chat-new").addEventListener("click", newChat);
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("#chat").addEventListener("keydown", (e) => {
    if (e.key === "Escape" && busy) {
      e.preventDefault();
      stop();
    }
  });
}
