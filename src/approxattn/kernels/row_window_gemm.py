"""Triton forward kernel: a convolution over rows written as GEMMs ("row-window GEMM").

A 3×3 convolution (padding 1) over maps ``(S, C, R, W)`` whose width is small is, per output row, a
sum over its three row taps of ``input row (C·W) @ M_tap (C·W × Co·W)``, with M_tap a banded matrix
built from the conv weights (zero where a column shift leaves the width). Written that way it runs on
the tensor cores, reads each input row once per tap from cache, and composes with the linear maps
around it: in SEA's non-causal decoder (row linear → strided conv → conv → conv over rows upsampled ×2 →
width resize) the row linear and the two convs after it are two such GEMMs (the linear folded into the
first); the head can be a third with the resize folded in (``window_gemm_softmax``), though the fused
head kernel of ``sea_decoder_head`` is the default (faster as tuned; ``blocks.sea_estimator.NonCausalDecoder``).
Inference only (no backward).

Two ops, each with a PyTorch twin::

    window_gemm(x, weights, bias, step, pad, up, virtual_rows, out_rows, tap_bias, relu):
        for output row r and tap t: v = r·step + t − pad;  valid: 0 ≤ v < virtual_rows
        out[s, r] = Σ_t valid · (x[s, v // up] @ weights[t] + tap_bias[t]) + bias      (then ReLU)

    window_gemm_softmax(x, weights, bias, ..., histogram, hist_weights, heads, floor):
        logits = window_gemm(...) (+ log(max(histogram @ hist_weights[s // heads], floor)))
        probs = softmax(logits, -1);  best = argmax(probs, -1)     (the first of equal maxima)

x ``(S, R_in, K)`` (any strides), weights ``(taps, K, NOUT)``. Half-precision x dots with the weights
in its dtype (fp32 accumulation), as the unfused path's half GEMMs and convs did; the softmax form takes
fp32 weights on TF32 tensor cores (the logits rank cells: bf16-rounded coefficients flip near-ties),
and fp32 x takes exact fp32 products.
"""

from __future__ import annotations

import os

import torch

from ..validation import int_arg
from .dispatch import HAS_TRITON, interpreting, kernels_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _INTERPRET, _cast_out, _dot, _dot_split, _exp2_ftz, _log2_ftz, _rcp_ftz
    from ._launch import OutOfResources
else:  # pragma: no cover - the module still imports, the fast_ ops return None
    triton = None

    class OutOfResources(Exception):  # noqa: N818  (Triton's name)
        pass

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TAPS = 3
MAX_SOFTMAX_COLUMNS = 256
MAX_HISTOGRAM = 128
MAX_SAMPLES = 65535     # the grid's third dimension
# the softmax form's dots on half operands (its weights rounded to x's dtype) instead of TF32: a tuning switch
HALF_SOFTMAX_DOTS = os.environ.get("APPROXATTN_ROW_GEMM_HALF_SOFTMAX", "0") == "1"
# tuning runs set this: {"gemm" | "softmax" | "gemm:step2" (the strided GEMM alone) | ...: {BM, BN, BK, num_warps,
# num_stages}}; a "kind:stepS" entry wins over the kind's
OVERRIDE: dict[str, dict[str, int]] = {}


