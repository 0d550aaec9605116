// app.js: the console's entry point. Keeps the session (API token in
// sessionStorage only), routes between the sign-in, fleet, device and alarms
// views by the URL hash, owns the live link (the page's own browser client on
// /ws), and refreshes the shared bits: relative times, link state, alarm badge.

import { Api } from "./api.js";
import { LiveLink } from "./live.js";
import { ago } from "./dom.js";
import { signInView } from "./signin.js";
import { fleetView } from "./fleet.js";
import { deviceView } from "./device.js";
import { alarmsView } from "./alarms.js";
import { notificationsView } from "./notifications.js";

const TOKEN_KEY = "relay.console.token";
const NAME_KEY = "relay.console.name";
/** How often the header's count of unacknowledged alarms is refreshed. */
const BADGE_EVERY_MS = 5000;

const view = document.getElementById("view");
const top = document.getElementById("top");
const linkEl = document.getElementById("link");
const linkText = document.getElementById("link-text");
const badge = document.getElementById("alarm-badge");
const linkBanner = document.getElementById("link-banner");

/** The signed-in session: null on the sign-in page. */
let session = null;
/** Cleanup of the mounted view. */
let unmount = () => {};
let badgeTimer = 0;

/** A value kept for this tab's session, or null. */
function stored(key) {
  try {
    return sessionStorage.getItem(key);
  } catch {
    return null;
  }
}

function store(key, value) {
  try {
    if (value === null) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, value);
  } catch {
    /* storage off: the session lasts as long as the page */
  }
}

/** Starts a session with a token the relay accepted. */
function begin(token, name) {
  store(TOKEN_KEY, token);
  store(NAME_KEY, name);
  const api = new Api(token, () => end("Wrong API token: the relay no longer accepts it."));
  const link = new LiveLink({ token });
  link.addEventListener("status", () => showLink(link));
  session = { api, link, name: name || "console", token };
  link.start();
  showLink(link);
  top.hidden = false;
  clearInterval(badgeTimer);
  refreshBadge();
  badgeTimer = setInterval(refreshBadge, BADGE_EVERY_MS);
  if (!location.hash || location.hash === "#/" || location.hash.startsWith("#/signin")) {
    location.hash = "#/fleet";
  }
  route();
}

/** Ends the session (sign-out, or a token the relay refuses) and shows sign-in. */
function end(message = "") {
  store(TOKEN_KEY, null);
  if (session) session.link.stop();
  session = null;
  clearInterval(badgeTimer);
  top.hidden = true;
  linkBanner.hidden = true;
  mount((root) => signInView(root, { begin, message, name: stored(NAME_KEY) || "" }));
}

function showLink(link) {
  linkEl.dataset.state = link.state;
  const text = { open: "live", connecting: "connecting…", closed: "reconnecting…", stopped: "offline" }[link.state];
  linkText.textContent = text || link.state;
  linkEl.title = link.message ? `Live link: ${link.message}` : `Live link as ${link.addr}: ${text}`;
  // The relay refused the page's own client: say so, since commands and live messages need it.
  linkBanner.hidden = !(session && link.state === "stopped" && link.message);
  linkBanner.textContent = linkBanner.hidden
    ? ""
    : `The relay refused the console's live link (${link.message}): live messages and commands are off.`;
}

async function refreshBadge() {
  if (!session || document.hidden) return;
  try {
    // The relay counts every active alarm; one page of them would undercount.
    const { totals } = await session.api.alarmsPage({ limit: 1 });
    const open = totals ? totals.unacked : 0;
    badge.hidden = open === 0;
    badge.textContent = open.toLocaleString("en-US");
    badge.title = totals
      ? `${open} not acknowledged of ${totals.active} active${totals.shelved ? `, ${totals.shelved} shelved` : ""}`
      : "";
  } catch (e) {
    // Rules off: there are no alarms to count until the relay's configuration changes.
    if (e.code === "unsupported") clearInterval(badgeTimer);
    /* otherwise the alarms view shows errors; the badge keeps its last value */
  }
}

function mount(fn) {
  try {
    unmount();
  } catch (e) {
    console.warn("view cleanup failed", e);
  }
  view.replaceChildren();
  unmount = fn(view) || (() => {});
  window.scrollTo(0, 0);
}

/** Shows the view named by the hash: #/fleet, #/device/<addr>, #/alarms, #/notifications. */
function route() {
  if (!session) return;
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, ...rest] = hash.split("/");
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === name || (name === "device" && a.dataset.nav === "fleet"));
  }
  const ctx = {
    ...session,
    go: (h) => {
      location.hash = h;
    },
  };
  if (name === "device" && rest.length) {
    let addr;
    try {
      addr = decodeURIComponent(rest.join("/"));
    } catch {
      addr = rest.join("/");
    }
    document.title = `${addr} · Relay console`;
    mount((root) => deviceView(root, ctx, addr));
  } else if (name === "notifications") {
    document.title = "Notifications · Relay console";
    mount((root) => notificationsView(root, ctx));
  } else if (name === "alarms") {
    document.title = "Alarms · Relay console";
    mount((root) => alarmsView(root, ctx));
  } else {
    document.title = "Fleet · Relay console";
    mount((root) => fleetView(root, ctx));
  }
}

/** Rewrites every `.ago[data-ts]` element once a second. */
function tickTimes() {
  const now = Date.now();
  for (const el of document.querySelectorAll(".ago[data-ts]")) {
    el.textContent = ago(Number(el.dataset.ts), now);
  }
}

document.getElementById("signout").addEventListener("click", () => end(""));
window.addEventListener("hashchange", route);
setInterval(tickTimes, 1000);

const token = stored(TOKEN_KEY);
if (token !== null) {
  // A reload keeps the session; the first API call checks the token again.
  begin(token, stored(NAME_KEY) || "");
} else {
  end("");
}
