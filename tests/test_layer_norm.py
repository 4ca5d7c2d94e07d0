"""The narrow-row LayerNorm kernel (SEA's estimator) against an fp64 computation written out by hand
and against its PyTorch twin; dispatch and errors.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` at small sizes with ``torch.empty`` poisoned
(NaN), so an output element the kernel fails to write fails the comparison; the real sizes are
marked ``gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import needs_triton, rel_err

from approxattn.kernels.layer_norm import (
    fast_layer_norm,
    layer_norm,
    layer_norm_reference,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def by_hand(x, weight, bias, eps, gelu):
    """fp64: (x − mean) / sqrt(biased variance + eps) · w + b, then x·Φ(x) with Φ from math.erf."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = y * 0.5 * (1 + torch.special.erf(y / math.sqrt(2)))
    return y


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 3, 37, 32), (70, 128), (5, 48), (1, 1), (3, 0, 16)])
@pytest.mark.parametrize("affine,gelu", [(True, False), (True, True), (False, False), (False, True)])
def test_kernel_matches_a_hand_computation(forced_kernels, dtype, shape, affine, gelu):
    gen = torch.Generator().manual_seed(sum(shape) + affine + 2 * gelu)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    W = shape[-1]
    weight = (torch.randn(W, generator=gen) + 1).to(dtype) if affine else None
    bias = torch.randn(W, generator=gen).to(dtype) if affine else None
    out = fast_layer_norm(x, weight, bias, 1e-5, gelu=gelu)
    assert out is not None and out.shape == x.shape and out.dtype == dtype
    expected = by_hand(x, weight, bias, 1e-5, gelu)
    if expected.norm() == 0:                 # one value per row (W = 1), no bias: exactly 0
        assert torch.equal(out, torch.zeros_like(out))
    elif x.numel():
        assert rel_err(out, expected) < TOL[dtype]
        assert rel_err(out, layer_norm_reference(x.double(), None if weight is None else weight.double(),
                                                 None if bias is None else bias.double(), 1e-5, gelu=gelu)) < TOL[dtype]


@needs_triton
def test_kernel_reads_strided_rows_and_constant_rows(forced_kernels):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 40, 64, generator=gen)[:, ::3, :]                # rows 3 apart: one row stride
    x[0, 0] = 2.5                                                       # a constant row: var 0 → y = b
    weight, bias = torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen)
    out = layer_norm(x, weight, bias, 1e-6)
    assert rel_err(out, by_hand(x, weight, bias, 1e-6, False)) < 1e-5
    torch.testing.assert_close(out[0, 0], bias)
    transposed = torch.randn(16, 32, generator=gen).t()               # last axis not contiguous: copied
    assert rel_err(layer_norm(transposed, None, None, 1e-5), by_hand(transposed, None, None, 1e-5, False)) < 1e-5


@needs_triton
def test_sea_modules_take_the_kernel_at_inference_and_agree(forced_kernels, monkeypatch):
    import approxattn

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    module = approxattn.build("sea", head_dim=16, k=8, columns=8, num_features=16).eval()
    calls = []
    import approxattn.kernels.layer_norm as kernel

    launch = kernel._launch
    monkeypatch.setattr(kernel, "_launch", lambda *a: calls.append(a[0].shape) or launch(*a))
    for causal in (False, True):
        with torch.no_grad():
            fused = module.forward_with_details(q, k, v, causal=causal)
            monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
            ref = module.forward_with_details(q, k, v, causal=causal)
            monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS")
        assert rel_err(fused.estimated_logits, ref.estimated_logits) < 1e-4
        assert rel_err(fused.output, ref.output) < 1e-4 and torch.equal(fused.selected, ref.selected)
    assert len(calls) == 1 + 3   # the encoder's (with GELU); the causal decoder's input and output norms too


def test_dispatch_declines_and_bad_inputs_raise(monkeypatch):
    x = torch.randn(4, 32)
    w = torch.ones(32, requires_grad=True)
    monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
    assert fast_layer_norm(x, None, None, 1e-5) is None
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS")
    monkeypatch.delenv("APPROXATTN_FORCE_KERNELS", raising=False)
    assert fast_layer_norm(x, None, None, 1e-5) is None                 # CPU tensor, not forced
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    assert fast_layer_norm(x, w, None, 1e-5) is None                    # a gradient is wanted
    assert fast_layer_norm(x.double(), None, None, 1e-5) is None        # fp64
    assert fast_layer_norm(torch.randn(2, 1025), None, None, 1e-5) is None
    with pytest.raises(ValueError, match="weight"):
        fast_layer_norm(x, torch.ones(16), None, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        fast_layer_norm(x, None, None, 0.0)
    with pytest.raises(TypeError, match="x"):
        fast_layer_norm([1.0], None, None, 1e-5)
    with pytest.raises(ValueError, match="at most 1024"):
        layer_norm(torch.randn(2, 1025), None, None, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,gelu", [((16, 65536, 128), True), ((32, 65536, 32), False), ((16, 65536, 128), False)])
def test_real_sizes_on_gpu(shape, gelu):
    """SEA's maps at N = 65,536 (encoder + GELU; the causal decoder's input and output norms), fp32."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(shape, device="cuda", generator=gen) * 2 + 0.5
    weight = torch.rand(shape[-1], device="cuda", generator=gen) + 0.5
    bias = torch.randn(shape[-1], device="cuda", generator=gen)
    out = fast_layer_norm(x, weight, bias, 1e-5, gelu=gelu)
    assert out is not None
    assert rel_err(out, layer_norm_reference(x, weight, bias, 1e-5, gelu=gelu)) < 1e-5
