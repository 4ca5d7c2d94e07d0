"""The PyTorch twin of every fused op, built from ``approxattn.blocks`` (the ground truth)."""

from __future__ import annotations

import torch

from ..blocks.feature_maps import (
    causal_key_offsets,
    elu_features,
    favor_key_features,
    favor_log_features,
    favor_query_features,
    relu_features,
    zero_padded,
)
from ..blocks.kernel_attention import causal_kernel_attention, noncausal_kernel_attention
from ..validation import compute_dtype
from .config import FeatureConfig


def naive_feature_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: FeatureConfig, *,
    causal: bool = False, key_padding_mask: torch.Tensor | None = None, chunk_size: int = 64,
) -> torch.Tensor:
    """What :func:`approxattn.kernels.feature_attention` computes, in fp32/fp64 PyTorch."""
    dtype = compute_dtype(q.dtype)
    batch, heads, length, _ = q.shape
    kv_heads = k.shape[1]
    x, y, v = q.to(dtype), k.to(dtype), v.to(dtype)
    key_valid = None if key_padding_mask is None else key_padding_mask[:, None, :]
    offsets, eps_feature = None, 0.0
    if cfg.feature == "elu":
        query_features = elu_features(x)
        key_features = zero_padded(elu_features(y), key_valid)
    elif cfg.feature == "relu":
        w = cfg.projection.to(dtype)
        query_features = relu_features(x * cfg.x_scale, w, eps=cfg.eps)
        key_features = zero_padded(relu_features(y * cfg.x_scale, w, eps=cfg.eps), key_valid)
    else:
        w = cfg.projection.to(dtype)
        query_features = favor_query_features(
            favor_log_features(x * cfg.x_scale, w, hyperbolic=False), ratio=cfg.ratio, eps=cfg.eps,
            stabilize=cfg.stabilize,
        )
        key_logs = favor_log_features(y * cfg.x_scale, w, hyperbolic=False)
        if causal and cfg.stabilize:
            offsets = causal_key_offsets(key_logs, key_valid)
            key_features = cfg.ratio * torch.exp((key_logs - offsets.unsqueeze(-1)).clamp(max=0.0))
            eps_feature = cfg.ratio * cfg.eps
        else:
            key_features = favor_key_features(key_logs, key_valid, ratio=cfg.ratio, eps=cfg.eps,
                                              stabilize=cfg.stabilize)
    grouped = query_features.reshape(batch, kv_heads, heads // kv_heads, *query_features.shape[2:])
    if causal:
        out = causal_kernel_attention(grouped, key_features, v, chunk_size=chunk_size, key_offsets=offsets,
                                      eps_feature=eps_feature, key_valid=key_valid, den_eps=cfg.den_eps)
    else:
        out = noncausal_kernel_attention(grouped, key_features, zero_padded(v, key_valid), den_eps=cfg.den_eps)
    return out.reshape(batch, heads, *out.shape[3:]).to(q.dtype)
