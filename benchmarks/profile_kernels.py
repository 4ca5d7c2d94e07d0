"""Per-kernel CUDA times and host time per call of the fused ops (torch.profiler).

Usage: PYTHONPATH=src python benchmarks/profile_kernels.py   (PROFILE_MATCH=causal: only cases so named)
"""

import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from approxattn.kernels import FeatureConfig
from feature_step import fwd_bwd_step

dev = "cuda"
W = torch.randn(256, 64, device=dev)
CASES = [
    ("elu", FeatureConfig("elu", den_eps=1e-6), False, 4096),
    ("elu", FeatureConfig("elu", den_eps=1e-6), False, 65536),
    ("favor m=256", FeatureConfig("favor", W, x_scale=64**-0.25, ratio=256**-0.5, eps=1e-6), False, 65536),
    ("elu causal", FeatureConfig("elu", den_eps=1e-6), True, 4096),
    ("elu causal", FeatureConfig("elu", den_eps=1e-6), True, 65536),
    ("relu m=256 causal", FeatureConfig("relu", W, x_scale=64**-0.25, eps=1e-3), True, 65536),
    ("favor m=256 causal unstabilised", FeatureConfig("favor", W, x_scale=64**-0.25, ratio=256**-0.5, eps=1e-6,
                                                      stabilize=False), True, 65536),
    ("favor m=256 causal prefix-max", FeatureConfig("favor", W, x_scale=64**-0.25, ratio=256**-0.5, eps=1e-6),
     True, 65536),
]
for name, cfg, causal, n in CASES:
    if os.environ.get("PROFILE_MATCH", "") not in name:
        continue
    if causal and cfg.use_key_max:
        from approxattn.kernels import causal_linear_attn

        if not causal_linear_attn.SUPPORTS_PREFIX_MAX:
            continue
    step = fwd_bwd_step(cfg, causal, n, device=dev)
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    host = (time.perf_counter() - t0) / 10 * 1e3  # launch-side time (no sync inside)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 10 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== {name} N={n}: host {host:.3f} ms/call, wall {wall:.3f} ms/call", flush=True)
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print(f"   {e.key[:60]:<60} {e.device_time_total / 5 / 1e3:8.3f} ms/call  x{e.count // 5}", flush=True)
