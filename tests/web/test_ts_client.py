"""The TypeScript client: openapi-typescript's types from the running
server's /openapi.json, openapi-fetch's client over them, both unmodified
(tests/web/ts; `npm ci` there first, as scripts/web_test.sh does).
client.test.ts must type-check against the generated types, then pass
against the server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import GUIDE

TS = Path(__file__).resolve().parent / "ts"


def npm(*args: str, env: dict[str, str]) -> str:
    r = subprocess.run(["npm", "run", "-s", *args], cwd=TS, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"npm run {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_generated_typescript_client(server):
    assert (TS / "node_modules").is_dir(), "run `npm ci` in tests/web/ts (scripts/web_test.sh does)"
    for made in ("gen", "build"):
        shutil.rmtree(TS / made, ignore_errors=True)
    env = {**os.environ, "LUMEN_URL": server.url, "GUIDE": str(GUIDE)}
    npm("generate", env=env)
    npm("build", env=env)
    out = npm("test", env=env)
    checks = [line for line in out.splitlines() if line.startswith("ok - ")]
    assert len(checks) == 10, out
