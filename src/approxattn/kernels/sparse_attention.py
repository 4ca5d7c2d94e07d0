"""Triton forward kernel for exact attention on a compressed-column mask (SEA's sparse step).

Same op as :func:`approxattn.blocks.sparse_attention.column_mask_attention`, for inference.

Host side (tensor ops, ``O(B·H·N·T / BM)`` plus the sort of each block's T columns, no
``Nq × Nk`` tensor and no host sync): each head's rows are first sorted so that a block's rows read
the same few keys, and blocks are cut from that order: by selected columns where all rows share one
length (non-causal, :func:`rows_by_columns`), by the first key of their first column otherwise
(causal, :func:`rows_by_first_keys`; then each column's run spans the lengths of the rows that
chose it, :func:`tile_runs_by_column_lengths`). Then for every (batch, head, block of ``BM``
query rows),

1. the block's rows have lengths ``L ∈ [L_min, L_max]``; column c of any of them holds ranks
   inside ``[lo_c(L_min), hi_c(L_max))`` (lo and hi grow with L), so its keys lie between the
   positions of those two ranks: a run of ``BN``-key tiles ``[first_c, last_c]`` (a superset for
   causal rows and for padding in the middle of a sequence, exact otherwise up to tile edges);
2. the columns selected by *any* row of the block keep their runs; runs are non-decreasing in c,
   so overlaps (a tile shared by neighbouring columns) are cut against the running maximum of
   the previous runs' ends: every tile is visited once;
3. the non-empty runs are compacted to the front (``start``, ``count``) with their number ``runs``.

Kernel (grid: query block × batch·head): flash-attention online softmax over those tiles; the
exact per-element mask is computed in registers: key rank (−1 padded), ``rank < L_i`` and
``selected[b, h, i, c(i, j)]`` read from global memory, ``c = ((2·rank + 1)·T) // (2·L_i)`` via
an fp32 estimate corrected to the exact integer quotient (no integer division per element).
Grouped-query heads index their key/value head; rows with no key give 0; fp32 math
(bf16/fp16 tiles go through tensor cores with fp32 accumulation; fp32 inputs use IEEE dots).

:func:`flex_column_mask_attention` runs the same op through FlexAttention (a ``BlockMask`` from
the same runs and a ``mask_mod`` reading the same tables): a peer for the benchmark.
"""

from __future__ import annotations

import os

import torch

from ..blocks.sparse_attention import (
    ColumnLayout,
    _check_attention,
    _positions_by_rank,
    check_row_mix,
    column_rank_range,
)
from .dispatch import HAS_TRITON, interpreting, kernels_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _INTERPRET, _cast_out, _round_bf16
else:  # pragma: no cover - the module still imports, fast_column_mask_attention returns None
    triton = None

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634

