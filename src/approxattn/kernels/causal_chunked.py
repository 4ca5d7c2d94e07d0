"""Causal kernel attention, chunk-parallel: the state before every chunk of ``BT`` tokens is written
to memory once, then each chunk is its own program, walking the m features in blocks of ``BMB``
(the layout of fla's ``chunk_linear_attn``, with the feature maps computed in registers).

Why beside the segment scan (``causal_linear_attn``): there one program holds a whole m×dv state
(two in the query backward) and walks its chunks one after another; at m = 256 those states no
longer fit in registers (H100, N = 65,536, ReLU m = 256: dq 5.0 ms, dk/dv 9.1 ms of a 17 ms
fwd+bwd). Here no program holds more than a ``BMB×dv`` block of a state.

Every feature map: elu+1, ReLU, FAVOR+ without a stabiliser (features elementwise per feature, so
every sum splits over feature blocks) and FAVOR+ with its no-look-ahead stabiliser (``PMAX``, the
formulas of ``causal_linear_attn``): a first pass takes each key row's max logit, ``torch.cummax``
makes the prefix max M; states are stored relative to M at the row before their chunk (dH: at the
chunk's last row), so every factor ``exp(M_j − M_ref)`` is ≤ 1; the ε part travels apart (``VS``,
``CNT`` forward, ``E`` backward); each chunk's query rows take their max over the feature blocks as
a running max.

Forward:

1. ``linear_attn._state_fwd`` per segment and ``_scan_segments``: the state at each segment's start.
2. ``_chunk_states`` (grid: key/value head × feature block, segment): walks its segment's chunks and
   stores ``H[c] = Σ_{j < c·BT} φ(k_j)v_jᵀ`` (bf16 for half inputs, fp32 otherwise) and
   ``Z[c] = Σ_{j < c·BT} φ(k_j)`` (fp32).
3. ``_chunk_out`` (grid: query head, chunk): ``o = (φ(Q)H[c] + M∘(φ(Q)φ(K)ᵀ)V) / den`` with
   ``den = φ(Q)Z[c] + rowsum(M∘φ(Q)φ(K)ᵀ) + den_eps``, M the causal mask of the chunk.

Where the stored states would take more than ``STATE_BUDGET`` × the bytes of q, steps 2–3 (and 4, 5's
storing walk and 6 below) run over groups of key/value heads in turn, reusing one buffer.

Backward (H is recomputed, not kept from the forward: it is as large as an N×m bf16 tensor):

4. ``_chunk_states`` again, then ``_chunk_dq`` (grid: query head, chunk):
   ``dφ(q_i) = Σ_{j ≤ i in chunk} B_ij φ(k_j) + (do_i H[c]ᵀ − (do_i·o_i) Z[c]) / den_i`` with
   ``B_ij = (do_i·v_j − do_i·o_i) / den_i`` formed from exact products before the cancellation.
5. ``_chunk_dstates`` (grid: key/value head × feature block, segment) sums each segment's queries
   (of every head of the group), a reverse ``_scan_segments`` makes the suffix state after each
   segment, and ``_chunk_dstates`` again walks the chunks backwards storing
   ``dH[c] = Σ_{i ≥ (c+1)·BT} Σ_g φ(q_i) dnum_iᵀ`` and
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
    _valid_keys,
)
from ._launch import FeatureConfig, Launch, PlanCache, key_valid_arg, layout_key, pick_config
from .causal_linear_attn import scan_launch, segment_length
from .linear_attn import (
    FEATURE_BLOCK,
    _contiguous_strides,
    _strides,
    feature_blocks,
    record_size,
    state_launch,
    weight_strides,
)


@triton.jit
def _load_tile(ptr, b, h, stride_b, stride_h, offs_n, stride_n, offs_c, stride_c, mask):
    """Rows ``offs_n`` × columns ``offs_c`` of ``tensor[b, h]`` (zero where masked)."""
    return tl.load(ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
                   + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, b, h, stride_b, stride_h, offs_n, stride_n, offs_c, stride_c, value, mask):
    tl.store(ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
             + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c, value, mask=mask)


@triton.jit
def _key_row_max(
    k_ptr, whi_ptr, wlo_ptr, valid_ptr, out_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, NMB, N, m, d, xs,
    FEATURE: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr,
):
    """Grid (key/value head, chunk): each key row's largest logit over the m features (−1e30 at
    padded keys); a cumulative max along N makes FAVOR's prefix max M."""
    kv = tl.program_id(0)
    c = tl.program_id(1)
    b = kv // HKV
    h = kv % HKV
    offs_n = c * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    rows = offs_n < N
    valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
    xk = _load_tile(k_ptr, b, h, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd,
                    rows[:, None] & (offs_d[None, :] < d))
    best = tl.full([BT], -1.0e30, dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        lk = _logits_blk(xk, whi, wlo, xs, FEATURE, LP)
        best = tl.maximum(best, tl.max(tl.where(valid[:, None] & (offs_m < m)[None, :], lk, -1.0e30), axis=1))
    tl.store(out_ptr + kv.to(tl.int64) * N + offs_n, best, mask=rows)


@triton.jit
def _chunk_states(
    k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, M_ptr, S_ptr, H_ptr, Z_ptr, VS_ptr, CNT_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, NMB, N, m, d, dv, seg_len, rec_size, xs, ratio, eps, kv0,
    FEATURE: tl.constexpr, PMAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head from kv0 × feature block, segment): from the segment's start state (``S``,
    the scanned records), store the state before each of its chunks, then add the chunk's keys
    (feature-major ``(BMB, BT)`` tiles, as ``linear_attn._state_fwd``).

    PMAX: H[c], Z[c] hold ``Σ exp(l_j − M_j)·exp(M_j − M[c·BT − 1])``-weighted sums (each term ≤ 1;
    M the prefix max), without ratio and ε; ``VS[c] = Σ v_j`` and ``CNT[c]`` (valid keys before
    the chunk) carry the ε part."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    num_seg = tl.num_programs(1)
    kv = kv0 + pid // NMB
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
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    if PMAX:  # the record's offset is M before the segment (up to rounding: two codes take the max)
        M_row = M_ptr + kv.to(tl.int64) * N
        ref = tl.load(M_row + start - 1, mask=start > 0, other=-1.0e30)
        vs = tl.load(rec + m * dv + m + offs_v, mask=vmask, other=0.0)
        cnt = tl.load(rec + m * dv + m + dv)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    NC = tl.cdiv(N, BT)
    for n0 in range(start, stop, BT):
        state = ((kv - kv0) * NC + n0 // BT).to(tl.int64)  # the buffers hold the group's heads
        tl.store(H_ptr + state * m * dv + tile, _cast_out(S, H_ptr.dtype.element_ty), mask=tmask)
        tl.store(Z_ptr + state * m + offs_m, z, mask=fmask)
        offs_n = n0 + offs_t
        valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, offs_n < N, HAS_VALID)
        xt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < d), other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        lt = _logits_blk_t(xt, whi, wlo, xs, FEATURE, LP)
        keep = fmask[:, None] & valid[None, :]
        if PMAX:
            if mb == 0:
                tl.store(VS_ptr + state * dv + offs_v, vs, mask=vmask)
                tl.store(CNT_ptr + state, cnt)
            Mk = tl.load(M_row + offs_n, mask=offs_n < N, other=0.0)
            last = tl.load(M_row + tl.minimum(n0 + BT, N) - 1)
            e = tl.where(keep, tl.exp(tl.minimum(lt - Mk[None, :], 0.0) + (Mk - last)[None, :]), 0.0)
            alpha = tl.exp(ref - last)
            S = S * alpha + _dot(e, vv, LP)
            z = z * alpha + tl.sum(e, axis=1)
            vs += tl.sum(vv.to(tl.float32), axis=0)
            cnt += tl.sum(valid.to(tl.float32), axis=0)
            ref = last
        else:
            phi, _ = _apply(lt, 0.0, ratio, eps, keep, FEATURE)
            S += _dot(phi, vv, LP)
            z += tl.sum(phi, axis=1)


