"""SEA (method 'sea'): dense limit, mask statistics, causality, decoding, interpretability outputs."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

# conftest.py switches Triton to its interpreter on CPU, before any test module is imported

import approxattn  # noqa: E402
from approxattn.blocks.exact import softmax_attention, softmax_attention_matrix  # noqa: E402
from approxattn.blocks.sea_mask import host_budgets, row_budgets, select_cells  # noqa: E402
from approxattn.blocks.sparse_attention import column_layout, dense_column_mask, nonempty_columns  # noqa: E402
from helpers import qkv, rel_err  # noqa: E402

D = 8


def build(**options):
    base = {"k": 4, "columns": 16, "num_features": 16}
    return approxattn.build("sea", head_dim=options.pop("head_dim", D), **(base | options)).double().eval()


def padding_mask(n: int) -> torch.Tensor:
    """Right padding in sample 0, left padding and a hole in sample 1."""
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, n - 5:] = False
    mask[1, :3] = False
    mask[1, n // 2] = False
    return mask


def local_inputs(seed: int, *, batch=2, heads=4, kv_heads=2, n=128, d=D, sharpness=8.0):
    """Peaked attention: each query is a scaled copy of one key (the real-ish case SEA targets)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, n, d, generator=gen, dtype=torch.float64)
    target = torch.randint(0, n, (n,), generator=gen)
    q = k.repeat_interleave(heads // kv_heads, dim=1)[:, :, target] * sharpness / d**0.5
    q = q + 0.1 * torch.randn(q.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n, d, generator=gen, dtype=torch.float64)
    return q, k, v


# ----------------------------------------------------------------------------- dense limit


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_full_mask_without_gates_is_exact_softmax(causal, padded):
    n = 24
    q, k, v = qkv(heads=6, kv_heads=2, seq_q=n)                  # grouped-query heads too
    mask = padding_mask(n) if padded else None
    sea = build(k=n, grouping="query", gates=False, columns=8)
    out = sea(q, k, v, causal=causal, key_padding_mask=mask)
    ref = softmax_attention(q, k, v, causal=causal, key_valid=mask, scale=D**-0.5)
    assert rel_err(out, ref) < 1e-10


# ----------------------------------------------------------------------------- mask statistics


def keys_per_row(result) -> torch.Tensor:
    return dense_column_mask(result.selected, result.layout).sum(dim=-1).double()      # (B, H, Nq)


@pytest.mark.parametrize("grouping", ["batch", "head", "query", "causal_batch"])
def test_mean_keys_per_row_is_exactly_k_when_columns_divide_the_length(grouping):
    # N = 128, T = 16: every column holds 8 keys and every row's budget is k·T/N = 2 cells
    q, k, v = local_inputs(0)
    result = build(k=16, grouping=grouping).forward_with_details(q, k, v)
    counts = keys_per_row(result)
    assert counts.mean().item() == 16.0
    assert counts.min().item() >= 8                                    # each (head, row) keeps a cell
    if grouping == "query":
        assert (counts == 16).all()


@pytest.mark.parametrize("grouping", ["batch", "head", "query", "causal_batch"])
def test_mean_keys_per_row_with_padding_within_rounding(grouping):
    n, T, k_keys = 128, 16, 16
    q, k, v = local_inputs(1, n=n)
    mask = padding_mask(n)
    result = build(k=k_keys, grouping=grouping).forward_with_details(q, k, v, key_padding_mask=mask)
    counts = keys_per_row(result)
    for b in range(2):
        n_valid = int(mask[b].sum())
        rows = counts[b][:, mask[b]]                                   # rows of real tokens
        cells = round(k_keys * T / n_valid)
        # bound: rounding the budget to whole cells moves it by ≤ n/(2T) keys, and a cell
        # holds ⌊n/T⌋ or ⌈n/T⌉ keys (≤ 1 key per kept cell off the mean width)
        assert abs(rows.mean().item() - k_keys) <= n_valid / (2 * T) + cells


@pytest.mark.parametrize("grouping", ["query", "causal_batch"])
def test_causal_keys_per_row_follow_each_rows_budget(grouping):
    n, T, k_keys = 96, 16, 8
    q, k, v = local_inputs(2, n=n)
    result = build(k=k_keys, grouping=grouping).forward_with_details(q, k, v, causal=True)
    counts = keys_per_row(result)
    assert counts.min().item() >= 1                                    # row 0 included
    assert (counts[:, :, 0] == 1).all()
    length = torch.arange(1, n + 1, dtype=torch.float64)
    cells = row_budgets(length.long()[None], k_keys, T)[0].double()
    # cells are capped by the columns that hold keys (min(L, T)); each holds ⌊L/T⌋..⌈L/T⌉ keys
    kept = torch.minimum(cells, torch.clamp(length, max=T))
    low, high = kept * torch.floor(length / T).clamp(min=1), kept * torch.ceil(length / T)
    per_row = counts.mean(dim=(0, 1)) if grouping == "causal_batch" else counts
    assert (per_row >= low - 1e-9).all() and (per_row <= high + 1e-9).all()
    # and the average over the long rows is k up to the stated rounding
    long_rows = length >= 2 * T
    assert abs(counts[..., long_rows].mean().item() - k_keys) <= (length[long_rows] / (2 * T)).mean() + 1


@pytest.mark.parametrize("grouping", ["batch", "head", "query", "causal_batch"])
def test_each_group_keeps_exactly_its_budget_of_cells(grouping):
    B, H, N, T = 2, 3, 20, 8
    probs = torch.rand(B, H, N, T, dtype=torch.float64).softmax(-1)
    layout = column_layout(B, N, N, T, causal=False, key_padding_mask=padding_mask(N))
    candidates = nonempty_columns(layout)
    selected = select_cells(probs, candidates, layout.row_length, k=3, grouping=grouping)
    per_row = row_budgets(layout.row_length, 3, T)                   # (B, N)
    if grouping == "batch":
        assert (selected.sum(dim=(1, 2, 3)) == H * per_row.sum(1)).all()
    elif grouping == "head":
        assert (selected.sum(dim=(2, 3)) == per_row.sum(1)[:, None]).all()
    elif grouping == "query":
        assert (selected.sum(dim=3) == per_row[:, None]).all()
    else:
        assert (selected.sum(dim=(1, 3)) == H * per_row).all()
    assert selected.any(dim=-1).all()


@pytest.mark.parametrize("grouping", ["batch", "head", "query", "causal_batch"])
@pytest.mark.parametrize("n", [12, 300])
def test_no_candidate_mask_means_every_cell(grouping, n):
    """``candidates=None`` (every cell holds keys) selects what an all-True mask selects, with
    one-cell (n = 300) and two-cell (n = 12) budgets, and leaves the estimate it was given unchanged."""
    B, H, T = 2, 3, 8
    probs = torch.rand(B, H, n, T, dtype=torch.float64).softmax(-1)
    probs[0, 0, :4] = probs[0, 0, 4]                                   # ties across rows
    before = probs.clone()
    layout = column_layout(B, n, n, T, causal=False)
    assert nonempty_columns(layout).all()
    expected = select_cells(probs, nonempty_columns(layout), layout.row_length, k=3, grouping=grouping)
    got = select_cells(probs, None, layout.row_length, k=3, grouping=grouping)
    assert torch.equal(got, expected)
    assert torch.equal(probs, before)


@pytest.mark.parametrize("grouping", ["batch", "head", "query", "causal_batch"])
@pytest.mark.parametrize("causal", [False, True])
def test_host_row_lengths_select_the_same_cells(grouping, causal):
    """With the layout's host-side row lengths (unpadded inputs: no GPU sync to size the work) the
    selection is the one computed from the device's lengths alone, for one-cell and larger budgets."""
    if causal and grouping in ("batch", "head"):
        pytest.skip("shared budgets are not causal")
    B, H, T = 2, 3, 8
    for n, k in ((40, 3), (40, 12), (300, 3)):
        layout = column_layout(B, n, n, T, causal=causal)
        assert torch.equal(layout.host_row_length.expand(B, n), layout.row_length)
        probs = torch.rand(B, H, n, T, dtype=torch.float64).softmax(-1)
        candidates = None if not causal else nonempty_columns(layout)
        expected = select_cells(probs, candidates, layout.row_length, k=k, grouping=grouping)
        got = select_cells(probs, candidates, layout.row_length, k=k, grouping=grouping,
                           host_row_length=layout.host_row_length)
        assert torch.equal(got, expected), (n, k)
        # the rows' argmax handed in (as SEA's fused decoder head does) changes nothing
        with_best = select_cells(probs, candidates, layout.row_length, k=k, grouping=grouping,
                                 row_best=probs.argmax(-1))
        assert torch.equal(with_best, expected), (n, k)
    assert column_layout(B, 9, 9, T, causal=causal, key_padding_mask=padding_mask(9)).host_row_length is None


@pytest.mark.parametrize("grouping", ["batch", "head"])
def test_shared_budgets_without_host_reads_select_the_same_cells(grouping, monkeypatch):
    """While a CUDA graph is captured the shared-budget top-k skips its candidate shortcut (which decides
    on the host) and takes the full search with the host's budget: the same cells, groups large enough
    for the shortcut (≥ 2¹⁶ cells) and for the bisection (≥ 2²² cells, lowered here)."""
    from approxattn.blocks import sea_mask

    B, H, T, n, k = 2, 4, 32, 600, 48
    layout = column_layout(B, n, n, T, causal=False)
    gen = torch.Generator().manual_seed(5)
    probs = torch.rand(B, H, n, T, generator=gen).softmax(-1)
    probs[:, :, ::7] = probs[:, :, 1::7][:, :, : probs[:, :, ::7].shape[2]]   # ties between rows
    expected = select_cells(probs, None, layout.row_length, k=k, grouping=grouping)   # device lengths only
    monkeypatch.setattr(sea_mask, "_capturing", lambda t: True)
    monkeypatch.setattr(sea_mask, "BISECTION_DEVICES", ("cuda", "cpu"))
    for bisection_cells in (1 << 22, 1 << 10):
        monkeypatch.setattr(sea_mask, "BISECTION_MIN_CELLS", bisection_cells)
        got = select_cells(probs, None, layout.row_length, k=k, grouping=grouping,
                           host_row_length=layout.host_row_length)
        assert torch.equal(got, expected), bisection_cells


@pytest.mark.parametrize("seed", range(4))
def test_host_budgets_summarise_row_budgets(seed):
    """The host's numpy summary agrees with :func:`row_budgets` (torch): the largest budget and the run
    of rows above one cell, on lengths with exact halves (k·T/L = 1.5, 2.5: rounded half to even),
    zeros, runs, and gaps (no single run → None)."""
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.arange(1, 200), torch.full((50,), 7), torch.tensor([0, 2, 2, 4, 6, 9, 40]),
             torch.randint(0, 60, (300,), generator=gen), torch.tensor([4, 40, 4]), torch.zeros(5, dtype=torch.int64)]
    for length in cases:
        for k, T in ((3, 1), (5, 1), (64, 128), (int(torch.randint(1, 40, (1,), generator=gen)), 8)):
            budget = row_budgets(length, k, T)
            summary = host_budgets(length, k, T)
            assert summary.largest == int(budget.max()) and summary.total == int(budget.sum())
            above = (budget > 1).nonzero().flatten().tolist()
            contiguous = bool(above) and above == list(range(above[0], above[-1] + 1))
            assert summary.run == ((above[0], above[-1] + 1) if contiguous else None), (length, k, T)


