#!/usr/bin/env python3
"""Same-node against cross-node delivery in a two-node relay cluster: the
relays' CPU per delivered message and the latency, measured with
relay-loadtest, runs alternating, medians of N.

    python3 loadtest/bench/cluster.py --runs 3 --rate 5000 --duration 15s

Needs a NATS server with JetStream (`nats-server -js`) at --nats, the relay and
relay-loadtest binaries (release builds by default). Each run starts two fresh
relay nodes of one cluster (one shard each, under a cluster prefix of their
own; node A pinned to core 0 and node B to core 1 when `taskset` is there and
the machine has 3 cores or more, the generator on the others), waits until
they see each other, then runs the same scenario twice:

- same: every client on node A (`--target` A): both ends of each pair on one
  node, the cluster link idle;
- cross: clients round-robin over A and B (`--target` A `--target` B): with
  the p2p and command patterns every pair crosses nodes, each frame goes
  through NATS.

Both relays are sampled in both configurations (node A as the server, node B
and the NATS server with `--watch`), so the figures compare the same two
processes. CPU per message is (CPU of A + CPU of B) over the messages the
clients received in the step; the NATS server's CPU is given apart (it may
serve others). The whole script stops after --max-minutes; each load run is
bounded by its duration plus a margin.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "config" / "loadtest" / "bench-p2p-20k.toml"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(d):
    d = d.strip()
    for suffix, k in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if d.endswith(suffix):
            return float(d[: -len(suffix)]) * k
    return float(d)


def nats_port(url):
    return int(url.rsplit(":", 1)[1].split("/")[0]) if ":" in url.split("//", 1)[-1] else 4222


class Node:
    def __init__(self, relay, name, prefix, nats, cpu):
        self.name = name
        self.tcp, self.http = free_port(), free_port()
        env = dict(
            os.environ,
            RELAY__NODE__NAME=name,
            RELAY__LISTENERS__TCP=f"127.0.0.1:{self.tcp}",
            RELAY__LISTENERS__HTTP=f"127.0.0.1:{self.http}",
            RELAY__SHARDS__COUNT="1",
            RELAY__SHARDS__PIN="false",
            RELAY__PLUGINS__ENABLED="false",
            RELAY__LIMITS__MAX_CONNECTIONS="19000",
            RELAY__CLUSTER__ENABLED="true",
            RELAY__CLUSTER__NATS_URL=nats,
            RELAY__CLUSTER__PREFIX=prefix,
            RELAY_LOG="warn",
        )
        cmd = ([shutil.which("taskset"), "-c", str(cpu)] if cpu is not None else []) + [relay]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def why(self):
        """The node's last words, when it exited."""
        if self.proc.poll() is None:
            return ""
        self.log.seek(0)
        return f"{self.name} exited: {self.log.read()[-2000:].decode(errors='replace')}"

    def nodes(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/api/v1/nodes", timeout=2) as r:
                return len(json.load(r).get("items", []))
        except OSError:
            return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_run(a, prefix, out_dir, label, cpus):
    """Starts two nodes, runs `same` and `cross`, returns {config: figures}."""
    nodes = [Node(a.relay, n, prefix, a.nats, c) for n, c in zip(("bench-a", "bench-b"), cpus)]
    try:
        deadline = time.monotonic() + 30
        while not all(n.nodes() == 2 for n in nodes):
            gone = [n.why() for n in nodes if n.why()]
            if gone:
                raise SystemExit("\n".join(gone))
            if time.monotonic() > deadline:
                raise SystemExit("the two nodes did not see each other within 30 s (is NATS up with -js?)")
            time.sleep(0.1)
        na, nb = nodes
        res = {}
        for config in ("same", "cross"):
            targets = [na] if config == "same" else [na, nb]
            report = Path(out_dir) / f"{label}-{config}.json"
            cmd = ([shutil.which("taskset"), "-c", cpus[2]] if cpus[2] else []) + [
                a.loadtest, "-s", str(a.scenario), "--no-progress", "--json", str(report),
                "--total-rate", str(a.rate), "-d", a.duration, "--prefix", f"{prefix}-{config}",
                "--server-pid", str(na.proc.pid), "--watch", f"nodeb={nb.proc.pid}",
                "--watch", f"nats=:{nats_port(a.nats)}"]
            for n in targets:
                cmd += ["--target", f"tcp://127.0.0.1:{n.tcp}", "--browsers", f"ws://127.0.0.1:{n.http}/ws"]
            if a.controllers:
                cmd += ["-n", str(a.controllers)]
            limit = seconds(a.duration) + 120
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=limit)
            r = json.loads(report.read_text())
            step = r["steps"][0]
            server = step.get("server") or {}
            watched = step.get("watched", {})
            relays = server.get("cpu_s", 0.0) + watched.get("nodeb", {}).get("cpu_s", 0.0)
            nats = watched.get("nats", {}).get("cpu_s")
            got = max(1, step["received"])
            spread = r["target"].get("spread") or {}
            res[config] = {
                "relay_us_per_msg": relays / got * 1e6,
                "nats_us_per_msg": None if nats is None else nats / got * 1e6,
                "p50_us": step["latency"]["p50_us"],
                "p99_us": step["latency"]["p99_us"],
                "loss": step["loss_ratio"],
                "cross_pairs": spread.get("cross_pairs", 0),
                "pairs": spread.get("pairs", 0),
            }
        return res
    finally:
        for n in nodes:
            n.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relay", default=str(ROOT / "target" / "release" / "relay"))
    ap.add_argument("--loadtest", default=str(ROOT / "target" / "release" / "relay-loadtest"))
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--scenario", default=str(SCENARIO), help="relay-loadtest scenario (p2p pairs by default)")
    ap.add_argument("--controllers", type=int, default=0, help="override the scenario's controllers (-n)")
    ap.add_argument("--rate", type=int, default=5000, help="messages per second for the whole fleet")
    ap.add_argument("--duration", default="15s", help="length of each measured step")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-minutes", type=float, default=20.0, help="stop starting runs after this long")
    ap.add_argument("--out", default=None, help="keep the JSON reports here")
    a = ap.parse_args()
    for b in (a.relay, a.loadtest):
        if not Path(b).exists():
            sys.exit(f"{b} is missing: cargo build --release -p relay-shards -p relay-loadtest")
    cores = os.cpu_count() or 1
    pin = shutil.which("taskset") is not None and cores >= 3
    cpus = (0, 1, f"2-{cores - 1}") if pin else (None, None, None)
    stop_at = time.monotonic() + a.max_minutes * 60
    out_dir = a.out or tempfile.mkdtemp(prefix="cluster-bench-")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    results = {"same": [], "cross": []}
    for i in range(a.runs):
        if time.monotonic() > stop_at:
            print(f"stopping after {i} runs: --max-minutes reached", flush=True)
            break
        prefix = f"bench{os.getpid()}r{i}"
        res = one_run(a, prefix, out_dir, f"run{i + 1}", cpus)
        for config, v in res.items():
            results[config].append(v)
            nats = "n/a" if v["nats_us_per_msg"] is None else f"{v['nats_us_per_msg']:.2f}"
            print(f"run {i + 1} {config:5}: relays {v['relay_us_per_msg']:.2f} CPU-us/msg, NATS {nats}, "
                  f"p50 {v['p50_us']} us, p99 {v['p99_us']} us, loss {v['loss']:.4f}, "
                  f"{v['cross_pairs']} of {v['pairs']} pairs cross", flush=True)
    if not results["same"]:
        return
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    print(f"\nmedians of {len(results['same'])} runs at {a.rate} msg/s, {a.duration} steps; reports in {out_dir}")
    print("| placement | relays' CPU-us per delivered message | NATS CPU-us per message | p50 | p99 |")
    print("|---|---|---|---|---|")
    for config, v in results.items():
        nats = [x["nats_us_per_msg"] for x in v if x["nats_us_per_msg"] is not None]
        print(f"| {config} | {med([x['relay_us_per_msg'] for x in v]):.2f} | "
              f"{med(nats):.2f} | {med([x['p50_us'] for x in v]):.0f} us | {med([x['p99_us'] for x in v]):.0f} us |")


if __name__ == "__main__":
    main()
