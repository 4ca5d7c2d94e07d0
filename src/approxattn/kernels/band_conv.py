"""Triton forward kernel: a 3×3 convolution over narrow maps stored position-major, as windowed GEMMs.

``row_window_gemm`` writes a 3×3 convolution over maps ``(S, C, R, W)`` as, per row tap, ``input row
(C·W) @ M_tap (C·W × Co·W)`` with M_tap banded: an output column reads three input positions of each
channel, so all but ~3/W of M_tap is zero. At SEA's 64K shape (C = Co = 4, W = 64) that is 21× the
convolution's multiply-adds on the tensor cores. Here the input is stored **position-major** (column
``w·C + c``), so P consecutive positions of all channels are C·P consecutive columns, and a block of
output positions ``[p0, p0 + P)`` of every output channel needs only the input columns
``[C·(p0 − 1), C·(p0 + P + 1))`` of each row tap. A program loads that window, padded to 16 columns on
each side so that every load stays aligned (``C·P + 32`` columns), and multiplies it by one band tile
``(3, C·P + 32, Co·P)`` shared by every block (the band is the same at every position; the width's zero
padding is the masked load past the row's ends). At P = 16, C = Co = 4: K = 96 instead of 256.

The output is stored **channel-major** (column ``co·W + w``), the layout the decoder head reads; the tile's
columns are ordered ``(co, p)`` so that each output channel's P positions are contiguous.

One op with its PyTorch twin::

    band_conv(x (S, R, W·C) position-major, weight (Co, C, 3, 3), bias (Co,), relu)
        = conv2d(x as (S, C, R, W), weight, padding 1) + bias  (then ReLU), as (S, R, Co·W) channel-major

Half x dots with the band in its dtype (fp32 accumulation), as ``row_window_gemm``'s half GEMMs do; fp32
x takes exact fp32 products. Inference only (no backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _cast_out, _dot
else:  # pragma: no cover - the module still imports, band_conv raises
    triton = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PAD_COLUMNS = 16          # the window's margin each side: ≥ C (one position), and 16 keeps the loads aligned
MAX_SAMPLES = 65535       # the grid's third dimension
# tuning runs set this: {BM, P, num_warps, num_stages, GRID_M (programs along the rows; each loops over its share
# of the row blocks)}
OVERRIDE: dict[str, int] = {}


def _check(x, weight, bias) -> tuple[int, int, int]:
    """Validates the arguments; returns (C, Co, W)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or min(weight.shape[:2]) < 1:
        raise ValueError(f"weight: expected shape (Co, C, 3, 3), got {tuple(weight.shape)}")
    co, c = weight.shape[:2]
    if c > PAD_COLUMNS or c & (c - 1) or co & (co - 1):
        raise ValueError(f"weight: expected powers of two, at most {PAD_COLUMNS} input channels, got "
                         f"{co} output and {c} input channels")
    if x.dim() != 3 or min(x.shape) < 1 or x.shape[2] % c:
        raise ValueError(f"x: expected a non-empty (S, R, W·{c}) tensor ({c} = weight's input channels), got "
                         f"shape {tuple(x.shape)}")
    if tuple(bias.shape) != (co,):
        raise ValueError(f"bias: expected shape ({co},) (weight's output channels), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (x's device), got {t.device}")
    return c, co, x.shape[2] // c


def band_conv_reference(x, weight, bias, *, relu=False) -> torch.Tensor:
    """The PyTorch twin of :func:`band_conv`: F.conv2d in fp32 (fp64 for fp64 x), returned in x's dtype."""
    c, co, W = _check(x, weight, bias)
    S, R, _ = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    maps = x.to(compute).view(S, R, W, c).permute(0, 3, 1, 2)
    out = F.conv2d(maps, weight.to(compute), bias.to(compute), padding=1)
    out = out.clamp_min(0) if relu else out
    return out.permute(0, 2, 1, 3).reshape(S, R, co * W).to(x.dtype)