@triton.jit
def _chunk_out(
    q_ptr, k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, M_ptr, H_ptr, Z_ptr, VS_ptr, CNT_ptr, o_ptr, stats_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, NMB, N, m, d, dv, xs, ratio, eps, den_eps, kv0, ROWS,
    FEATURE: tl.constexpr, PMAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head of the key/value heads from kv0, chunk): the chunk's outputs; ``stats`` gets
    the denominators (PMAX: then the query rows' max logits and ``Σ_l φ(q)_l``), kept for the backward.

    PMAX (FAVOR+ as ``causal_linear_attn``): query features ``ratio·(exp(l − max_l l) + ε)``, the
    row max taken as a running max over the feature blocks (sums rescaled when it grows, their ε
    parts added at the end); row i weighs key j by ``ratio·(φ(q_i)·e_j·exp(M_j − M_i) + ε·Σφ(q_i))``."""
    pid_bh = kv0 * G + tl.program_id(0)
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
    valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
    xq = _load_tile(q_ptr, b, h, stride_qb, stride_qh, offs_n, stride_qn, offs_d, stride_qd,
                    rows[:, None] & dmask[None, :])
    xk = _load_tile(k_ptr, b, hk, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd,
                    rows[:, None] & dmask[None, :])
    vv = _load_tile(v_ptr, b, hk, stride_vb, stride_vh, offs_n, stride_vn, offs_v, stride_vd,
                    valid[:, None] & vmask[None, :])
    state = ((kv - kv0) * tl.num_programs(1) + c).to(tl.int64)
    lower = offs_t[:, None] >= offs_t[None, :]
    A = tl.zeros([BT, BT], dtype=tl.float32)
    num = tl.zeros([BT, BDV], dtype=tl.float32)
    den = tl.zeros([BT], dtype=tl.float32)
    if PMAX:
        row_max = tl.full([BT], -1.0e30, dtype=tl.float32)
        q_e = tl.zeros([BT], dtype=tl.float32)  # Σ_l exp(l − row max)
        k_e = tl.zeros([BT], dtype=tl.float32)  # Σ_l e_j
        h_sum = tl.zeros([BDV], dtype=tl.float32)  # Σ_l H[c]_l
        z_sum = tl.zeros([BMB], dtype=tl.float32)
        M_row = M_ptr + kv.to(tl.int64) * N
        Mk = tl.load(M_row + offs_n, mask=rows, other=0.0)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        lq = _logits_blk(xq, whi, wlo, xs, FEATURE, LP)
        lk = _logits_blk(xk, whi, wlo, xs, FEATURE, LP)
        Hb = tl.load(H_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                     mask=fmask[:, None] & vmask[None, :], other=0.0)
        zb = tl.load(Z_ptr + state * m + offs_m, mask=fmask, other=0.0)
        if PMAX:
            new_max = tl.maximum(row_max, tl.max(tl.where(fmask[None, :], lq, -1.0e30), axis=1))
            alpha = tl.exp(row_max - new_max)
            row_max = new_max
            eq = tl.where(fmask[None, :], tl.exp(lq - row_max[:, None]), 0.0)
            ek = tl.where(valid[:, None] & fmask[None, :], tl.exp(tl.minimum(lk - Mk[:, None], 0.0)), 0.0)
            A = A * alpha[:, None] + _dot(eq, tl.trans(ek), LP)
            num = num * alpha[:, None] + _dot(eq, Hb, LP)
            den = den * alpha + tl.sum(eq * zb[None, :], axis=1)
            q_e = q_e * alpha + tl.sum(eq, axis=1)
            k_e += tl.sum(ek, axis=1)
            h_sum += tl.sum(Hb.to(tl.float32), axis=0)
            z_sum += zb
        else:
            phiq, _ = _apply(lq, 0.0, ratio, eps, fmask[None, :], FEATURE)
            phik, _ = _apply(lk, 0.0, ratio, eps, valid[:, None] & fmask[None, :], FEATURE)
            A += _dot(phiq, tl.trans(phik), LP)
            num += _dot(phiq, Hb, LP)
            den += tl.sum(phiq * zb[None, :], axis=1)
    if PMAX:
        ref = tl.load(M_row + c * BT - 1, mask=c > 0, other=-1.0e30)  # H[c]'s offset
        carry = tl.exp(ref - Mk)
        decay = tl.exp(tl.minimum(Mk[None, :] - Mk[:, None], 0.0))  # exp(M_j − M_i), j ≤ i
        q_sum = ratio * (q_e + m * eps)
        A = tl.where(lower & valid[None, :], ratio * (ratio * (A + eps * k_e[None, :]) * decay + eps * q_sum[:, None]),
                     0.0)
        vs = tl.load(VS_ptr + state * dv + offs_v, mask=vmask, other=0.0)
        cnt = tl.load(CNT_ptr + state)
        num = _dot(A, vv, LP) + ratio * (ratio * (num + eps * h_sum[None, :]) * carry[:, None]
                                         + eps * q_sum[:, None] * vs[None, :])
        den = tl.sum(A, axis=1) + ratio * (ratio * (den + eps * tl.sum(z_sum, axis=0)) * carry + eps * q_sum * cnt)
        den += den_eps
        tl.store(stats_ptr + ROWS + pid_bh.to(tl.int64) * N + offs_n, row_max, mask=rows)
        tl.store(stats_ptr + 2 * ROWS + pid_bh.to(tl.int64) * N + offs_n, q_sum, mask=rows)
    else:
        A = tl.where(lower, A, 0.0)
        num += _dot(A, vv, LP)
        den += tl.sum(A, axis=1) + den_eps
    _store_tile(o_ptr, b, h, stride_ob, stride_oh, offs_n, stride_on, offs_v, stride_od,
                _cast_out(num / den[:, None], o_ptr.dtype.element_ty), rows[:, None] & vmask[None, :])
    tl.store(stats_ptr + pid_bh.to(tl.int64) * N + offs_n, den, mask=rows)


@triton.jit
def _chunk_dq(
    q_ptr, k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, M_ptr, H_ptr, Z_ptr, VS_ptr, CNT_ptr, o_ptr, do_ptr,
    stats_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HQ, G, NMB, N, m, d, dv, xs, ratio, eps, kv0, ROWS,
    FEATURE: tl.constexpr, PMAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head of the key/value heads from kv0, chunk): dq from the chunk's keys and the
    state before it (PMAX: the prefix max and the query row maxima are constants, as in
    ``causal_linear_attn``)."""
    pid_bh = kv0 * G + tl.program_id(0)
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
    valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
    xq = _load_tile(q_ptr, b, h, stride_qb, stride_qh, offs_n, stride_qn, offs_d, stride_qd,
                    rows[:, None] & dmask[None, :])
    xk = _load_tile(k_ptr, b, hk, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd,
                    rows[:, None] & dmask[None, :])
    vv = _load_tile(v_ptr, b, hk, stride_vb, stride_vh, offs_n, stride_vn, offs_v, stride_vd,
                    valid[:, None] & vmask[None, :])
    o = _load_tile(o_ptr, b, h, stride_ob, stride_oh, offs_n, stride_on, offs_v, stride_od,
                   rows[:, None] & vmask[None, :]).to(tl.float32)
    do_raw = _load_tile(do_ptr, b, h, stride_gb, stride_gh, offs_n, stride_gn, offs_v, stride_gd,
                        rows[:, None] & vmask[None, :])
    inv = 1.0 / tl.load(stats_ptr + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
    do_o = tl.sum(do_raw.to(tl.float32) * o, axis=1)
    Bm = tl.where((offs_t[:, None] >= offs_t[None, :]) & valid[None, :],
                  (_dot(do_raw, tl.trans(vv), LP) - do_o[:, None]) * inv[:, None], 0.0)
    state = ((kv - kv0) * tl.num_programs(1) + c).to(tl.int64)
    scale = inv
    if PMAX:
        M_row = M_ptr + kv.to(tl.int64) * N
        Mk = tl.load(M_row + offs_n, mask=rows, other=0.0)
        ref = tl.load(M_row + c * BT - 1, mask=c > 0, other=-1.0e30)
        scale = tl.exp(ref - Mk) * inv  # carry / den
        row_max = tl.load(stats_ptr + ROWS + pid_bh.to(tl.int64) * N + offs_n, mask=rows, other=0.0)
        vs = tl.load(VS_ptr + state * dv + offs_v, mask=vmask, other=0.0)
        cnt = tl.load(CNT_ptr + state)
        # the ε part of every key's feature (no offset): Σ_{j ≤ i} (v_j·do_i − do_i·o_i)/den_i, in the
        # chunk and before it
        eps_part = eps * (tl.sum(Bm, axis=1) + (tl.sum(do_raw.to(tl.float32) * vs[None, :], axis=1) - do_o * cnt) * inv)
        Bm = Bm * tl.exp(tl.minimum(Mk[None, :] - Mk[:, None], 0.0))  # exp(M_j − M_i)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    dl_sum = tl.zeros([BT], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        lq = _logits_blk(xq, whi, wlo, xs, FEATURE, LP)
        lk = _logits_blk(xk, whi, wlo, xs, FEATURE, LP)
        Hb = tl.load(H_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                     mask=fmask[:, None] & vmask[None, :], other=0.0)
        zb = tl.load(Z_ptr + state * m + offs_m, mask=fmask, other=0.0)
        carried = (_dot(do_raw, tl.trans(Hb), LP) - do_o[:, None] * zb[None, :]) * scale[:, None]
        if PMAX:
            phiq, fq = _apply(lq, row_max[:, None], ratio, eps, fmask[None, :], FEATURE)
            ek = tl.where(valid[:, None] & fmask[None, :], tl.exp(tl.minimum(lk - Mk[:, None], 0.0)), 0.0)
            dphi = ratio * (_dot(Bm, ek, LP) + carried + eps_part[:, None])
        else:
            phiq, fq = _apply(lq, 0.0, ratio, eps, fmask[None, :], FEATURE)
            phik, _ = _apply(lk, 0.0, ratio, eps, valid[:, None] & fmask[None, :], FEATURE)
            dphi = _dot(Bm, phik, LP) + carried
        dx, dl_sum = _add_input_grad_blk(dx, dl_sum, dphi * fq, whi, FEATURE, LP)
    dx = _finish_input_grad(dx, dl_sum, xq, xs, FEATURE)
    _store_tile(dq_ptr, b, h, stride_dqb, stride_dqh, offs_n, stride_dqn, offs_d, stride_dqd,
                _cast_out(dx, dq_ptr.dtype.element_ty), rows[:, None] & dmask[None, :])


@triton.jit
def _chunk_dstates(
    q_ptr, whi_ptr, wlo_ptr, o_ptr, do_ptr, stats_ptr, M_ptr, R_ptr, dH_ptr, dZ_ptr, E_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_wm, stride_wd,
    HKV, G, NMB, N, m, d, dv, seg_len, rec_size, xs, ratio, eps, kv0, ROWS,
    FEATURE: tl.constexpr, PMAX: tl.constexpr, STORE: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head from kv0 × feature block, segment): walks the segment's chunks backwards
    adding ``Σ_g φ(q_i) dnum_iᵀ`` and ``Σ_g φ(q_i) dden_i`` of the group's query heads.

    STORE: starting from the suffix state after the segment (``R``, the reverse-scanned records),
    store the state after each chunk into dH, dZ (PMAX: relative to M at the chunk's last row,
    and ``E[c] = Σ_g Σ_i Σ_l φ(q_i)_l dnum_i``, the ε part, in E). Otherwise: from zero, write the
    segment's own sums into record ``R`` (PMAX: relative to M before the segment), for the scan."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    num_seg = tl.num_programs(1)
    kv = kv0 + pid // NMB
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
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, N)
    if STORE:
        R = tl.load(rec + tile, mask=tmask, other=0.0)
        r = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
        E = tl.load(rec + m * dv + m + offs_v, mask=vmask, other=0.0)
    else:
        R = tl.zeros([BMB, BDV], dtype=tl.float32)
        r = tl.zeros([BMB], dtype=tl.float32)
        E = tl.zeros([BDV], dtype=tl.float32)
    if PMAX:
        M_row = M_ptr + kv.to(tl.int64) * N
        ref = tl.load(M_row + stop - 1)
    NC = tl.cdiv(N, BT)
    num_chunks = tl.cdiv(stop - start, BT)
    for t in range(0, num_chunks):
        n0 = start + (num_chunks - 1 - t) * BT
        state = ((kv - kv0) * NC + n0 // BT).to(tl.int64)
        if STORE:
            tl.store(dH_ptr + state * m * dv + tile, _cast_out(R, dH_ptr.dtype.element_ty), mask=tmask)
            tl.store(dZ_ptr + state * m + offs_m, r, mask=fmask)
            if PMAX:
                if mb == 0:
                    tl.store(E_ptr + state * dv + offs_v, E, mask=vmask)
        offs_n = n0 + offs_t
        rows = offs_n < N
        if PMAX:  # to the offset before this chunk (≤ every M_i of its queries)
            prev = tl.load(M_row + n0 - 1, mask=n0 > 0, other=-1.0e30)
            shrink = tl.exp(prev - ref)
            R = R * shrink
            r = r * shrink
            ref = prev
            q_scale = tl.exp(prev - tl.load(M_row + offs_n, mask=rows, other=1.0e30))
        for g in range(0, G):
            h = hk * G + g
            bh = b * HQ + h
            xt = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                         + offs_n[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                         mask=rows[None, :] & (offs_d[:, None] < d), other=0.0)
            o = _load_tile(o_ptr, b, h, stride_ob, stride_oh, offs_n, stride_on, offs_v, stride_od,
                           rows[:, None] & vmask[None, :]).to(tl.float32)
            do = _load_tile(do_ptr, b, h, stride_gb, stride_gh, offs_n, stride_gn, offs_v, stride_gd,
                            rows[:, None] & vmask[None, :]).to(tl.float32)
            inv = 1.0 / tl.load(stats_ptr + bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
            dnum = do * inv[:, None]
            dden = -tl.sum(do * o, axis=1) * inv
            lt = _logits_blk_t(xt, whi, wlo, xs, FEATURE, LP)
            if PMAX:
                row_max = tl.load(stats_ptr + ROWS + bh.to(tl.int64) * N + offs_n, mask=rows, other=0.0)
                q_sum = tl.load(stats_ptr + 2 * ROWS + bh.to(tl.int64) * N + offs_n, mask=rows, other=0.0)
                phi, _ = _apply(lt, row_max[None, :], ratio, eps, fmask[:, None] & rows[None, :], FEATURE)
                E += tl.sum(q_sum[:, None] * dnum, axis=0)
                dnum = dnum * q_scale[:, None]
                dden = dden * q_scale
            else:
                phi, _ = _apply(lt, 0.0, ratio, eps, fmask[:, None] & rows[None, :], FEATURE)
            R += _dot(phi, dnum, LP)
            r += tl.sum(phi * dden[None, :], axis=1)
    if not STORE:
        tl.store(rec + tile, R, mask=tmask)
        tl.store(rec + m * dv + offs_m, r, mask=fmask)
        if mb == 0:
            tl.store(rec + m * dv + m + offs_v, E, mask=vmask)


@triton.jit
def _chunk_dkv(
    q_ptr, k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, M_ptr, dH_ptr, dZ_ptr, E_ptr, o_ptr, do_ptr, stats_ptr,
    dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, G, NMB, N, m, d, dv, xs, ratio, eps, kv0, ROWS,
    FEATURE: tl.constexpr, PMAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    BT: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head from kv0, chunk): dk and dv from the chunk's queries of every head of the
    group and the suffix state after the chunk. Tiles indexed ``[key j, query i]``."""
    pid_bh = kv0 + tl.program_id(0)
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
    valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
    upper = (offs_t[:, None] <= offs_t[None, :]) & valid[:, None]  # query i at or after valid key j
    xk = _load_tile(k_ptr, b, hk, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd,
                    rows[:, None] & dmask[None, :])
    vv = _load_tile(v_ptr, b, hk, stride_vb, stride_vh, offs_n, stride_vn, offs_v, stride_vd,
                    valid[:, None] & vmask[None, :])
    state = ((pid_bh - kv0) * tl.num_programs(1) + c).to(tl.int64)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    dl_sum = tl.zeros([BT], dtype=tl.float32)
    dvv = tl.zeros([BT, BDV], dtype=tl.float32)
    if PMAX:
        M_row = M_ptr + pid_bh.to(tl.int64) * N
        Mk = tl.load(M_row + offs_n, mask=rows, other=0.0)
        k_scale = tl.exp(tl.minimum(Mk - tl.load(M_row + tl.minimum(c * BT + BT, N) - 1), 0.0))  # to dH's offset
        decay = tl.exp(tl.minimum(Mk[:, None] - Mk[None, :], 0.0))  # [j, i]: exp(M_j − M_i)
        dvv = dvv + eps * tl.load(E_ptr + state * dv + offs_v, mask=vmask, other=0.0)[None, :]
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = offs_m < m
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD)
        lk = _logits_blk(xk, whi, wlo, xs, FEATURE, LP)
        dHb = tl.load(dH_ptr + state * m * dv + offs_m[:, None] * dv + offs_v[None, :],
                      mask=fmask[:, None] & vmask[None, :], other=0.0)
        dzb = tl.load(dZ_ptr + state * m + offs_m, mask=fmask, other=0.0)
        dphik = _dot(vv, tl.trans(dHb), LP) + dzb[None, :]
        if PMAX:  # phik: e_j = exp(l_j − M_j) (ratio and ε apart); dH is relative to M at the chunk's end
            phik = tl.where(valid[:, None] & fmask[None, :], tl.exp(tl.minimum(lk - Mk[:, None], 0.0)), 0.0)
            fk = ratio * phik
            dphik = dphik * k_scale[:, None]
            dvv += _dot(phik * k_scale[:, None], dHb, LP)
        else:
            phik, fk = _apply(lk, 0.0, ratio, eps, valid[:, None] & fmask[None, :], FEATURE)
            dvv += _dot(phik, dHb, LP)
        for g in range(0, G):
            h = hk * G + g
            bh = b * HQ + h
            xq = _load_tile(q_ptr, b, h, stride_qb, stride_qh, offs_n, stride_qn, offs_d, stride_qd,
                            rows[:, None] & dmask[None, :])
            o = _load_tile(o_ptr, b, h, stride_ob, stride_oh, offs_n, stride_on, offs_v, stride_od,
                           rows[:, None] & vmask[None, :]).to(tl.float32)
            do_raw = _load_tile(do_ptr, b, h, stride_gb, stride_gh, offs_n, stride_gn, offs_v, stride_gd,
                                rows[:, None] & vmask[None, :])
            do = do_raw.to(tl.float32)
            inv = 1.0 / tl.load(stats_ptr + bh.to(tl.int64) * N + offs_n, mask=rows, other=1.0)
            dnum = do * inv[:, None]
            do_o = tl.sum(do * o, axis=1)
            lq = _logits_blk(xq, whi, wlo, xs, FEATURE, LP)
            Bt = tl.where(upper, (_dot(vv, tl.trans(do_raw), LP) - do_o[None, :]) * inv[None, :], 0.0)
            if PMAX:
                row_max = tl.load(stats_ptr + ROWS + bh.to(tl.int64) * N + offs_n, mask=rows, other=0.0)
                phiq, _ = _apply(lq, row_max[:, None], ratio, eps, fmask[None, :], FEATURE)
                P = tl.where(upper, _dot(phik, tl.trans(phiq), LP) * decay, 0.0)
                if mb == 0:  # the ε part of every key's feature, once
                    q_sum = tl.load(stats_ptr + 2 * ROWS + bh.to(tl.int64) * N + offs_n, mask=rows, other=0.0)
                    P += tl.where(upper, eps * q_sum[None, :], 0.0)
                Bt = Bt * decay
            else:
                phiq, _ = _apply(lq, 0.0, ratio, eps, fmask[None, :], FEATURE)
                P = tl.where(upper, _dot(phik, tl.trans(phiq), LP), 0.0)
            dvv += _dot(P, dnum, LP)
            dphik += _dot(Bt, phiq, LP)
        dx, dl_sum = _add_input_grad_blk(dx, dl_sum, dphik * fk, whi, FEATURE, LP)
    dx = _finish_input_grad(dx, dl_sum, xk, xs, FEATURE)
    if PMAX:
        dvv = ratio * dvv
    _store_tile(dk_ptr, b, hk, stride_dkb, stride_dkh, offs_n, stride_dkn, offs_d, stride_dkd,
                _cast_out(dx, dk_ptr.dtype.element_ty), rows[:, None] & dmask[None, :])
    dvv = tl.where(valid[:, None], dvv, 0.0)
    _store_tile(dv_ptr, b, hk, stride_dvb, stride_dvh, offs_n, stride_dvn, offs_v, stride_dvd,
                _cast_out(dvv, dv_ptr.dtype.element_ty), rows[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- host side


# The stored states (H, or dH) take at most this many times the bytes of q: the backward then peaks
# near 1.3× the bytes of q, k, v, o and their gradients (d = dv), under the 1.5×. Where they
# would take more, the passes that store them run over groups of key/value heads, one after another,
# reusing one buffer. (FAVOR+ m = 256, d = dv = 64, BT = 64: the states are 4× q's bytes, so 2 groups.)
# APPROXATTN_CHUNK_STATE_BUDGET sets it (a large value: one group, the fastest).
STATE_BUDGET = float(os.environ.get("APPROXATTN_CHUNK_STATE_BUDGET", "2.0"))


def kv_group_size(kv_heads: int, state_bytes: int, q_bytes: int) -> int:
    """Key/value heads per group: the fewest groups (a divisor of ``kv_heads``) within the budget."""
    want = max(1, -(-state_bytes // max(1, int(STATE_BUDGET * q_bytes))))
    groups = next((g for g in range(want, kv_heads + 1) if kv_heads % g == 0), kv_heads)
    return kv_heads // groups


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
        self.pmax = cfg.use_key_max
        NC = triton.cdiv(N, BT)
        h_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
        gkv = kv_group_size(B * HKV, B * HKV * NC * m * dv * h_dtype.itemsize, q.numel() * q.element_size())
        self.groups = [kv0 for kv0 in range(0, B * HKV, gkv)]
        self.seg_len = segment_length(N, gkv * NMB, q.device, BT)
        self.state, P = state_launch(k, v, valid, cfg, tokens=self.seg_len)
        rec = record_size(m, dv)
        mult, const = cfg.state_terms()
        self.scan = scan_launch(B * HKV, P, m, dv, BMB, BDV, reverse=False, use_max=self.pmax, mult=mult,
                                const=const, device=q.device)
        self.records = B * HKV * P * rec
        # the per-chunk buffers hold one group's heads
        self.h_size, self.z_size = gkv * NC * m * dv, gkv * NC * m
        # prefix-max ε part: Σv and the key count before every chunk
        self.vs_size, self.cnt_size = (gkv * NC * dv, gkv * NC) if self.pmax else (1, 1)
        # bf16 for both half dtypes: a state sums up to N products and may pass fp16's range
        self.h_dtype = h_dtype
        self.o_shape, self.rows = (B, HQ, N, dv), B * HQ * N
        self.kv_rows = B * HKV * N
        # denominators; with the prefix max also the query rows' max logits and Σ_l φ(q)_l
        self.stats = (3 if self.pmax else 1) * self.rows
        _, smb, smn = key_valid_arg(valid, k)
        self.mask_strides = (smb, smn)
        self.w_strides = weight_strides(cfg, d)
        self.sizes = (B, HQ, HKV, N, d, dv, m, P, NC, NMB, BMB, BDV, gkv)
        self.meta = dict(FEATURE=FEATURE_CODES[cfg.feature], PMAX=self.pmax, HAS_VALID=valid is not None,
                         LP=cfg.low_precision(q), BT=BT, BMB=BMB, BD=BD, BDV=BDV)
        self.key_max = None
        if self.pmax:
            meta = {key: value for key, value in self.meta.items() if key not in ("PMAX", "BDV")}
            self.key_max = Launch(
                _key_row_max, (B * HKV, NC),
                (*_strides(k), *self.w_strides, smb, smn, HKV, NMB, N, m, d, cfg.x_scale),
                dict(meta, **_options("chunk_out", m, d, dv)), q.device,
            )
        G = HQ // HKV
        self.states = [Launch(
            _chunk_states, (gkv * NMB, P),
            (*_strides(k), *_strides(v), *self.w_strides, smb, smn, HKV, NMB, N, m, d, dv, self.seg_len, rec,
             cfg.x_scale, cfg.ratio, cfg.eps, kv0),
            dict(self.meta, **_options("chunk_states", m, d, dv)), q.device,
        ) for kv0 in self.groups]
        self.out = [Launch(
            _chunk_out, (gkv * G, NC),
            (*_strides(q), *_strides(k), *_strides(v), *_contiguous_strides(*self.o_shape), *self.w_strides,
             smb, smn, HQ, G, NMB, N, m, d, dv, cfg.x_scale, cfg.ratio, cfg.eps, cfg.den_eps, kv0, self.rows),
            dict(self.meta, **_options("chunk_out", m, d, dv)), q.device,
        ) for kv0 in self.groups]
        self.backward_plans = PlanCache()

    def prefix_max(self, k, whi, wlo, mask) -> torch.Tensor:
        """FAVOR's prefix max M per key row, ``(B·Hkv·N,)`` fp32 (a dummy without the stabiliser)."""
        if not self.pmax:
            return torch.empty(1, device=k.device, dtype=torch.float32)
        row_max = torch.empty(self.kv_rows, device=k.device, dtype=torch.float32)
        self.key_max(k, whi, wlo, mask, row_max)
        return torch.cummax(row_max.view(-1, k.shape[2]), dim=1).values.reshape(-1)

    def state_buffers(self, device):
        """Buffers for one group's per-chunk states: H, Z (and with the prefix max VS, CNT)."""
        f32 = dict(device=device, dtype=torch.float32)
        return (torch.empty(self.h_size, device=device, dtype=self.h_dtype), torch.empty(self.z_size, **f32),
                torch.empty(self.vs_size, **f32), torch.empty(self.cnt_size, **f32))

    def backward(self, do, q, k, v, cfg: FeatureConfig) -> "_BackwardPlan":
        key = layout_key(do)
        return self.backward_plans.get(key) or self.backward_plans.add(key, _BackwardPlan(self, do, q, k, v, cfg))


class _BackwardPlan:
    def __init__(self, plan: _Plan, do, q, k, v, cfg: FeatureConfig):
        B, HQ, HKV, N, d, dv, m, P, NC, NMB, BMB, BDV, gkv = plan.sizes
        G = HQ // HKV
        rec = record_size(m, dv)
        o_strides = _contiguous_strides(*plan.o_shape)
        consts = (cfg.x_scale, cfg.ratio, cfg.eps)
        self.dq = [Launch(
            _chunk_dq, (gkv * G, NC),
            (*_strides(q), *_strides(k), *_strides(v), *o_strides, *_strides(do), *_contiguous_strides(*q.shape),
             *plan.w_strides, *plan.mask_strides, HQ, G, NMB, N, m, d, dv, *consts, kv0, plan.rows),
            dict(plan.meta, **_options("chunk_dq", m, d, dv)), q.device,
        ) for kv0 in plan.groups]
        # the segments' own sums (summed over the group's query heads), scanned into suffix states
        self.e_size = gkv * NC * dv if plan.pmax else 1
        no_valid = {key: value for key, value in plan.meta.items() if key != "HAS_VALID"}
        walk = (*_strides(q), *o_strides, *_strides(do), *plan.w_strides, HKV, G, NMB, N, m, d, dv, plan.seg_len,
                rec, *consts)
        self.segment_sums = Launch(_chunk_dstates, (B * HKV * NMB, P), (*walk, 0, plan.rows),
                                   dict(no_valid, STORE=False, **_options("chunk_dstates", m, d, dv)), q.device)
        self.scan = scan_launch(B * HKV, P, m, dv, BMB, BDV, reverse=True, use_max=plan.pmax, device=q.device)
        self.dstates = [Launch(_chunk_dstates, (gkv * NMB, P), (*walk, kv0, plan.rows),
                               dict(no_valid, STORE=True, **_options("chunk_dstates", m, d, dv)), q.device)
                        for kv0 in plan.groups]
        self.dkv = [Launch(
            _chunk_dkv, (gkv, NC),
            (*_strides(q), *_strides(k), *_strides(v), *o_strides, *_strides(do), *_contiguous_strides(*k.shape),
             *_contiguous_strides(*v.shape), *plan.w_strides, *plan.mask_strides, HKV, G, NMB, N, m, d, dv, *consts,
             kv0, plan.rows),
            dict(plan.meta, **_options("chunk_dkv", m, d, dv)), q.device,
        ) for kv0 in plan.groups]


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
    M = plan.prefix_max(k, whi, wlo, mask)
    o = torch.empty(plan.o_shape, device=q.device, dtype=q.dtype)
    stats = torch.empty(plan.stats, **f32)
    H, Z, VS, CNT = plan.state_buffers(q.device)
    for states, out in zip(plan.states, plan.out):  # group by group, one state buffer
        states(k, v, whi, wlo, mask, M, S, H, Z, VS, CNT)
        out(q, k, v, whi, wlo, mask, M, H, Z, VS, CNT, o, stats)
    return o, stats, S, M, plan


def _backward(do, q, k, v, o, stats, S, M, valid, plan: _Plan, cfg: FeatureConfig):
    bplan = plan.backward(do, q, k, v, cfg)
    whi, wlo = cfg.split_weight(q)
    mask = key_valid_arg(valid, k)[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    H, Z, VS, CNT = plan.state_buffers(q.device)
    for states, dq_launch in zip(plan.states, bplan.dq):
        states(k, v, whi, wlo, mask, M, S, H, Z, VS, CNT)
        dq_launch(q, k, v, whi, wlo, mask, M, H, Z, VS, CNT, o, do, stats, dq)
    del H, Z, VS, CNT
    dH = torch.empty(plan.h_size, device=q.device, dtype=plan.h_dtype)
    dZ = torch.empty(plan.z_size, **f32)
    E = torch.empty(bplan.e_size, **f32)
    parts = torch.empty(plan.records, **f32)
    bplan.segment_sums(q, whi, wlo, o, do, stats, M, parts, dH, dZ, E)
    R = torch.empty(plan.records, **f32)
    bplan.scan(parts, R, S)
    del parts
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    for dstates, dkv in zip(bplan.dstates, bplan.dkv):
        dstates(q, whi, wlo, o, do, stats, M, R, dH, dZ, E)
        dkv(q, k, v, whi, wlo, mask, M, dH, dZ, E, o, do, stats, dk, dv)
    return dq, dk, dv


class _ChunkedCausalFeatureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, valid, cfg):
        o, stats, S, M, plan = _forward(q, k, v, valid, cfg)
        ctx.save_for_backward(q, k, v, o, stats, S, M, valid)
        ctx.cfg, ctx.plan = cfg, plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats, S, M, valid = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, stats, S, M, valid, ctx.plan, ctx.cfg)
        return dq, dk, dv, None, None, None


def chunked_causal_feature_attention(q, k, v, cfg: FeatureConfig, key_padding_mask=None):
    """Causal fused kernel attention, chunk-parallel → ``(B, Hq, N, dv)`` in q's dtype (see module doc)."""
    return _ChunkedCausalFeatureAttention.apply(q, k, v, cfg.projection, key_padding_mask, cfg)


# Which causal kernels ``ops.feature_attention`` runs: "auto" (the chunk-parallel ones for more than
# one feature block, where the segment scan's m×dv states spill), "chunk" or "scan" (always that one).
CAUSAL_KERNEL = os.environ.get("APPROXATTN_CAUSAL_KERNEL", "auto")
if CAUSAL_KERNEL not in ("auto", "chunk", "scan"):
    raise ValueError(f"APPROXATTN_CAUSAL_KERNEL: expected 'auto', 'chunk' or 'scan', got {CAUSAL_KERNEL!r}")


def takes(cfg: FeatureConfig, d: int) -> bool:
    """Whether the causal op runs these kernels for ``cfg`` at head dim d (see ``CAUSAL_KERNEL``)."""
    if CAUSAL_KERNEL == "scan":
        return False
    return CAUSAL_KERNEL == "chunk" or cfg.features(d) > FEATURE_BLOCK
