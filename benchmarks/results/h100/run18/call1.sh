#!/usr/bin/env bash
# Run 18's first call (session 24), in order of need: GPU tests of the banded decoder head (the conv as tap GEMMs
# over the map's flattened rows), the module and the one-column kernel; the sea module old (.ab_old = 38e272a)
# against new at 64K, alternated twice; the head against the direct kernel and its configs; the new module's stage
# profile; the one-column tables as a counting sort; the row-window GEMMs' configs; the encoder kernel's configs
# (prepared in session 23, never run); then the module with the sweeps' best configs against its defaults
# (sea_tuned_ab.py).
#   run(command="bash benchmarks/results/h100/run18/call1.sh", carry=[".whl", ".ab_old"])
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 90 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_decoder_head.py tests/test_sea_gpu.py \
  "tests/test_sparse_attention_gpu.py::test_one_column_kernel_matches_reference_at_real_sizes" \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
for round in 1 2; do
  for side in old new; do
    src=src; [ $side = old ] && src=.ab_old/src
    PYTHONPATH=$src:/tmp/site timeout 35 python -m approxattn.bench run --preset sea --seq 65536 \
      --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side \
      >> "$OUT/sea_ab.log" 2>&1
    stamp "sea $side" $?
    echo "== $side done" >> "$OUT/sea_ab.log"
  done
done
timeout 80 python benchmarks/sea_head_tune.py --configs --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 35 python benchmarks/sea_stages.py --seq 65536 --ops --repeats 9 --out "$OUT/stages" > "$OUT/stages.log" 2>&1
stamp stages $?
timeout 35 python benchmarks/single_column_tune.py --seq 65536 --out "$OUT" > "$OUT/single_column.log" 2>&1
stamp single_column $?
timeout 60 python benchmarks/row_gemm_tune.py --steps first,middle --json "$OUT/row_gemm_tune.json" > "$OUT/row_gemm_tune.log" 2>&1
stamp row_gemm_tune $?
timeout 60 python benchmarks/sea_encoder_tune.py --out "$OUT" > "$OUT/encoder_tune.log" 2>&1; stamp encoder_tune $?
timeout 50 python benchmarks/sea_tuned_ab.py --results "$OUT" > "$OUT/tuned_ab.log" 2>&1; stamp tuned_ab $?
