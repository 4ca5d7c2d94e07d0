"""approxattn.linalg: randomized SVD (Halko et al.) and Nyström for indefinite matrices (Ray et al.)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from approxattn.linalg import nystrom_indefinite, randomized_range_finder, randomized_svd


def spectral(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(x, ord=2)


def with_spectrum(singular_values: torch.Tensor, m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``m×n`` matrix with the given singular values (Haar-random singular vectors)."""
    k = singular_values.numel()
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return u @ torch.diag(singular_values) @ v.T


# ----------------------------------------------------------------------------- randomized SVD


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_svd_matches_top_singular_values_with_two_power_iterations(seed):
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.exp(-torch.arange(150, dtype=torch.float64) / 10)  # decaying spectrum
    a = with_spectrum(sigma, 300, 200, gen)
    rank = 12
    u, s, vh = randomized_svd(a, rank, oversample=10, power_iterations=2, generator=torch.Generator().manual_seed(seed))
    reference = torch.linalg.svdvals(a)[:rank]
    assert u.shape == (300, rank) and s.shape == (rank,) and vh.shape == (rank, 200)
    assert float(((s - reference).abs() / reference).max()) < 1e-3
    # orthonormal factors, and a near-optimal (Eckart–Young) error
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-10) and torch.allclose(vh @ vh.T, eye, atol=1e-10)
    error = spectral(a - u @ torch.diag(s) @ vh)
    assert error < 1.01 * sigma[rank]


def test_power_iterations_sharpen_a_flat_spectrum():
    gen = torch.Generator().manual_seed(5)
    sigma = 1.0 / (1.0 + torch.arange(200, dtype=torch.float64)) ** 0.5  # slow decay: the hard case
    a = with_spectrum(sigma, 200, 200, gen)
    errors = []
    for q in (0, 1, 3):
        u, s, vh = randomized_svd(a, 10, oversample=5, power_iterations=q, generator=torch.Generator().manual_seed(0))
        errors.append(float(spectral(a - u @ torch.diag(s) @ vh) / sigma[10]))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1.3 and errors[2] < 1.1


def test_randomized_svd_at_full_width_is_the_exact_svd_and_batched():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 2, 9, 7, generator=gen, dtype=torch.float64)
    u, s, vh = randomized_svd(a, 50, generator=torch.Generator().manual_seed(0))  # rank clamps to 7
    assert u.shape == (3, 2, 9, 7) and s.shape == (3, 2, 7) and vh.shape == (3, 2, 7, 7)
    assert torch.allclose(u @ torch.diag_embed(s) @ vh, a, atol=1e-12)
    assert torch.allclose(s, torch.linalg.svdvals(a), atol=1e-12)
    # truncation equals the exact truncated SVD (Eckart–Young) when the basis spans everything
    u3, s3, vh3 = randomized_svd(a, 3, oversample=4, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    assert torch.allclose(u3 @ torch.diag_embed(s3) @ vh3, U[..., :3] @ torch.diag_embed(S[..., :3]) @ Vh[..., :3, :],
                          atol=1e-12)


def test_randomized_svd_is_reproducible_from_its_generator_and_keeps_dtype():
    a = torch.randn(40, 30, dtype=torch.float64)
    first = randomized_svd(a, 4, oversample=2, power_iterations=0, generator=torch.Generator().manual_seed(3))
    second = randomized_svd(a, 4, oversample=2, power_iterations=0, generator=torch.Generator().manual_seed(3))
    other = randomized_svd(a, 4, oversample=2, power_iterations=0, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0].abs(), other[0].abs())  # a different sketch of a flat spectrum
    half = randomized_svd(a.to(torch.bfloat16), 4, generator=torch.Generator().manual_seed(3))
    assert all(t.dtype == torch.bfloat16 for t in half)


def test_range_finder_basis_is_orthonormal_and_captures_a_low_rank_range():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 50, 6, generator=gen, dtype=torch.float64) @ torch.randn(2, 6, 40, generator=gen,
                                                                                dtype=torch.float64)
    q = randomized_range_finder(a, 8, generator=torch.Generator().manual_seed(0))
    assert q.shape == (2, 50, 8)
    assert torch.allclose(q.transpose(-1, -2) @ q, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert float((a - q @ (q.transpose(-1, -2) @ a)).norm() / a.norm()) < 1e-12


def test_randomized_svd_gradients():
    gen = torch.Generator().manual_seed(0)
    a = with_spectrum(torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64), 6, 5, gen)
    a.requires_grad_(True)

    def truncated(x, differentiate_basis):
        u, s, vh = randomized_svd(x, 2, oversample=1, power_iterations=1, generator=torch.Generator().manual_seed(1),
                                  differentiate_basis=differentiate_basis)
        return u @ torch.diag(s) @ vh

    assert torch.autograd.gradcheck(lambda x: truncated(x, True), (a,))
    # at full width the fixed-basis gradient is exact too
    full = lambda x: randomized_svd(x, 2, oversample=10, generator=torch.Generator().manual_seed(1),  # noqa: E731
                                    differentiate_basis=False)
    assert torch.autograd.gradcheck(lambda x: (lambda u, s, vh: u @ torch.diag(s) @ vh)(*full(x)), (a,))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"rank": 0}, ValueError),
        ({"rank": 2.5}, TypeError),
        ({"rank": 2, "oversample": -1}, ValueError),
        ({"rank": 2, "power_iterations": True}, TypeError),
    ],
)
def test_randomized_svd_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs)) if len(kwargs) == 1 else list(kwargs)[-1]):
        randomized_svd(torch.randn(5, 4), **kwargs)


