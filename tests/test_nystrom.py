"""Nyström and Gaussian-kernel family: nystromformer, lowrank-oracle, kernelized, skyformer, soft.

Reference numbers come from the project's digest (shared/reference/core_methods.md §3.9, §6.3).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import approxattn
from approxattn.blocks.gaussian_kernel import gaussian_kernel, segment_assignment, segment_means
from approxattn.blocks.pseudo_inverse import (
    hyperpower_iterates,
    nystromformer_pinv,
    razavi_init,
    residual_norm,
    skyformer_inverse,
    skyformer_iterates,
    skyformer_normalize,
    soft_newton_init,
    soft_newton_iterates,
    soft_newton_pinv,
)
from approxattn.linalg import randomized_svd
from approxattn.methods.gaussian import skyformer_factors, skyformer_landmarks
from approxattn.validation import AttentionShape
from helpers import qkv, rel_err

MINE = ("nystromformer", "lowrank-oracle", "kernelized", "skyformer", "soft")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spectral(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(x, ord=2)


def spectral_estimate(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ of a large matrix by a block power method (LAPACK's SVD of the 1024×1024 error
    matrices below takes seconds; this agrees with it to ~1e-9 on them)."""
    return randomized_svd(x, 1, oversample=15, power_iterations=8, generator=gen(0))[1][..., 0]


def naive_gaussian(q, k, scale):
    """κ(q, k) = exp(−scale‖q − k‖²/2) by explicit differences (no expansion trick)."""
    diff = q.unsqueeze(-2) - k.unsqueeze(-3)
    return torch.exp(-0.5 * scale * (diff * diff).sum(-1))


def softmax_reference(q, k, v, mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, -1) @ v


# ----------------------------------------------------------------------------- registry


def test_registered_with_families_and_causal_support():
    specs = approxattn.available_methods()
    assert {m: specs[m].family for m in MINE} == {
        "nystromformer": "nystrom", "lowrank-oracle": "low-rank", "kernelized": "exact",
        "skyformer": "nystrom", "soft": "nystrom",
    }
    assert [m for m in MINE if specs[m].supports_causal] == ["kernelized"]
    for name in ("kernelized", "lowrank-oracle"):
        assert "QUADRATIC" in specs[name].cost_doc and "quadratic" in specs[name].summary.lower()
    assert specs["skyformer"].exact_limit.parent == specs["soft"].exact_limit.parent == "kernelized"


@pytest.mark.parametrize("method, options, name, error", [
    ("nystromformer", {"landmarks": 0}, "landmarks", ValueError),
    ("nystromformer", {"landmarks": 4.0}, "landmarks", TypeError),
    ("nystromformer", {"pinv": "svd"}, "pinv", ValueError),
    ("nystromformer", {"pinv_iterations": 0}, "pinv_iterations", ValueError),
    ("nystromformer", {"conv_kernel_size": 3}, "num_heads", ValueError),
    ("lowrank-oracle", {"rank": 0}, "rank", ValueError),
    ("lowrank-oracle", {"power_iterations": -1}, "power_iterations", ValueError),
    ("kernelized", {"normalization": "softmax"}, "normalization", ValueError),
    ("skyformer", {"landmarks": 0}, "landmarks", ValueError),
    ("skyformer", {"gamma": -0.1}, "gamma", ValueError),
    ("skyformer", {"gamma": "0.1"}, "gamma", TypeError),
    ("skyformer", {"sampling": "leverage"}, "sampling", ValueError),
    ("skyformer", {"num_landmarks": 8}, "num_landmarks", ValueError),
    ("soft", {"landmarks": -3}, "landmarks", ValueError),
    ("soft", {"landmark_source": "keys"}, "landmark_source", ValueError),
])
def test_bad_options_name_the_option(method, options, name, error):
    with pytest.raises(error, match=name):
        approxattn.build(method, head_dim=8, **options)


# ----------------------------------------------------------------------------- exact limits


