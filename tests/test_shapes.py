"""Property tests over shapes: every method accepts any valid SDPA-like shape."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import approxattn
from helpers import CAUSAL_METHODS, METHODS, example, rel_err


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.integers(1, 3),
    seq_q=st.integers(1, 19), seq_k=st.integers(1, 19), head_dim=st.integers(1, 9), value_dim=st.integers(1, 5),
    causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_any_valid_shape(method, batch, kv_heads, groups, seq_q, seq_k, head_dim, value_dim, causal, seed):
    causal = causal and method in CAUSAL_METHODS
    if causal:
        seq_k = seq_q
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, seq_q, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_k, value_dim, generator=gen)
    options = example(method, seq_k)
    out = approxattn.attention(q, k, v, method, causal=causal, **options)
    assert out.shape == (batch, kv_heads * groups, seq_q, value_dim)
    assert torch.isfinite(out).all()
    module = approxattn.build(method, head_dim=head_dim, **(approxattn.get_method(method).infer_options or
                                                             (lambda a, b: {}))(seq_q, seq_k) | options).eval()
    assert rel_err(module(q, k, v, causal=causal), out) < 1e-6
