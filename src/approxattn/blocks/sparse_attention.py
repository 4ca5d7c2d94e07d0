"""Exact softmax attention on a compressed-column mask: SEA's sparse step (reference).

SEA estimates, per query row i, a *compressed* attention row of ``T`` columns and selects some of
them (``selected (B, H, Nq, T)`` bool). Column ``c`` of row i stands for a contiguous run of keys:
key j, with index ``rank_j`` among the valid (non-padded) keys of its batch element, belongs to

    c(i, j) = ((2·rank_j + 1)·T) // (2·L_i)         (= floor(((rank_j + 0.5) / L_i)·T), in integers)

where ``L_i`` is the number of keys row i compresses over: every valid key (non-causal) or the valid
keys at positions ≤ i (causal). A key is *eligible* for row i when it is valid and ``rank_j < L_i``
(for causal rows that is exactly "not in the future"). The inverse map: column c of a row of length
L holds the ranks ``[lo_c, hi_c)`` with ``lo_c = (2·c·L + T − 1) // (2·T)``, ``hi_c = lo_{c+1}``
(from ``2cL ≤ (2r+1)T < 2(c+1)L``), so ``hi_{T−1} = L`` and the columns tile ``[0, L)``;
when L < T some columns are empty.

Exact softmax attention then runs on the keys of the selected columns only. Two PyTorch paths:

- ``dense``: build the ``(B, H, Nq, Nk)`` mask and run a masked softmax (small problems and
  training, where the N×N scores exist anyway).
- ``gather``: per chunk of query rows, list each row's selected columns, turn them into rank
  ranges and key positions, gather those keys and run the softmax on them. Memory is
  ``O(rows_per_chunk · keys_per_row)``; nothing ``Nq × Nk`` is formed.

Both are differentiable with autograd. The Triton kernel for inference lives in
``approxattn.kernels.sparse_attention``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..cached import derived, handed_out

# Above this many (batch · heads · Nq · Nk) mask cells, ``path="auto"`` takes the gather path.
DENSE_CELLS_LIMIT = 1 << 25
# The gather path sizes its row chunks so one chunk gathers at most this many (row, key) pairs.
GATHER_PAIRS_PER_CHUNK = 1 << 20


@dataclass(frozen=True)
class ColumnLayout:
    """How the ``columns`` compressed columns of every query row map onto keys.

    key_rank: ``(B, Nk)`` int64, index of key j among its batch element's valid keys; −1 when padded.
    row_length: ``(B, Nq)`` int64, ``L_i`` ≥ 0, the number of keys row i compresses over.
    columns: ``T``.
    equal_lengths: every row of a batch element has the same ``L`` (non-causal layouts), so a
    column means the same keys for every row (kernels may then group rows by their columns).
    host_row_length: ``(Nq,)`` int64 on the CPU, the rows' lengths shared by every batch element,
    when they are known without reading the device (no padding mask); None otherwise. Lets
    callers size work on the host without a GPU sync.
    """

    key_rank: torch.Tensor
    row_length: torch.Tensor
    columns: int
    equal_lengths: bool = False
    host_row_length: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.key_rank.shape[0]

    @property
    def seq_q(self) -> int:
        return self.row_length.shape[1]

    @property
    def seq_k(self) -> int:
        return self.key_rank.shape[1]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def column_layout(
    batch: int,
    seq_q: int,
    seq_k: int,
    columns: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> ColumnLayout:
    """The layout of ``columns`` compressed columns over ``seq_k`` keys for ``seq_q`` query rows.

    causal requires self-attention (``seq_q == seq_k``): row i compresses the valid keys at
    positions ≤ i. key_padding_mask: ``(batch, seq_k)`` bool, True = keep (its device wins).
    """
    batch, seq_q, seq_k, columns = (_positive_int(n, v) for n, v in
                                    (("batch", batch), ("seq_q", seq_q), ("seq_k", seq_k), ("columns", columns)))
    if causal and seq_q != seq_k:
        raise ValueError(f"causal: expected self-attention (seq_q == seq_k), got seq_q={seq_q}, seq_k={seq_k}")
    if key_padding_mask is None:
        return handed_out(_unpadded_layout(batch, seq_q, seq_k, columns, causal, _resolved(device)))
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask: expected a bool tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = keep), got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (batch, seq_k):
        raise ValueError(f"key_padding_mask: expected shape {(batch, seq_k)}, got {tuple(key_padding_mask.shape)}")
    valid = key_padding_mask
    count = valid.long().cumsum(dim=1)                       # valid keys at positions ≤ j
    key_rank = torch.where(valid, count - 1, torch.full_like(count, -1))
    row_length = count if causal else count[:, -1:].expand(batch, seq_q).contiguous()
    return ColumnLayout(key_rank, row_length, columns, equal_lengths=not causal)


def _resolved(device) -> torch.device:
    """``device`` with a CUDA index (the current device's when none is given), as a cache key."""
    device = torch.device(device) if device is not None else torch.empty(0).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=16)
