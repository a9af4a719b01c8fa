# meshpipe tasks. Recipes use the project's virtual environment in .venv.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# Start a local cluster (gateway + 2 workers) on the default model, pulling it on first run.
auto *ARGS:
    meshpipe auto {{ARGS}}

# The test suite CI runs (slow scenarios excluded; `just test-all` includes them).
test *ARGS:
    python -m pytest -m "not slow" {{ARGS}}

test-all *ARGS:
    python -m pytest {{ARGS}}

lint:
    ruff format --check .
    ruff check .

fmt:
    ruff format .
    ruff check --fix .

# Serving benchmark against a running gateway (see `meshpipe bench --help`).
bench *ARGS:
    meshpipe bench {{ARGS}}

# QUIC link benchmark against a plain TCP anchor.
bench-transport *ARGS:
    meshpipe bench transport {{ARGS}}
