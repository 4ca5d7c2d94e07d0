"""Linformer: projections, sharing modes, slicing and padding."""

from __future__ import annotations

import pytest
import torch

import approxattn
import naive
from approxattn.blocks.projections import mean_pool_matrix
from helpers import qkv, rel_err


def test_matches_naive_formula_with_its_own_projections():
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=20)
    module = approxattn.build("linformer", head_dim=8, rank=6, max_len=32, init="gaussian").double()
    e = module.projection.key_projection[0, :, :20]
    f = module.projection.value_projection[0, :, :20]
    assert rel_err(module(q, k, v), naive.linformer(q, k, v, e, f, 8**-0.5)) < 1e-12


def test_mean_pool_is_identity_at_full_rank_and_segment_means_below():
    assert torch.equal(mean_pool_matrix(5, 5), torch.eye(5))
    pool = mean_pool_matrix(2, 6)
    assert torch.allclose(pool, torch.tensor([[1 / 3] * 3 + [0.0] * 3, [0.0] * 3 + [1 / 3] * 3]))


@pytest.mark.parametrize("sharing, copies, tied", [("headwise", 1, False), ("kv", 1, True), ("none", 3, False)])
def test_sharing_modes(sharing, copies, tied):
    module = approxattn.build("linformer", head_dim=8, rank=4, max_len=16, sharing=sharing, num_heads=3,
                              init="gaussian")
    assert module.projection.key_projection.shape == (copies, 4, 16)
    assert (module.projection.value_projection is None) == tied
    q, k, v = qkv(heads=3, kv_heads=3, seq_q=16, dtype=torch.float32)
    assert module(q, k, v).shape == (2, 3, 16, 8)


def test_per_head_projection_needs_num_heads():
    with pytest.raises(ValueError, match="num_heads"):
        approxattn.build("linformer", head_dim=8, rank=4, max_len=16, sharing="none")


def test_layerwise_sharing_by_tying():
    first = approxattn.build("linformer", head_dim=8, rank=4, max_len=16)
    second = approxattn.build("linformer", head_dim=8, rank=4, max_len=16, init="gaussian")
    second.tie_projection(first)
    assert second.projection.key_projection is first.projection.key_projection


def test_shorter_sequences_use_a_slice_and_longer_ones_are_rejected():
    module = approxattn.build("linformer", head_dim=8, rank=8, max_len=32).double()
    q, k, v = qkv(seq_q=32)
    # with mean-pool init, the 8 segments of 4 keys: a 16-token input touches segments 0–3 only
    short = module(q[:, :, :16], k[:, :, :16], v[:, :, :16])
    assert torch.isfinite(short).all()
    exact_short = approxattn.attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], "linformer", rank=16)
    assert rel_err(exact_short, approxattn.attention(q[:, :, :16], k[:, :, :16], v[:, :, :16])) < 1e-12
    with pytest.raises(ValueError, match="max_len"):
        module(*qkv(seq_q=33))


def test_rank_above_max_len_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match="rank"):
        approxattn.build("linformer", head_dim=8, rank=64, max_len=32)


def test_projection_is_trainable():
    module = approxattn.build("linformer", head_dim=8, rank=4, max_len=16)
    q, k, v = qkv(seq_q=16, dtype=torch.float32)
    module(q, k, v).square().sum().backward()
    assert module.projection.key_projection.grad.abs().sum() > 0


def test_unpadded_rows_in_use_follow_edits_of_e():
    """Without padding the projected keys' validity comes from E alone and is cached; an in-place edit
    of E (a new version) is seen at the next call: a zeroed row is masked out, restored it is back."""
    from approxattn.blocks.projections import SequenceProjection

    proj = SequenceProjection(rank=4, max_len=12, sharing="headwise", num_heads=None, init="mean-pool",
                              generator=torch.Generator().manual_seed(0))
    k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    assert proj(k, v, None)[2].shape == (2, 4) and bool(proj(k, v, None)[2].all())
    with torch.no_grad():
        saved = proj.key_projection[0, 2].clone()
        proj.key_projection[0, 2] = 0.0
    assert proj(k, v, None)[2].tolist() == [[True, True, False, True]] * 2
    with torch.no_grad():
        proj.key_projection[0, 2] = saved
    assert bool(proj(k, v, None)[2].all())
    # E's last row reaches only columns ≥ 9: a length-8 slice leaves it unused
    assert proj(k[:, :, :8], v[:, :, :8], None)[2].tolist() == [[True, True, True, False]] * 2
