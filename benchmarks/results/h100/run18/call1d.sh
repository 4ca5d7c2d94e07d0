#!/usr/bin/env bash
# Run 18's first call cut to ~2 minutes (session 24's failed device starts left ~4.5 minutes of device time): the
# banded head's GPU test, the sea module old (.ab_old = 38e272a) against new at 64K once each, the head against the
# direct kernel, the one-column tables.
#   run(command="bash benchmarks/results/h100/run18/call1d.sh", carry=[".whl", ".ab_old"])
set -u
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
timeout 30 python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_decoder_head.py > "$OUT/gpu_tests.log" 2>&1
stamp tests $?
for side in old new; do
  src=src; [ $side = old ] && src=.ab_old/src
  PYTHONPATH=$src:/tmp/site timeout 25 python -m approxattn.bench run --preset sea --seq 65536 \
    --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side \
    >> "$OUT/sea_ab.log" 2>&1
  stamp "sea $side" $?
  echo "== $side done" >> "$OUT/sea_ab.log"
done
timeout 25 python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout 20 python benchmarks/single_column_tune.py --seq 65536 --out "$OUT" > "$OUT/single_column.log" 2>&1
stamp single_column $?
