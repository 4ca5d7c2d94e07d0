"""FLuRKA / Linformer fwd+bwd at N = 65,536 (B=1, H=16, d=64, bf16), with gradients for q, k, v only (as
`approxattn bench` times it) and with the learned E, F as well (training), medians of triton's do_bench.

Usage: PYTHONPATH=src python benchmarks/flurka_grads.py LABEL   (run once per source tree, alternating, for an A/B)
"""

import sys

import torch
from triton.testing import do_bench

import approxattn

label = sys.argv[1] if len(sys.argv) > 1 else "?"
N = 65536
CASES = [("flurka-performer", {"rank": 128, "num_features": 256}), ("flurka-performer", {"rank": 128, "num_features": 64}),
         ("linformer", {"rank": 128})]
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, 16, N, 64, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
do = torch.randn(1, 16, N, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
for method, options in CASES:
    module = approxattn.build(method, head_dim=64, max_len=N, **options).cuda()
    params = list(module.parameters())
    fwd = do_bench(lambda: module(q, k, v), warmup=50, rep=300)
    inputs = do_bench(lambda: torch.autograd.grad(module(q, k, v), (q, k, v), do), warmup=50, rep=300)
    train = do_bench(lambda: torch.autograd.grad(module(q, k, v), (q, k, v, *params), do), warmup=50, rep=300)
    print(f"{label:4s} {method:17s} {str(options):38s} fwd {fwd:7.3f}  fwd+bwd (q,k,v) {inputs:7.3f}  "
          f"(q,k,v,E,F) {train:7.3f} ms", flush=True)
