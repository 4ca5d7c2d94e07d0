"""The public fused op: kernel attention with the feature map computed inside the kernels."""

from __future__ import annotations

import torch

from ..validation import check_inputs
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

    Raises:
        TypeError / ValueError naming the argument for what the kernels cannot take (float64:
        use :func:`naive_feature_attention`; a projection whose width is not d). The mask's rows
        are not read back (no GPU sync): a batch element with no valid key gets zeros (non-causal).
    """
    _check_feature_inputs(q, k, v, cfg, causal, key_padding_mask)
    return unchecked_feature_attention(q, k, v, cfg, causal=causal, key_padding_mask=key_padding_mask)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_feature_inputs(q, k, v, cfg, causal, key_padding_mask) -> None:
    check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, mask_rows=False)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: the fused kernels take float16, bfloat16 or float32, got {q.dtype} "
                        "(naive_feature_attention computes float64)")
    if not isinstance(cfg, FeatureConfig):
        raise TypeError(f"cfg: expected a FeatureConfig, got {type(cfg).__name__}")
    if cfg.feature not in ("elu", "favor", "relu"):
        raise ValueError(f"cfg.feature: expected 'elu', 'favor' or 'relu', got {cfg.feature!r}")
    if (cfg.projection is None) != (cfg.feature == "elu"):
        raise ValueError(f"cfg.projection: {cfg.feature!r} features "
                         f"{'take no projection' if cfg.feature == 'elu' else 'need an (m, d) projection'}")
    if cfg.projection is not None:
        d = q.shape[-1]
        if cfg.projection.dim() != 2 or cfg.projection.shape[1] != d or cfg.projection.shape[0] == 0:
            raise ValueError(f"cfg.projection: expected shape (m, {d}) with m ≥ 1, got {tuple(cfg.projection.shape)}")
        if cfg.projection.device != q.device:
            raise ValueError(f"cfg.projection: expected q's device {q.device}, got {cfg.projection.device}")


def unchecked_feature_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: FeatureConfig, *,
    causal: bool = False, key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`feature_attention` for callers that validated their inputs already (the modules)."""
    if causal:
        from .causal_chunked import chunked_causal_feature_attention, takes

        if takes(cfg, q.shape[-1]):
            return chunked_causal_feature_attention(q, k, v, cfg, key_padding_mask)
        from .causal_linear_attn import causal_feature_attention

        return causal_feature_attention(q, k, v, cfg, key_padding_mask)
    from .linear_attn import chunk_free_feature_attention

    return chunk_free_feature_attention(q, k, v, cfg, key_padding_mask)