def test_randomized_svd_rejects_bad_matrices():
    with pytest.raises(ValueError, match="A"):
        randomized_svd(torch.randn(5), 1)
    with pytest.raises(TypeError, match="A"):
        randomized_svd(torch.ones(3, 3, dtype=torch.long), 1)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), rank=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_randomized_svd_property_reconstructs_when_rank_reaches_the_smaller_dimension(m, n, rank, seed):
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u, s, vh = randomized_svd(a, max(rank, min(m, n)), oversample=0, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(u @ torch.diag(s) @ vh, a, atol=1e-10)
    assert bool((s[:-1] >= s[1:] - 1e-12).all())


# ----------------------------------------------------------------------------- indefinite Nyström


def indefinite_matrix(n: int, generator: torch.Generator) -> torch.Tensor:
    """Symmetric, 'close to PSD': 30 decaying positive eigenvalues and a flat small negative part."""
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    lam = torch.cat([10 * 0.8 ** torch.arange(30, dtype=torch.float64), -0.02 * torch.ones(n - 30, dtype=torch.float64)])
    return u @ torch.diag(lam) @ u.T


@pytest.mark.parametrize("landmarks", [40, 80])
def test_sms_nystrom_beats_plain_nystrom_on_an_indefinite_matrix(landmarks):
    k = indefinite_matrix(300, torch.Generator().manual_seed(0))
    norm = spectral(k)
    for seed in range(2):
        approx = nystrom_indefinite(k, landmarks, generator=torch.Generator().manual_seed(seed))
        s = approx.indices
        plain = k[:, s] @ torch.linalg.pinv(k[s][:, s]) @ k[s, :]
        sms_error = float(spectral(k - approx.matrix()) / norm)
        plain_error = float(spectral(k - plain) / norm)
        assert float(approx.shift) > 0.02  # the most negative eigenvalue is -0.02, times 1.5
        assert sms_error < 0.1
        assert plain_error > 5 * sms_error


def test_a_bare_shift_leaves_the_core_on_the_edge_of_singularity():
    # multiplier 1 shifts the core exactly to singularity (interlacing); a tiny margin then
    # makes the pseudo-inverse invert a rounding-level eigenvalue. Multiplier 1.5 is immune.
    k = indefinite_matrix(300, torch.Generator().manual_seed(0))
    errors = {}
    for multiplier in (1.0, 1.5):
        approx = nystrom_indefinite(k, 80, eig_multiplier=multiplier, eps=1e-12,
                                    generator=torch.Generator().manual_seed(0))
        errors[multiplier] = float(spectral(k - approx.matrix()) / spectral(k))
    assert errors[1.0] > 10 and errors[1.5] < 0.1


def test_nystrom_indefinite_is_exact_on_a_low_rank_psd_matrix_and_batched():
    gen = torch.Generator().manual_seed(3)
    factor = torch.randn(2, 60, 5, generator=gen, dtype=torch.float64)
    k = factor @ factor.transpose(-1, -2)  # PSD of rank 5
    approx = nystrom_indefinite(k, 12, generator=torch.Generator().manual_seed(0))
    assert approx.left.shape == (2, 60, 12) and approx.core_pinv.shape == (2, 12, 12)
    assert approx.right.shape == (2, 12, 60) and approx.indices.shape == (12,) and approx.shift.shape == (2,)
    assert float((approx.shift).abs().max()) < 1e-9  # nothing negative to correct
    assert float((approx.matrix() - k).norm() / k.norm()) < 1e-6


def test_nystrom_indefinite_reads_only_sampled_rows_and_is_reproducible():
    k = indefinite_matrix(100, torch.Generator().manual_seed(1))
    first = nystrom_indefinite(k, 10, sample_size=30, generator=torch.Generator().manual_seed(5))
    second = nystrom_indefinite(k, 10, sample_size=30, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.matrix(), second.matrix())
    s = first.indices
    assert torch.equal(first.left, k[:, s]) and torch.equal(first.right, k[s, :])
    assert len(set(s.tolist())) == 10


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"landmarks": 0}, ValueError, "landmarks"),
        ({"landmarks": 11}, ValueError, "landmarks"),
        ({"landmarks": 4, "sample_size": 3}, ValueError, "sample_size"),
        ({"landmarks": 4, "eig_multiplier": -1.0}, ValueError, "eig_multiplier"),
        ({"landmarks": 4, "rescale": 1}, TypeError, "rescale"),
    ],
)
def test_nystrom_indefinite_rejects_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        nystrom_indefinite(torch.eye(10), **kwargs)
    with pytest.raises(ValueError, match="square"):
        nystrom_indefinite(torch.randn(4, 5), 2)
