#!/usr/bin/env python3
"""What the store's page cache costs and buys (`--store-cache-mb`).

usage: python3 scripts/bench_store_cache.py [--caches 1024,256,64] [--events 400000]
       [--spur target/release/spur]

For each cache size it starts `spur serve` on a free loopback port with a fresh data folder
and 100 automations, sends EVENTS events over `POST /api/events` (batches of 500, 10 % fire)
until every firing is counted, and reports the ingest rate and the process's resident memory
(VmRSS at the end, VmHWM its peak), each also as a ratio to the first size's row of the same
run (absolute figures on this shared machine swing from run to run). Then it reads the
oldest events back (Prefect's `POST /api/events/filter`, oldest first, twenty pages of 50): the pages a
small cache no longer holds come from disk. Only loopback is used; every wait is bounded.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_automations import ROOT, Spur, ingest  # noqa: E402


def status_mib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_oldest(spur, pages=20):
    """Seconds to read the oldest `pages` pages of events (Prefect's filter API, oldest first,
    following `next_page`)."""
    import json
    from urllib.parse import urlparse
    body = json.dumps({"filter": {"occurred": {"since": "2000-01-01T00:00:00Z",
                                               "until": "2100-01-01T00:00:00Z"},
                                  "order": "ASC"}, "limit": 50}).encode()
    started = time.monotonic()
    c = spur.conn()
    c.request("POST", "/api/events/filter", body, {"Content-Type": "application/json"})
    for _ in range(pages):
        r = c.getresponse()
        answer = r.read()
        if r.status >= 300:
            sys.exit(f"the event filter answered {r.status}: {answer[:200]!r}")
        following = json.loads(answer).get("next_page")
        if not following:
            break
        url = urlparse(following)
        c.request("GET", url.path + "?" + url.query)
    else:
        c.getresponse().read()
    return time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", default="1024,256,64")
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--spur", default=os.path.join(ROOT, "target/release/spur"))
    args = parser.parse_args()
    rows = []
    for cache in [int(c) for c in args.caches.split(",")]:
        workdir = tempfile.mkdtemp(prefix="spur-cache-")
        os.environ["SPUR_STORE_CACHE_MB"] = str(cache)
        spur = Spur(args.spur, 100, workdir)
        try:
            spur.wait_ready()
            rate = ingest(spur, 100, args.events)
            rss = status_mib(spur.proc.pid, "VmRSS")
            hwm = status_mib(spur.proc.pid, "VmHWM")
            read = read_oldest(spur)
        finally:
            spur.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        rows.append((cache, rate, rss, hwm, read))
        print(f"cache {cache} MiB: {rate:.0f} ev/s, RSS {rss:.0f} MiB (peak {hwm:.0f}), "
              f"oldest 20 pages {read * 1000:.0f} ms", flush=True)
    base = rows[0]
    print(f"\n| cache | ingest → all fired | RSS at the end | peak RSS | oldest 20 pages of events |")
    print("|---:|---:|---:|---:|---:|")
    for cache, rate, rss, hwm, read in rows:
        print(f"| {cache} MiB | {rate:.0f} ev/s (×{rate / base[1]:.2f}) | {rss:.0f} MiB (×{rss / base[2]:.2f}) "
              f"| {hwm:.0f} MiB (×{hwm / base[3]:.2f}) | {read * 1000:.0f} ms (×{read / base[4]:.2f}) |")


if __name__ == "__main__":
    main()
