#!/usr/bin/env bash
# The README's pictures, made by lumen itself with the embedded shapes model:
# for three held-out guides (tests/fixtures/images/shapes-guide*.png), the
# layout preview (first three components as RGB) and outputs at K = 1, 2, 3
# and 8 with the guide's caption, seed 0. Writes models/examples/.
set -euo pipefail
cd "$(dirname "$0")/.."
LUMEN=${LUMEN:-target/release/lumen}
[ -x "$LUMEN" ] || cargo build --release --locked --quiet
OUT=models/examples
mkdir -p "$OUT"
while IFS='|' read -r name caption; do
    guide=tests/fixtures/images/$name.png
    cp "$guide" "$OUT/$name.png"
    "$LUMEN" layout --image "$guide" --out "$OUT/$name-layout.png"
    for k in 1 2 3 8; do
        "$LUMEN" synthesize --image "$guide" -k "$k" --prompt "$caption" --seed 0 --quiet \
            --out "$OUT/$name-k$k.png"
    done
done <<'LIST'
shapes-guide|a red triangle and a green circle
shapes-guide-2|a red square and a magenta triangle
shapes-guide-3|a cyan square, a red circle and a magenta triangle
LIST