def _unpadded_layout(batch: int, seq_q: int, seq_k: int, columns: int, causal: bool,
                     device: torch.device) -> ColumnLayout:
    """The layout of unpadded inputs: a function of the sizes alone, so built once per size (an SEA
    module calls :func:`column_layout` every forward; building it, with its host copy of the
    lengths, took ~0.2 ms of host time on the H100 machine). Nothing writes to a layout's tensors.
    Built outside inference mode: a layout first made under ``torch.inference_mode`` serves later calls
    (autograd, version counters) too."""
    with torch.inference_mode(False):
        key_rank = torch.arange(seq_k, device=device).expand(batch, seq_k)
        # built on each side: copying the host's lengths to the device would wait for the GPU
        if causal:
            host = torch.arange(1, seq_q + 1)
            row_length = torch.arange(1, seq_q + 1, device=device)
        else:
            host = torch.full((seq_q,), seq_k, dtype=torch.int64)
            row_length = torch.full((seq_q,), seq_k, dtype=torch.int64, device=device)
        return ColumnLayout(key_rank.contiguous(), row_length.expand(batch, seq_q).contiguous(), columns,
                            equal_lengths=not causal, host_row_length=host)


def layout_derived(layout: ColumnLayout, key: tuple, build):
    """``build()`` (tensors that depend on ``layout`` and ``key`` alone) once per cached unpadded layout
    (``host_row_length`` set: a model runs every layer on the same one, 30 layers a SmolLM2
    distillation step; keeping the column map, non-empty columns, budgets and probe rows saves ~110
    ops a SEA layer, though its host time on the H100 did not move beyond noise, 2026-11-25,
    benchmarks/results/h100/run15/layout_derived_ab); padded layouts, built per call, get a fresh
    value. Callers must not write to the result."""
    if layout.host_row_length is None:
        return build()
    return derived(layout.row_length, key, build)


def _check_layout(layout) -> None:
    if not isinstance(layout, ColumnLayout):
        raise TypeError(f"layout: expected a ColumnLayout (from column_layout), got {type(layout).__name__}")


def column_of_rank(rank: torch.Tensor, length: torch.Tensor, columns: int) -> torch.Tensor:
    """``((2·rank + 1)·T) // (2·L)`` (broadcasting; callers mask ineligible entries, L = 0 gives 0)."""
    return torch.div((2 * rank + 1) * columns, (2 * length).clamp(min=1), rounding_mode="floor")


