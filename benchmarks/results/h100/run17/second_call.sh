#!/usr/bin/env bash
# Run 17's second call (session 23): GPU tests of the lean head, the fused encoder and the one-column kernel
# through the module; the sea module old (.ab_old = HEAD 28b0580: one-column kernel at its first config)
# against new (+ config, lean head, fused encoder and gates), alternated; the new module's stage profile.
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 240 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py \
  "tests/test_sparse_attention_gpu.py::test_one_column_kernel_matches_reference_at_real_sizes" \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
for side in old new old new; do
  src=src; [ $side = old ] && src=.ab_old/src
  PYTHONPATH=$src:/tmp/site timeout 60 python -m approxattn.bench run --preset sea --seq 65536 \
    --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side >> "$OUT/sea_ab.log" 2>&1
  stamp "sea $side" $?
  echo "== $side done" >> "$OUT/sea_ab.log"
done
timeout 120 python benchmarks/sea_stages.py --seq 65536 --ops --repeats 9 --out "$OUT/stages" > "$OUT/stages.log" 2>&1
stamp stages $?
