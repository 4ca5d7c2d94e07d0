"""Feature maps φ with φ(x)ᵀφ(y) ≈ κ(x, y), and the FAVOR+ stabilisers.

Inputs ``x`` are already scaled so that the softmax kernel is ``exp(xᵀy)`` (q and k are
each multiplied by ``scale ** 0.5``). Shapes: ``x (..., N, d)``, ``projection (m, d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Offset for padded keys in log space: far below any real log-feature, finite so that
# differences of two such offsets stay 0 instead of NaN.
LOG_FLOOR = -1e30


def favor_log_features(x: torch.Tensor, projection: torch.Tensor, *, hyperbolic: bool) -> torch.Tensor:
    """Logs of the positive softmax-kernel features, before normalisation.

    SM⁺: ``ωᵢᵀx − ‖x‖²/2`` for each of the m rows ω of ``projection`` → ``(..., N, m)``.
    Hyperbolic SM^hyp+: the same with ±ωᵢ → ``(..., N, 2m)``.
    The features are ``exp`` of these times ``1/√m`` (``1/√(2m)`` hyperbolic), so that
    ``E[φ(x)ᵀφ(y)] = exp(xᵀy)``.
    """
    projected = x @ projection.T
    half_sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)
    if hyperbolic:
        projected = torch.cat([projected, -projected], dim=-1)
    return projected - half_sq_norm


def favor_ratio(num_features: int, *, hyperbolic: bool) -> float:
    return (2 * num_features if hyperbolic else num_features) ** -0.5


def favor_query_features(log_features: torch.Tensor, *, ratio: float, eps: float, stabilize: bool) -> torch.Tensor:
    """Query features with the per-row max subtracted (it cancels in each row's ratio)."""
    if stabilize:
        log_features = log_features - log_features.amax(dim=-1, keepdim=True).detach()
    return ratio * (torch.exp(log_features) + eps)


def favor_key_features(
    log_features: torch.Tensor,
    key_valid: torch.Tensor | None,
    *,
    ratio: float,
    eps: float,
    stabilize: bool,
) -> torch.Tensor:
    """Non-causal key features, shape ``(B, H, N, m)``.

    The stabiliser is one max over all valid keys and features of a (batch, head): a single
    constant that cancels between numerator and denominator. (A per-key max would not
    cancel and biases the attention.) Padded keys get zero features, ε included, so they
    add nothing to the denominator.
    """
    if stabilize:
        masked = log_features if key_valid is None else log_features.masked_fill(~key_valid[..., None], float("-inf"))
        offset = masked.amax(dim=(-2, -1), keepdim=True).detach()
        # valid entries are <= 0 after the shift; the clamp only touches padded keys
        log_features = (log_features - offset).clamp(max=0.0)
    features = ratio * (torch.exp(log_features) + eps)
    return zero_padded(features, key_valid)


def causal_key_offsets(log_features: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """No-look-ahead key stabiliser: ``M_i = max_{j ≤ i, valid} max_l log φ(k_j)_l``, ``(B, H, N)``.

    Output i is normalised by ``exp(M_i)``, which depends only on keys up to i, so the
    stabiliser cannot leak future tokens (a global max would, through ε and underflow).
    """
    per_key = log_features.amax(dim=-1).detach()
    if key_valid is not None:
        per_key = per_key.masked_fill(~key_valid, LOG_FLOOR)
    return torch.cummax(per_key, dim=-1).values


def relu_features(x: torch.Tensor, projection: torch.Tensor | None, *, eps: float) -> torch.Tensor:
    """Generalized-attention ReLU features ``relu(W x) + ε`` (no projection: ``relu(x) + ε``)."""
    projected = x if projection is None else x @ projection.T
    return F.relu(projected) + eps


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """Katharopoulos et al.'s ``elu(x) + 1``, positive everywhere."""
    return F.elu(x) + 1.0


def zero_padded(features: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of ``features (B, H, N, m)`` at padded keys (``key_valid (B, 1|H, N)``)."""
    if key_valid is None:
        return features
    return torch.where(key_valid[..., None], features, torch.zeros((), dtype=features.dtype, device=features.device))
