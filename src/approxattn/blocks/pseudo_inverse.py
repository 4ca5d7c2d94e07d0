"""Matmul-only (pseudo-)inverses of the small landmark matrices of Nyström attention.

Three schemes, each a readable function over batched matrices ``(..., m, n)``:

- :func:`nystromformer_pinv` — Nyströmformer's iteration (Razavi et al. 2014): the
  fourth-order hyper-power update ``Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ)))`` started
  from ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``, which guarantees ``‖I − A Z₀‖₂ < 1``.
- :func:`skyformer_inverse` — Skyformer's regularised inverse of a PSD kernel matrix:
  ``(M + γI)⁻¹ = D^{-1/2} M_n⁻¹ D^{-1/2}`` with ``D = diag((M + γI) 1)`` and
  ``M_n = D^{-1/2}(M + γI)D^{-1/2}`` (spectrum in (0, 1], Skyformer's Lemma 3), ``M_n⁻¹``
  by the same hyper-power update started from ``M_nᵀ / ‖M_n‖₁``.
- :func:`soft_newton_pinv` — SOFT's Newton–Raphson iteration ``V ← 2V − V P V`` for the
  Moore–Penrose inverse, preconditioned by ``V₀ = α Pᵀ`` with ``α = 0.9 · 2 / ‖P‖∞²``,
  halved (at most 10 times) until ``‖I − P V₀‖₁ ≤ 1.01``.

Every scale factor is computed per matrix (per batch element and head), never as one
max over the whole batch as the original code's default does: one ill-scaled head then
cannot slow the others down. The residual ``‖I − A Zₜ‖₂`` of all three decreases
monotonically from its start value (the iterates are polynomials in ``A Aᵀ`` or in a
symmetric ``M``), cubically (hyper-power) or quadratically (Newton) once below 1.

The ``*_iterates`` generators yield ``Z₀, Z₁, …`` so that convergence can be inspected;
the plain functions return the last iterate. All functions are differentiable by
autograd (they are made of matmuls); run them in fp32 or fp64.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _eye_like(matrix: torch.Tensor, size: int | None = None) -> torch.Tensor:
    n = matrix.shape[-1] if size is None else size
    return torch.eye(n, dtype=matrix.dtype, device=matrix.device)


def _norm_1(matrix: torch.Tensor) -> torch.Tensor:
    """``‖A‖₁``: the largest absolute column sum, ``(..., 1, 1)``."""
    return matrix.abs().sum(dim=-2).amax(dim=-1)[..., None, None]


def _norm_inf(matrix: torch.Tensor) -> torch.Tensor:
    """``‖A‖∞``: the largest absolute row sum, ``(..., 1, 1)``."""
    return matrix.abs().sum(dim=-1).amax(dim=-1)[..., None, None]


def _safe(denominator: torch.Tensor) -> torch.Tensor:
    """Guard an all-zero matrix (its pseudo-inverse is zero; avoid 0/0)."""
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def residual_norm(matrix: torch.Tensor, approximate_inverse: torch.Tensor) -> torch.Tensor:
    """``‖I − A Z‖₂`` per matrix: A ``(..., m, n)``, Z ``(..., n, m)`` → ``(...)``."""
    product = matrix @ approximate_inverse
    return torch.linalg.matrix_norm(_eye_like(product) - product, ord=2)


# ----------------------------------------------------------------------------- Nyströmformer


def hyperpower_step(matrix: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One update ``Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ)))``: A ``(..., m, n)``, Z ``(..., n, m)``.

    In the eigenbasis of ``AZ`` a residual ``r = 1 − x`` becomes ``r³(3 + r)/4``: third-order
    convergence, and ``|r|`` never grows for ``r ∈ (−1, 1]``.
    """
    identity = _eye_like(matrix, matrix.shape[-2])
    az = matrix @ z
    return 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))


def hyperpower_iterates(matrix: torch.Tensor, initial: torch.Tensor, iterations: int) -> Iterator[torch.Tensor]:
    """Yield ``Z₀ = initial`` and the ``iterations`` hyper-power iterates after it."""
    z = initial
    yield z
    for _ in range(iterations):
        z = hyperpower_step(matrix, z)
        yield z


def razavi_init(matrix: torch.Tensor) -> torch.Tensor:
    """``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)`` for A ``(..., m, n)`` → ``(..., n, m)``.

    Since ``‖A‖₂² ≤ ‖A‖₁‖A‖∞`` the eigenvalues of ``A Z₀ = AAᵀ/(‖A‖₁‖A‖∞)`` lie in
    [0, 1], so the iteration converges to A⁺ (Razavi et al. 2014). For a row-stochastic
    softmax matrix ``‖A‖∞ = 1`` and this is Nyströmformer's ``Aᵀ / max column sum``.
    """
    return matrix.transpose(-1, -2) / _safe(_norm_1(matrix) * _norm_inf(matrix))


def nystromformer_pinv(matrix: torch.Tensor, *, iterations: int = 6) -> torch.Tensor:
    """Approximate Moore–Penrose inverse: A ``(..., m, n)`` → ``(..., n, m)``.

    Nyströmformer's scheme: :func:`razavi_init` then ``iterations`` hyper-power updates
    (6 in the paper). Zero rows or columns of A (masked landmarks) stay zero in the result.
    """
    *_, last = hyperpower_iterates(matrix, razavi_init(matrix), iterations)
    return last


