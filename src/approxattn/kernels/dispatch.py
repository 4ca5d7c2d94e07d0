"""When the attention modules take the fused path, and the feature map they hand it.

``fast_kernel_attention(module, ...)`` returns None whenever the fused kernels do not apply:
not on CUDA, Triton missing, ``APPROXATTN_DISABLE_KERNELS=1``, or a configuration they do not
cover (fp64, feature width or head dim over 512/256). Under ``TRITON_INTERPRET=1``,
``APPROXATTN_FORCE_KERNELS=1`` sends CPU tensors through the kernels too (tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .config import FeatureConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None
MAX_FEATURES = 512
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``: kernels on CPU tensors, small tiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_enabled(t: torch.Tensor) -> bool:
    if not HAS_TRITON or os.environ.get("APPROXATTN_DISABLE_KERNELS", "0") == "1":
        return False
    if t.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("APPROXATTN_FORCE_KERNELS") == "1"


def performer_config(module, scale: float) -> FeatureConfig:
    from ..blocks.feature_maps import favor_ratio

    kernel, projection = module.options["kernel"], module.projection
    if kernel == "relu":
        return FeatureConfig("relu", projection, x_scale=scale**0.5, eps=module.eps)
    hyperbolic = kernel == "softmax-hyperbolic"
    if hyperbolic:
        projection = torch.cat([projection, -projection])
    return FeatureConfig("favor", projection, x_scale=scale**0.5,
                         ratio=favor_ratio(module.options["num_features"], hyperbolic=hyperbolic),
                         eps=module.eps, stabilize=module.options["stabilize"])


def linear_config(module) -> FeatureConfig:
    return FeatureConfig("elu", den_eps=module.options["den_eps"])


def supported(cfg: FeatureConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if cfg.features(q.shape[-1]) > MAX_FEATURES or q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False
    if cfg.projection is not None and cfg.projection.requires_grad:
        return False  # no gradient for ω
    if causal and cfg.feature == "favor" and cfg.stabilize:
        from . import causal_linear_attn

        return causal_linear_attn.SUPPORTS_PREFIX_MAX
    return True


def fast_kernel_attention(module, q, k, v, *, causal, key_padding_mask, scale):
    """The fused path's output for a Performer or elu+1 module, or None where it does not apply."""
    if not kernels_enabled(q):
        return None
    cfg = linear_config(module) if module.spec.name == "linear" else performer_config(module, scale)
    if not supported(cfg, q, k, v, causal):
        return None
    from .ops import unchecked_feature_attention  # the module checked its inputs

    return unchecked_feature_attention(q, k, v, cfg, causal=causal, key_padding_mask=key_padding_mask)
