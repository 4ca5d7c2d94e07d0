"""approxattn: approximate self-attention for long sequences, checked against exact attention.

Public API::

    approxattn.attention(q, k, v, method="softmax", *, causal=False, key_padding_mask=None,
                         scale=None, **options)
    approxattn.attention_matrices(q, k, v, method, ...) -> {"attention": A, ...}  (A @ v = output; small N)
    approxattn.build(method, *, head_dim, **options) -> approxattn.AttentionModule
    approxattn.available_methods() -> {name: MethodSpec}
    approxattn.nn.MultiheadAttention(embed_dim, num_heads, method=..., **options)
    approxattn.graphed(module) -> GraphedAttention  (inference replayed from CUDA graphs)
"""

from . import linalg, nn
from .api import attention, attention_matrices, build
from .graphs import GraphedAttention, graphed
from .module import AttentionModule, RandomFeatureModule
from .registry import Cost, ExactLimit, MethodSpec, Option, available_methods, get_method

__version__ = "0.1.0"

__all__ = [
    "AttentionModule",
    "Cost",
    "ExactLimit",
    "GraphedAttention",
    "MethodSpec",
    "Option",
    "RandomFeatureModule",
    "attention",
    "attention_matrices",
    "available_methods",
    "build",
    "get_method",
    "graphed",
    "linalg",
    "nn",
]
