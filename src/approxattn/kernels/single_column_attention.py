"""Triton forward kernel for SEA's sparse step when every query row selected exactly one column.

Same op as :func:`approxattn.blocks.sparse_attention.column_mask_attention` with ``selected`` one-hot
per row, for inference on unpadded layouts whose rows share one length ``L`` (non-causal). That is
SEA's default at long N: the budget ``round(k·T/L)`` is one cell per row from N ≈ 16K at k = 64,
T = 128, so each row attends to the ~L/T keys of its best column.

Why a kernel of its own: the general kernel (``kernels/sparse_attention.py``) cuts blocks of rows
from a sort by columns, so a block may straddle two columns; it then builds tile runs and checks,
per KV tile, whether the tile lies in one column for every row of the block (else it computes a
column per element). Here the blocks are cut *per column*: rows are sorted by column (a 16-bit key),
every column's rows are split into blocks of ``BM``, and every block reads exactly its column's keys,
a contiguous range of ranks ``[lo_c, hi_c)`` (ranks are positions in an unpadded layout). No mask is
read and no tile runs are built; the masked edge is the range's last tile. On an H100 at N = 65,536
(run 17) the kernel with its tables took 0.78 ms against 2.52 for the general path on the same rows;
the tables (sort, counts, cumsums) are 0.29 ms of it.

Host side (tensor ops on the device, no host sync): per (batch, head) the rows' columns are sorted
(``order``), counted per column (``row_start``: the first entry of each column in ``order``) and
split into ``ceil(count_c / BM)`` blocks (``block_start``). The grid has ``ceil(Nq/BM) + T``
programs per head, an upper bound on the blocks; a program past the last block does nothing.
"""

from __future__ import annotations

import torch

from ..blocks.sparse_attention import ColumnLayout, check_row_mix
from .dispatch import HAS_TRITON, interpreting, kernels_enabled
from .sparse_attention import config_by_width, row_mix_args

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _cast_out
    from .sparse_attention import _mma, _online_softmax_step

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634

