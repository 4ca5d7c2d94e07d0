# Sourced by the one-call device scripts (h100_session.sh, h100_flurka.sh): $OUT, the peers' wheels from .whl
# installed into /tmp/site (the image's system pip refused them in run 3), PYTHONPATH, and $OUT/session.log
# begun with the device, the versions and the time.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > /tmp/wheels.log 2>&1
export PYTHONPATH=src:/tmp/site
{
  nvidia-smi -L
  tail -2 /tmp/wheels.log
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +"%Y-%m-%d %H:%M:%S UTC"
} > "$OUT/session.log" 2>&1
