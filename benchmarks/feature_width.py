"""Non-causal FAVOR+ fwd+bwd time against the feature count m (GPU; B=1, H=16, d=64, bf16).

Checks a backward change across feature widths beyond the headline m = 256, e.g. old vs new
source in one device call:
    PYTHONPATH=.ab_old/src python benchmarks/feature_width.py old; PYTHONPATH=src python benchmarks/feature_width.py new
"""

import sys

import torch
from triton.testing import do_bench

from approxattn.kernels import FeatureConfig, feature_attention

N = 65536
TAG = sys.argv[1] if len(sys.argv) > 1 else ""
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v, do = (torch.randn(1, 16, N, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
for t in (q, k, v):
    t.requires_grad_()
for m in (256, 320, 512):
    cfg = FeatureConfig("favor", torch.randn(m, 64, device="cuda", generator=gen), x_scale=64**-0.25,
                        ratio=m**-0.5, eps=1e-6)
    ms = do_bench(lambda: torch.autograd.grad(feature_attention(q, k, v, cfg, causal=False), (q, k, v), do),
                  warmup=10, rep=50, return_mode="median")
    print(f"{TAG} FAVOR+ m={m} N={N} fwd+bwd {ms:.3f} ms", flush=True)
