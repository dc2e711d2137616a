// The API key (kept in sessionStorage), requests that carry it, and a server-sent events parser
// for fetch() bodies (EventSource cannot send an Authorization header).
const KEY = "mlxdist.key";

export const key = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (k) => sessionStorage.setItem(KEY, k),
  clear: () => sessionStorage.removeItem(KEY),
};

export class Unauthorized extends Error {}

export function authed(url, init = {}) {
  const headers = new Headers(init.headers || {});
  const k = key.get();
  if (k) headers.set("Authorization", `Bearer ${k}`);
  return fetch(url, { ...init, headers, cache: "no-store" });
}

// The error line of a failed response: the API's {"error": {"message"}} when there is one.
export async function errorText(res) {
  let msg = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    const e = body.error ?? body.detail;
    msg = typeof e === "string" ? e : e?.message || msg;
  } catch {
    // not JSON: the status line says it
  }
  return msg;
}

// Feed it text as it arrives; it calls onEvent(type, data) per complete event.
export function sseParser(onEvent) {
  let buf = "";
  let type = "";
  let data = [];
  const line = (l) => {
    if (l === "") {
      if (data.length) onEvent(type || "message", data.join("\n"));
      type = "";
      data = [];
      return;
    }
    if (l.startsWith(":")) return;
    const i = l.indexOf(":");
    const field = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? "" : l.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  };
  return (text) => {
    buf += text;
    // a "\r" at the very end may be the first half of "\r\n": wait for the next piece
    const cut = buf.endsWith("\r") ? buf.length - 1 : buf.length;
    const lines = buf.slice(0, cut).split(/\r\n|\r|\n/);
    buf = lines.pop() + buf.slice(cut);
    for (const l of lines) line(l);
  };
}

// Read a response body as SSE until it ends; each event goes to onEvent(type, data), and
// onChunk() hears of every piece that arrives (keep-alive comments too).
export async function readSSE(res, onEvent, onChunk = () => {}) {
  const feed = sseParser(onEvent);
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    onChunk();
    feed(dec.decode(value, { stream: true }));
  }
}
