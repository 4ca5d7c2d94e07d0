#!/usr/bin/env bash
# Prepared in session 25 (no device was lent) for the next GPU call, ~7 minutes. In order of need:
# - SEA's GPU tests;
# - the lean head's 19 configs (sea_head_tune.py): the direct kernel's (BR, warps) × TF32 / split dots and maxnreg 64,
#   the paired kernel's spill-free configs, and each form's column sums and argmax against the fp64 twin. The
#   predictions are in ../../cpu/NOTES.md, session 25;
# - the module with the sweep's best config against its defaults in one process (sea_tuned_ab.py);
# - the stage profile at 64K.
# next_call_2.sh has the encoder's and the row-window GEMMs' sweeps. They are no longer urgent: their "spills" were
# the register tool's artefact.
#   run(command="bash benchmarks/results/h100/run19/next_call.sh", carry=[".whl"], kind="nvidia-h100-x1")
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 90 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py \
  "tests/test_sparse_attention_gpu.py::test_one_column_kernel_matches_reference_at_real_sizes" \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
timeout 240 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 60 python benchmarks/sea_tuned_ab.py --results "$OUT" > "$OUT/tuned_ab.log" 2>&1; stamp tuned_ab $?
timeout 35 python benchmarks/sea_stages.py --seq 65536 --ops --repeats 9 --out "$OUT/stages" > "$OUT/stages.log" 2>&1
stamp stages $?
