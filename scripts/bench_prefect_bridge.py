#!/usr/bin/env python3
"""Issue 14's side-by-side benchmark: Prefect's automations evaluated by Prefect, then by Spur.

usage: python3 scripts/bench_prefect_bridge.py [--spur target/release/spur]
       [--python target/test-tools/prefect/bin/python] [--only stock|spur] [--repeats 1]
       [--e2e-n 500] [--noise-automations 1000] [--out target/bench-bridge]

Runs `../shared/bench/prefect_baseline.py` (unchanged: it creates a flow, deployments and
automations through Prefect's REST API, sends `bench.tick` events over the server's
`/api/events/in` websocket and reads the flow runs back) twice, each against a fresh Prefect
3.8.8 server that the driver spawns on a free loopback port with its own PREFECT_HOME and
SQLite file:

- `stock`: Prefect's own triggers service evaluates the automations;
- `spur`:  the same server with `PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=false`, and
  `spur serve --prefect-api http://127.0.0.1:PORT/api` beside it (started first: it retries
  until the server answers), which reads the automations from the server, takes its events
  from `/api/events/out` and creates the flow runs on the server.

Scenarios: `e2e` (a burst of E2E_N events, each should create one flow run), `e2e_paced`
(1 event/s for 30 s) and `noise` (the same again with 1 000 automations loaded). For each
row it prints flow runs created, missing, duplicates, runs/s and the latency from the
event's `occurred` to the flow run's `created` (p50/p99), plus the CPU seconds of the Prefect
server and of Spur over the whole run. Raw JSON goes to OUT/{stock,spur}.json. Only loopback
is used; every phase is bounded by the driver's own timeouts.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "..", "shared", "bench", "prefect_baseline.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU seconds of a live process (and its reaped children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # utime, stime, cutime, cstime are fields 14..17 (1-based); after the ")" split they
    # start at index 11.
    return sum(int(x) for x in fields[11:15]) / ticks


def wait_healthy(url, within):
    end = time.time() + within
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {within} s")


def run_driver(args, mode, port, out_json):
    env = dict(os.environ)
    if mode == "spur":
        env["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] = "false"
    cmd = [
        args.python, DRIVER, "--spawn-prefect", "--port", str(port),
        "--scenarios", args.scenarios, "--repeats", str(args.repeats),
        "--e2e-n", str(args.e2e_n), "--noise-automations", str(args.noise_automations),
        "--json-out", out_json,
    ]
    print(f"[{mode}] {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)


def run(args, mode):
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, f"{mode}.json")
    port = free_port()
    spur = None
    spur_dir = None
    try:
        if mode == "spur":
            spur_dir = tempfile.mkdtemp(prefix="spur-bridge-bench-")
            automations = os.path.join(spur_dir, "automations")
            os.makedirs(automations)
            http_port = free_port()
            log = open(os.path.join(spur_dir, "spur.log"), "w")
            spur = subprocess.Popen(
                [args.spur, "serve", "--http", f"127.0.0.1:{http_port}", "--log-format", "json",
                 "--data", os.path.join(spur_dir, "data"), "--automations", automations,
                 "--prefect-api", f"http://127.0.0.1:{port}/api"],
                stdout=log, stderr=subprocess.STDOUT)
            wait_healthy(f"http://127.0.0.1:{http_port}/healthz", 60)
        rc = run_driver(args, mode, port, out_json)
        spur_cpu = cpu_seconds(spur.pid) if spur else None
    finally:
        if spur:
            spur.send_signal(signal.SIGTERM)
            try:
                spur.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spur.kill()
        if spur_dir and not args.keep:
            shutil.rmtree(spur_dir, ignore_errors=True)
        elif spur_dir:
            print(f"[{mode}] kept {spur_dir}")
    with open(out_json) as f:
        data = json.load(f)
    data["spur_cpu_s"] = spur_cpu
    data["driver_rc"] = rc
    with open(out_json, "w") as f:
        json.dump(data, f, indent=1)
    return data


def table(runs):
    keys = ["flow_runs", "missing", "duplicates", "runs_per_s", "lat_p50_ms", "lat_p99_ms",
            "server_cpu_s"]
    print("\n| engine | scenario | events | " + " | ".join(keys) + " |")
    print("|---|---|---:|" + "---:|" * len(keys))
    for mode, data in runs.items():
        for row in data["results"]:
            if not row["scenario"].startswith("e2e"):
                continue
            cells = [str(row.get(k)) for k in keys]
            print(f"| {mode} | {row['scenario']} | {row['events']} | " + " | ".join(cells) + " |")
    for mode, data in runs.items():
        print(f"{mode}: driver rc {data['driver_rc']}, Spur CPU {data['spur_cpu_s']} s, "
              f"server log {data.get('server_stats')}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spur", default=os.path.join(ROOT, "target", "release", "spur"))
    p.add_argument("--python",
                   default=os.path.join(ROOT, "target", "test-tools", "prefect", "bin", "python"))
    p.add_argument("--only", choices=["stock", "spur"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--scenarios", default="e2e,e2e_paced,noise")
    p.add_argument("--e2e-n", type=int, default=500)
    p.add_argument("--noise-automations", type=int, default=1000)
    p.add_argument("--out", default=os.path.join(ROOT, "target", "bench-bridge"))
    p.add_argument("--keep", action="store_true", help="keep Spur's temp folder (its log)")
    args = p.parse_args()
    if not os.path.exists(DRIVER):
        raise SystemExit(f"no driver at {DRIVER}")
    for path in (args.spur, args.python):
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{path} is missing (cargo build --release -p spur; scripts/provision.sh)")
    runs = {}
    for mode in ([args.only] if args.only else ["stock", "spur"]):
        runs[mode] = run(args, mode)
    table(runs)
    return 0 if all(d["driver_rc"] == 0 for d in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
