// test/console.test.js: the relay's web console in a real browser. Starts the
// relay binary with an overheat rule, a simulated controller on TCP, and
// headless Chromium (Debian's /usr/bin/chromium) driven by playwright-core,
// then goes through what an operator does: sign in (a wrong token first), see
// the controller appear in the fleet, send it a command and see its reply and
// the ACK, see the alarm the rule raised and acknowledge it, on a desktop and a
// phone-sized screen, with no console errors. Screenshots of each view are
// saved under SCREENSHOT_DIR (default target/console-screenshots/; the ones in
// docs/screenshots/ are refreshed with SCREENSHOT_DIR=docs/screenshots).

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { createServer } from "node:http";

import { startRelay, api } from "../lib/relay.js";
import { SimController, tokenFor } from "../lib/controller.js";

const here = dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const SHOTS = resolve(process.env.SCREENSHOT_DIR || join(here, "../../../target/console-screenshots"));
const CTL = "ctl-sim-1";
/** Other controllers online, more than one page of the fleet view (100). */
const FLEET = 120;
const fleetAddr = (i) => `ctl-8266-${String(i).padStart(4, "0")}`;
const OPERATOR = "Operator Ada";
/** Longest wait for something to show up on the page. */
const UI_MS = 15000;
/** Phone screen (an iPhone 12-class device). */
const PHONE = { width: 390, height: 844 };

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * Opens a page that records every console error, uncaught exception and failed
 * request. `expected(msg)` may excuse a console message the step provoked on
 * purpose (the 401 of a wrong token).
 */
