// api.js: the relay's HTTP API as the console uses it. Every call sends the
// session's bearer token; a 401 calls `onUnauthorized` (back to sign-in) and
// every failure becomes an ApiError with the relay's error code and message.

/** A failed API call: `status` 0 means the relay could not be reached. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** Where the console is served from; API paths are resolved against it so a
 * reverse proxy may mount the relay under a sub-path. */
const BASE = new URL(".", location.href);

/** Percent-encodes one path segment (addresses may hold `:` and `@`, alarm keys `/`). */
const seg = (s) => encodeURIComponent(s);

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** A list response as `{items, next}`, whether the relay sent that or a bare array. */
function list(body) {
  if (Array.isArray(body)) return { items: body, next: null };
  if (body && Array.isArray(body.items)) return { items: body.items, next: body.next ?? null };
  if (body && Array.isArray(body.alarms)) return { items: body.alarms, next: body.next ?? null };
  return { items: [], next: null };
}

export class Api {
  /**
   * @param {string} token bearer token ("" when the relay's API is open)
   * @param {() => void} onUnauthorized called on every 401
   * @param {number} timeoutMs longest wait for one request
   */
  constructor(token, onUnauthorized = () => {}, timeoutMs = 10000) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
    this.timeoutMs = timeoutMs;
  }

  async request(method, path, body) {
    const headers = { Accept: "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.timeoutMs);
    let res;
    try {
      res = await fetch(new URL(path.replace(/^\//, ""), BASE), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: abort.signal,
        cache: "no-store",
      });
    } catch (e) {
      const why = e && e.name === "AbortError" ? "timed out" : "unreachable";
      throw new ApiError(0, "network", `The relay is ${why}`);
    } finally {
      clearTimeout(timer);
    }
    const text = await res.text().catch(() => "");
    let json = null;
    if (text) {
      try {
        json = JSON.parse(text);
      } catch {
        json = null;
      }
    }
    if (!res.ok) {
      if (res.status === 401) this.onUnauthorized();
      const code = (json && json.error) || `http_${res.status}`;
      const message = (json && json.message) || text.slice(0, 200) || res.statusText;
      throw new ApiError(res.status, code, message);
    }
    return json;
  }

  get(path) {
    return this.request("GET", path);
  }

  /** Connections per role and shard, frames, drops, uptime. */
  stats() {
    return this.get("/api/v1/stats");
  }

  /**
   * One page of online clients, each with the `node` holding it: `{items, next,
   * unreachable}` (in a cluster, the whole fleet; `node` keeps one node's).
   */
  async clients({ role, prefix, node, limit = 100, after } = {}) {
    const body = await this.get(`/api/v1/clients${query({ role, prefix, node, limit, after })}`);
    return { ...list(body), unreachable: Array.isArray(body?.unreachable) ? body.unreachable : [] };
  }

  /** The nodes of the cluster (one, outside a cluster): `{items, clustered}`. */
  nodes() {
    return this.get("/api/v1/nodes");
  }

  /** Session of one address (`online`, `role`, `shard`, `connected_at_ms`, ...). */
  client(addr) {
    return this.get(`/api/v1/clients/${seg(addr)}`);
  }

  /** The device shadow of one address: an object of latest values. */
  async state(addr) {
    const body = await this.get(`/api/v1/clients/${seg(addr)}/state`);
    if (body && typeof body === "object" && !Array.isArray(body) && body.state && typeof body.state === "object") {
      return body.state;
    }
    return body || {};
  }

  /** Active alarms of the first page (at most `limit`, filtered like `alarmsPage`). */
  async alarms(filter = {}) {
    return (await this.alarmsPage({ limit: 1000, ...filter })).items;
  }

  /**
   * One page of active alarms, in key order: `{items, next, total, totals}`;
   * `total` counts the matching alarms of every page, `totals` all active ones.
   */
  async alarmsPage({ severity, prefix, acked, limit = 100, after } = {}) {
    const body = await this.get(`/api/v1/alarms${query({ severity, prefix, acked, limit, after })}`);
    const page = list(body);
    return { ...page, total: body?.total ?? page.items.length, totals: body?.totals ?? null };
  }

  /** Acknowledges the alarms `keys`, or (keys null) every unacknowledged one matching `filter`. */
  ackMany(keys, by, filter = {}) {
    return this.request("POST", "/api/v1/alarms/ack", keys ? { keys, by } : { all: true, by, ...filter });
  }

  /** Ends an active alarm now. */
  clearAlarm(key, by) {
    return this.request("POST", `/api/v1/alarms/${seg(key)}/clear`, { by });
  }

  /** Silences an alarm's escalation for `forS` seconds. */
  shelve(key, by, forS) {
    return this.request("POST", `/api/v1/alarms/${seg(key)}/shelve`, { by, for_s: forS });
  }

  /** Ends a shelf early. */
  unshelve(key, by) {
    return this.request("POST", `/api/v1/alarms/${seg(key)}/unshelve`, { by });
  }

  /** One page of the notification log (needs MySQL): `{items, next}`, newest first. */
  async notifications({ key, channel, status, limit = 50, after } = {}) {
    return list(await this.get(`/api/v1/notifications${query({ key, channel, status, limit, after })}`));
  }

  /**
   * One page of the device registry, newest last seen first:
   * `{items, total, offset, next, totals: {devices, online, offline}}`.
   */
  async devices({ status, prefix, role, group, limit = 100, offset = 0 } = {}) {
    const body = await this.get(`/api/v1/devices${query({ status, prefix, role, group, limit, offset })}`);
    return {
      items: Array.isArray(body?.items) ? body.items : [],
      total: body?.total ?? 0,
      offset: body?.offset ?? offset,
      next: body?.next ?? null,
      totals: body?.totals ?? { devices: 0, online: 0, offline: 0 },
    };
  }

  /** One device of the registry (first and last seen, online, last disconnect reason...). */
  device(addr) {
    return this.get(`/api/v1/devices/${seg(addr)}`);
  }

  /** A device's telemetry over time: `{fields, items: [{at_ms, <field>: n}]}`, oldest first. */
  deviceHistory(addr, { table, field, sinceMs, limit = 500 } = {}) {
    return this.get(`/api/v1/devices/${seg(addr)}/history${query({ table, field, since_ms: sinceMs, limit })}`);
  }

  /** Acknowledges alarm `key` in the name of `by`. */
  ack(key, by) {
    return this.request("POST", `/api/v1/alarms/${seg(key)}/ack`, { by });
  }

  /** One page of alarm history (needs MySQL): `{items, next}`. */
  async history({ limit = 50, after } = {}) {
    return list(await this.get(`/api/v1/alarms/history${query({ limit, after })}`));
  }
}
