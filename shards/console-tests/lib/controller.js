// lib/controller.js: a simulated controller on the relay's TCP port, speaking
// the JSON form (one object per line). It says hello with its address, answers
// every DATA with {"ok": true, "echo": <payload>} sent back to the sender,
// publishes telemetry, and pings on the heartbeat.

import net from "node:net";
import { createHmac } from "node:crypto";

/** The HMAC token of `addr` under `secret` (hex of HMAC-SHA256), as the relay checks it. */
export function tokenFor(secret, addr) {
  return createHmac("sha256", secret).update(addr).digest("hex");
}

export class SimController {
  /**
   * @param {string} tcp relay's TCP address, host:port
   * @param {string} addr the controller's address
   * @param {string} [token] hello token (needed when the relay runs HMAC auth)
   */
  constructor(tcp, addr, token = "") {
    this.tcp = tcp;
    this.addr = addr;
    this.token = token;
    /** Every frame received, in order. */
    this.received = [];
    this.socket = null;
    this.timers = [];
    this.welcome = null;
  }

  /** Connects and resolves on WELCOME (rejects after `timeoutMs`). */
  connect(timeoutMs = 10000) {
    const i = this.tcp.lastIndexOf(":");
    const host = this.tcp.slice(0, i);
    const port = Number(this.tcp.slice(i + 1));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.addr}: no WELCOME within ${timeoutMs} ms`)), timeoutMs);
      const socket = net.connect({ host, port }, () => {
        const hello = { type: "hello", addr: this.addr, role: "controller", meta: { model: "sim", fw: "1.0.0" } };
        if (this.token) hello.token = this.token;
        this.write(hello);
      });
      this.socket = socket;
      socket.setNoDelay(true);
      socket.on("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      let buf = "";
      socket.on("data", (chunk) => {
        buf += chunk.toString("utf8");
        let n;
        while ((n = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, n).trim();
          buf = buf.slice(n + 1);
          if (!line) continue;
          let f;
          try {
            f = JSON.parse(line);
          } catch {
            continue;
          }
          this.received.push(f);
          if (f.type === "welcome") {
            this.welcome = f;
            clearTimeout(timer);
            const beat = Math.max(1, Number(f.heartbeat_s) || 30) * 500;
            this.timers.push(setInterval(() => this.write({ type: "ping" }), beat));
            resolve(f);
          } else if (f.type === "error" && !this.welcome) {
            clearTimeout(timer);
            reject(new Error(`${this.addr}: hello refused: ${f.code} ${f.message}`));
          } else if (f.type === "data" && f.src && f.src !== this.addr && !f.group) {
            this.write({ type: "data", dst: f.src, payload: { ok: true, echo: f.payload ?? null } });
          }
        }
      });
    });
  }

  write(obj) {
    if (this.socket && !this.socket.destroyed) this.socket.write(JSON.stringify(obj) + "\n");
  }

  /** Publishes one reading to the `telemetry` group. */
  telemetry(payload) {
    this.write({ type: "publish", group: "telemetry", payload });
  }

  /** Publishes `payload()` every `everyMs` until close(). */
  every(everyMs, payload) {
    this.timers.push(setInterval(() => this.telemetry(payload()), everyMs));
  }

  close() {
    this.timers.forEach(clearInterval);
    this.timers = [];
    if (this.socket && !this.socket.destroyed) {
      this.write({ type: "bye" });
      this.socket.end();
      this.socket.destroy();
    }
  }
}