def _check(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows) -> tuple[int, int]:
    """Validates the arguments; returns (virtual_rows, out_rows) with their defaults filled in."""
    for name, t in (("x", x), ("weights", weights), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if x.dim() != 3 or min(x.shape[1:]) < 1:
        raise ValueError(f"x: expected a non-empty (S, R_in, K) tensor, got shape {tuple(x.shape)}")
    if weights.dim() != 3 or not 1 <= weights.shape[0] <= MAX_TAPS or weights.shape[1] != x.shape[2]:
        raise ValueError(f"weights: expected shape (taps ≤ {MAX_TAPS}, {x.shape[2]} (x's K), NOUT), got "
                         f"{tuple(weights.shape)}")
    nout = weights.shape[2]
    if tuple(bias.shape) != (nout,):
        raise ValueError(f"bias: expected shape ({nout},) (weights' NOUT), got {tuple(bias.shape)}")
    if tap_bias is not None and (not isinstance(tap_bias, torch.Tensor)
                                 or tuple(tap_bias.shape) != (weights.shape[0], nout)):
        raise ValueError(f"tap_bias: expected a ({weights.shape[0]}, {nout}) tensor or None, got "
                         f"{tuple(tap_bias.shape) if isinstance(tap_bias, torch.Tensor) else type(tap_bias).__name__}")
    for name, t in (("weights", weights), ("bias", bias), ("tap_bias", tap_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (x's device), got {t.device}")
    int_arg("step", step, 1)
    int_arg("pad", pad, 0)
    int_arg("up", up, 1)
    virtual_rows = x.shape[1] * up if virtual_rows is None else int_arg("virtual_rows", virtual_rows, 1)
    if virtual_rows > x.shape[1] * up:
        raise ValueError(f"virtual_rows: expected at most {x.shape[1] * up} (x's {x.shape[1]} rows × up={up}), "
                         f"got {virtual_rows}")
    natural = (virtual_rows + 2 * pad - weights.shape[0]) // step + 1
    if out_rows is None and natural < 1:
        raise ValueError(f"x: {virtual_rows} virtual rows padded by {pad} on each side are fewer than the "
                         f"{weights.shape[0]} taps (give out_rows to read zero rows past the end)")
    return virtual_rows, natural if out_rows is None else int_arg("out_rows", out_rows, 1)


def check_histogram(samples: int, rows: int, columns: int, histogram, hist_weights, heads, floor,
                    device: torch.device | None = None) -> None:
    """The log-histogram residual's arguments (shared with ``sea_decoder_head``): heads divides the
    samples; histogram ``(samples, rows, d)`` and hist_weights ``(samples // heads, d, columns)``, both or
    neither; floor > 0."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or samples % heads:
        raise ValueError(f"heads: expected a positive int dividing the {samples} samples, got {heads!r}")
    if (histogram is None) != (hist_weights is None):
        raise ValueError("histogram, hist_weights: expected both or neither")
    if histogram is None:
        return
    if not isinstance(histogram, torch.Tensor) or histogram.dim() != 3 or tuple(histogram.shape[:2]) != (samples, rows):
        raise ValueError(f"histogram: expected a ({samples}, {rows}, d) tensor, got "
                         f"{tuple(histogram.shape) if isinstance(histogram, torch.Tensor) else type(histogram).__name__}")
    d = histogram.shape[2]
    if device is not None and histogram.device != device:
        raise ValueError(f"histogram: expected a tensor on {device} (x's device), got {histogram.device}")
    if not isinstance(hist_weights, torch.Tensor) or tuple(hist_weights.shape) != (samples // heads, d, columns):
        raise ValueError(f"hist_weights: expected shape ({samples // heads}, {d}, {columns}) (batch, d, T), got "
                         f"{tuple(hist_weights.shape) if isinstance(hist_weights, torch.Tensor) else hist_weights}")
    if device is not None and hist_weights.device != device:
        raise ValueError(f"hist_weights: expected a tensor on {device} (x's device), got {hist_weights.device}")
    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and floor > 0):
        raise ValueError(f"floor: expected a number > 0, got {floor!r}")


# ---------------------------------------------------------------- references


def _reference_sum(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows, compute):
    r = torch.arange(out_rows, device=x.device)
    out = bias.to(compute).expand(x.shape[0], out_rows, -1).clone()
    for t in range(weights.shape[0]):
        v = r * step + t - pad
        valid = (v >= 0) & (v < virtual_rows)
        rows = torch.where(valid[None, :, None], x.to(compute)[:, v.clamp(0, virtual_rows - 1) // up], 0.0)
        term = rows @ weights[t].to(compute)
        if tap_bias is not None:
            term = term + valid[None, :, None] * tap_bias[t].to(compute)
        out = out + term
    return out


def window_gemm_reference(x, weights, bias, *, step=1, pad=1, up=1, virtual_rows=None, out_rows=None,
                          tap_bias=None, relu=False) -> torch.Tensor:
    """The PyTorch twin of :func:`window_gemm`, in fp32 (fp64 for fp64 x), returned in x's dtype."""
    virtual_rows, out_rows = _check(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = _reference_sum(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows, compute)
    return (out.clamp_min(0) if relu else out).to(x.dtype)


def window_gemm_softmax_reference(x, weights, bias, *, step=1, pad=1, up=1, virtual_rows=None, out_rows=None,
                                  tap_bias=None, histogram=None, hist_weights=None, heads=1, floor=1e-6):
    """The PyTorch twin of :func:`window_gemm_softmax`: ``(logits in x's dtype, probs fp32 (fp64 for
    fp64 x), best int64)``."""
    virtual_rows, out_rows = _check(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows)
    check_histogram(x.shape[0], out_rows, weights.shape[2], histogram, hist_weights, heads, floor, x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = _reference_sum(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows, compute)
    return residual_softmax_reference(logits, histogram, hist_weights, heads, floor, x.dtype)


def residual_softmax_reference(logits, histogram, hist_weights, heads, floor, out_dtype):
    """The fused heads' epilogue in PyTorch (shared with ``sea_decoder_head``): ``logits (S, R, T)`` in their
    compute dtype, plus ``log(max(histogram @ hist_weights[s // heads], floor))`` when a histogram is given;
    returns (logits in ``out_dtype``, their softmax, each row's argmax)."""
    if histogram is not None:
        counts = histogram.to(logits.dtype) @ hist_weights.to(logits.dtype).repeat_interleave(heads, dim=0)
        logits = logits + torch.log(torch.clamp_min(counts, floor))
    probs = torch.softmax(logits, dim=-1)
    return logits.to(out_dtype), probs, probs.argmax(dim=-1)


# ---------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _log_histogram(h_ptr, hw_ptr, s, offs_r, r_ok, offs_n, n_ok, stride_hs, stride_hn, stride_hd, D, NOUT, HEADS,
                       floor, BD: tl.constexpr, DOTS: tl.constexpr, HALF: tl.constexpr):
        """The fused heads' log-histogram residual, ``log(max(hist @ hw, floor))`` ``(BM, BN)`` fp32: rows offs_r of
        sample s's histogram ``(d)`` against its batch element's (s // HEADS) resampling weights ``(d, NOUT)``.
        DOTS 0: the histogram in HALF (a half dtype) against hi + lo halves of the weights; 1: TF32; 2: exact fp32
        products (and every fp32 dot under the interpreter)."""
        offs_d = tl.arange(0, BD)
        d_ok = offs_d < D
        hist = tl.load(h_ptr + s * stride_hs + offs_r[:, None].to(tl.int64) * stride_hn + offs_d[None, :] * stride_hd,
                       mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        hw = tl.load(hw_ptr + (s // HEADS) * D * NOUT + offs_d[:, None] * NOUT + offs_n[None, :],
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if DOTS == 0:
            mass = _dot_split(hist.to(HALF), hw, True, False)
        else:
            mass = _window_dot(hist, hw, DOTS)
        return _log2_ftz(tl.maximum(mass, floor)) * 0.6931471805599453

    @triton.jit
    def _softmax(logits, n_ok):
        """The softmax of fp32 ``logits (BM, BN)`` over the valid columns: exp2 with denormals flushed and one
        reciprocal a row (tl.exp and a division add range checks to every element)."""
        z = tl.where(n_ok[None, :], logits, float("-inf"))
        z = _exp2_ftz((z - tl.max(z, 1)[:, None]) * 1.4426950408889634)
        return z * _rcp_ftz(tl.sum(z, 1))[:, None]

    @triton.jit
    def _row_argmax(probs, n_ok):
        """Each row's most probable valid column, the first of equal maxima (as torch.argmax)."""
        return tl.argmax(tl.where(n_ok[None, :], probs, -1.0), axis=1, tie_break_left=True)

    @triton.jit
    def _window_dot(a, b, MODE: tl.constexpr):
        """``a @ b`` with fp32 accumulation. MODE 0: half operands (b in a's dtype); 1: fp32 operands on
        TF32 tensor cores; 2: exact fp32 products (fp32 x, and every fp32 dot under the interpreter)."""
        if MODE == 0:
            return _dot(a, b, True)
        elif MODE == 1 and not _INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _window_gemm_fwd(
        x_ptr, w_ptr, c_ptr, b_ptr, o_ptr, h_ptr, hw_ptr, prob_ptr, best_ptr,
        stride_xs, stride_xr, stride_xk, stride_hs, stride_hn, stride_hd,
        R_out, V, K, NOUT, D, HEADS, floor,
        TAPS: tl.constexpr, STEP: tl.constexpr, UP: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr,
        TAP_BIAS: tl.constexpr, RELU: tl.constexpr, SOFTMAX: tl.constexpr, HAS_HISTOGRAM: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    ):
        """Grid (row block, column block, sample): BM output rows × BN output columns. SOFTMAX: one
        column block holds the whole row (BN ≥ NOUT)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        s = tl.program_id(2).to(tl.int64)
        offs_r = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        r_ok = offs_r < R_out
        n_ok = offs_n < NOUT
        x_s = x_ptr + s * stride_xs
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for t in tl.static_range(TAPS):
            v = offs_r * STEP + (t - PAD)
            v_ok = r_ok & (v >= 0) & (v < V)
            row_ptr = x_s + (tl.maximum(v, 0) // UP).to(tl.int64) * stride_xr
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_ok = offs_k < K
                xt = tl.load(row_ptr[:, None] + offs_k[None, :] * stride_xk, mask=v_ok[:, None] & k_ok[None, :],
                             other=0.0)
                wt = tl.load(w_ptr + (t * K + offs_k[:, None]).to(tl.int64) * NOUT + offs_n[None, :],
                             mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc += _window_dot(xt, wt, MODE)
            if TAP_BIAS:
                ct = tl.load(c_ptr + t * NOUT + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                acc += tl.where(v_ok[:, None], ct[None, :], 0.0)
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = (s * R_out + offs_r[:, None].to(tl.int64)) * NOUT + offs_n[None, :]
        keep = r_ok[:, None] & n_ok[None, :]
        if not SOFTMAX:
            if RELU:
                acc = tl.maximum(acc, 0.0)
            tl.store(o_ptr + out, _cast_out(acc, o_ptr.dtype.element_ty), mask=keep)
        else:
            if HAS_HISTOGRAM:
                acc += _log_histogram(h_ptr, hw_ptr, s, offs_r, r_ok, offs_n, n_ok, stride_hs, stride_hn, stride_hd,
                                      D, NOUT, HEADS, floor, BD, 2 if MODE == 2 else 1, tl.float32)
            stored = _cast_out(acc, o_ptr.dtype.element_ty)
            probs = _softmax(acc, n_ok)
            tl.store(o_ptr + out, stored, mask=keep)
            tl.store(prob_ptr + out, probs, mask=keep)
            tl.store(best_ptr + s * R_out + offs_r, _row_argmax(probs, n_ok).to(tl.int64), mask=r_ok)


def _override(kind: str, step: int) -> dict[str, int] | None:
    """A tuning run's entry for this GEMM: ``kind:stepS`` over ``kind``, or None."""
    return OVERRIDE.get(f"{kind}:step{step}", OVERRIDE.get(kind))


def launch_config(kind: str, nout: int, k: int, *, step: int = 1, half: bool = False) -> dict[str, int]:
    """Block sizes. ``gemm``: 64 rows × up to 128 columns, K in blocks of 64, 4 warps, 2 stages; with half
    operands 128 rows and 3 stages (run 19's H100 sweep of SEA's decoder at N = 65,536, T = 128,
    ``benchmarks/row_gemm_tune.py``: strided 0.456 → 0.416 ms against run 13's 128 × 256 at 8 warps and 2
    stages, middle 0.517 → 0.511). ``softmax``: the whole row (BN ≥ NOUT), 32 rows past 128 columns. 16-row
    blocks under the interpreter."""
    BN = max(16, triton.next_power_of_2(nout))
    BK = min(64, max(16, triton.next_power_of_2(k)))
    if kind == "gemm":
        BN = min(BN, 128)
    if interpreting():
        return {"BM": 16, "BN": BN, "BK": BK}
    stages = 2
    if kind == "gemm" and half:
        BM, warps, stages = 128, 4, 3
    else:
        BM, warps = (64 if kind == "gemm" or BN <= 128 else 32), (4 if kind == "gemm" else 8)
    cfg = {"BM": BM, "BN": BN, "BK": BK, "num_warps": warps, "num_stages": stages, **(_override(kind, step) or {})}
    if kind == "softmax" and cfg["BN"] < nout:
        raise ValueError(f"OVERRIDE['softmax']: BN must hold the whole row ({nout} columns), got {cfg['BN']}")
    return cfg


def _limit(x, weights, histogram=None, softmax=False) -> Exception | None:
    """Why the kernel does not cover these (valid) inputs, or None."""
    if x.dtype not in KERNEL_DTYPES:
        return TypeError(f"x: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if softmax and weights.shape[2] > MAX_SOFTMAX_COLUMNS:
        return ValueError(f"weights: expected at most {MAX_SOFTMAX_COLUMNS} columns for the softmax, got "
                          f"{weights.shape[2]}")
    if x.shape[0] > MAX_SAMPLES:
        return ValueError(f"x: expected at most {MAX_SAMPLES} samples, got {x.shape[0]}")
    if histogram is not None and histogram.shape[2] > MAX_HISTOGRAM:
        return ValueError(f"histogram: expected at most {MAX_HISTOGRAM} bins, got {histogram.shape[2]}")
    return None


def _launch(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows, *, relu=False, softmax=False,
            histogram=None, hist_weights=None, heads=1, floor=1e-6):
    if not HAS_TRITON:
        raise RuntimeError("row_window_gemm needs triton (pip install triton); use the _reference twins")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"x: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")
    S, _, K = x.shape
    taps, _, nout = weights.shape
    out = torch.empty(S, out_rows, nout, dtype=x.dtype, device=x.device)
    probs = best = None
    if softmax:
        probs = torch.empty(S, out_rows, nout, dtype=torch.float32, device=x.device)
        best = torch.empty(S, out_rows, dtype=torch.int64, device=x.device)
    if S == 0:
        return (out, probs, best) if softmax else out
    half = x.dtype in (torch.float16, torch.bfloat16)
    mode = 2 if not half else (1 if softmax and not HALF_SOFTMAX_DOTS else 0)
    weights = weights.to(x.dtype if mode == 0 else torch.float32).contiguous()
    bias = bias.to(torch.float32).contiguous()
    c = tap_bias.to(torch.float32).contiguous() if tap_bias is not None else bias   # never read without TAP_BIAS
    if histogram is not None:
        hw = hist_weights.to(torch.float32).contiguous()
        h, D, hstrides = histogram, histogram.shape[2], histogram.stride()
    else:
        h, hw, D, hstrides = x, x, 1, (0, 0, 0)   # never read
    kind = "softmax" if softmax else "gemm"
    cfg = launch_config(kind, nout, K, step=step, half=half)
    BD = max(16, triton.next_power_of_2(D))

    def launch(cfg):
        grid = (triton.cdiv(out_rows, cfg["BM"]), triton.cdiv(nout, cfg["BN"]), S)
        _window_gemm_fwd[grid](
            x, weights, c, bias, out, h, hw, probs if softmax else out, best if softmax else out,
            *x.stride(), *hstrides, out_rows, virtual_rows, K, nout, D, heads, float(floor),
            TAPS=taps, STEP=step, UP=up, PAD=pad, MODE=mode, TAP_BIAS=tap_bias is not None, RELU=bool(relu),
            SOFTMAX=softmax, HAS_HISTOGRAM=histogram is not None, BD=BD, **cfg,
        )

    try:
        launch(cfg)
    except OutOfResources:
        # the half-operand GEMM config was tuned where a block may take 227 KiB of shared memory (H100);
        # a part with less (99 KiB on sm_86/89) gets the narrower one. A tuning override fails as it is.
        narrower = launch_config(kind, nout, K, step=step, half=False)
        if narrower == cfg or _override(kind, step) is not None:
            raise
        launch(narrower)
    return (out, probs, best) if softmax else out


def window_gemm(x, weights, bias, *, step=1, pad=1, up=1, virtual_rows=None, out_rows=None, tap_bias=None,
                relu=False) -> torch.Tensor:
    """The Triton kernel's row-window GEMM (see the module docstring), inference only.

    x ``(S, R_in, K)`` any strides; weights ``(taps ≤ 3, K, NOUT)``; bias ``(NOUT,)``; tap_bias
    ``(taps, NOUT)`` or None (added for each tap whose virtual row is valid: a bias applied before the
    convolution); ``virtual_rows`` (default ``R_in·up``): the rows of the virtual input (x's rows
    repeated ``up`` times, cropped); ``out_rows`` (default the convolution's natural count). Returns
    ``(S, out_rows, NOUT)`` in x's dtype, contiguous. Raises ValueError/TypeError on bad or
    unsupported inputs, RuntimeError where Triton cannot run."""
    virtual_rows, out_rows = _check(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows)
    error = _limit(x, weights)
    if error is not None:
        raise error
    return _launch(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows, relu=relu)


def window_gemm_softmax(x, weights, bias, *, step=1, pad=1, up=1, virtual_rows=None, out_rows=None, tap_bias=None,
                        histogram=None, hist_weights=None, heads=1, floor=1e-6):
    """:func:`window_gemm` as logits (NOUT ≤ 256 columns), plus the log-histogram residual
    (histogram ``(S, out_rows, d)`` any strides, d ≤ 128, with hist_weights ``(S // heads, d, NOUT)``,
    or neither), then the softmax over the columns and each row's argmax. Returns ``(logits in x's
    dtype, probs fp32, best int64 (S, out_rows))``, contiguous."""
    virtual_rows, out_rows = _check(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows)
    check_histogram(x.shape[0], out_rows, weights.shape[2], histogram, hist_weights, heads, floor, x.device)
    error = _limit(x, weights, histogram, softmax=True)
    if error is not None:
        raise error
    return _launch(x, weights, bias, tap_bias, step, pad, up, virtual_rows, out_rows, softmax=True,
                   histogram=histogram, hist_weights=hist_weights, heads=heads, floor=floor)


def applies(*tensors) -> bool:
    """Whether the kernels would run here: Triton present and enabled for the first tensor's device
    (CUDA, or the interpreter when forced), half or fp32 dtype, and no gradient wanted."""
    x = tensors[0]
    if not kernels_enabled(x) or x.dtype not in KERNEL_DTYPES:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


__all__ = ["applies", "residual_softmax_reference", "window_gemm", "window_gemm_reference", "window_gemm_softmax",
           "window_gemm_softmax_reference"]
