"""Causal kernel attention by a chunked scan, feature maps fused (elu+1, ReLU features, FAVOR+
without a stabiliser on keys).

The sequence is cut into segments of whole chunks (``BC`` tokens); segments run in parallel.

Forward:
1. ``linear_attn._state_fwd`` with one split per segment: each segment's key state
   ``Σ φ(k)vᵀ`` and ``Σ φ(k)``; an exclusive prefix sum over segments (host, tiny) gives the
   state at each segment's start.
2. ``_causal_fwd`` (grid: query head × segment): chunk by chunk, the masked ``C×C`` block
   ``φ(Q_c)φ(K_c)ᵀ`` for the intra-chunk part plus ``φ(Q_c)S`` for everything before, then
   ``S += φ(K_c)ᵀV_c``. Writes o and the denominators.

Backward:
3. ``_causal_dq`` (query head × segment): the same forward scan gives
   ``dφ(q_i) = Σ_{j≤i} (v_j·dnum_i + dden_i) φ(k_j)`` and dq; it also sums the segment's
   ``Σ φ(q)dnumᵀ``, ``Σ φ(q)dden`` for step 4 (suffix sums over segments on the host).
4. ``_causal_dkv`` (key/value head × segment): a reverse scan with the suffix state
   ``R = Σ_{i>chunk} φ(q_i)dnum_iᵀ`` over every query head of the group gives dk and dv.

``dnum = do/den`` and ``dden = −(do·o)/den`` come from the saved output and denominators.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._feature_map import FEATURE_CODES, _apply, _cast_out, _dot, _dot_split, _input_grad, _load_wt, _logits, _query_features
from ._launch import FeatureConfig, block_sizes, key_valid_arg, num_programs_hint, pick_config
from .linear_attn import _state_from_partials, _strides, key_state

SUPPORTS_PREFIX_MAX = False  # FAVOR+ with the no-look-ahead key stabiliser: reference path


@triton.jit
def _causal_fwd(
    q_ptr, k_ptr, v_ptr, w_ptr, valid_ptr, S_ptr, z_ptr, o_ptr, den_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, N, m, d, dv, seg_len, xs, ratio, eps, den_eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    seg = tl.program_id(1)
    num_seg = tl.num_programs(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    kv = b * (HQ // G) + hk
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = tl.arange(0, BM)
    offs_c = tl.arange(0, BC)
    fmask = offs_m < m
    dmask = offs_d < d
    vmask = offs_v < dv
    lower = offs_c[:, None] >= offs_c[None, :]
    wt = _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE, BM, BD)
    state = (kv * num_seg + seg).to(tl.int64)
    S = tl.load(S_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                mask=fmask[:, None] & vmask[None, :], other=0.0)
    z = tl.load(z_ptr + state * m + offs_m, mask=fmask, other=0.0)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    for c0 in range(start, stop, BC):
        offs_n = c0 + offs_c
        rows = offs_n < N
        valid = rows
        if HAS_VALID:
            valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=rows, other=0) != 0)
        xq = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        xk = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        phiq, _ = _query_features(xq, wt, xs, ratio, eps, m, FEATURE, STAB, LP, BM)
        phik, _ = _apply(_logits(xk, wt, xs, FEATURE, LP), 0.0, ratio, eps, valid[:, None] & fmask[None, :],
                         FEATURE)
        A = tl.where(lower, _dot(phiq, tl.trans(phik), LP), 0.0)
        num = _dot(A, vv, LP) + _dot(phiq, S, LP)
        den = tl.sum(A, axis=1) + tl.sum(phiq * z[None, :], axis=1) + den_eps
        tl.store(o_base + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                 _cast_out(num / den[:, None], o_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])
        tl.store(den_ptr + pid_bh.to(tl.int64) * N + offs_n, den, mask=rows)
        S += _dot(tl.trans(phik), vv, LP)
        z += tl.sum(phik, axis=0)


@triton.jit
def _causal_dq(
    q_ptr, k_ptr, v_ptr, w_ptr, valid_ptr, S_ptr, z_ptr, o_ptr, do_ptr, den_ptr, dq_ptr, R_ptr, r_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, N, m, d, dv, seg_len, xs, ratio, eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    seg = tl.program_id(1)
    num_seg = tl.num_programs(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    kv = b * (HQ // G) + hk
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = tl.arange(0, BM)
    offs_c = tl.arange(0, BC)
    fmask = offs_m < m
    dmask = offs_d < d
    vmask = offs_v < dv
    lower = offs_c[:, None] >= offs_c[None, :]
    wt = _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE, BM, BD)
    state = (kv * num_seg + seg).to(tl.int64)
    S = tl.load(S_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                mask=fmask[:, None] & vmask[None, :], other=0.0)
    z = tl.load(z_ptr + state * m + offs_m, mask=fmask, other=0.0)
    R = tl.zeros([BM, BDV], dtype=tl.float32)
    r = tl.zeros([BM], dtype=tl.float32)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    g_base = do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    dq_base = dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    for c0 in range(start, stop, BC):
        offs_n = c0 + offs_c
        rows = offs_n < N
        valid = rows
        if HAS_VALID:
            valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=rows, other=0) != 0)
        xq = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        xk = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        o = tl.load(o_base + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                    mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        do_raw = tl.load(g_base + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                         mask=rows[:, None] & vmask[None, :], other=0.0)
        do = do_raw.to(tl.float32)
        den = tl.load(den_ptr + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
        do_o = tl.sum(do * o, axis=1)
        dnum = do / den[:, None]
        dden = -do_o / den
        phiq, fq = _query_features(xq, wt, xs, ratio, eps, m, FEATURE, STAB, LP, BM)
        phik, _ = _apply(_logits(xk, wt, xs, FEATURE, LP), 0.0, ratio, eps, valid[:, None] & fmask[None, :],
                         FEATURE)
        # (v_j − o_i)·do_i / den_i, formed from exact products before the cancellation
        Bm = tl.where(lower, (_dot(do_raw, tl.trans(vv), LP) - do_o[:, None]) / den[:, None], 0.0)
        carried = _dot_split(do_raw, tl.trans(S), LP, True) - do_o[:, None] * z[None, :]
        dphi = _dot(Bm, phik, LP) + carried / den[:, None]
        dx = _input_grad(xq, dphi * fq, wt, xs, FEATURE, LP)
        tl.store(dq_base + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                 _cast_out(dx, dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
        R += _dot(tl.trans(phiq), dnum, LP)
        r += tl.sum(phiq * dden[:, None], axis=0)
        S += _dot(tl.trans(phik), vv, LP)
        z += tl.sum(phik, axis=0)
    part = (pid_bh * num_seg + seg).to(tl.int64)
    tl.store(R_ptr + part * m * dv + offs_m[:, None] * dv + offs_v[None, :], R, mask=fmask[:, None] & vmask[None, :])
    tl.store(r_ptr + part * m + offs_m, r, mask=fmask)


@triton.jit
def _causal_dkv(
    q_ptr, k_ptr, v_ptr, w_ptr, valid_ptr, R_ptr, r_ptr, o_ptr, do_ptr, den_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, G, N, m, d, dv, seg_len, xs, ratio, eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    seg = tl.program_id(1)
    num_seg = tl.num_programs(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    HQ = HKV * G
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = tl.arange(0, BM)
    offs_c = tl.arange(0, BC)
    fmask = offs_m < m
    dmask = offs_d < d
    vmask = offs_v < dv
    upper = offs_c[:, None] <= offs_c[None, :]  # [key j, query i]: i >= j
    wt = _load_wt(w_ptr, stride_wm, stride_wd, m, d, FEATURE, BM, BD)
    state = (pid_bh * num_seg + seg).to(tl.int64)
    R = tl.load(R_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                mask=fmask[:, None] & vmask[None, :], other=0.0)
    r = tl.load(r_ptr + state * m + offs_m, mask=fmask, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dk_base = dk_ptr + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    dv_base = dv_ptr + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    num_chunks = tl.cdiv(stop - start, BC)
    for t in range(0, num_chunks):
        offs_n = start + (num_chunks - 1 - t) * BC + offs_c
        rows = offs_n < N
        valid = rows
        if HAS_VALID:
            valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=rows, other=0) != 0)
        xk = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        phik, fk = _apply(_logits(xk, wt, xs, FEATURE, LP), 0.0, ratio, eps, valid[:, None] & fmask[None, :],
                          FEATURE)
        dphik = _dot_split(vv, tl.trans(R), LP, True) + r[None, :]
        dvv = _dot(phik, R, LP)
        for g in range(0, G):
            h = hk * G + g
            q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            xq = tl.load(q_ptr + q_off + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                         mask=rows[:, None] & dmask[None, :], other=0.0)
            o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                        + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                        mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            do_raw = tl.load(do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                             + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                             mask=rows[:, None] & vmask[None, :], other=0.0)
            do = do_raw.to(tl.float32)
            den = tl.load(den_ptr + (b * HQ + h).to(tl.int64) * N + offs_n, mask=rows, other=1.0)
            do_o = tl.sum(do * o, axis=1)
            dnum = do / den[:, None]
            dden = -do_o / den
            phiq, _ = _query_features(xq, wt, xs, ratio, eps, m, FEATURE, STAB, LP, BM)
            P = tl.where(upper, _dot(phik, tl.trans(phiq), LP), 0.0)
            dvv += _dot(P, dnum, LP)
            Bt = tl.where(upper, (_dot(vv, tl.trans(do_raw), LP) - do_o[None, :]) / den[None, :], 0.0)
            dphik += _dot(Bt, phiq, LP)
            R += _dot(tl.trans(phiq), dnum, LP)
            r += tl.sum(phiq * dden[:, None], axis=0)
        dx = _input_grad(xk, dphik * fk, wt, xs, FEATURE, LP)
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 _cast_out(dx, dk_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
        dvv = tl.where(valid[:, None], dvv, 0.0)
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvd,
                 _cast_out(dvv, dv_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- host side


def segment_length(n: int, programs: int, device: torch.device, chunk: int) -> int:
    """Tokens per segment: whole chunks, enough segments to fill the device."""
    segments = max(1, min(triton.cdiv(n, chunk), num_programs_hint(device) // max(1, programs)))
    return triton.cdiv(triton.cdiv(n, segments), chunk) * chunk


def _exclusive_prefix(x: torch.Tensor) -> torch.Tensor:
    """``out[:, s] = Σ_{s' < s} x[:, s']`` over dim 1."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1].cumsum(dim=1)], dim=1).contiguous()


