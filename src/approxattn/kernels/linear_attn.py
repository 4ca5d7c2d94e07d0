"""Non-causal kernel attention with the feature map fused in: ``φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1)``.

No N×m tensor ever reaches memory; features are computed in registers, 64 at a time
(``FEATURE_BLOCK``), from the projection split on the host into hi + lo halves of the input
dtype (nearly fp32-exact logits from two half-precision dots).

Forward, two launches:

1. ``_state_fwd`` (grid: key/value head × feature block, key split): partial
   ``A = Σ e(k)vᵀ``, ``a = Σ e(k)`` in fp32, e being the feature without its constant ε part.
   FAVOR keys are relative to the program's own running max (rescaled when it grows, as in
   flash attention); the reference's stabiliser, one max over all keys and features of a
   (batch, head), is the maximum of these, and the partials are combined relative to it on
   the host (a few m×dv tensors). As ``φ = ratio·(exp(l − M) + ε)``, the ε part of the state
   is ``ratio·ε·Σv`` and needs no offset.
2. ``_out_fwd`` (grid: query head × query block): ``o = φ(q)S / (φ(q)·z + den_eps)`` in one
   sweep over the feature blocks, FAVOR's per-row max taken as a running max (the ε part of
   φ(q) is applied at the end through ``Σ_m S_m``); the denominators and row maxima are kept
   for the backward (4 + 4 bytes a row).

Backward, three launches: ``_q_bwd`` (dq), ``_dstate_bwd`` (partial ``dS = Σ φ(q)dnumᵀ`` and
``dz`` per feature block and query split) and ``_kv_bwd`` (dk, dv), each recomputing the
features it needs. Grouped-query heads index their key/value head (h // G); padded keys
read a validity mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._feature_map import FEATURE_CODES, _apply, _cast_out, _dot, _dot_split, _load_w_blk, _logits_blk
from ._launch import FeatureConfig, block_sizes, key_valid_arg, num_programs_hint, pick_config


@triton.jit
def _state_fwd(
    k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, A_ptr, a_ptr, vs_ptr, cnt_ptr, off_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, NMB, N, m, d, dv, tokens, xs,
    FEATURE: tl.constexpr, USE_MAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head × feature block, key split): partial state of one feature block."""
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_p = tl.num_programs(1)
    bh = pid // NMB
    mb = pid % NMB
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = mb * BMB + tl.arange(0, BMB)
    fmask = offs_m < m
    whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    acc = tl.zeros([BMB, BDV], dtype=tl.float32)
    zacc = tl.zeros([BMB], dtype=tl.float32)
    vsum = tl.zeros([BDV], dtype=tl.float32)
    cnt = tl.zeros([BN], dtype=tl.float32)
    run_max = tl.full([BMB], -1.0e30, dtype=tl.float32)  # every entry equal: the program's max
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
        p = _logits_blk(x, whi, wlo, xs, FEATURE, LP)
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

    part = bh * num_p + pid_p
    tl.store(A_ptr + part.to(tl.int64) * m * dv + offs_m[:, None] * dv + offs_v[None, :], acc,
             mask=fmask[:, None] & (offs_v[None, :] < dv))
    tl.store(a_ptr + part * m + offs_m, zacc, mask=fmask)
    if mb == 0:
        tl.store(vs_ptr + part * dv + offs_v, vsum, mask=offs_v < dv)
        tl.store(cnt_ptr + part, tl.sum(cnt, axis=0))
    if USE_MAX:
        tl.store(off_ptr + part * NMB + mb, tl.max(run_max, axis=0))


