"""Attention with a factorised kernel κ(qᵢ, kⱼ) = φ(qᵢ)ᵀφ(kⱼ), given the features.

Grouped-query layout: query features ``(B, Hkv, G, N, m)`` (G query heads share each
key/value head), key features ``(B, Hkv, N, m)``, values ``(B, Hkv, N, dv)``. Nothing of
size N×N is formed; the causal form runs chunk by chunk so memory never holds an
``N×m×dv`` tensor (the carried state is ``m×dv``).
"""

from __future__ import annotations

import torch


def noncausal_kernel_attention(
    query_features: torch.Tensor, key_features: torch.Tensor, v: torch.Tensor, *, den_eps: float = 0.0
) -> torch.Tensor:
    """``out = φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1)`` → ``(B, Hkv, G, N, dv)``; padded keys must have zero features."""
    summary = torch.einsum("bhnm,bhnd->bhmd", key_features, v)
    normaliser = key_features.sum(dim=-2)
    numerator = torch.einsum("bhgnm,bhmd->bhgnd", query_features, summary)
    denominator = torch.einsum("bhgnm,bhm->bhgn", query_features, normaliser)
    return _safe_ratio(numerator, denominator + den_eps)


def causal_kernel_attention(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    key_offsets: torch.Tensor | None = None,
    eps_feature: float = 0.0,
    key_valid: torch.Tensor | None = None,
    den_eps: float = 0.0,
) -> torch.Tensor:
    """Causal kernel attention by chunked prefix sums → ``(B, Hkv, G, N, dv)``.

    Row i gets ``Σ_{j≤i} wᵢⱼ vⱼ / Σ_{j≤i} wᵢⱼ`` with
    ``wᵢⱼ = exp(Mⱼ − Mᵢ)·φ(qᵢ)ᵀφ̃(kⱼ) + ε_f·(Σₗ φ(qᵢ)ₗ)·[j valid]``, where:

    - ``key_features`` φ̃(kⱼ) are expressed relative to a per-key offset ``Mⱼ``
      (``key_offsets (B, Hkv, N)``, non-decreasing in j; None means all zero), so a key's
      true feature for row i is ``exp(Mⱼ − Mᵢ)·φ̃(kⱼ)``: the no-look-ahead FAVOR+ stabiliser;
    - ``eps_feature`` ε_f is a constant added to every key feature *after* stabilisation
      (FAVOR+'s ε), kept apart because it does not rescale with the offset.

    Inside a chunk the weights are formed as a masked ``C×C`` block; across chunks a
    running state ``S = Σ φ̃(k)vᵀ`` (``m×dv``) and ``z = Σ φ̃(k)`` is carried, rescaled
    whenever the offset grows. Padded keys (``key_valid (B, 1|Hkv, N)`` False) contribute
    nothing.
    """
    batch, heads, groups, length, _ = query_features.shape
    if key_valid is not None:
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        key_features = torch.where(key_valid[..., None], key_features, zero)
        v = torch.where(key_valid[..., None], v, zero)
    summary = v.new_zeros(batch, heads, key_features.shape[-1], v.shape[-1])
    normaliser = v.new_zeros(batch, heads, key_features.shape[-1])
    value_sum = v.new_zeros(batch, heads, v.shape[-1])
    key_count = v.new_zeros(batch, heads)
    state_offset = None
    outputs = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        q_c = query_features[..., start:stop, :]
        k_c = key_features[:, :, start:stop]
        v_c = v[:, :, start:stop]
        weights = torch.einsum("bhgim,bhjm->bhgij", q_c, k_c)
        lower = torch.ones(stop - start, stop - start, dtype=torch.bool, device=v.device).tril()
        if key_offsets is not None:
            offsets = key_offsets[:, :, start:stop]
            if state_offset is None:
                state_offset = offsets[..., :1]
            # exp(M_j - M_i) <= 1 for j <= i; the clamp only guards the masked j > i half
            weights = weights * torch.exp((offsets.unsqueeze(-2) - offsets.unsqueeze(-1)).clamp(max=0.0)).unsqueeze(2)
            state_scale = torch.exp(state_offset - offsets).unsqueeze(2)  # (B, H, 1, C)
        else:
            state_scale = None
        weights = weights.masked_fill(~lower, 0.0)
        numerator = weights @ v_c.unsqueeze(2)
        denominator = weights.sum(dim=-1)
        carried_num = torch.einsum("bhgim,bhmd->bhgid", q_c, summary)
        carried_den = torch.einsum("bhgim,bhm->bhgi", q_c, normaliser)
        if state_scale is not None:
            carried_num = carried_num * state_scale.unsqueeze(-1)
            carried_den = carried_den * state_scale
        numerator = numerator + carried_num
        denominator = denominator + carried_den
        if eps_feature:
            valid_c = (
                torch.ones_like(v_c[..., 0]) if key_valid is None
                else key_valid[:, :, start:stop].to(v.dtype).expand(batch, heads, -1)
            )
            running_count = key_count.unsqueeze(-1) + valid_c.cumsum(dim=-1)  # (B, H, C)
            running_values = value_sum.unsqueeze(-2) + v_c.cumsum(dim=-2)  # (B, H, C, dv)
            query_mass = eps_feature * q_c.sum(dim=-1)  # (B, H, G, C)
            numerator = numerator + query_mass.unsqueeze(-1) * running_values.unsqueeze(2)
            denominator = denominator + query_mass * running_count.unsqueeze(2)
            key_count = running_count[..., -1]
            value_sum = running_values[..., -1, :]
        if key_offsets is not None:
            new_offset = offsets[..., -1:]
            decay = torch.exp(offsets - new_offset).unsqueeze(-1)  # (B, H, C, 1)
            rescale = torch.exp(state_offset - new_offset)
            summary = summary * rescale.unsqueeze(-1) + torch.einsum("bhjm,bhjd->bhmd", k_c * decay, v_c)
            normaliser = normaliser * rescale + (k_c * decay).sum(dim=-2)
            state_offset = new_offset
        else:
            summary = summary + torch.einsum("bhjm,bhjd->bhmd", k_c, v_c)
            normaliser = normaliser + k_c.sum(dim=-2)
        outputs.append(_safe_ratio(numerator, denominator + den_eps))
    return torch.cat(outputs, dim=-2)


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator[..., None]``, with 0 for rows that see no key (denominator 0,
    e.g. causal rows before the first unpadded key); the numerator is 0 there too."""
    empty = denominator == 0
    return numerator / torch.where(empty, torch.ones_like(denominator), denominator).unsqueeze(-1)


def quadratic_kernel_attention(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    den_eps: float = 0.0,
) -> torch.Tensor:
    """The same attention through the explicit ``N×N`` weight matrix (a reference for tests).

    Shapes as above; ``key_features`` may also carry a row axis, ``(B, Hkv, G, N, N, m)``
    for row-dependent key features, in which case weights are ``Σₗ qᵢₗ k_{ij l}``.
    """
    if key_features.dim() == 6:
        weights = torch.einsum("bhgim,bhgijm->bhgij", query_features, key_features)
    else:
        weights = torch.einsum("bhgim,bhjm->bhgij", query_features, key_features)
    if causal:
        n = weights.shape[-1]
        weights = weights.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=weights.device).tril(), 0.0)
    return (weights @ v.unsqueeze(2)) / (weights.sum(-1, keepdim=True) + den_eps)
