"""Causal kernel attention by a chunked scan, feature maps fused (elu+1, ReLU features, FAVOR+
with or without its no-look-ahead key stabiliser).

The sequence is cut into segments of whole chunks (``BC`` tokens); segments run in parallel.

Forward:
1. ``linear_attn._state_fwd`` with one split per segment: each segment's key state
   ``Σ φ(k)vᵀ`` and ``Σ φ(k)``; ``_scan_segments`` (an exclusive prefix over segments) gives
   the state at each segment's start.
2. ``_causal_fwd`` (grid: query head × segment): chunk by chunk, the masked ``C×C`` block
   ``φ(Q_c)φ(K_c)ᵀ`` for the intra-chunk part plus ``φ(Q_c)S`` for everything before, then
   ``S += φ(K_c)ᵀV_c``. Writes o and the denominators.

Backward:
3. ``_causal_dq`` (query head × segment): the same forward scan gives
   ``dφ(q_i) = Σ_{j≤i} (v_j·dnum_i + dden_i) φ(k_j)`` and dq; it also sums the segment's
   ``Σ φ(q)dnumᵀ``, ``Σ φ(q)dden`` for step 4 (``_scan_segments``: exclusive suffix sums
   over segments, summed over the query heads of a group).
4. ``_causal_dkv`` (key/value head × segment): a reverse scan with the suffix state
   ``R = Σ_{i>chunk} φ(q_i)dnum_iᵀ`` over every query head of the group gives dk and dv.

``dnum = do/den`` and ``dden = −(do·o)/den`` come from the saved output and denominators.

FAVOR+'s prefix-max stabiliser (``PMAX``): row i's key features are
``ratio·(exp(l_j − M_i) + ε)`` with ``M_i = max_{j≤i} max_l l_j`` over valid keys (``l`` the key
logits), as in ``blocks.causal_kernel_attention`` with ``causal_key_offsets``. M is treated as a
constant (no gradient). Every state is kept relative to an offset that never exceeds the
exponents it scales (``exp(l_j − M_j) ≤ 1``, ``exp(M_j − M_i) ≤ 1`` for j ≤ i) and rescaled when
the offset grows, like online softmax; the ε part is carried apart as ``Σv`` and the key count.
The forward stores M per row for the backward (4 bytes a row per key/value head).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._feature_map import (
    FEATURE_CODES,
    _apply,
    _cast_out,
    _dot,
    _dot_split,
    _dot_split_both,
    _dot_split_left,
    _input_grad,
    _load_wt,
    _logits,
    _query_features,
    _valid_keys,
)
from ._launch import FeatureConfig, Launch, PlanCache, block_sizes, key_valid_arg, layout_key, num_programs_hint, pick_config
from .linear_attn import _contiguous_strides, _strides, feature_blocks, record_size, state_launch

SUPPORTS_PREFIX_MAX = True  # FAVOR+ with the no-look-ahead key stabiliser has a fused kernel
NEG = -1.0e30  # "minus infinity" that keeps exp() and differences finite


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _scan_segments(
    src_ptr, dst_ptr, off_ptr, P, G, m, dv, rec_size, mult, const,
    REVERSE: tl.constexpr, USE_MAX: tl.constexpr, FOLD: tl.constexpr,
    BMB: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
):
    """Grid (key/value head, feature block): exclusive scans of records over the P segments.

    Forward (REVERSE False, G = 1): record (o, s) ← Σ_{p<s} of the key-state records, as
    ``mult·A + const·Σv`` (FOLD) or, with USE_MAX, relative to the running offset
    ``M_s = max_{p<s}`` of the partial offsets (stored as the record's first offset) with
    Σv and the count kept apart. Reverse: record (o, s) ← Σ_{p>s} Σ_g of the records
    ((o·G + g)·P + p) (the backward's R, r, E), relative (USE_MAX) to ``M_{s+1}`` read from the
    forward's records at ``off_ptr``, to which each segment's partials are relative.
    """
    o = tl.program_id(0)
    mb = tl.program_id(1)
    offs_m = mb * BMB + tl.arange(0, BMB)
    offs_v = tl.arange(0, BDV)
    offs_b = tl.arange(0, BM)  # every feature's offset slot
    fmask = offs_m < m
    vmask = offs_v < dv
    tile = offs_m[:, None] * dv + offs_v[None, :]
    tmask = fmask[:, None] & vmask[None, :]
    acc = tl.zeros([BMB, BDV], dtype=tl.float32)
    zacc = tl.zeros([BMB], dtype=tl.float32)
    vsum = tl.zeros([BDV], dtype=tl.float32)
    cnt = tl.zeros([BDV], dtype=tl.float32)  # the count in element 0
    if REVERSE:
        ref = tl.load(off_ptr + ((o + 1) * P - 1).to(tl.int64) * rec_size + m * dv + m + dv + 1)
    else:
        ref = tl.max(tl.full([BM], -1.0e30, dtype=tl.float32), axis=0)
    for t in range(0, P):
        if REVERSE:
            p = P - 1 - t
        else:
            p = t
        dst = dst_ptr + (o * P + p).to(tl.int64) * rec_size
        if FOLD:
            tl.store(dst + tile, mult * acc + const * vsum[None, :], mask=tmask)
            tl.store(dst + m * dv + offs_m, mult * zacc + const * tl.sum(cnt, axis=0), mask=fmask)
        else:
            tl.store(dst + tile, acc, mask=tmask)
            tl.store(dst + m * dv + offs_m, zacc, mask=fmask)
        if mb == 0:
            tl.store(dst + m * dv + m + offs_v, vsum, mask=vmask)
            tl.store(dst + m * dv + m + dv + offs_v, cnt, mask=offs_v == 0)
            if USE_MAX:
                if not REVERSE:
                    tl.store(dst + m * dv + m + dv + 1, ref)
        if REVERSE:
            if USE_MAX:
                new_ref = tl.load(off_ptr + (o * P + p).to(tl.int64) * rec_size + m * dv + m + dv + 1)
                scale = tl.exp(new_ref - ref)
                acc = acc * scale
                zacc = zacc * scale
                ref = new_ref
            for g in range(0, G):
                src = src_ptr + ((o * G + g) * P + p).to(tl.int64) * rec_size
                acc += tl.load(src + tile, mask=tmask, other=0.0)
                zacc += tl.load(src + m * dv + offs_m, mask=fmask, other=0.0)
                vsum += tl.load(src + m * dv + m + offs_v, mask=vmask, other=0.0)
        else:
            src = src_ptr + (o * P + p).to(tl.int64) * rec_size
            A = tl.load(src + tile, mask=tmask, other=0.0)
            a = tl.load(src + m * dv + offs_m, mask=fmask, other=0.0)
            if USE_MAX:  # the segment's partial state has one offset per feature
                offsets = tl.load(src + m * dv + m + dv + 1 + offs_b, mask=offs_b < m, other=-1.0e30)
                new_ref = tl.maximum(ref, tl.max(offsets, axis=0))
                scale = tl.exp(ref - new_ref)
                w = tl.exp(tl.load(src + m * dv + m + dv + 1 + offs_m, mask=fmask, other=-1.0e30) - new_ref)
                acc = acc * scale + A * w[:, None]
                zacc = zacc * scale + a * w
                ref = new_ref
            else:
                acc += A
                zacc += a
            vsum += tl.load(src + m * dv + m + offs_v, mask=vmask, other=0.0)
            cnt += tl.load(src + m * dv + m + dv + offs_v, mask=offs_v == 0, other=0.0)


@triton.jit
def _prefix_max_keys(xk, wt, xs, valid, fmask, M_run, FEATURE: tl.constexpr, LP: tl.constexpr):
    """A chunk's keys under the prefix max: logits l, ``e = exp(l − M_j)`` (zero at padded keys
    and features) and ``M_j = max(M_run, max_{j' ≤ j} max_l l_j')``."""
    lk = _logits(xk, wt, xs, FEATURE, LP)
    keep = valid[:, None] & fmask[None, :]
    row_max = tl.max(tl.where(keep, lk, -1.0e30), axis=1)
    Mk = tl.maximum(tl.associative_scan(row_max, 0, _maximum), M_run)
    ek = tl.where(keep, tl.exp(tl.minimum(lk - Mk[:, None], 0.0)), 0.0)
    return ek, Mk


@triton.jit
def _causal_fwd(
    q_ptr, k_ptr, v_ptr, w_ptr, valid_ptr, S_ptr, o_ptr, den_ptr, M_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, N, m, d, dv, seg_len, rec_size, xs, ratio, eps, den_eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, PMAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
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
    rec = S_ptr + (kv * num_seg + seg).to(tl.int64) * rec_size
    S = tl.load(rec + offs_m[:, None] * dv + offs_v[None, :], mask=fmask[:, None] & vmask[None, :], other=0.0)
    z = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
    if PMAX:  # S, z relative to M_run; the ε part from Σv and the count
        vs_run = tl.load(rec + m * dv + m + offs_v, mask=vmask, other=0.0)
        cnt_run = tl.load(rec + m * dv + m + dv)
        M_run = tl.load(rec + m * dv + m + dv + 1)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    for c0 in range(start, stop, BC):
        offs_n = c0 + offs_c
        rows = offs_n < N
        valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
        xq = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        xk = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        phiq, _ = _query_features(xq, wt, xs, ratio, eps, m, FEATURE, STAB, LP, BM)
        if PMAX:
            ek, Mk = _prefix_max_keys(xk, wt, xs, valid, fmask, M_run, FEATURE, LP)
            qsum = tl.sum(phiq, axis=1)
            decay = tl.exp(tl.minimum(Mk[None, :] - Mk[:, None], 0.0))  # exp(M_j − M_i), j ≤ i
            A = ratio * (_dot(phiq, tl.trans(ek), LP) * decay + eps * qsum[:, None])
            A = tl.where(lower & valid[None, :], A, 0.0)
            carry = tl.exp(M_run - Mk)
            num = _dot(A, vv, LP) + ratio * (_dot(phiq, S, LP) * carry[:, None]
                                             + eps * qsum[:, None] * vs_run[None, :])
            den = tl.sum(A, axis=1) + ratio * (tl.sum(phiq * z[None, :], axis=1) * carry + eps * qsum * cnt_run)
            den += den_eps
            if h % G == 0:
                tl.store(M_ptr + kv.to(tl.int64) * N + offs_n, Mk, mask=rows)
            M_new = tl.max(tl.where(rows, Mk, -1.0e30), axis=0)
            ek_new = ek * tl.exp(Mk - M_new)[:, None]
            rescale = tl.exp(M_run - M_new)
            S = S * rescale + _dot(tl.trans(ek_new), vv, LP)
            z = z * rescale + tl.sum(ek_new, axis=0)
            vs_run += tl.sum(vv.to(tl.float32), axis=0)
            cnt_run += tl.sum(valid.to(tl.float32), axis=0)
            M_run = M_new
        else:
            phik, _ = _apply(_logits(xk, wt, xs, FEATURE, LP), 0.0, ratio, eps, valid[:, None] & fmask[None, :],
                             FEATURE)
            A = tl.where(lower, _dot(phiq, tl.trans(phik), LP), 0.0)
            num = _dot(A, vv, LP) + _dot(phiq, S, LP)
            den = tl.sum(A, axis=1) + tl.sum(phiq * z[None, :], axis=1) + den_eps
            S += _dot(tl.trans(phik), vv, LP)
            z += tl.sum(phik, axis=0)
        tl.store(o_base + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                 _cast_out(num / den[:, None], o_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])
        tl.store(den_ptr + pid_bh.to(tl.int64) * N + offs_n, den, mask=rows)


@triton.jit
def _causal_dq(
    q_ptr, k_ptr, v_ptr, w_ptr, valid_ptr, S_ptr, o_ptr, do_ptr, den_ptr, M_ptr, dq_ptr, R_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, N, m, d, dv, seg_len, rec_size, xs, ratio, eps, den_eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, PMAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, EXACT: tl.constexpr = False,
):
    """dq by the forward scan, and the segment's record ``R = Σ φ(q)dnumᵀ``, ``r = Σ φ(q)dden``
    (PMAX: scaled by ``exp(M_seg − M_i)``) and ``E = Σ (Σ_l φ(q)_l)·dnum`` (PMAX's ε part).

    EXACT (without PMAX): ``do·o`` and the denominators recomputed from the fp32 features, and the
    features' dots split into bf16 halves, instead of the stored (rounded) o and half-precision
    feature operands. dφ's two terms nearly cancel on nearly uniform rows (small keys), where elu+1
    features sit near 1 and bf16 keeps ~2⁻⁸ of their deviation: measured under the interpreter,
    bf16 dq 1.5e-2 → 7e-5 (``CAUSAL_DQ``)."""
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
    rec = S_ptr + (kv * num_seg + seg).to(tl.int64) * rec_size
    S = tl.load(rec + offs_m[:, None] * dv + offs_v[None, :], mask=fmask[:, None] & vmask[None, :], other=0.0)
    z = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
    if PMAX:
        vs_run = tl.load(rec + m * dv + m + offs_v, mask=vmask, other=0.0)
        cnt_run = tl.load(rec + m * dv + m + dv)
        M_run = tl.load(rec + m * dv + m + dv + 1)
        M_seg = M_run
    R = tl.zeros([BM, BDV], dtype=tl.float32)
    r = tl.zeros([BM], dtype=tl.float32)
    E = tl.zeros([BDV], dtype=tl.float32)
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
        valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
        xq = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        xk = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        do_raw = tl.load(g_base + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                         mask=rows[:, None] & vmask[None, :], other=0.0)
        do = do_raw.to(tl.float32)
        phiq, fq = _query_features(xq, wt, xs, ratio, eps, m, FEATURE, STAB, LP, BM)
        do_v = _dot(do_raw, tl.trans(vv), LP)  # products of half inputs: exact in fp32
        do_S = _dot_split(do_raw, tl.trans(S), LP, True)
        if EXACT:  # do·o and the denominators from the fp32 features, not the stored o and den
            phik, _ = _apply(_logits(xk, wt, xs, FEATURE, LP), 0.0, ratio, eps, valid[:, None] & fmask[None, :],
                             FEATURE)
            A = tl.where(lower, _dot_split_both(phiq, tl.trans(phik)), 0.0)
            den = tl.sum(A, axis=1) + tl.sum(phiq * z[None, :], axis=1) + den_eps
            do_o = (tl.sum(A * do_v, axis=1) + tl.sum(phiq * do_S, axis=1)) / den
        else:
            o = tl.load(o_base + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                        mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            den = tl.load(den_ptr + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
            do_o = tl.sum(do * o, axis=1)
        dnum = do / den[:, None]
        dden = -do_o / den
        # (v_j − o_i)·do_i / den_i, formed from exact products before the cancellation
        Bm = tl.where(lower & valid[None, :], (do_v - do_o[:, None]) / den[:, None], 0.0)
        carried = do_S - do_o[:, None] * z[None, :]
        if PMAX:
            # rows past N read M = +1e30: every factor exp(· − M_i) of theirs is 0
            Mk = tl.load(M_ptr + kv.to(tl.int64) * N + offs_n, mask=rows, other=1.0e30)
            keep = valid[:, None] & fmask[None, :]
            ek = tl.where(keep, tl.exp(tl.minimum(_logits(xk, wt, xs, FEATURE, LP) - Mk[:, None], 0.0)), 0.0)
            decay = tl.exp(tl.minimum(Mk[None, :] - Mk[:, None], 0.0))
            carry = tl.exp(M_run - Mk)
            eps_part = tl.sum(Bm, axis=1) + (tl.sum(do * vs_run[None, :], axis=1) - do_o * cnt_run) / den
            dphi = ratio * (_dot(Bm * decay, ek, LP) + carried * (carry / den)[:, None] + eps * eps_part[:, None])
            qscale = tl.exp(M_seg - Mk)
            R += _dot(tl.trans(phiq * qscale[:, None]), dnum, LP)
            r += tl.sum(phiq * (qscale * dden)[:, None], axis=0)
            E += tl.sum(tl.sum(phiq, axis=1)[:, None] * dnum, axis=0)
            M_new = tl.maximum(M_run, tl.max(tl.where(rows, Mk, -1.0e30), axis=0))
            ek_new = ek * tl.exp(tl.minimum(Mk - M_new, 0.0))[:, None]
            rescale = tl.exp(M_run - M_new)
            S = S * rescale + _dot(tl.trans(ek_new), vv, LP)
            z = z * rescale + tl.sum(ek_new, axis=0)
            vs_run += tl.sum(vv.to(tl.float32), axis=0)
            cnt_run += tl.sum(valid.to(tl.float32), axis=0)
            M_run = M_new
        else:
            if EXACT:  # the feature dots split into bf16 halves (elu+1 features sit near 1)
                dphi = _dot_split_both(Bm, phik) + carried / den[:, None]
                S += _dot_split_left(tl.trans(phik), vv)
            else:
                phik, _ = _apply(_logits(xk, wt, xs, FEATURE, LP), 0.0, ratio, eps, valid[:, None] & fmask[None, :],
                                 FEATURE)
                dphi = _dot(Bm, phik, LP) + carried / den[:, None]
                S += _dot(tl.trans(phik), vv, LP)
            R += _dot(tl.trans(phiq), dnum, LP)
            r += tl.sum(phiq * dden[:, None], axis=0)
            z += tl.sum(phik, axis=0)
        dx = _input_grad(xq, dphi * fq, wt, xs, FEATURE, LP)
        tl.store(dq_base + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                 _cast_out(dx, dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
    out = R_ptr + (pid_bh * num_seg + seg).to(tl.int64) * rec_size
    tl.store(out + offs_m[:, None] * dv + offs_v[None, :], R, mask=fmask[:, None] & vmask[None, :])
    tl.store(out + m * dv + offs_m, r, mask=fmask)
    tl.store(out + m * dv + m + offs_v, E, mask=vmask)


@triton.jit
def _causal_dkv(
    q_ptr, k_ptr, v_ptr, w_ptr, valid_ptr, R_ptr, S_ptr, o_ptr, do_ptr, den_ptr, M_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, G, N, m, d, dv, seg_len, rec_size, xs, ratio, eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, PMAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """dk, dv by a reverse scan from the suffix record R (PMAX: relative to the M after the
    chunk being processed, so ``exp(M_j − ref) ≤ 1`` for its keys)."""
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
    rec = R_ptr + state * rec_size
    R = tl.load(rec + offs_m[:, None] * dv + offs_v[None, :], mask=fmask[:, None] & vmask[None, :], other=0.0)
    r = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    if PMAX:
        E = tl.load(rec + m * dv + m + offs_v, mask=vmask, other=0.0)
        M_row = M_ptr + pid_bh.to(tl.int64) * N
        M_seg = tl.load(S_ptr + state * rec_size + m * dv + m + dv + 1)  # M before the segment
        ref = tl.load(M_row + stop - 1)  # M after the segment: R's offset
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dk_base = dk_ptr + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    dv_base = dv_ptr + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    num_chunks = tl.cdiv(stop - start, BC)
    for t in range(0, num_chunks):
        c0 = start + (num_chunks - 1 - t) * BC
        offs_n = c0 + offs_c
        rows = offs_n < N
        valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
        xk = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=rows[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        if PMAX:
            Mk = tl.load(M_row + offs_n, mask=rows, other=1.0e30)
            keep = valid[:, None] & fmask[None, :]
            lk = _logits(xk, wt, xs, FEATURE, LP)
            ek = tl.where(keep, tl.exp(tl.minimum(lk - Mk[:, None], 0.0)), 0.0)
            ek_ref = ek * tl.exp(tl.minimum(Mk - ref, 0.0))[:, None]
            dl = ek_ref * (_dot_split(vv, tl.trans(R), LP, True) + r[None, :])  # ∂L/∂l, × ratio at the end
            dvv = _dot(ek_ref, R, LP) + eps * E[None, :]
            # R, r to the offset before this chunk (≤ every M_i of its queries)
            prev = tl.load(M_row + c0 - 1, mask=c0 > start, other=0.0)
            prev = tl.where(c0 > start, prev, M_seg)
            shrink = tl.exp(prev - ref)
            R = R * shrink
            r = r * shrink
            ref = prev
        else:
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
            Bt = tl.where(upper & valid[:, None], (_dot(vv, tl.trans(do_raw), LP) - do_o[None, :]) / den[None, :], 0.0)
            if PMAX:
                decay = tl.exp(tl.minimum(Mk[:, None] - Mk[None, :], 0.0))  # [j, i]: exp(M_j − M_i)
                qsum = tl.sum(phiq, axis=1)
                P = tl.where(upper & valid[:, None], _dot(ek, tl.trans(phiq), LP) * decay + eps * qsum[None, :], 0.0)
                dvv += _dot(P, dnum, LP)
                dl += ek * _dot(Bt * decay, phiq, LP)
                qscale = tl.exp(ref - Mk)
                R += _dot(tl.trans(phiq * qscale[:, None]), dnum, LP)
                r += tl.sum(phiq * (qscale * dden)[:, None], axis=0)
                E += tl.sum(qsum[:, None] * dnum, axis=0)
            else:
                P = tl.where(upper, _dot(phik, tl.trans(phiq), LP), 0.0)
                dvv += _dot(P, dnum, LP)
                dphik += _dot(Bt, phiq, LP)
                R += _dot(tl.trans(phiq), dnum, LP)
                r += tl.sum(phiq * dden[:, None], axis=0)
        if PMAX:
            dx = _input_grad(xk, ratio * dl, wt, xs, FEATURE, LP)
            dvv = ratio * dvv
        else:
            dx = _input_grad(xk, dphik * fk, wt, xs, FEATURE, LP)
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 _cast_out(dx, dk_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
        dvv = tl.where(valid[:, None], dvv, 0.0)
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvd,
                 _cast_out(dvv, dv_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- host side


def scan_launch(kv_heads: int, P: int, m: int, dv: int, BMB: int, BDV: int, *, reverse: bool, use_max: bool,
                groups: int = 1, mult: float = 1.0, const: float = 0.0, device) -> Launch:
    """``_scan_segments`` over ``kv_heads`` × P segment records ``(source, destination, offsets)``: forward,
    the state at each segment's start (use_max: relative to the running offset; otherwise folded as
    ``mult·A + const·Σv``); reverse, the suffix sums over ``groups`` query heads' records."""
    return Launch(
        _scan_segments, (kv_heads, triton.cdiv(m, BMB)), (P, groups, m, dv, record_size(m, dv), float(mult),
                                                          float(const)),
        dict(REVERSE=reverse, USE_MAX=use_max, FOLD=not reverse and not use_max, BMB=BMB, BDV=BDV,
             BM=max(16, triton.next_power_of_2(m))), device,
    )


def segment_length(n: int, programs: int, device: torch.device, chunk: int) -> int:
    """Tokens per segment: whole chunks, enough segments to fill the device."""
    segments = max(1, min(triton.cdiv(n, chunk), num_programs_hint(device) // max(1, programs)))
    return triton.cdiv(triton.cdiv(n, segments), chunk) * chunk


class _Plan:
    """The launches of one layout and feature map (forward; backward once ``do``'s layout is known)."""

    def __init__(self, q, k, v, valid, cfg: FeatureConfig):
        B, HQ, N, d = q.shape
        HKV, dv = k.shape[1], v.shape[-1]
        m = cfg.features(d)
        BM, BD, BDV = block_sizes(m, d, dv)
        _, BMB, NMB, _, _ = feature_blocks(cfg, d, dv)
        launch = pick_config("causal_fwd", m, d, dv)
        BC = launch.pop("BN")
        self.seg_len = segment_length(N, B * HQ, q.device, BC)
        self.state, P = state_launch(k, v, valid, cfg, tokens=self.seg_len)
        self.rec = record_size(m, dv)
        self.pmax = cfg.use_key_max
        mult, const = cfg.state_terms()
        self.scan = scan_launch(B * HKV, P, m, dv, BMB, BDV, reverse=False, use_max=self.pmax, mult=mult,
                                const=const, device=q.device)
        self.records = B * HKV * P * self.rec
        self.q_records = B * HQ * P * self.rec
        self.o_shape = (B, HQ, N, dv)
        self.rows, self.kv_rows = B * HQ * N, (B * HKV * N if self.pmax else 1)
        _, smb, smn = key_valid_arg(valid, k)
        self.mask_strides = (smb, smn)
        self.w_strides = cfg.weight_strides(q)
        self.sizes = (B, HQ, HKV, N, d, dv, m, P, NMB, BMB, BDV)
        self.meta = dict(FEATURE=FEATURE_CODES[cfg.feature], STAB=cfg.stabilize, PMAX=self.pmax,
                         HAS_VALID=valid is not None, LP=cfg.low_precision(q), BC=BC, BM=BM, BD=BD, BDV=BDV,
                         **launch)
        self.fwd = Launch(
            _causal_fwd, (B * HQ, P),
            (*_strides(q), *_strides(k), *_strides(v), *_contiguous_strides(*self.o_shape), *self.w_strides,
             smb, smn, HQ, HQ // HKV, N, m, d, dv, self.seg_len, self.rec, cfg.x_scale, cfg.ratio, cfg.eps,
             cfg.den_eps),
            self.meta, q.device,
        )
        self.backward_plans = PlanCache()

    def backward(self, do, q, k, v, cfg: FeatureConfig) -> "_BackwardPlan":
        key = layout_key(do)
        return self.backward_plans.get(key) or self.backward_plans.add(key, _BackwardPlan(self, do, q, k, v, cfg))


# The segment scan's dq with half inputs: "exact" (the default: ``_causal_dq``'s EXACT, fp32 do·o and denominators,
# split feature dots) or "fast" (do·o from the stored o, half feature operands). Under the interpreter (which takes
# split dots as exact fp32 ones), bf16 elu+1, 512 tokens, against the fp32 reference: dq 1.5e-2 fast, 7e-5 exact with
# keys and values x 0.25 (nearly uniform rows); 6.3e-3 and 3e-5 at unit scale. Its cost on an H100 (2026-12-07,
# same call, B=1 H=16 d=64 bf16 fwd+bwd): 2.33 -> 2.38 ms at N = 65,536 (+2 %), 0.401 -> 0.406 ms at 4,096
# (benchmarks/results/h100/NOTES.md, session 22).
CAUSAL_DQ = os.environ.get("APPROXATTN_CAUSAL_DQ", "exact")
if CAUSAL_DQ not in ("fast", "exact"):
    raise ValueError(f"APPROXATTN_CAUSAL_DQ: expected 'fast' or 'exact', got {CAUSAL_DQ!r}")


class _BackwardPlan:
    def __init__(self, plan: _Plan, do, q, k, v, cfg: FeatureConfig):
        B, HQ, HKV, N, d, dv, m, P, NMB, BMB, BDV = plan.sizes
        G = HQ // HKV
        o_strides = _contiguous_strides(*plan.o_shape)
        exact = CAUSAL_DQ == "exact" and not plan.pmax and plan.meta["LP"]
        self.dq = Launch(
            _causal_dq, (B * HQ, P),
            (*_strides(q), *_strides(k), *_strides(v), *o_strides, *_strides(do), *_contiguous_strides(*q.shape),
             *plan.w_strides, *plan.mask_strides, HQ, G, N, m, d, dv, plan.seg_len, plan.rec, cfg.x_scale,
             cfg.ratio, cfg.eps, cfg.den_eps),
            dict(plan.meta, EXACT=exact), q.device,
        )
        self.scan = scan_launch(B * HKV, P, m, dv, BMB, BDV, reverse=True, use_max=plan.pmax, groups=G,
                                device=q.device)
        self.dkv = Launch(
            _causal_dkv, (B * HKV, P),
            (*_strides(q), *_strides(k), *_strides(v), *o_strides, *_strides(do), *_contiguous_strides(*k.shape),
             *_contiguous_strides(*v.shape), *plan.w_strides, *plan.mask_strides, HKV, G, N, m, d, dv,
             plan.seg_len, plan.rec, cfg.x_scale, cfg.ratio, cfg.eps),
            plan.meta, q.device,
        )


_PLANS = PlanCache()


def _forward(q, k, v, valid, cfg: FeatureConfig):
    key = (layout_key(q, k, v, valid, cfg.projection), cfg.key(q.shape[-1]))
    plan = _PLANS.get(key) or _PLANS.add(key, _Plan(q, k, v, valid, cfg))
    w = cfg.weight(q)
    whi, wlo = cfg.split_weight(k)
    mask = key_valid_arg(valid, k)[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    parts = torch.empty(plan.records, **f32)
    plan.state(k, v, whi, wlo, mask, parts)
    S = torch.empty(plan.records, **f32)
    plan.scan(parts, S, S)
    o = torch.empty(plan.o_shape, device=q.device, dtype=q.dtype)
    den = torch.empty(plan.rows, **f32)
    M = torch.empty(plan.kv_rows, **f32)  # FAVOR's prefix max per key row (prefix-max stabiliser only)
    plan.fwd(q, k, v, w, mask, S, o, den, M)
    return o, den, M, S, plan


def _backward(do, q, k, v, o, den, M, S, valid, plan: _Plan, cfg: FeatureConfig):
    bplan = plan.backward(do, q, k, v, cfg)
    w = cfg.weight(q)
    mask = key_valid_arg(valid, k)[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    R_parts = torch.empty(plan.q_records, **f32)
    bplan.dq(q, k, v, w, mask, S, o, do, den, M, dq, R_parts)
    R = torch.empty(plan.records, **f32)
    bplan.scan(R_parts, R, S)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    bplan.dkv(q, k, v, w, mask, R, S, o, do, den, M, dk, dv)
    return dq, dk, dv


class _CausalFeatureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, valid, cfg):
        o, den, M, S, plan = _forward(q, k, v, valid, cfg)
        ctx.save_for_backward(q, k, v, o, den, M, S, valid)
        ctx.cfg, ctx.plan = cfg, plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, M, S, valid = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, den, M, S, valid, ctx.plan, ctx.cfg)
        return dq, dk, dv, None, None, None


def causal_feature_attention(q, k, v, cfg: FeatureConfig, key_padding_mask=None):
    """Causal fused kernel attention → ``(B, Hq, N, dv)`` in q's dtype (see module doc)."""
    return _CausalFeatureAttention.apply(q, k, v, cfg.projection, key_padding_mask, cfg)
