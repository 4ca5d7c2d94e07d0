#!/usr/bin/env bash
# Run 19's first call (session 25), ~8 minutes, in order of need (failed starts leave little device time, so a cut
# call still returns the first steps): the sea module old (.ab_old = 38e272a's source) against new at 64K, one
# process a side, twice (new: the fast-math head and encoder, the shared epilogue); the head's 19 configs with the
# split dots' and paired kernel's precision against the fp64 twin; SEA's and the row-window GEMMs' GPU tests; the
# module with the best head config against its default.
#   run(command="bash benchmarks/results/h100/run19/call1.sh", carry=[".whl", ".ab_old"], kind="nvidia-h100-x1")
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
for round in 1 2; do
  for side in old new; do
    src=src; [ $side = old ] && src=.ab_old/src
    PYTHONPATH=$src:/tmp/site timeout 30 python -m approxattn.bench run --preset sea --seq 65536 \
      --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side \
      >> "$OUT/sea_ab.log" 2>&1
    stamp "sea $side $round" $?
    echo "== $side $round done" >> "$OUT/sea_ab.log"
  done
done
timeout 240 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 100 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py tests/test_row_window_gemm.py \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
timeout 60 python benchmarks/sea_tuned_ab.py --results "$OUT" > "$OUT/tuned_ab.log" 2>&1; stamp tuned_ab $?
