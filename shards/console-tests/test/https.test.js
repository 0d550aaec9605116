// test/https.test.js: the web console over HTTPS in headless Chromium, the
// relay's certificate signed by a test CA made here with openssl. Chromium
// trusts that CA the way a Linux desktop does: the CA is added to the NSS
// database of the browser's $HOME (~/.pki/nssdb) with certutil (libnss3-tools),
// so certificate checks stay on: no --ignore-certificate-errors, no SPKI
// allow-list. The test checks that the page loads over https, that its live
// link is a wss:// WebSocket that opens, that a controller shows up in the
// fleet, and (as a control) that a browser without the CA refuses the page.

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

import { startRelay } from "../lib/relay.js";
import { SimController } from "../lib/controller.js";

const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const UI_MS = 15000;
const CTL = "ctl-https-1";
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

const run = (cmd, args, opts = {}) => execFileSync(cmd, args, { stdio: ["ignore", "pipe", "pipe"], ...opts });

/**
 * A CA and a certificate for localhost and 127.0.0.1 it signed (ECDSA
 * P-256, 30 days), as PEM files in `dir`.
 */
function makePki(dir) {
  const p = (f) => join(dir, f);
  run("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", p("ca.key"), "-out", p("ca.pem"), "-days", "30",
    "-subj", "/CN=relay console test CA",
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  run("openssl", [
    "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", p("key.pem"), "-out", p("leaf.csr"), "-subj", "/CN=localhost",
  ]);
  writeFileSync(
    p("leaf.ext"),
    [
      "basicConstraints=CA:FALSE",
      "keyUsage=critical,digitalSignature",
      "extendedKeyUsage=serverAuth",
      "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "",
    ].join("\n"),
  );
  run("openssl", [
    "x509", "-req", "-in", p("leaf.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"),
    "-CAcreateserial", "-out", p("cert.pem"), "-days", "30", "-extfile", p("leaf.ext"),
  ]);
  return { ca: p("ca.pem"), cert: p("cert.pem"), key: p("key.pem") };
}

/** A $HOME whose NSS database trusts `caFile` to identify web sites. */
function homeTrusting(dir, caFile) {
  const home = join(dir, "home");
  const db = join(home, ".pki", "nssdb");
  mkdirSync(db, { recursive: true });
  run("certutil", ["-d", `sql:${db}`, "-N", "--empty-password"]);
  run("certutil", ["-d", `sql:${db}`, "-A", "-t", "C,,", "-n", "relay console test CA", "-i", caFile]);
  const listed = run("certutil", ["-d", `sql:${db}`, "-L"]).toString();
  assert.match(listed, /relay console test CA\s+C,,/, listed);
  return home;
}

async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: UI_MS });
  } catch (e) {
    throw new Error(`waiting until ${what}: ${String(e.message).split("\n")[0]}`, { cause: e });
  }
}

describe("relay web console over HTTPS in Chromium", { timeout: 120000 }, () => {
  let dir;
  let pki;
  let relay;
  let ctl;
  let browser;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "relay-console-https-"));
    pki = makePki(dir);
    relay = await startRelay({ tls: { cert: pki.cert, key: pki.key } });
    assert.ok(relay.https, "the relay logs its HTTPS address");
  });

  after(async () => {
    await browser?.close().catch(() => {});
    ctl?.close();
    await relay?.stop();
    if (dir && !process.env.KEEP_RELAY_DIR) rmSync(dir, { recursive: true, force: true });
  });

  it("refuses the page in a browser that does not trust the test CA", async () => {
    const untrusting = mkdtempSync(join(dir, "plain-home-"));
    const b = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      env: { ...process.env, HOME: untrusting },
    });
    try {
      const page = await (await b.newContext()).newPage();
      const port = relay.https.split(":").pop();
      await assert.rejects(page.goto(`https://localhost:${port}/`), /ERR_CERT_AUTHORITY_INVALID/);
    } finally {
      await b.close();
    }
  });

  it("loads the console over https, opens its live link over wss and shows a controller", async () => {
    const home = homeTrusting(dir, pki.ca);
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      env: { ...process.env, HOME: home },
    });
    const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
    const problems = [];
    const sockets = [];
    page.on("console", (m) => m.type() === "error" && problems.push(`console.error: ${m.text()}`));
    page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
    page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()}: ${r.failure()?.errorText}`));
    page.on("websocket", (ws) => sockets.push(ws.url()));

    const port = relay.https.split(":").pop();
    const res = await page.goto(`https://localhost:${port}/`);
    assert.equal(res.status(), 200);
    const security = await res.securityDetails();
    assert.equal(security?.subjectName, "localhost");
    assert.equal(security?.issuer, "relay console test CA");

    await page.locator("#token").fill(relay.token);
    await page.locator("#name").fill("Operator over TLS");
    await page.locator("#signin-button").click();
    await page.locator("#top").waitFor({ state: "visible", timeout: UI_MS });
    await page.locator('#link[data-state="open"]').waitFor({ timeout: UI_MS });
    assert.ok(
      sockets.some((u) => u.startsWith(`wss://localhost:${port}/ws`)),
      `the live link is wss on the HTTPS port: ${JSON.stringify(sockets)}`,
    );
    assert.ok(!sockets.some((u) => u.startsWith("ws:")), `no plaintext WebSocket: ${JSON.stringify(sockets)}`);

    ctl = new SimController(relay.tcp, CTL);
    await ctl.connect();
    ctl.telemetry({ temp: 21 });
    await page.locator(`#fleet-rows tr[data-addr="${CTL}"]`).waitFor({ timeout: UI_MS });
    await until(page, "the controller's row says online", (addr) =>
      document.querySelector(`#fleet-rows tr[data-addr="${addr}"] td:nth-child(2)`)?.textContent.trim() === "online", CTL);
    assert.deepEqual(problems, []);
  });
});
