"""Host time per call of each layer of the non-causal fused path, without a profiler's overhead.

Each row times ``calls`` back-to-back calls with ``time.perf_counter`` and no sync in between, at a size
where the GPU finishes each kernel before the host can launch the next (N = 256 unless told), so
the figure is the host's: SDPA beside it for scale, then the module, the op, the raw forward and
backward, one launch, one allocation, and an empty autograd Function.

Usage: PYTHONPATH=src python benchmarks/host_breakdown.py [N] [METHOD ...]   (default: 256 performer linear)
"""

import sys
import time

import torch
import torch.nn.functional as F

import approxattn
from approxattn.kernels import _launch, linear_attn
from approxattn.kernels.dispatch import linear_config, performer_config
from approxattn.kernels.ops import unchecked_feature_attention

n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
methods = sys.argv[2:] or ["performer", "linear"]
calls = 400


def host_us(fn, repeat: int = 5) -> float:
    """Median over ``repeat`` rounds of the host time per call (µs)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[len(rounds) // 2]


def row(name: str, fn) -> None:
    print(f"{name:<48} {host_us(fn):8.1f} µs", flush=True)


q, k, v, do = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
for t in (q, k, v):
    t.requires_grad_()
print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  N={n}  B=1 H=16 d=64 bf16  ({calls} calls a round)")
row("SDPA fwd+bwd (autograd.grad)", lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), do))
with torch.no_grad():
    row("SDPA forward (no_grad)", lambda: F.scaled_dot_product_attention(q, k, v))


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        return g, g, g


row("empty autograd Function fwd+bwd", lambda: torch.autograd.grad(Identity.apply(q, k, v), (q, k, v), do))
row("torch.empty (one allocation)", lambda: torch.empty(4096, device="cuda"))

for method in methods:
    module = approxattn.build(method, head_dim=64).cuda().eval()
    scale = 64**-0.5 if approxattn.get_method(method).uses_scale else None
    cfg = linear_config(module) if method == "linear" else performer_config(module, 64**-0.5)
    print(f"-- {method}")
    row("module fwd+bwd", lambda: torch.autograd.grad(module(q, k, v, scale=scale), (q, k, v), do))
    with torch.no_grad():
        row("module forward (no_grad)", lambda: module(q, k, v, scale=scale))
        row("op forward (no_grad)", lambda: unchecked_feature_attention(q, k, v, cfg))
        row("raw _forward (plan + 3 launches)", lambda: linear_attn._forward(q, k, v, None, cfg))
    row("op fwd+bwd", lambda: torch.autograd.grad(unchecked_feature_attention(q, k, v, cfg), (q, k, v), do))
    row("op forward (grad enabled, graph dropped)", lambda: unchecked_feature_attention(q, k, v, cfg))
    kept = unchecked_feature_attention(q, k, v, cfg)
    row("op backward only (retain_graph)", lambda: torch.autograd.grad(kept, (q, k, v), do, retain_graph=True))
    with torch.autograd.set_multithreading_enabled(False):
        row("op fwd+bwd, backward on the calling thread",
            lambda: torch.autograd.grad(unchecked_feature_attention(q, k, v, cfg), (q, k, v), do))
        row("SDPA fwd+bwd, backward on the calling thread",
            lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), do))
        row("empty Function fwd+bwd, on the calling thread",
            lambda: torch.autograd.grad(Identity.apply(q, k, v), (q, k, v), do))
    print("plans cached:", len(linear_attn._FORWARD_PLANS), len(linear_attn._BACKWARD_PLANS),
          "direct launch:", _launch.DIRECT_LAUNCH)
    o, stats, (state, halves), key = linear_attn._forward(q, k, v, None, cfg)
    row("raw _backward (plan + 3-4 launches)",
        lambda: linear_attn._backward(do, q, k, v, o, stats, state, halves, None, key, cfg))
    row("performer_config / linear_config",
        lambda: linear_config(module) if method == "linear" else performer_config(module, 64**-0.5))
    row("cfg.split_weight (cached)", lambda: cfg.split_weight(q, folded=True))
    row("layout_key(q, k, v, None)", lambda: linear_attn.layout_key(q, k, v, None))
    plan = linear_attn._FORWARD_PLANS[key]
    whi, wlo = cfg.split_weight(q, folded=True)
    out_args = (q, whi, wlo, state, halves, state, o, stats)
    row("one Launch (_out_fwd)", lambda: plan.out(*out_args))
