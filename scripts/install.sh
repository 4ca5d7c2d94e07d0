#!/usr/bin/env bash
# Creates .venv and installs approxattn with everything its tests and main job need.
# CPU torch is pinned: a bare `torch` would pull the CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e ".[dev]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import approxattn, torch; print(f'approxattn {approxattn.__version__} with torch {torch.__version__} ready in .venv')"