@triton.jit
def _out_fwd(
    q_ptr, whi_ptr, wlo_ptr, S_ptr, z_ptr, Ssum_ptr, zsum_ptr, o_ptr, den_ptr, qmax_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_wm, stride_wd,
    HQ, G, NMB, N, m, d, dv, xs, ratio, eps, den_eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head, query block): o = φ(q)S / (φ(q)·z + den_eps) in one sweep over the
    feature blocks. FAVOR's per-row max is a running max (partial sums rescaled when it
    grows); its ε part is ``ratio·ε·(Σ_m S_m, Σ_m z_m)``, which no offset touches."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv = (b * (HQ // G) + h // G).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    vmask = offs_v < dv
    rows = offs_n < N
    x = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=rows[:, None] & (offs_d[None, :] < d), other=0.0)
    online = FEATURE == 1 and STAB
    row_max = tl.zeros([BN], dtype=tl.float32)
    if online:
        row_max = row_max - 1.0e30
    num = tl.zeros([BN, BDV], dtype=tl.float32)
    den = tl.zeros([BN], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        p = _logits_blk(x, whi, wlo, xs, FEATURE, LP)
        if online:
            new_max = tl.maximum(row_max, tl.max(tl.where(fmask[None, :], p, -1.0e30), axis=1))
            alpha = tl.exp(row_max - new_max)
            num = num * alpha[:, None]
            den = den * alpha
            row_max = new_max
            phi, _ = _apply(p, row_max[:, None], 1.0, 0.0, fmask[None, :], FEATURE)
        else:
            phi, _ = _apply(p, 0.0, ratio, eps, fmask[None, :], FEATURE)
        S = tl.load(S_ptr + kv * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                    mask=fmask[:, None] & vmask[None, :], other=0.0)
        z = tl.load(z_ptr + kv * m + offs_m, mask=fmask, other=0.0)
        num += _dot(phi, S, LP)
        den += tl.sum(phi * z[None, :], axis=1)
    if online:
        s_sum = tl.load(Ssum_ptr + kv * dv + offs_v, mask=vmask, other=0.0)
        z_sum = tl.load(zsum_ptr + kv)
        num = ratio * (num + eps * s_sum[None, :])
        den = ratio * (den + eps * z_sum)
    den += den_eps
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
             _cast_out(num / den[:, None], o_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])
    tl.store(den_ptr + pid_bh.to(tl.int64) * N + offs_n, den, mask=rows)
    tl.store(qmax_ptr + pid_bh.to(tl.int64) * N + offs_n, row_max, mask=rows)