def test_host_budgets_follow_in_place_edits_and_take_inference_tensors():
    """The cached summary is keyed by the tensor's version (an in-place edit is seen) and takes inference
    tensors, which have no version counter."""
    length = torch.full((40,), 300)
    assert host_budgets(length, 64, 8).largest == 2
    length[:10] = 30
    assert host_budgets(length, 64, 8).largest == 17
    with torch.inference_mode():
        frozen = torch.full((40,), 30)
    assert host_budgets(frozen, 64, 8) == (17, 17 * 40, (0, 40))


@pytest.mark.parametrize("causal", [False, True])
def test_sea_under_inference_mode_then_autograd(causal):
    """A size first met under torch.inference_mode (its layout cached then) serves later calls outside it,
    with gradients: the cached layout is made of ordinary tensors."""
    sea = approxattn.build("sea", head_dim=8, num_heads=2)
    q, k, v = qkv(batch=1, heads=2, kv_heads=2, seq_q=37, head_dim=8, dtype=torch.float32,
                  generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        first = sea(q, k, v, causal=causal)
    q.requires_grad_()
    out = sea(q, k, v, causal=causal)
    out.sum().backward()
    assert torch.equal(out.detach(), first) and q.grad is not None


def test_unpadded_layouts_are_built_once_per_size():
    """column_layout without padding returns the same layout for the same sizes (the SEA module asks
    for it every forward) and a new one for other sizes; padded layouts are never cached."""
    a = column_layout(2, 40, 40, 8, causal=True)
    assert column_layout(2, 40, 40, 8, causal=True) is a
    assert column_layout(2, 40, 40, 8, causal=False) is not a
    assert column_layout(2, 41, 41, 8, causal=True) is not a
    mask = padding_mask(9)
    assert column_layout(2, 9, 9, 8, causal=True, key_padding_mask=mask) is not \
        column_layout(2, 9, 9, 8, causal=True, key_padding_mask=mask)


def test_layout_derived_values_are_kept_per_cached_layout(monkeypatch):
    """Tensors computed from an unpadded (cached) layout alone are built once; a padded layout, a value
    written in place, or one over the size bound is built again, and the results equal a fresh build."""
    import approxattn.cached as cached
    from approxattn.blocks.sparse_attention import dense_column_mask, layout_derived, nonempty_columns

    layout = column_layout(2, 43, 43, 8, causal=True)
    calls = []

    def build():
        calls.append(1)
        return layout.row_length * 2

    first = layout_derived(layout, ("test-double",), build)
    assert layout_derived(layout, ("test-double",), build) is first and len(calls) == 1
    assert layout_derived(layout, ("test-other",), build) is not first and len(calls) == 2
    first.add_(1)                                            # a caller broke the rule: rebuilt, not served
    again = layout_derived(layout, ("test-double",), build)
    assert len(calls) == 3 and torch.equal(again, layout.row_length * 2)
    padded = column_layout(2, 9, 9, 8, causal=True, key_padding_mask=padding_mask(9))
    layout_derived(padded, ("test-double",), lambda: padded.row_length * 2)
    assert layout_derived(padded, ("test-double",), build) is not None and len(calls) == 4
    monkeypatch.setattr(cached, "DERIVED_MAX_BYTES", 0)
    layout_derived(layout, ("test-big",), build)
    layout_derived(layout, ("test-big",), build)
    assert len(calls) == 6
    monkeypatch.undo()
    # the kept values are what the functions compute afresh
    fresh = column_layout(2, 9, 9, 8, causal=True, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    kept = column_layout(2, 9, 9, 8, causal=True)
    assert torch.equal(nonempty_columns(kept), nonempty_columns(fresh))
    selected = torch.rand(2, 3, 9, 8, generator=torch.Generator().manual_seed(4)) > 0.5
    assert torch.equal(dense_column_mask(selected, kept), dense_column_mask(selected, fresh))
    assert torch.equal(dense_column_mask(selected, kept), dense_column_mask(selected, kept))


@pytest.mark.parametrize("grouping", ["query", "causal_batch"])
@pytest.mark.parametrize("padded", [False, True])
def test_per_row_groupings_match_one_top_k_over_every_row(grouping, padded):
    """Rows with a one-cell budget keep their best cells without competing (the shortcut); the
    answer is the plain grouped top-k over all rows with each (head, row)'s best cell first."""
    from approxattn.blocks.sea_mask import _BEST_CELL_BONUS, _top_cells

    B, H, N, T, k = 2, 3, 64, 8, 3          # budgets round(24 / L): 24 … 1, mixed
    gen = torch.Generator().manual_seed(8 + padded)
    layout = column_layout(B, N, N, T, causal=True, key_padding_mask=padding_mask(N) if padded else None)
    candidates = nonempty_columns(layout)
    for trial in range(3):
        probs = torch.rand(B, H, N, T, generator=gen).softmax(-1)
        if trial == 2:
            probs = (probs * 4).round() / 4                             # ties
        selected = select_cells(probs, candidates, layout.row_length, k=k, grouping=grouping)
        cand = candidates[:, None].expand(B, H, N, T)
        score = probs.masked_fill(~cand, float("-inf"))
        best = torch.zeros_like(cand).scatter_(-1, score.argmax(-1, keepdim=True),
                                               candidates.any(-1)[:, None, :, None].expand(B, H, N, 1))
        score = score + best * _BEST_CELL_BONUS
        per_row = row_budgets(layout.row_length, k, T)
        if grouping == "query":
            expected = _top_cells(score.reshape(-1, T), per_row[:, None].expand(B, H, N).reshape(-1)).view(B, H, N, T)
        else:
            flat = score.transpose(1, 2).reshape(B * N, H * T)
            expected = _top_cells(flat, H * per_row.reshape(-1)).view(B, N, H, T).transpose(1, 2)
        assert torch.equal(selected, (expected | best) & cand)
        assert (per_row > 1).any() and (per_row == 1).any()


def test_top_cells_break_ties_like_a_stable_sort():
    from approxattn.blocks.sea_mask import _top_cells

    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        scores = torch.randint(0, 4, (6, 30), generator=gen).double()            # many exact ties
        scores[0, :5] = float("-inf")
        budget = torch.randint(0, 31, (6,), generator=gen)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected.scatter_(-1, order, torch.arange(30)[None] < budget[:, None])
        assert torch.equal(_top_cells(scores, budget), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_every_row_gets_a_real_key_even_with_a_tiny_budget(causal):
    n = 40
    q, k, v = qkv(seq_q=n)
    mask = padding_mask(n)
    for grouping in (["query", "causal_batch"] if causal else ["batch", "head", "query", "causal_batch"]):
        result = build(k=1, columns=8, grouping=grouping).forward_with_details(
            q, k, v, causal=causal, key_padding_mask=mask)
        counts = keys_per_row(result)
        sees_a_key = result.layout.row_length > 0                       # causal left padding: rows before
        assert (counts.permute(1, 0, 2)[:, sees_a_key] >= 1).all()      # the first real key see none
        assert (counts.permute(1, 0, 2)[:, ~sees_a_key] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_are_never_selected(causal):
    n = 32
    q, k, v = qkv(seq_q=n)
    mask = padding_mask(n)
    result = build(k=n, grouping="query").forward_with_details(q, k, v, causal=causal, key_padding_mask=mask)
    chosen = dense_column_mask(result.selected, result.layout)
    assert not chosen[:, :, :, ~mask[0]][0].any() and not chosen[1][:, :, ~mask[1]].any()
    assert (result.sparse_probabilities()[~mask[:, None, None, :].expand_as(chosen)] == 0).all()
    assert (result.estimated_attention()[~mask[:, None, None, :].expand_as(chosen)] == 0).all()


# ----------------------------------------------------------------------------- causality


def causal_views(result, upto: int) -> list[torch.Tensor]:
    n = upto + 1
    return [
        result.output[:, :, :n], result.selected[:, :, :n], result.estimated_logits[:, :, :n],
        result.sparse_probabilities()[:, :, :n, :n], result.estimated_attention()[:, :, :n, :n],
        result.gates[:, :, :n],
    ]


@pytest.mark.parametrize("grouping", ["query", "causal_batch"])
@pytest.mark.parametrize("position", [0, 9, 30])
def test_causal_canary_changed_and_injected_tokens(grouping, position):
    n = 40
    q, k, v = qkv(seq_q=n)
    sea = build(grouping=grouping, columns=12)
    base = sea.forward_with_details(q, k, v, causal=True)
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[:, :, position + 1:] = torch.randn_like(t[:, :, position + 1:]) * 3
    other = sea.forward_with_details(*changed, causal=True)
    # injection: canary tokens spliced in after `position` (the sequence gets longer)
    canary = [torch.randn(t.shape[0], t.shape[1], 7, t.shape[3], dtype=t.dtype) * 3 for t in (q, k, v)]
    injected = [torch.cat([t[:, :, :position + 1], c, t[:, :, position + 1:]], dim=2) for t, c in zip((q, k, v), canary)]
    longer = sea.forward_with_details(*injected, causal=True)
    for mine, theirs, spliced in zip(causal_views(base, position), causal_views(other, position),
                                     causal_views(longer, position)):
        assert torch.equal(mine, theirs) or rel_err(theirs, mine) < 1e-12
        assert torch.equal(mine, spliced) or rel_err(spliced, mine) < 1e-12
    assert rel_err(other.output, base.output) > 1e-3                   # the change did reach later rows


def test_causal_rejects_budgets_shared_across_rows():
    q, k, v = qkv(seq_q=8)
    for grouping in ("batch", "head"):
        sea = build(grouping=grouping)
        sea(q, k, v)                                                   # fine non-causally
        with pytest.raises(ValueError, match=r"grouping: .*later tokens.*causal=True"):
            sea(q, k, v, causal=True)
        with pytest.raises(ValueError, match=r"grouping: "):
            sea.decoding_state(batch=2, heads=4, kv_heads=2, value_dim=D)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "options, heads, kv_heads, n",
    [
        ({}, 4, 2, 40),                                                      # GQA, N > T
        ({"grouping": "query", "columns": 10, "num_features": None}, 2, 2, 13),  # T % 4 ≠ 0, N < T
        ({"num_heads": 4, "k": 6}, 4, 1, 30),                                # heads as CNN channels
        ({"gates": False, "columns": 4}, 2, 1, 20),
    ],
)
def test_decode_steps_equal_the_full_causal_forward(options, heads, kv_heads, n):
    q, k, v = qkv(heads=heads, kv_heads=kv_heads, seq_q=n, value_dim=5)
    sea = build(**options)
    full = sea(q, k, v, causal=True)
    state = sea.decoding_state(batch=2, heads=heads, kv_heads=kv_heads, value_dim=5, dtype=torch.float64)
    steps = [sea.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state) for t in range(n)]
    assert rel_err(torch.cat(steps, dim=2), full) < 1e-10
    assert state.position == n


@pytest.mark.parametrize(
    "options, heads, kv_heads, n, block",
    [
        ({}, 4, 2, 40, 7),                                                   # GQA, N > T, ragged row blocks
        ({"num_heads": 4, "k": 6}, 4, 1, 30, 256),                           # heads as CNN channels
        ({"gates": False, "columns": 4}, 2, 1, 3, 2),                        # fewer rows than the CNN history
    ],
)
def test_prefill_leaves_the_state_of_the_decode_steps(options, heads, kv_heads, n, block):
    """``prefill`` of a prompt = ``decode_step`` over its tokens: the same running sums, CNN history
    and cache, so the next steps answer alike (and equal the full causal forward's rows)."""
    q, k, v = qkv(heads=heads, kv_heads=kv_heads, seq_q=n + 3, value_dim=5)
    sea = build(**options)
    stepped = sea.decoding_state(batch=2, heads=heads, kv_heads=kv_heads, value_dim=5, dtype=torch.float64)
    for t in range(n):
        sea.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], stepped)
    state = sea.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n], rows_per_block=block)
    assert state.position == n and torch.equal(state.keys[:, :, :n], k[:, :, :n])
    def close(mine, theirs):  # relative to the reference's norm, or absolute where it is zero (gates off, ReLU)
        mine, theirs = mine.detach(), theirs.detach()
        return mine.shape == theirs.shape and float((mine - theirs).norm()) <= 1e-12 * max(float(theirs.norm()), 1.0)

    for name in ("feature_values", "feature_sum", "value_sum"):
        assert close(getattr(state, name), getattr(stepped, name)), name
    assert stepped.feature_values.norm() > 0
    for mine, theirs in zip(state.conv_history, stepped.conv_history):
        assert close(mine, theirs)
    full = sea(q, k, v, causal=True)
    rows = [sea.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state) for t in range(n, n + 3)]
    assert rel_err(torch.cat(rows, dim=2), full[:, :, n:]) < 1e-10


