"""Triton helpers shared by the kernel-attention ops: feature maps computed in registers.

Feature codes (constexpr ``FEATURE``): ``ELU`` φ(x) = elu(x) + 1 (m = d, no projection);
``FAVOR`` the positive softmax features ``ratio·(exp(ωᵀx − ‖x‖²/2 − c) + ε)``; ``RELU``
``relu(ωᵀx) + ε``. ``x`` is the raw q or k row; the temperature split ``xs = scale ** 0.5``
is applied to the logits, not to x, so the inputs are read once and never rescaled in memory.

Each helper returns the features φ (fp32, zero beyond the m real features) and the factor
``∂φ/∂p`` that the backward multiplies by, where p is the pre-activation (the projected
logit). Dots take their operands in bf16 for half-precision inputs (``LP``) and in fp32
with IEEE products otherwise; accumulation is always fp32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ELU = 0
FAVOR = 1
RELU = 2
FEATURE_CODES = {"elu": ELU, "favor": FAVOR, "relu": RELU}

# The CPU interpreter (triton 3.9) mis-multiplies bf16 operands and casts fp32 → bf16 by
# truncation: there, bf16 operands are emulated by rounding to nearest even with integer
# arithmetic and multiplying exactly in fp32, which is the GPU's arithmetic.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _exp2_ftz(x):
    """2^x of fp32 x on the special-function unit with denormals flushed to zero (``ex2.approx.ftz``): tl.exp2
    adds a range check and two multiplies an element to keep denormal results."""
    if _INTERPRET:
        return tl.exp2(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _log2_ftz(x):
    """log2 of fp32 x > 0 (``lg2.approx.ftz``; denormal inputs read as zero)."""
    if _INTERPRET:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _rcp_ftz(x):
    """1 / x of fp32 x (``rcp.approx.ftz``, ~1 ulp): a division adds range checks an element."""
    if _INTERPRET:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _round_bf16(x):
    """fp32 → nearest-even bf16 value, kept in fp32 (interpreter only)."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast_out(x, dtype: tl.constexpr):
    """The value stored into a tensor of ``dtype`` (rounded to nearest even)."""
    if _INTERPRET and dtype == tl.bfloat16:
        return _round_bf16(x).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _dot(a, b, LP: tl.constexpr):
    """``a @ b`` with fp32 accumulation: half operands (LP; fp32 ones rounded to bf16, two of
    one half dtype kept as they are) or exact fp32 products."""
    if LP and _INTERPRET:
        if a.dtype == tl.float32:
            a = _round_bf16(a)
        if b.dtype == tl.float32:
            b = _round_bf16(b)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif LP:
        if a.dtype == b.dtype and a.dtype != tl.float32:
            return tl.dot(a, b)
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _dot_split(a, b, LP: tl.constexpr, WIDE: tl.constexpr):
    """``a @ b`` where a holds values exact in its own half dtype (an input row, an upstream
    gradient) and b is fp32: b is split into hi + lo halves, so the product is nearly
    fp32-exact for two half-precision dots. ``WIDE``: b may overflow fp16 (a state), then
    fp16 rows fall back to bf16 operands."""
    if LP and _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif LP:
        if WIDE and a.dtype == tl.float16:
            hi = b.to(tl.bfloat16)
            lo = (b.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16)
            ab = a.to(tl.bfloat16)
            return tl.dot(ab, hi) + tl.dot(ab, lo)
        else:
            hi = b.to(a.dtype)
            lo = (b.to(tl.float32) - hi.to(tl.float32)).to(a.dtype)
            return tl.dot(a, hi) + tl.dot(a, lo)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _dot_split_left(a, b):
    """``a @ b`` for an fp32 a and half-precision rows b (exact in their dtype): a is split into hi + lo
    halves of b's dtype, so the product is nearly fp32-exact for two half-precision dots."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        return tl.dot(hi, b) + tl.dot(lo, b)


@triton.jit
def _dot_split_both(a, b):
    """``a @ b`` for two fp32 operands, each split into bf16 hi + lo halves: three bf16 dots
    (``lo·lo`` dropped), nearly fp32-exact."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        return tl.dot(a_hi, b_hi) + tl.dot(a_hi, b_lo) + tl.dot(a_lo, b_hi)


