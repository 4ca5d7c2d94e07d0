"""approxattn.nn.MultiheadAttention: a drop-in layer."""

from __future__ import annotations

import pytest
import torch

from approxattn.nn import MultiheadAttention
from helpers import METHODS, example, rel_err


def test_softmax_layer_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4).double()
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    expected, _ = theirs(x, x, x, key_padding_mask=~mask)
    assert rel_err(ours(x, key_padding_mask=mask), expected) < 1e-12
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)
    expected_causal, _ = theirs(x, x, x, attn_mask=causal)
    assert rel_err(ours(x, causal=True), expected_causal) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_every_method_as_a_layer_with_gqa_and_cross_attention(method):
    layer = MultiheadAttention(32, 4, num_kv_heads=2, method=method, kdim=12, vdim=20, **example(method, 16))
    query, memory = torch.randn(2, 9, 32), torch.randn(2, 16, 12)
    out = layer(query, memory, torch.randn(2, 16, 20))
    assert out.shape == (2, 9, 32)
    out.sum().backward()
    assert layer.q_proj.weight.grad is not None


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="num_heads: expected a divisor of embed_dim=30"):
        MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="query: expected a \\(batch, seq, features\\) tensor"):
        MultiheadAttention(32, 4)(torch.randn(9, 32))
    with pytest.raises(ValueError, match="unknown option"):
        MultiheadAttention(32, 4, method="performer", rank=3)
