"""The band kernel (a 3×3 conv over position-major maps as windowed GEMMs) against its twin (F.conv2d) and against
the row-window GEMM it replaces in SEA's decoder; the band tile against the dense tap matrices.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` at small sizes, with ``torch.empty`` poisoned (NaN, the
``forced_kernels`` fixture) so that an output element the kernel fails to write fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_triton, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from approxattn.blocks.sea_estimator import conv_row_matrices
from approxattn.kernels.band_conv import PAD_COLUMNS, band_conv, band_conv_reference, band_tile
from approxattn.kernels.row_window_gemm import window_gemm_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _position_major(maps: torch.Tensor) -> torch.Tensor:
    """``(S, C, R, W)`` → ``(S, R, W·C)``, column ``w·C + c``."""
    S, C, R, W = maps.shape
    return maps.permute(0, 2, 3, 1).reshape(S, R, W * C)


@pytest.mark.parametrize("c,co,P", [(4, 4, 16), (2, 4, 8), (4, 1, 16), (1, 2, 16)])
def test_band_tile_is_the_dense_band_in_every_block(c, co, P):
    """Each block of P output positions, its window's rows of the dense tap matrices (position-major rows,
    channel-major columns) equal the band tile, away from the width's edges and at them (rows past the map are
    the zero padding the masked loads give)."""
    gen = torch.Generator().manual_seed(c * 10 + co)
    weight = torch.randn(co, c, 3, 3, generator=gen, dtype=torch.float64)
    W = 3 * P
    dense = conv_row_matrices(weight, W)                                   # (3, c·W, co·W), channel-major
    rows = torch.arange(c * W).view(c, W).t().reshape(-1)                  # position-major row w·c + ci
    dense = dense[:, rows]
    tile = band_tile(weight, P)
    assert tile.shape == (3, c * P + 2 * PAD_COLUMNS, co * P)
    for block in range(3):
        columns = torch.tensor([o * W + block * P + p for o in range(co) for p in range(P)])
        window = torch.arange(c * P + 2 * PAD_COLUMNS) + block * c * P - PAD_COLUMNS
        inside = (window >= 0) & (window < c * W)
        expected = torch.zeros_like(tile)
        expected[:, inside] = dense[:, window[inside]][:, :, columns]
        assert torch.equal(tile[:, inside], expected[:, inside])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("relu", [False, True])
def test_band_conv_matches_its_twin(forced_kernels, dtype, relu):
    gen = torch.Generator().manual_seed(5)
    maps = torch.randn(2, 4, 19, 40, generator=gen)                       # W = 40: a partial last block
    weight, bias = torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, generator=gen)
    x = _position_major(maps).to(dtype)
    out = band_conv(x, weight, bias, relu=relu)
    ref = band_conv_reference(x, weight, bias, relu=relu)
    assert out.shape == (2, 19, 160) and out.dtype == dtype
    assert rel_err(out.float(), ref.float()) < TOL[dtype]


@needs_triton
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(S=st.integers(1, 3), R=st.integers(1, 21), W=st.integers(1, 37), c=st.sampled_from([1, 2, 4]),
       co=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_band_conv_matches_its_twin_at_any_shape(forced_kernels, S, R, W, c, co, seed):
    """Any rows (one included), any width (narrower than a block, not a multiple of it), row-strided input."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(S, R, W * c + 8, generator=gen)
    x = wide[..., 3:3 + W * c]                                            # a row-strided view
    weight, bias = torch.randn(co, c, 3, 3, generator=gen), torch.randn(co, generator=gen)
    out = band_conv(x, weight, bias, relu=True)
    ref = band_conv_reference(x, weight, bias, relu=True)
    assert out.shape == (S, R, co * W)
    assert rel_err(out, ref) < 1e-5 if ref.norm() > 0 else out.abs().max() == 0


@needs_triton
def test_band_conv_is_the_middle_row_window_gemm(forced_kernels):
    """SEA's middle conv: the band kernel over the position-major map equals the row-window GEMM over the
    channel-major one (what the decoder ran before)."""
    gen = torch.Generator().manual_seed(9)
    maps = torch.randn(3, 4, 11, 24, generator=gen, dtype=torch.float64)
    weight, bias = torch.randn(4, 4, 3, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen)
    channel_major = maps.permute(0, 2, 1, 3).reshape(3, 11, 4 * 24)
    gemm = window_gemm_reference(channel_major, conv_row_matrices(weight, 24), bias.double().repeat_interleave(24),
                                 relu=True)
    out = band_conv(_position_major(maps).float(), weight.float(), bias, relu=True)
    assert rel_err(out.double(), gemm) < 1e-5


@needs_triton
@pytest.mark.parametrize("grid_m", [1, 2, 3])
def test_band_conv_programs_that_loop_over_row_blocks(forced_kernels, monkeypatch, grid_m):
    """OVERRIDE["GRID_M"]: fewer programs along the rows, each over every GRID_M-th row block (5 blocks of 16
    rows here, the last partial)."""
    from approxattn.kernels import band_conv as module

    monkeypatch.setattr(module, "OVERRIDE", {"GRID_M": grid_m})
    gen = torch.Generator().manual_seed(grid_m)
    x = torch.randn(2, 70, 24 * 4, generator=gen)
    weight, bias = torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, generator=gen)
    assert rel_err(band_conv(x, weight, bias, relu=True), band_conv_reference(x, weight, bias, relu=True)) < 1e-5


@needs_triton
def test_band_conv_takes_a_cached_tile_and_checks_it(forced_kernels):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 64, generator=gen).bfloat16()
    weight, bias = torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, generator=gen)
    tile = band_tile(weight, 16).bfloat16()
    assert torch.equal(band_conv(x, weight, bias, tile=tile), band_conv(x, weight, bias))
    with pytest.raises(ValueError, match="tile"):
        band_conv(x, weight, bias, tile=band_tile(weight, 8))


@needs_triton
def test_band_conv_errors_name_the_argument(forced_kernels):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=gen)
    weight, bias = torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, generator=gen)
    with pytest.raises(ValueError, match="weight"):
        band_conv(x, weight[..., :2], bias)                               # not 3×3
    with pytest.raises(ValueError, match="weight"):
        band_conv(torch.randn(2, 5, 30), torch.randn(4, 3, 3, 3), bias)   # 3 channels: not a power of two
    with pytest.raises(ValueError, match="x"):
        band_conv(torch.randn(2, 5, 30), weight, bias)                    # 30 columns: not W·4
    with pytest.raises(ValueError, match="x"):
        band_conv(x[0], weight, bias)
    with pytest.raises(ValueError, match="bias"):
        band_conv(x, weight, bias[:3])
    with pytest.raises(TypeError, match="x"):
        band_conv(x.int(), weight, bias)
    with pytest.raises(TypeError, match="x"):
        band_conv(x.double(), weight, bias)
    with pytest.raises(TypeError, match="weight"):
        band_conv(x, weight.numpy(), bias)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,width", [(32768, 64), (2049, 128)])
def test_band_conv_at_real_size_on_gpu(monkeypatch, rows, width):
    """SEA's middle conv at 64K (16 heads, W = 64) and at T = 256 (W = 128), odd rows, on CUDA."""
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS", raising=False)
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(16, rows, 4 * width, generator=gen, device="cuda").bfloat16()
    weight = torch.randn(4, 4, 3, 3, generator=gen, device="cuda") * 0.3
    bias = torch.randn(4, generator=gen, device="cuda")
    out = band_conv(x, weight, bias, relu=True)
    assert rel_err(out.float(), band_conv_reference(x, weight, bias, relu=True).float()) < 1e-2
