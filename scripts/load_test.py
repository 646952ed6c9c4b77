#!/usr/bin/env python3
"""Bounded load test of `lumen serve` on loopback (standard library only).

Starts the server itself (embedded shapes model unless --models), once per
batching setting (--max-batch 1 = no batching, and --max-batch N), and at
each concurrency level sends a fixed number of POST /synthesize requests
from that many client threads. Reports throughput (requests/s, images/s)
and p50/p99 latency, then stops the server (SIGTERM) and exits. Nothing
leaves 127.0.0.1; every run ends after --requests requests per level.

    cargo build --release
    python3 scripts/load_test.py --binary target/release/lumen \
        --concurrency 1,4,16 --requests 64 --batch 1,4

Prints a Markdown table and writes the JSON report to --out if given.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float) -> tuple[int, float]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    return status, time.perf_counter() - t


def start_server(a, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [a.binary, "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(a.max_wait_ms),
           "--max-queue", "1024"]
    if a.models:
        cmd += ["--models", a.models]
    log = open(a.server_log, "ab") if a.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "RUST_LOG": "info" if a.server_log else "warn"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    sys.exit("server never became ready")


def run_level(base: str, body: bytes, concurrency: int, requests: int, timeout: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def one(_):
        status, dt = post(base + "/synthesize", body, timeout)
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(dt)

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(round(p * (len(latencies) - 1))))] if latencies else None
    return {
        "concurrency": concurrency,
        "requests": requests,
        "ok": len(latencies),
        "statuses": statuses,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": q(0.50) * 1e3 if latencies else None,
        "p99_ms": q(0.99) * 1e3 if latencies else None,
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "target/release/lumen"))
    p.add_argument("--models", default=None, help="model folder (default: the embedded shapes model)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--batch", default="1,4", help="--max-batch settings to compare")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--max-wait-ms", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=128, help="output side (square)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default=None)
    p.add_argument("--server-log", default=None, help="append the server's stderr (info level) here")
    a = p.parse_args()

    image = (ROOT / "tests/fixtures/images/tiny-street.png").read_bytes()
    levels = [int(c) for c in a.concurrency.split(",")]
    batches = [int(b) for b in a.batch.split(",")]
    report = {"binary": a.binary, "models": a.models or "embedded shapes", "steps": a.steps,
              "size": a.size, "guidance": a.guidance, "max_wait_ms": a.max_wait_ms,
              "cores": os.cpu_count(), "runs": []}
    for mb in batches:
        proc, base = start_server(a, mb)
        try:
            # Compute the layout once; every request reuses its id (the
            # encoder is not what this measures).
            req = urllib.request.Request(base + "/layout", data=json.dumps(
                {"image": base64.b64encode(image).decode()}).encode(),
                headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=a.timeout) as r:
                layout_id = json.load(r)["layout_id"]
            body = json.dumps({"layout_id": layout_id, "steps": a.steps, "width": a.size,
                               "height": a.size, "guidance_scale": a.guidance,
                               "prompt": "a street", "seed": 1}).encode()
            post(base + "/synthesize", body, a.timeout)  # warm
            for c in levels:
                r = run_level(base, body, c, a.requests, a.timeout)
                r["max_batch"] = mb
                report["runs"].append(r)
                print(f"max_batch={mb} concurrency={c}: {r['throughput_rps']:.2f} req/s, "
                      f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, statuses {r['statuses']}",
                      file=sys.stderr)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\n{report['models']}, {a.size}x{a.size}, {a.steps} steps, guidance {a.guidance}, "
          f"{a.requests} requests per level, {report['cores']} cores\n")
    print("| max_batch | concurrency | req/s | p50 ms | p99 ms | ok |")
    print("|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['max_batch']} | {r['concurrency']} | {r['throughput_rps']:.2f} | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['ok']}/{r['requests']} |")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0 if all(r["ok"] == r["requests"] for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
