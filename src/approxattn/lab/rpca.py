"""Robust PCA by principal component pursuit: split a matrix into low-rank + sparse.

``min ‖L‖_* + λ‖S‖_1  s.t.  L + S = M`` (Candès, Li, Ma, Wright 2011), solved by the inexact
augmented Lagrange multiplier method (Lin, Chen, Ma 2010; an ADMM with a growing penalty):

    S ← shrink(M − L + Y/μ, λ/μ)          (entrywise soft threshold)
    L ← svt(M − S + Y/μ, 1/μ)              (singular value threshold)
    Y ← Y + μ (M − L − S);  μ ← min(ρ μ, μ̄)

stopping when ‖M − L − S‖_F ≤ tol ‖M‖_F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RPCAResult:
    low_rank: torch.Tensor
    sparse: torch.Tensor
    rank: int
    iterations: int
    converged: bool
    residual: float  # ‖M − L − S‖_F / ‖M‖_F at exit

    def summary(self, matrix: torch.Tensor, sparse_tol: float = 1e-6) -> dict[str, float | int | bool]:
        """JSON-friendly shares: how much of ``matrix`` is low-rank and how much sparse."""
        total = float(matrix.double().pow(2).sum())
        scale = float(matrix.abs().max())
        nonzero = self.sparse.abs() > sparse_tol * max(scale, 1e-30)
        return {
            "rank": self.rank,
            "rank_fraction": self.rank / min(matrix.shape),
            "sparse_density": float(nonzero.double().mean()),
            "low_rank_energy": float(self.low_rank.double().pow(2).sum()) / total if total else 0.0,
            "sparse_energy": float(self.sparse.double().pow(2).sum()) / total if total else 0.0,
            "iterations": self.iterations,
            "converged": self.converged,
            "residual": self.residual,
        }


def robust_pca(
    matrix: torch.Tensor,
    *,
    lam: float | None = None,
    tol: float = 1e-7,
    max_iter: int = 500,
    rho: float = 1.5,
    rank_tol: float = 1e-6,
) -> RPCAResult:
    """Principal component pursuit of a 2-D ``matrix`` (computed in float64).

    ``lam`` defaults to ``1/sqrt(max(m, n))``. ``rank`` counts singular values of L above
    ``rank_tol·σ₁(L)``.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix: expected a 2-D tensor, got {getattr(matrix, 'shape', type(matrix).__name__)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("matrix: expected finite entries")
    for name, value in (("tol", tol), ("rho", rho)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if rho <= 1:
        raise ValueError(f"rho: expected > 1 (the penalty must grow), got {rho}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive int, got {max_iter!r}")
    m = matrix.to(torch.float64)
    rows, cols = m.shape
    lam = 1.0 / math.sqrt(max(rows, cols)) if lam is None else float(lam)
    if lam <= 0:
        raise ValueError(f"lam: expected a positive number, got {lam}")
    norm_fro = float(torch.linalg.matrix_norm(m))
    zeros = torch.zeros_like(m)
    if norm_fro == 0.0:
        return RPCAResult(zeros, zeros.clone(), 0, 0, True, 0.0)
    norm_two = float(torch.linalg.matrix_norm(m, ord=2))
    dual = m / max(norm_two, float(m.abs().max()) / lam)
    mu = 1.25 / norm_two
    mu_bar = mu * 1e7
    low, sparse = zeros, zeros.clone()
    residual, rank, converged = 1.0, 0, False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        temp = m - low + dual / mu
        sparse = torch.sign(temp) * torch.clamp(temp.abs() - lam / mu, min=0.0)
        u, s, vh = torch.linalg.svd(m - sparse + dual / mu, full_matrices=False)
        keep = s > 1.0 / mu
        rank = int(keep.sum())
        low = (u[:, :rank] * (s[:rank] - 1.0 / mu)) @ vh[:rank]
        gap = m - low - sparse
        dual = dual + mu * gap
        mu = min(mu * rho, mu_bar)
        residual = float(torch.linalg.matrix_norm(gap)) / norm_fro
        if residual < tol:
            converged = True
            break
    if rank:
        sv = torch.linalg.svdvals(low)
        rank = int((sv > rank_tol * sv[0]).sum())
    return RPCAResult(low.to(matrix.dtype), sparse.to(matrix.dtype), rank, iteration, converged, residual)
