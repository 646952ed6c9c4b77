#!/usr/bin/env bash
# The whole test suite: the Rust crate (`cargo test`), then the trainer's
# tests (training/, pytest) in a venv this script makes or reuses
# (training/.venv; the PyPI torch wheel takes a few minutes to install once).
# The trainer's tests use the lumen binary `cargo test` has just built.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked
VENV=${VENV:-training/.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e 'training[test]'
LUMEN_BIN="$PWD/target/debug/lumen" "$VENV/bin/python" -m pytest -q training/tests