def test_nystromformer_with_every_token_a_landmark_is_softmax_even_with_padding():
    q, k, v = qkv(seq_q=20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 13:] = False
    mask[1, [0, 4, 5]] = False
    ref = approxattn.attention(q, k, v, key_padding_mask=mask)
    for landmarks in (20, 64):  # more landmarks than tokens clamps to the tokens
        out = approxattn.attention(q, k, v, "nystromformer", landmarks=landmarks, pinv="exact", key_padding_mask=mask)
        assert rel_err(out, ref) < 1e-10
    # the iterative pseudo-inverse gets there as the iterations grow
    errors = [rel_err(approxattn.attention(q, k, v, "nystromformer", landmarks=20, pinv_iterations=t,
                                           key_padding_mask=mask), ref) for t in (2, 6, 25)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_nystromformer_error_falls_with_landmarks():
    q, k, v = qkv(batch=1, heads=2, kv_heads=2, seq_q=256, head_dim=16, std=0.8, generator=gen(1))
    ref = approxattn.attention(q, k, v)
    errors = [rel_err(approxattn.attention(q, k, v, "nystromformer", landmarks=m), ref) for m in (4, 16, 64, 256)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[2] < 0.7 * errors[0]


def test_skyformer_with_all_points_exact_pinv_no_ridge_is_kernelized_on_valid_rows():
    q, k, v = qkv(seq_q=12, seq_k=12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    for normalization in ("none", "row", "symmetric"):
        ref = approxattn.attention(q, k, v, "kernelized", normalization=normalization, key_padding_mask=mask)
        out = approxattn.attention(q, k, v, "skyformer", landmarks=24, pinv="exact", gamma=0.0,
                                   normalization=normalization, key_padding_mask=mask)
        # padded query rows are not landmarks, so only the real rows are exact
        valid_rows = mask[:, None, :, None].expand_as(out)
        assert rel_err(out[valid_rows], ref[valid_rows]) < 1e-9
    # and with a ridge or the iteration it is an approximation, not the same function
    ridge = approxattn.attention(q, k, v, "skyformer", landmarks=24, pinv="exact", gamma=0.1)
    assert rel_err(ridge, approxattn.attention(q, k, v, "kernelized")) > 1e-4


@pytest.mark.parametrize("normalization", ["none", "row", "symmetric"])
def test_soft_with_every_query_a_landmark_is_kernelized(normalization):
    q, k, v = qkv(seq_q=10, seq_k=14, head_dim=8)  # cross-attention: keys differ from queries
    ref = approxattn.attention(q, k, v, "kernelized", normalization=normalization)
    out = approxattn.attention(q, k, v, "soft", landmarks=10, pinv="exact", normalization=normalization)
    assert rel_err(out, ref) < 1e-9
    both = approxattn.attention(q, k, v, "soft", landmarks=24, landmark_source="queries+keys", pinv="exact",
                                normalization=normalization)
    assert rel_err(both, ref) < 1e-9


def test_lowrank_oracle_is_softmax_at_full_rank_and_eckart_young_below():
    q, k, v = qkv(batch=1, heads=2, kv_heads=2, seq_q=24, seq_k=20, std=1.0)
    ref = approxattn.attention(q, k, v)
    assert rel_err(approxattn.attention(q, k, v, "lowrank-oracle", rank=20), ref) < 1e-12
    # below full rank: the exact truncated SVD of A (the sketch spans everything here)
    a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(8), -1)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    for rank in (3, 8):
        best = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :] @ v
        full_sketch = approxattn.attention(q, k, v, "lowrank-oracle", rank=rank, oversample=20 - rank)
        assert rel_err(full_sketch, best) < 1e-10
        # the default sketch (r + 10 directions, 2 power iterations) is near-optimal
        assert rel_err(approxattn.attention(q, k, v, "lowrank-oracle", rank=rank), best) < 1e-3


def test_lowrank_oracle_beats_nystromformer_at_equal_rank():
    q, k, v = qkv(batch=1, heads=2, kv_heads=2, seq_q=128, head_dim=16, std=1.0, generator=gen(4))
    a = torch.softmax((q @ k.transpose(-1, -2)) / 4.0, -1)
    eye = torch.eye(128, dtype=torch.float64).expand(1, 2, 128, 128)
    for rank in (8, 32):
        # applying each method to V = I returns the matrix it uses in place of A
        oracle = approxattn.attention(q, k, eye, "lowrank-oracle", rank=rank)
        nystrom = approxattn.attention(q, k, eye, "nystromformer", landmarks=rank, pinv="exact")
        assert float(spectral(oracle - a).max()) < float(spectral(nystrom - a).max())
        assert float(torch.linalg.matrix_rank(oracle[0, 0])) == rank


# ----------------------------------------------------------------------------- kernelized


def test_kernelized_matches_the_explicit_gaussian_kernel_and_the_softmax_identity():
    q, k, v = qkv(seq_q=9, seq_k=11)
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scale = 8 ** -0.5
    c = naive_gaussian(q, k_rep, scale)
    assert rel_err(approxattn.attention(q, k, v, "kernelized"), c @ v_rep) < 1e-12
    # κ(q, k) = exp(‖q‖²/(2√d))⁻¹ · exp(qᵀk/√d) · exp(‖k‖²/(2√d))⁻¹ (Skyformer §3.1)
    a = torch.exp((q @ k_rep.transpose(-1, -2)) * scale)
    dq = torch.exp(0.5 * scale * (q * q).sum(-1, keepdim=True))
    dk = torch.exp(0.5 * scale * (k_rep * k_rep).sum(-1)).unsqueeze(-2)
    assert rel_err(a / dq / dk, c) < 1e-12
    # row normalisation and the symmetric one
    row = approxattn.attention(q, k, v, "kernelized", normalization="row")
    assert rel_err(row, (c / c.sum(-1, keepdim=True)) @ v_rep) < 1e-12
    sym = approxattn.attention(q, k, v, "kernelized", normalization="symmetric")
    expected = (c / c.sum(-1, keepdim=True).sqrt() / c.sum(-2, keepdim=True).sqrt()) @ v_rep
    assert rel_err(sym, expected) < 1e-12
    # scale is the kernel's temperature
    hot = approxattn.attention(q, k, v, "kernelized", scale=0.9)
    assert rel_err(hot, naive_gaussian(q, k_rep, 0.9) @ v_rep) < 1e-12


def test_kernelized_causal_and_its_limits():
    q, k, v = qkv(seq_q=10)
    c = naive_gaussian(q, k.repeat_interleave(2, 1), 8 ** -0.5).tril()
    v_rep = v.repeat_interleave(2, 1)
    assert rel_err(approxattn.attention(q, k, v, "kernelized", causal=True), c @ v_rep) < 1e-12
    row = approxattn.attention(q, k, v, "kernelized", causal=True, normalization="row")
    assert rel_err(row, (c / c.sum(-1, keepdim=True)) @ v_rep) < 1e-12
    with pytest.raises(ValueError, match="normalization"):
        approxattn.attention(q, k, v, "kernelized", causal=True, normalization="symmetric")


def test_symmetric_normalisation_ignores_padded_query_rows_in_self_attention():
    q, k, v = qkv(seq_q=12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    q2 = torch.where(mask[:, None, :, None], q, torch.randn_like(q) * 4)
    for method, options in (("kernelized", {"normalization": "symmetric"}), ("soft", {"landmarks": 4})):
        out = approxattn.attention(q, k, v, method, key_padding_mask=mask, **options)
        out2 = approxattn.attention(q2, k, v, method, key_padding_mask=mask, **options)
        valid = mask[:, None, :, None].expand_as(out)
        assert rel_err(out2[valid], out[valid]) < 1e-12


# ----------------------------------------------------------------------------- Skyformer reference errors

N_REF, D_REF = 1024, 32
ELLS = (16, 32, 64, 128, 256)
PUBLISHED = {  # relative spectral error of the kernel matrix, q, k ~ N(0, 0.25·I)
    "exact": (0.17, 0.074, 0.039, 0.022, 0.0096),
    "iterative": (0.18, 0.084, 0.047, 0.034, 0.026),
}


def reference_inputs(seed):
    g = gen(100 + seed)
    q = torch.randn(1, 1, N_REF, D_REF, generator=g, dtype=torch.float64) * 0.5
    k = torch.randn(1, 1, N_REF, D_REF, generator=g, dtype=torch.float64) * 0.5
    return q, k


def skyformer_matrix(q, k, ell, *, pinv, gamma, seed):
    shape = AttentionShape(1, 1, 1, q.shape[2], k.shape[2], q.shape[3], q.shape[3])
    left, w, right = skyformer_factors(q, k, None, shape, scale=q.shape[-1] ** -0.5, landmarks=ell, gamma=gamma,
                                       pinv=pinv, iterations=6, generator=gen(seed), replacement=False)
    return (left @ w @ right.transpose(-1, -2))[0, 0]


@pytest.mark.slow
def test_skyformer_reproduces_the_published_error_table():
    errors = {"exact": torch.zeros(len(ELLS)), "iterative": torch.zeros(len(ELLS))}
    seeds = range(3)
    for seed in seeds:
        q, k = reference_inputs(seed)
        c = gaussian_kernel(q, k, scale=D_REF ** -0.5)[0, 0]
        norm = spectral_estimate(c)
        for i, ell in enumerate(ELLS):
            for mode, gamma in (("exact", 0.0), ("iterative", 0.1)):
                approx = skyformer_matrix(q, k, ell, pinv=mode, gamma=gamma, seed=seed)
                errors[mode][i] += float(spectral_estimate(c - approx) / norm) / len(seeds)
    for mode, published in PUBLISHED.items():
        measured = errors[mode]
        assert bool((measured[1:] < measured[:-1]).all()), (mode, measured)
        ratio = measured / torch.tensor(published, dtype=measured.dtype)
        assert bool(((ratio > 0.7) & (ratio < 1.3)).all()), (mode, measured.tolist())
    # the ridge and the 6 iterations cost accuracy, most at large ℓ where the iteration is least converged
    assert bool((errors["iterative"] > errors["exact"]).all())


def test_symmetric_augmentation_beats_naive_nystrom_on_the_non_psd_matrix():
    for seed in range(2):
        q, k = reference_inputs(seed)
        c = gaussian_kernel(q, k, scale=D_REF ** -0.5)[0, 0]
        norm = spectral_estimate(c)
        for ell in (32, 128):
            g = gen(seed)
            rows, cols = torch.randperm(N_REF, generator=g)[:ell], torch.randperm(N_REF, generator=g)[:ell]
            naive = c[:, cols] @ torch.linalg.pinv(c[rows][:, cols]) @ c[rows, :]
            augmented = skyformer_matrix(q, k, ell, pinv="exact", gamma=0.0, seed=seed)
            naive_error = float(spectral_estimate(c - naive) / norm)
            augmented_error = float(spectral_estimate(c - augmented) / norm)
            assert augmented_error < 0.1
            assert naive_error > 4 * augmented_error, (ell, naive_error, augmented_error)


# ----------------------------------------------------------------------------- iterative inverses


def landmark_core(s: float, ell: int = 128):
    """κ(L, L) for ℓ Skyformer landmarks of q, k ~ N(0, s²·I), n = 1024, d = 32."""
    g = gen(7)
    q = torch.randn(1, 1, N_REF, D_REF, generator=g, dtype=torch.float64) * s
    k = torch.randn(1, 1, N_REF, D_REF, generator=g, dtype=torch.float64) * s
    shape = AttentionShape(1, 1, 1, N_REF, N_REF, D_REF, D_REF)
    points, _ = skyformer_landmarks(q, k, None, shape, ell, gen(0), replacement=False)
    return gaussian_kernel(points, points, scale=D_REF ** -0.5)[0, 0]


def assert_monotone_to_zero(residuals, *, below, by):
    assert all(b < a for a, b in zip(residuals, residuals[1:]) if a > 1e-12), residuals
    assert residuals[by] < below, residuals


def test_skyformer_lemma3_spectrum_and_iteration_converges():
    for s, by in ((0.75, 8), (1.0, 6)):
        normalized, _ = skyformer_normalize(landmark_core(s), 0.1)
        eigenvalues = torch.linalg.eigvalsh(normalized)
        assert float(eigenvalues.min()) > 0 and abs(float(eigenvalues.max()) - 1) < 1e-12  # Lemma 3
        residuals = [float(residual_norm(normalized, z)) for z in skyformer_iterates(normalized, 10)]
        assert_monotone_to_zero(residuals, below=1e-2, by=by)
        assert residuals[10] < 1e-10
    # the digest's setting s = 0.5 is the slow case: monotone, converged only near t = 10
    normalized, _ = skyformer_normalize(landmark_core(0.5), 0.1)
    residuals = [float(residual_norm(normalized, z)) for z in skyformer_iterates(normalized, 12)]
    assert_monotone_to_zero(residuals, below=0.05, by=10)
    assert residuals[6] > 0.5  # not yet converged at the paper's 6 iterations
    # and the rebuilt inverse is (M + γI)⁻¹
    core = landmark_core(1.0, ell=32)
    exact = torch.linalg.inv(core + 0.1 * torch.eye(32, dtype=torch.float64))
    assert rel_err(skyformer_inverse(core, gamma=0.1, iterations=12), exact) < 1e-10


def test_nystromformer_iteration_converges_from_the_razavi_init():
    a = torch.softmax(torch.randn(3, 48, 48, generator=gen(2), dtype=torch.float64), -1)
    residuals = [residual_norm(a, z) for z in hyperpower_iterates(a, razavi_init(a), 20)]
    assert float(residuals[0].max()) < 1.0  # the init guarantees a contraction
    for before, after in zip(residuals, residuals[1:]):
        assert bool((after <= before + 1e-12).all())
    assert float(residuals[-1].max()) < 1e-8
    assert rel_err(nystromformer_pinv(a, iterations=20), torch.linalg.inv(a)) < 1e-8
    # rectangular and rank-deficient (masked rows): converges to the Moore–Penrose inverse
    b = a[0, :, :30].clone()
    b[5] = 0.0
    assert rel_err(nystromformer_pinv(b, iterations=40), torch.linalg.pinv(b)) < 1e-8


def test_soft_newton_converges_in_twenty_iterations_on_well_scaled_kernels():
    x = torch.randn(2, 64, D_REF, generator=gen(3), dtype=torch.float64)
    p = gaussian_kernel(x, x, scale=D_REF ** -0.5)
    assert float(torch.linalg.cond(p).max()) < 10
    residuals = [residual_norm(p, z) for z in soft_newton_iterates(p, 20)]
    for before, after in zip(residuals, residuals[1:]):
        assert bool((after < before).all() | (after < 1e-12).all())
    assert float(residuals[-1].max()) < 1e-10
    assert rel_err(soft_newton_pinv(p), torch.linalg.inv(p)) < 1e-10
    # the precondition that the 1.01 back-off tests for
    v0 = soft_newton_init(p)
    eye = torch.eye(64, dtype=torch.float64)
    assert float((eye - p @ v0).abs().sum(-2).amax()) <= 1.01


def test_soft_newton_damping_avoids_the_stalled_top_eigenvalue():
    # constant row sums: the top eigenvalue equals ‖P‖∞, so the undamped start maps it to 2 → 0
    a = 0.8
    p = torch.tensor([[1.0, a], [a, 1.0]], dtype=torch.float64)
    damped = [float(residual_norm(p, z)) for z in soft_newton_iterates(p, 20)]
    assert damped[-1] < 1e-12

    def undamped_iterates(matrix, steps):
        v = soft_newton_init(matrix, damping=1.0)
        for _ in range(steps):
            v = 2 * v - v @ matrix @ v
        return v

    assert float(residual_norm(p, undamped_iterates(p, 20))) > 0.99


def test_pseudo_inverses_are_differentiable():
    x = torch.randn(6, 4, generator=gen(5), dtype=torch.float64)
    sym = lambda m: 0.5 * (m + m.transpose(-1, -2))  # noqa: E731
    p = gaussian_kernel(x, x, scale=0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: soft_newton_pinv(sym(m)), (p,))
    assert torch.autograd.gradcheck(lambda m: skyformer_inverse(sym(m), gamma=0.1), (p,))
    # a positive matrix with distinct row sums: a softmax matrix's equal row sums are a kink of ‖A‖∞
    a = torch.rand(5, 7, generator=gen(6), dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: nystromformer_pinv(m), (a,))


# ----------------------------------------------------------------------------- landmarks


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 24),
    segments=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_segment_means_are_padding_aware(length, segments, seed):
    g = gen(seed)
    valid = torch.rand(2, length, generator=g) < 0.7
    valid[:, 0] = True
    weights, landmark_valid = segment_assignment(valid, segments, torch.float64)
    n_valid = valid.sum(-1)
    # every valid token in exactly one segment, padded tokens in none
    membership = (weights > 0).sum(1)
    assert torch.equal(membership, valid.long())
    # segments are contiguous runs of valid tokens, sizes differ by at most one, rows average
    for b in range(2):
        sizes = (weights[b] > 0).sum(-1)
        used = sizes[sizes > 0]
        assert int(used.max() - used.min()) <= 1
        assert int(landmark_valid[b].sum()) == min(segments, int(n_valid[b]))
        assert torch.allclose(weights[b][landmark_valid[b]].sum(-1), torch.ones(()).double())
        order = weights[b].argmax(0)[valid[b]]
        assert bool((order[1:] >= order[:-1]).all())
    # padded values never reach a landmark, not even inf
    x = torch.randn(2, 3, length, 4, generator=g, dtype=torch.float64)
    poisoned = torch.where(valid[:, None, :, None], x, torch.full_like(x, float("inf")))
    means, _ = segment_means(poisoned, valid, segments)
    assert torch.isfinite(means).all()
    assert torch.allclose(means, segment_means(x, valid, segments)[0])


def test_segment_means_without_padding_are_the_papers_reshaped_means():
    x = torch.randn(2, 3, 24, 5, dtype=torch.float64)
    means, valid = segment_means(x, None, 6)
    assert valid.all()
    assert torch.allclose(means, x.reshape(2, 3, 6, 4, 5).mean(3))


# ----------------------------------------------------------------------------- module behaviour


def test_nystromformer_conv_skip():
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=16)
    module = approxattn.build("nystromformer", head_dim=8, landmarks=4, conv_kernel_size=5, num_heads=4).double()
    base = approxattn.build("nystromformer", head_dim=8, landmarks=4).double()
    v_rep = v.repeat_interleave(2, 1)
    w = module.conv_weight.detach()
    conv = torch.nn.functional.conv1d(
        torch.nn.functional.pad(v_rep.permute(0, 3, 1, 2).reshape(-1, 4, 16), (2, 2)), w.unsqueeze(1), groups=4
    ).reshape(2, 8, 4, 16).permute(0, 2, 3, 1)
    assert rel_err(module(q, k, v), base(q, k, v) + conv) < 1e-12
    module(q, k, v).sum().backward()
    assert module.conv_weight.grad is not None and float(module.conv_weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="conv_kernel_size"):
        module(q[:, :, :5], k, v)
    with pytest.raises(ValueError, match="num_heads"):
        module(q[:, :2], k[:, :1], v[:, :1])


