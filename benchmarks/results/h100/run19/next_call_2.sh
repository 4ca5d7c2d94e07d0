#!/usr/bin/env bash
# The second call of run 19 (after next_call.sh): the encoder kernel's and the row-window GEMMs' config sweeps at
# SEA's 64K shape, then the tuned A/B again with every sweep's pick.
#   run(command="bash benchmarks/results/h100/run19/next_call_2.sh", carry=[".whl"], kind="nvidia-h100-x1")
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 240 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 60 python benchmarks/sea_encoder_tune.py --out "$OUT" > "$OUT/encoder_tune.log" 2>&1; stamp encoder_tune $?
timeout 60 python benchmarks/row_gemm_tune.py --steps first,middle --json "$OUT/row_gemm_tune.json" > "$OUT/row_gemm_tune.log" 2>&1
stamp row_gemm_tune $?
timeout 60 python benchmarks/sea_tuned_ab.py --results "$OUT" > "$OUT/tuned_ab.log" 2>&1; stamp tuned_ab $?