def band_tile(weight: torch.Tensor, positions: int) -> torch.Tensor:
    """``(3, C·P + 32, Co·P)``: the band every block of P output positions multiplies its input window by.
    Row ``k``: input column ``k − 16`` relative to the block's first (position ``⌊(k − 16) / C⌋``, channel
    ``(k − 16) mod C``); column ``co·P + p``; entry ``weight[co, c, tap, kw]`` where the input position is
    ``p + kw − 1``, else 0. In the weight's dtype."""
    co, c = weight.shape[:2]
    P = positions
    k = torch.arange(c * P + 2 * PAD_COLUMNS, device=weight.device) - PAD_COLUMNS
    position, channel = torch.div(k, c, rounding_mode="floor"), k.remainder(c)
    p = torch.arange(P, device=weight.device)
    kw = position[:, None] - p[None, :] + 1                                     # (K, P)
    inside = (kw >= 0) & (kw <= 2)
    # taken[tap, k, p, o] = weight[o, channel[k], tap, kw[k, p]]
    taken = weight.permute(2, 1, 3, 0)[:, channel[:, None], kw.clamp(0, 2)]     # (3, K, P, Co)
    tile = torch.where(inside[None, :, :, None], taken, 0.0).permute(0, 1, 3, 2)
    return tile.reshape(3, c * P + 2 * PAD_COLUMNS, co * P).contiguous()


