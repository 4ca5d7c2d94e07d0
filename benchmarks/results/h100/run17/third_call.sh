#!/usr/bin/env bash
# Run 17's third call (session 23): the forward-at-long-N GPU tests with the direct lean head as the default
# (call 2's default, the pair head, asked for too much shared memory); the pair head's launch configs at 64K;
# the module old (.ab_old = 28b0580) against new (direct lean head, fused encoder, [P, v] kernel, state config).
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 60 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py -k long_n \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
for side in old new; do
  src=src; [ $side = old ] && src=.ab_old/src
  PYTHONPATH=$src:/tmp/site timeout 30 python -m approxattn.bench run --preset sea --seq 65536 --match "SDPA flash" \
    "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side >> "$OUT/sea_ab.log" 2>&1
  stamp "sea $side" $?
  echo "== $side done" >> "$OUT/sea_ab.log"
done
timeout 45 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
