// alarms.js: the alarms view (active alarms, a page of 100 at a time, worst
// first, filtered by severity; every count from the totals the relay sends;
// acknowledge, shelve and clear on each alarm and a bulk acknowledge; the history
// of transitions when the relay keeps it in MySQL) and the alarm card the device
// view reuses.

import { h, replace, ago, clock, duration, num } from "./dom.js";

const SEVERITIES = ["critical", "major", "minor", "info"];
const POLL_MS = 2000;
const HISTORY_PAGE = 50;
/** Active alarms per page. */
const PAGE = 100;
/** The first page of history is read again this often (until "Older" is used). */
const HISTORY_EVERY_MS = 10000;

/** Higher is worse: critical 4 .. info 1, unknown 0. */
export function severityRank(s) {
  const i = SEVERITIES.indexOf(String(s));
  return i < 0 ? 0 : SEVERITIES.length - i;
}

/**
 * The device an alarm belongs to: its `addr` field when the relay gives one,
 * else the part of the key before the first `/` (rules name alarms
 * `<addr>/<what>`; `/` is not in the address alphabet).
 */
export function alarmAddr(a) {
  if (a && typeof a.addr === "string" && a.addr) return a.addr;
  const key = String(a?.key ?? "");
  const i = key.indexOf("/");
  return i > 0 ? key.slice(0, i) : null;
}

/** The alarms of one device. */
export function alarmsFor(list, addr) {
  return list.filter((a) => alarmAddr(a) === addr || a.key === addr);
}

/** What to say when the active alarms cannot be read. */
export function alarmsError(e) {
  return e.code === "unsupported"
    ? "Alarms need rules: set [plugins] enabled = true in the relay's configuration."
    : `Alarms unavailable: ${e.message}`;
}

/** Shelf lengths offered by the Shelve menu: [label, seconds]. */
export const SHELVE_FOR = [
  ["15 min", 900],
  ["1 h", 3600],
  ["4 h", 14400],
  ["24 h", 86400],
];

/**
 * One alarm with its Acknowledge, Shelve (or Unshelve) and Clear buttons;
 * `onChange` runs after any of them. `select` (optional) is `{checked, onToggle}`
 * and adds a check box for bulk actions.
 */