@triton.jit
def _below(offs, size, FULL: tl.constexpr):
    """``offs < size``, or (FULL: the caller knows every offset is in range) a constant-true mask,
    which the compiler folds away with every ``where`` and load mask built from it."""
    if FULL:
        return tl.full(offs.shape, 1, tl.int1)
    else:
        return offs < size


@triton.jit
def _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, inside, HAS_VALID: tl.constexpr):
    """Keys of a block that count: ``inside`` (in range), and kept by the ``(B, N)`` key mask when
    there is one (``_launch.key_valid_arg`` gives its pointer and strides)."""
    if HAS_VALID:
        return inside & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=inside, other=0) != 0)
    else:
        return inside


@triton.jit
def _dot_halves(a, hi, lo):
    """``a @ (hi + lo)`` for half-precision rows a and an fp32 operand given as its bf16 halves
    (split once, by the state combine): :func:`_dot_split` with ``WIDE`` and the split done."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), hi.to(tl.float32) + lo.to(tl.float32), input_precision="ieee")
    else:
        ab = a.to(tl.bfloat16)
        return tl.dot(ab, hi) + tl.dot(ab, lo)


@triton.jit
def _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """The projection transposed, ``(BD, BM)``, zero-padded (a dummy tile for ELU)."""
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    if FEATURE == 0:
        return tl.zeros([BD, BM], dtype=tl.float32)
    else:
        ptrs = w_ptr + offs_m[None, :] * stride_wm + offs_d[:, None] * stride_wd
        return tl.load(ptrs, mask=(offs_m[None, :] < m) & (offs_d[:, None] < d), other=0.0)


@triton.jit
def _logits(x, wt, xs, FEATURE: tl.constexpr, LP: tl.constexpr):
    """Pre-activations p ``(BN, BM)`` fp32 of raw rows ``x (BN, BD)``.

    ELU: x itself (BM == BD); RELU: xs·xWᵀ; FAVOR: xs·xWᵀ − xs²‖x‖²/2.
    """
    if FEATURE == 0:
        return x.to(tl.float32)
    else:
        p = _dot_split(x, wt, LP, False) * xs
        if FEATURE == 1:
            xf = x.to(tl.float32)
            p = p - (0.5 * xs * xs) * tl.sum(xf * xf, axis=1)[:, None]
        return p


@triton.jit
def _apply(p, offset, ratio, eps, keep, FEATURE: tl.constexpr, BASE2: tl.constexpr = False):
    """Features and ``∂φ/∂p`` from pre-activations; ``offset`` is the FAVOR stabiliser
    (broadcastable to p), ``keep`` masks padded features and keys (zero there). BASE2: FAVOR's
    p and offset in base-2 units (the folded projection), ``exp2``; the factor is still ``∂φ/∂l``
    for the natural logit l."""
    if FEATURE == 0:
        phi = tl.where(p > 0, p + 1.0, tl.exp(tl.minimum(p, 0.0)))
        factor = tl.minimum(phi, 1.0)
    elif FEATURE == 1:
        if BASE2:
            e = tl.exp2(p - offset)
        else:
            e = tl.exp(p - offset)
        phi = ratio * (e + eps)
        factor = ratio * e
    else:
        phi = tl.maximum(p, 0.0) + eps
        factor = tl.where(p > 0, 1.0, 0.0)
    phi = tl.where(keep, phi, 0.0)
    factor = tl.where(keep, factor, 0.0)
    return phi, factor


@triton.jit
def _query_features(x, wt, xs, ratio, eps, m, FEATURE: tl.constexpr, STAB: tl.constexpr, LP: tl.constexpr,
                    BM: tl.constexpr):
    """Query features ``(BN, BM)``: FAVOR subtracts each row's max over its m logits."""
    p = _logits(x, wt, xs, FEATURE, LP)
    fmask = (tl.arange(0, BM) < m)[None, :]
    if FEATURE == 1 and STAB:
        offset = tl.max(tl.where(fmask, p, -1.0e30), axis=1)[:, None]
    else:
        offset = tl.zeros([1, 1], dtype=tl.float32)
    return _apply(p, offset, ratio, eps, fmask, FEATURE)


