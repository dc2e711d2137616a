// The live feed: GET /mlxdist/live read with fetch (it needs the key), parsed as SSE, and read
// again after a pause of 1, 2, 4, then 5 s whenever it ends or fails.
import { authed, readSSE } from "./api.js";

const SILENCE = 20000; // ms without a byte (ticks come each second): the feed is dead

export function startLive({ onEvent, onUp, onDown, onAuth }) {
  let stopped = false;
  let ctl = null;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  (async () => {
    let delay = 1;
    while (!stopped) {
      ctl = new AbortController();
      let last = Date.now();
      const watch = setInterval(() => Date.now() - last > SILENCE && ctl.abort(), 1000);
      let why = "the feed ended";
      try {
        const res = await authed("/mlxdist/live", {
          signal: ctl.signal,
          headers: { Accept: "text/event-stream" },
        });
        if (res.status === 401) {
          clearInterval(watch);
          onAuth();
          return;
        }
        if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
        await readSSE(
          res,
          (type, data) => {
            let body;
            try {
              body = JSON.parse(data);
            } catch {
              return; // not JSON: not one of ours
            }
            if (type === "state") {
              delay = 1;
              onUp();
            }
            onEvent(type, body);
          },
          () => (last = Date.now()),
        );
      } catch (e) {
        // fetch's own words ("Failed to fetch", "network error") say less than this
        if (ctl.signal.aborted) why = "no data for 20 s";
        else why = e instanceof TypeError ? "connection lost" : String(e.message || e);
      }
      clearInterval(watch);
      if (stopped) return;
      onDown(delay, why);
      await sleep(delay * 1000);
      delay = Math.min(delay * 2, 5);
    }
  })();
  return () => {
    stopped = true;
    ctl?.abort();
  };
}
