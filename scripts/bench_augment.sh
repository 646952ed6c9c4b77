#!/usr/bin/env bash
# Throughput of `lumen augment` on this machine, side by side: the local
# engine, then 1 and 2 `lumen serve` replicas on loopback (each with the
# embedded shapes model), on the same labelled shapes dataset; and the
# fidelity score's rank correlation with colour mIoU over the local outputs.
#   scripts/bench_augment.sh [GUIDES=48] [PER_IMAGE=3] [COMPONENTS=1,2,3,8]
# Needs a release build and the lumen-train package (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
GUIDES=${1:-48}
PER_IMAGE=${2:-3}
COMPONENTS=${3:-1,2,3,8}
PYTHON=${PYTHON:-python3}
LUMEN=$PWD/target/release/lumen
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
unset LUMEN_MODELS
"$PYTHON" -m lumen_train shapes dataset --out "$WORK/data" --count "$GUIDES" >/dev/null
JOB=(--input "$WORK/data/images" --masks "$WORK/data/masks" --coco "$WORK/data/coco.json"
     --yolo "$WORK/data/yolo" --per-image "$PER_IMAGE" --components "$COMPONENTS" --quiet)

echo "== local engine"
"$LUMEN" augment "${JOB[@]}" --out "$WORK/local" | grep -E "written|throughput|mean score"
echo "== score vs colour mIoU (Spearman)"
"$PYTHON" -m lumen_train shapes score-check --augmented "$WORK/local"

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
