#!/usr/bin/env bash
# The whole test suite: the Rust crate (`cargo test`), then the trainer's
# tests (training/, pytest) in a venv this script makes or reuses
# (training/.venv; the PyPI torch wheel takes a few minutes to install once).
# The trainer's tests use the lumen binary `cargo test` has just built, as
# does the fleet test (scripts/fleet_test.py: three replicas behind HAProxy,
# one killed and one drained under load), which installs Debian's haproxy
# package if it is missing, and the browser and generated-client tests
# (scripts/web_test.sh: Debian's chromium, Playwright, openapi-python-client,
# openapi-typescript + openapi-fetch; it installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked
if ! command -v haproxy >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy >/dev/null; }
fi
python3 scripts/fleet_test.py --lumen target/debug/lumen --seconds 40 --out target/fleet-report.json
LUMEN_BIN="$PWD/target/debug/lumen" scripts/web_test.sh
VENV=${VENV:-training/.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e 'training[test]'
LUMEN_BIN="$PWD/target/debug/lumen" "$VENV/bin/python" -m pytest -q training/tests
