"""Non-causal kernel attention with the feature map fused in: ``φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1)``.

No N×m tensor ever reaches memory; features are computed in registers, 64 at a time
(``FEATURE_BLOCK``), from the projection split on the host into hi + lo halves of the input
dtype (nearly fp32-exact logits from two half-precision dots), folded first
(``FeatureConfig.weight_fold``): the temperature and, for FAVOR, log2(e) are in the weights, so
a logit leaves the dot ready for ``exp2``, and FAVOR's offsets are in base-2 units.

Per-element work is what these kernels wait on (H100 profile: two warps per scheduler, issue
slots under half busy), so what is the same for every program is done once: the combine
writes S's bf16 halves (the operands of the query and key sweeps) and its column sums, and
when the sizes fill their blocks the masks are compiled out (``FULL_F``, ``FULL_N``).

Forward, three launches:

1. ``_state_fwd`` (grid: key/value head × feature block, key split): partial
   ``A = Σ e(k)vᵀ``, ``a = Σ e(k)`` in fp32, e being the feature without its constant ε part,
   one record per split (:func:`record_size`), computed feature-major (``(features, keys)``
   tiles, like flash attention's ``P·V``). FAVOR keys are relative to the program's running
   max of each feature (rescaled when it grows, as in flash attention); the reference's
   stabiliser, one max over all keys and features of a (batch, head), is the maximum of these.
2. ``_combine_parts`` (grid: key/value head × feature block): the partials relative to that
   maximum, summed: ``S = ratio·Σ_p w_p A_p + ratio·ε·Σv`` (w per feature; as
   ``φ = ratio·(exp(l − M) + ε)``, the ε part of the state needs no offset), and z.
3. ``_out_fwd`` (grid: query head × query block): ``o = φ(q)S / (φ(q)·z + den_eps)`` in one
   sweep over the feature blocks, FAVOR's per-row max taken as a running max (the ε part of
   φ(q) is applied at the end through ``Σ_m S_m``); the denominators and each row's exponent
   offset (the running max, which absorbs FAVOR's norm term) are kept for the backward (4 + 4
   bytes a row).

Backward, three or four launches (``QUERY_BACKWARD``):

1. One feature block: ``_q_bwd_fused`` (grid: query head, query split) gives dq and the
   split's partial ``dS = Σ φ(q)dnumᵀ`` and ``dz`` in one sweep, φ(q) of each row block
   computed once for both, the partials summed in registers; ``do·o`` comes from φ(q) and
   ``do·S`` in fp32, not from the stored (rounded) o. Several feature blocks: the
   same kernel gives dq alone, and ``_dstate_bwd`` (grid: query head × feature block, query
   split) the partials, feature-major like ``_state_fwd`` (the fused sweep would sum them in
   the split's record, read, added to and written back every row block: slower, measured).
2. ``_combine_parts``: the partials summed per key/value head.
3. ``_kv_bwd`` (dk, dv), recomputing the key features.

Grouped-query heads index their key/value head (h // G); padded keys read a validity mask.
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
    _below,
    _cast_out,
    _dot,
    _dot_halves,
    _dot_split,
    _dot_split_left,
    _favor_norm,
    _finish_input_grad,
    _load_w_blk,
    _load_w_rows,
    _logits_blk_t,
    _proj_blk,
    _proj_blk_t,
    _valid_keys,
)
from ._launch import (
    PROGRAMS_PER_SM,
    FeatureConfig,
    Launch,
    PlanCache,
    block_sizes,
    key_valid_arg,
    layout_key,
    num_programs_hint,
    pick_config,
)


@triton.jit
def _state_fwd(
    k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, part_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, NMB, N, m, d, dv, tokens, rec_size, xs,
    FEATURE: tl.constexpr, USE_MAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    FULL_F: tl.constexpr, FULL_N: tl.constexpr, FOLDED: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head × feature block, key split): partial state of one feature block,
    written into the split's record (see :func:`record_size`).

    Feature-major: the logits of a key block are a ``(BMB, BN)`` tile, so ``A += e·V`` takes e
    from the accumulator as it is (no transpose through shared memory). FAVOR's stabiliser is
    one running max per feature (a row reduction, kept within a warp), stored as that feature's
    offset; the combine brings every feature and split to the largest. FULL_F: m, d, dv fill
    their blocks; FULL_N: every key block is whole (masks folded away). FOLDED: the projection
    folded (``FeatureConfig.weight_fold``), FAVOR's offsets in base-2 units (the non-causal
    plan); otherwise natural units (the causal scans that start from these states)."""
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
    fmask = _below(offs_m, m, FULL_F)
    dmask = _below(offs_d, d, FULL_F)
    vmask = _below(offs_v, dv, FULL_F)
    whi, wlo = _load_w_rows(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD, FULL_F)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    acc = tl.zeros([BMB, BDV], dtype=tl.float32)
    zacc = tl.zeros([BMB], dtype=tl.float32)
    vsum = tl.zeros([BDV], dtype=tl.float32)
    cnt = tl.zeros([BN], dtype=tl.float32)
    run_max = tl.full([BMB], -1.0e30, dtype=tl.float32)
    start = pid_p * tokens
    stop = tl.minimum(start + tokens, N)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        inside = _below(offs_n, stop, FULL_N)
        valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, inside, HAS_VALID)
        xt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=inside[None, :] & dmask[:, None], other=0.0)
        vv = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        if FOLDED:
            p = _proj_blk_t(xt, whi, wlo, FEATURE, LP)
            if FEATURE == 1:
                p = p - _favor_norm(xt, xs, 0)[None, :]
        else:
            p = _logits_blk_t(xt, whi, wlo, xs, FEATURE, LP)
        keep = fmask[:, None] & valid[None, :]
        if USE_MAX:
            new_max = tl.maximum(run_max, tl.max(tl.where(keep, p, -1.0e30), axis=1))
            if FOLDED:
                alpha = tl.exp2(run_max - new_max)
            else:
                alpha = tl.exp(run_max - new_max)
            acc = acc * alpha[:, None]
            zacc = zacc * alpha
            run_max = new_max
            # a feature with no valid key yet (padded, or masked so far): any finite offset
            offset = tl.where(run_max > -1.0e29, run_max, 0.0)[:, None]
        else:
            offset = 0.0
        if FOLDED and FEATURE == 1:  # the core e alone (ratio, ε: the combine's)
            e = tl.where(keep, tl.exp2(p - offset), 0.0)
        elif FOLDED:
            e, _ = _apply(p, offset, 1.0, 0.0, keep, FEATURE, True)
        else:
            e, _ = _apply(p, offset, 1.0, 0.0, keep, FEATURE)
        if LP and FEATURE == 0:
            # elu+1 features sit near 1, where a half operand keeps only ~2⁻⁸ of their deviation from 1, which
            # is what the attention carries (with mean-pooled FLuRKA keys, and in dq's near-cancelling terms)
            acc += _dot_split_left(e, vv)
        else:
            acc += _dot(e, vv, LP)
        zacc += tl.sum(e, axis=1)
        vsum += tl.sum(vv.to(tl.float32), axis=0)
        cnt += valid.to(tl.float32)

    rec = part_ptr + (bh * num_p + pid_p).to(tl.int64) * rec_size
    tl.store(rec + offs_m[:, None] * dv + offs_v[None, :], acc, mask=fmask[:, None] & vmask[None, :])
    tl.store(rec + m * dv + offs_m, zacc, mask=fmask)
    if mb == 0:
        tl.store(rec + m * dv + m + offs_v, vsum, mask=vmask)
        tl.store(rec + m * dv + m + dv, tl.sum(cnt, axis=0))
    if USE_MAX:
        tl.store(rec + m * dv + m + dv + 1 + offs_m, run_max, mask=fmask)


