"""The spectrum of attention matrices: singular values by randomized SVD, effective and stable rank,
and the sparse + low-rank split by robust PCA."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .rpca import robust_pca


def _library_randomized_svd():
    """``approxattn.linalg.randomized_svd`` when the library has it, else None."""
    try:
        linalg = importlib.import_module("approxattn.linalg")
    except ImportError:
        return None
    return getattr(linalg, "randomized_svd", None)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``(U, S, Vh)`` of a 2-D matrix (Halko, Martinsson, Tropp 2011).

    Uses ``approxattn.linalg.randomized_svd`` when the library provides it; otherwise this
    small implementation (Gaussian sketch, QR-orthonormalised power iterations).
    """
    library = _library_randomized_svd()
    if library is not None:
        return library(matrix, rank, oversample=oversample, power_iterations=power_iterations, generator=generator)
    if matrix.dim() != 2:
        raise ValueError(f"matrix: expected a 2-D tensor, got shape {tuple(matrix.shape)}")
    rows, cols = matrix.shape
    if not isinstance(rank, int) or not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank: expected an int in 1..{min(rows, cols)}, got {rank!r}")
    a = matrix.double()
    width = min(rank + oversample, min(rows, cols))
    sketch = torch.randn(cols, width, generator=generator, dtype=torch.float64).to(a.device)
    basis, _ = torch.linalg.qr(a @ sketch)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ basis)
    u_small, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    u = basis @ u_small
    return u[:, :rank], s[:rank], vh[:rank]


def rank_profile(matrix: torch.Tensor, *, rank: int = 64, seed: int = 0) -> dict[str, Any]:
    """Spectrum summary of one matrix from its top-``rank`` singular values.

    * ``stable_rank`` = ‖A‖_F² / σ₁² (exact: ‖A‖_F is computed directly).
    * ``energy_rank_90`` / ``_99``: fewest singular values holding 90% / 99% of ‖A‖_F²; None when
      the top ``rank`` hold less (the answer is then > rank).
    * ``effective_rank``: exp of the entropy of the normalised top-``rank`` singular values
      (Roy & Vetterli), a lower estimate when the spectrum has a long tail.
    * ``energy_top``: share of ‖A‖_F² in the top ``rank``.
    """
    a = matrix.double()
    rank = min(rank, *a.shape)
    gen = torch.Generator().manual_seed(seed)
    _, s, _ = randomized_svd(a, rank, generator=gen)
    total = float(a.pow(2).sum())
    energy = torch.cumsum(s.pow(2), 0) / total if total else torch.zeros_like(s)

    def reach(share: float) -> int | None:
        hit = (energy >= share).nonzero()
        return int(hit[0, 0]) + 1 if hit.numel() else None

    p = s / s.sum() if float(s.sum()) else s
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {
        "singular_values": s.tolist(),
        "frobenius": total ** 0.5,
        "stable_rank": total / float(s[0]) ** 2 if float(s[0]) else 0.0,
        "energy_rank_90": reach(0.90),
        "energy_rank_99": reach(0.99),
        "effective_rank": float(torch.tensor(entropy).exp()),
        "energy_top": float(energy[-1]) if len(energy) else 0.0,
        "svd_rank": rank,
    }


def sparse_low_rank_split(matrix: torch.Tensor, **options: Any) -> dict[str, Any]:
    """Robust PCA of one attention matrix: how much is low-rank, how much sparse."""
    result = robust_pca(matrix, **options)
    return result.summary(matrix)
