#!/usr/bin/env bash
# HTTP round trips on a busy shard (BENCHMARKS.md, "HTTP on a busy shard").
#
#   bash loadtest/bench/http_busy.sh [relay binary]
#
# Starts the relay (one shard, pinned to core 0; [shards] settings from the
# environment, e.g. RELAY__SHARDS__COALESCE_US=0, RELAY__SHARDS__SLICE_US=0) on
# ephemeral loopback ports, loads it with 1,000 pairs at 10,000 msg/s from
# relay-loadtest on core 1, and from the 6th second times 300 GET /healthz, each
# on a new connection, 30 ms apart, from core 1. Prints the round trips' p50,
# p90 and p99, the busy-wait counters and the messages' p50 and server CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RELAY=${1:-target/release/relay}
LOADTEST=target/release/relay-loadtest
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
TCP=$(port)
HTTP=$(port)
OUT=$(mktemp -d)
RELAY__SHARDS__COUNT=1 RELAY__SHARDS__PIN=true RELAY__PLUGINS__ENABLED=false RELAY_LOG=warn \
RELAY__LISTENERS__TCP=127.0.0.1:$TCP RELAY__LISTENERS__HTTP=127.0.0.1:$HTTP \
    taskset -c 0 "$RELAY" &
PID=$!
trap 'kill $PID 2>/dev/null; rm -rf "$OUT"' EXIT
sleep 1
taskset -c 1 "$LOADTEST" -s config/loadtest/bench-p2p-20k.toml --total-rate 10000 \
    --duration 14s --no-progress --json "$OUT/report.json" --server-pid "$PID" \
    -t "tcp://127.0.0.1:$TCP" --browsers "ws://127.0.0.1:$HTTP/ws" >"$OUT/loadtest.out" 2>&1 &
LT=$!
sleep 6
taskset -c 1 python3 - "$HTTP" <<'PY'
import socket, sys, time
port = int(sys.argv[1])
lat = []
for _ in range(300):
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
    while s.recv(4096):
        pass
    s.close()
    lat.append((time.perf_counter() - t) * 1000)
    time.sleep(0.03)
lat.sort()
q = lambda p: lat[int(p * (len(lat) - 1))]
print("http p50 %.2f p90 %.2f p99 %.2f ms" % (q(0.5), q(0.9), q(0.99)))
PY
wait "$LT" || true
curl -s "http://127.0.0.1:$HTTP/metrics" | grep -E '^relay_busy_waits' || true
python3 - "$OUT/report.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["steps"][-1]
print("messages p50 %.3f ms, server %.2f CPU-us per message" % (s["latency"]["p50_us"] / 1000, s["server"]["cpu_us_per_msg"]))
PY