@triton.jit
def _input_grad(x, dl, wt, xs, FEATURE: tl.constexpr, LP: tl.constexpr):
    """Gradient with respect to the raw row x from ``dl = ∂L/∂p`` ``(BN, BM)``."""
    if FEATURE == 0:
        return dl
    else:
        dx = _dot(dl, tl.trans(wt), LP) * xs
        if FEATURE == 1:
            dx = dx - (xs * xs) * x.to(tl.float32) * tl.sum(dl, axis=1)[:, None]
        return dx


@triton.jit
def _add_input_grad_blk(dx, dl_sum, dl, wt, FEATURE: tl.constexpr, LP: tl.constexpr):
    """:func:`_input_grad` over feature blocks: add one block's ``dl = ∂L/∂p`` ``(BN, BMB)``
    (projection block ``wt (BD, BMB)``) to the running ``dx (BN, BD)`` and ``Σ dl (BN,)``;
    :func:`_finish_input_grad` applies the scale and FAVOR's norm term once at the end."""
    if FEATURE == 0:
        dx += dl
    else:
        dx += _dot(dl, tl.trans(wt), LP)
        dl_sum += tl.sum(dl, axis=1)
    return dx, dl_sum


@triton.jit
def _finish_input_grad(dx, dl_sum, x, xs, FEATURE: tl.constexpr, FOLDED: tl.constexpr = False):
    """The input scale and FAVOR's norm term, once, after the feature blocks' ``dx += dl·W``.
    FOLDED: W was the folded projection (FAVOR: xs·log2(e)·W, ReLU: xs·W), whose scale is in dx."""
    if FEATURE != 0:
        if FOLDED:
            if FEATURE == 1:
                dx = dx * 0.6931471805599453  # 1 / log2(e)
        else:
            dx = dx * xs
        if FEATURE == 1:
            dx = dx - (xs * xs) * x.to(tl.float32) * dl_sum[:, None]
    return dx


# ----------------------------------------------------------------------------- feature blocks
# The non-causal kernels walk the m features in blocks of BMB columns so that no m-wide tile
# lives in registers; the projection arrives split on the host into hi + lo halves in the
# input dtype (fp32 inputs: hi is the fp32 projection and lo is ignored).


