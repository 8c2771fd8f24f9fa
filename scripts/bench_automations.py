#!/usr/bin/env python3
"""End-to-end driver for issue 23: Spur with 1 000 / 10 000 / 100 000 automations.

usage: python3 scripts/bench_automations.py [--counts 1000,10000,100000] [--events 60000]
       [--spur target/release/spur] [--prefect-cli PATH]

For each count N it writes one file of N automations of the issue's shape (reactive, one
event name and one resource filter each, `do-nothing`) into a fresh temp folder, starts
`spur serve` on a free loopback port with its own data folder, and measures in that one run:

- load: from the process start to the first answer of /healthz (the automations are loaded
  before the HTTP listener opens);
- RSS after load (VmRSS of the process);
- ingest -> all fired: EVENTS events over `POST /api/events` (batches of 500, pre-encoded),
  10 % of which fire, until `spur_firings_triggered_total` reaches the expected count;
- p50/p99 of one page of each listing API: `GET /api/automations?limit=50`, Prefect's
  `POST /api/automations/filter {"limit": 10}` and `GET /api/automations?name=tenant-5&limit=50`
  (a name-prefix search, as the UI's search box sends it), 200 requests each;
- `prefect automation ls` against Spur (when the Prefect CLI is given or found), wall time;
- reload of a 10-automation file beside the N others: the loader's `read_ms` and the
  pipeline's `swap_ms` from the daemon's JSON log;
- checkpoint: the last checkpoint's size (`spur_checkpoint_bytes`) and the mean pipeline time
  per checkpoint (`spur_checkpoint_seconds`).

Every figure is also printed as a ratio to the first (smallest) count's row of the same run,
because absolute times on this shared machine swing from run to run. Only loopback is used;
every wait is bounded.
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc):
    """SIGTERM, then SIGKILL if it has not ended within 30 s (the other drivers use it too)."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def write_automations(path, n, prefix="tenant"):
    with open(path, "w") as f:
        f.write("automations:\n")
        for i in range(n):
            f.write(
                f"  - name: {prefix}-{i}\n"
                f"    trigger:\n"
                f"      expect: [\"{prefix}.{i}.job.failed\"]\n"
                f"      match: {{\"prefect.resource.id\": \"{prefix}.{i}.job\"}}\n"
                f"      posture: Reactive\n"
                f"      threshold: 1\n"
                f"    actions:\n"
                f"      - type: do-nothing\n"
            )


