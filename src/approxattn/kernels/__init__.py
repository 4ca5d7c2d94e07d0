"""Fused Triton kernels for the kernel-attention family, each beside its PyTorch twin.

- :func:`feature_attention` (``ops.py``): φ(q)(φ(k)ᵀv)/φ(q)(φ(k)ᵀ1) with elu+1, FAVOR+ or
  ReLU random features computed in registers; non-causal (``linear_attn.py``) and causal:
  chunk-parallel for more than 64 features (``causal_chunked.py``), a segment scan otherwise
  (``causal_linear_attn.py``); fwd and bwd.
- :func:`naive_feature_attention` (``naive.py``): the same from ``approxattn.blocks``.
- ``dispatch.py``: when the modules use the kernels (CUDA, Triton importable,
  ``APPROXATTN_DISABLE_KERNELS`` unset).

Triton is optional: this package imports without it; only the ops need it.
"""

from .config import FeatureConfig
from .dispatch import HAS_TRITON, kernels_enabled
from .naive import naive_feature_attention
from .ops import feature_attention

__all__ = ["HAS_TRITON", "FeatureConfig", "feature_attention", "kernels_enabled", "naive_feature_attention"]
