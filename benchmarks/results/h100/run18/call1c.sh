#!/usr/bin/env bash
# Run 18's first call cut again (session 24's failed device starts left ~6 minutes): GPU tests of the banded decoder
# head and of the module at long N; the sea module old (.ab_old = 38e272a) against new at 64K, once each; the head
# against the direct kernel (no config sweep); the one-column tables; the stage profile.
#   run(command="bash benchmarks/results/h100/run18/call1c.sh", carry=[".whl", ".ab_old"])
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 60 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_decoder_head.py \
  "tests/test_sea_gpu.py::test_forward_at_long_n_agrees_with_details_and_the_reference" \
  > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
for side in old new; do
  src=src; [ $side = old ] && src=.ab_old/src
  PYTHONPATH=$src:/tmp/site timeout 30 python -m approxattn.bench run --preset sea --seq 65536 \
    --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side \
    >> "$OUT/sea_ab.log" 2>&1
  stamp "sea $side" $?
  echo "== $side done" >> "$OUT/sea_ab.log"
done
timeout 40 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 30 python benchmarks/single_column_tune.py --seq 65536 --out "$OUT" > "$OUT/single_column.log" 2>&1
stamp single_column $?
timeout 30 python benchmarks/sea_stages.py --seq 65536 --ops --repeats 9 --out "$OUT/stages" > "$OUT/stages.log" 2>&1
stamp stages $?
