"""Triton forward kernel for SEA's encoder and gates in one pass over the rows (inference, half maps).

SEA's encoder is ``e = GELU(LayerNorm(W_c c + W_v v_i + b))`` over the estimator's context
``c (B, H, N, 2d)`` and each query's own value ``v_i (B, Hkv, N, d)``, and its gates are
``σ(W_g e + b_g)`` ``(B, H, N, 2)``. Unfused that is a GEMM writing the hidden map, a second GEMM
for the value term, a LayerNorm kernel, and a GEMM over e for the gates: at N = 65,536 on an H100
0.50 + 0.18 + 0.25 + 0.27 ms, four passes over ``(16, 65536, 128)`` maps. Here each program takes
``BR`` rows of one head: two ``tl.dot`` s (bf16/fp16 operands, fp32 accumulation), the bias, the
LayerNorm and exact GELU in fp32 registers, e stored once in the maps' dtype, and the gates from
the stored (rounded) e as two row sums, in fp32.

One op, :func:`encoder_and_gates`, with its PyTorch twin :func:`encoder_and_gates_reference`::

    hidden = c @ W_c.T + v_i @ W_v.T + b                  # fp32 (v_i: the query head's value head)
    e = GELU(LayerNorm(hidden)).to(c.dtype)
    gates = sigmoid(e.float() @ W_g.T + b_g)              # fp32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, interpreting, kernels_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _cast_out, _exp2_ftz, _rcp_ftz
    from .sparse_attention import _mma

MAX_WIDTH = 256       # 2d, the context's and e's width
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
OVERRIDE: dict[str, int] = {}   # tuning runs set this (BR, num_warps, num_stages)


def _check(context, own_value, weight, bias, norm_weight, norm_bias, eps, gate_weight, gate_bias) -> None:
    for name, t in (("context", context), ("weight", weight), ("bias", bias), ("norm_weight", norm_weight),
                    ("norm_bias", norm_bias), ("gate_weight", gate_weight), ("gate_bias", gate_bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if context.dim() != 4:
        raise ValueError(f"context: expected (B, H, N, width), got shape {tuple(context.shape)}")
    B, H, N, width = context.shape
    value_width = 0
    if own_value is not None:
        if not isinstance(own_value, torch.Tensor) or own_value.dtype != context.dtype:
            raise TypeError(f"own_value: expected None or a tensor of context's dtype ({context.dtype}), got "
                            f"{own_value.dtype if isinstance(own_value, torch.Tensor) else type(own_value).__name__}")
        if (own_value.dim() != 4 or own_value.shape[0] != B or own_value.shape[2] != N or own_value.shape[1] < 1
                or H % own_value.shape[1]):
            raise ValueError(f"own_value: expected (B={B}, Hkv dividing {H}, N={N}, d), got {tuple(own_value.shape)}")
        value_width = own_value.shape[3]
    # without an own value only the context's columns are read (SEA's cross-attention)
    fits = weight.shape[1] == width + value_width if own_value is not None else weight.shape[1] >= width
    if weight.dim() != 2 or weight.shape[0] != width or not fits:
        raise ValueError(f"weight: expected ({width}, {width + value_width}{'' if own_value is not None else ' or more'})"
                         f" (context columns first), got {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (width,):
            raise ValueError(f"{name}: expected shape ({width},), got {tuple(t.shape)}")
    if tuple(gate_weight.shape) != (2, width) or tuple(gate_bias.shape) != (2,):
        raise ValueError(f"gate_weight, gate_bias: expected (2, {width}) and (2,), got {tuple(gate_weight.shape)} "
                         f"and {tuple(gate_bias.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a number > 0, got {eps!r}")


def encoder_and_gates_reference(context, own_value, weight, bias, norm_weight, norm_bias, eps, gate_weight,
                                gate_bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch twin of :func:`encoder_and_gates`: ``(e (B, H, N, width) in context's dtype, gates
    (B, H, N, 2) fp32)``. weight ``(width, width + d)`` (``[W_c, W_v]``; only ``W_c`` when own_value is
    None), the rest as ``nn.Linear``/``nn.LayerNorm`` hold them."""
    _check(context, own_value, weight, bias, norm_weight, norm_bias, eps, gate_weight, gate_bias)
    B, H, N, width = context.shape
    weight = weight.to(context.dtype).float()
    hidden = context.float() @ weight[:, :width].T + bias.to(context.dtype).float()
    if own_value is not None:
        value = own_value.float() @ weight[:, width:].T                         # (B, Hkv, N, width)
        groups = H // own_value.shape[1]
        hidden = (hidden.view(B, -1, groups, N, width) + value[:, :, None]).view(B, H, N, width)
    e = F.gelu(F.layer_norm(hidden, (width,), norm_weight.to(context.dtype).float(),
                            norm_bias.to(context.dtype).float(), eps)).to(context.dtype)
    gates = torch.sigmoid(e.float() @ gate_weight.to(context.dtype).float().T + gate_bias.to(context.dtype).float())
    return e, gates


