"""Random projection matrices for random-feature kernels."""

from __future__ import annotations

import torch


def gaussian_orthogonal_matrix(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``(rows, cols)`` matrix of blocks of exactly orthogonal rows, each row marginally N(0, I).

    Blocks of ``cols`` orthonormal rows come from the QR decomposition of a Gaussian
    matrix (the last block is truncated when ``rows`` is not a multiple of ``cols``);
    blocks are independent. Each row is then rescaled by the norm of a fresh Gaussian
    vector, so row lengths follow χ(cols) and kernel estimators stay unbiased (FAVOR+'s
    ``scaling=0``).
    """
    blocks = []
    remaining = rows
    while remaining > 0:
        gaussian = torch.randn(cols, cols, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # sign fix makes the QR factor Haar-distributed
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        take = min(remaining, cols)
        blocks.append(q.T[:take])
        remaining -= take
    matrix = torch.cat(blocks, dim=0)
    norms = torch.randn(rows, cols, generator=generator, dtype=torch.float64).norm(dim=1)
    return (matrix * norms.unsqueeze(1)).float()


def gaussian_iid_matrix(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``(rows, cols)`` matrix with i.i.d. N(0, 1) entries."""
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64).float()