@triton.jit
def _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE: tl.constexpr, BMB: tl.constexpr,
                BD: tl.constexpr, FULL: tl.constexpr = False):
    """Rows ``mb·BMB …`` of the projection, transposed to ``(BD, BMB)``: (hi, lo). FULL: every row
    and column in range (no masks)."""
    if FEATURE == 0:
        zero = tl.zeros([BD, BMB], dtype=tl.float32)
        return zero, zero
    else:
        offs_m = mb * BMB + tl.arange(0, BMB)
        offs_d = tl.arange(0, BD)
        offs = offs_m[None, :] * stride_wm + offs_d[:, None] * stride_wd
        mask = _below(offs_m, m, FULL)[None, :] & _below(offs_d, d, FULL)[:, None]
        return tl.load(whi_ptr + offs, mask=mask, other=0.0), tl.load(wlo_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _logits_blk(x, whi, wlo, xs, FEATURE: tl.constexpr, LP: tl.constexpr):
    """Pre-activations ``(BN, BMB)`` of one feature block from the unfolded projection (ELU: x
    itself, BMB == BD)."""
    if FEATURE == 0:
        return x.to(tl.float32)
    else:
        p = _proj_blk(x, whi, wlo, FEATURE, LP) * xs
        if FEATURE == 1:
            xf = x.to(tl.float32)
            p = p - (0.5 * xs * xs) * tl.sum(xf * xf, axis=1)[:, None]
        return p


# ----------------------------------------------------------------------------- folded projection
# The non-causal kernels take the projection folded (``FeatureConfig.weight_fold``): scaled by
# x_scale, and for FAVOR by log2(e) too, so a logit leaves the dot ready for ``exp2`` and each
# element of a feature tile saves the two multiplies. FAVOR's norm term ``xs²‖x‖²/2`` (in the
# same base-2 units, :func:`_favor_norm`) is one number per row: a row-wise offset absorbs it
# (``exp2(p − (norm + max))``), so it is computed once per row block, not per element. The
# shared helpers take ``BASE2`` (:func:`_apply`) and ``FOLDED`` (:func:`_finish_input_grad`) for it;
# :func:`_logits_blk` is the unfolded form built on the same dots.

@triton.jit
def _favor_norm(x, xs, AXIS: tl.constexpr):
    """``log2(e)·xs²‖x‖²/2`` of each row (AXIS 1: rows of ``(BN, BD)``; AXIS 0: columns of ``(BD, BN)``)."""
    xf = x.to(tl.float32)
    return (0.7213475204444817 * xs * xs) * tl.sum(xf * xf, axis=AXIS)  # log2(e) / 2


@triton.jit
def _proj_blk(x, whi, wlo, FEATURE: tl.constexpr, LP: tl.constexpr):
    """``x Wᵀ`` ``(BN, BMB)`` with the folded projection (ELU: x itself): FAVOR's logits in base-2
    units before the norm term, ReLU's pre-activations."""
    if FEATURE == 0:
        return x.to(tl.float32)
    elif LP and _INTERPRET:
        return tl.dot(x.to(tl.float32), whi.to(tl.float32) + wlo.to(tl.float32), input_precision="ieee")
    elif LP:
        return tl.dot(x, whi) + tl.dot(x, wlo)
    else:
        return tl.dot(x.to(tl.float32), whi.to(tl.float32), input_precision="ieee")


@triton.jit
def _proj_blk_t(xt, whi, wlo, FEATURE: tl.constexpr, LP: tl.constexpr):
    """:func:`_proj_blk` feature-major: ``(BMB, BN)`` from ``xt (BD, BN)`` and ``W (BMB, BD)``."""
    if FEATURE == 0:
        return xt.to(tl.float32)
    elif LP and _INTERPRET:
        return tl.dot(whi.to(tl.float32) + wlo.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
    elif LP:
        return tl.dot(whi, xt) + tl.dot(wlo, xt)
    else:
        return tl.dot(whi.to(tl.float32), xt.to(tl.float32), input_precision="ieee")


# Feature-major tiles: the key-state sweep computes pre-activations as ``(BMB, BN)`` (features
# × keys), so the state update ``A += e·V`` takes e straight from the accumulator as the dot's
# first operand, the pattern of flash attention's ``O += P·V``; a ``(BN, BMB)`` tile would go
# through shared memory to be transposed first.


@triton.jit
def _load_w_rows(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE: tl.constexpr, BMB: tl.constexpr,
                 BD: tl.constexpr, FULL: tl.constexpr = False):
    """Rows ``mb·BMB …`` of the projection as they are, ``(BMB, BD)``: (hi, lo); FULL as above."""
    if FEATURE == 0:
        zero = tl.zeros([BMB, BD], dtype=tl.float32)
        return zero, zero
    else:
        offs_m = mb * BMB + tl.arange(0, BMB)
        offs_d = tl.arange(0, BD)
        offs = offs_m[:, None] * stride_wm + offs_d[None, :] * stride_wd
        mask = _below(offs_m, m, FULL)[:, None] & _below(offs_d, d, FULL)[None, :]
        return tl.load(whi_ptr + offs, mask=mask, other=0.0), tl.load(wlo_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _logits_blk_t(xt, whi, wlo, xs, FEATURE: tl.constexpr, LP: tl.constexpr):
    """Pre-activations ``(BMB, BN)`` of one feature block from rows given transposed, ``xt (BD, BN)``
    (ELU: xt itself, BMB == BD): :func:`_logits_blk` transposed."""
    if FEATURE == 0:
        return xt.to(tl.float32)
    else:
        p = _proj_blk_t(xt, whi, wlo, FEATURE, LP) * xs
        if FEATURE == 1:
            xf = xt.to(tl.float32)
            p = p - (0.5 * xs * xs) * tl.sum(xf * xf, axis=0)[None, :]
        return p
