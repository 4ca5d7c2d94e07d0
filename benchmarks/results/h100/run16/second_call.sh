#!/usr/bin/env bash
# Run 16's second call (session 22), prepared but never run: eleven device starts failed and the session's device
# time ran out (NOTES.md "Run 16"). GPU tests of the exact causal dq as the default and of the projection's 8-warp
# launches, the projection A/B (old = the tree before the patch, new = with it) alternated twice, FAVOR+ against
# performer-pytorch in three processes, FLuRKA at m = 1024. To run it:
#   rm -rf .ab_old && mkdir .ab_old && git archive HEAD src | tar -x -C .ab_old
#   git apply benchmarks/results/h100/run16/projection_warps.patch
#   run(command="bash benchmarks/results/h100/run16/second_call.sh", carry=[".whl", ".ab_old"])
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 170 python -m pytest -m "gpu and not gpu_heavy" tests/test_kernels.py tests/test_sequence_projection.py -n 8 -q \
  -p no:cacheprovider -rfEx > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
timeout 60 python -m pytest -m gpu -q -s -p no:cacheprovider tests/test_kernels.py::test_gpu_causal_elu_dq_with_small_keys \
  >> "$OUT/gpu_tests.log" 2>&1; stamp "dq test" $?
for side in old new old new; do
  src=src; [ $side = old ] && src=.ab_old/src
  PYTHONPATH=$src:/tmp/site timeout 60 python -m approxattn.bench run --preset flurka --seq 65536 --match "FLuRKA r=256 m=64" \
    "FLuRKA r=128 m=64" "FLuRKA r=128 m=256" --no-plots --no-memory --out /tmp/proj_$side >> "$OUT/projection_ab.log" 2>&1
  stamp "projection $side" $?
  echo "== $side done" >> "$OUT/projection_ab.log"
done
for i in 1 2 3; do
  timeout 60 python -m approxattn.bench run --preset headline --seq 65536 --match "FAVOR+ m=256 (fused)" performer-pytorch \
    --exclude causal "PyTorch ref" --no-plots --no-memory --out /tmp/r$i >> "$OUT/rounds.log" 2>&1; stamp "round $i" $?
done
timeout 120 python -m approxattn.bench run --preset flurka --seq 65536 --match "m=1024" --no-plots --no-memory \
  --out /tmp/f1024 > "$OUT/flurka1024.log" 2>&1; stamp flurka1024 $?
cp /tmp/f1024/results.json "$OUT/flurka1024.json"