def test_prefill_checks_its_inputs():
    sea = build(max_positions=3)
    q, k, v = qkv(seq_q=4)
    with pytest.raises(ValueError, match=r"max_positions=3"):
        sea.prefill(q, k, v)
    with pytest.raises(ValueError, match="rows_per_block"):
        sea.prefill(q[:, :, :3], k[:, :, :3], v[:, :, :3], rows_per_block=0)
    with pytest.raises(ValueError):
        sea.prefill(q[:, :, :3], k[:, :, :2], v[:, :, :3])


def test_decoding_gathers_only_the_selected_keys():
    # with a budget of one cell per row over T columns, a step reads ⌈t/T⌉ keys per head, not t
    n, T = 64, 8
    q, k, v = qkv(seq_q=n)
    sea = build(k=1, columns=T, grouping="query")
    state = sea.decoding_state(batch=2, heads=4, kv_heads=2, value_dim=D, dtype=torch.float64)
    seen = []
    original = sea._decode_sparse

    def spy(q_t, state_, selected, lo, hi, scale, shape):
        out = original(q_t, state_, selected, lo, hi, scale, shape)
        seen.append(int((hi - lo).max()) * int(selected.sum(-1).max()))
        return out

    sea._decode_sparse = spy
    for t in range(n):
        sea.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
    assert max(seen) <= math.ceil(n / T) + 1