export function alarmCard(a, ctx, onChange, select = null) {
  const key = String(a.key);
  const sev = String(a.severity ?? "info");
  const addr = alarmAddr(a);
  const err = h("p", { class: "error small" });
  err.hidden = true;
  const acked = a.acked_by !== null && a.acked_by !== undefined;
  const shelvedUntil = typeof a.shelved_until_ms === "number" && a.shelved_until_ms > Date.now() ? a.shelved_until_ms : null;

  /** Runs `call` with `button` showing `busy`; errors are shown on the card. */
  const act = (button, busy, call, failed) => async () => {
    const text = button.textContent;
    button.disabled = true;
    button.textContent = busy;
    try {
      await call();
      onChange();
    } catch (e) {
      button.disabled = false;
      button.textContent = text;
      err.textContent = e.status === 404 ? "This alarm is no longer active." : `${failed}: ${e.message}`;
      err.hidden = false;
    }
  };
  const ackBtn = acked
    ? null
    : h("button", { type: "button", class: "ack", text: "Acknowledge", "aria-label": `Acknowledge ${key}` });
  if (ackBtn) ackBtn.onclick = act(ackBtn, "Acknowledging…", () => ctx.api.ack(key, ctx.name), "Not acknowledged");
  const clearBtn = h("button", { type: "button", class: "ghost clear", text: "Clear", "aria-label": `Clear ${key}` });
  clearBtn.onclick = act(clearBtn, "Clearing…", () => ctx.api.clearAlarm(key, ctx.name), "Not cleared");
  let shelveCtl;
  if (shelvedUntil) {
    shelveCtl = h("button", { type: "button", class: "ghost unshelve", text: "Unshelve", "aria-label": `Unshelve ${key}` });
    shelveCtl.onclick = act(shelveCtl, "Unshelving…", () => ctx.api.unshelve(key, ctx.name), "Not unshelved");
  } else {
    shelveCtl = h(
      "select",
      { class: "shelve", "aria-label": `Shelve ${key}` },
      h("option", { value: "", text: "Shelve…" }),
      SHELVE_FOR.map(([label, s]) => h("option", { value: String(s), text: `for ${label}` })),
    );
    shelveCtl.addEventListener("change", async () => {
      const s = Number(shelveCtl.value);
      if (!s) return;
      shelveCtl.disabled = true;
      try {
        await ctx.api.shelve(key, ctx.name, s);
        onChange();
      } catch (e) {
        shelveCtl.disabled = false;
        shelveCtl.value = "";
        err.textContent = e.status === 404 ? "This alarm is no longer active." : `Not shelved: ${e.message}`;
        err.hidden = false;
      }
    });
  }
  const age =
    typeof a.raised_at_ms === "number"
      ? h("span", { class: "ago", dataset: { ts: a.raised_at_ms }, text: ago(a.raised_at_ms) })
      : "—";
  const meta = [
    h("span", {}, "raised ", age),
    a.count > 1 ? h("span", { text: `×${a.count}` }) : null,
    acked
      ? h(
          "span",
          { class: "acked" },
          `acknowledged by ${a.acked_by} `,
          typeof a.acked_at_ms === "number"
            ? h("span", { class: "ago", dataset: { ts: a.acked_at_ms }, text: ago(a.acked_at_ms) })
            : "",
        )
      : h("span", { class: "unacked", text: "not acknowledged" }),
    shelvedUntil
      ? h("span", {
          class: "shelved",
          text: `shelved${a.shelved_by ? ` by ${a.shelved_by}` : ""} until ${clock(shelvedUntil)}`,
        })
      : null,
    typeof a.next_step_ms === "number" && !acked && !shelvedUntil
      ? h("span", {
          text: `next escalation ${a.next_step_ms > Date.now() ? "in " + duration(a.next_step_ms - Date.now()) : "due"}`,
        })
      : null,
  ];
  const box = select
    ? h("input", {
        type: "checkbox",
        class: "pick",
        checked: select.checked && !acked,
        disabled: acked,
        "aria-label": `Select ${key}`,
        onchange: (ev) => select.onToggle(key, ev.target.checked),
      })
    : null;
  return h(
    "li",
    {
      class: `alarm alarm-${sev}${acked ? " is-acked" : ""}${shelvedUntil ? " is-shelved" : ""}`,
      dataset: { key },
    },
    box,
    h("span", { class: `sev sev-${sev}`, text: sev }),
    h(
      "div",
      { class: "alarm-body" },
      h(
        "div",
        { class: "alarm-key" },
        addr ? h("a", { href: `#/device/${encodeURIComponent(addr)}`, text: key }) : key,
      ),
      h("div", { class: "alarm-text", text: a.text ?? "" }),
      h("div", { class: "alarm-meta muted small" }, meta),
      err,
    ),
    h("div", { class: "alarm-actions" }, ackBtn, shelveCtl, clearBtn),
  );
}

