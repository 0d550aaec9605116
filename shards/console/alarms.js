// alarms.js: the alarms view (active alarms by severity and age, with an
// acknowledge button; the history of transitions when the relay keeps it in
// MySQL) and the alarm card the device view reuses.

import { h, replace, ago, clock, duration } from "./dom.js";

const SEVERITIES = ["critical", "major", "minor", "info"];
const POLL_MS = 2000;
const HISTORY_PAGE = 50;
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

/** One alarm with its acknowledge button; `onChange` runs after an acknowledge. */
export function alarmCard(a, ctx, onChange) {
  const key = String(a.key);
  const sev = String(a.severity ?? "info");
  const addr = alarmAddr(a);
  const err = h("p", { class: "error small" });
  err.hidden = true;
  const acked = a.acked_by !== null && a.acked_by !== undefined;
  const button = acked
    ? null
    : h("button", {
        type: "button",
        class: "ack",
        text: "Acknowledge",
        "aria-label": `Acknowledge ${key}`,
        onclick: async () => {
          button.disabled = true;
          button.textContent = "Acknowledging…";
          try {
            await ctx.api.ack(key, ctx.name);
            onChange();
          } catch (e) {
            button.disabled = false;
            button.textContent = "Acknowledge";
            err.textContent = e.status === 404 ? "This alarm is no longer active." : `Not acknowledged: ${e.message}`;
            err.hidden = false;
          }
        },
      });
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
    typeof a.next_step_ms === "number" && !acked
      ? h("span", {
          text: `next escalation ${a.next_step_ms > Date.now() ? "in " + duration(a.next_step_ms - Date.now()) : "due"}`,
        })
      : null,
  ];
  return h(
    "li",
    { class: `alarm alarm-${sev}${acked ? " is-acked" : ""}`, dataset: { key } },
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
    button,
  );
}

export function alarmsView(root, ctx) {
  const { api } = ctx;
  let alive = true;
  let filter = "";
  let last = [];
  let historyAfter = null;
  /** "Older" was used: the periodic history refresh would lose those rows. */
  let paged = false;
  /** The relay cannot serve alarms (rules off) or history (no MySQL): stop polling. */
  let alarmsOff = false;
  let historyOff = false;
  const timers = [];

  const summary = h("p", { class: "muted", id: "alarm-summary", role: "status", text: "Loading…" });
  const chips = h(
    "div",
    { class: "chips", role: "group", "aria-label": "Severity" },
    ["", ...SEVERITIES].map((s) =>
      h("button", {
        type: "button",
        class: `chip${s === filter ? " on" : ""}`,
        dataset: { sev: s },
        text: s || "all",
        onclick: () => {
          filter = s;
          for (const c of chips.children) c.classList.toggle("on", c.dataset.sev === s);
          render();
        },
      }),
    ),
  );
  const list = h("ul", { class: "alarm-list", id: "alarm-list" });
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
      list,
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
    const shown = last
      .filter((a) => !filter || a.severity === filter)
      .sort(
        (a, b) => severityRank(b.severity) - severityRank(a.severity) || (a.raised_at_ms ?? 0) - (b.raised_at_ms ?? 0),
      );
    const open = last.filter((a) => !a.acked_by).length;
    const bySev = SEVERITIES.map((s) => [s, last.filter((a) => a.severity === s).length]).filter(([, n]) => n);
    summary.textContent = last.length
      ? `${last.length} active (${bySev.map(([s, n]) => `${n} ${s}`).join(", ")}); ${open} not acknowledged.`
      : "No active alarms.";
    replace(
      list,
      shown.map((a) => alarmCard(a, ctx, changed)),
    );
  }

  function changed() {
    refresh();
    if (!paged) loadHistory(true);
  }

  async function refresh() {
    if (document.hidden || alarmsOff) return;
    try {
      const items = await api.alarms();
      if (!alive) return;
      last = items;
      summary.className = "muted";
      render();
    } catch (e) {
      if (!alive || e.status === 401) return;
      alarmsOff = e.code === "unsupported";
      summary.textContent = alarmsError(e);
      summary.className = alarmsOff ? "notice" : "error";
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
