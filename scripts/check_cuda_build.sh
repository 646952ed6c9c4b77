#!/usr/bin/env bash
# Build lumen with `--features cuda` on a machine without a GPU, and check
# that the binary still works on the CPU and refuses `--device cuda` with a
# clear message when no driver answers.
#
# The toolkit comes from, in order:
#   1. CUDA_ROOT (or CUDA_PATH), when it holds bin/nvcc: a real CUDA toolkit;
#   2. else NVIDIA's PyPI wheels of CUDA $CUDA_WHEELS (default 13.0), pinned,
#      installed into a venv here ($CUDA_VENV, default
#      target/cuda-venv-$CUDA_WHEELS): nvcc, the runtime, NVRTC, cuBLAS,
#      cuRAND, CCCL (under site-packages/nvidia/cu13).
# The toolkit must not be newer than the GPU's driver: candle embeds PTX that
# the driver compiles at launch, and a driver refuses PTX from a newer nvcc
# (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). 13.0 runs on every driver >= 580
# (the GPU machines we use have 580.159); the script checks that nvcc is the
# version asked for and builds against that API (CUDARC_CUDA_VERSION).
# Linking needs what a driver-less machine lacks: unversioned names for the
# libraries (the wheels ship only libcublas.so.13 …) and libcuda.so, the
# driver. A link folder (target/cuda-link) gets symlinks for the first and,
# for the second, a stub built here as the toolkit's lib64/stubs one is: a
# libcuda.so.1 defining every cu* function cudarc's driver bindings declare,
# each returning CUDA_ERROR_STUB_LIBRARY (34). Only for linking and for this
# check: on a GPU machine the real driver's libcuda.so.1 is found first.
#
#   scripts/check_cuda_build.sh            (CUDA_COMPUTE_CAP, default 90 = H100)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh
cargo build --locked --release --features cuda --target-dir "${CUDA_TARGET_DIR:-target/cuda}"
BIN_DIR=$ROOT/${CUDA_TARGET_DIR:-target/cuda}/release
BIN=$BIN_DIR/lumen

# On the CPU, the CUDA build computes what the CPU build computes.
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$BIN" layout --image tests/fixtures/images/shapes-guide.png --out "$OUT/cuda-build.safetensors" >/dev/null
if [ -x target/release/lumen ]; then
    target/release/lumen layout --image tests/fixtures/images/shapes-guide.png --out "$OUT/cpu-build.safetensors" >/dev/null
    cmp "$OUT/cuda-build.safetensors" "$OUT/cpu-build.safetensors"
    echo "cpu: the CUDA build's layout equals the CPU build's, byte for byte"
fi
# Without a driver (here: the stub), --device cuda is refused, not a panic.
if "$BIN" layout --device cuda --image tests/fixtures/images/shapes-guide.png \
    --out "$OUT/x.safetensors" 2> "$OUT/err"; then
    if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
        echo "cuda: a driver is present and --device cuda worked"
        exit 0
    fi
    echo "--device cuda succeeded without a driver" >&2
    exit 1
fi
if grep -q panicked "$OUT/err"; then
    cat "$OUT/err" >&2
    exit 1
fi
echo "cuda without a driver: $(head -n 1 "$OUT/err")"
echo "ok: $BIN"
