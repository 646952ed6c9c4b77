#!/usr/bin/env python3
"""Fleet test: three `lumen serve` replicas behind HAProxy on loopback, one
killed and one drained under load, and not a request lost (standard library
only; HAProxy from Debian: `apt-get install haproxy`).

HAProxy runs the shipped docker/haproxy.cfg with loopback addresses:
health-checked on /ready, so a loading or draining replica gets no new
requests; `retry-on conn-failure empty-response`
with `option redispatch`, so a request whose connection failed, or was cut
before any byte of the answer, is sent again to another replica (a synthesis
with a seed is deterministic, so the retry gives the same image); at most
--max-queue requests per replica (`maxconn`), the rest wait in HAProxy's queue
instead of being refused.

The run:
  1. start the replicas; send every distinct request once, alone, to one
     replica: the reference answers;
  2. --clients threads send a mix of those requests through HAProxy for
     --seconds;
  3. at 25 % of the run `kill -9` replica 0 (it stays dead); at 45 % SIGTERM
     replica 1, wait for it to drain and exit, start it again;
  4. report requests sent, answers by status, lost (no answer), and 200s whose
     body differs from the reference answer. Exit status 1 if anything was
     lost, any status other than 200 or 429 came back, or any answer differed.

    cargo build --release
    python3 scripts/fleet_test.py --lumen target/release/lumen --seconds 90

Writes the JSON report to --out if given. Every process it starts is stopped
before it exits; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HAPROXY_CFG = ROOT / "docker/haproxy.cfg"


def loopback_config(lb_port: int, stats_port: int, maxconn: int, servers: list[int]) -> str:
    """docker/haproxy.cfg with loopback addresses: the shipped settings are
    the ones under test. Fails if the file no longer has what it replaces."""
    text = HAPROXY_CFG.read_text()
    subs = [
        # Log every request with its termination state to haproxy.log.
        (r"(?m)^global$", "global\n    log stderr format raw local0 info"),
        (r"(?m)^defaults$", "defaults\n    log global\n    option httplog"),
        (r"(?m)^resolvers docker\n(?:[ \t]+.*\n)+\n", ""),
        (r"(?m)^(\s+)bind :8080$", rf"\g<1>bind 127.0.0.1:{lb_port}"),
        (r"(?m)^(\s+)bind :8404$", rf"\g<1>bind 127.0.0.1:{stats_port}"),
        (r"(?m)(default-server .*maxconn )\d+( |$)", rf"\g<1>{maxconn}\g<2>"),
        (r"(?m)^(\s+)server-template .*$",
         "\n".join(rf"\g<1>server r{i} 127.0.0.1:{p}" for i, p in enumerate(servers))),
    ]
    for pattern, repl in subs:
        text, n = re.subn(pattern, repl, text)
        if n != 1:
            raise SystemExit(f"{HAPROXY_CFG}: expected one match of {pattern!r}, found {n}")
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, want: int, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == want:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


class Replica:
    def __init__(self, i: int, args, workdir: Path):
        self.i = i
        self.args = args
        self.port = free_port()
        self.log = workdir / f"replica-{i}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        cmd = [
            self.args.lumen, "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--max-queue", str(self.args.max_queue), "--max-batch", "4",
            "--log-format", "json", "--shutdown-delay-s", str(self.args.shutdown_delay_s),
        ]
        if self.args.models:
            cmd += ["--models", self.args.models]
        env = dict(os.environ, RAYON_NUM_THREADS=str(self.args.threads), RUST_LOG="info")
        self.starts += 1
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        if not wait_http(self.port, "/ready", 200, 120):
            raise SystemExit(f"replica {self.i} never became ready; see {self.log}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def post(port: int, path: str, body: bytes, timeout: float):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", path, body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def requests_mix() -> list[tuple[str, bytes]]:
    """Distinct requests: layouts and seeded syntheses of a few guides."""
    guides = [
        ROOT / "tests/fixtures/images" / n
        for n in ("shapes-guide.png", "shapes-guide-2.png", "shapes-guide-3.png", "tiny-room.png")
    ]
    out = []
    for gi, g in enumerate(guides):
        image = base64.b64encode(g.read_bytes()).decode()
        for k in (2, 8):
            out.append(("/layout", json.dumps({"image": image, "components": k}).encode()))
        for seed, (size, k, steps) in enumerate([(64, 3, 4), (96, 8, 3), (64, 1, 6)]):
            body = {"image": image, "components": k, "steps": steps, "width": size,
                    "height": size, "seed": 1000 * gi + seed}
            out.append(("/synthesize", json.dumps(body).encode()))
    return out


def essence(path: str, body: bytes) -> bytes:
    """What must equal the lone run: the layout data, or the images."""
    v = json.loads(body)
    if path == "/layout":
        return json.dumps([v["layout_id"], v["data"]]).encode()
    return json.dumps([(im["seed"], im["data"]) for im in v["images"]]).encode()


def outstanding(port: int) -> int:
    """Requests a replica holds (queued or running), from its /metrics."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    except OSError:
        return -1
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("lumen_queue_depth ", "lumen_queue_in_flight ")):
            total += float(line.split()[-1])
    return int(total)