def test_decoding_beyond_the_learned_probe_is_refused():
    sea = build(max_positions=3)
    q, k, v = qkv(seq_q=4)
    state = sea.decoding_state(batch=2, heads=4, kv_heads=2, value_dim=D, dtype=torch.float64)
    for t in range(3):
        sea.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
    with pytest.raises(ValueError, match=r"max_positions=3"):
        sea.decode_step(q[:, :, 3:4], k[:, :, 3:4], v[:, :, 3:4], state)
    # the full forward stretches the table instead (documented)
    assert torch.isfinite(sea(q, k, v, causal=True)).all()


def test_decode_step_checks_its_inputs():
    sea = build()
    state = sea.decoding_state(batch=2, heads=4, kv_heads=2, value_dim=D, dtype=torch.float64)
    q, k, v = qkv(seq_q=1)
    with pytest.raises(ValueError, match=r"k_t: expected shape \(2, 2, 1, 8\)"):
        sea.decode_step(q, k[:, :1], v, state)
    with pytest.raises(TypeError, match=r"q_t: expected dtype torch.float64"):
        sea.decode_step(q.float(), k, v, state)
    with pytest.raises(TypeError, match=r"state: expected a SEADecodingState"):
        sea.decode_step(q, k, v, {})
    with pytest.raises(ValueError, match=r"kv_heads: expected a divisor of heads=4, got 3"):
        sea.decoding_state(batch=2, heads=4, kv_heads=3, value_dim=D)


