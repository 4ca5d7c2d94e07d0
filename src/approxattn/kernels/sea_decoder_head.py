"""Triton forward kernel for the head of SEA's non-causal decoder, in one pass over the rows.

The unfused head (``blocks.sea_estimator.NonCausalDecoder``) runs, on maps such as
``(16, 65536, ·)``: the last 3×3 convolution (C channels → 1, over the rows upsampled ×2), the
linear resize of the width W → T (a GEMM), the log-histogram residual (a GEMM, clamp, log), the
sum, and the softmax over T: seven passes over ``(S, N, T)``-sized maps. Here each program takes
``BR`` rows of one sample: the convolution in fp32 registers (as :mod:`.small_conv`), the resize
and the histogram as two small ``tl.dot`` s against ``(W, T)`` and ``(d, T)`` matrices, then the
softmax and the row argmax; it writes the logits, the probabilities and the argmax once.
Inference only (no backward).

One op, :func:`decoder_head`, with its PyTorch twin :func:`decoder_head_reference`::

    c = conv3×3(repeat_rows(y, 2)[:, :, :rows], weight, bias, padding=1)      # (S, 1, rows, W)
    logits = c @ interp                                                      # (S, rows, T)
    logits += log(max(histogram @ hist_weights[s // heads], floor))          # if a histogram is given
    probs = softmax(logits, -1);  best = argmax(probs, -1)     # the first of equal maxima

all in fp32, the two small matmuls on TF32 tensor cores for half maps (the unfused path's half-precision GEMMs
rounded the map and the residual to bf16 before the softmax, which flips near-tied cells); the
logits are returned in y's dtype (for inspection), the probabilities in fp32 from the unrounded
logits.
:func:`fast_decoder_head` is the dispatching form: None where the kernel does not apply.

Two convolutions, one kernel (steps 2–4 are :func:`_head_rows`, whose residual, softmax and argmax are
``row_window_gemm``'s too): the direct one reads 36 shifted y tiles for its BR rows; the paired one (``PAIRED``)
reads 36 for BR pairs of rows, since rows 2m and 2m + 1 of the ×2 map tap the same three y rows. The paired one
with ``SPLIT_DOTS`` (the dots as half dots over hi + lo splits) is the default (``PAIRED``, ``SPLIT_DOTS``; run 19:
1.19 ms against the direct TF32 kernel's 1.59 at SEA's 64K map on an H100); ``OVERRIDE`` selects the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, interpreting, kernels_enabled
from .row_window_gemm import check_histogram, residual_softmax_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _INTERPRET, _cast_out, _dot_split_left
    from .row_window_gemm import _log_histogram, _row_argmax, _softmax  # the epilogue both fused heads share
else:  # pragma: no cover - the module still imports, fast_decoder_head returns None
    triton = None

MAX_CHANNELS = 8
MAX_WIDTH = 128        # W, the decoder's width before the resize
MAX_COLUMNS = 256      # T
MAX_HISTOGRAM = 128    # d
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OVERRIDE: dict[str, int] = {}   # tuning runs set this (BR, num_warps, SPLIT_DOTS, PAIRED, maxnreg)
# The two dots as half dots over hi + lo splits of the fp32 operand (where interp and the histogram come in y's
# half dtype) instead of TF32: more precise (against the fp64 twin at 64K: column sums 1.7e-7 against TF32's
# 1.0e-4, argmax 0.999998 against 0.99868) and half the shared memory. The paired convolution (two output rows
# from the same three y rows: half the loads, two thirds of the FMAs; BR counts pairs). Both the default since
# run 19 (H100, SEA's 64K map, benchmarks/sea_head_tune.py): 1.192 ms at 16 pairs, 8 warps, 128 registers,
# against 1.593 for the direct TF32 kernel at 16 rows; OVERRIDE = {"PAIRED": 0, "SPLIT_DOTS": 0} restores that.
SPLIT_DOTS = True
PAIRED = True


def _check(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor) -> None:
    for name, t in (("y", y), ("weight", weight), ("bias", bias), ("interp", interp)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if y.dim() != 4 or min(y.shape[1:]) < 1:
        raise ValueError(f"y: expected a non-empty (S, C, R, W) tensor, got shape {tuple(y.shape)}")
    S, C, R, W = y.shape
    if tuple(weight.shape) != (1, C, 3, 3):
        raise ValueError(f"weight: expected shape (1, {C}, 3, 3) (one output channel over y's {C}), "
                         f"got {tuple(weight.shape)}")
    if tuple(bias.shape) != (1,):
        raise ValueError(f"bias: expected shape (1,), got {tuple(bias.shape)}")
    if interp.dim() != 2 or interp.shape[0] != W or interp.shape[1] < 1:
        raise ValueError(f"interp: expected shape ({W}, T) (y's width first), got {tuple(interp.shape)}")
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= 2 * R:
        raise ValueError(f"rows: expected an int in [1, {2 * R}] (y's {R} rows upsampled ×2), got {rows!r}")
    check_histogram(S, rows, interp.shape[1], histogram, hist_weights, heads, floor, y.device)


def decoder_head_reference(y, weight, bias, interp, *, rows, histogram=None, hist_weights=None, heads=1,
                           floor=1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch twin of :func:`decoder_head`: ``(logits (S, rows, T) in y's dtype, probs fp32,
    best (S, rows) int64)`` (fp64 throughout for fp64 inputs)."""
    _check(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor)
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    v = y.to(compute).repeat_interleave(2, dim=2)[:, :, :rows]
    conv = F.conv2d(v, weight.to(y.dtype).to(compute), bias.to(y.dtype).to(compute), padding=1)[:, 0]   # (S, rows, W)
    logits = conv @ interp.to(compute)
    hist = None if histogram is None else histogram.to(y.dtype)     # the kernel reads the histogram in y's dtype
    return residual_softmax_reference(logits, hist, hist_weights, heads, floor, y.dtype)


