"""Causal kernel attention, chunk-parallel: the state before every chunk of ``BT`` tokens is written
to memory once, then each chunk is its own program, walking the m features in blocks of ``BMB``
(the layout of fla's ``chunk_linear_attn``, with the feature maps computed in registers).

Why beside the segment scan (``causal_linear_attn``): there one program holds a whole m×dv state
(two in the query backward) and walks its chunks one after another; at m = 256 those states no
longer fit in registers (H100, N = 65,536, ReLU m = 256: dq 5.0 ms, dk/dv 9.1 ms of a 17 ms
fwd+bwd). Here no program holds more than a ``BMB×dv`` block of a state.

Covers the feature maps without FAVOR's prefix-max key stabiliser (elu+1, ReLU, FAVOR+ with
``stabilize=False``): their features are elementwise per feature, so every sum splits over
feature blocks.

Forward:

1. ``linear_attn._state_fwd`` per segment and ``_scan_segments``: the state at each segment's start.
2. ``_chunk_states`` (grid: key/value head × feature block, segment): walks its segment's chunks and
   stores ``H[c] = Σ_{j < c·BT} φ(k_j)v_jᵀ`` (bf16 for half inputs, fp32 otherwise) and
   ``Z[c] = Σ_{j < c·BT} φ(k_j)`` (fp32).
3. ``_chunk_out`` (grid: query head, chunk): ``o = (φ(Q)H[c] + M∘(φ(Q)φ(K)ᵀ)V) / den`` with
   ``den = φ(Q)Z[c] + rowsum(M∘φ(Q)φ(K)ᵀ) + den_eps``, M the causal mask of the chunk.

Backward (H is recomputed, not kept from the forward: it is as large as an N×m bf16 tensor):

4. ``_chunk_states`` again, then ``_chunk_dq`` (grid: query head, chunk):
   ``dφ(q_i) = Σ_{j ≤ i in chunk} B_ij φ(k_j) + (do_i H[c]ᵀ − (do_i·o_i) Z[c]) / den_i`` with
   ``B_ij = (do_i·v_j − do_i·o_i) / den_i`` formed from exact products before the cancellation.
5. ``linear_attn._dstate_bwd`` per segment and a reverse ``_scan_segments`` summed over the group's
   query heads: the suffix state after each segment; ``_chunk_dstates`` (grid: key/value head ×
   feature block, segment) stores ``dH[c] = Σ_{i ≥ (c+1)·BT} Σ_g φ(q_i) dnum_iᵀ`` and
   ``dZ[c] = Σ φ(q_i) dden_i`` (``dnum = do/den``, ``dden = −(do·o)/den``).
6. ``_chunk_dkv`` (grid: key/value head, chunk): ``dφ(k_j) = v_j dH[c]ᵀ + dZ[c] + Σ_g Σ_{i ≥ j} B_ij φ(q_i)``
   and ``dv_j = φ(k_j) dH[c] + Σ_g Σ_{i ≥ j} (φ(q_i)·φ(k_j)) dnum_i``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._feature_map import (
    FEATURE_CODES,
    _add_input_grad_blk,
    _apply,
    _cast_out,
    _dot,
    _finish_input_grad,
    _load_w_blk,
    _load_w_rows,
    _logits_blk,
    _logits_blk_t,
)
from ._launch import FeatureConfig, Launch, PlanCache, key_valid_arg, layout_key, pick_config
from .causal_linear_attn import _scan_segments, segment_length
from .linear_attn import (
    FEATURE_BLOCK,
    _contiguous_strides,
    _dstate_bwd,
    _strides,
    feature_blocks,
    record_size,
    state_launch,
    weight_strides,
)


@triton.jit
def _chunk_states(
    k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, S_ptr, H_ptr, Z_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, NMB, N, m, d, dv, seg_len, rec_size, xs, ratio, eps,
    FEATURE: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head × feature block, segment): from the segment's start state (``S``,
    the scanned records), store the state before each of its chunks, then add the chunk's keys
    (feature-major ``(BMB, BT)`` tiles, as ``linear_attn._state_fwd``)."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    num_seg = tl.num_programs(1)
    kv = pid // NMB
    mb = pid % NMB
    b = kv // HKV
    h = kv % HKV
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_t = tl.arange(0, BT)
    offs_m = mb * BMB + tl.arange(0, BMB)
    fmask = offs_m < m
    vmask = offs_v < dv
    tile = offs_m[:, None] * dv + offs_v[None, :]
    tmask = fmask[:, None] & vmask[None, :]
    whi, wlo = _load_w_rows(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
    rec = S_ptr + (kv * num_seg + seg).to(tl.int64) * rec_size
    S = tl.load(rec + tile, mask=tmask, other=0.0)
    z = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    NC = tl.cdiv(N, BT)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    for n0 in range(start, stop, BT):
        state = (kv * NC + n0 // BT).to(tl.int64)
        tl.store(H_ptr + state * m * dv + tile, _cast_out(S, H_ptr.dtype.element_ty), mask=tmask)
        tl.store(Z_ptr + state * m + offs_m, z, mask=fmask)
        offs_n = n0 + offs_t
        valid = offs_n < N
        if HAS_VALID:
            valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=valid, other=0) != 0)
        xt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < d), other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        phi, _ = _apply(_logits_blk_t(xt, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps,
                        fmask[:, None] & valid[None, :], FEATURE)
        S += _dot(phi, vv, LP)
        z += tl.sum(phi, axis=1)


@triton.jit
def _chunk_out(
    q_ptr, k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, H_ptr, Z_ptr, o_ptr, den_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, NMB, N, m, d, dv, xs, ratio, eps, den_eps,
    FEATURE: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head, chunk): the chunk's outputs and denominators (kept for the backward)."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    kv = b * (HQ // G) + hk
    offs_t = tl.arange(0, BT)
    offs_n = c * BT + offs_t
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    rows = offs_n < N
    dmask = offs_d < d
    vmask = offs_v < dv
    valid = rows
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=rows, other=0) != 0)
    xq = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                 + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                 mask=rows[:, None] & dmask[None, :], other=0.0)
    xk = tl.load(k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                 + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 mask=rows[:, None] & dmask[None, :], other=0.0)
    vv = tl.load(v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                 + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                 mask=valid[:, None] & vmask[None, :], other=0.0)
    state = (kv * tl.num_programs(1) + c).to(tl.int64)
    A = tl.zeros([BT, BT], dtype=tl.float32)
    num = tl.zeros([BT, BDV], dtype=tl.float32)
    den = tl.zeros([BT], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        phiq, _ = _apply(_logits_blk(xq, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps, fmask[None, :], FEATURE)
        phik, _ = _apply(_logits_blk(xk, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps,
                         valid[:, None] & fmask[None, :], FEATURE)
        A += _dot(phiq, tl.trans(phik), LP)
        Hb = tl.load(H_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                     mask=fmask[:, None] & vmask[None, :], other=0.0)
        zb = tl.load(Z_ptr + state * m + offs_m, mask=fmask, other=0.0)
        num += _dot(phiq, Hb, LP)
        den += tl.sum(phiq * zb[None, :], axis=1)
    A = tl.where(offs_t[:, None] >= offs_t[None, :], A, 0.0)
    num += _dot(A, vv, LP)
    den += tl.sum(A, axis=1) + den_eps
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
             _cast_out(num / den[:, None], o_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])
    tl.store(den_ptr + pid_bh.to(tl.int64) * N + offs_n, den, mask=rows)


@triton.jit
def _chunk_dq(
    q_ptr, k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, H_ptr, Z_ptr, o_ptr, do_ptr, den_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, NMB, N, m, d, dv, xs, ratio, eps,
    FEATURE: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head, chunk): dq from the chunk's keys and the state before it."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    kv = b * (HQ // G) + hk
    offs_t = tl.arange(0, BT)
    offs_n = c * BT + offs_t
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    rows = offs_n < N
    dmask = offs_d < d
    vmask = offs_v < dv
    valid = rows
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=rows, other=0) != 0)
    xq = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                 + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                 mask=rows[:, None] & dmask[None, :], other=0.0)
    xk = tl.load(k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                 + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 mask=rows[:, None] & dmask[None, :], other=0.0)
    vv = tl.load(v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                 + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                 mask=valid[:, None] & vmask[None, :], other=0.0)
    o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
    do_raw = tl.load(do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                     + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                     mask=rows[:, None] & vmask[None, :], other=0.0)
    inv = 1.0 / tl.load(den_ptr + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
    do_o = tl.sum(do_raw.to(tl.float32) * o, axis=1)
    Bm = tl.where((offs_t[:, None] >= offs_t[None, :]) & valid[None, :],
                  (_dot(do_raw, tl.trans(vv), LP) - do_o[:, None]) * inv[:, None], 0.0)
    state = (kv * tl.num_programs(1) + c).to(tl.int64)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    dl_sum = tl.zeros([BT], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        phiq, fq = _apply(_logits_blk(xq, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps, fmask[None, :], FEATURE)
        phik, _ = _apply(_logits_blk(xk, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps,
                         valid[:, None] & fmask[None, :], FEATURE)
        Hb = tl.load(H_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                     mask=fmask[:, None] & vmask[None, :], other=0.0)
        zb = tl.load(Z_ptr + state * m + offs_m, mask=fmask, other=0.0)
        carried = (_dot(do_raw, tl.trans(Hb), LP) - do_o[:, None] * zb[None, :]) * inv[:, None]
        dphi = _dot(Bm, phik, LP) + carried
        dx, dl_sum = _add_input_grad_blk(dx, dl_sum, dphi * fq, whi, FEATURE, LP)
    dx = _finish_input_grad(dx, dl_sum, xq, xs, FEATURE)
    tl.store(dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             _cast_out(dx, dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])


@triton.jit
def _chunk_dstates(
    q_ptr, whi_ptr, wlo_ptr, o_ptr, do_ptr, den_ptr, R_ptr, dH_ptr, dZ_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_wm, stride_wd,
    HKV, G, NMB, N, m, d, dv, seg_len, rec_size, xs, ratio, eps,
    FEATURE: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head × feature block, segment): from the suffix state after the segment
    (``R``, the reverse-scanned records), walk its chunks backwards storing the state after
    each, then add the chunk's queries of every head of the group."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    num_seg = tl.num_programs(1)
    kv = pid // NMB
    mb = pid % NMB
    b = kv // HKV
    hk = kv % HKV
    HQ = HKV * G
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_t = tl.arange(0, BT)
    offs_m = mb * BMB + tl.arange(0, BMB)
    fmask = offs_m < m
    vmask = offs_v < dv
    tile = offs_m[:, None] * dv + offs_v[None, :]
    tmask = fmask[:, None] & vmask[None, :]
    whi, wlo = _load_w_rows(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
    rec = R_ptr + (kv * num_seg + seg).to(tl.int64) * rec_size
    R = tl.load(rec + tile, mask=tmask, other=0.0)
    r = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
    NC = tl.cdiv(N, BT)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    num_chunks = tl.cdiv(stop - start, BT)
    for t in range(0, num_chunks):
        n0 = start + (num_chunks - 1 - t) * BT
        state = (kv * NC + n0 // BT).to(tl.int64)
        tl.store(dH_ptr + state * m * dv + tile, _cast_out(R, dH_ptr.dtype.element_ty), mask=tmask)
        tl.store(dZ_ptr + state * m + offs_m, r, mask=fmask)
        offs_n = n0 + offs_t
        rows = offs_n < N
        for g in range(0, G):
            h = hk * G + g
            xt = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                         + offs_n[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                         mask=rows[None, :] & (offs_d[:, None] < d), other=0.0)
            o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                        + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                        mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            do = tl.load(do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                         + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                         mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            inv = 1.0 / tl.load(den_ptr + (b * HQ + h).to(tl.int64) * N + offs_n, mask=rows, other=1.0)
            phi, _ = _apply(_logits_blk_t(xt, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps,
                            fmask[:, None] & rows[None, :], FEATURE)
            R += _dot(phi, do * inv[:, None], LP)
            r += tl.sum(phi * (-tl.sum(do * o, axis=1) * inv)[None, :], axis=1)


@triton.jit
def _chunk_dkv(
    q_ptr, k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, dH_ptr, dZ_ptr, o_ptr, do_ptr, den_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, G, NMB, N, m, d, dv, xs, ratio, eps,
    FEATURE: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head, chunk): dk and dv from the chunk's queries of every head of the
    group and the suffix state after the chunk. Tiles indexed ``[key j, query i]``."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    HQ = HKV * G
    offs_t = tl.arange(0, BT)
    offs_n = c * BT + offs_t
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    rows = offs_n < N
    dmask = offs_d < d
    vmask = offs_v < dv
    upper = offs_t[:, None] <= offs_t[None, :]  # query i at or after key j
    valid = rows
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + b * stride_mb + offs_n * stride_mn, mask=rows, other=0) != 0)
    xk = tl.load(k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                 + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 mask=rows[:, None] & dmask[None, :], other=0.0)
    vv = tl.load(v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                 + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                 mask=valid[:, None] & vmask[None, :], other=0.0)
    state = (pid_bh * tl.num_programs(1) + c).to(tl.int64)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    dl_sum = tl.zeros([BT], dtype=tl.float32)
    dvv = tl.zeros([BT, BDV], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        phik, fk = _apply(_logits_blk(xk, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps,
                          valid[:, None] & fmask[None, :], FEATURE)
        dHb = tl.load(dH_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                      mask=fmask[:, None] & vmask[None, :], other=0.0)
        dzb = tl.load(dZ_ptr + state * m + offs_m, mask=fmask, other=0.0)
        dphik = _dot(vv, tl.trans(dHb), LP) + dzb[None, :]
        dvv += _dot(phik, dHb, LP)
        for g in range(0, G):
            h = hk * G + g
            xq = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                         + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                         mask=rows[:, None] & dmask[None, :], other=0.0)
            o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                        + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                        mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            do_raw = tl.load(do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                             + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                             mask=rows[:, None] & vmask[None, :], other=0.0)
            do = do_raw.to(tl.float32)
            inv = 1.0 / tl.load(den_ptr + (b * HQ + h).to(tl.int64) * N + offs_n, mask=rows, other=1.0)
            do_o = tl.sum(do * o, axis=1)
            phiq, _ = _apply(_logits_blk(xq, whi, wlo, xs, FEATURE, LP), 0.0, ratio, eps, fmask[None, :], FEATURE)
            Bt = tl.where(upper & valid[:, None], (_dot(vv, tl.trans(do_raw), LP) - do_o[None, :]) * inv[None, :], 0.0)
            P = tl.where(upper, _dot(phik, tl.trans(phiq), LP), 0.0)
            dvv += _dot(P, do * inv[:, None], LP)
            dphik += _dot(Bt, phiq, LP)
        dx, dl_sum = _add_input_grad_blk(dx, dl_sum, dphik * fk, whi, FEATURE, LP)
    dx = _finish_input_grad(dx, dl_sum, xk, xs, FEATURE)
    tl.store(dk_ptr + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _cast_out(dx, dk_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
    dvv = tl.where(valid[:, None], dvv, 0.0)
    tl.store(dv_ptr + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvd,
             _cast_out(dvv, dv_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- host side


def _options(kind: str, m: int, d: int, dv: int) -> dict[str, int]:
    """A kernel's launch options (num_warps, num_stages); the chunk length comes from ``chunk``."""
    launch = pick_config(kind, m, d, dv)
    launch.pop("BN")
    return launch


