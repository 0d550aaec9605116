// test/cluster.test.js: the console of one node of a two-node cluster (NATS on
// 127.0.0.1:4222, JetStream on) in headless Chromium. Without rules the fleet
// view lists online clients: it must list the clients of both nodes, each with
// the node holding it, and the node filter must keep one node's clients.

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { randomBytes } from "node:crypto";
import { chromium } from "playwright-core";

import { startRelay, api } from "../lib/relay.js";
import { SimController } from "../lib/controller.js";

const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const UI_MS = 15000;
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"];

/** Fails clearly when NATS is not there. */
function natsUp() {
  return new Promise((res) => {
    const s = net.connect({ host: "127.0.0.1", port: 4222 }, () => {
      s.destroy();
      res(true);
    });
    s.on("error", () => res(false));
  });
}

async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: UI_MS });
  } catch (e) {
    throw new Error(`waiting until ${what}: ${String(e.message).split("\n")[0]}`, { cause: e });
  }
}

describe("the console of one node lists the whole cluster's clients", { timeout: 120000 }, () => {
  const prefix = `console_${randomBytes(4).toString("hex")}`;
  const cluster = `[cluster]\nenabled = true\nnats_url = "nats://127.0.0.1:4222"\nprefix = "${prefix}"\nheartbeat_ms = 1500\n`;
  let n1;
  let n2;
  const ctls = [];
  let browser;

  before(async () => {
    assert.ok(await natsUp(), "NATS is not running on 127.0.0.1:4222; this test needs it");
    n1 = await startRelay({ rules: false, name: "east", extraConfig: cluster });
    n2 = await startRelay({ rules: false, name: "west", extraConfig: cluster });
    for (const [relay, addr] of [
      [n1, "ctl-east-1"],
      [n2, "ctl-west-1"],
      [n2, "ctl-west-2"],
    ]) {
      const c = new SimController(relay.tcp, addr);
      ctls.push(c);
      await c.connect();
    }
    // Each node sees the other.
    const deadline = Date.now() + 20000;
    for (const relay of [n1, n2]) {
      for (;;) {
        const { body } = await api(relay, "GET", "/api/v1/nodes");
        if (body?.items?.length === 2) break;
        assert.ok(Date.now() < deadline, `the nodes did not meet: ${JSON.stringify(body)}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  });

  after(async () => {
    await browser?.close().catch(() => {});
    ctls.forEach((c) => c.close());
    await n1?.stop();
    await n2?.stop();
  });

  it("shows each client with its node and filters by node", async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    const problems = [];
    page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
    try {
      await page.goto(`http://${n1.http}/`);
      await page.locator("#token").fill(n1.token);
      await page.locator("#name").fill("Operator");
      await page.locator("#signin-button").click();
      const rows = () =>
        [...document.querySelectorAll("#fleet-rows tr")].map(
          (tr) => `${tr.dataset.addr}@${tr.querySelector("td.node")?.textContent ?? ""}`,
        );
      await until(
        page,
        "the fleet lists the clients of both nodes with their node",
        (want) =>
          JSON.stringify(
            [...document.querySelectorAll("#fleet-rows tr")].map(
              (tr) => `${tr.dataset.addr}@${tr.querySelector("td.node")?.textContent ?? ""}`,
            ),
          ) === JSON.stringify(want),
        ["ctl-east-1@east", "ctl-west-1@west", "ctl-west-2@west"],
      );
      const heads = await page.locator("table.fleet thead th").allTextContents();
      assert.ok(heads.includes("Node"), `columns: ${heads}`);
      // The node filter is there in a cluster, with both nodes.
      await until(page, "the node filter lists both nodes", () => {
        const s = document.querySelector("#node");
        return s && !s.hidden && [...s.options].map((o) => o.value).join(",") === ",east,west";
      });
      await page.locator("#node").selectOption("west");
      await until(
        page,
        "only west's clients are listed",
        () =>
          [...document.querySelectorAll("#fleet-rows tr")].map((tr) => tr.dataset.addr).join(",") ===
          "ctl-west-1,ctl-west-2",
      );
      assert.match(await page.locator("#fleet-status").textContent(), /on node west/);
      assert.deepEqual(await page.evaluate(rows), ["ctl-west-1@west", "ctl-west-2@west"]);
      assert.deepEqual(problems, []);
    } finally {
      await context.close();
    }
  });
});
