// device.js: the device view. The page's own client joins `watch:<addr>` (the
// relay copies every DATA/PUBLISH the device sends to that group) and shows
// them live with the device's replies to the console; a command box sends JSON
// DATA with an ACK request and shows the ACK or the ERROR; the device shadow,
// the session and the device's alarms are polled from the HTTP API; the registry
// tells whether it is online, when it was first and last seen and why it last
// went offline; its telemetry over time (from MySQL) is drawn as one chart per
// field.

import { h, replace, ago, clock, brief, num } from "./dom.js";
import { severityRank, alarmCard, alarmsFor, alarmsError } from "./alarms.js";
import { lineChart } from "./chart.js";

const STREAM_MAX = 200;
const COMMANDS_MAX = 50;
const POLL_MS = 2000;
/** Telemetry is read again this often; at most this many readings are drawn. */
const TELEMETRY_MS = 10000;
const TELEMETRY_POINTS = 500;
/** A frame seen both directly and through the watch group within this window is shown once. */
const DEDUPE_MS = 3000;

export function deviceView(root, ctx, addr) {
  const { api, link } = ctx;
  const group = `watch:${addr}`;
  let alive = true;
  let paused = false;
  let streamCount = 0;
  const timers = [];
  /** The relay has no rules running: no shadow and no alarms to poll. */
  let rulesOff = false;
  /** Recent stream entries by "src|payload" for de-duplication. */
  const recent = new Map();

  const badge = h("span", { class: "pill", id: "device-online", text: "…" });
  const info = h("dl", { class: "kv", id: "device-info" });
  const shadow = h("div", { id: "shadow" }, h("p", { class: "muted", text: "Loading…" }));
  const shadowAt = h("span", { class: "muted small" });
  const alarmsBox = h("div", { id: "device-alarms" }, h("p", { class: "muted", text: "Loading…" }));
  const telemetry = h("div", { id: "telemetry" }, h("p", { class: "muted", text: "Loading…" }));
  const telemetryAt = h("span", { class: "muted small" });
  /** The relay keeps no telemetry history (no MySQL or no telemetry table): stop asking. */
  let telemetryOff = false;
  /** The relay keeps no registry (rules off): read the live session instead. */
  let noRegistry = false;
  const watchNote = h("p", { class: "muted small", id: "watch-note", text: "Joining the live stream…" });
  const stream = h("ol", { class: "stream", id: "stream", "aria-live": "polite" });
  const streamCounter = h("span", { class: "muted small", text: "0 messages" });
  const cmd = h("textarea", {
    id: "command",
    rows: "4",
    spellcheck: "false",
    "aria-label": "Command (JSON)",
    placeholder: '{"cmd": "status"}',
  });
  cmd.value = '{"cmd": "status"}';
  const cmdError = h("p", { class: "error", id: "command-error", role: "alert" });
  cmdError.hidden = true;
  const sendBtn = h("button", { type: "submit", class: "primary", id: "send", text: "Send" });
  const results = h("ol", { class: "results", id: "results" });
  const pauseBtn = h("button", {
    type: "button",
    class: "ghost",
    text: "Pause",
    onclick: () => {
      paused = !paused;
      pauseBtn.textContent = paused ? "Resume" : "Pause";
    },
  });
  const clearBtn = h("button", {
    type: "button",
    class: "ghost",
    text: "Clear",
    onclick: () => {
      stream.replaceChildren();
      streamCount = 0;
      streamCounter.textContent = "0 messages";
    },
  });

  root.append(
    h(
      "div",
      { class: "device-head" },
      h("a", { href: "#/fleet", class: "back", text: "← Fleet" }),
      h("h1", { class: "title addr", id: "device-addr", text: addr }),
      badge,
    ),
    h(
      "div",
      { class: "device-grid" },
      h(
        "section",
        { class: "card span2", "aria-labelledby": "h-live" },
        h(
          "div",
          { class: "card-head" },
          h("h2", { id: "h-live", text: "Live messages" }),
          streamCounter,
          pauseBtn,
          clearBtn,
        ),
        watchNote,
        stream,
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "h-cmd" },
        h("h2", { id: "h-cmd", text: "Send a command" }),
        h(
          "form",
          { class: "command", onsubmit: submit },
          h("label", {
            for: "command",
            class: "small muted",
            text: `JSON payload, delivered to ${addr} as DATA with an ACK request`,
          }),
          cmd,
          cmdError,
          sendBtn,
        ),
        results,
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "h-shadow" },
        h("div", { class: "card-head" }, h("h2", { id: "h-shadow", text: "Device shadow" }), shadowAt),
        shadow,
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "h-session" },
        h("h2", { id: "h-session", text: "Session" }),
        info,
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "h-alarms" },
        h("h2", { id: "h-alarms", text: "Alarms" }),
        alarmsBox,
      ),
      h(
        "section",
        { class: "card span2", "aria-labelledby": "h-telemetry" },
        h("div", { class: "card-head" }, h("h2", { id: "h-telemetry", text: "Telemetry" }), telemetryAt),
        telemetry,
      ),
    ),
  );

  // ---- live stream
  function addEntry(kind, frame, note) {
    if (paused && kind !== "out") return;
    const time = Date.now();
    const payload =
      frame.payload !== undefined
        ? frame.payload
        : frame.payload_b64 !== undefined
          ? { payload_b64: frame.payload_b64 }
          : null;
    const key = `${frame.src}|${brief(payload, 4096)}`;
    if (kind !== "out") {
      const seen = recent.get(key);
      if (seen && time - seen.time < DEDUPE_MS && seen.kind !== kind) {
        // The same frame reached the console directly and through the tap.
        seen.el.classList.add("to-you");
        seen.route.textContent = "→ you";
        return;
      }
    }
    const route = h("span", { class: "route", text: note });
    const el = h(
      "li",
      { class: `msg ${kind}` },
      h("span", { class: "time", text: clock(time) }),
      h("span", { class: "who", text: kind === "out" ? "you" : frame.src || addr }),
      route,
      h("code", { class: "payload", text: brief(payload, 2000) }),
    );
    if (kind !== "out") {
      recent.set(key, { time, kind, el, route });
      if (recent.size > STREAM_MAX) recent.delete(recent.keys().next().value);
    }
    stream.prepend(el);
    while (stream.childElementCount > STREAM_MAX) stream.lastElementChild.remove();
    streamCount++;
    streamCounter.textContent = `${streamCount} message${streamCount === 1 ? "" : "s"}`;
  }

  function onFrame(ev) {
    const f = ev.detail;
    if (f.group === group) {
      const to = f.dst && f.dst !== group ? `→ ${f.dst}` : f.to ? `→ ${f.to}` : "";
      addEntry("tap", f, to || "(watched)");
    } else if (f.src === addr) {
      addEntry("direct", f, "→ you");
    }
  }
  link.addEventListener("frame", onFrame);

  // The live link joins the watch group now and again after every reconnect.
  function onJoined(ev) {
    if (ev.detail.group === group) watchNote.textContent = `Watching every message ${addr} sends.`;
  }
  function onJoinFailed(ev) {
    if (ev.detail.group !== group) return;
    const e = ev.detail.error;
    watchNote.textContent = `Only replies to the console are shown: the relay refused to watch ${addr} (${e.code}: ${e.message}).`;
  }
  function onStatus(ev) {
    const { state, message } = ev.detail;
    if (state === "open") watchNote.textContent = "Joining the live stream…";
    else if (state === "stopped") watchNote.textContent = `Live link refused${message ? `: ${message}` : ""}.`;
    else watchNote.textContent = "Live link down; reconnecting…";
  }
  link.addEventListener("joined", onJoined);
  link.addEventListener("join-failed", onJoinFailed);
  link.addEventListener("status", onStatus);
  if (link.state !== "open") onStatus({ detail: { state: link.state, message: link.message } });
  link.join(group);

  // ---- commands
  async function submit(ev) {
    ev.preventDefault();
    cmdError.hidden = true;
    let payload;
    try {
      payload = JSON.parse(cmd.value);
    } catch (e) {
      cmdError.textContent = `Not valid JSON: ${e.message}`;
      cmdError.hidden = false;
      return;
    }
    const started = performance.now();
    const { seq, done } = link.send(addr, payload);
    const verdict = h("span", { class: "verdict pending", text: "waiting…" });
    const row = h(
      "li",
      { dataset: { seq } },
      h("span", { class: "seq", text: `#${seq}` }),
      h("code", { class: "payload", text: brief(payload, 300) }),
      verdict,
    );
    results.prepend(row);
    while (results.childElementCount > COMMANDS_MAX) results.lastElementChild.remove();
    addEntry("out", { src: link.addr, payload }, `→ ${addr} #${seq}`);
    try {
      await done;
      verdict.className = "verdict ok";
      verdict.textContent = `ack (${Math.round(performance.now() - started)} ms)`;
    } catch (e) {
      verdict.className = "verdict bad";
      verdict.textContent = `error ${e.code}: ${e.message}`;
    }
  }

  // ---- session, shadow, alarms
  const stamp = (ms) =>
    typeof ms === "number"
      ? h("span", { title: new Date(ms).toLocaleString() }, clock(ms), " (", h("span", { class: "ago", dataset: { ts: ms }, text: ago(ms) }), ")")
      : null;

  async function refreshSession() {
    if (noRegistry) return refreshLive();
    try {
      const d = await api.device(addr);
      if (!alive) return;
      const online = d.online === true;
      badge.textContent = online ? "online" : "offline";
      badge.className = `pill ${online ? "ok" : "bad"}`;
      const rows = [
        ["Status", online ? "online" : "offline"],
        ["Last seen", stamp(d.last_seen_ms)],
        ["First seen", stamp(d.first_seen_ms)],
        ["Connected", online ? stamp(d.last_connect_ms) : null],
        [
          "Last disconnect",
          d.last_disconnect_reason
            ? h("span", { class: "reason" }, d.last_disconnect_reason.replace(/_/g, " "), " ", stamp(d.last_disconnect_ms) ?? "")
            : null,
        ],
        ["Connects", typeof d.connects === "number" ? num(d.connects) : null],
        ["Role", d.role],
        ["Node", d.node],
        ["Shard", d.shard],
        ["Remote", d.remote],
        ["Groups", Array.isArray(d.groups) && d.groups.length ? d.groups.join(", ") : null],
        ["Uids", Array.isArray(d.uids) && d.uids.length ? d.uids.join(", ") : null],
        ["Meta", d.meta && Object.keys(d.meta).length ? brief(d.meta, 400) : null],
      ];
      replace(
        info,
        rows
          .filter(([, v]) => v !== null && v !== undefined && v !== "")
          .map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]),
      );
    } catch (e) {
      if (!alive || e.status === 401) return;
      if (e.code === "unsupported") {
        noRegistry = true;
        return refreshLive();
      }
      if (e.status === 404) {
        badge.textContent = "never seen";
        badge.className = "pill bad";
        replace(info, h("p", { class: "muted", text: `The relay has never seen ${addr}.` }));
      } else {
        replace(info, h("p", { class: "error", text: `Session unavailable: ${e.message}` }));
      }
    }
  }

  /** The live session from /api/v1/clients (when the relay keeps no registry). */
  async function refreshLive() {
    try {
      const c = await api.client(addr);
      if (!alive) return;
      const online = c.online !== false;
      badge.textContent = online ? "online" : "offline";
      badge.className = `pill ${online ? "ok" : "bad"}`;
      const rows = [
        ["Role", c.role],
        ["Node", c.node],
        ["Shard", c.shard],
        [
          "Connected",
          typeof c.connected_at_ms === "number"
            ? h("span", { class: "ago", dataset: { ts: c.connected_at_ms }, text: ago(c.connected_at_ms) })
            : null,
        ],
        ["Remote", c.remote],
        ["Groups", Array.isArray(c.groups) && c.groups.length ? c.groups.join(", ") : null],
        ["Uids", Array.isArray(c.uids) && c.uids.length ? c.uids.join(", ") : null],
        ["Meta", c.meta && Object.keys(c.meta).length ? brief(c.meta, 400) : null],
      ];
      replace(
        info,
        rows
          .filter(([, v]) => v !== null && v !== undefined && v !== "")
          .map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]),
      );
    } catch (e) {
      if (!alive || e.status === 401) return;
      if (e.status === 404) {
        badge.textContent = "offline";
        badge.className = "pill bad";
        replace(info, h("p", { class: "muted", text: `${addr} is not connected.` }));
      } else {
        replace(info, h("p", { class: "error", text: `Session unavailable: ${e.message}` }));
      }
    }
  }

  async function refreshShadow() {
    try {
      const st = await api.state(addr);
      if (!alive) return;
      const keys = st && typeof st === "object" && !Array.isArray(st) ? Object.keys(st).sort() : [];
      shadowAt.textContent = `read ${clock(Date.now())}`;
      if (!keys.length) {
        replace(shadow, h("p", { class: "muted", text: "No state recorded for this device yet." }));
        return;
      }
      replace(
        shadow,
        h(
          "dl",
          { class: "kv shadow" },
          keys.map((k) => [h("dt", { text: k }), h("dd", {}, h("code", { text: brief(st[k], 300) }))]),
        ),
      );
    } catch (e) {
      if (!alive || e.status === 401) return;
      if (e.code === "unsupported") rulesOff = true;
      const text =
        e.status === 404
          ? "No state recorded for this device."
          : e.code === "unsupported"
            ? "The device shadow needs rules: set [plugins] enabled = true in the relay's configuration."
            : `Shadow unavailable: ${e.message}`;
      replace(shadow, h("p", { class: e.status === 404 || e.code === "unsupported" ? "muted" : "error", text }));
    }
  }

  async function refreshAlarms() {
    try {
      const mine = alarmsFor(await api.alarms({ prefix: `${addr}/` }), addr).sort(
        (a, b) => severityRank(b.severity) - severityRank(a.severity) || (a.raised_at_ms ?? 0) - (b.raised_at_ms ?? 0),
      );
      if (!alive) return;
      replace(
        alarmsBox,
        mine.length
          ? h(
              "ul",
              { class: "alarm-list" },
              mine.map((a) => alarmCard(a, ctx, refreshAlarms)),
            )
          : h("p", { class: "muted", text: "No active alarms." }),
      );
    } catch (e) {
      if (!alive || e.status === 401) return;
      if (e.code === "unsupported") rulesOff = true;
      replace(alarmsBox, h("p", { class: e.code === "unsupported" ? "muted" : "error", text: alarmsError(e) }));
    }
  }

  async function refreshTelemetry() {
    if (document.hidden || telemetryOff || rulesOff) return;
    try {
      const s = await api.deviceHistory(addr, { limit: TELEMETRY_POINTS });
      if (!alive) return;
      const items = Array.isArray(s.items) ? s.items : [];
      const fields = Array.isArray(s.fields) ? s.fields : [];
      telemetryAt.textContent = items.length ? `${num(items.length)} readings from ${s.table}, read ${clock(Date.now())}` : "";
      if (!items.length) {
        replace(telemetry, h("p", { class: "muted", text: `No readings of ${addr} in ${s.table} yet.` }));
        return;
      }
      replace(
        telemetry,
        fields.map((f) => {
          const pts = items.map((r) => ({ t: Number(r.at_ms), v: typeof r[f] === "number" ? r[f] : NaN }));
          const last = [...pts].reverse().find((p) => Number.isFinite(p.v));
          return h(
            "figure",
            { class: "series", dataset: { field: f } },
            h("figcaption", {}, h("strong", { text: f }), last ? ` latest ${last.v} at ${clock(last.t)}` : ""),
            lineChart(f, pts),
          );
        }),
      );
    } catch (e) {
      if (!alive || e.status === 401) return;
      telemetryOff = e.status === 503 || e.status === 400 || e.code === "unsupported";
      const text =
        e.status === 503 || e.code === "unsupported"
          ? "Telemetry over time needs MySQL: set [mysql] enabled = true and persist() readings to a table with addr and at_ms columns."
          : e.status === 400
            ? e.message
            : `Telemetry unavailable: ${e.message}`;
      replace(telemetry, h("p", { class: telemetryOff ? "notice" : "error", text }));
    }
  }

  function poll() {
    if (document.hidden) return;
    refreshSession();
    if (!rulesOff) {
      refreshShadow();
      refreshAlarms();
    }
  }
  poll();
  refreshTelemetry();
  timers.push(setInterval(poll, POLL_MS), setInterval(refreshTelemetry, TELEMETRY_MS));

  return () => {
    alive = false;
    timers.forEach(clearInterval);
    link.removeEventListener("frame", onFrame);
    link.removeEventListener("status", onStatus);
    link.removeEventListener("joined", onJoined);
    link.removeEventListener("join-failed", onJoinFailed);
    link.leave(group).catch(() => {});
  };
}
