#!/usr/bin/env bash
# Run 17's first call (session 23): the one-column sparse kernel on the GPU (tests, kernel A/B and launch
# sweep), then the sea module old (HEAD ae7554b's source in .ab_old) against new, alternated, and the new
# module's stage profile at 64K.
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider -rfEx -k "one_column" tests/test_sparse_attention_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
timeout 150 python benchmarks/single_column_tune.py --seq 65536 --configs --out "$OUT" > "$OUT/tune.log" 2>&1
stamp tune $?
for side in old new old new; do
  src=src; [ $side = old ] && src=.ab_old/src
  PYTHONPATH=$src:/tmp/site timeout 60 python -m approxattn.bench run --preset sea --seq 65536 \
    --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side >> "$OUT/sea_ab.log" 2>&1
  stamp "sea $side" $?
  echo "== $side done" >> "$OUT/sea_ab.log"
done
timeout 120 python benchmarks/sea_stages.py --seq 65536 --ops --repeats 9 --out "$OUT/stages" > "$OUT/stages.log" 2>&1
stamp stages $?
