"""SEA's sparse step when every row selected one column: the Triton kernel (interpreter on CPU)
against the reference ``column_mask_attention`` on the one-hot selection, its block tables, and
its errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from approxattn.blocks.sparse_attention import apply_row_mix, column_layout, column_mask_attention
from approxattn.kernels.single_column_attention import applies, column_blocks
from helpers import needs_triton, rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _inputs(batch, heads, kv_heads, nq, nk, d, dv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, d, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, nk, d, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, nk, dv, generator=gen).to(dtype)
    return q, k, v


def _one_hot(row_column, T):
    return torch.nn.functional.one_hot(row_column.long(), T).bool()


@pytest.mark.parametrize("T,block_m", [(1, 4), (7, 4), (16, 16), (130, 64)])
def test_block_tables_cover_each_row_once_in_blocks_of_one_column(T, block_m):
    gen = torch.Generator().manual_seed(T)
    row_column = torch.randint(0, T, (2, 3, 50), generator=gen)
    row_column[1, 2] = T - 1                                     # a head whose rows all chose one column
    order, row_start, block_start = column_blocks(row_column, T, block_m)
    assert order.dtype == row_start.dtype == block_start.dtype == torch.int32
    for b in range(2):
        for h in range(3):
            assert sorted(order[b, h].tolist()) == list(range(50))           # a permutation
            for c in range(T):
                rows = order[b, h, row_start[b, h, c]:row_start[b, h, c + 1]].long()
                assert torch.all(row_column[b, h, rows] == c)
                assert int(block_start[b, h, c + 1] - block_start[b, h, c]) == -(-len(rows) // block_m)
            assert int(block_start[b, h, -1]) <= -(-50 // block_m) + T           # within the grid


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nq,nk,T", [(40, 40, 6), (33, 70, 5), (21, 5, 8)])
def test_kernel_matches_the_reference_on_one_hot_selections(forced_kernels, dtype, nq, nk, T):
    """Self- and cross-attention, GQA, columns of uneven sizes, and L < T (empty columns: those rows give 0)."""
    from approxattn.kernels.single_column_attention import fast_single_column_attention

    q, k, v = _inputs(2, 4, 2, nq, nk, 16, 12, dtype, seed=nq + nk + T)
    row_column = torch.randint(0, T, (2, 4, nq), generator=torch.Generator().manual_seed(T))
    layout = column_layout(2, nq, nk, T, causal=False)
    assert applies(layout)
    out = fast_single_column_attention(q, k, v, row_column, layout, scale=0.4)
    assert out is not None and out.dtype == dtype and out.shape == (2, 4, nq, 12)
    ref = column_mask_attention(q.double(), k.double(), v.double(), _one_hot(row_column, T), layout, scale=0.4)
    assert rel_err(out, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("per_row", [False, True])
def test_kernel_row_mix_equals_the_reference_then_the_mix(forced_kernels, per_row):
    from approxattn.kernels.single_column_attention import fast_single_column_attention

    n, T = 45, 4
    q, k, v = _inputs(2, 4, 4, n, n, 16, 16, torch.float32, seed=7)
    gen = torch.Generator().manual_seed(8)
    row_column = torch.randint(0, T, (2, 4, n), generator=gen)
    row_column[0, 0] = 2                                           # one column: several full blocks
    mix = (torch.rand(2, 4, n, generator=gen), torch.rand(2, 4, n, generator=gen),
           torch.randn(2, 4, n if per_row else 1, 16, generator=gen))
    layout = column_layout(2, n, n, T, causal=False)
    out = fast_single_column_attention(q, k, v, row_column, layout, scale=0.3, mix=mix)
    ref = apply_row_mix(column_mask_attention(q.double(), k.double(), v.double(), _one_hot(row_column, T), layout,
                                              scale=0.3), tuple(t.double() for t in mix))
    assert rel_err(out, ref) < 1e-5


@needs_triton
@settings(max_examples=6, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), groups=st.sampled_from([1, 2]), nq=st.integers(1, 40),
       nk=st.integers(1, 40), T=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_kernel_on_drawn_shapes(heads, groups, nq, nk, T, seed):
    """Drawn shapes (one row, one key, more columns than keys) against the reference, fp32."""
    import os

    from approxattn.kernels.single_column_attention import fast_single_column_attention

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels were imported without TRITON_INTERPRET=1")
    os.environ["APPROXATTN_FORCE_KERNELS"] = "1"
    try:
        q, k, v = _inputs(1, heads * groups, heads, nq, nk, 8, 8, torch.float32, seed)
        row_column = torch.randint(0, T, (1, heads * groups, nq), generator=torch.Generator().manual_seed(seed))
        layout = column_layout(1, nq, nk, T, causal=False)
        out = fast_single_column_attention(q, k, v, row_column, layout, scale=0.5)
    finally:
        del os.environ["APPROXATTN_FORCE_KERNELS"]
    ref = column_mask_attention(q.double(), k.double(), v.double(), _one_hot(row_column, T), layout, scale=0.5)
    if ref.norm() == 0:
        assert torch.all(out == 0)
    else:
        assert rel_err(out, ref) < 1e-5


def test_bad_inputs_and_layouts_it_does_not_cover():
    from approxattn.kernels.single_column_attention import fast_single_column_attention

    q, k, v = _inputs(1, 2, 2, 8, 8, 4, 4, torch.float32, seed=0)
    layout = column_layout(1, 8, 8, 4, causal=False)
    good = torch.zeros(1, 2, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="row_column"):
        fast_single_column_attention(q, k, v, good.float(), layout, scale=0.5)
    with pytest.raises(ValueError, match="row_column: expected shape"):
        fast_single_column_attention(q, k, v, good[:, :, :3], layout, scale=0.5)
    with pytest.raises(TypeError, match="row_column"):
        fast_single_column_attention(q, k, v, good.tolist(), layout, scale=0.5)
    causal = column_layout(1, 8, 8, 4, causal=True)
    padded = column_layout(1, 8, 8, 4, causal=False, key_padding_mask=torch.arange(8)[None] > 1)
    for other in (causal, padded):
        assert not applies(other)
        with pytest.raises(ValueError, match="layout"):
            fast_single_column_attention(q, k, v, good, other, scale=0.5)
    with pytest.raises(ValueError, match="mix"):
        fast_single_column_attention(q, k, v, good, layout, scale=0.5,
                                     mix=(torch.ones(1, 2, 3), torch.ones(1, 2, 8), torch.ones(1, 2, 1, 4)))
