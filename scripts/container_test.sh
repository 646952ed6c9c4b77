#!/usr/bin/env bash
# The CPU image, built and run with a real container engine (Podman), and
# checked against the host's own binary:
#
#   scripts/container_test.sh            # build, run, check; figures on stdout and in OUT
#
# 1. Base images. This machine reaches no image registry, so the two images
#    the Dockerfile names are made here when they are not already present,
#    and tagged under those names. THEY ARE STAND-INS, not the official images:
#    - debian:bookworm-slim: `mmdebstrap --variant=minbase bookworm`, imported;
#    - rust:<version>-slim-bookworm: that Debian, gcc/libc6-dev/pkg-config
#      from Debian, and this machine's Rust toolchain placed where the
#      official image keeps it (rustup in /usr/local/cargo/bin, toolchains in
#      /usr/local/rustup), <version> being that toolchain's (passed to the
#      build as RUST_VERSION). It also trusts this machine's CA bundle
#      (/etc/ssl/certs/ca-certificates.crt), through which these machines
#      reach the crate registry: with Debian's bundle alone cargo fails on
#      "self-signed certificate in certificate chain".
# 2. `podman build` of the real Dockerfile, unchanged (docker format, so that
#    HEALTHCHECK is kept); crates come over the build host's network.
# 3. Runs the image and checks, each with a clear message on failure:
#    /ready within READY_S; a seeded /synthesize equal to the host binary's
#    (same pixels, same layout_id); uid 10001; `podman healthcheck run`
#    healthy, also with LUMEN_PORT=9090; models/tiny mounted at /models
#    replaces the baked model (/ready: model_path /models, the host's
#    identity of models/tiny); `podman stop` (SIGTERM) exits 0 within the
#    drain bound.
# 4. Reports the image size, the build time and the start time.
#
# NO_CACHE=1 builds without podman's layer cache (the cold build time).
# Podman logs "unable to get systemd connection" where there is no systemd:
# it cannot schedule the periodic HEALTHCHECK there; `podman healthcheck run`,
# which this script uses, runs the check itself.
#
# Needs: podman, runc, mmdebstrap (apt-get install podman runc mmdebstrap),
# root, and target/release/lumen (built if missing). Podman runs with runc and
# a containers.conf holding `default_ulimits = []` (crun fails here on "cgroups
# in hybrid mode", and setting ulimits is not permitted). Takes about 10
# minutes on 2 cores (a cold cargo build inside the image); not in .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-target/container-test}
READY_S=${READY_S:-120}
DRAIN_S=${DRAIN_S:-60}   # lumen serve's default --drain-timeout-s
IMAGE=${IMAGE:-localhost/lumen:container-test}
# A python with Pillow, to compare pixels (the trainer's venv has it).
PY=${PY:-training/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
WORK=$(mktemp -d)
NAMES=()
HOST_PIDS=()
cleanup() {
    for n in "${NAMES[@]}"; do podman rm -f "$n" >/dev/null 2>&1 || true; done
    for p in "${HOST_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "container test FAILED: $*" >&2; exit 1; }
say() { echo "== $*"; }

for tool in podman runc mmdebstrap curl python3; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install podman runc mmdebstrap curl)"
done
printf '[containers]\ndefault_ulimits = []\n' > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
pm() { podman --runtime runc "$@"; }

[ -x target/release/lumen ] || cargo build --release --locked --bin lumen
HOST_LUMEN=$ROOT/target/release/lumen

# --- 1. stand-in base images -------------------------------------------------
DEBIAN=bookworm
RUST_VERSION=$(rustc --version | awk '{print $2}')
TOOLCHAIN_DIR=$(rustc --print sysroot)
if ! pm image exists "docker.io/library/debian:$DEBIAN-slim"; then
    say "making debian:$DEBIAN-slim (STAND-IN) with mmdebstrap"
    mmdebstrap --quiet --variant=minbase "$DEBIAN" "$WORK/rootfs.tar"
    pm import --quiet --change 'CMD ["bash"]' "$WORK/rootfs.tar" "docker.io/library/debian:$DEBIAN-slim" >/dev/null
fi
# Short names (FROM debian:…) resolve to localhost/ when no search registry is set.
pm tag "docker.io/library/debian:$DEBIAN-slim" "localhost/debian:$DEBIAN-slim"
if ! pm image exists "docker.io/library/rust:$RUST_VERSION-slim-$DEBIAN"; then
    say "making rust:$RUST_VERSION-slim-$DEBIAN (STAND-IN): Debian build tools + this machine's toolchain"
    ctx=$WORK/rust-ctx
    mkdir -p "$ctx/toolchain"
    cp -a "$TOOLCHAIN_DIR/." "$ctx/toolchain/"
    cp "$(command -v rustup)" "$ctx/rustup"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca.crt"
    cat > "$ctx/Containerfile" <<EOF
FROM docker.io/library/debian:$DEBIAN-slim
# STAND-IN for the official rust:$RUST_VERSION-slim-$DEBIAN (no registry here).
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:\$PATH
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
COPY host-ca.crt /etc/ssl/certs/ca-certificates.crt
COPY toolchain /usr/local/rustup/toolchains/$RUST_VERSION-x86_64-unknown-linux-gnu
COPY rustup /usr/local/cargo/bin/rustup
RUN for t in cargo rustc rustdoc cargo-clippy clippy-driver rustfmt cargo-fmt rust-gdb rust-lldb; do \\
        ln -s rustup /usr/local/cargo/bin/\$t; done \\
    && rustup default $RUST_VERSION-x86_64-unknown-linux-gnu && cargo --version && rustc --version
EOF
    pm build --quiet --pull=never -t "docker.io/library/rust:$RUST_VERSION-slim-$DEBIAN" "$ctx" >/dev/null
fi
pm tag "docker.io/library/rust:$RUST_VERSION-slim-$DEBIAN" "localhost/rust:$RUST_VERSION-slim-$DEBIAN"

# --- 2. the real Dockerfile --------------------------------------------------
say "podman build of ./Dockerfile (RUST_VERSION=$RUST_VERSION)"
t0=$(date +%s)
pm build --pull=never ${NO_CACHE:+--no-cache} --format docker --build-arg RUST_VERSION="$RUST_VERSION" -t "$IMAGE" . \
    > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; fail "podman build (log: $OUT/build.log)"; }
