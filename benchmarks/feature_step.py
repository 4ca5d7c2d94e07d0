"""One fwd+bwd of the public fused op on fresh bf16 inputs (B=1, H=16, d=64), warmed up: the setup the
kernel profilers share (``profile_kernels.py``, ``ncu_probe.py``; scripts in this folder import it)."""

import torch

from approxattn.kernels import FeatureConfig, feature_attention


def fwd_bwd_step(cfg: FeatureConfig, causal: bool, n: int, *, device: str = "cuda", warmup: int = 3):
    """``step()``: ``feature_attention`` forward and backward of (1, 16, n, 64) inputs, after ``warmup``
    calls and a sync (kernels compiled, plans cached)."""
    q, k, v, do = (torch.randn(1, 16, n, 64, device=device, dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        torch.autograd.grad(feature_attention(q, k, v, cfg, causal=causal), (q, k, v), do)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return step
