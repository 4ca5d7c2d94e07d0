"""SEA's grouped top-k: which compressed cells of the estimated attention to compute exactly.

The estimate ``probs (B, H, Nq, T)`` (softmax over T compressed columns) is thinned to a bool
``selected (B, H, Nq, T)``. A cell of row i covers about ``L_i / T`` keys, so a row that keeps
``k·T / L_i`` cells attends to about k keys. Groupings (who shares a budget):

- ``"batch"``: all heads and rows of a sample share ``Σ_rows H·r_i`` cells (SEA's BERT default);
- ``"head"``: the rows of one (sample, head) share ``Σ_rows r_i`` cells;
- ``"query"``: every (head, row) keeps its own ``r_i`` cells;
- ``"causal_batch"``: the heads of one (sample, row) share ``H·r_i`` cells (SEA's OPT default),

with the per-row budget ``r_i = max(1, round(k·T / L_i))`` (as the reference code rounds it; 0 for
a row that sees no key). ``batch``/``head`` share budgets across rows, so a later row could change
an earlier row's cells: they are not causal.

Two rules make every row useful (this module's choices, see :func:`select_cells`): only cells that
hold at least one eligible key are candidates, and every (head, row) keeps its best candidate cell
whatever the shared budget does. Both leave the total number of kept cells at the budget.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..cached import TensorKeyedCache, derived
from .fast_kernels import fast_kernel

GROUPINGS = ("batch", "head", "query", "causal_batch")
CAUSAL_GROUPINGS = ("query", "causal_batch")

# Score offsets used to order cells inside a group (probabilities lie in [0, 1]).
_BEST_CELL_BONUS = 4.0      # a row's best cell outranks every ordinary cell
_NONCOMPETING_PENALTY = 2.0  # rows outside the shared budget rank after every competing cell


def row_budgets(row_length: torch.Tensor, k: int, columns: int) -> torch.Tensor:
    """Cells per row, ``(B, Nq)`` int64: ``max(1, round(k·T / L_i))``, 0 where ``L_i = 0``."""
    length = row_length.to(torch.float64)
    budget = torch.round(k * columns / length.clamp(min=1)).clamp(min=1).to(torch.int64)
    return torch.where(row_length > 0, budget, torch.zeros_like(budget))


class HostBudgets(NamedTuple):
    """What the host knows of the per-row budgets of every sample (unpadded layouts): the largest,
    their sum over the rows, and ``(start, stop)`` of the rows above one cell when they form one run
    (None otherwise)."""

    largest: int
    total: int
    run: tuple[int, int] | None


# host length tensor (and k, T) → HostBudgets: unpadded layouts are cached (``column_layout``), so
# their host lengths come back every call and are summarised once
_HOST_BUDGETS = TensorKeyedCache(limit=64)


def host_budgets(host_row_length: torch.Tensor, k: int, columns: int) -> HostBudgets:
    """:func:`row_budgets` of ``host_row_length (Nq,)`` (CPU) summarised, in numpy: torch's CPU ops on
    Nq elements took 2.6–3.6 ms of host time per call at N = 16–64K on the H100 machine (its
    intra-op thread pool), more than the GPU's whole SEA forward at 16K."""
    hit = _HOST_BUDGETS.get(host_row_length, k, columns)
    if hit is not None:
        return hit
    length = host_row_length.numpy()
    # as row_budgets: float64 k·T / L rounded half to even (np.round and torch.round agree), at least 1
    budget = np.where(length > 0, np.maximum(np.round(k * columns / np.maximum(length, 1).astype(np.float64)), 1), 0)
    above = np.flatnonzero(budget > 1)
    run = None
    if above.size and int(above[-1] - above[0]) + 1 == above.size:
        run = (int(above[0]), int(above[-1]) + 1)
    summary = HostBudgets(int(budget.max()) if budget.size else 0, int(budget.sum()), run)
    return _HOST_BUDGETS.put(host_row_length, summary, k, columns)


