"""The masked row-argmax kernel of SEA's selection against its PyTorch twin (ties, rows without a
candidate, half dtypes, strided probabilities), and select_cells with and without it.

On CPU the kernel runs under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_triton

from approxattn.blocks.sea_mask import select_cells
from approxattn.blocks.sparse_attention import column_layout, nonempty_columns
from approxattn.kernels.sea_select import fast_masked_row_argmax, masked_row_argmax, masked_row_argmax_reference


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [5, 16, 40])
def test_kernel_matches_its_twin(forced_kernels, dtype, T):
    gen = torch.Generator().manual_seed(T)
    B, H, N = 2, 3, 37
    probs = torch.rand(B, H, N, T, generator=gen).softmax(-1)
    probs[0, 1, :5] = 0.25                              # ties: the first of equal maxima
    probs = probs.to(dtype)
    candidates = torch.rand(B, N, T, generator=gen) < 0.5
    candidates[1, 3] = False                            # a row without a candidate: 0
    candidates[0, 4] = True
    got = masked_row_argmax(probs, candidates)
    assert got.dtype == torch.int64 and got.shape == (B, H, N)
    assert torch.equal(got, masked_row_argmax_reference(probs, candidates))
    assert torch.all(got[1, :, 3] == 0)
    strided = probs.transpose(1, 2).contiguous().transpose(1, 2)      # same values, other strides
    assert torch.equal(masked_row_argmax(strided, candidates), got)


@needs_triton
@pytest.mark.parametrize("grouping", ["query", "causal_batch"])
@pytest.mark.parametrize("padded", [False, True])
def test_select_cells_with_and_without_the_kernel(forced_kernels, monkeypatch, grouping, padded):
    """Per-row groupings with candidates mask only the competing rows and take every row's best
    cell from the kernel: the same cells as the PyTorch path, with one-cell and larger budgets."""
    gen = torch.Generator().manual_seed(3 + padded)
    B, H, N, T = 2, 3, 70, 8
    mask = None
    if padded:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, 50:] = False
    layout = column_layout(B, N, N, T, causal=True, key_padding_mask=mask)
    candidates = nonempty_columns(layout)
    probs = torch.rand(B, H, N, T, generator=gen).softmax(-1)
    for k in (2, 6):
        fused = select_cells(probs, candidates, layout.row_length, k=k, grouping=grouping)
        with monkeypatch.context() as mp:
            mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
            plain = select_cells(probs, candidates, layout.row_length, k=k, grouping=grouping)
        assert torch.equal(fused, plain), k


def test_bad_inputs_and_dispatch():
    probs = torch.rand(1, 2, 4, 8)
    with pytest.raises(ValueError, match="candidates"):
        masked_row_argmax_reference(probs, torch.ones(1, 4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="candidates"):
        masked_row_argmax_reference(probs, torch.ones(1, 4, 8))
    with pytest.raises(ValueError, match="probs"):
        masked_row_argmax_reference(probs[0], torch.ones(1, 4, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="probs"):
        masked_row_argmax_reference("p", torch.ones(1, 4, 8, dtype=torch.bool))
    assert fast_masked_row_argmax(probs.double(), torch.ones(1, 4, 8, dtype=torch.bool)) is None
