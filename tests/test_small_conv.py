"""The small-channel convolution kernel (SEA's decoder CNN) against its PyTorch twin and against
``F.conv2d`` on an explicitly built (upsampled, cropped, zero-padded) input; dispatch and errors.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` at tiny sizes, with ``torch.empty`` poisoned
(NaN) so that an output element the kernel fails to write fails the comparison; the real-size
case is marked ``gpu``.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from helpers import needs_triton, rel_err

# conftest.py switches Triton to its interpreter on CPU, before any test module is imported
from approxattn.kernels.small_conv import fast_small_conv2d, small_conv2d, small_conv2d_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def explicit_conv(x, weight, bias, *, stride_rows=1, dilation=1, pad_top=0, pad_bottom=0, pad_left=0,
                  pad_right=0, upsample_rows=1, virtual_rows=None, out_rows=None, relu=False):
    """An independent check in fp64: the virtual input gathered row by row (row u ← x row
    u // upsample_rows), written into a zero canvas at the padding offsets, then ``F.conv2d``."""
    S, C, R, W = x.shape
    V = R * upsample_rows if virtual_rows is None else virtual_rows
    canvas = torch.zeros(S, C, pad_top + V + pad_bottom, pad_left + W + pad_right, dtype=torch.float64)
    canvas[:, :, pad_top:pad_top + V, pad_left:pad_left + W] = x.double()[:, :, torch.arange(V) // upsample_rows]
    y = F.conv2d(canvas, weight.double(), None if bias is None else bias.double(), stride=(stride_rows, 1),
                 dilation=dilation)
    y = y[:, :, :out_rows] if out_rows is not None else y
    return F.relu(y) if relu else y


def permuted(S, C, R, W, dtype, gen):
    """A non-contiguous (S, C, R, W) view of an (S, R, C, W) tensor, as SEA's channel split makes."""
    return torch.randn(S * R * C * W, generator=gen).to(dtype).reshape(S, R, C, W).permute(0, 2, 1, 3)


# SEA's convs (non-causal decoder: down, middle, out after the row upsample; causal: dilated conv,
# 1×1 out), at odd sizes; each (name, C, Co, KH, KW, x rows, width, options)
PAD1 = {"pad_top": 1, "pad_bottom": 1, "pad_left": 1, "pad_right": 1}
CASES = [
    ("down", 4, 4, 3, 3, 13, 10, {"stride_rows": 2, "relu": True, **PAD1}),
    ("middle", 4, 4, 3, 3, 13, 20, {"relu": True, **PAD1}),
    ("out-upsampled", 4, 1, 3, 3, 7, 10, {"upsample_rows": 2, "virtual_rows": 13, **PAD1}),
    ("causal", 2, 2, 3, 3, 13, 10, {"dilation": 2, "pad_top": 4, "pad_left": 2, "pad_right": 2, "relu": True}),
    ("1x1", 2, 1, 1, 1, 13, 20, {}),
    ("odd-channels-cropped", 3, 3, 3, 1, 13, 10,
     {"stride_rows": 2, "pad_top": 2, "upsample_rows": 3, "virtual_rows": 20, "out_rows": 7}),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_and_explicit_conv(forced_kernels, case, layout, dtype):
    name, C, Co, KH, KW, R, W, options = case
    gen = torch.Generator().manual_seed(sum(map(ord, name + layout)))
    S = 2
    x = (permuted(S, C, R, W, dtype, gen) if layout == "permuted"
         else torch.randn(S, C, R, W, generator=gen).to(dtype))
    if layout == "permuted":
        assert not x.is_contiguous()
    weight = (torch.randn(Co, C, KH, KW, generator=gen) / (C * KH * KW) ** 0.5).to(dtype)
    bias = torch.randn(Co, generator=gen).to(dtype) if name != "1x1" else None
    out = small_conv2d(x, weight, bias, **options)
    ref = small_conv2d_reference(x, weight, bias, **options)
    check = explicit_conv(x, weight, bias, **options)
    assert out.shape == ref.shape == check.shape
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "unwritten output elements"
    assert rel_err(ref, check) < TOL[dtype]
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, check) < TOL[dtype]


@needs_triton
def test_output_dtype_and_no_bias(forced_kernels):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 9, 5, generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(3, 2, 3, 3, generator=gen)
    out = small_conv2d(x, weight, None, pad_top=1, pad_bottom=1, pad_left=1, pad_right=1, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 9, 5)
    check = explicit_conv(x, weight, None, pad_top=1, pad_bottom=1, pad_left=1, pad_right=1)
    assert rel_err(out, check) < 1e-5   # fp32 math and output on bf16 inputs: no rounding beyond fp32


@needs_triton
def test_sea_noncausal_cnn_chain(forced_kernels):
    """The non-causal decoder's CNN (down → relu → middle → relu → rows ×2 cropped to N → out),
    as SEA runs it with F.conv2d, on a channel-split permuted input."""
    gen = torch.Generator().manual_seed(5)
    N, W = 13, 10
    x = permuted(2, 4, N, W, torch.float32, gen)
    down = torch.nn.Conv2d(4, 4, 3, stride=(2, 1), padding=1)
    middle = torch.nn.Conv2d(4, 4, 3, padding=1)
    last = torch.nn.Conv2d(4, 1, 3, padding=1)
    with torch.no_grad():
        y = F.relu(down(x))
        y = F.relu(middle(y))
        expected = last(y.repeat_interleave(2, dim=2)[:, :, :N])
        z = fast_small_conv2d(x, down.weight, down.bias, stride_rows=2, relu=True, **PAD1)
        z = fast_small_conv2d(z, middle.weight, middle.bias, relu=True, **PAD1)
        z = fast_small_conv2d(z, last.weight, last.bias, upsample_rows=2, virtual_rows=N, **PAD1)
    assert z.shape == expected.shape == (2, 1, N, W)
    assert rel_err(z, expected) < 1e-5


@needs_triton
def test_fast_path_dispatch(forced_kernels, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 6, 4, generator=gen)
    weight = torch.randn(2, 2, 1, 1, generator=gen)
    bias = torch.randn(2, generator=gen)
    assert fast_small_conv2d(x, weight, bias) is not None
    # a gradient is required: no backward here
    assert fast_small_conv2d(x, weight.clone().requires_grad_(), bias) is None
    assert fast_small_conv2d(x.clone().requires_grad_(), weight, bias) is None
    with torch.no_grad():
        assert fast_small_conv2d(x, weight.clone().requires_grad_(), bias) is not None
    # outside the kernel's limits
    assert fast_small_conv2d(x.double(), weight, bias) is None
    assert fast_small_conv2d(x, weight, bias, out_dtype=torch.float64) is None
    assert fast_small_conv2d(torch.randn(1, 9, 6, 4), torch.randn(2, 9, 1, 1), None) is None
    assert fast_small_conv2d(x, torch.randn(9, 2, 1, 1), None) is None
    assert fast_small_conv2d(torch.randn(1, 2, 3, 257), weight, None) is None
    monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
    assert fast_small_conv2d(x, weight, bias) is None
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS")
    if not torch.cuda.is_available():
        monkeypatch.delenv("APPROXATTN_FORCE_KERNELS")   # a CPU tensor without the force flag
        assert fast_small_conv2d(x, weight, bias) is None


def test_reference_covers_what_the_kernel_does_not():
    """The CPU fallback: fp64, many channels and wide maps, against the explicit construction."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 9, 5, 300, generator=gen, dtype=torch.float64)
    weight = torch.randn(10, 9, 3, 3, generator=gen, dtype=torch.float64)
    options = {"dilation": (1, 2), "pad_top": 2, "pad_left": 2, "pad_right": 2, "upsample_rows": 2, "virtual_rows": 9}
    out = small_conv2d_reference(x, weight, None, **options)
    assert out.dtype == torch.float64 and out.shape == (1, 10, 9, 300)
    assert rel_err(out, explicit_conv(x, weight, None, **options)) < 1e-12


@pytest.mark.parametrize("call", [small_conv2d, fast_small_conv2d, small_conv2d_reference])
def test_bad_inputs_raise(call):
    x = torch.randn(1, 2, 6, 4)
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        call(x[0], w, None)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        call(x.long(), w, None)
    with pytest.raises(ValueError, match="weight: expected 2 input channels"):
        call(x, torch.randn(2, 3, 3, 3), None)
    with pytest.raises(ValueError, match="weight: expected a kernel of 1 or 3"):
        call(x, torch.randn(2, 2, 5, 5), None)
    with pytest.raises(ValueError, match="bias: expected shape"):
        call(x, w, torch.randn(3))
    with pytest.raises(TypeError, match="stride_rows"):
        call(x, w, None, stride_rows=1.5)
    with pytest.raises(ValueError, match="pad_top"):
        call(x, w, None, pad_top=-1)
    with pytest.raises(ValueError, match="dilation"):
        call(x, w, None, dilation=0)
    with pytest.raises(ValueError, match="virtual_rows"):
        call(x, w, None, upsample_rows=2, virtual_rows=13)
    with pytest.raises(ValueError, match="out_rows"):
        call(x, w, None, pad_top=1, pad_bottom=1, out_rows=7)
    with pytest.raises(ValueError, match="kernel's extent"):
        call(torch.randn(1, 2, 2, 4), w, None)
    with pytest.raises(TypeError, match="out_dtype"):
        call(x, w, None, out_dtype=torch.int32)


def test_kernel_limits_raise_in_small_conv2d():
    with pytest.raises(ValueError, match="x: expected at most 8 input channels"):
        small_conv2d(torch.randn(1, 9, 6, 4), torch.randn(2, 9, 1, 1), None)
    with pytest.raises(ValueError, match="weight: expected at most 8 output channels"):
        small_conv2d(torch.randn(1, 2, 6, 4), torch.randn(9, 2, 1, 1), None)
    with pytest.raises(TypeError, match="x: expected dtype"):
        small_conv2d(torch.randn(1, 2, 6, 4, dtype=torch.float64), torch.randn(2, 2, 1, 1), None)
    with pytest.raises(ValueError, match="output width of at most 256"):
        small_conv2d(torch.randn(1, 2, 6, 300), torch.randn(2, 2, 1, 1), None)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_real_size_on_gpu(layout, monkeypatch):
    """SEA's maps at real size: (S=16, C=4, R=65536, W=64) fp32, the three non-causal convs."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # exact fp32 products in cuDNN too
    gen = torch.Generator(device="cuda").manual_seed(0)
    S, C, R, W = 16, 4, 65536, 64
    if layout == "permuted":
        x = torch.randn(S, R, C, W, generator=gen, device="cuda").permute(0, 2, 1, 3)
    else:
        x = torch.randn(S, C, R, W, generator=gen, device="cuda")
    w = torch.randn(C, C, 3, 3, generator=gen, device="cuda") / 6
    b = torch.randn(C, generator=gen, device="cuda")
    w_out = torch.randn(1, C, 3, 3, generator=gen, device="cuda") / 6
    pad = PAD1
    with torch.no_grad():
        down = small_conv2d(x, w, b, stride_rows=2, relu=True, **pad)
        assert rel_err(down, F.relu(F.conv2d(x, w, b, stride=(2, 1), padding=1))) < 1e-5
        middle = small_conv2d(down, w, b, **pad)
        assert rel_err(middle, F.conv2d(down, w, b, padding=1)) < 1e-5
        out = small_conv2d(down, w_out, None, upsample_rows=2, virtual_rows=R - 1, **pad)
        assert rel_err(out, F.conv2d(down.repeat_interleave(2, dim=2)[:, :, :R - 1], w_out, padding=1)) < 1e-5
