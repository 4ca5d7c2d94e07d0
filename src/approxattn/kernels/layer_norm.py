"""Triton forward kernel for LayerNorm over a narrow last axis, GELU optionally fused, as in SEA's estimator.

SEA normalises maps such as ``(16, 65536, 128)`` (the encoder, then GELU) and ``(32, 65536, 32)``
(the causal decoder's input norm). torch's LayerNorm kernel gives each row a thread block, which
leaves most of it idle on rows of 32–128 values: on an H100 at N = 65,536 the causal decoder's
three LayerNorms took 6.6 ms against a memory floor of ~0.5 ms (benchmarks/results/h100/run7).
Here each program normalises ``BR`` whole rows (``BR · BW`` ≈ 4K values) in fp32 registers: the
input is read once and the output written once. Inference only (no backward).

One op, :func:`layer_norm`, with its PyTorch twin :func:`layer_norm_reference`::

    y = F.layer_norm(x, (W,), weight, bias, eps);  y = F.gelu(y) if gelu else y

:func:`fast_layer_norm` is the dispatching form: None where the kernel does not apply.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, kernels_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _cast_out
else:  # pragma: no cover - the module still imports, fast_layer_norm returns None
    triton = None

MAX_WIDTH = 1024
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
VALUES_PER_PROGRAM = 4096     # BR · BW: 32 fp32 registers a thread at 4 warps


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                         *, gelu: bool = False) -> torch.Tensor:
    """``F.layer_norm`` over the last axis (then exact GELU if asked), in x's dtype."""
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return F.gelu(y) if gelu else y


def _check(x, weight, bias, eps) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor with a non-empty last axis, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"{name}: expected shape ({x.shape[-1]},) (x's last axis) or None, got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a number > 0, got {eps!r}")


if HAS_TRITON:

    @triton.jit
    def _layer_norm_fwd(
        x_ptr, w_ptr, b_ptr, y_ptr, R, W, stride_xr, stride_yr, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
        BR: tl.constexpr, BW: tl.constexpr,
    ):
        """Grid (row block): rows ``[pid·BR, (pid+1)·BR)`` of the ``(R, W)`` view, in fp32."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.arange(0, BW)
        cmask = cols < W
        mask = (rows < R)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xr + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / W
        centred = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / W
        y = centred * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GELU:   # the exact (erf) form, as F.gelu's default
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :], _cast_out(y, y_ptr.dtype.element_ty),
                 mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
               gelu: bool = False) -> torch.Tensor:
    """LayerNorm of x ``(..., W)`` over its last axis (W ≤ 1024), then GELU if asked, by the Triton
    kernel; the output has x's shape and dtype. weight, bias ``(W,)`` or None."""
    _check(x, weight, bias, eps)
    if not HAS_TRITON:
        raise RuntimeError("layer_norm: Triton is not installed (use fast_layer_norm or layer_norm_reference)")
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"x: expected a last axis of at most {MAX_WIDTH}, got {x.shape[-1]}")
    return _launch(x, weight, bias, eps, gelu)


def _launch(x, weight, bias, eps, gelu) -> torch.Tensor:
    W = x.shape[-1]
    rows = x.reshape(-1, W)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    BW = max(16, triton.next_power_of_2(W))
    BR = 16 if os.environ.get("TRITON_INTERPRET") == "1" else max(1, VALUES_PER_PROGRAM // BW)
    R = rows.shape[0]
    if R:
        _layer_norm_fwd[(triton.cdiv(R, BR),)](
            rows, weight if weight is not None else rows, bias if bias is not None else rows, out,
            R, W, rows.stride(0), out.stride(0), float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, GELU=gelu, BR=BR, BW=BW, num_warps=4,
        )
    return out.view(x.shape)


def fast_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                    gelu: bool = False) -> torch.Tensor | None:
    """:func:`layer_norm`'s output, or None where the kernel does not apply (then the caller runs
    :func:`layer_norm_reference`): Triton missing, ``APPROXATTN_DISABLE_KERNELS=1``, x not on CUDA
    (unless ``TRITON_INTERPRET=1`` and ``APPROXATTN_FORCE_KERNELS=1``), a gradient required, a
    last axis over 1024, or a dtype other than fp16/bf16/fp32 (weight and bias included). Bad inputs raise."""
    _check(x, weight, bias, eps)
    if not kernels_enabled(x) or x.shape[-1] > MAX_WIDTH:
        return None
    params = [t for t in (weight, bias) if t is not None]
    if any(t.dtype not in KERNEL_DTYPES for t in (x, *params)) or any(t.device != x.device for t in params):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
        return None
    return _launch(x, weight, bias, eps, gelu)
