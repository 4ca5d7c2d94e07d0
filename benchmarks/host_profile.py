"""Where one method's host time goes: cProfile of fwd+bwd calls through the module (as the bench
calls it), plus the CPU-side torch ops (torch.profiler), on the GPU machine.

Usage: PYTHONPATH=src python benchmarks/host_profile.py METHOD N [option=value ...]
  e.g. benchmarks/host_profile.py flurka-performer 4096 rank=128 num_features=256
The module runs in eval mode, as the bench runs it (HOST_PROFILE_TRAIN=1: training mode);
HOST_PROFILE_FORWARD=1 times the forward alone under no_grad (inference, as the bench's SEA rows),
HOST_PROFILE_CAUSAL=1 the causal call. Options are Python literals (``half_estimate=False``);
HOST_PROFILE_SHAPE="B,H,HKV" sets batch, query heads and key/value heads (default 1,16,16), e.g. "2,9,3" for a
SmolLM2 distillation step's layer (with HOST_PROFILE_TRAIN=1 HOST_PROFILE_CAUSAL=1). It also counts the host syncs
of one call (``torch.cuda.set_sync_debug_mode``) and says where they come from.
"""

import ast
import traceback
import warnings

import cProfile
import io
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import approxattn

method, n = sys.argv[1], int(sys.argv[2])
options = {key: ast.literal_eval(value) for key, value in (arg.split("=", 1) for arg in sys.argv[3:])}
batch, heads, kv_heads = (int(x) for x in os.environ.get("HOST_PROFILE_SHAPE", "1,16,16").split(","))
if method.startswith("flurka") or method == "linformer":
    options.setdefault("max_len", n)
module = approxattn.build(method, head_dim=64, **options).cuda().train(os.environ.get("HOST_PROFILE_TRAIN") == "1")
scale = 64**-0.5 if approxattn.get_method(method).uses_scale else None
q, do = (torch.randn(batch, heads, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
k, v = (torch.randn(batch, kv_heads, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for t in (q, k, v):
    t.requires_grad_()


causal = os.environ.get("HOST_PROFILE_CAUSAL") == "1"


def step():
    if os.environ.get("HOST_PROFILE_FORWARD") == "1":
        with torch.no_grad():
            module(q, k, v, causal=causal, scale=scale)
        return
    torch.autograd.grad(module(q, k, v, causal=causal, scale=scale), (q, k, v), do)


for _ in range(10):
    step()
torch.cuda.synchronize()
calls = 50
t0 = time.perf_counter()
for _ in range(calls):
    step()
host = (time.perf_counter() - t0) / calls * 1e3
torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / calls * 1e3
print(f"{method} {options} B={batch} H={heads}/{kv_heads} N={n} causal={causal}: host {host:.3f} ms/call, "
      f"wall {wall:.3f} ms/call")

sync_sites: dict[str, int] = {}
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step()
torch.cuda.set_sync_debug_mode(0)
for w in caught:
    if "synchroniz" in str(w.message):
        sync_sites[f"{w.filename}:{w.lineno}"] = sync_sites.get(f"{w.filename}:{w.lineno}", 0) + 1
print(f"host syncs in one call: {sum(sync_sites.values())}", *(f"  {c} x {site}" for site, c in sync_sites.items()),
      sep="\n")

profiler = cProfile.Profile()
profiler.enable()
for _ in range(calls):
    step()
profiler.disable()
torch.cuda.synchronize()
text = io.StringIO()
pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats("approxattn", 45)
print(text.getvalue())

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
