"""The public fused op: kernel attention with the feature map computed inside the kernels."""

from __future__ import annotations

import torch

from .config import FeatureConfig


def feature_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: FeatureConfig, *,
    causal: bool = False, key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel attention ``φ(q)ᵀφ(k)``-weighted, normalised, with φ described by ``cfg``.

    Args:
        q (torch.Tensor): ``[B, Hq, Nq, d]``, fp16/bf16/fp32, any strides.
        k (torch.Tensor): ``[B, Hkv, Nk, d]`` with Hq a multiple of Hkv (grouped-query heads
            read their key/value head; nothing is repeated).
        v (torch.Tensor): ``[B, Hkv, Nk, dv]``.
        cfg (FeatureConfig): the feature map and its constants.
        causal (bool): causal (Nq == Nk): chunk-parallel kernels (``causal_chunked``) or the
            segment scan (``causal_linear_attn``), see :func:`causal_chunked.takes`. Default: False.
        key_padding_mask (torch.Tensor, Optional): ``[B, Nk]`` bool, True = keep.

    Returns:
        ``[B, Hq, Nq, dv]`` in q's dtype; differentiable in q, k, v.
    """
    if causal:
        from .causal_chunked import chunked_causal_feature_attention, takes

        if takes(cfg, q.shape[-1]):
            return chunked_causal_feature_attention(q, k, v, cfg, key_padding_mask)
        from .causal_linear_attn import causal_feature_attention

        return causal_feature_attention(q, k, v, cfg, key_padding_mask)
    from .linear_attn import chunk_free_feature_attention

    return chunk_free_feature_attention(q, k, v, cfg, key_padding_mask)
