"""Independent naive references: explicit N×N matrices, written from the papers' formulas
without the library's blocks (only the module's own random draws / projections are reused)."""

from __future__ import annotations

import math

import torch


def softmax_matrix(q, k, scale, causal=False, mask=None):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
    if causal:
        n = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(logits, -1)


def normalise(weights, v, causal=False):
    if causal:
        n = weights.shape[-1]
        weights = weights * torch.ones(n, n, dtype=weights.dtype).tril()
    v = v.repeat_interleave(weights.shape[1] // v.shape[1], 1)
    return (weights @ v) / weights.sum(-1, keepdim=True)


def favor_plus(q, k, v, projection, scale, eps=0.0, causal=False, hyperbolic=False):
    """Unstabilised FAVOR+: φ(x) = exp(Wx − ‖x‖²/2)/√m (±W for hyperbolic), weights φ(q)ᵀφ(k)."""
    x, y = q * scale**0.5, k * scale**0.5
    k_rep = y.repeat_interleave(q.shape[1] // k.shape[1], 1)

    def phi(z):
        proj = z @ projection.T
        if hyperbolic:
            proj = torch.cat([proj, -proj], -1)
        return (torch.exp(proj - (z * z).sum(-1, keepdim=True) / 2) + eps) / math.sqrt(proj.shape[-1])

    return normalise(phi(x) @ phi(k_rep).transpose(-1, -2), v, causal)


def relu_kernel(q, k, v, projection, scale, eps, causal=False):
    x, y = q * scale**0.5, k.repeat_interleave(q.shape[1] // k.shape[1], 1) * scale**0.5
    weights = (torch.relu(x @ projection.T) + eps) @ (torch.relu(y @ projection.T) + eps).transpose(-1, -2)
    return normalise(weights, v, causal)


def elu_linear(q, k, v, causal=False, den_eps=0.0):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    phi = lambda z: torch.nn.functional.elu(z) + 1  # noqa: E731
    weights = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        n = weights.shape[-1]
        weights = weights * torch.ones(n, n, dtype=weights.dtype).tril()
    v = v.repeat_interleave(weights.shape[1] // v.shape[1], 1)
    return (weights @ v) / (weights.sum(-1, keepdim=True) + den_eps)


def linformer(q, k, v, e, f, scale):
    """softmax(q (E k)ᵀ·scale)(F v) with E, F (r, N) shared by heads."""
    k_r, v_r = e @ k, f @ v
    return softmax_matrix(q, k_r, scale) @ v_r.repeat_interleave(q.shape[1] // k.shape[1], 1)