@triton.jit
def _combine_parts(
    part_ptr, out_ptr, half_ptr, sums_ptr, SRC, m, dv, rec_size, mult, const,
    USE_MAX: tl.constexpr, HAS_CONST: tl.constexpr, HALVES: tl.constexpr, SUMS: tl.constexpr,
    BMB: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
):
    """Grid (output record, feature block): records ``o·SRC … o·SRC + SRC − 1`` summed into record o,
    ``S = mult·Σ_p w_p A_p + const·Σ_p vsum_p``, ``z`` alike. USE_MAX (FAVOR's key stabiliser):
    ``w_pf = 2^(offset_pf − M)`` per record p and feature f (offsets in base-2 units: the folded
    ``_state_fwd``), with M the largest offset of all SRC records and features, stored as the
    output's first offset; otherwise w = 1.

    HALVES (half-precision inputs): S also as bf16 hi + lo tiles, ``half[o] = (hi (m×dv) | lo (m×dv))``,
    the operands the query and key sweeps dot with, split once here instead of in every program.
    SUMS: each feature block's ``(Σ_f S_f (dv) | Σ_f z_f)`` into ``sums[o, block]`` (row of BDV + 1
    words), FAVOR's ε part of the query side."""
    o = tl.program_id(0)
    mb = tl.program_id(1)
    offs_m = mb * BMB + tl.arange(0, BMB)
    offs_v = tl.arange(0, BDV)
    fmask = offs_m < m
    vmask = offs_v < dv
    tile = offs_m[:, None] * dv + offs_v[None, :]
    tmask = fmask[:, None] & vmask[None, :]
    first = part_ptr + (o * SRC).to(tl.int64) * rec_size
    if USE_MAX:
        offs_all = tl.arange(0, BM)
        maxima = tl.full([BM], -1.0e30, dtype=tl.float32)
        for s in range(0, SRC):
            maxima = tl.maximum(maxima, tl.load(first + s * rec_size + m * dv + m + dv + 1 + offs_all,
                                                mask=offs_all < m, other=-1.0e30))
        top = tl.max(maxima, axis=0)
    acc = tl.zeros([BMB, BDV], dtype=tl.float32)
    zacc = tl.zeros([BMB], dtype=tl.float32)
    vsum = tl.zeros([BDV], dtype=tl.float32)
    cnt = tl.zeros([BDV], dtype=tl.float32)  # the count in element 0
    for s in range(0, SRC):
        rec = first + s * rec_size
        A = tl.load(rec + tile, mask=tmask, other=0.0)
        a = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
        if USE_MAX:
            w = tl.exp2(tl.load(rec + m * dv + m + dv + 1 + offs_m, mask=fmask, other=-1.0e30) - top)
            A = A * w[:, None]
            a = a * w
        acc += A
        zacc += a
        if HAS_CONST:
            vsum += tl.load(rec + m * dv + m + offs_v, mask=vmask, other=0.0)
            cnt += tl.load(rec + m * dv + m + dv + offs_v, mask=offs_v == 0, other=0.0)
    acc = acc * mult
    zacc = zacc * mult
    if HAS_CONST:
        acc += const * vsum[None, :]
        zacc += const * tl.sum(cnt, axis=0)
    out = out_ptr + o.to(tl.int64) * rec_size
    tl.store(out + tile, acc, mask=tmask)
    tl.store(out + m * dv + offs_m, zacc, mask=fmask)
    if USE_MAX:
        if mb == 0:
            tl.store(out + m * dv + m + dv + 1, top)
    if HALVES:
        hi = _cast_out(acc, tl.bfloat16)
        half = half_ptr + o.to(tl.int64) * (2 * m * dv)
        tl.store(half + tile, hi, mask=tmask)
        tl.store(half + m * dv + tile, _cast_out(acc - hi.to(tl.float32), tl.bfloat16), mask=tmask)
    if SUMS:
        row = sums_ptr + (o * tl.num_programs(1) + mb).to(tl.int64) * (BDV + 1)
        # rows past m hold the constant part too (added to every row above): not features
        tl.store(row + offs_v, tl.sum(tl.where(fmask[:, None], acc, 0.0), axis=0), mask=vmask)
        tl.store(row + BDV, tl.sum(tl.where(fmask, zacc, 0.0), axis=0))


