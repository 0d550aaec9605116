#!/usr/bin/env python3
"""TLS cost, the relay against Mosquitto: the figures of BENCHMARKS.md section
"TLS". Every server is started fresh on ephemeral loopback ports for every run,
plaintext and TLS alike, with a CA and an ECDSA P-256 server certificate made
here by openssl; prints the medians of N runs as Markdown tables and keeps every
JSON report.

    cargo build --release -p relay-shards -p relay-loadtest
    python3 loadtest/bench/compare_tls.py --runs 3 --out bench-tls

Servers: relay-tcp / relay-tls (one shard; controllers on `tcp` / `tcp_tls`,
browsers on `http` / `http_tls`) and mosquitto-tcp / mosquitto-tls (one
listener, plain or with certfile/keyfile/cafile). Pinning as in compare.py: the
server on core 0, the generator on core 1 (--no-pin turns it off). Runs
alternate between the servers (run 1 of every server, then run 2, ...).

Scenarios:
  i  idle: N controllers (default 5,000), heartbeats every 30 s: RSS per connection
  p  p2p: 1,000 controller->browser pairs at a fixed total rate (default 5,000
     msg/s, open loop, every sender on its own evenly spaced schedule), 64 B
     binary payloads: server CPU-us per message, latency percentiles
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (free_port, wait_port, stop, the binaries)

ROOT = compare.ROOT
TARGETS = ["relay-tcp", "relay-tls", "mosquitto-tcp", "mosquitto-tls"]
PIN = True


def make_pki(tmp):
    """A CA and a server certificate for localhost / 127.0.0.1 it signed (ECDSA P-256)."""
    d = Path(tmp)
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    run("openssl", "req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=bench CA", "-days", "2", "-out", str(ca))
    run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    run("openssl", "req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr))
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))
    # Mosquitto started as root drops to its own user, which must read them.
    os.chmod(d, 0o755)
    for f in (ca, cert, key):
        os.chmod(f, 0o644)
    return {"ca": str(ca), "cert": str(cert), "key": str(key)}


def start(target, tmp, pki):
    """Starts a fresh server; returns (process, controllers URL, browsers URL or None)."""
    tls = target.endswith("-tls")
    tcp = compare.free_port()
    if target.startswith("relay"):
        http = compare.free_port()
        env = dict(os.environ)
        env.update({
            "RELAY__SHARDS__COUNT": "1",
            "RELAY__SHARDS__PIN": "true",
            "RELAY__PLUGINS__ENABLED": "false",
            "RELAY__LIMITS__MAX_CONNECTIONS": "19000",
            "RELAY_LOG": "warn",
        })
        if tls:
            # The plain listeners move to ports nobody uses; the clients use the TLS ones.
            env.update({
                "RELAY__LISTENERS__TCP": f"127.0.0.1:{compare.free_port()}",
                "RELAY__LISTENERS__HTTP": f"127.0.0.1:{compare.free_port()}",
                "RELAY__LISTENERS__TCP_TLS": f"127.0.0.1:{tcp}",
                "RELAY__LISTENERS__HTTP_TLS": f"127.0.0.1:{http}",
                "RELAY__TLS__CERT_FILE": pki["cert"],
                "RELAY__TLS__KEY_FILE": pki["key"],
            })
        else:
            env.update({
                "RELAY__LISTENERS__TCP": f"127.0.0.1:{tcp}",
                "RELAY__LISTENERS__HTTP": f"127.0.0.1:{http}",
            })
        cmd = [str(compare.RELAY)]
        if PIN:
            cmd = ["taskset", "-c", "0"] + cmd
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        compare.wait_port(tcp)
        compare.wait_port(http)
        s = "s" if tls else ""
        return p, f"tcp{s}://127.0.0.1:{tcp}", f"ws{s}://127.0.0.1:{http}/ws"
    conf = Path(tmp) / f"mosquitto-{tcp}.conf"
    text = f"listener {tcp} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_type none\n"
    if tls:
        text += f"certfile {pki['cert']}\nkeyfile {pki['key']}\ncafile {pki['ca']}\n"
    conf.write_text(text)
    cmd = ["mosquitto", "-c", str(conf)]
    if PIN:
        cmd = ["taskset", "-c", "0"] + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    compare.wait_port(tcp)
    return p, f"mqtt{'s' if tls else ''}://127.0.0.1:{tcp}", None


def probe(url, ca):
    """Protocol and cipher a TLS listener negotiates with openssl s_client."""
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    r = subprocess.run(["openssl", "s_client", "-connect", hostport, "-CAfile", ca, "-brief"],
                       input="", capture_output=True, text=True, timeout=10)
    keep = [line.strip() for line in (r.stderr + r.stdout).splitlines()
            if line.startswith(("Protocol version", "Ciphersuite", "Verification"))]
    return "; ".join(keep)


def scenario_args(key, args):
    if key == "i":
        return ["-p", "idle", "-n", str(args.idle), "--heartbeat", "30s", "--duration", "5s",
                "--drain", "1s", "--connect-concurrency", "256", "--connect-timeout", "30s"]
    return ["-s", str(ROOT / "config" / "loadtest" / "bench-p2p-20k.toml"),
            "--total-rate", str(args.rate), "--duration", args.duration,
            "--connect-timeout", "30s"]


def run_one(key, target, out_dir, run, tmp, pki, args, probed):
    p, ctl, browsers = start(target, tmp, pki)
    report = out_dir / f"{key}-{target}-{run}.json"
    pin = ["taskset", "-c", "1"] if PIN else []
    cmd = pin + [str(compare.LOADTEST), "--no-progress", "--json", str(report),
                 "--server-pid", str(p.pid)] + scenario_args(key, args) + ["-t", ctl]
    if browsers:
        cmd += ["--browsers", browsers]
    if target.endswith("-tls"):
        cmd += ["--ca-file", pki["ca"]]
    try:
        if target.endswith("-tls") and target not in probed:
            probed[target] = probe(ctl, pki["ca"])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode not in (0, 2, 3) or not report.exists():
            sys.stderr.write(f"{key} {target} run {run} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}\n")
            return None
        if r.returncode != 0:
            sys.stderr.write(f"{key} {target} run {run}: {r.stdout.splitlines()[0]}\n")
    finally:
        compare.stop(p)
    return json.loads(report.read_text())


def figures(key, rep):
    if rep is None:
        return None
    if key == "i":
        server = rep.get("server") or {}
        return {"bytes_per_conn": server.get("bytes_per_connection") or 0.0,
                "connections": (rep.get("connect") or {}).get("established", 0)}
    s = rep["steps"][-1]
    lat = s.get("latency") or {}
    lag = s.get("send_lag") or {}
    server = s.get("server") or {}
    gen = s.get("generator") or {}
    return {
        "received/s": s.get("receive_rate", 0.0),
        "loss": s.get("loss_ratio", 0.0),
        "cpu_us_per_msg": server.get("cpu_us_per_msg", 0.0),
        "p50_ms": lat.get("p50_us", 0) / 1000,
        "p99_ms": lat.get("p99_us", 0) / 1000,
        "send_lag_p99_ms": lag.get("p99_us", 0) / 1000,
        "generator_machine_%": gen.get("machine_percent", 0.0),
    }


def median_of(rows):
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="ip", help="scenario letters: i (idle), p (p2p)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--idle", type=int, default=5000, help="idle controllers (i)")
    ap.add_argument("--rate", type=int, default=5000, help="total msg/s (p)")
    ap.add_argument("--duration", default="15s", help="sending time (p)")
    ap.add_argument("--out", default="bench-tls")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    global PIN
    PIN = not args.no_pin
    compare.PIN = PIN
    for b in (compare.RELAY, compare.LOADTEST):
        if not b.exists():
            sys.exit(f"{b} is missing: cargo build --release -p relay-shards -p relay-loadtest")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = args.targets.split(",")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    results, probed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(tmp)
        for key in args.only:
            rows = {t: [] for t in targets}
            for run in range(1, args.runs + 1):
                for target in targets:
                    print(f"[{time.strftime('%H:%M:%S')}] {key} / {target} / run {run} "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
                    f = figures(key, run_one(key, target, out_dir, run, tmp, pki, args, probed))
                    print(f"    {f}", flush=True)
                    rows[target].append(f)
            for target in targets:
                results[f"{key}/{target}"] = median_of(rows[target])
    print(f"load average at end: {os.getloadavg()}")
    for t, v in probed.items():
        print(f"{t}: {v}")
    (out_dir / "medians.json").write_text(json.dumps({"medians": results, "tls": probed}, indent=1))
    print(f"\nMedians of {args.runs} runs")
    for key in args.only:
        cols = None
        print()
        for target in targets:
            r = results.get(f"{key}/{target}")
            if r is None:
                print(f"| {target} | failed |")
                continue
            if cols is None:
                cols = list(r)
                print("| target | " + " | ".join(cols) + " |")
                print("|---|" + "---|" * len(cols))
            print(f"| {target} | " + " | ".join(f"{r[c]:,.3f}" if isinstance(r[c], float) else f"{r[c]:,}"
                                                 for c in cols) + " |")


if __name__ == "__main__":
    main()