# Launch configuration by head dim (tuned on an H100 at N = 16K–64K, bf16; see benchmarks/results/h100/sea).
CONFIGS = {64: {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
           128: {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
           256: {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1}}
OVERRIDE: dict[str, int] = {}   # tuning runs set this


def uniform_tiles() -> bool:
    """Whether the kernel masks a tile by one bit a row where it can, on layouts whose rows share one
    length (non-causal). Causal rows each move the column edges, so few tiles qualify: on an H100 at
    N = 65,536 the check bought nothing there (sparse stage 5.8–6.5 ms with it, 5.4–6.3 without),
    against 4.4–4.6 → 2.6 ms non-causal. ``APPROXATTN_SPARSE_UNIFORM_TILES=0`` forces the per-element
    column for every tile (A/B checks)."""
    return os.environ.get("APPROXATTN_SPARSE_UNIFORM_TILES", "1") != "0"


def triton_tile_runs() -> bool:
    """Whether the kernel builds its tile runs in one Triton launch (the default) instead of ~30
    small tensor ops (``APPROXATTN_TRITON_TILE_RUNS=0``, for A/B checks). Measured on an H100 at
    N = 65,536 (2026-11-24, `sea` module forward): sparse stage 7.58 → 5.95 ms non-causal,
    9.23 → 7.78 causal; the two agree exactly in the GPU tests."""
    return os.environ.get("APPROXATTN_TRITON_TILE_RUNS", "1") != "0"


def build_tile_runs(selected: torch.Tensor, layout: ColumnLayout, block_m: int, block_n: int,
                    order: torch.Tensor | None = None):
    """:func:`tile_runs_triton` or :func:`tile_runs` (:func:`triton_tile_runs` decides): the runs of
    blocks of rows in index order, or (``order (B, H, Nq)``, where all rows share one length) of
    blocks cut from each head's rows in that order."""
    if triton_tile_runs():
        return tile_runs_triton(selected, layout, block_m, block_n, order=order)
    if order is not None:
        B, H, Nq, T = selected.shape
        selected = selected.gather(2, order.long()[..., None].expand(B, H, Nq, T))
    return tile_runs(selected, layout, block_m, block_n)


def row_ordering() -> bool:
    """Whether equal-length layouts get their query rows grouped by selected columns before tiling
    (``APPROXATTN_SPARSE_ROW_ORDER=0`` turns it off, for A/B benchmarks)."""
    return os.environ.get("APPROXATTN_SPARSE_ROW_ORDER", "1") != "0"


def config_by_width(configs: dict[int, dict[str, int]], override: dict[str, int], d: int, dv: int, *,
                    interpreted: bool) -> dict[str, int]:
    """A sparse kernel's launch config: 16 × 16 tiles under the interpreter, else ``override`` when a tuning
    run set it, else ``configs`` of the head-dim bucket (64, 128, 256) holding ``max(d, dv)``."""
    if interpreted:
        return {"BM": 16, "BN": 16}
    if override:
        return dict(override)
    width = max(d, dv)
    return dict(configs[64 if width <= 64 else 128 if width <= 128 else 256])


def launch_config(d: int, dv: int) -> dict[str, int]:
    return config_by_width(CONFIGS, OVERRIDE, d, dv, interpreted=interpreting())


def first_two_selected(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)``, each ``(B, H, Nq)`` int64: the first and second selected column of each
    row, T where there is none. One Triton pass over the bool rows where Triton runs (CUDA, or the
    interpreter), else tensor ops (argmax, scatter, amax, argmax: five passes, ~1.4 ms at
    N = 65,536, T = 128 on an H100)."""
    T = selected.shape[-1]
    cells = selected.view(torch.uint8)
    if HAS_TRITON and (selected.is_cuda or interpreting()):
        return _first_two_selected_triton(cells)
    first = cells.argmax(dim=-1, keepdim=True)
    rest = cells.scatter(-1, first, 0)
    none = T * torch.ones((), dtype=torch.int64, device=selected.device)
    second = torch.where(rest.amax(dim=-1) > 0, rest.argmax(dim=-1), none)
    first = torch.where(cells.amax(dim=-1) > 0, first.squeeze(-1), none)
    return first, second


def _first_two_selected_triton(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Nq, T = cells.shape
    cells = cells.contiguous()
    rows = B * H * Nq
    first = torch.empty(B, H, Nq, dtype=torch.int64, device=cells.device)
    second = torch.empty_like(first)
    block = 16 if interpreting() else 64
    if rows:
        _first_two_kernel[(triton.cdiv(rows, block),)](cells, first, second, rows, T, BR=block,
                                                       BT=max(16, triton.next_power_of_2(T)))
    return first, second


def rows_by_columns(selected: torch.Tensor) -> torch.Tensor:
    """``(B, H, Nq)`` int32: per head, the query rows sorted by (first selected column, second
    selected column or T). Why: a query block's KV tiles are the union of its rows' columns; rows in
    index order pick scattered columns (at N = 65,536 and T = 128 a 64-row block of an untrained
    estimate unions nearly all 128), while rows grouped by column share one or two. Only valid
    where a column means the same keys for every row (``ColumnLayout.equal_lengths``)."""
    T = selected.shape[-1]
    first, second = first_two_selected(selected)
    key = torch.where(first < T, first, 0) * (T + 1) + second    # a row with none sorts as column 0
    return key.argsort(dim=-1, stable=True).to(torch.int32)


def rows_by_first_keys(selected: torch.Tensor, layout: ColumnLayout) -> torch.Tensor:
    """``(B, H, Nq)`` int32: per head, the query rows sorted by the first key rank of their first
    selected column (rows with none last). The row order for layouts whose rows have different
    lengths (causal): there a column's keys move with the row's length, so rows that share a
    column need not share keys, but rows sorted by where their first column starts do: at
    N = 65,536, T = 128 a row's column holds ~512 keys and a 64-row block of this order starts
    within a few dozen keys, against nearly every key for a block of rows in index order."""
    T = selected.shape[-1]
    first, _ = first_two_selected(selected)
    lo, _ = column_rank_range(first, layout.row_length[:, None, :], T)
    key = torch.where(first < T, lo, torch.full_like(lo, layout.seq_k))
    return key.argsort(dim=-1, stable=True).to(torch.int32)


def tile_runs_by_column_lengths(selected: torch.Tensor, row_length: torch.Tensor, layout: ColumnLayout,
                                block_m: int, block_n: int):
    """:func:`tile_runs` for blocks whose rows have different lengths (rows in any order):
    selected ``(B, H, Nq, T)`` and row_length ``(B, H, Nq)`` of the same rows.

    Column c of a block spans the lengths of the rows that *selected* it (not of every row of the
    block), so each column's run is that of its own rows; runs are no longer ordered by column, so
    they are sorted by first tile before the overlaps are cut (every tile visited once).
    """
    B, H, Nq, T = selected.shape
    Nk = layout.seq_k
    nmb = -(-Nq // block_m)
    pad = nmb * block_m - Nq
    cells = torch.nn.functional.pad(selected, (0, 0, 0, pad)).view(B, H, nmb, block_m, T)   # padded rows: unselected
    length = torch.nn.functional.pad(row_length.to(torch.int32), (0, pad)).view(B, H, nmb, block_m, 1)
    l_min = torch.where(cells, length, torch.full_like(length, Nk + 1)).amin(3).long()    # (B, H, NMB, T)
    l_max = torch.where(cells, length, torch.zeros_like(length)).amax(3).long()
    column = torch.arange(T, device=selected.device)
    lo, _ = column_rank_range(column, l_min, T)
    _, hi = column_rank_range(column, l_max, T)
    used = cells.any(3) & (hi > lo)
    positions = _positions_by_rank(layout)                          # (B, Nk)
    flat = lambda x: x.clamp(min=0, max=Nk - 1).flatten(1)  # noqa: E731
    first = torch.gather(positions, 1, flat(lo)).view_as(lo) // block_n
    last = torch.gather(positions, 1, flat(hi - 1)).view_as(hi) // block_n
    never = Nk // block_n + 1                                        # sorts unused columns last
    first = torch.where(used, first, torch.full_like(first, never))
    first, by_first = first.sort(dim=-1, stable=True)
    end = torch.where(used, last, torch.full_like(last, -1)).gather(-1, by_first)
    return _disjoint_runs(first, end)


def column_length_runs_triton(selected: torch.Tensor, layout: ColumnLayout, block_m: int, block_n: int,
                              order: torch.Tensor):
    """:func:`tile_runs_by_column_lengths` of each head's rows in ``order (B, H, Nq)``, the
    per-column tile ranges in one Triton launch that reads the rows through the order (the
    tensor ops gather ``selected`` in that order and reduce ``(B, H, NMB, BM, T)`` masks:
    ~1.7 ms at N = 65,536 causal on an H100); the sort by first tile and the cut stay tensor ops."""
    B, H, Nq, T = selected.shape
    Nk = layout.seq_k
    nmb = -(-Nq // block_m)
    sel, length = _unit_stride_tables(selected, layout)
    positions = _positions_by_rank(layout)
    order = order.to(torch.int32).contiguous()
    first = torch.empty(B, H, nmb, T, dtype=torch.int64, device=selected.device)
    end = torch.empty_like(first)
    _column_length_ends_kernel[(nmb, B * H)](
        sel, length, positions, order, first, end,
        sel.stride(0), sel.stride(1), sel.stride(2), length.stride(0), positions.stride(0),
        H, Nq, Nk, T, nmb, Nk // block_n + 1,
        BM=block_m, BN=block_n, BT=max(16, triton.next_power_of_2(T)),
    )
    first, by_first = first.sort(dim=-1, stable=True)
    return _disjoint_runs(first, end.gather(-1, by_first))


def _unit_stride_tables(selected: torch.Tensor, layout: ColumnLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``selected`` as uint8 and the layout's row lengths, each with a unit last stride (the kernels
    index their last axis without a stride); copied only where they are not."""
    sel = selected.view(torch.uint8)
    if sel.stride(3) != 1:
        sel = sel.contiguous()
    length = layout.row_length if layout.row_length.stride(1) == 1 else layout.row_length.contiguous()
    return sel, length


def _disjoint_runs(first: torch.Tensor, end: torch.Tensor):
    """Candidate runs ``[first, end]`` of KV tiles per (…, column), ordered by ``first`` along the
    last axis (``end`` −1: unused) → ``start, count, runs`` (see :func:`tile_runs`): each run cut
    against the running maximum of the previous ends (every tile visited once), then compacted."""
    covered = torch.nn.functional.pad(end.cummax(-1).values[..., :-1], (1, 0), value=-1)
    start = torch.maximum(first, covered + 1)
    count = (end - start + 1).clamp(min=0)                          # 0 for unused and fully covered runs
    order = torch.sort((count == 0).to(torch.uint8), dim=-1, stable=True).indices
    start = torch.gather(start, -1, order).to(torch.int32).contiguous()
    count = torch.gather(count, -1, order).to(torch.int32).contiguous()
    runs = (count > 0).sum(-1, dtype=torch.int32)
    return start, count, runs


def tile_runs(selected: torch.Tensor, layout: ColumnLayout, block_m: int, block_n: int):
    """Per (batch, head, query block) the runs of KV tiles the kernel visits.

    Returns ``start, count`` ``(B, H, NMB, T)`` int32 (runs compacted to the front, in key order)
    and ``runs`` ``(B, H, NMB)`` int32, the number of runs.
    """
    B, H, Nq, T = selected.shape
    Nk = layout.seq_k
    nmb = -(-Nq // block_m)
    pad = nmb * block_m - Nq
    # rows past Nq repeat the last row's length, so they change neither the min nor the max
    length = torch.cat([layout.row_length, layout.row_length[:, -1:].expand(B, pad)], 1).view(B, nmb, block_m)
    l_min, l_max = length.amin(-1), length.amax(-1)
    column = torch.arange(T, device=selected.device)
    lo, _ = column_rank_range(column, l_min[..., None], T)          # (B, NMB, T)
    _, hi = column_rank_range(column, l_max[..., None], T)
    nonempty = hi > lo
    positions = _positions_by_rank(layout)                          # (B, Nk)
    first = torch.gather(positions, 1, lo.clamp(max=Nk - 1).flatten(1)).view_as(lo) // block_n
    last = torch.gather(positions, 1, (hi - 1).clamp(min=0, max=Nk - 1).flatten(1)).view_as(hi) // block_n
    used = torch.nn.functional.pad(selected, (0, 0, 0, pad)).view(B, H, nmb, block_m, T).any(3)
    used &= nonempty[:, None]                                       # (B, H, NMB, T)
    # one length range per block: runs grow with the column, so they are already ordered by first tile
    end = torch.where(used, last[:, None], torch.full_like(last[:, None], -1))
    return _disjoint_runs(first[:, None], end)


if HAS_TRITON:

    @triton.jit
    def _mma(a, b, PREC: tl.constexpr):
        """``a @ b`` with fp32 accumulation. The CPU interpreter mis-multiplies bf16 operands:
        there the operands are taken to fp32 (a rounded to b's dtype, as on the GPU) and
        multiplied exactly."""
        if _INTERPRET:
            if b.dtype == tl.bfloat16:
                a = _round_bf16(a.to(tl.float32))
            elif b.dtype == tl.float16:
                a = a.to(tl.float16)
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(b.dtype), b, input_precision=PREC)

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr):
        """One key tile of flash attention's online softmax: scores ``s (BM, BN)`` in base-2 units (masked
        keys −inf), values ``v (BN, BDV)`` → the new running max, sum and output accumulator of each row."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _mma(p, v, PREC)

    @triton.jit
    def _column_mask_fwd(
        q_ptr, k_ptr, v_ptr, o_ptr, sel_ptr, rank_ptr, len_ptr, start_ptr, count_ptr, runs_ptr, order_ptr,
        a_ptr, c_ptr, z_ptr, stride_zb, stride_zh, stride_zn, stride_zd,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_sb, stride_sh, stride_sn,
        stride_rb, stride_lb,
        H, G, Nq, Nk, d, dv, T, NMB, qk_scale,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
        ORDERED: tl.constexpr, UNIFORM_TILES: tl.constexpr, MIX: tl.constexpr,
    ):
        """Grid (query block, batch·head): one block of BM query rows of one head; with ORDERED, the
        block's rows are entries ``[pid·BM, (pid+1)·BM)`` of the head's row order."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        slot = pid_m * BM + tl.arange(0, BM)
        row_ok = slot < Nq
        if ORDERED:
            offs_m = tl.load(order_ptr + bh.to(tl.int64) * Nq + slot, mask=row_ok, other=0)
        else:
            offs_m = slot
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BDV)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d[None, :] < d), other=0.0)
        length = tl.load(len_ptr + b.to(tl.int64) * stride_lb + offs_m, mask=row_ok, other=0).to(tl.int32)
        den = 2 * tl.maximum(length, 1)
        inv_den = 1.0 / den.to(tl.float32)
        sel_row = (sel_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
                   + offs_m.to(tl.int64) * stride_sn)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BDV], dtype=tl.float32)
        run_base = (bh.to(tl.int64) * NMB + pid_m) * T
        n_runs = tl.load(runs_ptr + bh.to(tl.int64) * NMB + pid_m)
        for r in range(0, n_runs):
            t0 = tl.load(start_ptr + run_base + r)
            t1 = t0 + tl.load(count_ptr + run_base + r)
            for t in range(t0, t1):
                offs_n = t * BN + tl.arange(0, BN)
                key_ok = offs_n < Nk
                k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                            mask=key_ok[:, None] & (offs_d[None, :] < d), other=0.0)
                v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_v[None, :] * stride_vd,
                            mask=key_ok[:, None] & (offs_v[None, :] < dv), other=0.0)
                s = _mma(q, tl.trans(k), PREC) * qk_scale
                # A tile of BN consecutive valid keys (ranks r0 … r0 + BN − 1) that, for every row, lies in
                # one column or wholly past the row's length: its mask is one bit a row (BM loads) instead
                # of a column per element (BM·BN gathers and integer math).
                full = (t * BN + BN <= Nk) & UNIFORM_TILES
                r0 = tl.load(rank_ptr + b.to(tl.int64) * stride_rb + t * BN, mask=full, other=-1)
                r1 = tl.load(rank_ptr + b.to(tl.int64) * stride_rb + t * BN + BN - 1, mask=full, other=-1)
                col0 = tl.minimum((2 * r0 + 1) * T // den, T - 1)
                inside = r1 < length
                row_uniform = ((col0 == tl.minimum((2 * r1 + 1) * T // den, T - 1)) & inside) | (r0 >= length)
                row_uniform = row_uniform | (~row_ok)
                uniform = (r0 >= 0) & (r1 - r0 == BN - 1) & (tl.min(row_uniform.to(tl.int32), axis=0) == 1)
                if uniform:
                    keep_row = tl.load(sel_row + col0, mask=inside & row_ok, other=0) != 0
                    s = tl.where(keep_row[:, None], s, float("-inf"))
                else:
                    rank = tl.load(rank_ptr + b.to(tl.int64) * stride_rb + offs_n, mask=key_ok, other=-1).to(tl.int32)
                    eligible = (rank[None, :] >= 0) & (rank[None, :] < length[:, None]) & row_ok[:, None]
                    # c = num // den exactly: an fp32 quotient is off by at most one, then corrected
                    num = (2 * rank[None, :] + 1) * T
                    col = (num.to(tl.float32) * inv_den[:, None]).to(tl.int32)
                    col = tl.where(col * den[:, None] > num, col - 1, col)
                    col = tl.where((col + 1) * den[:, None] <= num, col + 1, col)
                    col = tl.minimum(tl.maximum(col, 0), T - 1)
                    keep = tl.load(sel_row[:, None] + col, mask=eligible, other=0) != 0
                    s = tl.where(keep, s, float("-inf"))
                m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PREC)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if MIX:   # out·a + c·z per row (a, c contiguous (B, H, Nq) fp32; z one vector a head or a row)
            a = tl.load(a_ptr + bh.to(tl.int64) * Nq + offs_m, mask=row_ok, other=0.0)
            c = tl.load(c_ptr + bh.to(tl.int64) * Nq + offs_m, mask=row_ok, other=0.0)
            z = tl.load(z_ptr + b.to(tl.int64) * stride_zb + h.to(tl.int64) * stride_zh
                        + offs_m[:, None].to(tl.int64) * stride_zn + offs_v[None, :] * stride_zd,
                        mask=row_ok[:, None] & (offs_v[None, :] < dv), other=0.0).to(tl.float32)
            out = out * a[:, None] + c[:, None] * z
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                 + offs_m[:, None].to(tl.int64) * stride_on + offs_v[None, :] * stride_od,
                 _cast_out(out, o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_v[None, :] < dv))


if HAS_TRITON:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _first_two_kernel(cells_ptr, first_ptr, second_ptr, R, T, BR: tl.constexpr, BT: tl.constexpr):
        """Grid (row block): the first and second selected column of each of BR rows of T cells (T: none)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.arange(0, BT)
        row_ok = rows < R
        cells = tl.load(cells_ptr + rows[:, None].to(tl.int64) * T + cols[None, :],
                        mask=row_ok[:, None] & (cols[None, :] < T), other=0)
        column = tl.where(cells != 0, cols[None, :], T)
        first = tl.min(column, 1)
        second = tl.min(tl.where(column > first[:, None], column, T), 1)
        tl.store(first_ptr + rows, first.to(tl.int64), mask=row_ok)
        tl.store(second_ptr + rows, second.to(tl.int64), mask=row_ok)

    @triton.jit
    def _column_length_ends_kernel(
        sel_ptr, len_ptr, pos_ptr, order_ptr, first_ptr, end_ptr,
        stride_sb, stride_sh, stride_sn, stride_lb, stride_pb,
        H, Nq, Nk, T, NMB, NEVER,
        BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
    ):
        """Grid (query block, batch·head): for the block of rows ``order[b, h, block]``, each column's
        KV tile range over the lengths of the rows that selected it: first tile (NEVER if no row
        did) and last tile (−1), as :func:`tile_runs_by_column_lengths` builds them before sorting."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_m * BM + tl.arange(0, BM)
        row_ok = rows < Nq
        source = tl.load(order_ptr + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=0)
        length = tl.load(len_ptr + b.to(tl.int64) * stride_lb + source, mask=row_ok, other=0).to(tl.int64)
        c = tl.arange(0, BT)
        cmask = c < T
        cells = tl.load(sel_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
                        + source[:, None].to(tl.int64) * stride_sn + c[None, :],
                        mask=row_ok[:, None] & cmask[None, :], other=0) != 0
        l_min = tl.min(tl.where(cells, length[:, None], Nk + 1), 0)
        l_max = tl.max(tl.where(cells, length[:, None], 0), 0)
        lo = (2 * c * l_min + T - 1) // (2 * T)
        hi = (2 * (c + 1) * l_max + T - 1) // (2 * T)
        used = cmask & (tl.max(cells.to(tl.int32), 0) > 0) & (hi > lo)
        pos = pos_ptr + b.to(tl.int64) * stride_pb
        first = tl.load(pos + tl.minimum(tl.maximum(lo, 0), Nk - 1), mask=used, other=0) // BN
        last = tl.load(pos + tl.minimum(tl.maximum(hi - 1, 0), Nk - 1), mask=used, other=0) // BN
        out = (bh.to(tl.int64) * NMB + pid_m) * T + c
        tl.store(first_ptr + out, tl.where(used, first, NEVER).to(tl.int64), mask=cmask)
        tl.store(end_ptr + out, tl.where(used, last, -1).to(tl.int64), mask=cmask)

    @triton.jit
    def _column_runs(sel_ptr, pos_ptr, c, row_ok, Nk, T, BN: tl.constexpr, l_min, l_max, cmask):
        """First/last KV tile and "used by a row of the block" for columns c (a vector)."""
        lo = (2 * c * l_min + T - 1) // (2 * T)
        hi = (2 * (c + 1) * l_max + T - 1) // (2 * T)
        ok = cmask & (c >= 0) & (hi > lo)
        first = tl.load(pos_ptr + tl.minimum(lo, Nk - 1), mask=ok, other=0) // BN
        last = tl.load(pos_ptr + tl.minimum(tl.maximum(hi - 1, 0), Nk - 1), mask=ok, other=0) // BN
        tile = tl.load(sel_ptr + c[None, :], mask=row_ok[:, None] & ok[None, :], other=0)
        used = (tl.max(tile.to(tl.int32), 0) > 0) & ok
        return first.to(tl.int32), last.to(tl.int32), used

    @triton.jit
    def _tile_runs_kernel(
        sel_ptr, len_ptr, pos_ptr, start_ptr, count_ptr, runs_ptr, order_ptr,
        stride_sb, stride_sh, stride_sn, stride_lb, stride_pb,
        H, Nq, Nk, T, NMB,
        BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, ORDERED: tl.constexpr,
    ):
        """Grid (query block, batch·head): :func:`tile_runs` for one block, in registers; with
        ORDERED the block's rows are rows ``order[b, h, block]`` (all of one length), read in place."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_m * BM + tl.arange(0, BM)
        row_ok = rows < Nq
        length = tl.load(len_ptr + b.to(tl.int64) * stride_lb + rows, mask=row_ok, other=0).to(tl.int32)
        l_min = tl.min(tl.where(row_ok, length, 2147483647), 0)
        l_max = tl.max(length, 0)
        source = rows
        if ORDERED:
            source = tl.load(order_ptr + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=0)
        sel = (sel_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
               + source[:, None].to(tl.int64) * stride_sn)
        pos = pos_ptr + b.to(tl.int64) * stride_pb
        c = tl.arange(0, BT)
        cmask = c < T
        first, last, used = _column_runs(sel, pos, c, row_ok, Nk, T, BN, l_min, l_max, cmask)
        # the previous column's end (−1 when unused), recomputed rather than shifted in registers
        _, last_prev, used_prev = _column_runs(sel, pos, c - 1, row_ok, Nk, T, BN, l_min, l_max, cmask)
        end_prev = tl.where(used_prev, last_prev, -1)
        covered = tl.associative_scan(end_prev, 0, _max_combine)     # max end of the columns before c
        start = tl.maximum(first, covered + 1)
        count = tl.where(used, tl.maximum(last - start + 1, 0), 0)
        live = count > 0
        slot = tl.cumsum(live.to(tl.int32), 0) - 1
        out = (bh.to(tl.int64) * NMB + pid_m) * T
        tl.store(start_ptr + out + slot, start, mask=live)
        tl.store(count_ptr + out + slot, count, mask=live)
        tl.store(runs_ptr + bh.to(tl.int64) * NMB + pid_m, tl.sum(live.to(tl.int32), 0))


def tile_runs_triton(selected: torch.Tensor, layout: ColumnLayout, block_m: int, block_n: int,
                     order: torch.Tensor | None = None):
    """:func:`tile_runs` in one Triton launch (plus the rank → position table). Entries of
    ``start``/``count`` past ``runs`` are left unwritten. ``order (B, H, Nq)`` int32: the blocks'
    rows, read through it (the gather of ``selected`` in that order costs a pass over it)."""
    B, H, Nq, T = selected.shape
    nmb = -(-Nq // block_m)
    sel, length = _unit_stride_tables(selected, layout)
    positions = _positions_by_rank(layout)
    start = torch.empty(B, H, nmb, T, dtype=torch.int32, device=selected.device)
    count = torch.empty_like(start)
    runs = torch.empty(B, H, nmb, dtype=torch.int32, device=selected.device)
    if order is not None:
        order = order.to(torch.int32).contiguous()
    _tile_runs_kernel[(nmb, B * H)](
        sel, length, positions, start, count, runs, runs if order is None else order,
        sel.stride(0), sel.stride(1), sel.stride(2), length.stride(0), positions.stride(0),
        H, Nq, layout.seq_k, T, nmb,
        BM=block_m, BN=block_n, BT=max(16, triton.next_power_of_2(T)), ORDERED=order is not None,
    )
    return start, count, runs


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor) -> bool:
    """Whether the kernel covers these inputs (dtype, head dims, no gradient, int32 column math)."""
    if not HAS_TRITON or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    T = selected.shape[-1]
    return (2 * k.shape[2] + 1) * T < 2**31 and 2 * k.shape[2] * T < 2**31


def _cheaper_row_order(selected: torch.Tensor, layout: ColumnLayout, block_m: int, block_n: int):
    """Rows of different lengths (causal): per head, index order or :func:`rows_by_first_keys`,
    whichever visits fewer KV tiles, with its runs. Why both: where neighbouring rows choose the same
    columns (a smooth estimate) index order is best (a block's rows share lengths too); where they
    do not, index order visits half the causal triangle (counted on CPU at N = 65,536,
    T = 128, one random column per row: 4.0 M tiles against 0.15 M sorted by first key;
    benchmarks/causal_row_order_tiles.py).
    Returns ``order (B, H, Nq)`` int32 and the runs (see :func:`tile_runs`)."""
    B, H, Nq, T = selected.shape
    by_key = rows_by_first_keys(selected, layout)
    if triton_tile_runs():
        sorted_runs = column_length_runs_triton(selected, layout, block_m, block_n, by_key)
    else:
        ordered = selected.gather(2, by_key.long()[..., None].expand(B, H, Nq, T))
        length = layout.row_length[:, None, :].expand(B, H, Nq).gather(2, by_key.long())
        sorted_runs = tile_runs_by_column_lengths(ordered, length, layout, block_m, block_n)
    index_runs = build_tile_runs(selected, layout, block_m, block_n)

    def tiles(runs_of):   # KV tiles visited per head (entries past `runs` may be unwritten)
        _, count, runs = runs_of
        live = torch.arange(T, device=count.device) < runs[..., None]
        return torch.where(live, count, 0).sum((-1, -2))

    keep_index = tiles(index_runs) <= tiles(sorted_runs)               # (B, H)
    identity = torch.arange(Nq, device=selected.device, dtype=torch.int32).expand(B, H, Nq)
    order = torch.where(keep_index[..., None], identity, by_key).contiguous()
    start, count, runs = (torch.where(keep_index.view(B, H, *[1] * (x.dim() - 2)), a, x).contiguous()
                          for a, x in zip(index_runs, sorted_runs))
    return order, start, count, runs


def row_mix_args(mix, out: torch.Tensor):
    """The kernels' MIX arguments ``(a, c, z, z strides)`` for ``mix = (scale, shift_scale, shift)``: scale and
    shift_scale as contiguous fp32, shift read in place (stride 0 along the rows when it is one vector a
    head); without a mix, ``out`` as never-read dummies."""
    if mix is None:
        return out, out, out, (0, 0, 0, 0)
    a, c, z = mix
    a, c = (t.to(torch.float32).contiguous() for t in (a, c))
    return a, c, z, (z.stride(0), z.stride(1), 0 if z.shape[2] == 1 else z.stride(2), z.stride(3))


def column_mask_attention_triton(q, k, v, selected, layout: ColumnLayout, *, scale: float, mix=None) -> torch.Tensor:
    """The kernel's output (no checks beyond :func:`supported`; call through the fast path). mix: see
    :func:`fast_column_mask_attention`."""
    B, H, Nq, d = q.shape
    Hkv, Nk, dv = k.shape[1], k.shape[2], v.shape[3]
    T = layout.columns
    cfg = launch_config(d, dv)
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    if not (row_ordering() and Nq > BM):
        order = None
        start, count, runs = build_tile_runs(selected, layout, BM, BN)
    elif layout.equal_lengths:   # the runs of each block of ordered rows: only `selected` moves
        order = rows_by_columns(selected)
        start, count, runs = build_tile_runs(selected, layout, BM, BN, order=order)
    else:
        order, start, count, runs = _cheaper_row_order(selected, layout, BM, BN)
    nmb = start.shape[2]
    out = torch.empty(B, H, Nq, dv, dtype=q.dtype, device=q.device)
    sel, length = _unit_stride_tables(selected, layout)
    rank = layout.key_rank if layout.key_rank.stride(1) == 1 else layout.key_rank.contiguous()
    BD = max(16, triton.next_power_of_2(d))
    BDV = max(16, triton.next_power_of_2(dv))
    a, c, z, z_strides = row_mix_args(mix, out)
    _column_mask_fwd[(nmb, B * H)](
        q, k, v, out, sel, rank, length, start, count, runs, runs if order is None else order,
        a, c, z, *z_strides,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        sel.stride(0), sel.stride(1), sel.stride(2), rank.stride(0), length.stride(0),
        H, H // Hkv, Nq, Nk, d, dv, T, nmb, float(scale) * LOG2E,
        BM=BM, BN=BN, BD=BD, BDV=BDV, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        ORDERED=order is not None, UNIFORM_TILES=uniform_tiles() and layout.equal_lengths, MIX=mix is not None,
        **cfg,
    )
    return out


def fast_column_mask_attention(q, k, v, selected, layout: ColumnLayout, *, scale: float,
                               mix=None) -> torch.Tensor | None:
    """The Triton kernel's output, or None where it does not apply (then use the reference).

    mix: None, or ``(scale, shift_scale, shift)`` applied to each row before the store (SEA's gates):
    ``scale·out + shift_scale·shift`` with scale, shift_scale ``(B, H, Nq)`` and shift ``(B, H, 1 or
    Nq, dv)``: :func:`approxattn.blocks.sparse_attention.apply_row_mix` after the reference, in one
    pass less over the output.

    None when: not CUDA (unless ``TRITON_INTERPRET=1`` and ``APPROXATTN_FORCE_KERNELS=1``),
    Triton missing, ``APPROXATTN_DISABLE_KERNELS=1``, a gradient is required, the dtype is not
    fp16/bf16/fp32, a head dim is over 256, or ``(2·Nk + 1)·T`` overflows int32.
    Bad inputs raise like the reference.
    """
    _check_attention(q, k, v, selected, layout, scale)
    if mix is not None:
        check_row_mix(mix, (*q.shape[:3], v.shape[-1]))
    if not kernels_enabled(q) or not supported(q, k, v, selected):
        return None
    if mix is not None and torch.is_grad_enabled() and any(t.requires_grad for t in mix):
        return None
    return column_mask_attention_triton(q, k, v, selected, layout, scale=scale, mix=mix)


def flex_block_mask(selected: torch.Tensor, layout: ColumnLayout, block: int = 128):
    """A FlexAttention ``BlockMask`` for the op: KV blocks from :func:`tile_runs` at ``block`` tokens
    (``kv_indices`` padded to every KV block, so its tables are ``O(N² / block²)``) and a
    ``mask_mod`` reading the same rank / length / selected tables as the Triton kernel."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, Nq, T = selected.shape
    Nk = layout.seq_k
    start, count, _ = tile_runs(selected, layout, block, block)
    nkb = -(-Nk // block)
    # runs → a dense (B, H, NMB, NKB) block map through a difference array along the KV blocks
    edges = torch.zeros(*start.shape[:3], nkb + 1, dtype=torch.int32, device=selected.device)
    live = count > 0
    edges.scatter_add_(-1, torch.where(live, start, nkb).long(), live.to(torch.int32))
    edges.scatter_add_(-1, torch.where(live, start + count, nkb).long(), -live.to(torch.int32))
    blocks = edges.cumsum(-1)[..., :nkb] > 0
    num = blocks.sum(-1, dtype=torch.int32)
    indices = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    rank, length = layout.key_rank, layout.row_length

    def mask_mod(b, h, q_idx, kv_idx):
        r = rank[b, kv_idx]
        L = length[b, q_idx]
        c = torch.div((2 * r + 1) * T, 2 * L.clamp(min=1), rounding_mode="floor").clamp(0, T - 1)
        return (r >= 0) & (r < L) & selected[b, h, q_idx, c]

    return BlockMask.from_kv_blocks(num, indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Nq, Nk))


def flex_column_mask_attention(q, k, v, selected, layout: ColumnLayout, *, scale: float, block_mask=None,
                               compiled=None):
    """The same op through FlexAttention (benchmark peer; CUDA, torch ≥ 2.5).

    block_mask: from :func:`flex_block_mask` (built here when None); compiled: a
    ``torch.compile``d ``flex_attention`` to reuse across calls (eager FlexAttention is quadratic).
    """
    from torch.nn.attention.flex_attention import flex_attention

    _check_attention(q, k, v, selected, layout, scale)
    mask = flex_block_mask(selected, layout) if block_mask is None else block_mask
    fn = compiled or flex_attention
    return fn(q, k, v, block_mask=mask, scale=float(scale), enable_gqa=q.shape[1] != k.shape[1])


__all__ = ["fast_column_mask_attention", "flex_block_mask", "flex_column_mask_attention", "rows_by_columns",
           "supported", "tile_runs", "tile_runs_triton"]