# Launch configuration by head dim. d = 64 swept on an H100 at N = 65,536, T = 128, bf16 (tables + kernel,
# benchmarks/single_column_tune.py, run17/call1/tune.log): 128 rows × 64 keys, 4 warps, 3 stages 0.78 ms,
# against 1.11 ms for 64 × 64 at 2 stages; 8 warps were slower everywhere (1.05–1.80). Wider heads not swept.
CONFIGS = {64: {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 3},
           128: {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
           256: {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1}}
OVERRIDE: dict[str, int] = {}   # tuning runs set this


def launch_config(d: int, dv: int) -> dict[str, int]:
    return config_by_width(CONFIGS, OVERRIDE, d, dv, interpreted=interpreting())


def applies(layout: ColumnLayout) -> bool:
    """Whether a layout is one this kernel covers: every row of one length and ranks equal to
    positions (no padding mask), i.e. ``equal_lengths`` with ``host_row_length`` known."""
    return layout.equal_lengths and layout.host_row_length is not None


def check_row_columns(row_column: torch.Tensor, q: torch.Tensor, layout: ColumnLayout) -> None:
    """``row_column (B, H, Nq)`` integer on q's device (values in ``[0, T)`` are the caller's
    promise: checking them would read the device)."""
    if not isinstance(row_column, torch.Tensor):
        raise TypeError(f"row_column: expected a torch.Tensor, got {type(row_column).__name__}")
    if row_column.dtype not in (torch.int16, torch.int32, torch.int64):
        raise TypeError(f"row_column: expected an int16/int32/int64 tensor, got {row_column.dtype}")
    if tuple(row_column.shape) != tuple(q.shape[:3]):
        raise ValueError(f"row_column: expected shape {tuple(q.shape[:3])} (q's batch, heads, seq), "
                         f"got {tuple(row_column.shape)}")
    if row_column.device != q.device:
        raise ValueError(f"row_column: expected q's device ({q.device}), got {row_column.device}")
    if not applies(layout):
        raise ValueError("layout: expected an unpadded layout whose rows share one length (non-causal, no "
                         "key_padding_mask): a column then means the same keys for every row")


def column_blocks(row_column: torch.Tensor, columns: int, block_m: int):
    """The block tables of the kernel: ``order (B, H, Nq)`` int32 (each head's rows sorted by
    column), ``row_start`` and ``block_start`` ``(B, H, T + 1)`` int32 (column c's rows are
    ``order[row_start[c]:row_start[c+1]]``, its blocks ``[block_start[c], block_start[c+1])``)."""
    B, H, Nq = row_column.shape
    keys = row_column.to(torch.int16 if columns < 2**15 else torch.int32)   # a 16-bit radix sort: two passes
    order = keys.sort(dim=-1).indices.to(torch.int32)      # unstable: a row's output does not depend on its block
    counts = torch.zeros(B, H, columns, dtype=torch.int32, device=row_column.device)
    counts.scatter_add_(-1, row_column.long(), torch.ones_like(order))
    zero = counts.new_zeros(B, H, 1)
    row_start = torch.cat([zero, counts.cumsum(-1, dtype=torch.int32)], dim=-1)
    blocks = (counts + (block_m - 1)) // block_m
    block_start = torch.cat([zero, blocks.cumsum(-1, dtype=torch.int32)], dim=-1)
    return order.contiguous(), row_start.contiguous(), block_start.contiguous()


def smooth_columns(batch: int, heads: int, seq: int, columns: int, *, generator: torch.Generator,
                   patch: int = 64, jitter: float = 0.2) -> torch.Tensor:
    """``(B, H, N)`` int64 columns drawn like an estimate's best cells: constant over patches of
    ``patch`` rows, each row moved to a neighbouring column with probability ``jitter`` (tests and
    benchmarks of the kernel)."""
    device = generator.device
    coarse = torch.randint(0, columns, (batch, heads, -(-seq // patch)), generator=generator, device=device)
    column = coarse.repeat_interleave(patch, dim=-1)[..., :seq]
    step = torch.randint(-1, 2, column.shape, generator=generator, device=device)
    moved = torch.rand(column.shape, generator=generator, device=device) < jitter
    return (column + step * moved).clamp(0, columns - 1)


if HAS_TRITON:

    @triton.jit
    def _single_column_fwd(
        q_ptr, k_ptr, v_ptr, o_ptr, order_ptr, row_start_ptr, block_start_ptr,
        a_ptr, c_ptr, z_ptr, stride_zb, stride_zh, stride_zn, stride_zd,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        H, G, Nq, L, d, dv, T, qk_scale,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BT: tl.constexpr,
        PREC: tl.constexpr, MIX: tl.constexpr,
    ):
        """Grid (block, batch·head): block ``pid`` of the head's column blocks, BM rows that all chose
        column c, attending to ranks ``[lo_c, hi_c)``."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        table = bh.to(tl.int64) * (T + 1)
        cols = tl.arange(0, BT)
        block_end = tl.load(block_start_ptr + table + 1 + cols, mask=cols < T, other=2147483647)
        c = tl.sum((block_end <= pid).to(tl.int32), 0)        # the column whose blocks hold pid
        if c < T:
            first_block = tl.load(block_start_ptr + table + c)
            row_end = tl.load(row_start_ptr + table + c + 1)
            slot = tl.load(row_start_ptr + table + c) + (pid - first_block) * BM + tl.arange(0, BM)
            row_ok = slot < row_end
            offs_m = tl.load(order_ptr + bh.to(tl.int64) * Nq + slot, mask=row_ok, other=0)
            offs_d = tl.arange(0, BD)
            offs_v = tl.arange(0, BDV)
            q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                        + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None] & (offs_d[None, :] < d), other=0.0)
            c64 = c.to(tl.int64)
            lo = (2 * c64 * L + T - 1) // (2 * T)             # column_rank_range
            hi = (2 * (c64 + 1) * L + T - 1) // (2 * T)
            k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
            v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
            m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, BDV], dtype=tl.float32)
            for start in range(lo, hi, BN):
                offs_n = start + tl.arange(0, BN)
                key_ok = offs_n < hi
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=key_ok[:, None] & (offs_d[None, :] < d), other=0.0)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                            mask=key_ok[:, None] & (offs_v[None, :] < dv), other=0.0)
                s = _mma(q, tl.trans(k), PREC) * qk_scale
                s = tl.where(key_ok[None, :], s, float("-inf"))
                m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PREC)
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]   # an empty column (L < T) gives 0
            if MIX:   # out·a + c·z per row, as the general kernel
                a = tl.load(a_ptr + bh.to(tl.int64) * Nq + offs_m, mask=row_ok, other=0.0)
                cs = tl.load(c_ptr + bh.to(tl.int64) * Nq + offs_m, mask=row_ok, other=0.0)
                z = tl.load(z_ptr + b.to(tl.int64) * stride_zb + h.to(tl.int64) * stride_zh
                            + offs_m[:, None].to(tl.int64) * stride_zn + offs_v[None, :] * stride_zd,
                            mask=row_ok[:, None] & (offs_v[None, :] < dv), other=0.0).to(tl.float32)
                out = out * a[:, None] + cs[:, None] * z
            tl.store(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                     + offs_m[:, None].to(tl.int64) * stride_on + offs_v[None, :] * stride_od,
                     _cast_out(out, o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_v[None, :] < dv))


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel covers these inputs (dtype, head dims, no gradient)."""
    if not HAS_TRITON or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))


def single_column_attention_triton(q, k, v, row_column, layout: ColumnLayout, *, scale: float,
                                   mix=None) -> torch.Tensor:
    """The kernel's output (no checks; call through :func:`fast_single_column_attention`)."""
    B, H, Nq, d = q.shape
    Hkv, dv = k.shape[1], v.shape[3]
    T = layout.columns
    cfg = launch_config(d, dv)
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    order, row_start, block_start = column_blocks(row_column, T, BM)
    out = torch.empty(B, H, Nq, dv, dtype=q.dtype, device=q.device)
    a, c, z, z_strides = row_mix_args(mix, out)
    grid = (triton.cdiv(Nq, BM) + T, B * H)                # at least the blocks of any head
    _single_column_fwd[grid](
        q, k, v, out, order, row_start, block_start, a, c, z, *z_strides,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // Hkv, Nq, int(layout.host_row_length[0]) if Nq else 0, d, dv, T, float(scale) * LOG2E,
        BM=BM, BN=BN, BD=max(16, triton.next_power_of_2(d)), BDV=max(16, triton.next_power_of_2(dv)),
        BT=max(16, triton.next_power_of_2(T)), PREC="ieee" if q.dtype == torch.float32 else "tf32",
        MIX=mix is not None, **cfg,
    )
    return out


def fast_single_column_attention(q, k, v, row_column, layout: ColumnLayout, *, scale: float,
                                 mix=None) -> torch.Tensor | None:
    """Exact attention of each query row on the keys of its one column ``row_column (B, H, Nq)``
    (values in ``[0, T)``), mixed per row by ``mix`` (see
    :func:`approxattn.kernels.sparse_attention.fast_column_mask_attention`) → ``(B, H, Nq, dv)`` in
    q's dtype; None where the kernel does not run (not CUDA unless forced under the interpreter,
    Triton missing, kernels disabled, a gradient required, dtype or head dim not covered). Equal to
    ``column_mask_attention`` on ``selected = one_hot(row_column)``."""
    check_row_columns(row_column, q, layout)
    if mix is not None:
        check_row_mix(mix, (*q.shape[:3], v.shape[-1]))
    if not kernels_enabled(q) or not supported(q, k, v):
        return None
    if mix is not None and torch.is_grad_enabled() and any(t.requires_grad for t in mix):
        return None
    return single_column_attention_triton(q, k, v, row_column, layout, scale=scale, mix=mix)


__all__ = ["applies", "column_blocks", "fast_single_column_attention", "smooth_columns"]