def _exclusive_suffix(x: torch.Tensor) -> torch.Tensor:
    """``out[:, s] = Σ_{s' > s} x[:, s']`` over dim 1."""
    return _exclusive_prefix(x.flip(1)).flip(1).contiguous()


def _forward(q, k, v, valid, cfg: FeatureConfig):
    B, HQ, N, d = q.shape
    HKV, dv = k.shape[1], v.shape[-1]
    m = cfg.features(d)
    BM, BD, BDV = block_sizes(m, d, dv)
    launch = pick_config("causal_fwd", m, d, dv)
    BC = launch.pop("BN")
    seg_len = segment_length(N, B * HQ, q.device, BC)
    A, a, vsum, cnt, offsets = key_state(k, v, None, valid, cfg, tokens=seg_len)
    mult, const = cfg.state_terms()
    S = _exclusive_prefix(mult * A + const * vsum[:, :, None, :])
    z = _exclusive_prefix(mult * a + const * cnt[:, :, None])
    num_seg = S.shape[1]
    o = torch.empty(B, HQ, N, dv, device=q.device, dtype=q.dtype)
    den = torch.empty(B * HQ, N, device=q.device, dtype=torch.float32)
    valid_t, smb, smn = key_valid_arg(valid, k)
    _causal_fwd[(B * HQ, num_seg)](
        q, k, v, cfg.weight(q), valid_t, S, z, o, den,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *cfg.weight_strides(q), smb, smn,
        HQ, HQ // HKV, N, m, d, dv, seg_len, cfg.x_scale, cfg.ratio, cfg.eps, cfg.den_eps,
        FEATURE=FEATURE_CODES[cfg.feature], STAB=cfg.stabilize, HAS_VALID=valid is not None,
        LP=cfg.low_precision(q), BC=BC, BM=BM, BD=BD, BDV=BDV, **launch,
    )
    return o, den, S, z, seg_len


