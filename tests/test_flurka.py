"""FLuRKA: reductions to its constituents and the additive error bound."""

from __future__ import annotations

import pytest
import torch

import approxattn
from approxattn.blocks.exact import softmax_attention
from helpers import qkv, rel_err

VARIANTS = {"flurka-performer": ("performer", {}), "flurka-relu": ("performer", {"kernel": "relu"}),
            "flurka-linear": ("linear", {})}


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_rank_identity_projection_is_the_kernel_method(variant):
    parent, fixed = VARIANTS[variant]
    q, k, v = qkv(seq_q=24)
    features = {} if parent == "linear" else {"num_features": 32, "seed": 4}
    flurka = approxattn.build(variant, head_dim=8, rank=24, max_len=24, **features).double()
    kernel = approxattn.build(parent, head_dim=8, **features, **fixed).double()
    assert rel_err(flurka(q, k, v), kernel(q, k, v)) < 1e-12


def test_exact_kernel_gives_linformer_with_the_same_projections():
    q, k, v = qkv(seq_q=32, std=0.4)
    flurka = approxattn.build("flurka-performer", head_dim=8, rank=8, max_len=32, init="gaussian").double()
    linformer = approxattn.build("linformer", head_dim=8, rank=8, max_len=32).double()
    linformer.tie_projection(flurka)
    # replacing the kernel stage by the exact exponential kernel is Linformer, exactly
    k_r, v_r, valid = flurka.projection(k, v, None)
    exact_kernel = softmax_attention(q, k_r, v_r, key_valid=valid, scale=8**-0.5)
    assert rel_err(exact_kernel, linformer(q, k, v)) < 1e-12
    # and with more random features FLuRKA converges to it. The error of one feature draw is heavy-tailed
    # (with Gaussian E, ‖k_r‖ is large), so each width takes the median over nine draws: with one draw the
    # check failed on ~15 % of random inputs; with the median of nine the ratio below stayed under 0.22 in
    # 200 random inputs (the m^-1/2 law predicts ~1/16 in expectation)
    errors = []
    for m in (16, 256, 4096):
        draws = []
        for seed in range(9):
            flurka_m = approxattn.build("flurka-performer", head_dim=8, rank=8, max_len=32, init="gaussian",
                                        num_features=m, seed=seed).double()
            flurka_m.projection = flurka.projection
            draws.append(rel_err(flurka_m(q, k, v), linformer(q, k, v)))
        errors.append(sorted(draws)[4])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 3


def peaked(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(seq_q=64, kv_heads=4, generator=gen, std=0.5)
    k[:, :, 5] = q.mean(2) * 6  # one key that most queries strongly prefer
    return q, k, v


@pytest.mark.parametrize("inputs", ["random", "peaked"])
@pytest.mark.parametrize("seed", range(3))
def test_error_is_at_most_linformer_error_plus_kernel_error(inputs, seed):
    q, k, v = qkv(seq_q=64, generator=torch.Generator().manual_seed(seed)) if inputs == "random" else peaked(seed)
    exact = approxattn.attention(q, k, v)
    flurka = approxattn.build("flurka-performer", head_dim=8, rank=16, max_len=64, num_features=32,
                              seed=seed).double()
    linformer = approxattn.build("linformer", head_dim=8, rank=16, max_len=64).double()
    linformer.tie_projection(flurka)
    # the kernel method's own error on the downsampled keys, by an independently built Performer
    k_r, v_r, _ = linformer.projection(k, v, None)
    performer = approxattn.build("performer", head_dim=8, num_features=32, seed=seed).double()
    kernel_error = (performer(q, k_r, v_r) - softmax_attention(q, k_r, v_r, scale=8**-0.5)).norm()
    flurka_error = (flurka(q, k, v) - exact).norm()
    linformer_error = (linformer(q, k, v) - exact).norm()
    assert flurka_error <= linformer_error + kernel_error + 1e-12
    assert flurka_error > 0.5 * max(linformer_error, kernel_error)  # the bound is not vacuous here


def test_a_sample_whose_keys_meet_only_zero_columns_of_e_gives_zeros_not_an_error():
    q, k, v = qkv(batch=2, seq_q=16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 4:] = False                                            # sample 1 keeps keys 0–3
    flurka = approxattn.build("flurka-performer", head_dim=8, rank=4, max_len=16, init="gaussian",
                              num_features=16).double()
    with torch.no_grad():
        for matrix in (flurka.projection.key_projection, flurka.projection.value_projection):
            matrix[..., :4] = 0.0                                  # E, F ignore every key sample 1 keeps
    out = flurka(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))           # its projected values are all zero
    reference = approxattn.build("flurka-performer", head_dim=8, rank=4, max_len=16, init="gaussian",
                                 num_features=16).double()
    reference.load_state_dict(flurka.state_dict())
    assert rel_err(out[:1], reference(q[:1], k[:1], v[:1], key_padding_mask=mask[:1])) < 1e-12