def haproxy_stats(port: int) -> list[dict]:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/stats;csv")
        lines = c.getresponse().read().decode().splitlines()
    except OSError:
        return []
    header = lines[0].lstrip("# ").split(",")
    return [dict(zip(header, l.split(","))) for l in lines[1:] if l]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lumen", default=str(ROOT / "target/release/lumen"))
    ap.add_argument("--haproxy", default="haproxy")
    ap.add_argument("--models", help="model folder (default: the embedded shapes model)")
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=6, help="each replica's --max-queue (and HAProxy maxconn)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per replica (RAYON_NUM_THREADS)")
    ap.add_argument("--shutdown-delay-s", type=int, default=2,
                    help="each replica's --shutdown-delay-s (docker/compose.yaml sets 2)")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()

    if shutil.which(args.haproxy) is None:
        print(f"error: `{args.haproxy}` not found: install HAProxy (apt-get install haproxy) "
              "or pass --haproxy PATH", file=sys.stderr)
        return 2
    if not Path(args.lumen).is_file():
        print(f"error: --lumen {args.lumen}: no such file (cargo build --release)", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="lumen-fleet-"))
    replicas = [Replica(i, args, workdir) for i in range(3)]
    lb_port, stats_port = free_port(), free_port()
    haproxy = None
    try:
        for r in replicas:
            r.start()
        mix = requests_mix()
        # 1. The reference: each request alone, on replica 2.
        reference = []
        for path, body in mix:
            status, answer = post(replicas[2].port, path, body, 300)
            if status != 200:
                raise SystemExit(f"reference {path} answered {status}: {answer[:300]!r}")
            reference.append(essence(path, answer))
        print(f"reference: {len(mix)} distinct requests answered alone", flush=True)

        cfg = workdir / "haproxy.cfg"
        cfg.write_text(loopback_config(lb_port, stats_port, args.max_queue,
                                       [r.port for r in replicas]))
        check = subprocess.run([args.haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"haproxy refused the configuration:\n{check.stdout}{check.stderr}")
        haproxy = subprocess.Popen([args.haproxy, "-f", str(cfg), "-db"],
                                   stdout=subprocess.DEVNULL,
                                   stderr=open(workdir / "haproxy.log", "w"))
        if not wait_http(lb_port, "/ready", 200, 20):
            raise SystemExit("HAProxy never routed /ready")

        # 2. The load, with 3. the failures on a timer.
        lock = threading.Lock()
        counts: dict[str, int] = {}
        lost: list[str] = []
        mismatched: list[str] = []
        events: list[str] = []
        sent = 0
        t0 = time.time()
        end = t0 + args.seconds

        def client(n: int) -> None:
            nonlocal sent
            rng = random.Random(args.seed * 1000 + n)
            while time.time() < end:
                i = rng.randrange(len(mix))
                path, body = mix[i]
                with lock:
                    sent += 1
                try:
                    status, answer = post(lb_port, path, body, 400)
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        lost.append(f"{path} #{i}: {type(e).__name__}: {e}")
                    continue
                with lock:
                    counts[str(status)] = counts.get(str(status), 0) + 1
                    if status == 200 and essence(path, answer) != reference[i]:
                        mismatched.append(f"{path} #{i}")
                if status == 429:
                    time.sleep(0.2)

        def note(what: str) -> None:
            line = f"{time.time() - t0:6.1f} s  {what}"
            print(line, flush=True)
            events.append(line)

        def failures() -> None:
            time.sleep(max(0.0, t0 + 0.25 * args.seconds - time.time()))
            held = outstanding(replicas[0].port)
            note(f"kill -9 replica 0 (pid {replicas[0].proc.pid}), holding {held} requests")
            replicas[0].proc.kill()
            replicas[0].proc.wait()
            time.sleep(max(0.0, t0 + 0.45 * args.seconds - time.time()))
            r1 = replicas[1]
            held = outstanding(r1.port)
            note(f"SIGTERM replica 1 (pid {r1.proc.pid}), holding {held} requests")
            r1.proc.send_signal(signal.SIGTERM)
            code = r1.proc.wait(timeout=330 + args.shutdown_delay_s)
            note(f"replica 1 drained and exited with status {code}; starting it again")
            r1.start()
            note("replica 1 ready again")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        chaos = threading.Thread(target=failures)
        for t in threads + [chaos]:
            t.start()
        for t in threads + [chaos]:
            t.join()
        elapsed = time.time() - t0

        stats = {
            s["svname"]: {k: s.get(k, "") for k in ("status", "stot", "wretr", "wredis", "econ", "eresp")}
            for s in haproxy_stats(stats_port) if s.get("pxname") == "replicas"
        }
        answered = sum(counts.values())
        other = {s: n for s, n in counts.items() if s not in ("200", "429")}
        report = {
            "seconds": round(elapsed, 1),
            "clients": args.clients,
            "replicas": 3,
            "distinct_requests": len(mix),
            "sent": sent,
            "answered": answered,
            "by_status": counts,
            "other_status": other,
            "lost": len(lost),
            "lost_detail": lost[:20],
            "mismatched": len(mismatched),
            "mismatched_detail": mismatched[:20],
            "events": events,
            "haproxy": stats,
            "logs": str(workdir),
        }
        print(json.dumps({k: v for k, v in report.items() if not k.endswith("_detail")}, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        ok = not lost and not other and not mismatched and sent == answered
        drained = any("exited with status 0" in e for e in events)
        if not drained:
            print("replica 1 did not drain and exit 0", file=sys.stderr)
        print("PASS" if ok and drained else "FAIL", flush=True)
        return 0 if ok and drained else 1
    finally:
        if haproxy and haproxy.poll() is None:
            haproxy.terminate()
            haproxy.wait()
        for r in replicas:
            r.stop()


if __name__ == "__main__":
    sys.exit(main())
