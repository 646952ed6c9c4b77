#!/usr/bin/env bash
# The GPU check in one call, on a bare offline GPU machine (the `device`
# tool's H200: nvcc 13.0, driver 580, python3 with torch + cu13 libraries
# and transformers, no diffusers), from what scripts/gpu_pack.sh packed:
#
#   scripts/gpu_check.sh OUT [--device cuda|cpu]
#
#  1. nvidia-smi: the GPU, the driver;
#  2. ldd: every library of the packed binaries resolves, CUDA's from the
#     torch environment's cu13 wheels, libcuda from the real driver (never a
#     stub under target/);
#  3. parity (tests/device.rs with LUMEN_TEST_DEVICE/LUMEN_TEST_DTYPE): layout
#     and synthesis in f32 (images within 3/255 of diffusers), then synthesis
#     in f16 and bf16 against the same f32 references: their errors;
#  4. SD1.5-size random weights made on the device (scripts/make_big_models.py
#     --device cuda --dtype f16): one CFG step (ControlNet + UNet) at batch 1
#     and 8 at 512 px and batch 1 at 1024 px and a 512 px VAE decode, lumen
#     and diffusers side by side in f16 (scripts/bench_synthesis.py), with
#     peak device memory;
#  5. `lumen serve` throughput at concurrency 8 (scripts/load_test.py).
#
# It writes OUT/gpu-check.md (one table), OUT/*.log and OUT/*.json, and
# bounds every step with a timeout so that the whole fits in 8 minutes.
# `--device cpu` is the dry run on a machine without a GPU, against
# `scripts/gpu_pack.sh --cpu`: the same steps on models/tiny at small sizes
# (bf16 and nvidia-smi skipped), so that the script itself is tested.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:?usage: $0 OUT [--device cuda|cpu]}
DEV=cuda
[ "${2:-}" = --device ] && DEV=${3:?--device needs cuda or cpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PACK=${PACK:-$ROOT/target/gpu-pack}
WORK=${WORK:-/tmp/lumen-gpu-check}
mkdir -p "$WORK/bin"
PY=${PY:-python3}
T0=$(date +%s)
TABLE=$OUT/gpu-check.md
say() { echo "== [$(($(date +%s) - T0)) s] $*"; }
row() { echo "$*" >> "$TABLE"; }

if [ "$DEV" = cuda ]; then
    SIZES="512 1024"
    BIG=${BIG:-1}
    DTYPES="f32 f16 bf16"
    BENCH_DTYPE=f16
    STAGES=cfg_step_512,cfg_step_512_b8,cfg_step_1024,vae_decode_512
    SERVE_SIZE=512 SERVE_STEPS=20 SERVE_REQUESTS=32
else
    BIG=${BIG:-0}
    DTYPES="f32 f16"
    BENCH_DTYPE=f32
    STAGES=cfg_step_64,cfg_step_64_b8,cfg_step_128,vae_decode_64
    SERVE_SIZE=64 SERVE_STEPS=4 SERVE_REQUESTS=16
fi
echo "# lumen GPU check ($DEV), $(date -u +%Y-%m-%dT%H:%MZ)" > "$TABLE"
row ""
row "| check | result |"
row "|---|---|"

say "unpacking $PACK"
for b in lumen device; do
    xz -dc "$PACK/bin/$b.xz" > "$WORK/bin/$b" && chmod +x "$WORK/bin/$b" \
        || { echo "cannot unpack $PACK/bin/$b.xz (run scripts/gpu_pack.sh)" >&2; exit 1; }
done
LUMEN=$WORK/bin/lumen
cp "$PACK/manifest.json" "$OUT/manifest.json" 2>/dev/null
if ls "$PACK"/wheels/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$PACK"/wheels/*.whl && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

# 1. The GPU.
if [ "$DEV" = cuda ]; then
    say "nvidia-smi"
    nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
    GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
    row "| GPU, driver, memory | ${GPU:-nvidia-smi failed} |"
    # 2. CUDA's libraries from the torch environment (its cu13 wheels).
    NV_LIBS=$("$PY" - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})
print(":".join(dirs))
PY
)
    export LD_LIBRARY_PATH=$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
say "ldd"
LDD_OK=yes
for b in lumen device; do
    ldd "$WORK/bin/$b" > "$OUT/ldd-$b.log" 2>&1
    if grep -q "not found" "$OUT/ldd-$b.log"; then LDD_OK="no: $(grep 'not found' "$OUT/ldd-$b.log" | awk '{print $1}' | tr '\n' ' ')"; fi
    if grep -E 'libcuda\.so' "$OUT/ldd-$b.log" | grep -q "$ROOT/target"; then LDD_OK="no: libcuda is the stub"; fi
done
CUDA_LIBS=$(grep -oE '(libcuda|libcublas|libcublasLt|libcurand|libnvrtc|libcudart)\.so[^ ]* => [^ ]*' "$OUT/ldd-lumen.log" | sed 's/ => /→/' | tr '\n' ' ')
row "| ldd: every library found | $LDD_OK ${CUDA_LIBS:+($CUDA_LIBS)} |"

