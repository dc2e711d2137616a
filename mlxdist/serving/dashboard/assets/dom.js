// Small DOM helpers and the page's number formats (bytes are 1024-based: "192 GB" is what a Mac
// with 192 GB of memory reports).
const SVG = "http://www.w3.org/2000/svg";

function build(el, attrs, kids) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k === "class") el.setAttribute("class", v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

// h("div", {class: "x"}, child, "text"): an HTML element; s(...) the same in SVG.
export const h = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
export const s = (tag, attrs, ...kids) => build(document.createElementNS(SVG, tag), attrs, kids);
export const $ = (sel) => document.querySelector(sel);

export function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  const digits = i === 0 || n >= 100 || Number.isInteger(n) ? 0 : 1;
  return `${n.toFixed(digits)} ${units[i]}`;
}

export function secs(x) {
  if (x === null || x === undefined) return "?";
  if (x < 10) return `${x.toFixed(1)} s`;
  if (x < 120) return `${Math.round(x)} s`;
  if (x < 7200) return `${Math.round(x / 60)} min`;
  return `${(x / 3600).toFixed(1)} h`;
}

export const num = (x, d = 1) => (x === null || x === undefined ? "?" : Number(x).toFixed(d));

export function clock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function median(xs) {
  if (!xs.length) return null;
  const v = [...xs].sort((a, b) => a - b);
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

export const has = (x) => x !== null && x !== undefined;
// f(x) when x is known, else null: has(x) ? f(x) : null
export const known = (x, f) => (has(x) ? f(x) : null);
