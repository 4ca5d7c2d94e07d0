"""Shared test helpers: random inputs, relative errors, the Triton skip mark."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import approxattn


# kernel tests that run under TRITON_INTERPRET=1 on the CPU need triton itself
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def qkv(
    batch=2, heads=4, kv_heads=2, seq_q=16, seq_k=None, head_dim=8, value_dim=None,
    dtype=torch.float64, std=0.5, generator=None, requires_grad=False,
):
    """Random q, k, v with entries N(0, std²) (logit std ≈ std² for the default scale)."""
    seq_k = seq_q if seq_k is None else seq_k
    value_dim = head_dim if value_dim is None else value_dim
    gen = generator or torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())

    def draw(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).requires_grad_(requires_grad)

    return (
        draw(batch, heads, seq_q, head_dim),
        draw(batch, kv_heads, seq_k, head_dim),
        torch.randn(batch, kv_heads, seq_k, value_dim, generator=gen, dtype=torch.float64).to(dtype)
        .requires_grad_(requires_grad),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def example(method: str, n: int, **overrides):
    """A cheap configuration of ``method`` for n-token inputs, from its registry entry."""
    return approxattn.get_method(method).example_options(n) | overrides


METHODS = list(approxattn.available_methods())
CAUSAL_METHODS = [n for n, s in approxattn.available_methods().items() if s.supports_causal]
NONCAUSAL_ONLY = [n for n, s in approxattn.available_methods().items() if not s.supports_causal]