class _Plan:
    """The launches of one layout and feature map (forward; backward once ``do``'s layout is known)."""

    def __init__(self, q, k, v, valid, cfg: FeatureConfig):
        B, HQ, N, d = q.shape
        HKV, dv = k.shape[1], v.shape[-1]
        m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
        BT = pick_config("chunk", m, d, dv)["BN"]
        self.seg_len = segment_length(N, B * HKV * NMB, q.device, BT)
        self.state, P = state_launch(k, v, valid, cfg, tokens=self.seg_len)
        rec = record_size(m, dv)
        mult, const = cfg.state_terms()
        self.scan = Launch(
            _scan_segments, (B * HKV, NMB), (P, 1, m, dv, rec, float(mult), float(const)),
            dict(REVERSE=False, USE_MAX=False, FOLD=True, BMB=BMB, BDV=BDV, BM=max(16, triton.next_power_of_2(m))),
            q.device,
        )
        NC = triton.cdiv(N, BT)
        self.records = B * HKV * P * rec
        self.h_size, self.z_size = B * HKV * NC * m * dv, B * HKV * NC * m
        # bf16 for both half dtypes: a state sums up to N products and may pass fp16's range
        self.h_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
        self.o_shape, self.rows = (B, HQ, N, dv), B * HQ * N
        _, smb, smn = key_valid_arg(valid, k)
        self.mask_strides = (smb, smn)
        self.w_strides = weight_strides(cfg, d)
        self.sizes = (B, HQ, HKV, N, d, dv, m, P, NC, NMB, BMB, BDV)
        self.meta = dict(FEATURE=FEATURE_CODES[cfg.feature], HAS_VALID=valid is not None, LP=cfg.low_precision(q),
                         BT=BT, BMB=BMB, BD=BD, BDV=BDV)
        self.states = Launch(
            _chunk_states, (B * HKV * NMB, P),
            (*_strides(k), *_strides(v), *self.w_strides, smb, smn, HKV, NMB, N, m, d, dv, self.seg_len, rec,
             cfg.x_scale, cfg.ratio, cfg.eps),
            dict(self.meta, **_options("chunk_states", m, d, dv)), q.device,
        )
        self.out = Launch(
            _chunk_out, (B * HQ, NC),
            (*_strides(q), *_strides(k), *_strides(v), *_contiguous_strides(*self.o_shape), *self.w_strides,
             smb, smn, HQ, HQ // HKV, NMB, N, m, d, dv, cfg.x_scale, cfg.ratio, cfg.eps, cfg.den_eps),
            dict(self.meta, **_options("chunk_out", m, d, dv)), q.device,
        )
        self.backward_plans = PlanCache()

    def chunk_states(self, k, v, whi, wlo, mask, S):
        """H, Z: the state before every chunk (from the scanned segment records S)."""
        H = torch.empty(self.h_size, device=k.device, dtype=self.h_dtype)
        Z = torch.empty(self.z_size, device=k.device, dtype=torch.float32)
        self.states(k, v, whi, wlo, mask, S, H, Z)
        return H, Z

    def backward(self, do, q, k, v, cfg: FeatureConfig) -> "_BackwardPlan":
        key = layout_key(do)
        return self.backward_plans.get(key) or self.backward_plans.add(key, _BackwardPlan(self, do, q, k, v, cfg))


class _BackwardPlan:
    def __init__(self, plan: _Plan, do, q, k, v, cfg: FeatureConfig):
        B, HQ, HKV, N, d, dv, m, P, NC, NMB, BMB, BDV = plan.sizes
        G = HQ // HKV
        rec = record_size(m, dv)
        o_strides = _contiguous_strides(*plan.o_shape)
        consts = (cfg.x_scale, cfg.ratio, cfg.eps)
        self.dq = Launch(
            _chunk_dq, (B * HQ, NC),
            (*_strides(q), *_strides(k), *_strides(v), *o_strides, *_strides(do), *_contiguous_strides(*q.shape),
             *plan.w_strides, *plan.mask_strides, HQ, G, NMB, N, m, d, dv, *consts),
            dict(plan.meta, **_options("chunk_dq", m, d, dv)), q.device,
        )
        launch = pick_config("dstate", m, d, dv)
        self.q_parts = B * HQ * P * rec
        self.dstate = Launch(
            _dstate_bwd, (B * HQ * NMB, P),
            (*_strides(q), *o_strides, *_strides(do), *plan.w_strides, HQ, NMB, N, m, d, dv, plan.seg_len, rec,
             *consts),
            dict(FEATURE=plan.meta["FEATURE"], LP=plan.meta["LP"], BMB=BMB, BD=plan.meta["BD"], BDV=BDV, **launch),
            q.device,
        )
        self.scan = Launch(
            _scan_segments, (B * HKV, NMB), (P, G, m, dv, rec, 1.0, 0.0),
            dict(REVERSE=True, USE_MAX=False, FOLD=False, BMB=BMB, BDV=BDV, BM=max(16, triton.next_power_of_2(m))),
            q.device,
        )
        no_valid = {key: value for key, value in plan.meta.items() if key != "HAS_VALID"}
        self.dstates = Launch(
            _chunk_dstates, (B * HKV * NMB, P),
            (*_strides(q), *o_strides, *_strides(do), *plan.w_strides, HKV, G, NMB, N, m, d, dv, plan.seg_len, rec,
             *consts),
            dict(no_valid, **_options("chunk_dstates", m, d, dv)), q.device,
        )
        self.dkv = Launch(
            _chunk_dkv, (B * HKV, NC),
            (*_strides(q), *_strides(k), *_strides(v), *o_strides, *_strides(do), *_contiguous_strides(*k.shape),
             *_contiguous_strides(*v.shape), *plan.w_strides, *plan.mask_strides, HKV, G, NMB, N, m, d, dv, *consts),
            dict(plan.meta, **_options("chunk_dkv", m, d, dv)), q.device,
        )


_PLANS = PlanCache()


def _forward(q, k, v, valid, cfg: FeatureConfig):
    key = (layout_key(q, k, v, valid), cfg.key(q.shape[-1]))
    plan = _PLANS.get(key) or _PLANS.add(key, _Plan(q, k, v, valid, cfg))
    whi, wlo = cfg.split_weight(q)
    mask = key_valid_arg(valid, k)[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    parts = torch.empty(plan.records, **f32)
    plan.state(k, v, whi, wlo, mask, parts)
    S = torch.empty(plan.records, **f32)
    plan.scan(parts, S, S)
    del parts
    H, Z = plan.chunk_states(k, v, whi, wlo, mask, S)
    o = torch.empty(plan.o_shape, device=q.device, dtype=q.dtype)
    # denominators, then zeros: linear_attn._dstate_bwd reads FAVOR's query row maxima there
    stats = torch.empty(2 * plan.rows, **f32)
    stats[plan.rows:].zero_()
    plan.out(q, k, v, whi, wlo, mask, H, Z, o, stats)
    return o, stats, S, plan


def _backward(do, q, k, v, o, stats, S, valid, plan: _Plan, cfg: FeatureConfig):
    bplan = plan.backward(do, q, k, v, cfg)
    whi, wlo = cfg.split_weight(q)
    mask = key_valid_arg(valid, k)[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    H, Z = plan.chunk_states(k, v, whi, wlo, mask, S)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    bplan.dq(q, k, v, whi, wlo, mask, H, Z, o, do, stats, dq)
    del H, Z
    parts = torch.empty(bplan.q_parts, **f32)
    bplan.dstate(q, whi, wlo, o, do, stats, parts)
    R = torch.empty(plan.records, **f32)
    bplan.scan(parts, R, S)
    del parts
    dH = torch.empty(plan.h_size, device=q.device, dtype=plan.h_dtype)
    dZ = torch.empty(plan.z_size, **f32)
    bplan.dstates(q, whi, wlo, o, do, stats, R, dH, dZ)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    bplan.dkv(q, k, v, whi, wlo, mask, dH, dZ, o, do, stats, dk, dv)
    return dq, dk, dv


class _ChunkedCausalFeatureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, valid, cfg):
        o, stats, S, plan = _forward(q, k, v, valid, cfg)
        ctx.save_for_backward(q, k, v, o, stats, S, valid)
        ctx.cfg, ctx.plan = cfg, plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats, S, valid = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, stats, S, valid, ctx.plan, ctx.cfg)
        return dq, dk, dv, None, None, None


def chunked_causal_feature_attention(q, k, v, cfg: FeatureConfig, key_padding_mask=None):
    """Causal fused kernel attention, chunk-parallel → ``(B, Hq, N, dv)`` in q's dtype (see module doc).
    Not for FAVOR+ with its prefix-max stabiliser (``cfg.use_key_max``)."""
    if cfg.use_key_max:
        raise ValueError("chunked_causal_feature_attention: expected a feature map without FAVOR's prefix-max "
                         "stabiliser (stabilize=False), got stabilize=True")
    return _ChunkedCausalFeatureAttention.apply(q, k, v, cfg.projection, key_padding_mask, cfg)


# Which causal kernels ``ops.feature_attention`` runs: "auto" (the chunk-parallel ones for maps without
# the prefix-max stabiliser and more than one feature block, where the segment scan's m×dv states
# spill), "chunk" (wherever they apply) or "scan" (the segment scan always).
CAUSAL_KERNEL = os.environ.get("APPROXATTN_CAUSAL_KERNEL", "auto")
if CAUSAL_KERNEL not in ("auto", "chunk", "scan"):
    raise ValueError(f"APPROXATTN_CAUSAL_KERNEL: expected 'auto', 'chunk' or 'scan', got {CAUSAL_KERNEL!r}")


def takes(cfg: FeatureConfig, d: int) -> bool:
    """Whether the causal op runs these kernels for ``cfg`` at head dim d (see ``CAUSAL_KERNEL``)."""
    if cfg.use_key_max or CAUSAL_KERNEL == "scan":
        return False
    return CAUSAL_KERNEL == "chunk" or cfg.features(d) > FEATURE_BLOCK
