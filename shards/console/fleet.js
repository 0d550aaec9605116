// fleet.js: the fleet view. Every device the relay has seen, online and offline,
// from the device registry (/api/v1/devices), newest last seen first, one page
// of 100 at a time, filtered by status, role and address prefix. Every count on
// the page comes from the totals the relay sends (devices known, online,
// offline, devices matching the filter), never from the length of one page. Live
// traffic counts come from /api/v1/stats every 2 s; the device shadow is fetched
// for the rows on screen only, so the page stays fast with 100,000 devices.
// Without rules (no registry) the view lists online clients from /api/v1/clients.

import { h, replace, num, duration, fields, debounce, pool, ago } from "./dom.js";
import { summarize, rate } from "./stats.js";

const PAGE = 100;
const STATS_EVERY_MS = 2000;
const LIST_EVERY_MS = 3000;
/** The shadow of a visible row is fetched again after this long. */
const STATE_MAX_AGE_MS = 6000;
/** Shadow requests in flight at once. */
const STATE_CONCURRENCY = 6;
const STATUSES = [
  ["", "all"],
  ["online", "online"],
  ["offline", "offline"],
];

/** The view's position survives a visit to a device and back. */
const memory = { prefix: "", group: "", role: "controller", node: "", status: "", offset: 0, cursors: [null] };