# 3. Parity with the references (transformers / diffusers, f32 on the CPU).
parity() { # DTYPE FILTER
    local log=$OUT/parity-$1.log
    LUMEN_TEST_ROOT=$ROOT LUMEN_TEST_DEVICE=$DEV LUMEN_TEST_DTYPE=$1 timeout 240 \
        "$WORK/bin/device" --test-threads 1 --nocapture $2 > "$log" 2>&1
    local rc=$?
    local summary
    summary=$(grep -E '^test result:' "$log" | tail -n 1 | sed -E 's/test result: (ok|FAILED)\. ([0-9]+ passed; [0-9]+ failed).*finished in ([0-9.]+)s/\2, \3 s/')
    local worst
    worst=$("$PY" - "$log" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
img = [(int(m[0]), float(m[1])) for m in re.findall(r"image max \|Δ\| = (\d+), mean \|Δ\| = ([0-9.]+)", text)]
rel = [float(m) for m in re.findall(r"ratio ([0-9.e+-]+)", text)]
out = []
if img:
    out.append(f"images: worst max Δ {max(i[0] for i in img)}/255, worst mean Δ {max(i[1] for i in img):.3f} ({len(img)} images)")
if rel:
    out.append(f"tensors: worst max Δ / max ref {max(rel):.2e} ({len(rel)} checks)")
print("; ".join(out) or "no measurements")
PY
)
    echo "$rc|$summary|$worst"
}
for dt in $DTYPES; do
    filter=synthesis_parity
    [ "$dt" = f32 ] && filter=""
    say "parity $dt ${filter:-(all)}"
    IFS='|' read -r rc summary worst <<< "$(parity "$dt" "$filter")"
    status=pass
    [ "$rc" -eq 0 ] || status="FAIL (exit $rc)"
    row "| parity $dt on $DEV${filter:+ (synthesis)} | $status: $summary; $worst |"
done

# 4. SD1.5-size weights on the device; lumen and diffusers side by side.
MODELS=$ROOT/models/tiny
if [ "$BIG" = 1 ]; then
    say "SD1.5-size random weights on $DEV (f16)"
    if timeout 240 "$PY" scripts/make_big_models.py --device "$DEV" --dtype f16 --out "$WORK/sd15" \
        > "$OUT/make-big-models.log" 2>&1; then
        MODELS=$WORK/sd15
        row "| SD1.5-size weights (random, f16, made on $DEV) | $(grep -A1 '"gib"' "$OUT/make-big-models.log" | grep -o '[0-9.]*,\?$' | tr -d ,) s |"
    else
        row "| SD1.5-size weights | FAILED (see make-big-models.log); the rest uses models/tiny |"
    fi
fi
say "bench: $STAGES, $BENCH_DTYPE, models $(basename "$MODELS")"
timeout 300 "$PY" scripts/bench_synthesis.py --models "$MODELS" --lumen "$LUMEN" --device "$DEV" \
    --dtype "$BENCH_DTYPE" --stages "$STAGES" --warmup 2 --runs 5 --threads "$(nproc)" \
    --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
"$PY" - "$OUT/bench.json" "$BENCH_RC" >> "$TABLE" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print(f"| bench | FAILED (exit {sys.argv[2]}; see bench.log) |")
    sys.exit()
print(f"| bench | {r['device']} {r['dtype']}, {r.get('gpu', str(r['threads']) + ' threads')}, "
      f"warm-up {r.get('warmup')}, {r.get('runs')} runs, medians; models {r['models']} |")
print()
print("| stage | lumen ms | lumen it/s | diffusers ms | diffusers it/s | lumen / diffusers time | diffusers peak alloc MiB |")
print("|---|---|---|---|---|---|---|")
ips = lambda ms: "-" if ms is None else f"{1000 / ms:.2f}"
for row in r.get("results", []):
    lm, dm = row["lumen_median_ms"], row["diffusers_median_ms"]
    print(f"| {row['stage']} | {lm if lm is not None else '-'} | {ips(lm)} | {dm if dm is not None else '-'} | "
          f"{ips(dm)} | {row['ratio_lumen_over_diffusers'] if row['ratio_lumen_over_diffusers'] is not None else '-'} | "
          f"{row.get('diffusers_stage_peak_gpu_allocated_mib', '-')} |")
peak = r.get("peak_gpu_used_mib")
if peak:
    print()
    print(f"Peak device memory used (nvidia-smi, less the baseline): lumen {peak.get('lumen')} MiB, "
          f"diffusers {peak.get('diffusers')} MiB.")
if "lumen" in r and "error" in r["lumen"]:
    print(f"\nlumen bench error: {r['lumen']['error'][:400]}")
print()
print("| check | result |")
print("|---|---|")
PY

# 5. The server under load.
say "lumen serve at concurrency 8 ($SERVE_SIZE px, $SERVE_STEPS steps)"
LUMEN_DEVICE=$DEV timeout 240 "$PY" scripts/load_test.py --binary "$LUMEN" --models "$MODELS" \
    --concurrency 8 --batch 8 --requests "$SERVE_REQUESTS" --steps "$SERVE_STEPS" --size "$SERVE_SIZE" \
    --out "$OUT/serve.json" --server-log "$OUT/serve-server.log" > "$OUT/serve.log" 2>&1
SERVE_RC=$?
"$PY" - "$OUT/serve.json" "$SERVE_RC" "$SERVE_STEPS" >> "$TABLE" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["runs"][0]
except (OSError, ValueError, IndexError, KeyError):
    print(f"| serve, concurrency 8 | FAILED (exit {sys.argv[2]}; see serve.log) |")
    sys.exit()
steps = int(sys.argv[3])
print(f"| serve, concurrency 8, --max-batch 8 | {r['throughput_rps']:.2f} images/s "
      f"({r['throughput_rps'] * steps:.1f} image-steps/s), p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
      f"{r['ok']}/{r['requests']} ok |")
PY
row "| wall time of this check | $(($(date +%s) - T0)) s |"
say "done: $TABLE"
cat "$TABLE"