# ----------------------------------------------------------------------------- interpretability outputs


@pytest.mark.parametrize("causal", [False, True])
def test_details_match_forward_and_rows_sum_as_documented(causal):
    n = 20
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=n)
    mask = padding_mask(n)
    sea = build()
    result = sea.forward_with_details(q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.equal(result.output, sea(q, k, v, causal=causal, key_padding_mask=mask))
    B, H, T = 2, 4, 16
    assert result.estimated_logits.shape == (B, H, n, T) and result.selected.shape == (B, H, n, T)
    assert result.gates.shape == (B, H, n, 2) and ((result.gates > 0) & (result.gates < 1)).all()
    has_key = (result.layout.row_length > 0)[:, None].expand(B, H, n)
    estimated = result.estimated_attention()
    assert estimated.shape == (B, H, n, n)
    assert torch.allclose(estimated.sum(-1)[has_key], torch.ones(()).double())
    assert (estimated.sum(-1)[~has_key] == 0).all()
    sparse = result.sparse_probabilities()
    assert torch.allclose(sparse.sum(-1)[has_key], result.gates[..., 0][has_key])
    logits = result.estimated_attention_logits()
    assert torch.equal(torch.isinf(logits), estimated == 0) or (torch.isinf(logits) <= (estimated == 0)).all()
    # one head: the same slice
    assert torch.equal(result.sparse_probabilities(head=3), sparse[:, 3:4])
    assert torch.equal(result.estimated_attention(head=1), estimated[:, 1:2])
    with pytest.raises(ValueError, match=r"head: expected None or an int in \[0, 4\), got 4"):
        result.estimated_attention(head=4)


@pytest.mark.parametrize("causal, residual", [(False, True), (False, False), (True, True)])
def test_estimator_learns_through_the_estimated_attention(causal, residual):
    # the distillation loss on the resized estimate reaches the decoder and encoder (not the top-k)
    n = 16
    q, k, v = qkv(seq_q=n)
    sea = build(decoder_residual=residual).train()
    result = sea.forward_with_details(q, k, v, causal=causal)
    target = softmax_attention_matrix(q, k, causal=causal, scale=D**-0.5)
    log_estimate = torch.log_softmax(result.estimated_attention_logits(), dim=-1).clamp(min=-1e4)
    loss = torch.nn.functional.kl_div(log_estimate, target, reduction="batchmean") + result.output.square().mean()
    loss.backward()
    decoder = "causal_decoder" if causal else "decoder"
    names = ["gate.weight", f"{decoder}.out.weight"]
    if causal or not residual:
        # a zero-initialised last conv (the residual's start) passes no gradient further back yet
        names += ["encoder.weight", f"{decoder}.row.weight"]
    for name in names:
        grad = dict(sea.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert sea.estimator_parameters() == list(sea.parameters())


def test_decoder_residual_selects_from_the_performers_estimate():
    # undistilled, non-causal, peaked inputs: with the histogram residual the mask finds the
    # key each query attends to far more often than the randomly initialised paper decoder
    recalls, errors = {True: [], False: []}, {True: [], False: []}
    for seed in range(2):
        q, k, v = local_inputs(seed, n=128, d=16, sharpness=8.0)
        attention = softmax_attention_matrix(q, k, scale=16**-0.5)
        for residual in (True, False):
            sea = build(head_dim=16, k=8, columns=16, num_features=128, gates=False, decoder_residual=residual,
                        seed=seed)
            result = sea.forward_with_details(q, k, v)
            chosen = dense_column_mask(result.selected, result.layout)
            recalls[residual].append(chosen.gather(-1, attention.argmax(-1, keepdim=True)).double().mean().item())
            errors[residual].append(rel_err(result.output, attention @ v.repeat_interleave(2, dim=1)))
    assert min(recalls[True]) > 2 * max(recalls[False])
    assert sum(errors[True]) < sum(errors[False])


# ----------------------------------------------------------------------------- options and errors


def test_num_heads_mismatch_is_a_clear_error():
    sea = build(num_heads=3)
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=8)
    with pytest.raises(ValueError, match=r"q: expected 3 heads .*num_heads=3.*got 4"):
        sea(q, k, v)
    with pytest.raises(ValueError, match=r"q: expected 3 heads"):
        sea.forward_with_details(q, k, v, causal=True)


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        ({"k": 0}, ValueError, r"option 'k' of method 'sea': expected an int >= 1"),
        ({"columns": 0}, ValueError, r"option 'columns'"),
        ({"grouping": "rows"}, ValueError, r"option 'grouping' of method 'sea': expected one of 'auto', 'batch'"),
        ({"num_features": 0}, ValueError, r"option 'num_features'"),
        ({"gates": "yes"}, TypeError, r"option 'gates' of method 'sea': expected a bool"),
        ({"num_heads": 2.0}, TypeError, r"option 'num_heads'"),
        ({"max_positions": -1}, ValueError, r"option 'max_positions'"),
        ({"decoder_residual": 1}, TypeError, r"option 'decoder_residual'"),
        ({"redraw": 0}, ValueError, r"option 'redraw'"),
        ({"topk": 3}, ValueError, r"unknown option 'topk' for method 'sea'"),
    ],
)
def test_bad_options(options, error, pattern):
    with pytest.raises(error, match=pattern):
        approxattn.build("sea", head_dim=D, **options)


