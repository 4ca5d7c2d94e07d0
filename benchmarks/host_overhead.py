"""Where the host time of one fused fwd+bwd goes (cProfile), and the cost of one Triton launch.

Usage: PYTHONPATH=src python benchmarks/host_overhead.py
"""

import cProfile
import pstats
import time

import torch
import triton
import triton.language as tl

from approxattn.kernels import FeatureConfig, feature_attention


@triton.jit
def _noop(x_ptr, n):
    pass


x = torch.zeros(16, device="cuda")
_noop[(1,)](x, 16)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(1000):
    _noop[(1,)](x, 16)
print(f"trivial triton launch: {(time.perf_counter() - t0) * 1e3:.1f} us/launch (host)", flush=True)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(1000):
    torch.empty(16, device="cuda")
print(f"torch.empty: {(time.perf_counter() - t0) * 1e3:.1f} us", flush=True)

cfg = FeatureConfig("elu", den_eps=1e-6)
for causal in (False, True):
    q, k, v, do = (torch.randn(1, 16, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        torch.autograd.grad(feature_attention(q, k, v, cfg, causal=causal), (q, k, v), do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        step()
    prof.disable()
    torch.cuda.synchronize()
    print(f"== elu causal={causal}: cProfile of 20 fwd+bwd", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
