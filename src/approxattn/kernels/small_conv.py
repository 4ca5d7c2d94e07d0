"""Triton forward kernel for 2-D convolutions with few channels (≤ 8 in and out), as in SEA's decoder CNN.

cuDNN is far from the memory floor for 4 (or 2) channels over maps like ``(16, 4, 65536, 64)``;
here each program computes ``BR`` output rows × the whole width for *all* output channels
(fp32 accumulator ``(BCO, BR, BW)``), loading every shifted input tile once per
``(ci, kr, kc)``: the input is read about once from DRAM (the halo rows and the column shifts
hit the caches) and the output written once. Inference only (no backward).

One op, :func:`small_conv2d`, with its PyTorch twin :func:`small_conv2d_reference`::

    v = x.repeat_interleave(upsample_rows, dim=2)[:, :, :virtual_rows]      # the virtual input
    v = F.pad(v, (pad_left, pad_right, pad_top, pad_bottom))
    y = F.conv2d(v, weight, bias, stride=(stride_rows, 1), dilation=dilation)[:, :, :out_rows]
    y = relu(y) if relu else y

computed in fp32 (the kernel never materialises ``v``: virtual row u is physical row
``u // upsample_rows``, zero outside ``[0, virtual_rows)`` and outside ``[0, W)``).
:func:`fast_small_conv2d` is the dispatching form: None where the kernel does not apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import int_arg
from .dispatch import HAS_TRITON, interpreting, kernels_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _cast_out
else:  # pragma: no cover - the module still imports, fast_small_conv2d returns None
    triton = None

MAX_CHANNELS = 8
MAX_WIDTH = 256
KERNEL_SIZES = (1, 3)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp32 accumulators per program on a GPU: (BCO, BR, BW) ≤ this (16 registers a thread at 4 warps). Measured on
# an H100 at SEA's 64K maps (benchmarks/sea_decoder_tune.py): 8192 (BR = 32 rows of 4 × 64) took 1.51 / 1.37 ms
# for the down / middle conv, 2048 (BR = 8) 0.75 / 0.72 ms; smaller blocks leave room for more warps in flight.
ACC_BUDGET = 2048
MAX_BLOCK_ROWS = 64
OVERRIDE: dict[str, int] = {}   # tuning runs set this (BR, num_warps)


# ---------------------------------------------------------------- checks and geometry


def _dilation_pair(dilation) -> tuple[int, int]:
    if isinstance(dilation, (tuple, list)):
        if len(dilation) != 2:
            raise ValueError(f"dilation: expected an int or a pair (rows, width), got {tuple(dilation)}")
        return int_arg("dilation", dilation[0], 1), int_arg("dilation", dilation[1], 1)
    d = int_arg("dilation", dilation, 1)
    return d, d


def _geometry(x, weight, bias, *, stride_rows, dilation, pad_top, pad_bottom, pad_left, pad_right,
              upsample_rows, virtual_rows, out_rows, out_dtype) -> dict:
    """Validates the arguments (any size: the kernel's own limits are in :func:`_kernel_limit`) and
    returns the geometry: virtual rows V, output rows/width, row and width dilation, output dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor (S, C, R, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D tensor (Co, C, KH, KW), got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    _, C, R, W = x.shape
    Co, Cw, KH, KW = weight.shape
    if Cw != C:
        raise ValueError(f"weight: expected {C} input channels (x.shape[1]), got {Cw} (weight.shape[1])")
    if KH not in KERNEL_SIZES or KW not in KERNEL_SIZES:
        raise ValueError(f"weight: expected a kernel of 1 or 3 rows and columns, got {KH}×{KW}")
    if Co < 1 or C < 1:
        raise ValueError(f"weight: expected at least one input and one output channel, got shape {tuple(weight.shape)}")
    if R < 1 or W < 1:
        raise ValueError(f"x: expected at least one row and one column, got shape {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected a tensor on {x.device} (x's device), got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"bias: expected a floating-point tensor, got {bias.dtype}")
        if tuple(bias.shape) != (Co,):
            raise ValueError(f"bias: expected shape ({Co},) (weight.shape[0]), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected a tensor on {x.device} (x's device), got {bias.device}")
    stride_rows = int_arg("stride_rows", stride_rows, 1)
    dil_r, dil_c = _dilation_pair(dilation)
    pads = [int_arg(name, value, 0) for name, value in
            (("pad_top", pad_top), ("pad_bottom", pad_bottom), ("pad_left", pad_left), ("pad_right", pad_right))]
    upsample_rows = int_arg("upsample_rows", upsample_rows, 1)
    V = R * upsample_rows if virtual_rows is None else int_arg("virtual_rows", virtual_rows, 1)
    if V > R * upsample_rows:
        raise ValueError(f"virtual_rows: expected at most {R * upsample_rows} (x's {R} rows × upsample_rows="
                         f"{upsample_rows}), got {V}")
    rows_in = V + pads[0] + pads[1] - dil_r * (KH - 1)
    width_out = W + pads[2] + pads[3] - dil_c * (KW - 1)
    if rows_in < 1:
        raise ValueError(f"x: {V} virtual rows padded by {pads[0]} + {pads[1]} are fewer than the "
                         f"kernel's extent {dil_r * (KH - 1) + 1} (dilation {dil_r})")
    if width_out < 1:
        raise ValueError(f"x: width {W} padded by {pads[2]} + {pads[3]} is less than the kernel's extent "
                         f"{dil_c * (KW - 1) + 1} (dilation {dil_c})")
    rows_out = (rows_in - 1) // stride_rows + 1
    if out_rows is not None:
        out_rows = int_arg("out_rows", out_rows, 1)
        if out_rows > rows_out:
            raise ValueError(f"out_rows: expected at most {rows_out} (the convolution's output rows), got {out_rows}")
        rows_out = out_rows
    if out_dtype is None:
        out_dtype = x.dtype
    elif not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype: expected a floating-point torch.dtype or None, got {out_dtype}")
    return {"V": V, "rows_out": rows_out, "width_out": width_out, "dil_r": dil_r, "dil_c": dil_c,
            "stride_rows": stride_rows, "upsample_rows": upsample_rows, "pads": pads, "out_dtype": out_dtype}


def _kernel_limit(x, weight, geo) -> Exception | None:
    """Why the kernel does not cover these (valid) inputs (the error small_conv2d raises), or None."""
    if x.dtype not in KERNEL_DTYPES:
        return TypeError(f"x: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if geo["out_dtype"] not in KERNEL_DTYPES:
        return TypeError(f"out_dtype: expected float16, bfloat16 or float32, got {geo['out_dtype']}")
    if weight.shape[1] > MAX_CHANNELS:
        return ValueError(f"x: expected at most {MAX_CHANNELS} input channels, got {weight.shape[1]}")
    if weight.shape[0] > MAX_CHANNELS:
        return ValueError(f"weight: expected at most {MAX_CHANNELS} output channels, got {weight.shape[0]}")
    if geo["width_out"] > MAX_WIDTH:
        return ValueError(f"x: expected an output width of at most {MAX_WIDTH}, got {geo['width_out']}")
    return None


# ---------------------------------------------------------------- reference


def small_conv2d_reference(x, weight, bias=None, *, stride_rows=1, dilation=1, pad_top=0, pad_bottom=0,
                           pad_left=0, pad_right=0, upsample_rows=1, virtual_rows=None, out_rows=None,
                           relu=False, out_dtype=None) -> torch.Tensor:
    """The PyTorch twin of :func:`small_conv2d` (same arguments; any channel count and width), in
    fp32 (fp64 for fp64 inputs), the output cast to ``out_dtype`` (default ``x.dtype``)."""
    geo = _geometry(x, weight, bias, stride_rows=stride_rows, dilation=dilation, pad_top=pad_top,
                    pad_bottom=pad_bottom, pad_left=pad_left, pad_right=pad_right, upsample_rows=upsample_rows,
                    virtual_rows=virtual_rows, out_rows=out_rows, out_dtype=out_dtype)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.to(compute)
    if geo["upsample_rows"] > 1:
        v = v.repeat_interleave(geo["upsample_rows"], dim=2)
    v = v[:, :, :geo["V"]]
    top, bottom, left, right = geo["pads"]
    v = F.pad(v, (left, right, top, bottom))
    y = F.conv2d(v, weight.to(compute), None if bias is None else bias.to(compute),
                 stride=(geo["stride_rows"], 1), dilation=(geo["dil_r"], geo["dil_c"]))
    y = y[:, :, :geo["rows_out"]]
    if relu:
        y = F.relu(y)
    return y.to(geo["out_dtype"]).contiguous()


# ---------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _small_conv_fwd(
        x_ptr, w_ptr, b_ptr, o_ptr,
        stride_xs, stride_xc, stride_xr, stride_xw,
        V, W, R_out, W_out, pad_top, pad_left,
        C: tl.constexpr, CO: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        STRIDE: tl.constexpr, DIL_R: tl.constexpr, DIL_C: tl.constexpr, UP: tl.constexpr,
        BCO: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    ):
        """Grid (row block, sample): BR output rows × the whole width × all output channels."""
        pid_r = tl.program_id(0)
        s = tl.program_id(1).to(tl.int64)
        offs_r = pid_r * BR + tl.arange(0, BR)
        offs_w = tl.arange(0, BW)
        offs_co = tl.arange(0, BCO)
        co_ok = offs_co < CO
        r_ok = offs_r < R_out
        w_ok = offs_w < W_out
        x_ci = x_ptr + s * stride_xs   # channel ci's plane: advanced by pointer steps, no int32 ci·stride
        acc = tl.zeros([BCO, BR, BW], dtype=tl.float32)
        for ci in tl.static_range(C):
            for kr in tl.static_range(KH):
                # virtual row of the (upsampled, cropped) input, then the physical row it repeats
                u = offs_r * STRIDE - pad_top + kr * DIL_R
                row_ok = r_ok & (u >= 0) & (u < V)
                row = tl.maximum(u, 0) // UP
                row_ptr = x_ci + row.to(tl.int64) * stride_xr
                for kc in tl.static_range(KW):
                    col = offs_w - pad_left + kc * DIL_C
                    col_ok = w_ok & (col >= 0) & (col < W)
                    tile = tl.load(row_ptr[:, None] + col.to(tl.int64)[None, :] * stride_xw,
                                   mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                    # w[:, ci, kr, kc] of the contiguous (Co, C, KH, KW) weight
                    wv = tl.load(w_ptr + offs_co * (C * KH * KW) + (ci * KH + kr) * KW + kc,
                                 mask=co_ok, other=0.0).to(tl.float32)
                    acc += wv[:, None, None] * tile[None, :, :]
            x_ci += stride_xc
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)[:, None, None]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        # contiguous (S, Co, R_out, W_out) output
        o_off = (((s * CO + offs_co.to(tl.int64)[:, None, None]) * R_out + offs_r.to(tl.int64)[None, :, None])
                 * W_out + offs_w[None, None, :])
        tl.store(o_ptr + o_off, _cast_out(acc, o_ptr.dtype.element_ty),
                 mask=co_ok[:, None, None] & r_ok[None, :, None] & w_ok[None, None, :])


def launch_config(out_channels: int, width_out: int, rows_out: int) -> dict[str, int]:
    """Block sizes: BCO, BW the next powers of two of Co and W_out; BR rows so that the
    ``BCO·BR·BW`` fp32 accumulators stay within :data:`ACC_BUDGET` (8 rows under the interpreter)."""
    BCO = triton.next_power_of_2(out_channels)
    BW = triton.next_power_of_2(width_out)
    if interpreting():
        return {"BCO": BCO, "BW": BW, "BR": 8}
    BR = max(1, min(MAX_BLOCK_ROWS, ACC_BUDGET // (BCO * BW), triton.next_power_of_2(rows_out)))
    return {"BCO": BCO, "BW": BW, "BR": BR, "num_warps": 4, **OVERRIDE}


def small_conv2d(x, weight, bias=None, *, stride_rows=1, dilation=1, pad_top=0, pad_bottom=0, pad_left=0,
                 pad_right=0, upsample_rows=1, virtual_rows=None, out_rows=None, relu=False,
                 out_dtype=None) -> torch.Tensor:
    """The Triton kernel's convolution (inference only; see the module docstring for the op).

    x ``(S, C, R, W)`` with any strides (e.g. a permuted view: it is read in place); weight
    ``(Co, C, KH, KW)`` with KH, KW ∈ {1, 3}, C, Co ≤ 8; bias ``(Co,)`` or None.

    - ``stride_rows``: row stride (the width stride is 1); ``dilation``: int or (rows, width).
    - ``pad_*``: zero padding of the virtual input on each side.
    - ``upsample_rows``, ``virtual_rows``: the input is x with every row repeated
      ``upsample_rows`` times (nearest upsampling), cropped to its first ``virtual_rows`` rows
      (default ``R·upsample_rows``, at most that).
    - ``out_rows``: keep only the first ``out_rows`` output rows (at most the natural count).
    - ``relu``: apply ReLU to the output; ``out_dtype``: default ``x.dtype`` (math is fp32).

    Returns ``(S, Co, R_out, W_out)`` contiguous, ``R_out = (V + pad_top + pad_bottom −
    dil_r·(KH − 1) − 1) // stride_rows + 1`` (or ``out_rows``), ``W_out = W + pad_left + pad_right −
    dil_w·(KW − 1)`` (≤ 256). Raises ValueError/TypeError on bad or unsupported inputs and
    RuntimeError where Triton cannot run on x's device; :func:`fast_small_conv2d` dispatches.
    """
    geo = _geometry(x, weight, bias, stride_rows=stride_rows, dilation=dilation, pad_top=pad_top,
                    pad_bottom=pad_bottom, pad_left=pad_left, pad_right=pad_right, upsample_rows=upsample_rows,
                    virtual_rows=virtual_rows, out_rows=out_rows, out_dtype=out_dtype)
    error = _kernel_limit(x, weight, geo)
    if error is not None:
        raise error
    return _launch(x, weight, bias, geo, relu)


def _launch(x, weight, bias, geo: dict, relu) -> torch.Tensor:
    """The kernel on inputs :func:`_geometry` and :func:`_kernel_limit` have passed."""
    if not HAS_TRITON:
        raise RuntimeError("small_conv2d needs triton (pip install triton); use small_conv2d_reference")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"x: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")
    S = x.shape[0]
    Co, C, KH, KW = weight.shape
    R_out, W_out = geo["rows_out"], geo["width_out"]
    out = torch.empty(S, Co, R_out, W_out, dtype=geo["out_dtype"], device=x.device)
    if S == 0:
        return out
    # a few dozen numbers: made contiguous here so the kernel indexes them without strides
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w   # any pointer: never read without HAS_BIAS
    cfg = launch_config(Co, W_out, R_out)
    BR = cfg["BR"]
    _small_conv_fwd[(triton.cdiv(R_out, BR), S)](
        x, w, b, out, *x.stride(),
        geo["V"], x.shape[3], R_out, W_out, geo["pads"][0], geo["pads"][2],
        C=C, CO=Co, KH=KH, KW=KW, STRIDE=geo["stride_rows"], DIL_R=geo["dil_r"], DIL_C=geo["dil_c"],
        UP=geo["upsample_rows"], HAS_BIAS=bias is not None, RELU=bool(relu), **cfg,
    )
    return out


def fast_small_conv2d(x, weight, bias=None, *, stride_rows=1, dilation=1, pad_top=0, pad_bottom=0, pad_left=0,
                      pad_right=0, upsample_rows=1, virtual_rows=None, out_rows=None, relu=False,
                      out_dtype=None) -> torch.Tensor | None:
    """:func:`small_conv2d`'s output, or None where the kernel does not apply (then the caller
    runs ``F.conv2d`` or :func:`small_conv2d_reference`).

    None when: Triton is missing, ``APPROXATTN_DISABLE_KERNELS=1``, x is not CUDA (unless
    ``TRITON_INTERPRET=1`` and ``APPROXATTN_FORCE_KERNELS=1``), a gradient is required, more than
    8 channels in or out, an output width over 256, or an fp64 input or output. Bad inputs raise.
    """
    kwargs = {"stride_rows": stride_rows, "dilation": dilation, "pad_top": pad_top, "pad_bottom": pad_bottom,
              "pad_left": pad_left, "pad_right": pad_right, "upsample_rows": upsample_rows,
              "virtual_rows": virtual_rows, "out_rows": out_rows, "out_dtype": out_dtype}
    geo = _geometry(x, weight, bias, **kwargs)
    if not kernels_enabled(x) or _kernel_limit(x, weight, geo) is not None:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return None
    return _launch(x, weight, bias, geo, relu)   # already checked: no second _geometry pass
