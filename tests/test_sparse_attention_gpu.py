"""SEA's sparse step on the GPU at real sizes: the Triton kernel (and FlexAttention) against the
PyTorch reference on SEA-like masks. Run on the GPU machine: ``pytest -m gpu tests/test_sparse_attention_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from approxattn.bench.sparse import sea_like_selection
from approxattn.blocks.sparse_attention import column_layout, column_mask_attention
from helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _inputs(batch, heads, kv_heads, n, d, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    draw = lambda h: torch.randn(batch, h, n, d, generator=gen, device="cuda").to(dtype)  # noqa: E731
    return draw(heads), draw(kv_heads), draw(kv_heads)


def _padding(batch, n, seed):
    """Left padding of a different length per batch element (at least a quarter valid)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(n // 4, n + 1, (batch,), generator=gen)
    return (torch.arange(n)[None] >= (n - lengths)[:, None]).cuda()


CASES = [
    # (batch, heads, kv_heads, n, d, T, causal, padded, dtype)
    (1, 16, 16, 16384, 64, 256, False, False, torch.bfloat16),
    (1, 16, 16, 16384, 64, 256, True, False, torch.bfloat16),
    (2, 8, 2, 8192, 64, 128, True, True, torch.float16),
    (2, 8, 2, 8192, 64, 128, False, True, torch.bfloat16),
    (1, 4, 4, 4096, 128, 256, True, False, torch.float32),
    (1, 4, 1, 4096, 32, 64, False, False, torch.float32),
    (2, 4, 2, 3000, 64, 96, True, True, torch.bfloat16),   # ragged length
]


@pytest.mark.parametrize("batch,heads,kv_heads,n,d,T,causal,padded,dtype", CASES)
def test_kernel_matches_reference_at_real_sizes(batch, heads, kv_heads, n, d, T, causal, padded, dtype):
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    q, k, v = _inputs(batch, heads, kv_heads, n, d, dtype, seed=n + d)
    mask = _padding(batch, n, n) if padded else None
    selected, layout = sea_like_selection(batch, heads, n, T, 64, causal=causal, key_padding_mask=mask, seed=1)
    out = fast_column_mask_attention(q, k, v, selected, layout, scale=d**-0.5)
    assert out is not None and out.dtype == dtype and torch.isfinite(out).all()
    ref = column_mask_attention(q.float(), k.float(), v.float(), selected, layout, scale=d**-0.5, path="gather")
    assert rel_err(out, ref) < TOL[dtype]


def test_kernel_with_dense_selection_is_flash_attention():
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    q, k, v = _inputs(1, 8, 8, 4096, 64, torch.bfloat16, seed=3)
    for causal in (False, True):
        layout = column_layout(1, 4096, 4096, 128, causal=causal, device="cuda")
        selected = torch.ones(1, 8, 4096, 128, dtype=torch.bool, device="cuda")
        out = fast_column_mask_attention(q, k, v, selected, layout, scale=0.125)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                                               scale=0.125)
        assert rel_err(out, ref) < 1e-2


def test_dense_and_gather_paths_agree_on_gpu():
    q, k, v = _inputs(1, 4, 2, 2048, 64, torch.float32, seed=4)
    selected, layout = sea_like_selection(1, 4, 2048, 128, 64, causal=True, seed=2)
    dense = column_mask_attention(q, k, v, selected, layout, scale=0.125, path="dense")
    gather = column_mask_attention(q, k, v, selected, layout, scale=0.125, path="gather")
    assert rel_err(gather, dense) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_flex_attention_peer_matches_reference(causal):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    from approxattn.kernels.sparse_attention import flex_column_mask_attention

    q, k, v = _inputs(1, 8, 4, 4096, 64, torch.bfloat16, seed=5)
    selected, layout = sea_like_selection(1, 8, 4096, 256, 64, causal=causal, seed=3)
    out = flex_column_mask_attention(q, k, v, selected, layout, scale=0.125, compiled=torch.compile(flex_attention))
    ref = column_mask_attention(q.float(), k.float(), v.float(), selected, layout, scale=0.125)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_triton_tile_runs_match_the_tensor_op_ones(causal):
    from approxattn.kernels.sparse_attention import tile_runs, tile_runs_triton

    mask = _padding(2, 8192, 7)
    selected, layout = sea_like_selection(2, 8, 8192, 256, 64, causal=causal, key_padding_mask=mask, seed=4)
    for bm, bn in ((64, 64), (128, 32), (32, 128)):
        start, count, runs = tile_runs(selected, layout, bm, bn)
        start_t, count_t, runs_t = tile_runs_triton(selected, layout, bm, bn)
        assert torch.equal(runs, runs_t)
        live = torch.arange(256, device="cuda") < runs[..., None]
        assert torch.equal(start[live], start_t[live]) and torch.equal(count[live], count_t[live])


def test_kernel_with_tensor_op_tile_runs(monkeypatch):
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    monkeypatch.setenv("APPROXATTN_TRITON_TILE_RUNS", "0")
    q, k, v = _inputs(1, 16, 4, 16384, 64, torch.bfloat16, seed=9)
    selected, layout = sea_like_selection(1, 16, 16384, 256, 64, causal=True, seed=5)
    out = fast_column_mask_attention(q, k, v, selected, layout, scale=0.125)
    ref = column_mask_attention(q.float(), k.float(), v.float(), selected, layout, scale=0.125, path="gather")
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("n,T,heads,kv_heads,dtype,smooth", [
    (16384, 128, 16, 16, torch.bfloat16, True),
    (16384, 128, 16, 16, torch.bfloat16, False),
    (8192, 96, 8, 2, torch.float16, False),       # columns of 85 and 86 keys, GQA
    (4096, 64, 4, 4, torch.float32, True),
])
def test_one_column_kernel_matches_reference_at_real_sizes(n, T, heads, kv_heads, dtype, smooth):
    """The one-column kernel (SEA's rows with one cell each) against the reference gather path on the
    one-hot selection: columns drawn smooth along the rows (like SEA's) or uniformly at random."""
    from approxattn.kernels.single_column_attention import fast_single_column_attention, smooth_columns

    q, k, v = _inputs(1, heads, kv_heads, n, 64, dtype, seed=n + T)
    gen = torch.Generator(device="cuda").manual_seed(T)
    layout = column_layout(1, n, n, T, causal=False, device="cuda")
    if smooth:
        row_column = smooth_columns(1, heads, n, T, generator=gen)
    else:
        row_column = torch.randint(0, T, (1, heads, n), generator=gen, device="cuda")
    one_hot = torch.nn.functional.one_hot(row_column, T).bool()
    out = fast_single_column_attention(q, k, v, row_column, layout, scale=0.125)
    assert out is not None and out.dtype == dtype and torch.isfinite(out).all()
    ref = column_mask_attention(q.float(), k.float(), v.float(), one_hot, layout, scale=0.125, path="gather")
    assert rel_err(out, ref) < TOL[dtype]
    general = fast_column_mask_attention_of(q, k, v, one_hot, layout)
    assert rel_err(out, general) < TOL[dtype]


def fast_column_mask_attention_of(q, k, v, selected, layout):
    from approxattn.kernels.sparse_attention import fast_column_mask_attention

    return fast_column_mask_attention(q, k, v, selected, layout, scale=0.125)
