#!/usr/bin/env python3
"""Request-level against step-level scheduling, side by side in one run.

Starts `lumen serve` (the embedded shapes model unless --models) once per
scheduling, sends the same seeded mixed workload at a fixed concurrency
(70 % short requests of 4-8 steps, 30 % long of 50-100 steps; then the same
with mixed sizes), and prints p50 and p99 latency per class, the short
requests' latency alone (solo), and throughput, as a Markdown table.

    python3 scripts/bench_scheduling.py --lumen target/release/lumen --requests 80

Standard library only; every request goes to 127.0.0.1.
"""

import argparse
import base64
import json
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "models/examples/shapes-guide.png"


def start(lumen, scheduling, args):
    cmd = [lumen, "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json",
           "--scheduling", scheduling, "--max-batch", str(args.max_batch),
           "--max-queue", "256", "--request-timeout-s", "600"]
    if args.models:
        cmd += ["--models", args.models]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    address = None
    for line in proc.stderr:
        try:
            v = json.loads(line)
        except json.JSONDecodeError:
            continue
        if v.get("fields", {}).get("message") == "listening":
            address = v["fields"]["address"]
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    base = f"http://{address}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(base + "/ready", timeout=5) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{scheduling}: server never became ready")


def post(base, body):
    req = urllib.request.Request(base + "/synthesize", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=900) as r:
        r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - t


def workload(n, seed, sizes):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = rng.random() < 0.3
        steps = rng.randint(50, 100) if long else rng.randint(4, 8)
        side = rng.choice(sizes)
        out.append(("long" if long else "short", {"steps": steps, "seed": i, "width": side,
                                                  "height": side, "prompt": "a red square"}))
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run(base, jobs, image, concurrency):
    lat = {"short": [], "long": []}
    lock = threading.Lock()
    it = iter(jobs)

    def worker():
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            cls, body = job
            body = dict(body, image=image)
            dt = post(base, body)
            with lock:
                lat[cls].append(dt)

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return lat, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lumen", default=str(ROOT / "target/release/lumen"))
    ap.add_argument("--models", default=None)
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--sizes", default="64", help="same-size run's side")
    ap.add_argument("--mixed-sizes", default="48,64,80")
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args()
    image = base64.b64encode(GUIDE.read_bytes()).decode()
    variants = [("same size", [int(s) for s in args.sizes.split(",")]),
                ("mixed sizes", [int(s) for s in args.mixed_sizes.split(",")])]
    rows, results = [], []
    for scheduling in ["request", "step"]:
        proc, base = start(args.lumen, scheduling, args)
        try:
            for name, sizes in variants:
                # Solo latency of the short requests (one at a time).
                solo = [post(base, dict(b, image=image))
                        for c, b in workload(40, 99, sizes) if c == "short"][:8]
                lat, wall = run(base, workload(args.requests, 1, sizes), image, args.concurrency)
                r = {
                    "scheduling": scheduling, "workload": name,
                    "short_solo_p50_s": statistics.median(solo),
                    "short_p50_s": pct(lat["short"], 50), "short_p99_s": pct(lat["short"], 99),
                    "long_p50_s": pct(lat["long"], 50), "long_p99_s": pct(lat["long"], 99),
                    "throughput_rps": args.requests / wall,
                }
                results.append(r)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    print(f"\nconcurrency {args.concurrency}, {args.requests} requests per run, "
          f"--max-batch {args.max_batch}; 70 % short (4-8 steps), 30 % long (50-100)\n")
    print("| workload | scheduling | short solo p50 | short p50 | short p99 | short p99 / solo "
          "| long p50 | long p99 | throughput |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['scheduling']} | {r['short_solo_p50_s']:.2f} s "
              f"| {r['short_p50_s']:.2f} s | {r['short_p99_s']:.2f} s "
              f"| {r['short_p99_s'] / r['short_solo_p50_s']:.1f}x | {r['long_p50_s']:.2f} s "
              f"| {r['long_p99_s']:.2f} s | {r['throughput_rps']:.2f} req/s |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
