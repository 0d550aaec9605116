// lib/relay.js: runs the real `relay` binary for a test. Writes a config file
// (loopback listeners on port 0, an API token, a rules folder) into a fresh
// temporary folder, starts the binary, reads the listening addresses from its
// log, and stops it with SIGTERM (SIGKILL if it does not exit in time).

import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, mkdirSync, writeFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";

const here = dirname(fileURLToPath(import.meta.url));

/** The relay binary: $RELAY_BIN, else the workspace's debug build. */
export const RELAY_BIN = resolve(process.env.RELAY_BIN || join(here, "../../../target/debug/relay"));

/** The MariaDB table the rule writes readings to (addr, at_ms, temp, rssi). */
export const READINGS_TABLE = "console_test_readings";

/**
 * A rule that keeps `temp` in the device shadow, writes every reading to the
 * readings table (when MySQL is on), raises a critical alarm above 80, and a major
 * `<addr>/offline` alarm when a controller of the big fleet (`ctl-2k-`) goes offline.
 */
export const OVERHEAT_RULE = `// Device shadow, readings, overheat and offline alarms for the console tests.
fn on_message(msg) {
    let p = msg.payload;
    if type_of(p) != "map" || !("temp" in p) { return; }
    let t = p.temp;
    state_set(msg.src, "temp", t);
    let row = #{ addr: msg.src, at_ms: msg.time_ms, temp: t };
    if "rssi" in p { row.rssi = p.rssi; }
    persist("${READINGS_TABLE}", row);
    if t > 80 {
        alarm_raise(\`\${msg.src}/overheat\`, "critical", \`\${msg.src} reads \${t} °C\`);
    }
}
fn on_disconnect(client, reason) {
    if client.addr.starts_with("ctl-2k-") {
        alarm_raise(\`\${client.addr}/offline\`, "major", \`\${client.addr} offline (\${reason})\`);
    }
}
`;

const toml = (s) => JSON.stringify(String(s));

/** MariaDB tables the test relay writes alarm history and notifier attempts to. */
export const MYSQL_TABLES = ["console_test_alarm_events", "console_test_notify_attempts", READINGS_TABLE];

/**
 * Drops the test's history tables (the relay creates them again), so the
 * history a test sees is the history of that run only.
 */
function resetMysqlTables() {
  const r = spawnSync(
    "mariadb",
    ["-h127.0.0.1", "-P3306", "-uroot", "test", "-e", `DROP TABLE IF EXISTS ${MYSQL_TABLES.join(", ")}`],
    { encoding: "utf8", timeout: 15000 },
  );
  if (r.error || r.status !== 0) {
    throw new Error(
      `cannot reset the MariaDB tables on 127.0.0.1:3306 (set CONSOLE_TEST_MYSQL=0 to run without MySQL): ${r.error?.message ?? r.stderr}`,
    );
  }
}

