#!/usr/bin/env bash
# Run 17's second call (session 23): GPU tests of the lean head, the fused encoder and the one-column kernel
# through the module; the sea module old (.ab_old = 28b0580: the one-column kernel at its first config) against
# new with the direct lean head and new with the head as GEMMs (pair, the default), alternated twice (new also
# writes [P, v] by one kernel); the new module's stage profile; the head's forms at 64K (sea_head_tune.py); the
# estimator's launch configs at SEA's shape (sea_estimator_tune.py).
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 90 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py \
  "tests/test_sparse_attention_gpu.py::test_one_column_kernel_matches_reference_at_real_sizes" \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
for round in 1 2; do
  for side in old direct pair; do
    src=src; [ $side = old ] && src=.ab_old/src
    APPROXATTN_SEA_LEAN_HEAD=$([ $side = direct ] && echo direct || echo pair) PYTHONPATH=$src:/tmp/site timeout 40 \
      python -m approxattn.bench run --preset sea --seq 65536 --match "SDPA flash" "sea module" --exclude causal graphed \
      --no-plots --no-memory --out /tmp/sea_$side >> "$OUT/sea_ab.log" 2>&1
    stamp "sea $side" $?
    echo "== $side done" >> "$OUT/sea_ab.log"
  done
done
timeout 40 python benchmarks/sea_stages.py --seq 65536 --ops --repeats 9 --out "$OUT/stages" > "$OUT/stages.log" 2>&1
stamp stages $?
timeout 50 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 40 python benchmarks/sea_estimator_tune.py --out "$OUT" > "$OUT/estimator_tune.log" 2>&1; stamp estimator_tune $?
