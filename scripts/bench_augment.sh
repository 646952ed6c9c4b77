#!/usr/bin/env bash
# `lumen augment` on a labelled shapes dataset with the embedded model:
# 1. the fidelity score's rank correlation with the colour mIoU of the
#    carried-over masks, over GUIDES x (1,2,3,8) x PER_IMAGE local outputs;
# 2. throughput side by side on a smaller job (TGUIDES x (2,8) x 2): the
#    local engine, then 1 and 2 `lumen serve` replicas on loopback, and
#    whether the servers' images equal the local engine's.
#   scripts/bench_augment.sh [GUIDES=48] [PER_IMAGE=3] [TGUIDES=16]
# Needs a release build and the lumen-train package (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
GUIDES=${1:-48}
PER_IMAGE=${2:-3}
TGUIDES=${3:-16}
PYTHON=${PYTHON:-python3}
LUMEN=$PWD/target/release/lumen
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
unset LUMEN_MODELS
"$PYTHON" -m lumen_train shapes dataset --out "$WORK/data" --count "$GUIDES" >/dev/null
LABELS=(--masks "$WORK/data/masks" --coco "$WORK/data/coco.json" --yolo "$WORK/data/yolo" --quiet)

echo "== score vs colour mIoU (Spearman), $GUIDES guides x K 1,2,3,8 x $PER_IMAGE"
"$LUMEN" augment --input "$WORK/data/images" "${LABELS[@]}" --per-image "$PER_IMAGE" \
    --components 1,2,3,8 --out "$WORK/score" | grep -E "written|throughput|mean score"
"$PYTHON" -m lumen_train shapes score-check --augmented "$WORK/score"

# The throughput job: the first TGUIDES images.
mkdir -p "$WORK/small"
for f in $(ls "$WORK/data/images" | grep png | head -n "$TGUIDES"); do
    cp "$WORK/data/images/$f" "$WORK/small/"
done
JOB=(--input "$WORK/small" "${LABELS[@]}" --per-image 2 --components 2,8)
echo "== local engine, $TGUIDES guides x K 2,8 x 2"
"$LUMEN" augment "${JOB[@]}" --out "$WORK/local" | grep -E "written|throughput"

start_server() { # PORT
    "$LUMEN" serve --host 127.0.0.1 --port "$1" --max-batch 4 > "$WORK/serve-$1.log" 2>&1 &
    until curl -sf "http://127.0.0.1:$1/ready" >/dev/null; do sleep 0.2; done
}
start_server 18471
echo "== 1 server"
"$LUMEN" augment "${JOB[@]}" --out "$WORK/one" --server http://127.0.0.1:18471 | grep -E "written|throughput|servers"
start_server 18472
echo "== 2 servers"
"$LUMEN" augment "${JOB[@]}" --out "$WORK/two" \
    --server http://127.0.0.1:18471 --server http://127.0.0.1:18472 | grep -E "written|throughput|servers"
for d in one two; do
    if diff -rq "$WORK/local/images" "$WORK/$d/images" >/dev/null; then
        echo "$d: images identical to the local engine's"
    else
        echo "$d: images DIFFER from the local engine's"
    fi
done
