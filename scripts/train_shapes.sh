#!/usr/bin/env bash
# Regenerate the embedded shapes model (models/shapes) from seeds, on the CPU:
#   1. the world: 20,000 training images with captions (split seed 0)
#   2. the base: random DINOv2 encoder (patch 4) and CLIP text encoder, tokenizer, scheduler
#   3. only with ENCODER_STEPS > 0: the layout encoder, trained without labels
#      to ignore colour (lumen-train shapes encoder: dense contrastive views,
#      recoloured); the committed model keeps the random encoder
#   4. the VAE, the text-to-image UNet           (lumen-train shapes vae|unet)
#   5. the PCA basis (Kmax 8) and the layouts    (lumen fit-pca, lumen layouts)
#   6. the LUMEN ControlNet with random-K truncation (lumen-train controlnet),
#      then trained further with timesteps drawn towards the noisy end (tune)
#   7. the model folder in f16                   (lumen-train shapes pack)
# Resumable: rerun after an interruption; finished stages are skipped and the
# trainers resume from their last checkpoint. Every invocation's CPU time
# (user + sys) and wall time go to $WORK/times.tsv; the totals are printed at
# the end. Environment: WORK (default target/shapes), PY (a python with the
# training package, default training/.venv/bin/python), OUT (default models/shapes),
# LUMEN (the lumen binary, default target/release/lumen, built if missing),
# UNTIL (stop after the stage of that name), BASE_FROM (a packed model folder,
# e.g. models/shapes: its encoder, text encoder, VAE, UNet, PCA basis and
# ControlNet are reused in float32; only the layouts and the tune stage run;
# with ENCODER_STEPS > 0 the reused encoder is trained and its PCA refitted),
# FRESH_CONTROLNET (with BASE_FROM, 1: train the controlnet stage afresh from
# the reused UNet instead of tuning BASE_FROM's ControlNet),
# TUNE_STEPS (default 1000), TUNE_FROM (a ControlNet folder the tune stage
# starts from instead of the controlnet stage's), TUNE_CAPTION_DROPOUT (default
# 0.5), TUNE_SEED (default 1), CONTROLNET_STEPS (default 8000), CONTROLNET_INIT
# (a ControlNet folder to start the controlnet stage from instead of the UNet),
# ENCODER_STEPS (default 0: no encoder stage), ENCODER_GEOMETRY (the encoder's
# geometry_weight, default 0), JITTER_BELOW (default 0; K > 0: colour-jittered
# copies of the images and their layouts, which condition the ControlNet's
# samples with K at most this, so that the prompt sets the colours there).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-target/shapes}
PY=${PY:-training/.venv/bin/python}
OUT=${OUT:-models/shapes}
LUMEN=${LUMEN:-target/release/lumen}
mkdir -p "$WORK/done"
[ -x "$LUMEN" ] || cargo build --release --locked --quiet

