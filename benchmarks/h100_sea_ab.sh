#!/usr/bin/env bash
# SEA A/B in one device call: the SEA GPU tests (module, sparse kernel, small conv, LayerNorm), then
# `benchmarks/sea_stages.py` at 4K, 16K and 64K alternating the previous source (an ignored copy in .ab_old:
# `rm -rf .ab_old && mkdir .ab_old && git archive HEAD src | tar -x -C .ab_old`), the working tree, and the
# working tree with APPROXATTN_SPARSE_UNIFORM_TILES=0 (the sparse kernel's per-element mask on every tile),
# twice (the second new run with --ops), then old-vs-new agreement of outputs and selections
# (`benchmarks/sea_outputs.py`). The one-line results of every run are gathered in $OUT/summary.log and the
# whole logs in $OUT/stages.tar.gz (the device returns at most 8 files).
#   run(command="bash benchmarks/h100_sea_ab.sh", carry=[".ab_old"])
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
REPEATS=${REPEATS:-15}
ROUNDS=${ROUNDS:-2}
SEQ=${SEQ:-4096,16384,65536}
nvidia-smi -L > $OUT/session.log; date -u >> $OUT/session.log
PYTHONPATH=src timeout 240 python -m pytest -m "gpu and not gpu_heavy" tests/test_sea_gpu.py tests/test_sparse_attention_gpu.py \
  tests/test_small_conv.py tests/test_layer_norm.py -n 8 -q -p no:cacheprovider -rfEx > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$?" >> $OUT/session.log
for i in $(seq $ROUNDS); do
  PYTHONPATH=.ab_old/src timeout 150 python benchmarks/sea_stages.py --seq $SEQ --repeats $REPEATS > /tmp/stages_old$i.log 2>&1
  APPROXATTN_SPARSE_UNIFORM_TILES=0 PYTHONPATH=src timeout 150 python benchmarks/sea_stages.py --seq $SEQ \
    --repeats $REPEATS > /tmp/stages_elementmask$i.log 2>&1
  PYTHONPATH=src timeout 150 python benchmarks/sea_stages.py --seq $SEQ --repeats $REPEATS --out /tmp/new$i \
    $( [ $i = 2 ] && echo --ops ) > /tmp/stages_new$i.log 2>&1
done
cp /tmp/new$ROUNDS/sea_stages.json $OUT/sea_stages_new.json
for f in $(cd /tmp && ls stages_*.log); do echo "== $f"; grep "^N=" /tmp/$f; done > $OUT/summary.log
tar -czf $OUT/stages.tar.gz -C /tmp $(cd /tmp && ls stages_*.log)
PYTHONPATH=.ab_old/src timeout 100 python benchmarks/sea_outputs.py save /tmp/o.pt --seq 4096,65536 > $OUT/agree.log 2>&1
PYTHONPATH=src timeout 100 python benchmarks/sea_outputs.py save /tmp/n.pt --seq 4096,65536 >> $OUT/agree.log 2>&1
PYTHONPATH=src timeout 100 python benchmarks/sea_outputs.py save /tmp/f.pt --seq 4096,65536 \
  --option half_estimate=False >> $OUT/agree.log 2>&1
echo "old vs new:" >> $OUT/agree.log
python benchmarks/sea_outputs.py compare /tmp/o.pt /tmp/n.pt >> $OUT/agree.log 2>&1
echo "old vs new with half_estimate=False (fp32 maps):" >> $OUT/agree.log
python benchmarks/sea_outputs.py compare /tmp/o.pt /tmp/f.pt >> $OUT/agree.log 2>&1
echo "new with fp32 maps vs new:" >> $OUT/agree.log
python benchmarks/sea_outputs.py compare /tmp/f.pt /tmp/n.pt >> $OUT/agree.log 2>&1
date -u >> $OUT/session.log