def column_rank_range(column: torch.Tensor, length: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks ``[lo, hi)`` that column c holds in a row of length L (broadcasting)."""
    lo = torch.div(2 * column * length + columns - 1, 2 * columns, rounding_mode="floor")
    hi = torch.div(2 * (column + 1) * length + columns - 1, 2 * columns, rounding_mode="floor")
    return lo, hi


def key_columns(layout: ColumnLayout) -> torch.Tensor:
    """``(B, Nq, Nk)`` int64: the column of every (row, key); −1 where the key is not eligible.

    Dense, quadratic memory: tests, training and visualisation only.
    """
    _check_layout(layout)
    rank = layout.key_rank[:, None, :]
    length = layout.row_length[:, :, None]
    eligible = (rank >= 0) & (rank < length)
    return torch.where(eligible, column_of_rank(rank, length, layout.columns), torch.full_like(rank, -1))


def nonempty_columns(layout: ColumnLayout) -> torch.Tensor:
    """``(B, Nq, T)`` bool: the columns of row i that hold at least one eligible key (shared by the
    calls on one cached layout: do not write to it)."""
    _check_layout(layout)

    def build() -> torch.Tensor:
        column = torch.arange(layout.columns, device=layout.row_length.device)
        lo, hi = column_rank_range(column, layout.row_length[:, :, None], layout.columns)
        return hi > lo

    return layout_derived(layout, ("nonempty_columns",), build)


def _check_selected(selected, layout: ColumnLayout, heads: int | None = None) -> None:
    if not isinstance(selected, torch.Tensor):
        raise TypeError(f"selected: expected a bool tensor, got {type(selected).__name__}")
    if selected.dtype != torch.bool:
        raise TypeError(f"selected: expected dtype torch.bool, got {selected.dtype}")
    if selected.dim() != 4:
        raise ValueError(f"selected: expected a 4-D tensor (batch, heads, seq_q, columns), got {tuple(selected.shape)}")
    B, H, Nq, T = selected.shape
    expected = (layout.batch, heads if heads is not None else H, layout.seq_q, layout.columns)
    if (B, H, Nq, T) != expected:
        raise ValueError(f"selected: expected shape {expected} (batch, heads, seq_q, columns of the layout), "
                         f"got {tuple(selected.shape)}")
    if selected.device != layout.key_rank.device:
        raise ValueError(f"selected: expected the layout's device ({layout.key_rank.device}), got {selected.device}")


def dense_column_mask(selected: torch.Tensor, layout: ColumnLayout) -> torch.Tensor:
    """``(B, H, Nq, Nk)`` bool: ``selected[b, h, i, c(i, j)]`` where key j is eligible for row i."""
    _check_layout(layout)
    _check_selected(selected, layout)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        cols = key_columns(layout)                               # (B, Nq, Nk)
        return cols.clamp(min=0)[:, None], (cols >= 0)[:, None]  # (B, 1, Nq, Nk) column index, eligible

    index, eligible = layout_derived(layout, ("column_index",), build)
    B, H, Nq, _ = selected.shape
    return torch.gather(selected, 3, index.expand(B, H, Nq, layout.seq_k)) & eligible


def _check_attention(q, k, v, selected, layout, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seq, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device ({q.device}), got {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected q's dtype ({q.dtype}), got {k.dtype} and {v.dtype}")
    B, H, Nq, d = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k, v: expected (batch={B}, Hkv, Nk, ·) with matching Hkv and Nk, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {H}, got {k.shape[1]}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected head_dim {d} like q, got {k.shape[3]}")
    _check_layout(layout)
    if (layout.batch, layout.seq_q, layout.seq_k) != (B, Nq, k.shape[2]):
        raise ValueError(f"layout: expected batch={B}, seq_q={Nq}, seq_k={k.shape[2]} like q and k, "
                         f"got batch={layout.batch}, seq_q={layout.seq_q}, seq_k={layout.seq_k}")
    if layout.key_rank.device != q.device:
        raise ValueError(f"layout: expected q's device ({q.device}), got {layout.key_rank.device}")
    _check_selected(selected, layout, heads=H)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, Hkv, N, ·)`` → ``(B, H, N, ·)`` as a broadcast view (no copy until used in matmul)."""
    B, Hkv = x.shape[:2]
    groups = heads // Hkv
    return x[:, :, None].expand(B, Hkv, groups, *x.shape[2:]).reshape(B, heads, *x.shape[2:])


def _dense_attention(q, k, v, selected, layout, scale) -> torch.Tensor:
    mask = dense_column_mask(selected, layout)
    H = q.shape[1]
    logits = (q @ _repeat_kv(k, H).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    # a row with no key is all −inf: softmax gives NaN there, so zero it explicitly
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(mask.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=q.device))
    return probs @ _repeat_kv(v, H)


def _positions_by_rank(layout: ColumnLayout) -> torch.Tensor:
    """``(B, Nk)`` int64: the position of the valid key of each rank (entries past n_valid are 0)."""
    rank = layout.key_rank
    B, Nk = rank.shape
    # padded keys write into a spare slot Nk that is cut off afterwards
    slot = torch.where(rank >= 0, rank, torch.full_like(rank, Nk))
    positions = torch.zeros(B, Nk + 1, dtype=torch.int64, device=rank.device)
    positions.scatter_(1, slot, torch.arange(Nk, device=rank.device).expand(B, Nk))
    return positions[:, :Nk]


def _free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can still take (the driver's free memory plus what
    PyTorch's caching allocator holds unused); None off CUDA, where nothing is checked."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _check_autograd_memory(q, k, v, count_per_row, width_per_row) -> None:
    """Refuse, before allocating, a gather-path forward whose saved tensors cannot fit.

    Under autograd every row chunk's gathered keys and values, logits, probabilities and index
    tensors stay alive until the backward: about ``B·H·Σ_rows pairs·((d + dv + 2)·element + 17)``
    bytes, the pairs of a row being its selected columns times the widest column's keys. Causal SEA
    at 64K tokens asked for far more than an H100 has and failed deep inside the forward."""
    free = _free_memory(q.device)
    if free is None:
        return
    B, H, Nq, d = q.shape
    pairs = int((count_per_row.amax(dim=(0, 1)) * width_per_row.amax(dim=0)).sum())
    need = B * H * pairs * ((d + v.shape[-1] + 2) * q.element_size() + 17)
    if need > free:
        raise torch.OutOfMemoryError(
            f"SEA's sparse step under autograd (gather path, B={B}, H={H}, Nq={Nq}, Nk={k.shape[2]}) would keep "
            f"~{need / 2**30:.1f} GiB of gathered keys, values and probabilities for the backward; "
            f"{free / 2**30:.1f} GiB is free on {q.device}. Train on shorter sequences or smaller batches, or run "
            "inference under torch.no_grad() (the fused kernel, linear in N)")


def _gather_attention(q, k, v, selected, layout, scale) -> torch.Tensor:
    B, H, Nq, d = q.shape
    Hkv, Nk, dv = k.shape[1], k.shape[2], v.shape[3]
    T = layout.columns
    groups = H // Hkv
    device = q.device
    positions = _positions_by_rank(layout)                      # (B, Nk)
    # widest column of each row: ceil(L / T) ranks
    width_per_row = torch.div(layout.row_length + T - 1, T, rounding_mode="floor")  # (B, Nq)
    count_per_row = selected.sum(dim=-1)                        # (B, H, Nq) selected columns
    pairs_per_row = int((count_per_row * width_per_row[:, None]).max()) if Nq else 0
    out = torch.zeros(B, H, Nq, dv, dtype=q.dtype, device=device)
    if pairs_per_row == 0:
        return out
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        _check_autograd_memory(q, k, v, count_per_row, width_per_row)
    rows_per_chunk = max(1, GATHER_PAIRS_PER_CHUNK // (B * H * pairs_per_row))
    k_rows = k.reshape(B * Hkv * Nk, d)
    v_rows = v.reshape(B * Hkv * Nk, dv)
    # flat row offset of (b, kv head of h) in k_rows / v_rows
    base = ((torch.arange(B, device=device)[:, None] * Hkv + torch.arange(H, device=device)[None] // groups) * Nk)
    pieces = []
    for start in range(0, Nq, rows_per_chunk):
        stop = min(Nq, start + rows_per_chunk)
        sel = selected[:, :, start:stop]                        # (B, H, R, T)
        S = int(count_per_row[:, :, start:stop].max())          # most selected columns of a row here
        W = int(width_per_row[:, start:stop].max())             # most ranks in one column here
        if S == 0 or W == 0:
            pieces.append(torch.zeros(B, H, stop - start, dv, dtype=q.dtype, device=device))
            continue
        # the row's selected columns first, in column order (stable sort of "not selected")
        order = torch.sort((~sel).to(torch.uint8), dim=-1, stable=True).indices[..., :S]   # (B, H, R, S)
        column_used = torch.gather(sel, 3, order)                                          # (B, H, R, S)
        length = layout.row_length[:, None, start:stop, None]                              # (B, 1, R, 1)
        lo, hi = column_rank_range(order, length, T)                                       # (B, H, R, S)
        rank = lo[..., None] + torch.arange(W, device=device)                              # (B, H, R, S, W)
        valid = (rank < hi[..., None]) & column_used[..., None]
        rank = torch.where(valid, rank, torch.zeros_like(rank)).flatten(3)                 # (B, H, R, S·W)
        valid = valid.flatten(3)
        key_pos = torch.gather(positions[:, None, None, :].expand(B, H, stop - start, Nk), 3, rank)
        flat = base[:, :, None, None] + key_pos                                            # (B, H, R, S·W)
        keys = k_rows[flat]                                                        # (B, H, R, S·W, d)
        values = v_rows[flat]
        qc = q[:, :, start:stop]
        logits = (keys @ qc[..., None]).squeeze(-1) * scale                                # (B, H, R, S·W)
        logits = logits.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.where(valid.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=device))
        pieces.append((probs[..., None, :] @ values).squeeze(-2))
    return torch.cat(pieces, dim=2)


def column_mask_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    layout: ColumnLayout,
    *,
    scale: float,
    path: str = "auto",
) -> torch.Tensor:
    """Exact softmax attention of each query row over the keys of its selected columns.

    q ``(B, H, Nq, d)``, k ``(B, Hkv, Nk, d)``, v ``(B, Hkv, Nk, dv)`` with H a multiple of Hkv
    (query head h reads kv head ``h // (H // Hkv)``), selected ``(B, H, Nq, T)`` bool,
    layout from :func:`column_layout`. Returns ``(B, H, Nq, dv)`` in q's dtype, computed in fp32
    (fp64 inputs in fp64). A row with no key gives 0.

    path: ``"dense"`` (an ``Nq × Nk`` mask), ``"gather"`` (linear memory) or ``"auto"`` (dense up
    to ``DENSE_CELLS_LIMIT`` mask cells). Both are differentiable.
    """
    _check_attention(q, k, v, selected, layout, scale)
    if path not in ("auto", "dense", "gather"):
        raise ValueError(f"path: expected 'auto', 'dense' or 'gather', got {path!r}")
    B, H, Nq, _ = q.shape
    if path == "auto":
        path = "dense" if B * H * Nq * k.shape[2] <= DENSE_CELLS_LIMIT else "gather"
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute) if t.dtype != compute else t for t in (q, k, v))
    fn = _dense_attention if path == "dense" else _gather_attention
    return fn(qc, kc, vc, selected, layout, float(scale)).to(q.dtype)


def check_row_mix(mix, out_shape: tuple[int, ...]) -> None:
    """``mix = (scale, shift_scale, shift)`` for an output ``(B, H, Nq, dv)``: scale and shift_scale
    ``(B, H, Nq)``, shift ``(B, H, 1 or Nq, dv)`` (one vector a head, or one a row)."""
    if not (isinstance(mix, tuple) and len(mix) == 3 and all(isinstance(t, torch.Tensor) for t in mix)):
        raise TypeError(f"mix: expected a tuple (scale, shift_scale, shift) of tensors, got {type(mix).__name__}")
    B, H, Nq, dv = out_shape
    scale, shift_scale, shift = mix
    for name, t in (("mix scale", scale), ("mix shift_scale", shift_scale)):
        if tuple(t.shape) != (B, H, Nq):
            raise ValueError(f"{name}: expected shape {(B, H, Nq)}, got {tuple(t.shape)}")
    if shift.dim() != 4 or tuple(shift.shape[:2]) != (B, H) or shift.shape[2] not in (1, Nq) or shift.shape[3] != dv:
        raise ValueError(f"mix shift: expected shape ({B}, {H}, 1 or {Nq}, {dv}), got {tuple(shift.shape)}")


def apply_row_mix(out: torch.Tensor, mix) -> torch.Tensor:
    """``scale·out + shift_scale·shift`` per row (SEA's gates: σ(g0)σ(g1)·sparse + (1 − σ(g1))·average),
    in fp32 (fp64 for fp64 inputs); see :func:`check_row_mix` for the shapes."""
    check_row_mix(mix, tuple(out.shape))
    compute = torch.float64 if out.dtype == torch.float64 else torch.float32
    scale, shift_scale, shift = (t.to(compute) for t in mix)
    return torch.addcmul(shift_scale[..., None] * shift, scale[..., None], out.to(compute))


def column_mask_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    selected: torch.Tensor,
    layout: ColumnLayout,
    *,
    scale: float,
    head: int | None = None,
) -> torch.Tensor:
    """Dense ``(B, H, Nq, Nk)`` softmax probabilities on the mask (``(B, 1, Nq, Nk)`` for one ``head``).

    Zero outside the mask and on rows with no key. Quadratic: visualisation and tests.
    """
    v_dummy = k[..., :1]
    _check_attention(q, k, v_dummy, selected, layout, scale)
    H = q.shape[1]
    if head is not None:
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < H:
            raise ValueError(f"head: expected None or an int in [0, {H}), got {head!r}")
        groups = H // k.shape[1]
        q, selected = q[:, head:head + 1], selected[:, head:head + 1]
        k = k[:, head // groups:head // groups + 1]
    mask = dense_column_mask(selected, layout)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q.to(compute) @ _repeat_kv(k, q.shape[1]).to(compute).transpose(-1, -2)) * float(scale)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.where(mask.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=compute, device=q.device))