# stage NAME CMD...: run CMD unless NAME is done; record its times.
stage() {
    local name=$1
    shift
    if [ -f "$WORK/done/$name" ]; then
        echo "== $name: done"
        return
    fi
    echo "== $name"
    /usr/bin/time -f "$name\t%U\t%S\t%e" -a -o "$WORK/times.tsv" "$@"
    touch "$WORK/done/$name"
    if [ "${UNTIL:-}" = "$name" ]; then
        echo "== stopped after $name (UNTIL)"
        exit 0
    fi
}
# Threads that wait passively: busy-waiting OpenMP threads lose half their
# speed when anything else runs on these cores.
train=(env PYTHONPATH=training/src OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" "$PY" -m lumen_train)

stage world "${train[@]}" shapes world --out "$WORK/images" --count 20000 --seed 0
if [ -n "${BASE_FROM:-}" ]; then
    stage reuse "${train[@]}" shapes unpack --model "$BASE_FROM" --out "$WORK/base"
    if [ "${ENCODER_STEPS:-0}" -gt 0 ]; then
        # A new layout encoder on the reused VAE and UNet: its own PCA basis.
        stage encoder "${train[@]}" shapes encoder --models "$WORK/base" --work "$WORK/encoder-run" \
            --steps "$ENCODER_STEPS" --batch-size 32 --geometry-weight "${ENCODER_GEOMETRY:-0}"
        stage pca "$LUMEN" fit-pca --models "$WORK/base" --images "$WORK/images" --components 8 \
            --max-images 5000 --out "$WORK/base/pca.safetensors" --quiet
    fi
else
    stage base "${train[@]}" shapes base --out "$WORK/base" --seed 0
    if [ "${ENCODER_STEPS:-0}" -gt 0 ]; then
        stage encoder "${train[@]}" shapes encoder --models "$WORK/base" --work "$WORK/encoder-run" \
            --steps "$ENCODER_STEPS" --batch-size 32 --geometry-weight "${ENCODER_GEOMETRY:-0}"
    fi
    stage vae "${train[@]}" shapes vae --models "$WORK/base" --work "$WORK/vae-run" --steps 2000 --batch-size 16
    stage unet "${train[@]}" shapes unet --models "$WORK/base" --work "$WORK/unet-run" --steps 3000 --batch-size 32
    stage pca "$LUMEN" fit-pca --models "$WORK/base" --images "$WORK/images" --components 8 \
        --max-images 5000 --out "$WORK/base/pca.safetensors" --quiet
fi
stage layouts "$LUMEN" layouts --models "$WORK/base" --images "$WORK/images" --out "$WORK/layouts" --quiet
jitter=()
if [ "${JITTER_BELOW:-0}" -gt 0 ]; then
    stage jitter "${train[@]}" shapes jitter --images "$WORK/images" --out "$WORK/images-jitter" --seed 0
    stage layouts-jitter "$LUMEN" layouts --models "$WORK/base" --images "$WORK/images-jitter" \
        --out "$WORK/layouts-jitter" --quiet
    jitter=(--jitter-data "$WORK/layouts-jitter" --jitter-below "$JITTER_BELOW")
fi
if [ -n "${BASE_FROM:-}" ] && [ "${FRESH_CONTROLNET:-0}" != 1 ]; then
    FROM=$BASE_FROM/controlnet
else
    stage controlnet "${train[@]}" controlnet --models "$WORK/base" --data "$WORK/layouts" --images "$WORK/images" \
        --output "$WORK/model" --resolution 64 --batch-size 32 --lr 2e-4 --max-steps "${CONTROLNET_STEPS:-8000}" \
        --checkpoint-every 250 --validate-every 1000 --k-distribution uniform --caption-dropout 0.5 \
        --seed 0 --log-every 50 --resume ${CONTROLNET_INIT:+--init-controlnet "$CONTROLNET_INIT"} "${jitter[@]}"
    FROM=$WORK/model/controlnet
fi
FROM=${TUNE_FROM:-$FROM}
# Then further with timesteps drawn towards the noisy end, where sampling
# decides the layout (the failures of the uniform-only model: seeds that
# lose the guide, small shapes that vanish).
stage tune "${train[@]}" controlnet --models "$WORK/base" --data "$WORK/layouts" --images "$WORK/images" \
    --output "$WORK/tuned" --init-controlnet "$FROM" --resolution 64 --batch-size 32 --lr 1e-4 \
    --max-steps "${TUNE_STEPS:-1000}" --checkpoint-every 250 --validate-every 1000 --k-distribution uniform \
    --caption-dropout "${TUNE_CAPTION_DROPOUT:-0.5}" --timestep-sampling cubic --seed "${TUNE_SEED:-1}" \
    --log-every 50 --resume "${jitter[@]}"
stage pack "${train[@]}" shapes pack --model "$WORK/tuned" --out "$OUT"
awk -F'\t' '{u[$1]+=$2; s[$1]+=$3; w[$1]+=$4; U+=$2; S+=$3; W+=$4}
    END {for (k in u) printf "%-11s cpu %8.0f s  wall %7.0f s\n", k, u[k]+s[k], w[k];
         printf "%-11s cpu %8.0f s  wall %7.0f s\n", "total", U+S, W}' "$WORK/times.tsv"
