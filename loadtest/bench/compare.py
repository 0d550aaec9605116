#!/usr/bin/env python3
"""The benchmark matrix of BENCHMARKS.md: the relay (one shard pinned to one
core, and two shards) and Mosquitto, the same relay-loadtest scenarios against
each, started fresh on ephemeral loopback ports for every run; prints the
medians of N runs as a Markdown table and keeps every JSON report.

    cargo build --release -p relay-shards -p relay-loadtest
    python3 loadtest/bench/compare.py --runs 3 --out bench-results

Pinning (on by default, --no-pin to turn it off): the server runs on core 0 and
the generator on core 1 (`taskset`), so they do not take each other's CPU; relay-2
(two shards) needs both cores and is left unpinned. Runs alternate between the
servers (run 1 of every server, then run 2, ...) so that a change in the
machine's background load hits all of them alike.

Scenarios (config/loadtest/bench-*.toml):
  a  p2p, 1,000 pairs, 64 B, highest rate with p99 < 10 ms and loss < 0.1% (find-max)
  b  p2p, 1,000 pairs, fixed 20,000 msg/s: latency percentiles
  c  fan-out, 1 publisher -> 1,000 members
  d  fan-in, 1,000 controllers -> 1 dashboard
  e  18,000 idle controllers, 30 s heartbeats: bytes per connection
  f  p2p at a fixed 50,000 msg/s: server CPU-us per message
  g  p2p at a fixed 5,000 msg/s (sparse arrivals: most messages wake the server)
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("RELAY_BIN_DIR", ROOT / "target" / "release"))
RELAY = BIN_DIR / "relay"
LOADTEST = BIN_DIR / "relay-loadtest"
PIN = True

SCENARIOS = {
    "a": ("p2p 1,000 pairs, max rate (p99 < 10 ms)", "bench-p2p-1000-max.toml", ["--step-duration", "5s"]),
    "b": ("p2p 1,000 pairs at 20,000 msg/s", "bench-p2p-20k.toml", ["--duration", "15s"]),
    "c": ("fan-out 1 -> 1,000", "bench-fanout-1000.toml", ["--duration", "15s"]),
    "d": ("fan-in 1,000 -> 1", "bench-fanin-1000.toml", ["--duration", "15s"]),
    "e": ("18,000 idle controllers", "bench-idle-18000.toml", ["--duration", "20s"]),
    "f": ("p2p at 50,000 msg/s", "bench-p2p-50k.toml", ["--duration", "15s"]),
    "g": ("p2p 1,000 pairs at 5,000 msg/s (sparse)", "bench-p2p-20k.toml", ["--duration", "15s", "--total-rate", "5000"]),
}

TARGETS = ["relay-1", "relay-2", "mosquitto"]
# Also accepted: "relay-mqtt", the relay (one shard) with its MQTT listener, driven
# by the same MQTT clients as Mosquitto. A relay target ending in "-uring" or
# "-epoll" (relay-1-uring, relay-2-epoll, relay-mqtt-uring) runs that I/O backend
# ([shards] io); without the suffix the relay runs its default. A further
# "-c<us>" sets [shards] coalesce_us (relay-1-c0, relay-1-uring-c2000), and
# "-s<us>" sets [shards] slice_us (relay-1-s0-c0).


def knob(target, letter):
    """The relay target without its "-<letter><us>" suffix, and that number (or None)."""
    parts = target.split("-")
    if not target.startswith("relay"):
        return target, None
    for i, part in enumerate(parts[1:], 1):
        if part[:1] == letter and part[1:].isdigit():
            return "-".join(parts[:i] + parts[i + 1:]), part[1:]
    return target, None


def coalesce(target):
    """The relay target without a "-c<us>" or "-s<us>" suffix, and its [shards] coalesce_us (or None)."""
    target, _ = knob(target, "s")
    return knob(target, "c")


def backend(target):
    """The relay target without its I/O backend and coalesce suffixes, and the backend (or None)."""
    target, _ = coalesce(target)
    for io in ("uring", "epoll"):
        if target.endswith("-" + io):
            return target[: -len(io) - 1], io
    return target, None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline_s=20):
    until = time.time() + deadline_s
    while time.time() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start(target, tmp):
    """Starts a fresh server; returns (process, tcp port, http port or None)."""
    tcp = free_port()
    if target.startswith("relay"):
        _, us = coalesce(target)
        _, slice_us = knob(target, "s")
        target, io = backend(target)
        http = free_port()
        mqtt = target == "relay-mqtt"
        env = dict(os.environ)
        if io:
            env["RELAY__SHARDS__IO"] = io
        if us is not None:
            env["RELAY__SHARDS__COALESCE_US"] = us
        if slice_us is not None:
            env["RELAY__SHARDS__SLICE_US"] = slice_us
        env.update({
            "RELAY__LISTENERS__TCP": f"127.0.0.1:{free_port() if mqtt else tcp}",
            "RELAY__LISTENERS__HTTP": f"127.0.0.1:{http}",
            "RELAY__SHARDS__COUNT": "1" if mqtt else target.split("-")[1],
            "RELAY__SHARDS__PIN": "true",
            "RELAY__PLUGINS__ENABLED": "false",
            "RELAY__LIMITS__MAX_CONNECTIONS": "19000",
            "RELAY_LOG": "warn",
        })
        if mqtt:
            env["RELAY__LISTENERS__MQTT"] = f"127.0.0.1:{tcp}"
        cmd = [str(RELAY)]
        if PIN and target in ("relay-1", "relay-mqtt"):
            cmd = ["taskset", "-c", "0"] + cmd
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(tcp)
        return p, tcp, None if mqtt else http
    conf = Path(tmp) / f"mosquitto-{tcp}.conf"
    conf.write_text(
        f"listener {tcp} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_type none\n"
    )
    cmd = ["mosquitto", "-c", str(conf)]
    if PIN:
        cmd = ["taskset", "-c", "0"] + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(tcp)
    return p, tcp, None


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run_one(key, target, out_dir, run, tmp):
    _, file, extra = SCENARIOS[key]
    p, tcp, http = start(target, tmp)
    report = out_dir / f"{key}-{target}-{run}.json"
    pin = ["taskset", "-c", "1"] if PIN and backend(target)[0] != "relay-2" else []
    cmd = pin + [str(LOADTEST), "-s", str(ROOT / "config" / "loadtest" / file), "--no-progress",
           "--json", str(report), "--html", str(report.with_suffix(".html")), "--server-pid", str(p.pid)] + extra
    if http is None:
        cmd += ["-t", f"mqtt://127.0.0.1:{tcp}"]
    else:
        cmd += ["-t", f"tcp://127.0.0.1:{tcp}"]
        cmd += ["--browsers", f"ws://127.0.0.1:{http}/ws"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        # 2: the run failed (connections, losses), 3: it missed the SLO; the report is
        # still written and its figures are kept (the table shows the loss).
        if r.returncode not in (0, 2, 3) or not report.exists():
            sys.stderr.write(f"{key} {target} run {run} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}\n")
            return None
        if r.returncode != 0:
            sys.stderr.write(f"{key} {target} run {run}: {r.stdout.splitlines()[0]}\n")
    finally:
        stop(p)
    return json.loads(report.read_text())


def figures(key, rep):
    """The figures of one report that the table shows."""
    if rep is None:
        return None
    steps = rep.get("steps") or []
    if key == "a":
        fm = rep.get("find_max") or {}
        best = fm.get("best") or {}
        return {"max_rate": float(best.get("rate", 0.0)), "p99_ms_at_max": best.get("p99_us", 0) / 1000}
    s = steps[-1]
    lat = s.get("latency") or {}
    server = s.get("server") or {}
    sent = s.get("latency_from_sent") or {}
    lag = s.get("send_lag") or {}
    gen = s.get("generator") or {}
    out = {
        "received/s": s.get("receive_rate", 0.0),
        "loss": s.get("loss_ratio", 0.0),
        "p50_ms": lat.get("p50_us", 0) / 1000,
        "p99_ms": lat.get("p99_us", 0) / 1000,
        "p99.9_ms": lat.get("p999_us", 0) / 1000,
        "p50_from_sent_ms": sent.get("p50_us", 0) / 1000,
        "send_lag_p50_ms": lag.get("p50_us", 0) / 1000,
        "send_lag_p99_ms": lag.get("p99_us", 0) / 1000,
        "cpu_us_per_msg": server.get("cpu_us_per_msg", 0.0),
        "generator_machine_%": gen.get("machine_percent", 0.0),
    }
    if key == "e":
        out = {"bytes_per_conn": (rep.get("server") or {}).get("bytes_per_connection", 0.0),
               "connections": (rep.get("connect") or {}).get("established", 0)}
    return out


def median_of(rows):
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def summarize(folder, only, targets, runs):
    results = {}
    for key in only:
        for target in targets:
            rows = []
            for run in range(1, runs + 1):
                f = folder / f"{key}-{target}-{run}.json"
                rows.append(figures(key, json.loads(f.read_text())) if f.exists() else None)
            results[(key, target)] = median_of(rows)
    print_tables(results, only, targets, runs)


def print_tables(results, only, targets, runs):
    print(f"Medians of {runs} runs; `python3 loadtest/bench/compare.py --runs {runs}`")
    for key in only:
        print(f"\n({key}) {SCENARIOS[key][0]}\n")
        cols = None
        for target in targets:
            r = results.get((key, target))
            if r is None:
                print(f"| {target} | failed |")
                continue
            if cols is None:
                cols = list(r)
                print("| target | " + " | ".join(cols) + " |")
                print("|---|" + "---|" * len(cols))
            print(f"| {target} | " + " | ".join(f"{r[c]:,.3f}" if isinstance(r[c], float) else f"{r[c]:,}" for c in cols) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="abcdef", help="scenario letters, e.g. bf")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--from", dest="source", help="summarize the reports already in this folder instead of running")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and the generator to cores")
    args = ap.parse_args()
    global PIN
    PIN = not args.no_pin
    if args.source:
        summarize(Path(args.source), args.only, args.targets.split(","), args.runs)
        return
    for b in (RELAY, LOADTEST):
        if not b.exists():
            sys.exit(f"{b} is missing: cargo build --release -p relay-shards -p relay-loadtest")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = args.targets.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.only:
            rows = {t: [] for t in targets}
            for run in range(1, args.runs + 1):
                for target in targets:
                    print(f"[{time.strftime('%H:%M:%S')}] {key} {SCENARIOS[key][0]} / {target} / run {run}", flush=True)
                    rows[target].append(figures(key, run_one(key, target, out_dir, run, tmp)))
            for target in targets:
                results[(key, target)] = median_of(rows[target])
    (out_dir / "medians.json").write_text(json.dumps({f"{k}/{t}": v for (k, t), v in results.items()}, indent=1))
    print()
    print_tables(results, args.only, targets, args.runs)


if __name__ == "__main__":
    main()