/** Strips terminal colour codes from a log line. */
const plain = (line) => line.replace(/\x1b\[[0-9;]*m/g, "");

/**
 * Starts a relay.
 * @param {object} o
 * @param {boolean} [o.mysql] keep alarm history in MariaDB on 127.0.0.1:3306 (db `test`)
 * @param {string} [o.hmacSecret] turn on HMAC auth with this secret (every hello needs a token)
 * @param {number} [o.startTimeoutMs] longest wait for the "relay listening" line
 * @param {number} [o.maxConnections] `[limits] max_connections`
 * @param {string} [o.extraConfig] TOML appended to the config (notifiers, routes)
 * @param {{cert: string, key: string}} [o.tls] serve HTTPS too (`[listeners] http_tls`) with this
 *   certificate and key (PEM files); its address is then `https`
 * @param {boolean} [o.rules] run the rules engine (`[plugins] enabled`; default true)
 * @param {string} [o.name] the node's name (`[node] name`)
 * @param {boolean} [o.mqtt] turn MQTT on (`[listeners] mqtt`, and with it `/mqtt` on the
 *   HTTP port); its address is then `mqtt`
 * @returns {Promise<{http: string, https?: string, mqtt?: string, tcp: string, token: string, dir: string, logs: string[], stop: () => Promise<void>}>}
 */
export async function startRelay({
  mysql = false,
  hmacSecret = "",
  startTimeoutMs = 30000,
  maxConnections = 1000,
  extraConfig = "",
  tls = null,
  rules: rulesOn = true,
  name = "console-test",
  mqtt = false,
} = {}) {
  if (!existsSync(RELAY_BIN)) {
    throw new Error(
      `relay binary not found at ${RELAY_BIN}: run \`cargo build -p relay-shards --bin relay\` or set RELAY_BIN`,
    );
  }
  if (mysql) resetMysqlTables();
  const dir = mkdtempSync(join(tmpdir(), "relay-console-"));
  const rules = join(dir, "rules");
  mkdirSync(rules);
  writeFileSync(join(rules, "overheat.rhai"), OVERHEAT_RULE);
  const token = `console-test-${randomBytes(8).toString("hex")}`;
  const config = [
    "[node]",
    `name = ${toml(name)}`,
    "[listeners]",
    'tcp = "127.0.0.1:0"',
    'http = "127.0.0.1:0"',
    ...(tls ? ['http_tls = "127.0.0.1:0"'] : []),
    ...(mqtt ? ['mqtt = "127.0.0.1:0"'] : []),
    "[shards]",
    "count = 2",
    "pin = false",
    "io_memory_kib = 256",
    "[limits]",
    `max_connections = ${maxConnections}`,
    "[auth]",
    `mode = ${toml(hmacSecret ? "hmac" : "none")}`,
    `secret = ${toml(hmacSecret)}`,
    "[http]",
    `api_token = ${toml(token)}`,
    "console = true",
    "[plugins]",
    `enabled = ${rulesOn}`,
    `dir = ${toml(rules)}`,
    `spool_dir = ${toml(join(dir, "spool"))}`,
    "reload = false",
    "[mysql]",
    `enabled = ${mysql}`,
    'url = "mysql://root@127.0.0.1:3306/test"',
    `alarm_table = ${toml(MYSQL_TABLES[0])}`,
    `notify_table = ${toml(MYSQL_TABLES[1])}`,
    ...(mysql
      ? [
          "[[mysql.tables]]",
          `name = ${toml(READINGS_TABLE)}`,
          'columns = [{ name = "addr", type = "string" }, { name = "at_ms", type = "int" }, { name = "temp", type = "float" }, { name = "rssi", type = "int" }]',
        ]
      : []),
    ...(tls ? ["[tls]", `cert_file = ${toml(tls.cert)}`, `key_file = ${toml(tls.key)}`] : []),
    extraConfig,
    "",
  ].join("\n");
  const configPath = join(dir, "relay.toml");
  writeFileSync(configPath, config);

  const child = spawn(RELAY_BIN, ["--config", configPath], {
    cwd: dir,
    env: { ...process.env, NO_COLOR: "1", RELAY_LOG: process.env.RELAY_LOG || "info" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const logs = [];
  let exited = null;
  const exit = new Promise((res) => child.on("exit", (code, signal) => res((exited = { code, signal }))));

  const listening = new Promise((res, rej) => {
    const timer = setTimeout(
      () =>
        rej(
          new Error(`relay did not log "relay listening" within ${startTimeoutMs} ms:\n${logs.slice(-30).join("\n")}`),
        ),
      startTimeoutMs,
    );
    let buf = "";
    const found = {};
    const onData = (chunk) => {
      buf += chunk.toString("utf8");
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = plain(buf.slice(0, i));
        buf = buf.slice(i + 1);
        logs.push(line);
        if (logs.length > 2000) logs.shift();
        if (process.env.RELAY_ECHO_LOG) process.stderr.write(`[relay] ${line}\n`);
        if (line.includes("relay listening")) {
          const tcp = /tcp_addr=(\S+)/.exec(line);
          const http = /http_addr=(\S+)/.exec(line);
          if (!tcp || !http) {
            clearTimeout(timer);
            rej(new Error(`the "relay listening" line lacks tcp_addr or http_addr: ${line}`));
          } else {
            found.tcp = tcp[1];
            found.http = http[1];
          }
        }
        // With TLS, the HTTPS address comes on a line of its own, right after.
        const https = /http_tls_addr=(\S+)/.exec(line);
        if (https) found.https = https[1];
        const mqttAddr = /mqtt_addr=(\S+)/.exec(line);
        if (mqttAddr) found.mqtt = mqttAddr[1];
        if (found.tcp && found.http && (!tls || found.https) && (!mqtt || found.mqtt)) {
          clearTimeout(timer);
          res({ ...found });
        }
      }
    };
    child.stderr.on("data", onData);
    child.stdout.on("data", onData);
    exit.then(() => {
      clearTimeout(timer);
      rej(new Error(`relay exited (${JSON.stringify(exited)}) before listening:\n${logs.slice(-30).join("\n")}`));
    });
  });

  let addrs;
  try {
    addrs = await listening;
  } catch (e) {
    child.kill("SIGKILL");
    throw e;
  }

  async function stop() {
    if (!exited) {
      child.kill("SIGTERM");
      const killer = setTimeout(() => child.kill("SIGKILL"), 10000);
      await exit;
      clearTimeout(killer);
    }
    if (!process.env.KEEP_RELAY_DIR) rmSync(dir, { recursive: true, force: true });
  }

  return { ...addrs, token, hmacSecret, dir, logs, stop, child };
}

/** An HTTP API call to the relay with its token; returns {status, body}. */
export async function api(relay, method, path, body) {
  const res = await fetch(`http://${relay.http}${path}`, {
    method,
    headers: { Authorization: `Bearer ${relay.token}`, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
    signal: AbortSignal.timeout(10000),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: res.status, body: json };
}
