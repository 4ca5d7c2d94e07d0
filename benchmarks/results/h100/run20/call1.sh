#!/usr/bin/env bash
# Run 20's first call (prepared in session 26): the sea module at 64K with run 19's winners as defaults (the paired
# split-dot head, the first GEMM at 128 × 128 / 4 warps / 3 stages, the band middle conv) against 38e272a (.ab_old),
# one process a side, twice; the band kernel's sweep (with programs that loop over row blocks), the head's configs
# around its new default (--near), and the module with their best; the stage profile at 64K; SEA's GPU tests. A call brings back at most 8 files, so every
# log goes into /tmp/r, packed into $OUT/results.tgz after each step (a call cut by its limit keeps the steps before).
#   run(command="bash benchmarks/results/h100/run20/call1.sh", carry=[".whl", ".ab_old"], kind="nvidia-h100-x1")
#   DEADLINE (s, default 585): when the steps stop.
set -u
START=$(date +%s)
source benchmarks/device_setup.sh
R=/tmp/r; mkdir -p $R; mv "$OUT/session.log" $R/
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> $R/session.log; tar -czf "$OUT/results.tgz" -C $R .; }
left() { local l=$(( ${DEADLINE:-585} - ($(date +%s) - START) )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
for round in 1 2; do
  for side in old new; do
    src=src; [ $side = old ] && src=.ab_old/src
    PYTHONPATH=$src:/tmp/site timeout 35 python -m approxattn.bench run --preset sea --seq 65536 \
      --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side \
      >> $R/sea_ab.log 2>&1
    stamp "sea $side $round" $?
  done
done
# the band kernel's configs, those that loop over row blocks (GRID_M) among them, then the module with the best
timeout $(left 60) python benchmarks/row_gemm_tune.py --steps band --json $R/row_gemm_tune.json > $R/band_tune.log 2>&1
stamp band_tune $?
timeout $(left 90) python benchmarks/sea_head_tune.py --near --out $R > $R/head_tune.log 2>&1; stamp head_tune $?
timeout $(left 60) python benchmarks/sea_tuned_ab.py --results $R > $R/tuned_ab.log 2>&1; stamp tuned_ab $?
# the stage profile with the new defaults (what is left at 64K)
timeout $(left 60) python benchmarks/sea_stages.py --seq 65536 --ops > $R/stages.log 2>&1; stamp stages $?
timeout $(left 150) python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py tests/test_band_conv.py \
  tests/test_row_window_gemm.py > $R/gpu_tests.log 2>&1; stamp tests $?
