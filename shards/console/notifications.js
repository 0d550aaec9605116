// notifications.js: the notification log. Every attempt of every notifier, as
// the relay keeps it in MySQL (/api/v1/notifications), newest first, 50 a page:
// when, through which notifier, who was paged, for which alarm and event, the
// outcome and the provider's answer. Filters by alarm key and status.

import { h, replace, clock, debounce, brief } from "./dom.js";

const PAGE = 50;
const POLL_MS = 5000;
const STATUSES = ["", "sent", "failed", "rate_limited", "cancelled"];

export function notificationsView(root, ctx) {
  const { api } = ctx;
  let alive = true;
  let after = null;
  /** "Older" was used: the periodic refresh would lose those rows. */
  let paged = false;
  let off = false;
  let seq = 0;
  const filter = { key: "", status: "" };
  const timers = [];

  const keyInput = h("input", {
    type: "search",
    id: "notify-key",
    placeholder: "Alarm key, e.g. pump-3/overheat",
    spellcheck: "false",
    autocomplete: "off",
    "aria-label": "Alarm key",
  });
  const statusSel = h(
    "select",
    { id: "notify-status", "aria-label": "Status" },
    STATUSES.map((s) => h("option", { value: s, text: s ? s.replace(/_/g, " ") : "every status" })),
  );
  const note = h("p", { class: "muted", id: "notify-note", text: "Loading…" });
  const body = h("tbody", { id: "notify-rows" });
  const table = h(
    "table",
    { class: "grid notify" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["When", "Notifier", "Paged", "Alarm", "Event", "Attempt", "Outcome", "Provider's answer"].map((t) =>
          h("th", { scope: "col", text: t }),
        ),
      ),
    ),
    body,
  );
  table.hidden = true;
  const more = h("button", {
    type: "button",
    id: "notify-more",
    text: "Older",
    onclick: () => {
      paged = true;
      load(false);
    },
  });
  more.hidden = true;

  root.append(
    h("h1", { class: "title", text: "Notifications" }),
    h(
      "section",
      { class: "card", "aria-labelledby": "h-notify" },
      h(
        "div",
        { class: "card-head" },
        h("h2", { id: "h-notify", text: "Who was paged" }),
        h("button", { type: "button", class: "ghost", text: "Refresh", onclick: () => load(true) }),
      ),
      h("div", { class: "toolbar" }, keyInput, statusSel),
      note,
      h("div", { class: "table-wrap" }, table),
      more,
    ),
  );

  function row(n) {
    const status = String(n.status ?? "");
    const answer = [n.http_status ? `HTTP ${n.http_status}` : "", n.response ? brief(n.response, 300) : "", n.error ?? ""]
      .filter(Boolean)
      .join(" · ");
    return h(
      "tr",
      { dataset: { id: n.id, key: n.key ?? "", status } },
      h("td", { "data-label": "When", text: clock(n.at_ms) }),
      h("td", { "data-label": "Notifier", text: n.channel ?? "" }),
      h("td", { "data-label": "Paged", class: "addr", text: n.target ?? "" }),
      h("td", { "data-label": "Alarm", class: "addr", text: n.key ?? "—" }),
      h("td", { "data-label": "Event", text: n.event ?? "" }),
      h("td", { "data-label": "Attempt", text: n.attempt ?? "" }),
      h(
        "td",
        { "data-label": "Outcome" },
        h("span", { class: `verdict ${status === "sent" ? "ok" : "bad"}`, text: status.replace(/_/g, " ") }),
      ),
      h("td", { "data-label": "Provider's answer", class: "answer" }, h("code", { text: answer || "—" })),
    );
  }

  async function load(fresh) {
    if (fresh) {
      after = null;
      paged = false;
    }
    const mine = ++seq;
    try {
      const res = await api.notifications({
        key: filter.key,
        status: filter.status,
        limit: PAGE,
        after: after ?? undefined,
      });
      if (!alive || mine !== seq) return;
      off = false;
      const rows = res.items.map(row);
      if (fresh) replace(body, rows);
      else body.append(...rows);
      after = res.next;
      const n = body.childElementCount;
      table.hidden = n === 0;
      note.hidden = n > 0;
      note.className = "muted";
      note.textContent = filter.key || filter.status ? "No notification matches." : "No notification sent yet.";
      more.hidden = res.next === null || res.next === undefined;
    } catch (e) {
      if (!alive || e.status === 401) return;
      table.hidden = true;
      more.hidden = true;
      note.hidden = false;
      off = e.status === 503 || e.code === "unsupported";
      note.className = off ? "notice" : "error";
      note.textContent = off
        ? "The notification log needs MySQL: set [mysql] enabled = true in the relay's configuration to keep every attempt."
        : `Notification log unavailable: ${e.message}`;
    }
  }

  const onFilter = debounce(() => {
    filter.key = keyInput.value.trim();
    filter.status = statusSel.value;
    load(true);
  }, 250);
  keyInput.addEventListener("input", onFilter);
  statusSel.addEventListener("change", onFilter);

  load(true);
  timers.push(setInterval(() => !paged && !off && !document.hidden && load(true), POLL_MS));
  return () => {
    alive = false;
    timers.forEach(clearInterval);
  };
}