export function fleetView(root, ctx) {
  const { api } = ctx;
  let alive = true;
  let prevStats = null;
  let prevAt = 0;
  let page = null; // last list response
  let listSeq = 0;
  /** The relay keeps no registry (rules off): list online clients instead. */
  let noRegistry = false;
  /** Registry totals of the last answer: {devices, online, offline}. */
  let totals = null;
  /** addr -> {state, at, error} */
  const states = new Map();
  /** The relay keeps no device shadow (rules off): stop asking for it. */
  let noShadow = false;
  const timers = [];

  const counts = h("section", { class: "counts", id: "counts", "aria-label": "Live counts" });
  const fleetCounts = h("section", { class: "counts", id: "fleet-counts", "aria-label": "Devices" });
  const search = h("input", {
    type: "search",
    id: "search",
    placeholder: "Address prefix, e.g. ctl-8266-",
    value: memory.prefix,
    spellcheck: "false",
    autocomplete: "off",
    "aria-label": "Search by address prefix",
  });
  const groupInput = h("input", {
    type: "search",
    id: "group",
    placeholder: "Group",
    value: memory.group,
    spellcheck: "false",
    autocomplete: "off",
    "aria-label": "Members of a group",
    class: "group-filter",
  });
  const role = h(
    "select",
    { id: "role", "aria-label": "Role" },
    ["controller", "browser", "tool", "service", ""].map((r) =>
      h("option", { value: r, selected: r === memory.role, text: r ? `${r}s` : "all roles" }),
    ),
  );
  /** Which node holds the clients listed (a cluster's nodes; hidden outside one). */
  const nodeSel = h(
    "select",
    { id: "node", "aria-label": "Node", hidden: true },
    h("option", { value: "", text: "all nodes" }),
  );
  const statusTabs = h(
    "div",
    { class: "chips", id: "status-filter", role: "group", "aria-label": "Status" },
    STATUSES.map(([value, label]) =>
      h(
        "button",
        {
          type: "button",
          class: `chip${value === memory.status ? " on" : ""}`,
          dataset: { status: value },
          "aria-pressed": String(value === memory.status),
          onclick: () => {
            memory.status = value;
            memory.offset = 0;
            page = null;
            markTabs();
            refreshList();
          },
        },
        label,
        " ",
        h("span", { class: "chip-count", dataset: { count: value || "all" } }),
      ),
    ),
  );
  const status = h("p", { class: "muted small", id: "fleet-status", role: "status" });
  const tbody = h("tbody", { id: "fleet-rows" });
  const head = h("tr");
  const table = h("table", { class: "grid fleet" }, h("thead", {}, head), tbody);
  const prevBtn = h("button", { type: "button", id: "prev", text: "‹ Previous", onclick: () => turn(-1) });
  const nextBtn = h("button", { type: "button", id: "next", text: "Next ›", onclick: () => turn(1) });
  const pageLabel = h("span", { class: "muted", id: "page-label" });

  root.append(
    h("h1", { class: "title", text: "Fleet" }),
    fleetCounts,
    counts,
    h("div", { class: "toolbar" }, search, groupInput, role, nodeSel, statusTabs),
    status,
    h("div", { class: "table-wrap" }, table),
    h("nav", { class: "pager", "aria-label": "Pages" }, prevBtn, pageLabel, nextBtn),
  );

  function markTabs() {
    for (const b of statusTabs.children) {
      const on = b.dataset.status === memory.status;
      b.classList.toggle("on", on);
      b.setAttribute("aria-pressed", String(on));
    }
  }

  const card = (label, value, id) =>
    h(
      "div",
      { class: "count", id },
      h("span", { class: "count-value", text: value }),
      h("span", { class: "count-label", text: label }),
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
      replace(
        counts,
        card("controllers connected", num(s.byRole.controller), "count-controllers"),
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

  function showTotals() {
    if (!totals) {
      replace(fleetCounts);
      fleetCounts.hidden = true;
      return;
    }
    fleetCounts.hidden = false;
    replace(
      fleetCounts,
      card(`${memory.role || "device"}s known`, num(totals.devices), "count-devices"),
      card(`${memory.role || "device"}s online`, num(totals.online), "count-online"),
      card(`${memory.role || "device"}s offline`, num(totals.offline), "count-offline"),
    );
    for (const el of statusTabs.querySelectorAll(".chip-count")) {
      const n = el.dataset.count === "all" ? totals.devices : totals[el.dataset.count];
      el.textContent = num(n);
    }
  }

  // ---- list
  async function refreshList() {
    if (document.hidden) return;
    const seq = ++listSeq;
    try {
      let res;
      if (!noRegistry) {
        try {
          res = await api.devices({
            status: memory.status,
            prefix: memory.prefix,
            group: memory.group,
            role: memory.role,
            limit: PAGE,
            offset: memory.offset,
          });
        } catch (e) {
          if (e.code !== "unsupported") throw e;
          noRegistry = true;
          statusTabs.hidden = true;
          groupInput.hidden = true;
        }
      }
      if (noRegistry) {
        const cursor = memory.cursors[memory.cursors.length - 1];
        res = await api.clients({
          role: memory.role,
          prefix: memory.prefix,
          node: memory.node,
          limit: PAGE,
          after: cursor,
        });
        refreshNodes();
      }
      if (!alive || seq !== listSeq) return;
      page = res;
      totals = noRegistry ? null : res.totals;
      showTotals();
      render();
      refreshStates();
    } catch (e) {
      if (!alive || seq !== listSeq || e.status === 401) return;
      status.textContent = e.status === 400 ? `Search refused: ${e.message}` : `Cannot list devices: ${e.message}`;
      status.classList.add("error");
    }
  }

  function describe() {
    const what = memory.role ? `${memory.role}s` : "devices";
    let filter = memory.prefix ? ` whose address starts with “${memory.prefix}”` : "";
    if (memory.group && !noRegistry) filter += ` in group ${memory.group}`;
    if (memory.node && noRegistry) filter += ` on node ${memory.node}`;
    return { what, filter };
  }

  function render() {
    const items = page ? page.items : [];
    status.classList.remove("error");
    const { what, filter } = describe();
    if (noRegistry) {
      replace(
        head,
        ["Address", "Node", "Role", "Connected", "Shard", "Last state"].map((t) => h("th", { scope: "col", text: t })),
      );
      const one = items.length === 1 && !page.next;
      const missing = (page?.unreachable ?? []).map((u) => u.node).filter(Boolean);
      status.textContent =
        (items.length
          ? `${items.length} online ${one ? what.replace(/s$/, "") : what}${filter}${page.next ? " on this page; more on the next" : ""}. Offline devices need rules ([plugins] enabled).`
          : memory.cursors.length > 1
            ? "No more clients."
            : `No online ${what}${filter}.`) + (missing.length ? ` Not listed: node ${missing.join(", ")} did not answer.` : "");
      replace(tbody, items.map(liveRow));
      prevBtn.disabled = memory.cursors.length <= 1;
      nextBtn.disabled = !(page && page.next !== null && page.next !== undefined && page.next !== "");
      pageLabel.textContent = `Page ${memory.cursors.length}`;
      return;
    }
    replace(
      head,
      ["Address", "Status", "Last seen", "First seen", "Last disconnect", "Role", "Last state"].map((t) =>
        h("th", { scope: "col", text: t }),
      ),
    );
    const total = page.total;
    const state = memory.status ? `${memory.status} ` : "";
    if (items.length) {
      const from = page.offset + 1;
      const to = page.offset + items.length;
      status.textContent = `${num(from)}–${num(to)} of ${num(total)} ${state}${total === 1 ? what.replace(/s$/, "") : what}${filter}, last seen first.`;
    } else {
      status.textContent =
        page.offset > 0 ? "No more devices." : `No ${state}${what}${filter}${memory.status === "" ? " seen yet" : ""}.`;
    }
    replace(tbody, items.map(deviceRow));
    const pages = Math.max(1, Math.ceil(total / PAGE));
    prevBtn.disabled = page.offset <= 0;
    nextBtn.disabled = page.next === null || page.next === undefined;
    pageLabel.textContent = `Page ${num(Math.floor(page.offset / PAGE) + 1)} of ${num(pages)}`;
  }

  function link(addr) {
    const href = `#/device/${encodeURIComponent(addr)}`;
    return { href, cell: h("td", { "data-label": "Address", class: "addr" }, h("a", { href, text: addr })) };
  }

  function deviceRow(d) {
    const addr = String(d.addr ?? "");
    const { href, cell } = link(addr);
    const online = d.online === true;
    return h(
      "tr",
      {
        dataset: { addr, online: String(online) },
        class: `row-link${online ? "" : " is-offline"}`,
        onclick: (ev) => ev.target.tagName !== "A" && ctx.go(href),
      },
      cell,
      h(
        "td",
        { "data-label": "Status" },
        h("span", { class: `pill ${online ? "ok" : "bad"}`, text: online ? "online" : "offline" }),
      ),
      h("td", { "data-label": "Last seen", class: "last-seen" }, when(d.last_seen_ms)),
      h("td", { "data-label": "First seen" }, when(d.first_seen_ms)),
      h("td", {
        "data-label": "Last disconnect",
        class: "reason",
        text: d.last_disconnect_reason ? d.last_disconnect_reason.replace(/_/g, " ") : "—",
      }),
      h("td", { "data-label": "Role", text: d.role || "—" }),
      h("td", { "data-label": "Last state", class: "state", text: stateText(states.get(addr)) }),
    );
  }

  function liveRow(c) {
    const addr = String(c.addr ?? "");
    const { href, cell } = link(addr);
    return h(
      "tr",
      { dataset: { addr }, class: "row-link", onclick: (ev) => ev.target.tagName !== "A" && ctx.go(href) },
      cell,
      h("td", { "data-label": "Node", class: "node", text: c.node ?? "—" }),
      h("td", { "data-label": "Role", text: c.role ?? "—" }),
      h("td", { "data-label": "Connected" }, when(c.connected_at_ms)),
      h("td", { "data-label": "Shard", text: c.shard ?? "—" }),
      h("td", { "data-label": "Last state", class: "state", text: stateText(states.get(addr)) }),
    );
  }

  /** The node filter lists the cluster's live nodes (shown in a cluster only). */
  let nodesAt = 0;
  async function refreshNodes() {
    if (Date.now() - nodesAt < LIST_EVERY_MS * 3) return;
    nodesAt = Date.now();
    try {
      const v = await api.nodes();
      if (!alive) return;
      const names = (Array.isArray(v?.items) ? v.items : []).map((n) => String(n.node ?? "")).filter(Boolean);
      if (memory.node && !names.includes(memory.node)) names.push(memory.node);
      nodeSel.hidden = !v?.clustered;
      replace(
        nodeSel,
        [h("option", { value: "", text: "all nodes", selected: memory.node === "" })].concat(
          names.map((n) => h("option", { value: n, text: `node ${n}`, selected: n === memory.node })),
        ),
      );
    } catch {
      nodesAt = 0;
    }
  }

  function when(ms) {
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
    if (noRegistry) {
      if (dir > 0 && page && page.next !== null && page.next !== undefined) memory.cursors.push(page.next);
      else if (dir < 0 && memory.cursors.length > 1) memory.cursors.pop();
      else return;
    } else {
      if (dir > 0 && page && page.next !== null && page.next !== undefined) memory.offset = page.next;
      else if (dir < 0 && memory.offset > 0) memory.offset = Math.max(0, memory.offset - PAGE);
      else return;
    }
    page = null;
    refreshList();
  }

  function restart() {
    memory.cursors = [null];
    memory.offset = 0;
    refreshList();
  }

  const onSearch = debounce(() => {
    memory.prefix = search.value.trim();
    restart();
  }, 250);
  search.addEventListener("input", onSearch);
  groupInput.addEventListener(
    "input",
    debounce(() => {
      memory.group = groupInput.value.trim();
      restart();
    }, 250),
  );
  role.addEventListener("change", () => {
    memory.role = role.value;
    restart();
  });
  nodeSel.addEventListener("change", () => {
    memory.node = nodeSel.value;
    restart();
  });

  showTotals();
  refreshStats();
  refreshList();
  timers.push(setInterval(refreshStats, STATS_EVERY_MS), setInterval(refreshList, LIST_EVERY_MS));
  return () => {
    alive = false;
    timers.forEach(clearInterval);
  };
}