async function watchedPage(browser, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, ...options });
  const page = await context.newPage();
  const problems = [];
  // `navigating`: a reload is under way, so requests it cuts off (ERR_ABORTED) are expected.
  const state = { expected: () => false, closing: false, navigating: false };
  page.on("console", (msg) => {
    if (msg.type() !== "error") return;
    if (state.expected(msg)) return;
    problems.push(`console.${msg.type()}: ${msg.text()} (${msg.location().url || "?"})`);
  });
  page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
  page.on("requestfailed", (r) => {
    if (state.navigating && r.failure()?.errorText === "net::ERR_ABORTED") return;
    if (!state.closing) problems.push(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`);
  });
  return { context, page, problems, state };
}

async function shot(page, name, fullPage = false) {
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage });
}

async function signIn(page, token, name = OPERATOR) {
  await page.locator("#token").fill(token);
  await page.locator("#name").fill(name);
  await page.locator("#signin-button").click();
}

/** Waits until `fn(arg)` is true in the page; a timeout names what was awaited. */
async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: UI_MS });
  } catch (e) {
    const why = e.name === "TimeoutError" ? `timed out after ${UI_MS} ms` : String(e.message).split("\n")[0];
    throw new Error(`waiting until ${what}: ${why}`, { cause: e });
  }
}

/** No element is wider than the screen: the page never scrolls sideways. */
async function assertNoSideScroll(page, where) {
  const { scroll, client } = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    client: document.documentElement.clientWidth,
  }));
  assert.ok(scroll <= client, `${where}: page is ${scroll} px wide on a ${client} px screen`);
}

describe("relay web console in Chromium", { timeout: 180000 }, () => {
  let relay;
  let ctl;
  const fleet = [];
  let browser;
  let desk;

  before(async () => {
    relay = await startRelay({ mysql: process.env.CONSOLE_TEST_MYSQL !== "0" });
    // A fleet of normal controllers, each reporting one reading.
    for (let i = 0; i < FLEET; i += 20) {
      const batch = [];
      for (let j = i; j < Math.min(FLEET, i + 20); j++) {
        const c = new SimController(relay.tcp, fleetAddr(j));
        fleet.push(c);
        batch.push(c.connect().then(() => c.telemetry({ temp: 20 + (j % 13), rssi: -50 - (j % 30) })));
      }
      await Promise.all(batch);
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
    desk = await watchedPage(browser);
  });

  after(async () => {
    if (desk) desk.state.closing = true;
    await browser?.close().catch(() => {});
    ctl?.close();
    fleet.forEach((c) => c.close());
    await relay?.stop();
  });

  it("serves the page and refuses a wrong token with a clear message", async () => {
    const { page, state } = desk;
    const res = await page.goto(`http://${relay.http}/`);
    assert.equal(res.status(), 200);
    assert.match(res.headers()["content-type"] ?? "", /text\/html/);
    await page.locator("#token").waitFor({ timeout: UI_MS });
    await shot(page, "sign-in");

    // The relay answers the wrong token with 401, which Chromium reports on the console.
    state.expected = (msg) => /status of 401/.test(msg.text()) && /\/api\/v1\/stats/.test(msg.location().url ?? "");
    await signIn(page, "not-the-token");
    const error = page.locator("#signin-error");
    await error.waitFor({ state: "visible", timeout: UI_MS });
    assert.match(await error.textContent(), /Wrong API token/);
    assert.equal(await page.locator("#top").isVisible(), false, "no session after a wrong token");
    assert.equal(await page.evaluate(() => sessionStorage.getItem("relay.console.token")), null);
    state.expected = () => false;
  });

  it("signs in, keeps the token for the session only, and shows the controller in the fleet", async () => {
    const { page } = desk;
    await signIn(page, relay.token);
    await page.locator("#top").waitFor({ state: "visible", timeout: UI_MS });
    assert.equal(await page.evaluate(() => sessionStorage.getItem("relay.console.token")), relay.token);
    assert.equal(await page.evaluate(() => localStorage.length), 0);
    // The page's own live link is up.
    await page.locator('#link[data-state="open"]').waitFor({ timeout: UI_MS });

    // A first page of 100 controllers, last seen first, with their last state, and more behind "Next".
    const rows = page.locator("#fleet-rows tr");
    await until(page, "the first page holds 100 controllers", () => document.querySelectorAll("#fleet-rows tr").length === 100);
    await until(page, "the status counts the whole fleet, not the page", (n) =>
      (document.querySelector("#fleet-status")?.textContent ?? "").startsWith(`1–100 of ${n} controllers`), FLEET);
    const firstAddr = await rows.first().getAttribute("data-addr");
    assert.match(firstAddr, /^ctl-8266-\d{4}$/);
    await until(page, "the first row shows its temperature from the device shadow", (addr) =>
      /temp=\d+/.test(document.querySelector(`#fleet-rows tr[data-addr="${addr}"] td.state`)?.textContent ?? ""), firstAddr);
    await until(page, "the live count of controllers reaches the fleet", (n) =>
      Number(document.querySelector("#count-controllers .count-value")?.textContent.replace(/,/g, "")) === n, FLEET);
    await page.locator("#next").click();
    await until(page, "the second page holds the other 20", () =>
      document.querySelectorAll("#fleet-rows tr").length === 20 &&
      document.querySelector("#page-label")?.textContent === "Page 2 of 2");
    assert.equal(await page.locator("#next").isDisabled(), true, "no third page");
    await page.locator("#prev").click();
    await until(page, "back on the first page", () =>
      document.querySelectorAll("#fleet-rows tr").length === 100 &&
      document.querySelector("#page-label")?.textContent === "Page 1 of 2");

    // Search by address prefix; then the simulated controller connects and appears.
    await page.locator("#search").fill("ctl-sim");
    await until(page, "a prefix matching nobody online empties the list", () =>
      document.querySelectorAll("#fleet-rows tr").length === 0 &&
      /No controllers whose address starts with/.test(document.querySelector("#fleet-status")?.textContent ?? ""));
    ctl = new SimController(relay.tcp, CTL);
    await ctl.connect();
    ctl.telemetry({ temp: 90 });
    ctl.every(1000, () => ({ temp: 90, rssi: -61 }));
    const row = page.locator(`#fleet-rows tr[data-addr="${CTL}"]`);
    await row.waitFor({ timeout: UI_MS });
    assert.equal(await rows.count(), 1);
    await until(page, "the row says online", (addr) =>
      document.querySelector(`#fleet-rows tr[data-addr="${addr}"] td:nth-child(2)`)?.textContent.trim() === "online", CTL);
    assert.match(await row.locator("td").nth(2).textContent(), /ago/, "last seen");
    assert.match(await row.locator("td").nth(3).textContent(), /ago/, "first seen");
    assert.equal((await row.locator("td").nth(5).textContent()).trim(), "controller");
    // The last state comes from the device shadow the rule keeps.
    await until(page, "the fleet row shows temp=90 from the device shadow", (addr) =>
      document.querySelector(`#fleet-rows tr[data-addr="${addr}"] td.state`)?.textContent.includes("temp=90"), CTL);
    // Live counts from /api/v1/stats.
    await until(page, "the live count of controllers includes it", (n) =>
      Number(document.querySelector("#count-controllers .count-value")?.textContent.replace(/,/g, "")) === n, FLEET + 1);
    await until(page, "frames in / s shows a number", () =>
      /\d/.test(document.querySelector("#count-in .count-value")?.textContent ?? ""));

    await page.locator("#search").fill("");
    await until(page, "the whole fleet is listed again", () => document.querySelectorAll("#fleet-rows tr").length === 100);
    await until(page, "the visible rows show their state", () =>
      [...document.querySelectorAll("#fleet-rows td.state")].slice(0, 12).every((td) => /temp=/.test(td.textContent)));
    await shot(page, "fleet");
  });

  it("opens the device, streams its messages, sends a command and shows the reply and the ack", async () => {
    const { page } = desk;
    await page.locator("#search").fill("ctl-sim");
    await page.locator(`#fleet-rows tr[data-addr="${CTL}"] a`).click();
    await until(
      page,
      "the device view shows the address",
      (addr) => document.querySelector("#device-addr")?.textContent === addr,
      CTL,
    );
    await page.locator("#device-online.ok").waitFor({ timeout: UI_MS });
    await until(page, "the page watches the device (joined watch:<addr>)", () =>
      /Watching/.test(document.querySelector("#watch-note")?.textContent ?? ""),
    );
    // Telemetry the controller publishes reaches the page through the watch tap.
    await page.locator("#stream li.tap", { hasText: '"temp":90' }).first().waitFor({ timeout: UI_MS });
    await page.locator("#shadow", { hasText: "temp" }).waitFor({ timeout: UI_MS });
    assert.match(await page.locator("#shadow").textContent(), /90/);
    // The registry's view of it: online, first and last seen.
    await page.locator("#device-info", { hasText: "First seen" }).waitFor({ timeout: UI_MS });
    if (process.env.CONSOLE_TEST_MYSQL !== "0") {
      // Its readings over time, from MariaDB, as a chart.
      await until(page, "the temperature chart has readings", () =>
        Number(document.querySelector('#telemetry svg.chart[data-field="temp"]')?.dataset.points) >= 1);
    }

    // Bad JSON is refused on the page, nothing is sent.
    await page.locator("#command").fill("{not json");
    await page.locator("#send").click();
    await page.locator("#command-error").waitFor({ state: "visible", timeout: UI_MS });
    assert.match(await page.locator("#command-error").textContent(), /Not valid JSON/);
    assert.equal(await page.locator("#results li").count(), 0);

    const before = ctl.received.filter((f) => f.type === "data").length;
    await page.locator("#command").fill('{"cmd": "relay_on", "ch": 2}');
    await page.locator("#send").click();
    const result = page.locator("#results li").first();
    await result.locator(".verdict.ok").waitFor({ timeout: UI_MS });
    assert.match(await result.locator(".verdict").textContent(), /^ack/);
    // The controller got it from the console's own address...
    const got = ctl.received.filter((f) => f.type === "data").slice(before);
    assert.equal(got.length, 1, "the controller received the command once");
    assert.deepEqual(got[0].payload, { cmd: "relay_on", ch: 2 });
    assert.match(got[0].src, /^console-[0-9a-f]{8}$/);
    // ...and its reply is in the live stream.
    await page
      .locator("#stream li", { hasText: '"echo":{"cmd":"relay_on","ch":2}' })
      .first()
      .waitFor({ timeout: UI_MS });

    // The device's alarm is listed in its view.
    await page.locator("#device-alarms li", { hasText: `${CTL}/overheat` }).waitFor({ timeout: UI_MS });
    await shot(page, "device", true);

    // A command to an address nobody holds gets the relay's error, shown for its seq.
    // The view asks for that address's session, which the relay answers with 404,
    // and Chromium reports every 404 on the console: that one is expected here.
    desk.state.expected = (msg) =>
      /status of 404/.test(msg.text()) &&
      /\/api\/v1\/(clients|devices)\/ctl-nobody-here$/.test(msg.location().url ?? "");
    await page.evaluate(() => {
      location.hash = "#/device/ctl-nobody-here";
    });
    await until(
      page,
      "the device view of an offline address is shown",
      () => document.querySelector("#device-addr")?.textContent === "ctl-nobody-here",
    );
    await page.locator("#device-online.bad").waitFor({ timeout: UI_MS });
    await page.locator("#command").fill('{"cmd": "status"}');
    await page.locator("#send").click();
    const refused = page.locator("#results li").first().locator(".verdict.bad");
    await refused.waitFor({ timeout: UI_MS });
    assert.match(await refused.textContent(), /no_route/);
    await page.locator('a[data-nav="fleet"]').click();
    await page.locator(`#fleet-rows tr`).first().waitFor({ timeout: UI_MS });
    await page.waitForTimeout(500); // a poll of the old view may still be answered
    desk.state.expected = () => false;
  });

  it("shows the alarm raised by the rule and acknowledges it", async () => {
    const { page } = desk;
    await page.locator('a[data-nav="alarms"]').click();
    const card = page.locator(`#alarm-list li[data-key="${CTL}/overheat"]`);
    await card.waitFor({ timeout: UI_MS });
    assert.equal((await card.locator(".sev").textContent()).trim(), "critical");
    assert.match(await card.textContent(), /not acknowledged/);
    assert.match(await card.textContent(), /reads 90/);
    // The badge follows the totals, which the page fetches apart from the list.
    await until(
      page,
      "the alarm badge counts the alarm",
      () => document.querySelector("#alarm-badge")?.textContent === "1",
    );

    await card.locator("button.ack").click();
    await card.locator(".acked", { hasText: `acknowledged by ${OPERATOR}` }).waitFor({ timeout: UI_MS });
    // The relay itself has it acknowledged.
    const { status, body } = await api(relay, "GET", "/api/v1/alarms");
    assert.equal(status, 200);
    const alarm = body.items.find((a) => a.key === `${CTL}/overheat`);
    assert.equal(alarm?.acked_by, OPERATOR);
    await until(
      page,
      "the alarm badge is gone after the acknowledge",
      () => document.querySelector("#alarm-badge")?.hidden === true,
    );

    if (process.env.CONSOLE_TEST_MYSQL !== "0") {
      // History from MySQL shows the acknowledge (the sink writes it asynchronously).
      const row = page.locator(`#history-rows tr[data-key="${CTL}/overheat"]`, { hasText: "acknowledged" });
      const deadline = Date.now() + 30000;
      while (!(await row.count()) && Date.now() < deadline) {
        await page.locator("section", { hasText: "History" }).getByRole("button", { name: "Refresh" }).click();
        await page.waitForTimeout(1000);
      }
      assert.ok(await row.count(), "the acknowledge is in the history");
      assert.match(await row.first().textContent(), new RegExp(OPERATOR));
    }
    await shot(page, "alarms");
  });

  it("works on a phone-sized screen without sideways scrolling", async () => {
    const phone = await watchedPage(browser, { viewport: PHONE, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
    try {
      const { page } = phone;
      await page.goto(`http://${relay.http}/`);
      await signIn(page, relay.token);
      await until(page, "the phone lists the first page", () => document.querySelectorAll("#fleet-rows tr").length === 100);
      await until(page, "the phone's first rows show their state", () =>
        [...document.querySelectorAll("#fleet-rows td.state")].slice(0, 4).every((td) => /temp=/.test(td.textContent)));
      await until(page, "the phone shows frames in / s", () =>
        /\d/.test(document.querySelector("#count-in .count-value")?.textContent ?? ""),
      );
      await assertNoSideScroll(page, "fleet");
      const header = await page.locator("#top").boundingBox();
      assert.ok(header.height < 80, `the header keeps to one line (${header.height} px high)`);
      await shot(page, "fleet-phone");
      await page.locator("#search").fill("ctl-sim");
      await page.locator(`#fleet-rows tr[data-addr="${CTL}"] a`).tap();
      await page.locator("#stream li.tap").first().waitFor({ timeout: UI_MS });
      await assertNoSideScroll(page, "device");
      await page.locator('a[data-nav="alarms"]').tap();
      await page.locator(`#alarm-list li[data-key="${CTL}/overheat"]`).waitFor({ timeout: UI_MS });
      await assertNoSideScroll(page, "alarms");
      phone.state.closing = true;
      assert.deepEqual(phone.problems, []);
    } finally {
      phone.state.closing = true;
      await phone.context.close();
    }
  });

  it("keeps the session over a reload and forgets the token on sign-out", async () => {
    const { page } = desk;
    desk.state.navigating = true;
    await page.reload();
    desk.state.navigating = false;
    await page.locator('#link[data-state="open"]').waitFor({ timeout: UI_MS });
    await page.locator(`#alarm-list li[data-key="${CTL}/overheat"]`).waitFor({ timeout: UI_MS });
    await page.locator("#signout").click();
    await page.locator("#token").waitFor({ timeout: UI_MS });
    assert.equal(await page.evaluate(() => sessionStorage.getItem("relay.console.token")), null);
    assert.equal(await page.locator("#top").isVisible(), false);
    // The page's own client said BYE (the phone's page was closed before): no browser is online.
    const deadline = Date.now() + UI_MS;
    let browsers;
    do {
      const { body } = await api(relay, "GET", "/api/v1/clients?role=browser");
      browsers = body.items.map((c) => c.addr);
      if (!browsers.length) break;
      await new Promise((r) => setTimeout(r, 200));
    } while (Date.now() < deadline);
    assert.deepEqual(browsers, [], "no console client stays online after sign-out");
  });

  it("had no console errors, uncaught exceptions or failed requests", () => {
    assert.deepEqual(desk.problems, []);
  });
});

describe("relay web console without MySQL", { timeout: 120000 }, () => {
  let relay;
  let browser;

  before(async () => {
    relay = await startRelay({ mysql: false });
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await relay?.stop();
  });

  it("says that alarm history needs MySQL", async () => {
    const w = await watchedPage(browser);
    try {
      const { page, state } = w;
      // The relay answers the history request with 503, which Chromium reports on the console.
      state.expected = (msg) =>
        /status of 503/.test(msg.text()) && /\/api\/v1\/alarms\/history/.test(msg.location().url ?? "");
      await page.goto(`http://${relay.http}/#/alarms`);
      await signIn(page, relay.token);
      const note = page.locator("#history-note.notice");
      await note.waitFor({ timeout: UI_MS });
      assert.match(await note.textContent(), /History needs MySQL/);
      assert.equal(await page.locator("#history-rows tr").count(), 0);
      assert.match(await page.locator("#alarm-summary").textContent(), /No active alarms/);
      w.state.closing = true;
      assert.deepEqual(w.problems, []);
    } finally {
      w.state.closing = true;
      await w.context.close();
    }
  });
});

describe("relay web console with HMAC auth (the production setting)", { timeout: 120000 }, () => {
  let relay;
  let ctl;
  let browser;
  const addr = "ctl-sim-2";

  before(async () => {
    relay = await startRelay({ hmacSecret: "console-test-secret-0123456789abcdef" });
    ctl = new SimController(relay.tcp, addr, tokenFor(relay.hmacSecret, addr));
    await ctl.connect();
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  });

  after(async () => {
    await browser?.close().catch(() => {});
    ctl?.close();
    await relay?.stop();
  });

  it("opens the live link with the API token and commands a controller", async () => {
    const w = await watchedPage(browser);
    try {
      const { page, state } = w;
      // Telemetry over time needs MySQL, which this relay has not: its 503 is expected.
      state.expected = (msg) =>
        /status of 503/.test(msg.text()) && /\/api\/v1\/devices\/[^/]+\/history/.test(msg.location().url ?? "");
      await page.goto(`http://${relay.http}/#/device/${addr}`);
      await signIn(page, relay.token);
      await until(page, "the live link is open (the relay accepts the API token on /ws)", () => {
        const banner = document.querySelector("#link-banner");
        if (banner && !banner.hidden) throw new Error(banner.textContent);
        return document.querySelector("#link")?.dataset.state === "open";
      });
      await until(page, "the page watches the device", () =>
        /Watching/.test(document.querySelector("#watch-note")?.textContent ?? ""),
      );
      await page.locator("#command").fill('{"cmd": "status"}');
      await page.locator("#send").click();
      await page.locator("#results li .verdict.ok").first().waitFor({ timeout: UI_MS });
      await page.locator("#stream li", { hasText: '"echo":{"cmd":"status"}' }).first().waitFor({ timeout: UI_MS });
      w.state.closing = true;
      assert.deepEqual(w.problems, []);
    } finally {
      w.state.closing = true;
      await w.context.close();
    }
  });
});

describe("a fleet of 2,000 controllers, 1,000 of them offline", { timeout: 240000 }, () => {
  const N = 2000;
  const addr2k = (i) => `ctl-2k-${String(i).padStart(4, "0")}`;
  const withMysql = process.env.CONSOLE_TEST_MYSQL !== "0";
  let relay;
  let browser;
  let provider;
  const answered = [];
  const fleet = [];

  before(async () => {
    // The SMS provider: answers every request with its message id, as a real one would.
    provider = createServer((req, res) => {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        answered.push(body);
        const answer = JSON.stringify({ sid: `SM${answered.length}`, status: "queued" });
        res.writeHead(200, { "Content-Type": "application/json" }).end(answer);
      });
    });
    await new Promise((r) => provider.listen(0, "127.0.0.1", r));
    const port = provider.address().port;
    relay = await startRelay({
      mysql: withMysql,
      maxConnections: N + 200,
      extraConfig: [
        "[[notify.notifier]]",
        'name = "sms"',
        `url = "http://127.0.0.1:${port}/send"`,
        'method = "POST"',
        `body = '{"to": {{target|json}}, "text": {{text|json}}}'`,
        "retries = 0",
        "[[notify.route]]",
        'name = "on-call"',
        'severities = ["critical"]',
        'chain = [{ channel = "sms", target = "+15550001" }]',
        "notify_clear = false",
        // These tests count and act on the 1,000 alarms one by one; folding
        // them into one incident has its own tests.
        "[notify.storm]",
        "enabled = false",
      ].join("\n"),
    });
    // Bounded: 2,000 connections in batches of 200, each within the controller's 10 s.
    const started = Date.now();
    for (let i = 0; i < N; i += 200) {
      const batch = [];
      for (let j = i; j < Math.min(N, i + 200); j++) {
        const c = new SimController(relay.tcp, addr2k(j));
        fleet.push(c);
        batch.push(c.connect());
      }
      await Promise.all(batch);
    }
    // Site 3: ten that will leave (the group is recorded when they go) and five that stay.
    for (const j of [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 0, 2, 4, 6, 8]) {
      const { status } = await api(relay, "POST", "/api/v1/groups/site-3/members", { addr: addr2k(j) });
      assert.equal(status, 200);
    }
    // The odd half says BYE and goes.
    for (let j = 1; j < N; j += 2) fleet[j].close();
    const deadline = Date.now() + 60000;
    for (;;) {
      const { body } = await api(relay, "GET", "/api/v1/devices?role=controller&limit=1");
      if (body?.totals?.offline === N / 2 && body?.totals?.online === N / 2) break;
      assert.ok(Date.now() < deadline, `the registry never showed ${N / 2} offline: ${JSON.stringify(body?.totals)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    console.log(`# fleet of ${N} up and half of it gone in ${Date.now() - started} ms`);
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  });

  after(async () => {
    await browser?.close().catch(() => {});
    fleet.forEach((c) => c.close());
    await relay?.stop();
    await new Promise((r) => (provider ? provider.close(r) : r()));
  });

  it("shows online and offline devices with last seen, every count from the relay's totals", async () => {
    const w = await watchedPage(browser);
    try {
      const { page } = w;
      await page.goto(`http://${relay.http}/`);
      await signIn(page, relay.token);
      const value = (id) => document.querySelector(`#${id} .count-value`)?.textContent;
      await until(page, "the counts show 2,000 controllers, 1,000 online and 1,000 offline", () =>
        document.querySelector("#count-devices .count-value")?.textContent === "2,000" &&
        document.querySelector("#count-online .count-value")?.textContent === "1,000" &&
        document.querySelector("#count-offline .count-value")?.textContent === "1,000");
      assert.equal(await page.evaluate(value, "count-devices"), "2,000");
      // A page holds 100; the status line and the pager count all 2,000.
      await until(page, "one page of 100 of all 2,000", () =>
        document.querySelectorAll("#fleet-rows tr").length === 100 &&
        (document.querySelector("#fleet-status")?.textContent ?? "").startsWith("1–100 of 2,000 controllers") &&
        document.querySelector("#page-label")?.textContent === "Page 1 of 20");
      // The offline half, newest gone first, each with when it was last seen and why it went.
      await page.locator('#status-filter button[data-status="offline"]').click();
      await until(page, "the offline filter lists 100 of 1,000 offline", () =>
        (document.querySelector("#fleet-status")?.textContent ?? "").startsWith("1–100 of 1,000 offline controllers") &&
        document.querySelectorAll('#fleet-rows tr[data-online="false"]').length === 100 &&
        document.querySelectorAll('#fleet-rows tr[data-online="true"]').length === 0 &&
        document.querySelector("#page-label")?.textContent === "Page 1 of 10");
      assert.equal(
        (await page.locator('#status-filter button[data-status="offline"] .chip-count').textContent()).trim(),
        "1,000",
      );
      const first = page.locator("#fleet-rows tr").first();
      assert.match(await first.getAttribute("data-addr"), /^ctl-2k-\d{3}[13579]$/, "an odd one: those left");
      assert.match(await first.locator("td.last-seen").textContent(), /ago/);
      assert.equal((await first.locator("td.reason").textContent()).trim(), "bye");
      const seen = await page.$$eval("#fleet-rows td.last-seen .ago", (els) => els.map((e) => Number(e.dataset.ts)));
      assert.equal(seen.length, 100);
      assert.ok(seen.every((t, i) => i === 0 || seen[i - 1] >= t), "sorted by last seen, newest first");
      await page.locator("#next").click();
      await until(page, "the second page of the offline ones", () =>
        (document.querySelector("#fleet-status")?.textContent ?? "").startsWith("101–200 of 1,000 offline") &&
        document.querySelector("#page-label")?.textContent === "Page 2 of 10");
      await shot(page, "fleet-offline");
      // The online half.
      await page.locator('#status-filter button[data-status="online"]').click();
      await until(page, "the online filter lists 100 of 1,000 online", () =>
        (document.querySelector("#fleet-status")?.textContent ?? "").startsWith("1–100 of 1,000 online controllers") &&
        document.querySelectorAll('#fleet-rows tr[data-online="true"]').length === 100);
      // Group site-3: the ten that left in it and the five in it now.
      await page.locator("#group").fill("site-3");
      await until(page, "the group filter lists the 5 online members", () =>
        (document.querySelector("#fleet-status")?.textContent ?? "").startsWith("1–5 of 5 online controllers in group site-3"));
      await page.locator('#status-filter button[data-status=""]').click();
      await until(page, "and all 15 with the offline ones", () =>
        (document.querySelector("#fleet-status")?.textContent ?? "").startsWith("1–15 of 15 controllers in group site-3") &&
        document.querySelectorAll('#fleet-rows tr[data-online="false"]').length === 10);
      await page.locator("#group").fill("");
      // An offline device's own view: offline, last seen, why.
      await page.evaluate(() => {
        location.hash = "#/device/ctl-2k-0001";
      });
      await page.locator("#device-online.bad", { hasText: "offline" }).waitFor({ timeout: UI_MS });
      await page.locator("#device-info", { hasText: "Last disconnect" }).waitFor({ timeout: UI_MS });
      assert.match(await page.locator("#device-info").textContent(), /bye/);
      w.state.closing = true;
      assert.deepEqual(w.problems, []);
    } finally {
      w.state.closing = true;
      await w.context.close();
    }
  });

  it("counts 1,000 offline alarms from the totals, acknowledges in bulk, shelves and clears", async () => {
    const w = await watchedPage(browser);
    try {
      const { page, state } = w;
      // Without MySQL the alarm history answers 503 (expected).
      state.expected = (msg) => /status of 503/.test(msg.text()) && /\/api\/v1\/alarms\/history/.test(msg.location().url ?? "");
      await page.goto(`http://${relay.http}/#/alarms`);
      await signIn(page, relay.token);
      await until(page, "the summary counts all 1,000 alarms while the page shows 100", () =>
        /^1,000 active \(1,000 major\); 1,000 not acknowledged/.test(document.querySelector("#alarm-summary")?.textContent ?? "") &&
        document.querySelectorAll("#alarm-list li").length === 100);
      await until(page, "the header badge says 1,000", () => document.querySelector("#alarm-badge")?.textContent === "1,000");
      assert.equal((await page.locator('#severity-filter button[data-sev="major"] .chip-count').textContent()).trim(), "1,000");
      assert.equal(await page.locator("#alarms-page").textContent(), "Page 1 of 10");

      // Bulk acknowledge of three picked ones.
      const cards = page.locator("#alarm-list li");
      const keys = [];
      for (let i = 0; i < 3; i++) {
        keys.push(await cards.nth(i).getAttribute("data-key"));
        await cards.nth(i).locator("input.pick").check();
      }
      assert.equal(await page.locator("#ack-selected").textContent(), "Acknowledge selected (3)");
      await page.locator("#ack-selected").click();
      await until(page, "997 left to acknowledge", () =>
        /1,000 active .*; 997 not acknowledged/.test(document.querySelector("#alarm-summary")?.textContent ?? ""));
      await until(page, "the badge follows", () => document.querySelector("#alarm-badge")?.textContent === "997");
      const { body } = await api(relay, "GET", `/api/v1/alarms?prefix=${encodeURIComponent(keys[0])}`);
      assert.equal(body.items[0].acked_by, OPERATOR);

      // Shelve one for an hour, then unshelve it.
      const target = page.locator(`#alarm-list li[data-key="${keys[3] ?? (await cards.nth(5).getAttribute("data-key"))}"]`);
      const shelveKey = await target.getAttribute("data-key");
      await target.locator("select.shelve").selectOption("3600");
      const shelved = page.locator(`#alarm-list li[data-key="${shelveKey}"] .shelved`);
      await shelved.waitFor({ timeout: UI_MS });
      assert.match(await shelved.textContent(), new RegExp(`shelved by ${OPERATOR} until`));
      await until(page, "the summary counts the shelved one", () =>
        /; 1 shelved\./.test(document.querySelector("#alarm-summary")?.textContent ?? ""));
      const a = (await api(relay, "GET", `/api/v1/alarms?prefix=${encodeURIComponent(shelveKey)}`)).body.items[0];
      assert.ok(a.shelved_until_ms > Date.now() + 3500 * 1000, "shelved for an hour");
      await page.locator(`#alarm-list li[data-key="${shelveKey}"] button.unshelve`).click();
      await until(page, "unshelved", (k) => !document.querySelector(`#alarm-list li[data-key="${k}"] .shelved`) &&
        !!document.querySelector(`#alarm-list li[data-key="${k}"] select.shelve`), shelveKey);

      // Clear one: 999 active.
      await page.locator(`#alarm-list li[data-key="${shelveKey}"] button.clear`).click();
      await until(page, "999 active after the clear", () =>
        /^999 active/.test(document.querySelector("#alarm-summary")?.textContent ?? ""));
      assert.equal((await api(relay, "GET", "/api/v1/alarms?limit=1")).body.totals.active, 999);

      // Acknowledge every major one at once.
      await page.locator('#severity-filter button[data-sev="major"]').click();
      await until(page, "the bulk button counts every major one not acknowledged, on all pages", () =>
        document.querySelector("#ack-all")?.textContent === "Acknowledge all 996 major not acknowledged");
      await page.locator("#ack-all").click();
      await until(page, "nothing left to acknowledge", () =>
        /999 active .*; 0 not acknowledged/.test(document.querySelector("#alarm-summary")?.textContent ?? ""));
      await until(page, "the badge is gone", () => document.querySelector("#alarm-badge")?.hidden === true);
      await until(page, "nothing left for the bulk button", () => document.querySelector("#ack-all")?.disabled === true);
      await shot(page, "alarms-bulk");
      w.state.closing = true;
      assert.deepEqual(w.problems, []);
    } finally {
      w.state.closing = true;
      await w.context.close();
    }
  });

  it("logs who was paged, by which notifier, when, and the provider's answer", { skip: !withMysql && "needs MariaDB" }, async () => {
    const hot = fleet[0];
    hot.telemetry({ temp: 95, rssi: -70 });
    const w = await watchedPage(browser);
    try {
      const { page } = w;
      await page.goto(`http://${relay.http}/#/notifications`);
      await signIn(page, relay.token);
      const row = page.locator(`#notify-rows tr[data-key="${hot.addr}/overheat"]`);
      await row.first().waitFor({ timeout: UI_MS });
      const text = await row.first().textContent();
      assert.match(text, /sms/);
      assert.match(text, /\+15550001/);
      assert.match(text, /raised/);
      assert.match(text, /sent/);
      assert.match(text, /HTTP 200/);
      assert.match(text, /"sid":"SM\d+"/, "the provider's answer");
      assert.ok(answered.some((b) => b.includes("+15550001")), "the provider was called");
      // Filter by status: nothing failed.
      await page.locator("#notify-status").selectOption("failed");
      await until(page, "no failed notification", () =>
        /No notification matches/.test(document.querySelector("#notify-note")?.textContent ?? ""));
      await page.locator("#notify-status").selectOption("");
      await row.first().waitFor({ timeout: UI_MS });
      await shot(page, "notifications");
      w.state.closing = true;
      assert.deepEqual(w.problems, []);
    } finally {
      w.state.closing = true;
      await w.context.close();
    }
  });

  it("draws a device's telemetry over time from MySQL", { skip: !withMysql && "needs MariaDB" }, async () => {
    const c = fleet[2];
    const temps = [21.5, 22, 23.5, 22.5, 24];
    for (const t of temps) {
      c.telemetry({ temp: t, rssi: -60 });
      await new Promise((r) => setTimeout(r, 30));
    }
    const w = await watchedPage(browser);
    try {
      const { page } = w;
      await page.goto(`http://${relay.http}/#/device/${c.addr}`);
      await signIn(page, relay.token);
      await until(page, "the temperature chart has the 5 readings", () =>
        Number(document.querySelector('#telemetry svg.chart[data-field="temp"]')?.dataset.points) === 5);
      assert.match(await page.locator('#telemetry figure[data-field="temp"] figcaption').textContent(), /latest 24/);
      assert.equal(await page.locator('#telemetry svg.chart[data-field="rssi"]').getAttribute("data-points"), "5");
      const line = await page.locator('#telemetry svg.chart[data-field="temp"] polyline').getAttribute("points");
      assert.equal(line.trim().split(/\s+/).length, 5, "one vertex per reading");
      await shot(page, "device-telemetry", true);
      w.state.closing = true;
      assert.deepEqual(w.problems, []);
    } finally {
      w.state.closing = true;
      await w.context.close();
    }
  });
});