@triton.jit
def _out_fwd(
    q_ptr, whi_ptr, wlo_ptr, S_ptr, Sh_ptr, sums_ptr, o_ptr, stats_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_wm, stride_wd,
    HQ, G, NMB, N, m, d, dv, rec_size, xs, ratio, eps, den_eps,
    FEATURE: tl.constexpr, STAB: tl.constexpr, LP: tl.constexpr, FULL_F: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head, query block): o = φ(q)S / (φ(q)·z + den_eps) in one sweep over the
    feature blocks (S, z: the key/value head's state record; half inputs dot with its bf16 hi
    tile, ``Sh``). FAVOR's per-row max is a running max (partial sums rescaled when it grows);
    its ε part is ``ratio·ε·(Σ_m S_m, Σ_m z_m)``, which no offset touches (``sums``: the combine's
    per-block column sums). ``stats`` gets the denominators, then the row offsets (above)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv = (b * (HQ // G) + h // G).to(tl.int64)
    rec = S_ptr + kv * rec_size
    rec_hi = Sh_ptr + kv * (2 * m * dv)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    vmask = _below(offs_v, dv, FULL_F)
    rows = offs_n < N
    x = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=rows[:, None] & _below(offs_d, d, FULL_F)[None, :], other=0.0)
    online = FEATURE == 1 and STAB
    # each row's offset in the exponent (base 2, against the dot's raw logits; kept for the backward):
    # FAVOR's running max (stabilised), which absorbs the norm term, or the norm term alone
    row_max = tl.zeros([BN], dtype=tl.float32)
    if online:
        row_max = row_max - 1.0e30
    elif FEATURE == 1:
        row_max = _favor_norm(x, xs, 1)
    num = tl.zeros([BN, BDV], dtype=tl.float32)
    den = tl.zeros([BN], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = _below(offs_m, m, FULL_F)
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD, FULL_F)
        p = _proj_blk(x, whi, wlo, FEATURE, LP)
        if online:
            new_max = tl.maximum(row_max, tl.max(tl.where(fmask[None, :], p, -1.0e30), axis=1))
            alpha = tl.exp2(row_max - new_max)
            num = num * alpha[:, None]
            den = den * alpha
            row_max = new_max
            phi = tl.where(fmask[None, :], tl.exp2(p - row_max[:, None]), 0.0)
        else:
            phi, _ = _apply(p, row_max[:, None], ratio, eps, fmask[None, :], FEATURE, True)
        tile = offs_m[:, None] * dv + offs_v[None, :]
        if LP:
            S = tl.load(rec_hi + tile, mask=fmask[:, None] & vmask[None, :], other=0.0)
        else:
            S = tl.load(rec + tile, mask=fmask[:, None] & vmask[None, :], other=0.0)
        z = tl.load(rec + m * dv + offs_m, mask=fmask, other=0.0)
        num += _dot(phi, S, LP)
        den += tl.sum(phi * z[None, :], axis=1)
    if online:
        s_sum = tl.zeros([BDV], dtype=tl.float32)  # Σ_m S_m and Σ_m z_m (FAVOR's ε part)
        z_sum = tl.zeros([BDV], dtype=tl.float32)  # in element 0
        sums = sums_ptr + kv * NMB * (BDV + 1)
        for mb in range(0, NMB):
            s_sum += tl.load(sums + mb * (BDV + 1) + offs_v, mask=vmask, other=0.0)
            z_sum += tl.load(sums + mb * (BDV + 1) + BDV + offs_v, mask=offs_v == 0, other=0.0)
        num = ratio * (num + eps * s_sum[None, :])
        den = ratio * (den + eps * tl.sum(z_sum, axis=0))
    den += den_eps
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
             _cast_out(num / den[:, None], o_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])
    tl.store(stats_ptr + pid_bh.to(tl.int64) * N + offs_n, den, mask=rows)
    tl.store(stats_ptr + (tl.num_programs(0) + pid_bh).to(tl.int64) * N + offs_n, row_max, mask=rows)


@triton.jit
def _q_features_blk(x, row_max, rows, do_raw, whi_ptr, wlo_ptr, state, state_hi, stride_wm, stride_wd, mb, m, d, dv,
                    ratio, eps, offs_f, offs_v, vmask, FEATURE: tl.constexpr, LP: tl.constexpr,
                    FULL_F: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr):
    """Feature block ``mb`` of a query row block in the backward: its offsets and masks, the weight block,
    φ and ∂φ/∂l (zero past the split's rows), z, and ``do·Sᵀ`` taken near-exactly (both bf16 halves of S
    with half inputs)."""
    offs_m = mb * BMB + offs_f
    fmask = _below(offs_m, m, FULL_F)
    tmask = fmask[:, None] & vmask[None, :]
    whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD, FULL_F)
    # rows past the split: φ = 0 (nothing into dS, dz), factor = 0 (dq not stored)
    phi, factor = _apply(_proj_blk(x, whi, wlo, FEATURE, LP), row_max[:, None], ratio, eps,
                         rows[:, None] & fmask[None, :], FEATURE, True)
    tile = offs_m[:, None] * dv + offs_v[None, :]
    z = tl.load(state + m * dv + offs_m, mask=fmask, other=0.0)
    if LP:
        do_S = _dot_halves(do_raw, tl.trans(tl.load(state_hi + tile, mask=tmask, other=0.0)),
                           tl.trans(tl.load(state_hi + m * dv + tile, mask=tmask, other=0.0)))
    else:
        do_S = _dot_split(do_raw, tl.trans(tl.load(state + tile, mask=tmask, other=0.0)), LP, True)
    return offs_m, fmask, tmask, whi, phi, factor, z, do_S


