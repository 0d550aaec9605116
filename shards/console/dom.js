// dom.js: small DOM and formatting helpers shared by every view of the console.
// Elements are built with h(), never from HTML strings, so text coming from
// devices can never become markup.

/**
 * Builds an element. `attrs` keys: `class`, `text`, `on<event>` (listener),
 * `dataset` (object), boolean and string attributes; children are nodes,
 * strings or arrays of them (null and false are skipped).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces every child of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** "3 s ago", "5 min ago", "2 h ago", "4 d ago" from a ms epoch; "—" for none. */
export function ago(ms, now = Date.now()) {
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms <= 0) return "—";
  return duration(Math.max(0, now - ms)) + " ago";
}

/** A duration in ms as "42 s", "5 min", "3 h 12 min", "2 d 4 h". */
export function duration(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const hr = Math.floor(m / 60);
  if (hr < 24) return m % 60 ? `${hr} h ${m % 60} min` : `${hr} h`;
  const d = Math.floor(hr / 24);
  return hr % 24 ? `${d} d ${hr % 24} h` : `${d} d`;
}

/** Local wall-clock time of a ms epoch, with the date when it is not today. */
export function clock(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms <= 0) return "—";
  const d = new Date(ms);
  const today = new Date();
  const time = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === today.toDateString() ? time : `${d.toLocaleDateString()} ${time}`;
}

/** A number with thousands separators. */
export function num(n) {
  return typeof n === "number" && Number.isFinite(n) ? n.toLocaleString("en-US") : "—";
}

/** Compact one-line text of any JSON value, cut to `max` characters. */
export function brief(value, max = 160) {
  let s;
  try {
    s = typeof value === "string" ? value : JSON.stringify(value);
  } catch {
    s = String(value);
  }
  if (s === undefined) s = "";
  return s.length > max ? s.slice(0, max - 1) + "…" : s;
}

/** "key=value · key=value" of an object's fields (the device shadow in a table cell). */
export function fields(obj, max = 120) {
  if (!obj || typeof obj !== "object" || Array.isArray(obj)) return brief(obj, max);
  const parts = Object.keys(obj)
    .sort()
    .map((k) => `${k}=${typeof obj[k] === "string" ? obj[k] : brief(obj[k], 40)}`);
  return brief(parts.join(" · "), max);
}

/** Calls `fn` once `ms` have passed without another call. */
export function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Runs `jobs` (functions returning promises) with at most `limit` in flight. */
export async function pool(jobs, limit) {
  const results = new Array(jobs.length);
  let next = 0;
  async function worker() {
    while (next < jobs.length) {
      const i = next++;
      try {
        results[i] = { ok: true, value: await jobs[i]() };
      } catch (error) {
        results[i] = { ok: false, error };
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, jobs.length) }, worker));
  return results;
}

/** A random hex string of `bytes` bytes (addresses of the console's own client). */
export function randomHex(bytes = 4) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Address alphabet of the protocol: 1..64 of A-Z a-z 0-9 . _ : @ - */
export const ADDRESS_RE = /^[A-Za-z0-9._:@-]{1,64}$/;
