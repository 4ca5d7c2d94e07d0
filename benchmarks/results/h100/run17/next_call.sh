#!/usr/bin/env bash
# Prepared at the end of session 23 for the next GPU call (not run: the session's device time was spent): the
# encoder kernel's launch configs (never swept; 0.49 ms at 64K against a ~0.2 ms prediction), the lean head's
# (BR, warps) configs, the SEA GPU tests, and the module at 64K/16K with its stage profile. Run from the repo root:
#   run(command="bash benchmarks/results/h100/run17/next_call.sh", carry=[".whl"])
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py tests/test_sparse_attention_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
timeout 60 python benchmarks/sea_encoder_tune.py --out "$OUT" > "$OUT/encoder_tune.log" 2>&1; stamp encoder_tune $?
timeout 60 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 60 python -m approxattn.bench run --preset sea --seq 16384,65536 --match "SDPA flash" "sea module" \
  --no-plots --no-memory --out "$OUT/bench" > "$OUT/bench.log" 2>&1; stamp bench $?
timeout 60 python benchmarks/sea_stages.py --seq 65536 --ops --repeats 9 --out "$OUT/stages" > "$OUT/stages.log" 2>&1
stamp stages $?