def launch_config(width: int, half: bool, channels: int = 4) -> dict[str, int]:
    """16 positions a block (K = C·16 + 32), 128 rows, 4 warps; the interpreter 16 rows. Fewer positions for a
    narrower map, but ``channels`` (the fewer of C and Co) × P ≥ 16, the tensor cores' least K and N.
    Unswept: chosen by the CPU census (``benchmarks/sass_census.py``)."""
    P = max(min(16, 1 << (width - 1).bit_length()), 16 // channels)
    if interpreting():   # 16 rows; a GRID_M override still applies (its loop is what a test must reach)
        return {"BM": 16, "P": P, **{k: v for k, v in OVERRIDE.items() if k == "GRID_M"}}
    return {"BM": 128 if half else 64, "P": P, "num_warps": 4, "num_stages": 2, **OVERRIDE}


if HAS_TRITON:

    @triton.jit
    def _band_block(x_s, t_ptr, o_ptr, s, block, left, main, right, offs_n, offs_pad, offs_main, channel, position,
                    bias, stride_xr, R, W, cols, CO: tl.constexpr, RELU: tl.constexpr, LP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, MAIN: tl.constexpr, KT: tl.constexpr, PAD: tl.constexpr):
        """Row block ``block`` (BM rows) of the program's P positions: three taps × (left margin, main, right
        margin) dots, the bias, ReLU, the channel-major store."""
        offs_r = block * BM + tl.arange(0, BM)
        r_ok = offs_r < R
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for t in tl.static_range(3):
            v = offs_r + (t - 1)
            v_ok = r_ok & (v >= 0) & (v < R)
            row = x_s + tl.maximum(v, 0).to(tl.int64)[:, None] * stride_xr
            tile = t_ptr + t * KT * BN + offs_n[None, :]
            xl = tl.load(row + left[None, :], mask=v_ok[:, None] & (left >= 0)[None, :], other=0.0)
            acc += _dot(xl, tl.load(tile + offs_pad[:, None] * BN), LP)
            xm = tl.load(row + main[None, :], mask=v_ok[:, None] & (main < cols)[None, :], other=0.0)
            acc += _dot(xm, tl.load(tile + (PAD + offs_main)[:, None] * BN), LP)
            xr = tl.load(row + right[None, :], mask=v_ok[:, None] & (right < cols)[None, :], other=0.0)
            acc += _dot(xr, tl.load(tile + (PAD + MAIN + offs_pad)[:, None] * BN), LP)
        acc += bias[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        out = (s * R + offs_r[:, None].to(tl.int64)) * (CO * W) + (channel * W + position)[None, :]
        tl.store(o_ptr + out, _cast_out(acc, o_ptr.dtype.element_ty), mask=r_ok[:, None] & (position < W)[None, :])

    @triton.jit
    def _band_conv_fwd(
        x_ptr, t_ptr, b_ptr, o_ptr,
        stride_xs, stride_xr, R, W, GRID_M,
        C: tl.constexpr, CO: tl.constexpr, RELU: tl.constexpr, LP: tl.constexpr,
        BM: tl.constexpr, P: tl.constexpr, PAD: tl.constexpr, LOOP: tl.constexpr,
    ):
        """Grid (GRID_M, position block, sample): BM rows × P positions of all CO output channels. LOOP: each
        program takes row blocks pid_m, pid_m + GRID_M, ... (Triton pipelines the next block's loads under this
        one's dots, with shared memory for every stage's nine tiles); else one row block a program (no loop,
        so no pipeline buffers: 24 KiB of shared memory and 3 CTAs an SM)."""
        pid_m = tl.program_id(0)
        pid_p = tl.program_id(1)
        s = tl.program_id(2).to(tl.int64)
        BN: tl.constexpr = CO * P
        MAIN: tl.constexpr = C * P
        KT: tl.constexpr = MAIN + 2 * PAD
        first = pid_p * MAIN                              # the block's first input column
        offs_n = tl.arange(0, BN)
        offs_pad = tl.arange(0, PAD)
        offs_main = tl.arange(0, MAIN)
        left, right = first - PAD + offs_pad, first + MAIN + offs_pad
        main = first + offs_main
        x_s = x_ptr + s * stride_xs
        channel, position = offs_n // P, pid_p * P + offs_n % P
        bias = tl.load(b_ptr + channel).to(tl.float32)
        if LOOP:
            for block in range(pid_m, tl.cdiv(R, BM), GRID_M):
                _band_block(x_s, t_ptr, o_ptr, s, block, left, main, right, offs_n, offs_pad, offs_main, channel,
                            position, bias, stride_xr, R, W, C * W, CO, RELU, LP, BM, BN, MAIN, KT, PAD)
        else:
            _band_block(x_s, t_ptr, o_ptr, s, pid_m, left, main, right, offs_n, offs_pad, offs_main, channel,
                        position, bias, stride_xr, R, W, C * W, CO, RELU, LP, BM, BN, MAIN, KT, PAD)


def band_conv(x, weight, bias, *, relu=False, tile=None) -> torch.Tensor:
    """The Triton kernel (see the module docstring), inference only.

    x ``(S, R, W·C)`` position-major (column ``w·C + c``), any row and sample strides, unit column stride;
    weight ``(Co, C ≤ 16, 3, 3)``; bias ``(Co,)``; ``tile``: :func:`band_tile` of the weight at the launch's
    positions a block, in x's dtype (the caller may cache it; built here when None). Returns
    ``(S, R, Co·W)`` channel-major (column ``co·W + w``) in x's dtype, contiguous. Raises
    ValueError/TypeError on bad inputs, RuntimeError where Triton cannot run."""
    c, co, W = _check(x, weight, bias)
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[0] > MAX_SAMPLES:
        raise ValueError(f"x: expected at most {MAX_SAMPLES} samples, got {x.shape[0]}")
    if not HAS_TRITON:
        raise RuntimeError("band_conv needs triton (pip install triton); use band_conv_reference")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"x: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")
    if x.stride(2) != 1:
        x = x.contiguous()
    S, R, _ = x.shape
    half = x.dtype in (torch.float16, torch.bfloat16)
    cfg = launch_config(W, half, min(c, co))
    P = cfg["P"]
    expected = (3, c * P + 2 * PAD_COLUMNS, co * P)
    if tile is None:
        tile = band_tile(weight.to(torch.float32), P)
    elif tuple(tile.shape) != expected:
        raise ValueError(f"tile: expected band_tile(weight, {P}) of shape {expected}, got {tuple(tile.shape)}")
    tile = tile.to(x.dtype if half else torch.float32).contiguous()
    out = torch.empty(S, R, co * W, dtype=x.dtype, device=x.device)
    row_blocks = triton.cdiv(R, cfg["BM"])
    grid_m = min(row_blocks, cfg.pop("GRID_M", row_blocks))
    _band_conv_fwd[(grid_m, triton.cdiv(W, P), S)](x, tile, bias.to(torch.float32).contiguous(), out, x.stride(0),
                                                   x.stride(1), R, W, grid_m, C=c, CO=co, RELU=bool(relu), LP=half,
                                                   PAD=PAD_COLUMNS, LOOP=grid_m < row_blocks, **cfg)
    return out


def positions_per_block(width: int, channels: int) -> int:
    """The positions a block the kernel launches with at this width and the fewer of its input and output
    channels (what :func:`band_tile` must be built for)."""
    return launch_config(width, True, channels)["P"]


__all__ = ["band_conv", "band_conv_reference", "band_tile", "positions_per_block"]
