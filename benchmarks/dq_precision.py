"""Where elu+1's bf16 dq error comes from (session 21, benchmarks/results/h100/NOTES.md), on the CPU.

    TRITON_INTERPRET=1 APPROXATTN_FORCE_KERNELS=1 python benchmarks/dq_precision.py

1. Fused (Triton interpreter) against the fp32 reference path, relative errors of out, dq, dk, dv:
   FLuRKA-linear (rank 128, 2,048 tokens, the GPU test's inputs for one batch and head group) and causal
   elu+1 (512 tokens, keys and values x 0.25 and x 1) with ``APPROXATTN_CAUSAL_DQ`` fast and exact.
2. Float64 emulation of each rounding alone against the exact dq: the stored bf16 o in do·o, elu+1 key
   features rounded to bf16, query features, the dq store; for FLuRKA-linear also k_r, v_r rounded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import approxattn  # noqa: E402
from approxattn.kernels import causal_linear_attn  # noqa: E402
from test_kernels import _fused_against_reference, inputs  # noqa: E402  (the kernel tests' helpers)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def fused_against_reference(module, q, k, v, do, **call) -> list[float]:
    """The kernel tests' fused-vs-reference errors (out, dq, dk, dv), which also check the fused path ran."""
    with pytest.MonkeyPatch.context() as mp:
        return _fused_against_reference(mp, module, q, k, v, do, **call)


def b16(t):
    return t.bfloat16().double()


def phi(x):
    return torch.nn.functional.elu(x) + 1


def emulated_dq(q, fk, v, do, *, causal, round_o=False, round_fk=False, round_fq=False, round_dq=False):
    """dq of elu+1 attention from key features ``fk`` (float64), with the named roundings to bf16."""
    fq = phi(q)
    fk_used, fq_used = (b16(fk) if round_fk else fk), (b16(fq) if round_fq else fq)
    A = fq_used @ fk_used.transpose(-1, -2)
    if causal:
        A = A * torch.ones(A.shape[-2:], dtype=torch.bool).tril()
    den = A.sum(-1, keepdim=True)
    o = (A @ v) / den
    o_used = b16(o) if round_o else o
    B = (do @ v.transpose(-1, -2) - (o_used * do).sum(-1, keepdim=True)) / den
    if causal:
        B = B * torch.ones(B.shape[-2:], dtype=torch.bool).tril()
    dq = torch.where(q > 0, torch.ones_like(q), torch.exp(q)) * (B @ fk_used)
    return b16(dq) if round_dq else dq


def emulate(name, q, fk, v, do, causal, extra=()):
    exact = emulated_dq(q, fk, v, do, causal=causal)
    rows = [(label, emulated_dq(q, fk, v, do, causal=causal, **{flag: True})) for label, flag in
            (("stored o in do·o", "round_o"), ("key features", "round_fk"), ("query features", "round_fq"),
             ("dq store", "round_dq"))]
    rows.append(("all four", emulated_dq(q, fk, v, do, causal=causal, round_o=True, round_fk=True, round_fq=True,
                                         round_dq=True)))
    print(f"  float64 emulation, {name}: dq error of each bf16 rounding alone")
    for label, dq in list(extra) + rows:
        print(f"    {label:<24} {rel(dq, exact):.2e}")


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("APPROXATTN_FORCE_KERNELS") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 APPROXATTN_FORCE_KERNELS=1 (the fused path on CPU tensors)")
    names = ("out", "dq", "dk", "dv")

    (q, k, v, do), _ = inputs(1, 2, 1, 2048, 2048, 64, 64, torch.bfloat16, "cpu", 7)
    mask = torch.ones(1, 2048, dtype=torch.bool)
    mask[0, 1900:] = False
    flurka = approxattn.build("flurka-linear", head_dim=64, rank=128)
    errors = fused_against_reference(flurka, q, k, v, do, key_padding_mask=mask)
    print("FLuRKA-linear r=128, N=2048, bf16, fused vs reference:",
          ", ".join(f"{n} {e:.2e}" for n, e in zip(names, errors)))
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    with torch.no_grad():
        kr, vr, valid = flurka.double().projection(k64, v64, mask)
    fk = phi(kr) * valid[:, None, :, None]
    kr_rounded = emulated_dq(q64, phi(b16(kr)) * valid[:, None, :, None], b16(vr), do64, causal=False)
    emulate("FLuRKA-linear", q64, fk, vr, do64, False, extra=[("k_r, v_r", kr_rounded)])

    for scale in (0.25, 1.0):
        (q, k, v, do), _ = inputs(1, 2, 1, 512, 512, 64, 64, torch.bfloat16, "cpu", 7)
        k, v = (k.float() * scale).bfloat16(), (v.float() * scale).bfloat16()
        for mode in ("fast", "exact"):
            causal_linear_attn.CAUSAL_DQ = mode
            causal_linear_attn._PLANS.clear()
            errors = fused_against_reference(approxattn.build("linear", head_dim=64), q, k, v, do, causal=True)
            print(f"causal elu+1, N=512, keys and values x{scale}, CAUSAL_DQ={mode}, fused vs reference:",
                  ", ".join(f"{n} {e:.2e}" for n, e in zip(names, errors)))
        q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
        emulate(f"causal elu+1, x{scale}", q64, phi(k64), v64, do64, True)


if __name__ == "__main__":
    main()
