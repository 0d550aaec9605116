// live.js: the console's own client of the relay, a browser on the WebSocket
// at /ws in the JSON text form (hello in the URL). It sends DATA with an ACK
// request and settles each send on the matching ACK or ERROR, keeps group
// memberships across reconnects, pings on the heartbeat, and reconnects with
// backoff. Frames received are dispatched as "frame" events.

import { randomHex } from "./dom.js";

const MAX_SEQ = 0xffffffff;

/** A refused or lost send: `code` is the relay's error code (`no_route`, ...). */
export class SendError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "SendError";
    this.code = code;
  }
}

export class LiveLink extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.token token sent in the hello ("" for none)
   * @param {string} [o.addr] address to take (default console-<random>)
   * @param {number} [o.ackTimeoutMs] longest wait for an ACK or ERROR
   * @param {number} [o.maxBackoffMs] longest pause between reconnects
   */
  constructor({ token, addr, ackTimeoutMs = 10000, maxBackoffMs = 15000 }) {
    super();
    this.token = token;
    this.addr = addr || `console-${randomHex(4)}`;
    this.ackTimeoutMs = ackTimeoutMs;
    this.maxBackoffMs = maxBackoffMs;
    /** "connecting" | "open" | "closed" | "stopped" */
    this.state = "closed";
    this.message = "";
    this.ws = null;
    this.seq = 0;
    /** seq -> {resolve, reject, timer} of sends waiting for ACK/ERROR. */
    this.pending = new Map();
    /** Groups this client wants to be in; joined again after a reconnect. */
    this.groups = new Set();
    this.backoffMs = 1000;
    this.retryTimer = 0;
    this.pingTimer = 0;
    this.welcome = null;
  }

  /** Opens the link (and keeps it open until stop()). */
  start() {
    if (this.state === "open" || this.state === "connecting") return;
    this.connect();
  }

  /** Closes the link for good; pending sends fail. */
  stop() {
    this.setState("stopped", "");
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    if (this.ws) {
      try {
        this.ws.send(JSON.stringify({ type: "bye" }));
      } catch {
        /* the socket may already be closing */
      }
      this.ws.close(1000);
      this.ws = null;
    }
    this.failPending("closed", "the live link was closed");
  }

  url() {
    const q = new URLSearchParams({ addr: this.addr, role: "browser" });
    if (this.token) q.set("token", this.token);
    const url = new URL(`ws?${q}`, new URL(".", location.href));
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.setState("connecting", "");
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch (e) {
      this.setState("closed", `cannot open the WebSocket: ${e.message}`);
      this.retry();
      return;
    }
    this.ws = ws;
    ws.addEventListener("message", (ev) => {
      if (this.ws === ws) this.onMessage(ev.data);
    });
    ws.addEventListener("close", (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearInterval(this.pingTimer);
      this.failPending("closed", "the live link closed before the relay answered");
      if (this.state === "stopped") return;
      const why = this.message || (ev.reason ? ev.reason : `closed (code ${ev.code})`);
      this.setState("closed", why);
      this.retry();
    });
  }

  retry() {
    if (this.state === "stopped") return;
    const wait = this.backoffMs;
    this.backoffMs = Math.min(this.backoffMs * 2, this.maxBackoffMs);
    this.retryTimer = setTimeout(() => this.connect(), wait);
  }

  onMessage(data) {
    if (typeof data !== "string") return; // the URL hello asks for text frames only
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (!f || typeof f !== "object") return;
    switch (f.type) {
      case "welcome":
        this.welcome = f;
        this.backoffMs = 1000;
        this.setState("open", "");
        this.startPing(f.heartbeat_s);
        for (const g of this.groups) this.joinNow(g);
        break;
      case "ack":
        this.settle(f.seq, null, f);
        break;
      case "error":
        if (f.seq && this.pending.has(f.seq)) {
          this.settle(f.seq, new SendError(f.code || "error", f.message), f);
        } else {
          // A connection-level error (unauthorized, replaced, idle_timeout...).
          this.message = `${f.code || "error"}: ${f.message || ""}`.trim();
          if (f.code === "unauthorized" || f.code === "replaced") {
            this.setState("stopped", this.message);
          }
          this.dispatchEvent(new CustomEvent("relay-error", { detail: f }));
        }
        break;
      case "data":
        this.dispatchEvent(new CustomEvent("frame", { detail: f }));
        break;
      default:
        break; // pong, bye
    }
  }

  startPing(heartbeatS) {
    clearInterval(this.pingTimer);
    const s = Number(heartbeatS) > 0 ? Number(heartbeatS) : 30;
    this.pingTimer = setInterval(() => this.raw({ type: "ping" }), Math.max(1000, (s * 1000) / 2));
  }

  setState(state, message) {
    this.state = state;
    this.message = message;
    this.dispatchEvent(new CustomEvent("status", { detail: { state, message } }));
  }

  raw(obj) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  nextSeq() {
    this.seq = this.seq >= MAX_SEQ ? 1 : this.seq + 1;
    return this.seq;
  }

  /**
   * Sends a frame with an ACK request. Returns `{seq, done}`; `done` resolves
   * with the ACK or rejects with a SendError (relay's ERROR, timeout, link down).
   */
  request(frame) {
    const seq = this.nextSeq();
    const done = new Promise((resolve, reject) => {
      if (this.state !== "open") {
        reject(new SendError("offline", "the live link is not connected"));
        return;
      }
      const timer = setTimeout(
        () => this.settle(seq, new SendError("timeout", `no answer within ${this.ackTimeoutMs / 1000} s`)),
        this.ackTimeoutMs,
      );
      this.pending.set(seq, { resolve, reject, timer });
      if (!this.raw({ ...frame, seq, ack: true })) {
        this.settle(seq, new SendError("offline", "the live link is not connected"));
      }
    });
    return { seq, done };
  }

  /** DATA to `dst` with `payload` (any JSON value). */
  send(dst, payload) {
    return this.request({ type: "data", dst, payload });
  }

  /**
   * Joins `group` now (when connected) and after every reconnect. Each join
   * the relay answers is announced as a "joined" or "join-failed" event.
   */
  join(group) {
    this.groups.add(group);
    if (this.state === "open") this.joinNow(group);
  }

  joinNow(group) {
    this.request({ type: "join", group }).done.then(
      () => this.groups.has(group) && this.dispatchEvent(new CustomEvent("joined", { detail: { group } })),
      (error) =>
        this.groups.has(group) && this.dispatchEvent(new CustomEvent("join-failed", { detail: { group, error } })),
    );
  }

  /** Leaves `group`. */
  leave(group) {
    this.groups.delete(group);
    if (this.state === "open") return this.request({ type: "leave", group }).done;
    return Promise.resolve(null);
  }

  settle(seq, error, frame) {
    const p = this.pending.get(seq);
    if (!p) return;
    this.pending.delete(seq);
    clearTimeout(p.timer);
    if (error) p.reject(error);
    else p.resolve(frame);
  }

  failPending(code, message) {
    for (const seq of [...this.pending.keys()]) this.settle(seq, new SendError(code, message));
  }
}