def _backward(do, q, k, v, o, den, S, z, valid, seg_len, cfg: FeatureConfig):
    B, HQ, N, d = q.shape
    HKV, dv = k.shape[1], v.shape[-1]
    G = HQ // HKV
    m = cfg.features(d)
    BM, BD, BDV = block_sizes(m, d, dv)
    code, LP = FEATURE_CODES[cfg.feature], cfg.low_precision(q)
    num_seg = S.shape[1]
    launch = pick_config("causal_fwd", m, d, dv)
    BC = launch.pop("BN")
    valid_t, smb, smn = key_valid_arg(valid, k)
    dq = torch.empty_like(q)
    R = torch.empty(B * HQ, num_seg, m, dv, device=q.device, dtype=torch.float32)
    r = torch.empty(B * HQ, num_seg, m, device=q.device, dtype=torch.float32)
    common = dict(FEATURE=code, STAB=cfg.stabilize, HAS_VALID=valid is not None, LP=LP, BC=BC, BM=BM, BD=BD,
                  BDV=BDV)
    _causal_dq[(B * HQ, num_seg)](
        q, k, v, cfg.weight(q), valid_t, S, z, o, do, den, dq, R, r,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dq),
        *cfg.weight_strides(q), smb, smn,
        HQ, G, N, m, d, dv, seg_len, cfg.x_scale, cfg.ratio, cfg.eps, **common, **launch,
    )
    R = _exclusive_suffix(R.view(B * HKV, G, num_seg, m, dv).sum(1))
    r = _exclusive_suffix(r.view(B * HKV, G, num_seg, m).sum(1))
    dk = torch.empty_like(k)
    dvv = torch.empty_like(v)
    _causal_dkv[(B * HKV, num_seg)](
        q, k, v, cfg.weight(q), valid_t, R, r, o, do, den, dk, dvv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dk), *_strides(dvv),
        *cfg.weight_strides(q), smb, smn,
        HKV, G, N, m, d, dv, seg_len, cfg.x_scale, cfg.ratio, cfg.eps, **common, **launch,
    )
    return dq, dk, dvv


class _CausalFeatureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, valid, cfg):
        o, den, S, z, seg_len = _forward(q, k, v, valid, cfg)
        ctx.save_for_backward(q, k, v, o, den, S, z, valid)
        ctx.cfg, ctx.seg_len = cfg, seg_len
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, S, z, valid = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, den, S, z, valid, ctx.seg_len, ctx.cfg)
        return dq, dk, dv, None, None, None


def causal_feature_attention(q, k, v, cfg: FeatureConfig, key_padding_mask=None):
    """Causal fused kernel attention → ``(B, Hq, N, dv)`` in q's dtype (see module doc)."""
    if cfg.use_key_max:
        raise NotImplementedError("causal FAVOR+ with the prefix-max stabiliser has no fused kernel yet")
    return _CausalFeatureAttention.apply(q, k, v, cfg.projection, key_padding_mask, cfg)