class Spur:
    def __init__(self, binary, n, workdir):
        self.port = free_port()
        self.auto = os.path.join(workdir, "automations")
        os.makedirs(self.auto)
        write_automations(os.path.join(self.auto, "many.yaml"), n)
        self.log_lines = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [binary, "serve", "--automations", self.auto, "--data", os.path.join(workdir, "data"),
             "--http", f"127.0.0.1:{self.port}", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=workdir,
            env={**os.environ, "SPUR_CONFIG": os.devnull},
        )
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self):
        for line in self.proc.stderr:
            self.log_lines.append(line)

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def wait_ready(self, limit=300):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit("spur exited:\n" + "".join(self.log_lines[-20:]))
            try:
                c = self.conn()
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.02)
        sys.exit("spur did not get ready")

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name):
        c = self.conn()
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log_field(self, message, field, after=0):
        for line in self.log_lines[after:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            fields = entry.get("fields", entry)
            if message in str(fields.get("message", "")) and field in fields:
                return float(fields[field])
        return None

    def stop(self):
        stop_process(self.proc)


def ingest(spur, n, events):
    rng = random.Random(23)
    bodies, fire = [], 0
    for start in range(0, events, 500):
        batch = []
        for j in range(start, min(events, start + 500)):
            k = rng.randrange(n)
            fires = j % 10 == 0
            fire += fires
            batch.append({
                "id": f"00000000-0000-4000-8000-{j:012x}",
                "occurred": "2026-12-06T12:00:00Z",
                "event": f"tenant.{k}.job.{'failed' if fires else 'succeeded'}",
                "resource": {"prefect.resource.id": f"tenant.{k}.job"},
                "payload": {"j": j},
            })
        bodies.append(json.dumps(batch).encode())
    before = spur.metric("spur_firings_triggered_total")
    c = spur.conn()
    started = time.monotonic()
    for body in bodies:
        c.request("POST", "/api/events", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status >= 300:
            sys.exit(f"POST /api/events answered {r.status}")
    deadline = started + 300
    while spur.metric("spur_firings_triggered_total") - before < fire:
        if time.monotonic() > deadline:
            sys.exit("not every expected firing happened")
        time.sleep(0.01)
    return events / (time.monotonic() - started)


def percentiles(spur, method, path, body=None, count=200):
    c = spur.conn()
    times = []
    for _ in range(count):
        t = time.monotonic()
        c.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            sys.exit(f"{method} {path} answered {r.status}")
        times.append(time.monotonic() - t)
    times.sort()
    return times[len(times) // 2] * 1000, times[int(len(times) * 0.99) - 1] * 1000


def prefect_ls(spur, cli):
    if not cli:
        return None
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{spur.port}/api",
           "PREFECT_HOME": tempfile.mkdtemp(prefix="spur-bench-prefect-")}
    t = time.monotonic()
    out = subprocess.run([cli, "automation", "ls"], env=env, capture_output=True, text=True,
                         timeout=300)
    spent = time.monotonic() - t
    if out.returncode != 0:
        sys.exit("prefect automation ls failed:\n" + out.stderr[-2000:])
    return spent


def reload_once(spur):
    small = os.path.join(spur.auto, "small.yaml")
    results = []
    for round_ in range(3):
        after = len(spur.log_lines)
        write_automations(small, 10, prefix=f"extra{round_}")
        deadline = time.monotonic() + 30
        while True:
            read = spur.log_field("reloaded", "read_ms", after)
            swap = spur.log_field("engine now runs", "swap_ms", after)
            if read is not None and swap is not None:
                results.append((read, swap))
                break
            if time.monotonic() > deadline:
                sys.exit("no reload logged")
            time.sleep(0.05)
        time.sleep(0.6)
    results.sort(key=lambda r: r[0] + r[1])
    return results[len(results) // 2]


def checkpoint(spur):
    # Wait for a checkpoint after the ingest (every second or so while events arrive).
    deadline = time.monotonic() + 30
    while spur.metric("spur_checkpoint_bytes") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    count = spur.metric("spur_checkpoint_seconds_count")
    total = spur.metric("spur_checkpoint_seconds_sum")
    return spur.metric("spur_checkpoint_bytes") / 1024, (total / count * 1000) if count else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--events", type=int, default=60000)
    parser.add_argument("--spur", default=os.path.join(ROOT, "target", "release", "spur"))
    parser.add_argument("--prefect-cli", default=shutil.which("prefect") or "")
    args = parser.parse_args()
    rows = []
    for n in [int(c) for c in args.counts.split(",")]:
        work = tempfile.mkdtemp(prefix=f"spur-bench-{n}-")
        spur = Spur(args.spur, n, work)
        try:
            row = {"n": n, "load_s": spur.wait_ready(), "rss_mib": spur.rss_mib()}
            row["ev_per_s"] = ingest(spur, n, args.events)
            row["list_p50"], row["list_p99"] = percentiles(spur, "GET", "/api/automations?limit=50")
            row["filter_p50"], row["filter_p99"] = percentiles(
                spur, "POST", "/api/automations/filter", b'{"limit": 10}')
            row["search_p50"], row["search_p99"] = percentiles(
                spur, "GET", "/api/automations?name=tenant-5&limit=50")
            row["prefect_ls_s"] = prefect_ls(spur, args.prefect_cli)
            row["reload_read_ms"], row["reload_swap_ms"] = reload_once(spur)
            row["checkpoint_kib"], row["checkpoint_ms"] = checkpoint(spur)
        finally:
            spur.stop()
            shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    columns = ["load_s", "rss_mib", "ev_per_s", "list_p99", "filter_p99", "search_p99",
               "prefect_ls_s", "reload_read_ms", "reload_swap_ms", "checkpoint_kib",
               "checkpoint_ms"]
    print("| automations | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for row in rows:
        cells = []
        for col in columns:
            v, b = row.get(col), base.get(col)
            if v is None:
                cells.append("–")
            elif row is base or not b:
                cells.append(f"{v:.3g}")
            else:
                cells.append(f"{v:.3g} (×{v / b:.2g})")
        print(f"| {row['n']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
