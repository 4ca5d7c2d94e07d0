"""elu+1 linear attention against its explicit kernel form."""

from __future__ import annotations

import pytest

import approxattn
import naive
from helpers import qkv, rel_err


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_matches_explicit_elu_kernel(causal, chunk):
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=23, std=1.0)
    out = approxattn.attention(q, k, v, "linear", causal=causal, chunk_size=chunk, den_eps=0.0)
    assert rel_err(out, naive.elu_linear(q, k, v, causal)) < 1e-12


def test_scale_is_rejected_because_the_feature_map_has_none():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale"):
        approxattn.attention(q, k, v, "linear", scale=0.5)
