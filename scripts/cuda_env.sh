# Sourced (not run) by scripts/check_cuda_build.sh and scripts/gpu_pack.sh:
# the CUDA toolkit and link environment for `cargo build --features cuda` on a
# machine without a GPU. Reads CUDA_COMPUTE_CAP (default 90 = H100/H200),
# CUDA_ROOT / CUDA_PATH (a real toolkit), CUDA_WHEELS (default 13.0),
# CUDA_VENV; exports CUDA_ROOT, PATH, CUDARC_CUDA_VERSION, RUSTFLAGS and
# LD_LIBRARY_PATH, and sets LINK (the link folder) and LIBDIR (the
# toolkit's libraries). See check_cuda_build.sh for why each piece exists.
# shellcheck shell=bash
ROOT=${ROOT:-$PWD}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
CUDA=${CUDA_ROOT:-${CUDA_PATH:-}}
if [ -n "$CUDA" ] && [ -x "$CUDA/bin/nvcc" ]; then
    echo "toolkit: $CUDA"
    LIBDIR=$CUDA/lib64
else
    WHEELS=${CUDA_WHEELS:-13.0}
    VENV=${CUDA_VENV:-$ROOT/target/cuda-venv-$WHEELS}
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # cuRAND has its own numbering: 10.4.0 is CUDA 13.0's.
    case $WHEELS in
        13.0) CURAND=10.4.0.* ;;
        *) CURAND=${CURAND_WHEEL:?"set CURAND_WHEEL (cuRAND's version for CUDA $WHEELS)"} ;;
    esac
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==$WHEELS.*" "nvidia-cuda-runtime==$WHEELS.*" "nvidia-cuda-crt==$WHEELS.*" \
        "nvidia-nvvm==$WHEELS.*" "nvidia-cublas==$WHEELS.*" "nvidia-cuda-nvrtc==$WHEELS.*" \
        "nvidia-cuda-cccl==$WHEELS.*" "nvidia-curand==$CURAND"
    CUDA=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
    chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/* 2>/dev/null || true
    echo "toolkit: PyPI wheels in $CUDA"
    LIBDIR=$CUDA/lib
fi
export CUDA_ROOT=$CUDA CUDA_PATH=$CUDA PATH=$CUDA/bin:$PATH
RELEASE=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r MAJOR MINOR <<< "$RELEASE"
if [ -n "${WHEELS:-}" ] && [ "$MAJOR.$MINOR" != "$WHEELS" ]; then
    echo "nvcc is $MAJOR.$MINOR, not the $WHEELS asked for" >&2
    exit 1
fi
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
export RUSTFLAGS="${RUSTFLAGS:-} -L $LINK -L $LIBDIR"
export LD_LIBRARY_PATH=$LINK:$LIBDIR:${LD_LIBRARY_PATH:-}
