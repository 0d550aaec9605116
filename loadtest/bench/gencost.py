#!/usr/bin/env python3
"""The load generator's own CPU per message: several relay-loadtest builds (or
flag sets) against the same relay, runs alternating, medians of N.

    python3 loadtest/bench/gencost.py --relay target/release/relay \\
        --gen precise=target/release/relay-loadtest \\
        --gen tick1ms="target/release/relay-loadtest --tick 1ms" \\
        --gen old=/path/to/an/older/relay-loadtest --rate 5000 --runs 3

Each run starts a fresh one-shard relay pinned to core 0 and the generator
pinned to core 1, p2p 1,000 pairs (config/loadtest/bench-p2p-20k.toml) at
--rate msg/s, once with a 15 s and once with a 5 s step. The difference of the
tool's whole CPU time (user + system, from wait4) over the difference of
messages sent plus received is its marginal cost per message, free of the
connect phase.
"""

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "config" / "loadtest" / "bench-p2p-20k.toml"


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(relay, gen, rate, dur, out_dir):
    tcp, http = port(), port()
    env = dict(os.environ, RELAY__LISTENERS__TCP=f"127.0.0.1:{tcp}",
               RELAY__LISTENERS__HTTP=f"127.0.0.1:{http}", RELAY__SHARDS__COUNT="1",
               RELAY__SHARDS__PIN="true", RELAY__PLUGINS__ENABLED="false",
               RELAY__LIMITS__MAX_CONNECTIONS="19000", RELAY_LOG="warn")
    server = subprocess.Popen(["taskset", "-c", "0", relay], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", tcp), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        report = Path(out_dir) / f"gen-{rate}-{dur}-{time.monotonic_ns()}.json"
        cmd = ["taskset", "-c", "1"] + gen + [
            "-s", str(SCENARIO), "--no-progress", "--total-rate", str(rate), "-d", dur,
            "--json", str(report), "--server-pid", str(server.pid),
            "-t", f"tcp://127.0.0.1:{tcp}", "--browsers", f"ws://127.0.0.1:{http}/ws"]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, _, usage = os.wait4(p.pid, 0)
    finally:
        server.terminate()
        server.wait()
    step = json.loads(report.read_text())["steps"][0]
    return usage.ru_utime + usage.ru_stime, step["sent"] + step["received"], step["latency"]["p50_us"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relay", default=str(ROOT / "target" / "release" / "relay"))
    ap.add_argument("--gen", action="append", required=True, help="name=command (repeatable)")
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    gens = {}
    for g in a.gen:
        name, _, cmd = g.partition("=")
        gens[name] = shlex.split(cmd)
    res = {}
    with tempfile.TemporaryDirectory() as out:
        for i in range(a.runs):
            for name, gen in gens.items():
                c15, m15, p50 = run(a.relay, gen, a.rate, "15s", out)
                c5, m5, _ = run(a.relay, gen, a.rate, "5s", out)
                per = (c15 - c5) / max(1, m15 - m5) * 1e6
                res.setdefault(name, []).append((per, p50))
                print(f"run {i + 1} {name:20} {per:6.1f} CPU-us per message sent or received; p50 {p50} us", flush=True)
    print(f"\nmedians at {a.rate} msg/s")
    print("| generator | CPU-us per message sent or received | p50 from the intended time |")
    print("|---|---|---|")
    for name, v in res.items():
        print(f"| {name} | {statistics.median(x[0] for x in v):.1f} | {statistics.median(x[1] for x in v)} us |")


if __name__ == "__main__":
    main()