export function alarmsView(root, ctx) {
  const { api } = ctx;
  let alive = true;
  let filter = "";
  /** Cursors of the pages before this one (null: the first page). */
  let cursors = [null];
  /** Last page: {items, next, total, totals}. */
  let page = null;
  /** Keys checked for a bulk acknowledge. */
  const selected = new Set();
  /** Alarms of the severity filter not acknowledged yet, as the relay counts them. */
  let unackedOfFilter = 0;
  let historyAfter = null;
  /** "Older" was used: the periodic history refresh would lose those rows. */
  let paged = false;
  /** The relay cannot serve alarms (rules off) or history (no MySQL): stop polling. */
  let alarmsOff = false;
  let historyOff = false;
  let seq = 0;
  const timers = [];

  const summary = h("p", { class: "muted", id: "alarm-summary", role: "status", text: "Loading…" });
  const chips = h(
    "div",
    { class: "chips", id: "severity-filter", role: "group", "aria-label": "Severity" },
    ["", ...SEVERITIES].map((s) =>
      h(
        "button",
        {
          type: "button",
          class: `chip${s === filter ? " on" : ""}`,
          dataset: { sev: s },
          onclick: () => {
            filter = s;
            cursors = [null];
            selected.clear();
            for (const c of chips.children) c.classList.toggle("on", c.dataset.sev === s);
            refresh();
          },
        },
        s || "all",
        " ",
        h("span", { class: "chip-count", dataset: { count: s || "active" } }),
      ),
    ),
  );
  const pickAll = h("input", {
    type: "checkbox",
    id: "pick-page",
    "aria-label": "Select every alarm on this page",
    onchange: (ev) => {
      for (const a of page ? page.items : []) {
        if (ev.target.checked && !a.acked_by) selected.add(String(a.key));
        else selected.delete(String(a.key));
      }
      render();
    },
  });
  const ackSelected = h("button", { type: "button", id: "ack-selected", class: "primary", onclick: () => bulk(true) });
  const ackAll = h("button", { type: "button", id: "ack-all", class: "ghost", onclick: () => bulk(false) });
  const bulkNote = h("span", { class: "small muted", id: "bulk-note", role: "status" });
  const bulkBar = h(
    "div",
    { class: "bulk", id: "bulk-bar" },
    h("label", { class: "small" }, pickAll, " this page"),
    ackSelected,
    ackAll,
    bulkNote,
  );
  const list = h("ul", { class: "alarm-list", id: "alarm-list" });
  const prevBtn = h("button", { type: "button", id: "alarms-prev", text: "‹ Previous", onclick: () => turn(-1) });
  const nextBtn = h("button", { type: "button", id: "alarms-next", text: "Next ›", onclick: () => turn(1) });
  const pageLabel = h("span", { class: "muted", id: "alarms-page" });
  const pager = h("nav", { class: "pager", "aria-label": "Alarm pages" }, prevBtn, pageLabel, nextBtn);
  const historyBody = h("tbody", { id: "history-rows" });
  const historyNote = h("p", { class: "muted", id: "history-note", text: "Loading…" });
  const historyTable = h(
    "table",
    { class: "grid history" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["When", "Alarm", "Transition", "Severity", "Text", "By"].map((t) => h("th", { scope: "col", text: t })),
      ),
    ),
    historyBody,
  );
  historyTable.hidden = true;
  const moreBtn = h("button", {
    type: "button",
    id: "history-more",
    text: "Older",
    onclick: () => {
      paged = true;
      loadHistory(false);
    },
  });
  moreBtn.hidden = true;

  root.append(
    h("h1", { class: "title", text: "Alarms" }),
    h(
      "section",
      { class: "card", "aria-labelledby": "h-active" },
      h("div", { class: "card-head" }, h("h2", { id: "h-active", text: "Active" }), chips),
      summary,
      bulkBar,
      list,
      pager,
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "h-history" },
      h(
        "div",
        { class: "card-head" },
        h("h2", { id: "h-history", text: "History" }),
        h("button", { type: "button", class: "ghost", text: "Refresh", onclick: () => loadHistory(true) }),
      ),
      historyNote,
      h("div", { class: "table-wrap" }, historyTable),
      moreBtn,
    ),
  );

  function render() {
    const items = page ? page.items : [];
    const t = page?.totals;
    if (t) {
      const bySev = SEVERITIES.map((s) => [s, t[s] ?? 0]).filter(([, n]) => n);
      summary.textContent = t.active
        ? `${num(t.active)} active (${bySev.map(([s, n]) => `${num(n)} ${s}`).join(", ")}); ${num(t.unacked)} not acknowledged` +
          `${t.shelved ? `; ${num(t.shelved)} shelved` : ""}.` +
          (filter ? ` ${num(page.total)} ${filter}.` : "")
        : "No active alarms.";
      for (const el of chips.querySelectorAll(".chip-count")) el.textContent = num(t[el.dataset.count] ?? 0);
    }
    // Keys no longer on the page cannot stay selected.
    const onPage = new Set(items.map((a) => String(a.key)));
    for (const k of [...selected]) if (!onPage.has(k)) selected.delete(k);
    const shown = items
      .slice()
      .sort(
        (a, b) => severityRank(b.severity) - severityRank(a.severity) || (a.raised_at_ms ?? 0) - (b.raised_at_ms ?? 0),
      );
    replace(
      list,
      shown.map((a) =>
        alarmCard(a, ctx, changed, {
          checked: selected.has(String(a.key)),
          onToggle: (k, on) => {
            if (on) selected.add(k);
            else selected.delete(k);
            renderBulk();
          },
        }),
      ),
    );
    renderBulk();
    const pages = page ? Math.max(1, Math.ceil(page.total / PAGE)) : 1;
    pageLabel.textContent = `Page ${num(cursors.length)} of ${num(pages)}`;
    prevBtn.disabled = cursors.length <= 1;
    nextBtn.disabled = !(page && page.next !== null && page.next !== undefined);
    pager.hidden = !page || page.total <= PAGE;
  }

  function renderBulk() {
    // Counted by the relay over every page: all unacknowledged, or those of the filter.
    const unackedMatching = page ? (filter ? unackedOfFilter : page.totals?.unacked ?? 0) : 0;
    ackSelected.textContent = `Acknowledge selected (${num(selected.size)})`;
    ackSelected.disabled = selected.size === 0;
    ackAll.textContent = `Acknowledge all ${num(unackedMatching)}${filter ? ` ${filter}` : ""} not acknowledged`;
    ackAll.disabled = !page || unackedMatching === 0;
    bulkBar.hidden = !page || page.total === 0;
    pickAll.checked = !!page && page.items.some((a) => !a.acked_by) && page.items.every((a) => a.acked_by || selected.has(String(a.key)));
  }

  async function bulk(onlySelected) {
    const button = onlySelected ? ackSelected : ackAll;
    button.disabled = true;
    try {
      const r = onlySelected
        ? await api.ackMany([...selected], ctx.name)
        : await api.ackMany(null, ctx.name, filter ? { severity: filter } : {});
      selected.clear();
      bulkNote.textContent = `${num(r.acked)} acknowledged${r.already ? `, ${num(r.already)} already were` : ""}${
        r.not_found?.length ? `, ${num(r.not_found.length)} no longer active` : ""
      }.`;
      changed();
    } catch (e) {
      bulkNote.textContent = `Not acknowledged: ${e.message}`;
      button.disabled = false;
    }
  }

  function turn(dir) {
    if (dir > 0 && page && page.next !== null && page.next !== undefined) cursors.push(page.next);
    else if (dir < 0 && cursors.length > 1) cursors.pop();
    else return;
    selected.clear();
    refresh();
  }

  function changed() {
    refresh();
    if (!paged) loadHistory(true);
  }

  async function refresh() {
    if (document.hidden || alarmsOff) return;
    const mine = ++seq;
    try {
      const [res, open] = await Promise.all([
        api.alarmsPage({ severity: filter, limit: PAGE, after: cursors[cursors.length - 1] }),
        filter ? api.alarmsPage({ severity: filter, acked: false, limit: 1 }) : null,
      ]);
      if (!alive || mine !== seq) return;
      unackedOfFilter = open ? open.total : 0;
      // The page emptied (acknowledged elsewhere, cleared): go back to the first.
      if (!res.items.length && cursors.length > 1) {
        cursors = [null];
        return refresh();
      }
      page = res;
      summary.className = "muted";
      render();
    } catch (e) {
      if (!alive || e.status === 401) return;
      alarmsOff = e.code === "unsupported";
      summary.textContent = alarmsError(e);
      summary.className = alarmsOff ? "notice" : "error";
      bulkBar.hidden = true;
    }
  }

  async function loadHistory(fresh) {
    if (fresh) {
      historyAfter = null;
      paged = false;
    }
    try {
      const res = await api.history({ limit: HISTORY_PAGE, after: historyAfter ?? undefined });
      if (!alive) return;
      historyOff = false;
      const rows = res.items.map((ev) => {
        const at = ev.at_ms ?? ev.time_ms ?? ev.ts_ms;
        const key = String(ev.key ?? ev.alarm_key ?? "");
        const sev = String(ev.severity ?? "");
        return h(
          "tr",
          { dataset: { key } },
          h("td", { "data-label": "When", text: clock(at) }),
          h("td", { "data-label": "Alarm", class: "addr", text: key }),
          h("td", { "data-label": "Transition", text: ev.transition ?? ev.event ?? "" }),
          h("td", { "data-label": "Severity" }, h("span", { class: `sev sev-${sev}`, text: sev })),
          h("td", { "data-label": "Text", text: ev.text ?? "" }),
          h("td", { "data-label": "By", text: ev.by ?? ev.acked_by ?? "" }),
        );
      });
      if (fresh) replace(historyBody, rows);
      else historyBody.append(...rows);
      historyAfter = res.next;
      historyTable.hidden = historyBody.childElementCount === 0;
      historyNote.textContent = historyBody.childElementCount ? "" : "No alarm transitions recorded yet.";
      historyNote.hidden = historyBody.childElementCount > 0;
      moreBtn.hidden = res.next === null || res.next === undefined;
    } catch (e) {
      if (!alive || e.status === 401) return;
      historyTable.hidden = true;
      moreBtn.hidden = true;
      historyNote.hidden = false;
      const needsMysql = e.status === 404 || e.status === 503 || e.code === "unsupported";
      historyOff = needsMysql;
      historyNote.className = needsMysql ? "notice" : "error";
      historyNote.textContent = needsMysql
        ? "History needs MySQL: set [mysql] enabled = true in the relay's configuration to keep every raise, acknowledge and clear."
        : `History unavailable: ${e.message}`;
    }
  }

  refresh();
  loadHistory(true);
  timers.push(
    setInterval(refresh, POLL_MS),
    setInterval(() => !paged && !historyOff && !document.hidden && loadHistory(true), HISTORY_EVERY_MS),
  );
  return () => {
    alive = false;
    timers.forEach(clearInterval);
  };
}