BUILD_S=$(( $(date +%s) - t0 ))
SIZE=$(pm image inspect --format '{{.Size}}' "$IMAGE")

# --- helpers -----------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_ready URL SECONDS: prints the seconds it took, fails after SECONDS.
wait_ready() {
    local t=$(date +%s.%N)
    while ! curl -fsS -o /dev/null "$1/ready" 2>/dev/null; do
        python3 -c "import sys,time; sys.exit(time.time()-$t > $2)" || return 1
        sleep 0.2
    done
    python3 -c "import time; print(f'{time.time()-$t:.1f}')"
}
REQUEST='{"image": "'$(base64 -w0 tests/fixtures/images/shapes-guide.png)'", "seed": 7, "steps": 8, "components": 3}'
synthesize() { curl -fsS -H 'content-type: application/json' -d "$REQUEST" "$1/synthesize"; }
run_container() { # NAME PORT [podman run options...]
    local name=$1 port=$2; shift 2
    NAMES+=("$name")
    pm run -d --name "$name" -p "127.0.0.1:$port:${LUMEN_PORT_IN:-8080}" "$@" "$IMAGE" >/dev/null
}

# --- 3. run and check ----------------------------------------------------------
say "host binary: the same request"
HP=$(free_port)
env -u LUMEN_MODELS "$HOST_LUMEN" serve --host 127.0.0.1 --port "$HP" > "$OUT/host.log" 2>&1 &
HOST_PIDS+=($!)
wait_ready "http://127.0.0.1:$HP" "$READY_S" >/dev/null || fail "the host's lumen serve was not ready in ${READY_S} s"
synthesize "http://127.0.0.1:$HP" > "$OUT/host.json"

say "container: /ready, the same answer, uid"
CP=$(free_port)
run_container lumen-ct "$CP"
START_S=$(wait_ready "http://127.0.0.1:$CP" "$READY_S") \
    || { pm logs lumen-ct | tail -20; fail "/ready did not answer 200 within ${READY_S} s"; }
synthesize "http://127.0.0.1:$CP" > "$OUT/container.json" || fail "POST /synthesize to the container failed"
"$PY" - "$OUT/host.json" "$OUT/container.json" <<'EOF' || fail "the container's answer differs from the host binary's"
import base64, io, json, sys
from PIL import Image
host, cont = (json.load(open(p)) for p in sys.argv[1:])
assert host["parameters"]["layout_id"] == cont["parameters"]["layout_id"], (
    f"layout_id: host {host['parameters']['layout_id']}, container {cont['parameters']['layout_id']}")