if HAS_TRITON:

    @triton.jit
    def _tf32_dot(a, b, EXACT: tl.constexpr):
        """fp32 ``a @ b`` on TF32 tensor cores; exact fp32 products with EXACT (fp32 inputs, as the
        unfused path's fp32 GEMMs) and under the interpreter."""
        if _INTERPRET or EXACT:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision="tf32")

    @triton.jit
    def _head_rows(conv, offs_u, u_ok, s, pid, r_ptr, h_ptr, hw_ptr, logit_ptr, prob_ptr, best_ptr, sums_ptr,
                   stride_hs, stride_hn, stride_hd, N, T, D, HEADS, NB, floor, offs_w, w_ok, offs_t, t_ok,
                   BD: tl.constexpr, HAS_HISTOGRAM: tl.constexpr, EXACT: tl.constexpr, STORE_MAPS: tl.constexpr,
                   COLUMN_SUMS: tl.constexpr, SPLIT_DOTS: tl.constexpr, HALF: tl.constexpr):
        """Steps 2–4 of the head for the conv rows ``conv (BR, BW)`` (output rows offs_u of sample s): the resize,
        the residual, the softmax, then the maps (STORE_MAPS), the probabilities' column sums over the valid rows
        into ``sums[s, pid]`` (COLUMN_SUMS; ``sums (S, NB, T)``) and each row's argmax."""
        # 2. the width resize, (BR, W) @ (W, T): fp32 operands on TF32 tensor cores (10-bit mantissas, against
        # bf16's 7; exact fp32 dots would be ~17 G FMAs on the CUDA cores at N = 65,536), or split half dots
        interp = tl.load(r_ptr + offs_w[:, None] * T + offs_t[None, :], mask=w_ok[:, None] & t_ok[None, :], other=0.0)
        if SPLIT_DOTS:
            logits = _dot_split_left(conv, interp)                                   # (BR, BT) fp32
        else:
            logits = _tf32_dot(conv, interp, EXACT)
        # 3. the log-histogram residual: (BR, d) @ (d, T) of this sample's batch element (split: the histogram in
        # y's dtype, as the reference reads it)
        if HAS_HISTOGRAM:
            logits += _log_histogram(h_ptr, hw_ptr, s, offs_u, u_ok, offs_t, t_ok, stride_hs, stride_hn, stride_hd,
                                     D, T, HEADS, floor, BD, 0 if SPLIT_DOTS else (2 if EXACT else 1), HALF)
        # 4. the softmax over T of the fp32 logits; the logits stored in y's dtype
        probs = _softmax(logits, t_ok)
        keep = u_ok[:, None] & t_ok[None, :]
        if STORE_MAPS:
            out = (s * N + offs_u[:, None].to(tl.int64)) * T + offs_t[None, :]
            tl.store(logit_ptr + out, _cast_out(logits, logit_ptr.dtype.element_ty), mask=keep)
            tl.store(prob_ptr + out, probs, mask=keep)
        if COLUMN_SUMS:   # the average context's column means, without the probabilities going to memory
            tl.store(sums_ptr + (s * NB + pid) * T + offs_t, tl.sum(tl.where(keep, probs, 0.0), 0), mask=t_ok)
        # each row's most probable column: the selection's one-cell-a-row case reads it instead of another pass
        # over the probabilities
        tl.store(best_ptr + s * N + offs_u, _row_argmax(probs, t_ok).to(tl.int64), mask=u_ok)

    @triton.jit
    def _direct_conv(y_s, w_ptr, offs_u, u_ok, offs_w, w_ok, stride_yc, stride_yr, stride_yw, N, W,
                     C: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
        """The 3×3 convolution (padding 1) over the rows upsampled ×2 for output rows offs_u, ``(BR, BW)`` fp32:
        36 shifted y tiles (C = 4)."""
        conv = tl.zeros([BR, BW], dtype=tl.float32)
        y_ci = y_s
        for ci in tl.static_range(C):
            for kr in tl.static_range(3):
                u = offs_u - 1 + kr
                row_ok = u_ok & (u >= 0) & (u < N)
                row_ptr = y_ci + (tl.maximum(u, 0) // 2).to(tl.int64) * stride_yr
                for kc in tl.static_range(3):
                    col = offs_w - 1 + kc
                    col_ok = w_ok & (col >= 0) & (col < W)
                    tile = tl.load(row_ptr[:, None] + col[None, :] * stride_yw,
                                   mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                    conv += tl.load(w_ptr + (ci * 3 + kr) * 3 + kc).to(tl.float32) * tile
            y_ci += stride_yc
        return conv

    @triton.jit
    def _paired_conv(y_s, w_ptr, offs_m, offs_w, w_ok, stride_yc, stride_yr, stride_yw, N, W,
                     C: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
        """The same convolution for BR pairs of output rows (2m, 2m + 1), m in offs_m, as ``(2·BR, BW)`` in output
        order. Upsampled ×2, a pair's taps read y's rows m − 1, m, m + 1 only: row 2m is ``w0·y[m−1] +
        (w1 + w2)·y[m]``, row 2m + 1 ``(w0 + w1)·y[m] + w2·y[m+1]`` (a tap past the last virtual row N − 1 reads
        zeros). So each y tile serves both rows: half the loads and two thirds of the FMAs a row."""
        even = 2 * offs_m
        even_ok = even < N
        odd_ok = even + 1 < N
        prev_ok = even_ok & (offs_m >= 1)
        next_ok = even + 2 < N
        conv_even = tl.zeros([BR, BW], dtype=tl.float32)
        conv_odd = tl.zeros([BR, BW], dtype=tl.float32)
        for ci in tl.static_range(C):
            y_ci = y_s + ci * stride_yc
            for kc in tl.static_range(3):
                col = offs_w - 1 + kc
                col_ok = (w_ok & (col >= 0) & (col < W))[None, :]
                tile = y_ci + offs_m[:, None].to(tl.int64) * stride_yr + col[None, :] * stride_yw
                y_prev = tl.load(tile - stride_yr, mask=prev_ok[:, None] & col_ok, other=0.0).to(tl.float32)
                y_mid = tl.load(tile, mask=even_ok[:, None] & col_ok, other=0.0).to(tl.float32)
                y_next = tl.load(tile + stride_yr, mask=next_ok[:, None] & col_ok, other=0.0).to(tl.float32)
                w0 = tl.load(w_ptr + ci * 9 + kc).to(tl.float32)
                w1 = tl.load(w_ptr + ci * 9 + 3 + kc).to(tl.float32)
                w2 = tl.load(w_ptr + ci * 9 + 6 + kc).to(tl.float32)
                mid_even = w1 + tl.where(odd_ok, w2, 0.0)      # tap 2m + 1 of row 2m: zero past the last row
                conv_even += w0 * y_prev + mid_even[:, None] * y_mid
                conv_odd += (w0 + w1) * y_mid + w2 * y_next
        # the pairs' rows interleaved back into output order
        return tl.reshape(tl.permute(tl.join(conv_even, conv_odd), (0, 2, 1)), (2 * BR, BW))

    @triton.jit
    def _decoder_head_fwd(
        y_ptr, w_ptr, b_ptr, r_ptr, h_ptr, hw_ptr, logit_ptr, prob_ptr, best_ptr, sums_ptr,
        stride_ys, stride_yc, stride_yr, stride_yw, stride_hs, stride_hn, stride_hd,
        R, W, N, T, D, HEADS, NB, floor,
        C: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
        HAS_HISTOGRAM: tl.constexpr, EXACT: tl.constexpr, STORE_MAPS: tl.constexpr, COLUMN_SUMS: tl.constexpr,
        SPLIT_DOTS: tl.constexpr, PAIRED: tl.constexpr,
    ):
        """Grid (row block, sample): BR output rows (PAIRED: BR pairs of rows, :func:`_paired_conv`) × all T columns
        of one sample. STORE_MAPS: write the logits and probabilities; COLUMN_SUMS: write the block's column sums of
        the probabilities (``sums (S, NB, T)``, NB = the grid's row blocks). SPLIT_DOTS: interp and the histogram in
        y's half dtype; the two dots on half tensor cores with the fp32 operand split into hi + lo halves (~16-bit
        mantissas against TF32's 10, half the shared memory of fp32 operands)."""
        pid = tl.program_id(0)
        s = tl.program_id(1).to(tl.int64)
        offs_w = tl.arange(0, BW)
        offs_t = tl.arange(0, BT)
        w_ok = offs_w < W
        t_ok = offs_t < T
        y_s = y_ptr + s * stride_ys
        # 1. the 3×3 convolution over the rows upsampled ×2, fp32 registers; output rows = virtual rows of the map
        if PAIRED:
            offs_u = 2 * pid * BR + tl.arange(0, 2 * BR)
            conv = _paired_conv(y_s, w_ptr, pid * BR + tl.arange(0, BR), offs_w, w_ok, stride_yc, stride_yr,
                                stride_yw, N, W, C, BR, BW)
        else:
            offs_u = pid * BR + tl.arange(0, BR)
            conv = _direct_conv(y_s, w_ptr, offs_u, offs_u < N, offs_w, w_ok, stride_yc, stride_yr, stride_yw, N, W,
                                C, BR, BW)
        conv += tl.load(b_ptr).to(tl.float32)
        _head_rows(conv, offs_u, offs_u < N, s, pid, r_ptr, h_ptr, hw_ptr, logit_ptr, prob_ptr, best_ptr, sums_ptr,
                   stride_hs, stride_hn, stride_hd, N, T, D, HEADS, NB, floor, offs_w, w_ok, offs_t, t_ok, BD,
                   HAS_HISTOGRAM, EXACT, STORE_MAPS, COLUMN_SUMS, SPLIT_DOTS, y_ptr.dtype.element_ty)

def launch_config(width: int, columns: int, dim: int) -> dict[str, int]:
    """Block sizes: BW, BT, BD the next powers of two (≥ 16, for tl.dot); BR = 16 rows (pairs of rows when
    PAIRED) a program, at 8 warps and at most 128 registers a thread on a GPU (the best of run 19's 19 configs on
    an H100 at SEA's 64K map, T = 128), 16 under the interpreter."""
    blocks = {"BW": max(16, triton.next_power_of_2(width)), "BT": max(16, triton.next_power_of_2(columns)),
              "BD": max(16, triton.next_power_of_2(dim)), "SPLIT_DOTS": bool(OVERRIDE.get("SPLIT_DOTS", SPLIT_DOTS)),
              "PAIRED": bool(OVERRIDE.get("PAIRED", PAIRED))}
    if interpreting():
        return {**blocks, "BR": 16}
    return {**blocks, "BR": 16, "num_warps": 8, "maxnreg": 128, **OVERRIDE}


def _kernel_limit(y, interp, histogram) -> Exception | None:
    """Why the kernel does not cover these (valid) inputs, or None."""
    if y.dtype not in KERNEL_DTYPES:
        return TypeError(f"y: expected dtype float16, bfloat16 or float32, got {y.dtype}")
    if y.shape[1] > MAX_CHANNELS:
        return ValueError(f"y: expected at most {MAX_CHANNELS} channels, got {y.shape[1]}")
    if y.shape[3] > MAX_WIDTH:
        return ValueError(f"y: expected a width of at most {MAX_WIDTH}, got {y.shape[3]}")
    if interp.shape[1] > MAX_COLUMNS:
        return ValueError(f"interp: expected at most {MAX_COLUMNS} columns, got {interp.shape[1]}")
    if histogram is not None and histogram.shape[2] > MAX_HISTOGRAM:
        return ValueError(f"histogram: expected at most {MAX_HISTOGRAM} bins, got {histogram.shape[2]}")
    return None


def decoder_head(y, weight, bias, interp, *, rows, histogram=None, hist_weights=None, heads=1,
                 floor=1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel's head (inference only; see the module docstring for the op).

    y ``(S, C, R, W)`` the decoder's last map before its output conv (any strides), C ≤ 8, W ≤ 128;
    weight ``(1, C, 3, 3)``, bias ``(1,)``; interp ``(W, T)``, T ≤ 256; rows: output rows (≤ 2R);
    histogram ``(S, rows, d)`` (any strides, d ≤ 128) with hist_weights ``(S // heads, d, T)`` (sample
    s reads batch element ``s // heads``), or neither; floor: the clamp before the log.

    Returns ``(logits (S, rows, T) in y's dtype, probs (S, rows, T) fp32, best (S, rows) int64: each
    row's argmax of probs)``, contiguous. Raises
    ValueError/TypeError on bad or unsupported inputs and RuntimeError where Triton cannot run.
    """
    _check(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor)
    error = _kernel_limit(y, interp, histogram)
    if error is not None:
        raise error
    return _launch(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor)


def _launch(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor, *, maps=True):
    """maps: (logits, probs, best) as :func:`decoder_head`; else (best, column sums ``(S, T)`` fp32)."""
    if not HAS_TRITON:
        raise RuntimeError("decoder_head needs triton (pip install triton); use decoder_head_reference")
    if not (y.is_cuda or interpreting()):
        raise RuntimeError(f"y: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {y.device}")
    S, C, R, W = y.shape
    T = interp.shape[1]
    map_rows = rows if maps else 0
    logits = torch.empty(S, map_rows, T, dtype=y.dtype, device=y.device)
    probs = torch.empty(S, map_rows, T, dtype=torch.float32, device=y.device)
    best = torch.empty(S, rows, dtype=torch.int64, device=y.device)
    if S == 0:
        return (logits, probs, best) if maps else (best, torch.zeros(S, T, device=y.device))
    # the conv's weights in y's dtype (as the unfused path casts them); the small matrices in fp32
    weight, bias = (t.to(y.dtype).contiguous() for t in (weight, bias))
    has_histogram = histogram is not None
    if has_histogram:
        hist_weights = hist_weights.to(torch.float32).contiguous()
        h, hw, D, strides = histogram, hist_weights, histogram.shape[2], histogram.stride()
    else:
        h, hw, D, strides = y, y, 1, (0, 0, 0)    # never read
    cfg = launch_config(W, T, D)
    # half dots only where interp is exact in y's half dtype (the module passes it in y's dtype)
    cfg["SPLIT_DOTS"] = cfg["SPLIT_DOTS"] and y.dtype in (torch.float16, torch.bfloat16) and interp.dtype == y.dtype
    interp = interp.to(y.dtype if cfg["SPLIT_DOTS"] else torch.float32).contiguous()
    blocks = triton.cdiv(triton.cdiv(rows, 2) if cfg["PAIRED"] else rows, cfg["BR"])
    sums = best if maps else torch.empty(S, blocks, T, dtype=torch.float32, device=y.device)
    _decoder_head_fwd[(blocks, S)](
        y, weight, bias, interp, h, hw, logits, probs, best, sums, *y.stride(), *strides,
        R, W, rows, T, D, heads, blocks, float(floor),
        C=C, HAS_HISTOGRAM=has_histogram, EXACT=y.dtype == torch.float32, STORE_MAPS=maps, COLUMN_SUMS=not maps,
        **cfg,
    )
    return (logits, probs, best) if maps else (best, sums.sum(1))


def fast_decoder_head(y, weight, bias, interp, *, rows, histogram=None, hist_weights=None, heads=1,
                      floor=1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`decoder_head`'s output, or None where the kernel does not apply (then the caller runs
    the unfused layers).

    None when: Triton is missing, ``APPROXATTN_DISABLE_KERNELS=1``, y is not CUDA (unless
    ``TRITON_INTERPRET=1`` and ``APPROXATTN_FORCE_KERNELS=1``), a gradient is required, or the sizes
    or dtype are past the kernel's limits. Bad inputs raise.
    """
    if not _dispatches(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor):
        return None
    return _launch(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor)


def _dispatches(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor) -> bool:
    """The dispatching forms' checks: bad inputs raise; False where the kernel does not apply."""
    _check(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor)
    if not kernels_enabled(y) or _kernel_limit(y, interp, histogram) is not None:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (y, weight, bias, interp, histogram, hist_weights)))


def decoder_head_best_reference(y, weight, bias, interp, *, rows, histogram=None, hist_weights=None, heads=1,
                                floor=1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch twin of :func:`fast_decoder_head_best`: ``(best (S, rows) int64, column sums of the
    probabilities (S, T))`` from :func:`decoder_head_reference`."""
    _, probs, best = decoder_head_reference(y, weight, bias, interp, rows=rows, histogram=histogram,
                                            hist_weights=hist_weights, heads=heads, floor=floor)
    return best, probs.sum(1)


def fast_decoder_head_best(y, weight, bias, interp, *, rows, histogram=None, hist_weights=None, heads=1,
                           floor=1e-6) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What inference needs of the head when every row keeps its best cell alone: ``(best (S, rows)
    int64, the probabilities' column sums (S, T) fp32)``, neither logits nor probabilities written
    (at SEA's 64K maps they are 0.8 GB). None where the kernel does not apply (as
    :func:`fast_decoder_head`)."""
    if not _dispatches(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor):
        return None
    return _launch(y, weight, bias, interp, rows, histogram, hist_weights, heads, floor, maps=False)


__all__ = ["decoder_head", "decoder_head_best_reference", "decoder_head_reference", "fast_decoder_head",
           "fast_decoder_head_best"]
