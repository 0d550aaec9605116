// stats.js: reads GET /api/v1/stats into the few numbers the console shows
// (connections per role, per shard, frames, drops, uptime), and turns two
// readings into rates.

const ROLES = ["controller", "browser", "tool", "service"];

const isObj = (v) => v && typeof v === "object" && !Array.isArray(v);
const n = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

/** Sum of the numbers of an object or array (nested one level), or the number itself. */
function total(v) {
  if (n(v) !== null) return v;
  let sum = null;
  const vals = Array.isArray(v) ? v : isObj(v) ? Object.values(v) : [];
  for (const x of vals) {
    const t = n(x) ?? (isObj(x) ? (n(x.count) ?? n(x.total)) : null);
    if (t !== null) sum = (sum ?? 0) + t;
  }
  return sum;
}

/** The first object among `cands` holding a numeric role count. */
function roleMap(cands) {
  for (const c of cands) {
    if (isObj(c) && ROLES.some((r) => n(c[r]) !== null)) return c;
  }
  return null;
}

/**
 * @returns {{byRole: Record<string, number|null>, total: number|null, shards: Array<{index:number, conns:number|null}>,
 *   framesIn: number|null, framesOut: number|null, drops: number|null, uptimeS: number|null}}
 */
export function summarize(s) {
  const st = isObj(s) ? s : {};
  const conns = st.connections;
  const roles =
    roleMap([
      isObj(conns) && conns.by_role,
      isObj(conns) && conns.roles,
      st.by_role,
      st.roles,
      st.connections_by_role,
      conns,
    ]) || {};
  const byRole = Object.fromEntries(ROLES.map((r) => [r, n(roles[r])]));

  let shardList = [];
  const rawShards = (isObj(conns) && conns.by_shard) || st.shards || st.by_shard;
  if (Array.isArray(rawShards)) {
    shardList = rawShards.map((x, i) => ({
      index: isObj(x) && n(x.shard) !== null ? x.shard : i,
      conns: n(x) ?? (isObj(x) ? (n(x.connections) ?? total(x.connections) ?? total(x.by_role) ?? n(x.conns)) : null),
    }));
  } else if (isObj(rawShards)) {
    shardList = Object.entries(rawShards).map(([k, v]) => ({ index: Number(k), conns: n(v) ?? total(v) }));
  }

  const frames = st.frames;
  const framesIn = n(st.frames_in) ?? (isObj(frames) ? n(frames.in) : null);
  const framesOut = n(st.frames_out) ?? (isObj(frames) ? n(frames.out) : null);
  const drops = total(st.drops) ?? n(st.dropped);
  const uptimeS = n(st.uptime_s) ?? (n(st.uptime_ms) !== null ? st.uptime_ms / 1000 : n(st.uptime));
  const roleSum = ROLES.reduce((a, r) => a + (byRole[r] ?? 0), 0);
  const all =
    n(st.connections_total) ??
    (isObj(conns) ? n(conns.total) : n(conns)) ??
    n(st.total) ??
    (ROLES.some((r) => byRole[r] !== null) ? roleSum : null);
  return { byRole, total: all, shards: shardList, framesIn, framesOut, drops, uptimeS };
}

/** Frames per second between two summaries taken `dtMs` apart (null without both). */
export function rate(prev, cur, key, dtMs) {
  if (!prev || !cur || prev[key] === null || cur[key] === null || dtMs <= 0) return null;
  return Math.max(0, ((cur[key] - prev[key]) * 1000) / dtMs);
}
