"""Exact attention on a compressed-column mask (SEA's sparse step): layout, both reference paths,
gradients, errors, and the Triton kernel under the interpreter."""

from __future__ import annotations

import math

import pytest
import torch

# conftest.py switches Triton to its interpreter on CPU, before any test module is imported
from hypothesis import given, settings, strategies as st

from approxattn.blocks import sparse_attention as sp
from approxattn.blocks.exact import softmax_attention
from approxattn.blocks.sparse_attention import (
    column_layout,
    column_mask_attention,
    column_mask_probabilities,
    dense_column_mask,
    key_columns,
    nonempty_columns,
)
from helpers import needs_triton, qkv, rel_err


def naive_sparse_attention(q, k, v, selected, layout, scale):
    """Row by row in float64 with Python loops over keys: an independent twin of the reference."""
    B, H, Nq, _ = q.shape
    groups = H // k.shape[1]
    T = layout.columns
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for i in range(Nq):
            L = int(layout.row_length[b, i])
            for h in range(H):
                keys = [j for j in range(k.shape[2])
                        if 0 <= int(layout.key_rank[b, j]) < L
                        and bool(selected[b, h, i, math.floor((int(layout.key_rank[b, j]) + 0.5) / L * T)])]
                if not keys:
                    continue
                logits = torch.stack([q[b, h, i].double() @ k[b, h // groups, j].double() for j in keys]) * scale
                p = torch.softmax(logits, 0)
                out[b, h, i] = sum(p[n] * v[b, h // groups, j].double() for n, j in enumerate(keys))
    return out


def random_padding(batch, n, gen, min_valid=1):
    """A (batch, n) keep-mask with a random number (≥ min_valid) of valid keys at random positions."""
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        count = int(torch.randint(min_valid, n + 1, (), generator=gen))
        mask[b, torch.randperm(n, generator=gen)[:count]] = True
    return mask


# ---------------------------------------------------------------- layout and column map


def test_column_map_hand_computed():
    layout = column_layout(1, 6, 6, 4, causal=False)
    # floor((r + 0.5) / 6 · 4) for r = 0..5
    assert key_columns(layout)[0, 0].tolist() == [0, 1, 1, 2, 3, 3]
    causal = column_layout(1, 6, 6, 4, causal=True)
    # row 2 (L = 3): floor((r + 0.5)/3 · 4) = 0, 2, 3 for r = 0, 1, 2; the future is −1
    assert key_columns(causal)[0, 2].tolist() == [0, 2, 3, -1, -1, -1]
    assert key_columns(causal)[0, 0].tolist() == [2, -1, -1, -1, -1, -1]   # floor(0.5 · 4)


def test_column_layout_with_padding_hand_computed():
    mask = torch.tensor([[False, True, True, False, True]])
    layout = column_layout(1, 5, 5, 2, causal=False, key_padding_mask=mask)
    assert layout.key_rank.tolist() == [[-1, 0, 1, -1, 2]]
    assert layout.row_length.tolist() == [[3] * 5]
    # L = 3, T = 2: floor((r + 0.5)/3 · 2) = 0, 1, 1
    assert key_columns(layout)[0, 0].tolist() == [-1, 0, 1, -1, 1]
    causal = column_layout(1, 5, 5, 2, causal=True, key_padding_mask=mask)
    assert causal.row_length.tolist() == [[0, 1, 2, 2, 3]]
    assert key_columns(causal)[0, 0].tolist() == [-1] * 5
    assert key_columns(causal)[0, 3].tolist() == [-1, 0, 1, -1, -1]


def test_rank_ranges_invert_the_column_map():
    """Column c of a row of length L holds exactly the ranks [lo_c, hi_c); they tile [0, L)."""
    for T in range(1, 20):
        for L in range(0, 60):
            rank = torch.arange(L)
            col = sp.column_of_rank(rank, torch.tensor(L), T)
            assert torch.equal(col, torch.floor((rank + 0.5) / L * T).long()) if L else True
            lo, hi = sp.column_rank_range(torch.arange(T), torch.tensor(L), T)
            assert int(lo[0]) == 0 and int(hi[-1]) == L
            assert torch.equal(lo[1:], hi[:-1])
            for c in range(T):
                assert torch.equal(rank[col == c], torch.arange(int(lo[c]), int(hi[c])))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 24), T=st.integers(1, 12), causal=st.booleans(),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_eligibility_padding_causality_nonempty(batch, n, T, causal, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_padding(batch, n, gen) if padded else None
    layout = column_layout(batch, n, n, T, causal=causal, key_padding_mask=mask)
    cols = key_columns(layout)
    assert cols.shape == (batch, n, n) and int(cols.max()) < T
    eligible = cols >= 0
    if mask is not None:
        assert not eligible[~mask[:, None, :].expand_as(eligible)].any()     # padded keys never eligible
        n_valid = mask.sum(1)
    else:
        n_valid = torch.full((batch,), n)
    if causal:
        assert not eligible[:, ~torch.ones(n, n, dtype=torch.bool).tril()].any()  # never the future
    else:
        assert torch.equal(eligible.sum(-1), n_valid[:, None].expand(batch, n))
    assert torch.equal(eligible.sum(-1), layout.row_length)
    count = torch.zeros(batch, n, T, dtype=torch.int64).scatter_add_(2, cols.clamp(min=0), eligible.long())
    assert torch.equal(nonempty_columns(layout), count > 0)


def test_dense_column_mask_reads_selected():
    gen = torch.Generator().manual_seed(0)
    layout = column_layout(2, 7, 7, 3, causal=True, key_padding_mask=random_padding(2, 7, gen))
    selected = torch.rand(2, 2, 7, 3, generator=gen) < 0.5
    mask = dense_column_mask(selected, layout)
    cols = key_columns(layout)
    for b, h, i, j in torch.cartesian_prod(*(torch.arange(s) for s in mask.shape)).tolist():
        c = int(cols[b, i, j])
        assert bool(mask[b, h, i, j]) == (c >= 0 and bool(selected[b, h, i, c]))


# ---------------------------------------------------------------- attention, both paths


def _case(batch, heads, kv_heads, nq, nk, T, causal, padded, density, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(batch, heads, kv_heads, nq, nk, 8, 5, dtype=dtype, std=1.0, generator=gen)
    mask = random_padding(batch, nk, gen) if padded else None
    layout = column_layout(batch, nq, nk, T, causal=causal, key_padding_mask=mask)
    selected = torch.rand(batch, heads, nq, T, generator=gen) < density
    return q, k, v, selected, layout, mask


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.integers(1, 3), nq=st.integers(1, 20),
       nk=st.integers(1, 20), T=st.integers(1, 9), causal=st.booleans(), padded=st.booleans(),
       density=st.sampled_from([0.0, 0.2, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_dense_and_gather_paths_match_a_naive_loop(batch, kv_heads, groups, nq, nk, T, causal, padded, density, seed):
    if causal:
        nk = nq
    q, k, v, selected, layout, _ = _case(batch, kv_heads * groups, kv_heads, nq, nk, T, causal, padded, density, seed)
    ref = naive_sparse_attention(q, k, v, selected, layout, 0.35)
    dense = column_mask_attention(q, k, v, selected, layout, scale=0.35, path="dense")
    gather = column_mask_attention(q, k, v, selected, layout, scale=0.35, path="gather")
    assert dense.shape == gather.shape == (batch, kv_heads * groups, nq, 5)
    assert torch.allclose(dense, ref, atol=1e-12) and torch.allclose(gather, ref, atol=1e-12)


def test_gather_path_in_several_chunks(monkeypatch):
    q, k, v, selected, layout, _ = _case(2, 4, 2, 37, 37, 6, True, True, 0.4, 3)
    dense = column_mask_attention(q, k, v, selected, layout, scale=0.3, path="dense")
    monkeypatch.setattr(sp, "GATHER_PAIRS_PER_CHUNK", 64)       # about one row per chunk
    gather = column_mask_attention(q, k, v, selected, layout, scale=0.3, path="gather")
    assert rel_err(gather, dense) < 1e-12


def test_gather_path_under_autograd_refuses_what_cannot_fit(monkeypatch):
    """On CUDA the gather path compares the tensors autograd would keep with the device's free memory
    before allocating (``_free_memory``, faked here; None off CUDA, where nothing is checked)."""
    q, k, v, selected, layout, _ = _case(2, 4, 2, 37, 37, 6, True, False, 0.4, 3)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    monkeypatch.setattr(sp, "_free_memory", lambda device: 1000)
    with pytest.raises(torch.OutOfMemoryError, match=r"gather path, B=2, H=4, Nq=37.*GiB.*torch.no_grad"):
        column_mask_attention(*ins, selected, layout, scale=0.3, path="gather")
    with torch.no_grad():  # nothing kept for a backward: no check
        column_mask_attention(*ins, selected, layout, scale=0.3, path="gather")
    column_mask_attention(q, k, v, selected, layout, scale=0.3, path="gather")  # no input needs a gradient
    monkeypatch.setattr(sp, "_free_memory", lambda device: 2**30)
    column_mask_attention(*ins, selected, layout, scale=0.3, path="gather").sum().backward()
    assert all(t.grad is not None for t in ins)


def test_free_memory_is_only_read_on_cuda():
    assert sp._free_memory(torch.device("cpu")) is None


def test_auto_path_switches_on_size(monkeypatch):
    q, k, v, selected, layout, _ = _case(1, 2, 1, 12, 12, 4, False, False, 0.5, 4)
    calls = []
    for name in ("_dense_attention", "_gather_attention"):
        original = getattr(sp, name)
        monkeypatch.setattr(sp, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    column_mask_attention(q, k, v, selected, layout, scale=0.3)
    monkeypatch.setattr(sp, "DENSE_CELLS_LIMIT", 10)
    column_mask_attention(q, k, v, selected, layout, scale=0.3)
    assert calls == ["_dense_attention", "_gather_attention"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["dense", "gather"])
def test_full_selection_is_exact_softmax_attention(causal, path):
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(2, 4, 2, 16, 16, 8, dtype=torch.float64, generator=gen)
    mask = random_padding(2, 16, gen, min_valid=4)
    mask[:, 0] = True   # so no causal row is empty (softmax_attention would zero it too, but keep it simple)
    layout = column_layout(2, 16, 16, 5, causal=causal, key_padding_mask=mask)
    selected = torch.ones(2, 4, 16, 5, dtype=torch.bool)
    out = column_mask_attention(q, k, v, selected, layout, scale=0.4, path=path)
    ref = softmax_attention(q, k, v, causal=causal, key_valid=mask, scale=0.4)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_rows_without_keys_give_zero(path):
    q, k, v, selected, layout, _ = _case(1, 2, 2, 6, 6, 3, False, False, 1.0, 6)
    selected[0, 1, 2] = False                       # a row that selects nothing
    mask = torch.tensor([[False, False, True, True, True, True]])
    causal = column_layout(1, 6, 6, 3, causal=True, key_padding_mask=mask)   # rows 0, 1 have L = 0
    out = column_mask_attention(q, k, v, selected, layout, scale=0.5, path=path)
    assert torch.all(out[0, 1, 2] == 0) and out[0, 0, 2].abs().sum() > 0
    out = column_mask_attention(q, k, v, torch.ones_like(selected), causal, scale=0.5, path=path)
    assert torch.all(out[:, :, :2] == 0) and torch.isfinite(out).all() and out[:, :, 2:].abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_return_their_dtype(dtype):
    q, k, v, selected, layout, _ = _case(1, 2, 1, 10, 10, 4, True, False, 0.6, 7)
    ref = column_mask_attention(q, k, v, selected, layout, scale=0.3)
    for path in ("dense", "gather"):
        out = column_mask_attention(q.to(dtype), k.to(dtype), v.to(dtype), selected, layout, scale=0.3, path=path)
        assert out.dtype == dtype
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_gradcheck(path):
    q, k, v, selected, layout, _ = _case(1, 2, 1, 6, 6, 3, True, True, 0.6, 8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: column_mask_attention(q, k, v, selected, layout, scale=0.5, path=path), (q, k, v))


def test_probabilities():
    q, k, v, selected, layout, _ = _case(2, 4, 2, 9, 9, 4, True, True, 0.5, 9)
    probs = column_mask_probabilities(q, k, selected, layout, scale=0.5)
    mask = dense_column_mask(selected, layout)
    assert probs.shape == (2, 4, 9, 9) and torch.all(probs[~mask] == 0)
    sums = probs.sum(-1)
    has_key = mask.any(-1)
    assert torch.allclose(sums[has_key], torch.ones(()).double()) and torch.all(sums[~has_key] == 0)
    assert torch.allclose(probs @ torch.repeat_interleave(v, 2, dim=1),
                          column_mask_attention(q, k, v, selected, layout, scale=0.5))
    one = column_mask_probabilities(q, k, selected, layout, scale=0.5, head=3)
    assert one.shape == (2, 1, 9, 9) and torch.equal(one, probs[:, 3:4])


# ---------------------------------------------------------------- errors


def test_bad_inputs():
    q, k, v, selected, layout, _ = _case(1, 4, 2, 8, 8, 4, False, False, 0.5, 10)
    call = column_mask_attention
    with pytest.raises(TypeError, match="selected"):
        call(q, k, v, selected.float(), layout, scale=1.0)
    with pytest.raises(ValueError, match="selected"):
        call(q, k, v, selected[..., :3], layout, scale=1.0)
    with pytest.raises(ValueError, match="selected"):
        call(q, k, v, selected[:, :2], layout, scale=1.0)
    with pytest.raises(ValueError, match="k: expected a number of heads"):
        call(q, k[:, :1].expand(1, 3, 8, 8), v[:, :1].expand(1, 3, 8, 5), selected, layout, scale=1.0)
    with pytest.raises(ValueError, match="layout"):
        call(q, k, v, selected, column_layout(1, 8, 9, 4, causal=False), scale=1.0)
    with pytest.raises(TypeError, match="layout"):
        call(q, k, v, selected, (layout.key_rank, layout.row_length, 4), scale=1.0)
    with pytest.raises(TypeError, match="k, v"):
        call(q, k.float(), v, selected, layout, scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        call(q, k, v, selected, layout, scale=float("nan"))
    with pytest.raises(ValueError, match="path"):
        call(q, k, v, selected, layout, scale=1.0, path="sparse")
    with pytest.raises(ValueError, match="q: expected a 4-D"):
        call(q[0], k, v, selected, layout, scale=1.0)
    with pytest.raises(ValueError, match="causal"):
        column_layout(1, 4, 5, 2, causal=True)
    with pytest.raises(ValueError, match="columns"):
        column_layout(1, 4, 4, 0, causal=False)
    with pytest.raises(TypeError, match="key_padding_mask"):
        column_layout(1, 4, 4, 2, causal=False, key_padding_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        column_layout(1, 4, 4, 2, causal=False, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="head"):
        column_mask_probabilities(q, k, selected, layout, scale=1.0, head=4)


# ---------------------------------------------------------------- Triton kernel (interpreter on CPU)

KERNEL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def test_tile_runs_cover_every_masked_pair_once():
    """Every (row, key) of the mask lies in a visited tile of its block; no tile is visited twice."""
    from approxattn.kernels.sparse_attention import tile_runs

    gen = torch.Generator().manual_seed(11)
    for causal in (False, True):
        layout = column_layout(2, 45, 45, 7, causal=causal, key_padding_mask=random_padding(2, 45, gen))
        selected = torch.rand(2, 3, 45, 7, generator=gen) < 0.3
        BM, BN = 8, 4
        runs = tile_runs(selected, layout, BM, BN)
        assert_runs_cover_each_needed_tile_once(runs, dense_column_mask(selected, layout), torch.arange(45), BM, BN)


def assert_runs_cover_each_needed_tile_once(tile_runs_, mask, order, BM, BN):
    """tile_runs_ = (start, count, runs); mask (B, H, Nq, Nk); order (Nq,) or (B, H, Nq): the rows of
    the blocks. Runs are compacted to the front, disjoint, and hold every tile a block's rows need."""
    start, count, runs = tile_runs_
    B, H = mask.shape[:2]
    order = order.expand(B, H, -1)
    for b in range(B):
        for h in range(H):
            for mb in range(start.shape[2]):
                n = int(runs[b, h, mb])
                assert torch.all(count[b, h, mb, :n] > 0) and torch.all(count[b, h, mb, n:] == 0)
                tiles = torch.cat([torch.arange(int(s), int(s) + int(c)) for s, c in
                                   zip(start[b, h, mb, :n], count[b, h, mb, :n])]) if n else torch.zeros(0)
                assert tiles.numel() == tiles.unique().numel()
                rows = order[b, h, mb * BM:(mb + 1) * BM]
                needed = mask[b, h, rows].any(0).nonzero().flatten() // BN
                assert set(needed.tolist()) <= set(tiles.long().tolist())


@pytest.mark.parametrize("causal", [False, True])
def test_per_column_tile_runs_cover_every_masked_pair_of_rows_in_any_order_once(causal):
    """Rows of different lengths in any order: every (row, key) of the mask lies in a visited tile
    of its block, and no tile is visited twice."""
    from approxattn.kernels.sparse_attention import rows_by_first_keys, tile_runs_by_column_lengths

    gen = torch.Generator().manual_seed(12 + causal)
    B, H, N, T, BM, BN = 2, 3, 45, 7, 8, 4
    layout = column_layout(B, N, N, T, causal=causal, key_padding_mask=random_padding(B, N, gen))
    selected = torch.rand(B, H, N, T, generator=gen) < 0.3
    mask = dense_column_mask(selected, layout)                       # (B, H, N, N)
    random_order = torch.stack([torch.stack([torch.randperm(N, generator=gen) for _ in range(H)]) for _ in range(B)])
    for order in (random_order, rows_by_first_keys(selected, layout).long()):
        ordered = selected.gather(2, order[..., None].expand(B, H, N, T))
        length = layout.row_length[:, None, :].expand(B, H, N).gather(2, order)
        runs = tile_runs_by_column_lengths(ordered, length, layout, BM, BN)
        assert_runs_cover_each_needed_tile_once(runs, mask, order, BM, BN)


@needs_triton
@pytest.mark.parametrize("causal,padded,T", [(True, False, 7), (True, True, 16), (False, True, 5)])
def test_triton_column_length_runs_match_the_tensor_ops(forced_kernels, causal, padded, T):
    """The one-launch per-column ranges (rows read through an order) give the runs of
    tile_runs_by_column_lengths on the gathered rows, for a random order and the first-key order."""
    from approxattn.kernels.sparse_attention import (
        column_length_runs_triton,
        rows_by_first_keys,
        tile_runs_by_column_lengths,
    )

    gen = torch.Generator().manual_seed(40 + T)
    B, H, N = 2, 3, 45
    layout = column_layout(B, N, N, T, causal=causal, key_padding_mask=random_padding(B, N, gen) if padded else None)
    selected = torch.rand(B, H, N, T, generator=gen) < 0.3
    selected[0, 1] = False                                             # a head with no cell
    random_order = torch.stack([torch.stack([torch.randperm(N, generator=gen) for _ in range(H)]) for _ in range(B)])
    for order in (random_order, rows_by_first_keys(selected, layout).long()):
        ordered = selected.gather(2, order[..., None].expand(B, H, N, T))
        length = layout.row_length[:, None, :].expand(B, H, N).gather(2, order)
        start, count, runs = tile_runs_by_column_lengths(ordered, length, layout, 8, 4)
        start_t, count_t, runs_t = column_length_runs_triton(selected, layout, 8, 4, order)
        assert torch.equal(runs, runs_t) and torch.equal(start, start_t) and torch.equal(count, count_t)


def test_rows_by_first_keys_sorts_rows_by_where_their_first_column_starts():
    from approxattn.blocks.sparse_attention import column_rank_range
    from approxattn.kernels.sparse_attention import rows_by_first_keys

    gen = torch.Generator().manual_seed(22)
    layout = column_layout(2, 50, 50, 9, causal=True, key_padding_mask=random_padding(2, 50, gen))
    selected = torch.rand(2, 3, 50, 9, generator=gen) < 0.2
    selected[0, 0, 7] = False
    order = rows_by_first_keys(selected, layout).long()
    assert order.shape == (2, 3, 50)
    assert torch.equal(order.sort(-1).values, torch.arange(50).expand(2, 3, 50))
    first = selected.int().argmax(-1)
    lo, _ = column_rank_range(first, layout.row_length[:, None, :], 9)
    key = torch.where(selected.any(-1), lo, 50).gather(-1, order)
    assert torch.all(key[..., 1:] >= key[..., :-1])
    assert int((order[0, 0] == 7).nonzero()) >= int(selected[0, 0].any(-1).sum())   # empty rows go last


@needs_triton
@pytest.mark.parametrize("causal,padded,T", [(False, False, 7), (True, True, 16), (True, False, 5), (False, True, 20)])
def test_triton_tile_runs_match_the_torch_ones(forced_kernels, causal, padded, T):
    from approxattn.kernels.sparse_attention import tile_runs, tile_runs_triton

    gen = torch.Generator().manual_seed(T)
    mask = random_padding(2, 53, gen) if padded else None
    layout = column_layout(2, 53, 53, T, causal=causal, key_padding_mask=mask)
    selected = torch.rand(2, 3, 53, T, generator=gen) < 0.3
    start, count, runs = tile_runs(selected, layout, 16, 8)
    start_t, count_t, runs_t = tile_runs_triton(selected, layout, 16, 8)
    assert torch.equal(runs, runs_t)
    live = torch.arange(T) < runs[..., None]
    assert torch.equal(start[live], start_t[live]) and torch.equal(count[live], count_t[live])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,padded", [(False, False), (True, True), (False, True), (True, False)])
def test_kernel_matches_reference(forced_kernels, monkeypatch, dtype, causal, padded):
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    nq = 40
    nk = nq if causal else 37
    q, k, v, selected, layout, _ = _case(2, 4, 2, nq, nk, 6, causal, padded, 0.35, 12, dtype=dtype)
    selected[0, 1, 5] = False                                   # a row with no key
    if dtype == torch.float16:                                  # one run with the tensor-op tile runs
        monkeypatch.setenv("APPROXATTN_TRITON_TILE_RUNS", "0")
    out = fast_column_mask_attention(q, k, v, selected, layout, scale=0.4)
    assert out is not None and out.dtype == dtype
    ref = column_mask_attention(q.double(), k.double(), v.double(), selected, layout, scale=0.4)
    assert rel_err(out, ref) < KERNEL_TOL[dtype]
    assert torch.all(out[0, 1, 5] == 0)


@needs_triton
@pytest.mark.parametrize("T", [1, 5, 16, 130])
def test_first_two_selected_columns_triton_matches_tensor_ops(forced_kernels, monkeypatch, T):
    """The one-pass kernel and the tensor ops agree on each row's first and second selected column
    (T where none), with rows of none, one and many cells, on a non-contiguous view."""
    import approxattn.kernels.sparse_attention as ks

    gen = torch.Generator().manual_seed(T)
    selected = torch.rand(2, 3, 37, T, generator=gen) < 0.15
    selected[0, 0, :3] = False
    selected[0, 0, 1, T - 1] = True                              # one cell, the last column
    selected[1, 2, 4] = True                                     # every cell
    view = selected.transpose(1, 2).contiguous().transpose(1, 2)   # same values, other strides
    got = ks.first_two_selected(view)
    monkeypatch.setattr(ks, "interpreting", lambda: False)      # CPU tensors: the tensor ops
    expected = ks.first_two_selected(selected)
    for g, e in zip(got, expected):
        assert g.dtype == torch.int64 and torch.equal(g, e)
    first, second = expected
    column = torch.where(selected, torch.arange(T), T)
    assert torch.equal(first, column.min(-1).values)
    assert torch.equal(second, torch.where(column > first[..., None], column, T).min(-1).values)


@needs_triton
@pytest.mark.parametrize("padded", [False, True])
def test_triton_tile_runs_read_rows_through_an_order(forced_kernels, padded):
    """Runs of blocks cut from a row order, read in place, equal those of the gathered rows."""
    from approxattn.kernels.sparse_attention import rows_by_columns, tile_runs, tile_runs_triton

    gen = torch.Generator().manual_seed(31 + padded)
    B, H, N, T = 2, 3, 53, 9
    layout = column_layout(B, N, N, T, causal=False, key_padding_mask=random_padding(B, N, gen) if padded else None)
    selected = torch.rand(B, H, N, T, generator=gen) < 0.2
    order = rows_by_columns(selected)
    ordered = selected.gather(2, order.long()[..., None].expand(B, H, N, T))
    start, count, runs = tile_runs(ordered, layout, 16, 8)
    start_t, count_t, runs_t = tile_runs_triton(selected, layout, 16, 8, order=order)
    assert torch.equal(runs, runs_t)
    live = torch.arange(T) < runs[..., None]
    assert torch.equal(start[live], start_t[live]) and torch.equal(count[live], count_t[live])


def test_rows_by_columns_is_a_per_head_permutation_grouped_by_first_column():
    from approxattn.kernels.sparse_attention import rows_by_columns

    gen = torch.Generator().manual_seed(21)
    selected = torch.rand(2, 3, 50, 9, generator=gen) < 0.2
    selected[0, 0, 7] = False
    order = rows_by_columns(selected).long()
    assert order.dtype == torch.int64 and order.shape == (2, 3, 50)
    assert torch.equal(order.sort(-1).values, torch.arange(50).expand(2, 3, 50))
    first = selected.int().argmax(-1).gather(-1, order)
    assert torch.all(first[..., 1:] >= first[..., :-1])


def _kernel_with_flag_off_and_on(monkeypatch, variable, q, k, v, selected, layout):
    """The kernel's output with the environment switch ``variable`` at 0 and at 1: each within 1e-4 of
    the fp64 reference, the two within 1e-5 of each other; returns the output with the switch on."""
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    ref = column_mask_attention(q.double(), k.double(), v.double(), selected, layout, scale=0.4)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(variable, flag)
        outs[flag] = fast_column_mask_attention(q, k, v, selected, layout, scale=0.4)
        assert rel_err(outs[flag], ref) < 1e-4
    assert rel_err(outs["0"], outs["1"]) < 1e-5
    return outs["1"]


@needs_triton
@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False), (True, True)])
def test_kernel_with_and_without_row_order(forced_kernels, monkeypatch, causal, padded):
    """Rows grouped by column (equal-length layouts) or by first key (causal) give the same output
    as rows in index order, with GQA, empty rows and more rows than one block."""
    n = 70
    q, k, v, selected, layout, _ = _case(2, 4, 2, n, n if causal else 61, 8, causal, padded, 0.25, 15,
                                         dtype=torch.float32)
    assert layout.equal_lengths != causal
    selected[1, 3, 40] = False
    out = _kernel_with_flag_off_and_on(monkeypatch, "APPROXATTN_SPARSE_ROW_ORDER", q, k, v, selected, layout)
    assert torch.all(out[1, 3, 40] == 0)


@needs_triton
@pytest.mark.parametrize("causal,per_row", [(False, False), (True, True), (False, True)])
def test_kernel_row_mix_equals_the_reference_then_the_mix(forced_kernels, causal, per_row):
    """The kernel's epilogue (scale·out + shift_scale·shift per row, SEA's gates) against the reference
    followed by apply_row_mix, with rows reordered (more rows than a block), GQA and an empty row;
    the shift one vector a head or one a row. Bad mixes raise."""
    from approxattn.blocks.sparse_attention import apply_row_mix
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    n = 40
    q, k, v, selected, layout, _ = _case(2, 4, 2, n, n if causal else 33, 6, causal, True, 0.3, 51 + causal,
                                         dtype=torch.float32)
    selected[1, 2, 7] = False
    gen = torch.Generator().manual_seed(3)
    scale, shift_scale = torch.rand(2, 4, n, generator=gen), torch.rand(2, 4, n, generator=gen)
    shift = torch.randn(2, 4, n if per_row else 1, v.shape[-1], generator=gen)
    mix = (scale, shift_scale, shift)
    out = fast_column_mask_attention(q, k, v, selected, layout, scale=0.4, mix=mix)
    ref = apply_row_mix(column_mask_attention(q.double(), k.double(), v.double(), selected, layout, scale=0.4),
                        tuple(t.double() for t in mix))
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    assert torch.allclose(out[1, 2, 7].double(), shift_scale[1, 2, 7].double() * shift[1, 2, 7 if per_row else 0].double(),
                          atol=1e-6)                                    # an empty row: the shift alone
    with pytest.raises(ValueError, match="mix scale"):
        fast_column_mask_attention(q, k, v, selected, layout, scale=0.4, mix=(scale[:, :, :3], shift_scale, shift))
    with pytest.raises(ValueError, match="mix shift"):
        fast_column_mask_attention(q, k, v, selected, layout, scale=0.4, mix=(scale, shift_scale, shift[..., :2]))
    with pytest.raises(TypeError, match="mix"):
        fast_column_mask_attention(q, k, v, selected, layout, scale=0.4, mix=[scale, shift_scale, shift])


def _uniform_tile_share(layout, block_m, block_n):
    """Share of (row block, full key tile) pairs, rows in index order, where the tile's ranks run
    r0 … r0 + block_n − 1 and each row of the block sees the tile in one column or not at all: the
    pairs the kernel masks by one bit a row (its condition, mirrored), among those with a key to see."""
    rank, length, T = layout.key_rank, layout.row_length, layout.columns
    uniform = total = 0
    for b in range(rank.shape[0]):
        for i0 in range(0, length.shape[1], block_m):
            L = length[b, i0:i0 + block_m]
            den = 2 * L.clamp(min=1)
            for t in range(rank.shape[1] // block_n):
                r0, r1 = int(rank[b, t * block_n]), int(rank[b, t * block_n + block_n - 1])
                if r0 >= int(L.max()):
                    continue          # no row of the block reaches this tile
                total += 1
                if r0 < 0 or r1 - r0 != block_n - 1:
                    continue
                col0 = ((2 * r0 + 1) * T // den).clamp(max=T - 1)
                col1 = ((2 * r1 + 1) * T // den).clamp(max=T - 1)
                uniform += bool(torch.all(((col0 == col1) & (r1 < L)) | (r0 >= L)))
    return uniform / max(total, 1)


@needs_triton
@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False)])
def test_kernel_masks_whole_tiles_by_row_bits(forced_kernels, monkeypatch, causal, padded):
    """Columns of many keys (T = 4 over 160 keys): most tiles lie in one column for every row, and
    the kernel masks them by one bit a row (rows of one length: non-causal). Same output as the
    per-element mask and the reference, with padded keys (tiles holding any take the per-element
    path) and empty rows; causal layouts keep the per-element mask (the flag changes nothing)."""
    from approxattn.kernels.sparse_attention import launch_config

    n = 160
    q, k, v, selected, _, _ = _case(2, 2, 1, n, n, 4, causal, False, 0.5, 41 + 2 * causal + padded,
                                    dtype=torch.float32)
    mask = None
    if padded:   # sample 0 right-padded (whole tiles of real keys), sample 1 padded at random positions
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[0, 131:] = False
        mask[1] = random_padding(1, n, torch.Generator().manual_seed(5), min_valid=n // 2)[0]
    layout = column_layout(2, n, n, 4, causal=causal, key_padding_mask=mask)
    selected[0, 1, 17] = False
    cfg = launch_config(q.shape[-1], v.shape[-1])
    if not causal:
        share = _uniform_tile_share(layout, cfg["BM"], cfg["BN"])
        assert share > 0.2                        # the case exercises the row-bit path (0.25–0.8 here)
    out = _kernel_with_flag_off_and_on(monkeypatch, "APPROXATTN_SPARSE_UNIFORM_TILES", q, k, v, selected, layout)
    assert torch.all(out[0, 1, 17] == 0)


@needs_triton
def test_causal_kernel_on_rows_sorted_by_first_key(forced_kernels):
    """One scattered column per row: index order would visit the whole causal triangle, so the
    kernel takes the rows sorted by first key (checked) and still matches the reference."""
    from approxattn.kernels.sparse_attention import _cheaper_row_order, fast_column_mask_attention, launch_config

    gen = torch.Generator().manual_seed(31)
    B, H, n, T = 2, 4, 96, 12
    q, k, v, _, layout, _ = _case(B, H, 2, n, n, T, True, True, 0.25, 16, dtype=torch.float32)
    selected = torch.zeros(B, H, n, T, dtype=torch.bool)
    selected.scatter_(-1, torch.randint(0, T, (B, H, n, 1), generator=gen), True)
    cfg = launch_config(q.shape[-1], v.shape[-1])
    order, *_ = _cheaper_row_order(selected, layout, cfg["BM"], cfg["BN"])
    identity = torch.arange(n, dtype=torch.int32)
    assert sum(not torch.equal(order[b, h], identity) for b in range(B) for h in range(H)) >= B * H // 2
    out = fast_column_mask_attention(q, k, v, selected, layout, scale=0.4)
    ref = column_mask_attention(q.double(), k.double(), v.double(), selected, layout, scale=0.4)
    assert rel_err(out, ref) < 1e-4


@needs_triton
def test_kernel_odd_head_dims_and_strides(forced_kernels):
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    gen = torch.Generator().manual_seed(13)
    q, k, v = qkv(1, 2, 1, 19, 23, 12, 20, dtype=torch.float32, std=1.0, generator=gen)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)          # (B, N, H, d) memory, like a fused projection
    layout = column_layout(1, 19, 23, 5, causal=False)
    selected = torch.rand(1, 2, 19, 5, generator=gen) < 0.5
    out = fast_column_mask_attention(q, k, v, selected, layout, scale=0.3)
    ref = column_mask_attention(q.double(), k.double(), v.double(), selected, layout, scale=0.3)
    assert rel_err(out, ref) < 1e-4


def test_fast_path_declines(monkeypatch):
    from approxattn.kernels import sparse_attention as ks

    q, k, v, selected, layout, _ = _case(1, 2, 1, 8, 8, 4, False, False, 0.5, 14, dtype=torch.float32)
    monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
    assert ks.fast_column_mask_attention(q, k, v, selected, layout, scale=0.3) is None
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS")
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    assert ks.fast_column_mask_attention(q.double(), k.double(), v.double(), selected, layout, scale=0.3) is None
    qg = q.clone().requires_grad_()
    assert ks.fast_column_mask_attention(qg, k, v, selected, layout, scale=0.3) is None
    with pytest.raises(ValueError, match="selected"):
        ks.fast_column_mask_attention(q, k, v, selected[..., :2], layout, scale=0.3)


# ---------------------------------------------------------------- the bench's SEA-like masks


@pytest.mark.parametrize("causal", [False, True])
def test_sea_like_selection_reads_k_keys_per_row(causal):
    from approxattn.bench.sparse import sea_like_selection

    selected, layout = sea_like_selection(1, 4, 512, 32, 16, causal=causal, device="cpu", seed=1)
    assert selected.shape == (1, 4, 512, 32) and selected.dtype == torch.bool
    keys = dense_column_mask(selected, layout).sum(-1).double()     # (B, H, N)
    assert abs(float(keys.mean()) - 16) < 3
    assert torch.all(keys.sum(1) > 0)                                 # every row reads some key in some head
    assert not (selected & ~nonempty_columns(layout)[:, None]).any()  # empty columns are never picked


def test_sea_preset_cases_are_forward_only():
    from approxattn.bench import presets

    cases = presets.sea((4096,))
    assert {c.impl for c in cases} >= {"sdpa", "sparse-kernel", "sparse-flex", "sparse-reference", "sparse-runs"}
    assert all(c.modes == ("fwd",) for c in cases) and {c.causal for c in cases} == {False, True}
