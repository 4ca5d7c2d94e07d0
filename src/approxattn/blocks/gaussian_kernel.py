"""The Gaussian kernel of Skyformer/SOFT and the pieces shared by Nyström-style attention.

Kernel: ``κ(q, k) = exp(−scale·‖q − k‖²/2)``. With the softmax temperature ``scale = 1/√d``
this is the paper's ``exp(−‖q − k‖²/(2√d))``, and it relates to the softmax kernel by
``exp(scale·qᵀk) = exp(scale·‖q‖²/2) · κ(q, k) · exp(scale·‖k‖²/2)``.
"""

from __future__ import annotations

import torch

NORMALIZATIONS = ("none", "row", "symmetric")

# Floor for approximate degrees (row or column sums) before dividing by them or taking a
# root, relative to the largest degree of the same (batch, head): a Nyström estimate of a
# positive sum can come out ≤ 0 (or tiny) where the approximation is poor.
DEGREE_RELATIVE_FLOOR = 1e-6


def floored_degrees(degree: torch.Tensor) -> torch.Tensor:
    """``max(degree, 1e-6·max(degree))`` over the rows of ``degree (B, H, N, 1)`` (the floor carries no gradient)."""
    floor = (DEGREE_RELATIVE_FLOOR * degree.detach().amax(dim=-2, keepdim=True)).clamp(min=torch.finfo(degree.dtype).tiny)
    return torch.maximum(degree, floor)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖xᵢ − yⱼ‖²`` for x ``(..., n, d)``, y ``(..., m, d)`` → ``(..., n, m)``, clamped at 0.

    Uses ``‖x‖² + ‖y‖² − 2xᵀy`` (no ``n×m×d`` temporary); the clamp removes the small
    negative values cancellation can leave for (near-)identical points.
    """
    sq_x = (x * x).sum(dim=-1, keepdim=True)
    sq_y = (y * y).sum(dim=-1, keepdim=True).transpose(-1, -2)
    return (sq_x + sq_y - 2.0 * (x @ y.transpose(-1, -2))).clamp(min=0.0)


def gaussian_log_kernel(x: torch.Tensor, y: torch.Tensor, *, scale: float) -> torch.Tensor:
    """``log κ(xᵢ, yⱼ) = −scale·‖xᵢ − yⱼ‖²/2`` → ``(..., n, m)``."""
    return -0.5 * scale * squared_distances(x, y)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, *, scale: float) -> torch.Tensor:
    """``κ(xᵢ, yⱼ) = exp(−scale·‖xᵢ − yⱼ‖²/2)`` for x ``(..., n, d)``, y ``(..., m, d)`` → ``(..., n, m)``."""
    return torch.exp(gaussian_log_kernel(x, y, scale=scale))


def masked_rows(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of x ``(B, H, N, c)`` where ``valid (B, N)`` is False."""
    if valid is None:
        return x
    return torch.where(valid[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def factored_attention(
    left: torch.Tensor,
    core: torch.Tensor,
    right: torch.Tensor,
    v: torch.Tensor,
    *,
    normalization: str,
    query_valid: torch.Tensor | None,
) -> torch.Tensor:
    """``out = N(L W Rᵀ) V`` for an attention matrix given as ``L W Rᵀ``, in O(N·ℓ) memory.

    left L ``(B, H, Nq, ℓ)``, core W ``(B, H, ℓ, ℓ')``, right R ``(B, H, Nk, ℓ')`` with the
    rows of padded keys already zero, v ``(B, H, Nk, dv)`` with padded rows zero.
    ``normalization``:

    - ``"none"``: ``C̃ V`` (Skyformer/SOFT as published; the Gaussian kernel is not row-normalised);
    - ``"row"``: ``diag(C̃1)⁻¹ C̃ V``;
    - ``"symmetric"``: ``diag(C̃1)^{-1/2} C̃ diag(C̃ᵀ1_q)^{-1/2} V`` where ``1_q`` marks the
      valid query rows (``query_valid (B, Nq)``, None = all).

    Approximate degrees are floored by :func:`floored_degrees` (a poor approximation can make them ≤ 0).
    """
    if normalization == "none":
        return left @ (core @ (right.transpose(-1, -2) @ v))
    if normalization == "row":
        ones = torch.ones_like(v[..., :1])
        both = left @ (core @ (right.transpose(-1, -2) @ torch.cat([v, ones], dim=-1)))
        return both[..., :-1] / floored_degrees(both[..., -1:])
    if normalization == "symmetric":
        row_degree = left @ (core @ right.sum(dim=-2).unsqueeze(-1))  # (B, H, Nq, 1)
        query_weights = masked_rows(left, query_valid).sum(dim=-2).unsqueeze(-1)  # (B, H, ℓ, 1)
        column_degree = right @ (core.transpose(-1, -2) @ query_weights)  # (B, H, Nk, 1)
        v_scaled = v * floored_degrees(column_degree).rsqrt()
        return (left @ (core @ (right.transpose(-1, -2) @ v_scaled))) * floored_degrees(row_degree).rsqrt()
    raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")


def segment_assignment(valid: torch.Tensor, segments: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding-aware segment-mean matrix: ``valid (B, N)`` bool → ``(B, m, N)`` weights and ``(B, m)`` validity.

    The valid tokens of each row, in order, are split into ``m = segments`` contiguous
    groups of near-equal size (valid token of rank r goes to group ``⌊r·m/n_valid⌋``);
    padded tokens get weight 0 wherever they sit (left, right or interleaved padding).
    Row i of the matrix averages group i. Without padding and with m | N these are
    Nyströmformer's segment means; with m = N each group is one token. A group with no
    token (only when ``n_valid < m``) is marked invalid and its row is zero.
    """
    counts = valid.sum(dim=-1, keepdim=True)  # (B, 1)
    rank = valid.long().cumsum(dim=-1) - 1  # (B, N)
    group = torch.div(rank * segments, counts.clamp(min=1), rounding_mode="floor")
    onehot = (group.unsqueeze(1) == torch.arange(segments, device=valid.device)[None, :, None]) & valid.unsqueeze(1)
    weights = onehot.to(dtype)
    sizes = weights.sum(dim=-1, keepdim=True)
    return weights / sizes.clamp(min=1), sizes.squeeze(-1) > 0


def segment_means(
    x: torch.Tensor, valid: torch.Tensor | None, segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmarks by padding-aware segment means: x ``(B, H, N, d)`` → ``(B, H, m, d)`` and ``(B, m)`` validity."""
    if valid is None:
        valid = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    x = masked_rows(x, valid)  # padded values must not reach the sum, not even as 0·inf
    weights, landmark_valid = segment_assignment(valid, segments, x.dtype)
    return torch.einsum("bmn,bhnd->bhmd", weights, x), landmark_valid
