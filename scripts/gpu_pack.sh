#!/usr/bin/env bash
# Pack what scripts/gpu_check.sh needs on a bare, offline GPU machine, into
# target/gpu-pack/ (carried there with the working tree; at most 64 MiB
# travel in all, and this script checks that tree + pack fit):
#
#   bin/lumen.xz          `--features cuda` build, stripped, xz-compressed
#   bin/device.xz         tests/device.rs (layout and synthesis parity, the
#                         f16 time embedding) built the same way
#   wheels/               diffusers and importlib_metadata for Python 3.12
#                         (the GPU image has torch, transformers, safetensors,
#                         huggingface_hub, not diffusers)
#   manifest.json         commit, features, toolkit, compute capability,
#                         sizes and sha256 of everything above
#
# The reference files (models/tiny, tests/fixtures/reference) travel with
# the tree itself. The CUDA toolkit is CUDA 13.0 (scripts/cuda_env.sh pins
# it: the GPU machines run driver 580, and a driver refuses PTX from a newer
# nvcc). The stub libcuda.so.1 that the build links against on this
# driverless machine is never packed: on the GPU machine the binaries must
# find the real driver, and gpu_check.sh fails if ldd resolves libcuda to
# anything under target/.
#
#   scripts/gpu_pack.sh          CUDA build (15-25 min on 2 cores, cold)
#   scripts/gpu_pack.sh --cpu    CPU build, for the dry run:
#                                scripts/gpu_check.sh OUT --device cpu
#
# Environment: PACK (default target/gpu-pack), CUDA_COMPUTE_CAP (default 90,
# the H100/H200), CUDA_WHEELS (default 13.0), DIFFUSERS (default 0.42.1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=${PACK:-target/gpu-pack}
MODE=cuda
case "${1:-}" in
    --cpu) MODE=cpu ;;
    "") ;;
    *) echo "usage: $0 [--cpu]" >&2; exit 2 ;;
esac
if [ "$MODE" = cuda ]; then
    # shellcheck source=scripts/cuda_env.sh
    source scripts/cuda_env.sh
    FEATURES=cuda,device-tests
    TARGET=target/cuda
else
    FEATURES=device-tests
    TARGET=target
fi
echo "== building lumen and tests/device.rs ($FEATURES) into $TARGET"
cargo build --locked --release --features "$FEATURES" --target-dir "$TARGET" --bin lumen
TEST=$(cargo test --locked --release --features "$FEATURES" --target-dir "$TARGET" --test device \
    --no-run --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "device" and m.get("executable"):
        print(m["executable"])')
[ -x "$TEST" ] || { echo "no test binary for tests/device.rs" >&2; exit 1; }

rm -rf "$PACK"
mkdir -p "$PACK/bin" "$PACK/wheels"
for pair in "lumen:$TARGET/release/lumen" "device:$TEST"; do
    name=${pair%%:*}
    strip -o "$PACK/bin/$name" "${pair#*:}"
    xz -T0 -6 "$PACK/bin/$name"
done

echo "== wheels for the GPU machine's Python 3.12"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d "$PACK/wheels" \
    "diffusers==${DIFFUSERS:-0.42.1}" "importlib_metadata==8.7.0"

NVCC=none
if [ "$MODE" = cuda ]; then
    NVCC=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
fi
python3 - "$PACK" "$MODE" "$FEATURES" "$NVCC" <<'PY'
import hashlib, json, os, subprocess, sys
from pathlib import Path
pack, mode, features, nvcc = Path(sys.argv[1]), *sys.argv[2:]
files = {}
for f in sorted(p for p in pack.rglob("*") if p.is_file() and p.name != "manifest.json"):
    files[str(f.relative_to(pack))] = {"bytes": f.stat().st_size,
                                       "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout.strip())
manifest = {"mode": mode, "features": features, "commit": commit, "dirty": dirty, "nvcc": nvcc,
            "cudarc_cuda_version": os.environ.get("CUDARC_CUDA_VERSION"),
            "cuda_compute_cap": os.environ.get("CUDA_COMPUTE_CAP") if mode == "cuda" else None,
            "files": files}
(pack / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
PY

# What travels: the tree (tracked and untracked-not-ignored files) and the pack.
TREE=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1)
PACKED=$(du -sb "$PACK" | cut -f1)
TOTAL=$((TREE + PACKED))
printf '== pack: %s MiB; tree: %s MiB; together %s MiB of 64\n' \
    "$((PACKED >> 20))" "$((TREE >> 20))" "$((TOTAL >> 20))"
ls -l "$PACK/bin" "$PACK/wheels"
if [ "$TOTAL" -gt $((64 << 20)) ]; then
    echo "tree + pack exceed the 64 MiB that can travel" >&2
    exit 1
fi
