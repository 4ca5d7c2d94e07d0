"""SEA's encoder and gates as one Triton kernel (interpreter on CPU) against its PyTorch twin, the twin
against the module's unfused layers, and errors."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_triton, rel_err

import approxattn
from approxattn.kernels.sea_encoder import encoder_and_gates_reference, fast_encoder_and_gates


def _module_parts(d, seed):
    sea = approxattn.build("sea", head_dim=d, k=2, columns=8, num_features=8, seed=seed)
    with torch.no_grad():            # LayerNorm's affine away from (1, 0), so it is exercised
        sea.encoder_norm.weight.normal_(1.0, 0.3)
        sea.encoder_norm.bias.normal_(0.0, 0.3)
    return sea, (sea.encoder.weight, sea.encoder.bias, sea.encoder_norm.weight, sea.encoder_norm.bias,
                 sea.encoder_norm.eps, sea.gate.weight, sea.gate.bias)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,n,d,own", [(4, 2, 37, 16, True), (2, 2, 20, 8, False), (3, 1, 5, 12, True)])
def test_kernel_matches_its_twin(forced_kernels, dtype, heads, kv_heads, n, d, own):
    gen = torch.Generator().manual_seed(n * d)
    context = torch.randn(2, heads, n, 2 * d, generator=gen).to(dtype)
    own_value = torch.randn(2, kv_heads, n, d, generator=gen).to(dtype) if own else None
    _, parts = _module_parts(d, n)
    with torch.no_grad():
        e, gates = fast_encoder_and_gates(context, own_value, *parts)
        ref_e, ref_gates = encoder_and_gates_reference(context, own_value, *parts)
    assert e.dtype == dtype and gates.dtype == torch.float32
    assert e.shape == (2, heads, n, 2 * d) and gates.shape == (2, heads, n, 2)
    assert rel_err(e, ref_e) < 1e-2
    assert rel_err(gates, ref_gates) < 5e-3


def test_twin_equals_the_modules_unfused_encoder_and_gates():
    """The twin in fp32 against SEAAttention._encode and the gates' linear (the unfused path)."""
    sea, parts = _module_parts(8, 1)
    gen = torch.Generator().manual_seed(4)
    context, own_value = torch.randn(2, 4, 9, 16, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    with torch.no_grad():
        e, gates = encoder_and_gates_reference(context, own_value, *parts)
        expected = sea._encode(context, own_value, 2)
        expected_gates = torch.sigmoid(torch.nn.functional.linear(expected, sea.gate.weight, sea.gate.bias))
        cross = encoder_and_gates_reference(context, None, *parts)[0]
        cross_expected = sea._encode(context, None, 2)
    assert rel_err(e, expected) < 1e-6 and rel_err(gates, expected_gates) < 1e-6
    assert rel_err(cross, cross_expected) < 1e-6


def test_declines_and_errors(monkeypatch):
    _, parts = _module_parts(8, 2)
    context = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    value = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
    assert fast_encoder_and_gates(context, value, *parts) is None
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS")
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    assert fast_encoder_and_gates(context.float(), value.float(), *parts) is None       # fp32 maps: the layers
    with pytest.raises(ValueError, match="context"):
        fast_encoder_and_gates(context[0], value, *parts)
    with pytest.raises(TypeError, match="own_value"):
        fast_encoder_and_gates(context, value.float(), *parts)
    with pytest.raises(ValueError, match="own_value"):
        fast_encoder_and_gates(context, value[:, :, :3], *parts)
    with pytest.raises(ValueError, match="weight"):
        fast_encoder_and_gates(context, value, parts[0][:, :20], *parts[1:])
    with pytest.raises(ValueError, match="gate_weight"):
        fast_encoder_and_gates(context, value, *parts[:5], parts[5][:1], parts[6])
    with pytest.raises(ValueError, match="eps"):
        fast_encoder_and_gates(context, value, *parts[:4], 0.0, *parts[5:])
    with pytest.raises(TypeError, match="bias"):
        fast_encoder_and_gates(context, value, parts[0], [0.0] * 16, *parts[2:])
