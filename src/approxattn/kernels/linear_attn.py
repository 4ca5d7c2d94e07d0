"""Non-causal kernel attention with the feature map fused in: ``φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1)``.

Forward, two launches and no N×m tensor in memory:

1. ``_state_fwd`` (grid: key/value head × key split): features of each key block in
   registers, partial ``A = Σ e(k)vᵀ``, ``a = Σ e(k)`` in fp32, where e is the feature without
   its constant ε part. FAVOR keys are relative to the split's own running max (rescaled
   when it grows, as in flash attention); the global max of a (batch, head), the reference's
   stabiliser, is their maximum, and the partials are combined relative to it on the host
   side (a few m×dv tensors). Since ``φ = ratio·(exp(l − M) + ε)``, the ε part of the state
   is ``ratio·ε·Σv`` and needs no offset at all.
2. ``_out_fwd`` (grid: query head × query block): query features in registers,
   ``o = φ(q)S / (φ(q)·z + den_eps)``; the denominator is kept for the backward.

Backward, two launches: ``_q_bwd`` recomputes the query features, writes dq and partial
``dS = Σ φ(q)dnumᵀ``, ``dz``; ``_kv_bwd`` recomputes the key features and writes dk, dv.
Grouped-query heads index their key/value head (h // G); padded keys read a validity mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._feature_map import (
    FEATURE_CODES,
    _apply,
    _cast_out,
    _dot,
    _dot_split,
    _input_grad,
    _load_wt,
    _logits,
    _query_features,
)
from ._launch import FeatureConfig, block_sizes, key_valid_arg, num_programs_hint, pick_config


@triton.jit
def _state_fwd(
    k_ptr, v_ptr, w_ptr, valid_ptr, A_ptr, a_ptr, vs_ptr, cnt_ptr, off_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, N, m, d, dv, tokens, xs,
    FEATURE: tl.constexpr, USE_MAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_p = tl.num_programs(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = tl.arange(0, BM)
    fmask = offs_m < m
    wt = _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE, BM, BD)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    zacc = tl.zeros([BM], dtype=tl.float32)
    vsum = tl.zeros([BDV], dtype=tl.float32)
    cnt = tl.zeros([BN], dtype=tl.float32)
    run_max = tl.full([BM], -1.0e30, dtype=tl.float32)  # every entry equal: the split's max
    start = pid_p * tokens
    stop = tl.minimum(start + tokens, N)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        valid = offs_n < stop
        if HAS_VALID:
            valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=valid, other=0) != 0)
        x = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < stop) & (offs_d[None, :] < d), other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & (offs_v[None, :] < dv), other=0.0)
        p = _logits(x, wt, xs, FEATURE, LP)
        keep = valid[:, None] & fmask[None, :]
        if USE_MAX:
            block_max = tl.max(tl.max(tl.where(keep, p, -1.0e30), axis=1), axis=0)
            new_max = tl.maximum(run_max, block_max)
            alpha = tl.exp(run_max - new_max)
            acc = acc * alpha[:, None]
            zacc = zacc * alpha
            run_max = new_max
            offset = tl.max(run_max, axis=0)
        else:
            offset = 0.0
        e, _ = _apply(p, offset, 1.0, 0.0, keep, FEATURE)
        acc += _dot(tl.trans(e), vv, LP)
        zacc += tl.sum(e, axis=0)
        vsum += tl.sum(vv.to(tl.float32), axis=0)
        cnt += valid.to(tl.float32)

    part = pid_bh * num_p + pid_p
    tl.store(A_ptr + part.to(tl.int64) * m * dv + offs_m[:, None] * dv + offs_v[None, :], acc,
             mask=fmask[:, None] & (offs_v[None, :] < dv))
    tl.store(a_ptr + part * m + offs_m, zacc, mask=fmask)
    tl.store(vs_ptr + part * dv + offs_v, vsum, mask=offs_v < dv)
    tl.store(cnt_ptr + part, tl.sum(cnt, axis=0))
    if USE_MAX:
        tl.store(off_ptr + part, tl.max(run_max, axis=0))


@triton.jit
def _out_fwd(
    q_ptr, w_ptr, S_ptr, z_ptr, o_ptr, den_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_wm, stride_wd,
    HQ, G, N, m, d, dv, xs, ratio, eps, den_eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv = b * (HQ // G) + h // G
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = tl.arange(0, BM)
    wt = _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE, BM, BD)
    S = tl.load(S_ptr + kv.to(tl.int64) * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                mask=(offs_m[:, None] < m) & (offs_v[None, :] < dv), other=0.0)
    z = tl.load(z_ptr + kv * m + offs_m, mask=offs_m < m, other=0.0)
    rows = offs_n < N
    x = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=rows[:, None] & (offs_d[None, :] < d), other=0.0)
    phi, _ = _query_features(x, wt, xs, ratio, eps, m, FEATURE, STAB, LP, BM)
    num = _dot(phi, S, LP)
    den = tl.sum(phi * z[None, :], axis=1) + den_eps
    out = num / den[:, None]
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
             _cast_out(out, o_ptr.dtype.element_ty), mask=rows[:, None] & (offs_v[None, :] < dv))
    tl.store(den_ptr + pid_bh.to(tl.int64) * N + offs_n, den, mask=rows)


@triton.jit
def _q_bwd(
    q_ptr, w_ptr, S_ptr, z_ptr, o_ptr, do_ptr, den_ptr, dq_ptr, dS_ptr, dz_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_wm, stride_wd,
    HQ, G, N, m, d, dv, tokens, xs, ratio, eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_p = tl.num_programs(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv = b * (HQ // G) + h // G
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = tl.arange(0, BM)
    fmask = offs_m < m
    dmask = offs_d < d
    vmask = offs_v < dv
    wt = _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE, BM, BD)
    S = tl.load(S_ptr + kv.to(tl.int64) * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                mask=fmask[:, None] & vmask[None, :], other=0.0)
    z = tl.load(z_ptr + kv * m + offs_m, mask=fmask, other=0.0)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    g_base = do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    dq_base = dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    dS = tl.zeros([BM, BDV], dtype=tl.float32)
    dz = tl.zeros([BM], dtype=tl.float32)
    start = pid_p * tokens
    stop = tl.minimum(start + tokens, N)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        rows = offs_n < stop
        x = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=rows[:, None] & dmask[None, :], other=0.0)
        o = tl.load(o_base + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                    mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        do_raw = tl.load(g_base + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                         mask=rows[:, None] & vmask[None, :], other=0.0)
        do = do_raw.to(tl.float32)
        den = tl.load(den_ptr + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
        phi, factor = _query_features(x, wt, xs, ratio, eps, m, FEATURE, STAB, LP, BM)
        do_o = tl.sum(do * o, axis=1)
        dnum = do / den[:, None]
        dden = -do_o / den
        # dφ = (do·S − (do·o)z)/den: the two terms nearly cancel, so do·S is taken near-exactly
        dphi = (_dot_split(do_raw, tl.trans(S), LP, True) - do_o[:, None] * z[None, :]) / den[:, None]
        dS += _dot(tl.trans(phi), dnum, LP)
        dz += tl.sum(phi * dden[:, None], axis=0)
        dx = _input_grad(x, dphi * factor, wt, xs, FEATURE, LP)
        tl.store(dq_base + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                 _cast_out(dx, dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
    part = pid_bh * num_p + pid_p
    tl.store(dS_ptr + part.to(tl.int64) * m * dv + offs_m[:, None] * dv + offs_v[None, :], dS,
             mask=fmask[:, None] & vmask[None, :])
    tl.store(dz_ptr + part * m + offs_m, dz, mask=fmask)


@triton.jit
def _kv_bwd(
    k_ptr, v_ptr, w_ptr, valid_ptr, off_ptr, dS_ptr, dz_ptr, dk_ptr, dv_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, N, m, d, dv, xs, ratio, eps,
    FEATURE: tl.constexpr, USE_MAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = tl.arange(0, BM)
    fmask = offs_m < m
    dmask = offs_d < d
    vmask = offs_v < dv
    rows = offs_n < N
    wt = _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE, BM, BD)
    dS = tl.load(dS_ptr + pid_bh.to(tl.int64) * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                 mask=fmask[:, None] & vmask[None, :], other=0.0)
    dz = tl.load(dz_ptr + pid_bh * m + offs_m, mask=fmask, other=0.0)
    if USE_MAX:
        offset = tl.load(off_ptr + pid_bh)
    else:
        offset = 0.0
    valid = rows
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=rows, other=0) != 0)
    x = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=rows[:, None] & dmask[None, :], other=0.0)
    vv = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                 + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                 mask=rows[:, None] & vmask[None, :], other=0.0)
    p = _logits(x, wt, xs, FEATURE, LP)
    phi, factor = _apply(p, offset, ratio, eps, valid[:, None] & fmask[None, :], FEATURE)
    dphi = _dot_split(vv, tl.trans(dS), LP, True) + dz[None, :]
    dvv = _dot(phi, dS, LP)
    dx = _input_grad(x, dphi * factor, wt, xs, FEATURE, LP)
    tl.store(dk_ptr + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _cast_out(dx, dk_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
    tl.store(dv_ptr + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvd,
             _cast_out(dvv, dv_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- host side


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def key_state(k, v, w, valid, cfg: FeatureConfig, *, tokens: int | None = None):
    """Partial key states over splits of ``tokens`` keys: ``A (B·Hkv, P, m, dv)``, ``a``, Σv,
    counts and the split offsets (FAVOR with a stabiliser), all fp32."""
    B, HKV, N, d = k.shape
    dv = v.shape[-1]
    m = cfg.features(d)
    BM, BD, BDV = block_sizes(m, d, dv)
    launch = pick_config("state", m, d, dv)
    if tokens is None:
        splits = max(1, min(triton.cdiv(N, launch["BN"]), num_programs_hint(k.device) // (B * HKV)))
        tokens = triton.cdiv(triton.cdiv(N, splits), 256) * 256
    P = triton.cdiv(N, tokens)
    f32 = dict(device=k.device, dtype=torch.float32)
    A = torch.empty(B * HKV, P, m, dv, **f32)
    a = torch.empty(B * HKV, P, m, **f32)
    vsum = torch.empty(B * HKV, P, dv, **f32)
    cnt = torch.empty(B * HKV, P, **f32)
    offsets = torch.zeros(B * HKV, P, **f32)
    valid_t, smb, smn = key_valid_arg(valid, k)
    _state_fwd[(B * HKV, P)](
        k, v, cfg.weight(k), valid_t, A, a, vsum, cnt, offsets,
        *_strides(k), *_strides(v), *cfg.weight_strides(k), smb, smn,
        HKV, N, m, d, dv, tokens, cfg.x_scale,
        FEATURE=FEATURE_CODES[cfg.feature], USE_MAX=cfg.use_key_max, HAS_VALID=valid is not None,
        LP=cfg.low_precision(k), BM=BM, BD=BD, BDV=BDV, **launch,
    )
    return A, a, vsum, cnt, offsets


def _state_from_partials(A, a, vsum, cnt, offsets, cfg):
    reference = offsets.amax(dim=1) if cfg.use_key_max else None
    if reference is not None:
        w = torch.exp(offsets - reference[:, None])
        S = torch.einsum("bp,bpmd->bmd", w, A)
        z = torch.einsum("bp,bpm->bm", w, a)
    else:
        S, z = A.sum(1), a.sum(1)
    mult, const = cfg.state_terms()
    if mult != 1.0:
        S, z = S * mult, z * mult
    if const:
        S = S + const * vsum.sum(1)[:, None, :]
        z = z + const * cnt.sum(1)[:, None]
    return S.contiguous(), z.contiguous(), reference


def _forward(q, k, v, w, valid, cfg: FeatureConfig):
    B, HQ, N, d = q.shape
    HKV, dv = k.shape[1], v.shape[-1]
    m = cfg.features(d)
    BM, BD, BDV = block_sizes(m, d, dv)
    S, z, key_max = _state_from_partials(*key_state(k, v, w, valid, cfg), cfg)
    o = torch.empty(B, HQ, N, dv, device=q.device, dtype=q.dtype)
    den = torch.empty(B * HQ, N, device=q.device, dtype=torch.float32)
    launch = pick_config("out", m, d, dv)
    _out_fwd[(B * HQ, triton.cdiv(N, launch["BN"]))](
        q, cfg.weight(q), S, z, o, den, *_strides(q), *_strides(o), *cfg.weight_strides(q),
        HQ, HQ // HKV, N, m, d, dv, cfg.x_scale, cfg.ratio, cfg.eps, cfg.den_eps,
        FEATURE=FEATURE_CODES[cfg.feature], STAB=cfg.stabilize, LP=cfg.low_precision(q),
        BM=BM, BD=BD, BDV=BDV, **launch,
    )
    return o, den, S, z, key_max


def _backward(do, q, k, v, o, den, S, z, key_max, valid, cfg: FeatureConfig):
    B, HQ, N, d = q.shape
    HKV, NK, dv = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    m = cfg.features(d)
    BM, BD, BDV = block_sizes(m, d, dv)
    LP, code = cfg.low_precision(q), FEATURE_CODES[cfg.feature]
    launch = pick_config("q_bwd", m, d, dv)
    splits = max(1, min(triton.cdiv(N, launch["BN"]), num_programs_hint(q.device) // (B * HQ)))
    tokens = triton.cdiv(triton.cdiv(N, splits), 256) * 256
    P = triton.cdiv(N, tokens)
    dq = torch.empty_like(q)
    dS_part = torch.empty(B * HQ, P, m, dv, device=q.device, dtype=torch.float32)
    dz_part = torch.empty(B * HQ, P, m, device=q.device, dtype=torch.float32)
    _q_bwd[(B * HQ, P)](
        q, cfg.weight(q), S, z, o, do, den, dq, dS_part, dz_part,
        *_strides(q), *_strides(o), *_strides(do), *_strides(dq), *cfg.weight_strides(q),
        HQ, G, N, m, d, dv, tokens, cfg.x_scale, cfg.ratio, cfg.eps,
        FEATURE=code, STAB=cfg.stabilize, LP=LP, BM=BM, BD=BD, BDV=BDV, **launch,
    )
    dS = dS_part.view(B * HKV, G * P, m, dv).sum(1)
    dz = dz_part.view(B * HKV, G * P, m).sum(1)
    dk = torch.empty_like(k)
    dvv = torch.empty_like(v)
    valid_t, smb, smn = key_valid_arg(valid, k)
    offsets = key_max if key_max is not None else dz  # dummy pointer when unused
    launch = pick_config("kv_bwd", m, d, dv)
    _kv_bwd[(B * HKV, triton.cdiv(NK, launch["BN"]))](
        k, v, cfg.weight(k), valid_t, offsets, dS, dz, dk, dvv,
        *_strides(k), *_strides(v), *_strides(dk), *_strides(dvv), *cfg.weight_strides(k), smb, smn,
        HKV, NK, m, d, dv, cfg.x_scale, cfg.ratio, cfg.eps,
        FEATURE=code, USE_MAX=cfg.use_key_max, HAS_VALID=valid is not None, LP=LP,
        BM=BM, BD=BD, BDV=BDV, **launch,
    )
    return dq, dk, dvv


class _FeatureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, valid, cfg):
        o, den, S, z, key_max = _forward(q, k, v, projection, valid, cfg)
        ctx.save_for_backward(q, k, v, o, den, S, z, key_max, valid)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, S, z, key_max, valid = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, den, S, z, key_max, valid, ctx.cfg)
        return dq, dk, dv, None, None, None


def chunk_free_feature_attention(q, k, v, cfg: FeatureConfig, key_padding_mask=None):
    """Non-causal fused kernel attention → ``(B, Hq, Nq, dv)`` in q's dtype (see module doc)."""
    return _FeatureAttention.apply(q, k, v, cfg.projection, key_padding_mask, cfg)
