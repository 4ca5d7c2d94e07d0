"""Exact softmax attention: the reference every approximation is measured against."""

from __future__ import annotations

import torch

from ..blocks.exact import softmax_attention
from ..module import AttentionModule
from ..registry import Cost, ExactLimit, MethodSpec, Shape, register
from ..validation import AttentionShape


class SoftmaxAttention(AttentionModule):
    """``softmax(q kᵀ·scale) v`` through ``scaled_dot_product_attention`` (FlashAttention on GPU)."""

    native_gqa = True

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        return softmax_attention(q, k, v, causal=causal, key_valid=key_padding_mask, scale=scale)


def softmax_cost(shape: Shape, options: dict) -> Cost:
    pairs = shape.batch * shape.heads * shape.seq_q * shape.seq_k * (0.5 if shape.causal else 1.0)
    return Cost(
        flops=2.0 * pairs * (shape.head_dim + shape.value_dim),
        exps=pairs,
        bytes_moved=shape.io_bytes,
        peak_memory=4.0 * shape.batch * shape.heads * shape.seq_q,
    )


register(MethodSpec(
    name="softmax",
    family="exact",
    summary="exact scaled dot-product attention (SDPA; FlashAttention backend on GPU)",
    reference="Vaswani et al. 2017; Dao et al. 2022 (FlashAttention)",
    supports_causal=True,
    options=(),
    exact_limit=ExactLimit(parent="softmax", description="is exact attention", options=lambda n: {}),
    cost_formula=softmax_cost,
    cost_doc="flops = 2·B·H·Nq·Nk·(d+dv) (halved causal); exps = B·H·Nq·Nk; bytes = q,k,v,o once "
             "(fused kernel); peak = fp32 log-sum-exp per query row",
    module_class=SoftmaxAttention,
))
