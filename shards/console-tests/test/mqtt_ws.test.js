// test/mqtt_ws.test.js: MQTT over WebSocket from a real browser. Headless
// Chromium loads MQTT.js (the npm package's browser bundle) and connects to
// ws://<http>/mqtt; MQTT.js in node connects to the MQTT port over TCP. The
// test checks that messages go both ways between them, that the HTTP API's
// send reaches the browser and lists it as an MQTT client over WebSocket,
// and that a kick reaches the browser as DISCONNECT 0x98.

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import mqtt from "mqtt";

import { startRelay, api } from "../lib/relay.js";

const here = dirname(fileURLToPath(import.meta.url));
const MQTT_BUNDLE = join(here, "../node_modules/mqtt/dist/mqtt.min.js");
const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const UI_MS = 15000;
const WEB_ID = "web-mqtt-1";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * Runs `publish` every 300 ms until `seen()` holds (a subscription reaches
 * the other shard just after SUBACK): at most 30 tries.
 */
async function untilSeen(publish, seen) {
  for (let i = 0; i < 30; i++) {
    await publish();
    const until = Date.now() + 300;
    while (Date.now() < until) {
      if (await seen()) return;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  assert.fail("the message never arrived");
}

describe("MQTT over WebSocket in a browser", () => {
  let relay;
  let browser;
  let page;
  let tcp;

  before(async () => {
    relay = await startRelay({ mqtt: true });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
    page = await browser.newPage();
    // A page the relay serves (Chromium lets only a page from a local
    // address reach a loopback one), with MQTT.js added to it.
    await page.goto(`http://${relay.http}/healthz`);
    await page.addScriptTag({ path: MQTT_BUNDLE });
    tcp = await mqtt.connectAsync(`mqtt://${relay.mqtt}`, {
      clientId: "tcp-node-1",
      protocolVersion: 5,
      reconnectPeriod: 0,
    });
  });

  after(async () => {
    await tcp?.endAsync().catch(() => {});
    await browser?.close();
    await relay?.stop();
  });

  it("connects, subscribes and exchanges messages with a TCP client and the API", async () => {
    const url = `ws://${relay.http}/mqtt`;
    await page.evaluate(
      ({ url, id }) =>
        new Promise((resolve, reject) => {
          window.got = [];
          window.reason = null;
          // The browser bundle's global `mqtt`; it offers the subprotocol `mqtt`.
          const c = window.mqtt.connect(url, {
            clientId: id,
            protocolVersion: 5,
            reconnectPeriod: 0,
            connectTimeout: 10000,
          });
          window.client = c;
          c.on("message", (topic, payload) => window.got.push(`${topic} ${new TextDecoder().decode(payload)}`));
          c.on("disconnect", (packet) => (window.reason = packet.reasonCode));
          c.on("error", (e) => reject(String(e)));
          c.on("close", () => reject("closed before it was subscribed"));
          c.on("connect", () =>
            c.subscribe(["plant/#", "relay/from/#"], { qos: 1 }, (err) => (err ? reject(String(err)) : resolve())),
          );
        }),
      { url, id: WEB_ID },
    );

    // MQTT over TCP -> the browser.
    await untilSeen(
      () => tcp.publishAsync("plant/a/temp", "21.5", { qos: 1 }),
      () => page.evaluate(() => window.got.includes("plant/a/temp 21.5")),
    );

    // The HTTP API -> the browser (on relay/from/<src>).
    const sent = await api(relay, "POST", "/api/v1/send", { dst: WEB_ID, payload: { cmd: "on" }, src: "backend" });
    assert.equal(sent.status, 200, JSON.stringify(sent.body));
    await page.waitForFunction(() => window.got.includes('relay/from/backend {"cmd":"on"}'), null, {
      timeout: UI_MS,
    });

    // The API lists it as an MQTT 5 client over WebSocket.
    const view = await api(relay, "GET", `/api/v1/clients/${WEB_ID}`);
    assert.equal(view.status, 200);
    assert.equal(view.body.protocol, "mqtt");
    assert.equal(view.body.version, "5.0");
    assert.equal(view.body.transport, "websocket");

    // The browser -> MQTT over TCP.
    const fromWeb = [];
    tcp.on("message", (topic, payload) => fromWeb.push(`${topic} ${payload.toString()}`));
    await tcp.subscribeAsync("up/#", { qos: 1 });
    await untilSeen(
      () => page.evaluate(() => window.client.publishAsync("up/web", "hello from chromium", { qos: 1 })),
      () => fromWeb.includes("up/web hello from chromium"),
    );
  });

  it("is told DISCONNECT 0x98 when the API kicks it", async () => {
    const kicked = await api(relay, "DELETE", `/api/v1/clients/${WEB_ID}`);
    assert.equal(kicked.status, 200, JSON.stringify(kicked.body));
    await page.waitForFunction(() => window.reason === 0x98, null, { timeout: UI_MS });
  });
});
