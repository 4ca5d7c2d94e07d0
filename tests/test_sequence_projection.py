"""The sequence-projection kernels (Linformer's / FLuRKA's ``E k``, ``F v``) against float64 einsum, fwd and bwd.

On CPU the kernels run under ``TRITON_INTERPRET=1`` at small sizes with ``torch.empty`` poisoned (NaN),
so an output or gradient element a kernel never writes fails the comparison; the real size is marked ``gpu``.
"""

from __future__ import annotations


import pytest
import torch
from helpers import needs_triton, rel_err

import approxattn
from approxattn.kernels import sequence_projection as projection_kernels
from approxattn.kernels.sequence_projection import (
    fast_sequence_projection,
    sequence_projection,
    sequence_projection_reference,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _grads_fp64(e, x, dy):
    e64 = e.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = torch.einsum("hrn,bhnd->bhrd", e64, x64)        # written out here: independent of the twin
    de64, dx64 = torch.autograd.grad(y64, (e64, x64), dy.double())
    return y64, de64, dx64


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("matrices,batch,heads,length,rank,dim", [
    (1, 2, 3, 37, 8, 5),         # shared E, N and d not block multiples
    (3, 2, 3, 50, 20, 16),       # one E per head
    (1, 1, 2, 70, 33, 64),       # r just over a power of two
    (2, 3, 2, 16, 16, 24),
])
def test_kernel_matches_fp64_forward_and_backward(forced_kernels, dtype, matrices, batch, heads, length, rank, dim):
    gen = torch.Generator().manual_seed(matrices * 1000 + length + rank)
    # E as the module holds it: an fp32 parameter sliced to the sequence length (a strided view)
    e = torch.randn(matrices, rank, length + 7, generator=gen)[..., :length].requires_grad_()
    x = torch.randn(batch, heads, length, dim, generator=gen).to(dtype).requires_grad_()
    y = sequence_projection(e, x)
    assert y.shape == (batch, heads, rank, dim) and y.dtype == dtype
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    de, dx = torch.autograd.grad(y, (e, x), dy)
    assert de.dtype == torch.float32 and dx.dtype == dtype
    y64, de64, dx64 = _grads_fp64(e, x, dy)
    assert rel_err(y, y64) < TOL[dtype]
    assert rel_err(dx, dx64) < TOL[dtype]
    assert rel_err(de, de64) < TOL[torch.float32]      # dE sums exact half products in fp32
    assert rel_err(y, sequence_projection_reference(e.detach(), x.detach())) < TOL[dtype]


@needs_triton
def test_strided_inputs_and_one_sided_gradients(forced_kernels):
    gen = torch.Generator().manual_seed(5)
    e = torch.randn(1, 12, 40, generator=gen)
    x = torch.randn(2, 40, 3, 16, generator=gen).transpose(1, 2)         # (B, H, N, d), not contiguous
    dy = torch.randn(2, 3, 12, 16, generator=gen)
    _, de64, dx64 = _grads_fp64(e, x, dy)
    # only x needs a gradient (E frozen), then only E
    x1 = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(sequence_projection(e, x1), (x1,), dy)
    assert rel_err(dx, dx64) < 1e-5
    e1 = e.clone().requires_grad_()
    (de,) = torch.autograd.grad(sequence_projection(e1, x), (e1,), dy)
    assert rel_err(de, de64) < 1e-5
    # an expanded upstream gradient (stride 0), as .sum().backward() gives
    x2 = x.clone().requires_grad_()
    sequence_projection(e, x2).sum().backward()
    _, _, dx_ones = _grads_fp64(e, x, torch.ones(2, 3, 12, 16))
    assert rel_err(x2.grad, dx_ones) < 1e-5


@needs_triton
def test_expanded_input_no_double_backward_and_empty_batch(forced_kernels):
    gen = torch.Generator().manual_seed(9)
    e = torch.randn(1, 10, 30, generator=gen, requires_grad=True)
    base = torch.randn(1, 1, 30, 16, generator=gen).bfloat16().requires_grad_()
    x = base.expand(2, 3, 30, 16)                                         # not dense: strides 0 over b, h
    dy = torch.randn(2, 3, 10, 16, generator=gen).bfloat16()
    y = sequence_projection(e, x)
    de, dbase = torch.autograd.grad(y, (e, base), dy)
    e64, base64 = e.detach().double().requires_grad_(), base.detach().double().requires_grad_()
    y64 = torch.einsum("hrn,bhnd->bhrd", e64, base64.expand(2, 3, 30, 16))
    de64, dbase64 = torch.autograd.grad(y64, (e64, base64), dy.double())
    assert rel_err(y, y64) < 1e-2 and rel_err(dbase, dbase64) < 1e-2 and rel_err(de, de64) < 1e-5
    # a second derivative through the kernels is refused, not silently zero
    x2 = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(sequence_projection(e, x2).float().square().sum(), x2, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.float().square().sum().backward()
    assert sequence_projection(e, torch.randn(0, 3, 30, 16).bfloat16()).shape == (0, 3, 10, 16)


@needs_triton
@pytest.mark.parametrize("variant,options", [
    ("flurka-performer", {"num_features": 32}),
    ("flurka-linear", {}),
    ("flurka-performer", {"num_features": 32, "sharing": "kv"}),
    ("flurka-relu", {"num_features": 32, "sharing": "none", "num_heads": 2}),
])
def test_flurka_modules_agree_with_and_without_the_projection_kernels(forced_kernels, monkeypatch, variant, options):
    # half inputs take the fused path (the feature kernels, and E k, F v by these kernels); the other run
    # only swaps the projections for the einsum, so the difference is the projection's alone
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 48, 16, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(2, 2, 48, 16, generator=gen).bfloat16().requires_grad_()
    v = torch.randn(2, 2, 48, 16, generator=gen).bfloat16().requires_grad_()
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[1, 40:] = False
    module = approxattn.build(variant, head_dim=16, rank=12, max_len=64, init="gaussian", **options)
    params = list(module.parameters())
    launches = []
    forward = projection_kernels._forward
    monkeypatch.setattr(projection_kernels, "_forward", lambda *a: launches.append(1) or forward(*a))

    def run():
        out = module(q, k, v, key_padding_mask=mask)
        grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, 16)).sum(), [q, k, v, *params])
        return out, grads

    out, grads = run()
    assert len(launches) == 2                       # E k and F v took the kernel
    monkeypatch.setattr(projection_kernels, "fast_sequence_projection", lambda e, x: None)
    ref_out, ref_grads = run()
    assert len(launches) == 2
    assert rel_err(out, ref_out) < 1e-2
    for grad, ref in zip(grads, ref_grads):
        assert rel_err(grad, ref) < 1e-2