# ----------------------------------------------------------------------------- Skyformer


def skyformer_normalize(matrix: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``M_n = D^{-1/2}(M + γI)D^{-1/2}`` and ``D^{-1/2}`` for a PSD kernel matrix M ``(..., m, m)``.

    ``D = diag((M + γI) 1)``; M must have non-negative entries and positive row sums (a
    Gaussian-kernel matrix does). Returns ``(M_n (..., m, m), d_inv_sqrt (..., m))``.
    """
    shifted = matrix + gamma * _eye_like(matrix)
    d_inv_sqrt = shifted.sum(dim=-1).rsqrt()
    normalized = d_inv_sqrt[..., :, None] * shifted * d_inv_sqrt[..., None, :]
    return normalized, d_inv_sqrt


def skyformer_iterates(normalized: torch.Tensor, iterations: int) -> Iterator[torch.Tensor]:
    """Hyper-power iterates for ``M_n⁻¹``, started from ``V₀ = M_nᵀ / ‖M_n‖₁`` (per matrix)."""
    initial = normalized.transpose(-1, -2) / _safe(_norm_1(normalized))
    return hyperpower_iterates(normalized, initial, iterations)


def skyformer_inverse(
    matrix: torch.Tensor, *, gamma: float, iterations: int = 6, exact: bool = False
) -> torch.Tensor:
    """Skyformer's approximation of ``(M + γI)⁻¹`` for a Gaussian-kernel matrix M ``(..., m, m)``.

    ``exact=False`` (the paper): symmetric normalisation by the row sums (:func:`skyformer_normalize`),
    ``iterations`` hyper-power updates on ``M_n`` (6 in the paper), then
    ``D^{-1/2} M_n⁻¹ D^{-1/2}``. ``exact=True``: ``torch.linalg.pinv(M + γI)`` (with γ = 0
    the exact Moore–Penrose pseudo-inverse of M). Returns ``(..., m, m)``.
    """
    if exact:
        return torch.linalg.pinv(matrix + gamma * _eye_like(matrix), hermitian=True)
    normalized, d_inv_sqrt = skyformer_normalize(matrix, gamma)
    *_, inverse = skyformer_iterates(normalized, iterations)
    return d_inv_sqrt[..., :, None] * inverse * d_inv_sqrt[..., None, :]


# ----------------------------------------------------------------------------- SOFT


def soft_newton_init(
    matrix: torch.Tensor, *, max_halvings: int = 10, tolerance: float = 1.01, damping: float = 0.9
) -> torch.Tensor:
    """SOFT's preconditioned start ``V₀ = α Pᵀ`` for P ``(..., m, n)`` → ``(..., n, m)``.

    ``α = damping · 2 / ‖P‖∞²`` (the largest row sum, squared), halved until
    ``‖I − P V₀‖₁ ≤ tolerance`` or ``max_halvings`` times, chosen per matrix. For a
    symmetric P, ``‖P‖₂ ≤ ‖P‖∞`` puts every eigenvalue of ``P V₀`` in ``(0, 2·damping]``.
    The damping 0.9 is that of SOFT's ``inverse.py``: with the bare ``2/‖P‖∞²`` of the
    SOFT-Norm code, a P whose top eigenvalue equals its largest row sum (any P with
    constant row sums, e.g. ``[[1, a], [a, 1]]``) starts at eigenvalue exactly 2, which
    Newton maps to 0 for good, and the 1.01 test does not catch it. The number of halvings
    is a discrete choice (no gradient); α itself stays differentiable.
    """
    transposed = matrix.transpose(-1, -2)
    base = damping * 2.0 / _safe(_norm_inf(matrix)) ** 2
    identity = _eye_like(matrix, matrix.shape[-2])
    gram = matrix @ transposed
    with torch.no_grad():
        halvings = torch.full(base.shape, max_halvings, dtype=torch.long, device=matrix.device)
        for j in range(max_halvings, -1, -1):  # the smallest j that passes wins
            residual = identity - (base * 0.5**j) * gram
            ok = residual.abs().sum(dim=-2).amax(dim=-1)[..., None, None] <= tolerance
            halvings = torch.where(ok, torch.full_like(halvings, j), halvings)
    alpha = base * torch.pow(torch.full_like(base, 0.5), halvings.to(base.dtype))
    return alpha * transposed


def newton_step(matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One Newton–Schulz update ``V ← 2V − V P V``: residual ``r`` becomes ``r²``."""
    return 2 * v - v @ matrix @ v


def soft_newton_iterates(matrix: torch.Tensor, iterations: int, **init: float) -> Iterator[torch.Tensor]:
    """Yield ``V₀`` (:func:`soft_newton_init`) and ``iterations`` Newton updates after it."""
    v = soft_newton_init(matrix, **init)
    yield v
    for _ in range(iterations):
        v = newton_step(matrix, v)
        yield v


def soft_newton_pinv(matrix: torch.Tensor, *, iterations: int = 20) -> torch.Tensor:
    """SOFT's Newton–Raphson Moore–Penrose inverse: P ``(..., m, n)`` → ``(..., n, m)`` (20 steps in SOFT)."""
    *_, last = soft_newton_iterates(matrix, iterations)
    return last
