#!/usr/bin/env bash
# Build lumen with `--features cuda` on a machine without a GPU, and check
# that the binary still works on the CPU and refuses `--device cuda` with a
# clear message when no driver answers.
#
# The toolkit comes from, in order:
#   1. CUDA_ROOT (or CUDA_PATH), when it holds bin/nvcc: a real CUDA toolkit;
#   2. else NVIDIA's PyPI wheels, installed into a venv here ($CUDA_VENV,
#      default target/cuda-venv): nvcc, the runtime, NVRTC, cuBLAS, cuRAND,
#      CCCL (CUDA 13.x under site-packages/nvidia/cu13).
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
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
CUDA=${CUDA_ROOT:-${CUDA_PATH:-}}
if [ -n "$CUDA" ] && [ -x "$CUDA/bin/nvcc" ]; then
    echo "toolkit: $CUDA"
    LIBDIR=$CUDA/lib64
else
    VENV=${CUDA_VENV:-$ROOT/target/cuda-venv}
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-nvvm \
        nvidia-cublas nvidia-curand nvidia-cuda-cccl
    CUDA=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
    chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/* 2>/dev/null || true
    echo "toolkit: PyPI wheels in $CUDA"
    LIBDIR=$CUDA/lib
fi
export CUDA_ROOT=$CUDA CUDA_PATH=$CUDA PATH=$CUDA/bin:$PATH
RELEASE=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r MAJOR MINOR <<< "$RELEASE"
# cudarc 0.19 knows CUDA up to 13.4: newer 13.x toolkits build against that API.
if [ "$MAJOR" -eq 13 ] && [ "$MINOR" -gt 4 ]; then MINOR=4; fi
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-$(printf '%d0%d0' "$MAJOR" "$MINOR")}
echo "nvcc $MAJOR.$MINOR; CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION; compute capability $CUDA_COMPUTE_CAP"

LINK=$ROOT/target/cuda-link
mkdir -p "$LINK"
for lib in cublas cublasLt cudart nvrtc curand; do
    versioned=$(ls "$LIBDIR"/lib$lib.so.* 2>/dev/null | sort | head -n 1 || true)
    if [ -n "$versioned" ] && [ ! -e "$LIBDIR/lib$lib.so" ]; then
        ln -sf "$versioned" "$LINK/lib$lib.so"
    fi
done
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
    cargo fetch --locked --quiet
    CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -n 1)
    {
        echo "/* Link-time stand-in for the CUDA driver: every call fails with CUDA_ERROR_STUB_LIBRARY. */"
        grep -ho '^ *fn cu[A-Za-z0-9_]*(' "$CUDARC/src/driver/sys/mod.rs" \
            | sed 's/^ *fn \(cu[A-Za-z0-9_]*\)(/\1/' | sort -u \
            | sed 's/.*/int &(void) { return 34; }/'
    } > "$LINK/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so.1" "$LINK/cuda_stub.c"
    ln -sf libcuda.so.1 "$LINK/libcuda.so"
    echo "driver stub: $(grep -c return "$LINK/cuda_stub.c") functions"
fi

export RUSTFLAGS="${RUSTFLAGS:-} -L $LINK -L $LIBDIR"
cargo build --locked --release --features cuda --target-dir target/cuda
BIN=$ROOT/target/cuda/release/lumen
export LD_LIBRARY_PATH=$LINK:$LIBDIR:${LD_LIBRARY_PATH:-}

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