@needs_triton
def test_dispatch_and_bad_input(forced_kernels, monkeypatch):
    e, x = torch.randn(1, 8, 32), torch.randn(1, 2, 32, 16).bfloat16()
    assert fast_sequence_projection(e, x) is not None
    assert fast_sequence_projection(e, x.float()) is None                      # fp32 keeps torch's GEMMs
    assert fast_sequence_projection(e.double(), x.double()) is None            # no fp64 kernel
    assert fast_sequence_projection(torch.randn(1, 300, 32), x) is None         # r over 256
    assert fast_sequence_projection(torch.randn(1, 256, 32), torch.randn(1, 2, 32, 128).bfloat16()) is None  # r·d
    assert fast_sequence_projection(torch.randn(1, 256, 32), torch.randn(1, 2, 32, 64).bfloat16()) is not None
    empty_e, empty_x = torch.randn(1, 8, 0), torch.randn(1, 2, 0, 16).bfloat16()
    assert fast_sequence_projection(empty_e, empty_x) is None                  # nothing to launch
    assert torch.equal(sequence_projection(empty_e, empty_x), torch.zeros(1, 2, 8, 16).bfloat16())
    monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
    assert fast_sequence_projection(e, x) is None
    with pytest.raises(ValueError, match="e: expected 32 columns"):
        fast_sequence_projection(torch.randn(1, 8, 31), x)
    with pytest.raises(ValueError, match="e: expected 1 or 2"):
        sequence_projection(torch.randn(3, 8, 32), x)
    with pytest.raises(ValueError, match="x: expected 4 dimensions"):
        sequence_projection(e, x[0])
    with pytest.raises(TypeError, match="e: expected a tensor"):
        sequence_projection([[1.0]], x)
    with pytest.raises(ValueError, match="r ≤ 256"):
        sequence_projection(torch.randn(1, 300, 32), x)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        sequence_projection(e.double(), x)


@pytest.mark.gpu
@pytest.mark.parametrize("matrices,length,rank,dim", [
    (1, 65536, 128, 64), (16, 65536, 128, 64),       # FLuRKA's benchmark shape, shared and per-head E
    (1, 65573, 256, 64), (16, 20011, 100, 48),       # the largest tile dispatched; partial tiles everywhere
    (1, 8192, 64, 256),
])
def test_gpu_real_sizes(forced_kernels, matrices, length, rank, dim):
    """H = 16, bf16, against fp64 einsum on the GPU (outputs poisoned by the fixture)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    e = (torch.randn(matrices, rank, length, device="cuda", generator=gen) / 256).requires_grad_()
    x = torch.randn(1, 16, length, dim, device="cuda", generator=gen).bfloat16().requires_grad_()
    assert fast_sequence_projection(e, x) is not None
    y = sequence_projection(e, x)
    dy = torch.randn(y.shape, device="cuda", generator=gen).bfloat16()
    de, dx = torch.autograd.grad(y, (e, x), dy)
    y64, de64, dx64 = _grads_fp64(e, x, dy)
    assert rel_err(y, y64) < 1e-2 and rel_err(dx, dx64) < 1e-2 and rel_err(de, de64) < 1e-4