if HAS_TRITON:

    @triton.jit
    def _erf(x):
        """erf(x) to 1.5e-7 (Abramowitz & Stegun 7.1.26): a reciprocal and an exp2 an element on the special-function
        unit, against libdevice's two-branch erff (its polynomials for both branches and selects)."""
        a = tl.abs(x)
        t = _rcp_ftz(1.0 + 0.3275911 * a)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        r = 1.0 - poly * _exp2_ftz(-1.4426950408889634 * a * a)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _encoder_gates_fwd(
        c_ptr, v_ptr, wc_ptr, wv_ptr, b_ptr, nw_ptr, nb_ptr, gw_ptr, gb_ptr, e_ptr, g_ptr,
        stride_cb, stride_ch, stride_cn, stride_cw,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_wc, stride_ww,
        H, G, N, W, D, eps,
        BR: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, HAS_VALUE: tl.constexpr,
    ):
        """Grid (row block, batch·head): BR rows of one head; e and gates contiguous."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid * BR + tl.arange(0, BR)
        cols = tl.arange(0, BW)
        row_ok = rows < N
        col_ok = cols < W
        c = tl.load(c_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
                    + rows[:, None].to(tl.int64) * stride_cn + cols[None, :] * stride_cw,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # W_cᵀ as (input, output): element (i, o) = weight[o, i]
        wc = tl.load(wc_ptr + cols[None, :] * stride_wc + cols[:, None] * stride_ww,
                     mask=col_ok[:, None] & col_ok[None, :], other=0.0)
        hidden = _mma(c, wc, "tf32")
        if HAS_VALUE:
            offs_d = tl.arange(0, BD)
            d_ok = offs_d < D
            v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + (h // G).to(tl.int64) * stride_vh
                        + rows[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wv = tl.load(wv_ptr + cols[None, :] * stride_wc + offs_d[:, None] * stride_ww,
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            hidden += _mma(v, wv, "tf32")
        hidden += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # LayerNorm over the W valid columns, then exact GELU, in fp32
        hidden = tl.where(col_ok[None, :], hidden, 0.0)
        mean = tl.sum(hidden, 1) / W
        centred = tl.where(col_ok[None, :], hidden - mean[:, None], 0.0)
        var = tl.sum(centred * centred, 1) / W
        y = centred * (1.0 / tl.sqrt(var + eps))[:, None]
        y = y * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] \
            + tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = 0.5 * y * (1.0 + _erf(y * 0.7071067811865476))
        e = _cast_out(y, e_ptr.dtype.element_ty)
        out = (bh.to(tl.int64) * N + rows[:, None].to(tl.int64)) * W + cols[None, :]
        tl.store(e_ptr + out, e, mask=row_ok[:, None] & col_ok[None, :])
        # gates from the stored e (as the unfused path's GEMM reads it), fp32 sums
        e32 = tl.where(col_ok[None, :], e.to(tl.float32), 0.0)
        gate_rows = (bh.to(tl.int64) * N + rows.to(tl.int64)) * 2
        for j in tl.static_range(2):
            wg = tl.load(gw_ptr + j * W + cols, mask=col_ok, other=0.0).to(tl.float32)
            g = tl.sum(e32 * wg[None, :], 1) + tl.load(gb_ptr + j).to(tl.float32)
            tl.store(g_ptr + gate_rows + j, 1.0 / (1.0 + tl.exp(-g)), mask=row_ok)


def launch_config(width: int, dim: int) -> dict[str, int]:
    blocks = {"BW": max(16, triton.next_power_of_2(width)), "BD": max(16, triton.next_power_of_2(dim))}
    if interpreting():
        return {**blocks, "BR": 16}
    return {**blocks, "BR": 64, "num_warps": 4, **OVERRIDE}


def _launch(context, own_value, weight, bias, norm_weight, norm_bias, eps, gate_weight, gate_bias):
    B, H, N, width = context.shape
    dtype = context.dtype
    e = torch.empty(B, H, N, width, dtype=dtype, device=context.device)
    gates = torch.empty(B, H, N, 2, dtype=torch.float32, device=context.device)
    if B * H * N == 0:
        return e, gates
    weight = weight.to(dtype)
    small = [t.to(dtype).contiguous() for t in (bias, norm_weight, norm_bias, gate_weight, gate_bias)]
    has_value = own_value is not None
    value = own_value if has_value else context
    D = own_value.shape[3] if has_value else 1
    cfg = launch_config(width, D)
    _encoder_gates_fwd[(triton.cdiv(N, cfg["BR"]), B * H)](
        context, value, weight, weight[:, width:] if has_value else weight, *small[:3], *small[3:], e, gates,
        *context.stride(), *value.stride(), weight.stride(0), weight.stride(1),
        H, H // value.shape[1], N, width, D, float(eps),
        HAS_VALUE=has_value, **cfg,
    )
    return e, gates


def fast_encoder_and_gates(context, own_value, weight, bias, norm_weight, norm_bias, eps, gate_weight, gate_bias):
    """``(e, gates)`` as :func:`encoder_and_gates_reference` from one Triton kernel, or None where it does not
    apply: Triton missing or kernels disabled, not CUDA (unless forced under the interpreter), maps not
    fp16/bf16, wider than 256, or a gradient required. Bad inputs raise."""
    _check(context, own_value, weight, bias, norm_weight, norm_bias, eps, gate_weight, gate_bias)
    if not kernels_enabled(context) or context.dtype not in KERNEL_DTYPES or context.shape[3] > MAX_WIDTH:
        return None
    if own_value is not None and own_value.shape[3] > MAX_WIDTH:
        return None
    tensors = (context, own_value, weight, bias, norm_weight, norm_bias, gate_weight, gate_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    return _launch(context, own_value, weight, bias, norm_weight, norm_bias, eps, gate_weight, gate_bias)


__all__ = ["encoder_and_gates_reference", "fast_encoder_and_gates"]
