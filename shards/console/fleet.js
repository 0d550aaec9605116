// fleet.js: the fleet view. Live counts from /api/v1/stats every 2 s; one page
// (100 rows) of online clients from /api/v1/clients with an `after` cursor,
// filtered by address prefix and role; the device shadow fetched for the rows
// on screen only, so the page stays fast with 100,000 clients online.

import { h, replace, num, duration, fields, debounce, pool, ago } from "./dom.js";
import { summarize, rate } from "./stats.js";

const PAGE = 100;
const STATS_EVERY_MS = 2000;
const LIST_EVERY_MS = 3000;
/** The shadow of a visible row is fetched again after this long. */
const STATE_MAX_AGE_MS = 6000;
/** Shadow requests in flight at once. */
const STATE_CONCURRENCY = 6;

/** The view's position survives a visit to a device and back. */
const memory = { prefix: "", role: "controller", cursors: [null] };

export function fleetView(root, ctx) {
  const { api } = ctx;
  let alive = true;
  let prevStats = null;
  let prevAt = 0;
  let page = null; // last list response
  let listSeq = 0;
  /** addr -> {state, at, error} */
  const states = new Map();
  /** The relay keeps no device shadow (rules off): stop asking for it. */
  let noShadow = false;
  const timers = [];

  const counts = h("section", { class: "counts", id: "counts", "aria-label": "Live counts" });
  const search = h("input", {
    type: "search",
    id: "search",
    placeholder: "Address prefix, e.g. ctl-8266-",
    value: memory.prefix,
    spellcheck: "false",
    autocomplete: "off",
    "aria-label": "Search by address prefix",
  });
  const role = h(
    "select",
    { id: "role", "aria-label": "Role" },
    ["controller", "browser", "tool", "service", ""].map((r) =>
      h("option", { value: r, selected: r === memory.role, text: r ? `${r}s` : "all roles" }),
    ),
  );
  const status = h("p", { class: "muted small", id: "fleet-status", role: "status" });
  const tbody = h("tbody", { id: "fleet-rows" });
  const table = h(
    "table",
    { class: "grid fleet" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Address", "Role", "Connected", "Shard", "Last state"].map((t) => h("th", { scope: "col", text: t })),
      ),
    ),
    tbody,
  );
  const prevBtn = h("button", { type: "button", id: "prev", text: "‹ Previous", onclick: () => turn(-1) });
  const nextBtn = h("button", { type: "button", id: "next", text: "Next ›", onclick: () => turn(1) });
  const pageLabel = h("span", { class: "muted", id: "page-label" });

  root.append(
    h("h1", { class: "title", text: "Fleet" }),
    counts,
    h("div", { class: "toolbar" }, search, role),
    status,
    h("div", { class: "table-wrap" }, table),
    h("nav", { class: "pager", "aria-label": "Pages" }, prevBtn, pageLabel, nextBtn),
  );

  // ---- counts
  async function refreshStats() {
    if (document.hidden) return;
    try {
      const s = summarize(await api.stats());
      const now = Date.now();
      const dt = now - prevAt;
      const inRate = rate(prevStats, s, "framesIn", dt);
      const outRate = rate(prevStats, s, "framesOut", dt);
      prevStats = s;
      prevAt = now;
      if (!alive) return;
      const card = (label, value, id) =>
        h(
          "div",
          { class: "count", id },
          h("span", { class: "count-value", text: value }),
          h("span", { class: "count-label", text: label }),
        );
      replace(
        counts,
        card("controllers online", num(s.byRole.controller), "count-controllers"),
        card("browsers", num(s.byRole.browser), "count-browsers"),
        card("connections", num(s.total), "count-total"),
        card("frames in / s", inRate === null ? "…" : num(Math.round(inRate)), "count-in"),
        card("frames out / s", outRate === null ? "…" : num(Math.round(outRate)), "count-out"),
        card("dropped", num(s.drops), "count-drops"),
        card(
          s.shards.length ? `shards (connections ${s.shards.map((x) => num(x.conns)).join(" / ")})` : "shards",
          s.shards.length ? String(s.shards.length) : "—",
          "count-shards",
        ),
        card("uptime", s.uptimeS === null ? "—" : duration(s.uptimeS * 1000), "count-uptime"),
      );
    } catch (e) {
      if (alive && e.status !== 401) {
        replace(counts, h("p", { class: "error", text: `Counts unavailable: ${e.message}` }));
      }
    }
  }

  // ---- list
  async function refreshList() {
    if (document.hidden) return;
    const seq = ++listSeq;
    const cursor = memory.cursors[memory.cursors.length - 1];
    try {
      const res = await api.clients({ role: memory.role, prefix: memory.prefix, limit: PAGE, after: cursor });
      if (!alive || seq !== listSeq) return;
      page = res;
      render();
      refreshStates();
    } catch (e) {
      if (!alive || seq !== listSeq || e.status === 401) return;
      status.textContent = e.status === 400 ? `Search refused: ${e.message}` : `Cannot list clients: ${e.message}`;
      status.classList.add("error");
    }
  }

  function render() {
    const items = page ? page.items : [];
    status.classList.remove("error");
    const what = memory.role ? `${memory.role}s` : "clients";
    const filter = memory.prefix ? ` whose address starts with “${memory.prefix}”` : "";
    const one = items.length === 1 && !page.next;
    status.textContent = items.length
      ? `${items.length} online ${one ? what.replace(/s$/, "") : what}${filter}${page.next ? " on this page; more on the next" : ""}.`
      : memory.cursors.length > 1
        ? "No more clients."
        : `No online ${what}${filter}.`;
    const rows = items.map((c) => {
      const addr = String(c.addr ?? "");
      const href = `#/device/${encodeURIComponent(addr)}`;
      const st = states.get(addr);
      return h(
        "tr",
        { dataset: { addr }, class: "row-link", onclick: (ev) => ev.target.tagName !== "A" && ctx.go(href) },
        h("td", { "data-label": "Address", class: "addr" }, h("a", { href, text: addr })),
        h("td", { "data-label": "Role", text: c.role ?? "—" }),
        h("td", { "data-label": "Connected" }, connected(c.connected_at_ms)),
        h("td", { "data-label": "Shard", text: c.shard ?? "—" }),
        h("td", { "data-label": "Last state", class: "state", text: stateText(st) }),
      );
    });
    replace(tbody, rows);
    prevBtn.disabled = memory.cursors.length <= 1;
    nextBtn.disabled = !(page && page.next !== null && page.next !== undefined && page.next !== "");
    pageLabel.textContent = `Page ${memory.cursors.length}`;
  }

  function connected(ms) {
    if (typeof ms !== "number") return "—";
    return h("span", { class: "ago", dataset: { ts: ms }, title: new Date(ms).toLocaleString(), text: ago(ms) });
  }

  function stateText(st) {
    if (!st) return noShadow ? "—" : "…";
    if (st.error) return st.error;
    const text = fields(st.state);
    return text === "{}" || text === "" ? "—" : text;
  }

  async function refreshStates() {
    if (noShadow) return;
    const now = Date.now();
    const addrs = (page ? page.items : [])
      .map((c) => String(c.addr ?? ""))
      .filter((a) => {
        const s = states.get(a);
        return !s || now - s.at > STATE_MAX_AGE_MS;
      });
    // Forget rows that left the page so the map stays as small as a page.
    const visible = new Set((page ? page.items : []).map((c) => String(c.addr ?? "")));
    for (const a of states.keys()) if (!visible.has(a)) states.delete(a);
    await pool(
      addrs.map((addr) => async () => {
        let entry;
        try {
          entry = { state: await api.state(addr), at: Date.now() };
        } catch (e) {
          if (e.code === "unsupported") noShadow = true;
          entry = {
            state: null,
            at: Date.now(),
            error: e.status === 404 || e.code === "unsupported" ? "—" : `(${e.message})`,
          };
        }
        if (!alive) return;
        states.set(addr, entry);
        const cell = tbody.querySelector(`tr[data-addr="${CSS.escape(addr)}"] td.state`);
        if (cell) cell.textContent = stateText(entry);
      }),
      STATE_CONCURRENCY,
    );
  }

  function turn(dir) {
    if (dir > 0 && page && page.next !== null && page.next !== undefined) memory.cursors.push(page.next);
    else if (dir < 0 && memory.cursors.length > 1) memory.cursors.pop();
    else return;
    page = null;
    refreshList();
  }

  const onSearch = debounce(() => {
    memory.prefix = search.value.trim();
    memory.cursors = [null];
    refreshList();
  }, 250);
  search.addEventListener("input", onSearch);
  role.addEventListener("change", () => {
    memory.role = role.value;
    memory.cursors = [null];
    refreshList();
  });

  refreshStats();
  refreshList();
  timers.push(setInterval(refreshStats, STATS_EVERY_MS), setInterval(refreshList, LIST_EVERY_MS));
  return () => {
    alive = false;
    timers.forEach(clearInterval);
  };
}