def test_functional_form_takes_k_as_an_option():
    q, k, v = qkv(seq_q=16)
    out = approxattn.attention(q, k, v, "sea", k=16, grouping="query", gates=False, columns=8)
    assert rel_err(out, approxattn.attention(q, k, v)) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_path_is_finite_and_keeps_fp32_estimates(causal):
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=48, head_dim=16, dtype=torch.bfloat16, std=2.0)
    sea = approxattn.build("sea", head_dim=16, k=8, columns=16, num_features=16)
    result = sea.forward_with_details(q, k, v, causal=causal, key_padding_mask=padding_mask(48))
    assert result.output.dtype == torch.bfloat16 and torch.isfinite(result.output).all()
    assert result.estimated_logits.dtype == torch.float32 and torch.isfinite(result.estimated_logits).all()
    state = sea.decoding_state(batch=2, heads=4, kv_heads=2, value_dim=16, dtype=torch.bfloat16)
    step = sea.decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
    assert step.dtype == torch.bfloat16 and torch.isfinite(step).all()


def test_default_num_features_rule():
    assert build(num_features=None).num_features == int(D * math.log(D) / 8)
    assert approxattn.build("sea", head_dim=64).num_features == 33                # SEA's OPT script (nbf = 8)


def test_cost_is_linear_in_sequence_length():
    spec = approxattn.get_method("sea")
    costs = [spec.cost(1, 8, n, n, 64, causal=causal).flops for causal in (False, True) for n in (4096, 8192)]
    assert 1.9 < costs[1] / costs[0] < 2.1 and 1.9 < costs[3] / costs[2] < 2.1


interpreter_only = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test (CPU with triton)")


@interpreter_only
@pytest.mark.parametrize("causal", [False, True])
def test_fused_kernels_agree_with_the_reference_path(monkeypatch, causal):
    # estimator (fused kernel attention), decoder convs (small-conv kernel) and sparse step
    # (column-mask kernel), forced on CPU; the decoder's zero-initialised last conv is randomised
    # so that the decoder's kernels matter
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=24, head_dim=16, dtype=torch.float32)
    sea = approxattn.build("sea", head_dim=16, k=4, columns=8, num_features=16).eval()
    with torch.no_grad():
        for parameter in sea.decoder.out.parameters():
            parameter.normal_(std=0.3)
    mask = padding_mask(24)
    with monkeypatch.context() as mp:
        mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
        ref = sea.forward_with_details(q, k, v, causal=causal, key_padding_mask=mask)
    with monkeypatch.context() as mp:
        mp.setenv("APPROXATTN_FORCE_KERNELS", "1")
        with torch.no_grad():
            out = sea.forward_with_details(q, k, v, causal=causal, key_padding_mask=mask)
    assert rel_err(out.estimated_logits, ref.estimated_logits) < 1e-4
    # logits equal to ~1e-6 can still order a near-tie the other way, and one flipped cell swaps a whole
    # column of keys for its row (in ~7 % of random draws, an output 2–5 % off): rows are compared where
    # both paths selected the same cells, and such flips must stay rare
    same = (out.selected == ref.selected).all(-1)
    assert same.float().mean() > 0.8
    assert rel_err(out.output[same], ref.output[same]) < 1e-4