def test_skyformer_redraw_every_call_resamples_only_in_training():
    q, k, v = qkv(seq_q=32)
    module = approxattn.build("skyformer", head_dim=8, landmarks=8, redraw="every_call").double()
    first, second = module(q, k, v), module(q, k, v)
    assert rel_err(first, second) > 1e-6
    module.eval()
    assert torch.equal(module(q, k, v), module(q, k, v))
    fixed = approxattn.build("skyformer", head_dim=8, landmarks=8).double()
    assert torch.equal(fixed(q, k, v), fixed(q, k, v))  # redraw='never' by default


def test_skyformer_sampling_modes_and_clamping():
    q, k, v = qkv(seq_q=16)
    with_rep = approxattn.attention(q, k, v, "skyformer", landmarks=8, sampling="with-replacement")
    without = approxattn.attention(q, k, v, "skyformer", landmarks=8)
    assert torch.isfinite(with_rep).all() and rel_err(with_rep, without) > 1e-6
    big = approxattn.attention(q, k, v, "skyformer", landmarks=500, pinv="exact", gamma=0.0)
    assert rel_err(big, approxattn.attention(q, k, v, "kernelized")) < 1e-9


def test_approximations_approach_kernelized_with_more_landmarks():
    q, k, v = qkv(batch=1, heads=2, kv_heads=2, seq_q=256, head_dim=16, std=0.5, generator=gen(9))
    for method, normalization in (("skyformer", "none"), ("soft", "symmetric")):
        ref = approxattn.attention(q, k, v, "kernelized", normalization=normalization)
        errors = [rel_err(approxattn.attention(q, k, v, method, landmarks=m, normalization=normalization), ref)
                  for m in (8, 32, 128)]
        assert errors[0] > errors[1] > errors[2], (method, errors)
        assert errors[2] < 0.1, (method, errors)


def test_costs_grow_with_landmarks():
    for method, option in (("nystromformer", "landmarks"), ("skyformer", "landmarks"), ("soft", "landmarks"),
                           ("lowrank-oracle", "rank")):
        spec = approxattn.get_method(method)
        small = spec.cost(1, 8, 4096, 4096, 64, **{option: 32})
        large = spec.cost(1, 8, 4096, 4096, 64, **{option: 256})
        assert large.flops > small.flops and large.peak_memory > small.peak_memory
