# ai-ratings: `just demo` runs the whole lifecycle on embedded defaults; `just test` the suite.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
python := bin / "python"

# List the recipes
default:
    @{{ just_executable() }} --list --unsorted

# Create .venv and install exactly requirements.lock (hashes checked), the project and the Node
# scorer's exact package-lock.json (install scripts off: onnxruntime-node's fetches GPU binaries)
setup:
    test -x {{ python }} || python3 -m venv {{ venv }}
    {{ python }} -m pip install --quiet --require-hashes --no-deps -r requirements.lock
    {{ python }} -m pip install --quiet --no-deps --no-build-isolation -e .
    bash scripts/ensure-chromium.sh
    bash scripts/ensure-node.sh {{ venv }}
    cd clients/node && PATH="$PATH:../../{{ bin }}" npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

# Re-resolve pyproject.toml's ranges into requirements.lock (exact versions, hashes; uv)
lock: _ensure-setup
    {{ python }} scripts/lock.py

# Full lifecycle on the demo world (embedded PostgreSQL, no DATABASE_URL needed)
demo: _ensure-setup
    {{ bin }}/airatings demo run --config configs/demo.yaml

# The release chain as containers through Docker Compose (builds missing images; --demo seeds the
# demo world into the compose postgres first). Without Docker: .venv/bin/airatings release
release *args: _ensure-setup
    {{ python }} scripts/compose_release.py {{ args }}

# Build the images (runtime, train, postgres stand-in) and print their sizes and build times
images *args: _ensure-setup
    {{ python }} scripts/docker_images.py build {{ args }}

# Run the test suite against a real embedded PostgreSQL
test *args: _ensure-setup
    {{ bin }}/pytest {{ args }}

# Lint Python, SQL, TypeScript (tsc --noEmit), the Dockerfile and the justfile; check the lock
lint: _ensure-setup
    {{ python }} scripts/lock.py --check
    {{ bin }}/ruff check .
    {{ bin }}/ruff format --check .
    cd dbt && ../{{ bin }}/sqlfluff lint . ../jobs/migrations
    {{ just_executable() }} --fmt --check
    {{ bin }}/hadolint docker/Dockerfile docker/postgres-standin/Dockerfile
    cd clients/node && PATH="$PATH:../../{{ bin }}" npx tsc --noEmit -p tsconfig.json

# Format Python, SQL and the justfile
fmt: _ensure-setup
    {{ bin }}/ruff check --fix .
    {{ bin }}/ruff format .
    cd dbt && ../{{ bin }}/sqlfluff fix . ../jobs/migrations
    {{ just_executable() }} --fmt

# Run every benchmark in bench/ and print the ratios recorded in BENCHMARKS.md
bench: _ensure-setup
    for f in bench/bench_*.py; do {{ python }} "$f"; done

# Build dbt docs (offline) and serve them on localhost:8080
docs: _ensure-setup
    {{ bin }}/airatings dbt docs generate --config configs/demo.yaml
    {{ bin }}/airatings dbt docs serve --port 8080 --config configs/demo.yaml

# What CI runs: setup, lint, test
ci: setup lint test

_ensure-setup:
    @test -x {{ bin }}/airatings || {{ just_executable() }} setup
