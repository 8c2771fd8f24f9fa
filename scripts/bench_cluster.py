#!/usr/bin/env python3
"""Load driver for issue 13: how cluster mode divides the work between members.

usage: python3 scripts/bench_cluster.py [--members 1,3] [--events 20000] [--automations 640]
       [--repeat 1] [--spur target/release/spur] [--nats-server PATH]

Each round starts its own nats-server (JetStream, temp store, a free loopback port) and M
`spur serve --nats ... --cluster bench` members (each its own data folder and HTTP port, all
loading the same folder of AUTOMATIONS reactive automations with a `do-nothing` action), waits
until the members hold all 64 partitions between them, then sends EVENTS events over
`POST /api/events` (batches of 500, round-robin over the members: each member publishes its
share to the stream and answers after JetStream's ack). One event in ten fires one
automation. The round ends when the members have acted on every expected firing between them
(`spur_firings_acted_total`) and none lags behind the stream (`/api/cluster`).

Printed per member: automations it acts on, firings it acted on, CPU seconds (utime + stime of
its process, from /proc, from just before the first POST to the end) and CPU per event; per
round: nats-server's CPU, wall time, and each member's CPU per event as a ratio to the
one-member round of the same run (absolute figures on this shared machine swing from run to
run). Every member evaluates every event of the stream (that is how they derive the same
firings); what divides is acting: claims, actions and their events. Only loopback is used;
every wait is bounded.
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bench_automations import free_port, stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_for(what, check, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def write_automations(folder, n):
    os.makedirs(folder)
    with open(os.path.join(folder, "bench.yaml"), "w") as f:
        f.write("automations:\n")
        for i in range(n):
            f.write(
                f"  - name: bench-{i}\n"
                f"    trigger:\n"
                f"      expect: [\"bench.fire\"]\n"
                f"      match: {{\"prefect.resource.id\": \"bench.r.{i}\"}}\n"
                f"      posture: Reactive\n"
                f"      threshold: 1\n"
                f"    actions:\n"
                f"      - type: do-nothing\n"
            )


class Nats:
    def __init__(self, binary, workdir):
        self.port = free_port()
        store = os.path.join(workdir, "nats")
        self.proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "--store_dir", store],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for("nats-server", up, 30)
        self.url = f"nats://127.0.0.1:{self.port}"

    def stop(self):
        stop_process(self.proc)


class Member:
    def __init__(self, binary, nats_url, folder, data):
        self.port = free_port()
        self.log_lines = []
        # SPUR_BENCH_WRAP (e.g. "perf record -g -o /tmp/m.data --") runs each member under a
        # profiler; its CPU figures then include the wrapper.
        wrap = os.environ.get("SPUR_BENCH_WRAP", "").split()
        self.proc = subprocess.Popen(
            wrap + [binary, "serve", "--automations", folder, "--data", data,
             "--http", f"127.0.0.1:{self.port}", "--log-format", "json",
             "--nats", nats_url, "--cluster", "bench", "--cluster-lease", "3s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "SPUR_CONFIG": os.devnull},
        )
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self):
        for line in self.proc.stderr:
            self.log_lines.append(line)

    def get(self, path):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            return body if r.status == 200 else None
        except OSError:
            return None

    def check_alive(self):
        if self.proc.poll() is not None:
            sys.exit("a member exited:\n" + "".join(self.log_lines[-20:]))

    def status(self):
        self.check_alive()
        body = self.get("/api/cluster")
        return json.loads(body) if body else None

    def metric(self, name):
        body = self.get("/metrics")
        if body is None:
            return None
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self):
        stop_process(self.proc)


def settled(members):
    """Every member live, all 64 partitions held, every member holding some."""
    status = members[0].status()
    if not status:
        return None
    live = {m["instance"] for m in status["members"]}
    owners = status["partitions"]
    held = [o for o in owners if o]
    if len(live) == len(members) and len(held) == 64 and all(i in owners for i in live):
        return status
    return None


def bodies(events, automations):
    out, fire = [], 0
    for start in range(0, events, 500):
        batch = []
        for j in range(start, min(events, start + 500)):
            fires = j % 10 == 0
            fire += fires
            batch.append({
                "id": f"00000000-0000-4000-8000-{j:012x}",
                "occurred": "2026-12-07T12:00:00Z",
                "event": "bench.fire" if fires else "bench.other",
                "resource": {"prefect.resource.id": f"bench.r.{(j // 10) % automations}"},
                "payload": {"j": j},
            })
        out.append(json.dumps(batch).encode())
    return out, fire


def post_all(members, payloads):
    conns = [http.client.HTTPConnection("127.0.0.1", m.port, timeout=120) for m in members]
    for k, body in enumerate(payloads):
        c = conns[k % len(conns)]
        c.request("POST", "/api/events", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status >= 300:
            sys.exit(f"POST /api/events answered {r.status}")


def one_round(args, count):
    workdir = tempfile.mkdtemp(prefix="spur-bench-cluster-")
    nats = Nats(args.nats_server, workdir)
    folder = os.path.join(workdir, "automations")
    write_automations(folder, args.automations)
    members = []
    try:
        members = [
            Member(args.spur, nats.url, folder, os.path.join(workdir, f"data{i}"))
            for i in range(count)
        ]
        wait_for("the members to share the partitions", lambda: settled(members), 120)
        # A join's rebalance goes on after every member holds some: wait until the partition
        # map has not changed for two leases.
        stable_since, last = time.monotonic(), None
        deadline = time.monotonic() + 120
        while time.monotonic() - stable_since < 6:
            if time.monotonic() > deadline:
                sys.exit("the partition map never settled")
            status = settled(members)
            owners = status and status["partitions"]
            if owners != last:
                stable_since, last = time.monotonic(), owners
            time.sleep(0.25)
        share = {m["instance"]: m["automations"] for m in status["members"]}
        instance_of = {}
        for m in members:
            s = wait_for("a member's status", m.status, 30)
            instance_of[m.port] = s["instance"]
        payloads, fire = bodies(args.events, args.automations)
        cpu_before = [cpu_seconds(m.proc.pid) for m in members]
        nats_before = cpu_seconds(nats.proc.pid)
        started = time.monotonic()
        post_all(members, payloads)
        posted = time.monotonic() - started

        def done():
            acted = [m.metric("spur_firings_acted_total") for m in members]
            if None in acted or sum(acted) < fire:
                return None
            status = members[0].status()
            if not status or any(m["lag"] > 0 for m in status["members"]):
                return None
            return acted

        acted = wait_for("every firing acted on", done, 600)
        wall = time.monotonic() - started
        cpu = [cpu_seconds(m.proc.pid) - b for m, b in zip(members, cpu_before)]
        nats_cpu = cpu_seconds(nats.proc.pid) - nats_before
        if sum(acted) != fire:
            sys.exit(f"{sum(acted)} firings acted on, {fire} expected (one acted twice?)")
        rows = []
        for m, a, c in zip(members, acted, cpu):
            rows.append({
                "automations": share.get(instance_of[m.port], 0),
                "acted": int(a),
                "cpu_s": c,
                "cpu_us_per_event": c / args.events * 1e6,
            })
        return {"members": count, "rows": rows, "fire": fire, "wall_s": wall,
                "post_s": posted, "nats_cpu_s": nats_cpu}
    finally:
        for m in members:
            m.stop()
        nats.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="1,3")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--automations", type=int, default=640)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--spur", default=os.path.join(ROOT, "target", "release", "spur"))
    parser.add_argument("--nats-server",
                        default=os.environ.get("NATS_SERVER_BIN") or shutil.which("nats-server"))
    args = parser.parse_args()
    if not args.nats_server:
        sys.exit("nats-server not found (source scripts/provision.sh, or pass --nats-server)")
    if not os.path.exists(args.spur):
        sys.exit(f"{args.spur} not found: cargo build --release -p spur")
    counts = [int(c) for c in args.members.split(",")]
    print(f"{args.events} events ({args.events // 10} fire), {args.automations} automations, "
          f"members {counts}, repeat {args.repeat}")
    for rep in range(args.repeat):
        base = None
        for count in counts:
            r = one_round(args, count)
            total = sum(row["cpu_s"] for row in r["rows"])
            print(f"\nround {rep + 1}, {count} member(s): {r['fire']} firings, wall "
                  f"{r['wall_s']:.1f} s (POSTs {r['post_s']:.1f} s), members' CPU {total:.2f} s, "
                  f"nats-server CPU {r['nats_cpu_s']:.2f} s")
            print(f"  {'member':>6} {'automations':>11} {'acted':>6} {'CPU s':>7} "
                  f"{'µs/event':>9} {'vs 1 member':>11}")
            for i, row in enumerate(r["rows"]):
                if base is None and count == 1:
                    base = row["cpu_us_per_event"]
                ratio = f"×{row['cpu_us_per_event'] / base:.2f}" if base else "-"
                print(f"  {i:>6} {row['automations']:>11} {row['acted']:>6} "
                      f"{row['cpu_s']:>7.2f} {row['cpu_us_per_event']:>9.1f} {ratio:>11}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