@interpreter_only
@pytest.mark.parametrize("padded", [False, True])
def test_one_cell_rows_take_the_one_column_kernel(monkeypatch, padded):
    """Unpadded rows whose budget is one cell (k·T/N < 1.5) go through the one-column kernel, with the
    same output as the reference path where both selected the same cell; padded inputs do not."""
    from approxattn.kernels import single_column_attention as sca

    calls = []
    kernel = sca.single_column_attention_triton
    monkeypatch.setattr(sca, "single_column_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=40, head_dim=16, dtype=torch.float32)
    sea = approxattn.build("sea", head_dim=16, k=2, columns=8, num_features=16).eval()
    with torch.no_grad():
        for parameter in sea.decoder.out.parameters():
            parameter.normal_(std=0.3)
    mask = padding_mask(40) if padded else None
    with monkeypatch.context() as mp:
        mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
        ref = sea.forward_with_details(q, k, v, key_padding_mask=mask)
    with monkeypatch.context() as mp:
        mp.setenv("APPROXATTN_FORCE_KERNELS", "1")
        with torch.no_grad():
            out = sea.forward_with_details(q, k, v, key_padding_mask=mask)
    assert len(calls) == (0 if padded else 1)
    if not padded:
        assert torch.all(out.selected.sum(-1) == 1)
    same = (out.selected == ref.selected).all(-1)
    assert same.float().mean() > 0.8
    assert rel_err(out.output[same], ref.output[same]) < 1e-4


@interpreter_only
@pytest.mark.parametrize("dtype,seq_k", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 56)])
def test_forward_without_details_skips_the_maps_with_the_same_output(monkeypatch, dtype, seq_k):
    """forward (no details) on one-cell rows: the head writes no logits or probabilities and nothing is
    selected as a map, yet the output equals forward_with_details' (same kernels, the column means
    summed in the head instead of by torch). bf16 maps come from the row-window GEMMs, fp32 ones from the
    decoder's layers; seq_k: cross-attention (no own value in the encoder, column means over Nq rows)."""
    from approxattn.kernels import sea_decoder_head as head

    calls = []
    lean = head.fast_decoder_head_best
    monkeypatch.setattr(head, "fast_decoder_head_best", lambda *a, **kw: calls.append(1) or lean(*a, **kw))
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=40, seq_k=seq_k, head_dim=16, dtype=dtype)
    sea = approxattn.build("sea", head_dim=16, k=2, columns=8, num_features=16).eval()
    with torch.no_grad():
        for parameter in sea.decoder.out.parameters():
            parameter.normal_(std=0.3)
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    with torch.no_grad():
        details = sea.forward_with_details(q, k, v)
        assert not calls
        out = sea(q, k, v)
    assert len(calls) == 1
    assert rel_err(out, details.output) < (1e-6 if dtype == torch.float32 else 1e-2)