@triton.jit
def _q_bwd(
    q_ptr, whi_ptr, wlo_ptr, S_ptr, z_ptr, o_ptr, do_ptr, den_ptr, qmax_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_wm, stride_wd,
    HQ, G, NMB, N, m, d, dv, xs, ratio, eps,
    FEATURE: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head, query block): dq, feature block by block."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv = (b * (HQ // G) + h // G).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    dmask = offs_d < d
    vmask = offs_v < dv
    rows = offs_n < N
    x = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=rows[:, None] & dmask[None, :], other=0.0)
    o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
    do_raw = tl.load(do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                     + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                     mask=rows[:, None] & vmask[None, :], other=0.0)
    den = tl.load(den_ptr + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
    row_max = tl.load(qmax_ptr + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=0.0)
    do_o = tl.sum(do_raw.to(tl.float32) * o, axis=1)
    dx = tl.zeros([BN, BD], dtype=tl.float32)
    dl_sum = tl.zeros([BN], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        _, factor = _apply(_logits_blk(x, whi, wlo, xs, FEATURE, LP), row_max[:, None], ratio, eps,
                           fmask[None, :], FEATURE)
        S = tl.load(S_ptr + kv * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                    mask=fmask[:, None] & vmask[None, :], other=0.0)
        z = tl.load(z_ptr + kv * m + offs_m, mask=fmask, other=0.0)
        # dφ = (do·S − (do·o)z)/den: the two terms nearly cancel, so do·S is taken near-exactly
        dphi = (_dot_split(do_raw, tl.trans(S), LP, True) - do_o[:, None] * z[None, :]) / den[:, None]
        dl = dphi * factor
        if FEATURE == 0:
            dx += dl
        else:
            dx += _dot(dl, tl.trans(whi), LP)
            dl_sum += tl.sum(dl, axis=1)
    if FEATURE != 0:
        dx = dx * xs
        if FEATURE == 1:
            dx = dx - (xs * xs) * x.to(tl.float32) * dl_sum[:, None]
    tl.store(dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             _cast_out(dx, dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])


@triton.jit
def _dstate_bwd(
    q_ptr, whi_ptr, wlo_ptr, o_ptr, do_ptr, den_ptr, qmax_ptr, dS_ptr, dz_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_wm, stride_wd,
    HQ, NMB, N, m, d, dv, tokens, xs, ratio, eps,
    FEATURE: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head × feature block, query split): partial dS = Σ φ(q)dnumᵀ and dz."""
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_p = tl.num_programs(1)
    bh = pid // NMB
    mb = pid % NMB
    b = bh // HQ
    h = bh % HQ
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_m = mb * BMB + tl.arange(0, BMB)
    fmask = offs_m < m
    dmask = offs_d < d
    vmask = offs_v < dv
    whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    g_base = do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    dS = tl.zeros([BMB, BDV], dtype=tl.float32)
    dz = tl.zeros([BMB], dtype=tl.float32)
    start = pid_p * tokens
    stop = tl.minimum(start + tokens, N)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        rows = offs_n < stop
        x = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=rows[:, None] & dmask[None, :], other=0.0)
        o = tl.load(o_base + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                    mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        do = tl.load(g_base + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                     mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        den = tl.load(den_ptr + bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
        row_max = tl.load(qmax_ptr + bh.to(tl.int64) * N + offs_n, mask=rows, other=0.0)
        phi, _ = _apply(_logits_blk(x, whi, wlo, xs, FEATURE, LP), row_max[:, None], ratio, eps,
                        rows[:, None] & fmask[None, :], FEATURE)
        dnum = do / den[:, None]
        dden = -tl.sum(do * o, axis=1) / den
        dS += _dot(tl.trans(phi), dnum, LP)
        dz += tl.sum(phi * dden[:, None], axis=0)
    part = (bh * num_p + pid_p).to(tl.int64)
    tl.store(dS_ptr + part * m * dv + offs_m[:, None] * dv + offs_v[None, :], dS, mask=fmask[:, None] & vmask[None, :])
    tl.store(dz_ptr + part * m + offs_m, dz, mask=fmask)


@triton.jit
def _kv_bwd(
    k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, off_ptr, dS_ptr, dz_ptr, dk_ptr, dv_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, NMB, N, m, d, dv, xs, ratio, eps,
    FEATURE: tl.constexpr, USE_MAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head, key block): dk and dv, feature block by block."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    dmask = offs_d < d
    vmask = offs_v < dv
    rows = offs_n < N
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
    dx = tl.zeros([BN, BD], dtype=tl.float32)
    dl_sum = tl.zeros([BN], dtype=tl.float32)
    dvv = tl.zeros([BN, BDV], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        phi, factor = _apply(_logits_blk(x, whi, wlo, xs, FEATURE, LP), offset, ratio, eps,
                             valid[:, None] & fmask[None, :], FEATURE)
        dS = tl.load(dS_ptr + pid_bh.to(tl.int64) * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                     mask=fmask[:, None] & vmask[None, :], other=0.0)
        dz = tl.load(dz_ptr + pid_bh.to(tl.int64) * m + offs_m, mask=fmask, other=0.0)
        dphi = _dot_split(vv, tl.trans(dS), LP, True) + dz[None, :]
        dvv += _dot(phi, dS, LP)
        dl = dphi * factor
        if FEATURE == 0:
            dx += dl
        else:
            dx += _dot(dl, tl.trans(whi), LP)
            dl_sum += tl.sum(dl, axis=1)
    if FEATURE != 0:
        dx = dx * xs
        if FEATURE == 1:
            dx = dx - (xs * xs) * x.to(tl.float32) * dl_sum[:, None]
    tl.store(dk_ptr + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _cast_out(dx, dk_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
    dvv = tl.where(valid[:, None], dvv, 0.0)
    tl.store(dv_ptr + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvd,
             _cast_out(dvv, dv_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- host side


FEATURE_BLOCK = 64  # features per block of the projected maps (ELU: one block of width d)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def feature_blocks(cfg: FeatureConfig, d: int, dv: int) -> tuple[int, int, int, int, int]:
    """(m, feature block BMB, number of blocks, BD, BDV): ELU is one block of width d."""
    m = cfg.features(d)
    _, BD, BDV = block_sizes(m, d, dv)
    BMB = BD if cfg.feature == "elu" else min(FEATURE_BLOCK, block_sizes(m, d, dv)[0])
    return m, BMB, triton.cdiv(m, BMB), BD, BDV


def _splits(n: int, programs: int, device, bn: int) -> int:
    """Tokens per split: enough splits to fill the device, whole multiples of 256."""
    splits = max(1, min(triton.cdiv(n, bn), num_programs_hint(device) // max(1, programs)))
    return triton.cdiv(triton.cdiv(n, splits), 256) * 256


def key_state(k, v, w, valid, cfg: FeatureConfig, *, tokens: int | None = None):
    """Partial key states over splits of ``tokens`` keys: ``A (B·Hkv, P, m, dv)``, ``a``, Σv,
    counts and the offsets ``(B·Hkv, P, blocks)`` of FAVOR's stabiliser, all fp32."""
    B, HKV, N, d = k.shape
    dv = v.shape[-1]
    m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
    launch = pick_config("state", m, d, dv)
    if tokens is None:
        tokens = _splits(N, B * HKV * NMB, k.device, launch["BN"])
    P = triton.cdiv(N, tokens)
    f32 = dict(device=k.device, dtype=torch.float32)
    A = torch.empty(B * HKV, P, m, dv, **f32)
    a = torch.empty(B * HKV, P, m, **f32)
    vsum = torch.empty(B * HKV, P, dv, **f32)
    cnt = torch.empty(B * HKV, P, **f32)
    offsets = torch.zeros(B * HKV, P, NMB, **f32)
    whi, wlo = cfg.split_weight(k)
    valid_t, smb, smn = key_valid_arg(valid, k)
    _state_fwd[(B * HKV * NMB, P)](
        k, v, whi, wlo, valid_t, A, a, vsum, cnt, offsets,
        *_strides(k), *_strides(v), *cfg.weight_strides(k), smb, smn,
        HKV, NMB, N, m, d, dv, tokens, cfg.x_scale,
        FEATURE=FEATURE_CODES[cfg.feature], USE_MAX=cfg.use_key_max, HAS_VALID=valid is not None,
        LP=cfg.low_precision(k), BMB=BMB, BD=BD, BDV=BDV, **launch,
    )
    return A, a, vsum, cnt, offsets


def _state_from_partials(A, a, vsum, cnt, offsets, cfg):
    """``S = mult·Σ_p w_p A_p + c·Σv`` and z over the split axis, ``w = exp(offset − M)`` with M
    the global key max (FAVOR's stabilised features are ``ratio·(exp(l − M) + ε)``)."""
    reference = None
    if cfg.use_key_max:
        reference = offsets.amax(dim=(1, 2))
        m, blocks = A.shape[2], offsets.shape[2]
        block_of_row = torch.arange(m, device=A.device) // FEATURE_BLOCK if blocks > 1 else None
        w = torch.exp(offsets - reference[:, None, None])
        w = w[..., block_of_row] if block_of_row is not None else w.expand(-1, -1, m)
        S = torch.einsum("bpm,bpmd->bmd", w, A)
        z = (w * a).sum(1)
    else:
        S, z = A.sum(1), a.sum(1)
    mult, const = cfg.state_terms()
    if mult != 1.0:
        S, z = S * mult, z * mult
    if const:
        S = S + const * vsum.sum(1)[:, None, :]
        z = z + const * cnt.sum(1)[:, None]
    return S.contiguous(), z.contiguous(), reference


def _forward(q, k, v, valid, cfg: FeatureConfig):
    B, HQ, N, d = q.shape
    HKV, dv = k.shape[1], v.shape[-1]
    m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
    S, z, key_max = _state_from_partials(*key_state(k, v, None, valid, cfg), cfg)
    o = torch.empty(B, HQ, N, dv, device=q.device, dtype=q.dtype)
    den = torch.empty(B * HQ, N, device=q.device, dtype=torch.float32)
    qmax = torch.empty(B * HQ, N, device=q.device, dtype=torch.float32)
    whi, wlo = cfg.split_weight(q)
    launch = pick_config("out", m, d, dv)
    _out_fwd[(B * HQ, triton.cdiv(N, launch["BN"]))](
        q, whi, wlo, S, z, S.sum(1), z.sum(1), o, den, qmax, *_strides(q), *_strides(o), *cfg.weight_strides(q),
        HQ, HQ // HKV, NMB, N, m, d, dv, cfg.x_scale, cfg.ratio, cfg.eps, cfg.den_eps,
        FEATURE=FEATURE_CODES[cfg.feature], STAB=cfg.stabilize, LP=cfg.low_precision(q),
        BMB=BMB, BD=BD, BDV=BDV, **launch,
    )
    return o, den, qmax, S, z, key_max


def _backward(do, q, k, v, o, den, qmax, S, z, key_max, valid, cfg: FeatureConfig):
    B, HQ, N, d = q.shape
    HKV, NK, dv = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
    LP, code = cfg.low_precision(q), FEATURE_CODES[cfg.feature]
    whi, wlo = cfg.split_weight(q)
    common = dict(FEATURE=code, LP=LP, BMB=BMB, BD=BD, BDV=BDV)
    dq = torch.empty_like(q)
    launch = pick_config("q_bwd", m, d, dv)
    _q_bwd[(B * HQ, triton.cdiv(N, launch["BN"]))](
        q, whi, wlo, S, z, o, do, den, qmax, dq,
        *_strides(q), *_strides(o), *_strides(do), *_strides(dq), *cfg.weight_strides(q),
        HQ, G, NMB, N, m, d, dv, cfg.x_scale, cfg.ratio, cfg.eps, **common, **launch,
    )
    launch = pick_config("dstate", m, d, dv)
    tokens = _splits(N, B * HQ * NMB, q.device, launch["BN"])
    P = triton.cdiv(N, tokens)
    dS_part = torch.empty(B * HQ, P, m, dv, device=q.device, dtype=torch.float32)
    dz_part = torch.empty(B * HQ, P, m, device=q.device, dtype=torch.float32)
    _dstate_bwd[(B * HQ * NMB, P)](
        q, whi, wlo, o, do, den, qmax, dS_part, dz_part,
        *_strides(q), *_strides(o), *_strides(do), *cfg.weight_strides(q),
        HQ, NMB, N, m, d, dv, tokens, cfg.x_scale, cfg.ratio, cfg.eps, **common, **launch,
    )
    dS = dS_part.view(B * HKV, G * P, m, dv).sum(1)
    dz = dz_part.view(B * HKV, G * P, m).sum(1)
    dk = torch.empty_like(k)
    dvv = torch.empty_like(v)
    valid_t, smb, smn = key_valid_arg(valid, k)
    offsets = key_max if key_max is not None else dz  # dummy pointer when unused
    launch = pick_config("kv_bwd", m, d, dv)
    _kv_bwd[(B * HKV, triton.cdiv(NK, launch["BN"]))](
        k, v, whi, wlo, valid_t, offsets, dS, dz, dk, dvv,
        *_strides(k), *_strides(v), *_strides(dk), *_strides(dvv), *cfg.weight_strides(k), smb, smn,
        HKV, NMB, NK, m, d, dv, cfg.x_scale, cfg.ratio, cfg.eps,
        USE_MAX=cfg.use_key_max, HAS_VALID=valid is not None, **common, **launch,
    )
    return dq, dk, dvv


class _FeatureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, valid, cfg):
        o, den, qmax, S, z, key_max = _forward(q, k, v, valid, cfg)
        ctx.save_for_backward(q, k, v, o, den, qmax, S, z, key_max, valid)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, qmax, S, z, key_max, valid = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, den, qmax, S, z, key_max, valid, ctx.cfg)
        return dq, dk, dv, None, None, None


def chunk_free_feature_attention(q, k, v, cfg: FeatureConfig, key_padding_mask=None):
    """Non-causal fused kernel attention → ``(B, Hq, Nq, dv)`` in q's dtype (see module doc)."""
    return _FeatureAttention.apply(q, k, v, cfg.projection, key_padding_mask, cfg)