def best_cells_only(*, k: int, columns: int, grouping: str, candidates: torch.Tensor | None,
                    query_valid: torch.Tensor | None, host_row_length: torch.Tensor | None) -> bool:
    """Whether :func:`select_cells` with these arguments returns each row's best cell alone, known on
    the host (False where only the device knows): every column holds keys (no candidates), the
    rows' lengths are known on the host, no padded query row is left out of a shared budget, and
    every row's budget is one cell (``k·T/L_i < 1.5``: N ≥ 16,384 at the defaults). Then the
    selection is ``one_hot(row_best)``, and a kernel may take the column of each row instead."""
    if candidates is not None or host_row_length is None:
        return False
    if grouping in ("batch", "head") and query_valid is not None:
        return False
    return host_budgets(host_row_length, k, columns).largest <= 1


def select_cells(
    probs: torch.Tensor,
    candidates: torch.Tensor | None,
    row_length: torch.Tensor,
    *,
    k: int,
    grouping: str,
    query_valid: torch.Tensor | None = None,
    host_row_length: torch.Tensor | None = None,
    row_best: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped top-k of the estimate → ``selected (B, H, Nq, T)`` bool.

    probs ``(B, H, Nq, T)``: the estimated compressed attention (no gradient needed).
    candidates ``(B, Nq, T)`` bool: cells that hold an eligible key (``nonempty_columns``); None
    when every cell does (unpadded non-causal rows of at least T keys: no mask pass over the estimate).
    row_length ``(B, Nq)``: ``L_i``. query_valid ``(B, Nq)`` bool or None: rows of padded tokens
    (self-attention with a padding mask) are False; in ``batch``/``head`` grouping they do not
    take part in the shared budget (they rank after every valid row's cells and add nothing to
    the budget). Per-row groupings ignore it: a row's budget is its own. host_row_length ``(Nq,)``
    on the CPU: ``row_length`` of every sample, when the caller knows it without the device
    (``ColumnLayout.host_row_length``); the host's decisions (how many cells at most, which rows
    compete) then need no GPU sync. row_best ``(B, H, Nq)`` int64 or None: ``probs.argmax(-1)``
    when the caller has it (SEA's fused decoder head); read only where candidates is None.

    Algorithm: as SEA's reference, keep the cells of each group whose rank in the sorted scores is
    below the group's budget, with ties broken by the lower flat index (see :func:`_top_cells`). Deviation: each
    (head, row) with a candidate first gets its best cell (its score is raised above all others);
    the budget of every group is at least its number of rows with candidates, so this only moves
    cells between rows of a group (the totals are unchanged) and no head's row is left empty.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping: expected one of {GROUPINGS}, got {grouping!r}")
    B, H, Nq, T = probs.shape
    probs = probs.detach()
    shared = grouping in ("batch", "head")
    competing = (
        query_valid if (shared and query_valid is not None)
        else torch.ones(B, Nq, dtype=torch.bool, device=probs.device)
    )
    competing_cells = competing[:, None, :, None]

    # few full passes over the estimate (it is 0.5 GB at N = 65,536 in fp32): the score is built in
    # place and the best cell's bonus is scattered, not added as a dense mask
    # per-row groupings mask only the rows that compete (gathered below); every row's best candidate
    # comes from one pass (a Triton kernel on CUDA): the masked copy of the whole map and its argmax
    # took 0.85 + 0.56 ms at N = 65,536 causal on an H100
    lazy_mask = candidates is not None and not shared
    if candidates is None:
        score = probs                      # copied below before anything writes to it
        has_candidate = torch.ones(B, H, Nq, 1, dtype=torch.bool, device=probs.device)
    else:
        score = None if lazy_mask else probs.masked_fill(~candidates[:, None], float("-inf"))
        has_candidate = candidates.any(dim=-1)[:, None, :, None].expand(B, H, Nq, 1)
    if candidates is None and row_best is not None:
        best_index = row_best[..., None]                                                # (B, H, Nq, 1)
    elif score is None:
        best_index = _best_candidates(probs, candidates)[..., None]
    else:
        best_index = score.argmax(dim=-1, keepdim=True)
    best = torch.zeros(B, H, Nq, T, dtype=torch.bool, device=probs.device).scatter_(-1, best_index, has_candidate)
    # unpadded layouts are cached (host_row_length set), and so are their budgets
    budgets = (row_budgets(row_length, k, T) if host_row_length is None
               else derived(row_length, ("row_budgets", k, T), lambda: row_budgets(row_length, k, T)))
    every_row_competes = not (shared and query_valid is not None)
    per_row = budgets if every_row_competes else budgets * competing.to(torch.int64)    # (B, Nq)
    host = None
    if host_row_length is not None and (not shared or query_valid is None):
        host = host_budgets(host_row_length, k, T)                          # every sample's
    if (int(per_row.max()) if host is None else host.largest) <= 1:
        # one cell per row (k·T/L_i < 1.5: N ≥ 16,384 at the defaults): every group's budget is its
        # number of rows with a best cell, whose bonus ranks them first, so the best cells are the answer
        return best
    if shared and query_valid is not None and not bool(competing.all()):
        score = torch.where(competing_cells, score, score - _NONCOMPETING_PENALTY)
    if not lazy_mask:
        bonus = (has_candidate & competing_cells).to(score.dtype) * _BEST_CELL_BONUS
        if score is probs:
            score = score.clone()
        score.scatter_add_(-1, best_index, bonus)
    if grouping in ("batch", "head"):
        if grouping == "batch":
            rows = score.reshape(B, H * Nq, T)
            budget = H * per_row.sum(dim=1)
        else:
            rows = score.reshape(B * H, Nq, T)
            budget = per_row.sum(dim=1)[:, None].expand(B, H).reshape(-1)
        largest = None if host is None else (H if grouping == "batch" else 1) * host.total
        chosen = _top_cells_of_rows(rows, budget, largest=largest).reshape(B, H, Nq, T) | best
        return chosen if candidates is None else chosen & candidates[:, None]
    # per-row groupings: a row whose budget is one cell per head keeps its best cells (as above), so
    # only the rows with more compete: at N = 65,536 causal, the first 5,461 of 65,536 (k·T/L ≥ 1.5)
    batch_index, row_index, largest = _competing_rows(per_row, host)
    if lazy_mask:   # the competing rows' scores: masked and their best cells raised here
        rows = probs[batch_index, :, row_index].masked_fill(~candidates[batch_index, None, row_index], float("-inf"))
        bonus = has_candidate[batch_index, :, row_index].to(rows.dtype) * _BEST_CELL_BONUS        # (R, H, 1)
        rows.scatter_add_(-1, best_index[batch_index, :, row_index], bonus)
    else:
        rows = score[batch_index, :, row_index]                                      # (R, H, T)
    budget = per_row[batch_index, row_index]                                         # (R,)
    if grouping == "query":
        largest = None if largest is None else min(largest, T)
        chosen = _top_cells(rows.reshape(-1, T), budget.repeat_interleave(H), largest=largest).view(rows.shape)
    else:  # causal_batch: heads of one row share the budget
        largest = None if largest is None else min(H * largest, H * T)
        chosen = _top_cells(rows.reshape(-1, H * T), H * budget, largest=largest).view(rows.shape)
    if candidates is not None:
        # cells past the candidates (budget larger than what a group holds) are dropped here, on the
        # competing rows only: a best cell is a candidate already (a row with none keeps none)
        chosen &= candidates[batch_index, None, row_index]
    best[batch_index, :, row_index] |= chosen
    return best


# Groups at least this large find their threshold by bisection instead of ``topk``: for a few
# huge rows (SEA's ``batch`` grouping holds H·N·T cells per sample, 134 M at N = 65,536) CUDA's
# topk sorts the whole row; the bisection is ~32 passes of compare-and-count, no sort, but ~130
# launches (a few ms of host time), so smaller groups sort. On CPU topk is faster (measured:
# 1.4 s vs 4.8 s for 33 M cells on 2 cores), so only CUDA bisects.
BISECTION_MIN_CELLS = 1 << 22
BISECTION_DEVICES = ("cuda",)
# Shared-budget groups at least this large try the per-row candidate shortcut first.
CANDIDATE_MIN_CELLS = 1 << 16


def _best_candidates(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``(B, H, Nq)``: each row's argmax of probs over its candidate columns (0 where none), by the
    Triton kernel where it applies, else a masked copy and argmax."""
    fast = fast_kernel("sea_select", "fast_masked_row_argmax")
    found = fast(probs, candidates) if fast is not None else None
    if found is not None:
        return found
    return probs.masked_fill(~candidates[:, None], float("-inf")).argmax(dim=-1)


def _competing_rows(per_row: torch.Tensor, host: HostBudgets | None):
    """``(batch_index, row_index, largest)`` of the rows whose budget is above one cell, and the largest
    budget (None if unknown on the host). From the host's summary when those rows form one run, as in
    unpadded layouts (budgets fall with the length, which grows or stays): indices built on the device,
    no sync; else ``nonzero`` on the device (one host sync)."""
    if host is not None and host.run is not None:
        B, device = per_row.shape[0], per_row.device
        row_index = torch.arange(*host.run, device=device)
        batch_index = torch.arange(B, device=device).repeat_interleave(row_index.numel())
        return batch_index, row_index.repeat(B), host.largest
    batch_index, row_index = (per_row > 1).nonzero(as_tuple=True)
    return batch_index, row_index, None


def _top_cells(flat: torch.Tensor, budget: torch.Tensor, *, largest: int | None = None) -> torch.Tensor:
    """``(G, M)`` scores, ``(G,)`` budgets → bool ``(G, M)``: the ``budget[g]`` best cells of row g,
    equal scores taken lowest index first (what a stable descending sort would keep).

    Equal scores are common (the causal decoder upsamples its width by repetition) and must be
    broken the same way every time, or decoding one row would pick other cells than the full
    forward; ``topk`` alone does not promise an order among ties. So we only find each row's
    threshold (the budget-th score): everything above it is kept, and of the cells equal to it
    the first ones in index order fill the rest. The threshold comes from ``topk`` for small
    groups and from a bisection on the scores' order-preserving integer keys for large ones
    (:func:`_kth_largest_keys`; float32 and narrower, fp64 always uses topk); both give the same
    cells.
    """
    groups, cells = flat.shape
    budget = budget.clamp(max=cells)
    if largest is None or not budget.numel():   # ``largest``: the caller's bound on the budgets (no sync)
        largest = int(budget.max()) if budget.numel() else 0
    if largest == 0:
        return torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if cells >= BISECTION_MIN_CELLS and flat.dtype != torch.float64 and flat.device.type in BISECTION_DEVICES:
        keys = _order_keys(flat)
        threshold = _kth_largest_keys(keys, budget.clamp(min=1))
        above, tied = keys > threshold, keys == threshold
    else:
        values = torch.topk(flat, largest, dim=-1, sorted=True).values
        threshold = values.gather(-1, (budget - 1).clamp(min=0)[:, None])            # (G, 1)
        above, tied = flat > threshold, flat == threshold
    missing = budget[:, None] - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= missing))
    return chosen & (budget > 0)[:, None]


def _top_cells_of_rows(rows: torch.Tensor, budget: torch.Tensor, *, largest: int | None = None) -> torch.Tensor:
    """:func:`_top_cells` of each group's rows flattened: ``rows (G, R, T)``, ``budget (G,)`` → bool
    ``(G, R, T)``. Large groups first try :func:`_top_cells_by_candidates` (same cells, a fraction of
    the passes over the estimate) with 2× a row's mean budget of candidates, then 4× more each
    time it declines. ``largest``: every group's budget when the host knows it (unpadded layouts).
    While a CUDA graph is being captured, with ``largest`` known, the full search runs at once: the
    shortcut decides on the host whether its answer is exact, which a capture cannot do (same cells)."""
    groups, count, T = rows.shape
    if largest is not None:
        largest = min(largest, count * T)
        if _capturing(rows):
            return _top_cells(rows.reshape(groups, count * T), budget, largest=largest).reshape(rows.shape)
    if count * T >= CANDIDATE_MIN_CELLS and rows.dtype != torch.float64 and budget.numel():
        if largest is None:
            largest = int(budget.clamp(max=count * T).max())
        per_row = max(2, 2 * -(-largest // count))
        while per_row < T:
            chosen = _top_cells_by_candidates(rows, budget, per_row, largest=largest)
            if chosen is not None:
                return chosen
            per_row *= 4
    return _top_cells(rows.reshape(groups, count * T), budget, largest=largest).reshape(rows.shape)


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s work is being recorded into a CUDA graph (no host reads allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _row_top(rows: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices ``(..., count)`` of each row's ``count`` largest cells, largest first (ties
    in any order). One or two cells by argmax: CUDA's ``topk`` over many short rows is ~10× slower
    than an argmax pass (6.8 ms for 1 M rows of 128 on an H100)."""
    if count > 2:
        return rows.topk(count, dim=-1, sorted=True)
    index = rows.argmax(dim=-1, keepdim=True)
    if count == 2:
        second = rows.scatter(-1, index, float("-inf")).argmax(dim=-1, keepdim=True)
        index = torch.cat([index, second], dim=-1)
    return rows.gather(-1, index), index


def _top_cells_by_candidates(rows: torch.Tensor, budget: torch.Tensor, per_row: int, *,
                             largest: int | None = None) -> torch.Tensor | None:
    """The cells of :func:`_top_cells` on ``rows (G, R, T)`` flattened per group, found among each
    row's ``per_row`` best cells only; None when that shortcut cannot prove its answer exact.

    Why: a shared budget (``batch``/``head`` grouping) spans H·N·T cells per group (134 M at
    N = 65,536) but keeps only about k·T/N of them per row (one per row at long N). The top-k over
    R·per_row candidates is then a small problem. Exactness: let τ be the lowest chosen candidate of
    a group. When every row's ``per_row``-th best cell lies strictly below τ, every cell at or
    above τ is a candidate, so the full top-k keeps the same cells; candidates are laid out in
    flat-index order, so ties at τ are broken the same way. Otherwise (a row with more than
    ``per_row`` cells above τ, or a budget past the candidates) return None and let the caller
    run the full search. ``largest``: the largest budget clamped to the group's cells, when the
    caller has it (otherwise read here: one more host sync). One host sync (the check).
    """
    groups, count, T = rows.shape
    budget = budget.clamp(max=count * T)
    if largest is None:
        largest = int(budget.max()) if budget.numel() else 0
    if per_row >= T or largest > count * per_row:
        return None
    values, index = _row_top(rows, per_row)
    last_candidate = values[..., -1]                           # (G, R): the row's other cells are ≤ this
    index, order = index.sort(dim=-1)
    values = values.gather(-1, order)
    chosen = _top_cells(values.reshape(groups, count * per_row), budget).view(groups, count, per_row)
    lowest_chosen = values.masked_fill(~chosen, float("inf")).flatten(1).amin(dim=1)    # (G,)
    if not bool((last_candidate < lowest_chosen[:, None]).all()):
        return None
    return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device).scatter_(-1, index, chosen)


def _order_keys(flat: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of the (float32-representable, NaN-free) scores: ``a < b`` ⇔
    ``key(a) < key(b)``. The IEEE bits, with the magnitude bits of negative numbers flipped;
    ``-0.0`` becomes ``+0.0`` first so that equal floats get equal keys."""
    bits = (flat.to(torch.float32) + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kth_largest_keys(keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``keys (G, M)`` int32, ``k (G,)`` in [1, M] → ``(G, 1)``: the k-th largest key of each row.

    Bisection on the key value, all rows at once and without host syncs: the answer is the largest
    t with ``#{keys ≥ t} ≥ k``. 32 compare-and-count passes (the span of int32 keys is < 2^32)."""
    low = keys.amin(dim=-1, keepdim=True).to(torch.int64)       # #{keys ≥ low} = M ≥ k
    high = keys.amax(dim=-1, keepdim=True).to(torch.int64)
    k = k[:, None]
    for _ in range(32):
        mid = low + (high - low + 1) // 2                        # low == high is a fixed point
        enough = (keys >= mid.to(torch.int32)).sum(dim=-1, keepdim=True) >= k
        low = torch.where(enough, mid, low)
        high = torch.where(enough, high, mid - 1)
    return low.to(torch.int32)