assert host["parameters"]["model"] == cont["parameters"]["model"], "model identity differs"
for h, c in zip(host["images"], cont["images"], strict=True):
    a, b = (Image.open(io.BytesIO(base64.b64decode(x["data"]))).convert("RGB").tobytes() for x in (h, c))
    assert a == b, "pixels differ"
print(f"same pixels and layout_id {cont['parameters']['layout_id']}")
EOF
UID_IN=$(pm exec lumen-ct sh -c 'id -u') || fail "cannot run id in the container"
[ "$UID_IN" = 10001 ] || fail "the process runs as uid $UID_IN, not 10001"
PID1_UID=$(pm exec lumen-ct sh -c "awk '/^Uid:/ {print \$2}' /proc/1/status")
[ "$PID1_UID" = 10001 ] || fail "lumen (pid 1) runs as uid $PID1_UID, not 10001"

say "HEALTHCHECK, also with LUMEN_PORT=9090"
pm healthcheck run lumen-ct || fail "podman healthcheck run: unhealthy on the default port"
P2=$(free_port)
LUMEN_PORT_IN=9090 run_container lumen-ct-port "$P2" -e LUMEN_PORT=9090
wait_ready "http://127.0.0.1:$P2" "$READY_S" >/dev/null || fail "LUMEN_PORT=9090: not ready"
pm healthcheck run lumen-ct-port || fail "podman healthcheck run: unhealthy with LUMEN_PORT=9090 (the probe must follow LUMEN_PORT)"

say "a model folder mounted at /models replaces the baked one"
TP=$(free_port)
env -u LUMEN_MODELS "$HOST_LUMEN" serve --host 127.0.0.1 --port "$TP" --models models/tiny > "$OUT/host-tiny.log" 2>&1 &
HOST_PIDS+=($!)
wait_ready "http://127.0.0.1:$TP" "$READY_S" >/dev/null || fail "host serve on models/tiny not ready"
TINY_ID=$(curl -fsS "http://127.0.0.1:$TP/ready" | python3 -c 'import json,sys; print(json.load(sys.stdin)["model"])')
MP=$(free_port)
run_container lumen-ct-tiny "$MP" -v "$ROOT/models/tiny:/models:ro"
wait_ready "http://127.0.0.1:$MP" "$READY_S" >/dev/null || fail "with models/tiny at /models: not ready"
curl -fsS "http://127.0.0.1:$MP/ready" > "$OUT/ready-tiny.json"
python3 - "$OUT/ready-tiny.json" "$TINY_ID" <<'EOF' || fail "/ready does not report the mounted models/tiny"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["model_path"] == "/models", r
assert r["model"] == sys.argv[2], f"model {r['model']}, the host's models/tiny is {sys.argv[2]}"
print(f"/ready: {r['model']} at {r['model_path']}")
EOF

say "SIGTERM: podman stop exits 0 within the drain bound"
t0=$(date +%s.%N)
pm stop -t $((DRAIN_S + 30)) lumen-ct >/dev/null
STOP_S=$(python3 -c "import time; print(f'{time.time()-$t0:.1f}')")
CODE=$(pm inspect --format '{{.State.ExitCode}}' lumen-ct)
[ "$CODE" = 0 ] || fail "exit status $CODE after SIGTERM, not 0"
python3 -c "import sys; sys.exit(not $STOP_S <= $DRAIN_S)" || fail "stop took ${STOP_S} s, over the ${DRAIN_S} s drain bound"

# --- 4. report -----------------------------------------------------------------
python3 - "$OUT/report.json" <<EOF
import json, sys
r = {"image": "$IMAGE", "size_mb": round($SIZE / 1e6), "build_s": $BUILD_S, "ready_s": $START_S,
     "stop_s": $STOP_S, "rust": "$RUST_VERSION", "base_images": "stand-ins (mmdebstrap + host toolchain)"}
json.dump(r, open(sys.argv[1], "w"), indent=1)
print(json.dumps(r))
EOF
echo "container test passed: build ${BUILD_S} s, image $((SIZE / 1000000)) MB, ready in ${START_S} s, stopped in ${STOP_S} s (exit 0)"