@interpreter_only
@pytest.mark.parametrize("causal", [False, True])
def test_half_inputs_feed_the_fused_estimator_half_operands(monkeypatch, causal):
    # bf16 inputs: the fused estimator takes bf16 operands (fp32 accumulation) and the estimate's
    # maps are stored in bf16 (every GEMM and kernel on them accumulates in fp32); its
    # probabilities (fp32) stay within bf16 rounding of the fp32 reference path's on the same inputs
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=24, head_dim=16, dtype=torch.bfloat16)
    sea = approxattn.build("sea", head_dim=16, k=4, columns=8, num_features=16).eval()
    with monkeypatch.context() as mp:
        mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
        ref = sea.forward_with_details(q, k, v, causal=causal)
    with monkeypatch.context() as mp:
        mp.setenv("APPROXATTN_FORCE_KERNELS", "1")
        with torch.no_grad():
            fused = sea.forward_with_details(q, k, v, causal=causal)
    # half maps; the causal decoder's head (before its LayerNorm over T) is fp32
    assert fused.estimated_logits.dtype == (torch.float32 if causal else torch.bfloat16)
    assert ref.estimated_logits.dtype == torch.float32
    assert fused.estimated_attention().dtype == torch.float32
    # compared as probabilities: the causal decoder ends in a LayerNorm over T, which maps rows of
    # nearly equal logits to ±1 and so amplifies bf16 rounding in the logits. Over 25 draws the
    # causal probabilities differed by 2.6e-3 (median) and up to 7.3e-2 (4 draws above 1e-2, with
    # cuDNN's convs or ours alike); the non-causal ones stay below 1e-2
    assert rel_err(fused.estimated_attention(), ref.estimated_attention()) < (1e-1 if causal else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_groups_bisection_keeps_the_same_cells_as_topk(dtype, monkeypatch):
    """The bisection threshold (groups of ≥ BISECTION_MIN_CELLS cells) against the topk one, with
    ties, -inf, negative scores, -0.0 and budgets from 0 to the whole group."""
    from approxattn.blocks import sea_mask

    monkeypatch.setattr(sea_mask, "BISECTION_DEVICES", ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(11)
    for trial in range(6):
        groups, cells = 4, 3000
        if trial % 2:
            scores = torch.randint(-3, 4, (groups, cells), generator=gen).to(dtype)       # heavy ties
        else:
            scores = (torch.rand(groups, cells, generator=gen) * 6 - 2).to(dtype)
        scores[0, :100] = float("-inf")
        scores[1, :7] = -0.0
        scores[1, 7:14] = 0.0
        budget = torch.randint(0, cells + 1, (groups,), generator=gen)
        budget[2] = cells
        monkeypatch.setattr(sea_mask, "BISECTION_MIN_CELLS", 1 << 30)
        by_topk = sea_mask._top_cells(scores, budget)
        monkeypatch.setattr(sea_mask, "BISECTION_MIN_CELLS", 1)
        by_bisection = sea_mask._top_cells(scores, budget)
        assert torch.equal(by_topk, by_bisection)
        assert torch.equal(by_bisection.sum(-1), budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidate_shortcut_keeps_the_same_cells_or_declines(dtype):
    """The per-row candidate shortcut of the shared budgets gives exactly the full top-k's cells
    (ties, -inf, a best-cell bonus like select_cells', budgets of 0 to past the candidates), and
    returns None rather than a wrong answer when a row holds more winners than candidates."""
    from approxattn.blocks import sea_mask

    gen = torch.Generator().manual_seed(12)
    answered = declined = 0
    for trial in range(12):
        groups, rows, T = 3, 200, 16
        if trial % 3 == 0:
            scores = torch.randint(0, 3, (groups, rows, T), generator=gen).to(dtype)    # heavy ties
        else:
            scores = torch.rand(groups, rows, T, generator=gen).to(dtype)
        if trial % 2:   # each row's best cell far above the rest, as select_cells ranks them
            best = scores.argmax(-1, keepdim=True)
            scores = scores.scatter_add(-1, best, torch.full_like(best, 4, dtype=dtype))
        scores[0, :10, 5:] = float("-inf")
        budget = torch.randint(0, 3 * rows, (groups,), generator=gen)
        budget[1] = rows * (trial % 4)
        expected = sea_mask._top_cells(scores.reshape(groups, rows * T), budget).view(groups, rows, T)
        for per_row in (1, 2, 4, 8):
            got = sea_mask._top_cells_by_candidates(scores, budget, per_row=per_row)
            if got is None:
                declined += 1
            else:
                answered += 1
                assert torch.equal(got, expected), (trial, per_row)
        assert torch.equal(sea_mask._top_cells_of_rows(scores, budget), expected)
    assert answered > 3 and declined > 3     # both branches exercised


@pytest.mark.parametrize("source,width", [(64, 128), (3, 8), (32, 128), (10, 7), (1, 5), (5, 5)])
def test_resize_width_is_linear_interpolation(source, width):
    """The matmul resampling gives F.interpolate's numbers (linear, half-pixel centres)."""
    import torch.nn.functional as F

    from approxattn.blocks.sea_estimator import resize_width

    x = torch.randn(2, 3, 4, source, dtype=torch.float64)
    expected = F.interpolate(x.reshape(-1, 1, source), size=width, mode="linear", align_corners=False)
    got = resize_width(x, width)
    assert got.shape == (2, 3, 4, width)
    assert ((got.reshape(-1, 1, width) - expected).norm() / expected.norm()).item() < 1e-12


@pytest.mark.parametrize("groups", [1, 2, None])
def test_encoder_is_one_linear_over_context_and_own_value(groups):
    """The split encoder (W_c c + W_v v_i + b, no concatenation) is SEA's Linear over [c, v_i],
    with v_i shared by a key/value head's query heads, and zeros without an own token."""
    d = 8
    module = approxattn.build("sea", head_dim=d).double()
    B, Hkv, N = 2, 2, 5
    heads = Hkv * (groups or 1)
    context = torch.randn(B, heads, N, 2 * d, dtype=torch.float64)
    own = torch.randn(B, Hkv, N, d, dtype=torch.float64)
    repeated = own.repeat_interleave(groups, dim=1) if groups else torch.zeros(B, heads, N, d, dtype=torch.float64)
    hidden = torch.nn.functional.linear(torch.cat([context, repeated], dim=-1), module.encoder.weight,
                                        module.encoder.bias)
    expected = torch.nn.functional.gelu(module.encoder_norm(hidden))
    got = module._encode(context, own if groups else None, groups or 1)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_resize_width_adds_inside_the_gemm():
    from approxattn.blocks.sea_estimator import resize_width

    x, plus = torch.randn(2, 3, 5, 64, dtype=torch.float64), torch.randn(2, 3, 5, 128, dtype=torch.float64)
    assert torch.allclose(resize_width(x, 128, plus=plus), resize_width(x, 128) + plus, rtol=0, atol=1e-12)
    same = torch.randn(2, 3, 5, 128, dtype=torch.float64)
    assert torch.equal(resize_width(same, 128, plus=plus), same + plus)


@pytest.mark.parametrize("n_valid,columns", [([1], 5), ([2], 128), ([7, 300], 3), ([5000, 64], 128), ([64], 64)])
def test_probe_histogram_logits_reads_the_bins_linearly(n_valid, columns):
    """The matmul resampling equals reading each column's centre bin ``rank·(d−1)/(n−1)`` by
    linear interpolation between its two neighbouring bins (the definition), clamped and logged."""
    from approxattn.blocks.sea_estimator import probe_histogram_logits

    d = 16
    histogram = torch.rand(len(n_valid), 2, 9, d, dtype=torch.float64)
    histogram[0, 0, 0] = 0.0                                     # the floor
    expected = torch.empty(len(n_valid), 2, 9, columns, dtype=torch.float64)
    for b, n in enumerate(n_valid):
        for c in range(columns):
            rank = (c + 0.5) * n / columns - 0.5
            position = min(max(rank / max(n - 1, 1) * (d - 1), 0.0), d - 1)
            lower = min(int(position), d - 1)
            upper, frac = min(lower + 1, d - 1), position - lower
            value = histogram[b, ..., lower] * (1 - frac) + histogram[b, ..., upper] * frac
            expected[b, ..., c] = value.clamp(min=1e-6).log()
    got = probe_histogram_logits(histogram, torch.tensor(n_valid), columns)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gates", [True, False])
def test_effective_attention_times_v_is_the_output(causal, gates):
    """SEAResult.effective_attention() (and approxattn.attention_matrices) is the matrix the call
    applied: A @ v reproduces the output, with GQA and padding."""
    n = 24
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=n)
    mask = padding_mask(n)
    sea = build(k=4, columns=8, gates=gates).eval()
    result = sea.forward_with_details(q, k, v, causal=causal, key_padding_mask=mask)
    matrix = result.effective_attention()
    assert matrix.shape == (2, 4, n, n)
    applied = matrix @ v.repeat_interleave(2, dim=1)
    assert rel_err(applied, result.output) < 1e-10
    maps = sea.attention_matrices(q, k, v, causal=causal, key_padding_mask=mask)
    assert set(maps) == {"attention", "sparse", "estimated"}
    assert torch.equal(maps["attention"], matrix)
    functional = approxattn.attention_matrices(q, k, v, "sea", causal=causal, key_padding_mask=mask,
                                               k=4, columns=8, gates=gates)
    output = approxattn.attention(q, k, v, "sea", causal=causal, key_padding_mask=mask, k=4, columns=8, gates=gates)
    assert rel_err(functional["attention"] @ v.repeat_interleave(2, dim=1), output) < 1e-10


def test_attention_matrices_default_is_the_identity_trick():
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=12)
    for method in ("softmax", "performer", "linear"):
        options = {"num_features": 16} if method == "performer" else {}
        maps = approxattn.attention_matrices(q, k, v, method, causal=True, **options)
        assert set(maps) == {"attention"}
        out = approxattn.attention(q, k, v, method, causal=True, **options)
        assert rel_err(maps["attention"] @ v.repeat_interleave(2, dim=1), out) < 1e-10


def test_tf32_switch_is_scoped_and_restored(monkeypatch):
    from approxattn.methods.sparse import _tf32_matmuls

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with _tf32_matmuls(True):
            assert torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError), _tf32_matmuls(True):   # restored on an error too
            raise RuntimeError("boom")
        assert not torch.backends.cuda.matmul.allow_tf32
        with _tf32_matmuls(False):
            assert not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setenv("APPROXATTN_SEA_TF32", "0")
        with _tf32_matmuls(True):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
