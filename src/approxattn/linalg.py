"""Randomized low-rank linear algebra for analysing attention matrices.

- :func:`randomized_svd` — Halko, Martinsson & Tropp (2011): randomized range finder with
  power iterations, then an SVD of the small projected matrix.
- :func:`nystrom_indefinite` — Ray, Monath, McCallum & Musco (2022), "SMS-Nyström":
  Nyström for indefinite (non-PSD) similarity matrices, made stable by shifting the core
  matrix by an estimate of the most negative eigenvalue.

Both are batched over leading dimensions and reproducible through an explicit
``torch.Generator``. Half-precision inputs are computed in fp32 and returned in their own
dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .validation import compute_dtype

__all__ = ["IndefiniteNystrom", "nystrom_indefinite", "randomized_range_finder", "randomized_svd"]


def _check_matrix(name: str, a: object) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"{name}: expected a tensor of at least 2 dimensions (..., m, n), got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {a.dtype}")
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        raise ValueError(f"{name}: expected non-empty matrices, got shape {tuple(a.shape)}")
    return a


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _gaussian(rows: int, cols: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """An i.i.d. N(0, 1) ``(rows, cols)`` test matrix, drawn in fp64 on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    omega = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device=device)
    return omega.to(device=like.device, dtype=like.dtype)


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_range_finder(
    A: torch.Tensor,
    width: int,
    *,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An orthonormal basis Q ``(..., m, l)`` of A's dominant range, ``l = min(width, m, n)`` (Halko et al.).

    A: ``(..., m, n)``. ``Q = qr(A Ω)`` for a Gaussian Ω ``(n, l)`` (one Ω for the whole
    batch), then ``power_iterations`` times ``Q = qr(Aᵀ Q)``, ``Q = qr(A Q)`` —
    re-orthonormalised at each half step so rounding does not wash out the smaller
    singular directions. ``‖A − Q Qᵀ A‖`` is then within a small factor of the
    (l+1)-th singular value, closer with more power iterations.
    """
    A = _check_matrix("A", A)
    width = _check_int("width", width, 1)
    power_iterations = _check_int("power_iterations", power_iterations, 0)
    m, n = A.shape[-2], A.shape[-1]
    width = min(width, m, n)
    work = A.to(compute_dtype(A.dtype))
    q = _orthonormal_basis(work @ _gaussian(n, width, generator, work))
    work_t = work.transpose(-1, -2)
    for _ in range(power_iterations):
        q = _orthonormal_basis(work_t @ q)
        q = _orthonormal_basis(work @ q)
    return q


def randomized_svd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
    differentiate_basis: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD ``A ≈ U diag(S) Vh`` by the randomized range finder (Halko et al. 2011).

    A: ``(..., m, n)``. Returns U ``(..., m, r)``, S ``(..., r)`` (descending), Vh ``(..., r, n)``
    with ``r = min(rank, m, n)`` (asking for more than the full rank gives the full SVD).

    Algorithm (Halko et al., Alg. 4.4 + 5.1), with ``l = min(r + oversample, m, n)``, written
    for ``m <= n`` (a tall A is handled through ``Aᵀ``, so the sketched side is the smaller one):

    1. draw a Gaussian test matrix Ω ``(n, l)`` (one Ω shared by every matrix of the batch);
    2. ``Q = qr(A Ω)``, an orthonormal basis ``(..., m, l)`` of A's sampled range;
    3. ``power_iterations`` times: ``Q = qr(Aᵀ Q)``, ``Q = qr(A Q)`` (re-orthonormalised
       at each half step, which keeps rounding from washing out small singular values);
       each pass raises the spectrum to a higher power and sharpens the basis;
    4. ``B = Qᵀ A`` ``(..., l, n)``; ``Ũ, S, Vh = svd(B)``; ``U = Q Ũ``; truncate to r.

    Cost: ``2·(power_iterations + 1)`` passes over A, O(m·n·l) flops. With ``l = min(m, n)``
    the basis spans everything and the result is the exact SVD up to rounding.
    ``generator=None`` draws from PyTorch's global generator; pass a seeded
    ``torch.Generator`` for reproducible results.

    Gradients: differentiable by autograd (singular values should be distinct). With
    ``differentiate_basis=False`` the range basis Q is treated as a constant and only
    ``svd(Qᵀ A)`` is differentiated: the gradient is exact whenever Q spans the whole
    sketched side (``rank + oversample >= min(m, n)``) and avoids backpropagating through the
    QR factorisations of the power iterations, which is numerically unstable for
    ill-conditioned A (QR backward solves with the triangular factor).
    """
    A = _check_matrix("A", A)
    rank = _check_int("rank", rank, 1)
    oversample = _check_int("oversample", oversample, 0)
    power_iterations = _check_int("power_iterations", power_iterations, 0)
    if not isinstance(differentiate_basis, bool):
        raise TypeError(f"differentiate_basis: expected a bool, got {type(differentiate_basis).__name__}")
    m, n = A.shape[-2], A.shape[-1]
    if m > n:  # sketch the smaller side: the basis then spans everything once r + oversample >= n
        u, s, vh = randomized_svd(A.transpose(-1, -2), rank, oversample=oversample, power_iterations=power_iterations,
                                  generator=generator, differentiate_basis=differentiate_basis)
        return vh.transpose(-1, -2), s, u.transpose(-1, -2)
    r = min(rank, m, n)
    work = A.to(compute_dtype(A.dtype))
    q = randomized_range_finder(work, r + oversample, power_iterations=power_iterations, generator=generator)
    if not differentiate_basis:
        q = q.detach()
    small = q.transpose(-1, -2) @ work
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ u_small[..., :r]
    return u.to(A.dtype), s[..., :r].to(A.dtype), vh[..., :r, :].to(A.dtype)


class IndefiniteNystrom(NamedTuple):
    """``K ≈ left @ core_pinv @ right`` from :func:`nystrom_indefinite`.

    left ``(..., n, s)`` = ``K[..., :, S]``; core_pinv ``(..., s, s)`` = ``(K[S, S] + shift·I)⁺``;
    right ``(..., s, n)`` = ``K[..., S, :]``; indices ``(s,)`` = the landmarks S; shift
    ``(...)`` ≥ 0, the eigenvalue correction added to the core's diagonal.
    """

    left: torch.Tensor
    core_pinv: torch.Tensor
    right: torch.Tensor
    indices: torch.Tensor
    shift: torch.Tensor

    def matrix(self) -> torch.Tensor:
        """The approximation ``(..., n, n)`` (quadratic memory: analysis only)."""
        return self.left @ self.core_pinv @ self.right


def nystrom_indefinite(
    K: torch.Tensor,
    landmarks: int,
    *,
    sample_size: int | None = None,
    eig_multiplier: float = 1.5,
    rescale: bool = False,
    eps: float = 0.0,
    generator: torch.Generator | None = None,
) -> IndefiniteNystrom:
    """Nyström for an indefinite similarity matrix K ``(..., n, n)`` (SMS-Nyström, Ray et al. 2022).

    Plain Nyström ``K[:, S] K[S, S]⁺ K[S, :]`` is justified for PSD K. For an indefinite K,
    ``K[S, S]`` can have eigenvalues of both signs close to zero and its pseudo-inverse
    explodes. SMS-Nyström shifts the core by an estimate of K's most negative eigenvalue:

    1. sample ``s₂ = sample_size`` indices S₂ uniformly without replacement (default
       ``min(n, max(s, round(√(s·n))))``, the authors' code), and landmarks S ⊂ S₂ of size
       ``s = landmarks``;
    2. ``λ = min(0, λ_min(K[S₂, S₂])) − eps`` (``eps`` an optional absolute margin, default 0;
       λ_min of the symmetric part
       ``(Z + Zᵀ)/2``; for symmetric K that is K[S₂, S₂]'s own smallest eigenvalue),
       times ``eig_multiplier``, times ``n/s₂`` when ``rescale`` (extrapolating a
       sub-matrix eigenvalue to the full matrix);
    3. ``K̃ = K[:, S] (K[S, S] − λ I)⁺ K[S, :]``, i.e. ``shift = −λ ≥ 0``; the pseudo-inverse
       is ``torch.linalg.pinv`` with its default cutoff, so a PSD K (λ_min at rounding level,
       shift below the cutoff) gets plain Nyström. A fixed margin such as 1e-12 would
       instead lift the core's null space just above the cutoff and amplify rounding
       (measured: 3·10⁻⁴ relative error on an exactly rank-5 PSD matrix, against 10⁻¹⁴).

    Only the rows and columns S, S₂ of K are read (O(n·s + s₂²) entries); the caller may
    pass the full matrix (analysis tools have it). For a non-symmetric K the rows
    ``K[S, :]`` are used on the right (a CUR-type decomposition). The same indices are
    used for every matrix of the batch; the shift is computed per matrix.

    ``eig_multiplier`` defaults to 1.5: by eigenvalue interlacing
    ``λ_min(K[S, S]) ≥ λ_min(K[S₂, S₂])``, so a shift of exactly ``−λ_min`` (multiplier 1,
    the authors' code default) can leave the core with an eigenvalue at rounding level;
    whether the pseudo-inverse then cuts it or inverts it (and explodes) is down to
    rounding and margins (measured with ``eps=1e-12``: relative error 4·10⁷ with
    multiplier 1, 0.04 with 1.5). With 1.5 the shifted core keeps every eigenvalue
    ≥ ``0.5·|λ|``. ``rescale=False`` as in the authors' code.
    """
    K = _check_matrix("K", K)
    n = K.shape[-1]
    if K.shape[-2] != n:
        raise ValueError(f"K: expected square similarity matrices (..., n, n), got shape {tuple(K.shape)}")
    landmarks = _check_int("landmarks", landmarks, 1)
    if landmarks > n:
        raise ValueError(f"landmarks: expected at most n = {n} (the matrix size), got {landmarks}")
    if sample_size is None:
        sample_size = min(n, max(landmarks, round(math.sqrt(landmarks * n))))
    sample_size = _check_int("sample_size", sample_size, 1)
    if not landmarks <= sample_size <= n:
        raise ValueError(f"sample_size: expected landmarks <= sample_size <= n ({landmarks}..{n}), got {sample_size}")
    for name, value in (("eig_multiplier", eig_multiplier), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite real number >= 0, got {value!r}")
    if not isinstance(rescale, bool):
        raise TypeError(f"rescale: expected a bool, got {type(rescale).__name__}")

    work = K.to(compute_dtype(K.dtype))
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(n, generator=generator, device=device).to(K.device)
    big = order[:sample_size]
    indices = order[:landmarks]  # S ⊂ S₂: the first s of the same random order
    sub = work[..., big, :][..., :, big]
    lam_min = torch.linalg.eigvalsh(0.5 * (sub + sub.transpose(-1, -2)))[..., 0]
    lam = (lam_min.clamp(max=0.0) - eps) * eig_multiplier
    if rescale:
        lam = lam * (n / sample_size)
    shift = -lam
    core = work[..., indices, :][..., :, indices]
    core = core + shift[..., None, None] * torch.eye(landmarks, dtype=work.dtype, device=work.device)
    core_pinv = torch.linalg.pinv(core)
    dtype = K.dtype
    return IndefiniteNystrom(
        left=work[..., :, indices].to(dtype),
        core_pinv=core_pinv.to(dtype),
        right=work[..., indices, :].to(dtype),
        indices=indices,
        shift=shift.to(dtype),
    )
