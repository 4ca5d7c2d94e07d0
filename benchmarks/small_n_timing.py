"""Steady-state time per fwd+bwd call at small N, where the host sets the pace: many back-to-back
calls between two CUDA events, median of several rounds. For A/B runs of host-side changes, run it
alternately on two sources (the host machine's speed drifts; single bench rows at 1K–4K swing 2×).

Usage: PYTHONPATH=SRC python benchmarks/small_n_timing.py LABEL [N ...]      (prints one JSON line per case)
"""

import json
import sys

import torch
import torch.nn.functional as F

import approxattn

label = sys.argv[1]
sizes = [int(x) for x in sys.argv[2:]] or [1024, 2048, 4096]
calls, rounds = 100, 9
CASES = {  # name → (method, options, causal); None = SDPA
    "SDPA flash": (None, {}, False),
    "SDPA flash causal": (None, {}, True),
    "FAVOR+ m=256": ("performer", {"num_features": 256}, False),
    "elu+1": ("linear", {}, False),
    "elu+1 causal": ("linear", {}, True),
}


def timed(fn) -> float:
    """Median ms per call over ``rounds`` rounds of ``calls`` calls."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[rounds // 2]


for n in sizes:
    q, k, v, do = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    for name, (method, options, causal) in CASES.items():
        if method is None:
            def attend(causal=causal):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            module = approxattn.build(method, head_dim=64, **options).cuda().eval()
            scale = 64**-0.5 if approxattn.get_method(method).uses_scale else None

            def attend(module=module, scale=scale, causal=causal):
                return module(q, k, v, causal=causal, scale=scale)
        ms = timed(lambda: torch.autograd.grad(attend(), (q, k, v), do))
        with torch.no_grad():
            fwd = timed(attend)
        print(json.dumps({"label": label, "case": name, "N": n, "fwd_bwd_ms": round(ms, 4), "fwd_ms": round(fwd, 4)}),
              flush=True)
