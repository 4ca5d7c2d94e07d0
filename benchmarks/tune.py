"""Launch-config sweep for the fused kernels on the GPU (B=1, H=16, d=64, bf16, N=65,536).

For each kernel kind, every candidate (BN, num_warps, num_stages) is timed with the other
kinds at their defaults; prints the fastest per kind (copy them into kernels/_launch.py).
Usage: PYTHONPATH=src python benchmarks/tune.py [N] [KIND ...]   (only these kinds, e.g. q_bwd_fused;
TUNE_SETTINGS=favor: only the settings whose name starts so; TUNE_MAXNREG=128,168: instead of the
BN/warps/stages grid, each kind's default config under each register cap, Triton's ``maxnreg``,
beside none: more programs per multiprocessor for kernels that hold ~255 registers a thread)
Launch plans are cached per layout, so the caches are cleared before each candidate.
"""

import os
import sys

import torch
from triton.testing import do_bench

from approxattn.kernels import FeatureConfig, feature_attention
from approxattn.kernels import _launch, causal_chunked, causal_linear_attn, linear_attn

N = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
ONLY = set(sys.argv[2:])
CONFIGS = [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 4, 2), (128, 8, 2), (64, 4, 3), (128, 4, 3),
           (32, 4, 1), (32, 8, 1), (64, 4, 1), (64, 8, 1)]
MAXNREG = [int(x) for x in os.environ.get("TUNE_MAXNREG", "").split(",") if x.strip()]
dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(0)
q, k, v, do = (torch.randn(1, 16, N, 64, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(4))
q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
W = torch.randn(256, 64, device=dev, generator=gen)
SETTINGS = [
    ("favor m=256", FeatureConfig("favor", W, x_scale=64**-0.25, ratio=256**-0.5, eps=1e-6), False,
     ["state", "out", "q_bwd", "dstate", "kv_bwd"]),  # four feature blocks: the split query backward
    ("elu", FeatureConfig("elu", den_eps=1e-6), False, ["state", "out", "q_bwd_fused", "kv_bwd"]),  # one: fused
    ("elu causal", FeatureConfig("elu", den_eps=1e-6), True, ["causal_fwd"]),
    # the chunk-parallel causal kernels (causal_chunked): "chunk" sets the chunk length all of them share
    # (FAVOR+ with its prefix max, the causal default: the most registers of the maps they take)
    ("favor causal m=256", FeatureConfig("favor", W, x_scale=64**-0.25, ratio=256**-0.5, eps=1e-6), True,
     ["chunk", "chunk_states", "chunk_out", "chunk_dq", "chunk_dstates", "chunk_dkv"]),
]


def override(kind=None, config=None):
    """Launch overrides take effect when a plan is built: drop the cached plans."""
    _launch.OVERRIDES.clear()
    if kind is not None:
        _launch.OVERRIDES[kind] = config
    for plans in (linear_attn._FORWARD_PLANS, linear_attn._BACKWARD_PLANS, causal_linear_attn._PLANS,
                  causal_chunked._PLANS):
        plans.clear()


def timed(cfg, causal):
    fwd = do_bench(lambda: feature_attention(q, k, v, cfg, causal=causal), warmup=5, rep=25, return_mode="median")
    both = do_bench(lambda: torch.autograd.grad(feature_attention(q, k, v, cfg, causal=causal), (q, k, v), do),
                    warmup=5, rep=25, return_mode="median")
    return fwd, both


for name, cfg, causal, kinds in SETTINGS:
    if not name.startswith(os.environ.get("TUNE_SETTINGS", "")):
        continue
    kinds = [k for k in kinds if not ONLY or k in ONLY]
    if not kinds:
        continue
    override()
    base_out = feature_attention(q, k, v, cfg, causal=causal).float()
    f0, b0 = timed(cfg, causal)
    print(f"== {name}: defaults fwd {f0:.3f} ms, fwd+bwd {b0:.3f} ms", flush=True)
    for kind in kinds:
        best = None
        seen = set()
        if MAXNREG:
            if kind == "chunk":   # sets the chunk length only: a register cap would not reach any kernel
                continue
            default = _launch.pick_config(kind, cfg.features(64), 64, 64)
            candidates = [(default["BN"], default["num_warps"], default["num_stages"], cap) for cap in [None, *MAXNREG]]
        else:
            candidates = [(bn, warps, stages, None) for bn, warps, stages in CONFIGS]
        for bn, warps, stages, cap in candidates:
            # the chunk-parallel kernels share the chunk length of kind "chunk", which uses nothing else
            same = bn if kind == "chunk" else (warps, stages) if kind.startswith("chunk_") else (bn, warps, stages)
            if (same, cap) in seen:
                continue
            seen.add((same, cap))
            override(kind, {"BN": bn, "num_warps": warps, "num_stages": stages,
                            **({"maxnreg": cap} if cap else {})})
            try:
                out = feature_attention(q, k, v, cfg, causal=causal).float()
                diff = float((out - base_out).norm() / base_out.norm())
                f, b = timed(cfg, causal)
            except Exception as e:  # noqa: BLE001
                print(f"   {kind} {bn},{warps},{stages},maxnreg={cap}: {type(e).__name__} {str(e)[:100]}", flush=True)
                continue
            print(f"   {kind:<10} BN={bn:<4} warps={warps} stages={stages} maxnreg={cap}: fwd {f:.3f} fwd+bwd {b:.3f} "
                  f"(diff {diff:.1e})", flush=True)
            score = b
            if best is None or score < best[0]:
                best = (score, bn, warps, stages, cap)
        print(f" best {name} {kind}: {best}", flush=True)
