"""How precisely the FAVOR+ projection must be computed for half-precision rows (CPU, float64 math).

Relative output error of FAVOR+ (m = 256, d = 64, stabilised as the kernels do) when the projection
ω is rounded to fp16, to bf16, or split into bf16 hi + lo (what the fused kernels use), against ω
exact; the inputs are bf16 values. Also the error of merely rounding the exact output to bf16, for
scale. Behind the run-5 notes (benchmarks/results/h100/NOTES.md): `python benchmarks/projection_precision.py`.
"""

from __future__ import annotations

import math

import torch


def favor(w, q, k, v, xs, eps=1e-4):
    def features(x, key):
        p = xs * (x @ w.T) - 0.5 * xs * xs * (x * x).sum(-1, keepdim=True)
        c = p.amax(dim=(-1, -2), keepdim=True) if key else p.amax(-1, keepdim=True)
        return (torch.exp(p - c) + eps) / math.sqrt(w.shape[0])

    fq, fk = features(q, False), features(k, True)
    return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2)[..., None])


def main() -> None:
    torch.manual_seed(0)
    heads, n, d, m = 4, 4096, 64, 256
    q, k, v = (torch.randn(1, heads, n, d).bfloat16().double() for _ in range(3))
    w = torch.randn(m, d, dtype=torch.float64)
    xs = d**-0.25
    ref = favor(w, q, k, v, xs)

    def rel(out):
        return float((out - ref).norm() / ref.norm())

    hi = w.to(torch.bfloat16).double()
    lo = (w - hi).to(torch.bfloat16).double()
    print(f"N={n}, H={heads}, d={d}, m={m}: relative output error against the exact projection")
    print(f"  omega in fp16           {rel(favor(w.half().double(), q, k, v, xs)):.2e}")
    print(f"  omega in bf16           {rel(favor(hi, q, k, v, xs)):.2e}")
    print(f"  omega as bf16 hi + lo   {rel(favor(hi + lo, q, k, v, xs)):.2e}")
    print(f"  output rounded to bf16  {rel(ref.bfloat16().double()):.2e}")


if __name__ == "__main__":
    main()
