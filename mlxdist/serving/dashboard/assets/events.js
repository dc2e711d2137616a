// The events, newest first, each with its local time. New events are put on top of the list
// (the list is aria-live: rebuilding it would read every event out again).
import { h, clock } from "./dom.js";

const KINDS = new Set(["failed", "replan", "refused", "info"]);
const SHOWN = 200;
let last = null; // the newest event drawn

// The event's text, with its node's name as the page shows it when the text lacks it.
export const named = (e) => (e.node && !e.text.includes(e.node) ? `${e.node}: ${e.text}` : e.text);

const item = (e) =>
  h(
    "li",
    { "data-kind": KINDS.has(e.kind) ? e.kind : "info" },
    h("time", { datetime: new Date(e.t * 1000).toISOString(), text: clock(e.t) }),
    h("span", { class: "kind", text: e.kind }),
    h("span", { class: "text", text: named(e) }),
  );

export function drawEvents(root, events, reorder) {
  const at = last && !reorder ? events.lastIndexOf(last) : -1;
  if (at >= 0 && root.querySelector("li[data-kind]")) {
    for (const e of events.slice(at + 1)) root.prepend(item(e));
    while (root.children.length > SHOWN) root.lastElementChild.remove();
  } else {
    const items = events.slice(-SHOWN).reverse().map(item);
    if (!items.length) items.push(h("li", { class: "none", text: "nothing has happened yet" }));
    root.replaceChildren(...items);
  }
  last = events.length ? events[events.length - 1] : null;
}
