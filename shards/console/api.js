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

  /** One page of online clients: `{items, next}`. */
  async clients({ role, prefix, limit = 100, after } = {}) {
    return list(await this.get(`/api/v1/clients${query({ role, prefix, limit, after })}`));
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

  /** Active alarms. */
  async alarms() {
    return list(await this.get("/api/v1/alarms")).items;
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