@triton.jit
def _q_bwd_fused(
    q_ptr, whi_ptr, wlo_ptr, S_ptr, Sh_ptr, o_ptr, do_ptr, stats_ptr, dq_ptr, part_ptr, do_o_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_wm, stride_wd,
    HQ, G, N, m, d, dv, tokens, rec_size, xs, ratio, eps,
    FEATURE: tl.constexpr, LP: tl.constexpr, NMB: tl.constexpr, STATE: tl.constexpr,
    FULL_F: tl.constexpr, FULL_N: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head, query split): dq and (STATE) the partial dS, dz in one sweep, each row block's
    features computed once (they were two kernels, each computing them). dq is stored row block
    by row block; the split's partial dS and dz go into its record (the A and a slots).

    One feature block (NMB = 1) is summed in registers. With more, the split's record itself
    is the accumulator (zeroed first, then read, added to and written back for every row
    block; it stays in L2): one register tile per block spills. Measured on the H100, FAVOR+
    m = 256 (N = 65,536, B = 1, H = 16, d = 64, bf16): four register tiles need 255 registers
    a thread and spill 100–700, 2.3 ms at best against 1.7 ms for the two kernels it replaced; the
    record, 1.4 ms. Without STATE, dq alone, and each row's ``do·o`` into ``do_o`` for
    ``_dstate_bwd``, which sums dS and dz. FULL_F / FULL_N: as ``_state_fwd``'s (no masks)."""
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_p = tl.num_programs(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv = (b * (HQ // G) + h // G).to(tl.int64)
    state = S_ptr + kv * rec_size
    state_hi = Sh_ptr + kv * (2 * m * dv)  # half inputs: S's bf16 halves (the combine's)
    rec = part_ptr + (pid_bh * num_p + pid_p).to(tl.int64) * rec_size
    offs_f = tl.arange(0, BMB)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    dmask = _below(offs_d, d, FULL_F)
    vmask = _below(offs_v, dv, FULL_F)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    g_base = do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    dq_base = dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    den_base = stats_ptr + pid_bh.to(tl.int64) * N
    qmax_base = stats_ptr + (tl.num_programs(0) + pid_bh).to(tl.int64) * N
    dS_regs = tl.zeros([BMB, BDV], dtype=tl.float32)  # NMB = 1 only
    dz_regs = tl.zeros([BMB], dtype=tl.float32)
    if STATE and NMB > 1:
        for mb in range(NMB):
            offs_m = mb * BMB + offs_f
            fmask = _below(offs_m, m, FULL_F)
            tl.store(rec + offs_m[:, None] * dv + offs_v[None, :], dS_regs, mask=fmask[:, None] & vmask[None, :])
            tl.store(rec + m * dv + offs_m, dz_regs, mask=fmask)
        tl.debug_barrier()  # the record's elements are read back by other threads than wrote them
    start = pid_p * tokens
    stop = tl.minimum(start + tokens, N)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        rows = _below(offs_n, stop, FULL_N)
        x = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=rows[:, None] & dmask[None, :], other=0.0)
        do_raw = tl.load(g_base + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                         mask=rows[:, None] & vmask[None, :], other=0.0)
        den = tl.load(den_base + offs_n, mask=rows, other=1.0)
        row_max = tl.load(qmax_base + offs_n, mask=rows, other=0.0)
        inv_den = 1.0 / den
        dnum = do_raw.to(tl.float32) * inv_den[:, None]
        # dφ = (do·S − (do·o)z)/den: the two terms nearly cancel, so both are taken near-exactly. With one
        # feature block do·o = φ·(do·S)/den from the fp32 features, not from the stored o, which is rounded to
        # the input dtype (FLuRKA-linear's bf16 dq, whose nearly uniform rows cancel ~7×: 1.9e-2 from that
        # rounding alone against the fp32 reference, measured); with several, the stored o.
        if NMB == 1:
            offs_m, fmask, tmask, whi, phi, factor, z, do_S = _q_features_blk(
                x, row_max, rows, do_raw, whi_ptr, wlo_ptr, state, state_hi, stride_wm, stride_wd, 0, m, d, dv,
                ratio, eps, offs_f, offs_v, vmask, FEATURE, LP, FULL_F, BMB, BD)
            do_o = tl.sum(phi * do_S, axis=1) * inv_den
        else:
            o = tl.load(o_base + offs_n[:, None] * stride_on + offs_v[None, :] * stride_od,
                        mask=rows[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            do_o = tl.sum(do_raw.to(tl.float32) * o, axis=1)
        if not STATE:
            tl.store(do_o_ptr + pid_bh.to(tl.int64) * N + offs_n, do_o, mask=rows)
        dden = -do_o * inv_den
        dx = tl.zeros([BN, BD], dtype=tl.float32)
        dl_sum = tl.zeros([BN], dtype=tl.float32)
        for mb in range(NMB):
            if NMB > 1:
                offs_m, fmask, tmask, whi, phi, factor, z, do_S = _q_features_blk(
                    x, row_max, rows, do_raw, whi_ptr, wlo_ptr, state, state_hi, stride_wm, stride_wd, mb, m, d,
                    dv, ratio, eps, offs_f, offs_v, vmask, FEATURE, LP, FULL_F, BMB, BD)
            dphi = do_S * inv_den[:, None] + dden[:, None] * z[None, :]
            dx, dl_sum = _add_input_grad_blk(dx, dl_sum, dphi * factor, whi, FEATURE, LP)
            if STATE:
                dS_blk = _dot(tl.trans(phi), dnum, LP)
                dz_blk = tl.sum(phi * dden[:, None], axis=0)
                if NMB == 1:
                    dS_regs += dS_blk
                    dz_regs += dz_blk
                else:
                    dS_ptrs = rec + offs_m[:, None] * dv + offs_v[None, :]
                    tl.store(dS_ptrs, tl.load(dS_ptrs, mask=tmask, other=0.0) + dS_blk, mask=tmask)
                    dz_ptrs = rec + m * dv + offs_m
                    tl.store(dz_ptrs, tl.load(dz_ptrs, mask=fmask, other=0.0) + dz_blk, mask=fmask)
        dx = _finish_input_grad(dx, dl_sum, x, xs, FEATURE, True)
        tl.store(dq_base + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                 _cast_out(dx, dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
        if STATE and NMB > 1:
            tl.debug_barrier()  # this row block's sums are complete before the next one reads them
    if STATE and NMB == 1:
        fmask = _below(offs_f, m, FULL_F)
        tl.store(rec + offs_f[:, None] * dv + offs_v[None, :], dS_regs, mask=fmask[:, None] & vmask[None, :])
        tl.store(rec + m * dv + offs_f, dz_regs, mask=fmask)


@triton.jit
def _dstate_bwd(
    q_ptr, whi_ptr, wlo_ptr, do_o_ptr, do_ptr, stats_ptr, part_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_wm, stride_wd,
    HQ, NMB, N, m, d, dv, tokens, rec_size, xs, ratio, eps,
    FEATURE: tl.constexpr, LP: tl.constexpr, FULL_F: tl.constexpr, FULL_N: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (query head × feature block, query split): the split's partial ``dS = Σ φ(q)dnumᵀ``
    and ``dz = Σ φ(q)dden`` of one feature block, feature-major like ``_state_fwd`` (φ(q) of a
    row block is a ``(BMB, BN)`` tile, the dot's first operand as it stands), into the A and a
    slots of the split's record. φ(q) uses the forward's row offsets (``stats``); each row's
    ``do·o`` comes from the query sweep (``do_o``). The row's 1/den scales φ (folded into FAVOR's
    ratio), so do enters the dot as it is: ``dS = Σ (φ/den) doᵀ``, ``dz = −Σ (φ/den)(do·o)``."""
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
    fmask = _below(offs_m, m, FULL_F)
    dmask = _below(offs_d, d, FULL_F)
    vmask = _below(offs_v, dv, FULL_F)
    whi, wlo = _load_w_rows(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD, FULL_F)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    g_base = do_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    do_o_base = do_o_ptr + bh.to(tl.int64) * N
    den_base = stats_ptr + bh.to(tl.int64) * N
    qmax_base = stats_ptr + (tl.num_programs(0) // NMB + bh).to(tl.int64) * N  # after B·HQ rows of den
    acc = tl.zeros([BMB, BDV], dtype=tl.float32)
    zacc = tl.zeros([BMB], dtype=tl.float32)
    start = pid_p * tokens
    stop = tl.minimum(start + tokens, N)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        rows = _below(offs_n, stop, FULL_N)
        xt = tl.load(q_base + offs_n[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=rows[None, :] & dmask[:, None], other=0.0)
        do = tl.load(g_base + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gd,
                     mask=rows[:, None] & vmask[None, :], other=0.0)
        inv_den = 1.0 / tl.load(den_base + offs_n, mask=rows, other=1.0)
        do_o = tl.load(do_o_base + offs_n, mask=rows, other=0.0)
        row_max = tl.load(qmax_base + offs_n, mask=rows, other=0.0)
        p = _proj_blk_t(xt, whi, wlo, FEATURE, LP)
        keep = fmask[:, None] & rows[None, :]
        if FEATURE == 1:
            phi, _ = _apply(p, row_max[None, :], ratio * inv_den[None, :], eps, keep, FEATURE, True)
        else:
            phi, _ = _apply(p, row_max[None, :], ratio, eps, keep, FEATURE, True)
            phi = phi * inv_den[None, :]
        acc += _dot(phi, do, LP)
        zacc -= tl.sum(phi * do_o[None, :], axis=1)
    rec = part_ptr + (bh * num_p + pid_p).to(tl.int64) * rec_size
    tl.store(rec + offs_m[:, None] * dv + offs_v[None, :], acc, mask=fmask[:, None] & vmask[None, :])
    tl.store(rec + m * dv + offs_m, zacc, mask=fmask)


@triton.jit
def _kv_bwd(
    k_ptr, v_ptr, whi_ptr, wlo_ptr, valid_ptr, S_ptr, dS_ptr, dSh_ptr, dk_ptr, dv_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_wm, stride_wd, stride_mb, stride_mn,
    HKV, NMB, N, m, d, dv, rec_size, xs, ratio, eps,
    FEATURE: tl.constexpr, USE_MAX: tl.constexpr, HAS_VALID: tl.constexpr, LP: tl.constexpr,
    FULL_F: tl.constexpr, FULL_N: tl.constexpr,
    BN: tl.constexpr, BMB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """Grid (key/value head, key block): dk and dv, feature block by block (dS, dz: the head's
    combined record, half inputs dot with its bf16 halves ``dSh``; S: its state record, for FAVOR's
    key offset)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    dmask = _below(offs_d, d, FULL_F)
    vmask = _below(offs_v, dv, FULL_F)
    rows = _below(offs_n, N, FULL_N)
    drec = dS_ptr + pid_bh.to(tl.int64) * rec_size
    drec_hi = dSh_ptr + pid_bh.to(tl.int64) * (2 * m * dv)
    if USE_MAX:
        offset = tl.load(S_ptr + pid_bh.to(tl.int64) * rec_size + m * dv + m + dv + 1)
    else:
        offset = 0.0
    valid = _valid_keys(valid_ptr, stride_mb, stride_mn, b, offs_n, rows, HAS_VALID)
    x = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=rows[:, None] & dmask[None, :], other=0.0)
    if FEATURE == 1:  # each key's exponent offset (base 2): the norm term and the head's key max
        offset = (_favor_norm(x, xs, 1) + offset)[:, None]
    vv = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                 + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                 mask=rows[:, None] & vmask[None, :], other=0.0)
    dx = tl.zeros([BN, BD], dtype=tl.float32)
    dl_sum = tl.zeros([BN], dtype=tl.float32)
    dvv = tl.zeros([BN, BDV], dtype=tl.float32)
    for mb in range(0, NMB):
        offs_m = mb * BMB + tl.arange(0, BMB)
        fmask = _below(offs_m, m, FULL_F)
        whi, wlo = _load_w_blk(whi_ptr, wlo_ptr, stride_wm, stride_wd, mb, m, d, FEATURE, BMB, BD, FULL_F)
        phi, factor = _apply(_proj_blk(x, whi, wlo, FEATURE, LP), offset, ratio, eps,
                             valid[:, None] & fmask[None, :], FEATURE, True)
        tile = offs_m[:, None] * dv + offs_v[None, :]
        tmask = fmask[:, None] & vmask[None, :]
        dz = tl.load(drec + m * dv + offs_m, mask=fmask, other=0.0)
        if LP:
            dS_hi = tl.load(drec_hi + tile, mask=tmask, other=0.0)
            dphi = _dot_halves(vv, tl.trans(dS_hi), tl.trans(tl.load(drec_hi + m * dv + tile, mask=tmask, other=0.0)))
            dvv += _dot(phi, dS_hi, LP)
        else:
            dS = tl.load(drec + tile, mask=tmask, other=0.0)
            dphi = _dot_split(vv, tl.trans(dS), LP, True)
            dvv += _dot(phi, dS, LP)
        dphi += dz[None, :]
        dx, dl_sum = _add_input_grad_blk(dx, dl_sum, dphi * factor, whi, FEATURE, LP)
    dx = _finish_input_grad(dx, dl_sum, x, xs, FEATURE, True)
    tl.store(dk_ptr + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _cast_out(dx, dk_ptr.dtype.element_ty), mask=rows[:, None] & dmask[None, :])
    dvv = tl.where(valid[:, None], dvv, 0.0)
    tl.store(dv_ptr + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvd,
             _cast_out(dvv, dv_ptr.dtype.element_ty), mask=rows[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- host side
# Each call runs a plan: the launches of one layout (shapes, strides, dtypes, alignment) and
# feature map, built once (see ``_launch.Launch``); per call only the buffers are allocated.


FEATURE_BLOCK = 64  # features per block of the projected maps (ELU: one block of width d)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _contiguous_strides(*shape: int) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def full_blocks(cfg: FeatureConfig, d: int, dv: int) -> bool:
    """Whether m, d and dv fill their blocks exactly: the kernels' FULL_F (feature, input and
    value masks compiled out)."""
    m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
    return m == NMB * BMB and d == BD and dv == BDV


def full_rows(n: int, bn: int, tokens: int | None = None) -> bool:
    """Whether every BN-row block of n rows (cut into splits of ``tokens``) is whole: FULL_N."""
    return n % bn == 0 and (tokens is None or tokens % bn == 0)


def feature_blocks(cfg: FeatureConfig, d: int, dv: int) -> tuple[int, int, int, int, int]:
    """(m, feature block BMB, number of blocks, BD, BDV): ELU is one block of width d."""
    m = cfg.features(d)
    _, BD, BDV = block_sizes(m, d, dv)
    BMB = BD if cfg.feature == "elu" else min(FEATURE_BLOCK, block_sizes(m, d, dv)[0])
    return m, BMB, triton.cdiv(m, BMB), BD, BDV


RECORD_ALIGN = 32  # words: records start 128-byte aligned, so tiles of S load vectorised


def _aligned(words: int) -> int:
    """``words`` rounded up to a multiple of ``RECORD_ALIGN``."""
    return triton.cdiv(words, RECORD_ALIGN) * RECORD_ALIGN


def record_size(m: int, dv: int) -> int:
    """fp32 words of one state record: ``A (m×dv) | a (m) | Σv (dv) | count | offsets (m)``,
    padded to a multiple of ``RECORD_ALIGN``.

    Partial key states, their combinations, the backward's partial ``dS``/``dz`` (A and a
    slots) and the causal scans' running states all use this layout; the offsets are FAVOR's
    key stabiliser per feature (a combined or scanned record keeps its single offset in the
    first). The kernels get the size as an argument: Triton specialises integers divisible by 16, so
    ``base + i·size`` is known aligned (an unpadded size made every S tile load scalar:
    measured 2.4–3.8× slower ``_out_fwd`` and query backward for FAVOR+ m=256 on the H100)."""
    return _aligned(m * dv + m + dv + 1 + m)


def weight_strides(cfg: FeatureConfig, d: int) -> tuple[int, int]:
    """Strides of the split projection (contiguous ``(m, d)``; a dummy for ELU)."""
    return (0, 0) if cfg.projection is None else (d, 1)


def _splits(n: int, programs: int, device, bn: int) -> int:
    """Tokens per split: enough splits to fill the device, whole multiples of 256."""
    splits = max(1, min(triton.cdiv(n, bn), num_programs_hint(device) // max(1, programs)))
    return triton.cdiv(triton.cdiv(n, splits), 256) * 256


def state_launch(k, v, valid, cfg: FeatureConfig, *, tokens: int | None = None,
                 folded: bool = False) -> tuple[Launch, int]:
    """The ``_state_fwd`` launch over splits of ``tokens`` keys and the number of splits P.

    It writes ``B·Hkv·P`` records (:func:`record_size`) of partial key states
    ``(k, v, w_hi, w_lo, mask, records)``; ``folded``: w is ``cfg.split_weight(…, folded=True)``
    and FAVOR's offsets come out in base-2 units."""
    B, HKV, N, d = k.shape
    dv = v.shape[-1]
    m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
    launch = pick_config("state", m, d, dv)
    if tokens is None:
        tokens = _splits(N, B * HKV * NMB, k.device, launch["BN"])
    P = triton.cdiv(N, tokens)
    _, smb, smn = key_valid_arg(valid, k)
    return Launch(
        _state_fwd, (B * HKV * NMB, P),
        (*_strides(k), *_strides(v), *weight_strides(cfg, d), smb, smn, HKV, NMB, N, m, d, dv, tokens,
         record_size(m, dv), cfg.x_scale),
        dict(FEATURE=FEATURE_CODES[cfg.feature], USE_MAX=cfg.use_key_max, HAS_VALID=valid is not None,
             LP=cfg.low_precision(k), FULL_F=full_blocks(cfg, d, dv), FULL_N=full_rows(N, launch["BN"], tokens),
             FOLDED=folded, BMB=BMB, BD=BD, BDV=BDV, **launch), k.device,
    ), P


def combine_launch(outputs: int, sources: int, m: int, dv: int, BMB: int, BDV: int, NMB: int, *, mult: float,
                   const: float, use_max: bool, device, halves: bool = False, sums: bool = False) -> Launch:
    """``_combine_parts``: ``outputs`` records, each the sum of ``sources`` consecutive ones
    ``(parts, records, halves, sums)``; ``halves``/``sums``: also write those (else dummies)."""
    return Launch(_combine_parts, (outputs, NMB), (sources, m, dv, record_size(m, dv), float(mult),
                                                    float(const)),
                  dict(USE_MAX=use_max, HAS_CONST=const != 0.0, HALVES=halves, SUMS=sums, BMB=BMB, BDV=BDV,
                       BM=max(16, triton.next_power_of_2(m))), device)


class StateBuffers:
    """One fp32 allocation for a combined state: the records, their bf16 halves (half-precision
    inputs), the per-block column sums and ``tail`` more words (the forward's per-row stats), as
    views (``records``, ``halves``, ``sums``, ``tail``). Each section starts 128-byte aligned.
    One allocation, not four: at small N the host time per call is what counts (run 12)."""

    def __init__(self, count: int, m: int, dv: int, NMB: int, BDV: int, *, halves: bool, tail: int = 0):
        self.records = count * record_size(m, dv)
        # bf16 hi + lo of each record's m×dv tile: m·dv fp32 words
        self.halves = _aligned(count * m * dv) if halves else 0
        self.sums = _aligned(count * NMB * (BDV + 1))
        self.tail = tail

    def allocate(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = torch.empty(self.records + self.halves + self.sums + self.tail, device=device, dtype=torch.float32)
        at = self.records + self.halves
        records = flat[:self.records]
        halves = flat[self.records:at].view(torch.bfloat16) if self.halves else records
        return records, halves, flat[at:at + self.sums], flat[at + self.sums:]


class _ForwardPlan:
    def __init__(self, q, k, v, valid, cfg: FeatureConfig):
        B, HQ, N, d = q.shape
        HKV, dv = k.shape[1], v.shape[-1]
        m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
        self.state, P = state_launch(k, v, valid, cfg, folded=True)
        mult, const = cfg.state_terms()
        lp = cfg.low_precision(q)
        self.combine = combine_launch(B * HKV, P, m, dv, BMB, BDV, NMB, mult=mult, const=const,
                                      use_max=cfg.use_key_max, device=q.device, halves=lp, sums=True)
        rec = record_size(m, dv)
        self.parts, self.rows = B * HKV * P * rec, B * HQ * N
        # the tail: each query row's denominator, then FAVOR's row offset (base 2)
        self.buffers = StateBuffers(B * HKV, m, dv, NMB, BDV, halves=lp, tail=2 * self.rows)
        self.o_shape = (B, HQ, N, dv)
        launch = pick_config("out", m, d, dv)
        self.out = Launch(
            _out_fwd, (B * HQ, triton.cdiv(N, launch["BN"])),
            (*_strides(q), *_contiguous_strides(*self.o_shape), *weight_strides(cfg, d),
             HQ, HQ // HKV, NMB, N, m, d, dv, rec, cfg.x_scale, cfg.ratio, cfg.eps, cfg.den_eps),
            dict(FEATURE=FEATURE_CODES[cfg.feature], STAB=cfg.stabilize, LP=cfg.low_precision(q),
                 FULL_F=full_blocks(cfg, d, dv), BMB=BMB, BD=BD, BDV=BDV, **launch), q.device,
        )


# How the backward sums dS, dz: "fused" (``_q_bwd_fused`` sums them in the same sweep as dq, φ(q)
# computed once) or "split" (``_dstate_bwd``, feature-major, beside a dq-only query sweep);
# "auto": fused for one feature block (the sums stay in registers), split for more (the fused
# sweep read-modify-writes them in its record). H100, N = 65,536, B = 1, H = 16, d = 64, bf16,
# fwd+bwd ms (benchmarks/results/h100/run8): FAVOR+ m = 256 fused 3.66, split 3.44; elu+1 fused
# 1.19, split 1.33.
QUERY_BACKWARD = os.environ.get("APPROXATTN_QUERY_BACKWARD", "auto")
if QUERY_BACKWARD not in ("auto", "fused", "split"):
    raise ValueError(f"APPROXATTN_QUERY_BACKWARD: expected 'auto', 'fused' or 'split', got {QUERY_BACKWARD!r}")


class _BackwardPlan:
    def __init__(self, do, q, k, v, valid, cfg: FeatureConfig):
        B, HQ, N, d = q.shape
        HKV, NK, dv = k.shape[1], k.shape[2], v.shape[-1]
        G = HQ // HKV
        m, BMB, NMB, BD, BDV = feature_blocks(cfg, d, dv)
        common = dict(FEATURE=FEATURE_CODES[cfg.feature], LP=cfg.low_precision(q), FULL_F=full_blocks(cfg, d, dv),
                      BMB=BMB, BD=BD, BDV=BDV)
        o_strides = _contiguous_strides(B, HQ, N, dv)
        w_strides = weight_strides(cfg, d)
        self.dq_shape, self.dk_shape, self.dv_shape = q.shape, k.shape, v.shape
        self.rows = B * HQ * N
        rec = record_size(m, dv)
        dq_strides = _contiguous_strides(*q.shape)
        fused = QUERY_BACKWARD == "fused" or (QUERY_BACKWARD == "auto" and NMB == 1)
        launch = pick_config("q_bwd_fused" if fused else "q_bwd", m, d, dv)
        # fused: one program a multiprocessor: a program holds one alone (8 warps × 255 registers), and
        # each split more costs the combine a record (H100, FAVOR+ m = 256, B·H = 16: 64 splits
        # made the combine 0.20 ms slower, this kernel no faster)
        tokens = _splits(N, B * HQ * (PROGRAMS_PER_SM if fused else 1), q.device, launch["BN"])
        P = triton.cdiv(N, tokens)
        self.q_bwd = Launch(
            _q_bwd_fused, (B * HQ, P),
            (*_strides(q), *o_strides, *_strides(do), *dq_strides, *w_strides,
             HQ, G, N, m, d, dv, tokens, rec, cfg.x_scale, cfg.ratio, cfg.eps),
            dict(**common, NMB=NMB, STATE=fused, FULL_N=full_rows(N, launch["BN"], tokens), **launch), q.device,
        )
        self.dstate = None
        if not fused:
            launch = pick_config("dstate", m, d, dv)
            tokens = _splits(N, B * HQ * NMB, q.device, launch["BN"])
            P = triton.cdiv(N, tokens)
            self.dstate = Launch(
                _dstate_bwd, (B * HQ * NMB, P),
                (*_strides(q), *_strides(do), *w_strides,
                 HQ, NMB, N, m, d, dv, tokens, rec, cfg.x_scale, cfg.ratio, cfg.eps),
                dict(**common, FULL_N=full_rows(N, launch["BN"], tokens), **launch), q.device,
            )
        # P: the query splits of whichever launch writes the partial dS, dz records
        self.parts = B * HQ * P * rec
        lp = cfg.low_precision(q)
        self.buffers = StateBuffers(B * HKV, m, dv, NMB, BDV, halves=lp)
        self.combine = combine_launch(B * HKV, G * P, m, dv, BMB, BDV, NMB, mult=1.0, const=0.0, use_max=False,
                                      device=q.device, halves=lp)
        _, smb, smn = key_valid_arg(valid, k)
        launch = pick_config("kv_bwd", m, d, dv)
        self.kv_bwd = Launch(
            _kv_bwd, (B * HKV, triton.cdiv(NK, launch["BN"])),
            (*_strides(k), *_strides(v), *_contiguous_strides(*k.shape), *_contiguous_strides(*v.shape),
             *w_strides, smb, smn, HKV, NMB, NK, m, d, dv, rec, cfg.x_scale, cfg.ratio, cfg.eps),
            dict(USE_MAX=cfg.use_key_max, HAS_VALID=valid is not None, **common, FULL_N=full_rows(NK, launch["BN"]),
                 **launch), q.device,
        )


_FORWARD_PLANS = PlanCache()
_BACKWARD_PLANS = PlanCache()


def _forward(q, k, v, valid, cfg: FeatureConfig):
    key = (layout_key(q, k, v, valid), cfg.key(q.shape[-1]))
    plan = _FORWARD_PLANS.get(key) or _FORWARD_PLANS.add(key, _ForwardPlan(q, k, v, valid, cfg))
    whi, wlo = cfg.split_weight(q, folded=True)
    mask = key_valid_arg(valid, k)[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    parts = torch.empty(plan.parts, **f32)
    state, halves, sums, stats = plan.buffers.allocate(q.device)
    o = torch.empty(plan.o_shape, device=q.device, dtype=q.dtype)
    plan.state(k, v, whi, wlo, mask, parts)
    plan.combine(parts, state, halves, sums)
    plan.out(q, whi, wlo, state, halves, sums, o, stats)
    return o, stats, (state, halves), key


def _backward(do, q, k, v, o, stats, state, halves, valid, forward_key, cfg: FeatureConfig):
    key = (forward_key, layout_key(do), QUERY_BACKWARD)
    plan = _BACKWARD_PLANS.get(key) or _BACKWARD_PLANS.add(key, _BackwardPlan(do, q, k, v, valid, cfg))
    whi, wlo = cfg.split_weight(q, folded=True)
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty(plan.dq_shape, device=q.device, dtype=q.dtype)
    # the partial dS, dz records, then (split query backward) each row's do·o from the query sweep
    # to _dstate_bwd: scratch, one allocation
    scratch = torch.empty(plan.parts + (0 if plan.dstate is None else plan.rows), **f32)
    parts = scratch[:plan.parts]
    do_o = stats if plan.dstate is None else scratch[plan.parts:]
    plan.q_bwd(q, whi, wlo, state, halves, o, do, stats, dq, parts, do_o)
    if plan.dstate is not None:
        plan.dstate(q, whi, wlo, do_o, do, stats, parts)
    dstate, dhalves, dsums, _ = plan.buffers.allocate(q.device)
    plan.combine(parts, dstate, dhalves, dsums)
    dk = torch.empty(plan.dk_shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(plan.dv_shape, device=v.device, dtype=v.dtype)
    plan.kv_bwd(k, v, whi, wlo, key_valid_arg(valid, k)[0], state, dstate, dhalves, dk, dv)
    return dq, dk, dv


class _FeatureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, valid, cfg):
        o, stats, (state, halves), key = _forward(q, k, v, valid, cfg)
        ctx.save_for_backward(q, k, v, o, stats, state, halves, valid)
        ctx.cfg, ctx.key = cfg, key
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats, state, halves, valid = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, stats, state, halves, valid, ctx.key, ctx.cfg)
        return dq, dk, dv, None, None, None


def chunk_free_feature_attention(q, k, v, cfg: FeatureConfig, key_padding_mask=None):
    """Non-causal fused kernel attention → ``(B, Hq, Nq, dv)`` in q's dtype (see module doc)."""
    return _FeatureAttention.apply(q, k, v, cfg.projection, key_padding_mask, cfg)
