#!/usr/bin/env bash
# SEA A/B in one device call: the sparse/conv/LayerNorm GPU tests, then `benchmarks/sea_stages.py` at 16K and 64K
# alternating the previous source (an ignored copy in .ab_old: `rm -rf .ab_old && mkdir .ab_old && git archive
# HEAD src | tar -x -C .ab_old`) and the working tree, twice (the second new run with --ops), then old-vs-new
# agreement of outputs and selections (`benchmarks/sea_outputs.py`). Eight files come back in $OUT.
#   run(command="bash benchmarks/h100_sea_ab.sh", carry=[".ab_old"])
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L > $OUT/session.log; date -u >> $OUT/session.log
PYTHONPATH=src timeout 200 python -m pytest -m "gpu and not gpu_heavy" tests/test_sparse_attention_gpu.py tests/test_small_conv.py tests/test_layer_norm.py -n 8 -q -p no:cacheprovider -rfEx > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$?" >> $OUT/session.log
for i in 1 2; do
  PYTHONPATH=.ab_old/src timeout 120 python benchmarks/sea_stages.py --seq 16384,65536 --out /tmp/old$i > $OUT/stages_old$i.log 2>&1
  PYTHONPATH=src timeout 120 python benchmarks/sea_stages.py --seq 16384,65536 --out /tmp/new$i $( [ $i = 2 ] && echo --ops ) > $OUT/stages_new$i.log 2>&1
done
cp /tmp/new2/sea_stages.json $OUT/sea_stages_new.json
PYTHONPATH=.ab_old/src python benchmarks/sea_outputs.py save /tmp/o.pt --seq 4096,65536 > $OUT/agree.log 2>&1
PYTHONPATH=src python benchmarks/sea_outputs.py save /tmp/n.pt --seq 4096,65536 >> $OUT/agree.log 2>&1
python benchmarks/sea_outputs.py compare /tmp/o.pt /tmp/n.pt >> $OUT/agree.log 2>&1
date -u >> $OUT/session.log
